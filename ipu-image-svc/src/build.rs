//! The build stage: a verified, pulled image's layers decrypted ([`crate::decrypt`]),
//! decompressed and applied ([`crate::unpack`]) to a private staging tree, then the ext4
//! image ([`crate::rootfs`]).
//!
//! Each layer, read back from the verified blob cache, must hash to the signed config's
//! diff_id, and an encrypted layer's HMAC must verify, before the next layer starts. Only
//! then is the ext4 image built and moved to the output path. Any failure drops the staging
//! tree and leaves no output.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use audit::{EventKind, Outcome};
use policy::reference::Digest;
use serde::Serialize;

use crate::decrypt::{self, Finished};
use crate::error::{from_unpack, Error, FailureClass};
use crate::keys::{KeyError, KeyFor, KeySource, LayerKey};
use crate::metrics::Stage;
use crate::progress::Progress;
use crate::record::Recorder;
use crate::rootfs::{self, RootfsError, RootfsImage, RootfsOptions};
use crate::unpack::{self, Budget, Compression, Limits, Staging, UnpackError};
use crate::verify::{VerifiedImage, VerifiedLayer};

/// What applying one layer established.
#[derive(Clone, Debug, Serialize)]
pub struct LayerOutcome {
    /// The layer's tar stream hashed to the config's diff_id.
    pub diff_id: Digest,
    pub entries: u64,
    pub file_bytes: u64,
    /// Go ocicrypt recorded a pre-recompression digest; the diff_id check authenticated it.
    pub stale_private_digest: Option<String>,
}

/// What the build stage needs besides the image.
pub struct BuildConfig<'a> {
    /// Where the private staging tree is made (deleted with it).
    pub staging_parent: &'a Path,
    pub rootfs: &'a RootfsOptions,
}

/// Refuses an image with encrypted layers when no key could be had, before its layers are
/// fetched.
pub fn require_keys(keys: &KeySource, image: &VerifiedImage, rec: &Recorder) -> Result<(), Error> {
    if keys.is_configured() {
        return Ok(());
    }
    match image.encrypted_layers().next() {
        None => Ok(()),
        Some(layer) => Err(rec.refuse(
            EventKind::LayerDecrypt,
            Error::new(
                FailureClass::NoDecryptionKey,
                format!(
                    "layer {} ({}) is encrypted and no decryption key was given",
                    layer.index, layer.descriptor.digest
                ),
            ),
            &layer_details(layer),
        )),
    }
}

/// Each layer's key as the broker (or the local keys) answered, by layer: `None` for a layer
/// that is not encrypted. Released before the build so that the broker's round trips overlap
/// the registry's ([`crate::pipeline::ImageRequest::build`] runs this beside the pull); a
/// refusal is recorded when the build reaches that layer, in layer order.
pub type ReleasedKeys = Vec<Option<Result<LayerKey, KeyError>>>;

/// Releases every encrypted layer's key for `tenant` and `function`, in layer order, stopping
/// at the first refusal (the build stops there too).
pub fn release_keys(
    keys: &KeySource,
    image: &VerifiedImage,
    tenant: &str,
    function: &str,
    grant: Option<&str>,
) -> ReleasedKeys {
    let (image_ref, image_digest) = (
        image.reference.to_string(),
        image.manifest_digest.to_string(),
    );
    let mut released = Vec::with_capacity(image.layers.len());
    for layer in &image.layers {
        if !layer.encrypted {
            released.push(None);
            continue;
        }
        let key = keys.release(&KeyFor {
            image: &image_ref,
            image_digest: &image_digest,
            layer: &layer.descriptor,
            tenant,
            function,
            grant,
        });
        let refused = key.is_err();
        released.push(Some(key));
        if refused {
            break;
        }
    }
    released
}

/// The built ext4 image and what the unpack found on the way.
#[derive(Clone, Debug)]
pub struct Built {
    pub rootfs: RootfsImage,
    /// Totals over all layers, as the unpack limits counted them: a cached base keeps them,
    /// so each later request is held to its own limits ([`Budget::check`]).
    pub found: Budget,
}

