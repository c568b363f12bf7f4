//! The configuration docs, the example file and the code must agree: every key the example shows
//! is documented, every documented key is in the example, the strict loader accepts the example,
//! and every key of the effective configuration the code reports is in the example.

use std::collections::BTreeSet;
use std::process::Command;

/// Environment for files whose auth reads secrets from variables.
const SECRETS: [(&str, &str); 2] = [
    (
        "BREAKWATER_API_KEYS",
        "0123456789abcdef-one,0123456789abcdef-two",
    ),
    ("BREAKWATER_BASIC_PASSWORD", "correct-horse-battery-staple"),
];

fn yaml(text: &str) -> serde_json::Value {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Yaml))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap()
}

/// Every key path, with upstream names as `<name>` and list items as `[]`; `leaves_only` skips
/// keys whose value is a map.
fn paths(v: &serde_json::Value, prefix: &str, leaves_only: bool, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix == "upstreams" {
                    "<name>".to_string()
                } else {
                    k.clone()
                };
                let path = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}.{key}")
                };
                if !leaves_only || !child.is_object() && path != "routes" {
                    out.insert(path.clone());
                }
                paths(child, &path, leaves_only, out);
            }
        }
        serde_json::Value::Array(items) if prefix == "routes" => {
            for item in items {
                paths(item, "routes[]", leaves_only, out);
            }
        }
        _ => {}
    }
}

fn example_paths(leaves_only: bool) -> BTreeSet<String> {
    let text = std::fs::read_to_string("config/example.yaml").unwrap();
    let mut out = BTreeSet::new();
    paths(&yaml(&text), "", leaves_only, &mut out);
    out.remove("routes[]");
    out
}

fn documented_paths() -> BTreeSet<String> {
    let doc = std::fs::read_to_string("docs/configuration.md").unwrap();
    doc.lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_file_in_config_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .envs(SECRETS)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} fails check:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected config/breakwater.yaml and config/example.yaml"
    );
}

#[test]
fn docs_and_example_list_the_same_keys() {
    let leaves = example_paths(true);
    let example = example_paths(false);
    let documented = documented_paths();
    // Alternatives to keys the example already shows (a file instead of an env var), and keys
    // inside blocks the example leaves empty (TLS needs files that exist).
    let alternatives = [
        "auth.api_keys.keys_file",
        "auth.basic.password_file",
        "server.tls.cert",
        "server.tls.key",
        "upstreams.<name>.tls.ca_file",
        "upstreams.<name>.tls.server_name",
        "upstreams.<name>.tls.client_cert",
        "upstreams.<name>.tls.client_key",
        "upstreams.<name>.tls.insecure_skip_verify",
    ];
    let undocumented: Vec<_> = leaves.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "in config/example.yaml but not in docs/configuration.md: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .difference(&example)
        .filter(|k| !alternatives.contains(&k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "in docs/configuration.md but not in config/example.yaml: {missing:?}"
    );
}

#[test]
fn every_key_of_the_effective_config_is_in_the_example() {
    let text = std::fs::read_to_string("config/example.yaml").unwrap();
    let env = SECRETS.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    let config = breakwater::prepare::from_yaml(&text, env)
        .expect("example is valid")
        .config;
    let mut effective = BTreeSet::new();
    paths(
        &breakwater::config::describe(&config),
        "",
        false,
        &mut effective,
    );
    effective.remove("routes[]");
    let example = example_paths(false);
    // What describe() adds about the running state rather than keys one writes.
    let reported_only = |k: &str| {
        k.ends_with(".keys_loaded")
            || k.ends_with(".from")
            || k == "auth.basic.password"
            || k == "routes[].auth.basic.password"
    };
    let missing: Vec<_> = effective
        .iter()
        .filter(|k| !example.contains(*k) && !reported_only(k))
        .filter(|k| !k.starts_with("routes[].auth."))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the code reports but config/example.yaml lacks: {missing:?}"
    );
}

// ---- what the operator docs quote from shipped files ----

/// The config the container image runs (tests/packaging.rs checks the Dockerfile copies it).
const IMAGE_CONFIG: &str = "config/production.yaml";

fn yaml_file(path: &str) -> serde_json::Value {
    yaml(&std::fs::read_to_string(path).unwrap())
}

