//! A stored response, assembled once so that a hit costs a header-map clone and a `Bytes` clone.
//!
//! Storing parses the body once, to check that it is a CPH image list and to compute the ETag;
//! a hit never parses, formats or locks anything except the `Age` value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::body::{self, Body};
use crate::cache::outcome::CacheOutcome;
use crate::config::Freshness;

pub const CACHE_STATUS: &str = "cache-status";

/// Upstream headers that describe one exchange rather than the stored representation.
const NOT_STORED: [&str; 6] = [
    "date",
    "set-cookie",
    "age",
    "etag",
    "cache-status",
    "content-length",
];

/// An upstream response read in full.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Buffered {
    /// Relays this response unchanged, adding only `Cache-Status`.
    pub fn respond(&self, outcome: CacheOutcome) -> Response<Body> {
        let mut response = Response::new(body::full(self.body.clone()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers.clone();
        response.headers_mut().remove(header::CONTENT_LENGTH);
        response
            .headers_mut()
            .insert(CACHE_STATUS, outcome.cache_status());
        response
    }
}

/// One cached image list.
#[derive(Debug)]
pub struct Entry {
    stored_at: Instant,
    /// Upstream end-to-end headers plus our `ETag`, ready to clone into a response.
    head: HeaderMap,
    etag: HeaderValue,
    body: Bytes,
    /// How long the store keeps this entry (ttl plus the stale windows at store time).
    retain_for: Duration,
    /// In [0, 1): how much earlier than `refresh_ahead × ttl` this entry starts its refresh, so
    /// that sidecars that stored the same list at the same moment do not refresh in lockstep.
    refresh_jitter: f64,
    hits: AtomicU64,
}

/// Where an entry stands in its life, judged at lookup time with the current config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Fresh; serve it.
    Fresh,
    /// Fresh, and old enough that a hit should start a background refresh.
    RefreshAhead,
    /// Past ttl, within stale-while-revalidate: serve it and refresh in the background.
    Revalidate,
    /// Past that, within stale-if-error: go upstream, fall back to it if upstream fails.
    IfError,
    /// Too old to serve at all.
    Expired,
}

/// At most 10 % earlier than `refresh_ahead × ttl`.
const MAX_REFRESH_JITTER: f64 = 0.1;

/// Why an upstream 200 was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStorable {
    NotJson,
    NotAnImageList,
}

impl Entry {
    /// Builds an entry from an upstream 200 whose body is a JSON object with a `phone_images`
    /// array; anything else is not storable.
    pub fn from_upstream(response: &Buffered, retain_for: Duration) -> Result<Self, NotStorable> {
        let etag = image_list_etag(&response.body)?;
        let mut head = response.headers.clone();
        for name in NOT_STORED {
            head.remove(name);
        }
        head.insert(header::ETAG, etag.clone());
        Ok(Self {
            stored_at: Instant::now(),
            head,
            etag,
            body: response.body.clone(),
            retain_for,
            refresh_jitter: rand::random::<f64>() * MAX_REFRESH_JITTER,
            hits: AtomicU64::new(0),
        })
    }

    pub fn age(&self) -> Duration {
        self.stored_at.elapsed()
    }

    /// Where the entry stands at `age` (from [`Entry::age`], read once per request).
    pub fn staleness(&self, age: Duration, freshness: &Freshness) -> Staleness {
        let ttl = freshness.ttl;
        if age < ttl {
            let ahead = freshness.refresh_ahead * (1.0 - self.refresh_jitter);
            if freshness.refresh_ahead > 0.0 && age >= ttl.mul_f64(ahead) {
                return Staleness::RefreshAhead;
            }
            return Staleness::Fresh;
        }
        let revalidate_until = ttl + freshness.stale_while_revalidate;
        if age < revalidate_until {
            Staleness::Revalidate
        } else if age < revalidate_until + freshness.stale_if_error {
            Staleness::IfError
        } else {
            Staleness::Expired
        }
    }

    pub fn retain_for(&self) -> Duration {
        self.retain_for
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.etag
    }

    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn record_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// What the store charges against `cache.max_size`: the body, plus a rough header size.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .head
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        u32::try_from(self.body.len() + headers).unwrap_or(u32::MAX)
    }

    /// The response for a caller: the stored head and body plus `Age` and `Cache-Status`, or a
    /// 304 when `If-None-Match` matches. HEAD needs nothing special: hyper sends the headers
    /// (with the body's `Content-Length`) and drops the body.
    pub fn respond(
        &self,
        outcome: CacheOutcome,
        age: Duration,
        if_none_match: Option<&HeaderValue>,
    ) -> Response<Body> {
        let age = HeaderValue::from(age.as_secs());
        if if_none_match.is_some_and(|value| etag_matches(value, &self.etag)) {
            let mut response = Response::new(body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            let headers = response.headers_mut();
            headers.insert(header::ETAG, self.etag.clone());
            if let Some(id) = self.head.get("x-request-id") {
                headers.insert("x-request-id", id.clone());
            }
            headers.insert(header::AGE, age);
            headers.insert(CACHE_STATUS, outcome.cache_status());
            return response;
        }
        let mut response = Response::new(body::full(self.body.clone()));
        let headers = response.headers_mut();
        *headers = self.head.clone();
        headers.insert(header::AGE, age);
        headers.insert(CACHE_STATUS, outcome.cache_status());
        response
    }
}

