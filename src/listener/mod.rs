//! Accepting and serving client connections: a bounded number of connections, an accept loop that
//! backs off on errors instead of dying, HTTP/1.1 through the listener's own server (`h1`, which
//! hands what it does not serve to hyper's), h2 through hyper, and per-connection timers for slow
//! request heads and idle keep-alive.
//!
//! hyper's own `header_read_timeout` also runs while an HTTP/1.1 connection sits idle between
//! requests, which would cut keep-alive down to the head timeout. So both timers live here:
//! the head timer runs from the first byte of a head (or from accept) until the request is
//! dispatched; the idle timer runs while no request is in flight.
//!
//! The timers are one tokio timer per connection, set lazily: a deadline that comes later than
//! the time it is set for wakes nothing (it fires, finds nothing due, and is set again), so an
//! ordinary request's head and end never wake the connection's task (see
//! `ConnActivity::wake_timer_by`).
//!
//! A third timer bounds the writing of answers: every request registers the moment its answer
//! must have been written by (its budget), and a connection whose answer is still being written
//! then is closed. No server polls a response body while the caller's socket is full, so a
//! caller that stops reading would otherwise hold its admission slot and upstream connection for
//! as long as it likes.
//!
//! Before HTTP, in a task of its own (never the accept loop): the PROXY protocol header when
//! `server.proxy_protocol` is on, the per-source connection limit, and the TLS handshake when
//! `server.tls` is set, all within `server.header_read_timeout` of accept. HTTP is then served in
//! the connection's own task, which lives as long as the connection and so carries none of that
//! state (a task is as large as its future's largest state: 856 bytes for a plain connection).
//!
//! An HTTP/1 connection idle for a second is parked: the server (ours, or hyper once it has
//! handed the stream back) and its buffers are dropped, and the next request's first bytes start
//! the own server again on the same stream (the framing guard and the timers carry on).
//! Thousands of idle keep-alive connections then cost little more than their sockets.
//!
//! The listener knows nothing of what serves the requests: it is handed any tower service that
//! answers every request (see [`Handler`]), and gives it each request with the [`ConnInfo`] of
//! the connection it came on.

mod guard;
mod h1;
pub mod proxy_protocol;
mod woken;
pub use guard::{Guard, Rejected, STAND_IN};
pub use h1::BodyReader;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::body::{ClientBody, ResponseBody};
use crate::config::ServerConfig;

const NONE: u64 = u64::MAX;

/// How much longer than its answer's deadline an h2 connection is kept (see
/// [`InFlight::write_by`]).
const H2_STALL_GRACE: Duration = Duration::from_secs(1);

/// What the proxy knows about the connection a request came on.
#[derive(Clone)]
pub struct ConnInfo {
    /// The client: the TCP peer, or the address a PROXY protocol header named.
    pub peer: SocketAddr,
    /// `https` on a TLS listener, else `http`.
    pub proto: &'static str,
    pub activity: Arc<ConnActivity>,
}

/// Shared between a connection's IO, its requests and its timer task.
pub struct ConnActivity {
    epoch: Instant,
    inflight: AtomicUsize,
    /// Milliseconds since `epoch` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `epoch` when an unfinished request head began, or `NONE`.
    head_started: AtomicU64,
    h2: AtomicBool,
    first_read: AtomicBool,
    changed: Notify,
    /// Requests started on this connection (the index of the next one).
    requests: AtomicU64,
    /// A request the framing guard refused: its index and why.
    refused: std::sync::Mutex<Option<(u64, &'static str)>>,
    /// Answers being written: the request's index and when its answer must be out by.
    relays: std::sync::Mutex<Vec<(u64, Instant)>>,
    /// Milliseconds since `epoch` the connection's timer is set for (`NONE`: not set), so a new
    /// earlier deadline knows to wake it.
    timer_at: AtomicU64,
    /// Set when the connection was closed because an answer was not written in time.
    stalled: AtomicBool,
    /// `server.header_read_timeout`, in milliseconds.
    head_timeout_ms: u64,
    /// How soon a connection that fell idle needs its timer (to park it, or to close it when
    /// `server.keepalive_timeout` is shorter), in milliseconds.
    idle_check_ms: u64,
}

impl ConnActivity {
    fn new(head_timeout: Duration, keepalive: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        ConnActivity {
            epoch: Instant::now(),
            inflight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            // A new connection must deliver its first head in time too.
            head_started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            first_read: AtomicBool::new(true),
            changed: Notify::new(),
            requests: AtomicU64::new(0),
            refused: std::sync::Mutex::new(None),
            relays: std::sync::Mutex::new(Vec::new()),
            timer_at: AtomicU64::new(NONE),
            stalled: AtomicBool::new(false),
            head_timeout_ms: ms(head_timeout),
            idle_check_ms: ms(keepalive.min(PARK_AFTER)),
        }
    }

