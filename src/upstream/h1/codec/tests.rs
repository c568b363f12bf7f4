use super::*;
use crate::http1::chunk_line;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn header_map(fields: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

fn encode(
    method: Method,
    target: &str,
    fields: &[(&str, &str)],
    body_len: Option<u64>,
) -> (String, RequestFraming) {
    let mut out = Vec::new();
    let framing = encode_head(
        &method,
        target,
        &header_map(fields),
        &Added::default(),
        body_len,
        &mut out,
    );
    (String::from_utf8(out).unwrap(), framing)
}

/// The head's lines, without the request line and the blank line that ends it.
fn field_lines(head: &str) -> Vec<&str> {
    let body = head
        .strip_suffix("\r\n\r\n")
        .expect("head ends in a blank line");
    body.split("\r\n").skip(1).collect()
}

/// What a parsed head says, in a form that compares (`Response` has no `PartialEq`).
#[derive(Debug, PartialEq)]
struct Summary {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    reusable: bool,
    said: ConnectionSaid,
}

fn summary(head: &Head) -> Summary {
    Summary {
        status: head.response.status(),
        version: head.response.version(),
        headers: head.response.headers().clone(),
        framing: head.framing,
        reusable: head.reusable,
        said: head.said,
    }
}

/// Feeds `input` to `parse_head` `piece` bytes at a time, as reads from a socket would arrive,
/// until it answers. Returns the answer and what the buffer then holds, the rest of the input
/// included, so the outcome compares whatever the piece size.
fn parse_in_pieces(
    input: &[u8],
    method: &Method,
    piece: usize,
) -> Result<(Summary, Vec<u8>), Malformed> {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    while fed < input.len() {
        let end = (fed + piece).min(input.len());
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        match parse_head(&mut buf, method)? {
            None => continue,
            Some(head) => {
                buf.extend_from_slice(&input[fed..]);
                return Ok((summary(&head), buf.to_vec()));
            }
        }
    }
    panic!("head never completed: {:?}", String::from_utf8_lossy(input));
}

/// Parses `input` whole and one byte at a time (every prefix answering `Ok(None)` until the head
/// is complete), asserts both agree, and returns the outcome.
fn parse_every_way(input: &[u8], method: &Method) -> Result<(Summary, Vec<u8>), Malformed> {
    let whole = parse_in_pieces(input, method, input.len().max(1));
    let split = parse_in_pieces(input, method, 1);
    assert_eq!(whole, split, "split input parsed differently");
    whole
}

fn parse_ok(input: &[u8], method: &Method) -> (Summary, Vec<u8>) {
    parse_every_way(input, method).expect("head parses")
}

fn parse_err(input: &[u8], method: &Method) -> Malformed {
    match parse_every_way(input, method) {
        Ok((head, _)) => panic!("parsed as {head:?}"),
        Err(e) => e,
    }
}

/// A complete answer head: status line, the fields, the blank line.
fn answer(status_line: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("{status_line}\r\n");
    for (name, value) in fields {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn framing_of(fields: &[(&str, &str)]) -> Result<(Framing, bool), Malformed> {
    let (head, _) = parse_every_way(&answer("HTTP/1.1 200 OK", fields), &Method::GET)?;
    Ok((head.framing, head.reusable))
}

/// Runs a decoder over `input` delivered `piece` bytes at a time. Each `Data(n)` is taken off the
/// buffer; `NeedMore` gets the next piece, or the end of the connection once the input is spent.
/// Returns the body and what is left for the next answer (the buffer, then input never fed).
fn decode_in_pieces(
    framing: Framing,
    input: &[u8],
    piece: usize,
) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
    let mut decoder = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut fed = 0;
    let mut eof = false;
    loop {
        match decoder.step(&mut buf)? {
            Step::Data(n) => {
                assert!(
                    n > 0 && n <= buf.len(),
                    "Data({n}) over {} bytes",
                    buf.len()
                );
                body.extend_from_slice(&buf.split_to(n));
            }
            Step::NeedMore if fed < input.len() => {
                let end = (fed + piece).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Step::NeedMore => {
                assert!(!eof, "NeedMore again after a clean end of file");
                decoder.at_eof()?;
                eof = true;
            }
            Step::Done => {
                assert!(decoder.is_done());
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[fed..]);
                return Ok((body, rest));
            }
        }
    }
}

/// The decoder's outcome must not depend on how the bytes were split on the way in.
fn decode_with(
    framing: Framing,
    input: &[u8],
    pieces: &[usize],
) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
    let whole = decode_in_pieces(framing, input, input.len().max(1));
    for &piece in pieces {
        let split = decode_in_pieces(framing, input, piece);
        assert_eq!(split, whole, "pieces of {piece} bytes decoded differently");
    }
    whole
}

fn decode_every_way(framing: Framing, input: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
    decode_with(framing, input, &[1, 2, 7])
}

fn decode_chunked(input: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Malformed> {
    decode_every_way(Framing::Chunked, input)
}

// ---------------------------------------------------------------------------------------------
// encode_head, chunk_line
// ---------------------------------------------------------------------------------------------

#[test]
fn the_request_line_is_method_target_and_http_1_1() {
    let (head, _) = encode(Method::GET, "/a/b?c=d&e", &[], Some(0));
    assert!(head.starts_with("GET /a/b?c=d&e HTTP/1.1\r\n"), "{head:?}");
    let (head, _) = encode(Method::OPTIONS, "*", &[], Some(0));
    assert!(head.starts_with("OPTIONS * HTTP/1.1\r\n"), "{head:?}");
    let custom = Method::from_bytes(b"PURGE").unwrap();
    let (head, _) = encode(custom, "/x", &[], Some(0));
    assert!(head.starts_with("PURGE /x HTTP/1.1\r\n"), "{head:?}");
}

#[test]
fn fields_are_written_as_name_colon_space_value_crlf() {
    let (head, framing) = encode(
        Method::GET,
        "/",
        &[
            ("host", "example.com"),
            ("x-list", "a"),
            ("x-list", "b"),
            ("accept", "*/*"),
        ],
        Some(0),
    );
    assert_eq!(
        head,
        "GET / HTTP/1.1\r\nhost: example.com\r\nx-list: a\r\nx-list: b\r\naccept: */*\r\n\r\n"
    );
    assert_eq!(framing, RequestFraming::Empty);
}

#[test]
fn an_encoded_head_parses_back_as_the_same_request() {
    let fields = [
        ("host", "up.internal:8080"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-empty", ""),
    ];
    let mut out = Vec::new();
    let map = header_map(&fields);
    let framing = encode_head(
        &Method::PUT,
        "/put",
        &map,
        &Added::default(),
        Some(11),
        &mut out,
    );
    assert_eq!(framing, RequestFraming::Length(11));

    let mut slots = [httparse::EMPTY_HEADER; 16];
    let mut req = httparse::Request::new(&mut slots);
    assert_eq!(req.parse(&out), Ok(httparse::Status::Complete(out.len())));
    assert_eq!(req.method, Some("PUT"));
    assert_eq!(req.path, Some("/put"));
    assert_eq!(req.version, Some(1));
    let got: Vec<(&str, &[u8])> = req.headers.iter().map(|h| (h.name, h.value)).collect();
    let mut want: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    want.push(("content-length", b"11"));
    assert_eq!(got, want);
}

#[test]
fn encode_head_appends_to_what_the_buffer_already_holds() {
    let mut out = b"previous".to_vec();
    encode_head(
        &Method::GET,
        "/",
        &HeaderMap::new(),
        &Added::default(),
        Some(0),
        &mut out,
    );
    assert_eq!(out, b"previousGET / HTTP/1.1\r\n\r\n");
}

#[test]
fn the_callers_framing_fields_are_never_copied() {
    let framing_fields = [
        ("content-length", "999"),
        ("transfer-encoding", "gzip, chunked"),
        ("x-keep", "yes"),
        ("transfer-encoding", "chunked"),
    ];
    for body_len in [Some(0), Some(5), None] {
        for method in [Method::GET, Method::POST] {
            let (head, _) = encode(method.clone(), "/", &framing_fields, body_len);
            assert!(!head.contains("gzip"), "{head:?}");
            // A streaming body keeps the declared length (the gateway's decision, rewritten);
            // a known one replaces it.
            assert_eq!(head.contains("999"), body_len.is_none(), "{head:?}");
            let lines = field_lines(&head);
            assert!(lines.contains(&"x-keep: yes"), "{head:?}");
            let framing_lines = lines
                .iter()
                .filter(|l| l.starts_with("content-length") || l.starts_with("transfer-encoding"))
                .count();
            assert!(framing_lines <= 1, "{method} {body_len:?}: {head:?}");
        }
    }
}

#[test]
fn a_known_body_length_is_sent_as_content_length() {
    for method in [Method::POST, Method::GET, Method::DELETE] {
        let (head, framing) = encode(method, "/", &[("x-a", "1")], Some(1234));
        assert_eq!(framing, RequestFraming::Length(1234));
        assert_eq!(field_lines(&head), ["x-a: 1", "content-length: 1234"]);
    }
    let (head, framing) = encode(Method::POST, "/", &[], Some(u64::MAX));
    assert_eq!(framing, RequestFraming::Length(u64::MAX));
    assert_eq!(field_lines(&head), ["content-length: 18446744073709551615"]);
}

#[test]
fn a_known_length_wins_over_a_different_declared_one() {
    // The body's real length is what goes on the wire; a stale declaration would desynchronise
    // the connection.
    let (head, framing) = encode(Method::POST, "/", &[("content-length", "10")], Some(7));
    assert_eq!(framing, RequestFraming::Length(7));
    assert_eq!(field_lines(&head), ["content-length: 7"]);
}

#[test]
fn an_empty_body_says_content_length_0_only_for_methods_that_define_a_body() {
    for method in [Method::POST, Method::PUT, Method::PATCH] {
        let (head, framing) = encode(method.clone(), "/", &[], Some(0));
        assert_eq!(framing, RequestFraming::Empty, "{method}");
        assert_eq!(field_lines(&head), ["content-length: 0"], "{method}");
    }
    for method in [
        Method::GET,
        Method::HEAD,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
    ] {
        let (head, framing) = encode(method.clone(), "/", &[], Some(0));
        assert_eq!(framing, RequestFraming::Empty, "{method}");
        assert!(field_lines(&head).is_empty(), "{method}: {head:?}");
    }
}

#[test]
fn an_empty_body_keeps_a_declared_content_length_0_whatever_the_method() {
    let (head, framing) = encode(Method::GET, "/", &[("content-length", "0")], Some(0));
    assert_eq!(framing, RequestFraming::Empty);
    assert_eq!(field_lines(&head), ["content-length: 0"]);
}

#[test]
fn a_streaming_body_keeps_a_valid_declared_length() {
    let (head, framing) = encode(
        Method::POST,
        "/upload",
        &[("content-length", "4096"), ("transfer-encoding", "chunked")],
        None,
    );
    assert_eq!(framing, RequestFraming::Length(4096));
    assert_eq!(field_lines(&head), ["content-length: 4096"]);

    // A list of one repeated length is one valid length (RFC 9110 §8.6).
    let (head, framing) = encode(Method::POST, "/", &[("content-length", "12, 12")], None);
    assert_eq!(framing, RequestFraming::Length(12));
    assert_eq!(field_lines(&head), ["content-length: 12"]);
}

#[test]
fn a_streaming_body_without_a_valid_declared_length_goes_chunked() {
    for fields in [
        &[][..],
        &[("content-length", "abc")][..],
        &[("content-length", "-1")][..],
        &[("content-length", "1, 2")][..],
        &[("transfer-encoding", "gzip")][..],
    ] {
        let (head, framing) = encode(Method::POST, "/", fields, None);
        assert_eq!(framing, RequestFraming::Chunked, "{fields:?}");
        assert_eq!(
            field_lines(&head),
            ["transfer-encoding: chunked"],
            "{fields:?}"
        );
    }
}

#[test]
fn every_encoded_head_ends_in_exactly_one_blank_line() {
    for body_len in [Some(0), Some(3), None] {
        let (head, _) = encode(Method::POST, "/", &[("x-a", "b")], body_len);
        assert!(head.ends_with("\r\n\r\n"), "{head:?}");
        assert_eq!(head.matches("\r\n\r\n").count(), 1, "{head:?}");
    }
}

#[test]
fn chunk_line_is_lowercase_hex_then_crlf() {
    for (len, want) in [
        (0, "0\r\n"),
        (1, "1\r\n"),
        (10, "a\r\n"),
        (255, "ff\r\n"),
        (4096, "1000\r\n"),
        (0xdead_beef, "deadbeef\r\n"),
    ] {
        let mut out = b"x".to_vec();
        chunk_line(len, &mut out);
        assert_eq!(out, format!("x{want}").as_bytes(), "{len}");
    }
}

#[test]
fn chunks_written_with_chunk_line_decode_back() {
    let parts: [&[u8]; 4] = [b"a", &[b'x'; 300], b"hello world", &[0xff; 17]];
    let mut wire = Vec::new();
    for part in parts {
        chunk_line(part.len(), &mut wire);
        wire.extend_from_slice(part);
        wire.extend_from_slice(b"\r\n");
    }
    chunk_line(0, &mut wire);
    wire.extend_from_slice(b"\r\n");
    let (body, rest) = decode_chunked(&wire).unwrap();
    assert_eq!(body, parts.concat());
    assert!(rest.is_empty());
}

// ---------------------------------------------------------------------------------------------
// parse_head: completeness, splitting, values
// ---------------------------------------------------------------------------------------------

#[test]
fn a_complete_head_is_removed_and_the_body_after_it_stays() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1"[..]);
    let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
    assert_eq!(head.response.status(), StatusCode::OK);
    assert_eq!(head.framing, Framing::Length(5));
    assert!(head.reusable);
    assert_eq!(&buf[..], b"helloHTTP/1.1");
}

#[test]
fn an_incomplete_head_leaves_the_buffer_untouched() {
    let input = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n";
    let mut buf = BytesMut::from(&input[..]);
    assert_eq!(
        parse_head(&mut buf, &Method::GET)
            .unwrap()
            .map(|h| h.framing),
        None
    );
    assert_eq!(&buf[..], input);
    let mut empty = BytesMut::new();
    assert!(parse_head(&mut empty, &Method::GET).unwrap().is_none());
}

#[test]
fn a_head_split_at_every_byte_parses_the_same() {
    let input = b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Type: text/plain\r\n\
                  Content-Length: 3\r\nX-Empty:\r\nX-Spaced:   padded value  \r\n\r\nabc";
    let (
        Summary {
            status,
            version,
            headers,
            framing,
            reusable,
            ..
        },
        rest,
    ) = parse_ok(input, &Method::GET);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(framing, Framing::Length(3));
    assert!(reusable);
    assert_eq!(headers.len(), 5);
    assert_eq!(headers["server"], "up");
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["x-empty"], "");
    // Leading and trailing whitespace is not part of a field value (RFC 9110 §5.5).
    assert_eq!(headers["x-spaced"], "padded value");
    assert_eq!(rest, b"abc");
}

#[test]
fn status_reason_and_version_are_preserved() {
    for (line, status, version) in [
        ("HTTP/1.1 404 Not Found", 404, Version::HTTP_11),
        ("HTTP/1.0 503 Service Unavailable", 503, Version::HTTP_10),
        ("HTTP/1.1 299 ", 299, Version::HTTP_11),
        ("HTTP/1.1 200", 200, Version::HTTP_11),
        ("HTTP/1.1 599 Custom", 599, Version::HTTP_11),
    ] {
        let input = answer(line, &[("content-length", "0")]);
        let (head, _) = parse_ok(&input, &Method::GET);
        assert_eq!(head.status.as_u16(), status, "{line}");
        assert_eq!(head.version, version, "{line}");
    }
}

#[test]
fn repeated_fields_keep_every_value_in_order() {
    let input = answer(
        "HTTP/1.1 200 OK",
        &[
            ("Set-Cookie", "a=1"),
            ("Content-Length", "0"),
            ("set-cookie", "b=2"),
            ("SET-COOKIE", "c=3"),
        ],
    );
    let (head, _) = parse_ok(&input, &Method::GET);
    let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2", "c=3"]);
}

#[test]
fn obs_text_bytes_in_values_are_preserved() {
    let mut input = b"HTTP/1.1 200 OK\r\nX-Latin1: caf\xe9 \x80\xff\tend\r\n".to_vec();
    input.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    let (head, _) = parse_ok(&input, &Method::GET);
    assert_eq!(
        head.headers["x-latin1"].as_bytes(),
        b"caf\xe9 \x80\xff\tend"
    );
}

#[test]
fn parsed_values_do_not_borrow_the_connection_buffer() {
    // The connection reuses its buffer for the next answer; the parsed head must outlive that.
    let mut buf =
        BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: first\r\nContent-Length: 0\r\n\r\n"[..]);
    let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
    buf.clear();
    buf.extend_from_slice(&[b'z'; 64]);
    assert_eq!(head.response.headers()["x-a"], "first");
    assert_eq!(head.response.headers()["content-length"], "0");
}

#[test]
fn two_answers_in_one_buffer_are_read_one_after_the_other() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
           HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
           HTTP/1.1 204 No Content\r\n\r\n"[..],
    );
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        let mut decoder = Decoder::new(head.framing);
        let mut body = Vec::new();
        loop {
            match decoder.step(&mut buf).unwrap() {
                Step::Data(n) => body.extend_from_slice(&buf.split_to(n)),
                Step::NeedMore => panic!("the buffer holds every answer"),
                Step::Done => break,
            }
        }
        bodies.push((head.response.status().as_u16(), body));
    }
    assert_eq!(
        bodies,
        [
            (200, b"hello".to_vec()),
            (201, b"abc".to_vec()),
            (204, Vec::new())
        ]
    );
    assert!(buf.is_empty());
}

