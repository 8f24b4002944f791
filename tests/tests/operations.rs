//! The service for operators, in process on the fixture registry: `/metrics` scraped from
//! the metrics endpoint after Prepare + Teardown runs holds every metric with the counts
//! those runs make; the gRPC health service on the API socket says SERVING, NOT_SERVING
//! while the state directory is read-only and while the audit daemon is stopped, and
//! SERVING again when each comes back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::{expected, fixtures, is_root, Registry};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::PipelineConfig;
use ipu_image_svc::service::{operations, PipelineFactory, Service, ServiceOptions};
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use ops::metrics::{sample, scrape};
use policy::Policy;

/// The service in process (policy-A, the rsa-2048 key) under `d`, auditing to `sink`.
fn service(d: &Path, sink: Arc<dyn audit::AuditSink>) -> Service {
    let cache = d.join("cache");
    let factory_sink = sink.clone();
    let factory: PipelineFactory = Box::new(move |tenant, function| {
        let mut cfg = PipelineConfig::new(
            Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap(),
            cache.clone(),
        );
        cfg.audit = Some(factory_sink.clone());
        cfg.tenant = Some(tenant.into());
        cfg.function = Some(function.into());
        cfg.source.insecure_http_hosts = vec!["127.0.0.1".into()];
        Ok(cfg)
    });
    let options = ServiceOptions {
        state_dir: d.join("state"),
        host_agent_uid: 0,
        clone_ttl: Duration::from_secs(600),
        tcp_exports: None,
        max_cached_bases: 16,
        spool_memory: ipu_image_svc::service::spool::DEFAULT_SPOOL_MEMORY,
        hook_prefetch: ipu_image_svc::service::prefetch::DEFAULT_PREFETCH_LIMIT,
        verified_layer_ttl: ipu_image_svc::service::known::DEFAULT_VERIFIED_LAYER_TTL,
        exports: Default::default(),
    };
    let keys = KeySource::local(DecryptConfig::new(vec![PrivateKey::from_pem(
        &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
    )
    .unwrap()]));
    Service::start(options, factory, keys, sink).unwrap()
}

/// `audit serve` on `d/audit`, sockets in `d/run`; killed on drop.
struct AuditDaemon(Child);

