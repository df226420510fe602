//! cph-cache: a caching sidecar for the Huawei Cloud CPH image-list API.
//!
//! [`App::new`] builds everything from a [`Config`]; [`App::serve`] runs both listeners, which
//! the caller binds and passes in (the binary binds the configured addresses, tests bind
//! `127.0.0.1:0`). The request path is in `proxy.rs`; README.md has the map.

pub mod admin;
pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod fake_cph;
pub mod metrics;
pub mod proxy;
pub mod request_id;
pub mod route;
pub mod server;
pub mod telemetry;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Request, Response};
use hyper::body::Incoming;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
pub use crate::auth::Secrets;
use crate::body::Body;
use crate::cache::store::Store;
pub use crate::config::Config;
use crate::config::{ServerConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Settings};
use crate::server::Handler;
use crate::upstream::Upstream;
use crate::upstream::client::ClientInitError;

/// The two listeners, bound by the caller.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses; the error names the key whose address failed.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let bind = |key: &'static str, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        Ok(Self {
            proxy: bind("server.listen", config.server.listen).await?,
            admin: bind("server.admin_listen", config.server.admin_listen).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] ClientInitError),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The running sidecar's parts, wired together.
pub struct App {
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    ready: Arc<AtomicBool>,
    config: Config,
}

impl App {
    /// `secrets` are resolved by the caller ([`Secrets::from_env`] in the binary) so that a
    /// missing variable is reported as a config error before anything starts.
    pub fn new(config: Config, secrets: Secrets, registry: Registry) -> Result<Self, StartError> {
        let metrics = Metrics::register(&registry)?;
        let store = Arc::new(Store::new(config.cache.max_size, metrics.clone()));
        let upstream = Upstream::new(&config.upstream, secrets.signing.clone(), metrics.clone())?;
        let proxy = Arc::new(Proxy::new(
            &config,
            &secrets,
            store,
            upstream,
            metrics.clone(),
        ));
        let ready = Arc::new(AtomicBool::new(false));
        let admin = Arc::new(Admin::new(
            Arc::clone(&proxy),
            registry,
            metrics,
            Arc::clone(&ready),
        ));
        Ok(Self {
            proxy,
            admin,
            ready,
            config,
        })
    }

    /// A handle to apply a reloaded config while [`App::serve`] runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            proxy: Arc::clone(&self.proxy),
            running: self.config.clone(),
        }
    }

    /// Serves both listeners until `shutdown` completes; then `/readyz` turns 503, the
    /// listeners close, and open requests get `server.shutdown_grace` to finish.
    pub async fn serve(self, listeners: Listeners, shutdown: impl Future<Output = ()>) {
        let bound = |listener: &TcpListener| {
            listener
                .local_addr()
                .map_or_else(|_| "?".to_owned(), |addr| addr.to_string())
        };
        let (listen, admin_listen) = (bound(&listeners.proxy), bound(&listeners.admin));
        // Ready before the accept loops start: the listeners are bound and the config loaded,
        // and connections queue in the backlog until the loops accept them.
        self.ready.store(true, Ordering::Release);
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = &self.config.server;
        let proxy = tokio::spawn({
            let serving = server::serve_per_thread(
                listeners.proxy,
                Arc::clone(&self.proxy),
                server.max_header_bytes,
                stop_rx.clone(),
                server.shutdown_grace,
                // One accepting thread per core, as nginx's `worker_processes auto`.
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            );
            async move {
                if let Err(error) = serving.await {
                    tracing::error!(%error, "the proxy listener's threads could not start");
                }
            }
        });
        let admin = tokio::spawn(server::serve(
            listeners.admin,
            Arc::clone(&self.admin),
            server.max_header_bytes,
            stop_rx,
            server.shutdown_grace,
        ));
        tracing::info!(
            %listen,
            %admin_listen,
            upstream = %self.config.upstream.endpoint,
            "cph-cache {} serving",
            env!("CARGO_PKG_VERSION")
        );
        shutdown.await;
        tracing::info!("shutting down");
        self.ready.store(false, Ordering::Release);
        let _ = stop_tx.send(true);
        let _ = tokio::join!(proxy, admin);
    }
}

/// Applies a reloaded config: the cache windows, request timeout and passthrough mode take
/// effect for the next request; keys that need a restart are logged and keep their old values.
pub struct Reloader {
    proxy: Arc<Proxy>,
    running: Config,
}

impl Reloader {
    pub fn reload(&self, new: &Config) {
        let old = &self.running;
        let needs_restart = [
            (
                "server (other than request_timeout)",
                old.server
                    != ServerConfig {
                        request_timeout: old.server.request_timeout,
                        ..new.server.clone()
                    },
            ),
            (
                "upstream (other than passthrough)",
                old.upstream
                    != UpstreamConfig {
                        passthrough: old.upstream.passthrough,
                        ..new.upstream.clone()
                    },
            ),
            ("auth", old.auth != new.auth),
            ("cache.max_size", old.cache.max_size != new.cache.max_size),
            ("log", old.log != new.log),
        ];
        for (key, changed) in needs_restart {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the reloaded config but needs a restart; keeping the running value"
                );
            }
        }
        self.proxy.reload(Settings::from_config(new));
        tracing::info!("config reloaded");
    }
}

impl Handler for Proxy {
    fn respond(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        self.handle(request)
    }
}

impl Handler for Admin {
    fn respond(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static {
        self.handle(request)
    }
}
