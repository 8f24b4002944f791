//! OCI and Docker schema 2 manifests, indexes / manifest lists, and image configs.

use std::collections::BTreeMap;
use std::fmt;

use policy::reference::Digest;
use serde::{Deserialize, Serialize};

use super::{FetchError, FetchErrorClass};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// The media types asked for in `Accept`.
pub const ACCEPTED: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
    pub platform: Option<Platform>,
    pub artifact_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    platform: Option<RawPlatform>,
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct RawPlatform {
    architecture: String,
    os: String,
    variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    artifact_type: Option<String>,
    subject: Option<RawDescriptor>,
}

/// An image manifest: config and layers.
#[derive(Clone, Debug)]
pub struct ImageManifest {
    pub media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// OCI 1.1 `artifactType` (artifacts such as signatures).
    pub artifact_type: Option<String>,
    /// OCI 1.1 `subject`: the manifest this artifact refers to.
    pub subject: Option<Box<Descriptor>>,
}

impl ImageManifest {
    /// The artifact type as OCI 1.1 defines it: `artifactType`, else the config's media
    /// type.
    pub fn effective_artifact_type(&self) -> &str {
        self.artifact_type
            .as_deref()
            .unwrap_or(&self.config.media_type)
    }
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Clone, Debug)]
pub struct ImageIndex {
    pub manifests: Vec<Descriptor>,
}

// A short-lived parse result, matched at once: boxing the manifest would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ManifestKind {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// A platform, `os/architecture[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

/// A platform string that is not `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("platform {0:?} is not os/architecture[/variant]")]
pub struct PlatformError(pub String);

impl Platform {
    pub fn parse(s: &str) -> Result<Self, PlatformError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: Some(variant.to_string()),
                })
            }
            _ => Err(PlatformError(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn malformed(origin: &str, msg: String) -> FetchError {
    FetchError::new(FetchErrorClass::Malformed, format!("{origin}: {msg}"))
}

fn descriptor(
    raw: RawDescriptor,
    origin: &str,
    default_type: Option<&str>,
) -> Result<Descriptor, FetchError> {
    let digest = Digest::parse(&raw.digest).map_err(|e| {
        FetchError::new(
            FetchErrorClass::Unsupported,
            format!("{origin}: descriptor digest: {e}"),
        )
    })?;
    if raw.size < 0 {
        return Err(malformed(
            origin,
            format!("descriptor {digest} has negative size"),
        ));
    }
    let media_type = raw
        .media_type
        .or(default_type.map(str::to_string))
        .ok_or_else(|| malformed(origin, format!("descriptor {digest} has no mediaType")))?;
    Ok(Descriptor {
        media_type,
        digest,
        size: raw.size as u64,
        annotations: raw.annotations.unwrap_or_default(),
        platform: raw.platform.map(|p| Platform {
            os: p.os,
            architecture: p.architecture,
            variant: p.variant,
        }),
        artifact_type: raw.artifact_type,
    })
}

/// Parses a manifest or index. `reported` is the transport's media type (Content-Type or the
/// referring descriptor); the document's own `mediaType`, if any, must agree with it.
pub fn parse(
    bytes: &[u8],
    reported: Option<&str>,
    origin: &str,
) -> Result<ManifestKind, FetchError> {
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| malformed(origin, format!("manifest is not valid JSON: {e}")))?;
    let reported = reported
        .map(|r| r.split(';').next().unwrap_or(r).trim())
        .filter(|r| !r.is_empty() && *r != "application/json" && *r != "application/octet-stream");
    let media_type = match (&raw.media_type, reported) {
        (Some(own), Some(rep)) if own != rep => {
            return Err(malformed(
                origin,
                format!("manifest says mediaType {own} but was served as {rep}"),
            ));
        }
        (Some(own), _) => own.clone(),
        (None, Some(rep)) => rep.to_string(),
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    if DOCKER_SCHEMA1.contains(&media_type.as_str()) || raw.schema_version == Some(1) {
        return Err(FetchError::new(FetchErrorClass::Unsupported, format!("{origin}: Docker schema 1 manifests are not supported (no content digests for layers; re-push the image with schema 2 or OCI)")));
    }
    if raw.schema_version != Some(2) {
        return Err(malformed(
            origin,
            format!("schemaVersion {:?} (expected 2)", raw.schema_version),
        ));
    }
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let list = raw
                .manifests
                .ok_or_else(|| malformed(origin, "index without manifests".into()))?;
            let manifests = list
                .into_iter()
                .map(|d| descriptor(d, origin, None))
                .collect::<Result<_, _>>()?;
            Ok(ManifestKind::Index(ImageIndex { manifests }))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = descriptor(
                raw.config
                    .ok_or_else(|| malformed(origin, "manifest without config".into()))?,
                origin,
                None,
            )?;
            let layers = raw
                .layers
                .ok_or_else(|| malformed(origin, "manifest without layers".into()))?
                .into_iter()
                .map(|d| descriptor(d, origin, None))
                .collect::<Result<_, _>>()?;
            let subject = raw
                .subject
                .map(|d| descriptor(d, origin, None).map(Box::new))
                .transpose()?;
            Ok(ManifestKind::Image(ImageManifest {
                media_type,
                config,
                layers,
                artifact_type: raw.artifact_type,
                subject,
            }))
        }
        other => Err(FetchError::new(
            FetchErrorClass::Unsupported,
            format!("{origin}: unsupported manifest media type {other}"),
        )),
    }
}

