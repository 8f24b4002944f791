//! The `audit` command as auditors run it: exit codes, the first bad index, offline proofs,
//! JSON lines.

use std::path::Path;
use std::process::{Command, Output};

fn audit(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_audit"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn verify_prove_export_and_a_tamper_found_by_index() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let verifier = ok(&audit(
        &["keygen", "--name", "cli.test/log", "--out", "keys"],
        d,
    ));
    assert!(verifier.starts_with("cli.test/log+"));
    for i in 0..5 {
        let reason = format!("event {i}");
        let seq = ok(&audit(
            &[
                "append",
                "--log",
                "log",
                "--signer",
                "keys/signer.key",
                "--origin",
                "cli.test/log",
                "--service",
                "cli",
                "--kind",
                "key.release",
                "--outcome",
                "allowed",
                "--reason",
                &reason,
                "--tenant",
                "acme",
                "--key-id",
                "broker/k1",
            ],
            d,
        ));
        assert_eq!(seq.trim(), i.to_string());
    }
    let out = ok(&audit(
        &["verify", "--log", "log", "--key", "keys/verifier.pub"],
        d,
    ));
    assert!(out.starts_with("ok: 5 events"), "{out}");

    ok(&audit(&["checkpoint", "--log", "log"], d));
    ok(&audit(
        &["prove", "--log", "log", "--index", "3", "-o", "proof.json"],
        d,
    ));
    let out = ok(&audit(
        &[
            "verify-proof",
            "--proof",
            "proof.json",
            "--key",
            "keys/verifier.pub",
        ],
        d,
    ));
    assert!(out.starts_with("ok: event 3 (key.release allowed"), "{out}");
    let proof = std::fs::read_to_string(d.join("proof.json")).unwrap();
    let mut bundle: serde_json::Value = serde_json::from_str(&proof).unwrap();
    bundle["index"] = 2.into();
    std::fs::write(d.join("forged.json"), bundle.to_string()).unwrap();
    let out = audit(
        &[
            "verify-proof",
            "--proof",
            "forged.json",
            "--key",
            "keys/verifier.pub",
        ],
        d,
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAILED"));

    let lines = ok(&audit(&["export", "--log", "log", "--jsonl"], d));
    assert_eq!(lines.lines().count(), 5);
    for l in lines.lines() {
        let e: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(e["key_ids"][0], "broker/k1");
    }
    let json = ok(&audit(
        &[
            "query", "--log", "log", "--json", "--tenant", "acme", "--limit", "2",
        ],
        d,
    ));
    assert_eq!(json.lines().count(), 2);
    let table = ok(&audit(&["tail", "--log", "log", "-n", "2"], d));
    assert!(
        table.contains("event 3") && table.contains("event 4"),
        "{table}"
    );

    // One byte of event 2 changed on disk: exit 3 naming index 2.
    {
        let db = sled::open(d.join("log/db")).unwrap();
        let events = db.open_tree("events").unwrap();
        let v = events.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let pos = v.windows(7).position(|w| w == b"event 2").unwrap();
        let mut v = v;
        v[pos + 6] = b'9';
        events.insert(2u64.to_be_bytes(), v).unwrap();
        db.flush().unwrap();
    }
    let out = audit(&["verify", "--log", "log", "--key", "keys/verifier.pub"], d);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("FAILED at index 2: event 2: changed"),
        "{text}"
    );

    // Bad input is an operational error (1) or usage error (2), never "verified".
    assert_eq!(
        audit(
            &["verify", "--log", "nolog", "--key", "keys/verifier.pub"],
            d
        )
        .status
        .code(),
        Some(1)
    );
    assert_eq!(
        audit(&["query", "--log", "log", "--kind", "key.leak"], d)
            .status
            .code(),
        Some(2)
    );
}
