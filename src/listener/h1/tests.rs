//! The own HTTP/1.1 server: its codec on hostile and split input, then the connection over an
//! in-memory stream, with a client that writes exactly the bytes a test wants and a handler the
//! test answers for, so every answer is compared byte for byte and every hand-off is seen with
//! the bytes hyper would get.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::response::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};

use super::codec::{self, Framing, Parsed};
use super::{ConnError, Outcome, Server};
use crate::body::{full, BoxError, ClientBody, ResponseBody};
use crate::listener::guard::Guard;
use crate::listener::{ConnActivity, ConnInfo, Handler, TrackedIo};
use crate::scripted::Reader;

/// Bounds a wait, so a test that goes wrong fails instead of hanging.
macro_rules! soon {
    ($fut:expr) => {
        tokio::time::timeout(Duration::from_secs(5), $fut)
            .await
            .unwrap_or_else(|_| panic!("nothing within 5 s: {}", stringify!($fut)))
    };
}

// ---------------------------------------------------------------------------------------------
// Codec helpers
// ---------------------------------------------------------------------------------------------

/// What a parsed request says, in a form that compares (`Request` has no `PartialEq`).
#[derive(Debug, PartialEq)]
struct Summary {
    method: Method,
    uri: String,
    version: Version,
    headers: Vec<(String, Vec<u8>)>,
    head_len: usize,
    body_len: usize,
    close: bool,
    expect_continue: bool,
}

#[derive(Debug, PartialEq)]
enum Got {
    Partial,
    Request(Summary),
    HandOff,
}

fn parse(buf: &[u8], max_headers: usize) -> Got {
    match codec::parse_request(buf, max_headers) {
        Parsed::Partial => Got::Partial,
        Parsed::HandOff => Got::HandOff,
        Parsed::Request {
            request,
            head_len,
            body_len,
            close,
            expect_continue,
        } => Got::Request(Summary {
            method: request.method().clone(),
            uri: request.uri().to_string(),
            version: request.version(),
            headers: request
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            head_len,
            body_len,
            close,
            expect_continue,
        }),
    }
}

