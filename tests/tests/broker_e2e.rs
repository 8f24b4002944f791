//! The key broker end to end, through the tools as an operator runs them: `keybroker serve`
//! with a signed policy bundle, keys and IPU enrollment administered over its Unix socket, a
//! publisher encrypting with `provider:ipubroker:<key>` through the command-form key
//! provider, and `ipu-image-svc image unpack --broker` attesting with its (software) TPM
//! and obtaining the layer key sealed to its session. Then what must be refused, and a
//! broker restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::broker::Pki;
use integration_tests::{
    bin, ext4_cat, ext4_extract, fixtures, layout_manifest, scan_process_memory, Swtpm,
};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct BrokerProcess {
    child: Child,
    socket: PathBuf,
}

impl BrokerProcess {
    fn start(config: &Path, socket: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new(bin("keybroker"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let start = Instant::now();
        // Listening, not only bound (see ImageService::start).
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "keybroker serve exited"
            );
            assert!(start.elapsed() < Duration::from_secs(20), "broker not up");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The TLS listener binds before the socket is created.
        Self {
            child,
            socket: socket.to_path_buf(),
        }
    }

    fn admin(&self) -> Command {
        let mut c = Command::new(bin("keybroker"));
        c.arg("--socket").arg(&self.socket);
        c
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "keybroker serve exited with {status}");
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    /// The broker's PostgreSQL cluster, when the suite runs on that store
    /// ([`broker_store`]).
    pg: Option<integration_tests::postgres::Postgres>,
    dir: tempfile::TempDir,
    swtpm: Swtpm,
    port: u16,
    socket: PathBuf,
    config: PathBuf,
    image: String,
}

impl Setup {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// What every ipu-image-svc run of these tests shares: the policy bundle, the broker
    /// with this IPU's certificate and TPM, the blob cache and the audit log.
    fn ipu_args(&self, c: &mut Command) {
        c.arg("--policy-bundle")
            .arg(self.path("bundle.json"))
            .arg("--bundle-key")
            .arg(self.path("bundle-key/pub.pem"))
            .arg("--bundle-state")
            .arg(self.path("ipu-policy"))
            .arg("--broker")
            .arg(format!("https://127.0.0.1:{}", self.port))
            .args(["--broker-name", "localhost"])
            .arg("--broker-ca")
            .arg(self.path("pki/ca.pem"))
            .arg("--broker-cert")
            .arg(self.path("pki/ipu.pem"))
            .arg("--broker-key")
            .arg(self.path("pki/ipu.key"))
            .args(["--tpm", &self.swtpm.tcti()])
            .arg("--cache")
            .arg(self.path("cache"))
            .arg("--audit-log")
            .arg(self.path("ipu-audit"));
    }

