//! The HTTP/1.1 server's messages without I/O: a request head parsed from the front of the read
//! buffer into the `http` types, an answer's head written out (RFC 9112).
//!
//! It parses the requests it serves: HTTP/1.1 with no body or a body of known length. Anything
//! else is [`Parsed::HandOff`], and hyper's server takes the connection from that request on, as
//! it served every connection before: HTTP/1.0, a transfer coding, an expectation other than
//! `100-continue`, `Upgrade`, a head httparse or the `http` types refuse (hyper answers those
//! 400 or 431 itself), more fields than `server.max_headers`.
//!
//! The framing guard has seen every head first (`listener::guard`): a length beside a transfer
//! coding, a list of lengths and `CONNECT` never get here.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::response::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};

use crate::forward::list_items;
use crate::http1::{write_field, write_length};

/// Field slots on the stack: `server.max_headers` above this goes to hyper, which takes any.
const FIELD_SLOTS: usize = 100;

/// What the front of the read buffer holds.
#[derive(Debug)]
// Returned once per request and taken apart at once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// Not all of the head has arrived.
    Partial,
    /// A request this server carries. Its head took `head_len` bytes of the buffer, and its body
    /// (`body_len` bytes, perhaps not all read yet) follows.
    Request {
        request: Request<()>,
        head_len: usize,
        body_len: usize,
        /// The caller asked for the connection to be closed after the answer.
        close: bool,
        /// `Expect: 100-continue`: the caller waits for a go-ahead before it sends the body.
        expect_continue: bool,
    },
    /// A request hyper's server is to take, from this head on.
    HandOff,
}

/// Parses the request head at the front of `buf`. Its fields, target and values share one copy
/// of the head's bytes, so `buf` stays the connection's own and is reused for the next request.
pub fn parse_request(buf: &[u8], max_headers: usize) -> Parsed {
    // Left uninitialised: writing 100 empty fields first would cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; FIELD_SLOTS];
    let slots = &mut slots[..max_headers.min(FIELD_SLOTS)];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let head_len = match config.parse_request_with_uninit_headers(&mut parsed, buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOff,
    };
    if parsed.version != Some(1) {
        return Parsed::HandOff;
    }
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Parsed::HandOff;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::HandOff;
    };
    if method == Method::CONNECT {
        return Parsed::HandOff;
    }
    let block = Bytes::copy_from_slice(&buf[..head_len]);
    // Where a slice of `buf` sits in `block`, a copy of the same bytes.
    let shared = |part: &[u8]| {
        let at = part.as_ptr() as usize - buf.as_ptr() as usize;
        block.slice(at..at + part.len())
    };
    let Ok(uri) = Uri::from_maybe_shared(shared(target.as_bytes())) else {
        return Parsed::HandOff;
    };
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let (mut length, mut close, mut expect_continue) = (None, false, false);
    for field in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::HandOff;
        };
        if name == TRANSFER_ENCODING || name == UPGRADE {
            return Parsed::HandOff;
        }
        if name == EXPECT {
            // The one expectation there is (RFC 9110 §10.1.1); hyper decides what others get.
            if !field.value.eq_ignore_ascii_case(b"100-continue") {
                return Parsed::HandOff;
            }
            expect_continue = true;
        }
        if name == CONTENT_LENGTH {
            // Repeats (even equal ones) and lists are the guard's to refuse, anything but digits
            // hyper's.
            match (length, parse_length(field.value)) {
                (None, Some(n)) => length = Some(n),
                _ => return Parsed::HandOff,
            }
        } else if name == CONNECTION {
            close |= list_items(field.value).any(|item| item.eq_ignore_ascii_case(b"close"));
        }
        let Ok(value) = HeaderValue::from_maybe_shared(shared(field.value)) else {
            return Parsed::HandOff;
        };
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Request {
        request,
        head_len,
        body_len: length.unwrap_or(0),
        close,
        expect_continue,
    }
}

/// A `Content-Length` value: decimal digits only, surrounding blanks allowed.
fn parse_length(value: &[u8]) -> Option<usize> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// How an answer's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// None at all: an answer to HEAD, a 204 or a 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    Chunked,
}

/// Writes the answer's head to `out`: its status line and fields, the framing this server
/// chooses, `Date` unless the answer has one, and `Connection: close` when the connection ends
/// after it (`close`, or the answer's own `Connection` says so). `length` is the body's exact
/// length when it is known. Returns how the body is framed and whether the connection closes
/// after it.
///
/// The framing is the server's to choose: the answer's own `Transfer-Encoding` is not written
/// and its `Content-Length` only where no body is sent (HEAD) or the body's length is not known.
pub fn encode_head(
    head: &Parts,
    length: Option<u64>,
    request: &Method,
    mut close: bool,
    out: &mut Vec<u8>,
) -> (Framing, bool) {
    // hyper has no way to send an informational answer on its own either; it answers 500.
    let status = if head.status.is_informational() {
        close = true;
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        head.status
    };
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        // A reason must be written: many parsers expect one.
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let is_head = *request == Method::HEAD;
    let (mut declared, mut wrote_date, mut said_close) = (None::<u64>, false, false);
    for (name, value) in head.headers.iter() {
        if *name == CONTENT_LENGTH {
            if declared.is_none() {
                declared = std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            }
            continue;
        }
        if *name == TRANSFER_ENCODING {
            continue;
        }
        if *name == CONNECTION {
            said_close |= list_items(value.as_bytes()).any(|i| i.eq_ignore_ascii_case(b"close"));
        } else if *name == DATE {
            wrote_date = true;
        }
        write_field(out, name, value.as_bytes());
    }
    let framing = if no_body {
        Framing::Empty
    } else if is_head {
        // What a GET would have been sent, as the answer says it (a relayed HEAD's body is
        // empty, its `Content-Length` the upstream's).
        if let Some(n) = declared.or(length.filter(|n| *n > 0)) {
            write_length(out, n);
        }
        Framing::Empty
    } else {
        match length.or(declared) {
            Some(n) => {
                write_length(out, n);
                Framing::Length(n)
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
        }
    };
    close |= said_close;
    if close && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        DATE_NOW.with(|d| d.borrow_mut().write(out));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, close)
}

