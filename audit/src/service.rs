//! The log daemon: one process owns the log and serves it over gRPC on two Unix sockets,
//! a writer socket (mode 0600: the services of this machine append through it) and a
//! read-only query socket (mode 0660: auditors query, follow and get proofs). The query
//! socket has no append method at all.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api::audit::audit_query_server::{AuditQuery, AuditQueryServer};
use api::audit::audit_writer_server::{AuditWriter, AuditWriterServer};
use api::audit::{
    AppendRequest, AppendResponse, CheckpointRequest, CheckpointResponse, ConsistencyProofRequest,
    ConsistencyProofResponse, EventRecord, InclusionProofRequest, InclusionProofResponse,
    QueryRequest, QueryResponse, TailRequest,
};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

use crate::event::Event;
use crate::metrics::LogMetrics;
use crate::proof::InclusionBundle;
use crate::store::Query;
use crate::{AuditError, AuditLog};

fn status(e: AuditError) -> Status {
    match e {
        AuditError::Request(m) => Status::invalid_argument(m),
        AuditError::InvalidEvent(e) => Status::invalid_argument(e.to_string()),
        AuditError::Closed => Status::unavailable("the audit log is closing"),
        other => Status::internal(other.to_string()),
    }
}

/// Runs blocking log work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("audit task failed: {e}")))?
        .map_err(status)
}

struct Writer {
    log: Arc<AuditLog>,
    metrics: Arc<LogMetrics>,
    /// The uids that may append (besides root and the daemon's own uid).
    writers: Vec<u32>,
}

impl Writer {
    /// The caller's uid, from the kernel (SO_PEERCRED), must be root, the daemon's, or one
    /// named with `--writer-uid`: the socket's mode is not the only barrier.
    #[allow(clippy::result_large_err)]
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let uid = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid())
            .ok_or_else(|| Status::unauthenticated("no peer credentials"))?;
        let own = rustix::process::geteuid().as_raw();
        if uid == 0 || uid == own || self.writers.contains(&uid) {
            return Ok(());
        }
        tracing::warn!(
            uid,
            "append refused: this uid may not write to the audit log"
        );
        Err(Status::permission_denied(format!(
            "uid {uid} may not append to this audit log"
        )))
    }
}

impl Writer {
    async fn append_one(&self, request: Request<AppendRequest>) -> Result<crate::Receipt, Status> {
        self.authorize(&request)?;
        let event: Event = serde_json::from_slice(&request.get_ref().event_json).map_err(|e| {
            Status::invalid_argument(format!("event_json is not an audit event: {e}"))
        })?;
        let log = self.log.clone();
        blocking(move || log.append(event)).await
    }
}

#[tonic::async_trait]
impl AuditWriter for Writer {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let started = std::time::Instant::now();
        let appended = self.append_one(request).await;
        self.metrics.appended(appended.is_ok(), started.elapsed());
        let r = appended?;
        Ok(Response::new(AppendResponse {
            seq: r.seq,
            time_ns: r.time_ns,
            leaf_hash: r.leaf_hash.to_vec(),
        }))
    }
}

struct Reader {
    log: Arc<AuditLog>,
}

// tonic's handlers return `Status` by value; boxing it here would only move the copy.
#[allow(clippy::result_large_err)]
fn parse_query(r: &QueryRequest) -> Result<Query, Status> {
    Ok(Query {
        since_ns: r.since_ns,
        until_ns: r.until_ns,
        tenant: r.tenant.clone(),
        function: r.function.clone(),
        image_digest: r.image_digest.clone(),
        kind: r
            .kind
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: crate::event::EventError| Status::invalid_argument(e.to_string()))?,
        outcome: r
            .outcome
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: crate::event::EventError| Status::invalid_argument(e.to_string()))?,
        after: r.after,
        limit: if r.limit == 0 { 100 } else { r.limit as usize },
    })
}