/// A value of a parsed config by dotted path, list items as `name[i]`, rendered as the file
/// writes it.
fn lookup(v: &serde_json::Value, path: &str) -> Option<String> {
    let mut cur = v;
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (k, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
            None => (seg, None),
        };
        cur = cur.get(key)?;
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(match cur {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Seconds of a duration written as `Ns`.
fn seconds(d: &str) -> u64 {
    d.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap()
}

fn port(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The section of a markdown file under `heading` (up to the next heading of any level).
fn section(doc: &str, heading: &str) -> String {
    let start = doc
        .find(&format!("{heading}\n"))
        .unwrap_or_else(|| panic!("no `{heading}`"));
    let body = &doc[start + heading.len()..];
    let end = body.find("\n#").unwrap_or(body.len());
    body[..end].to_string()
}

/// The first fenced JSON block of `doc` that contains `marker`.
fn json_block(doc: &str, marker: &str) -> serde_json::Value {
    let block = doc
        .split("```json\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no JSON block with {marker}"));
    serde_json::from_str(block).unwrap_or_else(|e| panic!("JSON block with {marker}: {e}"))
}

#[test]
fn operations_md_quotes_the_image_config_as_it_is() {
    let config = yaml_file(IMAGE_CONFIG);
    let doc = std::fs::read_to_string("docs/operations.md").unwrap();
    let table = section(&doc, "### The image's default config");
    let mut quoted = BTreeSet::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`');
        let value = cells[2].trim_matches('`');
        assert_eq!(
            lookup(&config, key).as_deref(),
            Some(value),
            "docs/operations.md says {key} is {value} in {IMAGE_CONFIG}"
        );
        quoted.insert(key.to_string());
    }
    for must in [
        "upstreams.app.pool.idle_timeout",
        "routes[0].concurrency",
        "routes[0].budget",
        "server.drain_timeout",
        "admin.listen",
        "auth.api_keys.header",
        "auth.api_keys.keys_env",
    ] {
        assert!(quoted.contains(must), "the table should quote {must}");
    }
    // What the prose around it claims.
    let idle = seconds(&lookup(&config, "upstreams.app.pool.idle_timeout").unwrap());
    assert!(idle < 60, "below the ALB's 60 s idle timeout");
    assert!(seconds(&lookup(&config, "server.keepalive_timeout").unwrap()) > 60);
    assert!(
        table.contains("http://backend.invalid:80")
            && lookup(&config, "upstreams.app.url").as_deref() == Some("http://backend.invalid:80")
    );
}

#[test]
fn operations_md_task_definition_runs_the_image_config() {
    let config = yaml_file(IMAGE_CONFIG);
    let doc = std::fs::read_to_string("docs/operations.md").unwrap();
    let task = json_block(&doc, "containerDefinitions");
    let c = &task["containerDefinitions"][0];
    assert!(
        c.get("command").is_none(),
        "the image's CMD is the one to run"
    );
    assert!(task["runtimePlatform"]["cpuArchitecture"].is_string());
    assert!(task["executionRoleArn"].is_string(), "secrets need it");
    let secrets: Vec<&str> = c["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let keys_env = lookup(&config, "auth.api_keys.keys_env").unwrap();
    assert!(secrets.contains(&keys_env.as_str()), "{secrets:?}");
    assert!(secrets.contains(&"BREAKWATER_ADMIN_TOKEN"), "{secrets:?}");
    let ports: Vec<u64> = c["portMappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    let (traffic, admin) = (
        port(&lookup(&config, "server.listen").unwrap()),
        port(&lookup(&config, "admin.listen").unwrap()),
    );
    assert_eq!(ports, [traffic, admin]);
    let health = c["healthCheck"]["command"].to_string();
    assert!(
        health.contains(&format!("http://127.0.0.1:{admin}/healthz")),
        "{health}"
    );
    let drain = seconds(&lookup(&config, "server.drain_timeout").unwrap());
    let budget = seconds(&lookup(&config, "routes[0].budget").unwrap());
    let stop = c["stopTimeout"].as_u64().unwrap();
    assert!(
        stop > drain && drain >= budget,
        "{stop} > {drain} >= {budget}"
    );

    // The task's environment and secrets make a config that passes check.
    let mut env: Vec<(String, String)> = SECRETS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.push((
        "BREAKWATER_ADMIN_TOKEN".into(),
        "0123456789abcdef0123456789abcdef".into(),
    ));
    for e in c["environment"].as_array().unwrap() {
        env.push((
            e["name"].as_str().unwrap().into(),
            e["value"].as_str().unwrap().into(),
        ));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["check", "--config", IMAGE_CONFIG])
        .envs(env)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = c["environment"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "BREAKWATER__UPSTREAMS__APP__URL")
        .expect("the task definition sets the upstream URL")["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(stdout.contains(&url), "{stdout}");
}

#[test]
fn genesys_md_sample_action_sends_the_key_the_image_config_checks() {
    let config = yaml_file(IMAGE_CONFIG);
    let doc = std::fs::read_to_string("docs/genesys.md").unwrap();
    let action = json_block(&doc, "requestUrlTemplate");
    let header = lookup(&config, "auth.api_keys.header").unwrap();
    let headers = action["config"]["request"]["headers"].as_object().unwrap();
    let sent = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&header))
        .unwrap_or_else(|| panic!("the sample data action does not send {header}: {headers:?}"));
    assert_eq!(sent.1, "${credentials.apiKey}");
    assert!(action["config"]["request"]["requestUrlTemplate"]
        .as_str()
        .unwrap()
        .starts_with("https://"));
    // The image's budget answers before the sample's timeout.
    let timeout = action["config"]["timeoutSeconds"].as_u64().unwrap();
    assert!(seconds(&lookup(&config, "routes[0].budget").unwrap()) < timeout);
}

#[test]
fn operations_md_quotes_the_compose_pool_as_it_is() {
    let doc = std::fs::read_to_string("docs/operations.md").unwrap();
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    let after = |marker: &str| -> String {
        let i = doc
            .find(marker)
            .unwrap_or_else(|| panic!("docs/operations.md lacks `{marker}`"));
        doc[i + marker.len()..]
            .split('`')
            .next()
            .unwrap()
            .to_string()
    };
    let idle = after("`docker/breakwater.compose.yaml` sets `idle_timeout: ");
    let keepalive = after("against uvicorn's `--timeout-keep-alive ");
    assert_eq!(
        lookup(
            &yaml_file("docker/breakwater.compose.yaml"),
            "upstreams.app.pool.idle_timeout"
        )
        .as_deref(),
        Some(idle.as_str())
    );
    let compose = std::fs::read_to_string("docker/compose.yaml").unwrap();
    assert!(
        compose.contains(&format!("--timeout-keep-alive {keepalive}")),
        "docker/compose.yaml should run uvicorn with --timeout-keep-alive {keepalive}"
    );
    assert!(seconds(&idle) < keepalive.parse().unwrap());
}
