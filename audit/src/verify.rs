//! Full verification of a stored log: recompute every leaf and the tree from the event
//! bytes, check every checkpoint's signature against a key the auditor trusts, that each
//! signed root is the root of the events as stored, that checkpoints only ever grow (no
//! fork), and optionally against checkpoints kept outside the log (a witness's copies).
//!
//! The first problem found is reported with the event index (or checkpoint) it concerns.

use std::fmt;

use crate::checkpoint::{Checkpoint, NoteVerifier};
use crate::chunk;
use crate::event::Event;
use crate::merkle::{self, MemoryTree};
use crate::store::Store;
use crate::AuditError;

/// Where verification failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Event(u64),
    Checkpoint { number: u64, size: u64 },
    External { position: usize, size: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyFailure {
    pub at: Location,
    pub problem: String,
}

impl VerifyFailure {
    /// The first event index the failure concerns.
    pub fn index(&self) -> u64 {
        match self.at {
            Location::Event(i) => i,
            Location::Checkpoint { size, .. } | Location::External { size, .. } => size,
        }
    }
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.at {
            Location::Event(i) => write!(f, "event {i}: {}", self.problem),
            Location::Checkpoint { number, size } => {
                write!(f, "checkpoint #{number} (size {size}): {}", self.problem)
            }
            Location::External { position, size } => write!(
                f,
                "trusted checkpoint {} (size {size}): {}",
                position + 1,
                self.problem
            ),
        }
    }
}

/// What a successful verification covered.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub events: u64,
    pub checkpoints: u64,
    pub latest: Option<Checkpoint>,
}

fn at_event(i: u64, problem: impl Into<String>) -> VerifyFailure {
    VerifyFailure {
        at: Location::Event(i),
        problem: problem.into(),
    }
}

