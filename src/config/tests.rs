use std::time::Duration;

use http::{Method, StatusCode};

use super::*;
use crate::prepare::Loaded;

/// Validation and then the files and secrets the config names, as start, check and reload do.
fn load(text: &str, env: Vec<(String, String)>) -> Result<Loaded, ConfigError> {
    crate::prepare::from_yaml(text, env)
}

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
    assert_eq!(c.upstreams["analytics"].endpoints[0].host, "10.1.2.3");
    assert_eq!(c.upstreams["analytics"].endpoints[0].port, 9000);
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
    assert!(err.contains("routes[0].budjet: unknown key"), "{err}");
}

#[test]
fn every_unknown_key_is_reported_with_its_path_and_a_suggestion_along_with_bad_values() {
    let text = r#"
servr: { listen: "127.0.0.1:8080" }
server: { drain_timout: 5s, header_read_timeout: soon }
upstreams:
  analytics:
    url: "http://127.0.0.1:8000"
    pool: { max_conections: 8 }
routes:
  - name: sentiment
    match: { path_prefx: /v1 }
    upstream: analytics
    budgte: 8s
    concurency: 4
    budget: 2
    zzz_unrelated: 1
    concurrency: { mode: auto, mxa: 9 }
"#;
    let problems = from_yaml(text, env(&[])).unwrap_err().problems();
    let rendered: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    for line in [
        "servr: unknown key; did you mean `server`?",
        "server.drain_timout: unknown key; did you mean `drain_timeout`?",
        "upstreams.analytics.pool.max_conections: unknown key; did you mean `max_connections`?",
        "routes[0].match.path_prefx: unknown key; did you mean `path_prefix`?",
        "routes[0].budgte: unknown key; did you mean `budget`?",
        "routes[0].concurency: unknown key; did you mean `concurrency`?",
        "routes[0].concurrency.mxa: unknown key; did you mean `max`?",
    ] {
        assert!(
            rendered.iter().any(|r| r == line),
            "no {line:?} in:\n{}",
            rendered.join("\n")
        );
    }
    let unrelated = rendered
        .iter()
        .find(|r| r.starts_with("routes[0].zzz_unrelated: unknown key (the keys here are `name`"))
        .unwrap_or_else(|| panic!("{rendered:?}"));
    assert!(unrelated.contains("`budget`"), "{unrelated}");
    // The values are still checked, in the same report.
    assert_problem(&rendered, "server.header_read_timeout", "soon");
    assert_problem(&rendered, "routes[0].budget", "missing unit");
}

#[test]
fn a_value_of_the_wrong_type_is_reported_with_the_unknown_keys() {
    let text = MINIMAL.replace("budget: 8s", "budget: [8s]\n    budgte: 9s");
    let rendered: Vec<String> = from_yaml(&text, env(&[]))
        .unwrap_err()
        .problems()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_problem(&rendered, "routes[0].budgte", "did you mean `budget`?");
    assert_problem(&rendered, "routes[0].budget", "invalid type");
}

