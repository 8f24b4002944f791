//! RFC 3161 time-stamp tokens. (Placeholder: being written.)

use std::time::SystemTime;

use crate::ValidFor;

/// A time-stamping authority the trusted root names.
#[derive(Clone, Copy, Debug)]
pub struct TimestampAuthority<'a> {
    /// Its certificate chain, DER, leaf (the TSA's signing certificate) first.
    pub cert_chain: &'a [Vec<u8>],
    pub valid_for: ValidFor,
}

#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    #[error("RFC 3161 timestamp verification is not implemented yet")]
    Unimplemented,
}

/// Verifies a DER time-stamp token (a CMS ContentInfo with SignedData over a TSTInfo) over
/// `timestamped` (the bytes whose digest the token's message imprint must be: the
/// signature bytes of the bundle), signed by one of `authorities`. Returns the token's
/// genTime.
pub fn verify_timestamp(
    token_der: &[u8],
    timestamped: &[u8],
    authorities: &[TimestampAuthority<'_>],
) -> Result<SystemTime, TimestampError> {
    let _ = (token_der, timestamped, authorities);
    Err(TimestampError::Unimplemented)
}
