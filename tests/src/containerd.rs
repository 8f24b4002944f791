//! Harness for the containerd decrypt hook: the IPU side in process (key broker with a swtpm
//! attestation, the service and its API socket) and a containerd per test with the hook as its
//! stream processor.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipu_image_svc::service::{Service, ServiceOptions};

use crate::{bin, fixtures, Swtpm};

/// What the test IPU may prefetch for the hook (`--hook-prefetch`): on, so that the tests
/// run the one-pass hook; a test that wants the service's default (off) says so.
pub const HOOK_PREFETCH: u64 = 1 << 30;

/// The IPU side: the key broker, the service and its API socket.
pub struct Ipu {
    _swtpm: Swtpm,
    pub broker: crate::broker::Running,
    pub service: Arc<Service>,
    pub api: PathBuf,
    pub audit: Arc<audit::AuditLog>,
    _rt: tokio::runtime::Runtime,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Ipu {
    /// Starts everything under `d`; images are trusted by `trust_policy` (a fixture policy).
    pub fn start(d: &Path, trust_policy: &str) -> Self {
        Self::start_with_ttl(
            d,
            trust_policy,
            ipu_image_svc::service::known::DEFAULT_VERIFIED_LAYER_TTL,
        )
    }

    /// [`start`](Self::start), with verifications good for `verified_layer_ttl`.
    pub fn start_with_ttl(d: &Path, trust_policy: &str, verified_layer_ttl: Duration) -> Self {
        Self::start_with_options(d, trust_policy, |o| {
            o.verified_layer_ttl = verified_layer_ttl
        })
    }

    /// [`start`](Self::start), with the service's options changed by `adjust`.
    pub fn start_with_options(
        d: &Path,
        trust_policy: &str,
        adjust: impl FnOnce(&mut ServiceOptions),
    ) -> Self {
        let mut options = ServiceOptions {
            max_cached_bases: 4,
            spool_memory: ipu_image_svc::service::spool::DEFAULT_SPOOL_MEMORY,
            hook_prefetch: HOOK_PREFETCH,
            ..crate::broker::service_options(d.join("ipu-state"))
        };
        adjust(&mut options);
        // As `ipu-image-svc serve` runs.
        ops::memory::reuse_freed_chunks();
        std::env::set_var("TSS2_LOG", "all+NONE");
        let (swtpm, broker) = crate::broker::start_with_tpm();
        let keys = Arc::new(broker.ipu_keys(&swtpm.tcti(), &d.join("ipu-tls")));
        let audit = crate::audit_log(&d.join("ipu-audit"));
        let service = Arc::new(crate::broker::ipu_service(
            options,
            fixtures().join("policies").join(trust_policy),
            d.join("ipu-cache"),
            keys,
            audit.clone(),
        ));
        let api = d.join("api.sock");
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(&api).unwrap()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(ipu_image_svc::service::grpc::serve(
            service.clone(),
            listener,
            0,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            _swtpm: swtpm,
            broker,
            service,
            api,
            audit,
            _rt: rt,
            _stop: stop,
        }
    }

    /// `layer.decrypt` events the hook's requests left, with their outcomes.
    pub fn hook_decrypts(&self) -> Vec<String> {
        self.hook_decrypt_events()
            .into_iter()
            .map(|e| e.outcome.as_str().to_string())
            .collect()
    }

    /// The reasons of [`hook_decrypts`](Self::hook_decrypts)' events, in the same order.
    pub fn hook_decrypt_reasons(&self) -> Vec<String> {
        self.hook_decrypt_events()
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    /// Where the HMAC of each released layer was checked (`hmac_checked`), in order.
    pub fn hook_hmac_checks(&self) -> Vec<String> {
        self.hook_decrypt_events()
            .into_iter()
            .filter_map(|e| e.details.get("hmac_checked").cloned())
            .collect()
    }

    /// The reasons of the IPU's records of layers it failed to fetch for the hook after a
    /// `Verify` (`layer.decrypt`, via `hook-prefetch`).
    pub fn prefetch_failures(&self) -> Vec<String> {
        self.layer_decrypt_events("hook-prefetch")
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    fn hook_decrypt_events(&self) -> Vec<audit::Event> {
        self.layer_decrypt_events("decrypt-hook")
    }

    fn layer_decrypt_events(&self, via: &str) -> Vec<audit::Event> {
        self.audit
            .store()
            .query(&audit::Query {
                kind: Some(audit::EventKind::LayerDecrypt),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .events
            .into_iter()
            .filter(|e| e.details.get("via").map(String::as_str) == Some(via))
            .collect()
    }
}

/// Which containerd a test runs: Debian 12's 1.6 (the system's package), Debian 13's 1.7 or
/// Debian unstable's 2.1 (both unpacked by scripts/setup.sh under [`TOOLS_DIR`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    V1_6,
    V1_7,
    V2_1,
}

/// Where scripts/setup.sh unpacks containerd 1.7 and 2.1 (`containerd-<version>`), and
/// records why it could not (`containerd-<series>.unavailable`).
pub const TOOLS_DIR: &str = "/opt/ipu-image-tools";

impl Flavour {
    pub const ALL: [Flavour; 3] = [Flavour::V1_6, Flavour::V1_7, Flavour::V2_1];

    /// "1.6", "1.7" or "2.1".
    pub fn series(self) -> &'static str {
        match self {
            Flavour::V1_6 => "1.6",
            Flavour::V1_7 => "1.7",
            Flavour::V2_1 => "2.1",
        }
    }

    /// The config file version this containerd is given: 2 for 1.x, 3 for 2.x (what each
    /// one's `containerd config default` writes).
    pub fn config_version(self) -> u32 {
        match self {
            Flavour::V1_6 | Flavour::V1_7 => 2,
            Flavour::V2_1 => 3,
        }
    }

    /// `$IPU_CONTAINERD` (1.6, 1.7 or 2.1), else (unset or empty) 1.6: the containerd that
    /// the tests which do not name one run.
    pub fn from_env() -> Flavour {
        match std::env::var("IPU_CONTAINERD") {
            Err(std::env::VarError::NotPresent) => Flavour::V1_6,
            Ok(v) if v.is_empty() => Flavour::V1_6,
            Ok(v) => Self::ALL
                .into_iter()
                .find(|f| f.series() == v)
                .unwrap_or_else(|| panic!("IPU_CONTAINERD={v}: expected 1.6, 1.7 or 2.1")),
            Err(e) => panic!("IPU_CONTAINERD: {e}"),
        }
    }

    /// This containerd's binaries. 1.6 is the system's (`containerd` and `ctr` on PATH);
    /// 1.7 and 2.1 are `$IPU_CONTAINERD_1_7_DIR` / `$IPU_CONTAINERD_2_1_DIR` if set, else the
    /// newest `TOOLS_DIR/containerd-<series>.*` that scripts/setup.sh unpacked. `None` (the
    /// caller skips, saying why) only when setup.sh recorded that it could not fetch that
    /// series; one simply missing is a failure, because CI runs setup.sh.
    pub fn binaries(self) -> Option<Binaries> {
        let dir = match self {
            Flavour::V1_6 => None,
            _ => Some(self.unpacked_dir()?),
        };
        let bin = |name: &str| match &dir {
            Some(d) => d.join("usr/bin").join(name),
            None => PathBuf::from(name),
        };
        let containerd = bin("containerd");
        let out = Command::new(&containerd)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{} --version: {e} (scripts/setup.sh installs containerd {})",
                    containerd.display(),
                    self.series()
                )
            });
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // `containerd github.com/containerd/containerd/v2 2.1.9+unknown`
        let number = version.split_whitespace().nth(2).unwrap_or_default();
        assert!(
            out.status.success() && number.starts_with(&format!("{}.", self.series())),
            "{} is not containerd {}: {version}",
            containerd.display(),
            self.series()
        );
        Some(Binaries {
            flavour: self,
            ctr: bin("ctr"),
            bin_dir: dir.map(|d| d.join("usr/bin")),
            containerd,
            version,
        })
    }

    fn unpacked_dir(self) -> Option<PathBuf> {
        let var = format!("IPU_CONTAINERD_{}_DIR", self.series().replace('.', "_"));
        if let Some(d) = std::env::var_os(&var) {
            let d = PathBuf::from(d);
            assert!(
                d.join("usr/bin/containerd").exists(),
                "${var} = {}: no usr/bin/containerd in it",
                d.display()
            );
            return Some(d);
        }
        let prefix = format!("containerd-{}.", self.series());
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(TOOLS_DIR)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                let rest = name.strip_prefix(&prefix)?;
                // 2.1.9, not 2.1.unavailable nor an interrupted 2.1.9.tmp
                let patch: u32 = rest.parse().ok()?;
                let d = e.path();
                (d.join("usr/bin/containerd").exists() && d.join("DEBIAN-VERSION").exists())
                    .then_some((patch, d))
            })
            .collect();
        found.sort();
        if let Some((_, d)) = found.pop() {
            return Some(d);
        }
        let marker = Path::new(TOOLS_DIR).join(format!("containerd-{}.unavailable", self.series()));
        if let Ok(reason) = std::fs::read_to_string(&marker) {
            eprintln!(
                "SKIPPED: containerd {} is not available: scripts/setup.sh could not fetch it ({}): {}",
                self.series(),
                marker.display(),
                reason.trim()
            );
            return None;
        }
        panic!(
            "containerd {} is not installed under {TOOLS_DIR} (containerd-{}.*): run \
             scripts/setup.sh (or set ${var})",
            self.series(),
            self.series()
        );
    }
}

