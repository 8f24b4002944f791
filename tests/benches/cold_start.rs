//! Cold start of an uncached encrypted image from the local registry, ours against the seed
//! design's three steps on the host, same image, same run:
//! - ours: a fresh ipu-image-svc (empty cache) that first attests to the key broker (a swtpm
//!   quote over mutual TLS, as `serve` does at start-up), then Prepare (fetch, verify the
//!   signature, the layer keys released by the broker under its policy, decrypt, unpack,
//!   build the ext4 base, encrypt it at rest, clone, export) + attach + mount + runc;
//! - the seed: `skopeo copy --decryption-key` to an OCI layout, `umoci unpack`, `runc run`.
//!
//! Both print the image's `/hello`. Median of `ROUNDS` (default 5), rounds alternated;
//! target ratio <= 0.9. Our start's stages are recorded from their tracing spans
//! (`ops::timings`: verify, key release, fetch, decrypt, unpack, file system, base
//! encryption, clone, export, attach, mount, run) and reported as medians.
//!
//! `cargo bench -p integration-tests --bench cold_start` (root: mounts and runc)

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_attach::attach::Attachment;
use integration_tests::{fixtures, Registry};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Where our cold start's time went.
#[derive(Default, Clone, Copy)]
struct Stages {
    attest: Duration,
    prepare: Duration,
    attach: Duration,
    run: Duration,
}

/// Our cold start and its stages.
fn ours(
    d: &Path,
    image: &str,
    round: usize,
    broker: &integration_tests::broker::Running,
    tcti: &str,
) -> (Duration, Stages) {
    let state = d.join(format!("ours{round}"));
    let audit = integration_tests::audit_log(&state.join("audit"));
    let t = Instant::now();
    let keys = Arc::new(broker.ipu_keys(tcti, &state.join("tls")));
    let attested = t.elapsed();
    let service = integration_tests::broker::ipu_service(
        integration_tests::broker::service_options(state.join("state")),
        fixtures().join("policies/policy-A.json"),
        state.join("cache"),
        keys,
        audit,
    );
    let t_prepare = Instant::now();
    let p = service.prepare("acme", "hello", image).unwrap();
    let prepared = t_prepare.elapsed();
    let work = state.join("host");
    let rootfs = work.join("rootfs");
    let t_attach = Instant::now();
    let mut a = Attachment::attach(&integration_tests::host_export(&p), &work, &rootfs).unwrap();
    let attached = t_attach.elapsed();
    let t_run = Instant::now();
    let out = ops::timings::time("run", || {
        integration_tests::run_function(
            &rootfs,
            &work,
            p.runtime_config.as_ref().unwrap(),
            &format!("ours{round}"),
        )
    });
    let took = t.elapsed();
    let ran = t_run.elapsed();
    assert!(out.contains("hello from enc-signed"), "{out}");
    a.detach().unwrap();
    service.teardown(&p.clone_id, "bench").unwrap();
    service.shutdown();
    (
        took,
        Stages {
            attest: attested,
            prepare: prepared,
            attach: attached,
            run: ran,
        },
    )
}

/// The seed's three steps, each timed: skopeo, umoci, runc.
#[derive(Default, Clone, Copy)]
struct SeedSteps {
    skopeo: Duration,
    umoci: Duration,
    runc: Duration,
}

