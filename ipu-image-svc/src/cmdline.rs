//! `ipu-image-svc`: verify, pull and unpack confidential images; serve per-function clones.
//!
//! Argument parsing and wiring only: the work is in the rest of the library (`command` and `report` for
//! `image`, `service::daemon` for `serve`, `tpm` for `tpm`).
//!
//! Exit codes: 0 accepted (and done), 3 rejected by policy or verification, 1 operational
//! error, 2 usage error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::command::{ImageOptions, PolicySource, UnpackOptions};
use crate::error::EXIT_USAGE;
use crate::fetch::Platform;
use crate::keys::broker_client::BrokerSettings;
use crate::progress::TerminalProgress;
use crate::report::{self, ImageCommand as Command, Outcome, Report};
use crate::service::daemon::{DaemonConfig, TcpExportFiles};
use crate::service::ServiceOptions;
use audit::local::AuditTarget;
use clap::{Args, Parser, Subcommand};
use policy::reference::ImageReference;

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
    /// The configuration file of `serve`.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `serve`'s settings: each flag overrides the configuration file's key of the same name
/// (`--export-tcp` and its files are `[export_tcp]`, `--broker*`, `--tpm` and `--ak-handle`
/// are `[broker]`); the defaults shown apply when neither names it.
#[derive(Args)]
struct ServeArgs {
    /// The configuration file (TOML). Default: /etc/ipu-image-svc/serve.toml when it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Bases, clones and export sockets [default: /var/lib/ipu-image-svc/state].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The API socket (and the gRPC health service) [default: /run/ipu-image-svc/api.sock].
    #[arg(long, value_name = "SOCKET")]
    socket: Option<PathBuf>,
    /// The host agent's uid: the only one (with root) that may call the API and open
    /// exports [default: 0].
    #[arg(long, value_name = "UID")]
    host_agent_uid: Option<u32>,
    /// How long a clone lives unless torn down first (e.g. 15m, 1h) [default: 15m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    clone_ttl: Option<std::time::Duration>,
    /// How many image bases to keep for later starts (each is the image's file system,
    /// encrypted; the least recently used one no function uses goes first) [default: 16].
    #[arg(long, value_name = "N")]
    max_cached_bases: Option<usize>,
    /// How much memory the decrypt hook's received blobs (ciphertext, held until their HMAC
    /// is checked and they are decrypted) may take at once (e.g. 2G); a blob past it goes
    /// to <state-dir>/spool [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = policy::deploy::parse_size)]
    spool_memory: Option<u64>,
    /// How many bytes of encrypted layers the IPU may fetch itself after a `Verify` and
    /// hold for the decrypt hook at once (ciphertext, HMAC-checked as it arrives), so that
    /// the hook's plaintext starts at once instead of after the whole blob has been received
    /// (e.g. 1G). It downloads each such layer a second time, beside containerd: worth it
    /// where the IPU has cores and a network port of its own [default: 0, off].
    #[arg(long, value_name = "SIZE", value_parser = policy::deploy::parse_size)]
    hook_prefetch: Option<u64>,
    /// How long a verification (`Verify`, or a Prepare) lets containerd's decrypt hook have
    /// the image's layers decrypted; then the image must be verified again [default: 15m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    verified_layer_ttl: Option<std::time::Duration>,
    /// How clones are exported unless a Prepare asks otherwise: `nbd` (a per-function NBD
    /// socket, or TCP with --export-tcp) or `vhost-user-blk` (a per-function vhost-user-blk
    /// device socket for a microVM's `-device vhost-user-blk-pci`; local only) [default: nbd].
    #[arg(long = "export", value_name = "KIND")]
    export_kind: Option<crate::export::ExportKind>,
    /// Virtqueues of each vhost-user-blk export (1 to 16), each served by its own thread
    /// [default: 2].
    #[arg(long, value_name = "N")]
    vhost_queues: Option<u16>,
    /// Export clones over TCP on this address (a new port per function) with NBD STARTTLS
    /// forced and client certificates required, instead of Unix sockets. Each Prepare must
    /// then name the host identity (a subjectAltName DNS name or URI) the export is for: only a
    /// client certificate carrying it opens the export.
    #[arg(long, value_name = "IP")]
    export_tcp: Option<std::net::IpAddr>,
    /// The exports' TLS certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    export_cert: Option<PathBuf>,
    /// The exports' TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    export_key: Option<PathBuf>,
    /// The CA that issues host agents' client certificates (PEM).
    #[arg(long, value_name = "FILE")]
    export_client_ca: Option<PathBuf>,
    /// The signed deployment policy bundle (production path: the policy decides every Prepare).
    #[arg(long, value_name = "FILE")]
    policy_bundle: Option<PathBuf>,
    /// A key trusted to sign policy bundles (repeatable; replaces the file's `bundle_keys`).
    #[arg(long, value_name = "FILE")]
    bundle_key: Vec<PathBuf>,
    /// [default: /var/lib/ipu-image-svc/policy]
    #[arg(long, value_name = "DIR")]
    bundle_state: Option<PathBuf>,
    /// [default: /var/lib/ipu-image-svc/blobs]
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// [default: /var/lib/ipu-image-svc/audit, unless --audit-socket]
    #[arg(long, value_name = "DIR")]
    audit_log: Option<PathBuf>,
    #[arg(long, value_name = "SOCKET", conflicts_with = "audit_log")]
    audit_socket: Option<PathBuf>,
    #[arg(long, value_name = "HOST")]
    insecure_http: Vec<String>,
    /// Log lines as `text` (the default) or `json` (one object per line), on stderr.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<ops::logging::LogFormat>,
    /// Serve Prometheus metrics (GET /metrics) on this address (IP:PORT) or Unix socket
    /// path; off unless given.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<ops::metrics::MetricsListen>,
    /// The key broker (`https://HOST:PORT`): attest with the TPM and obtain every layer key
    /// from it, sealed to this run's session key. Repeatable, one per replica, in the order
    /// they are tried (replaces the file's `urls`): a replica that is down, refuses the
    /// connection or times out is skipped to the next; a denial is final.
    #[arg(long, value_name = "URL")]
    broker: Vec<String>,
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
    /// The broker's key provider name [default: the protocol's].
    #[arg(long, value_name = "NAME")]
    provider_name: Option<String>,
    /// How long connecting to one broker replica (TLS included) may take [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    broker_connect_timeout: Option<std::time::Duration>,
    /// How long one request to one broker replica may take [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    broker_request_timeout: Option<std::time::Duration>,
    /// The TPM, as a tpm2-tss TCTI [default: device:/dev/tpmrm0].
    #[arg(long, value_name = "TCTI")]
    tpm: Option<String>,
    /// The persistent handle of the attestation key [default: 0x81010010].
    #[arg(long, value_name = "HANDLE", value_parser = parse_handle)]
    ak_handle: Option<u32>,
}

