//! The cost of checking a placement grant: `policy::grant::verify` of a valid grant
//! signed with Ed25519 and with ECDSA P-256, against a policy naming both keys, as the IPU
//! runs it on every Prepare and Verify (the serial's claim, a file create and two syncs, is
//! measured by the warm-start benchmark once grants are on its path).
//!
//! `cargo bench -p policy --bench grant_verify`: medians of ROUNDS (default 7) rounds of 2,000
//! verifications each, with the spread of the rounds.

use std::time::{Duration, Instant, SystemTime};

#[path = "../../tests/src/bench_report.rs"]
mod bench_report;

use policy::grant::{Expectation, Grant, ImageClaim};
use ring::signature::KeyPair as _;

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// (private PKCS#8 PEM, public SPKI PEM) of a new key of `kind`.
fn key(kind: &str) -> (String, String) {
    let rng = ring::rand::SystemRandom::new();
    if kind == "ed25519" {
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        (
            pem("PRIVATE KEY", pkcs8.as_ref()),
            pem(
                "PUBLIC KEY",
                &policy::dsse::ed25519_spki(kp.public_key().as_ref()),
            ),
        )
    } else {
        let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        (
            pem("PRIVATE KEY", pkcs8.as_ref()),
            pem(
                "PUBLIC KEY",
                &policy::dsse::p256_spki(kp.public_key().as_ref()),
            ),
        )
    }
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    const PER_ROUND: u32 = 2_000;
    let (ed, p256) = (key("ed25519"), key("ec-p256"));
    let policy = policy::deploy::parse(
        &format!(
            r#"schema = 1
image_trust_policy = "image-trust.json"

[[tenant]]
name = "acme"

[[tenant.function]]
name = "*"
images = ["docker://registry.example/acme/*"]

[[grant_key]]
id = "ed25519"
public_key = """
{}"""
tenants = ["acme"]

[[grant_key]]
id = "p256"
public_key = """
{}"""
tenants = ["acme"]
"#,
            ed.1, p256.1
        ),
        "bench.toml",
    )
    .unwrap();
    let image = "docker://registry.example/acme/app@sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112";
    let now = SystemTime::now();
    let grant = Grant {
        version: 1,
        serial: policy::grant::new_serial().unwrap(),
        tenant: "acme".into(),
        function: "resize".into(),
        image: ImageClaim::Reference(image.into()),
        ipu: "ipu-1".into(),
        host: "host-1.example".into(),
        not_before: now - Duration::from_secs(60),
        not_after: now + Duration::from_secs(600),
    };
    let expect = Expectation {
        ipu: "ipu-1",
        host: Some("host-1.example"),
        image,
        now,
    };
    println!(
        "policy::grant::verify of a valid grant, {rounds} rounds of {PER_ROUND}, per verification:"
    );
    for (name, private) in [("Ed25519", &ed.0), ("ECDSA P-256", &p256.0)] {
        let (envelope, _) = policy::grant::sign(&grant, private.as_bytes()).unwrap();
        let mut per_round: Vec<f64> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..PER_ROUND {
                    std::hint::black_box(
                        policy::grant::verify(envelope.as_bytes(), &policy, &expect).unwrap(),
                    );
                }
                t.elapsed().as_secs_f64() * 1e6 / f64::from(PER_ROUND)
            })
            .collect();
        bench_report::emit(&bench_report::value(
            "grant_verify",
            &format!("grant verify, {name}"),
            "µs",
            &per_round,
            None,
        ));
        per_round.sort_by(f64::total_cmp);
        println!(
            "  {name:<12} median {:7.1} µs (rounds: min {:.1}, max {:.1})",
            per_round[per_round.len() / 2],
            per_round[0],
            per_round[per_round.len() - 1]
        );
    }
}
