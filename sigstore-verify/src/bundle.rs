//! The Sigstore bundle (protobuf JSON mapping), media types
//! `application/vnd.dev.sigstore.bundle+json;version=0.1|0.2|0.3` and
//! `application/vnd.dev.sigstore.bundle.v0.3+json`. Parsing checks the shape and the rules
//! of each version; nothing here is verified yet (see [`crate::verify`]).

use base64::Engine as _;
use serde::Deserialize;

use crate::keys::HashAlgorithm;

/// Upper bounds against resource exhaustion by a hostile bundle.
pub const MAX_TLOG_ENTRIES: usize = 32;
pub const MAX_TIMESTAMPS: usize = 32;
pub const MAX_PROOF_HASHES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BundleVersion {
    V0_1,
    V0_2,
    V0_3,
}

impl BundleVersion {
    /// The version a media type names, or None if it is not one this crate reads.
    pub fn from_media_type(mt: &str) -> Option<Self> {
        match mt {
            "application/vnd.dev.sigstore.bundle+json;version=0.1" => Some(BundleVersion::V0_1),
            "application/vnd.dev.sigstore.bundle+json;version=0.2" => Some(BundleVersion::V0_2),
            "application/vnd.dev.sigstore.bundle+json;version=0.3"
            | "application/vnd.dev.sigstore.bundle.v0.3+json" => Some(BundleVersion::V0_3),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle is not valid JSON of the bundle shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bundle media type {0:?} is not supported (v0.1, v0.2, v0.3 are)")]
    MediaType(String),
    #[error("bundle {field}: {reason}")]
    Field { field: String, reason: String },
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What the signer's key comes with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerificationMaterial {
    /// `certificate` (v0.3) or the first of `x509CertificateChain` (v0.1, v0.2): DER.
    Certificate(Vec<u8>),
    /// `publicKey.hint`: the key is the verifier's to supply.
    PublicKey { hint: Option<String> },
}

/// An inclusion proof of a log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InclusionProof {
    pub log_index: u64,
    pub root_hash: Vec<u8>,
    pub tree_size: u64,
    pub hashes: Vec<Vec<u8>>,
    /// `checkpoint.envelope`: the signed note text.
    pub checkpoint: Option<String>,
}

/// One transparency log entry as the bundle carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlogEntry {
    pub log_index: u64,
    pub log_id: Vec<u8>,
    pub kind: String,
    pub version: String,
    /// Absent (or 0) in Rekor v2 entries.
    pub integrated_time: Option<u64>,
    pub signed_entry_timestamp: Option<Vec<u8>>,
    pub inclusion_proof: Option<InclusionProof>,
    pub canonicalized_body: Vec<u8>,
}

/// `messageSignature.messageDigest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageDigest {
    pub algorithm: HashAlgorithm,
    pub digest: Vec<u8>,
}

/// A DSSE envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub payload: Vec<u8>,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeSignature {
    pub sig: Vec<u8>,
    pub keyid: String,
}

/// What is signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    MessageSignature {
        /// An unauthenticated hint; checked against the artifact.
        digest: Option<MessageDigest>,
        signature: Vec<u8>,
    },
    Dsse(Envelope),
}

/// A parsed bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub version: BundleVersion,
    pub media_type: String,
    pub material: VerificationMaterial,
    /// v0.1/v0.2 only: certificates after the first of `x509CertificateChain`.
    pub extra_chain: Vec<Vec<u8>>,
    pub tlog_entries: Vec<TlogEntry>,
    /// `timestampVerificationData.rfc3161Timestamps[].signedTimestamp`, DER.
    pub rfc3161_timestamps: Vec<Vec<u8>>,
    pub content: Content,
}

impl Bundle {
    /// The signature bytes (message signature, or the DSSE envelope's only signature): what
    /// RFC 3161 timestamps are over and what the log entries record.
    pub fn signature_bytes(&self) -> &[u8] {
        match &self.content {
            Content::MessageSignature { signature, .. } => signature,
            Content::Dsse(env) => &env.signatures[0].sig,
        }
    }

    /// Parses and checks a bundle's JSON.
    pub fn from_json(text: &str) -> Result<Self, BundleError> {
        let raw: BundleJson = serde_json::from_str(text)?;
        raw.into_bundle()
    }
}

// ----- JSON shape -----

/// Protobuf int64/uint64 in JSON: a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Int64Json {
    Str(String),
    Num(i64),
}

