//! Shared helpers for the integration tests: the fixture set, a real `docker-registry`
//! serving it on 127.0.0.1, and ext4 inspection with e2fsprogs.

pub mod bench_report;
#[cfg(test)]
mod bench_report_tests;
pub mod broker;
pub mod containerd;
pub mod fleet;
pub mod postgres;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `tests/fixtures` (copied from the shared fixture set; never edited to fit the code).
/// A binary of this workspace, from the target directory the tests run from. `cargo test`
/// builds a package's binaries only for that package's own integration tests, so
/// scripts/test.sh runs `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// `ocipub encrypt` of the layout's image tagged `plain` into `enc`, encrypted to the
/// fixtures' RSA key (`keys/rsa-2048`).
pub fn encrypt_plain_to_fixture_key(layout: &Path) {
    run_ok(
        std::process::Command::new(bin("ocipub"))
            .args(["encrypt", "--layout"])
            .arg(layout)
            .args(["--tag", "plain", "--out-tag", "enc", "--recipient"])
            .arg(format!(
                "jwe:{}",
                fixtures().join("keys/rsa-2048/pub.pem").display()
            )),
    );
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A blob of an OCI layout, by digest.
pub fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob")
}

/// The manifest a tag of an OCI layout names: its digest and its JSON.
pub fn layout_manifest(layout: &Path, tag: &str) -> (String, serde_json::Value) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()))["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = serde_json::from_slice(&layout_blob(layout, &digest)).unwrap();
    (digest, manifest)
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// One row of `expected.tsv`.
#[derive(Clone, Debug)]
pub struct Expected {
    pub tag: String,
    pub digest: String,
    pub accept: bool,
    pub reason_class: String,
}

pub fn expected() -> Vec<Expected> {
    let text = std::fs::read_to_string(fixtures().join("expected.tsv")).expect("expected.tsv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Expected {
                tag: f[0].to_string(),
                digest: f[1].to_string(),
                accept: match f[2] {
                    "accept" => true,
                    "reject" => false,
                    other => panic!("expected.tsv: outcome {other:?}"),
                },
                reason_class: f.get(3).unwrap_or(&"").to_string(),
            }
        })
        .collect()
}

