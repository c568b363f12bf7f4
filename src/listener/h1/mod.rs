//! The listener's own HTTP/1.1 server: requests read, handed to the handler and answered in the
//! connection's own task, with one read buffer reused from request to request.
//!
//! It carries the requests that make up nearly all of a gateway's traffic: HTTP/1.1, with no
//! body or a body of known length. A body that came with its head is handed over whole; one
//! that did not is read from the connection as the handler takes it (`body`), after a
//! `100 Continue` when the caller asked for one. Any other request (HTTP/1.0, a chunked body,
//! `Upgrade`, a head it cannot parse) is handed to hyper's server with the connection, bytes and
//! all, and hyper serves that connection as it served every connection before, until the
//! connection is parked or closed (`codec`).
//!
//! Like hyper's server it answers requests in order, one at a time; reads the next request only
//! after the answer is written; closes the connection after an answer given before the request's
//! body was all read; and, while a request is being handled or answered, watches the stream for
//! its end: a caller that goes away drops its request (and so its context, which accounts for
//! it) at once, not when the answer is ready. Timers, parking and the framing guard are the
//! connection's, as for hyper (`listener`).

mod body;
mod codec;
#[cfg(test)]
mod tests;

pub use body::BodyReader;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::{ConnInfo, Handler, TrackedIo};
use crate::body::{BoxError, ClientBody, ResponseBody};
use body::BodyWriter;
use codec::{Framing, Parsed};

/// What the read buffer starts with, and takes again when it runs low.
const READ_CHUNK: usize = 8 * 1024;
/// Answer bytes held before they are written out rather than more of the body polled.
const WRITE_HIGH: usize = 64 * 1024;
/// A write buffer grown past this by a large answer is given back after it.
const WRITE_KEEP: usize = 16 * 1024;

/// Why a connection ended in error (the caller just loses the connection; logged at debug).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the answer's body failed: {0}")]
    Body(BoxError),
    #[error("the answer's body was not the length its head gave")]
    Length,
}

/// How the server left the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done with it: the caller closed it, or it is to be closed (after `Connection: close`, or
    /// when it was asked to finish).
    Done,
    /// A request hyper's server is to take, with the stream from [`Server::hand_off`].
    HandOff,
}

/// One HTTP/1.1 connection.
pub struct Server<S, H: Handler> {
    wire: Wire<S>,
    handler: H,
    info: ConnInfo,
    state: State<H::Future>,
    /// Asked to finish: no request after the one in hand.
    closing: bool,
    max_head: usize,
    max_headers: usize,
}

enum State<F> {
    /// Waiting for a request head.
    Reading,
    /// The handler has the request.
    Calling {
        answer: F,
        method: Method,
        close: bool,
        /// A body still being read from the connection for the handler.
        body: Option<BodyWriter>,
        /// The caller waits for `100 Continue` before it sends the body.
        expect_continue: bool,
    },
    /// The answer's head is written (to `write`); its body is being.
    Writing {
        body: ResponseBody,
        framing: Framing,
        /// Of a `Framing::Length` body, the bytes still to come.
        left: u64,
        close: bool,
    },
    /// The answer is complete in `write`: out with it, then the next request or the end.
    Finishing { close: bool },
}

