//! The broker's whole flow with a real swtpm: challenge, quote, session, policy-checked
//! release of a fixture layer's key sealed to the session, and the IPU decrypting the layer
//! with it. Every refusal named and audited.

use std::sync::Arc;
use std::time::Duration;

use broker_protocol::binding;
use broker_protocol::release_context;
use broker_protocol::SessionKey;
use integration_tests::broker::{broker, enc_signed_layer, key_store, verifier_for, PCRS};
use integration_tests::{audit_log, Swtpm};
use ipu_image_svc::tpm::Tpm;
use keybroker::broker::{Broker, BrokerError, ReleaseRequest, Session, Wrapped};
use keybroker::keystore::{KeyStore, MasterKey};
use ocicrypt::{PrivateLayerOptions, PublicLayerOptions};
use zeroize::Zeroizing;

const CLIENT: &str = "CN=ipu-1.example,O=platform";

struct Setup {
    _swtpm: Swtpm,
    tpm: Tpm,
    broker: Broker,
    log: Arc<audit::AuditLog>,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Challenge, quote bound to `key`, attest: an open session and the nonce it used.
    fn attest(&mut self, key: &SessionKey) -> (Session, Zeroizing<Vec<u8>>) {
        let nonce = self.broker.challenge();
        let evidence = self.tpm.quote(&nonce, &key.public(), &PCRS).unwrap();
        let session = self
            .broker
            .attest(
                CLIENT,
                &evidence,
                self.tpm.ak_public(),
                &nonce,
                &key.public(),
            )
            .unwrap();
        (session, nonce)
    }
}

fn setup(session_ttl: Duration) -> Setup {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = audit_log(&dir.path().join("audit"));
    let broker = broker(
        verifier_for(&mut tpm),
        key_store(dir.path()),
        log.clone(),
        session_ttl,
    );
    Setup {
        _swtpm: swtpm,
        tpm,
        broker,
        log,
        _dir: dir,
    }
}

fn request(session: &str, tenant: &str) -> ReleaseRequest {
    let layer = enc_signed_layer();
    ReleaseRequest {
        session_id: session.into(),
        tenant: tenant.into(),
        function: "resize".into(),
        image: layer.image,
        image_digest: layer.image_digest,
        layer_digest: layer.layer_digest,
        wrapped: Wrapped::Jwe(layer.annotations[ocicrypt::ANNOTATION_KEYS_JWE].clone()),
    }
}

#[test]
fn attested_ipu_gets_the_layer_key_and_decrypts_the_layer() {
    let mut s = setup(Duration::from_secs(60));
    let session_key = SessionKey::generate();
    let (session, nonce) = s.attest(&session_key);
    assert_eq!(session.ipu_class, "ipu-gen2");

    let req = request(&session.id, "acme");
    let sealed = s.broker.release(CLIENT, &req).unwrap();
    // The IPU opens it with its session key and decrypts the layer with the options.
    let privopts = session_key
        .open(
            &sealed,
            &binding(&nonce, &session_key.public()),
            &release_context(&req.image_digest, &req.layer_digest),
        )
        .unwrap();
    let privopts = PrivateLayerOptions::from_json(&privopts).unwrap();
    let layer = enc_signed_layer();
    let pubopts = PublicLayerOptions::from_annotations(&layer.annotations).unwrap();
    let mut dec =
        ocicrypt::LayerDecryptor::with_options(&layer.blob[..], &pubopts, &privopts).unwrap();
    std::io::copy(&mut dec, &mut std::io::sink()).unwrap();
    dec.finish()
        .expect("the released key decrypts and authenticates the layer");

    // Refusals, each with its reason.
    let other_client = s.broker.release("CN=host-7.example", &req).unwrap_err();
    assert!(
        matches!(other_client, BrokerError::WrongClient),
        "{other_client}"
    );
    let no_session = s
        .broker
        .release(CLIENT, &request("feedface", "acme"))
        .unwrap_err();
    assert!(matches!(no_session, BrokerError::NoSession), "{no_session}");
    let denied = s
        .broker
        .release(CLIENT, &request(&session.id, "globex"))
        .unwrap_err();
    assert!(
        matches!(&denied, BrokerError::Denied(r) if r.contains("tenant \"globex\" may not use this key")),
        "{denied}"
    );
    // A layer wrapped to a key the broker does not hold (the EC fixture key).
    let mut foreign = req.clone();
    let Wrapped::Jwe(jwe) = &req.wrapped else {
        unreachable!()
    };
    foreign.wrapped = Wrapped::Jwe(jwe.replace('A', "B"));
    let err = s.broker.release(CLIENT, &foreign).unwrap_err();
    assert!(matches!(err, BrokerError::NoUsableKey(_)), "{err}");

    // Audit: one release with the key id, four denials, one attestation.
    let store = s.log.store();
    let q = |kind| {
        store
            .query(&audit::Query {
                kind: Some(kind),
                limit: 100,
                ..audit::Query::default()
            })
            .unwrap()
            .events
    };
    let releases = q(audit::EventKind::KeyRelease);
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].key_ids[0].as_str(), "fixtures-rsa");
    assert_eq!(releases[0].actor.subject.as_deref(), Some(CLIENT));
    assert_eq!(q(audit::EventKind::KeyDeny).len(), 4);
    assert_eq!(q(audit::EventKind::AttestationVerify).len(), 1);
}

