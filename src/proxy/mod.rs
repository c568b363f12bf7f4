//! The request's journey through the gateway, one stage per module, over one owned
//! [`context::RequestContext`]:
//!
//! 1. [`request`]: the target normalised and routed, the caller authenticated, the body read
//!    (small) or readied to stream (large);
//! 2. admission (the upstream's endpoints' health, [`crate::admission`]): a slot, a place in the
//!    queue, or a refusal;
//! 3. [`request::rewrite`]: headers and target for the upstream;
//! 4. [`send`]: one attempt at a time, the resend policy ([`crate::retry`]) after each failure;
//! 5. [`relay`]: the answer read whole (small) or streamed, inside the context.
//!
//! [`Proxy`] is the tower service the listener hands each request to, with its connection's
//! details; it never fails: every error becomes an answer in
//! [`context::RequestContext::answer`].

pub mod context;
mod relay;
mod replay;
mod request;
mod send;
mod table;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::body::{ClientBody, ResponseBody};
use crate::error::ProxyError;
use crate::listener::ConnInfo;
use context::RequestContext;
pub use table::{RouteState, Shared, Table};

#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(shared: Arc<Shared>) -> Self {
        Proxy { shared }
    }
}

impl tower::Service<(Request<ClientBody>, ConnInfo)> for Proxy {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (req, conn): (Request<ClientBody>, ConnInfo)) -> Self::Future {
        // Boxed as it is: each layer of future around it would be one more copy of it, whole.
        Box::pin(handle(self.shared.clone(), req, conn))
    }
}

/// One request, start to end: a context is opened, the journey runs over it, and whatever the
/// journey ends in — the upstream's answer or an error — is answered with the context inside the
/// answer's body. The context accounts for the request when it is dropped (see [`context`]).
///
/// This and the stages below that take the request by value are `fn`s returning an `async move`
/// block rather than `async fn`s: an `async fn` keeps each argument twice in its future (as
/// passed, and as moved into its body) and copies it from one to the other when first polled.
#[allow(clippy::manual_async_fn)] // see above
fn handle(
    shared: Arc<Shared>,
    req: Request<ClientBody>,
    conn: ConnInfo,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send {
    async move {
        // Boxed from the start: it ends up in the answer's body (`respond`), and the request's
        // future would otherwise carry it inline and copy it whole at every move.
        let mut ctx = Box::new(RequestContext::new(&req, conn));
        let resp = match journey(&shared, &mut ctx, req).await {
            Ok(resp) => resp,
            Err(e) => ctx.answer(e),
        };
        Ok(ctx.respond(resp, shared.draining.load(Ordering::Relaxed)))
    }
}

/// The request's journey through the gateway, in order.
#[allow(clippy::manual_async_fn)] // an async block, not `async fn`: see `proxy::handle`
fn journey<'a>(
    shared: &'a Shared,
    ctx: &'a mut RequestContext,
    mut req: Request<ClientBody>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + 'a {
    async move {
        if let Some(why) = ctx.refused_by_guard() {
            return Err(ProxyError::BadRequest(why));
        }
        request::normalize_target(&mut req, ctx)?;
        let table = shared.table.load_full();
        let route = request::route_for(&table, &req)?;
        ctx.set_route(route.clone());
        // Before the body is read or admission is asked: a refused caller costs no slot.
        if let Some(auth) = &route.auth {
            crate::auth::authenticate(auth, req.headers_mut(), ctx.conn.peer)?;
        }
        let received = request::read_body(ctx, &route, req).await?;
        route.upstream.check()?;
        ctx.admit(&route).await?;
        let (outgoing, forwarding, replay) =
            request::rewrite(ctx, &route, received.parts, received.body)?;
        let resp = send::send(ctx, &route, outgoing, forwarding, replay, &received.check).await?;
        relay::prepare(ctx, resp).await
    }
}
