//! Sending the request upstream: one attempt at a time, each on one connection, and after each
//! failed one the resend policy (`crate::retry`) decides whether another goes. Every attempt
//! carries the budget left at the moment it goes out.

use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::context::RequestContext;
use super::request::{set_budget_header, Replay};
use super::RouteState;
use crate::admission::Sample;
use crate::body::{BodyCheck, RequestBody};
use crate::error::ProxyError;
use crate::retry::{Attempted, Decision, RetryReason, Spent};
use crate::upstream::{SendError, SendFailure, Via};

pub async fn send(
    ctx: &mut RequestContext,
    route: &RouteState,
    first: Request<RequestBody>,
    replay: Option<Replay>,
    check: &BodyCheck,
) -> Result<http::Response<Incoming>, ProxyError> {
    let deadline = ctx.deadline();
    route.retry.on_request();
    let mut spent = Spent::default();
    let (mut req, mut via) = (first, Via::Pool);
    loop {
        set_budget_header(req.headers_mut(), deadline);
        let sent_at = ctx.sending();
        let attempt = route.upstream.send(req, via);
        let Ok(result) = tokio::time::timeout_at(deadline, attempt).await else {
            // Dropping the attempt dropped its connection mid-exchange, which closes it: the
            // backend learns the caller is gone rather than working on for nobody.
            ctx.release_slot(ctx.sample_timed_out());
            return Err(ProxyError::BudgetExhausted);
        };
        let attempt = Attempt {
            route,
            replay: replay.as_ref(),
            deadline,
            sent_at,
        };
        (req, via) = match result {
            Ok(answered) => match attempt.after_answer(ctx, &answered.head, &mut spent) {
                Some(next) => next,
                None => {
                    ctx.answered(answered.lease, answered.written_at);
                    return Ok(answered.head);
                }
            },
            Err(error) => {
                // A streamed request body that failed because of the caller is the caller's
                // answer, whatever the upstream made of it.
                let cfg = &route.config;
                if let Some(failure) = check.failure(cfg.max_request_body, route.body_read_timeout)
                {
                    ctx.release_slot(Sample::Nothing);
                    return Err(failure);
                }
                attempt.after_failure(ctx, error, &mut spent)?
            }
        };
    }
}

/// One attempt that went out, and what deciding on the next needs.
struct Attempt<'a> {
    route: &'a RouteState,
    replay: Option<&'a Replay>,
    deadline: Instant,
    sent_at: Instant,
}

impl Attempt<'_> {
    fn request<'r>(&self, ctx: &'r RequestContext, handed_back: bool) -> crate::retry::Request<'r> {
        crate::retry::Request {
            method: &ctx.record.method,
            route_idempotent: self.route.config.idempotent,
            replayable: self.replay.is_some(),
            handed_back,
        }
    }

    /// The upstream answered: the next attempt when its status is retried, else none.
    fn after_answer(
        &self,
        ctx: &RequestContext,
        resp: &http::Response<Incoming>,
        spent: &mut Spent,
    ) -> Option<(Request<RequestBody>, Via)> {
        let (route, status) = (self.route, resp.status());
        if status.is_server_error() {
            route.circuit.record_failure();
        } else {
            route.circuit.record_success();
        }
        let took = self.sent_at.elapsed();
        let decision = route.retry.decide(
            Attempted::Answered(status),
            self.request(ctx, false),
            spent,
            self.deadline,
            || expected(route, took),
        );
        match (decision, self.replay) {
            // The answer is dropped unread: its connection is closed rather than drained.
            (Decision::Resend { reason, via }, Some(replay)) => {
                count_retry(route, reason);
                Some((replay.build(), via))
            }
            _ => None,
        }
    }

    /// The attempt failed: the next attempt, or the error to answer with.
    fn after_failure(
        &self,
        ctx: &mut RequestContext,
        error: SendError,
        spent: &mut Spent,
    ) -> Result<(Request<RequestBody>, Via), ProxyError> {
        let route = self.route;
        let attempted = Attempted::from(&error.failure);
        // A pooled connection the peer had closed says nothing about the upstream's health.
        let stale = matches!(
            attempted,
            Attempted::NotSent { stale: true } | Attempted::ClosedBeforeAnswer { reused: true }
        );
        if !stale {
            route.circuit.record_failure();
        }
        let decision = route.retry.decide(
            attempted,
            self.request(ctx, error.unsent.is_some()),
            spent,
            self.deadline,
            || route.admission.expected_service(),
        );
        let again = error.unsent.or_else(|| self.replay.map(Replay::build));
        match (decision, again) {
            (Decision::Resend { reason, via }, Some(again)) => {
                count_retry(route, reason);
                Ok((again, via))
            }
            _ => Err(give_up(ctx, error.failure)),
        }
    }
}

/// The error for a failure nothing will be resent after, with the slot given back: with the time
/// the attempt took when the upstream had the request (that time says how busy it is).
fn give_up(ctx: &mut RequestContext, failure: SendFailure) -> ProxyError {
    match failure {
        SendFailure::NoConnection(why) => {
            ctx.release_slot(Sample::Nothing);
            ProxyError::UpstreamUnavailable(why)
        }
        e @ SendFailure::NotWritten { .. } => {
            ctx.release_slot(Sample::Nothing);
            ProxyError::UpstreamUnavailable(e.to_string())
        }
        e @ (SendFailure::ClosedBeforeAnswer { .. } | SendFailure::Failed(_)) => {
            ctx.release_slot(ctx.sample_took());
            ProxyError::Upstream(e.to_string())
        }
    }
}

/// How long another attempt should be expected to take: the route's estimate, or what this
/// attempt took if that was longer (before the first completion there is no estimate).
fn expected(route: &RouteState, attempt_took: Duration) -> Option<Duration> {
    Some(
        route
            .admission
            .expected_service()
            .map_or(attempt_took, |e| e.max(attempt_took)),
    )
}

fn count_retry(route: &RouteState, reason: RetryReason) {
    metrics::counter!("breakwater_retries_total",
        "route" => route.config.name.clone(), "reason" => reason.as_str())
    .increment(1);
}