/// The binaries of one containerd [`Flavour`].
#[derive(Clone, Debug)]
pub struct Binaries {
    pub flavour: Flavour,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    /// Put first on containerd's PATH, so that it starts its own containerd-shim-runc-v2
    /// (containerd looks the shim up on PATH before its own directory); `None` for the
    /// system's.
    pub bin_dir: Option<PathBuf>,
    /// `containerd --version`.
    pub version: String,
}

/// containerd with its own root, state and socket, and the hook as its stream processor for
/// encrypted layers (gzip, zstd and uncompressed), run for `tenant` and `function`.
pub struct Containerd {
    child: Child,
    pub socket: PathBuf,
    pub binaries: Binaries,
    /// runc's state directory for this containerd's containers (`ctr run --runc-root`): the
    /// shim's default, /run/containerd/runc/<namespace>, is shared by every containerd on the
    /// machine, so two tests running the same container id in the same namespace would collide.
    pub runc_root: PathBuf,
}

impl Containerd {
    /// The containerd of [`Flavour::from_env`] (1.6 unless `$IPU_CONTAINERD` says otherwise).
    pub fn start(d: &Path, api: &Path, tenant: &str, function: &str) -> Self {
        let flavour = Flavour::from_env();
        let binaries = flavour.binaries().unwrap_or_else(|| {
            panic!(
                "IPU_CONTAINERD={}: that containerd is unavailable (see above)",
                flavour.series()
            )
        });
        Self::start_with(&binaries, d, api, tenant, function)
    }

