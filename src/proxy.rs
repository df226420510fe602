//! The proxy listener's request handler: the request path, top to bottom.
//!
//! ```text
//! client token (aksk) ─► classify (route.rs)
//!   ├─► Images ─► access (who may read what) ─► lookup (cache/store.rs) ─► fresh: hit
//!   │                 │ no usable credential: bypass     │ otherwise
//!   │                 ▼                                  ▼
//!   │             forward upstream                   single flight (cache/flight.rs)
//!   │                                                  └► fill: fetch (upstream/client.rs),
//!   │                                                     store if an image list, verify caller
//!   ├─► Passthrough ─► forward upstream, streamed
//!   └─► Refused ─► ProxyError (error.rs)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::auth::{
    ClientToken, Credential, CredentialHash, CredentialHasher, Secrets, VerifiedCredentials,
};
use crate::body::Body;
use crate::cache::entry::{Buffered, CACHE_STATUS, Entry};
use crate::cache::flight::{Flights, Role};
use crate::cache::key::{CacheKey, CredentialScope, NormalizedQuery, ProjectId};
use crate::cache::outcome::CacheOutcome;
use crate::cache::store::{Epoch, Store};
use crate::config::{AuthMode, CacheConfig, Config, Passthrough, Share};
use crate::error::ProxyError;
use crate::metrics::{Metrics, UpstreamResult};
use crate::route::{self, Route};
use crate::upstream::Upstream;
use crate::upstream::client::Payload;

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

/// How many verified (project, credential) pairs are remembered at most: far more than a
/// sidecar's callers, and a bound on memory whatever tokens arrive.
const VERIFIED_CAPACITY: u64 = 100_000;

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

/// What a cached-route caller may read, and where its fill goes (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No credential we can key on: forwarded, never served from the cache.
    Bypass,
    /// aksk mode: one identity, ours; everyone reads the shared entry.
    Ours,
    /// share = "verified", token vouched for by upstream for this project: reads the shared
    /// entry and joins the shared flight.
    Verified(CredentialHash),
    /// share = "verified", token not (or no longer) vouched for: never served from the cache;
    /// its own flight, whose 200 verifies it and refreshes the shared entry.
    Unverified(CredentialHash),
    /// share = "credential": an entry of its own.
    Own(CredentialHash),
}

impl Access {
    /// The entry this caller may be served from, if any.
    fn readable(self) -> Option<CredentialScope> {
        match self {
            Self::Ours | Self::Verified(_) => Some(CredentialScope::Shared),
            Self::Own(hash) => Some(CredentialScope::Credential(hash)),
            Self::Bypass | Self::Unverified(_) => None,
        }
    }

    /// The single flight this caller joins.
    fn flight(self) -> CredentialScope {
        match self {
            Self::Unverified(hash) | Self::Own(hash) => CredentialScope::Credential(hash),
            Self::Ours | Self::Verified(_) | Self::Bypass => CredentialScope::Shared,
        }
    }

    /// Where a storable answer to this caller's fill goes.
    fn stores_into(self) -> CredentialScope {
        match self {
            Self::Own(hash) => CredentialScope::Credential(hash),
            _ => CredentialScope::Shared,
        }
    }

    /// The credential whose verification the fill's answer confirms or revokes.
    fn vouches_for(self) -> Option<CredentialHash> {
        match self {
            Self::Verified(hash) | Self::Unverified(hash) => Some(hash),
            _ => None,
        }
    }
}

pub struct Proxy {
    settings: ArcSwap<Settings>,
    store: Arc<Store>,
    flights: Flights<CacheKey, FillResult>,
    upstream: Upstream,
    auth_mode: AuthMode,
    share: Share,
    hasher: CredentialHasher,
    verified: VerifiedCredentials,
    client_token: Option<ClientToken>,
    metrics: Metrics,
}

impl Proxy {
    pub fn new(
        config: &Config,
        secrets: &Secrets,
        store: Arc<Store>,
        upstream: Upstream,
        metrics: Metrics,
    ) -> Self {
        Self {
            settings: ArcSwap::from_pointee(Settings::from_config(config)),
            store,
            flights: Flights::default(),
            upstream,
            auth_mode: config.auth.mode,
            share: config.auth.share,
            hasher: CredentialHasher::new(),
            verified: VerifiedCredentials::new(config.auth.verify_ttl, VERIFIED_CAPACITY),
            client_token: secrets.client_token.clone(),
            metrics,
        }
    }

