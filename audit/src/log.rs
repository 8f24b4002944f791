//! Appending: a committer thread owns the write side. Callers queue events and block until
//! the batch holding theirs is durable (group commit: one transaction and one flush for
//! every event that arrived while the previous flush ran).
//!
//! Checkpoints are signed inside the same transaction when the queue runs dry or the
//! checkpoint interval has passed, and only after a consistency proof from the previous
//! signed checkpoint to the new tree verified: the log never signs two views that disagree.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::checkpoint::{Checkpoint, CheckpointSigner};
use crate::chunk;
use crate::event::Event;
use crate::merkle::{self, Hash, NodeSource};
use crate::store::{node_key, node_with, Store, STORED_LEVEL};
use crate::AuditError;

/// What the log returns once an event is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub time_ns: u64,
    pub leaf_hash: Hash,
}

#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Longest time events may wait for a signed checkpoint while appends keep coming.
    pub checkpoint_interval: Duration,
    /// Most events in one group commit.
    pub max_batch: usize,
    /// How long `open` waits for another process to release the database.
    pub open_wait: Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            checkpoint_interval: Duration::from_secs(1),
            max_batch: 4096,
            open_wait: Duration::from_secs(10),
        }
    }
}

enum Request {
    Append(Box<Event>, Sender<Result<Receipt, AuditError>>),
    /// Several events committed together (imports, bulk loads); one reply for all.
    AppendMany(Vec<Event>, Sender<Result<Vec<Receipt>, AuditError>>),
    Checkpoint(Sender<Result<String, AuditError>>),
}

/// An open audit log with its writer.
pub struct AuditLog {
    store: Arc<Store>,
    /// The log's directory (for the writability check).
    dir: std::path::PathBuf,
    /// How far signed checkpoints cover the log, and since when (for operators).
    signed: Arc<Signed>,
    tx: Mutex<Option<Sender<Request>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    indexer: Mutex<Option<JoinHandle<()>>>,
}

/// The committer's view of the tree: its size, the right edge of perfect subtrees, the
/// last signed checkpoint.
struct TreeState {
    size: u64,
    /// `frontier[l]`: the last even-indexed node at level `l` (a left child waiting for
    /// its sibling, or part of the root's decomposition).
    frontier: Vec<Hash>,
    last_time: u64,
    checkpoints: u64,
    last_signed: Option<(u64, Hash)>,
}

impl TreeState {
    fn load(store: &Store) -> Result<Self, AuditError> {
        let size = store.size()?;
        let mut frontier = Vec::new();
        for level in 0..64u32 {
            if size >> level == 0 {
                break;
            }
            let count = size >> level;
            frontier.push(if count & 1 == 1 {
                store.node(level, count - 1)?
            } else {
                [0u8; 32]
            });
        }
        let last_time = match size {
            0 => 0,
            n => {
                store
                    .event(n - 1)?
                    .ok_or_else(|| AuditError::Corrupt {
                        index: n - 1,
                        reason: "the last event is missing".into(),
                    })?
                    .time_ns
            }
        };
        let checkpoints = store
            .meta
            .get("checkpoints")?
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0);
        Ok(Self {
            size,
            frontier,
            last_time,
            checkpoints,
            last_signed: None,
        })
    }

    /// Adds a leaf; returns the nodes that became complete.
    fn push(&mut self, leaf: Hash, new_nodes: &mut Vec<(u32, u64, Hash)>) {
        let mut index = self.size;
        let mut hash = leaf;
        let mut level = 0u32;
        loop {
            new_nodes.push((level, index, hash));
            if self.frontier.len() == level as usize {
                self.frontier.push([0u8; 32]);
            }
            if index & 1 == 0 {
                self.frontier[level as usize] = hash;
                break;
            }
            hash = merkle::node_hash(&self.frontier[level as usize], &hash);
            index >>= 1;
            level += 1;
        }
        self.size += 1;
    }

    fn root(&self) -> Hash {
        let mut root: Option<Hash> = None;
        for level in 0..self.frontier.len() {
            if (self.size >> level) & 1 == 1 {
                let node = self.frontier[level];
                root = Some(match root {
                    None => node,
                    Some(r) => merkle::node_hash(&node, &r),
                });
            }
        }
        root.unwrap_or_else(merkle::empty_root)
    }
}

/// Stored nodes and leaves plus the ones of the batch being committed.
struct Overlay<'a> {
    store: &'a Store,
    batch_first: u64,
    batch_leaves: &'a [Hash],
    batch_nodes: HashMap<(u32, u64), Hash>,
}

