//! Upstreams: one or more endpoints (servers), each with a bb8 pool of warm keep-alive
//! connections, its own in-flight limit and its own health; and the one call that sends a request
//! once, to the endpoint the balancing picks.
//!
//! The upstream's capacity — what its routes' admission may let through — is the sum of the
//! limits of the endpoints that are in service (an endpoint without a limit makes it unbounded),
//! kept up to date as endpoints are ejected and come back, and pushed to the admission of every
//! route that uses it so its queue follows at once.

mod connector;
mod discovery;
mod endpoint;
pub mod h1;
mod idle;
mod quickack;
pub mod workers;

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use bb8::{Pool, PooledConnection};
use bytes::Bytes;
use http::{Request, Response};
use metrics::Gauge;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use connector::{ConnectError, Connector, ConnectorState, UpstreamConn};
pub use discovery::{Resolve, SystemResolver};
pub use endpoint::{Endpoint, EndpointSlot};
pub use h1::{ExchangeError, Framing};

use crate::admission::Admission;
use crate::body::RequestBody;
use crate::circuit::Standing;
use crate::config::{Balance, UpstreamConfig};
use crate::error::ProxyError;
use crate::forward::Forwarding;

/// Why one attempt failed, told apart by what the upstream can have seen of the request: that is
/// what decides whether it may be sent again (`crate::retry`).
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// No connection could be had: the upstream refuses, does not answer, or does not resolve.
    /// Nothing was sent.
    #[error("{0}")]
    NoConnection(String),
    /// The connection failed before any byte of the request was written: it provably did not
    /// reach the upstream. `reused`: the connection had sat in the pool (the peer may have
    /// closed it while it was idle).
    #[error("request not sent: {error}")]
    NotWritten { error: ExchangeError, reused: bool },
    /// The connection was closed after the request was written and before any byte of an answer
    /// came back. On a reused connection this is usually the keep-alive race (the peer closed
    /// the idle connection as the request went out, and never read it), but the upstream may
    /// also have read the request and died working on it: nobody can tell.
    #[error("connection closed before any answer: {error}")]
    ClosedBeforeAnswer { error: ExchangeError, reused: bool },
    /// Any other failure after the request was written.
    #[error("{0}")]
    Failed(ExchangeError),
    /// No answer's head within the request's budget (or no endpoint slot came free in it).
    #[error("no answer within the budget")]
    TimedOut,
}

/// A failed attempt; `unsent` holds the request when not a byte of it was written, `endpoint`
/// the endpoint it went to (none when it never got one).
pub struct SendError {
    pub failure: SendFailure,
    pub unsent: Option<Request<RequestBody>>,
    pub endpoint: Option<Arc<Endpoint>>,
}

/// An attempt the upstream answered.
pub struct Answered {
    /// The answer's head, with how its body is framed in the body's place: the body is read
    /// through the lease's connection.
    pub head: Response<Framing>,
    /// Holds the connection until the answer's body has been read.
    pub lease: Lease,
    /// When the request started going out on its connection: the upstream's service time runs
    /// from here, not from before the wait for a connection (the gateway's own delay).
    pub written_at: Instant,
}

/// Which connection an attempt goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// An idle connection from the pool (or a new one the pool opens).
    Pool,
    /// A connection opened for this attempt alone, after a pooled one proved stale: every idle
    /// connection in the pool may be as old. Offered to the pool when the exchange is done.
    Fresh,
}

/// A connection and an endpoint slot lent to one exchange. Give it back with [`Lease::release`]
/// once the response body has been relayed to the end; dropped any other way, the connection is
/// closed. The slot is given back either way.
pub struct Lease {
    held: Held,
    slot: EndpointSlot,
    /// When the answer's head arrived.
    head_at: Instant,
}

enum Held {
    Pooled(PooledConnection<'static, Connector>),
    /// Opened outside the pool to retry a request whose pooled connection was dead; offered to
    /// the pool when done.
    Fresh {
        conn: UpstreamConn,
        pool: Pool<Connector>,
    },
}

impl Held {
    fn conn(&mut self) -> &mut UpstreamConn {
        match self {
            Held::Pooled(c) => c,
            Held::Fresh { conn, .. } => conn,
        }
    }
}

impl Lease {
    /// The endpoint serving the exchange.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        self.slot.endpoint()
    }

