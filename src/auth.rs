//! Credentials: callers' tokens reduced to keyed hashes, the set of hashes upstream has
//! vouched for, and the sidecar's own secrets (AK/SK, client token) read from the environment.
//!
//! The cached route never keeps a token. It keeps `HMAC-SHA256(k, token)` where `k` is drawn at
//! random when the process starts, so a hash is useless outside this process (it cannot be
//! looked up against a list of tokens) and cannot be logged in a form that identifies a token.
//! Secrets are held in types whose `Debug` prints `***` and that have no `Display`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::cache::key::ProjectId;
use crate::config::{AuthConfig, AuthMode, ConfigError};
use crate::upstream::sign;

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
    /// HMAC keyed once with 64 random bytes (one SHA-256 block); each hash starts from a clone of this state,
    /// which skips re-deriving the inner and outer pads per request.
    keyed: Hmac<Sha256>,
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
        let key: [u8; 64] = rand::random();
        Self {
            keyed: <Hmac<Sha256> as hmac::digest::KeyInit>::new(&key.into()),
        }
    }

    pub fn hash(&self, credential: &[u8]) -> CredentialHash {
        let mut mac = self.keyed.clone();
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

/// The credential hashes that upstream answered 200 for, per project, for `auth.verify_ttl`
/// (share = "verified"). A 401/403 removes a hash at once.
#[derive(Clone)]
pub struct VerifiedCredentials {
    verified: moka::sync::Cache<(ProjectId, CredentialHash), ()>,
}

impl VerifiedCredentials {
    /// `capacity` bounds memory whatever the number of distinct tokens seen.
    pub fn new(verify_ttl: Duration, capacity: u64) -> Self {
        Self {
            verified: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(verify_ttl)
                .build(),
        }
    }

    pub fn is_verified(&self, project: &ProjectId, hash: CredentialHash) -> bool {
        self.verified.contains_key(&(project.clone(), hash))
    }

    pub fn verify(&self, project: &ProjectId, hash: CredentialHash) {
        self.verified.insert((project.clone(), hash), ());
    }

    pub fn revoke(&self, project: &ProjectId, hash: CredentialHash) {
        self.verified.invalidate(&(project.clone(), hash));
    }
}

/// The value callers must send as `X-Auth-Token` in aksk mode with `client_token_env` set.
#[derive(Clone)]
pub struct ClientToken(Vec<u8>);

impl std::fmt::Debug for ClientToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientToken(***)")
    }
}

impl ClientToken {
    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        Self(token.into())
    }

    /// Whether the request carries the token; compared in constant time, so response timing
    /// tells nothing about how much of a guess was right.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        headers
            .get(X_AUTH_TOKEN)
            .is_some_and(|sent| bool::from(sent.as_bytes().ct_eq(&self.0)))
    }
}

/// The sidecar's own secrets, resolved once at start-up from the env vars the config names.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// aksk mode: what every upstream request is signed with.
    pub signing: Option<sign::Credentials>,
    /// aksk mode with `client_token_env`: what callers must present.
    pub client_token: Option<ClientToken>,
}

impl Secrets {
    /// Reads the variables named by `[auth]` from the process environment.
    pub fn from_env(auth: &AuthConfig) -> Result<Self, ConfigError> {
        Self::resolve(auth, |name| std::env::var(name).ok())
    }

    /// Resolves the secrets with `lookup` for env vars; a missing or empty variable is a config
    /// error naming the key and the variable (never its value).
    pub fn resolve(
        auth: &AuthConfig,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        if auth.mode != AuthMode::Aksk {
            return Ok(Self::default());
        }
        let required = |key: &str, name: &str| {
            lookup(name)
                .filter(|value| !value.is_empty())
                .ok_or_else(|| ConfigError {
                    key: Some(key.to_owned()),
                    line: None,
                    message: format!("environment variable {name} is not set or empty"),
                })
        };
        let access_key = required("auth.access_key_env", &auth.access_key_env)?;
        let secret_key = required("auth.secret_key_env", &auth.secret_key_env)?;
        let security_token = match &auth.security_token_env {
            Some(name) => Some(required("auth.security_token_env", name)?),
            None => None,
        };
        let client_token = match &auth.client_token_env {
            Some(name) => Some(ClientToken::new(required("auth.client_token_env", name)?)),
            None => None,
        };
        Ok(Self {
            signing: Some(sign::Credentials::new(
                access_key,
                secret_key,
                security_token,
            )),
            client_token,
        })
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
    fn verified_credentials_expire_and_revoke() {
        let hasher = CredentialHasher::new();
        let verified = VerifiedCredentials::new(Duration::from_secs(60), 100);
        let p = ProjectId::parse("p1").unwrap();
        let q = ProjectId::parse("p2").unwrap();
        let h = hasher.hash(b"t1");
        assert!(!verified.is_verified(&p, h));
        verified.verify(&p, h);
        assert!(verified.is_verified(&p, h));
        assert!(!verified.is_verified(&q, h), "verification is per project");
        verified.revoke(&p, h);
        assert!(!verified.is_verified(&p, h));
    }

    #[test]
    fn client_token_comparison() {
        let token = ClientToken::new("s3cret");
        let mut headers = HeaderMap::new();
        assert!(!token.admits(&headers));
        headers.insert(X_AUTH_TOKEN, "s3cre".parse().unwrap());
        assert!(!token.admits(&headers));
        headers.insert(X_AUTH_TOKEN, "s3cret".parse().unwrap());
        assert!(token.admits(&headers));
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn secrets_name_the_missing_variable() {
        let toml = "[server]\nlisten = \"127.0.0.1:8080\"\n[upstream]\nendpoint = \"http://x\"\n[auth]\nmode = \"aksk\"\nclient_token_env = \"MY_CLIENT_TOKEN\"\n";
        let config = crate::config::Config::from_toml_str(toml).unwrap();
        let env = |present: &'static [&'static str]| {
            move |name: &str| present.contains(&name).then(|| format!("value-of-{name}"))
        };
        let error = Secrets::resolve(&config.auth, env(&["CPH_ACCESS_KEY"])).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("auth.secret_key_env"));
        assert!(error.to_string().contains("CPH_SECRET_KEY"));
        let error =
            Secrets::resolve(&config.auth, env(&["CPH_ACCESS_KEY", "CPH_SECRET_KEY"])).unwrap_err();
        assert!(error.to_string().contains("MY_CLIENT_TOKEN"));
        let secrets = Secrets::resolve(
            &config.auth,
            env(&["CPH_ACCESS_KEY", "CPH_SECRET_KEY", "MY_CLIENT_TOKEN"]),
        )
        .unwrap();
        assert!(secrets.signing.is_some() && secrets.client_token.is_some());
        assert!(!format!("{secrets:?}").contains("value-of-CPH_SECRET_KEY"));
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
