//! RSA-OAEP unwrapping gives a caller no oracle (RUSTSEC-2023-0071, Marvin; Bleichenbacher and
//! Manger style attacks): every malformed wrapped key (flipped bits, wrong length, a value not
//! below the modulus, zero, OAEP with another hash) is refused with exactly the error of a key
//! wrapped to someone else. The decryption itself is aws-lc's constant-time OAEP: the only RSA
//! private-key type `jwe::unwrap` takes is aws-lc's, and no crate of the product depends on the
//! variable-time `rsa` crate (checked below on the manifests).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ocicrypt::keys::{PrivateKey, PublicKey};
use ocicrypt::{jwe, ErrorClass};
use rsa::traits::PublicKeyParts;
use serde_json::Value;

const RSA_PRIV: &str = include_str!("../../tests/fixtures/keys/rsa-2048/priv.pem");
const RSA_PUB: &str = include_str!("../../tests/fixtures/keys/rsa-2048/pub.pem");

/// Replaces every `encrypted_key` in every JWE of an annotation with `f(old)`.
fn with_encrypted_key(annotation: &str, f: &dyn Fn(&[u8]) -> Vec<u8>) -> String {
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

/// A change made to a wrapped key.
type Mutation = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// Malformed variants of an RSA-2048 wrapped key, by name.
fn malformed(modulus: &[u8]) -> Vec<(&'static str, Mutation)> {
    let n = modulus.to_vec();
    let above = {
        let mut v = modulus.to_vec();
        *v.last_mut().unwrap() = v.last().unwrap().wrapping_add(1);
        v
    };
    let flip = |pos: usize, bit: u8| -> Mutation {
        Box::new(move |c: &[u8]| {
            let mut c = c.to_vec();
            let i = pos.min(c.len() - 1);
            c[i] ^= bit;
            c
        })
    };
    vec![
        ("first byte flipped", flip(0, 0x01)),
        ("top bit flipped", flip(0, 0x80)),
        ("middle byte flipped", flip(128, 0x10)),
        ("last byte flipped", flip(255, 0x01)),
        (
            "one byte short",
            Box::new(|c: &[u8]| c[..c.len() - 1].to_vec()),
        ),
        ("one byte long", Box::new(|c: &[u8]| [c, &[0]].concat())),
        (
            "leading zero added",
            Box::new(|c: &[u8]| [&[0], c].concat()),
        ),
        ("empty", Box::new(|_: &[u8]| Vec::new())),
        ("zero", Box::new(|c: &[u8]| vec![0; c.len()])),
        (
            "one",
            Box::new(|c: &[u8]| {
                let mut v = vec![0; c.len()];
                *v.last_mut().unwrap() = 1;
                v
            }),
        ),
        ("the modulus", Box::new(move |_: &[u8]| n.clone())),
        ("above the modulus", Box::new(move |_: &[u8]| above.clone())),
        ("all ones", Box::new(|c: &[u8]| vec![0xff; c.len()])),
    ]
}

fn modulus() -> Vec<u8> {
    use rsa::pkcs8::DecodePublicKey;
    rsa::RsaPublicKey::from_public_key_pem(RSA_PUB)
        .unwrap()
        .n()
        .to_bytes_be()
}

#[test]
fn malformed_oaep_ciphertexts_fail_exactly_like_a_wrong_key() {
    let key = PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap();
    let ours = jwe::wrap(b"{}", &[PublicKey::from_pem(RSA_PUB.as_bytes()).unwrap()]).unwrap();
    assert_eq!(
        &*jwe::unwrap(&ours, std::slice::from_ref(&key)).unwrap(),
        b"{}"
    );

    // The reference: a key wrapped to another RSA-2048 key.
    let other = PrivateKey::from_pem(
        ocicrypt::keys::generate_rsa_pkcs8_pem(2048)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let theirs = jwe::wrap(b"{}", &[other.public_key()]).unwrap();
    let wrong_key = jwe::unwrap(&theirs, std::slice::from_ref(&key)).unwrap_err();
    assert_eq!(wrong_key.class(), ErrorClass::NoKey, "{wrong_key}");

    let mut cases = malformed(&modulus());
    // Well-formed OAEP, but with SHA-256 instead of the SHA-1 that RSA-OAEP names.
    cases.push((
        "OAEP with SHA-256",
        Box::new(|_: &[u8]| {
            use rsa::pkcs8::DecodePublicKey;
            rsa::RsaPublicKey::from_public_key_pem(RSA_PUB)
                .unwrap()
                .encrypt(
                    &mut rand_core::OsRng,
                    rsa::Oaep::new::<sha2::Sha256>(),
                    &[7; 32],
                )
                .unwrap()
        }),
    ));
    // PKCS#1 v1.5 padding, the other RSA encryption scheme.
    cases.push((
        "PKCS#1 v1.5",
        Box::new(|_: &[u8]| {
            use rsa::pkcs8::DecodePublicKey;
            rsa::RsaPublicKey::from_public_key_pem(RSA_PUB)
                .unwrap()
                .encrypt(&mut rand_core::OsRng, rsa::Pkcs1v15Encrypt, &[7; 32])
                .unwrap()
        }),
    ));
    for (name, f) in &cases {
        let bad = with_encrypted_key(&ours, f.as_ref());
        let err = jwe::unwrap(&bad, std::slice::from_ref(&key)).unwrap_err();
        assert_eq!(err.class(), wrong_key.class(), "{name}: {err}");
        assert_eq!(err.to_string(), wrong_key.to_string(), "{name}");
        // Through the layer path as well (DecryptConfig), the same error.
        let dc =
            ocicrypt::DecryptConfig::new(vec![PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap()]);
        let mut ann = ocicrypt::Annotations::new();
        ann.insert(ocicrypt::ANNOTATION_KEYS_JWE.into(), bad);
        let err = ocicrypt::unwrap_private_options(&ann, &dc).unwrap_err();
        let mut ann = ocicrypt::Annotations::new();
        ann.insert(ocicrypt::ANNOTATION_KEYS_JWE.into(), theirs.clone());
        let reference = ocicrypt::unwrap_private_options(&ann, &dc).unwrap_err();
        assert_eq!(err.to_string(), reference.to_string(), "{name}");
    }
}

/// The JWE unwrap takes only aws-lc's key type for RSA: a compile-time check.
#[test]
fn the_rsa_private_key_is_aws_lcs() {
    let key = PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap();
    let rsa: &ocicrypt::keys::RsaOaepKey = key.as_rsa().expect("an RSA key");
    assert_eq!(rsa.bits(), 2048);
    assert!(!format!("{key:?} {rsa:?}").contains("BEGIN"));
    // PKCS#1 PEM goes to aws-lc as well.
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_pem(RSA_PRIV)
        .unwrap()
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let key1 = PrivateKey::from_pem(pkcs1.as_bytes()).unwrap();
    let ours = jwe::wrap(b"{}", &[key1.public_key()]).unwrap();
    assert_eq!(&*jwe::unwrap(&ours, &[key]).unwrap(), b"{}");
    // Keys under 2048 bits are refused.
    let small = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 1024)
        .unwrap()
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let err = PrivateKey::from_pem(small.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("2048"), "{err}");
}

/// No crate of the product has the variable-time `rsa` crate as a normal dependency (tests may
/// use it to make keys and ciphertexts): its private-key operations cannot be reached.
#[test]
fn no_product_crate_depends_on_the_rsa_crate() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members: Vec<&str> = workspace
        .split("members = [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap()
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
        .collect();
    assert!(members.contains(&"keybroker") && members.contains(&"ocicrypt"));
    for member in members {
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        let mut section = String::new();
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            let normal = section == "[dependencies]" || section.ends_with(".dependencies]");
            if normal && !section.contains("dev-") && !section.contains("build-") {
                let name = line.split(['=', '.', ' ']).next().unwrap_or("");
                assert_ne!(name, "rsa", "{member}/Cargo.toml has `rsa` under {section}");
            }
        }
    }
}
