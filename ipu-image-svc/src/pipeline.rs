//! The data path's stages, composed for one image request: [`crate::verify`] ->
//! [`crate::keys`] -> [`crate::fetch`] (layers) -> [`crate::build`]
//! (decrypt, unpack, rootfs). Each step hands the next a typed value; the callers (the CLI's
//! [`crate::report`], the service's Prepare and Verify) choose the steps.

use std::path::PathBuf;
use std::sync::Arc;

use audit::{AuditSink, EventKind};
use policy::reference::ImageReference;
use policy::trust::Policy;

use crate::build::{self, BuildConfig, LayerBlob};
use crate::error::Error;
use crate::fetch::{self, BlobCache, SourceOptions};
use crate::keys::{KeyFor, KeySource};
use crate::metrics::Stage;
use crate::progress::Progress;
use crate::record::Recorder;
use crate::rootfs::{ImageTarget, RootfsOptions};
use crate::unpack::{Budget, Limits};
use crate::verify::{self, Deployment, VerifiedImage, VerifyConfig};

/// Everything a request needs besides the image reference.
pub struct PipelineConfig {
    pub policy: Policy,
    pub cache_dir: PathBuf,
    pub source: SourceOptions,
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
    /// The placement grant the request was admitted with (its envelope): every key release
    /// carries it, for the broker to check again.
    pub grant: Option<Arc<str>>,
    /// Where the stages' durations and the bytes decrypted are counted (a service's).
    pub metrics: Option<Arc<crate::metrics::ServiceMetrics>>,
}

impl PipelineConfig {
    pub fn new(policy: Policy, cache_dir: PathBuf) -> Self {
        Self {
            policy,
            cache_dir,
            source: SourceOptions::default(),
            limits: Limits::default(),
            rootfs: RootfsOptions::default(),
            audit: None,
            tenant: None,
            function: None,
            deployment: None,
            grant: None,
            metrics: None,
        }
    }
}

/// The stages with their configuration.
pub struct TrustPipeline {
    cfg: PipelineConfig,
}

impl TrustPipeline {
    pub fn new(cfg: PipelineConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// One request for `reference`: its stages record into one audit context.
    pub fn request(&self, reference: &ImageReference) -> ImageRequest<'_> {
        ImageRequest {
            cfg: &self.cfg,
            rec: Recorder::new(
                self.cfg.audit.clone(),
                self.cfg.tenant.clone(),
                self.cfg.function.clone(),
                reference.to_string(),
            ),
        }
    }
}

/// One image request, stage by stage. End it with [`finish`](Self::finish), which records
/// a failure no stage recorded.
pub struct ImageRequest<'p> {
    cfg: &'p PipelineConfig,
    rec: Recorder,
}

