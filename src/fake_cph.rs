//! A simulated Huawei Cloud CPH endpoint: a real hyper HTTP/1.1 (and h2c) server that answers
//! `ListCloudPhoneImages` with deterministic per-project image lists and echoes every other path.
//!
//! It sits where the upstream would be: `cph-cache demo` puts the proxy in front of it, and the
//! integration tests and benches point `upstream.endpoint` at [`FakeCph::url`]. Knobs
//! ([`FakeCph::set_latency`], [`FakeCph::fail_next`], [`FakeCph::set_auth`]...) shape what the
//! next requests see, and exact counters ([`FakeCph::image_requests`], [`FakeCph::max_in_flight`]...)
//! let tests assert how many upstream calls the proxy really made.
//!
//! Order of work for each request: count it, read the whole body, record it, sleep for the
//! configured latency, check auth (every `/v1/{project}/...` path), then, on the image route
//! only, apply a pending [`Failure`]. A request refused by auth does not consume a `fail_next`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

/// Content type CPH sends on its 200 answers.
const IMAGES_CONTENT_TYPE: &str = "application/json;charset=UTF-8";
/// Content type of error bodies and the echo route.
const JSON_CONTENT_TYPE: &str = "application/json";
const REQUEST_ID_HEADER: &str = "x-request-id";
const AUTH_TOKEN_HEADER: &str = "x-auth-token";

const IMAGE_LABELS: [&str; 5] = [
    "cloud_phone",
    "cloud_phone_1620",
    "cloud_game",
    "cloud_game_1620",
    "qemu_phone",
];
const OS_NAMES: [&str; 4] = ["Android 7", "Android 10", "Android 11", "Android 12"];

/// How an image-list request fails instead of being answered normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A CPH error body (see [`error_body`]) with this status; 429 also carries `Retry-After: 1`.
    Status {
        status: u16,
        error_code: String,
        error_msg: String,
    },
    /// Close the connection without writing any response (h2c: reset the stream).
    DropConnection,
    /// 200 with a JSON content type and a truncated body that does not parse.
    InvalidJson,
    /// 200 with a valid image list padded by an unknown `padding` field to at least this many bytes.
    Oversized(usize),
    /// Never answer; the connection stays open until the client gives up or the server stops.
    Hang,
}

/// Which `X-Auth-Token` values the fake accepts on `/v1/{project}/...` paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthCheck {
    /// Accept everything.
    #[default]
    Off,
    /// X-Auth-Token must be one of these tokens; the value says which projects it may read
    /// (None = every project). Missing or unknown token -> 401 with error_code "APIGW.0301";
    /// known token but project not allowed -> 403 "CPS.0001".
    Tokens(HashMap<String, Option<HashSet<String>>>),
    /// Requests must be signed with SDK-HMAC-SHA256 by this access key and secret key (as the
    /// real API gateway checks them, via [`crate::upstream::sign::verify`]): a bad or missing
    /// signature -> 401 "APIGW.0301", more than 15 minutes of clock skew -> 401 "APIGW.0303".
    AkSk {
        access_key: String,
        secret_key: String,
    },
}

/// One request as the fake received it, body included.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Handle to a running fake endpoint. Clones share the server; it stops when the last clone is
/// dropped or [`FakeCph::shutdown`] is called.
#[derive(Clone)]
pub struct FakeCph {
    inner: Arc<Handle>,
}

/// Owned only by [`FakeCph`] clones (never by the server tasks), so its drop means "nobody can
/// observe the server any more" and stops it.
struct Handle {
    state: Arc<State>,
    addr: SocketAddr,
    accept: AbortHandle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

#[derive(Default)]
struct State {
    knobs: Mutex<Knobs>,
    counters: Mutex<Counters>,
    requests_total: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Woken after each arrival is counted, for [`FakeCph::until`].
    arrivals: tokio::sync::Notify,
}

#[derive(Default)]
struct Knobs {
    latency: Duration,
    failure: Option<Failure>,
    fail_next: Option<(u32, Failure)>,
    auth: AuthCheck,
    versions: HashMap<String, u32>,
}

#[derive(Default)]
struct Counters {
    by_path: HashMap<String, u64>,
    by_project: HashMap<String, u64>,
    by_token: HashMap<String, u64>,
    last_request: Option<RecordedRequest>,
}

/// A poisoned lock only means another handler panicked mid-update; the counters are still
/// usable, so take the data rather than propagating the panic into every later request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FakeCph {
    /// Serves on the given already-bound listener until the returned handle (every clone) is
    /// dropped or `shutdown()` is called. Spawns onto the current tokio runtime, so it must be
    /// called from within one.
    pub fn start(listener: TcpListener) -> FakeCph {
        let state = Arc::new(State::default());
        // An unreadable local address can only come from a listener that is already broken;
        // report a zero address rather than panicking, the first connect will then fail loudly.
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        FakeCph {
            inner: Arc::new(Handle {
                state,
                addr,
                accept: task.abort_handle(),
            }),
        }
    }