// ---------------------------------------------------------------------------------------------
// parse_head: informational answers, upgrade
// ---------------------------------------------------------------------------------------------

#[test]
fn informational_heads_before_the_final_one_are_skipped() {
    let mut input = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
    input.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n");
    input.extend_from_slice(b"HTTP/1.1 102 Processing\r\n\r\n");
    input.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let (head, rest) = parse_ok(&input, &Method::POST);
    let (status, headers, framing) = (head.status, head.headers, head.framing);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(framing, Framing::Length(2));
    // The early hints' fields belong to the hint, not to the final answer.
    assert!(!headers.contains_key("link"));
    assert_eq!(rest, b"ok");
}

#[test]
fn an_informational_head_alone_is_consumed_and_the_final_one_awaited() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2"[..]);
    assert!(parse_head(&mut buf, &Method::POST).unwrap().is_none());
    assert_eq!(&buf[..], b"HTTP/1.1 2");
    buf.extend_from_slice(b"00 OK\r\nContent-Length: 0\r\n\r\n");
    let head = parse_head(&mut buf, &Method::POST).unwrap().unwrap();
    assert_eq!(head.response.status(), StatusCode::OK);
    assert!(buf.is_empty());
}

#[test]
fn switching_protocols_is_refused() {
    let input = answer(
        "HTTP/1.1 101 Switching Protocols",
        &[("Upgrade", "websocket"), ("Connection", "upgrade")],
    );
    assert_eq!(parse_err(&input, &Method::GET), Malformed::Upgrade);
    let mut after_continue = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
    after_continue.extend_from_slice(&input);
    assert_eq!(parse_err(&after_continue, &Method::GET), Malformed::Upgrade);
}

