//! What operators read: the JSON log lines carry plain values (no Rust `Debug` renderings such as
//! `Some(...)` or `["server"]`), every family on `/metrics` has `# HELP` and `# TYPE` lines, every
//! family the code records is described and documented, and requests that match no route leave
//! only the series they can record. Against the real binary, so the process-wide recorder and
//! logger are the ones production uses.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use http::StatusCode;

/// `head`: `server.header_read_timeout`, which needs a restart; `drain`: `server.drain_timeout`,
/// which a reload applies.
fn config(port: u16, admin: u16, backend: &str, drain: &str, head: &str) -> String {
    format!(
        r#"
server: {{ listen: "127.0.0.1:{port}", drain_timeout: {drain}, header_read_timeout: {head} }}
admin: {{ listen: "127.0.0.1:{admin}" }}
log: {{ format: json, level: info }}
upstreams:
  app:
    url: "{backend}"
    pool: {{ min_idle: 1 }}
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    budget: 5s
"#
    )
}

async fn text(c: &TestClient, method: &str, url: String) -> (StatusCode, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(body(bytes::Bytes::new()))
        .unwrap();
    let a = send(c, req).await;
    (a.status, String::from_utf8_lossy(&a.body).into_owned())
}

/// Family name of a sample: histograms' `_bucket`, `_sum` and `_count` belong to their family.
fn family<'a>(sample: &'a str, histograms: &BTreeSet<String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base;
            }
        }
    }
    sample
}

/// Families on a `/metrics` page: (HELP text, TYPE, label sets of its samples).
type Families = BTreeMap<String, (Option<String>, Option<String>, Vec<String>)>;

fn families(page: &str) -> Families {
    let mut out = Families::new();
    let histograms: BTreeSet<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .map(str::to_string)
        .collect();
    for line in page.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(name.into()).or_default().0 = Some(help.into());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.entry(name.into()).or_default().1 = Some(kind.into());
        } else if !line.starts_with('#') {
            let series = line.rsplit_once(' ').expect("series and value").0;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            out.entry(family(name, &histograms).into())
                .or_default()
                .2
                .push(labels.trim_end_matches('}').to_string());
        }
    }
    out
}

#[tokio::test]
async fn logs_carry_plain_values_and_every_metric_family_is_described() {
    let backend = Backend::start().await;
    let (port, admin) = (free_port(), free_port());
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        config(port, admin, &backend.url(), "5s", "10s"),
    )
    .unwrap();
    let proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .arg("run")
            .arg("--config")
            .arg(file.path())
            .env_remove("RUST_LOG")
            .env_remove(breakwater::admin::access::TOKEN_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = c
            .get(format!("http://127.0.0.1:{admin}/healthz").parse().unwrap())
            .await
        {
            if r.status() == StatusCode::OK {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let gw = |path: &str| format!("http://127.0.0.1:{port}{path}");
    assert_eq!(get(&c, &gw("/api/ok")).await.status, StatusCode::OK);
    assert_eq!(get(&c, &gw("/nowhere")).await.status, StatusCode::NOT_FOUND);

    // A reload that changes nothing, then one that changes a key that needs a restart and one
    // that a reload applies.
    let reload = format!("http://127.0.0.1:{admin}/reload");
    assert_eq!(text(&c, "POST", reload.clone()).await.0, StatusCode::OK);
    std::fs::write(
        file.path(),
        config(port, admin, &backend.url(), "6s", "11s"),
    )
    .unwrap();
    let (status, answer) = text(&c, "POST", reload).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // ---- /metrics ----
    let (status, page) = text(&c, "GET", format!("http://127.0.0.1:{admin}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let found = families(&page);
    let described: BTreeMap<&str, &str> = breakwater::observe::FAMILIES
        .iter()
        .map(|(name, _, help)| (*name, *help))
        .collect();
    for (name, (help, kind, samples)) in &found {
        assert!(!samples.is_empty(), "{name}: HELP/TYPE without samples");
        let help = help
            .as_deref()
            .unwrap_or_else(|| panic!("{name} has no # HELP line:\n{page}"));
        assert_eq!(
            Some(help),
            described.get(name.as_str()).copied(),
            "{name}: # HELP is not the text in observe::FAMILIES"
        );
        assert!(kind.is_some(), "{name} has no # TYPE line");
    }
    for must in [
        "breakwater_requests_total",
        "breakwater_request_duration_seconds",
        "breakwater_build_info",
        "breakwater_config_reloads_total",
        "breakwater_upstream_connects_total",
    ] {
        assert!(found.contains_key(must), "{must} missing from:\n{page}");
    }

    // route="none": only what a request that matched no route can record.
    let none: BTreeSet<&str> = found
        .iter()
        .filter(|(_, (_, _, samples))| samples.iter().any(|l| l.contains("route=\"none\"")))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        none,
        BTreeSet::from([
            "breakwater_request_duration_seconds",
            "breakwater_requests_total"
        ]),
        "route=\"none\" series beyond what unmatched requests record:\n{page}"
    );
    assert!(
        !page.contains("upstream=\"none\""),
        "a placeholder upstream label:\n{page}"
    );

    // ---- logs ----
    let ok = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut proc = proc;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proc.0.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut proc.0.stdout.take().unwrap(), &mut out).unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let by_message = |m: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["message"] == m).collect()
    };
    for line in &lines {
        for (key, value) in line.as_object().unwrap() {
            if let Some(s) = value.as_str() {
                assert!(
                    !s.starts_with("Some(")
                        && s != "None"
                        && !s.starts_with('[')
                        && !s.starts_with('{')
                        && !s.contains("\\\""),
                    "field {key} carries a Debug rendering: {line}"
                );
            }
        }
    }
    let listening = by_message("breakwater listening");
    assert_eq!(listening.len(), 1, "{out}");
    assert_eq!(listening[0]["addr"], format!("127.0.0.1:{port}"));
    assert_eq!(listening[0]["admin"], format!("127.0.0.1:{admin}"));
    let reloaded = by_message("configuration reloaded");
    assert_eq!(reloaded.len(), 2, "{out}");
    assert!(reloaded[0].get("needs_restart").is_none(), "{out}");
    assert_eq!(reloaded[1]["needs_restart"], "server.header_read_timeout");
    let draining = by_message("draining");
    assert_eq!(draining.len(), 1, "{out}");
    assert_eq!(draining[0]["timeout"], "6s", "the reloaded drain_timeout");
}

#[test]
fn every_family_the_code_records_is_described_and_documented() {
    fn sources(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let mut texts = Vec::new();
    sources(std::path::Path::new("src"), &mut texts);
    let mut recorded = BTreeSet::new();
    for text in &texts {
        for (i, _) in text.match_indices("\"breakwater_") {
            let name: String = text[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            recorded.insert(name);
        }
    }
    let described: BTreeSet<String> = breakwater::observe::FAMILIES
        .iter()
        .map(|(n, _, _)| n.to_string())
        .collect();
    assert_eq!(
        recorded, described,
        "metric names in src/ and observe::FAMILIES differ"
    );
    let doc = std::fs::read_to_string("docs/metrics.md").unwrap();
    for (name, kind, _) in breakwater::observe::FAMILIES {
        let kind = format!("{kind:?}").to_lowercase();
        assert!(
            doc.contains(&format!("| `{name}` | {kind} |")),
            "docs/metrics.md's summary lacks `{name}` as a {kind}"
        );
        assert!(
            doc.contains(&format!("### `{name}")),
            "docs/metrics.md has no section for `{name}`"
        );
    }
}
