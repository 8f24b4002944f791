//! containers-policy.json: parsing errors, scope precedence, identity rules, and signature
//! verification against the real cosign/skopeo signatures in the shared fixtures.

use std::path::{Path, PathBuf};

use base64::Engine;
use policy::reference::{Digest, ImageReference};
use policy::sigstore::{
    Discovery, SignatureFormat, SignatureKind, SignatureSource, SigstoreBundleArtifact,
    SimpleSigningSignature,
};
use policy::trust::{identity_matches, IdentityRule, Precheck};
use policy::{Policy, RejectClass};
use proptest::prelude::*;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn parse(json: &str) -> Result<Policy, policy::PolicyError> {
    Policy::parse(json.as_bytes(), "test.json", None)
}

fn r(s: &str) -> ImageReference {
    ImageReference::parse(s).unwrap()
}

// --- fixture signatures ----------------------------------------------------------------

fn layout_blob(digest: &str) -> Vec<u8> {
    std::fs::read(
        fixtures()
            .join("oci-layout/blobs/sha256")
            .join(&digest[7..]),
    )
    .unwrap()
}

fn tag_digest(tag: &str) -> Option<String> {
    let index: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("oci-layout/index.json")).unwrap())
            .unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .map(|m| m["digest"].as_str().unwrap().to_string())
}

fn signatures_for(manifest_digest: &str) -> Vec<SignatureFormat> {
    let sig_tag = format!("sha256-{}.sig", &manifest_digest[7..]);
    let Some(d) = tag_digest(&sig_tag) else {
        return vec![];
    };
    let m: Value = serde_json::from_slice(&layout_blob(&d)).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            SignatureFormat::SimpleSigning(SimpleSigningSignature {
                payload: layout_blob(l["digest"].as_str().unwrap()),
                signature: base64::engine::general_purpose::STANDARD
                    .decode(
                        l["annotations"]["dev.cosignproject.cosign/signature"]
                            .as_str()
                            .unwrap(),
                    )
                    .unwrap(),
                source: Default::default(),
            })
        })
        .collect()
}

fn decide(policy_file: &str, tag: &str) -> policy::Decision {
    let policy = Policy::from_file(&fixtures().join("policies").join(policy_file)).unwrap();
    let digest = tag_digest(tag).unwrap();
    let reference = r(&format!("docker://127.0.0.1:5000/fixtures/hello:{tag}"));
    policy.evaluate(
        &reference,
        &Digest::parse(&digest).unwrap(),
        &signatures_for(&digest),
    )
}

#[test]
fn cosign_signature_accepted_under_policy_a_only() {
    let d = decide("policy-A.json", "signed-cosign");
    assert!(d.allowed, "{d:?}");
    let d = decide("policy-B.json", "signed-cosign");
    assert_eq!(d.class, Some(RejectClass::WrongKey), "{d:?}");
    assert!(
        d.reason.contains("sha256:"),
        "reason names the keys tried: {}",
        d.reason
    );
}

#[test]
fn skopeo_signature_accepted_under_policy_b_only() {
    assert!(decide("policy-B.json", "signed-skopeo").allowed);
    assert_eq!(
        decide("policy-A.json", "signed-skopeo").class,
        Some(RejectClass::WrongKey)
    );
    assert_eq!(
        decide("policy-A.json", "signed-wrongkey").class,
        Some(RejectClass::WrongKey)
    );
}

#[test]
fn unsigned_image_is_no_signature() {
    let d = decide("policy-A.json", "plain");
    assert_eq!(d.class, Some(RejectClass::NoSignature), "{d:?}");
    assert!(decide("policy-accept-anything.json", "plain").allowed);
}

#[test]
fn flipped_payload_byte_fails_and_other_digest_is_digest_mismatch() {
    let policy = Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap();
    let digest = tag_digest("signed-cosign").unwrap();
    let reference = r("docker://127.0.0.1:5000/fixtures/hello:signed-cosign");
    let mut sigs = signatures_for(&digest);
    let SignatureFormat::SimpleSigning(s) = &mut sigs[0] else {
        panic!()
    };
    s.payload[20] ^= 1;
    let d = policy.evaluate(&reference, &Digest::parse(&digest).unwrap(), &sigs);
    assert_eq!(d.class, Some(RejectClass::WrongKey), "{d:?}");
    // A valid signature replayed onto another manifest.
    let other = tag_digest("enc-signed").unwrap();
    let d = policy.evaluate(
        &reference,
        &Digest::parse(&other).unwrap(),
        &signatures_for(&digest),
    );
    assert_eq!(d.class, Some(RejectClass::DigestMismatch), "{d:?}");
}

