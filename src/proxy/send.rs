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
use crate::body::{BodyCheck, RequestBody};
use crate::error::ProxyError;
use crate::retry::{Attempted, Decision, RetryReason, Spent};
use crate::upstream::{SendFailure, Via};

pub async fn send(
    ctx: &mut RequestContext,
    route: &RouteState,
    first: Request<RequestBody>,
    replay: Option<Replay>,
    check: &BodyCheck,
) -> Result<http::Response<Incoming>, ProxyError> {
    let deadline = ctx.deadline();
    let cfg = &route.config;
    route.retry.on_request();
    let mut spent = Spent::default();
    let mut req = first;
    let mut via = Via::Pool;
    loop {
        set_budget_header(req.headers_mut(), deadline);
        let sent_at = Instant::now();
        let attempt = route.upstream.send(req, via);
        let result = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_elapsed) => {
                // Dropping the attempt dropped its connection mid-exchange, which closes it: the
                // backend learns the caller is gone rather than working on for nobody.
                ctx.release_slot(None);
                return Err(ProxyError::BudgetExhausted);
            }
        };
        let facts = |handed_back: bool| crate::retry::Request {
            method: &ctx.record.method,
            route_idempotent: cfg.idempotent,
            replayable: replay.is_some(),
            handed_back,
        };
        let error = match result {
            Ok((resp, lease)) => {
                let status = resp.status();
                if status.is_server_error() {
                    route.circuit.record_failure();
                } else {
                    route.circuit.record_success();
                }
                let expected = expected(route, sent_at.elapsed());
                let decision = route.retry.decide(
                    Attempted::Answered(status),
                    facts(false),
                    &mut spent,
                    deadline,
                    expected,
                );
                match (decision, &replay) {
                    (Decision::Resend { reason, via: next }, Some(replay)) => {
                        // Dropped unread: the connection is closed rather than drained.
                        drop((resp, lease));
                        count_retry(route, reason);
                        req = replay.build();
                        via = next;
                        continue;
                    }
                    _ => {
                        ctx.answered(lease, sent_at);
                        return Ok(resp);
                    }
                }
            }
            Err(e) => e,
        };
        // A streamed request body that failed because of the caller is the caller's answer.
        if let Some(failure) = check.failure(cfg.max_request_body, route.body_read_timeout) {
            ctx.release_slot(None);
            return Err(failure);
        }
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
            facts(error.unsent.is_some()),
            &mut spent,
            deadline,
            route.admission.expected_service(),
        );
        let again = error.unsent.or_else(|| replay.as_ref().map(Replay::build));
        match (decision, again) {
            (Decision::Resend { reason, via: next }, Some(again)) => {
                count_retry(route, reason);
                req = again;
                via = next;
            }
            _ => return Err(give_up(ctx, error.failure, sent_at)),
        }
    }
}

/// The error for a failure nothing will be resent after, with the slot given back: with the time
/// the attempt took when the upstream had the request (that time says how busy it is).
fn give_up(ctx: &mut RequestContext, failure: SendFailure, sent_at: Instant) -> ProxyError {
    match failure {
        SendFailure::NoConnection(why) => {
            ctx.release_slot(None);
            ProxyError::UpstreamUnavailable(why)
        }
        e @ SendFailure::NotWritten { .. } => {
            ctx.release_slot(None);
            ProxyError::UpstreamUnavailable(e.to_string())
        }
        e @ (SendFailure::ClosedBeforeAnswer { .. } | SendFailure::Failed(_)) => {
            ctx.release_slot(Some(sent_at.elapsed()));
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
