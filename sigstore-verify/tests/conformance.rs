//! The sigstore-conformance bundle-verify suite (tests/fixtures/sigstore-conformance, 70
//! cases) through the library, with the defaults of the suite's `run.sh`: the case's
//! `artifact` (else `a.txt`), `trusted_root.json` (else the public-good root), `key.pub`
//! (else `identity`/`issuer` or the conformance beacon's identity). A case whose folder ends
//! in `_fail` must be refused, every other one verified.

use std::path::{Path, PathBuf};

use sigstore_verify::{
    verify_json, Artifact, ExpectedIdentity, Matcher, Policy, PublicKey, TrustedRoot,
};

const DEFAULT_IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const DEFAULT_ISSUER: &str = "https://token.actions.githubusercontent.com";

fn suite() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sigstore-conformance")
}

/// Runs one case; Ok(()) if verified, Err(why) if refused.
fn run_case(dir: &Path) -> Result<(), String> {
    let fail = Err;
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
        Err(e) => Err(e.to_string()),
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
    for dir in &cases {
        let name = dir.file_name().unwrap().to_str().unwrap();
        let expect_fail = name.ends_with("_fail");
        let result = run_case(dir);
        let status = match (&result, expect_fail) {
            (Ok(()), false) => "ok (verified)",
            (Err(_), true) => "ok (refused)",
            (Ok(()), true) => "WRONG (verified, must be refused)",
            (Err(_), false) => "WRONG (refused, must verify)",
        };
        let detail = match &result {
            Ok(()) => String::new(),
            Err(m) => format!(": {m}"),
        };
        println!("{name}: {status}{detail}");
        if status.starts_with("WRONG") {
            wrong.push(name.to_string());
        }
    }
    println!(
        "conformance: {}/{} as expected",
        cases.len() - wrong.len(),
        cases.len()
    );
    assert!(wrong.is_empty(), "cases not as expected: {wrong:?}");
}
