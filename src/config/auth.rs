//! `auth:` (top level, every route's default) and `routes[].auth`: who may call a route.
//! The file names where each secret is kept (an environment variable or a file), never the secret
//! itself; reading and checking the secrets is [`crate::auth::Authenticator::load`]'s job.

use std::fmt;
use std::path::PathBuf;

use super::problems::Problems;
use super::raw::{OneOrMany, RawApiKeys, RawAuth, RawBasic};
use super::Cidr;

/// Caller authentication (see [`crate::auth`]): what to check and where the secrets are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub api_keys: Option<ApiKeysConfig>,
    pub basic: Option<BasicConfig>,
    /// When not empty, the caller's source address must lie inside one of these.
    pub allow_cidrs: Vec<Cidr>,
    /// Peers whose `X-Forwarded-For` is believed when finding the source address.
    pub trusted_proxies: Vec<Cidr>,
}

/// Where a secret is read from when the configuration is loaded (and reloaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// The variable's name. Empty only in a configuration that failed validation, where the
    /// `_env`/`_file` keys themselves had a problem: there is nothing to read.
    Env(String),
    File(PathBuf),
}

impl SecretSource {
    /// The key that names this source under a block's `name` (`keys_env`, `password_file`...).
    pub fn key(&self, name: &str) -> String {
        match self {
            SecretSource::Env(_) => format!("{name}_env"),
            SecretSource::File(_) => format!("{name}_file"),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "env {name}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeysConfig {
    pub header: http::HeaderName,
    /// Where the keys are kept (comma- or line-separated).
    pub source: SecretSource,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BasicConfig {
    pub username: String,
    /// Where the password is kept.
    pub source: SecretSource,
}

/// Where a route's authentication setting came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOrigin {
    /// Neither the route nor the top level configures `auth`.
    None,
    /// The top-level `auth:` block.
    Global,
    /// The route's own `auth:` block.
    Route,
    /// The route says `auth: { disabled: true }`.
    Disabled,
}

impl AuthOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthOrigin::None => "none",
            AuthOrigin::Global => "global",
            AuthOrigin::Route => "route",
            AuthOrigin::Disabled => "disabled",
        }
    }
}

/// Headers that cannot carry an API key: the gateway or hyper rewrites or consumes them.
const RESERVED_KEY_HEADERS: [&str; 11] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "x-forwarded-for",
    "x-request-id",
    crate::forward::BUDGET_HEADER,
];

/// An `auth:` block; `None` when it says `disabled: true`. Anything wrong is added to `p` (a
/// block with problems still returns `Some`, so a mistake never turns authentication off).
pub(super) fn validate(p: &mut Problems, key: &str, a: &RawAuth) -> Option<AuthConfig> {
    if a.disabled == Some(true) {
        let configured = a.api_keys.is_some()
            || a.basic.is_some()
            || a.allow_cidrs.is_some()
            || a.trusted_proxies.is_some();
        if configured {
            p.add(
                format!("{key}.disabled"),
                "`true`: a disabled auth block cannot also set api_keys, basic, allow_cidrs or \
                 trusted_proxies",
            );
        }
        return None;
    }
    let basic = a
        .basic
        .as_ref()
        .map(|b| validate_basic(p, &format!("{key}.basic"), b));
    let api_keys = a
        .api_keys
        .as_ref()
        .map(|k| validate_api_keys(p, &format!("{key}.api_keys"), k, a.basic.is_some()));
    let allow_cidrs = cidr_list(p, &format!("{key}.allow_cidrs"), &a.allow_cidrs);
    let trusted_proxies = cidr_list(p, &format!("{key}.trusted_proxies"), &a.trusted_proxies);
    let no_allowlist = a.allow_cidrs.iter().all(|l| l.items().is_empty());
    if api_keys.is_none() && basic.is_none() && no_allowlist {
        p.add(
            key,
            "nothing to check: configure api_keys, basic or allow_cidrs (or turn auth off for a \
             route with `disabled: true`)",
        );
    }
    if a.trusted_proxies.is_some() && a.allow_cidrs.is_none() {
        p.add(
            format!("{key}.trusted_proxies"),
            "only used to find the caller's address for allow_cidrs, which is not set",
        );
    }
    Some(AuthConfig {
        api_keys,
        basic,
        allow_cidrs,
        trusted_proxies,
    })
}

