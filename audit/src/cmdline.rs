//! `audit`: query, follow, verify and prove the tamper-evident audit log.
//!
//! Exit codes: 0 ok, 1 operational error, 2 usage error, 3 verification failed.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{self, time_bound, CliError};
use crate::local::AuditTarget;
use crate::{Event, EventKind, KeyId, Outcome, Query};
use clap::{Args, Parser, Subcommand};
use ops::logging::LogFormat;
use ops::metrics::MetricsListen;

#[derive(Parser)]
#[command(
    name = "audit",
    version,
    about = "Query, verify and prove the tamper-evident audit log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct LogArg {
    /// The log directory (opened directly; no daemon may hold it).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/audit"
    )]
    log: PathBuf,
    /// Ask the log daemon on this query socket instead (`audit serve`).
    #[arg(long, value_name = "SOCKET")]
    server: Option<PathBuf>,
}

impl LogArg {
    fn target(&self) -> AuditTarget {
        AuditTarget::socket_or_dir(self.server.as_deref(), &self.log)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Own the log and serve it: appends on a writer socket (0600), read-only queries,
    /// tail, proofs and the gRPC health service on a query socket (0660). Stops on SIGTERM
    /// or Ctrl-C. Settings come from flags over the configuration file over the defaults.
    Serve(ServeArgs),
    /// The configuration file of `audit serve`.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create a checkpoint signing key: DIR/signer.key (0600) and DIR/verifier.pub.
    Keygen {
        /// The key name in signatures (usually the log origin).
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Append one event (for scripts and tests; services use the library).
    Append(AppendArgs),
    /// Events matching filters, in log order.
    Query(QueryArgs),
    /// The last events; with --follow, keep printing new ones.
    Tail {
        #[command(flatten)]
        log: LogArg,
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: u64,
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Recompute the tree and check every checkpoint; names the first bad index.
    Verify {
        #[command(flatten)]
        log: LogArg,
        /// The log's verifier key file (NAME+HASH+KEY), from a trusted source.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// A checkpoint kept outside the log (repeatable): the log must agree with it.
        #[arg(long, value_name = "FILE")]
        checkpoint: Vec<PathBuf>,
    },
    /// Print the latest signed checkpoint (keep it to detect a later rewrite).
    Checkpoint {
        #[command(flatten)]
        log: LogArg,
    },
    /// An inclusion proof of one event against the latest checkpoint (JSON).
    Prove {
        #[command(flatten)]
        log: LogArg,
        #[arg(long)]
        index: u64,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Verify an inclusion proof offline with only the log's public key.
    VerifyProof {
        #[arg(long, value_name = "FILE")]
        proof: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Every event as JSON lines.
    Export {
        #[command(flatten)]
        log: LogArg,
        #[arg(long, required = true)]
        jsonl: bool,
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check the configuration file (and flags) and print the effective configuration.
    Check(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// The configuration file (TOML). Default: /etc/ipu-audit/serve.toml when it exists.
    /// A flag given here overrides the file's value.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The log directory [default: /var/lib/ipu-image-svc/audit].
    #[arg(long, value_name = "DIR")]
    log: Option<PathBuf>,
    /// The checkpoint signing key (from `audit keygen`) [required, here or in the file].
    #[arg(long, value_name = "FILE")]
    signer: Option<PathBuf>,
    /// The log's name in its checkpoints [required, here or in the file].
    #[arg(long)]
    origin: Option<String>,
    /// [default: /run/ipu-audit/writer.sock]
    #[arg(long, value_name = "SOCKET")]
    writer_socket: Option<PathBuf>,
    /// [default: /run/ipu-audit/query.sock]
    #[arg(long, value_name = "SOCKET")]
    query_socket: Option<PathBuf>,
    /// Another uid that may append (repeatable; replaces the file's `writer_uids`); root and
    /// the daemon's own uid always may. The writer socket is 0600, and the caller's uid is
    /// checked on every append too.
    #[arg(long, value_name = "UID")]
    writer_uid: Vec<u32>,
    /// Log lines as `text` (the default) or `json` (one object per line), on stderr.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics (GET /metrics) on this address (IP:PORT) or Unix socket
    /// path; off unless given.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<MetricsListen>,
}

impl ServeArgs {
    /// The effective configuration: these flags over the file over the defaults.
    fn effective(self) -> Result<crate::config::ServeConfig, ops::config::ConfigError> {
        let file = ops::config::choose(
            self.config.as_deref(),
            std::path::Path::new(crate::config::DEFAULT_CONFIG),
        );
        crate::config::effective(
            file.as_deref(),
            crate::config::ServeSettings {
                log: self.log,
                signer: self.signer,
                origin: self.origin,
                writer_socket: self.writer_socket,
                query_socket: self.query_socket,
                writer_uids: (!self.writer_uid.is_empty()).then_some(self.writer_uid),
                log_format: self.log_format,
                metrics_listen: self.metrics_listen,
            },
        )
    }
}

#[derive(Args)]
struct AppendArgs {
    /// The log directory (opened directly).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/audit"
    )]
    log: PathBuf,
    /// Append through the daemon's writer socket instead.
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["signer", "origin"])]
    server: Option<PathBuf>,
    /// The signer key file (from `audit keygen`), when opening the log directly.
    #[arg(long, value_name = "FILE", required_unless_present = "server")]
    signer: Option<PathBuf>,
    #[arg(long, required_unless_present = "server")]
    origin: Option<String>,
    #[arg(long)]
    service: String,
    #[arg(long)]
    kind: EventKind,
    #[arg(long)]
    outcome: Outcome,
    #[arg(long)]
    reason: String,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    function: Option<String>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    digest: Option<String>,
    #[arg(long = "key-id")]
    key_ids: Vec<String>,
}

#[derive(Args)]
struct QueryArgs {
    /// The log directory (opened directly; no daemon may hold it). Repeatable: the logs of
    /// several writers (one per key broker replica) merged into one query, each verified in
    /// full with its --key first, events in time order labelled with their log's origin.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/ipu-image-svc/audit"
    )]
    log: Vec<PathBuf>,
    /// Ask the log daemon on this query socket instead (`audit serve`; one log).
    #[arg(long, value_name = "SOCKET", conflicts_with = "key")]
    server: Option<PathBuf>,
    /// The verifier key of each --log, in the same order (required with several logs): each
    /// log is verified with it before anything is shown.
    #[arg(long, value_name = "FILE")]
    key: Vec<PathBuf>,
    /// RFC 3339 time, e.g. 2026-11-29T08:00:00Z.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    function: Option<String>,
    #[arg(long)]
    image_digest: Option<String>,
    #[arg(long)]
    kind: Option<EventKind>,
    #[arg(long)]
    outcome: Option<Outcome>,
    /// Continue after this index (the `next` of the previous page).
    #[arg(long)]
    after: Option<u64>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// JSON lines (one event per line) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli = match cli.command {
        Command::Serve(args) => return serve(args),
        Command::Config(ConfigCommand::Check(args)) => return config_check(args),
        _ => cli,
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("audit: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<u8, CliError> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Keygen { name, out } => println!("{}", cli::keygen(&name, &out)?),
        Command::Serve(_) | Command::Config(_) => unreachable!("handled in main"),
        Command::Append(a) => {
            let mut e = Event::new(a.service, a.kind, a.outcome, a.reason);
            e.tenant = a.tenant;
            e.function = a.function;
            if let Some(img) = a.image {
                e = e.image(img, a.digest);
            }
            for k in a.key_ids {
                e = e.key_id(KeyId::new(k)?);
            }
            let target = match a.server {
                Some(socket) => AuditTarget::Socket(socket),
                None => AuditTarget::Dir {
                    dir: a.log,
                    origin: a.origin,
                    signer: a.signer,
                },
            };
            println!("{}", cli::append(&target, e)?);
        }
        Command::Query(q) => {
            let query = Query {
                since_ns: time_bound(q.since.as_deref())?,
                until_ns: time_bound(q.until.as_deref())?,
                tenant: q.tenant,
                function: q.function,
                image_digest: q.image_digest,
                kind: q.kind,
                outcome: q.outcome,
                after: q.after,
                limit: q.limit,
            };
            if q.log.len() > 1 || !q.key.is_empty() {
                if q.server.is_some() || q.key.len() != q.log.len() {
                    eprintln!("audit: a merged query needs one --key per --log (and no --server): each log is verified with its key");
                    return Ok(2);
                }
                let logs: Vec<cli::MergedLog> = q
                    .log
                    .into_iter()
                    .zip(q.key)
                    .map(|(dir, key)| cli::MergedLog { dir, key })
                    .collect();
                return cli::merged_query(&logs, &query, q.json, &mut stdout);
            }
            let target = AuditTarget::socket_or_dir(q.server.as_deref(), &q.log[0]);
            cli::query(&target, &query, q.json, &mut stdout)?;
        }
        Command::Tail {
            log,
            lines,
            follow,
            json,
        } => cli::tail(&log.target(), lines, follow, json, &mut stdout)?,
        Command::Verify {
            log,
            key,
            checkpoint,
        } => return cli::verify(&log.target(), &key, &checkpoint, &mut stdout),
        Command::Checkpoint { log } => print!("{}", cli::checkpoint(&log.target())?),
        Command::Prove { log, index, output } => {
            drop(stdout);
            cli::prove(&log.target(), index, output.as_deref())?
        }
        Command::VerifyProof { proof, key } => return cli::verify_proof(&proof, &key, &mut stdout),
        Command::Export { log, output, .. } => {
            drop(stdout);
            cli::export(&log.target(), output.as_deref())?
        }
    }
    Ok(0)
}

/// `audit serve`: exit 2 for a configuration mistake, 1 when serving fails.
fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.effective() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("audit: {e}");
            return ExitCode::from(2);
        }
    };
    ops::logging::init(config.log_format, "AUDIT_LOG", "warn,audit=info,ops=info");
    match cli::serve(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "audit serve stopped");
            eprintln!("audit: {e}");
            ExitCode::from(1)
        }
    }
}

/// `audit config check`: the effective configuration on stdout, or the mistake (exit 2).
fn config_check(args: ServeArgs) -> ExitCode {
    match args.effective() {
        Ok(c) => {
            print!("{}", ops::config::render(&c));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("audit: {e}");
            ExitCode::from(2)
        }
    }
}

/// The `audit` command line as clap sees it: what `xtask docs` renders as man pages and
/// shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        super::command().debug_assert();
    }
}
