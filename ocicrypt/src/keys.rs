//! JWE recipient keys: RSA (RSA-OAEP) and EC P-256/P-384/P-521 (ECDH-ES+A256KW).
//!
//! RSA private keys live in aws-lc ([`aws_lc_rs::rsa::OaepPrivateDecryptingKey`]), whose
//! RSA-OAEP decryption is constant-time (blinded private-key operation, constant-time padding
//! check, one error for every failure). The `rsa` crate's decryption is variable-time
//! (RUSTSEC-2023-0071, the Marvin attack) and this crate does not depend on it: the only RSA
//! private-key type here is aws-lc's, so no other decryption can be reached through it.
//!
//! Private keys are wiped when dropped: aws-lc's `OPENSSL_free` runs `OPENSSL_cleanse` over
//! every allocation it frees (the RSA key's numbers included), the RustCrypto EC key types
//! zeroize, and the DER/PEM buffers a key passes through are zeroizing. `Debug` shows only the
//! algorithm (and an RSA key's size).

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA1_MGF1SHA1,
};
use p256::pkcs8::der::asn1::{AnyRef, BitStringRef, ObjectIdentifier};
use p256::pkcs8::der::pem::LineEnding;
use p256::pkcs8::der::{Decode, Document, Encode, SecretDocument};
use p256::pkcs8::spki::{AlgorithmIdentifierRef, SubjectPublicKeyInfoRef};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, PrivateKeyInfo};
use zeroize::Zeroizing;

use crate::Error;

/// `rsaEncryption` (PKCS#1), the algorithm of RSA keys in PKCS#8 and SPKI.
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

fn rsa_algorithm() -> AlgorithmIdentifierRef<'static> {
    AlgorithmIdentifierRef {
        oid: RSA_ENCRYPTION,
        parameters: Some(AnyRef::NULL),
    }
}

/// An RSA private key for RSA-OAEP (SHA-1, as go-jose's `RSA-OAEP`), held by aws-lc.
///
/// The JWE unwrap takes only this type: the RSA private-key operation it can reach is
/// aws-lc's constant-time OAEP decryption and nothing else.
pub struct RsaOaepKey {
    oaep: OaepPrivateDecryptingKey,
    public: PublicEncryptingKey,
}

impl RsaOaepKey {
    /// Parses a PKCS#8 `PrivateKeyInfo` (DER) holding an RSA key of 2048 to 8192 bits.
    fn from_pkcs8_der(der: &[u8]) -> Result<Self, Error> {
        let key = PrivateDecryptingKey::from_pkcs8(der).map_err(|e| {
            Error::Key(format!(
                "RSA private key refused ({e}; 2048 to 8192 bits are supported)"
            ))
        })?;
        let public = key.public_key();
        let oaep = OaepPrivateDecryptingKey::new(key)
            .map_err(|_| Error::Key("RSA private key refused for OAEP".into()))?;
        Ok(Self { oaep, public })
    }

    /// RSA-OAEP (SHA-1, MGF1-SHA-1, no label) decryption of a wrapped content key.
    ///
    /// `None` for every failure alike (wrong length, not below the modulus, bad padding,
    /// another recipient's key): the caller cannot tell them apart, and aws-lc takes the
    /// same path through the padding check whatever the outcome.
    pub fn unwrap_cek(&self, wrapped: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(vec![0u8; self.oaep.min_output_size()]);
        let len = self
            .oaep
            .decrypt(&OAEP_SHA1_MGF1SHA1, wrapped, &mut out, None)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.oaep.key_size_bits()
    }
}

impl fmt::Debug for RsaOaepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaOaepKey({} bits, <redacted>)", self.bits())
    }
}

/// A new RSA key pair of `bits` (2048, 3072, 4096 or 8192), made by aws-lc: the private key
/// as PKCS#8 PEM (zeroized on drop).
pub fn generate_rsa_pkcs8_pem(bits: usize) -> Result<Zeroizing<String>, Error> {
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        8192 => KeySize::Rsa8192,
        other => {
            return Err(Error::Key(format!(
                "RSA key size {other}: one of 2048, 3072, 4096, 8192"
            )))
        }
    };
    let key = PrivateDecryptingKey::generate(size)
        .map_err(|_| Error::Key("RSA key generation failed".into()))?;
    // aws-lc's DER buffer zeroizes on drop; so do the SecretDocument and the PEM text.
    let der = key
        .as_der()
        .map_err(|_| Error::Key("RSA private key encoding failed".into()))?;
    let doc = SecretDocument::try_from(der.as_ref())
        .map_err(|e| Error::Key(format!("RSA private key encoding: {e}")))?;
    doc.to_pem("PRIVATE KEY", LineEnding::LF)
        .map_err(|e| Error::Key(format!("RSA private key encoding: {e}")))
}