    /// The config file for `flavour`: its own root, state, socket (and ttrpc socket next to
    /// it), `opt` directory and image verifier directory under `dir`; the CRI plugins (and in
    /// 2.x NRI, on by default there, with a socket in /var/run/nri) disabled; the hook as the
    /// processor for each encrypted layer type. `[stream_processors]` is a top-level table in
    /// both config versions (checked against 1.6.20's, 1.7.24's and 2.1.9's `containerd
    /// config default`).
    pub fn config(
        flavour: Flavour,
        dir: &Path,
        socket: &Path,
        hook: &Path,
        api: &Path,
        tenant: &str,
        function: &str,
    ) -> String {
        let mut processors = String::from("[stream_processors]\n");
        for (id, plain) in [
            ("tar.gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
            ("tar.zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
            ("tar", "application/vnd.oci.image.layer.v1.tar"),
        ] {
            processors.push_str(&format!(
                r#"  [stream_processors."io.containerd.ocicrypt.decoder.v1.{id}"]
    accepts = ["{plain}+encrypted"]
    returns = "{plain}"
    path = "{}"
    args = ["--api", "{}", "--tenant", "{tenant}", "--function", "{function}"]
"#,
                hook.display(),
                api.display()
            ));
        }
        let (disabled, plugins) = match flavour {
            Flavour::V1_6 | Flavour::V1_7 => (
                r#"["io.containerd.grpc.v1.cri"]"#,
                format!(
                    r#"[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{}"
"#,
                    dir.join("opt").display()
                ),
            ),
            Flavour::V2_1 => (
                r#"["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]"#,
                format!(
                    r#"[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{}"
  [plugins."io.containerd.image-verifier.v1.bindir"]
    bin_dir = "{}"
"#,
                    dir.join("opt").display(),
                    dir.join("image-verifier/bin").display()
                ),
            ),
        };
        // Top-level keys before the first table, or TOML puts them in it.
        format!(
            r#"version = {version}
root = "{root}"
state = "{state}"
disabled_plugins = {disabled}

[grpc]
  address = "{socket}"

{plugins}
{processors}"#,
            version = flavour.config_version(),
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        )
    }

    /// `binaries`' containerd with its own root, state and socket under `d/containerd`.
    pub fn start_with(
        binaries: &Binaries,
        d: &Path,
        api: &Path,
        tenant: &str,
        function: &str,
    ) -> Self {
        let dir = d.join("containerd");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = Self::config(
            binaries.flavour,
            &dir,
            &socket,
            &bin("ipu-decrypt-hook"),
            api,
            tenant,
            function,
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let mut command = Command::new(&binaries.containerd);
        if let Some(bin_dir) = &binaries.bin_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let paths = std::iter::once(bin_dir.clone()).chain(std::env::split_paths(&path));
            command.env("PATH", std::env::join_paths(paths).unwrap());
        }
        let child = command
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/setup.sh installs it)",
                    binaries.containerd.display()
                )
            });
        let mut me = Self {
            child,
            socket,
            binaries: binaries.clone(),
            runc_root: dir.join("runc"),
        };
        let start = Instant::now();
        while !me.socket.exists() {
            if let Some(status) = me.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}): {}",
                    binaries.version,
                    std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} not up after 20 s",
                binaries.version
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// The daemon's process id (its CPU time is in `/proc/<pid>/stat`, and the hook's, its
    /// child's, once containerd has waited for it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new(&self.binaries.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Containerd {
    /// `ctr run --rm IMAGE` in `namespace`: the run's output. containerd can lose the output
    /// of a process that prints and exits at once (the shim's FIFO copy races the exit;
    /// containerd/containerd#770, concourse/concourse#6775), so a successful run that printed
    /// nothing is run again, up to three times; a run that fails, or prints anything, is
    /// returned as it is.
    pub fn run_image(&self, namespace: &str, image: &str, id: &str) -> Output {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out = self.ctr(
                namespace,
                &[
                    "run",
                    "--rm",
                    "--runc-root",
                    self.runc_root.to_str().unwrap(),
                    image,
                    &format!("{id}-{attempt}"),
                ],
            );
            if !out.status.success() || !out.stdout.is_empty() || attempt == 3 {
                return out;
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image built under `d` in the layout `d/layout`, tags `plain` and `enc`: busybox, an
/// executable `/hello` printing `hello from <compression>`, and `data_mb` MB of random bytes,
/// in one layer compressed with `compression` (gzip, zstd, none); `enc` is it encrypted to the
/// fixtures' RSA key (which the test broker holds). Returns the layout.
pub fn encrypted_image(d: &Path, compression: &str, data_mb: usize) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let hello = rootfs.join("hello");
    std::fs::write(
        &hello,
        format!("#!/bin/busybox sh\necho hello from {compression}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&hello, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut data = std::fs::File::create(rootfs.join("data.bin")).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..data_mb {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut chunk).unwrap();
        data.write_all(&chunk).unwrap();
    }
    let layout = d.join("layout");
    crate::run_ok(
        Command::new(bin("ocipub"))
            .args(["build", "--rootfs"])
            .arg(&rootfs)
            .arg("--layout")
            .arg(&layout)
            .args([
                "--tag",
                "plain",
                "--cmd",
                "/hello",
                "--compression",
                compression,
            ]),
    );
    crate::encrypt_plain_to_fixture_key(&layout);
    layout
}

/// `host-attach verify` of `image` for `tenant` and `function`.
pub fn verify(ipu: &Ipu, tenant: &str, function: &str, image: &str) -> Output {
    Command::new(bin("host-attach"))
        .args(["verify", "--api"])
        .arg(&ipu.api)
        .args(["--tenant", tenant, "--function", function, image])
        .output()
        .unwrap()
}

/// A DecryptLayer call for `tenant` and `function` straight to the IPU's API, the blob in
/// `chunks`: the plaintext it sent, and its trailer or its error.
pub fn decrypt_over_api(
    api: &Path,
    tenant: &str,
    function: &str,
    media_type: &str,
    chunks: Vec<Vec<u8>>,
) -> (
    Vec<u8>,
    Result<api::imagesvc::DecryptLayerTrailer, tonic::Status>,
) {
    use api::imagesvc::image_service_client::ImageServiceClient;
    use api::imagesvc::{DecryptLayerHeader, DecryptLayerRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client =
            ImageServiceClient::new(api::unix::connect(api.to_path_buf()).await.unwrap());
        let header = DecryptLayerHeader {
            tenant: tenant.into(),
            function: function.into(),
            media_type: media_type.into(),
            payload_descriptor_json: String::new(),
        };
        let requests: Vec<DecryptLayerRequest> = chunks
            .into_iter()
            .enumerate()
            .map(|(i, data)| DecryptLayerRequest {
                header: (i == 0).then(|| header.clone()),
                data: data.into(),
            })
            .collect();
        let mut plaintext = Vec::new();
        let mut inbound = match client.decrypt_layer(tokio_stream::iter(requests)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return (plaintext, Err(s)),
        };
        loop {
            match inbound.message().await {
                Ok(Some(m)) => {
                    plaintext.extend_from_slice(&m.data);
                    if let Some(t) = m.trailer {
                        return (plaintext, Ok(t));
                    }
                }
                Ok(None) => return (plaintext, Err(tonic::Status::data_loss("no trailer"))),
                Err(s) => return (plaintext, Err(s)),
            }
        }
    })
}