    /// Wakes the connection's timer task when `at_ms` comes before the wake-up it is set for
    /// (or while that is being worked out). A later deadline needs no wake-up: the timer
    /// fires at its earlier time, finds nothing due, and sets itself again. So an ordinary
    /// request, whose head and end only push deadlines later, wakes the task for neither.
    fn wake_timer_by(&self, at_ms: u64) {
        let set = self.timer_at.load(Ordering::Acquire);
        if set == 0 || at_ms < set {
            self.changed.notify_one();
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Counts a request in. The returned token counts it out when dropped, however the request
    /// ends; `refused` says why the framing guard refused it, if it did.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Release);
        let index = self.requests.fetch_add(1, Ordering::AcqRel);
        let refused = *self.refused.lock().unwrap_or_else(|p| p.into_inner());
        InFlight {
            activity: self.clone(),
            index,
            refused: refused.filter(|(i, _)| *i == index).map(|(_, why)| why),
            ended_at: None,
        }
    }

    fn refuse_request(&self, index: u64, why: &'static str) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some((index, why));
    }

    fn request_finished(&self, index: u64, now: u64) {
        {
            let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
            if !relays.is_empty() {
                relays.retain(|(i, _)| *i != index);
            }
        }
        self.idle_since.store(now, Ordering::Release);
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.wake_timer_by(now.saturating_add(self.idle_check_ms));
        }
    }

    fn ms_of(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn earliest_relay(&self) -> Option<Instant> {
        let relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.iter().map(|(_, t)| *t).min()
    }

    fn on_read(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.first_read.swap(false, Ordering::AcqRel) && data.starts_with(b"PRI * HTTP/2.0") {
            self.h2.store(true, Ordering::Release);
            self.head_started.store(NONE, Ordering::Release);
            return;
        }
        if !self.h2.load(Ordering::Acquire) {
            self.head_pending();
        }
    }

    /// A head has begun, in bytes just read or read before (behind the last request): its timer
    /// runs from now, unless a request is in flight or a head timer already runs.
    fn head_pending(&self) {
        if self.inflight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NONE
        {
            let now = self.now_ms();
            self.head_started.store(now, Ordering::Release);
            self.wake_timer_by(now.saturating_add(self.head_timeout_ms));
        }
    }

    /// Since when the connection has been idle: no request in flight and no next head begun
    /// (never on h2, whose streams come and go on their own).
    fn idle_at(&self) -> Option<Instant> {
        let idle = self.inflight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NONE
            && !self.h2.load(Ordering::Acquire);
        idle.then(|| self.epoch + Duration::from_millis(self.idle_since.load(Ordering::Acquire)))
    }

    /// What the connection's timer should do next.
    fn next_action(&self, header_timeout: Duration, keepalive: Duration) -> TimerAction {
        let head = self.head_started.load(Ordering::Acquire);
        if head != NONE && !self.h2.load(Ordering::Acquire) {
            return TimerAction::Head(self.epoch + Duration::from_millis(head) + header_timeout);
        }
        if self.inflight.load(Ordering::Acquire) == 0 {
            let idle = self.idle_since.load(Ordering::Acquire);
            return TimerAction::Idle(self.epoch + Duration::from_millis(idle) + keepalive);
        }
        // Requests in flight: the earliest answer that must be out, or, while none has been
        // registered yet, a look again, by when any answer registered without waking the timer
        // (see `InFlight::write_by`) is checked. No later than an idle connection's first
        // check, so the end of a request never has to bring its timer forward.
        let look_again =
            Instant::now() + header_timeout.min(Duration::from_millis(self.idle_check_ms));
        TimerAction::Write(
            self.earliest_relay()
                .map_or(look_again, |t| t.min(look_again)),
        )
    }
}

enum TimerAction {
    Head(Instant),
    Idle(Instant),
    /// An answer must have been written by then.
    Write(Instant),
}

/// One request in flight on a connection, counted out when dropped.
pub struct InFlight {
    activity: Arc<ConnActivity>,
    index: u64,
    /// Why the framing guard refused this request, if it did.
    pub refused: Option<&'static str>,
    /// When the request ended, if its owner read the clock for it already.
    ended_at: Option<Instant>,
}

impl InFlight {
    /// The answer to this request must have been written by `deadline`; if it has not, the
    /// connection is closed (every request on it then ends, and gives back what it holds).
    ///
    /// On h2 closing the connection ends every other stream too, so it waits a little longer:
    /// a stream whose body is still being polled ends itself at its deadline (the relay's own
    /// timer); only a caller that grants no flow-control window at all is cut off this way.
    ///
    /// `holds_upstream`: the answer holds an admission slot or an upstream connection, so the
    /// connection's timer is woken to keep the deadline exactly. Otherwise (a small answer read
    /// whole, the gateway's own answer: only this connection is at stake) the deadline is kept
    /// at the timer's next wake-up, at the latest a second after the request arrived (sooner
    /// when `header_read_timeout` or `keepalive_timeout` is shorter). Waking the timer means
    /// polling the whole connection once more, which every ordinary request is spared this way.
    pub fn write_by(&self, deadline: Instant, holds_upstream: bool) {
        let a = &self.activity;
        let deadline = if a.h2.load(Ordering::Acquire) {
            deadline + H2_STALL_GRACE
        } else {
            deadline
        };
        a.relays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((self.index, deadline));
        // While requests are in flight the timer is always set (for the next check at the
        // latest); it is woken only to keep an exact deadline that comes before it.
        // (0: being worked out right now, from a stream's own task on h2.)
        if holds_upstream {
            a.wake_timer_by(a.ms_of(deadline));
        }
    }

