//! The connection against a scripted upstream on loopback: each test's peer reads what the
//! request should put on the wire and writes exactly the bytes the test wants, so framing,
//! reuse and every way an exchange can end are seen as a real socket delivers them. The codec's
//! own cases (every split of a head, every bad length) are in `codec/tests.rs`.

use std::os::fd::AsFd;
use std::time::Duration;

use http::StatusCode;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::*;
use crate::body::full;
use crate::scripted::Reader;
use crate::upstream::quickack::{AckPolicy, QuickAck};

/// Nothing set by the gateway: the request goes out as the test built it.
const NONE: Added<'static> = Added {
    forwarding: None,
    host: None,
    budget_ms: None,
};

/// Bounds a wait on the peer, so a test that goes wrong fails instead of hanging.
macro_rules! soon {
    ($fut:expr) => {
        tokio::time::timeout(Duration::from_secs(5), $fut)
            .await
            .unwrap_or_else(|_| panic!("nothing within 5 s: {}", stringify!($fut)))
    };
}

/// The scripted upstream's side of the connection.
struct Peer {
    wire: Reader<TcpStream>,
    /// The client's socket (a second descriptor of it), to see whether the client has read
    /// what was sent to it. Dropped once the client is to close: while it is open the socket
    /// is, whatever the client does.
    client: Option<std::net::TcpStream>,
}

impl std::ops::Deref for Peer {
    type Target = Reader<TcpStream>;
    fn deref(&self) -> &Self::Target {
        &self.wire
    }
}

impl std::ops::DerefMut for Peer {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.wire
    }
}

impl Peer {
    /// The next request head, blank line included.
    async fn head(&mut self) -> String {
        String::from_utf8(self.through(b"\r\n\r\n").await).expect("a head is text")
    }

    /// All the client sends until it closes the connection.
    async fn rest(&mut self) -> Vec<u8> {
        self.client = None;
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.wire.io.write_all(bytes).await.expect("peer write");
    }

    /// Writes `bytes` and waits until the client has read them, so that the next write
    /// reaches it in a read of its own.
    async fn piece(&mut self, bytes: &[u8]) {
        self.write(bytes).await;
        let client = self.client.as_ref().expect("the client's socket");
        let mut probe = [0u8; 1];
        let waiting =
            |r: &io::Result<usize>| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        // Until the bytes have arrived an empty queue says nothing. The client cannot read
        // them meanwhile: it runs on this thread.
        let since = std::time::Instant::now();
        while waiting(&client.peek(&mut probe)) {
            assert!(
                since.elapsed() < Duration::from_secs(2),
                "written bytes never arrived"
            );
            std::thread::yield_now();
        }
        while !waiting(&client.peek(&mut probe)) {
            tokio::task::yield_now().await;
        }
    }

    /// Ends the connection with a reset instead of a close.
    fn reset(self) {
        self.wire.io.set_zero_linger().expect("SO_LINGER");
    }
}

/// The connection under test, its idle watch's firings, and the upstream's script.
struct Upstream<T> {
    conn: Http1,
    fired: mpsc::UnboundedReceiver<()>,
    script: JoinHandle<T>,
}

async fn open<T, F, Fut>(script: F) -> Upstream<T>
where
    F: FnOnce(Peer) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (client, (server, _)) = (client.unwrap(), accepted.unwrap());
    // Nagle's algorithm on the peer would hold a small write until the last one is
    // acknowledged, and the client delays its ACKs: pieces would merge or wait 40 ms.
    server.set_nodelay(true).unwrap();
    let peek = std::net::TcpStream::from(client.as_fd().try_clone_to_owned().unwrap());
    let peer = Peer {
        wire: Reader::new(server, "client"),
        client: Some(peek),
    };
    let script = tokio::spawn(script(peer));
    let (tx, fired) = mpsc::unbounded_channel();
    let conn = Http1::new(
        Stream::Plain(QuickAck::new(client, Arc::new(AckPolicy::default()))),
        IdleWatch::new(move || {
            let _ = tx.send(());
        }),
    );
    Upstream {
        conn,
        fired,
        script,
    }
}

fn get(target: &str) -> Request<RequestBody> {
    Request::get(target)
        .header("host", "upstream.test")
        .body(full(Bytes::new()))
        .unwrap()
}

