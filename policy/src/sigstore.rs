//! Signature formats and their verification.
//!
//! - cosign "simple signing" (what cosign 2.x and skopeo write at the `sha256-<hex>.sig` tag,
//!   and cosign 3 with `--new-bundle-format=false`): a JSON payload naming the image's
//!   repository and manifest digest, signed with ECDSA (or Ed25519) over the payload bytes.
//!   Verified here.
//! - Sigstore bundles (cosign 3's default: v0.3, a DSSE envelope over an in-toto statement
//!   whose subject is the manifest digest, attached as an OCI 1.1 referrer). Discovery
//!   carries them as [`SignatureFormat::SigstoreBundle`]; [`UntrustedBundle`] is the shape
//!   check done when they are found, [`InTotoStatement`] the statement a verified envelope
//!   carries. The cryptographic check is `crate::trust::verify_bundle`.
//!
//! Built on ring rather than the `sigstore` crate: with default features off, that crate still
//! brings a second crypto stack (RustCrypto signature crates plus OpenSSL or aws-lc through its
//! registry/TUF clients), while the piece needed here is one signature check over a small payload.

use std::collections::BTreeMap;
use std::fmt;

use ring::signature::{self, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use spki::der::Decode;

use crate::reference::Digest;

/// Upper bound on a simple-signing payload (cosign's are a few hundred bytes).
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;

/// Upper bound on a Sigstore bundle (a key-signed one is under 1 KiB, one with a
/// certificate chain, transparency-log entry and timestamps a few KiB).
pub const MAX_BUNDLE_LEN: usize = 1 << 20;

/// The media type of a Sigstore bundle v0.3, as cosign 3 writes it (the artifact type of
/// its referrer and the media type of the layer holding it).
pub const SIGSTORE_BUNDLE_V03: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// The older spelling of bundle media types: `...bundle+json;version=0.1` (0.1, 0.2, 0.3).
pub const SIGSTORE_BUNDLE_PARAMETERIZED: &str = "application/vnd.dev.sigstore.bundle+json";

/// The DSSE payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto statement types accepted.
pub const IN_TOTO_STATEMENT_V1: &str = "https://in-toto.io/Statement/v1";
pub const IN_TOTO_STATEMENT_V01: &str = "https://in-toto.io/Statement/v0.1";
/// The predicate type of cosign 3's image signature (`cosign sign`): an empty predicate
/// over the manifest digest. Other predicate types are attestations, not signatures.
pub const COSIGN_SIGN_PREDICATE: &str = "https://sigstore.dev/cosign/sign/v1";

/// The bundle version a media type names (`(0, 3)` for both spellings of v0.3), or `None`
/// when it is not a Sigstore bundle media type.
pub fn bundle_media_type_version(media_type: &str) -> Option<(u32, u32)> {
    let version =
        if let Some(rest) = media_type.strip_prefix("application/vnd.dev.sigstore.bundle.v") {
            rest.strip_suffix("+json")?
        } else {
            let (base, params) = media_type.split_once(';')?;
            if base.trim() != SIGSTORE_BUNDLE_PARAMETERIZED {
                return None;
            }
            params.trim().strip_prefix("version=")?.trim()
        };
    let (major, minor) = version.split_once('.')?;
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    Some((num(major)?, num(minor)?))
}

/// Whether `media_type` is a Sigstore bundle media type (any version, either spelling).
pub fn is_bundle_media_type(media_type: &str) -> bool {
    bundle_media_type_version(media_type).is_some()
}

/// How a signature was discovered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    /// Given directly (tests, callers that fetched it themselves).
    #[default]
    Provided,
    /// cosign's `sha256-<hex>.sig` tag (simple signing).
    SignatureTag,
    /// The registry's referrers API (`GET /v2/<name>/referrers/<digest>`, OCI 1.1).
    ReferrersApi,
    /// The referrers tag schema (`sha256-<hex>` tag holding an index), OCI 1.1's fallback
    /// for registries without the referrers API.
    ReferrersTag,
    /// A manifest of an OCI layout's `index.json` whose `subject` is the image.
    LayoutReferrer,
}

impl Discovery {
    pub fn as_str(self) -> &'static str {
        match self {
            Discovery::Provided => "provided",
            Discovery::SignatureTag => "signature-tag",
            Discovery::ReferrersApi => "referrers-api",
            Discovery::ReferrersTag => "referrers-tag",
            Discovery::LayoutReferrer => "layout-referrer",
        }
    }
}

