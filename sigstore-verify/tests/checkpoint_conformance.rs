//! `verify_checkpoint` over every checkpoint of the sigstore-conformance `bundle-verify`
//! cases, with the trusted root's key for the entry's log id.

mod common;

use common::{b64, valid_for, Case};
use sigstore_verify::checkpoint::{verify_checkpoint, Checkpoint, CheckpointError, CheckpointKey};

/// Verifies the checkpoint of each tlog entry of `case` with its log's key; `None` for an
/// entry of a log the trusted root does not name.
fn verify_case(case: &Case) -> Vec<Option<Result<Checkpoint, CheckpointError>>> {
    case.tlog_entries()
        .into_iter()
        .filter_map(|entry| {
            let envelope = entry["inclusionProof"]["checkpoint"]["envelope"].as_str()?;
            let key_id = entry["logId"]["keyId"].as_str().unwrap();
            let Some(tlog) = case.tlog(key_id) else {
                return Some(None);
            };
            let spki = b64(&tlog["publicKey"]["rawBytes"]);
            let key = CheckpointKey {
                spki_der: &spki,
                base_url: tlog["baseUrl"].as_str().unwrap(),
                valid_for: valid_for(&tlog["publicKey"]["validFor"]),
            };
            Some(Some(verify_checkpoint(envelope, &key)))
        })
        .collect()
}

fn only(case: &str) -> Result<Checkpoint, CheckpointError> {
    let mut results = verify_case(&Case::load(case).unwrap());
    assert_eq!(results.len(), 1, "{case}: one checkpoint");
    results
        .pop()
        .unwrap()
        .expect("the trusted root names the log")
}

/// Cases whose checkpoint itself is bad, with the error each must give. Every other case's
/// checkpoints verify (their `_fail` reasons lie elsewhere, e.g. `checkpoint-wrong-roothash_fail`
/// whose checkpoint is genuine but for another tree).
fn expected_failure(case: &str) -> Option<fn(&CheckpointError) -> bool> {
    use CheckpointError as E;
    Some(match case {
        "checkpoint-bad-keyhint_fail" => |e| matches!(e, E::KeyHintMismatch { .. }),
        "invalid-checkpoint-signature_fail" => |e| matches!(e, E::BadSignature { .. }),
        "rekor2-checkpoint-missing-log-signature_fail" => |e| matches!(e, E::Unsigned),
        "rekor2-checkpoint-missing-origin_fail" => |e| matches!(e, E::MissingOrigin),
        "rekor2-checkpoint-missing-root-hash_fail" => |e| matches!(e, E::MissingRootHash),
        "rekor2-checkpoint-missing-size_fail" => |e| matches!(e, E::MissingSize),
        "rekor2-checkpoint-no-matching-signature_fail" => |e| matches!(e, E::OriginMismatch { .. }),
        _ => return None,
    })
}

#[test]
fn every_conformance_checkpoint() {
    let mut checked = 0;
    for case in Case::all() {
        for result in verify_case(&case) {
            let Some(result) = result else {
                // The one case whose entry is from a log the trusted root does not know.
                assert_eq!(case.name, "bundle-from-wrong-instance_fail");
                continue;
            };
            checked += 1;
            match (expected_failure(&case.name), result) {
                (None, Ok(cp)) => assert!(cp.size > 0, "{}", case.name),
                (None, Err(e)) => panic!("{}: checkpoint should verify: {e}", case.name),
                (Some(_), Ok(_)) => panic!("{}: checkpoint should not verify", case.name),
                (Some(want), Err(e)) => assert!(want(&e), "{}: wrong error: {e}", case.name),
            }
        }
    }
    assert!(checked >= 60, "only {checked} checkpoints checked");
}

#[test]
fn rekor_v1_checkpoint_contents() {
    let cp = only("happy-path-v0.3").unwrap();
    assert_eq!(cp.origin, "rekor.sigstore.dev - 2605736670972794746");
    assert_eq!(cp.size, 75408393);
    assert_eq!(cp.root_hash.len(), 32);
    assert!(cp.extensions.is_empty());
}

#[test]
fn rekor_v1_checkpoint_with_extension_line() {
    // The same body as checkpoint-bad-keyhint_fail and invalid-checkpoint-signature_fail,
    // with its genuine signature.
    let cp = only("happy-path-v0.1").unwrap();
    assert_eq!(cp.size, 23083062);
    assert_eq!(cp.extensions, ["Timestamp: 1689177396617352539"]);
}

#[test]
fn rekor_v2_checkpoints_with_other_signatures() {
    for case in [
        "rekor2-happy-path",
        "rekor2-checkpoint-cosigned",
        "rekor2-checkpoint-multiple-cosigs",
        "rekor2-checkpoint-origin-not-first",
        "rekor2-checkpoint-two-sigs-from-origin",
        "rekor2-checkpoint-two-sigs-cosigned",
    ] {
        let cp = only(case).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(cp.origin, "log2025-alpha1.rekor.sigstage.dev", "{case}");
        assert_eq!(cp.size, 736, "{case}");
    }
}

#[test]
fn bad_checkpoints_fail_for_their_reason() {
    for case in [
        "checkpoint-bad-keyhint_fail",
        "invalid-checkpoint-signature_fail",
        "rekor2-checkpoint-missing-log-signature_fail",
        "rekor2-checkpoint-missing-origin_fail",
        "rekor2-checkpoint-missing-root-hash_fail",
        "rekor2-checkpoint-missing-size_fail",
        "rekor2-checkpoint-no-matching-signature_fail",
    ] {
        let err = only(case).expect_err(case);
        assert!(
            expected_failure(case).unwrap()(&err),
            "{case}: wrong error: {err}"
        );
    }
}
