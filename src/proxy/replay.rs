//! A request kept so that it can be sent again (see `crate::retry`): every repeatable request
//! whose body was read whole keeps one, and nearly all of them are dropped unused.
//!
//! So the headers are kept packed into one buffer. Packing them costs one allocation and a
//! copy of their bytes. A `HeaderMap` clone allocates twice and counts a reference for every
//! name and value, and dropping it costs as much again: ~1k instructions per request, against a
//! few hundred here. The map is built again only for a resend.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};

use crate::body::RequestBody;

/// Everything needed to build the request again.
pub struct Replay {
    method: Method,
    uri: Uri,
    headers: PackedHeaders,
    body: Bytes,
}

impl Replay {
    pub fn new(method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Self {
        Replay {
            method: method.clone(),
            uri: uri.clone(),
            headers: PackedHeaders::pack(headers),
            body: body.clone(),
        }
    }

    pub fn build(&self) -> Request<RequestBody> {
        let mut req = Request::new(crate::body::full(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.unpack();
        req
    }
}

/// Each line as: flags (1 byte: sensitive), name length (2 bytes), value length (4 bytes), the
/// name, the value; in the map's own order, so the map unpacks with the same order and
/// repetitions.
struct PackedHeaders {
    buf: Bytes,
    lines: usize,
}

const SENSITIVE: u8 = 1;
const LINE_PREFIX: usize = 1 + 2 + 4;

impl PackedHeaders {
    fn pack(headers: &HeaderMap) -> Self {
        // Room for the usual few short lines, so the buffer is allocated once.
        let mut buf = Vec::with_capacity(headers.len() * 64);
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            let mut prefix = [0u8; LINE_PREFIX];
            prefix[0] = if value.is_sensitive() { SENSITIVE } else { 0 };
            // A name is at most 64 KiB (`http` refuses longer) and a value fits hyper's buffer.
            prefix[1..3].copy_from_slice(&(name.len() as u16).to_le_bytes());
            prefix[3..].copy_from_slice(&(value.len() as u32).to_le_bytes());
            buf.extend_from_slice(&prefix);
            buf.extend_from_slice(name);
            buf.extend_from_slice(value.as_bytes());
        }
        PackedHeaders {
            buf: Bytes::from(buf),
            lines: headers.len(),
        }
    }

    fn unpack(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.lines);
        let buf = &self.buf;
        let mut at = 0;
        while at + LINE_PREFIX <= buf.len() {
            let flags = buf[at];
            let name_len = usize::from(u16::from_le_bytes([buf[at + 1], buf[at + 2]]));
            let value_len =
                u32::from_le_bytes([buf[at + 3], buf[at + 4], buf[at + 5], buf[at + 6]]) as usize;
            let name_at = at + LINE_PREFIX;
            let value_at = name_at + name_len;
            at = value_at + value_len;
            if at > buf.len() {
                break;
            }
            // Both were a valid name and value when packed; checked again all the same, and a
            // line that fails is left out rather than trusted.
            let (Ok(name), Ok(mut value)) = (
                HeaderName::from_bytes(&buf[name_at..value_at]),
                HeaderValue::from_maybe_shared(buf.slice(value_at..at)),
            ) else {
                continue;
            };
            value.set_sensitive(flags & SENSITIVE != 0);
            map.append(name, value);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn lines(map: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
        map.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec(), v.is_sensitive()))
            .collect()
    }

    #[test]
    fn headers_unpack_as_they_were_packed() {
        let mut map = HeaderMap::new();
        map.append(header::HOST, HeaderValue::from_static("api.example.com"));
        map.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        map.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        // Repeated names keep their order, also with another name between them.
        map.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        map.append(header::COOKIE, HeaderValue::from_static("a=1"));
        map.append(header::COOKIE, HeaderValue::from_static("b=2"));
        map.append("x-empty", HeaderValue::from_static(""));
        // obs-text: not UTF-8, still a valid value.
        map.append("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let mut secret = HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        map.append(header::AUTHORIZATION, secret);
        let long = "v".repeat(70 * 1024);
        map.append("x-long", HeaderValue::from_str(&long).unwrap());

        let unpacked = PackedHeaders::pack(&map).unpack();
        assert_eq!(lines(&unpacked), lines(&map));
        assert_eq!(unpacked, map);
        assert!(unpacked[header::AUTHORIZATION].is_sensitive());
        assert!(!unpacked[header::HOST].is_sensitive());
        // Unpacked again: the packing is not used up.
        let packed = PackedHeaders::pack(&map);
        assert_eq!(packed.unpack(), packed.unpack());
    }

    #[test]
    fn an_empty_map_packs_to_nothing() {
        let packed = PackedHeaders::pack(&HeaderMap::new());
        assert!(packed.buf.is_empty());
        assert!(packed.unpack().is_empty());
    }

    #[test]
    fn a_replay_builds_the_same_request_each_time() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let uri: Uri = "/api/v1/items?id=7".parse().unwrap();
        let body = Bytes::from_static(b"payload");
        let replay = Replay::new(&Method::PUT, &uri, &headers, &body);
        for _ in 0..2 {
            let req = replay.build();
            assert_eq!(req.method(), Method::PUT);
            assert_eq!(req.uri(), &uri);
            assert_eq!(req.headers(), &headers);
            assert_eq!(req.version(), http::Version::HTTP_11);
        }
    }
}
