//! Exporting a clone to the host (a software stand-in for the IPU's virtio-blk or NVMe
//! function): NBD over a per-function Unix socket that only the host agent's uid may use, or
//! over TCP with mutual TLS (NBD STARTTLS, forced) for a host agent on another machine, whose
//! certificate must carry the host identity the export was prepared for.
//!
//! Connections cost bounded resources whatever clients do ([`pool`]): an accepted connection
//! is sent the NBD greeting and then waits, without a thread, until the client answers; only
//! then does one of a fixed number of worker threads serve it. The handshake (TLS included)
//! must end within [`HANDSHAKE_DEADLINE`] of the accept; each export serves at most
//! [`MAX_CONNECTIONS_PER_EXPORT`] connections at once, and one still in its handshake is
//! dropped, oldest first, to make room for a new one (so clients that never finish cannot
//! keep the host agent out).
//!
//! [`HostExport::revoke`] is the hot-remove: the export refuses new connections, shuts down
//! the open ones (in-flight requests fail), and removes its socket or closes its port.

pub mod identity;
pub mod nbd;
pub mod pool;
pub mod tls;
pub mod vhost;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nbd::{Export, TlsAccess};

/// From the accept to the end of the handshake (TLS and option haggling): a client that is
/// not in transmission by then is disconnected.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections one export serves at once (handshaking or in transmission). The host agent
/// needs one or two (qemu-storage-daemon, nbdinfo).
pub const MAX_CONNECTIONS_PER_EXPORT: usize = 8;
/// After the handshake, a reply the client does not read for this long ends the connection
/// (idling between requests is fine: reads have no timeout then).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How clones are exported to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExportKind {
    /// NBD on a per-function Unix socket (or over TCP with TLS).
    #[default]
    Nbd,
    /// A vhost-user-blk device on a per-function Unix socket, for a microVM's
    /// `vhost-user-blk-pci` ([`vhost`]).
    VhostUserBlk,
}

impl ExportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExportKind::Nbd => "nbd",
            ExportKind::VhostUserBlk => "vhost-user-blk",
        }
    }
}

impl std::fmt::Display for ExportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ExportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nbd" => Ok(ExportKind::Nbd),
            "vhost-user-blk" => Ok(ExportKind::VhostUserBlk),
            other => Err(format!(
                "export kind {other:?}: \"nbd\" or \"vhost-user-blk\""
            )),
        }
    }
}

/// Where an export listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// A vhost-user-blk device's socket (QEMU: `-chardev socket,path=...`).
    VhostUser(PathBuf),
}

impl Endpoint {
    /// The NBD URI of export `name` here (libnbd's syntax). Over TCP the client needs its
    /// certificates too (`?tls-certificates=DIR`).
    pub fn nbd_uri(&self, name: &str) -> String {
        match self {
            Endpoint::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Endpoint::Tcp(a) => format!("nbds://{a}/{name}"),
            // Not NBD: the socket, as a front-end is given it.
            Endpoint::VhostUser(p) => format!("vhost-user-blk:{}", p.display()),
        }
    }

    /// The Unix socket of an NBD or vhost-user-blk export.
    pub fn unix_socket(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(p) | Endpoint::VhostUser(p) => Some(p),
            Endpoint::Tcp(_) => None,
        }
    }

    pub fn kind(&self) -> ExportKind {
        match self {
            Endpoint::Unix(_) | Endpoint::Tcp(_) => ExportKind::Nbd,
            Endpoint::VhostUser(_) => ExportKind::VhostUserBlk,
        }
    }
}

/// A connected socket of either kind.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A connection served by a worker: until its handshake is over, every read and write must
/// finish before its deadline (socket timeouts set to the time left before each).
pub(crate) struct Timed {
    stream: Stream,
    deadline: Option<Instant>,
    handshaking: Arc<AtomicBool>,
}

impl Timed {
    fn arm(&mut self) -> io::Result<()> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the NBD handshake deadline passed",
                ));
            }
            self.stream.set_timeouts(Some(left), Some(left))?;
        }
        Ok(())
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.stream.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl nbd::Connection for Timed {
    fn handshake_over(&mut self) {
        self.deadline = None;
        self.handshaking.store(false, Ordering::SeqCst);
        let _ = self.stream.set_timeouts(None, Some(WRITE_TIMEOUT));
    }
}

