//! `breakwater demo`: shows the problem and the fix side by side on loopback, with nothing to
//! install. A simulated uvicorn-like backend is hit by a burst of callers directly, then through
//! the gateway, and the two outcomes are printed as a table.
//!
//! The same pieces back the burst benchmark: `demo backend` serves the simulated backend on its
//! own, and `demo burst` fires a burst at any URL, so other proxies can be measured with them.

pub mod backend;
pub mod burst;
pub mod load;
pub mod report;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use breakwater::config::units::format_duration;

pub use backend::{BackendOptions, Pinning, SimBackend};
pub use report::Summary;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub callers: usize,
    pub caller_timeout: Duration,
    pub budget: Duration,
    pub workers: usize,
    pub service_time: Duration,
    /// How the simulated backend hands connections to its workers.
    pub pinning: Pinning,
    pub seed: u64,
    pub queue_depth: usize,
    /// Requests sent through the gateway before the burst, so its estimator has seen the
    /// backend (a gateway in production has; the cold start is described in docs).
    pub warmup: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            callers: 200,
            caller_timeout: Duration::from_secs(3),
            budget: Duration::from_secs(2),
            workers: 4,
            service_time: Duration::from_millis(200),
            pinning: Pinning::Uvicorn,
            seed: 1,
            queue_depth: 100,
            warmup: 8,
        }
    }
}

impl DemoOptions {
    /// The simulated backend's shape; each backend of a run gets its own seed.
    pub fn backend(&self, nth: u64) -> BackendOptions {
        BackendOptions {
            workers: self.workers,
            service_time: self.service_time,
            pinning: self.pinning,
            seed: self.seed.wrapping_add(nth),
        }
    }

    /// Requests per second the simulated backend can finish (all workers busy).
    pub fn capacity(&self) -> f64 {
        self.workers as f64 / self.service_time.as_secs_f64()
    }

    /// The recommended layout: one single-worker backend per port, each an endpoint taking one
    /// request at a time; the route takes their sum.
    pub fn endpoints_yaml(&self, backends: &[SocketAddr]) -> String {
        let endpoints: String = backends
            .iter()
            .map(|a| format!("      - {{ url: \"http://{a}\", concurrency: 1 }}\n"))
            .collect();
        let upstream = format!("    endpoints:\n{endpoints}    pool: {{ min_idle: 1 }}\n");
        self.yaml(&upstream, "")
    }

    /// One port whose answers name their worker: the gateway told so, and meeting the workers
    /// with a health-check probe (the simulated backend answers `/healthz` at once).
    pub fn named_yaml(&self, backend: SocketAddr) -> String {
        self.one_port_yaml(
            backend,
            "    worker_header: x-worker\n    worker_probe: /healthz\n",
        )
    }

    /// The gateway configuration the demo runs with.
    pub fn gateway_yaml(&self, backend: SocketAddr) -> String {
        self.one_port_yaml(backend, "")
    }

    /// One url to `backend`, with the upstream's `extra` keys, a pool of twice the workers
    /// (half kept warm), and the route taking as many as there are workers.
    fn one_port_yaml(&self, backend: SocketAddr, extra: &str) -> String {
        let upstream = format!(
            "    url: \"http://{backend}\"\n{extra}    pool: {{ max_connections: {}, min_idle: {} }}\n",
            self.workers * 2,
            self.workers
        );
        self.yaml(&upstream, &format!("    concurrency: {}\n", self.workers))
    }

    /// The gateway around an upstream's keys and the route's own `concurrency` line (if any).
    fn yaml(&self, upstream: &str, concurrency: &str) -> String {
        format!(
            r#"
server: {{ listen: "127.0.0.1:0" }}
admin: {{ enabled: false }}
upstreams:
  analytics:
{upstream}routes:
  - name: sentiment
    match: {{ path_prefix: /v1/sentiment, methods: [POST] }}
    upstream: analytics
    budget: {budget}
{concurrency}    queue: {{ max_depth: {depth}, max_wait: {budget} }}
"#,
            budget = format_duration(self.budget),
            depth = self.queue_depth,
        )
    }
}