thread_local! {
    /// The `Date` value, formatted once a second per thread rather than for every answer.
    static DATE_NOW: RefCell<DateNow> = const { RefCell::new(DateNow { second: 0, text: [0; 29] }) };
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, always 29 bytes) and the second it is for.
struct DateNow {
    second: u64,
    text: [u8; 29],
}

impl DateNow {
    fn write(&mut self, out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if second != self.second {
            let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
            if text.len() == self.text.len() {
                self.text.copy_from_slice(text.as_bytes());
                self.second = second;
            }
        }
        out.extend_from_slice(&self.text);
    }
}

/// Seeded random heads against the framing guard, as `tests/robustness.rs` does for the guard
/// alone (`BREAKWATER_FUZZ_SEED`, `BREAKWATER_FUZZ_ROUNDS` explore further): the own server must
/// never serve a head the guard refuses, nor see a body other than the one the guard would pass.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::listener::guard::Guard;

    fn rng() -> fastrand::Rng {
        let seed = std::env::var("BREAKWATER_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_b4ea_c0de);
        fastrand::Rng::with_seed(seed)
    }

    fn rounds() -> usize {
        std::env::var("BREAKWATER_FUZZ_ROUNDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20_000)
    }

    fn pick<'a>(rng: &mut fastrand::Rng, from: &[&'a str]) -> &'a str {
        from[rng.usize(..from.len())]
    }

    /// A request head from parts that matter to framing: mostly well formed, so that heads the
    /// server would serve meet every framing field, with odd spellings among them.
    fn head(rng: &mut fastrand::Rng) -> Vec<u8> {
        let odd = |rng: &mut fastrand::Rng| rng.u8(..10) == 0;
        let method = if odd(rng) {
            pick(rng, &["CONNECT", "G\0T", "PRI"])
        } else {
            pick(rng, &["GET", "POST", "HEAD", "PUT", "OPTIONS"])
        };
        let target = if odd(rng) {
            pick(rng, &["*", "http://h/x", "/%zz", "/ sp", ""])
        } else {
            pick(rng, &["/", "/a?b=c"])
        };
        let version = if odd(rng) {
            pick(rng, &["HTTP/1.0", "HTTP/2.0", "HTTP/1.x"])
        } else {
            "HTTP/1.1"
        };
        let mut out = format!("{method} {target} {version}\r\n").into_bytes();
        for _ in 0..rng.usize(0..5) {
            let name = if odd(rng) {
                pick(rng, &["Bad Name", "x\x01", ""])
            } else {
                pick(
                    rng,
                    &[
                        "Host",
                        "content-length",
                        "Content-Length",
                        "Transfer-Encoding",
                        "Expect",
                        "Upgrade",
                        "Connection",
                        "X-A",
                    ],
                )
            };
            let value = if odd(rng) {
                pick(rng, &["x\x01y", "\x7f", "5\r\n x"])
            } else {
                pick(
                    rng,
                    &[
                        "0",
                        "3",
                        "5",
                        " 5 ",
                        "+5",
                        "-1",
                        "5, 5",
                        "0x5",
                        "chunked",
                        "gzip, chunked",
                        "close",
                        "keep-alive",
                        "100-continue",
                        "h2c",
                        "",
                    ],
                )
            };
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    #[test]
    fn the_own_server_serves_only_heads_the_guard_passes_and_frames_them_alike() {
        let mut rng = rng();
        for _ in 0..rounds() {
            let head = head(&mut rng);
            let mut input = head.clone();
            input.extend(std::iter::repeat_n(b'b', rng.usize(0..8)));
            let mut guard = Guard::new(64 * 1024, 100);
            let mut passed = Vec::new();
            let refused = guard.feed(&input, &mut passed);
            match parse_request(&input, 100) {
                Parsed::Request {
                    head_len, body_len, ..
                } => {
                    assert!(
                        refused.is_none(),
                        "served a head the guard refuses: {input:?}"
                    );
                    assert_eq!(head_len, head.len(), "{input:?}");
                    // The guard, told the body is over, is at the next head exactly when the
                    // server would read one there.
                    let mut after = Guard::new(64 * 1024, 100);
                    let mut out = Vec::new();
                    let whole = &input[..(head_len + body_len).min(input.len())];
                    after.feed(whole, &mut out);
                    if whole.len() == head_len + body_len {
                        assert!(after.at_head(), "{input:?}");
                    }
                }
                Parsed::Partial => panic!("a complete head read as partial: {input:?}"),
                Parsed::HandOff => {}
            }
            // Cut anywhere inside the head, it is never served.
            let cut = rng.usize(..head.len());
            assert!(
                !matches!(parse_request(&head[..cut], 100), Parsed::Request { .. }),
                "{:?}",
                &head[..cut]
            );
        }
    }
}
