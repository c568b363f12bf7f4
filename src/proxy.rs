//! The request's journey through the gateway: route → auth → admission → upstream → relayed
//! answer. [`Proxy`] is the tower service hyper is given (through `TowerToHyperService`); it
//! never fails: every error becomes an answer in [`crate::respond`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST};
use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::admission::{Admission, Permit};
use crate::body::{BodyOutcome, LimitedBody, OnBodyEnd, RelayBody, ResponseBody};
use crate::circuit::Circuit;
use crate::config::{Config, RouteConfig};
use crate::error::ProxyError;
use crate::forward::{self, ForwardInfo};
use crate::listener::ConnInfo;
use crate::observe::RequestRecord;
use crate::prepare::Prepared;
use crate::respond::{error_response, AnswerContext};
use crate::routing::Router;
use crate::upstream::{Lease, Replay, Upstream, UpstreamError};

/// Everything a route needs at request time, built once per configuration.
pub struct RouteState {
    pub config: Arc<RouteConfig>,
    pub upstream: Arc<Upstream>,
    pub circuit: Arc<Circuit>,
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
        let reuse_upstream = |u: &crate::config::UpstreamConfig| {
            old.and_then(|t| t.upstreams.get(&u.name))
                .filter(|o| o.config == *u && o.tls.as_ref() == prepared.upstream_tls.get(&u.name))
                .cloned()
        };
        let old_route =
            |r: &RouteConfig| old.and_then(|t| t.routes.iter().find(|o| o.config.name == r.name));
        let upstreams: HashMap<String, Arc<Upstream>> = config
            .upstreams
            .values()
            .map(|u| {
                let up = reuse_upstream(u).unwrap_or_else(|| {
                    let tls = prepared.upstream_tls.get(&u.name).cloned();
                    Arc::new(Upstream::new(u.clone(), tls))
                });
                (u.name.clone(), up)
            })
            .collect();
        let circuits: HashMap<String, Arc<Circuit>> = config
            .upstreams
            .values()
            .map(|u| {
                let kept = old.and_then(|t| {
                    t.routes
                        .iter()
                        .find(|r| {
                            r.upstream.config.name == u.name
                                && r.upstream.config.circuit == u.circuit
                        })
                        .map(|r| r.circuit.clone())
                });
                let c = kept.unwrap_or_else(|| Arc::new(Circuit::new(&u.name, &u.circuit)));
                (u.name.clone(), c)
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
                Arc::new(RouteState {
                    config: r.clone(),
                    upstream: upstreams[&r.upstream].clone(),
                    circuit: circuits[&r.upstream].clone(),
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

/// Admission state can carry over when nothing it was built from changed (budgets may change:
/// each request brings its own deadline).
fn same_admission(a: &RouteConfig, b: &RouteConfig) -> bool {
    a.upstream == b.upstream
        && a.concurrency == b.concurrency
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
    pub drain_deadline: std::sync::Mutex<Option<Instant>>,
    /// The listener's certificate, loaded at start and re-read into on reload and when its files
    /// change (none without `server.tls`).
    pub server_tls: Option<Arc<crate::tls::ServerTls>>,
}

#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Proxy { shared }
    }
}

impl tower::Service<Request<Incoming>> for Proxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { Ok(handle(shared, req).await) })
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ResponseBody> {
    let arrived = Instant::now();
    let conn = req
        .extensions()
        .get::<ConnInfo>()
        .cloned()
        .unwrap_or_else(ConnInfo::unknown);
    let refused = conn.activity.request_started();
    let table = shared.table.load_full();
    let request_id = forward::request_id(req.headers());
    let mut record = RequestRecord::new(
        arrived,
        req.method(),
        req.uri().path(),
        &request_id,
        conn.peer,
        req.headers(),
    );

    if let Some(why) = refused {
        return gateway_answer(&shared, ProxyError::BadRequest(why), None, record, &conn);
    }
    let mut req = req;
    match normalize_target(&mut req) {
        Ok(true) => record.path = req.uri().path().to_string(),
        Ok(false) => {}
        Err(e) => return gateway_answer(&shared, e, None, record, &conn),
    }
    let route = match route_for(&table, &req) {
        Ok(r) => r,
        Err(e) => return gateway_answer(&shared, e, None, record, &conn),
    };
    record.metrics = route.metrics.clone();

    // Before the body is read or admission is asked: a refused caller costs no slot.
    if let Some(auth) = &route.auth {
        if let Err(e) = crate::auth::authenticate(auth, req.headers_mut(), conn.peer) {
            route.metrics.auth_failed(e.reason());
            return gateway_answer(&shared, e, Some(&route.config), record, &conn);
        }
    }

    let mut resp = match proxy_to(&route, req, arrived, &request_id, &conn, record).await {
        Ok(resp) => resp,
        Err((e, record)) => return gateway_answer(&shared, e, Some(&route.config), record, &conn),
    };
    if shared.draining.load(Ordering::Relaxed) {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Replaces the request's path with its normalised form, which is then both routed and
/// forwarded. Returns whether it changed.
fn normalize_target(req: &mut Request<Incoming>) -> Result<bool, ProxyError> {
    if req.uri().path_and_query().is_none() || !req.uri().path().starts_with('/') {
        return Err(ProxyError::BadRequest("request target must be a path"));
    }
    let normalized = match crate::routing::normalize_path(req.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(false),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(why) => return Err(ProxyError::BadRequest(why)),
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| ProxyError::BadRequest("request target cannot be normalised"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| ProxyError::BadRequest("request target cannot be normalised"))?;
    Ok(true)
}

fn route_for(table: &Table, req: &Request<Incoming>) -> Result<Arc<RouteState>, ProxyError> {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()));
    table
        .router
        .route(req.method(), host, req.uri().path())
        .map(|i| table.routes[i].clone())
        .ok_or(ProxyError::NoRoute)
}

fn gateway_answer(
    shared: &Shared,
    err: ProxyError,
    route: Option<&RouteConfig>,
    mut record: RequestRecord,
    conn: &ConnInfo,
) -> Response<ResponseBody> {
    let reason = err.reason();
    let mut resp = error_response(
        &err,
        &AnswerContext {
            route,
            request_id: &record.request_id,
        },
    );
    if reason.is_refusal() {
        record.metrics.shed(reason);
    }
    // A request whose body was refused unread leaves the connection out of sync; so does one
    // that ends while draining.
    if matches!(
        err,
        ProxyError::BodyTooLarge { .. } | ProxyError::BadRequest(_)
    ) || shared.draining.load(Ordering::Relaxed)
    {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    record.status = resp.status();
    record.reason = Some(reason);
    let bytes = resp.body().size_hint().exact().unwrap_or(0);
    record.finish(bytes, true);
    conn.activity.request_finished();
    resp
}

async fn proxy_to(
    route: &RouteState,
    req: Request<Incoming>,
    arrived: Instant,
    request_id: &str,
    conn: &ConnInfo,
    mut record: RequestRecord,
) -> Result<Response<ResponseBody>, (ProxyError, RequestRecord)> {
    match send_upstream(route, req, arrived, request_id, conn, &mut record).await {
        Ok((resp, lease, permit, sent_at)) => {
            let (mut parts, body) = resp.into_parts();
            forward::response_headers(&mut parts.headers, request_id);
            // hyper answers each client in the client's own version.
            parts.version = http::Version::default();
            record.status = parts.status;
            let deadline = arrived + route.config.budget;
            let mut exchange = Exchange {
                lease: Some(lease),
                permit: Some(permit),
                sent_at,
                record: Some(record),
                conn: conn.clone(),
            };
            if body.size_hint().exact().is_none_or(|n| n > BUFFER_LIMIT) {
                let body = RelayBody::new(body, deadline, Box::new(exchange));
                return Ok(Response::from_parts(parts, body.boxed_unsync()));
            }
            // A small answer of known length is read whole first: the client then gets it in one
            // write, and the upstream connection and slot are free before the client has read it.
            match tokio::time::timeout_at(deadline, body.collect()).await {
                Ok(Ok(collected)) => {
                    exchange.upstream_done(true);
                    let full = http_body_util::Full::new(collected.to_bytes());
                    let body = RelayBody::new(full, deadline, Box::new(exchange));
                    Ok(Response::from_parts(parts, body.boxed_unsync()))
                }
                Ok(Err(e)) => {
                    exchange.upstream_done(false);
                    let record = exchange.record.take().expect("set above");
                    Err((ProxyError::Upstream(e.to_string()), record))
                }
                Err(_elapsed) => {
                    exchange.upstream_done(false);
                    let record = exchange.record.take().expect("set above");
                    Err((ProxyError::BudgetExhausted, record))
                }
            }
        }
        Err(e) => Err((e, record)),
    }
}

/// Upstream answers of known length up to this size are read whole before the answer starts.
const BUFFER_LIMIT: u64 = 64 * 1024;

/// Request bodies up to this size are read whole before the request is sent, so the request can
/// be sent again (keep-alive race, retry policy). Data action payloads are far smaller.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Admits the request and sends it; returns the response head with what must be held until its
/// body has been relayed.
async fn send_upstream(
    route: &RouteState,
    req: Request<Incoming>,
    arrived: Instant,
    request_id: &str,
    conn: &ConnInfo,
    record: &mut RequestRecord,
) -> Result<(Response<Incoming>, Lease, Permit, Instant), ProxyError> {
    let cfg = &route.config;
    let deadline = arrived + cfg.budget;
    let limit = cfg.max_request_body;
    let declared = content_length(req.headers());
    if let Some(len) = declared {
        if len > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    let (mut parts, body) = req.into_parts();
    let idle = route.body_read_timeout;
    let (body, check) = LimitedBody::new(body, limit, idle);

    // Small bodies are read before admission, so a slow client does not hold an upstream slot.
    let small = body.is_end_stream() || declared.is_some_and(|n| n <= REPLAY_LIMIT);
    let buffered = if small {
        match tokio::time::timeout_at(deadline, body.collect()).await {
            Err(_) => return Err(ProxyError::BudgetExhausted),
            Ok(Err(_)) => {
                return Err(check
                    .failure(limit, idle)
                    .unwrap_or(ProxyError::BadRequest("request body ended early")))
            }
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    } else {
        Err(body)
    };
    record.bytes_in = match &buffered {
        Ok(b) => b.len() as u64,
        Err(_) => declared.unwrap_or(0),
    };

    route.circuit.check()?;
    let admitted_at = Instant::now();
    let permit = route.admission.admit(deadline).await?;
    record.queue_wait = Some(admitted_at.elapsed());

    let original_host = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    });
    let up = &route.upstream.config;
    let upstream_host = if up.preserve_host {
        original_host.clone().unwrap_or_else(|| up.authority())
    } else {
        up.authority()
    };
    forward::request_headers(
        &mut parts.headers,
        &ForwardInfo {
            peer: conn.peer,
            proto: conn.proto,
            original_host: original_host.as_deref(),
            request_id,
            remaining: deadline.saturating_duration_since(Instant::now()),
            upstream_host: &upstream_host,
        },
    );
    parts.uri = upstream_uri(up.base_path(), &parts.uri)?;
    parts.version = http::Version::HTTP_11;
    let (replay, mut upstream_req) = match buffered {
        Ok(bytes) => {
            let replay = Replay {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                body: bytes.clone(),
            };
            (
                Some(replay),
                Request::from_parts(parts, crate::body::full(bytes)),
            )
        }
        Err(stream) => (None, Request::from_parts(parts, stream.boxed_unsync())),
    };
    route.retry.on_request();

    let mut retries = 0;
    loop {
        let sent_at = Instant::now();
        let sending = route.upstream.send(upstream_req, replay.as_ref());
        let send_error = match tokio::time::timeout_at(deadline, sending).await {
            Err(_elapsed) => {
                // Dropping the send future dropped its lease mid-exchange, which closes that
                // upstream connection: the backend stops working for a caller we already answered.
                permit.abandon();
                return Err(ProxyError::BudgetExhausted);
            }
            Ok(Ok((resp, lease))) => {
                let status = resp.status();
                if status.is_server_error() {
                    route.circuit.record_failure();
                } else {
                    route.circuit.record_success();
                }
                let attempt_took = sent_at.elapsed();
                let again = replay.as_ref().filter(|_| {
                    route.retry.retries_status(&record.method, status)
                        && route
                            .retry
                            .allow(retries, deadline, expected(route, attempt_took))
                });
                if let Some(replay) = again {
                    // Dropped unread: the connection is closed rather than drained.
                    drop((resp, lease));
                    retries += 1;
                    count_retry(route, crate::retry::RetryReason::Status);
                    upstream_req = replay.build();
                    set_budget_header(upstream_req.headers_mut(), deadline);
                    continue;
                }
                record.upstream_time = Some(sent_at.elapsed());
                return Ok((resp, lease, permit, sent_at));
            }
            Ok(Err(e)) => e,
        };
        if let Some(failure) = check.failure(limit, idle) {
            permit.abandon();
            return Err(failure);
        }
        route.circuit.record_failure();
        match send_error.unsent {
            Some(mut again)
                if route
                    .retry
                    .allow(retries, deadline, route.admission.expected_service()) =>
            {
                retries += 1;
                count_retry(route, crate::retry::RetryReason::NotSent);
                set_budget_header(again.headers_mut(), deadline);
                upstream_req = again;
                continue;
            }
            _ => {}
        }
        return Err(match send_error.error {
            UpstreamError::Unavailable(why) => {
                permit.abandon();
                ProxyError::UpstreamUnavailable(why)
            }
            UpstreamError::NotSent(e) => {
                permit.abandon();
                ProxyError::UpstreamUnavailable(e.to_string())
            }
            UpstreamError::Failed(e) => {
                permit.failed(sent_at.elapsed());
                ProxyError::Upstream(e.to_string())
            }
        });
    }
}

/// How long another attempt should be expected to take: the route's estimate, or what this
/// attempt took if that was longer (before the first completion there is no estimate).
fn expected(route: &RouteState, attempt_took: std::time::Duration) -> Option<std::time::Duration> {
    Some(
        route
            .admission
            .expected_service()
            .map_or(attempt_took, |e| e.max(attempt_took)),
    )
}

fn count_retry(route: &RouteState, reason: crate::retry::RetryReason) {
    metrics::counter!("breakwater_retries_total",
        "route" => route.config.name.clone(), "reason" => reason.as_str())
    .increment(1);
}

fn set_budget_header(headers: &mut http::HeaderMap, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    headers.insert(
        forward::BUDGET_HEADER,
        HeaderValue::from(left.as_millis() as u64),
    );
}

/// What an exchange holds until its response body has been relayed: the upstream connection, the
/// admission slot, and the request's record.
struct Exchange {
    lease: Option<Lease>,
    permit: Option<Permit>,
    sent_at: Instant,
    record: Option<RequestRecord>,
    conn: ConnInfo,
}

impl Exchange {
    /// The upstream side is over: the connection goes back (or is closed) and the slot is freed.
    fn upstream_done(&mut self, complete: bool) {
        if let Some(lease) = self.lease.take() {
            lease.release(complete);
        }
        if let Some(permit) = self.permit.take() {
            if complete {
                permit.succeeded(self.sent_at.elapsed());
            } else {
                permit.failed(self.sent_at.elapsed());
            }
        }
    }
}

impl OnBodyEnd for Exchange {
    fn body_ended(mut self: Box<Self>, outcome: BodyOutcome) {
        self.upstream_done(outcome.complete);
        if let Some(record) = self.record.take() {
            record.finish(outcome.bytes, outcome.complete);
        }
        self.conn.activity.request_finished();
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The upstream sees origin-form: its base path, then the caller's path and query.
fn upstream_uri(base_path: &str, uri: &Uri) -> Result<Uri, ProxyError> {
    let pq = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    let joined = if base_path.is_empty() {
        pq.to_string()
    } else {
        format!("{base_path}{pq}")
    };
    joined
        .parse()
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_joins_base_path() {
        let u: Uri = "/v1/x?a=1".parse().unwrap();
        assert_eq!(upstream_uri("", &u).unwrap(), "/v1/x?a=1");
        assert_eq!(upstream_uri("/api", &u).unwrap(), "/api/v1/x?a=1");
        let abs: Uri = "http://gw.example.com/p".parse().unwrap();
        assert_eq!(upstream_uri("", &abs).unwrap(), "/p");
    }
}
