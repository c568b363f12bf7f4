//! Operations: metrics contract, admin endpoints, drain and reload — in process and against the
//! real binary.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;

const ADMIN_TOKEN_ENV: &str = breakwater::admin::access::TOKEN_ENV;

/// Parses Prometheus text into (metric name → label sets).
fn parse_metrics(text: &str) -> HashMap<String, Vec<HashMap<String, String>>> {
    let mut out: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').expect("series and value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        out.entry(name.to_string()).or_default().push(labels);
    }
    out
}

fn has(
    m: &HashMap<String, Vec<HashMap<String, String>>>,
    name: &str,
    labels: &[(&str, &str)],
) -> bool {
    m.get(name).is_some_and(|sets| {
        sets.iter().any(|set| {
            labels
                .iter()
                .all(|(k, v)| set.get(*k).map(|s| s.as_str()) == Some(*v))
        })
    })
}

#[tokio::test]
async fn metrics_contract_is_present_after_traffic() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        r#"
upstreams:
  app:
    url: "{backend}"
    pool: { max_connections: 4, min_idle: 1 }
routes:
  - name: api
    match: { path_prefix: /api }
    upstream: app
    budget: 5s
    concurrency: 1
    queue: { max_depth: 0 }
    retry: { attempts: 1, on_status: [502] }
"#,
        &backend.url(),
    )
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/api/ok")).await.status, StatusCode::OK);
    assert_eq!(
        get(&c, &gw.url("/nowhere")).await.status,
        StatusCode::NOT_FOUND
    );
    get(&c, &gw.url("/api/retry?status=502")).await;
    let held = hold(&c, &backend, gw.url("/api/hold?hold=1")).await;
    get(&c, &gw.url("/api/shed"))
        .await
        .assert_refusal("queue_full");
    backend.release(1);
    held.await.unwrap();

    let m = parse_metrics(&gw.metrics().await);
    let expect: &[(&str, &[(&str, &str)])] = &[
        (
            "breakwater_requests_total",
            &[("route", "api"), ("method", "GET"), ("status", "200")],
        ),
        (
            "breakwater_requests_total",
            &[("route", "none"), ("status", "404")],
        ),
        (
            "breakwater_request_duration_seconds_bucket",
            &[("route", "api"), ("le", "0.0005")],
        ),
        (
            "breakwater_request_duration_seconds_sum",
            &[("route", "api")],
        ),
        (
            "breakwater_request_duration_seconds_count",
            &[("route", "none")],
        ),
        (
            "breakwater_upstream_duration_seconds_bucket",
            &[("route", "api"), ("upstream", "app"), ("le", "60")],
        ),
        ("breakwater_inflight", &[("route", "api")]),
        ("breakwater_concurrency_limit", &[("route", "api")]),
        ("breakwater_queue_depth", &[("route", "api")]),
        (
            "breakwater_shed_total",
            &[("route", "api"), ("reason", "queue_full")],
        ),
        (
            "breakwater_retries_total",
            &[("route", "api"), ("reason", "status")],
        ),
        (
            "breakwater_upstream_connections",
            &[("upstream", "app"), ("state", "idle")],
        ),
        (
            "breakwater_upstream_connections",
            &[("upstream", "app"), ("state", "active")],
        ),
        (
            "breakwater_upstream_connects_total",
            &[("upstream", "app"), ("result", "ok")],
        ),
        ("breakwater_circuit_open", &[("upstream", "app")]),
        (
            "breakwater_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
        ),
    ];
    for (name, labels) in expect {
        assert!(has(&m, name, labels), "missing {name} {labels:?}");
    }
    // Label values stay bounded: no raw paths anywhere.
    for sets in m.values() {
        for set in sets {
            assert!(
                set.values().all(|v| !v.contains("/api")),
                "raw path in labels: {set:?}"
            );
        }
    }
}

#[tokio::test]
async fn config_endpoint_shows_effective_config_with_secrets_redacted() {
    let backend = Backend::start().await;
    let url = backend.url().replace("http://", "http://svc:hunter2@");
    let gw = Gateway::start(
        "upstreams:\n  app:\n    url: \"{backend}\"\nroutes:\n  - { name: api, upstream: app, budget: 3s }\n",
        &url,
    )
    .await;
    let c = client();
    let a = get(&c, &format!("http://{}/config", gw.admin.unwrap())).await;
    assert_eq!(a.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&a.body);
    assert!(!text.contains("hunter2"), "{text}");
    let v = a.json();
    assert_eq!(v["routes"][0]["budget"], "3s");
    assert_eq!(v["upstreams"]["app"]["pool"]["max_connections"], 64);
}

