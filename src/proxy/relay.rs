//! The answer side of the journey: the upstream's response head rewritten for the caller, and its
//! body either read whole first (small, known length) or streamed. Either way the body is then
//! relayed inside the request's context ([`super::context::RequestContext::respond`]).

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::context::RequestContext;
use crate::body::{full, ResponseBody};
use crate::error::ProxyError;
use crate::forward;

/// Upstream answers of known length up to this size are read whole before the answer starts.
const BUFFER_LIMIT: u64 = 64 * 1024;

#[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
pub fn prepare(
    ctx: &mut RequestContext,
    resp: Response<Incoming>,
) -> impl std::future::Future<Output = Result<Response<ResponseBody>, ProxyError>> + '_ {
    async move {
        let (mut parts, body) = resp.into_parts();
        forward::response_headers(&mut parts.headers, ctx.request_id());
        // hyper answers each client in the client's own version.
        parts.version = http::Version::default();
        if body.size_hint().exact().is_none_or(|n| n > BUFFER_LIMIT) {
            // Streamed: the connection and the slot stay with the context until the last byte.
            return Ok(Response::from_parts(
                parts,
                body.map_err(Into::into).boxed_unsync(),
            ));
        }
        // A small answer of known length is read whole first: the client then gets it in one write,
        // and the upstream connection and slot are free before the client has read it. It has
        // usually arrived with its head, so it is first taken as far as it is there, without a
        // timer; only the rest of one still on its way is read under the deadline.
        let mut body = body;
        let mut read = Whole::default();
        let done = match read.more(&mut body).now_or_never() {
            Some(done) => Ok(done),
            None => tokio::time::timeout_at(ctx.deadline(), read.more(&mut body)).await,
        };
        match done {
            Ok(Ok(())) => {
                ctx.upstream_read(true);
                Ok(Response::from_parts(parts, full(read.into_bytes())))
            }
            Ok(Err(e)) => {
                ctx.upstream_read(false);
                Err(ProxyError::Upstream(e.to_string()))
            }
            Err(_elapsed) => {
                ctx.upstream_read(false);
                Err(ProxyError::BudgetExhausted)
            }
        }
    }
}

/// A body read whole: its first chunk as it came (most small answers are one), later ones
/// appended to a copy. Trailers are dropped, as the answer has none.
#[derive(Default)]
struct Whole {
    first: Bytes,
    rest: Option<BytesMut>,
}

impl Whole {
    /// Reads on to the body's end. Cancel-safe: what was read stays here.
    async fn more<B>(&mut self, body: &mut B) -> Result<(), B::Error>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            match &mut self.rest {
                _ if self.first.is_empty() => self.first = data,
                Some(rest) => rest.extend_from_slice(&data),
                None => {
                    let mut rest = BytesMut::with_capacity(self.first.len() + data.len());
                    rest.extend_from_slice(&self.first);
                    rest.extend_from_slice(&data);
                    self.rest = Some(rest);
                }
            }
        }
        Ok(())
    }

    fn into_bytes(self) -> Bytes {
        self.rest.map_or(self.first, BytesMut::freeze)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body::Frame;

    use super::*;

    /// A body that gives its chunks in order, and is not ready once where the script says `None`.
    struct Script(VecDeque<Option<&'static str>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.pop_front() {
                Some(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk))))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn script(steps: &[Option<&'static str>]) -> Script {
        Script(steps.iter().copied().collect())
    }

    #[test]
    fn one_chunk_is_kept_as_it_came() {
        let chunk = Bytes::from_static(b"{\"ok\":true}");
        let mut body = http_body_util::Full::new(chunk.clone());
        let mut whole = Whole::default();
        assert!(matches!(whole.more(&mut body).now_or_never(), Some(Ok(()))));
        let bytes = whole.into_bytes();
        assert_eq!(bytes, chunk);
        assert_eq!(bytes.as_ptr(), chunk.as_ptr(), "not copied");
    }

    #[test]
    fn chunks_are_joined_in_order() {
        let mut body = script(&[Some("ab"), Some(""), Some("cd"), Some("e")]);
        let mut whole = Whole::default();
        assert!(matches!(whole.more(&mut body).now_or_never(), Some(Ok(()))));
        assert_eq!(whole.into_bytes(), "abcde");
    }

    #[test]
    fn what_was_read_before_the_body_stalled_is_kept() {
        let mut body = script(&[Some("ab"), None, Some("cd"), None, Some("e")]);
        let mut whole = Whole::default();
        assert!(whole.more(&mut body).now_or_never().is_none());
        assert!(whole.more(&mut body).now_or_never().is_none());
        assert!(matches!(whole.more(&mut body).now_or_never(), Some(Ok(()))));
        assert_eq!(whole.into_bytes(), "abcde");
    }

    #[test]
    fn an_empty_body_reads_as_empty() {
        let mut body = script(&[]);
        let mut whole = Whole::default();
        assert!(matches!(whole.more(&mut body).now_or_never(), Some(Ok(()))));
        assert!(whole.into_bytes().is_empty());
    }
}
