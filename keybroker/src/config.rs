//! `keybroker serve`'s configuration file (TOML). Relative paths are taken from the file's
//! directory. Unknown keys are refused, so a typo never silently weakens the setup.
//!
//! ```toml
//! state_dir = "/var/lib/keybroker"          # master key, audit log; the sled store
//! store = "postgres://kb@%2Frun%2Fpostgresql/keybroker"  # or "sled" (the default)
//! audit_log = "/var/lib/keybroker/audit"    # or audit_socket = "/run/ipu-audit/writer.sock"
//! audit_origin = "keybroker/kb-1.example"   # the log's name in its checkpoints (default: keybroker/HOSTNAME)
//! bundle_keys = ["policy-signer.pub"]       # who may sign deployment policy bundles
//! session_ttl = "5m"
//! nonce_lifetime = "60s"
//! provider_name = "ipubroker"
//! master_key_tpm = "device:/dev/tpmrm0"     # seal the master key with this TPM
//! require_ek = true                         # enroll IPUs only with their EK (the default)
//!
//! [tls]                                     # IPUs, publishers, admins over the network
//! listen = "0.0.0.0:8443"
//! cert = "server.pem"
//! key = "server.key"
//! client_ca = "clients-ca.pem"
//!
//! [unix]                                    # local administration and the key provider
//! socket = "/run/keybroker/keybroker.sock"
//! roles = { "1000" = "publisher" }          # uid -> role; root and the broker's uid: admin
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use audit::local::AuditTarget;
use serde::Deserialize;

use crate::broker::BrokerOptions;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    state_dir: PathBuf,
    #[serde(default)]
    store: Option<String>,
    #[serde(default)]
    audit_log: Option<PathBuf>,
    #[serde(default)]
    audit_socket: Option<PathBuf>,
    #[serde(default)]
    audit_origin: Option<String>,
    #[serde(default)]
    bundle_keys: Vec<PathBuf>,
    #[serde(default)]
    session_ttl: Option<String>,
    #[serde(default)]
    nonce_lifetime: Option<String>,
    #[serde(default)]
    provider_name: Option<String>,
    #[serde(default)]
    master_key_tpm: Option<String>,
    #[serde(default)]
    require_ek: Option<bool>,
    #[serde(default)]
    log_format: Option<ops::logging::LogFormat>,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    tls: Option<RawTls>,
    #[serde(default)]
    unix: Option<RawUnix>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnix {
    socket: PathBuf,
    #[serde(default)]
    roles: BTreeMap<String, String>,
}

/// What is wrong with a configuration, and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A mistake in the file at `path`.
    #[error("{}: {source}", path.display())]
    In {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("{what} = {value:?}: {source}")]
    Duration {
        what: &'static str,
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
    #[error("provider_name {0:?}: letters, digits, - _ .")]
    ProviderName(String),
    #[error("give audit_log or audit_socket, not both")]
    TwoAuditTargets,
    #[error("audit_origin names this broker's own audit log; an audit daemon (audit_socket) has its own origin")]
    OriginWithSocket,
    #[error("audit_origin = {0:?}: letters, digits and - _ . / : (a C2SP note origin)")]
    AuditOrigin(String),
    #[error("tls.listen = {value:?}: {source}")]
    Listen {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
    #[error("unix.roles: {0:?} is not a numeric uid")]
    Uid(String),
    #[error("unix.roles: role {role:?} for uid {uid} (admin, publisher or auditor; IPUs attest over TLS)")]
    UnixRole { role: String, uid: u32 },
    #[error("nothing to serve: configure [tls], [unix] or both")]
    NothingToServe,
    #[error("store: {0}")]
    Store(String),
    #[error("metrics_listen = {value:?}: {message}")]
    MetricsListen { value: String, message: String },
}

#[derive(Clone, Debug)]
pub struct TlsListener {
    pub listen: std::net::SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Clone, Debug)]
pub struct UnixListener {
    pub socket: PathBuf,
    /// uid -> role, beyond root and the broker's own uid (admin).
    pub roles: BTreeMap<u32, String>,
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub broker: BrokerOptions,
    pub audit: AuditTarget,
    pub tls: Option<TlsListener>,
    pub unix: Option<UnixListener>,
    /// Text (default) or JSON log lines.
    pub log_format: ops::logging::LogFormat,
    /// Where `/metrics` is served, if anywhere (loopback or a Unix socket).
    pub metrics_listen: Option<ops::metrics::MetricsListen>,
}

pub const ROLES: [&str; 4] = ["admin", "publisher", "ipu", "auditor"];

