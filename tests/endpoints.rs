//! Upstream endpoints: one upstream balanced over several in-process backends, each endpoint with
//! its own limit and health; the route's admission following the endpoints in service; reloads
//! that add and remove endpoints under requests in flight.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use breakwater::circuit::Standing;
use common::*;
use tokio::time::Instant;

/// An upstream `app` over `urls`, each `concurrency: 1`, and one route `r` to it.
fn config(urls: &[String], circuit: &str, extra: &str) -> String {
    let endpoints: String = urls
        .iter()
        .map(|u| format!("      - {{ url: \"{u}\", concurrency: 1 }}\n"))
        .collect();
    format!(
        "upstreams:\n  app:\n    endpoints:\n{endpoints}    pool: {{ min_idle: 0 }}\n    circuit: {circuit}\n{extra}routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n    budget: 10s\n"
    )
}

fn stats_of(backends: &[Backend], f: impl Fn(&common::BackendStats) -> usize) -> Vec<usize> {
    backends.iter().map(|b| f(&b.stats)).collect()
}

#[tokio::test]
async fn each_request_goes_to_a_free_endpoint_and_admission_holds_the_rest() {
    let backends = vec![
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let gw = Gateway::start(&config(&urls, "{}", ""), "").await;
    let route = gw.route("r");
    assert_eq!(route.upstream.capacity(), 4);
    assert_eq!(
        route.admission.snapshot().limit,
        4,
        "capped by the endpoints"
    );

    let c = client();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tokio::spawn(hold(c.clone(), gw.url("/x?hold=1"))));
    }
    // Four go out, one to each endpoint; the fifth waits in the route's queue, not at a
    // backend.
    for b in &backends {
        b.wait_until("one request held at each endpoint", |s| {
            s.held.load(Ordering::SeqCst) == 1
        })
        .await;
    }
    let snap = route.admission.snapshot();
    assert_eq!((snap.inflight, snap.queued), (4, 1));
    for b in &backends {
        b.release(2);
    }
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    assert_eq!(
        stats_of(&backends, |s| s.max_inflight.load(Ordering::SeqCst)),
        [1, 1, 1, 1]
    );
    assert_eq!(
        stats_of(&backends, |s| s.requests.load(Ordering::SeqCst))
            .iter()
            .sum::<usize>(),
        5
    );
}

async fn hold(c: TestClient, url: String) -> Answer {
    get(&c, &url).await
}

/// A loopback address nothing listens on.
fn dead_address() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

