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
    init_with(format, env_var, default_filter, None);
}

/// As [`init`], with `timings` collecting the stage spans (whatever the log filter says:
/// the filter applies to the log output only).
pub fn init_with(
    format: LogFormat,
    env_var: &str,
    default_filter: &str,
    timings: Option<crate::timings::TimingsLayer>,
) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer as _;
    let filter = std::env::var(env_var).unwrap_or_else(|_| default_filter.to_string());
    let filter = tracing_subscriber::EnvFilter::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_filter(filter)
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry()
        .with(fmt)
        .with(timings.map(crate::timings::TimingsLayer::filtered));
    let _ = tracing::subscriber::set_global_default(subscriber);
}
