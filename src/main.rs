#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use breakwater::config::{self, units, Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "An edge gateway that makes overload explicit and fast"
)]
struct Cli {
    /// Config file. Default: config/breakwater.yaml if present, else $BREAKWATER_CONFIG.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, print the effective routes and upstreams, and exit.
    Check,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config.as_deref()),
        Command::Check => check(cli.config.as_deref()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("breakwater: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn config_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let local = PathBuf::from("config/breakwater.yaml");
    if local.exists() {
        return Ok(local);
    }
    if let Some(p) = std::env::var_os("BREAKWATER_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    bail!(
        "no config: pass --config PATH, or create config/breakwater.yaml, or set BREAKWATER_CONFIG"
    )
}

fn load(given: Option<&Path>) -> anyhow::Result<(PathBuf, Config)> {
    let path = config_path(given)?;
    let config = config::load(&path)?;
    Ok((path, config))
}

fn check(given: Option<&Path>) -> anyhow::Result<()> {
    let (path, c) = load(given)?;
    println!("{}: ok", path.display());
    println!(
        "server   listen {}  max_connections {}  max_request_body {}  header_read_timeout {}  keepalive_timeout {}",
        c.server.listen,
        c.server.max_connections,
        units::format_size(c.server.max_request_body),
        units::format_duration(c.server.header_read_timeout),
        units::format_duration(c.server.keepalive_timeout),
    );
    match c.admin.listen {
        Some(a) => println!("admin    listen {a}"),
        None => println!("admin    disabled"),
    }
    for u in c.upstreams.values() {
        println!(
            "upstream {}  {}  pool max {} min_idle {} idle_timeout {} max_lifetime {} connect_timeout {}",
            u.name,
            u.url,
            u.pool.max_connections,
            u.pool.min_idle,
            units::format_duration(u.pool.idle_timeout),
            units::format_duration(u.pool.max_lifetime),
            units::format_duration(u.pool.connect_timeout),
        );
    }
    for r in &c.routes {
        let methods = if r.methods.is_empty() {
            "any".to_string()
        } else {
            r.methods
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        println!(
            "route    {}  {} {}{}  -> {}  budget {}  concurrency {}  queue {} / {}  max_body {}  on timeout {}",
            r.name,
            methods,
            r.path_prefix,
            r.host.as_ref().map(|h| format!(" host {h}")).unwrap_or_default(),
            r.upstream,
            units::format_duration(r.budget),
            r.concurrency.describe(),
            r.queue.max_depth,
            units::format_duration(r.queue.max_wait),
            units::format_size(r.max_request_body),
            r.timeout_status.as_u16(),
        );
    }
    Ok(())
}

fn init_logging(c: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&c.log.level));
    let json = match c.log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

fn run(given: Option<&Path>) -> anyhow::Result<()> {
    let (path, config) = load(given)?;
    init_logging(&config);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.server.workers {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        tracing::info!(config = %path.display(), "starting");
        let drain_timeout = config.server.drain_timeout;
        let running = breakwater::gateway::start(config).await?;
        wait_for_signal().await;
        tracing::info!(timeout = ?drain_timeout, "draining");
        let drain = running.drain(drain_timeout);
        tokio::select! {
            drained = drain => {
                if drained {
                    tracing::info!("drained; exiting");
                } else {
                    tracing::warn!("drain timeout reached; exiting with connections still open");
                }
            }
            _ = wait_for_signal() => tracing::warn!("second signal; exiting now"),
        }
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
