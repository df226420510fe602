//! The proxy listener's request handler: the request path, top to bottom.
//!
//! ```text
//! classify (route.rs) ──► Images ──► credential (auth.rs) ──► lookup (cache/store.rs)
//!                    │                   │ no token: bypass        │ fresh: hit
//!                    │                   ▼                         ▼ otherwise
//!                    │               forward upstream          single flight (cache/flight.rs)
//!                    │                                             └► fetch (upstream/client.rs)
//!                    │                                                 └► store if an image list
//!                    ├─► Passthrough ──► forward upstream, streamed
//!                    └─► Refused ──► ProxyError (error.rs)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderName};
use http::{Method, Request, Response};
use hyper::body::Incoming;

use crate::auth::{Credential, CredentialHasher};
use crate::body::{self, Body};
use crate::cache::entry::{Buffered, CACHE_STATUS, Entry};
use crate::cache::flight::{Flights, Role};
use crate::cache::key::{CacheKey, CredentialScope, NormalizedQuery, ProjectId};
use crate::cache::outcome::CacheOutcome;
use crate::cache::store::{Epoch, Store};
use crate::config::{CacheConfig, Config, Passthrough};
use crate::error::ProxyError;
use crate::metrics::{Metrics, UpstreamResult};
use crate::route::{self, Route};
use crate::upstream::Upstream;

/// Caller headers not sent upstream on a cache fill: the stored response must be the plain,
/// whole, unconditional representation, whoever triggered the fill. Conditional requests are
/// answered by the cache from its own ETag.
const FILL_STRIP: [HeaderName; 8] = [
    header::ACCEPT_ENCODING,
    header::IF_NONE_MATCH,
    header::IF_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::RANGE,
    header::IF_RANGE,
    header::CONTENT_LENGTH,
];

/// Settings that a SIGHUP reload may change; read once per request, without a lock.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cache: CacheConfig,
    pub request_timeout: Duration,
    pub passthrough: Passthrough,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            cache: config.cache.clone(),
            request_timeout: config.server.request_timeout,
            passthrough: config.upstream.passthrough,
        }
    }
}

/// What one upstream fill produced; every caller of the flight gets a clone.
#[derive(Debug, Clone)]
pub enum Fetched {
    Stored(Arc<Entry>),
    Relayed(Arc<Buffered>),
}

type FillResult = Result<Fetched, ProxyError>;

pub struct Proxy {
    settings: ArcSwap<Settings>,
    store: Arc<Store>,
    flights: Flights<CacheKey, FillResult>,
    upstream: Upstream,
    hasher: CredentialHasher,
    metrics: Metrics,
}

impl Proxy {
    pub fn new(
        settings: Settings,
        store: Arc<Store>,
        upstream: Upstream,
        metrics: Metrics,
    ) -> Self {
        Self {
            settings: ArcSwap::from_pointee(settings),
            store,
            flights: Flights::default(),
            upstream,
            hasher: CredentialHasher::new(),
            metrics,
        }
    }

    pub fn reload(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let settings = self.settings.load_full();
        match route::classify(request.method(), request.uri(), settings.passthrough) {
            Route::Images { project, query } => {
                let started = Instant::now();
                let deadline = settings.request_timeout;
                let answer = self.images(request, project, query, &settings);
                let (outcome, response) = match tokio::time::timeout(deadline, answer).await {
                    Ok(answered) => answered,
                    Err(_) => {
                        let outcome = CacheOutcome::Error { collapsed: false };
                        (
                            outcome,
                            error_response(&ProxyError::RequestTimeout, outcome),
                        )
                    }
                };
                self.metrics
                    .observe_request(outcome.label(), started.elapsed().as_secs_f64());
                tracing::debug!(
                    cache = outcome.label().as_str(),
                    status = response.status().as_u16(),
                    "cached route"
                );
                response
            }
            Route::ImagesRefused(error) => {
                self.metrics
                    .observe_request(CacheOutcome::Error { collapsed: false }.label(), 0.0);
                error.to_response()
            }
            Route::Passthrough => self.passthrough(request).await,
            Route::Refused(error) => error.to_response(),
        }
    }

