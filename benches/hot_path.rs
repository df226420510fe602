//! Micro-benchmarks of the hit path's pieces: routing, credential hashing, the store lookup and
//! assembling the response from a stored entry. Run with `cargo bench --bench hot_path`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method, StatusCode, Uri};
use prometheus::Registry;

use cph_cache::auth::{Credential, CredentialHasher};
use cph_cache::cache::entry::{Buffered, Entry};
use cph_cache::cache::key::{CacheKey, CredentialScope, NormalizedQuery, ProjectId};
use cph_cache::cache::outcome::CacheOutcome;
use cph_cache::cache::store::Store;
use cph_cache::config::Passthrough;
use cph_cache::fake_cph::image_list_body;
use cph_cache::metrics::Metrics;
use cph_cache::route;

const PROJECT: &str = "0123456789abcdef0123456789abcdef";

fn stored_entry() -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        "application/json;charset=UTF-8".parse().unwrap(),
    );
    headers.insert(
        "x-request-id",
        "0123456789abcdef0123456789abcdef".parse().unwrap(),
    );
    let body = image_list_body(PROJECT, 0, "0123456789abcdef0123456789abcdef");
    let buffered = Buffered {
        status: StatusCode::OK,
        headers,
        body: Bytes::from(body),
    };
    Entry::from_upstream(&buffered, Duration::from_secs(3600)).unwrap()
}

fn hit_path(c: &mut Criterion) {
    let uri: Uri = format!("/v1/{PROJECT}/cloud-phone/phone-images?image_type=all")
        .parse()
        .unwrap();
    c.bench_function("route::classify (cached route)", |b| {
        b.iter(|| route::classify(black_box(&Method::GET), black_box(&uri), Passthrough::All))
    });

    let hasher = CredentialHasher::new();
    let mut headers = HeaderMap::new();
    headers.insert("x-auth-token", "MIIZ".repeat(1000).parse().unwrap());
    c.bench_function("Credential::from_headers (4 KB IAM token)", |b| {
        b.iter(|| Credential::from_headers(black_box(&headers), &hasher))
    });

    let entry = Arc::new(stored_entry());
    c.bench_function("Entry::respond (hit)", |b| {
        b.iter(|| entry.respond(CacheOutcome::Hit, entry.age(), None))
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let store = Store::new(64 << 20, metrics);
    let key = CacheKey {
        project: ProjectId::parse(PROJECT).unwrap(),
        query: NormalizedQuery::from_raw(Some("image_type=all")),
        scope: CredentialScope::Credential(hasher.hash(b"token")),
    };
    runtime.block_on(store.insert(key.clone(), Arc::clone(&entry), store.epoch()));
    c.bench_function("Store::get (present)", |b| {
        b.iter(|| runtime.block_on(store.get(black_box(&key))))
    });
}

criterion_group!(benches, hit_path);
criterion_main!(benches);
