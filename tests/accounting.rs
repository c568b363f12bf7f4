//! Every request is accounted for exactly once, whatever ends it: one access-log line, one count
//! in `breakwater_requests_total`, its admission slot and its connection's in-flight count back.
//! Callers leave while queued, while the upstream works, and while the answer is being relayed,
//! over HTTP/1.1 and h2; a caller that stops reading loses its connection at the budget.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing_subscriber::layer::SubscriberExt;

/// Access-log lines seen by this test binary, as field maps.
type Lines = Arc<Mutex<Vec<HashMap<String, String>>>>;

struct Capture(Lines);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "breakwater::access" {
            return;
        }
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().push(fields);
    }
}

fn lines() -> Lines {
    static LINES: OnceLock<Lines> = OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Lines::default();
            let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
            tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
            lines
        })
        .clone()
}

/// The access-log lines of one route.
fn lines_of(route: &str) -> Vec<HashMap<String, String>> {
    lines()
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.get("route").map(String::as_str) == Some(route))
        .cloned()
        .collect()
}

/// The value of one sample in the Prometheus text, 0 when absent.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Polls `f` until it holds (at most 10 s): the end of an abandoned request is seen by the
/// gateway asynchronously, when it notices the closed connection.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn config(route: &str, concurrency: usize) -> String {
    format!(
        r#"
server:
  listen: 127.0.0.1:0
  keepalive_timeout: 300ms
admin:
  listen: 127.0.0.1:0
upstreams:
  app:
    url: "{{backend}}"
    pool: {{ max_connections: 32, min_idle: 1 }}
routes:
  - name: {route}
    match: {{ path_prefix: /{route} }}
    upstream: app
    budget: 20s
    concurrency: {concurrency}
    queue: {{ max_depth: 100, max_wait: 20s }}
"#
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Queued,
    Upstream,
    Relaying,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Upstream => "upstream",
            Phase::Relaying => "relaying",
        }
    }

    /// The status a request that ends in this phase is counted with: what was sent, or 499.
    fn status(self) -> &'static str {
        match self {
            Phase::Relaying => "200",
            _ => "499",
        }
    }
}

const CALLERS: usize = 20;

/// A gateway and backend set up so that `CALLERS` requests reach `phase` and stay there.
struct Scene {
    route: String,
    backend: Backend,
    gw: Gateway,
    /// Queued callers wait behind one request the backend holds.
    blocker: Option<tokio::task::JoinHandle<Answer>>,
    /// The query that keeps a request in the phase: held by the backend, or streaming its
    /// answer with the rest held.
    query: &'static str,
    phase: Phase,
}

impl Scene {
    async fn new(proto: &str, phase: Phase) -> Scene {
        let route = format!("{proto}_{}", phase.label());
        let backend = Backend::start().await;
        let concurrency = if phase == Phase::Queued { 1 } else { CALLERS };
        let gw = Gateway::start(&config(&route, concurrency), &backend.url()).await;
        lines();
        let blocker = match phase {
            Phase::Queued => {
                let url = gw.url(&format!("/{route}/b?hold=1"));
                Some(hold(&client(), &backend, url).await)
            }
            _ => None,
        };
        let query = match phase {
            Phase::Queued | Phase::Upstream => "hold=1",
            Phase::Relaying => "chunks=2&size=200000",
        };
        Scene {
            route,
            backend,
            gw,
            blocker,
            query,
            phase,
        }
    }

    /// Waits until every caller is queued, or held by the backend (relaying is the caller's to
    /// see: it has the head).
    async fn reached(&self) {
        let admission = self.gw.route(&self.route).admission.clone();
        match self.phase {
            Phase::Queued => {
                eventually("all queued", || admission.snapshot().queued == CALLERS).await
            }
            Phase::Upstream => {
                self.backend
                    .wait_until("all held", |s| {
                        s.held.load(std::sync::atomic::Ordering::SeqCst) == CALLERS
                    })
                    .await
            }
            Phase::Relaying => {}
        }
    }