    /// When the answer's head arrived.
    pub fn head_at(&self) -> Instant {
        self.head_at
    }

    /// The answer's body of `len` bytes, when it has all arrived (most small answers come with
    /// their head).
    pub fn take_whole(&mut self, len: usize) -> Option<Bytes> {
        self.held.conn().io.take_whole(len)
    }

    /// Reads the answer's body of `len` bytes whole.
    pub async fn read_whole(&mut self, len: usize) -> Result<Bytes, ExchangeError> {
        self.held.conn().io.read_whole(len).await
    }

    /// Gives the connection back (closed unless `reusable`) at `now`: one clock read, the
    /// caller's, serves the answer's length, the connection's idle clock and the caller's own
    /// timing.
    pub fn release(mut self, reusable: bool, now: Instant) {
        let endpoint = self.slot.endpoint();
        let conn = self.held.conn();
        let reusable = reusable && conn.io.reusable();
        let acks = &endpoint.connector.acks;
        if reusable
            && conn.served > 0
            && !acks.is_on()
            && acks.answer_ended(now.saturating_duration_since(self.head_at))
        {
            tracing::info!(
                upstream = %endpoint.upstream,
                endpoint = %endpoint.label,
                "the upstream's answers wait for our delayed ACKs (Nagle's algorithm on its \
                 side): acknowledging its reads at once from now on"
            );
        }
        // Watched from here on: the peer closing it while it idles is seen without a task.
        let reusable = reusable && !conn.retire && conn.io.watch_idle();
        conn.clock.went_idle_at(now, reusable);
        conn.served = conn.served.saturating_add(1);
        if let Held::Fresh { conn, pool } = self.held {
            if reusable {
                let _ = pool.add(conn);
            }
        }
    }
}

/// An answer's body streamed from its connection. The connection goes back to the pool once
/// the body has been read to its end, and is closed if the body is dropped before.
pub struct AnswerBody {
    lease: Option<Lease>,
    decoder: h1::Decoder,
}

impl AnswerBody {
    pub fn new(lease: Lease, framing: Framing) -> Self {
        AnswerBody {
            lease: Some(lease),
            decoder: h1::Decoder::new(framing),
        }
    }

    fn finish(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release(true, Instant::now());
        }
    }
}

