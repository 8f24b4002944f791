//! `ipu-image-svc`: verify, pull and unpack confidential images.
//!
//! Exit codes: 0 accepted (and done), 3 rejected by policy or verification, 1 operational
//! error, 2 usage error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ipu_image_svc::fetch::Platform;
use ipu_image_svc::keys::broker_client::{BrokerKeys, BrokerSettings};
use ipu_image_svc::pipeline::{
    FailureClass, Goal, PipelineConfig, PipelineError, Progress, Report, TrustPipeline, EXIT_USAGE,
};
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::reference::ImageReference;
use policy::Policy;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "ipu-image-svc",
    version,
    about = "IPU confidential image service"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

// Parsed once; boxing the larger variants would only obscure the CLI definition.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Top {
    /// Image operations.
    #[command(subcommand)]
    Image(ImageCommand),
    /// This IPU's TPM.
    #[command(subcommand)]
    Tpm(TpmCommand),
    /// Run the service: per-function clones of verified images, exported to the host agent
    /// over NBD, torn down and erased at function exit (gRPC API on a Unix socket).
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Bases, clones and export sockets.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/state"
    )]
    state_dir: PathBuf,
    /// The API socket.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/ipu-image-svc/api.sock"
    )]
    socket: PathBuf,
    /// The host agent's uid: the only one (with root) that may call the API and open exports.
    #[arg(long, value_name = "UID", default_value = "0")]
    host_agent_uid: u32,
    /// How long a clone lives unless torn down first (e.g. 15m, 1h).
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    clone_ttl: std::time::Duration,
    /// How many image bases to keep for later starts (each is the image's file system,
    /// encrypted; the least recently used one no function uses goes first).
    #[arg(long, value_name = "N", default_value = "16")]
    max_cached_bases: usize,
    /// How long a verification (`Verify`, or a Prepare) lets containerd's decrypt hook have
    /// the image's layers decrypted; then the image must be verified again.
    #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration)]
    verified_layer_ttl: std::time::Duration,
    /// Export clones over TCP on this address (a new port per function) with NBD STARTTLS
    /// forced and client certificates required, instead of Unix sockets.
    #[arg(long, value_name = "IP", requires_all = ["export_cert", "export_key", "export_client_ca"])]
    export_tcp: Option<std::net::IpAddr>,
    /// The exports' TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "export_tcp")]
    export_cert: Option<PathBuf>,
    /// The exports' TLS private key (PEM).
    #[arg(long, value_name = "FILE", requires = "export_tcp")]
    export_key: Option<PathBuf>,
    /// The CA that issues host agents' client certificates (PEM).
    #[arg(long, value_name = "FILE", requires = "export_tcp")]
    export_client_ca: Option<PathBuf>,
    /// The signed deployment policy bundle (production path: the policy decides every Prepare).
    #[arg(long, value_name = "FILE")]
    policy_bundle: PathBuf,
    #[arg(long, value_name = "FILE", required = true)]
    bundle_key: Vec<PathBuf>,
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/policy"
    )]
    bundle_state: PathBuf,
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/blobs"
    )]
    cache: PathBuf,
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/audit"
    )]
    audit_log: PathBuf,
    #[arg(long, value_name = "SOCKET", conflicts_with = "audit_log")]
    audit_socket: Option<PathBuf>,
    #[arg(long, value_name = "HOST")]
    insecure_http: Vec<String>,
    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Subcommand)]
enum TpmCommand {
    /// Write the attestation key's TPMT_PUBLIC (creating and persisting the key on first
    /// use), for `keybroker ipus enroll --ak-template`.
    Ak {
        #[command(flatten)]
        tpm: TpmArgs,
        #[arg(long, short, value_name = "FILE")]
        output: PathBuf,
        /// Also write the endorsement key's TPMT_PUBLIC (for `keybroker ipus enroll
        /// --ek-template`: the AK then proves it lives in this TPM).
        #[arg(long, value_name = "FILE")]
        ek_output: Option<PathBuf>,
    },
    /// Print SHA-256 PCR values as a deployment policy `pcrs = { ... }` line (the reference
    /// values of an IPU class, read from a known-good IPU).
    Pcrs {
        #[command(flatten)]
        tpm: TpmArgs,
        /// Comma-separated PCR indexes.
        #[arg(long, value_delimiter = ',', default_value = "0,7")]
        pcrs: Vec<u8>,
    },
}

