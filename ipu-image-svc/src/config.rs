//! `ipu-image-svc serve`'s configuration file (TOML), default [`DEFAULT_CONFIG`] when it
//! exists. Every key is optional in the file; a flag given on the command line overrides the
//! file's value, and the built-in default applies when neither names it (flags > file >
//! defaults; a list given as flags, e.g. `--bundle-key`, replaces the file's list). Relative
//! paths in the file are taken from the file's directory. Unknown keys and wrong types are
//! refused with `file:line:column`. `docs/examples/ipu-image-svc.toml` lists every key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ops::config::{self as file, ConfigError};
use ops::logging::LogFormat;
use ops::metrics::MetricsListen;
use serde::{Deserialize, Deserializer, Serialize};

use crate::export::ExportKind;

/// Read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG: &str = "/etc/ipu-image-svc/serve.toml";

/// What the file, or the flags, say: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub host_agent_uid: Option<u32>,
    #[serde(default, deserialize_with = "file::duration")]
    pub clone_ttl: Option<Duration>,
    pub max_cached_bases: Option<usize>,
    #[serde(default, deserialize_with = "size")]
    pub spool_memory: Option<u64>,
    #[serde(default, deserialize_with = "size")]
    pub hook_prefetch: Option<u64>,
    #[serde(default, deserialize_with = "file::duration")]
    pub verified_layer_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "file::from_str")]
    pub export: Option<ExportKind>,
    pub vhost_queues: Option<u16>,
    pub policy_bundle: Option<PathBuf>,
    pub bundle_keys: Option<Vec<PathBuf>>,
    pub bundle_state: Option<PathBuf>,
    pub cache: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub audit_socket: Option<PathBuf>,
    pub insecure_http: Option<Vec<String>>,
    pub log_format: Option<LogFormat>,
    #[serde(default, deserialize_with = "file::from_str")]
    pub metrics_listen: Option<MetricsListen>,
    #[serde(default)]
    pub export_tcp: ExportTcpSettings,
    #[serde(default)]
    pub broker: BrokerFileSettings,
}

/// `[export_tcp]`: exports over TCP with NBD STARTTLS and client certificates.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportTcpSettings {
    #[serde(default, deserialize_with = "file::from_str")]
    pub ip: Option<IpAddr>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

