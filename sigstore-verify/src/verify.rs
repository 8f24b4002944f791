//! Verifying a bundle against a [`Policy`] and a [`TrustedRoot`], in the manner of
//! sigstore-go's `SignedEntityVerifier`: establish the signer (certificate chained to a CA
//! with SCTs and the expected identity, or the policy's key), check the signature over the
//! artifact, verify the transparency log entries and RFC 3161 timestamps, collect the
//! verified signing times, and require the certificate to be valid at each of them.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, BundleError, BundleVersion, Content, VerificationMaterial};
use crate::certificate::{self, CertificateError, CertificateIdentity, SigningCertificate};
use crate::dsse::{self, Statement, StatementError};
use crate::identity::{ExpectedIdentity, IdentityError};
use crate::keys::{HashAlgorithm, PublicKey, SignatureError, SignatureScheme};
use crate::rekor::{LoggedSubject, RekorVersion};
use crate::rfc3161;
use crate::sct::{self, SctError, VerifiedSct};
use crate::time::Rfc3339;
use crate::tlog::{self, BundleClaim, ClaimSubject, SignerMaterial, TlogError, VerifiedLogEntry};
use crate::trust_root::TrustedRoot;
use crate::tsp;

/// What was signed, as the caller has it.
#[derive(Clone, Copy, Debug)]
pub enum Artifact<'a> {
    /// The artifact's bytes.
    Bytes(&'a [u8]),
    /// Only its SHA-256 (e.g. an OCI manifest digest).
    Sha256([u8; 32]),
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a digest of the form sha256:<64 hex digits>")]
pub struct DigestParseError(pub String);

impl Artifact<'_> {
    /// Parses `sha256:<hex>`.
    pub fn parse_digest(s: &str) -> Result<Artifact<'static>, DigestParseError> {
        let hexpart = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestParseError(s.into()))?;
        if hexpart.len() != 64 {
            return Err(DigestParseError(s.into()));
        }
        let bytes = hex::decode(hexpart).map_err(|_| DigestParseError(s.into()))?;
        Ok(Artifact::Sha256(bytes.try_into().expect("32 bytes")))
    }

    fn digest(&self, alg: HashAlgorithm) -> Option<Vec<u8>> {
        match (self, alg) {
            (Artifact::Bytes(b), alg) => Some(alg.digest(b)),
            (Artifact::Sha256(d), HashAlgorithm::Sha256) => Some(d.to_vec()),
            _ => None,
        }
    }
}

/// Who must have signed.
#[derive(Clone, Debug)]
pub enum SignerPolicy {
    /// Keyless: a Fulcio certificate with this identity.
    Identity(ExpectedIdentity),
    /// A key the caller trusts (`publicKey` bundles).
    Key(PublicKey),
}

/// What a verification requires. Build with [`Policy::identity`] or [`Policy::key`].
#[derive(Clone, Debug)]
pub struct Policy {
    pub signer: SignerPolicy,
    /// Verified transparency log entries required, counted once per log (as sigstore-go's
    /// threshold does).
    pub tlog_entries: usize,
    /// Verified signing times required: integrated times vouched for by a SET plus RFC 3161
    /// timestamps.
    pub observer_timestamps: usize,
    /// Whether the signing certificate must carry an SCT verified with a trusted CT log.
    pub require_sct: bool,
}

impl Policy {
    /// Keyless: one log entry, one verified signing time, an SCT.
    pub fn identity(expected: ExpectedIdentity) -> Self {
        Policy {
            signer: SignerPolicy::Identity(expected),
            tlog_entries: 1,
            observer_timestamps: 1,
            require_sct: true,
        }
    }

    /// With a key: one log entry; signing times are recorded when present but a key has no
    /// validity window to check them against.
    pub fn key(key: PublicKey) -> Self {
        Policy {
            signer: SignerPolicy::Key(key),
            tlog_entries: 1,
            observer_timestamps: 0,
            require_sct: false,
        }
    }

    /// No transparency log entry is required (e.g. cosign `sign --key --tlog-upload=false`
    /// bundles, which carry only `publicKey.hint`). Entries present are still verified.
    pub fn without_tlog(mut self) -> Self {
        self.tlog_entries = 0;
        self
    }
}

/// The signature format of a verified bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureFormat {
    MessageSignature,
    Dsse {
        payload_type: String,
        /// For in-toto statements: the predicate type.
        predicate_type: Option<String>,
    },
}

