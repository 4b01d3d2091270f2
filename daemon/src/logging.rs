//! `tracing` setup for the daemons: text or JSON lines on stderr.

use std::fmt;
use std::str::FromStr;

use tracing_subscriber::EnvFilter;

/// Output format of the log lines. Default: [`LogFormat::Text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (journald adds its own timestamps, we keep ours for plain terminals).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// A `--log-format` value that is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format `{0}`; use `text` or `json`")]
pub struct ParseLogFormatError(pub String);

impl FromStr for LogFormat {
    type Err = ParseLogFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(ParseLogFormatError(s.to_string())),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Swaps the filter of the installed subscriber.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Changes the running log filter (SIGHUP applies a new `log_level` through this).
pub struct LogControl {
    set: Option<SetFilter>,
}

impl LogControl {
    /// A control that changes nothing (tests, or a second `init`).
    pub fn inert() -> LogControl {
        LogControl { set: None }
    }

    /// Replace the filter with `directives` (e.g. `"info"` or `"info,coordinator=debug"`).
    /// An invalid filter is refused and the running one kept.
    pub fn set_filter(&self, directives: &str) -> Result<(), String> {
        let filter = parse_filter(directives)?;
        match &self.set {
            Some(set) => set(filter),
            None => Ok(()),
        }
    }
}

/// Check a filter such as `info,coordinator=debug`; the error says what is wrong.
pub fn parse_filter(directives: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(directives).map_err(|e| {
        format!("log level `{directives}` is not a valid filter ({e}); use e.g. info or info,coordinator=debug")
    })
}

/// Install the global `tracing` subscriber writing to stderr.
///
/// The filter is `RUST_LOG` when it is set and valid, otherwise `default_filter` (e.g. `"info"` or
/// `"info,coordinator=debug"`). An invalid `RUST_LOG` is reported as a warning once logging is up.
/// Calling this more than once is harmless: later calls leave the first subscriber in place and return
/// a control that changes nothing.
pub fn init(format: LogFormat, default_filter: &str) -> LogControl {
    let default = parse_filter(default_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, bad_env) = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => match EnvFilter::try_new(&value) {
            Ok(filter) => (filter, None),
            Err(err) => (default, Some((value, err.to_string()))),
        },
        _ => (default, None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into journald or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let set: Option<SetFilter> = match format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder
                .try_init()
                .ok()
                .map(|()| Box::new(move |f: EnvFilter| handle.reload(f).map_err(|e| e.to_string())) as Box<_>)
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder
                .try_init()
                .ok()
                .map(|()| Box::new(move |f: EnvFilter| handle.reload(f).map_err(|e| e.to_string())) as Box<_>)
        }
    };
    if set.is_some()
        && let Some((value, err)) = bad_env
    {
        tracing::warn!(
            rust_log = %value,
            error = %err,
            default = default_filter,
            "ignoring invalid RUST_LOG; using the default filter (fix RUST_LOG or unset it)"
        );
    }
    LogControl { set }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn parses_formats() {
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.to_string().contains("use `text` or `json`"), "{err}");
        assert_eq!(LogFormat::Json.to_string(), "json");
        assert_eq!(LogFormat::default(), LogFormat::Text);
    }

    #[test]
    fn init_twice_is_harmless() {
        init(LogFormat::Text, "info");
        init(LogFormat::Json, "debug");
        tracing::info!("still logging");
    }
}
