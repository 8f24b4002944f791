//! cosign 3 signatures: images signed by key with the real cosign 3.1.1
//! (scripts/setup.sh fetches it from Debian sid into /opt/ipu-image-tools/cosign-3.1.1) in a
//! real `docker-registry` (distribution 2.8: no referrers API, so cosign writes the referrers
//! tag schema), and what signature discovery finds there: the Sigstore bundle with its media
//! type and the signed manifest digest in its DSSE in-toto statement; both a `.sig` and a
//! bundle when an image has both; a malformed bundle artifact reported by name. Verified
//! (`sigstore-verify` through `policy::trust::verify_bundle`): accepted under the signing key
//! with the digest-only opt-in; refused without the opt-in (the statement names no
//! repository), under another key, with the bundle of another image, with a changed DSSE
//! payload; an image with both a `.sig` and a bundle has each verified.
//!
//! These tests skip (saying why) only when setup.sh recorded that it could not fetch cosign.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::{cosign3, fixtures, push_blob, push_manifest, Registry};
use ipu_image_svc::fetch::{self, SourceOptions};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::pipeline::{PipelineConfig, TrustPipeline};
use ipu_image_svc::progress::Quiet;
use ipu_image_svc::report::{self, ImageCommand, Report};
use policy::reference::{Digest, ImageReference};
use policy::sigstore::{
    Discovery, InTotoStatement, SignatureFormat, SignatureKind, UntrustedBundle,
    UntrustedBundleContent, COSIGN_SIGN_PREDICATE, IN_TOTO_PAYLOAD_TYPE, SIGSTORE_BUNDLE_V03,
};
use policy::Policy;

const PASSWORD: &str = "cosign3-test";

/// A registry holding the fixture image `plain` as `t/app:v1`, and a cosign key pair.
struct Signed {
    registry: Registry,
    dir: tempfile::TempDir,
    cosign: PathBuf,
    digest: String,
}

impl Signed {
    fn setup() -> Option<Signed> {
        let cosign = cosign3()?;
        let registry = Registry::start(None);
        let dir = tempfile::tempdir().unwrap();
        copy_fixture(&registry, "plain", "v1");
        let digest = integration_tests::expected()
            .into_iter()
            .find(|e| e.tag == "plain")
            .unwrap()
            .digest;
        let signed = Signed {
            registry,
            dir,
            cosign,
            digest,
        };
        signed.cosign(&["generate-key-pair"]);
        Some(signed)
    }

