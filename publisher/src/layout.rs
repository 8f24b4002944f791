//! Writing an OCI image layout: `oci-layout`, `index.json` with tags as
//! `org.opencontainers.image.ref.name`, and content-addressed `blobs/sha256/`.
//!
//! The write-side types are small serde structs of their own: the reader in ipu-image-svc
//! is deliberately strict about untrusted input, while the publisher only writes what it made.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
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
            fs::create_dir_all(dir.join("blobs/sha256"))
                .with_context(|| format!("creating OCI layout {}", dir.display()))?;
            fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            let index = Index {
                schema_version: 2,
                media_type: Some(OCI_INDEX.into()),
                manifests: Vec::new(),
            };
            fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
        }
        Self::open(dir)
    }

    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join("oci-layout").is_file() || !dir.join("index.json").is_file() {
            bail!(
                "{} is not an OCI layout (no oci-layout or index.json)",
                dir.display()
            );
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
            .with_context(|| format!("{digest} is not a sha256 digest"))?;
        Ok(self.dir.join("blobs/sha256").join(hex))
    }

    /// Stores `bytes` as a blob and returns its descriptor.
    pub fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let mut w = self.blob_writer()?;
        w.write_all(bytes)?;
        w.finish(media_type)
    }

    /// A writer whose content becomes a blob on [`BlobWriter::finish`].
    pub fn blob_writer(&self) -> Result<BlobWriter<'_>> {
        let tmp = tempfile::NamedTempFile::new_in(self.dir.join("blobs/sha256"))
            .context("creating a temporary blob")?;
        Ok(BlobWriter {
            layout: self,
            file: BufWriter::with_capacity(1 << 20, tmp),
            hash: Sha256::new(),
            size: 0,
        })
    }

    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.blob_path(digest)?;
        File::open(&path).with_context(|| format!("opening blob {}", path.display()))
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.open_blob(digest)?.read_to_end(&mut out)?;
        if sha256_digest(&out) != digest {
            bail!("blob {digest} in {} is corrupt", self.dir.display());
        }
        Ok(out)
    }

    fn index(&self) -> Result<Index> {
        let bytes = fs::read(self.dir.join("index.json"))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}/index.json is not an OCI index", self.dir.display()))
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
        let desc = self
            .tagged(tag)?
            .with_context(|| format!("no tag {tag:?} in {}", self.dir.display()))?;
        if desc.media_type != OCI_MANIFEST {
            bail!(
                "tag {tag:?} is a {}, not an OCI image manifest",
                desc.media_type
            );
        }
        let manifest = serde_json::from_slice(&self.read_blob(&desc.digest)?)
            .with_context(|| format!("manifest of tag {tag:?}"))?;
        Ok((desc, manifest))
    }

    /// Stores `manifest` and points `tag` at it (replacing an earlier tag of that name).
    pub fn put_manifest(&self, tag: &str, manifest: &Manifest) -> Result<Descriptor> {
        let bytes = serde_json::to_vec(manifest)?;
        let mut desc = self.put_blob(OCI_MANIFEST, &bytes)?;
        desc.annotations.insert(REF_NAME.into(), tag.into());
        let mut index = self.index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        index.manifests.push(desc.clone());
        let tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&tmp, &index)?;
        tmp.persist(self.dir.join("index.json"))
            .map_err(|e| e.error)?;
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
        let tmp = self.file.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.layout.blob_path(&digest)?)
            .map_err(|e| e.error)?;
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
