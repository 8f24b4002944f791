//! JWE recipient keys: RSA (RSA-OAEP) and EC P-256/P-384/P-521 (ECDH-ES+A256KW).
//!
//! Private keys zeroize on drop (the RustCrypto key types do) and their
//! `Debug` shows only the algorithm.

use std::fmt;

use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};

use crate::Error;

/// A private key that can unwrap JWE recipients addressed to it.
pub struct PrivateKey(pub(crate) PrivateKind);

pub(crate) enum PrivateKind {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::SecretKey),
    P384(p384::SecretKey),
    P521(p521::SecretKey),
}

/// A public key that JWE recipients can be made for.
#[derive(Clone)]
pub struct PublicKey(pub(crate) PublicKind);

#[derive(Clone)]
pub(crate) enum PublicKind {
    Rsa(rsa::RsaPublicKey),
    P256(p256::PublicKey),
    P384(p384::PublicKey),
    P521(p521::PublicKey),
}

fn pem_label(pem: &str) -> Option<&str> {
    let start = pem.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = pem[start..].find("-----")?;
    Some(&pem[start..start + end])
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
            "RSA PRIVATE KEY" => PrivateKind::Rsa(Box::new(
                rsa::RsaPrivateKey::from_pkcs1_pem(text).map_err(|e| bad("PKCS#1 RSA key", &e))?,
            )),
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
                if let Ok(k) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
                    PrivateKind::Rsa(Box::new(k))
                } else if let Ok(k) = p256::SecretKey::from_pkcs8_pem(text) {
                    PrivateKind::P256(k)
                } else if let Ok(k) = p384::SecretKey::from_pkcs8_pem(text) {
                    PrivateKind::P384(k)
                } else if let Ok(k) = p521::SecretKey::from_pkcs8_pem(text) {
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
        if let PrivateKind::Rsa(k) = &kind {
            let bits = rsa::traits::PublicKeyParts::size(k.as_ref()) * 8;
            if bits < 2048 {
                return Err(Error::Key(format!(
                    "RSA key of {bits} bits is too small (minimum 2048)"
                )));
            }
        }
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

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(match &self.0 {
            PrivateKind::Rsa(k) => PublicKind::Rsa(k.to_public_key()),
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

impl PublicKey {
    /// Parses a PEM public key: SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`).
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(pem).map_err(|_| Error::Key("key file is not PEM text".into()))?;
        let label = pem_label(text).ok_or_else(|| Error::Key("no PEM block found".into()))?;
        let kind = match label {
            "RSA PUBLIC KEY" => PublicKind::Rsa(
                rsa::RsaPublicKey::from_pkcs1_pem(text)
                    .map_err(|e| Error::Key(format!("PKCS#1 RSA public key: {e}")))?,
            ),
            "PUBLIC KEY" => {
                if let Ok(k) = rsa::RsaPublicKey::from_public_key_pem(text) {
                    PublicKind::Rsa(k)
                } else if let Ok(k) = p256::PublicKey::from_public_key_pem(text) {
                    PublicKind::P256(k)
                } else if let Ok(k) = p384::PublicKey::from_public_key_pem(text) {
                    PublicKind::P384(k)
                } else if let Ok(k) = p521::PublicKey::from_public_key_pem(text) {
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
        use rsa::pkcs8::{EncodePublicKey, LineEnding};
        let lf = LineEnding::LF;
        match &self.0 {
            PublicKind::Rsa(k) => k.to_public_key_pem(lf),
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
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.algorithm())
    }
}
