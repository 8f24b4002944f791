//! `audit serve`'s configuration file (TOML), default [`DEFAULT_CONFIG`] when it exists.
//! Every key is optional; a flag given on the command line overrides the file's value, and
//! the built-in default applies when neither names it (flags > file > defaults; a list given
//! as flags replaces the file's list). Relative paths in the file are taken from the file's
//! directory. Unknown keys and wrong types are refused with `file:line:column`.
//!
//! ```toml
//! log = "/var/lib/ipu-image-svc/audit"      # the log directory
//! signer = "/etc/ipu-audit/signer.key"      # checkpoint signing key (`audit keygen`)
//! origin = "ipu-audit/ipu-0042"             # the log's name in its checkpoints
//! writer_socket = "/run/ipu-audit/writer.sock"
//! query_socket = "/run/ipu-audit/query.sock"
//! writer_uids = [1000]                      # others that may append (root and own uid may)
//! log_format = "json"                       # or "text" (the default)
//! metrics_listen = "127.0.0.1:9465"         # or a Unix socket path; off when absent
//! ```

use std::path::{Path, PathBuf};

use ops::config::{self as file, ConfigError};
use ops::logging::LogFormat;
use ops::metrics::MetricsListen;
use serde::{Deserialize, Serialize};

/// Read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG: &str = "/etc/ipu-audit/serve.toml";
pub const DEFAULT_LOG: &str = "/var/lib/ipu-image-svc/audit";
pub const DEFAULT_WRITER_SOCKET: &str = "/run/ipu-audit/writer.sock";
pub const DEFAULT_QUERY_SOCKET: &str = "/run/ipu-audit/query.sock";

/// What the file, or the flags, say: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSettings {
    pub log: Option<PathBuf>,
    pub signer: Option<PathBuf>,
    pub origin: Option<String>,
    pub writer_socket: Option<PathBuf>,
    pub query_socket: Option<PathBuf>,
    pub writer_uids: Option<Vec<u32>>,
    pub log_format: Option<LogFormat>,
    #[serde(default, deserialize_with = "file::from_str")]
    pub metrics_listen: Option<MetricsListen>,
}

/// The configuration `audit serve` runs with.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServeConfig {
    pub log: PathBuf,
    pub signer: PathBuf,
    pub origin: String,
    pub writer_socket: PathBuf,
    pub query_socket: PathBuf,
    pub writer_uids: Vec<u32>,
    pub log_format: LogFormat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<MetricsListen>,
}

impl ServeSettings {
    /// The file's paths taken from its directory.
    fn relative_to(mut self, path: &Path) -> Self {
        let at = |p: &mut Option<PathBuf>| {
            if let Some(v) = p.as_mut() {
                *v = file::relative_to(path, v);
            }
        };
        at(&mut self.log);
        at(&mut self.signer);
        at(&mut self.writer_socket);
        at(&mut self.query_socket);
        if let Some(MetricsListen::Unix(p)) = self.metrics_listen.as_mut() {
            *p = file::relative_to(path, p);
        }
        self
    }

    /// These settings (the flags) over `file`'s.
    fn over(self, file: ServeSettings) -> ServeSettings {
        ServeSettings {
            log: self.log.or(file.log),
            signer: self.signer.or(file.signer),
            origin: self.origin.or(file.origin),
            writer_socket: self.writer_socket.or(file.writer_socket),
            query_socket: self.query_socket.or(file.query_socket),
            writer_uids: self.writer_uids.or(file.writer_uids),
            log_format: self.log_format.or(file.log_format),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
        }
    }
}

/// The effective configuration: `flags` over the file at `config` (if any) over the
/// defaults. `signer` and `origin` have no default.
pub fn effective(config: Option<&Path>, flags: ServeSettings) -> Result<ServeConfig, ConfigError> {
    let (from_file, name) = match config {
        Some(path) => (
            file::load::<ServeSettings>(path)?.relative_to(path),
            path.to_path_buf(),
        ),
        None => (ServeSettings::default(), PathBuf::from("(command line)")),
    };
    let s = flags.over(from_file);
    let missing = |key: &str| {
        ConfigError::invalid(
            &name,
            format!(
                "{key} is required (--{} or `{key} = ...`)",
                key.replace('_', "-")
            ),
        )
    };
    let origin = s.origin.ok_or_else(|| missing("origin"))?;
    if origin.is_empty() {
        return Err(ConfigError::invalid(&name, "origin must not be empty"));
    }
    Ok(ServeConfig {
        log: s.log.unwrap_or_else(|| DEFAULT_LOG.into()),
        signer: s.signer.ok_or_else(|| missing("signer"))?,
        origin,
        writer_socket: s
            .writer_socket
            .unwrap_or_else(|| DEFAULT_WRITER_SOCKET.into()),
        query_socket: s
            .query_socket
            .unwrap_or_else(|| DEFAULT_QUERY_SOCKET.into()),
        writer_uids: s.writer_uids.unwrap_or_default(),
        log_format: s.log_format.unwrap_or_default(),
        metrics_listen: s.metrics_listen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serve.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn file_values_with_relative_paths_and_defaults() {
        let (d, p) = write(
            "signer = \"keys/signer.key\"\norigin = \"o\"\nwriter_uids = [1000, 1001]\nlog_format = \"json\"\nmetrics_listen = \"127.0.0.1:9465\"\n",
        );
        let c = effective(Some(&p), ServeSettings::default()).unwrap();
        assert_eq!(c.signer, d.path().join("keys/signer.key"));
        assert_eq!(c.log, Path::new(DEFAULT_LOG));
        assert_eq!(c.writer_uids, [1000, 1001]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.metrics_listen,
            Some(MetricsListen::Tcp("127.0.0.1:9465".parse().unwrap()))
        );
    }

    #[test]
    fn flags_override_the_file() {
        let (_d, p) = write(
            "signer = \"/k\"\norigin = \"from-file\"\nwriter_uids = [1]\nlog_format = \"json\"\n",
        );
        let flags = ServeSettings {
            origin: Some("from-flag".into()),
            writer_uids: Some(vec![7]),
            log_format: Some(LogFormat::Text),
            ..ServeSettings::default()
        };
        let c = effective(Some(&p), flags).unwrap();
        assert_eq!(c.origin, "from-flag");
        assert_eq!(c.writer_uids, [7]);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.signer, Path::new("/k"));
    }

    #[test]
    fn mistakes_are_refused_with_their_position() {
        let cases = [
            (
                "origin = \"o\"\nsigner = \"/k\"\nwriter_uid = [1]\n",
                ":3:1: unknown field `writer_uid`",
            ),
            (
                "origin = \"o\"\nsigner = \"/k\"\nwriter_uids = \"1000\"\n",
                ":3:15: invalid type: string \"1000\", expected a sequence",
            ),
            (
                "origin = 5\n",
                ":1:10: invalid type: integer `5`, expected a string",
            ),
            ("log_format = \"xml\"\n", ":1:14: unknown variant `xml`"),
            (
                "metrics_listen = \"everywhere\"\n",
                ":1:18: \"everywhere\": not an IP:PORT",
            ),
            ("signer = \"/k\"\n", "origin is required"),
        ];
        for (text, want) in cases {
            let (_d, p) = write(text);
            let e = effective(Some(&p), ServeSettings::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&p.display().to_string()) && e.contains(want),
                "{text:?}: {e}"
            );
        }
    }
}