impl NodeSource for Overlay<'_> {
    type Error = AuditError;
    fn node(&self, level: u32, index: u64) -> Result<Hash, AuditError> {
        node_with(
            level,
            index,
            |a, b| {
                let mut out = Vec::new();
                if a < self.batch_first {
                    out.extend(self.store.leaves(a, b.min(self.batch_first))?);
                }
                for s in a.max(self.batch_first)..b {
                    out.push(self.batch_leaves[(s - self.batch_first) as usize]);
                }
                Ok(out)
            },
            |l, i| match self.batch_nodes.get(&(l, i)) {
                Some(h) => Ok(*h),
                None => self.store.node(l, i),
            },
        )
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl AuditLog {
    /// Opens or creates the log in `dir` for `origin` (the log's name in its checkpoints).
    /// A log created for another origin, or whose last checkpoint does not verify with
    /// `signer`, is refused.
    pub fn open(
        dir: &Path,
        origin: &str,
        signer: CheckpointSigner,
        options: LogOptions,
    ) -> Result<Self, AuditError> {
        let store = Store::open(dir, options.open_wait)?;
        match store.origin()? {
            Some(o) if o != origin => {
                return Err(AuditError::Request(format!(
                    "{} is the log of {o:?}, not {origin:?}",
                    dir.display()
                )))
            }
            Some(_) => {}
            None => {
                store.meta.insert("origin", origin.as_bytes())?;
                store
                    .meta
                    .insert("verifier", signer.verifier().to_string().as_bytes())?;
                store.db.flush()?;
            }
        }
        let mut state = TreeState::load(&store)?;
        if let Some(note) = store.latest_checkpoint()? {
            let cp = signer.verifier().open_checkpoint(&note).map_err(|e| {
                AuditError::Request(format!(
                    "the log's last checkpoint does not verify with this signing key: {e}"
                ))
            })?;
            if cp.size > state.size || store.root(cp.size)? != cp.root {
                return Err(AuditError::Corrupt {
                    index: cp.size.min(state.size),
                    reason: "the stored tree disagrees with the last signed checkpoint; run `audit verify`".into(),
                });
            }
            state.last_signed = Some((cp.size, cp.root));
        }
        let store = Arc::new(store);
        let signed = Arc::new(Signed::default());
        signed.set(state.last_signed.map_or(0, |(size, _)| size));
        let (tx, rx) = mpsc::channel();
        // The index is derived data, built behind the log in fixed windows.
        let (grew, grown) = mpsc::channel::<()>();
        let indexer = {
            let store = store.clone();
            std::thread::Builder::new()
                .name("audit-index".into())
                .spawn(move || {
                    while grown.recv().is_ok() {
                        while grown.try_recv().is_ok() {}
                        loop {
                            match store.index_next_window() {
                                Ok(true) => {}
                                Ok(false) => break,
                                Err(e) => {
                                    tracing::error!(error = %e, "audit indexer stopped; queries scan the unindexed events");
                                    return;
                                }
                            }
                        }
                    }
                })
                .map_err(|e| AuditError::io(dir, e))?
        };
        let _ = grew.send(());
        let committer = {
            let store = store.clone();
            let signed = signed.clone();
            let origin = origin.to_string();
            std::thread::Builder::new()
                .name("audit-commit".into())
                .spawn(move || {
                    Committer {
                        store,
                        signed,
                        origin,
                        signer,
                        options,
                        state,
                        last_checkpoint_at: Instant::now(),
                        grew,
                    }
                    .run(rx)
                })
                .map_err(|e| AuditError::io(dir, e))?
        };
        let log = Self {
            store,
            dir: dir.to_path_buf(),
            signed,
            tx: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(committer)),
            indexer: Mutex::new(Some(indexer)),
        };
        // A crash may have left durable events that no checkpoint covers yet.
        log.checkpoint()?;
        Ok(log)
    }

    /// Appends an event and returns once it is durable. `seq` and `time_ns` are assigned.
    pub fn append(&self, event: Event) -> Result<Receipt, AuditError> {
        event.validate()?;
        let (done, wait) = mpsc::channel();
        self.send(Request::Append(Box::new(event), done))?;
        wait.recv().map_err(|_| AuditError::Closed)?
    }

    /// Appends several events in one commit; returns once all are durable.
    pub fn append_many(&self, events: Vec<Event>) -> Result<Vec<Receipt>, AuditError> {
        for e in &events {
            e.validate()?;
        }
        let (done, wait) = mpsc::channel();
        self.send(Request::AppendMany(events, done))?;
        wait.recv().map_err(|_| AuditError::Closed)?
    }

    /// Signs a checkpoint of the current tree now (if it grew) and returns the latest one.
    pub fn checkpoint(&self) -> Result<String, AuditError> {
        let (done, wait) = mpsc::channel();
        self.send(Request::Checkpoint(done))?;
        wait.recv().map_err(|_| AuditError::Closed)?
    }

    fn send(&self, r: Request) -> Result<(), AuditError> {
        self.tx
            .lock()
            .expect("not poisoned")
            .as_ref()
            .ok_or(AuditError::Closed)?
            .send(r)
            .map_err(|_| AuditError::Closed)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How far signed checkpoints cover the log.
    pub fn checkpoint_status(&self) -> CheckpointStatus {
        use std::sync::atomic::Ordering::Relaxed;
        CheckpointStatus {
            signed_size: self.signed.size.load(Relaxed),
            signed_at_ns: self.signed.at_ns.load(Relaxed),
        }
    }

    /// Whether appends can be taken: the log is open, its writer thread runs, and its
    /// directory takes a new file (a read-only or full file system fails this).
    pub fn check_writable(&self) -> Result<(), String> {
        if self.tx.lock().expect("not poisoned").is_none() {
            return Err("the audit log is closed".into());
        }
        if self
            .committer
            .lock()
            .expect("not poisoned")
            .as_ref()
            .is_none_or(|h| h.is_finished())
        {
            return Err("the audit log's writer thread stopped".into());
        }
        let probe = self.dir.join(".ready-probe");
        let written = std::fs::write(&probe, b"ready\n");
        let _ = std::fs::remove_file(&probe);
        written.map_err(|e| format!("the audit log {} is not writable: {e}", self.dir.display()))
    }

    /// Stops the writer after the queued events are committed.
    pub fn close(&self) {
        drop(self.tx.lock().expect("not poisoned").take());
        if let Some(h) = self.committer.lock().expect("not poisoned").take() {
            let _ = h.join();
        }
        // The committer held the indexer's channel: the indexer finishes its window and stops.
        if let Some(h) = self.indexer.lock().expect("not poisoned").take() {
            let _ = h.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// The last signed checkpoint's size and time, as the committer last signed one.
#[derive(Default)]
struct Signed {
    size: std::sync::atomic::AtomicU64,
    at_ns: std::sync::atomic::AtomicU64,
}

impl Signed {
    fn set(&self, size: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.size.store(size, Relaxed);
        self.at_ns.store(now_ns(), Relaxed);
    }
}

/// How far the log is covered by signed checkpoints ([`AuditLog::checkpoint_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointStatus {
    /// The size (in events) of the last signed checkpoint.
    pub signed_size: u64,
    /// When this process last signed one (or opened the log), Unix nanoseconds.
    pub signed_at_ns: u64,
}

struct Committer {
    store: Arc<Store>,
    signed: Arc<Signed>,
    origin: String,
    signer: CheckpointSigner,
    options: LogOptions,
    state: TreeState,
    last_checkpoint_at: Instant,
    /// Wakes the indexer after a commit.
    grew: Sender<()>,
}

/// Who is told when an event is durable.
enum Waiter {
    One(Sender<Result<Receipt, AuditError>>),
    /// The `n`-th of a bulk request's events; the last one replies for all.
    Many {
        reply: Sender<Result<Vec<Receipt>, AuditError>>,
        last: bool,
    },
}

impl Committer {
    fn run(mut self, rx: Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut appends: Vec<(Box<Event>, Waiter)> = Vec::new();
            let mut cp_waiters = Vec::new();
            let take = |r: Request,
                        appends: &mut Vec<(Box<Event>, Waiter)>,
                        cp_waiters: &mut Vec<_>| match r {
                Request::Append(e, w) => appends.push((e, Waiter::One(w))),
                Request::AppendMany(events, reply) => {
                    let n = events.len();
                    if n == 0 {
                        let _ = reply.send(Ok(Vec::new()));
                    }
                    for (i, e) in events.into_iter().enumerate() {
                        let last = i + 1 == n;
                        let reply = reply.clone();
                        appends.push((Box::new(e), Waiter::Many { reply, last }));
                    }
                }
                Request::Checkpoint(w) => cp_waiters.push(w),
            };
            take(first, &mut appends, &mut cp_waiters);
            let mut idle = false;
            while appends.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(r) => take(r, &mut appends, &mut cp_waiters),
                    Err(_) => {
                        idle = true;
                        break;
                    }
                }
            }
            let sign = idle
                || !cp_waiters.is_empty()
                || self.last_checkpoint_at.elapsed() >= self.options.checkpoint_interval;
            match self.commit(&appends, sign) {
                Ok((receipts, note)) => {
                    let mut bulk = Vec::new();
                    for ((_, w), r) in appends.into_iter().zip(receipts) {
                        match w {
                            Waiter::One(w) => {
                                let _ = w.send(Ok(r));
                            }
                            Waiter::Many { reply, last } => {
                                bulk.push(r);
                                if last {
                                    let _ = reply.send(Ok(std::mem::take(&mut bulk)));
                                }
                            }
                        }
                    }
                    for w in cp_waiters {
                        let _ = w.send(note.clone().ok_or(AuditError::Closed).or_else(|_| {
                            self.store
                                .latest_checkpoint()
                                .and_then(|c| c.ok_or(AuditError::Closed))
                        }));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "audit commit failed; nothing of the batch was acknowledged");
                    for (_, w) in appends {
                        match w {
                            Waiter::One(w) => {
                                let _ = w.send(Err(e.clone()));
                            }
                            Waiter::Many { reply, last: true } => {
                                let _ = reply.send(Err(e.clone()));
                            }
                            Waiter::Many { .. } => {}
                        }
                    }
                    for w in cp_waiters {
                        let _ = w.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Writes one batch (and maybe a checkpoint) in one transaction, then flushes. The
    /// in-memory state advances only when both succeeded.
    fn commit(
        &mut self,
        appends: &[(Box<Event>, Waiter)],
        sign: bool,
    ) -> Result<(Vec<Receipt>, Option<String>), AuditError> {
        let mut next = TreeState {
            size: self.state.size,
            frontier: self.state.frontier.clone(),
            last_time: self.state.last_time,
            checkpoints: self.state.checkpoints,
            last_signed: self.state.last_signed,
        };
        let batch_first = next.size;
        let mut nodes = sled::Batch::default();
        let mut new_nodes = Vec::new();
        let mut receipts = Vec::with_capacity(appends.len());
        let mut leaves = Vec::with_capacity(appends.len());
        let mut bodies = Vec::with_capacity(appends.len());
        let now = now_ns();
        for (event, _) in appends {
            let mut e = (**event).clone();
            e.seq = next.size;
            e.time_ns = now.max(next.last_time);
            next.last_time = e.time_ns;
            let bytes = e.to_canonical();
            let leaf = merkle::leaf_hash(&bytes);
            receipts.push(Receipt {
                seq: e.seq,
                time_ns: e.time_ns,
                leaf_hash: leaf,
            });
            next.push(leaf, &mut new_nodes);
            leaves.push(leaf);
            bodies.push(bytes);
        }
        let chunks: Vec<(u64, Vec<u8>)> = leaves
            .chunks(chunk::MAX_CHUNK_EVENTS)
            .zip(bodies.chunks(chunk::MAX_CHUNK_EVENTS))
            .enumerate()
            .map(|(i, (l, b))| {
                let first = batch_first + (i * chunk::MAX_CHUNK_EVENTS) as u64;
                (first, chunk::encode(l, b))
            })
            .collect();
        new_nodes.retain(|(level, _, _)| *level >= STORED_LEVEL);
        for (level, idx, hash) in &new_nodes {
            nodes.insert(&node_key(*level, *idx), &hash[..]);
        }
        let grew = next.size > next.last_signed.map_or(0, |(s, _)| s);
        let note = if sign && (grew || next.last_signed.is_none()) {
            let root = next.root();
            if let Some((old_size, old_root)) = next.last_signed {
                let overlay = Overlay {
                    store: &self.store,
                    batch_first,
                    batch_leaves: &leaves,
                    batch_nodes: new_nodes.iter().map(|(l, i, h)| ((*l, *i), *h)).collect(),
                };
                let proof = merkle::consistency_proof(&overlay, old_size, next.size)?;
                merkle::verify_consistency(old_size, next.size, &old_root, &root, &proof).map_err(
                    |e| AuditError::Corrupt {
                        index: old_size,
                        reason: format!(
                            "refusing to sign a checkpoint inconsistent with the previous one: {e}"
                        ),
                    },
                )?;
            }
            let note = self.signer.sign_checkpoint(&Checkpoint {
                origin: self.origin.clone(),
                size: next.size,
                root,
                extensions: vec![],
            });
            next.last_signed = Some((next.size, root));
            Some(note)
        } else {
            None
        };
        let cp_number = next.checkpoints;
        if note.is_some() {
            next.checkpoints += 1;
        }
        let s = &self.store;
        (&s.events, &s.nodes, &s.meta, &s.checkpoints)
            .transaction(|(te, tn, tm, tc)| {
                for (first, c) in &chunks {
                    te.insert(&first.to_be_bytes(), c.as_slice())?;
                }
                tn.apply_batch(&nodes)?;
                tm.insert("size", &next.size.to_be_bytes())?;
                if let Some(note) = &note {
                    tc.insert(&cp_number.to_be_bytes(), note.as_bytes())?;
                    tm.insert("checkpoints", &next.checkpoints.to_be_bytes())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e: TransactionError<()>| AuditError::Storage(format!("{e:?}")))?;
        s.db.flush()?;
        if note.is_some() {
            self.last_checkpoint_at = Instant::now();
        }
        self.state = next;
        if note.is_some() {
            self.signed.set(self.state.size);
        }
        let _ = self.grew.send(());
        Ok((receipts, note))
    }
}
