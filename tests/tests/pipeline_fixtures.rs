//! Every fixture of `tests/fixtures/EXPECTED.md` through the whole trust pipeline, served by a
//! real `docker-registry` on 127.0.0.1 and read from the OCI layout copy, with the expected
//! outcome and error class under the set's policies.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::{
    expected, ext4_cat, ext4_extract, ext4_fsck_clean, ext4_ls, ext4_stat, fixtures, is_root,
    sha256_hex, Expected, Registry,
};
use ipu_image_svc::error::{Error as PipelineError, FailureClass};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::{PipelineConfig, TrustPipeline};
use ipu_image_svc::progress::Quiet;
use ipu_image_svc::report::{self, ImageCommand, Outcome, Report};
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::reference::ImageReference;
use policy::Policy;

/// One pipeline run in its own scratch directory (cache, output).
struct Run {
    report: Report,
    result: Result<(), PipelineError>,
    scratch: tempfile::TempDir,
}

impl Run {
    fn output(&self) -> PathBuf {
        self.scratch.path().join("rootfs.ext4")
    }
    fn cache(&self) -> PathBuf {
        self.scratch.path().join("cache")
    }
    /// Partial images a failed build left beside the output.
    fn partial_images(&self) -> usize {
        std::fs::read_dir(self.scratch.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".rootfs-partial")
            })
            .count()
    }
    /// Blobs the cache holds (fetched and verified).
    fn cached_blobs(&self) -> usize {
        std::fs::read_dir(self.cache().join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

fn policy(name: &str) -> Policy {
    Policy::from_file(&fixtures().join("policies").join(name)).expect("fixture policy parses")
}

fn key(name: &str) -> PrivateKey {
    let pem = std::fs::read(fixtures().join("keys").join(name).join("priv.pem")).unwrap();
    PrivateKey::from_pem(&pem).expect("fixture key parses")
}

fn run(reference: &str, policy_file: &str, keys: &[&str], goal: &str) -> Run {
    let scratch = tempfile::tempdir().unwrap();
    let cfg = PipelineConfig::new(policy(policy_file), scratch.path().join("cache"));
    let keys = KeySource::local(DecryptConfig::new(keys.iter().map(|k| key(k)).collect()));
    let command = match goal {
        "verify" => ImageCommand::Verify,
        "pull" => ImageCommand::Pull,
        "unpack" => ImageCommand::Unpack {
            output: scratch.path().join("rootfs.ext4"),
        },
        other => panic!("goal {other}"),
    };
    let reference = ImageReference::parse(reference).expect("reference parses");
    let (report, result) = report::run(
        &TrustPipeline::new(cfg),
        &keys,
        &reference,
        &command,
        &Quiet,
    );
    Run {
        report,
        result,
        scratch,
    }
}

fn layout_ref(tag: &str) -> String {
    format!("oci:{}:{tag}", fixtures().join("oci-layout").display())
}

/// `fixture-id sha256` column of EXPECTED.md: tag -> hex prefix.
fn fixture_id_prefixes() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(fixtures().join("EXPECTED.md")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| tag") && !l.starts_with("|---"))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            let prefix = cols.get(5)?.strip_prefix("sha256:")?;
            Some((cols[1].to_string(), prefix.to_string()))
        })
        .collect()
}

