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
        self.conn().busy = !reusable;
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
}

impl Upstream {
    /// Builds the pool and starts opening its `min_idle` connections in the background.
    pub fn new(config: UpstreamConfig) -> Self {
        let connector = Connector::new(
            &config.name,
            &config.host,
            config.port,
            config.pool.connect_timeout,
        );
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
    /// the body is relayed. A request that failed on a pooled connection before any byte was
    /// written (the peer had closed it) is sent once more on a fresh connection.
    pub async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), UpstreamError> {
        let mut lease = Lease::Pooled(self.acquire().await?);
        let conn = lease.conn();
        conn.busy = true;
        match conn.sender.try_send_request(req).await {
            Ok(resp) => Ok((resp, lease)),
            Err(mut e) => {
                let Some(req) = e.take_message() else {
                    return Err(UpstreamError::Failed(e.into_error()));
                };
                drop(lease);
                metrics::counter!("breakwater_stale_connection_retries_total",
                    "upstream" => self.config.name.clone())
                .increment(1);
                tracing::debug!(upstream = %self.config.name, error = %e.error(), "pooled connection was dead; retrying on a fresh one");
                let mut conn = self
                    .pool
                    .dedicated_connection()
                    .await
                    .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
                conn.sender
                    .ready()
                    .await
                    .map_err(UpstreamError::NotSent)?;
                conn.busy = true;
                match conn.sender.try_send_request(req).await {
                    Ok(resp) => Ok((
                        resp,
                        Lease::Fresh {
                            conn,
                            pool: self.pool.clone(),
                        },
                    )),
                    Err(mut e) => {
                        if e.take_message().is_some() {
                            Err(UpstreamError::NotSent(e.into_error()))
                        } else {
                            Err(UpstreamError::Failed(e.into_error()))
                        }
                    }
                }
            }
        }
    }

    /// A connection from the pool; fails at once when connecting is failing and nothing is open
    /// that could come back.
    async fn acquire(&self) -> Result<PooledConnection<'static, Connector>, UpstreamError> {
        let get = self.pool.get_owned();
        tokio::pin!(get);
        loop {
            let failed = self.connector.failed.notified();
            tokio::pin!(failed);
            failed.as_mut().enable();
            tokio::select! {
                got = &mut get => {
                    return got.map_err(|e| UpstreamError::Unavailable(match self.connector.last_failure() {
                        Some((_, err)) => err.to_string(),
                        None => e.to_string(),
                    }));
                }
                _ = &mut failed => {
                    if self.pool.state().connections == 0 {
                        let why = self.connector.last_failure()
                            .map(|(_, e)| e.to_string())
                            .unwrap_or_else(|| "connect failed".into());
                        return Err(UpstreamError::Unavailable(why));
                    }
                }
            }
        }
    }
}

/// How often idle connections are checked for `idle_timeout`: often enough that one is closed
/// well before a load balancer that idles out a little later than we do.
fn reaper_rate(idle_timeout: Duration) -> Duration {
    (idle_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(5))
}
