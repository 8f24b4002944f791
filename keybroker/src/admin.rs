//! The administrative commands (`keybroker keys|ipus|policy`), on a running broker through
//! its Unix socket, or, when no broker runs, directly on its state directory (which the
//! service locks while it runs). Every change is audited either way: by the broker with the
//! socket peer's uid, or here with the named actor.
//!
//! Both targets answer in the admin API's types, so the output is the same either way.

use std::path::{Path, PathBuf};

use api::keybroker::key_admin_client::KeyAdminClient;
use api::keybroker::{
    CreateKeyRequest, EnrollIpuRequest, ImportKeyRequest, IpuIdRequest, IpuInfo, KeyIdRequest,
    KeyInfo, ListRequest, LoadPolicyRequest, RevokeKeyRequest,
};
use tonic::transport::Channel;

use crate::broker::{Broker, BrokerError, BrokerOptions};
use crate::keystore::KeyKind;
use crate::service::{ipu_info, key_info};

/// Why an administrative command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot reach the broker at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The running broker refused or failed (its message).
    #[error("{}", .0.message())]
    Rpc(Box<tonic::Status>),
    #[error("{target}: {source}")]
    Audit {
        target: Box<audit::local::AuditTarget>,
        #[source]
        source: Box<audit::AuditError>,
    },
    /// The state directory is locked by a running broker.
    #[error("{source} (a broker is running on {}: use --socket)", dir.display())]
    Busy {
        dir: PathBuf,
        #[source]
        source: BrokerError,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no usable key {0:?}")]
    NoUsableKey(String),
}

impl From<tonic::Status> for AdminError {
    fn from(s: tonic::Status) -> Self {
        AdminError::Rpc(Box::new(s))
    }
}

impl From<crate::keystore::KeyStoreError> for AdminError {
    fn from(e: crate::keystore::KeyStoreError) -> Self {
        AdminError::Broker(e.into())
    }
}

/// Reads a file a command names (a key, a template, a bundle).
pub fn read(path: &Path) -> Result<Vec<u8>, AdminError> {
    std::fs::read(path).map_err(|source| AdminError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A runtime for one command's calls.
pub fn runtime() -> Result<tokio::runtime::Runtime, AdminError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AdminError::Runtime)
}

/// Connects to a running broker's Unix socket.
pub async fn connect(socket: &Path) -> Result<Channel, AdminError> {
    api::unix::connect(socket.to_path_buf())
        .await
        .map_err(|source| AdminError::Connect {
            socket: socket.to_path_buf(),
            source,
        })
}

/// How to open a state directory without a broker.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub dir: PathBuf,
    /// The audit log (default: DIR/audit).
    pub audit_log: Option<PathBuf>,
    /// Who is acting, for the audit log (default: $USER).
    pub actor: Option<String>,
    pub bundle_keys: Vec<PathBuf>,
    pub master_key_tpm: Option<String>,
    /// The broker's store (sled in DIR by default).
    pub store: crate::store::StoreLocation,
}

/// Where administrative operations go: a running broker or its state directory.
// One per process.
#[allow(clippy::large_enum_variant)]
pub enum Target {
    Remote(tokio::runtime::Runtime, KeyAdminClient<Channel>),
    Local(Broker, String),
}

/// Runs one admin call on whichever target: `$local` with the broker and actor, `$remote`
/// with the client.
macro_rules! call {
    ($t:expr, |$b:ident, $who:ident| $local:expr, |$c:ident| $remote:expr) => {
        match $t {
            Target::Local($b, $who) => $local.map_err(AdminError::from),
            Target::Remote(rt, $c) => rt
                .block_on($remote)
                .map(|r| r.into_inner())
                .map_err(AdminError::from),
        }
    };
}

impl Target {
    /// The running broker at `socket`.
    pub fn remote(socket: &Path) -> Result<Self, AdminError> {
        let rt = runtime()?;
        let channel = rt.block_on(connect(socket))?;
        Ok(Target::Remote(rt, KeyAdminClient::new(channel)))
    }

