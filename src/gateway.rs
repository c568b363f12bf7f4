//! Starting and stopping a whole gateway: listeners, upstream pools, admin endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::prepare::Loaded;
use crate::proxy::{Proxy, Shared, Table};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker {index}: {source}")]
    Worker {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A started gateway. Dropping it stops accepting new connections and ends the extra workers'
/// threads with whatever they still serve; [`Running::drain`] first waits for open connections,
/// on every worker, to finish.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    tasks: Vec<JoinHandle<()>>,
    /// Dropped last: each extra worker's runtime runs until this goes away.
    _workers: Option<Workers>,
}

/// The workers after the first (which is the caller's runtime): a thread each, with its own
/// current-thread runtime and its own listening socket.
struct Workers {
    _stop: watch::Sender<()>,
}

/// Binds the listeners, builds the upstream pools and waits (at most each upstream's connect
/// timeout) for their `min_idle` connections, then starts serving.
pub async fn start(loaded: Loaded) -> Result<Running, StartError> {
    start_from(loaded, None).await
}

/// Like [`start`], remembering the file the config came from so it can be reloaded.
pub async fn start_from(loaded: Loaded, path: Option<PathBuf>) -> Result<Running, StartError> {
    let Loaded { config, prepared } = loaded;
    crate::reload::log_warnings(&config);
    let bind_error = |source| StartError::Bind {
        what: "server.listen",
        addr: config.server.listen,
        source,
    };
    // One worker (or the default multi-thread runtime) accepts on one plain socket; more each
    // get their own socket on the same port (see `listener::bind_group`).
    let workers = config.server.workers.unwrap_or(1);
    let (listener, others) = if workers > 1 {
        let mut group = crate::listener::bind_group(
            config.server.listen,
            config.server.listen_backlog,
            workers,
        )
        .map_err(bind_error)?;
        let first = tokio::net::TcpListener::from_std(group.remove(0)).map_err(bind_error)?;
        (first, group)
    } else {
        let listener = crate::listener::bind(config.server.listen, config.server.listen_backlog)
            .map_err(bind_error)?;
        (listener, Vec::new())
    };
    let addr = listener.local_addr().expect("bound socket has an address");
    let admin = match config.admin.listen {
        Some(a) => Some(
            crate::listener::bind(a, 128).map_err(|source| StartError::Bind {
                what: "admin.listen",
                addr: a,
                source,
            })?,
        ),
        None => None,
    };
    let admin_addr = admin
        .as_ref()
        .map(|l| l.local_addr().expect("bound socket has an address"));
    crate::admin::metrics_handle();

    let table = Table::new(config.clone(), &prepared);
    // The gateway owns the listener's certificate from here on: reloads and the file watcher
    // re-read the files into this one handle, which every handshake reads.
    let server_tls = prepared.server_tls.map(Arc::new);
    let warmups = table.upstreams.values().map(|u| {
        let u = u.clone();
        async move {
            if !u.warm_up(u.config.pool.connect_timeout).await {
                tracing::warn!(upstream = %u.config.name, "upstream pool not warm at start; will keep trying on demand");
            }
        }
    });
    futures_util::future::join_all(warmups).await;

    let shared = Arc::new(Shared {
        table: ArcSwap::from_pointee(table),
        config_path: path,
        reloading: std::sync::Mutex::new(()),
        draining: AtomicBool::new(false),
        drain_deadline: std::sync::Mutex::new(None),
        server_tls: server_tls.clone(),
    });
    let (shutdown, rx) = watch::channel(false);
    let max_connections = config.server.max_connections;
    let connections = Arc::new(Semaphore::new(max_connections));
    let serving = crate::listener::Serving::new(
        config.server.clone(),
        server_tls.clone(),
        connections.clone(),
        rx.clone(),
    );
    let workers = start_workers(others, &shared, &serving)?;
    let mut tasks = vec![tokio::spawn(crate::listener::serve(
        listener,
        Proxy::new(shared.clone()),
        serving,
        0,
    ))];
    if let Some(tls) = &server_tls {
        tracing::info!(
            cert = %tls.cert.display(),
            sha256 = %tls.fingerprint(),
            "serving HTTPS; certificate files are checked for changes every {:?}",
            crate::tls::WATCH_INTERVAL
        );
        tasks.push(tokio::spawn(
            tls.clone().watch(crate::tls::WATCH_INTERVAL, rx.clone()),
        ));
    }
    if let Some(admin) = admin {
        // The admin listener keeps answering while draining (readyz turns 503); it stops with
        // the process.
        tasks.push(tokio::spawn(crate::admin::serve(admin, shared.clone())));
    }
    tracing::info!(%addr, admin = admin_addr.map(tracing::field::display), routes = config.routes.len(), workers = config.server.workers.unwrap_or(1), "breakwater listening");
    Ok(Running {
        addr,
        admin_addr,
        shared,
        shutdown,
        connections,
        max_connections,
        tasks,
        _workers: workers,
    })
}

