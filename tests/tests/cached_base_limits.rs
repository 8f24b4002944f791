//! A cached base does not carry one function's limits over to another: the base keeps what
//! its unpack found (bytes, entries, largest file, device nodes, setuid files) and every
//! Prepare holds it to that request's own limits, as its own unpack would have been held.
//!
//! Function `devices` may have device nodes and builds the base of an image holding one;
//! `strict` (no device nodes), `small-files` (a 32 KiB file limit) and `few-inodes` (at most
//! 3 entries; the image has 4) then ask for the same image and are refused, audited, with no clone made. The
//! positive control: `devices` starts again from the cached base.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use integration_tests::{is_root, run_ok};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::service::Service;
use ipu_image_svc::unpack::Limits;
use ocicrypt::DecryptConfig;

/// An unencrypted image (trusted as is: the limits are the point) with a character device
/// node, a setuid file and a 64 KiB file.
fn image_with_a_device_node(d: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(rootfs.join("dev")).unwrap();
    run_ok(
        Command::new("mknod")
            .arg(rootfs.join("dev/null"))
            .args(["c", "1", "3"]),
    );
    std::fs::write(rootfs.join("big"), vec![7u8; 64 << 10]).unwrap();
    let suid = rootfs.join("suid");
    std::fs::write(&suid, b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    integration_tests::plain_layout_image(d, &rootfs, "devices", "/suid")
}

/// Each function's limits, as the service's factory gives them.
fn limits_of(function: &str) -> Limits {
    let with_devices = Limits {
        allow_device_nodes: true,
        ..Limits::default()
    };
    match function {
        "devices" => with_devices,
        "small-files" => Limits {
            max_file_size: 32 << 10,
            ..with_devices
        },
        "few-inodes" => Limits {
            max_inodes: 3,
            ..with_devices
        },
        _ => Limits::default(),
    }
}

fn service(d: &Path) -> (Service, Arc<audit::AuditLog>) {
    integration_tests::local_service(
        d,
        "audit",
        integration_tests::ACCEPT_ANYTHING,
        KeySource::local(DecryptConfig::new(vec![])),
        integration_tests::broker::service_options(d.join("state")),
        Box::new(|function, cfg| cfg.limits = limits_of(function)),
    )
}

#[test]
fn a_cached_base_is_held_to_each_requests_own_limits() {
    if !is_root() {
        eprintln!("skipped: mknod and the plaintext tmpfs need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = image_with_a_device_node(dir.path());
    let (service, audit) = service(dir.path());

    // `devices` builds the base.
    let first = service.prepare("acme", "devices", &image).unwrap();

    for (function, class, says) in [
        ("strict", "unsafe-layer", "device node"),
        ("small-files", "too-large", "largest file"),
        ("few-inodes", "too-large", "entries"),
    ] {
        let err = service.prepare("acme", function, &image).unwrap_err();
        assert_eq!(err.class().as_str(), class, "{function}: {err}");
        assert!(err.to_string().contains(says), "{function}: {err}");
        assert!(err.to_string().contains("cached base"), "{function}: {err}");
        // Audited as this function's refusal.
        let refused = audit
            .store()
            .query(&audit::Query {
                kind: Some(audit::EventKind::LayerUnpack),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .events
            .into_iter()
            .filter(|e| {
                e.function.as_deref() == Some(function)
                    && e.outcome == audit::Outcome::Denied
                    && e.details.get("class").map(String::as_str) == Some(class)
            })
            .count();
        assert_eq!(refused, 1, "{function}: refusal not audited");
    }
    // Only the first function's clone exists.
    assert_eq!(service.list().len(), 1);

    // Positive control: the base is cached, and `devices` may use it again.
    let again = service.prepare("acme", "devices", &image).unwrap();
    assert_eq!(again.manifest_digest, first.manifest_digest);
    for p in [first, again] {
        assert!(service.teardown(&p.clone_id, "done").unwrap());
    }
    service.shutdown();
}
