//! Safe unpack of decrypted, decompressed OCI layers into the image's file system, built in
//! memory ([`tree`]) with file content streamed to its final blocks.
//!
//! Layers are applied in order with OCI whiteout semantics (`.wh.<name>` removes a lower
//! entry, `.wh..wh..opq` empties a directory of lower entries). Anything that could make a
//! path resolve elsewhere is refused: absolute paths, `..`, paths through a symlink (see
//! [`tree`]), hardlinks through symlinks or to directories, and device nodes unless allowed.
//! Limits on entries, one file's size, total bytes and the raw tar stream are checked from tar
//! headers before content is read, so a decompression bomb stops at its first oversized
//! header rather than after inflating it.
//!
//! Nothing is published by this module: callers finish the file system only after every
//! layer's decryption was authenticated and its diff_id matched, and drop it otherwise.

mod apply;
pub mod path;
pub mod tree;

use std::fmt;
use std::io::{self, Read};

use policy::reference::Digest;
use sha2::{Digest as _, Sha256};

pub use apply::apply_layer;
pub use tree::ImageTree;

/// How a layer's tar stream is compressed, from its (decrypted) media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps OCI and Docker layer media types; anything else is refused by name.
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
            other if other.contains("nondistributable") || other.contains("foreign") => {
                Err(UnpackError::new(
                    UnpackErrorKind::Unsupported,
                    format!("non-distributable (foreign) layer {other:?} is not supported"),
                ))
            }
            other => Err(UnpackError::new(
                UnpackErrorKind::Unsupported,
                format!("layer media type {other:?} is not a tar layer this service handles"),
            )),
        }
    }

    /// Wraps `r` in the matching decoder.
    pub fn decoder<'a, R: Read + Send + 'a>(self, r: R) -> io::Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Compression::None => Box::new(r),
            // Multi-member gzip is valid and produced by some tools (pigz).
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}

/// Bounds on what one image may unpack to.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Limits {
    /// Sum of regular file sizes over all layers.
    pub max_unpacked_bytes: u64,
    /// Size of one regular file.
    pub max_file_size: u64,
    /// Tar entries over all layers (every entry may create an inode).
    pub max_inodes: u64,
    /// Create character and block device nodes instead of refusing the layer.
    pub allow_device_nodes: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_unpacked_bytes: 8 << 30,
            max_file_size: 2 << 30,
            max_inodes: 1_000_000,
            allow_device_nodes: false,
        }
    }
}

impl Limits {
    /// Bytes of raw tar stream allowed per layer: content plus generous room for headers
    /// and padding, so trailing garbage after the end-of-archive marker cannot inflate forever.
    fn max_stream_bytes(&self) -> u64 {
        self.max_unpacked_bytes
            .saturating_add(self.max_inodes.saturating_mul(2048))
            .saturating_add(1 << 20)
    }
}

/// What an image has used of its [`Limits`] so far, carried across layers: at the end, what
/// its unpack found, kept with a cached base so that a later request with stricter limits is
/// checked against it ([`Budget::check`]) as its own unpack would have been.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    /// Regular file content written, over all layers (what later layers delete included).
    pub unpacked_bytes: u64,
    /// Tar entries, over all layers.
    pub inodes: u64,
    /// The largest regular file of any layer.
    pub largest_file: u64,
    /// Character and block device entries, over all layers.
    pub device_nodes: u64,
    /// Regular files with the setuid or setgid bit, over all layers.
    pub setuid_files: u64,
}