pub struct DemoResult {
    pub direct: Summary,
    pub gateway: Summary,
    /// Through Breakwater with one endpoint per worker (single-worker backends on their own
    /// ports).
    pub endpoints: Summary,
    /// Through Breakwater to one port whose answers name their worker (`worker_header`).
    pub named: Summary,
    pub wasted_direct: usize,
    pub wasted_gateway: usize,
    pub wasted_endpoints: usize,
    pub wasted_named: usize,
    /// Connections each backend worker accepted (empty with the free model).
    pub connections_direct: Vec<usize>,
    pub connections_gateway: Vec<usize>,
    pub connections_named: Vec<usize>,
    /// Requests each backend worker finished by the end of the burst.
    pub served_direct: Vec<usize>,
    pub served_gateway: Vec<usize>,
    pub served_endpoints: Vec<usize>,
    pub served_named: Vec<usize>,
}

fn progress(msg: &str) {
    println!("  {msg}");
    let _ = std::io::stdout().flush();
}

pub async fn run(opts: &DemoOptions) -> Result<DemoResult, DemoError> {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let model = match opts.pinning {
        Pinning::Uvicorn => "each connection pinned to the worker that accepted it, like uvicorn",
        Pinning::Free => "any request gets any free worker (--pinning free)",
    };
    progress(&format!(
        "[1/6] starting a simulated backend: {} workers x {} per request (capacity {:.0} req/s), unbounded backlog, {model}",
        opts.workers,
        format_duration(opts.service_time),
        opts.capacity()
    ));
    let direct_backend = SimBackend::start(any, &opts.backend(0)).await?;
    let gw_backend = SimBackend::start(any, &opts.backend(1)).await?;

    progress(&format!(
        "[2/6] {} callers at once, straight to the backend, each giving up after {}",
        opts.callers,
        format_duration(opts.caller_timeout)
    ));
    let url: Uri = format!("http://{}/v1/sentiment", direct_backend.addr).parse()?;
    let direct = fire_elsewhere(&url, opts).await?;

    progress(&format!(
        "[3/6] starting Breakwater in front of a fresh backend: budget {}, concurrency {}, queue {}",
        format_duration(opts.budget),
        opts.workers,
        opts.queue_depth
    ));
    let loaded = breakwater::prepare::from_yaml(&opts.gateway_yaml(gw_backend.addr), Vec::new())?;
    let running = breakwater::gateway::start(loaded).await?;
    let url: Uri = format!("http://{}/v1/sentiment", running.addr).parse()?;
    warm(&url, opts).await;

    progress(&format!(
        "[4/6] the same {} callers through Breakwater",
        opts.callers
    ));
    let via = fire_elsewhere(&url, opts).await?;
    running.drain(Duration::from_secs(2)).await;

    progress(&format!(
        "[5/6] the same {} callers through Breakwater, one endpoint per worker: {} single-worker backends on their own ports",
        opts.callers, opts.workers
    ));
    let mut singles = Vec::new();
    for i in 0..opts.workers.max(1) {
        let one = BackendOptions {
            workers: 1,
            ..opts.backend(2 + i as u64)
        };
        singles.push(SimBackend::start(any, &one).await?);
    }
    let addrs: Vec<SocketAddr> = singles.iter().map(|b| b.addr).collect();
    let loaded = breakwater::prepare::from_yaml(&opts.endpoints_yaml(&addrs), Vec::new())?;
    let by_endpoint = breakwater::gateway::start(loaded).await?;
    let url: Uri = format!("http://{}/v1/sentiment", by_endpoint.addr).parse()?;
    warm(&url, opts).await;
    let endpoints = fire_elsewhere(&url, opts).await?;
    by_endpoint.drain(Duration::from_secs(2)).await;

    progress(&format!(
        "[6/6] the same {} callers through Breakwater to one port again, its answers naming their worker (worker_header, worker_probe)",
        opts.callers
    ));
    let named_backend = SimBackend::start(any, &opts.backend(2 + opts.workers as u64)).await?;
    let loaded = breakwater::prepare::from_yaml(&opts.named_yaml(named_backend.addr), Vec::new())?;
    let by_worker = breakwater::gateway::start(loaded).await?;
    let url: Uri = format!("http://{}/v1/sentiment", by_worker.addr).parse()?;
    warm(&url, opts).await;
    let named = fire_elsewhere(&url, opts).await?;
    by_worker.drain(Duration::from_secs(2)).await;
    // Let abandoned direct work finish counting (bounded: it is all sleeping).
    let wasted_direct = direct_backend
        .stats
        .wasted
        .load(std::sync::atomic::Ordering::Relaxed);
    let wasted_gateway = gw_backend
        .stats
        .wasted
        .load(std::sync::atomic::Ordering::Relaxed);
    let wasted_named = named_backend
        .stats
        .wasted
        .load(std::sync::atomic::Ordering::Relaxed);
    let wasted_endpoints = singles
        .iter()
        .map(|b| b.stats.wasted.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let landed = |b: &SimBackend| match opts.pinning {
        Pinning::Uvicorn => b.stats.connections_per_worker(),
        Pinning::Free => Vec::new(),
    };
    Ok(DemoResult {
        direct: Summary::of(&direct),
        gateway: Summary::of(&via),
        endpoints: Summary::of(&endpoints),
        named: Summary::of(&named),
        wasted_direct,
        wasted_gateway,
        wasted_endpoints,
        wasted_named,
        connections_direct: landed(&direct_backend),
        connections_gateway: landed(&gw_backend),
        connections_named: landed(&named_backend),
        served_direct: direct_backend.stats.served_per_worker(),
        served_gateway: gw_backend.stats.served_per_worker(),
        served_endpoints: singles
            .iter()
            .flat_map(|b| b.stats.served_per_worker())
            .collect(),
        served_named: named_backend.stats.served_per_worker(),
    })
}

/// Requests sent through the gateway before the burst, a few at a time, so its estimator has
/// seen the backend.
async fn warm(url: &Uri, opts: &DemoOptions) {
    let mut sent = 0;
    while sent < opts.warmup {
        let batch = (opts.warmup - sent).min(opts.workers.max(1));
        let calls = (0..batch).map(|i| burst::call(url, i));
        futures_util::future::join_all(calls).await;
        sent += batch;
    }
}

/// Callers run on their own runtime thread, as they would from another machine: sharing the
/// gateway's worker threads would delay the gateway's accepts behind 200 callers' connects and
/// charge that to the gateway.
async fn fire_elsewhere(url: &Uri, opts: &DemoOptions) -> Result<burst::Burst, DemoError> {
    let (url, callers, timeout) = (url.clone(), opts.callers, opts.caller_timeout);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build();
        let result = rt.map(|rt| rt.block_on(burst::fire(&url, callers, timeout)));
        let _ = tx.send(result);
    });
    let result = rx
        .await
        .map_err(|_| std::io::Error::other("burst thread ended without a result"))?;
    Ok(result?)
}

