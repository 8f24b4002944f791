//! The log's storage in sled, and everything that only reads it: events, tree nodes,
//! checkpoints, proofs and indexed queries.
//!
//! Trees:
//! - `events`: seq (u64 BE) -> canonical event bytes;
//! - `nodes`: level (u8) || index (u64 BE) -> hash of that perfect subtree;
//! - `checkpoints`: number (u64 BE) -> signed checkpoint note, in signing order;
//! - `index`: tag byte || value || 0x00 || seq (u64 BE) -> (), for queries;
//! - `meta`: `size`, `checkpoints`, `origin`.
//!
//! One transaction per group commit writes all of them, so the log on disk is always a
//! prefix of what was appended, with its tree and indexes.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::event::{Event, EventKind, Outcome};
use crate::merkle::{self, Hash, NodeSource};
use crate::AuditError;

pub(crate) const TAG_TIME: u8 = b't';
pub(crate) const TAG_TENANT: u8 = b'T';
pub(crate) const TAG_FUNCTION: u8 = b'f';
pub(crate) const TAG_DIGEST: u8 = b'd';
pub(crate) const TAG_KIND: u8 = b'k';
pub(crate) const TAG_OUTCOME: u8 = b'o';

pub(crate) fn node_key(level: u32, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = level as u8;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn text_key(tag: u8, value: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 10);
    k.push(tag);
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn text_prefix(tag: u8, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 2);
    k.push(tag);
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k
}