#[derive(Args, Clone)]
struct TpmArgs {
    /// The TPM, as a tpm2-tss TCTI (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`).
    #[arg(long, value_name = "TCTI", default_value = "device:/dev/tpmrm0")]
    tpm: String,
    /// The persistent handle of the attestation key.
    #[arg(long, value_name = "HANDLE", default_value = "0x81010010", value_parser = parse_handle)]
    ak_handle: u32,
}

impl BrokerArgs {
    fn settings(&self, url: &str) -> BrokerSettings {
        BrokerSettings {
            url: url.to_string(),
            server_name: self.broker_name.clone(),
            ca: self.broker_ca.clone().expect("required by clap"),
            cert: self.broker_cert.clone().expect("required by clap"),
            key: self.broker_key.clone().expect("required by clap"),
            tpm: self.tpm.tpm.clone(),
            ak_handle: self.tpm.ak_handle,
            provider_name: self.provider_name.clone(),
        }
    }
}

/// `ipu-image-svc serve`: the policy bundle loaded (and audited) once and the IPU attested to
/// the broker, then every Prepare runs the trust pipeline under that policy, with each layer
/// key released by the broker for that request.
fn serve(args: ServeArgs) -> Result<(), String> {
    use ipu_image_svc::service::{Service, ServiceOptions, TcpExports};
    let sink: std::sync::Arc<dyn audit::AuditSink> = match &args.audit_socket {
        Some(socket) => std::sync::Arc::new(
            audit::RemoteLog::connect(socket)
                .map_err(|e| format!("audit daemon {}: {e}", socket.display()))?,
        ),
        None => std::sync::Arc::new(
            audit::local::open(
                &args.audit_log,
                &audit::local::default_origin("ipu-image-svc"),
                None,
            )
            .map_err(|e| format!("audit log {}: {e}", args.audit_log.display()))?,
        ),
    };
    let bundle = policy_bundle::load(
        &args.policy_bundle,
        &args.bundle_key,
        &args.bundle_state,
        sink.as_ref(),
    )
    .map_err(|e| e.message)?;
    let Some(url) = args.broker.broker.clone() else {
        return Err("serve needs --broker: layer keys come from the attested key broker".into());
    };
    let settings = args.broker.settings(&url);
    let image_trust = bundle.image_trust;
    let deployment = std::sync::Arc::new(bundle.deployment);
    let cache = args.cache.clone();
    let insecure = args.insecure_http.clone();
    let factory_sink = sink.clone();
    // Attested now, so that a broker or TPM problem stops the start; the session is renewed
    // before it expires, or when the broker no longer knows it.
    let keys = std::sync::Arc::new(
        BrokerKeys::attest(&settings).map_err(|e| format!("key broker {}: {e}", settings.url))?,
    );
    let factory: ipu_image_svc::service::PipelineFactory = Box::new(move |tenant, function| {
        let ipu_class = keys.ipu_class().map_err(|e| {
            PipelineError::new(
                FailureClass::NoDecryptionKey,
                format!("key broker {}: {e}", settings.url),
            )
        })?;
        let mut cfg = PipelineConfig::new(image_trust.clone(), cache.clone());
        cfg.audit = Some(factory_sink.clone());
        cfg.tenant = Some(tenant.to_string());
        cfg.function = Some(function.to_string());
        cfg.source.insecure_http_hosts = insecure.clone();
        cfg.deployment = Some(ipu_image_svc::pipeline::Deployment {
            policy: deployment.clone(),
            ipu_class: Some(ipu_class),
        });
        cfg.layer_keys = Some(keys.clone());
        Ok(cfg)
    });
    let tcp_exports = match (
        args.export_tcp,
        &args.export_cert,
        &args.export_key,
        &args.export_client_ca,
    ) {
        (Some(ip), Some(cert), Some(key), Some(ca)) => Some(TcpExports {
            ip,
            tls: ipu_image_svc::export::tls::server_config(cert, key, ca)?,
        }),
        _ => None,
    };
    let service = std::sync::Arc::new(
        Service::start(
            ServiceOptions {
                state_dir: args.state_dir.clone(),
                host_agent_uid: args.host_agent_uid,
                clone_ttl: args.clone_ttl,
                tcp_exports,
                max_cached_bases: args.max_cached_bases,
                verified_layer_ttl: args.verified_layer_ttl,
            },
            factory,
            sink,
        )
        .map_err(|e| e.message)?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        if let Some(dir) = args.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let _ = std::fs::remove_file(&args.socket);
        let listener = tokio::net::UnixListener::bind(&args.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
        // Callers are checked by uid on every request; the mode keeps others out anyway.
        std::os::unix::fs::chown(&args.socket, Some(args.host_agent_uid), None)
            .map_err(|e| format!("{}: {e}", args.socket.display()))?;
        std::fs::set_permissions(
            &args.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|e| format!("{}: {e}", args.socket.display()))?;
        let reaper = {
            let service = service.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    let s = service.clone();
                    let _ = tokio::task::spawn_blocking(move || s.reap_expired()).await;
                }
            })
        };
        eprintln!("ipu-image-svc: serving {}", args.socket.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        let stopping = service.clone();
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            // Tear down (and erase) every clone, then end the event streams, so the
            // server's graceful stop does not wait on them.
            let _ = tokio::task::spawn_blocking(move || stopping.shutdown()).await;
        };
        ipu_image_svc::service::grpc::serve(service.clone(), listener, args.host_agent_uid, stop)
            .await
            .map_err(|e| e.to_string())?;
        reaper.abort();
        let _ = std::fs::remove_file(&args.socket);
        Ok::<_, String>(())
    })
}

