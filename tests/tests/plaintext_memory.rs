//! The plaintext of a base being built lives only in the service's bounded tmpfs: an image
//! that does not fit is refused with `workspace-full` (audited, nothing left behind), and the
//! same image starts under a bound that fits it (the positive control).

use std::path::Path;
use std::sync::Arc;

use integration_tests::is_root;
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::service::{Service, ServiceOptions};
use ocicrypt::DecryptConfig;

/// An image (trusted as is) with a 3 MiB file of random bytes, which no compression shrinks.
fn image(d: &Path) -> String {
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let mut data = vec![0u8; 3 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data).unwrap();
    std::fs::write(rootfs.join("data"), &data).unwrap();
    integration_tests::plain_layout_image(d, &rootfs, "big", "/data")
}

fn start(d: &Path, plaintext_memory: u64) -> (Service, Arc<audit::AuditLog>) {
    integration_tests::local_service(
        d,
        "audit",
        integration_tests::ACCEPT_ANYTHING,
        KeySource::local(DecryptConfig::new(vec![])),
        ServiceOptions {
            plaintext_memory,
            ..integration_tests::broker::service_options(d.join("state"))
        },
        Box::new(|_, _| {}),
    )
}

#[test]
fn an_image_larger_than_the_plaintext_memory_is_refused_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: the plaintext tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = image(dir.path());

    let small = dir.path().join("small");
    let (service, audit) = start(&small, 2 << 20);
    let err = service.prepare("acme", "big", &image).unwrap_err();
    assert_eq!(err.class().as_str(), "workspace-full", "{err}");
    assert!(
        err.to_string()
            .contains("no space left for the image's plaintext"),
        "{err}"
    );
    let status = err.to_status();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // Audited, with its class.
    let recorded = audit
        .store()
        .query(&audit::Query {
            limit: 100,
            ..Default::default()
        })
        .unwrap()
        .events
        .into_iter()
        .filter(|e| {
            e.outcome == audit::Outcome::Failure
                && e.details.get("class").map(String::as_str) == Some("workspace-full")
        })
        .count();
    assert_eq!(recorded, 1);
    // Nothing half-built: no clone, no base, the tmpfs empty.
    assert!(service.list().is_empty());
    let left = |d: &Path| std::fs::read_dir(d).unwrap().count();
    assert_eq!(left(service.plaintext_memory()), 0);
    assert_eq!(left(&small.join("state/bases")), 0);
    service.shutdown();
    drop(service);

    // Positive control: a bound that fits it.
    let (service, _) = start(&dir.path().join("large"), 64 << 20);
    let p = service.prepare("acme", "big", &image).unwrap();
    assert_eq!(left(service.plaintext_memory()), 0, "plaintext kept");
    assert!(service.teardown(&p.clone_id, "done").unwrap());
    service.shutdown();
}
