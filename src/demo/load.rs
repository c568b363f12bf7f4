//! Open-loop load: callers arrive on a fixed schedule (`rate` per second), whatever happened to
//! the earlier ones, each on its own connection with its own timeout, as data actions do. A
//! closed loop (a fixed number of callers, each waiting for its answer before the next) would slow
//! down with the system under test and hide an overload.
//!
//! A slow-down can be scheduled: arrivals in `[from, to)` ask the backend for `?latency_ms=N`
//! (the FastAPI test app and the simulated backend both honour it), so the same tool measures how
//! a proxy behaves while its backend slows and after it recovers.

use std::time::Duration;

use http::Uri;
use tokio::time::Instant;

use super::burst::{call_timed, Kind, Outcome};

#[derive(Debug, Clone)]
pub struct Slow {
    pub from: Duration,
    pub to: Duration,
    pub latency: Duration,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// Arrivals per second.
    pub rate: f64,
    pub duration: Duration,
    pub caller_timeout: Duration,
    /// Sent as `?latency_ms=` outside the slow-down; `None` leaves the backend's own.
    pub latency: Option<Duration>,
    pub slow: Option<Slow>,
}

impl Plan {
    /// The query to send for an arrival at `at`, if any.
    pub fn latency_at(&self, at: Duration) -> Option<Duration> {
        match &self.slow {
            Some(s) if at >= s.from && at < s.to => Some(s.latency),
            _ => self.latency,
        }
    }

    /// When each caller arrives, from the start.
    pub fn schedule(&self) -> Vec<Duration> {
        if self.rate <= 0.0 {
            return Vec::new();
        }
        let n = (self.duration.as_secs_f64() * self.rate).round() as usize;
        (0..n)
            .map(|i| Duration::from_secs_f64(i as f64 / self.rate))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Arrival {
    /// Scheduled arrival, from the start of the run.
    pub at: Duration,
    pub outcome: Outcome,
}

fn with_latency(url: &Uri, latency: Option<Duration>) -> Uri {
    let Some(l) = latency else {
        return url.clone();
    };
    let pq = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let sep = if pq.contains('?') { '&' } else { '?' };
    let mut parts = url.clone().into_parts();
    parts.path_and_query = format!("{pq}{sep}latency_ms={}", l.as_millis())
        .parse()
        .ok();
    Uri::from_parts(parts).unwrap_or_else(|_| url.clone())
}

/// Runs the plan against `url` and returns every arrival's outcome, in arrival order. Ends at
/// most one caller timeout after the last arrival.
pub async fn run(url: &Uri, plan: &Plan) -> Vec<Arrival> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, at) in plan.schedule().into_iter().enumerate() {
        tokio::time::sleep_until(start + at).await;
        let url = with_latency(url, plan.latency_at(at));
        let timeout = plan.caller_timeout;
        tasks.push((
            at,
            tokio::spawn(async move {
                let began = Instant::now();
                let (kind, answered_in) =
                    match tokio::time::timeout(timeout, call_timed(&url, i)).await {
                        Err(_) => (Kind::Timeout, None),
                        Ok(k) => k,
                    };
                Outcome {
                    kind,
                    latency: began.elapsed(),
                    answered_in,
                }
            }),
        ));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (at, t) in tasks {
        let outcome = t.await.unwrap_or(Outcome {
            kind: Kind::Error,
            latency: Duration::ZERO,
            answered_in: None,
        });
        out.push(Arrival { at, outcome });
    }
    out
}

/// A refusal answered this fast counts as "at once".
pub const FAST: Duration = Duration::from_millis(100);
/// A caller that waited longer than this for any answer has waited.
pub const LONG_WAIT: Duration = Duration::from_secs(1);
/// Recovered means every arrival answered 2xx for at least this long (not just the last one).
pub const RECOVERED_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub arrivals: usize,
    pub ok: usize,
    pub timeouts: usize,
    pub refused_with_retry_after: usize,
    pub refused_without_retry_after: usize,
    pub other: usize,
    /// Refusals as the caller sees them: from its arrival (connect included) to the answer.
    pub refusal_p50: Option<Duration>,
    pub refusal_p95: Option<Duration>,
    pub ok_p50: Option<Duration>,
    pub ok_max: Option<Duration>,
    /// Arrivals in the window, refused fast, and waiting over a second (any outcome).
    pub window: Option<WindowReport>,
    /// After the slow-down ends: how long until every later arrival is answered 2xx, for at
    /// least [`RECOVERED_FOR`] of arrivals; `None` if that did not happen within the run.
    pub recovered_after: Option<Option<Duration>>,
    /// Arrivals after the slow-down ended, and how many of them got a 2xx.
    pub after: Option<(usize, usize)>,
}