/// Parses `input` whole and every prefix of it. A request: every prefix shorter than its head is
/// `Partial`, every longer one the same request. Anything else: no prefix is a request either.
fn parse_every_prefix(input: &[u8], max_headers: usize) -> Got {
    let whole = parse(input, max_headers);
    match &whole {
        Got::Request(summary) => {
            for end in 0..summary.head_len {
                // A copy of its own: nothing past the prefix can be read by mistake.
                let prefix = input[..end].to_vec();
                assert_eq!(
                    parse(&prefix, max_headers),
                    Got::Partial,
                    "prefix of {end} bytes of {:?}",
                    String::from_utf8_lossy(input)
                );
            }
            for end in summary.head_len..=input.len() {
                let prefix = input[..end].to_vec();
                assert_eq!(parse(&prefix, max_headers), whole, "prefix of {end} bytes");
            }
        }
        _ => {
            for end in 0..input.len() {
                let prefix = input[..end].to_vec();
                let got = parse(&prefix, max_headers);
                assert!(
                    !matches!(got, Got::Request(_)),
                    "prefix of {end} bytes of {:?} parsed as {got:?}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }
    whole
}

fn request_of(input: &[u8]) -> Summary {
    match parse_every_prefix(input, 100) {
        Got::Request(summary) => summary,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
    }
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn parts(status: u16, pairs: &[(&str, &str)]) -> Parts {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(status).unwrap();
    parts.headers = header_map(pairs);
    parts
}

/// `encode_head` of an answer: its head as text, with the `date` it added masked
/// ([`masked`]), the framing and whether the connection closes.
fn encode(
    status: u16,
    pairs: &[(&str, &str)],
    length: Option<u64>,
    method: &Method,
    close: bool,
) -> (String, Framing, bool) {
    let mut out = Vec::new();
    let (framing, close) =
        codec::encode_head(&parts(status, pairs), length, method, close, &mut out);
    (masked(&out), framing, close)
}

/// `text` with the value of its `date` field replaced by `<date>`, after checking it is an
/// IMF-fixdate (29 bytes) of about now.
fn masked(bytes: &[u8]) -> String {
    let text = String::from_utf8(bytes.to_vec()).expect("an answer head is text");
    let Some(at) = text.find("\r\ndate: ") else {
        return text;
    };
    let from = at + "\r\ndate: ".len();
    let len = text[from..].find("\r\n").expect("the date line ends");
    let value = &text[from..from + len];
    assert_eq!(len, 29, "not an IMF-fixdate: {value:?}");
    assert!(value.ends_with(" GMT"), "{value:?}");
    let when = httpdate::parse_http_date(value).expect("an HTTP date");
    let now = SystemTime::now();
    let behind = now.duration_since(when).unwrap_or_default();
    let ahead = when.duration_since(now).unwrap_or_default();
    assert!(
        behind < Duration::from_secs(5) && ahead < Duration::from_secs(1),
        "the date is not now: {value}"
    );
    format!("{}<date>{}", &text[..from], &text[from + len..])
}

// ---------------------------------------------------------------------------------------------
// parse_request
// ---------------------------------------------------------------------------------------------

#[test]
fn a_head_split_at_every_byte_is_partial_until_whole_then_the_same_request() {
    let input = b"POST /a/b?c=d HTTP/1.1\r\nHost: example.test\r\nX-Empty:\r\n\
                  x-spaced:   padded value  \r\nContent-Length: 5\r\nX-Two: 1\r\nx-two: 2\r\n\r\nhello";
    let head_len = input.len() - 5;
    assert_eq!(
        request_of(input),
        Summary {
            method: Method::POST,
            uri: "/a/b?c=d".into(),
            version: Version::HTTP_11,
            headers: fields(&[
                ("host", "example.test"),
                ("x-empty", ""),
                ("x-spaced", "padded value"),
                ("content-length", "5"),
                ("x-two", "1"),
                ("x-two", "2"),
            ]),
            head_len,
            body_len: 5,
            close: false,
            expect_continue: false,
        }
    );

    // Waiting for a go-ahead before the body; any other expectation is hyper's to judge.
    let got = request_of(
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nExpect: 100-Continue\r\n\r\n",
    );
    assert!(got.expect_continue && got.body_len == 5);

    // No fields at all, an absolute target, `OPTIONS *`, an extension method.
    let input = b"GET http://example.test/x?y HTTP/1.1\r\n\r\n";
    let got = request_of(input);
    assert_eq!(
        (
            got.uri.as_str(),
            got.head_len,
            got.body_len,
            got.headers.len()
        ),
        ("http://example.test/x?y", input.len(), 0, 0)
    );
    let got = request_of(b"OPTIONS * HTTP/1.1\r\nhost: a\r\n\r\n");
    assert_eq!((got.method, got.uri.as_str()), (Method::OPTIONS, "*"));
    let got = request_of(b"PURGE /cache HTTP/1.1\r\nhost: a\r\n\r\n");
    assert_eq!(got.method.as_str(), "PURGE");

    // Empty lines before the request line are allowed (RFC 9112 §2.2) and part of the head.
    let input = b"\r\n\r\nGET /late HTTP/1.1\r\nhost: a\r\n\r\nGET /next";
    let got = request_of(input);
    assert_eq!(
        (got.uri.as_str(), got.head_len),
        ("/late", input.len() - b"GET /next".len())
    );
}

#[test]
fn a_pipelined_next_head_is_not_part_of_the_first() {
    let first = b"GET /1 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n";
    let input = [&first[..], b"abcGET /2 HTTP/1.1\r\nhost: a\r\n\r\n"].concat();
    let got = request_of(&input);
    assert_eq!(
        (got.uri.as_str(), got.head_len, got.body_len),
        ("/1", first.len(), 3)
    );
}

#[test]
fn requests_this_server_does_not_carry_are_handed_off() {
    let cases: &[(&str, &[u8])] = &[
        ("HTTP/1.0", b"GET / HTTP/1.0\r\nhost: a\r\n\r\n"),
        ("HTTP/1.0 keep-alive", b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"),
        (
            "chunked",
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("transfer coding, any case", b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"),
        ("empty transfer coding", b"POST / HTTP/1.1\r\ntransfer-encoding:\r\n\r\n"),
        (
            "length and transfer coding",
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\nhello",
        ),
        (
            "transfer coding and length",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\nhello",
        ),
        ("expect, odd value", b"GET / HTTP/1.1\r\nEXPECT: x\r\n\r\n"),
        (
            "upgrade",
            b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        ),
        ("upgrade alone", b"GET / HTTP/1.1\r\nUpgrade: h2c\r\n\r\n"),
        ("CONNECT", b"CONNECT example.test:443 HTTP/1.1\r\nhost: example.test:443\r\n\r\n"),
        ("HTTP/2 version", b"GET / HTTP/2.0\r\nhost: a\r\n\r\n"),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("garbage", b"GARBAGE\r\n\r\n"),
        ("no target", b"GET HTTP/1.1\r\n\r\n"),
        ("no version", b"GET /\r\n\r\n"),
        ("lowercase version", b"GET / http/1.1\r\n\r\n"),
        ("extra word", b"GET / HTTP/1.1 x\r\n\r\n"),
        ("two spaces", b"GET  / HTTP/1.1\r\n\r\n"),
        ("NUL first", b"\0GET / HTTP/1.1\r\n\r\n"),
        ("space in target", b"GET /a b HTTP/1.1\r\n\r\n"),
        ("control byte in target", b"GET /a\x01b HTTP/1.1\r\n\r\n"),
        ("binary", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nx-a: one\r\n two\r\n\r\n"),
    ];
    for (what, input) in cases {
        assert_eq!(parse_every_prefix(input, 100), Got::HandOff, "{what}");
    }
}

#[test]
fn content_length_must_be_one_field_of_plain_digits_or_the_request_is_handed_off() {
    let with_length = |values: &[&str]| {
        let mut head = b"POST / HTTP/1.1\r\nhost: a\r\n".to_vec();
        for v in values {
            head.extend_from_slice(format!("content-length: {v}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    for values in [
        &["5", "5"][..],
        &["5", "6"],
        &["0", "0"],
        &["5, 5"],
        &["5,5"],
        &["5,"],
        &[",5"],
        &["+5"],
        &["-1"],
        &["0x10"],
        &["1e3"],
        &["5 5"],
        &["5.0"],
        &["five"],
        &[""],
        // 16 digits and more: past what the server takes, whatever their value.
        &["1000000000000000"],
        &["0000000000000005"],
        &["18446744073709551616"],
        &["99999999999999999999999999"],
    ] {
        assert_eq!(
            parse_every_prefix(&with_length(values), 100),
            Got::HandOff,
            "content-length {values:?}"
        );
    }
    // Two fields, spelled differently.
    let input = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nCONTENT-LENGTH: 3\r\n\r\nabc";
    assert_eq!(parse_every_prefix(input, 100), Got::HandOff);

    for (value, len) in [
        ("0", 0),
        ("5", 5),
        ("007", 7),
        ("  12\t", 12),
        ("999999999999999", 999_999_999_999_999),
    ] {
        let got = request_of(&with_length(&[value]));
        assert_eq!(got.body_len, len, "content-length {value:?}");
    }
}

#[test]
fn more_fields_than_max_headers_are_handed_off() {
    let with_fields = |n: usize| {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..n {
            head.extend_from_slice(format!("x-f{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    assert!(matches!(parse(&with_fields(3), 3), Got::Request(_)));
    assert_eq!(parse(&with_fields(4), 3), Got::HandOff);
    assert!(matches!(parse(&with_fields(0), 0), Got::Request(_)));
    assert_eq!(parse(&with_fields(1), 0), Got::HandOff);
    // The server's own slots end at 100, whatever `max_headers` allows: hyper takes the rest.
    match parse(&with_fields(100), 200) {
        Got::Request(s) => assert_eq!(s.headers.len(), 100),
        other => panic!("{other:?}"),
    }
    assert_eq!(parse(&with_fields(101), 200), Got::HandOff);
    assert_eq!(parse_every_prefix(&with_fields(101), 100), Got::HandOff);
}

#[test]
fn invalid_field_names_and_values_are_handed_off() {
    for field in [
        &b"x y: 1"[..],
        b"x\x01: 1",
        b"x\x7f: 1",
        b"x(: 1",
        b"x\"y: 1",
        b": no name",
        b"x : space before colon",
        b"no colon",
        b"x\xff: 1",
        b"x: a\x00b",
        b"x: a\x7fb",
        b"x: a\rb",
        b"x: a\x01b",
    ] {
        let input = [b"GET / HTTP/1.1\r\nhost: a\r\n", field, b"\r\n\r\n"].concat();
        assert_eq!(
            parse_every_prefix(&input, 100),
            Got::HandOff,
            "{:?}",
            String::from_utf8_lossy(field)
        );
    }
    // Bytes past ASCII in a value (obs-text) are carried as they are, as hyper carries them.
    let got = request_of(b"GET / HTTP/1.1\r\nx-latin1: caf\xe9 \x80\xff\tend\r\n\r\n");
    assert_eq!(
        got.headers,
        [("x-latin1".to_owned(), b"caf\xe9 \x80\xff\tend".to_vec())]
    );
}

#[test]
fn connection_close_anywhere_in_a_connection_list_closes() {
    for (value, close) in [
        ("close", true),
        ("Close", true),
        ("CLOSE", true),
        ("keep-alive, Close", true),
        ("  close  ", true),
        ("te,,close,", true),
        ("keep-alive", false),
        ("closed", false),
        ("x-close", false),
        ("close-ish, keep-alive", false),
        ("", false),
    ] {
        let input = format!("GET / HTTP/1.1\r\nhost: a\r\nconnection: {value}\r\n\r\n");
        assert_eq!(
            request_of(input.as_bytes()).close,
            close,
            "connection: {value:?}"
        );
    }
    // In a second Connection field too.
    let got = request_of(b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nconnection: close\r\n\r\n");
    assert!(got.close);
    assert!(!request_of(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").close);
    // Not from any other field.
    assert!(!request_of(b"GET / HTTP/1.1\r\nx-connection: close\r\n\r\n").close);
}

#[test]
fn target_and_values_share_one_copy_of_the_head_not_the_buffer() {
    let head = b"GET /path?q=1 HTTP/1.1\r\nhost: example.test\r\nx-a: one\r\nx-b: two\r\n\r\n";
    let mut buf = head.to_vec();
    buf.extend_from_slice(b"tail");
    let Parsed::Request { request, .. } = codec::parse_request(&buf, 100) else {
        panic!("a request");
    };
    // The buffer is the connection's own, reused for the next request.
    buf.fill(b'#');
    assert_eq!(request.uri(), "/path?q=1");
    assert_eq!(request.headers()["host"], "example.test");
    assert_eq!(request.headers()["x-a"], "one");
    assert_eq!(request.headers()["x-b"], "two");

    // Where each lies: in one copy, laid out as the head was, and not in `buf`.
    let offset = |part: &[u8]| {
        head.windows(part.len())
            .position(|w| w == part)
            .expect("in the head")
    };
    let path = request.uri().path().as_bytes();
    let base = path.as_ptr() as usize - offset(b"/path");
    let within_buf =
        |p: usize| (buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len()).contains(&p);
    assert!(!within_buf(base) && !within_buf(path.as_ptr() as usize));
    for (name, value) in [("host", "example.test"), ("x-a", "one"), ("x-b", "two")] {
        let at = request.headers()[name].as_bytes().as_ptr() as usize;
        let expected = offset(format!("{name}: {value}").as_bytes()) + name.len() + 2;
        assert_eq!(at - base, expected, "{name} is not in the head's copy");
    }
}

// ---------------------------------------------------------------------------------------------
// encode_head
// ---------------------------------------------------------------------------------------------

#[test]
fn status_lines_carry_the_code_and_its_reason() {
    for (status, line) in [
        (200, "HTTP/1.1 200 OK\r\n"),
        (201, "HTTP/1.1 201 Created\r\n"),
        (301, "HTTP/1.1 301 Moved Permanently\r\n"),
        (404, "HTTP/1.1 404 Not Found\r\n"),
        (418, "HTTP/1.1 418 I'm a teapot\r\n"),
        (503, "HTTP/1.1 503 Service Unavailable\r\n"),
        (599, "HTTP/1.1 599 <none>\r\n"),
        (299, "HTTP/1.1 299 <none>\r\n"),
        (999, "HTTP/1.1 999 <none>\r\n"),
    ] {
        let (head, framing, close) = encode(status, &[], Some(0), &Method::GET, false);
        assert_eq!(
            head,
            format!("{line}content-length: 0\r\ndate: <date>\r\n\r\n"),
            "{status}"
        );
        assert_eq!((framing, close), (Framing::Length(0), false));
    }
}

#[test]
fn an_informational_answer_becomes_500_and_closes() {
    for status in [100, 101, 103, 199] {
        let (head, framing, close) = encode(status, &[("x-a", "1")], Some(0), &Method::GET, false);
        assert_eq!(
            head,
            "HTTP/1.1 500 Internal Server Error\r\nx-a: 1\r\ncontent-length: 0\r\n\
             connection: close\r\ndate: <date>\r\n\r\n",
            "{status}"
        );
        assert_eq!((framing, close), (Framing::Length(0), true), "{status}");
    }
}

#[test]
fn fields_are_written_as_the_answer_has_them_then_framing_connection_and_date() {
    let (head, framing, close) = encode(
        200,
        &[
            ("content-type", "text/plain"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ],
        Some(5),
        &Method::GET,
        false,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n\
         content-length: 5\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!((framing, close), (Framing::Length(5), false));

    // Appended to what the buffer already holds (a previous answer's tail).
    let mut out = b"previous".to_vec();
    codec::encode_head(&parts(204, &[]), None, &Method::GET, false, &mut out);
    assert!(
        out.starts_with(b"previousHTTP/1.1 204 No Content\r\n"),
        "{out:?}"
    );
}

#[test]
fn a_known_length_is_sent_as_content_length_and_wins_over_a_declared_one() {
    let (head, framing, _) = encode(200, &[], Some(12), &Method::GET, false);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 12\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Length(12));

    let (head, framing, _) = encode(
        200,
        &[("content-length", "99"), ("content-length", "98")],
        Some(12),
        &Method::POST,
        false,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 12\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Length(12));
}

#[test]
fn an_unknown_length_goes_chunked_unless_the_answer_declares_one() {
    let (head, framing, _) = encode(200, &[], None, &Method::GET, false);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Chunked);

    let (head, framing, _) = encode(
        200,
        &[("content-length", " 42 ")],
        None,
        &Method::GET,
        false,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 42\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Length(42));

    // A declared length that is not a number is no length.
    let (head, framing, _) = encode(200, &[("content-length", "abc")], None, &Method::GET, false);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Chunked);
}

#[test]
fn the_answers_own_transfer_encoding_is_never_written() {
    for (length, framing, framing_line) in [
        (Some(3), Framing::Length(3), "content-length: 3"),
        (None, Framing::Chunked, "transfer-encoding: chunked"),
    ] {
        let (head, got, _) = encode(
            200,
            &[
                ("transfer-encoding", "gzip, chunked"),
                ("x-a", "1"),
                ("Transfer-Encoding", "chunked"),
            ],
            length,
            &Method::GET,
            false,
        );
        assert_eq!(
            head,
            format!("HTTP/1.1 200 OK\r\nx-a: 1\r\n{framing_line}\r\ndate: <date>\r\n\r\n")
        );
        assert_eq!(got, framing);
    }
}

#[test]
fn an_answer_to_head_keeps_its_length_and_sends_no_body() {
    // The handler's own Content-Length (a relayed HEAD's, whose body is empty).
    let (head, framing, _) = encode(
        200,
        &[("content-length", "1234")],
        Some(0),
        &Method::HEAD,
        false,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Empty);
    // ... over the body's length, too.
    let (head, framing, _) = encode(
        200,
        &[("content-length", "1234")],
        Some(5),
        &Method::HEAD,
        false,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Empty);
    // None declared: the body's length, as a GET would have had it.
    let (head, framing, _) = encode(200, &[], Some(5), &Method::HEAD, false);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(framing, Framing::Empty);
    // Nothing known: no framing field at all, and never chunked.
    for length in [None, Some(0)] {
        let (head, framing, _) = encode(200, &[], length, &Method::HEAD, false);
        assert_eq!(
            head, "HTTP/1.1 200 OK\r\ndate: <date>\r\n\r\n",
            "{length:?}"
        );
        assert_eq!(framing, Framing::Empty);
    }
}

#[test]
fn answers_204_and_304_carry_neither_length_nor_chunks() {
    for (status, line) in [(204, "204 No Content"), (304, "304 Not Modified")] {
        for method in [Method::GET, Method::HEAD] {
            for length in [None, Some(0), Some(7)] {
                let (head, framing, close) = encode(
                    status,
                    &[
                        ("content-length", "7"),
                        ("transfer-encoding", "chunked"),
                        ("etag", "\"x\""),
                    ],
                    length,
                    &method,
                    false,
                );
                assert_eq!(
                    head,
                    format!("HTTP/1.1 {line}\r\netag: \"x\"\r\ndate: <date>\r\n\r\n"),
                    "{status} {method} {length:?}"
                );
                assert_eq!((framing, close), (Framing::Empty, false));
            }
        }
    }
}

#[test]
fn connection_close_is_written_exactly_once() {
    let count = |head: &str| head.to_ascii_lowercase().matches("connection:").count();

    // Asked for by the server.
    let (head, _, close) = encode(200, &[], Some(0), &Method::GET, true);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\ndate: <date>\r\n\r\n"
    );
    assert!(close);

    // The answer says so itself: kept as it is, nothing added, and the connection closes.
    for value in ["close", "Close", "keep-alive, CLOSE"] {
        for asked in [false, true] {
            let (head, _, close) =
                encode(200, &[("connection", value)], Some(0), &Method::GET, asked);
            assert_eq!(
                head,
                format!("HTTP/1.1 200 OK\r\nconnection: {value}\r\ncontent-length: 0\r\ndate: <date>\r\n\r\n"),
                "{value} {asked}"
            );
            assert!(close, "{value} {asked}");
            assert_eq!(count(&head), 1);
        }
    }

    // Another Connection field: kept, and `close` added once when asked for.
    let (head, _, close) = encode(
        200,
        &[("connection", "keep-alive")],
        Some(0),
        &Method::GET,
        false,
    );
    assert_eq!(count(&head), 1);
    assert!(!close);
    let (head, _, close) = encode(
        200,
        &[("connection", "keep-alive")],
        Some(0),
        &Method::GET,
        true,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\
         connection: close\r\ndate: <date>\r\n\r\n"
    );
    assert!(close);

    // Neither asked nor said: none.
    let (head, _, close) = encode(200, &[], Some(0), &Method::GET, false);
    assert_eq!(count(&head), 0);
    assert!(!close);
}

#[test]
fn a_date_is_added_unless_the_answer_has_one() {
    let mut out = Vec::new();
    codec::encode_head(&parts(200, &[]), Some(0), &Method::GET, false, &mut out);
    let text = String::from_utf8(out.clone()).unwrap();
    let line = text
        .split("\r\n")
        .find(|l| l.starts_with("date: "))
        .expect("a date line");
    assert_eq!(line.len(), "date: ".len() + 29, "{line:?}");
    // Checks the format and that it is now.
    masked(&out);
    // The same second's date again, from the cache: the same shape.
    let mut again = Vec::new();
    codec::encode_head(&parts(404, &[]), Some(0), &Method::GET, false, &mut again);
    assert_eq!(masked(&again).matches("date: <date>\r\n").count(), 1);

    let own = "Sun, 06 Nov 1994 08:49:37 GMT";
    let mut out = Vec::new();
    codec::encode_head(
        &parts(200, &[("Date", own)]),
        Some(0),
        &Method::GET,
        false,
        &mut out,
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("HTTP/1.1 200 OK\r\ndate: {own}\r\ncontent-length: 0\r\n\r\n")
    );
}

#[test]
fn every_head_ends_in_exactly_one_blank_line() {
    for (status, length, method, close) in [
        (200, Some(3), Method::GET, false),
        (200, None, Method::GET, true),
        (204, None, Method::GET, false),
        (200, None, Method::HEAD, false),
        (101, None, Method::GET, false),
    ] {
        let mut out = Vec::new();
        codec::encode_head(
            &parts(status, &[("x-a", "1")]),
            length,
            &method,
            close,
            &mut out,
        );
        assert!(out.ends_with(b"\r\n\r\n"), "{status}");
        assert!(!out.ends_with(b"\r\n\r\n\r\n"), "{status}");
        assert_eq!(out.windows(4).filter(|w| *w == b"\r\n\r\n").count(), 1);
    }
}

// ---------------------------------------------------------------------------------------------
// Server helpers
// ---------------------------------------------------------------------------------------------

const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 100;

type Answer = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;
type Conn<H> = Server<DuplexStream, H>;

/// What a handler was given of a request.
#[derive(Debug)]
struct Seen {
    method: Method,
    uri: String,
    version: Version,
    headers: Vec<(String, String)>,
    body: Option<Bytes>,
    peer: SocketAddr,
}

fn seen(request: &Request<ClientBody>, info: &ConnInfo) -> Seen {
    Seen {
        method: request.method().clone(),
        uri: request.uri().to_string(),
        version: request.version(),
        headers: request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect(),
        body: match request.body() {
            ClientBody::Whole(body) => body.clone(),
            ClientBody::Hyper(_) => panic!("the own server reads bodies itself"),
            // Taken by the handlers that stream.
            ClientBody::Streamed(_) => None,
        },
        peer: info.peer,
    }
}

const PEER: &str = "192.0.2.7:40123";

/// A handler that answers at once with what `answer` makes of the request, and reports each
/// request it sees. It counts each request in on the connection's activity, as the proxy does.
fn answering<F>(answer: F) -> (impl Handler, mpsc::UnboundedReceiver<Seen>)
where
    F: Fn(&Request<ClientBody>) -> Response<ResponseBody> + Clone + Send + Sync + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = tower::service_fn(move |(request, info): (Request<ClientBody>, ConnInfo)| {
        let in_flight = info.activity.request_started();
        let response = answer(&request);
        let _ = tx.send(seen(&request, &info));
        drop(in_flight);
        Box::pin(std::future::ready(Ok::<_, Infallible>(response))) as Answer
    });
    (handler, rx)
}

/// A request the test answers for the handler; its future waits for `answer`, and is gone
/// when `answer.is_closed()`.
struct Call {
    seen: Seen,
    answer: oneshot::Sender<Response<ResponseBody>>,
}

fn scripted() -> (impl Handler, mpsc::UnboundedReceiver<Call>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = tower::service_fn(move |(request, info): (Request<ClientBody>, ConnInfo)| {
        let (answer, answered) = oneshot::channel();
        let _ = tx.send(Call {
            seen: seen(&request, &info),
            answer,
        });
        Box::pin(async move {
            // Held for the request's life, as the proxy's context holds it.
            let _in_flight = info.activity.request_started();
            let _request = request;
            Ok::<_, Infallible>(
                answered
                    .await
                    .expect("the test answers every call it keeps"),
            )
        }) as Answer
    });
    (handler, rx)
}

fn ok(body: impl Into<Bytes>) -> Response<ResponseBody> {
    Response::new(full(body))
}

/// A body fed through a channel, a data frame per message, of unknown length; it ends when the
/// sender is dropped, and the sender sees it dropped (`is_closed`).
fn channel_body() -> (mpsc::UnboundedSender<Bytes>, ResponseBody) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|piece| piece.map(|p| Ok::<_, BoxError>(Frame::data(p))))
    });
    (tx, StreamBody::new(frames).boxed_unsync())
}

/// A body whose frames are all ready, of unknown length.
fn ready_body(frames: Vec<Result<&'static str, &'static str>>) -> ResponseBody {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = frames
        .into_iter()
        .map(|f| {
            f.map(|d| Frame::data(Bytes::from(d)))
                .map_err(BoxError::from)
        })
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

/// A body of five bytes, known in advance, that records whether it was ever polled.
struct Tripwire {
    polled: Arc<AtomicBool>,
    sent: bool,
}

impl Tripwire {
    fn new(polled: Arc<AtomicBool>) -> Self {
        Tripwire {
            polled,
            sent: false,
        }
    }
}

impl Body for Tripwire {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polled.store(true, Ordering::SeqCst);
        if std::mem::replace(&mut self.sent, true) {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"hello")))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(5)
    }
}

/// The caller's end of the connection.
struct Client {
    wire: Reader<DuplexStream>,
}

impl std::ops::Deref for Client {
    type Target = Reader<DuplexStream>;
    fn deref(&self) -> &Self::Target {
        &self.wire
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.wire
    }
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("client write");
    }

    /// Ends what the caller sends; it can still read.
    async fn end(&mut self) {
        self.io.shutdown().await.expect("client shutdown");
    }

    /// The next answer's head, date masked.
    async fn head(&mut self) -> String {
        masked(&self.through(b"\r\n\r\n").await)
    }

    /// The next answer, its body read as its head frames it (chunks as they are on the wire).
    async fn answer(&mut self) -> String {
        let head = self.head().await;
        let body = if let Some(len) = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            self.take(len.parse().expect("a length")).await
        } else if head.contains("\r\ntransfer-encoding: chunked\r\n") {
            self.chunks().await
        } else {
            panic!("an answer with a body has a framing: {head:?}");
        };
        head + &String::from_utf8(body).expect("a text body")
    }

    /// A chunked body through its last chunk, as sent.
    async fn chunks(&mut self) -> Vec<u8> {
        let mut raw = Vec::new();
        loop {
            let line = self.through(b"\r\n").await;
            let size = std::str::from_utf8(&line[..line.len() - 2]).expect("a chunk line");
            let size = usize::from_str_radix(size, 16).expect("a chunk size");
            raw.extend_from_slice(&line);
            if size == 0 {
                let end = self.take(2).await;
                assert_eq!(end, b"\r\n", "no trailers");
                raw.extend_from_slice(&end);
                return raw;
            }
            let data = self.take(size + 2).await;
            assert!(data.ends_with(b"\r\n"));
            raw.extend_from_slice(&data);
        }
    }

    /// Everything else the server sends, until it closes.
    async fn rest(mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.wire.buf);
        soon!(self.wire.io.read_to_end(&mut rest)).expect("client read");
        rest
    }
}

/// A server on one end of an in-memory stream, built as `serve_connection` builds it, and the
/// caller on the other.
fn connect<H: Handler>(handler: H) -> (Conn<H>, Client, Arc<ConnActivity>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let activity = Arc::new(ConnActivity::new(
        Duration::from_secs(10),
        Duration::from_secs(75),
    ));
    let io = TrackedIo {
        inner: server,
        activity: activity.clone(),
        guard: Guard::new(MAX_HEAD, MAX_HEADERS),
        pending: Vec::new(),
        eof: false,
        unguarded: true,
    };
    let info = ConnInfo {
        peer: PEER.parse().unwrap(),
        proto: "http",
        activity: activity.clone(),
    };
    let server = Server::new(io, handler, info, MAX_HEAD, MAX_HEADERS);
    let client = Client {
        wire: Reader::new(client, "server"),
    };
    (server, client, activity)
}

/// Runs the server until `until` is done; the server must not end first.
async fn drive_until<H: Handler, T>(server: &mut Conn<H>, until: impl Future<Output = T>) -> T {
    soon!(async {
        tokio::select! {
            biased;
            done = until => done,
            ended = poll_fn(|cx| server.poll(cx)) => panic!("the server ended first: {ended:?}"),
        }
    })
}

/// Runs the server until it ends.
async fn run<H: Handler>(server: &mut Conn<H>) -> Result<Outcome, ConnError> {
    soon!(poll_fn(|cx| server.poll(cx)))
}

/// Polls the server once, outside tokio's budget so a read that is ready is always made.
async fn poll_once<H: Handler>(server: &mut Conn<H>) -> Poll<Result<Outcome, ConnError>> {
    tokio::task::unconstrained(poll_fn(|cx| Poll::Ready(server.poll(cx)))).await
}

/// What hyper would read of the handed-off stream, once the caller has ended it.
async fn read_all<S: tokio::io::AsyncRead + Unpin>(io: &mut TrackedIo<S>) -> Vec<u8> {
    let mut got = Vec::new();
    soon!(io.read_to_end(&mut got)).expect("read after the hand-off");
    got
}

fn refused(activity: &ConnActivity) -> Option<(u64, &'static str)> {
    *activity.refused.lock().unwrap()
}

fn in_flight(activity: &ConnActivity) -> usize {
    activity.inflight.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------------
// Server: ordinary requests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_get_is_answered_and_the_connection_stays_open_for_another() {
    let (handler, mut seen) = answering(|req| ok(format!("hello {}", req.uri().path())));
    let (mut server, mut client, activity) = connect(handler);
    assert!(server.is_idle());

    client
        .send(b"GET /first?x=1 HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n")
        .await;
    let answer = drive_until(&mut server, client.answer()).await;
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 12\r\ndate: <date>\r\n\r\nhello /first"
    );
    let first = seen.try_recv().expect("the handler saw the request");
    assert_eq!(first.method, Method::GET);
    assert_eq!(first.uri, "/first?x=1");
    assert_eq!(first.version, Version::HTTP_11);
    assert_eq!(
        first.headers,
        [
            ("host".to_owned(), "example.test".to_owned()),
            ("accept".to_owned(), "*/*".to_owned())
        ]
    );
    assert_eq!(first.body, None);
    assert_eq!(first.peer, PEER.parse().unwrap());
    assert!(server.is_idle());

    client
        .send(b"GET /second HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .await;
    let answer = drive_until(&mut server, client.answer()).await;
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 13\r\ndate: <date>\r\n\r\nhello /second"
    );
    assert_eq!(seen.try_recv().unwrap().uri, "/second");
    assert!(server.is_idle());
    assert_eq!(in_flight(&activity), 0);

    // The caller closes: done, and nothing more was sent.
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    drop(server);
    assert!(client.rest().await.is_empty());
    assert!(seen.try_recv().is_err());
    assert_eq!(refused(&activity), None);
}

#[tokio::test]
async fn a_head_arriving_a_byte_at_a_time_is_served_once_whole() {
    let (handler, mut seen) = answering(|_| ok("ok"));
    let (mut server, mut client, _) = connect(handler);
    let head = b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n";
    for (i, byte) in head.iter().enumerate() {
        client.send(&[*byte]).await;
        assert!(poll_once(&mut server).await.is_pending());
        let served = seen.try_recv().is_ok();
        assert_eq!(served, i == head.len() - 1, "after byte {i}");
        assert_eq!(server.is_idle(), i == head.len() - 1, "after byte {i}");
    }
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ndate: <date>\r\n\r\nok"
    );
}

#[tokio::test]
async fn pipelined_gets_in_one_write_are_answered_in_order() {
    let (handler, mut seen) = answering(|req| ok(req.uri().path().to_owned()));
    let (mut server, mut client, _) = connect(handler);
    client
        .send(
            b"GET /one HTTP/1.1\r\nhost: a\r\n\r\n\
              GET /two HTTP/1.1\r\nhost: a\r\n\r\n\
              GET /three HTTP/1.1\r\nhost: a\r\n\r\n",
        )
        .await;
    let answers = drive_until(&mut server, async {
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(client.answer().await);
        }
        answers
    })
    .await;
    assert_eq!(
        answers,
        [
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ndate: <date>\r\n\r\n/one",
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ndate: <date>\r\n\r\n/two",
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\ndate: <date>\r\n\r\n/three",
        ]
    );
    let uris: Vec<String> = std::iter::from_fn(|| seen.try_recv().ok())
        .map(|s| s.uri)
        .collect();
    assert_eq!(uris, ["/one", "/two", "/three"]);
    assert!(server.is_idle());
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    drop(server);
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn a_post_whose_body_came_with_its_head_reaches_the_handler_whole() {
    let (handler, mut seen) = answering(|req| {
        let len = match req.body() {
            ClientBody::Whole(b) => b.as_ref().map_or(0, Bytes::len),
            ClientBody::Hyper(_) | ClientBody::Streamed(_) => unreachable!(),
        };
        ok(format!("got {len}"))
    });
    let (mut server, mut client, _) = connect(handler);
    // The body looks like a head: it is the body's all the same.
    client
        .send(
            b"POST /submit HTTP/1.1\r\nhost: a\r\ncontent-length: 32\r\n\r\n\
              GET /inner HTTP/1.1\r\nhost: b\r\n\r\n\
              GET /after HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    let answers = drive_until(&mut server, async {
        (client.answer().await, client.answer().await)
    })
    .await;
    assert_eq!(
        answers,
        (
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\ndate: <date>\r\n\r\ngot 32".to_owned(),
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: <date>\r\n\r\ngot 0".to_owned()
        )
    );
    let post = seen.try_recv().unwrap();
    assert_eq!((post.method, post.uri.as_str()), (Method::POST, "/submit"));
    assert_eq!(
        post.body.as_deref(),
        Some(&b"GET /inner HTTP/1.1\r\nhost: b\r\n\r\n"[..])
    );
    let after = seen.try_recv().unwrap();
    assert_eq!((after.uri.as_str(), after.body), ("/after", None));
    assert!(seen.try_recv().is_err());
    assert!(server.is_idle());
}

#[tokio::test]
async fn a_large_answer_goes_out_whole() {
    let large: Bytes = (0..200_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let body = large.clone();
    let (handler, _seen) = answering(move |_| Response::new(full(body.clone())));
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET /large HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let (head, got) = drive_until(&mut server, async {
        let head = client.head().await;
        (head, client.take(200_000).await)
    })
    .await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 200000\r\ndate: <date>\r\n\r\n"
    );
    assert!(got == large, "the body arrived altered");
    assert!(server.is_idle());
}

// ---------------------------------------------------------------------------------------------
// Server: hand-off to hyper
// ---------------------------------------------------------------------------------------------

/// A handler that reads the request's body to its end, then answers `METHOD TARGET:BODY`.
fn collecting() -> impl Handler {
    tower::service_fn(move |(request, info): (Request<ClientBody>, ConnInfo)| {
        Box::pin(async move {
            let _in_flight = info.activity.request_started();
            let (head, body) = request.into_parts();
            let body = body.collect().await.expect("the body").to_bytes();
            let said = format!(
                "{} {}:{}",
                head.method,
                head.uri,
                String::from_utf8_lossy(&body)
            );
            Ok::<_, Infallible>(ok(said))
        }) as Answer
    })
}

#[tokio::test]
async fn a_body_that_comes_after_its_head_is_read_as_the_handler_takes_it() {
    let (mut server, mut client, _) = connect(collecting());
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nhello")
        .await;
    // The handler has the request and waits for the rest of its body.
    assert!(poll_once(&mut server).await.is_pending());
    // The rest, and a next request right behind it: the bytes after the body are its.
    client
        .send(b"worldGET /next HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 23\r\ndate: <date>\r\n\r\nPOST /upload:helloworld"
    );
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 10\r\ndate: <date>\r\n\r\nGET /next:"
    );
    // Sent a byte at a time, it arrives whole all the same.
    client
        .send(b"PUT /slow HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n")
        .await;
    for byte in [b"a", b"b", b"c"] {
        assert!(poll_once(&mut server).await.is_pending());
        client.send(byte).await;
    }
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 13\r\ndate: <date>\r\n\r\nPUT /slow:abc"
    );
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
}

#[tokio::test]
async fn an_answer_before_the_body_is_all_read_closes_the_connection_after_it() {
    // The handler answers at once and drops the request, body unread.
    let (handler, mut seen) = answering(|_| ok("early"));
    let (mut server, mut client, _) = connect(handler);
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nhello")
        .await;
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    // What follows on the wire is still the body: never read as a next request.
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\ndate: <date>\r\n\r\nearly"
    );
    assert_eq!(outcome.unwrap(), Outcome::Done);
    assert_eq!(seen.try_recv().unwrap().uri, "/upload");
}

#[tokio::test]
async fn a_caller_that_leaves_before_its_body_is_all_sent_ends_the_connection_and_its_request() {
    let (handler, mut calls) = scripted();
    let (mut server, mut client, _) = connect(handler);
    client
        .send(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nhello")
        .await;
    assert!(poll_once(&mut server).await.is_pending());
    let call = calls.try_recv().expect("the handler has the request");
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    drop(server);
    assert!(call.answer.is_closed(), "the request was dropped");
}

#[tokio::test]
async fn expect_100_continue_is_answered_when_the_handler_asks_for_the_body() {
    let (mut server, mut client, _) = connect(collecting());
    client
        .send(b"POST /e HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(
        drive_until(&mut server, client.through(b"\r\n\r\n")).await,
        b"HTTP/1.1 100 Continue\r\n\r\n"
    );
    client.send(b"hello").await;
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 13\r\ndate: <date>\r\n\r\nPOST /e:hello"
    );

    // A caller that sent its body without waiting gets no go-ahead.
    client
        .send(b"POST /e HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\nhello")
        .await;
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 13\r\ndate: <date>\r\n\r\nPOST /e:hello"
    );

    // Nor one the handler answers without asking for the body.
    let (handler, _seen) = answering(|_| ok("no"));
    let (mut server, mut client, _) = connect(handler);
    client
        .send(b"POST /e HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
        .await;
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\ndate: <date>\r\n\r\nno"
    );
    assert_eq!(outcome.unwrap(), Outcome::Done);
}

