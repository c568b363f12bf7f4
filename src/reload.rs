//! Reloading the configuration (SIGHUP, `POST /reload`): the file is read and validated again and
//! the whole routing table is swapped atomically. Requests in flight keep the table they started
//! with. An invalid file changes nothing.
//!
//! The listener's TLS certificate is read again on every reload too, whatever becomes of the
//! configuration: a renewed certificate must not wait for a valid config file.
//!
//! All of it reads files, so it runs on tokio's blocking pool ([`reload`]).

use std::sync::Arc;

use crate::config::{self, Config, ConfigError};
use crate::prepare::{self, Loaded};
use crate::proxy::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the gateway was not started from a file, so there is nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the reload was cancelled: the gateway is shutting down")]
    Cancelled,
}

/// What a successful reload could not apply.
#[derive(Debug, Default)]
pub struct Applied {
    /// Every key whose value in the file differs from the one in force until a restart
    /// ([`config::RESTART_KEYS`]), whether this reload or an earlier one changed it.
    pub needs_restart: Vec<&'static str>,
}

/// Re-reads the config file (with environment overrides) and the files it names, and applies it.
/// Reading and checking files blocks, so it runs on tokio's blocking pool: a slow disk never
/// stalls the requests that share a runtime thread with the caller.
pub async fn reload(shared: Arc<Shared>) -> Result<Applied, ReloadError> {
    match tokio::task::spawn_blocking(move || reload_blocking(&shared)).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(ReloadError::Cancelled),
    }
}

/// [`reload`] on the calling thread, which may block on file reads.
pub fn reload_blocking(shared: &Shared) -> Result<Applied, ReloadError> {
    let _one_at_a_time = shared.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let result = shared
        .config_path
        .as_ref()
        .ok_or(ReloadError::NoFile)
        .and_then(|path| prepare::load(path).map_err(ReloadError::from))
        .map(|loaded| apply(shared, loaded));
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("breakwater_config_reloads_total", "result" => outcome).increment(1);
    match &result {
        Ok(applied) => {
            tracing::info!(
                needs_restart =
                    (!applied.needs_restart.is_empty()).then(|| applied.needs_restart.join(",")),
                "configuration reloaded"
            );
            log_warnings(&shared.table.load().config);
        }
        Err(ReloadError::Config(e)) => {
            for p in e.problems() {
                tracing::error!(key = %p.key, problem = %p.message, "reload rejected; keeping the running configuration");
            }
        }
        Err(e) => tracing::error!(error = %e, "reload rejected"),
    }
    // Logged and counted (breakwater_tls_reloads_total) by the reload itself; a certificate that
    // does not load leaves the one in use.
    if let Some(tls) = &shared.server_tls {
        let _ = tls.reload("reload");
    }
    result
}

/// Logs each of [`config::warnings`] once, at start and after each reload, so that a
/// self-defeating setting shows up in the logs of the deployment that has it.
pub fn log_warnings(config: &Config) {
    for w in config::warnings(config) {
        tracing::warn!(key = %w.key, warning = %w.message, "configuration warning");
    }
}

/// Swaps in `new`. Keys that live in bound sockets, the listener, the runtime or the logger keep
/// their running values; each whose file value differs is reported rather than silently ignored,
/// and `GET /config` lists it as pending a restart.
pub fn apply(shared: &Shared, new: Loaded) -> Applied {
    let Loaded {
        config: new,
        prepared,
    } = new;
    let old = shared.table.load_full();
    let new = config::in_force(&old.config, new);
    let applied = Applied {
        needs_restart: new.pending_restart.iter().map(|p| p.key).collect(),
    };
    for p in &new.pending_restart {
        tracing::warn!(
            key = p.key,
            running = %p.running,
            file = %p.file,
            "this key takes effect after a restart"
        );
    }
    // The certificate read for `prepared` only checked the files: the listener keeps the one it
    // started with (new paths need a restart, reported above).
    let table = Arc::new(old.rebuild(new, &prepared));
    shared.table.store(table.clone());
    // A drain that has begun keeps its deadline: routes of the new table (new admission state
    // when their limits changed) refuse what cannot finish before the process exits, as the old
    // ones do. Read after the store: see `Running::drain`.
    let drain = *shared
        .drain_deadline
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(deadline) = drain {
        tracing::info!("reloaded while draining; the drain deadline still holds");
        for route in &table.routes {
            route.admission.begin_drain(deadline);
        }
    }
    applied
}