impl Int64Json {
    fn get(&self, field: &str) -> Result<i64, BundleError> {
        match self {
            Int64Json::Num(n) => Ok(*n),
            Int64Json::Str(s) => s
                .parse::<i64>()
                .map_err(|_| field_err(field, format!("{s:?} is not an integer"))),
        }
    }

    fn non_negative(&self, field: &str) -> Result<u64, BundleError> {
        let v = self.get(field)?;
        u64::try_from(v).map_err(|_| field_err(field, format!("{v} is negative")))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BundleJson {
    media_type: String,
    verification_material: Option<MaterialJson>,
    message_signature: Option<MessageSignatureJson>,
    dsse_envelope: Option<EnvelopeJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MaterialJson {
    x509_certificate_chain: Option<ChainJson>,
    certificate: Option<crate::trust_root::RawBytesJson>,
    public_key: Option<PublicKeyIdJson>,
    #[serde(default)]
    tlog_entries: Vec<TlogEntryJson>,
    timestamp_verification_data: Option<TimestampDataJson>,
}

#[derive(Deserialize)]
struct ChainJson {
    #[serde(default)]
    certificates: Vec<crate::trust_root::RawBytesJson>,
}

#[derive(Deserialize)]
struct PublicKeyIdJson {
    hint: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimestampDataJson {
    #[serde(default)]
    rfc3161_timestamps: Vec<SignedTimestampJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignedTimestampJson {
    signed_timestamp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TlogEntryJson {
    log_index: Option<Int64Json>,
    log_id: Option<LogIdJson>,
    kind_version: Option<KindVersionJson>,
    integrated_time: Option<Int64Json>,
    inclusion_promise: Option<PromiseJson>,
    inclusion_proof: Option<ProofJson>,
    canonicalized_body: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogIdJson {
    key_id: String,
}

#[derive(Deserialize)]
struct KindVersionJson {
    kind: String,
    version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromiseJson {
    signed_entry_timestamp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProofJson {
    log_index: Option<Int64Json>,
    root_hash: Option<String>,
    tree_size: Option<Int64Json>,
    #[serde(default)]
    hashes: Vec<String>,
    checkpoint: Option<CheckpointJson>,
}

#[derive(Deserialize)]
struct CheckpointJson {
    envelope: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageSignatureJson {
    message_digest: Option<MessageDigestJson>,
    signature: Option<String>,
}

#[derive(Deserialize)]
struct MessageDigestJson {
    algorithm: String,
    digest: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvelopeJson {
    payload: String,
    payload_type: String,
    #[serde(default)]
    signatures: Vec<EnvelopeSigJson>,
}

#[derive(Deserialize)]
struct EnvelopeSigJson {
    sig: String,
    #[serde(default)]
    keyid: String,
}

/// Protobuf JSON `bytes`: standard or URL-safe base64, padded or not; line breaks are
/// skipped (as Go's decoder does: some tools wrap base64 at 76 columns).
fn b64(field: &str, s: &str) -> Result<Vec<u8>, BundleError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CONFIG);
    const URL: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CONFIG);
    let cleaned: String;
    let s = if s.contains(['\r', '\n']) {
        cleaned = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        &cleaned
    } else {
        s
    };
    let engine = if s.contains(['-', '_']) { &URL } else { &STD };
    engine
        .decode(s)
        .map_err(|e| field_err(field, format!("invalid base64 ({e})")))
}

fn hash_algorithm(field: &str, s: &str) -> Result<HashAlgorithm, BundleError> {
    match s {
        "SHA2_256" => Ok(HashAlgorithm::Sha256),
        "SHA2_384" => Ok(HashAlgorithm::Sha384),
        "SHA2_512" => Ok(HashAlgorithm::Sha512),
        other => Err(field_err(
            field,
            format!("unsupported hash algorithm {other:?}"),
        )),
    }
}

impl BundleJson {
    fn into_bundle(self) -> Result<Bundle, BundleError> {
        let version = BundleVersion::from_media_type(&self.media_type)
            .ok_or_else(|| BundleError::MediaType(self.media_type.clone()))?;
        let vm = self
            .verification_material
            .ok_or_else(|| field_err("verificationMaterial", "missing"))?;

        let present = [
            vm.x509_certificate_chain.is_some(),
            vm.certificate.is_some(),
            vm.public_key.is_some(),
        ];
        if present.iter().filter(|p| **p).count() != 1 {
            return Err(field_err(
                "verificationMaterial",
                "must have exactly one of x509CertificateChain, certificate, publicKey",
            ));
        }
        let mut extra_chain = Vec::new();
        let material = if let Some(chain) = vm.x509_certificate_chain {
            if version >= BundleVersion::V0_3 {
                return Err(field_err(
                    "verificationMaterial.x509CertificateChain",
                    "not allowed in a v0.3 bundle (use certificate)",
                ));
            }
            let mut certs = chain
                .certificates
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    b64(
                        &format!(
                            "verificationMaterial.x509CertificateChain.certificates[{i}].rawBytes"
                        ),
                        &c.raw_bytes,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            if certs.is_empty() || certs[0].is_empty() {
                return Err(field_err(
                    "verificationMaterial.x509CertificateChain.certificates",
                    "empty certificate chain",
                ));
            }
            extra_chain = certs.split_off(1);
            VerificationMaterial::Certificate(certs.remove(0))
        } else if let Some(cert) = vm.certificate {
            let der = b64("verificationMaterial.certificate.rawBytes", &cert.raw_bytes)?;
            if der.is_empty() {
                return Err(field_err(
                    "verificationMaterial.certificate.rawBytes",
                    "empty",
                ));
            }
            VerificationMaterial::Certificate(der)
        } else {
            VerificationMaterial::PublicKey {
                hint: vm.public_key.and_then(|k| k.hint),
            }
        };

        if vm.tlog_entries.len() > MAX_TLOG_ENTRIES {
            return Err(field_err(
                "verificationMaterial.tlogEntries",
                format!("more than {MAX_TLOG_ENTRIES} entries"),
            ));
        }
        let tlog_entries = vm
            .tlog_entries
            .iter()
            .enumerate()
            .map(|(i, e)| e.parse(&format!("verificationMaterial.tlogEntries[{i}]"), version))
            .collect::<Result<Vec<_>, _>>()?;

        let ts = vm
            .timestamp_verification_data
            .map(|t| t.rfc3161_timestamps)
            .unwrap_or_default();
        if ts.len() > MAX_TIMESTAMPS {
            return Err(field_err(
                "verificationMaterial.timestampVerificationData.rfc3161Timestamps",
                format!("more than {MAX_TIMESTAMPS} timestamps"),
            ));
        }
        let rfc3161_timestamps = ts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                b64(
                    &format!("verificationMaterial.timestampVerificationData.rfc3161Timestamps[{i}].signedTimestamp"),
                    &t.signed_timestamp,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;

        let content = match (self.message_signature, self.dsse_envelope) {
            (Some(ms), None) => {
                let sig = ms
                    .signature
                    .ok_or_else(|| field_err("messageSignature.signature", "missing"))?;
                let signature = b64("messageSignature.signature", &sig)?;
                if signature.is_empty() {
                    return Err(field_err("messageSignature.signature", "empty"));
                }
                let digest = ms
                    .message_digest
                    .map(|d| {
                        Ok::<_, BundleError>(MessageDigest {
                            algorithm: hash_algorithm(
                                "messageSignature.messageDigest.algorithm",
                                &d.algorithm,
                            )?,
                            digest: b64("messageSignature.messageDigest.digest", &d.digest)?,
                        })
                    })
                    .transpose()?;
                if let Some(d) = &digest {
                    if d.digest.len() != d.algorithm.output_len() {
                        return Err(field_err(
                            "messageSignature.messageDigest.digest",
                            format!(
                                "{} bytes, {:?} has {}",
                                d.digest.len(),
                                d.algorithm,
                                d.algorithm.output_len()
                            ),
                        ));
                    }
                }
                Content::MessageSignature { digest, signature }
            }
            (None, Some(env)) => {
                let payload = b64("dsseEnvelope.payload", &env.payload)?;
                if env.signatures.len() != 1 {
                    return Err(field_err(
                        "dsseEnvelope.signatures",
                        format!(
                            "{} signatures, exactly one is supported",
                            env.signatures.len()
                        ),
                    ));
                }
                let signatures = env
                    .signatures
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let sig = b64(&format!("dsseEnvelope.signatures[{i}].sig"), &s.sig)?;
                        if sig.is_empty() {
                            return Err(field_err(
                                format!("dsseEnvelope.signatures[{i}].sig"),
                                "empty",
                            ));
                        }
                        Ok(EnvelopeSignature {
                            sig,
                            keyid: s.keyid.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Content::Dsse(Envelope {
                    payload,
                    payload_type: env.payload_type,
                    signatures,
                })
            }
            (Some(_), Some(_)) => {
                return Err(field_err(
                    "content",
                    "both messageSignature and dsseEnvelope",
                ))
            }
            (None, None) => {
                return Err(field_err(
                    "content",
                    "neither messageSignature nor dsseEnvelope",
                ))
            }
        };

        Ok(Bundle {
            version,
            media_type: self.media_type,
            material,
            extra_chain,
            tlog_entries,
            rfc3161_timestamps,
            content,
        })
    }
}

impl TlogEntryJson {
    fn parse(&self, f: &str, version: BundleVersion) -> Result<TlogEntry, BundleError> {
        let log_index = self
            .log_index
            .as_ref()
            .ok_or_else(|| field_err(format!("{f}.logIndex"), "missing"))?
            .non_negative(&format!("{f}.logIndex"))?;
        let log_id = b64(
            &format!("{f}.logId.keyId"),
            &self
                .log_id
                .as_ref()
                .ok_or_else(|| field_err(format!("{f}.logId"), "missing"))?
                .key_id,
        )?;
        if log_id.is_empty() {
            return Err(field_err(format!("{f}.logId.keyId"), "empty"));
        }
        let kv = self
            .kind_version
            .as_ref()
            .ok_or_else(|| field_err(format!("{f}.kindVersion"), "missing"))?;
        let integrated_time = match &self.integrated_time {
            None => None,
            Some(t) => match t.non_negative(&format!("{f}.integratedTime"))? {
                0 => None,
                t => Some(t),
            },
        };
        let signed_entry_timestamp = self
            .inclusion_promise
            .as_ref()
            .map(|p| {
                b64(
                    &format!("{f}.inclusionPromise.signedEntryTimestamp"),
                    &p.signed_entry_timestamp,
                )
            })
            .transpose()?;
        let inclusion_proof = self
            .inclusion_proof
            .as_ref()
            .map(|p| p.parse(&format!("{f}.inclusionProof")))
            .transpose()?;
        let body = self
            .canonicalized_body
            .as_deref()
            .ok_or_else(|| field_err(format!("{f}.canonicalizedBody"), "missing"))?;
        let canonicalized_body = b64(&format!("{f}.canonicalizedBody"), body)?;
        if canonicalized_body.is_empty() {
            return Err(field_err(format!("{f}.canonicalizedBody"), "empty"));
        }
        if version == BundleVersion::V0_1 && signed_entry_timestamp.is_none() {
            return Err(field_err(
                format!("{f}.inclusionPromise"),
                "missing (required in v0.1 bundles)",
            ));
        }
        if version >= BundleVersion::V0_2 && inclusion_proof.is_none() {
            return Err(field_err(
                format!("{f}.inclusionProof"),
                "missing (required from v0.2 bundles on)",
            ));
        }
        if signed_entry_timestamp.is_some() && integrated_time.is_none() {
            return Err(field_err(
                format!("{f}.integratedTime"),
                "missing, but the entry has an inclusion promise over it",
            ));
        }
        Ok(TlogEntry {
            log_index,
            log_id,
            kind: kv.kind.clone(),
            version: kv.version.clone(),
            integrated_time,
            signed_entry_timestamp,
            inclusion_proof,
            canonicalized_body,
        })
    }
}

impl ProofJson {
    fn parse(&self, f: &str) -> Result<InclusionProof, BundleError> {
        let log_index = self
            .log_index
            .as_ref()
            .ok_or_else(|| field_err(format!("{f}.logIndex"), "missing"))?
            .non_negative(&format!("{f}.logIndex"))?;
        let tree_size = self
            .tree_size
            .as_ref()
            .ok_or_else(|| field_err(format!("{f}.treeSize"), "missing"))?
            .non_negative(&format!("{f}.treeSize"))?;
        let root_hash = b64(
            &format!("{f}.rootHash"),
            self.root_hash
                .as_deref()
                .ok_or_else(|| field_err(format!("{f}.rootHash"), "missing"))?,
        )?;
        if self.hashes.len() > MAX_PROOF_HASHES {
            return Err(field_err(
                format!("{f}.hashes"),
                format!("more than {MAX_PROOF_HASHES}"),
            ));
        }
        let hashes = self
            .hashes
            .iter()
            .enumerate()
            .map(|(i, h)| b64(&format!("{f}.hashes[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        let checkpoint = match &self.checkpoint {
            Some(c) if !c.envelope.is_empty() => Some(c.envelope.clone()),
            _ => None,
        };
        Ok(InclusionProof {
            log_index,
            root_hash,
            tree_size,
            hashes,
            checkpoint,
        })
    }
}
