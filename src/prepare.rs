//! From a validated [`Config`] to what a gateway runs with: the files and secrets the
//! configuration names, read and checked. Validation reads nothing but the config text; this is
//! where the listener's certificate, upstream CA bundles and client certificates, and API keys
//! and passwords are loaded: when the gateway starts, when `breakwater check` runs (which builds
//! all of this without binding anything), and on every reload. Each problem is reported under the
//! key that named the file or variable, together with validation's own problems.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::auth::{Authenticator, Env};
use crate::config::{self, AuthOrigin, Config, ConfigError, Problem};
use crate::tls::{ClientTls, FileProblem, ServerTls, TlsFile};

/// What a configuration needs from outside its file, loaded.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The listener's certificate (with `server.tls`). A starting gateway keeps it for as long as
    /// it runs and re-reads the files into it; a reload builds one only to check the files.
    pub server_tls: Option<ServerTls>,
    /// The TLS client configuration of each `https://` upstream, by upstream name.
    pub upstream_tls: HashMap<String, ClientTls>,
    /// The top-level `auth:` block with its secrets.
    pub auth: Option<Arc<Authenticator>>,
    /// The caller check of each route that has one, by route name (the top-level block's, shared,
    /// for routes that inherit it).
    pub route_auth: HashMap<String, Arc<Authenticator>>,
}

/// A configuration and what it needs, ready to run.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub prepared: Prepared,
}

/// Reads the config file at `path` (with `BREAKWATER__*` overrides and `*_env` secrets from the
/// process environment), validates it and loads what it names.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    from_yaml(&config::read(path)?, std::env::vars())
}

/// Like [`load`], from YAML text and an explicit environment (tests pass their own, so they never
/// depend on the machine's).
pub fn from_yaml(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigError> {
    let env: Env = env.into_iter().collect();
    let draft = config::draft(text, env.clone())?;
    let mut problems = draft.problems;
    // Even a configuration with problems is loaded as far as it goes, so that an unreadable file
    // is reported together with a bad value elsewhere rather than after it is fixed.
    let prepared = build(&draft.config, &env, &mut problems);
    draft.env.attribute(&mut problems);
    if problems.is_empty() {
        Ok(Loaded {
            config: draft.config,
            prepared,
        })
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Loads what a validated `config` names.
pub fn prepare(config: &Config, env: &Env) -> Result<Prepared, Vec<Problem>> {
    let mut problems = Vec::new();
    let prepared = build(config, env, &mut problems);
    if problems.is_empty() {
        Ok(prepared)
    } else {
        Err(problems)
    }
}

fn build(config: &Config, env: &Env, problems: &mut Vec<Problem>) -> Prepared {
    let mut prepared = Prepared::default();
    if let Some(t) = &config.server.tls {
        match ServerTls::load(&t.cert, &t.key, config.server.http2) {
            Ok(tls) => prepared.server_tls = Some(tls),
            Err(e) => file_problems(problems, "server.tls", e, ["cert", "key", "cert"]),
        }
    }
    for u in config.upstreams.values() {
        let Some(t) = &u.tls else { continue };
        let client_pair = t.client_cert.as_deref().zip(t.client_key.as_deref());
        match ClientTls::build(t.ca_file.as_deref(), client_pair, t.insecure_skip_verify) {
            Ok(client) => {
                prepared.upstream_tls.insert(u.name.clone(), client);
            }
            Err(e) => file_problems(
                problems,
                &format!("upstreams.{}.tls", u.name),
                e,
                ["client_cert", "client_key", "ca_file"],
            ),
        }
    }
    let mut authenticator = |key: &str, auth: &Arc<config::AuthConfig>| match Authenticator::load(
        key,
        auth.clone(),
        env,
    ) {
        Ok(a) => Some(Arc::new(a)),
        Err(e) => {
            problems.extend(e);
            None
        }
    };
    prepared.auth = config.auth.as_ref().and_then(|a| authenticator("auth", a));
    for (i, r) in config.routes.iter().enumerate() {
        let auth = match (r.auth_origin, &r.auth) {
            (AuthOrigin::Global, _) => prepared.auth.clone(),
            (AuthOrigin::Route, Some(a)) => authenticator(&format!("routes[{i}].auth"), a),
            _ => None,
        };
        if let Some(auth) = auth {
            prepared.route_auth.insert(r.name.clone(), auth);
        }
    }
    prepared
}

/// Each certificate file problem under the key that names the file: `names` are the fields for
/// the certificate, the key and the CA bundle.
fn file_problems(problems: &mut Vec<Problem>, base: &str, e: Vec<FileProblem>, names: [&str; 3]) {
    for e in e {
        let field = match e.file {
            TlsFile::Cert => names[0],
            TlsFile::Key => names[1],
            TlsFile::Ca => names[2],
        };
        problems.push(Problem {
            key: format!("{base}.{field}"),
            message: e.message,
        });
    }
}