fn time_key(time_ns: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = TAG_TIME;
    k[1..9].copy_from_slice(&time_ns.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The index entries of one event.
pub(crate) fn index_keys(e: &Event) -> Vec<Vec<u8>> {
    let mut keys = vec![
        time_key(e.time_ns, e.seq).to_vec(),
        text_key(TAG_KIND, &e.kind.as_str(), e.seq),
        text_key(TAG_OUTCOME, e.outcome.as_str(), e.seq),
    ];
    if let Some(t) = &e.tenant {
        keys.push(text_key(TAG_TENANT, t, e.seq));
    }
    if let Some(f) = &e.function {
        keys.push(text_key(TAG_FUNCTION, f, e.seq));
    }
    if let Some(d) = e.image.as_ref().and_then(|i| i.digest.as_deref()) {
        keys.push(text_key(TAG_DIGEST, d, e.seq));
    }
    keys
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// Query filters; all given filters must match. Results come in log order.
#[derive(Clone, Debug, Default)]
pub struct Query {
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    pub tenant: Option<String>,
    pub function: Option<String>,
    pub image_digest: Option<String>,
    pub kind: Option<EventKind>,
    pub outcome: Option<Outcome>,
    /// Start after this seq (the `next` cursor of the previous page).
    pub after: Option<u64>,
    pub limit: usize,
}

impl Query {
    fn matches(&self, e: &Event) -> bool {
        self.since_ns.is_none_or(|s| e.time_ns >= s)
            && self.until_ns.is_none_or(|u| e.time_ns <= u)
            && self
                .tenant
                .as_ref()
                .is_none_or(|t| e.tenant.as_ref() == Some(t))
            && self
                .function
                .as_ref()
                .is_none_or(|f| e.function.as_ref() == Some(f))
            && self
                .image_digest
                .as_ref()
                .is_none_or(|d| e.image.as_ref().and_then(|i| i.digest.as_ref()) == Some(d))
            && self.kind.as_ref().is_none_or(|k| &e.kind == k)
            && self.outcome.is_none_or(|o| e.outcome == o)
    }
}

/// One page of results; `next` continues after the last one.
#[derive(Clone, Debug)]
pub struct Page {
    pub events: Vec<Event>,
    pub next: Option<u64>,
}

/// Read access to a log directory.
pub struct Store {
    pub(crate) db: sled::Db,
    pub(crate) events: sled::Tree,
    pub(crate) nodes: sled::Tree,
    pub(crate) checkpoints: sled::Tree,
    pub(crate) index: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// Held while open; dropped after the database (fields drop in order).
    _lock: std::fs::File,
}

impl Store {
    /// Opens (or creates) the sled database in `dir`. sled allows one process at a time;
    /// another process holding it is waited for up to `wait`.
    pub fn open(dir: &Path, wait: Duration) -> Result<Self, AuditError> {
        std::fs::create_dir_all(dir).map_err(|e| AuditError::io(dir, e))?;
        let start = Instant::now();
        // Our own lock, taken before sled touches any file: sled's lock is taken only after
        // it has started reading, so two processes opening at once can see a half-written
        // database.
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| AuditError::io(&lock_path, e))?;
        loop {
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(AuditError::Busy(dir.display().to_string()))
                }
                Err(e) => return Err(AuditError::io(&lock_path, e.into())),
            }
        }
        let db = loop {
            match sled::Config::new()
                .path(dir.join("db"))
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(db) => break db,
                // The previous holder's background flusher may still be stopping.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("lock") && start.elapsed() < wait =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(AuditError::Storage(format!("{}: {e}", dir.display()))),
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(AuditError::from);
        Ok(Self {
            events: tree("events")?,
            nodes: tree("nodes")?,
            checkpoints: tree("checkpoints")?,
            index: tree("index")?,
            meta: tree("meta")?,
            db,
            _lock: lock,
        })
    }

    /// Number of events (the tree size).
    pub fn size(&self) -> Result<u64, AuditError> {
        Ok(self.meta.get("size")?.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    pub fn origin(&self) -> Result<Option<String>, AuditError> {
        Ok(self
            .meta
            .get("origin")?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The canonical bytes of event `seq`.
    pub fn event_bytes(&self, seq: u64) -> Result<Option<Vec<u8>>, AuditError> {
        Ok(self.events.get(seq.to_be_bytes())?.map(|v| v.to_vec()))
    }

    pub fn event(&self, seq: u64) -> Result<Option<Event>, AuditError> {
        self.event_bytes(seq)?
            .map(|b| {
                Event::from_canonical(&b).map_err(|e| AuditError::Corrupt {
                    index: seq,
                    reason: e,
                })
            })
            .transpose()
    }

    /// Events from `from` (inclusive), in order.
    pub fn events_from(
        &self,
        from: u64,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>), AuditError>> + '_ {
        self.events.range(from.to_be_bytes()..).map(|r| {
            let (k, v) = r?;
            let seq = be_u64(&k).ok_or_else(|| AuditError::Corrupt {
                index: 0,
                reason: "an event key is not 8 bytes".into(),
            })?;
            Ok((seq, v.to_vec()))
        })
    }

    /// Signed checkpoint notes in signing order.
    pub fn checkpoints(&self) -> impl Iterator<Item = Result<(u64, String), AuditError>> + '_ {
        self.checkpoints.iter().map(|r| {
            let (k, v) = r?;
            Ok((
                be_u64(&k).unwrap_or(u64::MAX),
                String::from_utf8_lossy(&v).into_owned(),
            ))
        })
    }

    pub fn latest_checkpoint(&self) -> Result<Option<String>, AuditError> {
        Ok(self
            .checkpoints
            .last()?
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn root(&self, size: u64) -> Result<Hash, AuditError> {
        merkle::root(self, size)
    }

    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>, AuditError> {
        if seq >= size || size > self.size()? {
            return Err(AuditError::Request(format!(
                "no event {seq} in a tree of {size} (the log holds {})",
                self.size()?
            )));
        }
        merkle::inclusion_proof(self, seq, size)
    }

    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        if old > new || new > self.size()? {
            return Err(AuditError::Request(format!(
                "no consistency proof from {old} to {new} (the log holds {})",
                self.size()?
            )));
        }
        merkle::consistency_proof(self, old, new)
    }

    /// Runs a query using the most selective index among the given filters.
    pub fn query(&self, q: &Query) -> Result<Page, AuditError> {
        let limit = q.limit.clamp(1, 10_000);
        let start_seq = q.after.map_or(0, |a| a + 1);
        // The seq range the time filters allow (time never decreases along the log).
        let (lo, hi) = self.seq_range_for_time(q.since_ns, q.until_ns)?;
        let lo = lo.max(start_seq);
        let mut out = Vec::new();
        let push = |seq: u64, out: &mut Vec<Event>| -> Result<bool, AuditError> {
            if let Some(e) = self.event(seq)? {
                if q.matches(&e) {
                    out.push(e);
                }
            }
            Ok(out.len() >= limit)
        };
        let prefix = if let Some(f) = &q.function {
            Some(text_prefix(TAG_FUNCTION, f))
        } else if let Some(d) = &q.image_digest {
            Some(text_prefix(TAG_DIGEST, d))
        } else if let Some(t) = &q.tenant {
            Some(text_prefix(TAG_TENANT, t))
        } else if let Some(k) = &q.kind {
            Some(text_prefix(TAG_KIND, &k.as_str()))
        } else {
            q.outcome.map(|o| text_prefix(TAG_OUTCOME, o.as_str()))
        };
        let mut last = None;
        match prefix {
            Some(prefix) => {
                let mut from = prefix.clone();
                from.extend_from_slice(&lo.to_be_bytes());
                for r in self.index.range(from..) {
                    let (k, _) = r?;
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    let seq = be_u64(&k[prefix.len()..]).unwrap_or(u64::MAX);
                    if seq >= hi {
                        break;
                    }
                    last = Some(seq);
                    if push(seq, &mut out)? {
                        break;
                    }
                }
            }
            None => {
                for seq in lo..hi {
                    last = Some(seq);
                    if push(seq, &mut out)? {
                        break;
                    }
                }
            }
        }
        let next = if out.len() >= limit { last } else { None };
        Ok(Page { events: out, next })
    }

    /// `[lo, hi)` of seqs whose time is within `[since, until]`.
    fn seq_range_for_time(
        &self,
        since: Option<u64>,
        until: Option<u64>,
    ) -> Result<(u64, u64), AuditError> {
        let size = self.size()?;
        let first_at_or_after = |t: u64| -> Result<u64, AuditError> {
            let mut from = vec![TAG_TIME];
            from.extend_from_slice(&t.to_be_bytes());
            match self.index.range(from..).next() {
                Some(r) => {
                    let (k, _) = r?;
                    if k.first() != Some(&TAG_TIME) {
                        return Ok(size);
                    }
                    Ok(be_u64(&k[9..17]).unwrap_or(size).min(size))
                }
                None => Ok(size),
            }
        };
        let lo = since.map_or(Ok(0), first_at_or_after)?;
        let hi = match until {
            Some(u) if u < u64::MAX => first_at_or_after(u + 1)?,
            _ => size,
        };
        Ok((lo, hi))
    }
}

impl NodeSource for Store {
    type Error = AuditError;
    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        let v = self
            .nodes
            .get(node_key(level, index))?
            .ok_or_else(|| AuditError::Corrupt {
                index: index << level,
                reason: format!("tree node ({level}, {index}) is missing"),
            })?;
        v.as_ref().try_into().map_err(|_| AuditError::Corrupt {
            index: index << level,
            reason: format!("tree node ({level}, {index}) is not 32 bytes"),
        })
    }
}