#[test]
fn mistakes_in_environment_variables_are_reported_under_the_variable() {
    let two_routes = format!("{MINIMAL}  - {{ name: other, upstream: analytics }}\n");
    let problems = from_yaml(
        &two_routes,
        env(&[
            ("BREAKWATER__ROUTES__0__BUDGTE", "3s"),
            ("BREAKWATER__ROUTES__3__BUDGET", "2s"),
            ("BREAKWATER__SERVR__LISTEN", "127.0.0.1:1"),
            ("BREAKWATER__ROUTES__1__BUDGET", "2"),
            ("BREAKWATER__ROUTES__1__MATCH__METHODS__0", "GET"),
            ("BREAKWATER__ROUTES__0__NAME", "fine"),
        ]),
    )
    .unwrap_err()
    .problems();
    let rendered: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    for line in [
        "BREAKWATER__ROUTES__0__BUDGTE: sets `routes[0].budgte`, which is not a key; did you mean BREAKWATER__ROUTES__0__BUDGET?",
        "BREAKWATER__ROUTES__3__BUDGET: sets `routes[3].budget`, but the file has 2 items in `routes` (`routes[0]` to `routes[1]`); a variable can change a list item the file has, not add one",
        "BREAKWATER__SERVR__LISTEN: sets `servr`, which is not a key; did you mean BREAKWATER__SERVER__LISTEN?",
        "BREAKWATER__ROUTES__1__MATCH__METHODS__0: sets `routes[1].match.methods[0]`, but `routes[1].match.methods` is a single value: set `BREAKWATER__ROUTES__1__MATCH__METHODS` itself",
        "routes[1].budget: `2`: missing unit (write e.g. `250ms`, `2s`, `5m`) (set by BREAKWATER__ROUTES__1__BUDGET)",
    ] {
        assert!(
            rendered.iter().any(|r| r == line),
            "no {line:?} in:\n{}",
            rendered.join("\n")
        );
    }
    assert!(
        !rendered
            .iter()
            .any(|r| r.contains("fine") || r.contains("unit value")),
        "{rendered:?}"
    );

    // A value of the wrong type from a variable names it too.
    let rendered: Vec<String> = from_yaml(
        MINIMAL,
        env(&[(
            "BREAKWATER__UPSTREAMS__ANALYTICS__POOL__MAX_CONNECTIONS",
            "many",
        )]),
    )
    .unwrap_err()
    .problems()
    .iter()
    .map(|p| p.to_string())
    .collect();
    assert_problem(
        &rendered,
        "upstreams.analytics.pool.max_connections",
        "(set by BREAKWATER__UPSTREAMS__ANALYTICS__POOL__MAX_CONNECTIONS)",
    );

    // No list in the file at all.
    let rendered: Vec<String> = from_yaml(
        "upstreams: { a: { url: \"http://127.0.0.1:1\" } }\n",
        env(&[("BREAKWATER__ROUTES__0__UPSTREAM", "a")]),
    )
    .unwrap_err()
    .problems()
    .iter()
    .map(|p| p.to_string())
    .collect();
    assert_problem(
        &rendered,
        "BREAKWATER__ROUTES__0__UPSTREAM",
        "the file has no items in `routes`",
    );
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
fn shipped_default_is_valid() {
    let c = from_yaml(SHIPPED_DEFAULT, env(&[])).unwrap();
    assert_eq!(
        c.upstreams["app"].endpoints[0].authority(),
        "127.0.0.1:8000"
    );
}

const KEY_A: &str = "key-a-0123456789abcdef";
const KEY_B: &str = "key-b-0123456789abcdef";

fn with_auth(global: &str, route: &str) -> String {
    format!(
        r#"
upstreams:
  analytics:
    url: "http://127.0.0.1:8000"
routes:
  - name: open
    match: {{ path_prefix: /open }}
    upstream: analytics
    auth: {{ disabled: true }}
  - name: inherits
    match: {{ path_prefix: /a }}
    upstream: analytics
  - name: own
    match: {{ path_prefix: /b }}
    upstream: analytics
{route}
{global}
"#
    )
}

#[test]
fn auth_global_default_route_override_and_disabled() {
    let text = with_auth(
        r#"auth:
  api_keys: { header: X-Api-Key, keys_env: BW_KEYS }
  allow_cidrs: [ "203.0.113.0/24", "2001:db8::/32" ]
  trusted_proxies: 10.0.0.0/8"#,
        r#"    auth:
      basic: { username: genesys, password_env: BW_PASS }"#,
    );
    let keys = format!(" {KEY_A} , {KEY_B},");
    let Loaded {
        config: c,
        prepared,
    } = load(
        &text,
        env(&[("BW_KEYS", &keys), ("BW_PASS", "a-long-password")]),
    )
    .unwrap();
    let global = c.auth.as_ref().unwrap();
    let k = global.api_keys.as_ref().unwrap();
    assert_eq!(k.header.as_str(), "x-api-key");
    let loaded = prepared.auth.as_ref().unwrap();
    assert_eq!(loaded.keys_loaded(), 2);
    assert!(std::ptr::eq(loaded.config(), &**global));
    assert_eq!(k.source, SecretSource::Env("BW_KEYS".into()));
    assert_eq!(global.allow_cidrs.len(), 2);
    assert_eq!(global.trusted_proxies[0].to_string(), "10.0.0.0/8");

    assert_eq!(c.routes[0].auth, None);
    assert_eq!(c.routes[0].auth_origin, AuthOrigin::Disabled);
    assert_eq!(c.routes[1].auth.as_ref(), Some(global));
    assert_eq!(c.routes[1].auth_origin, AuthOrigin::Global);
    // A route's own block replaces the default whole.
    let own = c.routes[2].auth.as_ref().unwrap();
    assert_eq!(c.routes[2].auth_origin, AuthOrigin::Route);
    assert!(own.api_keys.is_none() && own.allow_cidrs.is_empty());
    assert_eq!(own.basic.as_ref().unwrap().username, "genesys");

    // Secrets appear nowhere in what the gateway shows.
    let shown = describe(&c).to_string();
    for secret in [KEY_A, KEY_B, "a-long-password"] {
        assert!(!shown.contains(secret), "{shown}");
        assert!(!format!("{c:?}").contains(secret));
        assert!(!format!("{prepared:?}").contains(secret));
        assert!(!loaded.summary().contains(secret));
    }
    assert!(loaded.summary().contains("2 key(s) from env BW_KEYS"));
    // Routes that inherit the top-level block share its loaded keys.
    assert!(!prepared.route_auth.contains_key("open"));
    assert!(Arc::ptr_eq(&prepared.route_auth["inherits"], loaded));
    assert_eq!(prepared.route_auth["own"].keys_loaded(), 0);
    let v = describe(&c);
    assert_eq!(v["auth"]["api_keys"]["keys_env"], "BW_KEYS");
    assert_eq!(v["routes"][0]["auth"]["from"], "disabled");
    assert_eq!(v["routes"][1]["auth"]["from"], "global");
    assert_eq!(v["routes"][2]["auth"]["from"], "route");
    assert_eq!(v["routes"][2]["auth"]["basic"]["password_env"], "BW_PASS");
    assert_eq!(v["routes"][2]["auth"]["basic"]["password"], "<redacted>");
}

#[test]
fn no_auth_anywhere_leaves_routes_open() {
    let c = from_yaml(MINIMAL, env(&[])).unwrap();
    assert!(c.auth.is_none());
    assert_eq!(c.routes[0].auth, None);
    assert_eq!(c.routes[0].auth_origin, AuthOrigin::None);
    assert!(describe(&c)["routes"][0]["auth"].is_null());
}

#[test]
fn secrets_from_files_are_read_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# current and next\n{KEY_A}\n{KEY_B}\n")).unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "a-long-password\n").unwrap();
    let text = with_auth(
        &format!(
            "auth:\n  api_keys: {{ keys_file: {} }}\n  basic: {{ username: u, password_file: {} }}",
            keys.display(),
            pass.display()
        ),
        "",
    );
    // Validation alone reads nothing.
    let c = from_yaml(&text, env(&[])).unwrap();
    let a = c.auth.as_ref().unwrap();
    assert_eq!(
        a.api_keys.as_ref().unwrap().source,
        SecretSource::File(keys.clone())
    );
    let a = load(&text, env(&[])).unwrap().prepared.auth.unwrap();
    assert_eq!(a.keys_loaded(), 2);
    // The trailing newline of the file is not part of the password.
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        "Basic dTphLWxvbmctcGFzc3dvcmQ=".parse().unwrap(),
    );
    crate::auth::authenticate(&a, &mut h, "127.0.0.1:1".parse().unwrap()).unwrap();
    // Reloading reads the file again.
    std::fs::write(&keys, KEY_A).unwrap();
    let a = load(&text, env(&[])).unwrap().prepared.auth.unwrap();
    assert_eq!(a.keys_loaded(), 1);
    // And a file that went missing is a problem of the key that names it.
    std::fs::remove_file(&keys).unwrap();
    let p = load(&text, env(&[])).unwrap_err().problems();
    assert!(
        p.iter()
            .any(|p| p.key == "auth.api_keys.keys_file" && p.message.contains("cannot read")),
        "{p:?}"
    );
}

