//! The build stage: a verified, pulled image's layers decrypted ([`crate::decrypt`]),
//! decompressed and applied ([`crate::unpack`]) to the image's ext4 file system, whose file
//! content goes straight to its blocks in the target ([`crate::rootfs`]).
//!
//! Each layer, read from the verified blob cache, must hash to the signed config's diff_id,
//! and an encrypted layer's HMAC must verify, before the next layer starts. Only then is the
//! file system's metadata written and the image published. Any failure drops the target and
//! leaves no output.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;

use ext4_image::BlockSink;

use audit::{EventKind, Outcome};
use policy::reference::Digest;
use serde::Serialize;

use crate::decrypt::{self, Finished};
use crate::error::{from_unpack, Error, FailureClass};
use crate::fetch::{BlobCache, FetchError, ImageSource, VerifyingReader};
use crate::keys::{KeyError, KeyFor, KeySource, LayerKey};
use crate::metrics::Stage;
use crate::progress::Progress;
use crate::readahead;
use crate::record::Recorder;
use crate::rootfs::{self, ImageTarget, RootfsError, RootfsImage, RootfsOptions};
use crate::unpack::{self, Budget, Compression, ImageTree, Limits, UnpackError};
use crate::verify::{VerifiedImage, VerifiedLayer};

/// What applying one layer established.
#[derive(Clone, Debug, Serialize)]
pub struct LayerOutcome {
    /// The layer's tar stream hashed to the config's diff_id.
    pub diff_id: Digest,
    pub entries: u64,
    pub file_bytes: u64,
}

/// What the build stage needs besides the image.
pub struct BuildConfig<'a> {
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

/// Where a layer's blob is read from; whichever it is, its digest is checked as it is read.
pub enum LayerBlob {
    /// A file of the source itself (an OCI layout's blob).
    File(PathBuf),
    /// The verified cache's copy (checked again before the build): deleted if it no longer
    /// matches its digest as the build reads it, so that the next build fetches it again.
    Cached(PathBuf),
    /// Fetched from the image's source as the build reads it (the network's reads overlap
    /// the decryption and the unpack), and kept in this cache once all of it matched its
    /// digest. `opened` is its stream when the request was made ahead (while the layer keys
    /// were being released).
    Fetch {
        cache: BlobCache,
        opened: Option<Box<dyn Read + Send>>,
    },
}

/// The built ext4 image, published, and what the unpack found on the way.
#[derive(Clone, Debug)]
pub struct Built<O> {
    /// The published image (a path, or the service's base).
    pub output: O,
    pub rootfs: RootfsImage,
    /// Totals over all layers, as the unpack limits counted them: a cached base keeps them,
    /// so each later request is held to its own limits ([`Budget::check`]).
    pub found: Budget,
}

