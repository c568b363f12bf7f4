//! One HTTP/1.1 connection to an upstream, driven in the task of the request that holds it.
//!
//! hyper's client runs each connection in a task of its own and hands it every request over a
//! channel, and every answer back over another: three task wake-ups and two channels per
//! exchange, and a task per idle pooled connection (docs/benchmarks.md §12–§16). Here the request's
//! own task writes the request and reads the answer (as Pingora's client does), with the codec in
//! [`codec`]. An idle connection in the pool is watched without a task: its socket's read
//! readiness wakes an [`IdleWatch`], which notes that the peer closed it (and for the idle timer
//! learning, when).
//!
//! What an attempt's failure says for resending it is exact here: a request is handed back
//! unwritten only when not one byte of it reached the socket.

pub mod codec;
mod stream;

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pub use codec::{Added, ConnectionSaid, Decoder, Framing, Malformed};
pub use stream::Stream;

use crate::body::{BoxError, RequestBody};
use codec::{RequestFraming, Step};

/// Room made in the read buffer before each read, at first.
const READ_SPARE: usize = 8 * 1024;
/// The most room made: a large body streamed is read in pieces growing to this, as hyper's
/// adaptive reads do, so it costs few reads, and the caller's writes see large pieces.
const READ_SPARE_MAX: usize = 256 * 1024;
/// A request body up to this size is written in the same write as its head.
const INLINE_BODY: usize = 16 * 1024;

/// Why an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed before any answer")]
    Closed,
    #[error("invalid answer: {0}")]
    Malformed(#[from] Malformed),
    #[error("request body: {0}")]
    RequestBody(BoxError),
    #[error("request body does not match its Content-Length")]
    RequestLength,
}

impl ExchangeError {
    /// The connection was closed or reset. On an exchange nothing was answered on, that is the
    /// keep-alive race on a reused connection, or an upstream that died on the request.
    pub fn closed_before_answer(&self) -> bool {
        match self {
            ExchangeError::Closed => true,
            ExchangeError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// A failed [`Http1::send`].
pub enum SendError {
    /// Not a byte of the request reached the connection: here it is, whole.
    NotWritten {
        error: ExchangeError,
        /// Boxed: only a failure carries it.
        request: Box<Request<RequestBody>>,
    },
    /// The request (or part of it) went out, or its body failed or did not match its length
    /// before it could: either way, it is not handed back.
    Written {
        error: ExchangeError,
        /// Not a byte of an answer came back.
        unanswered: bool,
    },
}

/// Wakes when an idle connection's socket becomes readable: the peer closed it, reset it, or
/// sent what nobody asked for. Either way it must not carry another request.
pub struct IdleWatch {
    fired: AtomicBool,
    on_close: Box<dyn Fn() + Send + Sync>,
}

impl IdleWatch {
    /// `on_close` runs (from the I/O driver) when the peer is first seen ending the connection
    /// while it is watched.
    pub fn new(on_close: impl Fn() + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(IdleWatch {
            fired: AtomicBool::new(false),
            on_close: Box::new(on_close),
        })
    }
}

impl Wake for IdleWatch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.fired.swap(true, Ordering::AcqRel) {
            (self.on_close)();
        }
    }
}

pub struct Http1 {
    io: Stream,
    read: BytesMut,
    write: Vec<u8>,
    /// Nothing more may go on this connection: the answer said so, its framing leaves the
    /// connection's state unknown, or it failed.
    spent: bool,
    /// Room to make before the next read: doubled each time a read fills it.
    spare: usize,
    /// What the last answer's head said about the connection.
    said: ConnectionSaid,
    watch: Arc<IdleWatch>,
    watch_waker: Waker,
}

impl Http1 {
    pub fn new(io: Stream, watch: Arc<IdleWatch>) -> Self {
        Http1 {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            spent: false,
            spare: READ_SPARE,
            said: ConnectionSaid::default(),
            watch_waker: Waker::from(watch.clone()),
            watch,
        }
    }

