//! Offline verification of Sigstore bundles, as cosign 3 and the other Sigstore clients write
//! them: the signature (a message signature or a DSSE envelope) by a public key or a Fulcio
//! certificate chained to a trusted root (`trusted_root.json`), the certificate's signed
//! certificate timestamps, the transparency log entry (Rekor v1: signed entry timestamp and
//! inclusion proof; Rekor v2: inclusion proof to a signed checkpoint), RFC 3161 timestamps,
//! and the rule that the signing time falls inside every validity window involved.
//!
//! Module map:
//! - [`trust_root`]: the Sigstore `TrustedRoot` (CAs, Rekor logs, CT logs, TSAs, validity).
//! - [`bundle`]: the bundle format (media types v0.1, v0.2, v0.3).
//! - [`checkpoint`]: signed checkpoints (C2SP signed notes) of transparency logs.
//! - [`rfc3161`]: RFC 3161 time-stamp tokens (CMS SignedData over a TSTInfo).

pub mod checkpoint;
pub mod rfc3161;

use std::time::SystemTime;

/// A validity window as the trusted root gives it; both ends inclusive, either may be open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ValidFor {
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
}

impl ValidFor {
    /// Whether `t` is inside the window (both ends inclusive).
    pub fn contains(&self, t: SystemTime) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t <= e)
    }
}