    /// The state directory of a broker that is not running.
    pub fn local(opts: &LocalOptions) -> Result<Self, AdminError> {
        let audit_dir = opts
            .audit_log
            .clone()
            .unwrap_or_else(|| crate::broker::default_audit_dir(&opts.dir));
        let target = audit::local::AuditTarget::dir(audit_dir);
        let sink = target
            .open(crate::broker::AUDIT_SERVICE)
            .map_err(|source| AdminError::Audit {
                target: Box::new(target.clone()),
                source: Box::new(source),
            })?;
        let mut broker_opts = BrokerOptions::new(&opts.dir);
        broker_opts.bundle_keys = opts.bundle_keys.clone();
        broker_opts.master_key_tpm = opts.master_key_tpm.clone();
        broker_opts.store = opts.store.clone();
        let broker = Broker::open(&broker_opts, sink).map_err(|e| {
            if e.to_string().contains("lock") {
                AdminError::Busy {
                    dir: opts.dir.clone(),
                    source: e,
                }
            } else {
                e.into()
            }
        })?;
        let actor = opts
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into());
        Ok(Target::Local(broker, actor))
    }

    /// The running broker when a socket is given, else the state directory.
    pub fn open(socket: Option<&Path>, local: &LocalOptions) -> Result<Self, AdminError> {
        match socket {
            Some(s) => Self::remote(s),
            None => Self::local(local),
        }
    }

    pub fn create_key(&mut self, id: &str, kind: KeyKind) -> Result<KeyInfo, AdminError> {
        call!(
            self,
            |b, who| b.create_key(who, id, kind).map(key_info),
            |c| c.create_key(CreateKeyRequest {
                id: id.to_string(),
                kind: kind.name().into()
            })
        )
    }

    /// Imports a private key (PEM; zeroized by the caller).
    pub fn import_key(&mut self, id: &str, pem: &[u8]) -> Result<KeyInfo, AdminError> {
        call!(
            self,
            |b, who| b.import_key(who, id, pem).map(key_info),
            |c| c.import_key(ImportKeyRequest {
                id: id.to_string(),
                private_pem: pem.to_vec()
            })
        )
    }

    pub fn rotate_key(&mut self, id: &str) -> Result<KeyInfo, AdminError> {
        call!(self, |b, who| b.rotate_key(who, id).map(key_info), |c| c
            .rotate_key(KeyIdRequest { id: id.to_string() }))
    }

    /// Revokes one version of a key, or every version (`None`).
    pub fn revoke_key(&mut self, id: &str, version: Option<u32>) -> Result<(), AdminError> {
        call!(
            self,
            |b, who| b.revoke_key(who, id, version).map(|_| ()),
            |c| async {
                c.revoke_key(RevokeKeyRequest {
                    id: id.to_string(),
                    version: version.unwrap_or(0),
                })
                .await
                .map(|r| r.map(|_| ()))
            }
        )
    }

    /// Every key version (no secrets).
    pub fn list_keys(&mut self) -> Result<Vec<KeyInfo>, AdminError> {
        call!(
            self,
            |b, _who| b
                .keys()
                .list()
                .map(|v| v.into_iter().map(key_info).collect::<Vec<_>>()),
            |c| async { c.list_keys(ListRequest {}).await.map(|r| r.map(|l| l.keys)) }
        )
    }

    /// The newest unrevoked version of a key.
    pub fn newest_key(&mut self, id: &str) -> Result<KeyInfo, AdminError> {
        let keys = call!(
            self,
            |b, _who| b
                .keys()
                .versions(id)
                .map(|v| v.into_iter().map(key_info).collect::<Vec<_>>()),
            |c| async { c.list_keys(ListRequest {}).await.map(|r| r.map(|l| l.keys)) }
        )?;
        newest_usable(keys, id).ok_or_else(|| AdminError::NoUsableKey(id.to_string()))
    }

    /// Enrolls an IPU's AK (its TPMT_PUBLIC), pinned to its EK's when given.
    pub fn enroll_ipu(
        &mut self,
        id: &str,
        class: &str,
        ak_template: &[u8],
        ek_template: Option<&[u8]>,
    ) -> Result<IpuInfo, AdminError> {
        call!(
            self,
            |b, who| b
                .enroll_ipu(who, id, class, ak_template, ek_template)
                .map(ipu_info),
            |c| c.enroll_ipu(EnrollIpuRequest {
                ipu_id: id.to_string(),
                ipu_class: class.to_string(),
                ak_template: ak_template.to_vec(),
                ek_template: ek_template.map(<[u8]>::to_vec).unwrap_or_default(),
            })
        )
    }

    pub fn revoke_ipu(&mut self, id: &str) -> Result<(), AdminError> {
        call!(
            self,
            |b, who| b.revoke_ipu(who, id).map(|_| ()),
            |c| async {
                c.revoke_ipu(IpuIdRequest {
                    ipu_id: id.to_string(),
                })
                .await
                .map(|r| r.map(|_| ()))
            }
        )
    }

    pub fn list_ipus(&mut self) -> Result<Vec<IpuInfo>, AdminError> {
        call!(
            self,
            |b, _who| b
                .verifier
                .list()
                .map_err(BrokerError::from)
                .map(|v| v.into_iter().map(ipu_info).collect::<Vec<_>>()),
            |c| async { c.list_ipus(ListRequest {}).await.map(|r| r.map(|l| l.ipus)) }
        )
    }

    /// Loads a signed policy bundle; returns its version and signer.
    pub fn load_policy(&mut self, bundle: &[u8]) -> Result<(u64, String), AdminError> {
        call!(
            self,
            |b, who| b
                .load_policy(who, bundle)
                .map(|v| (v.content.version, v.signer)),
            |c| async {
                c.load_policy(LoadPolicyRequest {
                    bundle: bundle.to_vec(),
                })
                .await
                .map(|r| r.map(|p| (p.version, p.signer)))
            }
        )
    }
}

/// The newest unrevoked version of key `id` among `keys`.
pub fn newest_usable(keys: Vec<KeyInfo>, id: &str) -> Option<KeyInfo> {
    keys.into_iter()
        .filter(|k| k.id == id && !k.revoked)
        .max_by_key(|k| k.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, version: u32, revoked: bool) -> KeyInfo {
        KeyInfo {
            id: id.into(),
            version,
            algorithm: "EC-P256".into(),
            public_pem: format!("{id} v{version}"),
            created: 0,
            revoked,
        }
    }

    #[test]
    fn the_public_key_is_the_newest_unrevoked_version_of_that_id() {
        let keys = vec![
            key("a", 1, false),
            key("a", 2, false),
            key("a", 3, true),
            key("b", 9, false),
        ];
        assert_eq!(newest_usable(keys.clone(), "a").unwrap().version, 2);
        assert_eq!(newest_usable(keys.clone(), "b").unwrap().version, 9);
        assert!(newest_usable(keys, "c").is_none());
        assert!(newest_usable(vec![key("a", 1, true)], "a").is_none());
    }

    #[test]
    fn a_missing_file_and_an_absent_broker_say_where() {
        let e = read(Path::new("/nonexistent/bundle"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read /nonexistent/bundle: "), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = Target::remote(&dir.path().join("kb.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot reach the broker at"), "{e}");
    }
}
