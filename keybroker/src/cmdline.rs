//! `keybroker`: the key broker service and its administration.
//!
//! `keybroker serve --config FILE` runs the service. The administrative commands (keys,
//! IPU enrollment, policy bundles) act on a running broker through its Unix socket
//! (`--socket`), or, when no broker runs, directly on its state directory (`--dir`, which
//! the service locks while it runs). Every change is audited either way.
//! `keybroker keyprovider` is the command form of the ocicrypt key provider protocol.
//!
//! Exit codes: 0 ok, 1 error, 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::admin::{self, AdminError, LocalOptions, Target};
use crate::keystore::KeyKind;
use crate::output;
use crate::store::postgres::PgStore;
use crate::store::StoreLocation;
use clap::{Parser, Subcommand, ValueEnum};

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
    /// The broker's store: `sled` (in DIR, the default) or a `postgres://` URL (several
    /// replicas share it). For `serve`, it overrides the configuration's `store`.
    #[arg(long, value_name = "URL", global = true)]
    store: Option<StoreLocation>,
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
    /// The PostgreSQL store's schema (`--store postgres://...`).
    #[command(subcommand)]
    Db(DbCmd),
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

impl From<Kind> for KeyKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Rsa2048 => KeyKind::Rsa2048,
            Kind::Rsa4096 => KeyKind::Rsa4096,
            Kind::EcP256 => KeyKind::EcP256,
            Kind::EcP384 => KeyKind::EcP384,
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
enum DbCmd {
    /// Apply the schema migrations this broker needs (idempotent; safe with replicas
    /// running an older schema only while it adds what they do not use).
    Migrate,
    /// The schema version applied and the one this broker needs.
    Status,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Load a signed bundle (`policy sign`): trusted signer, no rollback.
    Load { bundle: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve { config } => match cli.store.clone() {
            Some(store) => crate::daemon::serve_file_on(config, store),
            None => crate::daemon::serve_file(config),
        }
        .map_err(|e| e.to_string()),
        Command::Db(cmd) => db(cli.store.as_ref(), cmd),
        Command::Keyprovider => {
            crate::provider_command::run(cli.socket.as_deref()).map_err(|e| e.to_string())
        }
        _ => admin(&cli).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn admin(cli: &Cli) -> Result<(), AdminError> {
    let local = LocalOptions {
        dir: cli.dir.clone(),
        audit_log: cli.audit_log.clone(),
        actor: cli.actor.clone(),
        bundle_keys: cli.bundle_key.clone(),
        master_key_tpm: cli.master_key_tpm.clone(),
        store: cli.store.clone().unwrap_or_default(),
    };
    let mut t = Target::open(cli.socket.as_deref(), &local)?;
    match &cli.command {
        Command::Keys(Keys::Create { id, kind }) => {
            print!("{}", t.create_key(id, (*kind).into())?.public_pem);
        }
        Command::Keys(Keys::Import { id, key }) => {
            let pem = zeroize::Zeroizing::new(admin::read(key)?);
            print!("{}", t.import_key(id, &pem)?.public_pem);
        }
        Command::Keys(Keys::Rotate { id }) => {
            let k = t.rotate_key(id)?;
            eprint!("{}", output::rotated(&k));
            print!("{}", k.public_pem);
        }
        Command::Keys(Keys::Revoke { id, version }) => t.revoke_key(id, *version)?,
        Command::Keys(Keys::List { json }) => {
            let keys = t.list_keys()?;
            if *json {
                print!("{}", output::keys_json(&keys));
            } else {
                print!("{}", output::keys_text(&keys));
            }
        }
        Command::Keys(Keys::Public { id }) => print!("{}", t.newest_key(id)?.public_pem),
        Command::Ipus(Ipus::Enroll {
            id,
            class,
            ak_template,
            ek_template,
        }) => {
            let template = admin::read(ak_template)?;
            let ek = ek_template.as_deref().map(admin::read).transpose()?;
            let e = t.enroll_ipu(id, class, &template, ek.as_deref())?;
            print!("{}", output::enrolled(&e));
        }
        Command::Ipus(Ipus::Revoke { id }) => t.revoke_ipu(id)?,
        Command::Ipus(Ipus::List { json }) => {
            let ipus = t.list_ipus()?;
            if *json {
                print!("{}", output::ipus_json(&ipus));
            } else {
                print!("{}", output::ipus_text(&ipus));
            }
        }
        Command::Policy(PolicyCmd::Load { bundle }) => {
            let (version, signer) = t.load_policy(&admin::read(bundle)?)?;
            print!("{}", output::policy_loaded(version, &signer));
        }
        Command::Serve { .. } | Command::Keyprovider | Command::Db(_) => {
            unreachable!("dispatched in main")
        }
    }
    Ok(())
}

/// `keybroker db migrate|status`.
fn db(store: Option<&StoreLocation>, cmd: &DbCmd) -> Result<(), String> {
    let Some(StoreLocation::Postgres(url)) = store else {
        return Err(
            "db: give the PostgreSQL store, --store postgres://... (sled needs no migrations)"
                .into(),
        );
    };
    let store = PgStore::connect(url).map_err(|e| e.to_string())?;
    let want = crate::store::postgres::schema_version();
    match cmd {
        DbCmd::Migrate => {
            let applied = store.migrate().map_err(|e| e.to_string())?;
            if applied.is_empty() {
                println!("schema at version {want}: nothing to migrate");
            } else {
                let list: Vec<String> = applied.iter().map(i32::to_string).collect();
                println!(
                    "applied migration(s) {}: schema at version {want}",
                    list.join(", ")
                );
            }
            Ok(())
        }
        DbCmd::Status => {
            let at = store.applied_version().map_err(|e| e.to_string())?;
            println!("schema at version {at}; this broker needs {want}");
            store.check_schema().map_err(|e| e.to_string())
        }
    }
}

/// The `keybroker` command line as clap sees it: what `xtask docs` renders as man pages and
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
