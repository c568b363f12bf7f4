//! Admission control for one route: a concurrency limit in front of the upstream, a bounded FIFO
//! queue for short bursts, and deadline-aware shedding so that a request that cannot finish within
//! its budget is refused at once instead of waiting to fail.
//!
//! When does a queued request get a slot? Each in-flight exchange is expected to end one mean
//! service time after it started; from then on every slot serves the queue in order, one mean
//! exchange after another. So the request at queue position `p` with `n` exchanges in flight
//! starts at `finish[(p-1) % n] + mean × ((p-1) / n)`. On arrival a request is refused
//! (`deadline`) when that wait plus a pessimistic exchange (mean + 2 deviations) exceeds its
//! remaining budget; while queued it is refused as soon as the wait plus a mean exchange does.
//! The two thresholds differ on purpose, so a request admitted at the margin is not refused a
//! moment later by estimate noise. Retry-After is the predicted time for the queue to drain.
//!
//! Every outcome teaches the estimate, not only completions: an exchange cut off by its budget or
//! its caller is a sample of *at least* its elapsed time, and exchanges still running past the
//! estimate count as still running: when every running exchange is overdue, the queue is planned
//! with twice the youngest one's age instead of the stale mean, so a backend that slows down or
//! stops pushes predictions (and Retry-After) up at once, before anything completes. An exchange
//! that got no answer head within its budget also halves the route's limit (at least one slot
//! stays open as a probe) until exchanges complete again, each doubling it back: a backend that
//! hangs holds one request, not all of them, and the rest are refused on arrival.
//!
//! The state sits behind one mutex that is never held across an await; a queued request waits on
//! its own oneshot channel and timer.

mod adaptive;
mod estimator;

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

pub use adaptive::AdaptiveLimit;
pub use estimator::Estimator;

use crate::config::{Concurrency, RouteConfig};
use crate::error::{ProxyError, Reason};
use crate::observe::RouteMetrics;

pub struct Admission {
    metrics: Arc<RouteMetrics>,
    max_depth: usize,
    max_wait: Duration,
    retry_after_max: Duration,
    state: Mutex<State>,
}

/// An in-flight slot, keyed by when it was granted so the running set is ordered by start.
type Slot = (Instant, u64);

struct Waiter {
    id: u64,
    deadline: Instant,
    /// `Ok` hands over a slot (already in `running`); `Err` refuses with a reason.
    tx: oneshot::Sender<Result<Slot, Reason>>,
}

struct State {
    running: BTreeSet<Slot>,
    fixed_limit: usize,
    adaptive: Option<AdaptiveLimit>,
    queue: VecDeque<Waiter>,
    next_id: u64,
    estimator: Estimator,
    /// Set when the gateway starts draining: nothing may be admitted that cannot finish by then.
    drain_deadline: Option<Instant>,
    /// A cap on the limit while the upstream gives no answers within budgets (see the module
    /// head); `None` when it answers.
    stall_cap: Option<usize>,
    /// How fast the queue really drains: the time between slot releases while requests wait.
    drain: DrainRate,
    /// The upstream whose endpoints in service cap the limit (see `crate::upstream`).
    upstream: Option<Arc<crate::upstream::Upstream>>,
}

/// The measured interval between slot releases while the queue is not empty. The slot model
/// assumes every slot works in parallel; a backend whose workers are fewer than the connections
/// in use (uvicorn pins each connection to one worker process) drains slower than that, and only
/// the releases themselves show it. A measurement holds for one stretch of queueing: once the
/// queue empties it is forgotten, so a rate measured during a slow-down cannot keep refusing
/// arrivals (which would keep the queue empty, and the rate unmeasured) after it.
#[derive(Debug, Default)]
struct DrainRate {
    /// Seconds between releases, exponentially weighted (1/8 per interval).
    interval: Option<f64>,
    intervals: u32,
    /// The last release while the queue was not empty; `None` once it emptied.
    last: Option<Instant>,
}

impl DrainRate {
    /// Intervals seen before the measured rate is trusted.
    const MIN_INTERVALS: u32 = 8;

