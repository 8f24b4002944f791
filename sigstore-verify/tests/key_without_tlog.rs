//! A bundle signed with a key and no transparency log entry (cosign `sign --key
//! --tlog-upload=false`): verified only when the policy says no log entry is needed.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use sha2::{Digest, Sha256};
use sigstore_verify::verify::VerifyError;
use sigstore_verify::{
    verify_json, Artifact, Policy, PublicKey, SignatureFormat, Signer, TrustedRoot,
};

fn keypair() -> (EcdsaKeyPair, PublicKey) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // SPKI for a P-256 point: the fixed prefix plus the uncompressed point.
    let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
    spki.extend_from_slice(kp.public_key().as_ref());
    let key = PublicKey::from_spki_der(&spki).unwrap();
    (kp, key)
}

fn dsse_bundle(kp: &EcdsaKeyPair, artifact_digest: &[u8]) -> String {
    let statement = serde_json::json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "sha256:x", "digest": {"sha256": hex::encode(artifact_digest)}}],
        "predicateType": "https://sigstore.dev/cosign/sign/v1",
        "predicate": {}
    })
    .to_string();
    let pae = sigstore_verify::dsse::pae("application/vnd.in-toto+json", statement.as_bytes());
    let sig = kp.sign(&SystemRandom::new(), &pae).unwrap();
    serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": "abc"}},
        "dsseEnvelope": {
            "payload": B64.encode(statement.as_bytes()),
            "payloadType": "application/vnd.in-toto+json",
            "signatures": [{"sig": B64.encode(sig.as_ref()), "keyid": ""}]
        }
    })
    .to_string()
}

#[test]
fn key_signed_bundle_without_tlog() {
    let (kp, key) = keypair();
    let manifest = b"an OCI manifest";
    let digest: [u8; 32] = Sha256::digest(manifest).into();
    let bundle = dsse_bundle(&kp, &digest);
    let root = TrustedRoot::public_good();

    let v = verify_json(
        &bundle,
        Artifact::Sha256(digest),
        &Policy::key(key.clone()).without_tlog(),
        &root,
    )
    .unwrap();
    assert!(matches!(v.format, SignatureFormat::Dsse { .. }));
    assert!(
        matches!(&v.signer, Signer::Key { key_id, hint: Some(h) } if *key_id == hex::encode(key.key_id()) && h == "abc")
    );
    assert!(v.tlog_entries.is_empty());

    // The default key policy requires a log entry.
    let err = verify_json(
        &bundle,
        Artifact::Sha256(digest),
        &Policy::key(key.clone()),
        &root,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::TooFewTlogEntries {
                found: 0,
                required: 1,
                ..
            }
        ),
        "{err}"
    );

    // Another artifact, or another key, is refused.
    let other: [u8; 32] = Sha256::digest(b"other").into();
    assert!(verify_json(
        &bundle,
        Artifact::Sha256(other),
        &Policy::key(key).without_tlog(),
        &root
    )
    .is_err());
    let (_, other_key) = keypair();
    assert!(verify_json(
        &bundle,
        Artifact::Sha256(digest),
        &Policy::key(other_key).without_tlog(),
        &root
    )
    .is_err());
}

#[test]
fn message_signature_over_a_digest_only() {
    let (kp, key) = keypair();
    let artifact = b"hello";
    let digest: [u8; 32] = Sha256::digest(artifact).into();
    let sig = kp.sign(&SystemRandom::new(), artifact).unwrap();
    let bundle = serde_json::json!({
        "mediaType": "application/vnd.dev.sigstore.bundle+json;version=0.3",
        "verificationMaterial": {"publicKey": {}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": B64.encode(digest)},
            "signature": B64.encode(sig.as_ref())
        }
    })
    .to_string();
    let root = TrustedRoot::public_good();
    let policy = Policy::key(key).without_tlog();
    verify_json(&bundle, Artifact::Bytes(artifact), &policy, &root).unwrap();
    verify_json(&bundle, Artifact::Sha256(digest), &policy, &root).unwrap();
    assert!(verify_json(&bundle, Artifact::Bytes(b"hellO"), &policy, &root).is_err());
}
