//! `upstreams.<name>.discovery`: the url's host is resolved on a timer and every address it
//! resolves to is an endpoint of its own (an ECS service in Cloud Map has one A record per task),
//! with `endpoint_concurrency` as each one's limit. An address that stays keeps its endpoint (its
//! pool, health and requests in flight); a new one gets a fresh endpoint; one that goes is
//! dropped from the choice and closes once its requests in flight are done. When the name does
//! not resolve, or resolves to nothing, the endpoints stay as they were.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::{Endpoint, Upstream};
use crate::config::{DiscoveryConfig, EndpointConfig};

/// Resolving a name to addresses: the system resolver, or one a test controls.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system's resolver (as the connector uses for every new connection).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// The longest a single resolution may take: a resolver that hangs must not stop the timer.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Upstream {
    /// Starts resolving the url's host every `discovery.every` (the first time at once), when the
    /// upstream has `discovery`. The task ends when the upstream is dropped.
    pub fn start_discovery(self: &Arc<Self>) {
        self.discover_with(Arc::new(SystemResolver));
    }

    /// [`Upstream::start_discovery`] with a resolver of the caller's.
    pub fn discover_with(self: &Arc<Self>, resolver: Arc<dyn Resolve>) {
        let Some(discovery) = self.config.discovery.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let template = self.config.endpoints[0].clone();
        rt.spawn(async move {
            let mut failing = false;
            loop {
                let limit = discovery.every.min(RESOLVE_TIMEOUT);
                let lookup = resolver.resolve(&template.host, template.port);
                let resolved = match tokio::time::timeout(limit, lookup).await {
                    Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
                    Ok(Ok(_)) => Err("resolves to no address".to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {limit:?}")),
                };
                let Some(up) = weak.upgrade() else { return };
                match resolved {
                    Ok(addrs) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!(upstream = %up.config.name, host = %template.host, "discovery resolves again");
                        }
                        up.found(&discovery, &template, addrs);
                    }
                    Err(error) => {
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(upstream = %up.config.name, host = %template.host, %error,
                                "discovery cannot resolve the upstream's host; keeping the endpoints it has");
                        }
                    }
                }
                drop(up);
                tokio::time::sleep(discovery.every).await;
            }
        });
    }

    /// The addresses the host resolved to become the endpoints.
    fn found(
        self: &Arc<Self>,
        d: &DiscoveryConfig,
        template: &EndpointConfig,
        mut addrs: Vec<SocketAddr>,
    ) {
        addrs.sort();
        addrs.dedup();
        let current = self.endpoints.load_full();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                let config = EndpointConfig {
                    url: template.url.clone(),
                    host: a.ip().to_string(),
                    port: a.port(),
                    concurrency: d.endpoint_concurrency,
                    tls_name: template.tls_name.clone(),
                };
                current
                    .iter()
                    .find(|e| e.config == config)
                    .cloned()
                    .unwrap_or_else(|| Endpoint::start(&self.config, &config, self.tls.as_ref()))
            })
            .collect();
        let unchanged = next.len() == current.len()
            && next
                .iter()
                .zip(current.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return;
        }
        let labels = |from: &[Arc<Endpoint>], not_in: &[Arc<Endpoint>]| -> Vec<String> {
            from.iter()
                .filter(|e| !not_in.iter().any(|o| Arc::ptr_eq(o, e)))
                .map(|e| e.label.to_string())
                .collect()
        };
        tracing::info!(
            upstream = %self.config.name,
            added = ?labels(&next, &current),
            removed = ?labels(&current, &next),
            endpoints = next.len(),
            "discovered endpoints changed"
        );
        for e in &next {
            e.owned_by(self);
        }
        self.endpoints.store(Arc::new(next));
        self.recompute();
        // Requests waiting for a slot look at the new endpoints even if the capacity is the same.
        self.changed.notify_waiters();
    }
}
