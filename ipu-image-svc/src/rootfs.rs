//! The root file system image: ext4, built by [`crate::unpack`] in memory with each file's
//! content streamed to its final blocks ([`ext4_image`]), then finished here.
//!
//! The image goes to an [`ImageTarget`]: a plaintext file at a path ([`FileTarget`], the
//! CLI's `image unpack`) or the service's encrypted base. A target shows its image only when
//! it is complete (a file is written under a temporary name and renamed into place), so a
//! failure never leaves a partial image where the output is expected.

use std::io;
use std::path::{Path, PathBuf};

use ext4_image::BlockSink;
use serde::Serialize;

const MIB: u64 = 1 << 20;

/// The built image.
#[derive(Clone, Debug, Serialize)]
pub struct RootfsImage {
    pub path: PathBuf,
    pub image_bytes: u64,
    pub inodes_reserved: u64,
    pub uuid: String,
    /// What the image's tree holds.
    pub tree: ext4_image::Summary,
}

#[derive(Clone, Debug)]
pub struct RootfsOptions {
    /// Free space left in the image for writes through per-function clones.
    pub free_bytes: u64,
    /// Free inodes beyond what the tree uses.
    pub free_inodes: u64,
    pub label: String,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        Self {
            free_bytes: 64 * MIB,
            free_inodes: 4096,
            label: "ipu-rootfs".into(),
        }
    }
}

impl RootfsOptions {
    /// The file system's options for an image whose identity derives from `seed` (the
    /// manifest digest) and whose unpack is bounded by `max_content`.
    pub fn ext4(&self, seed: &str, max_content: u64) -> ext4_image::Options {
        let uuid = uuid_bytes(seed);
        ext4_image::Options {
            uuid,
            label: self.label.clone(),
            hash_seed: uuid,
            free_bytes: self.free_bytes,
            free_inodes: self.free_inodes,
            // Sizes the descriptor space kept free in the superblock groups, so a clone's
            // file system can also grow (resize2fs) to a terabyte without moving blocks.
            max_bytes: max_content
                .saturating_mul(2)
                .saturating_add(self.free_bytes)
                .max(1 << 40),
            // The image's own times come from the layers; a fixed time keeps builds of the
            // same image identical.
            timestamp: 0,
            ..ext4_image::Options::default()
        }
    }
}

/// Where a built image goes.
pub trait ImageTarget {
    type Sink: BlockSink;
    /// What a published image is.
    type Output;
    /// Where the file system's blocks are written.
    fn sink(&mut self) -> &mut Self::Sink;
    /// Where the image is published, for messages and the record.
    fn path(&self) -> &Path;
    /// Completes the image of `size` bytes and puts it in place.
    fn publish(self, size: u64) -> io::Result<Self::Output>;
    /// Takes back a published image whose record could not be written.
    fn retract(output: Self::Output);
}

/// A plaintext image file at `output`.
pub struct FileTarget {
    partial: tempfile::NamedTempFile,
    output: PathBuf,
}

impl FileTarget {
    /// Starts the image beside `output` under a temporary name (removed if never published).
    pub fn create(output: &Path) -> Result<Self, RootfsError> {
        let dir = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_err("cannot create directory", dir))?;
        let partial = tempfile::Builder::new()
            .prefix(".rootfs-partial-")
            .tempfile_in(dir)
            .map_err(io_err("cannot create temporary image in", dir))?;
        Ok(Self {
            partial,
            output: output.to_path_buf(),
        })
    }
}

impl ImageTarget for FileTarget {
    type Sink = std::fs::File;
    type Output = PathBuf;

    fn sink(&mut self) -> &mut std::fs::File {
        self.partial.as_file_mut()
    }

    fn path(&self) -> &Path {
        &self.output
    }

    /// Not synced: the image is rebuilt from the registry whenever it is lost, and a sync
    /// would make every build wait for the disk (`sync` the output if it must survive a
    /// crash).
    fn publish(self, size: u64) -> io::Result<PathBuf> {
        self.partial.as_file().set_len(size)?;
        self.partial.persist(&self.output).map_err(|e| e.error)?;
        Ok(self.output)
    }

    fn retract(output: PathBuf) {
        let _ = std::fs::remove_file(output);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The file system could not be written (its storage failed, or it would be too large).
    #[error("cannot build the ext4 image {output}: {source}")]
    Ext4 {
        output: String,
        source: ext4_image::Error,
    },
    /// The output's storage is full.
    #[error("no space for the ext4 image {output}: {source}")]
    NoSpace { output: String, source: io::Error },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.display().to_string();
    move |source| RootfsError::Io { what, path, source }
}

/// A stable UUID for an image built from `seed` (the manifest digest), so the same image
/// gives the same file system identity on every IPU.
pub fn uuid_from_seed(seed: &str) -> String {
    let hex = hex::encode(uuid_bytes(seed));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn uuid_bytes(seed: &str) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5 style (name-based)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stable_and_well_formed() {
        let a = uuid_from_seed("sha256:abc");
        assert_eq!(a, uuid_from_seed("sha256:abc"));
        assert_ne!(a, uuid_from_seed("sha256:abd"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5");
    }
}
