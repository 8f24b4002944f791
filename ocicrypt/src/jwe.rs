//! JWE (RFC 7516) as Go ocicrypt writes it through go-jose: JSON serialization (flattened or
//! general), recipients `RSA-OAEP` (SHA-1) and `ECDH-ES+A256KW` (P-256/384/521), content
//! encryption `A256GCM`. The annotation value is a comma-separated list of standard-base64 JWEs.
//!
//! RSA-OAEP is aws-lc's constant-time implementation (see [`crate::keys::RsaOaepKey`]); the
//! rest is hand-written on RustCrypto primitives rather than a JOSE crate: the JOSE crates on
//! crates.io either lack ECDH-ES key agreement with a *static* private key on all three curves
//! or pull in OpenSSL, and the subset ocicrypt needs is small and fixed.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::{PrivateKey, PrivateKind, PublicKey, PublicKind};
use crate::Error;

/// Upper bound on one annotation (all JWEs); private options are tiny.
const MAX_ANNOTATION_LEN: usize = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonJwe {
    protected: Option<String>,
    unprotected: Option<Map<String, Value>>,
    // Flattened form.
    header: Option<Map<String, Value>>,
    // Flattened form, or go-jose's stray copy in general form.
    encrypted_key: Option<String>,
    recipients: Option<Vec<Recipient>>,
    aad: Option<String>,
    iv: String,
    ciphertext: String,
    tag: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipient {
    header: Option<Map<String, Value>>,
    encrypted_key: Option<String>,
}

fn b64u(field: &str, s: &str) -> Result<Vec<u8>, Error> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| Error::MalformedJwe(format!("{field} is not base64url: {e}")))
}

/// Unwraps the private options from a `keys.jwe` annotation with any of `keys`.
///
/// Tries every JWE in the list, every recipient, every key. The error for "nothing matched"
/// lists the recipient algorithms seen, so an operator can tell a wrong key from a wrong scheme.
pub fn unwrap(annotation: &str, keys: &[PrivateKey]) -> Result<Zeroizing<Vec<u8>>, Error> {
    if annotation.len() > MAX_ANNOTATION_LEN {
        return Err(Error::MalformedJwe("annotation larger than 1 MiB".into()));
    }
    if keys.is_empty() {
        return Err(Error::NoKey("no decryption keys are configured".into()));
    }
    let mut seen = Vec::new();
    for (i, item) in annotation.split(',').enumerate() {
        let json = STANDARD
            .decode(item.trim())
            .map_err(|e| Error::MalformedJwe(format!("JWE #{i} is not standard base64: {e}")))?;
        let jwe: JsonJwe = serde_json::from_slice(&json)
            .map_err(|e| Error::MalformedJwe(format!("JWE #{i} is not a JWE JSON object: {e}")))?;
        // A malformed or unsupported JWE anywhere in the list is an error, not a skip: the
        // annotation is publisher data and must be well formed as a whole.
        if let Some(plain) = unwrap_one(&jwe, keys, &mut seen)? {
            return Ok(plain);
        }
    }
    Err(Error::NoKey(format!(
        "none of the {} configured key(s) ({}) opens any recipient (recipients: {})",
        keys.len(),
        keys.iter()
            .map(|k| k.algorithm())
            .collect::<Vec<_>>()
            .join(", "),
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    )))
}

/// A recipient's unprotected header and wrapped key, whichever serialization held them.
type RecipientView<'a> = (Option<&'a Map<String, Value>>, Option<&'a String>);

