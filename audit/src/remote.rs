//! Clients of the log daemon ([`crate::service`]) for blocking callers: services append
//! through [`RemoteLog`]; the CLI queries through [`RemoteQuery`].

use std::path::{Path, PathBuf};

use api::audit::audit_query_client::AuditQueryClient;
use api::audit::audit_writer_client::AuditWriterClient;
use api::audit::{
    AppendRequest, AppendResponse, CheckpointRequest, EventRecord, InclusionProofRequest,
    QueryRequest, TailRequest,
};
use tonic::transport::Channel;

use crate::event::Event;
use crate::log::Receipt;
use crate::proof::InclusionBundle;
use crate::store::{Page, Query};
use crate::{AuditError, AuditLog};

/// Where audit events go: the log itself, or the daemon that owns it.
pub trait AuditSink: Send + Sync {
    /// Returns once the event is durable.
    fn append(&self, event: Event) -> Result<Receipt, AuditError>;

    /// Whether appends can be taken now (for readiness): what is wrong otherwise. Cheap
    /// enough to run every few seconds; appends nothing.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

impl AuditSink for AuditLog {
    fn append(&self, event: Event) -> Result<Receipt, AuditError> {
        AuditLog::append(self, event)
    }

    fn ready(&self) -> Result<(), String> {
        self.check_writable()
    }
}

fn unavailable(socket: &Path, e: impl std::fmt::Display) -> AuditError {
    AuditError::Io {
        path: socket.display().to_string(),
        message: format!("audit daemon: {e}"),
    }
}

fn from_status(s: tonic::Status) -> AuditError {
    match s.code() {
        tonic::Code::InvalidArgument => AuditError::Request(s.message().to_string()),
        code => AuditError::Daemon {
            code: code.to_string(),
            message: s.message().to_string(),
        },
    }
}

fn runtime(socket: &Path) -> Result<tokio::runtime::Runtime, AuditError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unavailable(socket, e))
}

/// One append handed to the client thread, and where its answer goes.
type AppendJob = (
    AppendRequest,
    std::sync::mpsc::Sender<Result<AppendResponse, tonic::Status>>,
);

/// Appends through the daemon's writer socket.
///
/// The gRPC client and its runtime live on a thread of their own, so a `RemoteLog` may be
/// used, and dropped, anywhere: from plain threads, from a service's blocking threads, and
/// inside another runtime's async context (where creating or dropping a runtime panics).
pub struct RemoteLog {
    socket: PathBuf,
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<AppendJob>>,
}

