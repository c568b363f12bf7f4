//! Adaptive concurrency (`concurrency: auto`): finds the in-flight limit that gets the most
//! answers per second out of the backend without letting its latency eat the route's budget.
//!
//! Why throughput and not latency: more in flight than a backend has workers can be the right
//! answer. Keep-alive connections to `uvicorn --workers N` (and an ALB's own pool to its targets)
//! are pinned to workers at random, so N connections usually keep only some of the N workers
//! busy; more connections reach more workers at the price of queueing inside the backend. Latency
//! rising with the limit therefore says nothing by itself; a rise in latency *without* a rise in
//! throughput says the extra requests only queue.
//!
//! - **Windows.** Completions are grouped in windows at one limit. After the limit changes, the
//!   next `max(old, new)` completions are skipped (they ran under the old limit). A window closes
//!   once it has at least `max(16, 2 × limit)` completions and its throughput is known to about
//!   ±5% (relative standard error, by batch means over eight consecutive batches, since a queue
//!   inside the backend makes successive latencies correlated), or at 256 completions.
//!   Throughput comes from Little's law, mean in-flight ÷ mean latency: no clock needed, and
//!   exact for a backend whose answers come in bursts. A window is *saturated* when at least half
//!   its completions found the limit full, *queued* when 90% did (a standing queue at the
//!   gateway). Only saturated windows may raise the limit and only queued ones may lower it:
//!   below that, throughput is the demand's, not the backend's. The window's 90th latency
//!   percentile is checked against the guard, `GUARD` × the route's budget.
//! - **Hold.** The limit stays while successive windows agree. Throughput rising at the same
//!   limit starts a climb; throughput falling at a full limit (latency up, nothing more done) is
//!   confirmed by one more window and then starts a descent. Every `HOLD_WINDOWS` saturated
//!   windows the limit probes, alternately one climb and one step down.
//! - **Climb.** Steps of `+⌈limit/4⌉` while saturated and p90 stays within the guard. A step
//!   that raises throughput by at least 10% (and 2.5 standard errors) over the best so far
//!   becomes the new best; the climb goes on through up to `PATIENCE` steps without a gain (a
//!   pinned backend's throughput rises in jumps, when a new connection reaches an idle worker),
//!   then settles on the best limit. A step that breaks the guard ends it at once, and that limit
//!   is not probed again until the backend changes.
//! - **Descent.** Steps of `-⌈limit/5⌉` (the inverse of a climb step), kept while throughput
//!   stays within 5% (and one standard error) of where the descent began; a step that loses more
//!   goes back. A descent after a confirmed fall goes on while nothing is lost (and if its first
//!   step already loses, the fall was connections reaching fewer workers, and a climb follows);
//!   the periodic probe takes one step only. Going back up does not restore the connections the
//!   step closed, so after any change the held limit is measured afresh.
//! - **Guard.** A window over the guard steps the limit down, and keeps stepping while that brings
//!   latency down (or costs no throughput). When a step costs throughput and leaves latency where
//!   it was, the latency is the backend's own and no limit helps: the limit goes back and stays.
//!
//! The stall cap in `super` (halving on answers that never come) is separate and applies on top.

use std::time::Duration;

/// The share of the route's budget the backend's 90th latency percentile may use.
const GUARD: f64 = 0.5;
/// Completions in a window: at least this many (and twice the limit), at most `WINDOW_MAX`.
const WINDOW_MIN: usize = 16;
const WINDOW_MAX: usize = 256;
/// A window closes early once its throughput's relative standard error is this small.
const TARGET_SE: f64 = 0.05;
/// A window counts as saturated when at least this share of its completions found the limit full:
/// more room might then help, so a climb may go on.
const SATURATED: f64 = 0.5;
/// A window has a standing queue when nearly all its completions found the limit full: only then
/// is its throughput the backend's and not the demand's, so only then may the limit go down.
const QUEUED: f64 = 0.9;
/// A step up must raise throughput by at least this much (and by 2.5 standard errors).
const GAIN: f64 = 0.10;
/// A step down is kept while throughput stays within this much (and one standard error) of where
/// the descent began.
const LOSS: f64 = 0.05;
/// Throughput at the held limit moving by more than this (and 2.5 standard errors) is a change.
const CHANGE: f64 = 0.15;
/// Steps up without a gain a climb tries before settling on its best limit.
const PATIENCE: u32 = 2;
/// Saturated windows between probes while holding.
const HOLD_WINDOWS: u32 = 6;
/// A guarded step down that lowers p90 by less than this share did not help latency.
const GUARD_EASED: f64 = 0.9;

