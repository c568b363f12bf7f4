//! Opens upstream connections for the bb8 pool: resolves the host on every new connection,
//! rotates across every address it resolves to (an ALB has several, and they change), and speaks
//! HTTP/1.1 over a TCP_NODELAY socket, inside TLS for `https://` upstreams. Resolving,
//! connecting and the TLS handshake all share the upstream's connect timeout; within it, each
//! address gets its own share, so one that never answers cannot keep the others from being tried.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::h1::{Http1, IdleWatch, Stream};
use super::idle::{IdleClock, IdleTimer};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("connect to {addr} failed: {reason}")]
    Refused { addr: String, reason: String },
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("connection to {addr} is closed")]
    Closed { addr: String },
}

/// How long a connection that never served may sit in the pool before the learned idle timer
/// applies to it.
const FRESH_GRACE: Duration = Duration::from_millis(10);

/// One pooled HTTP/1.1 connection to an upstream.
pub struct UpstreamConn {
    pub(crate) io: Http1,
    /// Busy from the moment a request is handed to this connection until its response body has
    /// been relayed to the end; a connection given back while still busy was abandoned
    /// mid-exchange (budget ran out, caller left, error), so the pool must close it. Idle since
    /// it was opened or given back.
    pub(crate) clock: Arc<IdleClock>,
    /// Exchanges completed on this connection; a reused connection is one that may have been
    /// closed by the peer while it sat idle.
    pub(crate) served: u32,
    pub(crate) addr: SocketAddr,
    /// The backend worker it reaches, when the upstream names workers (`worker_header`).
    pub(crate) worker: super::workers::Pinned,
    /// Counts it among its worker's connections while it is open.
    pub(crate) counted: Option<super::workers::Counted>,
    /// Closed once its exchange is over, to make room for a connection that may reach another
    /// worker.
    pub(crate) retire: bool,
}

impl UpstreamConn {
    /// Whether the peer may have closed this connection while it waited: it served before, or
    /// sat idle for more than a moment. A connection opened for this very request cannot have
    /// been idled out, so a failure on it is a real failure.
    pub(crate) fn may_be_stale(&self) -> bool {
        self.served > 0 || self.clock.idle_for() >= std::time::Duration::from_millis(1)
    }
}

/// The shortest attempt one address is given when many share little time: enough for a SYN
/// answered from anywhere in a region, and for a loaded host to accept.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// How long to try the next address: an even share of the time left among the addresses still
/// to try, but never less than `MIN_ATTEMPT` (then the last addresses may get nothing). Time an
/// address did not use, because it refused at once, goes to the ones after it, and the last one
/// gets everything left.
fn attempt_budget(remaining: Duration, addrs_left: usize) -> Duration {
    let share = remaining / u32::try_from(addrs_left.max(1)).unwrap_or(u32::MAX);
    share.max(MIN_ATTEMPT).min(remaining)
}

/// While an upstream is down every connect attempt fails, dozens a second under load: at most one
/// warning per this interval per upstream, carrying the count of the failures it stands for.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Decides which connect outcomes are logged. Pure (the time is passed in), so it is tested
/// without sleeping; metrics count every failure regardless.
#[derive(Debug)]
struct FailureLog {
    interval: Duration,
    last_warning: Option<Instant>,
    /// Failures since the last warning that no warning reported.
    suppressed: u64,
    /// Failures since the last successful connect.
    streak: u64,
    /// Whether a warning reported part of the current streak, which then deserves a line saying
    /// it ended.
    streak_warned: bool,
}

/// A warning to log for a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FailureWarning {
    /// Failures since the previous warning that were not logged.
    suppressed: u64,
    /// Failures in a row, this one included.
    streak: u64,
}

impl FailureLog {
    fn new(interval: Duration) -> Self {
        FailureLog {
            interval,
            last_warning: None,
            suppressed: 0,
            streak: 0,
            streak_warned: false,
        }
    }