fn unwrap_one(
    jwe: &JsonJwe,
    keys: &[PrivateKey],
    seen: &mut Vec<String>,
) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
    let protected_b64 = jwe.protected.clone().unwrap_or_default();
    let protected: Map<String, Value> = if protected_b64.is_empty() {
        Map::new()
    } else {
        serde_json::from_slice(&b64u("protected", &protected_b64)?)
            .map_err(|e| Error::MalformedJwe(format!("protected header is not JSON: {e}")))?
    };
    let recipients: Vec<RecipientView<'_>> = match &jwe.recipients {
        Some(list) => list
            .iter()
            .map(|r| (r.header.as_ref(), r.encrypted_key.as_ref()))
            .collect(),
        None => vec![(jwe.header.as_ref(), jwe.encrypted_key.as_ref())],
    };
    let iv = b64u("iv", &jwe.iv)?;
    let tag = b64u("tag", &jwe.tag)?;
    let ciphertext = b64u("ciphertext", &jwe.ciphertext)?;
    if iv.len() != 12 {
        return Err(Error::MalformedJwe(format!(
            "iv is {} bytes, A256GCM needs 12",
            iv.len()
        )));
    }
    if tag.len() != 16 {
        return Err(Error::MalformedJwe(format!(
            "tag is {} bytes, A256GCM needs 16",
            tag.len()
        )));
    }
    let mut aad = protected_b64.clone().into_bytes();
    if let Some(extra) = &jwe.aad {
        aad.push(b'.');
        aad.extend_from_slice(extra.as_bytes());
    }

    for (header, encrypted_key) in recipients {
        let mut merged = protected.clone();
        for extra in [jwe.unprotected.as_ref(), header].into_iter().flatten() {
            for (k, v) in extra {
                merged.insert(k.clone(), v.clone());
            }
        }
        let alg = merged
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let enc = merged.get("enc").and_then(Value::as_str).unwrap_or("");
        if enc != "A256GCM" {
            return Err(Error::Unsupported(format!(
                "JWE content encryption {enc:?} (only A256GCM)"
            )));
        }
        if merged.contains_key("zip") {
            return Err(Error::Unsupported("compressed JWE (zip)".into()));
        }
        if alg != "RSA-OAEP" && alg != "ECDH-ES+A256KW" {
            return Err(Error::Unsupported(format!(
                "JWE key management algorithm {alg:?} (supported: RSA-OAEP, ECDH-ES+A256KW)"
            )));
        }
        seen.push(alg.clone());
        let wrapped = match encrypted_key {
            Some(k) => b64u("encrypted_key", k)?,
            None => {
                return Err(Error::MalformedJwe(
                    "recipient without encrypted_key".into(),
                ))
            }
        };
        for key in keys {
            let cek = match (alg.as_str(), &key.0) {
                // aws-lc's constant-time OAEP: every failure is the same `None` and moves on
                // to the next key, so a bad padding ends in the same error as a wrong key.
                ("RSA-OAEP", PrivateKind::Rsa(k)) => match k.unwrap_cek(&wrapped) {
                    Some(cek) => cek,
                    None => continue,
                },
                ("ECDH-ES+A256KW", _) => match ecdh_unwrap(&merged, key, &wrapped)? {
                    Some(cek) => cek,
                    None => continue,
                },
                _ => continue,
            };
            if cek.len() != 32 {
                return Err(Error::MalformedJwe(format!(
                    "content key is {} bytes, A256GCM needs 32",
                    cek.len()
                )));
            }
            let cipher = Aes256Gcm::new_from_slice(&cek).expect("32-byte key");
            let mut plain = Zeroizing::new(ciphertext.clone());
            cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&iv),
                    &aad,
                    &mut plain,
                    Tag::from_slice(&tag),
                )
                .map_err(|_| {
                    Error::Integrity("JWE authentication tag does not match (tampered JWE)".into())
                })?;
            return Ok(Some(plain));
        }
    }
    Ok(None)
}

