//! The one place where the gateway builds an answer of its own. Every refusal and error has the
//! same shape: status, `x-breakwater-reason`, `Retry-After` on refusals, `x-request-id`, and a
//! JSON body naming the reason, the route and the request.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::{full, ResponseBody};
use crate::config::RouteConfig;
use crate::error::{ProxyError, Reason};
use crate::forward::{RequestId, X_REQUEST_ID};

pub const REASON_HEADER: &str = "x-breakwater-reason";
// Named once: a header named by a `&str` is parsed on every insert, and refusals come in bursts.
const REASON: HeaderName = HeaderName::from_static(REASON_HEADER);

/// What the answer needs to know about the request it answers.
pub struct AnswerContext<'a> {
    pub route: Option<&'a RouteConfig>,
    pub request_id: &'a RequestId,
}

/// Builds the gateway's own answer for `err`.
pub fn error_response(err: &ProxyError, cx: &AnswerContext<'_>) -> Response<ResponseBody> {
    let reason = err.reason();
    let route_name = cx.route.map(|r| r.name.as_str()).unwrap_or("none");
    let retry_after = match err {
        ProxyError::Refused { retry_after, .. } => Some(*retry_after),
        _ if reason.is_refusal() => Some(Duration::from_secs(1)),
        _ => None,
    }
    .map(|d| retry_after_secs(d, cx.route.map(|r| r.retry_after_max)));

    if reason.is_refusal() {
        if let Some(fb) = cx.route.and_then(|r| r.fallback.as_ref()) {
            let mut resp = Response::new(full(Bytes::from(fb.body.clone())));
            *resp.status_mut() = fb.status;
            if let Ok(ct) = HeaderValue::from_str(&fb.content_type) {
                resp.headers_mut().insert(CONTENT_TYPE, ct);
            }
            stamp(&mut resp, reason, cx.request_id, retry_after);
            return resp;
        }
    }

    let status = status_for(err, cx.route);
    let custom = cx
        .route
        .filter(|_| reason.is_refusal())
        .and_then(|r| r.overload.body.clone());
    let body = custom.unwrap_or_else(|| {
        standard_body(
            reason,
            route_name,
            cx.request_id.as_str(),
            &err.public_message(),
            retry_after,
        )
    });
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    stamp(&mut resp, reason, cx.request_id, retry_after);
    if let ProxyError::Unauthorized { challenge: true } = err {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(crate::auth::BASIC_CHALLENGE),
        );
    }
    resp
}

/// The JSON body every gateway answer carries unless a route configures its own.
fn standard_body(
    reason: Reason,
    route: &str,
    request_id: &str,
    message: &str,
    retry_after: Option<u64>,
) -> String {
    let mut v = serde_json::json!({
        "error": reason.as_str(),
        "route": route,
        "request_id": request_id,
        "message": message,
    });
    if let Some(s) = retry_after {
        v["retry_after_s"] = serde_json::json!(s);
    }
    v.to_string()
}

fn status_for(err: &ProxyError, route: Option<&RouteConfig>) -> StatusCode {
    match err {
        ProxyError::NoRoute => StatusCode::NOT_FOUND,
        ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
        ProxyError::Forbidden => StatusCode::FORBIDDEN,
        ProxyError::BudgetExhausted => route
            .map(|r| r.timeout_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        ProxyError::Refused { .. } | ProxyError::UpstreamUnavailable(_) => route
            .map(|r| r.overload.status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
    }
}

fn stamp(
    resp: &mut Response<ResponseBody>,
    reason: Reason,
    request_id: &RequestId,
    retry_after: Option<u64>,
) {
    let h = resp.headers_mut();
    h.insert(REASON, HeaderValue::from_static(reason.as_str()));
    h.insert(X_REQUEST_ID, request_id.header());
    if let Some(s) = retry_after {
        h.insert(RETRY_AFTER, HeaderValue::from(s));
    }
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
}

/// `Retry-After` is integer seconds: rounded up, at least 1, at most the route's cap.
pub fn retry_after_secs(d: Duration, cap: Option<Duration>) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let cap = cap.map(|c| c.as_secs().max(1)).unwrap_or(30);
    secs.clamp(1, cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_at_least_one_and_capped() {
        assert_eq!(retry_after_secs(Duration::ZERO, None), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1200), None), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3), None), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(300), None), 30);
        assert_eq!(
            retry_after_secs(Duration::from_secs(300), Some(Duration::from_secs(10))),
            10
        );
    }

    #[test]
    fn every_refusal_has_the_same_shape() {
        for reason in Reason::ALL.into_iter().filter(|r| r.is_refusal()) {
            let err = ProxyError::Refused {
                reason,
                retry_after: Duration::from_millis(1500),
            };
            let resp = error_response(
                &err,
                &AnswerContext {
                    route: None,
                    request_id: &RequestId::from_static("abc"),
                },
            );
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[REASON_HEADER], reason.as_str());
            assert_eq!(resp.headers()[RETRY_AFTER], "2");
            assert_eq!(resp.headers()[X_REQUEST_ID], "abc");
            assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        }
    }

    #[test]
    fn auth_failures_are_401_or_403_without_retry_after() {
        let cx = AnswerContext {
            route: None,
            request_id: &RequestId::from_static("r"),
        };
        let resp = error_response(&ProxyError::Unauthorized { challenge: true }, &cx);
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[REASON_HEADER], "unauthorized");
        assert_eq!(
            resp.headers()[http::header::WWW_AUTHENTICATE],
            "Basic realm=\"breakwater\""
        );
        assert!(resp.headers().get(RETRY_AFTER).is_none());
        let resp = error_response(&ProxyError::Unauthorized { challenge: false }, &cx);
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().get(http::header::WWW_AUTHENTICATE).is_none());
        let resp = error_response(&ProxyError::Forbidden, &cx);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[REASON_HEADER], "forbidden");
        assert!(resp.headers().get(RETRY_AFTER).is_none());
        assert!(!Reason::Unauthorized.is_refusal() && !Reason::Forbidden.is_refusal());
    }

    #[test]
    fn upstream_failures_do_not_tell_the_caller_internal_addresses() {
        let cx = AnswerContext {
            route: None,
            request_id: &RequestId::from_static("r"),
        };
        for err in [
            ProxyError::Upstream("connection to 10.0.1.7:8000 reset".into()),
            ProxyError::UpstreamUnavailable("connect to 10.0.1.7:8000 failed".into()),
        ] {
            let resp = error_response(&err, &cx);
            let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
                resp.into_body(),
            ))
            .expect("a full body is ready")
            .expect("no error")
            .to_bytes();
            let text = String::from_utf8_lossy(&body);
            assert!(!text.contains("10.0.1.7"), "{text}");
            assert!(err.detail().is_some_and(|d| d.contains("10.0.1.7")));
        }
    }

    #[test]
    fn errors_that_are_not_refusals_carry_no_retry_after() {
        let resp = error_response(
            &ProxyError::NoRoute,
            &AnswerContext {
                route: None,
                request_id: &RequestId::from_static("x"),
            },
        );
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(resp.headers().get(RETRY_AFTER).is_none());
    }
}
