//! The core request path against a real in-process backend.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ONE_ROUTE: &str = r#"
upstreams:
  app:
    url: "{backend}"
    pool: { max_connections: 8, min_idle: 2 }
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
    budget: 2s
    max_request_body: 1KiB
"#;

#[tokio::test]
async fn routes_and_answers_404_in_json_for_unmatched() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let c = client();
    let ok = get(&c, &gw.url("/api/v1?x=1")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(&ok.body[..], b"ok");

    let missing = get(&c, &gw.url("/other")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.reason(), Some("no_route"));
    assert_eq!(missing.json()["error"], "no_route");
    assert_eq!(missing.json()["route"], "none");
    assert!(missing.header("retry-after").is_none());
    assert_eq!(backend.count(|s| &s.requests), 1);
}

#[tokio::test]
async fn headers_are_forwarded_and_hop_by_hop_ones_stripped() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let c = client();
    let req = Request::get(gw.url("/api/h?q=1"))
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("x-request-id", "caller-id-7")
        .header("x-forwarded-for", "198.51.100.1")
        .header("inin-correlation-id", "corr-1")
        .body(body(Bytes::new()))
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-request-id"), Some("caller-id-7"));
    assert!(
        a.header("keep-alive").is_none(),
        "hop-by-hop header from upstream removed"
    );

    let seen = backend.last_request();
    assert_eq!(seen.0, "/api/h?q=1");
    let h = seen.1;
    assert!(
        h.get("x-private").is_none(),
        "header named by Connection removed"
    );
    assert!(h.get("connection").is_none_or(|v| v != "x-private"));
    assert_eq!(h["x-request-id"], "caller-id-7");
    assert_eq!(h["x-forwarded-for"], "198.51.100.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.addr.to_string().as_str());
    assert_eq!(h["host"], backend.addr.to_string().as_str());
    assert_eq!(h["inin-correlation-id"], "corr-1");
    let budget: u64 = h["x-breakwater-budget-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(budget > 0 && budget <= 2000, "budget header {budget}");

    // Without a caller id one is made and returned.
    let a = get(&c, &gw.url("/api/h")).await;
    let id = a.header("x-request-id").unwrap();
    assert_eq!(id.len(), 32);
}

#[tokio::test]
async fn min_idle_connections_are_open_before_the_first_request() {
    let backend = Backend::start().await;
    let _gw = Gateway::start(
        &ONE_ROUTE.replace("min_idle: 2", "min_idle: 3"),
        &backend.url(),
    )
    .await;
    assert_eq!(backend.count(|s| &s.accepted), 3);
    assert_eq!(backend.count(|s| &s.requests), 0);
}

#[tokio::test]
async fn sequential_requests_reuse_pooled_connections() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(get(&c, &gw.url("/api/x")).await.status, StatusCode::OK);
    }
    let accepted = backend.count(|s| &s.accepted);
    assert!(
        accepted <= 3,
        "50 sequential requests opened {accepted} connections"
    );
    assert_eq!(backend.count(|s| &s.requests), 50);
}

/// A route that may resend anything, beside one that may not.
const TWO_ROUTES: &str = r#"
upstreams:
  app:
    url: "{backend}"
    pool: { max_connections: 8, min_idle: 2 }
    circuit: { enabled: false }
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
    budget: 2s
  - name: safe
    match: { path_prefix: /safe }
    upstream: app
    budget: 2s
    idempotent: true
"#;

fn request_ids_seen(backend: &Backend) -> Vec<String> {
    backend
        .stats
        .headers
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, h)| h.get("x-request-id")?.to_str().ok().map(str::to_string))
        .collect()
}