    fn released(&mut self, queued: bool) {
        if !queued {
            *self = DrainRate::default();
            return;
        }
        let now = Instant::now();
        if let Some(last) = self.last {
            let dt = now.duration_since(last).as_secs_f64();
            self.interval = Some(match self.interval {
                None => dt,
                Some(i) => i + (dt - i) / 8.0,
            });
            self.intervals = self.intervals.saturating_add(1);
        }
        self.last = Some(now);
    }

    /// How long the queue takes to hand out `position` slots, when that has been measured.
    fn wait_for(&self, position: usize) -> Option<Duration> {
        let i = self
            .interval
            .filter(|_| self.intervals >= Self::MIN_INTERVALS)?;
        Some(Duration::from_secs_f64(i * position as f64))
    }
}

impl State {
    /// The configured (or adaptive) limit, before any stall cap.
    fn base_limit(&self) -> usize {
        self.adaptive
            .as_ref()
            .map(|a| a.limit())
            .unwrap_or(self.fixed_limit)
    }

    fn limit(&self) -> usize {
        let base = self.base_limit();
        let capped = self.stall_cap.map_or(base, |cap| cap.min(base));
        self.upstream
            .as_ref()
            .map_or(capped, |u| capped.min(u.capacity()))
    }

    /// The service time to plan the queue with: the estimate, or, when every running exchange
    /// has already run past it, twice the youngest one's age. Overdue exchanges are still
    /// running; an exchange that has run for `e` is about as likely as not to run `e` more.
    fn planning_service(&self, now: Instant) -> Option<Duration> {
        let mean = self.estimator.mean()?;
        let youngest = self
            .running
            .iter()
            .next_back()
            .map(|(start, _)| now - *start);
        Some(match youngest {
            Some(age) if age > mean => age * 2,
            _ => mean,
        })
    }

    /// A pessimistic length for an exchange admitted now.
    fn service_high(&self, now: Instant) -> Option<Duration> {
        let high = self.estimator.service_high()?;
        Some(self.planning_service(now).map_or(high, |p| p.max(high)))
    }

    /// What a finished (or cut off) exchange teaches.
    fn learn(&mut self, sample: Sample) {
        match sample {
            Sample::Took(rtt) => {
                self.estimator.record(rtt);
                let inflight = self.inflight();
                if let Some(a) = self.adaptive.as_mut() {
                    a.record(rtt, inflight);
                }
                // Answers again: each completion doubles a stall cap back towards the limit.
                if let Some(cap) = self.stall_cap {
                    let cap = cap.saturating_mul(2);
                    self.stall_cap = (cap < self.base_limit()).then_some(cap);
                }
            }
            Sample::AtLeast(elapsed) => self.estimator.record_censored(elapsed),
            Sample::TimedOut(elapsed) => {
                self.estimator.record_censored(elapsed);
                self.stall_cap = Some((self.limit() / 2).max(1));
            }
            Sample::Nothing => {}
        }
    }

    fn inflight(&self) -> usize {
        self.running.len()
    }

    fn grant(&mut self, now: Instant) -> Slot {
        let slot = (now, self.next_id);
        self.next_id += 1;
        self.running.insert(slot);
        slot
    }

    /// Expected wait until the request at 1-based queue `position` gets a slot, once an exchange
    /// has been seen. Each in-flight exchange is expected to end `mean` after it started; every
    /// slot then serves the queue in order, one mean exchange after another. Completions that
    /// only bring the in-flight count back under a lowered limit free nothing for the queue.
    fn wait_at(&self, position: usize, now: Instant) -> Option<Duration> {
        let mean = self.planning_service(now)?;
        let modelled = slot_wait(
            &self.finishes(now, mean),
            position,
            self.excess(),
            mean,
            now,
        );
        // The model is the best case; a queue measured to drain slower waits longer.
        Some(
            self.drain
                .wait_for(position)
                .map_or(modelled, |measured| measured.max(modelled)),
        )
    }

