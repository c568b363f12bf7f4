//! Settings that are valid, and run, but quietly defeat themselves: a budget the caller never
//! waits out, a queue wait the budget cuts short, a route allowed more requests than its pool has
//! connections, a drain shorter than the requests it drains. `check` prints them; a running
//! gateway logs them at start and after every reload.

use std::fmt;
use std::time::Duration;

use super::units::format_duration;
use super::{Concurrency, Config};

/// The longest a Genesys Cloud data action waits for an answer (its timeout is 1–60 s).
pub const DATA_ACTION_LIMIT: Duration = Duration::from_secs(60);

/// A setting that is probably not what was meant, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

pub fn warnings(c: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |key: String, message: String| out.push(Warning { key, message });
    let d = format_duration;
    for (i, r) in c.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if r.budget > DATA_ACTION_LIMIT {
            warn(
                format!("{key}.budget"),
                format!(
                    "`{}` is longer than {} s, the most a Genesys Cloud data action waits: a caller that is a data action gives up before the gateway's answer or timeout answer reaches it",
                    d(r.budget),
                    DATA_ACTION_LIMIT.as_secs()
                ),
            );
        }
        if let Some(caller) = r.caller_timeout {
            if r.budget > caller {
                warn(
                    format!("{key}.budget"),
                    format!(
                        "`{}` is longer than `{key}.caller_timeout` (`{}`): the caller gives up before the gateway's timeout answer or fallback reaches it; set the budget a little below the caller's timeout",
                        d(r.budget),
                        d(caller)
                    ),
                );
            }
            if caller > DATA_ACTION_LIMIT {
                warn(
                    format!("{key}.caller_timeout"),
                    format!(
                        "`{}` is longer than {} s, the longest timeout a Genesys Cloud data action can have",
                        d(caller),
                        DATA_ACTION_LIMIT.as_secs()
                    ),
                );
            }
        }
        if r.queue.max_wait > r.budget {
            warn(
                format!("{key}.queue.max_wait"),
                format!(
                    "`{}` is longer than the route's budget (`{}`): a queued request is answered when its budget runs out, so it never waits that long",
                    d(r.queue.max_wait),
                    d(r.budget)
                ),
            );
        }
        // Spreading over workers needs idle connections beside the ones in use: a connection
        // whose worker is busy is passed over for another, and new ones land where the kernel
        // puts them.
        if let Some(up) = c
            .upstreams
            .get(&r.upstream)
            .filter(|u| u.worker_header.is_some())
        {
            let most = match &r.concurrency {
                Concurrency::Fixed(n) => *n,
                Concurrency::Adaptive { max, .. } => *max,
            };
            let pool = up.pool.max_connections as usize;
            if pool < 2 * most.min(up.capacity().unwrap_or(usize::MAX)) {
                warn(
                    format!("upstreams.{}.pool.max_connections", up.name),
                    format!(
                        "`{pool}` is less than twice `{key}.concurrency` (`{most}`): with `worker_header` set, the pool needs spare connections to find a free worker, or requests queue inside busy workers",
                    ),
                );
            }
        }
        // Endpoints with limits of their own cap the route at run time; only a pool can be
        // outgrown unnoticed.
        if let Some(up) = c
            .upstreams
            .get(&r.upstream)
            .filter(|u| u.capacity().is_none())
        {
            let endpoints = up.endpoints.len();
            let pool = up.pool.max_connections as usize * endpoints;
            let over = if endpoints > 1 {
                format!(" × {endpoints} endpoints")
            } else {
                String::new()
            };
            let (shown, most) = match &r.concurrency {
                Concurrency::Fixed(n) => (n.to_string(), *n),
                Concurrency::Adaptive { max, .. } => (format!("max {max}"), *max),
            };
            if most > pool {
                warn(
                    format!("{key}.concurrency"),
                    format!(
                        "`{shown}` is above `upstreams.{}.pool.max_connections` (`{}`{over}): requests beyond {pool} in flight wait for a pool connection inside their budget instead of in the route's queue, where they are bounded and refused early",
                        up.name, up.pool.max_connections
                    ),
                );
            }
        }
    }
    let longest = c.routes.iter().enumerate().max_by_key(|(_, r)| r.budget);
    if let Some((i, r)) = longest {
        if c.server.drain_timeout < r.budget {
            warn(
                "server.drain_timeout".into(),
                format!(
                    "`{}` is shorter than the longest route budget (`{}`, routes[{i}] `{}`): a request admitted just before shutdown may be cut off when the drain ends",
                    d(c.server.drain_timeout),
                    d(r.budget),
                    r.name
                ),
            );
        }
    }
    out
}
