//! Circuit breaking per upstream: after `consecutive_failures` connect failures or 5xx answers in
//! a row (within `window`), refuse at once with `circuit_open` for `cooldown`, then let `probes`
//! requests through; one success closes the circuit, one failure opens it again.

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
    config: CircuitConfig,
    state: Mutex<State>,
}

impl Circuit {
    pub fn new(upstream: &str, config: &CircuitConfig) -> Self {
        let c = Circuit {
            upstream: upstream.to_string(),
            config: config.clone(),
            state: Mutex::new(State::Closed {
                failures: 0,
                first_failure: None,
            }),
        };
        c.publish(false);
        c
    }

    fn publish(&self, open: bool) {
        metrics::gauge!("breakwater_circuit_open", "upstream" => self.upstream.clone())
            .set(if open { 1.0 } else { 0.0 });
    }

    pub fn is_open(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|p| p.into_inner()),
            State::Open { .. }
        )
    }

    /// Lets a request through, or refuses it while the circuit is open.
    pub fn check(&self) -> Result<(), ProxyError> {
        if !self.config.enabled {
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

    pub fn record_success(&self) {
        if !self.config.enabled {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let was_open = !matches!(*s, State::Closed { .. });
        *s = State::Closed {
            failures: 0,
            first_failure: None,
        };
        if was_open {
            tracing::info!(upstream = %self.upstream, "circuit closed");
            self.publish(false);
        }
    }

    pub fn record_failure(&self) {
        if !self.config.enabled {
            return;
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
            tracing::warn!(upstream = %self.upstream, cooldown = %crate::config::units::format_duration(self.config.cooldown), "circuit opened");
            self.publish(true);
        }
    }
}

fn refused(retry_after: Duration) -> ProxyError {
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
        let c = Circuit::new("u", &cfg());
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
        let c = Circuit::new("u", &cfg());
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
        let c = Circuit::new("u", &cfg());
        c.record_failure();
        c.record_failure();
        tokio::time::advance(Duration::from_secs(11)).await;
        c.record_failure();
        assert!(!c.is_open());
    }
}