    fn finishes(&self, now: Instant, mean: Duration) -> Vec<Instant> {
        // `running` is ordered by start, so the finishes come out sorted.
        self.running
            .iter()
            .map(|(start, _)| (*start + mean).max(now))
            .collect()
    }

    fn excess(&self) -> usize {
        self.inflight().saturating_sub(self.limit())
    }

    /// The moment a request must be done by, and what to call a refusal for missing it: its own
    /// deadline, or the drain deadline if that comes first.
    fn must_finish_by(&self, deadline: Instant) -> (Instant, Reason) {
        match self.drain_deadline {
            Some(d) if d < deadline => (d, Reason::Draining),
            _ => (deadline, Reason::Deadline),
        }
    }
}

fn slot_wait(
    finishes: &[Instant],
    position: usize,
    excess: usize,
    mean: Duration,
    now: Instant,
) -> Duration {
    if finishes.is_empty() {
        return Duration::ZERO;
    }
    let k = position + excess - 1;
    let lanes = finishes.len();
    let at = finishes[k % lanes] + mean * (k / lanes) as u32;
    at.saturating_duration_since(now)
}

/// A snapshot for metrics and tests.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub inflight: usize,
    pub limit: usize,
    pub queued: usize,
    pub mean_service: Option<Duration>,
}

