//! `upstreams.<name>`: where requests go (one `url`, or several `endpoints` with their own limits),
//! the pool that holds connections to each, the circuit breaker that ejects a failing endpoint
//! and, for `https://` urls, how certificates are checked.

use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::problems::{path_value, Problems};
use super::raw::{RawEndpoint, RawUpstream, RawUpstreamTls};

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// Where requests go: the one `url`, or each of `endpoints`. Never empty.
    pub endpoints: Vec<EndpointConfig>,
    /// Written as `endpoints:` rather than `url:` (how `/config` shows it).
    pub listed: bool,
    pub balance: Balance,
    /// Each address the url's host resolves to is an endpoint (`endpoints` then holds the url
    /// itself, the template every discovered endpoint is made from).
    pub discovery: Option<DiscoveryConfig>,
    /// Response header in which the backend names the worker process that answered: the pool
    /// then keeps requests on workers with nothing in flight (see `crate::upstream::workers`).
    pub worker_header: Option<http::HeaderName>,
    /// A path the backend answers at once on any worker (a health check): the pool sends it on
    /// new connections in the background to meet every worker before requests need them.
    pub worker_probe: Option<http::uri::PathAndQuery>,
    /// Path shared by the endpoints' urls, prepended to every forwarded path ("" when none).
    pub base_path: String,
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
    /// Client certificate chain and key presented to the upstream (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Accept any certificate. Logged as a warning at start and by `breakwater check`.
    pub insecure_skip_verify: bool,
}

/// One server of an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub url: http::Uri,
    pub host: String,
    pub port: u16,
    /// At most this many requests at a time (none: only the pool and the routes limit it).
    pub concurrency: Option<usize>,
    /// For `https://`: the name its certificate is checked against and sent as SNI
    /// (`tls.server_name`, else the url's host).
    pub tls_name: Option<ServerName<'static>>,
}

impl EndpointConfig {
    /// `host:port` as the Host header, the resolver and metric labels want it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `discovery`: the url's host is resolved every `every`, and each address is an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    pub every: Duration,
    /// Each discovered endpoint's `concurrency`.
    pub endpoint_concurrency: Option<usize>,
}

/// How a request picks among the endpoints with a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// The endpoint with the fewest requests in flight; ties broken at random.
    LeastOutstanding,
    /// Each in turn.
    RoundRobin,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastOutstanding => "least_outstanding",
            Balance::RoundRobin => "round_robin",
        }
    }
}