    /// Runs cosign in the scratch directory (its HOME too), which must succeed.
    fn cosign(&self, args: &[&str]) -> String {
        let out = Command::new(&self.cosign)
            .args(args)
            .current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("COSIGN_PASSWORD", PASSWORD)
            .env("SIGSTORE_NO_CACHE", "1")
            .output()
            .expect("cosign runs");
        assert!(
            out.status.success(),
            "cosign {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn image(&self) -> String {
        format!("{}/t/app@{}", self.registry.host(), self.digest)
    }

    /// `cosign sign --key cosign.key --tlog-upload=false IMAGE@DIGEST` (cosign 3.1.1 also
    /// needs `--use-signing-config=false` for that), plus `extra`.
    fn sign(&self, extra: &[&str]) {
        self.sign_image(&self.image(), extra);
    }

    /// [`Self::sign`] for another image of the registry.
    fn sign_image(&self, image: &str, extra: &[&str]) {
        let mut args = vec![
            "sign",
            "--key",
            "cosign.key",
            "--use-signing-config=false",
            "--tlog-upload=false",
            "-y",
        ];
        args.extend_from_slice(extra);
        args.push(image);
        self.cosign(&args);
    }

    /// Signs the fixture's `enc-signed` image (copied to `t/app:other`) and returns its
    /// bundle's bytes.
    fn sign_other(&self) -> Vec<u8> {
        copy_fixture(&self.registry, "enc-signed", "other");
        let digest = integration_tests::expected()
            .into_iter()
            .find(|e| e.tag == "enc-signed")
            .unwrap()
            .digest;
        let image = format!("{}/t/app@{digest}", self.registry.host());
        self.sign_image(&image, &[]);
        let reference = ImageReference::parse(&format!("docker://{image}")).unwrap();
        let source = fetch::open_source(&reference, &SourceOptions::default()).unwrap();
        let sigs = fetch::signatures(source.as_ref(), &Digest::parse(&digest).unwrap()).unwrap();
        match &sigs[..] {
            [SignatureFormat::SigstoreBundle(b)] => b.bytes.clone(),
            other => panic!("{other:#?}"),
        }
    }

    fn public_key(&self) -> PathBuf {
        self.dir.path().join("cosign.pub")
    }

    fn digest(&self) -> Digest {
        Digest::parse(&self.digest).unwrap()
    }

    fn discover(&self) -> Vec<SignatureFormat> {
        let reference = ImageReference::parse(&format!("docker://{}", self.image())).unwrap();
        let source = fetch::open_source(&reference, &SourceOptions::default()).unwrap();
        fetch::signatures(source.as_ref(), &self.digest()).unwrap()
    }

    /// `ipu-image-svc image verify` as a library call, under `policy`.
    fn verify(&self, policy: &str) -> (Report, Result<(), ipu_image_svc::error::Error>) {
        let (report, result, _) = self.verify_audited(policy);
        (report, result)
    }

    /// [`Self::verify`] with an audit log: also its `signature.verify` events.
    fn verify_audited(
        &self,
        policy: &str,
    ) -> (
        Report,
        Result<(), ipu_image_svc::error::Error>,
        Vec<audit::Event>,
    ) {
        let policy = Policy::parse(policy.as_bytes(), "test", None).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let log = integration_tests::audit_log(&scratch.path().join("audit"));
        let mut cfg = PipelineConfig::new(policy, scratch.path().join("c"));
        cfg.audit = Some(log.clone());
        let reference = ImageReference::parse(&format!("docker://{}", self.image())).unwrap();
        let (report, result) = report::run(
            &TrustPipeline::new(cfg),
            &KeySource::none(),
            &reference,
            &ImageCommand::Verify,
            &Quiet,
        );
        let events = log
            .store()
            .query(&audit::Query {
                kind: Some(audit::EventKind::SignatureVerify),
                limit: 10,
                ..Default::default()
            })
            .unwrap()
            .events;
        (report, result, events)
    }
}

/// Copies the fixture layout's `tag` to `t/app:<dest>` in `registry`, digests preserved.
fn copy_fixture(registry: &Registry, tag: &str, dest: &str) {
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!(
            "oci:{}:{tag}",
            fixtures().join("oci-layout").display()
        ))
        .arg(format!("docker://{}/t/app:{dest}", registry.host()))
        .output()
        .expect("skopeo not installed: run scripts/setup.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key_policy(public: &Path, extra: &str) -> String {
    format!(
        r#"{{"default":[{{"type":"reject"}}],"transports":{{"docker":{{"":[{{"type":"sigstoreSigned","keyPath":"{}"{extra}}}]}}}}}}"#,
        public.display()
    )
}

/// The statement inside a bundle's DSSE envelope (unverified: for the test's checks).
fn statement_of(bundle: &[u8]) -> InTotoStatement {
    let b = UntrustedBundle::parse(bundle, SIGSTORE_BUNDLE_V03).unwrap();
    let UntrustedBundleContent::Dsse {
        payload_type,
        payload,
    } = b.content
    else {
        panic!("not a DSSE bundle: {b:?}")
    };
    assert_eq!(payload_type, IN_TOTO_PAYLOAD_TYPE);
    InTotoStatement::parse(&payload).unwrap()
}

#[test]
fn a_cosign3_bundle_is_found_through_the_referrers_tag_schema() {
    let Some(s) = Signed::setup() else { return };
    s.sign(&[]);
    let sigs = s.discover();
    assert_eq!(sigs.len(), 1, "{sigs:#?}");
    let SignatureFormat::SigstoreBundle(b) = &sigs[0] else {
        panic!("{sigs:#?}")
    };
    assert_eq!(b.media_type, SIGSTORE_BUNDLE_V03);
    assert_eq!(b.source.via, Discovery::ReferrersTag);
    assert_eq!(b.source.origin, format!("{}/t/app", s.registry.host()));
    assert!(b.source.artifact.is_some() && b.source.blob.is_some());
    let statement = statement_of(&b.bytes);
    assert!(statement.names_digest(&s.digest()), "{statement:?}");
    assert_eq!(statement.predicate_type, COSIGN_SIGN_PREDICATE);
    assert!(
        statement.subjects.iter().all(|s| s.name.is_none()),
        "cosign 3 signs no repository name: {statement:?}"
    );

    // A second signature appends a second referrer to the same index.
    s.sign(&[]);
    let sigs = s.discover();
    assert_eq!(sigs.len(), 2, "{sigs:#?}");
    assert!(sigs
        .iter()
        .all(|s| s.kind() == SignatureKind::SigstoreBundle));

    // Without the digest-only opt-in: the statement names no repository, so it satisfies no
    // signedIdentity rule; found and refused by name, never as "no signature".
    let (report, result) = s.verify(&key_policy(&s.public_key(), ""));
    let e = result.unwrap_err();
    assert_eq!(e.class.as_str(), "identity-mismatch", "{e:?}");
    assert!(
        e.message.contains("acceptDigestOnlyStatements"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("(referrers tag schema) of 127.0.0.1:"),
        "{}",
        e.message
    );
    let policy = report.policy.unwrap();
    assert_eq!(policy.signatures_found, 2);
    assert!(
        policy.signatures[0].starts_with(&format!(
            "sigstore bundle ({SIGSTORE_BUNDLE_V03}) in referrer sha256:"
        )),
        "{:?}",
        policy.signatures
    );

    // Positive control: the opt-in, the signing key: verified and recorded.
    let opt_in = r#","acceptDigestOnlyStatements":true"#;
    let (report, result, events) = s.verify_audited(&key_policy(&s.public_key(), opt_in));
    result.unwrap();
    let accepted = &report.policy.unwrap().accepted_signatures[0];
    assert_eq!(accepted.format, SignatureKind::SigstoreBundle);
    assert_eq!(accepted.source.via, Discovery::ReferrersTag);
    assert!(accepted.signer.starts_with("key sha256:"), "{accepted:?}");
    // The audit event names the format, where it was found, and the signer.
    let event = events
        .iter()
        .find(|e| e.outcome == audit::Outcome::Allowed)
        .expect("an allowed signature.verify event");
    assert_eq!(
        event
            .details
            .get("signature_media_type")
            .map(String::as_str),
        Some(SIGSTORE_BUNDLE_V03)
    );
    assert_eq!(
        event.details.get("signer"),
        Some(&accepted.signer),
        "{:?}",
        event.details
    );
    assert!(event.details.contains_key("signature_format"));
    assert!(event.details.contains_key("signature_source"));

    // Another key: refused.
    let (_, result) = s.verify(&key_policy(&fixtures().join("keys/A/cosign.pub"), opt_in));
    assert_eq!(result.unwrap_err().class.as_str(), "wrong-key");

    // The bundle with a changed DSSE payload (the subject digest rewritten), and another
    // image's bundle, each put before this image's policy directly: refused.
    let policy = Policy::parse(key_policy(&s.public_key(), opt_in).as_bytes(), "t", None).unwrap();
    let reference = ImageReference::parse(&format!("docker://{}", s.image())).unwrap();
    let SignatureFormat::SigstoreBundle(good) = &sigs[0] else {
        unreachable!()
    };
    let decide = |bytes: Vec<u8>| {
        let mut b = good.clone();
        b.bytes = bytes;
        policy.evaluate(
            &reference,
            &s.digest(),
            &[SignatureFormat::SigstoreBundle(b)],
        )
    };
    assert!(decide(good.bytes.clone()).allowed, "control");
    let mut json: serde_json::Value = serde_json::from_slice(&good.bytes).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload =
        base64::Engine::decode(&b64, json["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap();
    let other_digest = Digest::of(b"another manifest");
    let changed = String::from_utf8(payload)
        .unwrap()
        .replace(s.digest().hex(), other_digest.hex());
    json["dsseEnvelope"]["payload"] = base64::Engine::encode(&b64, changed).into();
    let d = decide(serde_json::to_vec(&json).unwrap());
    assert!(!d.allowed);
    assert_eq!(
        d.class.map(|c| c.as_str()),
        Some("wrong-key"),
        "{}",
        d.reason
    );
    // Another image's bundle: cosign signs the fixture's encrypted image in the same
    // repository, and its bundle is offered for this one.
    let other = Signed::sign_other(&s);
    let d = decide(other);
    assert!(!d.allowed);
    assert!(d.reason.contains("subject"), "{}", d.reason);
}

#[test]
fn an_image_with_a_sig_and_a_bundle_yields_both() {
    let Some(s) = Signed::setup() else { return };
    // cosign 2's format, written by cosign 3 on request: simple signing at the .sig tag.
    s.sign(&["--new-bundle-format=false"]);
    s.sign(&[]);
    let tags = integration_tests::http(s.registry.port, "GET", "/v2/t/app/tags/list", &[], b"");
    let tags = String::from_utf8_lossy(&tags.2).into_owned();
    let hex = s.digest().hex().to_string();
    assert!(
        tags.contains(&format!("\"sha256-{hex}.sig\""))
            && tags.contains(&format!("\"sha256-{hex}\"")),
        "{tags}"
    );
    let sigs = s.discover();
    assert_eq!(sigs.len(), 2, "{sigs:#?}");
    let SignatureFormat::SimpleSigning(simple) = &sigs[0] else {
        panic!("{sigs:#?}")
    };
    assert_eq!(simple.source.via, Discovery::SignatureTag);
    let payload = policy::sigstore::SimpleSigningPayload::parse(&simple.payload).unwrap();
    assert_eq!(payload.docker_manifest_digest, s.digest());
    let SignatureFormat::SigstoreBundle(bundle) = &sigs[1] else {
        panic!("{sigs:#?}")
    };
    assert!(statement_of(&bundle.bytes).names_digest(&s.digest()));

    // Under a key policy the .sig verifies (the bundle is not needed), and the decision
    // records which signature it was.
    let (report, result) = s.verify(&key_policy(
        &s.public_key(),
        r#","signedIdentity":{"type":"matchRepository"}"#,
    ));
    result.unwrap();
    let policy = report.policy.unwrap();
    assert_eq!(policy.signatures_found, 2);
    assert_eq!(policy.accepted_signatures.len(), 1);
    let accepted = &policy.accepted_signatures[0];
    assert_eq!(accepted.format, SignatureKind::SimpleSigning);
    assert_eq!(accepted.source.via, Discovery::SignatureTag);
    assert!(accepted.signer.starts_with("key sha256:"), "{accepted:?}");
    // Each of the two verifies on its own under the key (the bundle with the digest-only
    // opt-in).
    let policy = Policy::parse(
        key_policy(
            &s.public_key(),
            r#","signedIdentity":{"type":"matchRepository"},"acceptDigestOnlyStatements":true"#,
        )
        .as_bytes(),
        "t",
        None,
    )
    .unwrap();
    let reference = ImageReference::parse(&format!("docker://{}", s.image())).unwrap();
    for sig in &sigs {
        let d = policy.evaluate(&reference, &s.digest(), std::slice::from_ref(sig));
        assert!(d.allowed, "{}: {}", sig.describe(), d.reason);
    }
    // Another key: neither verifies.
    let (_, result) = s.verify(&key_policy(
        &fixtures().join("keys/A/cosign.pub"),
        r#","signedIdentity":{"type":"matchRepository"},"acceptDigestOnlyStatements":true"#,
    ));
    assert_eq!(result.unwrap_err().class.as_str(), "wrong-key");
}

#[test]
fn a_malformed_bundle_artifact_is_reported_by_name() {
    let Some(s) = Signed::setup() else { return };
    let port = s.registry.port;
    let hex = s.digest().hex().to_string();
    // A referrer that says it is a v0.3 bundle, whose layer is not JSON, pushed the way
    // cosign pushes (an index under the referrers tag).
    let config = push_blob(port, "t/app", b"{}");
    let garbage = b"\x1f\x8b\x08 this is not a bundle";
    let layer = push_blob(port, "t/app", garbage);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": SIGSTORE_BUNDLE_V03,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": SIGSTORE_BUNDLE_V03, "digest": layer, "size": garbage.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": s.digest, "size": 503},
    })
    .to_string();
    let referrer = push_manifest(
        port,
        "t/app",
        &format!(
            "sha256:{}",
            integration_tests::sha256_hex(manifest.as_bytes())
        ),
        "application/vnd.oci.image.manifest.v1+json",
        manifest.as_bytes(),
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": referrer, "size": manifest.len(), "artifactType": SIGSTORE_BUNDLE_V03}],
    })
    .to_string();
    push_manifest(
        port,
        "t/app",
        &format!("sha256-{hex}"),
        "application/vnd.oci.image.index.v1+json",
        index.as_bytes(),
    );

    let sigs = s.discover();
    assert_eq!(sigs.len(), 1, "{sigs:#?}");
    let SignatureFormat::Unreadable {
        kind: SignatureKind::SigstoreBundle,
        source,
        reason,
    } = &sigs[0]
    else {
        panic!("{sigs:#?}")
    };
    assert_eq!(source.artifact.as_ref().unwrap().to_string(), referrer);
    assert!(reason.starts_with("the layer is not JSON"), "{reason}");

    let (_, result) = s.verify(&key_policy(&s.public_key(), ""));
    let e = result.unwrap_err();
    assert_eq!(e.class.as_str(), "malformed-signature", "{e:?}");
    let want = format!(
        "sigstore bundle in referrer {referrer} (referrers tag schema) of {}/t/app, layer {layer}: the layer is not JSON",
        s.registry.host()
    );
    assert!(e.message.contains(&want), "{}\n(want {want})", e.message);
    assert!(!e.message.contains("none exists"), "{}", e.message);

    // cosign then signs the image: it appends its referrer to the same index, and
    // discovery yields both, the malformed one still by name.
    s.sign(&[]);
    let sigs = s.discover();
    assert_eq!(sigs.len(), 2, "{sigs:#?}");
    assert_eq!(
        sigs.iter()
            .filter(|s| matches!(s, SignatureFormat::SigstoreBundle(_)))
            .count(),
        1,
        "{sigs:#?}"
    );
    assert_eq!(
        sigs.iter()
            .filter(|s| matches!(s, SignatureFormat::Unreadable { .. }))
            .count(),
        1,
        "{sigs:#?}"
    );
}
