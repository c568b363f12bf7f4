//! A request body that was not all there with its head: the server reads it from the connection
//! while the handler reads it from here, a piece at a time. Both run in the connection's task,
//! so the one piece held between them is the whole buffer, and the caller's bytes are read only
//! as fast as the handler takes them.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::body::BoxError;

/// The handler's end.
#[derive(Debug)]
pub struct BodyReader {
    shared: Arc<Mutex<Shared>>,
}

/// The server's end.
#[derive(Debug)]
pub struct BodyWriter {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    /// Read from the connection, not yet taken by the handler.
    piece: Bytes,
    /// Bytes of the body still on the wire.
    unread: u64,
    /// The handler asked for more and found none (what `Expect: 100-continue` waits for).
    wanted: bool,
    /// The handler dropped its end.
    dropped: bool,
    waker: Option<Waker>,
}

/// A body of `len` bytes whose first `first` arrived with the head.
pub fn channel(first: Bytes, len: u64) -> (BodyWriter, BodyReader) {
    let unread = len - first.len() as u64;
    let shared = Arc::new(Mutex::new(Shared {
        piece: first,
        unread,
        ..Shared::default()
    }));
    (
        BodyWriter {
            shared: shared.clone(),
        },
        BodyReader { shared },
    )
}

impl Shared {
    /// Every byte read from the connection and taken by the handler.
    fn is_done(&self) -> bool {
        self.unread == 0 && self.piece.is_empty()
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl BodyWriter {
    /// How many more bytes to read from the connection for the handler now: none while it has
    /// not taken the last piece, or once it has dropped the body.
    pub fn room(&self) -> usize {
        let s = lock(&self.shared);
        if s.dropped || !s.piece.is_empty() {
            return 0;
        }
        usize::try_from(s.unread).unwrap_or(usize::MAX)
    }

    /// Hands the handler the next piece (at most [`room`](Self::room) bytes).
    pub fn put(&self, piece: Bytes) {
        let mut s = lock(&self.shared);
        debug_assert!(s.piece.is_empty() && piece.len() as u64 <= s.unread);
        s.unread -= piece.len() as u64;
        s.piece = piece;
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    /// Every byte has been read from the connection.
    pub fn is_read(&self) -> bool {
        lock(&self.shared).unread == 0
    }

    /// Every byte has been read from the connection and taken by the handler.
    pub fn is_done(&self) -> bool {
        lock(&self.shared).is_done()
    }

    /// The handler asked for bytes that have not come yet (and the flag is cleared).
    pub fn take_wanted(&self) -> bool {
        std::mem::take(&mut lock(&self.shared).wanted)
    }
}

impl BodyReader {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = lock(&self.shared);
        if !s.piece.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut s.piece)))));
        }
        if s.unread == 0 {
            return Poll::Ready(None);
        }
        s.wanted = true;
        match &mut s.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub fn is_end_stream(&self) -> bool {
        lock(&self.shared).is_done()
    }

    pub fn size_hint(&self) -> SizeHint {
        let s = lock(&self.shared);
        SizeHint::with_exact(s.unread + s.piece.len() as u64)
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        lock(&self.shared).dropped = true;
    }
}
