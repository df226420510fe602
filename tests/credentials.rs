//! Credentials (SPEC §5): verified sharing, per-credential entries, aksk signing, the client
//! token, and secrets that never leave the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cph_cache::Secrets;
use cph_cache::auth::ClientToken;
use cph_cache::fake_cph::{AuthCheck, FakeCph};
use cph_cache::upstream::sign::Credentials;
use http::Method;
use support::*;
use tokio::task::JoinSet;

const T1: &str = "token-valid-one";
const T2: &str = "token-valid-two";
const T3: &str = "token-invalid-three";
const T4: &str = "token-other-project";

/// T1 and T2 may read PROJECT, T4 only OTHER_PROJECT, T3 nothing.
fn token_check() -> AuthCheck {
    let mut tokens: HashMap<String, Option<HashSet<String>>> = HashMap::new();
    tokens.insert(T1.into(), None);
    tokens.insert(T2.into(), None);
    tokens.insert(T4.into(), Some([OTHER_PROJECT.to_owned()].into()));
    AuthCheck::Tokens(tokens)
}

async fn get_as(h: &Harness, token: Option<&str>) -> Reply {
    match token {
        Some(token) => {
            h.get(&images_path(PROJECT), &[("x-auth-token", token)])
                .await
        }
        None => h.get(&images_path(PROJECT), &[]).await,
    }
}

#[tokio::test]
async fn verified_tokens_share_one_entry() {
    let h = Harness::start("").await;
    h.fake.set_auth(token_check());

    let t1 = get_as(&h, Some(T1)).await;
    assert_eq!(t1.cache_status(), "cph-cache; fwd=miss; stored");
    // T2 is not verified yet: its first request goes upstream with its own token...
    let t2_first = get_as(&h, Some(T2)).await;
    assert_eq!(t2_first.status, 200);
    assert_eq!(h.fake.requests_with_token(T2), 1);
    // ...and then it reads the shared entry.
    let t2_second = get_as(&h, Some(T2)).await;
    assert_eq!(t2_second.cache_status(), "cph-cache; hit");
    assert_eq!(h.fake.requests_with_token(T2), 1);
    let t1_again = get_as(&h, Some(T1)).await;
    assert_eq!(t1_again.cache_status(), "cph-cache; hit");
    assert_eq!(t1_again.body, t2_second.body);
    assert_eq!(h.fake.requests_with_token(T1), 1);
    // Verification is per project, not per query.
    let other_query = h
        .get(
            &format!("{}?image_type=private", images_path(PROJECT)),
            &[("x-auth-token", T2)],
        )
        .await;
    assert_eq!(other_query.cache_status(), "cph-cache; fwd=miss; stored");
    let t1_other_query = h
        .get(
            &format!("{}?image_type=private", images_path(PROJECT)),
            &[("x-auth-token", T1)],
        )
        .await;
    assert_eq!(t1_other_query.cache_status(), "cph-cache; hit");
}

#[tokio::test]
async fn invalid_and_missing_credentials_never_get_the_cached_body() {
    let h = Harness::start("").await;
    h.fake.set_auth(token_check());
    let cached = get_as(&h, Some(T1)).await;
    assert_eq!(cached.status, 200);

    for _ in 0..2 {
        let t3 = get_as(&h, Some(T3)).await;
        assert_eq!(t3.status, 401);
        assert_eq!(t3.error_code(), "APIGW.0301");
        assert_eq!(t3.cache_status(), "cph-cache; fwd=miss; fwd-status=401");
        let anonymous = get_as(&h, None).await;
        assert_eq!(anonymous.status, 401);
        assert_eq!(anonymous.cache_status(), "cph-cache; fwd=bypass");
        let signed = h
            .get(
                &images_path(PROJECT),
                &[
                    ("x-auth-token", T1),
                    (
                        "authorization",
                        "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=00",
                    ),
                ],
            )
            .await;
        assert_eq!(signed.cache_status(), "cph-cache; fwd=bypass");
    }
    assert_eq!(
        h.fake.requests_with_token(T3),
        2,
        "T3 goes upstream every time"
    );
    // T4 is valid, but not for this project.
    let t4 = get_as(&h, Some(T4)).await;
    assert_eq!(t4.status, 403);
    assert_eq!(t4.error_code(), "CPS.0001");
    assert_ne!(t4.body, cached.body);
}