    /// The request ended at `now` (a clock read its owner shares); counted out when dropped.
    pub fn ended_at(&mut self, now: Instant) {
        self.ended_at = Some(now);
    }

    /// Whether the connection was closed because an answer on it was not written in time.
    pub fn closed_for_stall(&self) -> bool {
        self.activity.stalled.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.activity;
        let now = self.ended_at.map_or_else(|| a.now_ms(), |t| a.ms_of(t));
        a.request_finished(self.index, now);
    }
}

pin_project_lite::pin_project! {
    /// Reports reads to the connection's activity, so the head timer knows when a head begins,
    /// and passes them through the framing guard while hyper serves the connection. `S` is the
    /// TCP stream, or the TLS stream over it: either way the guard sees the plain HTTP bytes.
    struct TrackedIo<S> {
        #[pin]
        inner: S,
        activity: Arc<ConnActivity>,
        guard: guard::Guard,
        // What the guard passed on that did not fit the caller's buffer yet (unguarded: bytes
        // read and put back).
        pending: Vec<u8>,
        eof: bool,
        // The own HTTP/1.1 server reads past the guard: it judges each head as the guard does,
        // and gives the guard what it does not serve (`guard_again`).
        unguarded: bool,
    }
}

impl<S> TrackedIo<S> {
    /// Puts bytes that were read (past the guard) back in front of what is read next.
    fn unread(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.pending.splice(0..0, bytes.iter().copied());
        }
    }

    /// Stops the guard, for the own server to read: only between requests, with nothing held.
    fn unguard(&mut self) {
        if self.pending.is_empty() && self.guard.at_head() {
            self.unguarded = true;
        }
    }

    /// For hyper, from the own server: `read` (bytes read past the guard and not used, which
    /// start at a head) and anything put back go through the guard now, as if just read.
    fn guard_again(&mut self, read: &[u8]) {
        if !self.unguarded {
            self.unread(read);
            return;
        }
        self.unguarded = false;
        let mut raw = std::mem::take(&mut self.pending);
        raw.splice(0..0, read.iter().copied());
        if let Some(refused) = self.guard.feed(&raw, &mut self.pending) {
            tracing::debug!(error = refused.why, "request head refused before parsing");
            self.activity.refuse_request(refused.index, refused.why);
        }
        if self.eof {
            self.guard.flush(&mut self.pending);
        }
    }

