//! Which worker process of a backend each pooled connection reaches, for backends that name it
//! in a response header (`upstreams.<name>.worker_header`).
//!
//! A `uvicorn --workers N` (or gunicorn) backend's workers share one listening socket, and
//! whichever accepts a connection serves every request on it for its whole life. A pool that
//! does not know this puts its requests on connections that often share a worker: that worker
//! runs them one after another while others idle, and a third of the backend is lost
//! (`docs/architecture.md`, "Workers behind one port"). The gateway cannot see where the kernel
//! put a connection, but a backend can say in one line of middleware which worker answered (its
//! pid). With that, each connection learns its worker from its first answer, and the book here
//! counts, per worker, the requests sent to it that have not been answered yet. A request then
//! takes an idle connection whose worker has nothing in flight, passing over the others; when
//! no idle connection reaches a free worker, it takes a new connection (the kernel puts it on
//! some worker, maybe a free one), and when the pool is full, one connection to a busy worker is
//! closed so that the next one opened may land elsewhere. Once each worker has a connection, a
//! connection given back is the one whose worker just came free, and the pool hands it out
//! first (LIFO), so the spread holds without further churn.
//!
//! New connections land where the backend's shared accept puts them, which favours the same
//! workers, so meeting every worker through requests alone can take long. With `worker_probe`
//! the explorer (`explore`, below) meets them in the background with a cheap request on each
//! new connection, keeping one connection per worker; and the workers in service become the
//! endpoint's capacity, one request each (`Workers::capacity`), so a route never admits more
//! than the workers can run.
//!
//! A connection whose answers name different workers is not pinned (a load balancer in between
//! picks per request): it is left out of the book, and a warning says the header does not help.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName};
use metrics::{Counter, Gauge};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Endpoint, UpstreamConn};

/// A worker with no connection that no answer named for this long is forgotten (a restarted
/// worker has a new name).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The least time between two connections closed to reach another worker: when every worker
/// really is busy, closing connections would only churn.
const REROLL_EVERY: Duration = Duration::from_millis(100);

/// What a connection knows of the worker it reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pinned {
    /// No answer on it named a worker yet.
    #[default]
    Unknown,
    To(u64),
    /// Its answers named different workers: something between picks per request.
    Unpinned,
}

/// How a request's connection was chosen, counted in `breakwater_endpoint_worker_picks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Its worker had nothing in flight.
    Free,
    /// Its worker was not known yet (a new connection).
    Unknown,
    /// Every connection tried reached a busy worker; the least busy was taken.
    Busy,
}

struct Worker {
    id: u64,
    /// Requests sent to it whose answer's head has not arrived.
    busy: u32,
    /// Open connections known to reach it.
    conns: u32,
    seen: Instant,
}

pub struct Workers {
    pub header: HeaderName,
    /// Sent on new connections in the background to meet the workers (`worker_probe`).
    pub probe: Option<PathAndQuery>,
    /// Wakes the explorer: a request found no connection to a free worker.
    explore: Notify,
    /// The explorer's first session is over.
    explored: AtomicBool,
    /// The most workers with an open connection there have been.
    most_met: AtomicUsize,
    /// A request chose a connection since the explorer last looked.
    traffic: AtomicBool,
    /// The endpoint, told when `met` changes (its capacity follows it).
    endpoint_ref: OnceLock<Weak<Endpoint>>,
    probes: [Counter; 3],
    book: Mutex<Book>,
    warned_unpinned: AtomicBool,
    known: Gauge,
    picks: [Counter; 3],
    rerolls: Counter,
    upstream: String,
    endpoint: String,
}

#[derive(Default)]
struct Book {
    workers: Vec<Worker>,
    rerolled_at: Option<Instant>,
}

