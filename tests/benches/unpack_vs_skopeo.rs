//! `ipu-image-svc image unpack` of an encrypted image from an OCI layout (fresh blob cache:
//! copy, decrypt, unpack, ext4) against the seed's two steps (`skopeo copy
//! --decryption-key` to an OCI layout, then `umoci unpack`), same image, same run, rounds
//! alternated (which side goes first flips every round), each side as whole processes:
//!
//! - a real tree: copies of this machine's /etc, /usr/sbin, and /usr/bin and
//!   /usr/lib/x86_64-linux-gnu (their entries taken alternately until the tree has `TREE_MB`,
//!   default 320 MB, of files, hard links counted once; the gzip layer is about a third of
//!   that), on the VM's disk and on a tmpfs. Target: ours /
//!   seed <= 0.5 on both;
//! - a single 256 MiB file of random bytes (`FILE_MIB`), on the disk. Target: <= 0.4.
//!
//! Per round, each side's wall time and peak resident memory (`wait4`'s `ru_maxrss` of each
//! process; the seed's is the larger of skopeo's and umoci's), and ours's stage timings
//! (`--timings`: fetch, verify, key release, decrypt, unpack, file system). Medians of
//! `ROUNDS` (default 5) rounds after one untimed warm-up of each side.
//!
//! `cargo build --release --workspace --bins && cargo bench -p integration-tests --bench
//! unpack_vs_skopeo` (root: the tmpfs mount; the tools run from target/release). The disk
//! side works in `BENCH_DIR` (default target/bench-work).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::bench_report::{self, median, Target};
use integration_tests::{bin, fixtures, run_ok};

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// A process's wall time, peak resident memory (KiB) and stderr.
struct Ran {
    took: Duration,
    maxrss_kib: u64,
    stderr: String,
}

/// Runs `cmd` to its end, which must be a success: its wall time and its own peak memory.
fn run_measured(cmd: &mut Command) -> Ran {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut status = 0;
    // SAFETY: `rusage` is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child (reaping it: `child` is not waited for again); `status`
    // and `usage` are valid for writes.
    let waited = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let took = started.elapsed();
    let stderr = reader.join().unwrap();
    assert!(
        waited > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed ({status:#x}): {stderr}"
    );
    drop(child);
    Ran {
        took,
        maxrss_kib: usage.ru_maxrss as u64,
        stderr,
    }
}

/// Bytes under `dir` (regular files, not following symlinks; a file with several hard links
/// once, as the layer stores it).
fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total += m.len();
            }
        }
    }
    total
}

/// `cp -a` of `from` (a file, link or directory) into `to` (created).
fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    run_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// The real tree in `rootfs`: /etc and /usr/sbin whole, then entries of /usr/bin and of the
/// library tree alternately until `mb` MB; returns its size in bytes.
fn real_tree(rootfs: &Path, mb: u64) -> u64 {
    copy(Path::new("/etc"), rootfs);
    copy(Path::new("/usr/sbin"), &rootfs.join("usr"));
    let entries = |d: &str| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    };
    let (bin, lib) = (entries("/usr/bin"), entries("/usr/lib/x86_64-linux-gnu"));
    let mut size = tree_bytes(rootfs);
    let limit = mb * 1_000_000;
    let (mut b, mut l) = (bin.iter(), lib.iter());
    let mut batch: Vec<(PathBuf, &Path)> = Vec::new();
    let (bin_dir, lib_dir) = (
        rootfs.join("usr/bin"),
        rootfs.join("usr/lib/x86_64-linux-gnu"),
    );
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&lib_dir).unwrap();
    while size < limit {
        let (x, y) = (b.next(), l.next());
        if x.is_none() && y.is_none() {
            break;
        }
        for (p, into) in [(x, &bin_dir), (y, &lib_dir)] {
            let Some(p) = p else { continue };
            let m = p.symlink_metadata().unwrap();
            size += if m.is_dir() { tree_bytes(p) } else { m.len() };
            batch.push((p.clone(), into));
        }
        if batch.len() >= 200 || size >= limit {
            // Copied, then measured as the layer will hold it (hard links once).
            for into in [&bin_dir, &lib_dir] {
                let items: Vec<&PathBuf> = batch
                    .iter()
                    .filter(|(_, i)| i == into)
                    .map(|(p, _)| p)
                    .collect();
                if !items.is_empty() {
                    run_ok(Command::new("cp").arg("-a").args(items).arg(into));
                }
            }
            batch.clear();
            size = tree_bytes(rootfs);
        }
    }
    tree_bytes(rootfs)
}

