//! `audit serve` for operators: its configuration file (`config check` on the example,
//! positioned mistakes, flags over the file), JSON logs, Prometheus metrics after appends,
//! and the gRPC health service on the query socket, NOT_SERVING while the log's file system
//! is read-only and SERVING again after.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audit::{AuditSink, CheckpointSigner, Event, EventKind, Outcome, RemoteLog};
use ops::metrics::{sample, scrape, MetricsListen};

const ORIGIN: &str = "ipu.test/ops";

fn audit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_audit"))
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/audit.toml")
}

#[test]
fn config_check_prints_the_effective_configuration() {
    let out = audit()
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
    assert!(text.contains("origin = \"ipu-audit/ipu-0042\""), "{text}");
    assert!(
        text.contains("metrics_listen = \"127.0.0.1:9465\""),
        "{text}"
    );
    assert!(text.contains("log_format = \"json\""), "{text}");

    // Flags over the file.
    let out = audit()
        .args(["config", "check", "--config"])
        .arg(example())
        .args([
            "--origin",
            "from-flag",
            "--log-format",
            "text",
            "--writer-uid",
            "5",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("origin = \"from-flag\""), "{text}");
    assert!(text.contains("log_format = \"text\""), "{text}");
    assert!(text.contains("writer_uids = [5]"), "{text}");

    // A mistake: exit 2, with file:line:column.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "origin = \"o\"\nsigner = \"k\"\nmetrics = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = audit()
        .args(["config", "check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:1: unknown field `metrics`", bad.display())),
        "{err}"
    );
}

/// A read-only bind mount of a directory over itself, undone when dropped.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> Self {
        let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(Command::new("mount").arg("--bind").arg(dir).arg(dir));
        let ro = ReadOnly(dir.to_path_buf());
        ok(Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(dir));
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn health(rt: &tokio::runtime::Runtime, socket: &Path) -> i32 {
    rt.block_on(async {
        let channel = api::unix::connect(socket.to_path_buf()).await.unwrap();
        let mut client = ops::health::HealthClient::new(channel);
        client
            .check(ops::health::HealthCheckRequest {
                service: audit::service::HEALTH_SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_logs_json_exports_metrics_and_reports_health() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = CheckpointSigner::generate(ORIGIN).unwrap();
    std::fs::write(dir.path().join("signer.key"), key.as_bytes()).unwrap();
    std::fs::create_dir_all(dir.path().join("log")).unwrap();
    // Relative paths are the file's directory's.
    std::fs::write(
        dir.path().join("serve.toml"),
        format!(
            "log = \"log\"\nsigner = \"signer.key\"\norigin = \"{ORIGIN}\"\nwriter_socket = \"writer.sock\"\nquery_socket = \"query.sock\"\nlog_format = \"text\"\nmetrics_listen = \"unix:metrics.sock\"\n"
        ),
    )
    .unwrap();
    let mut child = audit()
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("serve.toml"))
        .args(["--log-format", "json"])
        .env("AUDIT_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("serving"), "{line}");
    let stderr = child.stderr.take().unwrap();
    let _daemon = Daemon(child);
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines() {
            let Ok(l) = l else { return };
            if lines_tx.send(l).is_err() {
                return;
            }
        }
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let query = dir.path().join("query.sock");
    wait_for("SERVING", || health(&rt, &query) == 1);

    // The log lines so far are JSON objects with the text log's fields.
    let first: serde_json::Value =
        serde_json::from_str(&lines.recv_timeout(Duration::from_secs(10)).unwrap()).unwrap();
    for field in ["timestamp", "level", "target", "fields"] {
        assert!(first.get(field).is_some(), "{field} missing: {first}");
    }
    assert!(first["fields"]["message"].is_string(), "{first}");

    let writer = RemoteLog::connect(&dir.path().join("writer.sock")).unwrap();
    for i in 0..3 {
        writer
            .append(Event::new(
                "ops-test",
                EventKind::PolicyDecision,
                Outcome::Allowed,
                format!("event {i}"),
            ))
            .unwrap();
    }
    let at = MetricsListen::Unix(dir.path().join("metrics.sock"));
    let mut body = String::new();
    wait_for("the log size gauge", || {
        body = scrape(&at).unwrap().1;
        sample(&body, "audit_log_events") == Some(3.0)
    });
    assert_eq!(sample(&body, "audit_appends_total"), Some(3.0), "{body}");
    assert_eq!(
        sample(&body, "audit_append_duration_seconds_count"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(sample(&body, "audit_ready"), Some(1.0), "{body}");
    for name in [
        "audit_checkpoint_age_seconds",
        "audit_unsigned_events",
        "audit_log_disk_bytes",
        "audit_append_failures_total",
    ] {
        assert!(sample(&body, name).is_some(), "{name} missing:\n{body}");
    }

    // The log's file system goes read-only: NOT_SERVING, then SERVING once it is back.
    let ro = ReadOnly::mount(&dir.path().join("log"));
    wait_for("NOT_SERVING", || health(&rt, &query) == 2);
    assert_eq!(sample(&scrape(&at).unwrap().1, "audit_ready"), Some(0.0));
    drop(ro);
    wait_for("SERVING again", || health(&rt, &query) == 1);
    // The change was logged, as JSON.
    let warned = lines
        .try_iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .any(|v| {
            v["level"] == "WARN"
                && v["fields"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("not writable"))
        });
    assert!(warned, "no NOT_SERVING warning with its reason");
}