/// Where a signature came from: for messages and the audit log. Nothing here is trusted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SignatureSource {
    pub via: Discovery,
    /// The repository (`host/path`) or layout (`oci:/dir`) that held it.
    pub origin: String,
    /// The signature artifact's manifest (the `.sig` manifest, the referrer).
    pub artifact: Option<Digest>,
    /// The blob holding the payload or the bundle.
    pub blob: Option<Digest>,
}

impl fmt::Display for SignatureSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let artifact = self
            .artifact
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_else(|| "(unknown)".into());
        match self.via {
            Discovery::Provided => write!(f, "a provided signature")?,
            Discovery::SignatureTag => write!(f, "signature manifest {artifact} (.sig tag)")?,
            Discovery::ReferrersApi => write!(f, "referrer {artifact} (referrers API)")?,
            Discovery::ReferrersTag => write!(f, "referrer {artifact} (referrers tag schema)")?,
            Discovery::LayoutReferrer => write!(f, "referrer {artifact} (layout index)")?,
        }
        if !self.origin.is_empty() {
            write!(f, " of {}", self.origin)?;
        }
        if let Some(blob) = &self.blob {
            write!(f, ", layer {blob}")?;
        }
        Ok(())
    }
}

/// The signature formats, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureKind {
    SimpleSigning,
    SigstoreBundle,
}

impl SignatureKind {
    /// `simple-signing` or `sigstore-bundle` (audit attributes).
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureKind::SimpleSigning => "simple-signing",
            SignatureKind::SigstoreBundle => "sigstore-bundle",
        }
    }
}

impl fmt::Display for SignatureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignatureKind::SimpleSigning => "cosign simple signing",
            SignatureKind::SigstoreBundle => "sigstore bundle",
        })
    }
}

/// A signature as fetched from untrusted storage, by format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureFormat {
    SimpleSigning(SimpleSigningSignature),
    /// A Sigstore bundle of any version (v0.1 to v0.3), unverified.
    SigstoreBundle(SigstoreBundleArtifact),
    /// An artifact that presents itself as a signature of this image (by tag, artifact type
    /// or media type) but could not be read: it counts as a malformed signature, named by
    /// format and source, never as "no signature".
    Unreadable {
        kind: SignatureKind,
        source: SignatureSource,
        reason: String,
    },
}

impl SignatureFormat {
    pub fn kind(&self) -> SignatureKind {
        match self {
            SignatureFormat::SimpleSigning(_) => SignatureKind::SimpleSigning,
            SignatureFormat::SigstoreBundle(_) => SignatureKind::SigstoreBundle,
            SignatureFormat::Unreadable { kind, .. } => *kind,
        }
    }

    pub fn source(&self) -> &SignatureSource {
        match self {
            SignatureFormat::SimpleSigning(s) => &s.source,
            SignatureFormat::SigstoreBundle(b) => &b.source,
            SignatureFormat::Unreadable { source, .. } => source,
        }
    }

    /// One line for messages and audit: format (with the bundle's media type) and source.
    pub fn describe(&self) -> String {
        match self {
            SignatureFormat::SimpleSigning(s) => format!("cosign simple signing in {}", s.source),
            SignatureFormat::SigstoreBundle(b) => {
                format!("sigstore bundle ({}) in {}", b.media_type, b.source)
            }
            SignatureFormat::Unreadable { kind, source, .. } => {
                format!("unreadable {kind} in {source}")
            }
        }
    }
}

/// A Sigstore bundle as discovery found it: the bundle JSON (at most [`MAX_BUNDLE_LEN`]
/// bytes, shape-checked by [`UntrustedBundle::parse`]) and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigstoreBundleArtifact {
    /// The media type the artifact declared for it (a bundle media type).
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub source: SignatureSource,
}

/// The shape of a bundle, read from untrusted bytes: which content it carries. Nothing here
/// is verified; it exists to refuse what cannot be a bundle when it is found, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UntrustedBundle {
    /// The bundle's own `mediaType`.
    pub media_type: String,
    pub content: UntrustedBundleContent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UntrustedBundleContent {
    /// A DSSE envelope: its payload type and decoded payload, unverified.
    Dsse {
        payload_type: String,
        payload: Vec<u8>,
    },
    /// A message signature (a signed blob digest, as `cosign sign-blob` writes).
    MessageSignature,
}

