//! HTTP/1.1 to an upstream as bytes, without I/O: the request's head written out, the answer's
//! head parsed (RFC 9112 §4–6), and the answer's body framing read from a buffer. Kept apart from
//! the connection so every hostile input — heads split at any byte, heads too large, lengths that
//! disagree, chunk lines that never end — is tested without a socket.

use std::mem::MaybeUninit;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};

use crate::forward::{list_items, Forwarding, BUDGET};
use crate::http1::{write_field, write_length};

/// Largest answer head accepted (each informational head on its own too; a stream of them is
/// ended by the request's budget).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields an answer head may carry (hyper's limit).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest trailer section of a chunked answer (read and dropped: the caller never gets it).
const MAX_TRAILERS: usize = 64 * 1024;

/// What is wrong with what the upstream sent. Each is a 502 for the caller and a closed
/// connection: after a framing error nothing on it can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("answer head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("answer head: {0}")]
    Head(httparse::Error),
    #[error("answer status {0} is not valid")]
    Status(u16),
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    Upgrade,
    #[error("answer header field {0:?} is not valid")]
    Field(String),
    #[error("answer Content-Length is not one valid length")]
    ContentLength,
    #[error("chunk size or trailer line is not valid")]
    ChunkSize,
    #[error("chunk size line longer than {MAX_CHUNK_LINE} bytes")]
    ChunkLine,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("trailers larger than {MAX_TRAILERS} bytes")]
    Trailers,
    #[error("connection closed {0} bytes before the answer's body ended")]
    Truncated(u64),
    #[error("connection closed inside a chunked answer")]
    TruncatedChunked,
}

/// How a request's body goes out, decided with its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes follow the head (`Content-Length`).
    Length(u64),
    /// Chunked: the body's length is not known when the head goes out.
    Chunked,
}

/// What the gateway sets on a request as it goes out: a caller's field of the same name is not
/// sent. `host` first, the forwarding fields after the caller's own, then the budget.
#[derive(Debug, Default, Clone, Copy)]
pub struct Added<'a> {
    pub forwarding: Option<&'a Forwarding>,
    /// The Host sent (an endpoint's own, or the forwarding's).
    pub host: Option<&'a HeaderValue>,
    /// The budget left as the request goes out, in milliseconds.
    pub budget_ms: Option<u64>,
}

impl Added<'_> {
    fn replaces(&self, name: &HeaderName) -> bool {
        (self.host.is_some() && name == HOST)
            || (self.budget_ms.is_some() && *name == BUDGET)
            || self.forwarding.is_some_and(|f| f.replaces(name))
    }
}

/// Writes the head of a request into `out`: origin-form target (from a parsed `Uri`, so it holds
/// no whitespace or line end), HTTP/1.1, the fields as they are except any framing field and
/// those `added` replaces, then what `added` sets, then the framing this body needs.
/// `body_len`: the body's exact length when known (`Some(0)` for a body that has ended), `None`
/// for one still streaming.
///
/// The framing is the gateway's own decision, never a copy of the caller's (a stale or second
/// `Content-Length` would desynchronise the connection): a known length is sent as
/// `Content-Length`, a streaming body with a `Content-Length` the caller declared (and the
/// listener verified) keeps it, and any other streaming body goes chunked.
pub fn encode_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    added: &Added<'_>,
    body_len: Option<u64>,
    out: &mut Vec<u8>,
) -> RequestFraming {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = added.host {
        write_field(out, &HOST, host.as_bytes());
    }
    let mut declared = None;
    for (name, value) in headers {
        if name == CONTENT_LENGTH {
            if declared.is_none() {
                declared = parse_length(value.as_bytes());
            }
            continue;
        }
        if name == TRANSFER_ENCODING || added.replaces(name) {
            continue;
        }
        write_field(out, name, value.as_bytes());
    }
    if let Some(f) = added.forwarding {
        for (name, value) in f.fields() {
            write_field(out, name, value.as_bytes());
        }
    }
    if let Some(ms) = added.budget_ms {
        write_field(out, &BUDGET, itoa::Buffer::new().format(ms).as_bytes());
    }
    let framing = match body_len {
        Some(0) if declared.is_none_or(|d| d == 0) => {
            // A method that defines a body says it is empty; others say nothing.
            if declared.is_some() || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            RequestFraming::Empty
        }
        Some(n) => {
            write_length(out, n);
            RequestFraming::Length(n)
        }
        None => match declared {
            Some(n) => {
                write_length(out, n);
                RequestFraming::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                RequestFraming::Chunked
            }
        },
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// How the answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: an answer to HEAD, a 204 or a 304.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// Read until the upstream closes the connection.
    Close,
}

impl Framing {
    /// The body's exact length, when the head says it.
    pub fn exact(self) -> Option<u64> {
        match self {
            Framing::Empty => Some(0),
            Framing::Length(n) => Some(n),
            Framing::Chunked | Framing::Close => None,
        }
    }
}

/// An answer's head, parsed. Its map holds no hop-by-hop field (RFC 9110 §7.6.1) and none that
/// `Connection` names: what they say about the connection is in `said`.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// The framing lets the connection carry another exchange after this one (what the
    /// `Connection` field says is in `said`).
    pub reusable: bool,
    pub said: ConnectionSaid,
}