/// What one window measured.
#[derive(Debug, Clone, Copy)]
struct Stats {
    limit: usize,
    /// Completions per second, by Little's law.
    throughput: f64,
    /// Relative standard error of `throughput`.
    se: f64,
    /// 90th latency percentile, seconds.
    p90: f64,
    saturated: bool,
    queued: bool,
}

impl Stats {
    /// Whether `self` beats `base` by a gain that noise does not explain.
    fn gains_over(&self, base: &Stats) -> bool {
        let margin = GAIN.max(2.5 * self.se.hypot(base.se));
        self.throughput >= base.throughput * (1.0 + margin)
    }

    /// Whether `self` is meaningfully below `base`.
    fn loses_to(&self, base: &Stats) -> bool {
        let margin = LOSS.max(self.se.hypot(base.se));
        self.throughput < base.throughput * (1.0 - margin)
    }

    /// Whether `self`, at a lower limit than `base`, lost far more than its share of slots.
    fn collapsed_from(&self, base: &Stats) -> bool {
        let share = self.limit as f64 / base.limit as f64;
        self.throughput < base.throughput * share * (1.0 - CHANGE)
    }

    /// Whether throughput at the same limit moved beyond noise: the backend changed.
    fn differs_from(&self, base: &Stats) -> bool {
        let margin = CHANGE.max(2.5 * self.se.hypot(base.se));
        (self.throughput / base.throughput - 1.0).abs() > margin
    }
}

#[derive(Debug, Default)]
struct Window {
    /// Latency (seconds) and in-flight count of each completion, in order.
    samples: Vec<(f64, usize)>,
    full: usize,
}

/// Throughput by Little's law: mean in-flight over mean latency.
fn little(samples: &[(f64, usize)]) -> f64 {
    let n = samples.len() as f64;
    let rtt = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let inflight = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    inflight / rtt.max(1e-9)
}

impl Window {
    fn push(&mut self, rtt: f64, inflight: usize, limit: usize) {
        self.samples.push((rtt, inflight));
        self.full += usize::from(inflight >= limit);
    }

    /// Relative standard error of the window's throughput, by batch means: successive
    /// latencies are correlated (a queue inside the backend lasts), so the spread of eight
    /// consecutive batches says more than the spread of single samples. The larger of the two.
    fn se(&self, throughput: f64) -> f64 {
        let n = self.samples.len();
        let rtts = self.samples.iter().map(|s| s.0);
        let mean = rtts.clone().sum::<f64>() / n as f64;
        let var = rtts.map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let iid = if mean > 0.0 {
            var.sqrt() / mean / (n as f64).sqrt()
        } else {
            0.0
        };
        const BATCHES: usize = 8;
        let size = n / BATCHES;
        let batches: Vec<f64> = self
            .samples
            .chunks_exact(size.max(1))
            .take(BATCHES)
            .map(little)
            .collect();
        let k = batches.len() as f64;
        let bm = batches.iter().sum::<f64>() / k;
        let bvar = batches.iter().map(|x| (x - bm).powi(2)).sum::<f64>() / (k - 1.0).max(1.0);
        iid.max(bvar.sqrt() / k.sqrt() / throughput.max(1e-9))
    }

    /// The window's statistics, once it has enough completions.
    fn close(&mut self, limit: usize) -> Option<Stats> {
        let n = self.samples.len();
        if n < WINDOW_MIN.max(2 * limit) {
            return None;
        }
        let throughput = little(&self.samples);
        let se = self.se(throughput);
        if se > TARGET_SE && n < WINDOW_MAX {
            return None;
        }
        let mut rtts: Vec<f64> = self.samples.iter().map(|s| s.0).collect();
        rtts.sort_by(f64::total_cmp);
        let p90 = rtts[(n * 9).div_ceil(10) - 1];
        let stats = Stats {
            limit,
            throughput,
            se,
            p90,
            saturated: self.full as f64 >= SATURATED * n as f64,
            queued: self.full as f64 >= QUEUED * n as f64,
        };
        *self = Window::default();
        Some(stats)
    }
}

