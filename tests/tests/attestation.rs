//! TPM 2.0 attestation against a real swtpm per test: the IPU quotes with its AK, bound to
//! the broker's nonce and its ephemeral key; the broker's verifier accepts exactly the
//! right evidence and names what is wrong with everything else.

use std::collections::HashMap;
use std::time::Duration;

use integration_tests::Swtpm;
use ipu_image_svc::tpm::Tpm;
use keybroker::verifier::{AttestError, Enrollment, ReferencePcrs, Verifier};

const PCRS: [u8; 3] = [0, 7, 16];

/// A broker whose class "test-class" expects the PCR values `tpm` has now.
fn broker_for(tpm: &mut Tpm) -> Verifier {
    let reference: ReferencePcrs = tpm.read_pcrs(&PCRS).unwrap();
    let v = Verifier::new(
        HashMap::from([("test-class".to_string(), reference)]),
        Duration::from_secs(60),
    );
    v.enroll(
        tpm.ak_public(),
        Enrollment {
            ipu_id: "ipu-1".into(),
            ipu_class: "test-class".into(),
            ..Enrollment::default()
        },
    )
    .unwrap();
    v
}

const EPHEMERAL: &[u8] = b"ephemeral public key of this session";

#[test]
fn a_fresh_quote_from_an_enrolled_ak_verifies() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.ak_public().len(), 65);
    let broker = broker_for(&mut tpm);
    let nonce = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&nonce, EPHEMERAL, &PCRS).unwrap();
    let (enrollment, quote) = broker
        .verify(&evidence, tpm.ak_public(), &nonce, EPHEMERAL)
        .unwrap();
    assert_eq!(enrollment.ipu_id, "ipu-1");
    assert_eq!(quote.selection, [(0x000b, PCRS.to_vec())]);
    // A replay of the same evidence: the nonce is spent.
    let err = broker
        .verify(&evidence, tpm.ak_public(), &nonce, EPHEMERAL)
        .unwrap_err();
    assert_eq!(err, AttestError::StaleNonce);
}

#[test]
fn nonces_bindings_and_keys_are_checked() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let broker = broker_for(&mut tpm);

    // A nonce the broker never issued.
    let forged = [7u8; 32];
    let evidence = tpm.quote(&forged, EPHEMERAL, &PCRS).unwrap();
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &forged, EPHEMERAL)
            .unwrap_err(),
        AttestError::StaleNonce
    );

    // A quote made for one nonce presented with another (fresh) one.
    let n1 = broker.nonces.issue().unwrap();
    let n2 = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&n1, EPHEMERAL, &PCRS).unwrap();
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &n2, EPHEMERAL)
            .unwrap_err(),
        AttestError::WrongBinding
    );

    // A quote bound to another ephemeral key (a relayed quote).
    let n = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&n, b"the attacker's key", &PCRS).unwrap();
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::WrongBinding
    );

    // Changed evidence: a PCR value, a byte of the quote.
    let n = broker.nonces.issue().unwrap();
    let mut evidence = tpm.quote(&n, EPHEMERAL, &PCRS).unwrap();
    evidence.pcrs.get_mut(&7).unwrap()[0] ^= 1;
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::PcrDigestMismatch
    );
    let n = broker.nonces.issue().unwrap();
    let mut evidence = tpm.quote(&n, EPHEMERAL, &PCRS).unwrap();
    let last = evidence.attest.len() - 1;
    evidence.attest[last] ^= 1;
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::BadSignature
    );

    // Fewer PCRs than the class requires.
    let n = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&n, EPHEMERAL, &[0]).unwrap();
    assert!(matches!(
        broker
            .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::WrongSelection { .. }
    ));

    // Revoked.
    assert!(broker.revoke(tpm.ak_public()));
    let n = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&n, EPHEMERAL, &PCRS).unwrap();
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::RevokedKey
    );
}

