//! `ipu-image-svc config check`: the example configuration is valid and prints as the
//! effective configuration; flags override it; a mistake exits 2 with file:line:column.

use std::path::{Path, PathBuf};
use std::process::Command;

fn svc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ipu-image-svc"))
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/ipu-image-svc.toml")
}

#[test]
fn the_example_checks_and_flags_override_it() {
    let out = svc()
        .args(["config", "check", "--config"])
        .arg(example())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "metrics_listen = \"127.0.0.1:9464\"",
        "log_format = \"json\"",
        "clone_ttl = \"15m\"",
        "urls = [\"https://keybroker-1.example:8443\", \"https://keybroker-2.example:8443\", \"https://keybroker-3.example:8443\"]",
        "connect_timeout = \"10s\"",
        "key = \"/etc/ipu-image-svc/ipu.key\"",
        "ak_handle = 2164326416",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    let out = svc()
        .args(["config", "check", "--config"])
        .arg(example())
        .args([
            "--clone-ttl",
            "1h",
            "--log-format",
            "text",
            "--audit-log",
            "/a",
        ])
        .args([
            "--broker",
            "https://other:1",
            "--broker",
            "https://other:2",
            "--broker-request-timeout",
            "5s",
            "--metrics-listen",
            "/run/m.sock",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "clone_ttl = \"1h\"",
        "log_format = \"text\"",
        "audit_log = \"/a\"",
        "urls = [\"https://other:1\", \"https://other:2\"]",
        "request_timeout = \"5s\"",
        "metrics_listen = \"unix:/run/m.sock\"",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert!(!text.contains("audit_socket"), "{text}");
}

#[test]
fn mistakes_exit_2_with_their_position() {
    let dir = tempfile::tempdir().unwrap();
    for (text, want) in [
        (
            "clone_ttl = 15\n",
            ":1:13: invalid type: integer `15`, expected a string",
        ),
        ("\n\n[broker]\nurll = \"x\"\n", ":4:1: unknown field `urll`"),
    ] {
        let p = dir.path().join("serve.toml");
        std::fs::write(&p, text).unwrap();
        let out = svc()
            .args(["config", "check", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{}{want}", p.display())), "{err}");
    }
    // No file at all: what is required is named.
    let out = svc()
        .args(["config", "check", "--config"])
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