#[test]
fn a_status_below_100_is_refused() {
    let input = answer("HTTP/1.1 099 Odd", &[("content-length", "0")]);
    assert_eq!(parse_err(&input, &Method::GET), Malformed::Status(99));
    let input = answer("HTTP/1.1 000 Zero", &[("content-length", "0")]);
    assert_eq!(parse_err(&input, &Method::GET), Malformed::Status(0));
}

// ---------------------------------------------------------------------------------------------
// parse_head: limits and garbage
// ---------------------------------------------------------------------------------------------

/// A complete head of exactly `len` bytes.
fn head_of_len(len: usize) -> Vec<u8> {
    let start = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: ";
    let end = b"\r\n\r\n";
    let mut head = start.to_vec();
    head.resize(len - end.len(), b'p');
    head.extend_from_slice(end);
    assert_eq!(head.len(), len);
    head
}

#[test]
fn a_head_of_exactly_max_head_bytes_is_accepted() {
    for piece in [4096, MAX_HEAD] {
        let (head, rest) = parse_in_pieces(&head_of_len(MAX_HEAD), &Method::GET, piece).unwrap();
        assert_eq!(head.headers["x-pad"].len(), MAX_HEAD - 47);
        assert!(rest.is_empty());
    }
}

#[test]
fn a_complete_head_larger_than_max_head_is_refused() {
    for piece in [1000, 4096, MAX_HEAD + 1] {
        let input = head_of_len(MAX_HEAD + 1);
        assert_eq!(
            parse_in_pieces(&input, &Method::GET, piece),
            Err(Malformed::HeadTooLarge),
            "pieces of {piece}"
        );
    }
}

