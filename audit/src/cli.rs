//! The operations of the `audit` command line: each reads its inputs, does its work through
//! the library and renders its output; `cmdline` only parses arguments and calls them.
//!
//! Where a command can ask the log daemon or open a log directory itself, the choice is an
//! [`AuditTarget`] (its `Socket` is the daemon socket the command needs: the writer socket
//! for `append`, the query socket otherwise).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checkpoint::NoteError;
use crate::chunk::ChunkError;
use crate::event::{format_time, EventError, TimeError};
use crate::local::AuditTarget;
use crate::proof::InclusionBundle;
use crate::{
    AuditError, AuditLog, CheckpointSigner, Event, LogOptions, NoteVerifier, Query, RemoteLog,
    RemoteQuery, Store,
};

/// Exit code of a verification that failed (an operational error is 1, usage 2).
pub const EXIT_FAILED_VERIFICATION: u8 = 3;

/// Why a command could not do its work (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path} (it must not exist): {source}")]
    CreateNew {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    #[error("signer key {path}: {source}")]
    SignerKey {
        path: PathBuf,
        #[source]
        source: NoteError,
    },
    #[error("verifier key {path}: {source}")]
    VerifierKey {
        path: PathBuf,
        #[source]
        source: NoteError,
    },
    #[error("no audit log in {0}")]
    NoLog(PathBuf),
    #[error("opening the audit log: {0}")]
    Open(#[source] AuditError),
    #[error("{path} is not an inclusion proof: {source}")]
    NotAProof {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("events from {first}: {source}")]
    Chunk {
        first: u64,
        #[source]
        source: ChunkError,
    },
    #[error("event {seq}: {source}")]
    StoredEvent {
        seq: u64,
        #[source]
        source: EventError,
    },
    #[error("the log has no checkpoint yet")]
    NoCheckpoint,
    #[error("verify reads every stored byte: run it on the log directory (with the daemon stopped, or on a copy)")]
    VerifyNeedsDirectory,
    #[error(
        "export reads the log directory; use `query --json --server` page by page against a daemon"
    )]
    ExportNeedsDirectory,
    #[error("appending to a log directory needs its signer key and origin")]
    AppendNeedsSigner,
    #[error("{0}")]
    Merge(String),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Time(#[from] TimeError),
    #[error(transparent)]
    Note(#[from] NoteError),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

fn read_text(path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens a log directory for reading (waits up to 10 s for a writer to let go).
pub fn open_read(dir: &Path) -> Result<Store, CliError> {
    if !dir.join("db").exists() {
        return Err(CliError::NoLog(dir.to_path_buf()));
    }
    Store::open(dir, Duration::from_secs(10)).map_err(CliError::Open)
}

/// The checkpoint signing key in `path` (from `audit keygen`).
pub fn read_signer(path: &Path) -> Result<CheckpointSigner, CliError> {
    let key = zeroize::Zeroizing::new(read_text(path)?);
    CheckpointSigner::parse(&key).map_err(|source| CliError::SignerKey {
        path: path.to_path_buf(),
        source,
    })
}

/// The verifier key in `path` (NAME+HASH+KEY).
pub fn read_verifier(path: &Path) -> Result<NoteVerifier, CliError> {
    NoteVerifier::parse(&read_text(path)?).map_err(|source| CliError::VerifierKey {
        path: path.to_path_buf(),
        source,
    })
}

/// `audit keygen`: writes `out/signer.key` (0600, must not exist) and `out/verifier.pub`;
/// returns the verifier key line.
pub fn keygen(name: &str, out: &Path) -> Result<String, CliError> {
    let (signer, encoded) = CheckpointSigner::generate(name)?;
    std::fs::create_dir_all(out).map_err(|source| CliError::CreateDir {
        path: out.to_path_buf(),
        source,
    })?;
    let path = out.join("signer.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| CliError::CreateNew {
            path: path.clone(),
            source,
        })?;
    f.write_all(encoded.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .map_err(|source| CliError::Write { path, source })?;
    let verifier = signer.verifier().to_string();
    let public = out.join("verifier.pub");
    std::fs::write(&public, format!("{verifier}\n")).map_err(|source| CliError::Write {
        path: public,
        source,
    })?;
    Ok(verifier)
}

/// `audit serve`: owns the log in `dir` and serves it until SIGTERM or Ctrl-C; prints
/// `serving: writer W query Q` once both sockets listen.
pub fn serve(c: &crate::config::ServeConfig) -> Result<(), CliError> {
    let signer = read_signer(&c.signer)?;
    let log = std::sync::Arc::new(AuditLog::open(
        &c.log,
        &c.origin,
        signer,
        LogOptions::default(),
    )?);
    let operations = crate::service::Operations {
        metrics_listen: c.metrics_listen.clone(),
        ..Default::default()
    };
    crate::service::serve(
        log,
        &c.writer_socket,
        &c.query_socket,
        &c.writer_uids,
        &operations,
        || {
            println!(
                "serving: writer {} query {}",
                c.writer_socket.display(),
                c.query_socket.display()
            );
            let _ = std::io::stdout().flush();
        },
    )?;
    Ok(())
}

/// `audit append`: through the daemon's writer socket, or into a log directory opened with
/// the target's signer key file and origin (both required; the key must exist) and
/// checkpointed at once. Returns the event's index.
pub fn append(target: &AuditTarget, event: Event) -> Result<u64, CliError> {
    let receipt = match target {
        AuditTarget::Socket(socket) => {
            crate::AuditSink::append(&RemoteLog::connect(socket)?, event)?
        }
        AuditTarget::Dir {
            dir,
            origin: Some(origin),
            signer: Some(signer),
        } => {
            let log = AuditLog::open(dir, origin, read_signer(signer)?, LogOptions::default())?;
            let receipt = log.append(event)?;
            log.checkpoint()?;
            receipt
        }
        AuditTarget::Dir { .. } => return Err(CliError::AppendNeedsSigner),
    };
    Ok(receipt.seq)
}

/// An optional RFC 3339 time bound of a query, in Unix nanoseconds.
pub fn time_bound(s: Option<&str>) -> Result<Option<u64>, TimeError> {
    s.map(crate::event::parse_time).transpose()
}

/// `audit query`: one page of matching events on `out`, and `more: --after N` on stderr
/// when there are more.
pub fn query(
    target: &AuditTarget,
    query: &Query,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let page = match target {
        AuditTarget::Socket(socket) => RemoteQuery::connect(socket)?.query(query)?,
        AuditTarget::Dir { dir, .. } => open_read(dir)?.query(query)?,
    };
    write_events(out, &page.events, json);
    if let Some(next) = page.next {
        eprintln!("more: --after {next}");
    }
    Ok(())
}

/// One log of a merged query: its directory and the verifier key (NAME+HASH+KEY file) its
/// checkpoints must verify with.
#[derive(Clone, Debug)]
pub struct MergedLog {
    pub dir: PathBuf,
    pub key: PathBuf,
}

/// An event and the origin of the log it came from.
#[derive(Clone, Debug)]
pub struct Labeled {
    pub origin: String,
    pub event: Event,
}

/// What a merged query found: the events of every log matching the filters, in time order
/// (each log's own order kept), and what to tell the reader.
#[derive(Debug)]
pub struct Merged {
    pub events: Vec<Labeled>,
    /// Per log (origin): events not yet covered by a signed checkpoint.
    pub unsigned: Vec<(String, u64)>,
}

/// The events of several logs (say, one per key broker replica) matching `query`, merged:
/// each log is first verified in full with its key (as `audit verify` does: every event's
/// leaf, the tree, every checkpoint's signature, origin and root, no fork); a log that fails
/// stops the query (`Ok(Err(..))`, nothing of any log is returned). The logs must have
/// distinct origins (each event is labelled with its log's). Events are ordered by their
/// recorded time (each writer's clock), ties by origin, then by index; each log's own order
/// is kept (its times never decrease, which verification checked). `query.after` is
/// per-log and refused here; `query.limit` is ignored (the caller pages the result).
pub fn merged(logs: &[MergedLog], query: &Query) -> Result<Result<Merged, String>, CliError> {
    if query.after.is_some() {
        return Err(CliError::Merge(
            "--after is an index of one log: page a merged query with --since/--until".into(),
        ));
    }
    let mut events: Vec<Labeled> = Vec::new();
    let mut unsigned = Vec::new();
    let mut origins: Vec<(String, &Path)> = Vec::new();
    for log in logs {
        let store = open_read(&log.dir)?;
        let verifier = read_verifier(&log.key)?;
        let origin = store.origin()?.ok_or_else(|| {
            CliError::Merge(format!(
                "{}: the log names no origin (nothing was ever written to it)",
                log.dir.display()
            ))
        })?;
        if let Some((_, other)) = origins.iter().find(|(o, _)| *o == origin) {
            return Err(CliError::Merge(format!(
                "{} and {} both name themselves {origin:?}: their events could not be told apart (give each broker replica its own audit_origin)",
                other.display(),
                log.dir.display()
            )));
        }
        let report = match crate::verify::verify(&store, &verifier, &[])? {
            Ok(r) => r,
            Err(failure) => {
                return Ok(Err(format!(
                    "{} ({origin}): FAILED at index {}: {failure}",
                    log.dir.display(),
                    failure.index()
                )))
            }
        };
        let covered = report.latest.as_ref().map_or(0, |c| c.size);
        if report.events > covered {
            unsigned.push((origin.clone(), report.events - covered));
        }
        let mut page_query = Query {
            limit: 10_000,
            ..query.clone()
        };
        loop {
            let page = store.query(&page_query)?;
            events.extend(page.events.into_iter().map(|event| Labeled {
                origin: origin.clone(),
                event,
            }));
            match page.next {
                Some(next) => page_query.after = Some(next),
                None => break,
            }
        }
        origins.push((origin, &log.dir));
    }
    events.sort_by(|a, b| {
        (a.event.time_ns, &a.origin, a.event.seq).cmp(&(b.event.time_ns, &b.origin, b.event.seq))
    });
    Ok(Ok(Merged { events, unsigned }))
}

/// `audit query` over several logs ([`merged`]): at most `limit` events on `out`, each
/// labelled with its log's origin (a column, or `{"origin": ..., "event": ...}` with
/// `json`); how many more there are, and events not yet under a signed checkpoint, on
/// stderr. Exit 3 (and no event) when a log fails verification.
pub fn merged_query(
    logs: &[MergedLog],
    query: &Query,
    json: bool,
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    let merged = match merged(logs, query)? {
        Ok(m) => m,
        Err(failure) => {
            eprintln!("audit: {failure}");
            return Ok(EXIT_FAILED_VERIFICATION);
        }
    };
    for (origin, n) in &merged.unsigned {
        eprintln!("note: {origin}: the last {n} events are not yet covered by a signed checkpoint");
    }
    let limit = query.limit.max(1);
    for e in merged.events.iter().take(limit) {
        let _ = writeln!(out, "{}", labeled_line(e, json));
    }
    if merged.events.len() > limit {
        eprintln!(
            "more: {} further events (raise --limit, or narrow with --since/--until)",
            merged.events.len() - limit
        );
    }
    Ok(0)
}

/// One labelled event as a table row (the origin first), or as
/// `{"origin": ORIGIN, "event": CANONICAL-EVENT}`.
pub fn labeled_line(e: &Labeled, json: bool) -> String {
    if json {
        format!(
            "{{\"origin\":{},\"event\":{}}}",
            serde_json::to_string(&e.origin).expect("a string serializes"),
            String::from_utf8_lossy(&e.event.to_canonical())
        )
    } else {
        format!("{:<24} {}", e.origin, event_line(&e.event, false))
    }
}

/// `audit tail`: the last `lines` events; with `follow`, new ones as they come (forever).
pub fn tail(
    target: &AuditTarget,
    lines: u64,
    follow: bool,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let dir = match target {
        AuditTarget::Socket(socket) => {
            let mut client = RemoteQuery::connect(socket)?;
            let size = client
                .latest_checkpoint()
                .ok()
                .and_then(|note| checkpoint_size(&note))
                .unwrap_or(0);
            let from = size.saturating_sub(lines);
            client.tail(from, |e| {
                write_events(out, std::slice::from_ref(&e), json);
                follow || e.seq + 1 < size
            })?;
            return Ok(());
        }
        AuditTarget::Dir { dir, .. } => dir,
    };
    let mut from = {
        let store = open_read(dir)?;
        let size = store.size()?;
        let from = size.saturating_sub(lines);
        write_range(out, &store, from, size, json)?;
        size
    };
    if follow {
        loop {
            // Reopen on each poll so a writer process is never locked out for long.
            std::thread::sleep(Duration::from_millis(500));
            let store = open_read(dir)?;
            let size = store.size()?;
            write_range(out, &store, from, size, json)?;
            from = size;
        }
    }
    Ok(())
}

/// The tree size of a checkpoint note (its second line).
fn checkpoint_size(note: &str) -> Option<u64> {
    note.lines().nth(1).and_then(|l| l.parse::<u64>().ok())
}

/// `audit verify` of the log in `dir` with the verifier key file `key` and checkpoints kept
/// elsewhere: prints `ok: ...` (exit 0) or `FAILED at index N: ...` (exit 3).
pub fn verify(
    target: &AuditTarget,
    key: &Path,
    checkpoints: &[PathBuf],
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    let AuditTarget::Dir { dir, .. } = target else {
        return Err(CliError::VerifyNeedsDirectory);
    };
    let verifier = read_verifier(key)?;
    let store = open_read(dir)?;
    let trusted = checkpoints
        .iter()
        .map(|p| read_text(p))
        .collect::<Result<Vec<_>, _>>()?;
    let written = match crate::verify::verify(&store, &verifier, &trusted)? {
        Ok(report) => {
            return writeln!(
                out,
                "ok: {} events, {} checkpoints; latest checkpoint size {}",
                report.events,
                report.checkpoints,
                report.latest.map_or(0, |c| c.size)
            )
            .map(|_| 0)
            .map_err(CliError::Output)
        }
        Err(failure) => writeln!(out, "FAILED at index {}: {failure}", failure.index()),
    };
    written.map_err(CliError::Output)?;
    Ok(EXIT_FAILED_VERIFICATION)
}

/// `audit checkpoint`: the latest signed checkpoint note.
pub fn checkpoint(target: &AuditTarget) -> Result<String, CliError> {
    let note = match target {
        AuditTarget::Socket(socket) => Some(RemoteQuery::connect(socket)?.latest_checkpoint()?),
        AuditTarget::Dir { dir, .. } => open_read(dir)?.latest_checkpoint()?,
    };
    note.ok_or(CliError::NoCheckpoint)
}

/// `audit prove`: the inclusion proof of event `index` as pretty JSON, into `output` or on
/// stdout.
pub fn prove(target: &AuditTarget, index: u64, output: Option<&Path>) -> Result<(), CliError> {
    let bundle = match target {
        AuditTarget::Socket(socket) => RemoteQuery::connect(socket)?.inclusion_proof(index)?,
        AuditTarget::Dir { dir, .. } => InclusionBundle::build(&open_read(dir)?, index)?,
    };
    let json = serde_json::to_string_pretty(&bundle).expect("proofs serialize");
    match output {
        Some(p) => std::fs::write(p, json + "\n").map_err(|source| CliError::Write {
            path: p.to_path_buf(),
            source,
        })?,
        None => println!("{json}"),
    }
    Ok(())
}

/// `audit verify-proof`: checks the proof in `proof` with the verifier key file `key`;
/// prints `ok: ...` (exit 0) or `FAILED: ...` (exit 3).
pub fn verify_proof(proof: &Path, key: &Path, out: &mut dyn Write) -> Result<u8, CliError> {
    let verifier = read_verifier(key)?;
    let bytes = std::fs::read(proof).map_err(|source| CliError::Read {
        path: proof.to_path_buf(),
        source,
    })?;
    let bundle: InclusionBundle =
        serde_json::from_slice(&bytes).map_err(|source| CliError::NotAProof {
            path: proof.to_path_buf(),
            source,
        })?;
    let (line, code) = match bundle.verify(&verifier) {
        Ok(event) => (
            format!(
                "ok: event {} ({} {} at {}) is in the log of size {}",
                event.seq,
                event.kind,
                event.outcome.as_str(),
                format_time(event.time_ns),
                bundle.tree_size
            ),
            0,
        ),
        Err(e) => (format!("FAILED: {e}"), EXIT_FAILED_VERIFICATION),
    };
    writeln!(out, "{line}").map_err(CliError::Output)?;
    Ok(code)
}

/// `audit export --jsonl`: every event of the log directory as one JSON line, into
/// `output` or on stdout.
pub fn export(target: &AuditTarget, output: Option<&Path>) -> Result<(), CliError> {
    let AuditTarget::Dir { dir, .. } = target else {
        return Err(CliError::ExportNeedsDirectory);
    };
    let store = open_read(dir)?;
    let mut out: Box<dyn Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(
            |source| CliError::Write {
                path: p.to_path_buf(),
                source,
            },
        )?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    for r in store.chunks() {
        let (first, bytes) = r?;
        let chunk =
            crate::chunk::decode(&bytes).map_err(|source| CliError::Chunk { first, source })?;
        for event in chunk.events {
            out.write_all(event)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(CliError::Output)?;
        }
    }
    out.flush().map_err(CliError::Output)
}

fn write_range(
    out: &mut dyn Write,
    store: &Store,
    from: u64,
    to: u64,
    json: bool,
) -> Result<(), CliError> {
    let mut events = Vec::new();
    for (seq, bytes) in store.events_range(from, to)? {
        events.push(
            Event::from_canonical(&bytes)
                .map_err(|source| CliError::StoredEvent { seq, source })?,
        );
    }
    write_events(out, &events, json);
    Ok(())
}

/// One event as a table row, or as its canonical JSON with `json`.
pub fn event_line(e: &Event, json: bool) -> String {
    if json {
        String::from_utf8_lossy(&e.to_canonical()).into_owned()
    } else {
        format!(
            "{:>8}  {}  {:<18} {:<8} {:<14} {:<10} {:<16} {}",
            e.seq,
            format_time(e.time_ns),
            e.kind.to_string(),
            e.outcome.as_str(),
            e.service,
            e.tenant.as_deref().unwrap_or("-"),
            e.function.as_deref().unwrap_or("-"),
            e.reason
        )
    }
}

/// Writes events one line each; a closed output is not an error (as for `head`).
fn write_events(out: &mut dyn Write, events: &[Event], json: bool) {
    for e in events {
        let _ = writeln!(out, "{}", event_line(e, json));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventKind, Outcome};

    fn event() -> Event {
        let mut e = Event::new("svc", EventKind::KeyRelease, Outcome::Allowed, "ok").tenant("t");
        e.seq = 7;
        e.time_ns = 1_000_000_000;
        e
    }

    #[test]
    fn event_lines_are_a_table_row_or_canonical_json() {
        let e = event();
        assert_eq!(
            event_line(&e, false),
            format!(
                "{:>8}  {}  {:<18} {:<8} {:<14} {:<10} {:<16} {}",
                7,
                "1970-01-01T00:00:01.000000000Z",
                "key.release",
                "allowed",
                "svc",
                "t",
                "-",
                "ok"
            )
        );
        assert_eq!(event_line(&e, true).as_bytes(), e.to_canonical().as_slice());
    }

    #[test]
    fn checkpoint_size_is_the_second_line() {
        assert_eq!(checkpoint_size("origin\n42\nroot\n"), Some(42));
        assert_eq!(checkpoint_size("origin\n"), None);
    }

    #[test]
    fn daemon_only_commands_refuse_a_socket_and_missing_logs_are_named() {
        let socket = AuditTarget::Socket("/nonexistent/q.sock".into());
        let mut out = Vec::new();
        assert!(matches!(
            verify(&socket, Path::new("k"), &[], &mut out),
            Err(CliError::VerifyNeedsDirectory)
        ));
        assert!(matches!(
            export(&socket, None),
            Err(CliError::ExportNeedsDirectory)
        ));
        let dir = tempfile::tempdir().unwrap();
        let e = open_read(dir.path()).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("no audit log in {}", dir.path().display())
        );
    }

    #[test]
    fn keygen_writes_both_files_and_never_overwrites_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let verifier = keygen("log.example/test", dir.path()).unwrap();
        read_signer(&dir.path().join("signer.key")).unwrap();
        let public = read_verifier(&dir.path().join("verifier.pub")).unwrap();
        assert_eq!(public.to_string(), verifier);
        assert!(matches!(
            keygen("log.example/test", dir.path()),
            Err(CliError::CreateNew { .. })
        ));
    }

    #[test]
    fn a_proof_that_is_not_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        keygen("log.example/test", dir.path()).unwrap();
        let proof = dir.path().join("proof.json");
        std::fs::write(&proof, "{").unwrap();
        let e = verify_proof(&proof, &dir.path().join("verifier.pub"), &mut Vec::new())
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with(&format!("{} is not an inclusion proof: ", proof.display())),
            "{e}"
        );
    }
}
