//! OCI image-layout directories (`oci:DIR[:TAG]`): `index.json` names tags through the
//! `org.opencontainers.image.ref.name` annotation; blobs live in `blobs/sha256/<hex>`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use policy::reference::{Digest, OciLayoutReference};
use serde::Deserialize;

use super::manifest::{Descriptor, OCI_MANIFEST};
use super::{
    FetchError, FetchErrorClass, ImageSource, ManifestRef, ReferrersLookup, MAX_MANIFEST_BYTES,
    MAX_REFERRER_MANIFEST,
};
use policy::sigstore::Discovery;

/// Index entries examined for referrers (a layout is a local directory, but still input).
const MAX_LAYOUT_ENTRIES: usize = 4096;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub struct OciLayoutSource {
    dir: PathBuf,
    image: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// What a referrer manifest says about itself (the rest is checked when it is fetched).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactHead {
    artifact_type: Option<String>,
    config: Option<MediaTypeOnly>,
    subject: Option<SubjectDigest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MediaTypeOnly {
    media_type: Option<String>,
}

#[derive(Deserialize)]
struct SubjectDigest {
    digest: String,
}

impl OciLayoutSource {
    pub fn open(reference: &OciLayoutReference) -> Result<Self, FetchError> {
        let dir = reference.dir().to_path_buf();
        let marker = dir.join("oci-layout");
        let text = std::fs::read_to_string(&marker).map_err(|e| {
            FetchError::new(
                FetchErrorClass::NotFound,
                format!(
                    "{} is not an OCI image layout: cannot read {}: {e}",
                    dir.display(),
                    marker.display()
                ),
            )
        })?;
        if !text.contains("\"imageLayoutVersion\"") {
            return Err(FetchError::new(
                FetchErrorClass::Malformed,
                format!(
                    "{}: oci-layout file has no imageLayoutVersion",
                    dir.display()
                ),
            ));
        }
        Ok(Self {
            dir,
            image: reference.image().map(str::to_string),
        })
    }

    fn index(&self) -> Result<Index, FetchError> {
        let path = self.dir.join("index.json");
        let bytes = read_bounded(&path, MAX_MANIFEST_BYTES as u64)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            FetchError::new(
                FetchErrorClass::Malformed,
                format!("{}: not an OCI index: {e}", path.display()),
            )
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, FetchError> {
    let file = File::open(path).map_err(|e| {
        FetchError::new(
            FetchErrorClass::Io,
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| {
        FetchError::new(
            FetchErrorClass::Io,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if bytes.len() as u64 > limit {
        return Err(FetchError::new(
            FetchErrorClass::TooLarge,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

impl ImageSource for OciLayoutSource {
    fn describe(&self) -> String {
        format!("oci:{}", self.dir.display())
    }

    fn root_ref(&self) -> ManifestRef {
        match &self.image {
            Some(i) => match Digest::parse(i) {
                Ok(d) => ManifestRef::Digest(d),
                Err(_) => ManifestRef::Tag(i.clone()),
            },
            None => ManifestRef::Default,
        }
    }

    fn fetch_manifest(&self, r: &ManifestRef) -> Result<Option<super::RawManifest>, FetchError> {
        let (digest, media_type) = match r {
            ManifestRef::Digest(d) => (d.clone(), None),
            ManifestRef::Tag(tag) => {
                let index = self.index()?;
                let Some(entry) = index
                    .manifests
                    .iter()
                    .find(|m| m.annotations.get(REF_NAME) == Some(tag))
                else {
                    return Ok(None);
                };
                let d = Digest::parse(&entry.digest).map_err(|e| {
                    FetchError::new(
                        FetchErrorClass::Malformed,
                        format!("{}/index.json: {e}", self.dir.display()),
                    )
                })?;
                (d, entry.media_type.clone())
            }
            ManifestRef::Default => {
                let index = self.index()?;
                if index.manifests.len() != 1 {
                    return Err(FetchError::new(
                        FetchErrorClass::NotFound,
                        format!(
                            "{}: the layout holds {} images; name one as oci:DIR:TAG",
                            self.describe(),
                            index.manifests.len()
                        ),
                    ));
                }
                let entry = &index.manifests[0];
                let d = Digest::parse(&entry.digest).map_err(|e| {
                    FetchError::new(
                        FetchErrorClass::Malformed,
                        format!("{}/index.json: {e}", self.dir.display()),
                    )
                })?;
                (d, entry.media_type.clone())
            }
        };
        let path = self.blob_path(&digest);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = read_bounded(&path, MAX_MANIFEST_BYTES as u64)?;
        // Tag lookups are checked here, as the index names the digest.
        if Digest::of(&bytes) != digest {
            return Err(FetchError::new(
                FetchErrorClass::DigestMismatch,
                format!(
                    "{}: manifest blob {digest} does not match its digest",
                    self.describe()
                ),
            ));
        }
        Ok(Some((bytes, media_type)))
    }

    /// The manifests of `index.json` (small image manifests only) whose `subject` is
    /// `digest`: how OCI 1.1 tools keep referrers in a layout.
    fn referrers(&self, digest: &Digest) -> Result<ReferrersLookup, FetchError> {
        let index = self.index()?;
        let mut descriptors = Vec::new();
        for entry in index.manifests.iter().take(MAX_LAYOUT_ENTRIES) {
            if entry
                .media_type
                .as_deref()
                .is_some_and(|m| m != OCI_MANIFEST)
            {
                continue;
            }
            let Ok(d) = Digest::parse(&entry.digest) else {
                continue;
            };
            let path = self.blob_path(&d);
            let Ok(bytes) = read_bounded(&path, MAX_REFERRER_MANIFEST) else {
                // Missing, or larger than any referrer: not one.
                continue;
            };
            let Ok(head) = serde_json::from_slice::<ArtifactHead>(&bytes) else {
                continue;
            };
            if head.subject.as_ref().map(|s| s.digest.as_str()) != Some(&digest.to_string()) {
                continue;
            }
            descriptors.push(Descriptor {
                media_type: OCI_MANIFEST.to_string(),
                digest: d,
                size: entry.size.unwrap_or(bytes.len() as u64),
                annotations: entry.annotations.clone(),
                platform: None,
                artifact_type: head
                    .artifact_type
                    .or_else(|| head.config.and_then(|c| c.media_type)),
            });
        }
        Ok(ReferrersLookup::Listed {
            via: Discovery::LayoutReferrer,
            descriptors,
        })
    }

    fn local_blob(&self, digest: &Digest) -> Option<std::path::PathBuf> {
        let path = self.blob_path(digest);
        std::fs::metadata(&path)
            .is_ok_and(|m| m.is_file())
            .then_some(path)
    }

    fn open_blob_raw(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, FetchError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(|e| {
            let class = if e.kind() == std::io::ErrorKind::NotFound {
                FetchErrorClass::NotFound
            } else {
                FetchErrorClass::Io
            };
            FetchError::new(class, format!("{}: blob {digest}: {e}", self.describe()))
        })?;
        Ok(Box::new(file))
    }
}
