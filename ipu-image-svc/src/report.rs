//! The CLI's `image verify|pull|unpack`: the stages a command runs, and the report (text or
//! JSON) built from what they established. A failure's report shows how far the request
//! got. Holds no key material.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use policy::reference::{Digest, ImageReference};
use serde::Serialize;

use crate::build::LayerOutcome;
use crate::error::{Error, FailureClass};
use crate::fetch::ResolvedImage;
use crate::keys::KeySource;
use crate::metrics::Stage;
use crate::pipeline::TrustPipeline;
use crate::progress::Progress;
use crate::rootfs::{FileTarget, RootfsImage};
use crate::unpack::Compression;
use crate::verify::{Admission, PolicyDecision, VerifiedImage};

/// How far a command goes.
#[derive(Clone, Debug)]
pub enum ImageCommand {
    /// Resolve the manifest and check its signatures against the policy; no layers.
    Verify,
    /// Verify, then fetch every layer into the verified blob cache.
    Pull,
    /// Verify, pull, decrypt and unpack the layers, and build an ext4 image at `output`.
    Unpack { output: PathBuf },
}

/// Runs `command` on `reference`; returns the report and the result.
pub fn run(
    pipeline: &TrustPipeline,
    keys: &KeySource,
    reference: &ImageReference,
    command: &ImageCommand,
    progress: &dyn Progress,
) -> (Report, Result<(), Error>) {
    let observed = Observed {
        report: Mutex::new(Report {
            image: reference.to_string(),
            ..Report::default()
        }),
        inner: progress,
    };
    let request = pipeline.request(reference);
    let result = request.finish((|| {
        let image = Stage::Verify.traced(|| request.verify(reference, &observed))?;
        match command {
            ImageCommand::Verify => {}
            ImageCommand::Pull => {
                Stage::Fetch.traced(|| request.pull(&image, &observed))?;
            }
            ImageCommand::Unpack { output } => {
                let target = FileTarget::create(output)
                    .map_err(|e| Error::new(FailureClass::Io, e.to_string()))?;
                request.build(&image, keys, target, &observed)?;
            }
        }
        Ok(())
    })());
    let mut report = observed.report.into_inner().expect("not poisoned");
    report.conclude(&result);
    (report, result)
}

/// What a command found and did; filled as it goes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub image: String,
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
    pub policy: Option<PolicyDecision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<Digest>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsImage>,
    /// The image config's `config` object (Cmd, Entrypoint, Env, WorkingDir, User).
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
}

impl Report {
    /// Sets the outcome from `result`.
    pub fn conclude(&mut self, result: &Result<(), Error>) {
        match result {
            Ok(()) => self.outcome = Outcome::Accepted,
            Err(e) => {
                self.outcome = if e.class.is_rejection() {
                    Outcome::Rejected
                } else {
                    Outcome::Error
                };
                self.class = Some(e.class);
                self.error = Some(e.message.clone());
            }
        }
    }

    /// The text the CLI prints for an accepted image.
    pub fn to_text(&self) -> String {
        let mut out = format!("accepted: {}\n", self.image);
        if let Some(d) = &self.manifest_digest {
            out.push_str(&format!("  manifest  {d}\n"));
        }
        if let Some(p) = &self.policy {
            out.push_str(&format!(
                "  policy    {} (scope {}): {}\n",
                p.policy, p.scope, p.reason
            ));
        }
        for l in &self.layers {
            let mut line = format!(
                "  layer {}   {} {} bytes{}",
                l.index,
                l.digest,
                l.size,
                if l.encrypted { " encrypted" } else { "" }
            );
            if let Some(d) = &l.diff_id {
                line.push_str(&format!(
                    " -> diff_id {d} ({} entries)",
                    l.entries.unwrap_or(0)
                ));
            }
            out.push_str(&line);
            out.push('\n');
        }
        if let Some(r) = &self.rootfs {
            let t = &r.tree;
            out.push_str(&format!(
                "  rootfs    {} ({} bytes ext4, uuid {})\n",
                r.path.display(),
                r.image_bytes,
                r.uuid
            ));
            out.push_str(&format!(
                "            {} files ({} bytes), {} directories, {} symlinks, {} hardlinks, {} setuid, {} device nodes\n",
                t.regular_files,
                t.content_bytes,
                t.directories,
                t.symlinks,
                t.hardlinks,
                t.setuid_files,
                t.device_nodes
            ));
        }
        out
    }
}

/// The report filled from the stages' notifications; progress passed on to `inner`.
struct Observed<'a> {
    report: Mutex<Report>,
    inner: &'a dyn Progress,
}

impl Observed<'_> {
    fn with(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.report.lock().expect("not poisoned"));
    }
}

impl Progress for Observed<'_> {
    fn stage(&self, message: &str) {
        self.inner.stage(message);
    }
    fn bytes(&self, label: &str, done: u64, total: u64) {
        self.inner.bytes(label, done, total);
    }
    fn finish_bytes(&self) {
        self.inner.finish_bytes();
    }
    fn admitted(&self, admission: &Admission) {
        self.with(|r| r.requirements = admission.requirements.clone());
    }
    fn source(&self, description: &str) {
        self.with(|r| r.source = Some(description.to_string()));
    }
    fn resolved(&self, manifest: &Digest, platform_manifest: &Digest) {
        self.with(|r| {
            r.manifest_digest = Some(manifest.clone());
            r.platform_manifest_digest = Some(platform_manifest.clone());
        });
    }
    fn policy(&self, decision: &PolicyDecision) {
        self.with(|r| r.policy = Some(decision.clone()));
    }
    fn config(&self, image: &ResolvedImage) {
        self.with(|r| {
            r.config_digest = Some(image.manifest.config.digest.clone());
            r.runtime_config = image.runtime_config();
            r.layers = image
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
                    entries: None,
                    file_bytes: None,
                })
                .collect();
        });
    }
    fn verified(&self, image: &VerifiedImage) {
        self.with(|r| {
            for (report, layer) in r.layers.iter_mut().zip(&image.layers) {
                report.compression = Some(layer.compression);
            }
        });
    }
    fn pulled(&self, index: usize, path: &Path) {
        self.with(|r| {
            if let Some(l) = r.layers.get_mut(index) {
                l.cached_at = Some(path.to_path_buf());
            }
        });
    }
    fn unpacked(&self, index: usize, outcome: &LayerOutcome) {
        self.with(|r| {
            if let Some(l) = r.layers.get_mut(index) {
                l.diff_id = Some(outcome.diff_id.clone());
                l.entries = Some(outcome.entries);
                l.file_bytes = Some(outcome.file_bytes);
            }
        });
    }
    fn built(&self, rootfs: &RootfsImage) {
        self.with(|r| r.rootfs = Some(rootfs.clone()));
    }
}
