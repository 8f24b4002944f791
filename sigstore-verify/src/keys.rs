//! Public keys (SubjectPublicKeyInfo) and signature checks with ring: ECDSA P-256/P-384,
//! RSA PKCS#1 v1.5 and PSS (2048-8192 bits), Ed25519. Only a signature over a bare digest
//! (the caller has `sha256:<hex>`, not the artifact) goes through the `p256`/`p384` crates,
//! because ring verifies ECDSA over messages only.

use der::asn1::ObjectIdentifier as Oid;
use der::{Decode, Encode};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use sha2::{Digest, Sha256};
use spki::SubjectPublicKeyInfoRef;

pub(crate) const OID_EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
const OID_P256: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: Oid = Oid::new_unwrap("1.3.132.0.34");
const OID_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
const OID_ED25519: Oid = Oid::new_unwrap("1.3.101.112");

const OID_ECDSA_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
const OID_RSA_SHA256: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
const OID_RSA_SHA384: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
const OID_RSA_SHA512: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
const OID_RSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
const OID_SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
const OID_SHA384: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.2");
const OID_SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");

/// The kind of a public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Rsa,
    Ed25519,
}

/// A hash function a signature or digest names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlgorithm {
    /// Digest of `data`.
    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlgorithm::Sha256 => Sha256::digest(data).to_vec(),
            HashAlgorithm::Sha384 => sha2::Sha384::digest(data).to_vec(),
            HashAlgorithm::Sha512 => sha2::Sha512::digest(data).to_vec(),
        }
    }

    pub fn output_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 32,
            HashAlgorithm::Sha384 => 48,
            HashAlgorithm::Sha512 => 64,
        }
    }
}

/// A signature scheme: key type plus hash (and padding for RSA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureScheme {
    Ecdsa(HashAlgorithm),
    RsaPkcs1(HashAlgorithm),
    RsaPss(HashAlgorithm),
    Ed25519,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a DER SubjectPublicKeyInfo: {0}")]
    Spki(String),
    #[error("unsupported public key algorithm {0}")]
    UnsupportedKey(String),
    #[error("not a PEM public key: {0}")]
    Pem(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("signature does not verify")]
    Invalid,
    #[error("a {key:?} key cannot verify a {scheme:?} signature")]
    SchemeMismatch {
        key: KeyAlgorithm,
        scheme: SignatureScheme,
    },
    #[error("unsupported signature algorithm {0}")]
    UnsupportedAlgorithm(String),
    #[error(
        "a {0:?} key cannot verify a signature over a bare digest (the artifact itself is needed)"
    )]
    PrehashUnsupported(KeyAlgorithm),
}

/// A parsed public key (SPKI DER kept for comparisons and key ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    spki_der: Vec<u8>,
    algorithm: KeyAlgorithm,
    /// The subjectPublicKey bits: an uncompressed EC point, a PKCS#1 RSAPublicKey, or the
    /// 32 Ed25519 bytes (each the form ring takes).
    key_bytes: Vec<u8>,
}

