//! Signed checkpoints of transparency logs (C2SP signed-note and tlog-checkpoint), as Rekor v1
//! and v2 inclusion proofs carry them. (Placeholder: being written.)

use crate::ValidFor;

/// A log key the trusted root names.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointKey<'a> {
    /// SubjectPublicKeyInfo DER (ECDSA P-256/P-384 or Ed25519).
    pub spki_der: &'a [u8],
    /// The log's base URL as the trusted root gives it (e.g. `https://log2025-1.rekor.sigstage.dev`).
    pub base_url: &'a str,
    pub valid_for: ValidFor,
}

/// What a verified checkpoint says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root_hash: Vec<u8>,
    /// Extension lines after the root hash, if any.
    pub extensions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint verification is not implemented yet")]
    Unimplemented,
}

/// Verifies a checkpoint envelope (the signed note text) with `key`: the note must carry a
/// signature by that key (other signatures, e.g. witness cosignatures, are tolerated), and
/// its body must be a well-formed checkpoint. Returns its contents.
pub fn verify_checkpoint(
    envelope: &str,
    key: &CheckpointKey<'_>,
) -> Result<Checkpoint, CheckpointError> {
    let _ = (envelope, key);
    Err(CheckpointError::Unimplemented)
}