/// One file of `mib` MiB of random bytes in `rootfs`.
fn single_file(rootfs: &Path, mib: usize) -> u64 {
    use std::io::Write;
    std::fs::create_dir_all(rootfs).unwrap();
    let mut f = std::fs::File::create(rootfs.join("data.bin")).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut chunk).unwrap();
        f.write_all(&chunk).unwrap();
    }
    (mib as u64) << 20
}

/// The layout `d/layout` with `rootfs` as tags `plain` and `enc` (encrypted to the fixtures'
/// RSA key); the encrypted layer's size.
fn image(d: &Path, rootfs: &Path) -> (PathBuf, u64) {
    let layout = d.join("layout");
    run_ok(
        Command::new(bin("ocipub"))
            .args(["build", "--rootfs"])
            .arg(rootfs)
            .arg("--layout")
            .arg(&layout)
            .args(["--tag", "plain", "--compression", "gzip"]),
    );
    integration_tests::encrypt_plain_to_fixture_key(&layout);
    let (_, manifest) = integration_tests::layout_manifest(&layout, "enc");
    let size = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    (layout, size)
}

/// Our side, in `work` (emptied after): `image unpack --timings` with a fresh cache. Its
/// run and its stage table's rows (stage, ms).
fn ours(layout: &Path, work: &Path) -> (Ran, Vec<(String, f64)>) {
    std::fs::create_dir_all(work).unwrap();
    let ran = run_measured(
        Command::new(bin("ipu-image-svc"))
            .args(["image", "unpack", "--policy"])
            .arg(fixtures().join("policies/policy-accept-anything.json"))
            .arg("--cache")
            .arg(work.join("cache"))
            .arg("--audit-log")
            .arg(work.join("audit"))
            .arg("--decryption-key")
            .arg(fixtures().join("keys/rsa-2048/priv.pem"))
            .arg("--output")
            .arg(work.join("rootfs.ext4"))
            .args(["-q", "--timings"])
            .arg(format!("oci:{}:enc", layout.display()))
            .env("IPU_LOG", "off"),
    );
    let stages = ran
        .stderr
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [stage, ms, share] if share.ends_with('%') && stage != "total" => {
                    Some((stage.trim_end_matches('*').to_string(), ms.parse().ok()?))
                }
                _ => None,
            }
        })
        .collect();
    std::fs::remove_dir_all(work).unwrap();
    (ran, stages)
}

/// The seed's side, in `work` (emptied after): skopeo's run and umoci's.
fn seed(layout: &Path, work: &Path) -> (Ran, Ran) {
    std::fs::create_dir_all(work).unwrap();
    let skopeo = run_measured(
        Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--quiet", "--decryption-key"])
            .arg(fixtures().join("keys/rsa-2048/priv.pem"))
            .arg(format!("oci:{}:enc", layout.display()))
            .arg(format!("oci:{}:img", work.join("layout").display())),
    );
    let umoci = run_measured(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:img", work.join("layout").display()))
            .arg(work.join("bundle")),
    );
    std::fs::remove_dir_all(work).unwrap();
    (skopeo, umoci)
}