/// Called with a TLS client refused because its certificate does not carry the export's host
/// identity, and how many were refused so far (the service audits it): for each of the first
/// [`REPORTED_REFUSALS`] of an export, then every [`REPORTED_REFUSALS_EVERY`]th, so that a host
/// with a valid certificate cannot flood the audit log through someone else's export.
pub type OnRefused = Box<dyn Fn(&nbd::Refused, u64) + Send + Sync>;

/// Refusals of one export reported one by one.
pub const REPORTED_REFUSALS: u64 = 32;
/// Past those, one refusal in this many is reported (with the count).
pub const REPORTED_REFUSALS_EVERY: u64 = 1000;

/// A connection an export serves.
struct Active {
    /// A clone of its socket, to shut it down (revocation, or room for a newer one).
    socket: Stream,
    accepted: Instant,
    handshaking: Arc<AtomicBool>,
}

/// What the acceptor, the pool's workers and the [`HostExport`] share about one export.
pub(crate) struct Shared {
    export: Arc<Export>,
    tls: Option<TlsAccess>,
    on_refused: Option<OnRefused>,
    active: Mutex<HashMap<u64, Active>>,
    next_id: AtomicU64,
    refused: AtomicU64,
}

impl Shared {
    fn name(&self) -> &str {
        &self.export.name
    }

    fn is_revoked(&self) -> bool {
        self.export.is_revoked()
    }

    /// Takes one of the export's connection slots for `stream` (accepted at `accepted`),
    /// dropping the oldest connection still in its handshake when all are taken; None when
    /// all are in transmission (the new one is refused).
    fn admit(&self, stream: &Stream, accepted: Instant) -> Option<(u64, Arc<AtomicBool>)> {
        let socket = stream.try_clone().ok()?;
        let mut active = self.active.lock().expect("not poisoned");
        if self.is_revoked() {
            return None;
        }
        if active.len() >= MAX_CONNECTIONS_PER_EXPORT {
            let oldest = active
                .iter()
                .filter(|(_, a)| a.handshaking.load(Ordering::SeqCst))
                .min_by_key(|(_, a)| a.accepted)
                .map(|(id, _)| *id)?;
            let dropped = active.remove(&oldest).expect("just found");
            tracing::warn!(export = %self.name(), "NBD connection still in its handshake dropped to make room for a new one");
            dropped.socket.shutdown();
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let handshaking = Arc::new(AtomicBool::new(true));
        active.insert(
            id,
            Active {
                socket,
                accepted,
                handshaking: handshaking.clone(),
            },
        );
        Some((id, handshaking))
    }

    /// Serves a connection that answered the greeting, on a pool worker.
    fn serve(&self, stream: Stream, accepted: Instant) {
        let Some((id, handshaking)) = self.admit(&stream, accepted) else {
            tracing::warn!(export = %self.name(), "NBD connection refused: {MAX_CONNECTIONS_PER_EXPORT} connections in transmission already");
            stream.shutdown();
            return;
        };
        let mut timed = Timed {
            stream,
            deadline: Some(accepted + HANDSHAKE_DEADLINE),
            handshaking,
        };
        match nbd::serve_greeted(&mut timed, &self.export, self.tls.as_ref()) {
            Ok(_) => {}
            Err(e) => {
                if let Some(refused) = e.get_ref().and_then(|r| r.downcast_ref::<nbd::Refused>()) {
                    let n = self.refused.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::warn!(export = %self.name(), presented = ?refused.presented, refusals = n, "NBD client refused: its certificate does not carry the export's host identity");
                    if let Some(on_refused) = &self.on_refused {
                        if n <= REPORTED_REFUSALS || n % REPORTED_REFUSALS_EVERY == 0 {
                            on_refused(refused, n);
                        }
                    }
                } else {
                    tracing::info!(export = %self.name(), error = %e, "NBD connection ended");
                }
            }
        }
        // Closed for the client too (the clone kept for revocation would otherwise hold it
        // open).
        self.active.lock().expect("not poisoned").remove(&id);
        timed.stream.shutdown();
    }
}

/// An NBD export listening for the host agent.
pub struct HostExport {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    acceptor: Option<JoinHandle<()>>,
    /// The listening socket (a duplicate), shut down to wake the acceptor: connecting to it
    /// would need the right to the socket file, which belongs to the host agent.
    listening: std::os::fd::OwnedFd,
}

fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let cred = rustix::net::sockopt::socket_peercred(stream)?;
    Ok(cred.uid.as_raw())
}