#[test]
fn the_limit_is_on_the_head_not_on_the_body_read_with_it() {
    let mut input = head_of_len(MAX_HEAD);
    input.extend_from_slice(&[b'b'; 100]);
    let mut buf = BytesMut::from(&input[..]);
    let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
    assert_eq!(head.framing, Framing::Length(0));
    assert_eq!(&buf[..], &[b'b'; 100][..]);
}

#[test]
fn a_head_that_never_ends_is_refused_once_it_reaches_max_head() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-Endless: "[..]);
    while buf.len() < MAX_HEAD - 1 {
        let more = (MAX_HEAD - 1 - buf.len()).min(999);
        buf.extend_from_slice(&vec![b'e'; more]);
        assert!(parse_head(&mut buf, &Method::GET).unwrap().is_none());
    }
    assert_eq!(buf.len(), MAX_HEAD - 1);
    buf.extend_from_slice(b"e");
    assert_eq!(
        parse_head(&mut buf, &Method::GET).map(|h| h.is_some()),
        Err(Malformed::HeadTooLarge)
    );
}

#[test]
fn max_headers_fields_are_accepted_and_one_more_is_refused() {
    let fields: Vec<(String, String)> = (0..MAX_HEADERS)
        .map(|i| (format!("x-f{i}"), i.to_string()))
        .collect();
    let mut refs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    refs[0] = ("content-length", "0");
    let (head, _) = parse_ok(&answer("HTTP/1.1 200 OK", &refs), &Method::GET);
    assert_eq!(head.headers.len(), MAX_HEADERS);

    refs.push(("x-one-more", "1"));
    assert_eq!(
        parse_err(&answer("HTTP/1.1 200 OK", &refs), &Method::GET),
        Malformed::Head(httparse::Error::TooManyHeaders)
    );
}

#[test]
fn too_many_fields_in_an_informational_head_are_refused_too() {
    let fields: Vec<(String, &str)> = (0..=MAX_HEADERS)
        .map(|i| (format!("link{i}"), "<x>"))
        .collect();
    let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let mut input = answer("HTTP/1.1 103 Early Hints", &refs);
    input.extend_from_slice(&answer("HTTP/1.1 200 OK", &[("content-length", "0")]));
    assert_eq!(
        parse_err(&input, &Method::GET),
        Malformed::Head(httparse::Error::TooManyHeaders)
    );
}