impl Admission {
    pub fn new(route: &RouteConfig, metrics: Arc<RouteMetrics>) -> Self {
        let (fixed_limit, adaptive) = match route.concurrency {
            Concurrency::Fixed(n) => (n, None),
            Concurrency::Adaptive { min, max, initial } => {
                let a = AdaptiveLimit::new(min, max, initial, route.budget);
                (initial, Some(a))
            }
        };
        let a = Admission {
            metrics,
            max_depth: route.queue.max_depth,
            max_wait: route.queue.max_wait,
            retry_after_max: route.retry_after_max,
            state: Mutex::new(State {
                running: BTreeSet::new(),
                fixed_limit,
                adaptive,
                queue: VecDeque::new(),
                next_id: 0,
                estimator: Estimator::default(),
                drain_deadline: None,
                stall_cap: None,
                drain: DrainRate::default(),
                upstream: None,
            }),
        };
        a.publish(&a.lock());
        a
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding this lock would be a bug; admission keeps working
        // with the state as it was rather than taking the route down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            inflight: s.inflight(),
            limit: s.limit(),
            queued: s.queue.len(),
            mean_service: s.estimator.mean(),
        }
    }

    /// The service time the queue is planned with right now (see [`State::planning_service`]).
    pub fn planning_service(&self) -> Option<Duration> {
        self.lock().planning_service(Instant::now())
    }

    /// From now on, requests that cannot finish by `deadline` are refused with `draining`, and
    /// queued ones that no longer can are told at once.
    pub fn begin_drain(&self, deadline: Instant) {
        let mut s = self.lock();
        s.drain_deadline = Some(deadline);
        self.dispatch(&mut s);
        self.publish(&s);
    }

    /// Caps the limit with `upstream`'s capacity from now on, following it as its endpoints
    /// leave and return.
    pub fn attach(self: &Arc<Self>, upstream: &Arc<crate::upstream::Upstream>) {
        upstream.watch(self);
        let mut s = self.lock();
        s.upstream = Some(upstream.clone());
        self.dispatch(&mut s);
        self.publish(&s);
    }

    /// The upstream's capacity changed: a larger one serves the queue now, and with none left
    /// the queue is refused at once.
    pub fn capacity_changed(&self) {
        let mut s = self.lock();
        self.dispatch(&mut s);
        self.publish(&s);
    }

    /// A pessimistic estimate of one exchange's length, once one has been seen.
    pub fn expected_service(&self) -> Option<Duration> {
        self.lock().service_high(Instant::now())
    }

    /// Waits for an in-flight slot, or refuses: `queue_full` when the queue is at its depth,
    /// `deadline` when the expected wait plus service time exceeds what is left of the budget,
    /// `queue_timeout` after `max_wait`.
    pub async fn admit(self: &Arc<Self>, deadline: Instant) -> Result<Permit, ProxyError> {
        self.admit_at(deadline, Instant::now()).await
    }

    /// [`Admission::admit`], asked at `now`: the caller's clock read, which a slot free on
    /// arrival is granted at.
    pub async fn admit_at(
        self: &Arc<Self>,
        deadline: Instant,
        now: Instant,
    ) -> Result<Permit, ProxyError> {
        let (rx, id, give_up_at, by_max_wait) = {
            let mut s = self.lock();
            if s.inflight() < s.limit() && s.queue.is_empty() {
                // While draining, even a free slot is no use to a request that cannot finish
                // before the process exits.
                if let (Some(drain), Some(service)) = (s.drain_deadline, s.service_high(now)) {
                    if now + service > drain {
                        return Err(self.refuse(&s, Reason::Draining));
                    }
                }
                let slot = s.grant(now);
                self.publish(&s);
                return Ok(self.permit(slot, Duration::ZERO));
            }
            if s.limit() == 0 {
                // Every endpoint is ejected: nothing will free a slot before one is probed.
                return Err(self.refuse(&s, Reason::CircuitOpen));
            }
            let position = s.queue.len() + 1;
            if s.queue.len() >= self.max_depth {
                return Err(self.refuse(&s, Reason::QueueFull));
            }
            let (finish_by, reason) = s.must_finish_by(deadline);
            let remaining = finish_by.saturating_duration_since(now);
            if remaining.is_zero() {
                return Err(self.refuse(&s, reason));
            }
            if let (Some(wait), Some(service)) = (s.wait_at(position, now), s.service_high(now)) {
                if wait + service > remaining {
                    return Err(self.refuse(&s, reason));
                }
            }
            // The latest moment a slot is still useful: enough left for a typical exchange.
            // Arrival is judged with a pessimistic service time and the queue with the mean, so a
            // request admitted at the margin is not refused moments later by estimate noise.
            let latest_start = deadline
                .checked_sub(s.planning_service(now).unwrap_or(Duration::ZERO))
                .unwrap_or(now);
            let max_wait_at = now + self.max_wait;
            let (give_up_at, by_max_wait) = if max_wait_at <= latest_start {
                (max_wait_at, true)
            } else {
                (latest_start, false)
            };
            let (tx, rx) = oneshot::channel();
            let id = s.next_id;
            s.next_id += 1;
            s.queue.push_back(Waiter { id, deadline, tx });
            self.publish(&s);
            (rx, id, give_up_at, by_max_wait)
        };

        let mut queued = Queued {
            admission: self.clone(),
            id,
            rx: Some(rx),
        };
        let enqueued = now;
        let handed = tokio::select! {
            handed = queued.rx.as_mut().expect("set above") => Some(handed),
            _ = tokio::time::sleep_until(give_up_at) => None,
        };
        let waited = enqueued.elapsed();
        self.metrics.queue_wait.record(waited.as_secs_f64());
        match handed {
            Some(handed) => {
                queued.rx = None;
                match handed {
                    Ok(Ok(slot)) => Ok(self.permit(slot, waited)),
                    Ok(Err(reason)) => Err(self.refuse(&self.lock(), reason)),
                    Err(_) => Err(self.refuse_waiter(id, Reason::QueueTimeout)),
                }
            }
            None => {
                let reason = if by_max_wait {
                    Reason::QueueTimeout
                } else {
                    Reason::Deadline
                };
                let in_queue = self.lock().queue.iter().any(|w| w.id == id);
                if !in_queue {
                    // The timer raced a hand-over: if a slot arrived, use it.
                    if let Some(mut rx) = queued.rx.take() {
                        match rx.try_recv() {
                            Ok(Ok(slot)) => return Ok(self.permit(slot, waited)),
                            Ok(Err(r)) => return Err(self.refuse(&self.lock(), r)),
                            Err(_) => {}
                        }
                    }
                }
                Err(self.refuse_waiter(id, reason))
            }
        }
    }

    fn permit(self: &Arc<Self>, slot: Slot, waited: Duration) -> Permit {
        Permit {
            admission: Some(self.clone()),
            slot,
            waited,
        }
    }

    /// Refusal for a request that never queued (or was just taken out of the queue).
    fn refuse(&self, s: &State, reason: Reason) -> ProxyError {
        ProxyError::Refused {
            reason,
            retry_after: self.retry_after(s),
        }
    }

    fn refuse_waiter(&self, id: u64, reason: Reason) -> ProxyError {
        let mut s = self.lock();
        s.queue.retain(|w| w.id != id);
        self.publish(&s);
        self.refuse(&s, reason)
    }

    /// The time the current queue needs to drain, with up to a quarter of jitter so refused
    /// callers do not all come back in the same second.
    fn retry_after(&self, s: &State) -> Duration {
        let drain = s
            .wait_at(s.queue.len() + 1, Instant::now())
            .unwrap_or(Duration::from_secs(1));
        let base = drain.max(Duration::from_secs(1));
        let jitter = base.mul_f64(fastrand::f64() * 0.25);
        (base + jitter).min(self.retry_after_max)
    }

    /// Gives back a slot, records what the exchange taught us, and hands free slots to the queue.
    fn release(&self, slot: Slot, sample: Sample) {
        let mut s = self.lock();
        s.learn(sample);
        let queued = !s.queue.is_empty();
        s.drain.released(queued);
        s.running.remove(&slot);
        self.dispatch(&mut s);
        self.publish(&s);
    }

    fn dispatch(&self, s: &mut State) {
        // Most releases find nobody queued: nothing to hand out, judge or time.
        if s.queue.is_empty() {
            return;
        }
        let now = Instant::now();
        if s.limit() == 0 {
            for w in s.queue.drain(..) {
                let _ = w.tx.send(Err(Reason::CircuitOpen));
            }
            return;
        }
        while s.inflight() < s.limit() {
            let Some(w) = s.queue.pop_front() else { break };
            if w.deadline <= now {
                let _ = w.tx.send(Err(Reason::Deadline));
                continue;
            }
            let slot = s.grant(now);
            if w.tx.send(Ok(slot)).is_err() {
                s.running.remove(&slot);
            }
        }
        // Waiters that can no longer make it are told now, not at their timer. The queue is
        // judged with the mean exchange (arrival used a pessimistic one), so estimate noise does
        // not refuse a request moments after admitting it. Most releases find no queue: they
        // skip the finishes, which cost an allocation and a walk over every running exchange.
        if s.queue.is_empty() {
            return;
        }
        let Some(mean) = s.planning_service(now) else {
            return;
        };
        let finishes = s.finishes(now, mean);
        let excess = s.excess();
        let mut position = 0;
        let drain = s.drain_deadline;
        s.queue.retain_mut(|w| {
            let wait = slot_wait(&finishes, position + 1, excess, mean, now);
            let (finish_by, reason) = match drain {
                Some(d) if d < w.deadline => (d, Reason::Draining),
                _ => (w.deadline, Reason::Deadline),
            };
            if now + wait + mean > finish_by {
                // Sending needs the sender by value; swap in a dead one.
                let (dead, _) = oneshot::channel();
                let tx = std::mem::replace(&mut w.tx, dead);
                let _ = tx.send(Err(reason));
                false
            } else {
                position += 1;
                true
            }
        });
    }

    fn publish(&self, s: &State) {
        self.metrics.inflight.set(s.inflight() as f64);
        self.metrics.limit.set(s.limit() as f64);
        self.metrics.queue_depth.set(s.queue.len() as f64);
    }
}