/// A tmpfs of its own at `at`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(at).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={mib}m,mode=0700"))
                .arg("tmpfs")
                .arg(at),
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `rounds` alternated rounds of both sides on `layout`, working in `work`: the figures.
fn compare(name: &str, layout: &Path, work: &Path, rounds: usize, target: f64) {
    let bench = "unpack_vs_skopeo";
    // Warm-up, untimed: the layout in the page cache, the binaries loaded.
    ours(layout, &work.join("ours"));
    seed(layout, &work.join("seed"));
    let (mut o, mut s) = (Vec::new(), Vec::new());
    let (mut o_mem, mut s_mem, mut sk_mem, mut um_mem) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut sk_t, mut um_t) = (Vec::new(), Vec::new());
    let mut stages: Vec<(String, Vec<f64>)> = Vec::new();
    for round in 0..rounds {
        let mut run_ours = || {
            let (ran, st) = ours(layout, &work.join("ours"));
            o.push(ran.took.as_secs_f64() * 1e3);
            o_mem.push(ran.maxrss_kib as f64 / 1024.0);
            for (stage, ms) in st {
                match stages.iter_mut().find(|(s, _)| *s == stage) {
                    Some((_, v)) => v.push(ms),
                    None => stages.push((stage, vec![ms])),
                }
            }
        };
        let mut run_seed = || {
            let (sk, um) = seed(layout, &work.join("seed"));
            s.push((sk.took + um.took).as_secs_f64() * 1e3);
            sk_t.push(sk.took.as_secs_f64() * 1e3);
            um_t.push(um.took.as_secs_f64() * 1e3);
            sk_mem.push(sk.maxrss_kib as f64 / 1024.0);
            um_mem.push(um.maxrss_kib as f64 / 1024.0);
            s_mem.push(sk.maxrss_kib.max(um.maxrss_kib) as f64 / 1024.0);
        };
        if round % 2 == 0 {
            run_ours();
            run_seed();
        } else {
            run_seed();
            run_ours();
        }
    }
    let ratios: Vec<f64> = o.iter().zip(&s).map(|(o, s)| o / s).collect();
    println!("  {name}, median of {rounds} rounds, alternated:");
    println!(
        "    ours (image unpack):      {:8.1} ms   peak {:6.1} MiB",
        median(&o),
        median(&o_mem)
    );
    println!(
        "    seed (skopeo + umoci):    {:8.1} ms   (skopeo {:.1} ms + umoci {:.1} ms)   peak {:6.1} MiB (skopeo {:.1}, umoci {:.1})",
        median(&s),
        median(&sk_t),
        median(&um_t),
        median(&s_mem),
        median(&sk_mem),
        median(&um_mem)
    );
    println!(
        "    ratio ours / seed: {:.2} (target <= {target}); per round: min {:.2}, max {:.2}",
        median(&ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max)
    );
    let total = median(&o);
    let line: Vec<String> = stages
        .iter()
        .map(|(st, v)| {
            format!(
                "{st} {:.0} ms ({:.0}%)",
                median(v),
                100.0 * median(v) / total
            )
        })
        .collect();
    println!(
        "    ours's stages (medians; decrypt and unpack busy times): {}",
        line.join(", ")
    );
    bench_report::emit(&bench_report::ratio(
        bench,
        &format!("{name}: ours / (skopeo + umoci)"),
        ("image unpack", &o),
        ("skopeo copy + umoci unpack", &s),
        "ms",
        Some(Target::AtMost(target)),
    ));
    bench_report::emit(&bench_report::ratio(
        bench,
        &format!("{name}: peak memory, ours / seed"),
        ("image unpack", &o_mem),
        ("max(skopeo, umoci)", &s_mem),
        "MiB",
        Some(Target::AtMost(1.0)),
    ));
    for (stage, v) in &stages {
        bench_report::emit(&bench_report::value(
            bench,
            &format!("{name}: ours, stage {stage}"),
            "ms",
            v,
            None,
        ));
    }
}

fn main() {
    if !integration_tests::is_root() {
        println!("unpack_vs_skopeo: skipped (needs root for the tmpfs)");
        return;
    }
    let rounds = env("ROUNDS", 5);
    let (tree_mb, file_mib) = (env("TREE_MB", 320) as u64, env("FILE_MIB", 256));
    let base = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-work"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let d = dir.path();

    let tree = d.join("tree");
    let bytes = real_tree(&tree.join("rootfs"), tree_mb);
    let (layout, layer) = image(&tree, &tree.join("rootfs"));
    std::fs::remove_dir_all(tree.join("rootfs")).unwrap();
    println!(
        "real tree (/etc, /usr/sbin, /usr/bin, /usr/lib/x86_64-linux-gnu): {:.1} MB of files, encrypted gzip layer {:.1} MB",
        bytes as f64 / 1e6,
        layer as f64 / 1e6
    );
    compare("real tree, disk", &layout, &d.join("work"), rounds, 0.5);
    {
        let tmpfs = Tmpfs::mount(&d.join("tmpfs"), 6144);
        let copied = tmpfs.0.join("layout");
        run_ok(Command::new("cp").arg("-a").arg(&layout).arg(&copied));
        compare(
            "real tree, tmpfs",
            &copied,
            &tmpfs.0.join("work"),
            rounds,
            0.5,
        );
    }
    std::fs::remove_dir_all(&tree).unwrap();

    let single = d.join("single");
    single_file(&single.join("rootfs"), file_mib);
    let (layout, layer) = image(&single, &single.join("rootfs"));
    std::fs::remove_dir_all(single.join("rootfs")).unwrap();
    println!(
        "single file of {file_mib} MiB: encrypted gzip layer {:.1} MB",
        layer as f64 / 1e6
    );
    compare(
        &format!("{file_mib} MiB single file, disk"),
        &layout,
        &d.join("work"),
        rounds,
        0.4,
    );
}