impl PublicKey {
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki =
            SubjectPublicKeyInfoRef::from_der(der).map_err(|e| KeyError::Spki(e.to_string()))?;
        let oid = spki.algorithm.oid;
        let algorithm = if oid == OID_EC_PUBLIC_KEY {
            let curve: Oid = spki
                .algorithm
                .parameters
                .ok_or_else(|| KeyError::UnsupportedKey("EC key without named curve".into()))?
                .decode_as()
                .map_err(|e| KeyError::Spki(e.to_string()))?;
            if curve == OID_P256 {
                KeyAlgorithm::EcdsaP256
            } else if curve == OID_P384 {
                KeyAlgorithm::EcdsaP384
            } else {
                return Err(KeyError::UnsupportedKey(format!("EC curve {curve}")));
            }
        } else if oid == OID_RSA {
            KeyAlgorithm::Rsa
        } else if oid == OID_ED25519 {
            KeyAlgorithm::Ed25519
        } else {
            return Err(KeyError::UnsupportedKey(oid.to_string()));
        };
        let key_bytes = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| KeyError::Spki("public key bit string has unused bits".into()))?
            .to_vec();
        // Re-encode so that trailing garbage after the SPKI is not carried along.
        let spki_der = spki.to_der().map_err(|e| KeyError::Spki(e.to_string()))?;
        Ok(PublicKey {
            spki_der,
            algorithm,
            key_bytes,
        })
    }

    /// A bare PKCS#1 `RSAPublicKey` (the deprecated `PKCS1_RSA_*` key details of trusted
    /// roots), wrapped into an SPKI.
    pub fn from_pkcs1_rsa_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = spki::SubjectPublicKeyInfoOwned {
            algorithm: spki::AlgorithmIdentifierOwned {
                oid: OID_RSA,
                parameters: Some(der::asn1::Any::null()),
            },
            subject_public_key: der::asn1::BitString::from_bytes(der)
                .map_err(|e| KeyError::Spki(e.to_string()))?,
        };
        Self::from_spki_der(&spki.to_der().map_err(|e| KeyError::Spki(e.to_string()))?)
    }

    /// A `-----BEGIN PUBLIC KEY-----` PEM block.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let block = pem::parse(text).map_err(|e| KeyError::Pem(e.to_string()))?;
        if block.tag() != "PUBLIC KEY" {
            return Err(KeyError::Pem(format!(
                "block is {:?}, expected PUBLIC KEY",
                block.tag()
            )));
        }
        Self::from_spki_der(block.contents())
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// SHA-256 of the SPKI DER (a Rekor log id, a CT log id, a key hint).
    pub fn key_id(&self) -> [u8; 32] {
        Sha256::digest(&self.spki_der).into()
    }

    /// The scheme this key signs messages with by default: ECDSA with the curve's hash, RSA
    /// PKCS#1 v1.5 with SHA-256, Ed25519.
    pub fn default_scheme(&self) -> SignatureScheme {
        match self.algorithm {
            KeyAlgorithm::EcdsaP256 => SignatureScheme::Ecdsa(HashAlgorithm::Sha256),
            KeyAlgorithm::EcdsaP384 => SignatureScheme::Ecdsa(HashAlgorithm::Sha384),
            KeyAlgorithm::Rsa => SignatureScheme::RsaPkcs1(HashAlgorithm::Sha256),
            KeyAlgorithm::Ed25519 => SignatureScheme::Ed25519,
        }
    }

    /// Verifies `sig` over `message` with `scheme`.
    pub fn verify(
        &self,
        scheme: SignatureScheme,
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), SignatureError> {
        use HashAlgorithm::*;
        let alg: &'static dyn VerificationAlgorithm = match (self.algorithm, scheme) {
            (KeyAlgorithm::EcdsaP256, SignatureScheme::Ecdsa(Sha256)) => {
                &signature::ECDSA_P256_SHA256_ASN1
            }
            (KeyAlgorithm::EcdsaP256, SignatureScheme::Ecdsa(Sha384)) => {
                &signature::ECDSA_P256_SHA384_ASN1
            }
            (KeyAlgorithm::EcdsaP384, SignatureScheme::Ecdsa(Sha256)) => {
                &signature::ECDSA_P384_SHA256_ASN1
            }
            (KeyAlgorithm::EcdsaP384, SignatureScheme::Ecdsa(Sha384)) => {
                &signature::ECDSA_P384_SHA384_ASN1
            }
            (KeyAlgorithm::Rsa, SignatureScheme::RsaPkcs1(Sha256)) => {
                &signature::RSA_PKCS1_2048_8192_SHA256
            }
            (KeyAlgorithm::Rsa, SignatureScheme::RsaPkcs1(Sha384)) => {
                &signature::RSA_PKCS1_2048_8192_SHA384
            }
            (KeyAlgorithm::Rsa, SignatureScheme::RsaPkcs1(Sha512)) => {
                &signature::RSA_PKCS1_2048_8192_SHA512
            }
            (KeyAlgorithm::Rsa, SignatureScheme::RsaPss(Sha256)) => {
                &signature::RSA_PSS_2048_8192_SHA256
            }
            (KeyAlgorithm::Rsa, SignatureScheme::RsaPss(Sha384)) => {
                &signature::RSA_PSS_2048_8192_SHA384
            }
            (KeyAlgorithm::Rsa, SignatureScheme::RsaPss(Sha512)) => {
                &signature::RSA_PSS_2048_8192_SHA512
            }
            (KeyAlgorithm::Ed25519, SignatureScheme::Ed25519) => &signature::ED25519,
            (key, scheme) => return Err(SignatureError::SchemeMismatch { key, scheme }),
        };
        UnparsedPublicKey::new(alg, &self.key_bytes)
            .verify(message, sig)
            .map_err(|_| SignatureError::Invalid)
    }

    /// Verifies an ECDSA signature (ASN.1 DER) over a digest the caller computed elsewhere.
    pub fn verify_prehashed(&self, digest: &[u8], sig: &[u8]) -> Result<(), SignatureError> {
        use ecdsa_prehash::PrehashVerifier;
        match self.algorithm {
            KeyAlgorithm::EcdsaP256 => {
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&self.key_bytes)
                    .map_err(|_| SignatureError::Invalid)?;
                let sig =
                    p256::ecdsa::Signature::from_der(sig).map_err(|_| SignatureError::Invalid)?;
                key.verify_prehash(digest, &sig)
                    .map_err(|_| SignatureError::Invalid)
            }
            KeyAlgorithm::EcdsaP384 => {
                let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(&self.key_bytes)
                    .map_err(|_| SignatureError::Invalid)?;
                let sig =
                    p384::ecdsa::Signature::from_der(sig).map_err(|_| SignatureError::Invalid)?;
                key.verify_prehash(digest, &sig)
                    .map_err(|_| SignatureError::Invalid)
            }
            other => Err(SignatureError::PrehashUnsupported(other)),
        }
    }
}

