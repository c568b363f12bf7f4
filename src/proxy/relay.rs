//! The answer side of the journey: the upstream's response head rewritten for the caller, and its
//! body either read whole first (small, known length) or streamed. Either way the body is then
//! relayed inside the request's context ([`super::context::RequestContext::respond`]).

use http::Response;
use http_body_util::BodyExt;

use super::context::RequestContext;
use crate::body::{full, ResponseBody};
use crate::error::ProxyError;
use crate::forward;
use crate::upstream::{AnswerBody, Framing};

/// Upstream answers of known length up to this size are read whole before the answer starts.
const BUFFER_LIMIT: u64 = 64 * 1024;

#[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
pub fn prepare(
    ctx: &mut RequestContext,
    resp: Response<Framing>,
) -> impl std::future::Future<Output = Result<Response<ResponseBody>, ProxyError>> + '_ {
    async move {
        let (mut parts, framing) = resp.into_parts();
        forward::response_headers(&mut parts.headers, ctx.request_id());
        // hyper answers each client in the client's own version.
        parts.version = http::Version::default();
        let deadline = ctx.deadline();
        let small = framing.exact().filter(|n| *n <= BUFFER_LIMIT);
        let (Some(len), Some(lease)) = (small, ctx.lease_mut()) else {
            // Streamed: the connection stays with the body until its last byte, the slot with
            // the context.
            let Some(lease) = ctx.take_lease() else {
                return Err(ProxyError::Upstream("answer without its connection".into()));
            };
            let body = AnswerBody::new(lease, framing);
            return Ok(Response::from_parts(
                parts,
                body.map_err(Into::into).boxed_unsync(),
            ));
        };
        // A small answer of known length is read whole first: the client then gets it in one
        // write, and the upstream connection and slot are free before the client has read it.
        // It has usually arrived with its head, so it is taken without a timer; only the rest
        // of one still on its way is read under the deadline.
        let len = len as usize;
        let done = match lease.take_whole(len) {
            Some(body) => Ok(Ok(body)),
            None => tokio::time::timeout_at(deadline, lease.read_whole(len)).await,
        };
        match done {
            Ok(Ok(body)) => {
                ctx.upstream_read(true);
                Ok(Response::from_parts(parts, full(body)))
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
