//! The deployment policy: a table of allow and deny decisions (precedence, wildcards, key
//! release, IPU classes), malformed documents with precise positions, and lint.

use policy::deploy::{self, evaluate, evaluate_key_release, DeployRequest};

const POLICY: &str = r#"
schema = 1
image_trust_policy = "containers-policy.json"

[defaults]
require_signature = true
require_encryption = false
limits = { max_layers = 32, max_unpacked_bytes = "8G", allow_device_nodes = false }
clone = { size = "2G", ttl = "15m" }

[[ipu_class]]
name = "dpu-gen2"
pcr_bank = "sha256"
pcrs = { 0 = "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969", 7 = "b5710bf57d25623e4019027da116821fa99f5c81e9e38b87671cc574f9281439" }

[[ipu_class]]
name = "dpu-gen1"
pcr_bank = "sha256"
allowed_measurements = ["0000000000000000000000000000000000000000000000000000000000000000"]

[[tenant]]
name = "acme"
require_encryption = true

[[tenant.function]]
name = "resize-hd"
images = ["docker://registry.example/acme/resize-hd:*"]
ipu_classes = ["dpu-gen2"]
limits = { max_unpacked_bytes = "1G" }

[[tenant.function]]
name = "resize-*"
images = ["docker://registry.example/acme/resize*", "oci:/srv/images/acme/*"]

[[tenant]]
name = "globex"
require_signature = false

[[tenant.function]]
name = "*"
images = ["docker://registry.example/globex/*"]
clone = { ttl = "1h" }

[[key]]
id = "acme-layers-2026"
images = ["docker://registry.example/acme/*"]
tenants = ["acme"]
ipu_classes = ["dpu-gen2"]
"#;

fn req(tenant: &str, function: &str, image: &str, class: Option<&str>) -> DeployRequest {
    DeployRequest {
        tenant: tenant.into(),
        function: function.into(),
        image: image.into(),
        ipu_class: class.map(str::to_string),
    }
}

/// (tenant, function, image, ipu class, allowed, decided by (substring), reason (substring))
type Row<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    bool,
    &'a str,
    &'a str,
);

#[test]
fn decision_table() {
    let p = deploy::parse(POLICY, "policy.toml").unwrap();
    let table: &[Row] = &[
        (
            "acme",
            "resize-hd",
            "docker://registry.example/acme/resize-hd:1.0",
            Some("dpu-gen2"),
            true,
            "rule #1",
            "may run",
        ),
        // The first matching rule decides, even when a later one would allow.
        (
            "acme",
            "resize-hd",
            "docker://registry.example/acme/resize-sd:1.0",
            Some("dpu-gen2"),
            false,
            "rule #1",
            "not in the scopes",
        ),
        (
            "acme",
            "resize-hd",
            "docker://registry.example/acme/resize-hd:1.0",
            Some("dpu-gen1"),
            false,
            "rule #1",
            "IPU class \"dpu-gen1\" is not allowed",
        ),
        (
            "acme",
            "resize-hd",
            "docker://registry.example/acme/resize-hd:1.0",
            None,
            false,
            "rule #1",
            "(none attested)",
        ),
        (
            "acme",
            "resize-sd",
            "docker://registry.example/acme/resize-sd:2",
            None,
            true,
            "rule #2",
            "may run",
        ),
        (
            "acme",
            "resize-sd",
            "oci:/srv/images/acme/resize:1",
            None,
            true,
            "rule #2",
            "oci:/srv/images/acme/*",
        ),
        // Wildcards do not cross prefixes they do not cover.
        (
            "acme",
            "resize-sd",
            "docker://registry.example/acmex/resize:1",
            None,
            false,
            "rule #2",
            "not in the scopes",
        ),
        (
            "acme",
            "thumbnail",
            "docker://registry.example/acme/resize:1",
            None,
            false,
            "default deny",
            "no function rule",
        ),
        (
            "globex",
            "anything",
            "docker://registry.example/globex/app:3",
            None,
            true,
            "rule #1",
            "may run",
        ),
        (
            "globex",
            "anything",
            "docker://registry.example/acme/app:3",
            None,
            false,
            "rule #1",
            "not in the scopes",
        ),
        (
            "initech",
            "f",
            "docker://registry.example/initech/app",
            None,
            false,
            "default deny",
            "not in the deployment policy",
        ),
        // Names are exact: no case folding, no prefix match on tenants.
        (
            "ACME",
            "resize-sd",
            "docker://registry.example/acme/resize:1",
            None,
            false,
            "default deny",
            "tenant",
        ),
    ];
    for (i, (t, f, img, class, allowed, by, why)) in table.iter().enumerate() {
        let d = evaluate(&p, &req(t, f, img, *class));
        assert_eq!(d.allowed, *allowed, "row {i}: {}", d.reason);
        assert!(
            d.decided_by.contains(by),
            "row {i}: decided by {}",
            d.decided_by
        );
        assert!(d.reason.contains(why), "row {i}: {}", d.reason);
        assert_eq!(d.requirements.is_some(), *allowed, "row {i}");
    }
}

