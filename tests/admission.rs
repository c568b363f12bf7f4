//! Admission control: bounded queue, deadline-aware shedding, circuit breaking, retries.
//! The backend's hold/release makes slot occupancy exact instead of timing-based.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::sync::Notify;

fn route_yaml(extra: &str) -> String {
    format!(
        r#"
upstreams:
  app:
    url: "{{backend}}"
    pool: {{ max_connections: 16, min_idle: 1 }}
    circuit: {{ enabled: false }}
routes:
  - name: api
    match: {{ path_prefix: / }}
    upstream: app
{extra}
"#
    )
}

async fn wait_admission(
    gw: &Gateway,
    what: &str,
    f: impl Fn(&breakwater::admission::Snapshot) -> bool,
) {
    let route = gw.route("api");
    let never = Notify::new();
    wait_until(what, || f(&route.admission.snapshot()), &never).await;
}

fn spawn_get(c: &TestClient, url: String) -> tokio::task::JoinHandle<Answer> {
    let c = c.clone();
    tokio::spawn(async move { get(&c, &url).await })
}

#[tokio::test]
async fn queue_full_is_refused_immediately() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 10s\n    concurrency: 1\n    queue: { max_depth: 1, max_wait: 10s }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    let a = hold(&c, &backend, gw.url("/hold?hold=1")).await;
    let b = spawn_get(&c, gw.url("/queued"));
    wait_admission(&gw, "second request queued", |s| s.queued == 1).await;

    let refused = get(&c, &gw.url("/third")).await;
    refused.assert_refusal("queue_full");
    assert!(
        refused.elapsed < Duration::from_secs(1),
        "took {:?}",
        refused.elapsed
    );

    backend.release(1);
    assert_eq!(a.await.unwrap().status, StatusCode::OK);
    assert_eq!(b.await.unwrap().status, StatusCode::OK);
    assert_eq!(backend.count(|s| &s.requests), 2);
}

#[tokio::test]
async fn queued_requests_time_out_at_max_wait() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 10s\n    concurrency: 1\n    queue: { max_depth: 5, max_wait: 200ms }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    let a = hold(&c, &backend, gw.url("/hold?hold=1")).await;
    let b = get(&c, &gw.url("/waits")).await;
    b.assert_refusal("queue_timeout");
    assert!(b.elapsed >= Duration::from_millis(190), "{:?}", b.elapsed);
    assert!(b.elapsed < Duration::from_secs(3), "{:?}", b.elapsed);
    backend.release(1);
    assert_eq!(a.await.unwrap().status, StatusCode::OK);
    wait_admission(&gw, "queue empty", |s| s.queued == 0 && s.inflight == 0).await;
}

#[tokio::test]
async fn hopeless_requests_are_refused_on_arrival_with_reason_deadline() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 600ms\n    concurrency: 1\n    queue: { max_depth: 10, max_wait: 5s }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    // Teach the estimator that an exchange takes ~400 ms.
    warm(&c, &gw.url("/warm?delay=400"), 3).await;
    let a = hold(&c, &backend, gw.url("/hold?hold=1")).await;
    // Waiting for the slot (~400 ms) plus its own exchange (~400 ms) cannot fit in 600 ms.
    let b = get(&c, &gw.url("/hopeless")).await;
    b.assert_refusal("deadline");
    assert!(
        b.elapsed < Duration::from_millis(300),
        "refused late: {:?}",
        b.elapsed
    );
    backend.release(1);
    a.await.unwrap();
}

#[tokio::test]
async fn a_queued_request_is_refused_once_it_can_no_longer_make_it() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 1500ms\n    concurrency: 1\n    queue: { max_depth: 10, max_wait: 10s }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    warm(&c, &gw.url("/warm?delay=300"), 3).await;
    let a = hold(&c, &backend, gw.url("/hold?hold=1")).await;
    // Fits on arrival (wait ~300 ms + exchange ~300 ms < 1.5 s), so it queues; the slot never
    // frees, and it is refused when too little budget is left for an exchange, before the budget.
    let b = get(&c, &gw.url("/queued")).await;
    b.assert_refusal("deadline");
    assert!(b.elapsed > Duration::from_millis(500), "{:?}", b.elapsed);
    assert!(
        b.elapsed < Duration::from_millis(1500),
        "waited past the budget: {:?}",
        b.elapsed
    );
    backend.release(1);
    a.await.unwrap();
}

