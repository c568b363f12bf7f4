//! Picks the route for a request: the longest matching path prefix wins, then the optional method
//! and host constraints decide among routes with the same prefix.

use std::sync::Arc;

use http::Method;

use crate::config::RouteConfig;

pub struct Router {
    /// Routes sorted by prefix length, longest first; each keeps its index into the config.
    routes: Vec<(usize, Arc<RouteConfig>)>,
}

impl Router {
    pub fn new(routes: &[Arc<RouteConfig>]) -> Self {
        let mut sorted: Vec<(usize, Arc<RouteConfig>)> =
            routes.iter().cloned().enumerate().collect();
        // Stable sort keeps file order among equal prefixes, so the first listed wins a tie.
        sorted.sort_by_key(|(_, r)| std::cmp::Reverse(r.path_prefix.len()));
        Router { routes: sorted }
    }

    /// Returns the index (into the config's route list) of the matching route.
    pub fn route(&self, method: &Method, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .find(|(_, r)| {
                prefix_matches(&r.path_prefix, path)
                    && (r.methods.is_empty() || r.methods.contains(method))
                    && match (&r.host, host) {
                        (None, _) => true,
                        (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                        (Some(_), None) => false,
                    }
            })
            .map(|(i, _)| *i)
    }
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
    }

    #[test]
    fn no_match_without_catch_all() {
        let r = router("  - { name: only, upstream: a, match: { path_prefix: /api } }\n");
        assert_eq!(r.route(&Method::GET, None, "/other"), None);
        assert_eq!(r.route(&Method::GET, None, "/api"), Some(0));
        assert_eq!(r.route(&Method::GET, None, "/apix"), None);
    }

    #[test]
    fn ports_and_ipv6_hosts_are_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
    }
}
