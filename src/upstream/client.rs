//! The one pooled HTTP client to the CPH endpoint.
//!
//! hyper-util's pooled client over hyper-rustls: HTTPS for the real endpoint (webpki and native
//! roots, plus `upstream.ca_file`), plain HTTP for tests and local fakes, HTTP/2 when the server
//! offers it in ALPN. `connect_timeout` bounds the TCP connect, `timeout` each attempt, and
//! `max_body` is enforced while the cached route reads a body, so an oversized answer is cut
//! off rather than buffered.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::body::{self, Body};
use crate::cache::entry::Buffered;
use crate::config::{Endpoint, UpstreamConfig};
use crate::error::ProxyError;
use crate::metrics::{Metrics, UpstreamResult};
use crate::upstream::sign;

/// Caller headers dropped in aksk mode: the caller's own credentials and signing headers, which
/// would either leak to CPH or clash with our signature.
const CALLER_CREDENTIALS: [&str; 6] = [
    "x-auth-token",
    "authorization",
    "x-security-token",
    "x-sdk-date",
    "x-project-id",
    "x-sdk-content-sha256",
];

/// A request body to send upstream.
pub enum Payload {
    Empty,
    /// Read in full, so that it can be signed.
    Buffered(Bytes),
    /// Streamed as it arrives; only in passthrough auth mode (it cannot be signed).
    Stream(Incoming),
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and are never forwarded either way.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Why an upstream attempt produced no usable response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Protocol(String),
}

impl From<UpstreamError> for ProxyError {
    fn from(error: UpstreamError) -> Self {
        match error {
            UpstreamError::Connect(reason) => ProxyError::UpstreamUnreachable(reason),
            UpstreamError::Timeout => ProxyError::UpstreamTimeout,
            UpstreamError::TooLarge { limit } => ProxyError::UpstreamBodyTooLarge { limit },
            UpstreamError::Protocol(reason) => ProxyError::BadUpstreamResponse(reason),
        }
    }
}

/// Failure to build the client from the config (names the key at fault).
#[derive(Debug, thiserror::Error)]
pub enum ClientInitError {
    #[error("upstream.ca_file: cannot read {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("upstream TLS setup: {0}")]
    Tls(String),
}

#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    endpoint: Arc<Endpoint>,
    /// aksk mode: every request is signed with these.
    signing: Option<Arc<sign::Credentials>>,
    timeout: Duration,
    retries: u32,
    max_body: usize,
    metrics: Metrics,
}

