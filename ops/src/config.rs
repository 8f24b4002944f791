//! Strict TOML configuration files: unknown keys and wrong types are refused with the file,
//! line and column of the mistake (`serve.toml:3:1: unknown field ...`), so a typo never
//! silently changes a daemon's setup.
//!
//! A daemon describes its file with a `#[serde(deny_unknown_fields)]` struct whose fields
//! are all optional (a flag given on the command line overrides the file's value, and a
//! built-in default applies when neither names it), parses it with [`load`] and prints the
//! effective configuration with [`render`]. Values that need checking beyond their TOML type
//! (durations, sizes, addresses) are checked while the file is read, with [`duration`] and
//! friends as `deserialize_with`, so their errors carry the value's position too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What is wrong with a configuration file, and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `file:line:column: message` (the position is 1-based; absent for a file-wide error).
    #[error("{}{}: {message}", path.display(), position.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        position: Option<(usize, usize)>,
        message: String,
    },
}

impl ConfigError {
    /// A mistake found after parsing (a combination of keys), for the file at `path`.
    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            position: None,
            message: message.into(),
        }
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
pub fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Parses `text` (read from `path`, which only names it in errors).
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        position: e.span().map(|s| position(text, s.start)),
        message: e.message().trim_end().to_string(),
    })
}

/// Reads and parses the file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// The file to read: the one named on the command line (it must exist), else `default` when
/// it exists, else none (flags and built-in defaults only).
pub fn choose(explicit: Option<&Path>, default: &Path) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => default.exists().then(|| default.to_path_buf()),
    }
}

/// A path from the file, taken relative to the file's directory (absolute ones unchanged).
pub fn relative_to(file: &Path, p: &Path) -> PathBuf {
    file.parent().unwrap_or(Path::new(".")).join(p)
}

/// The effective configuration as TOML (for `config check`): [`Secret`] values print as
/// `"<redacted>"`, everything else as it will be used.
pub fn render<T: Serialize>(effective: &T) -> String {
    toml::to_string(effective).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

/// A value that must never be printed (a password, key material): `config check`, `Debug`
/// and logs show `<redacted>`. Paths to key files are not secrets; what is in them is.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// `deserialize_with` for an optional humantime duration (`"15m"`, `"90s"`), not zero.
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    match humantime::parse_duration(&s) {
        Ok(v) if v.is_zero() => Err(serde::de::Error::custom(format!(
            "{s:?}: must be longer than zero"
        ))),
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(serde::de::Error::custom(format!(
            "{s:?} is not a duration (e.g. \"90s\", \"15m\", \"1h\"): {e}"
        ))),
    }
}

/// Serializes a duration as humantime text (`"15m"`).
pub fn show_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// `deserialize_with` for an optional value of a type parsed from a string (addresses,
/// enums with `FromStr`): the parse error is reported at the value.
pub fn from_str<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    s.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        name: Option<String>,
        count: Option<u32>,
        #[serde(default, deserialize_with = "duration")]
        ttl: Option<Duration>,
        password: Option<Secret>,
    }

    fn err(text: &str) -> String {
        parse::<File>(text, Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn mistakes_name_file_line_and_column() {
        let e = err("name = \"a\"\n\nnmae = \"b\"\n");
        assert!(
            e.starts_with("/etc/x.toml:3:1: unknown field `nmae`"),
            "{e}"
        );
        let e = err("name = \"a\"\ncount = \"three\"\n");
        assert!(
            e.starts_with("/etc/x.toml:2:9: invalid type: string"),
            "{e}"
        );
        let e = err("ttl = \"soon\"\n");
        assert!(
            e.starts_with("/etc/x.toml:1:7: \"soon\" is not a duration"),
            "{e}"
        );
        let e = err("ttl = \"0s\"\n");
        assert!(e.contains("longer than zero"), "{e}");
        let e = err("name = \n");
        assert!(e.starts_with("/etc/x.toml:1:"), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        let f: File = parse("password = \"hunter2\"\n", Path::new("x")).unwrap();
        let s = f.password.unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
        #[derive(Serialize)]
        struct Shown {
            password: Secret,
        }
        let text = render(&Shown { password: s });
        assert!(
            !text.contains("hunter2") && text.contains("<redacted>"),
            "{text}"
        );
    }

    #[test]
    fn positions_count_lines_and_characters() {
        assert_eq!(position("ab\ncd", 0), (1, 1));
        assert_eq!(position("ab\ncd", 4), (2, 2));
        assert_eq!(position("é = 1", 3), (1, 3));
    }
}