#[tokio::test]
async fn readiness_can_wait_for_a_first_upstream_connection() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let yaml = "server:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  ready_requires_upstream: true\nupstreams:\n  app:\n    url: \"{backend}\"\n    pool: { connect_timeout: 100ms }\nroutes:\n  - { name: api, upstream: app }\n";
    let gw = Gateway::start(yaml, &dead).await;
    let c = client();
    let a = get(&c, &format!("http://{}/readyz", gw.admin.unwrap())).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&a.body).contains("app"));

    let backend = Backend::start().await;
    let gw = Gateway::start(yaml, &backend.url()).await;
    let a = get(&c, &format!("http://{}/readyz", gw.admin.unwrap())).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn draining_refuses_queued_requests_that_cannot_finish_and_lets_in_flight_ones_end() {
    let backend = Backend::start().await;
    let mut gw = Gateway::start(
        r#"
upstreams:
  app:
    url: "{backend}"
routes:
  - name: api
    upstream: app
    budget: 10s
    concurrency: 1
    queue: { max_depth: 10, max_wait: 10s }
"#,
        &backend.url(),
    )
    .await;
    let c = client();
    warm(&c, &gw.url("/warm?delay=300"), 3).await;
    let in_flight = hold(&c, &backend, gw.url("/hold?hold=1&delay=300")).await;
    let queued = tokio::spawn({
        let (c, u) = (c.clone(), gw.url("/queued"));
        async move { get(&c, &u).await }
    });
    let route = gw.route("api");
    let never = tokio::sync::Notify::new();
    wait_until("queued", || route.admission.snapshot().queued == 1, &never).await;

    let admin = gw.admin.unwrap();
    let running = gw.running.take().unwrap();
    let drain = tokio::spawn(running.drain(Duration::from_millis(500)));
    // The queued request needs ~600 ms (its wait plus its own exchange): more than is left.
    let q = queued.await.unwrap();
    q.assert_refusal("draining");
    let r = get(&client(), &format!("http://{admin}/readyz")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    backend.release(1);
    let a = in_flight.await.unwrap();
    assert_eq!(
        a.status,
        StatusCode::OK,
        "in-flight request finished normally"
    );
    assert_eq!(a.header("connection"), Some("close"));
    drain.await.unwrap();
}

// ---- server.workers ----

/// An HTTP/1.1 connection of its own to `addr` (the pooled client would reuse one), and the
/// task driving it, which ends when the gateway closes the connection.
async fn own_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<TestBody>,
    tokio::task::JoinHandle<()>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    (
        send,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

async fn get_on(
    send: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> Answer {
    send.ready().await.unwrap();
    let start = tokio::time::Instant::now();
    let req = http::Request::get(path)
        .header("host", "gateway")
        .body(body(bytes::Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.expect("answered");
    let (parts, b) = resp.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: http_body_util::BodyExt::collect(b)
            .await
            .unwrap()
            .to_bytes(),
        elapsed: start.elapsed(),
    }
}

/// `breakwater_connections_accepted_total` of `worker`, from the admin listener at `admin`.
async fn accepted_by(admin: std::net::SocketAddr, worker: usize) -> usize {
    let text = get(&client(), &format!("http://{admin}/metrics"))
        .await
        .body;
    let series = format!("breakwater_connections_accepted_total{{worker=\"{worker}\"}} ");
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.parse().unwrap())
}

/// Connections of their own to a two-worker gateway, opened until each worker has accepted one
/// (the kernel picks the worker by a hash of the connection's addresses). Each has been answered
/// once. Returns them with the worker that took each: `(worker 0's, worker 1's)`.
async fn one_on_each_worker(
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> [(
    hyper::client::conn::http1::SendRequest<TestBody>,
    tokio::task::JoinHandle<()>,
); 2] {
    let mut found = [None, None];
    for _ in 0..64 {
        let before = accepted_by(admin, 1).await;
        let (mut send, task) = own_connection(addr).await;
        // Answered: the accept, and its count, have happened.
        assert_eq!(get_on(&mut send, "/first").await.status, StatusCode::OK);
        let worker = usize::from(accepted_by(admin, 1).await > before);
        if found[worker].is_none() {
            found[worker] = Some((send, task));
        }
        if found.iter().all(Option::is_some) {
            return found.map(Option::unwrap);
        }
    }
    panic!("64 connections, all on one worker");
}

/// Two workers, each with its own socket on the one port: both serve, the route's concurrency
/// limit counts requests on both, and a drain waits for the connections of both.
#[tokio::test]
async fn two_workers_serve_one_port_share_admission_and_drain_cleanly() {
    let backend = Backend::start().await;
    let mut gw = Gateway::start(
        r#"
server: { listen: "127.0.0.1:0", workers: 2, drain_timeout: 10s }
admin: { listen: "127.0.0.1:0" }
upstreams:
  app:
    url: "{backend}"
routes:
  - name: api
    upstream: app
    budget: 10s
    concurrency: 1
    queue: { max_depth: 10, max_wait: 10s }
"#,
        &backend.url(),
    )
    .await;
    let admin = gw.admin.unwrap();
    let [(mut on0, closed0), (mut on1, closed1)] = one_on_each_worker(gw.addr, admin).await;

    let held = tokio::spawn(async move {
        let a = get_on(&mut on0, "/held?hold=1").await;
        (a, on0)
    });
    backend
        .wait_until("held", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;
    let queued = tokio::spawn(async move { get_on(&mut on1, "/queued").await });
    let route = gw.route("api");
    let never = tokio::sync::Notify::new();
    wait_until(
        "the other worker's request queued behind the one slot",
        || route.admission.snapshot().queued == 1,
        &never,
    )
    .await;

    let drain = tokio::spawn(gw.running.take().unwrap().drain(Duration::from_secs(10)));
    backend.release(1);
    let (a, _on0) = held.await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("connection"), Some("close"));
    let q = queued.await.unwrap();
    assert_eq!(q.status, StatusCode::OK, "{:?}", q.body);
    assert_eq!(q.header("connection"), Some("close"));
    assert!(
        drain.await.unwrap(),
        "every connection on both workers closed"
    );
    // The gateway closed both connections; nothing listens on the port any more.
    closed0.await.unwrap();
    closed1.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(gw.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a worker still accepts after the drain"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With more than one worker the port is bound with `SO_REUSEPORT`, which must not let a second
/// gateway share it with the first.
#[tokio::test]
async fn a_second_gateway_cannot_bind_a_port_two_workers_listen_on() {
    let backend = Backend::start().await;
    let yaml = "server: { listen: \"127.0.0.1:PORT\", workers: 2 }\nadmin: { enabled: false }\nupstreams:\n  app:\n    url: \"{backend}\"\nroutes:\n  - { name: api, upstream: app, budget: 5s }\n";
    let first = Gateway::start(&yaml.replace("PORT", "0"), &backend.url()).await;
    let again = yaml
        .replace("PORT", &first.addr.port().to_string())
        .replace("{backend}", &backend.url());
    let loaded = breakwater::prepare::from_yaml(&again, Vec::new()).unwrap();
    match breakwater::gateway::start(loaded).await {
        Ok(_) => panic!("a second gateway bound a port the first listens on"),
        Err(e) => assert!(e.to_string().contains("server.listen"), "{e}"),
    }
    assert_eq!(
        get(&client(), &first.url("/still")).await.status,
        StatusCode::OK
    );
}

// ---- the real binary ----

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

struct Binary {
    proc: Proc,
    port: u16,
    admin: u16,
    file: tempfile::NamedTempFile,
}

fn binary_config(port: u16, admin: u16, backend: &str, budget: &str) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:{port}", drain_timeout: 5s }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ format: json, level: warn }}
upstreams:
  app:
    url: "{backend}"
    pool: {{ min_idle: 1 }}
routes:
  - name: api
    upstream: app
    budget: {budget}
"#
    )
}

async fn start_binary(backend: &str, budget: &str) -> Binary {
    start_binary_logging(backend, budget, Stdio::null()).await
}

/// Like [`start_binary`], with the log lines (stdout) going to `log`.
async fn start_binary_logging(backend: &str, budget: &str, log: Stdio) -> Binary {
    let (port, admin) = (free_port(), free_port());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), binary_config(port, admin, backend, budget)).unwrap();
    let proc = spawn_binary(&file, admin, None, log).await;
    Binary {
        proc,
        port,
        admin,
        file,
    }
}

/// Runs the binary on `file` and waits until its admin listener answers on 127.0.0.1. The admin
/// token is `token`, never one from the environment the tests run in.
async fn spawn_binary(
    file: &tempfile::NamedTempFile,
    admin: u16,
    token: Option<&str>,
    stdout: Stdio,
) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_breakwater"));
    command
        .arg("--config")
        .arg(file.path())
        .env_remove(ADMIN_TOKEN_ENV)
        .stdout(stdout)
        .stderr(Stdio::null());
    if let Some(t) = token {
        command.env(ADMIN_TOKEN_ENV, t);
    }
    let proc = Proc(command.spawn().unwrap());
    let c = client();
    let url = format!("http://127.0.0.1:{admin}/healthz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = c.get(url.parse().unwrap()).await {
            if r.status() == StatusCode::OK {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proc
}

async fn reloads(c: &TestClient, admin: u16, result: &str) -> usize {
    let resp = c
        .get(format!("http://127.0.0.1:{admin}/metrics").parse().unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    text.lines()
        .find(|l| {
            l.starts_with(&format!(
                "breakwater_config_reloads_total{{result=\"{result}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let backend = Backend::start().await;
    let mut bin = start_binary(&backend.url(), "10s").await;
    let c = client();
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let (c, u) = (
                c.clone(),
                format!("http://127.0.0.1:{}/hold{i}?hold=1", bin.port),
            );
            tokio::spawn(async move { get(&c, &u).await })
        })
        .collect();
    backend
        .wait_until("three held", |s| s.held.load(Ordering::SeqCst) == 3)
        .await;
    signal(&bin.proc.0, "TERM");
    // Ready turns 503 at once; the traffic listener stops accepting.
    let ready = format!("http://127.0.0.1:{}/readyz", bin.admin);
    let c2 = client();
    let mut saw_draining = false;
    for _ in 0..100 {
        if get(&c2, &ready).await.status == StatusCode::SERVICE_UNAVAILABLE {
            saw_draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_draining, "readyz did not turn 503 while draining");
    backend.release(3);
    for t in tasks {
        assert_eq!(
            t.await.unwrap().status,
            StatusCode::OK,
            "no in-flight request lost"
        );
    }
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = bin.proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "did not exit within drain_timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sighup_applies_a_new_budget_to_new_requests_only_and_rejects_invalid_files() {
    let backend = Backend::start().await;
    let bin = start_binary(&backend.url(), "10s").await;
    let c = client();
    let base = format!("http://127.0.0.1:{}", bin.port);
    let old = tokio::spawn({
        let (c, u) = (c.clone(), format!("{base}/old?hold=1"));
        async move { get(&c, &u).await }
    });
    backend
        .wait_until("old request held", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;

    std::fs::write(
        bin.file.path(),
        binary_config(bin.port, bin.admin, &backend.url(), "300ms"),
    )
    .unwrap();
    signal(&bin.proc.0, "HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reloads(&c, bin.admin, "ok").await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let new = get(&c, &format!("{base}/new?delay=3000")).await;
    new.assert_refusal("budget_exhausted");
    assert!(new.elapsed < Duration::from_secs(2), "{:?}", new.elapsed);
    // The old request started under the 10 s budget and has now outlived 300 ms: it still
    // finishes normally.
    backend.release(1);
    assert_eq!(old.await.unwrap().status, StatusCode::OK);

    // An invalid file is rejected with every problem, and the running config stays.
    std::fs::write(
        bin.file.path(),
        binary_config(bin.port, bin.admin, "ftp://nowhere", "-1s"),
    )
    .unwrap();
    let resp = c
        .request(
            http::Request::post(format!("http://127.0.0.1:{}/reload", bin.admin))
                .body(body(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: serde_json::Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("upstreams.app.url") && problems.contains("routes[0].budget"),
        "{problems}"
    );
    assert_eq!(reloads(&c, bin.admin, "error").await, 1);
    let still = get(&c, &format!("{base}/still?delay=100")).await;
    assert_eq!(still.status, StatusCode::OK, "old config still serving");
    let slow = get(&c, &format!("{base}/slow?delay=3000")).await;
    slow.assert_refusal("budget_exhausted");
}

/// The real `run()` with `workers: 2`: a SIGHUP's new budget reaches requests on both workers'
/// connections, and SIGTERM waits for requests in flight on both before exiting zero.
#[tokio::test]
async fn the_binary_with_two_workers_reloads_on_sighup_and_drains_both_on_sigterm() {
    let backend = Backend::start().await;
    let (port, admin) = (free_port(), free_port());
    let config = |budget: &str| {
        binary_config(port, admin, &backend.url(), budget)
            .replace("drain_timeout: 5s }", "drain_timeout: 5s, workers: 2 }")
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config("10s")).unwrap();
    let mut proc = spawn_binary(&file, admin, None, Stdio::null()).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let [(mut on0, closed0), (mut on1, closed1)] = one_on_each_worker(addr, admin_addr).await;

    std::fs::write(file.path(), config("300ms")).unwrap();
    signal(&proc.0, "HUP");
    let c = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reloads(&c, admin, "ok").await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for on in [&mut on0, &mut on1] {
        get_on(on, "/slow?delay=3000")
            .await
            .assert_refusal("budget_exhausted");
    }
    std::fs::write(file.path(), config("10s")).unwrap();
    signal(&proc.0, "HUP");
    while reloads(&c, admin, "ok").await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let held: Vec<_> = [on0, on1]
        .into_iter()
        .enumerate()
        .map(|(i, mut on)| {
            tokio::spawn(async move { get_on(&mut on, &format!("/held{i}?hold=1")).await })
        })
        .collect();
    backend
        .wait_until("one held per worker", |s| {
            s.held.load(Ordering::SeqCst) == 2
        })
        .await;
    signal(&proc.0, "TERM");
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get(&c, &ready).await.status != StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drain did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    backend.release(2);
    for h in held {
        let a = h.await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "no in-flight request lost");
        assert_eq!(a.header("connection"), Some("close"));
    }
    closed0.await.unwrap();
    closed1.await.unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "did not exit within drain_timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_second_signal_exits_at_once_without_waiting_for_the_drain() {
    let backend = Backend::start().await;
    let mut bin = start_binary(&backend.url(), "10s").await;
    let c = client();
    let held = {
        let (c, u) = (
            c.clone(),
            format!("http://127.0.0.1:{}/held?hold=1", bin.port),
        );
        tokio::spawn(async move { c.get(u.parse().unwrap()).await })
    };
    backend
        .wait_until("held", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;
    signal(&bin.proc.0, "TERM");
    // Draining: readyz 503 means the first signal was taken.
    let ready = format!("http://127.0.0.1:{}/readyz", bin.admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get(&c, &ready).await.status != StatusCode::SERVICE_UNAVAILABLE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "drain did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        bin.proc.0.try_wait().unwrap().is_none(),
        "the first signal drains: the held request keeps the process alive"
    );
    let start = std::time::Instant::now();
    signal(&bin.proc.0, "TERM");
    loop {
        if bin.proc.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still running with a request in flight after the second signal (drain_timeout is 5 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backend.release(1);
    let _ = held.await;
}

/// `breakwater check` on `text`: (success, stdout, stderr).
fn check(text: &str) -> (bool, String, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("check")
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).to_string();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

/// The file `check` reads, run in a directory that has a `config/breakwater.yaml` of its own.
fn checked_path(
    dir: &std::path::Path,
    flag: Option<&std::path::Path>,
    env: Option<&std::path::Path>,
) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_breakwater"));
    command
        .current_dir(dir)
        .arg("check")
        .env_remove("BREAKWATER_CONFIG");
    if let Some(f) = flag {
        command.arg("--config").arg(f);
    }
    if let Some(e) = env {
        command.env("BREAKWATER_CONFIG", e);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().next().unwrap_or_default().to_string()
}

#[test]
fn the_config_path_is_the_flag_then_the_variable_then_the_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let text = "upstreams:\n  app:\n    url: \"http://127.0.0.1:8000\"\nroutes:\n  - { name: api, upstream: app }\n";
    let (default, from_env, from_flag) = (
        dir.path().join("config/breakwater.yaml"),
        dir.path().join("env.yaml"),
        dir.path().join("flag.yaml"),
    );
    for f in [&default, &from_env, &from_flag] {
        std::fs::write(f, text).unwrap();
    }
    let ok = |p: &std::path::Path| format!("{}: ok", p.display());
    assert_eq!(
        checked_path(dir.path(), None, None),
        "config/breakwater.yaml: ok"
    );
    assert_eq!(
        checked_path(dir.path(), None, Some(&from_env)),
        ok(&from_env)
    );
    assert_eq!(
        checked_path(dir.path(), Some(&from_flag), Some(&from_env)),
        ok(&from_flag)
    );
}

#[test]
fn check_prints_warnings_and_still_succeeds() {
    let (ok, out, err) = check(
        "server: { drain_timeout: 5s }\nupstreams:\n  app: { url: \"http://127.0.0.1:8000\" }\nroutes:\n  - { name: api, upstream: app, budget: 12s, caller_timeout: 10s }\n",
    );
    assert!(ok, "{out}{err}");
    let warnings: Vec<&str> = out.lines().filter(|l| l.starts_with("WARNING  ")).collect();
    assert_eq!(warnings.len(), 2, "{out}");
    assert!(
        warnings[0].starts_with(
            "WARNING  routes[0].budget: `12s` is longer than `routes[0].caller_timeout` (`10s`)"
        ),
        "{out}"
    );
    assert!(
        warnings[1].starts_with(
            "WARNING  server.drain_timeout: `5s` is shorter than the longest route budget (`12s`"
        ),
        "{out}"
    );
    assert!(out.contains("2 warning(s)"), "{out}");
}

/// Each warning is logged once at start and once more after each reload.
#[tokio::test]
async fn the_binary_logs_configuration_warnings_at_start_and_after_a_reload() {
    let backend = Backend::start().await;
    let mut bin = start_binary_logging(&backend.url(), "61s", Stdio::piped()).await;
    let c = client();
    signal(&bin.proc.0, "HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reloads(&c, bin.admin, "ok").await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "reload not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Logs go through a background writer that flushes on a clean exit, not on SIGKILL.
    signal(&bin.proc.0, "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while bin.proc.0.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut bin.proc.0.stdout.take().unwrap(), &mut out).unwrap();
    let logged = |key: &str| {
        out.lines()
            .filter(|l| {
                l.contains("configuration warning") && l.contains(&format!("\"key\":\"{key}\""))
            })
            .inspect(|l| assert!(l.contains("\"level\":\"WARN\""), "{l}"))
            .count()
    };
    assert_eq!(logged("routes[0].budget"), 2, "{out}");
    assert_eq!(logged("server.drain_timeout"), 2, "{out}");
}

#[tokio::test]
async fn url_credentials_never_reach_check_reload_answers_or_logs() {
    let secret_url = "http://svc:hunter2@127.0.0.1:9/base";
    let (ok, out, err) = check(&binary_config(free_port(), free_port(), secret_url, "10s"));
    assert!(ok, "{err}");
    assert!(out.contains("<redacted>@127.0.0.1:9/base"), "{out}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );
    // Invalid: credentials in a url that does not parse, next to another problem.
    let broken = binary_config(free_port(), free_port(), "http://svc:hunter2@[nope", "-1s");
    let (ok, out, err) = check(&broken);
    assert!(!ok);
    assert!(
        err.contains("upstreams.app.url") && err.contains("routes[0].budget"),
        "{err}"
    );
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}{err}"
    );

    let backend = Backend::start().await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let bin = start_binary_logging(&backend.url(), "10s", log.reopen().unwrap().into()).await;
    std::fs::write(
        bin.file.path(),
        binary_config(bin.port, bin.admin, "http://svc:hunter2@[nope", "-1s"),
    )
    .unwrap();
    let c = client();
    let resp = c
        .request(
            http::Request::post(format!("http://127.0.0.1:{}/reload", bin.admin))
                .body(body(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let answer = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("upstreams.app.url"), "{answer}");
    assert!(!answer.contains("hunter2"), "{answer}");

    // The log is flushed when the process exits.
    let mut bin = bin;
    signal(&bin.proc.0, "TERM");
    let start = std::time::Instant::now();
    while bin.proc.0.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(6), "did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        logged.contains("upstreams.app.url"),
        "reload problem not logged: {logged}"
    );
    assert!(!logged.contains("hunter2"), "{logged}");
}

/// A reload reads its file on the blocking pool: with the file a FIFO that nothing has written
/// yet, the reload waits, and a single-threaded runtime goes on answering meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn a_reload_waiting_on_its_file_does_not_block_the_runtime() {
    use std::sync::atomic::AtomicBool;

    let backend = Backend::start().await;
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nupstreams:\n  app:\n    url: \"{}\"\nroutes:\n  - {{ name: api, upstream: app }}\n",
        backend.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("breakwater.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let loaded = breakwater::prepare::from_yaml(&yaml, Vec::new()).unwrap();
    let running = breakwater::gateway::start_from(loaded, Some(fifo.clone()))
        .await
        .unwrap();
    let shared = running.shared.clone();

    // Were the reload to block this (only) runtime thread, nothing below could run: this thread
    // then feeds the FIFO after a while so that the test fails instead of hanging.
    let (fed, watchdog_fed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    std::thread::spawn({
        let (fifo, yaml, fed, watchdog_fed) = (
            fifo.clone(),
            yaml.clone(),
            fed.clone(),
            watchdog_fed.clone(),
        );
        move || {
            std::thread::sleep(Duration::from_secs(10));
            if !fed.swap(true, Ordering::SeqCst) {
                watchdog_fed.store(true, Ordering::SeqCst);
                let _ = std::fs::write(&fifo, yaml);
            }
        }
    });
    let reload = tokio::spawn(breakwater::reload::reload(shared.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Reloads hold this lock from start to end.
    while shared.reloading.try_lock().is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reload never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let c = client();
    let health = get(
        &c,
        &format!("http://{}/healthz", running.admin_addr.unwrap()),
    )
    .await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(
        !watchdog_fed.load(Ordering::SeqCst),
        "the runtime was blocked until the file arrived"
    );
    if !fed.swap(true, Ordering::SeqCst) {
        tokio::task::spawn_blocking(move || std::fs::write(&fifo, yaml))
            .await
            .unwrap()
            .unwrap();
    }
    let applied = reload.await.unwrap().expect("reload applies");
    assert!(
        applied.needs_restart.is_empty(),
        "{:?}",
        applied.needs_restart
    );
}

/// A reload applies what it can and keeps the rest: `/config` shows what is in force, with the
/// keys that wait for a restart listed with both values, and `needs_restart` names exactly those.
#[tokio::test]
async fn config_shows_what_runs_and_what_waits_for_a_restart() {
    let backend = Backend::start().await;
    let yaml = |drain: &str, body_read: &str, max_body: &str, header_read: &str, level: &str| {
        format!(
            "server: {{ listen: 127.0.0.1:0, drain_timeout: {drain}, body_read_timeout: {body_read}, max_request_body: {max_body}, header_read_timeout: {header_read} }}\nadmin: {{ listen: 127.0.0.1:0 }}\nlog: {{ level: {level} }}\nupstreams:\n  app:\n    url: \"{}\"\nroutes:\n  - {{ name: api, upstream: app, budget: 3s }}\n",
            backend.url()
        )
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml("5s", "10s", "1MiB", "10s", "info")).unwrap();
    let loaded = breakwater::prepare::load(file.path()).unwrap();
    let running = breakwater::gateway::start_from(loaded, Some(file.path().to_path_buf()))
        .await
        .unwrap();
    let shared = running.shared.clone();
    let config_url = format!("http://{}/config", running.admin_addr.unwrap());
    let c = client();

    std::fs::write(file.path(), yaml("6s", "3s", "2KiB", "7s", "debug")).unwrap();
    let applied = breakwater::reload::reload(shared.clone()).await.unwrap();
    assert_eq!(
        applied.needs_restart,
        ["server.header_read_timeout", "log.level"]
    );
    // What a reload applies is in force...
    assert_eq!(running.drain_timeout(), Duration::from_secs(6));
    let route = shared.table.load().routes[0].clone();
    assert_eq!(route.body_read_timeout, Duration::from_secs(3));
    assert_eq!(route.config.max_request_body, 2048);
    let v = get(&c, &config_url).await.json();
    assert_eq!(v["server"]["drain_timeout"], "6s");
    assert_eq!(v["server"]["body_read_timeout"], "3s");
    assert_eq!(v["routes"][0]["max_request_body"], "2KiB");
    // ...and what it cannot apply shows its running value, and waits.
    assert_eq!(v["server"]["header_read_timeout"], "10s");
    assert_eq!(v["log"]["level"], "info");
    assert_eq!(
        v["pending_restart"],
        serde_json::json!([
            { "key": "server.header_read_timeout", "running": "10s", "file": "7s" },
            { "key": "log.level", "running": "info", "file": "debug" },
        ])
    );

    // The file back as it started: nothing waits any more.
    std::fs::write(file.path(), yaml("6s", "3s", "2KiB", "10s", "info")).unwrap();
    let applied = breakwater::reload::reload(shared.clone()).await.unwrap();
    assert!(
        applied.needs_restart.is_empty(),
        "{:?}",
        applied.needs_restart
    );
    let v = get(&c, &config_url).await.json();
    assert_eq!(v["pending_restart"], serde_json::json!([]));
}

/// A reload during a drain builds new admission state for routes whose limits changed; those
/// routes still refuse what cannot finish before the drain deadline.
#[tokio::test]
async fn a_reload_during_a_drain_keeps_the_drain_deadline() {
    let backend = Backend::start().await;
    let yaml = |concurrency: usize| {
        format!(
            "server:\n  listen: 127.0.0.1:0\nadmin:\n  enabled: false\nupstreams:\n  app:\n    url: \"{}\"\nroutes:\n  - {{ name: api, upstream: app, budget: 30s, concurrency: {concurrency} }}\n",
            backend.url()
        )
    };
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml(1)).unwrap();
    let loaded = breakwater::prepare::load(file.path()).unwrap();
    let running = breakwater::gateway::start_from(loaded, Some(file.path().to_path_buf()))
        .await
        .unwrap();
    let shared = running.shared.clone();
    let before = shared.table.load().routes[0].admission.clone();
    // No connection is open, so this returns at once; the deadline stays 2 s away.
    assert!(running.drain(Duration::from_secs(2)).await);

    std::fs::write(file.path(), yaml(2)).unwrap();
    let applied = breakwater::reload::reload(shared.clone()).await.unwrap();
    assert!(
        applied.needs_restart.is_empty(),
        "{:?}",
        applied.needs_restart
    );
    let admission = shared.table.load().routes[0].admission.clone();
    assert!(
        !Arc::ptr_eq(&before, &admission),
        "new limits, new admission state"
    );

    // No new connection reaches a draining gateway, so the route is asked directly, as the
    // proxy asks it for each request. Once an exchange is known to take 5 s, a request with
    // 30 s of budget but only 2 s of drain left cannot finish.
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    admission
        .admit(far)
        .await
        .expect("a free slot without an estimate")
        .release(breakwater::admission::Sample::Took(Duration::from_secs(5)));
    match admission.admit(far).await {
        Ok(_) => panic!("admitted a request that cannot finish before the drain deadline"),
        Err(refused) => assert_eq!(refused.reason().as_str(), "draining"),
    }
}

// ---- admin token ----

/// `method path` on the admin port at 127.0.0.1, with `Authorization` when given.
async fn admin_call(admin: u16, method: &str, path: &str, authorization: Option<&str>) -> Answer {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{admin}{path}"));
    if let Some(a) = authorization {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    send(&client(), req.body(body(bytes::Bytes::new())).unwrap()).await
}

fn assert_open_endpoints_answer(answers: &[Answer]) {
    for a in answers {
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    }
}

#[tokio::test]
async fn config_and_reload_are_open_on_loopback_and_refused_off_it_without_a_token() {
    assert!(
        std::env::var_os(ADMIN_TOKEN_ENV).is_none(),
        "unset {ADMIN_TOKEN_ENV} to run the admin tests"
    );
    let backend = Backend::start().await;
    let routes =
        "upstreams:\n  app:\n    url: \"{backend}\"\nroutes:\n  - { name: api, upstream: app }\n";

    let loopback = Gateway::start(routes, &backend.url()).await;
    let admin = loopback.admin.unwrap().port();
    assert_eq!(
        admin_call(admin, "GET", "/config", None).await.status,
        StatusCode::OK
    );
    // An in-process gateway has no file to reload: refused for that, not for a token.
    let reload = admin_call(admin, "POST", "/reload", None).await;
    assert!(
        ![StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN].contains(&reload.status),
        "{}",
        reload.status
    );

    // Bound to every address: traffic to it still comes over 127.0.0.1 here, but the listener
    // is what counts.
    let exposed = Gateway::start(
        &format!("server:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 0.0.0.0:0\n{routes}"),
        &backend.url(),
    )
    .await;
    let admin = exposed.admin.unwrap().port();
    for (method, path) in [("GET", "/config"), ("POST", "/reload")] {
        let a = admin_call(admin, method, path, Some("Bearer anything")).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {path}");
        let v = a.json();
        assert_eq!(v["error"], "forbidden");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(ADMIN_TOKEN_ENV), "{message}");
        assert!(message.contains("not a loopback address"), "{message}");
    }
    assert_open_endpoints_answer(&[
        admin_call(admin, "GET", "/healthz", None).await,
        admin_call(admin, "GET", "/readyz", None).await,
        admin_call(admin, "GET", "/metrics", None).await,
    ]);
}

#[tokio::test]
async fn the_binary_warns_once_when_config_and_reload_are_disabled() {
    let backend = Backend::start().await;
    let (port, admin) = (free_port(), free_port());
    let file = tempfile::NamedTempFile::new().unwrap();
    let text = binary_config(port, admin, &backend.url(), "5s")
        .replace(&format!("127.0.0.1:{admin}"), &format!("0.0.0.0:{admin}"));
    std::fs::write(file.path(), text).unwrap();
    let mut proc = spawn_binary(&file, admin, None, Stdio::piped()).await;
    assert_eq!(
        admin_call(admin, "GET", "/config", None).await.status,
        StatusCode::FORBIDDEN
    );
    // Logs go through a background writer that flushes on a clean exit, not on SIGKILL.
    signal(&proc.0, "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proc.0.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut proc.0.stdout.take().unwrap(), &mut out).unwrap();
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("POST /reload and GET /config answer 403"))
        .collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(warnings[0].contains("\"level\":\"WARN\""), "{out}");
}

#[tokio::test]
async fn with_a_token_set_config_and_reload_need_it_and_the_rest_stays_open() {
    const TOKEN: &str = "3f1c9a0b7d2e4f6a8b0c1d2e3f4a5b6c";
    let backend = Backend::start().await;
    let (port, admin) = (free_port(), free_port());
    let file = tempfile::NamedTempFile::new().unwrap();
    let text = binary_config(port, admin, &backend.url(), "5s")
        .replace(&format!("127.0.0.1:{admin}"), &format!("0.0.0.0:{admin}"));
    std::fs::write(file.path(), text).unwrap();
    let _proc = spawn_binary(&file, admin, Some(TOKEN), Stdio::null()).await;

    let good = format!("Bearer {TOKEN}");
    for (method, path) in [("GET", "/config"), ("POST", "/reload")] {
        for wrong in [
            None,
            Some("Bearer nope"),
            Some(TOKEN),
            Some(&good[..good.len() - 1]),
        ] {
            let a = admin_call(admin, method, path, wrong).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {wrong:?}"
            );
            assert_eq!(
                a.header("www-authenticate"),
                Some("Bearer realm=\"breakwater-admin\"")
            );
            assert_eq!(a.json()["error"], "unauthorized");
        }
    }
    let config = admin_call(admin, "GET", "/config", Some(&good)).await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(config.json()["routes"][0]["budget"], "5s");
    let reload = admin_call(admin, "POST", "/reload", Some(&format!("bearer {TOKEN}"))).await;
    assert_eq!(reload.status, StatusCode::OK, "{:?}", reload.body);
    assert_eq!(reload.json()["result"], "ok");
    assert_open_endpoints_answer(&[
        admin_call(admin, "GET", "/healthz", None).await,
        admin_call(admin, "GET", "/readyz", None).await,
        admin_call(admin, "GET", "/metrics", None).await,
    ]);
}
