//! Who may use the admin endpoints that change or reveal the configuration (`POST /reload`,
//! `GET /config`). A container that exposes `/metrics` to Prometheus exposes those too, so off
//! loopback they need `Authorization: Bearer <token>`, the token coming from
//! `BREAKWATER_ADMIN_TOKEN`. On loopback they are open unless a token is set: then it is required
//! there as well, because in an ECS task or a Kubernetes pod every sidecar shares the loopback
//! interface. `/healthz`, `/readyz` and `/metrics` stay open: load balancers and Prometheus call
//! them without credentials.

use std::net::SocketAddr;

use http::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// The environment variable holding the admin token. Read once, when the admin listener starts.
pub const TOKEN_ENV: &str = "BREAKWATER_ADMIN_TOKEN";

/// Sent with a 401.
pub const CHALLENGE: &str = "Bearer realm=\"breakwater-admin\"";

/// Tokens shorter than this are accepted, with a warning: they can be guessed.
const MIN_TOKEN_LEN: usize = 16;

/// What the admin listener demands before `/reload` and `/config`.
#[derive(Clone)]
pub enum AdminAccess {
    /// Loopback listener, no token set.
    Open,
    /// The SHA-256 of the token: compared in constant time whatever the presented token's length.
    Token { digest: [u8; 32], short: bool },
    /// The endpoints answer 403 until the operator sets a usable token.
    Disabled(Disabled),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disabled {
    /// The listener is not on loopback and no token is set.
    NoToken { listen: SocketAddr },
    /// A token is set but cannot be sent in a header (empty, spaces or non-ASCII inside). Refusing
    /// rather than ignoring it: whoever set it meant the endpoints to be protected.
    UnusableToken,
}

/// Why a request to a protected endpoint is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or the wrong one.
    Unauthorized,
    /// 403: the endpoint is disabled.
    Forbidden(Disabled),
}

impl std::fmt::Debug for AdminAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAccess::Open => f.write_str("Open"),
            AdminAccess::Token { .. } => f.write_str("Token(<redacted>)"),
            AdminAccess::Disabled(d) => f.debug_tuple("Disabled").field(d).finish(),
        }
    }
}

impl AdminAccess {
    /// The policy for an admin listener bound to `listen`, given the raw value of
    /// `BREAKWATER_ADMIN_TOKEN` (`None`: not set).
    pub fn new(listen: SocketAddr, token: Option<&str>) -> Self {
        match token {
            Some(t) => {
                // A trailing newline from `$(cat file)` or a secrets manager is not part of it.
                let t = t.trim();
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                    return AdminAccess::Disabled(Disabled::UnusableToken);
                }
                AdminAccess::Token {
                    digest: Sha256::digest(t.as_bytes()).into(),
                    short: t.len() < MIN_TOKEN_LEN,
                }
            }
            None if listen.ip().to_canonical().is_loopback() => AdminAccess::Open,
            None => AdminAccess::Disabled(Disabled::NoToken { listen }),
        }
    }

    /// Reads `BREAKWATER_ADMIN_TOKEN` from the process environment.
    pub fn from_env(listen: SocketAddr) -> Self {
        match std::env::var(TOKEN_ENV) {
            Ok(t) => AdminAccess::new(listen, Some(&t)),
            Err(std::env::VarError::NotPresent) => AdminAccess::new(listen, None),
            Err(std::env::VarError::NotUnicode(_)) => {
                AdminAccess::Disabled(Disabled::UnusableToken)
            }
        }
    }

    /// What to warn about once at start.
    pub fn warning(&self) -> Option<String> {
        match self {
            AdminAccess::Open => None,
            AdminAccess::Token { short, .. } => short.then(|| {
                format!("{TOKEN_ENV} is shorter than {MIN_TOKEN_LEN} characters and can be guessed; generate one with `openssl rand -hex 32`")
            }),
            AdminAccess::Disabled(d) => Some(format!(
                "POST /reload and GET /config answer 403: {}",
                d.reason()
            )),
        }
    }

    /// Whether a request for `path` may go on; only `/reload` and `/config` are protected.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<(), Denied> {
        if !matches!(path, "/reload" | "/config") {
            return Ok(());
        }
        match self {
            AdminAccess::Open => Ok(()),
            AdminAccess::Disabled(d) => Err(Denied::Forbidden(*d)),
            AdminAccess::Token { digest, .. } => {
                let presented = headers
                    .get(AUTHORIZATION)
                    .and_then(|v| bearer(v.as_bytes()))
                    .unwrap_or_default();
                let matches: bool = Sha256::digest(presented).as_slice().ct_eq(digest).into();
                if matches {
                    Ok(())
                } else {
                    Err(Denied::Unauthorized)
                }
            }
        }
    }
}

