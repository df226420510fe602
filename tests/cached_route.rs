#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

// The cached route end to end (SPEC §4-5): a real sidecar in front of the simulated CPH, both on
// 127.0.0.1:0. Every assertion is on something a caller or the upstream can observe: status,
// headers, bodies byte for byte, and the fake's exact request counters.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cph_cache::fake_cph::{self, AuthCheck, Failure, FakeCph};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use support::*;

/// What CPH (and the fake) send as the content type of an image list.
const IMAGES_CONTENT_TYPE: &str = "application/json;charset=UTF-8";
const TOKEN_B: &str = "token-two";

const STORED: &str = "cph-cache; fwd=miss; stored";
const HIT: &str = "cph-cache; hit";
const COLLAPSED: &str = "cph-cache; fwd=miss; collapsed";
const BYPASS: &str = "cph-cache; fwd=bypass";

fn request_id(reply: &Reply) -> String {
    reply
        .header("x-request-id")
        .expect("X-Request-Id header")
        .to_owned()
}

fn is_request_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The proxy's own error shape: status, CPHCACHE code, JSON content type, and a 32-hex
/// request id that is also the `X-Request-Id` header.
fn assert_proxy_error(reply: &Reply, status: u16, code: &str) {
    let text = String::from_utf8_lossy(&reply.body);
    assert_eq!(reply.status, status, "body: {text}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{text}"
    );
    let body = reply.json();
    assert_eq!(body["error_code"], code, "{text}");
    assert!(body["error_msg"].is_string(), "{text}");
    let id = body["request_id"].as_str().expect("request_id string");
    assert!(is_request_id(id), "request_id {id:?}");
    assert_eq!(reply.header("x-request-id"), Some(id));
}

/// The relayed body of an image list, checked against what the fake generated for the
/// request id in the header, and that id against the body's `request_id`.
fn assert_image_list(reply: &Reply, project: &str, version: u32) {
    assert_eq!(reply.status, StatusCode::OK);
    let id = request_id(reply);
    assert!(is_request_id(&id), "{id:?}");
    assert_eq!(reply.json()["request_id"], id.as_str());
    assert_eq!(
        reply.body,
        fake_cph::image_list_body(project, version, &id).as_bytes()
    );
}

/// Polls `check` every few milliseconds until it holds; fails after `limit`. Only for states
/// no event announces (a counter in the fake, an entry on the admin listener).
async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn cache_entries(h: &Harness) -> Vec<serde_json::Value> {
    let reply = h.admin_get("/cache").await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()["entries"]
        .as_array()
        .expect("entries array")
        .clone()
}

#[tokio::test]
async fn miss_then_hit() {
    let h = Harness::start("").await;
    let first = h.images(PROJECT).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.cache_status(), STORED);
    let second = h.images(PROJECT).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.cache_status(), HIT);

    assert_eq!(first.body, second.body);
    let stored_id = request_id(&first);
    assert_eq!(request_id(&second), stored_id);
    assert_eq!(second.json()["request_id"], stored_id.as_str());
    let etag = first.header("etag").expect("ETag on the miss");
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(second.header("etag"), Some(etag));
    for reply in [&first, &second] {
        let age: u64 = reply.header("age").expect("Age").parse().expect("Age");
        assert!(age < 5, "age {age}");
    }
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}

#[tokio::test]
async fn body_is_relayed_byte_for_byte() {
    let h = Harness::start("").await;
    h.fake.set_image_version(OTHER_PROJECT, 2);
    for (project, version) in [(PROJECT, 0), (OTHER_PROJECT, 2)] {
        let miss = h.images(project).await;
        assert_eq!(miss.cache_status(), STORED);
        assert_image_list(&miss, project, version);
        assert_eq!(miss.header("content-type"), Some(IMAGES_CONTENT_TYPE));
        let hit = h.images(project).await;
        assert_eq!(hit.cache_status(), HIT);
        assert_image_list(&hit, project, version);
        assert_eq!(hit.header("content-type"), Some(IMAGES_CONTENT_TYPE));
    }
    assert_eq!(h.fake.image_requests(PROJECT), 1);
    assert_eq!(h.fake.image_requests(OTHER_PROJECT), 1);
}

