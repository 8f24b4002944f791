//! Tamper-evident audit log: append-only events in sled, an RFC 9162 Merkle tree over their
//! canonical bytes, signed checkpoints (C2SP tlog-checkpoint in a signed note, Ed25519),
//! inclusion and consistency proofs, and indexed queries.
//!
//! - [`event`]: the event model (identifiers only, never key material).
//! - [`merkle`]: RFC 9162 hashing and proofs, checked against the CT reference vectors.
//! - [`checkpoint`]: checkpoint bodies, signed notes, signer and verifier keys.
//! - [`chunk`]: the stored form of one group commit's events.
//! - [`store`]: the sled layout and read side (events, nodes, checkpoints, queries).
//! - [`local`]: opening a service's own log with its key created on first use.
//! - [`log`]: the writer: group commit, checkpoints only after a consistency check.
//! - [`verify`]: full verification that names the first bad index.
//! - [`proof`]: self-contained inclusion proofs an auditor verifies offline.
//! - [`service`]: the log daemon (gRPC on a writer socket and a read-only query socket).
//! - [`remote`]: its clients; [`remote::AuditSink`] is what services write to.
//! - [`cli`]: the operations of the `audit` command line and their output.
//!
//! Key material cannot be put into an event: key types implement neither `Serialize` nor
//! `Into<KeyId>`. This does not compile:
//!
//! ```compile_fail
//! let key = ocicrypt::keys::PrivateKey::from_pem(b"").unwrap();
//! let _ = serde_json::to_vec(&key);
//! ```
//!
//! while the same setup without serialization does (so the failures above are about
//! `Serialize` and `KeyId`, not a missing crate):
//!
//! ```no_run
//! let key = ocicrypt::keys::PrivateKey::from_pem(b"").unwrap();
//! let _ = key.algorithm();
//! let _ = serde_json::to_vec(&audit::KeyId::new("broker/layer-key-1").unwrap());
//! ```
//!
//! and neither does this:
//!
//! ```compile_fail
//! let key = ocicrypt::keys::PrivateKey::from_pem(b"").unwrap();
//! let _ = audit::event::Event::new("svc", audit::event::EventKind::KeyRelease,
//!     audit::event::Outcome::Allowed, "").key_id(key.into());
//! ```

pub mod checkpoint;
pub mod chunk;
pub mod cli;
pub mod cmdline;
pub mod config;
pub mod event;
pub mod local;
pub mod log;
pub mod merkle;
pub mod metrics;
pub mod proof;
pub mod remote;
pub mod service;
pub mod store;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointSigner, NoteVerifier};
pub use event::{Event, EventKind, KeyId, Outcome};
pub use log::{AuditLog, CheckpointStatus, LogOptions, Receipt};
pub use remote::{AuditSink, RemoteLog, RemoteQuery};
pub use store::{Page, Query, Store};

use std::path::Path;

#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditError {
    /// A request the log refuses (bad arguments, nothing to prove yet); the caller's to fix.
    #[error("invalid request: {0}")]
    Request(String),
    /// An event the log refuses to store.
    #[error("invalid request: {0}")]
    InvalidEvent(#[from] event::EventError),
    /// The log's own storage (sled) failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The log daemon answered with an error other than a refused request.
    #[error("storage: audit daemon: {code}: {message}")]
    Daemon { code: String, message: String },
    /// The daemon's gRPC server stopped with an error.
    #[error("storage: gRPC server: {0}")]
    Server(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// A daemon socket could not be bound.
    #[error(transparent)]
    Listen(std::sync::Arc<unix_listen::ListenError>),
    #[error("the audit log in {0} is held by another process")]
    Busy(String),
    #[error("the log is corrupt at event {index}: {reason}")]
    Corrupt { index: u64, reason: String },
    #[error("the audit log is closed")]
    Closed,
}

impl AuditError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        AuditError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

impl From<sled::Error> for AuditError {
    fn from(e: sled::Error) -> Self {
        AuditError::Storage(e.to_string())
    }
}
