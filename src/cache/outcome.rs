//! How a cached-route request was answered. One value drives the `Cache-Status` header, the
//! `cache` metric label and the log field, so the three can never disagree.

use http::HeaderValue;

/// The `cache` label of `cph_cache_requests_total` and `cph_cache_request_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheLabel {
    Hit,
    Stale,
    Miss,
    Collapsed,
    Bypass,
    Error,
}

impl CacheLabel {
    pub const ALL: [CacheLabel; 6] = [
        Self::Hit,
        Self::Stale,
        Self::Miss,
        Self::Collapsed,
        Self::Bypass,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::Miss => "miss",
            Self::Collapsed => "collapsed",
            Self::Bypass => "bypass",
            Self::Error => "error",
        }
    }

    /// Position in [`Self::ALL`], for per-label arrays on the hot path.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The outcome of one cached-route request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from a fresh entry.
    Hit,
    /// Served from an entry past its TTL.
    Stale,
    /// This request's upstream call returned a storable image list, now stored.
    Stored,
    /// Waited on another request's upstream call and got its stored result.
    Collapsed,
    /// Upstream answered something we do not store; relayed unchanged.
    Relayed { status: u16, collapsed: bool },
    /// Not eligible for the cache (no credential we can key or verify); forwarded as is.
    Bypass,
    /// Answered with the proxy's own error body after trying upstream.
    Error { collapsed: bool },
}

impl CacheOutcome {
    pub fn label(self) -> CacheLabel {
        match self {
            Self::Hit => CacheLabel::Hit,
            Self::Stale => CacheLabel::Stale,
            Self::Stored
            | Self::Relayed {
                collapsed: false, ..
            } => CacheLabel::Miss,
            Self::Collapsed
            | Self::Relayed {
                collapsed: true, ..
            } => CacheLabel::Collapsed,
            Self::Bypass => CacheLabel::Bypass,
            Self::Error { .. } => CacheLabel::Error,
        }
    }

    /// The RFC 9211 `Cache-Status` value.
    pub fn cache_status(self) -> HeaderValue {
        match self {
            Self::Hit => HeaderValue::from_static("cph-cache; hit"),
            Self::Stale => HeaderValue::from_static("cph-cache; fwd=stale"),
            Self::Stored => HeaderValue::from_static("cph-cache; fwd=miss; stored"),
            Self::Collapsed => HeaderValue::from_static("cph-cache; fwd=miss; collapsed"),
            Self::Relayed { status, collapsed } => {
                let collapsed = if collapsed { "; collapsed" } else { "" };
                HeaderValue::from_str(&format!(
                    "cph-cache; fwd=miss; fwd-status={status}{collapsed}"
                ))
                .unwrap_or_else(|_| HeaderValue::from_static("cph-cache; fwd=miss"))
            }
            Self::Bypass => HeaderValue::from_static("cph-cache; fwd=bypass"),
            Self::Error { collapsed: false } => HeaderValue::from_static("cph-cache; fwd=miss"),
            Self::Error { collapsed: true } => {
                HeaderValue::from_static("cph-cache; fwd=miss; collapsed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_index_their_position() {
        for (i, label) in CacheLabel::ALL.iter().enumerate() {
            assert_eq!(label.index(), i);
        }
    }

    #[test]
    fn cache_status_values() {
        assert_eq!(CacheOutcome::Hit.cache_status(), "cph-cache; hit");
        assert_eq!(
            CacheOutcome::Relayed {
                status: 503,
                collapsed: false
            }
            .cache_status(),
            "cph-cache; fwd=miss; fwd-status=503"
        );
        assert_eq!(
            CacheOutcome::Relayed {
                status: 403,
                collapsed: true
            }
            .label(),
            CacheLabel::Collapsed
        );
    }
}
