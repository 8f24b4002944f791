//! Verifying one transparency log entry of a bundle: the body binds this bundle's
//! signature, signer and artifact; Rekor v1's signed entry timestamp; the inclusion proof
//! to its root hash and the checkpoint signed by the log over that root.

use std::time::{Duration, SystemTime};

use crate::bundle::TlogEntry;
use crate::checkpoint::{self, CheckpointError, CheckpointKey};
use crate::keys::{PublicKey, SignatureError};
use crate::merkle::{self, MerkleError};
use crate::rekor::{self, BodyError, LoggedClaim, LoggedSubject, RekorVersion, Verifier};
use crate::time::{from_unix, Rfc3339};
use crate::trust_root::TransparencyLog;

/// How far in the future an integrated time may be (clock skew between log and verifier).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum TlogError {
    #[error("kind {0} {1} is not supported")]
    UnsupportedKind(String, String),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("log entry does not match the bundle: {0}")]
    Mismatch(String),
    #[error("signed entry timestamp: {0}")]
    Set(SignatureError),
    #[error("integrated time {0} is in the future")]
    IntegratedTimeInFuture(Rfc3339),
    #[error("integrated time {at} is outside the validity of log key {log}")]
    LogKeyNotValid { at: Rfc3339, log: String },
    #[error("no inclusion proof (a Rekor v2 entry must have one)")]
    NoInclusionProof,
    #[error("neither an inclusion proof nor a signed entry timestamp")]
    NoEvidence,
    #[error("inclusion proof has no checkpoint")]
    NoCheckpoint,
    #[error("inclusion proof: {0}")]
    Merkle(#[from] MerkleError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint is for tree size {checkpoint_size} and root {checkpoint_root}, the proof for {proof_size} and {proof_root}")]
    CheckpointMismatch {
        checkpoint_size: u64,
        checkpoint_root: String,
        proof_size: u64,
        proof_root: String,
    },
}

/// What the bundle claims, for comparison with the log entry.
pub struct BundleClaim<'a> {
    /// The signature bytes of the bundle.
    pub signature: &'a [u8],
    /// The signer as the log should have recorded it.
    pub signer: SignerMaterial<'a>,
    /// For a message signature: the artifact digest (algorithm of the bundle). For DSSE: the
    /// payload's SHA-256 and the digest of the PAE (what Rekor v2 hashedrekord records).
    pub subject: ClaimSubject,
}

pub enum SignerMaterial<'a> {
    Certificate(&'a [u8]),
    PublicKey(&'a PublicKey),
}

pub enum ClaimSubject {
    Artifact(LoggedSubject),
    Dsse {
        payload_sha256: Vec<u8>,
        pae_sha256: Vec<u8>,
    },
}

/// A verified entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedLogEntry {
    pub log_id: Vec<u8>,
    pub log_url: String,
    pub log_index: u64,
    pub rekor_version: RekorVersion,
    pub kind: String,
    pub kind_version: String,
    /// The integrated time if a signed entry timestamp vouches for it.
    pub integrated_time: Option<SystemTime>,
    /// The integrated time carried without a signed entry timestamp (not evidence).
    pub unsigned_integrated_time: Option<SystemTime>,
    /// Tree size and root of the verified checkpoint, if the entry had an inclusion proof.
    pub checkpoint: Option<(u64, Vec<u8>)>,
}

fn verifier_matches(v: &Verifier, signer: &SignerMaterial<'_>) -> bool {
    match (v, signer) {
        (Verifier::Certificate(der), SignerMaterial::Certificate(leaf)) => der == leaf,
        (Verifier::PublicKey(der), SignerMaterial::PublicKey(key)) => {
            PublicKey::from_spki_der(der).is_ok_and(|k| k.spki_der() == key.spki_der())
        }
        _ => false,
    }
}

