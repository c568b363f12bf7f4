//! Configuration: one YAML file, environment overrides (`BREAKWATER__SECTION__KEY`), strict
//! validation that reports every problem with the key and the bad value.

mod describe;
mod raw;
pub mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

pub use describe::{describe, redact_url};
pub use validate::validate;

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
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Accept queue length; bursts of simultaneous connects beyond it wait for a SYN retry.
    pub listen_backlog: u32,
    pub workers: Option<usize>,
    pub header_read_timeout: Duration,
    /// A request body that sends nothing for this long is cut off (408).
    pub body_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    pub max_request_body: u64,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub drain_timeout: Duration,
    pub http2: bool,
    /// HTTPS on the listener. The handle is shared with the running listener, which reads the
    /// certificate in it at every handshake; equality compares the file paths only.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Every connection starts with a PROXY protocol (v1 or v2) header naming the client.
    pub proxy_protocol: bool,
    /// Open connections allowed from one source address (after the PROXY protocol); none: any.
    pub max_connections_per_source: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// `/readyz` answers 503 until every upstream has accepted at least one connection.
    pub ready_requires_upstream: bool,
}

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

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: http::Uri,
    pub host: String,
    pub port: u16,
    pub preserve_host: bool,
    /// Set exactly for `https://` urls.
    pub tls: Option<UpstreamTlsConfig>,
    pub pool: PoolConfig,
    pub circuit: CircuitConfig,
}

/// How an `https://` upstream is reached.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CAs to trust instead of the public (webpki) roots.
    pub ca_file: Option<PathBuf>,
    /// The name sent as SNI and checked against the certificate, instead of the url's host.
    pub server_name: Option<String>,
    /// The name actually checked: `server_name`, else the url's host.
    pub name: rustls::pki_types::ServerName<'static>,
    /// Client certificate chain and key presented to the upstream (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Accept any certificate. Logged as a warning at start and by `breakwater check`.
    pub insecure_skip_verify: bool,
    /// Built from the settings above when the configuration was loaded.
    pub client: crate::tls::ClientTls,
}

impl UpstreamConfig {
    /// `host:port` as the Host header and the resolver want it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Path of the URL, prepended to every forwarded path ("" when the URL has none).
    pub fn base_path(&self) -> &str {
        self.url.path().trim_end_matches('/')
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub max_connections: u32,
    pub min_idle: u32,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitConfig {
    pub enabled: bool,
    pub consecutive_failures: u32,
    /// Failures further apart than this do not add up.
    pub window: Duration,
    pub cooldown: Duration,
    pub probes: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub methods: Vec<Method>,
    pub host: Option<String>,
    pub upstream: String,
    pub budget: Duration,
    pub max_request_body: u64,
    pub timeout_status: StatusCode,
    pub concurrency: Concurrency,
    pub queue: QueueConfig,
    pub overload: OverloadConfig,
    pub fallback: Option<FallbackConfig>,
    pub retry: RetryConfig,
    pub retry_after_max: Duration,
    /// Every request on this route may be sent twice whatever its method (a lookup, or a
    /// backend that deduplicates): a POST is then resent after the keep-alive race and retried
    /// on `retry.on_status` like a GET.
    pub idempotent: bool,
    /// The caller authentication this route enforces (none: anyone may call).
    pub auth: Option<Arc<AuthConfig>>,
    /// Where `auth` came from.
    pub auth_origin: AuthOrigin,
}

/// Caller authentication (see [`crate::auth`]). Secrets are held only as digests.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub api_keys: Option<ApiKeysConfig>,
    pub basic: Option<BasicConfig>,
    /// When not empty, the caller's source address must lie inside one of these.
    pub allow_cidrs: Vec<crate::auth::Cidr>,
    /// Peers whose `X-Forwarded-For` is believed when finding the source address.
    pub trusted_proxies: Vec<crate::auth::Cidr>,
}

impl AuthConfig {
    /// One line for `breakwater check`, secrets redacted.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(k) = &self.api_keys {
            parts.push(format!(
                "api_keys header {} ({} key(s) from {})",
                k.header,
                k.keys.len(),
                k.source
            ));
        }
        if let Some(b) = &self.basic {
            parts.push(format!(
                "basic user {} (password from {})",
                b.username, b.source
            ));
        }
        let list = |v: &[crate::auth::Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.allow_cidrs.is_empty() {
            parts.push(format!("allow_cidrs {}", list(&self.allow_cidrs)));
        }
        if !self.trusted_proxies.is_empty() {
            parts.push(format!("trusted_proxies {}", list(&self.trusted_proxies)));
        }
        parts.join("; ")
    }
}

