//! A simulated analytics backend that behaves like uvicorn in front of a CPU-bound scorer:
//! `workers` requests are worked on at once, each for `service_time`, and everything else waits
//! in an unbounded backlog. Work is not cancelled when the caller gives up, as with a sync
//! FastAPI endpoint: an abandoned request still occupies a worker.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, Semaphore};

#[derive(Default, Debug)]
pub struct BackendStats {
    pub received: AtomicUsize,
    pub completed: AtomicUsize,
    /// Finished after its caller had already gone: work nobody got.
    pub wasted: AtomicUsize,
}

pub struct SimBackend {
    pub addr: SocketAddr,
    pub stats: Arc<BackendStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimBackend {
    pub async fn start(
        listen: SocketAddr,
        workers: usize,
        service_time: Duration,
    ) -> std::io::Result<SimBackend> {
        // uvicorn's default backlog.
        let listener = breakwater::listener::bind(listen, 2048)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(BackendStats::default());
        let pool = Arc::new(Semaphore::new(workers.max(1)));
        let st = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (st, pool) = (st.clone(), pool.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        score(req, st.clone(), pool.clone(), service_time)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(SimBackend { addr, stats, task })
    }
}

async fn score(
    req: Request<Incoming>,
    stats: Arc<BackendStats>,
    workers: Arc<Semaphore>,
    service_time: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    stats.received.fetch_add(1, Ordering::Relaxed);
    let _ = req.into_body().collect().await;
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let st = stats.clone();
    // Detached, like a request already handed to a worker process.
    tokio::spawn(async move {
        let _worker = workers.acquire_owned().await.expect("never closed");
        tokio::time::sleep(service_time).await;
        st.completed.fetch_add(1, Ordering::Relaxed);
        if done_tx.send(()).is_err() {
            st.wasted.fetch_add(1, Ordering::Relaxed);
        }
    });
    let _ = done_rx.await;
    let mut resp = Response::new(Full::new(Bytes::from_static(
        br#"{"sentiment":"neutral","score":0.5}"#,
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
