//! `keybroker`: the key broker service and its administration.
//!
//! `keybroker serve --config FILE` runs the service. The administrative commands (keys,
//! IPU enrollment, policy bundles) act on a running broker through its Unix socket
//! (`--socket`), or, when no broker runs, directly on its state directory (`--dir`, which
//! the service locks while it runs). Every change is audited either way.
//! `keybroker keyprovider` is the command form of the ocicrypt key provider protocol.
//!
//! Exit codes: 0 ok, 1 error, 2 usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use api::keybroker::key_admin_client::KeyAdminClient;
use api::keybroker::{
    CreateKeyRequest, EnrollIpuRequest, ImportKeyRequest, IpuIdRequest, KeyIdRequest, KeyInfo,
    ListRequest, LoadPolicyRequest, RevokeKeyRequest,
};
use api::keyprovider::key_provider_service_client::KeyProviderServiceClient;
use api::keyprovider::KeyProviderKeyWrapProtocolInput;
use audit::AuditSink;
use clap::{Parser, Subcommand, ValueEnum};
use keybroker::broker::{Broker, BrokerOptions};
use keybroker::config::{AuditTarget, Config};
use keybroker::keystore::KeyKind;
use keybroker::service::{ipu_info, key_info};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "keybroker",
    version,
    about = "Key broker: layer keys for attested IPUs"
)]
struct Cli {
    /// The broker's state directory, for commands run without a broker (`--socket`).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/keybroker",
        global = true
    )]
    dir: PathBuf,
    /// A running broker's Unix socket: administer it instead of the state directory.
    #[arg(long, value_name = "SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// The audit log, without a broker (default: DIR/audit).
    #[arg(long, value_name = "DIR", global = true)]
    audit_log: Option<PathBuf>,
    /// Who is acting, recorded in the audit log without a broker (default: $USER; through
    /// a broker the socket's peer uid is recorded).
    #[arg(long, global = true)]
    actor: Option<String>,
    /// Keys trusted to sign policy bundles, without a broker.
    #[arg(long, value_name = "FILE", global = true)]
    bundle_key: Vec<PathBuf>,
    /// The TPM that seals the master key (as in the service's master_key_tpm), without a
    /// broker.
    #[arg(long, value_name = "TCTI", global = true)]
    master_key_tpm: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (gRPC over mutual TLS and a Unix socket) until SIGTERM or SIGINT.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Key-encryption keys (the JWE recipients and provider keys layer keys are wrapped to).
    #[command(subcommand)]
    Keys(Keys),
    /// IPUs allowed to attest.
    #[command(subcommand)]
    Ipus(Ipus),
    /// Deployment policy bundles.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The ocicrypt key provider, command form: a request on stdin, the reply on stdout,
    /// through the broker's socket. Configure it in OCICRYPT_KEYPROVIDER_CONFIG as
    /// `{"cmd": {"path": "keybroker", "args": ["--socket", SOCKET, "keyprovider"]}}`.
    Keyprovider,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-4096")]
    Rsa4096,
    #[value(name = "ec-p256")]
    EcP256,
    #[value(name = "ec-p384")]
    EcP384,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rsa2048 => "rsa-2048",
            Kind::Rsa4096 => "rsa-4096",
            Kind::EcP256 => "ec-p256",
            Kind::EcP384 => "ec-p384",
        }
    }
}

