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
