//! The admin listener, separate from traffic: `GET /healthz`, `/readyz`, `/metrics`, `/config`
//! and `POST /reload`.

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
            metrics::gauge!("breakwater_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            handle
        })
        .clone()
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let handle = metrics_handle();
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
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(answer(req, &shared, &handle).await) }
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

fn readiness(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.draining.load(Ordering::Relaxed) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let table = shared.table.load();
    if table.config.admin.ready_requires_upstream {
        let mut waiting: Vec<&str> = table
            .upstreams
            .iter()
            .filter(|(_, u)| !u.connector.ever_connected())
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
        let state = up.pool.state();
        let idle = state.idle_connections as f64;
        let active = (state.connections - state.idle_connections) as f64;
        metrics::gauge!("breakwater_upstream_connections", "upstream" => name.clone(), "state" => "idle").set(idle);
        metrics::gauge!("breakwater_upstream_connections", "upstream" => name.clone(), "state" => "active").set(active);
    }
}