#[derive(Subcommand)]
enum Keys {
    /// Generate a key in the broker; prints its public key for publishers.
    Create {
        #[arg(long)]
        id: String,
        #[arg(long, value_enum)]
        kind: Kind,
    },
    /// Import an existing private key (PEM); prints its public key.
    Import {
        #[arg(long)]
        id: String,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// A new version of a key; prints its public key. Older versions still unwrap.
    Rotate {
        #[arg(long)]
        id: String,
    },
    /// Every key version with its algorithm, creation time and state (no secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// The public key of a key's newest version (SPKI PEM): `jwe:FILE` for skopeo or ocipub.
    Public {
        #[arg(long)]
        id: String,
    },
    /// Never release this key (or one version of it) again; it stays listed.
    Revoke {
        #[arg(long)]
        id: String,
        #[arg(long)]
        version: Option<u32>,
    },
}

#[derive(Subcommand)]
enum Ipus {
    /// Enroll an IPU's attestation key (its TPMT_PUBLIC, from `ipu-image-svc tpm ak`).
    Enroll {
        #[arg(long)]
        id: String,
        #[arg(long)]
        class: String,
        #[arg(long, value_name = "FILE")]
        ak_template: PathBuf,
        /// The IPU's endorsement key (TPMT_PUBLIC, from `ipu-image-svc tpm ak --ek-output`):
        /// the AK must then prove it lives in that TPM at its first attestation.
        #[arg(long, value_name = "FILE")]
        ek_template: Option<PathBuf>,
    },
    /// Refuse this IPU's quotes from now on; its sessions end.
    Revoke {
        #[arg(long)]
        id: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Load a signed bundle (`policy sign`): trusted signer, no rollback.
    Load { bundle: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve { config } => serve(config),
        Command::Keyprovider => keyprovider(&cli),
        _ => admin(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

async fn connect(socket: PathBuf) -> Result<Channel, String> {
    let what = socket.display().to_string();
    api::unix::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the broker at {what}: {e}"))
}

fn rpc_error(s: tonic::Status) -> String {
    s.message().to_string()
}

fn audit_sink(target: &AuditTarget) -> Result<Arc<dyn AuditSink>, String> {
    Ok(match target {
        AuditTarget::Dir(dir) => Arc::new(
            audit::local::open(dir, &audit::local::default_origin("keybroker"), None)
                .map_err(|e| format!("audit log {}: {e}", dir.display()))?,
        ),
        AuditTarget::Socket(s) => Arc::new(
            audit::RemoteLog::connect(s)
                .map_err(|e| format!("audit socket {}: {e}", s.display()))?,
        ),
    })
}

fn serve(config: &Path) -> Result<(), String> {
    let config = Config::load(config)?;
    let sink = audit_sink(&config.audit)?;
    let broker = Arc::new(Broker::open(&config.broker, sink).map_err(|e| e.to_string())?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut servers = tokio::task::JoinSet::new();
        if let Some(tls) = &config.tls {
            let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
            let files = keybroker::service::TlsFiles {
                cert_pem: read(&tls.cert)?,
                key_pem: read(&tls.key)?,
                client_ca_pem: read(&tls.client_ca)?,
            };
            let listener = tokio::net::TcpListener::bind(tls.listen)
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", tls.listen))?;
            eprintln!(
                "keybroker: serving mutual TLS on {}",
                listener.local_addr().map_err(|e| e.to_string())?
            );
            let mut stop = stop_tx.subscribe();
            let b = broker.clone();
            servers.spawn(async move {
                keybroker::service::serve(b, listener, files, async move {
                    let _ = stop.recv().await;
                })
                .await
                .map_err(|e| format!("TLS listener: {e}"))
            });
        }
        if let Some(unix) = &config.unix {
            let listener = bind_unix(&unix.socket)?;
            eprintln!("keybroker: serving {}", unix.socket.display());
            let mut stop = stop_tx.subscribe();
            let b = broker.clone();
            let roles = unix.roles.clone();
            servers.spawn(async move {
                keybroker::service::serve_unix(b, listener, roles, async move {
                    let _ = stop.recv().await;
                })
                .await
                .map_err(|e| format!("Unix listener: {e}"))
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            Some(r) = servers.join_next() => {
                r.map_err(|e| e.to_string())??;
            }
        }
        let _ = stop_tx.send(());
        // In-flight requests finish; a client that keeps an idle connection open does not
        // hold the stop for longer than this.
        let drain = async {
            while let Some(r) = servers.join_next().await {
                r.map_err(|e| e.to_string())??;
            }
            Ok::<_, String>(())
        };
        match tokio::time::timeout(DRAIN_DEADLINE, drain).await {
            Ok(r) => r?,
            Err(_) => {
                eprintln!(
                    "keybroker: connections still open {} s after the stop; closing them",
                    DRAIN_DEADLINE.as_secs()
                );
                servers.abort_all();
            }
        }
        if let Some(unix) = &config.unix {
            let _ = std::fs::remove_file(&unix.socket);
        }
        Ok::<_, String>(())
    })
}

/// How long a stopping broker waits for open connections.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        // Left by a broker that died; a live one would hold the state directory's lock,
        // which this broker already took.
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Anyone may connect: callers are told apart by their kernel-reported uid, and uids
    // without a role are refused per request.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

fn keyprovider(cli: &Cli) -> Result<(), String> {
    use std::io::{Read, Write};
    let socket = cli
        .socket
        .clone()
        .ok_or("keyprovider needs --socket (the running broker's Unix socket)")?;
    let mut input = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut input)
        .map_err(|e| format!("stdin: {e}"))?;
    let op = serde_json::from_slice::<ocicrypt::keyprovider::Request>(&input)
        .map_err(|e| format!("malformed key provider request: {e}"))?
        .op;
    let rt = runtime()?;
    let output = rt.block_on(async {
        let mut client = KeyProviderServiceClient::new(connect(socket).await?);
        let req = KeyProviderKeyWrapProtocolInput {
            key_provider_key_wrap_protocol_input: input.to_vec(),
        };
        let reply = if op == ocicrypt::keyprovider::OP_UNWRAP {
            client.un_wrap_key(req).await
        } else {
            client.wrap_key(req).await
        };
        reply
            .map(|r| r.into_inner().key_provider_key_wrap_protocol_output)
            .map_err(rpc_error)
    })?;
    let output = zeroize::Zeroizing::new(output);
    std::io::stdout()
        .write_all(&output)
        .map_err(|e| format!("stdout: {e}"))
}

/// Administrative operations, on a running broker or on its state directory.
// One per process.
#[allow(clippy::large_enum_variant)]
enum Target {
    Remote(tokio::runtime::Runtime, KeyAdminClient<Channel>),
    Local(Broker, String),
}

impl Target {
    fn open(cli: &Cli) -> Result<Self, String> {
        if let Some(socket) = &cli.socket {
            let rt = runtime()?;
            let channel = rt.block_on(connect(socket.clone()))?;
            return Ok(Target::Remote(rt, KeyAdminClient::new(channel)));
        }
        let audit_dir = cli
            .audit_log
            .clone()
            .unwrap_or_else(|| keybroker::broker::default_audit_dir(&cli.dir));
        let sink = audit_sink(&AuditTarget::Dir(audit_dir))?;
        let mut opts = BrokerOptions::new(&cli.dir);
        opts.bundle_keys = cli.bundle_key.clone();
        opts.master_key_tpm = cli.master_key_tpm.clone();
        let broker = Broker::open(&opts, sink).map_err(|e| {
            if e.to_string().contains("lock") {
                format!(
                    "{e} (a broker is running on {}: use --socket)",
                    cli.dir.display()
                )
            } else {
                e.to_string()
            }
        })?;
        let actor = cli
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into());
        Ok(Target::Local(broker, actor))
    }
}

/// Runs one admin call on whichever target: `$local` with the broker and actor, `$remote`
/// with the client.
macro_rules! call {
    ($t:expr, |$b:ident, $who:ident| $local:expr, |$c:ident| $remote:expr) => {
        match $t {
            Target::Local($b, $who) => $local.map_err(|e| e.to_string()),
            Target::Remote(rt, $c) => rt
                .block_on($remote)
                .map(|r| r.into_inner())
                .map_err(rpc_error),
        }
    };
}

fn print_key_json(keys: &[KeyInfo]) {
    let v: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id, "version": k.version, "algorithm": k.algorithm,
                "public_pem": k.public_pem, "created": k.created, "revoked": k.revoked,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
}

fn admin(cli: &Cli) -> Result<(), String> {
    let mut target = Target::open(cli)?;
    let t = &mut target;
    match &cli.command {
        Command::Keys(Keys::Create { id, kind }) => {
            let kk: KeyKind = kind.name().parse().map_err(|e| format!("{e}"))?;
            let k = call!(t, |b, who| b.create_key(who, id, kk).map(key_info), |c| c
                .create_key(CreateKeyRequest {
                    id: id.clone(),
                    kind: kind.name().into()
                }))?;
            print!("{}", k.public_pem);
        }
        Command::Keys(Keys::Import { id, key }) => {
            let pem = zeroize::Zeroizing::new(
                std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?,
            );
            let k = call!(t, |b, who| b.import_key(who, id, &pem).map(key_info), |c| c
                .import_key(ImportKeyRequest {
                    id: id.clone(),
                    private_pem: pem.to_vec()
                }))?;
            print!("{}", k.public_pem);
        }
        Command::Keys(Keys::Rotate { id }) => {
            let k = call!(t, |b, who| b.rotate_key(who, id).map(key_info), |c| c
                .rotate_key(KeyIdRequest { id: id.clone() }))?;
            eprintln!(
                "keybroker: {} version {} ({})",
                k.id, k.version, k.algorithm
            );
            print!("{}", k.public_pem);
        }
        Command::Keys(Keys::Revoke { id, version }) => {
            call!(
                t,
                |b, who| b.revoke_key(who, id, *version).map(|_| ()),
                |c| async {
                    c.revoke_key(RevokeKeyRequest {
                        id: id.clone(),
                        version: version.unwrap_or(0),
                    })
                    .await
                    .map(|r| r.map(|_| ()))
                }
            )?;
        }
        Command::Keys(Keys::List { json }) => {
            let keys = call!(
                t,
                |b, _who| b
                    .keys()
                    .list()
                    .map(|v| v.into_iter().map(key_info).collect::<Vec<_>>()),
                |c| async { c.list_keys(ListRequest {}).await.map(|r| r.map(|l| l.keys)) }
            )?;
            if *json {
                print_key_json(&keys);
            } else {
                for k in keys {
                    println!(
                        "{:<32} v{:<4} {:<10} {} {}",
                        k.id,
                        k.version,
                        k.algorithm,
                        audit::event::format_time(k.created * 1_000_000_000),
                        if k.revoked { "REVOKED" } else { "active" }
                    );
                }
            }
        }
        Command::Keys(Keys::Public { id }) => {
            let keys = call!(
                t,
                |b, _who| b
                    .keys()
                    .versions(id)
                    .map(|v| v.into_iter().map(key_info).collect::<Vec<_>>()),
                |c| async { c.list_keys(ListRequest {}).await.map(|r| r.map(|l| l.keys)) }
            )?;
            let newest = keys
                .into_iter()
                .filter(|k| &k.id == id && !k.revoked)
                .max_by_key(|k| k.version)
                .ok_or_else(|| format!("no usable key {id:?}"))?;
            print!("{}", newest.public_pem);
        }
        Command::Ipus(Ipus::Enroll {
            id,
            class,
            ak_template,
            ek_template,
        }) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let template = read(ak_template)?;
            let ek = ek_template.as_ref().map(read).transpose()?;
            let e = call!(
                t,
                |b, who| b
                    .enroll_ipu(who, id, class, &template, ek.as_deref())
                    .map(ipu_info),
                |c| c.enroll_ipu(EnrollIpuRequest {
                    ipu_id: id.clone(),
                    ipu_class: class.clone(),
                    ak_template: template.clone(),
                    ek_template: ek.clone().unwrap_or_default(),
                })
            )?;
            println!(
                "{} enrolled in class {} (AK {})",
                e.ipu_id,
                e.ipu_class,
                hex::encode(&e.ak_public[..9])
            );
        }
        Command::Ipus(Ipus::Revoke { id }) => {
            call!(t, |b, who| b.revoke_ipu(who, id).map(|_| ()), |c| async {
                c.revoke_ipu(IpuIdRequest { ipu_id: id.clone() })
                    .await
                    .map(|r| r.map(|_| ()))
            })?;
        }
        Command::Ipus(Ipus::List { json }) => {
            let ipus = call!(
                t,
                |b, _who| Ok::<_, String>(
                    b.verifier
                        .list()
                        .into_iter()
                        .map(ipu_info)
                        .collect::<Vec<_>>()
                ),
                |c| async { c.list_ipus(ListRequest {}).await.map(|r| r.map(|l| l.ipus)) }
            )?;
            if *json {
                let v: Vec<serde_json::Value> = ipus
                    .iter()
                    .map(|e| serde_json::json!({
                        "ipu_id": e.ipu_id, "ipu_class": e.ipu_class,
                        "ak_public": hex::encode(&e.ak_public), "enrolled": e.enrolled, "revoked": e.revoked,
                        "pinned": e.pinned, "activated": e.activated,
                    }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
            } else {
                for e in ipus {
                    let state = match (e.revoked, e.pinned, e.activated) {
                        (true, _, _) => "REVOKED",
                        (false, true, true) => "active, pinned to its EK",
                        (false, true, false) => "awaiting activation",
                        (false, false, _) => "active, not pinned",
                    };
                    println!(
                        "{:<24} {:<16} {} {state}",
                        e.ipu_id,
                        e.ipu_class,
                        audit::event::format_time(e.enrolled * 1_000_000_000),
                    );
                }
            }
        }
        Command::Policy(PolicyCmd::Load { bundle }) => {
            let bytes = std::fs::read(bundle)
                .map_err(|e| format!("cannot read {}: {e}", bundle.display()))?;
            let (version, signer) = call!(
                t,
                |b, who| b
                    .load_policy(who, &bytes)
                    .map(|v| (v.content.version, v.signer)),
                |c| async {
                    c.load_policy(LoadPolicyRequest {
                        bundle: bytes.clone(),
                    })
                    .await
                    .map(|r| r.map(|p| (p.version, p.signer)))
                }
            )?;
            println!("policy bundle version {version} signed by {signer} is running");
        }
        Command::Serve { .. } | Command::Keyprovider => unreachable!("dispatched in main"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
