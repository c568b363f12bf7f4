//! One request's context: everything the request holds, owned in one place from its first line to
//! its last, so that whatever ends it — the answer written, an error, the budget, the caller
//! leaving at any point — it is accounted for exactly once. [`RequestContext`]'s `Drop` is that
//! one place: it gives back the upstream connection (to the pool, or closed), the admission slot
//! (with what the exchange taught the estimator), writes the access-log line and the request
//! metrics, and counts the request out of its connection.
//!
//! The context lives in the handler's future until the answer's head is ready, then moves into
//! the answer's body ([`RelayBody`]), so it ends when the last byte is written. hyper drops the
//! handler future, or the body, when the caller goes away; that drop is how a departure is seen
//! (Pingora's always-run logging phase; linkerd2-proxy's record-on-drop bodies).

use std::sync::Arc;
use std::time::Duration;

use http::header::CONNECTION;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::RouteState;
use crate::admission::{Permit, Sample};
use crate::body::{BodyOutcome, ClientBody, OnBodyEnd, RelayBody, ResponseBody};
use crate::error::ProxyError;
use crate::listener::{ConnInfo, InFlight};
use crate::observe::{CallerHeaders, Ending, Phase, RequestRecord};
use crate::respond::{error_response, AnswerContext};
use crate::upstream::Lease;

/// An answer that holds neither slot nor connection still gets this long to be written, even
/// when it is made at (or after) the budget's end.
const ANSWER_WRITE_MIN: Duration = Duration::from_secs(1);

pub struct RequestContext {
    pub record: RequestRecord,
    pub conn: ConnInfo,
    inflight: InFlight,
    pub phase: Phase,
    pub route: Option<Arc<RouteState>>,
    /// When the route's budget runs out (known once the route is).
    pub deadline: Option<Instant>,
    method: Method,
    permit: Option<Permit>,
    lease: Option<Lease>,
    /// When the current (or answered) attempt was sent: an exchange's service time runs from
    /// here.
    sent_at: Option<Instant>,
    /// How the answer's body ended, once it has.
    ended: Option<BodyOutcome>,
    /// Bytes of the answer's body written before it was dropped unfinished.
    relayed: u64,
}

impl RequestContext {
    /// Counts the request in on `conn`, the connection it came on, and opens its record.
    pub fn new(req: &Request<ClientBody>, conn: ConnInfo) -> Self {
        let arrived = Instant::now();
        let inflight = conn.activity.request_started();
        let caller = CallerHeaders::of(req.headers());
        RequestContext {
            record: RequestRecord::new(
                arrived,
                req.method(),
                req.uri().path(),
                crate::forward::request_id_or_new(caller.request_id),
                conn.peer,
                &caller,
            ),
            conn,
            inflight,
            phase: Phase::Receiving,
            route: None,
            deadline: None,
            method: req.method().clone(),
            permit: None,
            lease: None,
            sent_at: None,
            ended: None,
            relayed: 0,
        }
    }