    /// Lets go of the capacity the last request's bytes left behind, for a parked connection.
    fn release_buffers(&mut self) {
        self.pending.shrink_to_fit();
        self.guard.shrink();
    }
}

impl<S: AsyncRead> AsyncRead for TrackedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if *this.eof {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            ready!(this.inner.as_mut().poll_read(cx, buf))?;
            let read = &buf.filled()[before..];
            if *this.unguarded {
                if read.is_empty() {
                    *this.eof = true;
                }
                this.activity.on_read(read);
                return Poll::Ready(Ok(()));
            }
            if read.is_empty() {
                // End of stream: a head still held back goes to hyper, which reports it.
                this.guard.flush(this.pending);
                *this.eof = true;
                continue;
            }
            this.activity.on_read(read);
            if this.guard.is_through() {
                return Poll::Ready(Ok(()));
            }
            // The guard decides what hyper sees of these bytes; they are taken back out of the
            // buffer and put in again as it passes them on.
            let mut passed = std::mem::take(this.pending);
            if let Some(refused) = this.guard.feed(read, &mut passed) {
                tracing::debug!(error = refused.why, "request head refused before parsing");
                this.activity.refuse_request(refused.index, refused.why);
            }
            *this.pending = passed;
            buf.set_filled(before);
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for TrackedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the listener serves: a tower service given each request with the details of the
/// connection it came on. It answers every request (it never fails; an error is an answer too),
/// and it must always be ready: the listener calls it without `poll_ready` (hyper's own service
/// trait has none).
pub trait Handler:
    tower::Service<
        (Request<ClientBody>, ConnInfo),
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future: Send + Unpin + 'static,
    > + Clone
    + Send
    + Sync
    + Unpin
    + 'static
{
}

impl<S> Handler for S where
    S: tower::Service<
            (Request<ClientBody>, ConnInfo),
            Response = Response<ResponseBody>,
            Error = Infallible,
            Future: Send + Unpin + 'static,
        > + Clone
        + Send
        + Sync
        + Unpin
        + 'static
{
}

/// The handler with this connection's details, handed to it beside every request. (In the
/// request's extensions they cost a map, a box and a hash lookup per request.)
#[derive(Clone)]
struct WithConn<S> {
    inner: S,
    info: ConnInfo,
}

impl<S: Handler> hyper::service::Service<Request<Incoming>> for WithConn<S> {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = S::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.inner
            .clone()
            .call((req.map(ClientBody::Hyper), self.info.clone()))
    }
}

/// What every worker's accept loop shares: the connection limits count the whole process, not
/// one worker, and one shutdown signal reaches them all.
#[derive(Clone)]
pub struct Serving {
    config: Arc<ServerConfig>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    connections: Arc<Semaphore>,
    sources: Option<Arc<SourceLimit>>,
    shutdown: watch::Receiver<bool>,
}

impl Serving {
    /// `connections` has one permit per connection allowed open at once (held until it closes).
    pub fn new(
        config: ServerConfig,
        tls: Option<Arc<crate::tls::ServerTls>>,
        connections: Arc<Semaphore>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let sources = config
            .max_connections_per_source
            .map(|max| Arc::new(SourceLimit::new(max)));
        Serving {
            config: Arc::new(config),
            tls,
            connections,
            sources,
            shutdown,
        }
    }
}

/// Serves connections accepted on `listener` until shutdown is asked for, then lets open
/// connections finish gracefully. Returns once the accept loop has stopped; the connection
/// semaphore has every permit back once all connections have closed. `worker` labels this
/// accept loop's connections in `breakwater_connections_accepted_total`.
pub async fn serve<H: Handler>(listener: TcpListener, proxy: H, serving: Serving, worker: usize) {
    let Serving {
        config,
        tls,
        connections,
        sources,
        shutdown,
    } = serving;
    let builder = Arc::new(Protocols::new(&config));
    let accepted_total =
        metrics::counter!("breakwater_connections_accepted_total", "worker" => worker.to_string());
    let mut backoff = Duration::from_millis(5);
    let mut stop = shutdown.clone();
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = crate::listener::stopped(&mut stop) => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::listener::stopped(&mut stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                accepted_total.increment(1);
                let _ = stream.set_nodelay(true);
                tokio::spawn(accept_connection(
                    stream,
                    peer,
                    proxy.clone(),
                    builder.clone(),
                    config.clone(),
                    tls.clone(),
                    sources.clone(),
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(e) if is_per_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection failed before it was accepted");
            }
            Err(e) => {
                // Out of file descriptors or memory: back off so the process stays alive and
                // serves what it already has, rather than spinning or exiting.
                tracing::error!(error = %e, backoff = %crate::config::units::format_duration(backoff), "accept failed; backing off");
                drop(permit);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Binds a listening socket with an explicit accept backlog. tokio's `TcpListener::bind` uses
/// 128, which a burst of a few hundred simultaneous callers overflows: the kernel drops their
/// SYNs and they retry a full second later, which is exactly the latency this gateway exists to
/// remove. The kernel caps the value at `net.core.somaxconn`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// `n` listening sockets on one address, one per worker, for the kernel to spread incoming
/// connections over (`SO_REUSEPORT`, by a hash of the connection's addresses): each worker
/// accepts on its own socket, so no accept is contended and no connection is handed from one
/// thread to another. They are plain std sockets, for each worker to register with its own
/// runtime (`TcpListener::from_std`); port 0 picks one port for all of them.
///
/// `SO_REUSEPORT` would also let this bind succeed next to another process of the same user
/// listening there with the option set (an instance still running, say), silently splitting the
/// traffic with it; so the address is first bound once without it, which fails as a plain bind
/// does when anything listens there.
pub fn bind_group(
    addr: SocketAddr,
    backlog: u32,
    n: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = || -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        Ok(s)
    };
    let probe = socket()?;
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .expect("an inet socket has an inet address");
    drop(probe);
    (0..n)
        .map(|_| {
            let s = socket()?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            s.listen(backlog.min(i32::MAX as u32) as i32)?;
            Ok(s.into())
        })
        .collect()
}

/// Resolves once shutdown has been asked for (or whoever could ask has gone away).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// hyper's HTTP/1.1 and HTTP/2 servers as the listener's config sets them up; which one serves
/// a connection is decided by its first bytes (`starts_h2`).
struct Protocols {
    h1: http1::Builder,
    /// None: `server.http2` is off, every connection is HTTP/1.
    h2: Option<http2::Builder<TokioExecutor>>,
    /// `breakwater_connections_parked`.
    parked: metrics::Gauge,
}

impl Protocols {
    fn new(config: &ServerConfig) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .max_buf_size(config.max_header_size)
            .max_headers(config.max_headers);
        let h2 = config.http2.then(|| {
            let mut h2 = http2::Builder::new(TokioExecutor::new());
            h2.timer(TokioTimer::new())
                .max_header_list_size(config.max_header_size as u32)
                .max_concurrent_streams(Some(256))
                .keep_alive_interval(Some(Duration::from_secs(30)));
            h2
        });
        Protocols {
            h1,
            h2,
            parked: metrics::gauge!("breakwater_connections_parked"),
        }
    }
}

/// Open connections per source address, for `server.max_connections_per_source`.
struct SourceLimit {
    max: usize,
    open: std::sync::Mutex<HashMap<IpAddr, usize>>,
}

impl SourceLimit {
    fn new(max: usize) -> Self {
        SourceLimit {
            max,
            open: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it has `max` open already.
    fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        // `::ffff:a.b.c.d` on a dual-stack listener is the same source as `a.b.c.d`.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            limit: self.clone(),
            ip,
        })
    }
}

/// One open connection counted against its source; given back when dropped.
struct SourceSlot {
    limit: Arc<SourceLimit>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("breakwater_connections_refused_total", "reason" => reason).increment(1);
}

/// What an open client connection holds until it closes: its place under
/// `server.max_connections`, and under the per-source limit when there is one.
struct Holds {
    _permit: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

impl Holds {
    fn new(permit: OwnedSemaphorePermit, source: Option<SourceSlot>) -> Self {
        Holds {
            _permit: permit,
            _source: source,
        }
    }
}

/// Everything before HTTP: the PROXY protocol header, the per-source limit and the TLS
/// handshake, bounded together by `header_read_timeout` from accept. Then HTTP is served in a
/// task of its own, so that task (which lives as long as the connection) carries none of this
/// one's state: a task is as large as its largest state. (With none of these to do, this task
/// costs one spawn per connection, not per request.)
#[allow(clippy::too_many_arguments)]
async fn accept_connection<H: Handler>(
    mut stream: TcpStream,
    tcp_peer: SocketAddr,
    proxy: H,
    builder: Arc<Protocols>,
    config: Arc<ServerConfig>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    sources: Option<Arc<SourceLimit>>,
    shutdown: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + config.header_read_timeout;
    let mut peer = tcp_peer;
    if config.proxy_protocol {
        match tokio::time::timeout_at(deadline, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(header)) => {
                if let Some(source) = header.source {
                    peer = source;
                }
            }
            Ok(Err(why)) => {
                tracing::debug!(%tcp_peer, error = %why, "bad PROXY protocol header; closing");
                refused("proxy_protocol");
                return;
            }
            Err(_) => {
                tracing::debug!(%tcp_peer, "no PROXY protocol header in time; closing");
                refused("proxy_protocol");
                return;
            }
        }
    }
    let source = match &sources {
        None => None,
        Some(limit) => match limit.acquire(peer.ip()) {
            Some(slot) => Some(slot),
            None => {
                tracing::debug!(%peer, max = limit.max, "too many connections from this source; closing");
                refused("per_source_limit");
                return;
            }
        },
    };
    let holds = Holds::new(permit, source);
    let Some(tls) = tls else {
        tokio::spawn(serve_connection(
            stream, peer, "http", proxy, builder, config, shutdown, holds,
        ));
        return;
    };
    // rustls's handshake state is kilobytes: boxed, it is not part of every plain connection's
    // preamble as well.
    Box::pin(accept_tls(
        stream, peer, deadline, tls, proxy, builder, config, shutdown, holds,
    ))
    .await
}

/// The TLS handshake by `deadline`, then HTTP over it.
#[allow(clippy::too_many_arguments)]
async fn accept_tls<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    tls: Arc<crate::tls::ServerTls>,
    proxy: H,
    builder: Arc<Protocols>,
    config: Arc<ServerConfig>,
    shutdown: watch::Receiver<bool>,
    holds: Holds,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            metrics::counter!("breakwater_tls_handshake_failures_total", "reason" => "error")
                .increment(1);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake not finished in time; closing");
            metrics::counter!("breakwater_tls_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            return;
        }
    };
    tokio::spawn(serve_connection(
        stream, peer, "https", proxy, builder, config, shutdown, holds,
    ));
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long an HTTP/1 connection sits idle before its server's state is let go (see
/// `Conn::Parked`). Long enough that a caller sending requests back to back keeps its state;
/// short enough that thousands of idle keep-alive connections hold little more than a socket.
const PARK_AFTER: Duration = Duration::from_secs(1);

type Io<S> = TokioIo<TrackedIo<S>>;
type Service<H> = WithConn<H>;
type H2Connection<S, H> = http2::Connection<Io<S>, Service<H>, TokioExecutor>;

/// A connection as its task holds it.
enum Conn<S, H: Handler> {
    /// The listener's own HTTP/1.1 server (`h1`): its read buffer (8 KiB) and state live in the
    /// box. Every HTTP/1 connection starts here.
    Own(Box<h1::Server<S, H>>),
    /// hyper serves HTTP/1, from a request the own server handed it on: its read buffer (8-16
    /// KiB), write buffer (8 KiB) and state live in the box.
    H1(Box<http1::Connection<Io<S>, Service<H>>>),
    H2(Pin<Box<H2Connection<S, H>>>),
    /// Idle HTTP/1: only the stream is kept, and the first bytes of the next request start the
    /// own server on it again (hyper's, if the framing guard still follows a request of the
    /// stream). An idle server keeps its buffers; NGINX frees a keep-alive connection's buffers
    /// too.
    Parked {
        io: TrackedIo<S>,
        _counted: ParkedCount,
    },
}

/// One parked connection counted in `breakwater_connections_parked`, until dropped.
struct ParkedCount(metrics::Gauge);

impl ParkedCount {
    fn new(gauge: &metrics::Gauge) -> Self {
        gauge.increment(1.0);
        ParkedCount(gauge.clone())
    }
}

impl Drop for ParkedCount {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// What happened to a connection the task was waiting on.
enum Event {
    /// The server is done with the connection (or failed).
    Served(Result<(), ServeError>),
    /// The own server met a request for hyper's.
    HandOff,
    /// Bytes (or the end of the stream) arrived on a parked connection: how many.
    Woken(io::Result<usize>),
}

impl<S, H> Conn<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        match self {
            Conn::Own(c) => c.poll(cx).map(|served| match served {
                Ok(h1::Outcome::Done) => Event::Served(Ok(())),
                Ok(h1::Outcome::HandOff) => Event::HandOff,
                Err(e) => Event::Served(Err(e.into())),
            }),
            Conn::H1(c) => c
                .poll_without_shutdown(cx)
                .map(|r| Event::Served(r.map_err(Into::into))),
            Conn::H2(c) => std::future::Future::poll(c.as_mut(), cx)
                .map(|r| Event::Served(r.map_err(Into::into))),
            Conn::Parked { io, .. } => {
                // On the stack only while polled: a parked connection holds no buffer.
                let mut buf = [0u8; 1024];
                let mut read = ReadBuf::new(&mut buf);
                let woken = ready!(Pin::new(&mut *io).poll_read(cx, &mut read)).map(|()| {
                    io.unread(read.filled());
                    read.filled().len()
                });
                Poll::Ready(Event::Woken(woken))
            }
        }
    }

