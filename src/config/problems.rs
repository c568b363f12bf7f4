//! The collector every section's validation adds to, and the checks they share: one bad value
//! is reported with its key and validation goes on, so that every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;

use super::units::{parse_duration, parse_size};
use super::Problem;

/// Every problem found so far. Each section's `validate` adds to it and returns its best reading
/// of the section (defaults in place of bad values), so later checks still run.
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        value: &Option<String>,
        default: Duration,
    ) -> Duration {
        let Some(text) = value else { return default };
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.add(key, format!("`{text}`: must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.add(key, format!("`{text}`: {e}"));
                default
            }
        }
    }

    pub(super) fn size(&mut self, key: &str, value: &Option<String>, default: u64) -> u64 {
        let Some(text) = value else { return default };
        match parse_size(text) {
            Ok(0) => {
                self.add(key, format!("`{text}`: must be greater than zero"));
                default
            }
            Ok(n) => n,
            Err(e) => {
                self.add(key, format!("`{text}`: {e}"));
                default
            }
        }
    }

    pub(super) fn count(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let Some(n) = value else { return default };
        if n < min as i64 || n as u64 > max {
            self.add(key, format!("`{n}`: must be between {min} and {max}"));
            return default;
        }
        n as u64
    }

    pub(super) fn status(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: StatusCode,
    ) -> StatusCode {
        let Some(n) = value else { return default };
        match u16::try_from(n)
            .ok()
            .and_then(|n| StatusCode::from_u16(n).ok())
        {
            Some(s) if (200..600).contains(&s.as_u16()) => s,
            _ => {
                self.add(
                    key,
                    format!("`{n}`: not an HTTP status between 200 and 599"),
                );
                default
            }
        }
    }

    pub(super) fn addr(&mut self, key: &str, value: &Option<String>, default: &str) -> SocketAddr {
        let text = value.as_deref().unwrap_or(default);
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.add(
                    key,
                    format!(
                        "`{text}`: not a socket address (write e.g. `0.0.0.0:8080` or `[::]:8080`)"
                    ),
                );
                default.parse().expect("default address parses")
            }
        }
    }

    pub(super) fn json(&mut self, key: &str, text: &str) {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
            self.add(key, format!("`{}`: not valid JSON ({e})", shorten(text)));
        }
    }
}

fn shorten(text: &str) -> String {
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text.to_string()
    }
}

/// A file path from the config; `None` (with a problem) when it is empty or is clearly PEM
/// content pasted in place of a path, which is never echoed: it may be a private key.
pub(super) fn path_value(p: &mut Problems, key: &str, value: &str) -> Option<PathBuf> {
    if value.contains("-----BEGIN") || value.contains('\n') {
        p.add(
            key,
            "must be the path of a PEM file, not its content (the value is not shown)",
        );
        return None;
    }
    if value.trim().is_empty() {
        p.add(key, "empty: give the path of a PEM file");
        return None;
    }
    Some(PathBuf::from(value))
}
