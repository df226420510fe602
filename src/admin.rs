//! The admin listener: `/metrics`, `/healthz`, `/readyz` and the `/cache` view and purge.
//!
//! It runs on its own address (`server.admin_listen`) so that scraping and purging never share
//! a port with the services that read the cache, and can be exposed differently in a pod.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use prometheus::Registry;
use serde::Serialize;

use crate::body::{self, Body};
use crate::cache::key::{CredentialScope, ProjectId};
use crate::error::ProxyError;
use crate::metrics::{self, Metrics};
use crate::proxy::Proxy;

pub struct Admin {
    proxy: Arc<Proxy>,
    registry: Registry,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

#[derive(Serialize)]
struct CacheView {
    entries: Vec<EntryView>,
}

/// One entry of `GET /cache`. Credential-scoped entries are listed without any trace of the
/// credential: operators see that several callers hold copies, not whose they are.
#[derive(Serialize)]
struct EntryView {
    project: String,
    query: String,
    shared: bool,
    age_s: u64,
    ttl_s: u64,
    bytes: usize,
    hits: u64,
}

impl Admin {
    pub fn new(
        proxy: Arc<Proxy>,
        registry: Registry,
        metrics: Metrics,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Self {
            proxy,
            registry,
            metrics,
            ready,
        }
    }

    pub async fn handle<B>(self: Arc<Self>, request: Request<B>) -> Response<Body> {
        let path = request.uri().path();
        match (request.method(), path) {
            (&Method::GET, "/metrics") => self.metrics().await,
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, "/cache") => self.cache_view(),
            (&Method::DELETE, "/cache") => {
                self.proxy.store().purge_all().await;
                tracing::info!("cache purged");
                no_content()
            }
            (&Method::DELETE, _) if path.starts_with("/cache/") => {
                let Some(project) = ProjectId::parse(&path["/cache/".len()..]) else {
                    return ProxyError::InvalidProjectId.to_response();
                };
                self.proxy.store().purge_project(&project).await;
                tracing::info!(%project, "project purged");
                no_content()
            }
            (_, "/metrics" | "/healthz" | "/readyz") => {
                ProxyError::MethodNotAllowed { allow: "GET" }.to_response()
            }
            (_, "/cache") => ProxyError::MethodNotAllowed {
                allow: "GET, DELETE",
            }
            .to_response(),
            _ => ProxyError::NotServed.to_response(),
        }
    }

    async fn metrics(&self) -> Response<Body> {
        let (entries, size) = self.proxy.store().usage().await;
        self.metrics.update_gauges(entries, size);
        match metrics::encode(&self.registry) {
            Ok(text) => {
                let mut response = Response::new(body::full(text));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            Err(error) => {
                tracing::error!(%error, "encoding metrics failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics encoding failed\n",
                )
            }
        }
    }

    fn cache_view(&self) -> Response<Body> {
        let settings = self.proxy.settings();
        let mut entries: Vec<EntryView> = self
            .proxy
            .store()
            .snapshot()
            .into_iter()
            .map(|(key, entry)| EntryView {
                project: key.project.to_string(),
                query: key.query.as_str().to_owned(),
                shared: key.scope == CredentialScope::Shared,
                age_s: entry.age().as_secs(),
                ttl_s: settings.cache.freshness(key.project.as_str()).ttl.as_secs(),
                bytes: entry.body_len(),
                hits: entry.hits(),
            })
            .collect();
        entries.sort_by(|a, b| (&a.project, &a.query).cmp(&(&b.project, &b.query)));
        match serde_json::to_vec(&CacheView { entries }) {
            Ok(json) => {
                let mut response = Response::new(body::full(Bytes::from(json)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
        }
    }
}

fn text(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn no_content() -> Response<Body> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}