fn duration(
    what: &'static str,
    v: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|source| ConfigError::Duration {
                what,
                value: s.to_string(),
                source,
            })
            .and_then(|d| {
                if d.is_zero() {
                    Err(ConfigError::ZeroDuration(what))
                } else {
                    Ok(d)
                }
            }),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(|e| ConfigError::In {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: Raw = toml::from_str(text)?;
        let at = |p: &Path| base.join(p);
        let mut broker = BrokerOptions::new(at(&raw.state_dir));
        broker.bundle_keys = raw.bundle_keys.iter().map(|p| at(p)).collect();
        broker.session_ttl = duration(
            "session_ttl",
            raw.session_ttl.as_deref(),
            broker.session_ttl,
        )?;
        broker.nonce_lifetime = duration(
            "nonce_lifetime",
            raw.nonce_lifetime.as_deref(),
            broker.nonce_lifetime,
        )?;
        if let Some(name) = raw.provider_name {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(ConfigError::ProviderName(name));
            }
            broker.provider_name = name;
        }
        broker.master_key_tpm = raw.master_key_tpm;
        if let Some(store) = raw.store {
            broker.store = store.parse().map_err(ConfigError::Store)?;
        }
        if let Some(r) = raw.require_ek {
            broker.require_ek = r;
        }
        if let Some(origin) = &raw.audit_origin {
            if origin.is_empty()
                || !origin
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
            {
                return Err(ConfigError::AuditOrigin(origin.clone()));
            }
        }
        let dir = |d: PathBuf| AuditTarget::Dir {
            dir: d,
            origin: raw.audit_origin.clone(),
            signer: None,
        };
        let audit = match (raw.audit_log, raw.audit_socket) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoAuditTargets),
            (None, Some(_)) if raw.audit_origin.is_some() => {
                return Err(ConfigError::OriginWithSocket)
            }
            (Some(d), None) => dir(at(&d)),
            (None, Some(s)) => AuditTarget::Socket(at(&s)),
            (None, None) => dir(crate::broker::default_audit_dir(&broker.state_dir)),
        };
        let tls = match raw.tls {
            None => None,
            Some(t) => Some(TlsListener {
                listen: t.listen.parse().map_err(|source| ConfigError::Listen {
                    value: t.listen.clone(),
                    source,
                })?,
                cert: at(&t.cert),
                key: at(&t.key),
                client_ca: at(&t.client_ca),
            }),
        };
        let unix = match raw.unix {
            None => None,
            Some(u) => {
                let mut roles = BTreeMap::new();
                for (uid, role) in u.roles {
                    let uid: u32 = uid.parse().map_err(|_| ConfigError::Uid(uid.clone()))?;
                    if !ROLES.contains(&role.as_str()) || role == "ipu" {
                        return Err(ConfigError::UnixRole { role, uid });
                    }
                    roles.insert(uid, role);
                }
                Some(UnixListener {
                    socket: at(&u.socket),
                    roles,
                })
            }
        };
        if tls.is_none() && unix.is_none() {
            return Err(ConfigError::NothingToServe);
        }
        let metrics_listen = match raw.metrics_listen {
            None => None,
            Some(value) => Some(
                value
                    .parse()
                    .map_err(|message| ConfigError::MetricsListen {
                        value: value.clone(),
                        message,
                    })?,
            ),
        };
        Ok(Self {
            broker,
            audit,
            tls,
            unix,
            log_format: raw.log_format.unwrap_or_default(),
            metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_resolves_paths() {
        let c = Config::parse(
            r#"
state_dir = "state"
bundle_keys = ["signer.pub"]
session_ttl = "2m"
[tls]
listen = "127.0.0.1:8443"
cert = "s.pem"
key = "s.key"
client_ca = "/etc/ca.pem"
[unix]
socket = "kb.sock"
roles = { "1000" = "publisher" }
"#,
            Path::new("/etc/kb"),
        )
        .unwrap();
        assert_eq!(c.broker.state_dir, Path::new("/etc/kb/state"));
        assert_eq!(c.broker.session_ttl, Duration::from_secs(120));
        assert_eq!(c.audit, AuditTarget::dir("/etc/kb/state/audit"));
        let tls = c.tls.unwrap();
        assert_eq!(tls.client_ca, Path::new("/etc/ca.pem"));
        assert_eq!(c.unix.unwrap().roles[&1000], "publisher");
    }

    /// The example the keybroker package ships (and keybroker.service starts with, once
    /// copied to /etc/keybroker/keybroker.toml) is a valid configuration.
    #[test]
    fn the_packaged_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/keybroker.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.broker.state_dir, Path::new("/var/lib/keybroker"));
        assert_eq!(
            c.unix.unwrap().socket,
            Path::new("/run/keybroker/keybroker.sock")
        );
        assert_eq!(c.tls.unwrap().listen.port(), 8443);
        assert!(c.metrics_listen.is_some());
    }

    #[test]
    fn mistakes_are_refused_with_their_place() {
        let cases = [
            ("state_dir = \"s\"\n[unix]\nsocket = \"x\"\nrolez = {}\n", "rolez"),
            ("state_dir = \"s\"\n", "nothing to serve"),
            ("state_dir = \"s\"\nstore = \"mysql://x\"\n[unix]\nsocket = \"x\"\n", "postgres:// URL"),
            ("state_dir = \"s\"\nsession_ttl = \"soon\"\n[unix]\nsocket = \"x\"\n", "session_ttl"),
            ("state_dir = \"s\"\n[unix]\nsocket = \"x\"\nroles = { \"1000\" = \"ipu\" }\n", "IPUs attest over TLS"),
            ("state_dir = \"s\"\n[unix]\nsocket = \"x\"\nroles = { \"bob\" = \"admin\" }\n", "numeric uid"),
            ("state_dir = \"s\"\n[tls]\nlisten = \"nowhere\"\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"a\"\n", "tls.listen"),
            ("state_dir = \"s\"\naudit_log = \"a\"\naudit_socket = \"b\"\n[unix]\nsocket = \"x\"\n", "not both"),
            ("state_dir = \"s\"\naudit_socket = \"b\"\naudit_origin = \"kb/1\"\n[unix]\nsocket = \"x\"\n", "has its own origin"),
            ("state_dir = \"s\"\naudit_origin = \"kb 1\"\n[unix]\nsocket = \"x\"\n", "audit_origin = \"kb 1\""),
        ];
        for (text, want) in cases {
            let e = Config::parse(text, Path::new("/")).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn each_replica_names_its_own_audit_log() {
        let c = Config::parse(
            "state_dir = \"s\"\naudit_origin = \"keybroker/kb-2\"\n[unix]\nsocket = \"x\"\n",
            Path::new("/etc/kb"),
        )
        .unwrap();
        assert_eq!(
            c.audit,
            AuditTarget::Dir {
                dir: "/etc/kb/s/audit".into(),
                origin: Some("keybroker/kb-2".into()),
                signer: None,
            }
        );
    }
}
