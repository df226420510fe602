//! Accept loops for both listeners: HTTP/1.1 with keep-alive (and h2c by prior knowledge), and
//! graceful shutdown that finishes in-flight requests within `server.shutdown_grace`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::Body;

/// hyper's smallest read buffer; `server.max_header_bytes` below it is raised to it.
const MIN_BUF: usize = 8192;

/// A listener's request handler (the proxy or the admin endpoints).
pub trait Handler: Send + Sync + 'static {
    fn respond(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static;
}

/// Serves `listener` with `handler` until `stop` flips to true, then waits up to `grace` for
/// open requests to finish. Request headers over `max_header_bytes` get hyper's 431.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    max_header_bytes: usize,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .max_buf_size(max_header_bytes.max(MIN_BUF));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning on accept.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let service = service_fn(move |request| {
            let response = Arc::clone(&handler).respond(request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!("shutdown grace elapsed with requests still open"),
    }
}