impl http_body::Body for AnswerBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        let Some(lease) = this.lease.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = std::task::ready!(lease.held.conn().io.poll_body(&mut this.decoder, cx));
        std::task::Poll::Ready(match polled {
            Some(Ok(data)) => {
                // The last piece of a body of known length: the connection is free now, not
                // when the body is next polled.
                if this.decoder.is_done() {
                    this.finish();
                }
                Some(Ok(http_body::Frame::data(data)))
            }
            Some(Err(e)) => {
                // Dropped: closed.
                this.lease = None;
                Some(Err(e))
            }
            None => {
                this.finish();
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.lease.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.decoder.remaining() {
            Some(n) if self.lease.is_some() => http_body::SizeHint::with_exact(n),
            Some(_) => http_body::SizeHint::with_exact(0),
            None => http_body::SizeHint::default(),
        }
    }
}

pub struct Upstream {
    pub config: UpstreamConfig,
    /// The endpoints in use: fixed from the config, or as discovery last found them.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Built from `config.tls` and the files it names (exactly for `https://` upstreams).
    pub tls: Option<crate::tls::ClientTls>,
    /// The Host the rewritten request carries: the url's authority (with several listed
    /// endpoints and the host not preserved, each endpoint's own replaces it when sent), as the
    /// header value every request shares (none if the authority cannot be one).
    pub host_header: Option<http::HeaderValue>,
    /// Each listed endpoint is sent its own Host.
    host_per_endpoint: bool,
    /// Round-robin position.
    next: AtomicUsize,
    /// What the endpoints in service take together (`usize::MAX`: unbounded); see the module
    /// head. Recomputed whenever an endpoint leaves or returns.
    capacity: AtomicUsize,
    /// Admissions of the routes using this upstream, told when `capacity` changes.
    watchers: Mutex<Vec<Weak<Admission>>>,
    /// Woken when an endpoint returns, for requests waiting for an endpoint slot.
    changed: Notify,
    /// Some endpoint has been connected to (see [`Upstream::ever_connected`]).
    connected_once: std::sync::atomic::AtomicBool,
    gauges: Gauges,
}

struct Gauges {
    circuit_open: Gauge,
    in_service: Gauge,
    ejected: Gauge,
    capacity: Gauge,
}

/// What an exchange gives back: the answer's head, the connection it holds, and when the
/// request was written.
type Exchanged = (Response<Framing>, Held, Instant);

impl Upstream {
    /// Builds the endpoints' pools and starts opening their `min_idle` connections.
    pub fn new(config: UpstreamConfig, tls: Option<crate::tls::ClientTls>) -> Self {
        Upstream::rebuild(config, tls, None)
    }

    /// Builds the upstream for a reloaded `config`, keeping from `old` every endpoint whose
    /// settings did not change (its pool, its warm connections, its health and its requests in
    /// flight). Removed endpoints finish what they have in flight and close.
    pub fn rebuild(
        config: UpstreamConfig,
        tls: Option<crate::tls::ClientTls>,
        old: Option<&Upstream>,
    ) -> Self {
        if let Some(t) = &config.tls {
            if t.insecure_skip_verify {
                tracing::warn!(
                    upstream = %config.name,
                    "tls.insecure_skip_verify is set: the upstream's certificate is NOT verified; \
                     anyone on the path can impersonate it"
                );
            }
        }
        // Endpoints can be kept only from an upstream whose pools, circuits, worker settings
        // and TLS are the same.
        let kept = old.filter(|o| {
            o.config.pool == config.pool
                && o.config.circuit == config.circuit
                && o.config.worker_header == config.worker_header
                && o.config.worker_probe == config.worker_probe
                && o.config.tls == config.tls
                && o.tls == tls
        });
        let old_list = kept.map(|o| o.endpoints.load_full());
        // Discovered endpoints carry on when what they are made from did not change.
        let rediscovered = match (kept, &config.discovery, &old_list) {
            (Some(o), Some(d), Some(list))
                if o.config.endpoints == config.endpoints
                    && o.config.discovery.as_ref().map(|x| x.endpoint_concurrency)
                        == Some(d.endpoint_concurrency) =>
            {
                Some(list.to_vec())
            }
            _ => None,
        };
        let endpoints: Vec<Arc<Endpoint>> = rediscovered.unwrap_or_else(|| {
            config
                .endpoints
                .iter()
                .map(|e| {
                    old_list
                        .as_ref()
                        .and_then(|l| l.iter().find(|k| k.config == *e))
                        .cloned()
                        .unwrap_or_else(|| Endpoint::start(&config, e, tls.as_ref()))
                })
                .collect()
        });
        let host_header = http::HeaderValue::from_str(&config.endpoints[0].authority()).ok();
        let host_per_endpoint =
            !config.preserve_host && config.discovery.is_none() && config.endpoints.len() > 1;
        let name = config.name.clone();
        let up = Upstream {
            config,
            endpoints: ArcSwap::from_pointee(endpoints),
            tls,
            host_header,
            host_per_endpoint,
            next: AtomicUsize::new(0),
            capacity: AtomicUsize::new(usize::MAX),
            watchers: Mutex::new(Vec::new()),
            changed: Notify::new(),
            connected_once: std::sync::atomic::AtomicBool::new(
                old.is_some_and(Upstream::ever_connected),
            ),
            gauges: Gauges {
                circuit_open: metrics::gauge!("breakwater_circuit_open", "upstream" => name.clone()),
                in_service: metrics::gauge!("breakwater_upstream_endpoints", "upstream" => name.clone(), "state" => "in_service"),
                ejected: metrics::gauge!("breakwater_upstream_endpoints", "upstream" => name.clone(), "state" => "ejected"),
                capacity: metrics::gauge!("breakwater_upstream_capacity", "upstream" => name),
            },
        };
        up.recompute();
        up
    }

    /// Called once the upstream is shared: its endpoints tell it of their health from now on,
    /// whichever upstream sees the change (an endpoint kept across a reload is also the old
    /// table's, whose requests in flight still report to it); and kept endpoints that arrive
    /// ejected have their return watched.
    pub fn watch_returns(self: &Arc<Self>) {
        let now = Instant::now();
        for e in self.endpoints.load().iter() {
            e.owned_by(self);
            if let Standing::Ejected(until) = e.health.standing(now) {
                self.wake_at(until);
            }
        }
    }

    /// Every upstream `e` belongs to recomputes its capacity (and, when `e` was ejected, watches
    /// for its return).
    fn health_changed(self: &Arc<Self>, e: &Arc<Endpoint>) {
        let ejected_until = match e.health.standing(Instant::now()) {
            Standing::Ejected(until) => Some(until),
            _ => None,
        };
        let others = e.owners();
        for up in std::iter::once(self.clone())
            .chain(others.into_iter().filter(|o| !Arc::ptr_eq(o, self)))
        {
            up.recompute();
            if let Some(until) = ejected_until {
                up.wake_at(until);
            }
        }
    }

    /// The endpoints in use now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Tells `admission` whenever this upstream's capacity changes.
    pub fn watch(&self, admission: &Arc<Admission>) {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|a| a.strong_count() > 0);
        if !w
            .iter()
            .any(|a| std::ptr::eq(a.as_ptr(), Arc::as_ptr(admission)))
        {
            w.push(Arc::downgrade(admission));
        }
    }

    /// What the endpoints in service take together right now (`usize::MAX`: no bound).
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Acquire)
    }

    /// Whether any endpoint has ever been connected to (readiness can wait for it).
    pub fn ever_connected(&self) -> bool {
        // Sticky: endpoints that discovery (or a reload) brings in later start unconnected, and
        // readiness must not flip back for them.
        if self.connected_once.load(Ordering::Relaxed) {
            return true;
        }
        let now = self
            .endpoints
            .load()
            .iter()
            .any(|e| e.connector.ever_connected());
        if now {
            self.connected_once.store(true, Ordering::Relaxed);
        }
        now
    }

    /// Refuses at once (`circuit_open`) while every endpoint is ejected; Retry-After is when the
    /// first one is probed again.
    pub fn check(&self) -> Result<(), ProxyError> {
        if self.capacity() > 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut back = None::<Instant>;
        for e in self.endpoints.load().iter() {
            match e.health.standing(now) {
                Standing::Ejected(until) => back = Some(back.map_or(until, |b| b.min(until))),
                _ => {
                    // A cooldown ended before its timer ran: the capacity catches up now.
                    self.recompute();
                    return Ok(());
                }
            }
        }
        let wait = back.map_or(Duration::ZERO, |b| b.saturating_duration_since(now));
        Err(crate::circuit::refused(wait))
    }

    /// Waits (at most `limit`) until every endpoint's pool holds its `min_idle` connections, so
    /// the first burst does not pay for connects. Returns whether it got there.
    pub async fn warm_up(&self, limit: Duration) -> bool {
        let endpoints = self.endpoints.load_full();
        let all = endpoints.iter().map(|e| e.warm_up(limit));
        futures_util::future::join_all(all)
            .await
            .into_iter()
            .all(|warm| warm)
    }

    /// Sends `req` once: to an endpoint with a free slot (avoiding `avoid`, the endpoint a
    /// previous attempt failed on, when another will do), on one connection, with the answer's
    /// head due by `deadline`. Returns the head with the lease that keeps its connection and
    /// endpoint slot until the body is relayed. The endpoint's health learns from the outcome;
    /// whether a failed attempt is sent again is not decided here (see `crate::retry`).
    #[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
    pub fn send<'a>(
        self: &'a Arc<Self>,
        req: Request<RequestBody>,
        forwarding: &'a Forwarding,
        via: Via,
        deadline: Instant,
        avoid: Option<&'a Arc<Endpoint>>,
    ) -> impl std::future::Future<Output = Result<Answered, SendError>> + 'a {
        async move {
            let slot = match self.reserve(avoid, deadline).await {
                Ok(slot) => slot,
                Err(failure) => {
                    return Err(SendError {
                        failure,
                        unsent: Some(req),
                        endpoint: None,
                    })
                }
            };
            let endpoint = slot.endpoint().clone();
            let host = match &endpoint.host_header {
                Some(own) if self.host_per_endpoint => Some(own),
                _ => forwarding.host.as_ref(),
            };
            let added = h1::Added {
                forwarding: Some(forwarding),
                host,
                budget_ms: None,
            };
            let started = Instant::now();
            let attempt = self.exchange(&endpoint, req, added, via, deadline);
            match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => {
                    // Dropping the attempt dropped its connection mid-exchange, which closes it:
                    // the backend learns the caller is gone rather than working on for nobody.
                    // No answer in time counts against the endpoint only when another one
                    // answered meanwhile: a backend slow everywhere is the stall cap's to handle
                    // (see `crate::admission`), and ejecting every endpoint would only add
                    // cooldowns to its recovery.
                    let others_answer = self
                        .endpoints
                        .load()
                        .iter()
                        .any(|o| !Arc::ptr_eq(o, &endpoint) && o.answered_since(started));
                    if others_answer {
                        self.failed(&endpoint);
                    }
                    Err(SendError {
                        failure: SendFailure::TimedOut,
                        unsent: None,
                        endpoint: Some(endpoint),
                    })
                }
                Ok(Ok((head, held, written_at))) => {
                    let head_at = Instant::now();
                    endpoint.answered(head_at);
                    if head.status().is_server_error() {
                        self.failed(&endpoint);
                    } else {
                        self.succeeded(&endpoint);
                    }
                    Ok(Answered {
                        head,
                        lease: Lease {
                            held,
                            slot,
                            head_at,
                        },
                        written_at,
                    })
                }
                Ok(Err(mut e)) => {
                    // A pooled connection the peer had closed says nothing about the endpoint.
                    let stale = matches!(
                        e.failure,
                        SendFailure::NotWritten { reused: true, .. }
                            | SendFailure::ClosedBeforeAnswer { reused: true, .. }
                    );
                    if !stale {
                        self.failed(&endpoint);
                    }
                    e.endpoint = Some(endpoint);
                    Err(e)
                }
            }
        }
    }

    /// Whether another endpoint than `e` could take a request now.
    pub fn has_other(&self, e: &Arc<Endpoint>) -> bool {
        let now = Instant::now();
        self.endpoints
            .load()
            .iter()
            .any(|o| !Arc::ptr_eq(o, e) && o.capacity(now) > 0)
    }

    /// An endpoint slot, waiting while every endpoint in service is at its limit (routes sharing
    /// the upstream share its endpoints). Fails at once when every endpoint is ejected.
    async fn reserve(
        self: &Arc<Self>,
        avoid: Option<&Arc<Endpoint>>,
        deadline: Instant,
    ) -> Result<EndpointSlot, SendFailure> {
        loop {
            if let Some(slot) = self.pick(avoid) {
                return Ok(slot);
            }
            let now = Instant::now();
            let endpoints = self.endpoints.load_full();
            let out = |e: &Arc<Endpoint>| matches!(e.health.standing(now), Standing::Ejected(_));
            if endpoints.iter().all(out) {
                return Err(SendFailure::NoConnection(
                    "every endpoint of the upstream is ejected".into(),
                ));
            }
            // Counted and registered before looking again, so a slot freed in between is not
            // missed.
            let _waiting = Waiting::on(&endpoints);
            let mut waits: Vec<Pin<Box<tokio::sync::futures::Notified<'_>>>> = endpoints
                .iter()
                .map(|e| Box::pin(e.freed.notified()))
                .chain(std::iter::once(Box::pin(self.changed.notified())))
                .collect();
            for w in &mut waits {
                w.as_mut().enable();
            }
            if let Some(slot) = self.pick(avoid) {
                return Ok(slot);
            }
            let any = futures_util::future::select_all(waits);
            if tokio::time::timeout_at(deadline, any).await.is_err() {
                return Err(SendFailure::TimedOut);
            }
        }
    }

    /// The endpoint to send to, with its slot taken: among those in service with a free slot,
    /// the one with the fewest requests outstanding (ties at random) or the next in turn.
    fn pick(self: &Arc<Self>, avoid: Option<&Arc<Endpoint>>) -> Option<EndpointSlot> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 1 {
            return self.take(&endpoints[0]);
        }
        let now = Instant::now();
        let start = match self.config.balance {
            Balance::LeastOutstanding => fastrand::usize(..n),
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        // First without the endpoint to avoid, then with it when nothing else is in service.
        for pass in 0..2 {
            let mut best: Option<(&Arc<Endpoint>, usize)> = None;
            for k in 0..n {
                let e = &endpoints[(start + k) % n];
                if pass == 0 && avoid.is_some_and(|a| Arc::ptr_eq(a, e)) {
                    continue;
                }
                if !e.has_room() || e.capacity(now) == 0 {
                    continue;
                }
                let outstanding = e.outstanding();
                if best.is_none_or(|(_, b)| outstanding < b) {
                    best = Some((e, outstanding));
                }
                if self.config.balance == Balance::RoundRobin {
                    break;
                }
            }
            if let Some(slot) = best.and_then(|(e, _)| self.take(e)) {
                return Some(slot);
            }
            // Back to the endpoint that failed only when no other is in service; one that is
            // merely busy is waited for.
            if avoid.is_none_or(|a| self.has_other(a)) {
                break;
            }
        }
        None
    }

    fn failed(self: &Arc<Self>, e: &Arc<Endpoint>) {
        if e.health.record_failure() {
            self.health_changed(e);
        }
    }

    fn succeeded(self: &Arc<Self>, e: &Arc<Endpoint>) {
        if e.health.record_success() {
            self.health_changed(e);
        }
    }

    /// Recomputes the capacity once an ejected endpoint's cooldown is over (it takes probes).
    fn wake_at(self: &Arc<Self>, at: Instant) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(self);
        rt.spawn(async move {
            let mut at = at;
            loop {
                tokio::time::sleep_until(at).await;
                let Some(up) = weak.upgrade() else { return };
                up.recompute();
                // Woken a moment early, or ejected again meanwhile: wait for the new end.
                let now = Instant::now();
                let next = up
                    .endpoints
                    .load()
                    .iter()
                    .filter_map(|e| match e.health.standing(now) {
                        Standing::Ejected(until) => Some(until),
                        _ => None,
                    })
                    .min();
                match next {
                    Some(until) if up.capacity() == 0 => at = until,
                    _ => return,
                }
            }
        });
    }

    /// Recomputes the capacity from the endpoints' states, publishes it, and tells the routes'
    /// admissions and any request waiting for an endpoint.
    fn recompute(&self) {
        let now = Instant::now();
        let mut capacity = 0usize;
        let mut ejected = 0;
        let mut probing_only = true;
        let endpoints = self.endpoints.load();
        for e in endpoints.iter() {
            match e.health.standing(now) {
                Standing::Ejected(_) => ejected += 1,
                Standing::Closed => probing_only = false,
                Standing::Probing(_) => {}
            }
            capacity = capacity.saturating_add(e.capacity(now));
        }
        let before = self.capacity.swap(capacity, Ordering::AcqRel);
        let g = &self.gauges;
        g.circuit_open.set(if probing_only { 1.0 } else { 0.0 });
        g.ejected.set(ejected as f64);
        g.in_service.set((endpoints.len() - ejected) as f64);
        g.capacity.set(if capacity == usize::MAX {
            f64::INFINITY
        } else {
            capacity as f64
        });
        if before == capacity {
            return;
        }
        let watchers: Vec<Arc<Admission>> = self
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for a in watchers {
            a.capacity_changed();
        }
        self.changed.notify_waiters();
    }

    /// One exchange on one connection to `endpoint`.
    #[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
    fn exchange<'a>(
        &'a self,
        endpoint: &'a Endpoint,
        req: Request<RequestBody>,
        mut added: h1::Added<'a>,
        via: Via,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<Exchanged, SendError>> + 'a {
        async move {
            let no_connection = |why: String, req| SendError {
                failure: SendFailure::NoConnection(why),
                unsent: Some(req),
                endpoint: None,
            };
            // Counted at its worker until the answer's head: the worker is free again from there.
            let mut turn = None;
            let mut held = match via {
                Via::Pool => match endpoint.acquire().await {
                    Ok((c, at)) => {
                        turn = at;
                        Held::Pooled(c)
                    }
                    Err(why) => return Err(no_connection(why, req)),
                },
                // Boxed: opening a connection (resolving, connecting, TLS) is a large future, and
                // only resends open one here; inline it would make every request's future that
                // much larger, and every request moves its future around whole.
                Via::Fresh => match Box::pin(endpoint.dedicated()).await {
                    Ok(conn) => Held::Fresh {
                        conn,
                        pool: endpoint.pool.clone(),
                    },
                    Err(why) => return Err(no_connection(why, req)),
                },
            };
            let conn = held.conn();
            conn.clock.set_busy();
            let reused = via == Via::Pool && conn.may_be_stale();
            let written_at = Instant::now();
            // The budget left at the moment the request goes out, waits for a slot and a
            // connection taken off.
            let left = deadline.saturating_duration_since(written_at);
            added.budget_ms = Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
            let sent = conn.io.send(req, &added).await;
            if let (Some(workers), Ok(resp)) = (&endpoint.workers, &sent) {
                let conn = held.conn();
                workers.learn(conn, resp.headers(), Instant::now());
            }
            drop(turn);
            match sent {
                Ok(resp) => {
                    let conn = held.conn();
                    let said = conn.io.said();
                    if let Some(timer) = said.idle_timeout {
                        endpoint.connector.idle_timer.observe(timer);
                    }
                    if said.closes {
                        conn.clock.mark_closing();
                    }
                    Ok((resp, held, written_at))
                }
                Err(h1::SendError::NotWritten { error, request }) => Err(SendError {
                    failure: SendFailure::NotWritten { error, reused },
                    unsent: Some(*request),
                    endpoint: None,
                }),
                Err(h1::SendError::Written { error, unanswered }) => {
                    let failure = if unanswered && error.closed_before_answer() {
                        SendFailure::ClosedBeforeAnswer { error, reused }
                    } else {
                        SendFailure::Failed(error)
                    };
                    Err(SendError {
                        failure,
                        unsent: None,
                        endpoint: None,
                    })
                }
            }
        }
    }
}

