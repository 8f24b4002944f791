//! The trust pipeline: verify, pull, decrypt and unpack, publish.
//!
//! Order is the security argument:
//! 1. The policy scope is chosen from the reference alone; a `reject` scope stops here.
//! 2. Only the manifest is fetched (digest-checked), then its signatures are verified against
//!    the policy. Nothing the manifest points at is read before that decision.
//! 3. Config and layer blobs are fetched into the cache, each checked against the signed
//!    manifest's size and digest while it streams.
//! 4. Each layer, read back from the cache, is decrypted (ocicrypt), decompressed and applied to
//!    a private staging tree; its tar stream must hash to the signed config's diff_id, and an
//!    encrypted layer's HMAC must verify, before the next layer starts.
//! 5. Only then is the ext4 image built and moved to the output path. Any failure drops the
//!    staging tree and leaves no output.

use std::cell::Cell;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use audit::{AuditSink, Event, EventKind, Outcome as AuditOutcome};

use ocicrypt::DecryptConfig;
use policy::reference::{Digest, ImageReference};
use policy::trust::{Policy, Precheck, RejectClass};
use serde::Serialize;

use crate::fetch::{self, BlobCache, FetchError, FetchErrorClass, SourceOptions};
use crate::rootfs::{self, RootfsError, RootfsImage, RootfsOptions};
use crate::secret::SecretBuf;
use crate::unpack::{self, Budget, Compression, Limits, Staging, UnpackError};