    /// Convenience for tests: binds 127.0.0.1:0 and starts serving.
    pub async fn bind() -> std::io::Result<FakeCph> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        Ok(FakeCph::start(listener))
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Stops accepting and closes every open connection (their tasks are aborted, so requests
    /// in progress, including hung ones, end without a response).
    pub fn shutdown(&self) {
        self.inner.accept.abort();
    }

    fn state(&self) -> &State {
        &self.inner.state
    }

    /// Delay before answering every request, on any path.
    pub fn set_latency(&self, d: Duration) {
        lock(&self.state().knobs).latency = d;
    }

    /// Every image-list request fails this way until cleared with `None`.
    pub fn set_failure(&self, f: Option<Failure>) {
        lock(&self.state().knobs).failure = f;
    }

    /// The next `n` image-list requests fail this way, then behaviour returns to normal (or to
    /// `set_failure`). Takes priority over `set_failure`; replaces any earlier `fail_next`.
    pub fn fail_next(&self, n: u32, f: Failure) {
        lock(&self.state().knobs).fail_next = (n > 0).then_some((n, f));
    }

    /// Default [`AuthCheck::Off`].
    pub fn set_auth(&self, auth: AuthCheck) {
        lock(&self.state().knobs).auth = auth;
    }

    /// Changes the deterministic image list of that project (default version 0).
    pub fn set_image_version(&self, project: &str, version: u32) {
        lock(&self.state().knobs)
            .versions
            .insert(project.to_owned(), version);
    }

    /// The image-list version currently served for `project`.
    pub fn image_version(&self, project: &str) -> u32 {
        lock(&self.state().knobs)
            .versions
            .get(project)
            .copied()
            .unwrap_or(0)
    }

    /// Every request received, any path.
    pub fn requests_total(&self) -> u64 {
        self.state().requests_total.load(Ordering::SeqCst)
    }

    /// Requests whose path (without query) is exactly `path`.
    pub fn requests_for_path(&self, path: &str) -> u64 {
        lock(&self.state().counters)
            .by_path
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests to `/v1/{project}/cloud-phone/phone-images`, any query and any method.
    pub fn image_requests(&self, project: &str) -> u64 {
        lock(&self.state().counters)
            .by_project
            .get(project)
            .copied()
            .unwrap_or(0)
    }

    /// Requests whose `X-Auth-Token` equals `token`.
    pub fn requests_with_token(&self, token: &str) -> u64 {
        lock(&self.state().counters)
            .by_token
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// Requests being handled right now (received, not yet answered or abandoned).
    /// Waits until `check` holds, re-checking after each request arrives (woken, not polled).
    /// Unbounded: wrap it in a timeout.
    pub async fn until(&self, check: impl Fn(&FakeCph) -> bool) {
        loop {
            let arrival = self.state().arrivals.notified();
            tokio::pin!(arrival);
            // Registered before the check, so an arrival between the two is not missed.
            arrival.as_mut().enable();
            if check(self) {
                return;
            }
            arrival.await;
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.state().in_flight.load(Ordering::SeqCst)
    }

    /// Highest number of requests being handled at once since start or `reset_counters`.
    pub fn max_in_flight(&self) -> u64 {
        self.state().max_in_flight.load(Ordering::SeqCst)
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.state().counters).last_request.clone()
    }

    /// Zeroes every counter and forgets the last request; knobs are kept. `max_in_flight`
    /// restarts from the number of requests in flight right now.
    pub fn reset_counters(&self) {
        let state = self.state();
        *lock(&state.counters) = Counters::default();
        state.requests_total.store(0, Ordering::SeqCst);
        state
            .max_in_flight
            .store(state.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl std::fmt::Debug for FakeCph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeCph")
            .field("addr", &self.inner.addr)
            .finish_non_exhaustive()
    }
}

/// Owns every connection task in a `JoinSet`, so aborting this one task drops the set and with
/// it every connection.
async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_connection(stream, Arc::clone(&state)));
                }
                Err(e) => {
                    // Usually EMFILE under a load bench; back off briefly instead of spinning.
                    tracing::warn!(error = %e, "fake_cph: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow for the life of the server.
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    let service = service_fn(move |req| handle(Arc::clone(&state), req));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).timer(TokioTimer::new());
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %e, "fake_cph: connection ended with an error");
    }
}

