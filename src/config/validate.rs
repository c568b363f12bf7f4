//! Turns the raw file into a [`Config`], collecting every problem instead of stopping early.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use super::raw::*;
use super::units::{parse_duration, parse_size};
use super::*;

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: &Option<String>, default: Duration) -> Duration {
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

    fn size(&mut self, key: &str, value: &Option<String>, default: u64) -> u64 {
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

    fn count(&mut self, key: &str, value: Option<i64>, default: u64, min: u64, max: u64) -> u64 {
        let Some(n) = value else { return default };
        if n < min as i64 || n as u64 > max {
            self.add(key, format!("`{n}`: must be between {min} and {max}"));
            return default;
        }
        n as u64
    }

    fn status(&mut self, key: &str, value: Option<i64>, default: StatusCode) -> StatusCode {
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

    fn addr(&mut self, key: &str, value: &Option<String>, default: &str) -> SocketAddr {
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

    fn json(&mut self, key: &str, text: &str) {
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

/// The environment variables secrets are read from (`*_env` keys).
pub type Env = HashMap<String, String>;

pub fn validate(raw: RawConfig, env: &Env) -> Result<Config, Vec<Problem>> {
    let mut p = Problems(Vec::new());

    let s = &raw.server;
    let server = ServerConfig {
        listen: p.addr("server.listen", &s.listen, "0.0.0.0:8080"),
        listen_backlog: p.count("server.listen_backlog", s.listen_backlog, 4096, 1, 65535) as u32,
        workers: s
            .workers
            .map(|_| p.count("server.workers", s.workers, 1, 1, 1024) as usize),
        header_read_timeout: p.duration(
            "server.header_read_timeout",
            &s.header_read_timeout,
            Duration::from_secs(10),
        ),
        body_read_timeout: p.duration(
            "server.body_read_timeout",
            &s.body_read_timeout,
            Duration::from_secs(10),
        ),
        keepalive_timeout: p.duration(
            "server.keepalive_timeout",
            &s.keepalive_timeout,
            Duration::from_secs(75),
        ),
        max_connections: p.count(
            "server.max_connections",
            s.max_connections,
            10_000,
            1,
            10_000_000,
        ) as usize,
        max_request_body: p.size("server.max_request_body", &s.max_request_body, 1 << 20),
        max_header_size: p.size("server.max_header_size", &s.max_header_size, 64 << 10) as usize,
        max_headers: p.count("server.max_headers", s.max_headers, 100, 1, 10_000) as usize,
        drain_timeout: p.duration(
            "server.drain_timeout",
            &s.drain_timeout,
            Duration::from_secs(25),
        ),
        http2: s.http2.unwrap_or(true),
        tls: None,
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
        max_connections_per_source: s.max_connections_per_source.map(|n| {
            p.count(
                "server.max_connections_per_source",
                Some(n),
                1,
                1,
                10_000_000,
            ) as usize
        }),
    };
    let mut server = server;
    server.tls = s
        .tls
        .as_ref()
        .and_then(|t| validate_server_tls(&mut p, t, server.http2))
        .map(Arc::new);
    if server.max_header_size < 8192 {
        p.add(
            "server.max_header_size",
            format!("`{}`: must be at least 8KiB", server.max_header_size),
        );
    }

    let admin = AdminConfig {
        listen: if raw.admin.enabled == Some(false) {
            None
        } else {
            Some(p.addr("admin.listen", &raw.admin.listen, "127.0.0.1:9901"))
        },
        ready_requires_upstream: raw.admin.ready_requires_upstream.unwrap_or(false),
    };

    let log = LogConfig {
        format: match raw.log.format.as_deref() {
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
        level: match raw.log.level.as_deref() {
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
    };

    let mut upstreams = BTreeMap::new();
    for (name, u) in &raw.upstreams {
        if let Some(up) = validate_upstream(&mut p, name, u) {
            upstreams.insert(name.clone(), up);
        }
    }

    let auth = raw
        .auth
        .as_ref()
        .and_then(|a| validate_auth(&mut p, "auth", a, env))
        .map(Arc::new);

    if raw.routes.is_empty() {
        p.add("routes", "no routes: add at least one route");
    }
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let mut route = validate_route(&mut p, &key, r, &server, &upstreams, &raw.upstreams);
        if let Some(route) = &mut route {
            (route.auth, route.auth_origin) = match &r.auth {
                None if auth.is_some() => (auth.clone(), AuthOrigin::Global),
                None => (None, AuthOrigin::None),
                Some(a) => match validate_auth(&mut p, &format!("{key}.auth"), a, env) {
                    Some(own) => (Some(Arc::new(own)), AuthOrigin::Route),
                    None => (None, AuthOrigin::Disabled),
                },
            };
        }
        if let Some(route) = route {
            if !names.insert(route.name.clone()) {
                p.add(
                    format!("{key}.name"),
                    format!("`{}`: duplicate route name", route.name),
                );
            }
            routes.push(route);
        }
    }

    if p.0.is_empty() {
        Ok(Config {
            server,
            admin,
            log,
            upstreams,
            routes,
            auth,
        })
    } else {
        Err(p.0)
    }
}

fn validate_upstream(p: &mut Problems, name: &str, u: &RawUpstream) -> Option<UpstreamConfig> {
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
    let url: http::Uri = match url_text.parse() {
        Ok(u) => u,
        Err(e) => {
            p.add(
                format!("{key}.url"),
                format!("`{url_text}`: not a URL ({e})"),
            );
            return None;
        }
    };
    let https = match url.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => {
            p.add(
                format!("{key}.url"),
                format!("`{url_text}`: scheme `{other}` is not supported; use http:// or https://"),
            );
            return None;
        }
        None => {
            p.add(
                format!("{key}.url"),
                format!("`{url_text}`: missing scheme; write `http://host:port` or `https://host`"),
            );
            return None;
        }
    };
    let Some(host) = url.host().filter(|h| !h.is_empty()) else {
        p.add(format!("{key}.url"), format!("`{url_text}`: missing host"));
        return None;
    };
    if url.query().is_some() {
        p.add(
            format!("{key}.url"),
            format!("`{url_text}`: a query string is not allowed in an upstream url"),
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
                format!("only for https:// urls, and the url is `{url_text}`"),
            );
            None
        }
        (raw, true) => validate_upstream_tls(p, &format!("{key}.tls"), raw.as_ref(), &host),
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

/// A file path from the config; `None` (with a problem) when it is empty or is clearly PEM
/// content pasted in place of a path, which is never echoed: it may be a private key.
fn path_value(p: &mut Problems, key: &str, value: &str) -> Option<PathBuf> {
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

/// Maps a certificate file problem to the key that names the file.
fn file_problem(p: &mut Problems, base: &str, e: crate::tls::FileProblem, names: [&str; 3]) {
    let field = match e.file {
        crate::tls::TlsFile::Cert => names[0],
        crate::tls::TlsFile::Key => names[1],
        crate::tls::TlsFile::Ca => names[2],
    };
    p.add(format!("{base}.{field}"), e.message);
}

fn validate_server_tls(
    p: &mut Problems,
    t: &RawServerTls,
    http2: bool,
) -> Option<crate::tls::ServerTls> {
    let base = "server.tls";
    let mut required = |field: &str, value: &Option<String>, what: &str| match value {
        None => {
            p.add(
                format!("{base}.{field}"),
                format!("missing: the path of the PEM {what}"),
            );
            None
        }
        Some(v) => path_value(p, &format!("{base}.{field}"), v),
    };
    let cert = required("cert", &t.cert, "certificate chain (leaf first)");
    let key = required("key", &t.key, "private key");
    let (cert, key) = (cert?, key?);
    match crate::tls::ServerTls::load(&cert, &key, http2) {
        Ok(tls) => Some(tls),
        Err(problems) => {
            for e in problems {
                file_problem(p, base, e, ["cert", "key", "cert"]);
            }
            None
        }
    }
}

fn validate_upstream_tls(
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
        Some(name) => crate::tls::server_name(name)
            .map_err(|e| p.add(format!("{key}.server_name"), e))
            .ok(),
        None => crate::tls::server_name(host)
            .map_err(|e| {
                p.add(
                    format!("{key}.server_name"),
                    format!("missing, and the url's host {e}"),
                )
            })
            .ok(),
    };
    let name = name.filter(|_| p.0.len() == before)?;
    let client_pair = client_cert.as_deref().zip(client_key.as_deref());
    match crate::tls::ClientTls::build(ca_file.as_deref(), client_pair, insecure) {
        Ok(client) => Some(UpstreamTlsConfig {
            ca_file,
            server_name: t.server_name.clone(),
            name,
            client_cert,
            client_key,
            insecure_skip_verify: insecure,
            client,
        }),
        Err(problems) => {
            for e in problems {
                file_problem(p, key, e, ["client_cert", "client_key", "ca_file"]);
            }
            None
        }
    }
}

fn validate_route(
    p: &mut Problems,
    key: &str,
    r: &RawRoute,
    server: &ServerConfig,
    upstreams: &BTreeMap<String, UpstreamConfig>,
    raw_upstreams: &BTreeMap<String, RawUpstream>,
) -> Option<RouteConfig> {
    let name = match &r.name {
        Some(n) if !n.trim().is_empty() => {
            if !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.add(format!("{key}.name"), format!("`{n}`: use letters, digits, `-`, `_` and `.` only (it becomes a metric label)"));
            }
            n.clone()
        }
        _ => {
            p.add(format!("{key}.name"), "missing: every route needs a name");
            format!("route{}", key)
        }
    };

    let path_prefix = r.matcher.path_prefix.clone().unwrap_or_else(|| "/".into());
    if !path_prefix.starts_with('/') {
        p.add(
            format!("{key}.match.path_prefix"),
            format!("`{path_prefix}`: must start with `/`"),
        );
    }
    let mut methods = Vec::new();
    if let Some(ms) = &r.matcher.methods {
        for m in ms.items() {
            match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(method) => methods.push(method),
                Err(_) => p.add(
                    format!("{key}.match.methods"),
                    format!("`{m}`: not an HTTP method"),
                ),
            }
        }
    }
    let host = r.matcher.host.as_ref().map(|h| h.to_ascii_lowercase());

    let upstream = match &r.upstream {
        None => {
            p.add(
                format!("{key}.upstream"),
                "missing: name one of the upstreams",
            );
            String::new()
        }
        Some(u) => {
            if !raw_upstreams.contains_key(u) {
                let known: Vec<&str> = raw_upstreams.keys().map(|s| s.as_str()).collect();
                p.add(
                    format!("{key}.upstream"),
                    format!(
                        "`{u}`: no such upstream (defined: {})",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            u.clone()
        }
    };

    let budget = p.duration(&format!("{key}.budget"), &r.budget, Duration::from_secs(10));
    let max_request_body = p.size(
        &format!("{key}.max_request_body"),
        &r.max_request_body,
        server.max_request_body,
    );
    let timeout_status = match r.timeout_status {
        None => StatusCode::SERVICE_UNAVAILABLE,
        Some(503) => StatusCode::SERVICE_UNAVAILABLE,
        Some(504) => StatusCode::GATEWAY_TIMEOUT,
        Some(other) => {
            p.add(
                format!("{key}.timeout_status"),
                format!("`{other}`: must be 503 or 504"),
            );
            StatusCode::SERVICE_UNAVAILABLE
        }
    };

    let pool_cap = upstreams
        .get(&upstream)
        .map(|u| u.pool.max_connections as usize)
        .unwrap_or(64);
    let ckey = format!("{key}.concurrency");
    let concurrency = match &r.concurrency {
        None => Concurrency::Fixed(pool_cap),
        Some(RawConcurrency::Number(n)) => {
            Concurrency::Fixed(p.count(&ckey, Some(*n), pool_cap as u64, 1, 100_000) as usize)
        }
        Some(RawConcurrency::Word(w)) if w.eq_ignore_ascii_case("auto") => {
            adaptive(p, &ckey, &RawAdaptive::default(), pool_cap)
        }
        Some(RawConcurrency::Word(w)) => match w.trim().parse::<i64>() {
            Ok(n) => {
                Concurrency::Fixed(p.count(&ckey, Some(n), pool_cap as u64, 1, 100_000) as usize)
            }
            Err(_) => {
                p.add(&ckey, format!("`{w}`: must be a number or `auto`"));
                Concurrency::Fixed(pool_cap)
            }
        },
        Some(RawConcurrency::Adaptive(a)) => {
            match a.mode.as_deref() {
                Some("auto") | None => {}
                Some(other) => p.add(
                    format!("{ckey}.mode"),
                    format!("`{other}`: the only mode is `auto`"),
                ),
            }
            adaptive(p, &ckey, a, pool_cap)
        }
    };

    let queue = QueueConfig {
        max_depth: p.count(
            &format!("{key}.queue.max_depth"),
            r.queue.max_depth,
            100,
            0,
            1_000_000,
        ) as usize,
        max_wait: p.duration(&format!("{key}.queue.max_wait"), &r.queue.max_wait, budget),
    };

    let overload = OverloadConfig {
        status: p.status(
            &format!("{key}.overload.status"),
            r.overload.status,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        body: r.overload.body.clone(),
    };
    if let Some(body) = &overload.body {
        p.json(&format!("{key}.overload.body"), body);
    }

    let fallback = r.fallback.as_ref().map(|f| {
        let fkey = format!("{key}.fallback");
        let content_type = f
            .content_type
            .clone()
            .unwrap_or_else(|| "application/json".into());
        let body = match &f.body {
            Some(b) => b.clone(),
            None => {
                p.add(
                    format!("{fkey}.body"),
                    "missing: a fallback needs the body to answer with",
                );
                String::new()
            }
        };
        if content_type.starts_with("application/json") && !body.is_empty() {
            p.json(&format!("{fkey}.body"), &body);
        }
        if http::HeaderValue::from_str(&content_type).is_err() {
            p.add(
                format!("{fkey}.content_type"),
                format!("`{content_type}`: not a valid header value"),
            );
        }
        FallbackConfig {
            status: p.status(&format!("{fkey}.status"), f.status, StatusCode::OK),
            body,
            content_type,
        }
    });

    let rkey = format!("{key}.retry");
    let mut on_status = Vec::new();
    if let Some(list) = &r.retry.on_status {
        for s in list.items() {
            match s
                .parse::<u16>()
                .ok()
                .and_then(|n| StatusCode::from_u16(n).ok())
            {
                Some(code) if code.is_server_error() || code == StatusCode::TOO_MANY_REQUESTS => {
                    on_status.push(code)
                }
                _ => p.add(
                    format!("{rkey}.on_status"),
                    format!("`{s}`: only 5xx statuses and 429 can be retried"),
                ),
            }
        }
    }
    let budget_ratio = r.retry.budget_ratio.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&budget_ratio) {
        p.add(
            format!("{rkey}.budget_ratio"),
            format!("`{budget_ratio}`: must be between 0 and 1"),
        );
    }
    let min_per_second = r.retry.min_per_second.unwrap_or(1.0);
    if !(0.0..=10_000.0).contains(&min_per_second) {
        p.add(
            format!("{rkey}.min_per_second"),
            format!("`{min_per_second}`: must be between 0 and 10000"),
        );
    }
    let retry = RetryConfig {
        attempts: p.count(&format!("{rkey}.attempts"), r.retry.attempts, 0, 0, 5) as u32,
        on_status,
        budget_ratio,
        min_per_second,
    };

    Some(RouteConfig {
        name,
        path_prefix,
        methods,
        host,
        upstream,
        budget,
        max_request_body,
        timeout_status,
        concurrency,
        queue,
        overload,
        fallback,
        retry,
        retry_after_max: p.duration(
            &format!("{key}.retry_after_max"),
            &r.retry_after_max,
            Duration::from_secs(30),
        ),
        idempotent: r.idempotent.unwrap_or(false),
        auth: None,
        auth_origin: AuthOrigin::None,
    })
}

fn adaptive(p: &mut Problems, key: &str, a: &RawAdaptive, pool_cap: usize) -> Concurrency {
    let min = p.count(&format!("{key}.min"), a.min, 1, 1, 100_000) as usize;
    let max = p.count(&format!("{key}.max"), a.max, pool_cap as u64, 1, 100_000) as usize;
    if min > max {
        p.add(
            format!("{key}.min"),
            format!("`{min}`: larger than max ({max})"),
        );
    }
    let initial = p.count(
        &format!("{key}.initial"),
        a.initial,
        min.max(4).min(max) as u64,
        1,
        100_000,
    ) as usize;
    if initial < min || initial > max {
        p.add(
            format!("{key}.initial"),
            format!("`{initial}`: must lie between min ({min}) and max ({max})"),
        );
    }
    Concurrency::Adaptive { min, max, initial }
}

/// Shortest API key and Basic password accepted: anything shorter is guessable.
const MIN_KEY_LEN: usize = 16;
const MIN_PASSWORD_LEN: usize = 12;

/// Headers that cannot carry an API key: the gateway or hyper rewrites or consumes them.
const RESERVED_KEY_HEADERS: [&str; 11] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "x-forwarded-for",
    "x-request-id",
    crate::forward::BUDGET_HEADER,
];

/// An `auth:` block; `None` when it says `disabled: true`. Anything wrong is added to `p` (a
/// block with problems still returns `Some`, so a mistake never turns authentication off).
fn validate_auth(p: &mut Problems, key: &str, a: &RawAuth, env: &Env) -> Option<AuthConfig> {
    if a.disabled == Some(true) {
        let configured = a.api_keys.is_some()
            || a.basic.is_some()
            || a.allow_cidrs.is_some()
            || a.trusted_proxies.is_some();
        if configured {
            p.add(
                format!("{key}.disabled"),
                "`true`: a disabled auth block cannot also set api_keys, basic, allow_cidrs or \
                 trusted_proxies",
            );
        }
        return None;
    }
    let basic = a
        .basic
        .as_ref()
        .map(|b| validate_basic(p, &format!("{key}.basic"), b, env));
    let api_keys = a
        .api_keys
        .as_ref()
        .map(|k| validate_api_keys(p, &format!("{key}.api_keys"), k, a.basic.is_some(), env));
    let allow_cidrs = cidr_list(p, &format!("{key}.allow_cidrs"), &a.allow_cidrs);
    let trusted_proxies = cidr_list(p, &format!("{key}.trusted_proxies"), &a.trusted_proxies);
    let no_allowlist = a.allow_cidrs.iter().all(|l| l.items().is_empty());
    if api_keys.is_none() && basic.is_none() && no_allowlist {
        p.add(
            key,
            "nothing to check: configure api_keys, basic or allow_cidrs (or turn auth off for a \
             route with `disabled: true`)",
        );
    }
    if a.trusted_proxies.is_some() && a.allow_cidrs.is_none() {
        p.add(
            format!("{key}.trusted_proxies"),
            "only used to find the caller's address for allow_cidrs, which is not set",
        );
    }
    Some(AuthConfig {
        api_keys,
        basic,
        allow_cidrs,
        trusted_proxies,
    })
}

fn cidr_list(p: &mut Problems, key: &str, list: &Option<OneOrMany>) -> Vec<crate::auth::Cidr> {
    let mut out = Vec::new();
    for item in list.iter().flat_map(|l| l.items()) {
        match crate::auth::Cidr::parse(&item) {
            Ok(c) => out.push(c),
            Err(e) => p.add(key, format!("`{item}`: {e}")),
        }
    }
    out
}

fn validate_basic(p: &mut Problems, key: &str, b: &RawBasic, env: &Env) -> BasicConfig {
    let username = match b.username.as_deref() {
        Some(u) if !u.is_empty() => {
            if u.contains(':') || u.chars().any(char::is_control) {
                p.add(
                    format!("{key}.username"),
                    format!("`{u}`: must not contain `:` or control characters"),
                );
            }
            u.to_string()
        }
        _ => {
            p.add(
                format!("{key}.username"),
                "missing: Basic authentication needs a username",
            );
            String::new()
        }
    };
    let fields = SecretFields {
        name: "password",
        env_name: &b.password_env,
        file: &b.password_file,
        literal: b.password.is_some(),
    };
    let (source, password) = match secret(p, key, &fields, env) {
        // An editor's trailing newline is not part of the password.
        Some((source, text)) => (source, text.trim_end_matches(['\r', '\n']).to_string()),
        None => (SecretSource::Env(String::new()), String::new()),
    };
    if !password.is_empty() && password.chars().count() < MIN_PASSWORD_LEN {
        p.add(
            format!("{key}.{}", source_key("password", &source)),
            format!("the password from {source} is shorter than {MIN_PASSWORD_LEN} characters"),
        );
    }
    BasicConfig {
        credentials: crate::auth::SecretDigest::of(format!("{username}:{password}").as_bytes()),
        username,
        source,
    }
}

fn validate_api_keys(
    p: &mut Problems,
    key: &str,
    k: &RawApiKeys,
    basic: bool,
    env: &Env,
) -> ApiKeysConfig {
    let header_text = k
        .header
        .as_deref()
        .unwrap_or("x-api-key")
        .to_ascii_lowercase();
    let hkey = format!("{key}.header");
    let header = match http::HeaderName::from_bytes(header_text.as_bytes()) {
        Ok(h) if RESERVED_KEY_HEADERS.contains(&h.as_str()) => {
            p.add(
                hkey,
                format!("`{h}`: the gateway rewrites this header; pick another (e.g. `x-api-key`)"),
            );
            h
        }
        Ok(h) if h == http::header::AUTHORIZATION && basic => {
            p.add(
                hkey,
                "`authorization`: Basic authentication uses this header; pick another (e.g. \
                 `x-api-key`)",
            );
            h
        }
        Ok(h) => h,
        Err(_) => {
            p.add(hkey, format!("`{header_text}`: not a valid header name"));
            http::HeaderName::from_static("x-api-key")
        }
    };
    let fields = SecretFields {
        name: "keys",
        env_name: &k.keys_env,
        file: &k.keys_file,
        literal: k.keys.is_some(),
    };
    let Some((source, text)) = secret(p, key, &fields, env) else {
        return ApiKeysConfig {
            header,
            source: SecretSource::Env(String::new()),
            keys: Vec::new(),
        };
    };
    let skey = format!("{key}.{}", source_key("keys", &source));
    let is_file = matches!(source, SecretSource::File(_));
    let keys: Vec<&str> = text
        .split([',', '\n'])
        .map(str::trim)
        // In a file, `#` starts a comment line.
        .filter(|k| !k.is_empty())
        .filter(|k| !(is_file && k.starts_with('#')))
        .collect();
    if keys.is_empty() {
        p.add(
            &skey,
            format!("{source} holds no keys (write them comma-separated)"),
        );
    }
    let n = keys.len();
    for (i, k) in keys.iter().enumerate() {
        // The key itself is never printed, only its position.
        let which = format!("key {} of {n} from {source}", i + 1);
        if !k.bytes().all(|b| b.is_ascii_graphic()) {
            p.add(
                &skey,
                format!("{which} contains characters other than visible ASCII"),
            );
        } else if k.len() < MIN_KEY_LEN {
            p.add(
                &skey,
                format!("{which} is shorter than {MIN_KEY_LEN} characters"),
            );
        }
    }
    ApiKeysConfig {
        header,
        keys: keys
            .iter()
            .map(|k| crate::auth::SecretDigest::of(k.as_bytes()))
            .collect(),
        source,
    }
}

fn source_key(name: &str, source: &SecretSource) -> String {
    match source {
        SecretSource::Env(_) => format!("{name}_env"),
        SecretSource::File(_) => format!("{name}_file"),
    }
}

/// The keys that can hold one secret: `{name}_env`, `{name}_file`, and a refused `{name}`.
struct SecretFields<'a> {
    name: &'static str,
    env_name: &'a Option<String>,
    file: &'a Option<String>,
    literal: bool,
}

/// Reads a secret of the block at `base` from its `_env` or `_file` key. A literal value in the
/// file is refused. Problems never include the secret.
fn secret(
    p: &mut Problems,
    base: &str,
    f: &SecretFields<'_>,
    env: &Env,
) -> Option<(SecretSource, String)> {
    let name = f.name;
    if f.literal {
        p.add(
            format!("{base}.{name}"),
            format!(
                "secrets are not accepted in the config file: put the value in an environment \
                 variable and name it in `{name}_env`, or in a file and give its path in \
                 `{name}_file`"
            ),
        );
    }
    match (f.env_name, f.file) {
        (Some(_), Some(_)) => {
            p.add(
                format!("{base}.{name}_env"),
                format!("set only one of `{name}_env` and `{name}_file`"),
            );
            None
        }
        (None, None) => {
            if !f.literal {
                p.add(
                    format!("{base}.{name}_env"),
                    format!(
                        "missing: name the environment variable (`{name}_env`) or the file \
                         (`{name}_file`) that holds the secret"
                    ),
                );
            }
            None
        }
        (Some(var), None) => {
            let key = format!("{base}.{name}_env");
            let valid_name = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                // Not echoed: a secret pasted here by mistake must not end up in a log.
                p.add(
                    key,
                    "not an environment variable name (letters, digits and `_`); give the \
                     variable's name, not the secret",
                );
                return None;
            }
            match env.get(var) {
                None => {
                    p.add(key, format!("{var} is not set"));
                    None
                }
                Some(v) if v.trim().is_empty() => {
                    p.add(key, format!("{var} is set but empty"));
                    None
                }
                Some(v) => Some((SecretSource::Env(var.clone()), v.clone())),
            }
        }
        (None, Some(path)) => {
            let key = format!("{base}.{name}_file");
            match std::fs::read_to_string(path) {
                Err(e) => {
                    p.add(key, format!("`{path}`: cannot read ({e})"));
                    None
                }
                Ok(text) if text.trim().is_empty() => {
                    p.add(key, format!("`{path}` is empty"));
                    None
                }
                Ok(text) => Some((SecretSource::File(path.into()), text)),
            }
        }
    }
}
