//! Durable appends per second with group commit (1, 8 and 64 writer threads), and query
//! latency over 1,000,000 events (by function, by time range).
//!
//! `cargo bench -p audit --bench append_query` (`AUDIT_BENCH_EVENTS` changes the query
//! corpus size, `AUDIT_BENCH_SECS` the append duration per writer count, `BENCH_DIR` where
//! the logs go; default `target/`).
//!
//! Baseline for the appends, measured in the same run: one writer, one event per commit
//! (no batching possible), i.e. what a log without group commit achieves on this disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../tests/src/bench_report.rs"]
mod bench_report;

use audit::{AuditLog, CheckpointSigner, Event, EventKind, LogOptions, Outcome, Query};

fn event(i: u64) -> Event {
    Event::new(
        "bench",
        if i % 10 == 0 {
            EventKind::KeyDeny
        } else {
            EventKind::PolicyDecision
        },
        if i % 3 == 0 {
            Outcome::Denied
        } else {
            Outcome::Allowed
        },
        "bench event with a reason of typical length for a policy decision",
    )
    .tenant(format!("tenant-{}", i % 50))
    .function(format!("function-{}", i % 1000))
    .image(
        "docker://registry.example/team/app:1.2.3",
        Some(format!("sha256:{:064x}", i % 200)),
    )
}

fn open(dir: &Path) -> AuditLog {
    let (signer, _) = CheckpointSigner::generate("bench/audit").unwrap();
    AuditLog::open(dir, "bench/audit", signer, LogOptions::default()).unwrap()
}

fn appends_per_second(dir: &Path, writers: usize, secs: f64) -> f64 {
    let log = Arc::new(open(dir));
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (log, stop, count) = (log.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                let mut i = w as u64;
                while !stop.load(Ordering::Relaxed) {
                    log.append(event(i)).unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                    i += writers as u64;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    count.load(Ordering::Relaxed) as f64 / elapsed
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n: u64 = std::env::var("AUDIT_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let secs: f64 = std::env::var("AUDIT_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let work = tempfile::Builder::new()
        .prefix("audit-bench")
        .tempdir_in(base)
        .unwrap();

    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    println!(
        "durable appends (each append returns after fsync), {secs} s per run, median of {rounds} rounds:"
    );
    // Per round, each writer count once: the ratios to one writer are per round.
    let mut rates: Vec<(usize, Vec<f64>)> = [1usize, 8, 64].map(|w| (w, Vec::new())).to_vec();
    for round in 0..rounds {
        for (writers, v) in rates.iter_mut() {
            let dir = work.path().join(format!("w{writers}-{round}"));
            v.push(appends_per_second(&dir, *writers, secs));
        }
    }
    let baseline = bench_report::median(&rates[0].1);
    for (writers, v) in &rates {
        let rate = bench_report::median(v);
        println!(
            "  {writers:>2} writers: {rate:>10.0} appends/s  ({:.1}x one writer)",
            rate / baseline
        );
        if *writers > 1 {
            bench_report::emit(&bench_report::ratio(
                "append_query",
                &format!("durable appends: {writers} writers (group commit) / one writer"),
                (&format!("{writers} writers"), v),
                ("one writer", &rates[0].1),
                "appends/s",
                None,
            ));
        }
    }

    println!("query latency over {n} events:");
    let dir = work.path().join("corpus");
    let log = open(&dir);
    let load = Instant::now();
    let mut i = 0;
    while i < n {
        let batch: Vec<Event> = (i..(i + 4096).min(n)).map(event).collect();
        i += batch.len() as u64;
        log.append_many(batch).unwrap();
    }
    log.checkpoint().unwrap();
    println!("  loaded in {:.1} s", load.elapsed().as_secs_f64());
    let store = log.store();
    // The index is built behind the log; measure once it has caught up (all but the tail).
    while store.indexed().unwrap() + audit::store::INDEX_WINDOW <= n {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  indexed {} events {:.1} s after the load started",
        store.indexed().unwrap(),
        load.elapsed().as_secs_f64()
    );
    let first = store.event(0).unwrap().unwrap().time_ns;
    let last = store.event(n - 1).unwrap().unwrap().time_ns;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut by_function = Vec::new();
    let mut by_time = Vec::new();
    for _ in 0..200 {
        let q = Query {
            function: Some(format!("function-{}", next() % 1000)),
            limit: 100,
            ..Query::default()
        };
        let t = Instant::now();
        let page = store.query(&q).unwrap();
        by_function.push(t.elapsed());
        assert!(!page.events.is_empty());

        let from = first + next() % (last - first).max(1);
        let q = Query {
            since_ns: Some(from),
            until_ns: Some(from + 1_000_000_000),
            limit: 100,
            ..Query::default()
        };
        let t = Instant::now();
        store.query(&q).unwrap();
        by_time.push(t.elapsed());
    }
    for (name, mut v) in [("by function", by_function), ("by time range", by_time)] {
        bench_report::emit(&bench_report::value(
            "append_query",
            &format!("query {name} over {n} events, page of 100 (p50)"),
            "ms",
            &v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
            None,
        ));
        v.sort();
        println!(
            "  {name:<14} (page of 100): p50 {:>7.2} ms  p99 {:>7.2} ms",
            percentile(&v, 0.5).as_secs_f64() * 1e3,
            percentile(&v, 0.99).as_secs_f64() * 1e3
        );
    }
}
