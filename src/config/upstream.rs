//! `upstreams.<name>`: where requests go, the pool that holds connections to it, its circuit
//! breaker and, for `https://` urls, how its certificate is checked.

use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::problems::{path_value, Problems};
use super::raw::{RawUpstream, RawUpstreamTls};

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
    pub name: ServerName<'static>,
    /// Client certificate chain and key presented to the upstream (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Accept any certificate. Logged as a warning at start and by `breakwater check`.
    pub insecure_skip_verify: bool,
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

    let Some(url_text) = &u.url else {
        p.add(
            format!("{key}.url"),
            "missing: every upstream needs a url like `http://10.0.0.5:8000`",
        );
        return None;
    };
    // Problems show the url without its credentials or query.
    let shown = super::redact_url_text(url_text);
    let url: http::Uri = match url_text.parse() {
        Ok(u) => u,
        Err(e) => {
            p.add(format!("{key}.url"), format!("`{shown}`: not a URL ({e})"));
            return None;
        }
    };
    let https = match url.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            p.add(
                format!("{key}.url"),
                format!("`{shown}`: scheme `{other}` is not supported; use http:// or https://"),
            );
            return None;
        }
        None => {
            p.add(
                format!("{key}.url"),
                format!("`{shown}`: missing scheme; write `http://host:port` or `https://host`"),
            );
            return None;
        }
    };
    let Some(host) = url.host().filter(|h| !h.is_empty()) else {
        p.add(format!("{key}.url"), format!("`{shown}`: missing host"));
        return None;
    };
    if url.query().is_some() {
        p.add(
            format!("{key}.url"),
            format!("`{shown}`: a query string is not allowed in an upstream url"),
        );
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tls = match (&u.tls, https) {
        (Some(_), false) => {
            p.add(
                format!("{key}.tls"),
                format!("only for https:// urls, and the url is `{shown}`"),
            );
            None
        }
        (raw, true) => validate_tls(p, &format!("{key}.tls"), raw.as_ref(), &host),
        (None, false) => None,
    };
    if https && tls.is_none() {
        // Its problems are reported; the upstream is not usable without them fixed.
        return None;
    }
    Some(UpstreamConfig {
        name: name.to_string(),
        host,
        port,
        url,
        preserve_host: u.preserve_host.unwrap_or(false),
        tls,
        pool,
        circuit,
    })
}

fn validate_tls(
    p: &mut Problems,
    key: &str,
    t: Option<&RawUpstreamTls>,
    host: &str,
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
    let name = match &t.server_name {
        Some(name) => server_name(name)
            .map_err(|e| p.add(format!("{key}.server_name"), e))
            .ok(),
        None => server_name(host)
            .map_err(|e| {
                p.add(
                    format!("{key}.server_name"),
                    format!("missing, and the url's host {e}"),
                )
            })
            .ok(),
    };
    let name = name.filter(|_| p.0.len() == before)?;
    Some(UpstreamTlsConfig {
        ca_file,
        server_name: t.server_name.clone(),
        name,
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
