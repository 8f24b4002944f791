//! RFC 3161 `TimeStampResp` (what a bundle's `signedTimestamp` holds): unwrapped to its
//! `timeStampToken` (a CMS ContentInfo) for [`crate::rfc3161::verify_timestamp`].

use der::asn1::{Any, ObjectIdentifier};
use der::{Decode, Encode, Tag, Tagged};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TspError {
    #[error("not a DER TimeStampResp or ContentInfo: {0}")]
    Der(String),
    #[error("time-stamp response status {0} (not granted)")]
    NotGranted(u32),
    #[error("time-stamp response has no token")]
    NoToken,
}

/// The token of a `TimeStampResp ::= SEQUENCE { status PKIStatusInfo, timeStampToken
/// ContentInfo OPTIONAL }` whose status is granted (0) or grantedWithMods (1). A bare
/// ContentInfo (`SEQUENCE { OID, [0] ... }`) is returned as it is.
pub fn token_of(der: &[u8]) -> Result<Vec<u8>, TspError> {
    let derr = |e: der::Error| TspError::Der(e.to_string());
    let items: Vec<Any> = Vec::from_der(der).map_err(derr)?;
    match items.first() {
        Some(first) if first.tag() == Tag::ObjectIdentifier => {
            let _: ObjectIdentifier = first.decode_as().map_err(derr)?;
            Ok(der.to_vec())
        }
        Some(first) if first.tag() == Tag::Sequence => {
            let status: Vec<Any> = first.decode_as().map_err(derr)?;
            let code: u32 = status
                .first()
                .ok_or_else(|| TspError::Der("empty PKIStatusInfo".into()))?
                .decode_as()
                .map_err(derr)?;
            if code > 1 {
                return Err(TspError::NotGranted(code));
            }
            let token = items.get(1).ok_or(TspError::NoToken)?;
            token.to_der().map_err(derr)
        }
        _ => Err(TspError::Der("expected a TimeStampResp".into())),
    }
}
