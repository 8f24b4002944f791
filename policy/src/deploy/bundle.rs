//! Policy bundles: the deployment policy and the image trust policy it names, a version
//! that only goes up, signed by a security-team key, in a DSSE envelope.
//!
//! ```json
//! {"payloadType": "application/vnd.ipu.policy-bundle.v1+json",
//!  "payload": "<base64 of {version, deployment, image_trust}>",
//!  "signatures": [{"keyid": "sha256:<SPKI digest>", "sig": "<base64>"}]}
//! ```
//!
//! The signature is over DSSE's pre-authentication encoding of type and payload, so a
//! signature for one kind of document cannot be replayed as another. Signing keys are
//! Ed25519 or ECDSA P-256 (PKCS#8); verification keys are SPKI PEM.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::deploy::{self, DeploymentPolicy};
use crate::dsse::{self, pae, Envelope};
use crate::sigstore::VerificationKey;
use crate::trust::Policy;

pub const PAYLOAD_TYPE: &str = "application/vnd.ipu.policy-bundle.v1+json";
/// Bundles larger than this are refused before parsing.
pub const MAX_BUNDLE_BYTES: usize = 4 << 20;

/// What a bundle carries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleContent {
    pub version: u64,
    /// The deployment policy document (TOML text).
    pub deployment: String,
    /// The containers-policy.json the deployment policy names (JSON text).
    pub image_trust: String,
}

/// Why a bundle was refused; each is a security decision the caller audits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("the bundle is not signed")]
    Unsigned,
    #[error("no signature by a trusted key (signed by {0})")]
    UnknownSigner(String),
    #[error("the signature by {0} does not verify: the bundle was changed after signing")]
    BadSignature(String),
    #[error("version {offered} is lower than the running version {running} (rollback refused)")]
    Rollback { offered: u64, running: u64 },
    #[error("version {0} is the running version with different content")]
    SameVersionDifferentContent(u64),
    #[error("invalid deployment policy in the bundle:\n{0}")]
    Deployment(String),
    #[error("invalid image trust policy in the bundle: {0}")]
    ImageTrust(String),
    #[error("signing: {0}")]
    Signing(String),
}

/// Signs `content` with a PKCS#8 PEM private key (Ed25519 or ECDSA P-256).
pub fn sign(content: &BundleContent, private_pem: &[u8]) -> Result<String, BundleError> {
    let payload = serde_json::to_vec(content).expect("bundle content serializes");
    dsse::sign(PAYLOAD_TYPE, &payload, private_pem, false)
        .map(|(envelope, _)| envelope)
        .map_err(|e| BundleError::Signing(e.0))
}

/// The SubjectPublicKeyInfo DER of a raw Ed25519 public key.
pub fn ed25519_spki(public: &[u8]) -> Vec<u8> {
    dsse::ed25519_spki(public)
}

