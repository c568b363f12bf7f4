//! The PROXY protocol (versions 1 and 2), as an AWS NLB or HAProxy sends it at the start of a
//! connection to pass on the client's address. Only the header is read, never a byte beyond it,
//! so what follows (TLS or HTTP) is untouched.
//!
//! A header that is not well formed closes the connection. `LOCAL` (v2: the balancer's own health
//! checks) and `UNKNOWN` or unsupported address families keep the TCP peer as the source, as the
//! specification asks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// Bytes that tell the version apart, and the shortest possible header (`PROXY UNKNOWN\r\n`).
const MIN_HEADER: usize = 15;

/// What a header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The client's address; `None` when the TCP peer stays the source (LOCAL, UNKNOWN, or an
    /// address family other than IPv4/IPv6 over a stream).
    pub source: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// The bytes so far are the start of a valid header: more are needed.
    Incomplete,
    /// Not a PROXY protocol header, or a malformed one.
    Invalid(&'static str),
}

/// Parses a header at the start of `buf`; returns it and how many bytes it took.
pub fn parse(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if buf.len() < 16 {
            Err(ParseError::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 {
            Err(ParseError::Incomplete)
        } else {
            parse_v1(buf)
        };
    }
    Err(ParseError::Invalid("no PROXY protocol header"))
}

fn parse_v1(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(ParseError::Invalid("v1 header longer than 107 bytes"));
        }
        if window.contains(&b'\n') {
            return Err(ParseError::Invalid("v1 header not ended by CRLF"));
        }
        return Err(ParseError::Incomplete);
    };
    let line = std::str::from_utf8(&buf[6..end])
        .map_err(|_| ParseError::Invalid("v1 header is not ASCII"))?;
    let used = end + 2;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or_default();
    if proto == "UNKNOWN" {
        // The rest of the line is to be ignored.
        return Ok((Header { source: None }, used));
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ParseError::Invalid(
            "v1 header needs protocol, two addresses and two ports",
        ));
    };
    // The destination is only checked for shape: a malformed header closes the connection.
    let (src, _dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| ParseError::Invalid("v1 TCP4 source is not an IPv4 address"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| ParseError::Invalid("v1 TCP4 destination is not an IPv4 address"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| ParseError::Invalid("v1 TCP6 source is not an IPv6 address"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| ParseError::Invalid("v1 TCP6 destination is not an IPv6 address"))?
                .into(),
        ),
        _ => {
            return Err(ParseError::Invalid(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let sport = port(sport)?;
    port(dport)?;
    Ok((
        Header {
            source: Some(SocketAddr::new(src, sport)),
        },
        used,
    ))
}

fn port(text: &str) -> Result<u16, ParseError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Invalid(
            "v1 port is not a number from 0 to 65535",
        ));
    }
    text.parse()
        .map_err(|_| ParseError::Invalid("v1 port is not a number from 0 to 65535"))
}

fn parse_v2(buf: &[u8]) -> Result<(Header, usize), ParseError> {
    let ver_cmd = buf[12];
    let family = buf[13];
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::Invalid("v2 header with a version other than 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ParseError::Invalid("v2 command is neither LOCAL nor PROXY")),
    };
    let (af, transport) = (family >> 4, family & 0x0f);
    if af > 3 || transport > 2 {
        return Err(ParseError::Invalid("v2 address family or protocol unknown"));
    }
    if buf.len() < 16 + len {
        return Err(ParseError::Incomplete);
    }
    let body = &buf[16..16 + len];
    let addr_len = match af {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if body.len() < addr_len {
        return Err(ParseError::Invalid(
            "v2 header too short for its address family",
        ));
    }
    let source = match af {
        _ if local => None,
        // Only a stream carries HTTP; anything else keeps the TCP peer.
        _ if transport != 1 => None,
        1 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        2 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port))
        }
        _ => None,
    };
    // v2 type-length-value extensions (AWS puts the VPC endpoint id in type 0xEA) are of no use
    // here, but their shape is checked: a header whose TLVs overrun it is not well formed.
    let mut rest = &body[addr_len..];
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(ParseError::Invalid("v2 TLV truncated"));
        }
        let n = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        if rest.len() < 3 + n {
            return Err(ParseError::Invalid("v2 TLV longer than the header"));
        }
        rest = &rest[3 + n..];
    }
    Ok((Header { source }, 16 + len))
}

