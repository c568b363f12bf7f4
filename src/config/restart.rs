//! What a reload can change and what only a restart can. Some keys are read once, when the
//! gateway starts: into bound sockets, the listener's connection settings, the runtime, the
//! logger. A reloaded configuration keeps the running values of those keys, so that what
//! `GET /config` shows is what is in force, and lists each whose file value differs as pending a
//! restart.

use serde_json::Value;

use super::describe::describe;
use super::Config;

/// The keys a reload cannot change, as `GET /config` names them. Everything else (routes,
/// upstreams, auth, `server.body_read_timeout`, `server.max_request_body` as the routes' default,
/// `server.drain_timeout`, `admin.ready_requires_upstream`) is read from the current table.
pub const RESTART_KEYS: &[&str] = &[
    // The bound socket.
    "server.listen",
    "server.listen_backlog",
    // The runtime.
    "server.workers",
    // Handed to the listener when it starts.
    "server.header_read_timeout",
    "server.keepalive_timeout",
    "server.max_connections",
    "server.max_header_size",
    "server.max_headers",
    "server.http2",
    "server.proxy_protocol",
    "server.max_connections_per_source",
    // The certificate is re-read on reload, but from the files the gateway started with.
    "server.tls.cert",
    "server.tls.key",
    // `admin.enabled: false` shows as no `admin.listen`.
    "admin.listen",
    // The logger.
    "log.format",
    "log.level",
];

/// A key whose value in the file is not the one in force, until a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRestart {
    pub key: &'static str,
    /// As `GET /config` shows values: in the file's units, secrets redacted.
    pub running: Value,
    pub file: Value,
}

/// `file`, read by a reload, as the gateway running `running` can apply it: the keys only a
/// restart changes keep their running values, and each whose file value differs is listed in
/// `pending_restart`.
pub fn in_force(running: &Config, file: Config) -> Config {
    let (now, wanted) = (describe(running), describe(&file));
    let mut c = file;
    let (s, r) = (&mut c.server, &running.server);
    s.listen = r.listen;
    s.listen_backlog = r.listen_backlog;
    s.workers = r.workers;
    s.header_read_timeout = r.header_read_timeout;
    s.keepalive_timeout = r.keepalive_timeout;
    s.max_connections = r.max_connections;
    s.max_header_size = r.max_header_size;
    s.max_headers = r.max_headers;
    s.http2 = r.http2;
    s.proxy_protocol = r.proxy_protocol;
    s.max_connections_per_source = r.max_connections_per_source;
    s.tls = r.tls.clone();
    c.admin.listen = running.admin.listen;
    c.log = running.log.clone();
    c.pending_restart = RESTART_KEYS
        .iter()
        .filter_map(|key| {
            let (running, file) = (at(&now, key), at(&wanted, key));
            (running != file).then_some(PendingRestart { key, running, file })
        })
        .collect();
    c
}

/// The value at a dotted key (null when absent, as for `server.tls.cert` without TLS).
fn at(v: &Value, key: &str) -> Value {
    key.split('.')
        .try_fold(v, |v, k| v.get(k))
        .cloned()
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_yaml;

    const ROUTES: &str = "upstreams:\n  app: { url: \"http://127.0.0.1:8000\" }\nroutes:\n  - { name: api, upstream: app }\n";

    fn leaves(v: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    leaves(child, &format!("{prefix}.{k}"), out)
                }
            }
            other => out.push((prefix.trim_start_matches('.').to_string(), other.clone())),
        }
    }

    /// Two files that differ in every key of `server`, `admin` and `log`: the restart keys keep
    /// the running values and are listed, every other key takes the file's.
    #[test]
    fn restart_keys_keep_running_values_and_the_rest_follow_the_file() {
        let one = from_yaml(ROUTES, Vec::new()).unwrap();
        let two = from_yaml(
            &format!(
                r#"
server:
  listen: 127.0.0.1:1
  listen_backlog: 16
  workers: 2
  header_read_timeout: 1s
  body_read_timeout: 2s
  keepalive_timeout: 3s
  max_connections: 4
  max_request_body: 5KiB
  max_header_size: 9KiB
  max_headers: 7
  drain_timeout: 8s
  http2: false
  tls: {{ cert: /c.pem, key: /k.pem }}
  proxy_protocol: true
  max_connections_per_source: 9
admin: {{ listen: 127.0.0.1:2, ready_requires_upstream: true }}
log: {{ format: json, level: debug }}
{ROUTES}"#
            ),
            Vec::new(),
        )
        .unwrap();
        let kept = in_force(&one, two.clone());
        let (one_v, two_v, kept_v) = (describe(&one), describe(&two), describe(&kept));
        // The second file sets every key, so its leaves are all the keys there are.
        let mut all = Vec::new();
        for section in ["server", "admin", "log"] {
            leaves(&two_v[section], section, &mut all);
        }
        let mut compared = 0;
        for (key, _) in all {
            let value = at(&kept_v, &key);
            let restart = RESTART_KEYS.contains(&key.as_str());
            let (expected, other) = if restart {
                (at(&one_v, &key), at(&two_v, &key))
            } else {
                (at(&two_v, &key), at(&one_v, &key))
            };
            assert_eq!(value, expected, "{key}");
            assert_ne!(expected, other, "the files must differ at {key}");
            compared += 1;
        }
        assert!(compared >= RESTART_KEYS.len() + 3, "{compared}");
        let pending: Vec<&str> = kept.pending_restart.iter().map(|p| p.key).collect();
        assert_eq!(pending, RESTART_KEYS);
        assert_eq!(kept.pending_restart[0].running, "0.0.0.0:8080");
        assert_eq!(kept.pending_restart[0].file, "127.0.0.1:1");

        // Back to the first file: nothing is pending any more.
        assert!(in_force(&kept, one).pending_restart.is_empty());
    }
}