fn budgets_seen(backend: &Backend, id: &str) -> Vec<u64> {
    backend
        .stats
        .headers
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, h)| h.get("x-request-id").is_some_and(|v| v == id))
        .map(|(_, h)| {
            h["x-breakwater-budget-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

async fn send_with_id(c: &TestClient, method: http::Method, url: &str, id: &str) -> Answer {
    send(
        c,
        Request::builder()
            .method(method)
            .uri(url)
            .header("x-request-id", id)
            .body(body(Bytes::from_static(b"payload")))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn a_post_the_backend_may_have_read_is_never_sent_twice() {
    let backend = Backend::start().await;
    let gw = Gateway::start(TWO_ROUTES, &backend.url()).await;
    let c = client();
    // Every pooled connection has now served: a failure on one may be the keep-alive race.
    warm(&c, &gw.url("/api/warm"), 2).await;
    // The backend reads the request, then closes the connection without a word.
    let a = send_with_id(
        &c,
        http::Method::POST,
        &gw.url("/api/x?drop=1&delay=20"),
        "post-1",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.reason(), Some("upstream_error"));
    assert_eq!(budgets_seen(&backend, "post-1").len(), 1, "sent once");

    // On a route that declares its requests safe to repeat, it is resent once, on a fresh
    // connection, with what is left of the budget.
    let a = send_with_id(
        &c,
        http::Method::POST,
        &gw.url("/safe/x?drop=1&delay=20"),
        "post-2",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    let budgets = budgets_seen(&backend, "post-2");
    assert_eq!(budgets.len(), 2, "sent twice: {budgets:?}");
    assert!(
        budgets[1] + 20 <= budgets[0],
        "the resend carries the budget left: {budgets:?}"
    );

    // A GET is idempotent: resent on any route.
    let a = send_with_id(
        &c,
        http::Method::GET,
        &gw.url("/api/x?drop=1&delay=20"),
        "get-1",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(budgets_seen(&backend, "get-1").len(), 2);
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"breakwater_retries_total{route="safe",reason="stale_connection"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn connections_the_backend_closes_while_idle_never_cost_a_duplicate() {
    // The backend drops idle keep-alive connections after 5 ms while the pool would keep them
    // 45 s: every pooled connection is stale by the next request, some of them while being used.
    let backend = Backend::with(BackendOptions {
        idle_close: Some(Duration::from_millis(5)),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(TWO_ROUTES, &backend.url()).await;
    let c = client();
    let mut failed_posts = 0;
    for i in 0..60u64 {
        // Idempotent requests are resent when they meet the race: every one is answered.
        let a = get(&c, &gw.url("/api/stale")).await;
        assert_eq!(a.status, StatusCode::OK, "GET {i}: {:?}", a.body);
        let a = send_with_id(
            &c,
            http::Method::POST,
            &gw.url("/safe/stale"),
            &format!("safe-{i}"),
        )
        .await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "POST {i} (idempotent route): {:?}",
            a.body
        );
        // A POST that may have reached the backend is not resent: it is answered, or fails.
        let a = send_with_id(
            &c,
            http::Method::POST,
            &gw.url("/api/stale"),
            &format!("post-{i}"),
        )
        .await;
        failed_posts += usize::from(a.status != StatusCode::OK);
        assert!(
            a.status == StatusCode::OK || a.reason() == Some("upstream_error"),
            "POST {i}: {} {:?}",
            a.status,
            a.body
        );
        // Vary the gap around the backend's idle timeout to hit the race from both sides.
        tokio::time::sleep(Duration::from_millis((i % 4) * 3)).await;
    }
    eprintln!("idle-close race: {failed_posts} of 60 plain POSTs answered 502");
    let ids = request_ids_seen(&backend);
    let posts: Vec<&String> = ids.iter().filter(|id| id.starts_with("post-")).collect();
    let unique: std::collections::BTreeSet<&&String> = posts.iter().collect();
    assert_eq!(
        posts.len(),
        unique.len(),
        "a POST reached the backend twice"
    );
    // The gateway learned the backend's idle timer, and stopped handing out connections about
    // to reach it.
    let m = gw.metrics().await;
    assert!(
        m.contains("breakwater_upstream_connections_retired_total{upstream=\"app\"}"),
        "{m}"
    );

    // Also with a backend that announces the close.
    let backend = Backend::with(BackendOptions {
        close_after: Some(1),
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    for i in 0..30 {
        let a = post(&c, &gw.url("/api/close"), b"payload").await;
        assert_eq!(a.status, StatusCode::OK, "request {i}");
    }
}

#[tokio::test]
async fn budget_exhaustion_answers_at_the_budget_and_cancels_the_upstream_call() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &ONE_ROUTE.replace("budget: 2s", "budget: 300ms"),
        &backend.url(),
    )
    .await;
    let c = client();
    let a = get(&c, &gw.url("/api/slow?delay=5000")).await;
    a.assert_refusal("budget_exhausted");
    assert_eq!(a.json()["route"], "api");
    assert!(
        a.elapsed >= Duration::from_millis(290),
        "answered early: {:?}",
        a.elapsed
    );
    assert!(
        a.elapsed < Duration::from_secs(3),
        "answered late: {:?}",
        a.elapsed
    );
    // The backend's handler is dropped because its connection was closed.
    backend
        .wait_until("upstream connection closed", |s| {
            s.closed.load(Ordering::SeqCst) >= 1
        })
        .await;
    backend
        .wait_until("handler cancelled", |s| {
            s.cancelled.load(Ordering::SeqCst) >= 1
        })
        .await;
    assert_eq!(backend.count(|s| &s.completed), 0);
}

#[tokio::test]
async fn a_route_bound_to_a_host_takes_only_that_hosts_requests() {
    let backend = Backend::start().await;
    let yaml = r#"
upstreams:
  app:
    url: "{backend}"
  hosted:
    url: "{backend}/hosted"
routes:
  - name: hosted
    match: { path_prefix: /api, host: api.example.com }
    upstream: hosted
  - name: api
    match: { path_prefix: /api }
    upstream: app
"#;
    let gw = Gateway::start(yaml, &backend.url()).await;
    let c = client();
    let path_seen = |host: &'static str| {
        let c = c.clone();
        let url = gw.url("/api/x");
        let backend = &backend;
        async move {
            let req = Request::get(url)
                .header("host", host)
                .body(body(Bytes::new()))
                .unwrap();
            assert_eq!(send(&c, req).await.status, StatusCode::OK);
            backend.last_request().0
        }
    };
    assert_eq!(path_seen("API.example.com:8443").await, "/hosted/api/x");
    assert_eq!(path_seen("api.example.com").await, "/hosted/api/x");
    assert_eq!(path_seen("other.example.com").await, "/api/x");
}

#[tokio::test]
async fn a_small_answer_arriving_in_pieces_is_relayed_whole_or_cut_at_the_budget() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &ONE_ROUTE.replace("budget: 2s", "budget: 500ms"),
        &backend.url(),
    )
    .await;
    let c = client();
    // The head and the first of four pieces come at once, the rest when released: the gateway
    // reads on past what it found with the head.
    let url = gw.url("/api/pieces?size=400&chunks=4&length=1");
    let answer = {
        let c = c.clone();
        tokio::spawn(async move { get(&c, &url).await })
    };
    backend
        .wait_until("answer head sent", |s| {
            s.completed.load(Ordering::SeqCst) >= 1
        })
        .await;
    backend.release(1);
    let a = answer.await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "x".repeat(400));

    // Never released: the body's rest does not come within the budget.
    let a = get(&c, &gw.url("/api/pieces?size=400&chunks=4&length=1")).await;
    a.assert_refusal("budget_exhausted");
    assert!(
        a.elapsed >= Duration::from_millis(490),
        "answered early: {:?}",
        a.elapsed
    );
}

#[tokio::test]
async fn a_route_may_answer_504_on_budget_exhaustion() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &ONE_ROUTE.replace("budget: 2s", "budget: 100ms\n    timeout_status: 504"),
        &backend.url(),
    )
    .await;
    let a = get(&client(), &gw.url("/api/slow?delay=3000")).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.reason(), Some("budget_exhausted"));
}

#[tokio::test]
async fn unreachable_upstream_is_503_upstream_unavailable_at_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gw = Gateway::start(&ONE_ROUTE.replace("budget: 2s", "budget: 10s"), &dead).await;
    let a = get(&client(), &gw.url("/api/x")).await;
    a.assert_refusal("upstream_unavailable");
    assert!(a.elapsed < Duration::from_secs(2), "took {:?}", a.elapsed);
}