/// Verifies the whole log. `trusted` are checkpoint notes kept elsewhere (they must verify
/// with `verifier` too, and the log must contain and agree with them).
pub fn verify(
    store: &Store,
    verifier: &NoteVerifier,
    trusted: &[String],
) -> Result<Result<VerifyReport, VerifyFailure>, AuditError> {
    let origin = store.origin()?;
    let declared = store.size()?;

    // 1. Events: chunks contiguous, each event where it claims to be, time never
    //    decreasing, and the leaf the log stored for it still matching its bytes.
    let mut tree = MemoryTree::default();
    let mut expected = 0u64;
    let mut last_time = 0u64;
    for r in store.chunks() {
        let (first, bytes) = r?;
        if first != expected {
            return Ok(Err(at_event(
                expected,
                format!("missing (the next stored event is {first})"),
            )));
        }
        let c = match chunk::decode(&bytes) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Err(at_event(
                    first,
                    format!("its group of events is unreadable: {e}"),
                )))
            }
        };
        for (i, (bytes, stored_leaf)) in c.events.iter().zip(&c.leaves).enumerate() {
            let seq = first + i as u64;
            let event = match Event::from_canonical(bytes) {
                Ok(e) => e,
                Err(e) => return Ok(Err(at_event(seq, format!("unreadable: {e}")))),
            };
            if event.seq != seq {
                return Ok(Err(at_event(
                    seq,
                    format!(
                        "stored at {seq} but says it is event {}: moved or reordered",
                        event.seq
                    ),
                )));
            }
            if event.time_ns < last_time {
                return Ok(Err(at_event(
                    seq,
                    "its time is before the previous event's",
                )));
            }
            last_time = event.time_ns;
            let leaf = merkle::leaf_hash(bytes);
            if &leaf != stored_leaf {
                return Ok(Err(at_event(
                    seq,
                    "changed since it was appended (its bytes no longer match its leaf hash)",
                )));
            }
            tree.push(leaf);
        }
        expected = first + c.events.len() as u64;
    }
    let count = tree.size();
    if count < declared {
        return Ok(Err(at_event(
            count,
            format!("missing: the log records {declared} events but holds {count} (truncated)"),
        )));
    }
    if count > declared {
        return Ok(Err(at_event(
            declared,
            format!(
                "{} events beyond the recorded size {declared}",
                count - declared
            ),
        )));
    }

    // 2. Every stored interior node agrees with the recomputed tree (proofs use them), and
    //    every complete one is there.
    for r in store.nodes.iter() {
        let (k, v) = r?;
        let level = k[0] as u32;
        let index = u64::from_be_bytes(k[1..9].try_into().unwrap_or([0xff; 8]));
        let start = index << level;
        let end = start + (1u64 << level);
        if end > count {
            return Ok(Err(at_event(
                count,
                format!(
                    "missing: tree node ({level}, {index}) covers events up to {end} but the log holds {count} (truncated)"
                ),
            )));
        }
        let want = merkle::range_hash(&tree, start, end).expect("in memory");
        if v.as_ref() != want {
            return Ok(Err(at_event(
                start,
                format!("tree node ({level}, {index}) disagrees with the events"),
            )));
        }
    }

    // 3. Checkpoints: signed by the trusted key, for this log, each the root of the events
    //    as stored, growing only.
    let mut latest: Option<Checkpoint> = None;
    // Checkpoint size -> (number, root) of the first checkpoint of that size.
    let mut seen: std::collections::HashMap<u64, (u64, merkle::Hash)> = Default::default();
    let mut last_good_size = 0u64;
    let mut numbers = 0u64;
    for r in store.checkpoints() {
        let (number, note) = r?;
        numbers += 1;
        let fail = |size: u64, problem: String| VerifyFailure {
            at: Location::Checkpoint { number, size },
            problem,
        };
        let cp = match verifier.open_checkpoint(&note) {
            Ok(cp) => cp,
            Err(e) => return Ok(Err(fail(0, e.to_string()))),
        };
        if origin.as_deref() != Some(cp.origin.as_str()) {
            return Ok(Err(fail(
                cp.size,
                format!("origin {:?} is not this log's {:?}", cp.origin, origin),
            )));
        }
        if let Some((other, root)) = seen.get(&cp.size) {
            if *root != cp.root {
                return Ok(Err(fail(
                    cp.size,
                    format!("fork: checkpoint #{other} signed a different root for the same size"),
                )));
            }
        }
        if let Some(prev) = &latest {
            if cp.size < prev.size {
                return Ok(Err(fail(
                    cp.size,
                    format!("smaller than the checkpoint before it (size {})", prev.size),
                )));
            }
        }
        if cp.size > count {
            return Ok(Err(at_event(
                count,
                format!(
                    "missing: checkpoint #{number} covers {} events but the log holds {count} (truncated)",
                    cp.size
                ),
            )));
        }
        let root = merkle::root(&tree, cp.size).expect("in memory");
        if root != cp.root {
            return Ok(Err(at_event(
                last_good_size,
                format!(
                    "events {last_good_size}..{} are not what checkpoint #{number} signed",
                    cp.size
                ),
            )));
        }
        last_good_size = cp.size;
        seen.entry(cp.size).or_insert((number, cp.root));
        latest = Some(cp);
    }

    // 4. Checkpoints the auditor kept: the log must still agree with each.
    for (position, note) in trusted.iter().enumerate() {
        let fail = |size: u64, problem: String| VerifyFailure {
            at: Location::External { position, size },
            problem,
        };
        let cp = match verifier.open_checkpoint(note) {
            Ok(cp) => cp,
            Err(e) => return Ok(Err(fail(0, e.to_string()))),
        };
        if origin.as_deref() != Some(cp.origin.as_str()) {
            return Ok(Err(fail(
                cp.size,
                format!("origin {:?} is another log", cp.origin),
            )));
        }
        if cp.size > count {
            return Ok(Err(at_event(
                count,
                format!(
                    "missing: a trusted checkpoint covers {} events but the log holds {count} (truncated)",
                    cp.size
                ),
            )));
        }
        if merkle::root(&tree, cp.size).expect("in memory") != cp.root {
            let problem = match seen.get(&cp.size) {
                Some((n, _)) => {
                    format!("fork: the log's checkpoint #{n} signed a different root for this size")
                }
                None => {
                    "the log's events do not produce this signed root (history rewritten)".into()
                }
            };
            return Ok(Err(fail(cp.size, problem)));
        }
    }

    Ok(Ok(VerifyReport {
        events: count,
        checkpoints: numbers,
        latest,
    }))
}
