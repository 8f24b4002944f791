//! `ipu-image-svc serve` as a library: the policy bundle installed (and audited) once, the
//! IPU attested to the broker, the service started, its API served on a Unix socket until
//! SIGTERM or SIGINT, then every clone torn down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use audit::local::AuditTarget;

use super::{PipelineFactory, Service, ServiceError, ServiceOptions, TcpExports};
use crate::error::Error;
use crate::keys::broker_client::{BrokerKeys, BrokerSettings};
use crate::keys::KeySource;
use crate::pipeline::PipelineConfig;
use crate::record::AUDIT_SERVICE;
use crate::verify::Deployment;

/// Everything `serve` takes.
pub struct DaemonConfig {
    pub service: ServiceOptions,
    /// The API socket.
    pub socket: PathBuf,
    pub policy_bundle: PathBuf,
    pub bundle_keys: Vec<PathBuf>,
    pub bundle_state: PathBuf,
    pub cache: PathBuf,
    pub audit: AuditTarget,
    pub insecure_http: Vec<String>,
    pub broker: BrokerSettings,
    /// Serve Prometheus metrics here (off when None).
    pub metrics_listen: Option<ops::metrics::MetricsListen>,
}

/// TLS exports: the certificate chain, key and client CA files.
pub struct TcpExportFiles {
    pub ip: std::net::IpAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl TcpExportFiles {
    pub fn load(&self) -> Result<TcpExports, Error> {
        Ok(TcpExports {
            ip: self.ip,
            tls: crate::export::tls::server_config(&self.cert, &self.key, &self.client_ca)
                .map_err(|e| Error::invalid(e.to_string()))?,
        })
    }
}

/// Runs the service until it is stopped.
pub fn run(cfg: DaemonConfig) -> Result<(), ServiceError> {
    let sink = cfg
        .audit
        .open(AUDIT_SERVICE)
        .map_err(|e| Error::invalid(format!("{}: {e}", cfg.audit)))?;
    let bundle = crate::policy_bundle::install(
        &cfg.policy_bundle,
        &cfg.bundle_keys,
        &cfg.bundle_state,
        sink.as_ref(),
    )?;
    let settings = cfg.broker.clone();
    // Attested now, so that a broker or TPM problem stops the start; the session is renewed
    // before it expires, or when the broker no longer knows it.
    let broker = Arc::new(
        BrokerKeys::attest(&settings)
            .map_err(|e| Error::from(e).context(format!("key broker {}", settings.replicas())))?,
    );
    let image_trust = bundle.image_trust;
    let deployment = Arc::new(bundle.deployment);
    let grant_policy = deployment.clone();
    let (cache, insecure, factory_sink) =
        (cfg.cache.clone(), cfg.insecure_http.clone(), sink.clone());
    let class_source = broker.clone();
    let factory: PipelineFactory = Box::new(move |tenant, function| {
        let ipu_class = class_source
            .ipu_class()
            .map_err(|e| Error::from(e).context(format!("key broker {}", settings.replicas())))?;
        let mut pipeline = PipelineConfig::new(image_trust.clone(), cache.clone());
        pipeline.audit = Some(factory_sink.clone());
        pipeline.tenant = Some(tenant.to_string());
        pipeline.function = Some(function.to_string());
        pipeline.source.insecure_http_hosts = insecure.clone();
        pipeline.deployment = Some(Deployment {
            policy: deployment.clone(),
            ipu_class: Some(ipu_class),
        });
        Ok(pipeline)
    });
    let host_agent_uid = cfg.service.host_agent_uid;
    let grants_dir = cfg.service.state_dir.join("grants");
    let mut service = Service::start(
        cfg.service,
        factory,
        KeySource::Broker(broker.clone()),
        sink,
    )?;
    if grant_policy.grants_required() {
        // The grant names the IPU by the identity the broker enrolled it under.
        let ipu = broker
            .ipu_id()
            .map_err(|e| Error::from(e).context("key broker: this IPU's enrolled identity"))?;
        // Pruned by the gate as it goes (the first admission prunes what a previous run left).
        let serials = crate::grant::SerialStore::open(&grants_dir).map_err(|e| match e {
            crate::grant::GrantRefusal::Store { path, source } => {
                ServiceError::storage("placement grant serials", &path, source)
            }
            other => ServiceError::Refused(other.to_string()),
        })?;
        tracing::info!(ipu = %ipu, "placement grants required by the running policy");
        service = service.with_grant_gate(crate::grant::GrantGate::new(grant_policy, ipu, serials));
    }
    let service = Arc::new(service);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServiceError::device("cannot start the runtime", e))?;
    rt.block_on(async {
        let listen_error = |e: std::io::Error| {
            ServiceError::device(format!("cannot listen on {}", cfg.socket.display()), e)
        };
        // Callers are checked by uid on every request; the mode keeps others out anyway.
        let listener = unix_listen::bind(
            &cfg.socket,
            unix_listen::Access::owner_only(Some(host_agent_uid)),
        )
        .map_err(|e| ServiceError::device("the API socket", std::io::Error::other(e)))?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(listen_error)?;
        let reaper = {
            let service = service.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let s = service.clone();
                    let _ = tokio::task::spawn_blocking(move || s.reap_expired()).await;
                }
            })
        };
        let (operations, health) = super::operations::start(
            &service,
            cfg.metrics_listen.as_ref(),
            ops::health::CHECK_INTERVAL,
        )
        .await
        .map_err(|e| ServiceError::device("the metrics endpoint", e))?;
        eprintln!("ipu-image-svc: serving {}", cfg.socket.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ServiceError::device("cannot handle SIGTERM", e))?;
        let stopping = service.clone();
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            // Tear down (and erase) every clone, then end the event streams, so the
            // server's graceful stop does not wait on them.
            let _ = tokio::task::spawn_blocking(move || stopping.shutdown()).await;
        };
        let served =
            super::grpc::serve_with_health(service.clone(), listener, host_agent_uid, health, stop)
                .await;
        drop(operations);
        reaper.abort();
        unix_listen::remove(&cfg.socket);
        served.map_err(|e| ServiceError::device("the API", std::io::Error::other(e)))
    })
}