#[derive(Debug)]
enum Phase {
    Hold,
    /// Stepping up; `best` is the lowest limit with the highest throughput seen so far.
    Climb {
        best: Stats,
        misses: u32,
    },
    /// Stepping down from `start`; `kept` is the last limit that lost nothing.
    Descend {
        start: Stats,
        kept: Stats,
        why: Descent,
    },
    /// Throughput fell at the held limit in a window that may straddle the change; the next
    /// window confirms it (and is what a descent compares with) or not.
    Confirm {
        before: Stats,
    },
    /// Stepping down because p90 broke the guard; `prev` is the window before the last step.
    Guard {
        prev: Stats,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Descent {
    /// Throughput fell at a held, full limit: step down while that loses nothing. If the first
    /// step already loses, the fall was fewer workers reached (connections re-pinned), not
    /// queueing, and a climb follows.
    Fell,
    /// The periodic probe: one step, kept if it loses nothing. (Not more: in a pinned backend
    /// every step down closes connections, and going back up opens new ones that may reach
    /// fewer workers, so repeated descents can walk the limit down.)
    Probe,
}

#[derive(Debug)]
pub struct AdaptiveLimit {
    min: usize,
    max: usize,
    limit: usize,
    /// Seconds the 90th latency percentile may reach.
    guard: f64,
    window: Window,
    /// Completions still to skip after a change of limit.
    skip: usize,
    phase: Phase,
    /// The last saturated window at the held limit.
    reference: Option<Stats>,
    holds: u32,
    probes: u32,
    /// A limit whose climb broke the guard: not probed again until the backend changes.
    ceiling: Option<usize>,
    /// A limit below which guard steps stopped helping latency (the backend's own latency).
    guard_floor: Option<usize>,
    windows: u64,
}

impl AdaptiveLimit {
    /// `budget` is the route's: the limit does not grow to where the backend's p90 latency
    /// would use more than `GUARD` of it.
    pub fn new(min: usize, max: usize, initial: usize, budget: Duration) -> Self {
        let max = max.max(min).max(1);
        let min = min.max(1);
        AdaptiveLimit {
            min,
            max,
            limit: initial.clamp(min, max),
            guard: budget.as_secs_f64() * GUARD,
            window: Window::default(),
            skip: 0,
            phase: Phase::Hold,
            reference: None,
            holds: 0,
            probes: 0,
            ceiling: None,
            guard_floor: None,
            windows: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Feeds one completed exchange; `inflight` is how many were in flight when it completed
    /// (including itself). Returns the new limit.
    pub fn record(&mut self, rtt: Duration, inflight: usize) -> usize {
        if self.skip > 0 {
            self.skip -= 1;
            return self.limit;
        }
        self.window.push(rtt.as_secs_f64(), inflight, self.limit);
        if let Some(stats) = self.window.close(self.limit) {
            self.windows += 1;
            self.decide(stats);
        }
        self.limit
    }

    fn up(&self, from: usize) -> Option<usize> {
        let to = (from + from.div_ceil(4)).min(self.max);
        let below_ceiling = self.ceiling.is_none_or(|c| to < c);
        (to > from && below_ceiling).then_some(to)
    }

    fn down(&self, from: usize) -> Option<usize> {
        let to = from.saturating_sub(from.div_ceil(5)).max(self.min);
        (to < from).then_some(to)
    }

    fn set(&mut self, limit: usize) {
        if limit != self.limit {
            self.skip = self.limit.max(limit);
            self.limit = limit;
            self.window = Window::default();
        }
    }

    /// Holds at `limit`. `reference` is what the current limit was last seen to do; going back
    /// to an earlier limit re-measures it (the pool's connections, and so the workers they
    /// reach, may not be the ones it was measured with).
    fn hold(&mut self, limit: usize, reference: Option<Stats>) {
        self.reference =
            reference.filter(|r| r.saturated && r.limit == limit && limit == self.limit);
        self.set(limit);
        self.phase = Phase::Hold;
        self.holds = 0;
    }

    fn decide(&mut self, s: Stats) {
        let over = s.p90 > self.guard;
        if !over {
            self.guard_floor = None;
        }
        match std::mem::replace(&mut self.phase, Phase::Hold) {
            Phase::Hold => self.decide_hold(s, over),
            Phase::Climb { best, misses } => {
                if over {
                    self.ceiling = Some(s.limit);
                    return self.hold(best.limit, Some(best));
                }
                if !s.saturated {
                    // Demand no longer fills the limit; it costs nothing, keep it.
                    return self.hold(s.limit, None);
                }
                let (best, misses) = if s.gains_over(&best) {
                    (s, 0)
                } else {
                    (best, misses + 1)
                };
                match self.up(s.limit) {
                    Some(next) if misses <= PATIENCE => {
                        self.phase = Phase::Climb { best, misses };
                        self.set(next);
                    }
                    _ => self.hold(best.limit, Some(best)),
                }
            }
            Phase::Descend { start, kept, why } => {
                if over {
                    return self.guard_step(s);
                }
                if why == Descent::Probe && s.queued && s.collapsed_from(&start) {
                    // Far worse than fewer slots can explain: the backend changed under the probe.
                    self.phase = Phase::Confirm { before: start };
                    return;
                }
                if s.loses_to(&start) {
                    if why == Descent::Fell && kept.limit == start.limit {
                        return self.climb_from(start);
                    }
                    return self.hold(kept.limit, None);
                }
                match self.down(s.limit) {
                    Some(next) if s.queued && why == Descent::Fell => {
                        self.phase = Phase::Descend {
                            start,
                            kept: s,
                            why,
                        };
                        self.set(next);
                    }
                    _ => self.hold(s.limit, Some(s)),
                }
            }
            Phase::Confirm { before } => {
                if over {
                    return self.guard_step(s);
                }
                if s.queued && s.differs_from(&before) && s.throughput < before.throughput {
                    return self.descend(s, Descent::Fell);
                }
                self.hold(s.limit, Some(s));
            }
            Phase::Guard { prev } => {
                if !over {
                    return self.hold(s.limit, Some(s).filter(|s| s.saturated));
                }
                let eased = s.p90 < prev.p90 * GUARD_EASED;
                if eased || !s.loses_to(&prev) {
                    self.guard_step(s)
                } else {
                    // Lower cost throughput and not latency: the latency is the backend's own.
                    self.guard_floor = Some(prev.limit);
                    self.hold(prev.limit, Some(prev).filter(|p| p.saturated));
                }
            }
        }
    }

    fn decide_hold(&mut self, s: Stats, over: bool) {
        if over && self.guard_floor.is_none_or(|f| s.limit > f) {
            return self.guard_step(s);
        }
        if !s.saturated {
            // Below the limit, throughput is the demand's: nothing to learn about the backend.
            self.reference = None;
            return;
        }
        if let Some(r) = self.reference.filter(|r| r.limit == s.limit) {
            if s.differs_from(&r) {
                self.ceiling = None;
                self.guard_floor = None;
                self.holds = 0;
                if s.throughput > r.throughput {
                    return self.climb(s, over);
                }
                if s.queued {
                    // Slower at the same full limit: latency rose with no more done.
                    self.phase = Phase::Confirm { before: r };
                    return;
                }
            }
        }
        self.reference = Some(s);
        self.holds += 1;
        if self.holds >= HOLD_WINDOWS {
            self.holds = 0;
            self.probes += 1;
            if self.probes % 2 == 1 {
                self.climb(s, over);
            } else if s.queued {
                self.descend(s, Descent::Probe);
            }
        }
    }

    fn climb(&mut self, s: Stats, over: bool) {
        match self.up(s.limit) {
            Some(next) if !over => {
                self.phase = Phase::Climb { best: s, misses: 0 };
                self.set(next);
            }
            _ => self.reference = Some(s),
        }
    }

    /// Climbs from a limit measured earlier, starting with the step above it.
    fn climb_from(&mut self, best: Stats) {
        match self.up(best.limit) {
            Some(next) => {
                self.phase = Phase::Climb { best, misses: 0 };
                self.set(next);
            }
            None => self.hold(best.limit, None),
        }
    }

    fn descend(&mut self, s: Stats, why: Descent) {
        match self.down(s.limit) {
            Some(next) => {
                self.phase = Phase::Descend {
                    start: s,
                    kept: s,
                    why,
                };
                self.set(next);
            }
            None => self.reference = Some(s),
        }
    }

    fn guard_step(&mut self, s: Stats) {
        match self.down(s.limit) {
            Some(next) if self.guard_floor.is_none_or(|f| next >= f) => {
                self.phase = Phase::Guard { prev: s };
                self.set(next);
            }
            _ => self.hold(s.limit, Some(s).filter(|s| s.saturated)),
        }
    }
}

#[cfg(test)]
mod tests {
    //! A discrete-event simulation of a backend of single-request workers behind the gateway's
    //! pool, deterministic (seeded RNG, simulated time).

    use std::collections::VecDeque;

    use super::*;

    #[derive(Clone, Copy)]
    enum Service {
        Fixed(f64),
        LogNormal { median: f64, sigma: f64 },
    }

    impl Service {
        fn mean(self) -> f64 {
            match self {
                Service::Fixed(s) => s,
                Service::LogNormal { median, sigma } => median * (sigma * sigma / 2.0).exp(),
            }
        }
    }

    const NOISY: Service = Service::LogNormal {
        median: 0.2,
        sigma: 0.5,
    };
    const TEN_S: Duration = Duration::from_secs(10);

    #[derive(Clone, Copy)]
    enum Routing {
        /// Each request goes to the least busy worker (a load balancer pooling its own
        /// connections to the workers).
        LeastBusy,
        /// Each pooled connection is pinned to a worker when it opens; a worker already serving
        /// a request is `busy_weight` times as likely to accept it (1: uniform).
        Pinned { busy_weight: f64 },
    }

    const UNIFORM: Routing = Routing::Pinned { busy_weight: 1.0 };
    /// Like the measurements: a busy async worker is likelier to win the accept.
    const SKEWED: Routing = Routing::Pinned { busy_weight: 3.0 };
    /// uvicorn closes a keep-alive connection idle this long; the pool reopens (and re-pins).
    const KEEPALIVE: f64 = 5.0;

    enum Control {
        Fixed(usize),
        Auto(Box<AdaptiveLimit>),
    }

    impl Control {
        fn limit(&self) -> usize {
            match self {
                Control::Fixed(n) => *n,
                Control::Auto(a) => a.limit(),
            }
        }

        fn windows(&self) -> u64 {
            match self {
                Control::Fixed(_) => 0,
                Control::Auto(a) => a.windows,
            }
        }
    }

    struct Job {
        start: f64,
        done: f64,
        worker: usize,
        conn: Option<usize>,
    }

    /// One completion: when, its latency, and the limit and window count right after it.
    struct Done {
        at: f64,
        rtt: f64,
        limit: usize,
        windows: u64,
    }

    struct Sim {
        rng: fastrand::Rng,
        routing: Routing,
        service: Service,
        /// Service-time multiplier: a backend slowing down.
        slow: f64,
        /// Workers taking new requests (the first `active`).
        active: usize,
        /// When each worker's FIFO of requests drains.
        free_at: Vec<f64>,
        outstanding: Vec<usize>,
        /// The worker each pooled connection is pinned to.
        conns: Vec<usize>,
        /// Idle connections, most recently used last (the pool is LIFO), with when they went idle.
        idle: Vec<(usize, f64)>,
        running: Vec<Job>,
        now: f64,
        /// Poisson arrivals per second queueing at the gateway; `None` keeps the limit full.
        demand: Option<f64>,
        next_arrival: f64,
        queue: VecDeque<f64>,
        arrivals: usize,
        waits: Vec<f64>,
        control: Control,
        log: Vec<Done>,
    }

    impl Sim {
        fn new(
            seed: u64,
            workers: usize,
            routing: Routing,
            service: Service,
            control: Control,
        ) -> Self {
            let mut sim = Sim {
                rng: fastrand::Rng::with_seed(seed),
                routing,
                service,
                slow: 1.0,
                active: workers,
                free_at: vec![0.0; workers],
                outstanding: vec![0; workers],
                conns: Vec::new(),
                idle: Vec::new(),
                running: Vec::new(),
                now: 0.0,
                demand: None,
                next_arrival: f64::INFINITY,
                queue: VecDeque::new(),
                arrivals: 0,
                waits: Vec::new(),
                control,
                log: Vec::new(),
            };
            sim.fill();
            sim
        }

        fn auto(
            seed: u64,
            workers: usize,
            routing: Routing,
            service: Service,
            limiter: AdaptiveLimit,
        ) -> Self {
            Sim::new(
                seed,
                workers,
                routing,
                service,
                Control::Auto(Box::new(limiter)),
            )
        }

        /// Open-loop demand instead of a full limit.
        fn with_demand(mut self, rate: f64) -> Self {
            self.demand = Some(rate);
            self.next_arrival = self.exp(rate);
            self
        }

        fn exp(&mut self, rate: f64) -> f64 {
            -(1.0 - self.rng.f64()).ln() / rate
        }

        fn service_time(&mut self) -> f64 {
            let base = match self.service {
                Service::Fixed(s) => s,
                Service::LogNormal { median, sigma } => {
                    let (u1, u2) = (1.0 - self.rng.f64(), self.rng.f64());
                    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    median * (sigma * z).exp()
                }
            };
            base * self.slow
        }

        fn pick_worker(&mut self) -> (usize, Option<usize>) {
            match self.routing {
                Routing::LeastBusy => {
                    let w = (0..self.active)
                        .min_by(|&a, &b| {
                            (self.outstanding[a], self.free_at[a])
                                .partial_cmp(&(self.outstanding[b], self.free_at[b]))
                                .expect("finite")
                        })
                        .expect("a worker");
                    (w, None)
                }
                Routing::Pinned { busy_weight } => {
                    while let Some((conn, since)) = self.idle.pop() {
                        if self.now - since < KEEPALIVE {
                            return (self.conns[conn], Some(conn));
                        }
                    }
                    let weight = |o: usize| if o > 0 { busy_weight } else { 1.0 };
                    let total: f64 = (0..self.active).map(|w| weight(self.outstanding[w])).sum();
                    let mut x = self.rng.f64() * total;
                    let mut w = self.active - 1;
                    for i in 0..self.active {
                        x -= weight(self.outstanding[i]);
                        if x < 0.0 {
                            w = i;
                            break;
                        }
                    }
                    self.conns.push(w);
                    (w, Some(self.conns.len() - 1))
                }
            }
        }

        fn start(&mut self) {
            let (worker, conn) = self.pick_worker();
            let done = self.now.max(self.free_at[worker]) + self.service_time();
            self.free_at[worker] = done;
            self.outstanding[worker] += 1;
            self.running.push(Job {
                start: self.now,
                done,
                worker,
                conn,
            });
        }

        /// Starts what the limit allows: everything when demand saturates, else the queue.
        fn fill(&mut self) {
            while self.running.len() < self.control.limit() {
                match self.demand {
                    None => {}
                    Some(_) => match self.queue.pop_front() {
                        Some(arrived) => self.waits.push(self.now - arrived),
                        None => break,
                    },
                }
                self.start();
            }
        }

        fn complete(&mut self, i: usize) {
            let job = self.running.swap_remove(i);
            self.now = job.done;
            let rtt = job.done - job.start;
            let inflight = self.running.len() + 1;
            if let Control::Auto(a) = &mut self.control {
                a.record(Duration::from_secs_f64(rtt), inflight);
            }
            self.outstanding[job.worker] -= 1;
            if let Some(conn) = job.conn {
                self.idle.push((conn, self.now));
            }
            self.log.push(Done {
                at: self.now,
                rtt,
                limit: self.control.limit(),
                windows: self.control.windows(),
            });
            self.fill();
        }

        fn arrive(&mut self) {
            self.now = self.next_arrival;
            self.arrivals += 1;
            self.queue.push_back(self.now);
            self.fill();
            let rate = self.demand.expect("open loop");
            self.next_arrival = self.now + self.exp(rate);
        }

        fn run_until(&mut self, end: f64) {
            loop {
                let next_done = self
                    .running
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.done.total_cmp(&b.1.done))
                    .map(|(i, j)| (i, j.done));
                let done_at = next_done.map_or(f64::INFINITY, |d| d.1);
                if done_at.min(self.next_arrival) > end {
                    self.now = end;
                    return;
                }
                match next_done {
                    Some((i, at)) if at <= self.next_arrival => self.complete(i),
                    _ => self.arrive(),
                }
            }
        }

        /// What happened in `[from, to)`.
        fn summary(&self, from: f64, to: f64) -> Summary {
            let done: Vec<&Done> = self
                .log
                .iter()
                .filter(|d| d.at >= from && d.at < to)
                .collect();
            let mut rtts: Vec<f64> = done.iter().map(|d| d.rtt).collect();
            let mut limits: Vec<usize> = done.iter().map(|d| d.limit).collect();
            rtts.sort_by(f64::total_cmp);
            limits.sort();
            Summary {
                throughput: done.len() as f64 / (to - from),
                p90: quantile(&rtts, 0.9),
                limit: limits[limits.len() / 2],
                low: limits[0],
                high: limits[limits.len() - 1],
            }
        }

        /// Windows from the first completion at or after `from` until `ok` first holds for the
        /// limit, if it does.
        fn windows_until(&self, from: f64, ok: impl Fn(usize) -> bool) -> Option<u64> {
            let mut it = self.log.iter().filter(|d| d.at >= from);
            let first = it.next()?;
            if ok(first.limit) {
                return Some(0);
            }
            it.find(|d| ok(d.limit)).map(|d| d.windows - first.windows)
        }
    }

    fn quantile(sorted: &[f64], q: f64) -> f64 {
        sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
    }

    #[derive(Debug)]
    struct Summary {
        throughput: f64,
        p90: f64,
        /// Median, lowest and highest limit seen at completions.
        limit: usize,
        low: usize,
        high: usize,
    }

    fn limiter(min: usize, max: usize, initial: usize, budget: Duration) -> AdaptiveLimit {
        AdaptiveLimit::new(min, max, initial, budget)
    }

    const SEEDS: std::ops::RangeInclusive<u64> = 1..=6;

    fn auto10() -> Control {
        Control::Auto(Box::new(limiter(1, 64, 4, TEN_S)))
    }

    /// (a) Demand below capacity on a noisy backend: no probe at `min`, no ratchet; demand is
    /// served without queueing at the gateway.
    #[test]
    fn noisy_latency_below_capacity_does_not_shrink_the_limit() {
        for (name, routing, rate) in [
            ("load balancer", Routing::LeastBusy, 10.0),
            ("pinned", UNIFORM, 8.0),
        ] {
            for seed in SEEDS {
                let mut sim = Sim::new(seed, 4, routing, NOISY, auto10()).with_demand(rate);
                sim.run_until(600.0);
                let s = sim.summary(0.0, 600.0);
                let mut waits = sim.waits.clone();
                waits.sort_by(f64::total_cmp);
                let served = sim.log.len() as f64 / sim.arrivals as f64;
                eprintln!(
                    "(a) {name} W=4 demand {rate}/s seed {seed}: limit {} [{}..{}], served {:.1}%, \
                     gateway wait p99 {:.2}s",
                    s.limit,
                    s.low,
                    s.high,
                    100.0 * served,
                    quantile(&waits, 0.99)
                );
                assert!(s.low >= 3, "{name} seed {seed}: limit fell to {}", s.low);
                assert!(served > 0.99, "{name} seed {seed}: served {served}");
            }
        }
    }

    /// (b) Saturated, behind a load balancer: settles near the worker count at ≥ 90% of ideal.
    #[test]
    fn behind_a_load_balancer_settles_near_the_worker_count() {
        for workers in [4, 16] {
            for (sname, service) in [("fixed", Service::Fixed(0.2)), ("lognormal", NOISY)] {
                let ideal = workers as f64 / service.mean();
                for seed in SEEDS {
                    let mut sim = Sim::new(seed, workers, Routing::LeastBusy, service, auto10());
                    sim.run_until(600.0);
                    let s = sim.summary(300.0, 600.0);
                    eprintln!(
                        "(b) LB W={workers} {sname} seed {seed}: limit {} [{}..{}], {:.1}/s = {:.0}% \
                         of ideal {ideal:.1}/s, p90 {:.2}s",
                        s.limit,
                        s.low,
                        s.high,
                        s.throughput,
                        100.0 * s.throughput / ideal,
                        s.p90
                    );
                    // W, or the step below it on the limit's grid (a 6% loss is within noise).
                    let floor = workers - workers.div_ceil(5);
                    assert!(
                        (floor..=2 * workers).contains(&s.limit),
                        "W={workers} {sname} seed {seed}: settled at {}",
                        s.limit
                    );
                    assert!(
                        s.low >= workers / 2,
                        "W={workers} seed {seed}: fell to {}",
                        s.low
                    );
                    assert!(
                        s.throughput >= 0.9 * ideal,
                        "W={workers} {sname} seed {seed}: {s:?}"
                    );
                }
            }
        }
    }

    /// (c) Saturated, connections pinned to workers at random: more in flight than workers, and
    /// materially more done than with a fixed limit of W.
    #[test]
    fn pinned_connections_settle_above_the_worker_count() {
        let workers = 4;
        let ideal = workers as f64 / NOISY.mean();
        let mut results = Vec::new();
        for (name, routing) in [("uniform", UNIFORM), ("skewed", SKEWED)] {
            let (mut auto_sum, mut fixed_sum, mut above) = (0.0, 0.0, 0);
            for seed in SEEDS {
                let mut sim = Sim::new(seed, workers, routing, NOISY, auto10());
                sim.run_until(600.0);
                let a = sim.summary(300.0, 600.0);
                let mut sim = Sim::new(seed, workers, routing, NOISY, Control::Fixed(workers));
                sim.run_until(600.0);
                let f = sim.summary(300.0, 600.0);
                eprintln!(
                    "(c) pinned {name} W={workers} seed {seed}: auto limit {} [{}..{}] {:.1}/s \
                     ({:.0}%, p90 {:.2}s) vs fixed {workers}: {:.1}/s ({:.0}%, p90 {:.2}s)",
                    a.limit,
                    a.low,
                    a.high,
                    a.throughput,
                    100.0 * a.throughput / ideal,
                    a.p90,
                    f.throughput,
                    100.0 * f.throughput / ideal,
                    f.p90
                );
                auto_sum += a.throughput;
                fixed_sum += f.throughput;
                above += usize::from(a.limit > workers);
            }
            let n = SEEDS.count() as f64;
            eprintln!(
                "(c) pinned {name}: mean auto {:.1}/s ({:.0}%) vs fixed {workers} {:.1}/s ({:.0}%)",
                auto_sum / n,
                100.0 * auto_sum / n / ideal,
                fixed_sum / n,
                100.0 * fixed_sum / n / ideal
            );
            results.push((name, auto_sum, fixed_sum, above, n));
        }
        // Skewed pinning (as measured: busy workers win accepts) leaves a fixed W far from
        // ideal, and auto recovers much of it. With uniform pinning a fixed W already gets ~75%
        // and auto only matches it on average (some runs far better, some worse): see
        // docs/architecture.md.
        for (name, auto_sum, fixed_sum, above, n) in results {
            assert!(
                auto_sum > if name == "skewed" { 1.2 } else { 0.95 } * fixed_sum,
                "{name}: {auto_sum} vs {fixed_sum}"
            );
            assert!(above as f64 >= 0.8 * n, "{name}: above W in {above} seeds");
        }
    }

    /// (d) A 1 s budget: the limit does not grow to where p90 latency passes half of it.
    #[test]
    fn latency_guard_holds_the_limit_within_the_budget() {
        let budget = Duration::from_secs(1);
        let guard = budget.as_secs_f64() * GUARD;
        for (name, routing) in [
            ("LB", Routing::LeastBusy),
            ("pinned uniform", UNIFORM),
            ("pinned skewed", SKEWED),
        ] {
            for seed in SEEDS {
                let l = limiter(1, 64, 4, budget);
                let mut sim = Sim::auto(seed, 4, routing, NOISY, l);
                sim.run_until(600.0);
                let s = sim.summary(300.0, 600.0);
                // The settled limit's own p90, without the probes around it.
                let mut held: Vec<f64> = sim
                    .log
                    .iter()
                    .filter(|d| d.at >= 300.0 && d.limit == s.limit)
                    .map(|d| d.rtt)
                    .collect();
                held.sort_by(f64::total_cmp);
                let held_p90 = quantile(&held, 0.9);
                eprintln!(
                    "(d) budget 1s {name} W=4 seed {seed}: limit {} [{}..{}] {:.1}/s, p90 {:.2}s \
                     (at the settled limit {held_p90:.2}s; guard {guard:.2}s)",
                    s.limit, s.low, s.high, s.throughput, s.p90
                );
                // Behind a load balancer the guard holds. With pinned connections a step down
                // may not ease p90 (the remaining connections share a worker); the guard then
                // leaves the limit be: latency stays within the budget, not always the guard.
                let bound = if name == "LB" {
                    guard * 1.1
                } else {
                    budget.as_secs_f64()
                };
                assert!(held_p90 <= bound, "{name} seed {seed}: {held_p90}");
            }
        }
    }

    /// (e) `min` and `max` bound every move.
    #[test]
    fn limits_stay_within_bounds() {
        for (min, max, initial, workers) in
            [(5, 7, 6, 1), (5, 7, 6, 32), (3, 3, 3, 8), (2, 64, 64, 4)]
        {
            for routing in [Routing::LeastBusy, SKEWED] {
                let l = limiter(min, max, initial, TEN_S);
                let mut sim = Sim::auto(7, workers, routing, NOISY, l);
                sim.run_until(300.0);
                let s = sim.summary(0.0, 300.0);
                assert!(
                    s.low >= min && s.high <= max,
                    "[{min}, {max}] W={workers}: {s:?}"
                );
            }
        }
        assert_eq!(limiter(1, 8, 99, TEN_S).limit(), 8);
        assert_eq!(limiter(4, 8, 1, TEN_S).limit(), 4);
    }

    /// (f) The backend loses two thirds of its capacity, then gets it back: the limit follows it
    /// down and up within a bounded number of windows.
    #[test]
    fn follows_a_backend_that_loses_capacity_and_recovers() {
        for seed in SEEDS {
            let mut sim = Sim::new(seed, 12, Routing::LeastBusy, NOISY, auto10());
            sim.run_until(300.0);
            let before = sim.summary(200.0, 300.0);
            sim.active = 4;
            sim.run_until(600.0);
            let during = sim.summary(500.0, 600.0);
            sim.active = 12;
            sim.run_until(900.0);
            let after = sim.summary(800.0, 900.0);
            let down = sim.windows_until(300.0, |l| l <= 8);
            let up = sim.windows_until(600.0, |l| l >= 12);
            eprintln!(
                "(f) LB 12 → 4 → 12 workers seed {seed}: limit {} ({:.1}/s) → {} ({:.1}/s, after \
                 {down:?} windows) → {} ({:.1}/s, after {up:?} windows)",
                before.limit,
                before.throughput,
                during.limit,
                during.throughput,
                after.limit,
                after.throughput
            );
            assert!(
                down.is_some_and(|w| w <= 60),
                "seed {seed}: down after {down:?}"
            );
            assert!(up.is_some_and(|w| w <= 20), "seed {seed}: up after {up:?}");
            assert!(during.limit <= 15, "seed {seed}: {during:?}");
            assert!(after.limit >= 12, "seed {seed}: {after:?}");
        }
    }

    /// (f, variant) Every request takes 3× as long but the workers are all there: the best
    /// limit has not changed, and the limit must not collapse.
    #[test]
    fn a_uniformly_slower_backend_keeps_its_limit() {
        for seed in SEEDS {
            let mut sim = Sim::new(seed, 8, Routing::LeastBusy, NOISY, auto10());
            sim.run_until(300.0);
            let before = sim.summary(200.0, 300.0);
            sim.slow = 3.0;
            sim.run_until(900.0);
            let during = sim.summary(300.0, 900.0);
            sim.slow = 1.0;
            sim.run_until(1200.0);
            let after = sim.summary(900.0, 1200.0);
            eprintln!(
                "(f') LB 8 workers 3× slower seed {seed}: limit {} → {} [{}..{}] → {}",
                before.limit, during.limit, during.low, during.high, after.limit
            );
            assert!(
                during.low >= 4 && during.limit >= 7,
                "seed {seed}: {during:?}"
            );
            assert!(after.limit >= 8, "seed {seed}: {after:?}");
        }
    }
}
