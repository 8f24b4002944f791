//! Signature formats and their verification.
//!
//! Today: cosign "simple signing" (what cosign 2.x and skopeo write at the
//! `sha256-<hex>.sig` tag): a JSON payload naming the image's repository and manifest digest,
//! signed with ECDSA (or Ed25519) over the payload bytes. The sigstore bundle v0.3 format
//! (cosign 3.x, referrers API) is recognised and refused by name.
//!
//! Built on ring rather than the `sigstore` crate: with default features off, that crate still
//! brings a second crypto stack (RustCrypto signature crates plus OpenSSL or aws-lc through its
//! registry/TUF clients), while the piece needed here is one signature check over a small payload.

use std::fmt;

use ring::signature::{self, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use spki::der::Decode;

use crate::reference::Digest;

/// Upper bound on a simple-signing payload (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;

/// The media type of a sigstore bundle v0.3.
pub const SIGSTORE_BUNDLE_V03: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

/// A signature as fetched from untrusted storage, by format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureFormat {
    SimpleSigning(SimpleSigningSignature),
    SigstoreBundleV03 { media_type: String, bytes: Vec<u8> },
}

/// One cosign simple-signing layer: the payload blob and the decoded signature annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimpleSigningSignature {
    pub payload: Vec<u8>,
    /// DER-encoded ECDSA signature (or raw Ed25519), base64-decoded from
    /// `dev.cosignproject.cosign/signature`.
    pub signature: Vec<u8>,
}

/// The signed claim: which repository and manifest digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimpleSigningPayload {
    pub docker_reference: String,
    pub docker_manifest_digest: Digest,
    pub optional: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadJson {
    critical: Critical,
    optional: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

const PAYLOAD_TYPE: &str = "cosign container image signature";

/// Why a simple-signing payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload of {len} bytes exceeds {MAX_PAYLOAD_LEN}")]
    TooLarge { len: usize },
    /// Not the strict JSON shape (the parser's message).
    #[error("payload is not simple-signing JSON: {0}")]
    NotSimpleSigning(String),
    #[error("payload type {0:?} is not {PAYLOAD_TYPE:?}")]
    WrongType(String),
    #[error("payload manifest digest: {0}")]
    Digest(#[source] crate::reference::ReferenceError),
}

/// Why a payload could not be signed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("signing key is not an ECDSA P-256 PKCS#8 key: {0}")]
    NotP256Pkcs8(String),
    #[error("signing failed")]
    Failed,
}

impl SimpleSigningPayload {
    /// Strict parse of a payload (only after its signature verified).
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.len() > MAX_PAYLOAD_LEN {
            return Err(PayloadError::TooLarge { len: bytes.len() });
        }
        let json: PayloadJson = serde_json::from_slice(bytes)
            .map_err(|e| PayloadError::NotSimpleSigning(e.to_string()))?;
        if json.critical.kind != PAYLOAD_TYPE {
            return Err(PayloadError::WrongType(json.critical.kind));
        }
        let digest = Digest::parse(&json.critical.image.docker_manifest_digest)
            .map_err(PayloadError::Digest)?;
        Ok(Self {
            docker_reference: json.critical.identity.docker_reference,
            docker_manifest_digest: digest,
            optional: json.optional,
        })
    }

    /// The payload bytes exactly as cosign 2.x writes them.
    pub fn to_cosign_json(&self) -> Vec<u8> {
        let json = PayloadJson {
            critical: Critical {
                identity: Identity {
                    docker_reference: self.docker_reference.clone(),
                },
                image: Image {
                    docker_manifest_digest: self.docker_manifest_digest.to_string(),
                },
                kind: PAYLOAD_TYPE.to_string(),
            },
            optional: self.optional.clone(),
        };
        serde_json::to_vec(&json).expect("payload serializes")
    }
}

/// Signs a payload with an ECDSA P-256 PKCS#8 (DER) private key; returns the DER signature.
pub fn sign_simple_signing(payload: &[u8], pkcs8_der: &[u8]) -> Result<Vec<u8>, SignError> {
    let rng = ring::rand::SystemRandom::new();
    let key = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8_der,
        &rng,
    )
    .map_err(|e| SignError::NotP256Pkcs8(e.to_string()))?;
    key.sign(&rng, payload)
        .map(|s| s.as_ref().to_vec())
        .map_err(|_| SignError::Failed)
}

