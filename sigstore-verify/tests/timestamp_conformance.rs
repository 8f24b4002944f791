//! `verify_timestamp` over the RFC 3161 timestamps of the sigstore-conformance `bundle-verify`
//! cases: each over the bundle's signature bytes, with the trusted root's authorities.

mod common;

use std::time::{Duration, SystemTime};

use common::{rfc3339, Authorities, Case};
use sigstore_verify::rfc3161::{verify_timestamp, TimestampAuthority, TimestampError};
use sigstore_verify::ValidFor;

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

fn load(name: &str) -> (Case, Vec<u8>, Authorities) {
    let case = Case::load(name).unwrap();
    let signature = case.signature_bytes().unwrap();
    let authorities = case.timestamp_authorities();
    (case, signature, authorities)
}

fn one(results: Vec<Result<SystemTime, TimestampError>>) -> Result<SystemTime, TimestampError> {
    let [result] = <[_; 1]>::try_from(results).expect("one timestamp");
    result
}

#[test]
fn tokens_with_and_without_embedded_certificate() {
    for name in [
        "rekor2-timestamp-with-embedded-cert",
        "rekor2-timestamp-without-embedded-cert",
        "rekor2-happy-path",
        "rekor2-dsse-happy-path",
        "intoto-with-custom-trust-root",
        "managed-key-happy-path",
    ] {
        only(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The local TSA's chain expired minutes after issuing the token: still good, since every
/// certificate was valid at genTime. Its twin, stamped after the expiry, is refused.
#[test]
fn expired_chain_judged_at_gen_time() {
    only("rekor2-timestamp-with-expired-cert-chain").unwrap();
    let err = only("rekor2-timestamp-outside-tsa-cert-validity_fail").unwrap_err();
    assert!(
        matches!(err, TimestampError::OutsideCertificateValidity { .. }),
        "{err}"
    );
}

#[test]
fn authority_validity_end_is_inclusive() {
    let (case, signature, mut authorities) = load("trust-root-tsa-validity-end-inclusive");
    let end = rfc3339("2025-06-12T12:02:20Z");
    assert_eq!(authorities[0].1.end, Some(end));
    assert_eq!(
        one(verify_with(&case, &signature, &authorities)).unwrap(),
        end
    );

    authorities[0].1.end = Some(end - Duration::from_secs(1));
    let err = one(verify_with(&case, &signature, &authorities)).unwrap_err();
    assert!(
        matches!(err, TimestampError::OutsideAuthorityValidity { .. }),
        "{err}"
    );
}

#[test]
fn outside_trust_root_validity_and_its_control() {
    let (case, signature, mut authorities) =
        load("rekor2-timestamp-outside-trust-root-tsa-validity_fail");
    let err = one(verify_with(&case, &signature, &authorities)).unwrap_err();
    assert!(
        matches!(err, TimestampError::OutsideAuthorityValidity { .. }),
        "{err}"
    );
    authorities[0].1.end = None;
    one(verify_with(&case, &signature, &authorities)).unwrap();
}

/// Payload mismatch: the token is genuine but over another bundle's signature; a genuine
/// token over a changed signature fails the same way.
#[test]
fn imprint_mismatch() {
    let err = only("rekor2-timestamp-payload-mismatch_fail").unwrap_err();
    assert!(
        matches!(err, TimestampError::ImprintMismatch { .. }),
        "{err}"
    );

    let (case, mut signature, authorities) = load("rekor2-happy-path");
    one(verify_with(&case, &signature, &authorities)).unwrap();
    signature[0] ^= 1;
    let err = one(verify_with(&case, &signature, &authorities)).unwrap_err();
    assert!(
        matches!(err, TimestampError::ImprintMismatch { .. }),
        "{err}"
    );
}

/// A token that verifies with the right authority, but whose time is outside the bundle's
/// signing certificate: that comparison is the caller's.
#[test]
fn incorrect_time_is_the_callers_check() {
    let time = only("rekor2-timestamp-with-incorrect-time_fail").unwrap();
    let happy = only("rekor2-happy-path").unwrap();
    assert!(time > happy + Duration::from_secs(3600));
}

/// FreeTSA's tokens are refused as untrusted; the one embedding FreeTSA's chain verifies
/// when that chain is made the authority (so the refusal is about trust only).
#[test]
fn untrusted_tsa_and_its_control() {
    for name in [
        "rekor2-timestamp-untrusted-tsa-with-embedded-cert_fail",
        "rekor2-timestamp-untrusted-tsa-without-embedded-cert_fail",
    ] {
        let err = only(name).unwrap_err();
        assert!(
            matches!(err, TimestampError::UntrustedTsa { .. }),
            "{name}: {err}"
        );
    }
    let (case, signature, _) = load("rekor2-timestamp-untrusted-tsa-with-embedded-cert_fail");
    let chain = embedded_chain(&case.timestamps()[0]);
    let free_tsa = vec![(chain, ValidFor::default())];
    one(verify_with(&case, &signature, &free_tsa)).unwrap();
}

/// Every authority is tried, and the error reported is the one from the authority the
/// signing certificate chains to.
#[test]
fn every_authority_is_tried() {
    let (case, signature, staging) = load("rekor2-happy-path");
    let public_good = Case::load("happy-path-v0.3")
        .unwrap()
        .timestamp_authorities();
    let both: Vec<_> = public_good.iter().chain(&staging).cloned().collect();
    one(verify_with(&case, &signature, &both)).unwrap();

    let err = one(verify_with(&case, &signature, &public_good)).unwrap_err();
    assert!(matches!(err, TimestampError::UntrustedTsa { .. }), "{err}");

    let mut staging_expired = staging.clone();
    staging_expired[0].1.end = Some(rfc3339("2025-05-01T00:00:00Z"));
    let both: Vec<_> = public_good
        .iter()
        .chain(&staging_expired)
        .cloned()
        .collect();
    let err = one(verify_with(&case, &signature, &both)).unwrap_err();
    assert!(
        matches!(err, TimestampError::OutsideAuthorityValidity { .. }),
        "{err}"
    );

    let err = one(verify_with(&case, &signature, &[])).unwrap_err();
    assert!(matches!(err, TimestampError::NoAuthorities), "{err}");
}

/// An authority given without its leaf: the token must then embed the signing certificate.
#[test]
fn authority_without_leaf() {
    let (case, signature, mut authorities) = load("rekor2-timestamp-with-embedded-cert");
    authorities[0].0.remove(0);
    one(verify_with(&case, &signature, &authorities)).unwrap();

    let (case, signature, mut authorities) = load("rekor2-timestamp-without-embedded-cert");
    authorities[0].0.remove(0);
    let err = one(verify_with(&case, &signature, &authorities)).unwrap_err();
    assert!(matches!(err, TimestampError::UntrustedTsa { .. }), "{err}");
}

/// Tampering inside the token: a changed signature byte, a changed TSTInfo byte.
#[test]
fn tampered_tokens() {
    let (case, signature, authorities) = load("rekor2-happy-path");
    let token = &case.timestamps()[0];
    let parts = token_parts(token);
    let verify = |t: &[u8]| {
        let authorities: Vec<_> = authorities
            .iter()
            .map(|(c, v)| TimestampAuthority {
                cert_chain: c,
                valid_for: *v,
            })
            .collect();
        verify_timestamp(t, &signature, &authorities)
    };
    verify(token).unwrap();

    // The last byte of the ECDSA signature (inside its `s` INTEGER).
    let mut bad_sig = token.clone();
    let at = find(token, &parts.signature) + parts.signature.len() - 1;
    bad_sig[at] ^= 1;
    let err = verify(&bad_sig).unwrap_err();
    assert!(matches!(err, TimestampError::BadSignature { .. }), "{err}");

    // The last byte of the TSTInfo (a letter of the TSA's name).
    let mut bad_content = token.clone();
    let at = find(token, &parts.tst_info) + parts.tst_info.len() - 1;
    bad_content[at] ^= 1;
    let err = verify(&bad_content).unwrap_err();
    assert!(
        matches!(err, TimestampError::ContentDigestMismatch),
        "{err}"
    );

    let err = verify(&token[..token.len() - 1]).unwrap_err();
    assert!(matches!(err, TimestampError::Malformed { .. }), "{err}");
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("found")
}

struct TokenParts {
    signed_data: cms::signed_data::SignedData,
    signature: Vec<u8>,
    tst_info: Vec<u8>,
}

/// The SignedData of a TimeStampResp (test-side parsing with `der` and `cms` only).
fn token_parts(response: &[u8]) -> TokenParts {
    use der::{Decode, Encode};
    let outer = der::asn1::AnyRef::from_der(response).unwrap();
    let mut reader = der::SliceReader::new(outer.value()).unwrap();
    let _status: der::asn1::AnyRef<'_> = der::Reader::decode(&mut reader).unwrap();
    let info: cms::content_info::ContentInfo = der::Reader::decode(&mut reader).unwrap();
    let signed_data: cms::signed_data::SignedData = info.content.decode_as().unwrap();
    let signature = signed_data
        .signer_infos
        .0
        .get(0)
        .unwrap()
        .signature
        .as_bytes()
        .to_vec();
    let tst_info = signed_data
        .encap_content_info
        .econtent
        .as_ref()
        .unwrap()
        .value()
        .to_vec();
    let _ = signed_data.to_der().unwrap();
    TokenParts {
        signed_data,
        signature,
        tst_info,
    }
}

/// The token's embedded certificates as an authority chain: the end-entity one first.
fn embedded_chain(response: &[u8]) -> Vec<Vec<u8>> {
    use der::Encode;
    let parts = token_parts(response);
    let mut certs: Vec<x509_cert::Certificate> = parts
        .signed_data
        .certificates
        .unwrap()
        .0
        .into_vec()
        .into_iter()
        .filter_map(|c| match c {
            cms::cert::CertificateChoices::Certificate(c) => Some(c),
            _ => None,
        })
        .collect();
    // Leaf first, then each issuer, by names.
    let mut chain = Vec::new();
    let leaf = certs
        .iter()
        .position(|c| {
            !certs
                .iter()
                .any(|o| o.tbs_certificate.issuer == c.tbs_certificate.subject && o != c)
        })
        .expect("a certificate that issued none of the others");
    let mut current = certs.remove(leaf);
    loop {
        let issuer = certs
            .iter()
            .position(|c| c.tbs_certificate.subject == current.tbs_certificate.issuer);
        chain.push(current.to_der().unwrap());
        match issuer {
            Some(i) => current = certs.remove(i),
            None => break,
        }
    }
    chain
}