/// ECDH-ES+A256KW unwrap with a static private key; `None` when the curve does not match the key.
fn ecdh_unwrap(
    header: &Map<String, Value>,
    key: &PrivateKey,
    wrapped: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
    let epk = header
        .get("epk")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::MalformedJwe("ECDH-ES recipient without epk".into()))?;
    let field = |name: &str| -> Result<Vec<u8>, Error> {
        let s = epk
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::MalformedJwe(format!("epk without {name}")))?;
        b64u(&format!("epk.{name}"), s)
    };
    if epk.get("kty").and_then(Value::as_str) != Some("EC") {
        return Err(Error::Unsupported("epk key type other than EC".into()));
    }
    let crv = epk.get("crv").and_then(Value::as_str).unwrap_or("");
    let (x, y) = (field("x")?, field("y")?);
    let point = |len: usize| -> Result<Vec<u8>, Error> {
        if x.len() != len || y.len() != len {
            return Err(Error::MalformedJwe(format!(
                "epk coordinates are not {len} bytes for {crv}"
            )));
        }
        let mut p = vec![4u8];
        p.extend_from_slice(&x);
        p.extend_from_slice(&y);
        Ok(p)
    };
    let bad_point = |_| Error::MalformedJwe(format!("epk is not a point on {crv}"));
    let z: Zeroizing<Vec<u8>> = match (crv, &key.0) {
        ("P-256", PrivateKind::P256(k)) => {
            let pk = p256::PublicKey::from_sec1_bytes(&point(32)?).map_err(bad_point)?;
            let shared = p256::ecdh::diffie_hellman(k.to_nonzero_scalar(), pk.as_affine());
            Zeroizing::new(shared.raw_secret_bytes().to_vec())
        }
        ("P-384", PrivateKind::P384(k)) => {
            let pk = p384::PublicKey::from_sec1_bytes(&point(48)?).map_err(bad_point)?;
            let shared = p384::ecdh::diffie_hellman(k.to_nonzero_scalar(), pk.as_affine());
            Zeroizing::new(shared.raw_secret_bytes().to_vec())
        }
        ("P-521", PrivateKind::P521(k)) => {
            let pk = p521::PublicKey::from_sec1_bytes(&point(66)?).map_err(bad_point)?;
            let shared = p521::ecdh::diffie_hellman(k.to_nonzero_scalar(), pk.as_affine());
            Zeroizing::new(shared.raw_secret_bytes().to_vec())
        }
        ("P-256" | "P-384" | "P-521", _) => return Ok(None),
        (other, _) => return Err(Error::Unsupported(format!("epk curve {other:?}"))),
    };
    let apu = match header.get("apu").and_then(Value::as_str) {
        Some(s) => b64u("apu", s)?,
        None => Vec::new(),
    };
    let apv = match header.get("apv").and_then(Value::as_str) {
        Some(s) => b64u("apv", s)?,
        None => Vec::new(),
    };
    let kek = concat_kdf(&z, "ECDH-ES+A256KW", &apu, &apv);
    let kw = aes_kw::KekAes256::new(kek.as_slice().into());
    match kw.unwrap_vec(wrapped) {
        Ok(cek) => Ok(Some(Zeroizing::new(cek))),
        // The key agreement was for another recipient's key.
        Err(_) => Ok(None),
    }
}

/// Concat KDF (NIST SP 800-56A, RFC 7518 section 4.6.2) for a 256-bit key: one SHA-256 round.
fn concat_kdf(z: &[u8], alg: &str, apu: &[u8], apv: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(1u32.to_be_bytes());
    h.update(z);
    for part in [alg.as_bytes(), apu, apv] {
        h.update((part.len() as u32).to_be_bytes());
        h.update(part);
    }
    h.update(256u32.to_be_bytes());
    Zeroizing::new(h.finalize().into())
}

#[derive(Serialize)]
struct FlatJwe<'a> {
    protected: &'a str,
    encrypted_key: String,
    iv: String,
    ciphertext: String,
    tag: String,
}