/// Builds the ext4 image of `image` (whose layers' blobs are `blobs`) into `target`, and
/// publishes it once every layer checked out and the build is on the record.
pub fn build_rootfs<T: ImageTarget>(
    cfg: &BuildConfig<'_>,
    image: &VerifiedImage,
    blobs: Vec<LayerBlob>,
    mut released: ReleasedKeys,
    mut target: T,
    progress: &dyn Progress,
    rec: &Recorder,
) -> Result<Built<T::Output>, Error> {
    let output = target.path().display().to_string();
    let refuse_build = |e: RootfsError| {
        let class = match &e {
            RootfsError::NoSpace { .. } => FailureClass::WorkspaceFull,
            RootfsError::Ext4 {
                source: ext4_image::Error::TooLarge(_),
                ..
            } => FailureClass::TooLarge,
            RootfsError::Io { .. } | RootfsError::Ext4 { .. } => FailureClass::Io,
        };
        rec.refuse(
            EventKind::BaseBuild,
            Error::new(class, e.to_string()),
            &[("output", output.clone())],
        )
    };
    let seed = image.platform_manifest_digest.to_string();
    let options = cfg
        .rootfs
        .ext4(&seed, image.admission.limits.max_unpacked_bytes);
    let mut tree = ImageTree::new(target.sink(), options)
        .map_err(|source| refuse_build(ext4_error(&output, source)))?;
    let mut budget = Budget::default();
    released.resize_with(image.layers.len(), || None);
    // The next layer's blob is asked for while this one is built: the request's round trip
    // (a few milliseconds from a registry, tens when it is busy) overlaps the build. Its body
    // is read, and its digest checked, only when its turn comes.
    let mut blobs = blobs.into_iter().peekable();
    std::thread::scope(|scope| -> Result<(), Error> {
        let mut ahead: Option<std::thread::ScopedJoinHandle<'_, Option<Box<dyn Read + Send>>>> =
            None;
        for ((i, layer), key) in image.layers.iter().enumerate().zip(released) {
            let Some(mut blob) = blobs.next() else {
                break;
            };
            if let (Some(opening), LayerBlob::Fetch { opened, .. }) = (ahead.take(), &mut blob) {
                *opened = opening.join().unwrap_or(None);
            }
            if let (Some(LayerBlob::Fetch { opened: None, .. }), Some(next)) =
                (blobs.peek(), image.layers.get(i + 1))
            {
                let source = image.source.as_ref();
                ahead = std::thread::Builder::new()
                    .name("blob-ahead".into())
                    .spawn_scoped(scope, move || {
                        source.open_blob_raw(&next.descriptor.digest).ok()
                    })
                    .ok();
            }
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
            let cached_at = match &blob {
                LayerBlob::Fetch { cache, .. } => Some(cache.path_of(&layer.descriptor.digest)),
                _ => None,
            };
            let unpacking = Stage::Unpack.span();
            match unpacking.in_scope(|| {
                apply_layer(
                    &mut tree,
                    image.source.as_ref(),
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
                            "layer decrypted; HMAC and diff_id verified",
                            &details,
                        )?;
                    }
                    rec.record(
                        EventKind::LayerUnpack,
                        Outcome::Success,
                        "layer unpacked into the image's file system",
                        &details,
                    )?;
                    if let Some(cached) = &cached_at {
                        progress.pulled(layer.index, cached);
                    }
                    progress.unpacked(layer.index, &outcome);
                }
                Err(LayerFailure::Decrypt(e)) => {
                    return Err(rec.refuse(EventKind::LayerDecrypt, e, &details))
                }
                Err(LayerFailure::Unpack(e)) => {
                    let e = if e.class == FailureClass::WorkspaceFull {
                        e.context(format!("no space left for the image at {output}"))
                    } else {
                        e
                    };
                    return Err(rec.refuse(EventKind::LayerUnpack, e, &details));
                }
            }
        }
        Ok(())
    })?;
    progress.stage("writing the ext4 file system");
    let image_fs = Stage::FileSystem
        .traced(|| tree.finish())
        .map_err(|source| refuse_build(ext4_error(&output, source)))?;
    let ext4_image::Image {
        size_bytes: size,
        inodes_count,
        summary,
        ..
    } = image_fs;
    let rootfs = RootfsImage {
        path: target.path().to_path_buf(),
        image_bytes: size,
        inodes_reserved: inodes_count,
        uuid: rootfs::uuid_from_seed(&seed),
        tree: summary,
    };
    let published = target.publish(size).map_err(|source| {
        refuse_build(if is_no_space(&source) {
            RootfsError::NoSpace {
                output: output.clone(),
                source,
            }
        } else {
            RootfsError::Io {
                what: "cannot publish the image at",
                path: output.clone(),
                source,
            }
        })
    })?;
    let recorded = rec.record(
        EventKind::BaseBuild,
        Outcome::Success,
        "ext4 rootfs built from the verified image",
        &[("output", output.clone()), ("uuid", rootfs.uuid.clone())],
    );
    if let Err(e) = recorded {
        // Unrecorded, so not published.
        T::retract(published);
        return Err(e);
    }
    progress.built(&rootfs);
    Ok(Built {
        output: published,
        rootfs,
        found: budget,
    })
}