impl Book {
    fn find(&mut self, id: u64) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.id == id)
    }

    /// The worker `id`, entered with nothing in flight and no connection if it was not known
    /// (or forgotten while its connection idled).
    fn entry(&mut self, id: u64, now: Instant) -> &mut Worker {
        match self.workers.iter().position(|w| w.id == id) {
            Some(i) => &mut self.workers[i],
            None => {
                self.workers.push(Worker {
                    id,
                    busy: 0,
                    conns: 0,
                    seen: now,
                });
                self.workers.last_mut().expect("just pushed")
            }
        }
    }

    /// Workers with at least one open connection.
    fn met(&self) -> usize {
        self.workers.iter().filter(|w| w.conns > 0).count()
    }
}

impl Workers {
    pub fn new(
        header: HeaderName,
        probe: Option<PathAndQuery>,
        upstream: &str,
        endpoint: &str,
    ) -> Self {
        let labels = [
            ("upstream", upstream.to_string()),
            ("endpoint", endpoint.to_string()),
        ];
        let pick = |p: &'static str| {
            let mut l = labels.to_vec();
            l.push(("pick", p.to_string()));
            metrics::counter!("breakwater_endpoint_worker_picks_total", &l)
        };
        let probe_result = |r: &'static str| {
            let mut l = labels.to_vec();
            l.push(("result", r.to_string()));
            metrics::counter!("breakwater_endpoint_worker_probes_total", &l)
        };
        Workers {
            header,
            probe,
            explore: Notify::new(),
            explored: AtomicBool::new(false),
            most_met: AtomicUsize::new(0),
            traffic: AtomicBool::new(false),
            endpoint_ref: OnceLock::new(),
            probes: [
                probe_result("kept"),
                probe_result("known"),
                probe_result("failed"),
            ],
            book: Mutex::new(Book::default()),
            warned_unpinned: AtomicBool::new(false),
            known: metrics::gauge!("breakwater_endpoint_workers", &labels),
            picks: [pick("free"), pick("unknown"), pick("busy")],
            rerolls: metrics::counter!("breakwater_endpoint_worker_rerolls_total", &labels),
            upstream: upstream.to_string(),
            endpoint: endpoint.to_string(),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests in flight at the worker `pinned` reaches (0 when it is not known).
    pub fn busy(&self, pinned: Pinned) -> u32 {
        match pinned {
            Pinned::To(id) => self.book().find(id).map_or(0, |w| w.busy),
            Pinned::Unknown | Pinned::Unpinned => 0,
        }
    }

    /// The endpoint whose capacity follows the workers met.
    pub(super) fn belongs_to(&self, endpoint: &Arc<Endpoint>) {
        let _ = self.endpoint_ref.set(Arc::downgrade(endpoint));
    }

    /// With `worker_probe`, what the endpoint takes at once: one request per worker in service,
    /// once it has met any (`usize::MAX`: no limit from here). A worker is in service while the
    /// pool has a connection to it, and for [`LOST_GRACE`] after it last answered: a worker
    /// whose only connection closed (an abandoned request, a reset) is not taken out while the
    /// explorer meets it again, and one that died drops out when the grace ends.
    pub fn capacity(&self) -> usize {
        if self.probe.is_none() {
            return usize::MAX;
        }
        let book = self.book();
        if book.met() == 0 {
            return usize::MAX;
        }
        let now = Instant::now();
        let in_service = book
            .workers
            .iter()
            .filter(|w| w.conns > 0 || now.saturating_duration_since(w.seen) < LOST_GRACE)
            .count();
        in_service.max(1)
    }

    /// A worker gained its first connection (`up`) or lost its last one.
    fn met_changed(&self, up: bool) {
        if up {
            let met = self.book().met();
            self.most_met.fetch_max(met, Ordering::AcqRel);
        } else {
            // A worker lost (restarted, or its connections idled out under traffic): look for
            // it, or its successor, while requests come; the capacity follows once its grace
            // is over.
            if self.traffic.load(Ordering::Relaxed) {
                self.explore.notify_one();
            }
            if self.probe.is_some() {
                if let Some(e) = self.endpoint_ref.get().cloned() {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move {
                            tokio::time::sleep(LOST_GRACE).await;
                            recompute_owners(&e);
                        });
                    }
                }
            }
            return;
        }
        if self.probe.is_some() {
            if let Some(e) = self.endpoint_ref.get() {
                recompute_owners(e);
            }
        }
    }

    /// Whether the explorer's first session is over (see `Endpoint::warm_up`).
    pub fn explored(&self) -> bool {
        self.explored.load(Ordering::Acquire)
    }

    pub fn picked(&self, pick: Pick) {
        self.picks[pick as usize].increment(1);
        if !self.traffic.load(Ordering::Relaxed) {
            self.traffic.store(true, Ordering::Relaxed);
        }
        if pick != Pick::Free {
            self.explore.notify_one();
        }
    }

    /// Whether a connection to a busy worker may be closed now to reach another (at most one per
    /// [`REROLL_EVERY`]); counts it when so.
    pub fn may_reroll(&self, now: Instant) -> bool {
        let mut book = self.book();
        if book
            .rerolled_at
            .is_some_and(|t| now.saturating_duration_since(t) < REROLL_EVERY)
        {
            return false;
        }
        book.rerolled_at = Some(now);
        self.rerolls.increment(1);
        true
    }

    /// A turn at `pinned` if that worker has nothing in flight, taken in the same look so two
    /// requests choosing at once cannot both take it.
    pub fn claim(&self, pinned: Pinned) -> Option<Turn<'_>> {
        let Pinned::To(id) = pinned else {
            return None;
        };
        let mut book = self.book();
        let w = book.entry(id, Instant::now());
        if w.busy > 0 {
            return None;
        }
        w.busy = 1;
        Some(Turn(Some((self, id))))
    }

    /// A request goes out on a connection that reaches `pinned`: it is counted there until the
    /// returned turn is dropped (at the answer's head, or when the attempt ends without one).
    pub fn start(&self, pinned: Pinned) -> Turn<'_> {
        let id = match pinned {
            Pinned::To(id) => id,
            Pinned::Unknown | Pinned::Unpinned => return Turn(None),
        };
        self.book().entry(id, Instant::now()).busy += 1;
        Turn(Some((self, id)))
    }

    /// What `conn` learns from an answer with `headers` that arrived at `now`: the worker it
    /// reaches, counted among that worker's connections while it is open.
    pub fn learn(self: &Arc<Self>, conn: &mut UpstreamConn, headers: &HeaderMap, now: Instant) {
        let before = conn.worker;
        conn.worker = self.learned(before, headers, now);
        match conn.worker {
            Pinned::To(id) if before == Pinned::Unknown => {
                conn.counted = Some(Counted(self.clone(), id));
            }
            Pinned::Unpinned => conn.counted = None,
            _ => {}
        }
    }

    /// What a connection that reached `pinned` knows after an answer with `headers` arrived at
    /// `now`; one that learns its worker here is counted among that worker's connections (the
    /// caller holds a [`Counted`] for it).
    fn learned(&self, pinned: Pinned, headers: &HeaderMap, now: Instant) -> Pinned {
        let Some(value) = headers.get(&self.header) else {
            return pinned;
        };
        let id = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            value.as_bytes().hash(&mut h);
            h.finish()
        };
        match pinned {
            Pinned::Unpinned => return Pinned::Unpinned,
            Pinned::To(old) if old != id => {
                if !self.warned_unpinned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        upstream = %self.upstream,
                        endpoint = %self.endpoint,
                        header = %self.header,
                        "answers on one connection name different workers: the upstream is \
                         not reached directly (a load balancer picks per request), so \
                         worker_header cannot spread requests"
                    );
                }
                // Its `Counted`, dropped by `learn`, takes it off the old worker's count.
                return Pinned::Unpinned;
            }
            _ => {}
        }
        let new_conn = u32::from(pinned == Pinned::Unknown);
        let mut book = self.book();
        let w = book.entry(id, now);
        w.seen = now;
        w.conns += new_conn;
        let first_conn = new_conn == 1 && w.conns == 1;
        book.workers.retain(|w| {
            w.busy > 0 || w.conns > 0 || now.saturating_duration_since(w.seen) < FORGET_AFTER
        });
        self.known.set(book.workers.len() as f64);
        drop(book);
        if first_conn {
            self.met_changed(true);
        }
        Pinned::To(id)
    }

    /// Open connections known to reach the worker `pinned` reaches.
    pub fn conns(&self, pinned: Pinned) -> u32 {
        match pinned {
            Pinned::To(id) => self.book().find(id).map_or(0, |w| w.conns),
            Pinned::Unknown | Pinned::Unpinned => 0,
        }
    }

    /// Workers named by an answer within the last minute (or with requests in flight).
    #[cfg(test)]
    fn known(&self) -> usize {
        self.book().workers.len()
    }

    fn finish(&self, id: u64) {
        if let Some(w) = self.book().find(id) {
            w.busy = w.busy.saturating_sub(1);
        }
    }
}

