//! Caller authentication: who may call a route. The stage runs after routing and before the
//! request body is read or admission is asked, so a caller that is refused costs no queue slot,
//! no upstream connection and no body buffering.
//!
//! Checks, in order:
//! 1. `allow_cidrs`: the caller's source address must lie inside one of them (else 403). The
//!    source is the TCP peer; when the peer is a `trusted_proxies` address, the right-most
//!    `X-Forwarded-For` entry that is not itself a trusted proxy.
//! 2. Credentials (else 401): a configured API key in the configured header, or HTTP Basic
//!    credentials. When both are configured either one is enough.
//!
//! The secrets are read, from the environment variable or file the configuration names, by
//! [`Authenticator::load`] when the gateway starts, is checked or reloads; the configuration
//! itself never holds them. They are kept only as SHA-256 digests. A
//! presented credential is hashed and compared with every configured digest in constant time,
//! without stopping at the first match, so neither the length nor the position of a key leaks
//! through timing. The answer never says which part was wrong.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::config::{AuthConfig, Problem, SecretSource};
use crate::error::ProxyError;

/// The realm named in `WWW-Authenticate` when Basic is configured.
pub const REALM: &str = "breakwater";
/// `WWW-Authenticate` value sent with a 401 when Basic is configured.
pub const BASIC_CHALLENGE: &str = "Basic realm=\"breakwater\"";

/// The SHA-256 digest of a secret. It is never printed, not even by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    pub fn of(secret: &[u8]) -> Self {
        SecretDigest(Sha256::digest(secret).into())
    }

    /// Constant-time equality of two digests.
    fn ct_matches(&self, other: &SecretDigest) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDigest(<redacted>)")
    }
}

pub use crate::config::Cidr;

fn in_any(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.iter().any(|c| c.contains(ip))
}

/// The caller's address: the TCP peer, or — when the peer is a trusted proxy — the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy. Entries are read right to left
/// across every `X-Forwarded-For` line; an entry that is not an address stops the walk at the
/// last trusted hop (which then counts as the source). Nothing is allocated.
pub fn source_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let mut current = peer.to_canonical();
    if !in_any(trusted, current) {
        return current;
    }
    for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = line.to_str() else {
            return current;
        };
        for entry in text.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some(ip) = forwarded_ip(entry) else {
                return current;
            };
            current = ip.to_canonical();
            if !in_any(trusted, current) {
                return current;
            }
        }
    }
    current
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`a.b.c.d:p`, `[v6]:p`) or in
/// brackets (`[v6]`).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })
}

/// Base64 as Basic credentials use it; clients differ on padding, so both forms are accepted.
const BASIC_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The one value of `name`, or none when it is missing or repeated (a repeated credential header
/// is ambiguous, and is refused rather than guessed at).
fn single<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// Whether the presented value equals one of `keys`. Every key is compared, in constant time.
fn api_key_matches(keys: &[SecretDigest], presented: Option<&HeaderValue>) -> Choice {
    let Some(value) = presented else {
        return Choice::from(0);
    };
    let digest = SecretDigest::of(value.as_bytes());
    keys.iter()
        .fold(Choice::from(0), |ok, key| ok | key.ct_matches(&digest))
}

/// Whether `Authorization: Basic …` carries the configured `username:password`. The decoded
/// `user:password` is hashed whole, so a wrong user and a wrong password take the same path.
fn basic_matches(credentials: &SecretDigest, presented: Option<&HeaderValue>) -> Choice {
    let Some(value) = presented else {
        return Choice::from(0);
    };
    let bytes = value.as_bytes();
    let Some(space) = bytes.iter().position(|b| *b == b' ') else {
        return Choice::from(0);
    };
    let (scheme, token) = bytes.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return Choice::from(0);
    }
    let token = token.trim_ascii();
    match BASIC_B64.decode(token) {
        Ok(decoded) => credentials.ct_matches(&SecretDigest::of(&decoded)),
        Err(_) => Choice::from(0),
    }
}

/// The environment variables `*_env` secrets are read from.
pub type Env = HashMap<String, String>;

/// Shortest API key and Basic password accepted: anything shorter is guessable.
const MIN_KEY_LEN: usize = 16;
const MIN_PASSWORD_LEN: usize = 12;

/// A route's caller check as it runs: its `auth:` block and the digests of the secrets the block
/// names, read when the configuration was loaded (and again on every reload).
#[derive(Debug)]
pub struct Authenticator {
    config: Arc<AuthConfig>,
    /// Digests of every API key currently valid (several during a rotation).
    keys: Vec<SecretDigest>,
    /// Digest of `username:password`, when Basic is configured.
    credentials: Option<SecretDigest>,
}