/// The index entry for `want`: exact os/architecture, and variant if asked for (an entry
/// without variant matches a request without one).
pub fn select_platform<'a>(index: &'a ImageIndex, want: &Platform) -> Option<&'a Descriptor> {
    index.manifests.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == want.os
                && p.architecture == want.architecture
                && (want.variant.is_none() || p.variant == want.variant)
        })
    })
}

pub fn platforms(index: &ImageIndex) -> Vec<String> {
    index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
        .collect()
}

/// The parts of an image config the pipeline uses.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub diff_ids: Vec<Digest>,
    pub runtime: RuntimeConfig,
}

/// What the runtime needs to start the function (from `config`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuntimeConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    rootfs: RawRootfs,
    #[serde(default)]
    config: Option<RuntimeConfig>,
}

#[derive(Deserialize)]
struct RawRootfs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

pub fn parse_config(bytes: &[u8], digest: &Digest) -> Result<ImageConfig, FetchError> {
    let origin = format!("config {digest}");
    let raw: RawConfig = serde_json::from_slice(bytes)
        .map_err(|e| malformed(&origin, format!("not an image config: {e}")))?;
    if raw.rootfs.kind != "layers" {
        return Err(malformed(
            &origin,
            format!("rootfs.type {:?} (expected \"layers\")", raw.rootfs.kind),
        ));
    }
    let diff_ids = raw
        .rootfs
        .diff_ids
        .iter()
        .map(|d| Digest::parse(d).map_err(|e| malformed(&origin, format!("diff_id: {e}"))))
        .collect::<Result<_, _>>()?;
    Ok(ImageConfig {
        architecture: raw.architecture,
        os: raw.os,
        diff_ids,
        runtime: raw.config.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        )
    }

    #[test]
    fn platform_selection() {
        let ManifestKind::Index(index) = parse(index_json().as_bytes(), None, "t").unwrap() else {
            panic!()
        };
        assert_eq!(
            select_platform(&index, &Platform::default())
                .unwrap()
                .digest
                .to_string(),
            D2
        );
        let arm = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(
            select_platform(&index, &arm).unwrap().digest.to_string(),
            D1
        );
        let arm_v7 = Platform::parse("linux/arm64/v7").unwrap();
        assert!(select_platform(&index, &arm_v7).is_none());
        assert!(select_platform(&index, &Platform::parse("windows/amd64").unwrap()).is_none());
        assert_eq!(platforms(&index), vec!["linux/arm64/v8", "linux/amd64"]);
    }

    #[test]
    fn schema1_refused_clearly() {
        let err = parse(
            br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#,
            None,
            "t",
        )
        .err()
        .unwrap();
        assert_eq!(err.class, FetchErrorClass::Unsupported);
        assert!(err.message.contains("schema 1"));
        let err = parse(
            b"{}",
            Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
            "t",
        )
        .err()
        .unwrap();
        assert!(err.message.contains("schema 1"));
    }

    #[test]
    fn media_type_disagreement_is_malformed() {
        let err = parse(index_json().as_bytes(), Some(OCI_MANIFEST), "t")
            .err()
            .unwrap();
        assert_eq!(err.class, FetchErrorClass::Malformed);
        // Docker manifests carry their type in the body; Content-Type parameters are ignored.
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{D1}","size":3}},"layers":[]}}"#
        );
        assert!(matches!(
            parse(
                docker.as_bytes(),
                Some(&format!("{DOCKER_MANIFEST}; charset=utf-8")),
                "t"
            )
            .unwrap(),
            ManifestKind::Image(_)
        ));
    }

    #[test]
    fn bad_descriptors() {
        let bad_digest =
            r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"md5:00","size":1},"layers":[]}"#
                .to_string();
        assert_eq!(
            parse(bad_digest.as_bytes(), None, "t").err().unwrap().class,
            FetchErrorClass::Unsupported
        );
        let neg = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{D1}","size":-1}},"layers":[]}}"#
        );
        assert_eq!(
            parse(neg.as_bytes(), None, "t").err().unwrap().class,
            FetchErrorClass::Malformed
        );
    }
}
