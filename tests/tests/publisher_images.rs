//! The publisher's images: reproducible, readable by a third-party tool (umoci), and
//! refused inputs get clear errors.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use integration_tests::fixtures;
use ocicrypt::keys::PublicKey;
use ocicrypt::EncryptConfig;
use publisher::build::{build, BuildOptions, LayerCompression};
use publisher::layout::Layout;

fn rootfs(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("bin/tool"), b"tool").unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::hard_link(root.join("bin/tool"), root.join("bin/tool-link")).unwrap();
    std::os::unix::fs::symlink("tool", root.join("bin/alias")).unwrap();
    root
}

fn build_into(
    layout: &Path,
    root: &Path,
    tag: &str,
    compression: LayerCompression,
) -> publisher::build::Built {
    build(
        &Layout::open_or_create(layout).unwrap(),
        &BuildOptions {
            rootfs: root,
            tag,
            cmd: vec!["/bin/tool".into()],
            env: vec![],
            compression,
        },
    )
    .unwrap()
}

#[test]
fn builds_are_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    for compression in [
        LayerCompression::Gzip,
        LayerCompression::Zstd,
        LayerCompression::None,
    ] {
        let a = build_into(&dir.path().join("a"), &root, "t", compression);
        let b = build_into(&dir.path().join("b"), &root, "t", compression);
        assert_eq!(a.manifest.digest, b.manifest.digest, "{compression:?}");
        assert_eq!(a.diff_id, b.diff_id);
        assert_eq!(a.entries, 4);
    }
}

#[test]
fn umoci_unpacks_our_image_with_links_and_setuid() {
    if !integration_tests::is_root() {
        eprintln!("skipped: umoci unpack without --rootless needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let layout = dir.path().join("layout");
    build_into(&layout, &root, "plain", LayerCompression::Gzip);
    let bundle = dir.path().join("bundle");
    let out = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:plain", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci not installed: run scripts/setup.sh");
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = bundle.join("rootfs");
    let tool = std::fs::metadata(r.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!(
        tool.ino(),
        std::fs::metadata(r.join("bin/tool-link")).unwrap().ino()
    );
    assert_eq!(
        std::fs::read_link(r.join("bin/alias")).unwrap(),
        Path::new("tool")
    );
    // umoci read our config: the command is in the runtime bundle's config.
    let config = std::fs::read_to_string(bundle.join("config.json")).unwrap();
    assert!(config.contains("/bin/tool"));
}

#[test]
fn bad_publisher_inputs_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let layout_dir = dir.path().join("layout");
    build_into(&layout_dir, &root, "plain", LayerCompression::Gzip);
    let layout = Layout::open(&layout_dir).unwrap();
    let rsa =
        PublicKey::from_pem(&std::fs::read(fixtures().join("keys/rsa-2048/pub.pem")).unwrap())
            .unwrap();
    let recipients = EncryptConfig::new(vec![rsa]);

    let e = publisher::encrypt::encrypt(&layout, "plain", "x", &recipients, &[3]).unwrap_err();
    assert!(e.to_string().contains("there is no layer 3"), "{e}");
    let e = publisher::encrypt::encrypt(&layout, "nope", "x", &recipients, &[]).unwrap_err();
    assert!(e.to_string().contains("no tag \"nope\""), "{e}");
    publisher::encrypt::encrypt(&layout, "plain", "enc", &recipients, &[]).unwrap();
    let e = publisher::encrypt::encrypt(&layout, "enc", "enc2", &recipients, &[]).unwrap_err();
    assert!(e.to_string().contains("already encrypted"), "{e}");

    // An RSA key cannot make cosign ECDSA signatures.
    let rsa_private = std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap();
    let e = publisher::sign::sign(&layout, "plain", &rsa_private, "x.example/a").unwrap_err();
    assert!(e.to_string().contains("ECDSA P-256"), "{e}");
    // The cosign-encrypted key format is refused by name.
    let cosign_key = std::fs::read(fixtures().join("keys/A/cosign.key")).unwrap();
    let e = publisher::sign::sign(&layout, "plain", &cosign_key, "x.example/a").unwrap_err();
    assert!(e.to_string().contains("PKCS#8"), "{e}");

    assert!(Layout::open(dir.path()).is_err());
    // A failed signing left no signature tag behind.
    let (desc, _) = layout.manifest("plain").unwrap();
    let sig_tag = publisher::sign::signature_tag(&desc.digest).unwrap();
    assert!(layout.tagged(&sig_tag).unwrap().is_none());
}
