//! Caller authentication end to end: API keys (with rotation), HTTP Basic, source allowlists
//! with X-Forwarded-For from trusted proxies, per-route overrides, credential stripping, and the
//! guarantee that a refused caller consumes no admission slot and reaches no backend.
//! Everything runs in process on loopback; secrets come from an explicit environment.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY_OLD: &str = "old-key-7f3a9c2e51b84d06";
const KEY_NEW: &str = "new-key-c0ffee1234567890";
const PASSWORD: &str = "correct-horse-battery";

/// Starts a gateway from `yaml` with secrets taken from `env` (never the process environment).
async fn start(yaml: &str, backend: &Backend, env: &[(&str, &str)]) -> Gateway {
    let text = format!(
        "server:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n{}",
        yaml.replace("{backend}", &backend.url())
    );
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let loaded = breakwater::prepare::from_yaml(&text, env).expect("test config is valid");
    let running = breakwater::gateway::start(loaded)
        .await
        .expect("gateway starts");
    Gateway {
        addr: running.addr,
        admin: running.admin_addr,
        running: Some(running),
    }
}

fn one_route(route_name: &str, auth: &str) -> String {
    format!(
        r#"
upstreams:
  app:
    url: "{{backend}}"
    pool: {{ max_connections: 4, min_idle: 1 }}
    circuit: {{ enabled: false }}
routes:
  - name: {route_name}
    match: {{ path_prefix: / }}
    upstream: app
    auth:
{auth}
"#
    )
}

fn keys_env() -> Vec<(&'static str, &'static str)> {
    vec![(
        "BW_TEST_KEYS",
        "old-key-7f3a9c2e51b84d06,new-key-c0ffee1234567890",
    )]
}