impl AuditDaemon {
    fn start(d: &Path) -> Self {
        let signer = d.join("audit-signer.key");
        if !signer.exists() {
            let (_, key) = audit::CheckpointSigner::generate("ipu.test/ops").unwrap();
            std::fs::write(&signer, key.as_bytes()).unwrap();
        }
        let mut child = Command::new(integration_tests::bin("audit"))
            .arg("serve")
            .arg("--log")
            .arg(d.join("audit"))
            .arg("--signer")
            .arg(&signer)
            .args(["--origin", "ipu.test/ops"])
            .arg("--writer-socket")
            .arg(d.join("run/writer.sock"))
            .arg("--query-socket")
            .arg(d.join("run/query.sock"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("serving"), "{line}");
        AuditDaemon(child)
    }

    fn stop(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for AuditDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A read-only bind mount of a directory over itself, undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> Self {
        let run = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        run(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        let ro = ReadOnly(dir.to_path_buf());
        run(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir));
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_after_prepare_and_teardown_and_health_follows_the_state_dir_and_the_audit_daemon() {
    if !is_root() {
        eprintln!("skipped: the read-only mount needs root");
        return;
    }
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let daemon = AuditDaemon::start(d);
    let sink: Arc<dyn audit::AuditSink> =
        Arc::new(audit::RemoteLog::connect(&d.join("run/writer.sock")).unwrap());
    let service = Arc::new(service(d, sink));

    // The API socket with the health service, and metrics on a free loopback port.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api_socket = d.join("api.sock");
    let (ops_running, metrics_at) = rt.block_on(async {
        let (running, health) = operations::start(
            &service,
            Some(&"127.0.0.1:0".parse().unwrap()),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        let listener = tokio::net::UnixListener::bind(&api_socket).unwrap();
        tokio::spawn(ipu_image_svc::service::grpc::serve_with_health(
            service.clone(),
            listener,
            0,
            health,
            std::future::pending(),
        ));
        let at = running.metrics_at.clone().unwrap();
        (running, at)
    });
    let health = |service_name: &str| -> i32 {
        rt.block_on(async {
            let channel = api::unix::connect(api_socket.clone()).await.unwrap();
            ops::health::HealthClient::new(channel)
                .check(ops::health::HealthCheckRequest {
                    service: service_name.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        })
    };
    let name = operations::health_service_name();
    let (serving, not_serving) = (1, 2);
    wait_for("SERVING", || {
        health(name) == serving && health("") == serving
    });

    // Prepare + Teardown of an encrypted image (built), again (from the cached base), and
    // a rejected image.
    let image = registry.reference("fixtures/hello", "enc-signed");
    for function in ["first", "second"] {
        let p = service.prepare("acme", function, &image).unwrap();
        assert!(service.teardown(&p.clone_id, "function exited").unwrap());
    }
    let rejected = expected().into_iter().find(|e| !e.accept).unwrap();
    let err = service
        .prepare(
            "acme",
            "rejected",
            &registry.reference("fixtures/hello", &rejected.tag),
        )
        .unwrap_err();
    assert_eq!(err.class().as_str(), rejected.reason_class);

    let (code, body) = scrape(&metrics_at).unwrap();
    assert_eq!(code, 200, "{body}");
    let value = |s: &str| sample(&body, s).unwrap_or_else(|| panic!("{s} missing:\n{body}"));
    assert_eq!(value("ipu_image_svc_prepares_total{outcome=\"ok\"}"), 2.0);
    assert_eq!(
        value("ipu_image_svc_prepares_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        value(&format!(
            "ipu_image_svc_refusals_total{{class=\"{}\"}}",
            rejected.reason_class
        )),
        1.0
    );
    let stage = |s: &str| {
        value(&format!(
            "ipu_image_svc_stage_duration_seconds_count{{stage=\"{s}\"}}"
        ))
    };
    assert_eq!(stage("verify"), 3.0, "every Prepare verifies");
    // Built once (fetch with the key release beside it, build, encrypt); the second start's
    // keys are released again for the cached base.
    assert_eq!(stage("fetch"), 1.0);
    assert_eq!(stage("build"), 1.0);
    assert_eq!(stage("base_encrypt"), 1.0);
    assert_eq!(stage("key_release"), 2.0);
    for s in ["clone", "export", "teardown", "erase"] {
        assert_eq!(stage(s), 2.0, "{s}");
    }
    assert_eq!(value("ipu_image_svc_base_cache_misses_total"), 1.0);
    assert_eq!(value("ipu_image_svc_base_cache_hits_total"), 1.0);
    assert_eq!(value("ipu_image_svc_base_cache_evictions_total"), 0.0);
    assert_eq!(value("ipu_image_svc_live_clones"), 0.0);
    assert!(value("ipu_image_svc_decrypted_bytes_total") > 0.0);
    assert_eq!(value("ipu_image_svc_ready"), 1.0);
    // No label names an image, a tenant or a digest.
    for forbidden in ["acme", "fixtures/hello", "sha256:", "enc-signed"] {
        assert!(
            !body.contains(forbidden),
            "{forbidden} in the metrics:\n{body}"
        );
    }

    // The state directory goes read-only: NOT_SERVING; writable again: SERVING.
    let ro = ReadOnly::mount(&d.join("state"));
    wait_for("NOT_SERVING (state dir)", || health(name) == not_serving);
    assert_eq!(
        sample(&scrape(&metrics_at).unwrap().1, "ipu_image_svc_ready"),
        Some(0.0)
    );
    drop(ro);
    wait_for("SERVING again (state dir)", || health(name) == serving);

    // The audit daemon stops: NOT_SERVING; it comes back: SERVING.
    daemon.stop();
    wait_for("NOT_SERVING (audit)", || health(name) == not_serving);
    assert_eq!(health(""), not_serving);
    let _daemon = AuditDaemon::start(d);
    wait_for("SERVING again (audit)", || health(name) == serving);
    // And Prepare works again through it at once: the audit client's first append after
    // the restart finds its old connection gone and is made again on a new one.
    let p = service.prepare("acme", "third", &image).unwrap();
    assert!(service.teardown(&p.clone_id, "function exited").unwrap());

    drop(ops_running);
    service.shutdown();
}
