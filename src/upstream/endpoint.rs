//! One server of an upstream: its pool of keep-alive connections, how many requests it has in
//! flight against its own `concurrency`, and its health (a circuit of its own).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Poll;
use std::time::Duration;

use bb8::{Pool, PooledConnection};
use metrics::{Counter, Gauge};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::connector::{ConnectError, ConnectorState, QuietErrors, TlsTarget};
use super::workers::{Pick, Pinned, Turn, Workers};
use super::{Connector, UpstreamConn};
use crate::circuit::{Circuit, Standing};
use crate::config::{EndpointConfig, UpstreamConfig};

pub struct Endpoint {
    pub config: EndpointConfig,
    /// `host:port`: the endpoint in metrics, logs and `/config`.
    pub label: Arc<str>,
    /// The upstream's name, for logs.
    pub upstream: Arc<str>,
    /// `label` as a Host header, for upstreams whose endpoints each get their own.
    pub(super) host_header: Option<http::HeaderValue>,
    pub pool: Pool<Connector>,
    pub connector: Arc<ConnectorState>,
    pub health: Circuit,
    /// Idle connections the pool keeps open.
    min_idle: u32,
    /// Requests holding a slot here: from being sent until their answer is relayed.
    outstanding: AtomicUsize,
    /// Woken when a slot here is given back while `waiting` says someone waits for one.
    pub(super) freed: Notify,
    /// Requests waiting for a slot at any endpoint of the upstream (they wait on every one), so a
    /// slot given back with nobody waiting costs no wake-up.
    pub(super) waiting: AtomicUsize,
    inflight: Gauge,
    requests: Counter,
    /// When it last answered (nanoseconds since `epoch()`; 0: never).
    answered_at: AtomicU64,
    /// The upstreams it belongs to (more than one while a reload's old table is still in use).
    owners: Mutex<Vec<Weak<super::Upstream>>>,
    /// The backend's workers behind this address, when its answers name them.
    pub(super) workers: Option<Arc<Workers>>,
    max_connections: u32,
}

/// A fixed origin for instants kept in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

impl Endpoint {
    /// Builds the endpoint and starts its background work: opening its idle connections and,
    /// with `worker_probe`, meeting the backend's workers.
    pub fn start(
        up: &UpstreamConfig,
        config: &EndpointConfig,
        tls: Option<&crate::tls::ClientTls>,
    ) -> Arc<Self> {
        let e = Arc::new(Endpoint::new(up, config, tls));
        if let Some(w) = e.workers.as_ref().filter(|w| w.probe.is_some()) {
            w.belongs_to(&e);
            tokio::spawn(super::workers::explore(Arc::downgrade(&e)));
        }
        e
    }

    /// Builds the endpoint's pool and starts opening its idle connections in the background.
    fn new(
        up: &UpstreamConfig,
        config: &EndpointConfig,
        tls: Option<&crate::tls::ClientTls>,
    ) -> Self {
        let label: Arc<str> = Arc::from(config.authority());
        let mut connector =
            Connector::new(&up.name, &config.host, config.port, up.pool.connect_timeout);
        if let (Some(client), Some(name)) = (tls, &config.tls_name) {
            connector = connector.with_tls(TlsTarget {
                connector: tokio_rustls::TlsConnector::from(client.config()),
                name: name.clone(),
            });
        }
        let state = connector.state.clone();
        // Workers behind one port are uvicorn's or gunicorn's, which leave Nagle's algorithm
        // on (see `super::quickack`): acknowledging at once from the first answer spares the
        // first answers the delayed ACK the policy would otherwise learn from.
        if up.worker_header.is_some() {
            state.acks.switch_on();
        }
        let p = &up.pool;
        // An endpoint that takes one request at a time has no use for more idle connections
        // than that.
        let min_idle = config
            .concurrency
            .map_or(p.min_idle, |c| p.min_idle.min(c as u32));
        let pool = Pool::builder()
            .max_size(p.max_connections)
            .min_idle(Some(min_idle))
            .idle_timeout(Some(p.idle_timeout))
            .max_lifetime(Some(p.max_lifetime))
            // Waiting for a connection is bounded by the request's own budget; this only stops a
            // waiter from outliving any sensible budget.
            .connection_timeout(Duration::from_secs(120))
            .retry_connection(false)
            .test_on_check_out(true)
            // The most recently used idle connection is the furthest from the peer's idle
            // timer, so the least likely to be closed as a request goes out on it.
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .reaper_rate(reaper_rate(p.idle_timeout))
            .error_sink(Box::new(QuietErrors))
            .build_unchecked(connector);
        let labels = [
            ("upstream", up.name.clone()),
            ("endpoint", label.to_string()),
        ];
        Endpoint {
            config: config.clone(),
            health: Circuit::new(&up.name, &label, &up.circuit),
            host_header: http::HeaderValue::from_str(&label).ok(),
            label: label.clone(),
            upstream: Arc::from(up.name.as_str()),
            min_idle,
            pool,
            connector: state,
            outstanding: AtomicUsize::new(0),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
            inflight: metrics::gauge!("breakwater_endpoint_inflight", &labels),
            requests: metrics::counter!("breakwater_endpoint_requests_total", &labels),
            answered_at: AtomicU64::new(0),
            owners: Mutex::new(Vec::new()),
            workers: up
                .worker_header
                .clone()
                .map(|h| Arc::new(Workers::new(h, up.worker_probe.clone(), &up.name, &label))),
            max_connections: p.max_connections,
        }
    }

