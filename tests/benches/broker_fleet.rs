//! Key broker fleet throughput: attest + release rounds per second, and each round's
//! latency (p50/p99), with 16 IPUs (a swtpm each) running rounds concurrently, for one
//! broker on its sled store, one replica on PostgreSQL and three replicas on one
//! PostgreSQL database, all in the same run. A round is what an IPU does for a function
//! start with no session: challenge, TPM quote, attest, release of one layer key wrapped to
//! the broker's EC P-256 key, and opening it. The brokers are `keybroker serve` (the
//! release binary) as in `tests/src/fleet.rs`; PostgreSQL runs with fsync on, as in
//! production (`PG_FSYNC=off` to compare).
//!
//! Each measurement round runs every configuration for `WINDOW_SECS` (default 3) with the
//! 16 IPUs, then one IPU alone for a second (the latency of an unloaded fleet), then the 16
//! IPUs releasing keys alone on the sessions they hold for half a window (what every
//! function start costs between an IPU's attestations); the
//! configurations are interleaved so that they share the machine's conditions. Reported:
//! the median over `ROUNDS` (default 5) rounds with the spread (min..max), the ratio of
//! each PostgreSQL configuration to sled (per round, then its median), and the CPU time
//! each part spends per round (brokers, PostgreSQL, the swtpms, the IPU side in this
//! process): where the time goes.
//!
//! `cargo build --release -p keybroker --bin keybroker` first, then (as root: PostgreSQL
//! runs as its own user) `ROUNDS=5 cargo bench -p integration-tests --bench broker_fleet`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::fleet::{fresh_pcrs, Fleet, FleetStore, Layer};
use integration_tests::Swtpm;
use ipu_image_svc::keys::broker_client::BrokerKeys;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) a process has used so far, with (`reaped`) that of its
/// children that exited and were waited for; zero once it is gone.
fn cpu_with(pid: u32, reaped: bool) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    // Fields after the command (state is field 3): utime 14, stime 15, cutime 16, cstime 17.
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f[11] + f[12] + if reaped { f[13] + f[14] } else { 0 };
    // SAFETY: sysconf reads a constant of the system; no memory is involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

fn cpu(pid: u32) -> Duration {
    cpu_with(pid, false)
}

fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().map(|&p| cpu(p)).sum()
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One configuration: its fleet and every IPU's connection to it.
struct Setup {
    name: &'static str,
    fleet: Fleet,
    ipus: Vec<Arc<BrokerKeys>>,
    layer: Arc<Layer>,
}

impl Setup {
    fn new(name: &'static str, store: FleetStore, n: usize, swtpms: &[Swtpm]) -> Setup {
        let pcrs = fresh_pcrs(&swtpms[0]);
        let fsync = std::env::var("PG_FSYNC").map_or(true, |v| v != "off");
        let fleet = Fleet::start_with(store, n, &pcrs, fsync);
        let urls = fleet.urls();
        let tls: Vec<_> = swtpms
            .iter()
            .enumerate()
            .map(|(i, t)| fleet.enroll(&format!("ipu-{i}"), &t.tcti()))
            .collect();
        // Enrolled through the first replica, seen by the others at their next read.
        std::thread::sleep(keybroker::verifier::ENROLLMENT_REFRESH * 2);
        let ipus = swtpms
            .iter()
            .zip(&tls)
            .enumerate()
            .map(|(i, (t, tls))| {
                // Each IPU lists every replica, the first rotated: the load is spread.
                let mut order = urls.clone();
                order.rotate_left(i % urls.len());
                let settings = integration_tests::broker::ipu_settings(order, &t.tcti(), tls);
                Arc::new(
                    BrokerKeys::attest(&settings)
                        .unwrap_or_else(|e| panic!("{name}: ipu-{i}: {e}")),
                )
            })
            .collect();
        let layer = Arc::new(fleet.layer());
        Setup {
            name,
            fleet,
            ipus,
            layer,
        }
    }

    fn broker_pids(&self) -> Vec<u32> {
        self.fleet.replicas.iter().map(|r| r.pid()).collect()
    }

    /// PostgreSQL's CPU time so far: the postmaster's, the backends' that exited (it
    /// reaped them), and the running backends'.
    fn db_cpu(&self) -> Duration {
        let Some(pg) = &self.fleet.pg else {
            return Duration::ZERO;
        };
        match pg.pids().split_first() {
            Some((main, children)) => cpu_with(*main, true) + cpu_of(children),
            None => Duration::ZERO,
        }
    }

