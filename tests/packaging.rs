//! The container packaging stays in step with the repository: docker/Dockerfile copies only files
//! that exist and builds with the same command as CI, docker/compose.yaml points at files that
//! exist, and the compose gateway config passes `breakwater check`. Nothing here needs Docker.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_breakwater");
/// The release build, identical in the Dockerfile and in .ci/run.
const RELEASE_BUILD: &str = "cargo build --release --locked";

fn root() -> &'static Path {
    Path::new(ROOT)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// A Dockerfile's instructions as (KEYWORD, arguments), with continuation lines joined and
/// comments (including parser directives and hadolint pragmas) dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (kw, args) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        out.push((kw.to_ascii_uppercase(), args.trim().to_string()));
    }
    assert!(
        current.trim().is_empty(),
        "Dockerfile ends inside a continued line"
    );
    out
}

/// COPY/ADD arguments without their flags, split in shell form or parsed in exec (JSON) form.
fn copy_args(args: &str) -> (Vec<String>, Vec<String>) {
    let mut flags = Vec::new();
    let mut rest = args.trim();
    while rest.starts_with("--") {
        let (flag, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        flags.push(flag.to_string());
        rest = tail.trim_start();
    }
    let words: Vec<String> = if rest.starts_with('[') {
        serde_json::from_str(rest).unwrap_or_else(|e| panic!("bad exec-form COPY {rest}: {e}"))
    } else {
        rest.split_whitespace().map(str::to_string).collect()
    };
    (flags, words)
}

fn dockerfile() -> Vec<(String, String)> {
    instructions(&read("docker/Dockerfile"))
}

#[test]
fn every_copy_from_the_build_context_exists() {
    let mut sources = Vec::new();
    for (kw, args) in dockerfile() {
        if kw != "COPY" && kw != "ADD" {
            continue;
        }
        let (flags, words) = copy_args(&args);
        if flags.iter().any(|f| f.starts_with("--from=")) {
            continue;
        }
        assert!(
            words.len() >= 2,
            "{kw} needs a source and a destination: {args}"
        );
        for src in &words[..words.len() - 1] {
            assert!(
                !src.contains(['*', '?', '[']),
                "{kw} {src}: keep the COPY list explicit (no wildcards)"
            );
            let rel = src.trim_start_matches("./").trim_end_matches('/');
            // There is no .dockerignore at the top level: copying the whole context would pull
            // in target/ and the rest of the checkout.
            assert!(
                !rel.is_empty() && rel != ".",
                "{kw} {src}: copy named paths, not the whole build context"
            );
            assert!(
                root().join(rel).exists(),
                "{kw} {src}: no such path in the repository (the build context is the repository root)"
            );
            sources.push(rel.to_string());
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src", "config"] {
        assert!(
            sources.iter().any(|s| s == needed),
            "the Dockerfile must COPY {needed} (copied: {sources:?})"
        );
    }
}

/// Every command segment of a shell line (split on `&&`, `||`, `;`), trimmed.
fn segments(line: &str) -> Vec<String> {
    line.split("&&")
        .flat_map(|s| s.split("||"))
        .flat_map(|s| s.split(';'))
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn release_build_command_is_the_same_in_the_dockerfile_and_ci() {
    let builds: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(kw, _)| kw == "RUN")
        .flat_map(|(_, args)| segments(&args))
        .filter(|s| s.starts_with("cargo build"))
        .collect();
    assert!(
        !builds.is_empty(),
        "the Dockerfile has no `cargo build` step"
    );
    for b in &builds {
        assert_eq!(
            b, RELEASE_BUILD,
            "every cargo build in the Dockerfile must be exactly `{RELEASE_BUILD}`"
        );
    }

    let ci = read(".ci/run");
    let in_ci = ci
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(segments)
        .any(|s| s == RELEASE_BUILD);
    assert!(
        in_ci,
        ".ci/run must run `{RELEASE_BUILD}`, the build the Dockerfile ships"
    );
}

#[test]
fn dockerfile_runs_the_gateway_as_pid_1_with_the_copied_config() {
    let ins = dockerfile();
    let last = |kw: &str| {
        ins.iter()
            .rev()
            .find(|(k, _)| k == kw)
            .map(|(_, a)| a.clone())
    };
    let cmd = last("CMD").expect("a CMD");
    let cmd: Vec<String> = serde_json::from_str(&cmd).unwrap_or_else(|_| {
        panic!("CMD must be exec form (a JSON array) so signals reach the gateway: {cmd}")
    });
    assert_eq!(
        cmd,
        ["breakwater", "--config", "/etc/breakwater/breakwater.yaml"]
    );
    if let Some(ep) = last("ENTRYPOINT") {
        assert!(ep.starts_with('['), "ENTRYPOINT must be exec form: {ep}");
    }
    assert!(
        ins.iter().any(|(k, a)| k == "COPY"
            && a.split_whitespace().last() == Some("/etc/breakwater/breakwater.yaml")),
        "the default config is copied to /etc/breakwater/breakwater.yaml"
    );
    assert_eq!(last("STOPSIGNAL").as_deref(), Some("SIGTERM"));
    assert!(last("USER").is_some_and(|u| u.starts_with("10001")));
    let hc = last("HEALTHCHECK").expect("a HEALTHCHECK");
    assert!(hc.contains("http://127.0.0.1:9901/healthz"), "{hc}");
}

/// Paths compose.yaml uses (bind mounts, build context and Dockerfile), resolved against docker/.
fn compose_paths(text: &str) -> Vec<(String, PathBuf)> {
    let docker = root().join("docker");
    let mut out = Vec::new();
    let mut context = docker.clone();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            continue;
        }
        if let Some(v) = t.strip_prefix("context:") {
            let v = v.trim().trim_matches('"');
            context = docker.join(v);
            out.push((v.to_string(), context.clone()));
        } else if let Some(v) = t.strip_prefix("dockerfile:") {
            let v = v.trim().trim_matches('"');
            out.push((v.to_string(), context.join(v)));
        } else if let Some(v) = t.strip_prefix("- ") {
            let v = v.trim().trim_matches('"');
            if v.starts_with("./") || v.starts_with("../") {
                let src = v.split(':').next().unwrap();
                out.push((src.to_string(), docker.join(src)));
            }
        }
    }
    out
}