    async fn images(
        self: &Arc<Self>,
        request: Request<Incoming>,
        project: ProjectId,
        query: NormalizedQuery,
        settings: &Settings,
    ) -> (CacheOutcome, Response<Body>) {
        let scope = match Credential::from_headers(request.headers(), &self.hasher) {
            Credential::Token(hash) => CredentialScope::Credential(hash),
            Credential::Anonymous | Credential::Signed => return self.bypass(request).await,
        };
        let key = CacheKey {
            project,
            query,
            scope,
        };
        let freshness = settings.cache.freshness(key.project.as_str());
        let if_none_match = request.headers().get(header::IF_NONE_MATCH);

        if let Some(entry) = self.store.get(&key).await
            && entry.age() < freshness.ttl
        {
            entry.record_hit();
            return (
                CacheOutcome::Hit,
                entry.respond(CacheOutcome::Hit, if_none_match),
            );
        }

        let retain_for =
            freshness.ttl + freshness.stale_while_revalidate + freshness.stale_if_error;
        let flight = self.flights.join(&key, || {
            let fill = self.upstream.request(
                Method::GET,
                &path_and_query(&key),
                request.headers(),
                &FILL_STRIP,
                body::empty(),
            );
            let proxy = Arc::clone(self);
            let key = key.clone();
            let epoch = self.store.epoch();
            async move { proxy.fill(key, fill?, retain_for, epoch).await }
        });
        let collapsed = flight.role == Role::Waiter;
        match flight.result().await {
            Some(Ok(Fetched::Stored(entry))) => {
                let outcome = if collapsed {
                    CacheOutcome::Collapsed
                } else {
                    CacheOutcome::Stored
                };
                (outcome, entry.respond(outcome, if_none_match))
            }
            Some(Ok(Fetched::Relayed(response))) => {
                let outcome = CacheOutcome::Relayed {
                    status: response.status.as_u16(),
                    collapsed,
                };
                (outcome, response.respond(outcome))
            }
            Some(Err(error)) => {
                let outcome = CacheOutcome::Error { collapsed };
                (outcome, error_response(&error, outcome))
            }
            None => {
                let outcome = CacheOutcome::Error { collapsed };
                let error = ProxyError::BadUpstreamResponse("upstream fetch was aborted".into());
                (outcome, error_response(&error, outcome))
            }
        }
    }

    /// One upstream call for the cache, run in the flight's own task: stores an image list,
    /// relays anything else.
    async fn fill(
        self: Arc<Self>,
        key: CacheKey,
        request: Request<Body>,
        retain_for: Duration,
        epoch: Epoch,
    ) -> FillResult {
        let response = self.upstream.fetch(request).await.map_err(|error| {
            tracing::warn!(project = %key.project, %error, "upstream fetch failed");
            ProxyError::from(error)
        })?;
        if response.status == http::StatusCode::OK {
            match Entry::from_upstream(&response, retain_for) {
                Ok(entry) => {
                    let entry = Arc::new(entry);
                    if !self.store.insert(key, Arc::clone(&entry), epoch).await {
                        tracing::debug!("purged while in flight: answered, not stored");
                    }
                    return Ok(Fetched::Stored(entry));
                }
                Err(reason) => {
                    tracing::warn!(project = %key.project, ?reason, "upstream 200 is not an image list: relayed, not stored");
                }
            }
        }
        Ok(Fetched::Relayed(Arc::new(response)))
    }

    /// A cached-route request we cannot key on a credential: forwarded as is, never stored.
    async fn bypass(&self, request: Request<Incoming>) -> (CacheOutcome, Response<Body>) {
        let started = Instant::now();
        let result = self.forward(request).await;
        let upstream_result = match &result {
            Ok(response) => UpstreamResult::Status(response.status().as_u16()),
            Err(ProxyError::UpstreamTimeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.metrics
            .observe_upstream(upstream_result, started.elapsed().as_secs_f64());
        match result {
            Ok(mut response) => {
                response
                    .headers_mut()
                    .insert(CACHE_STATUS, CacheOutcome::Bypass.cache_status());
                (CacheOutcome::Bypass, response)
            }
            Err(error) => {
                let outcome = CacheOutcome::Error { collapsed: false };
                (outcome, error_response(&error, outcome))
            }
        }
    }

    /// Any other CPH call, per `upstream.passthrough`: headers and body streamed both ways.
    async fn passthrough(&self, request: Request<Incoming>) -> Response<Body> {
        let result = self.forward(request).await;
        let code = match &result {
            Ok(response) => UpstreamResult::Status(response.status().as_u16()),
            Err(ProxyError::UpstreamTimeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.metrics.observe_passthrough(code);
        result.unwrap_or_else(|error| error.to_response())
    }

    async fn forward(&self, request: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let (parts, incoming) = request.into_parts();
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let upstream_request = self.upstream.request(
            parts.method.clone(),
            path_and_query,
            &parts.headers,
            &[],
            body::streaming(incoming),
        )?;
        let response = self
            .upstream
            .forward(upstream_request)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "upstream forward failed");
                ProxyError::from(error)
            })?;
        Ok(response.map(body::streaming))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

fn path_and_query(key: &CacheKey) -> String {
    let mut out = format!("/v1/{}/cloud-phone/phone-images", key.project);
    if !key.query.is_empty() {
        out.push('?');
        out.push_str(key.query.as_str());
    }
    out
}

fn error_response(error: &ProxyError, outcome: CacheOutcome) -> Response<Body> {
    let mut response = error.to_response();
    response
        .headers_mut()
        .insert(CACHE_STATUS, outcome.cache_status());
    response
}
