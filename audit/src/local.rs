//! Opening a service's own audit log with embedded defaults: the checkpoint signing key is
//! read from a file, or created on first use (mode 0600) with its `verifier.pub` next to it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::{AuditError, AuditLog, CheckpointSigner, LogOptions};

/// `<service>/<hostname>`: a log origin naming the service and the machine.
pub fn default_origin(service: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{service}/{host}")
}

/// Loads the signer at `signer_path`, creating it (and `verifier.pub` beside it) if missing.
pub fn load_or_create_signer(
    signer_path: &Path,
    origin: &str,
) -> Result<CheckpointSigner, AuditError> {
    let io = |path: &Path, e: std::io::Error| AuditError::io(path, e);
    if signer_path.exists() {
        let text =
            Zeroizing::new(std::fs::read_to_string(signer_path).map_err(|e| io(signer_path, e))?);
        return CheckpointSigner::parse(&text).map_err(|e| {
            AuditError::Request(format!("audit signer {}: {e}", signer_path.display()))
        });
    }
    let (signer, encoded) = CheckpointSigner::generate(origin)
        .map_err(|e| AuditError::Request(format!("audit origin {origin:?}: {e}")))?;
    if let Some(dir) = signer_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(signer_path)
        .map_err(|e| io(signer_path, e))?;
    f.write_all(encoded.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .map_err(|e| io(signer_path, e))?;
    let verifier_path = signer_path.with_file_name("verifier.pub");
    std::fs::write(&verifier_path, format!("{}\n", signer.verifier()))
        .map_err(|e| io(&verifier_path, e))?;
    tracing::info!(key = %signer.verifier(), path = %verifier_path.display(), "created the audit log's checkpoint key");
    Ok(signer)
}

/// Opens the log in `dir` for `origin`, with the signer from `signer_path` (default
/// `<dir>/signer.key`, created on first use).
pub fn open(dir: &Path, origin: &str, signer_path: Option<&Path>) -> Result<AuditLog, AuditError> {
    let default = dir.join("signer.key");
    let signer = load_or_create_signer(signer_path.unwrap_or(&default), origin)?;
    AuditLog::open(dir, origin, signer, LogOptions::default())
}

/// Where a service writes its audit events: the log daemon's writer socket, or a log
/// directory the service opens itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// `audit serve`'s writer socket.
    Socket(std::path::PathBuf),
    /// A log directory, opened with [`open`].
    Dir {
        dir: std::path::PathBuf,
        /// The log's name in its checkpoints (default: [`default_origin`] of the service).
        origin: Option<String>,
        /// The checkpoint signing key (default: `<dir>/signer.key`, created on first use).
        signer: Option<std::path::PathBuf>,
    },
}

impl AuditTarget {
    /// A log directory with the default origin and signer.
    pub fn dir(dir: impl Into<std::path::PathBuf>) -> Self {
        AuditTarget::Dir {
            dir: dir.into(),
            origin: None,
            signer: None,
        }
    }

    /// The socket when given, else the directory (how every command-line chooses).
    pub fn socket_or_dir(socket: Option<&Path>, dir: &Path) -> Self {
        match socket {
            Some(s) => AuditTarget::Socket(s.to_path_buf()),
            None => AuditTarget::dir(dir),
        }
    }

    /// Opens the sink for `service` (the default origin's first part).
    pub fn open(&self, service: &str) -> Result<std::sync::Arc<dyn crate::AuditSink>, AuditError> {
        Ok(match self {
            AuditTarget::Socket(socket) => std::sync::Arc::new(crate::RemoteLog::connect(socket)?),
            AuditTarget::Dir {
                dir,
                origin,
                signer,
            } => {
                let origin = origin.clone().unwrap_or_else(|| default_origin(service));
                std::sync::Arc::new(open(dir, &origin, signer.as_deref())?)
            }
        })
    }
}

impl std::fmt::Display for AuditTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditTarget::Socket(s) => write!(f, "audit daemon {}", s.display()),
            AuditTarget::Dir { dir, .. } => write!(f, "audit log {}", dir.display()),
        }
    }
}
