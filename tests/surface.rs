#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The HTTP surface as a client and an operator see it (SPEC §4, §6): passthrough modes and
//! header hygiene, exact metric values, `promtool`, admin endpoints, graceful shutdown, the
//! header size limit and h2c. Every server is bound to 127.0.0.1:0.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cph_cache::fake_cph::{Failure, FakeCph};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVERS: &str = "/cloud-phone/servers";

fn servers_path(project: &str) -> String {
    format!("/v1/{project}{SERVERS}")
}

fn passthrough_config(mode: &str) -> String {
    format!("[upstream]\nendpoint = \"ENDPOINT\"\npassthrough = \"{mode}\"\n")
}

/// Sends one request with an arbitrary (binary) body through `client` and reads the reply.
async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (Version, Reply) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("request timed out")
        .expect("request failed");
    let version = response.version();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        version,
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        },
    )
}

/// A body that is not all one byte, so truncation or reordering would show.
fn patterned_body(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

// ---------------------------------------------------------------------------------------------
// 1. passthrough modes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn passthrough_all_forwards_get_and_post_with_body_intact() {
    let h = Harness::start(&passthrough_config("all")).await;

    let get = h
        .get(
            &format!("{}?limit=10&offset=0", servers_path(PROJECT)),
            &[("x-auth-token", TOKEN)],
        )
        .await;
    assert_eq!(get.status, StatusCode::OK);
    let echo = get.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], servers_path(PROJECT));
    assert_eq!(echo["query"], "limit=10&offset=0");
    assert_eq!(echo["body_len"], 0);
    assert_eq!(
        get.header("cache-status"),
        None,
        "passthrough is not a cache answer"
    );
    assert_eq!(h.fake.requests_for_path(&servers_path(PROJECT)), 1);

    // 256 KiB: larger than any single read buffer, so the body is streamed in pieces.
    let sent = patterned_body(256 * 1024);
    let (_, post) = send_with(
        &h.client,
        h.proxy,
        Method::POST,
        &servers_path(PROJECT),
        &[
            ("x-auth-token", TOKEN),
            ("content-type", "application/octet-stream"),
        ],
        sent.clone(),
    )
    .await;
    assert_eq!(post.status, StatusCode::OK);
    let echo = post.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], servers_path(PROJECT));
    assert_eq!(echo["body_len"], sent.len());
    assert_eq!(post.header("cache-status"), None);
    let seen = h.fake.last_request().expect("the fake saw the POST");
    assert_eq!(seen.method, Method::POST);
    assert!(
        seen.body == sent,
        "request body changed on the way upstream"
    );
    assert_eq!(h.fake.requests_for_path(&servers_path(PROJECT)), 2);
}

#[tokio::test]
async fn passthrough_read_only_refuses_writes_without_calling_upstream() {
    let h = Harness::start(&passthrough_config("read-only")).await;

    let get = h
        .get(&servers_path(PROJECT), &[("x-auth-token", TOKEN)])
        .await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(get.json()["method"], "GET");
    assert_eq!(h.fake.requests_total(), 1);

    let post = h
        .send(
            h.proxy,
            Method::POST,
            &servers_path(PROJECT),
            &[("x-auth-token", TOKEN)],
            "{\"phones\":[]}",
        )
        .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.error_code(), "CPHCACHE.0405");
    assert_eq!(
        h.fake.requests_total(),
        1,
        "a refused POST reached upstream"
    );
}

#[tokio::test]
async fn passthrough_none_refuses_everything_but_the_cached_route() {
    let h = Harness::start(&passthrough_config("none")).await;

    let get = h
        .get(&servers_path(PROJECT), &[("x-auth-token", TOKEN)])
        .await;
    assert_eq!(get.status, StatusCode::NOT_FOUND);
    assert_eq!(get.error_code(), "CPHCACHE.0404");
    assert_eq!(
        get.header("content-type"),
        Some("application/json"),
        "proxy errors use CPH's JSON shape"
    );
    assert_eq!(h.fake.requests_total(), 0, "a refused GET reached upstream");

    // The cached route is still served.
    let images = h.images(PROJECT).await;
    assert_eq!(images.status, StatusCode::OK);
    assert_eq!(h.fake.requests_total(), 1);
}