/// A body fed through a channel, a data frame per message; it ends when the sender is dropped.
fn channel_body() -> (mpsc::UnboundedSender<Bytes>, RequestBody) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|piece| piece.map(|p| Ok::<_, BoxError>(Frame::data(p))))
    });
    (tx, StreamBody::new(frames).boxed_unsync())
}

/// A body all of whose frames are ready at once, but whose length is not known up front.
fn ready_body(pieces: &[&'static str]) -> RequestBody {
    let frames: Vec<Result<_, BoxError>> = pieces
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from(*p))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

fn answered(sent: Result<Response<Framing>, SendError>) -> Response<Framing> {
    match sent {
        Ok(resp) => resp,
        Err(SendError::NotWritten { error, .. }) => panic!("not written: {error}"),
        Err(SendError::Written { error, unanswered }) => {
            panic!("failed (unanswered: {unanswered}): {error}")
        }
    }
}

fn expect_written(sent: Result<Response<Framing>, SendError>) -> (ExchangeError, bool) {
    match sent {
        Err(SendError::Written { error, unanswered }) => (error, unanswered),
        Err(SendError::NotWritten { error, .. }) => panic!("not written: {error}"),
        Ok(resp) => panic!("answered: {}", resp.status()),
    }
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("text")
}

/// One complete exchange whose answer is `ok` with a length, leaving the connection idle.
async fn exchange_ok(conn: &mut Http1) {
    let sent = soon!(conn.send(get("/"), &NONE));
    read_ok(conn, sent).await;
}

/// `sent` was answered `OK`, whose body reads whole and leaves the connection fit for another.
async fn read_ok(conn: &mut Http1, sent: Result<Response<Framing>, SendError>) {
    assert_eq!(*answered(sent).body(), Framing::Length(2));
    assert_eq!(soon!(conn.read_whole(2)).unwrap(), "ok");
    assert!(conn.reusable());
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn a_connection_carries_two_exchanges_one_after_the_other() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let first = peer.head().await;
        peer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nfirst",
        )
        .await;
        let second = peer.head().await;
        peer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 6\r\n\r\nsecond")
            .await;
        (first, second, peer.rest().await)
    })
    .await;

    let req = Request::get("/path?q=1")
        .header("host", "upstream.test")
        .header("X-Trace", "abc")
        .body(full(Bytes::new()))
        .unwrap();
    let resp = answered(soon!(conn.send(req, &NONE)));
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(*resp.body(), Framing::Length(5));
    // The answer came in one write, so its body came with its head.
    assert_eq!(conn.take_whole(5).expect("buffered with the head"), "first");
    assert!(conn.reusable());
    // Back to the pool and out of it again, as the pool does between exchanges.
    assert!(conn.watch_idle());
    assert!(conn.still_open());

    // An absolute URI still goes out in origin form.
    let req = Request::get("http://upstream.test/second")
        .header("host", "upstream.test")
        .body(full(Bytes::new()))
        .unwrap();
    let resp = answered(soon!(conn.send(req, &NONE)));
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(*resp.body(), Framing::Length(6));
    assert_eq!(soon!(conn.read_whole(6)).unwrap(), "second");
    assert!(conn.reusable());
    drop(conn);

    let (first, second, after) = soon!(script).unwrap();
    assert_eq!(
        first,
        "GET /path?q=1 HTTP/1.1\r\nhost: upstream.test\r\nx-trace: abc\r\n\r\n"
    );
    assert_eq!(
        second,
        "GET /second HTTP/1.1\r\nhost: upstream.test\r\n\r\n"
    );
    assert!(after.is_empty(), "sent after the heads: {after:?}");
}