#[test]
fn a_sigstore_bundle_that_does_not_parse_is_malformed_by_name() {
    let policy = Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap();
    let d = policy.evaluate(
        &r("docker://127.0.0.1:5000/fixtures/hello:x"),
        &Digest::of(b"m"),
        &[SignatureFormat::SigstoreBundle(SigstoreBundleArtifact {
            media_type: policy::sigstore::SIGSTORE_BUNDLE_V03.into(),
            bytes: b"{}".to_vec(),
            source: SignatureSource {
                via: Discovery::ReferrersTag,
                origin: "127.0.0.1:5000/fixtures/hello".into(),
                artifact: Some(Digest::of(b"referrer")),
                blob: None,
            },
        })],
    );
    assert_eq!(d.class, Some(RejectClass::MalformedSignature));
    assert!(d.reason.contains("bundle: "), "{}", d.reason);
    assert!(
        d.reason.contains(&format!(
            "referrer {} (referrers tag schema) of 127.0.0.1:5000/fixtures/hello",
            Digest::of(b"referrer")
        )),
        "{}",
        d.reason
    );
}

#[test]
fn an_unreadable_signature_artifact_is_malformed_by_name_and_a_good_one_still_counts() {
    let policy = Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap();
    let digest = tag_digest("signed-cosign").unwrap();
    let reference = r("docker://127.0.0.1:5000/fixtures/hello:signed-cosign");
    let unreadable = SignatureFormat::Unreadable {
        kind: SignatureKind::SigstoreBundle,
        source: SignatureSource {
            via: Discovery::ReferrersTag,
            origin: "127.0.0.1:5000/fixtures/hello".into(),
            artifact: Some(Digest::of(b"r")),
            blob: Some(Digest::of(b"b")),
        },
        reason: "the layer is not JSON: expected value at line 1 column 1".into(),
    };
    let d = policy.evaluate(
        &reference,
        &Digest::parse(&digest).unwrap(),
        std::slice::from_ref(&unreadable),
    );
    assert_eq!(d.class, Some(RejectClass::MalformedSignature), "{d:?}");
    assert!(
        d.reason.contains(&format!(
            "sigstore bundle in referrer {} (referrers tag schema) of 127.0.0.1:5000/fixtures/hello"
            , Digest::of(b"r")
        )) && d.reason.contains("the layer is not JSON"),
        "{}",
        d.reason
    );
    assert!(!d.reason.contains("none exists"), "{}", d.reason);
    // With a valid simple-signing signature next to it, the image is accepted, and the
    // decision names the signature that did it.
    let mut sigs = vec![unreadable];
    sigs.extend(signatures_for(&digest));
    let d = policy.evaluate(&reference, &Digest::parse(&digest).unwrap(), &sigs);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.signatures.len(), 1);
    assert_eq!(d.signatures[0].index, 1);
    assert_eq!(d.signatures[0].format, SignatureKind::SimpleSigning);
}

#[test]
fn oci_transport_uses_its_own_scopes() {
    let policy = Policy::from_file(&fixtures().join("policies/policy-A.json")).unwrap();
    let layout = fixtures().join("oci-layout");
    let digest = tag_digest("signed-cosign").unwrap();
    let reference = r(&format!("oci:{}:signed-cosign", layout.display()));
    let d = policy.evaluate(
        &reference,
        &Digest::parse(&digest).unwrap(),
        &signatures_for(&digest),
    );
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.scope, "transports.oci.\"\"");
}

// --- parsing -----------------------------------------------------------------------------

