//! A malicious registry or layout: storage tampered behind a real `docker-registry`, and
//! hand-edited OCI layouts. The pipeline trusts only digests it computes itself.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::{expected, fixtures, Registry};
use ipu_image_svc::error::{Error as PipelineError, FailureClass};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::{PipelineConfig, TrustPipeline};
use ipu_image_svc::progress::Quiet;
use ipu_image_svc::report::{self, ImageCommand, Report};
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::reference::ImageReference;
use policy::Policy;

fn digest_of(tag: &str) -> String {
    expected()
        .into_iter()
        .find(|e| e.tag == tag)
        .unwrap()
        .digest
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

fn registry_blob(storage: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

struct Outcome {
    report: Report,
    result: Result<(), PipelineError>,
    cache: PathBuf,
    _scratch: tempfile::TempDir,
}

fn unpack(reference: &str) -> Outcome {
    let scratch = tempfile::tempdir().unwrap();
    let policy = Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap();
    let cache = scratch.path().join("cache");
    let cfg = PipelineConfig::new(policy, cache.clone());
    let pem = fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap();
    let keys = KeySource::local(DecryptConfig::new(
        vec![PrivateKey::from_pem(&pem).unwrap()],
    ));
    let (report, result) = report::run(
        &TrustPipeline::new(cfg),
        &keys,
        &ImageReference::parse(reference).unwrap(),
        &ImageCommand::Unpack {
            output: scratch.path().join("out.ext4"),
        },
        &Quiet,
    );
    Outcome {
        report,
        result,
        cache,
        _scratch: scratch,
    }
}

fn cached_blobs(cache: &Path) -> Vec<String> {
    fs::read_dir(cache.join("blobs/sha256"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// The registry serves changed manifest bytes under the original tag and digest headers:
/// the pipeline hashes what it got, finds no signature for that, and by digest refuses it.
#[test]
fn manifest_bytes_changed_in_registry_storage_are_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    copy_dir(&fixtures().join("registry"), &storage);
    let original = digest_of("signed-cosign");
    let blob = registry_blob(&storage, &original);
    let mut bytes = fs::read(&blob).unwrap();
    bytes.extend_from_slice(b"\n"); // still valid JSON, another digest
    fs::write(&blob, &bytes).unwrap();
    let registry = Registry::start(Some(&storage));

    let by_tag = unpack(&registry.reference("fixtures/hello", "signed-cosign"));
    let err = by_tag.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::NoSignature, "{}", err.message);
    let seen = by_tag.report.manifest_digest.as_ref().unwrap().to_string();
    assert_ne!(seen, original, "the registry's digest header was believed");
    assert_eq!(
        seen,
        format!("sha256:{}", integration_tests::sha256_hex(&bytes))
    );
    assert!(cached_blobs(&by_tag.cache).is_empty());

    let by_digest = unpack(&format!(
        "docker://{}/fixtures/hello@{original}",
        registry.host()
    ));
    let err = by_digest.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::DigestMismatch, "{}", err.message);
}

/// A layer blob cut short in storage: refused while streaming, never cached, nothing built.
#[test]
fn a_truncated_layer_blob_is_refused_and_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    copy_dir(&fixtures().join("registry"), &storage);
    let layout = fixtures().join("oci-layout");
    let (layers, _) = layer_digests(&layout, &digest_of("enc-signed"));
    let blob = registry_blob(&storage, &layers[1]);
    let len = fs::metadata(&blob).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let registry = Registry::start(Some(&storage));
    let run = unpack(&registry.reference("fixtures/hello", "enc-signed"));
    let err = run.result.as_ref().unwrap_err();
    assert!(
        matches!(
            err.class,
            FailureClass::DigestMismatch | FailureClass::Network
        ),
        "{:?}: {}",
        err.class,
        err.message
    );
    let hex = layers[1].strip_prefix("sha256:").unwrap();
    assert!(!cached_blobs(&run.cache).iter().any(|b| b == hex));
    assert!(run.report.rootfs.is_none());
}

/// The layer digests and config digest of a manifest in the fixture layout.
fn layer_digests(layout: &Path, manifest: &str) -> (Vec<String>, String) {
    let hex = manifest.strip_prefix("sha256:").unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap();
    let layers = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    (layers, m["config"]["digest"].as_str().unwrap().to_string())
}

/// Adds a tag to a copy of the fixture layout pointing at `manifest` (any bytes).
fn tag_in_layout(layout: &Path, tag: &str, manifest: &[u8]) -> String {
    let digest = format!("sha256:{}", integration_tests::sha256_hex(manifest));
    fs::write(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
        manifest,
    )
    .unwrap();
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    digest
}

#[test]
fn an_oversized_manifest_is_refused_without_parsing_it() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    copy_dir(&fixtures().join("oci-layout"), &layout);
    let mut huge = br#"{"schemaVersion":2,"layers":[],"pad":""#.to_vec();
    huge.resize(5 << 20, b' ');
    tag_in_layout(&layout, "huge", &huge);
    let run = unpack(&format!("oci:{}:huge", layout.display()));
    let err = run.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::TooLarge, "{}", err.message);
}