/// A `docker-registry` (distribution) process serving a private copy of the fixture
/// storage on a free loopback port; killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Serves `tests/fixtures/registry`.
    pub fn start_fixtures() -> Registry {
        Self::start(Some(&fixtures().join("registry")))
    }

    /// Serves a copy of `storage` (or an empty registry).
    pub fn start(storage: Option<&Path>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root).unwrap();
        if let Some(storage) = storage {
            let status = Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", storage.display()))
                .arg(&root)
                .status()
                .expect("cp");
            assert!(status.success(), "copying registry storage failed");
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = std::fs::read_to_string(fixtures().join("registry.yml"))
                .expect("registry.yml")
                .replace("REGISTRY_ROOT", root.to_str().unwrap())
                .replace("PORT", &port.to_string());
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("docker-registry not installed: run scripts/setup.sh");
            let mut reg = Registry {
                child,
                port,
                _dir: tempfile::tempdir().unwrap(),
            };
            if reg.wait_ready(Duration::from_secs(15)) {
                reg._dir = dir;
                return reg;
            }
            last_err = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        }
        panic!("docker-registry did not start: {last_err}");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `docker://127.0.0.1:PORT/<repo>:<tag>`
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("docker://{}/{repo}:{tag}", self.host())
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let req = format!(
                    "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.port
                );
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut resp = String::new();
                    let _ = s.read_to_string(&mut resp);
                    if resp.starts_with("HTTP/1.1 200") {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes `cmd`'s process inherit no descriptor beyond stdin, stdout and stderr. A
/// long-lived child (a broker replica, PostgreSQL) spawned while another thread holds a
/// connection to a swtpm would otherwise keep that connection open after the thread closes
/// it (the TSS opens its sockets without `SOCK_CLOEXEC`), and a swtpm serves one connection
/// at a time: that TPM would never answer again.
pub fn inherit_no_fds(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec; close_range(2) is a plain
    // system call (async-signal-safe), allocates nothing and only marks descriptors
    // close-on-exec, so the exec error pipe std relies on keeps working.
    unsafe {
        cmd.pre_exec(|| {
            if libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Reads a file out of an ext4 image with debugfs (no mount needed).
pub fn ext4_cat(image: &Path, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .stderr(Stdio::piped())
        .output()
        .expect("debugfs (e2fsprogs)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("File not found") {
        return None;
    }
    Some(out.stdout)
}

/// `debugfs stat` output for a path, `None` if absent.
pub fn ext4_stat(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("File not found") {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names in a directory of an ext4 image (without `.` and `..`).
pub fn ext4_ls(image: &Path, path: &str) -> Vec<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("ls -p {path}"))
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

/// Extracts the whole ext4 image into `dir` with `debugfs rdump` (keeps modes and owners).
pub fn ext4_extract(image: &Path, dir: &Path) {
    let status = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dir.display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("debugfs");
    assert!(status.success(), "debugfs rdump failed");
}

/// `e2fsck -fn`: the image is a consistent ext4 file system.
pub fn ext4_fsck_clean(image: &Path) -> bool {
    Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// An audit log in `dir` with a throwaway signing key.
pub fn audit_log(dir: &Path) -> std::sync::Arc<audit::AuditLog> {
    let (signer, _) = audit::CheckpointSigner::generate("test/audit").unwrap();
    std::sync::Arc::new(
        audit::AuditLog::open(dir, "test/audit", signer, audit::LogOptions::default()).unwrap(),
    )
}

/// The capabilities a shipped systemd unit (dist/systemd/UNIT) keeps in its
/// `CapabilityBoundingSet=`, as setpriv names them (`sys_admin`, ...).
pub fn unit_capabilities(unit: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap_or_else(|| panic!("{}: no CapabilityBoundingSet=", path.display()));
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// `program` run as systemd runs a root service whose unit keeps only `caps` in its bounding
/// set, with NoNewPrivileges=: through setpriv, which execs it (same pid).
pub fn with_capabilities(caps: &[String], program: &Path) -> Command {
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut c = Command::new("setpriv");
    c.args(["--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all"])
        .arg(format!("--bounding-set={bounding}"))
        .arg("--")
        .arg(program);
    c
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A software TPM (`swtpm`) on two free loopback ports with a fresh state; killed on drop.
/// One per test: swtpm has no resource manager and three object slots.
pub struct Swtpm {
    child: Child,
    port: u16,
    _state: tempfile::TempDir,
}

impl Swtpm {
    pub fn start() -> Swtpm {
        let state = tempfile::tempdir().expect("tempdir");
        for _ in 0..20 {
            let port = free_port();
            if TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.path().display()))
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm not installed: run scripts/setup.sh");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Whoever answered may be another test's swtpm that took the same free
                    // port first: then this one fails to bind and exits at once. Only a
                    // child still running after that moment owns the port.
                    std::thread::sleep(Duration::from_millis(50));
                    if !matches!(child.try_wait(), Ok(None)) {
                        break;
                    }
                    return Swtpm {
                        child,
                        port,
                        _state: state,
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    /// The swtpm process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The TCTI string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the host agent attaches a clone the service prepared on a Unix socket.
pub fn host_export(p: &ipu_image_svc::service::Prepared) -> host_attach::attach::Export {
    host_attach::attach::Export::Unix {
        socket: p
            .endpoint
            .unix_socket()
            .expect("a Unix socket export")
            .to_path_buf(),
        name: p.export_name.clone(),
    }
}

/// `runc run` of the bundle at `bundle` (state under `root`) as `id`; its stdout. Panics
/// unless it succeeds.
pub fn runc_run(bundle: &Path, root: &Path, id: &str) -> String {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .output()
        .expect("runc");
    assert!(
        out.status.success(),
        "{id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the image's own command from the mounted `rootfs` as the host agent does (its hardened
/// bundle under `work`, runc); the function's stdout.
pub fn run_function(
    rootfs: &Path,
    work: &Path,
    runtime_config: &serde_json::Value,
    id: &str,
) -> String {
    use host_attach::bundle::{config, Process};
    let process = Process::from_image(runtime_config, &[], rootfs).unwrap();
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        config(&process, rootfs, "function").to_string(),
    )
    .unwrap();
    runc_run(&bundle, &work.join("runc"), id)
}

/// Whether `needle` occurs in `hay` (memchr's memmem: the tests search gigabytes).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// What a memory scan of a process found.
#[derive(Debug, Default)]
pub struct MemoryScan {
    /// Bytes read from the process's readable mappings.
    pub bytes_scanned: u64,
    /// Indexes of the needles found.
    pub found: Vec<usize>,
}

/// Reads every readable mapping of a live process through /proc/PID/mem (root, or ptrace
/// rights over it) and reports which needles occur. Mappings that cannot be read (guard
/// pages, vvar, secret memory) are skipped: what the kernel will not show is not exposed.
pub fn scan_process_memory(pid: u32, needles: &[Vec<u8>]) -> MemoryScan {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut scan = MemoryScan::default();
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut at = start;
        let mut tail: Vec<u8> = Vec::new();
        while at < end {
            let n = (end - at).min(1 << 20) as usize;
            let mut buf = vec![0u8; n];
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf).is_err() {
                break;
            }
            scan.bytes_scanned += n as u64;
            // Needles spanning two reads are found through the carried tail.
            let mut window = std::mem::take(&mut tail);
            window.extend_from_slice(&buf);
            for (i, needle) in needles.iter().enumerate() {
                if !scan.found.contains(&i) && contains(&window, needle) {
                    scan.found.push(i);
                }
            }
            let keep = longest.saturating_sub(1).min(window.len());
            tail = window[window.len() - keep..].to_vec();
            at += n as u64;
        }
    }
    scan
}

/// Per-request pipeline settings a [`local_service`] applies for a function.
pub type Configure = Box<dyn Fn(&str, &mut ipu_image_svc::pipeline::PipelineConfig) + Send + Sync>;

/// An IPU service in process under `d` (state in `d/state`, blob cache in `d/cache`, a new
/// audit log at `d/<log>`): images trusted by `trust` (a containers-policy.json document),
/// layer keys from `keys` (local ones: no broker), each request's pipeline adjusted by
/// `configure` for its function.
pub fn local_service(
    d: &Path,
    log: &str,
    trust: &str,
    keys: ipu_image_svc::keys::KeySource,
    options: ipu_image_svc::service::ServiceOptions,
    configure: Configure,
) -> (
    ipu_image_svc::service::Service,
    std::sync::Arc<audit::AuditLog>,
) {
    let audit = audit_log(&d.join(log));
    let sink: std::sync::Arc<dyn audit::AuditSink> = audit.clone();
    let cache = d.join("cache");
    let trust = trust.to_string();
    let factory: ipu_image_svc::service::PipelineFactory = Box::new(move |tenant, function| {
        let mut cfg = ipu_image_svc::pipeline::PipelineConfig::new(
            policy::Policy::parse(trust.as_bytes(), "test trust policy", None).unwrap(),
            cache.clone(),
        );
        cfg.audit = Some(sink.clone());
        cfg.tenant = Some(tenant.into());
        cfg.function = Some(function.into());
        configure(function, &mut cfg);
        Ok(cfg)
    });
    let service =
        ipu_image_svc::service::Service::start(options, factory, keys, audit.clone()).unwrap();
    (service, audit)
}

/// A trust policy that accepts any image as it is (for tests about what comes after).
pub const ACCEPT_ANYTHING: &str = r#"{"default":[{"type":"insecureAcceptAnything"}]}"#;

/// `der` as PEM with `label`.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A new Ed25519 key: its PKCS#8 PEM and its public key (SPKI) PEM.
pub fn ed25519_pem_pair() -> (String, String) {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    (
        pem_encode("PRIVATE KEY", pkcs8.as_ref()),
        pem_encode(
            "PUBLIC KEY",
            &policy::dsse::ed25519_spki(kp.public_key().as_ref()),
        ),
    )
}

/// The unencrypted, unsigned image of `rootfs` (gzip, its `Cmd` one path) built by our
/// publisher into the OCI layout `d/layout` under `tag`; its `oci:` reference.
pub fn plain_layout_image(d: &Path, rootfs: &Path, tag: &str, cmd: &str) -> String {
    let layout = publisher::layout::Layout::open_or_create(&d.join("layout")).unwrap();
    publisher::build::build(
        &layout,
        &publisher::build::BuildOptions {
            rootfs,
            tag,
            cmd: vec![cmd.into()],
            env: vec![],
            compression: publisher::build::LayerCompression::Gzip,
        },
    )
    .unwrap();
    format!("oci:{}:{tag}", layout.dir().display())
}

/// Where scripts/setup.sh unpacks cosign 3.1.1 (Debian sid's package, `dpkg-deb -x`).
pub const COSIGN3_DIR: &str = "/opt/ipu-image-tools/cosign-3.1.1";

/// The cosign 3 binary for tests: `$COSIGN` if set, else the one scripts/setup.sh unpacked
/// into [`COSIGN3_DIR`]. `None` (the caller skips, saying why) only when setup.sh recorded
/// that it could not fetch it (`<dir>.unavailable`); a cosign simply missing is a failure,
/// because CI runs setup.sh.
pub fn cosign3() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COSIGN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "$COSIGN = {} does not exist", p.display());
        return Some(p);
    }
    let bin = Path::new(COSIGN3_DIR).join("usr/bin/cosign");
    if bin.exists() {
        return Some(bin);
    }
    let marker = PathBuf::from(format!("{COSIGN3_DIR}.unavailable"));
    if let Ok(reason) = std::fs::read_to_string(&marker) {
        eprintln!(
            "SKIPPED: cosign 3.1.1 is not available: scripts/setup.sh could not fetch it ({}): {}",
            marker.display(),
            reason.trim()
        );
        return None;
    }
    panic!(
        "cosign 3.1.1 is not installed at {}: run scripts/setup.sh (or set COSIGN)",
        bin.display()
    );
}

/// A minimal HTTP/1.1 exchange with a loopback registry (plain HTTP, `Connection: close`):
/// status, headers (lowercased names) and body. For tests that push what no tool writes.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("registry");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = memchr::memmem::find(&resp, b"\r\n\r\n").expect("an HTTP response");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = resp[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = memchr::memmem::find(data, b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

/// Pushes a blob to a loopback registry (an upload session, then one PUT with the whole
/// blob); returns its digest.
pub fn push_blob(port: u16, repo: &str, bytes: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(bytes));
    let (status, headers, body) = http(
        port,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        b"",
    );
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let location = headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .expect("an upload location");
    // The location may be absolute (http://host:port/v2/...): keep the path and query.
    let path = match location.find("/v2/") {
        Some(i) => location[i..].to_string(),
        None => location,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let (status, _, body) = http(
        port,
        "PUT",
        &format!("{path}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    digest
}

/// Pushes a manifest under `reference` (a tag or its digest); returns its digest.
pub fn push_manifest(
    port: u16,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> String {
    let (status, _, body) = http(
        port,
        "PUT",
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Content-Type", media_type)],
        bytes,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    format!("sha256:{}", sha256_hex(bytes))
}