/// A private key that can unwrap JWE recipients addressed to it.
pub struct PrivateKey(pub(crate) PrivateKind);

pub(crate) enum PrivateKind {
    Rsa(RsaOaepKey),
    P256(p256::SecretKey),
    P384(p384::SecretKey),
    P521(p521::SecretKey),
}

/// A public key that JWE recipients can be made for.
#[derive(Clone)]
pub struct PublicKey(pub(crate) PublicKind);

#[derive(Clone)]
pub(crate) enum PublicKind {
    Rsa(PublicEncryptingKey),
    P256(p256::PublicKey),
    P384(p384::PublicKey),
    P521(p521::PublicKey),
}

fn pem_label(pem: &str) -> Option<&str> {
    let start = pem.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = pem[start..].find("-----")?;
    Some(&pem[start..start + end])
}

/// The DER inside a private key PEM, in a zeroizing buffer.
fn secret_der(text: &str, what: &str) -> Result<SecretDocument, Error> {
    SecretDocument::from_pem(text)
        .map(|(_, doc)| doc)
        .map_err(|e| Error::Key(format!("{what}: {e}")))
}

impl PrivateKey {
    /// Parses a PEM private key: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or
    /// SEC1 (`EC PRIVATE KEY`). Encrypted PEM is refused.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(pem).map_err(|_| Error::Key("key file is not PEM text".into()))?;
        let label = pem_label(text).ok_or_else(|| Error::Key("no PEM block found".into()))?;
        let bad = |what: &str, e: &dyn fmt::Display| Error::Key(format!("{what}: {e}"));
        let kind = match label {
            "RSA PRIVATE KEY" => {
                // aws-lc reads PKCS#8: wrap the PKCS#1 RSAPrivateKey in a PrivateKeyInfo.
                let pkcs1 = secret_der(text, "PKCS#1 RSA key")?;
                let info = PrivateKeyInfo::new(rsa_algorithm(), pkcs1.as_bytes());
                let pkcs8 =
                    SecretDocument::encode_msg(&info).map_err(|e| bad("PKCS#1 RSA key", &e))?;
                PrivateKind::Rsa(RsaOaepKey::from_pkcs8_der(pkcs8.as_bytes())?)
            }
            "EC PRIVATE KEY" => {
                if let Ok(k) = p256::SecretKey::from_sec1_pem(text) {
                    PrivateKind::P256(k)
                } else if let Ok(k) = p384::SecretKey::from_sec1_pem(text) {
                    PrivateKind::P384(k)
                } else {
                    PrivateKind::P521(
                        p521::SecretKey::from_sec1_pem(text)
                            .map_err(|e| bad("SEC1 EC key (P-256/384/521)", &e))?,
                    )
                }
            }
            "PRIVATE KEY" => {
                let doc = secret_der(text, "PKCS#8 key")?;
                let info =
                    PrivateKeyInfo::from_der(doc.as_bytes()).map_err(|e| bad("PKCS#8 key", &e))?;
                if info.algorithm.oid == RSA_ENCRYPTION {
                    PrivateKind::Rsa(RsaOaepKey::from_pkcs8_der(doc.as_bytes())?)
                } else if let Ok(k) = p256::SecretKey::from_pkcs8_der(doc.as_bytes()) {
                    PrivateKind::P256(k)
                } else if let Ok(k) = p384::SecretKey::from_pkcs8_der(doc.as_bytes()) {
                    PrivateKind::P384(k)
                } else if let Ok(k) = p521::SecretKey::from_pkcs8_der(doc.as_bytes()) {
                    PrivateKind::P521(k)
                } else {
                    return Err(Error::Key(
                        "PKCS#8 key is not RSA, P-256, P-384 or P-521".into(),
                    ));
                }
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(Error::Key(
                    "password-protected keys are not supported".into(),
                ))
            }
            other => return Err(Error::Key(format!("unexpected PEM block {other:?}"))),
        };
        Ok(Self(kind))
    }

    /// The algorithm, for messages.
    pub fn algorithm(&self) -> &'static str {
        match &self.0 {
            PrivateKind::Rsa(_) => "RSA",
            PrivateKind::P256(_) => "EC P-256",
            PrivateKind::P384(_) => "EC P-384",
            PrivateKind::P521(_) => "EC P-521",
        }
    }

    /// The RSA key, when this is one: the only RSA private-key type the JWE unwrap takes.
    pub fn as_rsa(&self) -> Option<&RsaOaepKey> {
        match &self.0 {
            PrivateKind::Rsa(k) => Some(k),
            _ => None,
        }
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(match &self.0 {
            PrivateKind::Rsa(k) => PublicKind::Rsa(k.public.clone()),
            PrivateKind::P256(k) => PublicKind::P256(k.public_key()),
            PrivateKind::P384(k) => PublicKind::P384(k.public_key()),
            PrivateKind::P521(k) => PublicKind::P521(k.public_key()),
        })
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, <redacted>)", self.algorithm())
    }
}