#[tokio::test]
async fn whole_request_bodies_go_out_with_their_length_small_or_large() {
    // Past the size that goes in one write with the head.
    let large: Bytes = (0..100_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let expected = large.clone();
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let small_head = peer.head().await;
        let small = peer.take(7).await;
        peer.write(OK).await;
        let large_head = peer.head().await;
        let large = peer.take(100_000).await;
        peer.write(OK).await;
        (small_head, small, large_head, large, peer.rest().await)
    })
    .await;

    let req = Request::post("/submit")
        .header("content-type", "application/json")
        .body(full(Bytes::from_static(b"{\"a\":1}")))
        .unwrap();
    answered(soon!(conn.send(req, &NONE)));
    assert_eq!(soon!(conn.read_whole(2)).unwrap(), "ok");
    let req = Request::put("/blob").body(full(large)).unwrap();
    answered(soon!(conn.send(req, &NONE)));
    assert_eq!(soon!(conn.read_whole(2)).unwrap(), "ok");
    assert!(conn.reusable());
    drop(conn);

    let (small_head, small, large_head, large, after) = soon!(script).unwrap();
    assert_eq!(
        small_head,
        "POST /submit HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n"
    );
    assert_eq!(small, b"{\"a\":1}");
    assert_eq!(
        large_head,
        "PUT /blob HTTP/1.1\r\ncontent-length: 100000\r\n\r\n"
    );
    assert!(large == expected, "the large body arrived altered");
    assert!(after.is_empty(), "sent past the bodies: {after:?}");
}

#[tokio::test]
async fn a_streaming_body_of_unknown_length_goes_chunked_as_it_arrives() {
    let (head_seen, head_seen_rx) = oneshot::channel();
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let head = peer.head().await;
        let first = peer.take(b"5\r\nhello\r\n".len()).await;
        head_seen.send(()).unwrap();
        let rest = peer.through(b"0\r\n\r\n").await;
        peer.write(OK).await;
        (head, first, rest, peer.rest().await)
    })
    .await;

    let (tx, body) = channel_body();
    tx.send("hello".into()).unwrap();
    let req = Request::post("/upload").body(body).unwrap();
    // The rest of the body exists only once the upstream has the head and the first chunk:
    // the request must not wait for its body's end.
    let feed = async move {
        head_seen_rx.await.unwrap();
        tx.send(" ".into()).unwrap();
        tx.send("world".into()).unwrap();
    };
    let (sent, ()) = soon!(async { tokio::join!(conn.send(req, &NONE), feed) });
    read_ok(&mut conn, sent).await;
    drop(conn);

    let (head, first, rest, after) = soon!(script).unwrap();
    assert_eq!(
        head,
        "POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    assert_eq!(text(&first), "5\r\nhello\r\n");
    assert_eq!(text(&rest), "1\r\n \r\n5\r\nworld\r\n0\r\n\r\n");
    assert!(after.is_empty(), "sent past the last chunk: {after:?}");
}

#[tokio::test]
async fn a_streaming_body_with_a_declared_length_goes_with_that_length_not_chunked() {
    let (head_seen, head_seen_rx) = oneshot::channel();
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let head = peer.head().await;
        let first = peer.take(5).await;
        head_seen.send(()).unwrap();
        let second = peer.take(6).await;
        peer.write(OK).await;
        (head, first, second, peer.rest().await)
    })
    .await;

    let (tx, body) = channel_body();
    tx.send("hello".into()).unwrap();
    let req = Request::put("/upload")
        .header("content-type", "text/plain")
        .header("content-length", "11")
        .body(body)
        .unwrap();
    let feed = async move {
        head_seen_rx.await.unwrap();
        tx.send(" world".into()).unwrap();
    };
    let (sent, ()) = soon!(async { tokio::join!(conn.send(req, &NONE), feed) });
    read_ok(&mut conn, sent).await;
    drop(conn);

    let (head, first, second, after) = soon!(script).unwrap();
    assert_eq!(
        head,
        "PUT /upload HTTP/1.1\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\n"
    );
    assert_eq!(text(&first), "hello");
    assert_eq!(text(&second), " world");
    assert!(after.is_empty(), "sent past the declared length: {after:?}");
}

#[tokio::test]
async fn a_streaming_body_longer_than_its_declared_length_fails_before_the_excess_goes_out() {
    let (head_seen, head_seen_rx) = oneshot::channel();
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let head = peer.head().await;
        let first = peer.take(3).await;
        head_seen.send(()).unwrap();
        (head, first, peer.rest().await)
    })
    .await;

    let (tx, body) = channel_body();
    tx.send("abc".into()).unwrap();
    let req = Request::put("/upload")
        .header("content-length", "4")
        .body(body)
        .unwrap();
    let feed = async move {
        head_seen_rx.await.unwrap();
        tx.send("de".into()).unwrap();
        tx
    };
    let (sent, _tx) = soon!(async { tokio::join!(conn.send(req, &NONE), feed) });
    let (error, unanswered) = expect_written(sent);
    assert!(matches!(error, ExchangeError::RequestLength), "{error}");
    assert!(unanswered);
    assert!(conn.is_spent());
    drop(conn);

    let (head, first, after) = soon!(script).unwrap();
    assert_eq!(head, "PUT /upload HTTP/1.1\r\ncontent-length: 4\r\n\r\n");
    assert_eq!(text(&first), "abc");
    assert!(
        after.is_empty(),
        "the excess reached the upstream: {after:?}"
    );
}