/// How many tasks a runtime polls before it looks at the sockets and timers again when tasks are
/// still ready (tokio's default is 61). Under load a tick readies a task per busy client
/// connection and another per upstream connection, more than 61 at 64 connections, and the
/// default cut each batch with an extra look at the sockets (`epoll_wait` 0.07 → 0.04 per
/// request at 200, and 0.5–1 µs of CPU less per request: docs/benchmarks.md §13). Sockets and
/// timers still wait at most 200 short polls, well under a millisecond, to be looked at.
pub const EVENT_INTERVAL: u32 = 200;

/// Starts a thread per listener in `listeners`, each serving it on a current-thread runtime of
/// its own (worker 1, 2, ...). They share everything behind the listener with the caller's
/// runtime: the routing table, admission, upstream pools, the connection limits and the
/// shutdown signal. A pooled upstream connection's task runs on the runtime that opened it, so a
/// worker using a connection another opened wakes that worker's thread to drive it.
fn start_workers(
    listeners: Vec<std::net::TcpListener>,
    shared: &Arc<Shared>,
    serving: &crate::listener::Serving,
) -> Result<Option<Workers>, StartError> {
    if listeners.is_empty() {
        return Ok(None);
    }
    let (stop, stopped) = watch::channel(());
    for (i, listener) in listeners.into_iter().enumerate() {
        let index = i + 1;
        let failed = |source| StartError::Worker { index, source };
        let rt = tokio::runtime::Builder::new_current_thread()
            .event_interval(EVENT_INTERVAL)
            .enable_all()
            .build()
            .map_err(failed)?;
        // Registered with the worker's own runtime, so its readiness wakes that thread.
        let listener = {
            let _in_worker = rt.enter();
            tokio::net::TcpListener::from_std(listener).map_err(failed)?
        };
        let (proxy, serving, mut stopped) =
            (Proxy::new(shared.clone()), serving.clone(), stopped.clone());
        std::thread::Builder::new()
            .name(format!("breakwater-worker-{index}"))
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(crate::listener::serve(listener, proxy, serving, index));
                    // The accept loop ends on the shutdown signal, but the connections it
                    // spawned run on this runtime until the gateway is done with them.
                    while stopped.changed().await.is_ok() {}
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .map_err(failed)?;
    }
    Ok(Some(Workers { _stop: stop }))
}

impl Running {
    /// `server.drain_timeout` as it is in force now: a reload may have changed it since start.
    pub fn drain_timeout(&self) -> Duration {
        self.shared.table.load().config.server.drain_timeout
    }

    /// Stops accepting, closes idle connections, lets in-flight requests finish, and returns once
    /// every connection has closed or `timeout` has passed. Returns whether it drained fully.
    pub async fn drain(self, timeout: Duration) -> bool {
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        // Recorded before the routes are told, so that a table a concurrent reload stores is
        // either seen here or finds the deadline itself (`reload::apply`).
        *self
            .shared
            .drain_deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        for route in &self.shared.table.load().routes {
            route.admission.begin_drain(deadline);
        }
        let all = self.max_connections.min(u32::MAX as usize) as u32;
        let drained = tokio::time::timeout(timeout, self.connections.acquire_many(all))
            .await
            .is_ok();
        for t in self.tasks {
            t.abort();
        }
        drained
    }
}

/// The running configuration as `GET /config` shows it: [`crate::config::describe`] of what is in
/// force, with how many API keys each `auth:` block loaded, and under `pending_restart` each key
/// whose file value a reload could not apply (`key`, `running`, `file`).
pub fn describe(table: &Table) -> serde_json::Value {
    let mut v = crate::config::describe(&table.config);
    v["pending_restart"] = table
        .config
        .pending_restart
        .iter()
        .map(|p| serde_json::json!({ "key": p.key, "running": p.running, "file": p.file }))
        .collect();
    let keys_loaded = |at: &mut serde_json::Value, auth: Option<&crate::auth::Authenticator>| {
        if let (Some(a), Some(k)) = (auth, at.get_mut("api_keys").filter(|k| k.is_object())) {
            k["keys_loaded"] = serde_json::json!(a.keys_loaded());
        }
    };
    keys_loaded(&mut v["auth"], table.auth.as_deref());
    for (i, r) in table.routes.iter().enumerate() {
        keys_loaded(&mut v["routes"][i]["auth"], r.auth.as_deref());
    }
    v
}