#[tokio::test]
async fn broken_upstream_answer_is_502() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let a = get(&client(), &gw.url("/api/x?reset=1")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{:?}", a.body);
    assert_eq!(a.reason(), Some("upstream_error"));
}

#[tokio::test]
async fn oversize_bodies_get_413_by_length_and_while_streaming() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let c = client();
    let a = post(&c, &gw.url("/api/up"), &[b'x'; 2048]).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.reason(), Some("payload_too_large"));
    assert_eq!(
        backend.count(|s| &s.requests),
        0,
        "refused before the upstream"
    );

    // Chunked, no length: refused once the stream passes the limit.
    let chunks = (0..8).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from(vec![b'y'; 512]))));
    let stream = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
    let a = send(&c, Request::post(gw.url("/api/up")).body(stream).unwrap()).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(backend.count(|s| &s.body_bytes) <= 1024);

    let a = post(&c, &gw.url("/api/up"), &[b'x'; 1024]).await;
    assert_eq!(a.status, StatusCode::OK, "exactly the limit is fine");
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn oversize_heads_get_431_and_malformed_requests_400() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let big = format!(
        "GET /api/x HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw(gw.addr, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    let out = raw(gw.addr, b"GARBAGE\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(
        gw.addr,
        b"GET /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert_eq!(backend.count(|s| &s.requests), 0);
}

#[tokio::test]
async fn slow_request_heads_are_cut_off_and_idle_keepalive_closed() {
    let backend = Backend::start().await;
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  header_read_timeout: 200ms\n  keepalive_timeout: 400ms\nadmin:\n  enabled: false\n{ONE_ROUTE}"
    );
    let gw = Gateway::start(&yaml, &backend.url()).await;

    // Half a head, then nothing: closed after the head timeout, without an answer.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the gateway")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(150));

    // A keep-alive connection survives longer than the head timeout while idle, then is closed
    // after the keep-alive timeout.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /api/x HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(250)).await;
    s.write_all(b"GET /api/x HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "idle past the head timeout but within keep-alive still works"
    );
    let start = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by the gateway")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(300));
}