#[tokio::test]
async fn a_streaming_body_shorter_than_its_declared_length_fails() {
    let (head_seen, head_seen_rx) = oneshot::channel();
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        let first = peer.take(3).await;
        head_seen.send(()).unwrap();
        (first, peer.rest().await)
    })
    .await;

    let (tx, body) = channel_body();
    tx.send("abc".into()).unwrap();
    let req = Request::put("/upload")
        .header("content-length", "10")
        .body(body)
        .unwrap();
    let feed = async move {
        head_seen_rx.await.unwrap();
        drop(tx);
    };
    let (sent, ()) = soon!(async { tokio::join!(conn.send(req, &NONE), feed) });
    let (error, unanswered) = expect_written(sent);
    assert!(matches!(error, ExchangeError::RequestLength), "{error}");
    assert!(unanswered);
    assert!(conn.is_spent());
    drop(conn);
    let (first, after) = soon!(script).unwrap();
    assert_eq!(text(&first), "abc");
    assert!(after.is_empty());
}

#[tokio::test]
async fn a_ready_body_that_disagrees_with_its_declared_length_fails_without_a_byte_sent() {
    for (pieces, declared) in [(&["abc", "de"][..], "4"), (&["abc"][..], "10")] {
        let Upstream {
            mut conn, script, ..
        } = open(|mut peer| async move { peer.rest().await }).await;
        let req = Request::put("/upload")
            .header("content-length", declared)
            .body(ready_body(pieces))
            .unwrap();
        let (error, unanswered) = expect_written(soon!(conn.send(req, &NONE)));
        assert!(matches!(error, ExchangeError::RequestLength), "{error}");
        assert!(unanswered);
        assert!(conn.is_spent());
        drop(conn);
        let sent = soon!(script).unwrap();
        assert!(sent.is_empty(), "sent {:?}", String::from_utf8_lossy(&sent));
    }
}

#[tokio::test]
async fn a_request_body_that_fails_fails_the_exchange() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let head = peer.head().await;
        (head, peer.rest().await)
    })
    .await;
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"abc"))),
        Err("the client went away".into()),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    let req = Request::post("/upload").body(body).unwrap();
    let (error, unanswered) = expect_written(soon!(conn.send(req, &NONE)));
    assert!(matches!(error, ExchangeError::RequestBody(_)), "{error}");
    assert!(unanswered);
    assert!(conn.is_spent());
    drop(conn);
    let (head, after) = soon!(script).unwrap();
    assert_eq!(
        head,
        "POST /upload HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    // Never ended with a last chunk: the upstream cannot take the cut body for a whole one.
    assert_eq!(text(&after), "3\r\nabc\r\n");
}

#[tokio::test]
async fn an_answer_before_the_request_body_ended_spends_the_connection() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.take(b"5\r\nhello\r\n".len()).await;
        peer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
            .await;
        peer.rest().await
    })
    .await;
    let (tx, body) = channel_body();
    tx.send("hello".into()).unwrap();
    let req = Request::post("/upload").body(body).unwrap();
    let resp = answered(soon!(conn.send(req, &NONE)));
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The rest of the body was never sent: the upstream would read the next request as it.
    assert!(conn.is_spent());
    assert!(!conn.reusable());
    drop((conn, tx));
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_upstream_that_answers_and_stops_reading_the_body_is_still_heard() {
    let (tx, body) = channel_body();
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n")
            .await;
        drop(peer);
        // Body the client is given only now, so that it writes to the closed connection
        // before it looks for the answer: its writes fail (on Linux loopback the megabyte
        // meets a broken pipe), and the answer waiting behind them must still be read.
        tx.send("0123456789".into()).unwrap();
        tx.send(vec![b'x'; 1 << 20].into()).unwrap();
        tx
    })
    .await;
    let req = Request::post("/upload").body(body).unwrap();
    let resp = answered(soon!(conn.send(req, &NONE)));
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(conn.is_spent());
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_answer_head_arriving_in_pieces_parses_as_if_whole() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        for piece in [
            &b"HTT"[..],
            b"P/1.1 200 OK\r",
            b"\ncontent-type: text/plain\r\nconte",
            b"nt-length: 4\r\n",
            b"\r",
            b"\nbo",
            b"dy",
        ] {
            peer.piece(piece).await;
        }
        peer.rest().await
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.headers().len(), 2);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(resp.headers()["content-length"], "4");
    assert_eq!(*resp.body(), Framing::Length(4));
    assert_eq!(soon!(conn.read_whole(4)).unwrap(), "body");
    assert!(conn.reusable());
    drop(conn);
    soon!(script).unwrap();
}