#[tokio::test]
async fn a_chunked_post_is_handed_off_with_its_bytes() {
    let (handler, mut seen) = answering(|_| ok("no"));
    let (mut server, mut client, activity) = connect(handler);
    let sent: &[u8] = b"POST /c HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
                        5\r\nhello\r\n0\r\n\r\nGET /next HTTP/1.1\r\nhost: a\r\n\r\n";
    client.send(sent).await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::HandOff);
    assert!(seen.try_recv().is_err());
    let mut io = server.hand_off();
    client.end().await;
    assert_eq!(read_all(&mut io).await, sent);
    assert_eq!(refused(&activity), None);
}

#[tokio::test]
async fn http_1_0_after_a_served_request_is_handed_off_with_only_its_own_bytes() {
    let (handler, mut seen) = answering(|_| ok("one"));
    let (mut server, mut client, activity) = connect(handler);
    let old: &[u8] = b"GET /old HTTP/1.0\r\nhost: a\r\n\r\n";
    client
        .send(&[&b"GET /new HTTP/1.1\r\nhost: a\r\n\r\n"[..], old].concat())
        .await;
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\none"
    );
    assert_eq!(outcome.unwrap(), Outcome::HandOff);
    assert_eq!(seen.try_recv().unwrap().uri, "/new");
    assert!(seen.try_recv().is_err());

    let mut io = server.hand_off();
    client.end().await;
    assert_eq!(read_all(&mut io).await, old);
    assert_eq!(refused(&activity), None);
}