#[test]
fn auth_problems_name_the_key_and_never_the_secret() {
    let text = r#"
upstreams:
  analytics:
    url: "http://127.0.0.1:8000"
auth:
  api_keys: { keys_env: BREAKWATER_API_KEYS }
  basic: { username: genesys, password: hunter2-literal }
routes:
  - name: a
    upstream: analytics
    auth:
      api_keys: { header: x-key, keys: [ "literal-key-0123456789" ] }
      allow_cidrs: [ "203.0.113.5/24", "nope" ]
  - name: b
    upstream: analytics
    auth: { api_keys: { keys_env: SHORT, keys_file: /x } }
  - name: c
    upstream: analytics
    auth: { api_keys: { keys_file: /nonexistent/breakwater-keys } }
  - name: d
    upstream: analytics
    auth: { disabled: true, allow_cidrs: [ "10.0.0.0/8" ] }
  - name: e
    upstream: analytics
    auth: {}
  - name: f
    upstream: analytics
    auth: { api_keys: { keys_env: SHORT, header: host }, trusted_proxies: [ "10.0.0.0/8" ] }
  - name: g
    upstream: analytics
    auth:
      basic: { username: "a:pasted-password", password_env: SHORT }
      api_keys: { header: authorization, keys_env: "not a name!" }
"#;
    let problems = load(text, env(&[("SHORT", "tiny")]))
        .unwrap_err()
        .problems();
    let rendered: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let want = [
        ("auth.api_keys.keys_env", "BREAKWATER_API_KEYS is not set"),
        ("auth.basic.password", "password_env"),
        ("auth.basic.password", "password_file"),
        ("routes[0].auth.api_keys.keys", "keys_env"),
        ("routes[0].auth.allow_cidrs", "host bits"),
        ("routes[0].auth.allow_cidrs", "`nope`"),
        ("routes[1].auth.api_keys.keys_env", "only one of"),
        ("routes[2].auth.api_keys.keys_file", "cannot read"),
        ("routes[3].auth.disabled", "cannot also"),
        ("routes[4].auth", "nothing to check"),
        ("routes[5].auth.api_keys.keys_env", "shorter than 16"),
        ("routes[5].auth.api_keys.header", "`host`"),
        ("routes[5].auth.trusted_proxies", "allow_cidrs"),
        ("routes[6].auth.basic.username", "`a:…`"),
        ("routes[6].auth.basic.password_env", "shorter than 12"),
        ("routes[6].auth.api_keys.header", "Basic"),
        (
            "routes[6].auth.api_keys.keys_env",
            "not an environment variable name",
        ),
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
    let all = rendered.join("\n");
    for secret in [
        "hunter2-literal",
        "literal-key-0123456789",
        "tiny",
        "not a name!",
        "pasted-password",
    ] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
}

#[test]
fn auth_lists_can_come_from_the_environment() {
    let text = with_auth("auth:\n  allow_cidrs: 192.0.2.0/24", "");
    let c = from_yaml(
        &text,
        env(&[(
            "BREAKWATER__AUTH__ALLOW_CIDRS",
            "203.0.113.0/24, 198.51.100.0/24",
        )]),
    )
    .unwrap();
    let a = c.auth.unwrap();
    assert_eq!(a.allow_cidrs.len(), 2);
    assert_eq!(a.allow_cidrs[1].to_string(), "198.51.100.0/24");
}

/// A self-signed certificate for `localhost` and its key, written as `{stem}.crt`/`{stem}.key`.
fn cert_files(dir: &std::path::Path, stem: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (c, k) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c.display().to_string(), k.display().to_string())
}