/// A public key accepted by a `sigstoreSigned` requirement.
#[derive(Clone, PartialEq, Eq)]
pub struct VerificationKey {
    algorithm: KeyAlgorithm,
    /// The raw public key (uncompressed EC point, or Ed25519 bytes).
    public: Vec<u8>,
    /// `sha256:` of the SPKI DER, for messages.
    fingerprint: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";

/// Why a public key (PEM or SPKI DER) was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not PEM: {0}")]
    NotPem(String),
    #[error("no PEM block found")]
    NoPemBlock,
    #[error("PEM block {0:?} is not a PUBLIC KEY")]
    NotAPublicKey(String),
    #[error("not a SubjectPublicKeyInfo: {0}")]
    NotSpki(String),
    #[error("EC key without named curve: {0}")]
    NoNamedCurve(String),
    #[error("unsupported EC curve {0} (P-256, P-384)")]
    UnsupportedCurve(String),
    #[error("unsupported public key algorithm {0} (ECDSA P-256/P-384, Ed25519)")]
    UnsupportedAlgorithm(String),
    #[error("public key bit string is not byte aligned")]
    NotByteAligned,
}

/// A key file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key {}: {reason}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        #[source]
        reason: KeyError,
    },
}

impl VerificationKey {
    /// Parses every `PUBLIC KEY` PEM block in `pem` (cosign and containers accept several).
    pub fn from_pem(pem_text: &[u8]) -> Result<Vec<Self>, KeyError> {
        let blocks = pem::parse_many(pem_text).map_err(|e| KeyError::NotPem(e.to_string()))?;
        if blocks.is_empty() {
            return Err(KeyError::NoPemBlock);
        }
        blocks
            .iter()
            .map(|b| {
                if b.tag() != "PUBLIC KEY" {
                    return Err(KeyError::NotAPublicKey(b.tag().to_string()));
                }
                Self::from_spki_der(b.contents())
            })
            .collect()
    }