#[tokio::test]
async fn a_dead_endpoint_is_ejected_and_the_others_answer_everything() {
    let live = vec![
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let dead = dead_address();
    let mut urls: Vec<String> = live.iter().map(Backend::url).collect();
    urls.insert(1, format!("http://{dead}"));
    let circuit = "{ consecutive_failures: 2, cooldown: 60s }";
    // Its own upstream name: the metrics recorder is shared by the tests in this binary.
    let yaml = config(&urls, circuit, "")
        .replace("app", "spare")
        .replace("name: r\n", "name: r-dead\n");
    let gw = Gateway::start(&yaml, "").await;
    let route = gw.route("r-dead");
    let c = client();
    // POSTs: nothing reached the dead endpoint, so each goes to another endpoint.
    for _ in 0..30 {
        let a = post(&c, &gw.url("/x"), b"{}").await;
        assert_eq!(a.status, 200, "{:?}", a.reason());
    }
    let dead_endpoint = &route.upstream.endpoints()[1];
    assert!(matches!(
        dead_endpoint.health.standing(Instant::now()),
        Standing::Ejected(_)
    ));
    assert_eq!(route.upstream.capacity(), 3);
    assert_eq!(route.admission.snapshot().limit, 3);
    assert!(
        stats_of(&live, |s| s.completed.load(Ordering::SeqCst))
            .iter()
            .all(|&n| n > 0),
        "every live endpoint served"
    );
    let metrics = gw.metrics().await;
    let label = format!("upstream=\"spare\",endpoint=\"{dead}\"");
    assert!(
        metrics.contains(&format!("breakwater_endpoint_ejected{{{label}}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains("breakwater_upstream_capacity{upstream=\"spare\"} 3"));
    assert!(
        metrics.contains("breakwater_retries_total{route=\"r-dead\",reason=\"other_endpoint\"}")
    );
}

#[tokio::test]
async fn an_ejected_endpoint_rejoins_once_it_answers_again() {
    let live = Backend::start().await;
    let down = dead_address();
    let urls = vec![live.url(), format!("http://{down}")];
    let circuit = "{ consecutive_failures: 1, cooldown: 200ms }";
    let gw = Gateway::start(&config(&urls, circuit, ""), "").await;
    let route = gw.route("r");
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while route.upstream.capacity() == 2 {
        assert!(
            Instant::now() < deadline,
            "the dead endpoint was never tried"
        );
        assert_eq!(get(&c, &gw.url("/x")).await.status, 200);
    }
    let back = Backend::at(down).await;
    // Probed after its cooldown; a good probe brings it back at full capacity.
    while back.count(|s| &s.completed) == 0 || route.upstream.capacity() < 2 {
        assert!(Instant::now() < deadline, "the endpoint never rejoined");
        assert_eq!(get(&c, &gw.url("/x")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(route.admission.snapshot().limit, 2);
}

#[tokio::test]
async fn every_endpoint_ejected_is_refused_at_once_with_retry_after() {
    let urls = vec![
        format!("http://{}", dead_address()),
        format!("http://{}", dead_address()),
    ];
    let circuit = "{ consecutive_failures: 1, cooldown: 60s }";
    let gw = Gateway::start(&config(&urls, circuit, ""), "").await;
    let c = client();
    // The first request finds both endpoints refusing connections.
    let first = post(&c, &gw.url("/x"), b"{}").await;
    first.assert_refusal("upstream_unavailable");
    let then = post(&c, &gw.url("/x"), b"{}").await;
    then.assert_refusal("circuit_open");
    let retry_after: u64 = then.header("retry-after").unwrap().parse().unwrap();
    // What is left of the cooldown, capped by the route's retry_after_max (30 s).
    assert!((20..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(gw.route("r").upstream.capacity(), 0);
}

#[tokio::test]
async fn round_robin_takes_turns_and_each_endpoint_gets_its_own_host() {
    let backends = vec![Backend::start().await, Backend::start().await];
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let gw = Gateway::start(&config(&urls, "{}", "    balance: round_robin\n"), "").await;
    let c = client();
    for _ in 0..6 {
        assert_eq!(get(&c, &gw.url("/x")).await.status, 200);
    }
    assert_eq!(
        stats_of(&backends, |s| s.requests.load(Ordering::SeqCst)),
        [3, 3]
    );
    for b in &backends {
        for (_, headers) in b.stats.headers.lock().unwrap().iter() {
            assert_eq!(headers["host"], b.addr.to_string().as_str());
        }
    }
}

#[tokio::test]
async fn a_reload_adds_and_removes_endpoints_under_requests_in_flight() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let c_backend = Backend::start().await;
    let gw = Gateway::start(&config(&[a.url(), b.url()], "{}", ""), "").await;
    let shared = gw.running.as_ref().unwrap().shared.clone();
    let client = client();
    let on_a_and_b: Vec<_> = (0..2)
        .map(|_| tokio::spawn(hold(client.clone(), gw.url("/x?hold=1"))))
        .collect();
    a.wait_until("held at a", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;
    b.wait_until("held at b", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;
    let kept_b = Arc::clone(&gw.route("r").upstream.endpoints()[1]);

    // a leaves, c joins; b is kept with its request in flight.
    let text = format!(
        "server:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n{}",
        config(&[b.url(), c_backend.url()], "{}", "")
    );
    let loaded = breakwater::prepare::from_yaml(&text, Vec::new()).unwrap();
    breakwater::reload::apply(&shared, loaded);
    let route = gw.route("r");
    assert!(Arc::ptr_eq(&route.upstream.endpoints()[0], &kept_b));
    assert_eq!(kept_b.outstanding(), 1);
    // The request still at a keeps its route slot until it is done; then, b being busy, the
    // next request goes to c.
    a.release(1);
    let to_c = tokio::spawn(hold(client.clone(), gw.url("/x")));
    c_backend
        .wait_until("a request at c", |s| {
            s.completed.load(Ordering::SeqCst) == 1
        })
        .await;
    assert_eq!(to_c.await.unwrap().status, 200);
    b.release(1);
    for h in on_a_and_b {
        assert_eq!(h.await.unwrap().status, 200, "in flight across the reload");
    }
    assert_eq!(a.count(|s| &s.requests), 1, "a gets nothing new");
}

#[tokio::test]
async fn a_request_refused_by_one_endpoint_waits_for_a_busy_one_rather_than_failing() {
    let live = Backend::start().await;
    let dead = dead_address();
    let urls = vec![live.url(), format!("http://{dead}")];
    // The dead endpoint stays in service throughout: every request may be sent to it.
    let circuit = "{ consecutive_failures: 100 }";
    // Its own route name: the metrics recorder is shared by the tests in this binary.
    let yaml = config(&urls, circuit, "").replace("name: r\n", "name: r-wait\n");
    let gw = Gateway::start(&yaml, "").await;
    let c = client();
    let held = tokio::spawn(hold(c.clone(), gw.url("/x?hold=1")));
    live.wait_until("held at the live endpoint", |s| {
        s.held.load(Ordering::SeqCst) == 1
    })
    .await;
    // The live endpoint is busy, so this goes to the dead one, is refused there, and waits for
    // the live one instead of going back to the dead one.
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), gw.url("/x"));
        async move { post(&c, &url, b"{}").await }
    });
    let upstream = gw.route("r-wait").upstream.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.endpoints()[1].health.is_open() || !dead_was_tried(&gw).await {
        assert!(
            Instant::now() < deadline,
            "the dead endpoint was never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    live.release(1);
    assert_eq!(held.await.unwrap().status, 200);
    let a = waiting.await.unwrap();
    assert_eq!(a.status, 200, "{:?}", a.reason());
}

async fn dead_was_tried(gw: &Gateway) -> bool {
    gw.metrics()
        .await
        .contains("breakwater_retries_total{route=\"r-wait\",reason=\"other_endpoint\"}")
}

#[tokio::test]
async fn an_endpoint_that_never_answers_is_ejected_while_the_others_answer() {
    let live = Backend::start().await;
    // Accepts connections, reads nothing, answers nothing.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let urls = vec![live.url(), format!("http://{hang_addr}")];
    let circuit = "{ consecutive_failures: 2, cooldown: 60s }";
    let yaml = config(&urls, circuit, "").replace("budget: 10s", "budget: 300ms");
    let gw = Gateway::start(&yaml, "").await;
    let route = gw.route("r");
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Two at a time: one goes to each endpoint, so the live one answers while the other hangs.
    while !route.upstream.endpoints()[1].health.is_open() {
        assert!(
            Instant::now() < deadline,
            "the hanging endpoint was never ejected"
        );
        let pair = [
            tokio::spawn(hold(c.clone(), gw.url("/x"))),
            tokio::spawn(hold(c.clone(), gw.url("/x"))),
        ];
        for p in pair {
            let a = p.await.unwrap();
            assert!(
                // Requests that time out also teach admission to refuse what cannot finish.
                a.status == 200 || matches!(a.reason(), Some("budget_exhausted" | "deadline")),
                "{:?} {:?}",
                a.status,
                a.reason()
            );
        }
    }
    assert_eq!(route.upstream.capacity(), 1);
    // Only the live endpoint is sent to now; once admission has seen it answer again, every
    // request is served.
    let mut served = 0;
    while served < 5 {
        assert!(
            Instant::now() < deadline,
            "served only {served} after the ejection"
        );
        let a = get(&c, &gw.url("/x")).await;
        match a.status.as_u16() {
            200 => served += 1,
            _ => assert_eq!(a.reason(), Some("deadline")),
        }
    }
    holder.abort();
}

#[tokio::test]
async fn a_single_endpoint_is_not_ejected_for_answers_that_come_too_late() {
    // A backend slow everywhere is the stall cap's to handle; ejecting its only endpoint would
    // add a cooldown to its recovery.
    let slow = Backend::start().await;
    let circuit = "{ consecutive_failures: 1, cooldown: 60s }";
    let yaml = config(&[slow.url()], circuit, "").replace("budget: 10s", "budget: 200ms");
    let gw = Gateway::start(&yaml, "").await;
    let c = client();
    for _ in 0..3 {
        let a = get(&c, &gw.url("/x?delay=1000")).await;
        assert_eq!(a.reason(), Some("budget_exhausted"));
    }
    let route = gw.route("r");
    assert!(!route.upstream.endpoints()[0].health.is_open());
    assert_eq!(get(&c, &gw.url("/x")).await.status, 200);
}

#[tokio::test]
async fn discovery_turns_each_address_into_an_endpoint_with_its_own_limit() {
    let b = Backend::start().await;
    // An address literal resolves to itself: one discovered endpoint.
    let yaml = format!(
        "upstreams:\n  found:\n    url: \"{}\"\n    discovery: {{ every: 50ms, endpoint_concurrency: 1 }}\n    pool: {{ min_idle: 0 }}\nroutes:\n  - name: r-found\n    match: {{ path_prefix: / }}\n    upstream: found\n    budget: 10s\n",
        b.url()
    );
    let gw = Gateway::start(&yaml, "").await;
    let route = gw.route("r-found");
    let deadline = Instant::now() + Duration::from_secs(10);
    while route.upstream.capacity() != 1 {
        assert!(Instant::now() < deadline, "nothing discovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(&*route.upstream.endpoints()[0].label, b.addr.to_string());
    let c = client();
    let first = tokio::spawn(hold(c.clone(), gw.url("/x?hold=1")));
    b.wait_until("one held", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;
    let second = tokio::spawn(hold(c.clone(), gw.url("/x")));
    // The endpoint's limit is the route's: the second waits at the gateway, not the backend.
    while route.admission.snapshot().queued != 1 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.release(1);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    assert_eq!(b.count(|s| &s.max_inflight), 1);
}

#[tokio::test]
async fn waiting_for_a_slot_another_route_holds_teaches_admission_nothing() {
    let b = Backend::start().await;
    let yaml = format!(
        "upstreams:\n  shared:\n    endpoints: [{{ url: \"{}\", concurrency: 2 }}]\n    pool: {{ min_idle: 0 }}\nroutes:\n  - {{ name: holder, match: {{ path_prefix: /a }}, upstream: shared, budget: 10s }}\n  - {{ name: waiter, match: {{ path_prefix: /b }}, upstream: shared, budget: 200ms }}\n",
        b.url()
    );
    let gw = Gateway::start(&yaml, "").await;
    let c = client();
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(hold(c.clone(), gw.url("/a?hold=1"))))
        .collect();
    b.wait_until("both slots held", |s| s.held.load(Ordering::SeqCst) == 2)
        .await;
    // Admitted by its own route, then out of budget waiting for the endpoint's slot.
    let a = get(&c, &gw.url("/b")).await;
    assert_eq!(a.reason(), Some("budget_exhausted"));
    let waiter = gw.route("waiter").admission.snapshot();
    assert_eq!(
        waiter.limit, 2,
        "no stall cap: the backend never had the request"
    );
    assert_eq!(waiter.mean_service, None);
    b.release(2);
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
}

// Workers behind one port (`worker_header`)

/// One url to a backend whose connections are pinned to workers in the order `pin`, the route
/// taking 4 at a time.
async fn pinned(pin: Vec<usize>, upstream_extra: &str) -> (Backend, Gateway) {
    let backend = Backend::with(BackendOptions {
        pin: Some(pin),
        ..Default::default()
    })
    .await;
    let yaml = format!(
        "upstreams:\n  app:\n    url: \"{{backend}}\"\n{upstream_extra}routes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n    budget: 10s\n    concurrency: 4\n"
    );
    let gw = Gateway::start(&yaml, &backend.url()).await;
    (backend, gw)
}

/// Sends `n` requests the backend holds, each once the one before is held, and returns them
/// still held.
async fn hold_n(
    c: &TestClient,
    backend: &Backend,
    gw: &Gateway,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Answer>> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(common::hold(c, backend, gw.url("/x?hold=1")).await);
    }
    held
}

async fn release_all(backend: &Backend, held: Vec<tokio::task::JoinHandle<Answer>>) {
    backend.release(held.len());
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
}

/// The first four connections land two on worker 0 and two on worker 1, as uvicorn's shared
/// accept often does; a fifth and sixth would reach workers 2 and 3.
const SKEWED: [usize; 6] = [0, 0, 1, 1, 2, 3];

/// Four requests at once open the four connections (their workers unknown until they answer).
async fn learn_first_connections(c: &TestClient, backend: &Backend, gw: &Gateway) {
    let held = hold_n(c, backend, gw, 4).await;
    assert_eq!(backend.stats.at_workers(4), [2, 2, 0, 0]);
    release_all(backend, held).await;
}

#[tokio::test]
async fn without_worker_header_pooled_connections_pile_requests_on_some_workers() {
    // The control for the test below: the same backend and load, the pool not told.
    let (backend, gw) = pinned(
        SKEWED.to_vec(),
        "    pool: { max_connections: 8, min_idle: 0 }\n",
    )
    .await;
    let c = client();
    learn_first_connections(&c, &backend, &gw).await;
    let held = hold_n(&c, &backend, &gw, 4).await;
    assert_eq!(
        backend.stats.at_workers(4),
        [2, 2, 0, 0],
        "two workers idle"
    );
    release_all(&backend, held).await;
}

#[tokio::test]
async fn worker_header_keeps_each_request_on_a_worker_with_nothing_in_flight() {
    let (backend, gw) = pinned(
        SKEWED.to_vec(),
        "    worker_header: x-worker\n    pool: { max_connections: 8, min_idle: 0 }\n",
    )
    .await;
    let c = client();
    learn_first_connections(&c, &backend, &gw).await;
    // Two requests find idle connections to workers 0 and 1; the next two pass over the
    // connections to those busy workers and open new ones, which reach workers 2 and 3.
    let held = hold_n(&c, &backend, &gw, 4).await;
    assert_eq!(backend.stats.at_workers(4), [1, 1, 1, 1]);
    release_all(&backend, held).await;
    assert_eq!(backend.count(|s| &s.accepted), 6);
    // From now on the pool holds a connection to every worker: the spread holds with no new
    // connection.
    for _ in 0..3 {
        let held = hold_n(&c, &backend, &gw, 4).await;
        assert_eq!(backend.stats.at_workers(4), [1, 1, 1, 1]);
        release_all(&backend, held).await;
    }
    assert_eq!(backend.count(|s| &s.accepted), 6, "no churn once spread");
    let m = gw.metrics().await;
    assert!(m.contains("breakwater_endpoint_workers{"), "{m}");
    assert!(m.contains("pick=\"free\""), "{m}");
}

#[tokio::test]
async fn a_full_pool_closes_a_connection_to_a_busy_worker_to_reach_the_others() {
    // Room for only the four connections first opened, all on workers 0 and 1.
    let (backend, gw) = pinned(
        SKEWED.to_vec(),
        "    worker_header: x-worker\n    pool: { max_connections: 4, min_idle: 0 }\n",
    )
    .await;
    let c = client();
    learn_first_connections(&c, &backend, &gw).await;
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 6, "never spread over the four workers");
        // Connections are closed to reach another worker at most once per 100 ms.
        tokio::time::sleep(Duration::from_millis(120)).await;
        let held = hold_n(&c, &backend, &gw, 4).await;
        let spread = backend.stats.at_workers(4) == [1, 1, 1, 1];
        release_all(&backend, held).await;
        if spread {
            break;
        }
    }
    assert!(backend.count(|s| &s.accepted) > 4);
    let m = gw.metrics().await;
    let rerolls = format!(
        "breakwater_endpoint_worker_rerolls_total{{upstream=\"app\",endpoint=\"{}\"}} ",
        backend.addr
    );
    let n: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix(&rerolls))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{rerolls} in {m}"));
    assert!(n >= 1.0, "{m}");
}

#[tokio::test]
async fn worker_probe_meets_every_worker_before_requests_need_them() {
    let (backend, gw) = pinned(
        SKEWED.to_vec(),
        "    worker_header: x-worker\n    worker_probe: /healthz\n    pool: { max_connections: 8, min_idle: 0 }\n",
    )
    .await;
    // Probes alone: connections one after another, each kept only if its worker had none.
    backend
        .wait_until("every worker answered a probe", |s| {
            s.served_by_workers(4).iter().all(|&n| n > 0)
        })
        .await;
    let connections = backend.count(|s| &s.accepted);
    let c = client();
    let held = hold_n(&c, &backend, &gw, 4).await;
    assert_eq!(backend.stats.at_workers(4), [1, 1, 1, 1]);
    release_all(&backend, held).await;
    // Other tests in this binary share the metrics registry: only this endpoint's series.
    let endpoint = format!("endpoint=\"{}\"", backend.addr);
    let m: Vec<String> = gw
        .metrics()
        .await
        .lines()
        .filter(|l| l.contains(&endpoint) && l.starts_with("breakwater_endpoint_worker"))
        .map(str::to_string)
        .collect();
    let value = |name: &str, label: &str| -> f64 {
        m.iter()
            .find(|l| l.starts_with(name) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} {label} in {m:#?}"))
    };
    let picks = "breakwater_endpoint_worker_picks_total";
    assert_eq!(value(picks, "pick=\"free\""), 4.0, "{m:#?}");
    assert_eq!(value(picks, "pick=\"unknown\""), 0.0, "{m:#?}");
    assert_eq!(value(picks, "pick=\"busy\""), 0.0, "{m:#?}");
    let probes_total = "breakwater_endpoint_worker_probes_total";
    assert_eq!(value(probes_total, "result=\"kept\""), 4.0, "{m:#?}");
    assert_eq!(value("breakwater_endpoint_workers{", ""), 4.0, "{m:#?}");
    eprintln!("{connections} connections opened by the probes");
}

/// With the runtime's I/O driver on another thread, a probe's answer can wake the idle watch a
/// new connection has from its start, between the probe being written and its answer read. That
/// is no peer closing an idle connection: taken for one, it taught the pool an idle timer of a few
/// milliseconds, and every pooled connection was then retired before it could be used (the
/// demo's "one port, worker named" layout fell from 36 answers to 10-18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_probes_teach_the_pool_no_idle_timer() {
    let backend = Backend::with(BackendOptions {
        pin: Some(SKEWED.to_vec()),
        ..Default::default()
    })
    .await;
    // An upstream of its own name: the tests of this binary share one metrics registry.
    let yaml = "upstreams:\n  probed:\n    url: \"{backend}\"\n    worker_header: x-worker\n    worker_probe: /healthz\n    pool: { max_connections: 8, min_idle: 0 }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: probed\n    budget: 10s\n    concurrency: 4\n";
    let gw = Gateway::start(yaml, &backend.url()).await;
    backend
        .wait_until("every worker answered a probe", |s| {
            s.served_by_workers(4).iter().all(|&n| n > 0)
        })
        .await;
    // Long enough idle for a timer learned from the probes to retire the connections.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let c = client();
    let held = hold_n(&c, &backend, &gw, 4).await;
    release_all(&backend, held).await;
    let retired = "breakwater_upstream_connections_retired_total{upstream=\"probed\"} ";
    let m = gw.metrics().await;
    let n: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix(retired))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert_eq!(
        n, 0.0,
        "connections retired for an idle timer nobody has: {m}"
    );
}

#[tokio::test]
async fn with_worker_probe_the_route_takes_one_request_per_worker_met() {
    // The route would take 8; the backend has 4 workers, one request at a time each.
    let backend = Backend::with(BackendOptions {
        pin: Some(SKEWED.to_vec()),
        ..Default::default()
    })
    .await;
    let yaml = "upstreams:\n  app:\n    url: \"{backend}\"\n    worker_header: x-worker\n    worker_probe: /healthz\n    pool: { max_connections: 16, min_idle: 0 }\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: app\n    budget: 10s\n    concurrency: 8\n";
    let gw = Gateway::start(yaml, &backend.url()).await;
    let route = gw.route("r");
    // The gateway starts once the first round of probes has met the workers.
    assert_eq!(route.upstream.capacity(), 4);
    assert_eq!(
        route.admission.snapshot().limit,
        4,
        "capped by the workers met"
    );

    // Five requests: four go out, one to each worker; the fifth waits in the route's queue, not
    // inside a busy worker.
    let c = client();
    let held = hold_n(&c, &backend, &gw, 4).await;
    let fifth = tokio::spawn(hold(c.clone(), gw.url("/x?hold=1")));
    wait_until(
        "the fifth request queued at the gateway",
        || route.admission.snapshot().queued == 1,
        &backend.stats.changed,
    )
    .await;
    assert_eq!(backend.stats.at_workers(4), [1, 1, 1, 1]);
    release_all(&backend, held).await;
    backend.release(1);
    assert_eq!(fifth.await.unwrap().status, 200);
    assert_eq!(backend.stats.max_at_workers(4), [1, 1, 1, 1]);
}