fn with_server(server: &str, upstream: &str) -> String {
    format!(
        "server:\n{server}\nupstreams:\n  a:\n{upstream}\nroutes:\n  - name: r\n    upstream: a\n"
    )
}

fn problems_of(text: &str) -> Vec<String> {
    load(text, env(&[]))
        .unwrap_err()
        .problems()
        .iter()
        .map(|p| p.to_string())
        .collect()
}

fn assert_problem(problems: &[String], key: &str, text: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{key}: ")) && p.contains(text)),
        "no problem for {key} containing {text:?}; got:\n{}",
        problems.join("\n")
    );
}

#[test]
fn server_tls_loads_and_is_described_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_files(dir.path(), "good");
    let text = with_server(
        &format!(
            "  tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n  proxy_protocol: true\n  max_connections_per_source: 8"
        ),
        "    url: http://127.0.0.1:8000",
    );
    let Loaded {
        config: c,
        prepared,
    } = load(&text, env(&[])).unwrap();
    let tls = c.server.tls.as_ref().unwrap();
    assert_eq!(tls.cert.display().to_string(), cert);
    assert_eq!(prepared.server_tls.unwrap().fingerprint().len(), 64);
    assert!(c.server.proxy_protocol);
    assert_eq!(c.server.max_connections_per_source, Some(8));
    let v = describe(&c);
    assert_eq!(v["server"]["tls"]["cert"], cert);
    assert_eq!(v["server"]["tls"]["key"], key);
    assert_eq!(v["server"]["proxy_protocol"], true);
    assert_eq!(v["server"]["max_connections_per_source"], 8);
    let shown = v.to_string();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(!shown.contains(key_body), "key content shown: {shown}");

    // Defaults: no TLS, no PROXY protocol, no per-source limit.
    let c = from_yaml(MINIMAL, env(&[])).unwrap();
    assert!(c.server.tls.is_none() && !c.server.proxy_protocol);
    assert_eq!(c.server.max_connections_per_source, None);
    assert_eq!(describe(&c)["server"]["tls"], serde_json::Value::Null);
}

