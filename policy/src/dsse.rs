//! DSSE envelopes (<https://github.com/secure-systems-lab/dsse>) signed with Ed25519 or
//! ECDSA P-256, shared by policy bundles ([`crate::deploy::bundle`]) and placement grants
//! ([`crate::grant`]).
//!
//! ```json
//! {"payloadType": "...", "payload": "<base64>",
//!  "signatures": [{"keyid": "sha256:<hex SHA-256 of the signer's SPKI DER>", "sig": "<base64>"}]}
//! ```
//!
//! The signature is over DSSE's pre-authentication encoding ([`pae`]) of type and payload,
//! so a signature for one kind of document cannot be replayed as another.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::sigstore::VerificationKey;

/// A DSSE envelope as it travels (the payload still base64).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    pub payload_type: String,
    pub payload: String,
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub keyid: String,
    pub sig: String,
}

/// Why signing failed (the key, not the document).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SignError(pub String);

/// DSSE pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The PKCS#8 DER of a PEM private key: an unencrypted PKCS#8 `PRIVATE KEY`, or, with
/// `allow_sec1`, a SEC1 `EC PRIVATE KEY` (wrapped as P-256 PKCS#8; ring checks the curve).
fn pkcs8_der(
    private_pem: &[u8],
    allow_sec1: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, SignError> {
    let pem = pem::parse(private_pem).map_err(|e| SignError(format!("key is not PEM: {e}")))?;
    let tag = pem.tag().to_string();
    let der = zeroize::Zeroizing::new(pem.into_contents());
    match tag.as_str() {
        "PRIVATE KEY" => Ok(der),
        "EC PRIVATE KEY" if allow_sec1 => Ok(sec1_p256_to_pkcs8(&der)),
        other => Err(SignError(format!(
            "key is a {other:?} PEM block; expected an unencrypted PKCS#8 PRIVATE KEY{}",
            if allow_sec1 {
                " or a SEC1 EC PRIVATE KEY"
            } else {
                ""
            }
        ))),
    }
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else if n < 0x100 {
        vec![0x81, n as u8]
    } else {
        vec![0x82, (n >> 8) as u8, n as u8]
    }
}

fn sec1_p256_to_pkcs8(sec1: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    // SEQUENCE { INTEGER 0, SEQUENCE { id-ecPublicKey, prime256v1 }, OCTET STRING { sec1 } }
    let alg: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    let mut octets = vec![0x04];
    octets.extend(der_len(sec1.len()));
    octets.extend_from_slice(sec1);
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(alg);
    body.extend_from_slice(&octets);
    let mut out = vec![0x30];
    out.extend(der_len(body.len()));
    out.extend_from_slice(&body);
    zeroize::Zeroize::zeroize(&mut octets);
    zeroize::Zeroize::zeroize(&mut body);
    zeroize::Zeroizing::new(out)
}

/// Signs `payload` as `payload_type` with a PEM private key (Ed25519 or ECDSA P-256
/// PKCS#8; SEC1 `EC PRIVATE KEY` too with `allow_sec1`). Returns the envelope as pretty
/// JSON with a final newline, and the signer's key id.
pub fn sign(
    payload_type: &str,
    payload: &[u8],
    private_pem: &[u8],
    allow_sec1: bool,
) -> Result<(String, String), SignError> {
    let der = pkcs8_der(private_pem, allow_sec1)?;
    let message = pae(payload_type, payload);
    let rng = ring::rand::SystemRandom::new();
    use ring::signature::{self, KeyPair};
    let (sig, public) = if let Ok(k) = signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
        (
            k.sign(&message).as_ref().to_vec(),
            ed25519_spki(k.public_key().as_ref()),
        )
    } else if let Ok(k) =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
    {
        let sig = k
            .sign(&rng, &message)
            .map_err(|_| SignError("ECDSA signing failed".into()))?;
        (sig.as_ref().to_vec(), p256_spki(k.public_key().as_ref()))
    } else {
        return Err(SignError(
            "the key is neither Ed25519 nor ECDSA P-256 PKCS#8".into(),
        ));
    };
    let keyid = VerificationKey::from_spki_der(&public)
        .map_err(|e| SignError(e.to_string()))?
        .fingerprint()
        .to_string();
    let envelope = Envelope {
        payload_type: payload_type.into(),
        payload: B64.encode(payload),
        signatures: vec![Signature {
            keyid: keyid.clone(),
            sig: B64.encode(sig),
        }],
    };
    Ok((
        serde_json::to_string_pretty(&envelope).expect("envelope serializes") + "\n",
        keyid,
    ))
}

/// The SubjectPublicKeyInfo DER of a raw Ed25519 public key.
pub fn ed25519_spki(public: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING { key } }
    let mut der = vec![
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    der.extend_from_slice(public);
    der
}

/// The SubjectPublicKeyInfo DER of an uncompressed P-256 point.
pub fn p256_spki(public: &[u8]) -> Vec<u8> {
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 } BIT STRING { uncompressed point } }
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    der.extend_from_slice(public);
    der
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(pae("t", b"ab"), b"DSSEv1 1 t 2 ab");
    }

    #[test]
    fn sec1_keys_are_wrapped_as_pkcs8() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        // ring's PKCS#8: the SEC1 document is the OCTET STRING after the algorithm.
        let der = pkcs8.as_ref();
        let sec1_at = 3 + 3 + 21 + 2;
        let sec1 = &der[sec1_at..];
        assert_eq!(sec1_p256_to_pkcs8(sec1).as_slice(), der);
    }
}
