#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use breakwater::config::{self, units, Config, LogFormat};
use breakwater::logline;
use breakwater::prepare::{self, Loaded};

// The demo's simulated backend and burst tool serve this command only; they are not part of the
// library a gateway is built from.
mod demo;

// A proxy allocates and frees small buffers on every request from several threads; mimalloc
// does that with far less contention and fragmentation than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "An edge gateway that makes overload explicit and fast"
)]
struct Cli {
    /// Config file. Default: $BREAKWATER_CONFIG if set, else config/breakwater.yaml.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, read the certificates and secrets it names, print the effective
    /// routes and upstreams, and exit. Binds nothing.
    Check,
    /// See the problem and the fix: a burst against a simulated backend, directly and through
    /// Breakwater, side by side. Loopback only, under a minute.
    Demo(Box<DemoArgs>),
}

#[derive(clap::Args)]
struct DemoArgs {
    #[command(subcommand)]
    part: Option<DemoPart>,
    #[command(flatten)]
    shape: BurstShape,
    /// Route budget through Breakwater.
    #[arg(long, default_value = "2s", value_parser = duration)]
    budget: Duration,
    /// Queue depth through Breakwater.
    #[arg(long, default_value_t = 100)]
    queue_depth: usize,
    /// Requests through Breakwater before the burst (0 shows the cold start).
    #[arg(long, default_value_t = 8)]
    warmup: usize,
    #[command(flatten)]
    backend: BackendShape,
}

#[derive(clap::Args, Clone)]
struct BurstShape {
    /// Callers arriving at once.
    #[arg(long, default_value_t = 200)]
    callers: usize,
    /// How long each caller waits before giving up (a data action's timeout).
    #[arg(long, default_value = "3s", value_parser = duration)]
    caller_timeout: Duration,
}

#[derive(clap::Args, Clone)]
struct BackendShape {
    /// Simulated backend workers (uvicorn --workers).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Time each request takes a worker.
    #[arg(long, default_value = "200ms", value_parser = duration)]
    service_time: Duration,
    /// How connections reach workers: `uvicorn` pins each to the worker that accepted it (skewed
    /// like uvicorn's shared socket), `free` lets any request use any free worker.
    #[arg(long, value_enum, default_value_t = demo::Pinning::Uvicorn)]
    pinning: demo::Pinning,
    /// Seed for the uvicorn accept model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl BackendShape {
    fn options(&self) -> demo::BackendOptions {
        demo::BackendOptions {
            workers: self.workers,
            service_time: self.service_time,
            pinning: self.pinning,
            seed: self.seed,
        }
    }
}