/// First retry after about this long, doubling each time (before jitter).
const BACKOFF_BASE: Duration = Duration::from_millis(100);

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        signing: Option<sign::Credentials>,
        metrics: Metrics,
    ) -> Result<Self, ClientInitError> {
        let tls = tls_config(config.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        // Idle upstream connections are kept for 90 s, under the usual 120 s server-side idle
        // timeout of cloud load balancers, so a pooled connection is rarely closed under us.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Ok(Self {
            client,
            endpoint: Arc::new(config.endpoint.clone()),
            signing: signing.map(Arc::new),
            timeout: config.timeout,
            retries: config.retries,
            max_body: config.max_body,
            metrics,
        })
    }

    /// Whether requests are signed with our AK/SK (aksk mode); their bodies must be buffered.
    pub fn signs(&self) -> bool {
        self.signing.is_some()
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// A request to the endpoint for `path_and_query`, carrying the caller's end-to-end headers
    /// minus `strip` (and minus `Host`: the client sets it to the upstream authority). In aksk
    /// mode the caller's credentials are dropped and the request is signed, dated now.
    pub fn request(
        &self,
        method: Method,
        path_and_query: &str,
        caller_headers: &HeaderMap,
        strip: &[HeaderName],
        payload: Payload,
    ) -> Result<Request<Body>, ProxyError> {
        let uri: Uri = format!(
            "{}://{}{}{}",
            self.endpoint.scheme.as_str(),
            self.endpoint.authority,
            self.endpoint.base_path,
            path_and_query
        )
        .parse()
        .map_err(|_| ProxyError::MalformedRequest("request target is not a valid URI"))?;
        let mut headers = end_to_end(caller_headers);
        headers.remove(header::HOST);
        for name in strip {
            headers.remove(name);
        }
        let body = match &self.signing {
            None => match payload {
                Payload::Empty => body::empty(),
                Payload::Buffered(bytes) => body::full(bytes),
                Payload::Stream(incoming) => body::streaming(incoming),
            },
            Some(credentials) => {
                for name in CALLER_CREDENTIALS {
                    headers.remove(name);
                }
                let bytes = match payload {
                    Payload::Empty => Bytes::new(),
                    Payload::Buffered(bytes) => bytes,
                    Payload::Stream(_) => {
                        return Err(ProxyError::MalformedRequest(
                            "a streamed body cannot be signed",
                        ));
                    }
                };
                let project = project_of(path_and_query);
                credentials
                    .sign(
                        &method,
                        &uri,
                        &mut headers,
                        &bytes,
                        project,
                        std::time::SystemTime::now(),
                    )
                    .map_err(|_| ProxyError::MalformedRequest("request cannot be signed"))?;
                body::full(bytes)
            }
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// A cache fill: up to `1 + upstream.retries` attempts, each built afresh by `build` (so an
    /// aksk signature is dated per attempt), each bounded by `upstream.timeout` and all by
    /// `deadline`. Retries follow connect errors, timeouts, broken responses, 5xx and 429, after
    /// a jittered exponential backoff or the `Retry-After` upstream asked for, and only when that
    /// wait ends before `deadline`. Other 4xx are never retried: repeated failed signatures
    /// lock an AK for five minutes.
    pub async fn fetch(
        &self,
        build: impl Fn() -> Result<Request<Body>, ProxyError>,
        deadline: Instant,
    ) -> Result<Buffered, ProxyError> {
        let mut attempt = 0;
        loop {
            let result = self.attempt(build()?, deadline).await;
            let retryable = match &result {
                Ok(response) => {
                    response.status.is_server_error()
                        || response.status == http::StatusCode::TOO_MANY_REQUESTS
                }
                Err(UpstreamError::TooLarge { .. }) => false,
                Err(_) => true,
            };
            if !retryable || attempt >= self.retries {
                return result.map_err(ProxyError::from);
            }
            let wait = result
                .as_ref()
                .ok()
                .and_then(|response| retry_after(&response.headers))
                .unwrap_or_else(|| backoff(attempt));
            if Instant::now() + wait >= deadline {
                return result.map_err(ProxyError::from);
            }
            self.metrics.record_retry();
            tracing::debug!(attempt, ?wait, "retrying upstream");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One attempt, read in full within `upstream.timeout` (or less, if `deadline` is sooner)
    /// and `upstream.max_body`. Counted in `cph_cache_upstream_requests_total`.
    async fn attempt(
        &self,
        request: Request<Body>,
        deadline: Instant,
    ) -> Result<Buffered, UpstreamError> {
        let started = Instant::now();
        let limit = self
            .timeout
            .min(deadline.saturating_duration_since(started));
        let result = match tokio::time::timeout(limit, self.fetch_once(request)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout),
        };
        let label = match &result {
            Ok(response) => UpstreamResult::Status(response.status.as_u16()),
            Err(UpstreamError::Timeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.metrics
            .observe_upstream(label, started.elapsed().as_secs_f64());
        result
    }

    async fn fetch_once(&self, request: Request<Body>) -> Result<Buffered, UpstreamError> {
        let response = self.client.request(request).await.map_err(classify)?;
        let (parts, body) = response.into_parts();
        let limit = self.max_body;
        // A declared Content-Length over the limit fails before any of the body is read.
        if body.size_hint().lower() > limit as u64 {
            return Err(UpstreamError::TooLarge { limit });
        }
        let body: Bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<LengthLimitError>() {
                    UpstreamError::TooLarge { limit }
                } else {
                    UpstreamError::Protocol(format!("reading body: {error}"))
                }
            })?
            .to_bytes();
        Ok(Buffered {
            status: parts.status,
            headers: end_to_end(&parts.headers),
            body,
        })
    }

    /// Forwards a request and returns the response head within `upstream.timeout`; the body is
    /// streamed to the caller as it arrives (passthrough and cache bypass).
    pub async fn forward(
        &self,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(classify)?;
        let headers = end_to_end(response.headers());
        *response.headers_mut() = headers;
        Ok(response)
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Full jitter over an exponential step: uniform in [step/2, step), step = 100 ms × 2^attempt.
fn backoff(attempt: u32) -> Duration {
    let step = BACKOFF_BASE.saturating_mul(2u32.saturating_pow(attempt.min(16)));
    step.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// The project of a `/v1/{project_id}/...` path, sent as `X-Project-Id` when signing.
fn project_of(path_and_query: &str) -> Option<&str> {
    let (project, _) = path_and_query.strip_prefix("/v1/")?.split_once('/')?;
    (!project.is_empty()).then_some(project)
}

/// A copy of `headers` without hop-by-hop headers, including those named in `Connection`.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if HOP_BY_HOP.contains(name) || header::UPGRADE == name || named.contains(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

fn classify(error: hyper_util::client::legacy::Error) -> UpstreamError {
    // The error chain names hosts and io errors, never headers, so it is safe to show.
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_connect() {
        UpstreamError::Connect(reason)
    } else {
        UpstreamError::Protocol(reason)
    }
}

/// Trusted roots: Mozilla's (webpki-roots), the system's, and `ca_file` if set.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ClientInitError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A container without a system store is normal; webpki roots cover the public endpoint.
    let native = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let ca_error = |reason: String| ClientInitError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_error(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("no PEM certificates in file".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientInitError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let soon = std::time::SystemTime::now() + Duration::from_secs(30);
        headers.insert(
            "retry-after",
            httpdate::fmt_http_date(soon).parse().unwrap(),
        );
        let wait = retry_after(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(27) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        headers.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn backoff_grows_with_jitter() {
        for attempt in 0..4 {
            let step = BACKOFF_BASE * 2u32.pow(attempt);
            let wait = backoff(attempt);
            assert!(wait >= step / 2 && wait < step, "{attempt}: {wait:?}");
        }
    }

    #[test]
    fn drops_hop_by_hop_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-secret-hop", "1".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("upgrade", "h2c".parse().unwrap());
        headers.insert("x-auth-token", "t".parse().unwrap());
        headers.append("accept", "a".parse().unwrap());
        headers.append("accept", "b".parse().unwrap());
        let out = end_to_end(&headers);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-auth-token", "accept"]);
        assert_eq!(out.get_all("accept").iter().count(), 2);
    }
}
