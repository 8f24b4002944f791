//! Warm start of a function (its image's base already cached): Prepare (policy, signature,
//! layer keys released again by the broker, clone, export), attach (FUSE file + loop device)
//! and mount, p50 and p99 over `ROUNDS` (default 100) runs, in process against the
//! `enc-signed` fixture. The first (cold) Prepare, which builds the base, is reported apart. Target: p50 at
//! most 50 ms.
//!
//! Then `CONCURRENT` (default 32) function starts of the same image at once (on this
//! machine's 2 cores): all must succeed; p50 and p99 of their start times.
//!
//! Layer keys come from the key broker (in process, over mutual TLS on loopback) through one
//! attested session (a swtpm quote), as `ipu-image-svc serve` holds one: every Prepare has
//! both layers' keys released again for its own request.
//!
//! Then the same sequential runs with placement grants on: the broker's and the
//! service's policy name a grant key, each start carries a fresh grant (minted outside the
//! timed part, as the control plane would), the IPU verifies it and claims its serial (synced
//! to disk) and every key release carries it to the broker, which verifies it again. The
//! grant check's own cost is reported as the p50 of `Service::placement` and the difference
//! of the two p50s.
//!
//! `cargo bench -p integration-tests --bench warm_start` (root: loop devices and mounts)

use std::sync::Arc;
use std::time::{Duration, Instant};

use host_attach::attach::Attachment;
use integration_tests::fixtures;
use ipu_image_svc::service::ServiceOptions;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