/// Checks one run against its row of expected.tsv; returns a description of every mismatch.
fn check(run: &Run, want: &Expected, via: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let r = &run.report;
    let tag = &want.tag;
    if r.manifest_digest.as_ref().map(|d| d.to_string()).as_deref() != Some(want.digest.as_str()) {
        problems.push(format!(
            "{via} {tag}: manifest digest {:?}, want {}",
            r.manifest_digest, want.digest
        ));
    }
    if want.accept {
        if let Err(e) = &run.result {
            problems.push(format!(
                "{via} {tag}: rejected ({}): {}",
                e.class, e.message
            ));
            return problems;
        }
        assert_eq!(r.outcome, Outcome::Accepted);
        let image = run.output();
        if !ext4_fsck_clean(&image) {
            problems.push(format!("{via} {tag}: e2fsck found problems"));
        }
        let id = ext4_cat(&image, "/etc/fixture-id").unwrap_or_default();
        let prefix = fixture_id_prefixes()
            .into_iter()
            .find(|(t, _)| t == tag)
            .map(|(_, p)| p)
            .expect("EXPECTED.md lists a fixture-id sha256 for every accepted tag");
        if !sha256_hex(&id).starts_with(&prefix) {
            problems.push(format!(
                "{via} {tag}: /etc/fixture-id {:?} does not hash to {prefix}",
                String::from_utf8_lossy(&id)
            ));
        }
        let hello = ext4_cat(&image, "/hello").unwrap_or_default();
        if !String::from_utf8_lossy(&hello).contains(&format!("hello from {tag}")) {
            problems.push(format!("{via} {tag}: /hello does not say hello from {tag}"));
        }
        // Every layer was decrypted (if it had to be) and matched the signed diff_id.
        for l in &r.layers {
            if l.diff_id.is_none() {
                problems.push(format!("{via} {tag}: layer {} has no diff_id", l.index));
            }
        }
    } else {
        match &run.result {
            Ok(()) => problems.push(format!("{via} {tag}: accepted, want {}", want.reason_class)),
            Err(e) => {
                if e.class.as_str() != want.reason_class {
                    problems.push(format!(
                        "{via} {tag}: class {} ({}), want {}",
                        e.class, e.message, want.reason_class
                    ));
                }
                assert!(e.class.is_rejection(), "{tag}: {} is a rejection", e.class);
                assert_eq!(r.outcome, Outcome::Rejected);
                assert_eq!(r.class, Some(e.class));
            }
        }
        if run.output().exists() {
            problems.push(format!("{via} {tag}: rejected but an output image exists"));
        }
        if run.partial_images() != 0 {
            problems.push(format!("{via} {tag}: a partial image left behind"));
        }
    }
    problems
}