/// A strong ETag over the image list without `request_id`: the body is parsed, `request_id`
/// removed, and the rest hashed in serde_json's canonical (key-sorted) form, so a refresh that
/// returns the same images under a new request id keeps its ETag.
pub fn image_list_etag(body: &[u8]) -> Result<HeaderValue, NotStorable> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| NotStorable::NotJson)?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(NotStorable::NotAnImageList);
    };
    if !object.get("phone_images").is_some_and(|v| v.is_array()) {
        return Err(NotStorable::NotAnImageList);
    }
    object.remove("request_id");
    let canonical = serde_json::Value::Object(object).to_string();
    let digest = Sha256::digest(canonical.as_bytes());
    let tag = format!("\"{}\"", hex::encode(&digest[..16]));
    HeaderValue::from_str(&tag).map_err(|_| NotStorable::NotAnImageList)
}

/// `If-None-Match` uses the weak comparison (RFC 9110 §13.1.2): `*`, or any listed tag equal to
/// ours once a `W/` prefix is ignored.
fn etag_matches(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = if_none_match.to_str() else {
        return false;
    };
    let ours = etag.as_bytes();
    list.split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/").as_bytes() == ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffered(body: &str) -> Buffered {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-request-id", "abc".parse().unwrap());
        headers.insert("set-cookie", "s=1".parse().unwrap());
        Buffered {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn etag_ignores_request_id_only() {
        let a = image_list_etag(br#"{"phone_images":[{"image_id":"1"}],"request_id":"aa"}"#);
        let b = image_list_etag(br#"{"request_id":"bb","phone_images":[{"image_id":"1"}]}"#);
        let c = image_list_etag(br#"{"phone_images":[{"image_id":"2"}],"request_id":"aa"}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn only_image_lists_are_storable() {
        let keep = Duration::from_secs(1);
        assert!(Entry::from_upstream(&buffered(r#"{"phone_images":[]}"#), keep).is_ok());
        assert_eq!(
            Entry::from_upstream(&buffered(r#"{"phone_images":{}}"#), keep).err(),
            Some(NotStorable::NotAnImageList)
        );
        assert_eq!(
            Entry::from_upstream(&buffered(r#"[1]"#), keep).err(),
            Some(NotStorable::NotAnImageList)
        );
        assert_eq!(
            Entry::from_upstream(&buffered(r#"{"phone_images":["#), keep).err(),
            Some(NotStorable::NotJson)
        );
    }

    #[test]
    fn response_has_stored_head_and_no_cookie() {
        let entry =
            Entry::from_upstream(&buffered(r#"{"phone_images":[]}"#), Duration::ZERO).unwrap();
        let response = entry.respond(CacheOutcome::Hit, Duration::ZERO, None);
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(headers["cache-status"], "cph-cache; hit");
        assert_eq!(headers["x-request-id"], "abc");
        assert_eq!(headers["etag"], entry.etag());
        assert_eq!(headers["age"], "0");
        assert!(headers.get("set-cookie").is_none());
    }

    #[test]
    fn staleness_windows() {
        let entry =
            Entry::from_upstream(&buffered(r#"{"phone_images":[]}"#), Duration::ZERO).unwrap();
        let windows = |ttl_ms: u64, swr_ms: u64, sie_ms: u64, ahead: f64| Freshness {
            ttl: Duration::from_millis(ttl_ms),
            stale_while_revalidate: Duration::from_millis(swr_ms),
            stale_if_error: Duration::from_millis(sie_ms),
            refresh_ahead: ahead,
        };
        let second = Duration::from_secs(1);
        assert_eq!(
            entry.staleness(second, &windows(60_000, 0, 0, 0.8)),
            Staleness::Fresh
        );
        assert_eq!(
            entry.staleness(second, &windows(60_000, 0, 0, 0.0)),
            Staleness::Fresh
        );
        assert_eq!(
            entry.staleness(second, &windows(60_000, 0, 0, 0.000_01)),
            Staleness::RefreshAhead
        );
        assert_eq!(
            entry.staleness(second, &windows(1, 60_000, 0, 0.8)),
            Staleness::Revalidate
        );
        assert_eq!(
            entry.staleness(second, &windows(1, 0, 60_000, 0.8)),
            Staleness::IfError
        );
        assert_eq!(
            entry.staleness(second, &windows(1, 1, 1, 0.8)),
            Staleness::Expired
        );
    }

    #[test]
    fn if_none_match() {
        let entry =
            Entry::from_upstream(&buffered(r#"{"phone_images":[]}"#), Duration::ZERO).unwrap();
        let tag = entry.etag().to_str().unwrap().to_owned();
        for matching in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            let response = entry.respond(
                CacheOutcome::Hit,
                Duration::ZERO,
                Some(&matching.parse().unwrap()),
            );
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{matching}");
        }
        let response = entry.respond(
            CacheOutcome::Hit,
            Duration::ZERO,
            Some(&"\"other\"".parse().unwrap()),
        );
        assert_eq!(response.status(), StatusCode::OK);
    }
}