    /// Whether the exchange that just ended left the connection fit for another: nothing
    /// spent it, and nothing was sent after the answer.
    pub fn reusable(&self) -> bool {
        !self.spent && self.read.is_empty()
    }

    pub fn is_spent(&self) -> bool {
        self.spent
    }

    /// What the last answer's head said about the connection (the head's map no longer holds
    /// `Connection` or `Keep-Alive`).
    pub fn said(&self) -> ConnectionSaid {
        self.said
    }

    /// Sends `req`, with the fields the gateway sets (`added`), and reads the answer's head; its body is read with [`Http1::take_whole`],
    /// [`Http1::read_whole`] or [`Http1::poll_body`], per the [`Framing`] in its place.
    pub async fn send(
        &mut self,
        req: Request<RequestBody>,
        added: &Added<'_>,
    ) -> Result<Response<Framing>, SendError> {
        let (parts, mut body) = req.into_parts();
        let len = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.write.clear();
        let framing = codec::encode_head(
            &parts.method,
            target,
            &parts.headers,
            added,
            len,
            &mut self.write,
        );
        // A body whose every byte is already here (a data action's JSON, read whole by the
        // proxy) goes out with the head; one still arriving is streamed after it.
        let (mut whole, mut prefix) = (None, Bytes::new());
        if let RequestFraming::Length(n) = framing {
            match take_ready(&mut body) {
                Ready::Whole(b) if b.len() as u64 == n => whole = Some(b),
                Ready::Whole(_) => return Err(self.failed(ExchangeError::RequestLength, true)),
                Ready::Partial(b) => prefix = b,
                Ready::Failed(e) => return Err(self.failed(ExchangeError::RequestBody(e), true)),
            }
        }
        let streaming = framing != RequestFraming::Empty && whole.is_none();
        let big = match &whole {
            Some(b) if b.len() <= INLINE_BODY => {
                self.write.extend_from_slice(b);
                None
            }
            other => other.clone(),
        };
        let method = parts.method.clone();
        if let Err((n, error)) = write_all(&mut self.io, &self.write).await {
            if n == 0 && prefix.is_empty() {
                self.spent = true;
                let body = whole.map_or(body, crate::body::full);
                return Err(SendError::NotWritten {
                    error: error.into(),
                    request: Box::new(Request::from_parts(parts, body)),
                });
            }
            return Err(self.failed(error.into(), true));
        }
        if let Some(b) = big {
            if let Err((_, error)) = write_all(&mut self.io, &b).await {
                return Err(self.failed(error.into(), true));
            }
        }
        let mut seen = false;
        let head = if streaming {
            let mut out = BodyOut::new(body, framing, prefix);
            poll_fn(|cx| {
                if !out.done {
                    match out.poll_send(&mut self.io, cx) {
                        Poll::Ready(Ok(())) => out.done = true,
                        Poll::Ready(Err(e @ ExchangeError::Io(_))) => {
                            // The upstream may have answered and closed without reading the
                            // rest: its answer is still read.
                            tracing::debug!(error = %e, "request body cut short upstream");
                            out.done = true;
                            self.spent = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
                let head = ready!(self.poll_head(&method, &mut seen, cx));
                if !out.sent_all {
                    // Answered before the whole request went out: the rest is not sent, so
                    // the connection is out of step.
                    self.spent = true;
                }
                Poll::Ready(head)
            })
            .await
        } else {
            match self.io.flush().await {
                Ok(()) => poll_fn(|cx| self.poll_head(&method, &mut seen, cx)).await,
                Err(e) => Err(e.into()),
            }
        };
        head.map_err(|error| self.failed(error, !seen))
    }

    /// The exchange failed after the request (some of it, or nothing of it but its body)
    /// was taken: the connection goes with it.
    fn failed(&mut self, error: ExchangeError, unanswered: bool) -> SendError {
        self.spent = true;
        SendError::Written { error, unanswered }
    }

    /// Reads until the answer's head has arrived; `seen`: some byte of an answer has.
    fn poll_head(
        &mut self,
        method: &Method,
        seen: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<Framing>, ExchangeError>> {
        loop {
            if !self.read.is_empty() {
                *seen = true;
                if let Some(head) = codec::parse_head(&mut self.read, method)? {
                    if !head.reusable || head.said.closes {
                        self.spent = true;
                    }
                    self.said = head.said;
                    let (parts, ()) = head.response.into_parts();
                    return Poll::Ready(Ok(Response::from_parts(parts, head.framing)));
                }
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(if *seen {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed inside the answer's head",
                    )
                    .into()
                } else {
                    ExchangeError::Closed
                }));
            }
        }
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < self.spare / 4 {
            self.read.reserve(self.spare);
        }
        let room = self.read.capacity() - self.read.len();
        let read = self.io.read_buf(&mut self.read);
        tokio::pin!(read);
        let n = ready!(read.poll(cx))?;
        if n == room && self.spare < READ_SPARE_MAX {
            self.spare *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// The body of `len` bytes, when all of it is already buffered.
    pub fn take_whole(&mut self, len: usize) -> Option<Bytes> {
        if self.read.len() < len {
            return None;
        }
        // Copied out, so the buffer stays this connection's alone and is reused.
        let body = Bytes::copy_from_slice(&self.read[..len]);
        self.read.advance(len);
        Some(body)
    }

    /// Reads the body of `len` bytes whole.
    pub async fn read_whole(&mut self, len: usize) -> Result<Bytes, ExchangeError> {
        loop {
            if let Some(body) = self.take_whole(len) {
                return Ok(body);
            }
            if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                self.spent = true;
                return Err(Malformed::Truncated((len - self.read.len()) as u64).into());
            }
        }
    }

    /// The next piece of a body read with `decoder`; `None` at its end.
    pub fn poll_body(
        &mut self,
        decoder: &mut Decoder,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, ExchangeError>>> {
        loop {
            match decoder.step(&mut self.read) {
                Ok(Step::Data(n)) => return Poll::Ready(Some(Ok(self.read.split_to(n).freeze()))),
                Ok(Step::Done) => return Poll::Ready(None),
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    self.spent = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    // Close-delimited or cut short: the connection is over either way.
                    self.spent = true;
                    return Poll::Ready(decoder.at_eof().err().map(|e| Err(e.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    self.spent = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    /// Reads a whole body of `framing`, up to `limit` bytes.
    pub async fn collect(
        &mut self,
        framing: Framing,
        limit: usize,
    ) -> Result<Bytes, ExchangeError> {
        let mut decoder = Decoder::new(framing);
        let mut out = BytesMut::new();
        while let Some(piece) = poll_fn(|cx| self.poll_body(&mut decoder, cx)).await {
            out.extend_from_slice(&piece?);
            if out.len() > limit {
                self.spent = true;
                return Err(io::Error::other(format!("answer body over {limit} bytes")).into());
            }
        }
        Ok(out.freeze())
    }

    /// The connection goes back to the pool idle: from now on its watch wakes if the peer ends
    /// it. False when it already has (or sent something unasked).
    pub fn watch_idle(&mut self) -> bool {
        if self.spent || !self.read.is_empty() {
            self.spent = true;
            return false;
        }
        if self.spare > READ_SPARE {
            // A large body grew the buffer: an idle connection keeps no more than a small one.
            self.spare = READ_SPARE;
            if self.read.is_empty() {
                self.read = BytesMut::new();
            }
        }
        self.watch.fired.store(false, Ordering::Release);
        self.poll_idle()
    }

    /// Whether an idle connection is still open. Costs nothing unless its watch woke, and then
    /// one read.
    pub fn still_open(&mut self) -> bool {
        if self.spent {
            return false;
        }
        if !self.watch.fired.swap(false, Ordering::AcqRel) {
            return true;
        }
        self.poll_idle()
    }

    /// Polls the idle socket for reading with the watch as its waker, which registers the watch
    /// (a read it does not get to is a wake for nothing, and registers it again).
    fn poll_idle(&mut self) -> bool {
        let mut cx = Context::from_waker(&self.watch_waker);
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        match Pin::new(&mut self.io).poll_read(&mut cx, &mut buf) {
            Poll::Pending => true,
            Poll::Ready(_) => {
                self.spent = true;
                false
            }
        }
    }
}

/// What of a request body could be had without waiting.
enum Ready {
    /// All of it.
    Whole(Bytes),
    /// The start of it; the rest is still to come.
    Partial(Bytes),
    Failed(BoxError),
}

/// Takes what of `body` is already here: for a body read whole by the proxy, all of it.
fn take_ready(body: &mut RequestBody) -> Ready {
    let mut cx = Context::from_waker(Waker::noop());
    let mut taken = crate::body::Whole::default();
    loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    taken.push(data);
                }
            }
            Poll::Ready(Some(Err(e))) => return Ready::Failed(e),
            Poll::Ready(None) => return Ready::Whole(taken.into_bytes()),
            Poll::Pending => return Ready::Partial(taken.into_bytes()),
        }
    }
}

/// Writes all of `buf`; on failure, how much had gone out.
async fn write_all(io: &mut Stream, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match io.write(&buf[done..]).await {
            Ok(0) => return Err((done, io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// A request body streamed after its head, framed as the head said.
struct BodyOut {
    body: RequestBody,
    framing: RequestFraming,
    /// Bytes of body data sent so far.
    sent: u64,
    /// Framed bytes waiting to be written, and how far they have been.
    pending: Vec<u8>,
    at: usize,
    /// The body has ended and every byte is written.
    sent_all: bool,
    /// Nothing more will be written (all of it, or the upstream stopped reading).
    done: bool,
    /// The body has ended: what is pending is the last of it.
    ended: bool,
}

impl BodyOut {
    /// `prefix`: the start of the body, already taken from it.
    fn new(body: RequestBody, framing: RequestFraming, prefix: Bytes) -> Self {
        BodyOut {
            body,
            framing,
            sent: prefix.len() as u64,
            pending: prefix.to_vec(),
            at: 0,
            sent_all: false,
            done: false,
            ended: false,
        }
    }

    fn poll_send(
        &mut self,
        io: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            while self.at < self.pending.len() {
                match ready!(Pin::new(&mut *io).poll_write(cx, &self.pending[self.at..])) {
                    Ok(0) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()))
                    }
                    Ok(n) => self.at += n,
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            self.pending.clear();
            self.at = 0;
            if self.ended {
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                self.sent_all = true;
                return Poll::Ready(Ok(()));
            }
            // Written out before waiting on the caller for more.
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers are not forwarded.
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.sent += data.len() as u64;
                    match self.framing {
                        RequestFraming::Length(n) if self.sent > n => {
                            return Poll::Ready(Err(ExchangeError::RequestLength))
                        }
                        RequestFraming::Chunked => {
                            crate::http1::chunk_line(data.len(), &mut self.pending);
                            self.pending.extend_from_slice(&data);
                            self.pending.extend_from_slice(b"\r\n");
                        }
                        _ => self.pending.extend_from_slice(&data),
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(ExchangeError::RequestBody(e))),
                None => {
                    self.ended = true;
                    match self.framing {
                        RequestFraming::Length(n) if self.sent != n => {
                            return Poll::Ready(Err(ExchangeError::RequestLength))
                        }
                        RequestFraming::Chunked => {
                            self.pending.extend_from_slice(crate::http1::LAST_CHUNK)
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
