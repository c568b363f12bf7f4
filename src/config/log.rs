//! `log:`: the format and filter of the log lines.

use super::problems::Problems;
use super::raw::RawLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
    /// JSON unless stdout is a terminal.
    Auto,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

pub(super) fn validate(p: &mut Problems, l: &RawLog) -> LogConfig {
    LogConfig {
        format: match l.format.as_deref() {
            None | Some("auto") => LogFormat::Auto,
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                p.add(
                    "log.format",
                    format!("`{other}`: must be json, text or auto"),
                );
                LogFormat::Auto
            }
        },
        level: match l.level.as_deref() {
            None => "info".into(),
            Some(l) => {
                if tracing_subscriber::EnvFilter::try_new(l).is_err() {
                    p.add(
                        "log.level",
                        format!("`{l}`: not a level or filter (e.g. `info`, `breakwater=debug`)"),
                    );
                }
                l.to_string()
            }
        },
    }
}
