//! The container packaging stays in step with the repository: docker/Dockerfile copies only files
//! that exist and builds with the same command as CI, its ENTRYPOINT/CMD contract holds, its
//! default config requires API keys and passes `breakwater check`, .dockerignore keeps target/
//! out of the build context, docker/compose.yaml points at files that exist, and the compose
//! gateway config passes `breakwater check`. Nothing here needs Docker.

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
            // Copying the whole context would depend on .dockerignore to keep target/ out.
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

/// Where the image keeps its default config.
const IMAGE_CONFIG: &str = "/etc/breakwater/breakwater.yaml";

fn last(ins: &[(String, String)], kw: &str) -> Option<String> {
    ins.iter()
        .rev()
        .find(|(k, _)| k == kw)
        .map(|(_, a)| a.clone())
}

/// An exec-form (JSON array) instruction's words.
fn exec_form(kw: &str, args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| {
        panic!("{kw} must be exec form (a JSON array) so signals reach the gateway: {args}")
    })
}

/// The file in the repository that the Dockerfile copies to the image's default config path.
fn image_default_config() -> String {
    let sources: Vec<String> = dockerfile()
        .into_iter()
        .filter(|(kw, _)| kw == "COPY")
        .map(|(_, args)| copy_args(&args))
        .filter(|(flags, words)| {
            !flags.iter().any(|f| f.starts_with("--from="))
                && words.last().map(String::as_str) == Some(IMAGE_CONFIG)
        })
        .map(|(_, words)| words[0].clone())
        .collect();
    assert_eq!(
        sources.len(),
        1,
        "exactly one COPY to {IMAGE_CONFIG}, from the build context: {sources:?}"
    );
    sources[0].clone()
}

/// Environment for the image's default config: what an ECS task definition passes.
const IMAGE_ENV: [(&str, &str); 1] = [("BREAKWATER_API_KEYS", "0123456789abcdef-one")];

/// Runs the binary as the image would, in an empty working directory (no config/ to find), with
/// only the given variables of the BREAKWATER family set.
fn run_like_the_image(args: &[String], env: &[(&str, &str)]) -> std::process::Output {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(GATEWAY_BIN);
    cmd.current_dir(cwd.path()).args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BREAKWATER") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run breakwater");
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "breakwater {args:?} still running after 20 s:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn dockerfile_runs_the_gateway_as_pid_1_with_the_copied_config() {
    let ins = dockerfile();
    // `docker run IMAGE check --config ...` replaces CMD and keeps the binary as ENTRYPOINT.
    let ep = last(&ins, "ENTRYPOINT").expect("an ENTRYPOINT");
    assert_eq!(exec_form("ENTRYPOINT", &ep), ["breakwater"]);
    let cmd = last(&ins, "CMD").expect("a CMD");
    assert_eq!(
        exec_form("CMD", &cmd),
        ["run", "--config", IMAGE_CONFIG],
        "CMD is the arguments of the `breakwater` ENTRYPOINT"
    );
    // Subcommands given without --config find the same file.
    assert!(
        ins.iter()
            .any(|(k, a)| k == "ENV" && a == &format!("BREAKWATER_CONFIG={IMAGE_CONFIG}")),
        "ENV BREAKWATER_CONFIG={IMAGE_CONFIG}"
    );
    image_default_config();
    assert_eq!(last(&ins, "STOPSIGNAL").as_deref(), Some("SIGTERM"));
    assert!(last(&ins, "USER").is_some_and(|u| u.starts_with("10001")));
    let hc = last(&ins, "HEALTHCHECK").expect("a HEALTHCHECK");
    assert!(hc.contains("http://127.0.0.1:9901/healthz"), "{hc}");
}