#[test]
fn a_garbage_status_line_is_malformed() {
    let binary: Vec<u8> = (0u8..=255)
        .rev()
        .chain(b"\r\n\r\n".iter().copied())
        .collect();
    for input in [
        &b"garbage\r\n\r\n"[..],
        b"<html><body>not http</body></html>\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        &binary,
        b" HTTP/1.1 200 OK\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
    ] {
        assert!(
            matches!(parse_err(input, &Method::GET), Malformed::Head(_)),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn empty_lines_before_the_status_line_are_skipped() {
    // httparse's leniency (RFC 9112 §2.2 allows it for requests): a stray CRLF after the last
    // body must not break the next answer. They count towards the head and go with it.
    let (head, rest) = parse_ok(
        b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        &Method::GET,
    );
    assert_eq!(head.framing, Framing::Length(1));
    assert_eq!(rest, b"x");
    let mut buf = BytesMut::from(&b"\r\n\r\n"[..]);
    assert!(parse_head(&mut buf, &Method::GET).unwrap().is_none());
}

#[test]
fn a_version_other_than_1_0_or_1_1_is_malformed() {
    for line in [
        "HTTP/2.0 200 OK",
        "HTTP/1.2 200 OK",
        "HTTP/0.9 200 OK",
        "HTTP/11 200 OK",
        "HTTPS/1.1 200 OK",
    ] {
        let input = answer(line, &[("content-length", "0")]);
        assert_eq!(
            parse_err(&input, &Method::GET),
            Malformed::Head(httparse::Error::Version),
            "{line}"
        );
    }
}

#[test]
fn a_missing_or_bad_status_code_is_malformed() {
    for line in [
        "HTTP/1.1",
        "HTTP/1.1 ",
        "HTTP/1.1 OK",
        "HTTP/1.1 20 OK",
        "HTTP/1.1 2000 OK",
        "HTTP/1.1 -200 OK",
        "HTTP/1.1  200 OK",
    ] {
        let input = answer(line, &[("content-length", "0")]);
        assert!(
            matches!(parse_err(&input, &Method::GET), Malformed::Head(_)),
            "{line}"
        );
    }
}

#[test]
fn bad_field_names_and_values_are_malformed() {
    for input in [
        &b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Del: a\x7fb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Cr: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
    ] {
        assert!(
            matches!(parse_err(input, &Method::GET), Malformed::Head(_)),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// parse_head: framing
// ---------------------------------------------------------------------------------------------

#[test]
fn answers_without_a_body_are_empty_whatever_their_length_says() {
    let fields = [("Content-Length", "5")];
    for (line, method) in [
        ("HTTP/1.1 200 OK", Method::HEAD),
        ("HTTP/1.1 404 Not Found", Method::HEAD),
        ("HTTP/1.1 204 No Content", Method::GET),
        ("HTTP/1.1 304 Not Modified", Method::GET),
        ("HTTP/1.0 304 Not Modified", Method::GET),
    ] {
        let mut input = answer(line, &fields);
        input.extend_from_slice(b"HTTP/1.1");
        let (head, rest) = parse_ok(&input, &method);
        assert_eq!(head.framing, Framing::Empty, "{method} {line}");
        assert!(head.reusable, "{method} {line}");
        // A HEAD answer's length is the GET's; it is the caller's to forward.
        assert_eq!(head.headers["content-length"], "5");
        // What follows is the next answer, not this one's body.
        assert_eq!(rest, b"HTTP/1.1");
    }
    let input = answer("HTTP/1.1 200 OK", &[("Transfer-Encoding", "chunked")]);
    assert_eq!(parse_ok(&input, &Method::HEAD).0.framing, Framing::Empty);
}

#[test]
fn content_length_gives_the_length() {
    assert_eq!(
        framing_of(&[("Content-Length", "5")]),
        Ok((Framing::Length(5), true))
    );
    assert_eq!(
        framing_of(&[("content-length", "0")]),
        Ok((Framing::Length(0), true))
    );
    assert_eq!(
        framing_of(&[("CONTENT-LENGTH", "007")]),
        Ok((Framing::Length(7), true))
    );
    assert_eq!(
        framing_of(&[("Content-Length", "9999999999999999999")]),
        Ok((Framing::Length(9_999_999_999_999_999_999), true))
    );
    let input = answer("HTTP/1.0 200 OK", &[("Content-Length", "5")]);
    assert_eq!(parse_ok(&input, &Method::GET).0.framing, Framing::Length(5));
}

#[test]
fn the_same_length_repeated_is_one_length() {
    for fields in [
        &[("Content-Length", "5, 5")][..],
        &[("Content-Length", "5,5,5")][..],
        &[("Content-Length", "5"), ("Content-Length", "5")][..],
        &[("Content-Length", "5"), ("Content-Length", " 5 , 5")][..],
    ] {
        assert_eq!(
            framing_of(fields),
            Ok((Framing::Length(5), true)),
            "{fields:?}"
        );
    }
}

#[test]
fn lengths_that_are_not_one_valid_number_are_refused() {
    for fields in [
        &[("Content-Length", "5, 6")][..],
        &[("Content-Length", "5"), ("Content-Length", "6")][..],
        &[("Content-Length", "5"), ("Content-Length", "5, 6")][..],
        &[("Content-Length", "5"), ("Content-Length", "x")][..],
        &[("Content-Length", "x"), ("Content-Length", "5")][..],
        &[("Content-Length", "-5")][..],
        &[("Content-Length", "+5")][..],
        &[("Content-Length", "0x5")][..],
        &[("Content-Length", "a")][..],
        &[("Content-Length", "5a")][..],
        &[("Content-Length", "5 5")][..],
        &[("Content-Length", "5.0")][..],
        &[("Content-Length", "")][..],
        &[("Content-Length", ",")][..],
        &[("Content-Length", "5,")][..],
        &[("Content-Length", "18446744073709551615")][..],
        &[("Content-Length", "18446744073709551616")][..],
        &[("Content-Length", "99999999999999999999")][..],
        &[("Content-Length", "123456789012345678901234567890")][..],
        &[("Content-Length", "\u{663}")][..],
    ] {
        assert_eq!(
            framing_of(fields),
            Err(Malformed::ContentLength),
            "{fields:?}"
        );
    }
}

#[test]
fn chunked_as_the_last_coding_gives_a_reusable_chunked_body() {
    for fields in [
        &[("Transfer-Encoding", "chunked")][..],
        &[("transfer-encoding", "CHUNKED")][..],
        &[("Transfer-Encoding", "gzip, chunked")][..],
        &[("Transfer-Encoding", "gzip,chunked")][..],
        &[
            ("Transfer-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
        ][..],
    ] {
        assert_eq!(
            framing_of(fields),
            Ok((Framing::Chunked, true)),
            "{fields:?}"
        );
    }
}

#[test]
fn a_coding_that_does_not_end_in_chunked_reads_to_close() {
    for fields in [
        &[("Transfer-Encoding", "gzip")][..],
        &[("Transfer-Encoding", "chunked, gzip")][..],
        &[
            ("Transfer-Encoding", "chunked"),
            ("Transfer-Encoding", "gzip"),
        ][..],
        &[("Transfer-Encoding", "chunkedx")][..],
        &[("Transfer-Encoding", "")][..],
    ] {
        assert_eq!(
            framing_of(fields),
            Ok((Framing::Close, false)),
            "{fields:?}"
        );
    }
}

#[test]
fn a_length_beside_chunked_is_dropped_and_the_connection_not_reused() {
    for fields in [
        &[("Content-Length", "5"), ("Transfer-Encoding", "chunked")][..],
        &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")][..],
        &[
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "nonsense"),
        ][..],
        &[
            ("Content-Length", "5"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Length", "6"),
        ][..],
    ] {
        let (head, _) = parse_ok(&answer("HTTP/1.1 200 OK", fields), &Method::GET);
        assert_eq!(
            (head.framing, head.reusable),
            (Framing::Chunked, false),
            "{fields:?}"
        );
        assert!(!head.headers.contains_key("content-length"), "{fields:?}");
        assert!(
            !head.headers.contains_key("transfer-encoding"),
            "hop-by-hop: the answer is framed again for the caller"
        );
    }
    let fields = [("Content-Length", "5"), ("Transfer-Encoding", "gzip")];
    let (head, _) = parse_ok(&answer("HTTP/1.1 200 OK", &fields), &Method::GET);
    assert_eq!((head.framing, head.reusable), (Framing::Close, false));
    assert!(!head.headers.contains_key("content-length"));
}

#[test]
fn http_1_0_has_no_chunked_coding() {
    let input = answer("HTTP/1.0 200 OK", &[("Transfer-Encoding", "chunked")]);
    let (head, _) = parse_ok(&input, &Method::GET);
    assert_eq!((head.framing, head.reusable), (Framing::Close, false));
}

#[test]
fn no_length_at_all_reads_to_close() {
    assert_eq!(framing_of(&[]), Ok((Framing::Close, false)));
    assert_eq!(framing_of(&[("X-A", "b")]), Ok((Framing::Close, false)));
    let input = answer("HTTP/1.0 200 OK", &[]);
    assert_eq!(parse_ok(&input, &Method::GET).0.framing, Framing::Close);
}

#[test]
fn framing_exact_gives_the_known_lengths() {
    assert_eq!(Framing::Empty.exact(), Some(0));
    assert_eq!(Framing::Length(9).exact(), Some(9));
    assert_eq!(Framing::Chunked.exact(), None);
    assert_eq!(Framing::Close.exact(), None);
}

// ---------------------------------------------------------------------------------------------
// Decoder: lengths and close
// ---------------------------------------------------------------------------------------------

#[test]
fn a_length_body_ends_exactly_and_the_bytes_after_it_stay() {
    let (body, rest) = decode_every_way(Framing::Length(11), b"hello worldHTTP/1.1 200").unwrap();
    assert_eq!(body, b"hello world");
    assert_eq!(rest, b"HTTP/1.1 200");
    let (body, rest) = decode_every_way(Framing::Length(3), b"abc").unwrap();
    assert_eq!((body, rest), (b"abc".to_vec(), Vec::new()));
}

#[test]
fn a_length_body_cut_short_by_eof_is_truncated() {
    assert_eq!(
        decode_every_way(Framing::Length(10), b"hello"),
        Err(Malformed::Truncated(5))
    );
    assert_eq!(
        decode_every_way(Framing::Length(10), b""),
        Err(Malformed::Truncated(10))
    );
}

#[test]
fn a_close_delimited_body_ends_at_eof() {
    let input: Vec<u8> = (0..=255).cycle().take(1000).collect();
    let (body, rest) = decode_every_way(Framing::Close, &input).unwrap();
    assert_eq!(body, input);
    assert!(rest.is_empty());
    let (body, _) = decode_every_way(Framing::Close, b"").unwrap();
    assert!(body.is_empty());
}

#[test]
fn an_empty_body_is_done_at_once_and_leaves_the_buffer_alone() {
    for framing in [Framing::Empty, Framing::Length(0)] {
        let mut decoder = Decoder::new(framing);
        assert!(decoder.is_done());
        assert_eq!(decoder.remaining(), Some(0));
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        assert_eq!(decoder.step(&mut buf), Ok(Step::Done));
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n");
        assert_eq!(decoder.at_eof(), Ok(()));
    }
}

#[test]
fn remaining_counts_down_to_zero() {
    let mut decoder = Decoder::new(Framing::Length(10));
    assert_eq!(decoder.remaining(), Some(10));
    let mut buf = BytesMut::new();
    assert_eq!(decoder.step(&mut buf), Ok(Step::NeedMore));
    for (piece, left) in [(&b"abc"[..], 7), (b"defg", 3), (b"hijXYZ", 0)] {
        buf.extend_from_slice(piece);
        let Ok(Step::Data(n)) = decoder.step(&mut buf) else {
            panic!("data expected");
        };
        buf.advance(n);
        assert_eq!(decoder.remaining(), Some(left));
    }
    assert!(decoder.is_done());
    assert_eq!(decoder.step(&mut buf), Ok(Step::Done));
    assert_eq!(&buf[..], b"XYZ");
    assert_eq!(Decoder::new(Framing::Chunked).remaining(), None);
    assert_eq!(Decoder::new(Framing::Close).remaining(), None);
}

#[test]
fn a_finished_decoder_stays_done() {
    let mut decoder = Decoder::new(Framing::Length(1));
    let mut buf = BytesMut::from(&b"ab"[..]);
    assert_eq!(decoder.step(&mut buf), Ok(Step::Data(1)));
    buf.advance(1);
    for _ in 0..3 {
        assert_eq!(decoder.step(&mut buf), Ok(Step::Done));
    }
    assert_eq!(decoder.at_eof(), Ok(()));
    assert_eq!(decoder.step(&mut buf), Ok(Step::Done));
    assert_eq!(&buf[..], b"b");
}

// ---------------------------------------------------------------------------------------------
// Decoder: chunked
// ---------------------------------------------------------------------------------------------

#[test]
fn several_chunks_decode_to_their_concatenation() {
    let (body, rest) = decode_chunked(b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n").unwrap();
    assert_eq!(body, b"hello world");
    assert!(rest.is_empty());
}

#[test]
fn chunk_data_may_hold_crlf_and_binary() {
    let (body, _) = decode_chunked(b"7\r\n\r\n0\r\n\r\n\r\n3\r\n\x00\xff\n\r\n0\r\n\r\n").unwrap();
    assert_eq!(body, b"\r\n0\r\n\r\n\x00\xff\n");
}

#[test]
fn chunk_extensions_are_ignored() {
    let (body, rest) = decode_chunked(
        b"5;name=value\r\nhello\r\n6 ; a=\"q;uoted\" ;b\r\n world\r\n1\t;x\r\n!\r\n0;last\r\n\r\n",
    )
    .unwrap();
    assert_eq!(body, b"hello world!");
    assert!(rest.is_empty());
}

#[test]
fn chunk_sizes_are_hex_in_either_case() {
    let (body, _) =
        decode_chunked(b"A\r\n0123456789\r\n1f\r\nabcdefghijklmnopqrstuvwxyz01234\r\n0\r\n\r\n")
            .unwrap();
    assert_eq!(body, b"0123456789abcdefghijklmnopqrstuvwxyz01234");
    let (body, _) = decode_chunked(b"00003\r\nabc\r\n000\r\n\r\n").unwrap();
    assert_eq!(body, b"abc");
}

#[test]
fn trailers_are_consumed_and_dropped_and_the_next_answer_stays() {
    let (body, rest) = decode_chunked(
        b"3\r\nabc\r\n0\r\nExpires: never\r\nX-Checksum: 1234\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    )
    .unwrap();
    assert_eq!(body, b"abc");
    assert_eq!(rest, b"HTTP/1.1 200 OK\r\n\r\n");
    let (body, rest) = decode_chunked(b"0\r\n\r\nHTTP/1.1").unwrap();
    assert!(body.is_empty());
    assert_eq!(rest, b"HTTP/1.1");
}

#[test]
fn a_trailer_section_within_the_limit_is_accepted() {
    let line = format!("x-t: {}\r\n", "v".repeat(100));
    let count = (MAX_TRAILERS - 200) / line.len();
    let input = format!("1\r\na\r\n0\r\n{}\r\nnext", line.repeat(count));
    let (body, rest) = decode_chunked(input.as_bytes()).unwrap();
    assert_eq!((body, rest), (b"a".to_vec(), b"next".to_vec()));
}

#[test]
fn a_trailer_section_larger_than_the_limit_is_refused() {
    let line = format!("x-t: {}\r\n", "v".repeat(100));
    let count = MAX_TRAILERS / line.len() + 2;
    let input = format!("1\r\na\r\n0\r\n{}\r\n", line.repeat(count));
    assert_eq!(decode_chunked(input.as_bytes()), Err(Malformed::Trailers));
    // One trailer line that never ends; byte-at-a-time would rescan 64 KiB each step.
    let input = format!("0\r\nx-long: {}", "v".repeat(MAX_TRAILERS + 10));
    assert_eq!(
        decode_with(Framing::Chunked, input.as_bytes(), &[997, 4096]),
        Err(Malformed::Trailers)
    );
}

#[test]
fn chunk_data_not_followed_by_crlf_is_refused() {
    for input in [
        &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhello\r\r\n0\r\n\r\n",
        b"5\r\nhello\r0\r\n\r\n",
        b"5\r\nhello world\r\n0\r\n\r\n",
        b"3\r\nabc0\r\n\r\n",
    ] {
        assert_eq!(
            decode_chunked(input),
            Err(Malformed::ChunkEnd),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn chunk_sizes_that_are_not_hex_are_refused() {
    for line in [
        &b"g"[..],
        b"",
        b"-1",
        b" ",
        b"   ",
        b"\t",
        b" 5",
        b"5 x",
        b"5x",
        b"0x5",
        b"+5",
        b"5;a\x00b",
        b"5;a\rb",
        b"5\x7f",
    ] {
        let mut input = line.to_vec();
        input.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(
            decode_chunked(&input),
            Err(Malformed::ChunkSize),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn a_size_of_sixteen_or_more_hex_digits_is_refused() {
    for line in [
        &b"ffffffffffffffff"[..],
        b"10000000000000000",
        b"0000000000000005",
        b"fffffffffffffffffffffffffffffffff",
    ] {
        let mut input = line.to_vec();
        input.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(decode_chunked(&input), Err(Malformed::ChunkSize));
    }
}

#[test]
fn a_size_of_fifteen_hex_digits_is_read() {
    let mut decoder = Decoder::new(Framing::Chunked);
    let mut buf = BytesMut::from(&b"fffffffffffffff\r\nabc"[..]);
    assert_eq!(decoder.step(&mut buf), Ok(Step::Data(3)));
    assert_eq!(&buf[..], b"abc");
    buf.clear();
    assert_eq!(decoder.step(&mut buf), Ok(Step::NeedMore));
    assert_eq!(decoder.at_eof(), Err(Malformed::TruncatedChunked));
}

#[test]
fn a_chunk_line_up_to_the_limit_is_read() {
    let ext = format!("5;{}", "e".repeat(MAX_CHUNK_LINE - 2));
    assert_eq!(ext.len(), MAX_CHUNK_LINE);
    let input = format!("{ext}\r\nhello\r\n0\r\n\r\n");
    let (body, _) = decode_with(Framing::Chunked, input.as_bytes(), &[1, 2, 7, 4096]).unwrap();
    assert_eq!(body, b"hello");
}

#[test]
fn a_chunk_line_past_the_limit_is_refused() {
    let ext = format!("5;{}", "e".repeat(MAX_CHUNK_LINE - 1));
    let input = format!("{ext}\r\nhello\r\n0\r\n\r\n");
    assert_eq!(
        decode_with(Framing::Chunked, input.as_bytes(), &[1, 2, 7, 4096]),
        Err(Malformed::ChunkLine)
    );
    // A line that never ends is refused at the limit, not read until the connection closes.
    let endless = format!("5;{}", "e".repeat(3 * MAX_CHUNK_LINE));
    assert_eq!(
        decode_with(Framing::Chunked, endless.as_bytes(), &[1, 2, 7, 4096]),
        Err(Malformed::ChunkLine)
    );
    let digits = "1".repeat(2 * MAX_CHUNK_LINE);
    assert_eq!(decode_chunked(digits.as_bytes()), Err(Malformed::ChunkLine));
}

#[test]
fn bare_lf_line_ends_are_refused() {
    for input in [
        &b"5\nhello\r\n0\r\n\r\n"[..],
        b"\nhello",
        b"5\r\nhello\r\n0\n\r\n",
        b"5;ext\nhello\r\n0\r\n\r\n",
    ] {
        assert_eq!(
            decode_chunked(input),
            Err(Malformed::ChunkSize),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
    // In the trailers a bare LF is refused as well (reported as a trailer error).
    for input in [&b"0\r\n\n"[..], b"0\r\nX-A: b\n\r\n", b"0\r\nX-A: b\r\n\n"] {
        assert!(
            decode_chunked(input).is_err(),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn eof_anywhere_inside_a_chunked_body_is_truncation() {
    let whole = b"5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n";
    for cut in 0..whole.len() {
        assert_eq!(
            decode_chunked(&whole[..cut]),
            Err(Malformed::TruncatedChunked),
            "cut at {cut}: {:?}",
            String::from_utf8_lossy(&whole[..cut])
        );
    }
    assert_eq!(decode_chunked(whole).unwrap().0, b"hello");
}

#[test]
fn an_answer_says_whether_its_connection_closes_and_how_long_it_may_idle() {
    let said = |status_line: &str, fields: &[(&str, &str)]| {
        parse_ok(&answer(status_line, fields), &Method::GET).0.said
    };
    let ok11 = "HTTP/1.1 200 OK";
    let none = [("content-length", "0")];
    assert_eq!(said(ok11, &none), ConnectionSaid::default());
    assert!(
        said("HTTP/1.0 200 OK", &none).closes,
        "HTTP/1.0 closes unless it says otherwise"
    );
    let keep = said(
        ok11,
        &[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5, max=100"),
            ("keep-alive", "timeout=1"),
            ("content-length", "0"),
        ],
    );
    assert_eq!(
        keep,
        ConnectionSaid {
            closes: false,
            idle_timeout: Some(Duration::from_secs(5)),
        },
        "the first Keep-Alive field is the one read"
    );
    let close = said(
        ok11,
        &[
            ("connection", "keep-alive"),
            ("Connection", "Upgrade, CLOSE "),
            ("content-length", "0"),
        ],
    );
    assert!(
        close.closes,
        "a later Connection line, any case, with spaces"
    );
    assert!(
        !said(
            ok11,
            &[
                ("connection", "closed, keep-alive"),
                ("content-length", "0")
            ]
        )
        .closes
    );
    let not_text = b"HTTP/1.1 200 OK\r\nconnection: \xff, close\r\ncontent-length: 0\r\n\r\n";
    assert!(
        parse_ok(not_text, &Method::GET).0.said.closes,
        "a value that is not all text is read for its items"
    );
}

#[test]
fn hop_by_hop_fields_and_those_connection_names_are_not_kept() {
    let (head, _) = parse_ok(
        &answer(
            "HTTP/1.1 200 OK",
            &[
                ("Connection", "keep-alive, X-Hop"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("x-hop", "1"),
                ("X-Kept", "2"),
                ("Content-Length", "0"),
            ],
        ),
        &Method::GET,
    );
    let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-kept", "content-length"]);
    assert_eq!(head.said.idle_timeout, Some(Duration::from_secs(5)));
}

#[test]
fn a_framing_field_named_in_connection_still_frames_the_answer() {
    let (head, rest) = parse_ok(
        b"HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 5\r\n\r\nhello",
        &Method::GET,
    );
    assert_eq!(head.framing, Framing::Length(5));
    assert!(head.headers.get("content-length").is_none());
    assert_eq!(rest, b"hello");
}
