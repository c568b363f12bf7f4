//! What each request leaves behind: one access-log line and the request metrics. The request's
//! context (`proxy::context`) writes them exactly once, when it is dropped: after the last byte of
//! the answer went out, when the answer failed, or when the caller went away at any point.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;

use crate::error::Reason;
use crate::logline::{micros, AccessLine};

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric family the gateway exports, with the `# HELP` text `/metrics` shows for it
/// (docs/metrics.md has the details). Described once, when the recorder is installed.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    ("breakwater_requests_total", Kind::Counter,
        "Requests answered, by route, method and the status sent to the caller (refusals and the gateway's own answers included)."),
    ("breakwater_request_duration_seconds", Kind::Histogram,
        "Seconds from the request head's arrival to the last byte of the answer (or its abandonment), refusals included."),
    ("breakwater_upstream_duration_seconds", Kind::Histogram,
        "Seconds from handing the request to the upstream pool to the upstream's response head, for answers whose head arrived."),
    ("breakwater_inflight", Kind::Gauge,
        "Admission slots in use: requests admitted to the upstream whose answer has not finished relaying."),
    ("breakwater_concurrency_limit", Kind::Gauge,
        "The route's current concurrency limit (fixed, or the adaptive limiter's value)."),
    ("breakwater_queue_depth", Kind::Gauge,
        "Requests waiting in the route's admission queue for a slot."),
    ("breakwater_queue_wait_seconds", Kind::Histogram,
        "Seconds spent in the admission queue by requests that queued, whether the wait ended with a slot or a refusal."),
    ("breakwater_shed_total", Kind::Counter,
        "Refusals (503 with Retry-After, or the route's fallback), by reason."),
    ("breakwater_retries_total", Kind::Counter,
        "Requests sent to the upstream again, by reason: stale_connection, not_sent, status."),
    ("breakwater_auth_failures_total", Kind::Counter,
        "Callers refused by authentication before taking a queue slot: unauthorized (401) or forbidden (403)."),
    ("breakwater_client_closed_total", Kind::Counter,
        "Requests whose caller went away before its answer was complete, by the phase the request was in."),
    ("breakwater_write_timeouts_total", Kind::Counter,
        "Callers that stopped reading their answer; the connection was closed when the budget ran out."),
    ("breakwater_upstream_connections", Kind::Gauge,
        "Connections in the upstream's pool, idle or active, read when /metrics is scraped."),
    ("breakwater_upstream_connects_total", Kind::Counter,
        "Attempts to open a new upstream connection, by result: ok, error, timeout."),
    ("breakwater_upstream_connections_retired_total", Kind::Counter,
        "Idle pooled connections closed by the gateway just before the peer's idle timeout would close them."),
    ("breakwater_circuit_open", Kind::Gauge,
        "1 while no endpoint of the upstream takes requests beyond probes (every one ejected or probing), 0 otherwise."),
    ("breakwater_upstream_endpoints", Kind::Gauge,
        "The upstream's endpoints, by state: in_service (taking requests or probes) or ejected."),
    ("breakwater_upstream_capacity", Kind::Gauge,
        "Requests the upstream's endpoints in service take at once: the sum of their concurrency (+Inf when one has none). Caps each route's limit."),
    ("breakwater_endpoint_inflight", Kind::Gauge,
        "Requests holding a slot at the endpoint: sent and not yet relayed to the end."),
    ("breakwater_endpoint_requests_total", Kind::Counter,
        "Attempts sent to the endpoint (resends included)."),
    ("breakwater_endpoint_ejected", Kind::Gauge,
        "1 while the endpoint is ejected by its circuit (cooling down or probing), 0 otherwise."),
    ("breakwater_endpoint_ejections_total", Kind::Counter,
        "Times the endpoint was ejected after consecutive failures (connect failures, 5xx, no answer within the budget while another endpoint answered)."),
    ("breakwater_endpoint_workers", Kind::Gauge,
        "With worker_header: the backend's worker processes behind the endpoint that an answer named within the last minute."),
    ("breakwater_endpoint_worker_picks_total", Kind::Counter,
        "With worker_header: how each request's connection was chosen: free (its worker had nothing in flight), unknown (a connection whose worker was not known yet), busy (every connection at hand reached a busy worker)."),
    ("breakwater_endpoint_worker_probes_total", Kind::Counter,
        "With worker_probe: probes sent on new connections to meet the backend's workers, by result: kept (its worker had no connection; it joined the pool), known (closed), failed."),
    ("breakwater_endpoint_worker_rerolls_total", Kind::Counter,
        "With worker_header: connections to busy workers closed, with the pool full, so that a new one may reach another worker."),
    ("breakwater_build_info", Kind::Gauge,
        "Always 1; the version label is the version the binary was built from."),
    ("breakwater_config_reloads_total", Kind::Counter,
        "Configuration reload attempts (SIGHUP, POST /reload), by result: ok, error."),
    ("breakwater_tls_reloads_total", Kind::Counter,
        "Attempts to load a changed listener certificate, by result: ok, error (the previous one keeps serving)."),
    ("breakwater_tls_handshake_failures_total", Kind::Counter,
        "Inbound TLS handshakes that failed (error) or did not finish in time (timeout)."),
    ("breakwater_connections_refused_total", Kind::Counter,
        "Connections closed right after accept, by reason: per_source_limit, proxy_protocol."),
    ("breakwater_connections_parked", Kind::Gauge,
        "Idle HTTP/1 client connections held as a bare stream, their HTTP state released until the next request."),
    ("breakwater_connections_accepted_total", Kind::Counter,
        "Client connections accepted, by the worker (server.workers) whose listening socket took them."),
];

