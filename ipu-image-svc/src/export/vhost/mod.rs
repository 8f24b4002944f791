//! A clone exported as a vhost-user-blk device (the protocol of SPDK's vhost target): a
//! function's microVM (QEMU `-device vhost-user-blk-pci`) connects to a per-function Unix
//! socket, shares its guest memory, and its virtio-blk driver's requests are served from the
//! clone by the `vhost-user-backend` daemon's threads (one per virtqueue).
//!
//! Who may connect: the socket is 0600 and owned by the host agent's uid (so the kernel lets
//! only that uid and root connect), and every accepted connection's peer uid is checked
//! again (`SO_PEERCRED`): any other uid is disconnected at once, counted and reported
//! ([`VhostEvent::Refused`]). The daemon of `vhost-user-backend` 0.24 accepts its connection
//! itself and does not hand out the socket, so the check is made in front of it: this module
//! accepts and checks the front-end's connection, starts a daemon on a private connection
//! of its own, and relays the vhost-user control messages between the two, one framed
//! message at a time with the descriptors it carries (memory regions, kick and call
//! eventfds), bounded by the protocol's message size. The data path (the virtqueues in
//! shared memory, the eventfds) does not pass through the relay.
//!
//! One front-end at a time: a second connection while one is served is closed at once.
//! [`VhostUserBlkExport::revoke`] is the hot-remove: requests still kicked complete with
//! `IOERR`, the connection is shut (the front-end sees the device gone), the daemon and its
//! queue threads stop, and the socket is removed.

pub mod backend;
pub mod request;

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::blockstore::BlockDevice;
use backend::{BlkBackend, Stats};
use request::Geometry;

/// A vhost-user message header: request, flags, payload size (u32 each).
const HEADER: usize = 12;
/// The largest payload the protocol allows (`vhost::vhost_user::message::MAX_MSG_SIZE`).
const MAX_PAYLOAD: usize = 0x1000;
/// Descriptors one message may carry (`MAX_ATTACHED_FD_ENTRIES`).
const MAX_FDS: usize = 32;
/// Once a message has begun, the rest of it must come within this.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals of one export reported one by one; past those, one in [`REPORTED_EVERY`].
pub const REPORTED_REFUSALS: u64 = 32;
pub const REPORTED_EVERY: u64 = 1000;

/// What the export offers the front-end.
#[derive(Clone, Debug)]
pub struct VhostOptions {
    /// Virtqueues (`num_queues`, VIRTIO_BLK_F_MQ), each served by its own thread.
    pub num_queues: usize,
    /// VIRTIO_BLK_F_RO: writes, discards and write-zeroes fail with `IOERR`.
    pub read_only: bool,
    /// The `GET_ID` serial (at most 20 bytes are used).
    pub serial: String,
}

impl Default for VhostOptions {
    fn default() -> Self {
        Self {
            num_queues: 2,
            read_only: false,
            serial: String::new(),
        }
    }
}

/// The most queues an export may have.
pub const MAX_QUEUES: usize = 16;

/// What happened at an export's socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VhostEvent {
    /// A front-end of an allowed uid connected.
    Connected { uid: u32 },
    /// A connection from another uid (None: unknown) was closed; `refusals` so far. Reported
    /// for the first [`REPORTED_REFUSALS`], then every [`REPORTED_EVERY`]th.
    Refused { uid: Option<u32>, refusals: u64 },
    /// The front-end's connection ended (it closed it, or the export was revoked).
    Disconnected { reason: String },
}

pub type OnVhostEvent = Box<dyn Fn(&VhostEvent) + Send + Sync>;

struct Shared {
    name: String,
    allowed_uid: u32,
    revoked: Arc<AtomicBool>,
    /// Written at revocation: wakes the export's thread.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
    /// The served front-end's connection, to shut it at revocation.
    current: Mutex<Option<UnixStream>>,
    refused: AtomicU64,
    connections: AtomicU64,
    stats: Arc<Stats>,
    on_event: Option<OnVhostEvent>,
}

impl Shared {
    fn event(&self, e: VhostEvent) {
        if let Some(f) = &self.on_event {
            f(&e);
        }
    }

    /// Whether a connection may be served; a refused one is counted and reported.
    fn admit(&self, s: &UnixStream) -> bool {
        let uid = rustix::net::sockopt::socket_peercred(s)
            .ok()
            .map(|c| c.uid.as_raw());
        if uid.is_some_and(|u| u == self.allowed_uid || u == 0) {
            return true;
        }
        let n = self.refused.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::warn!(export = %self.name, peer = ?uid, refusals = n, "vhost-user connection from a uid that may not use this export refused");
        if n <= REPORTED_REFUSALS || n % REPORTED_EVERY == 0 {
            self.event(VhostEvent::Refused { uid, refusals: n });
        }
        let _ = s.shutdown(std::net::Shutdown::Both);
        false
    }
}

