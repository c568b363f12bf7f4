//! A running estimate of a route's upstream service time (written on its connection → last
//! byte), from which the admission queue predicts when each waiter gets a slot.
//!
//! - An exponentially weighted mean and mean absolute deviation of completed exchanges, weight
//!   1/8 per sample (about the last 16 samples dominate), so a backend that slows down moves the
//!   estimate within a couple of dozen completions. Measured service time already contains any
//!   queueing inside the backend, so the predicted drain rate falls as it slows.
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

    /// An exchange that was cut off (its budget ran out, its caller left) after `at_least`:
    /// its service time is at least that. It only ever pulls the estimate up; before any
    /// completion it seeds it, so a backend that never answers is not mistaken for an unknown one.
    pub fn record_censored(&mut self, at_least: Duration) {
        match self.mean {
            Some(m) if at_least.as_secs_f64() <= m => {}
            _ => self.record(at_least),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_estimator_estimates_nothing() {
        let e = Estimator::default();
        assert!(!e.is_warm());
        assert!(e.mean().is_none());
        assert!(e.service_high().is_none());
    }

    #[test]
    fn steady_samples_give_a_tight_estimate() {
        let mut e = Estimator::default();
        for _ in 0..50 {
            e.record(Duration::from_millis(200));
        }
        let mean = e.mean().unwrap().as_secs_f64();
        assert!((mean - 0.2).abs() < 0.001, "{mean}");
        let high = e.service_high().unwrap().as_secs_f64();
        assert!((0.2..0.21).contains(&high), "{high}");
    }

    #[test]
    fn cut_off_exchanges_only_pull_the_estimate_up() {
        let mut e = Estimator::default();
        e.record_censored(Duration::from_secs(2));
        assert_eq!(
            e.mean(),
            Some(Duration::from_secs(2)),
            "seeds a cold estimate"
        );
        let mut e = Estimator::default();
        for _ in 0..50 {
            e.record(Duration::from_millis(200));
        }
        e.record_censored(Duration::from_millis(50));
        assert!((e.mean().unwrap().as_secs_f64() - 0.2).abs() < 0.001);
        e.record_censored(Duration::from_secs(2));
        assert!(e.mean().unwrap() > Duration::from_millis(400));
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
