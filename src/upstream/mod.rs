//! Upstreams: a bb8 pool of warm keep-alive connections per upstream, and the one call that
//! sends a request over it.

mod connector;

use std::sync::Arc;
use std::time::Duration;

use bb8::{Pool, PooledConnection};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

pub use connector::{ConnectError, Connector, ConnectorState, UpstreamConn};

use crate::body::RequestBody;
use crate::config::UpstreamConfig;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be had: the upstream refuses, does not answer, or does not resolve.
    #[error("{0}")]
    Unavailable(String),
    /// The request failed before any byte of it was written: it provably did not reach the
    /// upstream, so it is safe to try again for any method.
    #[error("request not sent: {0}")]
    NotSent(hyper::Error),
    /// The request failed after it (or part of it) was written.
    #[error("{0}")]
    Failed(hyper::Error),
}

/// A failed send; `unsent` holds the request when it provably never reached the upstream.
pub struct SendError {
    pub error: UpstreamError,
    pub unsent: Option<Request<RequestBody>>,
}

impl SendError {
    fn unsent(error: UpstreamError, req: Request<RequestBody>) -> Self {
        SendError {
            error,
            unsent: Some(req),
        }
    }

    fn sent(error: UpstreamError) -> Self {
        SendError {
            error,
            unsent: None,
        }
    }
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
        conn.busy = !reusable;
        conn.served = conn.served.saturating_add(1);
        conn.idle_since = Instant::now();
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

    /// Sends `req` and returns the response head with the lease that keeps its connection until
    /// the body is relayed.
    ///
    /// A pooled connection may have been closed by the peer while it sat idle. When a request
    /// fails on one before any byte of it was written, it is sent again on a fresh connection.
    /// When it fails on a *reused* connection after being written but before any answer, the
    /// peer closed the connection as the request went out (the keep-alive race: a server closing
    /// an idle connection never reads what arrives on it); it is sent again too if `replay` can
    /// rebuild it. When the request provably never reached the upstream it is handed back with
    /// the error, so a retry policy can send it again.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        replay: Option<&Replay>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        let mut lease = match self.acquire().await {
            Ok(c) => Lease::Pooled(c),
            Err(why) => return Err(SendError::unsent(UpstreamError::Unavailable(why), req)),
        };
        let conn = lease.conn();
        conn.busy = true;
        let reused = conn.may_be_stale();
        let req = match conn.sender.try_send_request(req).await {
            Ok(resp) => return Ok((resp, lease)),
            Err(mut e) => match (e.take_message(), replay) {
                (Some(req), _) => req,
                (None, Some(replay)) if reused && closed_before_answer(e.error()) => replay.build(),
                (None, _) => return Err(SendError::sent(UpstreamError::Failed(e.into_error()))),
            },
        };
        drop(lease);
        metrics::counter!("breakwater_stale_connection_retries_total",
            "upstream" => self.config.name.clone())
        .increment(1);
        tracing::debug!(upstream = %self.config.name, "pooled connection was closed by the peer; sending on a fresh one");
        let mut conn = match self.pool.dedicated_connection().await {
            Ok(c) => c,
            Err(e) => {
                return Err(SendError::unsent(
                    UpstreamError::Unavailable(e.to_string()),
                    req,
                ))
            }
        };
        if let Err(e) = conn.sender.ready().await {
            return Err(SendError::unsent(UpstreamError::NotSent(e), req));
        }
        conn.busy = true;
        match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok((
                resp,
                Lease::Fresh {
                    conn,
                    pool: self.pool.clone(),
                },
            )),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(SendError::unsent(
                    UpstreamError::NotSent(e.into_error()),
                    req,
                )),
                None => Err(SendError::sent(UpstreamError::Failed(e.into_error()))),
            },
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

/// Everything needed to send a request again: small request bodies are read whole before they
/// are sent, so they can be.
#[derive(Clone)]
pub struct Replay {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

impl Replay {
    pub fn build(&self) -> Request<RequestBody> {
        let mut req = Request::new(crate::body::full(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// How often idle connections are checked for `idle_timeout`: often enough that one is closed
/// well before a load balancer that idles out a little later than we do.
fn reaper_rate(idle_timeout: Duration) -> Duration {
    (idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(5))
}
