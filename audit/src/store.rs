//! The log's storage in sled, and everything that only reads it: events, tree nodes,
//! checkpoints, proofs and indexed queries.
//!
//! Trees:
//! - `events`: first seq of a group commit (u64 BE) -> a [`chunk`](crate::chunk) of events
//!   with their leaf hashes;
//! - `nodes`: level (u8) || index (u64 BE) -> hash of that perfect subtree, for levels
//!   >= [`STORED_LEVEL`]; lower nodes are recomputed from the leaves (at most 32 of them);
//! - `checkpoints`: number (u64 BE) -> signed checkpoint note, in signing order;
//! - `index`: tag || value || 0x00 || window start (u64 BE) -> the seqs (u64 BE each) of
//!   that window's events with that value;
//! - `meta`: `size`, `checkpoints`, `origin`, `verifier`, `indexed`.
//!
//! One transaction per group commit writes the chunk, the new stored nodes, the size and the
//! checkpoint, so the log on disk is always a prefix of what was appended. The index is
//! derived data: it is built in fixed windows of [`INDEX_WINDOW`] events behind the log, and
//! queries scan the events past the last indexed window directly, so a crash never leaves a
//! query wrong, only slower until the indexer catches up.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::chunk;
use crate::event::{Event, EventKind, Outcome};
use crate::merkle::{self, Hash, NodeSource};
use crate::AuditError;

/// Interior nodes at this level and above are stored; below, recomputed from leaves.
pub const STORED_LEVEL: u32 = 5;
/// Events per index window.
pub const INDEX_WINDOW: u64 = 1024;

const TAG_TENANT: u8 = b'T';
const TAG_FUNCTION: u8 = b'f';
const TAG_DIGEST: u8 = b'd';
const TAG_KIND: u8 = b'k';
const TAG_OUTCOME: u8 = b'o';

pub(crate) fn node_key(level: u32, index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = level as u8;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn prefix(tag: u8, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 2);
    k.push(tag);
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k
}

/// The (tag, value) pairs an event is indexed under.
fn index_terms(e: &Event) -> Vec<Vec<u8>> {
    let mut terms = vec![
        prefix(TAG_KIND, &e.kind.as_str()),
        prefix(TAG_OUTCOME, e.outcome.as_str()),
    ];
    if let Some(t) = &e.tenant {
        terms.push(prefix(TAG_TENANT, t));
    }
    if let Some(f) = &e.function {
        terms.push(prefix(TAG_FUNCTION, f));
    }
    if let Some(d) = e.image.as_ref().and_then(|i| i.digest.as_deref()) {
        terms.push(prefix(TAG_DIGEST, d));
    }
    terms
}

fn be_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

