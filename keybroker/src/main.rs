//! `keybroker`: administration of the broker's key-encryption keys. Every change is
//! audited. (The service itself, `keybroker serve`, follows with enrollment persistence.)
//!
//! Exit codes: 0 ok, 1 error, 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use audit::{Event, EventKind, KeyId, Outcome};
use clap::{Parser, Subcommand, ValueEnum};
use keybroker::keystore::{KeyKind, KeyStore, MasterKey};

#[derive(Parser)]
#[command(name = "keybroker", version, about = "Key broker administration")]
struct Cli {
    /// The broker's state directory (key store and master key).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/keybroker",
        global = true
    )]
    dir: PathBuf,
    /// Its audit log (default: DIR/audit).
    #[arg(long, value_name = "DIR", global = true)]
    audit_log: Option<PathBuf>,
    /// Who is acting, recorded in the audit log (default: $USER).
    #[arg(long, global = true)]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Key-encryption keys (the JWE recipients publishers encrypt layer keys to).
    #[command(subcommand)]
    Keys(Keys),
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
    /// Every key with its algorithm, creation time and state (no secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// The public key of a key (SPKI PEM): `jwe:FILE` for skopeo or ocipub.
    Public {
        #[arg(long)]
        id: String,
    },
    /// Never release this key again (it stays listed).
    Revoke {
        #[arg(long)]
        id: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    std::fs::create_dir_all(&cli.dir).map_err(|e| format!("{}: {e}", cli.dir.display()))?;
    let master =
        MasterKey::load_or_create(&cli.dir.join("master.key")).map_err(|e| e.to_string())?;
    let store = KeyStore::open(&cli.dir, master).map_err(|e| e.to_string())?;
    let audit_dir = cli
        .audit_log
        .clone()
        .unwrap_or_else(|| cli.dir.join("audit"));
    let actor = cli
        .actor
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let record = |action: &str, id: &str, outcome: Outcome, reason: String| -> Result<(), String> {
        let log = audit::local::open(&audit_dir, &audit::local::default_origin("keybroker"), None)
            .map_err(|e| format!("audit log {}: {e}", audit_dir.display()))?;
        let mut e = Event::new(
            keybroker::broker::AUDIT_SERVICE,
            EventKind::Admin(action.into()),
            outcome,
            reason,
        )
        .actor(audit::event::Actor {
            subject: Some(actor.clone()),
            ..Default::default()
        });
        if let Ok(k) = KeyId::new(id) {
            e = e.key_id(k);
        }
        log.append(e)
            .map(|_| ())
            .map_err(|e| format!("cannot write the audit event: {e}"))
    };
    let Command::Keys(keys) = cli.command;
    match keys {
        Keys::Create { id, kind } => {
            let kind = match kind {
                Kind::Rsa2048 => KeyKind::Rsa2048,
                Kind::Rsa4096 => KeyKind::Rsa4096,
                Kind::EcP256 => KeyKind::EcP256,
                Kind::EcP384 => KeyKind::EcP384,
            };
            match store.create(&id, kind) {
                Ok(info) => {
                    record(
                        "key_create",
                        &id,
                        Outcome::Success,
                        format!("{} key created", info.algorithm),
                    )?;
                    print!("{}", info.public_pem);
                }
                Err(e) => {
                    record("key_create", &id, Outcome::Failure, e.to_string())?;
                    return Err(e.to_string());
                }
            }
        }
        Keys::Import { id, key } => {
            let pem = zeroize::Zeroizing::new(
                std::fs::read(&key).map_err(|e| format!("cannot read {}: {e}", key.display()))?,
            );
            match store.import(&id, &pem) {
                Ok(info) => {
                    record(
                        "key_import",
                        &id,
                        Outcome::Success,
                        format!("{} key imported", info.algorithm),
                    )?;
                    print!("{}", info.public_pem);
                }
                Err(e) => {
                    record("key_import", &id, Outcome::Failure, e.to_string())?;
                    return Err(e.to_string());
                }
            }
        }
        Keys::List { json } => {
            let keys = store.list().map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&keys).expect("serializes")
                );
            } else {
                for k in keys {
                    println!(
                        "{:<32} {:<10} {} {}",
                        k.id,
                        k.algorithm,
                        audit::event::format_time(k.created * 1_000_000_000),
                        if k.revoked { "REVOKED" } else { "active" }
                    );
                }
            }
        }
        Keys::Public { id } => print!("{}", store.info(&id).map_err(|e| e.to_string())?.public_pem),
        Keys::Revoke { id } => match store.revoke(&id) {
            Ok(()) => record("key_revoke", &id, Outcome::Success, "key revoked".into())?,
            Err(e) => {
                record("key_revoke", &id, Outcome::Failure, e.to_string())?;
                return Err(e.to_string());
            }
        },
    }
    Ok(())
}
