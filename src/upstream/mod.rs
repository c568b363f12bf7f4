//! Upstreams: a bb8 pool of warm keep-alive connections per upstream, and the one call that
//! sends a request over it once.

mod connector;
mod idle;

use std::sync::Arc;
use std::time::Duration;

use bb8::{Pool, PooledConnection};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

pub use connector::{ConnectError, Connector, ConnectorState, UpstreamConn};

use crate::body::RequestBody;
use crate::config::UpstreamConfig;

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
    NotWritten { error: hyper::Error, reused: bool },
    /// The connection was closed after the request was written and before any byte of an answer
    /// came back. On a reused connection this is usually the keep-alive race (the peer closed
    /// the idle connection as the request went out, and never read it), but the upstream may
    /// also have read the request and died working on it: nobody can tell.
    #[error("connection closed before any answer: {error}")]
    ClosedBeforeAnswer { error: hyper::Error, reused: bool },
    /// Any other failure after the request was written.
    #[error("{0}")]
    Failed(hyper::Error),
}

/// A failed attempt; `unsent` holds the request when hyper handed it back unwritten.
pub struct SendError {
    pub failure: SendFailure,
    pub unsent: Option<Request<RequestBody>>,
}

/// An attempt the upstream answered.
pub struct Answered {
    pub head: Response<Incoming>,
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

/// A connection lent to one exchange. Give it back with [`Lease::release`] once the response
/// body has been relayed to the end; dropped any other way, the connection is closed.
pub enum Lease {
    Pooled(PooledConnection<'static, Connector>),
    /// Opened outside the pool to retry a request whose pooled connection was dead; offered to
    /// the pool when done.
    Fresh {
        conn: UpstreamConn,
        pool: Pool<Connector>,
    },
}

impl Lease {
    fn conn(&mut self) -> &mut UpstreamConn {
        match self {
            Lease::Pooled(c) => c,
            Lease::Fresh { conn, .. } => conn,
        }
    }

    pub fn release(mut self, reusable: bool) {
        let conn = self.conn();
        conn.clock.went_idle(reusable);
        conn.served = conn.served.saturating_add(1);
        if let Lease::Fresh { conn, pool } = self {
            if reusable {
                let _ = pool.add(conn);
            }
        }
    }
}

pub struct Upstream {
    pub config: UpstreamConfig,
    pub pool: Pool<Connector>,
    pub connector: Arc<ConnectorState>,
    /// Built from `config.tls` and the files it names (exactly for `https://` upstreams).
    pub tls: Option<crate::tls::ClientTls>,
}

impl Upstream {
    /// Builds the pool and starts opening its `min_idle` connections in the background.
    pub fn new(config: UpstreamConfig, tls: Option<crate::tls::ClientTls>) -> Self {
        let mut connector = Connector::new(
            &config.name,
            &config.host,
            config.port,
            config.pool.connect_timeout,
        );
        let client = tls;
        if let Some(tls) = &config.tls {
            if tls.insecure_skip_verify {
                tracing::warn!(
                    upstream = %config.name,
                    "tls.insecure_skip_verify is set: the upstream's certificate is NOT verified; \
                     anyone on the path can impersonate it"
                );
            }
            connector = connector.with_tls(connector::TlsTarget {
                connector: tokio_rustls::TlsConnector::from(
                    client
                        .as_ref()
                        .expect("an https upstream has its TLS client")
                        .config(),
                ),
                name: tls.name.clone(),
            });
        }
        let state = connector.state.clone();
        let p = &config.pool;
        let pool = Pool::builder()
            .max_size(p.max_connections)
            .min_idle(Some(p.min_idle))
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
            .error_sink(Box::new(connector::QuietErrors))
            .build_unchecked(connector);
        Upstream {
            config,
            pool,
            connector: state,
            tls: client,
        }
    }

    /// Waits (at most `limit`) until the pool holds its `min_idle` connections, so the first
    /// burst does not pay for connects. Returns whether it got there.
    pub async fn warm_up(&self, limit: Duration) -> bool {
        let want = self.config.pool.min_idle;
        let deadline = Instant::now() + limit;
        loop {
            if self.pool.state().idle_connections >= want {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Sends `req` once, on one connection, and returns the response head with the lease that
    /// keeps its connection until the body is relayed. Whether a failed attempt is sent again is
    /// not decided here: see `crate::retry`.
    pub async fn send(&self, req: Request<RequestBody>, via: Via) -> Result<Answered, SendError> {
        let no_connection = |why: String, req| SendError {
            failure: SendFailure::NoConnection(why),
            unsent: Some(req),
        };
        let mut lease = match via {
            Via::Pool => match self.acquire().await {
                Ok(c) => Lease::Pooled(c),
                Err(why) => return Err(no_connection(why, req)),
            },
            Via::Fresh => match self.pool.dedicated_connection().await {
                Ok(conn) => Lease::Fresh {
                    conn,
                    pool: self.pool.clone(),
                },
                Err(e) => return Err(no_connection(e.to_string(), req)),
            },
        };
        let conn = lease.conn();
        if via == Via::Fresh {
            if let Err(error) = conn.sender.ready().await {
                return Err(SendError {
                    failure: SendFailure::NotWritten {
                        error,
                        reused: false,
                    },
                    unsent: Some(req),
                });
            }
        }
        conn.clock.set_busy();
        let reused = via == Via::Pool && conn.may_be_stale();
        let written_at = Instant::now();
        match conn.sender.try_send_request(req).await {
            Ok(resp) => {
                let conn = lease.conn();
                if let Some(timer) = idle::announced(resp.headers()) {
                    self.connector.idle_timer.observe(timer);
                }
                if closes(&resp) {
                    conn.clock.mark_closing();
                }
                Ok(Answered {
                    head: resp,
                    lease,
                    written_at,
                })
            }
            Err(mut e) => {
                let unsent = e.take_message();
                let error = e.into_error();
                let failure = if unsent.is_some() {
                    SendFailure::NotWritten { error, reused }
                } else if closed_before_answer(&error) {
                    SendFailure::ClosedBeforeAnswer { error, reused }
                } else {
                    SendFailure::Failed(error)
                };
                Err(SendError { failure, unsent })
            }
        }
    }

    /// A connection from the pool; fails at once when connecting is failing and nothing is open
    /// that could come back.
    async fn acquire(&self) -> Result<PooledConnection<'static, Connector>, String> {
        let get = self.pool.get_owned();
        tokio::pin!(get);
        loop {
            let failed = self.connector.failed.notified();
            tokio::pin!(failed);
            failed.as_mut().enable();
            tokio::select! {
                got = &mut get => {
                    return got.map_err(|e| match self.connector.last_failure() {
                        Some((_, err)) => err.to_string(),
                        None => e.to_string(),
                    });
                }
                _ = &mut failed => {
                    if self.pool.state().connections == 0 {
                        let why = self.connector.last_failure()
                            .map(|(_, e)| e.to_string())
                            .unwrap_or_else(|| "connect failed".into());
                        return Err(why);
                    }
                }
            }
        }
    }
}

/// The upstream said it closes the connection after this answer.
fn closes(resp: &Response<Incoming>) -> bool {
    let close = resp
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    close || resp.version() == http::Version::HTTP_10
}

/// The connection ended before any answer arrived: closed or reset by the peer.
fn closed_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// How often idle connections are checked for `idle_timeout`: often enough that one is closed
/// well before a load balancer that idles out a little later than we do.
fn reaper_rate(idle_timeout: Duration) -> Duration {
    (idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(5))
}