    /// A connect failed at `now`: the warning to log, if one is due.
    fn failed(&mut self, now: Instant) -> Option<FailureWarning> {
        self.streak += 1;
        let due = self
            .last_warning
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.last_warning = Some(now);
        self.streak_warned = true;
        Some(FailureWarning {
            suppressed: std::mem::take(&mut self.suppressed),
            streak: self.streak,
        })
    }

    /// A connect succeeded: the length of the streak of failures it ends, when a warning reported
    /// it. The interval is not reset, so an upstream that flaps still gets at most one warning
    /// per interval, and the failures of a streak no warning reported are counted in the next.
    fn succeeded(&mut self) -> Option<u64> {
        let streak = std::mem::take(&mut self.streak);
        std::mem::take(&mut self.streak_warned).then_some(streak)
    }
}

/// Shared between the pool manager and the proxy: counts and the latest connect failure.
#[derive(Default)]
pub struct ConnectorState {
    last_failure: Mutex<Option<(Instant, ConnectError)>>,
    /// Whether any connection to this upstream has ever been opened (readiness can wait for it).
    pub(crate) ever_connected: std::sync::atomic::AtomicBool,
    /// Woken on every failed connect, so a request waiting for a connection to a dead upstream is
    /// answered at once instead of at its deadline.
    pub(crate) failed: Notify,
    /// Failed connects so far, counted before `failed` wakes anyone: a request that registers
    /// for `failed` only after it first looked at the pool compares it to see what it missed.
    pub(crate) failures: AtomicU64,
    /// When the upstream closes idle connections, as far as it has shown.
    pub(crate) idle_timer: IdleTimer,
    /// Whether the upstream's answers wait for our ACKs (see `super::quickack`).
    pub(crate) acks: Arc<super::quickack::AckPolicy>,
}

impl ConnectorState {
    pub fn ever_connected(&self) -> bool {
        self.ever_connected.load(Ordering::Acquire)
    }

    pub fn last_failure(&self) -> Option<(Instant, ConnectError)> {
        self.last_failure.lock().expect("not poisoned").clone()
    }
}

/// TLS to an `https://` upstream: the client configuration and the name checked (and sent as
/// SNI).
pub struct TlsTarget {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
}

pub struct Connector {
    pub(crate) name: Arc<str>,
    host: String,
    port: u16,
    connect_timeout: Duration,
    tls: Option<TlsTarget>,
    next: AtomicUsize,
    pub(crate) state: Arc<ConnectorState>,
    log: Mutex<FailureLog>,
}

impl Connector {
    pub fn new(name: &str, host: &str, port: u16, connect_timeout: Duration) -> Self {
        Connector {
            name: Arc::from(name),
            host: host.to_string(),
            port,
            connect_timeout,
            tls: None,
            next: AtomicUsize::new(0),
            state: Arc::new(ConnectorState::default()),
            log: Mutex::new(FailureLog::new(FAILURE_LOG_INTERVAL)),
        }
    }

    /// Speaks TLS to the upstream.
    pub fn with_tls(mut self, tls: TlsTarget) -> Self {
        self.tls = Some(tls);
        self
    }

    fn record(&self, result: &'static str) {
        metrics::counter!("breakwater_upstream_connects_total",
            "upstream" => self.name.to_string(), "result" => result)
        .increment(1);
    }

    fn fail(&self, err: ConnectError) -> ConnectError {
        let result = if matches!(err, ConnectError::Timeout { .. }) {
            "timeout"
        } else {
            "error"
        };
        self.record(result);
        let now = Instant::now();
        let warning = self.log.lock().expect("not poisoned").failed(now);
        if let Some(w) = warning {
            tracing::warn!(
                upstream = %self.name,
                error = %err,
                suppressed = w.suppressed,
                failures = w.streak,
                "upstream connect failed"
            );
        }
        *self.state.last_failure.lock().expect("not poisoned") = Some((now, err.clone()));
        self.state.failures.fetch_add(1, Ordering::SeqCst);
        self.state.failed.notify_waiters();
        err
    }