    /// After the callers left: one log line and one count each, every slot back.
    async fn assert_accounted(&mut self) {
        let (route, want) = (&self.route, self.phase.label());
        eventually("20 access-log lines", || {
            lines_of(route)
                .iter()
                .filter(|l| l.get("phase").map(String::as_str) == Some(want))
                .count()
                == CALLERS
        })
        .await;
        for line in lines_of(route).iter().filter(|l| l.contains_key("phase")) {
            assert_eq!(line["reason"], "client_closed", "{line:?}");
            assert_eq!(line["complete"], "false");
            assert_eq!(line["status"], self.phase.status(), "{line:?}");
        }
        let m = self.gw.metrics().await;
        let closed = [("route", route.as_str()), ("phase", want)];
        assert_eq!(
            sample(&m, "breakwater_client_closed_total", &closed),
            CALLERS as u64
        );
        let counted = [("route", route.as_str()), ("status", self.phase.status())];
        assert_eq!(
            sample(&m, "breakwater_requests_total", &counted),
            CALLERS as u64
        );
        if let Some(blocker) = self.blocker.take() {
            self.backend.release(1);
            assert_eq!(blocker.await.unwrap().status, StatusCode::OK);
        }
        let admission = self.gw.route(route).admission.clone();
        eventually("every slot back", || {
            let s = admission.snapshot();
            s.inflight == 0 && s.queued == 0
        })
        .await;
        let m = self.gw.metrics().await;
        let of_route = [("route", route.as_str())];
        assert_eq!(
            sample(&m, "breakwater_inflight", &of_route),
            0,
            "in-flight gauge back to 0"
        );
        assert_eq!(sample(&m, "breakwater_queue_depth", &of_route), 0);
    }
}