#[tokio::test]
async fn a_chunked_answer_is_handed_on_piece_by_piece_and_leaves_the_connection_reusable() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        for piece in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nWi"[..],
            b"ki\r\n5\r",
            b"\npedia\r\n0\r\n",
            b"\r\n",
        ] {
            peer.piece(piece).await;
        }
        peer.head().await;
        peer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-checksum: 1\r\n\r\n")
            .await;
        peer.rest().await
    })
    .await;

    let resp = answered(soon!(conn.send(get("/wiki"), &NONE)));
    assert_eq!(*resp.body(), Framing::Chunked);
    let mut decoder = Decoder::new(*resp.body());
    let mut pieces = Vec::new();
    while let Some(piece) = soon!(poll_fn(|cx| conn.poll_body(&mut decoder, cx))) {
        pieces.push(piece.unwrap());
    }
    // Each piece as it arrived, not the body gathered.
    assert_eq!(pieces, ["Wi", "ki", "pedia"]);
    assert!(decoder.is_done());
    assert!(conn.reusable());

    // Trailers are read and dropped; the connection is clear for the next exchange.
    let resp = answered(soon!(conn.send(get("/again"), &NONE)));
    let body = soon!(conn.collect(*resp.body(), 1024)).unwrap();
    assert_eq!(body, "abc");
    assert!(conn.reusable());
    drop(conn);
    soon!(script).unwrap();
}

#[tokio::test]
async fn a_close_delimited_answer_reads_to_the_end_and_spends_the_connection() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.piece(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
            .await;
        peer.write(b"the end").await;
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    assert_eq!(*resp.body(), Framing::Close);
    assert!(
        conn.is_spent(),
        "no length: the connection can carry nothing after it"
    );
    let body = soon!(conn.collect(*resp.body(), 1024)).unwrap();
    assert_eq!(body, "until the end");
    assert!(conn.is_spent());
    assert!(!conn.reusable());
    assert!(!conn.watch_idle());
    soon!(script).unwrap();
}

#[tokio::test]
async fn collect_refuses_a_body_over_its_limit_and_spends_the_connection() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world")
            .await;
        peer.rest().await
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    let error = soon!(conn.collect(*resp.body(), 10)).unwrap_err();
    assert!(matches!(error, ExchangeError::Io(_)), "{error}");
    assert!(conn.is_spent());
    drop(conn);
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_answer_to_head_has_no_body_whatever_its_length_says() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        let head = peer.head().await;
        peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
            .await;
        peer.head().await;
        peer.write(OK).await;
        (head, peer.rest().await)
    })
    .await;
    let req = Request::head("/big").body(full(Bytes::new())).unwrap();
    let resp = answered(soon!(conn.send(req, &NONE)));
    assert_eq!(*resp.body(), Framing::Empty);
    assert_eq!(resp.headers()["content-length"], "100");
    assert!(conn.reusable());
    exchange_ok(&mut conn).await;
    drop(conn);
    let (head, _) = soon!(script).unwrap();
    assert_eq!(head, "HEAD /big HTTP/1.1\r\n\r\n");
}

