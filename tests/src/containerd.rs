//! Harness for the containerd decrypt hook: the IPU side in process (key broker with a swtpm
//! attestation, the service and its API socket) and a containerd per test with the hook as its
//! stream processor.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipu_image_svc::service::{Service, ServiceOptions};

use crate::{bin, fixtures, Swtpm};

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
        std::env::set_var("TSS2_LOG", "all+NONE");
        let (swtpm, broker) = crate::broker::start_with_tpm();
        let keys = Arc::new(broker.ipu_keys(&swtpm.tcti(), &d.join("ipu-tls")));
        let audit = crate::audit_log(&d.join("ipu-audit"));
        let service = Arc::new(crate::broker::ipu_service(
            ServiceOptions {
                max_cached_bases: 4,
                verified_layer_ttl,
                ..crate::broker::service_options(d.join("ipu-state"))
            },
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

    fn hook_decrypt_events(&self) -> Vec<audit::Event> {
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
            .filter(|e| e.details.get("via").map(String::as_str) == Some("decrypt-hook"))
            .collect()
    }
}

/// containerd with its own root, state and socket, and the hook as its stream processor for
/// encrypted layers (gzip, zstd and uncompressed), run for `tenant` and `function`.
pub struct Containerd {
    child: Child,
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start(d: &Path, api: &Path, tenant: &str, function: &str) -> Self {
        let dir = d.join("containerd");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("containerd.sock");
        let hook = bin("ipu-decrypt-hook");
        let mut processors = String::new();
        for (id, plain) in [
            ("tar.gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
            ("tar.zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
            ("tar", "application/vnd.oci.image.layer.v1.tar"),
        ] {
            processors.push_str(&format!(
                r#"[stream_processors."io.containerd.ocicrypt.decoder.v1.{id}"]
  accepts = ["{plain}+encrypted"]
  returns = "{plain}"
  path = "{}"
  args = ["--api", "{}", "--tenant", "{tenant}", "--function", "{function}"]
"#,
                hook.display(),
                api.display()
            ));
        }
        // Top-level keys before the first table, or TOML puts them in it.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{socket}"
{processors}"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .expect("containerd (apt install containerd; scripts/setup.sh does)");
        let mut me = Self { child, socket };
        let start = Instant::now();
        while !me.socket.exists() {
            assert!(me.child.try_wait().unwrap().is_none(), "containerd exited");
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "containerd not up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new("ctr")
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
                &["run", "--rm", image, &format!("{id}-{attempt}")],
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
    crate::run_ok(
        Command::new(bin("ocipub"))
            .args(["encrypt", "--layout"])
            .arg(&layout)
            .args(["--tag", "plain", "--out-tag", "enc", "--recipient"])
            .arg(format!(
                "jwe:{}",
                fixtures().join("keys/rsa-2048/pub.pem").display()
            )),
    );
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
                data,
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