    async fn open(&self) -> Result<UpstreamConn, ConnectError> {
        let deadline = Instant::now() + self.connect_timeout;
        let addrs: Vec<SocketAddr> = match tokio::time::timeout_at(
            deadline,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(ConnectError::Resolve {
                    host: self.host.clone(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ConnectError::Resolve {
                    host: self.host.clone(),
                    reason: format!("no answer within {:?}", self.connect_timeout),
                })
            }
        };
        if addrs.is_empty() {
            return Err(ConnectError::Resolve {
                host: self.host.clone(),
                reason: "no addresses".into(),
            });
        }
        let (stream, addr) = self.connect_tcp(&addrs, deadline).await?;
        let _ = stream.set_nodelay(true);
        let stream = super::quickack::QuickAck::new(stream, self.state.acks.clone());
        let Some(tls) = &self.tls else {
            return Ok(self.conn(Stream::Plain(stream), addr));
        };
        // A certificate problem is the same on every address: no point trying them.
        let handshake = tls.connector.connect(tls.name.clone(), stream);
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(stream)) => Ok(self.conn(Stream::Tls(Box::new(stream)), addr)),
            Ok(Err(e)) => Err(ConnectError::Tls {
                addr: addr.to_string(),
                reason: e.to_string(),
            }),
            Err(_) => Err(ConnectError::Timeout {
                addr: addr.to_string(),
                after: self.connect_timeout,
            }),
        }
    }

    /// Opens a TCP connection to one of `addrs` by `deadline`. Each new connection starts at the
    /// next address, so connections spread across all of them; on failure the others are tried,
    /// each within its share of the time left.
    async fn connect_tcp(
        &self,
        addrs: &[SocketAddr],
        deadline: Instant,
    ) -> Result<(TcpStream, SocketAddr), ConnectError> {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..addrs.len() {
            let addr = addrs[first.wrapping_add(i) % addrs.len()];
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let budget = attempt_budget(remaining, addrs.len() - i);
            match tokio::time::timeout(budget, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok((stream, addr)),
                Ok(Err(e)) => {
                    last_err = Some(ConnectError::Refused {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    last_err = Some(ConnectError::Timeout {
                        addr: addr.to_string(),
                        after: budget,
                    })
                }
            }
        }
        // Only reached with no attempt made when resolving used up the whole timeout.
        Err(last_err.unwrap_or_else(|| ConnectError::Timeout {
            addr: addrs[first % addrs.len()].to_string(),
            after: self.connect_timeout,
        }))
    }

    fn conn(&self, stream: Stream, addr: SocketAddr) -> UpstreamConn {
        let clock = Arc::new(IdleClock::new());
        let (watched, state, name) = (clock.clone(), self.state.clone(), self.name.clone());
        // The peer ending a connection that sits idle in the pool is a sample of its idle
        // timer (see `super::idle`).
        let watch = IdleWatch::new(move || {
            tracing::debug!(upstream = %name, %addr, "upstream closed an idle connection");
            if let Some(idle) = watched.closed_while_idle() {
                state.idle_timer.observe(idle);
            }
        });
        let mut io = Http1::new(stream, watch);
        // Watched from the start: a connection the peer closes before its first request is
        // seen as one closed while it idled.
        io.watch_idle();
        UpstreamConn {
            io,
            clock,
            served: 0,
            addr,
            worker: Default::default(),
            counted: None,
            retire: false,
        }
    }
}

impl bb8::ManageConnection for Connector {
    type Connection = UpstreamConn;
    type Error = ConnectError;

    async fn connect(&self) -> Result<UpstreamConn, ConnectError> {
        match self.open().await {
            Ok(c) => {
                self.record("ok");
                let ended = self.log.lock().expect("not poisoned").succeeded();
                if let Some(failures) = ended {
                    tracing::info!(upstream = %self.name, failures, "upstream reachable again");
                }
                self.state.ever_connected.store(true, Ordering::Release);
                Ok(c)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn is_valid(&self, conn: &mut UpstreamConn) -> Result<(), ConnectError> {
        // `ready` fails if the peer closed the connection while it sat idle in the pool.
        let closed = || ConnectError::Closed {
            addr: conn.addr.to_string(),
        };
        if !conn.io.still_open() {
            return Err(closed());
        }
        // About to reach the peer's idle timer: retired rather than raced.
        if let Some(limit) = self.state.idle_timer.retire_after() {
            // A connection opened for a waiting request reaches it after a moment in the pool;
            // retiring it then would only open another.
            let limit = if conn.served == 0 {
                limit.max(FRESH_GRACE)
            } else {
                limit
            };
            if conn.clock.idle_for() >= limit {
                metrics::counter!("breakwater_upstream_connections_retired_total",
                    "upstream" => self.name.to_string())
                .increment(1);
                return Err(closed());
            }
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut UpstreamConn) -> bool {
        conn.clock.is_busy() || conn.io.is_spent()
    }
}

/// bb8 reports connect errors here; the connector already logged and counted them.
#[derive(Debug, Clone, Copy)]
pub struct QuietErrors;

impl bb8::ErrorSink<ConnectError> for QuietErrors {
    fn sink(&self, _: ConnectError) {}
    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ConnectError>> {
        Box::new(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpSocket};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn each_address_gets_a_share_of_the_time_left() {
        assert_eq!(attempt_budget(ms(900), 3), ms(300));
        assert_eq!(attempt_budget(ms(300), 1), ms(300), "the last gets all");
        assert_eq!(
            attempt_budget(ms(500), 8),
            MIN_ATTEMPT,
            "never less than the floor"
        );
        assert_eq!(attempt_budget(ms(50), 3), ms(50), "nor beyond the deadline");
        assert_eq!(attempt_budget(Duration::ZERO, 3), Duration::ZERO);
        assert_eq!(attempt_budget(ms(900), 0), ms(900));
    }

    /// The share each address gets, walking them the way `connect_tcp` does, when each either
    /// never answers (its whole share is spent) or refuses at once (nothing is).
    fn shares(total: Duration, black_holes: &[bool]) -> Vec<Duration> {
        let mut left = total;
        let mut out = Vec::new();
        for (i, hole) in black_holes.iter().enumerate() {
            if left.is_zero() {
                break;
            }
            let budget = attempt_budget(left, black_holes.len() - i);
            out.push(budget);
            if *hole {
                left -= budget;
            }
        }
        out
    }

    #[test]
    fn black_holes_leave_time_for_the_addresses_after_them() {
        assert_eq!(
            shares(ms(900), &[true, true, false]),
            [ms(300), ms(300), ms(300)]
        );
        // A refusal costs nothing: the addresses after it share its time.
        assert_eq!(
            shares(ms(900), &[false, true, false]),
            [ms(300), ms(450), ms(450)]
        );
        // Many addresses and little time: the floor holds, and the addresses beyond what the
        // time allows are not tried.
        assert_eq!(shares(ms(250), &[true; 8]), [ms(100), ms(100), ms(50)]);
    }

    #[test]
    fn connect_failures_are_summarised_while_an_upstream_stays_down() {
        let mut log = FailureLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + ms(s);
        assert_eq!(
            log.failed(at(0)),
            Some(FailureWarning {
                suppressed: 0,
                streak: 1
            }),
            "the first failure is logged at once"
        );
        // 48 attempts in the next 5 s: none logged.
        for i in 1..=48 {
            assert_eq!(log.failed(at(i * 100)), None);
        }
        assert_eq!(log.failed(at(9_999)), None);
        // The interval has passed: one line, counting what it did not log.
        assert_eq!(
            log.failed(at(10_000)),
            Some(FailureWarning {
                suppressed: 49,
                streak: 51
            })
        );
        assert_eq!(log.failed(at(10_001)), None);
        assert_eq!(
            log.succeeded(),
            Some(52),
            "the recovery is logged, with the streak"
        );
        assert_eq!(log.succeeded(), None, "once");
    }

    #[test]
    fn a_new_outage_is_logged_at_once_and_a_flapping_upstream_at_most_once_per_interval() {
        let mut log = FailureLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + ms(s);
        assert_eq!(log.succeeded(), None, "nothing to say without failures");
        assert!(log.failed(at(0)).is_some());
        assert_eq!(log.succeeded(), Some(1));
        // Failing again soon after: still within the interval, so counted, not logged, and its
        // recovery is not logged either (no warning reported it).
        assert_eq!(log.failed(at(2_000)), None);
        assert_eq!(log.succeeded(), None);
        assert_eq!(log.failed(at(3_000)), None);
        // The next warning carries them.
        assert_eq!(
            log.failed(at(10_000)),
            Some(FailureWarning {
                suppressed: 2,
                streak: 2
            })
        );
        assert_eq!(log.succeeded(), Some(2));
        // Long after: a new outage is logged at once, with nothing suppressed.
        assert_eq!(
            log.failed(at(60_000)),
            Some(FailureWarning {
                suppressed: 0,
                streak: 1
            })
        );
    }

    /// A loopback address that never answers: a listener whose accept queue is full and never
    /// drained, so Linux drops further SYNs. `None` where the kernel refuses them instead
    /// (`net.ipv4.tcp_abort_on_overflow`); the returned streams hold the queue full.
    async fn black_hole() -> Option<(TcpListener, Vec<TcpStream>, SocketAddr)> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(ms(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => queued.push(s),
                Ok(Err(_)) => return None,
                Err(_) => return Some((listener, queued, addr)),
            }
        }
        None
    }

    #[tokio::test]
    async fn an_address_that_never_answers_does_not_keep_the_next_from_being_tried() {
        let Some((_hole, _queued, hole)) = black_hole().await else {
            eprintln!("this kernel refuses connections to a full accept queue; nothing to test");
            return;
        };
        let live_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = live_listener.local_addr().unwrap();
        let c = Connector::new("t", "unused", 0, ms(1000));
        // The rotation starts at the first address: the black hole.
        let (_stream, used) = c
            .connect_tcp(&[hole, live], Instant::now() + c.connect_timeout)
            .await
            .expect("the second address is tried within the connect timeout");
        assert_eq!(used, live);

        let err = c
            .connect_tcp(&[hole, hole], Instant::now() + ms(400))
            .await
            .expect_err("nothing answers");
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn connections_rotate_across_addresses_and_skip_refusing_ones() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        let c = Connector::new("t", "unused", 0, ms(2000));
        let mut used = Vec::new();
        for _ in 0..4 {
            let deadline = Instant::now() + c.connect_timeout;
            used.push(c.connect_tcp(&addrs, deadline).await.unwrap().1);
        }
        assert_eq!(used, [addrs[0], addrs[1], addrs[0], addrs[1]]);

        // With one address refusing, every connection lands on the other.
        drop(b);
        for _ in 0..2 {
            let deadline = Instant::now() + c.connect_timeout;
            assert_eq!(c.connect_tcp(&addrs, deadline).await.unwrap().1, addrs[0]);
        }
    }

    #[tokio::test]
    async fn a_connection_the_peer_closes_before_its_first_request_is_not_handed_out() {
        use bb8::ManageConnection;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = Connector::new("t", "127.0.0.1", addr.port(), ms(1000));
        let (conn, accepted) = tokio::join!(c.open(), listener.accept());
        let mut conn = conn.unwrap();
        assert!(
            c.is_valid(&mut conn).await.is_ok(),
            "open while the peer keeps it"
        );
        drop(accepted.unwrap().0);
        // Seen once the runtime's I/O driver has the close: no task polls the connection.
        let mut seen = false;
        for _ in 0..5000 {
            if c.is_valid(&mut conn).await.is_err() {
                seen = true;
                break;
            }
            tokio::time::sleep(ms(1)).await;
        }
        assert!(seen, "the close was never seen");
        assert!(c.has_broken(&mut conn));
    }
}
