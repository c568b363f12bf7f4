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
//! Secrets are kept only as SHA-256 digests computed when the configuration is loaded. A
//! presented credential is hashed and compared with every configured digest in constant time,
//! without stopping at the first match, so neither the length nor the position of a key leaks
//! through timing. The answer never says which part was wrong.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConstantTimeEq};

use crate::config::AuthConfig;
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

/// An address block such as `203.0.113.0/24` or `2001:db8::/32`. A bare address is a block of
/// one. IPv4-mapped IPv6 blocks (`::ffff:203.0.113.0/120`) are stored as the IPv4 block they
/// denote, and addresses are canonicalised before matching, so `::ffff:a.b.c.d` peers match IPv4
/// blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| "not an IP address or CIDR block (write e.g. `203.0.113.0/24`)")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("prefix length must be a number from 0 to {max}")),
            },
        };
        let mut cidr = Cidr { addr, prefix };
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                cidr = Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                };
            }
        }
        let network = cidr.network();
        if network != cidr.addr {
            return Err(format!(
                "host bits are set (the block starting there is `{network}/{}`)",
                cidr.prefix
            ));
        }
        Ok(cidr)
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }

    /// Whether `ip` lies inside the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask32(self.prefix);
                u32::from(ip) & m == u32::from(net) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask128(self.prefix);
                u128::from(ip) & m == u128::from(net) & m
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

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

/// Runs the authentication stage for a route configured with `auth`: `Ok` lets the request go
/// on, with the gateway's own credential headers removed so the upstream never sees them.
pub fn authenticate(
    auth: &AuthConfig,
    headers: &mut HeaderMap,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    if !auth.allow_cidrs.is_empty() {
        let source = source_addr(peer.ip(), headers, &auth.trusted_proxies);
        if !in_any(&auth.allow_cidrs, source) {
            return Err(ProxyError::Forbidden);
        }
    }
    if auth.api_keys.is_none() && auth.basic.is_none() {
        return Ok(());
    }
    // Both mechanisms are always evaluated, so timing does not tell which one was tried.
    let mut ok = Choice::from(0);
    if let Some(k) = &auth.api_keys {
        ok |= api_key_matches(&k.keys, single(headers, &k.header));
    }
    if let Some(b) = &auth.basic {
        ok |= basic_matches(&b.credentials, single(headers, &AUTHORIZATION));
    }
    if !bool::from(ok) {
        return Err(ProxyError::Unauthorized {
            challenge: auth.basic.is_some(),
        });
    }
    if let Some(k) = &auth.api_keys {
        headers.remove(&k.header);
    }
    if auth.basic.is_some() {
        headers.remove(AUTHORIZATION);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ApiKeysConfig, BasicConfig, SecretSource};

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(cidr("203.0.113.0/24").to_string(), "203.0.113.0/24");
        assert_eq!(cidr(" 10.1.2.3 ").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        // An IPv4-mapped block is the IPv4 block it denotes.
        assert_eq!(cidr("::ffff:203.0.113.0/120").to_string(), "203.0.113.0/24");
        for bad in [
            "",
            "nope",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "2001:db8::/129",
            "10.0.0.0/8/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} parsed");
        }
        let err = Cidr::parse("203.0.113.5/24").unwrap_err();
        assert!(err.contains("203.0.113.0/24"), "{err}");
    }

    #[test]
    fn cidr_matching() {
        let v4 = cidr("203.0.113.0/24");
        assert!(v4.contains(ip("203.0.113.0")));
        assert!(v4.contains(ip("203.0.113.255")));
        assert!(!v4.contains(ip("203.0.114.1")));
        assert!(!v4.contains(ip("2001:db8::1")));
        // IPv4-mapped IPv6 peers (dual-stack listeners) match IPv4 blocks.
        assert!(v4.contains(ip("::ffff:203.0.113.7")));
        assert!(!v4.contains(ip("::ffff:198.51.100.7")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("203.0.113.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("10.1.2.3").contains(ip("10.1.2.3")));
        assert!(!cidr("10.1.2.3").contains(ip("10.1.2.4")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
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

    fn auth(keys: &[&str], basic: Option<(&str, &str)>) -> AuthConfig {
        AuthConfig {
            api_keys: (!keys.is_empty()).then(|| ApiKeysConfig {
                header: HeaderName::from_static("x-api-key"),
                source: SecretSource::Env("K".into()),
                keys: keys
                    .iter()
                    .map(|k| SecretDigest::of(k.as_bytes()))
                    .collect(),
            }),
            basic: basic.map(|(u, p)| BasicConfig {
                username: u.into(),
                source: SecretSource::Env("P".into()),
                credentials: SecretDigest::of(format!("{u}:{p}").as_bytes()),
            }),
            allow_cidrs: Vec::new(),
            trusted_proxies: Vec::new(),
        }
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
        let mut a = auth(&["key-0123456789abcdef"], None);
        a.allow_cidrs = vec![cidr("10.0.0.0/8")];
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
        a.api_keys = None;
        authenticate(&a, &mut HeaderMap::new(), inside).unwrap();
    }

    #[test]
    fn digests_are_not_printed() {
        let d = SecretDigest::of(b"hunter2");
        assert_eq!(format!("{d:?}"), "SecretDigest(<redacted>)");
    }
}
