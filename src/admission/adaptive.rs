//! Adaptive concurrency: finds the backend's knee from observed latency, so operators need not
//! guess worker counts.
//!
//! The limiter keeps the lowest latency seen recently (the "no-load" latency) and, once per batch
//! of completions, compares the batch's mean latency with it. Above `TOLERANCE` × no-load the
//! backend is queueing internally, so the limit shrinks multiplicatively; otherwise, if the batch
//! actually used the limit, it grows by one. This is the shape of Netflix's gradient limiter and
//! Envoy's adaptive concurrency filter, tuned for backends whose per-request cost is steady.

use std::time::{Duration, Instant};

/// Latency ratio over no-load beyond which the backend counts as queueing.
const TOLERANCE: f64 = 1.5;
const DECREASE: f64 = 0.9;
/// The no-load latency is forgotten after this long, so a permanently slower backend is
/// re-measured instead of looking overloaded forever.
const MIN_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct AdaptiveLimit {
    min: usize,
    max: usize,
    limit: usize,
    min_rtt: Option<f64>,
    prev_min_rtt: Option<f64>,
    window_started: Instant,
    batch_sum: f64,
    batch_n: usize,
    batch_saturated: bool,
}

impl AdaptiveLimit {
    pub fn new(min: usize, max: usize, initial: usize) -> Self {
        AdaptiveLimit {
            min,
            max,
            limit: initial.clamp(min, max),
            min_rtt: None,
            prev_min_rtt: None,
            window_started: Instant::now(),
            batch_sum: 0.0,
            batch_n: 0,
            batch_saturated: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn no_load(&self) -> Option<f64> {
        match (self.min_rtt, self.prev_min_rtt) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Feeds one completed exchange; `inflight` is how many were in flight when it completed
    /// (including itself). Returns the new limit.
    pub fn record(&mut self, rtt: Duration, inflight: usize, now: Instant) -> usize {
        let x = rtt.as_secs_f64();
        if now.duration_since(self.window_started) >= MIN_WINDOW {
            self.prev_min_rtt = self.min_rtt.take();
            self.window_started = now;
        }
        self.min_rtt = Some(self.min_rtt.map_or(x, |m| m.min(x)));
        self.batch_sum += x;
        self.batch_n += 1;
        self.batch_saturated |= inflight >= self.limit;
        // One decision per `limit` completions: roughly once per round trip.
        if self.batch_n < self.limit.max(1) {
            return self.limit;
        }
        let avg = self.batch_sum / self.batch_n as f64;
        let no_load = self.no_load().unwrap_or(avg);
        if avg > no_load * TOLERANCE {
            let next = ((self.limit as f64) * DECREASE).floor() as usize;
            self.limit = next.min(self.limit.saturating_sub(1)).max(self.min);
        } else if self.batch_saturated {
            self.limit = (self.limit + 1).min(self.max);
        }
        self.batch_sum = 0.0;
        self.batch_n = 0;
        self.batch_saturated = false;
        self.limit
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
        run(&mut l, 1, 100, &mut now);
        assert_eq!(l.limit(), 5);
        let mut l = AdaptiveLimit::new(1, 7, 6);
        run(&mut l, 100, 100, &mut now);
        assert_eq!(l.limit(), 7);
    }
}