impl ImageRequest<'_> {
    /// Policy, manifest, signatures, config.
    pub fn verify(
        &self,
        reference: &ImageReference,
        progress: &dyn Progress,
    ) -> Result<VerifiedImage, Error> {
        let cfg = VerifyConfig {
            policy: &self.cfg.policy,
            source: &self.cfg.source,
            deployment: self.cfg.deployment.as_ref(),
            limits: &self.cfg.limits,
        };
        verify::verify(&cfg, reference, progress, &self.rec)
    }

    /// Every encrypted layer's key released by the key broker for this request, and dropped
    /// at once: what a cached base must pass before it is used again (the broker decides
    /// per tenant, function and IPU, and may have revoked the key since). With local keys
    /// (development) nothing is asked: they were checked when the base was built.
    pub fn check_keys(&self, keys: &KeySource, image: &VerifiedImage) -> Result<(), Error> {
        if !keys.is_broker() {
            return Ok(());
        }
        let (image_ref, image_digest) = (
            image.reference.to_string(),
            image.manifest_digest.to_string(),
        );
        for layer in image.encrypted_layers() {
            let released = keys.release(&KeyFor {
                image: &image_ref,
                image_digest: &image_digest,
                layer: &layer.descriptor,
                tenant: self.rec.tenant(),
                function: self.rec.function(),
                grant: self.cfg.grant.as_deref(),
            });
            if let Err(e) = released {
                let digest = layer.descriptor.digest.to_string();
                let e = Error::from(e).context(format!("layer {} ({digest})", layer.index));
                return Err(self.rec.refuse(
                    EventKind::LayerDecrypt,
                    e,
                    &[("layer", layer.index.to_string()), ("layer_digest", digest)],
                ));
            }
        }
        Ok(())
    }

    /// A base built earlier (under another request's limits) held to this request's unpack
    /// limits: what its unpack found must fit them, as this request's own unpack would have
    /// had to. Refused and recorded otherwise.
    pub fn admit_cached(&self, image: &VerifiedImage, found: &Budget) -> Result<(), Error> {
        found.check(&image.admission.limits).map_err(|e| {
            let e = crate::error::from_cached(e, &image.platform_manifest_digest);
            self.rec.refuse(
                EventKind::LayerUnpack,
                e,
                &[("cached_base", image.platform_manifest_digest.to_string())],
            )
        })
    }

    /// Where the build reads each layer's blob (it checks each digest as it reads): an OCI
    /// layout's own files when the source is one, the verified cache's copy when there is
    /// one, else the source itself, as the build reads it, kept in the cache as it goes.
    fn layer_blobs(&self, image: &VerifiedImage) -> Result<Vec<LayerBlob>, Error> {
        let local: Option<Vec<PathBuf>> = image
            .manifest
            .layers
            .iter()
            .map(|layer| image.source.local_blob(&layer.digest))
            .collect();
        if let Some(paths) = local {
            return Ok(paths.into_iter().map(LayerBlob::File).collect());
        }
        let cache = BlobCache::new(&self.cfg.cache_dir)?;
        let mut blobs = Vec::with_capacity(image.manifest.layers.len());
        for layer in &image.manifest.layers {
            blobs.push(if cache.path_of(&layer.digest).exists() {
                // A copy from an earlier build, checked again first (fetched again if it no
                // longer matches), so that a corrupt cache costs a fetch, not a build.
                LayerBlob::Cached(cache.fetch(image.source.as_ref(), layer, &|_, _| {})?)
            } else {
                LayerBlob::Fetch {
                    cache: cache.clone(),
                    opened: None,
                }
            });
        }
        Ok(blobs)
    }

    /// Every layer fetched into the verified blob cache; returns their paths.
    pub fn pull(
        &self,
        image: &VerifiedImage,
        progress: &dyn Progress,
    ) -> Result<Vec<PathBuf>, Error> {
        let cache = BlobCache::new(&self.cfg.cache_dir)?;
        Ok(fetch::pull::pull_layers(
            image.source.as_ref(),
            &cache,
            &image.manifest.layers,
            progress,
        )?)
    }

    /// The ext4 image of `image` built into `target`: refused before anything is fetched
    /// when no key could decrypt it, then pulled, decrypted, unpacked and published.
    pub fn build<T: ImageTarget>(
        &self,
        image: &VerifiedImage,
        keys: &KeySource,
        target: T,
        progress: &dyn Progress,
    ) -> Result<build::Built<T::Output>, Error> {
        build::require_keys(keys, image, &self.rec)?;
        // The layer keys are released while the layers are fetched: the broker's round trips
        // overlap the registry's. A refusal is recorded when the build reaches its layer.
        let (tenant, function, grant) = (
            self.rec.tenant(),
            self.rec.function(),
            self.cfg.grant.as_deref(),
        );
        // The first layer to fetch is asked for at once: its transfer overlaps the broker's
        // round trips (a failure is reported when the build asks again).
        let blobs = |image: &VerifiedImage| -> Result<Vec<LayerBlob>, Error> {
            let mut blobs = self.layer_blobs(image)?;
            let first = blobs
                .iter_mut()
                .zip(&image.manifest.layers)
                .find(|(b, _)| matches!(b, LayerBlob::Fetch { .. }));
            if let Some((LayerBlob::Fetch { opened, .. }, desc)) = first {
                *opened = image.source.open_blob_raw(&desc.digest).ok();
            }
            Ok(blobs)
        };
        let (blobs, released) = if image.encrypted_layers().next().is_none() {
            // No key to ask for: no thread either.
            (self.timed(Stage::Fetch, || blobs(image)), Vec::new())
        } else {
            let metrics = self.cfg.metrics.as_deref();
            let release = || match metrics {
                Some(m) => m.time(Stage::KeyRelease, || {
                    build::release_keys(keys, image, tenant, function, grant)
                }),
                None => Stage::KeyRelease
                    .traced(|| build::release_keys(keys, image, tenant, function, grant)),
            };
            std::thread::scope(|scope| {
                let releasing = std::thread::Builder::new()
                    .name("key-release".into())
                    .spawn_scoped(scope, release);
                let blobs = self.timed(Stage::Fetch, || blobs(image));
                let released = match releasing {
                    Ok(thread) => thread.join().expect("the key release thread panicked"),
                    // No thread to be had: released here, after the pull.
                    Err(_) => release(),
                };
                (blobs, released)
            })
        };
        let blobs = blobs?;
        let cfg = BuildConfig {
            rootfs: &self.cfg.rootfs,
        };
        let built = self.timed(Stage::Build, || {
            build::build_rootfs(&cfg, image, blobs, released, target, progress, &self.rec)
        })?;
        if let Some(m) = &self.cfg.metrics {
            m.decrypted(image.encrypted_layers().map(|l| l.descriptor.size).sum());
        }
        Ok(built)
    }

    /// Runs `f` inside `stage`'s span, timed as `stage` when the request counts its stages.
    fn timed<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        match &self.cfg.metrics {
            Some(m) => m.time(stage, f),
            None => stage.traced(f),
        }
    }

    /// Ends the request with `result`.
    pub fn finish<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        self.rec.finish(result)
    }
}
