use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::*;

/// Captures what a tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

/// The line as the fmt layer writes it, configured as `main.rs`'s `init_logging` configures it.
fn via_tracing(line: &AccessLine<'_>, format: Format) -> String {
    let out = Captured::default();
    let builder = tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_ansi(false);
    match format {
        Format::Json => {
            let s = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish();
            tracing::subscriber::with_default(s, || line.emit_tracing());
        }
        Format::Text => {
            let s = builder.finish();
            tracing::subscriber::with_default(s, || line.emit_tracing());
        }
    }
    out.take()
}

fn direct(line: &AccessLine<'_>, format: Format) -> String {
    let mut buf = Vec::new();
    match format {
        Format::Json => line.write_json(SystemTime::now(), &mut buf),
        Format::Text => line.write_text(SystemTime::now(), &mut buf),
    }
    String::from_utf8(buf).unwrap()
}

/// Both start with the 27-byte timestamp (after `{"timestamp":"` in JSON); compared apart.
fn split(line: &str, format: Format) -> (&str, &str) {
    let at = match format {
        Format::Json => {
            assert!(line.starts_with("{\"timestamp\":\""), "{line}");
            14
        }
        Format::Text => 0,
    };
    (&line[at..at + 27], &line[at + 27..])
}

fn plain() -> AccessLine<'static> {
    AccessLine {
        route: "sentiment",
        method: "POST",
        path: "/v1/sentiment",
        status: 200,
        reason: None,
        phase: None,
        total_us: 1850,
        queue_us: Some(100),
        upstream_us: Some(1390),
        endpoint: Some("127.0.0.1:8080"),
        bytes_in: 13,
        bytes_out: 24,
        complete: true,
        request_id: "0e6fa3c8d2807e3ed106154132629ed2",
        client: "10.0.1.23:32944".parse().unwrap(),
        correlation_id: None,
        organization_id: None,
        error: None,
    }
}

/// Strings a caller or an upstream can put in the line: quotes, backslashes, every control
/// character, DEL, non-ASCII, and what is left of invalid UTF-8 once it has become a `&str`.
const HOSTILE: &[&str] = &[
    "",
    "a\"b",
    "back\\slash\\",
    "\"\\\"\\",
    "\u{0}\u{1}\u{7}\u{8}\t\n\u{b}\u{c}\r\u{1b}\u{1f}\u{7f}",
    "line\nbreak\r\n{\"forged\":true}",
    "caf\u{e9} \u{2028}\u{2029} \u{feff} \u{1f600}",
    "\u{fffd}\u{fffd}",
    "%FF%00%22",
];

fn hostile_lines() -> Vec<AccessLine<'static>> {
    let mut lines = vec![plain()];
    for (i, s) in HOSTILE.iter().enumerate() {
        let mut l = plain();
        l.route = s;
        l.path = s;
        l.method = s;
        l.request_id = s;
        l.reason = Some(s);
        l.phase = Some(s);
        l.endpoint = Some(s);
        l.correlation_id = Some(s);
        l.organization_id = Some(s);
        l.error = Some(s);
        l.complete = i % 2 == 0;
        l.queue_us = None;
        l.upstream_us = (i % 3 == 0).then_some(i as u64);
        l.client = if i % 2 == 0 {
            "[2001:db8::1:0:0:1]:443".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        lines.push(l);
    }
    lines
}

#[test]
fn json_lines_are_what_the_fmt_layer_writes() {
    for line in hostile_lines() {
        let ours = direct(&line, Format::Json);
        let theirs = via_tracing(&line, Format::Json);
        assert_eq!(split(&ours, Format::Json).1, split(&theirs, Format::Json).1);
    }
}

#[test]
fn text_lines_are_what_the_fmt_layer_writes() {
    // Text leaves `%` fields bare, so a line break in them would split the line either way;
    // the gateway's own values (route names, methods, paths, ids) never hold one.
    for line in hostile_lines() {
        let ours = direct(&line, Format::Text);
        let theirs = via_tracing(&line, Format::Text);
        assert_eq!(split(&ours, Format::Text).1, split(&theirs, Format::Text).1);
    }
}

#[test]
fn json_lines_parse_back_to_the_values_logged() {
    for line in hostile_lines() {
        let text = direct(&line, Format::Json);
        assert!(text.ends_with('\n'));
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        let s = |k: &str| v.get(k).and_then(|x| x.as_str());
        assert_eq!(s("message"), Some("request"));
        assert_eq!(s("target"), Some("breakwater::access"));
        assert_eq!(s("level"), Some("INFO"));
        assert_eq!(s("route"), Some(line.route));
        assert_eq!(s("method"), Some(line.method));
        assert_eq!(s("path"), Some(line.path));
        assert_eq!(s("request_id"), Some(line.request_id));
        assert_eq!(s("reason"), line.reason);
        assert_eq!(s("phase"), line.phase);
        assert_eq!(s("endpoint"), line.endpoint);
        assert_eq!(s("correlation_id"), line.correlation_id);
        assert_eq!(s("organization_id"), line.organization_id);
        assert_eq!(s("error"), line.error);
        assert_eq!(s("client"), Some(line.client.to_string().as_str()));
        assert_eq!(v["status"], line.status);
        assert_eq!(v["complete"], line.complete);
        assert_eq!(v["bytes_in"], line.bytes_in);
        assert_eq!(v["bytes_out"], line.bytes_out);
        assert_eq!(v["total_ms"], ms(line.total_us));
        assert_eq!(
            v.get("queue_ms").and_then(|x| x.as_f64()),
            line.queue_us.map(ms)
        );
        assert_eq!(
            v.get("upstream_ms").and_then(|x| x.as_f64()),
            line.upstream_us.map(ms)
        );
        let ts = s("timestamp").unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
    }
}