/// Returned by the service to make hyper close the connection without a response.
#[derive(Debug)]
struct DroppedOnPurpose;

impl std::fmt::Display for DroppedOnPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake_cph: connection dropped on purpose (Failure::DropConnection)")
    }
}

impl std::error::Error for DroppedOnPurpose {}

/// Counts a request as in flight for as long as its handler future lives, so a client that
/// hangs up on a `Hang` releases it too.
struct InFlight(Arc<State>);

impl InFlight {
    fn enter(state: &Arc<State>) -> InFlight {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, DroppedOnPurpose> {
    let _in_flight = InFlight::enter(&state);
    state.requests_total.fetch_add(1, Ordering::SeqCst);

    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let images_project = images_route_project(&path).map(str::to_owned);
    let token = parts
        .headers
        .get(AUTH_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    {
        let mut c = lock(&state.counters);
        *c.by_path.entry(path.clone()).or_default() += 1;
        if let Some(p) = &images_project {
            *c.by_project.entry(p.clone()).or_default() += 1;
        }
        if let Some(t) = &token {
            *c.by_token.entry(t.clone()).or_default() += 1;
        }
    }
    state.arrivals.notify_waiters();

    // Read the whole body even when the route ignores it: passthrough tests stream bodies in.
    let body = body.collect().await.map(|collected| collected.to_bytes());
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    lock(&state.counters).last_request = Some(RecordedRequest {
        method: parts.method.clone(),
        path_and_query,
        headers: parts.headers.clone(),
        body: body.as_ref().cloned().unwrap_or_default(),
    });
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "CPS.0400",
                &format!("could not read request body: {e}"),
            ));
        }
    };

    let latency = lock(&state.knobs).latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    if let Some(project) = v1_project(&path) {
        let auth = lock(&state.knobs).auth.clone();
        let denied = match &auth {
            AuthCheck::AkSk {
                access_key,
                secret_key,
            } => check_signature(&parts, &body, access_key, secret_key),
            _ => check_auth(&auth, token.as_deref(), project),
        };
        if let Some(resp) = denied {
            return Ok(resp);
        }
    }

    let is_image_read = parts.method == Method::GET || parts.method == Method::HEAD;
    match images_project {
        Some(project) if is_image_read => {
            let (failure, version) = {
                let mut knobs = lock(&state.knobs);
                let failure = take_failure(&mut knobs);
                let version = knobs.versions.get(&project).copied().unwrap_or(0);
                (failure, version)
            };
            let filter = ImageFilter::from_query(&query);
            match failure {
                None => Ok(images_response(&project, version, filter, None)),
                Some(f) => fail(f, &project, version, filter).await,
            }
        }
        _ => Ok(echo_response(&parts.method, &path, &query, body.len())),
    }
}

/// `fail_next` first (consuming one), then the standing `set_failure`.
fn take_failure(knobs: &mut Knobs) -> Option<Failure> {
    if let Some((left, f)) = knobs.fail_next.take() {
        if left > 1 {
            knobs.fail_next = Some((left - 1, f.clone()));
        }
        return Some(f);
    }
    knobs.failure.clone()
}

