//! A key broker on loopback with mutual TLS, for the gRPC tests and the attestation bench:
//! a throwaway PKI (rcgen), a broker whose only IPU class expects the PCR values a given TPM
//! has now, holding the fixture RSA key, and clients with chosen certificates.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api::keybroker::key_broker_client::KeyBrokerClient;
use api::keybroker::{AttestRequest, ReleaseRequest};
use ipu_image_svc::tpm::Tpm;
use keybroker::broker::Broker;
use keybroker::keystore::{KeyStore, MasterKey};
use keybroker::service::TlsFiles;
use keybroker::verifier::{Enrollment, Evidence, Verifier};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::{audit_log, fixtures};

pub struct Pki {
    ca_pem: String,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "test platform CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        Self {
            ca_pem: ca.pem(),
            ca,
            ca_key,
        }
    }

    /// The CA certificate (PEM) clients and the broker trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// (certificate PEM, key PEM) of a host agent's export client certificate whose identity
    /// is `identity`: a subjectAltName URI if it has a colon, else a DNS name.
    pub fn issue_host(&self, cn: &str, identity: &str) -> (String, String) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(if identity.contains(':') {
            SanType::URI(identity.try_into().unwrap())
        } else {
            SanType::DnsName(identity.try_into().unwrap())
        });
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// (certificate PEM, key PEM) for a subject with this CN and OU (role).
    pub fn issue(&self, cn: &str, ou: Option<&str>, server: bool) -> (String, String) {
        let names = if server {
            vec!["localhost".to_string()]
        } else {
            vec![]
        };
        let mut p = CertificateParams::new(names).unwrap();
        if server {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        p.distinguished_name.push(DnType::CommonName, cn);
        if let Some(ou) = ou {
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub const PCRS: [u8; 2] = [0, 7];

pub const POLICY: &str = r#"
schema = 1
image_trust_policy = "policy-A.json"
[[ipu_class]]
name = "ipu-gen2"
pcr_bank = "sha256"
pcrs = { 0 = "0000000000000000000000000000000000000000000000000000000000000000", 7 = "0000000000000000000000000000000000000000000000000000000000000000" }
[[tenant]]
name = "acme"
[[tenant.function]]
name = "*"
images = ["oci:*", "docker://127.0.0.1:*"]
[[tenant]]
name = "globex"
[[tenant.function]]
name = "*"
images = ["oci:*"]

[[key]]
id = "fixtures-rsa"
images = ["oci:*", "docker://127.0.0.1:*"]
tenants = ["acme"]
ipu_classes = ["ipu-gen2"]

[[key]]
id = "acme-ec"
images = ["oci:*"]
tenants = ["acme"]
ipu_classes = ["ipu-gen2"]
"#;

pub struct Running {
    pub rt: tokio::runtime::Runtime,
    /// The broker behind the service; it also holds an EC P-256 key `acme-ec`.
    pub broker: Arc<Broker>,
    /// The broker's audit log.
    pub audit: Arc<audit::AuditLog>,
    addr: std::net::SocketAddr,
    pub pki: Arc<Pki>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// A verifier whose class `ipu-gen2` expects the PCR values `tpm` has now, with its AK
/// enrolled as IPU `ipu-1`.
pub fn verifier_for(tpm: &mut Tpm) -> Verifier {
    let verifier = Verifier::new(
        HashMap::from([("ipu-gen2".to_string(), tpm.read_pcrs(&PCRS).unwrap())]),
        Duration::from_secs(60),
    );
    verifier
        .enroll(
            tpm.ak_public(),
            Enrollment {
                ipu_id: "ipu-1".into(),
                ipu_class: "ipu-gen2".into(),
                ..Enrollment::default()
            },
        )
        .unwrap();
    verifier
}

/// The key store in `dir` (its master key created on first use), holding the fixture RSA
/// key as `fixtures-rsa`.
pub fn key_store(dir: &Path) -> KeyStore {
    let keys = KeyStore::open(
        dir,
        MasterKey::load_or_create(&dir.join("master.key")).unwrap(),
    )
    .unwrap();
    if keys.info("fixtures-rsa").is_err() {
        keys.import(
            "fixtures-rsa",
            &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
        )
        .unwrap();
    }
    keys
}

/// A broker under [`POLICY`].
pub fn broker(
    verifier: Verifier,
    keys: KeyStore,
    log: Arc<audit::AuditLog>,
    session_ttl: Duration,
) -> Broker {
    broker_under(POLICY, verifier, keys, log, session_ttl)
}

/// A broker under the deployment policy `policy` (TOML).
pub fn broker_under(
    policy: &str,
    verifier: Verifier,
    keys: KeyStore,
    log: Arc<audit::AuditLog>,
    session_ttl: Duration,
) -> Broker {
    let policy = policy::deploy::parse(policy, "policy.toml").unwrap();
    Broker::new(verifier, keys, policy, session_ttl, log)
}

/// The broker in process and the IPU's TPM (swtpm), whose persisted AK the broker enrolled.
pub fn start_with_tpm() -> (crate::Swtpm, Running) {
    let swtpm = crate::Swtpm::start();
    let mut tpm =
        Tpm::open_persistent(&swtpm.tcti(), ipu_image_svc::tpm::DEFAULT_AK_HANDLE).unwrap();
    let running = start(&mut tpm);
    (swtpm, running)
}

/// The pipeline configuration `ipu-image-svc serve` makes per request: images trusted by the
/// policy file `trust_policy`, blobs cached in `cache`, events to `sink` (layer keys come
/// from the service's key source).
pub fn pipeline_factory(
    trust_policy: std::path::PathBuf,
    cache: std::path::PathBuf,
    sink: Arc<dyn audit::AuditSink>,
) -> ipu_image_svc::service::PipelineFactory {
    Box::new(move |tenant, function| {
        let mut cfg = ipu_image_svc::pipeline::PipelineConfig::new(
            policy::Policy::from_file(&trust_policy).unwrap(),
            cache.clone(),
        );
        cfg.audit = Some(sink.clone());
        cfg.tenant = Some(tenant.into());
        cfg.function = Some(function.into());
        Ok(cfg)
    })
}

pub fn start(tpm: &mut Tpm) -> Running {
    start_with(tpm, POLICY, Arc::new(Pki::new()))
}

/// A broker in process under the deployment policy `policy`, its TLS certificate from
/// `pki` (brokers sharing a PKI are one client's replicas), its own state and audit log.
pub fn start_with(tpm: &mut Tpm, policy: &str, pki: Arc<Pki>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let log = audit_log(&dir.path().join("audit"));
    let keys = key_store(dir.path());
    keys.create("acme-ec", keybroker::keystore::KeyKind::EcP256)
        .unwrap();
    let broker = Arc::new(broker_under(
        policy,
        verifier_for(tpm),
        keys,
        log.clone(),
        Duration::from_secs(60),
    ));
    let (cert, key) = pki.issue("broker.test", Some("broker"), true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let tls = TlsFiles {
        cert_pem: cert.into_bytes(),
        key_pem: key.into_bytes(),
        client_ca_pem: pki.ca_pem.clone().into_bytes(),
    };
    rt.spawn(keybroker::service::serve(
        broker.clone(),
        listener,
        tls,
        async {
            let _ = stopped.await;
        },
    ));
    Running {
        rt,
        broker,
        audit: log,
        addr,
        pki,
        _stop: stop,
        _dir: dir,
    }
}

impl Running {
    /// The broker's URL (its certificate names `localhost` and 127.0.0.1).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The IPU side, as `ipu-image-svc serve` runs it: an attested session (TPM at `tcti`,
    /// whose persisted AK [`start`] enrolled) that layer keys are released through. The
    /// IPU's client certificate and the CA are written to `dir`.
    pub fn ipu_keys(
        &self,
        tcti: &str,
        dir: &Path,
    ) -> ipu_image_svc::keys::broker_client::BrokerKeys {
        std::fs::create_dir_all(dir).unwrap();
        let (cert, key) = self.pki.issue("ipu-1.example", Some("ipu"), false);
        std::fs::write(dir.join("ca.pem"), self.pki.ca_pem()).unwrap();
        std::fs::write(dir.join("ipu.pem"), cert).unwrap();
        std::fs::write(dir.join("ipu.key"), key).unwrap();
        ipu_image_svc::keys::broker_client::BrokerKeys::attest(&ipu_settings(
            vec![self.url()],
            tcti,
            dir,
        ))
        .unwrap()
    }

    pub fn client(
        &self,
        identity: Option<(String, String)>,
    ) -> Result<KeyBrokerClient<Channel>, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pki.ca_pem))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let endpoint = Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?;
        self.rt
            .block_on(endpoint.connect())
            .map(KeyBrokerClient::new)
            .map_err(|e| e.to_string())
    }
}

/// The IPU's broker settings as the tests use them: these replicas (certificates naming
/// `localhost`), the TLS files [`Running::ipu_keys`] writes to `dir`, the TPM at `tcti`.
pub fn ipu_settings(
    urls: Vec<String>,
    tcti: &str,
    dir: &Path,
) -> ipu_image_svc::keys::broker_client::BrokerSettings {
    use ipu_image_svc::keys::broker_client as client;
    client::BrokerSettings {
        urls,
        server_name: Some("localhost".into()),
        ca: dir.join("ca.pem"),
        cert: dir.join("ipu.pem"),
        key: dir.join("ipu.key"),
        tpm: tcti.to_string(),
        ak_handle: ipu_image_svc::tpm::DEFAULT_AK_HANDLE,
        provider_name: "ipubroker".into(),
        connect_timeout: client::DEFAULT_CONNECT_TIMEOUT,
        request_timeout: client::DEFAULT_REQUEST_TIMEOUT,
    }
}

/// Layer 0 of the `enc-signed` fixture.
pub struct EncSignedLayer {
    /// The image reference (`oci:` layout).
    pub image: String,
    pub image_digest: String,
    pub layer_digest: String,
    pub annotations: ocicrypt::Annotations,
    pub blob: Vec<u8>,
}

pub fn enc_signed_layer() -> EncSignedLayer {
    let layout = fixtures().join("oci-layout");
    let (image_digest, manifest) = crate::layout_manifest(&layout, "enc-signed");
    let layer = &manifest["layers"][0];
    let layer_digest = layer["digest"].as_str().unwrap().to_string();
    EncSignedLayer {
        image: format!("oci:{}:enc-signed", layout.display()),
        image_digest,
        annotations: serde_json::from_value(layer["annotations"].clone()).unwrap(),
        blob: crate::layout_blob(&layout, &layer_digest),
        layer_digest,
    }
}

/// The release request of the `enc-signed` fixture's first layer for tenant acme.
pub fn fixture_release(session_id: &str) -> ReleaseRequest {
    let layer = enc_signed_layer();
    ReleaseRequest {
        session_id: session_id.into(),
        tenant: "acme".into(),
        function: "resize".into(),
        image: layer.image,
        image_digest: layer.image_digest,
        layer_digest: layer.layer_digest,
        wrapped_jwe: layer.annotations[ocicrypt::ANNOTATION_KEYS_JWE].clone(),
        wrapped_provider: String::new(),
        grant: String::new(),
    }
}

/// The gRPC attestation request for `evidence`.
pub fn attest_request(
    evidence: Evidence,
    ak_public: &[u8],
    nonce: &[u8],
    session_public: Vec<u8>,
) -> AttestRequest {
    ipu_image_svc::keys::broker_client::attest_request(
        evidence,
        ak_public,
        nonce,
        session_public,
        &[],
    )
}

/// Service options as the tests and benches use them: state in `state_dir`, clones live 10
/// minutes, 16 bases cached, exports on Unix sockets for root, the default verification TTL.
pub fn service_options(state_dir: std::path::PathBuf) -> ipu_image_svc::service::ServiceOptions {
    ipu_image_svc::service::ServiceOptions {
        state_dir,
        host_agent_uid: 0,
        clone_ttl: Duration::from_secs(600),
        tcp_exports: None,
        max_cached_bases: 16,
        spool_memory: ipu_image_svc::service::spool::DEFAULT_SPOOL_MEMORY,
        hook_prefetch: ipu_image_svc::service::prefetch::DEFAULT_PREFETCH_LIMIT,
        verified_layer_ttl: ipu_image_svc::service::known::DEFAULT_VERIFIED_LAYER_TTL,
        exports: Default::default(),
    }
}

/// An IPU service as `ipu-image-svc serve` runs one, in process: images trusted by the
/// policy file `trust_policy`, blobs cached in `cache`, every layer key released through
/// `keys` (one attested broker session), events to `audit`.
pub fn ipu_service(
    options: ipu_image_svc::service::ServiceOptions,
    trust_policy: std::path::PathBuf,
    cache: std::path::PathBuf,
    keys: Arc<ipu_image_svc::keys::broker_client::BrokerKeys>,
    audit: Arc<audit::AuditLog>,
) -> ipu_image_svc::service::Service {
    let factory = pipeline_factory(trust_policy, cache, audit.clone());
    ipu_image_svc::service::Service::start(
        options,
        factory,
        ipu_image_svc::keys::KeySource::Broker(keys),
        audit,
    )
    .unwrap()
}

/// `ipu-image-svc image unpack --json` of the `enc-signed` fixture for `tenant` and
/// `function` (cache, audit log and output under `d`), its keys from these `--broker` URLs
/// (in order) with the IPU's TLS files in `tls` (`ca.pem`, `ipu.pem`, `ipu.key`) and its TPM
/// at `tcti`, with `extra` arguments; the exit code and the JSON report.
pub fn cli_unpack(
    d: &Path,
    tls: &Path,
    urls: &[&str],
    extra: &[&str],
    tcti: &str,
    (tenant, function): (&str, &str),
) -> (i32, serde_json::Value) {
    let mut cmd = std::process::Command::new(crate::bin("ipu-image-svc"));
    cmd.args(["image", "unpack", "--json", "--quiet", "--policy"])
        .arg(fixtures().join("policies/policy-A.json"));
    for url in urls {
        cmd.args(["--broker", url]);
    }
    let out = cmd
        .args(extra)
        .arg("--broker-ca")
        .arg(tls.join("ca.pem"))
        .arg("--broker-cert")
        .arg(tls.join("ipu.pem"))
        .arg("--broker-key")
        .arg(tls.join("ipu.key"))
        .args(["--tpm", tcti, "--tenant", tenant, "--function", function])
        .arg("--cache")
        .arg(d.join("cache"))
        .arg("--audit-log")
        .arg(d.join("audit"))
        .arg("--output")
        .arg(d.join(format!("{tenant}-{function}.ext4")))
        .arg(format!(
            "oci:{}:enc-signed",
            fixtures().join("oci-layout").display()
        ))
        .env("TSS2_LOG", "all+NONE")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), report)
}