    fn graceful_shutdown(&mut self) {
        match self {
            Conn::Own(c) => c.finish(),
            Conn::H1(c) => Pin::new(&mut **c).graceful_shutdown(),
            Conn::H2(c) => c.as_mut().graceful_shutdown(),
            Conn::Parked { .. } => {}
        }
    }
}

/// Whether the connection starts with the HTTP/2 preface. The bytes read to tell go back in
/// front of the stream, for whichever protocol serves it.
async fn starts_h2<S: AsyncRead + Unpin>(io: &mut TrackedIo<S>) -> io::Result<bool> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if buf[..filled] != H2_PREFACE[..filled] {
            break;
        }
    }
    io.unread(&buf[..filled]);
    Ok(buf[..filled] == *H2_PREFACE)
}

#[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
fn serve_connection<S, H: Handler>(
    stream: S,
    peer: SocketAddr,
    proto: &'static str,
    proxy: H,
    protocols: Arc<Protocols>,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
    holds: Holds,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // An async block rather than an async fn: an async fn keeps its arguments twice in its
    // state (as passed, and as moved into its body), for the connection's whole life.
    async move {
        // Moved in by name: an async block takes only what it uses, and what the connection
        // holds must be given back when it closes, not when its task is made.
        let _holds = holds;
        let activity = Arc::new(ConnActivity::new(
            config.header_read_timeout,
            config.keepalive_timeout,
        ));
        let service = WithConn {
            inner: proxy,
            info: ConnInfo {
                peer,
                proto,
                activity: activity.clone(),
            },
        };
        // In a block: the stream is moved into hyper's connection below, and a local that outlives
        // its move still takes room in the task for the connection's whole life.
        let mut conn: Conn<S, H> = {
            let mut io = TrackedIo {
                inner: stream,
                activity: activity.clone(),
                guard: guard::Guard::new(config.max_header_size, config.max_headers),
                pending: Vec::new(),
                eof: false,
                // Until hyper serves HTTP/1 on it: h2 needs no guard, and the own server
                // judges heads itself.
                unguarded: true,
            };
            let h2 = match &protocols.h2 {
                None => false,
                Some(_) => {
                    // The first head's timer runs from accept (`ConnActivity::new`).
                    let deadline = activity.epoch + config.header_read_timeout;
                    tokio::select! {
                        // Boxed: it runs once, and inline it would take room in the task for the
                        // connection's whole life.
                        found = Box::pin(tokio::time::timeout_at(deadline, starts_h2(&mut io))) => match found {
                            Ok(Ok(h2)) => h2,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "client connection failed before its first request");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "request head not received in time; closing");
                                return;
                            }
                        },
                        _ = crate::listener::stopped(&mut shutdown) => return,
                    }
                }
            };
            match (&protocols.h2, h2) {
                (Some(h2), true) => Conn::H2(Box::pin(
                    h2.serve_connection(TokioIo::new(io), service.clone()),
                )),
                _ => Conn::Own(Box::new(own_server(io, &service, &config))),
            }
        };
        let mut closing = false;
        // hyper was asked to finish so the connection can be parked.
        let mut parking = false;
        // One timer for the connection's life, set again rather than made anew: it may fire earlier
        // than needed (see `ConnActivity::wake_timer_by`), and then only looks again.
        let timer = tokio::time::sleep_until(activity.epoch);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        // The activity, timer and shutdown branches: polled when one of them woke the task, not
        // on each of hyper's wake-ups.
        let side = woken::Woken::new();
        loop {
            // While the next wake-up is being worked out, an exact write deadline wakes the timer.
            activity.timer_at.store(0, Ordering::Release);
            let action = activity.next_action(config.header_read_timeout, config.keepalive_timeout);
            let park_at = match (&conn, activity.idle_at()) {
                (Conn::H1(_) | Conn::Own(_), Some(idle)) if !closing && !parking => {
                    Some(idle + PARK_AFTER)
                }
                _ => None,
            };
            let wake_at = match action {
                TimerAction::Write(t) => Some(t),
                _ if closing => None,
                TimerAction::Head(t) | TimerAction::Idle(t) => {
                    Some(park_at.map_or(t, |p| p.min(t)))
                }
            };
            match wake_at {
                Some(t) if armed.is_none_or(|a| t < a) => {
                    timer.as_mut().reset(t);
                    armed = Some(t);
                }
                Some(_) => {}
                None => armed = None,
            }
            activity
                .timer_at
                .store(armed.map_or(NONE, |t| activity.ms_of(t)), Ordering::Release);
            // In a block: the branches' futures are gone before what woke is handled, which may
            // wait (the stream's shutdown), so they take no room in the task at that point.
            let woke = {
                let changed = activity.changed.notified();
                tokio::pin!(changed);
                let stop = crate::listener::stopped(&mut shutdown);
                tokio::pin!(stop);
                // New futures, and a timer perhaps set again: each is polled once before it waits.
                side.again();
                let (timed, stoppable) = (armed.is_some(), !closing);
                let side_event = std::future::poll_fn(|cx| {
                    side.poll(cx, |cx| {
                        if changed.as_mut().poll(cx).is_ready() {
                            Poll::Ready(Side::Changed)
                        } else if timed && timer.as_mut().poll(cx).is_ready() {
                            Poll::Ready(Side::Timer)
                        } else if stoppable && stop.as_mut().poll(cx).is_ready() {
                            Poll::Ready(Side::Stopped)
                        } else {
                            Poll::Pending
                        }
                    })
                });
                tokio::select! {
                    event = std::future::poll_fn(|cx| conn.poll_event(cx)) => Woke::Conn(event),
                    side_event = side_event => Woke::Side(side_event),
                }
            };
            match woke {
                Woke::Conn(event) => match event {
                    Event::Served(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                        return;
                    }
                    Event::Served(Ok(())) => {
                        // In a block: what hyper hands back is not kept across the close below.
                        let mut io = match conn {
                            Conn::H1(done) => {
                                let parts = done.into_parts();
                                let mut io = parts.io.into_inner();
                                io.unread(&parts.read_buf);
                                io
                            }
                            Conn::Own(done) => done.into_io(),
                            _ => return,
                        };
                        if !parking || closing {
                            // hyper left the closing of the stream to us (`poll_without_shutdown`).
                            let _ = tokio::time::timeout(config.header_read_timeout, io.shutdown())
                                .await;
                            return;
                        }
                        parking = false;
                        io.release_buffers();
                        io.unguard();
                        conn = Conn::Parked {
                            io,
                            _counted: ParkedCount::new(&protocols.parked),
                        };
                    }
                    Event::HandOff => {
                        let Conn::Own(own) = conn else { return };
                        tracing::debug!(%peer, "request handed to hyper's HTTP/1 server");
                        conn = Conn::H1(Box::new(
                            protocols
                                .h1
                                .serve_connection(TokioIo::new(own.hand_off()), service.clone()),
                        ));
                        if closing {
                            conn.graceful_shutdown();
                        }
                    }
                    Event::Woken(Ok(0)) => return,
                    Event::Woken(Ok(_)) => {
                        let Conn::Parked { io, .. } = conn else {
                            return;
                        };
                        conn = if io.unguarded {
                            Conn::Own(Box::new(own_server(io, &service, &config)))
                        } else {
                            Conn::H1(Box::new(
                                protocols
                                    .h1
                                    .serve_connection(TokioIo::new(io), service.clone()),
                            ))
                        };
                    }
                    Event::Woken(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "idle client connection failed");
                        return;
                    }
                },
                Woke::Side(side_event) => match side_event {
                    Side::Changed => {}
                    Side::Timer => {
                        armed = None;
                        let now = Instant::now();
                        match activity
                            .next_action(config.header_read_timeout, config.keepalive_timeout)
                        {
                            TimerAction::Head(t) if t <= now => {
                                tracing::debug!(%peer, "request head not received in time; closing");
                                return;
                            }
                            TimerAction::Idle(t) if t <= now => {
                                if matches!(conn, Conn::Parked { .. }) {
                                    return;
                                }
                                closing = true;
                                conn.graceful_shutdown();
                            }
                            TimerAction::Write(t) if t <= now => {
                                // Dropping the connection drops what its requests hold; they see why.
                                tracing::debug!(%peer, "answer not written within its budget; closing");
                                activity.stalled.store(true, Ordering::Release);
                                return;
                            }
                            // Still idle since before `park_at` (the same task checks and asks, so no
                            // request can have begun in between): hyper finishes, and hands the stream
                            // back instead of closing it.
                            TimerAction::Idle(_)
                                if !closing
                                    && !parking
                                    && activity
                                        .idle_at()
                                        .is_some_and(|idle| idle + PARK_AFTER <= now) =>
                            {
                                conn = match conn {
                                    Conn::H1(_) => {
                                        parking = true;
                                        conn.graceful_shutdown();
                                        conn
                                    }
                                    // Nothing to finish: parked at once.
                                    Conn::Own(own) if own.is_idle() => {
                                        let mut io = own.into_io();
                                        io.release_buffers();
                                        Conn::Parked {
                                            io,
                                            _counted: ParkedCount::new(&protocols.parked),
                                        }
                                    }
                                    other => other,
                                };
                            }
                            _ => {}
                        }
                    }
                    Side::Stopped => {
                        if matches!(conn, Conn::Parked { .. }) {
                            return;
                        }
                        closing = true;
                        conn.graceful_shutdown();
                    }
                },
            }
        }
    }
}

