//! `keybroker serve` as an operator runs it: a config file with `log_format = "json"` and
//! `metrics_listen`, the standard gRPC health service on its Unix socket (SERVING while the
//! store answers and the audit log takes appends), and `/metrics` counting its audited
//! decisions (here: administration through the socket) by kind and outcome only.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_logs_json_exports_metrics_and_reports_health() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let metrics = d.join("metrics.sock");
    std::fs::write(
        d.join("keybroker.toml"),
        format!(
            "state_dir = \"state\"\nlog_format = \"json\"\nmetrics_listen = \"unix:{}\"\n[unix]\nsocket = \"kb.sock\"\n",
            metrics.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .args(["serve", "--config"])
        .arg(d.join("keybroker.toml"))
        .env("KEYBROKER_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = d.join("kb.sock");
    wait_for("the broker's socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let health = || {
        rt.block_on(async {
            let channel = api::unix::connect(socket.clone()).await.unwrap();
            ops::health::HealthClient::new(channel)
                .check(ops::health::HealthCheckRequest {
                    service: keybroker::daemon::HEALTH_SERVICE.into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1)
        })
    };
    let serving = ops::health::WireStatus::Serving as i32;
    wait_for("SERVING", || health() == serving);

    // An administrator's change through the socket: one audited decision.
    let out = Command::new(env!("CARGO_BIN_EXE_keybroker"))
        .arg("--socket")
        .arg(&socket)
        .args(["keys", "create", "--id", "acme-kek", "--kind", "ec-p256"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let at: ops::metrics::MetricsListen = format!("unix:{}", metrics.display()).parse().unwrap();
    let (status, body) = ops::metrics::scrape(&at).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        ops::metrics::sample(
            &body,
            r#"keybroker_decisions_total{kind="admin.key_create",outcome="success",reason=""}"#
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        ops::metrics::sample(&body, "keybroker_ready"),
        Some(1.0),
        "{body}"
    );
    assert!(!body.contains("acme-kek"), "no key id in labels: {body}");

    // SIGTERM; the log lines are JSON objects.
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let logs =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let json: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        json.iter()
            .any(|v| v["level"].is_string() && v["fields"]["message"].is_string()),
        "{logs}"
    );
}