fn main() {
    if !integration_tests::is_root() {
        println!("warm_start: skipped (needs root for loop devices and mounts)");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let audit = integration_tests::audit_log(&d.join("audit"));
    // The key broker (in process, mutual TLS on loopback) and the IPU's session with it, as
    // `serve` holds one: every Prepare has each layer key released through it.
    let (swtpm, broker) = integration_tests::broker::start_with_tpm();
    let keys = Arc::new(broker.ipu_keys(&swtpm.tcti(), &d.join("tls")));
    let granted_keys = keys.clone();
    let service = Arc::new(integration_tests::broker::ipu_service(
        ServiceOptions {
            clone_ttl: Duration::from_secs(3600),
            ..integration_tests::broker::service_options(d.join("state"))
        },
        fixtures().join("policies/policy-A.json"),
        d.join("cache"),
        keys,
        audit,
    ));
    let image = format!("oci:{}:enc-signed", fixtures().join("oci-layout").display());
    let plain = sequential(&service, &image, rounds, &d.join("plain"), None);
    // Concurrent starts: every one attached and mounted before any is torn down.
    let concurrent: usize = std::env::var("CONCURRENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let barrier = Arc::new(std::sync::Barrier::new(concurrent));
    let threads: Vec<_> = (0..concurrent)
        .map(|i| {
            let service = service.clone();
            let image = image.clone();
            let barrier = barrier.clone();
            let work = d.join(format!("conc{i}"));
            std::thread::spawn(move || {
                barrier.wait();
                let t0 = Instant::now();
                let p = service
                    .prepare("acme", &format!("conc{i}"), &image)
                    .map_err(|e| e.to_string())?;
                let a = Attachment::attach(
                    &integration_tests::host_export(&p),
                    &work,
                    &work.join("rootfs"),
                )
                .map_err(|e| e.to_string())?;
                let took = t0.elapsed();
                let mounted = work.join("rootfs/hello").exists();
                barrier.wait();
                drop(a);
                service
                    .teardown(&p.clone_id, "bench")
                    .map_err(|e| e.to_string())?;
                let _ = std::fs::remove_dir_all(&work);
                Ok::<_, String>((took, mounted))
            })
        })
        .collect();
    let mut started = Vec::new();
    let mut failed = 0;
    for t in threads {
        match t.join().unwrap() {
            Ok((took, true)) => started.push(took),
            Ok((_, false)) => failed += 1,
            Err(e) => {
                eprintln!("a concurrent start failed: {e}");
                failed += 1;
            }
        }
    }
    service.shutdown();
    println!(
        "{concurrent} concurrent starts: {} succeeded, {failed} failed; start p50 {:.1} ms  p99 {:.1} ms",
        started.len(),
        pct(&mut started, 0.5),
        pct(&mut started, 0.99)
    );
    // Placement grants on: the broker's policy and a second service's name a grant key.
    let (scheduler, scheduler_public) = integration_tests::ed25519_pem_pair();
    let mut text = integration_tests::broker::POLICY.to_string();
    text.push_str(&format!(
        "\n[[grant_key]]\nid = \"scheduler\"\npublic_key = \"\"\"\n{scheduler_public}\"\"\"\ntenants = [\"acme\"]\n"
    ));
    let policy = Arc::new(policy::deploy::parse(&text, "policy.toml").unwrap());
    broker.broker.set_policy((*policy).clone()).unwrap();
    let granted_service = integration_tests::broker::ipu_service(
        ServiceOptions {
            clone_ttl: Duration::from_secs(3600),
            ..integration_tests::broker::service_options(d.join("granted-state"))
        },
        fixtures().join("policies/policy-A.json"),
        d.join("cache"),
        granted_keys,
        integration_tests::audit_log(&d.join("granted-audit")),
    )
    .with_grant_gate(ipu_image_svc::grant::GrantGate::new(
        policy,
        "ipu-1".into(),
        ipu_image_svc::grant::SerialStore::open(&d.join("grants")).unwrap(),
    ));
    let mint = |i: usize| {
        let now = std::time::SystemTime::now();
        let grant = policy::grant::Grant {
            version: 1,
            serial: policy::grant::new_serial().unwrap(),
            tenant: "acme".into(),
            function: format!("fn{i}"),
            image: policy::grant::ImageClaim::Reference(image.clone()),
            ipu: "ipu-1".into(),
            host: "host-1.example".into(),
            not_before: now,
            not_after: now + Duration::from_secs(600),
        };
        policy::grant::sign(&grant, scheduler.as_bytes()).unwrap().0
    };
    let granted = sequential(
        &granted_service,
        &image,
        rounds,
        &d.join("granted"),
        Some(&mint),
    );
    granted_service.shutdown();

    println!("warm start of the enc-signed fixture, {rounds} runs (base cached), same run:");
    let ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
    use integration_tests::bench_report::{emit, ratio, value, Target};
    for (name, r) in [("without grants", &plain), ("with grants", &granted)] {
        emit(&value(
            "warm_start",
            &format!("Prepare + attach + mount, {name} (p50)"),
            "ms",
            &ms(&r.total),
            Some(Target::AtMost(50.0)),
        ));
    }
    emit(&ratio(
        "warm_start",
        "with grants / without (Prepare + attach + mount)",
        ("with grants", &ms(&granted.total)),
        ("without", &ms(&plain.total)),
        "ms",
        None,
    ));
    emit(&value(
        "warm_start",
        &format!("{concurrent} concurrent starts (p50; {failed} failed)"),
        "ms",
        &ms(&started),
        None,
    ));
    for (name, mut r) in [("without grants", plain), ("with grants", granted)] {
        println!("  {name}:");
        println!(
            "    Prepare + attach + mount: p50 {:7.2} ms  p99 {:7.2} ms   (target p50 <= 50 ms)",
            pct(&mut r.total, 0.5),
            pct(&mut r.total, 0.99)
        );
        println!(
            "    Prepare alone:            p50 {:7.2} ms  p99 {:7.2} ms",
            pct(&mut r.prepare, 0.5),
            pct(&mut r.prepare, 0.99)
        );
        println!(
            "    attach + mount alone:     p50 {:7.2} ms  p99 {:7.2} ms",
            pct(&mut r.attach, 0.5),
            pct(&mut r.attach, 0.99)
        );
        if !r.placement.is_empty() {
            println!(
                "    grant check (placement):  p50 {:7.2} ms  p99 {:7.2} ms   (verify, serial claimed and synced, audited)",
                pct(&mut r.placement, 0.5),
                pct(&mut r.placement, 0.99)
            );
        }
        println!(
            "    first (cold) start, building the base: {:.1} ms",
            r.cold.as_secs_f64() * 1e3
        );
    }
}

/// Per-round times of one sequential series.
struct Series {
    total: Vec<Duration>,
    prepare: Vec<Duration>,
    attach: Vec<Duration>,
    /// `Service::placement` alone (with grants).
    placement: Vec<Duration>,
    cold: Duration,
}

/// `rounds` warm starts (after one cold one), each attached, mounted and torn down; with
/// `mint`, each start carries a fresh grant (minted untimed) through `Service::placement`.
fn sequential(
    service: &ipu_image_svc::service::Service,
    image: &str,
    rounds: usize,
    d: &std::path::Path,
    mint: Option<&dyn Fn(usize) -> String>,
) -> Series {
    let mut r = Series {
        total: Vec::new(),
        prepare: Vec::new(),
        attach: Vec::new(),
        placement: Vec::new(),
        cold: Duration::ZERO,
    };
    for i in 0..=rounds {
        let grant = mint.map(|m| m(i));
        let t0 = Instant::now();
        let p = match &grant {
            None => service.prepare("acme", &format!("fn{i}"), image).unwrap(),
            Some(g) => {
                let placed = service.placement("", "", image, None, g).unwrap();
                if i > 0 {
                    r.placement.push(t0.elapsed());
                }
                service.prepare_placed(&placed, image, None).unwrap()
            }
        };
        let t1 = Instant::now();
        let work = d.join(format!("host{i}"));
        let mut a = Attachment::attach(
            &integration_tests::host_export(&p),
            &work,
            &work.join("rootfs"),
        )
        .unwrap();
        let t2 = Instant::now();
        if i == 0 {
            r.cold = t2 - t0;
        } else {
            r.prepare.push(t1 - t0);
            r.attach.push(t2 - t1);
            r.total.push(t2 - t0);
        }
        assert!(work.join("rootfs/hello").exists(), "the image is mounted");
        a.detach().unwrap();
        service.teardown(&p.clone_id, "bench").unwrap();
        let _ = std::fs::remove_dir_all(&work);
    }
    r
}
