//! A key broker fleet on loopback, as an operator runs one: replicas of `keybroker serve`
//! (the binary) on one PostgreSQL database (Debian's, a throwaway cluster), or one broker on
//! its sled store, each replica with its own state directory holding the same master key, its
//! own TLS port and Unix socket, and its own audit log under its own origin; IPUs with a
//! swtpm each, enrolled with their endorsement key, and their TLS client certificates.
//!
//! Used by `tests/tests/broker_fleet.rs` and `tests/benches/broker_fleet.rs`.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipu_image_svc::keys::broker_client::BrokerSettings;
use ipu_image_svc::keys::LayerKeyRequest;

use crate::broker::Pki;
use crate::postgres::Postgres;
use crate::{bin, ed25519_pem_pair, fixtures, Swtpm};

/// Where the replicas keep their state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetStore {
    /// One broker on its embedded sled store.
    Sled,
    /// Replicas on one PostgreSQL database.
    Postgres,
}

/// One `keybroker serve` process and its files.
pub struct Replica {
    pub name: String,
    pub port: u16,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    /// Its audit log directory (`state/audit`) and the log's origin.
    pub audit_dir: PathBuf,
    pub origin: String,
    /// Where its stderr goes (appended across restarts).
    pub log_file: PathBuf,
    child: Option<Child>,
}

