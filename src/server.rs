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
        // With a timer hyper drops a connection whose request head takes over 30 s to arrive,
        // so idle or slow-loris clients cannot hold connections forever.
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

/// Serves `listener` from `threads` OS threads, each with its own single-threaded runtime
/// accepting on the same socket: a connection and its requests stay on one thread, so a hit
/// never wakes another worker (the pattern of nginx's worker processes). Against one
/// multi-threaded runtime this served 5-10 % more hits per second in interleaved wrk runs
/// (BENCHMARKS.md). Fills and refreshes are spawned on the thread that starts them; waiters
/// on other threads are woken through the flight's channel.
pub async fn serve_per_thread<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    max_header_bytes: usize,
    stop: watch::Receiver<bool>,
    grace: Duration,
    threads: usize,
) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    let mut joins = Vec::with_capacity(threads);
    for index in 0..threads {
        let listener = listener.try_clone()?;
        let handler = Arc::clone(&handler);
        let stop = stop.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let join = std::thread::Builder::new()
            .name(format!("cph-proxy-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve(listener, handler, max_header_bytes, stop, grace).await;
                        }
                        Err(error) => tracing::error!(%error, "cannot register the listener"),
                    }
                });
            })?;
        joins.push(join);
    }
    drop(listener);
    let _ = tokio::task::spawn_blocking(move || {
        for join in joins {
            let _ = join.join();
        }
    })
    .await;
    Ok(())
}