impl Authenticator {
    /// Reads the secrets `config` names, from `env` or from files, and checks them. Problems
    /// are keyed under `key`, the block's own key (`auth`, `routes[2].auth`), and never include
    /// a secret: a key is named only by its position.
    pub fn load(key: &str, config: Arc<AuthConfig>, env: &Env) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let keys = match &config.api_keys {
            None => Vec::new(),
            Some(k) => {
                let base = format!("{key}.api_keys");
                read_secret(&mut problems, &base, "keys", &k.source, env)
                    .map(|text| api_keys(&mut problems, &base, &k.source, &text))
                    .unwrap_or_default()
            }
        };
        let credentials = config.basic.as_ref().map(|b| {
            let base = format!("{key}.basic");
            // An editor's trailing newline is not part of the password.
            let password = read_secret(&mut problems, &base, "password", &b.source, env)
                .map(|text| text.trim_end_matches(['\r', '\n']).to_string())
                .unwrap_or_default();
            if !password.is_empty() && password.chars().count() < MIN_PASSWORD_LEN {
                add(
                    &mut problems,
                    format!("{base}.{}", b.source.key("password")),
                    format!(
                        "the password from {} is shorter than {MIN_PASSWORD_LEN} characters",
                        b.source
                    ),
                );
            }
            SecretDigest::of(format!("{}:{password}", b.username).as_bytes())
        });
        if problems.is_empty() {
            Ok(Authenticator {
                config,
                keys,
                credentials,
            })
        } else {
            Err(problems)
        }
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// How many API keys are valid now.
    pub fn keys_loaded(&self) -> usize {
        self.keys.len()
    }

