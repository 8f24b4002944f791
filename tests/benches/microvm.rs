//! The function in a microVM (`host-attach run --vm`: QEMU, the clone a hot-plugged
//! vhost-user-blk-pci device) against the runc path (`host-attach run`: the clone attached
//! over NBD as a FUSE file and a loop device on the host), same run, same image, same IPU:
//!
//! 1. Warm start to the function's first output (the image's base already cached): from
//!    spawning `host-attach run` to the first byte of the function's stdout, `STARTS`
//!    (default 50) starts of each path, alternated; p50 and p99. Target for the microVM:
//!    p50 <= 300 ms.
//! 2. Sequential read of the image's `DATA_MB` (default 1024) MB file inside the function
//!    (`dd bs=1M` to /dev/null, timed inside the function by /proc/uptime), in the guest through vhost-user-blk and
//!    on the host through NBD: MB/s, medians of `READ_ROUNDS` (default 5), and the ratio.
//!    Target: vhost-user-blk >= 3x NBD.
//! 3. Hot-remove to erase on the record: from the IPU's audit event of the front-end's release
//!    (the guest acknowledged `device_del` and QEMU closed the socket) to the clone's erase
//!    event, p50 over the microVM starts.
//!
//! The IPU runs in process (its API on a Unix socket), layer keys from the key broker through
//! an attested session (swtpm). The accelerator is host-attach's choice (`--vm-accel auto`),
//! printed: on a host whose KVM is PVM it is TCG, and the figures are TCG's.
//!
//! `cargo build --release --workspace --bins && cargo bench -p integration-tests --bench
//! microvm` (root: QEMU, FUSE, loop devices, runc; host-attach runs from target/release)

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::containerd::{encrypted_image, Ipu};
use integration_tests::{bin, is_root};

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `host-attach run [--vm]` of `image` with `command`.
fn host_attach(api: &std::path::Path, vm: bool, image: &str, command: &[&str]) -> Command {
    let mut c = Command::new(bin("host-attach"));
    c.arg("run")
        .args(if vm { &["--vm"][..] } else { &[][..] })
        .arg("--api")
        .arg(api)
        .args(["--tenant", "acme", "--function", "bench", image, "--"])
        .args(command);
    c
}