fn rsa_public_from_spki(der: &[u8]) -> Result<PublicKind, Error> {
    PublicEncryptingKey::from_der(der)
        .map(PublicKind::Rsa)
        .map_err(|e| {
            Error::Key(format!(
                "RSA public key refused ({e}; 2048 to 8192 bits are supported)"
            ))
        })
}

impl PublicKey {
    /// Parses a PEM public key: SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`).
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(pem).map_err(|_| Error::Key("key file is not PEM text".into()))?;
        let label = pem_label(text).ok_or_else(|| Error::Key("no PEM block found".into()))?;
        let doc = |what: &str| {
            Document::from_pem(text)
                .map(|(_, d)| d)
                .map_err(|e| Error::Key(format!("{what}: {e}")))
        };
        let kind = match label {
            "RSA PUBLIC KEY" => {
                let pkcs1 = doc("PKCS#1 RSA public key")?;
                let bits = BitStringRef::from_bytes(pkcs1.as_bytes())
                    .map_err(|e| Error::Key(format!("PKCS#1 RSA public key: {e}")))?;
                let spki = SubjectPublicKeyInfoRef {
                    algorithm: rsa_algorithm(),
                    subject_public_key: bits,
                }
                .to_der()
                .map_err(|e| Error::Key(format!("PKCS#1 RSA public key: {e}")))?;
                rsa_public_from_spki(&spki)?
            }
            "PUBLIC KEY" => {
                let der = doc("SPKI public key")?;
                let spki = SubjectPublicKeyInfoRef::from_der(der.as_bytes())
                    .map_err(|e| Error::Key(format!("SPKI public key: {e}")))?;
                if spki.algorithm.oid == RSA_ENCRYPTION {
                    rsa_public_from_spki(der.as_bytes())?
                } else if let Ok(k) = p256::PublicKey::from_public_key_der(der.as_bytes()) {
                    PublicKind::P256(k)
                } else if let Ok(k) = p384::PublicKey::from_public_key_der(der.as_bytes()) {
                    PublicKind::P384(k)
                } else if let Ok(k) = p521::PublicKey::from_public_key_der(der.as_bytes()) {
                    PublicKind::P521(k)
                } else {
                    return Err(Error::Key(
                        "SPKI key is not RSA, P-256, P-384 or P-521".into(),
                    ));
                }
            }
            other => return Err(Error::Key(format!("unexpected PEM block {other:?}"))),
        };
        Ok(Self(kind))
    }

    /// SPKI PEM (`PUBLIC KEY`), what `skopeo --encryption-key jwe:FILE` reads.
    pub fn to_pem(&self) -> String {
        use p256::pkcs8::EncodePublicKey;
        let lf = LineEnding::LF;
        match &self.0 {
            PublicKind::Rsa(k) => {
                let der = k.as_der().expect("RSA public keys encode");
                p256::pkcs8::der::pem::encode_string("PUBLIC KEY", lf, der.as_ref())
                    .map_err(p256::pkcs8::spki::Error::from)
            }
            PublicKind::P256(k) => k.to_public_key_pem(lf),
            PublicKind::P384(k) => k.to_public_key_pem(lf),
            PublicKind::P521(k) => k.to_public_key_pem(lf),
        }
        .expect("public keys encode")
    }

    pub fn algorithm(&self) -> &'static str {
        match &self.0 {
            PublicKind::Rsa(_) => "RSA",
            PublicKind::P256(_) => "EC P-256",
            PublicKind::P384(_) => "EC P-384",
            PublicKind::P521(_) => "EC P-521",
        }
    }

    /// The key size in bits: the RSA modulus, or the curve's field size.
    pub fn bits(&self) -> usize {
        match &self.0 {
            PublicKind::Rsa(k) => k.key_size_bits(),
            PublicKind::P256(_) => 256,
            PublicKind::P384(_) => 384,
            PublicKind::P521(_) => 521,
        }
    }
}

/// RSA-OAEP (SHA-1, MGF1-SHA-1, no label) encryption of a content key: a public-key operation.
pub(crate) fn rsa_oaep_encrypt(key: &PublicEncryptingKey, cek: &[u8]) -> Result<Vec<u8>, Error> {
    let fail = |_| Error::Key("RSA-OAEP encryption failed".into());
    let key = OaepPublicEncryptingKey::new(key.clone()).map_err(fail)?;
    let mut out = vec![0u8; key.ciphertext_size()];
    let len = key
        .encrypt(&OAEP_SHA1_MGF1SHA1, cek, &mut out, None)
        .map_err(fail)?
        .len();
    out.truncate(len);
    Ok(out)
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.algorithm())
    }
}
