//! Round trips across implementations, with Debian's skopeo (Go ocicrypt) as the peer:
//! ours encrypts and skopeo decrypts; skopeo encrypts and ours decrypts; for RSA and EC
//! recipients. Also: skopeo verifies our cosign signature under a containers policy.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::{ext4_cat, fixtures, Registry};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::{PipelineConfig, TrustPipeline};
use ipu_image_svc::progress::Quiet;
use ipu_image_svc::report::{self, ImageCommand};
use ocicrypt::keys::{PrivateKey, PublicKey};
use ocicrypt::{DecryptConfig, EncryptConfig};
use policy::reference::ImageReference;
use policy::Policy;
use publisher::build::{build, BuildOptions, LayerCompression};
use publisher::layout::Layout;

const ACCEPT_ANYTHING: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

fn key_path(name: &str, file: &str) -> PathBuf {
    fixtures().join("keys").join(name).join(file)
}

fn public(name: &str) -> PublicKey {
    PublicKey::from_pem(&std::fs::read(key_path(name, "pub.pem")).unwrap()).unwrap()
}

fn private(name: &str) -> PrivateKey {
    PrivateKey::from_pem(&std::fs::read(key_path(name, "priv.pem")).unwrap()).unwrap()
}

/// A small image made by our publisher: `/hello` and `/data/blob` (1 MiB of varied bytes).
fn make_plain_image(dir: &Path) -> (Layout, publisher::build::Built) {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::write(
        rootfs.join("hello"),
        b"#!/bin/sh\necho hello from interop\n",
    )
    .unwrap();
    let blob: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(rootfs.join("data/blob"), &blob).unwrap();
    let layout = Layout::open_or_create(&dir.join("layout")).unwrap();
    let built = build(
        &layout,
        &BuildOptions {
            rootfs: &rootfs,
            tag: "plain",
            cmd: vec!["/hello".into()],
            env: vec![],
            compression: LayerCompression::Gzip,
        },
    )
    .unwrap();
    (layout, built)
}

fn skopeo(args: &[&str]) -> std::process::Output {
    Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("skopeo not installed: run scripts/setup.sh")
}

fn layer_of(layout_dir: &Path, tag: &str) -> publisher::layout::Descriptor {
    let layout = Layout::open(layout_dir).unwrap();
    let (_, manifest) = layout.manifest(tag).unwrap();
    assert_eq!(manifest.layers.len(), 1);
    manifest.layers[0].clone()
}

#[test]
fn ours_encrypts_skopeo_decrypts_rsa_and_ec() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, built) = make_plain_image(dir.path());
    for recipient in ["rsa-2048", "ec-p256"] {
        let tag = format!("enc-{recipient}");
        publisher::encrypt::encrypt(
            &layout,
            "plain",
            &tag,
            &EncryptConfig::new(vec![public(recipient)]),
            &[],
        )
        .unwrap();
        let encrypted = layer_of(layout.dir(), &tag);
        assert!(encrypted.media_type.ends_with("+encrypted"));
        assert_ne!(encrypted.digest, built.layer.digest);

        let out = dir.path().join(format!("out-{recipient}"));
        let src = format!("oci:{}:{tag}", layout.dir().display());
        let dst = format!("oci:{}:plain", out.display());
        let key = key_path(recipient, "priv.pem");
        let res = skopeo(&[
            "copy",
            "--decryption-key",
            key.to_str().unwrap(),
            &src,
            &dst,
        ]);
        assert!(
            res.status.success(),
            "skopeo could not decrypt our {recipient} layer: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        // Go ocicrypt recovered exactly the compressed layer we encrypted.
        let decrypted = layer_of(&out, "plain");
        assert_eq!(decrypted.media_type, built.layer.media_type);
        assert_eq!(decrypted.digest, built.layer.digest);

        // And it refuses with a key that is not a recipient.
        let other = if recipient == "rsa-2048" {
            "ec-p256"
        } else {
            "rsa-2048"
        };
        let wrong = key_path(other, "priv.pem");
        let res = skopeo(&[
            "copy",
            "--decryption-key",
            wrong.to_str().unwrap(),
            &src,
            &format!("oci:{}:wrong", dir.path().join("wrong").display()),
        ]);
        assert!(
            !res.status.success(),
            "skopeo decrypted with a non-recipient key"
        );
    }
}