#[test]
fn malformed_documents_name_their_position() {
    let cases = [
        (
            "{\n  \"default\": [\n    {\"type\": \"reject\"},\n  ]\n}",
            "line 4",
        ),
        (r#"{"default":[{"type":"rejekt"}]}"#, "default.[0].type"),
        (
            r#"{"default":[{"type":"reject","extra":1}]}"#,
            "default.[0].extra",
        ),
        (r#"{"default":[]}"#, "default"),
        (r#"{"transports":{}}"#, "missing field \"default\""),
        (
            r#"{"default":[{"type":"reject"}],"transports":{"docker-daemon":{}}}"#,
            "transports.docker-daemon",
        ),
        (
            r#"{"default":[{"type":"reject"}],"transports":{"oci":{"relative/dir":[{"type":"reject"}]}}}"#,
            "absolute path",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned"}]}"#,
            "exactly one of keyPath",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyData":"!!"}]}"#,
            "default.[0].keyData",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"k.pub"}]}"#,
            "must be absolute",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","keyPath":"/nonexistent/k.pub"}]}"#,
            "cannot read key",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","fulcio":{}}]}"#,
            "fulcio needs its CA",
        ),
        (
            r#"{"default":[{"type":"sigstoreSigned","pki":{}}]}"#,
            "not supported yet",
        ),
        (
            r#"{"default":[{"type":"signedBy","keyType":"GPGKeys"}]}"#,
            "signedBy",
        ),
        (
            r#"{"default":[{"type":"insecureAcceptAnything"}],"transports":{"docker":{"UPPER/x":[{"type":"reject"}]}}}"#,
            "invalid docker scope",
        ),
    ];
    for (json, expected) in cases {
        let err = parse(json).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{json}\n-> {err}\n(expected {expected:?})"
        );
        assert!(err.starts_with("test.json: "), "{err}");
    }
}

#[test]
fn identity_rule_errors_are_positioned() {
    let key = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(fixtures().join("keys/A/cosign.pub")).unwrap());
    let with_identity = |id: &str| {
        format!(
            r#"{{"default":[{{"type":"sigstoreSigned","keyData":"{key}","signedIdentity":{id}}}]}}"#
        )
    };
    let err = parse(&with_identity(r#"{"type":"matchSomething"}"#)).unwrap_err();
    assert_eq!(err.path, "default.[0].signedIdentity.type");
    let err = parse(&with_identity(
        r#"{"type":"exactRepository","dockerRepository":"a.io/b:tag"}"#,
    ))
    .unwrap_err();
    assert!(err.message.contains("without tag"), "{err}");
    let err = parse(&with_identity(
        r#"{"type":"matchExact","dockerReference":"x"}"#,
    ))
    .unwrap_err();
    assert!(err.message.contains("unknown field"), "{err}");
    assert!(parse(&with_identity(
        r#"{"type":"remapIdentity","prefix":"a.io/x","signedPrefix":"b.io/y"}"#
    ))
    .is_ok());
}

// --- scopes ------------------------------------------------------------------------------

const SCOPED: &str = r#"{
  "default": [{"type": "reject"}],
  "transports": {
    "docker": {
      "": [{"type": "reject"}],
      "*.example.com": [{"type": "insecureAcceptAnything"}],
      "reg.example.com": [{"type": "reject"}],
      "reg.example.com/team": [{"type": "insecureAcceptAnything"}],
      "reg.example.com/team/app": [{"type": "reject"}],
      "reg.example.com/team/app:stable": [{"type": "insecureAcceptAnything"}]
    }
  }
}"#;

#[test]
fn most_specific_scope_wins() {
    let p = parse(SCOPED).unwrap();
    let scope = |s: &str| p.requirements_for(&r(s)).scope;
    assert_eq!(
        scope("docker://reg.example.com/team/app:stable"),
        "transports.docker.\"reg.example.com/team/app:stable\""
    );
    assert_eq!(
        scope("docker://reg.example.com/team/app:dev"),
        "transports.docker.\"reg.example.com/team/app\""
    );
    assert_eq!(
        scope("docker://reg.example.com/team/other:1"),
        "transports.docker.\"reg.example.com/team\""
    );
    assert_eq!(
        scope("docker://reg.example.com/solo:1"),
        "transports.docker.\"reg.example.com\""
    );
    assert_eq!(
        scope("docker://mirror.example.com/x:1"),
        "transports.docker.\"*.example.com\""
    );
    assert_eq!(scope("docker://quay.io/x:1"), "transports.docker.\"\"");
    assert_eq!(scope("oci:/tmp/layout:x"), "default");
    let pre = |s: &str| p.requirements_for(&r(s)).precheck();
    assert_eq!(
        pre("docker://reg.example.com/team/app:stable"),
        Precheck::AcceptedWithoutSignature
    );
    assert_eq!(
        pre("docker://reg.example.com/team/app:dev"),
        Precheck::Rejected
    );
}

