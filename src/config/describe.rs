//! The effective configuration as JSON, for `GET /config` on the admin port: every value after
//! defaults and environment overrides, in the units the file uses, with secrets redacted.

use serde_json::{json, Value};

use super::units::{format_duration, format_size};
use super::*;

pub const REDACTED: &str = "<redacted>";

/// Credentials inside a URL (`http://user:secret@host`) never leave the process.
pub fn redact_url(url: &http::Uri) -> String {
    let text = url.to_string();
    match url.authority().map(|a| a.as_str()) {
        Some(auth) if auth.contains('@') => {
            let host = auth.rsplit('@').next().unwrap_or_default();
            text.replacen(auth, &format!("{REDACTED}@{host}"), 1)
        }
        _ => text,
    }
}

/// A URL as written in the file, which may not even parse, for a problem message: credentials
/// (anything before the last `@` of the part before the query) and the query are replaced, so
/// that neither reaches `breakwater check`, a log line or a `/reload` answer. A password holding
/// a `/` or `@` by mistake is still covered.
pub fn redact_url_text(text: &str) -> String {
    let (scheme, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let (before_query, query) = match rest.find(['?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let unhidden = match before_query.rfind('@') {
        Some(at) => format!("{scheme}{REDACTED}{}", &before_query[at..]),
        None => format!("{scheme}{before_query}"),
    };
    match query.chars().next() {
        Some(c) => format!("{unhidden}{c}{REDACTED}"),
        None => unhidden,
    }
}

fn secret_source(name: &str, source: &SecretSource) -> (String, Value) {
    match source {
        SecretSource::Env(var) => (format!("{name}_env"), json!(var)),
        SecretSource::File(path) => (format!("{name}_file"), json!(path.display().to_string())),
    }
}

/// An `auth:` block: where secrets come from and how many keys were loaded, never the secrets.
fn describe_auth(a: &AuthConfig) -> Value {
    let cidrs = |v: &[Cidr]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let api_keys = a.api_keys.as_ref().map(|k| {
        let (field, from) = secret_source("keys", &k.source);
        // How many keys were loaded is added by the running gateway (`crate::gateway::describe`).
        let mut v = json!({ "header": k.header.as_str() });
        v[field] = from;
        v
    });
    let basic = a.basic.as_ref().map(|b| {
        let (field, from) = secret_source("password", &b.source);
        let mut v = json!({ "username": b.username, "password": REDACTED });
        v[field] = from;
        v
    });
    json!({
        "api_keys": api_keys,
        "basic": basic,
        "allow_cidrs": cidrs(&a.allow_cidrs),
        "trusted_proxies": cidrs(&a.trusted_proxies),
    })
}

/// A route's effective authentication and where it came from.
fn describe_route_auth(r: &RouteConfig) -> Value {
    let mut v = match (&r.auth, r.auth_origin) {
        (_, AuthOrigin::Disabled) => json!({ "disabled": true }),
        (Some(a), _) => describe_auth(a),
        (None, _) => return Value::Null,
    };
    v["from"] = json!(r.auth_origin.as_str());
    v
}

fn describe_upstream_tls(t: &UpstreamTlsConfig) -> Value {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    json!({
        "ca_file": path(&t.ca_file),
        "server_name": t.server_name,
        "client_cert": path(&t.client_cert),
        "client_key": path(&t.client_key),
        "insecure_skip_verify": t.insecure_skip_verify,
    })
}

pub fn describe(c: &Config) -> Value {
    let d = |x: std::time::Duration| Value::String(format_duration(x));
    let upstreams: serde_json::Map<String, Value> = c
        .upstreams
        .values()
        .map(|u| {
            let mut shown = json!({
                    "balance": u.balance.as_str(),
                    "preserve_host": u.preserve_host,
                    "tls": u.tls.as_ref().map(describe_upstream_tls),
                    "pool": {
                        "max_connections": u.pool.max_connections,
                        "min_idle": u.pool.min_idle,
                        "idle_timeout": d(u.pool.idle_timeout),
                        "max_lifetime": d(u.pool.max_lifetime),
                        "connect_timeout": d(u.pool.connect_timeout),
                    },
                    "circuit": {
                        "enabled": u.circuit.enabled,
                        "consecutive_failures": u.circuit.consecutive_failures,
                        "window": d(u.circuit.window),
                        "cooldown": d(u.circuit.cooldown),
                        "probes": u.circuit.probes,
                    },
            });
            if let Some(found) = &u.discovery {
                shown["discovery"] = json!({
                    "every": d(found.every),
                    "endpoint_concurrency": found.endpoint_concurrency,
                });
            }
            if let Some(h) = &u.worker_header {
                shown["worker_header"] = json!(h.as_str());
            }
            if let Some(path) = &u.worker_probe {
                shown["worker_probe"] = json!(path.as_str());
            }
            if u.listed {
                shown["endpoints"] = u
                    .endpoints
                    .iter()
                    .map(|e| json!({ "url": redact_url(&e.url), "concurrency": e.concurrency }))
                    .collect();
            } else {
                shown["url"] = json!(redact_url(&u.endpoints[0].url));
            }
            (u.name.clone(), shown)
        })
        .collect();
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            let concurrency = match &r.concurrency {
                Concurrency::Fixed(n) => json!(n),
                Concurrency::Adaptive { min, max, initial } => {
                    json!({ "mode": "auto", "min": min, "max": max, "initial": initial })
                }
            };
            json!({
                "name": r.name,
                "match": {
                    "path_prefix": r.path_prefix,
                    "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                    "host": r.host,
                },
                "upstream": r.upstream,
                "budget": d(r.budget),
                "caller_timeout": r.caller_timeout.map(d),
                "max_request_body": format_size(r.max_request_body),
                "timeout_status": r.timeout_status.as_u16(),
                "concurrency": concurrency,
                "queue": { "max_depth": r.queue.max_depth, "max_wait": d(r.queue.max_wait) },
                "overload": { "status": r.overload.status.as_u16(), "body": r.overload.body },
                "fallback": r.fallback.as_ref().map(|f| json!({
                    "status": f.status.as_u16(),
                    "body": f.body,
                    "content_type": f.content_type,
                })),
                "retry": {
                    "attempts": r.retry.attempts,
                    "on_status": r.retry.on_status.iter().map(|s| s.as_u16()).collect::<Vec<_>>(),
                    "budget_ratio": r.retry.budget_ratio,
                    "min_per_second": r.retry.min_per_second,
                },
                "retry_after_max": d(r.retry_after_max),
                "auth": describe_route_auth(r),
            })
        })
        .collect();
    json!({
        "server": {
            "listen": c.server.listen.to_string(),
            "listen_backlog": c.server.listen_backlog,
            "workers": c.server.workers,
            "header_read_timeout": d(c.server.header_read_timeout),
            "body_read_timeout": d(c.server.body_read_timeout),
            "keepalive_timeout": d(c.server.keepalive_timeout),
            "max_connections": c.server.max_connections,
            "max_request_body": format_size(c.server.max_request_body),
            "max_header_size": format_size(c.server.max_header_size as u64),
            "max_headers": c.server.max_headers,
            "drain_timeout": d(c.server.drain_timeout),
            "http2": c.server.http2,
            // Paths only: the key's content never leaves the process.
            "tls": c.server.tls.as_ref().map(|t| json!({
                "cert": t.cert.display().to_string(),
                "key": t.key.display().to_string(),
            })),
            "proxy_protocol": c.server.proxy_protocol,
            "max_connections_per_source": c.server.max_connections_per_source,
        },
        "admin": {
            "listen": c.admin.listen.map(|a| a.to_string()),
            "ready_requires_upstream": c.admin.ready_requires_upstream,
        },
        "log": {
            "format": match c.log.format {
                LogFormat::Json => "json",
                LogFormat::Text => "text",
                LogFormat::Auto => "auto",
            },
            "level": c.log.level,
        },
        "upstreams": upstreams,
        "routes": routes,
        "auth": c.auth.as_deref().map(describe_auth),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_redacted() {
        let u: http::Uri = "http://svc:hunter2@10.0.0.1:8000/base".parse().unwrap();
        let r = redact_url(&u);
        assert!(!r.contains("hunter2") && !r.contains("svc:"), "{r}");
        assert!(r.contains("10.0.0.1:8000"), "{r}");
    }

    #[test]
    fn credentials_in_url_text_are_redacted() {
        for (text, shown) in [
            (
                "http://svc:hunter2@10.0.0.1:8000/base",
                "http://<redacted>@10.0.0.1:8000/base",
            ),
            ("svc:hunter2@10.0.0.1", "<redacted>@10.0.0.1"),
            ("http://svc:hun/ter2@host/", "http://<redacted>@host/"),
            ("http://host/x?token=hunter2", "http://host/x?<redacted>"),
            ("http://svc:hunter2@[bad", "http://<redacted>@[bad"),
            ("not a url at all", "not a url at all"),
            ("ftp://x", "ftp://x"),
        ] {
            assert_eq!(redact_url_text(text), shown, "{text}");
        }
    }

    #[test]
    fn describes_every_section_in_file_units() {
        let c = from_yaml(SHIPPED_DEFAULT, Vec::new()).unwrap();
        let v = describe(&c);
        assert_eq!(v["server"]["max_request_body"], "1MiB");
        assert_eq!(v["upstreams"]["app"]["pool"]["idle_timeout"], "4s");
        assert_eq!(v["routes"][0]["budget"], "8s");
        assert_eq!(v["routes"][0]["concurrency"], 16);
    }
}