#[test]
fn server_tls_problems_name_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_files(dir.path(), "one");
    let (_, other_key) = cert_files(dir.path(), "two");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "# nothing here\n").unwrap();
    let empty = empty.display().to_string();
    let url = "    url: http://127.0.0.1:8000";

    let p = problems_of(&with_server(
        "  tls: { cert: /nonexistent/c.pem, key: /nonexistent/k.pem }",
        url,
    ));
    assert_problem(&p, "server.tls.cert", "`/nonexistent/c.pem`: cannot read");
    assert_problem(&p, "server.tls.key", "`/nonexistent/k.pem`: cannot read");

    let p = problems_of(&with_server(
        &format!("  tls: {{ cert: \"{empty}\", key: \"{empty}\" }}"),
        url,
    ));
    assert_problem(&p, "server.tls.cert", "no certificate");
    assert_problem(&p, "server.tls.key", "no private key");

    // The key of another certificate.
    let p = problems_of(&with_server(
        &format!("  tls: {{ cert: \"{cert}\", key: \"{other_key}\" }}"),
        url,
    ));
    assert_problem(&p, "server.tls.key", "does not match the certificate");
    // Cert and key swapped.
    let p = problems_of(&with_server(
        &format!("  tls: {{ cert: \"{key}\", key: \"{cert}\" }}"),
        url,
    ));
    assert_problem(&p, "server.tls.cert", "no certificate");

    let p = problems_of(&with_server(
        "  tls: {}\n  max_connections_per_source: 0",
        url,
    ));
    assert_problem(&p, "server.tls.cert", "missing");
    assert_problem(&p, "server.tls.key", "missing");
    assert_problem(&p, "server.max_connections_per_source", "`0`");

    // Key content pasted where the path goes is refused without being echoed.
    let pem = std::fs::read_to_string(&key).unwrap();
    let body = pem.lines().nth(1).unwrap().to_string();
    let text = with_server(&format!("  tls: {{ cert: \"{cert}\" }}"), url);
    let c = load(&text, env(&[("BREAKWATER__SERVER__TLS__KEY", &pem)]));
    let p: Vec<String> = c
        .unwrap_err()
        .problems()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_problem(&p, "server.tls.key", "not its content");
    assert!(!p.join("\n").contains(&body), "key echoed: {p:?}");
}

#[test]
fn https_upstreams_default_to_443_and_the_public_roots() {
    let text = with_server(
        "  listen: 127.0.0.1:0",
        "    url: https://api.example.com/base",
    );
    let c = from_yaml(&text, env(&[])).unwrap();
    let u = &c.upstreams["a"];
    let e = &u.endpoints[0];
    assert_eq!((e.host.as_str(), e.port), ("api.example.com", 443));
    let tls = u.tls.as_ref().expect("https means TLS");
    assert!(tls.ca_file.is_none() && !tls.insecure_skip_verify);
    assert_eq!(e.tls_name.as_ref().unwrap().to_str(), "api.example.com");
    let v = describe(&c);
    assert_eq!(v["upstreams"]["a"]["tls"]["insecure_skip_verify"], false);
    assert_eq!(
        v["upstreams"]["a"]["tls"]["ca_file"],
        serde_json::Value::Null
    );
    // Plain http has no TLS block.
    let c = from_yaml(MINIMAL, env(&[])).unwrap();
    assert!(c.upstreams["analytics"].tls.is_none());
    assert_eq!(
        describe(&c)["upstreams"]["analytics"]["tls"],
        serde_json::Value::Null
    );

    // An IP address is verified as one; server_name overrides it.
    let text = with_server(
        "  listen: 127.0.0.1:0",
        "    url: https://10.0.0.5:8443\n    tls: { server_name: internal.example.com }",
    );
    let c = from_yaml(&text, env(&[])).unwrap();
    assert_eq!(c.upstreams["a"].endpoints[0].port, 8443);
    assert!(c.upstreams["a"].tls.is_some());
    assert_eq!(
        c.upstreams["a"].endpoints[0]
            .tls_name
            .as_ref()
            .unwrap()
            .to_str(),
        "internal.example.com"
    );
}