fn parse_handle(s: &str) -> Result<u32, String> {
    let h = u32::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|e| format!("{s:?} is not a hex handle: {e}"))?;
    if !(0x8100_0000..=0x81ff_ffff).contains(&h) {
        return Err(format!(
            "{s} is not a persistent handle (0x81000000-0x81ffffff)"
        ));
    }
    Ok(h)
}

#[derive(Args)]
struct BrokerArgs {
    /// The key broker (`https://HOST:PORT`): attest with the TPM and obtain every layer key
    /// from it, sealed to this run's session key. Needs --tenant and --function.
    #[arg(long, value_name = "URL", requires_all = ["broker_ca", "broker_cert", "broker_key"])]
    broker: Option<String>,
    /// The CA the broker's certificate chains to.
    #[arg(long, value_name = "FILE")]
    broker_ca: Option<PathBuf>,
    /// This IPU's client certificate (role ipu) and key.
    #[arg(long, value_name = "FILE")]
    broker_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    broker_key: Option<PathBuf>,
    /// The name in the broker's certificate, if not the URL's host.
    #[arg(long, value_name = "NAME")]
    broker_name: Option<String>,
    /// The broker's key provider name.
    #[arg(long, value_name = "NAME", default_value = keybroker::provider::DEFAULT_NAME)]
    provider_name: String,
    #[command(flatten)]
    tpm: TpmArgs,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ImageCommand {
    /// Resolve the manifest and check its signatures against the policy. Fetches no layers.
    Verify(CommonArgs),
    /// Verify, then fetch every layer into the verified blob cache.
    Pull(CommonArgs),
    /// Verify, pull, decrypt and unpack the layers, and build an ext4 root file system.
    Unpack(UnpackArgs),
}

#[derive(Args)]
struct CommonArgs {
    /// containers-policy.json deciding which images are trusted (or use --policy-bundle).
    #[arg(long, value_name = "FILE", required_unless_present = "policy_bundle")]
    policy: Option<PathBuf>,
    /// A signed policy bundle (`policy sign`): its deployment policy decides the request
    /// (--tenant, --function, --ipu-class) and its image trust policy the signatures.
    #[arg(long, value_name = "FILE", conflicts_with = "policy", requires_all = ["bundle_key", "tenant", "function"])]
    policy_bundle: Option<PathBuf>,
    /// A key trusted to sign policy bundles (SPKI PEM, repeatable).
    #[arg(long, value_name = "FILE")]
    bundle_key: Vec<PathBuf>,
    /// Where the running bundle is kept, for the anti-rollback check.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/policy"
    )]
    bundle_state: PathBuf,
    /// The class of this IPU for the deployment policy, when not attested to a key broker
    /// (with --broker the attested class is used and this must match it).
    #[arg(long)]
    ipu_class: Option<String>,
    /// docker://HOST[:PORT]/REPO[:TAG|@DIGEST] or oci:DIR[:TAG]
    #[arg(value_name = "IMAGE-REF")]
    image: String,
    /// Verified blob cache.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/blobs"
    )]
    cache: PathBuf,
    /// Platform to select from an image index.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", default_value = "linux/amd64")]
    platform: String,
    /// Allow plain HTTP to this registry host[:port] (loopback always may).
    #[arg(long, value_name = "HOST")]
    insecure_http: Vec<String>,
    /// One JSON report on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// The tamper-evident audit log every decision is written to.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/audit"
    )]
    audit_log: PathBuf,
    /// Write audit events through the log daemon's writer socket (`audit serve`) instead
    /// of opening the log directory.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["audit_signer", "audit_origin"])]
    audit_socket: Option<PathBuf>,
    /// The log's checkpoint signing key (default: <audit-log>/signer.key, created with
    /// <audit-log>/verifier.pub on first use).
    #[arg(long, value_name = "FILE")]
    audit_signer: Option<PathBuf>,
    /// The log's name in its checkpoints (default: ipu-image-svc/<hostname>).
    #[arg(long, value_name = "ORIGIN")]
    audit_origin: Option<String>,
    /// Tenant and function recorded with the audit events.
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    function: Option<String>,
}