fn seed(d: &Path, image: &str, round: usize) -> (Duration, SeedSteps) {
    let dir = d.join(format!("seed{round}"));
    std::fs::create_dir_all(&dir).unwrap();
    let t = Instant::now();
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--decryption-key",
        ])
        .arg(fixtures().join("keys/rsa-2048/priv.pem"))
        .arg(image)
        .arg(format!("oci:{}:img", dir.join("layout").display()))
        .output()
        .expect("skopeo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = t.elapsed();
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:img", dir.join("layout").display()))
        .arg(dir.join("bundle"))
        .output()
        .expect("umoci");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // umoci's config asks for a terminal; the seed's runc runs it without one.
    let config_path = dir.join("bundle/config.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    c["process"]["terminal"] = serde_json::Value::Bool(false);
    std::fs::write(&config_path, c.to_string()).unwrap();
    let unpacked = t.elapsed();
    let out = integration_tests::runc_run(
        &dir.join("bundle"),
        &dir.join("runc"),
        &format!("seed{round}"),
    );
    let took = t.elapsed();
    assert!(out.contains("hello from enc-signed"), "{out}");
    (
        took,
        SeedSteps {
            skopeo: copied,
            umoci: unpacked - copied,
            runc: took - unpacked,
        },
    )
}

fn main() {
    if !integration_tests::is_root() {
        println!("cold_start: skipped (needs root for mounts and runc)");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    std::env::set_var("TSS2_LOG", "all+NONE");
    let registry = Registry::start_fixtures();
    let image = registry.reference("fixtures/hello", "enc-signed");
    let dir = tempfile::tempdir().unwrap();
    // The key broker (in process, mutual TLS on loopback) and the IPU's TPM, whose persisted
    // AK the broker enrolls.
    let (swtpm, broker) = integration_tests::broker::start_with_tpm();
    // Our start's stages, from their spans.
    let timings = ops::timings::install().expect("no other subscriber");
    let (mut o, mut st, mut s, mut seed_steps) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut spans: Vec<(String, Vec<f64>)> = Vec::new();
    for round in 0..rounds {
        let mut run_ours = || {
            timings.take();
            let (took, stages) = ours(dir.path(), &image, round, &broker, &swtpm.tcti());
            o.push(took);
            st.push(stages);
            let recs = timings.take();
            for row in ops::timings::Timings::rows(&recs) {
                let ms = row.time.as_secs_f64() * 1e3;
                match spans.iter_mut().find(|(n, _)| *n == row.stage) {
                    Some((_, v)) => v.push(ms),
                    None => spans.push((row.stage, vec![ms])),
                }
            }
        };
        // Which side goes first flips every round.
        let mut run_seed = || {
            let (took, steps) = seed(dir.path(), &image, round);
            s.push(took);
            seed_steps.push(steps);
        };
        if round % 2 == 0 {
            run_ours();
            run_seed();
        } else {
            run_seed();
            run_ours();
        }
    }
    let ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
    let report = &integration_tests::bench_report::ratio(
        "cold_start",
        "cold start, small fixture: ours / seed",
        ("ours", &ms(&o)),
        ("skopeo + umoci + runc", &ms(&s)),
        "ms",
        Some(integration_tests::bench_report::Target::AtMost(0.9)),
    );
    integration_tests::bench_report::emit(report);
    let stage = |f: fn(&Stages) -> Duration| median(st.iter().map(f).collect());
    let a = stage(|s| s.attest);
    // This machine is noisy: the spread of the per-round ratios says how far the medians
    // can be trusted.
    let mut ratios: Vec<f64> = o
        .iter()
        .zip(&s)
        .map(|(o, s)| o.as_secs_f64() / s.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let (o, s) = (median(o), median(s));
    println!("cold start of {image} (uncached), median of {rounds} rounds, same run:");
    println!(
        "  ours (attest, verify, broker key release, decrypt, unpack, ext4, encrypted base, clone, export, attach, mount, runc): {:8.1} ms",
        o.as_secs_f64() * 1e3
    );
    println!(
        "    of which the attestation (challenge, swtpm quote, attest over mTLS):                                               {:8.1} ms",
        a.as_secs_f64() * 1e3
    );
    println!(
        "    prepare {:.1} ms, attach + mount {:.1} ms, runc {:.1} ms (medians)",
        stage(|s| s.prepare).as_secs_f64() * 1e3,
        stage(|s| s.attach).as_secs_f64() * 1e3,
        stage(|s| s.run).as_secs_f64() * 1e3
    );
    println!(
        "  seed (skopeo copy --decryption-key, umoci unpack, runc run):                                                           {:8.1} ms",
        s.as_secs_f64() * 1e3
    );
    let seed_step = |f: fn(&SeedSteps) -> Duration| {
        median(seed_steps.iter().map(f).collect()).as_secs_f64() * 1e3
    };
    println!(
        "    skopeo {:.1} ms, umoci {:.1} ms, runc {:.1} ms (medians)",
        seed_step(|s| s.skopeo),
        seed_step(|s| s.umoci),
        seed_step(|s| s.runc)
    );
    for (name, f) in [
        (
            "skopeo",
            (|s: &SeedSteps| s.skopeo) as fn(&SeedSteps) -> Duration,
        ),
        ("umoci", |s| s.umoci),
        ("runc", |s| s.runc),
    ] {
        let v: Vec<f64> = seed_steps
            .iter()
            .map(|s| f(s).as_secs_f64() * 1e3)
            .collect();
        integration_tests::bench_report::emit(&integration_tests::bench_report::value(
            "cold_start",
            &format!("seed, step {name}"),
            "ms",
            &v,
            None,
        ));
    }
    println!(
        "  ratio ours / seed: {:.2} (target <= 0.9); per round: min {:.2}, median {:.2}, max {:.2}",
        o.as_secs_f64() / s.as_secs_f64(),
        ratios[0],
        ratios[ratios.len() / 2],
        ratios[ratios.len() - 1]
    );
    let total = o.as_secs_f64() * 1e3;
    println!("  our stages (medians, from their spans; decrypt and unpack are busy times):");
    for (stage, v) in &spans {
        let m = integration_tests::bench_report::median(v);
        println!("    {stage:<14} {m:8.1} ms  {:5.1}%", 100.0 * m / total);
        integration_tests::bench_report::emit(&integration_tests::bench_report::value(
            "cold_start",
            &format!("ours, stage {stage}"),
            "ms",
            v,
            None,
        ));
    }
}