/// Paths as the gateway sees them: `http::Uri` accepts some bytes a caller should have
/// percent-encoded, and whatever it accepts reaches the log.
#[test]
fn request_targets_the_gateway_accepts_log_as_valid_json() {
    let targets: &[&[u8]] = &[
        b"/a\"b",
        b"/a\\b",
        b"/{\"x\":1}",
        b"/caf\xc3\xa9",
        b"/bad\xff\xfe",
        b"/%FF%00",
        b"/a\x7fb",
    ];
    let mut accepted = 0;
    for t in targets {
        let Ok(uri) = http::Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(t)) else {
            continue;
        };
        accepted += 1;
        let mut l = plain();
        l.path = uri.path();
        let v: serde_json::Value = serde_json::from_str(&direct(&l, Format::Json)).unwrap();
        assert_eq!(v["path"], uri.path());
    }
    assert!(accepted >= 3, "only {accepted} targets accepted");
}

#[test]
fn milliseconds_have_the_digits_of_the_float() {
    let mut values: Vec<u64> = vec![
        0,
        1,
        5,
        10,
        99,
        100,
        999,
        1000,
        1001,
        1850,
        1390,
        123_456_789,
    ];
    values.extend((0..5000).map(|i| i * 7 + (i % 13) * 1000));
    values.extend([u64::from(u32::MAX), 9_007_199_254_740_991 / 1024]);
    for us in values {
        let mut ours = Vec::new();
        millis(us, &mut ours);
        let ours = String::from_utf8(ours).unwrap();
        assert_eq!(ours, format!("{:?}", ms(us)), "{us}");
        assert_eq!(ours, serde_json::to_string(&ms(us)).unwrap(), "{us}");
    }
}

#[test]
fn microseconds_round_to_nearest() {
    assert_eq!(micros(Duration::from_nanos(1_499)), 1);
    assert_eq!(micros(Duration::from_nanos(1_500)), 2);
    assert_eq!(micros(Duration::from_secs(3)), 3_000_000);
    assert_eq!(micros(Duration::MAX), u64::MAX);
}

#[test]
fn timestamps_are_rfc3339_utc_to_the_microsecond() {
    let at = |secs: u64, us: u64| {
        let mut out = Vec::new();
        timestamp(
            UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + us),
            &mut out,
        );
        String::from_utf8(out).unwrap()
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
    assert_eq!(at(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
    assert_eq!(at(4_107_542_399, 120), "2100-02-28T23:59:59.000120Z");
    assert_eq!(at(1_795_957_835, 541_512), "2026-11-29T13:10:35.541512Z");
    // The per-thread cache of the second is not stale across seconds.
    assert_eq!(at(1_795_957_836, 1), "2026-11-29T13:10:36.000001Z");
}

#[test]
fn timestamps_match_the_fmt_layer_clock() {
    use tracing_subscriber::fmt::time::FormatTime;
    // Retried in the rare case the second turns between the two readings.
    for _ in 0..5 {
        let mut theirs = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut tracing_subscriber::fmt::format::Writer::new(
                &mut theirs,
            ))
            .unwrap();
        let mut ours = Vec::new();
        timestamp(SystemTime::now(), &mut ours);
        let ours = String::from_utf8(ours).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
        if ours[..20] == theirs[..20] {
            return;
        }
    }
    panic!("timestamps never agreed to the second");
}

#[test]
fn the_writer_thread_writes_every_line_whole_and_in_order_by_exit() {
    let sink: &'static Sink = Box::leak(Box::new(Sink::new(Some(Format::Json))));
    let out = Captured::default();
    let (writer, flusher) = start(sink, Box::new(out.clone())).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                let mut w = writer;
                // One write per line, as the fmt layer writes.
                for i in 0..5000 {
                    let line = format!("{t} {i} {}\n", "x".repeat(i % 200));
                    w.write_all(line.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Lines appended just before exit are written by the flusher, not lost.
    drop(flusher);
    let text = out.take();
    let mut next = [0usize; 4];
    for line in text.lines() {
        let mut parts = line.split(' ');
        let t: usize = parts.next().unwrap().parse().unwrap();
        let i: usize = parts.next().unwrap().parse().unwrap();
        assert_eq!(parts.next().unwrap().len(), i % 200);
        assert_eq!(i, next[t], "thread {t}'s lines out of order");
        next[t] += 1;
    }
    assert_eq!(next, [5000; 4]);
}

#[test]
fn a_line_waits_at_most_about_the_flush_interval() {
    let sink: &'static Sink = Box::leak(Box::new(Sink::new(Some(Format::Json))));
    let out = Captured::default();
    let (mut writer, _flusher) = start(sink, Box::new(out.clone())).unwrap();
    writer.write_all(b"one\n").unwrap();
    // Generous: this checks that an idle writer is woken, not how fast.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while out.0.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never written");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(out.take(), "one\n");
}
