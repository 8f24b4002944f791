//! The audit log as services and auditors use it: concurrent appends, proofs, queries,
//! reopening; every kind of tampering with the stored log found by `verify` at the right
//! index; crashes (SIGKILL) that lose no acknowledged event.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use audit::checkpoint::Checkpoint;
use audit::merkle;
use audit::proof::InclusionBundle;
use audit::verify::{verify, Location};
use audit::{
    AuditLog, CheckpointSigner, Event, EventKind, LogOptions, NoteVerifier, Outcome, Query, Store,
};

const ORIGIN: &str = "ipu.test/audit";

struct Fixture {
    dir: tempfile::TempDir,
    key: String,
    verifier: NoteVerifier,
}

impl Fixture {
    fn new() -> Self {
        let (signer, key) = CheckpointSigner::generate(ORIGIN).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            key: key.to_string(),
            verifier: signer.verifier().clone(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn open(&self) -> AuditLog {
        self.open_with(LogOptions::default())
    }

    fn open_with(&self, options: LogOptions) -> AuditLog {
        AuditLog::open(
            &self.path(),
            ORIGIN,
            CheckpointSigner::parse(&self.key).unwrap(),
            options,
        )
        .unwrap()
    }

    /// A log of `n` events, one checkpoint after each.
    fn with_events(n: u64) -> Self {
        let f = Self::new();
        let log = f.open();
        for i in 0..n {
            log.append(event(i)).unwrap();
            log.checkpoint().unwrap();
        }
        drop(log);
        f
    }

    fn verify(
        &self,
        trusted: &[String],
    ) -> Result<audit::verify::VerifyReport, audit::verify::VerifyFailure> {
        let store = Store::open(&self.path(), Duration::from_secs(5)).unwrap();
        verify(&store, &self.verifier, trusted).unwrap()
    }

    /// Raw access to the stored trees, as an attacker with the disk has.
    fn raw(&self) -> sled::Db {
        // sled releases its file lock when its background flusher stops, shortly after
        // the last handle is dropped.
        let start = std::time::Instant::now();
        loop {
            match sled::open(self.path().join("db")) {
                Ok(db) => return db,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    assert!(e.to_string().contains("lock"), "{e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}

fn event(i: u64) -> Event {
    Event::new(
        "ipu-image-svc",
        EventKind::PolicyDecision,
        if i % 3 == 0 {
            Outcome::Denied
        } else {
            Outcome::Allowed
        },
        format!("decision number {i}"),
    )
    .tenant(format!("tenant-{}", i % 4))
    .function(format!("fn-{}", i % 7))
    .image(
        "docker://registry.test/app:1",
        Some(format!("sha256:{:064x}", i % 5)),
    )
}

#[test]
fn concurrent_appends_get_unique_seqs_and_the_log_verifies() {
    let f = Fixture::new();
    let log = Arc::new(f.open());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..100)
                    .map(|i| log.append(event(t * 1000 + i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let receipts: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let seqs: HashSet<u64> = receipts.iter().map(|r| r.seq).collect();
    assert_eq!(seqs.len(), 800);
    assert_eq!(*seqs.iter().max().unwrap(), 799);
    log.checkpoint().unwrap();
    // Every receipt's leaf is the leaf of what is stored.
    for r in &receipts {
        let bytes = log.store().event_bytes(r.seq).unwrap().unwrap();
        assert_eq!(merkle::leaf_hash(&bytes), r.leaf_hash);
    }
    drop(log);
    let report = f.verify(&[]).unwrap();
    assert_eq!(report.events, 800);
    assert!(report.checkpoints >= 2);
}

#[test]
fn inclusion_and_consistency_proofs_verify_offline() {
    let f = Fixture::with_events(37);
    let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
    for index in [0, 1, 17, 36] {
        let bundle = InclusionBundle::build(&store, index).unwrap();
        // Round trip through JSON as the CLI writes it.
        let bundle: InclusionBundle =
            serde_json::from_str(&serde_json::to_string(&bundle).unwrap()).unwrap();
        let e = bundle.verify(&f.verifier).unwrap();
        assert_eq!(e.seq, index);
        assert_eq!(e.reason, format!("decision number {index}"));
        // A changed event or a proof against another key fails.
        let mut forged = bundle.clone();
        forged.event = forged.event.replacen('A', "B", 1);
        assert!(forged.verify(&f.verifier).is_err());
        let (other, _) = CheckpointSigner::generate(ORIGIN).unwrap();
        assert!(bundle.verify(other.verifier()).is_err());
    }
    // Every stored checkpoint is consistent with the latest.
    let notes: Vec<_> = store.checkpoints().map(|r| r.unwrap().1).collect();
    let latest = f.verifier.open_checkpoint(notes.last().unwrap()).unwrap();
    for note in &notes {
        let cp = f.verifier.open_checkpoint(note).unwrap();
        let proof = store.consistency_proof(cp.size, latest.size).unwrap();
        merkle::verify_consistency(cp.size, latest.size, &cp.root, &latest.root, &proof).unwrap();
    }
}

#[test]
fn queries_use_indexes_filter_exactly_and_paginate() {
    // 2500 events: two indexed windows and an unindexed tail.
    let f = Fixture::new();
    {
        let log = f.open();
        for start in (0..2500u64).step_by(100) {
            log.append_many((start..start + 100).map(event).collect())
                .unwrap();
        }
        let start = std::time::Instant::now();
        while log.store().indexed().unwrap() < 2048 {
            assert!(start.elapsed() < Duration::from_secs(30), "indexer stuck");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
    assert_eq!(store.indexed().unwrap(), 2048);
    let all: Vec<Event> = (0..2500)
        .map(|i| store.event(i).unwrap().unwrap())
        .collect();
    let check = |q: Query, pred: &dyn Fn(&Event) -> bool| {
        let want: Vec<u64> = all.iter().filter(|e| pred(e)).map(|e| e.seq).collect();
        let mut got = Vec::new();
        let mut q = q;
        q.limit = 7;
        loop {
            let page = store.query(&q).unwrap();
            got.extend(page.events.iter().map(|e| e.seq));
            match page.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        assert_eq!(got, want);
    };
    check(
        Query {
            function: Some("fn-3".into()),
            ..Query::default()
        },
        &|e| e.function.as_deref() == Some("fn-3"),
    );
    check(
        Query {
            tenant: Some("tenant-1".into()),
            outcome: Some(Outcome::Denied),
            ..Query::default()
        },
        &|e| e.tenant.as_deref() == Some("tenant-1") && e.outcome == Outcome::Denied,
    );
    let digest = format!("sha256:{:064x}", 2);
    check(
        Query {
            image_digest: Some(digest.clone()),
            kind: Some(EventKind::PolicyDecision),
            ..Query::default()
        },
        &|e| e.image.as_ref().unwrap().digest.as_deref() == Some(digest.as_str()),
    );
    let (t0, t1) = (all[50].time_ns, all[120].time_ns);
    check(
        Query {
            since_ns: Some(t0),
            until_ns: Some(t1),
            ..Query::default()
        },
        &|e| e.time_ns >= t0 && e.time_ns <= t1,
    );
    check(
        Query {
            kind: Some(EventKind::KeyRelease),
            ..Query::default()
        },
        &|_| false,
    );
    check(
        Query {
            after: Some(1500),
            outcome: Some(Outcome::Allowed),
            ..Query::default()
        },
        &|e| e.seq > 1500 && e.outcome == Outcome::Allowed,
    );
    // The index is derived: without it, the same queries give the same answers.
    drop(store);
    {
        let db = f.raw();
        db.drop_tree("index").unwrap();
        db.open_tree("meta").unwrap().remove("indexed").unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
    assert_eq!(store.indexed().unwrap(), 0);
    let q = Query {
        function: Some("fn-3".into()),
        limit: 10_000,
        ..Query::default()
    };
    let got: Vec<u64> = store
        .query(&q)
        .unwrap()
        .events
        .iter()
        .map(|e| e.seq)
        .collect();
    let want: Vec<u64> = all
        .iter()
        .filter(|e| e.function.as_deref() == Some("fn-3"))
        .map(|e| e.seq)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn reopening_keeps_everything_and_refuses_another_origin_or_key() {
    let f = Fixture::with_events(5);
    {
        let log = f.open();
        assert_eq!(log.append(event(5)).unwrap().seq, 5);
    }
    assert_eq!(f.verify(&[]).unwrap().events, 6);
    let (other, _) = CheckpointSigner::generate(ORIGIN).unwrap();
    let err = AuditLog::open(&f.path(), ORIGIN, other, LogOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not verify"), "{err}");
    let err = AuditLog::open(
        &f.path(),
        "another/origin",
        CheckpointSigner::parse(&f.key).unwrap(),
        LogOptions::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("not \"another/origin\""), "{err}");
}

#[test]
fn invalid_events_are_refused_and_leave_nothing() {
    let f = Fixture::new();
    let log = f.open();
    let err = log.append(event(0).tenant("bad\0tenant")).unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
    assert_eq!(log.store().size().unwrap(), 0);
}

// ---------------------------------------------------------------------------------------
// Tampering, each found at the right index.

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn failure_of(f: &Fixture, trusted: &[String]) -> audit::verify::VerifyFailure {
    f.verify(trusted).expect_err("tampering must be detected")
}

#[test]
fn one_changed_byte_in_an_event_is_found() {
    let f = Fixture::with_events(10);
    {
        let db = f.raw();
        let events = db.open_tree("events").unwrap();
        let mut v = events.get(key(6)).unwrap().unwrap().to_vec();
        let pos = v.windows(6).position(|w| w == b"number").unwrap();
        v[pos] = b'N';
        events.insert(key(6), v).unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert_eq!(fail.at, Location::Event(6), "{fail}");
    assert!(fail.problem.contains("changed"), "{fail}");
}

#[test]
fn a_changed_event_with_its_leaf_recomputed_is_found_by_the_checkpoints() {
    let f = Fixture::with_events(10);
    {
        let db = f.raw();
        let events = db.open_tree("events").unwrap();
        let stored = events.get(key(6)).unwrap().unwrap();
        let chunk = audit::chunk::decode(&stored).unwrap();
        let mut v = chunk.events[0].to_vec();
        let pos = v.windows(6).position(|w| w == b"number").unwrap();
        v[pos] = b'N';
        let forged = audit::chunk::encode(&[merkle::leaf_hash(&v)], &[v]);
        events.insert(key(6), forged).unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    // The checkpoint signed right after event 6 no longer matches.
    assert_eq!(fail.index(), 6, "{fail}");
    assert!(fail.problem.contains("not what checkpoint"), "{fail}");
}

#[test]
fn a_deleted_event_is_found() {
    let f = Fixture::with_events(10);
    {
        let db = f.raw();
        db.open_tree("events").unwrap().remove(key(4)).unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert_eq!(fail.at, Location::Event(4), "{fail}");
    assert!(fail.problem.contains("missing"), "{fail}");
}

#[test]
fn two_reordered_events_are_found() {
    let f = Fixture::with_events(10);
    {
        let db = f.raw();
        let events = db.open_tree("events").unwrap();
        let a = events.get(key(3)).unwrap().unwrap();
        let b = events.get(key(4)).unwrap().unwrap();
        events.insert(key(3), b).unwrap();
        events.insert(key(4), a).unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert_eq!(fail.at, Location::Event(3), "{fail}");
    assert!(fail.problem.contains("reordered"), "{fail}");
}

#[test]
fn a_truncated_tail_is_found() {
    let f = Fixture::with_events(10);
    let kept_checkpoint = {
        let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
        store.latest_checkpoint().unwrap().unwrap()
    };
    {
        let db = f.raw();
        let events = db.open_tree("events").unwrap();
        for i in 7..10 {
            events.remove(key(i)).unwrap();
        }
        db.open_tree("meta")
            .unwrap()
            .insert("size", &7u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert_eq!(fail.at, Location::Event(7), "{fail}");
    assert!(fail.problem.contains("truncated"), "{fail}");

    // The attacker also drops the checkpoints and tree nodes that mention the lost tail:
    // the log looks whole, but a checkpoint the auditor kept still catches it.
    {
        let db = f.raw();
        let cps = db.open_tree("checkpoints").unwrap();
        let doomed: Vec<_> = cps
            .iter()
            .map(|r| r.unwrap())
            .filter(|(_, v)| {
                String::from_utf8_lossy(v)
                    .lines()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    > 7
            })
            .map(|(k, _)| k)
            .collect();
        for k in doomed {
            cps.remove(k).unwrap();
        }
        let nodes = db.open_tree("nodes").unwrap();
        let doomed: Vec<_> = nodes
            .iter()
            .map(|r| r.unwrap().0)
            .filter(|k| {
                let level = k[0] as u32;
                let index = u64::from_be_bytes(k[1..9].try_into().unwrap());
                (index + 1) << level > 7
            })
            .collect();
        for k in doomed {
            nodes.remove(k).unwrap();
        }
        db.flush().unwrap();
    }
    f.verify(&[])
        .expect("internally consistent after a careful truncation");
    let fail = failure_of(&f, &[kept_checkpoint]);
    assert_eq!(fail.index(), 7, "{fail}");
    assert!(fail.problem.contains("truncated"), "{fail}");
}

#[test]
fn a_replaced_checkpoint_is_found() {
    let f = Fixture::with_events(10);
    let (other, _) = CheckpointSigner::generate(ORIGIN).unwrap();
    {
        let db = f.raw();
        let cps = db.open_tree("checkpoints").unwrap();
        let (k, v) = cps.iter().nth(4).unwrap().unwrap();
        let cp = f
            .verifier
            .open_checkpoint(&String::from_utf8_lossy(&v))
            .unwrap();
        cps.insert(k, other.sign_checkpoint(&cp).as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert!(
        matches!(fail.at, Location::Checkpoint { number: 4, .. }),
        "{fail}"
    );
    assert!(fail.problem.contains("no signature by key"), "{fail}");

    // A checkpoint edited in place (its signature no longer matches).
    let f = Fixture::with_events(10);
    {
        let db = f.raw();
        let cps = db.open_tree("checkpoints").unwrap();
        let (k, v) = cps.iter().nth(6).unwrap().unwrap();
        let edited = String::from_utf8_lossy(&v).replacen("\n6\n", "\n5\n", 1);
        cps.insert(k, edited.as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert!(
        matches!(fail.at, Location::Checkpoint { number: 6, .. }),
        "{fail}"
    );
    assert!(fail.problem.contains("does not verify"), "{fail}");
}

#[test]
fn a_fork_is_found_inside_the_log_and_against_a_kept_checkpoint() {
    // Two signed checkpoints of one size with different roots, both in the log.
    let f = Fixture::with_events(10);
    let signer = CheckpointSigner::parse(&f.key).unwrap();
    {
        let db = f.raw();
        let cps = db.open_tree("checkpoints").unwrap();
        let fork = signer.sign_checkpoint(&Checkpoint {
            origin: ORIGIN.into(),
            size: 10,
            root: [9u8; 32],
            extensions: vec![],
        });
        cps.insert(u64::MAX.to_be_bytes(), fork.as_bytes()).unwrap();
        db.flush().unwrap();
    }
    let fail = failure_of(&f, &[]);
    assert!(fail.problem.contains("fork"), "{fail}");
    assert_eq!(fail.index(), 10, "{fail}");

    // An attacker with the signing key rewrites history consistently (event 2 changed,
    // tree and checkpoints redone): only a checkpoint kept outside the log shows the fork.
    let f = Fixture::with_events(10);
    let kept = {
        let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
        store.latest_checkpoint().unwrap().unwrap()
    };
    {
        let db = f.raw();
        for t in ["events", "nodes", "checkpoints", "index", "meta"] {
            db.drop_tree(t).unwrap();
        }
        db.flush().unwrap();
    }
    {
        let log = f.open();
        for i in 0..10 {
            let mut e = event(i);
            if i == 2 {
                e.reason = "history rewritten".into();
            }
            log.append(e).unwrap();
        }
        log.checkpoint().unwrap();
    }
    f.verify(&[])
        .expect("a consistent rewrite verifies on its own");
    let fail = failure_of(&f, &[kept]);
    assert!(
        matches!(fail.at, Location::External { size: 10, .. }),
        "{fail}"
    );
}

// ---------------------------------------------------------------------------------------
// Crashes.

/// The crash test's writer: this test binary run again with `AUDIT_CRASH_WRITER` set
/// appends from 4 threads until killed, printing each acknowledged (durable) event.
#[test]
fn crash_writer() {
    let Ok(spec) = std::env::var("AUDIT_CRASH_WRITER") else {
        return; // an ordinary test run: nothing to do
    };
    let (dir, key) = spec.split_once('|').unwrap();
    let signer = CheckpointSigner::parse(&std::fs::read_to_string(key).unwrap()).unwrap();
    let options = LogOptions {
        checkpoint_interval: Duration::from_millis(20),
        ..LogOptions::default()
    };
    let log = Arc::new(AuditLog::open(dir.as_ref(), ORIGIN, signer, options).unwrap());
    let out = Arc::new(std::sync::Mutex::new(()));
    let pid = std::process::id();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (log, out) = (log.clone(), out.clone());
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let reason = format!("p{pid}-t{t}-{i}");
                    let r = log
                        .append(Event::new(
                            "crash",
                            EventKind::Error,
                            Outcome::Success,
                            &reason,
                        ))
                        .unwrap();
                    let _guard = out.lock().unwrap();
                    use std::io::Write;
                    let mut o = std::io::stdout().lock();
                    writeln!(o, "ACK {} {reason}", r.seq).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

fn acknowledged(stdout: &str) -> BTreeMap<u64, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let (seq, reason) = l.strip_prefix("ACK ")?.split_once(' ')?;
            Some((seq.parse().ok()?, reason.to_string()))
        })
        .collect()
}

#[test]
fn sigkill_in_a_loop_loses_no_acknowledged_event() {
    let f = Fixture::new();
    let key_file = f.dir.path().join("signer.key");
    std::fs::write(&key_file, &f.key).unwrap();
    let me = std::env::current_exe().unwrap();
    let mut all_acked = BTreeMap::new();
    for round in 0..8u64 {
        let child = Command::new(&me)
            .args([
                "--exact",
                "crash_writer",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                "AUDIT_CRASH_WRITER",
                format!("{}|{}", f.path().display(), key_file.display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150 + 37 * round));
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc_kill(child.id() as i32, 9) };
        let out = child.wait_with_output().unwrap();
        let acked = acknowledged(&String::from_utf8_lossy(&out.stdout));
        all_acked.extend(acked);
        let report = f
            .verify(&[])
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
        for (seq, reason) in &all_acked {
            let e = store
                .event(*seq)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged event {seq} lost"));
            assert_eq!(&e.reason, reason);
        }
        assert!(report.events >= all_acked.len() as u64);
    }
    assert!(
        all_acked.len() > 50,
        "only {} events acknowledged",
        all_acked.len()
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn writer_processes_take_turns_and_nothing_is_lost() {
    let f = Fixture::new();
    let key_file = f.dir.path().join("signer.key");
    std::fs::write(&key_file, &f.key).unwrap();
    let bin = env!("CARGO_BIN_EXE_audit");
    let children: Vec<_> = (0..4)
        .map(|p| {
            let (bin, log, key_file) = (bin.to_string(), f.path(), key_file.clone());
            std::thread::spawn(move || {
                for i in 0..5 {
                    let out = Command::new(&bin)
                        .args(["append", "--log"])
                        .arg(&log)
                        .arg("--signer")
                        .arg(&key_file)
                        .args(["--origin", ORIGIN, "--service", "proc"])
                        .args(["--kind", "admin.test", "--outcome", "success"])
                        .args(["--reason", &format!("process {p} event {i}")])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            })
        })
        .collect();
    for c in children {
        c.join().unwrap();
    }
    let report = f.verify(&[]).unwrap();
    assert_eq!(report.events, 20);
    let store = Store::open(&f.path(), Duration::from_secs(5)).unwrap();
    let reasons: HashSet<String> = (0..20)
        .map(|i| store.event(i).unwrap().unwrap().reason)
        .collect();
    assert_eq!(reasons.len(), 20);
}
