//! A test's scripted end of a byte stream (the upstream a client test talks to, the caller a
//! server test answers): what it has read and not yet taken, taken a piece at a time.

use tokio::io::{AsyncRead, AsyncReadExt};

pub(crate) struct Reader<S> {
    pub io: S,
    /// Read from `io` but not yet taken.
    pub buf: Vec<u8>,
    /// Who is at the other end, for the panics when it ends too soon.
    other: &'static str,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    pub fn new(io: S, other: &'static str) -> Self {
        Reader {
            io,
            buf: Vec::new(),
            other,
        }
    }

    /// Reads once more; how much came (0: the other end closed).
    pub async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.io.read(&mut chunk).await.expect("scripted read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Everything up to and including the first `end`.
    pub async fn through(&mut self, end: &[u8]) -> Vec<u8> {
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                return self.buf.drain(..at + end.len()).collect();
            }
            if self.fill().await == 0 {
                panic!(
                    "the {} closed before {:?}; it sent {:?}",
                    self.other,
                    String::from_utf8_lossy(end),
                    String::from_utf8_lossy(&self.buf)
                );
            }
        }
    }

    /// The next `n` bytes.
    pub async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!(
                    "the {} closed {} bytes short",
                    self.other,
                    n - self.buf.len()
                );
            }
        }
        self.buf.drain(..n).collect()
    }
}
