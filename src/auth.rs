//! Callers' credentials as the cache sees them: classified, and reduced to keyed hashes.
//!
//! The cached route never keeps a token. It keeps `HMAC-SHA256(k, token)` where `k` is drawn at
//! random when the process starts, so a hash is useless outside this process (it cannot be
//! looked up against a list of tokens) and cannot be logged in a form that identifies a token.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::Sha256;

pub const X_AUTH_TOKEN: &str = "x-auth-token";

/// A keyed hash of one credential. Debug shows only a short prefix, enough to tell two apart in
/// a test failure and far too little to guess anything from.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialHash([u8; 16]);

impl std::fmt::Debug for CredentialHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CredentialHash({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// Hashes credentials with a per-process random key.
#[derive(Clone)]
pub struct CredentialHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for CredentialHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialHasher(***)")
    }
}

impl Default for CredentialHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl CredentialHasher {
    pub fn new() -> Self {
        Self {
            key: rand::random(),
        }
    }

    pub fn hash(&self, credential: &[u8]) -> CredentialHash {
        // `new_from_slice` only fails for key lengths HMAC cannot take; 32 bytes always fits.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return CredentialHash([0; 16]);
        };
        mac.update(credential);
        let digest = mac.finalize().into_bytes();
        let mut truncated = [0; 16];
        truncated.copy_from_slice(&digest[..16]);
        CredentialHash(truncated)
    }
}

/// What a caller presented, as far as the cache is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// No `X-Auth-Token` and no `Authorization`.
    Anonymous,
    /// An `Authorization` header (AK/SK signed by the client). An access key id alone proves
    /// nothing and the signature covers this one request, so it cannot be checked locally.
    Signed,
    /// An `X-Auth-Token`, by its keyed hash.
    Token(CredentialHash),
}

impl Credential {
    pub fn from_headers(headers: &HeaderMap, hasher: &CredentialHasher) -> Self {
        if headers.contains_key(AUTHORIZATION) {
            return Self::Signed;
        }
        match headers.get(X_AUTH_TOKEN) {
            Some(token) if !token.is_empty() => Self::Token(hasher.hash(token.as_bytes())),
            _ => Self::Anonymous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_keyed_per_hasher() {
        let a = CredentialHasher::new();
        let b = CredentialHasher::new();
        assert_eq!(a.hash(b"token-1"), a.hash(b"token-1"));
        assert_ne!(a.hash(b"token-1"), a.hash(b"token-2"));
        assert_ne!(a.hash(b"token-1"), b.hash(b"token-1"));
        assert!(!format!("{:?}", a.hash(b"token-1")).contains("token"));
    }

    #[test]
    fn classifies_headers() {
        let hasher = CredentialHasher::new();
        let mut headers = HeaderMap::new();
        assert_eq!(
            Credential::from_headers(&headers, &hasher),
            Credential::Anonymous
        );
        headers.insert(X_AUTH_TOKEN, "t".parse().unwrap());
        assert_eq!(
            Credential::from_headers(&headers, &hasher),
            Credential::Token(hasher.hash(b"t"))
        );
        headers.insert(AUTHORIZATION, "SDK-HMAC-SHA256 Access=AK".parse().unwrap());
        assert_eq!(
            Credential::from_headers(&headers, &hasher),
            Credential::Signed
        );
    }
}