#[test]
fn requirements_merge_most_specific_first() {
    let p = deploy::parse(POLICY, "policy.toml").unwrap();
    let hd = evaluate(
        &p,
        &req(
            "acme",
            "resize-hd",
            "docker://registry.example/acme/resize-hd:1",
            Some("dpu-gen2"),
        ),
    )
    .requirements
    .unwrap();
    assert!(hd.require_signature && hd.require_encryption && hd.require_hardware_crypto);
    assert_eq!(hd.max_unpacked_bytes, Some(1 << 30)); // function
    assert_eq!(hd.max_layers, Some(32)); // defaults
    assert_eq!(hd.clone_ttl_secs, Some(900));
    assert_eq!(hd.clone_size, Some(2 << 30));
    assert!(!hd.allow_device_nodes);
    let g = evaluate(
        &p,
        &req("globex", "x", "docker://registry.example/globex/a", None),
    )
    .requirements
    .unwrap();
    assert!(!g.require_signature); // tenant relaxes the default
    assert!(!g.require_encryption);
    assert_eq!(g.clone_ttl_secs, Some(3600)); // function
    assert_eq!(g.max_unpacked_bytes, Some(8 << 30));
}

#[test]
fn key_release_needs_the_deployment_and_a_key_rule() {
    let p = deploy::parse(POLICY, "policy.toml").unwrap();
    let ok = req(
        "acme",
        "resize-hd",
        "docker://registry.example/acme/resize-hd:1",
        Some("dpu-gen2"),
    );
    let d = evaluate_key_release(&p, &ok, "acme-layers-2026");
    assert!(d.allowed, "{}", d.reason);
    assert_eq!(d.decided_by, "key rule \"acme-layers-2026\"");
    for (r, key, why) in [
        (ok.clone(), "other-key", "not in the deployment policy"),
        (
            req(
                "acme",
                "resize-sd",
                "docker://registry.example/acme/resize-sd:1",
                Some("dpu-gen1"),
            ),
            "acme-layers-2026",
            "IPU class dpu-gen1 may not receive",
        ),
        (
            req(
                "acme",
                "resize-sd",
                "docker://registry.example/acme/resize-sd:1",
                None,
            ),
            "acme-layers-2026",
            "(none attested)",
        ),
        (
            req(
                "globex",
                "f",
                "docker://registry.example/globex/a",
                Some("dpu-gen2"),
            ),
            "acme-layers-2026",
            "not in the key's image scopes",
        ),
        (
            req(
                "acme",
                "thumbnail",
                "docker://registry.example/acme/x",
                Some("dpu-gen2"),
            ),
            "acme-layers-2026",
            "no function rule",
        ),
    ] {
        let d = evaluate_key_release(&p, &r, key);
        assert!(!d.allowed);
        assert!(d.reason.contains(why), "{}", d.reason);
    }
}