/// Why a connection's server gave up on it.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Own(#[from] h1::ConnError),
}

/// The own HTTP/1.1 server on `io`, for `service`'s handler and connection.
fn own_server<S, H>(
    io: TrackedIo<S>,
    service: &WithConn<H>,
    config: &ServerConfig,
) -> h1::Server<S, H>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    h1::Server::new(
        io,
        service.inner.clone(),
        service.info.clone(),
        config.max_header_size,
        config.max_headers,
    )
}

/// What woke the connection's loop.
enum Woke {
    Conn(Event),
    Side(Side),
}

/// Which of the connection loop's other branches woke it.
enum Side {
    /// The activity asked for the timer to be worked out again.
    Changed,
    Timer,
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// An activity whose timer is set for `timer_at_ms` (`NONE`: not set; 0: being worked out).
    fn activity(timer_at_ms: u64) -> Arc<ConnActivity> {
        let a = Arc::new(ConnActivity::new(
            Duration::from_secs(10),
            Duration::from_secs(75),
        ));
        a.timer_at.store(timer_at_ms, Ordering::Release);
        a
    }

    /// Whether the timer task was woken (a stored notification is taken).
    fn woken(a: &ConnActivity) -> bool {
        a.changed.notified().now_or_never().is_some()
    }

    #[test]
    fn a_request_that_only_pushes_deadlines_later_does_not_wake_the_timer() {
        // Set for the first idle check (park after 1 s): the head's 10 s deadline and the next
        // idle check, both later, need no wake-up.
        let a = activity(PARK_AFTER.as_millis() as u64);
        a.on_read(b"GET / HTTP/1.1\r\n");
        assert!(!woken(&a), "head began");
        let req = a.request_started();
        drop(req);
        assert!(!woken(&a), "request ended");
    }