#[test]
fn compose_references_files_that_exist() {
    let text = read("docker/compose.yaml");
    let paths = compose_paths(&text);
    for (written, path) in &paths {
        assert!(
            path.exists(),
            "docker/compose.yaml refers to {written}, which does not exist ({})",
            path.display()
        );
    }
    for needed in [
        "./breakwater.compose.yaml",
        "./prometheus.yml",
        "../tests/e2e",
        "docker/Dockerfile",
    ] {
        assert!(
            paths.iter().any(|(w, _)| w == needed),
            "docker/compose.yaml should use {needed} (found {paths:?})"
        );
    }
    // The backend service installs and runs these from the mounted directory.
    for f in ["tests/e2e/requirements.txt", "tests/e2e/app.py"] {
        assert!(root().join(f).exists(), "{f} is missing");
    }
    assert!(read("docker/prometheus.yml").contains("gateway:9901"));
}

#[test]
fn e2e_requirements_are_pinned_exactly() {
    for line in read("tests/e2e/requirements.txt").lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let (name, version) = line
            .split_once("==")
            .unwrap_or_else(|| panic!("`{line}` is not pinned with =="));
        assert!(
            !name.trim().is_empty() && !version.trim().is_empty(),
            "{line}"
        );
    }
}

/// `breakwater check` on a config, with only the given BREAKWATER__* variables set.
fn check(config: &str, env: &[(String, String)]) {
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.current_dir(root())
        .args(["check", "--config", config])
        .env_remove("BREAKWATER_CONFIG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BREAKWATER__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = cmd.output().expect("run breakwater check");
    assert!(
        out.status.success(),
        "breakwater check --config {config} with {env:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_gateway_config_passes_check_with_and_without_its_environment() {
    check("docker/breakwater.compose.yaml", &[]);
    // The overrides compose.yaml sets (`BREAKWATER__KEY: "value"`) must be valid too.
    let env: Vec<(String, String)> = read("docker/compose.yaml")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            k.starts_with("BREAKWATER__")
                .then(|| (k.to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "BREAKWATER__ADMIN__LISTEN"),
        "compose.yaml sets BREAKWATER__ADMIN__LISTEN so Prometheus can scrape: {env:?}"
    );
    check("docker/breakwater.compose.yaml", &env);
    // The image's default config.
    check("config/breakwater.yaml", &[]);
}