#[tokio::test]
async fn dot_segments_are_refused_before_upstream() {
    let h = Harness::start(&passthrough_config("all")).await;
    for path in ["/v1/x/../y", "/v1/x/./y", "/v1/x/%2e%2e/y"] {
        let reply = h.get(path, &[("x-auth-token", TOKEN)]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(reply.error_code(), "CPHCACHE.0400", "{path}");
    }
    assert_eq!(h.fake.requests_total(), 0);
}

// ---------------------------------------------------------------------------------------------
// 2. hop-by-hop headers and Host
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn passthrough_drops_hop_by_hop_request_headers_and_sets_host() {
    let h = Harness::start(&passthrough_config("all")).await;
    let reply = h
        .get(
            &servers_path(PROJECT),
            &[
                ("host", "caller-chosen.invalid"),
                ("connection", "keep-alive, x-hop-custom"),
                ("x-hop-custom", "secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("x-end-to-end", "kept"),
                ("x-auth-token", TOKEN),
            ],
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = h.fake.last_request().expect("the fake saw the request");
    for hop in [
        "x-hop-custom",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
    ] {
        assert!(
            !seen.headers.contains_key(hop),
            "hop-by-hop header {hop} reached upstream: {:?}",
            seen.headers
        );
    }
    if let Some(connection) = seen.headers.get("connection") {
        let connection = connection.to_str().unwrap().to_ascii_lowercase();
        assert!(
            !connection.contains("x-hop-custom"),
            "caller's Connection header forwarded: {connection}"
        );
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    assert_eq!(seen.headers["x-auth-token"], TOKEN);
    assert_eq!(seen.headers["host"], h.fake.addr().to_string().as_str());
}

/// A bare HTTP/1.1 upstream whose every answer carries hop-by-hop headers (the fake never sends
/// any). Keeps each connection open for further requests.
async fn hop_header_upstream() -> SocketAddr {
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
        Content-Type: application/json\r\n\
        Content-Length: 2\r\n\
        Connection: x-resp-hop\r\n\
        X-Resp-Hop: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Authenticate: Basic realm=\"upstream\"\r\n\
        X-End-To-End: kept\r\n\
        \r\n\
        {}";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Requests here are bodiless GETs: one blank line ends each.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if stream.write_all(RESPONSE).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn passthrough_drops_hop_by_hop_response_headers() {
    let upstream = hop_header_upstream().await;
    let fake = FakeCph::bind().await.unwrap();
    let config = config_for(&format!("http://{upstream}"), &passthrough_config("all"));
    let h = Harness::start_with(fake, config).await;
    let reply = h
        .get(&servers_path(PROJECT), &[("x-auth-token", TOKEN)])
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.as_ref(), b"{}");
    assert_eq!(reply.header("x-end-to-end"), Some("kept"));
    for hop in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !reply.headers.contains_key(hop),
            "hop-by-hop response header {hop} reached the caller: {:?}",
            reply.headers
        );
    }
    if let Some(connection) = reply.header("connection") {
        assert!(
            !connection.to_ascii_lowercase().contains("x-resp-hop"),
            "upstream's Connection header relayed: {connection}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. exact metric values
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_after_a_known_sequence() {
    // No retries: the one 503 below must be relayed, not retried into a 200.
    let h = Harness::start("[upstream]\nendpoint = \"ENDPOINT\"\nretries = 0\n").await;

    let miss = h.images(PROJECT).await;
    assert_eq!(miss.cache_status(), "cph-cache; fwd=miss; stored");
    for _ in 0..2 {
        assert_eq!(h.images(PROJECT).await.cache_status(), "cph-cache; hit");
    }
    let bypass = h.get(&images_path(PROJECT), &[]).await;
    assert_eq!(bypass.status, StatusCode::OK);
    assert_eq!(bypass.cache_status(), "cph-cache; fwd=bypass");
    let invalid = h
        .get(&images_path("bad.project"), &[("x-auth-token", TOKEN)])
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert_eq!(invalid.error_code(), "CPHCACHE.0400");
    h.fake.fail_next(
        1,
        Failure::Status {
            status: 503,
            error_code: "CPS.0005".into(),
            error_msg: "service unavailable".into(),
        },
    );
    let relayed = h.images(OTHER_PROJECT).await;
    assert_eq!(relayed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        relayed.error_code(),
        "CPS.0005",
        "upstream error relayed unchanged"
    );
    assert_eq!(
        relayed.cache_status(),
        "cph-cache; fwd=miss; fwd-status=503"
    );

    let text = h.metrics().await;
    let value = |series: &str| -> f64 {
        metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    };
    assert_eq!(value(r#"cph_cache_requests_total{cache="hit"}"#), 2.0);
    assert_eq!(value(r#"cph_cache_requests_total{cache="miss"}"#), 2.0);
    assert_eq!(value(r#"cph_cache_requests_total{cache="bypass"}"#), 1.0);
    assert_eq!(value(r#"cph_cache_requests_total{cache="error"}"#), 1.0);
    assert_eq!(value(r#"cph_cache_requests_total{cache="stale"}"#), 0.0);
    assert_eq!(value(r#"cph_cache_requests_total{cache="collapsed"}"#), 0.0);
    assert_eq!(
        value(r#"cph_cache_upstream_requests_total{code="200"}"#),
        2.0
    );
    assert_eq!(
        value(r#"cph_cache_upstream_requests_total{code="503"}"#),
        1.0
    );
    let ratio = value("cph_cache_hit_ratio");
    assert!(
        (ratio - 2.0 / 5.0).abs() < 1e-9,
        "hit ratio {ratio}, want 2/5"
    );
    assert_eq!(value("cph_cache_entries"), 1.0);
    let size = value("cph_cache_size_bytes");
    assert!(
        size >= miss.body.len() as f64,
        "size {size} < body {}",
        miss.body.len()
    );
    assert_eq!(
        value(r#"cph_cache_request_duration_seconds_count{cache="hit"}"#),
        2.0
    );
    assert_eq!(
        value(r#"cph_cache_request_duration_seconds_count{cache="miss"}"#),
        2.0
    );
    let build = format!(
        "cph_cache_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&build), 1.0);
    // No label ever holds a project id or token (SPEC §6).
    for secret in [PROJECT, OTHER_PROJECT, TOKEN, "bad.project"] {
        assert!(!text.contains(secret), "{secret} leaked into /metrics");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. promtool
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn metrics_pass_promtool_check() {
    let h = Harness::start("").await;
    // Some traffic so histograms and labelled counters have samples.
    h.images(PROJECT).await;
    h.images(PROJECT).await;
    h.get(&images_path(PROJECT), &[]).await;
    h.get(&servers_path(PROJECT), &[("x-auth-token", TOKEN)])
        .await;
    h.admin_delete(&format!("/cache/{PROJECT}")).await;
    let text = h.metrics().await;

    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) if std::env::var("CPH_CACHE_SKIP_PROMTOOL").as_deref() == Ok("1") => {
            eprintln!("promtool not runnable ({error}); skipped: CPH_CACHE_SKIP_PROMTOOL=1");
            return;
        }
        Err(error) => panic!(
            "cannot run promtool ({error}); install it (Debian: apt-get install -y prometheus) \
             or set CPH_CACHE_SKIP_PROMTOOL=1"
        ),
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("promtool hung")
        .unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- metrics ---\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

// ---------------------------------------------------------------------------------------------
// 5. evictions on purge
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn purge_counts_evictions_per_entry_dropped() {
    let h = Harness::start("").await;
    h.images(PROJECT).await;
    h.get(
        &format!("{}?image_type=private", images_path(PROJECT)),
        &[("x-auth-token", TOKEN)],
    )
    .await;
    h.images(OTHER_PROJECT).await;
    let purged = r#"cph_cache_evictions_total{cause="purged"}"#;
    assert_eq!(h.metric(purged).await, 0.0);
    assert_eq!(h.metric("cph_cache_entries").await, 3.0);

    let reply = h.admin_delete(&format!("/cache/{PROJECT}")).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        h.metric(purged).await,
        2.0,
        "two entries of PROJECT dropped"
    );
    assert_eq!(h.metric("cph_cache_entries").await, 1.0);

    // Purging a project with nothing cached is a 204 and evicts nothing.
    let reply = h.admin_delete(&format!("/cache/{PROJECT}")).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(h.metric(purged).await, 2.0);

    // The purged project misses again; the other one still hits.
    assert_eq!(
        h.images(PROJECT).await.cache_status(),
        "cph-cache; fwd=miss; stored"
    );
    assert_eq!(
        h.images(OTHER_PROJECT).await.cache_status(),
        "cph-cache; hit"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. admin endpoints
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_endpoints_and_listeners_closed_after_stop() {
    let h = Harness::start("").await;
    let healthz = h.admin_get("/healthz").await;
    assert_eq!(healthz.status, StatusCode::OK);
    let readyz = h.admin_get("/readyz").await;
    assert_eq!(readyz.status, StatusCode::OK);

    let empty = h.admin_get("/cache").await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.json()["entries"], serde_json::json!([]));

    let first = h.images(PROJECT).await;
    h.images(PROJECT).await;
    let view = h.admin_get("/cache").await;
    assert_eq!(view.status, StatusCode::OK);
    assert!(
        view.header("content-type")
            .is_some_and(|t| t.starts_with("application/json"))
    );
    let json = view.json();
    let entries = json["entries"].as_array().expect("entries is an array");
    assert_eq!(entries.len(), 1, "{json}");
    let entry = &entries[0];
    assert_eq!(entry["project"], PROJECT);
    assert_eq!(entry["query"], "");
    assert!(
        entry["age_s"].as_u64().is_some_and(|age| age <= 5),
        "{entry}"
    );
    assert_eq!(entry["ttl_s"], 60, "default ttl");
    assert_eq!(entry["bytes"].as_u64(), Some(first.body.len() as u64));
    assert_eq!(entry["hits"], 1);

    let unknown = h.admin_get("/nope").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let post = h.send(h.admin, Method::POST, "/metrics", &[], "").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);

    let (proxy, admin) = (h.proxy, h.admin);
    h.stop().await;
    for addr in [proxy, admin] {
        let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connect hung");
        assert!(connect.is_err(), "{addr} still accepts after stop");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. graceful shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_finishes_in_flight_requests() {
    const LATENCY: Duration = Duration::from_millis(500);
    let h = Harness::start("").await;
    h.fake.set_latency(LATENCY);
    let fake = h.fake.clone();

    let (client, proxy) = (h.client.clone(), h.proxy);
    let in_flight = tokio::spawn(async move {
        send_with(
            &client,
            proxy,
            Method::GET,
            &images_path(PROJECT),
            &[("x-auth-token", TOKEN)],
            Bytes::new(),
        )
        .await
        .1
    });
    // Wait (woken by the arrival, no sleep) until the request is truly in flight upstream.
    tokio::time::timeout(
        Duration::from_secs(10),
        fake.until(|fake| fake.in_flight() > 0),
    )
    .await
    .expect("request never reached upstream");

    let stopping = Instant::now();
    h.stop().await;
    let stop_took = stopping.elapsed();

    let reply = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight request never finished")
        .expect("in-flight request failed");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.cache_status(), "cph-cache; fwd=miss; stored");
    assert!(reply.json()["phone_images"].is_array());
    // stop() waited for the request rather than cutting it off.
    assert!(
        stop_took >= LATENCY / 2,
        "stop returned after {stop_took:?}, before the in-flight request could finish"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. max_header_bytes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_request_headers_get_431_without_upstream_call() {
    let h = Harness::start("[server]\nmax_header_bytes = \"8KiB\"\n").await;

    // Well under the limit: served normally.
    let small = "a".repeat(2 * 1024);
    let ok = h
        .get(
            &images_path(PROJECT),
            &[("x-auth-token", TOKEN), ("x-padding", &small)],
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(h.fake.requests_total(), 1);

    let big = "a".repeat(20 * 1024);
    let reply = h
        .get(
            &images_path(OTHER_PROJECT),
            &[("x-auth-token", TOKEN), ("x-padding", &big)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(
        h.fake.requests_total(),
        1,
        "oversized request reached upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. h2c
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_gets_miss_then_hit() {
    let h = Harness::start("").await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let path = images_path(PROJECT);
    let get = || {
        send_with(
            &h2,
            h.proxy,
            Method::GET,
            &path,
            &[("x-auth-token", TOKEN)],
            Bytes::new(),
        )
    };
    let (version, first) = get().await;
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.cache_status(), "cph-cache; fwd=miss; stored");
    let (version, second) = get().await;
    assert_eq!(version, Version::HTTP_2);
    assert_eq!(second.cache_status(), "cph-cache; hit");
    assert_eq!(first.body, second.body);
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}
