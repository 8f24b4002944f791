//! `keybroker keys` as an administrator runs it: keys made, imported, listed, revoked, and
//! every change in the broker's audit log.

use std::process::{Command, Output};

fn kb(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .arg("--dir")
        .arg(dir)
        .args(["--actor", "alice@security"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn key_administration_is_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = kb(
        d,
        &[
            "keys",
            "create",
            "--id",
            "acme/layers-2026",
            "--kind",
            "ec-p256",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8(out.stdout).unwrap();
    ocicrypt::keys::PublicKey::from_pem(public.as_bytes()).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keys/rsa-2048/priv.pem");
    let out = kb(
        d,
        &[
            "keys",
            "import",
            "--id",
            "fixtures/rsa",
            "--key",
            fixture.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same id twice, an unreadable key: errors, audited as failures.
    assert!(!kb(
        d,
        &[
            "keys",
            "create",
            "--id",
            "acme/layers-2026",
            "--kind",
            "ec-p256"
        ]
    )
    .status
    .success());
    assert!(
        !kb(d, &["keys", "import", "--id", "x", "--key", "/nonexistent"])
            .status
            .success()
    );
    assert!(kb(d, &["keys", "revoke", "--id", "fixtures/rsa"])
        .status
        .success());
    assert!(!kb(d, &["keys", "revoke", "--id", "nope"]).status.success());

    let out = kb(d, &["keys", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_string(),
                k["revoked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("acme/layers-2026".into(), false),
            ("fixtures/rsa".into(), true)
        ]
    );
    let out = kb(d, &["keys", "public", "--id", "acme/layers-2026"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), public);

    let store = audit::Store::open(&d.join("audit"), std::time::Duration::from_secs(10)).unwrap();
    let events = store
        .query(&audit::Query {
            limit: 100,
            ..audit::Query::default()
        })
        .unwrap()
        .events;
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e.kind,
                e.outcome.as_str(),
                e.key_ids.first().map_or("-", |k| k.as_str())
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "admin.key_create success acme/layers-2026",
            "admin.key_import success fixtures/rsa",
            "admin.key_create failure acme/layers-2026",
            "admin.key_revoke success fixtures/rsa",
            "admin.key_revoke failure nope",
        ]
    );
    assert!(events
        .iter()
        .all(|e| e.actor.subject.as_deref() == Some("alice@security")));
}