fn ext4_error(output: &str, source: ext4_image::Error) -> RootfsError {
    match source {
        ext4_image::Error::Io(source) if is_no_space(&source) => RootfsError::NoSpace {
            output: output.to_string(),
            source,
        },
        source => RootfsError::Ext4 {
            output: output.to_string(),
            source,
        },
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
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

/// Applies one layer from its blob: its released key (`None` for a layer that is not
/// encrypted), decryption, decompression, unpack, then the diff_id check. The blob is read
/// once, its digest checked as it is read; reading and decrypting, decompressing, and the
/// unpack each run on a thread of their own ([`readahead`]).
fn apply_layer<S: BlockSink>(
    tree: &mut ImageTree<S>,
    source: &dyn ImageSource,
    blob: LayerBlob,
    layer: &VerifiedLayer,
    key: Option<Result<LayerKey, KeyError>>,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<LayerOutcome, LayerFailure> {
    let (index, digest) = (layer.index, &layer.descriptor.digest);
    let open_file = |path: &std::path::Path| -> Result<Box<dyn Read + Send>, LayerFailure> {
        let file = File::open(path)
            .map_err(|e| LayerFailure::Unpack(Error::io("cannot open blob", path, e)))?;
        Ok(Box::new(BufReader::with_capacity(256 * 1024, file)))
    };
    // What to read, where from (for messages), the cache to keep a fetched blob in, and the
    // cached copy to delete if it no longer matches (so that the next build fetches it).
    let (raw, origin, keep_in, corrupt_copy) = match blob {
        LayerBlob::File(path) => (open_file(&path)?, path.display().to_string(), None, None),
        LayerBlob::Cached(path) => (
            open_file(&path)?,
            path.display().to_string(),
            None,
            Some(path),
        ),
        LayerBlob::Fetch { cache, opened } => {
            let raw = match opened {
                Some(stream) => stream,
                None => source
                    .open_blob_raw(digest)
                    .map_err(|e| LayerFailure::Unpack(Error::from(e)))?,
            };
            (raw, source.describe(), Some(cache), None)
        }
    };
    // Checked against the signed manifest as it is read, wherever the blob came from. A
    // blob that fails its digest is the failure to report, whatever it made the stages after
    // it see (a tampered blob decrypts or decompresses to garbage first).
    let blob_failure = BlobFailure::default();
    let verified = BlobFailure::watch(
        &blob_failure,
        VerifyingReader::new(raw, digest.clone(), layer.descriptor.size, origin),
    );
    let reader: Box<dyn Read + Send> = match keep_in {
        Some(cache) => Box::new(
            cache
                .tee(&layer.descriptor, verified)
                .map_err(|e| LayerFailure::Unpack(Error::from(e)))?,
        ),
        None => Box::new(verified),
    };
    let blob_err = |e: FetchError| {
        if let Some(path) = &corrupt_copy {
            tracing::warn!(path = %path.display(), "cached blob is corrupt; deleted");
            let _ = std::fs::remove_file(path);
        }
        LayerFailure::Unpack(Error::from(e))
    };
    let decrypt_err =
        |e: Error| LayerFailure::Decrypt(e.context(format!("layer {index} ({digest})")));
    let unpack_err = |e| LayerFailure::Unpack(from_unpack(e, index, digest));
    let stats = if layer.encrypted {
        let key = key
            .unwrap_or(Err(KeyError::NotConfigured))
            .map_err(|e| decrypt_err(e.into()))?;
        let decrypting = Stage::Decrypt.span();
        let decryptor = decrypting
            .in_scope(|| decrypt::decryptor(reader, &key))
            .map_err(|e| decrypt_err(e.into()))?;
        let (unpacked, decryptor) = std::thread::scope(|scope| {
            // Every read of the ciphertext decrypts: timed as `decrypt`.
            let (plaintext, decrypting) = readahead::spawn(
                scope,
                "layer-decrypt",
                InSpan {
                    span: decrypting.clone(),
                    inner: decryptor,
                },
            );
            let unpacked = unpack_stream(scope, tree, plaintext, layer.compression, limits, budget);
            let produced = decrypting.join().expect("the decrypt thread panicked");
            (unpacked, produced.reader.inner)
        });
        let finished = decrypting.in_scope(|| decrypt::finish(decryptor, unpacked));
        if let Some(e) = blob_failure.take() {
            return Err(blob_err(e));
        }
        match finished {
            Ok(stats) => stats,
            Err(Finished::Decrypt(e)) => return Err(decrypt_err(e.into())),
            Err(Finished::Consumer(e)) => return Err(unpack_err(e)),
        }
    } else {
        let (unpacked, produced) = std::thread::scope(|scope| {
            let (compressed, reading) = readahead::spawn(scope, "layer-read", reader);
            let unpacked =
                unpack_stream(scope, tree, compressed, layer.compression, limits, budget);
            (unpacked, reading.join().expect("the read thread panicked"))
        });
        let (mut reader, mut error) = (produced.reader, produced.error);
        if error.is_none() {
            // To its end, whatever the unpack left unread: the digest covers all of it.
            error = std::io::copy(&mut reader, &mut std::io::sink()).err();
        }
        if let Some(e) = blob_failure.take() {
            return Err(blob_err(e));
        }
        if let Some(e) = error {
            return Err(blob_err(FetchError::from_io(
                e,
                &format!("reading layer {index} ({digest})"),
            )));
        }
        unpacked.map_err(unpack_err)?
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
    })
}

/// The failure of a blob's own check (its size and digest), kept aside for the caller.
#[derive(Clone, Default)]
struct BlobFailure(std::sync::Arc<std::sync::Mutex<Option<FetchError>>>);

impl BlobFailure {
    fn watch<R: Read>(&self, reader: VerifyingReader<R>) -> Watched<R> {
        Watched {
            reader,
            failure: self.clone(),
        }
    }

    fn take(&self) -> Option<FetchError> {
        self.0.lock().expect("not poisoned").take()
    }
}

/// A blob's verifying reader that keeps its failure in a [`BlobFailure`].
struct Watched<R> {
    reader: VerifyingReader<R>,
    failure: BlobFailure,
}

impl<R: Read> Read for Watched<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf).inspect_err(|e| {
            if let Some(f) = e.get_ref().and_then(|i| i.downcast_ref::<FetchError>()) {
                *self.failure.0.lock().expect("not poisoned") = Some(f.clone());
            }
        })
    }
}

/// A reader whose every read runs inside `span`.
struct InSpan<R> {
    span: tracing::Span,
    inner: R,
}

impl<R: Read> Read for InSpan<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.span.in_scope(|| self.inner.read(buf))
    }
}

/// Decompresses `compressed` on a thread of `scope` (timed as `decompress`) and applies the
/// tar stream to `tree` on this one.
fn unpack_stream<'scope, S: BlockSink, R: Read + Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    tree: &mut ImageTree<S>,
    compressed: R,
    compression: Compression,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<unpack::LayerStats, UnpackError> {
    let decoder = compression
        .decoder(compressed)
        .map_err(|e| UnpackError::from_stream(e, "starting decompression"))?;
    let (tar, decompressing) = readahead::spawn(
        scope,
        "layer-decompress",
        InSpan {
            span: Stage::Decompress.span(),
            inner: decoder,
        },
    );
    let applied = unpack::apply_layer(tree, tar, limits, budget);
    // Its errors reached the unpack through the stream.
    let _ = decompressing
        .join()
        .expect("the decompress thread panicked");
    applied
}
