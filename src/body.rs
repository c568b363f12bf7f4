//! Bodies that stream through the gateway: the request body with its size limit enforced while it
//! streams, and the response body that carries the request's context (and with it the upstream
//! connection and the admission slot) until its last byte has been relayed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
pub type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// A request's body as the listener hands it over: streamed by hyper's server (h2, and the
/// HTTP/1 requests the listener hands it), or by the listener's own HTTP/1.1 server
/// (`listener::h1`): read whole with the head when it came with it, else read from the
/// connection as the handler takes it.
#[derive(Debug)]
pub enum ClientBody {
    Hyper(hyper::body::Incoming),
    /// `None`: no body, or what there was has been taken.
    Whole(Option<Bytes>),
    Streamed(crate::listener::BodyReader),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ClientBody::Streamed(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Whole(b) => b.is_none(),
            ClientBody::Streamed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ClientBody::Streamed(b) => b.size_hint(),
        }
    }
}

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("the client stopped sending its request body")]
pub struct BodyReadTimeout;

/// Why a request body stream was cut short by the gateway, if it was.
#[derive(Debug, Default)]
pub struct BodyCheck(AtomicU8);

const TOO_LARGE: u8 = 1;
const TIMED_OUT: u8 = 2;
const OUT_OF_BUDGET: u8 = 3;

#[derive(Debug, thiserror::Error)]
#[error("the route's budget ran out while the request body was read")]
pub struct BodyReadOutOfBudget;

impl BodyCheck {
    /// The answer owed to the caller when the body stream failed because of us.
    pub fn failure(&self, limit: u64, idle: Duration) -> Option<crate::error::ProxyError> {
        match self.0.load(Ordering::Acquire) {
            TOO_LARGE => Some(crate::error::ProxyError::BodyTooLarge { limit }),
            TIMED_OUT => Some(crate::error::ProxyError::BodyTimeout { after: idle }),
            OUT_OF_BUDGET => Some(crate::error::ProxyError::BudgetExhausted),
            _ => None,
        }
    }
}

pin_project! {
    /// Counts bytes as they stream and fails the stream the moment the limit is passed, so a
    /// large body is never buffered to be measured; and fails it when the client sends nothing
    /// for `idle`, so a trickling body cannot hold a slot; and, when given one, at the request's
    /// deadline, on the same timer (a body read whole before admission would otherwise need a
    /// second). `check` tells the proxy why the upstream call failed, so it can answer 413, 408
    /// or 503 instead of 502.
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        idle: Sleep,
        idle_for: Duration,
        deadline: Option<Instant>,
        seen: u64,
        limit: u64,
        check: Arc<BodyCheck>,
    }
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, limit: u64, idle_for: Duration) -> (Self, Arc<BodyCheck>) {
        Self::until(inner, limit, idle_for, None)
    }

    /// As `new`, and the stream also fails at `deadline` (when given).
    pub fn until(
        inner: B,
        limit: u64,
        idle_for: Duration,
        deadline: Option<Instant>,
    ) -> (Self, Arc<BodyCheck>) {
        let check = Arc::new(BodyCheck::default());
        (
            LimitedBody {
                inner,
                idle: tokio::time::sleep_until(wake_at(Instant::now(), idle_for, deadline)),
                idle_for,
                deadline,
                seen: 0,
                limit,
                check: check.clone(),
            },
            check,
        )
    }
}

/// The idle timer's next end, or the deadline when that comes first.
fn wake_at(now: Instant, idle_for: Duration, deadline: Option<Instant>) -> Instant {
    let idle = now + idle_for;
    deadline.map_or(idle, |d| d.min(idle))
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.poll_frame(cx);
        if polled.is_pending() {
            if this.idle.as_mut().poll(cx).is_ready() {
                if this.deadline.is_some_and(|d| Instant::now() >= d) {
                    this.check.0.store(OUT_OF_BUDGET, Ordering::Release);
                    return Poll::Ready(Some(Err(Box::new(BodyReadOutOfBudget))));
                }
                this.check.0.store(TIMED_OUT, Ordering::Release);
                return Poll::Ready(Some(Err(Box::new(BodyReadTimeout))));
            }
            return Poll::Pending;
        }
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        this.check.0.store(TOO_LARGE, Ordering::Release);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: *this.limit,
                        }))));
                    }
                }
                let next = wake_at(Instant::now(), *this.idle_for, *this.deadline);
                this.idle.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How the relay of a response body ended.