#[tokio::test]
async fn query_is_normalised() {
    let h = Harness::start("").await;
    let base = images_path(PROJECT);
    let auth = [("x-auth-token", TOKEN)];

    let first = h
        .get(&format!("{base}?image_type=private&limit=10"), &auth)
        .await;
    assert_eq!(first.cache_status(), STORED);
    assert_eq!(
        first.body,
        fake_cph::image_list_body_for_query(PROJECT, 0, "image_type=private", &request_id(&first))
            .as_bytes()
    );
    let swapped = h
        .get(&format!("{base}?limit=10&image_type=private"), &auth)
        .await;
    assert_eq!(swapped.cache_status(), HIT);
    assert_eq!(swapped.body, first.body);
    assert_eq!(h.fake.image_requests(PROJECT), 1);

    // No query and a bare `?` are one key.
    let plain = h.get(&base, &auth).await;
    assert_eq!(plain.cache_status(), STORED);
    assert_eq!(h.fake.last_request().unwrap().path_and_query, base);
    let bare = h.get(&format!("{base}?"), &auth).await;
    assert_eq!(bare.cache_status(), HIT);
    assert_eq!(bare.body, plain.body);
    assert_ne!(plain.body, first.body);
    assert_eq!(h.fake.image_requests(PROJECT), 2);

    // A different query is its own miss, and upstream sees the normalised form.
    let public = h
        .get(&format!("{base}?limit=5&&image_type=public&"), &auth)
        .await;
    assert_eq!(public.cache_status(), STORED);
    assert_eq!(h.fake.image_requests(PROJECT), 3);
    assert_eq!(
        h.fake.last_request().unwrap().path_and_query,
        format!("{base}?image_type=public&limit=5")
    );
    assert_eq!(
        public.body,
        fake_cph::image_list_body_for_query(PROJECT, 0, "image_type=public", &request_id(&public))
            .as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_one_upstream_call() {
    let h = Arc::new(Harness::start("").await);
    h.fake.set_latency(Duration::from_millis(200));
    let mut tasks = JoinSet::new();
    for _ in 0..500 {
        let h = Arc::clone(&h);
        tasks.spawn(async move { h.images(PROJECT).await });
    }
    let mut replies = Vec::with_capacity(500);
    while let Some(reply) = tasks.join_next().await {
        replies.push(reply.unwrap());
    }

    assert_eq!(h.fake.image_requests(PROJECT), 1);
    assert_eq!(h.fake.requests_total(), 1);
    let stored_id = request_id(&replies[0]);
    let (mut stored, mut collapsed, mut hit) = (0, 0, 0);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, replies[0].body);
        assert_eq!(request_id(reply), stored_id);
        match reply.cache_status() {
            STORED => stored += 1,
            COLLAPSED => collapsed += 1,
            HIT => hit += 1,
            other => panic!("unexpected Cache-Status {other:?}"),
        }
    }
    assert_eq!(stored, 1, "collapsed {collapsed}, hit {hit}");
    assert_eq!(collapsed + hit, 499);
    // 200 ms of upstream latency is far longer than it takes to send 500 requests: some of
    // them must have waited on the flight rather than all arriving after it landed.
    assert!(collapsed > 0, "hit {hit}");
    assert_image_list(&replies[0], PROJECT, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnecting_first_caller_does_not_cancel_the_fetch() {
    let h = Harness::start("").await;
    h.fake.set_latency(Duration::from_millis(300));

    // A raw connection, so that dropping it is certainly a disconnect.
    let mut caller = TcpStream::connect(h.proxy).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nX-Auth-Token: {TOKEN}\r\n\r\n",
        images_path(PROJECT),
        h.proxy
    );
    caller.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        h.fake.until(|fake| fake.image_requests(PROJECT) == 1),
    )
    .await
    .expect("the fill never reached upstream");
    // The caller leaves before any answer (the fake is still sleeping on it).
    let mut buf = [0u8; 64];
    assert_eq!(
        caller.try_read(&mut buf).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "answered before the caller left"
    );
    drop(caller);

    let hr = &h;
    eventually(
        "the fetch to land in the cache",
        Duration::from_secs(5),
        move || async move { !cache_entries(hr).await.is_empty() },
    )
    .await;
    let later = h.images(PROJECT).await;
    assert_eq!(later.cache_status(), HIT);
    assert_image_list(&later, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}

#[tokio::test]
async fn entry_expires_after_ttl() {
    // "0s" stale windows are accepted (config.rs: zero is meaningful for them), so the entry
    // is gone at ttl and the next request is a plain miss.
    let h = Harness::start(
        "[cache]\nttl = \"300ms\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n",
    )
    .await;
    let ttl = Duration::from_millis(300);
    let first = h.images(PROJECT).await;
    let stored = Instant::now();
    assert_eq!(first.cache_status(), STORED);
    let second = h.images(PROJECT).await;
    // Only meaningful while still inside the ttl; a machine stalled for 250 ms skips it.
    if stored.elapsed() < Duration::from_millis(250) {
        assert_eq!(second.cache_status(), HIT);
        assert_eq!(h.fake.image_requests(PROJECT), 1);
    }

    tokio::time::sleep_until((stored + ttl + Duration::from_millis(200)).into()).await;
    let third = h.images(PROJECT).await;
    assert_eq!(third.cache_status(), STORED);
    assert_ne!(request_id(&third), request_id(&first));
    assert_image_list(&third, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 2);
    let age: u64 = third.header("age").unwrap().parse().unwrap();
    assert_eq!(age, 0);
}

/// `retries = 0`: SPEC §3 retries a GET on 5xx by default, which would (correctly) turn a
/// single 503 into a 200; this test is about relaying, so it asks for one attempt.
#[tokio::test]
async fn upstream_503_is_relayed_and_not_stored() {
    let h = Harness::start("[upstream]\nendpoint = \"ENDPOINT\"\nretries = 0\n").await;
    h.fake.fail_next(
        1,
        Failure::Status {
            status: 503,
            error_code: "CPS.0500".into(),
            error_msg: "service busy".into(),
        },
    );
    let failed = h.images(PROJECT).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    let id = request_id(&failed);
    assert_eq!(
        failed.body,
        fake_cph::error_body(&id, "CPS.0500", "service busy").as_bytes()
    );
    assert_eq!(failed.header("content-type"), Some("application/json"));
    assert_eq!(failed.cache_status(), "cph-cache; fwd=miss; fwd-status=503");
    assert_eq!(h.fake.image_requests(PROJECT), 1);

    let next = h.images(PROJECT).await;
    assert_eq!(next.cache_status(), STORED);
    assert_image_list(&next, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 2);
    assert_eq!(h.images(PROJECT).await.cache_status(), HIT);
    assert_eq!(h.fake.image_requests(PROJECT), 2);
}

#[tokio::test]
async fn upstream_403_is_relayed_and_not_stored() {
    let h = Harness::start("").await;
    let only_other = HashSet::from([OTHER_PROJECT.to_owned()]);
    h.fake.set_auth(AuthCheck::Tokens(HashMap::from([(
        TOKEN.to_owned(),
        Some(only_other),
    )])));
    let denied = h.images(PROJECT).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let id = request_id(&denied);
    assert_eq!(
        denied.body,
        fake_cph::error_body(
            &id,
            "CPS.0001",
            "The token has no permission for this project"
        )
        .as_bytes()
    );
    assert_eq!(denied.cache_status(), "cph-cache; fwd=miss; fwd-status=403");
    assert_eq!(h.fake.image_requests(PROJECT), 1);

    h.fake.set_auth(AuthCheck::Off);
    let next = h.images(PROJECT).await;
    assert_eq!(next.cache_status(), STORED);
    assert_image_list(&next, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 2);
}

#[tokio::test]
async fn invalid_json_200_is_relayed_and_not_stored() {
    let h = Harness::start("").await;
    h.fake.fail_next(1, Failure::InvalidJson);
    let bad = h.images(PROJECT).await;
    assert_eq!(bad.status, StatusCode::OK);
    assert_eq!(&bad.body[..], b"{\"phone_images\": [");
    assert_eq!(bad.header("content-type"), Some(IMAGES_CONTENT_TYPE));
    assert!(is_request_id(&request_id(&bad)));
    assert_eq!(bad.cache_status(), "cph-cache; fwd=miss; fwd-status=200");
    assert!(bad.header("etag").is_none());
    assert_eq!(h.fake.image_requests(PROJECT), 1);

    let next = h.images(PROJECT).await;
    assert_eq!(next.cache_status(), STORED);
    assert_image_list(&next, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 2);
}

#[tokio::test]
async fn invalid_project_ids_are_refused() {
    let h = Harness::start("").await;
    let long = "a".repeat(65);
    for project in ["..", "a%2Fb", long.as_str()] {
        let path = format!("/v1/{project}/cloud-phone/phone-images");
        let reply = h.get(&path, &[("x-auth-token", TOKEN)]).await;
        assert_proxy_error(&reply, 400, "CPHCACHE.0400");
    }
    assert_eq!(h.fake.requests_total(), 0);
    // 64 characters is still a valid id: the limit is exactly 64.
    let longest = "a".repeat(64);
    assert_eq!(h.images(&longest).await.status, StatusCode::OK);
    assert_eq!(h.fake.requests_total(), 1);
    assert_eq!(h.fake.image_requests(&long), 0);
}

#[tokio::test]
async fn other_methods_are_refused_on_the_cached_route() {
    let h = Harness::start("").await;
    for method in [Method::POST, Method::DELETE] {
        let reply = h
            .send(
                h.proxy,
                method,
                &images_path(PROJECT),
                &[("x-auth-token", TOKEN)],
                "{}",
            )
            .await;
        assert_proxy_error(&reply, 405, "CPHCACHE.0405");
        let allow = reply.header("allow").expect("Allow header");
        assert!(allow.contains("GET") && allow.contains("HEAD"), "{allow}");
    }
    assert_eq!(h.fake.requests_total(), 0);
}

#[tokio::test]
async fn upstream_down_is_502() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let fake = FakeCph::bind().await.unwrap();
    let h = Harness::start_with(fake, config_for(&format!("http://{closed}"), "")).await;
    let reply = h.images(PROJECT).await;
    assert_proxy_error(&reply, 502, "CPHCACHE.0502");
    assert!(cache_entries(&h).await.is_empty());
    assert_eq!(h.fake.requests_total(), 0);
}