/// Every upstream the endpoint belongs to recomputes its capacity.
fn recompute_owners(endpoint: &Weak<Endpoint>) {
    if let Some(e) = endpoint.upgrade() {
        for up in e.owners() {
            up.recompute();
        }
    }
}

/// A connection counted among its worker's while it is open.
pub struct Counted(Arc<Workers>, u64);

impl Drop for Counted {
    fn drop(&mut self) {
        let last = match self.0.book().find(self.1) {
            Some(w) if w.conns > 0 => {
                w.conns -= 1;
                w.conns == 0
            }
            _ => false,
        };
        if last {
            self.0.met_changed(false);
        }
    }
}

/// A request counted at its worker until its answer's head arrives.
pub struct Turn<'a>(Option<(&'a Workers, u64)>);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some((workers, id)) = self.0.take() {
            workers.finish(id);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Meeting the workers before requests need them (`worker_probe`)

/// Probes at least this far apart: connections opened closer together are taken by one wake-up
/// of the same worker's accept loop.
const PROBE_SPACING: Duration = Duration::from_millis(5);
/// A probe not answered within this is given up (that worker's event loop is blocked).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A session ends after this many probes in a row that met no worker without a connection...
const MISSES_TO_STOP: u32 = 48;
/// ...or after this many probes.
const MAX_PROBES: u32 = 128;
/// Probes in a row that kept nothing after which the pool counts as having met the workers it
/// will soon (see `Workers::explored`); the session goes on for any it has not.
const SETTLED_AFTER: u32 = 16;
/// After a session that met no worker without a connection, the next waits twice as long as
/// the one before, from 1 s up to this.
const MAX_PAUSE: Duration = Duration::from_secs(60);
/// How long a worker with no connection left still counts in the capacity after it last
/// answered (see `Workers::capacity`).
const LOST_GRACE: Duration = Duration::from_secs(5);
/// How often an explorer with nothing to do looks whether a worker was lost.
const LOOK_AGAIN: Duration = Duration::from_secs(30);
/// The largest probe answer body read (the connection is kept only if it is read to the end).
const PROBE_BODY_LIMIT: usize = 64 * 1024;

/// The endpoint's explorer, for its life: a session of probes at once, and another whenever a
/// request found no connection to a free worker (after a pause of at least a second, longer
/// while sessions meet no worker without a connection).
///
/// Each probe opens a connection (the kernel puts it on some worker), sends `worker_probe` and
/// reads which worker answered. A connection to a worker that had none joins the pool; any other
/// is closed. So the pool meets every worker in tens of probes instead of waiting for requests
/// to land on them, which under uvicorn's skewed accept can take many rounds.
pub(super) async fn explore(endpoint: Weak<Endpoint>) {
    let mut pause = Duration::from_secs(1);
    let mut first = true;
    loop {
        let Some(workers) = endpoint.upgrade().and_then(|e| e.workers.clone()) else {
            return;
        };
        if !first {
            // Woken by a request or a lost worker; or now and then, to see whether the endpoint
            // is still in use, and to look again for a worker lost while requests kept coming
            // (one that restarts may not be up yet when its loss wakes the explorer).
            let woken = tokio::time::timeout(LOOK_AGAIN, workers.explore.notified());
            if woken.await.is_err() {
                let lost = workers.book().met() < workers.most_met.load(Ordering::Acquire);
                if !(lost && workers.traffic.swap(false, Ordering::Relaxed)) {
                    continue;
                }
            }
        }
        first = false;
        let Some(e) = endpoint.upgrade() else {
            return;
        };
        let kept = session(&e, &workers).await;
        workers.explored.store(true, Ordering::Release);
        drop(e);
        pause = if kept > 0 {
            Duration::from_secs(1)
        } else {
            (pause * 2).min(MAX_PAUSE)
        };
        tokio::time::sleep(pause).await;
    }
}

/// Probes until the pool holds a connection to every worker met; returns the connections kept.
async fn session(e: &Endpoint, workers: &Arc<Workers>) -> u32 {
    let Some(path) = workers.probe.clone() else {
        return 0;
    };
    let (mut kept, mut misses, mut sent) = (0, 0, 0);
    while misses < MISSES_TO_STOP && sent < MAX_PROBES {
        if misses == SETTLED_AFTER {
            // Gateway start need not wait for the rest of a long session.
            workers.explored.store(true, Ordering::Release);
        }
        sent += 1;
        match tokio::time::timeout(PROBE_TIMEOUT, probe(e, workers, &path)).await {
            Ok(Ok(conn)) if workers.conns(conn.worker) == 1 => {
                if e.keep(conn).await {
                    kept += 1;
                    misses = 0;
                    workers.probes[0].increment(1);
                } else {
                    misses += 1;
                    workers.probes[1].increment(1);
                }
            }
            // Dropped, so closed: its worker has a connection already.
            Ok(Ok(_)) => {
                misses += 1;
                workers.probes[1].increment(1);
            }
            Ok(Err(_)) | Err(_) => {
                misses += 1;
                workers.probes[2].increment(1);
            }
        }
        tokio::time::sleep(PROBE_SPACING).await;
    }
    kept
}

/// A new connection to the endpoint that has answered `path`, with the worker it reaches.
async fn probe(
    e: &Endpoint,
    workers: &Arc<Workers>,
    path: &PathAndQuery,
) -> Result<UpstreamConn, String> {
    let mut conn = e.dedicated().await?;
    // Busy while it is probed: its answer, should it wake the idle watch the connection has
    // had since it opened, is not the peer closing an idle connection (`super::idle`).
    conn.clock.set_busy();
    let req = http::Request::get(path.as_str())
        .header(http::header::HOST, e.label.as_ref())
        .header(http::header::USER_AGENT, "breakwater-worker-probe")
        .body(crate::body::full(bytes::Bytes::new()))
        .map_err(|err| err.to_string())?;
    let resp = conn
        .io
        .send(req, &Default::default())
        .await
        .map_err(|err| match err {
            super::h1::SendError::NotWritten { error, .. }
            | super::h1::SendError::Written { error, .. } => error.to_string(),
        })?;
    let reusable = !conn.io.said().closes;
    let (head, framing) = resp.into_parts();
    conn.io
        .collect(framing, PROBE_BODY_LIMIT)
        .await
        .map_err(|err| err.to_string())?;
    if !reusable || !conn.io.reusable() {
        return Err("the probe's answer closes its connection".into());
    }
    workers.learn(&mut conn, &head.headers, Instant::now());
    if !matches!(conn.worker, Pinned::To(_)) {
        return Err(format!(
            "the probe's answer names no worker in {}",
            workers.header
        ));
    }
    conn.served = 1;
    let open = conn.io.watch_idle();
    conn.clock.went_idle(open);
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(worker: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-worker", worker.parse().unwrap());
        h
    }

    fn workers() -> Arc<Workers> {
        Arc::new(Workers::new(
            HeaderName::from_static("x-worker"),
            None,
            "a",
            "127.0.0.1:1",
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_learns_its_worker_and_requests_count_there_until_answered() {
        let w = workers();
        let now = Instant::now();
        let a = w.learned(Pinned::Unknown, &answer("101"), now);
        let b = w.learned(Pinned::Unknown, &answer("102"), now);
        assert!(matches!(a, Pinned::To(_)));
        assert_ne!(a, b);
        assert_eq!(w.known(), 2);
        assert_eq!(
            w.learned(a, &HeaderMap::new(), now),
            a,
            "an answer without the header teaches nothing"
        );

        let first = w.start(a);
        assert_eq!(w.busy(a), 1);
        assert_eq!(w.busy(b), 0);
        let second = w.start(a);
        assert_eq!(w.busy(a), 2);
        drop(first);
        assert_eq!(w.busy(a), 1);
        drop(second);
        assert_eq!(w.busy(a), 0);
        assert_eq!(w.busy(Pinned::Unknown), 0);
        drop(w.start(Pinned::Unknown));
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_worker_is_claimed_by_one_request_only() {
        let w = workers();
        let a = w.learned(Pinned::Unknown, &answer("101"), Instant::now());
        let first = w.claim(a).expect("free");
        assert!(w.claim(a).is_none(), "taken by the first");
        assert!(w.claim(Pinned::Unknown).is_none());
        drop(first);
        assert!(w.claim(a).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_answers_name_different_workers_is_unpinned() {
        let w = workers();
        let now = Instant::now();
        let a = w.learned(Pinned::Unknown, &answer("101"), now);
        let moved = w.learned(a, &answer("102"), now);
        assert_eq!(moved, Pinned::Unpinned);
        assert_eq!(w.learned(moved, &answer("101"), now), Pinned::Unpinned);
        let turn = w.start(moved);
        assert_eq!(
            w.busy(a),
            0,
            "an unpinned connection is not counted anywhere"
        );
        drop(turn);
    }

    #[tokio::test(start_paused = true)]
    async fn workers_not_heard_from_are_forgotten_unless_busy() {
        let w = workers();
        let t0 = Instant::now();
        let a = w.learned(Pinned::Unknown, &answer("101"), t0);
        let b = w.learned(Pinned::Unknown, &answer("102"), t0);
        // Their connections close.
        for p in [a, b] {
            let Pinned::To(id) = p else { panic!() };
            drop(Counted(w.clone(), id));
        }
        let held = w.start(b);
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        w.learned(Pinned::Unknown, &answer("103"), later);
        assert_eq!(w.known(), 2, "101 forgotten, 102 kept while busy, 103 new");
        assert_eq!(w.busy(a), 0);
        assert_eq!(w.busy(b), 1);
        drop(held);
        assert_eq!(w.busy(b), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_are_closed_to_reach_other_workers_at_a_bounded_rate() {
        let w = workers();
        let t0 = Instant::now();
        assert!(w.may_reroll(t0));
        assert!(!w.may_reroll(t0 + REROLL_EVERY / 2));
        assert!(w.may_reroll(t0 + REROLL_EVERY));
    }

    #[tokio::test(start_paused = true)]
    async fn each_worker_counts_the_open_connections_that_reach_it() {
        let w = workers();
        let now = Instant::now();
        let a = w.learned(Pinned::Unknown, &answer("101"), now);
        let Pinned::To(id) = a else { panic!() };
        let first = Counted(w.clone(), id);
        assert_eq!(w.conns(a), 1);
        assert_eq!(
            w.learned(a, &answer("101"), now),
            a,
            "known already: not counted again"
        );
        assert_eq!(w.conns(a), 1);
        let second = Counted(w.clone(), id);
        assert_eq!(w.learned(Pinned::Unknown, &answer("101"), now), a);
        assert_eq!(w.conns(a), 2);
        drop(first);
        assert_eq!(w.conns(a), 1);
        let later = now + FORGET_AFTER * 2;
        w.learned(Pinned::Unknown, &answer("999"), later);
        assert_eq!(w.conns(a), 1, "a worker with a connection is not forgotten");
        drop(second);
        assert_eq!(w.conns(a), 0);
    }
}