#[derive(Debug, Clone, Copy)]
pub struct BodyOutcome {
    /// The last byte was relayed (as opposed to an upstream error or the budget running out).
    pub complete: bool,
    pub bytes: u64,
    /// Why it was cut short, when it was: `upstream_error` or `budget_exhausted`.
    pub cut: Option<&'static str>,
}

/// Told how a relayed body ended: exactly one of the two calls, exactly once.
pub trait OnBodyEnd: Send {
    /// The body ended: its last byte was relayed, or it failed.
    fn body_ended(self: Box<Self>, outcome: BodyOutcome);
    /// The body was dropped before its end (the caller went away, or its connection was closed)
    /// after `bytes` were relayed.
    fn body_dropped(self: Box<Self>, bytes: u64);
}

#[derive(Debug, thiserror::Error)]
#[error("the route's budget ran out while relaying the response body")]
pub struct BodyBudgetExhausted;

pin_project! {
    /// Relays an upstream body under the route's deadline, and reports how it ended.
    pub struct RelayBody<B> {
        #[pin]
        inner: B,
        deadline: Pin<Box<Sleep>>,
        bytes: u64,
        on_end: Option<Box<dyn OnBodyEnd>>,
    }

    impl<B> PinnedDrop for RelayBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(on_end) = this.on_end.take() {
                on_end.body_dropped(*this.bytes);
            }
        }
    }
}

impl<B: Body> RelayBody<B> {
    pub fn new(inner: B, deadline: Instant, on_end: Box<dyn OnBodyEnd>) -> Self {
        let mut body = RelayBody {
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            bytes: 0,
            on_end: Some(on_end),
            inner,
        };
        // hyper never polls a body that says it is already finished (204, HEAD, empty).
        if body.inner.is_end_stream() {
            if let Some(on_end) = body.on_end.take() {
                on_end.body_ended(BodyOutcome {
                    complete: true,
                    bytes: 0,
                    cut: None,
                });
            }
        }
        body
    }
}

