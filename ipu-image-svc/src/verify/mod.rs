//! The verify stage: from an image reference to a [`VerifiedImage`].
//!
//! Order is the security argument:
//! 1. The deployment policy admits the request ([`admission`]), and the image trust
//!    policy's scope is chosen from the reference alone; a `reject` scope stops here.
//! 2. Only the manifest is fetched (digest-checked), then its signatures are verified against
//!    the policy. Nothing the manifest points at is read before that decision.
//! 3. The config is fetched (digest-checked); the policy's image requirements (layer count,
//!    size, encryption) and the layer types are checked before any layer is fetched.

pub mod admission;

use audit::{EventKind, Outcome};
use policy::reference::{Digest, ImageReference};
use policy::trust::{Policy, Precheck};
use serde::Serialize;

use crate::error::{from_unpack, Error, FailureClass};
use crate::fetch::{self, Descriptor, ImageManifest, ImageSource, SourceOptions};
use crate::progress::Progress;
use crate::record::Recorder;
use crate::unpack::{Compression, Limits};
pub use admission::{Admission, Deployment};

/// The trust policy's decision on an image, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyDecision {
    pub policy: String,
    pub scope: String,
    pub allowed: bool,
    pub reason: String,
    pub signatures_found: usize,
    /// Every signature found, by format and source (`SignatureFormat::describe`).
    pub signatures: Vec<String>,
    /// The signatures that satisfied the requirements: format, media type, source, signer.
    pub accepted_signatures: Vec<policy::trust::AcceptedSignature>,
}

/// One layer of a verified image: its descriptor from the signed manifest and its diff_id
/// from the signed config.
#[derive(Clone, Debug)]
pub struct VerifiedLayer {
    pub index: usize,
    pub descriptor: Descriptor,
    pub diff_id: Digest,
    pub encrypted: bool,
    /// Of the plaintext (for an encrypted layer, after decryption).
    pub compression: Compression,
}

/// An image whose manifest, signatures and config passed the policies for this request.
/// Its layers are not fetched yet; `source` is where they come from.
pub struct VerifiedImage {
    pub reference: ImageReference,
    pub source: Box<dyn ImageSource>,
    /// The manifest the reference names: what the signatures were checked against.
    pub manifest_digest: Digest,
    /// The platform manifest selected from it (equal for a single manifest).
    pub platform_manifest_digest: Digest,
    pub policy: PolicyDecision,
    pub manifest: ImageManifest,
    pub layers: Vec<VerifiedLayer>,
    /// The image config's `config` object (Cmd, Entrypoint, Env, WorkingDir, User), from
    /// the verified config blob: what a runtime needs to start the image.
    pub runtime_config: Option<serde_json::Value>,
    pub admission: Admission,
}

impl std::fmt::Debug for VerifiedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedImage")
            .field("reference", &self.reference.to_string())
            .field("manifest_digest", &self.manifest_digest.to_string())
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl VerifiedImage {
    pub fn encrypted_layers(&self) -> impl Iterator<Item = &VerifiedLayer> {
        self.layers.iter().filter(|l| l.encrypted)
    }
}

/// What the verify stage needs.
pub struct VerifyConfig<'a> {
    pub policy: &'a Policy,
    pub source: &'a SourceOptions,
    pub deployment: Option<&'a Deployment>,
    /// The service's unpack limits, which the deployment policy may tighten.
    pub limits: &'a Limits,
}

