//! The `ipu-image-svc image` command as a user runs it: exit codes that separate
//! "rejected" (3) from "operational error" (1) and usage errors (2), `--json` output, and
//! the text summary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn layout(tag: &str) -> String {
    format!("oci:{}:{tag}", fixtures().join("oci-layout").display())
}

fn policy(name: &str) -> String {
    fixtures()
        .join("policies")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Runs `ipu-image-svc` with its audit log in a fresh directory (or `audit_dir`).
fn svc_with_audit(args: &[&str], audit_dir: &Path) -> Output {
    let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if full.len() >= 2 && full[0] == "image" {
        full.insert(2, "--audit-log".into());
        full.insert(3, audit_dir.to_string_lossy().into_owned());
    }
    Command::new(env!("CARGO_BIN_EXE_ipu-image-svc"))
        .args(&full)
        .env("IPU_LOG", "off")
        .output()
        .unwrap()
}

fn svc(args: &[&str]) -> Output {
    let audit = tempfile::tempdir().unwrap();
    svc_with_audit(args, audit.path())
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn unpack_with_timings_prints_every_stage_that_ran() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("rootfs.ext4");
    let key = fixtures().join("keys/rsa-2048/priv.pem");
    let out = svc(&[
        "image",
        "unpack",
        "--policy",
        &policy("policy-A.json"),
        "--cache",
        dir.path().join("cache").to_str().unwrap(),
        "--decryption-key",
        key.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "-q",
        "--timings",
        &layout("enc-signed"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let rows: Vec<(&str, f64, &str)> = stderr
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [stage, ms, share] if share.ends_with('%') => {
                    Some((stage, ms.parse().ok()?, share))
                }
                _ => None,
            }
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r.0).collect();
    // Every stage of an unpack, once each; decryption and unpacking as busy times.
    for stage in [
        "verify",
        "key_release",
        "fetch",
        "decrypt*",
        "unpack*",
        "file_system",
        "total",
    ] {
        assert_eq!(
            names.iter().filter(|n| **n == stage).count(),
            1,
            "{stage}: {stderr}"
        );
    }
    assert!(
        stderr.contains("stage") && stderr.contains("wall ms"),
        "{stderr}"
    );
    assert!(stderr.contains("* busy time"), "{stderr}");
    let total = rows.iter().find(|r| r.0 == "total").unwrap().1;
    for (stage, ms, _) in &rows {
        assert!(
            *ms >= 0.0 && *ms <= total,
            "{stage} {ms} of {total}: {stderr}"
        );
    }
    // The summary is on stdout as without the flag; the table only on stderr.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("accepted: ") && !stdout.contains("wall ms"),
        "{stdout}"
    );
    // Without the flag: no table.
    let out = svc(&[
        "image",
        "verify",
        "--policy",
        &policy("policy-A.json"),
        "--cache",
        dir.path().join("cache").to_str().unwrap(),
        &layout("enc-signed"),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("wall ms"));
}

#[test]
fn accepted_unpack_exits_0_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let output = dir.path().join("rootfs.ext4");
    let key = fixtures().join("keys/rsa-2048/priv.pem");
    let out = svc(&[
        "image",
        "unpack",
        "--policy",
        &policy("policy-A.json"),
        "--cache",
        cache.to_str().unwrap(),
        "--decryption-key",
        key.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "-q",
        &layout("enc-signed"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("accepted: "), "{stdout}");
    assert!(
        stdout.contains("sha256:53ed5331de7a33db61b90f9beed29d069666317e6c065dceaa86851d8a00248a")
    );
    assert!(stdout.contains("encrypted -> diff_id sha256:"), "{stdout}");
    assert!(output.is_file());
}

#[test]
fn json_report_of_an_accepted_verify() {
    let dir = tempfile::tempdir().unwrap();
    let out = svc(&[
        "image",
        "verify",
        "--json",
        "--policy",
        &policy("policy-A.json"),
        "--cache",
        dir.path().to_str().unwrap(),
        &layout("multilayer"),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    assert_eq!(v["outcome"], "accepted");
    assert_eq!(
        v["manifest_digest"],
        "sha256:8f7e18504388cbd5007932a5d4be93ba59f247502d5453b1f7c5514018cc31c1"
    );
    assert_eq!(v["policy"]["allowed"], true);
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[2]["encrypted"], true);
    assert!(v.get("rootfs").is_none());
}

#[test]
fn rejections_exit_3_with_their_class() {
    let dir = tempfile::tempdir().unwrap();
    for (tag, class) in [
        ("plain", "no-signature"),
        ("signed-wrongkey", "wrong-key"),
        ("tampered-layer", "digest-mismatch"),
        ("evil-traversal", "unsafe-layer"),
    ] {
        let output = dir.path().join(format!("{tag}.ext4"));
        let key = fixtures().join("keys/rsa-2048/priv.pem");
        let out = svc(&[
            "image",
            "unpack",
            "--json",
            "--policy",
            &policy("policy-A.json"),
            "--cache",
            dir.path().join("cache").to_str().unwrap(),
            "--decryption-key",
            key.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            &layout(tag),
        ]);
        assert_eq!(out.status.code(), Some(3), "{tag}");
        let v = json(&out);
        assert_eq!(v["outcome"], "rejected", "{tag}");
        assert_eq!(v["class"], class, "{tag}");
        assert!(!v["error"].as_str().unwrap().is_empty());
        assert!(!output.exists(), "{tag}: output written");
    }
    // Without --json the reason goes to stderr, naming the class; nothing on stdout.
    let out = svc(&[
        "image",
        "verify",
        "--policy",
        &policy("policy-A.json"),
        "--cache",
        dir.path().to_str().unwrap(),
        &layout("plain"),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rejected (no-signature)"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn operational_errors_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().to_str().unwrap();
    // A missing image.
    let out = svc(&[
        "image",
        "verify",
        "--json",
        "--policy",
        &policy("policy-accept-anything.json"),
        "--cache",
        cache,
        &layout("no-such-tag"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["class"], "not-found");
    // A policy file that is not a policy.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"default":[{"type":"acceptEverything"}]}"#).unwrap();
    let out = svc(&[
        "image",
        "verify",
        "--json",
        "--policy",
        bad.to_str().unwrap(),
        &layout("plain"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["outcome"], "error");
    assert_eq!(v["class"], "invalid-configuration");
    assert!(
        v["error"].as_str().unwrap().contains("acceptEverything"),
        "{v}"
    );
    // A decryption key file that is not a key.
    let out = svc(&[
        "image",
        "unpack",
        "--policy",
        &policy("policy-A.json"),
        "--decryption-key",
        bad.to_str().unwrap(),
        "-o",
        dir.path().join("x.ext4").to_str().unwrap(),
        &layout("enc-signed"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("decryption key"));
    // A registry nobody listens on.
    let out = svc(&[
        "image",
        "verify",
        "--policy",
        &policy("policy-A.json"),
        "--cache",
        cache,
        "docker://127.0.0.1:9/fixtures/hello:plain",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error (network)"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["image", "verify", "--policy", "p.json", "not a reference"],
        vec!["image", "verify", "oci:/x:y"],
        vec!["image", "unpack", "--policy", "p.json", "oci:/x:y"],
        vec!["image", "frobnicate"],
        vec![
            "image",
            "verify",
            "--policy",
            "p.json",
            "--platform",
            "nonsense",
            "oci:/x:y",
        ],
    ] {
        let out = svc(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn the_decryption_key_option_warns_and_never_prints_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixtures().join("keys/rsa-2048/priv.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_ipu-image-svc"))
        .args([
            "image",
            "unpack",
            "--audit-log",
            dir.path().join("audit").to_str().unwrap(),
            "--policy",
            &policy("policy-A.json"),
            "--cache",
            dir.path().to_str().unwrap(),
            "--decryption-key",
            key.to_str().unwrap(),
            "-o",
            dir.path().join("r.ext4").to_str().unwrap(),
            "-q",
            &layout("signed-cosign"),
        ])
        .env("IPU_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("development option"), "{stderr}");
    let pem = std::fs::read_to_string(&key).unwrap();
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!stderr.contains(line), "key material in the log");
        assert!(!String::from_utf8_lossy(&out.stdout).contains(line));
    }
}

/// Every decision of a run is in the audit log, which verifies with the key the service
/// created on first use.
#[test]
fn decisions_are_written_to_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let audit_dir = dir.path().join("audit");
    let key = fixtures().join("keys/rsa-2048/priv.pem");
    let unpack = |tag: &str| {
        svc_with_audit(
            &[
                "image",
                "unpack",
                "-q",
                "--tenant",
                "acme",
                "--function",
                "resize",
                "--policy",
                &policy("policy-A.json"),
                "--cache",
                dir.path().join("cache").to_str().unwrap(),
                "--decryption-key",
                key.to_str().unwrap(),
                "-o",
                dir.path().join(format!("{tag}.ext4")).to_str().unwrap(),
                &layout(tag),
            ],
            &audit_dir,
        )
    };
    assert_eq!(unpack("enc-signed").status.code(), Some(0));
    assert_eq!(unpack("evil-traversal").status.code(), Some(3));
    assert_eq!(unpack("plain").status.code(), Some(3));

    // Read back with the audit library, as an auditor's tooling does.
    let verifier = audit::NoteVerifier::parse(
        &std::fs::read_to_string(audit_dir.join("verifier.pub")).unwrap(),
    )
    .unwrap();
    let store = audit::Store::open(&audit_dir, std::time::Duration::from_secs(10)).unwrap();
    let report = audit::verify::verify(&store, &verifier, &[])
        .unwrap()
        .unwrap_or_else(|f| panic!("the audit log does not verify: {f}"));
    let page = store
        .query(&audit::Query {
            limit: 100,
            ..audit::Query::default()
        })
        .unwrap();
    assert_eq!(report.events, page.events.len() as u64);
    let events: Vec<serde_json::Value> = page
        .events
        .iter()
        .map(|e| serde_json::from_slice(&e.to_canonical()).unwrap())
        .collect();
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["kind"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
                e["details"]["class"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            // enc-signed: accepted, both layers decrypted and unpacked, rootfs built.
            "admin.dev_decryption_key success -",
            "signature.verify allowed -",
            "policy.decision allowed -",
            "layer.decrypt success -",
            "layer.unpack success -",
            "layer.decrypt success -",
            "layer.unpack success -",
            "base.build success -",
            // evil-traversal: signature fine, the layer is refused.
            "admin.dev_decryption_key success -",
            "signature.verify allowed -",
            "policy.decision allowed -",
            "layer.unpack denied unsafe-layer",
            // plain: no signature.
            "admin.dev_decryption_key success -",
            "signature.verify denied -",
            "policy.decision denied no-signature",
        ]
    );
    for e in &events {
        assert_eq!(e["tenant"], "acme");
        assert_eq!(e["function"], "resize");
        assert_eq!(e["service"], "ipu-image-svc");
        // The development-key event comes before the image is resolved.
        if e["kind"] != "admin.dev_decryption_key" {
            assert!(e["image"]["digest"]
                .as_str()
                .unwrap()
                .starts_with("sha256:"));
        }
    }
}

/// A signed policy bundle decides the request and its requirements are enforced: a denied
/// tenant, an unencrypted image where encryption is required, too many layers, and a
/// bundle older than the running one are each refused (exit 3) and audited.
#[test]
fn a_policy_bundle_decides_and_its_requirements_are_enforced() {
    use policy::deploy::bundle::{self, BundleContent};
    let dir = tempfile::tempdir().unwrap();
    let deployment = r#"
schema = 1
image_trust_policy = "policy-A.json"

[defaults]
# Enforced when set; left to the CPU check of the service test suite.
require_hardware_crypto = false

[[tenant]]
name = "acme"

[[tenant.function]]
name = "enc-*"
images = ["oci:*"]
require_encryption = true

[[tenant.function]]
name = "small-*"
images = ["oci:*"]
limits = { max_layers = 2 }
"#;
    let key = std::fs::read(fixtures().join("keys/ec-p256/priv.pem")).unwrap();
    let make = |version: u64| {
        let signed = bundle::sign(
            &BundleContent {
                version,
                deployment: deployment.into(),
                image_trust: std::fs::read_to_string(fixtures().join("policies/policy-A.json"))
                    .unwrap(),
            },
            &key,
        )
        .unwrap();
        let path = dir.path().join(format!("v{version}.bundle"));
        std::fs::write(&path, signed).unwrap();
        path
    };
    let (v1, v2) = (make(1), make(2));
    let audit_dir = dir.path().join("audit");
    let run = |bundle: &Path, tenant: &str, function: &str, tag: &str| {
        let out = svc_with_audit(
            &[
                "image",
                "unpack",
                "-q",
                "--json",
                "--policy-bundle",
                bundle.to_str().unwrap(),
                "--bundle-key",
                fixtures().join("keys/ec-p256/pub.pem").to_str().unwrap(),
                "--bundle-state",
                dir.path().join("state").to_str().unwrap(),
                "--tenant",
                tenant,
                "--function",
                function,
                "--cache",
                dir.path().join("cache").to_str().unwrap(),
                "--decryption-key",
                fixtures().join("keys/rsa-2048/priv.pem").to_str().unwrap(),
                "-o",
                dir.path().join(format!("{tag}.ext4")).to_str().unwrap(),
                &layout(tag),
            ],
            &audit_dir,
        );
        let code = out.status.code();
        (code, json(&out))
    };
    let (code, v) = run(&v2, "acme", "enc-resize", "enc-signed");
    assert_eq!(code, Some(0), "{v}");
    for (tenant, function, tag, class, why) in [
        (
            "acme",
            "enc-resize",
            "signed-cosign",
            "rejected-by-policy",
            "is not encrypted",
        ),
        (
            "acme",
            "small-resize",
            "multilayer",
            "too-large",
            "has 3 layers",
        ),
        (
            "globex",
            "enc-resize",
            "enc-signed",
            "rejected-by-policy",
            "not in the deployment policy",
        ),
        (
            "acme",
            "other",
            "enc-signed",
            "rejected-by-policy",
            "no function rule",
        ),
    ] {
        let (code, v) = run(&v2, tenant, function, tag);
        assert_eq!(code, Some(3), "{tenant}/{function}/{tag}: {v}");
        assert_eq!(v["class"], class, "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{v}");
    }
    // v2 is running: v1 is a rollback.
    let (code, v) = run(&v1, "acme", "enc-resize", "enc-signed");
    assert_eq!(code, Some(3), "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("rollback refused"),
        "{v}"
    );

    let store = audit::Store::open(&audit_dir, std::time::Duration::from_secs(10)).unwrap();
    let loads = store
        .query(&audit::Query {
            kind: Some(audit::EventKind::Admin("policy_load".into())),
            limit: 100,
            ..audit::Query::default()
        })
        .unwrap()
        .events;
    assert_eq!(loads.len(), 6);
    assert_eq!(loads.last().unwrap().outcome, audit::Outcome::Denied);
    assert!(loads.last().unwrap().reason.contains("rollback"));
    let denials = store
        .query(&audit::Query {
            kind: Some(audit::EventKind::PolicyDecision),
            outcome: Some(audit::Outcome::Denied),
            limit: 100,
            ..audit::Query::default()
        })
        .unwrap()
        .events;
    assert_eq!(denials.len(), 4);
    assert!(denials
        .iter()
        .all(|e| e.details.get("policy").map(String::as_str) == Some("deployment")));
}
