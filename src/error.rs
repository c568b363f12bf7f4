//! Why the gateway answered a request itself. Every stage returns these; [`crate::respond`]
//! turns them into HTTP answers in one place.

use std::time::Duration;

/// The value of `x-breakwater-reason` and of the `reason` metric label: a closed set, so label
/// cardinality stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    QueueFull,
    QueueTimeout,
    Deadline,
    BudgetExhausted,
    CircuitOpen,
    UpstreamUnavailable,
    UpstreamError,
    Draining,
    NoRoute,
    PayloadTooLarge,
    BodyTimeout,
    BadRequest,
    /// The caller did not present valid credentials (401).
    Unauthorized,
    /// The caller's source address is outside the route's `allow_cidrs` (403).
    Forbidden,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::Deadline,
        Reason::BudgetExhausted,
        Reason::CircuitOpen,
        Reason::UpstreamUnavailable,
        Reason::UpstreamError,
        Reason::Draining,
        Reason::NoRoute,
        Reason::PayloadTooLarge,
        Reason::BodyTimeout,
        Reason::BadRequest,
        Reason::Unauthorized,
        Reason::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::Deadline => "deadline",
            Reason::BudgetExhausted => "budget_exhausted",
            Reason::CircuitOpen => "circuit_open",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UpstreamError => "upstream_error",
            Reason::Draining => "draining",
            Reason::NoRoute => "no_route",
            Reason::PayloadTooLarge => "payload_too_large",
            Reason::BodyTimeout => "body_timeout",
            Reason::BadRequest => "bad_request",
            Reason::Unauthorized => "unauthorized",
            Reason::Forbidden => "forbidden",
        }
    }

    /// Refusals are answers a caller can retry later: they carry `Retry-After`, count as shed
    /// load, and may be replaced by a route's fallback.
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            Reason::QueueFull
                | Reason::QueueTimeout
                | Reason::Deadline
                | Reason::BudgetExhausted
                | Reason::CircuitOpen
                | Reason::UpstreamUnavailable
                | Reason::Draining
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body stalled for {after:?}")]
    BodyTimeout { after: std::time::Duration },
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("refused before reaching the upstream ({reason})")]
    Refused {
        reason: Reason,
        /// The gateway's estimate of when trying again makes sense.
        retry_after: Duration,
    },
    #[error("the route's budget ran out before the upstream answered")]
    BudgetExhausted,
    #[error("upstream unavailable: {0}")]
    UpstreamUnavailable(String),
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// Missing, wrong or malformed credentials all read the same, so the answer does not tell a
    /// caller which part was wrong.
    #[error("valid credentials are required for this route")]
    Unauthorized {
        /// Answer with a Basic `WWW-Authenticate` challenge (Basic is configured).
        challenge: bool,
    },
    #[error("requests from this address are not allowed on this route")]
    Forbidden,
}

impl ProxyError {
    /// What the caller is told. Upstream failures name internal addresses and library errors:
    /// those go to the log ([`ProxyError::detail`]), not into the answer.
    pub fn public_message(&self) -> std::borrow::Cow<'static, str> {
        match self {
            ProxyError::UpstreamUnavailable(_) => "the upstream is unavailable".into(),
            ProxyError::Upstream(_) => "the upstream failed to answer".into(),
            other => other.to_string().into(),
        }
    }

    /// What only the log is told.
    pub fn detail(&self) -> Option<String> {
        match self {
            ProxyError::UpstreamUnavailable(d) | ProxyError::Upstream(d) => Some(d.clone()),
            _ => None,
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            ProxyError::NoRoute => Reason::NoRoute,
            ProxyError::BodyTooLarge { .. } => Reason::PayloadTooLarge,
            ProxyError::BodyTimeout { .. } => Reason::BodyTimeout,
            ProxyError::BadRequest(_) => Reason::BadRequest,
            ProxyError::Refused { reason, .. } => *reason,
            ProxyError::BudgetExhausted => Reason::BudgetExhausted,
            ProxyError::UpstreamUnavailable(_) => Reason::UpstreamUnavailable,
            ProxyError::Upstream(_) => Reason::UpstreamError,
            ProxyError::Unauthorized { .. } => Reason::Unauthorized,
            ProxyError::Forbidden => Reason::Forbidden,
        }
    }
}
