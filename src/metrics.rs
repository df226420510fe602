//! Prometheus metrics (SPEC §6), registered on an injected [`Registry`] so each test has its own.
//!
//! Labels come from enums only, never from a project id, token or path. The per-outcome request
//! counters and histograms are resolved once here, so the hot path does an atomic add and a
//! histogram observe with no label lookup. Gauges that summarise state (`hit_ratio`, `entries`,
//! `size_bytes`) are computed when `/metrics` is scraped rather than on every request.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::cache::outcome::CacheLabel;

/// 100 µs to 10 s: a hit is well under a millisecond, an upstream call 100 ms or more.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why an entry left the cache (`cph_cache_evictions_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionCause {
    Size,
    Expired,
    Purged,
}

/// Why a background refresh started (`cph_cache_refreshes_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshReason {
    /// A hit at age >= refresh_ahead × ttl.
    Ahead,
    /// A stale entry served within stale-while-revalidate.
    Stale,
}

/// The outcome of one upstream attempt (`cph_cache_upstream_requests_total{code}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamResult {
    Status(u16),
    Error,
    Timeout,
}

#[derive(Clone)]
pub struct Metrics {
    requests: [IntCounter; 6],
    request_duration: [Histogram; 6],
    hit_ratio: Gauge,
    upstream_requests: IntCounterVec,
    upstream_duration: Histogram,
    refreshes: IntCounterVec,
    upstream_retries: IntCounter,
    content_changes: IntCounter,
    entries: IntGauge,
    size_bytes: IntGauge,
    evictions: [IntCounter; 3],
    passthrough_requests: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "cph_cache_requests_total",
                "Cached-route requests by how they were answered.",
            ),
            &["cache"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "cph_cache_request_duration_seconds",
                "Time to answer a cached-route request (to the response head), by cache outcome.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["cache"],
        )?;
        let hit_ratio = Gauge::new(
            "cph_cache_hit_ratio",
            "(hit + stale + collapsed) / cached-route requests not answered with an error, since start.",
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "cph_cache_upstream_requests_total",
                "Upstream attempts by HTTP status, or error / timeout.",
            ),
            &["code"],
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "cph_cache_upstream_request_duration_seconds",
                "Duration of upstream attempts for the cached route.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let refreshes = IntCounterVec::new(
            Opts::new(
                "cph_cache_refreshes_total",
                "Background refreshes started, by reason.",
            ),
            &["reason"],
        )?;
        let upstream_retries = IntCounter::new(
            "cph_cache_upstream_retries_total",
            "Upstream attempts that were retries of a failed attempt.",
        )?;
        let content_changes = IntCounter::new(
            "cph_cache_content_changes_total",
            "Refreshes whose image list differed from the one they replaced (a new ETag).",
        )?;
        let entries = IntGauge::new("cph_cache_entries", "Entries in the cache.")?;
        let size_bytes = IntGauge::new(
            "cph_cache_size_bytes",
            "Weighted size of the cache (body bytes plus headers).",
        )?;
        let evictions = IntCounterVec::new(
            Opts::new(
                "cph_cache_evictions_total",
                "Entries removed from the cache, by cause.",
            ),
            &["cause"],
        )?;
        let passthrough_requests = IntCounterVec::new(
            Opts::new(
                "cph_cache_passthrough_requests_total",
                "Requests forwarded unchanged on other paths, by upstream status or error.",
            ),
            &["code"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("cph_cache_build_info", "Build information; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(hit_ratio.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(refreshes.clone()))?;
        registry.register(Box::new(upstream_retries.clone()))?;
        registry.register(Box::new(content_changes.clone()))?;
        registry.register(Box::new(entries.clone()))?;
        registry.register(Box::new(size_bytes.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(passthrough_requests.clone()))?;
        registry.register(Box::new(build_info))?;

        // Every series exists from the start, at zero, so rates and ratios work from the first scrape.
        for reason in ["ahead", "stale"] {
            refreshes.with_label_values(&[reason]);
        }
        Ok(Self {
            requests: CacheLabel::ALL.map(|l| requests.with_label_values(&[l.as_str()])),
            request_duration: CacheLabel::ALL
                .map(|l| request_duration.with_label_values(&[l.as_str()])),
            hit_ratio,
            upstream_requests,
            upstream_duration,
            refreshes,
            upstream_retries,
            content_changes,
            entries,
            size_bytes,
            evictions: ["size", "expired", "purged"].map(|c| evictions.with_label_values(&[c])),
            passthrough_requests,
        })
    }

    pub fn observe_request(&self, label: CacheLabel, seconds: f64) {
        self.requests[label.index()].inc();
        self.request_duration[label.index()].observe(seconds);
    }

    pub fn observe_upstream(&self, result: UpstreamResult, seconds: f64) {
        self.upstream_requests
            .with_label_values(&[&result.label()])
            .inc();
        self.upstream_duration.observe(seconds);
    }

    pub fn observe_passthrough(&self, result: UpstreamResult) {
        self.passthrough_requests
            .with_label_values(&[&result.label()])
            .inc();
    }

    pub fn record_refresh(&self, reason: RefreshReason) {
        let reason = match reason {
            RefreshReason::Ahead => "ahead",
            RefreshReason::Stale => "stale",
        };
        self.refreshes.with_label_values(&[reason]).inc();
    }

    pub fn record_retry(&self) {
        self.upstream_retries.inc();
    }

    pub fn record_content_change(&self) {
        self.content_changes.inc();
    }

    pub fn record_eviction(&self, cause: EvictionCause) {
        let index = match cause {
            EvictionCause::Size => 0,
            EvictionCause::Expired => 1,
            EvictionCause::Purged => 2,
        };
        self.evictions[index].inc();
    }

    /// Brings the summary gauges up to date; called just before each scrape is encoded.
    pub fn update_gauges(&self, entries: u64, size_bytes: u64) {
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.size_bytes
            .set(i64::try_from(size_bytes).unwrap_or(i64::MAX));
        let count = |label: CacheLabel| self.requests[label.index()].get();
        let served =
            count(CacheLabel::Hit) + count(CacheLabel::Stale) + count(CacheLabel::Collapsed);
        let eligible = served + count(CacheLabel::Miss) + count(CacheLabel::Bypass);
        let ratio = if eligible == 0 {
            0.0
        } else {
            served as f64 / eligible as f64
        };
        self.hit_ratio.set(ratio);
    }
}

impl UpstreamResult {
    fn label(self) -> String {
        match self {
            Self::Status(code) => code.to_string(),
            Self::Error => "error".to_owned(),
            Self::Timeout => "timeout".to_owned(),
        }
    }
}

/// Encodes the registry in the Prometheus text format 0.0.4.
pub fn encode(registry: &Registry) -> Result<String, prometheus::Error> {
    use prometheus::Encoder;
    let mut buffer = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buffer)?;
    String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_counts_served_over_non_error() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        metrics.update_gauges(0, 0);
        assert_eq!(metrics.hit_ratio.get(), 0.0);
        metrics.observe_request(CacheLabel::Miss, 0.1);
        metrics.observe_request(CacheLabel::Hit, 0.001);
        metrics.observe_request(CacheLabel::Collapsed, 0.1);
        metrics.observe_request(CacheLabel::Error, 0.1);
        metrics.update_gauges(1, 10);
        assert!((metrics.hit_ratio.get() - 2.0 / 3.0).abs() < 1e-9);
        let text = encode(&registry).unwrap();
        assert!(text.contains("cph_cache_requests_total{cache=\"hit\"} 1"));
        assert!(text.contains("cph_cache_entries 1"));
        assert!(text.contains("cph_cache_build_info{version="));
    }
}
