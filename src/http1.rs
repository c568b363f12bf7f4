//! The bytes both HTTP/1.1 sides of the gateway write alike: the listener's server
//! (`listener::h1`) and the upstream client (`upstream::h1`).

use http::header::CONTENT_LENGTH;
use http::HeaderName;

/// One field line.
pub fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `Content-Length: n`.
pub fn write_length(out: &mut Vec<u8>, n: u64) {
    write_field(
        out,
        &CONTENT_LENGTH,
        itoa::Buffer::new().format(n).as_bytes(),
    );
}

/// The line that opens one chunk of `len` bytes.
pub fn chunk_line(len: usize, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(out, "{len:x}\r\n");
}

/// The last chunk of a chunked body, without trailers (the gateway drops them both ways).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
