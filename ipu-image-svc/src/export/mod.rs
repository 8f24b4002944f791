//! Exporting a clone to the host (a software stand-in for the IPU's virtio-blk or NVMe
//! function): NBD over a per-function Unix socket that only the host agent's uid may use, or
//! over TCP with mutual TLS (NBD STARTTLS, forced) for a host agent on another machine.
//!
//! [`HostExport::revoke`] is the hot-remove: the export refuses new connections, shuts down
//! the open ones (in-flight requests fail), and removes its socket or closes its port.

pub mod nbd;
pub mod tls;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nbd::Export;

/// Where an export listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The NBD URI of export `name` here (libnbd's syntax). Over TCP the client needs its
    /// certificates too (`?tls-certificates=DIR`).
    pub fn nbd_uri(&self, name: &str) -> String {
        match self {
            Endpoint::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Endpoint::Tcp(a) => format!("nbds://{a}/{name}"),
        }
    }

    pub fn unix_socket(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(p) => Some(p),
            Endpoint::Tcp(_) => None,
        }
    }
}

/// Shuts an open connection down (a clone of its socket), for revocation.
type Shutdown = Box<dyn Fn() + Send>;

/// An NBD export listening for the host agent.
pub struct HostExport {
    export: Arc<Export>,
    endpoint: Endpoint,
    connections: Arc<Mutex<HashMap<u64, Shutdown>>>,
    acceptor: Option<JoinHandle<()>>,
}

/// A connected socket of either kind.
trait Socket: Read + Write + Send + Sized + 'static {
    fn try_clone_socket(&self) -> io::Result<Self>;
    fn shutdown_both(&self);
}

impl Socket for UnixStream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Socket for TcpStream {
    fn try_clone_socket(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let cred = rustix::net::sockopt::socket_peercred(stream)?;
    Ok(cred.uid.as_raw())
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
        Self::start(
            export,
            Endpoint::Unix(socket.to_path_buf()),
            move || listener.accept().map(|(s, _)| s),
            move |stream: &UnixStream| match peer_uid(stream) {
                Ok(uid) if uid == allowed_uid => true,
                other => {
                    tracing::warn!(export = %name, peer = ?other.ok(), "NBD connection from a uid that may not use this export refused");
                    false
                }
            },
            None,
        )
    }

    /// Listens on a new port of `ip` for clients that start TLS (required) and present a
    /// certificate `tls` accepts.
    pub fn tcp(export: Export, ip: IpAddr, tls: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        Self::start(
            export,
            Endpoint::Tcp(addr),
            move || {
                let (s, _) = listener.accept()?;
                s.set_nodelay(true)?;
                Ok(s)
            },
            |_: &TcpStream| true,
            Some(tls),
        )
    }

    fn start<S: Socket>(
        export: Export,
        endpoint: Endpoint,
        accept: impl Fn() -> io::Result<S> + Send + 'static,
        admit: impl Fn(&S) -> bool + Send + 'static,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Self> {
        let export = Arc::new(export);
        let connections: Arc<Mutex<HashMap<u64, Shutdown>>> = Arc::default();
        let acceptor = {
            let export = export.clone();
            let connections = connections.clone();
            std::thread::Builder::new()
                .name(format!("nbd-{}", export.name))
                .spawn(move || {
                    for n in 0u64.. {
                        let stream = accept();
                        if export.is_revoked() {
                            break;
                        }
                        let Ok(mut stream) = stream else { continue };
                        if !admit(&stream) {
                            continue;
                        }
                        if let Ok(clone) = stream.try_clone_socket() {
                            connections
                                .lock()
                                .expect("not poisoned")
                                .insert(n, Box::new(move || clone.shutdown_both()));
                        }
                        let export = export.clone();
                        let connections = connections.clone();
                        let tls = tls.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = nbd::serve(&mut stream, &export, tls.as_ref()) {
                                tracing::info!(export = %export.name, error = %e, "NBD connection ended");
                            }
                            // Closed for the client too (the clone kept for revocation
                            // would otherwise hold it open).
                            connections.lock().expect("not poisoned").remove(&n);
                            stream.shutdown_both();
                        });
                    }
                })?
        };
        Ok(Self {
            export,
            endpoint,
            connections,
            acceptor: Some(acceptor),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn name(&self) -> &str {
        &self.export.name
    }

    /// Hot-remove: no new connections, open ones shut down (in-flight I/O fails), the
    /// socket removed or the port closed. Idempotent.
    pub fn revoke(&mut self) {
        self.export.revoke();
        for (_, shutdown) in self.connections.lock().expect("not poisoned").drain() {
            shutdown();
        }
        if let Some(acceptor) = self.acceptor.take() {
            // Wake the acceptor so it sees the revocation (and drops the listener).
            match &self.endpoint {
                Endpoint::Unix(p) => drop(UnixStream::connect(p)),
                Endpoint::Tcp(a) => drop(TcpStream::connect(a)),
            }
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