/// Wraps `plaintext` (the private options JSON) to every recipient: one flattened JWE per
/// recipient, standard-base64 encoded and comma-joined, which Go ocicrypt reads as a list.
pub fn wrap(plaintext: &[u8], recipients: &[PublicKey]) -> Result<String, Error> {
    if recipients.is_empty() {
        return Err(Error::NoKey("no JWE recipients given".into()));
    }
    let mut out = Vec::with_capacity(recipients.len());
    for recipient in recipients {
        let mut cek = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(cek.as_mut());
        let (protected, encrypted_key) = wrap_cek(&cek, recipient)?;
        let protected_b64 = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&protected).expect("json"));
        let mut iv = [0u8; 12];
        OsRng.fill_bytes(&mut iv);
        let cipher = Aes256Gcm::new_from_slice(cek.as_ref()).expect("32-byte key");
        let mut buf = plaintext.to_vec();
        let tag = cipher
            .encrypt_in_place_detached(Nonce::from_slice(&iv), protected_b64.as_bytes(), &mut buf)
            .map_err(|_| Error::Key("AES-GCM encryption failed".into()))?;
        let jwe = FlatJwe {
            protected: &protected_b64,
            encrypted_key: URL_SAFE_NO_PAD.encode(encrypted_key),
            iv: URL_SAFE_NO_PAD.encode(iv),
            ciphertext: URL_SAFE_NO_PAD.encode(&buf),
            tag: URL_SAFE_NO_PAD.encode(tag),
        };
        out.push(STANDARD.encode(serde_json::to_vec(&jwe).expect("json")));
    }
    Ok(out.join(","))
}

fn wrap_cek(cek: &[u8; 32], recipient: &PublicKey) -> Result<(Value, Vec<u8>), Error> {
    let ec = |crv: &str, point: &[u8], shared: &[u8]| -> Result<(Value, Vec<u8>), Error> {
        let len = (point.len() - 1) / 2;
        let epk = serde_json::json!({
            "kty": "EC",
            "crv": crv,
            "x": URL_SAFE_NO_PAD.encode(&point[1..1 + len]),
            "y": URL_SAFE_NO_PAD.encode(&point[1 + len..]),
        });
        let kek = concat_kdf(shared, "ECDH-ES+A256KW", &[], &[]);
        let wrapped = aes_kw::KekAes256::new(kek.as_slice().into())
            .wrap_vec(cek)
            .map_err(|_| Error::Key("AES key wrap failed".into()))?;
        Ok((
            serde_json::json!({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "epk": epk}),
            wrapped,
        ))
    };
    match &recipient.0 {
        PublicKind::Rsa(k) => {
            let wrapped = crate::keys::rsa_oaep_encrypt(k, cek)?;
            Ok((
                serde_json::json!({"alg": "RSA-OAEP", "enc": "A256GCM"}),
                wrapped,
            ))
        }
        PublicKind::P256(k) => {
            let eph = p256::ecdh::EphemeralSecret::random(&mut OsRng);
            let point = p256::EncodedPoint::from(eph.public_key());
            let shared = eph.diffie_hellman(k);
            ec("P-256", point.as_bytes(), shared.raw_secret_bytes())
        }
        PublicKind::P384(k) => {
            let eph = p384::ecdh::EphemeralSecret::random(&mut OsRng);
            let point = p384::EncodedPoint::from(eph.public_key());
            let shared = eph.diffie_hellman(k);
            ec("P-384", point.as_bytes(), shared.raw_secret_bytes())
        }
        PublicKind::P521(k) => {
            let eph = p521::ecdh::EphemeralSecret::random(&mut OsRng);
            let point = p521::EncodedPoint::from(eph.public_key());
            let shared = eph.diffie_hellman(k);
            ec("P-521", point.as_bytes(), shared.raw_secret_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        // RFC 7518 Appendix C (ECDH-ES direct, A128GCM) uses a 128-bit key; check our KDF
        // structure with the same inputs and keydatalen fixed at 256 by recomputing by hand.
        let z = [0x9eu8; 32];
        let got = concat_kdf(&z, "ECDH-ES+A256KW", b"Alice", b"Bob");
        let mut h = Sha256::new();
        h.update([0, 0, 0, 1]);
        h.update(z);
        h.update([0, 0, 0, 14]);
        h.update(b"ECDH-ES+A256KW");
        h.update([0, 0, 0, 5]);
        h.update(b"Alice");
        h.update([0, 0, 0, 3]);
        h.update(b"Bob");
        h.update([0, 0, 1, 0]);
        assert_eq!(got.as_slice(), h.finalize().as_slice());
    }
}
