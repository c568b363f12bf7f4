//! The request side of the journey: its target normalised and routed, its body read (or readied
//! to stream), and the request rewritten for the upstream.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Uri};
use http_body::Body;
use http_body_util::BodyExt;

use super::context::RequestContext;
use super::replay::Replay;
use super::{RouteState, Table};
use crate::body::{BodyCheck, ClientBody, LimitedBody, RequestBody, Whole};
use crate::error::ProxyError;
use crate::forward::{self, ForwardInfo, Forwarding};

/// Request bodies up to this size are read whole before the request is sent, so the request can
/// be sent again (see `crate::retry`). Data action payloads are far smaller.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Replaces the request's path with its normalised form, which is then both routed and
/// forwarded.
pub fn normalize_target(
    req: &mut Request<ClientBody>,
    ctx: &mut RequestContext,
) -> Result<(), ProxyError> {
    if req.uri().path_and_query().is_none() || !req.uri().path().starts_with('/') {
        return Err(ProxyError::BadRequest("request target must be a path"));
    }
    let normalized = match crate::routing::normalize_path(req.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(why) => return Err(ProxyError::BadRequest(why)),
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| ProxyError::BadRequest("request target cannot be normalised"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| ProxyError::BadRequest("request target cannot be normalised"))?;
    ctx.record.path = req.uri().path().to_string();
    Ok(())
}

pub fn route_for(table: &Table, req: &Request<ClientBody>) -> Result<Arc<RouteState>, ProxyError> {
    // Looked up only when a route is bound to a host: most configurations bind none.
    let host = if table.router.names_hosts() {
        req.uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
    } else {
        None
    };
    table
        .router
        .route(req.method(), host, req.uri().path())
        .map(|i| table.routes[i].clone())
        .ok_or(ProxyError::NoRoute)
}

/// The request's body as it will be sent.
pub enum OutBody {
    /// Read whole: the request can be built again from it.
    Buffered(Bytes),
    /// Streams from the caller as it is sent; it can be sent only once.
    Streaming(RequestBody),
}

/// A request ready to be rewritten and sent, with what tells why its body stream failed.
pub struct Received {
    pub parts: Parts,
    pub body: OutBody,
    pub check: Arc<BodyCheck>,
}

/// Enforces the route's body limit and reads a small body whole, before admission, so a slow
/// client does not hold an upstream slot while it sends.
#[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
pub fn read_body<'a>(
    ctx: &'a mut RequestContext,
    route: &'a RouteState,
    req: Request<ClientBody>,
) -> impl std::future::Future<Output = Result<Received, ProxyError>> + 'a {
    async move {
        let (parts, body) = req.into_parts();
        if body.is_end_stream() {
            // No body (a GET, or a declared length of 0): nothing to limit, time or read.
            return Ok(Received {
                parts,
                body: OutBody::Buffered(Bytes::new()),
                check: Arc::default(),
            });
        }
        let limit = route.config.max_request_body;
        let declared = content_length(&parts.headers);
        if declared.is_some_and(|len| len > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let idle = route.body_read_timeout;
        let small = declared.is_some_and(|n| n <= REPLAY_LIMIT);
        let (body, check) = if small {
            // Read whole under one timer, the idle timeout's or the budget's, whichever ends first.
            let (body, check) = LimitedBody::until(body, limit, idle, Some(ctx.deadline()));
            // Boxed: a body with its timer is large, and every request's future is copied whole
            // where it is awaited.
            let mut body = Box::pin(body);
            let mut whole = Whole::default();
            match whole.more(&mut body).await {
                Err(_) => {
                    return Err(check
                        .failure(limit, idle)
                        .unwrap_or(ProxyError::BadRequest("request body ended early")))
                }
                Ok(()) => (OutBody::Buffered(whole.into_bytes()), check),
            }
        } else {
            let (body, check) = LimitedBody::new(body, limit, idle);
            (OutBody::Streaming(body.boxed_unsync()), check)
        };
        ctx.record.bytes_in = match &body {
            OutBody::Buffered(b) => b.len() as u64,
            OutBody::Streaming(_) => declared.unwrap_or(0),
        };
        Ok(Received { parts, body, check })
    }
}

/// The request rewritten for the upstream, the fields the gateway sets on it, and its replay
/// when the body was read whole and the request is repeatable.
pub type Rewritten = (Request<RequestBody>, Forwarding, Option<Replay>);

/// Rewrites the request for the upstream: hop-by-hop headers out, the forwarding fields worked
/// out, its target under the upstream's base path, HTTP/1.1.
pub fn rewrite(
    ctx: &RequestContext,
    route: &RouteState,
    mut parts: Parts,
    body: OutBody,
) -> Result<Rewritten, ProxyError> {
    // A clone of the header's value shares its bytes: no copy.
    let original_host: Option<HeaderValue> = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(HOST).cloned(),
    }
    .filter(|h| h.to_str().is_ok());
    let up = &route.upstream.config;
    // With several listed endpoints and the host not preserved, each is sent its own when the
    // upstream picks it.
    let upstream_host = match &original_host {
        Some(h) if up.preserve_host => Some(h),
        _ => route.upstream.host_header.as_ref(),
    };
    let forwarding = forward::request_headers(
        &mut parts.headers,
        &ForwardInfo {
            peer: ctx.conn.peer,
            proto: ctx.conn.proto,
            original_host: original_host.as_ref(),
            request_id: ctx.request_id(),
            upstream_host,
        },
    );
    parts.uri = upstream_uri(&up.base_path, &parts.uri)?;
    parts.version = http::Version::HTTP_11;
    Ok(match body {
        OutBody::Buffered(bytes) => {
            // Built again only when it may be sent again after it went out: a request the
            // upstream never got is handed back whole, and any other resend is for a repeatable
            // one (see `crate::retry`). A data action's POST is copied for nothing otherwise.
            let repeatable = route.config.idempotent || crate::retry::is_idempotent(&parts.method);
            let replay =
                repeatable.then(|| Replay::new(&parts.method, &parts.uri, &parts.headers, &bytes));
            let req = Request::from_parts(parts, crate::body::full(bytes));
            (req, forwarding, replay)
        }
        OutBody::Streaming(stream) => (Request::from_parts(parts, stream), forwarding, None),
    })
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The upstream sees origin-form: its base path, then the caller's path and query.
fn upstream_uri(base_path: &str, uri: &Uri) -> Result<Uri, ProxyError> {
    if base_path.is_empty() {
        // The caller's own path and query, shared rather than parsed again.
        let pq = uri.path_and_query().cloned();
        return Ok(Uri::from(
            pq.unwrap_or_else(|| PathAndQuery::from_static("/")),
        ));
    }
    let pq = uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/");
    format!("{base_path}{pq}")
        .parse()
        .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_joins_base_path() {
        let u: Uri = "/v1/x?a=1".parse().unwrap();
        assert_eq!(upstream_uri("", &u).unwrap(), "/v1/x?a=1");
        assert_eq!(upstream_uri("/api", &u).unwrap(), "/api/v1/x?a=1");
        let abs: Uri = "http://gw.example.com/p".parse().unwrap();
        assert_eq!(upstream_uri("", &abs).unwrap(), "/p");
    }
}
