//! Adaptive concurrency: finds the backend's knee from observed latency, so operators need not
//! guess worker counts.
//!
//! Two phases, after Envoy's adaptive concurrency filter:
//! - **Probe**: the limit is pinned to `min` until `PROBE_SAMPLES` exchanges have completed at that
//!   concurrency; the lowest latency among them is the backend's no-load latency. This runs at
//!   start and again every `PROBE_INTERVAL`, so a backend that became permanently slower (or
//!   faster) is re-measured instead of looking overloaded (or idle) forever.
//! - **Gradient**: once per batch of `limit` completions (about one round trip), the batch's mean
//!   latency is compared with the no-load latency. Above `TOLERANCE` × no-load the backend is
//!   queueing internally, so the limit shrinks by 10% (at least one); otherwise, if the batch
//!   actually used the whole limit, it grows by one.

use std::time::{Duration, Instant};

/// Latency ratio over no-load beyond which the backend counts as queueing.
const TOLERANCE: f64 = 1.5;
const DECREASE: f64 = 0.9;
const PROBE_SAMPLES: usize = 5;
const PROBE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum Phase {
    Probe {
        resume_at: usize,
        seen: usize,
        min_rtt: f64,
    },
    Gradient {
        next_probe: Instant,
    },
}

#[derive(Debug)]
pub struct AdaptiveLimit {
    min: usize,
    max: usize,
    limit: usize,
    no_load: Option<f64>,
    phase: Phase,
    batch_sum: f64,
    batch_n: usize,
    batch_saturated: bool,
}

impl AdaptiveLimit {
    pub fn new(min: usize, max: usize, initial: usize) -> Self {
        AdaptiveLimit {
            min,
            max,
            limit: min,
            no_load: None,
            phase: Phase::Probe {
                resume_at: initial.clamp(min, max),
                seen: 0,
                min_rtt: f64::MAX,
            },
            batch_sum: 0.0,
            batch_n: 0,
            batch_saturated: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Feeds one completed exchange; `inflight` is how many were in flight when it completed
    /// (including itself). Returns the new limit.
    pub fn record(&mut self, rtt: Duration, inflight: usize, now: Instant) -> usize {
        let x = rtt.as_secs_f64();
        match &mut self.phase {
            Phase::Probe {
                resume_at,
                seen,
                min_rtt,
            } => {
                // Exchanges that started before the pin ran at higher concurrency; skip them.
                if inflight <= self.min {
                    *seen += 1;
                    *min_rtt = min_rtt.min(x);
                }
                if *seen >= PROBE_SAMPLES {
                    self.no_load = Some(*min_rtt);
                    self.limit = *resume_at;
                    self.phase = Phase::Gradient {
                        next_probe: now + PROBE_INTERVAL,
                    };
                    self.reset_batch();
                }
                return self.limit;
            }
            Phase::Gradient { next_probe } => {
                if now >= *next_probe {
                    self.phase = Phase::Probe {
                        resume_at: self.limit,
                        seen: 0,
                        min_rtt: f64::MAX,
                    };
                    self.limit = self.min;
                    return self.limit;
                }
            }
        }
        self.batch_sum += x;
        self.batch_n += 1;
        self.batch_saturated |= inflight >= self.limit;
        if self.batch_n < self.limit.max(1) {
            return self.limit;
        }
        let avg = self.batch_sum / self.batch_n as f64;
        let no_load = self.no_load.unwrap_or(avg);
        if avg > no_load * TOLERANCE {
            let next = ((self.limit as f64) * DECREASE).floor() as usize;
            self.limit = next.min(self.limit.saturating_sub(1)).max(self.min);
        } else if self.batch_saturated {
            self.limit = (self.limit + 1).min(self.max);
        }
        self.reset_batch();
        self.limit
    }

    fn reset_batch(&mut self) {
        self.batch_sum = 0.0;
        self.batch_n = 0;
        self.batch_saturated = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend with `workers` parallel workers, each taking `service` per request: with
    /// `inflight` requests in flight a request's latency is `ceil(inflight / workers) × service`.
    fn latency(inflight: usize, workers: usize, service: f64) -> Duration {
        Duration::from_secs_f64(inflight.div_ceil(workers) as f64 * service)
    }

    fn run(limiter: &mut AdaptiveLimit, workers: usize, rounds: usize, now: &mut Instant) {
        for _ in 0..rounds {
            let inflight = limiter.limit();
            for _ in 0..inflight {
                *now += Duration::from_millis(5);
                limiter.record(latency(inflight, workers, 0.05), inflight, *now);
            }
        }
    }

    #[test]
    fn converges_up_to_the_knee() {
        let mut now = Instant::now();
        let mut l = AdaptiveLimit::new(1, 64, 1);
        run(&mut l, 8, 200, &mut now);
        assert!((6..=10).contains(&l.limit()), "limit {}", l.limit());
    }

    #[test]
    fn converges_down_when_capacity_drops() {
        let mut now = Instant::now();
        let mut l = AdaptiveLimit::new(1, 64, 32);
        run(&mut l, 4, 200, &mut now);
        assert!((3..=6).contains(&l.limit()), "limit {}", l.limit());
    }

    #[test]
    fn stays_within_bounds() {
        let mut now = Instant::now();
        let mut l = AdaptiveLimit::new(5, 7, 6);
        for _ in 0..100 {
            run(&mut l, 1, 1, &mut now);
            assert!((5..=7).contains(&l.limit()), "limit {}", l.limit());
        }
        let mut l = AdaptiveLimit::new(1, 7, 6);
        run(&mut l, 100, 100, &mut now);
        assert_eq!(l.limit(), 7);
    }

    #[test]
    fn re_measures_no_load_latency_periodically() {
        let mut now = Instant::now();
        let mut l = AdaptiveLimit::new(1, 64, 8);
        run(&mut l, 8, 100, &mut now);
        let before = l.limit();
        // Time passes; the next completion starts a probe at the minimum.
        now += PROBE_INTERVAL;
        l.record(Duration::from_millis(50), before, now);
        assert_eq!(l.limit(), 1);
        run(&mut l, 8, 10, &mut now);
        assert!(
            l.limit() >= before - 1,
            "resumed near {before}, got {}",
            l.limit()
        );
    }
}