impl<B> Body for RelayBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let finish =
            |on_end: &mut Option<Box<dyn OnBodyEnd>>, cut: Option<&'static str>, bytes: u64| {
                if let Some(f) = on_end.take() {
                    f.body_ended(BodyOutcome {
                        complete: cut.is_none(),
                        bytes,
                        cut,
                    });
                }
            };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                }
                // With a known length hyper stops polling after the last byte, so the end is
                // seen here rather than as a final `None`.
                if this.inner.is_end_stream() {
                    finish(this.on_end, None, *this.bytes);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                finish(this.on_end, Some("upstream_error"), *this.bytes);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                finish(this.on_end, None, *this.bytes);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.on_end.is_some() && this.deadline.as_mut().poll(cx).is_ready() {
                    finish(this.on_end, Some("budget_exhausted"), *this.bytes);
                    return Poll::Ready(Some(Err(Box::new(BodyBudgetExhausted))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.on_end.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A small body read whole, a request's or an answer's: its first chunk as it came (most small
/// bodies are one), later ones appended to a copy. Trailers are dropped: neither the request
/// sent upstream nor the answer carries them.
#[derive(Default)]
pub struct Whole {
    first: Bytes,
    rest: Option<BytesMut>,
}

impl Whole {
    /// Reads on to the body's end. Cancel-safe: what was read stays here.
    pub async fn more<B>(&mut self, body: &mut B) -> Result<(), B::Error>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                self.push(data);
            }
        }
        Ok(())
    }

    /// Adds the body's next chunk.
    pub fn push(&mut self, data: Bytes) {
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

    pub fn into_bytes(self) -> Bytes {
        self.rest.map_or(self.first, BytesMut::freeze)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;

    use futures_util::FutureExt;

    use super::*;
    use std::sync::Mutex;

    struct Record(Arc<Mutex<Vec<BodyOutcome>>>);
    impl OnBodyEnd for Record {
        fn body_ended(self: Box<Self>, outcome: BodyOutcome) {
            self.0.lock().unwrap().push(outcome);
        }
        fn body_dropped(self: Box<Self>, _: u64) {
            panic!("dropped before its end");
        }
    }

    #[tokio::test]
    async fn limited_body_fails_once_the_limit_is_passed() {
        let idle = Duration::from_secs(5);
        let (body, check) = LimitedBody::new(Full::new(Bytes::from(vec![0u8; 100])), 99, idle);
        assert!(body.collect().await.is_err());
        assert!(matches!(
            check.failure(99, idle),
            Some(crate::error::ProxyError::BodyTooLarge { limit: 99 })
        ));
        let (body, check) = LimitedBody::new(Full::new(Bytes::from(vec![0u8; 100])), 100, idle);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 100);
        assert!(check.failure(100, idle).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out() {
        let idle = Duration::from_millis(200);
        let stalled = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let (body, check) = LimitedBody::new(stalled, 1 << 20, idle);
        assert!(body.collect().await.is_err());
        assert!(matches!(
            check.failure(1 << 20, idle),
            Some(crate::error::ProxyError::BodyTimeout { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_read_under_a_deadline_fails_at_whichever_comes_first() {
        let stalled = || {
            http_body_util::StreamBody::new(futures_util::stream::pending::<
                Result<Frame<Bytes>, std::convert::Infallible>,
            >())
        };
        // The budget ends first: out of budget, not an idle client.
        let idle = Duration::from_secs(10);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(300);
        let (body, check) = LimitedBody::until(stalled(), 1 << 20, idle, Some(deadline));
        assert!(body.collect().await.is_err());
        assert_eq!(Instant::now(), deadline);
        assert!(matches!(
            check.failure(1 << 20, idle),
            Some(crate::error::ProxyError::BudgetExhausted)
        ));
        // The idle timeout ends first: the client stalled.
        let idle = Duration::from_millis(200);
        let start = Instant::now();
        let (body, check) = LimitedBody::until(
            stalled(),
            1 << 20,
            idle,
            Some(start + Duration::from_secs(5)),
        );
        assert!(body.collect().await.is_err());
        assert_eq!(Instant::now(), start + idle);
        assert!(matches!(
            check.failure(1 << 20, idle),
            Some(crate::error::ProxyError::BodyTimeout { .. })
        ));
        // A body that arrives in time is read whole.
        let (body, check) = LimitedBody::until(
            Full::new(Bytes::from_static(b"{}")),
            1 << 20,
            idle,
            Some(Instant::now() + Duration::from_millis(1)),
        );
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{}");
        assert!(check.failure(1 << 20, idle).is_none());
    }

    #[tokio::test]
    async fn relay_reports_completion_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let body = RelayBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Instant::now() + std::time::Duration::from_secs(5),
            Box::new(Record(log.clone())),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert!(log[0].complete);
        assert_eq!(log[0].bytes, 5);
    }

    /// Records which of the two calls it got.
    struct Either(Arc<Mutex<Vec<Result<BodyOutcome, u64>>>>);
    impl OnBodyEnd for Either {
        fn body_ended(self: Box<Self>, outcome: BodyOutcome) {
            self.0.lock().unwrap().push(Ok(outcome));
        }
        fn body_dropped(self: Box<Self>, bytes: u64) {
            self.0.lock().unwrap().push(Err(bytes));
        }
    }

    #[tokio::test]
    async fn relay_dropped_early_reports_the_drop_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chunks = futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"def"))),
        ]);
        let mut body = RelayBody::new(
            http_body_util::StreamBody::new(chunks),
            Instant::now() + std::time::Duration::from_secs(5),
            Box::new(Either(log.clone())),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");
        drop(body);
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].as_ref().unwrap_err(), &3);
    }

    #[tokio::test(start_paused = true)]
    async fn relay_past_its_deadline_ends_incomplete() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stalled = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let body = RelayBody::new(
            stalled,
            Instant::now() + std::time::Duration::from_millis(100),
            Box::new(Record(log.clone())),
        );
        assert!(body.collect().await.is_err());
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert!(!log[0].complete);
        assert_eq!(log[0].cut, Some("budget_exhausted"));
    }

    #[tokio::test]
    async fn empty_body_completes_at_once() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let _body = RelayBody::new(
            http_body_util::Empty::<Bytes>::new(),
            Instant::now() + std::time::Duration::from_secs(5),
            Box::new(Record(log.clone())),
        );
        assert!(log.lock().unwrap()[0].complete);
    }

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