async fn get_with(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(c, req.body(body(Bytes::new())).unwrap()).await
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

fn assert_denied(a: &Answer, status: StatusCode, reason: &str) {
    assert_eq!(a.status, status, "body {:?}", a.body);
    assert_eq!(a.reason(), Some(reason));
    assert!(
        a.header("retry-after").is_none(),
        "auth failures are not refusals"
    );
    let j = a.json();
    assert_eq!(j["error"], reason);
    assert!(j["request_id"].is_string());
    assert!(j.get("retry_after_s").is_none());
}

#[tokio::test]
async fn api_key_right_wrong_and_missing() {
    let backend = Backend::start().await;
    let gw = start(
        &one_route(
            "keyed",
            "      api_keys: { header: x-api-key, keys_env: BW_TEST_KEYS }",
        ),
        &backend,
        &keys_env(),
    )
    .await;
    let c = client();

    let ok = get_with(
        &c,
        &gw.url("/x"),
        &[("x-api-key", KEY_OLD), ("x-other", "kept")],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let seen = backend.last_request().1;
    assert!(seen.get("x-api-key").is_none(), "key forwarded: {seen:?}");
    assert_eq!(seen["x-other"], "kept");

    let before = backend.count(|s| &s.requests);
    let wrong = get_with(&c, &gw.url("/x"), &[("x-api-key", "not-the-key-at-all")]).await;
    let near = get_with(
        &c,
        &gw.url("/x"),
        &[("x-api-key", &KEY_OLD[..KEY_OLD.len() - 1])],
    )
    .await;
    let missing = get(&c, &gw.url("/x")).await;
    for a in [&wrong, &near, &missing] {
        assert_denied(a, StatusCode::UNAUTHORIZED, "unauthorized");
        // Only Basic gets a challenge.
        assert!(a.header("www-authenticate").is_none());
    }
    // Missing and wrong keys read exactly the same.
    assert_eq!(wrong.json()["message"], missing.json()["message"]);
    assert_eq!(near.json()["message"], missing.json()["message"]);
    assert_eq!(
        backend.count(|s| &s.requests),
        before,
        "refused calls reached the backend"
    );
}

#[tokio::test]
async fn two_keys_are_valid_at_once_for_rotation() {
    let backend = Backend::start().await;
    let gw = start(
        &one_route("rotating", "      api_keys: { keys_env: BW_TEST_KEYS }"),
        &backend,
        &keys_env(),
    )
    .await;
    let c = client();
    for key in [KEY_OLD, KEY_NEW] {
        let a = get_with(&c, &gw.url("/x"), &[("x-api-key", key)]).await;
        assert_eq!(a.status, StatusCode::OK, "key {key}");
    }
    // A key in another header does not count.
    let a = get_with(&c, &gw.url("/x"), &[("x-api-token", KEY_NEW)]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn basic_right_wrong_and_missing() {
    let backend = Backend::start().await;
    let gw = start(
        &one_route(
            "basic",
            "      basic: { username: genesys, password_env: BW_TEST_PASSWORD }",
        ),
        &backend,
        &[("BW_TEST_PASSWORD", PASSWORD)],
    )
    .await;
    let c = client();

    let ok = get_with(
        &c,
        &gw.url("/x"),
        &[("authorization", &basic("genesys", PASSWORD))],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    let seen = backend.last_request().1;
    assert!(
        seen.get("authorization").is_none(),
        "gateway credentials forwarded: {seen:?}"
    );

    let before = backend.count(|s| &s.requests);
    let wrong_pass = get_with(
        &c,
        &gw.url("/x"),
        &[("authorization", &basic("genesys", "nope"))],
    )
    .await;
    let wrong_user = get_with(
        &c,
        &gw.url("/x"),
        &[("authorization", &basic("someone", PASSWORD))],
    )
    .await;
    let bearer = get_with(&c, &gw.url("/x"), &[("authorization", "Bearer abc")]).await;
    let missing = get(&c, &gw.url("/x")).await;
    for a in [&wrong_pass, &wrong_user, &bearer, &missing] {
        assert_denied(a, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Basic realm=\"breakwater\"")
        );
        assert_eq!(a.json()["message"], missing.json()["message"]);
    }
    assert_eq!(backend.count(|s| &s.requests), before);
}

#[tokio::test]
async fn either_mechanism_passes_when_both_are_configured() {
    let backend = Backend::start().await;
    let mut env = keys_env();
    env.push(("BW_TEST_PASSWORD", PASSWORD));
    let gw = start(
        &one_route(
            "both",
            "      api_keys: { keys_env: BW_TEST_KEYS }\n      basic: { username: genesys, password_env: BW_TEST_PASSWORD }",
        ),
        &backend,
        &env,
    )
    .await;
    let c = client();
    let by_key = get_with(&c, &gw.url("/x"), &[("x-api-key", KEY_NEW)]).await;
    assert_eq!(by_key.status, StatusCode::OK);
    let by_basic = get_with(
        &c,
        &gw.url("/x"),
        &[("authorization", &basic("genesys", PASSWORD))],
    )
    .await;
    assert_eq!(by_basic.status, StatusCode::OK);
    let neither = get(&c, &gw.url("/x")).await;
    assert_denied(&neither, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        neither.header("www-authenticate"),
        Some("Basic realm=\"breakwater\"")
    );
}

#[tokio::test]
async fn allow_cidrs_allow_and_deny_the_peer() {
    let backend = Backend::start().await;
    let c = client();

    let gw = start(
        &one_route("cidr-allow", "      allow_cidrs: [ \"127.0.0.1/32\" ]"),
        &backend,
        &[],
    )
    .await;
    assert_eq!(get(&c, &gw.url("/x")).await.status, StatusCode::OK);

    let gw = start(
        &one_route(
            "cidr-deny",
            "      allow_cidrs: [ \"10.0.0.0/8\" ]\n      api_keys: { keys_env: BW_TEST_KEYS }",
        ),
        &backend,
        &keys_env(),
    )
    .await;
    let before = backend.count(|s| &s.requests);
    // Outside the allowlist: 403 even with a valid key (the source is checked first).
    let a = get_with(&c, &gw.url("/x"), &[("x-api-key", KEY_OLD)]).await;
    assert_denied(&a, StatusCode::FORBIDDEN, "forbidden");
    assert!(a.header("www-authenticate").is_none());
    // A forged X-Forwarded-For from an untrusted peer changes nothing.
    let a = get_with(
        &c,
        &gw.url("/x"),
        &[("x-api-key", KEY_OLD), ("x-forwarded-for", "10.1.2.3")],
    )
    .await;
    assert_denied(&a, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(backend.count(|s| &s.requests), before);
}

#[tokio::test]
async fn x_forwarded_for_is_believed_only_from_trusted_proxies() {
    let backend = Backend::start().await;
    let c = client();
    let xff = [("x-forwarded-for", "203.0.113.5")];

    let trusted = start(
        &one_route(
            "xff-trusted",
            "      allow_cidrs: [ \"203.0.113.0/24\" ]\n      trusted_proxies: [ \"127.0.0.0/8\" ]",
        ),
        &backend,
        &[],
    )
    .await;
    let a = get_with(&c, &trusted.url("/x"), &xff).await;
    assert_eq!(a.status, StatusCode::OK, "body {:?}", a.body);
    // The loopback peer itself is not in the allowlist.
    assert_denied(
        &get(&c, &trusted.url("/x")).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // A spoofed left-most entry does not help: the right-most untrusted hop is the source.
    let a = get_with(
        &c,
        &trusted.url("/x"),
        &[("x-forwarded-for", "203.0.113.5, 198.51.100.7")],
    )
    .await;
    assert_denied(&a, StatusCode::FORBIDDEN, "forbidden");

    let untrusted = start(
        &one_route("xff-untrusted", "      allow_cidrs: [ \"203.0.113.0/24\" ]"),
        &backend,
        &[],
    )
    .await;
    let a = get_with(&c, &untrusted.url("/x"), &xff).await;
    assert_denied(&a, StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn per_route_override_one_open_one_protected() {
    let backend = Backend::start().await;
    let yaml = r#"
upstreams:
  app:
    url: "{backend}"
    pool: { max_connections: 4, min_idle: 1 }
auth:
  api_keys: { keys_env: BW_TEST_KEYS }
routes:
  - name: open
    match: { path_prefix: /health }
    upstream: app
    auth: { disabled: true }
  - name: protected
    match: { path_prefix: / }
    upstream: app
"#;
    let gw = start(yaml, &backend, &keys_env()).await;
    let c = client();
    let open = get(&c, &gw.url("/health")).await;
    assert_eq!(open.status, StatusCode::OK);
    // An open route forwards whatever the caller sent; nothing is stripped.
    let a = get_with(
        &c,
        &gw.url("/health"),
        &[("x-api-key", "callers-own-value")],
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(backend.last_request().1["x-api-key"], "callers-own-value");

    assert_denied(
        &get(&c, &gw.url("/data")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let a = get_with(&c, &gw.url("/data"), &[("x-api-key", KEY_NEW)]).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn refused_callers_consume_no_admission_slot_and_no_body_read() {
    let backend = Backend::start().await;
    let gw = start(
        &one_route(
            "guarded",
            "      api_keys: { keys_env: BW_TEST_KEYS }\n    concurrency: 1\n    queue: { max_depth: 0 }",
        ),
        &backend,
        &keys_env(),
    )
    .await;
    let c = client();
    // Fill the only slot with an authenticated request held at the backend.
    let c2 = c.clone();
    let url = gw.url("/hold?hold=1");
    let held = tokio::spawn(async move { get_with(&c2, &url, &[("x-api-key", KEY_OLD)]).await });
    backend
        .wait_until("request held", |s| s.held.load(Ordering::SeqCst) == 1)
        .await;
    // With the slot taken and no queue, an authenticated caller is shed...
    get_with(&c, &gw.url("/x"), &[("x-api-key", KEY_OLD)])
        .await
        .assert_refusal("queue_full");
    // ...but an unauthenticated one is answered 401 before admission is ever asked.
    let a = send(
        &c,
        Request::post(gw.url("/x"))
            .body(body(Bytes::from_static(b"{\"payload\":1}")))
            .unwrap(),
    )
    .await;
    assert_denied(&a, StatusCode::UNAUTHORIZED, "unauthorized");
    let snap = gw.route("guarded").admission.snapshot();
    assert_eq!((snap.inflight, snap.queued), (1, 0));

    backend.release(1);
    assert_eq!(held.await.unwrap().status, StatusCode::OK);
    assert_eq!(backend.count(|s| &s.requests), 1);
    assert_eq!(backend.count(|s| &s.body_bytes), 0);

    // Failures are counted as auth failures, not as shed load.
    let m = gw.metrics().await;
    assert!(
        m.contains("breakwater_auth_failures_total{route=\"guarded\",reason=\"unauthorized\"} 1"),
        "{m}"
    );
    assert!(
        !m.contains("breakwater_shed_total{route=\"guarded\",reason=\"unauthorized\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn forbidden_callers_are_counted_by_reason() {
    let backend = Backend::start().await;
    let gw = start(
        &one_route("fenced", "      allow_cidrs: [ \"10.0.0.0/8\" ]"),
        &backend,
        &[],
    )
    .await;
    let c = client();
    for _ in 0..2 {
        assert_denied(
            &get(&c, &gw.url("/x")).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        );
    }
    let m = gw.metrics().await;
    assert!(
        m.contains("breakwater_auth_failures_total{route=\"fenced\",reason=\"forbidden\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("breakwater_auth_failures_total{route=\"fenced\",reason=\"unauthorized\"} 0"),
        "{m}"
    );
}

#[tokio::test]
async fn a_refused_body_does_not_desync_the_connection() {
    let backend = Backend::start().await;
    let gw = start(
        &one_route("pipelined", "      api_keys: { keys_env: BW_TEST_KEYS }"),
        &backend,
        &keys_env(),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // The body looks like a request head: if it were read as one, it would reach the backend.
    let smuggled = "GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    let first = format!(
        "POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    s.write_all(first.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let second = format!(
        "GET /second HTTP/1.1\r\nhost: a\r\nx-api-key: {KEY_OLD}\r\nconnection: close\r\n\r\n"
    );
    // Either the connection was closed or the next request is read correctly.
    if s.write_all(second.as_bytes()).await.is_ok() {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        let rest = String::from_utf8_lossy(&rest).to_string();
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 200"),
            "{rest}"
        );
    }
    let seen: Vec<String> = backend
        .stats
        .headers
        .lock()
        .unwrap()
        .iter()
        .map(|(uri, _)| uri.clone())
        .collect();
    assert!(!seen.iter().any(|u| u.contains("smuggled")), "{seen:?}");
}

#[tokio::test]
async fn admin_config_shows_auth_without_secrets() {
    let backend = Backend::start().await;
    let mut env = keys_env();
    env.push(("BW_TEST_PASSWORD", PASSWORD));
    let gw = start(
        &one_route(
            "shown",
            "      api_keys: { keys_env: BW_TEST_KEYS }\n      basic: { username: genesys, password_env: BW_TEST_PASSWORD }",
        ),
        &backend,
        &env,
    )
    .await;
    let c = client();
    let a = get(&c, &format!("http://{}/config", gw.admin.unwrap())).await;
    assert_eq!(a.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&a.body).to_string();
    for secret in [KEY_OLD, KEY_NEW, PASSWORD] {
        assert!(!text.contains(secret), "secret in /config: {text}");
    }
    let j = a.json();
    let auth = &j["routes"][0]["auth"];
    assert_eq!(auth["from"], "route");
    assert_eq!(auth["api_keys"]["keys_env"], "BW_TEST_KEYS");
    assert_eq!(auth["api_keys"]["keys_loaded"], 2);
    assert_eq!(auth["basic"]["username"], "genesys");
    assert_eq!(auth["basic"]["password_env"], "BW_TEST_PASSWORD");
}

#[test]
fn config_refuses_literal_secrets_and_names_missing_variables() {
    let yaml = r#"
upstreams:
  app: { url: "http://127.0.0.1:9" }
auth:
  api_keys: { header: x-api-key, keys: "literal-key-0123456789" }
  basic: { username: genesys, password_env: BREAKWATER_BASIC_PASSWORD }
routes:
  - name: r
    upstream: app
    auth:
      api_keys: { keys_env: BREAKWATER_API_KEYS }
"#;
    let err = breakwater::prepare::from_yaml(yaml, Vec::new()).unwrap_err();
    let problems = err.problems();
    let has = |key: &str, text: &str| {
        problems
            .iter()
            .any(|p| p.key == key && p.message.contains(text))
    };
    assert!(has("auth.api_keys.keys", "keys_env"), "{err}");
    assert!(has("auth.api_keys.keys", "keys_file"), "{err}");
    assert!(
        has(
            "auth.basic.password_env",
            "BREAKWATER_BASIC_PASSWORD is not set"
        ),
        "{err}"
    );
    assert!(
        has(
            "routes[0].auth.api_keys.keys_env",
            "BREAKWATER_API_KEYS is not set"
        ),
        "{err}"
    );
    assert!(!err.to_string().contains("literal-key-0123456789"), "{err}");

    // The same file loads once the variables are given (and the literal is gone).
    let fixed = yaml.replace(
        "keys: \"literal-key-0123456789\"",
        "keys_env: BREAKWATER_API_KEYS",
    );
    let env = vec![
        (
            "BREAKWATER_API_KEYS".to_string(),
            format!("{KEY_OLD},{KEY_NEW}"),
        ),
        (
            "BREAKWATER_BASIC_PASSWORD".to_string(),
            PASSWORD.to_string(),
        ),
    ];
    breakwater::prepare::from_yaml(&fixed, env).expect("valid with the variables set");
}
