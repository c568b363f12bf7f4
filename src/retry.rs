//! Every decision to send a request again is made here, by [`RetryPolicy::decide`], from what the
//! upstream can have seen of the failed attempt (RFC 9110 §9.2.2: a request that is not
//! idempotent is not resent unless it provably was not processed):
//!
//! - **Stale pooled connection** (`stale_connection`, needs no `retry.attempts`, once per
//!   request, on a freshly opened connection): the pooled connection failed before a byte was
//!   written (any method), or — for an idempotent method, or any method on a route declared
//!   `idempotent` — it was closed after the request was written and before any answer (the
//!   keep-alive race: the peer closed the idle connection as the request went out).
//! - **Other endpoint** (`other_endpoint`, needs no `retry.attempts`, once per request): nothing
//!   reached the endpoint it went to (no connection, or one that failed before a byte was
//!   written) and the upstream has another endpoint in service; it goes there.
//! - **Not sent** (`not_sent`, under the route's `retry` settings): no connection could be had,
//!   or a fresh connection failed before a byte was written.
//! - **Status** (`status`, under the route's `retry` settings): the upstream answered one of
//!   `retry.on_status`, for an idempotent method or an `idempotent` route.
//!
//! Anything else that failed after the request was written is not sent again. Resending needs the
//! request: one hyper handed back unwritten, or a body small enough to have been kept (64 KiB).
//! Retries under the route's settings must fit in what is left of the budget, and a retry budget
//! caps them at a fraction of the route's traffic so a struggling backend is not hammered by a
//! retry storm.

use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::upstream::{SendFailure, Via};

/// Retries may bank at most this many tokens, so a long quiet spell cannot fund a storm.
const MAX_TOKENS: f64 = 10.0;

pub struct RetryPolicy {
    config: RetryConfig,
    budget: Mutex<Budget>,
}

struct Budget {
    tokens: f64,
    last: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// A pooled connection the peer had closed.
    StaleConnection,
    /// Nothing reached the endpoint it went to; another endpoint takes it.
    OtherEndpoint,
    /// No connection could be had, or a fresh connection died before the request was written.
    NotSent,
    /// The upstream answered an opted-in status.
    Status,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::StaleConnection => "stale_connection",
            RetryReason::OtherEndpoint => "other_endpoint",
            RetryReason::NotSent => "not_sent",
            RetryReason::Status => "status",
        }
    }
}

/// How an attempt ended, as far as sending it again is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempted {
    /// Nothing of the request reached the upstream. `stale`: it went out on a pooled connection
    /// that had sat idle.
    NotSent { stale: bool },
    /// Written, then the connection closed before any answer. `reused`: on a pooled connection.
    ClosedBeforeAnswer { reused: bool },
    /// Written, and failed some other way.
    Failed,
    /// The upstream answered with this status.
    Answered(StatusCode),
}

impl From<&SendFailure> for Attempted {
    fn from(f: &SendFailure) -> Self {
        match f {
            SendFailure::NoConnection(_) => Attempted::NotSent { stale: false },
            SendFailure::NotWritten { reused, .. } => Attempted::NotSent { stale: *reused },
            SendFailure::ClosedBeforeAnswer { reused, .. } => {
                Attempted::ClosedBeforeAnswer { reused: *reused }
            }
            SendFailure::Failed(_) | SendFailure::TimedOut => Attempted::Failed,
        }
    }
}

/// What the request being decided on allows.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a Method,
    /// The route declares every request safe to send twice (`routes[].idempotent`).
    pub route_idempotent: bool,
    /// The request can be built again after it was written (its body was kept).
    pub replayable: bool,
    /// The failed attempt handed the request back unwritten.
    pub handed_back: bool,
    /// Another endpoint than the one the attempt went to is in service.
    pub other_endpoint: bool,
}

impl Request<'_> {
    fn repeatable(&self) -> bool {
        self.route_idempotent || is_idempotent(self.method)
    }

    fn can_build(&self) -> bool {
        self.replayable || self.handed_back
    }
}

/// What one request has spent on resends so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    /// Resends under the route's `retry` settings.
    pub retries: u32,
    /// Whether the one stale-connection resend was used.
    pub stale: bool,
    /// Whether the one move to another endpoint was used.
    pub moved: bool,
}

/// Send again (how, and why), or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Resend { reason: RetryReason, via: Via },
    GiveUp,
}