impl<S, H> Server<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    pub fn new(
        io: TrackedIo<S>,
        handler: H,
        info: ConnInfo,
        max_head: usize,
        max_headers: usize,
    ) -> Self {
        Server {
            wire: Wire {
                io,
                read: BytesMut::new(),
                write: Vec::new(),
                written: 0,
            },
            handler,
            info,
            state: State::Reading,
            closing: false,
            max_head,
            max_headers,
        }
    }

    /// No request in hand and no byte of the next one read: the connection can be parked.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Reading) && self.wire.read.is_empty()
    }

    /// Finish after the request in hand (with `Connection: close` on its answer, when its head
    /// is not written yet), or at once when there is none.
    pub fn finish(&mut self) {
        self.closing = true;
    }

    /// The stream, with what was read of it and not used put back in front: to park or close
    /// it.
    pub fn into_io(self) -> TrackedIo<S> {
        let mut io = self.wire.io;
        io.unread(&self.wire.read);
        io
    }

    /// The stream for hyper after [`Outcome::HandOff`]: what was read of it and not used (which
    /// starts at a request head) goes through the framing guard, and so does the rest.
    pub fn hand_off(self) -> TrackedIo<S> {
        let mut io = self.wire.io;
        io.guard_again(&self.wire.read);
        io
    }

    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outcome, ConnError>> {
        loop {
            match &mut self.state {
                State::Reading => {
                    // Empty lines before a request line are allowed (RFC 9112 §2.2): some
                    // callers end a body with one. Gone, they leave an idle connection idle.
                    skip_empty_lines(&mut self.wire.read);
                    if !self.wire.read.is_empty() {
                        match codec::parse_request(&self.wire.read, self.max_headers) {
                            Parsed::Request {
                                request,
                                head_len,
                                body_len,
                                close,
                                expect_continue,
                            } if head_len <= self.max_head => {
                                self.wire.read.advance(head_len);
                                self.wire.io.guard.skip_request();
                                // What came of the body, copied out so the buffer stays this
                                // connection's alone.
                                let here = body_len.min(self.wire.read.len());
                                let (body, writer) = if body_len == 0 {
                                    (ClientBody::Whole(None), None)
                                } else {
                                    let first = Bytes::copy_from_slice(&self.wire.read[..here]);
                                    self.wire.read.advance(here);
                                    if here == body_len {
                                        (ClientBody::Whole(Some(first)), None)
                                    } else {
                                        let (writer, reader) =
                                            body::channel(first, body_len as u64);
                                        (ClientBody::Streamed(reader), Some(writer))
                                    }
                                };
                                let method = request.method().clone();
                                let request = request.map(|()| body);
                                let answer = tower::Service::call(
                                    &mut self.handler,
                                    (request, self.info.clone()),
                                );
                                self.state = State::Calling {
                                    answer,
                                    method,
                                    close,
                                    body: writer,
                                    expect_continue: expect_continue && here == 0,
                                };
                                continue;
                            }
                            Parsed::Partial if self.wire.read.len() < self.max_head => {
                                // Asked to finish: a head not all here is not waited for.
                                if self.closing {
                                    return Poll::Ready(Ok(Outcome::Done));
                                }
                                // Read behind the last request, it has its head timer from now.
                                self.info.activity.head_pending();
                            }
                            _ => return Poll::Ready(Ok(Outcome::HandOff)),
                        }
                    } else if self.closing {
                        return Poll::Ready(Ok(Outcome::Done));
                    }
                    match ready!(self.wire.poll_fill(cx)) {
                        Ok(0) if self.wire.read.is_empty() => {
                            return Poll::Ready(Ok(Outcome::Done))
                        }
                        // A head cut short: hyper reports it, as it did for every connection.
                        Ok(0) => return Poll::Ready(Ok(Outcome::HandOff)),
                        Ok(_) => {}
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                }
                State::Calling {
                    answer,
                    body,
                    expect_continue,
                    ..
                } => match Pin::new(answer).poll(cx) {
                    Poll::Ready(Ok(response)) => {
                        let State::Calling {
                            method,
                            close,
                            body,
                            ..
                        } = std::mem::replace(&mut self.state, State::Reading)
                        else {
                            unreachable!("matched above")
                        };
                        // Bytes of the body still on the wire would be read as the next head.
                        let unread = body.is_some_and(|b| !b.is_read());
                        self.start_answer(response, &method, close || unread);
                    }
                    Poll::Ready(Err(never)) => match never {},
                    Poll::Pending => {
                        let Some(writer) = body else {
                            return self.poll_caller_gone(cx);
                        };
                        if *expect_continue && writer.take_wanted() {
                            *expect_continue = false;
                            self.wire
                                .write
                                .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        if self.wire.written < self.wire.write.len() {
                            ready!(self.wire.poll_write_out(cx))?;
                            ready!(Pin::new(&mut self.wire.io).poll_flush(cx))?;
                        }
                        let room = writer.room();
                        if room > 0 {
                            if self.wire.read.is_empty() {
                                match ready!(self.wire.poll_fill(cx)) {
                                    // The caller left before its body was all sent.
                                    Ok(0) => return Poll::Ready(Ok(Outcome::Done)),
                                    Ok(_) => {}
                                    Err(e) => return Poll::Ready(Err(e.into())),
                                }
                            }
                            let n = room.min(self.wire.read.len());
                            writer.put(Bytes::copy_from_slice(&self.wire.read[..n]));
                            self.wire.read.advance(n);
                            // The handler takes the piece when polled again.
                            continue;
                        }
                        if writer.is_done() {
                            *body = None;
                        }
                        // A piece the handler has not taken yet, or a body it dropped unread,
                        // or all of it taken: the stream is watched for the caller leaving. What
                        // is read meanwhile stays in the buffer: the body's first, when it is not
                        // done (and then never a next request: an answer before the body was all
                        // read closes the connection).
                        return self.poll_caller_gone(cx);
                    }
                },
                State::Writing {
                    body,
                    framing,
                    left,
                    close,
                } => {
                    if self.wire.write.len() - self.wire.written >= WRITE_HIGH {
                        ready!(self.wire.poll_write_out(cx))?;
                        continue;
                    }
                    let ended = match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                put_data(&mut self.wire.write, *framing, left, &data)?;
                            }
                            // A body of known length is done at its last byte, as for hyper,
                            // whether or not it says so.
                            body.is_end_stream() || (*left == 0 && *framing != Framing::Chunked)
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(ConnError::Body(e))),
                        Poll::Ready(None) => true,
                        Poll::Pending => {
                            // What there is goes out while the body waits for more.
                            ready!(self.wire.poll_write_out(cx))?;
                            ready!(Pin::new(&mut self.wire.io).poll_flush(cx))?;
                            return self.poll_caller_gone(cx);
                        }
                    };
                    if ended {
                        match *framing {
                            Framing::Length(_) if *left > 0 => {
                                return Poll::Ready(Err(ConnError::Length))
                            }
                            Framing::Chunked => {
                                self.wire.write.extend_from_slice(crate::http1::LAST_CHUNK)
                            }
                            _ => {}
                        }
                        // The body is dropped here, at its end, as hyper drops it.
                        self.state = State::Finishing { close: *close };
                    }
                }
                State::Finishing { close } => {
                    let close = *close || self.closing;
                    ready!(self.wire.poll_write_out(cx))?;
                    ready!(Pin::new(&mut self.wire.io).poll_flush(cx))?;
                    if self.wire.write.capacity() > WRITE_KEEP {
                        self.wire.write = Vec::new();
                    }
                    if close {
                        return Poll::Ready(Ok(Outcome::Done));
                    }
                    self.state = State::Reading;
                }
            }
        }
    }

    /// Writes the answer's head, and readies its body.
    fn start_answer(&mut self, response: Response<ResponseBody>, method: &Method, close: bool) {
        let (head, body) = response.into_parts();
        let empty = body.is_end_stream();
        let length = if empty {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let (framing, close) = codec::encode_head(
            &head,
            length,
            method,
            close || self.closing,
            &mut self.wire.write,
        );
        self.state = match framing {
            // Not polled, as hyper does not poll a body it sends nothing of.
            Framing::Empty => State::Finishing { close },
            _ if empty => State::Finishing { close },
            Framing::Length(n) => State::Writing {
                body,
                framing,
                left: n,
                close,
            },
            Framing::Chunked => State::Writing {
                body,
                framing,
                left: 0,
                close,
            },
        };
    }

    /// While a request is handled or its answer waits for its body: the end of the stream
    /// means the caller has gone, and ends the connection (dropping the request). Bytes that
    /// arrive instead are the next request's; they are kept, and the stream is not read further
    /// until it is that request's turn.
    fn poll_caller_gone(&mut self, cx: &mut Context<'_>) -> Poll<Result<Outcome, ConnError>> {
        if !self.wire.read.is_empty() {
            return Poll::Pending;
        }
        match ready!(self.wire.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Ok(Outcome::Done)),
            Ok(_) => Poll::Pending,
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

/// The connection's stream and buffers: what the states borrow beside each other.
struct Wire<S> {
    io: TrackedIo<S>,
    read: BytesMut,
    write: Vec<u8>,
    /// Bytes at the front of `write` already written.
    written: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 8 {
            self.read.reserve(READ_CHUNK);
        }
        let read = self.io.read_buf(&mut self.read);
        tokio::pin!(read);
        read.poll(cx)
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.write.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.write.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

/// Removes empty lines (`\r\n`, or a bare `\n`) from the front of `read`.
fn skip_empty_lines(read: &mut BytesMut) {
    loop {
        if read.starts_with(b"\r\n") {
            read.advance(2);
        } else if read.starts_with(b"\n") {
            read.advance(1);
        } else {
            return;
        }
    }
}

/// Appends a piece of the answer's body as `framing` has it.
fn put_data(
    out: &mut Vec<u8>,
    framing: Framing,
    left: &mut u64,
    data: &[u8],
) -> Result<(), ConnError> {
    if data.is_empty() {
        return Ok(());
    }
    match framing {
        Framing::Length(_) => {
            *left = left
                .checked_sub(data.len() as u64)
                .ok_or(ConnError::Length)?;
            out.extend_from_slice(data);
        }
        Framing::Chunked => {
            crate::http1::chunk_line(data.len(), out);
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Empty => {}
    }
    Ok(())
}