fn check_all(via: &str, reference: impl Fn(&str) -> String) {
    let mut problems = Vec::new();
    for want in expected() {
        let run = run(
            &reference(&want.tag),
            "policy-A.json",
            &["rsa-2048"],
            "unpack",
        );
        problems.extend(check(&run, &want, via));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_fixture_from_the_registry_matches_expected() {
    let registry = Registry::start_fixtures();
    check_all("registry", |tag| registry.reference("fixtures/hello", tag));
}

#[test]
fn every_fixture_from_the_oci_layout_matches_expected() {
    check_all("oci-layout", layout_ref);
}

#[test]
fn signature_rejections_fetch_no_config_and_no_layer() {
    let registry = Registry::start_fixtures();
    for tag in ["plain", "signed-skopeo", "signed-wrongkey", "enc-rsa"] {
        let run = run(
            &registry.reference("fixtures/hello", tag),
            "policy-A.json",
            &["rsa-2048"],
            "unpack",
        );
        assert!(run.result.is_err(), "{tag} accepted");
        assert!(run.report.config_digest.is_none(), "{tag}: config loaded");
        assert!(run.report.layers.is_empty(), "{tag}: layers listed");
        assert_eq!(run.cached_blobs(), 0, "{tag}: blobs were fetched");
    }
}

#[test]
fn the_reject_default_refuses_before_contacting_the_source() {
    // policy-A rejects every transport it does not name; `dir:` is one of them. The path
    // does not exist: a fetch attempt would fail with not-found instead.
    let run = run(
        "dir:/nonexistent/image",
        "policy-A.json",
        &["rsa-2048"],
        "unpack",
    );
    let err = run.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::RejectedByPolicy, "{}", err.message);
    assert!(
        err.message.contains("nothing was fetched"),
        "{}",
        err.message
    );
    assert!(run.report.manifest_digest.is_none());
}

#[test]
fn verify_fetches_no_layer_and_pull_fetches_them_all() {
    let reference = layout_ref("enc-signed");
    let verified = run(&reference, "policy-A.json", &[], "verify");
    verified.result.as_ref().expect("enc-signed verifies");
    assert_eq!(verified.report.layers.len(), 2);
    assert!(verified.report.layers.iter().all(|l| l.encrypted));
    assert_eq!(verified.cached_blobs(), 0, "verify fetched blobs");

    let pulled = run(&reference, "policy-A.json", &[], "pull");
    pulled
        .result
        .as_ref()
        .expect("enc-signed pulls without a key");
    assert_eq!(pulled.cached_blobs(), 2);
    assert!(pulled.report.layers.iter().all(|l| l.cached_at.is_some()));
    assert!(!pulled.output().exists());
}

#[test]
fn skopeo_signature_with_key_b_is_accepted_under_policy_b() {
    let registry = Registry::start_fixtures();
    for reference in [
        registry.reference("fixtures/hello", "signed-skopeo"),
        layout_ref("signed-skopeo"),
    ] {
        let run = run(&reference, "policy-B.json", &[], "unpack");
        run.result.as_ref().expect("signed-skopeo under policy-B");
        let id = ext4_cat(&run.output(), "/etc/fixture-id").expect("/etc/fixture-id");
        assert_eq!(String::from_utf8_lossy(&id).trim(), "signed-skopeo");
        let policy = run.report.policy.as_ref().unwrap();
        assert!(policy.allowed && policy.signatures_found >= 1);
    }
}

#[test]
fn unsigned_encrypted_images_decrypt_with_either_recipient_key() {
    for (tag, keyname) in [
        ("enc-rsa", "rsa-2048"),
        ("enc-ec-rsa", "rsa-2048"),
        ("enc-ec-rsa", "ec-p256"),
    ] {
        let run = run(
            &layout_ref(tag),
            "policy-accept-anything.json",
            &[keyname],
            "unpack",
        );
        run.result
            .as_ref()
            .unwrap_or_else(|e| panic!("{tag} with {keyname}: {e}"));
        let hello = ext4_cat(&run.output(), "/hello").unwrap();
        assert!(String::from_utf8_lossy(&hello).contains(&format!("hello from {tag}")));
        assert!(run.report.layers.iter().all(|l| l.encrypted));
    }
}

#[test]
fn encrypted_layers_without_a_matching_key_are_refused_before_any_fetch() {
    // No key at all: refused before pulling.
    let none = run(
        &layout_ref("enc-rsa"),
        "policy-accept-anything.json",
        &[],
        "unpack",
    );
    let err = none.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::NoDecryptionKey, "{}", err.message);
    assert_eq!(none.cached_blobs(), 0);
    assert!(!none.output().exists());

    // A key that is not a recipient: refused when unwrapping, nothing published.
    let wrong = run(
        &layout_ref("enc-rsa"),
        "policy-accept-anything.json",
        &["ec-p256"],
        "unpack",
    );
    let err = wrong.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::NoDecryptionKey, "{}", err.message);
    assert!(!wrong.output().exists());
    assert_eq!(wrong.partial_images(), 0);
}

#[test]
fn zstd_layers_with_a_stale_private_digest_are_authenticated_by_the_diff_id() {
    let run = run(
        &layout_ref("zstd"),
        "policy-A.json",
        &["rsa-2048"],
        "unpack",
    );
    run.result.as_ref().expect("zstd accepted");
    for l in &run.report.layers {
        assert_eq!(
            l.compression,
            Some(ipu_image_svc::unpack::Compression::Zstd),
            "layer {}",
            l.index
        );
        assert!(l.encrypted);
        // skopeo 1.18 recompressed after encrypting and left the gzip layer's digest in the
        // private options (ocicrypt's go_ocicrypt_fixtures shows it); the unpack path does
        // not hash the plaintext against it, the signed diff_id vouches for the content.
        assert!(l.diff_id.is_some());
    }
}

