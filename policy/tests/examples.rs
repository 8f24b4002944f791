//! The worked example of `docs/policy-guide.md` stays true: it lints clean, its decision
//! table passes, and the change the guide walks through shows up in `policy diff`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples/policy")
        .join(file)
}

fn policy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_policy"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_example_lints_clean_and_its_cases_pass() {
    let out = policy(&["lint", s(&example("deployment.toml"))]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = policy(&[
        "test",
        "--policy",
        s(&example("deployment.toml")),
        s(&example("cases.toml")),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.ends_with("9 cases, 0 failed\n"), "{text}");
}

#[test]
fn a_failing_case_fails_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let cases = std::fs::read_to_string(example("cases.toml"))
        .unwrap()
        .replacen("expect = \"deny\"", "expect = \"allow\"", 1);
    std::fs::write(dir.path().join("cases.toml"), cases).unwrap();
    let out = policy(&[
        "test",
        "--policy",
        s(&example("deployment.toml")),
        s(&dir.path().join("cases.toml")),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL HD resize never runs on gen1 IPUs"),
        "{text}"
    );
    assert!(text.ends_with("9 cases, 1 failed\n"), "{text}");
}

#[test]
fn diff_shows_the_requests_a_change_affects() {
    // The guide's change: let the HD resizer run on gen1 IPUs too.
    let dir = tempfile::tempdir().unwrap();
    let new = std::fs::read_to_string(example("deployment.toml"))
        .unwrap()
        .replace(
            "ipu_classes = [\"dpu-gen2\"]\nlimits",
            "ipu_classes = [\"dpu-gen2\", \"dpu-gen1\"]\nlimits",
        );
    std::fs::write(dir.path().join("new.toml"), new).unwrap();
    let out = policy(&[
        "diff",
        s(&example("deployment.toml")),
        s(&dir.path().join("new.toml")),
        "--requests",
        s(&example("cases.toml")),
    ]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("deny -> allow: HD resize never runs on gen1 IPUs"),
        "{text}"
    );
    assert!(text.ends_with("1 of 9 requests change outcome\n"), "{text}");
    let same = policy(&[
        "diff",
        s(&example("deployment.toml")),
        s(&example("deployment.toml")),
        "--requests",
        s(&example("cases.toml")),
    ]);
    assert_eq!(same.status.code(), Some(0));
}

/// Every property the worked example uses is declared, at its place, in the published JSON
/// Schema (whose objects all forbid additional properties, like the parser).
#[test]
fn the_published_schema_declares_every_field_the_example_uses() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deployment-policy.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let doc: toml::Value =
        toml::from_str(&std::fs::read_to_string(example("deployment.toml")).unwrap()).unwrap();
    let doc = serde_json::to_value(doc).unwrap();

    fn resolve<'a>(
        root: &'a serde_json::Value,
        node: &'a serde_json::Value,
    ) -> &'a serde_json::Value {
        match node.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => resolve(root, &root["$defs"][r.trim_start_matches("#/$defs/")]),
            None => node,
        }
    }
    fn walk(
        root: &serde_json::Value,
        schema: &serde_json::Value,
        value: &serde_json::Value,
        path: &str,
        missing: &mut Vec<String>,
    ) {
        let schema = resolve(root, schema);
        match value {
            serde_json::Value::Object(map) => {
                if schema.get("additionalProperties") == Some(&serde_json::Value::Bool(false)) {
                    assert!(
                        schema["properties"].is_object(),
                        "{path}: object without properties"
                    );
                }
                for (k, v) in map {
                    let sub = schema["properties"]
                        .get(k)
                        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
                    match sub {
                        Some(sub) => walk(root, sub, v, &format!("{path}.{k}"), missing),
                        None => missing.push(format!("{path}.{k}")),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(root, &schema["items"], v, &format!("{path}[{i}]"), missing);
                }
            }
            _ => {}
        }
    }
    let mut missing = Vec::new();
    walk(&schema, &schema, &doc, "", &mut missing);
    assert!(missing.is_empty(), "not in the schema: {missing:?}");
}
