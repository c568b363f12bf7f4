//! The floor: what one tokio worker costs per proxied request with nothing but `httparse`
//! between the caller and the upstream. Not a gateway and not to be run as one: no routing,
//! admission, budget, timeouts, logs or metrics, and only `Content-Length` bodies. It answers
//! one question for the per-core benchmarks (docs/benchmarks.md §13): how much of the gap to
//! NGINX a codec of our own could close, before anyone writes one.
//!
//! What it does per request is what any HTTP/1.1 reverse proxy must: read and parse the
//! caller's head, write a new one for the upstream (hop-by-hop headers dropped,
//! `X-Forwarded-For` added), send it on a pooled keep-alive connection (a new one if none is
//! idle; once more on a new one if writing to a reused one fails), parse the answer's head,
//! write a new one for the caller, relay the body, and keep both connections. One
//! current-thread runtime, a task per caller connection, the exchange in that task.
//!
//! With `--http-types` each head is also turned into the `http` crate's parts (method, URI,
//! `HeaderMap`) and written back out from them, as a codec that kept the gateway's
//! `http::Request`-based stages would have to: the price of keeping those types.
//!
//!   cargo build --release --example floor_proxy
//!   target/release/examples/floor_proxy 127.0.0.1:18107 127.0.0.1:18101 [--http-types]

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The largest head read, either way, before the connection is given up.
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// Headers that belong to one hop: never forwarded, either way.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: floor_proxy LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let typed = args.next().is_some_and(|a| a == "--http-types");
    let listen: SocketAddr = listen.parse().map_err(invalid)?;
    let upstream: SocketAddr = upstream.parse().map_err(invalid)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(listen).await?;
        let pool = Rc::new(Pool {
            addr: upstream,
            typed,
            idle: RefCell::new(Vec::new()),
        });
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => continue,
            };
            let _ = stream.set_nodelay(true);
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let _ = serve(stream, peer.ip(), &pool).await;
            });
        }
    })
}

fn invalid<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// Idle keep-alive connections to the one upstream, most recently used last.
struct Pool {
    addr: SocketAddr,
    /// `--http-types`: heads go through `http`'s parts.
    typed: bool,
    idle: RefCell<Vec<Upstream>>,
}

struct Upstream {
    stream: TcpStream,
    /// Bytes read past the last answer (none, from a well-behaved upstream).
    buf: Vec<u8>,
}

impl Pool {
    async fn connect(&self) -> io::Result<Upstream> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(Upstream {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }
}

/// One caller connection: requests one after another until it closes.
async fn serve(mut client: TcpStream, peer: IpAddr, pool: &Pool) -> io::Result<()> {
    let mut inbuf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        out.clear();
        let (head_len, body_len) = loop {
            if let Some(parsed) = request_head(&inbuf, &mut out, peer, pool.typed)? {
                break parsed;
            }
            if inbuf.len() >= MAX_HEAD || client.read_buf(&mut inbuf).await? == 0 {
                return Ok(());
            }
        };
        inbuf.drain(..head_len);
        // A request body rides along after the head: what has been read, then the rest.
        let early = body_len.min(inbuf.len());
        out.extend_from_slice(&inbuf[..early]);
        inbuf.drain(..early);
        let rest = body_len - early;

        let reused = pool.idle.borrow_mut().pop();
        let mut up = match reused {
            Some(up) => match send(up, &out, &mut client, rest).await {
                Ok(up) => up,
                // The idle connection was closed by the upstream: once more on a new one, when
                // nothing of the body has been read from the caller yet.
                Err(_) if rest == 0 => send(pool.connect().await?, &out, &mut client, 0).await?,
                Err(e) => return Err(e),
            },
            None => send(pool.connect().await?, &out, &mut client, rest).await?,
        };

        out.clear();
        let (head_len, body_len, keep) = loop {
            if let Some(parsed) = response_head(&up.buf, &mut out, pool.typed)? {
                break parsed;
            }
            if up.buf.len() >= MAX_HEAD || up.stream.read_buf(&mut up.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        up.buf.drain(..head_len);
        let early = body_len.min(up.buf.len());
        out.extend_from_slice(&up.buf[..early]);
        up.buf.drain(..early);
        client.write_all(&out).await?;
        let mut rest = body_len - early;
        while rest > 0 {
            up.buf.clear();
            let n = up.stream.read_buf(&mut up.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = n.min(rest);
            client.write_all(&up.buf[..take]).await?;
            up.buf.drain(..take);
            rest -= take;
        }
        if keep && up.buf.is_empty() {
            pool.idle.borrow_mut().push(up);
        }
    }
}

/// Writes the head (and the body bytes already read) to the upstream, then the rest of the
/// body from the caller.
async fn send(
    mut up: Upstream,
    head: &[u8],
    client: &mut TcpStream,
    mut rest: usize,
) -> io::Result<Upstream> {
    up.stream.write_all(head).await?;
    let mut chunk = [0u8; 8192];
    while rest > 0 {
        let want = rest.min(chunk.len());
        let n = client.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        up.stream.write_all(&chunk[..n]).await?;
        rest -= n;
    }
    Ok(up)
}

/// Parses the caller's head from `buf`; when it is whole, writes the upstream's head into
/// `out` and returns the head's length and the body's.
fn request_head(
    buf: &[u8],
    out: &mut Vec<u8>,
    peer: IpAddr,
    typed: bool,
) -> io::Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(invalid)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    if typed {
        let head = bytes::Bytes::copy_from_slice(&buf[..len]);
        return typed_request(&req, buf, &head, out, peer).map(|body| Some((len, body)));
    }
    let mut body = 0;
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked request bodies are not relayed"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            body = content_length(h.value)?;
        }
        if !is_hop_by_hop(h.name) {
            header(out, h.name.as_bytes(), h.value);
        }
    }
    header(out, b"x-forwarded-for", peer.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(Some((len, body)))
}

/// Parses the upstream's head from `buf`; when it is whole, writes the caller's head into
/// `out` and returns the head's length, the body's, and whether the connection may be kept.
fn response_head(
    buf: &[u8],
    out: &mut Vec<u8>,
    typed: bool,
) -> io::Result<Option<(usize, usize, bool)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(invalid)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    if typed {
        let head = bytes::Bytes::copy_from_slice(&buf[..len]);
        return typed_response(&resp, buf, &head, out).map(|(body, keep)| Some((len, body, keep)));
    }
    let code = resp.code.unwrap_or(502);
    let (mut body, mut keep, mut framed) = (0, resp.version == Some(1), false);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked answers are not relayed"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            body = content_length(h.value)?;
            framed = true;
        }
        if h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
            keep = false;
        }
        if !is_hop_by_hop(h.name) {
            header(out, h.name.as_bytes(), h.value);
        }
    }
    if !framed && !matches!(code, 100..=199 | 204 | 304) {
        return Err(invalid("answers without Content-Length are not relayed"));
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((len, body, keep)))
}