/// Leaves the queue when the waiting request goes away (caller disconnected, outer timeout),
/// handing on a slot it was given but never used.
struct Queued {
    admission: Arc<Admission>,
    id: u64,
    rx: Option<oneshot::Receiver<Result<Slot, Reason>>>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut s = self.admission.lock();
        let before = s.queue.len();
        s.queue.retain(|w| w.id != self.id);
        if s.queue.len() == before {
            if let Ok(Ok(slot)) = rx.try_recv() {
                s.running.remove(&slot);
                self.admission.dispatch(&mut s);
            }
        }
        self.admission.publish(&s);
    }
}

/// What an exchange taught about the upstream's service time, given back with its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// It completed, or failed after the upstream had it, in this time (written → end).
    Took(Duration),
    /// It was cut off while the upstream worked on it (its caller left): the service time is at
    /// least this.
    AtLeast(Duration),
    /// No answer's head within the budget: at least this, and the upstream may have stopped
    /// answering.
    TimedOut(Duration),
    /// Nothing: it never reached the upstream.
    Nothing,
}

/// An in-flight slot. Held until the exchange is over (the upstream's answer read to its end, or
/// abandoned); dropped without a sample it is returned without teaching the estimator anything.
pub struct Permit {
    admission: Option<Arc<Admission>>,
    slot: Slot,
    /// How long the request queued for it (zero when a slot was free on arrival).
    waited: Duration,
}