#[test]
fn upstream_tls_problems_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = cert_files(dir.path(), "client");
    let (_, other_key) = cert_files(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let garbage = garbage.display().to_string();
    let up = |tls: &str, url: &str| {
        with_server(
            "  listen: 127.0.0.1:0",
            &format!("    url: {url}\n    tls: {{ {tls} }}"),
        )
    };
    let https = "https://10.0.0.5";

    let p = problems_of(&up("insecure_skip_verify: true", "http://10.0.0.5"));
    assert_problem(&p, "upstreams.a.tls", "only for https://");

    let p = problems_of(&up(&format!("client_cert: \"{cert}\""), https));
    assert_problem(&p, "upstreams.a.tls.client_key", "missing");
    let p = problems_of(&up(&format!("client_key: \"{key}\""), https));
    assert_problem(&p, "upstreams.a.tls.client_cert", "missing");

    let p = problems_of(&up(
        &format!("client_cert: \"{cert}\", client_key: \"{other_key}\""),
        https,
    ));
    assert_problem(&p, "upstreams.a.tls.client_key", "does not match");

    let p = problems_of(&up(&format!("ca_file: \"{garbage}\""), https));
    assert_problem(&p, "upstreams.a.tls.ca_file", "no certificate");
    let p = problems_of(&up("ca_file: /nonexistent/ca.pem", https));
    assert_problem(&p, "upstreams.a.tls.ca_file", "cannot read");

    let p = problems_of(&up(
        &format!("ca_file: \"{cert}\", insecure_skip_verify: true"),
        https,
    ));
    assert_problem(&p, "upstreams.a.tls.insecure_skip_verify", "set only one");

    let p = problems_of(&up("server_name: \"not a name!\"", https));
    assert_problem(&p, "upstreams.a.tls.server_name", "not a DNS name");

    let p = problems_of(&up("verify: false", https));
    assert!(p.join("\n").contains("verify"), "{p:?}");
}

