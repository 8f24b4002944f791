//! Listening on a Unix socket path, the one way every daemon of the project does it.
//!
//! [`bind`] creates the socket, gives its path the requested mode and owner, and only then
//! listens: no client can connect while the path still has the umask's mode. A path that is
//! already there is replaced only when it is a socket nobody answers on (left by a process
//! that died); any other file, or a live socket, is an error, never deleted.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Who may connect: the socket file's mode and, optionally, its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Permission bits of the socket file (connecting needs write permission).
    pub mode: u32,
    /// Owner uid to give the socket file (the caller must be allowed to chown).
    pub owner: Option<u32>,
}

impl Access {
    /// Only the owner (`mode` 0600), optionally another uid than this process's.
    pub fn owner_only(owner: Option<u32>) -> Self {
        Self { mode: 0o600, owner }
    }

    /// `mode` for the file, owned by this process's uid.
    pub fn mode(mode: u32) -> Self {
        Self { mode, owner: None }
    }
}

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{path}: a {kind} is there, not a socket; refusing to remove it")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("{path}: another process is listening on this socket")]
    InUse { path: PathBuf },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ListenError {
    fn io(path: &Path, what: &'static str, source: impl Into<std::io::Error>) -> Self {
        ListenError::Io {
            path: path.to_path_buf(),
            what,
            source: source.into(),
        }
    }
}

/// Listens on `path` with `access`; creates the parent directory if missing. The listener is
/// blocking; for tokio, `set_nonblocking(true)` and `tokio::net::UnixListener::from_std`.
pub fn bind(path: &Path, access: Access) -> Result<UnixListener, ListenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ListenError::io(dir, "cannot create", e))?;
    }
    clear_stale(path)?;
    let address =
        SocketAddrUnix::new(path).map_err(|e| ListenError::io(path, "not a socket path", e))?;
    let socket: OwnedFd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| ListenError::io(path, "cannot create a socket", e))?;
    rustix::net::bind(&socket, &address).map_err(|e| ListenError::io(path, "cannot bind", e))?;
    // Bound but not listening: a connection attempt is refused until the access is right.
    let protect = || -> Result<(), ListenError> {
        // The mode while this process owns the file: changing another owner's needs
        // CAP_FOWNER, which the IPU service does not keep (only CAP_CHOWN).
        std::fs::set_permissions(
            path,
            std::os::unix::fs::PermissionsExt::from_mode(access.mode),
        )
        .map_err(|e| ListenError::io(path, "cannot set the socket's mode", e))?;
        if let Some(uid) = access.owner {
            std::os::unix::fs::chown(path, Some(uid), None)
                .map_err(|e| ListenError::io(path, "cannot give the socket its owner", e))?;
        }
        rustix::net::listen(&socket, 1024).map_err(|e| ListenError::io(path, "cannot listen", e))
    };
    if let Err(e) = protect() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(socket))
}

/// Removes `path` if it is a socket (a listener's cleanup); anything else is left alone.
pub fn remove(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Makes room for the socket: nothing there, or a socket nobody listens on (removed).
fn clear_stale(path: &Path) -> Result<(), ListenError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ListenError::io(path, "cannot inspect", e)),
    };
    let t = metadata.file_type();
    if !t.is_socket() {
        let kind = if t.is_dir() {
            "directory"
        } else if t.is_symlink() {
            "symbolic link"
        } else if t.is_file() {
            "regular file"
        } else {
            "special file"
        };
        return Err(ListenError::NotASocket {
            path: path.to_path_buf(),
            kind,
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|e| ListenError::io(path, "cannot remove a stale socket", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn binds_with_the_mode_and_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/api.sock");
        let listener = bind(&path, Access::mode(0o660)).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(bind(&path, Access::owner_only(None)).unwrap());
        // The file is left behind, nobody listens: a restart takes it over.
        assert!(path.exists());
        let listener = bind(&path, Access::owner_only(None)).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        listener.accept().unwrap();
    }

    #[test]
    fn a_live_socket_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _live = bind(&path, Access::owner_only(None)).unwrap();
        let err = bind(&path, Access::owner_only(None)).unwrap_err();
        assert!(matches!(err, ListenError::InUse { .. }), "{err}");
    }

    #[test]
    fn other_files_are_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("precious");
        std::fs::write(&file, b"data").unwrap();
        let err = bind(&file, Access::owner_only(None)).unwrap_err();
        assert!(err.to_string().contains("regular file"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");

        let sub = dir.path().join("dir");
        std::fs::create_dir(&sub).unwrap();
        let err = bind(&sub, Access::owner_only(None)).unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");
        assert!(sub.is_dir());

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = bind(&link, Access::owner_only(None)).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
    }

    #[test]
    fn remove_leaves_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        remove(&file);
        assert!(file.exists());
        let sock = dir.path().join("s");
        drop(bind(&sock, Access::owner_only(None)).unwrap());
        remove(&sock);
        assert!(!sock.exists());
    }

    #[test]
    fn owner_is_set_before_listening() {
        // Root only (chown); skipped quietly elsewhere since nothing else can chown.
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _l = bind(&path, Access::owner_only(Some(4242))).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), 4242);
    }
}
