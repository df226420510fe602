//! The response store: a moka future cache weighted by body bytes, with purge that wins races.
//!
//! moka owns capacity (TinyLFU admission, `cache.max_size` by weight) and removal: each entry is
//! kept for its ttl plus both stale windows, as computed when it was stored; whether it is fresh
//! is judged at lookup time against the current config (see `proxy.rs`). Removals are counted in
//! `cph_cache_evictions_total` by cause.
//!
//! Purges and fills are ordered by an epoch under a `RwLock` that only fills and purges take
//! (never a lookup): a fill whose flight started before a purge is dropped instead of stored, so
//! an in-flight fetch cannot resurrect a purged project.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use tokio::sync::RwLock;

use crate::cache::entry::Entry;
use crate::cache::key::{CacheKey, ProjectId};
use crate::metrics::{EvictionCause, Metrics};

/// The purge generation a fill started in; see [`Store::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch(u64);

pub struct Store {
    cache: Cache<CacheKey, Arc<Entry>>,
    epoch: AtomicU64,
    purge_lock: RwLock<()>,
}

/// Keeps each entry for its own `retain_for` from when it was stored.
struct RetainFor;

impl Expiry<CacheKey, Arc<Entry>> for RetainFor {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(entry.retain_for())
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.retain_for())
    }
}

impl Store {
    pub fn new(max_size: u64, metrics: Metrics) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_size)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| entry.weight())
            .expire_after(RetainFor)
            .eviction_listener(move |_key, _entry, cause| {
                let cause = match cause {
                    RemovalCause::Size => EvictionCause::Size,
                    RemovalCause::Expired => EvictionCause::Expired,
                    RemovalCause::Explicit => EvictionCause::Purged,
                    // A refresh that stores a new entry for the same key evicts nothing.
                    RemovalCause::Replaced => return,
                };
                metrics.record_eviction(cause);
            })
            .build();
        Self {
            cache,
            epoch: AtomicU64::new(0),
            purge_lock: RwLock::new(()),
        }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.get(key).await
    }

    /// The epoch to hand to [`Store::insert`]: take it before the upstream call starts.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// Stores `entry` unless a purge happened since `started`; returns whether it was stored.
    pub async fn insert(&self, key: CacheKey, entry: Arc<Entry>, started: Epoch) -> bool {
        let _fill = self.purge_lock.read().await;
        if self.epoch() != started {
            return false;
        }
        self.cache.insert(key, entry).await;
        true
    }

    /// Drops every entry of `project`, effective for the next lookup.
    pub async fn purge_project(&self, project: &ProjectId) {
        let _purge = self.purge_lock.write().await;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let doomed: Vec<Arc<CacheKey>> = self
            .cache
            .iter()
            .filter(|(key, _)| &key.project == project)
            .map(|(key, _)| key)
            .collect();
        for key in doomed {
            self.cache.invalidate(key.as_ref()).await;
        }
    }

    /// Drops every entry, effective for the next lookup.
    pub async fn purge_all(&self) {
        let _purge = self.purge_lock.write().await;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        self.cache.run_pending_tasks().await;
    }

    /// A snapshot for `GET /cache`.
    pub fn snapshot(&self) -> Vec<(Arc<CacheKey>, Arc<Entry>)> {
        self.cache.iter().collect()
    }

    /// Entry count and weighted size, after applying pending maintenance so they are exact.
    pub async fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}