#[tonic::async_trait]
impl AuditQuery for Reader {
    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let q = parse_query(request.get_ref())?;
        let log = self.log.clone();
        let page = blocking(move || log.store().query(&q)).await?;
        Ok(Response::new(QueryResponse {
            events: page
                .events
                .iter()
                .map(|e| EventRecord {
                    seq: e.seq,
                    canonical: e.to_canonical(),
                })
                .collect(),
            next: page.next,
        }))
    }

    type TailStream = ReceiverStream<Result<EventRecord, Status>>;

    async fn tail(
        &self,
        request: Request<TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let mut from = request.get_ref().from;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let log = self.log.clone();
        tokio::spawn(async move {
            loop {
                let store_log = log.clone();
                let batch = blocking(move || {
                    let size = store_log.store().size()?;
                    store_log.store().events_range(from, size.min(from + 1024))
                })
                .await;
                match batch {
                    Ok(events) if events.is_empty() => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(events) => {
                        for (seq, canonical) in events {
                            from = seq + 1;
                            if tx.send(Ok(EventRecord { seq, canonical })).await.is_err() {
                                return; // the client went away
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn latest_checkpoint(
        &self,
        _: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        let log = self.log.clone();
        let note = blocking(move || log.checkpoint()).await?;
        Ok(Response::new(CheckpointResponse { note }))
    }

    async fn inclusion_proof(
        &self,
        request: Request<InclusionProofRequest>,
    ) -> Result<Response<InclusionProofResponse>, Status> {
        let index = request.get_ref().index;
        let log = self.log.clone();
        let bundle = blocking(move || {
            log.checkpoint()?;
            InclusionBundle::build(log.store(), index)
        })
        .await?;
        Ok(Response::new(InclusionProofResponse {
            bundle_json: serde_json::to_string(&bundle).expect("bundles serialize"),
        }))
    }

    async fn consistency_proof(
        &self,
        request: Request<ConsistencyProofRequest>,
    ) -> Result<Response<ConsistencyProofResponse>, Status> {
        let (old, new) = (request.get_ref().old_size, request.get_ref().new_size);
        let log = self.log.clone();
        let proof = blocking(move || log.store().consistency_proof(old, new)).await?;
        Ok(Response::new(ConsistencyProofResponse {
            hashes: proof.iter().map(|h| h.to_vec()).collect(),
        }))
    }
}

/// Listens on `path` with `mode` (a socket left by a previous run is replaced: we hold the
/// log's lock, so nobody serves it).
fn bind(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, AuditError> {
    let listener = unix_listen::bind(path, unix_listen::Access { mode, owner: None })
        .map_err(|e| AuditError::Listen(Arc::new(e)))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| AuditError::io(path, e))?;
    tokio::net::UnixListener::from_std(listener).map_err(|e| AuditError::io(path, e))
}

/// What operators get besides the sockets: metrics, and how often readiness is checked.
#[derive(Clone, Debug)]
pub struct Operations {
    /// Serve `GET /metrics` here (off when None).
    pub metrics_listen: Option<ops::metrics::MetricsListen>,
    /// How often the health service's readiness (the log open and writable) is checked.
    pub check_interval: Duration,
}

impl Default for Operations {
    fn default() -> Self {
        Self {
            metrics_listen: None,
            check_interval: ops::health::CHECK_INTERVAL,
        }
    }
}

/// The name the query socket's health service reports the log under (besides ""): the
/// query service's gRPC name, `ipu.audit.v1.AuditQuery`.
pub const HEALTH_SERVICE: &str = <AuditQueryServer<Reader> as tonic::server::NamedService>::NAME;

/// Serves `log` until SIGTERM or SIGINT; `ready` is called once both sockets listen. Appends
/// are taken from root, this process's uid and `writers` only. The query socket also serves
/// `grpc.health.v1.Health`: SERVING while the log is open and writable.
pub fn serve(
    log: Arc<AuditLog>,
    writer_socket: &Path,
    query_socket: &Path,
    writers: &[u32],
    operations: &Operations,
    ready: impl FnOnce(),
) -> Result<(), AuditError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| AuditError::io(writer_socket, e))?;
    rt.block_on(async {
        let writer = bind(writer_socket, 0o600)?;
        let query = bind(query_socket, 0o660)?;
        let metrics = Arc::new(LogMetrics::new());
        let endpoint = match &operations.metrics_listen {
            Some(at) => {
                let server = ops::metrics::serve(at, metrics.registry())
                    .await
                    .map_err(|e| AuditError::Server(format!("metrics endpoint: {e}")))?;
                tracing::info!(listen = %server.local, "metrics endpoint");
                Some(server.task)
            }
            None => None,
        };
        let (reporter, health) = ops::health::health_reporter();
        let readiness = {
            let (log, metrics, gauge) = (log.clone(), metrics.clone(), metrics.clone());
            ops::health::spawn_readiness(
                reporter,
                vec![HEALTH_SERVICE.into()],
                operations.check_interval,
                Arc::new(move || {
                    metrics.observe(&log);
                    log.check_writable()
                }),
                move |ok| gauge.set_ready(ok),
            )
            .await
        };
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut stop_writer = stop_tx.subscribe();
        let mut stop_query = stop_tx.subscribe();
        let writer_server = tonic::transport::Server::builder()
            .add_service(AuditWriterServer::new(Writer {
                log: log.clone(),
                metrics: metrics.clone(),
                writers: writers.to_vec(),
            }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(writer), async move {
                let _ = stop_writer.recv().await;
            });
        let query_server = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(AuditQueryServer::new(Reader { log: log.clone() }))
            .serve_with_incoming_shutdown(UnixListenerStream::new(query), async move {
                let _ = stop_query.recv().await;
            });
        ready();
        let servers = async { tokio::try_join!(writer_server, query_server) };
        tokio::pin!(servers);
        tokio::select! {
            r = &mut servers => r.map(|_| ()).map_err(|e| AuditError::Server(e.to_string()))?,
            _ = shutdown => {
                let _ = stop_tx.send(());
                // In-flight appends finish; idle clients that never read the GOAWAY (a
                // blocked caller's runtime, say) do not keep the daemon up.
                let _ = tokio::time::timeout(Duration::from_secs(3), servers).await;
            }
        }
        readiness.abort();
        if let Some(task) = endpoint {
            task.abort();
        }
        Ok::<(), AuditError>(())
    })?;
    log.close();
    Ok(())
}