/// Who may open a TCP export.
pub struct TcpAccess {
    /// Requires a client certificate of the host agents' CA.
    pub tls: Arc<rustls::ServerConfig>,
    /// The identity (subjectAltName DNS name or URI) the client certificate must carry; None
    /// lets any certificate of the CA in (only for tests and single-host deployments).
    pub client_identity: Option<String>,
    pub on_refused: Option<OnRefused>,
}

impl HostExport {
    /// Listens on `socket` (mode 0600, owned by `allowed_uid`, both set before it listens)
    /// for clients whose uid is `allowed_uid` (the host agent's); others are disconnected at
    /// once.
    pub fn unix(export: Export, socket: &Path, allowed_uid: u32) -> io::Result<Self> {
        let listener =
            unix_listen::bind(socket, unix_listen::Access::owner_only(Some(allowed_uid)))
                .map_err(io::Error::other)?;
        let name = export.name.clone();
        let listening = std::os::fd::OwnedFd::from(listener.try_clone()?);
        Self::start(
            export,
            Endpoint::Unix(socket.to_path_buf()),
            listening,
            move || {
                let (s, _) = listener.accept()?;
                match peer_uid(&s) {
                    Ok(uid) if uid == allowed_uid => Ok(Some(Stream::Unix(s))),
                    other => {
                        tracing::warn!(export = %name, peer = ?other.ok(), "NBD connection from a uid that may not use this export refused");
                        Ok(None)
                    }
                }
            },
            None,
            None,
        )
    }

    /// Listens on a new port of `ip` for clients that start TLS (required), present a
    /// certificate `access.tls` accepts and, if it names one, carry `access.client_identity`.
    pub fn tcp(export: Export, ip: IpAddr, access: TcpAccess) -> io::Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let listening = std::os::fd::OwnedFd::from(listener.try_clone()?);
        Self::start(
            export,
            Endpoint::Tcp(addr),
            listening,
            move || {
                let (s, _) = listener.accept()?;
                s.set_nodelay(true)?;
                Ok(Some(Stream::Tcp(s)))
            },
            Some(TlsAccess {
                config: access.tls,
                client_identity: access.client_identity,
            }),
            access.on_refused,
        )
    }

    fn start(
        export: Export,
        endpoint: Endpoint,
        listening: std::os::fd::OwnedFd,
        accept: impl Fn() -> io::Result<Option<Stream>> + Send + 'static,
        tls: Option<TlsAccess>,
        on_refused: Option<OnRefused>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            export: Arc::new(export),
            tls,
            on_refused,
            active: Mutex::default(),
            next_id: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let pool = pool::Pool::global();
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("nbd-{}", shared.name()))
                .spawn(move || loop {
                    let stream = accept();
                    if shared.is_revoked() {
                        break;
                    }
                    match stream {
                        Ok(Some(stream)) => pool.greet(shared.clone(), stream),
                        Ok(None) => {}
                        // Out of descriptors, say: not a busy loop.
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                })?
        };
        Ok(Self {
            shared,
            endpoint,
            acceptor: Some(acceptor),
            listening,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// TLS clients refused so far because their certificate does not carry the export's host
    /// identity.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections being served now (handshaking or in transmission).
    pub fn connections(&self) -> usize {
        self.shared.active.lock().expect("not poisoned").len()
    }

    /// Hot-remove: no new connections, open ones shut down (in-flight I/O fails), the
    /// socket removed or the port closed. Idempotent.
    pub fn revoke(&mut self) {
        self.shared.export.revoke();
        for (_, active) in self.shared.active.lock().expect("not poisoned").drain() {
            active.socket.shutdown();
        }
        // Connections waiting for their first bytes are closed too.
        pool::Pool::global().wake();
        if let Some(acceptor) = self.acceptor.take() {
            // Wake the acceptor so it sees the revocation (and drops the listener): a
            // listening socket shut down fails the accept waiting on it.
            let _ = rustix::net::shutdown(&self.listening, rustix::net::Shutdown::Both);
            let _ = acceptor.join();
        }
        if let Endpoint::Unix(p) = &self.endpoint {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for HostExport {
    fn drop(&mut self) {
        self.revoke();
    }
}
