//! The access-log line, formatted by hand, and the batching writer every log line goes through.
//!
//! Going through `tracing`'s field visitor and the generic fmt layer cost a busy gateway 15–25 %
//! of its requests/s (docs/benchmarks.md §7): every field passes through `dyn Debug`, the JSON
//! layer builds a map per event, and the non-blocking appender copied each line into its own
//! allocation and wrote it with a syscall of its own. Here the access line is written straight
//! into a reused per-thread buffer, byte for byte what the fmt layer would have written (a test
//! holds the two side by side), and all lines (access lines and the fmt layer's) are appended to
//! one shared batch that a writer thread writes out in one `write` every [`FLUSH_EVERY`] or
//! sooner once it passes [`BATCH_BYTES`]. One writer for every line keeps lines whole and in order
//! on a pipe, where two writers' large writes could interleave.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest a line waits in the batch before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(5);
/// A batch this large is written without waiting for [`FLUSH_EVERY`].
pub const BATCH_BYTES: usize = 64 * 1024;
/// Lines arriving while this much is waiting (stdout blocked) are dropped rather than held: a log
/// reader that stalls must not stall or exhaust the gateway.
pub const BACKLOG_BYTES: usize = 16 * 1024 * 1024;

/// The access line's fields, in the order they are written.
#[derive(Debug, Clone)]
pub struct AccessLine<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub reason: Option<&'a str>,
    pub phase: Option<&'a str>,
    /// Durations in whole microseconds; logged as milliseconds.
    pub total_us: u64,
    pub queue_us: Option<u64>,
    pub upstream_us: Option<u64>,
    pub endpoint: Option<&'a str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub complete: bool,
    pub request_id: &'a str,
    pub client: SocketAddr,
    pub correlation_id: Option<&'a str>,
    pub organization_id: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Whole microseconds, rounded: finer digits are noise in a log line.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().saturating_add(500) / 1000).unwrap_or(u64::MAX)
}

/// Microseconds as the float milliseconds the log promises.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

