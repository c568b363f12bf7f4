//! Request smuggling guard for HTTP/1 connections. hyper, given a request with both
//! `Content-Length` and `Transfer-Encoding`, drops the length and carries on; a gateway must instead
//! refuse it outright (400, connection closed), because the next hop or a previous one may have
//! framed it differently.
//!
//! The guard sits between the socket and hyper and follows the framing of what the connection
//! reads — each head, then the body its head announces (a length, or chunks up to the last chunk
//! and trailers) — so it sees every request head on the connection, not just the first. A head is
//! held back until it is complete and has been checked. A refused head never reaches hyper: in its
//! place hyper gets a stand-in request, which the proxy answers with the standard 400 (and
//! `Connection: close`) in its turn, after any answers still owed on the connection; everything
//! after it is discarded.
//!
//! The gateway never tunnels, so nothing a client sends can end HTTP/1 framing on a connection:
//! `CONNECT` is refused like a smuggling attempt, and a request carrying `Upgrade` is framed (and
//! forwarded, without the hop-by-hop `Upgrade`) like any other, with the next head checked as
//! usual. The guard stops following a connection only for HTTP/2 (prior knowledge), whose framing
//! hyper owns, and for input hyper refuses and then closes the connection on itself (an
//! unparsable head or length, a `Transfer-Encoding` not ending in `chunked`, a bad chunk size,
//! an oversize head).

const MAX_LINE: usize = 8 * 1024;

#[derive(Debug)]
enum Frame {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkCrlf(u8),
    Trailer,
    /// Not followed any further: h2, or input after which hyper closes the connection itself.
    Through,
    /// After a refused head: nothing more is passed on.
    Discard,
}

/// What hyper reads in place of a refused head. The proxy recognises it by its position on the
/// connection (see `ConnActivity`), not by its content, so a client cannot forge a refusal.
pub const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nhost: refused.invalid\r\n\r\n";

#[derive(Debug)]
pub struct Guard {
    frame: Frame,
    /// Bytes of the head or chunk line being collected.
    line: Vec<u8>,
    max_head: usize,
    max_headers: usize,
    started: bool,
    /// Heads passed on so far (stand-ins included): the index of the next one.
    heads: u64,
}

/// A refused head: its position among the connection's requests, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub index: u64,
    pub why: &'static str,
}

impl Guard {
    pub fn new(max_head: usize, max_headers: usize) -> Self {
        Guard {
            frame: Frame::Head,
            line: Vec::new(),
            max_head,
            max_headers,
            started: false,
            heads: 0,
        }
    }

