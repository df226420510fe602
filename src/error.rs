//! The proxy's own errors, and the one place they become HTTP responses.
//!
//! Every error that cph-cache itself produces (as opposed to an upstream error it relays) is a
//! [`ProxyError`]. Its status, CPH-style `error_code` and message are decided here and nowhere
//! else, so the body shape of SPEC §4 cannot drift between call sites. Messages never carry
//! credentials: variants hold only what is safe to show a caller.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};
use crate::request_id::RequestId;

/// An error answered by the proxy itself, in CPH's error shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid project id: must match [A-Za-z0-9_-]{{1,64}}")]
    InvalidProjectId,
    #[error("malformed request: {0}")]
    MalformedRequest(&'static str),
    #[error("missing or wrong X-Auth-Token for this cache")]
    Unauthorized,
    #[error("route not served by this cache")]
    NotServed,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(String),
    #[error("upstream sent a bad response: {0}")]
    BadUpstreamResponse(String),
    #[error("upstream response body exceeds upstream.max_body ({limit} bytes)")]
    UpstreamBodyTooLarge { limit: usize },
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("request timed out after server.request_timeout")]
    RequestTimeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidProjectId | Self::MalformedRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotServed => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamUnreachable(_)
            | Self::BadUpstreamResponse(_)
            | Self::UpstreamBodyTooLarge { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout | Self::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `error_code` of the body: `CPHCACHE.` followed by the status.
    pub fn code(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "CPHCACHE.0400",
            StatusCode::UNAUTHORIZED => "CPHCACHE.0401",
            StatusCode::NOT_FOUND => "CPHCACHE.0404",
            StatusCode::METHOD_NOT_ALLOWED => "CPHCACHE.0405",
            StatusCode::BAD_GATEWAY => "CPHCACHE.0502",
            _ => "CPHCACHE.0504",
        }
    }

    /// The response a caller sees: CPH's error shape with a fresh request id, which is also
    /// sent as `X-Request-Id` so a caller can quote it in a log search.
    pub fn to_response(&self) -> Response<Body> {
        let request_id = RequestId::random();
        let json = serde_json::json!({
            "request_id": request_id.as_str(),
            "error_code": self.code(),
            "error_msg": self.to_string(),
        });
        let mut response = Response::new(body::full(Bytes::from(json.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-request-id", request_id.header_value());
        if let Self::MethodNotAllowed { allow } = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}