impl AccessLine<'_> {
    /// Writes the line: into the batch when one is installed, else as a `tracing` event (a
    /// gateway embedded as a library, tests with their own subscriber). Callers check
    /// `tracing::enabled!` first, so `log.level` and `RUST_LOG` decide either way.
    pub fn emit(&self) {
        match SINK.get() {
            Some(sink) if sink.access.is_some() => sink.access_line(self),
            _ => self.emit_tracing(),
        }
    }

    pub fn emit_tracing(&self) {
        tracing::info!(
            target: "breakwater::access",
            route = %self.route,
            method = %self.method,
            path = %self.path,
            status = self.status,
            reason = self.reason,
            phase = self.phase,
            total_ms = ms(self.total_us),
            queue_ms = self.queue_us.map(ms),
            upstream_ms = self.upstream_us.map(ms),
            endpoint = self.endpoint,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            complete = self.complete,
            request_id = %self.request_id,
            client = %self.client,
            correlation_id = self.correlation_id,
            organization_id = self.organization_id,
            error = self.error,
            "request"
        );
    }

    /// One JSON object and a newline, as tracing-subscriber's JSON layer with `flatten_event`
    /// writes it (serde_json's string escaping, shortest float digits).
    pub fn write_json(&self, now: SystemTime, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(now, out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\",\"route\":");
        json_str(self.route, out);
        out.extend_from_slice(b",\"method\":");
        json_str(self.method, out);
        out.extend_from_slice(b",\"path\":");
        json_str(self.path, out);
        out.extend_from_slice(b",\"status\":");
        int(self.status.into(), out);
        if let Some(r) = self.reason {
            out.extend_from_slice(b",\"reason\":");
            json_str(r, out);
        }
        if let Some(p) = self.phase {
            out.extend_from_slice(b",\"phase\":");
            json_str(p, out);
        }
        out.extend_from_slice(b",\"total_ms\":");
        millis(self.total_us, out);
        if let Some(q) = self.queue_us {
            out.extend_from_slice(b",\"queue_ms\":");
            millis(q, out);
        }
        if let Some(u) = self.upstream_us {
            out.extend_from_slice(b",\"upstream_ms\":");
            millis(u, out);
        }
        if let Some(e) = self.endpoint {
            out.extend_from_slice(b",\"endpoint\":");
            json_str(e, out);
        }
        out.extend_from_slice(b",\"bytes_in\":");
        int(self.bytes_in, out);
        out.extend_from_slice(b",\"bytes_out\":");
        int(self.bytes_out, out);
        out.extend_from_slice(if self.complete {
            b",\"complete\":true,\"request_id\":"
        } else {
            b",\"complete\":false,\"request_id\":"
        });
        json_str(self.request_id, out);
        // Addresses are digits, dots, colons and brackets: nothing to escape.
        out.extend_from_slice(b",\"client\":\"");
        addr(self.client, out);
        out.push(b'"');
        for (name, v) in [
            (&b",\"correlation_id\":"[..], self.correlation_id),
            (b",\"organization_id\":", self.organization_id),
            (b",\"error\":", self.error),
        ] {
            if let Some(v) = v {
                out.extend_from_slice(name);
                json_str(v, out);
            }
        }
        out.extend_from_slice(b",\"target\":\"breakwater::access\"}\n");
    }

    /// One line as tracing-subscriber's default (full, no ANSI) format writes it: `%` fields
    /// bare, optional string fields quoted and escaped by `str`'s `Debug`.
    pub fn write_text(&self, now: SystemTime, out: &mut Vec<u8>) {
        timestamp(now, out);
        out.extend_from_slice(b"  INFO breakwater::access: request route=");
        out.extend_from_slice(self.route.as_bytes());
        out.extend_from_slice(b" method=");
        out.extend_from_slice(self.method.as_bytes());
        out.extend_from_slice(b" path=");
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" status=");
        int(self.status.into(), out);
        debug_field(b" reason=", self.reason, out);
        debug_field(b" phase=", self.phase, out);
        out.extend_from_slice(b" total_ms=");
        millis(self.total_us, out);
        if let Some(q) = self.queue_us {
            out.extend_from_slice(b" queue_ms=");
            millis(q, out);
        }
        if let Some(u) = self.upstream_us {
            out.extend_from_slice(b" upstream_ms=");
            millis(u, out);
        }
        debug_field(b" endpoint=", self.endpoint, out);
        out.extend_from_slice(b" bytes_in=");
        int(self.bytes_in, out);
        out.extend_from_slice(b" bytes_out=");
        int(self.bytes_out, out);
        out.extend_from_slice(if self.complete {
            b" complete=true request_id="
        } else {
            b" complete=false request_id="
        });
        out.extend_from_slice(self.request_id.as_bytes());
        out.extend_from_slice(b" client=");
        addr(self.client, out);
        debug_field(b" correlation_id=", self.correlation_id, out);
        debug_field(b" organization_id=", self.organization_id, out);
        debug_field(b" error=", self.error, out);
        out.push(b'\n');
    }
}

fn debug_field(name: &[u8], v: Option<&str>, out: &mut Vec<u8>) {
    if let Some(v) = v {
        out.extend_from_slice(name);
        // Writing into a Vec cannot fail.
        let _ = write!(out, "{v:?}");
    }
}