proptest! {
    /// A reference always gets the most specific scope configured for it, and adding a less
    /// specific scope never changes that.
    #[test]
    fn scope_matcher_picks_most_specific(
        host in "[a-z]{1,8}\\.(com|io)",
        ns in prop::collection::vec("[a-z][a-z0-9]{0,5}", 1..4),
        tag in "[a-z0-9]{1,8}",
        chosen in 0usize..4,
    ) {
        let repo = format!("{host}/{}", ns.join("/"));
        let reference = r(&format!("docker://{repo}:{tag}"));
        let scopes = reference.policy_scopes();
        let chosen = chosen.min(scopes.len() - 1);
        let mut transports = serde_json::Map::new();
        transports.insert(scopes[chosen].clone(), serde_json::json!([{"type":"insecureAcceptAnything"}]));
        let doc = |t: &serde_json::Map<String, Value>| serde_json::json!({
            "default": [{"type":"reject"}], "transports": {"docker": t}
        }).to_string();
        let p = parse(&doc(&transports)).unwrap();
        let expected = format!("transports.docker.{:?}", scopes[chosen]);
        prop_assert_eq!(&p.requirements_for(&reference).scope, &expected);
        // Add every less specific scope, with the opposite requirement.
        for s in &scopes[chosen + 1..] {
            transports.insert(s.clone(), serde_json::json!([{"type":"reject"}]));
        }
        transports.insert(String::new(), serde_json::json!([{"type":"reject"}]));
        let p = parse(&doc(&transports)).unwrap();
        prop_assert_eq!(&p.requirements_for(&reference).scope, &expected);
        prop_assert_eq!(p.requirements_for(&reference).precheck(), Precheck::AcceptedWithoutSignature);
    }
}

// --- identity rules ------------------------------------------------------------------------

#[test]
fn identity_rules() {
    let by_tag = r("docker://reg.io/ns/app:v1");
    let by_digest = r(&format!("docker://reg.io/ns/app@{}", Digest::of(b"x")));
    use IdentityRule::*;
    // cosign writes the repository without tag: rejected by tag, accepted by digest.
    assert!(identity_matches(&MatchRepoDigestOrExact, &by_tag, "reg.io/ns/app").is_err());
    assert!(identity_matches(&MatchRepoDigestOrExact, &by_digest, "reg.io/ns/app").is_ok());
    assert!(identity_matches(&MatchRepoDigestOrExact, &by_tag, "reg.io/ns/app:v1").is_ok());
    assert!(identity_matches(&MatchRepoDigestOrExact, &by_tag, "reg.io/ns/app:v2").is_err());
    assert!(identity_matches(&MatchExact, &by_tag, "reg.io/ns/app:v1").is_ok());
    assert!(identity_matches(&MatchExact, &by_tag, "reg.io/ns/app").is_err());
    assert!(identity_matches(&MatchRepository, &by_tag, "reg.io/ns/app:other").is_ok());
    assert!(identity_matches(&MatchRepository, &by_tag, "reg.io/ns/app2").is_err());
    assert!(identity_matches(
        &ExactRepository("reg.io/ns/app".into()),
        &by_tag,
        "reg.io/ns/app"
    )
    .is_ok());
    assert!(identity_matches(
        &ExactRepository("reg.io/ns/app".into()),
        &by_tag,
        "other.io/ns/app"
    )
    .is_err());
    let exact =
        ExactReference(policy::reference::DockerReference::parse("reg.io/ns/app:v9").unwrap());
    assert!(identity_matches(&exact, &by_tag, "reg.io/ns/app:v9").is_ok());
    assert!(identity_matches(&exact, &by_tag, "reg.io/ns/app:v1").is_err());
    // remapIdentity: a mirror's images carry the upstream identity.
    let remap = RemapIdentity {
        prefix: "mirror.io/up".into(),
        signed_prefix: "reg.io/ns".into(),
    };
    let mirrored = r("docker://mirror.io/up/app:v1");
    assert!(identity_matches(&remap, &mirrored, "reg.io/ns/app:v1").is_ok());
    assert!(identity_matches(&remap, &mirrored, "mirror.io/up/app:v1").is_err());
    // The prefix must end at a component boundary.
    let upper = r("docker://mirror.io/upper/app:v1");
    assert!(identity_matches(&remap, &upper, "reg.io/nser/app:v1").is_err());
    assert!(identity_matches(&remap, &upper, "mirror.io/upper/app:v1").is_ok());
    // oci references have no docker identity of their own.
    let oci = r("oci:/tmp/l:t");
    assert!(identity_matches(&MatchRepository, &oci, "reg.io/ns/app")
        .unwrap_err()
        .to_string()
        .contains("exactRepository"));
    assert!(identity_matches(
        &ExactRepository("reg.io/ns/app".into()),
        &oci,
        "reg.io/ns/app"
    )
    .is_ok());
}