    #[test]
    fn an_earlier_deadline_or_an_unset_timer_wakes_it() {
        // Set far out (a long keep-alive): the end of a request brings the park check forward.
        let a = activity(60_000);
        drop(a.request_started());
        assert!(woken(&a));
        // Not set at all (closing): the next idle check, and a head beginning after it, must
        // be timed.
        let a = activity(NONE);
        drop(a.request_started());
        assert!(woken(&a));
        a.on_read(b"G");
        assert!(woken(&a));
        // Being worked out: always woken, so the new deadline is not missed.
        let a = activity(0);
        drop(a.request_started());
        assert!(woken(&a));
    }

    #[test]
    fn answers_holding_upstream_resources_wake_it_only_for_an_earlier_deadline() {
        let a = activity(5_000);
        let req = a.request_started();
        req.write_by(a.epoch + Duration::from_secs(9), true);
        assert!(!woken(&a), "later than the timer");
        req.write_by(a.epoch + Duration::from_secs(2), false);
        assert!(!woken(&a), "holds nothing: kept at the next wake-up");
        req.write_by(a.epoch + Duration::from_secs(2), true);
        assert!(woken(&a));
    }

    #[test]
    fn while_requests_run_the_timer_looks_again_no_later_than_an_idle_check() {
        let a = activity(NONE);
        let _req = a.request_started();
        let before = Instant::now();
        let TimerAction::Write(at) =
            a.next_action(Duration::from_secs(10), Duration::from_secs(75))
        else {
            panic!("a request is in flight");
        };
        assert!(at <= Instant::now() + PARK_AFTER && at >= before + PARK_AFTER);
    }
}
