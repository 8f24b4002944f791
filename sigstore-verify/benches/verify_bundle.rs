//! Verifying one keyless bundle (happy-path-v0.3 of the conformance suite: Fulcio
//! certificate, SCT, Rekor v1 entry with SET, inclusion proof and checkpoint) with the
//! trusted root parsed once. Prints p50 and p99. Target: p50 <= 2 ms in release.
//!
//! In the same run, when cosign 3 is installed (scripts/setup.sh puts it under
//! /opt/ipu-image-tools; `COSIGN` overrides), the same bundle through `cosign verify-blob`
//! and through this project's `policy sigstore verify-bundle` (release build, if present),
//! both as whole processes (start-up and trusted root parsing included), 21 runs each.

use std::time::{Duration, Instant};

#[path = "../../tests/src/bench_report.rs"]
mod bench_report;

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

const IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const ISSUER: &str = "https://token.actions.githubusercontent.com";

fn main() {
    let root = TrustedRoot::public_good();
    let bundle = std::fs::read_to_string(CASE).unwrap();
    let artifact = std::fs::read(ARTIFACT).unwrap();
    let policy = Policy::identity(ExpectedIdentity {
        san: Matcher::exact(IDENTITY),
        issuer: Matcher::exact(ISSUER),
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
    bench_report::emit(&bench_report::value(
        "verify_bundle",
        "verify one keyless bundle, in process (p50)",
        "ms",
        &samples
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect::<Vec<_>>(),
        Some(bench_report::Target::AtMost(2.0)),
    ));
    compare_processes();
}

/// p50 and spread of 21 runs of a verifying command, as whole processes.
fn time_command(
    program: &str,
    args: &[String],
) -> Option<(Duration, Duration, Duration, Vec<f64>)> {
    let mut samples = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let status = std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        samples.push(t.elapsed());
        assert!(status.success(), "{program} refused the bundle");
    }
    let ms = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    samples.sort();
    Some((samples[10], samples[0], samples[20], ms))
}

fn compare_processes() {
    let cosign = std::env::var("COSIGN")
        .unwrap_or_else(|_| "/opt/ipu-image-tools/cosign-3.1.1/usr/bin/cosign".into());
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/sigstore-conformance/trusted_root.public-good.json"
    );
    let args = |verb: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = verb.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "--bundle",
                CASE,
                "--trusted-root",
                root,
                "--certificate-identity",
                IDENTITY,
                "--certificate-oidc-issuer",
                ISSUER,
                ARTIFACT,
            ]
            .map(String::from),
        );
        a
    };
    let ours = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/policy");
    let mut medians = Vec::new();
    for (name, program, verb) in [
        (
            "cosign 3 verify-blob",
            cosign.as_str(),
            &["verify-blob"][..],
        ),
        (
            "policy sigstore verify-bundle",
            ours,
            &["sigstore", "verify-bundle"][..],
        ),
    ] {
        match time_command(program, &args(verb)) {
            Some((p50, min, max, samples)) => {
                println!("  {name} (whole process, 21 runs): p50={p50:?} min={min:?} max={max:?}");
                medians.push(samples);
            }
            None => println!("  {name}: not run ({program} not found)"),
        }
    }
    if let [cosign, ours] = &medians[..] {
        bench_report::emit(&bench_report::ratio(
            "verify_bundle",
            "verify a bundle, whole process: ours / cosign 3 verify-blob",
            ("policy sigstore verify-bundle", ours),
            ("cosign verify-blob", cosign),
            "ms",
            None,
        ));
    }
}