    /// Feeds bytes read from the connection; appends to `out` what hyper may see. Returns the
    /// reason when a head was refused (its stand-in has been appended in its place).
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Option<Rejected> {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            if bytes.starts_with(b"PRI * HTTP/2.0") {
                self.frame = Frame::Through;
            }
        }
        while !bytes.is_empty() {
            match self.frame {
                Frame::Through => {
                    out.extend_from_slice(bytes);
                    return None;
                }
                Frame::Discard => return None,
                Frame::Body(n) => {
                    let take = n.min(bytes.len() as u64) as usize;
                    out.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.frame = if n == take as u64 {
                        Frame::Head
                    } else {
                        Frame::Body(n - take as u64)
                    };
                }
                Frame::ChunkData(n) => {
                    let take = n.min(bytes.len() as u64) as usize;
                    out.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.frame = if n == take as u64 {
                        Frame::ChunkCrlf(2)
                    } else {
                        Frame::ChunkData(n - take as u64)
                    };
                }
                Frame::ChunkCrlf(left) => {
                    let take = (left as usize).min(bytes.len());
                    out.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.frame = if take == left as usize {
                        Frame::ChunkSize
                    } else {
                        Frame::ChunkCrlf(left - take as u8)
                    };
                }
                Frame::Head => {
                    let used = self.collect_until(bytes, b"\r\n\r\n", self.max_head, out)?;
                    bytes = &bytes[used..];
                    let index = self.heads;
                    let verdict = self.after_head(&self.line);
                    // Cleared, not taken: the buffer keeps its capacity for the next head.
                    let head = std::mem::take(&mut self.line);
                    match verdict {
                        Ok(frame) => {
                            out.extend_from_slice(&head);
                            if !is_blank(&head) {
                                self.heads += 1;
                            }
                            self.frame = frame;
                            self.line = head;
                            self.line.clear();
                        }
                        Err(why) => {
                            out.extend_from_slice(STAND_IN);
                            self.frame = Frame::Discard;
                            return Some(Rejected { index, why });
                        }
                    }
                }
                Frame::ChunkSize | Frame::Trailer => {
                    let used = self.collect_until(bytes, b"\r\n", MAX_LINE, out)?;
                    bytes = &bytes[used..];
                    out.extend_from_slice(&self.line);
                    self.frame = match (&self.frame, chunk_size(&self.line)) {
                        (Frame::Trailer, _) if self.line == b"\r\n" => Frame::Head,
                        (Frame::Trailer, _) => Frame::Trailer,
                        (_, Some(0)) => Frame::Trailer,
                        (_, Some(n)) => Frame::ChunkData(n),
                        (_, None) => Frame::Through,
                    };
                    self.line.clear();
                }
            }
        }
        None
    }

    /// A request the listener's own server read and judged in the guard's place (`listener::h1`
    /// checks what the guard would refuse and hands such a head over unread). It counts among
    /// the heads, so the guard numbers the ones it sees later as the handler does.
    pub fn skip_request(&mut self) {
        debug_assert!(self.at_head());
        self.started = true;
        self.heads += 1;
    }

    /// Between requests, with nothing held back: where bytes may be read past the guard, and
    /// given to it again from the next head on.
    pub fn at_head(&self) -> bool {
        matches!(self.frame, Frame::Head) && self.line.is_empty()
    }

    /// Gives back the capacity the held-back bytes left, keeping any still held.
    pub fn shrink(&mut self) {
        self.line.shrink_to_fit();
    }

    /// Bytes held back when the connection ends mid-head: hyper gets them and reports the
    /// incomplete request itself.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if !matches!(self.frame, Frame::Discard) {
            out.append(&mut self.line);
        }
    }

    /// Appends to `line` until it ends with `end`; returns how many input bytes were used, or
    /// `None` when more input is needed. Over `limit`, guarding stops (hyper answers 431/400).
    fn collect_until(
        &mut self,
        bytes: &[u8],
        end: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        // Search from just before the held-back tail, so a terminator split across reads is
        // found; bytes after the terminator are handed back (not consumed).
        let held = self.line.len();
        self.line.extend_from_slice(bytes);
        let from = held.saturating_sub(end.len() - 1);
        match find_line_end(&self.line[from..], end) {
            Some(p) if from + p + end.len() <= limit => {
                let stop = from + p + end.len();
                self.line.truncate(stop);
                Some(stop - held)
            }
            found => {
                if found.is_some() || self.line.len() > limit {
                    // Too long to be ours to judge: hand it over and let hyper answer 431 or 400.
                    out.append(&mut self.line);
                    self.frame = Frame::Through;
                }
                None
            }
        }
    }

    /// Passing everything on unchanged from here: the caller may skip the guard.
    pub fn is_through(&self) -> bool {
        matches!(self.frame, Frame::Through)
    }

    fn after_head(&self, head: &[u8]) -> Result<Frame, &'static str> {
        // Empty lines before a request line are allowed (RFC 9112 §2.2).
        let start = head.iter().position(|b| *b != b'\r' && *b != b'\n');
        let Some(start) = start else {
            return Ok(Frame::Head);
        };
        let mut on_stack = [httparse::EMPTY_HEADER; 48];
        let mut on_heap;
        let mut req = httparse::Request::new(&mut on_stack);
        let mut parsed = req.parse(&head[start..]);
        if matches!(parsed, Err(httparse::Error::TooManyHeaders)) {
            on_heap = vec![httparse::EMPTY_HEADER; self.max_headers];
            req = httparse::Request::new(&mut on_heap);
            parsed = req.parse(&head[start..]);
        }
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            return Ok(Frame::Through);
        }
        let mut content_length: Option<&[u8]> = None;
        let mut transfer_encoding: Option<&[u8]> = None;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                // Even identical repeats: a hop that keeps the first and one that keeps the
                // last must never be able to disagree.
                if content_length.is_some() || h.value.contains(&b',') {
                    return Err("more than one Content-Length");
                }
                content_length = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = Some(h.value);
            }
        }
        if content_length.is_some() && transfer_encoding.is_some() {
            return Err("Content-Length together with Transfer-Encoding");
        }
        // A tunnel would take the rest of the connection out of the guard's sight. `Upgrade` needs
        // no such care: it is stripped before forwarding, and should a 101 ever go out, hyper
        // closes the connection rather than hand it over; so the request's own length or chunks
        // lead to the next head, which is checked like the first.
        if req.method == Some("CONNECT") {
            return Err("CONNECT is not supported");
        }
        if let Some(te) = transfer_encoding {
            let last = te.rsplit(|b| *b == b',').next().unwrap_or_default();
            return Ok(if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Frame::ChunkSize
            } else {
                Frame::Through
            });
        }
        match content_length {
            None => Ok(Frame::Head),
            Some(v) => match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => Ok(Frame::Head),
                Some(n) => Ok(Frame::Body(n)),
                None => Ok(Frame::Through),
            },
        }
    }
}

