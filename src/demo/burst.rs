//! Fires a burst of callers at once, each on its own connection and with its own timeout, the way
//! a contact-centre platform's data actions arrive at peak, and records what each one got.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub enum Kind {
    Ok,
    /// A 503 (or other refusal status) with or without Retry-After.
    Refused {
        retry_after: bool,
    },
    /// Any other answer; only counted.
    OtherStatus,
    /// The caller gave up: what the platform would log as a 504.
    Timeout,
    Error,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: Kind,
    /// From the burst's start to the last byte (or to the caller's timeout).
    pub latency: Duration,
    /// From the request being sent on an open connection to its last byte: what the server
    /// controls, without the cost of a few hundred simultaneous TCP handshakes.
    pub answered_in: Option<Duration>,
}

pub struct Burst {
    pub outcomes: Vec<Outcome>,
}

pub async fn fire(url: &Uri, callers: usize, caller_timeout: Duration) -> Burst {
    let barrier = Arc::new(Barrier::new(callers + 1));
    let mut tasks = Vec::with_capacity(callers);
    for i in 0..callers {
        let (barrier, url) = (barrier.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let (kind, answered_in) =
                match tokio::time::timeout(caller_timeout, call_timed(&url, i)).await {
                    Err(_) => (Kind::Timeout, None),
                    Ok(k) => k,
                };
            Outcome {
                kind,
                latency: start.elapsed(),
                answered_in,
            }
        }));
    }
    barrier.wait().await;
    let mut outcomes = Vec::with_capacity(callers);
    for t in tasks {
        outcomes.push(t.await.unwrap_or(Outcome {
            kind: Kind::Error,
            latency: Duration::ZERO,
            answered_in: None,
        }));
    }
    Burst { outcomes }
}

/// One caller: a fresh connection and one POST, like a data action.
pub async fn call(url: &Uri, n: usize) -> Kind {
    call_timed(url, n).await.0
}

/// One caller, also saying how long the answer took once the request was sent.
pub async fn call_timed(url: &Uri, n: usize) -> (Kind, Option<Duration>) {
    let mut sent_at = None;
    let kind = exchange(url, n, &mut sent_at).await;
    (kind, sent_at.map(|t: Instant| t.elapsed()))
}

async fn exchange(url: &Uri, n: usize, sent_at: &mut Option<Instant>) -> Kind {
    let host = url.host().unwrap_or("127.0.0.1");
    let port = url.port_u16().unwrap_or(80);
    let Ok(stream) = TcpStream::connect((host, port)).await else {
        return Kind::Error;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
    else {
        return Kind::Error;
    };
    tokio::spawn(conn);
    let body = format!(r#"{{"text":"call {n}: the agent was helpful"}}"#);
    let req = Request::post(url.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(
            http::header::HOST,
            url.authority().map(|a| a.as_str()).unwrap_or(host),
        )
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    *sent_at = Some(Instant::now());
    let Ok(resp) = sender.send_request(req).await else {
        return Kind::Error;
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.parse::<u64>().is_ok());
    if resp.into_body().collect().await.is_err() {
        return Kind::Error;
    }
    if status.is_success() {
        Kind::Ok
    } else if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        Kind::Refused { retry_after }
    } else {
        Kind::OtherStatus
    }
}
