//! `policy grant issue|verify|inspect` and `policy keygen --kind` through the built binary.

use std::path::Path;
use std::process::{Command, Output};

fn policy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A key made with `policy keygen --kind`, and a policy trusting it for tenant acme.
fn setup(dir: &Path, kind: &str) {
    let out = policy(&["keygen", "--kind", kind, "--out", s(&dir.join("k"))]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let public = std::fs::read_to_string(dir.join("k/pub.pem")).unwrap();
    std::fs::write(
        dir.join("d.toml"),
        format!(
            r#"schema = 1
image_trust_policy = "t.json"

[[tenant]]
name = "acme"

[[tenant.function]]
name = "*"
images = ["docker://registry.example/acme/*"]

[[grant_key]]
id = "control-plane"
public_key = """
{public}"""
tenants = ["acme"]
"#
        ),
    )
    .unwrap();
}

const IMAGE: &str = "docker://registry.example/acme/resize:1";

fn issue(dir: &Path) -> Output {
    policy(&[
        "grant",
        "issue",
        "--key",
        s(&dir.join("k/priv.pem")),
        "--tenant",
        "acme",
        "--function",
        "resize",
        "--image",
        IMAGE,
        "--ipu",
        "ipu-1",
        "--host",
        "worker-1.example",
        "--not-before",
        "2026-12-04T21:00:00Z",
        "--valid-for",
        "5m",
        "--out",
        s(&dir.join("grant.json")),
        "--json",
    ])
}

fn verify(dir: &Path, at: &str, extra: &[&str]) -> Output {
    let (d, g) = (dir.join("d.toml"), dir.join("grant.json"));
    let mut args = vec![
        "grant",
        "verify",
        "--policy",
        s(&d),
        "--ipu",
        "ipu-1",
        "--host",
        "worker-1.example",
        "--image",
        IMAGE,
        "--at",
        at,
    ];
    args.extend_from_slice(extra);
    args.push(s(&g));
    policy(&args)
}

#[test]
fn issue_then_verify_with_both_key_kinds() {
    for kind in ["ed25519", "ec-p256"] {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path(), kind);
        let out = issue(dir.path());
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["not_before"], "2026-12-04T21:00:00Z");
        assert_eq!(summary["not_after"], "2026-12-04T21:05:00Z");
        assert_eq!(summary["serial"].as_str().unwrap().len(), 32);
        assert!(summary["key_id"].as_str().unwrap().starts_with("sha256:"));
        let out = verify(dir.path(), "2026-12-04T21:01:00Z", &[]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(stdout(&out).starts_with("ok: grant "), "{}", stdout(&out));
        // Expired: refused, exit 3, with the reason.
        let out = verify(dir.path(), "2026-12-04T22:00:00Z", &["--json"]);
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["valid"], false);
        assert_eq!(v["reason_code"], "expired");
    }
}

#[test]
fn a_tampered_grant_is_refused_with_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "ed25519");
    assert_eq!(issue(dir.path()).status.code(), Some(0));
    let path = dir.path().join("grant.json");
    let mut env: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64.decode(env["payload"].as_str().unwrap()).unwrap();
    let payload = String::from_utf8(payload)
        .unwrap()
        .replace("ipu-1", "ipu-2");
    env["payload"] = b64.encode(payload).into();
    std::fs::write(&path, env.to_string()).unwrap();
    let out = verify(dir.path(), "2026-12-04T21:01:00Z", &[]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stdout(&out).starts_with("refused (bad-signature): "),
        "{}",
        stdout(&out)
    );
}

#[test]
fn inspect_decodes_without_trusting() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "ec-p256");
    assert_eq!(issue(dir.path()).status.code(), Some(0));
    let out = policy(&[
        "grant",
        "inspect",
        "--json",
        s(&dir.path().join("grant.json")),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verified"], false);
    assert_eq!(v["grant"]["tenant"], "acme");
    assert_eq!(v["grant"]["image"]["reference"], IMAGE);
    assert_eq!(v["signer_keyids"].as_array().unwrap().len(), 1);
    let out = policy(&["grant", "inspect", s(&dir.path().join("grant.json"))]);
    assert!(stdout(&out).starts_with("UNVERIFIED"), "{}", stdout(&out));
    // Not a grant at all: exit 3.
    let out = policy(&["grant", "inspect", s(&dir.path().join("d.toml"))]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

#[test]
fn unreadable_inputs_are_operational_errors() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), "ed25519");
    let out = verify(dir.path(), "2026-12-04T21:01:00Z", &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = policy(&[
        "grant",
        "issue",
        "--key",
        "/nonexistent",
        "--tenant",
        "acme",
        "--function",
        "f",
        "--image",
        IMAGE,
        "--ipu",
        "i",
        "--host",
        "h",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn verify_takes_the_grant_keys_from_a_signed_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d, "ed25519");
    std::fs::write(d.join("t.json"), r#"{"default": [{"type": "reject"}]}"#).unwrap();
    let out = policy(&["keygen", "--out", s(&d.join("team"))]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = policy(&[
        "sign",
        "--deployment",
        s(&d.join("d.toml")),
        "--version",
        "1",
        "--key",
        s(&d.join("team/priv.pem")),
        "-o",
        s(&d.join("p.bundle")),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(issue(d).status.code(), Some(0));
    let (bundle, team, grant) = (
        d.join("p.bundle"),
        d.join("team/pub.pem"),
        d.join("grant.json"),
    );
    let verify = |image: &str| {
        policy(&[
            "grant",
            "verify",
            "--bundle",
            s(&bundle),
            "--bundle-key",
            s(&team),
            "--ipu",
            "ipu-1",
            "--image",
            image,
            "--at",
            "2026-12-04T21:01:00Z",
            s(&grant),
        ])
    };
    let out = verify(IMAGE);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = verify("docker://registry.example/acme/other:1");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        stdout(&out).starts_with("refused (wrong-image): "),
        "{}",
        stdout(&out)
    );
    // A bundle key that did not sign the bundle: operational error.
    let out = policy(&[
        "grant",
        "verify",
        "--bundle",
        s(&bundle),
        "--bundle-key",
        s(&d.join("k/pub.pem")),
        "--ipu",
        "ipu-1",
        "--image",
        IMAGE,
        s(&grant),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