impl Budget {
    /// Whether an image whose unpack found this fits `limits`; the error is the one its
    /// unpack would have stopped with.
    pub fn check(&self, limits: &Limits) -> Result<(), UnpackError> {
        let over = |what: &str, found: u64, limit: u64| {
            UnpackError::new(
                UnpackErrorKind::LimitExceeded,
                format!("the image's {what} ({found}) exceed this request's limit of {limit}"),
            )
        };
        if self.unpacked_bytes > limits.max_unpacked_bytes {
            return Err(over(
                "unpacked bytes",
                self.unpacked_bytes,
                limits.max_unpacked_bytes,
            ));
        }
        if self.largest_file > limits.max_file_size {
            return Err(over(
                "largest file's bytes",
                self.largest_file,
                limits.max_file_size,
            ));
        }
        if self.inodes > limits.max_inodes {
            return Err(over("entries", self.inodes, limits.max_inodes));
        }
        if self.device_nodes > 0 && !limits.allow_device_nodes {
            return Err(UnpackError::new(
                UnpackErrorKind::DeviceNode,
                format!(
                    "the image holds {} device node(s); this request does not allow device nodes",
                    self.device_nodes
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnpackErrorKind {
    /// A path that is absolute, has `..`, or goes through a symlink.
    UnsafePath,
    /// A hardlink that leaves the tree or targets a directory.
    UnsafeLink,
    /// A character or block device while device nodes are not allowed.
    DeviceNode,
    /// One of the [`Limits`] was hit.
    LimitExceeded,
    /// Not a valid layer: broken tar or compression, impossible entries.
    Malformed,
    /// A valid layer using something not handled (entry type, media type).
    Unsupported,
    /// The local file system failed.
    Io,
    /// The storage the image is written to is full.
    NoSpace,
}

impl UnpackErrorKind {
    /// True when the layer content itself is unsafe, as opposed to broken or unsupported.
    pub fn is_unsafe(self) -> bool {
        matches!(
            self,
            UnpackErrorKind::UnsafePath
                | UnpackErrorKind::UnsafeLink
                | UnpackErrorKind::DeviceNode
                | UnpackErrorKind::LimitExceeded
        )
    }
}

/// An unpack failure: its kind, and the entry and reason in words.
#[derive(Debug, Clone, thiserror::Error)]
pub struct UnpackError {
    pub kind: UnpackErrorKind,
    pub message: String,
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl UnpackError {
    pub fn new(kind: UnpackErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Recovers an error that travelled through `io::Error` (from the stream limiter or
    /// a decoder); other I/O errors from the layer stream mean the stream is broken.
    pub fn from_stream(e: io::Error, context: &str) -> Self {
        if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<UnpackError>()) {
            return inner.clone();
        }
        Self::new(UnpackErrorKind::Malformed, format!("{context}: {e}"))
    }
}

/// Counts and hashes the raw tar stream (for the diff_id) and stops it at the stream limit.
pub(crate) struct DiffIdReader<R> {
    inner: R,
    hash: Sha256,
    read: u64,
    limit: u64,
}

impl<R: Read> DiffIdReader<R> {
    fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            read: 0,
            limit,
        }
    }

    /// Reads to EOF (the diff_id covers the whole stream) and returns the digest.
    fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_sha256(self.hash.finalize().into()), self.read))
    }
}

impl<R: Read> Read for DiffIdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            return Err(io::Error::other(UnpackError::new(
                UnpackErrorKind::LimitExceeded,
                format!(
                    "layer tar stream exceeds {} bytes (limit derived from max unpacked bytes and inodes)",
                    self.limit
                ),
            )));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// What one applied layer contained.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerStats {
    /// SHA-256 of the uncompressed tar stream: compared with the config's diff_id.
    pub diff_id: Digest,
    pub tar_bytes: u64,
    pub entries: u64,
    pub file_bytes: u64,
    pub whiteouts: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
                .unwrap(),
            Compression::Gzip
        );
        let e = Compression::from_media_type(
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        )
        .unwrap_err();
        assert_eq!(e.kind, UnpackErrorKind::Unsupported);
        assert!(e.message.contains("non-distributable"));
        let e = Compression::from_media_type("application/x-foo").unwrap_err();
        assert!(e.message.contains("application/x-foo"));
    }
}
