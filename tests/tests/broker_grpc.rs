//! The key broker over gRPC with mutual TLS: an IPU certificate (OU=ipu) attests with a
//! real swtpm and obtains a layer key; other roles, other certificates and callers without
//! a certificate are refused.

use api::keybroker::ChallengeRequest;
use broker_protocol::binding;
use broker_protocol::release_context;
use broker_protocol::{SealedKey, SessionKey};
use integration_tests::broker::{attest_request, fixture_release, start, Pki, PCRS};
use integration_tests::Swtpm;
use ipu_image_svc::tpm::Tpm;

#[test]
fn an_ipu_certificate_attests_and_gets_a_key_others_are_refused() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let running = start(&mut tpm);
    let ipu_identity = running.pki.issue("ipu-1.example", Some("ipu"), false);
    let mut ipu = running.client(Some(ipu_identity)).unwrap();

    let session_key = SessionKey::generate();
    let nonce = running
        .rt
        .block_on(ipu.challenge(ChallengeRequest::default()))
        .unwrap()
        .into_inner()
        .nonce;
    let evidence = tpm.quote(&nonce, &session_key.public(), &PCRS).unwrap();
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
    assert_eq!(attested.ipu_class, "ipu-gen2");
    assert!(attested.expires_in_secs > 0);

    let req = fixture_release(&attested.session_id);
    let released = running
        .rt
        .block_on(ipu.release(req.clone()))
        .unwrap()
        .into_inner();
    let privopts = session_key
        .open(
            &SealedKey {
                broker_public: released.broker_public,
                ciphertext: released.ciphertext,
            },
            &binding(&nonce, &session_key.public()),
            &release_context(&req.image_digest, &req.layer_digest),
        )
        .unwrap();
    ocicrypt::PrivateLayerOptions::from_json(&privopts).unwrap();

    // Another IPU's certificate cannot use this session.
    let mut other = running
        .client(Some(running.pki.issue("ipu-2.example", Some("ipu"), false)))
        .unwrap();
    let err = running.rt.block_on(other.release(req.clone())).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("another client"), "{err}");

    // An auditor's certificate may not ask for nonces or keys.
    let mut auditor = running
        .client(Some(running.pki.issue("alice", Some("auditor"), false)))
        .unwrap();
    let err = running
        .rt
        .block_on(auditor.challenge(ChallengeRequest::default()))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // A certificate with no role at all.
    let mut nobody = running
        .client(Some(running.pki.issue("nobody", None, false)))
        .unwrap();
    let err = running
        .rt
        .block_on(nobody.challenge(ChallengeRequest::default()))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // No client certificate: the TLS handshake (or the first call) fails.
    match running.client(None) {
        Err(_) => {}
        Ok(mut anonymous) => {
            let err = running
                .rt
                .block_on(anonymous.challenge(ChallengeRequest::default()))
                .unwrap_err();
            assert_ne!(err.code(), tonic::Code::Ok);
        }
    }

    // A certificate from another CA is not accepted either.
    let rogue = Pki::new().issue("ipu-1.example", Some("ipu"), false);
    match running.client(Some(rogue)) {
        Err(_) => {}
        Ok(mut c) => {
            assert!(running
                .rt
                .block_on(c.challenge(ChallengeRequest::default()))
                .is_err());
        }
    }
}
