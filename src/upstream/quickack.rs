//! Acknowledging an upstream's answer at once, so a backend that writes an answer in pieces with
//! Nagle's algorithm on is not held up by our delayed ACK.
//!
//! Measured against `uvicorn --workers 4` (docs/benchmarks.md §8): its worker processes serve
//! connections accepted on a socket inherited from the parent, and asyncio does not set
//! `TCP_NODELAY` on those, so the answer's head and body go out as two writes and the body waits
//! for the ACK of the head. On a reused connection Linux has put our side in its interactive
//! ("pingpong") mode by then and delays that ACK by up to 40 ms: every answer after the first on
//! a connection took 240 ms instead of 200 (curl shows the same), a fifth of the backend's
//! capacity. A single-worker uvicorn sets `TCP_NODELAY` and never showed it.
//!
//! Setting `TCP_QUICKACK` after a read sends an ACK that is due at once and leaves the
//! interactive mode, so the rest of the answer follows within a round trip. It costs a
//! `setsockopt` per read and an ACK packet the next request would otherwise have carried:
//! 2.5–4 µs of CPU per request against a fast backend (benchmarks §11), a tenth of the gateway's
//! cost. So it is learned per endpoint: it is switched on once answers on reused connections
//! are seen ending a delayed ACK's time (30–250 ms) after their head, in at least 4 answers and
//! half of those on reused connections so far, and it stays on. A backend that never splits its
//! answers never pays for it.

use std::io;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long after its head an answer's end arrives when it waited for a delayed ACK: Linux
/// delays an ACK by 40 ms at least and 200 ms at most.
const DELAYED_ACK: RangeInclusive<Duration> =
    Duration::from_millis(30)..=Duration::from_millis(250);

/// Late answer ends seen before quick ACKs are switched on.
const LATE_TO_SWITCH: u64 = 4;

/// Whether an endpoint's answers wait for our ACKs, learned from how they end.
#[derive(Debug, Default)]
pub struct AckPolicy {
    on: AtomicBool,
    /// Answers on reused connections.
    reused: AtomicU64,
    /// Those whose end came a delayed ACK's time after their head.
    late: AtomicU64,
}

impl AckPolicy {
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Acknowledges at once from now on, without waiting to learn it.
    pub fn switch_on(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    /// An answer on a reused connection ended `after` its head arrived. Returns true when this
    /// switches quick ACKs on.
    pub fn answer_ended(&self, after: Duration) -> bool {
        let reused = self.reused.fetch_add(1, Ordering::Relaxed) + 1;
        if !DELAYED_ACK.contains(&after) {
            return false;
        }
        let late = self.late.fetch_add(1, Ordering::Relaxed) + 1;
        late >= LATE_TO_SWITCH && late * 2 >= reused && !self.on.swap(true, Ordering::Relaxed)
    }
}

/// An upstream TCP connection that acknowledges what it reads at once once its endpoint's
/// answers have shown they wait for it.
pub struct QuickAck {
    stream: TcpStream,
    policy: Arc<AckPolicy>,
}

impl QuickAck {
    pub fn new(stream: TcpStream, policy: Arc<AckPolicy>) -> Self {
        QuickAck { stream, policy }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.policy.is_on()
        {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            // Best effort: a socket that refuses the option still works, only slower.
            let _ = self.stream.set_quickack(true);
        }
        polled
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn quick_acks_switch_on_when_answers_keep_ending_a_delayed_ack_after_their_head() {
        let p = AckPolicy::default();
        for _ in 0..3 {
            assert!(!p.answer_ended(ms(41)));
        }
        assert!(!p.is_on(), "three late ends are not enough");
        assert!(p.answer_ended(ms(44)), "the fourth switches it on");
        assert!(p.is_on());
        assert!(!p.answer_ended(ms(40)), "switched on once");
    }

    #[test]
    fn answers_that_end_at_once_or_stream_for_long_never_switch_them_on() {
        let p = AckPolicy::default();
        for _ in 0..100 {
            p.answer_ended(Duration::from_micros(80));
            p.answer_ended(ms(900));
        }
        // A few late ends among many prompt ones: a slow client now and then, not the peer.
        for _ in 0..10 {
            p.answer_ended(ms(45));
        }
        assert!(!p.is_on());
    }
}