impl Replica {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The audit log's verifier key (`state/audit/verifier.pub`, made at first start).
    pub fn verifier(&self) -> PathBuf {
        self.audit_dir.join("verifier.pub")
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `keybroker --socket SOCKET ...` for this replica.
    pub fn admin(&self) -> Command {
        let mut c = Command::new(bin("keybroker"));
        c.arg("--socket").arg(&self.socket);
        c
    }

    /// Starts the process and waits until both its listeners accept connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .unwrap();
        let mut child = Command::new(bin("keybroker"));
        child
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("KEYBROKER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a signal to the test's group does not reach it.
            .process_group(0);
        let mut child = crate::inherit_no_fds(&mut child).spawn().unwrap();
        let start = Instant::now();
        // Listening, not only bound: the TLS listener binds before the socket is created.
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
        {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited with {status}: {}",
                    self.name,
                    std::fs::read_to_string(&self.log_file).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{} not up",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn signal(&mut self, signal: i32) {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap();
    }

    /// SIGKILL: no drain, no flush; its open connections are cut.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM: in-flight requests finish, the audit log is closed.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An IPU: its TPM (with its persisted AK, enrolled), and the TLS files of its client
/// certificate (`ca.pem`, `ipu.pem`, `ipu.key` in `tls`).
pub struct Ipu {
    pub id: String,
    pub swtpm: Swtpm,
    pub tls: PathBuf,
}

impl Ipu {
    /// Its broker settings for these replicas (tried in this order).
    pub fn settings(&self, urls: Vec<String>) -> BrokerSettings {
        crate::broker::ipu_settings(urls, &self.swtpm.tcti(), &self.tls)
    }
}

/// What every replica is given, and the replicas.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub store: FleetStore,
    pub pg: Option<Postgres>,
    pub replicas: Vec<Replica>,
    pki: Pki,
    bundle_private: String,
    /// The reference PCR values of class `ipu-gen2` (a fresh swtpm's).
    pcrs: BTreeMap<u8, Vec<u8>>,
}

/// PCRs the class names.
pub const PCRS: [u8; 2] = [0, 7];

/// The deployment policy: class `ipu-gen2` with `pcrs`, tenant acme (any function, `oci:`
/// images) may have keys `acme-ec` and `fixtures-rsa` (imported by the tests that need
/// it); tenant globex may run but has no key.
pub fn deployment(pcrs: &BTreeMap<u8, Vec<u8>>, extra: &str) -> String {
    format!(
        r#"schema = 1
image_trust_policy = "policy-accept-anything.json"
[[ipu_class]]
name = "ipu-gen2"
pcr_bank = "sha256"
pcrs = {{ 0 = "{}", 7 = "{}" }}
[[tenant]]
name = "acme"
[[tenant.function]]
name = "*"
images = ["oci:*"]
[[tenant]]
name = "globex"
[[tenant.function]]
name = "*"
images = ["oci:*"]
[[key]]
id = "acme-ec"
images = ["oci:*"]
tenants = ["acme"]
ipu_classes = ["ipu-gen2"]
[[key]]
id = "fixtures-rsa"
images = ["oci:*"]
tenants = ["acme"]
ipu_classes = ["ipu-gen2"]
{extra}"#,
        hex::encode(&pcrs[&0]),
        hex::encode(&pcrs[&7])
    )
}

impl Fleet {
    /// `n` replicas on `store` (PostgreSQL: a new cluster, database migrated; sled: `n` must
    /// be 1), started, with policy version 1 (PCR values from `pcrs`, the values of a fresh
    /// swtpm) and the EC key `acme-ec` loaded through the first.
    pub fn start(store: FleetStore, n: usize, pcrs: &BTreeMap<u8, Vec<u8>>) -> Fleet {
        Self::start_with(store, n, pcrs, false)
    }

    /// As [`Fleet::start`], PostgreSQL with fsync on (`pg_fsync`, as in production) or off
    /// (the tests).
    pub fn start_with(
        store: FleetStore,
        n: usize,
        pcrs: &BTreeMap<u8, Vec<u8>>,
        pg_fsync: bool,
    ) -> Fleet {
        assert!(n >= 1 && (store == FleetStore::Postgres || n == 1));
        let dir = tempfile::Builder::new().prefix("fleet").tempdir().unwrap();
        let d = dir.path();
        let (pg, db) = match store {
            FleetStore::Postgres => {
                let pg = Postgres::start_with(pg_fsync);
                let url = pg.create_db("keybroker");
                keybroker::store::postgres::PgStore::connect(&url)
                    .unwrap()
                    .migrate()
                    .unwrap();
                (Some(pg), Some(url))
            }
            FleetStore::Sled => (None, None),
        };
        // The platform PKI; the master key every replica is provisioned with; the policy
        // signer.
        let pki = Pki::new();
        std::fs::create_dir_all(d.join("pki")).unwrap();
        std::fs::create_dir_all(d.join("run")).unwrap();
        std::fs::write(d.join("pki/ca.pem"), pki.ca_pem()).unwrap();
        let master = d.join("master.key");
        keybroker::keystore::MasterKey::load_or_create(&master).unwrap();
        let (bundle_private, bundle_public) = ed25519_pem_pair();
        std::fs::write(d.join("bundle.pub"), bundle_public).unwrap();
        let mut replicas = Vec::new();
        for i in 0..n {
            let name = format!("kb-{i}");
            let state = d.join(&name);
            std::fs::create_dir_all(&state).unwrap();
            std::fs::copy(&master, state.join("master.key")).unwrap();
            let (cert, key) = pki.issue(&format!("{name}.test"), Some("broker"), true);
            std::fs::write(d.join(format!("pki/{name}.pem")), cert).unwrap();
            std::fs::write(d.join(format!("pki/{name}.key")), key).unwrap();
            let port = crate::free_port();
            let origin = format!("keybroker/{name}");
            let store_line = db
                .as_ref()
                .map(|url| format!("store = {url:?}\n"))
                .unwrap_or_default();
            let config = d.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"state_dir = "{name}"
{store_line}bundle_keys = ["bundle.pub"]
session_ttl = "5m"
audit_origin = "{origin}"
[tls]
listen = "127.0.0.1:{port}"
cert = "pki/{name}.pem"
key = "pki/{name}.key"
client_ca = "pki/ca.pem"
[unix]
socket = "run/{name}.sock"
"#
                ),
            )
            .unwrap();
            replicas.push(Replica {
                port,
                config,
                socket: d.join(format!("run/{name}.sock")),
                audit_dir: state.join("audit"),
                state,
                origin,
                log_file: d.join(format!("{name}.log")),
                child: None,
                name,
            });
        }
        let mut fleet = Fleet {
            dir,
            store,
            pg,
            replicas,
            pki,
            bundle_private,
            pcrs: pcrs.clone(),
        };
        for r in &mut fleet.replicas {
            r.start();
        }
        fleet.load_policy(1, "");
        crate::run_ok(
            fleet.replicas[0]
                .admin()
                .args(["keys", "create", "--id", "acme-ec", "--kind", "ec-p256"]),
        );
        fleet
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Every replica's URL, in order.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(Replica::url).collect()
    }