/// Verifies `reference` for the request `rec` records.
pub fn verify(
    cfg: &VerifyConfig<'_>,
    reference: &ImageReference,
    progress: &dyn Progress,
    rec: &Recorder,
) -> Result<VerifiedImage, Error> {
    let admission = admission::admit(cfg.deployment, cfg.limits, &reference.to_string(), rec)?;
    progress.admitted(&admission);
    let evaluation = cfg.policy.requirements_for(reference);
    if evaluation.precheck() == Precheck::Rejected {
        let e = Error::new(
            FailureClass::RejectedByPolicy,
            format!(
                "policy {} scope {} rejects {reference}; nothing was fetched",
                cfg.policy.origin(),
                evaluation.scope
            ),
        );
        return Err(rec.refuse(
            EventKind::PolicyDecision,
            e,
            &[("scope", evaluation.scope.clone())],
        ));
    }

    progress.stage("resolving manifest");
    let source = fetch::open_source(reference, cfg.source)?;
    progress.source(&source.describe());
    let resolved = fetch::resolve_manifest(source.as_ref(), &cfg.source.platform)?;
    rec.set_digest(resolved.manifest_digest.to_string());
    progress.resolved(
        &resolved.manifest_digest,
        &resolved.platform_manifest_digest,
    );

    progress.stage("verifying signatures");
    let signature_required = evaluation.precheck() == Precheck::SignatureRequired;
    let signatures = if signature_required {
        fetch::signatures(source.as_ref(), &resolved.manifest_digest)?
    } else {
        Vec::new()
    };
    let decision = evaluation.evaluate(reference, &resolved.manifest_digest, &signatures);
    let policy = PolicyDecision {
        policy: cfg.policy.origin().to_string(),
        scope: decision.scope.clone(),
        allowed: decision.allowed,
        reason: decision.reason.clone(),
        signatures_found: signatures.len(),
        signatures: signatures.iter().map(|s| s.describe()).collect(),
        accepted_signatures: decision.signatures.clone(),
    };
    progress.policy(&policy);
    let scope = ("scope", decision.scope.clone());
    if signature_required {
        // Which signatures there were (format and source), and which one decided.
        let mut attrs = vec![
            scope.clone(),
            ("signatures_found", signatures.len().to_string()),
            (
                "signatures",
                signatures
                    .iter()
                    .map(|s| s.describe())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        ];
        if let Some(first) = decision.signatures.first() {
            attrs.push(("signature_format", first.format.as_str().to_string()));
            if let Some(mt) = &first.media_type {
                attrs.push(("signature_media_type", mt.clone()));
            }
            attrs.push(("signature_source", first.source.to_string()));
            attrs.push(("signature_discovery", first.source.via.as_str().to_string()));
            attrs.push(("signer", first.signer.clone()));
            if !first.log_entries.is_empty() {
                attrs.push(("log_entries", first.log_entries.join(", ")));
            }
        }
        rec.record(
            EventKind::SignatureVerify,
            if decision.allowed {
                Outcome::Allowed
            } else {
                Outcome::Denied
            },
            &decision.reason,
            &attrs,
        )?;
    }
    if !decision.allowed {
        let class = decision
            .class
            .map(FailureClass::from_reject)
            .unwrap_or(FailureClass::RejectedByPolicy);
        let e = Error::new(class, format!("{reference}: {}", decision.reason));
        return Err(rec.refuse(EventKind::PolicyDecision, e, &[scope]));
    }
    if admission
        .requirements
        .as_ref()
        .is_some_and(|r| r.require_signature)
        && !signature_required
    {
        let e = Error::new(
            FailureClass::RejectedByPolicy,
            format!(
                "the deployment policy requires a signature, but the image trust policy scope {} accepts {reference} without one",
                decision.scope
            ),
        );
        return Err(rec.refuse(EventKind::PolicyDecision, e, &[scope]));
    }
    rec.record(
        EventKind::PolicyDecision,
        Outcome::Allowed,
        &decision.reason,
        &[scope],
    )?;
    tracing::info!(target: "audit", image = %reference, digest = %resolved.manifest_digest, scope = %decision.scope, reason = %decision.reason, "image accepted by policy");

    let image = fetch::load_config(source.as_ref(), resolved)?;
    progress.config(&image);
    if let Some(r) = &admission.requirements {
        admission::check_image(r, &image.manifest, rec)?;
    }
    // Refuse unsupported layer types before fetching gigabytes.
    let mut layers = Vec::with_capacity(image.manifest.layers.len());
    for (i, (layer, diff_id)) in image
        .manifest
        .layers
        .iter()
        .zip(&image.config.diff_ids)
        .enumerate()
    {
        let plain_type =
            ocicrypt::decrypted_media_type(&layer.media_type).unwrap_or(&layer.media_type);
        let compression = Compression::from_media_type(plain_type)
            .map_err(|e| from_unpack(e, i, &layer.digest))?;
        layers.push(VerifiedLayer {
            index: i,
            descriptor: layer.clone(),
            diff_id: diff_id.clone(),
            encrypted: ocicrypt::is_encrypted_media_type(&layer.media_type),
            compression,
        });
    }
    let runtime_config = image.runtime_config();
    let verified = VerifiedImage {
        reference: reference.clone(),
        source,
        manifest_digest: image.manifest_digest,
        platform_manifest_digest: image.platform_manifest_digest,
        policy,
        manifest: image.manifest,
        layers,
        runtime_config,
        admission,
    };
    progress.verified(&verified);
    Ok(verified)
}

/// How many leading bytes of an encrypted blob [`blob_prefixes`] records: with ciphertext
/// under a random key and nonce, 64 bytes tell blobs apart.
pub const BLOB_PREFIX_LEN: usize = 64;

/// The first [`BLOB_PREFIX_LEN`] bytes of each encrypted layer's blob (empty for the
/// others, or where the source failed to give them), as the source gave them: a hint for
/// recognising the blob when the host streams it back (containerd's decrypt hook), never
/// trusted. A source that cannot give one costs only the hint.
pub fn blob_prefixes(image: &VerifiedImage) -> Vec<Vec<u8>> {
    image
        .layers
        .iter()
        .map(|layer| {
            if !layer.encrypted {
                return Vec::new();
            }
            let digest = &layer.descriptor.digest;
            image
                .source
                .blob_prefix(digest, BLOB_PREFIX_LEN)
                .unwrap_or_else(|e| {
                    tracing::warn!(layer = %digest, error = %e, "no blob prefix; the layer is recognised only once received whole");
                    Vec::new()
                })
        })
        .collect()
}