/// Why bytes found as a bundle are not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleShapeError {
    #[error("the bundle is {len} bytes (limit {MAX_BUNDLE_LEN})")]
    TooLarge { len: usize },
    #[error("the layer is not JSON: {0}")]
    NotJson(String),
    #[error("the bundle is not a JSON object")]
    NotAnObject,
    #[error("the bundle has no mediaType")]
    NoMediaType,
    #[error("the bundle's mediaType {0:?} is not a sigstore bundle media type")]
    NotABundleMediaType(String),
    #[error("the bundle says mediaType {inner} but was stored as {outer}")]
    MediaTypeMismatch { inner: String, outer: String },
    #[error("the bundle has no verificationMaterial object")]
    NoVerificationMaterial,
    #[error("the bundle must hold exactly one of dsseEnvelope and messageSignature")]
    Content,
    #[error("the DSSE envelope: {0}")]
    Dsse(String),
}

impl UntrustedBundle {
    /// Shape check of bundle JSON stored under `declared_media_type`: a JSON object whose
    /// `mediaType` is a bundle media type of the same version, with `verificationMaterial` and
    /// exactly one of `dsseEnvelope` (payloadType, base64 payload, signatures) and
    /// `messageSignature`.
    pub fn parse(bytes: &[u8], declared_media_type: &str) -> Result<Self, BundleShapeError> {
        use base64::Engine;
        if bytes.len() > MAX_BUNDLE_LEN {
            return Err(BundleShapeError::TooLarge { len: bytes.len() });
        }
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| BundleShapeError::NotJson(e.to_string()))?;
        let obj = value.as_object().ok_or(BundleShapeError::NotAnObject)?;
        let media_type = obj
            .get("mediaType")
            .and_then(|m| m.as_str())
            .ok_or(BundleShapeError::NoMediaType)?;
        let Some(version) = bundle_media_type_version(media_type) else {
            return Err(BundleShapeError::NotABundleMediaType(media_type.into()));
        };
        if bundle_media_type_version(declared_media_type) != Some(version) {
            return Err(BundleShapeError::MediaTypeMismatch {
                inner: media_type.into(),
                outer: declared_media_type.into(),
            });
        }
        if !obj
            .get("verificationMaterial")
            .is_some_and(|v| v.is_object())
        {
            return Err(BundleShapeError::NoVerificationMaterial);
        }
        let content = match (obj.get("dsseEnvelope"), obj.get("messageSignature")) {
            (Some(env), None) => {
                let env = env
                    .as_object()
                    .ok_or_else(|| BundleShapeError::Dsse("not an object".into()))?;
                let payload_type = env
                    .get("payloadType")
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| BundleShapeError::Dsse("no payloadType".into()))?;
                let payload = env
                    .get("payload")
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| BundleShapeError::Dsse("no payload".into()))?;
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(payload)
                    .map_err(|e| BundleShapeError::Dsse(format!("payload is not base64: {e}")))?;
                if env
                    .get("signatures")
                    .and_then(|s| s.as_array())
                    .is_none_or(|s| s.is_empty())
                {
                    return Err(BundleShapeError::Dsse("no signatures".into()));
                }
                UntrustedBundleContent::Dsse {
                    payload_type: payload_type.into(),
                    payload,
                }
            }
            (None, Some(m)) if m.is_object() => UntrustedBundleContent::MessageSignature,
            _ => return Err(BundleShapeError::Content),
        };
        Ok(Self {
            media_type: media_type.into(),
            content,
        })
    }
}

