//! In-process test harness: a hyper backend whose behaviour each request (or the test) controls,
//! the real gateway started from a YAML string, and a small client. Everything binds
//! 127.0.0.1:0.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// How the backend behaves. Per-request overrides come from the query string:
/// `delay=MS`, `status=N`, `size=BYTES`, `bighead=BYTES` (a response header that large),
/// `hold=1` (wait for `release`), `chunks=N` (stream the
/// body in N chunks, holding after the first until released; with `length=1` the head gives
/// the body's length, so the gateway reads it whole), `reset=1` (send a head, then drop
/// the connection), `drop=1` (read the request, then close the connection without answering).
#[derive(Clone, Default)]
pub struct BackendOptions {
    /// Close connections that sit idle this long (like uvicorn's `--timeout-keep-alive`).
    pub idle_close: Option<Duration>,
    /// Answer with `Connection: close` after this many requests on a connection.
    pub close_after: Option<usize>,
    /// Simulated workers: at most this many requests are worked on at once, the rest wait in an
    /// unbounded backlog, like uvicorn.
    pub workers: Option<usize>,
    /// Default service time per request.
    pub service_time: Duration,
    /// Workers pinned like `uvicorn --workers N`: the n-th accepted connection belongs for its
    /// whole life to worker `pin[n % pin.len()]`, which serves one request at a time, and every
    /// answer names its worker in `x-worker`.
    pub pin: Option<Vec<usize>>,
}

/// Most workers a pinned backend has.
pub const MAX_WORKERS: usize = 8;

#[derive(Default)]
pub struct BackendStats {
    pub accepted: AtomicUsize,
    pub closed: AtomicUsize,
    pub requests: AtomicUsize,
    pub completed: AtomicUsize,
    /// Handlers dropped before they answered (the gateway gave up on them).
    pub cancelled: AtomicUsize,
    pub held: AtomicUsize,
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    pub body_bytes: AtomicUsize,
    pub first_body_chunk: Notify,
    pub changed: Notify,
    pub headers: Mutex<Vec<(String, HeaderMap)>>,
    /// Pinned backends: requests at each worker (working, held or waiting for it), and the most
    /// there were at once.
    pub at_worker: [AtomicUsize; MAX_WORKERS],
    pub max_at_worker: [AtomicUsize; MAX_WORKERS],
    pub served_by_worker: [AtomicUsize; MAX_WORKERS],
}

impl BackendStats {
    pub fn at_workers(&self, n: usize) -> Vec<usize> {
        self.at_worker[..n]
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect()
    }

    pub fn max_at_workers(&self, n: usize) -> Vec<usize> {
        self.max_at_worker[..n]
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect()
    }

    pub fn served_by_workers(&self, n: usize) -> Vec<usize> {
        self.served_by_worker[..n]
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect()
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub stats: Arc<BackendStats>,
    release: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start() -> Backend {
        Backend::with(BackendOptions::default()).await
    }

    pub async fn with(opts: BackendOptions) -> Backend {
        Backend::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts)
    }

    /// A backend on a given address (one that was down, coming back).
    pub async fn at(addr: SocketAddr) -> Backend {
        Backend::serve(
            TcpListener::bind(addr).await.unwrap(),
            BackendOptions::default(),
        )
    }

    fn serve(listener: TcpListener, opts: BackendOptions) -> Backend {
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(BackendStats::default());
        let release = Arc::new(Semaphore::new(0));
        let workers = Arc::new(Semaphore::new(
            opts.workers.unwrap_or(Semaphore::MAX_PERMITS),
        ));
        let pinned: Vec<Arc<Semaphore>> = (0..MAX_WORKERS)
            .map(|_| Arc::new(Semaphore::new(1)))
            .collect();
        let (s, r) = (stats.clone(), release.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let n = s.accepted.fetch_add(1, Ordering::SeqCst);
                s.changed.notify_waiters();
                let worker = opts.pin.as_ref().map(|seq| seq[n % seq.len()]);
                let w = match worker {
                    Some(i) => pinned[i].clone(),
                    None => workers.clone(),
                };
                let (s, r, opts) = (s.clone(), r.clone(), opts.clone());
                tokio::spawn(async move {
                    let per_conn = Arc::new(AtomicUsize::new(0));
                    let idle_close = opts.idle_close;
                    let s2 = s.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        handle(
                            req,
                            s2.clone(),
                            r.clone(),
                            (w.clone(), worker),
                            opts.clone(),
                            per_conn.clone(),
                        )
                    });
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.timer(TokioTimer::new());
                    // hyper's head timer also runs between requests: exactly an idle close.
                    b.header_read_timeout(idle_close);
                    let _ = b.serve_connection(TokioIo::new(stream), svc).await;
                    s.closed.fetch_add(1, Ordering::SeqCst);
                    s.changed.notify_waiters();
                });
            }
        });
        Backend {
            addr,
            stats,
            release,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets `n` held requests (or held streams) go on.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    /// Waits until `f` holds, re-checking whenever the backend's state changes; panics after 10 s.
    pub async fn wait_until(&self, what: &str, f: impl Fn(&BackendStats) -> bool) {
        wait_until(what, || f(&self.stats), &self.stats.changed).await;
    }

    pub fn count(&self, f: impl Fn(&BackendStats) -> &AtomicUsize) -> usize {
        f(&self.stats).load(Ordering::SeqCst)
    }

    /// The target and headers of the most recent request the backend saw.
    pub fn last_request(&self) -> (String, HeaderMap) {
        self.stats
            .headers
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the backend saw a request")
    }
}

