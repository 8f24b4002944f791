//! Log output on stderr: human-readable text (the default) or one JSON object per line with
//! the same fields (`timestamp`, `level`, `target`, `fields.message` and the event's other
//! fields, and the spans), for log collectors. The filter comes from an environment
//! variable, else the daemon's default.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: text or json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Installs the global subscriber writing to stderr (once; later calls do nothing). The
/// filter is `$env_var` when set, else `default_filter` (`EnvFilter` syntax).
pub fn init(format: LogFormat, env_var: &str, default_filter: &str) {
    let filter = std::env::var(env_var).unwrap_or_else(|_| default_filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
