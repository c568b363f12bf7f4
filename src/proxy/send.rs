//! Sending the request upstream: one attempt at a time, each on one connection, and after each
//! failed one the resend policy (`crate::retry`) decides whether another goes. Every attempt
//! carries the budget left at the moment it goes out.

use std::time::Duration;

use http::Request;
use tokio::time::Instant;

use super::context::RequestContext;
use super::replay::Replay;
use super::RouteState;
use crate::admission::Sample;
use crate::body::{BodyCheck, RequestBody};
use crate::error::ProxyError;
use crate::forward::Forwarding;
use crate::retry::{Attempted, Decision, RetryReason, Spent};
use crate::upstream::{Framing, SendError, SendFailure, Via};

#[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
pub fn send<'a>(
    ctx: &'a mut RequestContext,
    route: &'a RouteState,
    first: Request<RequestBody>,
    forwarding: Forwarding,
    replay: Option<Replay>,
    check: &'a BodyCheck,
) -> impl std::future::Future<Output = Result<http::Response<Framing>, ProxyError>> + 'a {
    async move {
        let deadline = ctx.deadline();
        route.retry.on_request();
        let mut spent = Spent::default();
        let (mut req, mut via) = (first, Via::Pool);
        // The endpoint the last failed attempt went to: the next one goes elsewhere if it can.
        let mut avoid = None;
        loop {
            let sent_at = ctx.sending();
            // Boxed: the attempt's future (endpoint slot, pooled connection, exchange) is a large
            // part of the request's, which is otherwise copied whole at every level it is awaited.
            let attempt = route
                .upstream
                .send(req, &forwarding, via, deadline, avoid.as_ref());
            let result = Box::pin(attempt).await;
            let attempt = Attempt {
                route,
                replay: replay.as_ref(),
                deadline,
                sent_at,
            };
            (req, via) = match result {
                Ok(answered) => match attempt.after_answer(ctx, &answered.head, &mut spent) {
                    Some(next) => {
                        avoid = Some(answered.lease.endpoint().clone());
                        next
                    }
                    None => {
                        ctx.answered(answered.lease, answered.written_at);
                        return Ok(answered.head);
                    }
                },
                Err(error) if matches!(error.failure, SendFailure::TimedOut) => {
                    // Out of budget at an endpoint says how slow it is; waiting for an endpoint
                    // slot (routes sharing the upstream) says nothing about the backend.
                    let sample = match &error.endpoint {
                        Some(e) => {
                            ctx.record.endpoint = Some(e.label.clone());
                            ctx.sample_timed_out()
                        }
                        None => Sample::Nothing,
                    };
                    ctx.release_slot(sample);
                    return Err(ProxyError::BudgetExhausted);
                }
                Err(error) => {
                    // A streamed request body that failed because of the caller is the caller's
                    // answer, whatever the upstream made of it.
                    let cfg = &route.config;
                    if let Some(failure) =
                        check.failure(cfg.max_request_body, route.body_read_timeout)
                    {
                        ctx.release_slot(Sample::Nothing);
                        return Err(failure);
                    }
                    avoid = error.endpoint.clone();
                    attempt.after_failure(ctx, error, &mut spent)?
                }
            };
        }
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
    fn request<'r>(
        &self,
        ctx: &'r RequestContext,
        handed_back: bool,
        other_endpoint: bool,
    ) -> crate::retry::Request<'r> {
        crate::retry::Request {
            method: &ctx.record.method,
            route_idempotent: self.route.config.idempotent,
            replayable: self.replay.is_some(),
            handed_back,
            other_endpoint,
        }
    }

    /// The upstream answered: the next attempt when its status is retried, else none.
    fn after_answer(
        &self,
        ctx: &RequestContext,
        resp: &http::Response<Framing>,
        spent: &mut Spent,
    ) -> Option<(Request<RequestBody>, Via)> {
        let (route, status) = (self.route, resp.status());
        // Timed only when the policy asks (an answer it may resend): a 2xx costs no clock read.
        let decision = route.retry.decide(
            Attempted::Answered(status),
            self.request(ctx, false, false),
            spent,
            self.deadline,
            || expected(route, self.sent_at.elapsed()),
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
        ctx.record.endpoint = error.endpoint.as_ref().map(|e| e.label.clone());
        let other_endpoint = error
            .endpoint
            .as_ref()
            .is_some_and(|e| route.upstream.has_other(e));
        let decision = route.retry.decide(
            attempted,
            self.request(ctx, error.unsent.is_some(), other_endpoint),
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
        e @ (SendFailure::ClosedBeforeAnswer { .. }
        | SendFailure::Failed(_)
        | SendFailure::TimedOut) => {
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
