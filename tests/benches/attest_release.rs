//! Attestation + key release round trip on loopback with swtpm, over gRPC with mutual TLS:
//! challenge, TPM quote, attest, release of one layer key, and opening it on the IPU.
//! Reports p50 and p99 over `ROUNDS` (default 200) rounds, with the TPM quote alone
//! measured in the same run as the reference for what the TPM itself costs. Rounds
//! alternate between the two ways a layer key reaches the broker: a JWE to the broker's
//! RSA-2048 key (RSA-OAEP unwrap), and the broker's own key provider wrapping to an EC
//! P-256 key (ECDH-ES+A256KW unwrap).
//!
//! `cargo bench -p integration-tests --bench attest_release`

use std::time::{Duration, Instant};

use api::keybroker::ChallengeRequest;
use broker_protocol::binding;
use broker_protocol::release_context;
use broker_protocol::{SealedKey, SessionKey};
use integration_tests::broker::attest_request;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

fn main() {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let swtpm = integration_tests::Swtpm::start();
    let mut tpm = ipu_image_svc::tpm::Tpm::open(&swtpm.tcti()).unwrap();
    let running = integration_tests::broker::start(&mut tpm);
    let mut ipu = running
        .client(Some(running.pki.issue("ipu-1.example", Some("ipu"), false)))
        .unwrap();
    // The fixture layer's private options, wrapped again by the broker's key provider to
    // its EC key: the same layer, the other wrapping.
    let fixture = integration_tests::broker::fixture_release("");
    let rsa = ocicrypt::keys::PrivateKey::from_pem(
        &std::fs::read(integration_tests::fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
    )
    .unwrap();
    let privopts = ocicrypt::jwe::unwrap(&fixture.wrapped_jwe, &[rsa]).unwrap();
    let provider_wrapping = ocicrypt::keyprovider::join_annotation(&[running
        .broker
        .wrap("bench", "acme-ec", &privopts)
        .unwrap()]);
    drop(privopts);
    let mut total_ec = Vec::with_capacity(rounds);
    let mut release_ec = Vec::new();
    let mut total = Vec::with_capacity(rounds);
    let mut quote_only = Vec::with_capacity(rounds);
    let (mut challenge_t, mut attest_t, mut release_t) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..2 * (rounds + 10) {
        let ec = i % 2 == 1;
        let start = Instant::now();
        let session_key = SessionKey::generate();
        let c = Instant::now();
        let nonce = running
            .rt
            .block_on(ipu.challenge(ChallengeRequest::default()))
            .unwrap()
            .into_inner()
            .nonce;
        let challenge_time = c.elapsed();
        let q = Instant::now();
        let evidence = tpm
            .quote(
                &nonce,
                &session_key.public(),
                &integration_tests::broker::PCRS,
            )
            .unwrap();
        let quote_time = q.elapsed();
        let a = Instant::now();
        let attested = running
            .rt
            .block_on(ipu.attest(attest_request(
                evidence,
                tpm.ak_public(),
                &nonce,
                session_key.public(),
            )))
            .unwrap()
            .into_inner();
        let attest_time = a.elapsed();
        let mut req = integration_tests::broker::fixture_release(&attested.session_id);
        if ec {
            req.wrapped_jwe.clear();
            req.wrapped_provider = provider_wrapping.clone();
        }
        let r0 = Instant::now();
        let r = running
            .rt
            .block_on(ipu.release(req.clone()))
            .unwrap()
            .into_inner();
        let release_time = r0.elapsed();
        session_key
            .open(
                &SealedKey {
                    broker_public: r.broker_public,
                    ciphertext: r.ciphertext,
                },
                &binding(&nonce, &session_key.public()),
                &release_context(&req.image_digest, &req.layer_digest),
            )
            .unwrap();
        if i >= 20 && ec {
            total_ec.push(start.elapsed());
            release_ec.push(release_time);
        } else if i >= 20 {
            total.push(start.elapsed());
            quote_only.push(quote_time);
            challenge_t.push(challenge_time);
            attest_t.push(attest_time);
            release_t.push(release_time);
        }
    }
    let ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
    use integration_tests::bench_report::{emit, ratio, value};
    emit(&ratio(
        "attest_release",
        "round trip (JWE to RSA-2048) / TPM quote alone",
        ("round trip", &ms(&total)),
        ("TPM quote", &ms(&quote_only)),
        "ms",
        None,
    ));
    emit(&value(
        "attest_release",
        "round trip, provider to EC P-256 (p50)",
        "ms",
        &ms(&total_ec),
        None,
    ));
    emit(&value(
        "attest_release",
        "Release RPC, RSA (p50)",
        "ms",
        &ms(&release_t),
        None,
    ));
    println!("{rounds} rounds each of challenge + quote + attest + release + open, loopback mTLS gRPC, swtpm:");
    println!(
        "  round trip, JWE to RSA-2048:         p50 {:6.2} ms  p99 {:6.2} ms",
        pct(&mut total, 0.5),
        pct(&mut total, 0.99)
    );
    println!(
        "  round trip, provider to EC P-256:    p50 {:6.2} ms  p99 {:6.2} ms",
        pct(&mut total_ec, 0.5),
        pct(&mut total_ec, 0.99)
    );
    println!(
        "  TPM quote alone:   p50 {:6.2} ms  p99 {:6.2} ms",
        pct(&mut quote_only, 0.5),
        pct(&mut quote_only, 0.99)
    );
    println!(
        "  Challenge RPC:     p50 {:6.2} ms",
        pct(&mut challenge_t, 0.5)
    );
    println!(
        "  Attest RPC:        p50 {:6.2} ms  (quote check, session, audit)",
        pct(&mut attest_t, 0.5)
    );
    println!(
        "  Release RPC, RSA:  p50 {:6.2} ms  (policy, RSA-OAEP unwrap, seal, audit)",
        pct(&mut release_t, 0.5)
    );
    println!(
        "  Release RPC, EC:   p50 {:6.2} ms  (policy, ECDH-ES unwrap, seal, audit)",
        pct(&mut release_ec, 0.5)
    );
}
