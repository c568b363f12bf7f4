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
//! A connection whose answers name different workers is not pinned (a load balancer in between
//! picks per request): it is left out of the book, and a warning says the header does not help.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use metrics::{Counter, Gauge};
use tokio::time::Instant;

/// A worker no answer named for this long is forgotten (a restarted worker has a new name).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The least time between two connections closed to reach another worker: when every worker
/// really is busy, closing connections would only churn.
pub(super) const REROLL_EVERY: Duration = Duration::from_millis(100);

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
    seen: Instant,
}

pub struct Workers {
    pub header: HeaderName,
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
}

impl Workers {
    pub fn new(header: HeaderName, upstream: &str, endpoint: &str) -> Self {
        let labels = [
            ("upstream", upstream.to_string()),
            ("endpoint", endpoint.to_string()),
        ];
        let pick = |p: &'static str| {
            let mut l = labels.to_vec();
            l.push(("pick", p.to_string()));
            metrics::counter!("breakwater_endpoint_worker_picks_total", &l)
        };
        Workers {
            header,
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

    pub fn picked(&self, pick: Pick) {
        self.picks[pick as usize].increment(1);
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
        match book.find(id) {
            Some(w) if w.busy > 0 => return None,
            Some(w) => w.busy = 1,
            None => book.workers.push(Worker {
                id,
                busy: 1,
                seen: Instant::now(),
            }),
        }
        Some(Turn(Some((self, id))))
    }

    /// A request goes out on a connection that reaches `pinned`: it is counted there until the
    /// returned turn is dropped (at the answer's head, or when the attempt ends without one).
    pub fn start(&self, pinned: Pinned) -> Turn<'_> {
        let id = match pinned {
            Pinned::To(id) => id,
            Pinned::Unknown | Pinned::Unpinned => return Turn(None),
        };
        let mut book = self.book();
        match book.find(id) {
            Some(w) => w.busy += 1,
            // Forgotten while the connection idled: known again.
            None => book.workers.push(Worker {
                id,
                busy: 1,
                seen: Instant::now(),
            }),
        }
        Turn(Some((self, id)))
    }

    /// What a connection that reached `pinned` knows after an answer with `headers` arrived at
    /// `now`.
    pub fn learn(&self, pinned: Pinned, headers: &HeaderMap, now: Instant) -> Pinned {
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
                return Pinned::Unpinned;
            }
            _ => {}
        }
        let mut book = self.book();
        match book.find(id) {
            Some(w) => w.seen = now,
            None => book.workers.push(Worker {
                id,
                busy: 0,
                seen: now,
            }),
        }
        book.workers
            .retain(|w| w.busy > 0 || now.saturating_duration_since(w.seen) < FORGET_AFTER);
        self.known.set(book.workers.len() as f64);
        Pinned::To(id)
    }

    /// Workers named by an answer within the last minute (or with requests in flight).
    pub fn known(&self) -> usize {
        self.book().workers.len()
    }

    fn finish(&self, id: u64) {
        if let Some(w) = self.book().find(id) {
            w.busy = w.busy.saturating_sub(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(worker: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-worker", worker.parse().unwrap());
        h
    }

    fn workers() -> Workers {
        Workers::new(HeaderName::from_static("x-worker"), "a", "127.0.0.1:1")
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_learns_its_worker_and_requests_count_there_until_answered() {
        let w = workers();
        let now = Instant::now();
        let a = w.learn(Pinned::Unknown, &answer("101"), now);
        let b = w.learn(Pinned::Unknown, &answer("102"), now);
        assert!(matches!(a, Pinned::To(_)));
        assert_ne!(a, b);
        assert_eq!(w.known(), 2);
        assert_eq!(
            w.learn(a, &HeaderMap::new(), now),
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
        let a = w.learn(Pinned::Unknown, &answer("101"), Instant::now());
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
        let a = w.learn(Pinned::Unknown, &answer("101"), now);
        let moved = w.learn(a, &answer("102"), now);
        assert_eq!(moved, Pinned::Unpinned);
        assert_eq!(w.learn(moved, &answer("101"), now), Pinned::Unpinned);
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
        let a = w.learn(Pinned::Unknown, &answer("101"), t0);
        let b = w.learn(Pinned::Unknown, &answer("102"), t0);
        let held = w.start(b);
        let later = t0 + FORGET_AFTER + Duration::from_secs(1);
        w.learn(Pinned::Unknown, &answer("103"), later);
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
}