#[test]
fn relayed_quotes_expired_sessions_and_revoked_keys_get_nothing() {
    let mut s = setup(Duration::from_millis(300));
    // A quote bound to one session key, presented with another (a relaying host).
    let ipu_key = SessionKey::generate();
    let host_key = SessionKey::generate();
    let nonce = s.broker.challenge();
    let evidence = s.tpm.quote(&nonce, &ipu_key.public(), &PCRS).unwrap();
    let err = s
        .broker
        .attest(
            CLIENT,
            &evidence,
            s.tpm.ak_public(),
            &nonce,
            &host_key.public(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("another ephemeral key"), "{err}");

    // A session expires.
    let (session, _) = s.attest(&ipu_key);
    std::thread::sleep(Duration::from_millis(400));
    let err = s
        .broker
        .release(CLIENT, &request(&session.id, "acme"))
        .unwrap_err();
    assert!(matches!(err, BrokerError::NoSession), "{err}");

    // A revoked key is never released, even within a live session.
    let (session, _) = s.attest(&ipu_key);
    s.broker.keys().revoke("fixtures-rsa", None).unwrap();
    let err = s
        .broker
        .release(CLIENT, &request(&session.id, "acme"))
        .unwrap_err();
    assert!(
        matches!(&err, BrokerError::Denied(r) if r.contains("fixtures-rsa version 1 is revoked")),
        "{err}"
    );
}

/// A broker restart: its keys are still there (sealed on disk), its sessions are gone.
#[test]
fn after_a_restart_keys_remain_and_sessions_are_gone() {
    let mut s = setup(Duration::from_secs(60));
    let session_key = SessionKey::generate();
    let (session, _) = s.attest(&session_key);
    s.broker
        .release(CLIENT, &request(&session.id, "acme"))
        .unwrap();
    let dir = s._dir.path().to_path_buf();
    let log = s.log.clone();
    drop(s.broker);

    // The restarted broker: same key store and master key, fresh memory.
    let keys = KeyStore::open(
        &dir,
        MasterKey::load_or_create(&dir.join("master.key")).unwrap(),
    )
    .unwrap();
    assert_eq!(keys.list().unwrap().len(), 1);
    let broker = broker(verifier_for(&mut s.tpm), keys, log, Duration::from_secs(60));
    let err = broker
        .release(CLIENT, &request(&session.id, "acme"))
        .unwrap_err();
    assert!(matches!(err, BrokerError::NoSession), "{err}");
    // A new attestation works and the stored key is released again.
    let nonce = broker.challenge();
    let evidence = s.tpm.quote(&nonce, &session_key.public(), &PCRS).unwrap();
    let session = broker
        .attest(
            CLIENT,
            &evidence,
            s.tpm.ak_public(),
            &nonce,
            &session_key.public(),
        )
        .unwrap();
    broker
        .release(CLIENT, &request(&session.id, "acme"))
        .unwrap();
}