impl Disabled {
    fn reason(&self) -> String {
        match self {
            Disabled::NoToken { listen } => format!(
                "the admin listener is on {listen}, which is not a loopback address, and \
                 {TOKEN_ENV} is not set"
            ),
            Disabled::UnusableToken => format!(
                "{TOKEN_ENV} is set but is empty or contains spaces or characters other than \
                 printable ASCII"
            ),
        }
    }
}

impl Denied {
    pub fn status(&self) -> http::StatusCode {
        match self {
            Denied::Unauthorized => http::StatusCode::UNAUTHORIZED,
            Denied::Forbidden(_) => http::StatusCode::FORBIDDEN,
        }
    }

    /// The JSON body: what is wrong and how to fix it.
    pub fn body(&self) -> serde_json::Value {
        match self {
            Denied::Unauthorized => serde_json::json!({
                "error": "unauthorized",
                "message": format!("send `Authorization: Bearer <token>` with the token in {TOKEN_ENV}"),
            }),
            Denied::Forbidden(d) => serde_json::json!({
                "error": "forbidden",
                "message": format!(
                    "POST /reload and GET /config are disabled: {}. To enable them, set {TOKEN_ENV} \
                     to a secret (e.g. `openssl rand -hex 32`) and restart, then send \
                     `Authorization: Bearer <token>`; or bind admin.listen to 127.0.0.1",
                    d.reason()
                ),
            }),
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` value (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn loopback_without_a_token_is_open() {
        for listen in [
            "127.0.0.1:9901",
            "127.0.0.2:9901",
            "[::1]:9901",
            "[::ffff:127.0.0.1]:1",
        ] {
            let a = AdminAccess::new(addr(listen), None);
            assert!(matches!(a, AdminAccess::Open), "{listen}");
            assert_eq!(a.check("/reload", &HeaderMap::new()), Ok(()));
            assert_eq!(a.warning(), None);
        }
    }

    #[test]
    fn off_loopback_without_a_token_refuses_what_changes_or_reveals_config() {
        for listen in ["0.0.0.0:9901", "[::]:9901", "10.0.1.5:9901"] {
            let a = AdminAccess::new(addr(listen), None);
            let denied = Denied::Forbidden(Disabled::NoToken {
                listen: addr(listen),
            });
            assert_eq!(a.check("/reload", &HeaderMap::new()), Err(denied));
            assert_eq!(a.check("/config", &with_auth("Bearer x")), Err(denied));
            for open in ["/healthz", "/readyz", "/metrics", "/nothing"] {
                assert_eq!(a.check(open, &HeaderMap::new()), Ok(()), "{open}");
            }
            assert!(a.warning().unwrap().contains(TOKEN_ENV));
            assert_eq!(denied.status(), 403);
            let message = denied.body()["message"].as_str().unwrap().to_string();
            assert!(
                message.contains(TOKEN_ENV) && message.contains(listen),
                "{message}"
            );
        }
    }

    #[test]
    fn a_token_is_required_everywhere_once_set() {
        for listen in ["127.0.0.1:9901", "0.0.0.0:9901"] {
            let a = AdminAccess::new(addr(listen), Some(&format!("{TOKEN}\n")));
            assert_eq!(a.warning(), None);
            let ok = Ok(());
            let no = Err(Denied::Unauthorized);
            assert_eq!(a.check("/config", &HeaderMap::new()), no);
            assert_eq!(
                a.check("/config", &with_auth(&format!("Bearer {TOKEN}"))),
                ok
            );
            assert_eq!(
                a.check("/reload", &with_auth(&format!("bearer  {TOKEN}"))),
                ok
            );
            assert_eq!(
                a.check("/reload", &with_auth(&format!("Bearer {TOKEN}x"))),
                no
            );
            assert_eq!(a.check("/reload", &with_auth(&TOKEN[1..])), no);
            assert_eq!(
                a.check("/reload", &with_auth(&format!("Basic {TOKEN}"))),
                no
            );
            assert_eq!(a.check("/reload", &with_auth("Bearer ")), no);
            assert_eq!(a.check("/reload", &with_auth("Bearer")), no);
            assert_eq!(a.check("/metrics", &HeaderMap::new()), ok);
            assert_eq!(Denied::Unauthorized.status(), 401);
        }
    }

    #[test]
    fn an_unusable_token_disables_rather_than_opens() {
        for bad in ["", "  \n", "two words", "caf\u{e9}-0123456789abcdef"] {
            let a = AdminAccess::new(addr("127.0.0.1:9901"), Some(bad));
            assert_eq!(
                a.check("/config", &HeaderMap::new()),
                Err(Denied::Forbidden(Disabled::UnusableToken)),
                "{bad:?}"
            );
            assert!(a.warning().is_some());
        }
    }

    #[test]
    fn short_tokens_work_with_a_warning_and_are_never_printed() {
        let a = AdminAccess::new(addr("0.0.0.0:1"), Some("short"));
        assert_eq!(a.check("/config", &with_auth("Bearer short")), Ok(()));
        assert!(a.warning().unwrap().contains("guessed"));
        assert!(!format!("{a:?}").contains("short"));
    }
}