pub async fn wait_until(what: &str, f: impl Fn() -> bool, changed: &Notify) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let notified = changed.notified();
        if f() {
            return;
        }
        if tokio::time::timeout_at(deadline, async {
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        })
        .await
        .is_err()
        {
            panic!("timed out waiting for: {what}");
        }
    }
}

struct CancelGuard {
    stats: Arc<BackendStats>,
    done: bool,
    worker: Option<usize>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(w) = self.worker {
            self.stats.at_worker[w].fetch_sub(1, Ordering::SeqCst);
        }
        self.stats.inflight.fetch_sub(1, Ordering::SeqCst);
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        self.stats.changed.notify_waiters();
    }
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    stats: Arc<BackendStats>,
    release: Arc<Semaphore>,
    (workers, worker): (Arc<Semaphore>, Option<usize>),
    opts: BackendOptions,
    per_conn: Arc<AtomicUsize>,
) -> Result<Response<TestBody>, BoxError> {
    // A pinned worker answers its health check at once, beside the one-at-a-time work, as the
    // FastAPI app's sync `/healthz` does (a `worker_probe` learns the worker from it).
    if let (Some(w), "/healthz") = (worker, req.uri().path()) {
        stats.served_by_worker[w].fetch_add(1, Ordering::SeqCst);
        stats.changed.notify_waiters();
        let mut resp = Response::new(
            Full::new(Bytes::from_static(b"ok"))
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        resp.headers_mut()
            .insert("x-worker", w.to_string().parse().unwrap());
        return Ok(resp);
    }
    let q = query(&req);
    let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let now = stats.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    stats.max_inflight.fetch_max(now, Ordering::SeqCst);
    if let Some(w) = worker {
        let there = stats.at_worker[w].fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_at_worker[w].fetch_max(there, Ordering::SeqCst);
    }
    stats.changed.notify_waiters();
    let mut guard = CancelGuard {
        stats: stats.clone(),
        done: false,
        worker,
    };
    stats
        .headers
        .lock()
        .unwrap()
        .push((req.uri().to_string(), req.headers().clone()));

    if q.contains_key("reset") {
        // Never answers; the test drops the connection from here by returning an error.
        guard.done = true;
        return Ok(Response::new(
            StreamBody::new(futures_util::stream::once(async {
                Err::<Frame<Bytes>, BoxError>("reset".into())
            }))
            .boxed_unsync(),
        ));
    }

    // Read the body as it streams, counting bytes.
    let mut body = req.into_body();
    let mut first = true;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            stats.body_bytes.fetch_add(d.len(), Ordering::SeqCst);
            if first && !d.is_empty() {
                first = false;
                stats.first_body_chunk.notify_waiters();
                stats.changed.notify_waiters();
            }
        }
    }

    if q.contains_key("drop") {
        if let Some(ms) = num("delay") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        // A service error makes hyper close the connection without writing anything.
        guard.done = true;
        return Err("dropped on purpose".into());
    }

    if q.contains_key("hold") {
        stats.held.fetch_add(1, Ordering::SeqCst);
        stats.changed.notify_waiters();
        release.acquire().await.unwrap().forget();
        stats.held.fetch_sub(1, Ordering::SeqCst);
    }
    let delay = num("delay")
        .map(Duration::from_millis)
        .unwrap_or(opts.service_time);
    {
        let _worker = workers.acquire().await.unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    let status = num("status").unwrap_or(200) as u16;
    let size = num("size").unwrap_or(2) as usize;
    let chunks = num("chunks").unwrap_or(1).max(1) as usize;
    let mut resp = if chunks > 1 {
        let chunk = Bytes::from(vec![b'x'; size / chunks]);
        let stats2 = stats.clone();
        let stream = futures_util::stream::unfold(0usize, move |i| {
            let chunk = chunk.clone();
            let release = release.clone();
            let _stats = stats2.clone();
            async move {
                if i == chunks {
                    return None;
                }
                if i == 1 {
                    release.acquire().await.unwrap().forget();
                }
                Some((Ok::<_, BoxError>(Frame::data(chunk)), i + 1))
            }
        });
        let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
        if num("length") == Some(1) {
            resp.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                (size / chunks * chunks).to_string().parse().unwrap(),
            );
        }
        resp
    } else {
        let body = if size == 2 {
            Bytes::from_static(b"ok")
        } else {
            Bytes::from(vec![b'x'; size])
        };
        Response::new(Full::new(body).map_err(|e| match e {}).boxed_unsync())
    };
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    let served = per_conn.fetch_add(1, Ordering::SeqCst) + 1;
    if opts.close_after.is_some_and(|n| served >= n) {
        resp.headers_mut()
            .insert(http::header::CONNECTION, "close".parse().unwrap());
    }
    if let Some(n) = num("bighead") {
        let big = "h".repeat(n as usize);
        resp.headers_mut().insert("x-big", big.parse().unwrap());
    }
    // Headers the gateway must strip on the way back.
    resp.headers_mut()
        .insert("keep-alive", "timeout=5".parse().unwrap());
    if let Some(w) = worker {
        resp.headers_mut()
            .insert("x-worker", w.to_string().parse().unwrap());
        stats.served_by_worker[w].fetch_add(1, Ordering::SeqCst);
    }
    guard.done = true;
    stats.completed.fetch_add(1, Ordering::SeqCst);
    Ok(resp)
}