/// What an answer's head says about its connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionSaid {
    /// The upstream closes the connection after this answer (`Connection: close`, or HTTP/1.0).
    pub closes: bool,
    /// The idle timeout it announces (`Keep-Alive: timeout=N`, the first such field).
    pub idle_timeout: Option<Duration>,
}

impl ConnectionSaid {
    /// Read from the raw fields; also whether `Connection` names any field besides the
    /// hop-by-hop ones (then those fields are not kept either).
    fn of(version: Version, fields: &[httparse::Header<'_>]) -> (Self, bool) {
        let mut said = ConnectionSaid {
            closes: version == Version::HTTP_10,
            idle_timeout: None,
        };
        let (mut names_others, mut keep_alive_seen) = (false, false);
        for field in fields {
            if field.name.eq_ignore_ascii_case("connection") {
                for item in list_items(field.value) {
                    said.closes |= item.eq_ignore_ascii_case(b"close");
                    names_others |=
                        !item.eq_ignore_ascii_case(b"close") && !crate::forward::is_stripped(item);
                }
            } else if !keep_alive_seen && field.name.eq_ignore_ascii_case("keep-alive") {
                keep_alive_seen = true;
                said.idle_timeout = crate::upstream::idle::announced(field.value);
            }
        }
        (said, names_others)
    }
}

/// Whether `Connection` (in any of `fields`) names `name`.
fn named_in_connection(fields: &[httparse::Header<'_>], name: &str) -> bool {
    fields
        .iter()
        .filter(|f| f.name.eq_ignore_ascii_case("connection"))
        .flat_map(|f| list_items(f.value))
        .any(|item| item.eq_ignore_ascii_case(name.as_bytes()))
}

/// Parses the answer's head from the front of `buf`, removing it (and any informational heads
/// before it) from the buffer. `Ok(None)`: not all of it has arrived yet.
pub fn parse_head(buf: &mut BytesMut, request: &Method) -> Result<Option<Head>, Malformed> {
    loop {
        // Left uninitialised: writing 100 empty fields first would cost more than the parse.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(Malformed::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Malformed::Head(e)),
        };
        if len > MAX_HEAD {
            return Err(Malformed::HeadTooLarge);
        }
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| Malformed::Status(code))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Malformed::Upgrade);
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: the final answer follows on the same connection.
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // One copy of the fields shared by every value (a count, not an allocation, per field),
        // so the connection's buffer stays its own and is reused for the next answer.
        let block = Bytes::copy_from_slice(&buf[..len]);
        let (said, names_others) = ConnectionSaid::of(version, parsed.headers);
        // Room for the request id the answer is given.
        let mut headers = HeaderMap::with_capacity(parsed.headers.len() + 1);
        let (mut lengths, mut chunked, mut coded) = (None::<Option<u64>>, false, false);
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| Malformed::Field(field.name.to_string()))?;
            // The framing is read whatever `Connection` names.
            if name == TRANSFER_ENCODING {
                coded = true;
                chunked = last_coding_is_chunked(field.value);
            } else if name == CONTENT_LENGTH {
                let this = parse_length(field.value);
                lengths = Some(match (lengths, this) {
                    (None, n) => n,
                    (Some(Some(a)), Some(b)) if a == b => Some(a),
                    _ => None,
                });
            }
            if crate::forward::is_hop_by_hop(&name)
                || (names_others && named_in_connection(parsed.headers, name.as_str()))
            {
                continue;
            }
            // Where the value sits in the head, found from the two addresses: `block` is a copy
            // of the same bytes.
            let at = field.value.as_ptr() as usize - buf.as_ptr() as usize;
            let value = HeaderValue::from_maybe_shared(block.slice(at..at + field.value.len()))
                .map_err(|_| Malformed::Field(field.name.to_string()))?;
            headers.append(name, value);
        }
        buf.advance(len);
        let bodiless = *request == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let (framing, reusable) = if bodiless {
            (Framing::Empty, true)
        } else if coded {
            // A length beside a transfer coding is a smuggling attempt or a broken upstream: the
            // coding wins (RFC 9112 §6.3), the length is dropped, and the connection is not
            // trusted with another exchange. HTTP/1.0 has no chunked coding.
            let sound = lengths.is_none() && version == Version::HTTP_11;
            headers.remove(CONTENT_LENGTH);
            if chunked && version == Version::HTTP_11 {
                (Framing::Chunked, sound)
            } else {
                (Framing::Close, false)
            }
        } else {
            match lengths {
                None => (Framing::Close, false),
                Some(Some(n)) => (Framing::Length(n), true),
                Some(None) => return Err(Malformed::ContentLength),
            }
        };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            reusable,
            said,
        }));
    }
}