async fn fail(
    f: Failure,
    project: &str,
    version: u32,
    filter: ImageFilter,
) -> Result<Resp, DroppedOnPurpose> {
    match f {
        Failure::Status {
            status,
            error_code,
            error_msg,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = error_response(status, &error_code, &error_msg);
            if status == StatusCode::TOO_MANY_REQUESTS {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Ok(resp)
        }
        Failure::DropConnection => Err(DroppedOnPurpose),
        Failure::InvalidJson => {
            let id = new_request_id();
            Ok(json_response(
                StatusCode::OK,
                IMAGES_CONTENT_TYPE,
                &id,
                "{\"phone_images\": [".to_owned(),
            ))
        }
        Failure::Oversized(min_len) => Ok(images_response(project, version, filter, Some(min_len))),
        Failure::Hang => std::future::pending().await,
    }
}

/// `Some(project)` when `path` is `/v1/{project}/cloud-phone/phone-images` with a non-empty
/// project segment (taken raw, percent-encoding and all).
fn images_route_project(path: &str) -> Option<&str> {
    let project = path
        .strip_prefix("/v1/")?
        .strip_suffix("/cloud-phone/phone-images")?;
    (!project.is_empty() && !project.contains('/')).then_some(project)
}

/// The project of any `/v1/{project}/...` path, which is where the auth check applies.
fn v1_project(path: &str) -> Option<&str> {
    let (project, _rest) = path.strip_prefix("/v1/")?.split_once('/')?;
    (!project.is_empty()).then_some(project)
}

fn check_signature(
    parts: &http::request::Parts,
    body: &[u8],
    access_key: &str,
    secret_key: &str,
) -> Option<Resp> {
    let lookup = |ak: &str| (ak == access_key).then(|| secret_key.as_bytes().to_vec());
    let verified = crate::upstream::sign::verify(
        &parts.method,
        &parts.uri,
        &parts.headers,
        body,
        lookup,
        std::time::SystemTime::now(),
        crate::upstream::sign::MAX_SKEW,
    );
    let error = verified.err()?;
    Some(error_response(
        StatusCode::UNAUTHORIZED,
        error.apigw_code(),
        &format!("Incorrect IAM authentication information: {error}"),
    ))
}

fn check_auth(auth: &AuthCheck, token: Option<&str>, project: &str) -> Option<Resp> {
    let AuthCheck::Tokens(tokens) = auth else {
        return None;
    };
    match token.and_then(|t| tokens.get(t)) {
        None => Some(error_response(
            StatusCode::UNAUTHORIZED,
            "APIGW.0301",
            "Incorrect IAM authentication information: verify token failed",
        )),
        Some(Some(allowed)) if !allowed.contains(project) => Some(error_response(
            StatusCode::FORBIDDEN,
            "CPS.0001",
            "The token has no permission for this project",
        )),
        Some(_) => None,
    }
}

/// Which images a query selects: `image_type=public` / `image_type=private` filter by
/// `is_public`; anything else (share, all, absent) lists every image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageFilter {
    All,
    Public,
    Private,
}

impl ImageFilter {
    fn from_query(query: &str) -> ImageFilter {
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("image_type", "private")) => return ImageFilter::Private,
                Some(("image_type", "public")) => return ImageFilter::Public,
                _ => {}
            }
        }
        ImageFilter::All
    }

    fn keeps(self, is_public: u8) -> bool {
        match self {
            ImageFilter::All => true,
            ImageFilter::Public => is_public == 1,
            ImageFilter::Private => is_public == 2,
        }
    }
}

struct Image {
    image_name: String,
    os_type: &'static str,
    os_name: &'static str,
    image_id: String,
    is_public: u8,
    image_label: &'static str,
    is_support_encrypt: bool,
}