/// Gives every family in [`FAMILIES`] its `# HELP` text, in the recorder installed now.
pub fn describe_metrics() {
    for (name, kind, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// A route's metric handles, registered once when the route is built so the request path does
/// not build label sets and look them up on every request.
///
/// Requests that match no route share one set under `route="none"` ([`RouteMetrics::unmatched`]).
/// Such a request is answered before it reaches auth, admission or an upstream, so that set has
/// only what it can record: `breakwater_requests_total` and `breakwater_request_duration_seconds`,
/// and a caller gone or stalled (`client_closed`, `write_timeouts`) registered the first time it
/// happens. The other handles are no-ops that register no series.
pub struct RouteMetrics {
    pub route: String,
    pub upstream: Option<String>,
    pub duration: Histogram,
    pub upstream_duration: Histogram,
    pub queue_wait: Histogram,
    pub inflight: Gauge,
    pub limit: Gauge,
    pub queue_depth: Gauge,
    shed: Vec<(Reason, Counter)>,
    /// `breakwater_auth_failures_total`: unauthorized, forbidden.
    auth_failures: [Counter; 2],
    /// `breakwater_client_closed_total`, by the phase the request was in (`None`: registered on
    /// first use).
    client_closed: [Option<Counter>; 4],
    /// `breakwater_write_timeouts_total`: callers that did not read their answer in time.
    write_timeouts: Option<Counter>,
    /// `breakwater_requests_total` by method and status, looked up on every request: hashed
    /// with foldhash rather than SipHash, which took ~200 instructions a request here. The keys
    /// are a bounded set the gateway labels itself, so flooding the map is not a concern.
    requests: RwLock<RequestCounters>,
}

type RequestCounters = HashMap<(&'static str, u16), Counter, foldhash::fast::RandomState>;

impl RouteMetrics {
    pub fn new(route: &str, upstream: Option<&str>) -> Self {
        let r = route.to_string();
        let up = upstream.unwrap_or("none").to_string();
        RouteMetrics {
            route: r.clone(),
            upstream: upstream.map(str::to_string),
            duration: metrics::histogram!("breakwater_request_duration_seconds", "route" => r.clone()),
            upstream_duration: metrics::histogram!("breakwater_upstream_duration_seconds",
                "route" => r.clone(), "upstream" => up),
            queue_wait: metrics::histogram!("breakwater_queue_wait_seconds", "route" => r.clone()),
            inflight: metrics::gauge!("breakwater_inflight", "route" => r.clone()),
            limit: metrics::gauge!("breakwater_concurrency_limit", "route" => r.clone()),
            queue_depth: metrics::gauge!("breakwater_queue_depth", "route" => r.clone()),
            shed: Reason::ALL
                .iter()
                .filter(|reason| reason.is_refusal())
                .map(|reason| {
                    (
                        *reason,
                        metrics::counter!("breakwater_shed_total",
                        "route" => r.clone(), "reason" => reason.as_str()),
                    )
                })
                .collect(),
            auth_failures: [Reason::Unauthorized, Reason::Forbidden].map(|reason| {
                metrics::counter!("breakwater_auth_failures_total",
                    "route" => r.clone(), "reason" => reason.as_str())
            }),
            client_closed: Phase::ALL.map(|phase| {
                Some(metrics::counter!("breakwater_client_closed_total",
                    "route" => r.clone(), "phase" => phase.as_str()))
            }),
            write_timeouts: Some(
                metrics::counter!("breakwater_write_timeouts_total", "route" => r.clone()),
            ),
            requests: RwLock::default(),
        }
    }

    /// The metrics of requests no route matched (`route="none"`).
    pub fn unmatched() -> Arc<RouteMetrics> {
        static NONE: OnceLock<Arc<RouteMetrics>> = OnceLock::new();
        NONE.get_or_init(|| {
            Arc::new(RouteMetrics {
                route: "none".to_string(),
                upstream: None,
                duration: metrics::histogram!("breakwater_request_duration_seconds", "route" => "none"),
                upstream_duration: Histogram::noop(),
                queue_wait: Histogram::noop(),
                inflight: Gauge::noop(),
                limit: Gauge::noop(),
                queue_depth: Gauge::noop(),
                shed: Vec::new(),
                auth_failures: [Counter::noop(), Counter::noop()],
                client_closed: [None, None, None, None],
                write_timeouts: None,
                requests: RwLock::default(),
            })
        })
        .clone()
    }

    fn client_closed(&self, phase: Phase) {
        match &self.client_closed[phase as usize] {
            Some(c) => c.increment(1),
            None => metrics::counter!("breakwater_client_closed_total",
                "route" => self.route.clone(), "phase" => phase.as_str())
            .increment(1),
        }
    }

    fn write_timeout(&self) {
        match &self.write_timeouts {
            Some(c) => c.increment(1),
            None => {
                metrics::counter!("breakwater_write_timeouts_total", "route" => self.route.clone())
                    .increment(1)
            }
        }
    }

    pub fn shed(&self, reason: Reason) {
        if let Some((_, c)) = self.shed.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }

    /// Counts a caller refused by the route's authentication (other reasons are ignored).
    pub fn auth_failed(&self, reason: Reason) {
        match reason {
            Reason::Unauthorized => self.auth_failures[0].increment(1),
            Reason::Forbidden => self.auth_failures[1].increment(1),
            _ => {}
        }
    }

    fn count_request(&self, method: &'static str, status: u16) {
        let key = (method, status);
        if let Some(c) = self
            .requests
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            c.increment(1);
            return;
        }
        let c = metrics::counter!("breakwater_requests_total",
            "route" => self.route.clone(), "method" => method, "status" => status.to_string());
        c.increment(1);
        self.requests
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, c);
    }
}

/// Where a request was when it ended without a complete answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Arrived: being routed, authenticated, its body read.
    Receiving,
    /// Waiting in the route's admission queue.
    Queued,
    /// Holding a slot: sent upstream, waiting for the answer's head.
    Upstream,
    /// The answer's head was sent; its body is being written.
    Relaying,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Receiving,
        Phase::Queued,
        Phase::Upstream,
        Phase::Relaying,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Receiving => "receiving",
            Phase::Queued => "queued",
            Phase::Upstream => "upstream",
            Phase::Relaying => "relaying",
        }
    }
}

