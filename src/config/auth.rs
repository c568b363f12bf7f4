//! `auth:` (top level, every route's default) and `routes[].auth`: who may call a route.
//! Secrets are read from the environment variable or file the block names, never from the file
//! itself, and never appear in a problem.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use super::problems::Problems;
use super::raw::{OneOrMany, RawApiKeys, RawAuth, RawBasic};

/// The environment variables secrets are read from (`*_env` keys).
pub type Env = HashMap<String, String>;

/// Caller authentication (see [`crate::auth`]). Secrets are held only as digests.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub api_keys: Option<ApiKeysConfig>,
    pub basic: Option<BasicConfig>,
    /// When not empty, the caller's source address must lie inside one of these.
    pub allow_cidrs: Vec<crate::auth::Cidr>,
    /// Peers whose `X-Forwarded-For` is believed when finding the source address.
    pub trusted_proxies: Vec<crate::auth::Cidr>,
}

impl AuthConfig {
    /// One line for `breakwater check`, secrets redacted.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(k) = &self.api_keys {
            parts.push(format!(
                "api_keys header {} ({} key(s) from {})",
                k.header,
                k.keys.len(),
                k.source
            ));
        }
        if let Some(b) = &self.basic {
            parts.push(format!(
                "basic user {} (password from {})",
                b.username, b.source
            ));
        }
        let list = |v: &[crate::auth::Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !self.allow_cidrs.is_empty() {
            parts.push(format!("allow_cidrs {}", list(&self.allow_cidrs)));
        }
        if !self.trusted_proxies.is_empty() {
            parts.push(format!("trusted_proxies {}", list(&self.trusted_proxies)));
        }
        parts.join("; ")
    }
}

/// Where a secret is read from when the configuration is loaded (and reloaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
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
    pub source: SecretSource,
    /// Digests of every key currently valid (several during a rotation).
    pub keys: Vec<crate::auth::SecretDigest>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BasicConfig {
    pub username: String,
    /// Where the password came from.
    pub source: SecretSource,
    /// Digest of `username:password`.
    pub credentials: crate::auth::SecretDigest,
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

/// Shortest API key and Basic password accepted: anything shorter is guessable.
const MIN_KEY_LEN: usize = 16;
const MIN_PASSWORD_LEN: usize = 12;

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
pub(super) fn validate(p: &mut Problems, key: &str, a: &RawAuth, env: &Env) -> Option<AuthConfig> {
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
        .map(|b| validate_basic(p, &format!("{key}.basic"), b, env));
    let api_keys = a
        .api_keys
        .as_ref()
        .map(|k| validate_api_keys(p, &format!("{key}.api_keys"), k, a.basic.is_some(), env));
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

fn cidr_list(p: &mut Problems, key: &str, list: &Option<OneOrMany>) -> Vec<crate::auth::Cidr> {
    let mut out = Vec::new();
    for item in list.iter().flat_map(|l| l.items()) {
        match crate::auth::Cidr::parse(&item) {
            Ok(c) => out.push(c),
            Err(e) => p.add(key, format!("`{item}`: {e}")),
        }
    }
    out
}

fn validate_basic(p: &mut Problems, key: &str, b: &RawBasic, env: &Env) -> BasicConfig {
    let username = match b.username.as_deref() {
        Some(u) if !u.is_empty() => {
            if u.contains(':') || u.chars().any(char::is_control) {
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
    let (source, password) = match secret(p, key, &fields, env) {
        // An editor's trailing newline is not part of the password.
        Some((source, text)) => (source, text.trim_end_matches(['\r', '\n']).to_string()),
        None => (SecretSource::Env(String::new()), String::new()),
    };
    if !password.is_empty() && password.chars().count() < MIN_PASSWORD_LEN {
        p.add(
            format!("{key}.{}", source_key("password", &source)),
            format!("the password from {source} is shorter than {MIN_PASSWORD_LEN} characters"),
        );
    }
    BasicConfig {
        credentials: crate::auth::SecretDigest::of(format!("{username}:{password}").as_bytes()),
        username,
        source,
    }
}

fn validate_api_keys(
    p: &mut Problems,
    key: &str,
    k: &RawApiKeys,
    basic: bool,
    env: &Env,
) -> ApiKeysConfig {
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
    let Some((source, text)) = secret(p, key, &fields, env) else {
        return ApiKeysConfig {
            header,
            source: SecretSource::Env(String::new()),
            keys: Vec::new(),
        };
    };
    let skey = format!("{key}.{}", source_key("keys", &source));
    let is_file = matches!(source, SecretSource::File(_));
    let keys: Vec<&str> = text
        .split([',', '\n'])
        .map(str::trim)
        // In a file, `#` starts a comment line.
        .filter(|k| !k.is_empty())
        .filter(|k| !(is_file && k.starts_with('#')))
        .collect();
    if keys.is_empty() {
        p.add(
            &skey,
            format!("{source} holds no keys (write them comma-separated)"),
        );
    }
    let n = keys.len();
    for (i, k) in keys.iter().enumerate() {
        // The key itself is never printed, only its position.
        let which = format!("key {} of {n} from {source}", i + 1);
        if !k.bytes().all(|b| b.is_ascii_graphic()) {
            p.add(
                &skey,
                format!("{which} contains characters other than visible ASCII"),
            );
        } else if k.len() < MIN_KEY_LEN {
            p.add(
                &skey,
                format!("{which} is shorter than {MIN_KEY_LEN} characters"),
            );
        }
    }
    ApiKeysConfig {
        header,
        keys: keys
            .iter()
            .map(|k| crate::auth::SecretDigest::of(k.as_bytes()))
            .collect(),
        source,
    }
}

fn source_key(name: &str, source: &SecretSource) -> String {
    match source {
        SecretSource::Env(_) => format!("{name}_env"),
        SecretSource::File(_) => format!("{name}_file"),
    }
}

/// The keys that can hold one secret: `{name}_env`, `{name}_file`, and a refused `{name}`.
struct SecretFields<'a> {
    name: &'static str,
    env_name: &'a Option<String>,
    file: &'a Option<String>,
    literal: bool,
}

/// Reads a secret of the block at `base` from its `_env` or `_file` key. A literal value in the
/// file is refused. Problems never include the secret.
fn secret(
    p: &mut Problems,
    base: &str,
    f: &SecretFields<'_>,
    env: &Env,
) -> Option<(SecretSource, String)> {
    let name = f.name;
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
            None
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
            None
        }
        (Some(var), None) => {
            let key = format!("{base}.{name}_env");
            let valid_name = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                // Not echoed: a secret pasted here by mistake must not end up in a log.
                p.add(
                    key,
                    "not an environment variable name (letters, digits and `_`); give the \
                     variable's name, not the secret",
                );
                return None;
            }
            match env.get(var) {
                None => {
                    p.add(key, format!("{var} is not set"));
                    None
                }
                Some(v) if v.trim().is_empty() => {
                    p.add(key, format!("{var} is set but empty"));
                    None
                }
                Some(v) => Some((SecretSource::Env(var.clone()), v.clone())),
            }
        }
        (None, Some(path)) => {
            let key = format!("{base}.{name}_file");
            match std::fs::read_to_string(path) {
                Err(e) => {
                    p.add(key, format!("`{path}`: cannot read ({e})"));
                    None
                }
                Ok(text) if text.trim().is_empty() => {
                    p.add(key, format!("`{path}` is empty"));
                    None
                }
                Ok(text) => Some((SecretSource::File(path.into()), text)),
            }
        }
    }
}
