//! Picks the route for a request: the longest matching path prefix wins, then the optional method
//! and host constraints decide among routes with the same prefix. Paths are normalised first, so
//! `..`, `//` or percent-encoding cannot reach a route's prefix by another spelling, and the
//! upstream receives exactly the path that was routed.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::config::RouteConfig;

pub struct Router {
    /// Routes sorted by prefix length, longest first; each keeps its index into the config.
    routes: Vec<(usize, Arc<RouteConfig>)>,
    names_hosts: bool,
}

impl Router {
    pub fn new(routes: &[Arc<RouteConfig>]) -> Self {
        let mut sorted: Vec<(usize, Arc<RouteConfig>)> =
            routes.iter().cloned().enumerate().collect();
        // Stable sort keeps file order among equal prefixes, so the first listed wins a tie.
        sorted.sort_by_key(|(_, r)| std::cmp::Reverse(r.path_prefix.len()));
        let names_hosts = sorted.iter().any(|(_, r)| r.host.is_some());
        Router {
            routes: sorted,
            names_hosts,
        }
    }

    /// Whether any route is bound to a host: if none is, routing needs no host.
    pub fn names_hosts(&self) -> bool {
        self.names_hosts
    }

    /// Returns the index (into the config's route list) of the matching route.
    pub fn route(&self, method: &Method, host: Option<&str>, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .find(|(_, r)| {
                prefix_matches(&r.path_prefix, path)
                    && (r.methods.is_empty() || r.methods.contains(method))
                    && match (&r.host, host) {
                        (None, _) => true,
                        // Only a route that names a host reads it: most name none.
                        (Some(want), Some(got)) => want.eq_ignore_ascii_case(strip_port(got)),
                        (Some(_), None) => false,
                    }
            })
            .map(|(i, _)| *i)
    }
}

/// Whether a path has anything to normalize: a `%`, an empty segment inside it (`//`), or a `.`
/// or `..` segment. One pass over the bytes: every request asks, and almost none has any.
fn needs_normalizing(b: &[u8]) -> bool {
    let mut segment_start = 0;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'%' => return true,
            b'/' => {
                let segment = &b[segment_start..i];
                if segment == b"." || segment == b".." || (i > 0 && b[i - 1] == b'/') {
                    return true;
                }
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    let last = &b[segment_start..];
    last == b"." || last == b".."
}

/// Normalises a request path (RFC 3986 §6.2.2): percent-encoded unreserved characters are
/// decoded and other escapes upper-cased, repeated slashes merged, and `.` and `..` segments
/// removed (`..` never climbs above the root). Refused outright: an encoded `/` or `\` (the
/// backend may decode it into a segment boundary the prefix did not see), an encoded NUL, and
/// malformed escapes.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, &'static str> {
    let b = path.as_bytes();
    if !needs_normalizing(b) {
        return Ok(Cow::Borrowed(path));
    }
    // 1. Escapes.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            decoded.push(b[i] as char);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err("malformed percent-encoding in the path");
        };
        let byte = (hi * 16 + lo) as u8;
        match byte {
            b'/' | b'\\' => return Err("encoded slash in the path"),
            0 => return Err("encoded NUL in the path"),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => decoded.push(c as char),
            c => decoded.push_str(&format!("%{c:02X}")),
        }
        i += 3;
    }
    // 2. Slashes and dot segments.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// A prefix matches on a segment boundary: `/v1/sentiment` matches `/v1/sentiment` and
/// `/v1/sentiment/batch` but not `/v1/sentiments`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map(|h| &h[1..]).unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_yaml;

    #[test]
    fn the_one_pass_check_finds_exactly_what_the_plain_rules_do() {
        // The rules as written plainly, against the one-pass check, over every path of up to
        // seven bytes from the characters that matter.
        let plain = |p: &str| {
            p.contains('%') || p.contains("//") || p.split('/').any(|s| s == "." || s == "..")
        };
        for p in crate::exhaustive::every_string(b"/.%a", 7) {
            let p = String::from_utf8(p).expect("ASCII");
            assert_eq!(needs_normalizing(p.as_bytes()), plain(&p), "{p:?}");
        }
        assert!(!needs_normalizing(b"/v1/sentiment"));
    }

    fn router(yaml_routes: &str) -> Router {
        let text = format!("upstreams:\n  a:\n    url: http://127.0.0.1:1\nroutes:\n{yaml_routes}");
        let c = from_yaml(&text, Vec::new()).unwrap();
        let routes: Vec<Arc<RouteConfig>> = c.routes.into_iter().map(Arc::new).collect();
        Router::new(&routes)
    }

    #[test]
    fn longest_prefix_wins_then_method_then_host() {
        let r = router(
            r#"
  - { name: root, upstream: a, match: { path_prefix: / } }
  - { name: v1, upstream: a, match: { path_prefix: /v1 } }
  - { name: sentiment, upstream: a, match: { path_prefix: /v1/sentiment, methods: [POST] } }
  - { name: hosted, upstream: a, match: { path_prefix: /v1/sentiment, host: api.example.com } }
"#,
        );
        assert_eq!(r.route(&Method::POST, None, "/v1/sentiment"), Some(2));
        assert_eq!(r.route(&Method::POST, None, "/v1/sentiment/batch"), Some(2));
        assert_eq!(r.route(&Method::GET, None, "/v1/sentiment"), Some(1));
        assert_eq!(
            r.route(&Method::GET, Some("API.example.com:443"), "/v1/sentiment"),
            Some(3)
        );
        assert_eq!(r.route(&Method::GET, None, "/v1/sentiments"), Some(1));
        assert_eq!(r.route(&Method::GET, None, "/v2"), Some(0));
        assert!(r.names_hosts());
    }

    #[test]
    fn no_match_without_catch_all() {
        let r = router("  - { name: only, upstream: a, match: { path_prefix: /api } }\n");
        assert_eq!(r.route(&Method::GET, None, "/other"), None);
        assert!(!r.names_hosts());
        assert_eq!(r.route(&Method::GET, None, "/api"), Some(0));
        assert_eq!(r.route(&Method::GET, None, "/apix"), None);
    }

    #[test]
    fn paths_are_normalised_before_routing() {
        let n = |p: &str| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/v1/sentiment").unwrap(), "/v1/sentiment");
        assert!(
            matches!(normalize_path("/v1/x").unwrap(), Cow::Borrowed(_)),
            "common case allocates nothing"
        );
        assert_eq!(n("/public/../admin").unwrap(), "/admin");
        assert_eq!(n("/public/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/public/.%2E/admin").unwrap(), "/admin");
        assert_eq!(n("//admin//x").unwrap(), "/admin/x");
        assert_eq!(n("/a/./b/").unwrap(), "/a/b/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/../../etc").unwrap(), "/etc");
        assert_eq!(n("/%61dmin").unwrap(), "/admin");
        assert_eq!(n("/x%20y%c3%a9").unwrap(), "/x%20y%C3%A9");
        assert!(n("/public%2f..%2fadmin").is_err());
        assert!(n("/a%5cb").is_err());
        assert!(n("/a%00").is_err());
        assert!(n("/a%zz").is_err());
        assert!(n("/a%4").is_err());
    }

    #[test]
    fn ports_and_ipv6_hosts_are_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
    }
}