/// Time to the first byte of the function's stdout; the whole output and the exit status
/// checked.
fn first_output(api: &std::path::Path, vm: bool, image: &str) -> Duration {
    let started = Instant::now();
    let mut child = host_attach(api, vm, image, &["/hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    let n = stdout.read(&mut first).unwrap();
    let took = started.elapsed();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{rest}", String::from_utf8_lossy(&first[..n]));
    assert!(
        out.status.success() && text == "hello from none\n",
        "vm={vm}: {text:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// MB/s of `dd if=/data.bin of=/dev/null bs=1M` in the function, timed inside it by
/// /proc/uptime (10 ms steps: under 1% of a read of 1 GiB at up to 1 GB/s).
fn read_rate(api: &std::path::Path, vm: bool, image: &str, data_mb: usize) -> f64 {
    let out = host_attach(
        api,
        vm,
        image,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "read t0 x </proc/uptime; /bin/busybox dd if=/data.bin of=/dev/null bs=1M 2>/dev/null; \
             read t1 x </proc/uptime; echo $t0 $t1",
        ],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vm={vm}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: Vec<f64> = stdout
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    (data_mb as f64 * 1_048_576.0) / (t[1] - t[0]).max(0.01) / 1e6
}

fn main() {
    if !is_root() {
        println!("microvm: skipped (needs root for QEMU, FUSE, loop devices and runc)");
        return;
    }
    let (starts, data_mb, read_rounds) = (
        env("STARTS", 50),
        env("DATA_MB", 1024),
        env("READ_ROUNDS", 5),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let layout = encrypted_image(d, "none", data_mb);
    let image = format!("oci:{}:enc", layout.display());
    let ipu = Ipu::start_with_options(d, "policy-accept-anything.json", |_| {});
    let accel = host_attach(&ipu.api, true, &image, &["/bin/busybox", "true"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&accel.stderr);
    assert!(accel.status.success(), "{said}");
    println!(
        "microVM: {}",
        said.lines()
            .find_map(|l| l.strip_prefix("host-attach: running the function in a microVM on "))
            .unwrap_or("?")
    );
    // Warm: the base is built, both paths have run once. Then one warm start of each with
    // `--timings`: where its time goes.
    first_output(&ipu.api, false, &image);
    first_output(&ipu.api, true, &image);
    for (name, vm) in [("runc", false), ("microVM", true)] {
        let out = Command::new(bin("host-attach"))
            .args(["run", "--timings"])
            .args(if vm { &["--vm"][..] } else { &[][..] })
            .arg("--api")
            .arg(&ipu.api)
            .args([
                "--tenant",
                "acme",
                "--function",
                "bench",
                &image,
                "--",
                "/hello",
            ])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        let table: Vec<&str> = said
            .lines()
            .skip_while(|l| !l.starts_with("stage"))
            .collect();
        assert!(table.iter().any(|l| l.starts_with("run ")), "{said}");
        println!("one warm start, {name}, host-attach run --timings:");
        for l in table {
            println!("  {l}");
        }
    }

    let (mut vm, mut runc) = (Vec::new(), Vec::new());
    for _ in 0..starts {
        vm.push(first_output(&ipu.api, true, &image).as_secs_f64() * 1e3);
        runc.push(first_output(&ipu.api, false, &image).as_secs_f64() * 1e3);
    }
    println!("warm start to first output, {starts} starts each, alternated:");
    for (name, v) in [("microVM (vhost-user-blk)", &vm), ("runc (NBD)", &runc)] {
        println!(
            "  {name:26} p50 {:8.1} ms  p99 {:8.1} ms  min {:8.1} ms",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 0.0)
        );
    }
    println!(
        "  ratio microVM / runc (p50): {:.2}; target microVM p50 <= 300 ms",
        pct(&vm, 0.5) / pct(&runc, 0.5)
    );

    use integration_tests::bench_report::{emit, ratio, value, Target};
    emit(&value(
        "microvm",
        "warm start to first output, microVM (p50)",
        "ms",
        &vm,
        Some(Target::AtMost(300.0)),
    ));
    emit(&ratio(
        "microvm",
        "warm start to first output: microVM / runc",
        ("microVM (vhost-user-blk)", &vm),
        ("runc (NBD)", &runc),
        "ms",
        None,
    ));

    let (mut guest, mut host) = (Vec::new(), Vec::new());
    for _ in 0..read_rounds {
        guest.push(read_rate(&ipu.api, true, &image, data_mb));
        host.push(read_rate(&ipu.api, false, &image, data_mb));
    }
    let mut ratios: Vec<f64> = guest.iter().zip(&host).map(|(g, h)| g / h).collect();
    ratios.sort_by(f64::total_cmp);
    println!("sequential read of {data_mb} MB (dd bs=1M), median of {read_rounds} rounds:");
    println!(
        "  in the guest, vhost-user-blk: {:8.1} MB/s",
        pct(&guest, 0.5)
    );
    println!(
        "  on the host, NBD (FUSE file): {:8.1} MB/s",
        pct(&host, 0.5)
    );
    println!(
        "  ratio vhost-user-blk / NBD: {:.2} (target >= 3); per round: min {:.2}, max {:.2}",
        pct(&guest, 0.5) / pct(&host, 0.5),
        ratios[0],
        ratios[ratios.len() - 1]
    );

    emit(&ratio(
        "microvm",
        &format!("sequential read of {data_mb} MB: vhost-user-blk / NBD"),
        ("guest, vhost-user-blk", &guest),
        ("host, NBD", &host),
        "MB/s",
        Some(Target::AtLeast(3.0)),
    ));

    // The IPU's record: per clone, the front-end's release, then the erase.
    let events = ipu
        .audit
        .store()
        .query(&audit::Query {
            limit: 100_000,
            ..Default::default()
        })
        .unwrap()
        .events;
    let mut latencies = Vec::new();
    for released in events.iter().filter(|e| {
        e.kind == audit::EventKind::ExportHotRemove && e.reason.contains("released the device")
    }) {
        let clone = &released.details["clone_id"];
        if let Some(erased) = events.iter().find(|e| {
            e.kind == audit::EventKind::CloneErase && e.details.get("clone_id") == Some(clone)
        }) {
            latencies.push((erased.time_ns - released.time_ns) as f64 / 1e6);
        }
    }
    assert!(latencies.len() >= starts, "{} releases", latencies.len());
    emit(&value(
        "microvm",
        "hot-remove (front-end released) to erase (p50)",
        "ms",
        &latencies,
        None,
    ));
    println!(
        "hot-remove (front-end released) to erase on the record: p50 {:.1} ms, p99 {:.1} ms over {} microVM runs",
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        latencies.len()
    );
}
