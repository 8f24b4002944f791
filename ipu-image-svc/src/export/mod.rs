//! Exporting a clone to the host. Here: NBD over a per-function Unix socket that only the
//! host agent's uid may use (a software stand-in for the IPU's virtio-blk or NVMe function).
//!
//! [`UnixExport::revoke`] is the hot-remove: the export refuses new connections, shuts down
//! the open ones (in-flight requests fail), and removes its socket.

pub mod nbd;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nbd::Export;

/// An NBD export listening on a Unix socket.
pub struct UnixExport {
    export: Arc<Export>,
    socket: PathBuf,
    /// The open connections (clones of their sockets), to shut down on revocation.
    connections: Arc<Mutex<HashMap<u64, UnixStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let cred = rustix::net::sockopt::socket_peercred(stream)?;
    Ok(cred.uid.as_raw())
}

impl UnixExport {
    /// Listens on `socket` (mode 0600, in a directory that must exist) for clients whose uid
    /// is `allowed_uid` (the host agent's); others are disconnected at once.
    pub fn start(export: Export, socket: &Path, allowed_uid: u32) -> io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        let export = Arc::new(export);
        let connections = Arc::new(Mutex::new(HashMap::new()));
        let acceptor = {
            let export = export.clone();
            let connections = connections.clone();
            std::thread::Builder::new()
                .name(format!("nbd-{}", export.name))
                .spawn(move || {
                    for (n, stream) in listener.incoming().enumerate() {
                        let n = n as u64;
                        if export.is_revoked() {
                            break;
                        }
                        let Ok(mut stream) = stream else { continue };
                        match peer_uid(&stream) {
                            Ok(uid) if uid == allowed_uid => {}
                            other => {
                                tracing::warn!(export = %export.name, peer = ?other.ok(), "NBD connection from a uid that may not use this export refused");
                                continue;
                            }
                        }
                        if let Ok(clone) = stream.try_clone() {
                            connections.lock().expect("not poisoned").insert(n, clone);
                        }
                        let export = export.clone();
                        let connections = connections.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = nbd::serve(&mut stream, &export) {
                                tracing::info!(export = %export.name, error = %e, "NBD connection ended");
                            }
                            // Closed for the client too (the clone kept for revocation
                            // would otherwise hold it open).
                            connections.lock().expect("not poisoned").remove(&n);
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                        });
                    }
                })?
        };
        Ok(Self {
            export,
            socket: socket.to_path_buf(),
            connections,
            acceptor: Some(acceptor),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn name(&self) -> &str {
        &self.export.name
    }

    /// Hot-remove: no new connections, open ones shut down (in-flight I/O fails), the
    /// socket removed. Idempotent.
    pub fn revoke(&mut self) {
        self.export.revoke();
        for (_, c) in self.connections.lock().expect("not poisoned").drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(acceptor) = self.acceptor.take() {
            // Wake the acceptor so it sees the revocation.
            let _ = UnixStream::connect(&self.socket);
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for UnixExport {
    fn drop(&mut self) {
        self.revoke();
    }
}
