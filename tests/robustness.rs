//! No panic on any input: seeded random inputs, bounded in count, against the parts that see
//! untrusted bytes — the config loader, the HTTP/1 framing guard, header forwarding and path
//! normalisation — each with an invariant beyond "did not panic".
//!
//! These stand in for `cargo fuzz` targets, which need a nightly toolchain. The seed is fixed so
//! a failure reproduces; set BREAKWATER_FUZZ_SEED and BREAKWATER_FUZZ_ROUNDS to explore further.

use http::header::{HeaderMap, HeaderName, HeaderValue};

fn rng() -> fastrand::Rng {
    let seed = std::env::var("BREAKWATER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_b4ea_c0de);
    fastrand::Rng::with_seed(seed)
}

fn rounds(default: usize) -> usize {
    std::env::var("BREAKWATER_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn pick<'a>(r: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[r.usize(..items.len())]
}

#[test]
fn config_loader_never_panics_on_mutated_files() {
    let mut r = rng();
    let example = std::fs::read_to_string("config/example.yaml").unwrap();
    let default = std::fs::read_to_string("config/breakwater.yaml").unwrap();
    let fragments = [
        "0",
        "-1",
        "99999999999999999999",
        "2s",
        "0s",
        "-5m",
        "1MiB",
        "KiB",
        "auto",
        "[]",
        "{}",
        "~",
        "null",
        "true",
        "\"\"",
        "'x'",
        "[1, [2]]",
        "{a: b}",
        "http://",
        "http://[::1]:0",
        "ftp://x",
        "\u{0}",
        "é",
        "%",
        ":",
        "- ",
        "\n  ",
        "&a",
        "*a",
        "!!binary",
        "1e999",
    ];
    let env = || {
        vec![
            (
                "BREAKWATER_API_KEYS".to_string(),
                "0123456789abcdef-one".to_string(),
            ),
            (
                "BREAKWATER_BASIC_PASSWORD".to_string(),
                "correct-horse-battery".to_string(),
            ),
        ]
    };
    for _ in 0..rounds(3000) {
        let base = if r.bool() { &example } else { &default };
        let mut text: Vec<char> = base.chars().collect();
        for _ in 0..r.usize(1..6) {
            let at = r.usize(..text.len().max(1));
            match r.u8(..4) {
                0 => {
                    let end = (at + r.usize(..20)).min(text.len());
                    text.drain(at..end);
                }
                1 => {
                    let f: Vec<char> = pick(&mut r, &fragments).chars().collect();
                    text.splice(at..at, f);
                }
                2 => {
                    if at < text.len() {
                        text[at] = r.char(' '..='~');
                    }
                }
                _ => {
                    // Swap a value after a colon for a fragment.
                    if let Some(colon) = text[at..].iter().position(|c| *c == ':') {
                        let start = at + colon + 1;
                        let end = text[start..]
                            .iter()
                            .position(|c| *c == '\n')
                            .map_or(text.len(), |e| start + e);
                        let f: Vec<char> =
                            format!(" {}", pick(&mut r, &fragments)).chars().collect();
                        text.splice(start..end, f);
                    }
                }
            }
        }
        let text: String = text.into_iter().collect();
        // Ok or a reported error; every reported problem names a key.
        if let Err(e) = breakwater::prepare::from_yaml(&text, env()) {
            for p in e.problems() {
                assert!(!p.key.is_empty(), "problem without a key: {p:?}");
            }
        }
    }
}

fn random_head(r: &mut fastrand::Rng) -> String {
    let mut h = format!(
        "{} /{} HTTP/1.{}\r\n",
        pick(r, &["GET", "POST", "PUT", "CONNECT", "G\0T", ""]),
        pick(r, &["", "a", "%2e%2e/x", "..", "a b"]),
        r.u8(0..2)
    );
    for _ in 0..r.usize(..6) {
        let line = match r.u8(..8) {
            0 => format!(
                "content-length: {}\r\n",
                pick(r, &["0", "3", "10", "-1", "x", "99999999999999999999"])
            ),
            1 => format!(
                "transfer-encoding: {}\r\n",
                pick(
                    r,
                    &["chunked", "gzip, chunked", "gzip", "chunked, gzip", ""]
                )
            ),
            2 => "upgrade: websocket\r\n".to_string(),
            3 => " folded continuation\r\n".to_string(),
            4 => "host: a\r\n".to_string(),
            5 => "x-long: ".to_string() + &"a".repeat(r.usize(..200)) + "\r\n",
            6 => "bad header\r\n".to_string(),
            _ => "Content-Length: 2\r\n".to_string(),
        };
        h.push_str(&line);
    }
    h.push_str("\r\n");
    h
}

fn random_body(r: &mut fastrand::Rng) -> String {
    match r.u8(..4) {
        0 => String::new(),
        1 => "abc".to_string(),
        2 => format!("{:x}\r\n{}\r\n0\r\n\r\n", 5, "hello"),
        _ => format!(
            "{}\r\nzz\r\n0\r\nx-t: 1\r\n\r\n",
            pick(r, &["2", "g", "ffffffffffffffffff", ""])
        ),
    }
}

#[test]
fn framing_guard_never_panics_and_never_alters_what_it_does_not_refuse() {
    let mut r = rng();
    for _ in 0..rounds(20_000) {
        let mut input = String::new();
        if r.u8(..20) == 0 {
            input.push_str("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        }
        for _ in 0..r.usize(1..4) {
            input.push_str(&random_head(&mut r));
            input.push_str(&random_body(&mut r));
        }
        let bytes = input.as_bytes();
        let mut guard = breakwater::listener::Guard::new(1024, 16);
        let mut out = Vec::new();
        let mut refused = None;
        let mut at = 0;
        while at < bytes.len() {
            let n = r.usize(1..=bytes.len() - at);
            refused = refused.or(guard.feed(&bytes[at..at + n], &mut out));
            at += n;
        }
        guard.flush(&mut out);
        match refused {
            None => assert_eq!(out, bytes, "passed through unchanged: {input:?}"),
            Some(_) => assert!(
                out.ends_with(breakwater::listener::STAND_IN),
                "a refused head is replaced by the stand-in: {input:?}"
            ),
        }
    }
}

#[test]
fn header_forwarding_never_panics_and_strips_every_hop_by_hop_header() {
    let mut r = rng();
    let names = [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "transfer-encoding",
        "x-request-id",
        "x-forwarded-for",
        "host",
        "x-custom",
        "x-breakwater-budget-ms",
    ];
    for _ in 0..rounds(20_000) {
        let mut h = HeaderMap::new();
        let mut named = Vec::new();
        for _ in 0..r.usize(..10) {
            let name = HeaderName::from_bytes(pick(&mut r, &names).as_bytes()).unwrap();
            let len = r.usize(..40);
            let value: Vec<u8> = (0..len)
                .map(|_| match r.u8(..10) {
                    0 => b',',
                    1 => b' ',
                    2 => r.u8(0x80..=0xff),
                    _ => r.u8(b'!'..=b'~'),
                })
                .collect();
            if name == "connection" {
                named.extend(
                    String::from_utf8_lossy(&value)
                        .split(',')
                        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok()),
                );
            }
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                h.append(name, v);
            }
        }
        let id = breakwater::forward::request_id(&h);
        assert!(!id.as_str().is_empty() && id.as_str().len() <= 128);
        let forwarding = breakwater::forward::request_headers(
            &mut h,
            &breakwater::forward::ForwardInfo {
                peer: "[::ffff:10.1.2.3]:80".parse().unwrap(),
                proto: "http",
                original_host: Some(&HeaderValue::from_static("gw")),
                request_id: &id,
                upstream_host: Some(&HeaderValue::from_static("10.0.0.1:8000")),
            },
        );
        // What the upstream gets: the head as the gateway's client writes it, parsed back.
        let added = breakwater::upstream::h1::codec::Added {
            forwarding: Some(&forwarding),
            host: forwarding.host.as_ref(),
            budget_ms: Some(1500),
        };
        let mut head = Vec::new();
        breakwater::upstream::h1::codec::encode_head(
            &http::Method::GET,
            "/",
            &h,
            &added,
            Some(0),
            &mut head,
        );
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut fields);
        assert!(parsed.parse(&head).unwrap().is_complete());
        let sent: Vec<String> = parsed
            .headers
            .iter()
            .map(|f| f.name.to_ascii_lowercase())
            .collect();
        for hop in [
            "connection",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-authorization",
            "transfer-encoding",
            "content-length",
        ] {
            assert!(!sent.iter().any(|n| n == hop), "{hop} forwarded");
        }
        let ours = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-request-id",
            "host",
            "x-breakwater-budget-ms",
        ];
        for name in ours {
            let n = sent.iter().filter(|s| *s == name).count();
            assert_eq!(n, 1, "{name} sent {n} times: {sent:?}");
        }
        for n in named {
            if !ours.contains(&n.as_str()) {
                assert!(
                    !sent.iter().any(|s| s == n.as_str()),
                    "{n} was named in Connection but forwarded"
                );
            }
        }
    }
}

#[test]
fn path_normalisation_never_panics_and_is_idempotent() {
    let mut r = rng();
    let pieces = [
        "/", "//", ".", "..", "a", "%2e", "%2E", "%2f", "%5c", "%00", "%", "%4", "%zz", "%41",
        "%c3%a9", "~", "-", "_", "?",
    ];
    for _ in 0..rounds(50_000) {
        let mut p = String::from("/");
        for _ in 0..r.usize(..10) {
            p.push_str(pick(&mut r, &pieces));
        }
        if let Ok(n) = breakwater::routing::normalize_path(&p) {
            let n = n.into_owned();
            assert!(n.starts_with('/'), "{p} -> {n}");
            assert!(!n.contains("//"), "{p} -> {n}");
            assert!(!n.split('/').any(|s| s == "." || s == ".."), "{p} -> {n}");
            let again = breakwater::routing::normalize_path(&n).expect("normal form is accepted");
            assert_eq!(again, n, "not idempotent for {p}");
        }
    }
}