    /// `ipu-image-svc image unpack --broker` for a tenant; the command, not yet run.
    fn unpack(&self, tenant: &str, out: &str) -> Command {
        let mut c = Command::new(bin("ipu-image-svc"));
        c.args(["image", "unpack", "--quiet"])
            .args(["--tenant", tenant, "--function", "resize"]);
        self.ipu_args(&mut c);
        c.arg("--output")
            .arg(self.path(out))
            .arg(&self.image)
            .env("TSS2_LOG", "all+NONE");
        c
    }
}

/// How a run differs from the plain one.
#[derive(Default)]
struct Options {
    /// Also wrap layer keys to this JWE public key (a publisher's escrow key): lets a test
    /// learn the layer keys it then searches memory for.
    escrow_recipient: Option<PathBuf>,
    /// Put busybox in the image, so a function can run from it.
    busybox: bool,
    /// The broker writes its audit events through this `audit serve` writer socket.
    audit_socket: Option<PathBuf>,
    /// `[unix] roles` lines (`"uid" = "role"`).
    unix_roles: Option<String>,
    /// The policy names placement grant keys: `scheduler/` (Ed25519) trusted for acme,
    /// `globex-scheduler/` (P-256) for globex.
    grant_keys: bool,
}

/// Where `keybroker serve` keeps its state in this run of the suite: its sled store (the
/// default), or a PostgreSQL database of its own (`KEYBROKER_TEST_STORE=postgres`, as root:
/// scripts/test.sh runs the suite both ways), migrated with `keybroker db migrate`.
fn broker_store() -> (Option<integration_tests::postgres::Postgres>, String) {
    match std::env::var("KEYBROKER_TEST_STORE").as_deref() {
        Ok("postgres") => {
            assert!(
                integration_tests::is_root(),
                "KEYBROKER_TEST_STORE=postgres needs root (PostgreSQL runs as its own user)"
            );
            let pg = integration_tests::postgres::Postgres::start();
            let url = pg.create_db("keybroker");
            run(Command::new(bin("keybroker")).args(["db", "migrate", "--store", &url]));
            (Some(pg), format!("store = {url:?}\n"))
        }
        Ok("sled") | Err(_) => (None, String::new()),
        Ok(other) => panic!("KEYBROKER_TEST_STORE={other:?}: sled or postgres"),
    }
}

/// Publisher, operator and IPU, each with their own tools.
fn setup() -> (Setup, BrokerProcess) {
    setup_with(Options::default())
}

fn setup_with(opts: Options) -> (Setup, BrokerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let swtpm = Swtpm::start();

    // The IPU's attestation key, persisted in its TPM, and its PCR values now (the
    // reference values the operator puts in the policy).
    run(Command::new(bin("ipu-image-svc"))
        .args(["tpm", "ak", "--tpm", &swtpm.tcti(), "--output"])
        .arg(d.join("ak.tpmt"))
        .arg("--ek-output")
        .arg(d.join("ek.tpmt"))
        .env("TSS2_LOG", "all+NONE"));
    let pcrs = {
        let mut tpm = ipu_image_svc::tpm::Tpm::open(&swtpm.tcti()).unwrap();
        tpm.read_pcrs(&[0, 7]).unwrap()
    };

    // TLS: a platform CA, the broker's server certificate, the IPU's client certificate.
    let pki = Pki::new();
    std::fs::create_dir_all(d.join("pki")).unwrap();
    std::fs::write(d.join("pki/ca.pem"), pki.ca_pem()).unwrap();
    let (cert, key) = pki.issue("broker.test", Some("broker"), true);
    std::fs::write(d.join("pki/server.pem"), cert).unwrap();
    std::fs::write(d.join("pki/server.key"), key).unwrap();
    let (cert, key) = pki.issue("ipu-1.test", Some("ipu"), false);
    std::fs::write(d.join("pki/ipu.pem"), cert).unwrap();
    std::fs::write(d.join("pki/ipu.key"), key).unwrap();

    // The publisher: signing key, image, signature.
    run(Command::new(bin("ocipub"))
        .args(["keygen", "--kind", "ec-p256", "--out"])
        .arg(d.join("signing")));
    std::fs::create_dir_all(d.join("rootfs")).unwrap();
    std::fs::write(d.join("rootfs/hello"), "hello from a broker-keyed image\n").unwrap();
    if opts.busybox {
        std::fs::create_dir_all(d.join("rootfs/bin")).unwrap();
        std::fs::copy("/bin/busybox", d.join("rootfs/bin/busybox")).unwrap();
    }
    run(Command::new(bin("ocipub"))
        .args(["build", "--rootfs"])
        .arg(d.join("rootfs"))
        .arg("--layout")
        .arg(d.join("layout"))
        .args(["--tag", "plain", "--cmd", "/hello"]));

    // The operator: a policy bundle that names the IPU class's PCRs and releases key
    // acme-kek to tenant acme only.
    let layout = d.join("layout");
    let hex = |i: u8| hex::encode(&pcrs[&i]);
    std::fs::write(
        d.join("deployment.toml"),
        format!(
            r#"schema = 1
image_trust_policy = "image-trust.json"
[[ipu_class]]
name = "ipu-gen2"
pcr_bank = "sha256"
pcrs = {{ 0 = "{}", 7 = "{}" }}
[[tenant]]
name = "acme"
require_encryption = true
clone = {{ size = "512M", ttl = "90m" }}
[[tenant.function]]
name = "*"
images = ["oci:*"]
[[tenant]]
name = "globex"
[[tenant.function]]
name = "*"
images = ["oci:*"]
[[key]]
id = "acme-kek"
images = ["oci:*"]
tenants = ["acme"]
ipu_classes = ["ipu-gen2"]
"#,
            hex(0),
            hex(7)
        ),
    )
    .unwrap();
    if opts.grant_keys {
        let mut grant_keys = String::new();
        for (dir, kind, tenant) in [
            ("scheduler", "ed25519", "acme"),
            ("globex-scheduler", "ec-p256", "globex"),
        ] {
            run(Command::new(bin("policy"))
                .args(["keygen", "--kind", kind, "--out"])
                .arg(d.join(dir)));
            let public = std::fs::read_to_string(d.join(dir).join("pub.pem")).unwrap();
            grant_keys.push_str(&format!(
                "[[grant_key]]\nid = \"{dir}\"\npublic_key = \"\"\"\n{public}\"\"\"\ntenants = [\"{tenant}\"]\n"
            ));
        }
        let mut text = std::fs::read_to_string(d.join("deployment.toml")).unwrap();
        text.push_str(&grant_keys);
        std::fs::write(d.join("deployment.toml"), text).unwrap();
    }
    std::fs::write(
        d.join("image-trust.json"),
        serde_json::json!({
            "default": [{"type": "reject"}],
            "transports": {"oci": {layout.display().to_string(): [{
                "type": "sigstoreSigned",
                "keyPath": d.join("signing/pub.pem"),
                "signedIdentity": {"type": "exactRepository", "dockerRepository": "example.test/acme/resize"}
            }]}}
        })
        .to_string(),
    )
    .unwrap();
    run(Command::new(bin("policy"))
        .args(["keygen", "--out"])
        .arg(d.join("bundle-key")));
    run(Command::new(bin("policy"))
        .arg("sign")
        .arg("--deployment")
        .arg(d.join("deployment.toml"))
        .args(["--version", "1", "--key"])
        .arg(d.join("bundle-key/priv.pem"))
        .arg("--output")
        .arg(d.join("bundle.json")));

    // The broker.
    let port = free_port();
    let socket = d.join("run/keybroker.sock");
    let config = d.join("keybroker.toml");
    let audit = match &opts.audit_socket {
        Some(s) => format!("audit_socket = {:?}\n", s.display().to_string()),
        None => String::new(),
    };
    let (pg, store) = broker_store();
    std::fs::write(
        &config,
        format!(
            r#"{audit}{store}state_dir = "state"
bundle_keys = ["bundle-key/pub.pem"]
session_ttl = "2m"
[tls]
listen = "127.0.0.1:{port}"
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
[unix]
socket = "run/keybroker.sock"
{}
"#,
            opts.unix_roles
                .as_ref()
                .map(|r| format!("roles = {{ {r} }}"))
                .unwrap_or_default()
        ),
    )
    .unwrap();
    let broker = BrokerProcess::start(&config, &socket);
    run(broker
        .admin()
        .args(["policy", "load"])
        .arg(d.join("bundle.json")));
    run(broker
        .admin()
        .args(["keys", "create", "--id", "acme-kek", "--kind", "ec-p256"]));
    // Without its endorsement key the IPU is not enrolled (the broker requires the pinning).
    let out = broker
        .admin()
        .args(["ipus", "enroll", "--id", "ipu-1", "--class", "ipu-gen2"])
        .arg("--ak-template")
        .arg(d.join("ak.tpmt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ek-template"));
    run(broker
        .admin()
        .args(["ipus", "enroll", "--id", "ipu-1", "--class", "ipu-gen2"])
        .arg("--ak-template")
        .arg(d.join("ak.tpmt"))
        .arg("--ek-template")
        .arg(d.join("ek.tpmt")));

    // The publisher encrypts through the broker's key provider (command form), then signs.
    std::fs::write(
        d.join("ocicrypt-keyprovider.json"),
        serde_json::json!({"key-providers": {"ipubroker": {"cmd": {
            "path": bin("keybroker"),
            "args": ["--socket", socket, "keyprovider"]
        }}}})
        .to_string(),
    )
    .unwrap();
    let mut encrypt = Command::new(bin("ocipub"));
    encrypt
        .args(["encrypt", "--layout"])
        .arg(&layout)
        .args(["--tag", "plain", "--out-tag", "enc"])
        .args(["--recipient", "provider:ipubroker:acme-kek"])
        .arg("--keyprovider-config")
        .arg(d.join("ocicrypt-keyprovider.json"));
    if let Some(escrow) = &opts.escrow_recipient {
        encrypt
            .arg("--recipient")
            .arg(format!("jwe:{}", escrow.display()));
    }
    run(&mut encrypt);
    run(Command::new(bin("ocipub"))
        .args(["sign", "--layout"])
        .arg(&layout)
        .args(["--tag", "enc", "--key"])
        .arg(d.join("signing/priv.pem"))
        .args(["--identity", "example.test/acme/resize"]));
    let image = format!("oci:{}:enc", layout.display());
    (
        Setup {
            pg,
            dir,
            swtpm,
            port,
            socket,
            config,
            image,
        },
        broker,
    )
}

fn events(log: &Path, kind: &str) -> Vec<serde_json::Value> {
    let out = run(Command::new(bin("audit"))
        .args(["query", "--json", "--log"])
        .arg(log)
        .args(["--kind", kind]));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_attested_ipu_gets_provider_wrapped_layer_keys_and_others_are_refused() {
    let (s, broker) = setup();
    // The layer carries only the provider wrapping: no JWE recipient, nothing a host key
    // could open.
    let annotations = layer_annotations(&s.path("layout"), "enc");
    assert!(
        annotations.contains_key("org.opencontainers.image.enc.keys.provider.ipubroker"),
        "{annotations:?}"
    );
    assert!(!annotations.contains_key(ocicrypt::ANNOTATION_KEYS_JWE));

    // The happy path: attest, release, decrypt, unpack.
    run(&mut s.unpack("acme", "acme.ext4"));
    assert_eq!(
        ext4_cat(&s.path("acme.ext4"), "/hello").as_deref(),
        Some(&b"hello from a broker-keyed image\n"[..])
    );

    // Tenant globex may run the image but may not have its key: refused, nothing built.
    let out = s.unpack("globex", "globex.ext4").output().unwrap();
    assert_eq!(out.status.code(), Some(3), "a key denial is a rejection");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tenant \"globex\" may not use this key"),
        "{stderr}"
    );
    assert!(!s.path("globex.ext4").exists());

    // The broker's audit trail: the enrollment, one grant, one denial with its reason.
    broker.stop();
    let log = s.path("state/audit");
    let grants = events(&log, "key.release");
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0]["tenant"], "acme");
    let denials = events(&log, "key.deny");
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert!(denials[0]["reason"].as_str().unwrap().contains("globex"));
    // One refused enrollment (no EK), one accepted, one activation at the first attestation.
    assert_eq!(events(&log, "admin.ipu_enroll").len(), 2);
    assert_eq!(events(&log, "admin.ipu_activate").len(), 1);
    assert_eq!(events(&log, "admin.key_wrap").len(), 1);
    assert_eq!(events(&log, "attestation.verify").len(), 2);

    // Restarted: keys, enrollment and policy are still there; the unpack works again.
    let broker = BrokerProcess::start(&s.config, &s.socket);
    let list = run(broker.admin().args(["ipus", "list", "--json"]));
    let ipus: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(ipus[0]["ipu_id"], "ipu-1");
    assert_eq!(ipus[0]["pinned"], true);
    assert_eq!(
        ipus[0]["activated"], true,
        "the first attestation activated it"
    );
    run(&mut s.unpack("acme", "again.ext4"));

    // The running policy cannot be replaced by one of the same version with other content
    // (nor, by the same rule, by an older one).
    let mut deployment = std::fs::read_to_string(s.path("deployment.toml")).unwrap();
    deployment = deployment.replace("tenants = [\"acme\"]", "tenants = [\"acme\", \"globex\"]");
    std::fs::write(s.path("deployment-v1b.toml"), deployment).unwrap();
    run(Command::new(bin("policy"))
        .arg("sign")
        .arg("--deployment")
        .arg(s.path("deployment-v1b.toml"))
        .arg("--image-trust")
        .arg(s.path("image-trust.json"))
        .args(["--version", "1", "--key"])
        .arg(s.path("bundle-key/priv.pem"))
        .arg("--output")
        .arg(s.path("bundle-v1b.json")));
    let out = broker
        .admin()
        .args(["policy", "load"])
        .arg(s.path("bundle-v1b.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("version 1 is the running version with different content"),
        "{err}"
    );

    // The IPU revoked: its next attestation is refused.
    run(broker.admin().args(["ipus", "revoke", "--id", "ipu-1"]));
    let out = s.unpack("acme", "revoked.ext4").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the attestation key was revoked"),
        "{stderr}"
    );
    broker.stop();
    let loads = events(&log, "admin.policy_load");
    assert!(
        loads.iter().any(|e| e["outcome"] == "denied"),
        "the refused bundle is on the record: {loads:?}"
    );
    let refused = events(&log, "attestation.verify");
    assert!(
        refused
            .iter()
            .any(|e| e["outcome"] == "denied" && e["reason"].as_str().unwrap().contains("revoked")),
        "{refused:?}"
    );
}