mod ecdsa_prehash {
    pub use p256::ecdsa::signature::hazmat::PrehashVerifier;
}

/// The scheme of a certificate's `signatureAlgorithm` (with RSA-PSS parameters decoded).
pub fn scheme_for_certificate(
    alg: &spki::AlgorithmIdentifierOwned,
) -> Result<SignatureScheme, SignatureError> {
    use HashAlgorithm::*;
    let oid = alg.oid;
    Ok(match oid {
        o if o == OID_ECDSA_SHA256 => SignatureScheme::Ecdsa(Sha256),
        o if o == OID_ECDSA_SHA384 => SignatureScheme::Ecdsa(Sha384),
        o if o == OID_RSA_SHA256 => SignatureScheme::RsaPkcs1(Sha256),
        o if o == OID_RSA_SHA384 => SignatureScheme::RsaPkcs1(Sha384),
        o if o == OID_RSA_SHA512 => SignatureScheme::RsaPkcs1(Sha512),
        o if o == OID_ED25519 => SignatureScheme::Ed25519,
        o if o == OID_RSA_PSS => SignatureScheme::RsaPss(pss_hash(alg)?),
        o => return Err(SignatureError::UnsupportedAlgorithm(o.to_string())),
    })
}

/// The hash of RSASSA-PSS-params: `SEQUENCE { [0] EXPLICIT hashAlgorithm DEFAULT sha1, ... }`.
fn pss_hash(alg: &spki::AlgorithmIdentifierOwned) -> Result<HashAlgorithm, SignatureError> {
    let unsupported = || SignatureError::UnsupportedAlgorithm("RSA-PSS parameters".into());
    let params = alg.parameters.as_ref().ok_or_else(unsupported)?;
    let seq: Vec<der::asn1::Any> = params.decode_as().map_err(|_| unsupported())?;
    let first = seq.first().ok_or_else(unsupported)?;
    let tag0 = der::Tag::ContextSpecific {
        constructed: true,
        number: der::TagNumber::N0,
    };
    if der::Tagged::tag(first) != tag0 {
        return Err(SignatureError::UnsupportedAlgorithm(
            "RSA-PSS with SHA-1".into(),
        ));
    }
    let hash =
        spki::AlgorithmIdentifierOwned::from_der(first.value()).map_err(|_| unsupported())?;
    match hash.oid {
        o if o == OID_SHA256 => Ok(HashAlgorithm::Sha256),
        o if o == OID_SHA384 => Ok(HashAlgorithm::Sha384),
        o if o == OID_SHA512 => Ok(HashAlgorithm::Sha512),
        o => Err(SignatureError::UnsupportedAlgorithm(format!(
            "RSA-PSS with hash {o}"
        ))),
    }
}