/// Reads one answer (its head, and a `Content-Length` body) from a raw connection; returns the
/// head.
async fn read_answer(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0; length];
    s.read_exact(&mut body).await.unwrap();
    head
}

/// Idles a connection past the moment the gateway parks it (one second without a request).
async fn idle_until_parked(gw: &Gateway) {
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let text = gw.metrics().await;
    let parked: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("breakwater_connections_parked "))
        .expect("the parked gauge is exported")
        .parse()
        .unwrap();
    assert!(parked >= 1.0, "no connection parked after a second idle");
}

/// An idle HTTP/1 connection gives up its HTTP state and gets a fresh one with its next request:
/// nothing about that is visible to the caller. A head split across the wake-up, pipelined
/// requests, the framing guard and the head timer all work on a connection that was parked.
#[tokio::test]
async fn parked_idle_connections_serve_their_next_requests_as_before() {
    let backend = Backend::start().await;
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  header_read_timeout: 300ms\n  keepalive_timeout: 10s\nadmin:\n  listen: 127.0.0.1:0\n{ONE_ROUTE}"
    );
    let gw = Gateway::start(&yaml, &backend.url()).await;
    const GET: &[u8] = b"GET /api/x HTTP/1.1\r\nhost: a\r\n\r\n";
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert!(read_answer(&mut s).await.starts_with("http/1.1 200"));

    idle_until_parked(&gw).await;
    s.write_all(b"GET /api/y HTTP/1.1\r\nho").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"st: a\r\n\r\n").await.unwrap();
    let head = read_answer(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");

    idle_until_parked(&gw).await;
    s.write_all(&[GET, GET].concat()).await.unwrap();
    for _ in 0..2 {
        assert!(read_answer(&mut s).await.starts_with("http/1.1 200"));
    }

    idle_until_parked(&gw).await;
    s.write_all(b"POST /api/z HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let head = read_answer(&mut s).await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed after the refusal")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        backend.count(|s| &s.requests),
        4,
        "the refused request never went up"
    );

    // A head begun on a parked connection must still arrive within the head timeout.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(GET).await.unwrap();
    assert!(read_answer(&mut s).await.starts_with("http/1.1 200"));
    idle_until_parked(&gw).await;
    s.write_all(b"GET /api/x HTTP/1.1\r\n").await.unwrap();
    let start = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the gateway")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn large_bodies_stream_both_ways_without_being_buffered() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &ONE_ROUTE.replace("max_request_body: 1KiB", "max_request_body: 64MiB"),
        &backend.url(),
    )
    .await;
    let c = client();

    // Request: the backend sees the first chunk while the client still holds the rest back.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let stream = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
    let req = Request::post(gw.url("/api/upload")).body(stream).unwrap();
    let pending = tokio::spawn({
        let c = c.clone();
        async move { send(&c, req).await }
    });
    let first = backend.stats.first_body_chunk.notified();
    tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 1 << 20]))))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("first chunk reached the backend before the body was complete");
    for _ in 0..31 {
        tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 1 << 20]))))
            .await
            .unwrap();
    }
    drop(tx);
    let a = pending.await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(backend.count(|s| &s.body_bytes), 32 << 20);

    // Response: the first chunk arrives while the backend holds the rest back.
    let resp = c
        .get(
            gw.url("/api/download?size=33554432&chunks=32")
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk relayed before the backend finished")
        .unwrap()
        .unwrap();
    let mut total = frame.into_data().unwrap().len();
    backend.release(1);
    while let Some(f) = body.frame().await {
        total += f.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(total, 32 << 20);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn http2_clients_are_served() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let c: TestClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let a = get(&c, &gw.url("/api/h2")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(&a.body[..], b"ok");
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_on_any_request_of_a_connection() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let out = raw(
        gw.addr,
        b"POST /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-breakwater-reason: bad_request"), "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert!(out.contains("\"error\":\"bad_request\""), "{out}");

    // A valid chunked request with trailers, then the smuggling attempt on the same connection:
    // the first is answered, the second refused, and the backend only ever sees the first.
    let out = raw(
        gw.addr,
        b"POST /api/one HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n\
          GET /api/two HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 10\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 2, "{out}");
    assert!(out.contains("HTTP/1.1 400"), "{out}");
    assert_eq!(backend.count(|s| &s.requests), 1);
    assert_eq!(backend.count(|s| &s.body_bytes), 5);

    // Ordinary keep-alive traffic with bodies is untouched.
    let out = raw(
        gw.addr,
        b"POST /api/a HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabcGET /api/b HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
}

#[tokio::test]
async fn paths_are_normalised_so_a_prefix_cannot_be_bypassed() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        r#"
upstreams:
  app:
    url: "{backend}"
routes:
  - { name: public, upstream: app, match: { path_prefix: /public } }
  - { name: admin, upstream: app, match: { path_prefix: /admin }, max_request_body: 1KiB }
"#,
        &backend.url(),
    )
    .await;
    let c = client();
    for (sent, routed) in [
        ("/public/../admin/x", "/admin/x"),
        ("/public/%2e%2e/admin/x", "/admin/x"),
        ("//admin//x?q=%2F", "/admin/x?q=%2F"),
        ("/public/./%61bc", "/public/abc"),
    ] {
        let a = get(&c, &gw.url(sent)).await;
        assert_eq!(a.status, StatusCode::OK, "{sent}");
        let seen = backend.last_request().0;
        assert_eq!(seen, routed, "{sent} reached the backend as {seen}");
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"breakwater_requests_total{route="admin",method="GET",status="200"} 3"#),
        "{metrics}"
    );
    for refused in ["/public%2f..%2fadmin", "/public/%zz", "/a%00b"] {
        let a = get(&c, &gw.url(refused)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(a.reason(), Some("bad_request"));
    }
}

#[tokio::test]
async fn oversize_upstream_response_heads_are_502() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let a = get(&client(), &gw.url("/api/x?bighead=100000")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{:?}", a.body);
    assert_eq!(a.reason(), Some("upstream_error"));
    let a = get(&client(), &gw.url("/api/x?bighead=1000")).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn stalled_request_bodies_are_cut_off_with_408() {
    let backend = Backend::start().await;
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  body_read_timeout: 200ms\nadmin:\n  enabled: false\n{}",
        ONE_ROUTE.replace("max_request_body: 1KiB", "max_request_body: 4MiB")
    );
    let gw = Gateway::start(&yaml, &backend.url()).await;
    // A small body (read whole before admission) and a large one (streamed to the upstream).
    for declared in [100, 2 << 20] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /api/slow HTTP/1.1\r\nhost: a\r\ncontent-length: {declared}\r\n\r\n0123456789"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let start = tokio::time::Instant::now();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answered and closed")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 408"), "{declared}: {out}");
        assert!(out.contains("x-breakwater-reason: body_timeout"), "{out}");
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
    }
}

