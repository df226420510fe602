//! What identifies a cached response: project, normalised query and credential scope.
//!
//! These newtypes are built once per request at the edge of the cached route (`route.rs`,
//! `auth.rs`) and are the only form in which a project id, a query or a credential travel through
//! the cache, so an unvalidated string can never become a key.

use std::fmt;
use std::sync::Arc;

use crate::auth::CredentialHash;

/// A CPH project id as found in the path: `[A-Za-z0-9_-]{1,64}`.
///
/// Real ids are 32 lower-case hex characters; the wider alphabet keeps test and staging ids
/// usable while still ruling out `..`, `/`, `%` and everything else that could change the
/// upstream path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectId(Arc<str>);

impl ProjectId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Option<Self> {
        let valid = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        valid.then(|| Self(Arc::from(raw)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A query string with its `&`-separated pairs sorted by key, then value; values are kept as
/// sent (no percent-decoding), empty pairs dropped, so `?b=2&a=1`, `?a=1&b=2&` and `?a=1&&b=2`
/// are one key and an empty `?` is the same as none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NormalizedQuery(Arc<str>);

impl NormalizedQuery {
    pub fn from_raw(raw: Option<&str>) -> Self {
        let mut segments: Vec<&str> = raw
            .unwrap_or("")
            .split('&')
            .filter(|segment| !segment.is_empty())
            .collect();
        // Sort by (key, value); a segment without `=` sorts as an empty value but is kept as sent.
        segments.sort_unstable_by(|a, b| split_pair(a).cmp(&split_pair(b)).then_with(|| a.cmp(b)));
        Self(Arc::from(segments.join("&")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn split_pair(segment: &str) -> (&str, &str) {
    segment.split_once('=').unwrap_or((segment, ""))
}

/// Whose view of the project a cached entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialScope {
    /// One identity for every caller: aksk mode, or a shared entry that callers read only after
    /// their credential has been verified.
    Shared,
    /// The entry belongs to one credential, named by its keyed hash (never the credential).
    Credential(CredentialHash),
}

/// The key of one cached response.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub project: ProjectId,
    pub query: NormalizedQuery,
    pub scope: CredentialScope,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids() {
        assert!(ProjectId::parse("0123456789abcdef0123456789abcdef").is_some());
        assert!(ProjectId::parse("my_project-1").is_some());
        assert!(ProjectId::parse(&"a".repeat(64)).is_some());
        for bad in ["", "..", ".", "a%2Fb", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(ProjectId::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn query_normalisation() {
        let n = |q: Option<&str>| NormalizedQuery::from_raw(q).as_str().to_owned();
        assert_eq!(n(None), "");
        assert_eq!(n(Some("")), "");
        assert_eq!(n(Some("&&")), "");
        assert_eq!(n(Some("b=2&a=1")), "a=1&b=2");
        assert_eq!(n(Some("a=1&b=2&")), "a=1&b=2");
        assert_eq!(n(Some("a=2&a=1&a=10")), "a=1&a=10&a=2");
        assert_eq!(n(Some("image_type=private")), "image_type=private");
        // values are kept as sent, not decoded
        assert_eq!(n(Some("x=%41&x=A")), "x=%41&x=A");
        assert_eq!(n(Some("flag&a=1")), "a=1&flag");
        assert_ne!(n(Some("a=1")), n(Some("a=2")));
    }
}