#[tokio::test]
async fn a_head_cut_short_by_the_end_of_the_stream_is_handed_off() {
    let (handler, mut seen) = answering(|_| ok("no"));
    let (mut server, mut client, _) = connect(handler);
    let sent: &[u8] = b"GET /partial HTTP/1.1\r\nhost:";
    client.send(sent).await;
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::HandOff);
    assert!(seen.try_recv().is_err());
    let mut io = server.hand_off();
    // hyper gets the bytes and reports the incomplete head itself.
    assert_eq!(read_all(&mut io).await, sent);
}

#[tokio::test]
async fn a_head_larger_than_max_head_is_handed_off() {
    let (handler, mut seen) = answering(|_| ok("no"));
    let (mut server, mut client, _) = connect(handler);
    let sent = [
        &b"GET / HTTP/1.1\r\nx-big: "[..],
        &[b'a'; MAX_HEAD],
        b"\r\n\r\n",
    ]
    .concat();
    client.send(&sent).await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::HandOff);
    assert!(seen.try_recv().is_err());
    let mut io = server.hand_off();
    client.end().await;
    assert_eq!(read_all(&mut io).await, sent);
}

#[tokio::test]
async fn a_smuggling_head_after_a_served_request_is_handed_off_and_refused_by_the_guard() {
    let (handler, mut seen) = answering(|_| ok("one"));
    let (mut server, mut client, activity) = connect(handler);
    client
        .send(
            b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n\
              POST /2 HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc\
              GET /3 HTTP/1.1\r\nhost: a\r\n\r\n",
        )
        .await;
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\none"
    );
    assert_eq!(outcome.unwrap(), Outcome::HandOff);
    assert_eq!(seen.try_recv().unwrap().uri, "/1");
    assert!(seen.try_recv().is_err(), "the second request is not served");
    // The own server judged the head; the guard has not seen it yet.
    assert_eq!(refused(&activity), None);

    let mut io = server.hand_off();
    assert_eq!(
        refused(&activity),
        Some((1, "more than one Content-Length")),
        "refused as the second request on the connection"
    );
    // hyper reads a stand-in in its place, and nothing after it.
    client.send(b"GET /4 HTTP/1.1\r\nhost: a\r\n\r\n").await;
    client.end().await;
    assert_eq!(read_all(&mut io).await, crate::listener::STAND_IN);
    // The proxy's next request is the refused one, and knows it.
    let next = activity.request_started();
    assert_eq!(next.refused, Some("more than one Content-Length"));
}