/// The "done when" burst: valid, invalid and anonymous callers interleaved on a cold key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_burst_never_leaks() {
    for warm_first in [false, true] {
        let h = Harness::start("").await;
        h.fake.set_auth(token_check());
        h.fake.set_latency(Duration::from_millis(100));
        if warm_first {
            assert_eq!(get_as(&h, Some(T1)).await.status, 200);
        }
        let mut burst = JoinSet::new();
        for i in 0..200 {
            let token = [Some(T1), Some(T2), Some(T3), None][i % 4];
            let client = h.client.clone();
            let addr = h.proxy;
            burst.spawn(async move {
                let mut request =
                    http::Request::get(format!("http://{addr}{}", images_path(PROJECT)));
                if let Some(token) = token {
                    request = request.header("x-auth-token", token);
                }
                let request = request
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                let status = response.status();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (token, status, body)
            });
        }
        let mut list_body = None;
        while let Some(result) = burst.join_next().await {
            let (token, status, body) = result.unwrap();
            match token {
                Some(T1) | Some(T2) => {
                    assert_eq!(status, 200);
                    let images = serde_json::from_slice::<serde_json::Value>(&body).unwrap();
                    let images = images["phone_images"].clone();
                    assert_eq!(*list_body.get_or_insert(images.clone()), images);
                }
                _ => {
                    assert_eq!(status, 401, "{token:?} got {status}");
                    assert!(
                        !body.windows(12).any(|w| w == b"phone_images"),
                        "{token:?} got a list"
                    );
                }
            }
        }
        // Each valid token needed at most one upstream answer to be verified.
        assert!(
            h.fake.requests_with_token(T1) <= 1,
            "T1: {}",
            h.fake.requests_with_token(T1)
        );
        assert!(
            h.fake.requests_with_token(T2) <= 1,
            "T2: {}",
            h.fake.requests_with_token(T2)
        );
    }
}

#[tokio::test]
async fn a_revoked_token_reads_for_at_most_verify_ttl() {
    let h = Harness::start("[auth]\nverify_ttl = \"300ms\"\n").await;
    h.fake.set_auth(token_check());
    assert_eq!(get_as(&h, Some(T1)).await.status, 200);
    // Revoke T1 upstream: within verify_ttl it still reads the cached list (the documented
    // trade-off), after it the next request goes upstream and gets the refusal.
    let mut tokens: HashMap<String, Option<HashSet<String>>> = HashMap::new();
    tokens.insert(T2.into(), None);
    h.fake.set_auth(AuthCheck::Tokens(tokens));
    assert_eq!(get_as(&h, Some(T1)).await.cache_status(), "cph-cache; hit");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let refused = get_as(&h, Some(T1)).await;
    assert_eq!(refused.status, 401);
    // And a refused token stays refused (the 401 revoked it) even though the entry is fresh.
    assert_eq!(get_as(&h, Some(T1)).await.status, 401);
    assert_eq!(get_as(&h, Some(T2)).await.status, 200);
}

