//! Configuration: one YAML file, environment overrides (`BREAKWATER__SECTION__KEY`), strict
//! validation that reports every problem with the key and the bad value.
//!
//! A [`Config`] is plain data: values, file paths, names of environment variables. Validation
//! reads nothing but the text and the environment overrides; the files and secrets a
//! configuration names are read by [`crate::prepare`] when the gateway starts, is checked or
//! reloads. Each section's types and checks live in the module named after it.

mod admin;
mod auth;
mod cidr;
mod describe;
mod env;
mod keys;
mod log;
mod problems;
mod raw;
mod restart;
mod route;
mod server;
pub mod units;
mod upstream;
mod validate;
mod warnings;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use admin::AdminConfig;
pub use auth::{ApiKeysConfig, AuthConfig, AuthOrigin, BasicConfig, SecretSource};
pub use cidr::Cidr;
pub use describe::{describe, redact_url, redact_url_text};
pub use env::EnvSources;
pub use log::{LogConfig, LogFormat};
pub use restart::{in_force, PendingRestart, RESTART_KEYS};
pub use route::{
    Concurrency, FallbackConfig, OverloadConfig, QueueConfig, RetryConfig, RouteConfig,
};
pub use server::{ServerConfig, ServerTlsConfig};
pub use upstream::{
    Balance, CircuitConfig, DiscoveryConfig, EndpointConfig, PoolConfig, UpstreamConfig,
    UpstreamTlsConfig,
};
pub use warnings::{warnings, Warning, DATA_ACTION_LIMIT};

/// Environment variables starting with this override keys of the file.
pub const ENV_PREFIX: &str = "BREAKWATER__";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// The top-level `auth:` block: every route's default unless the route has its own.
    pub auth: Option<Arc<AuthConfig>>,
    /// In a running gateway's configuration, the keys whose value in the file differs from the
    /// one in force until a restart (see [`in_force`]); empty in one read from a file.
    pub pending_restart: Vec<PendingRestart>,
}

/// One thing wrong with the configuration, naming the key and the bad value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid YAML or has the wrong shape: {0}")]
    Syntax(String),
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Invalid(p) => p.clone(),
            other => vec![Problem {
                key: "<file>".into(),
                message: other.to_string(),
            }],
        }
    }
}

/// What validation made of a file: the configuration and every problem found in it. When there
/// are problems, `config` holds defaults in place of the bad values and leaves out upstreams
/// that cannot be used; it is then good only for looking for more problems (in the files it
/// names, say), so that all of them are reported at once.
#[derive(Debug)]
pub struct Draft {
    pub config: Config,
    pub problems: Vec<Problem>,
    /// Which environment variable set which key: problems found later (in the files the
    /// configuration names) name the variable too.
    pub env: EnvSources,
}

impl Draft {
    pub fn finish(self) -> Result<Config, ConfigError> {
        if self.problems.is_empty() {
            Ok(self.config)
        } else {
            Err(ConfigError::Invalid(self.problems))
        }
    }
}

/// The text of the config file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the file at `path`, applies `BREAKWATER__*` variables from the process environment and
/// validates the result. The files and secrets it names are not read: see [`crate::prepare`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    from_yaml(&read(path)?, std::env::vars())
}

/// Builds the config from YAML text and an explicit set of environment variables (tests pass
/// their own so they never depend on the machine's environment).
pub fn from_yaml(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    draft(text, env)?.finish()
}

/// Like [`from_yaml`], keeping the configuration when it has problems. Fails when the text is not
/// YAML, and when a value has a type nothing can be made of (`budget: [8s]`): then with that
/// problem and those found before it (unknown keys, bad environment variables).
pub fn draft(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Draft, ConfigError> {
    let mut tree: config::Value = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Yaml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Syntax(e.to_string()))?;
    let mut p = problems::Problems(Vec::new());
    keys::strip_unknown(&mut p, &mut tree, &keys::ROOT, "");
    let sources = env::apply(&mut p, &mut tree, env);
    let raw: raw::RawConfig = match serde_path_to_error::deserialize(tree) {
        Ok(raw) => raw,
        Err(e) => {
            // A value of the wrong type stops deserializing: report it with what was found so far.
            p.add(render_path(e.path()), e.into_inner().to_string());
            sources.attribute(&mut p.0);
            return Err(ConfigError::Invalid(p.0));
        }
    };
    let mut draft = validate::validate(raw);
    p.0.append(&mut draft.problems);
    sources.attribute(&mut p.0);
    draft.problems = p.0;
    draft.env = sources;
    Ok(draft)
}

/// `routes[0].budget`, as every other problem names its key.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter().fold(String::new(), |at, s| match s {
        Segment::Seq { index } => format!("{at}[{index}]"),
        Segment::Map { key } => keys::join(&at, key),
        Segment::Enum { variant } => keys::join(&at, variant),
        Segment::Unknown => keys::join(&at, "?"),
    })
}

/// `BREAKWATER__ROUTES__0__BUDGET` → `routes[0].budget`; `None` for unrelated variables.
pub fn env_key_to_path(key: &str) -> Option<String> {
    env::segments(key).map(|s| env::render(&s))
}

/// The shipped `config/breakwater.yaml` (one catch-all route to uvicorn's default address), which
/// the gateway reads from disk; compiled into the unit tests so they check it stays valid.
#[cfg(test)]
pub const SHIPPED_DEFAULT: &str = include_str!("../../config/breakwater.yaml");

#[cfg(test)]
mod tests;