/// An in-toto statement (v1 or v0.1), parsed strictly: what a verified DSSE envelope of
/// cosign 3 carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InTotoStatement {
    pub statement_type: String,
    pub subjects: Vec<StatementSubject>,
    pub predicate_type: String,
    pub predicate: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatementSubject {
    pub name: Option<String>,
    /// Algorithm -> lowercase hex.
    pub digest: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatementJson {
    #[serde(rename = "_type")]
    statement_type: String,
    subject: Vec<SubjectJson>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    #[serde(default)]
    predicate: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectJson {
    #[serde(default)]
    name: Option<String>,
    digest: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: Option<serde_json::Value>,
}

/// Why a statement was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    #[error("statement of {len} bytes exceeds {MAX_PAYLOAD_LEN}")]
    TooLarge { len: usize },
    #[error("payload is not an in-toto statement: {0}")]
    NotAStatement(String),
    #[error("statement type {0:?} is not an in-toto statement v1 or v0.1")]
    WrongType(String),
    #[error("the statement has no subject")]
    NoSubject,
    #[error("statement subjects: at most 1024")]
    TooManySubjects,
}

impl InTotoStatement {
    /// Strict parse (only of a payload whose signature verified).
    pub fn parse(bytes: &[u8]) -> Result<Self, StatementError> {
        if bytes.len() > MAX_PAYLOAD_LEN {
            return Err(StatementError::TooLarge { len: bytes.len() });
        }
        let json: StatementJson = serde_json::from_slice(bytes)
            .map_err(|e| StatementError::NotAStatement(e.to_string()))?;
        if json.statement_type != IN_TOTO_STATEMENT_V1
            && json.statement_type != IN_TOTO_STATEMENT_V01
        {
            return Err(StatementError::WrongType(json.statement_type));
        }
        if json.subject.is_empty() {
            return Err(StatementError::NoSubject);
        }
        if json.subject.len() > 1024 {
            return Err(StatementError::TooManySubjects);
        }
        Ok(Self {
            statement_type: json.statement_type,
            subjects: json
                .subject
                .into_iter()
                .map(|s| StatementSubject {
                    name: s.name,
                    digest: s
                        .digest
                        .into_iter()
                        .map(|(k, v)| (k, v.to_ascii_lowercase()))
                        .collect(),
                })
                .collect(),
            predicate_type: json.predicate_type,
            predicate: json.predicate,
        })
    }

    /// Whether a subject names `digest` (same algorithm, same hex).
    pub fn names_digest(&self, digest: &Digest) -> bool {
        self.subjects.iter().any(|s| {
            s.digest
                .get(digest.algorithm())
                .is_some_and(|hex| hex == digest.hex())
        })
    }

    /// Every subject digest, as `alg:hex`, for messages.
    pub fn subject_digests(&self) -> Vec<String> {
        self.subjects
            .iter()
            .flat_map(|s| s.digest.iter().map(|(a, h)| format!("{a}:{h}")))
            .collect()
    }
}

/// One cosign simple-signing layer: the payload blob and the decoded signature annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimpleSigningSignature {
    pub payload: Vec<u8>,
    /// DER-encoded ECDSA signature (or raw Ed25519), base64-decoded from
    /// `dev.cosignproject.cosign/signature`.
    pub signature: Vec<u8>,
    pub source: SignatureSource,
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
    /// The SubjectPublicKeyInfo DER it was parsed from (for verifiers with their own key type).
    spki: Vec<u8>,
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
            spki: der.to_vec(),
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

    /// The SubjectPublicKeyInfo DER (public), e.g. to hand the key to the bundle verifier.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
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

    /// A bundle as cosign 3.1.1 wrote it (`cosign sign --key K --tlog-upload=false`) for
    /// manifest sha256:35fb4eaa...2112.
    const COSIGN3_BUNDLE: &str = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":{"hint":"pCEnZtEDG291ck2dfyKhsLhhALPZi6XT6+bCh5lsS9k="}},"dsseEnvelope":{"payload":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEiLCJzdWJqZWN0IjpbeyJkaWdlc3QiOnsic2hhMjU2IjoiMzVmYjRlYWEyM2YxNmFjNmRjMDYzY2FkYzQ4OGM4ZmEzMjRlMGFiYzNjNDIzOTFlYzQ5OThjYTNlYWUzMjExMiJ9LCJhbm5vdGF0aW9ucyI6e319XSwicHJlZGljYXRlVHlwZSI6Imh0dHBzOi8vc2lnc3RvcmUuZGV2L2Nvc2lnbi9zaWduL3YxIiwicHJlZGljYXRlIjp7fX0=","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"MEYCIQD3jMqpqjoextnRn+Cpwy0sruUS7FXRSWykioTp5x2KCQIhANehLmgxCD1PtJSIQNSExPGmG6q2YV+yenSnhfuHCMlI"}]}}"#;

    #[test]
    fn bundle_media_types() {
        assert_eq!(bundle_media_type_version(SIGSTORE_BUNDLE_V03), Some((0, 3)));
        for (mt, v) in [
            (
                "application/vnd.dev.sigstore.bundle+json;version=0.1",
                (0, 1),
            ),
            (
                "application/vnd.dev.sigstore.bundle+json; version=0.2",
                (0, 2),
            ),
            (
                "application/vnd.dev.sigstore.bundle+json;version=0.3",
                (0, 3),
            ),
            ("application/vnd.dev.sigstore.bundle.v0.4+json", (0, 4)),
        ] {
            assert_eq!(bundle_media_type_version(mt), Some(v), "{mt}");
        }
        for mt in [
            "application/vnd.dev.sigstore.bundle+json",
            "application/vnd.dev.sigstore.bundle.v0.3",
            "application/vnd.dev.sigstore.bundle.vx.3+json",
            "application/vnd.dev.sigstore.bundle+json;version=",
            "application/vnd.oci.empty.v1+json",
            "application/vnd.dev.cosign.simplesigning.v1+json",
        ] {
            assert!(!is_bundle_media_type(mt), "{mt}");
        }
    }

    #[test]
    fn cosign3_bundle_shape_and_statement() {
        let b = UntrustedBundle::parse(COSIGN3_BUNDLE.as_bytes(), SIGSTORE_BUNDLE_V03).unwrap();
        assert_eq!(b.media_type, SIGSTORE_BUNDLE_V03);
        let UntrustedBundleContent::Dsse {
            payload_type,
            payload,
        } = &b.content
        else {
            panic!("{b:?}")
        };
        assert_eq!(payload_type, IN_TOTO_PAYLOAD_TYPE);
        let st = InTotoStatement::parse(payload).unwrap();
        assert_eq!(st.predicate_type, COSIGN_SIGN_PREDICATE);
        let d = Digest::parse(
            "sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112",
        )
        .unwrap();
        assert!(st.names_digest(&d));
        assert!(!st.names_digest(&Digest::of(b"x")));
        assert_eq!(st.subjects[0].name, None, "no repository is signed");
        // The same version under the other spelling is fine; another version is not.
        assert!(UntrustedBundle::parse(
            COSIGN3_BUNDLE.as_bytes(),
            "application/vnd.dev.sigstore.bundle+json;version=0.3"
        )
        .is_ok());
        assert!(matches!(
            UntrustedBundle::parse(
                COSIGN3_BUNDLE.as_bytes(),
                "application/vnd.dev.sigstore.bundle+json;version=0.2"
            ),
            Err(BundleShapeError::MediaTypeMismatch { .. })
        ));
    }

    #[test]
    fn bundle_shape_errors() {
        let e = UntrustedBundle::parse(b"\x1f\x8b not json", SIGSTORE_BUNDLE_V03).unwrap_err();
        assert!(e.to_string().starts_with("the layer is not JSON"), "{e}");
        type Check = fn(&BundleShapeError) -> bool;
        let cases: [(&str, Check); 6] = [
            ("[]", |e| matches!(e, BundleShapeError::NotAnObject)),
            ("{}", |e| matches!(e, BundleShapeError::NoMediaType)),
            (r#"{"mediaType":"application/json"}"#, |e| {
                matches!(e, BundleShapeError::NotABundleMediaType(_))
            }),
            (
                r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json"}"#,
                |e| matches!(e, BundleShapeError::NoVerificationMaterial),
            ),
            (
                r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{}}"#,
                |e| matches!(e, BundleShapeError::Content),
            ),
            (
                r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{},"dsseEnvelope":{"payloadType":"x","payload":"!!","signatures":[{}]}}"#,
                |e| matches!(e, BundleShapeError::Dsse(_)),
            ),
        ];
        for (json, ok) in cases {
            let e = UntrustedBundle::parse(json.as_bytes(), SIGSTORE_BUNDLE_V03).unwrap_err();
            assert!(ok(&e), "{json}: {e:?}");
        }
        let big = vec![b' '; MAX_BUNDLE_LEN + 1];
        assert!(matches!(
            UntrustedBundle::parse(&big, SIGSTORE_BUNDLE_V03),
            Err(BundleShapeError::TooLarge { .. })
        ));
        let m = r#"{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{},"messageSignature":{}}"#;
        assert_eq!(
            UntrustedBundle::parse(m.as_bytes(), SIGSTORE_BUNDLE_V03)
                .unwrap()
                .content,
            UntrustedBundleContent::MessageSignature
        );
    }

    #[test]
    fn statements_are_strict() {
        for bad in [
            &br#"{"_type":"https://in-toto.io/Statement/v2","subject":[{"digest":{"sha256":"aa"}}],"predicateType":"p"}"#[..],
            br#"{"_type":"https://in-toto.io/Statement/v1","subject":[],"predicateType":"p"}"#,
            br#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":"aa"}}],"predicateType":"p","extra":1}"#,
            br#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"digest":{"sha256":"aa"}}]}"#,
        ] {
            assert!(InTotoStatement::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sources_describe_themselves() {
        let s = SignatureSource {
            via: Discovery::ReferrersApi,
            origin: "reg.io/a/b".into(),
            artifact: Some(Digest::of(b"r")),
            blob: Some(Digest::of(b"l")),
        };
        assert_eq!(
            s.to_string(),
            format!(
                "referrer {} (referrers API) of reg.io/a/b, layer {}",
                Digest::of(b"r"),
                Digest::of(b"l")
            )
        );
    }
}