#[tokio::test]
async fn repeated_lengths_and_folded_headers_are_refused_and_the_connection_closed() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    for raw_request in [
        &b"POST /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc"[..],
        b"POST /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 3, 3\r\n\r\nabc",
        b"GET /api/x HTTP/1.1\r\nhost: a\r\nx-folded: one\r\n two\r\n\r\n",
    ] {
        let out = raw(gw.addr, raw_request).await;
        assert!(
            out.starts_with("HTTP/1.1 400"),
            "{:?}: {out}",
            String::from_utf8_lossy(raw_request)
        );
        // raw() reads to the end: the gateway closed the connection after its answer.
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
    }
    assert_eq!(backend.count(|s| &s.requests), 0);
}

#[tokio::test]
async fn upgrades_are_served_as_plain_requests_and_the_guard_checks_what_follows() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;

    // A WebSocket handshake, then a smuggling attempt on the same connection: the handshake is
    // answered as an ordinary request (no 101), the second is refused, and the backend only sees
    // the first, without the upgrade.
    let out = raw(
        gw.addr,
        b"GET /api/ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
          POST /api/two HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 2, "{out}");
    assert!(out.contains("HTTP/1.1 400"), "{out}");
    assert!(!out.contains("HTTP/1.1 101"), "{out}");
    assert_eq!(backend.count(|s| &s.requests), 1);
    {
        let seen = backend.stats.headers.lock().unwrap();
        let (uri, headers) = &seen[0];
        assert_eq!(uri, "/api/ws");
        assert!(headers.get("upgrade").is_none(), "{headers:?}");
        assert!(headers.get("connection").is_none(), "{headers:?}");
    }

    // h2c's upgrade (what `curl --http2` sends over plain HTTP) with a body, then an ordinary
    // request: both are served on the one connection.
    let out = raw(
        gw.addr,
        b"POST /api/h2c HTTP/1.1\r\nhost: a\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\n\
          http2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\ncontent-length: 5\r\n\r\nhello\
          GET /api/after HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    assert_eq!(backend.count(|s| &s.requests), 3);
}