#[tokio::test]
async fn upstream_timeout_is_504() {
    let h = Harness::start("[upstream]\nendpoint = \"ENDPOINT\"\ntimeout = \"200ms\"\n").await;
    h.fake.set_failure(Some(Failure::Hang));
    let started = Instant::now();
    let reply = h.images(PROJECT).await;
    let took = started.elapsed();
    assert_proxy_error(&reply, 504, "CPHCACHE.0504");
    // Well under the 15 s request deadline: upstream.timeout cut it (one retry allowed).
    assert!(took >= Duration::from_millis(150), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(h.fake.image_requests(PROJECT) >= 1);
    assert!(cache_entries(&h).await.is_empty());
}

#[tokio::test]
async fn oversized_body_is_502_and_not_stored() {
    let h = Harness::start("[upstream]\nendpoint = \"ENDPOINT\"\nmax_body = \"4KiB\"\n").await;
    h.fake.fail_next(1, Failure::Oversized(10_000));
    let reply = h.images(PROJECT).await;
    assert_proxy_error(&reply, 502, "CPHCACHE.0502");
    assert_eq!(h.fake.image_requests(PROJECT), 1);
    assert!(cache_entries(&h).await.is_empty());

    let next = h.images(PROJECT).await;
    assert_eq!(next.cache_status(), STORED);
    assert_image_list(&next, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_leader_and_waiters() {
    let h = Harness::start("[server]\nrequest_timeout = \"300ms\"\n").await;
    h.fake.set_latency(Duration::from_secs(2));
    let started = Instant::now();
    let (a, b) = tokio::join!(h.images(PROJECT), h.images(PROJECT));
    let took = started.elapsed();
    assert_proxy_error(&a, 504, "CPHCACHE.0504");
    assert_proxy_error(&b, 504, "CPHCACHE.0504");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}

#[tokio::test]
async fn head_fills_with_a_get_and_has_get_headers() {
    let h = Harness::start("").await;
    let head = h
        .send(
            h.proxy,
            Method::HEAD,
            &images_path(PROJECT),
            &[("x-auth-token", TOKEN)],
            "",
        )
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.cache_status(), STORED);
    assert_eq!(h.fake.last_request().unwrap().method, Method::GET);
    assert_eq!(h.fake.image_requests(PROJECT), 1);

    let get = h.images(PROJECT).await;
    assert_eq!(get.cache_status(), HIT);
    assert_image_list(&get, PROJECT, 0);
    assert_eq!(h.fake.image_requests(PROJECT), 1);
    let length = get.body.len().to_string();
    assert_eq!(head.header("content-length"), Some(length.as_str()));
    for name in ["content-type", "etag", "x-request-id"] {
        assert!(get.header(name).is_some(), "{name}");
        assert_eq!(head.header(name), get.header(name), "{name}");
    }
    assert!(head.header("age").is_some());
}

#[tokio::test]
async fn if_none_match_gives_304() {
    let h = Harness::start("").await;
    let first = h.images(PROJECT).await;
    let etag = first.header("etag").expect("ETag").to_owned();

    let path = images_path(PROJECT);
    let not_modified = h
        .get(&path, &[("x-auth-token", TOKEN), ("if-none-match", &etag)])
        .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    assert_eq!(not_modified.cache_status(), HIT);

    let other = h
        .get(
            &path,
            &[("x-auth-token", TOKEN), ("if-none-match", "\"not-it\"")],
        )
        .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.cache_status(), HIT);
    assert_eq!(other.body, first.body);
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}

#[tokio::test]
async fn credentials_are_isolated() {
    let h = Harness::start("").await;
    h.fake
        .set_auth(AuthCheck::Tokens(HashMap::from([(TOKEN.to_owned(), None)])));
    let path = images_path(PROJECT);

    let a = h.images(PROJECT).await;
    assert_eq!(a.cache_status(), STORED);
    assert_image_list(&a, PROJECT, 0);
    assert_eq!(h.fake.requests_with_token(TOKEN), 1);

    // Token B is invalid upstream: never served A's body, its 401 relayed each time.
    for n in 1..=2 {
        let b = h.get(&path, &[("x-auth-token", TOKEN_B)]).await;
        assert_eq!(b.status, StatusCode::UNAUTHORIZED);
        assert_ne!(b.body, a.body);
        assert_eq!(b.error_code(), "APIGW.0301");
        assert_eq!(b.cache_status(), "cph-cache; fwd=miss; fwd-status=401");
        assert_eq!(h.fake.requests_with_token(TOKEN_B), n);
    }

    // No credential: bypass, upstream every time.
    let before = h.fake.image_requests(PROJECT);
    for n in 1..=2 {
        let anonymous = h.get(&path, &[]).await;
        assert_eq!(anonymous.cache_status(), BYPASS);
        assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
        assert_ne!(anonymous.body, a.body);
        assert_eq!(h.fake.image_requests(PROJECT), before + n);
    }

    // AK/SK-signed (cannot be verified locally): bypass even with a cached token A.
    let signed = h
        .get(
            &path,
            &[
                ("x-auth-token", TOKEN),
                (
                    "authorization",
                    "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host;x-sdk-date, Signature=00",
                ),
                ("x-sdk-date", "20240101T000000Z"),
            ],
        )
        .await;
    assert_eq!(signed.cache_status(), BYPASS);
    assert_eq!(h.fake.requests_with_token(TOKEN), 2);
    assert_ne!(request_id(&signed), request_id(&a));

    // A itself is still a hit.
    let again = h.images(PROJECT).await;
    assert_eq!(again.cache_status(), HIT);
    assert_eq!(again.body, a.body);
    assert_eq!(h.fake.requests_with_token(TOKEN), 2);
}

#[tokio::test]
async fn admin_lists_and_purges() {
    let h = Harness::start("").await;
    let private = format!("{}?image_type=private", images_path(PROJECT));
    let auth = [("x-auth-token", TOKEN)];
    let plain = h.images(PROJECT).await;
    assert_eq!(h.images(PROJECT).await.cache_status(), HIT);
    let filtered = h.get(&private, &auth).await;
    let other = h.images(OTHER_PROJECT).await;
    for reply in [&plain, &filtered, &other] {
        assert_eq!(reply.cache_status(), STORED);
    }

    let listing = h.admin_get("/cache").await;
    assert_eq!(listing.status, StatusCode::OK);
    assert!(!String::from_utf8_lossy(&listing.body).contains(TOKEN));
    let entries = listing.json()["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 3, "{entries:?}");
    let find = |project: &str, query: &str| {
        entries
            .iter()
            .find(|e| e["project"] == project && e["query"] == query)
            .unwrap_or_else(|| panic!("no entry {project}?{query} in {entries:?}"))
            .clone()
    };
    for (project, query, reply, hits) in [
        (PROJECT, "", &plain, 1),
        (PROJECT, "image_type=private", &filtered, 0),
        (OTHER_PROJECT, "", &other, 0),
    ] {
        let entry = find(project, query);
        assert_eq!(entry["bytes"], reply.body.len(), "{entry}");
        assert_eq!(entry["hits"], hits, "{entry}");
        assert_eq!(entry["ttl_s"], 60, "{entry}");
        assert!(
            entry["age_s"].as_u64().is_some_and(|age| age < 5),
            "{entry}"
        );
    }

    let purged = h.admin_delete(&format!("/cache/{PROJECT}")).await;
    assert_eq!(purged.status, StatusCode::NO_CONTENT);
    assert!(purged.body.is_empty());
    assert_eq!(h.images(PROJECT).await.cache_status(), STORED);
    assert_eq!(h.get(&private, &auth).await.cache_status(), STORED);
    assert_eq!(h.images(OTHER_PROJECT).await.cache_status(), HIT);
    assert_eq!(h.fake.image_requests(PROJECT), 4);
    assert_eq!(h.fake.image_requests(OTHER_PROJECT), 1);

    let all = h.admin_delete("/cache").await;
    assert_eq!(all.status, StatusCode::NO_CONTENT);
    assert!(cache_entries(&h).await.is_empty());
    assert_eq!(h.images(PROJECT).await.cache_status(), STORED);
    assert_eq!(h.images(OTHER_PROJECT).await.cache_status(), STORED);
    assert_eq!(h.fake.image_requests(PROJECT), 5);
    assert_eq!(h.fake.image_requests(OTHER_PROJECT), 2);
}

#[tokio::test]
async fn upstream_request_headers() {
    let h = Harness::start("").await;
    let reply = h
        .get(
            &images_path(PROJECT),
            &[
                ("x-auth-token", TOKEN),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("accept-encoding", "gzip"),
                ("x-end-to-end", "kept"),
            ],
        )
        .await;
    assert_eq!(reply.cache_status(), STORED);
    assert_image_list(&reply, PROJECT, 0);

    let seen = h.fake.last_request().expect("upstream request").headers;
    assert_eq!(seen.get("x-auth-token").unwrap(), TOKEN);
    assert_eq!(
        seen.get("host").unwrap().to_str().unwrap(),
        h.fake.addr().to_string()
    );
    assert!(seen.get("x-hop").is_none(), "{seen:?}");
    assert!(seen.get("keep-alive").is_none(), "{seen:?}");
    for value in seen.get_all("connection") {
        assert!(!value.to_str().unwrap().contains("x-hop"), "{seen:?}");
    }
    assert!(seen.get("accept-encoding").is_none(), "{seen:?}");
    // The check above is not just "nothing is forwarded".
    assert_eq!(seen.get("x-end-to-end").unwrap(), "kept");
}