impl ServeArgs {
    /// The effective configuration: these flags over the file over the defaults.
    fn effective(self) -> Result<crate::config::ServeConfig, ops::config::ConfigError> {
        use crate::config::{self as c, BrokerFileSettings, ExportTcpSettings};
        let file = ops::config::choose(self.config.as_deref(), Path::new(c::DEFAULT_CONFIG));
        c::effective(
            file.as_deref(),
            c::ServeSettings {
                state_dir: self.state_dir,
                socket: self.socket,
                host_agent_uid: self.host_agent_uid,
                clone_ttl: self.clone_ttl,
                max_cached_bases: self.max_cached_bases,
                spool_memory: self.spool_memory,
                hook_prefetch: self.hook_prefetch,
                verified_layer_ttl: self.verified_layer_ttl,
                export: self.export_kind,
                vhost_queues: self.vhost_queues,
                policy_bundle: self.policy_bundle,
                bundle_keys: (!self.bundle_key.is_empty()).then_some(self.bundle_key),
                bundle_state: self.bundle_state,
                cache: self.cache,
                audit_log: self.audit_log,
                audit_socket: self.audit_socket,
                insecure_http: (!self.insecure_http.is_empty()).then_some(self.insecure_http),
                log_format: self.log_format,
                metrics_listen: self.metrics_listen,
                export_tcp: ExportTcpSettings {
                    ip: self.export_tcp,
                    cert: self.export_cert,
                    key: self.export_key,
                    client_ca: self.export_client_ca,
                },
                broker: BrokerFileSettings {
                    url: None,
                    urls: (!self.broker.is_empty()).then_some(self.broker),
                    ca: self.broker_ca,
                    cert: self.broker_cert,
                    key: self.broker_key,
                    name: self.broker_name,
                    provider_name: self.provider_name,
                    tpm: self.tpm,
                    ak_handle: self.ak_handle,
                    connect_timeout: self.broker_connect_timeout,
                    request_timeout: self.broker_request_timeout,
                },
            },
        )
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check the configuration file (and flags) and print the effective configuration of
    /// `serve` (secrets redacted; paths to key files are shown, their contents never read).
    Check(ServeArgs),
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
    fn settings(&self) -> Option<BrokerSettings> {
        if self.broker.is_empty() {
            return None;
        }
        Some(BrokerSettings {
            urls: self.broker.clone(),
            server_name: self.broker_name.clone(),
            ca: self.broker_ca.clone().expect("required by clap"),
            cert: self.broker_cert.clone().expect("required by clap"),
            key: self.broker_key.clone().expect("required by clap"),
            tpm: self.tpm.tpm.clone(),
            ak_handle: self.tpm.ak_handle,
            provider_name: self.provider_name.clone(),
            connect_timeout: self.broker_connect_timeout,
            request_timeout: self.broker_request_timeout,
        })
    }
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
    /// from it, sealed to this run's session key. Needs --tenant and --function. Repeatable,
    /// one per replica, in the order they are tried: a replica that is down, refuses the
    /// connection or times out is skipped to the next; a denial is final.
    #[arg(long, value_name = "URL", requires_all = ["broker_ca", "broker_cert", "broker_key"])]
    broker: Vec<String>,
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
    #[arg(long, value_name = "NAME", default_value = broker_protocol::DEFAULT_PROVIDER_NAME)]
    provider_name: String,
    /// How long connecting to one broker replica (TLS included) may take.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "10s")]
    broker_connect_timeout: std::time::Duration,
    /// How long one request to one broker replica may take.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "30s")]
    broker_request_timeout: std::time::Duration,
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
    /// At the end, a table of the stages that ran (fetch, verify, key release, decrypt,
    /// unpack, file system) with their milliseconds and share of the whole, on stderr.
    #[arg(long)]
    timings: bool,
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
    /// The control plane's placement grant (`policy grant issue`), carried to the key broker
    /// with every release: required when the broker's policy names grant keys.
    #[arg(long, value_name = "FILE")]
    grant: Option<PathBuf>,
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

const LOG_FILTER: &str = "warn,ipu_image_svc=info,ocicrypt=info,audit=info,ops=info";

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Crash tests pause the service at named points (FAILPOINTS); nothing without the feature.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let log = |format| ops::logging::init(format, "IPU_LOG", LOG_FILTER);
    let cli = match cli.command {
        Top::Serve(args) => {
            let config = match args.effective() {
                Ok(c) => c,
                Err(e) => exit_usage(&e.to_string()),
            };
            log(config.log_format);
            return done(serve(config));
        }
        Top::Config(ConfigCommand::Check(args)) => match args.effective() {
            Ok(c) => {
                print!("{}", ops::config::render(&c));
                return ExitCode::SUCCESS;
            }
            Err(e) => exit_usage(&e.to_string()),
        },
        _ => cli,
    };
    let timings = match &cli.command {
        Top::Image(
            ImageCommand::Verify(c)
            | ImageCommand::Pull(c)
            | ImageCommand::Unpack(UnpackArgs { common: c, .. }),
        ) if c.timings => Some(ops::timings::Timings::new()),
        _ => None,
    };
    ops::logging::init_with(
        ops::logging::LogFormat::Text,
        "IPU_LOG",
        LOG_FILTER,
        timings.as_ref().map(ops::timings::Timings::layer),
    );
    match cli.command {
        Top::Image(cmd) => {
            let started = std::time::Instant::now();
            let code = image(cmd);
            if let Some(t) = timings {
                eprint!(
                    "{}",
                    ops::timings::Timings::table(&t.take(), started.elapsed())
                );
            }
            code
        }
        Top::Serve(_) | Top::Config(_) => unreachable!("handled above"),
        Top::Tpm(TpmCommand::Ak {
            tpm,
            output,
            ek_output,
        }) => done(write_ak(&tpm, &output, ek_output.as_deref())),
        Top::Tpm(TpmCommand::Pcrs { tpm, pcrs }) => done(print_pcrs(&tpm, &pcrs)),
    }
}

fn done(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipu-image-svc: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(c: crate::config::ServeConfig) -> Result<(), String> {
    ops::memory::reuse_freed_chunks();
    let tcp_exports = match c.export_tcp {
        Some(t) => Some(
            TcpExportFiles {
                ip: t.ip,
                cert: t.cert,
                key: t.key,
                client_ca: t.client_ca,
            }
            .load()
            .map_err(|e| e.message)?,
        ),
        None => None,
    };
    let broker = BrokerSettings {
        urls: c.broker.urls,
        server_name: c.broker.name,
        ca: c.broker.ca,
        cert: c.broker.cert,
        key: c.broker.key,
        tpm: c.broker.tpm,
        ak_handle: c.broker.ak_handle,
        provider_name: c.broker.provider_name,
        connect_timeout: c.broker.connect_timeout,
        request_timeout: c.broker.request_timeout,
    };
    let audit = match (c.audit_socket, c.audit_log) {
        (Some(socket), _) => AuditTarget::Socket(socket),
        (None, dir) => AuditTarget::dir(dir.unwrap_or_default()),
    };
    crate::service::daemon::run(DaemonConfig {
        service: ServiceOptions {
            state_dir: c.state_dir,
            host_agent_uid: c.host_agent_uid,
            clone_ttl: c.clone_ttl,
            tcp_exports,
            max_cached_bases: c.max_cached_bases,
            spool_memory: c.spool_memory,
            hook_prefetch: c.hook_prefetch,
            verified_layer_ttl: c.verified_layer_ttl,
            exports: crate::service::ExportOptions {
                default_kind: c.export,
                vhost_queues: c.vhost_queues.into(),
                read_only: false,
            },
        },
        socket: c.socket,
        policy_bundle: c.policy_bundle,
        bundle_keys: c.bundle_keys,
        bundle_state: c.bundle_state,
        cache: c.cache,
        audit,
        insecure_http: c.insecure_http,
        broker,
        metrics_listen: c.metrics_listen,
    })
    .map_err(|e| e.to_string())
}

fn image(cmd: ImageCommand) -> ExitCode {
    let (common, command, unpack) = match cmd {
        ImageCommand::Verify(c) => (c, Command::Verify, None),
        ImageCommand::Pull(c) => (c, Command::Pull, None),
        ImageCommand::Unpack(u) => {
            let output = u.output.clone();
            let (common, rest) = u.split();
            (common, Command::Unpack { output }, Some(rest))
        }
    };
    let reference = match ImageReference::parse(&common.image) {
        Ok(r) => r,
        Err(e) => exit_usage(&format!("image reference {:?}: {e}", common.image)),
    };
    let platform = match Platform::parse(&common.platform) {
        Ok(p) => p,
        Err(e) => exit_usage(&format!("--platform {}: {e}", common.platform)),
    };
    if unpack.as_ref().is_some_and(|u| u.broker.is_some())
        && (common.tenant.is_none() || common.function.is_none())
    {
        exit_usage(
            "--broker needs --tenant and --function (the broker decides per tenant and function)",
        );
    }
    let policy = match (common.policy, common.policy_bundle) {
        (Some(p), _) => PolicySource::TrustPolicy(p),
        (None, Some(path)) => PolicySource::Bundle {
            path,
            keys: common.bundle_key,
            state: common.bundle_state,
        },
        (None, None) => exit_usage("--policy or --policy-bundle is required"),
    };
    let options = ImageOptions {
        image: common.image.clone(),
        policy,
        ipu_class: common.ipu_class,
        cache: common.cache,
        platform,
        insecure_http: common.insecure_http,
        audit: match common.audit_socket {
            Some(socket) => AuditTarget::Socket(socket),
            None => AuditTarget::Dir {
                dir: common.audit_log,
                origin: common.audit_origin,
                signer: common.audit_signer,
            },
        },
        tenant: common.tenant,
        function: common.function,
        unpack,
    };
    let hw = ocicrypt::hardware_acceleration();
    tracing::info!(
        aes_ni = hw.aes_ni,
        vaes = hw.vaes,
        sha_ni = hw.sha_ni,
        "crypto acceleration"
    );
    let (report, result) = match crate::command::set_up(&options) {
        Ok((pipeline, keys)) => {
            let progress = TerminalProgress::new(common.quiet || common.json);
            let ran = report::run(&pipeline, &keys, &reference, &command, &progress);
            crate::progress::Progress::finish_bytes(&progress);
            ran
        }
        // Failed before the pipeline ran (policy, audit or key files).
        Err(e) => (
            Report {
                image: common.image.clone(),
                outcome: Outcome::Error,
                class: Some(e.class),
                error: Some(e.message.clone()),
                ..Report::default()
            },
            Err(e),
        ),
    };
    let code = match &result {
        Ok(()) => 0,
        Err(e) => {
            if !common.json {
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
    if common.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else if code == 0 {
        print!("{}", report.to_text());
    }
    ExitCode::from(code as u8)
}

fn write_ak(tpm: &TpmArgs, output: &Path, ek_output: Option<&Path>) -> Result<(), String> {
    let mut t =
        crate::tpm::Tpm::open_persistent(&tpm.tpm, tpm.ak_handle).map_err(|e| e.to_string())?;
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
    let mut t =
        crate::tpm::Tpm::open_persistent(&tpm.tpm, tpm.ak_handle).map_err(|e| e.to_string())?;
    let values = t.read_pcrs(pcrs).map_err(|e| e.to_string())?;
    println!("{}", crate::tpm::pcrs_line(&values));
    Ok(())
}

impl UnpackArgs {
    fn split(self) -> (CommonArgs, UnpackOptions) {
        let rest = UnpackOptions {
            decryption_keys: self.decryption_key,
            broker: self.broker.settings(),
            grant: self
                .grant
                .map(|path| match std::fs::read(&path).map(String::from_utf8) {
                    Ok(Ok(text)) if text.len() <= policy::grant::MAX_GRANT_BYTES => text,
                    Ok(Ok(_)) => exit_usage(&format!(
                        "--grant {}: larger than {} bytes, not a placement grant",
                        path.display(),
                        policy::grant::MAX_GRANT_BYTES
                    )),
                    Ok(Err(_)) => exit_usage(&format!("--grant {}: not UTF-8", path.display())),
                    Err(e) => exit_usage(&format!("--grant {}: {e}", path.display())),
                }),
            allow_device_nodes: self.allow_device_nodes,
            max_unpacked_bytes: self.max_unpacked_bytes,
            max_file_size: self.max_file_size,
            max_inodes: self.max_inodes,
            free_space: self.free_space,
        };
        (self.common, rest)
    }
}

fn exit_usage(message: &str) -> ! {
    eprintln!("ipu-image-svc: {message}");
    std::process::exit(EXIT_USAGE);
}

/// The `ipu-image-svc` command line as clap sees it: what `xtask docs` renders as man pages and
/// shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
