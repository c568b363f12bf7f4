//! What an upstream sends, read by the gateway's own HTTP/1.1 client: answers split at every
//! byte, bad framing, heads too large, bodies cut short, bytes nobody asked for. Each is relayed
//! exactly or answered 502 — never a panic, a hang, or a pooled connection left out of step for
//! the next request. The upstream here is a scripted socket, not an HTTP library, so it can send
//! what no well-behaved server would.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One scripted answer: its bytes, written `piece` bytes at a time, then the connection kept
/// for the next request or closed.
struct Scripted {
    bytes: Vec<u8>,
    piece: usize,
    close: bool,
}

fn answer(bytes: &[u8]) -> Scripted {
    Scripted {
        bytes: bytes.to_vec(),
        piece: usize::MAX,
        close: false,
    }
}

impl Scripted {
    fn in_pieces(mut self, piece: usize) -> Self {
        self.piece = piece;
        self
    }

    fn then_close(mut self) -> Self {
        self.close = true;
        self
    }
}

/// An upstream that answers each request with the next scripted answer, and counts the
/// connections it accepted and the request heads it read.
#[derive(Clone)]
struct Upstream {
    addr: std::net::SocketAddr,
    script: Arc<Mutex<VecDeque<Scripted>>>,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            addr: listener.local_addr().unwrap(),
            script: Arc::default(),
            connections: Arc::default(),
            heads: Arc::default(),
        };
        let serving = up.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serving.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serving.clone().serve(stream));
            }
        });
        up
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn push(&self, s: Scripted) {
        self.script.lock().unwrap().push_back(s);
    }

    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            // A request head, and its body when it says how long it is.
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut more = [0u8; 4096];
                match stream.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&more[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + len {
                let mut more = [0u8; 4096];
                match stream.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&more[..n]),
                }
            }
            buf.drain(..end + len);
            self.heads.lock().unwrap().push(head);
            let Some(s) = self.script.lock().unwrap().pop_front() else {
                return;
            };
            for piece in s.bytes.chunks(s.piece.max(1)) {
                if stream.write_all(piece).await.is_err() {
                    return;
                }
                let _ = stream.flush().await;
                if s.piece != usize::MAX {
                    tokio::task::yield_now().await;
                }
            }
            if s.close {
                return;
            }
        }
    }
}

const GATEWAY: &str = r#"
upstreams:
  app:
    url: "{backend}"
    pool: { max_connections: 4, min_idle: 0 }
routes:
  - name: r
    match: { path_prefix: / }
    upstream: app
    budget: 2s
"#;

async fn post(c: &TestClient, url: &str) -> Answer {
    let req = http::Request::post(url)
        .body(body(bytes::Bytes::from_static(b"payload")))
        .unwrap();
    send(c, req).await
}

async fn setup() -> (Upstream, Gateway, TestClient) {
    let up = Upstream::start().await;
    let gw = Gateway::start(GATEWAY, &up.url()).await;
    (up, gw, client())
}

const OK_5: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-app: yes\r\n\r\nhello";

#[tokio::test]
async fn keep_alive_connections_carry_one_exchange_after_another() {
    let (up, gw, c) = setup().await;
    for _ in 0..3 {
        up.push(answer(OK_5));
        let a = get(&c, &gw.url("/x")).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(&a.body[..], b"hello");
        assert_eq!(a.header("x-app"), Some("yes"));
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    let heads = up.heads.lock().unwrap().clone();
    assert!(heads[0].starts_with("get /x http/1.1\r\n"), "{}", heads[0]);
    assert!(
        !heads[0].contains("content-length"),
        "a GET says nothing of a body"
    );
}

#[tokio::test]
async fn answers_arriving_a_byte_at_a_time_are_relayed_whole() {
    let (up, gw, c) = setup().await;
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
    for bytes in [OK_5, &chunked[..]] {
        up.push(answer(bytes).in_pieces(1));
        let a = get(&c, &gw.url("/split")).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.starts_with(b"hello"), "{:?}", a.body);
    }
    up.push(answer(OK_5));
    assert_eq!(get(&c, &gw.url("/after")).await.status, StatusCode::OK);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "both framings left the connection in step"
    );
}