/// The unpack path does not hash decrypted layers against the digest in their private
/// options (skopeo leaves a stale one, see above): the signed config's diff_id is what
/// authenticates a decrypted layer. A copy of the `zstd` image whose config names another
/// diff_id for its last layer (ciphertext, HMAC and keys intact) is refused as a digest
/// mismatch and leaves nothing; the copy with its config unchanged, the control, unpacks.
#[test]
fn a_decrypted_layer_the_configs_diff_id_does_not_vouch_for_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let status = Command::new("cp")
        .arg("-a")
        .arg(fixtures().join("oci-layout"))
        .arg(&layout)
        .status()
        .unwrap();
    assert!(status.success());
    let blob_path = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let put = |bytes: Vec<u8>| {
        let digest = format!("sha256:{}", sha256_hex(&bytes));
        std::fs::write(blob_path(&digest), &bytes).unwrap();
        (digest, bytes.len())
    };
    let read_json = |digest: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(blob_path(digest)).unwrap()).unwrap()
    };
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "zstd")
        .expect("the zstd fixture")
        .clone();
    let mut manifest = read_json(entry["digest"].as_str().unwrap());
    let last = manifest["layers"].as_array().unwrap().len() - 1;
    assert!(manifest["layers"][last]["mediaType"]
        .as_str()
        .unwrap()
        .ends_with("+encrypted"));
    let mut config = read_json(manifest["config"]["digest"].as_str().unwrap());
    config["rootfs"]["diff_ids"][last] = format!("sha256:{}", "e".repeat(64)).into();
    let (config_digest, config_size) = put(serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    let (manifest_digest, manifest_size) = put(serde_json::to_vec(&manifest).unwrap());
    let mut wrong = entry.clone();
    wrong["digest"] = manifest_digest.into();
    wrong["size"] = manifest_size.into();
    wrong["annotations"]["org.opencontainers.image.ref.name"] = "wrong-diff-id".into();
    index["manifests"].as_array_mut().unwrap().push(wrong);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    let reference = |tag: &str| format!("oci:{}:{tag}", layout.display());
    let control = run(
        &reference("zstd"),
        "policy-accept-anything.json",
        &["rsa-2048"],
        "unpack",
    );
    control.result.as_ref().expect("the unchanged copy unpacks");
    assert!(control.output().exists());

    let refused = run(
        &reference("wrong-diff-id"),
        "policy-accept-anything.json",
        &["rsa-2048"],
        "unpack",
    );
    let err = refused.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::DigestMismatch, "{}", err.message);
    assert!(
        err.message.contains("the signed config says"),
        "{}",
        err.message
    );
    assert!(!refused.output().exists());
    assert_eq!(refused.partial_images(), 0);
}