/// A `Content-Length` value: one decimal number, or a list of the same number (RFC 9110 §8.6).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut found = None;
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// What the body decoder found at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many bytes at the front of the buffer are the body's: take them before the next
    /// step.
    Data(usize),
    /// Nothing to take until more arrives.
    NeedMore,
    /// The body has ended.
    Done,
}

/// Reads an answer's body out of the connection's buffer, framing removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk: this many data bytes left.
    ChunkData(u64),
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    /// After the last chunk: trailer lines up to an empty one; bytes of them seen so far.
    Trailers(usize),
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next step over `buf`, whose front is where the body stands. Framing bytes are
    /// consumed here; data is left for the caller to take ([`Step::Data`]).
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Malformed> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Step::Data(take));
                }
                State::Close => {
                    return Ok(if buf.is_empty() {
                        Step::NeedMore
                    } else {
                        Step::Data(buf.len())
                    })
                }
                State::ChunkSize => {
                    let Some(end) = line_end(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Step::NeedMore);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|b| *b != b'\r') {
                            return Err(Malformed::ChunkEnd);
                        }
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Malformed::ChunkEnd);
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers(seen) => {
                    let room = MAX_TRAILERS.saturating_sub(seen);
                    let end = line_end(buf, room).map_err(|e| match e {
                        Malformed::ChunkLine => Malformed::Trailers,
                        other => other,
                    })?;
                    let Some(end) = end else {
                        return Ok(Step::NeedMore);
                    };
                    buf.advance(end + 2);
                    self.state = if end == 0 {
                        State::Done
                    } else {
                        State::Trailers(seen + end + 2)
                    };
                }
            }
        }
    }

    /// The upstream closed the connection: the end of a close-delimited body, and a truncated
    /// one otherwise.
    pub fn at_eof(&mut self) -> Result<(), Malformed> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            State::Length(n) => Err(Malformed::Truncated(n)),
            _ => Err(Malformed::TruncatedChunked),
        }
    }
}

/// Where the CRLF ending the line at the front of `buf` is, if it has arrived; an error if no
/// line end is within `limit` bytes.
fn line_end(buf: &[u8], limit: usize) -> Result<Option<usize>, Malformed> {
    let window = &buf[..buf.len().min(limit.saturating_add(2))];
    match memchr::memchr(b'\n', window) {
        Some(0) => Err(Malformed::ChunkSize),
        Some(i) if window[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(Malformed::ChunkSize),
        None if buf.len() >= limit.saturating_add(2) => Err(Malformed::ChunkLine),
        None => Ok(None),
    }
}

/// The size on a chunk-size line: hex digits, then optional whitespace and extensions (ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Malformed> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return Err(Malformed::ChunkSize);
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';')
        || rest.iter().any(|b| b.is_ascii_control() && *b != b'\t')
    {
        return Err(Malformed::ChunkSize);
    }
    Ok(line[..digits].iter().fold(0u64, |n, d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n * 16 + u64::from(v)
    }))
}

#[cfg(test)]
mod tests;
