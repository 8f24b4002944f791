//! Placement grants: a valid grant verifies with Ed25519 and P-256 keys, and
//! each way a grant can be wrong is refused with its own error.

use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use policy::deploy::{self, DeploymentPolicy};
use policy::dsse;
use policy::grant::{self, Expectation, Grant, GrantError, ImageClaim};
use ring::signature::KeyPair as _;

const D1: &str = "sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112";
const D2: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A signing key: its PKCS#8 PEM and its public key as a PEM string.
struct Key {
    private: String,
    public: String,
}

fn ed25519() -> Key {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    Key {
        private: pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref())),
        public: pem::encode(&pem::Pem::new(
            "PUBLIC KEY",
            dsse::ed25519_spki(kp.public_key().as_ref()),
        )),
    }
}

fn p256() -> Key {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    Key {
        private: pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref())),
        public: pem::encode(&pem::Pem::new(
            "PUBLIC KEY",
            dsse::p256_spki(kp.public_key().as_ref()),
        )),
    }
}

/// A policy with tenants acme (no scope grants) and labs (scope grants), and the given
/// grant keys as (id, key, tenants).
fn policy_with(keys: &[(&str, &Key, &str)]) -> DeploymentPolicy {
    let mut text = String::from(
        r#"schema = 1
image_trust_policy = "image-trust.json"

[[tenant]]
name = "acme"

[[tenant.function]]
name = "*"
images = ["docker://registry.example/acme/*"]

[[tenant]]
name = "labs"
grant_image_scopes = true

[[tenant.function]]
name = "*"
images = ["docker://registry.example/labs/*"]
"#,
    );
    for (id, key, tenants) in keys {
        text.push_str(&format!(
            "\n[[grant_key]]\nid = \"{id}\"\npublic_key = \"\"\"\n{}\"\"\"\ntenants = {tenants}\n",
            key.public
        ));
    }
    deploy::parse(&text, "test.toml").unwrap()
}

fn t0() -> SystemTime {
    grant::parse_time("2026-12-04T21:00:00Z").unwrap()
}

fn grant_for(tenant: &str, image: ImageClaim) -> Grant {
    Grant {
        version: 1,
        serial: "0123456789abcdef0123456789abcdef".into(),
        tenant: tenant.into(),
        function: "resize-hd".into(),
        image,
        ipu: "ipu-0042".into(),
        host: "Worker-7.example".into(),
        not_before: t0(),
        not_after: t0() + Duration::from_secs(600),
    }
}

const IMAGE: &str = "docker://registry.example/acme/resize-hd:1";

fn acme() -> Grant {
    grant_for("acme", ImageClaim::Reference(IMAGE.into()))
}

fn expect(image: &str) -> Expectation<'_> {
    Expectation {
        ipu: "ipu-0042",
        host: Some("worker-7.example"),
        image,
        now: t0() + Duration::from_secs(60),
    }
}

fn sign(g: &Grant, key: &Key) -> String {
    grant::sign(g, key.private.as_bytes()).unwrap().0
}

fn refusal(envelope: &str, policy: &DeploymentPolicy, e: &Expectation<'_>) -> GrantError {
    grant::verify(envelope.as_bytes(), policy, e).unwrap_err()
}

#[test]
fn a_valid_grant_verifies_with_ed25519_and_p256() {
    for key in [ed25519(), p256()] {
        let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
        assert!(policy.grants_required());
        let (envelope, keyid) = grant::sign(&acme(), key.private.as_bytes()).unwrap();
        let v = grant::verify(envelope.as_bytes(), &policy, &expect(IMAGE)).unwrap();
        assert_eq!(v.tenant(), "acme");
        assert_eq!(v.function(), "resize-hd");
        assert_eq!(v.serial(), "0123456789abcdef0123456789abcdef");
        assert_eq!(v.not_after(), t0() + Duration::from_secs(600));
        assert_eq!(v.image(), &ImageClaim::Reference(IMAGE.into()));
        assert_eq!(v.signer_id, "cp-1");
        assert_eq!(v.signer_keyid, keyid);
        assert!(keyid.starts_with("sha256:") && keyid.len() == 7 + 64);
        // The same reference written differently is the same image.
        let v = grant::verify(
            envelope.as_bytes(),
            &policy,
            &Expectation {
                host: None,
                ..expect(IMAGE)
            },
        );
        assert!(v.is_ok(), "{v:?}");
    }
}