/// Why an image was refused or the pipeline failed. Rejections are decisions about the image
/// (exit code 3); the rest are operational failures (exit code 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    // Rejections.
    NoSignature,
    WrongKey,
    IdentityMismatch,
    MalformedSignature,
    UnsupportedSignatureFormat,
    RejectedByPolicy,
    DigestMismatch,
    UnsafeLayer,
    NoDecryptionKey,
    MalformedImage,
    UnsupportedImage,
    TooLarge,
    // Operational.
    InvalidConfiguration,
    NotFound,
    InsecureTransport,
    Network,
    Io,
    Mkfs,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::NoSignature => "no-signature",
            FailureClass::WrongKey => "wrong-key",
            FailureClass::IdentityMismatch => "identity-mismatch",
            FailureClass::MalformedSignature => "malformed-signature",
            FailureClass::UnsupportedSignatureFormat => "unsupported-signature-format",
            FailureClass::RejectedByPolicy => "rejected-by-policy",
            FailureClass::DigestMismatch => "digest-mismatch",
            FailureClass::UnsafeLayer => "unsafe-layer",
            FailureClass::NoDecryptionKey => "no-decryption-key",
            FailureClass::MalformedImage => "malformed-image",
            FailureClass::UnsupportedImage => "unsupported-image",
            FailureClass::TooLarge => "too-large",
            FailureClass::InvalidConfiguration => "invalid-configuration",
            FailureClass::NotFound => "not-found",
            FailureClass::InsecureTransport => "insecure-transport",
            FailureClass::Network => "network",
            FailureClass::Io => "io",
            FailureClass::Mkfs => "mkfs",
        }
    }

    /// A decision about the image rather than a failure to reach or store it.
    pub fn is_rejection(self) -> bool {
        !matches!(
            self,
            FailureClass::InvalidConfiguration
                | FailureClass::NotFound
                | FailureClass::InsecureTransport
                | FailureClass::Network
                | FailureClass::Io
                | FailureClass::Mkfs
        )
    }

    fn from_reject(c: RejectClass) -> Self {
        match c {
            RejectClass::NoSignature => FailureClass::NoSignature,
            RejectClass::UnsupportedSignatureFormat => FailureClass::UnsupportedSignatureFormat,
            RejectClass::WrongKey => FailureClass::WrongKey,
            RejectClass::MalformedSignature => FailureClass::MalformedSignature,
            RejectClass::DigestMismatch => FailureClass::DigestMismatch,
            RejectClass::IdentityMismatch => FailureClass::IdentityMismatch,
            RejectClass::RejectedByPolicy => FailureClass::RejectedByPolicy,
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exit codes of the CLI.
pub const EXIT_OK: i32 = 0;
pub const EXIT_OPERATIONAL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_REJECTED: i32 = 3;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PipelineError {
    pub class: FailureClass,
    pub message: String,
}

impl PipelineError {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    pub fn exit_code(&self) -> i32 {
        if self.class.is_rejection() {
            EXIT_REJECTED
        } else {
            EXIT_OPERATIONAL
        }
    }
}

impl From<FetchError> for PipelineError {
    fn from(e: FetchError) -> Self {
        let class = match e.class {
            FetchErrorClass::DigestMismatch => FailureClass::DigestMismatch,
            FetchErrorClass::NotFound => FailureClass::NotFound,
            FetchErrorClass::Malformed => FailureClass::MalformedImage,
            FetchErrorClass::Unsupported => FailureClass::UnsupportedImage,
            FetchErrorClass::Insecure => FailureClass::InsecureTransport,
            FetchErrorClass::TooLarge => FailureClass::TooLarge,
            FetchErrorClass::Network => FailureClass::Network,
            FetchErrorClass::Io => FailureClass::Io,
        };
        PipelineError::new(class, e.message)
    }
}

fn from_unpack(e: UnpackError, layer: usize, digest: &Digest) -> PipelineError {
    use unpack::UnpackErrorKind as K;
    let class = match e.kind {
        K::LimitExceeded => FailureClass::TooLarge,
        k if k.is_unsafe() => FailureClass::UnsafeLayer,
        K::Malformed => FailureClass::MalformedImage,
        K::Unsupported => FailureClass::UnsupportedImage,
        _ => FailureClass::Io,
    };
    PipelineError::new(class, format!("layer {layer} ({digest}): {}", e.message))
}

/// The failure class of an ocicrypt error.
pub(crate) fn ocicrypt_class(e: &ocicrypt::Error) -> FailureClass {
    use ocicrypt::ErrorClass as C;
    match e.class() {
        C::NoKey => FailureClass::NoDecryptionKey,
        C::Integrity => FailureClass::DigestMismatch,
        C::Malformed => FailureClass::MalformedImage,
        C::Unsupported => FailureClass::UnsupportedImage,
        C::Io => FailureClass::Io,
    }
}

fn from_ocicrypt(e: ocicrypt::Error, layer: usize, digest: &Digest) -> PipelineError {
    PipelineError::new(ocicrypt_class(&e), format!("layer {layer} ({digest}): {e}"))
}

/// Everything the pipeline needs besides the image reference.
pub struct PipelineConfig {
    pub policy: Policy,
    pub cache_dir: PathBuf,
    /// Where private staging trees are made; defaults to `<cache_dir>/staging`.
    pub staging_dir: Option<PathBuf>,
    pub source: SourceOptions,
    /// Local private keys: a development option (the broker is the production path).
    pub decryption: DecryptConfig,
    /// Where layer keys come from: the key broker. Takes precedence over `decryption`.
    pub layer_keys: Option<Arc<dyn LayerKeySource>>,
    pub limits: Limits,
    pub rootfs: RootfsOptions,
    /// Where decisions are recorded. A service always sets it; a run that cannot write its
    /// audit events fails (nothing is accepted unrecorded).
    pub audit: Option<Arc<dyn AuditSink>>,
    /// Context recorded with every event, and the request the deployment policy decides.
    pub tenant: Option<String>,
    pub function: Option<String>,
    /// When set, the request must be allowed by this deployment policy, whose requirements
    /// and limits are then enforced (over `limits` where stricter).
    pub deployment: Option<Deployment>,
}

/// What a key source is asked for one encrypted layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerKeyRequest<'a> {
    /// The image reference as deployed.
    pub image: &'a str,
    pub image_digest: &'a str,
    pub layer_digest: &'a str,
    pub annotations: &'a ocicrypt::Annotations,
    pub tenant: &'a str,
    pub function: &'a str,
}

/// A source of layer keys other than local key files (the key broker).
pub trait LayerKeySource: Send + Sync {
    /// One layer's private options (ocicrypt JSON), in secret memory.
    fn private_options(&self, req: &LayerKeyRequest<'_>) -> Result<SecretBuf, String>;
}

/// The deployment policy a run is checked against.
#[derive(Clone)]
pub struct Deployment {
    pub policy: Arc<policy::deploy::DeploymentPolicy>,
    /// The attested IPU class, when known.
    pub ipu_class: Option<String>,
}

impl PipelineConfig {
    pub fn new(policy: Policy, cache_dir: PathBuf) -> Self {
        Self {
            policy,
            cache_dir,
            staging_dir: None,
            source: SourceOptions::default(),
            decryption: DecryptConfig::new(Vec::new()),
            layer_keys: None,
            limits: Limits::default(),
            rootfs: RootfsOptions::default(),
            audit: None,
            tenant: None,
            function: None,
            deployment: None,
        }
    }
}

/// Layers fetched at once.
const PARALLEL_FETCHES: usize = 4;

/// How far to go.
#[derive(Clone, Debug)]
pub enum Goal {
    Verify,
    /// Verify, then have the key source release every encrypted layer's key for this
    /// request, and drop them: what a cached base must pass before it is used again (the
    /// broker decides per tenant, function and IPU, and may have revoked the key since).
    VerifyKeys,
    /// `VerifyKeys`, and the first bytes of each encrypted layer's blob
    /// ([`Report::layer_prefixes`]): the host will stream these blobs back for decryption
    /// (containerd's decrypt hook), and a known prefix lets the IPU recognise a blob, and
    /// authenticate it, while it arrives.
    VerifyForDecryption,
    Pull,
    Unpack {
        output: PathBuf,
    },
    /// What a function start needs, with one verification either way: `VerifyKeys` when
    /// the platform manifest's digest is in `cached` (its base exists), else `Unpack` into
    /// `output`. `Report::rootfs` says which it was.
    Prepare {
        output: PathBuf,
        cached: std::collections::BTreeSet<String>,
    },
}

/// How many leading bytes of an encrypted blob [`Goal::VerifyForDecryption`] records: with
/// ciphertext under a random key and nonce, 64 bytes tell blobs apart.
pub const BLOB_PREFIX_LEN: usize = 64;

/// The prefixes of `manifest`'s encrypted layers (see [`Report::layer_prefixes`]). A source
/// that cannot give one costs only the hint.
fn blob_prefixes(
    source: &dyn fetch::ImageSource,
    manifest: &fetch::ImageManifest,
    report: &Report,
) -> Vec<Vec<u8>> {
    manifest
        .layers
        .iter()
        .zip(&report.layers)
        .map(|(layer, r)| {
            if !r.encrypted {
                return Vec::new();
            }
            source
                .blob_prefix(&layer.digest, BLOB_PREFIX_LEN)
                .unwrap_or_else(|e| {
                    tracing::warn!(layer = %layer.digest, error = %e, "no blob prefix; the layer is recognised only once received whole");
                    Vec::new()
                })
        })
        .collect()
}

/// Progress notifications for a front end (progress bar, logs).
pub trait Progress: Sync {
    fn stage(&self, _message: &str) {}
    /// `done` of `total` bytes of `label`.
    fn bytes(&self, _label: &str, _done: u64, _total: u64) {}
    fn finish_bytes(&self) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// What the pipeline found and did; filled as it goes, so a failure report shows how far it
/// got. Holds no key material.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub image: String,
    /// The platform manifest's layer descriptors (annotations included), once loaded.
    #[serde(skip)]
    pub layer_descriptors: Vec<fetch::Descriptor>,
    /// The verified config's diff_ids, layer by layer.
    #[serde(skip)]
    pub layer_diff_ids: Vec<Digest>,
    /// For [`Goal::VerifyForDecryption`]: the first [`BLOB_PREFIX_LEN`] bytes of each
    /// encrypted layer's blob (empty for the others, or where the source failed to give
    /// them), as the source gave them: a hint for recognising the blob, never trusted.
    #[serde(skip)]
    pub layer_prefixes: Vec<Vec<u8>>,
    /// What the deployment policy requires of this request, when one decided it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requirements: Option<policy::deploy::Requirements>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<FailureClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_manifest_digest: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<Digest>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsImage>,
    /// The image config's `config` object (Cmd, Entrypoint, Env, WorkingDir, User), from
    /// the verified config blob: what a runtime needs to start the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_config: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    #[default]
    Incomplete,
    Accepted,
    Rejected,
    Error,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    pub policy: String,
    pub scope: String,
    pub allowed: bool,
    pub reason: String,
    pub signatures_found: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub index: usize,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_at: Option<PathBuf>,
    /// Set once the layer's tar stream hashed to the config's diff_id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<Digest>,
    /// Go ocicrypt recorded a pre-recompression digest; the diff_id check authenticated it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_private_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
}

/// The pipeline with its configuration.
pub struct TrustPipeline {
    cfg: PipelineConfig,
}

pub const AUDIT_SERVICE: &str = "ipu-image-svc";

/// Writes this run's audit events with the image context filled in.
struct Recorder<'a> {
    cfg: &'a PipelineConfig,
    image: String,
    digest: std::cell::RefCell<Option<String>>,
    /// Whether the failure that ended the run already has its own event.
    failure_recorded: Cell<bool>,
}

impl Recorder<'_> {
    fn record(
        &self,
        kind: EventKind,
        outcome: AuditOutcome,
        reason: &str,
        details: &[(&str, String)],
    ) -> Result<(), PipelineError> {
        let Some(log) = &self.cfg.audit else {
            return Ok(());
        };
        let mut e = Event::new(AUDIT_SERVICE, kind, outcome, reason)
            .image(self.image.clone(), self.digest.borrow().clone());
        e.tenant = self.cfg.tenant.clone();
        e.function = self.cfg.function.clone();
        for (k, v) in details {
            e = e.detail(*k, v.clone());
        }
        log.append(e).map(|_| ()).map_err(|e| {
            PipelineError::new(
                FailureClass::Io,
                format!("cannot write the audit event (nothing is accepted unrecorded): {e}"),
            )
        })
    }

    /// Records the event for a failure and marks it recorded.
    fn failure(
        &self,
        kind: EventKind,
        e: &PipelineError,
        details: &[(&str, String)],
    ) -> Result<(), PipelineError> {
        let outcome = if e.class.is_rejection() {
            AuditOutcome::Denied
        } else {
            AuditOutcome::Failure
        };
        let mut d = vec![("class", e.class.as_str().to_string())];
        d.extend(details.iter().cloned());
        self.record(kind, outcome, &e.message, &d)?;
        self.failure_recorded.set(true);
        Ok(())
    }
}

