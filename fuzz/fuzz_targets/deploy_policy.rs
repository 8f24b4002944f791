//! The deployment policy parser, lint and evaluation on arbitrary text: no panic, every
//! error positioned inside the document, and evaluation total on whatever parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::deploy::{self, DeployRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match deploy::parse(text, "fuzz.toml") {
        Ok(doc) => {
            let _ = deploy::lint(&doc, text);
            for t in &doc.tenants {
                for f in &t.functions {
                    let req = DeployRequest {
                        tenant: t.name.get_ref().clone(),
                        function: f.name.get_ref().as_str().replace('*', "x"),
                        image: "docker://registry.example/a/b:1".into(),
                        ipu_class: f.ipu_classes.first().map(|c| c.get_ref().clone()),
                    };
                    let d = deploy::evaluate(&doc, &req);
                    assert_eq!(d.allowed, d.requirements.is_some());
                    for k in &doc.keys {
                        let _ = deploy::evaluate_key_release(&doc, &req, k.id.get_ref());
                    }
                }
            }
        }
        Err(e) => {
            let lines = text.lines().count().max(1);
            for p in &e.problems {
                assert!(
                    p.line >= 1 && p.line <= lines + 1,
                    "{p} outside {lines} lines"
                );
                assert!(p.column >= 1);
            }
        }
    }
});