#[test]
fn skopeo_encrypts_ours_decrypts_rsa_and_ec() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, built) = make_plain_image(dir.path());
    let src = format!("oci:{}:plain", layout.dir().display());
    let policy_file = dir.path().join("policy.json");
    std::fs::write(&policy_file, ACCEPT_ANYTHING).unwrap();
    for recipient in ["rsa-2048", "ec-p256"] {
        let out = dir.path().join(format!("skopeo-{recipient}"));
        let dst = format!("oci:{}:enc", out.display());
        let public_key = format!("jwe:{}", key_path(recipient, "pub.pem").display());
        let res = skopeo(&["copy", "--encryption-key", &public_key, &src, &dst]);
        assert!(
            res.status.success(),
            "skopeo encrypt: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        let layer = layer_of(&out, "enc");
        assert!(
            layer.media_type.ends_with("+encrypted"),
            "{}",
            layer.media_type
        );
        assert!(layer
            .annotations
            .contains_key(ocicrypt::ANNOTATION_KEYS_JWE));

        // The ocicrypt library alone: the layer decrypts to our original compressed blob.
        let blob = std::fs::File::open(
            Layout::open(&out)
                .unwrap()
                .blob_path(&layer.digest)
                .unwrap(),
        )
        .unwrap();
        let annotations = layer.annotations.clone().into_iter().collect();
        let mut dec = ocicrypt::decrypt_layer(
            std::io::BufReader::new(blob),
            &annotations,
            &DecryptConfig::new(vec![private(recipient)]),
        )
        .unwrap();
        let mut plain = Vec::new();
        std::io::copy(&mut dec, &mut plain).unwrap();
        let authenticated = dec.finish().expect("HMAC and digest check out");
        assert_eq!(
            authenticated.plaintext_digest(),
            Some(built.layer.digest.as_str())
        );
        assert_eq!(publisher::layout::sha256_digest(&plain), built.layer.digest);

        // The whole pipeline: verify (accept anything), decrypt, unpack, ext4.
        let scratch = tempfile::tempdir().unwrap();
        let cfg = PipelineConfig::new(
            Policy::from_file(&policy_file).unwrap(),
            scratch.path().join("cache"),
        );
        let keys = KeySource::local(DecryptConfig::new(vec![private(recipient)]));
        let output = scratch.path().join("rootfs.ext4");
        let reference = ImageReference::parse(&format!("oci:{}:enc", out.display())).unwrap();
        report::run(
            &TrustPipeline::new(cfg),
            &keys,
            &reference,
            &ImageCommand::Unpack {
                output: output.clone(),
            },
            &Quiet,
        )
        .1
        .unwrap_or_else(|e| panic!("{recipient}: {e:?}"));
        assert_eq!(
            ext4_cat(&output, "/hello").unwrap(),
            b"#!/bin/sh\necho hello from interop\n"
        );
        assert_eq!(ext4_cat(&output, "/data/blob").unwrap().len(), 1 << 20);
    }
}

/// Debian 12's skopeo is built with sigstore disabled ("Debian-local change"), so it cannot
/// check signatures here. Instead: our payload is byte-identical to what cosign 2.5 wrote
/// for a fixture; skopeo copies our image and signature tag into a real registry with
/// digests preserved; and the pipeline verifies the signature from that registry.
#[test]
fn our_signatures_have_cosign_format_and_verify_through_a_registry() {
    // 1. Same payload bytes as cosign for the same claim.
    let cosign_tag = "signed-cosign";
    let want = integration_tests::expected()
        .into_iter()
        .find(|e| e.tag == cosign_tag)
        .unwrap();
    let fixture_layout = Layout::open(&fixtures().join("oci-layout")).unwrap();
    let sig_tag = publisher::sign::signature_tag(&want.digest).unwrap();
    let (_, sig_manifest) = fixture_layout.manifest(&sig_tag).unwrap();
    let cosign_payload = fixture_layout
        .read_blob(&sig_manifest.layers[0].digest)
        .unwrap();
    let ours = policy::sigstore::SimpleSigningPayload {
        docker_reference: "127.0.0.1:5000/fixtures/hello".into(),
        docker_manifest_digest: policy::reference::Digest::parse(&want.digest).unwrap(),
        optional: None,
    }
    .to_cosign_json();
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&cosign_payload)
    );

    // 2. Sign our image and push it with its signature tag through skopeo.
    let dir = tempfile::tempdir().unwrap();
    let (layout, _) = make_plain_image(dir.path());
    let keys = dir.path().join("keys");
    publisher::keygen::write_pair(publisher::keygen::KeyKind::EcP256, &keys).unwrap();
    let key = std::fs::read(keys.join("priv.pem")).unwrap();
    publisher::sign::sign(&layout, "plain", &key, "demo.example/interop/app").unwrap();
    let registry = Registry::start(None);
    let (manifest, _) = layout.manifest("plain").unwrap();
    let sig_tag = publisher::sign::signature_tag(&manifest.digest).unwrap();
    for tag in ["plain", sig_tag.as_str()] {
        let res = skopeo(&[
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.dir().display()),
            &format!("docker://{}/interop/app:{tag}", registry.host()),
        ]);
        assert!(
            res.status.success(),
            "push {tag}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }

    // 3. The pipeline verifies it from the registry; a policy trusting another key rejects.
    let policy_for = |public: &Path| {
        format!(
            r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"":[{{"type":"sigstoreSigned","keyPath":"{}","signedIdentity":{{"type":"exactRepository","dockerRepository":"demo.example/interop/app"}}}}]}}}}}}"#,
            public.display()
        )
    };
    let reference = ImageReference::parse(&registry.reference("interop/app", "plain")).unwrap();
    for (public, accept) in [
        (keys.join("pub.pem"), true),
        (fixtures().join("keys/A/cosign.pub"), false),
    ] {
        let policy = Policy::parse(policy_for(&public).as_bytes(), "test", None).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let (report, result) = report::run(
            &TrustPipeline::new(PipelineConfig::new(policy, scratch.path().join("c"))),
            &KeySource::none(),
            &reference,
            &ImageCommand::Verify,
            &Quiet,
        );
        match (accept, result) {
            (true, Ok(())) => {
                assert_eq!(report.manifest_digest.unwrap().to_string(), manifest.digest)
            }
            (false, Err(e)) => assert_eq!(e.class.as_str(), "wrong-key", "{}", e.message),
            (accept, result) => panic!("want accept={accept}, got {result:?}"),
        }
    }
}
