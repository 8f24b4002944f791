//! `audit`: query, follow, verify and prove the tamper-evident audit log.
//!
//! Exit codes: 0 ok, 1 operational error, 2 usage error, 3 verification failed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use audit::event::{format_time, parse_time};
use audit::proof::InclusionBundle;
use audit::{
    AuditLog, CheckpointSigner, Event, EventKind, KeyId, LogOptions, NoteVerifier, Outcome, Query,
    Store,
};
use clap::{Args, Parser, Subcommand};

const EXIT_FAILED_VERIFICATION: u8 = 3;

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

#[derive(Subcommand)]
enum Command {
    /// Own the log and serve it: appends on a writer socket (0600), read-only queries,
    /// tail and proofs on a query socket (0660). Stops on SIGTERM or Ctrl-C.
    Serve {
        #[arg(
            long,
            value_name = "DIR",
            default_value = "/var/lib/ipu-image-svc/audit"
        )]
        log: PathBuf,
        /// The checkpoint signing key (from `audit keygen`).
        #[arg(long, value_name = "FILE")]
        signer: PathBuf,
        #[arg(long)]
        origin: String,
        #[arg(
            long,
            value_name = "SOCKET",
            default_value = "/run/ipu-audit/writer.sock"
        )]
        writer_socket: PathBuf,
        #[arg(
            long,
            value_name = "SOCKET",
            default_value = "/run/ipu-audit/query.sock"
        )]
        query_socket: PathBuf,
    },
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
    #[command(flatten)]
    log: LogArg,
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("audit: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn open_read(log: &LogArg) -> Result<Store> {
    if !log.log.join("db").exists() {
        bail!("no audit log in {}", log.log.display());
    }
    Store::open(&log.log, Duration::from_secs(10)).context("opening the audit log")
}

fn read_signer(path: &Path) -> Result<CheckpointSigner> {
    let key = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    CheckpointSigner::parse(&key).with_context(|| format!("signer key {}", path.display()))
}

