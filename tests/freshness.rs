//! Freshness and resilience (SPEC §3 [cache], [upstream], §5) against the simulated CPH, with
//! short real windows and bounds generous enough for a loaded 2-core machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cph_cache::fake_cph::{AuthCheck, Failure};
use support::*;

fn status_failure(status: u16) -> Failure {
    Failure::Status {
        status,
        error_code: "CPS.9999".into(),
        error_msg: "injected".into(),
    }
}

/// Sleeps past an entry's window: time-based behaviour, not waiting for readiness.
async fn age_past(window: Duration) {
    tokio::time::sleep(window + Duration::from_millis(100)).await;
}

/// Polls the image list until `Cache-Status` is `hit` (bounded).
async fn until_hit(h: &Harness, project: &str) -> Reply {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = h.images(project).await;
        if reply.cache_status() == "cph-cache; hit" || Instant::now() > give_up {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stale_while_revalidate_answers_without_waiting_for_upstream() {
    let h = Harness::start(
        "[cache]\nttl = \"200ms\"\nstale_while_revalidate = \"30s\"\nstale_if_error = \"0s\"\nrefresh_ahead = 0.0\n",
    )
    .await;
    let first = h.images(PROJECT).await;
    age_past(Duration::from_millis(200)).await;
    h.fake.set_latency(Duration::from_millis(1500));

    let started = Instant::now();
    let stale = h.images(PROJECT).await;
    let waited = started.elapsed();
    assert_eq!(stale.status, 200);
    assert_eq!(stale.cache_status(), "cph-cache; fwd=stale");
    assert_eq!(stale.body, first.body);
    assert!(
        waited < Duration::from_millis(1000),
        "stale answer took {waited:?}"
    );
    // One background refresh, however many stale answers meanwhile.
    assert_eq!(
        h.images(PROJECT).await.cache_status(),
        "cph-cache; fwd=stale"
    );
    let refreshed = until_hit(&h, PROJECT).await;
    assert_eq!(refreshed.cache_status(), "cph-cache; hit");
    assert_ne!(
        refreshed.header("x-request-id"),
        first.header("x-request-id")
    );
    assert_eq!(h.fake.image_requests(PROJECT), 2);
    assert_eq!(
        h.metric(r#"cph_cache_refreshes_total{reason="stale"}"#)
            .await,
        1.0
    );
    // Every answer while the refresh ran was stale, none waited and none missed.
    assert!(h.metric(r#"cph_cache_requests_total{cache="stale"}"#).await >= 2.0);
    assert_eq!(
        h.metric(r#"cph_cache_requests_total{cache="miss"}"#).await,
        1.0
    );
}

#[tokio::test]
async fn an_outage_is_bridged_by_stale_if_error() {
    // A "10-minute outage", compressed: ttl 100 ms, no revalidate window, stale_if_error 30 s.
    let h = Harness::start(
        "[upstream]\nendpoint = \"ENDPOINT\"\ntimeout = \"150ms\"\n\
         [cache]\nttl = \"100ms\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"30s\"\nrefresh_ahead = 0.0\n",
    )
    .await;
    let first = h.images(PROJECT).await;
    assert_eq!(first.status, 200);
    age_past(Duration::from_millis(100)).await;
    let failures = [
        status_failure(503),
        status_failure(500),
        status_failure(429),
        Failure::DropConnection,
        Failure::InvalidJson,
        Failure::Oversized(16 << 20),
        Failure::Hang,
    ];
    for failure in failures {
        h.fake.set_failure(Some(failure.clone()));
        for _ in 0..3 {
            let reply = h.images(PROJECT).await;
            assert_eq!(reply.status, 200, "{failure:?}: {:?}", reply.body);
            assert_eq!(reply.cache_status(), "cph-cache; fwd=stale", "{failure:?}");
            assert_eq!(reply.body, first.body, "{failure:?}");
        }
    }
    // Upstream back: the next request refreshes the entry.
    h.fake.set_failure(None);
    let back = h.images(PROJECT).await;
    assert_eq!(back.cache_status(), "cph-cache; fwd=miss; stored");
    assert_eq!(
        h.metric(r#"cph_cache_requests_total{cache="error"}"#).await,
        0.0
    );
}

#[tokio::test]
async fn credential_refusals_are_never_bridged() {
    let h = Harness::start(
        "[cache]\nttl = \"100ms\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"30s\"\nrefresh_ahead = 0.0\n",
    )
    .await;
    let mut tokens: HashMap<String, Option<HashSet<String>>> = HashMap::new();
    tokens.insert(TOKEN.into(), None);
    h.fake.set_auth(AuthCheck::Tokens(tokens));
    assert_eq!(h.images(PROJECT).await.status, 200);
    age_past(Duration::from_millis(100)).await;
    h.fake.set_auth(AuthCheck::Tokens(HashMap::new()));
    let refused = h.images(PROJECT).await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        refused.cache_status(),
        "cph-cache; fwd=miss; fwd-status=401"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_polled_more_often_than_its_ttl_never_misses() {
    let h = Harness::start(
        "[cache]\nttl = \"2s\"\nrefresh_ahead = 0.8\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n",
    )
    .await;
    h.fake.set_latency(Duration::from_millis(50));
    assert_eq!(
        h.images(PROJECT).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
    let mut statuses = Vec::new();
    let until = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(150)).await;
        statuses.push(h.images(PROJECT).await.cache_status().to_owned());
    }
    assert!(statuses.len() >= 20, "only {} polls", statuses.len());
    assert!(
        statuses.iter().all(|s| s == "cph-cache; hit"),
        "{statuses:?}"
    );
    // Two refreshes ahead of expiry (at ~1.6 s and ~3.2 s, less jitter) kept it fresh.
    let ahead = h
        .metric(r#"cph_cache_refreshes_total{reason="ahead"}"#)
        .await;
    assert!(ahead >= 2.0, "refreshes ahead: {ahead}");
    assert_eq!(h.fake.image_requests(PROJECT) as f64, 1.0 + ahead);
}

#[tokio::test]
async fn a_503_is_retried_once_into_a_200() {
    let h = Harness::start("").await;
    h.fake.fail_next(1, status_failure(503));
    let reply = h.images(PROJECT).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.cache_status(), "cph-cache; fwd=miss; stored");
    assert_eq!(h.fake.image_requests(PROJECT), 2);
    assert_eq!(h.metric("cph_cache_upstream_retries_total").await, 1.0);
    assert_eq!(
        h.metric(r#"cph_cache_upstream_requests_total{code="503"}"#)
            .await,
        1.0
    );
    assert_eq!(
        h.metric(r#"cph_cache_upstream_requests_total{code="200"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn other_4xx_are_never_retried() {
    let h = Harness::start("[upstream]\nendpoint = \"ENDPOINT\"\nretries = 3\n").await;
    for status in [400, 401, 403, 404] {
        h.fake.reset_counters();
        h.fake.fail_next(1, status_failure(status));
        let reply = h.images(PROJECT).await;
        assert_eq!(reply.status.as_u16(), status);
        assert_eq!(h.fake.image_requests(PROJECT), 1, "{status} was retried");
    }
}

#[tokio::test]
async fn retry_after_is_honoured_when_it_fits() {
    // The fake's 429 says `Retry-After: 1`.
    let h = Harness::start("").await;
    h.fake.fail_next(1, status_failure(429));
    let started = Instant::now();
    let reply = h.images(PROJECT).await;
    assert_eq!(reply.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(h.fake.image_requests(PROJECT), 2);

    // A Retry-After longer than the time left: no retry, the 429 is relayed.
    let h = Harness::start("[server]\nrequest_timeout = \"500ms\"\n").await;
    h.fake.fail_next(1, status_failure(429));
    let reply = h.images(PROJECT).await;
    assert_eq!(reply.status, 429);
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}

#[tokio::test]
async fn each_attempt_is_bounded_by_upstream_timeout() {
    let h =
        Harness::start("[upstream]\nendpoint = \"ENDPOINT\"\ntimeout = \"200ms\"\nretries = 1\n")
            .await;
    h.fake.set_failure(Some(Failure::Hang));
    let started = Instant::now();
    let reply = h.images(PROJECT).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_code(), "CPHCACHE.0504");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        h.fake.image_requests(PROJECT),
        2,
        "one retry after the timeout"
    );
    assert_eq!(
        h.metric(r#"cph_cache_upstream_requests_total{code="timeout"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn etag_follows_content_not_request_id() {
    // Past ttl the entry is kept (stale_if_error), so each miss is a refresh that replaces it.
    let h = Harness::start(
        "[cache]\nttl = \"100ms\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"30s\"\nrefresh_ahead = 0.0\n",
    )
    .await;
    let first = h.images(PROJECT).await;
    age_past(Duration::from_millis(100)).await;
    let same = h.images(PROJECT).await;
    assert_eq!(same.cache_status(), "cph-cache; fwd=miss; stored");
    assert_ne!(same.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(same.header("etag"), first.header("etag"));
    assert_eq!(h.metric("cph_cache_content_changes_total").await, 0.0);

    h.fake.set_image_version(PROJECT, 1);
    age_past(Duration::from_millis(100)).await;
    let changed = h.images(PROJECT).await;
    assert_ne!(changed.header("etag"), first.header("etag"));
    assert_eq!(h.metric("cph_cache_content_changes_total").await, 1.0);
    // A client holding the old ETag gets the new list, one holding the new one a 304.
    let old_tag = h
        .get(
            &images_path(PROJECT),
            &[
                ("x-auth-token", TOKEN),
                ("if-none-match", first.header("etag").unwrap()),
            ],
        )
        .await;
    assert_eq!(old_tag.status, 200);
    let new_tag = h
        .get(
            &images_path(PROJECT),
            &[
                ("x-auth-token", TOKEN),
                ("if-none-match", changed.header("etag").unwrap()),
            ],
        )
        .await;
    assert_eq!(new_tag.status, 304);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_is_immediate_and_an_in_flight_fill_does_not_resurrect() {
    let h = Harness::start("").await;
    h.fake.set_latency(Duration::from_millis(400));
    let in_flight = {
        let client = h.client.clone();
        let uri = format!("http://{}{}", h.proxy, images_path(PROJECT));
        tokio::spawn(async move {
            let request = http::Request::get(uri)
                .header("x-auth-token", TOKEN)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            client.request(request).await.unwrap().status()
        })
    };
    tokio::time::timeout(
        Duration::from_secs(5),
        h.fake.until(|fake| fake.image_requests(PROJECT) == 1),
    )
    .await
    .expect("the fill never reached upstream");
    assert_eq!(
        h.admin_delete(&format!("/cache/{PROJECT}")).await.status,
        204
    );
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the caller is still answered"
    );
    let view = h.admin_get("/cache").await.json();
    assert_eq!(view["entries"].as_array().unwrap().len(), 0, "{view}");

    h.fake.set_latency(Duration::ZERO);
    assert_eq!(
        h.images(PROJECT).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
    assert_eq!(h.images(PROJECT).await.cache_status(), "cph-cache; hit");
    assert_eq!(
        h.admin_delete(&format!("/cache/{PROJECT}")).await.status,
        204
    );
    assert_eq!(
        h.images(PROJECT).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
}

#[tokio::test]
async fn per_project_overrides_apply() {
    let h = Harness::start(&format!(
        "[cache]\nttl = \"60s\"\n[cache.projects.\"{PROJECT}\"]\nttl = \"100ms\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n"
    ))
    .await;
    h.images(PROJECT).await;
    h.images(OTHER_PROJECT).await;
    age_past(Duration::from_millis(100)).await;
    assert_eq!(
        h.images(PROJECT).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
    assert_eq!(
        h.images(OTHER_PROJECT).await.cache_status(),
        "cph-cache; hit"
    );
    let view = h.admin_get("/cache").await.json();
    let ttl_of = |project: &str| {
        view["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["project"] == project)
            .unwrap()["ttl_s"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(ttl_of(PROJECT), 0);
    assert_eq!(ttl_of(OTHER_PROJECT), 60);
}