    /// Signs policy `version` (the deployment policy plus `extra` TOML) and loads it through
    /// the first replica.
    pub fn load_policy(&self, version: u64, extra: &str) {
        let content = policy::deploy::bundle::BundleContent {
            version,
            deployment: deployment(&self.pcrs, extra),
            image_trust: std::fs::read_to_string(
                fixtures().join("policies/policy-accept-anything.json"),
            )
            .unwrap(),
        };
        let bundle = policy::deploy::bundle::sign(&content, self.bundle_private.as_bytes())
            .unwrap()
            .into_bytes();
        let path = self.path(&format!("bundle-{version}.json"));
        std::fs::write(&path, bundle).unwrap();
        crate::run_ok(self.replicas[0].admin().args(["policy", "load"]).arg(&path));
    }

    /// A new IPU `id`: a swtpm, its AK and EK enrolled (class `ipu-gen2`) through the first
    /// replica, a client certificate (role ipu) in `id/tls`.
    pub fn ipu(&self, id: &str, swtpm: Swtpm) -> Ipu {
        let tls = self.enroll(id, &swtpm.tcti());
        Ipu {
            id: id.to_string(),
            swtpm,
            tls,
        }
    }

    /// Enrolls the TPM at `tcti` as IPU `id` (its AK and EK, class `ipu-gen2`) through the
    /// first replica and issues its client certificate (role ipu); returns the directory of
    /// its TLS files. A TPM may be enrolled in several fleets.
    pub fn enroll(&self, id: &str, tcti: &str) -> PathBuf {
        let d = self.path(id);
        let tls = d.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let mut tpm =
            ipu_image_svc::tpm::Tpm::open_persistent(tcti, ipu_image_svc::tpm::DEFAULT_AK_HANDLE)
                .unwrap();
        assert_eq!(
            tpm.read_pcrs(&PCRS).unwrap(),
            self.pcrs,
            "every IPU of the class has the same PCR values"
        );
        std::fs::write(d.join("ak.tpmt"), tpm.ak_template()).unwrap();
        std::fs::write(d.join("ek.tpmt"), tpm.ek_template().unwrap()).unwrap();
        drop(tpm);
        crate::run_ok(
            self.replicas[0]
                .admin()
                .args(["ipus", "enroll", "--id", id, "--class", "ipu-gen2"])
                .arg("--ak-template")
                .arg(d.join("ak.tpmt"))
                .arg("--ek-template")
                .arg(d.join("ek.tpmt")),
        );
        let (cert, key) = self.pki.issue(&format!("{id}.example"), Some("ipu"), false);
        std::fs::write(tls.join("ca.pem"), self.pki.ca_pem()).unwrap();
        std::fs::write(tls.join("ipu.pem"), cert).unwrap();
        std::fs::write(tls.join("ipu.key"), key).unwrap();
        tls
    }

