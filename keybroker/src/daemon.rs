//! `keybroker serve`: the running process. Opens the audit sink and the broker of the
//! configuration, listens on mutual TLS and on the Unix socket, and serves until SIGTERM or
//! SIGINT (or a listener fails), then lets in-flight requests finish for a bounded time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Broker, BrokerError, AUDIT_SERVICE};
use crate::config::{Config, ConfigError};
use crate::service::TlsFiles;

/// How long a stopping broker waits for open connections.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// The Unix socket's mode: anyone may connect. Callers are told apart by their
/// kernel-reported uid, and uids without a role are refused per request.
pub const SOCKET_MODE: u32 = 0o666;

/// Why the broker could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{target}: {source}")]
    Audit {
        target: Box<audit::local::AuditTarget>,
        #[source]
        source: Box<audit::AuditError>,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{}: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    ListenTcp {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ListenUnix(#[from] unix_listen::ListenError),
    #[error("{}: {source}", path.display())]
    UnixListener {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{listener} listener: {source}")]
    Server {
        listener: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("signals: {0}")]
    Signal(#[source] std::io::Error),
    #[error("metrics endpoint: {0}")]
    Metrics(#[source] std::io::Error),
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Opens the audit sink the configuration names, for the broker's events.
pub fn audit_sink(
    target: &audit::local::AuditTarget,
) -> Result<Arc<dyn audit::AuditSink>, ServeError> {
    target
        .open(AUDIT_SERVICE)
        .map_err(|source| ServeError::Audit {
            target: Box::new(target.clone()),
            source: Box::new(source),
        })
}

/// Reads the TLS listener's certificate, key and client CA.
pub fn tls_files(tls: &crate::config::TlsListener) -> Result<TlsFiles, ServeError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ServeError::TlsFile {
            path: p.to_path_buf(),
            source,
        })
    };
    Ok(TlsFiles {
        cert_pem: read(&tls.cert)?,
        key_pem: read(&tls.key)?,
        client_ca_pem: read(&tls.client_ca)?,
    })
}

/// Listens on the broker's Unix socket (mode [`SOCKET_MODE`]). A socket left by a broker
/// that died is replaced; a live one, or any other file, is refused.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let listener = unix_listen::bind(path, unix_listen::Access::mode(SOCKET_MODE))?;
    let tokio = || {
        listener.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(listener)
    };
    tokio().map_err(|source| {
        unix_listen::remove(path);
        ServeError::UnixListener {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Loads the configuration at `path` and serves it.
pub fn serve_file(path: &Path) -> Result<(), ServeError> {
    serve(Config::load(path)?)
}

/// Serves the broker of a configuration file, on another store than the file names.
pub fn serve_file_on(path: &Path, store: crate::store::StoreLocation) -> Result<(), ServeError> {
    let mut config = Config::load(path)?;
    config.broker.store = store;
    serve(config)
}

/// The gRPC health service names the broker's readiness under (and "").
pub const HEALTH_SERVICE: &str = "ipu.keybroker.v1.KeyBroker";

/// Serves the broker of `config` until SIGTERM or SIGINT.
pub fn serve(config: Config) -> Result<(), ServeError> {
    ops::logging::init(config.log_format, "KEYBROKER_LOG", "info");
    let metrics = Arc::new(crate::metrics::BrokerMetrics::new());
    let sink: Arc<dyn audit::AuditSink> = Arc::new(crate::metrics::MeteredSink::new(
        audit_sink(&config.audit)?,
        metrics.clone(),
    ));
    let broker = Arc::new(Broker::open(&config.broker, sink.clone())?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(run(broker, sink, metrics, &config))?;
    if let Some(unix) = &config.unix {
        unix_listen::remove(&unix.socket);
    }
    Ok(())
}

/// Ready when the store answers (a read of the key list) and the audit sink takes appends.
fn readiness(broker: Arc<Broker>, sink: Arc<dyn audit::AuditSink>) -> ops::health::Check {
    Arc::new(move || {
        broker
            .keys()
            .list()
            .map(drop)
            .map_err(|e| format!("store: {e}"))?;
        sink.ready()
    })
}

async fn run(
    broker: Arc<Broker>,
    sink: Arc<dyn audit::AuditSink>,
    metrics: Arc<crate::metrics::BrokerMetrics>,
    config: &Config,
) -> Result<(), ServeError> {
    let _metrics_endpoint = match &config.metrics_listen {
        Some(at) => {
            let server = ops::metrics::serve(at, metrics.registry())
                .await
                .map_err(ServeError::Metrics)?;
            eprintln!("keybroker: metrics on {}", server.local);
            Some(server.task)
        }
        None => None,
    };
    let (reporter, health) = ops::health::health_reporter();
    let gauge = metrics.clone();
    let readiness_task = ops::health::spawn_readiness(
        reporter,
        vec![HEALTH_SERVICE.into()],
        ops::health::CHECK_INTERVAL,
        readiness(broker.clone(), sink),
        move |ok| gauge.set_ready(ok),
    )
    .await;
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut servers = tokio::task::JoinSet::new();
    if let Some(tls) = &config.tls {
        let files = tls_files(tls)?;
        let listener = tokio::net::TcpListener::bind(tls.listen)
            .await
            .map_err(|source| ServeError::ListenTcp {
                addr: tls.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServeError::ListenTcp {
                addr: tls.listen,
                source,
            })?;
        eprintln!("keybroker: serving mutual TLS on {addr}");
        let mut stop = stop_tx.subscribe();
        let b = broker.clone();
        let h = health.clone();
        servers.spawn(async move {
            crate::service::serve_with_health(b, listener, files, Some(h), async move {
                let _ = stop.recv().await;
            })
            .await
            .map_err(|source| ServeError::Server {
                listener: "TLS",
                source,
            })
        });
    }
    if let Some(unix) = &config.unix {
        let listener = bind_unix(&unix.socket)?;
        eprintln!("keybroker: serving {}", unix.socket.display());
        let mut stop = stop_tx.subscribe();
        let b = broker.clone();
        let roles = unix.roles.clone();
        let h = health.clone();
        servers.spawn(async move {
            crate::service::serve_unix_with_health(b, listener, roles, Some(h), async move {
                let _ = stop.recv().await;
            })
            .await
            .map_err(|source| ServeError::Server {
                listener: "Unix",
                source,
            })
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signal)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        Some(r) = servers.join_next() => r??,
    }
    let _ = stop_tx.send(());
    readiness_task.abort();
    // In-flight requests finish; a client that keeps an idle connection open does not
    // hold the stop for longer than this.
    let drain = async {
        while let Some(r) = servers.join_next().await {
            r??;
        }
        Ok::<_, ServeError>(())
    };
    match tokio::time::timeout(DRAIN_DEADLINE, drain).await {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "keybroker: connections still open {} s after the stop; closing them",
                DRAIN_DEADLINE.as_secs()
            );
            servers.abort_all();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_open_to_all_uids_and_a_live_one_or_a_file_is_not_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/kb.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let live = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        let e = bind_unix(&path).unwrap_err().to_string();
        assert!(e.contains("another process is listening"), "{e}");
        drop(live);
        // Left by a broker that died: replaced.
        drop(bind_unix(&path).unwrap());
        unix_listen::remove(&path);
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        let e = bind_unix(&path).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(path.exists());
    }
}