impl RemoteLog {
    pub fn connect(socket: &Path) -> Result<Self, AuditError> {
        let (jobs, queue) = std::sync::mpsc::channel::<AppendJob>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let path = socket.to_path_buf();
        std::thread::Builder::new()
            .name("audit-client".into())
            .spawn(move || {
                let connected = runtime(&path).and_then(|rt| {
                    rt.block_on(api::unix::connect(path.clone()))
                        .map(|channel| (rt, AuditWriterClient::new(channel)))
                        .map_err(|e| unavailable(&path, e))
                });
                let (rt, client) = match connected {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for (request, reply) in queue {
                    let mut client = client.clone();
                    let mut r = rt
                        .block_on(client.append(request.clone()))
                        .map(|r| r.into_inner());
                    // A daemon restarted since the last append: the channel's old connection
                    // is gone and the call fails with a transport error; the channel connects
                    // again for the next call, so that is made at once, once. (Only a daemon
                    // that died between appending and answering could then hold the event
                    // twice: recorded twice, never lost.)
                    let transport = |s: &tonic::Status| {
                        s.code() == tonic::Code::Unavailable
                            || (s.code() == tonic::Code::Unknown
                                && s.message().starts_with("transport error"))
                    };
                    if matches!(&r, Err(s) if transport(s)) {
                        r = rt.block_on(client.append(request)).map(|r| r.into_inner());
                    }
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| unavailable(socket, e))?;
        ready
            .recv()
            .map_err(|_| unavailable(socket, "the client thread stopped"))??;
        Ok(Self {
            socket: socket.to_path_buf(),
            jobs: std::sync::Mutex::new(jobs),
        })
    }
}

impl AuditSink for RemoteLog {
    fn append(&self, event: Event) -> Result<Receipt, AuditError> {
        event.validate()?;
        let request = AppendRequest {
            event_json: serde_json::to_vec(&event).expect("events serialize"),
        };
        let (reply, answer) = std::sync::mpsc::channel();
        let stopped = || unavailable(&self.socket, "the client thread stopped");
        self.jobs
            .lock()
            .expect("not poisoned")
            .send((request, reply))
            .map_err(|_| stopped())?;
        let r = answer.recv().map_err(|_| stopped())?.map_err(from_status)?;
        let leaf_hash = r
            .leaf_hash
            .try_into()
            .map_err(|_| unavailable(&self.socket, "a leaf hash that is not 32 bytes"))?;
        Ok(Receipt {
            seq: r.seq,
            time_ns: r.time_ns,
            leaf_hash,
        })
    }

    /// The daemon takes connections on its writer socket.
    fn ready(&self) -> Result<(), String> {
        std::os::unix::net::UnixStream::connect(&self.socket)
            .map(drop)
            .map_err(|e| format!("audit daemon {}: {e}", self.socket.display()))
    }
}

/// Queries through the daemon's read-only socket.
pub struct RemoteQuery {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
    client: AuditQueryClient<Channel>,
}

fn decode(socket: &Path, r: EventRecord) -> Result<Event, AuditError> {
    Event::from_canonical(&r.canonical).map_err(|e| unavailable(socket, e))
}

impl RemoteQuery {
    pub fn connect(socket: &Path) -> Result<Self, AuditError> {
        let rt = runtime(socket)?;
        let channel = rt
            .block_on(api::unix::connect(socket.to_path_buf()))
            .map_err(|e| unavailable(socket, e))?;
        Ok(Self {
            socket: socket.to_path_buf(),
            rt,
            client: AuditQueryClient::new(channel),
        })
    }

    pub fn query(&mut self, q: &Query) -> Result<Page, AuditError> {
        let request = QueryRequest {
            since_ns: q.since_ns,
            until_ns: q.until_ns,
            tenant: q.tenant.clone(),
            function: q.function.clone(),
            image_digest: q.image_digest.clone(),
            kind: q.kind.as_ref().map(|k| k.to_string()),
            outcome: q.outcome.map(|o| o.as_str().to_string()),
            after: q.after,
            limit: q.limit as u32,
        };
        let r = self
            .rt
            .block_on(self.client.query(request))
            .map_err(from_status)?
            .into_inner();
        Ok(Page {
            events: r
                .events
                .into_iter()
                .map(|e| decode(&self.socket, e))
                .collect::<Result<_, _>>()?,
            next: r.next,
        })
    }

    /// Calls `each` for every event from `from` on, following new ones until `each` returns
    /// false or the daemon stops.
    pub fn tail(
        &mut self,
        from: u64,
        mut each: impl FnMut(Event) -> bool,
    ) -> Result<(), AuditError> {
        let socket = self.socket.clone();
        let client = &mut self.client;
        self.rt.block_on(async {
            let mut stream = client
                .tail(TailRequest { from })
                .await
                .map_err(from_status)?
                .into_inner();
            while let Some(record) = stream.message().await.map_err(from_status)? {
                if !each(decode(&socket, record)?) {
                    break;
                }
            }
            Ok(())
        })
    }

    pub fn latest_checkpoint(&mut self) -> Result<String, AuditError> {
        Ok(self
            .rt
            .block_on(self.client.latest_checkpoint(CheckpointRequest {}))
            .map_err(from_status)?
            .into_inner()
            .note)
    }

    pub fn inclusion_proof(&mut self, index: u64) -> Result<InclusionBundle, AuditError> {
        let json = self
            .rt
            .block_on(self.client.inclusion_proof(InclusionProofRequest { index }))
            .map_err(from_status)?
            .into_inner()
            .bundle_json;
        serde_json::from_str(&json).map_err(|e| unavailable(&self.socket, e))
    }
}
