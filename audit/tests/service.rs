//! The log daemon (`audit serve`): many writer processes and threads append through its
//! writer socket at once; auditors query, follow and get proofs through the read-only
//! socket, which cannot append; after SIGTERM the log verifies offline with every event.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit::store::Query;
use audit::{
    AuditSink, CheckpointSigner, Event, EventKind, NoteVerifier, Outcome, RemoteLog, RemoteQuery,
    Store,
};

const ORIGIN: &str = "ipu.test/daemon";

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    verifier: NoteVerifier,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (signer, key) = CheckpointSigner::generate(ORIGIN).unwrap();
        std::fs::write(dir.path().join("signer.key"), key.as_bytes()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_audit"))
            .arg("serve")
            .arg("--log")
            .arg(dir.path().join("log"))
            .arg("--signer")
            .arg(dir.path().join("signer.key"))
            .args(["--origin", ORIGIN])
            .arg("--writer-socket")
            .arg(dir.path().join("run/writer.sock"))
            .arg("--query-socket")
            .arg(dir.path().join("run/query.sock"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("serving"), "{line}");
        Self {
            child,
            dir,
            verifier: signer.verifier().clone(),
        }
    }

    fn writer(&self) -> PathBuf {
        self.dir.path().join("run/writer.sock")
    }

    fn query(&self) -> PathBuf {
        self.dir.path().join("run/query.sock")
    }

    fn stop(mut self) -> (tempfile::TempDir, NoteVerifier) {
        // SAFETY: kill(2) on our child's pid with SIGTERM.
        unsafe { kill(self.child.id() as i32, 15) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}");
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.verifier.clone())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn processes_and_threads_append_through_the_daemon_and_auditors_read() {
    let daemon = Daemon::start();
    assert_eq!(mode(&daemon.writer()), 0o600);
    assert_eq!(mode(&daemon.query()), 0o660);

    // A follower started before the writers sees every event, in order.
    let query_socket = daemon.query();
    let follower = std::thread::spawn(move || {
        let mut q = RemoteQuery::connect(&query_socket).unwrap();
        let mut seen = Vec::new();
        q.tail(0, |e| {
            seen.push(e.seq);
            seen.len() < 60
        })
        .unwrap();
        seen
    });

    // 4 processes x 5 events through the CLI, and 4 threads x 10 events through the library.
    let writer = daemon.writer();
    let procs: Vec<_> = (0..4)
        .map(|p| {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for i in 0..5 {
                    let out = Command::new(env!("CARGO_BIN_EXE_audit"))
                        .arg("append")
                        .arg("--server")
                        .arg(&writer)
                        .args(["--service", "proc", "--kind", "admin.test"])
                        .args(["--outcome", "success", "--tenant", "acme"])
                        .args(["--reason", &format!("process {p} event {i}")])
                        .output()
                        .unwrap();
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            })
        })
        .collect();
    let sink = Arc::new(RemoteLog::connect(&writer).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let sink = sink.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| {
                        sink.append(
                            Event::new(
                                "thread",
                                EventKind::KeyDeny,
                                Outcome::Denied,
                                format!("thread {t} event {i}"),
                            )
                            .function(format!("fn-{t}")),
                        )
                        .unwrap()
                        .seq
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for p in procs {
        p.join().unwrap();
    }
    let seqs: HashSet<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(seqs.len(), 40);
    assert_eq!(follower.join().unwrap(), (0..60).collect::<Vec<_>>());

    // An invalid event is refused with the reason.
    let err = sink
        .append(Event::new("thread", EventKind::Error, Outcome::Failure, "r").tenant("a\0b"))
        .unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");

    // Auditors query through the read-only socket.
    let mut q = RemoteQuery::connect(&daemon.query()).unwrap();
    let page = q
        .query(&Query {
            function: Some("fn-2".into()),
            limit: 100,
            ..Query::default()
        })
        .unwrap();
    assert_eq!(page.events.len(), 10);
    let page = q
        .query(&Query {
            tenant: Some("acme".into()),
            limit: 100,
            ..Query::default()
        })
        .unwrap();
    assert_eq!(page.events.len(), 20);
    let bundle = q.inclusion_proof(17).unwrap();
    assert_eq!(bundle.verify(&daemon.verifier).unwrap().seq, 17);
    let kept = q.latest_checkpoint().unwrap();

    // The query socket has no append: a writer client there gets Unimplemented.
    let err = RemoteLog::connect(&daemon.query())
        .unwrap()
        .append(Event::new("x", EventKind::Error, Outcome::Failure, "r"))
        .unwrap_err();
    assert!(err.to_string().contains("not implemented"), "{err}");

    // Stopped, the log verifies offline against the checkpoint an auditor kept.
    drop((q, sink));
    let (dir, verifier) = daemon.stop();
    let start = Instant::now();
    let store = loop {
        match Store::open(&dir.path().join("log"), Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let report = audit::verify::verify(&store, &verifier, &[kept])
        .unwrap()
        .unwrap();
    assert_eq!(report.events, 60);
}

/// `audit append` through the daemon as `uid`; returns whether it succeeded.
fn append_as(writer: &Path, uid: Option<u32>, reason: &str) -> bool {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_audit"));
    c.arg("append")
        .arg("--server")
        .arg(writer)
        .args(["--service", "intruder", "--kind", "admin.test"])
        .args(["--outcome", "success", "--reason", reason]);
    if let Some(uid) = uid {
        c.uid(uid).gid(uid);
    }
    c.output().unwrap().status.success()
}

/// The writer socket is 0600, but its mode is not the only barrier: with the socket (and
/// the way to it) opened to everyone, a process of another uid still cannot append, while
/// root (the control) can, and only the control's event is in the log.
#[test]
fn a_writer_of_another_uid_is_refused_even_when_the_socket_is_open() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: running a client as another uid needs root");
        return;
    }
    let daemon = Daemon::start();
    for p in [daemon.dir.path(), &daemon.dir.path().join("run")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(daemon.writer(), std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(!append_as(&daemon.writer(), Some(65534), "from nobody"));
    assert!(append_as(&daemon.writer(), None, "from root"));
    let (dir, _) = daemon.stop();
    let store = Store::open(&dir.path().join("log"), Duration::from_secs(5)).unwrap();
    let reasons: Vec<String> = store
        .query(&Query {
            limit: 100,
            ..Query::default()
        })
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(reasons, ["from root"], "{reasons:?}");
}
