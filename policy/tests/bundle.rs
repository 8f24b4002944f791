//! Signed, versioned policy bundles: refused when unsigned, signed by an unknown key,
//! changed after signing, older than the running version, or carrying invalid documents.

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use policy::deploy::bundle::{self, BundleContent, BundleError};
use policy::sigstore::VerificationKey;

const DEPLOYMENT: &str = r#"
schema = 1
image_trust_policy = "image-trust.json"

[[tenant]]
name = "acme"

[[tenant.function]]
name = "*"
images = ["docker://registry.example/acme/*"]
"#;

const IMAGE_TRUST: &str = r#"{"default": [{"type": "reject"}]}"#;

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

fn content(version: u64) -> BundleContent {
    BundleContent {
        version,
        deployment: DEPLOYMENT.into(),
        image_trust: IMAGE_TRUST.into(),
    }
}

/// An ECDSA P-256 key pair (the fixture's PKCS#8 key) and an Ed25519 one made here.
fn keys() -> Vec<(Vec<u8>, Vec<VerificationKey>)> {
    let ec_priv = std::fs::read(fixtures().join("keys/ec-p256/priv.pem")).unwrap();
    let ec_pub =
        VerificationKey::from_pem(&std::fs::read(fixtures().join("keys/ec-p256/pub.pem")).unwrap())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_policy"))
        .args(["keygen", "--out"])
        .arg(dir.path().join("k"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let ed_priv = std::fs::read(dir.path().join("k/priv.pem")).unwrap();
    let ed_pub =
        VerificationKey::from_pem(&std::fs::read(dir.path().join("k/pub.pem")).unwrap()).unwrap();
    vec![(ec_priv, ec_pub), (ed_priv, ed_pub)]
}

#[test]
fn sign_and_verify_with_ed25519_and_p256() {
    for (private, public) in keys() {
        let signed = bundle::sign(&content(7), &private).unwrap();
        let b = bundle::verify(signed.as_bytes(), &public, None).unwrap();
        assert_eq!(b.content, content(7));
        assert_eq!(b.signer, public[0].fingerprint());
        assert_eq!(b.deployment.tenants.len(), 1);
    }
}

#[test]
fn every_bad_bundle_is_refused_with_its_reason() {
    let all = keys();
    let (private, public) = &all[0];
    let (_, other_public) = &all[1];
    let signed = bundle::sign(&content(5), private).unwrap();
    let mut env: serde_json::Value = serde_json::from_str(&signed).unwrap();

    // Changed after signing: a payload with a higher version, same signature.
    let mut changed = env.clone();
    let payload = serde_json::to_vec(&content(6)).unwrap();
    changed["payload"] = base64::engine::general_purpose::STANDARD
        .encode(payload)
        .into();
    let err = bundle::verify(changed.to_string().as_bytes(), public, None).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature(_)), "{err}");

    // Signed by a key nobody trusts.
    let err = bundle::verify(signed.as_bytes(), other_public, None).unwrap_err();
    assert!(matches!(err, BundleError::UnknownSigner(_)), "{err}");

    // Not signed at all.
    let mut unsigned = env.clone();
    unsigned["signatures"] = serde_json::json!([]);
    let err = bundle::verify(unsigned.to_string().as_bytes(), public, None).unwrap_err();
    assert_eq!(err, BundleError::Unsigned);

    // Another payload type (a signature over another kind of document).
    env["payloadType"] = "application/vnd.in-toto+json".into();
    let err = bundle::verify(env.to_string().as_bytes(), public, None).unwrap_err();
    assert!(matches!(err, BundleError::Malformed(_)), "{err}");

    // Rollback, and the same version with other content.
    let running = content(5);
    let older = bundle::sign(&content(4), private).unwrap();
    let err = bundle::verify(older.as_bytes(), public, Some((5, &running))).unwrap_err();
    assert_eq!(
        err,
        BundleError::Rollback {
            offered: 4,
            running: 5
        }
    );
    let mut same_version = content(5);
    same_version
        .deployment
        .push_str("\n# a comment changes the content\n");
    let same = bundle::sign(&same_version, private).unwrap();
    let err = bundle::verify(same.as_bytes(), public, Some((5, &running))).unwrap_err();
    assert_eq!(err, BundleError::SameVersionDifferentContent(5));
    // Re-delivery of the running bundle and a newer one are fine.
    bundle::verify(signed.as_bytes(), public, Some((5, &running))).unwrap();
    let newer = bundle::sign(&content(6), private).unwrap();
    bundle::verify(newer.as_bytes(), public, Some((5, &running))).unwrap();

    // Validly signed, but the documents inside are invalid.
    let mut bad = content(9);
    bad.deployment = bad.deployment.replace("images", "imagez");
    let err = bundle::verify(
        bundle::sign(&bad, private).unwrap().as_bytes(),
        public,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, BundleError::Deployment(ref m) if m.contains("missing field `images`")),
        "{err}"
    );
    let mut bad = content(9);
    bad.image_trust = r#"{"default": [{"type": "acceptEverything"}]}"#.into();
    let err = bundle::verify(
        bundle::sign(&bad, private).unwrap().as_bytes(),
        public,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::ImageTrust(_)), "{err}");

    // Not JSON, and too large.
    assert!(matches!(
        bundle::verify(b"not json", public, None),
        Err(BundleError::Malformed(_))
    ));
    let huge = vec![b' '; bundle::MAX_BUNDLE_BYTES + 1];
    assert!(matches!(
        bundle::verify(&huge, public, None),
        Err(BundleError::Malformed(_))
    ));
}

#[test]
fn cli_sign_verify_explain_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("deployment.toml"), DEPLOYMENT).unwrap();
    std::fs::write(d.join("image-trust.json"), IMAGE_TRUST).unwrap();
    let policy = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_policy"))
            .args(args)
            .current_dir(d)
            .output()
            .unwrap()
    };
    assert!(policy(&["keygen", "--out", "team"]).status.success());
    for (v, name) in [("3", "v3.bundle"), ("4", "v4.bundle")] {
        let out = policy(&[
            "sign",
            "--deployment",
            "deployment.toml",
            "--version",
            v,
            "--key",
            "team/priv.pem",
            "-o",
            name,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = policy(&[
        "verify",
        "v4.bundle",
        "--key",
        "team/pub.pem",
        "--running",
        "v3.bundle",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = policy(&[
        "verify",
        "v3.bundle",
        "--key",
        "team/pub.pem",
        "--running",
        "v4.bundle",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rollback refused"));

    let out = policy(&[
        "explain",
        "--bundle",
        "v4.bundle",
        "--key",
        "team/pub.pem",
        "--tenant",
        "acme",
        "--function",
        "f",
        "--image",
        "docker://registry.example/acme/app:1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"]["allowed"], true);
    assert_eq!(v["decision"]["requirements"]["require_signature"], true);
    let out = policy(&[
        "explain",
        "--policy",
        "deployment.toml",
        "--tenant",
        "acme",
        "--function",
        "f",
        "--image",
        "docker://registry.example/globex/app:1",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("decision:    denied"), "{text}");
    assert!(text.contains("not in the scopes allowed"), "{text}");

    // lint: ok, then an unreachable rule.
    assert_eq!(policy(&["lint", "deployment.toml"]).status.code(), Some(0));
    std::fs::write(
        d.join("shadowed.toml"),
        format!(
            "{DEPLOYMENT}\n[[tenant.function]]\nname = \"resize\"\nimages = [\"docker://r/x\"]\n"
        ),
    )
    .unwrap();
    let out = policy(&["lint", "shadowed.toml"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with("shadowed.toml:13:8: function rule \"resize\""));
}