fn int(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Microseconds as milliseconds with the digits `{:?}` of the f64 `us / 1000` shows (and
/// serde_json writes): `1.85`, `0.001`, `2.0`. For any `us` below 2^53 (285 years) the shortest
/// decimal that reads back as that f64 is exactly the integer's digits with the point moved.
fn millis(us: u64, out: &mut Vec<u8>) {
    int(us / 1000, out);
    let frac = us % 1000;
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let len = if frac % 100 == 0 {
        1
    } else if frac % 10 == 0 {
        2
    } else {
        3
    };
    out.push(b'.');
    out.extend_from_slice(&digits[..len]);
}

fn addr(a: SocketAddr, out: &mut Vec<u8>) {
    match a {
        SocketAddr::V4(v4) => {
            let [a, b, c, d] = v4.ip().octets();
            for (i, o) in [a, b, c, d].into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                int(o.into(), out);
            }
            out.push(b':');
            int(v4.port().into(), out);
        }
        // Rare behind a load balancer, and the zero-run compression is std's to get right.
        SocketAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A JSON string as serde_json escapes it: `"` and `\`, the short escapes for `\b \t \n \f \r`,
/// `\u00xx` for the other control characters; everything else (non-ASCII included) as it is.
fn json_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

thread_local! {
    /// The second the cached prefix is for, and `YYYY-MM-DDTHH:MM:SS.` for it: a busy thread
    /// logs many lines per second and the calendar arithmetic is the same for all of them.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    /// The line being formatted, reused so a line costs no allocation.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// RFC 3339 UTC to the microsecond, as tracing-subscriber's `SystemTime` timer writes it.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        prefix = civil(secs);
        SECOND.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    let us = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = us;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` for seconds since the epoch (Howard Hinnant's days-to-civil).
fn civil(secs: u64) -> [u8; 20] {
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 20];
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, sod / 3600);
    put(14, 2, sod / 60 % 60);
    put(17, 2, sod % 60);
    out[4] = b'-';
    out[7] = b'-';
    out[10] = b'T';
    out[13] = b':';
    out[16] = b':';
    out[19] = b'.';
    out
}

/// Lines waiting for the writer thread.
struct Batch {
    buf: Vec<u8>,
    /// The writer waits for a first line; the line that ends the wait wakes it.
    writer_idle: bool,
    closing: bool,
}

/// The shared batch and its writer thread's signal.
pub struct Sink {
    batch: Mutex<Batch>,
    wake: Condvar,
    /// How access lines are formatted here; `None` leaves them to the fmt layer (a terminal
    /// with colours).
    access: Option<Format>,
}

static SINK: OnceLock<Sink> = OnceLock::new();

impl Sink {
    fn new(access: Option<Format>) -> Self {
        Sink {
            batch: Mutex::new(Batch {
                buf: Vec::with_capacity(BATCH_BYTES * 2),
                writer_idle: false,
                closing: false,
            }),
            wake: Condvar::new(),
            access,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        // A panic while holding the lock leaves a batch of whole lines: still fine to write.
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends whole lines to the batch, or drops them when the backlog is full.
    pub fn append(&self, lines: &[u8]) {
        let mut b = self.lock();
        let before = b.buf.len();
        if before + lines.len() > BACKLOG_BYTES {
            return;
        }
        b.buf.extend_from_slice(lines);
        let wake =
            (before == 0 && b.writer_idle) || (before < BATCH_BYTES && b.buf.len() >= BATCH_BYTES);
        drop(b);
        if wake {
            self.wake.notify_one();
        }
    }

    fn access_line(&self, line: &AccessLine<'_>) {
        let now = SystemTime::now();
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            match self.access {
                Some(Format::Json) => line.write_json(now, buf),
                Some(Format::Text) => line.write_text(now, buf),
                None => return,
            }
            self.append(buf);
        });
    }

    /// Writes batches until closed, then what is left.
    fn run(&self, out: &mut dyn Write) {
        let mut spare = Vec::with_capacity(BATCH_BYTES * 2);
        loop {
            let mut b = self.lock();
            while b.buf.is_empty() && !b.closing {
                b.writer_idle = true;
                b = self.wake.wait(b).unwrap_or_else(|e| e.into_inner());
            }
            b.writer_idle = false;
            if !b.closing && b.buf.len() < BATCH_BYTES {
                // Let the batch fill; a full batch or closing cuts the wait short.
                b = self
                    .wake
                    .wait_timeout(b, FLUSH_EVERY)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut b.buf, &mut spare);
            let closing = b.closing && b.buf.is_empty();
            drop(b);
            // Nowhere to report a failed log write; the next batch tries again.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            // A backlog's buffer is not kept for the rest of the process's life.
            if spare.capacity() > BATCH_BYTES * 4 {
                spare = Vec::with_capacity(BATCH_BYTES * 2);
            }
            spare.clear();
            if closing {
                return;
            }
        }
    }
}

/// Writes out what is waiting and stops the writer thread when dropped: keep it until exit.
pub struct Flusher {
    sink: &'static Sink,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.sink.lock().closing = true;
        self.sink.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the process's log writer on `out`. `access` is how access lines are formatted, `None`
/// to leave them to `tracing`. `None` when one is already running.
pub fn install(out: Box<dyn Write + Send>, access: Option<Format>) -> Option<(Writer, Flusher)> {
    let mut fresh = false;
    let sink = SINK.get_or_init(|| {
        fresh = true;
        Sink::new(access)
    });
    if !fresh {
        return None;
    }
    start(sink, out)
}

fn start(sink: &'static Sink, mut out: Box<dyn Write + Send>) -> Option<(Writer, Flusher)> {
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || sink.run(&mut *out))
        .ok()?;
    Some((
        Writer(sink),
        Flusher {
            sink,
            thread: Some(thread),
        },
    ))
}

/// What the fmt layer writes its lines into: the shared batch.
#[derive(Clone, Copy)]
pub struct Writer(&'static Sink);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Writer {
    type Writer = Writer;

    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests;
