//! The routing table a request reads, and the gateway-wide state around it. Reloads build a new
//! table (keeping what did not change) and swap it in whole.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::admission::Admission;
use crate::config::{Config, RouteConfig};
use crate::prepare::Prepared;
use crate::routing::Router;
use crate::upstream::Upstream;

/// Everything a route needs at request time, built once per configuration.
pub struct RouteState {
    pub config: Arc<RouteConfig>,
    pub upstream: Arc<Upstream>,
    pub admission: Arc<Admission>,
    pub retry: Arc<crate::retry::RetryPolicy>,
    pub metrics: Arc<crate::observe::RouteMetrics>,
    /// Who may call the route (none: anyone).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// `server.body_read_timeout`: how long a request body may stall.
    pub body_read_timeout: std::time::Duration,
}

/// One configuration's worth of routing state. Reloads swap the whole thing atomically; a
/// request keeps the `Arc` it started with.
pub struct Table {
    pub config: Arc<Config>,
    pub router: Router,
    pub routes: Vec<Arc<RouteState>>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    /// The top-level `auth:` block, loaded (for `/config`).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
}

impl Table {
    pub fn new(config: Config, prepared: &Prepared) -> Self {
        Table::build(config, prepared, None)
    }

    /// Builds the table for a reloaded `config`, keeping what did not change: an upstream whose
    /// settings are the same keeps its pool (and its warm connections) and its circuit; a route
    /// whose limits are the same keeps its admission state (in-flight slots, queue, estimates)
    /// and retry budget. What changed starts fresh; requests in flight keep the old table.
    pub fn rebuild(&self, config: Config, prepared: &Prepared) -> Self {
        Table::build(config, prepared, Some(self))
    }

    fn build(config: Config, prepared: &Prepared, old: Option<&Table>) -> Self {
        let old_upstream = |name: &str| old.and_then(|t| t.upstreams.get(name));
        let old_route =
            |r: &RouteConfig| old.and_then(|t| t.routes.iter().find(|o| o.config.name == r.name));
        let upstreams: HashMap<String, Arc<Upstream>> = config
            .upstreams
            .values()
            .map(|u| {
                let tls = prepared.upstream_tls.get(&u.name);
                let unchanged = old_upstream(&u.name)
                    .filter(|o| o.config == *u && o.tls.as_ref() == tls)
                    .cloned();
                let up = unchanged.unwrap_or_else(|| {
                    // Endpoints whose settings did not change are kept, with their health and
                    // their requests in flight.
                    let up = Arc::new(Upstream::rebuild(
                        u.clone(),
                        tls.cloned(),
                        old_upstream(&u.name).map(|o| &**o),
                    ));
                    up.watch_returns();
                    up.start_discovery();
                    up
                });
                (u.name.clone(), up)
            })
            .collect();
        let route_configs: Vec<Arc<RouteConfig>> =
            config.routes.iter().cloned().map(Arc::new).collect();
        let routes = route_configs
            .iter()
            .map(|r| {
                let prev = old_route(r);
                let metrics = prev
                    .map(|o| o.metrics.clone())
                    .filter(|m| m.upstream.as_deref() == Some(r.upstream.as_str()));
                let metrics = metrics.unwrap_or_else(|| {
                    Arc::new(crate::observe::RouteMetrics::new(
                        &r.name,
                        Some(&r.upstream),
                    ))
                });
                let admission = prev
                    .filter(|o| same_admission(&o.config, r))
                    .map(|o| o.admission.clone())
                    .unwrap_or_else(|| Arc::new(Admission::new(r, metrics.clone())));
                let retry = prev
                    .filter(|o| o.config.retry == r.retry)
                    .map(|o| o.retry.clone())
                    .unwrap_or_else(|| Arc::new(crate::retry::RetryPolicy::new(&r.retry)));
                let upstream = upstreams[&r.upstream].clone();
                admission.attach(&upstream);
                Arc::new(RouteState {
                    config: r.clone(),
                    upstream,
                    admission,
                    retry,
                    metrics,
                    auth: prepared.route_auth.get(&r.name).cloned(),
                    body_read_timeout: config.server.body_read_timeout,
                })
            })
            .collect();
        Table {
            router: Router::new(&route_configs),
            config: Arc::new(config),
            routes,
            upstreams,
            auth: prepared.auth.clone(),
        }
    }
}

/// Admission state can carry over when nothing it was built from changed. A fixed limit does not
/// depend on the budget (each request brings its own deadline); an adaptive one guards latency
/// against it, so a new budget starts it afresh.
fn same_admission(a: &RouteConfig, b: &RouteConfig) -> bool {
    let adaptive = matches!(a.concurrency, crate::config::Concurrency::Adaptive { .. });
    a.upstream == b.upstream
        && a.concurrency == b.concurrency
        && (!adaptive || a.budget == b.budget)
        && a.queue.max_depth == b.queue.max_depth
        && a.queue.max_wait == b.queue.max_wait
        && a.retry_after_max == b.retry_after_max
}

/// Gateway-wide state the proxy reads on every request.
pub struct Shared {
    pub table: ArcSwap<Table>,
    /// The file reloads read (none when started from a config in memory).
    pub config_path: Option<std::path::PathBuf>,
    /// Reloads are applied one at a time.
    pub reloading: std::sync::Mutex<()>,
    /// Set once a drain has begun: HTTP/1.1 answers then carry `Connection: close`.
    pub draining: std::sync::atomic::AtomicBool,
    /// When the drain that has begun must be over (see `reload::apply`).
    pub drain_deadline: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The listener's certificate, loaded at start and re-read into on reload and when its files
    /// change (none without `server.tls`).
    pub server_tls: Option<Arc<crate::tls::ServerTls>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(concurrency: &str, budget: &str) -> RouteConfig {
        let yaml = format!(
            r#"
upstreams:
  app: {{ url: "http://127.0.0.1:9" }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: app
    budget: {budget}
    concurrency: {concurrency}
    queue: {{ max_wait: 1s }}
"#
        );
        let mut config = crate::config::from_yaml(&yaml, Vec::new()).expect("valid");
        config.routes.remove(0)
    }

    #[test]
    fn a_new_budget_restarts_only_an_adaptive_limit() {
        assert!(same_admission(&route("4", "2s"), &route("4", "3s")));
        assert!(same_admission(&route("auto", "2s"), &route("auto", "2s")));
        assert!(!same_admission(&route("auto", "2s"), &route("auto", "3s")));
        assert!(!same_admission(&route("4", "2s"), &route("5", "2s")));
    }
}