/// A gateway started from YAML; `{backend}` in the text becomes the backend's URL.
pub struct Gateway {
    pub running: Option<breakwater::gateway::Running>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl Gateway {
    pub async fn start(yaml: &str, backend: &str) -> Gateway {
        let text = yaml.replace("{backend}", backend);
        let text = if text.contains("server:") {
            text
        } else {
            format!("server:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n{text}")
        };
        let loaded =
            breakwater::prepare::from_yaml(&text, Vec::new()).expect("test config is valid");
        let running = breakwater::gateway::start(loaded)
            .await
            .expect("gateway starts");
        Gateway {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn route(&self, name: &str) -> Arc<breakwater::proxy::RouteState> {
        let table = self.running.as_ref().unwrap().shared.table.load_full();
        table
            .routes
            .iter()
            .find(|r| r.config.name == name)
            .cloned()
            .expect("route exists")
    }

    pub async fn metrics(&self) -> String {
        let client = client();
        let resp = client
            .get(
                format!("http://{}/metrics", self.admin.unwrap())
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }
}

pub type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, TestBody>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn body(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn reason(&self) -> Option<&str> {
        self.header("x-breakwater-reason")
    }

    /// Every refusal carries an integer Retry-After of at least one second.
    pub fn assert_refusal(&self, reason: &str) {
        assert_eq!(
            self.reason(),
            Some(reason),
            "status {} body {:?}",
            self.status,
            self.body
        );
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE);
        let ra: u64 = self
            .header("retry-after")
            .expect("Retry-After present")
            .parse()
            .expect("Retry-After is an integer");
        assert!(ra >= 1);
        let j = self.json();
        assert_eq!(j["error"], reason);
        assert!(j["request_id"].is_string());
    }
}

pub async fn send(client: &TestClient, req: Request<TestBody>) -> Answer {
    let start = tokio::time::Instant::now();
    let resp = client.request(req).await.expect("request answered");
    let (parts, b) = resp.into_parts();
    let body = b.collect().await.expect("body read").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
        elapsed: start.elapsed(),
    }
}

pub async fn get(client: &TestClient, url: &str) -> Answer {
    send(client, Request::get(url).body(body(Bytes::new())).unwrap()).await
}

/// Sends a GET the backend will hold (the URL carries `hold=1`) and returns once the backend is
/// holding it: an upstream slot is then taken, exactly.
pub async fn hold(
    c: &TestClient,
    backend: &Backend,
    url: String,
) -> tokio::task::JoinHandle<Answer> {
    let before = backend.count(|s| &s.held);
    let c = c.clone();
    let task = tokio::spawn(async move { get(&c, &url).await });
    backend
        .wait_until("request held by the backend", |s| {
            s.held.load(Ordering::SeqCst) > before
        })
        .await;
    task
}

/// `n` requests one after another, so the route's estimator learns the backend's service time.
pub async fn warm(c: &TestClient, url: &str, n: usize) {
    for _ in 0..n {
        assert_eq!(get(c, url).await.status, StatusCode::OK, "warm-up request");
    }
}

pub async fn post(client: &TestClient, url: &str, data: &'static [u8]) -> Answer {
    send(
        client,
        Request::post(url)
            .body(body(Bytes::from_static(data)))
            .unwrap(),
    )
    .await
}

/// A child process (the real binary), killed and reaped when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