#[derive(Args)]
struct UnpackArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Where to write the ext4 image.
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,
    /// PEM private key that may unwrap layer keys (repeatable). Development option, audited
    /// when used: production takes layer keys from the key broker (--broker).
    #[arg(long, value_name = "FILE", conflicts_with = "broker")]
    decryption_key: Vec<PathBuf>,
    #[command(flatten)]
    broker: BrokerArgs,
    /// Where private staging trees are made (default: <cache>/staging).
    #[arg(long, value_name = "DIR")]
    staging_dir: Option<PathBuf>,
    /// Create character and block device nodes instead of refusing such layers.
    #[arg(long)]
    allow_device_nodes: bool,
    /// Limit on the sum of unpacked file sizes (K, M, G or T suffixes, powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = policy::deploy::parse_size)]
    max_unpacked_bytes: Option<u64>,
    /// Limit on one file's size.
    #[arg(long, value_name = "SIZE", value_parser = policy::deploy::parse_size)]
    max_file_size: Option<u64>,
    /// Limit on tar entries over all layers.
    #[arg(long, value_name = "N")]
    max_inodes: Option<u64>,
    /// Free space to leave in the ext4 image.
    #[arg(long, value_name = "SIZE", value_parser = policy::deploy::parse_size)]
    free_space: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("IPU_LOG")
        .unwrap_or_else(|_| "warn,ipu_image_svc=info,ocicrypt=info,audit=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();

    let cmd = match cli.command {
        Top::Image(cmd) => cmd,
        Top::Serve(args) => {
            return match serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ipu-image-svc: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Top::Tpm(command) => {
            let result = match command {
                TpmCommand::Ak {
                    tpm,
                    output,
                    ek_output,
                } => write_ak(&tpm, &output, ek_output.as_deref()),
                TpmCommand::Pcrs { tpm, pcrs } => print_pcrs(&tpm, &pcrs),
            };
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ipu-image-svc: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let (common, goal, unpack) = match cmd {
        ImageCommand::Verify(c) => (c, Goal::Verify, None),
        ImageCommand::Pull(c) => (c, Goal::Pull, None),
        ImageCommand::Unpack(u) => {
            let (common, output, rest) = u.split();
            (common, Goal::Unpack { output }, Some(rest))
        }
    };
    let json = common.json;
    let mut report = Report {
        image: common.image.clone(),
        ..Report::default()
    };
    let code = match run(common, goal, unpack, &mut report) {
        Ok(()) => 0,
        Err(e) => {
            if report.class.is_none() {
                // Failed before the pipeline ran (policy or key files).
                report.outcome = ipu_image_svc::pipeline::Outcome::Error;
                report.class = Some(e.class);
                report.error = Some(e.message.clone());
            }
            if !json {
                let what = if e.class.is_rejection() {
                    "rejected"
                } else {
                    "error"
                };
                eprintln!(
                    "ipu-image-svc: {what} ({}): {}",
                    e.class.as_str(),
                    e.message
                );
            }
            e.exit_code()
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else if code == 0 {
        print_text(&report);
    }
    ExitCode::from(code as u8)
}

fn write_ak(tpm: &TpmArgs, output: &Path, ek_output: Option<&Path>) -> Result<(), String> {
    let mut t = ipu_image_svc::tpm::Tpm::open_persistent(&tpm.tpm, tpm.ak_handle)
        .map_err(|e| e.to_string())?;
    std::fs::write(output, t.ak_template())
        .map_err(|e| format!("cannot write {}: {e}", output.display()))?;
    if let Some(path) = ek_output {
        let ek = t.ek_template().map_err(|e| e.to_string())?;
        std::fs::write(path, ek).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    eprintln!(
        "ipu-image-svc: attestation key at {:#x} written to {} (AK {})",
        tpm.ak_handle,
        output.display(),
        hex::encode(&t.ak_public()[..9])
    );
    Ok(())
}

fn print_pcrs(tpm: &TpmArgs, pcrs: &[u8]) -> Result<(), String> {
    let mut t = ipu_image_svc::tpm::Tpm::open_persistent(&tpm.tpm, tpm.ak_handle)
        .map_err(|e| e.to_string())?;
    let values = t.read_pcrs(pcrs).map_err(|e| e.to_string())?;
    let fields: Vec<String> = values
        .iter()
        .map(|(i, v)| format!("{i} = \"{}\"", hex::encode(v)))
        .collect();
    println!("pcrs = {{ {} }}", fields.join(", "));
    Ok(())
}

/// Unpack-only options, split off so `run` takes plain values.
struct UnpackOptions {
    decryption_key: Vec<PathBuf>,
    broker: BrokerArgs,
    staging_dir: Option<PathBuf>,
    allow_device_nodes: bool,
    max_unpacked_bytes: Option<u64>,
    max_file_size: Option<u64>,
    max_inodes: Option<u64>,
    free_space: Option<u64>,
}

impl UnpackArgs {
    fn split(self) -> (CommonArgs, PathBuf, UnpackOptions) {
        let rest = UnpackOptions {
            decryption_key: self.decryption_key,
            broker: self.broker,
            staging_dir: self.staging_dir,
            allow_device_nodes: self.allow_device_nodes,
            max_unpacked_bytes: self.max_unpacked_bytes,
            max_file_size: self.max_file_size,
            max_inodes: self.max_inodes,
            free_space: self.free_space,
        };
        (self.common, self.output, rest)
    }
}

/// A bad policy or key file: an operational error (exit code 1).
fn bad_config(message: String) -> PipelineError {
    PipelineError::new(FailureClass::InvalidConfiguration, message)
}

fn run(
    common: CommonArgs,
    goal: Goal,
    unpack: Option<UnpackOptions>,
    report: &mut Report,
) -> Result<(), PipelineError> {
    let reference = match ImageReference::parse(&common.image) {
        Ok(r) => r,
        Err(e) => exit_usage(&format!("image reference {:?}: {e}", common.image)),
    };
    let platform = match Platform::parse(&common.platform) {
        Ok(p) => p,
        Err(e) => exit_usage(&format!("--platform {}: {e}", common.platform)),
    };
    let sink: std::sync::Arc<dyn audit::AuditSink> = match &common.audit_socket {
        Some(socket) => std::sync::Arc::new(audit::RemoteLog::connect(socket).map_err(|e| {
            PipelineError::new(
                FailureClass::Io,
                format!("audit daemon {}: {e}", socket.display()),
            )
        })?),
        None => std::sync::Arc::new(open_audit(&common)?),
    };
    let (policy, deployment) = match (&common.policy, &common.policy_bundle) {
        (Some(p), _) => (
            Policy::from_file(p).map_err(|e| bad_config(e.to_string()))?,
            None,
        ),
        (None, Some(b)) => {
            let loaded =
                policy_bundle::load(b, &common.bundle_key, &common.bundle_state, sink.as_ref())?;
            (loaded.image_trust, Some(loaded.deployment))
        }
        (None, None) => exit_usage("--policy or --policy-bundle is required"),
    };
    let mut cfg = PipelineConfig::new(policy, common.cache.clone());
    cfg.audit = Some(sink);
    cfg.deployment = deployment.map(|d| ipu_image_svc::pipeline::Deployment {
        policy: std::sync::Arc::new(d),
        ipu_class: common.ipu_class.clone(),
    });
    cfg.tenant = common.tenant.clone();
    cfg.function = common.function.clone();
    cfg.source.platform = platform;
    cfg.source.insecure_http_hosts = common.insecure_http.clone();
    if let Some(u) = unpack {
        if let Some(url) = &u.broker.broker {
            let (Some(tenant), Some(function)) = (&cfg.tenant, &cfg.function) else {
                exit_usage("--broker needs --tenant and --function (the broker decides per tenant and function)");
            };
            let settings = u.broker.settings(url);
            let keys = BrokerKeys::attest(&settings).map_err(|e| {
                PipelineError::new(
                    FailureClass::NoDecryptionKey,
                    format!("key broker {url} (tenant {tenant}, function {function}): {e}"),
                )
            })?;
            // The class the broker attested is the class the deployment policy sees.
            if let Some(d) = cfg.deployment.as_mut() {
                let attested = keys
                    .ipu_class()
                    .map_err(|e| PipelineError::new(FailureClass::NoDecryptionKey, e))?;
                if d.ipu_class.as_ref().is_some_and(|c| *c != attested) {
                    return Err(bad_config(format!(
                        "--ipu-class {} but the broker attested this IPU as {attested}",
                        d.ipu_class.as_deref().unwrap_or(""),
                    )));
                }
                d.ipu_class = Some(attested);
            }
            cfg.layer_keys = Some(std::sync::Arc::new(keys));
        }
        if !u.decryption_key.is_empty() {
            tracing::warn!("--decryption-key is a development option: private keys on this host; the key broker replaces it");
        }
        let mut keys = Vec::new();
        for path in &u.decryption_key {
            let pem = Zeroizing::new(std::fs::read(path).map_err(|e| {
                bad_config(format!(
                    "cannot read decryption key {}: {e}",
                    path.display()
                ))
            })?);
            keys.push(
                PrivateKey::from_pem(&pem)
                    .map_err(|e| bad_config(format!("decryption key {}: {e}", path.display())))?,
            );
        }
        if !keys.is_empty() {
            // A development option, but a security decision all the same: on the record.
            let algorithms: Vec<&str> = keys.iter().map(|k| k.algorithm()).collect();
            let sink = cfg.audit.as_ref().expect("set above");
            let mut event = audit::Event::new(
                    ipu_image_svc::pipeline::AUDIT_SERVICE,
                    audit::EventKind::Admin("dev_decryption_key".into()),
                    audit::Outcome::Success,
                    "--decryption-key: layer keys unwrapped with private keys read from this host's disk (development option; the key broker replaces it)",
                )
                .image(common.image.clone(), None)
                .detail("algorithms", algorithms.join(","));
            event.tenant = cfg.tenant.clone();
            event.function = cfg.function.clone();
            sink.append(event).map_err(|e| {
                PipelineError::new(
                    FailureClass::Io,
                    format!("cannot write the audit event: {e}"),
                )
            })?;
        }
        cfg.decryption = DecryptConfig::new(keys);
        cfg.staging_dir = u.staging_dir;
        cfg.limits.allow_device_nodes = u.allow_device_nodes;
        if let Some(v) = u.max_unpacked_bytes {
            cfg.limits.max_unpacked_bytes = v;
        }
        if let Some(v) = u.max_file_size {
            cfg.limits.max_file_size = v;
        }
        if let Some(v) = u.max_inodes {
            cfg.limits.max_inodes = v;
        }
        if let Some(v) = u.free_space {
            cfg.rootfs.free_bytes = v;
        }
    }
    let hw = ocicrypt::hardware_acceleration();
    tracing::info!(
        aes_ni = hw.aes_ni,
        vaes = hw.vaes,
        sha_ni = hw.sha_ni,
        "crypto acceleration"
    );
    let progress = BarProgress::new(common.quiet || common.json);
    let result = TrustPipeline::new(cfg).run(&reference, &goal, &progress, report);
    progress.done();
    result
}

/// Opens the audit log, creating its signing key on first use.
fn open_audit(common: &CommonArgs) -> Result<audit::AuditLog, PipelineError> {
    let origin = common
        .audit_origin
        .clone()
        .unwrap_or_else(|| audit::local::default_origin("ipu-image-svc"));
    audit::local::open(&common.audit_log, &origin, common.audit_signer.as_deref()).map_err(|e| {
        let class = match e {
            audit::AuditError::Request(_) => FailureClass::InvalidConfiguration,
            _ => FailureClass::Io,
        };
        PipelineError::new(
            class,
            format!("audit log {}: {e}", common.audit_log.display()),
        )
    })
}

mod policy_bundle {
    //! Loading a signed policy bundle: trusted signer, no rollback below the running
    //! version, every load audited; the accepted bundle becomes the running one.

    use std::path::{Path, PathBuf};

    use audit::{AuditSink, Event, EventKind, Outcome};
    use ipu_image_svc::pipeline::{FailureClass, PipelineError, AUDIT_SERVICE};
    use policy::deploy::bundle::{BundleStore, InstallError, VerifiedBundle};
    use policy::sigstore::VerificationKey;

    fn config(m: String) -> PipelineError {
        PipelineError::new(FailureClass::InvalidConfiguration, m)
    }

    pub fn load(
        path: &Path,
        key_files: &[PathBuf],
        state: &Path,
        sink: &dyn AuditSink,
    ) -> Result<VerifiedBundle, PipelineError> {
        let mut keys = Vec::new();
        for k in key_files {
            let pem = std::fs::read(k)
                .map_err(|e| config(format!("cannot read bundle key {}: {e}", k.display())))?;
            keys.extend(
                VerificationKey::from_pem(&pem)
                    .map_err(|e| config(format!("bundle key {}: {e}", k.display())))?,
            );
        }
        let bytes = std::fs::read(path)
            .map_err(|e| config(format!("cannot read {}: {e}", path.display())))?;
        let record = |outcome, reason: String| {
            sink.append(
                Event::new(
                    AUDIT_SERVICE,
                    EventKind::Admin("policy_load".into()),
                    outcome,
                    reason,
                )
                .detail("bundle", path.display().to_string()),
            )
            .map_err(|e| {
                PipelineError::new(
                    FailureClass::Io,
                    format!("cannot write the audit event: {e}"),
                )
            })
        };
        let verified = match BundleStore::new(state).install(&bytes, &keys) {
            Ok(v) => v,
            Err(InstallError::State(e)) => return Err(config(e.to_string())),
            Err(InstallError::Rejected(e)) => {
                record(Outcome::Denied, e.to_string())?;
                return Err(PipelineError::new(
                    FailureClass::RejectedByPolicy,
                    format!("policy bundle {}: {e}", path.display()),
                ));
            }
        };
        record(
            Outcome::Allowed,
            format!(
                "policy bundle version {} signed by {}",
                verified.content.version, verified.signer
            ),
        )?;
        Ok(verified)
    }
}

fn exit_usage(message: &str) -> ! {
    eprintln!("ipu-image-svc: {message}");
    std::process::exit(EXIT_USAGE);
}

fn print_text(report: &Report) {
    println!("accepted: {}", report.image);
    if let Some(d) = &report.manifest_digest {
        println!("  manifest  {d}");
    }
    if let Some(p) = &report.policy {
        println!("  policy    {} (scope {}): {}", p.policy, p.scope, p.reason);
    }
    for l in &report.layers {
        let mut line = format!(
            "  layer {}   {} {} bytes{}",
            l.index,
            l.digest,
            l.size,
            if l.encrypted { " encrypted" } else { "" }
        );
        if let Some(d) = &l.diff_id {
            line.push_str(&format!(
                " -> diff_id {d} ({} entries)",
                l.entries.unwrap_or(0)
            ));
        }
        println!("{line}");
    }
    if let Some(r) = &report.rootfs {
        let t = &r.tree;
        println!(
            "  rootfs    {} ({} bytes ext4, uuid {})",
            r.path.display(),
            r.image_bytes,
            r.uuid
        );
        println!(
            "            {} files ({} bytes), {} directories, {} symlinks, {} hardlinks, {} setuid, {} device nodes",
            t.regular_files,
            t.content_bytes,
            t.directories,
            t.symlinks,
            t.hardlinks,
            t.setuid_files,
            t.device_nodes
        );
    }
}

/// A progress bar for long pulls on stderr (hidden when not a terminal or when quiet).
struct BarProgress {
    bar: Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl BarProgress {
    fn new(quiet: bool) -> Self {
        Self {
            bar: Mutex::new(None),
            quiet,
        }
    }

    fn done(&self) {
        self.finish_bytes();
    }
}

impl Progress for BarProgress {
    fn stage(&self, message: &str) {
        tracing::debug!("{message}");
    }

    fn bytes(&self, label: &str, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        let mut guard = self.bar.lock().expect("progress lock");
        let bar = guard.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        bar.set_length(total);
        bar.set_position(done);
    }

    fn finish_bytes(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
