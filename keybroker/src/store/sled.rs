//! The embedded store: sled in the broker's state directory (`keys.db`: trees `keys` and
//! `ipus`), the running policy bundle as a file (`policy/running.bundle`), nonces and
//! sessions in this process's memory. One broker process owns the directory (sled locks it).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::{claimed_bundle_version, Ephemeral, SessionRecord, Store, StoreError};

pub struct SledStore {
    db: sled::Db,
    keys: sled::Tree,
    ipus: sled::Tree,
    bundle: PathBuf,
    /// Serializes bundle installs (compare-and-set on the file).
    installing: Mutex<()>,
    ephemeral: Ephemeral,
}

fn err(operation: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |e| StoreError::new("sled", operation, e)
}

/// The record name of a key version: `id NUL version(BE)`; a prefix scan finds every
/// version of an id in order, and ids cannot contain NUL.
fn record_name(id: &str, version: u32) -> Vec<u8> {
    let mut k = prefix(id);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn prefix(id: &str) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(0);
    k
}

impl SledStore {
    /// Opens (creating) the store of a state directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // A previous holder's background flusher may still hold sled's lock for a moment.
        let start = std::time::Instant::now();
        let db = loop {
            match sled::open(dir.join("keys.db")) {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("lock")
                        && start.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(err("open")(e)),
            }
        };
        let keys = db.open_tree("keys").map_err(err("open"))?;
        let ipus = db.open_tree("ipus").map_err(err("open"))?;
        Ok(Self {
            db,
            keys,
            ipus,
            bundle: super::bundle_place(dir),
            installing: Mutex::new(()),
            ephemeral: Ephemeral::default(),
        })
    }

    fn read_bundle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(&self.bundle) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::new(
                "sled",
                "read the running policy bundle",
                format!("{}: {e}", self.bundle.display()),
            )),
        }
    }
}

impl Store for SledStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    fn insert_key_record(&self, id: &str, version: u32, record: &[u8]) -> Result<bool, StoreError> {
        let swapped = self
            .keys
            .compare_and_swap(
                record_name(id, version),
                None as Option<&[u8]>,
                Some(record),
            )
            .map_err(err("insert a key record"))?;
        self.db.flush().map_err(err("insert a key record"))?;
        Ok(swapped.is_ok())
    }

    fn replace_key_record(&self, id: &str, version: u32, record: &[u8]) -> Result<(), StoreError> {
        self.keys
            .insert(record_name(id, version), record)
            .map_err(err("replace a key record"))?;
        self.db.flush().map_err(err("replace a key record"))?;
        Ok(())
    }

    fn key_record(&self, id: &str, version: u32) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .keys
            .get(record_name(id, version))
            .map_err(err("read a key record"))?
            .map(|v| v.to_vec()))
    }

    fn key_records(&self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.keys
            .scan_prefix(prefix(id))
            .map(|r| r.map(|(_, v)| v.to_vec()).map_err(err("read key records")))
            .collect()
    }

    fn all_key_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.keys
            .iter()
            .map(|r| r.map(|(_, v)| v.to_vec()).map_err(err("list key records")))
            .collect()
    }

    fn put_enrollment(&self, ipu_id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.ipus
            .insert(ipu_id.as_bytes(), record)
            .and_then(|_| self.ipus.flush())
            .map_err(err("write an enrollment"))?;
        Ok(())
    }

    fn enrollment(&self, ipu_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .ipus
            .get(ipu_id.as_bytes())
            .map_err(err("read an enrollment"))?
            .map(|v| v.to_vec()))
    }

    fn enrollments(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.ipus
            .iter()
            .map(|r| {
                r.map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                    .map_err(err("list enrollments"))
            })
            .collect()
    }

    fn running_bundle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_bundle()
    }

    fn running_bundle_version(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .read_bundle()?
            .as_deref()
            .and_then(claimed_bundle_version))
    }

    fn install_bundle(
        &self,
        expected: Option<u64>,
        version: u64,
        bytes: &[u8],
    ) -> Result<bool, StoreError> {
        let _one_at_a_time = self.installing.lock().expect("not poisoned");
        if self.running_bundle_version()? != expected {
            return Ok(false);
        }
        debug_assert_eq!(claimed_bundle_version(bytes), Some(version));
        let dir = self.bundle.parent().expect("policy/running.bundle");
        let state = |e: std::io::Error| {
            StoreError::new(
                "sled",
                "record the running policy bundle",
                format!("{}: {e}", dir.display()),
            )
        };
        std::fs::create_dir_all(dir).map_err(state)?;
        let tmp = dir.join("running.bundle.tmp");
        std::fs::write(&tmp, bytes).map_err(state)?;
        std::fs::rename(&tmp, &self.bundle).map_err(state)?;
        Ok(true)
    }

    fn issue_nonce(&self, nonce_hash: &[u8; 32], lifetime: Duration) -> Result<(), StoreError> {
        self.ephemeral.issue_nonce(nonce_hash, lifetime);
        Ok(())
    }

    fn consume_nonce(&self, nonce_hash: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.ephemeral.consume_nonce(nonce_hash))
    }

    fn put_session(&self, session: &SessionRecord) -> Result<(), StoreError> {
        self.ephemeral.put_session(session);
        Ok(())
    }

    fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.ephemeral.session(id))
    }

    fn end_sessions_of(&self, ipu_id: &str) -> Result<(), StoreError> {
        self.ephemeral.end_sessions_of(ipu_id);
        Ok(())
    }
}
