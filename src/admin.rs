//! The admin listener, separate from traffic: `GET /healthz`, `/readyz`, `/metrics`, `/config`
//! and `POST /reload`. The last two may need a bearer token (see [`access`]).

pub mod access;

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::proxy::Shared;

/// Histogram buckets from half a millisecond to a minute: refusals take microseconds, data
/// actions may take up to 60 s.
const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0,
    30.0, 60.0,
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once (several gateways in one test process
/// share it) and returns the handle that renders it.
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&BUCKETS)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours just stays unused
            // and /metrics renders nothing, which a test would notice.
            let _ = metrics::set_global_recorder(recorder);
            crate::observe::describe_metrics();
            metrics::gauge!("breakwater_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often the recorder drains its histogram samples into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder queues every histogram sample until something drains it: a scrape, or its upkeep.
/// Many deployments are never scraped, so the upkeep runs on its own thread (the recorder is
/// process-wide and outlives any one runtime); memory then stays flat under steady load.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread; memory grows until /metrics is scraped");
    }
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let handle = metrics_handle();
    let access = match listener.local_addr() {
        Ok(listen) => access::AdminAccess::from_env(listen),
        // Unknowable only on a broken socket; then nothing is reachable anyway.
        Err(_) => access::AdminAccess::from_env(([0, 0, 0, 0], 0).into()),
    };
    if let Some(warning) = access.warning() {
        tracing::warn!("{warning}");
    }
    let access = Arc::new(access);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let handle = handle.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let handle = handle.clone();
                let allowed = access.check(req.uri().path(), req.headers());
                async move {
                    Ok::<_, Infallible>(match allowed {
                        Ok(()) => answer(req, &shared, &handle).await,
                        Err(denied) => refuse(denied),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    handle: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readiness(shared),
        (&Method::GET, "/metrics") => {
            publish_pool_gauges(shared);
            let mut r = text(StatusCode::OK, handle.render());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/config") => {
            let table = shared.table.load();
            json(StatusCode::OK, crate::gateway::describe(&table))
        }
        (&Method::POST, "/reload") => match crate::reload::reload(shared.clone()).await {
            Ok(applied) => json(
                StatusCode::OK,
                serde_json::json!({ "result": "ok", "needs_restart": applied.needs_restart }),
            ),
            Err(crate::reload::ReloadError::Config(e)) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({
                    "result": "error",
                    "problems": e.problems().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => json(
                StatusCode::CONFLICT,
                serde_json::json!({ "result": "error", "problems": [e.to_string()] }),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn refuse(denied: access::Denied) -> Response<Full<Bytes>> {
    let mut r = json(denied.status(), denied.body());
    if denied == access::Denied::Unauthorized {
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static(access::CHALLENGE),
        );
    }
    r
}

fn readiness(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.draining.load(Ordering::Relaxed) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let table = shared.table.load();
    if table.config.admin.ready_requires_upstream {
        let mut waiting: Vec<&str> = table
            .upstreams
            .iter()
            .filter(|(_, u)| !u.ever_connected())
            .map(|(n, _)| n.as_str())
            .collect();
        if !waiting.is_empty() {
            waiting.sort();
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no connection yet to upstream(s): {}\n", waiting.join(", ")),
            );
        }
    }
    text(StatusCode::OK, "ready\n")
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(status, format!("{v:#}\n"));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Pool sizes are read when scraped rather than tracked on every checkout.
fn publish_pool_gauges(shared: &Shared) {
    let table = shared.table.load();
    for (name, up) in &table.upstreams {
        let (mut idle, mut all) = (0u32, 0u32);
        for e in up.endpoints().iter() {
            let state = e.pool.state();
            idle += state.idle_connections;
            all += state.connections;
        }
        let active = (all - idle) as f64;
        let idle = idle as f64;
        metrics::gauge!("breakwater_upstream_connections", "upstream" => name.clone(), "state" => "idle").set(idle);
        metrics::gauge!("breakwater_upstream_connections", "upstream" => name.clone(), "state" => "active").set(active);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_recorder_drains_itself_without_scrapes() {
        super::metrics_handle();
        // A new thread takes its name a moment after it starts.
        let mut names = Vec::new();
        for _ in 0..200 {
            names = std::fs::read_dir("/proc/self/task")
                .expect("procfs")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect();
            if names.iter().any(|n| n == "metrics-upkeep") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("no upkeep thread; threads: {names:?}");
    }
}
