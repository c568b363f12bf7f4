//! Reloading the configuration (SIGHUP, `POST /reload`): the file is read and validated again and
//! the whole routing table is swapped atomically. Requests in flight keep the table they started
//! with. An invalid file changes nothing.
//!
//! The listener's TLS certificate is read again on every reload too, whatever becomes of the
//! configuration: a renewed certificate must not wait for a valid config file.

use std::sync::Arc;

use crate::config::{self, Config, ConfigError};
use crate::proxy::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the gateway was not started from a file, so there is nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What a successful reload could not apply.
#[derive(Debug, Default)]
pub struct Applied {
    pub needs_restart: Vec<&'static str>,
}

/// Re-reads the config file (with environment overrides) and applies it.
pub fn reload(shared: &Shared) -> Result<Applied, ReloadError> {
    let _one_at_a_time = shared.reloading.lock().unwrap_or_else(|p| p.into_inner());
    let result = shared
        .config_path
        .as_ref()
        .ok_or(ReloadError::NoFile)
        .and_then(|path| config::load(path).map_err(ReloadError::from))
        .map(|c| apply(shared, c));
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("breakwater_config_reloads_total", "result" => outcome).increment(1);
    match &result {
        Ok(applied) => {
            tracing::info!(
                needs_restart =
                    (!applied.needs_restart.is_empty()).then(|| applied.needs_restart.join(",")),
                "configuration reloaded"
            )
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
    if let Some(tls) = &shared.table.load().config.server.tls {
        let _ = tls.reload("reload");
    }
    result
}

/// Swaps in `new`. Settings that live in bound sockets or the runtime only take effect on
/// restart; they are reported rather than silently ignored.
pub fn apply(shared: &Shared, mut new: Config) -> Applied {
    let old = shared.table.load_full();
    let mut applied = Applied::default();
    if old.config.server != new.server {
        applied.needs_restart.push("server");
    }
    if old.config.admin != new.admin {
        applied.needs_restart.push("admin");
    }
    if old.config.log != new.log {
        applied.needs_restart.push("log");
    }
    // The listener reads its certificate from the handle it started with; keep that handle in
    // the configuration so reloads reach it. (New file paths need a restart, reported above with
    // the rest of `server`.)
    if let (Some(live), Some(next)) = (&old.config.server.tls, &mut new.server.tls) {
        *next = live.clone();
    }
    for section in &applied.needs_restart {
        tracing::warn!(
            section,
            "changes to this section take effect after a restart"
        );
    }
    let table = old.rebuild(new);
    shared.table.store(Arc::new(table));
    applied
}
