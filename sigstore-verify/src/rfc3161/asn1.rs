//! The RFC 3161 structures the `cms` crate does not have (the response wrapper, TSTInfo), and
//! the raw DER walks that recover bytes exactly as signed.

use std::time::{Duration, SystemTime};

use der::asn1::{AnyRef, BitStringRef, Ia5StringRef, IntRef, ObjectIdentifier, OctetStringRef};
use der::{Decode, Encode, Reader, Sequence, SliceReader, Tag, TagNumber, Tagged};
use spki::AlgorithmIdentifierRef;
use x509_cert::ext::Extensions;

/// `TimeStampResp` (RFC 3161 §2.4.2): what Sigstore bundles carry as `signedTimestamp`.
#[derive(Sequence)]
pub(super) struct TimeStampResp<'a> {
    pub status: PkiStatusInfo<'a>,
    pub time_stamp_token: Option<AnyRef<'a>>,
}

/// `PKIStatusInfo`: status 0 is granted, 1 granted with modifications, others refusals.
#[derive(Sequence)]
pub(super) struct PkiStatusInfo<'a> {
    pub status: u32,
    pub status_string: Option<Vec<AnyRef<'a>>>,
    pub fail_info: Option<BitStringRef<'a>>,
}

/// `TSTInfo` (RFC 3161 §2.4.2), the signed content of a time-stamp token.
#[derive(Sequence)]
pub(super) struct TstInfo<'a> {
    pub version: u8,
    pub policy: ObjectIdentifier,
    pub message_imprint: MessageImprint<'a>,
    pub serial_number: IntRef<'a>,
    /// A GeneralizedTime that may carry fractional seconds, which `der`'s own type refuses.
    pub gen_time: AnyRef<'a>,
    pub accuracy: Option<Accuracy>,
    pub ordering: Option<bool>,
    pub nonce: Option<IntRef<'a>>,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub tsa: Option<AnyRef<'a>>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    pub extensions: Option<Extensions>,
}

#[derive(Sequence)]
pub(super) struct MessageImprint<'a> {
    pub hash_algorithm: AlgorithmIdentifierRef<'a>,
    pub hashed_message: OctetStringRef<'a>,
}

#[derive(Sequence)]
pub(super) struct Accuracy {
    pub seconds: Option<u64>,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    pub millis: Option<u16>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    pub micros: Option<u16>,
}

/// `RSASSA-PSS-params` (RFC 4055 §3.1); absent fields take the (SHA-1) defaults.
#[derive(Sequence)]
pub(super) struct RsaPssParams<'a> {
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    pub hash_algorithm: Option<AlgorithmIdentifierRef<'a>>,
    #[asn1(context_specific = "1", tag_mode = "EXPLICIT", optional = "true")]
    pub mask_gen_algorithm: Option<AlgorithmIdentifierRef<'a>>,
    #[asn1(context_specific = "2", tag_mode = "EXPLICIT", optional = "true")]
    pub salt_length: Option<u32>,
    #[asn1(context_specific = "3", tag_mode = "EXPLICIT", optional = "true")]
    pub trailer_field: Option<u32>,
}

/// Parses a GeneralizedTime `YYYYMMDDhhmmss[.f...]Z` (RFC 3161 allows fractions of seconds).
pub(super) fn generalized_time(value: AnyRef<'_>) -> Result<SystemTime, String> {
    if value.tag() != Tag::GeneralizedTime {
        return Err(format!("is a {}, not a GeneralizedTime", value.tag()));
    }
    let text = Ia5StringRef::new(value.value())
        .map_err(|e| e.to_string())?
        .as_str();
    let bad = || format!("{text:?} is not YYYYMMDDhhmmss[.f]Z");
    let (whole, fraction) = text
        .strip_suffix('Z')
        .ok_or_else(bad)?
        .split_at_checked(14)
        .ok_or_else(bad)?;
    if !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n = |range: std::ops::Range<usize>| whole[range].parse::<u16>().expect("digits");
    let date = der::DateTime::new(
        n(0..4),
        n(4..6) as u8,
        n(6..8) as u8,
        n(8..10) as u8,
        n(10..12) as u8,
        n(12..14) as u8,
    )
    .map_err(|e| format!("{text:?}: {e}"))?;
    let nanos = match fraction.strip_prefix('.') {
        None if fraction.is_empty() => 0,
        Some(digits)
            if (1..=9).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{digits:0<9}").parse().expect("digits")
        }
        _ => return Err(bad()),
    };
    Ok(date.to_system_time() + Duration::from_nanos(nanos))
}

/// The elements of a constructed DER value (its content octets), each as it is encoded.
pub(super) fn elements(content: &[u8]) -> der::Result<Vec<AnyRef<'_>>> {
    let mut reader = SliceReader::new(content)?;
    let mut out = Vec::new();
    while !reader.is_finished() {
        out.push(reader.decode()?);
    }
    Ok(out)
}

/// The signer's signed attributes exactly as the token encodes them, re-tagged as the
/// `SET OF` the signature covers (RFC 5652 §5.4). Re-encoding the parsed attributes instead
/// would sort them (and their values), changing the bytes if the TSA had not.
/// `signed_data` is the content octets of the SignedData SEQUENCE.
pub(super) fn raw_signed_attributes(signed_data: &[u8]) -> Result<Vec<u8>, String> {
    let fields = elements(signed_data).map_err(|e| e.to_string())?;
    let signer_infos = fields.last().ok_or("empty SignedData")?;
    let infos = elements(signer_infos.value()).map_err(|e| e.to_string())?;
    let [info] = infos.as_slice() else {
        return Err(format!("{} signer infos, not one", infos.len()));
    };
    let signed_attrs_tag = Tag::ContextSpecific {
        constructed: true,
        number: TagNumber::N0,
    };
    let attrs = elements(info.value())
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|f| f.tag() == signed_attrs_tag)
        .ok_or("signer info has no signed attributes")?;
    AnyRef::new(Tag::Set, attrs.value())
        .and_then(|set| set.to_der())
        .map_err(|e| e.to_string())
}

/// The to-be-signed part of a certificate exactly as encoded.
pub(super) fn raw_tbs_certificate(cert_der: &[u8]) -> der::Result<Vec<u8>> {
    let cert = AnyRef::from_der(cert_der)?;
    let fields = elements(cert.value())?;
    fields
        .first()
        .ok_or_else(|| Tag::Sequence.value_error())?
        .to_der()
}
