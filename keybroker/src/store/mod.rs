//! The broker's state behind one interface, [`Store`], with two implementations: sled in
//! the state directory (the embedded default, [`sled`]) and PostgreSQL (the production
//! store shared by several broker replicas, [`postgres`]).
//!
//! What a store holds, and nothing more:
//! - KEK records: each version of each key-encryption key as the key store seals it (the
//!   private key is AES-256-GCM sealed under the master key *before* it reaches the store,
//!   so the store's contents open nothing without the master key);
//! - IPU enrollments and their revocations;
//! - the running deployment policy bundle (its signed bytes) and its version, installed by
//!   compare-and-set on the version (anti-rollback across replicas);
//! - attestation nonces, each consumed once (only their SHA-256 is kept);
//! - sessions: public material only (id, IPU, client identity, session public key, binding
//!   salt, expiry).
//!
//! A store error names its operation; callers treat it as an operational failure (never a
//! grant, never a denial).

pub mod postgres;
pub mod sled;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A failed store operation: which one, and why. An operational failure for every caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{store} store: {operation}: {message}")]
pub struct StoreError {
    pub store: &'static str,
    pub operation: &'static str,
    pub message: String,
}

impl StoreError {
    pub fn new(store: &'static str, operation: &'static str, message: impl ToString) -> Self {
        Self {
            store,
            operation,
            message: message.to_string(),
        }
    }
}

/// An attested session as the store keeps it: public material only.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub ipu_id: String,
    pub ipu_class: String,
    /// The client certificate identity that attested.
    pub client: String,
    /// The IPU's ephemeral public key (SEC1), what releases are sealed to.
    pub session_public: Vec<u8>,
    /// SHA-256(nonce || session public key), the release's KDF salt (public).
    pub salt: [u8; 32],
    pub expires: SystemTime,
}

impl std::fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecord")
            .field("id", &self.id)
            .field("ipu_id", &self.ipu_id)
            .field("ipu_class", &self.ipu_class)
            .field("client", &self.client)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// The broker's state. Every method is one atomic operation of the store.
pub trait Store: Send + Sync {
    /// `sled` or `postgres`, for messages.
    fn kind(&self) -> &'static str;

    // KEK records (opaque, sealed by the key store).
    /// Adds a key version's record; false when that version exists already.
    fn insert_key_record(&self, id: &str, version: u32, record: &[u8]) -> Result<bool, StoreError>;
    /// Rewrites an existing key version's record (revocation).
    fn replace_key_record(&self, id: &str, version: u32, record: &[u8]) -> Result<(), StoreError>;
    fn key_record(&self, id: &str, version: u32) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every version's record of one key, oldest first.
    fn key_records(&self, id: &str) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Every version of every key, by id then version.
    fn all_key_records(&self) -> Result<Vec<Vec<u8>>, StoreError>;

    // IPU enrollments (and revocations: a revoked enrollment is rewritten).
    fn put_enrollment(&self, ipu_id: &str, record: &[u8]) -> Result<(), StoreError>;
    fn enrollment(&self, ipu_id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every enrollment: (IPU id, record).
    fn enrollments(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    // The running policy bundle.
    /// The running bundle's signed bytes, verified by the caller.
    fn running_bundle(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// The running bundle's version (as installed), without its bytes.
    fn running_bundle_version(&self) -> Result<Option<u64>, StoreError>;
    /// Records `bytes` (verified, of `version`) as the running bundle if the running one is
    /// still `expected` (`None`: none yet); false when another install came first.
    fn install_bundle(
        &self,
        expected: Option<u64>,
        version: u64,
        bytes: &[u8],
    ) -> Result<bool, StoreError>;

    // Attestation nonces (by their SHA-256).
    fn issue_nonce(&self, nonce_hash: &[u8; 32], lifetime: Duration) -> Result<(), StoreError>;
    /// True once per issued, unexpired nonce, whichever replica asks.
    fn consume_nonce(&self, nonce_hash: &[u8; 32]) -> Result<bool, StoreError>;

    // Sessions.
    fn put_session(&self, session: &SessionRecord) -> Result<(), StoreError>;
    /// An unexpired session.
    fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Ends every session of an IPU (it was revoked).
    fn end_sessions_of(&self, ipu_id: &str) -> Result<(), StoreError>;
}

/// Where the broker's state lives.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum StoreLocation {
    /// sled in the state directory (the embedded default).
    #[default]
    Sled,
    /// A PostgreSQL connection string (`postgres://...` or `host=... dbname=...`).
    Postgres(String),
}

impl std::fmt::Debug for StoreLocation {
    // A connection string may carry a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sled => f.write_str("Sled"),
            StoreLocation::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl std::str::FromStr for StoreLocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "sled" {
            Ok(StoreLocation::Sled)
        } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(s.to_string()))
        } else {
            Err("a store is `sled` (the state directory) or a postgres:// URL".into())
        }
    }
}

/// Opens the store of a location (the sled store in `state_dir`).
pub fn open(
    location: &StoreLocation,
    state_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match location {
        StoreLocation::Sled => std::sync::Arc::new(sled::SledStore::open(state_dir)?),
        StoreLocation::Postgres(url) => {
            let store = postgres::PgStore::connect(url)?;
            store.check_schema()?;
            std::sync::Arc::new(store)
        }
    })
}

/// Nonces and sessions of one process (the sled store's, and a store-less verifier's):
/// behaviour as before the store existed.
#[derive(Default)]
pub(crate) struct Ephemeral {
    nonces: Mutex<HashMap<[u8; 32], SystemTime>>,
    sessions: Mutex<HashMap<String, SessionRecord>>,
}

impl Ephemeral {
    pub(crate) fn issue_nonce(&self, nonce_hash: &[u8; 32], lifetime: Duration) {
        let now = SystemTime::now();
        let mut issued = self.nonces.lock().expect("not poisoned");
        issued.retain(|_, expires| *expires > now);
        issued.insert(*nonce_hash, now + lifetime);
    }

    pub(crate) fn consume_nonce(&self, nonce_hash: &[u8; 32]) -> bool {
        let mut issued = self.nonces.lock().expect("not poisoned");
        issued
            .remove(nonce_hash)
            .is_some_and(|expires| expires > SystemTime::now())
    }

    pub(crate) fn put_session(&self, session: &SessionRecord) {
        let now = SystemTime::now();
        let mut sessions = self.sessions.lock().expect("not poisoned");
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(session.id.clone(), session.clone());
    }

    pub(crate) fn session(&self, id: &str) -> Option<SessionRecord> {
        self.sessions
            .lock()
            .expect("not poisoned")
            .get(id)
            .filter(|s| s.expires > SystemTime::now())
            .cloned()
    }

    pub(crate) fn end_sessions_of(&self, ipu_id: &str) {
        self.sessions
            .lock()
            .expect("not poisoned")
            .retain(|_, s| s.ipu_id != ipu_id);
    }
}

/// The version a signed policy bundle claims, read without verifying it: the sled store's
/// compare-and-set compares the running file's version (its bytes were verified when they
/// were installed, and are verified again whenever they are read for use).
pub(crate) fn claimed_bundle_version(bytes: &[u8]) -> Option<u64> {
    use base64::Engine;
    let envelope: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope.get("payload")?.as_str()?)
        .ok()?;
    let content: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    content.get("version")?.as_u64()
}

/// Where a store keeps the running bundle, for messages.
pub(crate) fn bundle_place(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("policy").join("running.bundle")
}
