//! A self-contained inclusion proof: the event's exact bytes, its index, the proof hashes
//! and the signed checkpoint they lead to. `audit verify-proof` checks it with nothing but
//! the log's public key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::checkpoint::NoteError;
use crate::checkpoint::NoteVerifier;
use crate::event::{Event, EventError};
use crate::merkle;
use crate::store::Store;
use crate::AuditError;

/// Why an inclusion proof does not prove its event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("checkpoint: {0}")]
    Checkpoint(#[source] NoteError),
    #[error("the proof is for size {proof} but the checkpoint is for {checkpoint}")]
    SizeMismatch { proof: u64, checkpoint: u64 },
    #[error("event is not base64")]
    EventNotBase64,
    #[error("proof hash {0:?} is not 32 bytes of hex")]
    BadHash(String),
    #[error("inclusion: {0}")]
    Inclusion(#[source] merkle::ProofError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("the event says it is {says} but is proven at {proven_at}")]
    WrongIndex { says: u64, proven_at: u64 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionBundle {
    pub index: u64,
    /// The canonical event bytes, base64 (the leaf input, exactly).
    pub event: String,
    pub tree_size: u64,
    /// Hex hashes, leaf to root.
    pub proof: Vec<String>,
    /// The signed checkpoint note for `tree_size`.
    pub checkpoint: String,
}

impl InclusionBundle {
    /// Builds the proof of event `index` against the log's latest checkpoint.
    pub fn build(store: &Store, index: u64) -> Result<Self, AuditError> {
        let note = store
            .latest_checkpoint()?
            .ok_or_else(|| AuditError::Request("the log has no checkpoint yet".into()))?;
        let size: u64 = note
            .lines()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| AuditError::Corrupt {
                index,
                reason: "the latest checkpoint has no size".into(),
            })?;
        if index >= size {
            return Err(AuditError::Request(format!(
                "event {index} is not covered by the latest checkpoint (size {size}) yet"
            )));
        }
        let bytes = store
            .event_bytes(index)?
            .ok_or_else(|| AuditError::Corrupt {
                index,
                reason: "the event is missing".into(),
            })?;
        let proof = store.inclusion_proof(index, size)?;
        Ok(Self {
            index,
            event: B64.encode(bytes),
            tree_size: size,
            proof: proof.iter().map(hex::encode).collect(),
            checkpoint: note,
        })
    }

    /// Verifies offline; returns the event it proves.
    pub fn verify(&self, verifier: &NoteVerifier) -> Result<Event, BundleError> {
        let cp = verifier
            .open_checkpoint(&self.checkpoint)
            .map_err(BundleError::Checkpoint)?;
        if cp.size != self.tree_size {
            return Err(BundleError::SizeMismatch {
                proof: self.tree_size,
                checkpoint: cp.size,
            });
        }
        let bytes = B64
            .decode(&self.event)
            .map_err(|_| BundleError::EventNotBase64)?;
        let proof = self
            .proof
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| BundleError::BadHash(h.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        merkle::verify_inclusion(
            self.index,
            self.tree_size,
            &merkle::leaf_hash(&bytes),
            &proof,
            &cp.root,
        )
        .map_err(BundleError::Inclusion)?;
        let event = Event::from_canonical(&bytes)?;
        if event.seq != self.index {
            return Err(BundleError::WrongIndex {
                says: event.seq,
                proven_at: self.index,
            });
        }
        Ok(event)
    }
}