/// A clone served as a vhost-user-blk device on a Unix socket.
pub struct VhostUserBlkExport {
    shared: Arc<Shared>,
    socket: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserBlkExport {
    /// Listens on `socket` (mode 0600, owned by `allowed_uid`, both set before it listens)
    /// for a front-end whose uid is `allowed_uid` or root, and serves `dev` to it.
    pub fn unix(
        name: &str,
        dev: Arc<dyn BlockDevice>,
        socket: &Path,
        allowed_uid: u32,
        opts: VhostOptions,
        on_event: Option<OnVhostEvent>,
    ) -> io::Result<Self> {
        if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "vhost-user-blk export {name}: {} queues, 1 to {MAX_QUEUES}",
                    opts.num_queues
                ),
            ));
        }
        let listener =
            unix_listen::bind(socket, unix_listen::Access::owner_only(Some(allowed_uid)))
                .map_err(io::Error::other)?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            allowed_uid,
            revoked: Arc::new(AtomicBool::new(false)),
            wake_tx,
            wake_rx,
            current: Mutex::new(None),
            refused: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            stats: Arc::new(Stats::default()),
            on_event,
        });
        let geo = Geometry::new(dev.size(), opts.read_only || dev.read_only(), &opts.serial);
        let thread = {
            let shared = shared.clone();
            let socket = socket.to_path_buf();
            std::thread::Builder::new()
                .name(format!("vhost-{name}"))
                .spawn(move || serve(&shared, &listener, &socket, &dev, &geo, opts.num_queues))?
        };
        Ok(Self {
            shared,
            socket: socket.to_path_buf(),
            thread: Some(thread),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Connections refused because of their peer uid (or because one was being served).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Front-ends served so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub fn completed_requests(&self) -> u64 {
        self.shared.stats.completed.load(Ordering::Relaxed)
    }

    /// Descriptor chains refused (`IOERR`/`UNSUPP` or dropped) and queues not served.
    pub fn rejected_requests(&self) -> u64 {
        self.shared.stats.rejected.load(Ordering::Relaxed)
    }

    /// Hot-remove: requests still kicked fail, the front-end's connection is shut, the daemon
    /// and its queue threads stop, and the socket is removed. Idempotent.
    pub fn revoke(&mut self) {
        self.shared.revoked.store(true, Ordering::SeqCst);
        let _ = (&self.shared.wake_tx).write_all(&[1]);
        if let Some(s) = self.shared.current.lock().expect("not poisoned").as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for VhostUserBlkExport {
    fn drop(&mut self) {
        self.revoke();
    }
}

fn readable(revents: PollFlags) -> bool {
    revents.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}

/// The export's thread: accepts front-ends one at a time until revoked.
fn serve(
    shared: &Shared,
    listener: &UnixListener,
    socket: &Path,
    dev: &Arc<dyn BlockDevice>,
    geo: &Geometry,
    num_queues: usize,
) {
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(&shared.wake_rx, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(export = %shared.name, error = %e, "vhost-user export stopped: cannot poll its socket");
                return;
            }
        }
        if shared.revoked.load(Ordering::SeqCst) {
            return;
        }
        if !readable(fds[0].revents()) {
            continue;
        }
        let s = match listener.accept() {
            Ok((s, _)) => s,
            // Out of descriptors, say: not a busy loop.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if !shared.admit(&s) {
            continue;
        }
        let uid = rustix::net::sockopt::socket_peercred(&s)
            .map(|c| c.uid.as_raw())
            .unwrap_or(0);
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.event(VhostEvent::Connected { uid });
        let reason = match serve_frontend(shared, listener, socket, s, dev, geo, num_queues) {
            Ok(reason) => reason,
            Err(e) => format!("error: {e}"),
        };
        tracing::info!(export = %shared.name, %reason, "vhost-user front-end disconnected");
        shared.event(VhostEvent::Disconnected { reason });
        if shared.revoked.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Serves one front-end connection until it ends; returns why it ended.
fn serve_frontend(
    shared: &Shared,
    listener: &UnixListener,
    socket: &Path,
    s: UnixStream,
    dev: &Arc<dyn BlockDevice>,
    geo: &Geometry,
    num_queues: usize,
) -> io::Result<String> {
    *shared.current.lock().expect("not poisoned") = Some(s.try_clone()?);
    // Revoked between the accept and now: the shutdown above may have missed it.
    if shared.revoked.load(Ordering::SeqCst) {
        return Ok("revoked".into());
    }
    s.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    s.set_write_timeout(Some(MESSAGE_TIMEOUT))?;
    let backend = Arc::new(BlkBackend::new(
        shared.name.clone(),
        dev.clone(),
        geo.clone(),
        num_queues,
        shared.revoked.clone(),
        shared.stats.clone(),
    ));
    let mut daemon = VhostUserDaemon::new(
        format!("vhost-daemon-{}", shared.name),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| io::Error::other(format!("vhost-user daemon: {e}")))?;
    // The daemon's own connection: a private socket (0600, the service's), connected to
    // before the daemon accepts and removed at once.
    let inner_path = socket.with_extension("daemon");
    let inner = unix_listen::bind(&inner_path, unix_listen::Access::owner_only(None))
        .map_err(io::Error::other)?;
    let c = UnixStream::connect(&inner_path);
    let _ = std::fs::remove_file(&inner_path);
    let c = c?;
    let mut inner = vhost::vhost_user::Listener::from(inner);
    daemon
        .start(&mut inner)
        .map_err(|e| io::Error::other(format!("vhost-user daemon: {e}")))?;
    drop(inner);
    let reason = relay(shared, listener, &s, &c);
    // Tear down: the daemon's request thread ends with its connection, the queue threads
    // with their exit events.
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = c.shutdown(std::net::Shutdown::Both);
    daemon.request_shutdown();
    if let Err(e) = daemon.wait() {
        tracing::info!(export = %shared.name, "vhost-user daemon ended: {e}");
    }
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Joins the queue threads.
    drop(daemon);
    backend.close_exit_events();
    *shared.current.lock().expect("not poisoned") = None;
    Ok(reason)
}

/// Relays control messages between the front-end (`s`) and the daemon (`c`) until either
/// closes or the export is revoked; meanwhile refuses other connections. Returns why it
/// stopped.
fn relay(shared: &Shared, listener: &UnixListener, s: &UnixStream, c: &UnixStream) -> String {
    loop {
        let mut fds = [
            PollFd::new(s, PollFlags::IN),
            PollFd::new(c, PollFlags::IN),
            PollFd::new(&shared.wake_rx, PollFlags::IN),
            PollFd::new(listener, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return format!("cannot poll: {e}"),
        }
        if shared.revoked.load(Ordering::SeqCst) || readable(fds[2].revents()) {
            return "revoked".into();
        }
        if readable(fds[0].revents()) {
            if let Err(e) = forward(s, c) {
                return format!("front-end: {e}");
            }
        }
        if readable(fds[1].revents()) {
            if let Err(e) = forward(c, s) {
                return format!("back-end: {e}");
            }
        }
        if readable(fds[3].revents()) {
            if let Ok((other, _)) = listener.accept() {
                if shared.admit(&other) {
                    tracing::warn!(export = %shared.name, "a second vhost-user front-end refused: one is connected");
                    let _ = other.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }
}

/// Moves one vhost-user message (header, payload, attached descriptors) from `from` to `to`.
fn forward(from: &UnixStream, to: &UnixStream) -> io::Result<()> {
    let mut msg = vec![0u8; HEADER];
    let mut fds = Vec::new();
    recv_exact(from, &mut msg, &mut fds)?;
    let size = u32::from_le_bytes(msg[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a vhost-user message of {size} bytes, at most {MAX_PAYLOAD}"),
        ));
    }
    msg.resize(HEADER + size, 0);
    recv_exact(from, &mut msg[HEADER..], &mut fds)?;
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a vhost-user message with {} descriptors, at most {MAX_FDS}",
                fds.len()
            ),
        ));
    }
    send_all(to, &msg, &fds)
}

fn recv_exact(from: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let r = match rustix::net::recvmsg(
            from,
            &mut [IoSliceMut::new(&mut buf[at..])],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(r) => r,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if r.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a vhost-user message with more than {MAX_FDS} descriptors"),
            ));
        }
        if r.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if at == 0 && buf.len() == HEADER {
                    "closed".to_string()
                } else {
                    "closed in the middle of a message".to_string()
                },
            ));
        }
        at += r.bytes;
    }
    Ok(())
}

fn send_all(to: &UnixStream, msg: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("cannot attach the message's descriptors"));
    }
    let sent = loop {
        match rustix::net::sendmsg(to, &[IoSlice::new(msg)], &mut cmsg, SendFlags::NOSIGNAL) {
            Ok(n) => break n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut rest = &msg[sent..];
    while !rest.is_empty() {
        match rustix::net::send(to, rest, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
