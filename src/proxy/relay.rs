//! The answer side of the journey: the upstream's response head rewritten for the caller, and its
//! body either read whole first (small, known length) or streamed. Either way the body is then
//! relayed inside the request's context ([`super::context::RequestContext::respond`]).

use futures_util::FutureExt;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::context::RequestContext;
use crate::body::{full, ResponseBody, Whole};
use crate::error::ProxyError;
use crate::forward;

/// Upstream answers of known length up to this size are read whole before the answer starts.
const BUFFER_LIMIT: u64 = 64 * 1024;

#[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
pub fn prepare(
    ctx: &mut RequestContext,
    resp: Response<Incoming>,
) -> impl std::future::Future<Output = Result<Response<ResponseBody>, ProxyError>> + '_ {
    async move {
        let (mut parts, body) = resp.into_parts();
        forward::response_headers(&mut parts.headers, ctx.request_id());
        // hyper answers each client in the client's own version.
        parts.version = http::Version::default();
        if body.size_hint().exact().is_none_or(|n| n > BUFFER_LIMIT) {
            // Streamed: the connection and the slot stay with the context until the last byte.
            return Ok(Response::from_parts(
                parts,
                body.map_err(Into::into).boxed_unsync(),
            ));
        }
        // A small answer of known length is read whole first: the client then gets it in one write,
        // and the upstream connection and slot are free before the client has read it. It has
        // usually arrived with its head, so it is first taken as far as it is there, without a
        // timer; only the rest of one still on its way is read under the deadline.
        let mut body = body;
        let mut read = Whole::default();
        let done = match read.more(&mut body).now_or_never() {
            Some(done) => Ok(done),
            None => tokio::time::timeout_at(ctx.deadline(), read.more(&mut body)).await,
        };
        match done {
            Ok(Ok(())) => {
                ctx.upstream_read(true);
                Ok(Response::from_parts(parts, full(read.into_bytes())))
            }
            Ok(Err(e)) => {
                ctx.upstream_read(false);
                Err(ProxyError::Upstream(e.to_string()))
            }
            Err(_elapsed) => {
                ctx.upstream_read(false);
                Err(ProxyError::BudgetExhausted)
            }
        }
    }
}