impl Permit {
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Gives the slot back with what the exchange taught.
    pub fn release(mut self, sample: Sample) {
        if let Some(a) = self.admission.take() {
            a.release(self.slot, sample);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            a.release(self.slot, Sample::Nothing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn admission(concurrency: usize) -> Arc<Admission> {
        let yaml = format!(
            r#"
upstreams:
  app: {{ url: "http://127.0.0.1:9" }}
routes:
  - name: r
    match: {{ path_prefix: / }}
    upstream: app
    budget: 2s
    concurrency: {concurrency}
"#
        );
        let config = crate::config::from_yaml(&yaml, Vec::new()).expect("valid");
        let metrics = Arc::new(RouteMetrics::new("admission-unit", Some("app")));
        Arc::new(Admission::new(&config.routes[0], metrics))
    }

    const BUDGET: Duration = Duration::from_secs(2);

    /// Admitted at once, or `None` when the request had to queue.
    fn arrive(a: &Arc<Admission>) -> Option<Result<Permit, ProxyError>> {
        a.admit(Instant::now() + BUDGET).now_or_never()
    }

    fn warm(a: &Arc<Admission>, service: Duration, n: usize) {
        for _ in 0..n {
            let p = arrive(a).expect("a free slot").expect("admitted");
            p.release(Sample::Took(service));
        }
    }

    fn reason(r: &Result<Permit, ProxyError>) -> Option<Reason> {
        match r {
            Err(ProxyError::Refused { reason, .. }) => Some(*reason),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_says_how_long_its_request_queued() {
        let a = admission(1);
        let first = arrive(&a).expect("a free slot").expect("admitted");
        assert_eq!(first.waited(), Duration::ZERO, "a free slot is no wait");
        let mut queued = Box::pin(a.admit(Instant::now() + BUDGET));
        assert!(
            queued.as_mut().now_or_never().is_none(),
            "no free slot: it queues"
        );
        tokio::time::advance(Duration::from_millis(150)).await;
        first.release(Sample::Took(Duration::from_millis(150)));
        let second = queued.await.expect("handed the slot");
        assert_eq!(second.waited(), Duration::from_millis(150));
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_stops_answering_is_refused_on_arrival_then_probed() {
        let a = admission(4);
        warm(&a, Duration::from_millis(200), 20);
        // The backend hangs: four exchanges go out and nothing comes back.
        let stuck: Vec<Permit> = (0..4).map(|_| arrive(&a).unwrap().unwrap()).collect();
        let mut queued = Vec::new();
        let mut refused_at = Vec::new();
        for tick in 1..=20u32 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let mut fut = Box::pin(a.admit(Instant::now() + BUDGET));
            match (&mut fut).now_or_never() {
                Some(r) => {
                    assert_eq!(reason(&r), Some(Reason::Deadline), "at {tick}");
                    refused_at.push(tick);
                }
                None => queued.push(fut),
            }
        }
        // Once the hang has lasted well under a budget, every arrival is refused on the spot.
        assert!(
            (8..=20).all(|t| refused_at.contains(&t)),
            "refused on arrival at ticks {refused_at:?}"
        );
        assert!(
            a.snapshot().queued <= 7,
            "only the first arrivals queued: {}",
            a.snapshot().queued
        );
        drop(queued);
        // The stuck exchanges run out their budgets: the limit closes down to one probe.
        for p in stuck {
            p.release(Sample::TimedOut(BUDGET));
        }
        assert_eq!(a.snapshot().limit, 1);
        let probe = arrive(&a).expect("one slot stays open").expect("the probe");
        let r = arrive(&a).expect("refused on arrival, not queued");
        assert_eq!(reason(&r), Some(Reason::Deadline));
        // The backend answers again: completions open the limit back up.
        probe.release(Sample::Took(Duration::from_millis(200)));
        for _ in 0..2 {
            let p = arrive(&a).unwrap().unwrap();
            p.release(Sample::Took(Duration::from_millis(200)));
        }
        assert_eq!(a.snapshot().limit, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn overdue_exchanges_push_the_plan_and_retry_after_up() {
        let a = admission(2);
        warm(&a, Duration::from_millis(200), 20);
        let _running: Vec<Permit> = (0..2).map(|_| arrive(&a).unwrap().unwrap()).collect();
        let planned = a.planning_service().unwrap();
        assert!(planned < Duration::from_millis(250), "{planned:?}");
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(a.planning_service(), Some(Duration::from_millis(1400)));
        let r = arrive(&a).expect("decided on arrival");
        match r {
            Err(ProxyError::Refused {
                reason: Reason::Deadline,
                retry_after,
            }) => assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}"),
            other => panic!("expected a deadline refusal, got {:?}", reason(&other)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_that_drains_slower_than_its_slots_promise_is_planned_as_measured() {
        // Four slots, 200 ms exchanges: the slot model expects a release every 50 ms. The
        // backend behind them (two workers really serving four pinned connections) releases one
        // every 100 ms.
        let a = admission(4);
        warm(&a, Duration::from_millis(200), 20);
        let mut running: VecDeque<Permit> = (0..4).map(|_| arrive(&a).unwrap().unwrap()).collect();
        let mut queued = Vec::new();
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(100)).await;
            // One waiter behind the slots all along, so every release counts.
            let mut fut = Box::pin(a.admit(Instant::now() + Duration::from_secs(30)));
            if let Some(Ok(p)) = (&mut fut).now_or_never() {
                running.push_back(p);
            } else {
                queued.push(fut);
            }
            running
                .pop_front()
                .unwrap()
                .release(Sample::Took(Duration::from_millis(200)));
            let mut waiting = Vec::new();
            for mut f in queued.drain(..) {
                match (&mut f).now_or_never() {
                    Some(Ok(p)) => running.push_back(p),
                    Some(Err(e)) => panic!("refused: {e}"),
                    None => waiting.push(f),
                }
            }
            queued = waiting;
        }
        let s = a.lock();
        let interval = s.drain.interval.unwrap();
        assert!((interval - 0.1).abs() < 0.01, "measured {interval}");
        // Position 8 in the queue: the model says 8 × 50 ms; the measured drain, 8 × 100 ms.
        let wait = s.wait_at(8, Instant::now()).unwrap();
        assert!(wait >= Duration::from_millis(790), "{wait:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_leaving_mid_exchange_teaches_at_least_its_time() {
        let a = admission(1);
        warm(&a, Duration::from_millis(200), 20);
        let p = arrive(&a).unwrap().unwrap();
        p.release(Sample::AtLeast(Duration::from_millis(50)));
        let mean = a.snapshot().mean_service.unwrap();
        assert!((mean.as_secs_f64() - 0.2).abs() < 0.001, "{mean:?}");
        let p = arrive(&a).unwrap().unwrap();
        p.release(Sample::AtLeast(Duration::from_secs(2)));
        assert!(a.snapshot().mean_service.unwrap() > Duration::from_millis(400));
    }
}