fn corrupt(index: u64, reason: impl std::fmt::Display) -> AuditError {
    AuditError::Corrupt {
        index,
        reason: reason.to_string(),
    }
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

    /// The index term to drive the query with, most selective first.
    fn term(&self) -> Option<Vec<u8>> {
        if let Some(f) = &self.function {
            Some(prefix(TAG_FUNCTION, f))
        } else if let Some(d) = &self.image_digest {
            Some(prefix(TAG_DIGEST, d))
        } else if let Some(t) = &self.tenant {
            Some(prefix(TAG_TENANT, t))
        } else if let Some(k) = &self.kind {
            Some(prefix(TAG_KIND, &k.as_str()))
        } else {
            self.outcome.map(|o| prefix(TAG_OUTCOME, o.as_str()))
        }
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
    /// Opens (or creates) the sled database in `dir`. One process at a time; another
    /// process holding it is waited for up to `wait`.
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

    fn meta_u64(&self, key: &str) -> Result<u64, AuditError> {
        Ok(self.meta.get(key)?.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    /// Number of events (the tree size).
    /// The database's size on disk, in bytes.
    pub fn disk_bytes(&self) -> Result<u64, AuditError> {
        Ok(self.db.size_on_disk()?)
    }

    pub fn size(&self) -> Result<u64, AuditError> {
        self.meta_u64("size")
    }

    /// Events below this are covered by the index.
    pub fn indexed(&self) -> Result<u64, AuditError> {
        self.meta_u64("indexed")
    }

    pub fn origin(&self) -> Result<Option<String>, AuditError> {
        Ok(self
            .meta
            .get("origin")?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The stored chunk holding `seq`: (first seq, bytes).
    fn chunk_of(&self, seq: u64) -> Result<Option<(u64, sled::IVec)>, AuditError> {
        match self.events.range(..=seq.to_be_bytes()).next_back() {
            Some(r) => {
                let (k, v) = r?;
                let first =
                    be_u64(&k).ok_or_else(|| corrupt(seq, "an event key is not 8 bytes"))?;
                Ok(Some((first, v)))
            }
            None => Ok(None),
        }
    }

    /// The canonical bytes and stored leaf hash of event `seq`.
    pub fn event_entry(&self, seq: u64) -> Result<Option<(Vec<u8>, Hash)>, AuditError> {
        let Some((first, bytes)) = self.chunk_of(seq)? else {
            return Ok(None);
        };
        let found =
            chunk::event_at(&bytes, (seq - first) as usize).map_err(|e| corrupt(first, e))?;
        Ok(found.map(|(e, leaf)| (e.to_vec(), leaf)))
    }

    pub fn event_bytes(&self, seq: u64) -> Result<Option<Vec<u8>>, AuditError> {
        Ok(self.event_entry(seq)?.map(|(b, _)| b))
    }

    pub fn event(&self, seq: u64) -> Result<Option<Event>, AuditError> {
        self.event_bytes(seq)?
            .map(|b| Event::from_canonical(&b).map_err(|e| corrupt(seq, e)))
            .transpose()
    }

    /// The stored chunks in order: (first seq, bytes). Verification walks these.
    pub fn chunks(&self) -> impl Iterator<Item = Result<(u64, sled::IVec), AuditError>> + '_ {
        self.events.iter().map(|r| {
            let (k, v) = r?;
            let first = be_u64(&k).ok_or_else(|| corrupt(0, "an event key is not 8 bytes"))?;
            Ok((first, v))
        })
    }

    /// Calls `each(seq, canonical bytes, stored leaf)` for the events of `[from, to)`, in order.
    fn for_each_in(
        &self,
        from: u64,
        to: u64,
        mut each: impl FnMut(u64, &[u8], &Hash),
    ) -> Result<(), AuditError> {
        if from >= to {
            return Ok(());
        }
        let start = self.chunk_of(from)?.map_or(from, |(first, _)| first);
        for r in self.events.range(start.to_be_bytes()..) {
            let (k, v) = r?;
            let first = be_u64(&k).ok_or_else(|| corrupt(from, "an event key is not 8 bytes"))?;
            if first >= to {
                break;
            }
            let c = chunk::decode(&v).map_err(|e| corrupt(first, e))?;
            for (i, (event, leaf)) in c.events.iter().zip(&c.leaves).enumerate() {
                let seq = first + i as u64;
                if seq >= from && seq < to {
                    each(seq, event, leaf);
                }
            }
        }
        Ok(())
    }

    /// Events `[from, to)` with their canonical bytes, in order.
    pub fn events_range(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, AuditError> {
        let mut out = Vec::new();
        self.for_each_in(from, to, |seq, event, _| out.push((seq, event.to_vec())))?;
        Ok(out)
    }

    /// Stored leaf hashes of `[from, to)`.
    pub(crate) fn leaves(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError> {
        let mut out = Vec::with_capacity(to.saturating_sub(from) as usize);
        self.for_each_in(from, to, |_, _, leaf| out.push(*leaf))?;
        if out.len() as u64 != to - from {
            return Err(corrupt(from + out.len() as u64, "a leaf is missing"));
        }
        Ok(out)
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
        let have = self.size()?;
        if seq >= size || size > have {
            return Err(AuditError::Request(format!(
                "no event {seq} in a tree of {size} (the log holds {have})"
            )));
        }
        merkle::inclusion_proof(self, seq, size)
    }

    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, AuditError> {
        let have = self.size()?;
        if old > new || new > have {
            return Err(AuditError::Request(format!(
                "no consistency proof from {old} to {new} (the log holds {have})"
            )));
        }
        merkle::consistency_proof(self, old, new)
    }

    /// Indexes the next complete window, if there is one; returns whether it did.
    pub(crate) fn index_next_window(&self) -> Result<bool, AuditError> {
        let from = self.indexed()?;
        let to = from + INDEX_WINDOW;
        if to > self.size()? {
            return Ok(false);
        }
        let mut postings: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (seq, bytes) in self.events_range(from, to)? {
            let e = Event::from_canonical(&bytes).map_err(|e| corrupt(seq, e))?;
            for term in index_terms(&e) {
                postings
                    .entry(term)
                    .or_default()
                    .extend_from_slice(&seq.to_be_bytes());
            }
        }
        // Deterministic keys: re-indexing a window after a crash writes the same entries.
        let mut batch = sled::Batch::default();
        for (mut term, seqs) in postings {
            term.extend_from_slice(&from.to_be_bytes());
            batch.insert(term, seqs);
        }
        self.index.apply_batch(batch)?;
        self.meta.insert("indexed", &to.to_be_bytes())?;
        Ok(true)
    }

    /// Runs a query: through the index up to the indexed watermark, then a scan of the
    /// events past it.
    pub fn query(&self, q: &Query) -> Result<Page, AuditError> {
        let limit = q.limit.clamp(1, 10_000);
        let (lo, hi) = self.seq_range_for_time(q.since_ns, q.until_ns)?;
        let lo = lo.max(q.after.map_or(0, |a| a + 1));
        let indexed = self.indexed()?.min(hi);
        let mut out = Vec::new();
        let mut last = None;
        let mut consider = |seq: u64, out: &mut Vec<Event>| -> Result<bool, AuditError> {
            last = Some(seq);
            if let Some(e) = self.event(seq)? {
                if q.matches(&e) {
                    out.push(e);
                }
            }
            Ok(out.len() >= limit)
        };
        let mut done = false;
        let mut scan_from = lo;
        if let Some(term) = q.term() {
            if lo < indexed {
                let mut from = term.clone();
                from.extend_from_slice(&(lo - lo % INDEX_WINDOW).to_be_bytes());
                'postings: for r in self.index.range(from..) {
                    let (k, v) = r?;
                    if !k.starts_with(&term) {
                        break;
                    }
                    for s in v.chunks_exact(8) {
                        let seq = be_u64(s).expect("8 bytes");
                        if seq < lo {
                            continue;
                        }
                        if seq >= indexed {
                            break 'postings;
                        }
                        if consider(seq, &mut out)? {
                            done = true;
                            break 'postings;
                        }
                    }
                }
                scan_from = indexed;
            }
        }
        if !done {
            let mut seq = scan_from;
            'scan: while seq < hi {
                let to = (seq + 256).min(hi);
                for (s, bytes) in self.events_range(seq, to)? {
                    last = Some(s);
                    let e = Event::from_canonical(&bytes).map_err(|e| corrupt(s, e))?;
                    if q.matches(&e) {
                        out.push(e);
                        if out.len() >= limit {
                            break 'scan;
                        }
                    }
                }
                seq = to;
            }
        }
        let next = if out.len() >= limit { last } else { None };
        Ok(Page { events: out, next })
    }

    /// `[lo, hi)` of seqs whose time is within `[since, until]`: time never decreases along
    /// the log, so a binary search over event times finds the bounds.
    fn seq_range_for_time(
        &self,
        since: Option<u64>,
        until: Option<u64>,
    ) -> Result<(u64, u64), AuditError> {
        let size = self.size()?;
        let first_at_or_after = |t: u64| -> Result<u64, AuditError> {
            let (mut lo, mut hi) = (0u64, size);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let e = self
                    .event(mid)?
                    .ok_or_else(|| corrupt(mid, "event missing"))?;
                if e.time_ns < t {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            Ok(lo)
        };
        let lo = since.map_or(Ok(0), first_at_or_after)?;
        let hi = match until {
            Some(u) if u < u64::MAX => first_at_or_after(u + 1)?,
            _ => size,
        };
        Ok((lo, hi))
    }
}

/// Nodes below [`STORED_LEVEL`] recomputed from leaves; the rest read from `stored`.
pub(crate) fn node_with(
    level: u32,
    index: u64,
    leaves: impl Fn(u64, u64) -> Result<Vec<Hash>, AuditError>,
    stored: impl Fn(u32, u64) -> Result<Hash, AuditError>,
) -> Result<Hash, AuditError> {
    if level >= STORED_LEVEL {
        return stored(level, index);
    }
    let start = index << level;
    let mut layer = leaves(start, start + (1 << level))?;
    while layer.len() > 1 {
        layer = layer
            .chunks_exact(2)
            .map(|p| merkle::node_hash(&p[0], &p[1]))
            .collect();
    }
    Ok(layer[0])
}

impl NodeSource for Store {
    type Error = AuditError;
    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        node_with(
            level,
            index,
            |a, b| self.leaves(a, b),
            |l, i| {
                let v = self
                    .nodes
                    .get(node_key(l, i))?
                    .ok_or_else(|| corrupt(i << l, format!("tree node ({l}, {i}) is missing")))?;
                v.as_ref()
                    .try_into()
                    .map_err(|_| corrupt(i << l, format!("tree node ({l}, {i}) is not 32 bytes")))
            },
        )
    }
}
