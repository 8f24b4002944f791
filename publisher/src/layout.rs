//! Writing an OCI image layout: `oci-layout`, `index.json` with tags as
//! `org.opencontainers.image.ref.name`, and content-addressed `blobs/sha256/`.
//!
//! The write-side types are small serde structs of their own: the reader in ipu-image-svc
//! is deliberately strict about untrusted input, while the publisher only writes what it made.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    manifests: Vec<Descriptor>,
}

/// Why a layout could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{} is not an OCI layout (no oci-layout or index.json)", .0.display())]
    NotALayout(PathBuf),
    #[error("creating OCI layout {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading or writing a file of the layout (`what` names it).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a sha256 digest")]
    NotADigest(String),
    #[error("blob {digest} in {} is corrupt", dir.display())]
    Corrupt { digest: String, dir: PathBuf },
    #[error("{}/index.json is not an OCI index: {source}", dir.display())]
    NotAnIndex {
        dir: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no tag {tag:?} in {}", dir.display())]
    NoTag { tag: String, dir: PathBuf },
    #[error("tag {tag:?} is a {media_type}, not an OCI image manifest")]
    NotAnImageManifest { tag: String, media_type: String },
    #[error("manifest of tag {tag:?}: {source}")]
    BadManifest {
        tag: String,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T, E = LayoutError> = std::result::Result<T, E>;

/// An I/O error on `what` (a path or a description).
fn io_error(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> LayoutError {
    move |source| LayoutError::Io {
        what: what.to_string(),
        source,
    }
}

/// An OCI layout directory opened for writing.
pub struct Layout {
    dir: PathBuf,
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Layout {
    /// Opens `dir`, creating an empty layout if it does not exist.
    pub fn open_or_create(dir: &Path) -> Result<Self> {
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            fs::create_dir_all(dir.join("blobs/sha256")).map_err(|source| LayoutError::Create {
                path: dir.to_path_buf(),
                source,
            })?;
            fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(io_error(marker.display()))?;
            let index = Index {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: Vec::new(),
            };
            let path = dir.join("index.json");
            fs::write(
                &path,
                serde_json::to_vec(&index).expect("an index serializes"),
            )
            .map_err(io_error(path.display()))?;
        }
        Self::open(dir)
    }

    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join("oci-layout").is_file() || !dir.join("index.json").is_file() {
            return Err(LayoutError::NotALayout(dir.to_path_buf()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| LayoutError::NotADigest(digest.to_string()))?;
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    /// Stores `bytes` as a blob and returns its descriptor.
    pub fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes).map_err(io_error("writing a blob"))?;
        w.finish(media_type)
    }

    /// A writer whose content becomes a blob on [`BlobWriter::finish`].
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>> {
        let tmp = tempfile::NamedTempFile::new_in(self.dir.join("blobs/sha256"))
            .map_err(io_error("creating a temporary blob"))?;
        Ok(BlobWriter {
            layout: self,
            file: BufWriter::with_capacity(1 << 20, tmp),
            hash: Sha256::new(),
            size: 0,
        })
    }

    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(io_error(format_args!("opening blob {}", path.display())))
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_blob(digest)?
            .read_to_end(&mut out)
            .map_err(io_error(format_args!("reading blob {digest}")))?;
        if sha256_digest(&out) != digest {
            return Err(LayoutError::Corrupt {
                digest: digest.to_string(),
                dir: self.dir.clone(),
            });
        }
        Ok(out)
    }

    fn index(&self) -> Result<Index> {
        let path = self.dir.join("index.json");
        let bytes = fs::read(&path).map_err(io_error(path.display()))?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::NotAnIndex {
            dir: self.dir.clone(),
            source,
        })
    }

    /// The manifest descriptor tagged `tag`, if any.
    pub fn tagged(&self, tag: &str) -> Result<Option<Descriptor>> {
        Ok(self
            .index()?
            .manifests
            .into_iter()
            .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(tag)))
    }

    /// The image manifest tagged `tag` and its descriptor.
    pub fn manifest(&self, tag: &str) -> Result<(Descriptor, Manifest)> {
        let desc = self.tagged(tag)?.ok_or_else(|| LayoutError::NoTag {
            tag: tag.to_string(),
            dir: self.dir.clone(),
        })?;
        if desc.media_type != OCI_MANIFEST {
            return Err(LayoutError::NotAnImageManifest {
                tag: tag.to_string(),
                media_type: desc.media_type,
            });
        }
        let manifest =
            serde_json::from_slice(&self.read_blob(&desc.digest)?).map_err(|source| {
                LayoutError::BadManifest {
                    tag: tag.to_string(),
                    source,
                }
            })?;
        Ok((desc, manifest))
    }

    /// Stores `manifest` and points `tag` at it (replacing an earlier tag of that name).
    pub fn put_manifest(&self, tag: &str, manifest: &Manifest) -> Result<Descriptor> {
        let bytes = serde_json::to_vec(manifest).expect("a manifest serializes");
        let mut desc = self.put_blob(OCI_MANIFEST, &bytes)?;
        desc.annotations.insert(REF_NAME.into(), tag.into());
        let mut index = self.index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        index.manifests.push(desc.clone());
        let path = self.dir.join("index.json");
        let tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_error(path.display()))?;
        serde_json::to_writer(&tmp, &index)
            .map_err(io::Error::from)
            .map_err(io_error(path.display()))?;
        tmp.persist(&path)
            .map_err(|e| io_error(path.display())(e.error))?;
        Ok(desc)
    }
}

/// Streams a blob to a temporary file, hashing it; renamed into place by digest.
pub struct BlobWriter<'a> {
    layout: &'a Layout,
    file: BufWriter<tempfile::NamedTempFile>,
    hash: Sha256,
    size: u64,
}

impl BlobWriter<'_> {
    pub fn finish(self, media_type: &str) -> Result<Descriptor> {
        let digest = format!("sha256:{}", hex::encode(self.hash.finalize()));
        let what = format!("writing blob {digest}");
        let tmp = self
            .file
            .into_inner()
            .map_err(|e| io_error(&what)(e.into_error()))?;
        tmp.as_file().sync_all().map_err(io_error(&what))?;
        tmp.persist(self.layout.blob_path(&digest)?)
            .map_err(|e| io_error(&what)(e.error))?;
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: self.size,
            annotations: BTreeMap::new(),
        })
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}