#[test]
fn the_image_default_config_requires_api_keys_and_passes_check() {
    let source = image_default_config();
    // config/breakwater.yaml is the local fixture (no auth); docs/operations.md and tests/docs.rs
    // describe this one as the image's.
    assert_eq!(source, "config/production.yaml");
    let local = root().join(&source).display().to_string();
    // The image's own command line, with `check` for `run` and the file where the test has it.
    let ins = dockerfile();
    let mut args: Vec<String> = exec_form("CMD", &last(&ins, "CMD").unwrap());
    assert_eq!(args[0], "run");
    args[0] = "check".into();
    for a in &mut args {
        if a == IMAGE_CONFIG {
            *a = local.clone();
        }
    }
    let out = run_like_the_image(&args, &IMAGE_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "breakwater {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Authentication on, for every route; admin reachable by a health check and Prometheus.
    assert!(
        stdout
            .contains("auth     api_keys header x-api-key (1 key(s) from env BREAKWATER_API_KEYS)"),
        "{stdout}"
    );
    assert!(!stdout.contains("auth     none"), "{stdout}");
    for line in stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("auth "))
    {
        assert!(
            !line.contains("none") && !line.contains("disabled"),
            "a route without auth: {line}"
        );
    }
    assert!(stdout.contains("admin    listen 0.0.0.0:9901"), "{stdout}");

    // Without the keys it refuses to start rather than run open, naming the variable. (Should it
    // start after all, it listens on loopback ports of its own and is stopped below.)
    let loopback = [
        ("BREAKWATER__SERVER__LISTEN", "127.0.0.1:0"),
        ("BREAKWATER__ADMIN__LISTEN", "127.0.0.1:0"),
    ];
    for keys in [None, Some("")] {
        let mut run = args.clone();
        run[0] = "run".into();
        let mut env = loopback.to_vec();
        env.extend(keys.map(|k| ("BREAKWATER_API_KEYS", k)));
        let out = run_like_the_image(&run, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started without API keys ({keys:?})");
        assert!(
            stderr.contains("auth.api_keys.keys_env: BREAKWATER_API_KEYS"),
            "{stderr}"
        );
    }

    // `docker run IMAGE check` (no --config) reads the file ENV BREAKWATER_CONFIG names.
    let mut env = IMAGE_ENV.to_vec();
    env.push(("BREAKWATER_CONFIG", &local));
    let out = run_like_the_image(&["check".to_string()], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `.dockerignore` leaves `path` (relative to the context) in the build context. Docker
/// applies the patterns in order, the last match winning; `!` re-includes. Only the forms the file
/// uses are understood: `*` and plain paths (a directory covers what is under it).
fn in_build_context(dockerignore: &str, path: &str) -> bool {
    let mut included = true;
    for line in dockerignore.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (include, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern = pattern.trim_start_matches('/').trim_end_matches('/');
        assert!(
            pattern == "*" || !pattern.contains(['*', '?', '[']),
            ".dockerignore: `{line}` is beyond what this test understands"
        );
        let matches = pattern == "*" || path == pattern || path.starts_with(&format!("{pattern}/"));
        if matches {
            included = include;
        }
    }
    included
}

#[test]
fn dockerignore_sends_only_what_the_dockerfile_copies() {
    let ignore = read(".dockerignore");
    for big in [
        "target",
        "target/debug/breakwater",
        ".git",
        "tests/e2e",
        "docs",
    ] {
        assert!(
            !in_build_context(&ignore, big),
            ".dockerignore must keep {big} out of the build context"
        );
    }
    for (kw, args) in dockerfile() {
        if kw != "COPY" && kw != "ADD" {
            continue;
        }
        let (flags, words) = copy_args(&args);
        if flags.iter().any(|f| f.starts_with("--from=")) {
            continue;
        }
        for src in &words[..words.len() - 1] {
            let rel = src.trim_start_matches("./").trim_end_matches('/');
            assert!(
                in_build_context(&ignore, rel),
                "the Dockerfile copies {rel}, which .dockerignore leaves out"
            );
        }
    }
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
    // The local fixture README's `cargo run --release` uses (the image ships its own).
    check("config/breakwater.yaml", &[]);
}
