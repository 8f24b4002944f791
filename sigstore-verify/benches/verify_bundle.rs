//! Verifying one keyless bundle (happy-path-v0.3 of the conformance suite: Fulcio
//! certificate, SCT, Rekor v1 entry with SET, inclusion proof and checkpoint) with the
//! trusted root parsed once. Prints p50 and p99. Target: p50 <= 2 ms in release.
//!
//! While `checkpoint::verify_checkpoint` is unimplemented the run stops at that call (the
//! last step for this bundle), so the figure lacks one checkpoint signature check.

use std::time::{Duration, Instant};

use sigstore_verify::{
    verify_json, Artifact, ExpectedIdentity, Matcher, Policy, TrustedRoot, VerifyError,
};

const CASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/sigstore-conformance/bundle-verify/happy-path-v0.3/bundle.sigstore.json"
);
const ARTIFACT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/sigstore-conformance/a.txt"
);

fn main() {
    let root = TrustedRoot::public_good();
    let bundle = std::fs::read_to_string(CASE).unwrap();
    let artifact = std::fs::read(ARTIFACT).unwrap();
    let policy = Policy::identity(ExpectedIdentity {
        san: Matcher::exact("https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main"),
        issuer: Matcher::exact("https://token.actions.githubusercontent.com"),
    });
    let run = || verify_json(&bundle, Artifact::Bytes(&artifact), &policy, &root);
    if let Err(e) = run() {
        panic!("bundle refused: {e}");
    }
    let check = |r: Result<_, VerifyError>| r.is_ok();
    for _ in 0..50 {
        assert!(check(run()));
    }
    let n = 1000;
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let r = run();
            let d = t.elapsed();
            assert!(check(r));
            d
        })
        .collect();
    samples.sort();
    let p = |q: f64| samples[((n as f64 - 1.0) * q) as usize];
    println!("verify_bundle (happy-path-v0.3, keyless, Rekor v1): verified");
    println!("  n={n} p50={:?} p99={:?}", p(0.50), p(0.99));
}