/// The request's head through `http`'s parts: what hyper's server hands the gateway, and what
/// its client writes back out.
fn typed_request(
    req: &httparse::Request,
    buf: &[u8],
    head: &bytes::Bytes,
    out: &mut Vec<u8>,
    peer: IpAddr,
) -> io::Result<usize> {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method =
        http::Method::from_bytes(req.method.unwrap_or("GET").as_bytes()).map_err(invalid)?;
    parts.uri = req.path.unwrap_or("/").parse().map_err(invalid)?;
    parts.headers = headers_of(req.headers, buf, head)?;
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(invalid("chunked request bodies are not relayed"));
    }
    let body = match parts.headers.get(http::header::CONTENT_LENGTH) {
        Some(v) => content_length(v.as_bytes())?,
        None => 0,
    };
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts.headers.append(
        http::header::HeaderName::from_static("x-forwarded-for"),
        http::HeaderValue::from_str(&peer.to_string()).map_err(invalid)?,
    );
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Ok(body)
}

/// The answer's head through `http`'s parts, as hyper's client hands it over and its server
/// writes it.
fn typed_response(
    resp: &httparse::Response,
    buf: &[u8],
    head: &bytes::Bytes,
    out: &mut Vec<u8>,
) -> io::Result<(usize, bool)> {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(resp.code.unwrap_or(502)).map_err(invalid)?;
    parts.headers = headers_of(resp.headers, buf, head)?;
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(invalid("chunked answers are not relayed"));
    }
    let keep = resp.version == Some(1)
        && !parts
            .headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = match parts.headers.get(http::header::CONTENT_LENGTH) {
        Some(v) => content_length(v.as_bytes())?,
        None if matches!(parts.status.as_u16(), 100..=199 | 204 | 304) => 0,
        None => return Err(invalid("answers without Content-Length are not relayed")),
    };
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Ok((body, keep))
}

/// Values share `head` (a copy of the head `buf` held) rather than being copied one by one,
/// as hyper's share its read buffer.
fn headers_of(
    raw: &[httparse::Header],
    buf: &[u8],
    head: &bytes::Bytes,
) -> io::Result<http::HeaderMap> {
    let mut map = http::HeaderMap::with_capacity(raw.len());
    for h in raw {
        let at = h.value.as_ptr() as usize - buf.as_ptr() as usize;
        map.append(
            http::header::HeaderName::from_bytes(h.name.as_bytes()).map_err(invalid)?,
            http::HeaderValue::from_maybe_shared(head.slice(at..at + h.value.len()))
                .map_err(invalid)?,
        );
    }
    Ok(map)
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn content_length(value: &[u8]) -> io::Result<usize> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| invalid("bad Content-Length"))
}