#[test]
fn a_policy_without_grant_keys_does_not_require_grants() {
    assert!(!policy_with(&[]).grants_required());
}

#[test]
fn a_tampered_payload_is_a_bad_signature() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
    let envelope = sign(&acme(), &key);
    let mut env: serde_json::Value = serde_json::from_str(&envelope).unwrap();
    let mut payload = B64.decode(env["payload"].as_str().unwrap()).unwrap();
    let at = payload.windows(4).position(|w| w == b"ipu-").unwrap();
    payload[at + 4] = b'9'; // ipu-0042 -> ipu-9042
    env["payload"] = B64.encode(&payload).into();
    let e = refusal(&env.to_string(), &policy, &expect(IMAGE));
    assert!(
        matches!(e, GrantError::BadSignature(ref k) if k == "cp-1"),
        "{e}"
    );
    assert_eq!(e.reason_code(), "bad-signature");
}

#[test]
fn a_grant_signed_by_an_unknown_key_is_refused() {
    let (trusted, other) = (ed25519(), p256());
    let policy = policy_with(&[("cp-1", &trusted, r#"["*"]"#)]);
    let e = refusal(&sign(&acme(), &other), &policy, &expect(IMAGE));
    assert!(matches!(e, GrantError::UnknownSigner(_)), "{e}");
    assert_eq!(e.reason_code(), "unknown-signer");
}

#[test]
fn a_key_trusted_for_another_tenant_is_refused() {
    let key = p256();
    let policy = policy_with(&[("labs-cp", &key, r#"["labs"]"#)]);
    let e = refusal(&sign(&acme(), &key), &policy, &expect(IMAGE));
    assert_eq!(
        e,
        GrantError::UntrustedSigner {
            key: "labs-cp".into(),
            tenant: "acme".into()
        }
    );
    assert_eq!(e.reason_code(), "untrusted-signer");
}

#[test]
fn a_grant_for_a_tenant_not_in_the_policy_is_refused() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
    let g = grant_for("nobody", ImageClaim::Reference(IMAGE.into()));
    let e = refusal(&sign(&g, &key), &policy, &expect(IMAGE));
    assert_eq!(e, GrantError::UnknownTenant("nobody".into()));
}

#[test]
fn the_validity_window_is_enforced_with_a_small_skew() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let envelope = sign(&acme(), &key);
    let at = |now: SystemTime| Expectation {
        now,
        ..expect(IMAGE)
    };
    // Within the skew on both ends: accepted.
    for now in [
        t0() - Duration::from_secs(59),
        t0() + Duration::from_secs(600 + 59),
    ] {
        assert!(grant::verify(envelope.as_bytes(), &policy, &at(now)).is_ok());
    }
    let e = refusal(&envelope, &policy, &at(t0() - Duration::from_secs(61)));
    assert!(matches!(e, GrantError::NotYetValid { .. }), "{e}");
    assert_eq!(e.reason_code(), "not-yet-valid");
    let e = refusal(&envelope, &policy, &at(t0() + Duration::from_secs(660)));
    assert!(matches!(e, GrantError::Expired { .. }), "{e}");
    assert_eq!(e.reason_code(), "expired");
    assert!(e.to_string().contains("2026-12-04T21:10:00Z"), "{e}");
}

#[test]
fn a_window_longer_than_a_day_is_refused_at_signing_and_at_verification() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let mut g = acme();
    g.not_after = g.not_before + grant::MAX_VALIDITY + Duration::from_secs(1);
    let e = grant::sign(&g, key.private.as_bytes()).unwrap_err();
    assert!(e.0.contains("longer than"), "{e}");
    // A signer that does not check: sign the payload directly.
    let payload = serde_json::to_vec(&g).unwrap();
    let (envelope, _) =
        dsse::sign(grant::PAYLOAD_TYPE, &payload, key.private.as_bytes(), false).unwrap();
    let e = refusal(&envelope, &policy, &expect(IMAGE));
    assert!(matches!(e, GrantError::BadWindow(_)), "{e}");
    assert_eq!(e.reason_code(), "bad-window");
    // An inverted window too.
    g.not_after = g.not_before - Duration::from_secs(1);
    let payload = serde_json::to_vec(&g).unwrap();
    let (envelope, _) =
        dsse::sign(grant::PAYLOAD_TYPE, &payload, key.private.as_bytes(), false).unwrap();
    assert!(matches!(
        refusal(&envelope, &policy, &expect(IMAGE)),
        GrantError::BadWindow(_)
    ));
}

#[test]
fn the_wrong_ipu_is_refused() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let e = refusal(
        &sign(&acme(), &key),
        &policy,
        &Expectation {
            ipu: "ipu-0043",
            ..expect(IMAGE)
        },
    );
    assert!(matches!(e, GrantError::WrongIpu { .. }), "{e}");
    assert_eq!(e.reason_code(), "wrong-ipu");
}

#[test]
fn the_wrong_host_is_refused_dns_names_ignore_case_uris_do_not() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let envelope = sign(&acme(), &key);
    let host = |h| Expectation {
        host: Some(h),
        ..expect(IMAGE)
    };
    assert!(grant::verify(envelope.as_bytes(), &policy, &host("WORKER-7.EXAMPLE")).is_ok());
    let e = refusal(&envelope, &policy, &host("worker-8.example"));
    assert!(matches!(e, GrantError::WrongHost { .. }), "{e}");
    assert_eq!(e.reason_code(), "wrong-host");
    let mut g = acme();
    g.host = "spiffe://example/host/worker-7".into();
    let envelope = sign(&g, &key);
    assert!(grant::verify(
        envelope.as_bytes(),
        &policy,
        &host("spiffe://example/host/worker-7")
    )
    .is_ok());
    let e = refusal(&envelope, &policy, &host("spiffe://example/host/Worker-7"));
    assert!(matches!(e, GrantError::WrongHost { .. }), "{e}");
}

#[test]
fn the_wrong_image_is_refused() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let envelope = sign(&acme(), &key);
    for other in [
        "docker://registry.example/acme/resize-hd:2",
        "docker://registry.example/acme/resize-sd:1",
        "not a reference",
    ] {
        let e = refusal(&envelope, &policy, &expect(other));
        assert!(matches!(e, GrantError::WrongImage { .. }), "{other}: {e}");
        assert_eq!(e.reason_code(), "wrong-image");
    }
}