#[test]
fn url_credentials_and_queries_never_appear_in_problems() {
    let text = r#"
upstreams:
  query:
    url: "http://svc:hunter2@10.0.0.1:8000/base?token=s3cr3t-query"
  invalid:
    url: "http://svc:hunter2@[not-an-address"
  noscheme:
    url: "svc:hunter2@10.0.0.1:8000"
  plain:
    url: "http://svc:hunter2@10.0.0.1:8000"
    tls: { insecure_skip_verify: true }
  valid:
    url: "http://svc:hunter2@10.0.0.1:8000"
routes:
  - name: r
    upstream: valid
    budget: soon
"#;
    let problems = load(text, env(&[])).unwrap_err().problems();
    let all: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    let all = all.join("\n");
    for leak in ["hunter2", "svc:", "s3cr3t-query"] {
        assert!(!all.contains(leak), "{leak} leaked:\n{all}");
    }
    for key in [
        "upstreams.query.url",
        "upstreams.invalid.url",
        "upstreams.noscheme.url",
        "upstreams.plain.tls",
        "routes[0].budget",
    ] {
        assert!(
            problems.iter().any(|p| p.key == key),
            "no problem for {key}:\n{all}"
        );
    }
    assert!(all.contains("<redacted>@10.0.0.1:8000"), "{all}");
    let err = load(text, env(&[])).unwrap_err().to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn self_defeating_settings_are_warnings_not_problems() {
    let text = r#"
server: { drain_timeout: 20s }
upstreams:
  app: { url: "http://127.0.0.1:8000", pool: { max_connections: 8 } }
routes:
  - { name: long, upstream: app, budget: 75s }
  - { name: action, upstream: app, budget: 12s, caller_timeout: 10s, queue: { max_wait: 15s } }
  - { name: wide, upstream: app, budget: 5s, concurrency: 32 }
  - { name: adaptive, upstream: app, budget: 5s, concurrency: { mode: auto, max: 9 } }
  - { name: slow-caller, upstream: app, budget: 5s, caller_timeout: 90s }
"#;
    let c = from_yaml(text, env(&[])).expect("warnings are not problems");
    let found: Vec<String> = warnings(&c).iter().map(|w| w.to_string()).collect();
    for (key, text) in [
        (
            "routes[0].budget",
            "`75s` is longer than 60 s, the most a Genesys Cloud data action waits",
        ),
        (
            "routes[1].budget",
            "`12s` is longer than `routes[1].caller_timeout` (`10s`)",
        ),
        (
            "routes[1].queue.max_wait",
            "`15s` is longer than the route's budget (`12s`)",
        ),
        (
            "routes[2].concurrency",
            "`32` is above `upstreams.app.pool.max_connections` (`8`)",
        ),
        ("routes[3].concurrency", "`max 9` is above"),
        ("routes[4].caller_timeout", "`90s` is longer than 60 s"),
        (
            "server.drain_timeout",
            "`20s` is shorter than the longest route budget (`75s`, routes[0] `long`)",
        ),
    ] {
        assert_problem(&found, key, text);
    }
    assert_eq!(found.len(), 7, "{found:#?}");

    // Defaults never warn: the queue waits at most the budget, concurrency is the pool's size.
    for text in [MINIMAL, SHIPPED_DEFAULT] {
        let c = from_yaml(text, env(&[])).unwrap();
        assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
    }
}

#[test]
fn endpoints_parse_with_their_limits_and_the_route_takes_their_sum() {
    let text = with_server(
        "  listen: 127.0.0.1:0",
        "    endpoints:\n      - { url: \"http://127.0.0.1:8001/api\", concurrency: 1 }\n      - { url: \"http://127.0.0.1:8002/api/\", concurrency: 2 }\n    balance: round_robin",
    );
    let c = from_yaml(&text, env(&[])).unwrap();
    let u = &c.upstreams["a"];
    assert!(u.listed);
    assert_eq!(u.balance, Balance::RoundRobin);
    assert_eq!(u.base_path, "/api");
    assert_eq!(u.capacity(), Some(3));
    let ports: Vec<u16> = u.endpoints.iter().map(|e| e.port).collect();
    assert_eq!(ports, [8001, 8002]);
    assert_eq!(c.routes[0].concurrency, Concurrency::Fixed(3));
    let shown = describe(&c);
    assert_eq!(
        shown["upstreams"]["a"]["endpoints"][1]["url"],
        "http://127.0.0.1:8002/api/"
    );
    assert_eq!(shown["upstreams"]["a"]["endpoints"][1]["concurrency"], 2);
    assert!(shown["upstreams"]["a"].get("url").is_none());

    // An endpoint without a limit leaves the upstream unbounded: the pools cap the route.
    let text = with_server(
        "  listen: 127.0.0.1:0",
        "    endpoints: [{ url: \"http://10.0.0.1:80\", concurrency: 1 }, { url: \"http://10.0.0.2:80\" }]\n    pool: { max_connections: 8 }",
    );
    let c = from_yaml(&text, env(&[])).unwrap();
    assert_eq!(c.upstreams["a"].capacity(), None);
    assert_eq!(c.routes[0].concurrency, Concurrency::Fixed(16));
}

#[test]
fn endpoint_problems_are_all_reported_with_their_keys() {
    let problems = problems_of(&with_server(
        "  listen: 127.0.0.1:0",
        "    endpoints:\n      - { url: \"http://127.0.0.1:8001\", concurrency: 0 }\n      - { url: \"https://127.0.0.1:8002\" }\n      - { url: \"http://127.0.0.1:8003/other\" }\n      - { url: \"http://127.0.0.1:8001\" }\n      - { concurrency: 2 }\n    balance: fastest",
    ));
    assert_problem(&problems, "upstreams.a.endpoints[0].concurrency", "`0`");
    assert_problem(&problems, "upstreams.a.endpoints[4].url", "missing");
    assert_problem(&problems, "upstreams.a.balance", "`fastest`");
    assert_problem(&problems, "upstreams.a.endpoints[1].url", "scheme differs");
    assert_problem(&problems, "upstreams.a.endpoints[2].url", "path differs");
    assert_problem(&problems, "upstreams.a.endpoints[3].url", "listed twice");

    let problems = problems_of(&with_server(
        "  listen: 127.0.0.1:0",
        "    url: http://127.0.0.1:8000\n    endpoints: [{ url: \"http://127.0.0.1:8001\" }]",
    ));
    assert_problem(&problems, "upstreams.a.endpoints", "together with `url`");
    let problems = problems_of(&with_server("  listen: 127.0.0.1:0", "    endpoints: []"));
    assert_problem(&problems, "upstreams.a.endpoints", "empty");
}

#[test]
fn an_endpoint_list_can_come_from_the_environment() {
    let text = with_server(
        "  listen: 127.0.0.1:0",
        "    endpoints: [{ url: \"http://127.0.0.1:8001\", concurrency: 1 }]",
    );
    let c = from_yaml(
        &text,
        env(&[("BREAKWATER__UPSTREAMS__A__ENDPOINTS__0__CONCURRENCY", "3")]),
    )
    .unwrap();
    assert_eq!(c.upstreams["a"].endpoints[0].concurrency, Some(3));
}

#[test]
fn server_workers_defaults_to_none_and_takes_one_to_1024() {
    assert_eq!(from_yaml(MINIMAL, env(&[])).unwrap().server.workers, None);
    let with = |n: &str| from_yaml(&format!("server: {{ workers: {n} }}\n{MINIMAL}"), env(&[]));
    assert_eq!(with("1").unwrap().server.workers, Some(1));
    assert_eq!(with("2").unwrap().server.workers, Some(2));
    assert_eq!(with("1024").unwrap().server.workers, Some(1024));
    let from_env = from_yaml(MINIMAL, env(&[("BREAKWATER__SERVER__WORKERS", "4")])).unwrap();
    assert_eq!(from_env.server.workers, Some(4));
    for bad in ["0", "1025", "-2"] {
        let problems = with(bad).unwrap_err().problems();
        assert!(
            problems
                .iter()
                .any(|p| p.key == "server.workers" && p.message.contains("between 1 and 1024")),
            "workers {bad}: {problems:?}"
        );
    }
    let problems = with("two").unwrap_err().problems();
    assert!(
        problems.iter().any(|p| p.key == "server.workers"),
        "{problems:?}"
    );
}

#[test]
fn discovery_takes_the_url_and_says_what_it_found_in_config() {
    let text = with_server(
        "  listen: 127.0.0.1:0",
        "    url: http://analytics.local:8000\n    discovery: { every: 30s, endpoint_concurrency: 4 }",
    );
    let c = from_yaml(&text, env(&[])).unwrap();
    let u = &c.upstreams["a"];
    let d = u.discovery.as_ref().unwrap();
    assert_eq!(
        (d.every, d.endpoint_concurrency),
        (Duration::from_secs(30), Some(4))
    );
    // How many endpoints there will be is only known at run time.
    assert_eq!(u.capacity(), None);
    let shown = describe(&c);
    assert_eq!(shown["upstreams"]["a"]["discovery"]["every"], "30s");

    let problems = problems_of(&with_server(
        "  listen: 127.0.0.1:0",
        "    endpoints: [{ url: \"http://127.0.0.1:8001\" }]\n    discovery: { every: soon, endpoint_concurrency: 0 }",
    ));
    assert_problem(
        &problems,
        "upstreams.a.discovery",
        "together with `endpoints`",
    );
    assert_problem(&problems, "upstreams.a.discovery.every", "soon");
    assert_problem(
        &problems,
        "upstreams.a.discovery.endpoint_concurrency",
        "`0`",
    );
}

#[test]
fn worker_header_is_a_header_name_and_wants_spare_connections() {
    let c = from_yaml(
        &with_server(
            "  listen: 127.0.0.1:0",
            "    url: http://127.0.0.1:8000\n    worker_header: X-Worker\n    pool: { max_connections: 6 }",
        )
        .replace("    upstream: a\n", "    upstream: a\n    concurrency: 4\n"),
        env(&[]),
    )
    .unwrap();
    let u = &c.upstreams["a"];
    assert_eq!(u.worker_header.as_ref().unwrap().as_str(), "x-worker");
    assert_eq!(describe(&c)["upstreams"]["a"]["worker_header"], "x-worker");
    let found: Vec<String> = warnings(&c).iter().map(|w| w.to_string()).collect();
    assert_problem(
        &found,
        "upstreams.a.pool.max_connections",
        "`6` is less than twice `routes[0].concurrency` (`4`)",
    );

    let problems = problems_of(&with_server(
        "  listen: 127.0.0.1:0",
        "    url: http://127.0.0.1:8000\n    worker_header: \"x worker\"",
    ));
    assert_problem(
        &problems,
        "upstreams.a.worker_header",
        "`x worker`: not a header name",
    );
}

#[test]
fn worker_probe_is_a_path_and_needs_worker_header() {
    let problems = problems_of(&with_server(
        "  listen: 127.0.0.1:0",
        "    url: http://127.0.0.1:8000\n    worker_probe: healthz",
    ));
    assert_problem(
        &problems,
        "upstreams.a.worker_probe",
        "without `worker_header`",
    );
    assert_problem(
        &problems,
        "upstreams.a.worker_probe",
        "`healthz`: must be a path",
    );
    let c = from_yaml(
        &with_server(
            "  listen: 127.0.0.1:0",
            "    url: http://127.0.0.1:8000\n    worker_header: x-worker\n    worker_probe: /healthz",
        ),
        env(&[]),
    )
    .unwrap();
    assert_eq!(
        c.upstreams["a"].worker_probe.as_ref().unwrap().as_str(),
        "/healthz"
    );
    assert_eq!(describe(&c)["upstreams"]["a"]["worker_probe"], "/healthz");
}
