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
        let nonce = self.broker.challenge().unwrap();
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
        grant: None,
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
    let nonce = s.broker.challenge().unwrap();
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
    let nonce = broker.challenge().unwrap();
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

/// Replaces every `encrypted_key` in every JWE of a `keys.jwe` annotation with `f(old)`.
fn with_encrypted_key(annotation: &str, f: &dyn Fn(&[u8]) -> Vec<u8>) -> String {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    use serde_json::Value;
    fn walk(v: &mut Value, f: &dyn Fn(&[u8]) -> Vec<u8>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if k == "encrypted_key" {
                        let old = URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap();
                        *v = Value::String(URL_SAFE_NO_PAD.encode(f(&old)));
                    } else {
                        walk(v, f);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, f)),
            _ => {}
        }
    }
    annotation
        .split(',')
        .map(|item| {
            let mut json: Value = serde_json::from_slice(&STANDARD.decode(item).unwrap()).unwrap();
            walk(&mut json, f);
            STANDARD.encode(serde_json::to_vec(&json).unwrap())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// No padding oracle through the release doors (RUSTSEC-2023-0071, Marvin): a fixture layer
/// whose RSA-OAEP wrapped key was tampered with (flipped bits, wrong length, zero, the
/// modulus, above it) is refused with the very error, and audited with the very reason, of a
/// layer wrapped to an RSA key the broker does not hold; by the `keys.jwe` door and by the key
/// provider door. The unwrap is aws-lc's constant-time OAEP (threat model T48).
#[test]
fn tampered_rsa_wrapped_keys_are_denied_exactly_like_a_foreign_key() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let mut s = setup(Duration::from_secs(60));
    let session_key = SessionKey::generate();
    let (session, _) = s.attest(&session_key);
    let good = request(&session.id, "acme");
    let Wrapped::Jwe(jwe) = good.wrapped.clone() else {
        unreachable!()
    };
    s.broker
        .release(CLIENT, &good)
        .expect("the untouched layer is released");

    // The fixture key's modulus, from its SPKI DER (RSA-2048: 256 bytes at offset 33).
    let public =
        std::fs::read_to_string(integration_tests::fixtures().join("keys/rsa-2048/pub.pem"))
            .unwrap();
    let b64: String = public.lines().filter(|l| !l.starts_with("-----")).collect();
    let spki = STANDARD.decode(b64).unwrap();
    assert_eq!(spki[28..33], [0x02, 0x82, 0x01, 0x01, 0x00]);
    let n = spki[33..289].to_vec();
    let above = {
        let mut v = n.clone();
        v[255] = v[255].wrapping_add(1);
        v
    };
    type Mutation = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let flip = |i: usize, bit: u8| -> Mutation {
        Box::new(move |c: &[u8]| {
            let mut c = c.to_vec();
            c[i] ^= bit;
            c
        })
    };
    let cases: Vec<(&str, Mutation)> = vec![
        ("first bit flipped", flip(0, 0x80)),
        ("middle byte flipped", flip(128, 0x01)),
        ("last byte flipped", flip(255, 0x01)),
        (
            "one byte short",
            Box::new(|c: &[u8]| c[..c.len() - 1].to_vec()),
        ),
        ("one byte long", Box::new(|c: &[u8]| [c, &[0]].concat())),
        ("zero", Box::new(|c: &[u8]| vec![0; c.len()])),
        ("the modulus", Box::new(move |_: &[u8]| n.clone())),
        ("above the modulus", Box::new(move |_: &[u8]| above.clone())),
    ];

    // The reference: the same options wrapped to an RSA-2048 key the broker does not hold.
    let foreign = ocicrypt::keys::PrivateKey::from_pem(
        ocicrypt::keys::generate_rsa_pkcs8_pem(2048)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let foreign_jwe = ocicrypt::jwe::wrap(b"{}", &[foreign.public_key()]).unwrap();
    let provider = |jwe: &str| {
        Wrapped::Provider(
            STANDARD.encode(
                keybroker::wrapping::ProviderWrapping {
                    key_id: "fixtures-rsa".into(),
                    version: 1,
                    jwe: jwe.to_string(),
                }
                .encode(),
            ),
        )
    };
    let refuse = |wrapped: Wrapped| {
        let mut req = good.clone();
        req.wrapped = wrapped;
        s.broker.release(CLIENT, &req).unwrap_err().to_string()
    };
    let jwe_reference = refuse(Wrapped::Jwe(foreign_jwe.clone()));
    let provider_reference = refuse(provider(&foreign_jwe));
    assert!(
        jwe_reference.contains("not wrapped to any key"),
        "{jwe_reference}"
    );
    assert!(
        provider_reference.contains("does not open"),
        "{provider_reference}"
    );
    for (name, f) in &cases {
        let bad = with_encrypted_key(&jwe, f.as_ref());
        assert_eq!(refuse(Wrapped::Jwe(bad.clone())), jwe_reference, "{name}");
        assert_eq!(refuse(provider(&bad)), provider_reference, "{name}");
    }

    // The audited denials: two reasons in all, one per door.
    let denials = s
        .log
        .store()
        .query(&audit::Query {
            kind: Some(audit::EventKind::KeyDeny),
            limit: 100,
            ..audit::Query::default()
        })
        .unwrap()
        .events;
    assert_eq!(denials.len(), 2 + 2 * cases.len());
    let reasons: std::collections::BTreeSet<&str> =
        denials.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons
        .iter()
        .all(|r| !r.to_lowercase().contains("padding")));
}

/// The broker's running policy with two grant keys: `scheduler` trusted for acme,
/// `other` for globex; `scheduler` left out when `with_scheduler` is false (a rotation).
fn policy_with_grant_keys(
    scheduler: &str,
    other: &str,
    with_scheduler: bool,
) -> policy::deploy::DeploymentPolicy {
    let mut text = integration_tests::broker::POLICY.to_string();
    if with_scheduler {
        text.push_str(&format!(
            "\n[[grant_key]]\nid = \"scheduler\"\npublic_key = \"\"\"\n{scheduler}\"\"\"\ntenants = [\"acme\"]\n"
        ));
    }
    text.push_str(&format!(
        "\n[[grant_key]]\nid = \"other\"\npublic_key = \"\"\"\n{other}\"\"\"\ntenants = [\"globex\"]\n"
    ));
    policy::deploy::parse(&text, "policy.toml").unwrap()
}

/// With grant keys in its policy, the broker releases a key only under a placement
/// grant that verifies for the attested IPU and covers the release's tenant, function and
/// image, whatever the IPU asks; each refusal is audited with its reason code and the grant's
/// serial. A policy update that drops the signing key refuses its grants from then on.
#[test]
fn releases_need_a_grant_that_covers_them_for_the_attested_ipu() {
    use policy::grant::{Grant, ImageClaim};
    use std::time::SystemTime;
    let mut s = setup(Duration::from_secs(60));
    let (scheduler, scheduler_public) = integration_tests::ed25519_pem_pair();
    let (other, other_public) = integration_tests::ed25519_pem_pair();
    s.broker
        .set_policy(policy_with_grant_keys(
            &scheduler_public,
            &other_public,
            true,
        ))
        .unwrap();
    let session_key = SessionKey::generate();
    let (session, _) = s.attest(&session_key);
    let layer = enc_signed_layer();
    let now = SystemTime::now();
    let grant = |tenant: &str, change: &dyn Fn(&mut Grant)| {
        let mut g = Grant {
            version: 1,
            serial: policy::grant::new_serial().unwrap(),
            tenant: tenant.into(),
            function: "resize".into(),
            image: ImageClaim::Reference(layer.image.clone()),
            // The identity the broker enrolled this IPU under.
            ipu: "ipu-1".into(),
            host: "host-1.example".into(),
            not_before: now - Duration::from_secs(30),
            not_after: now + Duration::from_secs(600),
        };
        change(&mut g);
        g
    };
    let sign = |g: &Grant, key: &str| policy::grant::sign(g, key.as_bytes()).unwrap().0;
    let with_grant = |tenant: &str, function: &str, envelope: Option<String>| ReleaseRequest {
        function: function.into(),
        grant: envelope,
        ..request(&session.id, tenant)
    };
    let denied_with = |req: &ReleaseRequest, code: &str| {
        let err = s.broker.release(CLIENT, req).unwrap_err();
        assert!(
            matches!(&err, BrokerError::Grant { code: c, .. } if *c == code),
            "{code}: {err}"
        );
    };

    // Positive control: acme's grant, signed by the key trusted for acme, releases.
    let good = grant("acme", &|_| {});
    let envelope = sign(&good, &scheduler);
    s.broker
        .release(
            CLIENT,
            &with_grant("acme", "resize", Some(envelope.clone())),
        )
        .unwrap();
    // Again (another layer, a warm start): the broker does not count uses, the IPU does.
    s.broker
        .release(
            CLIENT,
            &with_grant("acme", "resize", Some(envelope.clone())),
        )
        .unwrap();

    denied_with(&with_grant("acme", "resize", None), "no-grant");
    // The grant does not cover the release: another function, another tenant.
    denied_with(
        &with_grant("acme", "thumbnail", Some(envelope.clone())),
        "request-mismatch",
    );
    let globex = sign(&grant("globex", &|_| {}), &other);
    denied_with(
        &with_grant("acme", "resize", Some(globex)),
        "request-mismatch",
    );
    // Signed by the key trusted only for globex, claiming acme.
    denied_with(
        &with_grant("acme", "resize", Some(sign(&good, &other))),
        "untrusted-signer",
    );
    // For another IPU; expired; for another image.
    type Change<'a> = &'a dyn Fn(&mut Grant);
    let cases: [(&str, Change); 3] = [
        ("wrong-ipu", &|g| g.ipu = "ipu-2".into()),
        ("expired", &|g| {
            g.not_before = now - Duration::from_secs(7200);
            g.not_after = now - Duration::from_secs(3600);
        }),
        ("wrong-image", &|g| {
            g.image = ImageClaim::Reference("oci:/elsewhere:enc".into())
        }),
    ];
    for (code, change) in cases {
        let envelope = sign(&grant("acme", change), &scheduler);
        denied_with(&with_grant("acme", "resize", Some(envelope)), code);
    }
    // A forged signature over the good grant.
    let mut forged: serde_json::Value = serde_json::from_str(&envelope).unwrap();
    let payload = forged["payload"].as_str().unwrap().to_string();
    let mut bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, payload).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    bytes = text.replace("resize", "resizX").into_bytes();
    forged["payload"] =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes).into();
    denied_with(
        &with_grant("acme", "resizX", Some(forged.to_string())),
        "bad-signature",
    );

    // A policy update drops the scheduler's key: its grants are refused from then on.
    s.broker
        .set_policy(policy_with_grant_keys(
            &scheduler_public,
            &other_public,
            false,
        ))
        .unwrap();
    denied_with(
        &with_grant("acme", "resize", Some(envelope.clone())),
        "unknown-signer",
    );

    // Audit: two releases and every denial carry the grant's serial where there was one,
    // and each denial its reason code.
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
    assert_eq!(releases.len(), 2);
    for r in &releases {
        assert_eq!(r.details["grant_serial"], good.serial);
    }
    let denials = q(audit::EventKind::KeyDeny);
    let codes: Vec<&str> = denials
        .iter()
        .map(|e| e.details["reason_code"].as_str())
        .collect();
    assert_eq!(
        codes,
        [
            "no-grant",
            "request-mismatch",
            "request-mismatch",
            "untrusted-signer",
            "wrong-ipu",
            "expired",
            "wrong-image",
            "bad-signature",
            "unknown-signer"
        ]
    );
    assert!(!denials[0].details.contains_key("grant_serial"));
    assert_eq!(denials[1].details["grant_serial"], good.serial);
    assert_eq!(denials[8].details["grant_serial"], good.serial);
}