    /// Every key of every PEM file in `paths` (the trusted signers of policy bundles, for
    /// example); the first unreadable or invalid file is the error.
    pub fn from_pem_files(
        paths: &[impl AsRef<std::path::Path>],
    ) -> Result<Vec<Self>, KeyFileError> {
        let mut keys = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let pem = std::fs::read(path).map_err(|source| KeyFileError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            keys.extend(
                Self::from_pem(&pem).map_err(|reason| KeyFileError::Invalid {
                    path: path.to_path_buf(),
                    reason,
                })?,
            );
        }
        Ok(keys)
    }

    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = spki::SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| KeyError::NotSpki(e.to_string()))?;
        let oid = spki.algorithm.oid.to_string();
        let algorithm = match oid.as_str() {
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters_oid()
                    .map_err(|e| KeyError::NoNamedCurve(e.to_string()))?
                    .to_string();
                match curve.as_str() {
                    OID_P256 => KeyAlgorithm::EcdsaP256,
                    OID_P384 => KeyAlgorithm::EcdsaP384,
                    other => return Err(KeyError::UnsupportedCurve(other.to_string())),
                }
            }
            OID_ED25519 => KeyAlgorithm::Ed25519,
            other => return Err(KeyError::UnsupportedAlgorithm(other.to_string())),
        };
        let public = spki
            .subject_public_key
            .as_bytes()
            .ok_or(KeyError::NotByteAligned)?
            .to_vec();
        let fingerprint = format!(
            "sha256:{}",
            hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
        );
        Ok(Self {
            algorithm,
            public,
            fingerprint,
        })
    }

    /// `ecdsa-p256`, `ecdsa-p384` or `ed25519`.
    pub fn algorithm_name(&self) -> &'static str {
        match self.algorithm {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-p384",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
            KeyAlgorithm::Ed25519 => &signature::ED25519,
        };
        UnparsedPublicKey::new(alg, &self.public)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VerificationKey({:?}, {})",
            self.algorithm, self.fingerprint
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> (Vec<u8>, VerificationKey) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &rng,
        )
        .unwrap();
        let kp = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        use ring::signature::KeyPair;
        // SPKI for P-256: fixed prefix + point.
        let mut der = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
        der.extend_from_slice(kp.public_key().as_ref());
        (
            pkcs8.as_ref().to_vec(),
            VerificationKey::from_spki_der(&der).unwrap(),
        )
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let (pkcs8, key) = keypair();
        let payload = SimpleSigningPayload {
            docker_reference: "example.com/a/b".into(),
            docker_manifest_digest: Digest::of(b"m"),
            optional: None,
        }
        .to_cosign_json();
        let sig = sign_simple_signing(&payload, &pkcs8).unwrap();
        assert!(key.verify(&payload, &sig));
        let mut bad = payload.clone();
        bad[10] ^= 1;
        assert!(!key.verify(&bad, &sig));
        let parsed = SimpleSigningPayload::parse(&payload).unwrap();
        assert_eq!(parsed.docker_reference, "example.com/a/b");
    }

    #[test]
    fn payload_format_matches_cosign() {
        let p = SimpleSigningPayload {
            docker_reference: "127.0.0.1:5000/fixtures/hello".into(),
            docker_manifest_digest: Digest::parse(
                "sha256:c320c34fd7fc02b7a5a54364baf3775da2591629bf8e381869b0faad209e2509",
            )
            .unwrap(),
            optional: None,
        };
        assert_eq!(
            String::from_utf8(p.to_cosign_json()).unwrap(),
            r#"{"critical":{"identity":{"docker-reference":"127.0.0.1:5000/fixtures/hello"},"image":{"docker-manifest-digest":"sha256:c320c34fd7fc02b7a5a54364baf3775da2591629bf8e381869b0faad209e2509"},"type":"cosign container image signature"},"optional":null}"#
        );
    }

    #[test]
    fn strict_payload_parse() {
        for bad in [
            &b"{}"[..],
            br#"{"critical":{"identity":{"docker-reference":"a"},"image":{"docker-manifest-digest":"sha256:00"},"type":"cosign container image signature"},"optional":null}"#,
            br#"{"critical":{"identity":{"docker-reference":"a"},"image":{"docker-manifest-digest":"sha256:c320c34fd7fc02b7a5a54364baf3775da2591629bf8e381869b0faad209e2509"},"type":"other"},"optional":null}"#,
            br#"{"critical":{"identity":{"docker-reference":"a","x":1},"image":{"docker-manifest-digest":"sha256:c320c34fd7fc02b7a5a54364baf3775da2591629bf8e381869b0faad209e2509"},"type":"cosign container image signature"},"optional":null}"#,
        ] {
            assert!(SimpleSigningPayload::parse(bad).is_err());
        }
        assert!(SimpleSigningPayload::parse(&vec![b' '; MAX_PAYLOAD_LEN + 1]).is_err());
    }

    #[test]
    fn from_pem_files_reads_every_key_and_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = keypair();
        let (_, other) = keypair();
        let spki = |k: &VerificationKey| {
            // The SPKI DER of a P-256 key: fixed prefix + point.
            let mut der =
                hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
            der.extend_from_slice(&k.public);
            der
        };
        let good = dir.path().join("good.pem");
        std::fs::write(
            &good,
            pem::encode_many(&[
                pem::Pem::new("PUBLIC KEY", spki(&key)),
                pem::Pem::new("PUBLIC KEY", spki(&other)),
            ]),
        )
        .unwrap();
        let keys = VerificationKey::from_pem_files(&[&good]).unwrap();
        assert_eq!(keys, vec![key.clone(), other]);

        let missing = dir.path().join("missing.pem");
        let e = VerificationKey::from_pem_files(&[&good, &missing]).unwrap_err();
        assert!(
            matches!(&e, KeyFileError::Read { path, .. } if *path == missing),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read key {}: ", missing.display())),
            "{e}"
        );

        let text = dir.path().join("text.pem");
        std::fs::write(&text, "not a key\n").unwrap();
        let e = VerificationKey::from_pem_files(&[&text]).unwrap_err();
        assert!(
            matches!(&e, KeyFileError::Invalid { path, reason: KeyError::NoPemBlock } if *path == text),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!("key {}: no PEM block found", text.display())
        );

        let private = dir.path().join("private.pem");
        std::fs::write(
            &private,
            pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3])),
        )
        .unwrap();
        let e = VerificationKey::from_pem_files(&[good, private.clone()]).unwrap_err();
        assert!(
            matches!(&e, KeyFileError::Invalid { path, reason: KeyError::NotAPublicKey(tag) } if *path == private && tag == "PRIVATE KEY"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "key {}: PEM block \"PRIVATE KEY\" is not a PUBLIC KEY",
                private.display()
            )
        );
    }

    #[test]
    fn rejects_unsupported_keys() {
        // An RSA SPKI header (rsaEncryption OID) is refused by name.
        let rsa = hex::decode("300d06092a864886f70d0101010500").unwrap();
        let mut der = vec![0x30, (rsa.len() + 4) as u8];
        der.extend_from_slice(&rsa);
        der.extend_from_slice(&[0x03, 0x02, 0x00, 0x00]);
        let err = VerificationKey::from_spki_der(&der).unwrap_err();
        assert!(err.to_string().contains("1.2.840.113549.1.1.1"), "{err}");
    }
}
