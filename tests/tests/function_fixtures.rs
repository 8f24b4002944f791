//! The function lifecycle on fixture images. A function runs from every accepted fixture of `tests/fixtures/EXPECTED.md`, served by the
//! fixture registry: Prepare on the service (policy-A, the rsa-2048 key), attach (nbdfuse +
//! loop device), mount, a hardened OCI bundle from the image's own config (its `Cmd` is
//! `/hello`), `runc run`; it prints `hello from <tag>`. Then teardown. Every rejected fixture
//! gets no clone at all, with its reason class. At the end no clone is left, and each of the
//! four creations has its erase on the record.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use host_attach::attach::Attachment;
use host_attach::bundle::{config, Process};
use integration_tests::{expected, fixtures, is_root, Registry};
use ipu_image_svc::pipeline::PipelineConfig;
use ipu_image_svc::service::{PipelineFactory, Service, ServiceOptions};
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::Policy;

fn service(d: &Path, clone_ttl: Duration) -> (Service, Arc<audit::AuditLog>) {
    let audit = integration_tests::audit_log(&d.join("audit"));
    let sink: Arc<dyn audit::AuditSink> = audit.clone();
    let cache = d.join("cache");
    let factory: PipelineFactory = Box::new(move |tenant, function| {
        let mut cfg = PipelineConfig::new(
            Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap(),
            cache.clone(),
        );
        cfg.decryption = DecryptConfig::new(vec![PrivateKey::from_pem(
            &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
        )
        .unwrap()]);
        cfg.audit = Some(sink.clone());
        cfg.tenant = Some(tenant.into());
        cfg.function = Some(function.into());
        cfg.source.insecure_http_hosts = vec!["127.0.0.1".into()];
        Ok(cfg)
    });
    let service = Service::start(
        ServiceOptions {
            state_dir: d.join("state"),
            host_agent_uid: 0,
            clone_ttl,
        },
        factory,
        audit.clone(),
    )
    .unwrap();
    (service, audit)
}

/// Runs the image's own command in the attached rootfs; returns its stdout.
fn run_function(
    rootfs: &Path,
    work: &Path,
    runtime_config: &serde_json::Value,
    id: &str,
) -> String {
    let process = Process::from_image(runtime_config, &[], rootfs).unwrap();
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        config(&process, rootfs, "function").to_string(),
    )
    .unwrap();
    let out = Command::new("runc")
        .arg("--root")
        .arg(work.join("runc"))
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(id)
        .output()
        .expect("runc");
    assert!(
        out.status.success(),
        "{id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_function_runs_from_each_accepted_fixture_and_rejected_ones_get_no_clone() {
    if !is_root() {
        eprintln!("skipped: mounting and runc need root");
        return;
    }
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (service, audit) = service(dir.path(), Duration::from_secs(600));
    let mut ran = Vec::new();
    for e in expected() {
        let image = registry.reference("fixtures/hello", &e.tag);
        let function = format!("fn-{}", e.tag);
        let prepared = service.prepare("acme", &function, &image);
        if !e.accept {
            let err = prepared.expect_err(&e.tag);
            assert_eq!(
                err.class.as_str(),
                e.reason_class,
                "{}: {}",
                e.tag,
                err.message
            );
            assert!(service.list().is_empty(), "{}: a clone was made", e.tag);
            continue;
        }
        let p = prepared.unwrap_or_else(|err| panic!("{}: {}", e.tag, err.message));
        assert_eq!(p.manifest_digest, e.digest, "{}", e.tag);
        let work = dir.path().join("host").join(&e.tag);
        let rootfs = work.join("rootfs");
        let mut attachment = Attachment::attach(&p.socket, &p.export_name, &work, &rootfs).unwrap();
        let output = run_function(
            &rootfs,
            &work,
            p.runtime_config.as_ref().expect("the image has a config"),
            &function,
        );
        attachment.detach().unwrap();
        assert!(service.teardown(&p.clone_id, "function exited").unwrap());
        assert_eq!(output, format!("hello from {}\n", e.tag));
        ran.push(e.tag);
    }
    assert_eq!(
        ran,
        ["signed-cosign", "enc-signed", "multilayer", "zstd"],
        "every accepted fixture ran"
    );
    service.shutdown();
    assert!(std::fs::read_dir(dir.path().join("state/clones"))
        .unwrap()
        .flatten()
        .all(|e| e.path().extension().is_some_and(|x| x != "clone")));
    let count = |kind: audit::EventKind| {
        audit
            .store()
            .query(&audit::Query {
                kind: Some(kind),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .events
            .len()
    };
    assert_eq!(count(audit::EventKind::CloneCreate), 4);
    assert_eq!(count(audit::EventKind::CloneErase), 4);
}

/// A clone past its time to live is torn down as if the host had asked: the export goes (no
/// new connection is accepted), the clone is erased on the record with the reason, and the
/// host agent is told. One that is not yet due stays.
#[test]
fn an_expired_clone_is_hot_removed_and_erased() {
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (service, audit) = service(dir.path(), Duration::from_millis(1500));
    let mut events = service.subscribe();
    let image = registry.reference("fixtures/hello", "enc-signed");
    let p = service.prepare("acme", "short", &image).unwrap();
    assert_eq!(p.ttl, Duration::from_millis(1500));
    let uri = format!(
        "nbd+unix:///{}?socket={}",
        p.export_name,
        p.socket.display()
    );
    let info = Command::new("nbdinfo")
        .arg("--size")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(info.status.success());
    assert!(service.reap_expired().is_empty(), "not due yet");
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(service.reap_expired(), vec![p.clone_id.clone()]);
    assert!(service.list().is_empty());
    assert!(!p.socket.exists());
    assert!(!Command::new("nbdinfo")
        .arg(&uri)
        .output()
        .unwrap()
        .status
        .success());
    let attach = events.try_recv().unwrap();
    let removed = events.try_recv().unwrap();
    assert_eq!((attach.kind, removed.kind), ("attach", "hot_remove"));
    assert_eq!(removed.reason, "TTL expired");
    let erased = audit
        .store()
        .query(&audit::Query {
            kind: Some(audit::EventKind::CloneErase),
            limit: 10,
            ..Default::default()
        })
        .unwrap()
        .events;
    assert_eq!(erased.len(), 1);
    assert_eq!(
        erased[0].details.get("clone_id").map(String::as_str),
        Some(p.clone_id.as_str())
    );
    service.shutdown();
}