    /// One line for `breakwater check`, secrets redacted.
    pub fn summary(&self) -> String {
        let c = &self.config;
        let mut parts = Vec::new();
        if let Some(k) = &c.api_keys {
            parts.push(format!(
                "api_keys header {} ({} key(s) from {})",
                k.header,
                self.keys.len(),
                k.source
            ));
        }
        if let Some(b) = &c.basic {
            parts.push(format!(
                "basic user {} (password from {})",
                b.username, b.source
            ));
        }
        let list = |v: &[Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !c.allow_cidrs.is_empty() {
            parts.push(format!("allow_cidrs {}", list(&c.allow_cidrs)));
        }
        if !c.trusted_proxies.is_empty() {
            parts.push(format!("trusted_proxies {}", list(&c.trusted_proxies)));
        }
        parts.join("; ")
    }
}

fn add(problems: &mut Vec<Problem>, key: impl Into<String>, message: impl Into<String>) {
    problems.push(Problem {
        key: key.into(),
        message: message.into(),
    });
}

/// The secret of the block at `base`, from where `source` says. `None` (with a problem, unless
/// validation already reported that there is no usable source) when it cannot be had.
fn read_secret(
    problems: &mut Vec<Problem>,
    base: &str,
    name: &str,
    source: &SecretSource,
    env: &Env,
) -> Option<String> {
    let key = format!("{base}.{}", source.key(name));
    match source {
        SecretSource::Env(var) if var.is_empty() => None,
        SecretSource::Env(var) => match env.get(var) {
            None => {
                add(problems, key, format!("{var} is not set"));
                None
            }
            Some(v) if v.trim().is_empty() => {
                add(problems, key, format!("{var} is set but empty"));
                None
            }
            Some(v) => Some(v.clone()),
        },
        SecretSource::File(path) => match std::fs::read_to_string(path) {
            Err(e) => {
                add(
                    problems,
                    key,
                    format!("`{}`: cannot read ({e})", path.display()),
                );
                None
            }
            Ok(text) if text.trim().is_empty() => {
                add(problems, key, format!("`{}` is empty", path.display()));
                None
            }
            Ok(text) => Some(text),
        },
    }
}

/// The digests of the keys in `text` (comma- or line-separated; in a file, `#` starts a comment
/// line), each checked.
fn api_keys(
    problems: &mut Vec<Problem>,
    base: &str,
    source: &SecretSource,
    text: &str,
) -> Vec<SecretDigest> {
    let skey = format!("{base}.{}", source.key("keys"));
    let is_file = matches!(source, SecretSource::File(_));
    let keys: Vec<&str> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .filter(|k| !(is_file && k.starts_with('#')))
        .collect();
    if keys.is_empty() {
        add(
            problems,
            &skey,
            format!("{source} holds no keys (write them comma-separated)"),
        );
    }
    let n = keys.len();
    for (i, k) in keys.iter().enumerate() {
        // The key itself is never printed, only its position.
        let which = format!("key {} of {n} from {source}", i + 1);
        if !k.bytes().all(|b| b.is_ascii_graphic()) {
            add(
                problems,
                &skey,
                format!("{which} contains characters other than visible ASCII"),
            );
        } else if k.len() < MIN_KEY_LEN {
            add(
                problems,
                &skey,
                format!("{which} is shorter than {MIN_KEY_LEN} characters"),
            );
        }
    }
    keys.iter()
        .map(|k| SecretDigest::of(k.as_bytes()))
        .collect()
}

/// Runs the authentication stage for a route configured with `auth`: `Ok` lets the request go
/// on, with the gateway's own credential headers removed so the upstream never sees them.
pub fn authenticate(
    auth: &Authenticator,
    headers: &mut HeaderMap,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let c = &auth.config;
    if !c.allow_cidrs.is_empty() {
        let source = source_addr(peer.ip(), headers, &c.trusted_proxies);
        if !in_any(&c.allow_cidrs, source) {
            return Err(ProxyError::Forbidden);
        }
    }
    if c.api_keys.is_none() && c.basic.is_none() {
        return Ok(());
    }
    // Both mechanisms are always evaluated, so timing does not tell which one was tried.
    let mut ok = Choice::from(0);
    if let Some(k) = &c.api_keys {
        ok |= api_key_matches(&auth.keys, single(headers, &k.header));
    }
    if let Some(credentials) = &auth.credentials {
        ok |= basic_matches(credentials, single(headers, &AUTHORIZATION));
    }
    if !bool::from(ok) {
        return Err(ProxyError::Unauthorized {
            challenge: c.basic.is_some(),
        });
    }
    if let Some(k) = &c.api_keys {
        headers.remove(&k.header);
    }
    if c.basic.is_some() {
        headers.remove(AUTHORIZATION);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKeysConfig, BasicConfig};

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn xff_is_ignored_unless_the_peer_is_trusted() {
        let trusted = [cidr("10.0.0.0/8")];
        let h = xff(&["203.0.113.5"]);
        assert_eq!(
            source_addr(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(source_addr(ip("198.51.100.1"), &h, &[]), ip("198.51.100.1"));
        assert_eq!(source_addr(ip("10.0.0.2"), &h, &trusted), ip("203.0.113.5"));
    }

    #[test]
    fn xff_takes_the_rightmost_untrusted_entry() {
        let trusted = [cidr("10.0.0.0/8"), cidr("2001:db8:1::/48")];
        // A spoofed left-most entry is skipped: the first untrusted hop from the right wins.
        let h = xff(&["1.2.3.4, 203.0.113.5, 10.0.0.9"]);
        assert_eq!(source_addr(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.5"));
        // Several lines read as one list, later lines to the right.
        let h = xff(&["1.2.3.4", "203.0.113.5 ,10.0.0.9", "10.1.1.1"]);
        assert_eq!(source_addr(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.5"));
        // Every hop trusted: the left-most one is the source.
        let h = xff(&["10.0.0.7, 10.0.0.9"]);
        assert_eq!(source_addr(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.7"));
        // No header: the (trusted) peer itself.
        assert_eq!(
            source_addr(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        // Garbage stops the walk at the last trusted hop.
        let h = xff(&["203.0.113.5, bogus, 10.0.0.9"]);
        assert_eq!(source_addr(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.9"));
        // Ports, brackets and mapped addresses.
        let h = xff(&["203.0.113.5:4711"]);
        assert_eq!(source_addr(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.5"));
        let h = xff(&["[2001:db8:2::5]:443, [2001:db8:1::9]"]);
        assert_eq!(
            source_addr(ip("10.0.0.1"), &h, &trusted),
            ip("2001:db8:2::5")
        );
        let h = xff(&["::ffff:203.0.113.5"]);
        assert_eq!(
            source_addr(ip("::ffff:10.0.0.1"), &h, &trusted),
            ip("203.0.113.5")
        );
        // Empty entries are skipped.
        let h = xff(&["203.0.113.5,, "]);
        assert_eq!(source_addr(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.5"));
    }

    fn auth(keys: &[&str], basic: Option<(&str, &str)>) -> Authenticator {
        auth_with(keys, basic, Vec::new())
    }

    fn auth_with(keys: &[&str], basic: Option<(&str, &str)>, allow: Vec<Cidr>) -> Authenticator {
        let config = AuthConfig {
            api_keys: (!keys.is_empty()).then(|| ApiKeysConfig {
                header: HeaderName::from_static("x-api-key"),
                source: SecretSource::Env("K".into()),
            }),
            basic: basic.map(|(u, _)| BasicConfig {
                username: u.into(),
                source: SecretSource::Env("P".into()),
            }),
            allow_cidrs: allow,
            trusted_proxies: Vec::new(),
        };
        let mut env = Env::new();
        env.insert("K".into(), keys.join(","));
        if let Some((_, p)) = basic {
            env.insert("P".into(), p.into());
        }
        Authenticator::load("auth", Arc::new(config), &env).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn peer() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    fn basic_header(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn api_keys_any_configured_key_passes_and_is_stripped() {
        let a = auth(&["old-key-0123456789", "new-key-0123456789"], None);
        for key in ["old-key-0123456789", "new-key-0123456789"] {
            let mut h = headers(&[("x-api-key", key), ("authorization", "Bearer up")]);
            authenticate(&a, &mut h, peer()).unwrap();
            assert!(h.get("x-api-key").is_none());
            // Not the gateway's credential: Basic is not configured, so it goes through.
            assert_eq!(h["authorization"], "Bearer up");
        }
        for bad in [
            vec![("x-api-key", "wrong")],
            vec![("x-api-key", "old-key-012345678")],
            vec![],
            vec![
                ("x-api-key", "old-key-0123456789"),
                ("x-api-key", "new-key-0123456789"),
            ],
        ] {
            let mut h = headers(&bad);
            let err = authenticate(&a, &mut h, peer()).unwrap_err();
            assert!(matches!(err, ProxyError::Unauthorized { challenge: false }));
        }
    }

    #[test]
    fn basic_credentials() {
        let a = auth(&[], Some(("genesys", "s3cret:with-colon")));
        let good = basic_header("genesys", "s3cret:with-colon");
        let mut h = headers(&[("authorization", &good)]);
        authenticate(&a, &mut h, peer()).unwrap();
        assert!(h.get("authorization").is_none());
        // Scheme is case-insensitive, padding optional.
        let unpadded = good.trim_end_matches('=').replace("Basic", "bAsIc");
        authenticate(&a, &mut headers(&[("authorization", &unpadded)]), peer()).unwrap();
        for bad in [
            basic_header("genesys", "wrong"),
            basic_header("other", "s3cret:with-colon"),
            "Bearer abc".to_string(),
            "Basic !!!".to_string(),
            "Basic".to_string(),
        ] {
            let err =
                authenticate(&a, &mut headers(&[("authorization", &bad)]), peer()).unwrap_err();
            assert!(matches!(err, ProxyError::Unauthorized { challenge: true }));
        }
    }

    #[test]
    fn either_mechanism_authenticates_when_both_are_configured() {
        let a = auth(&["key-0123456789abcdef"], Some(("genesys", "password-123")));
        let mut h = headers(&[("x-api-key", "key-0123456789abcdef")]);
        authenticate(&a, &mut h, peer()).unwrap();
        let b = basic_header("genesys", "password-123");
        let mut h = headers(&[("authorization", &b), ("x-api-key", "junk")]);
        authenticate(&a, &mut h, peer()).unwrap();
        assert!(h.is_empty(), "both credential headers are stripped: {h:?}");
    }

    #[test]
    fn source_is_checked_before_credentials() {
        let a = auth_with(&["key-0123456789abcdef"], None, vec![cidr("10.0.0.0/8")]);
        let mut h = headers(&[("x-api-key", "key-0123456789abcdef")]);
        assert!(matches!(
            authenticate(&a, &mut h, peer()),
            Err(ProxyError::Forbidden)
        ));
        // Inside the block with no key: 401.
        let inside: SocketAddr = "10.1.1.1:1".parse().unwrap();
        assert!(matches!(
            authenticate(&a, &mut HeaderMap::new(), inside),
            Err(ProxyError::Unauthorized { .. })
        ));
        // Allowlist alone (no credentials configured).
        let a = auth_with(&[], None, vec![cidr("10.0.0.0/8")]);
        authenticate(&a, &mut HeaderMap::new(), inside).unwrap();
    }

    #[test]
    fn digests_are_not_printed() {
        let d = SecretDigest::of(b"hunter2");
        assert_eq!(format!("{d:?}"), "SecretDigest(<redacted>)");
    }
}