fn check_claim(
    logged: &LoggedClaim,
    claim: &BundleClaim<'_>,
    v: RekorVersion,
) -> Result<(), TlogError> {
    let mismatch = |m: &str| TlogError::Mismatch(m.to_string());
    match (&claim.subject, &logged.subject) {
        (ClaimSubject::Artifact(ours), theirs) => {
            if ours != theirs {
                return Err(mismatch("the logged digest is not the artifact's"));
            }
        }
        (ClaimSubject::Dsse { payload_sha256, .. }, LoggedSubject::DssePayloadSha256(h)) => {
            if h != payload_sha256 {
                return Err(mismatch(
                    "the logged payload hash is not the envelope payload's",
                ));
            }
        }
        (ClaimSubject::Dsse { pae_sha256, .. }, LoggedSubject::Digest { algorithm, digest }) => {
            // Rekor v2 logs DSSE as hashedrekord over the PAE.
            if v != RekorVersion::V2
                || *algorithm != crate::keys::HashAlgorithm::Sha256
                || digest != pae_sha256
            {
                return Err(mismatch(
                    "the logged digest is not the digest of the envelope's PAE",
                ));
            }
        }
    }
    if logged.signatures.len() != 1 {
        return Err(mismatch("the log entry has more than one signature"));
    }
    let s = &logged.signatures[0];
    if s.signature != claim.signature {
        return Err(mismatch("the logged signature is not the bundle's"));
    }
    if !verifier_matches(&s.verifier, &claim.signer) {
        return Err(mismatch(
            "the logged certificate or key is not the bundle's signer",
        ));
    }
    Ok(())
}

/// Verifies `entry` from `log` against `claim`. `now` bounds the integrated time.
pub fn verify_entry(
    entry: &TlogEntry,
    log: &TransparencyLog,
    claim: &BundleClaim<'_>,
    now: SystemTime,
) -> Result<VerifiedLogEntry, TlogError> {
    let version = rekor::rekor_version(&entry.kind, &entry.version)
        .ok_or_else(|| TlogError::UnsupportedKind(entry.kind.clone(), entry.version.clone()))?;
    let logged = rekor::parse_body(&entry.canonicalized_body, &entry.kind, &entry.version)?;
    check_claim(&logged, claim, version)?;

    let mut integrated_time = None;
    let mut unsigned_integrated_time = None;
    if let Some(t) = entry.integrated_time {
        let t = from_unix(t);
        if t > now + MAX_CLOCK_SKEW {
            return Err(TlogError::IntegratedTimeInFuture(Rfc3339(t)));
        }
        unsigned_integrated_time = Some(t);
    }
    if version == RekorVersion::V1 {
        if let Some(set) = &entry.signed_entry_timestamp {
            let t = entry
                .integrated_time
                .expect("bundle parsing requires it with a SET");
            let payload =
                rekor::set_payload(&entry.canonicalized_body, t, &entry.log_id, entry.log_index);
            log.key
                .verify(log.scheme, &payload, set)
                .map_err(TlogError::Set)?;
            let t = from_unix(t);
            if !log.valid_for.contains(t) {
                return Err(TlogError::LogKeyNotValid {
                    at: Rfc3339(t),
                    log: log.base_url.clone(),
                });
            }
            integrated_time = Some(t);
            unsigned_integrated_time = None;
        }
    }

    let checkpoint = match &entry.inclusion_proof {
        None if version == RekorVersion::V2 => return Err(TlogError::NoInclusionProof),
        None if integrated_time.is_none() => return Err(TlogError::NoEvidence),
        None => None,
        Some(proof) => {
            let leaf = merkle::leaf_hash(&entry.canonicalized_body);
            merkle::verify_inclusion(
                proof.log_index,
                proof.tree_size,
                &leaf,
                &proof.hashes,
                &proof.root_hash,
            )?;
            let envelope = proof.checkpoint.as_deref().ok_or(TlogError::NoCheckpoint)?;
            let cp = checkpoint::verify_checkpoint(
                envelope,
                &CheckpointKey {
                    spki_der: log.key.spki_der(),
                    base_url: &log.base_url,
                    valid_for: log.valid_for,
                },
            )?;
            if cp.size != proof.tree_size || cp.root_hash != proof.root_hash {
                return Err(TlogError::CheckpointMismatch {
                    checkpoint_size: cp.size,
                    checkpoint_root: hex::encode(&cp.root_hash),
                    proof_size: proof.tree_size,
                    proof_root: hex::encode(&proof.root_hash),
                });
            }
            Some((cp.size, cp.root_hash))
        }
    };

    Ok(VerifiedLogEntry {
        log_id: entry.log_id.clone(),
        log_url: log.base_url.clone(),
        log_index: entry.log_index,
        rekor_version: version,
        kind: entry.kind.clone(),
        kind_version: entry.version.clone(),
        integrated_time,
        unsigned_integrated_time,
        checkpoint,
    })
}
