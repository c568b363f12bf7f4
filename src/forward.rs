//! What crosses the gateway in headers: hop-by-hop headers are dropped (RFC 9110 §7.6.1), the
//! `X-Forwarded-*` family is set, the request id is kept or made, and the upstream learns how much
//! budget is left.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const BUDGET_HEADER: &str = "x-breakwater-budget-ms";

// Named once: a header named by a `&str` is parsed and checked on every insert.
pub(crate) const BUDGET: HeaderName = HeaderName::from_static(BUDGET_HEADER);
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// What is never forwarded: the hop-by-hop headers of RFC 9110 §7.6.1, and `Transfer-Encoding`,
/// since the outgoing connection frames the body itself. `Trailer` is not among them: it
/// describes the message's own trailer fields, end to end.
const STRIPPED: [HeaderName; 8] = [
    header::CONNECTION,
    KEEP_ALIVE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any header named in `Connection`, and
/// `Transfer-Encoding` (see `STRIPPED`).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the message's few names notes which of `STRIPPED` are there: most requests
    // carry none, and most answers only `Connection: keep-alive`, so a removal (a lookup) is
    // spent only on what is present.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = STRIPPED.iter().position(|s| s == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 && lists_other_names(headers) {
        // `STRIPPED[0]` is `Connection`; its values are taken out first so that the map can be
        // changed while they are read.
        let listed: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for name in listed.iter().flat_map(|v| list_items(v.as_bytes())) {
            // Those in `STRIPPED` (`keep-alive`, the usual one) go below if present. Any other is
            // looked up by `&str`, without being made into a `HeaderName` (which allocates for a
            // name `http` does not know); one that is not text names no header.
            if !is_stripped(name) {
                if let Ok(name) = std::str::from_utf8(name) {
                    headers.remove(name);
                }
            }
        }
    }
    for (i, name) in STRIPPED.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether a header of this name is never forwarded (see `STRIPPED`).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    STRIPPED.iter().any(|s| s == name)
}

/// Whether a name, as its bytes, is one of `STRIPPED`, in any case.
pub(crate) fn is_stripped(name: &[u8]) -> bool {
    STRIPPED
        .iter()
        .any(|s| name.eq_ignore_ascii_case(s.as_str().as_bytes()))
}

/// Whether `Connection` lists any name that `STRIPPED` does not already remove. Most list only
/// `keep-alive`: then nothing needs copying out of the map to be looked up on its own.
fn lists_other_names(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| list_items(v.as_bytes()))
        .any(|name| !is_stripped(name))
}

/// The items of a comma-separated header value (RFC 9110 §5.6.1), trimmed, empty ones skipped.
/// Read as bytes: a value is checked for text only where an item is used as text.
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

/// The request's id, as the header value it is sent in both ways: made or kept once, then
/// shared by the upstream request, the answer and the log without being copied again.
#[derive(Debug, Clone)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// An id known in advance (tests, fixed ids); it must be printable ASCII.
    pub fn from_static(id: &'static str) -> Self {
        RequestId(HeaderValue::from_static(id))
    }

    pub fn as_str(&self) -> &str {
        // Only printable ASCII gets in (see `request_id`), which `to_str` never refuses.
        self.0.to_str().unwrap_or_default()
    }

    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }
}

/// A caller's request id is kept when it is short printable ASCII; otherwise a new one is made.
pub fn request_id(headers: &HeaderMap) -> RequestId {
    request_id_or_new(headers.get(&X_REQUEST_ID))
}

/// [`request_id`] of the caller's `X-Request-Id` line, found by whoever reads the head.
pub fn request_id_or_new(caller: Option<&HeaderValue>) -> RequestId {
    caller
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty() && b.len() <= 128 && b.iter().all(u8::is_ascii_graphic)
        })
        .cloned()
        .map(RequestId)
        .unwrap_or_else(new_request_id)
}

/// 128 random bits in 32 lowercase hex digits.
pub fn new_request_id() -> RequestId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (half, bits) in id
        .chunks_mut(16)
        .zip([fastrand::u64(..), fastrand::u64(..)])
    {
        for (i, digit) in half.iter_mut().enumerate() {
            *digit = HEX[((bits >> (60 - 4 * i)) & 0xf) as usize];
        }
    }
    // Owned by the `Bytes` it is given to: one allocation, and the clones for the upstream
    // request and the answer only count references (bytes copied from a slice are allocated
    // once, then again when first cloned).
    RequestId(
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
            .expect("hex digits are a valid header value"),
    )
}