#[tokio::test]
async fn bytes_after_a_complete_answer_make_the_connection_unfit_for_another() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        // One write: the junk byte arrives with the answer.
        peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokX")
            .await;
        peer.rest().await
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    assert_eq!(*resp.body(), Framing::Length(2));
    assert_eq!(conn.take_whole(2).expect("buffered with the head"), "ok");
    assert!(!conn.reusable());
    drop(conn);
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_answer_with_both_a_length_and_chunked_coding_spends_the_connection() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        peer.rest().await
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    assert_eq!(*resp.body(), Framing::Chunked);
    assert!(resp.headers().get("content-length").is_none());
    assert!(conn.is_spent());
    let body = soon!(conn.collect(*resp.body(), 1024)).unwrap();
    assert_eq!(body, "abc");
    assert!(!conn.reusable());
    assert!(!conn.watch_idle());
    drop(conn);
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_upstream_that_ends_the_connection_without_answering_leaves_the_request_unanswered() {
    for reset in [false, true] {
        let Upstream {
            mut conn, script, ..
        } = open(move |mut peer| async move {
            peer.head().await;
            if reset {
                peer.reset();
            }
        })
        .await;
        let (error, unanswered) = expect_written(soon!(conn.send(get("/"), &NONE)));
        assert!(unanswered, "reset: {reset}: {error}");
        assert!(error.closed_before_answer(), "reset: {reset}: {error}");
        if !reset {
            assert!(matches!(error, ExchangeError::Closed), "{error}");
        }
        assert!(conn.is_spent());
        soon!(script).unwrap();
    }
}

#[tokio::test]
async fn an_upstream_that_closes_inside_the_answers_head_has_answered() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(b"HTTP/1.1 200 OK\r\ncontent-le").await;
    })
    .await;
    let (error, unanswered) = expect_written(soon!(conn.send(get("/"), &NONE)));
    assert!(!unanswered, "{error}");
    assert!(
        matches!(&error, ExchangeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
        "{error}"
    );
    assert!(conn.is_spent());
    soon!(script).unwrap();
}

#[tokio::test]
async fn a_known_length_body_cut_short_is_truncated() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
            .await;
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    assert_eq!(*resp.body(), Framing::Length(10));
    let error = soon!(conn.read_whole(10)).unwrap_err();
    assert!(
        matches!(error, ExchangeError::Malformed(Malformed::Truncated(7))),
        "{error}"
    );
    assert!(conn.is_spent());
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closes_wakes_its_watch_and_is_not_open() {
    let (close, close_rx) = oneshot::channel::<()>();
    let Upstream {
        mut conn,
        mut fired,
        script,
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(OK).await;
        close_rx.await.unwrap();
    })
    .await;
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    assert!(
        fired.try_recv().is_err(),
        "fired before the upstream closed"
    );
    close.send(()).unwrap();
    soon!(fired.recv()).expect("the watch fired");
    assert!(!conn.still_open());
    assert!(fired.try_recv().is_err(), "the watch fired twice");
    assert!(conn.is_spent());
    assert!(!conn.watch_idle());
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_idle_connection_left_alone_stays_open_and_carries_another_request() {
    let Upstream {
        mut conn,
        mut fired,
        script,
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(OK).await;
        peer.head().await;
        peer.write(OK).await;
        peer.rest().await
    })
    .await;
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    let woke = tokio::time::timeout(Duration::from_millis(50), fired.recv()).await;
    assert!(woke.is_err(), "the watch fired on a silent connection");
    assert!(conn.still_open());
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    drop(conn);
    soon!(script).unwrap();
}

#[tokio::test]
async fn an_idle_connection_the_upstream_writes_to_unasked_is_not_open() {
    let (write, write_rx) = oneshot::channel::<()>();
    let Upstream {
        mut conn,
        mut fired,
        script,
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(OK).await;
        write_rx.await.unwrap();
        peer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await;
        // Handed back, so that it stays open: the watch must wake for the bytes, not a close.
        peer
    })
    .await;
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    write.send(()).unwrap();
    soon!(fired.recv()).expect("the watch fired");
    assert!(!conn.still_open());
    assert!(conn.is_spent());
    drop(conn);
    let _peer = soon!(script).unwrap();
}

#[tokio::test]
async fn a_request_sent_after_the_upstream_closed_an_idle_connection_is_unanswered() {
    let (close, close_rx) = oneshot::channel::<()>();
    let Upstream {
        mut conn,
        mut fired,
        script,
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(OK).await;
        close_rx.await.unwrap();
    })
    .await;
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    close.send(()).unwrap();
    soon!(fired.recv()).expect("the watch fired");
    soon!(script).unwrap();
    // The keep-alive race lost: the pool handed the connection out before it saw the close.
    // Half-closed, the socket still takes the request; the end of the stream is the answer.
    let (error, unanswered) = expect_written(soon!(conn.send(get("/"), &NONE)));
    assert!(unanswered, "{error}");
    assert!(error.closed_before_answer(), "{error}");
}