/// The one-line verdict under the table.
pub fn verdict(r: &DemoResult, opts: &DemoOptions) -> String {
    let g = &r.gateway;
    let goodput = g.goodput(opts.capacity()).unwrap_or(0.0) * 100.0;
    if g.timeouts == 0 && g.refused_without_retry_after == 0 {
        format!(
            "Verdict: direct, {} of {} callers hung until their {} timeout; through Breakwater none did — {} got an answer, {} a 503 with Retry-After (p99 {}), backend kept at {:.0}% of capacity.",
            r.direct.timeouts,
            r.direct.callers,
            format_duration(opts.caller_timeout),
            g.ok,
            g.refused_with_retry_after,
            g.refusal_p99
                .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into()),
            goodput,
        ) + &if goodput < 90.0 && opts.pinning == Pinning::Uvicorn {
            format!(
                " The backend is pinned: the gateway's connections reach fewer workers than its concurrency assumes (see the rows above). With one endpoint per worker every worker is reached: {} answered, {:.0}% of capacity; with one port whose answers name their worker, {} answered, {:.0}%.",
                r.endpoints.ok,
                r.endpoints.goodput(opts.capacity()).unwrap_or(0.0) * 100.0,
                r.named.ok,
                r.named.goodput(opts.capacity()).unwrap_or(0.0) * 100.0
            )
        } else {
            String::new()
        }
    } else {
        format!(
            "Verdict: through Breakwater {} callers still timed out and {} refusals lacked Retry-After: the budget ({}) should be below the caller timeout ({}).",
            g.timeouts,
            g.refused_without_retry_after,
            format_duration(opts.budget),
            format_duration(opts.caller_timeout)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Uri(#[from] http::uri::InvalidUri),
    #[error(transparent)]
    Config(#[from] breakwater::config::ConfigError),
    #[error(transparent)]
    Start(#[from] breakwater::gateway::StartError),
}
