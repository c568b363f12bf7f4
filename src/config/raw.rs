//! The config file exactly as written: every leaf that needs a unit or a cross-check is kept as
//! text here, so that validation can report every bad value at once instead of stopping at the
//! first one serde trips over.
//!
//! Next to each struct, `KEYS` lists its keys and their shapes: serde cannot list a struct's
//! fields, and the unknown-key check (`keys`) needs them to report every unknown key at once
//! instead of stopping at the first. A unit test keeps each list equal to its struct's fields.

use serde::Deserialize;
use std::collections::BTreeMap;

/// What the unknown-key check knows of a value.
#[derive(Debug)]
pub enum Shape {
    /// A value validation reads itself (scalars, and lists of them).
    Leaf,
    /// A map with exactly these keys.
    Keys(&'static [(&'static str, Shape)]),
    /// A map from names the file chooses (`upstreams`) to values of this shape.
    Named(&'static Shape),
    /// A list of values of this shape.
    List(&'static Shape),
    /// A value, or a map with these keys (`concurrency: 4`, `concurrency: { mode: auto }`).
    LeafOr(&'static [(&'static str, Shape)]),
}

use Shape::{Keys, Leaf, LeafOr, List, Named};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub auth: Option<RawAuth>,
}

impl RawConfig {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("server", Keys(RawServer::KEYS)),
        ("admin", Keys(RawAdmin::KEYS)),
        ("log", Keys(RawLog::KEYS)),
        ("upstreams", Named(&Keys(RawUpstream::KEYS))),
        ("routes", List(&Keys(RawRoute::KEYS))),
        ("auth", Keys(RawAuth::KEYS)),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub listen_backlog: Option<i64>,
    pub workers: Option<i64>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub max_request_body: Option<String>,
    pub max_header_size: Option<String>,
    pub max_headers: Option<i64>,
    pub drain_timeout: Option<String>,
    pub http2: Option<bool>,
    pub tls: Option<RawServerTls>,
    pub proxy_protocol: Option<bool>,
    pub max_connections_per_source: Option<i64>,
}

impl RawServer {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("listen", Leaf),
        ("listen_backlog", Leaf),
        ("workers", Leaf),
        ("header_read_timeout", Leaf),
        ("body_read_timeout", Leaf),
        ("keepalive_timeout", Leaf),
        ("max_connections", Leaf),
        ("max_request_body", Leaf),
        ("max_header_size", Leaf),
        ("max_headers", Leaf),
        ("drain_timeout", Leaf),
        ("http2", Leaf),
        ("tls", Keys(RawServerTls::KEYS)),
        ("proxy_protocol", Leaf),
        ("max_connections_per_source", Leaf),
    ];
}

/// `server.tls`: the listener's certificate chain and private key, as PEM file paths.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl RawServerTls {
    pub const KEYS: &'static [(&'static str, Shape)] = &[("cert", Leaf), ("key", Leaf)];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub enabled: Option<bool>,
    pub ready_requires_upstream: Option<bool>,
}

impl RawAdmin {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("listen", Leaf),
        ("enabled", Leaf),
        ("ready_requires_upstream", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

impl RawLog {
    pub const KEYS: &'static [(&'static str, Shape)] = &[("format", Leaf), ("level", Leaf)];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub endpoints: Option<Vec<RawEndpoint>>,
    pub balance: Option<String>,
    pub discovery: Option<RawDiscovery>,
    pub worker_header: Option<String>,
    pub worker_probe: Option<String>,
    pub preserve_host: Option<bool>,
    pub tls: Option<RawUpstreamTls>,
    #[serde(default)]
    pub pool: RawPool,
    #[serde(default)]
    pub circuit: RawCircuit,
}

impl RawUpstream {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("url", Leaf),
        ("endpoints", List(&Keys(RawEndpoint::KEYS))),
        ("balance", Leaf),
        ("discovery", Keys(RawDiscovery::KEYS)),
        ("worker_header", Leaf),
        ("worker_probe", Leaf),
        ("preserve_host", Leaf),
        ("tls", Keys(RawUpstreamTls::KEYS)),
        ("pool", Keys(RawPool::KEYS)),
        ("circuit", Keys(RawCircuit::KEYS)),
    ];
}

/// `upstreams.<name>.endpoints[]`: one server of the upstream.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub url: Option<String>,
    pub concurrency: Option<i64>,
}

impl RawEndpoint {
    pub const KEYS: &'static [(&'static str, Shape)] = &[("url", Leaf), ("concurrency", Leaf)];
}

/// `upstreams.<name>.discovery`: each address the url's host resolves to is an endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub every: Option<String>,
    pub endpoint_concurrency: Option<i64>,
}

impl RawDiscovery {
    pub const KEYS: &'static [(&'static str, Shape)] =
        &[("every", Leaf), ("endpoint_concurrency", Leaf)];
}

/// `upstreams.<name>.tls`, for `https://` urls.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca_file: Option<String>,
    pub server_name: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

