//! The running policy: a signed bundle (`policy sign`) installed with anti-rollback. Its
//! signer must be trusted, its version not below the running one's; every load is audited,
//! and the accepted bundle becomes the running one (kept in the state directory across
//! restarts, so a restart cannot roll the policy back).

use std::path::{Path, PathBuf};

use audit::{AuditSink, Event, EventKind, Outcome};
use policy::deploy::bundle::{BundleStore, InstallError, VerifiedBundle};
use policy::sigstore::VerificationKey;

use crate::error::{Error, FailureClass};
use crate::record::AUDIT_SERVICE;

/// Installs the bundle at `path`, signed by one of the keys in `key_files`, as the running
/// bundle kept in `state`. A refusal is recorded as a denied `admin.policy_load`; an
/// unreadable file or state is an operational error.
pub fn install(
    path: &Path,
    key_files: &[PathBuf],
    state: &Path,
    sink: &dyn AuditSink,
) -> Result<VerifiedBundle, Error> {
    let keys = VerificationKey::from_pem_files(key_files).map_err(|e| {
        let message = e.to_string();
        // "cannot read key X" / "key X: ..." name the bundle keys.
        Error::invalid(message.replacen("key ", "bundle key ", 1))
    })?;
    let bytes = std::fs::read(path)
        .map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))?;
    let record = |outcome, reason: String| {
        sink.append(
            Event::new(
                AUDIT_SERVICE,
                EventKind::Admin("policy_load".into()),
                outcome,
                reason,
            )
            .detail("bundle", path.display().to_string()),
        )
        .map(drop)
        .map_err(|e| {
            Error::new(
                FailureClass::Io,
                format!("cannot write the audit event: {e}"),
            )
        })
    };
    let verified = match BundleStore::new(state).install(&bytes, &keys) {
        Ok(v) => v,
        Err(InstallError::Rejected(e)) => {
            record(Outcome::Denied, e.to_string())?;
            return Err(Error::new(
                FailureClass::RejectedByPolicy,
                format!("policy bundle {}: {e}", path.display()),
            ));
        }
        Err(state_error) => return Err(Error::invalid(state_error.to_string())),
    };
    record(
        Outcome::Allowed,
        format!(
            "policy bundle version {} signed by {}",
            verified.content.version, verified.signer
        ),
    )?;
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use base64::Engine as _;
    use policy::deploy::bundle::{self, BundleContent};
    use ring::signature::KeyPair;

    use super::*;

    /// The documented example (docs/examples/policy), so the tests sign what operators read.
    const DEPLOYMENT: &str = include_str!("../../docs/examples/policy/deployment.toml");
    const IMAGE_TRUST: &str = include_str!("../../docs/examples/policy/image-trust.json");

    /// Keeps what is appended.
    #[derive(Default)]
    struct Kept(Mutex<Vec<Event>>);
    impl AuditSink for Kept {
        fn append(&self, e: Event) -> Result<audit::Receipt, audit::AuditError> {
            let mut events = self.0.lock().unwrap();
            events.push(e);
            Ok(audit::Receipt {
                seq: events.len() as u64 - 1,
                time_ns: 0,
                leaf_hash: [0; 32],
            })
        }
    }

    /// A signer: its PKCS#8 PEM and its public key as an SPKI PEM file in `dir`.
    fn signer(dir: &Path, name: &str) -> (Vec<u8>, PathBuf) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let private = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            b64.encode(pkcs8.as_ref())
        );
        let public = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            b64.encode(bundle::ed25519_spki(pair.public_key().as_ref()))
        );
        let path = dir.join(format!("{name}.pub"));
        std::fs::write(&path, public).unwrap();
        (private.into_bytes(), path)
    }

    fn signed(dir: &Path, version: u64, private: &[u8]) -> PathBuf {
        let content = BundleContent {
            version,
            deployment: DEPLOYMENT.into(),
            image_trust: IMAGE_TRUST.into(),
        };
        let path = dir.join(format!("v{version}.bundle"));
        std::fs::write(&path, bundle::sign(&content, private).unwrap()).unwrap();
        path
    }

    fn outcomes(sink: &Kept) -> Vec<Outcome> {
        sink.0.lock().unwrap().iter().map(|e| e.outcome).collect()
    }

    #[test]
    fn newer_bundles_install_and_a_rollback_is_refused_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = signer(dir.path(), "signer");
        let state = dir.path().join("state");
        let sink = Kept::default();
        let v2 = install(
            &signed(dir.path(), 2, &private),
            std::slice::from_ref(&public),
            &state,
            &sink,
        );
        assert_eq!(v2.unwrap().content.version, 2);
        let v3 = install(
            &signed(dir.path(), 3, &private),
            std::slice::from_ref(&public),
            &state,
            &sink,
        );
        assert_eq!(v3.unwrap().content.version, 3);
        // The running version survives a restart (a new call on the same state): v2 is old.
        let e = install(&signed(dir.path(), 2, &private), &[public], &state, &sink).unwrap_err();
        assert_eq!(e.class, FailureClass::RejectedByPolicy, "{e}");
        assert_eq!(
            outcomes(&sink),
            [Outcome::Allowed, Outcome::Allowed, Outcome::Denied]
        );
    }

    #[test]
    fn an_untrusted_signer_is_refused_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let (private, _) = signer(dir.path(), "attacker");
        let (_, trusted) = signer(dir.path(), "platform");
        let sink = Kept::default();
        let e = install(
            &signed(dir.path(), 1, &private),
            &[trusted],
            &dir.path().join("state"),
            &sink,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::RejectedByPolicy, "{e}");
        assert_eq!(outcomes(&sink), [Outcome::Denied]);
        assert!(!dir.path().join("state/running.bundle").exists());
    }

    #[test]
    fn unreadable_keys_and_bundles_are_configuration_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (private, public) = signer(dir.path(), "signer");
        let sink = Kept::default();
        let bundle = signed(dir.path(), 1, &private);
        let missing = dir.path().join("missing.pub");
        let e = install(&bundle, &[missing], &dir.path().join("s"), &sink).unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidConfiguration);
        assert!(e.message.contains("bundle key"), "{e}");
        let e = install(
            &dir.path().join("none"),
            &[public],
            &dir.path().join("s"),
            &sink,
        )
        .unwrap_err();
        assert_eq!(e.class, FailureClass::InvalidConfiguration);
        // Nothing was decided, so nothing is on the record.
        assert!(outcomes(&sink).is_empty());
    }
}