/// Keyless (Fulcio) requirements through the real verifier, with a conformance bundle (a
/// GitHub Actions identity, public-good Fulcio, Rekor v1) whose DSSE statement names a.txt's
/// digest, offered as if it were an image's: the certificate chain, the SCT, the log entry and
/// the identity verify (the refusal comes only from the predicate type: an attestation is no
/// image signature); another identity, another issuer or a custom trusted root without the
/// public-good Fulcio refuse it earlier, as `wrong-key`.
#[test]
fn keyless_bundles_are_verified_against_the_trusted_root_and_the_identity() {
    const BEACON: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
    const GITHUB: &str = "https://token.actions.githubusercontent.com";
    let suite = fixtures().join("sigstore-conformance");
    let bundle = std::fs::read(
        suite.join("bundle-verify/happy-path-intoto-in-dsse-v3/bundle.sigstore.json"),
    )
    .unwrap();
    let a_txt = Digest::of(&std::fs::read(suite.join("a.txt")).unwrap());
    let decide = |identity: &str, issuer: &str, root: &Path| {
        let policy = parse(&format!(
            r#"{{"default":[{{"type":"sigstoreSigned","fulcio":{{"oidcIssuer":"{issuer}","subjectURI":"{identity}"}},"trustedRootPath":"{}","acceptDigestOnlyStatements":true}}]}}"#,
            root.display()
        ))
        .unwrap();
        policy.evaluate(
            &r("docker://reg.io/ns/app:v1"),
            &a_txt,
            &[SignatureFormat::SigstoreBundle(SigstoreBundleArtifact {
                media_type: "application/vnd.dev.sigstore.bundle.v0.3+json".into(),
                bytes: bundle.clone(),
                source: SignatureSource {
                    via: Discovery::ReferrersTag,
                    origin: "reg.io/ns/app".into(),
                    artifact: None,
                    blob: None,
                },
            })],
        )
    };
    let public_good = suite.join("trusted_root.public-good.json");
    // Positive control: verified up to the statement, refused only as an attestation.
    let d = decide(BEACON, GITHUB, &public_good);
    assert!(!d.allowed);
    assert!(
        d.reason
            .contains("an attestation of predicate type https://slsa.dev/provenance/v1"),
        "{}",
        d.reason
    );
    for (identity, issuer, root, why) in [
        (
            "https://github.com/someone/else/.github/workflows/x.yml@refs/heads/main",
            GITHUB,
            public_good.clone(),
            "another identity",
        ),
        (
            BEACON,
            "https://accounts.google.com",
            public_good.clone(),
            "another issuer",
        ),
        (
            BEACON,
            GITHUB,
            suite.join("bundle-verify/intoto-with-custom-trust-root/trusted_root.json"),
            "a root without the public-good Fulcio",
        ),
    ] {
        let d = decide(identity, issuer, &root);
        assert!(!d.allowed, "{why}");
        assert_eq!(d.class, Some(RejectClass::WrongKey), "{why}: {}", d.reason);
        assert!(!d.reason.contains("attestation"), "{why}: {}", d.reason);
    }
}