#[test]
fn references_compare_in_canonical_form() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let g = grant_for("acme", ImageClaim::Reference("docker://busybox".into()));
    let envelope = sign(&g, &key);
    assert!(grant::verify(
        envelope.as_bytes(),
        &policy,
        &expect("docker://docker.io/library/busybox:latest")
    )
    .is_ok());
}

#[test]
fn a_digest_grant_needs_the_request_pinned_by_that_digest() {
    let key = p256();
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let envelope = sign(&grant_for("acme", ImageClaim::Digest(D1.into())), &key);
    let pinned = format!("docker://registry.example/acme/resize-hd@{D1}");
    assert!(grant::verify(envelope.as_bytes(), &policy, &expect(&pinned)).is_ok());
    let tagged_and_pinned = format!("docker://registry.example/acme/resize-hd:1@{D1}");
    assert!(grant::verify(envelope.as_bytes(), &policy, &expect(&tagged_and_pinned)).is_ok());
    let other = format!("docker://registry.example/acme/resize-hd@{D2}");
    for requested in [IMAGE, other.as_str()] {
        let e = refusal(&envelope, &policy, &expect(requested));
        assert!(matches!(e, GrantError::WrongImage { .. }), "{e}");
    }
}

#[test]
fn scope_grants_only_for_tenants_that_allow_them() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
    let scope = |tenant: &str, s: &str| sign(&grant_for(tenant, ImageClaim::Scope(s.into())), &key);
    let e = refusal(
        &scope("acme", "docker://registry.example/acme/*"),
        &policy,
        &expect(IMAGE),
    );
    assert!(matches!(e, GrantError::ScopeNotAllowed { .. }), "{e}");
    assert_eq!(e.reason_code(), "scope-not-allowed");
    let labs = scope("labs", "docker://registry.example/labs/*");
    assert!(grant::verify(
        labs.as_bytes(),
        &policy,
        &expect("docker://registry.example/labs/x:1")
    )
    .is_ok());
    let e = refusal(&labs, &policy, &expect(IMAGE));
    assert!(matches!(e, GrantError::WrongImage { .. }), "{e}");
}