/// An image whose config lies about its layers (one diff_id for two layers) is malformed,
/// and nothing is fetched.
#[test]
fn a_config_that_disagrees_with_its_manifest_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    copy_dir(&fixtures().join("oci-layout"), &layout);
    let policy_path = dir.path().join("policy.json");
    fs::write(
        &policy_path,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let (layers, config_digest) = layer_digests(&layout, &digest_of("plain"));
    let config_hex = config_digest.strip_prefix("sha256:").unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(config_hex)).unwrap())
            .unwrap();
    config["rootfs"]["diff_ids"].as_array_mut().unwrap().pop();
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let new_config = format!("sha256:{}", integration_tests::sha256_hex(&config_bytes));
    fs::write(
        layout
            .join("blobs/sha256")
            .join(new_config.strip_prefix("sha256:").unwrap()),
        &config_bytes,
    )
    .unwrap();
    let manifest_hex = digest_of("plain");
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(
            layout
                .join("blobs/sha256")
                .join(manifest_hex.strip_prefix("sha256:").unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    manifest["config"]["digest"] = new_config.into();
    manifest["config"]["size"] = config_bytes.len().into();
    tag_in_layout(&layout, "liar", &serde_json::to_vec(&manifest).unwrap());
    assert_eq!(layers.len(), 2);

    let scratch = tempfile::tempdir().unwrap();
    let cfg = PipelineConfig::new(
        Policy::from_file(&policy_path).unwrap(),
        scratch.path().join("cache"),
    );
    let (_, result) = report::run(
        &TrustPipeline::new(cfg),
        &KeySource::none(),
        &ImageReference::parse(&format!("oci:{}:liar", layout.display())).unwrap(),
        &ImageCommand::Pull,
        &Quiet,
    );
    let err = result.unwrap_err();
    assert_eq!(err.class, FailureClass::MalformedImage, "{}", err.message);
    assert!(
        err.message.contains("1 diff_ids for 2 layers"),
        "{}",
        err.message
    );
    assert!(cached_blobs(&scratch.path().join("cache")).is_empty());
}

/// A blob longer than its descriptor (an "endless" blob): reading stops one byte past the
/// declared size and the blob is refused, not cached.
#[test]
fn a_blob_longer_than_its_descriptor_is_refused_at_the_declared_size() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    copy_dir(&fixtures().join("oci-layout"), &layout);
    let (layers, _) = layer_digests(&layout, &digest_of("signed-cosign"));
    let hex = layers[1].strip_prefix("sha256:").unwrap();
    let path = layout.join("blobs/sha256").join(hex);
    let declared = fs::metadata(&path).unwrap().len();
    let f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.set_len(declared + (1 << 30)).unwrap();
    let run = unpack(&format!("oci:{}:signed-cosign", layout.display()));
    let err = run.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::DigestMismatch, "{}", err.message);
    assert!(
        err.message
            .contains(&format!("longer than its declared {declared} bytes")),
        "{}",
        err.message
    );
    assert!(!cached_blobs(&run.cache).iter().any(|b| b == hex));
}