    /// `up` is told of its health changes from now on.
    pub(super) fn owned_by(&self, up: &Arc<super::Upstream>) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.retain(|o| o.strong_count() > 0);
        if !owners
            .iter()
            .any(|o| std::ptr::eq(o.as_ptr(), Arc::as_ptr(up)))
        {
            owners.push(Arc::downgrade(up));
        }
    }

    /// The upstreams it belongs to that are still in use.
    pub(super) fn owners(&self) -> Vec<Arc<super::Upstream>> {
        let owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.iter().filter_map(Weak::upgrade).collect()
    }

    /// An answer head arrived from it now.
    pub(super) fn answered(&self, now: Instant) {
        self.answered_at
            .store(since_epoch(now).max(1), Ordering::Relaxed);
    }

    /// Whether it answered after `t`.
    pub(super) fn answered_since(&self, t: Instant) -> bool {
        self.answered_at.load(Ordering::Relaxed) > since_epoch(t)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    pub(super) fn has_room(&self) -> bool {
        self.config
            .concurrency
            .is_none_or(|c| self.outstanding() < c)
    }

    /// How many more requests this endpoint takes at `now` (`usize::MAX`: no limit of its own).
    pub(super) fn capacity(&self, now: Instant) -> usize {
        let limit = self
            .config
            .concurrency
            .unwrap_or(usize::MAX)
            .min(self.workers.as_ref().map_or(usize::MAX, |w| w.capacity()));
        match self.health.standing(now) {
            Standing::Closed => limit,
            Standing::Probing(n) => limit.min(n as usize),
            Standing::Ejected(_) => 0,
        }
    }

    /// Takes one of the endpoint's slots, if it has one free.
    pub(super) fn try_reserve(self: &Arc<Self>) -> Option<EndpointSlot> {
        let limit = self.config.concurrency.unwrap_or(usize::MAX);
        self.outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        self.inflight.increment(1.0);
        self.requests.increment(1);
        Some(EndpointSlot(self.clone()))
    }

    /// Waits (at most `limit`) until the pool holds its idle connections and, with
    /// `worker_probe`, until the first round of probes has met the workers: the first requests
    /// then go to free workers instead of wherever new connections land.
    pub async fn warm_up(&self, limit: Duration) -> bool {
        let want = self.min_idle;
        let deadline = Instant::now() + limit;
        loop {
            let met = self
                .workers
                .as_ref()
                .is_none_or(|w| w.probe.is_none() || w.explored());
            if self.pool.state().idle_connections >= want && met {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A connection from the pool, on a worker with nothing in flight when the upstream names
    /// its workers (see `super::workers`), with the request's turn at that worker; fails at once
    /// when connecting is failing and nothing is open that could come back.
    pub(super) async fn acquire(
        &self,
    ) -> Result<(PooledConnection<'static, Connector>, Option<Turn<'_>>), String> {
        let first = self.acquire_any().await?;
        let Some(workers) = &self.workers else {
            return Ok((first, None));
        };
        if let Some(turn) = workers.claim(first.worker) {
            workers.picked(Pick::Free);
            return Ok((first, Some(turn)));
        }
        // Boxed: looking further holds several connections and waits for more, a large state
        // that every request's future would carry (and copy) if it were inline.
        Box::pin(self.look_further(first, workers)).await
    }

    /// The first connection reaches a busy worker (or one not known yet): look at others.
    async fn look_further<'a>(
        &'a self,
        first: PooledConnection<'static, Connector>,
        workers: &'a Workers,
    ) -> Result<(PooledConnection<'static, Connector>, Option<Turn<'a>>), String> {
        // Connections looked at are held until a choice is made, so the pool hands out another
        // idle one, or opens a new one while it has room. A connection whose worker is not
        // known yet (new, or opened to replace one) may reach a busy worker: it is taken only
        // when no idle connection reaches a free one, and then no other is opened.
        let mut unknown = None;
        let mut passed = Vec::new();
        let mut next = first;
        loop {
            if next.worker == Pinned::Unknown && unknown.is_none() {
                unknown = Some(next);
            } else {
                passed.push(next);
            }
            let state = self.pool.state();
            let more = state.idle_connections > 0
                || (unknown.is_none() && state.connections < self.max_connections);
            if !more || passed.len() + usize::from(unknown.is_some()) >= MAX_LOOKED_AT {
                break;
            }
            match tokio::time::timeout(ANOTHER_WITHIN, self.acquire_any()).await {
                Ok(Ok(c)) => match workers.claim(c.worker) {
                    Some(turn) => {
                        workers.picked(Pick::Free);
                        return Ok((c, Some(turn)));
                    }
                    None => next = c,
                },
                _ => break,
            }
        }
        if let Some(c) = unknown {
            workers.picked(Pick::Unknown);
            return Ok((c, None));
        }
        workers.picked(Pick::Busy);
        let least = (0..passed.len())
            .min_by_key(|&i| workers.busy(passed[i].worker))
            .unwrap_or(0);
        let mut chosen = passed.swap_remove(least);
        // Every connection at hand reaches a busy worker and the pool is full: one of them is
        // closed, so the connection opened in its place may reach a worker not yet covered:
        // another one at once, or else the chosen one once its exchange is over.
        if self.pool.state().connections >= self.max_connections
            && workers.may_reroll(Instant::now())
        {
            match passed.first() {
                Some(other) => other.clock.set_busy(),
                None => chosen.retire = true,
            }
        }
        let turn = workers.start(chosen.worker);
        Ok((chosen, Some(turn)))
    }

    /// Adds `conn`, which reaches a worker no other connection does, to the pool; when the
    /// pool is full, an idle connection to a worker that has another (or to one not known) is
    /// closed to make room. Whether it was added.
    pub(super) async fn keep(&self, conn: UpstreamConn) -> bool {
        let conn = match self.pool.add(conn) {
            Ok(()) => return true,
            Err(bb8::AddError::Broken(_)) => return false,
            Err(bb8::AddError::NoCapacity(conn)) => conn,
        };
        let Some(workers) = &self.workers else {
            return false;
        };
        // Idle connections looked at are held until one is found, so the pool hands out others.
        let mut looked_at = Vec::new();
        while looked_at.len() < MAX_LOOKED_AT && self.pool.state().idle_connections > 0 {
            let Ok(Ok(spare)) = tokio::time::timeout(ANOTHER_WITHIN, self.acquire_any()).await
            else {
                break;
            };
            if spare.worker == Pinned::Unknown || workers.conns(spare.worker) > 1 {
                spare.clock.set_busy();
                drop(spare);
                return self.pool.add(conn).is_ok();
            }
            looked_at.push(spare);
        }
        false
    }

    async fn acquire_any(&self) -> Result<PooledConnection<'static, Connector>, String> {
        let get = self.pool.get_owned();
        tokio::pin!(get);
        // Read before the pool is first looked at: a connect that fails after that look and
        // before the wait below registers for `failed` woke nobody, and shows here instead.
        let mut failures_seen = self.connector.failures.load(Ordering::SeqCst);
        // Most checkouts find an idle connection at once; those register for nothing.
        let first = std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx))).await;
        if let Poll::Ready(got) = first {
            return got.map_err(|e| self.checkout_error(e));
        }
        loop {
            let failed = self.connector.failed.notified();
            tokio::pin!(failed);
            failed.as_mut().enable();
            if self.connector.failures.load(Ordering::SeqCst) != failures_seen {
                if let Some(why) = self.nothing_to_wait_for() {
                    return Err(why);
                }
            }
            tokio::select! {
                got = &mut get => return got.map_err(|e| self.checkout_error(e)),
                _ = &mut failed => {
                    failures_seen = self.connector.failures.load(Ordering::SeqCst);
                    if let Some(why) = self.nothing_to_wait_for() {
                        return Err(why);
                    }
                }
            }
        }
    }

    /// Why a checkout failed: the last connect failure says more than bb8's timeout.
    fn checkout_error(&self, e: bb8::RunError<ConnectError>) -> String {
        match self.connector.last_failure() {
            Some((_, err)) => err.to_string(),
            None => e.to_string(),
        }
    }

    /// After a connect failed: the answer for a request waiting for a connection, when no
    /// connection is open or opening that could still serve it.
    fn nothing_to_wait_for(&self) -> Option<String> {
        (self.pool.state().connections == 0).then(|| {
            self.connector
                .last_failure()
                .map(|(_, e)| e.to_string())
                .unwrap_or_else(|| "connect failed".into())
        })
    }

    /// A connection opened for one attempt, outside the pool (see `Via::Fresh`).
    pub(super) async fn dedicated(&self) -> Result<UpstreamConn, String> {
        self.pool
            .dedicated_connection()
            .await
            .map_err(|e| e.to_string())
    }
}

/// The most connections a request looks at for one whose worker is free.
const MAX_LOOKED_AT: usize = 8;

/// How long a request looking for a free worker waits for another connection before taking
/// the least busy one it has: an idle one is handed out at once, and a new one opens within
/// this on any network the gateway should sit on.
const ANOTHER_WITHIN: Duration = Duration::from_millis(20);

/// A request's slot at one endpoint; given back when dropped.
pub struct EndpointSlot(Arc<Endpoint>);

impl EndpointSlot {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for EndpointSlot {
    fn drop(&mut self) {
        // Sequentially consistent with the waiter's count and its own look at `outstanding`: either
        // it sees this slot free, or this sees it waiting.
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
        self.0.inflight.decrement(1.0);
        if self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.freed.notify_waiters();
        }
    }
}

/// How often idle connections are checked for `idle_timeout`: often enough that one is closed
/// well before a load balancer that idles out a little later than we do.
fn reaper_rate(idle_timeout: Duration) -> Duration {
    (idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(5))
}