pub struct ForwardInfo<'a> {
    pub peer: SocketAddr,
    pub proto: &'static str,
    /// The caller's Host (printable ASCII only), as the value it came in: a clone shares its
    /// bytes.
    pub original_host: Option<&'a HeaderValue>,
    pub request_id: &'a RequestId,
    /// Host header for the upstream (its own authority unless the upstream preserves the host).
    pub upstream_host: Option<&'a HeaderValue>,
}

/// The names of [`Forwarding`]'s fields, in the order they are written.
static FORWARDING_NAMES: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REQUEST_ID,
];

/// The fields the gateway sets on a request to the upstream. They are not inserted into the
/// caller's map: the upstream client writes them after the caller's own fields, and a caller's
/// field of the same name is not sent (`upstream::h1::codec::encode_head`). Six inserts per
/// request (each a hash, and the map grown to take them) were the largest part of forwarding.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// The caller's whole `X-Forwarded-For` chain, then the peer; replaces every line the
    /// caller sent (none is sent when the chain cannot be a value).
    pub forwarded_for: Option<HeaderValue>,
    pub forwarded_proto: HeaderValue,
    /// The caller's Host, when it had one; replaces the caller's own `X-Forwarded-Host` only
    /// then.
    pub forwarded_host: Option<HeaderValue>,
    /// The upstream's Host (its own authority unless the upstream preserves the caller's); an
    /// endpoint's own replaces it when each endpoint is sent its own.
    pub host: Option<HeaderValue>,
    pub request_id: HeaderValue,
}

/// Strips the request's hop-by-hop headers and works out the fields the gateway sets on it.
pub fn request_headers(headers: &mut HeaderMap, info: &ForwardInfo<'_>) -> Forwarding {
    strip_hop_by_hop(headers);
    // The whole chain, every line in order (as authentication read it), then the peer.
    let mut xff: Vec<u8> = Vec::with_capacity(48);
    for line in headers.get_all(&X_FORWARDED_FOR) {
        let line = line.as_bytes().trim_ascii();
        if !line.is_empty() {
            xff.extend_from_slice(line);
            xff.extend_from_slice(b", ");
        }
    }
    match info.peer.ip().to_canonical() {
        IpAddr::V4(v4) => write_ipv4(&mut xff, v4),
        v6 => {
            let _ = write!(xff, "{v6}");
        }
    }
    Forwarding {
        // The value takes the buffer without a copy.
        forwarded_for: HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)).ok(),
        forwarded_proto: HeaderValue::from_static(info.proto),
        forwarded_host: info.original_host.cloned(),
        host: info.upstream_host.cloned(),
        request_id: info.request_id.header(),
    }
}

impl Forwarding {
    /// Whether a caller's field named `name` is replaced by one of these (`Host` aside: see
    /// `host`).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_REQUEST_ID
            || (self.forwarded_host.is_some() && *name == X_FORWARDED_HOST)
    }

    /// Each field, as it is written after the caller's.
    pub fn fields(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        let [xff, proto, host, id] = &FORWARDING_NAMES;
        [
            self.forwarded_for.as_ref().map(|v| (xff, v)),
            Some((proto, &self.forwarded_proto)),
            self.forwarded_host.as_ref().map(|v| (host, v)),
            Some((id, &self.request_id)),
        ]
        .into_iter()
        .flatten()
    }
}