fn read_verifier(path: &Path) -> Result<NoteVerifier> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    NoteVerifier::parse(&text).with_context(|| format!("verifier key {}", path.display()))
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Keygen { name, out } => {
            let (signer, encoded) = CheckpointSigner::generate(&name)?;
            std::fs::create_dir_all(&out)?;
            let path = out.join("signer.key");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
            f.write_all(encoded.as_bytes())?;
            f.write_all(b"\n")?;
            std::fs::write(out.join("verifier.pub"), format!("{}\n", signer.verifier()))?;
            println!("{}", signer.verifier());
        }
        Command::Serve {
            log,
            signer,
            origin,
            writer_socket,
            query_socket,
        } => {
            let signer = read_signer(&signer)?;
            let log = std::sync::Arc::new(AuditLog::open(
                &log,
                &origin,
                signer,
                LogOptions::default(),
            )?);
            audit::service::serve(log, &writer_socket, &query_socket, || {
                println!(
                    "serving: writer {} query {}",
                    writer_socket.display(),
                    query_socket.display()
                );
                let _ = std::io::stdout().flush();
            })?;
        }
        Command::Append(a) => {
            let mut e = Event::new(a.service, a.kind, a.outcome, a.reason);
            e.tenant = a.tenant;
            e.function = a.function;
            if let Some(img) = a.image {
                e = e.image(img, a.digest);
            }
            for k in a.key_ids {
                e = e.key_id(KeyId::new(k).map_err(anyhow::Error::msg)?);
            }
            let receipt = match &a.server {
                Some(socket) => audit::AuditSink::append(&audit::RemoteLog::connect(socket)?, e)?,
                None => {
                    let signer = read_signer(a.signer.as_deref().expect("required by clap"))?;
                    let origin = a.origin.as_deref().expect("required by clap");
                    let log = AuditLog::open(&a.log, origin, signer, LogOptions::default())?;
                    let receipt = log.append(e)?;
                    log.checkpoint()?;
                    receipt
                }
            };
            println!("{}", receipt.seq);
        }
        Command::Query(q) => {
            let query = Query {
                since_ns: q
                    .since
                    .as_deref()
                    .map(parse_time)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                until_ns: q
                    .until
                    .as_deref()
                    .map(parse_time)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
                tenant: q.tenant,
                function: q.function,
                image_digest: q.image_digest,
                kind: q.kind,
                outcome: q.outcome,
                after: q.after,
                limit: q.limit,
            };
            let page = match &q.log.server {
                Some(socket) => audit::RemoteQuery::connect(socket)?.query(&query)?,
                None => open_read(&q.log)?.query(&query)?,
            };
            print_events(&page.events, q.json);
            if let Some(next) = page.next {
                eprintln!("more: --after {next}");
            }
        }
        Command::Tail {
            log,
            lines,
            follow,
            json,
        } => {
            if let Some(socket) = &log.server {
                let mut client = audit::RemoteQuery::connect(socket)?;
                let size = client
                    .latest_checkpoint()
                    .ok()
                    .and_then(|note| note.lines().nth(1).and_then(|l| l.parse::<u64>().ok()))
                    .unwrap_or(0);
                let from = size.saturating_sub(lines);
                client.tail(from, |e| {
                    print_events(std::slice::from_ref(&e), json);
                    follow || e.seq + 1 < size
                })?;
                return Ok(0);
            }
            let mut from = {
                let store = open_read(&log)?;
                let size = store.size()?;
                let from = size.saturating_sub(lines);
                print_range(&store, from, size, json)?;
                size
            };
            if follow {
                loop {
                    // Reopen on each poll so a writer process is never locked out for long.
                    std::thread::sleep(Duration::from_millis(500));
                    let store = open_read(&log)?;
                    let size = store.size()?;
                    print_range(&store, from, size, json)?;
                    from = size;
                }
            }
        }
        Command::Verify {
            log,
            key,
            checkpoint,
        } => {
            if log.server.is_some() {
                bail!("verify reads every stored byte: run it on the log directory (with the daemon stopped, or on a copy)");
            }
            let verifier = read_verifier(&key)?;
            let store = open_read(&log)?;
            let trusted = checkpoint
                .iter()
                .map(|p| {
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            match audit::verify::verify(&store, &verifier, &trusted)? {
                Ok(report) => {
                    println!(
                        "ok: {} events, {} checkpoints; latest checkpoint size {}",
                        report.events,
                        report.checkpoints,
                        report.latest.map_or(0, |c| c.size)
                    );
                }
                Err(failure) => {
                    println!("FAILED at index {}: {failure}", failure.index());
                    return Ok(EXIT_FAILED_VERIFICATION);
                }
            }
        }
        Command::Checkpoint { log } => {
            let note = match &log.server {
                Some(socket) => Some(audit::RemoteQuery::connect(socket)?.latest_checkpoint()?),
                None => open_read(&log)?.latest_checkpoint()?,
            };
            match note {
                Some(note) => print!("{note}"),
                None => bail!("the log has no checkpoint yet"),
            }
        }
        Command::Prove { log, index, output } => {
            let bundle = match &log.server {
                Some(socket) => audit::RemoteQuery::connect(socket)?.inclusion_proof(index)?,
                None => InclusionBundle::build(&open_read(&log)?, index)?,
            };
            let json = serde_json::to_string_pretty(&bundle)?;
            match output {
                Some(p) => std::fs::write(&p, json + "\n")?,
                None => println!("{json}"),
            }
        }
        Command::VerifyProof { proof, key } => {
            let verifier = read_verifier(&key)?;
            let bundle: InclusionBundle = serde_json::from_slice(
                &std::fs::read(&proof).with_context(|| format!("reading {}", proof.display()))?,
            )
            .with_context(|| format!("{} is not an inclusion proof", proof.display()))?;
            match bundle.verify(&verifier) {
                Ok(event) => {
                    println!(
                        "ok: event {} ({} {} at {}) is in the log of size {}",
                        event.seq,
                        event.kind,
                        event.outcome.as_str(),
                        format_time(event.time_ns),
                        bundle.tree_size
                    );
                }
                Err(e) => {
                    println!("FAILED: {e}");
                    return Ok(EXIT_FAILED_VERIFICATION);
                }
            }
        }
        Command::Export { log, output, .. } => {
            if log.server.is_some() {
                bail!("export reads the log directory; use `query --json --server` page by page against a daemon");
            }
            let store = open_read(&log)?;
            let mut out: Box<dyn Write> = match output {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(&p)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            for r in store.chunks() {
                let (first, bytes) = r?;
                let chunk = audit::chunk::decode(&bytes)
                    .map_err(|e| anyhow::anyhow!("events from {first}: {e}"))?;
                for event in chunk.events {
                    out.write_all(event)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
        }
    }
    Ok(0)
}

fn print_range(store: &Store, from: u64, to: u64, json: bool) -> Result<()> {
    let mut events = Vec::new();
    for (seq, bytes) in store.events_range(from, to)? {
        events
            .push(Event::from_canonical(&bytes).map_err(|e| anyhow::anyhow!("event {seq}: {e}"))?);
    }
    print_events(&events, json);
    Ok(())
}

fn print_events(events: &[Event], json: bool) {
    let mut out = std::io::stdout().lock();
    for e in events {
        if json {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(&e.to_canonical()));
        } else {
            let _ = writeln!(
                out,
                "{:>8}  {}  {:<18} {:<8} {:<14} {:<10} {:<16} {}",
                e.seq,
                format_time(e.time_ns),
                e.kind.to_string(),
                e.outcome.as_str(),
                e.service,
                e.tenant.as_deref().unwrap_or("-"),
                e.function.as_deref().unwrap_or("-"),
                e.reason
            );
        }
    }
}
