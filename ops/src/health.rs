//! Readiness on the standard gRPC health service (`grpc.health.v1.Health`): a check run
//! every [`CHECK_INTERVAL`] sets the overall status ("") and each named service's to
//! SERVING or NOT_SERVING. Changes are logged with the reason, once per change.

use std::sync::Arc;
use std::time::Duration;

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

pub use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
pub use tonic_health::pb::health_client::HealthClient;
pub use tonic_health::pb::health_server::{Health, HealthServer};
pub use tonic_health::pb::HealthCheckRequest;
pub use tonic_health::server::{health_reporter, HealthReporter as Reporter};

/// How often readiness is checked.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// What readiness is made of: each check names what it found wrong.
pub type Check = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Registers "" and `services` as NOT_SERVING (so that a check never finds a service
/// unknown), then runs `check` now and every `every` (on a blocking thread: checks touch the
/// disk and sockets), setting them to its verdict. `on_change` sees each new verdict (a
/// readiness gauge, say). Abort the returned task to stop.
pub async fn spawn_readiness(
    mut reporter: HealthReporter,
    services: Vec<String>,
    every: Duration,
    check: Check,
    on_change: impl Fn(bool) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    for name in std::iter::once("").chain(services.iter().map(String::as_str)) {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    tokio::spawn(async move {
        let mut last: Option<Result<(), String>> = None;
        loop {
            let c = check.clone();
            let verdict = tokio::task::spawn_blocking(move || c())
                .await
                .unwrap_or_else(|e| Err(format!("the readiness check failed: {e}")));
            if last.as_ref() != Some(&verdict) {
                let status = match &verdict {
                    Ok(()) => {
                        tracing::info!("ready: serving");
                        ServingStatus::Serving
                    }
                    Err(why) => {
                        tracing::warn!(reason = %why, "not ready: NOT_SERVING");
                        ServingStatus::NotServing
                    }
                };
                for name in std::iter::once("").chain(services.iter().map(String::as_str)) {
                    reporter.set_service_status(name, status).await;
                }
                on_change(verdict.is_ok());
                last = Some(verdict);
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// Checks that `dir` takes a new file: creates and removes `dir/.ready-probe` (a read-only
/// or full file system, or a directory gone, fails it).
pub fn dir_writable(dir: &std::path::Path) -> Result<(), String> {
    let probe = dir.join(".ready-probe");
    let written = std::fs::write(&probe, b"ready\n");
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| format!("{} is not writable: {e}", dir.display()))
}