impl UpstreamConfig {
    /// The endpoints' limits added up, when every endpoint has one (and they are known before
    /// the upstream runs: not with discovery).
    pub fn capacity(&self) -> Option<usize> {
        if self.discovery.is_some() {
            return None;
        }
        self.endpoints.iter().map(|e| e.concurrency).sum()
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

pub(super) fn validate(p: &mut Problems, name: &str, u: &RawUpstream) -> Option<UpstreamConfig> {
    let key = format!("upstreams.{name}");
    let pool_key = format!("{key}.pool");
    let max_connections = p.count(
        &format!("{pool_key}.max_connections"),
        u.pool.max_connections,
        64,
        1,
        100_000,
    ) as u32;
    let min_idle = p.count(
        &format!("{pool_key}.min_idle"),
        u.pool.min_idle,
        4.min(max_connections as u64),
        0,
        100_000,
    ) as u32;
    if min_idle > max_connections {
        p.add(
            format!("{pool_key}.min_idle"),
            format!("`{min_idle}`: larger than max_connections ({max_connections})"),
        );
    }
    let pool = PoolConfig {
        max_connections,
        min_idle,
        idle_timeout: p.duration(
            &format!("{pool_key}.idle_timeout"),
            &u.pool.idle_timeout,
            Duration::from_secs(45),
        ),
        max_lifetime: p.duration(
            &format!("{pool_key}.max_lifetime"),
            &u.pool.max_lifetime,
            Duration::from_secs(300),
        ),
        connect_timeout: p.duration(
            &format!("{pool_key}.connect_timeout"),
            &u.pool.connect_timeout,
            Duration::from_secs(1),
        ),
    };
    let ckey = format!("{key}.circuit");
    let circuit = CircuitConfig {
        enabled: u.circuit.enabled.unwrap_or(true),
        consecutive_failures: p.count(
            &format!("{ckey}.consecutive_failures"),
            u.circuit.consecutive_failures,
            5,
            1,
            1_000_000,
        ) as u32,
        window: p.duration(
            &format!("{ckey}.window"),
            &u.circuit.window,
            Duration::from_secs(10),
        ),
        cooldown: p.duration(
            &format!("{ckey}.cooldown"),
            &u.circuit.cooldown,
            Duration::from_secs(5),
        ),
        probes: p.count(&format!("{ckey}.probes"), u.circuit.probes, 1, 1, 1000) as u32,
    };

    let balance = match u.balance.as_deref() {
        None | Some("least_outstanding") => Balance::LeastOutstanding,
        Some("round_robin") => Balance::RoundRobin,
        Some(other) => {
            p.add(
                format!("{key}.balance"),
                format!("`{other}`: must be `least_outstanding` or `round_robin`"),
            );
            Balance::LeastOutstanding
        }
    };
    let worker_header =
        u.worker_header.as_deref().and_then(|h| {
            match http::HeaderName::from_bytes(h.trim().as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => {
                    p.add(
                        format!("{key}.worker_header"),
                        format!("`{h}`: not a header name"),
                    );
                    None
                }
            }
        });
    let worker_probe = u.worker_probe.as_deref().and_then(|path| {
        let key = format!("{key}.worker_probe");
        if u.worker_header.is_none() {
            p.add(
                &key,
                "set without `worker_header`: a probe learns a connection's worker from that header",
            );
        }
        match path.parse::<http::uri::PathAndQuery>() {
            Ok(pq) if path.starts_with('/') => Some(pq),
            _ => {
                p.add(key, format!("`{path}`: must be a path starting with `/`"));
                None
            }
        }
    });
    let discovery = u.discovery.as_ref().map(|d| {
        let dkey = format!("{key}.discovery");
        if u.endpoints.is_some() {
            p.add(
                &dkey,
                "set together with `endpoints`: discovery makes the endpoints from `url`",
            );
        }
        DiscoveryConfig {
            every: p.duration(&format!("{dkey}.every"), &d.every, Duration::from_secs(10)),
            endpoint_concurrency: d.endpoint_concurrency.map(|_| {
                p.count(
                    &format!("{dkey}.endpoint_concurrency"),
                    d.endpoint_concurrency,
                    1,
                    1,
                    100_000,
                ) as usize
            }),
        }
    });
    let listed = u.endpoints.is_some();
    let single = RawEndpoint::default();
    let written: Vec<(String, &RawEndpoint)> = match (&u.url, &u.endpoints) {
        (Some(_), Some(_)) => {
            p.add(
                format!("{key}.endpoints"),
                "set together with `url`: give one url, or a list of endpoints",
            );
            return None;
        }
        (None, None) => {
            p.add(
                format!("{key}.url"),
                "missing: every upstream needs a url like `http://10.0.0.5:8000` (or `endpoints`)",
            );
            return None;
        }
        (None, Some(list)) if list.is_empty() => {
            p.add(
                format!("{key}.endpoints"),
                "empty: list at least one endpoint",
            );
            return None;
        }
        (None, Some(list)) => list
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("{key}.endpoints[{i}]"), e))
            .collect(),
        (Some(_), None) => vec![(key.clone(), &single)],
    };
    let mut parsed = Vec::new();
    for (ekey, raw) in &written {
        let (url_key, text) = match (listed, &raw.url) {
            (false, _) => (format!("{key}.url"), u.url.as_ref()),
            (true, t) => (format!("{ekey}.url"), t.as_ref()),
        };
        let Some(text) = text else {
            p.add(
                url_key,
                "missing: every endpoint needs a url like `http://127.0.0.1:8001`",
            );
            continue;
        };
        let concurrency = raw.concurrency.map(|_| {
            p.count(
                &format!("{ekey}.concurrency"),
                raw.concurrency,
                1,
                1,
                100_000,
            ) as usize
        });
        if let Some(e) = endpoint_url(p, &url_key, text) {
            parsed.push((url_key, e, concurrency));
        }
    }
    let (first_key, first, _) = parsed.first()?;
    let https = first.scheme_str() == Some("https");
    let base_path = first.path().trim_end_matches('/').to_string();
    for (k, url, _) in &parsed[1..] {
        if url.scheme_str() != first.scheme_str() {
            p.add(
                k,
                format!(
                    "`{}`: scheme differs from {first_key}; every endpoint speaks the same protocol",
                    super::redact_url(url)
                ),
            );
        }
        if url.path().trim_end_matches('/') != base_path {
            p.add(
                k,
                format!(
                    "`{}`: path differs from {first_key}; every endpoint serves the same paths",
                    super::redact_url(url)
                ),
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (k, url, _) in &parsed {
        if !seen.insert(url.authority().map(|a| a.as_str().to_ascii_lowercase())) {
            p.add(k, format!("`{}`: listed twice", super::redact_url(url)));
        }
    }
    if parsed.len() != written.len() {
        return None;
    }
    let shown = super::redact_url(first);
    let tls = match (&u.tls, https) {
        (Some(_), false) => {
            p.add(
                format!("{key}.tls"),
                format!("only for https:// urls, and the url is `{shown}`"),
            );
            None
        }
        (raw, true) => validate_tls(p, &format!("{key}.tls"), raw.as_ref()),
        (None, false) => None,
    };
    if https && tls.is_none() {
        // Its problems are reported; the upstream is not usable without them fixed.
        return None;
    }
    let mut endpoints = Vec::new();
    for (k, url, concurrency) in parsed {
        let host = url
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls_name = match &tls {
            None => None,
            Some(t) => {
                let name = t.server_name.as_deref().unwrap_or(&host);
                match server_name(name) {
                    Ok(n) => Some(n),
                    Err(e) if t.server_name.is_some() => {
                        p.add(format!("{key}.tls.server_name"), e);
                        return None;
                    }
                    Err(e) => {
                        p.add(
                            format!("{key}.tls.server_name"),
                            format!("missing, and the host of {k} {e}"),
                        );
                        return None;
                    }
                }
            }
        };
        endpoints.push(EndpointConfig {
            url,
            host,
            port,
            concurrency,
            tls_name,
        });
    }
    Some(UpstreamConfig {
        name: name.to_string(),
        endpoints,
        listed,
        balance,
        discovery,
        worker_header,
        worker_probe,
        base_path,
        preserve_host: u.preserve_host.unwrap_or(false),
        tls,
        pool,
        circuit,
    })
}

/// One endpoint's url: http or https, a host, no query.
fn endpoint_url(p: &mut Problems, key: &str, text: &str) -> Option<http::Uri> {
    // Problems show the url without its credentials or query.
    let shown = super::redact_url_text(text);
    let url: http::Uri = match text.parse() {
        Ok(u) => u,
        Err(e) => {
            p.add(key, format!("`{shown}`: not a URL ({e})"));
            return None;
        }
    };
    match url.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            p.add(
                key,
                format!("`{shown}`: scheme `{other}` is not supported; use http:// or https://"),
            );
            return None;
        }
        None => {
            p.add(
                key,
                format!("`{shown}`: missing scheme; write `http://host:port` or `https://host`"),
            );
            return None;
        }
    }
    if url.host().is_none_or(str::is_empty) {
        p.add(key, format!("`{shown}`: missing host"));
        return None;
    }
    if url.query().is_some() {
        p.add(
            key,
            format!("`{shown}`: a query string is not allowed in an upstream url"),
        );
    }
    Some(url)
}

fn validate_tls(
    p: &mut Problems,
    key: &str,
    t: Option<&RawUpstreamTls>,
) -> Option<UpstreamTlsConfig> {
    let empty = RawUpstreamTls::default();
    let t = t.unwrap_or(&empty);
    let before = p.0.len();
    let mut path = |field: &str, value: &Option<String>| {
        value
            .as_ref()
            .and_then(|v| path_value(p, &format!("{key}.{field}"), v))
    };
    let ca_file = path("ca_file", &t.ca_file);
    let client_cert = path("client_cert", &t.client_cert);
    let client_key = path("client_key", &t.client_key);
    match (&t.client_cert, &t.client_key) {
        (Some(_), None) => p.add(
            format!("{key}.client_key"),
            "missing: a client certificate needs its private key",
        ),
        (None, Some(_)) => p.add(
            format!("{key}.client_cert"),
            "missing: a client key needs its certificate",
        ),
        _ => {}
    }
    let insecure = t.insecure_skip_verify.unwrap_or(false);
    if insecure && t.ca_file.is_some() {
        p.add(
            format!("{key}.insecure_skip_verify"),
            "`true`: nothing is verified, so ca_file would be ignored; set only one of them",
        );
    }
    if p.0.len() != before {
        return None;
    }
    Some(UpstreamTlsConfig {
        ca_file,
        server_name: t.server_name.clone(),
        client_cert,
        client_key,
        insecure_skip_verify: insecure,
    })
}

/// The name an upstream's certificate is checked against (and sent as SNI): `tls.server_name`,
/// else the URL's host. An IP address is checked against the certificate's IP addresses.
fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|_| format!("`{name}`: not a DNS name or IP address"))
}
