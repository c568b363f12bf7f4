//! Circuit breaking per upstream endpoint: after `consecutive_failures` failures in a row (within
//! `window`; the upstream says what counts: connect failures, 5xx answers, no answer within the
//! budget while another endpoint answered), the endpoint is ejected for `cooldown`, then
//! `probes` requests go to it; one success brings it back, one failure ejects it again. The upstream (`crate::upstream`) turns the endpoints'
//! states into its capacity, and refuses with `circuit_open` only when every endpoint is out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::CircuitConfig;
use crate::error::{ProxyError, Reason};

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
        first_failure: Option<Instant>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        since: Instant,
        probes_sent: u32,
    },
}

pub struct Circuit {
    upstream: String,
    endpoint: String,
    config: CircuitConfig,
    state: Mutex<State>,
    /// Mirrors `state` being `Closed`, so the common case is read without the lock.
    closed: AtomicBool,
}

/// How a circuit stands for choosing its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Takes any number of requests.
    Closed,
    /// Takes this many probes now.
    Probing(u32),
    /// Ejected until this moment.
    Ejected(Instant),
}

impl Circuit {
    pub fn new(upstream: &str, endpoint: &str, config: &CircuitConfig) -> Self {
        let c = Circuit {
            upstream: upstream.to_string(),
            endpoint: endpoint.to_string(),
            config: config.clone(),
            state: Mutex::new(State::Closed {
                failures: 0,
                first_failure: None,
            }),
            closed: AtomicBool::new(true),
        };
        c.publish(false);
        c
    }

    fn publish(&self, open: bool) {
        metrics::gauge!("breakwater_endpoint_ejected",
            "upstream" => self.upstream.clone(), "endpoint" => self.endpoint.clone())
        .set(if open { 1.0 } else { 0.0 });
        if open {
            metrics::counter!("breakwater_endpoint_ejections_total",
                "upstream" => self.upstream.clone(), "endpoint" => self.endpoint.clone())
            .increment(1);
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            State::Open { .. }
        )
    }

    /// Closed (or disabled): takes any request, read without the lock.
    pub fn is_closed(&self) -> bool {
        !self.config.enabled || self.closed.load(Ordering::Acquire)
    }

    /// Whether (and how much) the endpoint can be sent to at `now`, without taking a probe.
    pub fn standing(&self, now: Instant) -> Standing {
        if !self.config.enabled || self.closed.load(Ordering::Acquire) {
            return Standing::Closed;
        }
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Closed { .. } => Standing::Closed,
            State::Open { until } if now < *until => Standing::Ejected(*until),
            State::Open { .. } => Standing::Probing(self.config.probes),
            State::HalfOpen { since, probes_sent } => {
                if now.duration_since(*since) >= self.config.cooldown {
                    Standing::Probing(self.config.probes)
                } else if *probes_sent < self.config.probes {
                    Standing::Probing(self.config.probes - probes_sent)
                } else {
                    Standing::Ejected(*since + self.config.cooldown)
                }
            }
        }
    }

    /// Lets a request through, or refuses it while the circuit is open.
    pub fn check(&self) -> Result<(), ProxyError> {
        if !self.config.enabled || self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *s {
            State::Closed { .. } => Ok(()),
            State::Open { until } => {
                if now < *until {
                    return Err(refused(*until - now));
                }
                *s = State::HalfOpen {
                    since: now,
                    probes_sent: 1,
                };
                Ok(())
            }
            State::HalfOpen { since, probes_sent } => {
                // Probes that never report back (refused by admission, caller gone) must not
                // wedge the circuit half-open: a new round starts after a cooldown.
                if now.duration_since(*since) >= self.config.cooldown {
                    *since = now;
                    *probes_sent = 0;
                }
                if *probes_sent < self.config.probes {
                    *probes_sent += 1;
                    Ok(())
                } else {
                    Err(refused(self.config.cooldown))
                }
            }
        }
    }

    /// Records a success; true when it brought the endpoint back.
    pub fn record_success(&self) -> bool {
        if !self.config.enabled {
            return false;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let State::Closed { failures: 0, .. } = *s {
            return false;
        }
        let was_open = !matches!(*s, State::Closed { .. });
        *s = State::Closed {
            failures: 0,
            first_failure: None,
        };
        self.closed.store(true, Ordering::Release);
        if was_open {
            tracing::info!(upstream = %self.upstream, endpoint = %self.endpoint, "circuit closed");
            self.publish(false);
        }
        was_open
    }

    /// Records a failure; true when it ejected the endpoint.
    pub fn record_failure(&self) -> bool {
        if !self.config.enabled {
            return false;
        }
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open = match &mut *s {
            State::Closed {
                failures,
                first_failure,
            } => {
                if first_failure.is_none_or(|t| now.duration_since(t) > self.config.window) {
                    *failures = 0;
                    *first_failure = Some(now);
                }
                *failures += 1;
                *failures >= self.config.consecutive_failures
            }
            State::HalfOpen { .. } => true,
            State::Open { .. } => false,
        };
        if open {
            *s = State::Open {
                until: now + self.config.cooldown,
            };
            self.closed.store(false, Ordering::Release);
            tracing::warn!(upstream = %self.upstream, endpoint = %self.endpoint, cooldown = %crate::config::units::format_duration(self.config.cooldown), "circuit opened");
            self.publish(true);
        }
        open
    }
}

pub fn refused(retry_after: Duration) -> ProxyError {
    ProxyError::Refused {
        reason: Reason::CircuitOpen,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CircuitConfig {
        CircuitConfig {
            enabled: true,
            consecutive_failures: 3,
            window: Duration::from_secs(10),
            cooldown: Duration::from_millis(50),
            probes: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let c = Circuit::new("u", "e", &cfg());
        c.record_failure();
        c.record_failure();
        c.record_success();
        c.record_failure();
        c.record_failure();
        assert!(c.check().is_ok(), "a success in between resets the count");
        c.record_failure();
        assert!(c.is_open());
        let err = c.check().unwrap_err();
        assert_eq!(err.reason(), Reason::CircuitOpen);

        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(c.check().is_ok(), "first probe goes through");
        assert!(c.check().is_err(), "only one probe at a time");
        c.record_success();
        assert!(c.check().is_ok());
        assert!(!c.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens() {
        let c = Circuit::new("u", "e", &cfg());
        for _ in 0..3 {
            c.record_failure();
        }
        tokio::time::advance(Duration::from_millis(60)).await;
        assert!(c.check().is_ok());
        c.record_failure();
        assert!(c.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let c = Circuit::new("u", "e", &cfg());
        c.record_failure();
        c.record_failure();
        tokio::time::advance(Duration::from_secs(11)).await;
        c.record_failure();
        assert!(!c.is_open());
    }
}