#[tokio::test]
async fn slots_are_released_when_the_client_leaves_mid_response() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 10s\n    concurrency: 1\n    queue: { max_depth: 5, max_wait: 10s }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    let resp = c
        .get(gw.url("/stream?size=4000&chunks=4").parse().unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    wait_admission(&gw, "slot taken while streaming", |s| s.inflight == 1).await;
    drop(body);
    drop(c);
    wait_admission(&gw, "slot released after the client left", |s| {
        s.inflight == 0
    })
    .await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/next")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn slots_are_released_when_the_upstream_fails() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 10s\n    concurrency: 1\n    queue: { max_depth: 5, max_wait: 10s }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    assert_eq!(
        get(&c, &gw.url("/boom?reset=1")).await.status,
        StatusCode::BAD_GATEWAY
    );
    wait_admission(&gw, "slot released", |s| s.inflight == 0).await;
    assert_eq!(get(&c, &gw.url("/next")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn overload_answer_and_fallback_are_configurable() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 10s\n    concurrency: 1\n    queue: { max_depth: 0 }\n    overload: { status: 429, body: '{\"error\":\"overloaded\"}' }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    let a = hold(&c, &backend, gw.url("/hold?hold=1")).await;
    let r = get(&c, &gw.url("/x")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.reason(), Some("queue_full"));
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.json()["error"], "overloaded");
    backend.release(1);
    a.await.unwrap();

    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 10s\n    concurrency: 1\n    queue: { max_depth: 0 }\n    fallback: { status: 200, body: '{\"sentiment\":\"neutral\"}' }",
        ),
        &backend.url(),
    )
    .await;
    let a = hold(&c, &backend, gw.url("/hold?hold=1")).await;
    let r = get(&c, &gw.url("/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.reason(), Some("queue_full"), "a fallback is still marked");
    assert_eq!(r.json()["sentiment"], "neutral");
    backend.release(1);
    a.await.unwrap();
}

#[tokio::test]
async fn circuit_opens_after_consecutive_failures_and_closes_after_a_good_probe() {
    let backend = Backend::start().await;
    let yaml = route_yaml("    budget: 10s\n    concurrency: 8").replace(
        "circuit: { enabled: false }",
        "circuit: { consecutive_failures: 3, cooldown: 300ms }",
    );
    let gw = Gateway::start(&yaml, &backend.url()).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            get(&c, &gw.url("/e?status=500")).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let open = get(&c, &gw.url("/e")).await;
    open.assert_refusal("circuit_open");
    assert!(open.elapsed < Duration::from_millis(200));
    assert_eq!(
        backend.count(|s| &s.requests),
        3,
        "refused without reaching the upstream"
    );
    assert!(gw
        .metrics()
        .await
        .contains("breakwater_circuit_open{upstream=\"app\"} 1"));

    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(get(&c, &gw.url("/probe")).await.status, StatusCode::OK);
    assert_eq!(get(&c, &gw.url("/after")).await.status, StatusCode::OK);
    assert!(gw
        .metrics()
        .await
        .contains("breakwater_circuit_open{upstream=\"app\"} 0"));
}

#[tokio::test]
async fn retries_stay_inside_the_budget_and_the_retry_budget() {
    // Every attempt answers 503 after 150 ms; up to 5 retries would be allowed by count, but
    // each must fit in the 500 ms budget.
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 500ms\n    concurrency: 8\n    retry: { attempts: 5, on_status: [503], budget_ratio: 1.0, min_per_second: 100 }",
        ),
        &backend.url(),
    )
    .await;
    let c = client();
    for _ in 0..4 {
        let a = get(&c, &gw.url("/flaky?status=503&delay=150")).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(a.elapsed < Duration::from_millis(800), "{:?}", a.elapsed);
    }
    let attempts = backend.count(|s| &s.requests);
    assert!(
        (5..=12).contains(&attempts),
        "{attempts} attempts for 4 requests"
    );

    // With a 20% retry budget and no floor, 20 requests may add at most 4 retries.
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 5s\n    concurrency: 8\n    retry: { attempts: 3, on_status: [503], budget_ratio: 0.2, min_per_second: 0 }",
        ),
        &backend.url(),
    )
    .await;
    for _ in 0..20 {
        get(&c, &gw.url("/flaky?status=503")).await;
    }
    let attempts = backend.count(|s| &s.requests);
    assert!(
        (21..=24).contains(&attempts),
        "{attempts} attempts for 20 requests"
    );
    assert!(gw
        .metrics()
        .await
        .contains("breakwater_retries_total{route=\"api\",reason=\"status\"}"));

    // POST is not idempotent: never retried on a status.
    let before = backend.count(|s| &s.requests);
    post(&c, &gw.url("/flaky?status=503"), b"{}").await;
    assert_eq!(backend.count(|s| &s.requests), before + 1);
}