    /// The fixture layer (`enc-signed`, layer 0) with its private options wrapped again by
    /// the broker's key provider to `acme-ec` (through the first replica's socket, as a
    /// publisher's ocicrypt does), and those private options to compare a release with.
    pub fn layer(&self) -> Layer {
        let fixture = crate::broker::enc_signed_layer();
        let rsa = ocicrypt::keys::PrivateKey::from_pem(
            &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
        )
        .unwrap();
        let privopts =
            ocicrypt::jwe::unwrap(&fixture.annotations[ocicrypt::ANNOTATION_KEYS_JWE], &[rsa])
                .unwrap();
        let request = ocicrypt::keyprovider::Request::wrap("ipubroker", b"acme-ec", &privopts);
        let reply = keybroker::provider_command::relay(
            &self.replicas[0].socket,
            &serde_json::to_vec(&request).unwrap(),
        )
        .unwrap();
        let reply: ocicrypt::keyprovider::Reply = serde_json::from_slice(&reply).unwrap();
        let wrapped = reply
            .keywrapresults
            .and_then(|r| r.annotation)
            .expect("the broker wrapped the key");
        let annotation = ocicrypt::keyprovider::join_annotation(&[wrapped.as_slice().to_vec()]);
        let mut annotations = ocicrypt::Annotations::new();
        annotations.insert(
            format!("{}ipubroker", ocicrypt::ANNOTATION_KEYS_PROVIDER_PREFIX),
            annotation,
        );
        let symkey = serde_json::from_slice::<serde_json::Value>(&privopts).unwrap()["symkey"]
            .as_str()
            .unwrap()
            .to_string();
        Layer {
            image: fixture.image,
            image_digest: fixture.image_digest,
            layer_digest: fixture.layer_digest,
            annotations,
            symkey,
        }
    }
}

/// A layer wrapped to the broker's EC key.
pub struct Layer {
    pub image: String,
    pub image_digest: String,
    pub layer_digest: String,
    pub annotations: ocicrypt::Annotations,
    /// The layer's symmetric key (base64, as in the private options): what a release opens.
    pub symkey: String,
}

impl Layer {
    /// The release request of this layer for `tenant` and `function`.
    pub fn request<'a>(&'a self, tenant: &'a str, function: &'a str) -> LayerKeyRequest<'a> {
        LayerKeyRequest {
            image: &self.image,
            image_digest: &self.image_digest,
            layer_digest: &self.layer_digest,
            annotations: &self.annotations,
            tenant,
            function,
            grant: None,
        }
    }

    /// Whether released private options are this layer's.
    pub fn opens(&self, privopts: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(privopts)
            .ok()
            .and_then(|v| v["symkey"].as_str().map(|s| s == self.symkey))
            .unwrap_or(false)
    }
}

/// The PCR values of a fresh swtpm (every IPU of the fleet's class has them).
pub fn fresh_pcrs(swtpm: &Swtpm) -> BTreeMap<u8, Vec<u8>> {
    ipu_image_svc::tpm::Tpm::open(&swtpm.tcti())
        .unwrap()
        .read_pcrs(&PCRS)
        .unwrap()
}

/// `audit query` merging the replicas' logs (each verified with its key): the events of
/// `kind`, as `(origin, event JSON)`. Panics if a log does not verify.
pub fn merged_events(replicas: &[Replica], kind: &str) -> Vec<(String, serde_json::Value)> {
    let mut cmd = Command::new(bin("audit"));
    cmd.arg("query");
    for r in replicas {
        cmd.arg("--log").arg(&r.audit_dir);
        cmd.arg("--key").arg(r.verifier());
    }
    cmd.args(["--json", "--limit", "1000000", "--kind", kind]);
    let out = crate::run_ok(&mut cmd);
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["origin"].as_str().unwrap().to_string(), v["event"].take())
        })
        .collect()
}

/// The replica whose URL is `url`.
pub fn by_url<'a>(replicas: &'a [Replica], url: &str) -> &'a Replica {
    replicas
        .iter()
        .find(|r| r.url() == url)
        .unwrap_or_else(|| panic!("no replica at {url}"))
}

/// Needed by callers that wait for a path to appear.
pub fn wait_for(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
