//! What each request leaves behind: one access-log line and the request metrics, recorded when
//! the last byte of the answer has gone out (or the answer was abandoned).

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use tokio::time::Instant;

use crate::error::Reason;

/// Correlation headers Genesys Cloud sends with data action requests.
const CORRELATION: [(&str, &str); 2] = [
    ("inin-correlation-id", "correlation_id"),
    ("inin-organization-id", "organization_id"),
];

pub struct RequestRecord {
    pub arrived: Instant,
    pub route: String,
    pub method: Method,
    pub path: String,
    pub request_id: String,
    pub peer: SocketAddr,
    pub bytes_in: u64,
    pub correlation: Vec<(&'static str, String)>,
    pub status: StatusCode,
    pub reason: Option<Reason>,
    pub queue_wait: Option<Duration>,
    pub upstream_time: Option<Duration>,
    pub upstream: Option<String>,
}

impl RequestRecord {
    pub fn new(
        arrived: Instant,
        method: &Method,
        path: &str,
        request_id: &str,
        peer: SocketAddr,
        headers: &HeaderMap,
    ) -> Self {
        let correlation = CORRELATION
            .iter()
            .filter_map(|(h, field)| {
                headers
                    .get(*h)
                    .and_then(|v| v.to_str().ok())
                    .map(|v| (*field, v.chars().take(128).collect()))
            })
            .collect();
        RequestRecord {
            arrived,
            route: "none".into(),
            method: method.clone(),
            path: path.to_string(),
            request_id: request_id.to_string(),
            peer,
            bytes_in: 0,
            correlation,
            status: StatusCode::OK,
            reason: None,
            queue_wait: None,
            upstream_time: None,
            upstream: None,
        }
    }

    /// Records metrics and writes the access-log line.
    pub fn finish(self, bytes_out: u64, complete: bool) {
        let total = self.arrived.elapsed();
        let route = self.route.clone();
        metrics::counter!("breakwater_requests_total",
            "route" => route.clone(),
            "method" => method_label(&self.method),
            "status" => self.status.as_str().to_string())
        .increment(1);
        metrics::histogram!("breakwater_request_duration_seconds", "route" => route.clone())
            .record(total.as_secs_f64());
        if let (Some(up), Some(t)) = (&self.upstream, self.upstream_time) {
            metrics::histogram!("breakwater_upstream_duration_seconds",
                "route" => route.clone(), "upstream" => up.clone())
            .record(t.as_secs_f64());
        }
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        let corr_id = self
            .correlation
            .iter()
            .find(|(f, _)| *f == "correlation_id")
            .map(|(_, v)| v.as_str());
        let org_id = self
            .correlation
            .iter()
            .find(|(f, _)| *f == "organization_id")
            .map(|(_, v)| v.as_str());
        tracing::info!(
            target: "breakwater::access",
            route = %self.route,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            reason = self.reason.map(|r| r.as_str()),
            total_ms = total.as_secs_f64() * 1000.0,
            queue_ms = ms(self.queue_wait),
            upstream_ms = ms(self.upstream_time),
            bytes_in = self.bytes_in,
            bytes_out,
            complete,
            request_id = %self.request_id,
            client = %self.peer,
            correlation_id = corr_id,
            organization_id = org_id,
            "request"
        );
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