/// Dotted decimal, as `Display` writes it, without the formatting machinery (every request
/// writes one).
fn write_ipv4(out: &mut Vec<u8>, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// Rewrites upstream response headers for the caller. The upstream client leaves no hop-by-hop
/// field in an answer's map (`upstream::h1::codec::parse_head`), so only the request id is
/// set here.
pub fn response_headers(headers: &mut HeaderMap, request_id: &RequestId) {
    headers.insert(X_REQUEST_ID, request_id.header());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_are_trimmed_and_empty_ones_skipped() {
        let items = |v: &[u8]| -> Vec<Vec<u8>> { list_items(v).map(<[u8]>::to_vec).collect() };
        assert_eq!(items(b"close"), [b"close".to_vec()]);
        assert_eq!(
            items(b" a ,, b\t,c ,"),
            [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(items(b" , ,").is_empty());
        // A value with bytes outside ASCII still lists its other items.
        assert_eq!(
            items(b"x-hop, \xff\xfe"),
            [b"x-hop".to_vec(), b"\xff\xfe".to_vec()]
        );
    }

    #[test]
    fn a_connection_value_that_is_not_text_still_has_its_names_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-hop, \xff\xfe").unwrap(),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h[header::TRAILER], "x-checksum", "end-to-end");

        // Several Connection values, names in any case, options that name no header.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-One ,, keep-alive"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-two"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.append("x-two", HeaderValue::from_static("2"));
        h.append("x-two", HeaderValue::from_static("2b"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");

        // `Connection` naming only what is stripped anyway (the usual answer).
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn every_forwarded_for_line_is_kept_in_order() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.1, 10.0.0.2"),
        );
        let f = request_headers(
            &mut h,
            &ForwardInfo {
                peer: "10.0.0.3:5000".parse().unwrap(),
                proto: "http",
                original_host: None,
                request_id: &RequestId::from_static("r"),
                upstream_host: Some(&HeaderValue::from_static("u")),
            },
        );
        assert_eq!(
            f.forwarded_for.as_ref().unwrap(),
            "198.51.100.7, 203.0.113.1, 10.0.0.2, 10.0.0.3"
        );
        assert!(
            f.replaces(&X_FORWARDED_FOR),
            "the caller's lines are not sent"
        );
    }

    /// The head that goes out for a caller's `headers` with `f` set on it, as (name, value)
    /// lines.
    fn on_the_wire(headers: &HeaderMap, f: &Forwarding) -> Vec<(String, String)> {
        use crate::upstream::h1::codec::{encode_head, Added};
        let mut out = Vec::new();
        let added = Added {
            forwarding: Some(f),
            host: f.host.as_ref(),
            budget_ms: Some(1500),
        };
        encode_head(&http::Method::GET, "/", headers, &added, Some(0), &mut out);
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut fields);
        assert!(req.parse(&out).unwrap().is_complete());
        req.headers
            .iter()
            .map(|h| {
                let value = String::from_utf8_lossy(h.value).into_owned();
                (h.name.to_string(), value)
            })
            .collect()
    }

    #[test]
    fn forwarded_headers_replace_the_callers_on_the_wire() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        h.insert("x-request-id", HeaderValue::from_static("caller's"));
        h.insert(BUDGET, HeaderValue::from_static("999999"));
        h.insert(header::HOST, HeaderValue::from_static("gw.example.com"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let f = request_headers(
            &mut h,
            &ForwardInfo {
                peer: "[::ffff:203.0.113.9]:5000".parse().unwrap(),
                proto: "http",
                original_host: Some(&HeaderValue::from_static("gw.example.com")),
                request_id: &RequestId::from_static("rid-1"),
                upstream_host: Some(&HeaderValue::from_static("10.0.0.1:8000")),
            },
        );
        let wire = on_the_wire(&h, &f);
        let line = |n: &str, v: &str| (n.to_string(), v.to_string());
        assert_eq!(
            wire,
            [
                line("host", "10.0.0.1:8000"),
                line("x-app", "kept"),
                line("x-forwarded-for", "198.51.100.7, 203.0.113.9"),
                line("x-forwarded-proto", "http"),
                line("x-forwarded-host", "gw.example.com"),
                line("x-request-id", "rid-1"),
                line(BUDGET_HEADER, "1500"),
            ]
        );
        // Without a Host of its own to name, the caller's X-Forwarded-Host goes as it came.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", HeaderValue::from_static("edge"));
        let f = request_headers(
            &mut h,
            &ForwardInfo {
                peer: "10.0.0.3:5000".parse().unwrap(),
                proto: "https",
                original_host: None,
                request_id: &RequestId::from_static("r"),
                upstream_host: None,
            },
        );
        let wire = on_the_wire(&h, &f);
        assert!(wire.contains(&line("x-forwarded-host", "edge")), "{wire:?}");
        assert!(!wire.iter().any(|(n, _)| n == "host"), "{wire:?}");
    }

    #[test]
    fn ipv4_is_written_as_display_writes_it() {
        for ip in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(10, 9, 99, 100),
            Ipv4Addr::new(255, 101, 110, 1),
            Ipv4Addr::new(127, 0, 0, 1),
        ] {
            let mut out = Vec::new();
            write_ipv4(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
        let mut r = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let ip = Ipv4Addr::from(r.u32(..));
            let mut out = Vec::new();
            write_ipv4(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
        }
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_left_as_they_are() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "transfer-encoding alone is found too");
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h).as_str(), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h).as_str().len(), 32);
        let made = request_id(&HeaderMap::new());
        assert_eq!(made.as_str().len(), 32);
        assert!(made
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(made.as_str(), request_id(&HeaderMap::new()).as_str());
    }
}