/// Who signed, as verified.
#[derive(Clone, Debug)]
pub enum Signer {
    Certificate {
        identity: CertificateIdentity,
        certificate_der: Vec<u8>,
        /// The trusted root CA (its URI) that issued it.
        ca_uri: String,
        scts: Vec<VerifiedSct>,
    },
    Key {
        /// SHA-256 of the key's SPKI, hex.
        key_id: String,
        /// The bundle's unauthenticated hint.
        hint: Option<String>,
    },
}

/// Where a verified signing time comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimeSource {
    /// A Rekor v1 integrated time with a verified SET.
    TransparencyLog { log_url: String, log_index: u64 },
    /// An RFC 3161 timestamp (index in the bundle).
    Rfc3161 { index: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedTime {
    pub time: SystemTime,
    pub source: TimeSource,
}

/// The result of a successful verification, for audit.
#[derive(Clone, Debug)]
pub struct VerifiedBundle {
    pub bundle_version: BundleVersion,
    pub format: SignatureFormat,
    pub signer: Signer,
    pub tlog_entries: Vec<VerifiedLogEntry>,
    pub timestamps: Vec<VerifiedTime>,
    /// Material that was present but not counted (unknown logs, timestamps that did not
    /// verify), with the reason.
    pub ignored: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error("SCT: {0}")]
    Sct(#[from] SctError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0}")]
    SignerMismatch(String),
    #[error("{what}: {source}")]
    Signature {
        what: &'static str,
        #[source]
        source: SignatureError,
    },
    #[error("artifact: {0}")]
    Artifact(String),
    #[error(transparent)]
    Statement(#[from] StatementError),
    #[error("tlogEntries[{index}] ({log}): {source}")]
    Tlog {
        index: usize,
        log: String,
        #[source]
        source: Box<TlogError>,
    },
    #[error("tlogEntries: duplicate entry (log {log}, index {log_index})")]
    DuplicateEntry { log: String, log_index: u64 },
    #[error("verified transparency log entries from {found} logs, {required} required{}", notes(.ignored))]
    TooFewTlogEntries {
        found: usize,
        required: usize,
        ignored: Vec<String>,
    },
    #[error("{found} verified signing times (SET-backed integrated times and RFC 3161 timestamps), {required} required{}", notes(.ignored))]
    TooFewTimestamps {
        found: usize,
        required: usize,
        ignored: Vec<String>,
    },
    #[error("tlogEntries[{index}]: Rekor v2 entry, but no verified timestamp {at} falls inside the log key's validity ({log})")]
    LogKeyNotValid {
        index: usize,
        log: String,
        at: String,
    },
}

fn notes(ignored: &[String]) -> String {
    if ignored.is_empty() {
        String::new()
    } else {
        format!(" ({})", ignored.join("; "))
    }
}

/// Parses and verifies a bundle's JSON (see [`verify`]).
pub fn verify_json(
    bundle_json: &str,
    artifact: Artifact<'_>,
    policy: &Policy,
    root: &TrustedRoot,
) -> Result<VerifiedBundle, VerifyError> {
    let bundle = Bundle::from_json(bundle_json)?;
    verify(&bundle, artifact, policy, root)
}

/// Verifies `bundle` over `artifact` as `policy` requires, with the current time bounding
/// integrated times.
pub fn verify(
    bundle: &Bundle,
    artifact: Artifact<'_>,
    policy: &Policy,
    root: &TrustedRoot,
) -> Result<VerifiedBundle, VerifyError> {
    verify_at(bundle, artifact, policy, root, SystemTime::now())
}

/// The signer established from the bundle's material and the policy.
struct EstablishedSigner<'r> {
    key: PublicKey,
    cert: Option<(SigningCertificate, Vec<certificate::IssuingCa<'r>>)>,
    signer: Signer,
}

fn establish_signer<'r>(
    bundle: &Bundle,
    policy: &Policy,
    root: &'r TrustedRoot,
) -> Result<EstablishedSigner<'r>, VerifyError> {
    match (&bundle.material, &policy.signer) {
        (VerificationMaterial::Certificate(der), SignerPolicy::Identity(expected)) => {
            certificate::check_bundle_chain(&bundle.extra_chain)?;
            let leaf = SigningCertificate::parse(der)?;
            let cas = certificate::issuing_cas(&leaf, root)?;
            let mut scts = Vec::new();
            if policy.require_sct {
                let mut last = None;
                for ca in &cas {
                    match sct::verify_scts(&leaf.parsed, ca.issuer(), root) {
                        Ok(v) => {
                            scts = v;
                            last = None;
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                if let Some(e) = last {
                    return Err(e.into());
                }
            }
            expected.check(&leaf.identity)?;
            let signer = Signer::Certificate {
                identity: leaf.identity.clone(),
                certificate_der: der.clone(),
                ca_uri: cas[0].ca.uri.clone(),
                scts,
            };
            Ok(EstablishedSigner {
                key: leaf.parsed.key.clone(),
                cert: Some((leaf, cas)),
                signer,
            })
        }
        (VerificationMaterial::PublicKey { hint }, SignerPolicy::Key(key)) => Ok(EstablishedSigner {
            key: key.clone(),
            cert: None,
            signer: Signer::Key {
                key_id: hex::encode(key.key_id()),
                hint: hint.clone(),
            },
        }),
        (VerificationMaterial::PublicKey { .. }, SignerPolicy::Identity(_)) => Err(VerifyError::SignerMismatch(
            "bundle is signed with a key (verificationMaterial.publicKey), but no key was given to verify it with".into(),
        )),
        (VerificationMaterial::Certificate(_), SignerPolicy::Key(_)) => Err(VerifyError::SignerMismatch(
            "bundle is signed with a certificate, but a key was given (verify it by identity)".into(),
        )),
    }
}

/// Checks the signature over the artifact; returns the format and what the log entries must
/// record.
fn check_signature(
    bundle: &Bundle,
    artifact: Artifact<'_>,
    key: &PublicKey,
) -> Result<(SignatureFormat, ClaimSubject), VerifyError> {
    match &bundle.content {
        Content::MessageSignature { digest, signature } => {
            let alg = digest
                .as_ref()
                .map_or(HashAlgorithm::Sha256, |d| d.algorithm);
            let ours = artifact.digest(alg).ok_or_else(|| {
                VerifyError::Artifact(format!("the bundle's digest is {alg:?}, but only a SHA-256 digest of the artifact was given"))
            })?;
            if let Some(d) = digest {
                if d.digest != ours {
                    return Err(VerifyError::Artifact(format!(
                        "messageSignature.messageDigest {} is not the artifact's digest {}",
                        hex::encode(&d.digest),
                        hex::encode(&ours)
                    )));
                }
            }
            let what = "messageSignature.signature over the artifact";
            match artifact {
                Artifact::Bytes(bytes) => {
                    let scheme = match key.default_scheme() {
                        SignatureScheme::Ecdsa(_) => SignatureScheme::Ecdsa(alg),
                        SignatureScheme::RsaPkcs1(_) => SignatureScheme::RsaPkcs1(alg),
                        other => other,
                    };
                    key.verify(scheme, bytes, signature)
                }
                Artifact::Sha256(d) => key.verify_prehashed(&d, signature),
            }
            .map_err(|source| VerifyError::Signature { what, source })?;
            Ok((
                SignatureFormat::MessageSignature,
                ClaimSubject::Artifact(LoggedSubject::Digest {
                    algorithm: alg,
                    digest: ours,
                }),
            ))
        }
        Content::Dsse(env) => {
            let pae = dsse::pae(&env.payload_type, &env.payload);
            key.verify(key.default_scheme(), &pae, &env.signatures[0].sig)
                .map_err(|source| VerifyError::Signature {
                    what: "dsseEnvelope.signatures[0] over the envelope",
                    source,
                })?;
            if env.payload_type != dsse::IN_TOTO_PAYLOAD_TYPE {
                return Err(VerifyError::Artifact(format!(
                    "DSSE payload type {:?} has no subjects to match the artifact against",
                    env.payload_type
                )));
            }
            let statement = Statement::parse(&env.payload)?;
            let ours = artifact
                .digest(HashAlgorithm::Sha256)
                .expect("SHA-256 is always available");
            if !statement.has_subject_digest("sha256", &ours) {
                return Err(VerifyError::Artifact(format!(
                    "no subject of the in-toto statement has the artifact's digest sha256:{}",
                    hex::encode(&ours)
                )));
            }
            Ok((
                SignatureFormat::Dsse {
                    payload_type: env.payload_type.clone(),
                    predicate_type: Some(statement.predicate_type.clone()),
                },
                ClaimSubject::Dsse {
                    payload_sha256: Sha256::digest(&env.payload).to_vec(),
                    pae_sha256: Sha256::digest(&pae).to_vec(),
                },
            ))
        }
    }
}

/// [`verify`] with an explicit current time.
pub fn verify_at(
    bundle: &Bundle,
    artifact: Artifact<'_>,
    policy: &Policy,
    root: &TrustedRoot,
    now: SystemTime,
) -> Result<VerifiedBundle, VerifyError> {
    let established = establish_signer(bundle, policy, root)?;
    let (format, subject) = check_signature(bundle, artifact, &established.key)?;
    let mut ignored = Vec::new();

    // Transparency log entries.
    let claim = BundleClaim {
        signature: bundle.signature_bytes(),
        signer: match &established.cert {
            Some((leaf, _)) => SignerMaterial::Certificate(&leaf.parsed.der),
            None => SignerMaterial::PublicKey(&established.key),
        },
        subject,
    };
    let mut entries: Vec<(usize, VerifiedLogEntry)> = Vec::new();
    for (index, entry) in bundle.tlog_entries.iter().enumerate() {
        let Some(log) = root.tlog(&entry.log_id) else {
            ignored.push(format!(
                "tlogEntries[{index}]: log id {} is not in the trusted root",
                base64_of(&entry.log_id)
            ));
            continue;
        };
        let verified =
            tlog::verify_entry(entry, log, &claim, now).map_err(|source| VerifyError::Tlog {
                index,
                log: log.base_url.clone(),
                source: Box::new(source),
            })?;
        if entries
            .iter()
            .any(|(_, e)| e.log_id == verified.log_id && e.log_index == verified.log_index)
        {
            return Err(VerifyError::DuplicateEntry {
                log: log.base_url.clone(),
                log_index: verified.log_index,
            });
        }
        entries.push((index, verified));
    }
    let mut logs: Vec<&[u8]> = entries.iter().map(|(_, e)| e.log_id.as_slice()).collect();
    logs.sort();
    logs.dedup();
    if logs.len() < policy.tlog_entries {
        return Err(VerifyError::TooFewTlogEntries {
            found: logs.len(),
            required: policy.tlog_entries,
            ignored,
        });
    }

    // RFC 3161 timestamps over the signature.
    let mut timestamps = Vec::new();
    let mut tsa_times = Vec::new();
    let authorities = root.rfc3161_authorities();
    for (index, response) in bundle.rfc3161_timestamps.iter().enumerate() {
        let token = match tsp::token_of(response) {
            Ok(t) => t,
            Err(e) => {
                ignored.push(format!("rfc3161Timestamps[{index}]: {e}"));
                continue;
            }
        };
        match rfc3161::verify_timestamp(&token, bundle.signature_bytes(), &authorities) {
            Ok(time) => {
                tsa_times.push(time);
                timestamps.push(VerifiedTime {
                    time,
                    source: TimeSource::Rfc3161 { index },
                });
            }
            Err(e) => ignored.push(format!("rfc3161Timestamps[{index}] did not verify: {e}")),
        }
    }
    for (_, e) in &entries {
        if let Some(time) = e.integrated_time {
            timestamps.push(VerifiedTime {
                time,
                source: TimeSource::TransparencyLog {
                    log_url: e.log_url.clone(),
                    log_index: e.log_index,
                },
            });
        }
    }
    if timestamps.len() < policy.observer_timestamps {
        return Err(VerifyError::TooFewTimestamps {
            found: timestamps.len(),
            required: policy.observer_timestamps,
            ignored,
        });
    }

    // A Rekor v2 log key must have been valid when the entry was made, which only the
    // timestamps attest.
    for (index, e) in &entries {
        if e.rekor_version == RekorVersion::V2 {
            let log = root
                .tlog(&e.log_id)
                .expect("verified entries are from known logs");
            if !tsa_times.iter().any(|t| log.valid_for.contains(*t)) {
                return Err(VerifyError::LogKeyNotValid {
                    index: *index,
                    log: log.base_url.clone(),
                    at: tsa_times
                        .iter()
                        .map(|t| Rfc3339(*t).to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
    }

    // The certificate must be valid at every verified time (and at integrated times the
    // entries carry without a SET); with none at all, now.
    let mut signer = established.signer;
    if let Some((leaf, cas)) = &established.cert {
        let mut times: Vec<SystemTime> = timestamps.iter().map(|t| t.time).collect();
        times.extend(
            entries
                .iter()
                .filter_map(|(_, e)| e.unsigned_integrated_time),
        );
        if times.is_empty() {
            times.push(now);
        }
        let mut ca_index = 0;
        for t in times {
            ca_index = certificate::check_valid_at(leaf, cas, t)?;
        }
        if let Signer::Certificate { ca_uri, .. } = &mut signer {
            *ca_uri = cas[ca_index].ca.uri.clone();
        }
    }

    Ok(VerifiedBundle {
        bundle_version: bundle.version,
        format,
        signer,
        tlog_entries: entries.into_iter().map(|(_, e)| e).collect(),
        timestamps,
        ignored,
    })
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