#[tokio::test]
async fn connect_is_refused_with_400_and_the_connection_closed() {
    let backend = Backend::start().await;
    let gw = Gateway::start(ONE_ROUTE, &backend.url()).await;
    let out = raw(
        gw.addr,
        b"GET /api/first HTTP/1.1\r\nhost: a\r\n\r\n\
          CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n\
          POST /api/x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    // raw() reads to the end: nothing after the refusal is answered.
    assert_eq!(out.matches("HTTP/1.1 ").count(), 2, "{out}");
    let refusal = &out[out.find("HTTP/1.1 400").expect("CONNECT refused")..];
    assert!(refusal.contains("connection: close"), "{out}");
    assert!(
        refusal.contains("x-breakwater-reason: bad_request"),
        "{out}"
    );
    assert!(refusal.contains("CONNECT is not supported"), "{out}");
    assert_eq!(backend.count(|s| &s.requests), 1);
}

/// A connection keeps its place under `server.max_connections` until it closes: while one is
/// open (idle between requests) the next is not served; once it closes, the next is.
#[tokio::test]
async fn an_open_connection_holds_its_place_under_max_connections_until_it_closes() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &format!(
            "server:\n  listen: 127.0.0.1:0\n  max_connections: 1\nadmin:\n  enabled: false\n{ONE_ROUTE}"
        ),
        &backend.url(),
    )
    .await;
    let request = b"GET /api/one HTTP/1.1\r\nhost: gw\r\n\r\n";
    let mut first = TcpStream::connect(gw.addr).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "first connection served"
    );

    // The kernel completes the handshake (backlog); the gateway must not take the connection.
    let mut second = TcpStream::connect(gw.addr).await.unwrap();
    second.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a second connection was served while the first held the only place"
    );

    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("served once the first connection closed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}