/// A request waiting for an endpoint slot, counted at every endpoint while it waits.
struct Waiting<'a>(&'a [Arc<Endpoint>]);

impl<'a> Waiting<'a> {
    fn on(endpoints: &'a [Arc<Endpoint>]) -> Self {
        for e in endpoints {
            e.waiting.fetch_add(1, Ordering::SeqCst);
        }
        Waiting(endpoints)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        for e in self.0 {
            e.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Upstream {
    /// `e`'s slot, when its circuit lets a request through (taking a probe when it is probing,
    /// which changes the capacity).
    fn take(self: &Arc<Self>, e: &Arc<Endpoint>) -> Option<EndpointSlot> {
        if !e.has_room() {
            return None;
        }
        let probing = !e.health.is_closed();
        let allowed = e.health.check().is_ok();
        if probing {
            self.health_changed(e);
        }
        if !allowed {
            return None;
        }
        e.try_reserve()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::net::SocketAddr;

    fn upstream(endpoints: usize) -> Arc<Upstream> {
        let list: String = (0..endpoints)
            .map(|i| format!("{{ url: \"http://127.0.0.1:{}\" }},", 9 + i))
            .collect();
        let yaml = format!(
            "upstreams:\n  app:\n    endpoints: [{list}]\n    pool: {{ min_idle: 0 }}\n    circuit: {{ consecutive_failures: 1, cooldown: 5s }}\nroutes:\n  - {{ name: r, upstream: app }}\n"
        );
        let config = crate::config::from_yaml(&yaml, Vec::new()).expect("valid");
        let up = config.upstreams["app"].clone();
        Arc::new(Upstream::new(up, None))
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_back_does_not_leave_the_upstream_shut() {
        let up = upstream(1);
        let e = up.endpoints()[0].clone();
        up.failed(&e);
        assert_eq!(up.capacity(), 0);
        assert!(up.check().is_err());
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(up.capacity(), 1, "probing after the cooldown");
        // The probe goes out and is never heard of again (its caller left).
        let probe = up.pick(None).expect("the probe's slot");
        drop(probe);
        assert_eq!(up.capacity(), 0, "its one probe is out");
        assert!(up.pick(None).is_none());
        // A new round of probes after another cooldown, whether or not a timer saw it.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(up.check().is_ok());
        assert_eq!(up.capacity(), 1);
        let probe = up.pick(None).expect("a new probe");
        drop(probe);
        up.succeeded(&e);
        assert_eq!(up.capacity(), usize::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn least_outstanding_spreads_and_skips_ejected_endpoints() {
        let up = upstream(3);
        let slots: Vec<_> = (0..3).map(|_| up.pick(None).unwrap()).collect();
        let mut used: Vec<*const Endpoint> =
            slots.iter().map(|s| Arc::as_ptr(s.endpoint())).collect();
        used.sort();
        used.dedup();
        assert_eq!(
            used.len(),
            3,
            "one request on each before any gets a second"
        );
        drop(slots);
        let bad = up.endpoints()[1].clone();
        up.failed(&bad);
        for _ in 0..20 {
            let s = up.pick(None).unwrap();
            assert!(!Arc::ptr_eq(s.endpoint(), &bad));
        }
    }

    /// Answers what the test last set.
    struct Fixed(Mutex<io::Result<Vec<SocketAddr>>>);

    impl Resolve for Fixed {
        fn resolve<'a>(
            &'a self,
            _: &'a str,
            _: u16,
        ) -> Pin<Box<dyn std::future::Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>
        {
            let now = match &*self.0.lock().unwrap() {
                Ok(a) => Ok(a.clone()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            Box::pin(async move { now })
        }
    }

    fn addrs(list: &[&str]) -> io::Result<Vec<SocketAddr>> {
        Ok(list.iter().map(|a| a.parse().unwrap()).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_makes_an_endpoint_of_every_address_and_follows_them() {
        let yaml = "upstreams:\n  app:\n    url: http://svc.internal:8000\n    discovery: { every: 1s, endpoint_concurrency: 2 }\n    pool: { min_idle: 0 }\nroutes:\n  - { name: r, upstream: app }\n";
        let config = crate::config::from_yaml(yaml, Vec::new()).expect("valid");
        let up = Arc::new(Upstream::new(config.upstreams["app"].clone(), None));
        assert_eq!(up.host_header.as_ref().unwrap(), "svc.internal:8000");
        let resolver = Arc::new(Fixed(Mutex::new(addrs(&[
            "10.0.0.2:8000",
            "10.0.0.1:8000",
            "10.0.0.1:8000",
        ]))));
        up.discover_with(resolver.clone());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let labels = |up: &Upstream| -> Vec<String> {
            up.endpoints().iter().map(|e| e.label.to_string()).collect()
        };
        assert_eq!(labels(&up), ["10.0.0.1:8000", "10.0.0.2:8000"]);
        assert_eq!(up.capacity(), 4);
        let kept = up.endpoints()[1].clone();

        *resolver.0.lock().unwrap() = addrs(&["10.0.0.2:8000", "10.0.0.3:8000"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(labels(&up), ["10.0.0.2:8000", "10.0.0.3:8000"]);
        assert!(
            Arc::ptr_eq(&up.endpoints()[0], &kept),
            "an address that stays keeps its endpoint"
        );

        // A name that stops resolving, or resolves to nothing, leaves the endpoints as they were.
        *resolver.0.lock().unwrap() = Err(io::Error::other("SERVFAIL"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        *resolver.0.lock().unwrap() = addrs(&[]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(labels(&up), ["10.0.0.2:8000", "10.0.0.3:8000"]);
        assert_eq!(up.capacity(), 4);

        // Ejected endpoints and discovery together: the capacity is the discovered ones in service.
        for _ in 0..5 {
            up.failed(&kept);
        }
        assert_eq!(up.capacity(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_kept_by_a_reload_reports_to_both_tables() {
        let yaml = "upstreams:\n  app:\n    endpoints: [{ url: \"http://127.0.0.1:9\", concurrency: 1 }, { url: \"http://127.0.0.1:10\", concurrency: 1 }]\n    pool: { min_idle: 0 }\n    circuit: { consecutive_failures: 1, cooldown: 5s }\nroutes:\n  - { name: r, upstream: app }\n";
        let config = crate::config::from_yaml(yaml, Vec::new()).expect("valid");
        let old = Arc::new(Upstream::new(config.upstreams["app"].clone(), None));
        old.watch_returns();
        let mut changed = old.config.clone();
        changed.balance = Balance::RoundRobin;
        let new = Arc::new(Upstream::rebuild(changed, None, Some(&old)));
        new.watch_returns();
        let kept = new.endpoints()[0].clone();
        assert!(
            Arc::ptr_eq(&kept, &old.endpoints()[0]),
            "kept by the reload"
        );
        assert_eq!(new.capacity(), 2);
        // A request still running under the old table ejects it: the new table knows at once.
        old.failed(&kept);
        assert_eq!((old.capacity(), new.capacity()), (1, 1));
        // Its cooldown ends for both, and a success seen by the old table brings it back for both.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(new.capacity(), 2, "probing");
        old.succeeded(&kept);
        assert_eq!((old.capacity(), new.capacity()), (2, 2));
    }
}