fn is_blank(head: &[u8]) -> bool {
    head.iter().all(|b| *b == b'\r' || *b == b'\n')
}

/// The size of a chunk line like `1a;ext=1\r\n`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let hex = line.split(|b| *b == b';').next()?.trim_ascii();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// Where `end` (`\r\n\r\n` or `\r\n`, ending in `\n`) first starts in `hay`. Only a `\n` can
/// end it, and a head has a handful: checking behind each is cheaper than a substring search,
/// whose set-up alone costs more than a short head.
fn find_line_end(hay: &[u8], end: &[u8]) -> Option<usize> {
    debug_assert_eq!(end.last(), Some(&b'\n'));
    let behind = end.len() - 1;
    memchr::memchr_iter(b'\n', hay)
        .find(|&i| i >= behind && &hay[i - behind..=i] == end)
        .map(|i| i - behind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_are_found_where_a_plain_search_finds_them() {
        // Every input of up to eight bytes from `\r`, `\n` and `a`, against comparing every
        // window.
        let plain = |hay: &[u8], end: &[u8]| hay.windows(end.len()).position(|w| w == end);
        for hay in crate::exhaustive::every_string(b"\r\na", 8) {
            for end in [&b"\r\n\r\n"[..], b"\r\n"] {
                assert_eq!(
                    find_line_end(&hay, end),
                    plain(&hay, end),
                    "{hay:?} {end:?}"
                );
            }
        }
    }

    /// Feeds `input` whole, byte by byte and split in three at every pair of points: the verdict and the bytes
    /// passed on must not depend on read boundaries.
    fn verdict(input: &[u8]) -> (Option<Rejected>, Vec<u8>) {
        let run = |pieces: &[&[u8]]| {
            let mut g = Guard::new(64 * 1024, 100);
            let mut out = Vec::new();
            let mut verdict = None;
            for p in pieces {
                verdict = verdict.or(g.feed(p, &mut out));
            }
            g.flush(&mut out);
            (verdict, out)
        };
        let whole = run(&[input]);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(whole, run(&bytes), "byte-by-byte feeding disagrees");
        for split in 1..input.len() {
            assert_eq!(
                whole,
                run(&[&input[..split], &input[split..]]),
                "split at {split}"
            );
        }
        whole
    }

    #[test]
    fn rejects_length_with_transfer_encoding_in_either_order() {
        let (v, out) = verdict(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\nabcd");
        assert!(v.is_some());
        assert_eq!(
            out, STAND_IN,
            "the refused head and what follows never reach hyper"
        );
        let (v, _) =
            verdict(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n");
        assert!(v.is_some());
    }

    #[test]
    fn rejects_repeated_content_length_even_when_equal() {
        let (v, _) =
            verdict(b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc");
        assert!(v.is_some());
        let (v, _) = verdict(b"POST / HTTP/1.1\r\ncontent-length: 3, 3\r\n\r\nabc");
        assert!(v.is_some());
    }

    #[test]
    fn follows_bodies_to_find_the_next_head() {
        // A length body containing something that looks like a head must not be judged.
        let body = b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut req =
            format!("POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(
            verdict(&req),
            (None, req.clone()),
            "passed through unchanged"
        );

        // Chunked with extensions and trailers, then a smuggling head: caught.
        let mut req = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n".to_vec();
        assert_eq!(verdict(&req), (None, req.clone()));
        let valid = req.clone();
        req.extend_from_slice(
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc",
        );
        let (v, out) = verdict(&req);
        assert_eq!(
            v.map(|r| r.index),
            Some(1),
            "the second request on the connection"
        );
        assert_eq!(
            out,
            [valid.as_slice(), STAND_IN].concat(),
            "the valid request still goes through"
        );
    }

    #[test]
    fn leaves_what_it_cannot_follow_to_hyper() {
        let input: &[u8] =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ncontent-length: 1\r\ntransfer-encoding: x\r\n\r\n";
        assert_eq!(verdict(input), (None, input.to_vec()));
        let input: &[u8] = b"GARBAGE\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(verdict(input), (None, input.to_vec()));
        let input: &[u8] = b"\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(verdict(input), (None, input.to_vec()));
    }

    #[test]
    fn upgrade_requests_are_framed_like_any_other_and_the_next_head_is_judged() {
        let smuggle: &[u8] =
            b"POST /x HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc";
        let websocket: &[u8] = b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\r\n";
        let (v, out) = verdict(&[websocket, smuggle].concat());
        assert_eq!(v.map(|r| r.index), Some(1), "the request after the upgrade");
        assert_eq!(out, [websocket, STAND_IN].concat());

        // With a body: its length, not the upgrade, says where the next head starts.
        let h2c: &[u8] = b"POST / HTTP/1.1\r\nconnection: upgrade, http2-settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\ncontent-length: 5\r\n\r\nhello";
        let (v, out) = verdict(&[h2c, smuggle].concat());
        assert_eq!(v.map(|r| r.index), Some(1));
        assert_eq!(out, [h2c, STAND_IN].concat());

        // Valid requests after it pass unchanged.
        let next: &[u8] = b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n";
        let input = [websocket, h2c, next].concat();
        assert_eq!(verdict(&input), (None, input.clone()));
    }

    #[test]
    fn connect_is_refused_wherever_it_comes() {
        let connect: &[u8] = b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n";
        let (v, out) = verdict(connect);
        assert_eq!(
            v,
            Some(Rejected {
                index: 0,
                why: "CONNECT is not supported"
            })
        );
        assert_eq!(out, STAND_IN);

        // After a valid request, and with the tunnel's bytes already sent behind it.
        let first: &[u8] = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        let tunnel: &[u8] =
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let (v, out) = verdict(&[first, connect, tunnel].concat());
        assert_eq!(v.map(|r| r.index), Some(1));
        assert_eq!(out, [first, STAND_IN].concat());
    }

    #[test]
    fn heads_with_many_headers_are_still_judged() {
        let mut req = b"POST / HTTP/1.1\r\n".to_vec();
        for i in 0..80 {
            req.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"content-length: 1\r\ntransfer-encoding: chunked\r\n\r\n");
        let mut g = Guard::new(64 * 1024, 100);
        assert!(g.feed(&req, &mut Vec::new()).is_some());
    }

    #[test]
    fn oversize_heads_are_passed_on_for_hyper_to_refuse() {
        let mut g = Guard::new(100, 100);
        let head = [
            b"GET / HTTP/1.1\r\nx: ".as_slice(),
            &[b'a'; 200],
            b"\r\n\r\n",
        ]
        .concat();
        let mut out = Vec::new();
        assert!(g.feed(&head, &mut out).is_none());
        assert_eq!(out, head);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0;ext\r\n"), Some(0));
        assert_eq!(chunk_size(b"zz\r\n"), None);
        assert_eq!(chunk_size(b"\r\n"), None);
        assert_eq!(chunk_size(b"11111111111111111\r\n"), None);
    }
}