/// Why a bundle was not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The offered bundle is not acceptable (a security decision: audit it as a denial).
    #[error(transparent)]
    Rejected(#[from] BundleError),
    /// The state directory or the running bundle cannot be read or written.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The running bundle in a state directory cannot be read, trusted or recorded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The recorded running bundle no longer verifies (tampered, or its key is no longer
    /// trusted).
    #[error("the running bundle {}: {source}", path.display())]
    Running {
        path: std::path::PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("cannot record the running bundle in {}: {source}", dir.display())]
    Record {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running bundle of a service, kept in its state directory across restarts, so a
/// restart cannot be used to roll the policy back.
#[derive(Clone, Debug)]
pub struct BundleStore {
    dir: std::path::PathBuf,
}

impl BundleStore {
    pub fn new(dir: impl Into<std::path::PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn running_path(&self) -> std::path::PathBuf {
        self.dir.join("running.bundle")
    }

    /// The running bundle, verified again with the trusted keys (`None`: none yet).
    pub fn running(
        &self,
        trusted: &[VerificationKey],
    ) -> Result<Option<VerifiedBundle>, StateError> {
        let path = self.running_path();
        match std::fs::read(&path) {
            Ok(bytes) => verify(&bytes, trusted, None)
                .map(Some)
                .map_err(|source| StateError::Running { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Verifies an offered bundle against the trusted keys and the running version and, if
    /// it is newer, records it as the running one (atomically).
    pub fn install(
        &self,
        bytes: &[u8],
        trusted: &[VerificationKey],
    ) -> Result<VerifiedBundle, InstallError> {
        let running = self.running(trusted)?;
        let verified = verify(
            bytes,
            trusted,
            running.as_ref().map(|r| (r.content.version, &r.content)),
        )?;
        if running
            .as_ref()
            .is_none_or(|r| r.content.version < verified.content.version)
        {
            let state = |source: std::io::Error| StateError::Record {
                dir: self.dir.clone(),
                source,
            };
            std::fs::create_dir_all(&self.dir).map_err(state)?;
            let tmp = self.dir.join("running.bundle.tmp");
            std::fs::write(&tmp, bytes).map_err(state)?;
            std::fs::rename(&tmp, self.running_path()).map_err(state)?;
        }
        Ok(verified)
    }
}

/// A bundle whose signature, version and documents checked out.
#[derive(Debug)]
pub struct VerifiedBundle {
    pub content: BundleContent,
    pub signer: String,
    pub deployment: DeploymentPolicy,
    pub image_trust: Policy,
}

/// Verifies a bundle against the trusted keys and the running version (`None`: nothing
/// running yet). A bundle with the running version is accepted only with identical content
/// (re-delivery); a lower version never.
pub fn verify(
    bytes: &[u8],
    trusted: &[VerificationKey],
    running: Option<(u64, &BundleContent)>,
) -> Result<VerifiedBundle, BundleError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::Malformed(format!(
            "{} bytes (limit {MAX_BUNDLE_BYTES})",
            bytes.len()
        )));
    }
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(BundleError::Malformed(format!(
            "payload type {:?} (expected {PAYLOAD_TYPE})",
            env.payload_type
        )));
    }
    let payload = B64
        .decode(&env.payload)
        .map_err(|_| BundleError::Malformed("payload is not base64".into()))?;
    if env.signatures.is_empty() {
        return Err(BundleError::Unsigned);
    }
    let message = pae(&env.payload_type, &payload);
    let mut signer = None;
    for s in &env.signatures {
        let Some(key) = trusted.iter().find(|k| k.fingerprint() == s.keyid) else {
            continue;
        };
        let sig = B64
            .decode(&s.sig)
            .map_err(|_| BundleError::Malformed("signature is not base64".into()))?;
        if !key.verify(&message, &sig) {
            return Err(BundleError::BadSignature(s.keyid.clone()));
        }
        signer = Some(s.keyid.clone());
        break;
    }
    let Some(signer) = signer else {
        let ids: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
        return Err(BundleError::UnknownSigner(ids.join(", ")));
    };
    // Only now, authenticated, is the content parsed.
    let content: BundleContent =
        serde_json::from_slice(&payload).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if let Some((running, current)) = running {
        if content.version < running {
            return Err(BundleError::Rollback {
                offered: content.version,
                running,
            });
        }
        if content.version == running && &content != current {
            return Err(BundleError::SameVersionDifferentContent(running));
        }
    }
    let deployment = deploy::parse(&content.deployment, "bundle:deployment.toml")
        .map_err(|e| BundleError::Deployment(e.to_string()))?;
    let image_trust = Policy::parse(
        content.image_trust.as_bytes(),
        "bundle:image-trust.json",
        None,
    )
    .map_err(|e| BundleError::ImageTrust(e.to_string()))?;
    Ok(VerifiedBundle {
        content,
        signer,
        deployment,
        image_trust,
    })
}
