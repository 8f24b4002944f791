//! Teardown cost against what was written: erasing a clone (revoke, destroy the key: the data
//! is unreadable from then on) with 1 MiB and with 1 GiB written, and, as the contrast, `shred`
//! of the same amount of data, all in the same run. Cryptographic erase should be flat in the
//! size written (target: 1 GiB / 1 MiB at most 1.2); overwriting is linear. Freeing the erased
//! clone's blocks, which the service does in the background after Teardown returns, is
//! measured and printed too. Before each erase the machine is left to settle (`sync`, 200 ms),
//! so that the write-back of what was just written is not counted as the erase's cost.
//!
//! `cargo bench -p ipu-image-svc --bench teardown_erase` (needs about 3 GiB free in $TMPDIR)

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipu_image_svc::blockstore::base::BaseImage;
use ipu_image_svc::blockstore::clone::CloneDevice;
use ipu_image_svc::blockstore::xts::XtsKey;
use ipu_image_svc::blockstore::BlockDevice;

#[path = "../../tests/src/bench_report.rs"]
mod bench_report;

const MIB: u64 = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9);
    let dir = tempfile::tempdir().unwrap();
    // A 1 GiB base (sparse plaintext: its content does not matter for teardown).
    let plain = dir.path().join("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(1024 * MIB)
        .unwrap();
    let base = Arc::new(
        BaseImage::build(
            &plain,
            &dir.path().join("base.img"),
            XtsKey::generate().unwrap(),
        )
        .unwrap(),
    );
    std::fs::remove_file(&plain).unwrap();
    let chunk = vec![0x5au8; 8 * MIB as usize];
    let mut results = Vec::new();
    let mut per_round = Vec::new();
    for written in [MIB, 1024 * MIB] {
        let mut erase = Vec::new();
        let mut reclaim = Vec::new();
        let mut shred = Vec::new();
        for round in 0..rounds {
            let clone =
                CloneDevice::create(base.clone(), dir.path(), &format!("c{written}-{round}"), 0)
                    .unwrap();
            let mut at = 0;
            while at < written {
                let n = (written - at).min(chunk.len() as u64) as usize;
                clone.write_at(&chunk[..n], at).unwrap();
                at += n as u64;
            }
            clone.flush().unwrap();
            // The writes' own tail (write-back of other files, page reclaim) is not the
            // erase's cost: let the machine settle, the same way for both sizes.
            Command::new("sync").status().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let t = Instant::now();
            let mut erased = clone.erase().unwrap().unwrap();
            erase.push(t.elapsed());
            assert!(erased.clusters_written >= written / (64 * 1024));
            let t = Instant::now();
            erased.reclaim().unwrap();
            reclaim.push(t.elapsed());

            // The contrast: overwrite the same amount of data in place, then delete it.
            let file = dir.path().join(format!("shred-{written}-{round}"));
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&file).unwrap();
                let mut left = written;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    f.write_all(&chunk[..n]).unwrap();
                    left -= n as u64;
                }
                f.sync_all().unwrap();
            }
            let t = Instant::now();
            let status = Command::new("shred")
                .args(["-n", "1", "-u"])
                .arg(&file)
                .status()
                .expect("shred (coreutils)");
            shred.push(t.elapsed());
            assert!(status.success());
        }
        let ms = |v: &[Duration]| v.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>();
        bench_report::emit(&bench_report::ratio(
            "teardown_erase",
            &format!("{} MiB written: crypto-erase / shred -n1 -u", written / MIB),
            ("crypto-erase", &ms(&erase)),
            ("shred", &ms(&shred)),
            "ms",
            None,
        ));
        per_round.push(ms(&erase));
        results.push((written, median(erase), median(shred), median(reclaim)));
    }
    println!("teardown, median of {rounds} rounds, same run:");
    for (written, erase, shred, reclaim) in &results {
        println!(
            "  {:>5} MiB written: crypto-erase {:>8.3} ms (then freeing its blocks {:>7.1} ms, in the background)   shred -n1 -u {:>8.1} ms",
            written / MIB,
            erase.as_secs_f64() * 1e3,
            reclaim.as_secs_f64() * 1e3,
            shred.as_secs_f64() * 1e3
        );
    }
    let (small, large) = (results[0].1, results[1].1);
    bench_report::emit(&bench_report::ratio(
        "teardown_erase",
        "crypto-erase: 1 GiB written / 1 MiB written",
        ("1 GiB", &per_round[1]),
        ("1 MiB", &per_round[0]),
        "ms",
        Some(bench_report::Target::AtMost(1.2)),
    ));
    println!(
        "  erase 1 GiB / 1 MiB: {:.2} (target <= 1.2); shred 1 GiB / 1 MiB: {:.0}",
        large.as_secs_f64() / small.as_secs_f64(),
        results[1].2.as_secs_f64() / results[0].2.as_secs_f64()
    );
}