/// Reads exactly one header from `stream` (and nothing after it).
pub async fn read_header(stream: &mut TcpStream) -> Result<Header, String> {
    let mut buf = vec![0u8; MIN_HEADER];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| format!("reading the PROXY header: {e}"))?;
    loop {
        match parse(&buf) {
            Ok((header, used)) => {
                debug_assert_eq!(used, buf.len(), "read no further than the header");
                return Ok(header);
            }
            Err(ParseError::Invalid(why)) => return Err(why.to_string()),
            Err(ParseError::Incomplete) => {}
        }
        let more = if buf.starts_with(&V2_SIGNATURE) {
            // The fixed part says exactly how long the rest is.
            if buf.len() < 16 {
                16 - buf.len()
            } else {
                16 + u16::from_be_bytes([buf[14], buf[15]]) as usize - buf.len()
            }
        } else {
            v1_more(stream, &buf).await?
        };
        let start = buf.len();
        buf.resize(start + more, 0);
        stream
            .read_exact(&mut buf[start..])
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
    }
}

/// How many more bytes to read of a v1 header: up to its CRLF if what has arrived shows it, else
/// one (a v1 header has no length field, and nothing after it may be consumed).
async fn v1_more(stream: &mut TcpStream, have: &[u8]) -> Result<usize, String> {
    let mut peek = [0u8; V1_MAX];
    let room = V1_MAX - have.len();
    let n = stream
        .peek(&mut peek[..room])
        .await
        .map_err(|e| format!("reading the PROXY header: {e}"))?;
    if n == 0 {
        return Err("connection closed inside the PROXY header".into());
    }
    // A CR ending what was read so far may pair with a LF peeked now.
    let mut joined = have[have.len() - 1..].to_vec();
    joined.extend_from_slice(&peek[..n]);
    Ok(match joined.windows(2).position(|w| w == b"\r\n") {
        Some(p) => p + 1,
        None => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &[u8]) -> (Header, usize) {
        let parsed = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e:?}"));
        // Every strict prefix is incomplete, never invalid.
        for cut in 0..parsed.1 {
            assert_eq!(
                parse(&input[..cut]),
                Err(ParseError::Incomplete),
                "prefix of {cut} bytes"
            );
        }
        parsed
    }

    fn invalid(input: &[u8]) -> &'static str {
        match parse(input) {
            Err(ParseError::Invalid(why)) => why,
            other => panic!("{input:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn v1_tcp4() {
        let input = b"PROXY TCP4 203.0.113.7 10.0.0.5 56324 443\r\nGET / HTTP/1.1\r\n";
        let (h, used) = ok(input);
        assert_eq!(h.source, Some("203.0.113.7:56324".parse().unwrap()));
        assert_eq!(&input[used..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn v1_tcp6() {
        let (h, _) = ok(b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 8080\r\n");
        assert_eq!(h.source, Some("[2001:db8::1]:65535".parse().unwrap()));
    }

    #[test]
    fn v1_unknown_keeps_the_peer() {
        let (h, used) = ok(b"PROXY UNKNOWN\r\n");
        assert_eq!((h.source, used), (None, 15));
        let (h, _) = ok(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n");
        assert_eq!(h.source, None);
    }

    #[test]
    fn v1_malformed() {
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n");
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 extra\r\n");
        invalid(b"PROXY TCP4 2001:db8::1 5.6.7.8 80 443\r\n");
        invalid(b"PROXY TCP6 1.2.3.4 2001:db8::2 80 443\r\n");
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 443\r\n");
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 443\r\n");
        invalid(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 443\r\n");
        invalid(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 443\r\n");
        invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 443\n");
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.extend_from_slice(&[b'a'; 100]);
        long.extend_from_slice(b"\r\n");
        assert_eq!(invalid(&long), "v1 header longer than 107 bytes");
    }

    #[test]
    fn garbage_is_not_a_header() {
        invalid(b"GET / HTTP/1.1\r\n\r\n");
        invalid(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        invalid(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
        invalid(b"\r\n\r\nGET");
        assert_eq!(parse(b""), Err(ParseError::Incomplete));
        assert_eq!(parse(b"PROX"), Err(ParseError::Incomplete));
    }

    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(ver_cmd);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn inet4(src: [u8; 4], sport: u16) -> Vec<u8> {
        let mut b = src.to_vec();
        b.extend_from_slice(&[10, 0, 0, 5]);
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    #[test]
    fn v2_tcp4_with_tlvs() {
        let mut body = inet4([198, 51, 100, 9], 40000);
        // AWS VPC endpoint id, then a NOOP padding TLV.
        body.extend_from_slice(&[0xEA, 0, 5, 0x01, b'v', b'p', b'c', b'e']);
        body.extend_from_slice(&[0x04, 0, 2, 0, 0]);
        let mut input = v2(0x21, 0x11, &body);
        let header_len = input.len();
        input.extend_from_slice(b"\x16\x03\x01");
        let (h, used) = ok(&input);
        assert_eq!(used, header_len);
        assert_eq!(h.source, Some("198.51.100.9:40000".parse().unwrap()));
    }

    #[test]
    fn v2_tcp6() {
        let mut body = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&1234u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let (h, _) = ok(&v2(0x21, 0x21, &body));
        assert_eq!(h.source, Some("[2001:db8::7]:1234".parse().unwrap()));
    }

    #[test]
    fn v2_local_unspec_udp_and_unix_keep_the_peer() {
        // LOCAL with an address: the address is ignored.
        assert_eq!(ok(&v2(0x20, 0x11, &inet4([1, 2, 3, 4], 1))).0.source, None);
        assert_eq!(ok(&v2(0x20, 0x00, &[])).0.source, None);
        assert_eq!(ok(&v2(0x21, 0x00, &[])).0.source, None);
        assert_eq!(ok(&v2(0x21, 0x12, &inet4([1, 2, 3, 4], 1))).0.source, None);
        assert_eq!(ok(&v2(0x21, 0x31, &[0u8; 216])).0.source, None);
    }

    #[test]
    fn v2_malformed() {
        assert!(invalid(&v2(0x11, 0x11, &inet4([1, 2, 3, 4], 1))).contains("version"));
        assert!(invalid(&v2(0x22, 0x11, &inet4([1, 2, 3, 4], 1))).contains("command"));
        assert!(invalid(&v2(0x21, 0x41, &inet4([1, 2, 3, 4], 1))).contains("family"));
        assert!(invalid(&v2(0x21, 0x13, &inet4([1, 2, 3, 4], 1))).contains("family"));
        assert!(invalid(&v2(0x21, 0x11, &[1, 2, 3, 4, 5, 6])).contains("too short"));
        assert!(invalid(&v2(0x21, 0x21, &inet4([1, 2, 3, 4], 1))).contains("too short"));
        let mut body = inet4([1, 2, 3, 4], 1);
        body.extend_from_slice(&[0xEA, 0, 9, 1, 2]);
        assert!(invalid(&v2(0x21, 0x11, &body)).contains("TLV"));
        let mut body = inet4([1, 2, 3, 4], 1);
        body.extend_from_slice(&[0xEA, 0]);
        assert!(invalid(&v2(0x21, 0x11, &body)).contains("TLV"));
    }

    #[test]
    fn v2_truncated_is_incomplete() {
        let full = v2(0x21, 0x11, &inet4([1, 2, 3, 4], 1));
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Err(ParseError::Incomplete), "{cut}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut input = match rng.u8(..3) {
                0 => V2_SIGNATURE.to_vec(),
                1 => b"PROXY ".to_vec(),
                _ => Vec::new(),
            };
            for _ in 0..rng.usize(..80) {
                input.push(rng.u8(..));
            }
            if let Ok((_, used)) = parse(&input) {
                assert!(used <= input.len());
            }
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn reads_exactly_the_header_even_when_split() {
        use tokio::io::AsyncWriteExt;
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.5 56324 443\r\n".to_vec();
        let mut v2h = v2(0x21, 0x11, &inet4([198, 51, 100, 9], 40000));
        v2h.extend_from_slice(&[0xEA, 0, 1, 7]);
        let len = (v2h.len() - 16) as u16;
        v2h[14..16].copy_from_slice(&len.to_be_bytes());
        for header in [v1, v2h] {
            for split in [1usize, 15, 16, 20, header.len() - 1] {
                let (mut c, mut s) = pair().await;
                let data = [header.as_slice(), b"GET / HTTP/1.1\r\n\r\n"].concat();
                let first = data[..split].to_vec();
                let rest = data[split..].to_vec();
                let writer = tokio::spawn(async move {
                    c.write_all(&first).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    c.write_all(&rest).await.unwrap();
                    c
                });
                let h = read_header(&mut s).await.unwrap();
                assert!(h.source.is_some());
                let mut after = vec![0u8; 18];
                s.read_exact(&mut after).await.unwrap();
                assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n", "split at {split}");
                drop(writer.await.unwrap());
            }
        }
    }
}