/// Builds the ext4 image of `image` (whose layers' blobs are `blobs`) at `output`.
pub fn build_rootfs(
    cfg: &BuildConfig<'_>,
    image: &VerifiedImage,
    blobs: &[PathBuf],
    mut released: ReleasedKeys,
    output: &Path,
    progress: &dyn Progress,
    rec: &Recorder,
) -> Result<Built, Error> {
    // Where the plaintext goes, named in a "full" error (the service bounds it).
    let full = |e: Error, place: &Path| {
        if e.class == FailureClass::WorkspaceFull {
            e.context(format!(
                "no space left for the image's plaintext in {} (the service bounds it: --plaintext-memory)",
                place.display()
            ))
        } else {
            e
        }
    };
    let staging = Staging::create(cfg.staging_parent)
        .map_err(|e| Error::io("cannot create staging tree in", cfg.staging_parent, e))?;
    let mut budget = Budget::default();
    released.resize_with(image.layers.len(), || None);
    for ((layer, blob), key) in image.layers.iter().zip(blobs).zip(released) {
        progress.stage(&format!(
            "unpacking layer {}/{} ({})",
            layer.index + 1,
            image.layers.len(),
            layer.descriptor.digest
        ));
        let mut details = layer_details(layer).to_vec();
        // Which broker replica released the key, for the record.
        if let Some(d) = key
            .as_ref()
            .and_then(|k| k.as_ref().ok())
            .and_then(LayerKey::broker_detail)
        {
            details.push(d);
        }
        let unpacking = Stage::Unpack.span();
        match unpacking.in_scope(|| {
            apply_layer(
                &staging,
                blob,
                layer,
                key,
                &image.admission.limits,
                &mut budget,
            )
        }) {
            Ok(outcome) => {
                if layer.encrypted {
                    rec.record(
                        EventKind::LayerDecrypt,
                        Outcome::Success,
                        "layer decrypted; HMAC, plaintext digest and diff_id verified",
                        &details,
                    )?;
                }
                rec.record(
                    EventKind::LayerUnpack,
                    Outcome::Success,
                    "layer unpacked into the private staging tree",
                    &details,
                )?;
                progress.unpacked(layer.index, &outcome);
            }
            Err(LayerFailure::Decrypt(e)) => {
                return Err(rec.refuse(EventKind::LayerDecrypt, e, &details))
            }
            Err(LayerFailure::Unpack(e)) => {
                let e = full(e, cfg.staging_parent);
                return Err(rec.refuse(EventKind::LayerUnpack, e, &details));
            }
        }
    }
    progress.stage("building ext4 image");
    let uuid = rootfs::uuid_from_seed(&image.platform_manifest_digest.to_string());
    let built =
        Stage::FileSystem.traced(|| rootfs::build_ext4(&staging.path(), output, &uuid, cfg.rootfs));
    let built = built.map_err(|e| {
        let class = match e {
            RootfsError::Io { .. } => FailureClass::Io,
            RootfsError::NoSpace { .. } => FailureClass::WorkspaceFull,
            RootfsError::Mkfs { .. } | RootfsError::MkfsMissing => FailureClass::Mkfs,
        };
        let e = full(Error::new(class, e.to_string()), output);
        rec.refuse(
            EventKind::BaseBuild,
            e,
            &[("output", output.display().to_string())],
        )
    })?;
    let recorded = rec.record(
        EventKind::BaseBuild,
        Outcome::Success,
        "ext4 rootfs built from the verified image",
        &[
            ("output", built.path.display().to_string()),
            ("uuid", built.uuid.clone()),
        ],
    );
    if let Err(e) = recorded {
        // Unrecorded, so not published.
        let _ = std::fs::remove_file(&built.path);
        return Err(e);
    }
    progress.built(&built);
    Ok(Built {
        rootfs: built,
        found: budget,
    })
}

fn layer_details(layer: &VerifiedLayer) -> [(&'static str, String); 2] {
    [
        ("layer", layer.index.to_string()),
        ("layer_digest", layer.descriptor.digest.to_string()),
    ]
}

/// Which stage of a layer failed, for its audit event.
enum LayerFailure {
    Decrypt(Error),
    Unpack(Error),
}

/// Applies one layer from its cached blob: its released key (`None` for a layer that is not
/// encrypted), decryption, decompression, unpack, then the diff_id check.
fn apply_layer(
    staging: &Staging,
    blob: &Path,
    layer: &VerifiedLayer,
    key: Option<Result<LayerKey, KeyError>>,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<LayerOutcome, LayerFailure> {
    let (index, digest) = (layer.index, &layer.descriptor.digest);
    let file = File::open(blob)
        .map_err(|e| LayerFailure::Unpack(Error::io("cannot open cached blob", blob, e)))?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    let decrypt_err =
        |e: Error| LayerFailure::Decrypt(e.context(format!("layer {index} ({digest})")));
    let unpack_err = |e| LayerFailure::Unpack(from_unpack(e, index, digest));
    let (stats, stale) = if layer.encrypted {
        let key = key
            .unwrap_or(Err(KeyError::NotConfigured))
            .map_err(|e| decrypt_err(e.into()))?;
        let decrypting = Stage::Decrypt.span();
        let mut decryptor = decrypting
            .in_scope(|| decrypt::decryptor(reader, &key))
            .map_err(|e| decrypt_err(e.into()))?;
        // Every read of the stream the unpacker consumes decrypts: timed as `decrypt`.
        let stream = InSpan {
            span: &decrypting,
            inner: &mut decryptor,
        };
        let unpacked = unpack_stream(staging, stream, layer.compression, limits, budget);
        match decrypting.in_scope(|| decrypt::finish(decryptor, unpacked)) {
            Ok((stats, stale)) => (stats, stale.map(|s| s.declared)),
            Err(Finished::Decrypt(e)) => return Err(decrypt_err(e.into())),
            Err(Finished::Consumer(e)) => return Err(unpack_err(e)),
        }
    } else {
        // The blob's digest was checked against the signed manifest when it was cached.
        let stats = unpack_stream(staging, reader, layer.compression, limits, budget)
            .map_err(unpack_err)?;
        (stats, None)
    };
    if stats.diff_id != layer.diff_id {
        return Err(LayerFailure::Unpack(Error::new(
            FailureClass::DigestMismatch,
            format!(
                "layer {index} ({digest}): uncompressed content has digest {} but the signed config says {}",
                stats.diff_id, layer.diff_id
            ),
        )));
    }
    Ok(LayerOutcome {
        diff_id: stats.diff_id,
        entries: stats.entries,
        file_bytes: stats.file_bytes,
        stale_private_digest: stale,
    })
}

/// A reader whose every read runs inside `span`.
struct InSpan<'s, R> {
    span: &'s tracing::Span,
    inner: R,
}

impl<R: Read> Read for InSpan<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.span.in_scope(|| self.inner.read(buf))
    }
}

fn unpack_stream<R: Read>(
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
