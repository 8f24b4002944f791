//! Warm start of a function (its image's base already cached): Prepare (policy, signature,
//! layer keys released again by the broker, clone, export), attach (nbdfuse + loop device)
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
//! `cargo bench -p integration-tests --bench warm_start` (root: loop devices and mounts)

use std::sync::Arc;
use std::time::{Duration, Instant};

use host_attach::attach::Attachment;
use integration_tests::fixtures;
use ipu_image_svc::service::{Service, ServiceOptions};

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
    let factory = integration_tests::broker::pipeline_factory(
        fixtures().join("policies/policy-A.json"),
        d.join("cache"),
        keys,
        audit.clone(),
    );
    let service = Arc::new(
        Service::start(
            ServiceOptions {
                state_dir: d.join("state"),
                host_agent_uid: 0,
                clone_ttl: Duration::from_secs(3600),
                tcp_exports: None,
                max_cached_bases: 16,
                verified_layer_ttl: ipu_image_svc::service::known::DEFAULT_VERIFIED_LAYER_TTL,
            },
            factory,
            audit,
        )
        .unwrap(),
    );
    let image = format!("oci:{}:enc-signed", fixtures().join("oci-layout").display());
    let (mut total, mut prepare, mut attach) = (Vec::new(), Vec::new(), Vec::new());
    let mut cold = Duration::ZERO;
    for i in 0..=rounds {
        let t0 = Instant::now();
        let p = service.prepare("acme", &format!("fn{i}"), &image).unwrap();
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
            cold = t2 - t0;
        } else {
            prepare.push(t1 - t0);
            attach.push(t2 - t1);
            total.push(t2 - t0);
        }
        assert!(work.join("rootfs/hello").exists(), "the image is mounted");
        a.detach().unwrap();
        service.teardown(&p.clone_id, "bench").unwrap();
        let _ = std::fs::remove_dir_all(&work);
    }
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
                let p = service.prepare("acme", &format!("conc{i}"), &image)?;
                let a = Attachment::attach(
                    &integration_tests::host_export(&p),
                    &work,
                    &work.join("rootfs"),
                )
                .map_err(|e| {
                    ipu_image_svc::pipeline::PipelineError::new(
                        ipu_image_svc::pipeline::FailureClass::Io,
                        e.to_string(),
                    )
                })?;
                let took = t0.elapsed();
                let mounted = work.join("rootfs/hello").exists();
                barrier.wait();
                drop(a);
                service.teardown(&p.clone_id, "bench")?;
                let _ = std::fs::remove_dir_all(&work);
                Ok::<_, ipu_image_svc::pipeline::PipelineError>((took, mounted))
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
    println!("warm start of the enc-signed fixture, {rounds} runs (base cached), same run:");
    println!(
        "  Prepare + attach + mount: p50 {:7.2} ms  p99 {:7.2} ms   (target p50 <= 50 ms)",
        pct(&mut total, 0.5),
        pct(&mut total, 0.99)
    );
    println!(
        "  Prepare alone:            p50 {:7.2} ms  p99 {:7.2} ms",
        pct(&mut prepare, 0.5),
        pct(&mut prepare, 0.99)
    );
    println!(
        "  attach + mount alone:     p50 {:7.2} ms  p99 {:7.2} ms",
        pct(&mut attach, 0.5),
        pct(&mut attach, 0.99)
    );
    println!(
        "  first (cold) start, building the base: {:.1} ms",
        cold.as_secs_f64() * 1e3
    );
}