#[test]
fn an_unenrolled_ak_and_a_changed_pcr_are_refused() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let broker = broker_for(&mut tpm);

    // Another TPM's AK, never enrolled, with valid quotes of its own.
    let other_swtpm = Swtpm::start();
    let mut other = Tpm::open(&other_swtpm.tcti()).unwrap();
    let n = broker.nonces.issue().unwrap();
    let evidence = other.quote(&n, EPHEMERAL, &PCRS).unwrap();
    assert_eq!(
        broker
            .verify(&evidence, other.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::UnknownKey
    );
    // ...nor can its quote pass as the enrolled AK's.
    let n = broker.nonces.issue().unwrap();
    let evidence = other.quote(&n, EPHEMERAL, &PCRS).unwrap();
    assert_eq!(
        broker
            .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
            .unwrap_err(),
        AttestError::BadSignature
    );

    // Something unexpected was measured into PCR 16.
    tpm.extend_pcr(16, &[0xAB; 32]).unwrap();
    let n = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&n, EPHEMERAL, &PCRS).unwrap();
    match broker
        .verify(&evidence, tpm.ak_public(), &n, EPHEMERAL)
        .unwrap_err()
    {
        AttestError::PcrMismatch { index, .. } => assert_eq!(index, 16),
        other => panic!("{other}"),
    }
}

/// Attestation then release: the broker seals a layer key to the session key the quote
/// bound; only that session opens it, and only for that layer.
#[test]
fn a_released_key_opens_only_in_the_attested_session() {
    use broker_protocol::binding;
    use broker_protocol::{seal, SessionKey};
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let broker = broker_for(&mut tpm);
    let session = SessionKey::generate();
    let nonce = broker.nonces.issue().unwrap();
    let evidence = tpm.quote(&nonce, &session.public(), &PCRS).unwrap();
    broker
        .verify(&evidence, tpm.ak_public(), &nonce, &session.public())
        .unwrap();
    let salt = binding(&nonce, &session.public());
    let privopts = br#"{"symkey":"c2VjcmV0","cipheroptions":{"nonce":"bm9uY2U="}}"#;
    let context = b"image sha256:53ed layer sha256:67425adc";
    let sealed = seal(&session.public(), &salt, context, privopts).unwrap();
    assert_eq!(
        &session.open(&sealed, &salt, context).unwrap()[..],
        privopts
    );
    // A host that relayed the quote but holds another session key gets nothing.
    let thief = SessionKey::generate();
    assert!(thief.open(&sealed, &salt, context).is_err());
    // Nor does the right session open it for another layer.
    assert!(session
        .open(&sealed, &salt, b"image sha256:53ed layer sha256:other")
        .is_err());
}

/// Enrollment reads the AK's TPMT_PUBLIC: the real AK enrolls with the same point the TPM
/// signs with; the endorsement key (a decryption key) posing as an AK is refused.
#[test]
fn enrollment_accepts_the_ak_and_refuses_the_endorsement_key() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let reference = tpm.read_pcrs(&PCRS).unwrap();
    let v = Verifier::new(
        HashMap::from([("test-class".to_string(), reference)]),
        Duration::from_secs(60),
    );
    let enrollment = || Enrollment {
        ipu_id: "ipu-1".into(),
        ipu_class: "test-class".into(),
        ..Enrollment::default()
    };
    let point = v.enroll_template(tpm.ak_template(), enrollment()).unwrap();
    assert_eq!(point, tpm.ak_public());
    let n = v.nonces.issue().unwrap();
    let evidence = tpm.quote(&n, EPHEMERAL, &PCRS).unwrap();
    v.verify(&evidence, &point, &n, EPHEMERAL).unwrap();

    let ek = tpm.ek_template().unwrap();
    let err = v
        .enroll_template(&ek, enrollment())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an attestation key"), "{err}");
    assert!(err.contains("must not decrypt"), "{err}");
    assert!(v
        .enroll_template(&ek[..ek.len() - 1], enrollment())
        .is_err());
}

