//! What operators get from a running service besides its API: readiness on the standard
//! gRPC health service (served on the API socket) and, when asked for, Prometheus metrics
//! on a separate local listener.
//!
//! Ready means a Prepare could succeed now: an attested key broker session is held, the
//! state directory takes a new file, and the audit sink takes appends
//! ([`Service::readiness`]), checked every [`ops::health::CHECK_INTERVAL`].

use std::sync::Arc;
use std::time::Duration;

use ops::health::{Health, HealthServer};
use ops::metrics::MetricsListen;

use super::Service;

/// The health service's name for the image service API (besides "", the whole server).
pub fn health_service_name() -> &'static str {
    <api::imagesvc::image_service_server::ImageServiceServer<super::grpc::Api> as tonic::server::NamedService>::NAME
}

/// The running readiness check and metrics endpoint; stopped when dropped.
pub struct Operations {
    /// Where metrics are served (the port chosen, for port 0).
    pub metrics_at: Option<MetricsListen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Operations {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts both on the current runtime (a metrics listener that cannot be bound fails);
/// returns them with the health service to serve on the API socket.
pub async fn start(
    service: &Arc<Service>,
    metrics_listen: Option<&MetricsListen>,
    check_every: Duration,
) -> std::io::Result<(Operations, HealthServer<impl Health>)> {
    let mut tasks = Vec::new();
    let metrics_at = match metrics_listen {
        Some(at) => {
            let server = ops::metrics::serve(at, service.metrics().registry()).await?;
            tracing::info!(listen = %server.local, "metrics endpoint");
            tasks.push(server.task);
            Some(server.local)
        }
        None => None,
    };
    let (reporter, health) = ops::health::health_reporter();
    let (checked, gauge) = (service.clone(), service.metrics().clone());
    tasks.push(
        ops::health::spawn_readiness(
            reporter,
            vec![health_service_name().to_string()],
            check_every,
            Arc::new(move || checked.readiness()),
            move |ok| gauge.set_ready(ok),
        )
        .await,
    );
    Ok((Operations { metrics_at, tasks }, health))
}