#[derive(Subcommand)]
enum DemoPart {
    /// Serve only the simulated backend (to put other proxies in front of it).
    Backend {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        #[command(flatten)]
        backend: BackendShape,
    },
    /// Fire one burst at a URL and print what the callers got.
    Burst {
        /// e.g. http://127.0.0.1:8080/v1/sentiment
        url: http::Uri,
        #[command(flatten)]
        shape: BurstShape,
        /// Backend capacity in requests/s, to express goodput as a share of it.
        #[arg(long, default_value_t = 20.0)]
        capacity: f64,
    },
    /// Open-loop load on a URL: callers arrive on a schedule, each on its own connection, and an
    /// optional slow-down asks the backend for `?latency_ms=` in a time window.
    Load {
        /// e.g. http://127.0.0.1:8080/v1/sentiment
        url: http::Uri,
        /// Arrivals per second.
        #[arg(long, default_value_t = 40.0)]
        rate: f64,
        #[arg(long, default_value = "10s", value_parser = duration)]
        duration: Duration,
        #[arg(long, default_value = "3s", value_parser = duration)]
        caller_timeout: Duration,
        /// Arrivals from this time on ask for --slow-latency ...
        #[arg(long, value_parser = duration, requires_all = ["slow_to", "slow_latency"])]
        slow_from: Option<Duration>,
        /// ... until this time.
        #[arg(long, value_parser = duration)]
        slow_to: Option<Duration>,
        #[arg(long, value_parser = duration)]
        slow_latency: Option<Duration>,
        /// Count fast refusals and long waits among arrivals from ...
        #[arg(long, value_parser = duration, requires = "window_to")]
        window_from: Option<Duration>,
        /// ... to.
        #[arg(long, value_parser = duration)]
        window_to: Option<Duration>,
        /// Print the outcome per second of arrival.
        #[arg(long)]
        timeline: bool,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    units::parse_duration(s)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config.as_deref()),
        Command::Check => check(cli.config.as_deref()),
        Command::Demo(args) => demo(*args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("breakwater: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The flag, then `BREAKWATER_CONFIG`, then the default path: a path someone wrote down wins
/// over the one the working directory happens to hold.
fn config_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("BREAKWATER_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let local = PathBuf::from("config/breakwater.yaml");
    if local.exists() {
        return Ok(local);
    }
    bail!(
        "no config: pass --config PATH, or set BREAKWATER_CONFIG, or create config/breakwater.yaml"
    )
}

fn load(given: Option<&Path>) -> anyhow::Result<(PathBuf, Loaded)> {
    let path = config_path(given)?;
    let loaded = prepare::load(&path)?;
    Ok((path, loaded))
}

fn check(given: Option<&Path>) -> anyhow::Result<()> {
    let (path, loaded) = load(given)?;
    let (c, prepared) = (&loaded.config, &loaded.prepared);
    println!("{}: ok", path.display());
    println!(
        "server   listen {}  workers {}  max_connections {}  max_request_body {}  header_read_timeout {}  keepalive_timeout {}",
        c.server.listen,
        c.server
            .workers
            .map(|n| n.to_string())
            .unwrap_or_else(|| "auto".into()),
        c.server.max_connections,
        units::format_size(c.server.max_request_body),
        units::format_duration(c.server.header_read_timeout),
        units::format_duration(c.server.keepalive_timeout),
    );
    match (&c.server.tls, &prepared.server_tls) {
        (Some(t), Some(live)) => println!(
            "tls      cert {}  key {}  (leaf sha256 {})  TLS 1.2/1.3  ALPN {}; re-read on SIGHUP and when the files change",
            t.cert.display(),
            t.key.display(),
            live.fingerprint(),
            if c.server.http2 { "h2,http/1.1" } else { "http/1.1" },
        ),
        _ => println!("tls      off (plain HTTP on the listener)"),
    }
    println!(
        "         proxy_protocol {}  max_connections_per_source {}",
        if c.server.proxy_protocol {
            "on (v1/v2; every connection must start with a header)"
        } else {
            "off"
        },
        c.server
            .max_connections_per_source
            .map(|n| n.to_string())
            .unwrap_or_else(|| "unlimited".into()),
    );
    match c.admin.listen {
        Some(a) => println!("admin    listen {a}"),
        None => println!("admin    disabled"),
    }
    match &prepared.auth {
        Some(a) => println!("auth     {}", a.summary()),
        None => println!("auth     none (routes without their own auth: block are open)"),
    }
    for u in c.upstreams.values() {
        let shown = u
            .endpoints
            .iter()
            .map(|e| match e.concurrency {
                Some(n) => format!("{} (concurrency {n})", config::redact_url(&e.url)),
                None => config::redact_url(&e.url),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let balance = match &u.discovery {
            Some(d) => format!(
                "  discovery every {} endpoint_concurrency {}",
                units::format_duration(d.every),
                d.endpoint_concurrency
                    .map_or("none".to_string(), |n| n.to_string())
            ),
            None if u.endpoints.len() > 1 => format!("  balance {}", u.balance.as_str()),
            None => String::new(),
        };
        println!(
            "upstream {}  {shown}{balance}  pool max {} min_idle {} idle_timeout {} max_lifetime {} connect_timeout {}",
            u.name,
            u.pool.max_connections,
            u.pool.min_idle,
            units::format_duration(u.pool.idle_timeout),
            units::format_duration(u.pool.max_lifetime),
            units::format_duration(u.pool.connect_timeout),
        );
        if let Some(t) = &u.tls {
            let roots = match &t.ca_file {
                _ if t.insecure_skip_verify => "NOTHING (insecure_skip_verify)".to_string(),
                Some(ca) => format!("ca_file {}", ca.display()),
                None => "public (webpki) roots".to_string(),
            };
            let client = match (&t.client_cert, &t.client_key) {
                (Some(cert), Some(key)) => {
                    format!("client cert {} key {}", cert.display(), key.display())
                }
                _ => "no client cert".to_string(),
            };
            let name = match &t.server_name {
                Some(n) => n.clone(),
                None if u.endpoints.len() > 1 => "each endpoint's host".to_string(),
                None => u.endpoints[0].host.clone(),
            };
            println!("         tls verify {roots}  name {name}  {client}");
            if t.insecure_skip_verify {
                println!(
                    "         WARNING: upstream {} certificate verification is disabled (tls.insecure_skip_verify); anyone on the path can impersonate it",
                    u.name
                );
            }
        }
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
        // Secrets are never printed: only where they come from and how many keys were loaded.
        match (prepared.route_auth.get(&r.name), r.auth_origin) {
            (Some(_), config::AuthOrigin::Global) => println!("         auth global"),
            (Some(a), _) => println!("         auth {}", a.summary()),
            (None, config::AuthOrigin::Disabled) => println!("         auth disabled"),
            (None, _) => println!("         auth none"),
        }
    }
    let warnings = config::warnings(c);
    if !warnings.is_empty() {
        println!(
            "\n{} warning(s): valid, but probably not what was meant:",
            warnings.len()
        );
        for w in warnings {
            println!("WARNING  {w}");
        }
    }
    Ok(())
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
    rt.block_on(async move {
        match args.part {
            Some(DemoPart::Backend { listen, backend }) => {
                let b = demo::SimBackend::start(listen, &backend.options()).await?;
                println!(
                    "simulated backend on http://{} ({} workers x {}, pinning {:?}); Ctrl-C to stop",
                    b.addr,
                    backend.workers,
                    units::format_duration(backend.service_time),
                    backend.pinning,
                );
                wait_for_signal().await;
                Ok(())
            }
            Some(DemoPart::Burst { url, shape, capacity }) => {
                let b = demo::burst::fire(&url, shape.callers, shape.caller_timeout).await;
                let s = demo::Summary::of(&b);
                print!("{}", demo::report::table(&[(&url.to_string(), &s)], capacity));
                Ok(())
            }
            Some(DemoPart::Load {
                url,
                rate,
                duration,
                caller_timeout,
                slow_from,
                slow_to,
                slow_latency,
                window_from,
                window_to,
                timeline,
            }) => {
                let slow = match (slow_from, slow_to, slow_latency) {
                    (Some(from), Some(to), Some(latency)) => Some(demo::load::Slow { from, to, latency }),
                    _ => None,
                };
                let plan = demo::load::Plan { rate, duration, caller_timeout, latency: None, slow };
                let arrivals = demo::load::run(&url, &plan).await;
                if timeline {
                    print!("{}", demo::load::timeline(&arrivals));
                }
                let window = window_from.zip(window_to);
                let r = demo::load::LoadReport::of(&arrivals, window, plan.slow.as_ref().map(|s| s.to));
                println!("{}", r.summary_line());
                Ok(())
            }
            None => {
                let opts = demo::DemoOptions {
                    callers: args.shape.callers,
                    caller_timeout: args.shape.caller_timeout,
                    budget: args.budget,
                    workers: args.backend.workers,
                    service_time: args.backend.service_time,
                    pinning: args.backend.pinning,
                    seed: args.backend.seed,
                    queue_depth: args.queue_depth,
                    warmup: args.warmup,
                };
                println!("Breakwater demo: a burst of data-action calls against a backend that cannot keep up.\n");
                let r = demo::run(&opts).await?;
                println!();
                print!(
                    "{}",
                    demo::report::table(
                        &[
                            ("direct to backend", &r.direct),
                            ("through Breakwater", &r.gateway),
                            ("one endpoint per worker", &r.endpoints),
                            ("one port, worker named", &r.named),
                        ],
                        opts.capacity()
                    )
                );
                let row = |label: &str, a: String, b: String, c: String, d: String| {
                    println!("{label:29}  {a:>17}  {b:>18}  {c:>23}  {d:>22}");
                };
                row(
                    "backend work for callers gone",
                    r.wasted_direct.to_string(),
                    r.wasted_gateway.to_string(),
                    r.wasted_endpoints.to_string(),
                    r.wasted_named.to_string(),
                );
                let per = |v: &[usize]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("/");
                row(
                    "requests served per worker",
                    per(&r.served_direct),
                    per(&r.served_gateway),
                    per(&r.served_endpoints),
                    per(&r.served_named),
                );
                if !r.connections_direct.is_empty() {
                    row(
                        "connections per worker",
                        per(&r.connections_direct),
                        per(&r.connections_gateway),
                        "-".into(),
                        per(&r.connections_named),
                    );
                }
                println!("\n{}", demo::verdict(&r, &opts));
                anyhow::Ok(())
            }
        }
    })
}

/// Log lines are written by a background thread: a slow or blocked stdout (a full log pipe) must
/// never stall request handling. Under extreme load the buffer drops lines rather than block; the
/// returned guard flushes what is left when the process exits.
/// Every line goes through one batching writer thread (`logline`), so a request never waits on
/// stdout; the returned flusher writes out what is still waiting when dropped.
fn init_logging(c: &Config) -> anyhow::Result<logline::Flusher> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&c.log.level));
    let json = match c.log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let ansi = !json && std::io::stdout().is_terminal();
    // Coloured text is for a person at a terminal, not a request rate: leave it to the fmt layer.
    let access = match (json, ansi) {
        (true, _) => Some(logline::Format::Json),
        (false, false) => Some(logline::Format::Text),
        (false, true) => None,
    };
    let (writer, flusher) = logline::install(Box::new(std::io::stdout()), access)
        .context("starting the log writer thread")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
    Ok(flusher)
}

fn run(given: Option<&Path>) -> anyhow::Result<()> {
    let (path, loaded) = load(given)?;
    let _log_writer = init_logging(&loaded.config)?;
    // `server.workers: N` runs N current-thread runtimes, this thread's being the first (it also
    // runs the admin listener and the signal handling; the gateway starts the others): a
    // connection then stays on the thread that accepted it, with no work-stealing handoffs.
    // Without it, one multi-thread runtime, a thread per core.
    let mut rt = match loaded.config.server.workers {
        Some(_) => tokio::runtime::Builder::new_current_thread(),
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = rt
        .event_interval(breakwater::gateway::EVENT_INTERVAL)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        tracing::info!(config = %path.display(), "starting");
        // Taken over before anything listens: a signal's default action kills the process, and
        // a SIGTERM or SIGHUP that arrives once callers can connect must drain or reload.
        let mut stop = Signals::install();
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let running = breakwater::gateway::start_from(loaded, Some(path)).await?;
        let shared = running.shared.clone();
        tokio::spawn(async move {
            let Ok(mut hup) = hup else {
                tracing::warn!("cannot listen for SIGHUP; reload with POST /reload instead");
                return;
            };
            while hup.recv().await.is_some() {
                // Outcome and problems are logged and counted by reload itself.
                let _ = breakwater::reload::reload(shared.clone()).await;
            }
        });
        stop.next().await;
        // Read now, not at start: a reload may have changed it.
        let drain_timeout = running.drain_timeout();
        tracing::info!(timeout = %units::format_duration(drain_timeout), "draining");
        let drain = running.drain(drain_timeout);
        tokio::select! {
            drained = drain => {
                if drained {
                    tracing::info!("drained; exiting");
                } else {
                    tracing::warn!("drain timeout reached; exiting with connections still open");
                }
            }
            _ = stop.next() => tracing::warn!("second signal; exiting now"),
        }
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// SIGTERM and SIGINT, handled from when this is installed on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).expect("installing SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("installing SIGINT handler"),
        }
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn wait_for_signal() {
    Signals::install().next().await
}