fn errors(doc: &str) -> Vec<String> {
    match deploy::parse(doc, "p.toml") {
        Ok(_) => panic!("accepted:\n{doc}"),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn malformed_documents_name_their_position() {
    let base = "schema = 1\nimage_trust_policy = \"p.json\"\n";
    let cases: &[(&str, &str)] = &[
        // Unknown fields anywhere, including in settings that are flattened into tenants.
        ("[defaults]\nrequire_signatur = true\n", "4:1: unknown field `require_signatur`"),
        ("[[tenant]]\nname = \"a\"\nrequire_encryptoin = true\n", "5:1: unknown field `require_encryptoin`"),
        ("[[tenant]]\nname = \"a\"\n[[tenant.function]]\nname = \"f\"\nimages = [\"docker://r/x\"]\nlimit = { max_layers = 1 }\n", "8:1: unknown field `limit`"),
        ("[defaults]\nlimits = { max_unpacked_bytes = \"8 gigs\" }\n", "4:33: \"8 gigs\" is not a size"),
        ("[defaults]\nclone = { ttl = \"soon\" }\n", "is not a duration"),
        ("[[tenant]]\nname = \"a\"\n[[tenant.function]]\nname = \"f\"\nimages = [\"registry/x\"]\n", "7:11: image scope \"registry/x\" must start with"),
        ("[[tenant]]\nname = \"a\"\n[[tenant]]\nname = \"a\"\n", "6:8: tenant \"a\" is empty or defined twice"),
        ("[[tenant]]\nname = \"a\"\n[[tenant.function]]\nname = \"f\"\nimages = [\"docker://r/*\"]\nipu_classes = [\"gen9\"]\n", "8:16: unknown IPU class \"gen9\""),
        ("[[ipu_class]]\nname = \"c\"\npcr_bank = \"sha1\"\npcrs = { 0 = \"00\" }\n", "5:12: PCR bank \"sha1\""),
        ("[[ipu_class]]\nname = \"c\"\npcr_bank = \"sha256\"\npcrs = { 24 = \"00\" }\n", "6:15: PCR index \"24\" is not 0 to 23"),
        ("[[ipu_class]]\nname = \"c\"\npcr_bank = \"sha256\"\n", "4:8: IPU class \"c\" has no reference values"),
        ("[[key]]\nid = \"k\"\nimages = [\"docker://r/*\"]\ntenants = [\"nobody\"]\nipu_classes = []\n", "6:12: unknown tenant \"nobody\""),
        ("[[tenant]]\nname = \"a\"\n[[tenant.function]]\nname = \"f**\"\nimages = [\"docker://r/*\"]\n", "use a single *"),
    ];
    for (doc, want) in cases {
        let got = errors(&format!("{base}{doc}"));
        assert!(
            got.iter().any(|e| e.contains(want)),
            "want {want:?} in {got:?} for\n{doc}"
        );
    }
    let got = errors("schema = 2\nimage_trust_policy = \"p.json\"\n");
    assert_eq!(
        got,
        ["1:10: schema version 2 is not supported (this build reads 1)"]
    );
    // Several problems are all reported.
    let got = errors(&format!(
        "{base}[[key]]\nid = \"k\"\nimages = [\"bad\"]\ntenants = [\"x\"]\nipu_classes = [\"y\"]\n"
    ));
    assert_eq!(got.len(), 3, "{got:?}");
}

#[test]
fn lint_finds_shadowed_function_rules() {
    let doc = "schema = 1\nimage_trust_policy = \"p.json\"\n[[tenant]]\nname = \"a\"\n[[tenant.function]]\nname = \"resize-*\"\nimages = [\"docker://r/*\"]\n[[tenant.function]]\nname = \"resize-hd\"\nimages = [\"docker://r/hd\"]\n[[tenant.function]]\nname = \"thumb\"\nimages = [\"docker://r/t\"]\n";
    let p = deploy::parse(doc, "p.toml").unwrap();
    let warnings: Vec<String> = deploy::lint(&p, doc)
        .iter()
        .map(|w| w.to_string())
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("9:8: function rule \"resize-hd\" of tenant \"a\" is unreachable: the rule \"resize-*\" at line 6"),
        "{warnings:?}"
    );
    assert!(deploy::lint(&deploy::parse(POLICY, "p").unwrap(), POLICY).is_empty());
}
