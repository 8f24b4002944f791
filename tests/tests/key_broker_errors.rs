//! A key broker that is down or silent is an operational failure (exit code 1, gRPC
//! `Unavailable`: the platform may retry elsewhere); a broker's refusal is a decision about
//! the request (exit code 3, gRPC `PermissionDenied`: retrying changes nothing). Each with
//! its positive control against the same broker.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::fixtures;
use ipu_image_svc::error::{FailureClass, EXIT_OPERATIONAL, EXIT_REJECTED};
use ipu_image_svc::service::ServiceOptions;

fn image() -> String {
    format!("oci:{}:enc-signed", fixtures().join("oci-layout").display())
}

#[test]
fn prepare_is_unavailable_when_the_broker_stopped_and_denied_when_it_refuses() {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (swtpm, broker) = integration_tests::broker::start_with_tpm();
    let keys = Arc::new(broker.ipu_keys(&swtpm.tcti(), &d.join("tls")));
    let audit = integration_tests::audit_log(&d.join("audit"));
    let service = integration_tests::broker::ipu_service(
        ServiceOptions {
            max_cached_bases: 4,
            spool_memory: ipu_image_svc::service::spool::DEFAULT_SPOOL_MEMORY,
            hook_prefetch: ipu_image_svc::service::prefetch::DEFAULT_PREFETCH_LIMIT,
            ..integration_tests::broker::service_options(d.join("state"))
        },
        fixtures().join("policies/policy-A.json"),
        d.join("cache"),
        keys,
        audit,
    );

    // Positive control: the broker releases acme's key.
    let prepared = service.prepare("acme", "f-1", &image()).unwrap();
    service.teardown(&prepared.clone_id, "test").unwrap();

    // A denial: the policy gives globex no key.
    let denied = service.prepare("globex", "f-2", &image()).unwrap_err();
    assert_eq!(denied.class(), FailureClass::NoDecryptionKey, "{denied}");
    assert_eq!(denied.exit_code(), EXIT_REJECTED);
    assert_eq!(denied.to_status().code(), tonic::Code::PermissionDenied);

    // The broker stops: the same request that worked is now an operational failure.
    drop(broker);
    let down = service.prepare("acme", "f-3", &image()).unwrap_err();
    assert_eq!(down.class(), FailureClass::KeyBrokerUnavailable, "{down}");
    assert_eq!(down.exit_code(), EXIT_OPERATIONAL);
    assert_eq!(down.to_status().code(), tonic::Code::Unavailable);
    assert!(service.list().is_empty(), "no clone for a refused start");
    service.shutdown();
}

/// `ipu-image-svc image unpack` for `tenant` with the key broker at `url` (its default
/// timeouts).
fn unpack(d: &Path, url: &str, tcti: &str, tenant: &str) -> (i32, serde_json::Value) {
    integration_tests::broker::cli_unpack(
        d,
        &d.join("tls"),
        &[url],
        &["--broker-name", "localhost"],
        tcti,
        (tenant, "f"),
    )
}

#[test]
fn the_cli_exits_1_for_a_broker_down_or_silent_and_3_for_a_denial() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (swtpm, broker) = integration_tests::broker::start_with_tpm();
    // Writes the IPU's certificate, key and the CA to d/tls (and attests once).
    drop(broker.ipu_keys(&swtpm.tcti(), &d.join("tls")));

    // Positive control, and a denial, from the running broker.
    let (code, report) = unpack(d, &broker.url(), &swtpm.tcti(), "acme");
    assert_eq!(
        (code, &report["outcome"]),
        (0, &"accepted".into()),
        "{report}"
    );
    let (code, report) = unpack(d, &broker.url(), &swtpm.tcti(), "globex");
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["class"], "no-decryption-key");

    // Nobody listens.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, report) = unpack(
        d,
        &format!("https://127.0.0.1:{closed}"),
        &swtpm.tcti(),
        "acme",
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["class"], "key-broker-unavailable");

    // A broker that accepts the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut kept = Vec::new();
        while let Ok((s, _)) = silent.accept() {
            kept.push(s);
            if kept.len() >= 4 {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let t = Instant::now();
    let (code, report) = unpack(
        d,
        &format!("https://127.0.0.1:{port}"),
        &swtpm.tcti(),
        "acme",
    );
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["class"], "key-broker-unavailable");
    assert!(
        report["error"].as_str().unwrap().contains("did not answer"),
        "{report}"
    );
    assert!(t.elapsed() < Duration::from_secs(25), "{:?}", t.elapsed());
    drop(held);
}
