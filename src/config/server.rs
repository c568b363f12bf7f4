//! `server:`: the traffic listener, its limits and timers, HTTPS and the PROXY protocol.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::problems::{path_value, Problems};
use super::raw::{RawServer, RawServerTls};

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Accept queue length; bursts of simultaneous connects beyond it wait for a SYN retry.
    pub listen_backlog: u32,
    pub workers: Option<usize>,
    pub header_read_timeout: Duration,
    /// A request body that sends nothing for this long is cut off (408).
    pub body_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    pub max_request_body: u64,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub drain_timeout: Duration,
    pub http2: bool,
    /// HTTPS on the listener.
    pub tls: Option<ServerTlsConfig>,
    /// Every connection starts with a PROXY protocol (v1 or v2) header naming the client.
    pub proxy_protocol: bool,
    /// Open connections allowed from one source address (after the PROXY protocol); none: any.
    pub max_connections_per_source: Option<usize>,
}

/// `server.tls`: the files the listener's certificate chain and private key are read from. The
/// running gateway reads them (at start, on reload and when they change; see [`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub(super) fn validate(p: &mut Problems, s: &RawServer) -> ServerConfig {
    let server = ServerConfig {
        listen: p.addr("server.listen", &s.listen, "0.0.0.0:8080"),
        listen_backlog: p.count("server.listen_backlog", s.listen_backlog, 4096, 1, 65535) as u32,
        workers: s
            .workers
            .map(|_| p.count("server.workers", s.workers, 1, 1, 1024) as usize),
        header_read_timeout: p.duration(
            "server.header_read_timeout",
            &s.header_read_timeout,
            Duration::from_secs(10),
        ),
        body_read_timeout: p.duration(
            "server.body_read_timeout",
            &s.body_read_timeout,
            Duration::from_secs(10),
        ),
        keepalive_timeout: p.duration(
            "server.keepalive_timeout",
            &s.keepalive_timeout,
            Duration::from_secs(75),
        ),
        max_connections: p.count(
            "server.max_connections",
            s.max_connections,
            10_000,
            1,
            10_000_000,
        ) as usize,
        max_request_body: p.size("server.max_request_body", &s.max_request_body, 1 << 20),
        max_header_size: p.size("server.max_header_size", &s.max_header_size, 64 << 10) as usize,
        max_headers: p.count("server.max_headers", s.max_headers, 100, 1, 10_000) as usize,
        drain_timeout: p.duration(
            "server.drain_timeout",
            &s.drain_timeout,
            Duration::from_secs(25),
        ),
        http2: s.http2.unwrap_or(true),
        tls: None,
        proxy_protocol: s.proxy_protocol.unwrap_or(false),
        max_connections_per_source: s.max_connections_per_source.map(|n| {
            p.count(
                "server.max_connections_per_source",
                Some(n),
                1,
                1,
                10_000_000,
            ) as usize
        }),
    };
    let mut server = server;
    server.tls = s.tls.as_ref().and_then(|t| validate_tls(p, t));
    if server.max_header_size < 8192 {
        p.add(
            "server.max_header_size",
            format!("`{}`: must be at least 8KiB", server.max_header_size),
        );
    }
    server
}

fn validate_tls(p: &mut Problems, t: &RawServerTls) -> Option<ServerTlsConfig> {
    let base = "server.tls";
    let mut required = |field: &str, value: &Option<String>, what: &str| match value {
        None => {
            p.add(
                format!("{base}.{field}"),
                format!("missing: the path of the PEM {what}"),
            );
            None
        }
        Some(v) => path_value(p, &format!("{base}.{field}"), v),
    };
    let cert = required("cert", &t.cert, "certificate chain (leaf first)");
    let key = required("key", &t.key, "private key");
    Some(ServerTlsConfig {
        cert: cert?,
        key: key?,
    })
}