    /// Why the connection's framing guard refused this request before hyper parsed it.
    pub fn refused_by_guard(&self) -> Option<&'static str> {
        self.inflight.refused
    }

    pub fn request_id(&self) -> &crate::forward::RequestId {
        &self.record.request_id
    }

    /// The request matched `route`: from now on it runs under the route's budget and counts in
    /// the route's metrics.
    pub fn set_route(&mut self, route: Arc<RouteState>) {
        self.deadline = Some(self.record.arrived + route.config.budget);
        self.record.metrics = route.metrics.clone();
        self.route = Some(route);
    }

    /// The route's deadline; before routing, the time an answer is given to be written.
    pub fn deadline(&self) -> Instant {
        self.deadline
            .unwrap_or_else(|| self.record.arrived + ANSWER_WRITE_MIN)
    }

    /// Waits for an admission slot on `route`, or returns its refusal.
    pub async fn admit(&mut self, route: &RouteState) -> Result<(), ProxyError> {
        self.phase = Phase::Queued;
        // One clock read: a slot free on arrival is granted at it, and waited for no time.
        let permit = route
            .admission
            .admit_at(self.deadline(), Instant::now())
            .await?;
        self.record.queue_wait = Some(permit.waited());
        self.permit = Some(permit);
        self.phase = Phase::Upstream;
        Ok(())
    }

    /// An attempt goes out now.
    pub fn sending(&mut self) -> Instant {
        let now = Instant::now();
        self.sent_at = Some(now);
        now
    }

    /// The attempt was answered: its connection is held until the answer's body has been read.
    /// From here on the exchange is timed from `written_at`, when the request went out on its
    /// connection: waiting for a connection is the gateway's delay, not the upstream's.
    pub fn answered(&mut self, lease: Lease, written_at: Instant) {
        let head_at = lease.head_at();
        self.record.upstream_time = self.sent_at.map(|t| head_at.saturating_duration_since(t));
        self.record.endpoint = Some(lease.endpoint().label.clone());
        self.lease = Some(lease);
        self.sent_at = Some(written_at);
    }

    /// The connection the answer is read from, while the context holds it.
    pub fn lease_mut(&mut self) -> Option<&mut crate::upstream::Lease> {
        self.lease.as_mut()
    }

    /// Hands the connection to the answer's streamed body, which gives it back when it ends.
    pub fn take_lease(&mut self) -> Option<Lease> {
        self.lease.take()
    }

    /// What the current attempt took so far.
    fn took(&self) -> Option<Duration> {
        self.took_by(Instant::now())
    }

    /// What the current attempt had taken at `now`.
    fn took_by(&self, now: Instant) -> Option<Duration> {
        self.sent_at.map(|t| now.saturating_duration_since(t))
    }

    /// The exchange ended (completed, or failed after the upstream had it): its time is a sample.
    pub fn sample_took(&self) -> Sample {
        self.took().map_or(Sample::Nothing, Sample::Took)
    }

    /// No answer's head within the budget.
    pub fn sample_timed_out(&self) -> Sample {
        self.took().map_or(Sample::Nothing, Sample::TimedOut)
    }

    /// The upstream side is over: the connection goes back to the pool when the exchange was
    /// read to its end (closed otherwise), and the slot is given back with `sample`.
    pub fn upstream_done(&mut self, complete: bool, sample: Sample) {
        self.upstream_done_at(complete, sample, Instant::now());
    }

    /// [`RequestContext::upstream_done`] at `now`, a clock read the caller shares.
    fn upstream_done_at(&mut self, complete: bool, sample: Sample, now: Instant) {
        if let Some(lease) = self.lease.take() {
            lease.release(complete, now);
        }
        self.release_slot(sample);
    }

    /// The answer's body was read (whole, or as far as it went): the exchange's time is a
    /// sample, timed by the same clock read that gives the connection back.
    pub fn upstream_read(&mut self, complete: bool) {
        let now = Instant::now();
        let sample = self.took_by(now).map_or(Sample::Nothing, Sample::Took);
        self.upstream_done_at(complete, sample, now);
    }

    /// Gives the admission slot back, with what the exchange taught.
    pub fn release_slot(&mut self, sample: Sample) {
        if let Some(permit) = self.permit.take() {
            permit.release(sample);
        }
    }

    /// The gateway answers the request itself: the one place an error becomes an answer.
    pub fn answer(&mut self, err: ProxyError) -> Response<ResponseBody> {
        let reason = err.reason();
        let route = self.route.as_ref().map(|r| &*r.config);
        let mut resp = error_response(
            &err,
            &AnswerContext {
                route,
                request_id: &self.record.request_id,
            },
        );
        if reason.is_refusal() {
            self.record.metrics.shed(reason);
        }
        self.record.metrics.auth_failed(reason);
        // A request whose body was refused unread leaves the connection out of sync.
        if matches!(
            err,
            ProxyError::BodyTooLarge { .. } | ProxyError::BadRequest(_)
        ) {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        self.record.reason = Some(reason.as_str());
        // What went wrong upstream goes to the log, never to the caller.
        if let Some(detail) = err.detail() {
            self.record.detail = Some(detail);
        }
        // Whatever the attempt held is given back now; the answer holds nothing upstream.
        self.upstream_done(false, Sample::Nothing);
        resp
    }

    /// Hands the answer to hyper with the context inside its body, so the request ends when the
    /// last byte is written, or when the body is dropped unfinished.
    pub fn respond(
        mut self: Box<Self>,
        resp: Response<ResponseBody>,
        draining: bool,
    ) -> Response<ResponseBody> {
        let (mut parts, body) = resp.into_parts();
        if draining {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        self.record.status = Some(parts.status);
        self.phase = Phase::Relaying;
        // hyper writes no body for these, and never polls it.
        let bodiless = self.method == Method::HEAD
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED;
        if bodiless {
            self.ended = Some(BodyOutcome {
                complete: true,
                bytes: 0,
                cut: None,
            });
            drop(self);
            return Response::from_parts(parts, body);
        }
        // An answer that still holds the slot and the connection must be out by the budget's end;
        // one that holds nothing upstream gets a moment more when it is made at the last moment.
        let holds_upstream = self.permit.is_some() || self.lease.is_some();
        let write_by = if holds_upstream {
            self.deadline()
        } else {
            self.deadline().max(Instant::now() + ANSWER_WRITE_MIN)
        };
        self.inflight.write_by(write_by, holds_upstream);
        let body = RelayBody::new(body, write_by, self);
        Response::from_parts(parts, body.boxed_unsync())
    }
}

impl OnBodyEnd for RequestContext {
    fn body_ended(mut self: Box<Self>, outcome: BodyOutcome) {
        self.ended = Some(outcome);
    }

    fn body_dropped(mut self: Box<Self>, bytes: u64) {
        self.relayed = bytes;
    }
}

impl Drop for RequestContext {
    fn drop(&mut self) {
        let ending = match self.ended {
            Some(outcome) => {
                if let Some(cut) = outcome.cut {
                    self.record.reason = Some(cut);
                }
                Ending::Answered {
                    bytes_out: outcome.bytes,
                    complete: outcome.complete,
                }
            }
            None if self.phase == Phase::Relaying && self.inflight.closed_for_stall() => {
                Ending::WriteTimeout {
                    bytes_out: self.relayed,
                }
            }
            None => Ending::ClientClosed {
                phase: self.phase,
                bytes_out: self.relayed,
            },
        };
        // A relay that ended (complete or cut short by the upstream or the budget) timed the
        // upstream; a caller leaving while it worked says it took at least that long.
        let complete = matches!(ending, Ending::Answered { complete: true, .. });
        // One clock read ends the request: its sample, its connection, its record, its count.
        let now = Instant::now();
        let sample = match (self.ended.is_some(), self.took_by(now)) {
            (true, Some(took)) => Sample::Took(took),
            (false, Some(took)) => Sample::AtLeast(took),
            (_, None) => Sample::Nothing,
        };
        self.upstream_done_at(complete, sample, now);
        self.record.finish(ending, now);
        // `inflight` is dropped after this, counting the request out of its connection.
        self.inflight.ended_at(now);
    }
}
