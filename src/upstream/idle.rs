//! Learning when the upstream closes idle keep-alive connections, so the pool stops handing out
//! connections about to be closed.
//!
//! A request written on a connection the peer is closing at that moment (the keep-alive race)
//! fails after it was written, and a request that is not idempotent must not then be sent again
//! (RFC 9110 §9.2.2). Most backends close idle connections on a fixed timer (uvicorn 5 s by
//! default, gunicorn 2 s, an ALB 60 s), which is often shorter than a pool's `idle_timeout`. So
//! every connection that the peer closes while it sits idle is a sample of that timer; a
//! `Keep-Alive: timeout=N` answer header states it outright. A pooled connection is retired
//! before it reaches the shortest timer seen, less a margin for clocks and scheduling.
//!
//! A peer that closes idle connections for another reason (a restart) teaches too short a timer:
//! connections are then retired early, which costs connects, never correctness. What was learned
//! is forgotten after [`FORGET_AFTER`] without a confirming sample, so the pool relearns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a learned idle timer stands without a sample confirming it.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// One connection's idle clock, shared with the task that drives it so the task can tell, when
/// the peer closes, whether the connection was idle and for how long.
#[derive(Debug)]
pub struct IdleClock {
    epoch: Instant,
    /// Microseconds since `epoch` the connection last went idle.
    idle_since: AtomicU64,
    busy: AtomicBool,
    /// The peer announced it closes this connection (`Connection: close`): its end is not a
    /// sample of the idle timer.
    closing: AtomicBool,
}

impl IdleClock {
    pub fn new() -> Self {
        IdleClock {
            epoch: Instant::now(),
            idle_since: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }

    pub fn set_busy(&self) {
        self.busy.store(true, Ordering::Release);
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    /// The exchange is over; `reusable`: it ended cleanly, so the connection may idle in the pool.
    pub fn went_idle(&self, reusable: bool) {
        self.went_idle_at(Instant::now(), reusable);
    }

    /// `went_idle`, with the time the caller has already read.
    pub fn went_idle_at(&self, now: Instant, reusable: bool) {
        let at = now.saturating_duration_since(self.epoch).as_micros() as u64;
        self.idle_since.store(at, Ordering::Release);
        self.busy.store(!reusable, Ordering::Release);
    }

    pub fn mark_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub fn idle_for(&self) -> Duration {
        let since = Duration::from_micros(self.idle_since.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(since)
    }

    /// The idle time to learn from when the peer has just closed the connection, if its close
    /// says anything about the peer's idle timer.
    pub fn closed_while_idle(&self) -> Option<Duration> {
        (!self.is_busy() && !self.closing.load(Ordering::Acquire)).then(|| self.idle_for())
    }
}

impl Default for IdleClock {
    fn default() -> Self {
        IdleClock::new()
    }
}

/// The shortest idle timer seen of one upstream, and when it was last confirmed.
#[derive(Debug, Default)]
pub struct IdleTimer {
    learned: Mutex<Option<(Duration, Instant)>>,
}

impl IdleTimer {
    /// The peer closed a connection that had been idle for `idle`.
    pub fn observe(&self, idle: Duration) {
        let now = Instant::now();
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        *learned = match *learned {
            // Shorter than what we knew, or what we knew is old: this is the timer now.
            Some((t, at)) if idle >= t && now.duration_since(at) < FORGET_AFTER => {
                // A close near the known timer confirms it.
                let at = if idle <= t + t / 4 { now } else { at };
                Some((t, at))
            }
            _ => Some((idle, now)),
        };
    }

    /// How long a pooled connection may have been idle and still be handed out.
    pub fn retire_after(&self) -> Option<Duration> {
        let learned = *self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let (t, at) = learned?;
        if at.elapsed() >= FORGET_AFTER {
            return None;
        }
        Some(t.saturating_sub(margin(t)))
    }
}

/// Room left between retiring a connection and the peer's timer: a quarter of it, at least
/// 100 ms (clocks, scheduling, the request's way to the peer).
fn margin(timer: Duration) -> Duration {
    (timer / 4).max(Duration::from_millis(100))
}

/// The idle timeout a `Keep-Alive: timeout=N` field's value announces.
pub fn announced(keep_alive: &[u8]) -> Option<Duration> {
    crate::forward::list_items(keep_alive).find_map(|param| {
        let eq = param.iter().position(|&b| b == b'=')?;
        if !param[..eq].trim_ascii().eq_ignore_ascii_case(b"timeout") {
            return None;
        }
        let secs = std::str::from_utf8(param[eq + 1..].trim_ascii()).ok()?;
        secs.parse::<u64>().ok().map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn connections_retire_before_the_shortest_timer_seen() {
        let t = IdleTimer::default();
        assert_eq!(t.retire_after(), None, "nothing learned: nothing retired");
        t.observe(Duration::from_secs(5));
        assert_eq!(t.retire_after(), Some(Duration::from_millis(3750)));
        t.observe(Duration::from_secs(1));
        assert_eq!(t.retire_after(), Some(Duration::from_millis(750)));
        t.observe(Duration::from_secs(4));
        assert_eq!(
            t.retire_after(),
            Some(Duration::from_millis(750)),
            "a longer close does not raise it"
        );
        t.observe(Duration::from_millis(5));
        assert_eq!(
            t.retire_after(),
            Some(Duration::ZERO),
            "a timer shorter than the margin: idle connections are never reused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_was_learned_is_forgotten_unless_confirmed() {
        let t = IdleTimer::default();
        t.observe(Duration::from_secs(1));
        tokio::time::advance(FORGET_AFTER / 2).await;
        t.observe(Duration::from_millis(1100));
        tokio::time::advance(FORGET_AFTER / 2 + Duration::from_secs(1)).await;
        assert_eq!(
            t.retire_after(),
            Some(Duration::from_millis(750)),
            "confirmed half-way"
        );
        tokio::time::advance(FORGET_AFTER).await;
        assert_eq!(t.retire_after(), None);
        t.observe(Duration::from_secs(5));
        assert_eq!(t.retire_after(), Some(Duration::from_millis(3750)));
    }

    #[tokio::test(start_paused = true)]
    async fn only_idle_unannounced_closes_are_samples() {
        let c = IdleClock::new();
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(c.closed_while_idle(), Some(Duration::from_millis(300)));
        c.set_busy();
        assert_eq!(c.closed_while_idle(), None, "closed mid-exchange");
        c.went_idle(true);
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(c.closed_while_idle(), Some(Duration::from_millis(20)));
        c.mark_closing();
        assert_eq!(c.closed_while_idle(), None, "the peer said it would close");
    }

    #[test]
    fn keep_alive_header_announces_the_timer() {
        let announces = |v: &'static str| announced(v.as_bytes());
        assert_eq!(
            announces("timeout=5, max=100"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            announces("max=100, Timeout = 2"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(announces("timeout=soon"), None);
        assert_eq!(announces("max=100"), None);
    }
}
