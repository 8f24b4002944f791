//! The sigstore-conformance bundle-verify suite (tests/fixtures/sigstore-conformance, 70
//! cases) through the library, with the defaults of the suite's `run.sh`: the case's
//! `artifact` (else `a.txt`), `trusted_root.json` (else the public-good root), `key.pub`
//! (else `identity`/`issuer` or the conformance beacon's identity). A case whose folder ends
//! in `_fail` must be refused, every other one verified.
//!
//! Until `checkpoint.rs` and `rfc3161.rs` are implemented, the cases in [`AWAITING`] fail
//! only because one of them answers Unimplemented: that is asserted, so any other wrong
//! result still fails this test. A `_fail` case outside the list must fail for a reason of
//! its own (not Unimplemented). Once those modules land, empty the list.

use std::path::{Path, PathBuf};

use sigstore_verify::{
    verify_json, Artifact, ExpectedIdentity, Matcher, Policy, PublicKey, TrustedRoot,
};

const DEFAULT_IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const DEFAULT_ISSUER: &str = "https://token.actions.githubusercontent.com";

/// Cases whose outcome today is an Unimplemented error from `checkpoint` or `rfc3161`.
const AWAITING: &[&str] = &[
    "bundle-with-sct-with-extensions",
    "checkpoint-bad-keyhint_fail",
    "checkpoint-wrong-roothash_fail",
    "happy-path-intoto-in-dsse-v3",
    "happy-path-v0.1",
    "happy-path-v0.2",
    "happy-path-v0.3",
    "happy-path-v0.3-new-mediaType",
    "integrated-time-in-future_fail",
    "intoto-expired-certificate_fail",
    "intoto-set-outside-signing-cert-validity_fail",
    "intoto-tsa-timestamp-outside-cert-validity_fail",
    "intoto-with-custom-trust-root",
    "invalid-checkpoint-signature_fail",
    "managed-key-and-trusted-root",
    "managed-key-happy-path",
    "rekor2-checkpoint-cosigned",
    "rekor2-checkpoint-missing-log-signature_fail",
    "rekor2-checkpoint-missing-origin_fail",
    "rekor2-checkpoint-missing-root-hash_fail",
    "rekor2-checkpoint-missing-size_fail",
    "rekor2-checkpoint-multiple-cosigs",
    "rekor2-checkpoint-no-matching-signature_fail",
    "rekor2-checkpoint-origin-not-first",
    "rekor2-checkpoint-two-sigs-cosigned",
    "rekor2-checkpoint-two-sigs-from-origin",
    "rekor2-dsse-happy-path",
    "rekor2-happy-path",
    "rekor2-no-timestamp_fail",
    "rekor2-timestamp-outside-trust-root-tsa-validity_fail",
    "rekor2-timestamp-outside-tsa-cert-validity_fail",
    "rekor2-timestamp-payload-mismatch_fail",
    "rekor2-timestamp-untrusted-tsa-with-embedded-cert_fail",
    "rekor2-timestamp-untrusted-tsa-without-embedded-cert_fail",
    "rekor2-timestamp-with-embedded-cert",
    "rekor2-timestamp-with-expired-cert-chain",
    "rekor2-timestamp-with-incorrect-time_fail",
    "rekor2-timestamp-without-embedded-cert",
    "trust-root-tlog-validity-end-inclusive",
    "trust-root-tsa-validity-end-inclusive",
];

fn suite() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sigstore-conformance")
}

/// Runs one case; Ok(()) if verified, Err((message, is_unimplemented)) if refused.
fn run_case(dir: &Path) -> Result<(), (String, bool)> {
    let fail = |m: String| Err((m, false));
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let artifact_path = if dir.join("artifact").exists() {
        dir.join("artifact")
    } else {
        suite().join("a.txt")
    };
    let artifact = read(&artifact_path);
    let root_path = if dir.join("trusted_root.json").exists() {
        dir.join("trusted_root.json")
    } else {
        suite().join("trusted_root.public-good.json")
    };
    let root = match TrustedRoot::from_file(&root_path) {
        Ok(r) => r,
        Err(e) => return fail(format!("trusted root: {e}")),
    };
    let policy = if dir.join("key.pub").exists() {
        let pem = String::from_utf8(read(&dir.join("key.pub"))).unwrap();
        match PublicKey::from_pem(&pem) {
            Ok(key) => Policy::key(key),
            Err(e) => return fail(format!("key.pub: {e}")),
        }
    } else {
        let text = |name: &str, default: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| default.to_string())
        };
        Policy::identity(ExpectedIdentity {
            san: Matcher::exact(text("identity", DEFAULT_IDENTITY)),
            issuer: Matcher::exact(text("issuer", DEFAULT_ISSUER)),
        })
    };
    let bundle = String::from_utf8_lossy(&read(&dir.join("bundle.sigstore.json"))).into_owned();
    match verify_json(&bundle, Artifact::Bytes(&artifact), &policy, &root) {
        Ok(_) => Ok(()),
        Err(e) => Err((e.to_string(), e.is_unimplemented())),
    }
}

#[test]
fn bundle_verify_suite() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(suite().join("bundle-verify"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert_eq!(cases.len(), 70, "the suite has 70 cases");
    let mut wrong = Vec::new();
    let mut awaiting_seen = Vec::new();
    for dir in &cases {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let expect_fail = name.ends_with("_fail");
        let awaiting = AWAITING.contains(&name);
        let result = run_case(dir);
        let status = match (&result, expect_fail, awaiting) {
            (Err((_, true)), _, true) => {
                awaiting_seen.push(name);
                "awaits checkpoint/rfc3161"
            }
            (_, _, true) => "WRONG (listed as awaiting, but not Unimplemented)",
            (Ok(()), false, false) => "ok (verified)",
            (Err((_, false)), true, false) => "ok (refused)",
            (Err((_, true)), _, false) => "WRONG (Unimplemented, not listed as awaiting)",
            (Ok(()), true, false) => "WRONG (verified, must be refused)",
            (Err(_), false, false) => "WRONG (refused, must verify)",
        };
        let detail = match &result {
            Ok(()) => String::new(),
            Err((m, _)) => format!(": {m}"),
        };
        println!("{name}: {status}{detail}");
        if status.starts_with("WRONG") {
            wrong.push(name.to_string());
        }
    }
    println!(
        "conformance: {}/{} as expected, {} awaiting checkpoint/rfc3161",
        cases.len() - wrong.len() - awaiting_seen.len(),
        cases.len(),
        awaiting_seen.len()
    );
    assert!(wrong.is_empty(), "cases not as expected: {wrong:?}");
}