impl RawUpstreamTls {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("ca_file", Leaf),
        ("server_name", Leaf),
        ("client_cert", Leaf),
        ("client_key", Leaf),
        ("insecure_skip_verify", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub max_connections: Option<i64>,
    pub min_idle: Option<i64>,
    pub idle_timeout: Option<String>,
    pub max_lifetime: Option<String>,
    pub connect_timeout: Option<String>,
}

impl RawPool {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("max_connections", Leaf),
        ("min_idle", Leaf),
        ("idle_timeout", Leaf),
        ("max_lifetime", Leaf),
        ("connect_timeout", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuit {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<i64>,
    pub window: Option<String>,
    pub cooldown: Option<String>,
    pub probes: Option<i64>,
}

impl RawCircuit {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("enabled", Leaf),
        ("consecutive_failures", Leaf),
        ("window", Leaf),
        ("cooldown", Leaf),
        ("probes", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: RawMatch,
    pub upstream: Option<String>,
    pub budget: Option<String>,
    pub caller_timeout: Option<String>,
    pub max_request_body: Option<String>,
    pub timeout_status: Option<i64>,
    pub concurrency: Option<RawConcurrency>,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub overload: RawOverload,
    pub fallback: Option<RawFallback>,
    #[serde(default)]
    pub retry: RawRetry,
    pub retry_after_max: Option<String>,
    pub idempotent: Option<bool>,
    pub auth: Option<RawAuth>,
}

impl RawRoute {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("name", Leaf),
        ("match", Keys(RawMatch::KEYS)),
        ("upstream", Leaf),
        ("budget", Leaf),
        ("caller_timeout", Leaf),
        ("max_request_body", Leaf),
        ("timeout_status", Leaf),
        ("concurrency", LeafOr(RawAdaptive::KEYS)),
        ("queue", Keys(RawQueue::KEYS)),
        ("overload", Keys(RawOverload::KEYS)),
        ("fallback", Keys(RawFallback::KEYS)),
        ("retry", Keys(RawRetry::KEYS)),
        ("retry_after_max", Leaf),
        ("idempotent", Leaf),
        ("auth", Keys(RawAuth::KEYS)),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path_prefix: Option<String>,
    pub methods: Option<OneOrMany>,
    pub host: Option<String>,
}

impl RawMatch {
    pub const KEYS: &'static [(&'static str, Shape)] =
        &[("path_prefix", Leaf), ("methods", Leaf), ("host", Leaf)];
}

/// Lists may be written as YAML lists or, from environment variables, as `GET,POST`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    Many(Vec<Scalar>),
    One(Scalar),
}

/// A list item as YAML writes it: `[POST]` gives strings, `[502, 503]` numbers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Text(String),
    Number(i64),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Number(n) => n.to_string(),
        }
    }
}

impl OneOrMany {
    pub fn items(&self) -> Vec<String> {
        match self {
            OneOrMany::Many(v) => v.iter().map(Scalar::text).collect(),
            OneOrMany::One(s) => s
                .text()
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }
}

/// `concurrency: 4`, `concurrency: auto`, or `concurrency: { mode: auto, min: 2, max: 64 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawConcurrency {
    Number(i64),
    Word(String),
    Adaptive(RawAdaptive),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdaptive {
    pub mode: Option<String>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub initial: Option<i64>,
}

impl RawAdaptive {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("mode", Leaf),
        ("min", Leaf),
        ("max", Leaf),
        ("initial", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_depth: Option<i64>,
    pub max_wait: Option<String>,
}

impl RawQueue {
    pub const KEYS: &'static [(&'static str, Shape)] = &[("max_depth", Leaf), ("max_wait", Leaf)];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOverload {
    pub status: Option<i64>,
    pub body: Option<String>,
}

impl RawOverload {
    pub const KEYS: &'static [(&'static str, Shape)] = &[("status", Leaf), ("body", Leaf)];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFallback {
    pub status: Option<i64>,
    pub body: Option<String>,
    pub content_type: Option<String>,
}

impl RawFallback {
    pub const KEYS: &'static [(&'static str, Shape)] =
        &[("status", Leaf), ("body", Leaf), ("content_type", Leaf)];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<i64>,
    pub on_status: Option<OneOrMany>,
    pub budget_ratio: Option<f64>,
    pub min_per_second: Option<f64>,
}

impl RawRetry {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("attempts", Leaf),
        ("on_status", Leaf),
        ("budget_ratio", Leaf),
        ("min_per_second", Leaf),
    ];
}

/// `auth:` at the top level (every route's default) or on a route (replacing the default
/// entirely; `disabled: true` turns it off for that route).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub disabled: Option<bool>,
    pub api_keys: Option<RawApiKeys>,
    pub basic: Option<RawBasic>,
    pub allow_cidrs: Option<OneOrMany>,
    pub trusted_proxies: Option<OneOrMany>,
}

impl RawAuth {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("disabled", Leaf),
        ("api_keys", Keys(RawApiKeys::KEYS)),
        ("basic", Keys(RawBasic::KEYS)),
        ("allow_cidrs", Leaf),
        ("trusted_proxies", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeys {
    pub header: Option<String>,
    pub keys_env: Option<String>,
    pub keys_file: Option<String>,
    /// Accepted only to be refused with a clear message: secrets never live in the file. The
    /// value is dropped unread.
    pub keys: Option<serde::de::IgnoredAny>,
}

impl RawApiKeys {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("header", Leaf),
        ("keys_env", Leaf),
        ("keys_file", Leaf),
        ("keys", Leaf),
    ];
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    /// Refused like `RawApiKeys::keys`.
    pub password: Option<serde::de::IgnoredAny>,
}

impl RawBasic {
    pub const KEYS: &'static [(&'static str, Shape)] = &[
        ("username", Leaf),
        ("password_env", Leaf),
        ("password_file", Leaf),
        ("password", Leaf),
    ];
}