#[tokio::test]
async fn a_request_sent_on_a_connection_the_upstream_reset_goes_back_whole_or_unanswered() {
    let (reset, reset_rx) = oneshot::channel::<()>();
    let Upstream {
        mut conn,
        mut fired,
        script,
    } = open(|mut peer| async move {
        peer.head().await;
        peer.write(OK).await;
        reset_rx.await.unwrap();
        peer.reset();
    })
    .await;
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    reset.send(()).unwrap();
    soon!(fired.recv()).expect("the watch fired");
    soon!(script).unwrap();

    let req = Request::post("/orders?id=7")
        .header("content-type", "application/json")
        .body(full(Bytes::from_static(b"{\"qty\":2}")))
        .unwrap();
    match soon!(conn.send(req, &NONE)) {
        Err(SendError::NotWritten { error, request }) => {
            println!("the reset connection refused the request's first write: {error}");
            assert_eq!(*request.method(), Method::POST);
            assert_eq!(request.uri(), "/orders?id=7");
            assert_eq!(request.headers()["content-type"], "application/json");
            let body = soon!(request.into_body().collect()).unwrap().to_bytes();
            assert_eq!(body, "{\"qty\":2}");
        }
        Err(SendError::Written { error, unanswered }) => {
            println!("the reset connection took the request's first write: {error}");
            assert!(unanswered, "{error}");
            assert!(error.closed_before_answer(), "{error}");
        }
        Ok(resp) => panic!("answered on a reset connection: {}", resp.status()),
    }
    assert!(conn.is_spent());
}

#[tokio::test]
async fn informational_answers_before_the_final_one_are_skipped() {
    let Upstream {
        mut conn, script, ..
    } = open(|mut peer| async move {
        peer.head().await;
        peer.piece(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        peer.piece(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
            .await;
        peer.write(OK).await;
        peer.rest().await
    })
    .await;
    let resp = answered(soon!(conn.send(get("/"), &NONE)));
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("link").is_none());
    assert_eq!(soon!(conn.read_whole(2)).unwrap(), "ok");
    assert!(conn.reusable());
    drop(conn);
    soon!(script).unwrap();
}

/// A TLS connection to a peer serving `OK` to each request until it reads `close`, then
/// ending the session (close_notify, then FIN). TLS 1.3 peers send session tickets after the
/// handshake, bytes that arrive while the connection may sit idle in the pool.
async fn open_tls() -> (Http1, mpsc::UnboundedReceiver<()>, oneshot::Sender<()>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (close, closing) = oneshot::channel::<()>();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut closing = std::pin::pin!(closing);
        let mut seen = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            tokio::select! {
                read = tls.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        seen.extend_from_slice(&chunk[..n]);
                        while let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..at + 4);
                            tls.write_all(OK).await.unwrap();
                        }
                    }
                },
                _ = &mut closing => {
                    let _ = tls.shutdown().await;
                    return;
                }
            }
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, QuickAck::new(tcp, Arc::new(AckPolicy::default())))
        .await
        .unwrap();
    let (tx, fired) = mpsc::unbounded_channel();
    let conn = Http1::new(
        Stream::Tls(Box::new(tls)),
        IdleWatch::new(move || {
            let _ = tx.send(());
        }),
    );
    (conn, fired, close)
}

#[tokio::test]
async fn a_tls_connection_stays_open_through_session_tickets_and_is_seen_closing() {
    let (mut conn, mut fired, close) = open_tls().await;
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());
    // Whatever the peer sent after the handshake (its session tickets, if the first answer's
    // read did not take them) is TLS's own: it may wake the watch, but the connection is still
    // open and carries the next request.
    let _ = tokio::time::timeout(Duration::from_millis(50), fired.recv()).await;
    assert!(conn.still_open(), "a session ticket is not a close");
    exchange_ok(&mut conn).await;
    assert!(conn.watch_idle());

    close.send(()).unwrap();
    soon!(fired.recv()).expect("the watch fired");
    assert!(!conn.still_open(), "close_notify and FIN seen");
}