#[tokio::test]
async fn a_smuggling_head_as_the_first_request_is_refused_as_the_first() {
    let (handler, mut seen) = answering(|_| ok("no"));
    let (mut server, mut client, activity) = connect(handler);
    client
        .send(b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc")
        .await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::HandOff);
    assert!(seen.try_recv().is_err());
    let mut io = server.hand_off();
    assert_eq!(
        refused(&activity),
        Some((0, "Content-Length together with Transfer-Encoding"))
    );
    client.end().await;
    assert_eq!(read_all(&mut io).await, crate::listener::STAND_IN);
}

// ---------------------------------------------------------------------------------------------
// Server: callers that go away, requests that wait
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_caller_that_goes_away_while_the_handler_works_ends_the_connection_and_its_request() {
    let (handler, mut calls) = scripted();
    let (mut server, mut client, activity) = connect(handler);
    client.send(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let call = drive_until(&mut server, calls.recv()).await.unwrap();
    assert_eq!(call.seen.uri, "/slow");
    assert!(!call.answer.is_closed());
    assert_eq!(in_flight(&activity), 1);
    assert!(!server.is_idle());

    drop(client);
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    // Given up as the listener gives it up: the request's future goes with it.
    let io = server.into_io();
    assert!(call.answer.is_closed(), "the handler's future was dropped");
    assert_eq!(in_flight(&activity), 0, "the request was counted out");
    assert!(io.pending.is_empty());
}

#[tokio::test]
async fn a_caller_that_goes_away_while_the_answer_body_waits_ends_it_too() {
    let (handler, mut calls) = scripted();
    let (mut server, mut client, activity) = connect(handler);
    client
        .send(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    let call = drive_until(&mut server, calls.recv()).await.unwrap();
    let (tx, body) = channel_body();
    tx.send(Bytes::from_static(b"hello")).unwrap();
    call.answer.send(Response::new(body)).unwrap();
    // What there is goes out while the body waits for more.
    let (head, first) = drive_until(&mut server, async {
        (client.head().await, client.take(10).await)
    })
    .await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: <date>\r\n\r\n"
    );
    assert_eq!(first, b"5\r\nhello\r\n");
    assert!(!tx.is_closed());

    drop(client);
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    drop(server.into_io());
    assert!(tx.is_closed(), "the answer's body was dropped");
    assert_eq!(in_flight(&activity), 0);
}

#[tokio::test]
async fn a_next_request_arriving_while_the_handler_works_is_kept_and_served_after() {
    let (handler, mut calls) = scripted();
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let first = drive_until(&mut server, calls.recv()).await.unwrap();

    let second: &[u8] = b"GET /2 HTTP/1.1\r\nhost: a\r\n\r\n";
    client.send(second).await;
    assert!(poll_once(&mut server).await.is_pending());
    // Read (the server watches for the caller's end meanwhile), kept, and not served yet.
    assert_eq!(&server.wire.read[..], second);
    assert!(calls.try_recv().is_err());
    // Nothing more is read while a request waits in the buffer.
    client.send(b"GET /3").await;
    assert!(poll_once(&mut server).await.is_pending());
    assert_eq!(&server.wire.read[..], second);

    first.answer.send(ok("one")).unwrap();
    let (a1, a2, uri) = drive_until(&mut server, async {
        let a1 = client.answer().await;
        let call = calls.recv().await.unwrap();
        call.answer.send(ok("two")).unwrap();
        (a1, client.answer().await, call.seen.uri)
    })
    .await;
    assert_eq!(
        a1,
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\none"
    );
    assert_eq!(
        a2,
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\ntwo"
    );
    assert_eq!(uri, "/2");

    // The third head's start waits for its rest.
    client.send(b" HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let third = drive_until(&mut server, calls.recv()).await.unwrap();
    assert_eq!(third.seen.uri, "/3");
}

// ---------------------------------------------------------------------------------------------
// Server: answer bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_streamed_answer_of_unknown_length_goes_out_chunked_as_it_comes() {
    let (handler, mut calls) = scripted();
    let (mut server, mut client, _) = connect(handler);
    client
        .send(b"GET /stream HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    let call = drive_until(&mut server, calls.recv()).await.unwrap();
    let (tx, body) = channel_body();
    let mut answer = Response::new(body);
    answer
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    call.answer.send(answer).unwrap();
    tx.send(Bytes::from_static(b"hello")).unwrap();
    let (head, first) = drive_until(&mut server, async {
        (client.head().await, client.take(10).await)
    })
    .await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\
         date: <date>\r\n\r\n"
    );
    assert_eq!(first, b"5\r\nhello\r\n");

    // An empty frame is no chunk (it would end the body).
    tx.send(Bytes::new()).unwrap();
    tx.send(Bytes::from_static(b" wide world")).unwrap();
    drop(tx);
    let rest = drive_until(&mut server, client.chunks()).await;
    assert_eq!(rest, b"b\r\n wide world\r\n0\r\n\r\n");
    assert!(server.is_idle());

    // And the connection goes on.
    client.send(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let call = drive_until(&mut server, calls.recv()).await.unwrap();
    call.answer.send(ok("next")).unwrap();
    assert_eq!(
        drive_until(&mut server, client.answer()).await,
        "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ndate: <date>\r\n\r\nnext"
    );
}

#[tokio::test]
async fn a_streamed_answer_larger_than_the_write_buffer_goes_out_whole() {
    let piece: Bytes = (0..16 * 1024u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let (handler, _seen) = answering({
        let piece = piece.clone();
        move |_| {
            let (tx, body) = channel_body();
            for _ in 0..10 {
                tx.send(piece.clone()).unwrap();
            }
            Response::new(body)
        }
    });
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET /big HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let (head, chunks) = drive_until(&mut server, async {
        (client.head().await, client.chunks().await)
    })
    .await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: <date>\r\n\r\n"
    );
    let one = [&b"4000\r\n"[..], &piece, b"\r\n"].concat();
    let expected = [one.repeat(10), b"0\r\n\r\n".to_vec()].concat();
    assert!(chunks == expected, "the chunks arrived altered");
    assert!(server.is_idle());
}

#[tokio::test]
async fn an_answer_body_longer_than_its_declared_length_ends_at_that_length() {
    // As hyper does: the body is done at its declared length, and what else it has is dropped.
    let (handler, _seen) = answering(|_| {
        let mut answer = Response::new(ready_body(vec![Ok("hel"), Ok("lo")]));
        answer
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("3"));
        answer
    });
    let (mut server, mut client, _) = connect(handler);
    for _ in 0..2 {
        client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
        // The excess never goes out: the next answer starts right after the declared length.
        assert_eq!(
            drive_until(&mut server, client.answer()).await,
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\nhel"
        );
    }
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    drop(server);
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn an_answer_body_shorter_than_its_declared_length_fails_the_connection() {
    let (handler, _seen) = answering(|_| {
        let mut answer = Response::new(ready_body(vec![Ok("hello")]));
        answer
            .headers_mut()
            .insert("content-length", HeaderValue::from_static("10"));
        answer
    });
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let ended = run(&mut server).await;
    assert!(matches!(ended, Err(ConnError::Length)), "{ended:?}");
}

#[tokio::test]
async fn an_answer_body_that_fails_fails_the_connection() {
    let (handler, _seen) =
        answering(|_| Response::new(ready_body(vec![Ok("hel"), Err("upstream broke")])));
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    match run(&mut server).await {
        Err(ConnError::Body(e)) => assert_eq!(e.to_string(), "upstream broke"),
        other => panic!("{other:?}"),
    }
    drop(server);
    // No last chunk: the caller sees the answer cut short, not complete.
    let rest = client.rest().await;
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn an_answer_to_head_sends_no_body_and_never_polls_it() {
    let polled = Arc::new(AtomicBool::new(false));
    let (handler, mut seen) = answering({
        let polled = polled.clone();
        move |_| Response::new(Tripwire::new(polled.clone()).boxed_unsync())
    });
    let (mut server, mut client, _) = connect(handler);
    client
        .send(b"HEAD /h HTTP/1.1\r\nhost: a\r\n\r\nHEAD /again HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    let heads = drive_until(&mut server, async {
        (client.head().await, client.head().await)
    })
    .await;
    let expected = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ndate: <date>\r\n\r\n";
    assert_eq!(heads, (expected.to_owned(), expected.to_owned()));
    assert!(!polled.load(Ordering::SeqCst), "the body was polled");
    assert_eq!(seen.try_recv().unwrap().method, Method::HEAD);
    assert!(server.is_idle());
    client.end().await;
    assert_eq!(run(&mut server).await.unwrap(), Outcome::Done);
    drop(server);
    assert!(client.rest().await.is_empty(), "a body went out after all");
}

#[tokio::test]
async fn an_answer_204_sends_no_body_and_the_next_answer_follows_it() {
    let (handler, _seen) = answering(|req| {
        if req.uri().path() == "/none" {
            let mut answer = Response::new(full("never"));
            *answer.status_mut() = StatusCode::NO_CONTENT;
            answer
        } else {
            ok("two")
        }
    });
    let (mut server, mut client, _) = connect(handler);
    client
        .send(b"GET /none HTTP/1.1\r\nhost: a\r\n\r\nGET /two HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    let (first, second) = drive_until(&mut server, async {
        (client.head().await, client.answer().await)
    })
    .await;
    assert_eq!(first, "HTTP/1.1 204 No Content\r\ndate: <date>\r\n\r\n");
    assert_eq!(
        second,
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\ntwo"
    );
}

// ---------------------------------------------------------------------------------------------
// Server: closing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connection_close_on_the_request_ends_the_connection_after_its_answer() {
    let (handler, mut seen) = answering(|_| ok("bye"));
    let (mut server, mut client, _) = connect(handler);
    client
        .send(
            b"GET /1 HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, Close\r\n\r\n\
              GET /2 HTTP/1.1\r\nhost: a\r\n\r\n",
        )
        .await;
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\ndate: <date>\r\n\r\nbye"
    );
    assert_eq!(outcome.unwrap(), Outcome::Done);
    assert_eq!(seen.try_recv().unwrap().uri, "/1");
    assert!(
        seen.try_recv().is_err(),
        "the request after it is not served"
    );
    drop(server);
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn an_answer_that_says_close_ends_the_connection_after_it() {
    let (handler, _seen) = answering(|_| {
        let mut answer = ok("bye");
        answer
            .headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        answer
    });
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\ndate: <date>\r\n\r\nbye"
    );
    assert_eq!(outcome.unwrap(), Outcome::Done);
}

