//! The root file system image: an ext4 file built from the staging tree with `mkfs.ext4 -d`.
//!
//! e2fsprogs populates the file system from a directory without mounting anything, keeping
//! owners, modes (setuid included), hardlinks, symlinks, device nodes and xattrs. The image
//! is written next to the output under a temporary name and renamed into place only when
//! mkfs succeeded, so a failure never leaves a partial image at the output path.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;

/// What the unpacked tree holds.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TreeSummary {
    pub regular_files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Extra names for an inode already counted.
    pub hardlinks: u64,
    pub device_nodes: u64,
    pub fifos: u64,
    pub setuid_files: u64,
    /// Sum of regular file sizes, each inode once.
    pub content_bytes: u64,
    pub inodes: u64,
}

/// The built image.
#[derive(Clone, Debug, Serialize)]
pub struct RootfsImage {
    pub path: PathBuf,
    pub image_bytes: u64,
    pub inodes_reserved: u64,
    pub uuid: String,
    pub tree: TreeSummary,
}

#[derive(Clone, Debug)]
pub struct RootfsOptions {
    /// Free space left in the image for writes through per-function clones.
    pub free_bytes: u64,
    /// Free inodes beyond what the tree uses.
    pub free_inodes: u64,
    pub label: String,
    /// An ext4 journal. Off by default: a function's clone never outlives a crash (its key
    /// dies with the service), so a journal would only cost 4 MiB of writes per image and
    /// per function.
    pub journal: bool,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        Self {
            free_bytes: 64 * MIB,
            free_inodes: 4096,
            label: "ipu-rootfs".into(),
            journal: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mkfs.ext4 not found: install e2fsprogs (scripts/setup.sh does)")]
    MkfsMissing,
    #[error("mkfs.ext4 failed for {output}: {stderr}")]
    Mkfs { output: String, stderr: String },
    /// The output's file system is full (for the service: its bounded plaintext memory).
    #[error("no space for the ext4 image {output}: {stderr}")]
    NoSpace { output: String, stderr: String },
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

/// Walks a tree without following symlinks.
pub fn summarize(root: &Path) -> Result<TreeSummary, RootfsError> {
    let mut s = TreeSummary::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("cannot read directory", &dir))? {
            let entry = entry.map_err(io_err("cannot read directory", &dir))?;
            let path = entry.path();
            let md = fs::symlink_metadata(&path).map_err(io_err("cannot stat", &path))?;
            let ft = md.file_type();
            if ft.is_dir() {
                s.directories += 1;
                s.inodes += 1;
                stack.push(path);
                continue;
            }
            if !seen.insert((md.dev(), md.ino())) {
                s.hardlinks += 1;
                continue;
            }
            s.inodes += 1;
            if ft.is_file() {
                s.regular_files += 1;
                s.content_bytes += md.len();
                if md.mode() & 0o4000 != 0 {
                    s.setuid_files += 1;
                }
            } else if ft.is_symlink() {
                s.symlinks += 1;
            } else if ft.is_char_device() || ft.is_block_device() {
                s.device_nodes += 1;
            } else if ft.is_fifo() {
                s.fifos += 1;
            }
        }
    }
    Ok(s)
}

/// A stable UUID for an image built from `seed` (the manifest digest), so the same image
/// gives the same file system identity on every IPU.
pub fn uuid_from_seed(seed: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5 style (name-based)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Builds `output` from the tree at `root`.
pub fn build_ext4(
    root: &Path,
    output: &Path,
    uuid: &str,
    opts: &RootfsOptions,
) -> Result<RootfsImage, RootfsError> {
    let tree = summarize(root)?;
    // Data blocks rounded per file, directory blocks, inode tables (256 B each), journal and
    // metadata headroom, then the requested free space.
    let data = tree.content_bytes + (tree.regular_files + tree.directories + tree.symlinks) * BLOCK;
    let inodes = tree.inodes + 1 + opts.free_inodes;
    // Holes cost nothing on the IPU (the base stores only data blocks), so the headroom need
    // not be tight.
    let bytes = data + data / 8 + inodes * 256 + 16 * MIB + opts.free_bytes;
    let size = bytes.div_ceil(MIB) * MIB;

    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("cannot create directory", dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".rootfs-partial-")
        .tempfile_in(dir)
        .map_err(io_err("cannot create temporary image in", dir))?;
    tmp.as_file()
        .set_len(size)
        .map_err(io_err("cannot size", tmp.path()))?;

    let result = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0"])
        .arg("-N")
        .arg(inodes.to_string())
        .args([
            "-O",
            if opts.journal {
                "has_journal"
            } else {
                "^has_journal"
            },
        ])
        .arg("-L")
        .arg(&opts.label)
        .arg("-U")
        .arg(uuid)
        .arg("-E")
        .arg(format!("root_owner=0:0,hash_seed={uuid},nodiscard"))
        .arg("-d")
        .arg(root)
        .arg(tmp.path())
        .env("LC_ALL", "C")
        .output();
    let out = match result {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RootfsError::MkfsMissing),
        Err(e) => return Err(io_err("cannot run mkfs.ext4 for", output)(e)),
    };
    if !out.status.success() {
        let (output, stderr) = (
            output.display().to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        );
        // mkfs reports its errno in words (LC_ALL=C).
        return Err(if stderr.contains("No space left on device") {
            RootfsError::NoSpace { output, stderr }
        } else {
            RootfsError::Mkfs { output, stderr }
        });
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_err("cannot sync", output))?;
    tmp.persist(output)
        .map_err(|e| io_err("cannot move image into place at", output)(e.error))?;
    Ok(RootfsImage {
        path: output.to_path_buf(),
        image_bytes: size,
        inodes_reserved: inodes,
        uuid: uuid.to_string(),
        tree,
    })
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

    #[test]
    fn summary_counts_hardlinks_once() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a"), b"12345").unwrap();
        fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("a", d.path().join("sub/l")).unwrap();
        let s = summarize(d.path()).unwrap();
        assert_eq!(s.regular_files, 1);
        assert_eq!(s.hardlinks, 1);
        assert_eq!(s.symlinks, 1);
        assert_eq!(s.directories, 1);
        assert_eq!(s.content_bytes, 5);
    }
}