/// `[broker]`: the key broker and this IPU's TPM.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFileSettings {
    /// One broker (`url = "..."`), or the first of `urls`; give one of the two.
    pub url: Option<String>,
    /// The broker's replicas, in the order they are tried.
    pub urls: Option<Vec<String>>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub name: Option<String>,
    pub provider_name: Option<String>,
    pub tpm: Option<String>,
    pub ak_handle: Option<u32>,
    #[serde(default, deserialize_with = "file::duration")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "file::duration")]
    pub request_timeout: Option<Duration>,
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    policy::deploy::parse_size(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// The configuration `serve` runs with (printed by `config check`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServeConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub host_agent_uid: u32,
    #[serde(serialize_with = "file::show_duration")]
    pub clone_ttl: Duration,
    pub max_cached_bases: usize,
    pub spool_memory: u64,
    pub hook_prefetch: u64,
    #[serde(serialize_with = "file::show_duration")]
    pub verified_layer_ttl: Duration,
    #[serde(serialize_with = "show")]
    pub export: ExportKind,
    pub vhost_queues: u16,
    pub policy_bundle: PathBuf,
    pub bundle_keys: Vec<PathBuf>,
    pub bundle_state: PathBuf,
    pub cache: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_socket: Option<PathBuf>,
    pub insecure_http: Vec<String>,
    pub log_format: LogFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<MetricsListen>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_tcp: Option<ExportTcp>,
    pub broker: Broker,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExportTcp {
    pub ip: IpAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Broker {
    /// The replicas, in the order they are tried.
    pub urls: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    /// A path: the key itself is never read into the configuration.
    pub key: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub provider_name: String,
    pub tpm: String,
    pub ak_handle: u32,
    #[serde(serialize_with = "file::show_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "file::show_duration")]
    pub request_timeout: Duration,
}

fn show<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl ServeSettings {
    /// The file's paths taken from its directory.
    fn relative_to(mut self, path: &Path) -> Self {
        let at = |p: &mut Option<PathBuf>| {
            if let Some(v) = p.as_mut() {
                *v = file::relative_to(path, v);
            }
        };
        for p in [
            &mut self.state_dir,
            &mut self.socket,
            &mut self.policy_bundle,
            &mut self.bundle_state,
            &mut self.cache,
            &mut self.audit_log,
            &mut self.audit_socket,
            &mut self.export_tcp.cert,
            &mut self.export_tcp.key,
            &mut self.export_tcp.client_ca,
            &mut self.broker.ca,
            &mut self.broker.cert,
            &mut self.broker.key,
        ] {
            at(p);
        }
        if let Some(keys) = self.bundle_keys.as_mut() {
            for k in keys {
                *k = file::relative_to(path, k);
            }
        }
        if let Some(MetricsListen::Unix(p)) = self.metrics_listen.as_mut() {
            *p = file::relative_to(path, p);
        }
        self
    }

    /// These settings (the flags) over `file`'s.
    fn over(self, f: ServeSettings) -> ServeSettings {
        let (t, b) = (self.export_tcp, self.broker);
        // The flags' URLs (one or several) replace the file's list, whichever key it used.
        let (url, urls) = if b.url.is_some() || b.urls.is_some() {
            (b.url, b.urls)
        } else {
            (f.broker.url, f.broker.urls)
        };
        // The two audit targets are one choice: a flag for either replaces the file's.
        let (audit_log, audit_socket) = match (self.audit_log, self.audit_socket) {
            (None, None) => (f.audit_log, f.audit_socket),
            flags => flags,
        };
        ServeSettings {
            state_dir: self.state_dir.or(f.state_dir),
            socket: self.socket.or(f.socket),
            host_agent_uid: self.host_agent_uid.or(f.host_agent_uid),
            clone_ttl: self.clone_ttl.or(f.clone_ttl),
            max_cached_bases: self.max_cached_bases.or(f.max_cached_bases),
            spool_memory: self.spool_memory.or(f.spool_memory),
            hook_prefetch: self.hook_prefetch.or(f.hook_prefetch),
            verified_layer_ttl: self.verified_layer_ttl.or(f.verified_layer_ttl),
            export: self.export.or(f.export),
            vhost_queues: self.vhost_queues.or(f.vhost_queues),
            policy_bundle: self.policy_bundle.or(f.policy_bundle),
            bundle_keys: self.bundle_keys.or(f.bundle_keys),
            bundle_state: self.bundle_state.or(f.bundle_state),
            cache: self.cache.or(f.cache),
            audit_log,
            audit_socket,
            insecure_http: self.insecure_http.or(f.insecure_http),
            log_format: self.log_format.or(f.log_format),
            metrics_listen: self.metrics_listen.or(f.metrics_listen),
            export_tcp: ExportTcpSettings {
                ip: t.ip.or(f.export_tcp.ip),
                cert: t.cert.or(f.export_tcp.cert),
                key: t.key.or(f.export_tcp.key),
                client_ca: t.client_ca.or(f.export_tcp.client_ca),
            },
            broker: BrokerFileSettings {
                url,
                urls,
                ca: b.ca.or(f.broker.ca),
                cert: b.cert.or(f.broker.cert),
                key: b.key.or(f.broker.key),
                name: b.name.or(f.broker.name),
                provider_name: b.provider_name.or(f.broker.provider_name),
                tpm: b.tpm.or(f.broker.tpm),
                ak_handle: b.ak_handle.or(f.broker.ak_handle),
                connect_timeout: b.connect_timeout.or(f.broker.connect_timeout),
                request_timeout: b.request_timeout.or(f.broker.request_timeout),
            },
        }
    }
}

/// The effective configuration: `flags` over the file at `config` (if any) over the
/// defaults. Checks what the file's types cannot: required keys, ranges, combinations.
pub fn effective(config: Option<&Path>, flags: ServeSettings) -> Result<ServeConfig, ConfigError> {
    let (from_file, name) = match config {
        Some(path) => (
            file::load::<ServeSettings>(path)?.relative_to(path),
            path.to_path_buf(),
        ),
        None => (ServeSettings::default(), PathBuf::from("(command line)")),
    };
    let s = flags.over(from_file);
    let invalid = |m: String| ConfigError::invalid(&name, m);
    let missing =
        |key: &str, flag: &str| invalid(format!("{key} is required ({flag} or `{key} = ...`)"));
    let vhost_queues = s.vhost_queues.unwrap_or(2);
    if !(1..=16).contains(&vhost_queues) {
        return Err(invalid(format!("vhost_queues = {vhost_queues}: 1 to 16")));
    }
    if s.audit_log.is_some() && s.audit_socket.is_some() {
        return Err(invalid("audit_log and audit_socket: give one".into()));
    }
    let t = s.export_tcp;
    let export_tcp = match (t.ip, t.cert, t.key, t.client_ca) {
        (None, None, None, None) => None,
        (Some(ip), Some(cert), Some(key), Some(client_ca)) => Some(ExportTcp {
            ip,
            cert,
            key,
            client_ca,
        }),
        _ => {
            return Err(invalid(
                "export_tcp needs ip, cert, key and client_ca together (--export-tcp, --export-cert, --export-key, --export-client-ca)".into(),
            ))
        }
    };
    let b = s.broker;
    let urls = match (b.url, b.urls) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "broker.url and broker.urls: give one (urls lists every replica)".into(),
            ))
        }
        (Some(url), None) => vec![url],
        (None, Some(urls)) => urls,
        (None, None) => Vec::new(),
    };
    if urls.is_empty() {
        return Err(invalid("broker.urls is required (--broker URL, repeatable, or `[broker] urls = [...]`): layer keys come from the attested key broker".into()));
    }
    for (i, url) in urls.iter().enumerate() {
        if urls[..i].contains(url) {
            return Err(invalid(format!("broker.urls names {url} twice")));
        }
    }
    let timeout = |d: Option<Duration>, default: Duration, key: &str| match d {
        Some(d) if d.is_zero() => Err(invalid(format!("broker.{key} must be longer than zero"))),
        d => Ok(d.unwrap_or(default)),
    };
    let connect_timeout = timeout(
        b.connect_timeout,
        crate::keys::broker_client::DEFAULT_CONNECT_TIMEOUT,
        "connect_timeout",
    )?;
    let request_timeout = timeout(
        b.request_timeout,
        crate::keys::broker_client::DEFAULT_REQUEST_TIMEOUT,
        "request_timeout",
    )?;
    let ak_handle = b.ak_handle.unwrap_or(0x8101_0010);
    if !(0x8100_0000..=0x81ff_ffff).contains(&ak_handle) {
        return Err(invalid(format!(
            "broker.ak_handle = {ak_handle:#x}: not a persistent handle (0x81000000-0x81ffffff)"
        )));
    }
    let broker = Broker {
        ca: b.ca.ok_or_else(|| missing("broker.ca", "--broker-ca"))?,
        cert: b
            .cert
            .ok_or_else(|| missing("broker.cert", "--broker-cert"))?,
        key: b.key.ok_or_else(|| missing("broker.key", "--broker-key"))?,
        urls,
        name: b.name,
        provider_name: b
            .provider_name
            .unwrap_or_else(|| broker_protocol::DEFAULT_PROVIDER_NAME.into()),
        tpm: b.tpm.unwrap_or_else(|| "device:/dev/tpmrm0".into()),
        ak_handle,
        connect_timeout,
        request_timeout,
    };
    let bundle_keys = s.bundle_keys.unwrap_or_default();
    if bundle_keys.is_empty() {
        return Err(missing("bundle_keys", "--bundle-key"));
    }
    Ok(ServeConfig {
        state_dir: s
            .state_dir
            .unwrap_or_else(|| "/var/lib/ipu-image-svc/state".into()),
        socket: s
            .socket
            .unwrap_or_else(|| "/run/ipu-image-svc/api.sock".into()),
        host_agent_uid: s.host_agent_uid.unwrap_or(0),
        clone_ttl: s.clone_ttl.unwrap_or(Duration::from_secs(15 * 60)),
        max_cached_bases: s.max_cached_bases.unwrap_or(16),
        spool_memory: s
            .spool_memory
            .unwrap_or(crate::service::spool::DEFAULT_SPOOL_MEMORY),
        hook_prefetch: s
            .hook_prefetch
            .unwrap_or(crate::service::prefetch::DEFAULT_PREFETCH_LIMIT),
        verified_layer_ttl: s.verified_layer_ttl.unwrap_or(Duration::from_secs(15 * 60)),
        export: s.export.unwrap_or_default(),
        vhost_queues,
        policy_bundle: s
            .policy_bundle
            .ok_or_else(|| missing("policy_bundle", "--policy-bundle"))?,
        bundle_keys,
        bundle_state: s
            .bundle_state
            .unwrap_or_else(|| "/var/lib/ipu-image-svc/policy".into()),
        cache: s
            .cache
            .unwrap_or_else(|| "/var/lib/ipu-image-svc/blobs".into()),
        audit_log: match &s.audit_socket {
            Some(_) => None,
            None => Some(
                s.audit_log
                    .unwrap_or_else(|| "/var/lib/ipu-image-svc/audit".into()),
            ),
        },
        audit_socket: s.audit_socket,
        insecure_http: s.insecure_http.unwrap_or_default(),
        log_format: s.log_format.unwrap_or_default(),
        metrics_listen: s.metrics_listen,
        export_tcp,
        broker,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "policy_bundle = \"bundle.json\"\nbundle_keys = [\"signer.pub\"]\n\n[broker]\nurl = \"https://broker:8443\"\nca = \"ca.pem\"\ncert = \"ipu.pem\"\nkey = \"ipu.key\"\n";

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serve.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn minimal_file_with_defaults_and_relative_paths() {
        let (d, p) = write(MINIMAL);
        let c = effective(Some(&p), ServeSettings::default()).unwrap();
        assert_eq!(c.policy_bundle, d.path().join("bundle.json"));
        assert_eq!(c.bundle_keys, [d.path().join("signer.pub")]);
        assert_eq!(c.broker.key, d.path().join("ipu.key"));
        assert_eq!(c.clone_ttl, Duration::from_secs(900));
        assert_eq!(
            c.audit_log.as_deref(),
            Some(Path::new("/var/lib/ipu-image-svc/audit"))
        );
        assert_eq!(c.broker.ak_handle, 0x8101_0010);
        assert_eq!(c.log_format, LogFormat::Text);
        // The broker key is a path: printed as one, never read.
        assert!(ops::config::render(&c).contains("ipu.key"));
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, p) = write(&format!(
            "clone_ttl = \"1h\"\nlog_format = \"json\"\naudit_log = \"/a\"\nmetrics_listen = \"127.0.0.1:9464\"\n{MINIMAL}"
        ));
        let flags = ServeSettings {
            clone_ttl: Some(Duration::from_secs(60)),
            log_format: Some(LogFormat::Text),
            audit_socket: Some("/run/w.sock".into()),
            bundle_keys: Some(vec!["/k1".into(), "/k2".into()]),
            broker: BrokerFileSettings {
                url: Some("https://other:1".into()),
                ..Default::default()
            },
            ..ServeSettings::default()
        };
        let c = effective(Some(&p), flags).unwrap();
        assert_eq!(c.clone_ttl, Duration::from_secs(60));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.audit_socket.as_deref(), Some(Path::new("/run/w.sock")));
        assert_eq!(
            c.audit_log, None,
            "the flag's audit target replaces the file's"
        );
        assert_eq!(c.bundle_keys, [Path::new("/k1"), Path::new("/k2")]);
        assert_eq!(c.broker.urls, ["https://other:1"]);
        assert!(
            c.broker.ca.ends_with("ca.pem"),
            "the file's other broker keys stay"
        );
        assert_eq!(
            c.metrics_listen,
            Some(MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap()))
        );
    }

    #[test]
    fn mistakes_are_refused_with_their_position() {
        let cases = [
            (
                format!("clone_tll = \"1h\"\n{MINIMAL}"),
                ":1:1: unknown field `clone_tll`",
            ),
            (
                format!("{MINIMAL}tmp = \"x\"\n"),
                ":9:1: unknown field `tmp`",
            ),
            (
                format!("max_cached_bases = \"16\"\n{MINIMAL}"),
                ":1:20: invalid type: string \"16\", expected usize",
            ),
            (
                format!("host_agent_uid = -1\n{MINIMAL}"),
                ":1:18: invalid value: integer `-1`",
            ),
            (
                format!("clone_ttl = \"forever\"\n{MINIMAL}"),
                ":1:13: \"forever\" is not a duration",
            ),
            (
                format!("spool_memory = \"lots\"\n{MINIMAL}"),
                ":1:16: \"lots\"",
            ),
            (format!("export = \"iscsi\"\n{MINIMAL}"), ":1:10: \"iscsi\""),
            (
                format!("log_format = \"xml\"\n{MINIMAL}"),
                ":1:14: unknown variant `xml`",
            ),
            (
                format!("{MINIMAL}[export_tcp]\nip = \"nowhere\"\n"),
                ":10:6: \"nowhere\"",
            ),
            (
                format!("vhost_queues = 17\n{MINIMAL}"),
                "vhost_queues = 17: 1 to 16",
            ),
            (
                format!("{MINIMAL}[export_tcp]\nip = \"10.0.0.1\"\n"),
                "export_tcp needs ip, cert, key and client_ca",
            ),
            (
                "bundle_keys = [\"k\"]\npolicy_bundle = \"b\"\n".to_string(),
                "broker.urls is required",
            ),
            (
                format!("{MINIMAL}urls = [\"https://b:1\"]\n"),
                "broker.url and broker.urls: give one",
            ),
            (
                MINIMAL.replace(
                    "url = \"https://broker:8443\"",
                    "urls = [\"https://a:1\", \"https://b:1\", \"https://a:1\"]",
                ),
                "broker.urls names https://a:1 twice",
            ),
            (
                MINIMAL.replace("url = \"https://broker:8443\"", "urls = []"),
                "broker.urls is required",
            ),
            (
                format!("{MINIMAL}request_timeout = \"0s\"\n"),
                ":9:19: \"0s\": must be longer than zero",
            ),
            (
                format!("{MINIMAL}connect_timeout = \"soon\"\n"),
                ":9:19: \"soon\" is not a duration",
            ),
        ];
        for (text, want) in cases {
            let (_d, p) = write(&text);
            let e = effective(Some(&p), ServeSettings::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&p.display().to_string()) && e.contains(want),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn several_broker_replicas_from_the_file_or_the_flags() {
        let (_d, p) = write(&MINIMAL.replace(
            "url = \"https://broker:8443\"",
            "urls = [\"https://kb-1:8443\", \"https://kb-2:8443\"]\nconnect_timeout = \"2s\"",
        ));
        let c = effective(Some(&p), ServeSettings::default()).unwrap();
        assert_eq!(c.broker.urls, ["https://kb-1:8443", "https://kb-2:8443"]);
        assert_eq!(c.broker.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.broker.request_timeout, Duration::from_secs(30));
        let shown = ops::config::render(&c);
        assert!(
            shown.contains("urls = [\"https://kb-1:8443\", \"https://kb-2:8443\"]"),
            "{shown}"
        );
        // `url` still works, as a list of one.
        let (_d1, p1) = write(MINIMAL);
        let one = effective(Some(&p1), ServeSettings::default()).unwrap();
        assert_eq!(one.broker.urls, ["https://broker:8443"]);
        assert_eq!(one.broker.connect_timeout, Duration::from_secs(10));
        // Repeated --broker flags replace the file's list, whichever key it used.
        for file in [&p, &p1] {
            let flags = ServeSettings {
                broker: BrokerFileSettings {
                    urls: Some(vec!["https://x:1".into(), "https://y:1".into()]),
                    ..Default::default()
                },
                ..ServeSettings::default()
            };
            let c = effective(Some(file), flags).unwrap();
            assert_eq!(c.broker.urls, ["https://x:1", "https://y:1"]);
        }
    }
}