/// 20 callers over HTTP/1.1 (each its own connection) leave in `phase`.
async fn abandon_h1(phase: Phase) {
    let mut scene = Scene::new("h1", phase).await;
    let mut callers = Vec::new();
    for i in 0..CALLERS {
        let mut s = TcpStream::connect(scene.gw.addr).await.unwrap();
        let (route, query) = (&scene.route, scene.query);
        let head = format!("GET /{route}/{i}?{query} HTTP/1.1\r\nhost: gw\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        callers.push(s);
    }
    scene.reached().await;
    if phase == Phase::Relaying {
        // Each caller has the head and the first chunk; the rest is held by the backend.
        for s in &mut callers {
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        }
    }
    drop(callers);
    scene.assert_accounted().await;
}

#[tokio::test]
async fn h1_callers_leaving_while_queued_are_accounted() {
    abandon_h1(Phase::Queued).await;
}

#[tokio::test]
async fn h1_callers_leaving_while_upstream_works_are_accounted() {
    abandon_h1(Phase::Upstream).await;
}

#[tokio::test]
async fn h1_callers_leaving_while_the_answer_relays_are_accounted() {
    abandon_h1(Phase::Relaying).await;
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// An h2 connection (prior knowledge, cleartext) and a handle on its end.
async fn h2(gw: &Gateway) -> (H2Sender, tokio::task::JoinHandle<()>) {
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, ended)
}

fn h2_get(uri: String) -> Request<Empty<Bytes>> {
    Request::get(uri).body(Empty::new()).unwrap()
}

/// 20 streams on one h2 connection are reset by the caller in `phase`; the connection stays
/// up, goes idle, and is closed at `keepalive_timeout` (which it only is once all 20 are counted
/// out of it).
async fn abandon_h2(phase: Phase) {
    let mut scene = Scene::new("h2", phase).await;
    let route = scene.route.clone();
    let (mut sender, ended) = h2(&scene.gw).await;
    let mut streams = Vec::new();
    for i in 0..CALLERS {
        sender.ready().await.unwrap();
        let uri = format!("http://gw/{route}/{i}?{}", scene.query);
        streams.push(tokio::spawn(sender.send_request(h2_get(uri))));
    }
    scene.reached().await;
    if phase == Phase::Relaying {
        let mut bodies = Vec::new();
        for s in streams.drain(..) {
            let resp = s.await.unwrap().unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            let first = body.frame().await.unwrap().unwrap();
            assert!(first.is_data());
            bodies.push(body);
        }
        // Dropping a body resets its stream.
        drop(bodies);
    }
    // Aborting the tasks drops the response futures: each stream is reset.
    for s in streams {
        s.abort();
    }
    scene.assert_accounted().await;
    // The connection is still usable, and, once idle, closed by the gateway.
    let resp = sender
        .send_request(h2_get(format!("http://gw/{route}/after")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the idle h2 connection is closed after keepalive_timeout")
        .unwrap();
}

#[tokio::test]
async fn h2_streams_reset_while_queued_are_accounted() {
    abandon_h2(Phase::Queued).await;
}

#[tokio::test]
async fn h2_streams_reset_while_upstream_works_are_accounted() {
    abandon_h2(Phase::Upstream).await;
}

#[tokio::test]
async fn h2_streams_reset_while_the_answer_relays_are_accounted() {
    abandon_h2(Phase::Relaying).await;
}

#[tokio::test]
async fn an_idle_h2_connection_is_closed_after_keepalive_timeout() {
    let backend = Backend::start().await;
    let gw = Gateway::start(&config("h2idle", 4), &backend.url()).await;
    let (mut sender, ended) = h2(&gw).await;
    for i in 0..3 {
        sender.ready().await.unwrap();
        let resp = sender
            .send_request(h2_get(format!("http://gw/h2idle/{i}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("closed after keepalive_timeout (300ms)")
        .unwrap();
}

#[tokio::test]
async fn a_caller_that_stops_reading_loses_its_connection_and_slot_at_the_budget() {
    let backend = Backend::start().await;
    let yaml = r#"
upstreams:
  app:
    url: "{backend}"
routes:
  - name: stall
    match: { path_prefix: /stall }
    upstream: app
    budget: 1s
    concurrency: 1
"#;
    let gw = Gateway::start(yaml, &backend.url()).await;
    lines();
    // A small receive buffer, so the gateway's writes back up quickly.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(gw.addr).await.unwrap();
    stalled
        .write_all(b"GET /stall/big?size=33554432 HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = stalled.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The caller reads nothing more. Its slot comes back once the budget has passed.
    let admission = gw.route("stall").admission.clone();
    assert_eq!(admission.snapshot().inflight, 1);
    eventually("the stalled caller's slot is back", || {
        admission.snapshot().inflight == 0
    })
    .await;
    let next = get(&client(), &gw.url("/stall/next")).await;
    assert_eq!(next.status, StatusCode::OK, "the route serves again");
    let line = lines_of("stall")
        .into_iter()
        .find(|l| l.get("reason").map(String::as_str) == Some("write_timeout"))
        .expect("the stalled request is logged");
    assert_eq!(line["status"], "200");
    assert_eq!(line["phase"], "relaying");
    // Its connection was closed: reading on drains what was buffered, then ends.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        let mut sink = vec![0u8; 1 << 16];
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection was closed");
    let m = gw.metrics().await;
    assert_eq!(
        sample(&m, "breakwater_write_timeouts_total", &[("route", "stall")]),
        1
    );
}

#[tokio::test]
async fn an_h2_caller_that_grants_no_window_loses_its_connection_and_slot() {
    let backend = Backend::start().await;
    let yaml = r#"
upstreams:
  app:
    url: "{backend}"
routes:
  - name: h2stall
    match: { path_prefix: /h2stall }
    upstream: app
    budget: 1s
    concurrency: 1
"#;
    let gw = Gateway::start(yaml, &backend.url()).await;
    lines();
    let (mut sender, ended) = h2(&gw).await;
    sender.ready().await.unwrap();
    // 32 MiB against the client's 2 MiB stream window: never polled, the window never reopens.
    let resp = sender
        .send_request(h2_get("http://gw/h2stall/big?size=33554432".into()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let admission = gw.route("h2stall").admission.clone();
    eventually("the stalled stream's slot is back", || {
        admission.snapshot().inflight == 0
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the stalled h2 connection was closed")
        .unwrap();
    drop(resp);
    let line = lines_of("h2stall")
        .into_iter()
        .find(|l| l.get("reason").map(String::as_str) == Some("write_timeout"))
        .expect("the stalled stream is logged");
    assert_eq!(line["phase"], "relaying");
    assert_eq!(
        get(&client(), &gw.url("/h2stall/next")).await.status,
        StatusCode::OK
    );
}
