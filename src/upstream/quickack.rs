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
//! Setting `TCP_QUICKACK` after each read sends an ACK that is due at once and leaves the
//! interactive mode, so the rest of the answer follows within a round trip. It costs one
//! `setsockopt` per read on upstream connections, and nothing on other platforms.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// An upstream TCP connection that acknowledges what it reads at once.
pub struct QuickAck(pub TcpStream);

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            // Best effort: a socket that refuses the option still works, only slower.
            let _ = self.0.set_quickack(true);
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
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
