//! A one-layer image from a root file system directory.
//!
//! The layer tar is reproducible: entries in byte order of their paths, owner root, a fixed
//! mtime, modes (setuid included) as on disk; hardlinks within the tree become tar hardlinks.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::layout::{Descriptor, Layout, LayoutError, Manifest, OCI_CONFIG, OCI_MANIFEST};

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("rootfs {} is not a directory", .0.display())]
    NotADirectory(std::path::PathBuf),
    #[error("reading {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: only directories, regular files and symlinks go into a published image", .0.display())]
    Unsupported(std::path::PathBuf),
    #[error("writing the layer: {0}")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

type Result<T, E = BuildError> = std::result::Result<T, E>;

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> BuildError + '_ {
    move |source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// The mtime written into every entry (2023-11-14T22:13:20Z).
const FIXED_MTIME: u64 = 1_700_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LayerCompression {
    Gzip,
    Zstd,
    None,
}

impl LayerCompression {
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

pub struct BuildOptions<'a> {
    pub rootfs: &'a Path,
    pub tag: &'a str,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub compression: LayerCompression,
}

/// What [`build`] made.
pub struct Built {
    pub manifest: Descriptor,
    pub layer: Descriptor,
    pub diff_id: String,
    pub entries: u64,
}

/// Hashes the uncompressed tar (the diff_id) on its way to the compressor.
struct DiffIdWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for DiffIdWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub fn build(layout: &Layout, opts: &BuildOptions<'_>) -> Result<Built> {
    if !opts.rootfs.is_dir() {
        return Err(BuildError::NotADirectory(opts.rootfs.to_path_buf()));
    }
    let blob = layout.blob_writer()?;
    let (diff_id, entries, blob) = match opts.compression {
        LayerCompression::Gzip => {
            let gz = flate2::write::GzEncoder::new(blob, flate2::Compression::default());
            let (d, n, gz) = write_tar(opts.rootfs, gz)?;
            (d, n, gz.finish().map_err(BuildError::Write)?)
        }
        LayerCompression::Zstd => {
            let zs = zstd::stream::write::Encoder::new(blob, 3).map_err(BuildError::Write)?;
            let (d, n, zs) = write_tar(opts.rootfs, zs)?;
            (d, n, zs.finish().map_err(BuildError::Write)?)
        }
        LayerCompression::None => write_tar(opts.rootfs, blob)?,
    };
    let layer = blob.finish(opts.compression.media_type())?;

    let config = serde_json::json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Cmd": opts.cmd,
            "Env": opts.env,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "ocipub build"}],
    });
    let config = layout.put_blob(
        OCI_CONFIG,
        &serde_json::to_vec(&config).expect("a config serializes"),
    )?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.into(),
        config,
        layers: vec![layer.clone()],
        annotations: Default::default(),
    };
    let manifest = layout.put_manifest(opts.tag, &manifest)?;
    Ok(Built {
        manifest,
        layer,
        diff_id,
        entries,
    })
}

/// The OCI name of this machine's architecture.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes the tar of `root` into `out`; returns the diff_id, the entry count and `out`.
fn write_tar<W: Write>(root: &Path, out: W) -> Result<(String, u64, W)> {
    let mut paths = Vec::new();
    collect(root, Path::new(""), &mut paths)?;
    paths.sort();
    let mut builder = tar::Builder::new(DiffIdWriter {
        inner: out,
        hash: Sha256::new(),
    });
    let mut seen_inodes: HashMap<(u64, u64), std::path::PathBuf> = HashMap::new();
    for rel in &paths {
        let full = root.join(rel);
        let meta = fs::symlink_metadata(&full).map_err(read_error(&full))?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(FIXED_MTIME);
        let ft = meta.file_type();
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(BuildError::Write)?;
        } else if ft.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            let target = fs::read_link(&full).map_err(read_error(&full))?;
            builder
                .append_link(&mut header, rel, target)
                .map_err(BuildError::Write)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = seen_inodes.get(&(meta.dev(), meta.ino())) {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, rel, first)
                        .map_err(BuildError::Write)?;
                    continue;
                }
                seen_inodes.insert((meta.dev(), meta.ino()), rel.clone());
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = fs::File::open(&full).map_err(read_error(&full))?;
            builder
                .append_data(&mut header, rel, file)
                .map_err(BuildError::Write)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            // Device nodes are kept as such (a consumer's policy decides whether to make
            // them); sockets have no tar form.
            header.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            header.set_size(0);
            let rdev = meta.rdev();
            header
                .set_device_major(libc_major(rdev))
                .map_err(BuildError::Write)?;
            header
                .set_device_minor(libc_minor(rdev))
                .map_err(BuildError::Write)?;
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(BuildError::Write)?;
        } else {
            return Err(BuildError::Unsupported(full));
        }
    }
    let entries = paths.len() as u64;
    let writer = builder.into_inner().map_err(BuildError::Write)?;
    let diff_id = format!("sha256:{}", hex::encode(writer.hash.finalize()));
    Ok((diff_id, entries, writer.inner))
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).map_err(read_error(&dir))? {
        let entry = entry.map_err(read_error(&dir))?;
        let rel = rel.join(entry.file_name());
        let is_dir = entry.file_type().map_err(read_error(&dir))?.is_dir();
        out.push(rel.clone());
        if is_dir {
            collect(root, &rel, out)?;
        }
    }
    Ok(())
}

/// The major number of a Linux `dev_t` (glibc's encoding).
fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

/// The minor number of a Linux `dev_t` (glibc's encoding).
fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}