/// How a request ended, as the access log and the metrics tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The answer (the upstream's or the gateway's own) was written; `complete` is false when its
    /// body was cut short by an upstream error or the budget.
    Answered { bytes_out: u64, complete: bool },
    /// The caller went away before its answer was written.
    ClientClosed { phase: Phase, bytes_out: u64 },
    /// The caller stopped reading: its connection was closed when the budget ran out.
    WriteTimeout { bytes_out: u64 },
}

/// NGINX's convention for "the client closed the connection before the answer was sent"; never
/// sent to anyone, only logged and counted.
pub const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(s) => s,
    Err(_) => panic!("499 is a valid status code"),
};

const CORRELATIONS: usize = 2;

/// Correlation headers Genesys Cloud sends with data action requests, with their log fields.
/// Named once, as constants: a name given as a `&str` is parsed again at every use.
const CORRELATION: [(HeaderName, &str); CORRELATIONS] = [
    (
        HeaderName::from_static("inin-correlation-id"),
        "correlation_id",
    ),
    (
        HeaderName::from_static("inin-organization-id"),
        "organization_id",
    ),
];

pub struct RequestRecord {
    pub arrived: Instant,
    pub metrics: Arc<RouteMetrics>,
    pub method: Method,
    pub path: String,
    pub request_id: crate::forward::RequestId,
    pub peer: SocketAddr,
    pub bytes_in: u64,
    pub correlation: Vec<(&'static str, String)>,
    /// The status sent, once an answer's head was.
    pub status: Option<StatusCode>,
    /// Why the gateway answered itself, or why the upstream's answer was cut short.
    pub reason: Option<&'static str>,
    pub queue_wait: Option<Duration>,
    pub upstream_time: Option<Duration>,
    /// What went wrong upstream, for the log only.
    pub detail: Option<String>,
    /// The upstream endpoint (`host:port`) the request last went to.
    pub endpoint: Option<Arc<str>>,
}

/// The caller's headers a request's record keeps, read in one pass over its head: a lookup by a
/// name outside the standard set hashes the name, and all three read here are such names.
pub struct CallerHeaders<'a> {
    /// `X-Request-Id`, as the caller sent it (see [`crate::forward::request_id_or_new`]).
    pub request_id: Option<&'a HeaderValue>,
    correlation: [Option<&'a HeaderValue>; CORRELATIONS],
}

impl<'a> CallerHeaders<'a> {
    /// The first line of each, as `HeaderMap::get` would give it.
    pub fn of(headers: &'a HeaderMap) -> Self {
        let mut seen = CallerHeaders {
            request_id: None,
            correlation: [None; CORRELATIONS],
        };
        for (name, value) in headers {
            if *name == crate::forward::X_REQUEST_ID {
                seen.request_id.get_or_insert(value);
            } else if let Some(i) = CORRELATION.iter().position(|(h, _)| h == name) {
                seen.correlation[i].get_or_insert(value);
            }
        }
        seen
    }
}

impl RequestRecord {
    pub fn new(
        arrived: Instant,
        method: &Method,
        path: &str,
        request_id: crate::forward::RequestId,
        peer: SocketAddr,
        caller: &CallerHeaders<'_>,
    ) -> Self {
        let correlation = CORRELATION
            .iter()
            .zip(caller.correlation)
            .filter_map(|((_, field), value)| {
                value
                    .and_then(|v| v.to_str().ok())
                    .map(|v| (*field, v.chars().take(128).collect()))
            })
            .collect();
        RequestRecord {
            arrived,
            metrics: RouteMetrics::unmatched(),
            method: method.clone(),
            path: path.to_string(),
            request_id,
            peer,
            bytes_in: 0,
            correlation,
            status: None,
            reason: None,
            queue_wait: None,
            upstream_time: None,
            detail: None,
            endpoint: None,
        }
    }

