//! A self-contained inclusion proof: the event's exact bytes, its index, the proof hashes
//! and the signed checkpoint they lead to. `audit verify-proof` checks it with nothing but
//! the log's public key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::checkpoint::NoteVerifier;
use crate::event::Event;
use crate::merkle;
use crate::store::Store;
use crate::AuditError;

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
    pub fn verify(&self, verifier: &NoteVerifier) -> Result<Event, String> {
        let cp = verifier
            .open_checkpoint(&self.checkpoint)
            .map_err(|e| format!("checkpoint: {e}"))?;
        if cp.size != self.tree_size {
            return Err(format!(
                "the proof is for size {} but the checkpoint is for {}",
                self.tree_size, cp.size
            ));
        }
        let bytes = B64
            .decode(&self.event)
            .map_err(|_| "event is not base64".to_string())?;
        let proof = self
            .proof
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| format!("proof hash {h:?} is not 32 bytes of hex"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        merkle::verify_inclusion(
            self.index,
            self.tree_size,
            &merkle::leaf_hash(&bytes),
            &proof,
            &cp.root,
        )
        .map_err(|e| format!("inclusion: {e}"))?;
        let event = Event::from_canonical(&bytes)?;
        if event.seq != self.index {
            return Err(format!(
                "the event says it is {} but is proven at {}",
                event.seq, self.index
            ));
        }
        Ok(event)
    }
}
