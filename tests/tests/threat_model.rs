//! `threat-model.md` names, for every threat, the test that shows its mitigation. This
//! checks that every test it names exists, so the document cannot drift from the code.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Resolves `crate::module::tests::name` to its source file.
fn module_file(path: &[&str]) -> PathBuf {
    let krate = path[0].replace('_', "-");
    let modules: Vec<&str> = path[1..]
        .iter()
        .copied()
        .take_while(|m| *m != "tests")
        .collect();
    let base = repo().join(krate).join("src").join(modules.join("/"));
    let file = base.with_extension("rs");
    if file.is_file() {
        file
    } else {
        base.join("mod.rs")
    }
}

#[test]
fn every_test_named_in_the_threat_model_exists() {
    let text = std::fs::read_to_string(repo().join("threat-model.md")).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| T")) {
        // `file.rs::name` sets the file for later `::name` references on the same line.
        let mut current: Option<PathBuf> = None;
        for (i, span) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let (file, name) = if let Some(name) = span.strip_prefix("::") {
                match &current {
                    Some(f) => (f.clone(), name.to_string()),
                    None => {
                        missing.push(format!("{span}: no file before it"));
                        continue;
                    }
                }
            } else if let Some((file, name)) = span.split_once(".rs::") {
                let f = repo().join(format!("{file}.rs"));
                current = Some(f.clone());
                (f, name.to_string())
            } else if span.contains("::tests::") {
                let parts: Vec<&str> = span.split("::").collect();
                let f = module_file(&parts);
                current = Some(f.clone());
                (f, parts.last().unwrap().to_string())
            } else {
                continue;
            };
            let source = std::fs::read_to_string(&file).unwrap_or_default();
            if source.contains(&format!("fn {name}(")) {
                checked += 1;
            } else {
                missing.push(format!("{}: no fn {name}", file.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "threat-model.md names missing tests:\n{}",
        missing.join("\n")
    );
    assert!(checked >= 40, "only {checked} test references found");
}
