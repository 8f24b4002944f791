//! No secret reaches the audit log: full pipeline runs over encrypted fixtures write their
//! decisions to a real log, then every byte the log stores is scanned for the layer keys,
//! their nonces and the private key, in every encoding a careless log line might use.

use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use integration_tests::{fixtures, layout_manifest};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::{PipelineConfig, TrustPipeline};
use ipu_image_svc::progress::Quiet;
use ipu_image_svc::report::{self, ImageCommand};
use ocicrypt::keys::PrivateKey;
use ocicrypt::{DecryptConfig, PrivateLayerOptions};
use policy::reference::ImageReference;
use policy::Policy;

/// The layer keys and nonces of every encrypted layer of `tag` in the fixture layout.
fn layer_secrets(tag: &str, key: &PrivateKey) -> Vec<Vec<u8>> {
    let (_, manifest) = layout_manifest(&fixtures().join("oci-layout"), tag);
    let mut secrets = Vec::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let Some(jwe) = layer["annotations"][ocicrypt::ANNOTATION_KEYS_JWE].as_str() else {
            continue;
        };
        let json = ocicrypt::jwe::unwrap(jwe, std::slice::from_ref(key)).unwrap();
        let opts = PrivateLayerOptions::from_json(&json).unwrap();
        secrets.push(opts.symkey().to_vec());
        secrets.push(opts.nonce().to_vec());
    }
    assert!(!secrets.is_empty(), "{tag} has encrypted layers");
    secrets
}

/// Every encoding of `secret` worth looking for.
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        hex::encode_upper(secret).into_bytes(),
        STANDARD.encode(secret).into_bytes(),
        URL_SAFE_NO_PAD.encode(secret).into_bytes(),
    ]
}

fn all_files(dir: &Path, out: &mut Vec<u8>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            all_files(&e.path(), out);
        } else {
            out.extend(std::fs::read(e.path()).unwrap());
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    integration_tests::contains(hay, needle)
}

#[test]
fn a_full_pipeline_run_leaves_no_key_bytes_in_the_audit_log() {
    let pem = std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap();
    let key = PrivateKey::from_pem(&pem).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let audit_dir = scratch.path().join("audit");
    let log = integration_tests::audit_log(&audit_dir);
    let mut secrets = Vec::new();
    let tags = ["enc-signed", "zstd", "multilayer", "tampered-layer"];
    for tag in tags {
        secrets.extend(layer_secrets(tag, &key));
        let mut cfg = PipelineConfig::new(
            Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap(),
            scratch.path().join("cache"),
        );
        let keys = KeySource::local(DecryptConfig::new(
            vec![PrivateKey::from_pem(&pem).unwrap()],
        ));
        cfg.audit = Some(log.clone());
        cfg.tenant = Some("acme".into());
        let reference = ImageReference::parse(&format!(
            "oci:{}:{tag}",
            fixtures().join("oci-layout").display()
        ))
        .unwrap();
        let _ = report::run(
            &TrustPipeline::new(cfg),
            &keys,
            &reference,
            &ImageCommand::Unpack {
                output: scratch.path().join(format!("{tag}.ext4")),
            },
            &Quiet,
        );
    }
    let events = log.store().size().unwrap();
    drop(log);
    assert!(events >= 20, "only {events} events recorded");

    let mut stored = Vec::new();
    all_files(&audit_dir, &mut stored);
    // The scan sees the log's real content (not compressed or encrypted): the image
    // digests it recorded are there in clear.
    assert!(contains(
        &stored,
        b"sha256:53ed5331de7a33db61b90f9beed29d069666317e6c065dceaa86851d8a00248a"
    ));
    assert!(contains(&stored, b"layer.decrypt"));

    for secret in &secrets {
        for enc in encodings(secret) {
            assert!(
                !contains(&stored, &enc),
                "layer key material found in the audit log"
            );
        }
    }
    // Nor any line of the private key.
    let pem_text = String::from_utf8(pem).unwrap();
    for line in pem_text.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !contains(&stored, line.as_bytes()),
            "private key found in the audit log"
        );
    }
}

/// Nothing is accepted unrecorded: with the audit log unavailable, an image that would be
/// accepted fails with an I/O error and no rootfs is built.
#[test]
fn a_run_that_cannot_write_its_audit_events_fails_closed() {
    let scratch = tempfile::tempdir().unwrap();
    let log = integration_tests::audit_log(&scratch.path().join("audit"));
    log.close();
    let mut cfg = PipelineConfig::new(
        Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap(),
        scratch.path().join("cache"),
    );
    cfg.audit = Some(log);
    let output = scratch.path().join("rootfs.ext4");
    let reference = ImageReference::parse(&format!(
        "oci:{}:signed-cosign",
        fixtures().join("oci-layout").display()
    ))
    .unwrap();
    let (report, result) = report::run(
        &TrustPipeline::new(cfg),
        &KeySource::none(),
        &reference,
        &ImageCommand::Unpack {
            output: output.clone(),
        },
        &Quiet,
    );
    let err = result.unwrap_err();
    assert_eq!(err.class.as_str(), "io", "{}", err.message);
    assert!(err.message.contains("audit"), "{}", err.message);
    assert!(!output.exists());
    assert!(
        report.config_digest.is_none(),
        "went on after the decision was not recorded"
    );
}