fn cidr_list(p: &mut Problems, key: &str, list: &Option<OneOrMany>) -> Vec<Cidr> {
    let mut out = Vec::new();
    for item in list.iter().flat_map(|l| l.items()) {
        match Cidr::parse(&item) {
            Ok(c) => out.push(c),
            Err(e) => p.add(key, format!("`{item}`: {e}")),
        }
    }
    out
}

fn validate_basic(p: &mut Problems, key: &str, b: &RawBasic) -> BasicConfig {
    let username = match b.username.as_deref() {
        Some(u) if !u.is_empty() => {
            if let Some((user, _)) = u.split_once(':') {
                // What follows the colon is likely a password pasted with the user: not shown.
                p.add(
                    format!("{key}.username"),
                    format!("`{user}:…`: must not contain `:` or control characters"),
                );
            } else if u.chars().any(char::is_control) {
                p.add(
                    format!("{key}.username"),
                    format!("`{u}`: must not contain `:` or control characters"),
                );
            }
            u.to_string()
        }
        _ => {
            p.add(
                format!("{key}.username"),
                "missing: Basic authentication needs a username",
            );
            String::new()
        }
    };
    let fields = SecretFields {
        name: "password",
        env_name: &b.password_env,
        file: &b.password_file,
        literal: b.password.is_some(),
    };
    BasicConfig {
        username,
        source: secret_source(p, key, &fields),
    }
}

fn validate_api_keys(p: &mut Problems, key: &str, k: &RawApiKeys, basic: bool) -> ApiKeysConfig {
    let header_text = k
        .header
        .as_deref()
        .unwrap_or("x-api-key")
        .to_ascii_lowercase();
    let hkey = format!("{key}.header");
    let header = match http::HeaderName::from_bytes(header_text.as_bytes()) {
        Ok(h) if RESERVED_KEY_HEADERS.contains(&h.as_str()) => {
            p.add(
                hkey,
                format!("`{h}`: the gateway rewrites this header; pick another (e.g. `x-api-key`)"),
            );
            h
        }
        Ok(h) if h == http::header::AUTHORIZATION && basic => {
            p.add(
                hkey,
                "`authorization`: Basic authentication uses this header; pick another (e.g. \
                 `x-api-key`)",
            );
            h
        }
        Ok(h) => h,
        Err(_) => {
            p.add(hkey, format!("`{header_text}`: not a valid header name"));
            http::HeaderName::from_static("x-api-key")
        }
    };
    let fields = SecretFields {
        name: "keys",
        env_name: &k.keys_env,
        file: &k.keys_file,
        literal: k.keys.is_some(),
    };
    ApiKeysConfig {
        header,
        source: secret_source(p, key, &fields),
    }
}

/// The keys that can hold one secret: `{name}_env`, `{name}_file`, and a refused `{name}`.
struct SecretFields<'a> {
    name: &'static str,
    env_name: &'a Option<String>,
    file: &'a Option<String>,
    literal: bool,
}

/// Where the secret of the block at `base` is kept: its `_env` or `_file` key. A literal value
/// in the file is refused. Problems never include the secret. Without a usable key, an empty
/// variable name: the problem is reported and there is nothing to read.
fn secret_source(p: &mut Problems, base: &str, f: &SecretFields<'_>) -> SecretSource {
    let name = f.name;
    let none = SecretSource::Env(String::new());
    if f.literal {
        p.add(
            format!("{base}.{name}"),
            format!(
                "secrets are not accepted in the config file: put the value in an environment \
                 variable and name it in `{name}_env`, or in a file and give its path in \
                 `{name}_file`"
            ),
        );
    }
    match (f.env_name, f.file) {
        (Some(_), Some(_)) => {
            p.add(
                format!("{base}.{name}_env"),
                format!("set only one of `{name}_env` and `{name}_file`"),
            );
            none
        }
        (None, None) => {
            if !f.literal {
                p.add(
                    format!("{base}.{name}_env"),
                    format!(
                        "missing: name the environment variable (`{name}_env`) or the file \
                         (`{name}_file`) that holds the secret"
                    ),
                );
            }
            none
        }
        (Some(var), None) => {
            let valid_name = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                // Not echoed: a secret pasted here by mistake must not end up in a log.
                p.add(
                    format!("{base}.{name}_env"),
                    "not an environment variable name (letters, digits and `_`); give the \
                     variable's name, not the secret",
                );
                return none;
            }
            SecretSource::Env(var.clone())
        }
        (None, Some(path)) => SecretSource::File(path.into()),
    }
}