/// 2-6 images derived from sha256("{project}:{version}"); image 0 is always public and image 1
/// always private, so `image_type=private` and `image_type=public` are never empty and always
/// differ from the unfiltered list.
fn images(project: &str, version: u32) -> Vec<Image> {
    let seed = Sha256::digest(format!("{project}:{version}").as_bytes());
    let count = 2 + usize::from(seed[0] % 5);
    (0..count)
        .map(|i| {
            let mut h = Sha256::new();
            h.update(seed);
            h.update((i as u32).to_be_bytes());
            let d = h.finalize();
            let is_public = match i {
                0 => 1,
                1 => 2,
                _ => 1 + d[16] % 2,
            };
            let os_name = OS_NAMES[usize::from(d[17]) % OS_NAMES.len()];
            let image_label = IMAGE_LABELS[usize::from(d[18]) % IMAGE_LABELS.len()];
            Image {
                image_name: format!(
                    "{}_{}_v{}.{}",
                    image_label,
                    os_name.replace(' ', "").to_lowercase(),
                    version,
                    u16::from_be_bytes([d[19], d[20]]) % 1000
                ),
                os_type: "Android",
                os_name,
                image_id: hex::encode(&d[..16]),
                is_public,
                image_label,
                is_support_encrypt: d[21] % 2 == 0,
            }
        })
        .collect()
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The unfiltered `ListCloudPhoneImages` body of `project` at `version`: byte-identical for the
/// same inputs, with `phone_images` first and `request_id` last.
pub fn image_list_body(project: &str, version: u32, request_id: &str) -> String {
    image_list_body_for_query(project, version, "", request_id)
}

/// The body the fake answers for `query` (the raw query string without `?`): only
/// `image_type=public|private` changes it.
pub fn image_list_body_for_query(
    project: &str,
    version: u32,
    query: &str,
    request_id: &str,
) -> String {
    render_images(
        project,
        version,
        ImageFilter::from_query(query),
        request_id,
        None,
    )
}

fn render_images(
    project: &str,
    version: u32,
    filter: ImageFilter,
    request_id: &str,
    min_len: Option<usize>,
) -> String {
    let entries: Vec<String> = images(project, version)
        .into_iter()
        .filter(|img| filter.keeps(img.is_public))
        .map(|img| {
            format!(
                "{{\"image_name\":{},\"os_type\":{},\"os_name\":{},\"image_id\":{},\"is_public\":{},\"image_label\":{},\"is_support_encrypt\":{}}}",
                json_string(&img.image_name),
                json_string(img.os_type),
                json_string(img.os_name),
                json_string(&img.image_id),
                img.is_public,
                json_string(img.image_label),
                img.is_support_encrypt,
            )
        })
        .collect();
    let head = format!("{{\"phone_images\":[{}]", entries.join(","));
    let tail = format!(",\"request_id\":{}}}", json_string(request_id));
    match min_len {
        Some(min) if head.len() + tail.len() < min => {
            // The padding is an unknown field, which the proxy must keep (SPEC §1); its length
            // is exactly what is missing, so the body ends up `min` bytes plus the 13 bytes of
            // `,"padding":""` itself.
            let pad = "x".repeat(min - head.len() - tail.len());
            format!("{head},\"padding\":\"{pad}\"{tail}")
        }
        _ => format!("{head}{tail}"),
    }
}

/// CPH's error shape, `request_id` first.
pub fn error_body(request_id: &str, code: &str, msg: &str) -> String {
    format!(
        "{{\"request_id\":{},\"error_code\":{},\"error_msg\":{}}}",
        json_string(request_id),
        json_string(code),
        json_string(msg)
    )
}

/// 32 lower-case hex characters, fresh per response like CPH's.
fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn json_response(status: StatusCode, content_type: &'static str, id: &str, body: String) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn images_response(
    project: &str,
    version: u32,
    filter: ImageFilter,
    min_len: Option<usize>,
) -> Resp {
    let id = new_request_id();
    let body = render_images(project, version, filter, &id, min_len);
    json_response(StatusCode::OK, IMAGES_CONTENT_TYPE, &id, body)
}

fn error_response(status: StatusCode, code: &str, msg: &str) -> Resp {
    let id = new_request_id();
    let body = error_body(&id, code, msg);
    json_response(status, JSON_CONTENT_TYPE, &id, body)
}

fn echo_response(method: &Method, path: &str, query: &str, body_len: usize) -> Resp {
    let id = new_request_id();
    let body = format!(
        "{{\"method\":{},\"path\":{},\"query\":{},\"body_len\":{}}}",
        json_string(method.as_str()),
        json_string(path),
        json_string(query),
        body_len
    );
    json_response(StatusCode::OK, JSON_CONTENT_TYPE, &id, body)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;

    const P1: &str = "0123456789abcdef0123456789abcdef";
    const P2: &str = "fedcba9876543210fedcba9876543210";

    type TestClient = Client<HttpConnector, Full<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    async fn send(
        client: &TestClient,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: &'static [u8],
    ) -> Result<Answer, hyper_util::client::legacy::Error> {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(t) = token {
            req = req.header(AUTH_TOKEN_HEADER, t);
        }
        let resp = client
            .request(req.body(Full::new(Bytes::from_static(body))).unwrap())
            .await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        })
    }

    async fn get(client: &TestClient, url: &str, token: Option<&str>) -> Answer {
        send(client, Method::GET, url, token, b"").await.unwrap()
    }

    fn images_url(fake: &FakeCph, project: &str) -> String {
        format!("{}/v1/{project}/cloud-phone/phone-images", fake.url())
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    fn request_id_of(a: &Answer) -> String {
        let header = a.headers[REQUEST_ID_HEADER].to_str().unwrap().to_owned();
        assert_eq!(json(&a.body)["request_id"], header.as_str());
        assert_eq!(header.len(), 32);
        assert!(
            header
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        header
    }

    #[tokio::test]
    async fn image_list_is_deterministic_except_request_id() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        let a = get(&c, &images_url(&fake, P1), None).await;
        let b = get(&c, &images_url(&fake, P1), None).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers[CONTENT_TYPE], IMAGES_CONTENT_TYPE);
        let (ida, idb) = (request_id_of(&a), request_id_of(&b));
        assert_ne!(ida, idb);
        assert_eq!(a.body, image_list_body(P1, 0, &ida));
        assert_eq!(b.body, image_list_body(P1, 0, &idb));
        assert!(a.body.starts_with("{\"phone_images\":["));

        let v = json(&a.body);
        let list = v["phone_images"].as_array().unwrap();
        assert!((2..=6).contains(&list.len()));
        for img in list {
            assert_eq!(img["image_id"].as_str().unwrap().len(), 32);
            assert!(IMAGE_LABELS.contains(&img["image_label"].as_str().unwrap()));
            assert!(img["is_support_encrypt"].is_boolean());
        }

        // Another project and another query give other bodies.
        assert_ne!(image_list_body(P2, 0, &ida), image_list_body(P1, 0, &ida));
        let private = get(
            &c,
            &format!("{}?image_type=private", images_url(&fake, P1)),
            None,
        )
        .await;
        let pid = request_id_of(&private);
        assert_eq!(
            private.body,
            image_list_body_for_query(P1, 0, "image_type=private", &pid)
        );
        let v = json(&private.body);
        let list = v["phone_images"].as_array().unwrap();
        assert!(!list.is_empty());
        assert!(list.iter().all(|i| i["is_public"] == 2));
        assert_ne!(private.body, image_list_body(P1, 0, &pid));

        // HEAD answers the same headers, no body.
        let head = send(&c, Method::HEAD, &images_url(&fake, P1), None, b"")
            .await
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty());
    }

    #[tokio::test]
    async fn version_change_changes_body() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        let a = get(&c, &images_url(&fake, P1), None).await;
        fake.set_image_version(P1, 1);
        assert_eq!(fake.image_version(P1), 1);
        let b = get(&c, &images_url(&fake, P1), None).await;
        let (ida, idb) = (request_id_of(&a), request_id_of(&b));
        assert_eq!(b.body, image_list_body(P1, 1, &idb));
        assert_ne!(image_list_body(P1, 0, &ida), image_list_body(P1, 1, &ida));
        // Other projects are untouched.
        let other = get(&c, &images_url(&fake, P2), None).await;
        assert_eq!(other.body, image_list_body(P2, 0, &request_id_of(&other)));
    }

    #[tokio::test]
    async fn fail_next_then_normal_and_set_failure() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        fake.fail_next(
            1,
            Failure::Status {
                status: 503,
                error_code: "CPS.0005".into(),
                error_msg: "busy".into(),
            },
        );
        let a = get(&c, &images_url(&fake, P1), None).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.headers[CONTENT_TYPE], JSON_CONTENT_TYPE);
        let id = request_id_of(&a);
        assert_eq!(a.body, error_body(&id, "CPS.0005", "busy"));
        assert!(a.headers.get(RETRY_AFTER).is_none());
        assert_eq!(
            get(&c, &images_url(&fake, P1), None).await.status,
            StatusCode::OK
        );

        // set_failure stays until cleared; fail_next takes priority over it.
        let throttle = Failure::Status {
            status: 429,
            error_code: "APIGW.0308".into(),
            error_msg: "throttled".into(),
        };
        fake.set_failure(Some(throttle));
        fake.fail_next(1, Failure::InvalidJson);
        assert_eq!(
            get(&c, &images_url(&fake, P1), None).await.status,
            StatusCode::OK
        );
        for _ in 0..2 {
            let t = get(&c, &images_url(&fake, P1), None).await;
            assert_eq!(t.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(t.headers[RETRY_AFTER], "1");
        }
        // Failures only hit the image route.
        let echo = get(
            &c,
            &format!("{}/v1/{P1}/cloud-phone/phones", fake.url()),
            None,
        )
        .await;
        assert_eq!(echo.status, StatusCode::OK);
        fake.set_failure(None);
        assert_eq!(
            get(&c, &images_url(&fake, P1), None).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn invalid_json_and_oversized() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        fake.fail_next(1, Failure::InvalidJson);
        let bad = get(&c, &images_url(&fake, P1), None).await;
        assert_eq!(bad.status, StatusCode::OK);
        assert_eq!(bad.headers[CONTENT_TYPE], IMAGES_CONTENT_TYPE);
        assert!(serde_json::from_str::<serde_json::Value>(&bad.body).is_err());

        fake.fail_next(1, Failure::Oversized(100_000));
        let big = get(&c, &images_url(&fake, P1), None).await;
        assert_eq!(big.status, StatusCode::OK);
        assert!(big.body.len() >= 100_000, "{}", big.body.len());
        assert!(big.body.len() < 100_100);
        let id = request_id_of(&big);
        assert!(json(&big.body)["phone_images"].is_array());
        assert!(big.body.starts_with("{\"phone_images\":["));
        assert!(big.body.ends_with(&format!(",\"request_id\":\"{id}\"}}")));

        // Already big enough: no padding.
        fake.fail_next(1, Failure::Oversized(10));
        let small = get(&c, &images_url(&fake, P1), None).await;
        assert_eq!(small.body, image_list_body(P1, 0, &request_id_of(&small)));
    }

    #[tokio::test]
    async fn auth_tokens_401_403_200() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        let tokens = HashMap::from([
            ("only-p1".to_owned(), Some(HashSet::from([P1.to_owned()]))),
            ("admin".to_owned(), None),
        ]);
        fake.set_auth(AuthCheck::Tokens(tokens));

        let missing = get(&c, &images_url(&fake, P1), None).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(json(&missing.body)["error_code"], "APIGW.0301");
        request_id_of(&missing);
        let unknown = get(&c, &images_url(&fake, P1), Some("nope")).await;
        assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);

        let forbidden = get(&c, &images_url(&fake, P2), Some("only-p1")).await;
        assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
        assert_eq!(json(&forbidden.body)["error_code"], "CPS.0001");

        assert_eq!(
            get(&c, &images_url(&fake, P1), Some("only-p1"))
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(
            get(&c, &images_url(&fake, P2), Some("admin")).await.status,
            StatusCode::OK
        );

        // Every /v1/{project}/... path is checked; other paths are not.
        let phones = format!("{}/v1/{P2}/cloud-phone/phones", fake.url());
        assert_eq!(
            get(&c, &phones, Some("only-p1")).await.status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            get(&c, &format!("{}/healthz", fake.url()), None)
                .await
                .status,
            StatusCode::OK
        );

        // A refused request does not use up a fail_next.
        fake.fail_next(1, Failure::InvalidJson);
        assert_eq!(
            get(&c, &images_url(&fake, P1), None).await.status,
            StatusCode::UNAUTHORIZED
        );
        let bad = get(&c, &images_url(&fake, P1), Some("admin")).await;
        assert!(serde_json::from_str::<serde_json::Value>(&bad.body).is_err());

        fake.set_auth(AuthCheck::Off);
        assert_eq!(
            get(&c, &images_url(&fake, P2), None).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn counters_and_recording() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        get(&c, &images_url(&fake, P1), Some("t1")).await;
        get(
            &c,
            &format!("{}?image_type=private&limit=5", images_url(&fake, P1)),
            Some("t1"),
        )
        .await;
        get(&c, &images_url(&fake, P2), Some("t2")).await;
        let echo = send(
            &c,
            Method::POST,
            &format!(
                "{}/v1/{P1}/cloud-phone/phones/batch-restart?x=1",
                fake.url()
            ),
            Some("t2"),
            b"{\"phones\":[]}",
        )
        .await
        .unwrap();

        assert_eq!(fake.requests_total(), 4);
        assert_eq!(fake.image_requests(P1), 2);
        assert_eq!(fake.image_requests(P2), 1);
        assert_eq!(fake.image_requests("other"), 0);
        assert_eq!(
            fake.requests_for_path(&format!("/v1/{P1}/cloud-phone/phone-images")),
            2
        );
        assert_eq!(
            fake.requests_for_path(&format!("/v1/{P1}/cloud-phone/phones/batch-restart")),
            1
        );
        assert_eq!(fake.requests_with_token("t1"), 2);
        assert_eq!(fake.requests_with_token("t2"), 2);
        assert_eq!(fake.requests_with_token("t3"), 0);
        assert_eq!(fake.max_in_flight(), 1);

        let v = json(&echo.body);
        assert_eq!(v["method"], "POST");
        assert_eq!(
            v["path"],
            format!("/v1/{P1}/cloud-phone/phones/batch-restart")
        );
        assert_eq!(v["query"], "x=1");
        assert_eq!(v["body_len"], 13);
        assert_eq!(echo.headers[REQUEST_ID_HEADER].len(), 32);

        let last = fake.last_request().unwrap();
        assert_eq!(last.method, Method::POST);
        assert_eq!(
            last.path_and_query,
            format!("/v1/{P1}/cloud-phone/phones/batch-restart?x=1")
        );
        assert_eq!(last.headers[AUTH_TOKEN_HEADER], "t2");
        assert_eq!(&last.body[..], b"{\"phones\":[]}");

        fake.reset_counters();
        assert_eq!(fake.requests_total(), 0);
        assert_eq!(fake.image_requests(P1), 0);
        assert_eq!(fake.requests_with_token("t1"), 0);
        assert_eq!(fake.max_in_flight(), 0);
        assert!(fake.last_request().is_none());
    }

    #[tokio::test]
    async fn concurrent_requests_are_counted_exactly() {
        let fake = FakeCph::bind().await.unwrap();
        // Long enough that all 20 requests overlap, short enough to keep the suite fast.
        fake.set_latency(Duration::from_millis(100));
        let c = client();
        let url = images_url(&fake, P1);
        let mut tasks = JoinSet::new();
        for _ in 0..20 {
            let (c, url) = (c.clone(), url.clone());
            tasks.spawn(async move { get(&c, &url, None).await.status });
        }
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.unwrap(), StatusCode::OK);
        }
        assert_eq!(fake.requests_total(), 20);
        assert_eq!(fake.image_requests(P1), 20);
        assert_eq!(fake.max_in_flight(), 20);
        assert_eq!(fake.in_flight(), 0);
    }

    #[tokio::test]
    async fn drop_connection_is_a_client_error() {
        let fake = FakeCph::bind().await.unwrap();
        let c = client();
        fake.fail_next(1, Failure::DropConnection);
        let err = send(&c, Method::GET, &images_url(&fake, P1), None, b"")
            .await
            .err()
            .expect("dropped connection must not produce a response");
        assert!(!err.is_connect(), "{err:?}");
        assert_eq!(
            get(&c, &images_url(&fake, P1), None).await.status,
            StatusCode::OK
        );
        assert_eq!(fake.image_requests(P1), 2);
    }

    #[tokio::test]
    async fn hang_never_answers_and_shutdown_closes_it() {
        let fake = FakeCph::bind().await.unwrap();
        fake.set_failure(Some(Failure::Hang));
        let c = client();
        let url = images_url(&fake, P1);
        let pending = tokio::spawn({
            let c = c.clone();
            async move {
                send(&c, Method::GET, &url, None, b"")
                    .await
                    .map(|a| a.status)
            }
        });
        // Woken by the arrival itself.
        fake.until(|fake| fake.in_flight() > 0).await;
        assert!(!pending.is_finished());
        fake.shutdown();
        assert!(pending.await.unwrap().is_err());
        // New connections are refused too.
        let empty: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        assert!(
            empty
                .get(images_url(&fake, P1).parse().unwrap())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn dropping_every_handle_stops_the_server() {
        let fake = FakeCph::bind().await.unwrap();
        let url = images_url(&fake, P1);
        let clone = fake.clone();
        drop(fake);
        assert_eq!(get(&client(), &url, None).await.status, StatusCode::OK);
        drop(clone);
        let empty: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        assert!(empty.get(url.parse().unwrap()).await.is_err());
    }

    #[test]
    fn route_parsing() {
        assert_eq!(
            images_route_project("/v1/abc/cloud-phone/phone-images"),
            Some("abc")
        );
        assert_eq!(images_route_project("/v1//cloud-phone/phone-images"), None);
        assert_eq!(
            images_route_project("/v1/a/b/cloud-phone/phone-images"),
            None
        );
        assert_eq!(
            images_route_project("/v2/abc/cloud-phone/phone-images"),
            None
        );
        assert_eq!(v1_project("/v1/abc/anything/else"), Some("abc"));
        assert_eq!(v1_project("/v1/abc"), None);
        assert_eq!(
            ImageFilter::from_query("limit=1&image_type=private"),
            ImageFilter::Private
        );
        assert_eq!(ImageFilter::from_query("image_type=all"), ImageFilter::All);
        assert_eq!(
            error_body("id", "C\"1", "m"),
            "{\"request_id\":\"id\",\"error_code\":\"C\\\"1\",\"error_msg\":\"m\"}"
        );
    }
}
