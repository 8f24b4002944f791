//! The function lifecycle on fixture images. A function runs from every accepted fixture of `tests/fixtures/EXPECTED.md`, served by the
//! fixture registry: Prepare on the service (policy-A, the rsa-2048 key), attach (a FUSE file +
//! loop device), mount, a hardened OCI bundle from the image's own config (its `Cmd` is
//! `/hello`), `runc run`; it prints `hello from <tag>`. Then teardown. Every rejected fixture
//! gets no clone at all, with its reason class. At the end no clone is left, and each of the
//! four creations has its erase on the record. Thirty starts back to back each detach cleanly.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use host_attach::attach::Attachment;
use integration_tests::{expected, fixtures, is_root, Registry};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::PipelineConfig;
use ipu_image_svc::service::{PipelineFactory, Service, ServiceOptions, TcpExports};
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::Policy;

/// The service in process (policy-A, the rsa-2048 key) under `d`, its options as `configure`
/// leaves them.
fn service(
    d: &Path,
    configure: impl FnOnce(&mut ServiceOptions),
) -> (Service, Arc<audit::AuditLog>) {
    let audit = integration_tests::audit_log(&d.join("audit"));
    let sink: Arc<dyn audit::AuditSink> = audit.clone();
    let cache = d.join("cache");
    let factory: PipelineFactory = Box::new(move |tenant, function| {
        let mut cfg = PipelineConfig::new(
            Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap(),
            cache.clone(),
        );
        cfg.audit = Some(sink.clone());
        cfg.tenant = Some(tenant.into());
        cfg.function = Some(function.into());
        cfg.source.insecure_http_hosts = vec!["127.0.0.1".into()];
        Ok(cfg)
    });
    let mut options = ServiceOptions {
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
    configure(&mut options);
    let keys = KeySource::local(DecryptConfig::new(vec![PrivateKey::from_pem(
        &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
    )
    .unwrap()]));
    let service = Service::start(options, factory, keys, audit.clone()).unwrap();
    (service, audit)
}

/// Start after start, each attached, mounted, detached and torn down at once (as the
/// warm-start bench does): every detach succeeds. The FUSE file's server once took the
/// kernel's ECONNABORTED after the unmount for an error, and a detach failed within a few
/// rounds.
#[test]
fn back_to_back_starts_each_detach_cleanly() {
    if !is_root() {
        eprintln!("skipped: mounting needs root");
        return;
    }
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (service, _audit) = service(dir.path(), |_| {});
    let image = registry.reference("fixtures/hello", "enc-signed");
    for i in 0..30 {
        let p = service.prepare("acme", &format!("fn{i}"), &image).unwrap();
        let work = dir.path().join(format!("host{i}"));
        let rootfs = work.join("rootfs");
        let mut attachment =
            Attachment::attach(&integration_tests::host_export(&p), &work, &rootfs).unwrap();
        assert!(
            rootfs.join("hello").exists(),
            "start {i}: the image is mounted"
        );
        attachment
            .detach()
            .unwrap_or_else(|e| panic!("start {i}: detach: {e}"));
        assert!(service.teardown(&p.clone_id, "test").unwrap());
    }
    service.shutdown();
}

#[test]
fn a_function_runs_from_each_accepted_fixture_and_rejected_ones_get_no_clone() {
    if !is_root() {
        eprintln!("skipped: mounting and runc need root");
        return;
    }
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (service, audit) = service(dir.path(), |_| {});
    let mut ran = Vec::new();
    for e in expected() {
        let image = registry.reference("fixtures/hello", &e.tag);
        let function = format!("fn-{}", e.tag);
        let prepared = service.prepare("acme", &function, &image);
        if !e.accept {
            let err = prepared.expect_err(&e.tag);
            assert_eq!(err.class().as_str(), e.reason_class, "{}: {}", e.tag, err);
            assert!(service.list().is_empty(), "{}: a clone was made", e.tag);
            continue;
        }
        let p = prepared.unwrap_or_else(|err| panic!("{}: {}", e.tag, err));
        assert_eq!(p.manifest_digest, e.digest, "{}", e.tag);
        let work = dir.path().join("host").join(&e.tag);
        let rootfs = work.join("rootfs");
        let mut attachment =
            Attachment::attach(&integration_tests::host_export(&p), &work, &rootfs).unwrap();
        let output = integration_tests::run_function(
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
    let (service, audit) = service(dir.path(), |o| o.clone_ttl = Duration::from_millis(1500));
    let mut events = service.subscribe();
    let image = registry.reference("fixtures/hello", "enc-signed");
    let p = service.prepare("acme", "short", &image).unwrap();
    assert_eq!(p.ttl, Duration::from_millis(1500));
    let uri = p.endpoint.nbd_uri(&p.export_name);
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
    assert!(!p.endpoint.unix_socket().unwrap().exists());
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

/// Exports over TCP: NBD with STARTTLS forced, a client certificate from the host agents' CA
/// required, and it must carry the host identity named at Prepare. Prepare without one is a
/// bad request. The host agent (qemu-storage-daemon's NBD client) attaches with its certificates and
/// the function runs; a client without TLS, without a certificate, or with one from another
/// CA gets nothing; a second host's valid certificate (same CA) is refused and the refusal is
/// on the audit record with what it presented; after teardown the port is closed.
#[test]
fn tcp_exports_need_tls_and_a_host_agent_certificate() {
    use integration_tests::broker::Pki;
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // One platform CA issues the IPU's export certificate and the host agents' certificates.
    let pki = Pki::new();
    let write_pair = |dir: &Path, cert: &str, key: &str, (c, k): (String, String)| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(cert), c).unwrap();
        std::fs::write(dir.join(key), k).unwrap();
    };
    write_pair(
        &d.join("ipu"),
        "export.pem",
        "export.key",
        pki.issue("ipu-1 export", None, true),
    );
    std::fs::write(d.join("ipu/host-ca.pem"), pki.ca_pem()).unwrap();
    // The host agent's libnbd directory: the IPU's CA and its own client certificate, which
    // carries its identity as a DNS name.
    let host_tls = d.join("host-tls");
    write_pair(
        &host_tls,
        "client-cert.pem",
        "client-key.pem",
        pki.issue_host("host-agent", "host-1.ipu.test"),
    );
    std::fs::write(host_tls.join("ca-cert.pem"), pki.ca_pem()).unwrap();
    // host-attach reads the same identity from it.
    assert_eq!(
        host_attach::run::host_identity(&host_tls.join("client-cert.pem")).unwrap(),
        "host-1.ipu.test"
    );
    // A certificate without such a name gives none (host-attach then asks for
    // --host-identity).
    write_pair(
        &d.join("no-san"),
        "client-cert.pem",
        "client-key.pem",
        pki.issue("host-agent", Some("host"), false),
    );
    let e = host_attach::run::host_identity(&d.join("no-san/client-cert.pem")).unwrap_err();
    assert!(
        e.to_string().contains("no subjectAltName DNS name or URI"),
        "{e}"
    );
    // Another host of the same CA.
    let other_tls = d.join("other-host-tls");
    write_pair(
        &other_tls,
        "client-cert.pem",
        "client-key.pem",
        pki.issue_host("host-agent", "host-2.ipu.test"),
    );
    std::fs::write(other_tls.join("ca-cert.pem"), pki.ca_pem()).unwrap();
    // Another CA's client certificate.
    let stranger_tls = d.join("stranger-tls");
    write_pair(
        &stranger_tls,
        "client-cert.pem",
        "client-key.pem",
        Pki::new().issue_host("stranger", "host-1.ipu.test"),
    );
    std::fs::write(stranger_tls.join("ca-cert.pem"), pki.ca_pem()).unwrap();

    let tls = ipu_image_svc::export::tls::server_config(
        &d.join("ipu/export.pem"),
        &d.join("ipu/export.key"),
        &d.join("ipu/host-ca.pem"),
    )
    .unwrap();
    let (service, audit) = service(d, |o| {
        o.tcp_exports = Some(TcpExports {
            ip: "127.0.0.1".parse().unwrap(),
            tls,
        })
    });
    let image = registry.reference("fixtures/hello", "enc-signed");
    for missing in [None, Some("")] {
        let e = service
            .prepare_for("acme", "remote", &image, missing)
            .unwrap_err();
        assert!(e.to_string().contains("host identity"), "{missing:?}: {e}");
    }
    assert!(service.list().is_empty());
    let p = service
        .prepare_for("acme", "remote", &image, Some("host-1.ipu.test"))
        .unwrap();
    let nbds = p.endpoint.nbd_uri(&p.export_name);
    assert!(nbds.starts_with("nbds://127.0.0.1:"), "{nbds}");
    let nbdinfo = |uri: &str| {
        Command::new("nbdinfo")
            .args(["--size", uri])
            .output()
            .unwrap()
    };
    let ok = nbdinfo(&format!("{nbds}?tls-certificates={}", host_tls.display()));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        p.size.to_string()
    );
    let plain = nbdinfo(&nbds.replace("nbds://", "nbd://"));
    assert!(!plain.status.success(), "a client without TLS is refused");
    let stranger = nbdinfo(&format!(
        "{nbds}?tls-certificates={}",
        stranger_tls.display()
    ));
    assert!(
        !stranger.status.success(),
        "another CA's certificate is refused"
    );
    let anonymous = d.join("anonymous-tls");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::write(anonymous.join("ca-cert.pem"), pki.ca_pem()).unwrap();
    let anonymous = nbdinfo(&format!("{nbds}?tls-certificates={}", anonymous.display()));
    assert!(
        !anonymous.status.success(),
        "a client without a certificate is refused"
    );
    // The second host: its certificate is valid, but not for this export.
    let denied = |audit: &audit::AuditLog| {
        audit
            .store()
            .query(&audit::Query {
                kind: Some(audit::EventKind::ExportAttach),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .events
            .into_iter()
            .filter(|e| e.outcome == audit::Outcome::Denied)
            .collect::<Vec<_>>()
    };
    assert!(denied(&audit).is_empty());
    let other = nbdinfo(&format!("{nbds}?tls-certificates={}", other_tls.display()));
    assert!(
        !other.status.success(),
        "a second host's valid certificate is refused"
    );
    // Recorded by the export's worker as it closes the connection: wait for it a little.
    let mut refused = denied(&audit);
    for _ in 0..100 {
        if !refused.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        refused = denied(&audit);
    }
    assert_eq!(refused.len(), 1, "{refused:?}");
    let detail = |k: &str| refused[0].details.get(k).map(String::as_str);
    assert_eq!(detail("clone_id"), Some(p.clone_id.as_str()));
    assert_eq!(detail("host_identity"), Some("host-1.ipu.test"));
    assert_eq!(detail("presented"), Some("host-2.ipu.test"));
    assert_eq!(detail("refusals"), Some("1"));
    // And the right host still gets in.
    let ok = nbdinfo(&format!("{nbds}?tls-certificates={}", host_tls.display()));
    assert!(ok.status.success());

    if is_root() {
        let work = d.join("host");
        let rootfs = work.join("rootfs");
        let address = match &p.endpoint {
            ipu_image_svc::export::Endpoint::Tcp(a) => *a,
            other => panic!("{other:?}"),
        };
        let export = host_attach::attach::Export::Tls {
            host: address.ip().to_string(),
            port: address.port(),
            name: p.export_name.clone(),
            certificates: host_tls.clone(),
        };
        let mut attachment = Attachment::attach(&export, &work, &rootfs).unwrap();
        let out = integration_tests::run_function(
            &rootfs,
            &work,
            p.runtime_config.as_ref().unwrap(),
            "remote",
        );
        attachment.detach().unwrap();
        assert_eq!(out, "hello from enc-signed\n");
    }
    assert!(service.teardown(&p.clone_id, "done").unwrap());
    let gone = nbdinfo(&format!("{nbds}?tls-certificates={}", host_tls.display()));
    assert!(!gone.status.success(), "the port is closed after teardown");
    service.shutdown();
}

/// The base cache is bounded: the least recently used base no function uses is deleted when a
/// new one is built over the bound; one a running function uses stays.
#[test]
fn idle_bases_are_evicted_and_bases_in_use_stay() {
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (service, _audit) = service(d, |o| o.max_cached_bases = 1);
    let bases = || {
        std::fs::read_dir(d.join("state/bases"))
            .unwrap()
            .flatten()
            .count()
    };
    let image = |tag: &str| registry.reference("fixtures/hello", tag);
    let a = service
        .prepare("acme", "a", &image("signed-cosign"))
        .unwrap();
    service.teardown(&a.clone_id, "done").unwrap();
    assert_eq!(bases(), 1);
    // A second image: the first base is idle, so it goes.
    let b = service.prepare("acme", "b", &image("enc-signed")).unwrap();
    assert_eq!(bases(), 1);
    // A third while b's function runs: b's base stays, over the bound.
    let c = service.prepare("acme", "c", &image("zstd")).unwrap();
    assert_eq!(bases(), 2);
    // b's base is still served from the cache (no rebuild), and reads right.
    let b2 = service.prepare("acme", "b2", &image("enc-signed")).unwrap();
    assert_eq!(bases(), 2);
    for p in [&b, &c, &b2] {
        service.teardown(&p.clone_id, "done").unwrap();
    }
    // The next build brings the cache back to its bound.
    let a2 = service
        .prepare("acme", "a2", &image("signed-cosign"))
        .unwrap();
    assert_eq!(bases(), 1);
    service.teardown(&a2.clone_id, "done").unwrap();
    service.shutdown();
}

/// A host sending ever new image strings does not grow the service's per-image build locks:
/// each start's lock is forgotten when the last start of that image ends, failed or not.
#[test]
fn build_locks_do_not_pile_up_with_the_image_strings_a_host_sends() {
    let dir = tempfile::tempdir().unwrap();
    let (service, _audit) = service(dir.path(), |_| {});
    for i in 0..500 {
        let image = format!("oci:{}/nothing-{i}:t", dir.path().display());
        assert!(service.prepare("acme", "f", &image).is_err());
    }
    assert_eq!(service.images_being_started(), 0);
    service.shutdown();
}

/// A clone exported as a vhost-user-blk device (`--export vhost-user-blk`, or per Prepare):
/// its socket speaks vhost-user to the host agent's uid (features with MQ and FLUSH), the
/// connection is on the record, a TCP-exporting service refuses the kind, and teardown
/// removes the socket with the hot-remove on the record. The device's I/O is tested with a
/// real front-end in `ipu-image-svc/tests/vhost_user_blk.rs`.
#[test]
fn a_clone_is_served_as_a_vhost_user_blk_device_and_hot_removed_at_teardown() {
    use ipu_image_svc::export::{Endpoint, ExportKind};
    use std::io::{Read, Write};
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (service, audit) = service(dir.path(), |o| {
        o.exports.default_kind = ExportKind::VhostUserBlk;
    });
    let image = registry.reference("fixtures/hello", "enc-signed");
    let p = service.prepare("acme", "vm", &image).unwrap();
    let Endpoint::VhostUser(socket) = &p.endpoint else {
        panic!("{:?}", p.endpoint)
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // VHOST_USER_GET_FEATURES, version 1; the reply: header and a u64.
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert!(
        features & (1 << 12) != 0 && features & (1 << 9) != 0,
        "MQ and FLUSH: {features:#x}"
    );
    // NBD still, when the Prepare asks for it.
    let placement = service.placement("acme", "nbd", &image, None, "").unwrap();
    let n = service
        .prepare_exported(&placement, &image, None, Some(ExportKind::Nbd))
        .unwrap();
    assert!(matches!(n.endpoint, Endpoint::Unix(_)));
    assert!(service.teardown(&n.clone_id, "done").unwrap());
    assert!(service.teardown(&p.clone_id, "function exited").unwrap());
    assert!(!socket.exists(), "the socket is removed");
    let mut end = [0u8; 1];
    assert!(
        matches!(s.read(&mut end), Ok(0) | Err(_)),
        "the connection is shut"
    );
    let details = |kind: audit::EventKind| {
        audit
            .store()
            .query(&audit::Query {
                kind: Some(kind),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .events
            .into_iter()
            .map(|e| serde_json::to_string(&e).unwrap())
            .collect::<Vec<_>>()
    };
    let attached = details(audit::EventKind::ExportAttach);
    assert!(
        attached.iter().any(|e| e.contains("vhost-user-blk")),
        "{attached:?}"
    );
    assert!(
        attached.iter().any(|e| e.contains("peer_uid")),
        "{attached:?}"
    );
    assert_eq!(details(audit::EventKind::ExportHotRemove).len(), 2);

    // A VM manager hot-removes the device before Teardown (device_del, then the chardev
    // closed): the IPU sees the front-end release it, on WatchEvents and on the record,
    // before the erase.
    let mut events = service.subscribe();
    let q = service.prepare("acme", "vm-2", &image).unwrap();
    let Endpoint::VhostUser(socket) = &q.endpoint else {
        panic!("{:?}", q.endpoint)
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    s.read_exact(&mut reply).unwrap();
    drop(s);
    let mut seen = Vec::new();
    let start = std::time::Instant::now();
    while !seen.iter().any(|k: &String| k == "hot_remove") {
        match events.try_recv() {
            Ok(e) if e.clone_id == q.clone_id => seen.push(e.kind.to_string()),
            Ok(_) => {}
            Err(_) => {
                assert!(start.elapsed() < Duration::from_secs(10), "{seen:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert_eq!(
        seen,
        ["attach", "attach", "hot_remove"],
        "prepared, connected, released"
    );
    assert!(service.teardown(&q.clone_id, "function exited").unwrap());
    // Its trail in order: the front-end attached, released the device, then Teardown's
    // revoke and the erase.
    let trail: Vec<(String, String)> = audit
        .store()
        .query(&audit::Query {
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .events
        .into_iter()
        .filter(|e| e.details.get("clone_id") == Some(&q.clone_id))
        .map(|e| (e.kind.as_str().to_string(), e.reason))
        .collect();
    let kinds: Vec<&str> = trail.iter().map(|(k, _)| k.as_str()).collect();
    let pos = |kind: &str, from: usize| {
        kinds[from..]
            .iter()
            .position(|k| *k == kind)
            .map(|p| p + from)
            .unwrap_or_else(|| panic!("no {kind} after {from}: {trail:?}"))
    };
    let connected = pos("export.attach", 0);
    let released = pos("export.hot_remove", connected);
    assert!(
        trail[released].1.contains("released the device"),
        "{trail:?}"
    );
    pos("clone.erase", released);
    service.shutdown();
}