#[derive(Debug, Clone, Default)]
pub struct WindowReport {
    pub arrivals: usize,
    pub fast_refusals: usize,
    pub waited: usize,
}

fn pct(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

fn is_refusal(k: &Kind) -> bool {
    matches!(k, Kind::Refused { .. })
}

impl LoadReport {
    pub fn of(
        arrivals: &[Arrival],
        window: Option<(Duration, Duration)>,
        slow_end: Option<Duration>,
    ) -> LoadReport {
        let count =
            |f: &dyn Fn(&Kind) -> bool| arrivals.iter().filter(|a| f(&a.outcome.kind)).count();
        let sorted = |f: &dyn Fn(&Kind) -> bool| {
            let mut v: Vec<Duration> = arrivals
                .iter()
                .filter(|a| f(&a.outcome.kind))
                .map(|a| a.outcome.latency)
                .collect();
            v.sort();
            v
        };
        let refusals = sorted(&is_refusal);
        let oks = sorted(&|k| matches!(k, Kind::Ok));
        let window = window.map(|(from, to)| {
            let inside: Vec<&Arrival> = arrivals
                .iter()
                .filter(|a| a.at >= from && a.at < to)
                .collect();
            WindowReport {
                arrivals: inside.len(),
                fast_refusals: inside
                    .iter()
                    .filter(|a| is_refusal(&a.outcome.kind) && a.outcome.latency < FAST)
                    .count(),
                waited: inside
                    .iter()
                    .filter(|a| a.outcome.latency > LONG_WAIT)
                    .count(),
            }
        });
        let recovered_after = slow_end.map(|end| {
            // The earliest arrival after the slow-down from which every later one got a 2xx.
            let after: Vec<&Arrival> = arrivals.iter().filter(|a| a.at >= end).collect();
            let last_bad = after
                .iter()
                .rposition(|a| !matches!(a.outcome.kind, Kind::Ok));
            let first_good = match last_bad {
                None => after.first(),
                Some(i) => after.get(i + 1),
            };
            let last = arrivals.last().map(|a| a.at).unwrap_or_default();
            first_good
                .filter(|a| last.saturating_sub(a.at) >= RECOVERED_FOR)
                .map(|a| a.at - end)
        });
        let after = slow_end.map(|end| {
            let after = arrivals.iter().filter(|a| a.at >= end);
            (
                after.clone().count(),
                after.filter(|a| matches!(a.outcome.kind, Kind::Ok)).count(),
            )
        });
        LoadReport {
            arrivals: arrivals.len(),
            ok: oks.len(),
            timeouts: count(&|k| matches!(k, Kind::Timeout)),
            refused_with_retry_after: count(&|k| matches!(k, Kind::Refused { retry_after: true })),
            refused_without_retry_after: count(&|k| {
                matches!(k, Kind::Refused { retry_after: false })
            }),
            other: count(&|k| matches!(k, Kind::OtherStatus | Kind::Error)),
            refusal_p50: pct(&refusals, 0.50),
            refusal_p95: pct(&refusals, 0.95),
            ok_p50: pct(&oks, 0.50),
            ok_max: oks.last().copied(),
            window,
            recovered_after,
            after,
        }
    }

    /// One line with every number, for scripts to collect.
    pub fn summary_line(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        let mut s = format!(
            "summary: arrivals={} ok={} timeouts={} refused_retry_after={} refused_bare={} other={} refusal_p50_ms={} refusal_p95_ms={} ok_p50_ms={} ok_max_ms={}",
            self.arrivals,
            self.ok,
            self.timeouts,
            self.refused_with_retry_after,
            self.refused_without_retry_after,
            self.other,
            ms(self.refusal_p50),
            ms(self.refusal_p95),
            ms(self.ok_p50),
            ms(self.ok_max),
        );
        if let Some(w) = &self.window {
            s.push_str(&format!(
                " window_arrivals={} window_fast_503={} window_waited_over_1s={}",
                w.arrivals, w.fast_refusals, w.waited
            ));
        }
        if let Some((n, ok)) = self.after {
            s.push_str(&format!(" after_slowdown_ok={ok}/{n}"));
        }
        if let Some(r) = self.recovered_after {
            s.push_str(&format!(
                " recovered_after_s={}",
                r.map(|d| format!("{:.1}", d.as_secs_f64()))
                    .unwrap_or_else(|| "never".into())
            ));
        }
        s
    }
}

/// Per second of arrival: how many came, and what they got.
pub fn timeline(arrivals: &[Arrival]) -> String {
    let secs = arrivals
        .last()
        .map(|a| a.at.as_secs() as usize + 1)
        .unwrap_or(0);
    let mut out = String::from(
        "arrival second   callers    2xx    503  timeout  other   latency p50 / max\n",
    );
    for s in 0..secs {
        let inside: Vec<&Arrival> = arrivals
            .iter()
            .filter(|a| a.at.as_secs() as usize == s)
            .collect();
        let n = |f: &dyn Fn(&Kind) -> bool| inside.iter().filter(|a| f(&a.outcome.kind)).count();
        let mut lat: Vec<Duration> = inside.iter().map(|a| a.outcome.latency).collect();
        lat.sort();
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        out.push_str(&format!(
            "{:>5}-{:<2}        {:>7}  {:>5}  {:>5}  {:>7}  {:>5}   {} / {}\n",
            s,
            s + 1,
            inside.len(),
            n(&|k| matches!(k, Kind::Ok)),
            n(&is_refusal),
            n(&|k| matches!(k, Kind::Timeout)),
            n(&|k| matches!(k, Kind::OtherStatus | Kind::Error)),
            ms(pct(&lat, 0.5)),
            ms(lat.last().copied()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(at_ms: u64, kind: Kind, latency_ms: u64) -> Arrival {
        Arrival {
            at: Duration::from_millis(at_ms),
            outcome: Outcome {
                kind,
                latency: Duration::from_millis(latency_ms),
                answered_in: None,
            },
        }
    }

    #[test]
    fn schedule_is_open_loop_and_slowdown_is_per_arrival() {
        let plan = Plan {
            rate: 10.0,
            duration: Duration::from_secs(12),
            caller_timeout: Duration::from_secs(3),
            latency: None,
            slow: Some(Slow {
                from: Duration::from_secs(3),
                to: Duration::from_secs(6),
                latency: Duration::from_secs(3),
            }),
        };
        let s = plan.schedule();
        assert_eq!(s.len(), 120);
        assert_eq!(s[35], Duration::from_millis(3500));
        assert_eq!(plan.latency_at(s[29]), None);
        assert_eq!(plan.latency_at(s[30]), Some(Duration::from_secs(3)));
        assert_eq!(plan.latency_at(s[60]), None);
        let url: Uri = "http://127.0.0.1:1/v1/sentiment".parse().unwrap();
        assert_eq!(
            with_latency(&url, Some(Duration::from_secs(3))).to_string(),
            "http://127.0.0.1:1/v1/sentiment?latency_ms=3000"
        );
    }

    #[test]
    fn report_counts_window_and_recovery() {
        let refused = Kind::Refused { retry_after: true };
        let arrivals = vec![
            arrival(0, Kind::Ok, 200),
            arrival(4600, refused.clone(), 20),
            arrival(4700, Kind::Ok, 1900),
            arrival(5900, refused.clone(), 150),
            arrival(6100, Kind::Timeout, 3000),
            arrival(6200, Kind::Ok, 300),
            arrival(6300, Kind::Ok, 250),
            arrival(7200, Kind::Ok, 250),
        ];
        let r = LoadReport::of(
            &arrivals,
            Some((Duration::from_millis(4500), Duration::from_secs(6))),
            Some(Duration::from_secs(6)),
        );
        assert_eq!((r.ok, r.timeouts, r.refused_with_retry_after), (5, 1, 2));
        let w = r.window.clone().unwrap();
        assert_eq!((w.arrivals, w.fast_refusals, w.waited), (3, 1, 1));
        assert_eq!(r.recovered_after, Some(Some(Duration::from_millis(200))));
        assert_eq!(r.ok_max, Some(Duration::from_millis(1900)));
        assert_eq!(r.after, Some((4, 3)));
        assert!(r.summary_line().contains("recovered_after_s=0.2"));
        assert!(timeline(&arrivals).lines().count() == 9);
        // A 2xx only at the very end is not a recovery.
        let r = LoadReport::of(&arrivals[..6], None, Some(Duration::from_secs(6)));
        assert_eq!(r.recovered_after, Some(None));
    }
}
