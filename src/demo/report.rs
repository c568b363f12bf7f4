//! Summarises a burst into the numbers the demo table and the benchmark docs show.

use std::time::Duration;

use super::burst::{Burst, Kind};

#[derive(Debug, Clone)]
pub struct Summary {
    pub callers: usize,
    pub ok: usize,
    pub refused_with_retry_after: usize,
    pub refused_without_retry_after: usize,
    pub other_status: usize,
    pub timeouts: usize,
    pub errors: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Time to a refusal once the request was sent (connect time excluded).
    pub refusal_p50: Option<Duration>,
    pub refusal_p99: Option<Duration>,
    /// Time from the burst's start to the last successful answer.
    pub last_ok: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

impl Summary {
    pub fn of(b: &Burst) -> Summary {
        let mut all: Vec<Duration> = b.outcomes.iter().map(|o| o.latency).collect();
        all.sort();
        let mut refusals: Vec<Duration> = b
            .outcomes
            .iter()
            .filter(|o| matches!(o.kind, Kind::Refused { .. }))
            .map(|o| o.answered_in.unwrap_or(o.latency))
            .collect();
        refusals.sort();
        let count = |f: &dyn Fn(&Kind) -> bool| b.outcomes.iter().filter(|o| f(&o.kind)).count();
        Summary {
            callers: b.outcomes.len(),
            ok: count(&|k| matches!(k, Kind::Ok)),
            refused_with_retry_after: count(&|k| matches!(k, Kind::Refused { retry_after: true })),
            refused_without_retry_after: count(&|k| {
                matches!(k, Kind::Refused { retry_after: false })
            }),
            other_status: count(&|k| matches!(k, Kind::OtherStatus)),
            timeouts: count(&|k| matches!(k, Kind::Timeout)),
            errors: count(&|k| matches!(k, Kind::Error)),
            p50: percentile(&all, 0.50),
            p99: percentile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
            refusal_p50: (!refusals.is_empty()).then(|| percentile(&refusals, 0.50)),
            refusal_p99: (!refusals.is_empty()).then(|| percentile(&refusals, 0.99)),
            last_ok: b
                .outcomes
                .iter()
                .filter(|o| matches!(o.kind, Kind::Ok))
                .map(|o| o.latency)
                .max()
                .unwrap_or_default(),
        }
    }

    /// Successful answers per second over the burst, as a share of what the backend can do.
    pub fn goodput(&self, capacity_per_s: f64) -> Option<f64> {
        let span = self.last_ok.as_secs_f64();
        (self.ok > 0 && span > 0.0 && capacity_per_s > 0.0)
            .then(|| (self.ok as f64 / span) / capacity_per_s)
    }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// Renders summaries side by side, one column each.
pub fn table(columns: &[(&str, &Summary)], capacity_per_s: f64) -> String {
    type Row = (&'static str, fn(&Summary, f64) -> String);
    let rows: [Row; 10] = [
        ("callers", |s, _| s.callers.to_string()),
        ("answered 2xx", |s, _| s.ok.to_string()),
        ("503 with Retry-After", |s, _| {
            s.refused_with_retry_after.to_string()
        }),
        ("503 without Retry-After", |s, _| {
            s.refused_without_retry_after.to_string()
        }),
        ("caller timeouts (your 504s)", |s, _| s.timeouts.to_string()),
        ("other errors", |s, _| {
            (s.other_status + s.errors).to_string()
        }),
        ("latency p50 / p99", |s, _| {
            format!("{} / {}", ms(s.p50), ms(s.p99))
        }),
        ("latency max", |s, _| ms(s.max)),
        ("refusal answered in p50 / p99", |s, _| {
            match (s.refusal_p50, s.refusal_p99) {
                (Some(a), Some(b)) => format!("{} / {}", ms(a), ms(b)),
                _ => "-".into(),
            }
        }),
        ("goodput (share of capacity)", |s, c| {
            s.goodput(c)
                .map(|g| format!("{:.0}%", g * 100.0))
                .unwrap_or_else(|| "-".into())
        }),
    ];
    let label_w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let cells: Vec<Vec<String>> = columns
        .iter()
        .map(|(_, s)| rows.iter().map(|r| (r.1)(s, capacity_per_s)).collect())
        .collect();
    let col_w: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            cells[i]
                .iter()
                .map(|c| c.len())
                .max()
                .unwrap_or(0)
                .max(name.len())
        })
        .collect();
    let mut out = format!("{:label_w$}", "");
    for (i, (name, _)) in columns.iter().enumerate() {
        out.push_str(&format!("  {:>w$}", name, w = col_w[i]));
    }
    out.push('\n');
    for (r, row) in rows.iter().enumerate() {
        out.push_str(&format!("{:label_w$}", row.0));
        for (i, col) in cells.iter().enumerate() {
            out.push_str(&format!("  {:>w$}", col[r], w = col_w[i]));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::burst::Outcome;
    use super::*;

    #[test]
    fn summary_counts_and_percentiles() {
        let mut outcomes = Vec::new();
        for i in 0..10 {
            outcomes.push(Outcome {
                kind: Kind::Ok,
                latency: Duration::from_millis(100 * (i + 1)),
                answered_in: None,
            });
        }
        for _ in 0..5 {
            outcomes.push(Outcome {
                kind: Kind::Refused { retry_after: true },
                latency: Duration::from_millis(9),
                answered_in: Some(Duration::from_millis(1)),
            });
        }
        outcomes.push(Outcome {
            kind: Kind::Timeout,
            latency: Duration::from_secs(3),
            answered_in: None,
        });
        let s = Summary::of(&Burst { outcomes });
        assert_eq!((s.ok, s.refused_with_retry_after, s.timeouts), (10, 5, 1));
        assert_eq!(s.max, Duration::from_secs(3));
        assert_eq!(s.refusal_p99, Some(Duration::from_millis(1)));
        assert_eq!(s.last_ok, Duration::from_secs(1));
        // 10 answers in 1 s against a capacity of 20/s.
        assert!((s.goodput(20.0).unwrap() - 0.5).abs() < 1e-9);
        let t = table(&[("direct", &s)], 20.0);
        assert!(t.contains("answered 2xx") && t.contains("10"));
    }
}