/// The key provider door: wrapping needs a publisher or admin, unwrapping needs an
/// attested session, and a request naming someone else's session is refused.
#[test]
fn the_key_provider_door_refuses_unwrap_without_an_attested_session() {
    let (s, broker) = setup();
    let kp = |input: &str| {
        let mut child = Command::new(bin("keybroker"))
            .arg("--socket")
            .arg(&s.socket)
            .arg("keyprovider")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // A wrapping from the broker, then an unwrap through the door without a session
    // (root on the socket is admin, never ipu).
    let wrap = kp(&serde_json::json!({
        "op": "keywrap",
        "keywrapparams": {"ec": {"Parameters": {"ipubroker": ["YWNtZS1rZWs="]}, "DecryptConfig": {"Parameters": {}}},
                          "optsdata": "eyJzeW1rZXkiOiJ4In0="},
        "keyunwrapparams": {"dc": null, "annotation": null}
    })
    .to_string());
    assert!(
        wrap.status.success(),
        "{}",
        String::from_utf8_lossy(&wrap.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&wrap.stdout).unwrap();
    let annotation = reply["keywrapresults"]["annotation"].as_str().unwrap();
    let unwrap = kp(&serde_json::json!({
        "op": "keyunwrap",
        "keywrapparams": {"ec": null, "optsdata": null},
        "keyunwrapparams": {"dc": {"Parameters": {"ipubroker": [
            base64_of("session=0123"), base64_of("tenant=acme"), base64_of("function=f"),
            base64_of("image=oci:x"), base64_of("image-digest=sha256:aa"), base64_of("layer-digest=sha256:bb")
        ]}}, "annotation": annotation}
    })
    .to_string());
    assert!(!unwrap.status.success());
    let stderr = String::from_utf8_lossy(&unwrap.stderr);
    assert!(stderr.contains("may not unwrap keys"), "{stderr}");
    // Unknown keys and malformed requests are refused with their reason.
    let bad = kp(
        r#"{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"ipubroker":["bm9wZQ=="]}},"optsdata":"eA=="}}"#,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no key \"nope\""));
    let bad = kp(r#"{"op":"keyfrob"}"#);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("keyfrob"));
    broker.stop();
    assert_eq!(events(&s.path("state/audit"), "admin.key_wrap").len(), 3);
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The annotations of the first layer of a tag in an OCI layout.
fn layer_annotations(layout: &Path, tag: &str) -> serde_json::Map<String, serde_json::Value> {
    let (_, manifest) = layout_manifest(layout, tag);
    manifest["layers"][0]["annotations"]
        .as_object()
        .unwrap()
        .clone()
}

/// A daemon child process, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the socket at `path` accepts connections (bound is not enough: see
/// ImageService::start).
fn wait_for(path: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Host-side processes never see layer keys: after a full run (broker release into the
/// IPU service's secret memory, decrypt, unpack, ext4), the memory of every host-side
/// process that took part, the audit daemon that recorded the run and the function
/// running from the image, holds no layer key in raw or base64 form. A control process
/// that does hold a key shows the scan finds one.
/// Layer 0's key of the `enc` image (learnt through the escrow recipient the setup wrapped it
/// to as well): raw, base64 and hex, the forms a leak would take.
fn layer_key_needles(s: &Setup) -> Vec<Vec<u8>> {
    use base64::Engine;
    let annotations = layer_annotations(&s.path("layout"), "enc");
    let escrow = ocicrypt::keys::PrivateKey::from_pem(
        &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
    )
    .unwrap();
    let privopts_json = ocicrypt::jwe::unwrap(
        annotations[ocicrypt::ANNOTATION_KEYS_JWE].as_str().unwrap(),
        &[escrow],
    )
    .unwrap();
    let privopts = ocicrypt::PrivateLayerOptions::from_json(&privopts_json).unwrap();
    vec![
        privopts.symkey().to_vec(),
        base64::engine::general_purpose::STANDARD
            .encode(privopts.symkey())
            .into_bytes(),
        hex::encode(privopts.symkey()).into_bytes(),
    ]
}

/// The scan's control: a process that holds the key (its base64 form, needle 1) is found.
/// The process is returned so that it lives until the caller is done.
fn scan_finds_a_holder(needles: &[Vec<u8>]) -> Daemon {
    let mut control = Command::new("/bin/busybox")
        .args([
            "sh",
            "-c",
            "read k; /bin/busybox sleep 60; echo \"$k\" >/dev/null",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = control.stdin.take().unwrap();
        stdin.write_all(&needles[1]).unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let control = Daemon(control);
    let found = scan_process_memory(control.0.id(), needles);
    assert!(
        found.found.contains(&1),
        "the scan must find the key in a process that holds it: {found:?}"
    );
    control
}

#[test]
fn no_layer_key_bytes_in_the_memory_of_host_side_processes() {
    let audit_dir = tempfile::tempdir().unwrap();
    let a = audit_dir.path();
    run(Command::new(bin("audit"))
        .args(["keygen", "--name", "audit.test", "--out"])
        .arg(a.join("key")));
    let writer = a.join("writer.sock");
    let audit_daemon = Daemon(
        Command::new(bin("audit"))
            .arg("serve")
            .arg("--log")
            .arg(a.join("log"))
            .arg("--signer")
            .arg(a.join("key/signer.key"))
            .args(["--origin", "audit.test"])
            .arg("--writer-socket")
            .arg(&writer)
            .arg("--query-socket")
            .arg(a.join("query.sock"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&writer);
    let (s, broker) = setup_with(Options {
        escrow_recipient: Some(fixtures().join("keys/rsa-2048/pub.pem")),
        busybox: true,
        audit_socket: Some(writer.clone()),
        ..Options::default()
    });

    let needles = layer_key_needles(&s);

    // The full run, recorded through the audit daemon.
    let mut unpack = s.unpack("acme", "acme.ext4");
    unpack.arg("--audit-socket").arg(&writer);
    // --audit-log and --audit-socket exclude each other: drop the former.
    let args: Vec<std::ffi::OsString> = unpack.get_args().map(|a| a.to_owned()).collect();
    let mut cmd = Command::new(bin("ipu-image-svc"));
    let mut skip = false;
    for arg in args {
        if skip {
            skip = false;
            continue;
        }
        if arg == "--audit-log" {
            skip = true;
            continue;
        }
        cmd.arg(arg);
    }
    cmd.env("TSS2_LOG", "all+NONE");
    run(&mut cmd);

    // The function, running on the host from the image.
    let root = s.path("function-root");
    std::fs::create_dir_all(&root).unwrap();
    ext4_extract(&s.path("acme.ext4"), &root);
    let function = Daemon(
        Command::new("chroot")
            .arg(&root)
            .args([
                "/bin/busybox",
                "sh",
                "-c",
                "/bin/busybox cat /hello; exec /bin/busybox sleep 60",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));

    // The control: a process holding the key in base64 is found.
    let _control = scan_finds_a_holder(&needles);

    for (name, pid) in [
        ("audit daemon", audit_daemon.0.id()),
        ("function", function.0.id()),
    ] {
        let scan = scan_process_memory(pid, &needles);
        assert!(scan.bytes_scanned > 100_000, "{name}: {scan:?}");
        assert!(
            scan.found.is_empty(),
            "{name} (pid {pid}) holds layer key bytes: needles {:?}",
            scan.found
        );
    }
    broker.stop();
}

/// The Unix socket tells callers apart by their kernel-reported uid: root is admin, a uid
/// the configuration names has that role only, any other uid is refused.
#[test]
fn unix_socket_callers_get_the_role_of_their_uid_and_no_more() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let (s, broker) = setup_with(Options {
        unix_roles: Some(r#""65534" = "publisher""#.into()),
        ..Options::default()
    });
    // Let other uids reach the socket; the broker decides what they may do.
    for dir in [s.dir.path(), &s.path("run")] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let as_uid = |uid: u32, args: &[&str], stdin: Option<&str>| {
        let mut c = broker.admin();
        c.args(args).uid(uid).gid(65534);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut i = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                i.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    };
    // The publisher uid wraps through the key provider...
    let wrap = r#"{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"ipubroker":["YWNtZS1rZWs="]}},"optsdata":"eA=="}}"#;
    let out = as_uid(65534, &["keyprovider"], Some(wrap));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...but may not administer keys.
    let out = as_uid(
        65534,
        &["keys", "create", "--id", "mine", "--kind", "ec-p256"],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(r#"role "publisher" may not do this (needs admin)"#),
        "{err}"
    );
    // A uid without a role gets nothing, not even the key list.
    let out = as_uid(65533, &["keys", "list"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65533 has no role on this socket"),
        "{err}"
    );
    let out = as_uid(65533, &["keyprovider"], Some(wrap));
    assert!(!out.status.success());
    broker.stop();
    // The publisher's wrap is on the record under its uid.
    let wraps = events(&s.path("state/audit"), "admin.key_wrap");
    assert!(
        wraps.iter().any(|e| e["actor"]["subject"] == "uid:65534"),
        "{wraps:?}"
    );
}

/// `ipu-image-svc serve` for the host agent (this test's uid).
struct ImageService {
    child: Child,
    socket: PathBuf,
}

impl ImageService {
    fn start(s: &Setup) -> Self {
        Self::start_with_failpoints(s, "")
    }

    /// Started with `FAILPOINTS` (e.g. `teardown-after-revoke=sleep(60000)`): it pauses there.
    fn start_with_failpoints(s: &Setup, failpoints: &str) -> Self {
        let uid = rustix::process::getuid().as_raw();
        Self::start_as(s, failpoints, Command::new(bin("ipu-image-svc")), uid)
    }

    /// `command` (ipu-image-svc, or a wrapper that execs it) with serve's arguments, for a
    /// host agent of uid `host_agent_uid`.
    fn start_as(s: &Setup, failpoints: &str, command: Command, host_agent_uid: u32) -> Self {
        let socket = s.path("run/api.sock");
        let _ = std::fs::remove_file(&socket);
        let mut command = Self::serve(s, command, host_agent_uid);
        let child = command
            .env("FAILPOINTS", failpoints)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut me = Self { child, socket };
        let start = Instant::now();
        // Listening, not only bound: the socket file exists a moment before it listens (its
        // mode is set in between), and a connection then is refused.
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            assert!(me.child.try_wait().unwrap().is_none(), "serve exited");
            assert!(start.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    /// `command` with the arguments of `serve` for this setup.
    fn serve(s: &Setup, mut command: Command, host_agent_uid: u32) -> Command {
        command
            .arg("serve")
            .arg("--state-dir")
            .arg(s.path("ipu-state"))
            .arg("--socket")
            .arg(s.path("run/api.sock"))
            .args(["--host-agent-uid", &host_agent_uid.to_string()])
            .args(["--clone-ttl", "1h"]);
        s.ipu_args(&mut command);
        command.env("TSS2_LOG", "all+NONE");
        command
    }

    fn client(
        &self,
        rt: &tokio::runtime::Runtime,
    ) -> api::imagesvc::image_service_client::ImageServiceClient<tonic::transport::Channel> {
        let channel = rt
            .block_on(api::unix::connect(self.socket.clone()))
            .unwrap();
        api::imagesvc::image_service_client::ImageServiceClient::new(channel)
    }

    fn signal(mut self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.child.wait().unwrap();
    }
}

impl Drop for ImageService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ipu-image-svc serve` with only the capabilities its systemd unit keeps
/// (dist/systemd/ipu-image-svc.service, `CapabilityBoundingSet=`), as root with no new
/// privileges, the way systemd starts it: it starts, prepares a clone of the broker-keyed
/// image (its base built with no capability at all) for a host agent of another uid (its API
/// and export sockets given to that uid), exports it, and tears it down. Without CAP_CHOWN it
/// cannot give the host agent its API socket, and does not start. (An image build needs no
/// capability: tests/packaging.rs.)
#[test]
fn serve_runs_with_only_the_capabilities_of_its_unit() {
    use api::imagesvc::{PrepareRequest, TeardownRequest};
    if !integration_tests::is_root() {
        eprintln!("skipped: running serve under a bounding set needs root");
        return;
    }
    let caps = integration_tests::unit_capabilities("ipu-image-svc.service");
    let (s, _broker) = setup();
    let host_agent = 65534;
    let service = ImageService::start_as(
        &s,
        "",
        integration_tests::with_capabilities(&caps, &bin("ipu-image-svc")),
        host_agent,
    );
    let owner = |p: &Path| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
    assert_eq!(
        owner(&service.socket),
        host_agent,
        "the API socket is the host agent's"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut api = service.client(&rt);
    let prepared = rt
        .block_on(api.prepare(PrepareRequest {
            tenant: "acme".into(),
            function: "resize-1".into(),
            image: s.image.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(owner(Path::new(&prepared.socket)), host_agent);
    // The host agent reads it as its own uid (the export refuses any other). Its way to the
    // socket: the unit makes the state directories traversable (StateDirectoryMode=0711).
    for dir in [s.path(""), s.path("ipu-state")] {
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .unwrap();
    }
    let read = run(Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "nbdcopy",
        ])
        .arg(nbd_uri(&prepared.socket, &prepared.export_name))
        .arg("-"));
    let copy = s.path("bounded.img");
    std::fs::write(&copy, &read.stdout).unwrap();
    assert_eq!(
        ext4_cat(&copy, "/hello").as_deref(),
        Some(&b"hello from a broker-keyed image\n"[..])
    );
    let erased = rt
        .block_on(api.teardown(TeardownRequest {
            clone_id: prepared.clone_id,
            forced_removal: false,
        }))
        .unwrap()
        .into_inner();
    assert!(erased.erased);
    service.signal(libc::SIGTERM);

    let without: Vec<String> = caps.into_iter().filter(|c| c != "chown").collect();
    let out = ImageService::serve(
        &s,
        integration_tests::with_capabilities(&without, &bin("ipu-image-svc")),
        host_agent,
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Operation not permitted"), "{stderr}");
}

/// The size of the ext4 file system in an image file.
fn ext4_bytes_of(image: &Path) -> u64 {
    host_attach::attach::ext4_bytes(image).unwrap()
}

fn nbd_uri(socket: &str, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={socket}")
}

/// The function lifecycle through the service's API: Prepare verifies, attests, builds the
/// encrypted base and a clone per function and exports it; the host reads the image through
/// NBD; functions never see each other's writes; Teardown hot-removes and erases with an
/// audit commitment to the creation; a SIGKILLed service leaves orphans that the next start
/// erases and audits.
#[test]
fn prepared_clones_are_exported_isolated_and_erased_at_teardown() {
    use api::imagesvc::{ListRequest, PrepareRequest, TeardownRequest, WatchRequest};
    let (s, broker) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = ImageService::start(&s);
    let mut api = service.client(&rt);
    let mut events = rt
        .block_on(api.watch_events(WatchRequest {}))
        .unwrap()
        .into_inner();
    let prepare = |api: &mut api::imagesvc::image_service_client::ImageServiceClient<_>,
                   function: &str| {
        rt.block_on(api.prepare(PrepareRequest {
            tenant: "acme".into(),
            function: function.into(),
            image: s.image.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
    };
    let one = prepare(&mut api, "resize-1");
    let two = prepare(&mut api, "resize-2");
    assert_ne!(one.clone_id, two.clone_id);
    // Size and lifetime as the deployment policy says for tenant acme.
    assert_eq!((one.size, one.ttl_secs), (512 << 20, 90 * 60));
    // The base is cached now, but a tenant the broker refuses the key gets no clone of it:
    // every Prepare has the layer keys released again for its own request.
    let refused = rt
        .block_on(api.prepare(PrepareRequest {
            tenant: "globex".into(),
            function: "resize-1".into(),
            image: s.image.clone(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused
            .message()
            .contains("tenant \"globex\" may not use this key"),
        "{}",
        refused.message()
    );
    assert!(
        one.runtime_config_json.contains("/hello"),
        "{}",
        one.runtime_config_json
    );

    // The host reads the function's rootfs through the export.
    let copy = s.path("one.img");
    run(Command::new("nbdcopy")
        .arg(nbd_uri(&one.socket, &one.export_name))
        .arg(&copy));
    assert_eq!(
        ext4_cat(&copy, "/hello").as_deref(),
        Some(&b"hello from a broker-keyed image\n"[..])
    );
    // Function one overwrites the image's part of its device (the rest is room to grow);
    // function two still reads the image.
    let noise = s.path("noise.img");
    let image_part = ext4_bytes_of(&copy).min(one.size);
    std::fs::write(&noise, vec![0xa5u8; image_part as usize]).unwrap();
    run(Command::new("nbdcopy")
        .arg(&noise)
        .arg(nbd_uri(&one.socket, &one.export_name)));
    let copy_two = s.path("two.img");
    run(Command::new("nbdcopy")
        .arg(nbd_uri(&two.socket, &two.export_name))
        .arg(&copy_two));
    assert!(ext4_cat(&copy_two, "/hello").is_some());
    // Nothing on the IPU's storage holds the image or the function's bytes in clear.
    for entry in walk(&s.path("ipu-state")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !integration_tests::contains(&bytes, &[0xa5u8; 32]),
            "{} holds function one's plaintext",
            entry.display()
        );
        assert!(
            !integration_tests::contains(&bytes, b"hello from a broker-keyed image"),
            "{} holds the image's plaintext",
            entry.display()
        );
    }

    // Teardown: the export goes, a second teardown finds nothing.
    let erased = rt
        .block_on(api.teardown(TeardownRequest {
            clone_id: one.clone_id.clone(),
            forced_removal: false,
        }))
        .unwrap()
        .into_inner();
    assert!(erased.erased);
    assert!(!Path::new(&one.socket).exists());
    let out = Command::new("nbdinfo")
        .arg(nbd_uri(&one.socket, &one.export_name))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let again = rt
        .block_on(api.teardown(TeardownRequest {
            clone_id: one.clone_id.clone(),
            forced_removal: false,
        }))
        .unwrap()
        .into_inner();
    assert!(!again.erased);
    let list = rt.block_on(api.list(ListRequest {})).unwrap().into_inner();
    assert_eq!(list.clones.len(), 1);
    assert_eq!(list.clones[0].clone_id, two.clone_id);
    // The host agent saw two attaches and one hot-remove.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = rt.block_on(events.message()).unwrap().unwrap();
        seen.push((e.kind, e.clone_id));
    }
    assert_eq!(
        seen,
        vec![
            ("attach".to_string(), one.clone_id.clone()),
            ("attach".to_string(), two.clone_id.clone()),
            ("hot_remove".to_string(), one.clone_id.clone()),
        ]
    );

    // A stopping service tears down what is left.
    service.signal(libc::SIGTERM);
    let log = s.path("ipu-audit");
    let created = events_of(&log, "clone.create");
    let erased = events_of(&log, "clone.erase");
    assert_eq!((created.len(), erased.len()), (2, 2));
    for c in &created {
        let id = c["details"]["clone_id"].as_str().unwrap();
        let key_id = c["details"]["key_id"].as_str().unwrap();
        let e = erased
            .iter()
            .find(|e| e["details"]["clone_id"] == id)
            .expect("every clone created is erased");
        assert_eq!(
            e["details"]["commitment"].as_str().unwrap(),
            ipu_image_svc::service::erase_commitment(id, key_id, c["seq"].as_u64().unwrap())
        );
    }
    assert!(std::fs::read_dir(s.path("ipu-state/clones"))
        .unwrap()
        .next()
        .is_none());

    // SIGKILL during a function's life: the next start erases the orphan and says so.
    let service = ImageService::start(&s);
    let mut api = service.client(&rt);
    let three = prepare(&mut api, "resize-3");
    service.signal(libc::SIGKILL);
    assert!(s
        .path("ipu-state/clones")
        .join(format!("{}.clone", three.clone_id))
        .exists());
    let service = ImageService::start(&s);
    assert!(std::fs::read_dir(s.path("ipu-state/clones"))
        .unwrap()
        .next()
        .is_none());
    service.signal(libc::SIGTERM);
    let orphans = events_of(&log, "recovery.orphan_erased");
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0]["details"]["clone_id"], three.clone_id.as_str());
    run(Command::new(bin("audit"))
        .args(["verify", "--log"])
        .arg(&log)
        .arg("--key")
        .arg(log.join("verifier.pub")));
    broker.stop();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

fn events_of(log: &Path, kind: &str) -> Vec<serde_json::Value> {
    events(log, kind)
}

/// The host agent runs a function from the image through the whole chain: Prepare on the
/// IPU, the export as a FUSE file + loop + mount, a hardened OCI bundle, runc, the function's output and exit
/// code, then unmount, detach and Teardown, whether the function succeeds or fails.
#[test]
fn host_attach_runs_a_function_from_the_image_and_tears_down() {
    if !integration_tests::is_root() {
        eprintln!("skipped: mounting and runc need root");
        return;
    }
    let (s, broker) = setup_with(Options {
        busybox: true,
        ..Options::default()
    });
    let service = ImageService::start(&s);
    let host_attach = |command: &[&str]| {
        Command::new(bin("host-attach"))
            .args(["run", "--api"])
            .arg(&service.socket)
            .args(["--tenant", "acme", "--function", "resize"])
            .arg("--workdir")
            .arg(s.path("host"))
            .arg(&s.image)
            .arg("--")
            .args(command)
            .output()
            .unwrap()
    };
    let out = host_attach(&["/bin/busybox", "cat", "/hello"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a broker-keyed image\n"
    );
    // The deployment policy gives acme's functions 512 MiB clones: the host grew the image's
    // file system into the device.
    let out = host_attach(&["/bin/busybox", "df", "-k", "/"]);
    let df = String::from_utf8_lossy(&out.stdout);
    let total_kib: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("df: {df}"));
    assert!(
        (400 << 10..=512 << 10).contains(&total_kib),
        "{total_kib} KiB: {df}"
    );
    // The seccomp filter: no new namespaces (an unprivileged user namespace would open kernel
    // surface), no kernel keyrings, no mounts.
    for attempt in [
        &["/bin/busybox", "unshare", "-U", "true"][..],
        &["/bin/busybox", "unshare", "-n", "true"][..],
        &["/bin/busybox", "mount", "-t", "tmpfs", "t", "/tmp"][..],
    ] {
        let out = host_attach(attempt);
        assert!(
            matches!(out.status.code(), Some(c) if c != 0 && c != 125),
            "{attempt:?} ran: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("not permitted") || stderr.contains("permission denied"),
            "{attempt:?}: {stderr}"
        );
    }
    // The function's exit code comes back; the clone is gone either way.
    let out = host_attach(&["/bin/busybox", "sh", "-c", "echo out; exit 7"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No live clone is left (erased leftovers may still be being freed in the background).
    assert!(!std::fs::read_dir(s.path("ipu-state/clones"))
        .unwrap()
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "clone")));
    assert!(
        !s.path("host").exists(),
        "the host agent cleans its workdir"
    );
    service.signal(libc::SIGTERM);
    let log = s.path("ipu-audit");
    assert_eq!(events_of(&log, "clone.erase").len(), 6);
    broker.stop();
}

/// Whether `host-attach run --vm` can run here: QEMU and the microVM assets that
/// `scripts/setup.sh` installs. Missing, the test fails: setup.sh is part of the suite.
fn microvm_ready() -> bool {
    let assets = Path::new(host_attach::microvm::DEFAULT_ASSETS);
    assert!(
        assets.join("vmlinuz").is_file() && assets.join("initramfs/bin/busybox").is_file(),
        "{} is not set up: run scripts/setup.sh",
        assets.display()
    );
    integration_tests::is_root()
}

/// `host-attach run --vm`: the function runs in a QEMU microVM whose disk is the clone,
/// hot-plugged as a vhost-user-blk-pci device the IPU serves. Output and exit code come
/// back; at exit the device is hot-removed (`device_del`, the guest's `DEVICE_DELETED`, the
/// chardev closed), the IPU records the front-end's release before the erase, and the audit
/// trail shows attach, hot-remove, erase in that order. A guest that does not release the
/// device (ACPI hot-plug disabled in its kernel) is stopped after the deadline and the
/// removal is recorded as forced; the clone is erased all the same.
#[test]
fn host_attach_runs_a_function_in_a_microvm_and_hot_removes_its_device() {
    if !microvm_ready() {
        eprintln!("skipped: QEMU and the vhost-user socket checks need root");
        return;
    }
    let (s, broker) = setup_with(Options {
        busybox: true,
        ..Options::default()
    });
    let service = ImageService::start(&s);
    let run_vm = |extra: &[&str], command: &[&str]| {
        let mut c = Command::new(bin("host-attach"));
        c.args(["run", "--vm", "--api"])
            .arg(&service.socket)
            .args(["--tenant", "acme", "--function", "resize"])
            .arg("--workdir")
            .arg(s.path("host"))
            .args(extra)
            .arg(&s.image)
            .arg("--")
            .args(command);
        let started = Instant::now();
        let out = c.output().unwrap();
        (out, started.elapsed())
    };
    let (out, took) = run_vm(
        &[],
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "cat /hello; echo to-stderr >&2; id -u; exit 7",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a broker-keyed image\n0\n",
        "{stderr}"
    );
    assert!(stderr.contains("to-stderr"), "{stderr}");
    assert!(
        stderr.contains("running the function in a microVM on "),
        "{stderr}"
    );
    assert!(!stderr.contains("forced removal"), "{stderr}");
    eprintln!("microVM run: {took:?}");

    // The guest does not release the device: ACPI PCI hot-plug off in its kernel.
    let (out, _) = run_vm(
        &[
            "--vm-append",
            "acpiphp.disable=1",
            "--vm-release-deadline",
            "3",
        ],
        &["/bin/busybox", "true"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("forced removal of "), "{stderr}");
    assert!(
        !s.path("host").exists(),
        "the host agent cleans its workdir"
    );

    service.signal(libc::SIGTERM);
    let log = s.path("ipu-audit");
    let mut all: Vec<serde_json::Value> = ["export.attach", "export.hot_remove", "clone.erase"]
        .iter()
        .flat_map(|k| events(&log, k))
        .collect();
    all.sort_by_key(|e| e["seq"].as_u64());
    // Per clone: the front-end's attach, then its release (hot-remove), then the erase.
    let created = events_of(&log, "clone.create");
    assert_eq!(created.len(), 2);
    for (i, c) in created.iter().enumerate() {
        let id = c["details"]["clone_id"].as_str().unwrap();
        let of_clone: Vec<(String, String, String)> = all
            .iter()
            .filter(|e| e["details"]["clone_id"] == id)
            .map(|e| {
                (
                    e["kind"].as_str().unwrap_or("").to_string(),
                    e["outcome"].as_str().unwrap_or("").to_string(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let at = |pred: &dyn Fn(&(String, String, String)) -> bool| {
            of_clone
                .iter()
                .position(pred)
                .unwrap_or_else(|| panic!("clone {i}: {of_clone:#?}"))
        };
        let attach = at(&|e| e.0 == "export.attach" && e.2.contains("front-end connected"));
        let erase = at(&|e| e.0 == "clone.erase");
        if i == 0 {
            let released =
                at(&|e| e.0 == "export.hot_remove" && e.2.contains("released the device"));
            let revoked = at(&|e| e.0 == "export.hot_remove" && e.2.contains("export revoked"));
            assert!(
                attach < released && released < revoked && revoked < erase,
                "{of_clone:#?}"
            );
        } else {
            let forced = at(&|e| e.0 == "export.hot_remove" && e.2.contains("forced removal"));
            assert!(attach < forced && forced < erase, "{of_clone:#?}");
        }
    }
    let forced: Vec<_> = all
        .iter()
        .filter(|e| e["details"]["forced_removal"] == "true")
        .collect();
    assert_eq!(forced.len(), 1, "one forced removal on the record");
    broker.stop();
}

/// `serve` attests once and keeps its session for every Prepare (each key release is still
/// decided per request); when the broker forgets the session (here: it restarts) the service
/// attests again by itself; when the operator revokes the IPU, its session ends with it and
/// the next Prepare gets no key, and no clone.
#[test]
fn the_broker_session_is_reused_renewed_when_lost_and_ended_by_revocation() {
    use api::imagesvc::PrepareRequest;
    let (s, broker) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let service = ImageService::start(&s);
    let mut api = service.client(&rt);
    let prepare = |api: &mut api::imagesvc::image_service_client::ImageServiceClient<_>,
                   function: &str| {
        rt.block_on(api.prepare(PrepareRequest {
            tenant: "acme".into(),
            function: function.into(),
            image: s.image.clone(),
            ..Default::default()
        }))
        .map_err(Box::new)
    };
    prepare(&mut api, "f-1").unwrap();
    prepare(&mut api, "f-2").unwrap();
    broker.stop();
    let log = s.path("state/audit");
    let attested = |log: &Path| {
        events(log, "attestation.verify")
            .iter()
            .filter(|e| e["outcome"] == "allowed" || e["outcome"] == "success")
            .count()
    };
    assert_eq!(attested(&log), 1, "one attestation serves both starts");
    // 2 layers of keys per start... whatever the count, one release per layer per start.
    let releases = events(&log, "key.release").len();
    assert!(releases >= 2 && releases % 2 == 0, "{releases}");

    // A restarted broker on sled has no sessions: the service attests again on its own. On
    // PostgreSQL the session lives in the database and outlives the restart.
    let broker = BrokerProcess::start(&s.config, &s.socket);
    prepare(&mut api, "f-3").unwrap();
    let restarts_forget = s.pg.is_none();

    // Revoked: the session ends, and a new attestation is refused.
    run(broker.admin().args(["ipus", "revoke", "--id", "ipu-1"]));
    let refused = prepare(&mut api, "f-4").unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("attestation key was revoked"),
        "{}",
        refused.message()
    );
    let list = rt
        .block_on(api.list(api::imagesvc::ListRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(list.clones.len(), 3, "no clone for the refused start");
    service.signal(libc::SIGTERM);
    broker.stop();
    assert_eq!(attested(&log), if restarts_forget { 2 } else { 1 });
}

/// SIGKILL of `ipu-image-svc serve` at many points of a cold Prepare (fetch, verify, attest,
/// unpack, mkfs, base encryption, clone, export) and of a Teardown, each followed by a
/// restart: nothing is left on the IPU's storage (no clone, base, unpack tree or socket, and
/// no plaintext anywhere), every clone created is matched on the record by its erase or by
/// its recovery as an orphan, and the log verifies.
#[test]
fn sigkill_during_prepare_and_teardown_leaves_no_orphan_and_a_log_that_verifies() {
    use api::imagesvc::{PrepareRequest, TeardownRequest};
    let (s, broker) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let request = |function: String| PrepareRequest {
        tenant: "acme".into(),
        function,
        image: s.image.clone(),
        ..Default::default()
    };
    // Kill points during a cold Prepare (the base is never cached across a restart).
    for (i, delay_ms) in [0u64, 5, 10, 20, 30, 45, 60, 80, 100, 150, 250, 400]
        .into_iter()
        .enumerate()
    {
        let service = ImageService::start(&s);
        let mut api = service.client(&rt);
        let prepare = request(format!("p-{i}"));
        let call = rt.spawn(async move { api.prepare(prepare).await });
        std::thread::sleep(Duration::from_millis(delay_ms));
        service.signal(libc::SIGKILL);
        let _ = rt.block_on(call);
    }
    // Kill points during a Teardown of a clone the host wrote 4 MiB to.
    for (i, delay_ms) in [0u64, 1, 3, 10].into_iter().enumerate() {
        let service = ImageService::start(&s);
        let mut api = service.client(&rt);
        let p = rt
            .block_on(api.prepare(request(format!("t-{i}"))))
            .unwrap()
            .into_inner();
        let data = s.path("data.bin");
        std::fs::write(&data, vec![0x5au8; 4 << 20]).unwrap();
        run(Command::new("nbdcopy")
            .arg(&data)
            .arg(nbd_uri(&p.socket, &p.export_name)));
        let call = rt.spawn(async move {
            api.teardown(TeardownRequest {
                clone_id: p.clone_id,
                forced_removal: false,
            })
            .await
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        service.signal(libc::SIGKILL);
        let _ = rt.block_on(call);
    }
    // The restart after the last kill.
    ImageService::start(&s).signal(libc::SIGTERM);
    broker.stop();

    for dir in ["clones", "bases", "spool", "exports"] {
        let left: Vec<_> = std::fs::read_dir(s.path("ipu-state").join(dir))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left in {dir}: {left:?}");
    }
    for entry in walk(&s.path("ipu-state"))
        .into_iter()
        .chain(walk(&s.path("cache")))
    {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !integration_tests::contains(&bytes, b"hello from a broker-keyed image"),
            "{} holds the image's plaintext",
            entry.display()
        );
        assert!(
            !integration_tests::contains(&bytes, &[0x5au8; 64]),
            "{} holds the function's plaintext",
            entry.display()
        );
    }
    let log = s.path("ipu-audit");
    let ended: std::collections::HashSet<String> = events_of(&log, "clone.erase")
        .into_iter()
        .chain(events_of(&log, "recovery.orphan_erased"))
        .map(|e| e["details"]["clone_id"].as_str().unwrap().to_string())
        .collect();
    let created = events_of(&log, "clone.create");
    assert!(created.len() >= 4, "the teardown rounds each created one");
    for c in &created {
        let id = c["details"]["clone_id"].as_str().unwrap();
        assert!(
            ended.contains(id),
            "clone {id} was created but never erased"
        );
    }
    eprintln!(
        "{} clones created, {} erased by teardown, {} recovered as orphans",
        created.len(),
        events_of(&log, "clone.erase").len(),
        events_of(&log, "recovery.orphan_erased").len()
    );
    run(Command::new(bin("audit"))
        .args(["verify", "--log"])
        .arg(&log)
        .arg("--key")
        .arg(log.join("verifier.pub")));
}

/// SIGKILL exactly where a crash hurts most, each point held by a failpoint until the kill:
/// during a Prepare once the base is built (its plaintext ext4 still in the tmpfs) and once
/// the clone is created and on the record but not exported, and during a Teardown after the
/// export is revoked but before the clone's key is destroyed. After each, a restart: no
/// clone is live, nothing is left in the state directory, no plaintext is on disk (the
/// tmpfs died with the killed process: `serve` has a mount namespace of its own), the
/// orphan's erase is on the record, and the log verifies.
#[test]
fn sigkill_at_the_worst_points_leaves_no_clone_no_plaintext_and_a_log_that_verifies() {
    use api::imagesvc::{ListRequest, PrepareRequest, TeardownRequest};
    let (s, broker) = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = s.path("ipu-state");
    let files = |dir: &str| -> Vec<PathBuf> {
        std::fs::read_dir(state.join(dir))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let wait_for = |what: &str, service: &mut ImageService, ready: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !ready() {
            assert!(service.child.try_wait().unwrap().is_none(), "serve exited");
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "never reached: {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // At the failpoint: it sleeps there until the kill.
        std::thread::sleep(Duration::from_millis(300));
    };
    let prepare = |function: &str| PrepareRequest {
        tenant: "acme".into(),
        function: function.into(),
        image: s.image.clone(),
        ..Default::default()
    };
    let (base_built, before_export) = (prepare("base-built"), prepare("before-export"));
    let mut killed_clones = Vec::new();

    // Prepare, base built: the encrypted base is in bases/, no clone yet.
    let mut service = ImageService::start_with_failpoints(&s, "prepare-base-built=sleep(60000)");
    let mut api = service.client(&rt);
    let call = rt.spawn(async move { api.prepare(base_built).await });
    wait_for("the base built", &mut service, &|| {
        files("bases")
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "img"))
    });
    assert!(files("clones").is_empty());
    service.signal(libc::SIGKILL);
    assert!(rt.block_on(call).unwrap().is_err());

    // Prepare, clone created and recorded, not exported.
    let mut service = ImageService::start_with_failpoints(&s, "prepare-before-export=sleep(60000)");
    let mut api = service.client(&rt);
    let call = rt.spawn(async move { api.prepare(before_export).await });
    wait_for("the clone created", &mut service, &|| {
        !files("clones").is_empty()
    });
    assert!(files("exports").is_empty(), "exported before the kill");
    killed_clones.push(
        files("clones")[0]
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    );
    service.signal(libc::SIGKILL);
    assert!(rt.block_on(call).unwrap().is_err());

    // Teardown, revoked, key not destroyed: the socket is gone, the clone file is not.
    let mut service = ImageService::start_with_failpoints(&s, "teardown-after-revoke=sleep(60000)");
    let mut api = service.client(&rt);
    let p = rt
        .block_on(api.prepare(prepare("after-revoke")))
        .unwrap()
        .into_inner();
    let data = s.path("data.bin");
    std::fs::write(&data, vec![0x5au8; 4 << 20]).unwrap();
    run(Command::new("nbdcopy")
        .arg(&data)
        .arg(nbd_uri(&p.socket, &p.export_name)));
    killed_clones.push(p.clone_id.clone());
    let socket = PathBuf::from(&p.socket);
    let call = rt.spawn(async move {
        api.teardown(TeardownRequest {
            clone_id: p.clone_id,
            forced_removal: false,
        })
        .await
    });
    wait_for("the export revoked", &mut service, &|| !socket.exists());
    assert_eq!(files("clones").len(), 1, "erased before the kill");
    service.signal(libc::SIGKILL);
    assert!(rt.block_on(call).unwrap().is_err());

    // The restart: nothing live, nothing left.
    let service = ImageService::start(&s);
    let mut api = service.client(&rt);
    let live = rt.block_on(api.list(ListRequest {})).unwrap().into_inner();
    assert!(live.clones.is_empty());
    service.signal(libc::SIGTERM);
    broker.stop();
    for dir in ["clones", "bases", "spool", "exports", "plain"] {
        assert!(files(dir).is_empty(), "left in {dir}: {:?}", files(dir));
    }
    // Positive control of the scan below: the image's plaintext is in the fixture's rootfs.
    assert!(walk(&s.path("rootfs")).into_iter().any(|f| {
        integration_tests::contains(
            &std::fs::read(f).unwrap_or_default(),
            b"hello from a broker-keyed image",
        )
    }));
    for entry in walk(&state).into_iter().chain(walk(&s.path("cache"))) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !integration_tests::contains(&bytes, b"hello from a broker-keyed image"),
            "{} holds the image's plaintext",
            entry.display()
        );
        assert!(
            !integration_tests::contains(&bytes, &[0x5au8; 64]),
            "{} holds the function's plaintext",
            entry.display()
        );
    }
    let log = s.path("ipu-audit");
    let orphans: Vec<String> = events_of(&log, "recovery.orphan_erased")
        .into_iter()
        .map(|e| e["details"]["clone_id"].as_str().unwrap().to_string())
        .collect();
    for id in &killed_clones {
        assert!(
            orphans.contains(id),
            "{id}'s erase is not on the record: {orphans:?}"
        );
    }
    run(Command::new(bin("audit"))
        .args(["verify", "--log"])
        .arg(&log)
        .arg("--key")
        .arg(log.join("verifier.pub")));
}

/// A host agent that is stopped as a user would stop it, SIGTERM, if a test ends early: it
/// then unmounts, detaches and tears down (a SIGKILL would leave its mounts behind).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while self.0.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every process of the pid's tree: the pid and its descendants.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: fields follow the last ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        parents.push((pid, ppid));
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// While a function runs through `host-attach run`, neither the host agent nor any process it
/// started (runc, the function) holds the layer key in its memory, and no file on
/// the host (its work directory, the mounted rootfs, the bundle, runc's state) holds it;
/// after the run, no file of the whole test tree (host and IPU side) does either. A SIGTERM
/// to the agent alone stops the function and still tears down.
#[test]
fn the_host_agent_and_host_files_hold_no_key_bytes() {
    host_side_holds_no_key_bytes(false);
}

/// The same with the function in a microVM (`run --vm`): neither the host agent nor QEMU
/// (whose memory includes all of the guest's: the function's file system data read through
/// the vhost-user-blk device, its page cache, the kernel) holds the layer key.
#[test]
fn the_microvm_and_the_host_agent_hold_no_key_bytes() {
    if !microvm_ready() {
        eprintln!("skipped: QEMU and the vhost-user socket checks need root");
        return;
    }
    host_side_holds_no_key_bytes(true);
}

fn host_side_holds_no_key_bytes(vm: bool) {
    if !integration_tests::is_root() {
        eprintln!("skipped: mounting and runc need root");
        return;
    }
    let (s, broker) = setup_with(Options {
        escrow_recipient: Some(fixtures().join("keys/rsa-2048/pub.pem")),
        busybox: true,
        ..Options::default()
    });
    let needles = layer_key_needles(&s);
    let _control = scan_finds_a_holder(&needles);
    let service = ImageService::start(&s);
    let mut agent = Agent(
        Command::new(bin("host-attach"))
            .arg("run")
            .args(if vm { &["--vm"][..] } else { &[][..] })
            .arg("--api")
            .arg(&service.socket)
            .args(["--tenant", "acme", "--function", "scan"])
            .arg("--workdir")
            .arg(s.path("host"))
            .arg(&s.image)
            .args(["--", "/bin/busybox", "sh", "-c"])
            .arg("/bin/busybox cat /hello; exec /bin/busybox sleep 600")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(agent.0.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "hello from a broker-keyed image\n");

    let tree = process_tree(agent.0.id());
    if vm {
        let qemu = tree.iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        });
        assert!(qemu, "host-attach and QEMU: {tree:?}");
    } else {
        assert!(
            tree.len() >= 3,
            "host-attach, runc, the function...: {tree:?}"
        );
    }
    for pid in &tree {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // Gone since the listing, or without memory of its own (a zombie).
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.is_empty() || std::fs::File::open(format!("/proc/{pid}/mem")).is_err() {
            continue;
        }
        eprintln!("scanning {} (pid {pid})", name.trim());
        let scan = scan_process_memory(*pid, &needles);
        assert!(
            scan.found.is_empty(),
            "{} (pid {pid}) holds layer key bytes: needles {:?}",
            name.trim(),
            scan.found
        );
        if *pid == agent.0.id() {
            assert!(scan.bytes_scanned > 1_000_000, "{scan:?}");
        }
        if name.starts_with("qemu-system") {
            // The scan reaches the guest's memory: the plaintext the function read from the
            // device (positive control) is there, the key that decrypted it is not.
            let guest = scan_process_memory(*pid, &[b"hello from a broker-keyed image".to_vec()]);
            assert_eq!(
                guest.found,
                vec![0],
                "the scan does not see the guest's memory"
            );
            assert!(scan.bytes_scanned > 200 << 20, "{scan:?}");
        }
    }
    let host_files = walk(&s.path("host"));
    let made = if vm { "initramfs.cpio" } else { "config.json" };
    assert!(
        host_files.iter().any(|p| p.ends_with(made)),
        "{host_files:?}"
    );
    for file in &host_files {
        let bytes = std::fs::read(file).unwrap_or_default();
        for (i, n) in needles.iter().enumerate() {
            assert!(
                !integration_tests::contains(&bytes, n),
                "{} holds needle {i}",
                file.display()
            );
        }
    }
    // SIGTERM to the agent alone stops the function (SIGTERM, then SIGKILL after the
    // grace period: the shell's exec'd sleep is the container's init and ignores SIGTERM),
    // and the agent tears down.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let status = agent.0.wait().unwrap();
    assert!(
        matches!(status.code(), Some(137 | 143)),
        "the function was stopped by a signal: {status}"
    );
    assert!(
        !s.path("host").exists(),
        "the host agent cleans its workdir"
    );
    assert!(!std::fs::read_dir(s.path("ipu-state/clones"))
        .unwrap()
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "clone")));
    service.signal(libc::SIGTERM);
    broker.stop();
    for file in walk(s.dir.path()) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        for (i, n) in needles.iter().enumerate() {
            assert!(
                !integration_tests::contains(&bytes, n),
                "{} holds needle {i}",
                file.display()
            );
        }
    }
}

/// Placement grants through the real binaries: the control plane mints grants (`policy grant issue`),
/// the host agent passes them (`host-attach verify --grant`), `ipu-image-svc serve` and
/// `keybroker serve` check them. Each forgery is refused with its reason in the IPU's audit
/// log; a replay is refused, also after the service restarts; a policy update at the broker
/// that drops the grant key refuses the key even to an IPU still running the old policy,
/// audited with the serial in the broker's log; the IPU restarted on the new bundle refuses
/// it itself.
#[test]
fn placement_grants_through_the_binaries_at_the_ipu_and_at_the_broker() {
    let (s, broker) = setup_with(Options {
        grant_keys: true,
        ..Options::default()
    });
    let mut service = ImageService::start(&s);
    let issue = |name: &str, key: &str, extra: &[&str]| -> (PathBuf, String) {
        let out = s.path(&format!("{name}.grant"));
        let printed = run(Command::new(bin("policy"))
            .args(["grant", "issue", "--json", "--key"])
            .arg(s.path(&format!("{key}/priv.pem")))
            .args(["--tenant", "acme", "--function", "resize"])
            .args(["--host", "host-1.test", "--image", &s.image])
            .args(if extra.contains(&"--ipu") {
                &[][..]
            } else {
                &["--ipu", "ipu-1"][..]
            })
            .args(extra)
            .arg("--out")
            .arg(&out));
        let json: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
        (out, json["serial"].as_str().unwrap().to_string())
    };
    let verify = |socket: &Path, grant: Option<&Path>| -> Output {
        let mut c = Command::new(bin("host-attach"));
        c.args(["verify", "--api"])
            .arg(socket)
            .args(["--tenant", "acme", "--function", "resize"]);
        if let Some(g) = grant {
            c.arg("--grant").arg(g);
        }
        c.arg(&s.image).output().unwrap()
    };
    let refused = |out: Output, code: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{code}: accepted");
        assert!(
            stderr.contains(&format!("placement grant refused ({code})")),
            "{code}: {stderr}"
        );
    };

    refused(verify(&service.socket, None), "no-grant");
    let (other_signer, _) = issue("other-signer", "globex-scheduler", &[]);
    refused(
        verify(&service.socket, Some(&other_signer)),
        "untrusted-signer",
    );
    let long_ago =
        policy::grant::format_time(std::time::SystemTime::now() - Duration::from_secs(7200));
    let (expired, _) = issue("expired", "scheduler", &["--not-before", &long_ago]);
    refused(verify(&service.socket, Some(&expired)), "expired");
    let (other_ipu, _) = issue("other-ipu", "scheduler", &["--ipu", "ipu-2"]);
    refused(verify(&service.socket, Some(&other_ipu)), "wrong-ipu");

    // Positive control: the control plane's grant for acme; its keys released under it.
    let (good, serial) = issue("good", "scheduler", &[]);
    let out = verify(&service.socket, Some(&good));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(verify(&service.socket, Some(&good)), "replayed");
    // Serials persist for their window: replayed after a restart too.
    service.signal(libc::SIGTERM);
    // Meanwhile the operator's CLI (`image unpack --broker`) on the IPU: the broker wants the grant
    // there too (the CLI keeps no serials; the broker does not count uses).
    let out = s.unpack("acme", "cli.ext4").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("placement grant refused (no-grant)"),
        "{stderr}"
    );
    run(s.unpack("acme", "cli.ext4").arg("--grant").arg(&good));
    assert_eq!(
        ext4_cat(&s.path("cli.ext4"), "/hello").as_deref(),
        Some(&b"hello from a broker-keyed image\n"[..])
    );

    service = ImageService::start(&s);
    refused(verify(&service.socket, Some(&good)), "replayed");

    // The broker's policy drops the scheduler's key (bundle version 2). The IPU still runs
    // version 1 and admits a new grant; the broker refuses the key.
    let text = std::fs::read_to_string(s.path("deployment.toml")).unwrap();
    let cut = text.find("[[grant_key]]\nid = \"scheduler\"").unwrap();
    let end = cut + text[cut..].find("tenants = [\"acme\"]\n").unwrap() + 19;
    std::fs::write(
        s.path("deployment-v2.toml"),
        format!("{}{}", &text[..cut], &text[end..]),
    )
    .unwrap();
    run(Command::new(bin("policy"))
        .arg("sign")
        .arg("--deployment")
        .arg(s.path("deployment-v2.toml"))
        .args(["--version", "2", "--key"])
        .arg(s.path("bundle-key/priv.pem"))
        .arg("--output")
        .arg(s.path("bundle-v2.json")));
    run(broker
        .admin()
        .args(["policy", "load"])
        .arg(s.path("bundle-v2.json")));
    let (stale, stale_serial) = issue("stale", "scheduler", &[]);
    let out = verify(&service.socket, Some(&stale));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("placement grant refused (unknown-signer)")
            && stderr.contains("key broker"),
        "{stderr}"
    );
    // The IPU on the new bundle refuses such a grant itself.
    service.signal(libc::SIGTERM);
    std::fs::copy(s.path("bundle-v2.json"), s.path("bundle.json")).unwrap();
    let service = ImageService::start(&s);
    let (after, _) = issue("after", "scheduler", &[]);
    refused(verify(&service.socket, Some(&after)), "unknown-signer");
    service.signal(libc::SIGTERM);
    broker.stop();

    // The IPU's trail: each refusal with its reason code, the admissions with their serial.
    let decisions = events(&s.path("ipu-audit"), "policy.decision");
    let codes: Vec<&str> = decisions
        .iter()
        .filter(|e| e["outcome"] == "denied")
        .filter_map(|e| e["details"]["reason_code"].as_str())
        .collect();
    assert_eq!(
        codes,
        [
            "no-grant",
            "untrusted-signer",
            "expired",
            "wrong-ipu",
            "replayed",
            "replayed",
            "unknown-signer"
        ]
    );
    let admitted: Vec<&str> = decisions
        .iter()
        .filter(|e| e["outcome"] == "allowed")
        .filter_map(|e| e["details"]["grant_serial"].as_str())
        .collect();
    assert_eq!(admitted, [serial.as_str(), stale_serial.as_str()]);
    // The broker's: the key released under the good grant, refused under the stale one.
    let log = s.path("state/audit");
    let released = events(&log, "key.release");
    assert!(!released.is_empty());
    assert!(released
        .iter()
        .all(|e| e["details"]["grant_serial"] == serial.as_str()));
    let denied = events(&log, "key.deny");
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["details"]["reason_code"], "no-grant");
    assert_eq!(denied[1]["details"]["grant_serial"], stale_serial.as_str());
    assert_eq!(denied[1]["details"]["reason_code"], "unknown-signer");
}