#[test]
fn a_rotated_out_key_no_longer_signs_grants() {
    let (old, new) = (ed25519(), p256());
    let before = policy_with(&[("cp-2026", &old, r#"["*"]"#)]);
    let after = policy_with(&[("cp-2027", &new, r#"["*"]"#)]);
    let envelope = sign(&acme(), &old);
    assert!(grant::verify(envelope.as_bytes(), &before, &expect(IMAGE)).is_ok());
    let e = refusal(&envelope, &after, &expect(IMAGE));
    assert!(matches!(e, GrantError::UnknownSigner(_)), "{e}");
    assert!(grant::verify(sign(&acme(), &new).as_bytes(), &after, &expect(IMAGE)).is_ok());
}

#[test]
fn malformed_envelopes_are_refused() {
    let key = ed25519();
    let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
    let envelope: serde_json::Value = serde_json::from_str(&sign(&acme(), &key)).unwrap();
    let mut wrong_type = envelope.clone();
    wrong_type["payloadType"] = "application/vnd.ipu.policy-bundle.v1+json".into();
    let mut unsigned = envelope.clone();
    unsigned["signatures"] = serde_json::json!([]);
    let mut extra = envelope.clone();
    extra["extra"] = 1.into();
    let mut not_base64 = envelope.clone();
    not_base64["payload"] = "%%%".into();
    for (what, text, code) in [
        ("not JSON", "not json".to_string(), "malformed"),
        ("wrong payload type", wrong_type.to_string(), "malformed"),
        ("unknown field", extra.to_string(), "malformed"),
        ("payload not base64", not_base64.to_string(), "malformed"),
        ("no signatures", unsigned.to_string(), "unsigned"),
    ] {
        let e = refusal(&text, &policy, &expect(IMAGE));
        assert_eq!(e.reason_code(), code, "{what}: {e}");
    }
    // A payload that is signed but not a grant.
    let (envelope, _) = dsse::sign(
        grant::PAYLOAD_TYPE,
        br#"{"version":1,"serial":"x"}"#,
        key.private.as_bytes(),
        false,
    )
    .unwrap();
    assert!(matches!(
        refusal(&envelope, &policy, &expect(IMAGE)),
        GrantError::Malformed(_)
    ));
    // A payload with an unknown field.
    let mut v = serde_json::to_value(acme()).unwrap();
    v["tenants"] = "labs".into();
    let (envelope, _) = dsse::sign(
        grant::PAYLOAD_TYPE,
        v.to_string().as_bytes(),
        key.private.as_bytes(),
        false,
    )
    .unwrap();
    assert!(matches!(
        refusal(&envelope, &policy, &expect(IMAGE)),
        GrantError::Malformed(_)
    ));
}

#[test]
fn grants_are_validated_before_signing() {
    let key = ed25519();
    let mut cases = Vec::new();
    let mut g = acme();
    g.serial = "short".into();
    cases.push((g, "serial"));
    let mut g = acme();
    g.tenant = "a b".into();
    cases.push((g, "tenant"));
    let mut g = acme();
    g.image = ImageClaim::Digest("sha256:abc".into());
    cases.push((g, "image digest"));
    let mut g = acme();
    g.image = ImageClaim::Scope("registry.example/*".into());
    cases.push((g, "image scope"));
    for (g, field) in cases {
        let e = grant::sign(&g, key.private.as_bytes()).unwrap_err();
        assert!(e.0.contains(field), "{field}: {e}");
    }
}

#[test]
fn sec1_ec_private_keys_sign_grants() {
    let key = p256();
    let der = pem::parse(&key.private).unwrap().into_contents();
    // ring's PKCS#8 for P-256: the SEC1 ECPrivateKey is the last OCTET STRING's content.
    let sec1 = &der[3 + 3 + 21 + 2..];
    let sec1_pem = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1));
    let policy = policy_with(&[("cp-1", &key, r#"["acme"]"#)]);
    let (envelope, _) = grant::sign(&acme(), sec1_pem.as_bytes()).unwrap();
    assert!(grant::verify(envelope.as_bytes(), &policy, &expect(IMAGE)).is_ok());
}

#[test]
fn grant_keys_in_the_policy_are_checked_with_positions() {
    let key = ed25519();
    let base = "schema = 1\nimage_trust_policy = \"t.json\"\n[[tenant]]\nname = \"acme\"\n";
    let bad = [
        (
            format!(
                "[[grant_key]]\nid = \"k\"\npublic_key = \"\"\"\n{}\"\"\"\ntenants = [\"nobody\"]\n",
                key.public
            ),
            "unknown tenant \"nobody\"",
        ),
        (
            "[[grant_key]]\nid = \"k\"\npublic_key = \"not pem\"\ntenants = [\"acme\"]\n".into(),
            "public_key is not usable",
        ),
        (
            format!(
                "[[grant_key]]\nid = \"k\"\npublic_key = \"\"\"\n{0}\"\"\"\ntenants = [\"*\"]\n[[grant_key]]\nid = \"k\"\npublic_key = \"\"\"\n{0}\"\"\"\ntenants = [\"*\"]\n",
                key.public
            ),
            "listed twice",
        ),
        (
            format!(
                "[[grant_key]]\nid = \"k\"\npublic_key = \"\"\"\n{}\"\"\"\ntenants = [\"*\"]\nscope = 1\n",
                key.public
            ),
            "unknown field `scope`",
        ),
        (
            format!(
                "[[grant_key]]\nid = \"k\"\npublic_key = \"\"\"\n{}\"\"\"\ntenants = [\"*\", \"acme\"]\n",
                key.public
            ),
            "must be the only entry",
        ),
    ];
    for (extra, message) in bad {
        let e = deploy::parse(&format!("{base}{extra}"), "d.toml").unwrap_err();
        let text = e.to_string();
        assert!(text.contains(message), "{text}");
        assert!(text.starts_with("d.toml:"), "{text}");
        assert!(e.problems[0].line > 4, "{text}");
    }
    // A P-384 key is not a grant key.
    let p384 = "-----BEGIN PUBLIC KEY-----\nMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAESXqHYOkNKEB5+FFbUG42p5u+N2/kDXOL\neQ6QOQW4im9Tzwr+GWEbPjdGtXD2Ibr+iAuhbuAQANOcdw5dHI082EObYiLUhAez\nn2aGiR5osTw0e+eWqOKzWMMIGd88yVBG\n-----END PUBLIC KEY-----\n";
    let e = deploy::parse(
        &format!(
            "{base}[[grant_key]]\nid = \"k\"\npublic_key = \"\"\"\n{p384}\"\"\"\ntenants = [\"*\"]\n"
        ),
        "d.toml",
    )
    .unwrap_err();
    assert!(e.to_string().contains("ecdsa-p384"), "{e}");
}

mod arbitrary {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Arbitrary bytes never verify and never panic.
        #[test]
        fn arbitrary_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let key = ed25519();
            let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
            prop_assert!(grant::verify(&bytes, &policy, &expect(IMAGE)).is_err());
            let _ = grant::inspect(&bytes);
        }

        /// Whatever a trusted key signs, verification decides without panicking, and a
        /// payload that is not a valid grant is refused as malformed.
        #[test]
        fn signed_junk_is_malformed(payload in "\\PC{0,200}") {
            let key = ed25519();
            let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
            let (envelope, _) = dsse::sign(
                grant::PAYLOAD_TYPE,
                payload.as_bytes(),
                key.private.as_bytes(),
                false,
            )
            .unwrap();
            let e = grant::verify(envelope.as_bytes(), &policy, &expect(IMAGE)).unwrap_err();
            prop_assert_eq!(e.reason_code(), "malformed");
        }

        /// Flipping any byte of a signed envelope never yields a different accepted grant.
        #[test]
        fn flipped_bytes_never_verify_as_another_grant(at in 0usize..2048, bit in 0u8..8) {
            let key = ed25519();
            let policy = policy_with(&[("cp-1", &key, r#"["*"]"#)]);
            let mut bytes = sign(&acme(), &key).into_bytes();
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            if let Ok(v) = grant::verify(&bytes, &policy, &expect(IMAGE)) {
                // Only changes outside the signed content (e.g. JSON whitespace) may pass.
                prop_assert_eq!(v.grant, acme());
            }
        }
    }
}

#[test]
fn grants_outside_representable_times_are_refused_at_signing() {
    let key = ed25519();
    let mut g = acme();
    g.not_before = SystemTime::UNIX_EPOCH - Duration::from_secs(10);
    g.not_after = g.not_before + Duration::from_secs(60);
    let e = grant::sign(&g, key.private.as_bytes()).unwrap_err();
    assert!(e.0.contains("between 1970 and 9999"), "{e}");
}