/// TPM2_MakeCredential done by the broker in software and TPM2_ActivateCredential by the
/// TPM: the secret comes back only from the TPM whose EK it was made for, for the AK it names.
#[test]
fn a_credential_activates_only_on_the_tpm_and_ak_it_was_made_for() {
    use keybroker::credential::{make_credential, object_name, EndorsementKey};
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ek = EndorsementKey::parse(&tpm.ek_template().unwrap()).unwrap();
    let secret = [7u8; 32];
    let credential = make_credential(&ek, &object_name(tpm.ak_template()), &secret);
    let got = tpm
        .activate_credential(&credential.id_object, &credential.encrypted_secret)
        .unwrap();
    assert_eq!(&got[..], &secret);

    // Made for another AK name: the TPM refuses (integrity check on the name).
    let other_name = object_name(b"another object");
    let credential = make_credential(&ek, &other_name, &secret);
    assert!(tpm
        .activate_credential(&credential.id_object, &credential.encrypted_secret)
        .is_err());

    // Another TPM, with this TPM's EK enrolled for its AK: it cannot activate.
    let other_swtpm = Swtpm::start();
    let mut other = Tpm::open(&other_swtpm.tcti()).unwrap();
    let credential = make_credential(&ek, &object_name(other.ak_template()), &secret);
    assert!(other
        .activate_credential(&credential.id_object, &credential.encrypted_secret)
        .is_err());
}

/// An AK enrolled with its EK attests only after it has proven, once, that it lives in that
/// TPM: no activation, a wrong answer, or a TPM that cannot activate are refused; after the
/// first good activation it attests without one.
#[test]
fn an_ak_pinned_to_its_ek_attests_only_after_activation() {
    use keybroker::verifier::AttestError;
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let reference = tpm.read_pcrs(&PCRS).unwrap();
    let v = Verifier::new(
        HashMap::from([("test-class".to_string(), reference)]),
        Duration::from_secs(60),
    );
    let ek = tpm.ek_template().unwrap();
    let point = v
        .enroll_template(
            tpm.ak_template(),
            Enrollment {
                ipu_id: "ipu-1".into(),
                ipu_class: "test-class".into(),
                ek_template: Some(ek),
                ..Enrollment::default()
            },
        )
        .unwrap();
    let attest = |tpm: &mut Tpm, activation: Option<&[u8]>| {
        let n = v.nonces.issue().unwrap();
        let evidence = tpm.quote(&n, EPHEMERAL, &PCRS).unwrap();
        v.verify_activated(&evidence, &point, &n, EPHEMERAL, activation)
    };
    // No credential asked for, or none answered: refused.
    assert_eq!(
        attest(&mut tpm, None).unwrap_err(),
        AttestError::NotActivated
    );
    let c = v
        .credential_for(&point)
        .unwrap()
        .expect("activation is due");
    assert_eq!(
        attest(&mut tpm, Some(&[0u8; 32])).unwrap_err(),
        AttestError::NotActivated
    );
    // The wrong answer used the credential up: even its right secret is refused now.
    let stale = tpm
        .activate_credential(&c.id_object, &c.encrypted_secret)
        .unwrap();
    assert_eq!(
        attest(&mut tpm, Some(&stale)).unwrap_err(),
        AttestError::NotActivated
    );
    // A fresh credential, answered by the TPM.
    let c = v.credential_for(&point).unwrap().unwrap();
    let secret = tpm
        .activate_credential(&c.id_object, &c.encrypted_secret)
        .unwrap();
    let (enrollment, _) = attest(&mut tpm, Some(&secret)).unwrap();
    assert!(enrollment.activated);
    // Activated: no more credentials, and quotes verify on their own.
    assert!(v.credential_for(&point).unwrap().is_none());
    attest(&mut tpm, None).unwrap();

    // Another TPM's AK enrolled with this TPM's EK cannot activate.
    let other_swtpm = Swtpm::start();
    let mut other = Tpm::open(&other_swtpm.tcti()).unwrap();
    let other_point = v
        .enroll_template(
            other.ak_template(),
            Enrollment {
                ipu_id: "ipu-2".into(),
                ipu_class: "test-class".into(),
                ek_template: Some(tpm.ek_template().unwrap()),
                ..Enrollment::default()
            },
        )
        .unwrap();
    let c = v.credential_for(&other_point).unwrap().unwrap();
    assert!(other
        .activate_credential(&c.id_object, &c.encrypted_secret)
        .is_err());
}