fn inode_of(stat: &str) -> String {
    stat.split_whitespace()
        .skip_while(|w| *w != "Inode:")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn multilayer_whiteouts_links_and_modes_survive_into_ext4() {
    let run = run(
        &layout_ref("multilayer"),
        "policy-A.json",
        &["rsa-2048"],
        "unpack",
    );
    run.result.as_ref().expect("multilayer accepted");
    let image = run.output();
    assert_eq!(run.report.layers.len(), 3);
    assert_eq!(
        run.report
            .layers
            .iter()
            .map(|l| l.encrypted)
            .collect::<Vec<_>>(),
        [false, false, true]
    );

    let keep = ext4_stat(&image, "/data/keep.txt").expect("/data/keep.txt");
    let hard = ext4_stat(&image, "/data/hard").expect("/data/hard");
    assert_eq!(inode_of(&keep), inode_of(&hard), "hardlink is one inode");
    assert!(keep.contains("Links: 2"), "{keep}");

    let sym = ext4_stat(&image, "/data/sym").expect("/data/sym");
    assert!(sym.contains("Type: symlink"), "{sym}");
    assert!(sym.contains("Fast link dest: \"keep.txt\""), "{sym}");

    let suid = ext4_stat(&image, "/data/suid").expect("/data/suid");
    assert!(suid.contains("Mode:  04755"), "{suid}");

    assert!(ext4_stat(&image, "/data/remove-me.txt").is_none());
    assert!(!ext4_ls(&image, "/data")
        .iter()
        .any(|n| n.starts_with(".wh.")));
    assert_eq!(ext4_ls(&image, "/opaque-dir"), ["new.txt"]);
}

#[test]
fn evil_traversal_stops_at_the_first_unsafe_entry_and_leaves_nothing() {
    let run = run(
        &layout_ref("evil-traversal"),
        "policy-A.json",
        &["rsa-2048"],
        "unpack",
    );
    let err = run.result.as_ref().unwrap_err();
    assert_eq!(err.class, FailureClass::UnsafeLayer);
    assert!(err.message.contains("../../escape.txt"), "{}", err.message);
    // Nothing escaped next to the output or the scratch directory.
    for dir in [run.scratch.path(), Path::new("/tmp")] {
        assert!(!dir.join("escape.txt").exists(), "{}", dir.display());
    }
    assert!(!Path::new("/abs-escape.txt").exists());
    assert_eq!(run.partial_images(), 0);
    assert!(!run.output().exists());
    // The layer was never counted as applied.
    assert!(run.report.layers[0].entries.is_none());
}

/// As root, the built rootfs runs: `/hello` prints its greeting under chroot with busybox.
#[test]
fn accepted_rootfs_runs_hello_under_chroot() {
    if !is_root() {
        eprintln!("skipped: chroot needs root");
        return;
    }
    let run = run(
        &layout_ref("enc-signed"),
        "policy-A.json",
        &["rsa-2048"],
        "unpack",
    );
    run.result.as_ref().expect("enc-signed accepted");
    let root = run.scratch.path().join("extracted");
    std::fs::create_dir(&root).unwrap();
    ext4_extract(&run.output(), &root);
    let out = Command::new("chroot")
        .arg(&root)
        .arg("/hello")
        .output()
        .expect("chroot");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from enc-signed\n"
    );
}

/// A build from a registry reads each layer blob from the network once, as it decrypts it,
/// and keeps a copy in the blob cache only once all of it matched its digest; a later build
/// reads that copy, and a copy corrupted at rest is fetched again rather than trusted.
#[test]
fn registry_builds_keep_what_they_read_in_the_cache_and_refetch_a_corrupt_copy() {
    let registry = Registry::start_fixtures();
    let reference = ImageReference::parse(&registry.reference("fixtures/hello", "enc-signed"))
        .expect("reference parses");
    let scratch = tempfile::tempdir().unwrap();
    let cache = scratch.path().join("cache");
    let build = |output: &str| {
        let cfg = PipelineConfig::new(policy("policy-A.json"), cache.clone());
        let keys = KeySource::local(DecryptConfig::new(vec![key("rsa-2048")]));
        let command = ImageCommand::Unpack {
            output: scratch.path().join(output),
        };
        report::run(
            &TrustPipeline::new(cfg),
            &keys,
            &reference,
            &command,
            &Quiet,
        )
    };
    let blobs = |r: &Report| -> Vec<PathBuf> {
        r.layers
            .iter()
            .map(|l| l.cached_at.clone().expect("each layer kept in the cache"))
            .collect()
    };
    let (first, result) = build("first.ext4");
    result.unwrap();
    let kept = blobs(&first);
    assert_eq!(kept.len(), 2);
    for (path, layer) in kept.iter().zip(&first.layers) {
        assert!(path.starts_with(&cache), "{}", path.display());
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            format!("sha256:{}", sha256_hex(&bytes)),
            layer.digest.to_string()
        );
    }
    // No partial file left beside them.
    let dir = kept[0].parent().unwrap();
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 2);

    // Corrupted at rest: the next build fetches it again and builds the same image.
    let mut bytes = std::fs::read(&kept[0]).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&kept[0], &bytes).unwrap();
    let (_, result) = build("second.ext4");
    result.unwrap();
    let bytes = std::fs::read(&kept[0]).unwrap();
    assert_eq!(
        format!("sha256:{}", sha256_hex(&bytes)),
        first.layers[0].digest.to_string()
    );
    assert_eq!(
        std::fs::read(scratch.path().join("first.ext4")).unwrap(),
        std::fs::read(scratch.path().join("second.ext4")).unwrap(),
        "the same image"
    );
}
