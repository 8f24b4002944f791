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

/// Appends one event to the log in `dir/log` (origin `origin`, key in `dir/keys`).
fn append_to(d: &Path, log: &str, origin: &str, kind: &str, reason: &str) {
    ok(&audit(
        &[
            "append",
            "--log",
            log,
            "--signer",
            &format!("{log}-keys/signer.key"),
            "--origin",
            origin,
            "--service",
            "keybroker",
            "--kind",
            kind,
            "--outcome",
            "allowed",
            "--reason",
            reason,
        ],
        d,
    ));
}

#[test]
fn several_logs_merge_into_one_verified_query_in_time_order_labelled_by_origin() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (log, origin) in [("a", "keybroker/a"), ("b", "keybroker/b")] {
        ok(&audit(
            &["keygen", "--name", origin, "--out", &format!("{log}-keys")],
            d,
        ));
    }
    // Interleaved: a0 b0 a1 b1 a2 b2, and one other kind in each.
    for i in 0..3 {
        append_to(d, "a", "keybroker/a", "key.release", &format!("a{i}"));
        append_to(d, "b", "keybroker/b", "key.release", &format!("b{i}"));
    }
    append_to(d, "a", "keybroker/a", "key.deny", "a-deny");
    append_to(d, "b", "keybroker/b", "attestation.verify", "b-attest");
    let merged = |extra: &[&str]| {
        let mut args = vec![
            "query",
            "--log",
            "a",
            "--key",
            "a-keys/verifier.pub",
            "--log",
            "b",
            "--key",
            "b-keys/verifier.pub",
        ];
        args.extend_from_slice(extra);
        audit(&args, d)
    };
    let out = ok(&merged(&["--json", "--kind", "key.release"]));
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["origin"].as_str().unwrap().to_string(),
                l["event"]["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = (0..3)
        .flat_map(|i| {
            [
                ("keybroker/a".to_string(), format!("a{i}")),
                ("keybroker/b".to_string(), format!("b{i}")),
            ]
        })
        .collect();
    assert_eq!(got, want, "by time, each labelled with its log's origin");
    // The table has the origin first; the limit applies to the merged result.
    let out = merged(&["--limit", "7"]);
    let table = ok(&out);
    assert_eq!(table.lines().count(), 7);
    assert!(
        table.lines().all(|l| l.starts_with("keybroker/")),
        "{table}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more: 1 further events"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Usage: one key per log, and --after is one log's index.
    let out = audit(
        &[
            "query",
            "--log",
            "a",
            "--log",
            "b",
            "--key",
            "a-keys/verifier.pub",
        ],
        d,
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(merged(&["--after", "1"]).status.code(), Some(1));
    // The same log twice: events that could not be told apart.
    let out = audit(
        &[
            "query",
            "--log",
            "a",
            "--key",
            "a-keys/verifier.pub",
            "--log",
            "a",
            "--key",
            "a-keys/verifier.pub",
        ],
        d,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("both name themselves"));
    // A log checked with another log's key: its checkpoints do not verify; nothing shown.
    let out = audit(
        &[
            "query",
            "--log",
            "a",
            "--key",
            "b-keys/verifier.pub",
            "--log",
            "b",
            "--key",
            "b-keys/verifier.pub",
        ],
        d,
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty());

    // One byte of b's event 1 changed on disk: the merged query refuses, naming b and the
    // index, and shows no event of any log.
    {
        let db = sled::open(d.join("b/db")).unwrap();
        let events = db.open_tree("events").unwrap();
        let mut v = events.get(1u64.to_be_bytes()).unwrap().unwrap().to_vec();
        let pos = v.windows(2).position(|w| w == b"b1").unwrap();
        v[pos + 1] = b'7';
        events.insert(1u64.to_be_bytes(), v).unwrap();
        db.flush().unwrap();
    }
    let out = merged(&["--kind", "key.release"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty(), "no event from an unverified merge");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keybroker/b") && err.contains("FAILED at index 1"),
        "{err}"
    );
}