impl TrustPipeline {
    pub fn new(cfg: PipelineConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// Runs up to `goal`, recording into `report`. On error the report holds the outcome,
    /// class and message as well.
    pub fn run(
        &self,
        reference: &ImageReference,
        goal: &Goal,
        progress: &dyn Progress,
        report: &mut Report,
    ) -> Result<(), PipelineError> {
        report.image = reference.to_string();
        let recorder = Recorder {
            cfg: &self.cfg,
            image: reference.to_string(),
            digest: Default::default(),
            failure_recorded: Cell::new(false),
        };
        let mut result = self.run_inner(reference, goal, progress, report, &recorder);
        if let Err(e) = &result {
            if !recorder.failure_recorded.get() {
                if let Err(audit_err) = recorder.failure(EventKind::Error, e, &[]) {
                    tracing::error!(error = %audit_err.message, "audit log unavailable");
                }
            }
        }
        if result.is_ok() && matches!(goal, Goal::Unpack { .. } | Goal::Prepare { .. }) {
            if let Some(rootfs) = &report.rootfs {
                result = recorder.record(
                    EventKind::BaseBuild,
                    AuditOutcome::Success,
                    "ext4 rootfs built from the verified image",
                    &[
                        ("output", rootfs.path.display().to_string()),
                        ("uuid", rootfs.uuid.clone()),
                    ],
                );
                if result.is_err() {
                    // Unrecorded, so not published.
                    let _ = std::fs::remove_file(&rootfs.path);
                    report.rootfs = None;
                }
            }
        }
        match &result {
            Ok(()) => report.outcome = Outcome::Accepted,
            Err(e) => {
                report.outcome = if e.class.is_rejection() {
                    Outcome::Rejected
                } else {
                    Outcome::Error
                };
                report.class = Some(e.class);
                report.error = Some(e.message.clone());
                if e.class.is_rejection() {
                    tracing::warn!(target: "audit", image = %report.image, class = e.class.as_str(), reason = %e.message, "image rejected");
                }
            }
        }
        result
    }

    fn run_inner(
        &self,
        reference: &ImageReference,
        goal: &Goal,
        progress: &dyn Progress,
        report: &mut Report,
        rec: &Recorder<'_>,
    ) -> Result<(), PipelineError> {
        let (limits, requirements) = self.deployment_gate(reference, rec)?;
        report.requirements = requirements.clone();
        let evaluation = self.cfg.policy.requirements_for(reference);
        if evaluation.precheck() == Precheck::Rejected {
            let e = PipelineError::new(
                FailureClass::RejectedByPolicy,
                format!(
                    "policy {} scope {} rejects {reference}; nothing was fetched",
                    self.cfg.policy.origin(),
                    evaluation.scope
                ),
            );
            rec.failure(
                EventKind::PolicyDecision,
                &e,
                &[("scope", evaluation.scope.clone())],
            )?;
            return Err(e);
        }

        progress.stage("resolving manifest");
        let source = fetch::open_source(reference, &self.cfg.source)?;
        report.source = Some(source.describe());
        let resolved = fetch::resolve_manifest(source.as_ref(), &self.cfg.source.platform)?;
        report.manifest_digest = Some(resolved.manifest_digest.clone());
        *rec.digest.borrow_mut() = Some(resolved.manifest_digest.to_string());
        report.platform_manifest_digest = Some(resolved.platform_manifest_digest.clone());
        let goal = &match goal {
            Goal::Prepare { output, cached } => {
                if cached.contains(&resolved.platform_manifest_digest.to_string()) {
                    Goal::VerifyKeys
                } else {
                    Goal::Unpack {
                        output: output.clone(),
                    }
                }
            }
            other => other.clone(),
        };

        progress.stage("verifying signatures");
        let signatures = if evaluation.precheck() == Precheck::SignatureRequired {
            fetch::signatures(source.as_ref(), &resolved.manifest_digest)?
        } else {
            Vec::new()
        };
        let decision = evaluation.evaluate(reference, &resolved.manifest_digest, &signatures);
        report.policy = Some(PolicyReport {
            policy: self.cfg.policy.origin().to_string(),
            scope: decision.scope.clone(),
            allowed: decision.allowed,
            reason: decision.reason.clone(),
            signatures_found: signatures.len(),
        });
        let scope = ("scope", decision.scope.clone());
        if evaluation.precheck() == Precheck::SignatureRequired {
            let signature_ok = decision.allowed;
            rec.record(
                EventKind::SignatureVerify,
                if signature_ok {
                    AuditOutcome::Allowed
                } else {
                    AuditOutcome::Denied
                },
                &decision.reason,
                &[
                    scope.clone(),
                    ("signatures_found", signatures.len().to_string()),
                ],
            )?;
        }
        if !decision.allowed {
            let class = decision
                .class
                .map(FailureClass::from_reject)
                .unwrap_or(FailureClass::RejectedByPolicy);
            let e = PipelineError::new(class, format!("{reference}: {}", decision.reason));
            rec.failure(EventKind::PolicyDecision, &e, &[scope])?;
            return Err(e);
        }
        if requirements.as_ref().is_some_and(|r| r.require_signature)
            && evaluation.precheck() != Precheck::SignatureRequired
        {
            let e = PipelineError::new(
                FailureClass::RejectedByPolicy,
                format!(
                    "the deployment policy requires a signature, but the image trust policy scope {} accepts {reference} without one",
                    decision.scope
                ),
            );
            rec.failure(EventKind::PolicyDecision, &e, &[scope])?;
            return Err(e);
        }
        rec.record(
            EventKind::PolicyDecision,
            AuditOutcome::Allowed,
            &decision.reason,
            &[scope],
        )?;
        tracing::info!(target: "audit", image = %reference, digest = %resolved.manifest_digest, scope = %decision.scope, reason = %decision.reason, "image accepted by policy");

        let image = fetch::load_config(source.as_ref(), resolved)?;
        report.config_digest = Some(image.manifest.config.digest.clone());
        report.layer_descriptors = image.manifest.layers.clone();
        report.layer_diff_ids = image.config.diff_ids.clone();
        report.runtime_config = serde_json::from_slice::<serde_json::Value>(&image.config_bytes)
            .ok()
            .and_then(|c| c.get("config").cloned());
        report.layers = image
            .manifest
            .layers
            .iter()
            .enumerate()
            .map(|(index, l)| LayerReport {
                index,
                digest: l.digest.clone(),
                media_type: l.media_type.clone(),
                size: l.size,
                encrypted: ocicrypt::is_encrypted_media_type(&l.media_type),
                compression: None,
                cached_at: None,
                diff_id: None,
                stale_private_digest: None,
                entries: None,
                file_bytes: None,
            })
            .collect();
        if let Some(r) = &requirements {
            self.enforce_image_requirements(r, &image.manifest, rec)?;
        }
        // Refuse unsupported layer types and missing keys before fetching gigabytes.
        for (i, layer) in image.manifest.layers.iter().enumerate() {
            let plain_type =
                ocicrypt::decrypted_media_type(&layer.media_type).unwrap_or(&layer.media_type);
            let compression = Compression::from_media_type(plain_type)
                .map_err(|e| from_unpack(e, i, &layer.digest))?;
            report.layers[i].compression = Some(compression);
            if report.layers[i].encrypted
                && self.cfg.decryption.keys().is_empty()
                && self.cfg.layer_keys.is_none()
                && matches!(goal, Goal::Unpack { .. })
            {
                let e = PipelineError::new(
                    FailureClass::NoDecryptionKey,
                    format!(
                        "layer {i} ({}) is encrypted and no decryption key was given",
                        layer.digest
                    ),
                );
                rec.failure(
                    EventKind::LayerDecrypt,
                    &e,
                    &[
                        ("layer", i.to_string()),
                        ("layer_digest", layer.digest.to_string()),
                    ],
                )?;
                return Err(e);
            }
        }
        if matches!(goal, Goal::Verify) {
            return Ok(());
        }
        if matches!(goal, Goal::VerifyKeys | Goal::VerifyForDecryption) {
            self.check_layer_keys(reference, &image.manifest, &report.layers, rec)?;
            if matches!(goal, Goal::VerifyForDecryption) {
                report.layer_prefixes = blob_prefixes(source.as_ref(), &image.manifest, report);
            }
            return Ok(());
        }

        let cache = BlobCache::new(&self.cfg.cache_dir)?;
        // Layers are fetched (and verified) concurrently, a few at a time: a registry's
        // latency is per request, and the layers are independent until they are applied.
        let layers = &image.manifest.layers;
        let mut paths = Vec::with_capacity(layers.len());
        for (batch, chunk) in layers.chunks(PARALLEL_FETCHES).enumerate() {
            let fetched: Vec<Result<PathBuf, FetchError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, layer)| {
                        let i = batch * PARALLEL_FETCHES + j;
                        let label = format!("layer {}/{}", i + 1, layers.len());
                        progress.stage(&format!("pulling {label} ({})", layer.digest));
                        let (cache, source) = (&cache, source.as_ref());
                        scope.spawn(move || {
                            cache.fetch(source, layer, &|done, total| {
                                progress.bytes(&label, done, total)
                            })
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a fetch thread panicked"))
                    .collect()
            });
            progress.finish_bytes();
            for path in fetched {
                let path = path?;
                report.layers[paths.len()].cached_at = Some(path.clone());
                paths.push(path);
            }
        }
        let Goal::Unpack { output } = goal else {
            return Ok(());
        };

        let staging_parent = self
            .cfg
            .staging_dir
            .clone()
            .unwrap_or_else(|| self.cfg.cache_dir.join("staging"));
        let staging = Staging::create(&staging_parent).map_err(|e| {
            PipelineError::new(
                FailureClass::Io,
                format!(
                    "cannot create staging tree in {}: {e}",
                    staging_parent.display()
                ),
            )
        })?;
        let mut budget = Budget::default();
        let image_ref = reference.to_string();
        let image_digest = report
            .manifest_digest
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default();
        for (i, layer) in image.manifest.layers.iter().enumerate() {
            progress.stage(&format!(
                "unpacking layer {}/{} ({})",
                i + 1,
                image.manifest.layers.len(),
                layer.digest
            ));
            let layer_details = [
                ("layer", i.to_string()),
                ("layer_digest", layer.digest.to_string()),
            ];
            let applied = self.apply_one(
                &staging,
                &paths[i],
                (&image_ref, &image_digest),
                layer,
                i,
                &image.config.diff_ids[i],
                &limits,
                &mut budget,
                &mut report.layers[i],
            );
            let encrypted = report.layers[i].encrypted;
            match applied {
                Ok(()) => {
                    if encrypted {
                        rec.record(
                            EventKind::LayerDecrypt,
                            AuditOutcome::Success,
                            "layer decrypted; HMAC, plaintext digest and diff_id verified",
                            &layer_details,
                        )?;
                    }
                    rec.record(
                        EventKind::LayerUnpack,
                        AuditOutcome::Success,
                        "layer unpacked into the private staging tree",
                        &layer_details,
                    )?;
                }
                Err(LayerFailure::Decrypt(e)) => {
                    rec.failure(EventKind::LayerDecrypt, &e, &layer_details)?;
                    return Err(e);
                }
                Err(LayerFailure::Unpack(e)) => {
                    rec.failure(EventKind::LayerUnpack, &e, &layer_details)?;
                    return Err(e);
                }
            }
        }
        progress.stage("building ext4 image");
        let uuid = rootfs::uuid_from_seed(&image.platform_manifest_digest.to_string());
        let built =
            rootfs::build_ext4(&staging.path(), output, &uuid, &self.cfg.rootfs).map_err(|e| {
                let class = match e {
                    RootfsError::Io { .. } => FailureClass::Io,
                    _ => FailureClass::Mkfs,
                };
                PipelineError::new(class, e.to_string())
            })?;
        report.rootfs = Some(built);
        Ok(())
    }

    /// Every encrypted layer's key, released by the key source for this request and dropped
    /// at once (secret memory, zeroized). Without a key source (local development keys) the
    /// keys were already checked by unwrapping at unpack time, so nothing is asked.
    fn check_layer_keys(
        &self,
        reference: &ImageReference,
        manifest: &fetch::ImageManifest,
        layers: &[LayerReport],
        rec: &Recorder<'_>,
    ) -> Result<(), PipelineError> {
        let Some(source) = &self.cfg.layer_keys else {
            return Ok(());
        };
        let image = reference.to_string();
        let image_digest = rec.digest.borrow().clone().unwrap_or_default();
        for (i, layer) in manifest.layers.iter().enumerate() {
            if !layers[i].encrypted {
                continue;
            }
            let layer_digest = layer.digest.to_string();
            let request = LayerKeyRequest {
                image: &image,
                image_digest: &image_digest,
                layer_digest: &layer_digest,
                annotations: &layer.annotations,
                tenant: self.cfg.tenant.as_deref().unwrap_or(""),
                function: self.cfg.function.as_deref().unwrap_or(""),
            };
            if let Err(e) = source.private_options(&request) {
                let e = PipelineError::new(
                    FailureClass::NoDecryptionKey,
                    format!("layer {i} ({layer_digest}): key broker: {e}"),
                );
                rec.failure(
                    EventKind::LayerDecrypt,
                    &e,
                    &[("layer", i.to_string()), ("layer_digest", layer_digest)],
                )?;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decides the request with the deployment policy (if any) and returns the limits and
    /// requirements the run must enforce.
    fn deployment_gate(
        &self,
        reference: &ImageReference,
        rec: &Recorder<'_>,
    ) -> Result<(Limits, Option<policy::deploy::Requirements>), PipelineError> {
        let Some(deployment) = &self.cfg.deployment else {
            return Ok((self.cfg.limits.clone(), None));
        };
        let (Some(tenant), Some(function)) = (&self.cfg.tenant, &self.cfg.function) else {
            return Err(PipelineError::new(
                FailureClass::InvalidConfiguration,
                "a deployment policy decides for a tenant and a function: both must be given",
            ));
        };
        let request = policy::deploy::DeployRequest {
            tenant: tenant.clone(),
            function: function.clone(),
            image: reference.to_string(),
            ipu_class: deployment.ipu_class.clone(),
        };
        let decision = policy::deploy::evaluate(&deployment.policy, &request);
        let details = [
            ("policy", "deployment".to_string()),
            ("decided_by", decision.decided_by.clone()),
        ];
        let Some(r) = decision.requirements.filter(|_| decision.allowed) else {
            let e = PipelineError::new(FailureClass::RejectedByPolicy, decision.reason);
            rec.failure(EventKind::PolicyDecision, &e, &details)?;
            return Err(e);
        };
        if r.require_hardware_crypto {
            let hw = ocicrypt::hardware_acceleration();
            if !(hw.aes_ni && hw.sha_ni) {
                let e = PipelineError::new(
                    FailureClass::RejectedByPolicy,
                    format!(
                        "the deployment policy requires hardware crypto, and this IPU has {hw}"
                    ),
                );
                rec.failure(EventKind::PolicyDecision, &e, &details)?;
                return Err(e);
            }
        }
        rec.record(
            EventKind::PolicyDecision,
            AuditOutcome::Allowed,
            &decision.reason,
            &details,
        )?;
        // The stricter of the service's limits and the policy's; devices as the policy says.
        let mut limits = self.cfg.limits.clone();
        let tighten = |current: &mut u64, policy: Option<u64>| {
            if let Some(p) = policy {
                *current = (*current).min(p);
            }
        };
        tighten(&mut limits.max_unpacked_bytes, r.max_unpacked_bytes);
        tighten(&mut limits.max_file_size, r.max_file_bytes);
        tighten(&mut limits.max_inodes, r.max_inodes);
        limits.allow_device_nodes = r.allow_device_nodes;
        Ok((limits, Some(r)))
    }

    /// Layer count, image size and encryption, checked before any layer is fetched.
    fn enforce_image_requirements(
        &self,
        r: &policy::deploy::Requirements,
        manifest: &fetch::ImageManifest,
        rec: &Recorder<'_>,
    ) -> Result<(), PipelineError> {
        let details = [("policy", "deployment".to_string())];
        let fail = |class, message: String| -> Result<(), PipelineError> {
            let e = PipelineError::new(class, message);
            rec.failure(EventKind::PolicyDecision, &e, &details)?;
            Err(e)
        };
        if let Some(max) = r.max_layers {
            if manifest.layers.len() as u64 > u64::from(max) {
                return fail(
                    FailureClass::TooLarge,
                    format!(
                        "the image has {} layers; the deployment policy allows {max}",
                        manifest.layers.len()
                    ),
                );
            }
        }
        if let Some(max) = r.max_image_bytes {
            let total: u64 = manifest
                .layers
                .iter()
                .map(|l| l.size)
                .fold(manifest.config.size, u64::saturating_add);
            if total > max {
                return fail(
                    FailureClass::TooLarge,
                    format!("the image is {total} bytes; the deployment policy allows {max}"),
                );
            }
        }
        if r.require_encryption {
            if let Some((i, l)) = manifest
                .layers
                .iter()
                .enumerate()
                .find(|(_, l)| !ocicrypt::is_encrypted_media_type(&l.media_type))
            {
                return fail(
                    FailureClass::RejectedByPolicy,
                    format!(
                        "layer {i} ({}) is not encrypted; the deployment policy requires encryption for this function",
                        l.digest
                    ),
                );
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_one(
        &self,
        staging: &Staging,
        blob: &Path,
        (image_ref, image_digest): (&str, &str),
        layer: &fetch::Descriptor,
        index: usize,
        diff_id: &Digest,
        limits: &Limits,
        budget: &mut Budget,
        report: &mut LayerReport,
    ) -> Result<(), LayerFailure> {
        let file = File::open(blob).map_err(|e| {
            LayerFailure::Unpack(PipelineError::new(
                FailureClass::Io,
                format!("cannot open cached blob {}: {e}", blob.display()),
            ))
        })?;
        let reader = BufReader::with_capacity(256 * 1024, file);
        let compression = report
            .compression
            .expect("compression was determined before pulling");
        let decrypt_err = |e| LayerFailure::Decrypt(from_ocicrypt(e, index, &layer.digest));
        let unpack_err = |e| LayerFailure::Unpack(from_unpack(e, index, &layer.digest));
        let stats = if report.encrypted {
            let mut decryptor = match &self.cfg.layer_keys {
                Some(source) => {
                    let layer_digest = layer.digest.to_string();
                    let request = LayerKeyRequest {
                        image: image_ref,
                        image_digest,
                        layer_digest: &layer_digest,
                        annotations: &layer.annotations,
                        tenant: self.cfg.tenant.as_deref().unwrap_or(""),
                        function: self.cfg.function.as_deref().unwrap_or(""),
                    };
                    let secret = source.private_options(&request).map_err(|e| {
                        LayerFailure::Decrypt(PipelineError::new(
                            FailureClass::NoDecryptionKey,
                            format!("layer {index} ({}): key broker: {e}", layer.digest),
                        ))
                    })?;
                    // Parsed from secret memory; the parsed options are zeroized when the
                    // layer is done, the secret buffer when it drops here.
                    let privopts = ocicrypt::PrivateLayerOptions::from_json(secret.as_slice())
                        .map_err(decrypt_err)?;
                    let pubopts =
                        ocicrypt::PublicLayerOptions::from_annotations(&layer.annotations)
                            .map_err(decrypt_err)?;
                    ocicrypt::LayerDecryptor::with_options(reader, &pubopts, &privopts)
                        .map_err(decrypt_err)?
                }
                None => ocicrypt::decrypt_layer(reader, &layer.annotations, &self.cfg.decryption)
                    .map_err(decrypt_err)?,
            };
            let unpacked = unpack_stream(staging, &mut decryptor, compression, limits, budget);
            // The tar stream is read (or refused); now the HMAC over all ciphertext must
            // match. A layer that failed to unpack is checked too: modified ciphertext
            // decrypts to garbage, and that is an integrity failure, not a malformed tar.
            let finished = decryptor.finish_allowing_stale_digest();
            let stats = match (unpacked, finished) {
                (_, Err(e)) if e.class() == ocicrypt::ErrorClass::Integrity => {
                    return Err(decrypt_err(e))
                }
                (Err(e), _) => return Err(unpack_err(e)),
                (Ok(_), Err(e)) => return Err(decrypt_err(e)),
                (Ok(stats), Ok((authenticated, stale))) => {
                    if let Some(stale) = stale {
                        // Accepted only because the diff_id check below authenticates the
                        // content through the signed config.
                        tracing::warn!(
                            layer = index,
                            declared = %stale.declared,
                            actual = authenticated.plaintext_digest(),
                            "encrypted layer's private options carry a stale digest (recompressed by the publisher); relying on the signed diff_id"
                        );
                        report.stale_private_digest = Some(stale.declared);
                    }
                    stats
                }
            };
            stats
        } else {
            // The blob's digest was checked against the signed manifest when it was cached.
            unpack_stream(staging, reader, compression, limits, budget).map_err(unpack_err)?
        };
        if &stats.diff_id != diff_id {
            return Err(LayerFailure::Unpack(PipelineError::new(
                FailureClass::DigestMismatch,
                format!(
                    "layer {index} ({}): uncompressed content has digest {} but the signed config says {diff_id}",
                    layer.digest, stats.diff_id
                ),
            )));
        }
        report.diff_id = Some(stats.diff_id);
        report.entries = Some(stats.entries);
        report.file_bytes = Some(stats.file_bytes);
        Ok(())
    }
}

/// Which stage of a layer failed, for its audit event.
enum LayerFailure {
    Decrypt(PipelineError),
    Unpack(PipelineError),
}

fn unpack_stream<R: std::io::Read>(
    staging: &Staging,
    compressed: R,
    compression: Compression,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<unpack::LayerStats, UnpackError> {
    let decoder = compression
        .decoder(compressed)
        .map_err(|e| UnpackError::from_stream(e, "starting decompression"))?;
    unpack::apply_layer(staging, decoder, limits, budget)
}