/// Where a secret is read from when the configuration is loaded (and reloaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "env {name}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeysConfig {
    pub header: http::HeaderName,
    pub source: SecretSource,
    /// Digests of every key currently valid (several during a rotation).
    pub keys: Vec<crate::auth::SecretDigest>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BasicConfig {
    pub username: String,
    /// Where the password came from.
    pub source: SecretSource,
    /// Digest of `username:password`.
    pub credentials: crate::auth::SecretDigest,
}

/// Where a route's authentication setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOrigin {
    /// Neither the route nor the top level configures `auth`.
    None,
    /// The top-level `auth:` block.
    Global,
    /// The route's own `auth:` block.
    Route,
    /// The route says `auth: { disabled: true }`.
    Disabled,
}

impl AuthOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthOrigin::None => "none",
            AuthOrigin::Global => "global",
            AuthOrigin::Route => "route",
            AuthOrigin::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Concurrency {
    Fixed(usize),
    Adaptive {
        min: usize,
        max: usize,
        initial: usize,
    },
}

impl Concurrency {
    pub fn describe(&self) -> String {
        match self {
            Concurrency::Fixed(n) => n.to_string(),
            Concurrency::Adaptive { min, max, initial } => {
                format!("auto (min {min}, max {max}, start {initial})")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    pub max_depth: usize,
    pub max_wait: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OverloadConfig {
    pub status: StatusCode,
    pub body: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FallbackConfig {
    pub status: StatusCode,
    pub body: String,
    pub content_type: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Extra attempts after the first; 0 turns retries off.
    pub attempts: u32,
    /// Statuses that are retried (only on idempotent methods).
    pub on_status: Vec<StatusCode>,
    /// Retries may add at most this fraction of the route's requests.
    pub budget_ratio: f64,
    /// Retries always allowed per second, so a quiet route can still retry.
    pub min_per_second: f64,
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

/// Reads the file at `path`, applies `BREAKWATER__*` variables from the process environment and
/// validates the result.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_yaml(&text, std::env::vars())
}

/// Builds the config from YAML text and an explicit set of environment variables (tests pass
/// their own so they never depend on the machine's environment). The same variables supply the
/// secrets named by `*_env` keys; `*_file` secrets are read here too.
pub fn from_yaml(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let env: std::collections::HashMap<String, String> = env.into_iter().collect();
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Yaml));
    let mut overrides: Vec<(String, String)> = env
        .iter()
        .filter_map(|(k, v)| env_key_to_path(k).map(|p| (p, v.clone())))
        .collect();
    // Sorted so that `routes[0]` exists before `routes[1]` is set.
    overrides.sort();
    for (path, value) in overrides {
        builder = builder
            .set_override(path.as_str(), value)
            .map_err(|e| ConfigError::Syntax(format!("environment override {path}: {e}")))?;
    }
    let built = builder
        .build()
        .map_err(|e| ConfigError::Syntax(e.to_string()))?;
    let raw: raw::RawConfig = serde_path_to_error::deserialize(built).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Syntax(format!("{path}: {}", e.into_inner()))
    })?;
    validate(raw, &env).map_err(ConfigError::Invalid)
}

/// `BREAKWATER__ROUTES__0__BUDGET` → `routes[0].budget`; `None` for unrelated variables.
pub fn env_key_to_path(key: &str) -> Option<String> {
    let rest = key.strip_prefix(ENV_PREFIX)?;
    if rest.is_empty() {
        return None;
    }
    let mut path = String::new();
    for seg in rest.split("__") {
        if seg.is_empty() {
            return None;
        }
        if seg.chars().all(|c| c.is_ascii_digit()) {
            path.push_str(&format!("[{seg}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&seg.to_ascii_lowercase());
        }
    }
    Some(path)
}

/// The shipped `config/breakwater.yaml` (one catch-all route to uvicorn's default address), which
/// the gateway reads from disk; compiled into the unit tests so they check it stays valid.
#[cfg(test)]
pub const SHIPPED_DEFAULT: &str = include_str!("../../config/breakwater.yaml");

#[cfg(test)]
mod tests;
