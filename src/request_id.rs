//! Request ids in CPH's format (32 lower-case hex characters) for the proxy's own responses.

use http::HeaderValue;

/// A random 128-bit id rendered as 32 lower-case hex characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    pub fn random() -> Self {
        Self(hex::encode(rand::random::<[u8; 16]>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn header_value(&self) -> HeaderValue {
        // Hex digits are always a valid header value; the fallback is unreachable in practice.
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}