#[tokio::test]
async fn share_credential_keeps_one_entry_per_token() {
    let h = Harness::start("[auth]\nshare = \"credential\"\n").await;
    h.fake.set_auth(token_check());
    assert_eq!(
        get_as(&h, Some(T1)).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
    assert_eq!(
        get_as(&h, Some(T2)).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
    assert_eq!(get_as(&h, Some(T2)).await.cache_status(), "cph-cache; hit");
    assert_eq!(h.fake.image_requests(PROJECT), 2);
    let view = h.admin_get("/cache").await.json();
    assert_eq!(view["entries"].as_array().unwrap().len(), 2);
    assert!(!view.to_string().contains(T1));
}

fn aksk_config(fake: &FakeCph, extra: &str) -> cph_cache::Config {
    config_for(
        &fake.url(),
        &format!("[upstream]\nendpoint = \"ENDPOINT\"\n[auth]\nmode = \"aksk\"\n{extra}"),
    )
}

fn signing(ak: &str, sk: &str) -> Secrets {
    Secrets {
        signing: Some(Credentials::new(ak, sk, None)),
        client_token: None,
    }
}

#[tokio::test]
async fn aksk_mode_signs_every_request() {
    let fake = FakeCph::bind().await.unwrap();
    fake.set_auth(AuthCheck::AkSk {
        access_key: "AK-TEST".into(),
        secret_key: "SK-TEST".into(),
    });
    let config = aksk_config(&fake, "");
    let h = Harness::start_with_secrets(fake, config, signing("AK-TEST", "SK-TEST")).await;

    let first = h.get(&images_path(PROJECT), &[]).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.cache_status(), "cph-cache; fwd=miss; stored");
    let upstream = h.fake.last_request().unwrap();
    let authorization = upstream.headers["authorization"].to_str().unwrap();
    assert!(authorization.starts_with("SDK-HMAC-SHA256 Access=AK-TEST, SignedHeaders="));
    assert!(
        authorization.contains("host;x-project-id;x-sdk-date"),
        "{authorization}"
    );
    assert_eq!(upstream.headers["x-project-id"], PROJECT);
    // A caller's own credentials are dropped, and everyone shares one entry.
    let second = h
        .get(&images_path(PROJECT), &[("x-auth-token", "caller-token")])
        .await;
    assert_eq!(second.cache_status(), "cph-cache; hit");
    let queried = h
        .get(
            &format!("{}?image_type=private", images_path(PROJECT)),
            &[("x-auth-token", "caller-token")],
        )
        .await;
    assert_eq!(queried.status, 200);
    let upstream = h.fake.last_request().unwrap();
    assert!(upstream.headers.get("x-auth-token").is_none());
    // Passthrough defaults to "none" in aksk mode.
    let other = h
        .get(&format!("/v1/{PROJECT}/cloud-phone/servers"), &[])
        .await;
    assert_eq!(other.status, 404);
    assert_eq!(other.error_code(), "CPHCACHE.0404");
}

#[tokio::test]
async fn aksk_mode_with_a_wrong_secret_key_is_refused_and_not_stored() {
    let fake = FakeCph::bind().await.unwrap();
    fake.set_auth(AuthCheck::AkSk {
        access_key: "AK-TEST".into(),
        secret_key: "SK-TEST".into(),
    });
    let config = aksk_config(&fake, "");
    let h = Harness::start_with_secrets(fake, config, signing("AK-TEST", "SK-WRONG")).await;
    for _ in 0..2 {
        let reply = h.get(&images_path(PROJECT), &[]).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.error_code(), "APIGW.0301");
    }
    assert_eq!(
        h.fake.image_requests(PROJECT),
        2,
        "a refusal is never cached"
    );
}

#[tokio::test]
async fn aksk_passthrough_is_signed_with_its_body() {
    let fake = FakeCph::bind().await.unwrap();
    fake.set_auth(AuthCheck::AkSk {
        access_key: "AK-TEST".into(),
        secret_key: "SK-TEST".into(),
    });
    let config = aksk_config(&fake, "").clone();
    let mut config = config;
    config.upstream.passthrough = cph_cache::config::Passthrough::All;
    let h = Harness::start_with_secrets(fake, config, signing("AK-TEST", "SK-TEST")).await;
    let body = r#"{"phones":[{"phone_id":"abc"}]}"#;
    let reply = h
        .send(
            h.proxy,
            Method::POST,
            &format!("/v1/{PROJECT}/cloud-phone/phones/batch-restart"),
            &[("content-type", "application/json")],
            body,
        )
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(h.fake.last_request().unwrap().body, body.as_bytes());
}

#[tokio::test]
async fn client_token_gates_every_route() {
    let fake = FakeCph::bind().await.unwrap();
    let mut config = aksk_config(&fake, "");
    config.upstream.passthrough = cph_cache::config::Passthrough::All;
    let secrets = Secrets {
        signing: Some(Credentials::new("AK", "SK", None)),
        client_token: Some(ClientToken::new("the-client-token")),
    };
    let h = Harness::start_with_secrets(fake, config, secrets).await;
    for headers in [vec![], vec![("x-auth-token", "wrong")]] {
        let reply = h.get(&images_path(PROJECT), &headers).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.error_code(), "CPHCACHE.0401");
        assert!(!String::from_utf8_lossy(&reply.body).contains("the-client-token"));
        let other = h
            .get(&format!("/v1/{PROJECT}/cloud-phone/servers"), &headers)
            .await;
        assert_eq!(other.status, 401);
    }
    assert_eq!(h.fake.requests_total(), 0);
    let admitted = h
        .get(
            &images_path(PROJECT),
            &[("x-auth-token", "the-client-token")],
        )
        .await;
    assert_eq!(admitted.status, 200);
    // The client token is ours, not the caller's credential: it never goes upstream.
    assert!(
        h.fake
            .last_request()
            .unwrap()
            .headers
            .get("x-auth-token")
            .is_none()
    );
    assert_eq!(
        h.metric(r#"cph_cache_requests_total{cache="error"}"#).await,
        2.0
    );
}