    /// Records metrics and writes the access-log line.
    pub fn finish(&self, ending: Ending, now: Instant) {
        let total = now.saturating_duration_since(self.arrived);
        let m = &self.metrics;
        let (status, reason, phase, bytes_out, complete) = match ending {
            Ending::Answered {
                bytes_out,
                complete,
            } => (self.status, self.reason, None, bytes_out, complete),
            Ending::ClientClosed { phase, bytes_out } => {
                m.client_closed(phase);
                // Once a head was sent its status stands; before, 499 says nobody got an answer.
                let status = self.status.or(Some(CLIENT_CLOSED));
                (status, Some("client_closed"), Some(phase), bytes_out, false)
            }
            Ending::WriteTimeout { bytes_out } => {
                m.write_timeout();
                (
                    self.status,
                    Some("write_timeout"),
                    Some(Phase::Relaying),
                    bytes_out,
                    false,
                )
            }
        };
        let status = status.unwrap_or(CLIENT_CLOSED);
        m.count_request(method_label(&self.method), status.as_u16());
        m.duration.record(total.as_secs_f64());
        if let (Some(_), Some(t)) = (&m.upstream, self.upstream_time) {
            m.upstream_duration.record(t.as_secs_f64());
        }
        if !tracing::enabled!(target: "breakwater::access", tracing::Level::INFO) {
            return;
        }
        let find = |field: &str| {
            self.correlation
                .iter()
                .find(|(f, _)| *f == field)
                .map(|(_, v)| v.as_str())
        };
        AccessLine {
            route: &m.route,
            method: self.method.as_str(),
            path: &self.path,
            status: status.as_u16(),
            reason,
            phase: phase.map(Phase::as_str),
            total_us: micros(total),
            queue_us: self.queue_wait.map(micros),
            upstream_us: self.upstream_time.map(micros),
            endpoint: self.endpoint.as_deref(),
            bytes_in: self.bytes_in,
            bytes_out,
            complete,
            request_id: self.request_id.as_str(),
            client: self.peer,
            correlation_id: find("correlation_id"),
            organization_id: find("organization_id"),
            error: self.detail.as_deref(),
        }
        .emit();
    }
}

/// Methods outside the standard set share one label so a client cannot blow up cardinality.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_headers_are_read_as_get_would_read_them() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("gw"));
        h.append("inin-correlation-id", HeaderValue::from_static("c-1"));
        h.append("inin-correlation-id", HeaderValue::from_static("c-2"));
        h.append("x-request-id", HeaderValue::from_static("r-1"));
        h.append("x-request-id", HeaderValue::from_static("r-2"));
        h.insert("inin-organization-id", HeaderValue::from_static("org"));
        let seen = CallerHeaders::of(&h);
        assert_eq!(seen.request_id, h.get("x-request-id"));
        for (i, (name, _)) in CORRELATION.iter().enumerate() {
            assert_eq!(seen.correlation[i], h.get(name), "{name}");
        }
        let record = RequestRecord::new(
            Instant::now(),
            &Method::GET,
            "/",
            crate::forward::RequestId::from_static("id"),
            SocketAddr::from(([127, 0, 0, 1], 1)),
            &seen,
        );
        assert_eq!(
            record.correlation,
            [
                ("correlation_id", "c-1".to_string()),
                ("organization_id", "org".to_string())
            ]
        );

        let empty = HeaderMap::new();
        let none = CallerHeaders::of(&empty);
        assert!(none.request_id.is_none() && none.correlation.iter().all(Option::is_none));
    }
}