    pub fn reload(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let settings = self.settings.load_full();
        let route = match &self.client_token {
            Some(token) if !token.admits(request.headers()) => {
                match route::classify(request.method(), request.uri(), settings.passthrough) {
                    Route::Images { .. } | Route::ImagesRefused(_) => {
                        Route::ImagesRefused(ProxyError::Unauthorized)
                    }
                    _ => Route::Refused(ProxyError::Unauthorized),
                }
            }
            _ => route::classify(request.method(), request.uri(), settings.passthrough),
        };
        match route {
            Route::Images { project, query } => {
                let started = Instant::now();
                let answer = self.images(request, project, query, &settings);
                let (outcome, response) =
                    match tokio::time::timeout(settings.request_timeout, answer).await {
                        Ok(answered) => answered,
                        Err(_) => error_outcome(&ProxyError::RequestTimeout, false),
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
                let (outcome, response) = error_outcome(&error, false);
                self.metrics.observe_request(outcome.label(), 0.0);
                response
            }
            Route::Passthrough => self.passthrough(request).await,
            Route::Refused(error) => error.to_response(),
        }
    }

    fn access(&self, headers: &HeaderMap, project: &ProjectId) -> Access {
        if self.auth_mode == AuthMode::Aksk {
            return Access::Ours;
        }
        let Credential::Token(hash) = Credential::from_headers(headers, &self.hasher) else {
            return Access::Bypass;
        };
        match self.share {
            Share::Credential => Access::Own(hash),
            Share::Verified if self.verified.is_verified(project, hash) => Access::Verified(hash),
            Share::Verified => Access::Unverified(hash),
        }
    }

    async fn images(
        self: &Arc<Self>,
        request: Request<Incoming>,
        project: ProjectId,
        query: NormalizedQuery,
        settings: &Settings,
    ) -> (CacheOutcome, Response<Body>) {
        let access = self.access(request.headers(), &project);
        if access == Access::Bypass {
            return self.bypass(request).await;
        }
        if let Some(answered) = self
            .cached(&request, &project, &query, access, settings)
            .await
        {
            return answered;
        }
        // A verified caller waited on someone else's fill, which upstream refused: that answer
        // was about the leader's credential, not this caller's. Ask again with its own.
        let own = match access {
            Access::Verified(hash) => Access::Unverified(hash),
            other => other,
        };
        self.cached(&request, &project, &query, own, settings)
            .await
            .unwrap_or_else(|| {
                error_outcome(&ProxyError::BadUpstreamResponse("refused".into()), false)
            })
    }

    /// Serves `access` from the cache or through its single flight; `None` when a verified
    /// caller's shared flight was refused upstream (the refusal was about another credential).
    async fn cached(
        self: &Arc<Self>,
        request: &Request<Incoming>,
        project: &ProjectId,
        query: &NormalizedQuery,
        access: Access,
        settings: &Settings,
    ) -> Option<(CacheOutcome, Response<Body>)> {
        let key_for = |scope| CacheKey {
            project: project.clone(),
            query: query.clone(),
            scope,
        };
        let freshness = settings.cache.freshness(project.as_str());
        let if_none_match = request.headers().get(header::IF_NONE_MATCH);

        if let Some(scope) = access.readable()
            && let Some(entry) = self.store.get(&key_for(scope)).await
            && entry.age() < freshness.ttl
        {
            entry.record_hit();
            let response = entry.respond(CacheOutcome::Hit, if_none_match);
            return Some((CacheOutcome::Hit, response));
        }

        let retain_for =
            freshness.ttl + freshness.stale_while_revalidate + freshness.stale_if_error;
        let flight_key = key_for(access.flight());
        let flight = self.flights.join(&flight_key, || {
            let fill = Fill {
                store_key: key_for(access.stores_into()),
                vouches_for: access.vouches_for(),
                retain_for,
                epoch: self.store.epoch(),
            };
            let upstream_request = self.upstream.request(
                Method::GET,
                &path_and_query(project, query),
                request.headers(),
                &FILL_STRIP,
                Payload::Empty,
            );
            let proxy = Arc::clone(self);
            async move { proxy.fill(fill, upstream_request?).await }
        });
        let collapsed = flight.role == Role::Waiter;
        let Some(result) = flight.result().await else {
            let error = ProxyError::BadUpstreamResponse("upstream fetch was aborted".into());
            return Some(error_outcome(&error, collapsed));
        };
        match result {
            Ok(Fetched::Stored(entry)) => {
                let outcome = if collapsed {
                    CacheOutcome::Collapsed
                } else {
                    CacheOutcome::Stored
                };
                Some((outcome, entry.respond(outcome, if_none_match)))
            }
            Ok(Fetched::Relayed(response))
                if collapsed
                    && is_refusal(response.status)
                    && matches!(access, Access::Verified(_)) =>
            {
                None
            }
            Ok(Fetched::Relayed(response)) => {
                let outcome = CacheOutcome::Relayed {
                    status: response.status.as_u16(),
                    collapsed,
                };
                Some((outcome, response.respond(outcome)))
            }
            Err(error) => Some(error_outcome(&error, collapsed)),
        }
    }

    /// One upstream call for the cache, run in the flight's own task: stores an image list and
    /// verifies the credential it was fetched with; a 401/403 revokes that credential.
    async fn fill(self: Arc<Self>, fill: Fill, request: Request<Body>) -> FillResult {
        let project = &fill.store_key.project.clone();
        let response = self.upstream.fetch(request).await.map_err(|error| {
            tracing::warn!(%project, %error, "upstream fetch failed");
            ProxyError::from(error)
        })?;
        if let Some(hash) = fill.vouches_for {
            if response.status == StatusCode::OK {
                self.verified.verify(project, hash);
            } else if is_refusal(response.status) {
                self.verified.revoke(project, hash);
            }
        }
        if response.status == StatusCode::OK {
            match Entry::from_upstream(&response, fill.retain_for) {
                Ok(entry) => {
                    let entry = Arc::new(entry);
                    let stored = self
                        .store
                        .insert(fill.store_key, Arc::clone(&entry), fill.epoch)
                        .await;
                    if !stored {
                        tracing::debug!(%project, "purged while in flight: answered, not stored");
                    }
                    return Ok(Fetched::Stored(entry));
                }
                Err(reason) => {
                    tracing::warn!(%project, ?reason, "upstream 200 is not an image list: relayed, not stored");
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
            Err(error) => error_outcome(&error, false),
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
        // A signed request covers its body's hash, so in aksk mode the body is read first
        // (bounded by upstream.max_body); otherwise it streams.
        let payload = if self.upstream.signs() {
            let limit = self.upstream.max_body();
            let bytes: Bytes = Limited::new(incoming, limit)
                .collect()
                .await
                .map_err(|_| {
                    ProxyError::MalformedRequest(
                        "request body unreadable or larger than upstream.max_body",
                    )
                })?
                .to_bytes();
            Payload::Buffered(bytes)
        } else {
            Payload::Stream(incoming)
        };
        let upstream_request = self.upstream.request(
            parts.method.clone(),
            path_and_query,
            &parts.headers,
            &[],
            payload,
        )?;
        let response = self
            .upstream
            .forward(upstream_request)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "upstream forward failed");
                ProxyError::from(error)
            })?;
        Ok(response.map(crate::body::streaming))
    }
}

/// What a fill needs besides the request: where to store, whom to vouch for.
struct Fill {
    store_key: CacheKey,
    vouches_for: Option<CredentialHash>,
    retain_for: Duration,
    epoch: Epoch,
}

/// 401 and 403 are answers about the credential, not the resource.
fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

fn path_and_query(project: &ProjectId, query: &NormalizedQuery) -> String {
    let mut out = format!("/v1/{project}/cloud-phone/phone-images");
    if !query.is_empty() {
        out.push('?');
        out.push_str(query.as_str());
    }
    out
}

fn error_outcome(error: &ProxyError, collapsed: bool) -> (CacheOutcome, Response<Body>) {
    let outcome = CacheOutcome::Error { collapsed };
    let mut response = error.to_response();
    response
        .headers_mut()
        .insert(CACHE_STATUS, outcome.cache_status());
    (outcome, response)
}
