//! Running estimates of a route's upstream service time, from which the admission queue derives
//! its drain rate and the wait a newcomer would face.
//!
//! - Service time: an exponentially weighted mean and mean absolute deviation of completed
//!   exchanges (sent → last byte), weight 1/8 per sample (about the last 16 samples dominate),
//!   so a backend that slows down moves the estimate within a couple of dozen completions.
//! - Drain rate: `concurrency limit / mean service time` requests per second. Measured service
//!   time already contains any queueing inside the backend, so the rate falls as it slows.
//! - Cold start: until the first completion there is no estimate and nothing is refused on
//!   estimates (only `max_wait`, the budget and the queue depth apply). The first sample seeds the
//!   mean directly with a deviation of half the sample.

use std::time::Duration;

const WEIGHT: f64 = 1.0 / 8.0;

#[derive(Debug, Clone, Default)]
pub struct Estimator {
    mean: Option<f64>,
    dev: f64,
    samples: u64,
}

impl Estimator {
    pub fn record(&mut self, service: Duration) {
        let x = service.as_secs_f64();
        self.samples += 1;
        match self.mean {
            None => {
                self.mean = Some(x);
                self.dev = x / 2.0;
            }
            Some(m) => {
                let err = x - m;
                self.mean = Some(m + WEIGHT * err);
                self.dev += WEIGHT * (err.abs() - self.dev);
            }
        }
    }

    pub fn is_warm(&self) -> bool {
        self.mean.is_some()
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Mean service time, if any exchange has completed.
    pub fn mean(&self) -> Option<Duration> {
        self.mean.map(Duration::from_secs_f64)
    }

    /// A pessimistic service time (mean + 2 deviations): admitting a request only when even a
    /// slow exchange fits keeps answers inside the budget.
    pub fn service_high(&self) -> Option<Duration> {
        self.mean
            .map(|m| Duration::from_secs_f64(m + 2.0 * self.dev))
    }

    /// Completions per second with `limit` exchanges in flight.
    pub fn drain_rate(&self, limit: usize) -> Option<f64> {
        self.mean
            .filter(|m| *m > 0.0)
            .map(|m| limit.max(1) as f64 / m)
    }

    /// Expected time until the request at 1-based queue `position` gets a slot.
    pub fn wait_for(&self, position: usize, limit: usize) -> Option<Duration> {
        self.drain_rate(limit)
            .map(|r| Duration::from_secs_f64(position as f64 / r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_estimator_estimates_nothing() {
        let e = Estimator::default();
        assert!(!e.is_warm());
        assert!(e.wait_for(10, 4).is_none());
        assert!(e.service_high().is_none());
    }

    #[test]
    fn drain_rate_follows_limit_and_service_time() {
        let mut e = Estimator::default();
        for _ in 0..50 {
            e.record(Duration::from_millis(200));
        }
        let rate = e.drain_rate(4).unwrap();
        assert!((rate - 20.0).abs() < 0.01, "{rate}");
        let wait = e.wait_for(20, 4).unwrap();
        assert!((wait.as_secs_f64() - 1.0).abs() < 0.01, "{wait:?}");
        assert!(e.service_high().unwrap() >= Duration::from_millis(200));
    }

    #[test]
    fn adapts_when_the_backend_slows_down() {
        let mut e = Estimator::default();
        for _ in 0..50 {
            e.record(Duration::from_millis(100));
        }
        for _ in 0..30 {
            e.record(Duration::from_millis(400));
        }
        let m = e.mean().unwrap().as_secs_f64();
        assert!(m > 0.38, "mean {m} should have moved close to 400ms");
    }
}