#[tokio::test]
async fn finish_while_idle_ends_at_once() {
    // Before any request.
    let (handler, _seen) = answering(|_| ok("ok"));
    let (mut server, _client, _) = connect(handler);
    server.finish();
    assert!(matches!(
        poll_once(&mut server).await,
        Poll::Ready(Ok(Outcome::Done))
    ));

    // After one.
    let (handler, _seen) = answering(|_| ok("ok"));
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    drive_until(&mut server, client.answer()).await;
    assert!(server.is_idle());
    server.finish();
    assert!(matches!(
        poll_once(&mut server).await,
        Poll::Ready(Ok(Outcome::Done))
    ));
    drop(server);
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn finish_while_the_handler_works_closes_after_its_answer() {
    let (handler, mut calls) = scripted();
    let (mut server, mut client, _) = connect(handler);
    client.send(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let call = drive_until(&mut server, calls.recv()).await.unwrap();
    // A next request is already on its way: it is not served.
    client.send(b"GET /2 HTTP/1.1\r\nhost: a\r\n\r\n").await;
    server.finish();
    call.answer.send(ok("last")).unwrap();
    let (answer, outcome) =
        soon!(async { tokio::join!(client.answer(), poll_fn(|cx| server.poll(cx))) });
    assert_eq!(
        answer,
        "HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\ndate: <date>\r\n\r\nlast"
    );
    assert_eq!(outcome.unwrap(), Outcome::Done);
    assert!(calls.try_recv().is_err());
    drop(server);
    assert!(client.rest().await.is_empty());
}

#[tokio::test]
async fn into_io_puts_unread_bytes_back_in_front() {
    let (handler, _seen) = answering(|_| ok("ok"));
    let (mut server, mut client, _) = connect(handler);
    // A head begun but not whole: the server holds its bytes.
    client.send(b"GET /a HTTP/1.1\r\nho").await;
    assert!(poll_once(&mut server).await.is_pending());
    assert!(!server.is_idle());
    let mut io = server.into_io();
    client.send(b"st: a\r\n\r\n").await;
    client.end().await;
    // Still unguarded: read as they are, the held bytes first.
    assert!(io.unguarded);
    assert_eq!(
        read_all(&mut io).await,
        b"GET /a HTTP/1.1\r\nhost: a\r\n\r\n"
    );
}

// A head begun behind the last request, or only the empty lines allowed before one, is not
// waited for once the server is asked to finish (as hyper's `graceful_shutdown` does not wait for
// a head it has not parsed). Found while the server was written: `poll` stayed `Pending`.
#[tokio::test]
async fn finish_with_only_part_of_a_next_head_read_ends_at_once() {
    for tail in [&b"GET /2 HT"[..], b"\r\n"] {
        let (handler, mut seen) = answering(|_| ok("one"));
        let (mut server, mut client, _) = connect(handler);
        client
            .send(&[&b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n"[..], tail].concat())
            .await;
        assert_eq!(
            drive_until(&mut server, client.answer()).await,
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ndate: <date>\r\n\r\none"
        );
        assert_eq!(seen.try_recv().unwrap().uri, "/1");
        if tail == b"\r\n" {
            // Empty lines are dropped: the connection is idle, and may be parked.
            assert!(poll_once(&mut server).await.is_pending());
            assert!(server.is_idle());
        } else {
            assert_eq!(&server.wire.read[..], tail);
        }
        server.finish();
        let polled = poll_once(&mut server).await;
        assert!(
            matches!(polled, Poll::Ready(Ok(Outcome::Done))),
            "finish() with {:?} buffered: {polled:?}",
            String::from_utf8_lossy(tail)
        );
    }
}
