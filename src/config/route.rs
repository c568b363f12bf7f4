//! `routes[]`: what a route matches, where it sends requests, and how it behaves under load:
//! budget, concurrency, queue, overload answer, fallback and retries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};

use super::auth::{AuthConfig, AuthOrigin};
use super::problems::Problems;
use super::raw::{RawAdaptive, RawConcurrency, RawRoute, RawUpstream};
use super::server::ServerConfig;
use super::upstream::UpstreamConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    pub methods: Vec<Method>,
    pub host: Option<String>,
    pub upstream: String,
    pub budget: Duration,
    /// How long the caller waits before giving up (a Genesys Cloud data action's timeout), when
    /// stated: only checked against the budget (see `config::warnings`).
    pub caller_timeout: Option<Duration>,
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

pub(super) fn validate(
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
    let caller_timeout = r.caller_timeout.as_ref().map(|_| {
        p.duration(
            &format!("{key}.caller_timeout"),
            &r.caller_timeout,
            Duration::from_secs(60),
        )
    });
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

    // Unset, a route takes what its upstream can hold: its endpoints' limits, else its pools.
    let pool_cap = upstreams
        .get(&upstream)
        .map(|u| {
            u.capacity()
                .unwrap_or(u.pool.max_connections as usize * u.endpoints.len())
        })
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
        caller_timeout,
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
