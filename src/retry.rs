//! Route retry policy (off by default): a request is sent again only when it provably never
//! reached the upstream, or — for idempotent methods whose body was small enough to be kept
//! (64 KiB) — when the upstream answered one of the opted-in statuses. Every retry must fit in what is left of the budget, and a retry
//! budget caps retries at a fraction of the route's traffic so a struggling backend is not
//! hammered by a retry storm.

use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::config::RetryConfig;

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
    /// No connection could be had, or the connection died before the request was written.
    NotSent,
    /// The upstream answered an opted-in status.
    Status,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::NotSent => "not_sent",
            RetryReason::Status => "status",
        }
    }
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

    /// Whether a status may be retried for this method at all.
    pub fn retries_status(&self, method: &Method, status: StatusCode) -> bool {
        is_idempotent(method) && self.config.on_status.contains(&status)
    }

    /// Decides whether attempt number `retries_done + 1` may go: attempts left, enough budget
    /// left for an exchange of `expected` length, and a token in the retry budget.
    pub fn allow(&self, retries_done: u32, deadline: Instant, expected: Option<Duration>) -> bool {
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

    #[test]
    fn only_idempotent_methods_retry_statuses() {
        let p = policy(1, 0.2, 1.0);
        assert!(p.retries_status(&Method::GET, StatusCode::BAD_GATEWAY));
        assert!(!p.retries_status(&Method::POST, StatusCode::BAD_GATEWAY));
        assert!(!p.retries_status(&Method::GET, StatusCode::INTERNAL_SERVER_ERROR));
    }
}
