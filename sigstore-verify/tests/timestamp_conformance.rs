//! `verify_timestamp` over the RFC 3161 timestamps of the sigstore-conformance `bundle-verify`
//! cases: each over the bundle's signature bytes, with the trusted root's authorities.

mod common;

use std::time::{Duration, SystemTime};

use common::{Case, rfc3339};
use sigstore_verify::ValidFor;
use sigstore_verify::rfc3161::{TimestampAuthority, TimestampError, verify_timestamp};

/// Verifies `case`'s timestamps over `timestamped` with the authorities of `trusted_root`
/// (the case's own unless given).
fn verify_with(
    case: &Case,
    timestamped: &[u8],
    authorities: &[(Vec<Vec<u8>>, ValidFor)],
) -> Vec<Result<SystemTime, TimestampError>> {
    let authorities: Vec<TimestampAuthority<'_>> = authorities
        .iter()
        .map(|(chain, valid_for)| TimestampAuthority {
            cert_chain: chain,
            valid_for: *valid_for,
        })
        .collect();
    case.timestamps()
        .iter()
        .map(|token| verify_timestamp(token, timestamped, &authorities))
        .collect()
}

fn verify_case(case: &Case) -> Vec<Result<SystemTime, TimestampError>> {
    let Some(signature) = case.signature_bytes() else {
        assert_eq!(case.name, "bundle-invalid-base64-signature_fail");
        assert!(case.timestamps().is_empty());
        return Vec::new();
    };
    verify_with(case, &signature, &case.timestamp_authorities())
}

fn only(name: &str) -> Result<SystemTime, TimestampError> {
    let mut results = verify_case(&Case::load(name).unwrap());
    assert_eq!(results.len(), 1, "{name}: one timestamp");
    results.pop().unwrap()
}

/// Cases whose timestamp itself is bad, with the error each must give. Every other case's
/// timestamps verify: e.g. `rekor2-timestamp-with-incorrect-time_fail` and
/// `intoto-tsa-timestamp-outside-cert-validity_fail` carry genuine timestamps whose time
/// falls outside the *bundle's* signing certificate, which is the caller's check.
fn expected_failure(case: &str) -> Option<fn(&TimestampError) -> bool> {
    use TimestampError as E;
    Some(match case {
        "rekor2-timestamp-outside-trust-root-tsa-validity_fail" => {
            |e| matches!(e, E::OutsideAuthorityValidity { .. })
        }
        "rekor2-timestamp-outside-tsa-cert-validity_fail" => {
            |e| matches!(e, E::OutsideCertificateValidity { .. })
        }
        "rekor2-timestamp-payload-mismatch_fail" => |e| matches!(e, E::ImprintMismatch { .. }),
        "rekor2-timestamp-untrusted-tsa-with-embedded-cert_fail"
        | "rekor2-timestamp-untrusted-tsa-without-embedded-cert_fail" => {
            |e| matches!(e, E::UntrustedTsa { .. })
        }
        _ => return None,
    })
}

#[test]
fn every_conformance_timestamp() {
    let mut checked = 0;
    for case in Case::all() {
        for result in verify_case(&case) {
            checked += 1;
            match (expected_failure(&case.name), result) {
                (None, Ok(_)) => {}
                (None, Err(e)) => panic!("{}: timestamp should verify: {e}", case.name),
                (Some(_), Ok(_)) => panic!("{}: timestamp should not verify", case.name),
                (Some(want), Err(e)) => assert!(want(&e), "{}: wrong error: {e}", case.name),
            }
        }
    }
    assert!(checked >= 30, "only {checked} timestamps checked");
}
