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
use crate::cache::entry::{Buffered, CACHE_STATUS, Entry, Staleness};
use crate::cache::flight::{Flight, Flights, Role};
use crate::cache::key::{CacheKey, CredentialScope, NormalizedQuery, ProjectId};
use crate::cache::outcome::CacheOutcome;
use crate::cache::store::{Epoch, Store};
use crate::config::{AuthMode, CacheConfig, Config, Passthrough, Share};
use crate::error::ProxyError;
use crate::metrics::{Metrics, RefreshReason, UpstreamResult};
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

    /// The same caller, with its credential treated as not yet verified.
    fn unverified(self) -> Self {
        match self {
            Self::Verified(hash) => Self::Unverified(hash),
            other => other,
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
        let mut route = route::classify(request.method(), request.uri(), settings.passthrough);
        if let Some(token) = &self.client_token
            && !token.admits(request.headers())
        {
            route = match route {
                Route::Images { .. } | Route::ImagesRefused(_) => {
                    Route::ImagesRefused(ProxyError::Unauthorized)
                }
                Route::Passthrough | Route::Refused(_) => Route::Refused(ProxyError::Unauthorized),
            };
        }
        match route {
            Route::Images { project, query } => {
                let started = Instant::now();
                let deadline = started + settings.request_timeout;
                // Every wait on the way (a flight, a bypass) ends at `deadline`; a hit waits on
                // nothing, so it registers no timer.
                let (outcome, response) = self
                    .images(request, project, query, &settings, deadline)
                    .await;
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
        deadline: Instant,
    ) -> (CacheOutcome, Response<Body>) {
        let access = self.access(request.headers(), &project);
        if access == Access::Bypass {
            return match tokio::time::timeout_at(deadline.into(), self.bypass(request)).await {
                Ok(answered) => answered,
                Err(_) => error_outcome(&ProxyError::RequestTimeout, false),
            };
        }
        let lookup = Lookup {
            project: &project,
            query: &query,
            headers: request.headers(),
            settings,
            deadline,
        };
        let mut access = access;
        loop {
            match self.cached(&lookup, access).await {
                Some(answered) => return answered,
                // A verified caller waited on someone else's fill, which upstream refused: that
                // answer was about the leader's credential, not this caller's. Ask again with its
                // own (an unverified caller's flight is keyed by its credential, so this ends).
                None => access = access.unverified(),
            }
        }
    }

    /// Serves `access` from the cache or through its single flight; `None` when a verified
    /// caller's shared flight was refused upstream (the refusal was about another credential).
    ///
    /// Freshness is judged here, with the current config: fresh entries are hits (old ones
    /// also start a refresh ahead of expiry), entries within stale-while-revalidate are served
    /// at once while a background refresh runs, and entries within stale-if-error are what the
    /// caller gets if the upstream attempt fails.
    async fn cached(
        self: &Arc<Self>,
        lookup: &Lookup<'_>,
        access: Access,
    ) -> Option<(CacheOutcome, Response<Body>)> {
        let freshness = lookup.settings.cache.freshness(lookup.project.as_str());
        let if_none_match = lookup.headers.get(header::IF_NONE_MATCH);
        let mut fallback = None;
        if let Some(scope) = access.readable()
            && let Some(entry) = self.store.get(&lookup.key(scope)).await
        {
            let age = entry.age();
            let staleness = entry.staleness(age, &freshness);
            let served = match staleness {
                Staleness::Fresh => Some(CacheOutcome::Hit),
                Staleness::RefreshAhead => {
                    self.refresh(lookup, access, RefreshReason::Ahead);
                    Some(CacheOutcome::Hit)
                }
                Staleness::Revalidate => {
                    self.refresh(lookup, access, RefreshReason::Stale);
                    Some(CacheOutcome::Stale)
                }
                Staleness::IfError | Staleness::Expired => None,
            };
            if let Some(outcome) = served {
                entry.record_hit();
                return Some((outcome, entry.respond(outcome, age, if_none_match)));
            }
            if staleness == Staleness::IfError {
                fallback = Some(entry);
            }
        }

        let flight = self.start_fill(lookup, access, lookup.deadline);
        let collapsed = flight.role == Role::Waiter;
        let result = match tokio::time::timeout_at(lookup.deadline.into(), flight.result()).await {
            Ok(Some(result)) => result,
            Ok(None) => Err(ProxyError::BadUpstreamResponse(
                "upstream fetch was aborted".into(),
            )),
            Err(_) => Err(ProxyError::RequestTimeout),
        };
        // stale-if-error: a failed upstream answer is replaced by the stale entry; 401 and 403
        // are answers about the credential and are never bridged.
        if let Some(entry) = fallback {
            let failed = match &result {
                Ok(Fetched::Stored(_)) => false,
                Ok(Fetched::Relayed(response)) => bridges(response.status),
                Err(_) => true,
            };
            if failed {
                entry.record_hit();
                let outcome = CacheOutcome::Stale;
                return Some((outcome, entry.respond(outcome, entry.age(), if_none_match)));
            }
        }
        match result {
            Ok(Fetched::Stored(entry)) => {
                let outcome = if collapsed {
                    CacheOutcome::Collapsed
                } else {
                    CacheOutcome::Stored
                };
                Some((outcome, entry.respond(outcome, entry.age(), if_none_match)))
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

    /// Joins or leads the single flight that fills the cache for this caller.
    fn start_fill(
        self: &Arc<Self>,
        lookup: &Lookup<'_>,
        access: Access,
        deadline: Instant,
    ) -> Flight<FillResult> {
        self.flights.join(&lookup.key(access.flight()), || {
            let freshness = lookup.settings.cache.freshness(lookup.project.as_str());
            let fill = Fill {
                store_key: lookup.key(access.stores_into()),
                vouches_for: access.vouches_for(),
                retain_for: freshness.ttl
                    + freshness.stale_while_revalidate
                    + freshness.stale_if_error,
                epoch: self.store.epoch(),
                deadline,
                caller_headers: lookup.headers.clone(),
            };
            let proxy = Arc::clone(self);
            async move { proxy.fill(fill).await }
        })
    }

    /// Starts a background refresh unless a fill for the key is already under way. It runs
    /// in the flight's own task with a deadline of its own; nobody waits for it.
    fn refresh(self: &Arc<Self>, lookup: &Lookup<'_>, access: Access, reason: RefreshReason) {
        let deadline = Instant::now() + lookup.settings.request_timeout;
        if self.start_fill(lookup, access, deadline).role == Role::Leader {
            self.metrics.record_refresh(reason);
        }
    }

    /// One upstream call for the cache (retries included), run in the flight's own task:
    /// stores an image list and verifies the credential it was fetched with; a 401/403 revokes
    /// that credential.
    async fn fill(self: Arc<Self>, fill: Fill) -> FillResult {
        let project = &fill.store_key.project;
        let target = path_and_query(project, &fill.store_key.query);
        let build = || {
            self.upstream.request(
                Method::GET,
                &target,
                &fill.caller_headers,
                &FILL_STRIP,
                Payload::Empty,
            )
        };
        let response = self
            .upstream
            .fetch(build, fill.deadline)
            .await
            .inspect_err(|error| tracing::warn!(%project, %error, "upstream fetch failed"))?;
        let status = response.status;
        let fetched = if status == StatusCode::OK {
            match Entry::from_upstream(&response, fill.retain_for) {
                Ok(entry) => {
                    let entry = Arc::new(entry);
                    if let Some(previous) = self.store.get(&fill.store_key).await
                        && previous.etag() != entry.etag()
                    {
                        self.metrics.record_content_change();
                    }
                    let stored = self
                        .store
                        .insert(fill.store_key.clone(), Arc::clone(&entry), fill.epoch)
                        .await;
                    if !stored {
                        tracing::debug!(%project, "purged while in flight: answered, not stored");
                    }
                    Fetched::Stored(entry)
                }
                Err(reason) => {
                    tracing::warn!(%project, ?reason, "upstream 200 is not an image list: relayed, not stored");
                    Fetched::Relayed(Arc::new(response))
                }
            }
        } else {
            Fetched::Relayed(Arc::new(response))
        };
        // Verified only once the entry is stored: a caller verified from now on reads the shared
        // entry, so it must be there already, or that caller would lead a second upstream call.
        if let Some(hash) = fill.vouches_for {
            if status == StatusCode::OK {
                self.verified.verify(project, hash);
            } else if is_refusal(status) {
                self.verified.revoke(project, hash);
            }
        }
        Ok(fetched)
    }

    /// A cached-route request we cannot key on a credential: forwarded as is, never stored.
    async fn bypass(&self, request: Request<Incoming>) -> (CacheOutcome, Response<Body>) {
        let started = Instant::now();
        let result = self.forward(request).await;
        self.metrics
            .observe_upstream(upstream_result(&result), started.elapsed().as_secs_f64());
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
        self.metrics.observe_passthrough(upstream_result(&result));
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

/// One cached-route request, as the cache sees it.
struct Lookup<'a> {
    project: &'a ProjectId,
    query: &'a NormalizedQuery,
    headers: &'a HeaderMap,
    settings: &'a Settings,
    deadline: Instant,
}

impl Lookup<'_> {
    fn key(&self, scope: CredentialScope) -> CacheKey {
        CacheKey {
            project: self.project.clone(),
            query: self.query.clone(),
            scope,
        }
    }
}

/// What a fill needs: where to store, whom to vouch for, until when to try, and the caller's
/// headers to build each attempt from.
struct Fill {
    store_key: CacheKey,
    vouches_for: Option<CredentialHash>,
    retain_for: Duration,
    epoch: Epoch,
    deadline: Instant,
    caller_headers: HeaderMap,
}

/// Upstream answers that stale-if-error replaces with the stale entry: 5xx, 429, and a 200
/// that is not an image list (it would otherwise have been stored).
fn bridges(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::OK
}

/// The `code` label of a forwarded request's outcome.
fn upstream_result(result: &Result<Response<Body>, ProxyError>) -> UpstreamResult {
    match result {
        Ok(response) => UpstreamResult::Status(response.status().as_u16()),
        Err(ProxyError::UpstreamTimeout) => UpstreamResult::Timeout,
        Err(_) => UpstreamResult::Error,
    }
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