    /// `ipus` IPUs running rounds back to back for `window`: attest + release, or
    /// (`attest` false) releases alone on the sessions they hold, as an IPU does for every
    /// function start between attestations.
    fn window(&self, ipus: usize, window: Duration, swtpm_pids: &[u32], attest: bool) -> Sample {
        let brokers = self.broker_pids();
        let me = std::process::id();
        let before = [cpu_of(&brokers), self.db_cpu(), cpu_of(swtpm_pids), cpu(me)];
        let start = Instant::now();
        let deadline = start + window;
        let mut latencies: Vec<Duration> = std::thread::scope(|s| {
            let workers: Vec<_> = self.ipus[..ipus]
                .iter()
                .map(|keys| {
                    let layer = &self.layer;
                    s.spawn(move || {
                        let mut times = Vec::new();
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            if attest {
                                keys.attest_now().unwrap();
                            }
                            let r = keys.release(&layer.request("acme", "bench")).unwrap();
                            assert!(layer.opens(r.secret.as_slice()));
                            times.push(t.elapsed());
                        }
                        times
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let elapsed = start.elapsed();
        let after = [cpu_of(&brokers), self.db_cpu(), cpu_of(swtpm_pids), cpu(me)];
        latencies.sort();
        let n = latencies.len();
        let pct = |p: f64| latencies[((n as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
        let per_round =
            |i: usize| after[i].saturating_sub(before[i]).as_secs_f64() * 1e3 / n as f64;
        Sample {
            rps: n as f64 / elapsed.as_secs_f64(),
            p50: pct(0.5),
            p99: pct(0.99),
            cpu: [per_round(0), per_round(1), per_round(2), per_round(3)],
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50: f64,
    p99: f64,
    /// CPU ms per round: brokers, PostgreSQL, swtpms, IPU side.
    cpu: [f64; 4],
}

/// Median and spread of a series.
fn stat(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn show(v: Vec<f64>, width: usize, prec: usize) -> String {
    let (m, lo, hi) = stat(v);
    format!("{m:>width$.prec$} ({lo:.prec$}..{hi:.prec$})")
}

/// Moves the benchmark (and every process it starts) into a network namespace of its own,
/// with its loopback up. Each round opens its TPM anew, as the IPU does: a TCP connection
/// to the swtpm, which holds a loopback port in TIME-WAIT for a minute once closed. Tens of
/// thousands of them would exhaust the host's ports for everything else on the machine;
/// here they exhaust nothing but the namespace's (wider, and reused: its own sysctls).
fn own_network() {
    // SAFETY: called first in main, before any thread exists; unshare(2) takes no memory.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    integration_tests::run_ok(std::process::Command::new("ip").args(["link", "set", "lo", "up"]));
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000").unwrap();
    std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").unwrap();
}

fn main() {
    if !integration_tests::is_root() {
        eprintln!("skipped: PostgreSQL runs as the postgres user (run as root)");
        return;
    }
    own_network();
    std::env::set_var("TSS2_LOG", "all+NONE");
    let load_before = loadavg();
    let rounds: usize = env("ROUNDS", 5);
    let window = Duration::from_secs_f64(env("WINDOW_SECS", 3.0));
    let n_ipus: usize = env("IPUS", 16);
    let swtpms: Vec<Swtpm> = (0..n_ipus).map(|_| Swtpm::start()).collect();
    let swtpm_pids: Vec<u32> = swtpms.iter().map(Swtpm::pid).collect();
    // `ONLY=3` (say) runs the configurations whose name has it, to profile one.
    let only = std::env::var("ONLY").unwrap_or_default();
    let setups: Vec<Setup> = [
        ("sled, 1 broker", FleetStore::Sled, 1),
        ("PostgreSQL, 1 replica", FleetStore::Postgres, 1),
        ("PostgreSQL, 3 replicas", FleetStore::Postgres, 3),
    ]
    .into_iter()
    .filter(|(name, _, _)| name.contains(only.as_str()))
    .map(|(name, store, n)| Setup::new(name, store, n, &swtpms))
    .collect();
    // Warm-up: connections, caches, the first policy check.
    for s in &setups {
        s.window(n_ipus, Duration::from_millis(500), &swtpm_pids, true);
    }
    let mut loaded: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
    let mut alone: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
    let mut releases: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
    for r in 0..rounds {
        for (i, s) in setups.iter().enumerate() {
            let l = s.window(n_ipus, window, &swtpm_pids, true);
            let a = s.window(1, Duration::from_secs(1), &swtpm_pids, true);
            let rel = s.window(n_ipus, window / 2, &swtpm_pids, false);
            eprintln!(
                "round {}/{rounds}: {:<24} {:7.1} rounds/s  p50 {:6.2} ms  p99 {:6.2} ms; one IPU alone p50 {:5.2} ms",
                r + 1,
                s.name,
                l.rps,
                l.p50,
                l.p99,
                a.p50
            );
            loaded[i].push(l);
            alone[i].push(a);
            releases[i].push(rel);
        }
    }
    // Other work on the machine shares its CPUs with every configuration: say how much.
    println!(
        "machine: {} CPUs; load average before setup and now: {} / {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        loadavg()
    );
    let fsync = std::env::var("PG_FSYNC").map_or("on", |v| if v == "off" { "off" } else { "on" });
    println!(
        "attest + release rounds (challenge, swtpm quote, attest, release of an EC P-256 wrapped layer key, open), \
         {n_ipus} concurrent IPUs, {rounds} rounds of {:.0} s each, PostgreSQL fsync {fsync}; median (min..max):",
        window.as_secs_f64()
    );
    println!(
        "  {:<24} {:>24} {:>22} {:>22} {:>20}",
        "", "rounds/s", "p50 ms", "p99 ms", "1 IPU alone p50 ms"
    );
    for (i, s) in setups.iter().enumerate() {
        let l = &loaded[i];
        println!(
            "  {:<24} {} {} {} {}",
            s.name,
            show(l.iter().map(|x| x.rps).collect(), 8, 1),
            show(l.iter().map(|x| x.p50).collect(), 7, 2),
            show(l.iter().map(|x| x.p99).collect(), 7, 2),
            show(alone[i].iter().map(|x| x.p50).collect(), 6, 2),
        );
    }
    use integration_tests::bench_report::{emit, ratio, value, Target};
    for (i, s) in setups.iter().enumerate() {
        let l = &loaded[i];
        emit(&value(
            "broker_fleet",
            &format!(
                "{}: p50 of attest + release, {n_ipus} concurrent IPUs",
                s.name
            ),
            "ms",
            &l.iter().map(|x| x.p50).collect::<Vec<_>>(),
            Some(Target::AtMost(10.0)),
        ));
    }
    let with_sled = setups[0].fleet.store == FleetStore::Sled;
    for i in (1..setups.len()).filter(|_| with_sled) {
        let ratios: Vec<f64> = (0..rounds)
            .map(|r| loaded[i][r].rps / loaded[0][r].rps)
            .collect();
        let rps = |k: usize| loaded[k].iter().map(|x| x.rps).collect::<Vec<_>>();
        emit(&ratio(
            "broker_fleet",
            &format!(
                "{} / sled: attest + release rounds per second",
                setups[i].name
            ),
            (setups[i].name, &rps(i)),
            (setups[0].name, &rps(0)),
            "rounds/s",
            Some(Target::AtLeast(0.8)),
        ));
        println!(
            "  {} / sled rounds/s: {}",
            setups[i].name,
            show(ratios, 5, 2)
        );
    }
    println!("  CPU ms per round, median: brokers, PostgreSQL, swtpms, IPU side (this process)");
    for (i, s) in setups.iter().enumerate() {
        let part = |k: usize| stat(loaded[i].iter().map(|x| x.cpu[k]).collect()).0;
        println!(
            "  {:<24} {:6.2} {:6.2} {:6.2} {:6.2}",
            s.name,
            part(0),
            part(1),
            part(2),
            part(3)
        );
    }
    println!(
        "releases alone on held sessions (no attestation), {n_ipus} concurrent IPUs, {:.1} s windows; median (min..max), CPU ms per release (brokers, PostgreSQL):",
        window.as_secs_f64() / 2.0
    );
    for (i, s) in setups.iter().enumerate() {
        let r = &releases[i];
        println!(
            "  {:<24} {} releases/s  p50 {} ms  p99 {} ms  CPU {:5.2} {:5.2}",
            s.name,
            show(r.iter().map(|x| x.rps).collect(), 8, 1),
            show(r.iter().map(|x| x.p50).collect(), 6, 2),
            show(r.iter().map(|x| x.p99).collect(), 6, 2),
            stat(r.iter().map(|x| x.cpu[0]).collect()).0,
            stat(r.iter().map(|x| x.cpu[1]).collect()).0,
        );
    }
}
