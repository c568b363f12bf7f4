use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const MINIMAL: &str = r#"
upstreams:
  analytics:
    url: "http://127.0.0.1:8000"
routes:
  - name: sentiment
    match: { path_prefix: /v1/sentiment, methods: [POST] }
    upstream: analytics
    budget: 8s
    max_request_body: 64KiB
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = from_yaml(MINIMAL, env(&[])).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    let up = &c.upstreams["analytics"];
    assert_eq!(up.pool.max_connections, 64);
    assert_eq!(up.pool.min_idle, 4);
    assert_eq!(up.pool.idle_timeout, Duration::from_secs(45));
    let r = &c.routes[0];
    assert_eq!(r.methods, vec![Method::POST]);
    assert_eq!(r.budget, Duration::from_secs(8));
    assert_eq!(r.max_request_body, 64 * 1024);
    assert_eq!(r.timeout_status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.concurrency, Concurrency::Fixed(64));
}

#[test]
fn env_overrides_any_key_including_list_items() {
    let c = from_yaml(
        MINIMAL,
        env(&[
            (
                "BREAKWATER__UPSTREAMS__ANALYTICS__URL",
                "http://10.1.2.3:9000",
            ),
            ("BREAKWATER__SERVER__MAX_CONNECTIONS", "42"),
            ("BREAKWATER__ROUTES__0__BUDGET", "3s"),
            ("BREAKWATER__ROUTES__0__MATCH__METHODS", "GET,POST"),
            ("BREAKWATER_CONFIG", "/ignored.yaml"),
            ("HOME", "/root"),
        ]),
    )
    .unwrap();
    assert_eq!(c.upstreams["analytics"].host, "10.1.2.3");
    assert_eq!(c.upstreams["analytics"].port, 9000);
    assert_eq!(c.server.max_connections, 42);
    assert_eq!(c.routes[0].budget, Duration::from_secs(3));
    assert_eq!(c.routes[0].methods, vec![Method::GET, Method::POST]);
}

#[test]
fn env_key_mapping() {
    assert_eq!(
        env_key_to_path("BREAKWATER__SERVER__LISTEN").unwrap(),
        "server.listen"
    );
    assert_eq!(
        env_key_to_path("BREAKWATER__ROUTES__1__QUEUE__MAX_WAIT").unwrap(),
        "routes[1].queue.max_wait"
    );
    assert!(env_key_to_path("BREAKWATER_CONFIG").is_none());
    assert!(env_key_to_path("BREAKWATER__").is_none());
    assert!(env_key_to_path("BREAKWATER__A____B").is_none());
}

#[test]
fn unknown_keys_are_errors_naming_the_path() {
    let text = MINIMAL.replace("budget: 8s", "budget: 8s\n    budjet: 9s");
    let err = from_yaml(&text, env(&[])).unwrap_err().to_string();
    assert!(err.contains("routes[0]"), "{err}");
    assert!(err.contains("budjet"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
server:
  listen: "nowhere"
  header_read_timeout: 0s
  max_request_body: -5KiB
upstreams:
  a:
    url: "ftp://x"
    pool: { max_connections: 2, min_idle: 5, idle_timeout: soon }
  b:
    url: "not a url at all"
routes:
  - name: one
    upstream: missing
    budget: 2
  - name: one
    upstream: a
    timeout_status: 500
"#;
    let problems = from_yaml(text, env(&[])).unwrap_err().problems();
    let rendered: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let want = [
        ("server.listen", "nowhere"),
        ("server.header_read_timeout", "greater than zero"),
        ("server.max_request_body", "negative"),
        ("upstreams.a.url", "ftp"),
        ("upstreams.a.pool.min_idle", "larger than max_connections"),
        ("upstreams.a.pool.idle_timeout", "soon"),
        ("upstreams.b.url", "not a url at all"),
        ("routes[0].upstream", "`missing`: no such upstream"),
        ("routes[0].budget", "missing unit"),
        ("routes[1].name", "duplicate"),
        ("routes[1].timeout_status", "500"),
    ];
    for (key, text) in want {
        assert!(
            problems
                .iter()
                .any(|p| p.key == key && p.message.contains(text)),
            "no problem for {key} containing {text:?}; got:\n{}",
            rendered.join("\n")
        );
    }
}

#[test]
fn concurrency_forms() {
    let base = MINIMAL.replace("budget: 8s", "budget: 8s\n    concurrency: CONC");
    let c = from_yaml(&base.replace("CONC", "4"), env(&[])).unwrap();
    assert_eq!(c.routes[0].concurrency, Concurrency::Fixed(4));
    let c = from_yaml(&base.replace("CONC", "auto"), env(&[])).unwrap();
    assert!(matches!(
        c.routes[0].concurrency,
        Concurrency::Adaptive {
            min: 1,
            max: 64,
            ..
        }
    ));
    let c = from_yaml(
        &base.replace("CONC", "{ mode: auto, min: 2, max: 10 }"),
        env(&[]),
    )
    .unwrap();
    assert_eq!(
        c.routes[0].concurrency,
        Concurrency::Adaptive {
            min: 2,
            max: 10,
            initial: 4
        }
    );
    let err = from_yaml(&base.replace("CONC", "lots"), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("routes[0].concurrency") && err.contains("lots"),
        "{err}"
    );
}

#[test]
fn overload_and_fallback_bodies_must_be_json() {
    let text = MINIMAL.replace(
        "budget: 8s",
        "budget: 8s\n    overload: { body: 'nope' }\n    fallback: { status: 200, body: '{\"sentiment\":' }",
    );
    let problems = from_yaml(&text, env(&[])).unwrap_err().problems();
    assert!(problems.iter().any(|p| p.key == "routes[0].overload.body"));
    assert!(problems.iter().any(|p| p.key == "routes[0].fallback.body"));
}

#[test]
fn embedded_default_is_valid() {
    let c = from_yaml(EMBEDDED_DEFAULT, env(&[])).unwrap();
    assert_eq!(c.upstreams["app"].authority(), "127.0.0.1:8000");
}
