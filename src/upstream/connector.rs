//! Opens upstream connections for the bb8 pool: resolves the host on every new connection,
//! rotates across every address it resolves to (an ALB has several, and they change), and speaks
//! HTTP/1.1 over a TCP_NODELAY socket, inside TLS for `https://` upstreams. Resolving,
//! connecting and the TLS handshake all share the upstream's connect timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::idle::{IdleClock, IdleTimer};
use crate::body::RequestBody;

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

/// Largest upstream response head accepted.
const UPSTREAM_MAX_HEAD: usize = 64 * 1024;

/// One pooled HTTP/1.1 connection to an upstream.
pub struct UpstreamConn {
    pub(crate) sender: http1::SendRequest<RequestBody>,
    /// Busy from the moment a request is handed to this connection until its response body has
    /// been relayed to the end; a connection given back while still busy was abandoned
    /// mid-exchange (budget ran out, caller left, error), so the pool must close it. Idle since
    /// it was opened or given back.
    pub(crate) clock: Arc<IdleClock>,
    /// Exchanges completed on this connection; a reused connection is one that may have been
    /// closed by the peer while it sat idle.
    pub(crate) served: u32,
    pub(crate) addr: SocketAddr,
    task: tokio::task::AbortHandle,
}

impl UpstreamConn {
    /// Whether the peer may have closed this connection while it waited: it served before, or
    /// sat idle for more than a moment. A connection opened for this very request cannot have
    /// been idled out, so a failure on it is a real failure.
    pub(crate) fn may_be_stale(&self) -> bool {
        self.served > 0 || self.clock.idle_for() >= std::time::Duration::from_millis(1)
    }
}

impl Drop for UpstreamConn {
    fn drop(&mut self) {
        // Closes the socket even if the connection task is waiting on a response.
        self.task.abort();
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
    /// When the upstream closes idle connections, as far as it has shown.
    pub(crate) idle_timer: IdleTimer,
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
        tracing::warn!(upstream = %self.name, error = %err, "upstream connect failed");
        *self.state.last_failure.lock().expect("not poisoned") =
            Some((Instant::now(), err.clone()));
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
        // Each new connection starts at the next address, so connections spread across all of
        // them; on failure the others are tried within the same connect timeout.
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..addrs.len() {
            let addr = addrs[(first + i) % addrs.len()];
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let Some(tls) = &self.tls else {
                        return self.handshake(stream, addr).await;
                    };
                    // A certificate problem is the same on every address: no point trying them.
                    let handshake = tls.connector.connect(tls.name.clone(), stream);
                    return match tokio::time::timeout_at(deadline, handshake).await {
                        Ok(Ok(stream)) => self.handshake(stream, addr).await,
                        Ok(Err(e)) => Err(ConnectError::Tls {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }),
                        Err(_) => Err(ConnectError::Timeout {
                            addr: addr.to_string(),
                            after: self.connect_timeout,
                        }),
                    };
                }
                Ok(Err(e)) => {
                    last_err = Some(ConnectError::Refused {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(ConnectError::Timeout {
                        addr: addr.to_string(),
                        after: self.connect_timeout,
                    })
                }
            }
        }
        Err(last_err.expect("at least one address was tried"))
    }

    async fn handshake<S>(&self, stream: S, addr: SocketAddr) -> Result<UpstreamConn, ConnectError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            // An upstream answer whose head does not fit is refused (502), not buffered.
            .max_header_size(UPSTREAM_MAX_HEAD)
            .handshake::<_, RequestBody>(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Refused {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        let name = self.name.clone();
        let clock = Arc::new(IdleClock::new());
        let (watched, state) = (clock.clone(), self.state.clone());
        // The task ends when the connection does; it is aborted when the pool drops the
        // connection, so an end seen here is the peer's doing.
        let task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %name, %addr, error = %e, "upstream connection ended");
            }
            if let Some(idle) = watched.closed_while_idle() {
                state.idle_timer.observe(idle);
            }
        })
        .abort_handle();
        Ok(UpstreamConn {
            sender,
            clock,
            served: 0,
            addr,
            task,
        })
    }
}

impl bb8::ManageConnection for Connector {
    type Connection = UpstreamConn;
    type Error = ConnectError;

    async fn connect(&self) -> Result<UpstreamConn, ConnectError> {
        match self.open().await {
            Ok(c) => {
                self.record("ok");
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
        if conn.sender.is_closed() {
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
        // An idle connection is ready at once (or fails at once if closed); one just given
        // back becomes ready as soon as its task has seen the end of the last exchange.
        conn.sender.ready().await.map_err(|_| closed())
    }

    fn has_broken(&self, conn: &mut UpstreamConn) -> bool {
        conn.clock.is_busy() || conn.sender.is_closed()
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