impl RetryPolicy {
    pub fn new(config: &RetryConfig) -> Self {
        RetryPolicy {
            config: config.clone(),
            // A new route may retry at its floor rate from the first second.
            budget: Mutex::new(Budget {
                tokens: config.min_per_second.min(MAX_TOKENS),
                last: Instant::now(),
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.attempts > 0
    }

    /// Every first attempt earns the route `budget_ratio` of a retry.
    pub fn on_request(&self) {
        if !self.enabled() {
            return;
        }
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        b.tokens = (b.tokens + self.config.budget_ratio).min(MAX_TOKENS);
    }

    /// Whether `attempted` is sent again, and how. `expected` says how long another exchange
    /// should be expected to take, to judge whether it can fit in what is left of the budget;
    /// it is asked only when that matters (most answers are not retried at all).
    /// Records what a resend spends in `spent`.
    pub fn decide(
        &self,
        attempted: Attempted,
        req: Request<'_>,
        spent: &mut Spent,
        deadline: Instant,
        expected: impl FnOnce() -> Option<Duration>,
    ) -> Decision {
        if !req.can_build() {
            return Decision::GiveUp;
        }
        // Past the deadline nothing is resent. Looked at only where a resend is otherwise due:
        // most answers are given up on before, and a clock read is spared.
        let past = || Instant::now() >= deadline;
        let stale = match attempted {
            Attempted::NotSent { stale } => stale,
            Attempted::ClosedBeforeAnswer { reused } => reused && req.repeatable(),
            Attempted::Failed | Attempted::Answered(_) => false,
        };
        if stale && !spent.stale {
            if past() {
                return Decision::GiveUp;
            }
            spent.stale = true;
            return Decision::Resend {
                reason: RetryReason::StaleConnection,
                via: Via::Fresh,
            };
        }
        if attempted == (Attempted::NotSent { stale: false }) && req.other_endpoint && !spent.moved
        {
            if past() {
                return Decision::GiveUp;
            }
            spent.moved = true;
            return Decision::Resend {
                reason: RetryReason::OtherEndpoint,
                via: Via::Pool,
            };
        }
        let reason = match attempted {
            Attempted::NotSent { .. } => RetryReason::NotSent,
            Attempted::Answered(status)
                if req.repeatable()
                    && req.replayable
                    && self.config.on_status.contains(&status) =>
            {
                RetryReason::Status
            }
            _ => return Decision::GiveUp,
        };
        if past() || !self.allow(spent.retries, deadline, expected()) {
            return Decision::GiveUp;
        }
        spent.retries += 1;
        Decision::Resend {
            reason,
            via: Via::Pool,
        }
    }

    /// Decides whether attempt number `retries_done + 1` may go: attempts left, enough budget
    /// left for an exchange of `expected` length, and a token in the retry budget.
    fn allow(&self, retries_done: u32, deadline: Instant, expected: Option<Duration>) -> bool {
        if retries_done >= self.config.attempts {
            return false;
        }
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() || expected.is_some_and(|e| e >= left) {
            return false;
        }
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * self.config.min_per_second).min(MAX_TOKENS);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// RFC 9110 §9.2.2.
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, ratio: f64, min_per_second: f64) -> RetryPolicy {
        RetryPolicy::new(&RetryConfig {
            attempts,
            on_status: vec![StatusCode::BAD_GATEWAY],
            budget_ratio: ratio,
            min_per_second,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retry_budget_caps_retries_at_the_ratio() {
        let p = policy(1, 0.2, 0.0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut allowed = 0;
        for _ in 0..100 {
            p.on_request();
            if p.allow(0, deadline, None) {
                allowed += 1;
            }
        }
        assert!(
            (19..=20).contains(&allowed),
            "allowed {allowed} retries for 100 requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_must_fit_the_remaining_budget_and_attempts() {
        let p = policy(2, 1.0, 0.0);
        p.on_request();
        p.on_request();
        p.on_request();
        let deadline = Instant::now() + Duration::from_millis(100);
        assert!(!p.allow(0, deadline, Some(Duration::from_millis(150))));
        assert!(p.allow(0, deadline, Some(Duration::from_millis(50))));
        assert!(!p.allow(2, deadline, None), "attempts exhausted");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(!p.allow(0, deadline, None), "budget gone");
    }

    fn req(method: &Method, route_idempotent: bool, replayable: bool) -> Request<'_> {
        Request {
            method,
            route_idempotent,
            replayable,
            handed_back: false,
            other_endpoint: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_resent_past_the_deadline_and_nothing_is_spent() {
        let p = policy(3, 1.0, 1.0);
        p.on_request();
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut other = req(&Method::GET, false, true);
        other.other_endpoint = true;
        let cases = [
            (Attempted::NotSent { stale: true }, other),
            (Attempted::ClosedBeforeAnswer { reused: true }, other),
            (Attempted::NotSent { stale: false }, other),
            (Attempted::Answered(StatusCode::BAD_GATEWAY), other),
        ];
        for (attempted, r) in cases {
            let mut spent = Spent::default();
            assert_ne!(
                p.decide(attempted, r, &mut spent, deadline, || None),
                Decision::GiveUp,
                "{attempted:?} is resent in time"
            );
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        for (attempted, r) in cases {
            let mut spent = Spent::default();
            assert_eq!(
                p.decide(attempted, r, &mut spent, deadline, || None),
                Decision::GiveUp,
                "{attempted:?} past the deadline"
            );
            assert_eq!(spent, Spent::default(), "{attempted:?} spent nothing");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_repeatable_requests_retry_statuses() {
        let p = policy(1, 1.0, 1.0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let bad = Attempted::Answered(StatusCode::BAD_GATEWAY);
        let decide = |r: Request<'_>, a: Attempted| {
            p.on_request();
            p.decide(a, r, &mut Spent::default(), deadline, || None)
        };
        let resend = Decision::Resend {
            reason: RetryReason::Status,
            via: Via::Pool,
        };
        assert_eq!(decide(req(&Method::GET, false, true), bad), resend);
        assert_eq!(
            decide(req(&Method::POST, false, true), bad),
            Decision::GiveUp
        );
        assert_eq!(decide(req(&Method::POST, true, true), bad), resend);
        assert_eq!(
            decide(req(&Method::GET, false, false), bad),
            Decision::GiveUp,
            "a body that was not kept cannot be sent again"
        );
        assert_eq!(
            decide(
                req(&Method::GET, false, true),
                Attempted::Answered(StatusCode::INTERNAL_SERVER_ERROR)
            ),
            Decision::GiveUp
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_keep_alive_race_is_resent_once_only_when_repeatable() {
        // Retries off: the stale-connection resend needs no attempts.
        let p = policy(0, 0.2, 1.0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let race = Attempted::ClosedBeforeAnswer { reused: true };
        let fresh = Decision::Resend {
            reason: RetryReason::StaleConnection,
            via: Via::Fresh,
        };
        let mut spent = Spent::default();
        assert_eq!(
            p.decide(
                race,
                req(&Method::GET, false, true),
                &mut spent,
                deadline,
                || None
            ),
            fresh
        );
        assert_eq!(
            p.decide(
                race,
                req(&Method::GET, false, true),
                &mut spent,
                deadline,
                || None
            ),
            Decision::GiveUp,
            "once per request"
        );
        let mut spent = Spent::default();
        assert_eq!(
            p.decide(
                race,
                req(&Method::POST, false, true),
                &mut spent,
                deadline,
                || None
            ),
            Decision::GiveUp,
            "a POST that may have been processed is not sent again"
        );
        assert_eq!(
            p.decide(
                race,
                req(&Method::POST, true, true),
                &mut spent,
                deadline,
                || None
            ),
            fresh
        );
        let mut spent = Spent::default();
        assert_eq!(
            p.decide(
                Attempted::ClosedBeforeAnswer { reused: false },
                req(&Method::GET, false, true),
                &mut spent,
                deadline,
                || None
            ),
            Decision::GiveUp,
            "a connection opened for this request was not idled out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unwritten_requests_go_again_whatever_the_method() {
        let p = policy(0, 0.2, 1.0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let handed_back = Request {
            method: &Method::POST,
            route_idempotent: false,
            replayable: false,
            handed_back: true,
            other_endpoint: false,
        };
        let mut spent = Spent::default();
        assert_eq!(
            p.decide(
                Attempted::NotSent { stale: true },
                handed_back,
                &mut spent,
                deadline,
                || None
            ),
            Decision::Resend {
                reason: RetryReason::StaleConnection,
                via: Via::Fresh
            }
        );
        // A connect failure goes again only under the route's retry settings (off here).
        assert_eq!(
            p.decide(
                Attempted::NotSent { stale: false },
                handed_back,
                &mut spent,
                deadline,
                || None
            ),
            Decision::GiveUp
        );
        let p = policy(1, 0.2, 1.0);
        assert_eq!(
            p.decide(
                Attempted::NotSent { stale: false },
                handed_back,
                &mut Spent::default(),
                deadline,
                || None
            ),
            Decision::Resend {
                reason: RetryReason::NotSent,
                via: Via::Pool
            }
        );
        assert_eq!(
            p.decide(
                Attempted::Failed,
                req(&Method::GET, false, true),
                &mut Spent::default(),
                deadline,
                || None
            ),
            Decision::GiveUp,
            "failed after it was written"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_nothing_reached_moves_to_another_endpoint_once() {
        // No retries configured: the move needs none, and happens once.
        let p = policy(0, 0.2, 1.0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let post = Request {
            method: &Method::POST,
            route_idempotent: false,
            replayable: true,
            handed_back: true,
            other_endpoint: true,
        };
        let refused = Attempted::NotSent { stale: false };
        let mut spent = Spent::default();
        assert_eq!(
            p.decide(refused, post, &mut spent, deadline, || None),
            Decision::Resend {
                reason: RetryReason::OtherEndpoint,
                via: Via::Pool
            }
        );
        assert_eq!(
            p.decide(refused, post, &mut spent, deadline, || None),
            Decision::GiveUp
        );
        // With a single endpoint in service there is nowhere to move to.
        let alone = Request {
            other_endpoint: false,
            ..post
        };
        assert_eq!(
            p.decide(refused, alone, &mut Spent::default(), deadline, || None),
            Decision::GiveUp
        );
        // Written and lost is not "nothing reached it".
        assert_eq!(
            p.decide(
                Attempted::ClosedBeforeAnswer { reused: false },
                post,
                &mut Spent::default(),
                deadline,
                || None
            ),
            Decision::GiveUp
        );
    }
}