/// A resent request is the one that went out the first time (it is kept packed between the
/// attempts): the same headers in the same order, repeated names included, and the same body;
/// only the budget header is its own.
#[tokio::test]
async fn a_resent_request_is_the_request_sent_the_first_time() {
    let backend = Backend::start().await;
    let gw = Gateway::start(
        &route_yaml(
            "    budget: 5s\n    retry: { attempts: 1, on_status: [503], budget_ratio: 1.0, min_per_second: 100 }",
        ),
        &backend.url(),
    )
    .await;
    let req = http::Request::put(gw.url("/flaky?status=503"))
        .header("x-trace", "first")
        .header("accept", "*/*")
        .header("x-trace", "second")
        .header(
            "x-opaque",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .header("content-type", "text/plain")
        .body(body(&b"hello"[..]))
        .unwrap();
    let a = send(&client(), req).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);

    let seen = backend.stats.headers.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "the first attempt and one resend");
    let lines = |h: &http::HeaderMap| -> Vec<(String, Vec<u8>)> {
        h.iter()
            .filter(|(name, _)| name.as_str() != "x-breakwater-budget-ms")
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect()
    };
    assert_eq!(lines(&seen[1].1), lines(&seen[0].1));
    let traces: Vec<_> = seen[1].1.get_all("x-trace").iter().collect();
    assert_eq!(traces, ["first", "second"]);
    assert_eq!(seen[1].1["x-opaque"].as_bytes(), b"caf\xe9");
    assert!(seen[1].1.contains_key("x-breakwater-budget-ms"));
    assert_eq!(seen[0].0, seen[1].0, "the same target");
    assert_eq!(backend.count(|s| &s.body_bytes), 2 * b"hello".len());
}

#[tokio::test]
async fn adaptive_limit_reaches_the_backends_workers() {
    // 4 workers, 10 ms each: beyond 4 in flight, latency grows.
    let backend = Backend::with(BackendOptions {
        workers: Some(4),
        service_time: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    for initial in [24, 1] {
        let gw = Gateway::start(
            &route_yaml(&format!(
                "    budget: 10s\n    concurrency: {{ mode: auto, min: 1, max: 32, initial: {initial} }}\n    queue: {{ max_depth: 1000, max_wait: 10s }}"
            )),
            &backend.url(),
        )
        .await;
        let c = client();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..24 {
            let (c, url, done) = (c.clone(), gw.url("/work"), done.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..60 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    get(&c, &url).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let limit = gw.route("api").admission.snapshot().limit;
        eprintln!("from {initial}: limit {limit}");
        // From below the workers it climbs (usually to 5-24 here; on a loaded machine real
        // latencies are noisy enough that a step's gain is not always confirmed in this short
        // run, so only the climb is asserted: where it settles is the simulations' job, in
        // src/admission/adaptive.rs). From above, 24 callers never fill 24 slots, so no queue
        // forms and nothing says the limit is too high: it is left alone (it shrinks on a loss
        // of throughput or on the budget's latency guard, not on latency).
        let floor = if initial == 1 { 2 } else { 4 };
        assert!(
            (floor..=32).contains(&limit),
            "from {initial} the limit should reach at least {floor}, got {limit}"
        );
    }
}