#[tokio::test]
async fn informational_heads_are_skipped_and_a_head_answer_has_no_body() {
    let (up, gw, c) = setup().await;
    up.push(answer(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    ));
    let a = get(&c, &gw.url("/hints")).await;
    assert_eq!((a.status, &a.body[..]), (StatusCode::OK, &b"hello"[..]));
    // The length of the body a GET would have had, and no body.
    up.push(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"));
    let req = http::Request::head(gw.url("/head"))
        .body(body(bytes::Bytes::new()))
        .unwrap();
    let a = send(&c, req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.is_empty());
    up.push(answer(OK_5));
    assert_eq!(get(&c, &gw.url("/after")).await.status, StatusCode::OK);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_framing_is_a_502_and_its_connection_is_not_used_again() {
    let (up, gw, c) = setup().await;
    let bad: [&[u8]; 6] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SMTP ready\r\n\r\n",
    ];
    for (i, bytes) in bad.iter().enumerate() {
        // The one that stops short closes, as a crashing upstream would.
        let s = if i == 2 {
            answer(bytes).then_close()
        } else {
            answer(bytes)
        };
        up.push(s);
        let a = post(&c, &gw.url("/bad")).await;
        assert_eq!(
            a.status,
            StatusCode::BAD_GATEWAY,
            "answer {i}: {:?}",
            a.body
        );
        assert_eq!(a.reason(), Some("upstream_error"), "answer {i}");
    }
    up.push(answer(OK_5));
    assert_eq!(get(&c, &gw.url("/after")).await.status, StatusCode::OK);
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        bad.len() + 1,
        "every connection that sent bad framing was closed"
    );
}

#[tokio::test]
async fn a_head_too_large_is_a_502() {
    let (up, gw, c) = setup().await;
    let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..2000 {
        huge.extend_from_slice(format!("x-filler-{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    huge.extend_from_slice(b"content-length: 0\r\n\r\n");
    up.push(answer(&huge).in_pieces(8192));
    let a = post(&c, &gw.url("/huge")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn a_length_beside_chunked_is_read_as_chunked_and_the_connection_closed_after() {
    let (up, gw, c) = setup().await;
    up.push(answer(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ));
    let a = get(&c, &gw.url("/smuggle")).await;
    assert_eq!((a.status, &a.body[..]), (StatusCode::OK, &b"hello"[..]));
    up.push(answer(OK_5));
    assert_eq!(get(&c, &gw.url("/after")).await.status, StatusCode::OK);
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bytes_after_an_answer_or_a_body_read_to_close_leave_no_connection_behind() {
    let (up, gw, c) = setup().await;
    // Something nobody asked for after a complete answer.
    up.push(answer(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n",
    ));
    let a = get(&c, &gw.url("/extra")).await;
    assert_eq!((a.status, &a.body[..]), (StatusCode::OK, &b"hello"[..]));
    // A body that ends when the upstream closes.
    up.push(answer(b"HTTP/1.1 200 OK\r\n\r\nuntil the end").then_close());
    let a = get(&c, &gw.url("/close")).await;
    assert_eq!(
        (a.status, &a.body[..]),
        (StatusCode::OK, &b"until the end"[..])
    );
    up.push(answer(OK_5));
    assert_eq!(get(&c, &gw.url("/after")).await.status, StatusCode::OK);
    assert_eq!(up.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_post_body_goes_out_with_its_length() {
    let (up, gw, c) = setup().await;
    up.push(answer(OK_5));
    let a = post(&c, &gw.url("/post")).await;
    assert_eq!(a.status, StatusCode::OK);
    let head = up.heads.lock().unwrap()[0].clone();
    assert!(head.starts_with("post /post http/1.1\r\n"), "{head}");
    assert!(head.contains("content-length: 7\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
}
