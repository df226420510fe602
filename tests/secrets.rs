//! Secret hygiene: tokens, AK, SK and the client token never appear in logs (at
//! `RUST_LOG=trace`), metrics, error bodies or `GET /cache`. Runs the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;

use cph_cache::fake_cph::AuthCheck;
use http::Method;
use support::binary::Sidecar;
use support::*;

const AK: &str = "AKSECRETVALUE0000001";
const SK: &str = "SKSECRETVALUEdo-not-log-me-0000000000002";
const CLIENT_TOKEN: &str = "client-token-secret-0000003";
const WRONG_GUESS: &str = "client-token-guess-0000004";
const T1: &str = "iam-token-secret-valid-0000005";
const T3: &str = "iam-token-secret-invalid-0000006";

fn assert_no_secrets(what: &str, text: &str) {
    for secret in [AK, SK, CLIENT_TOKEN, WRONG_GUESS, T1, T3] {
        assert!(!text.contains(secret), "{what} contains {secret}:\n{text}");
    }
}

async fn send(
    h: &Harness,
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    h.send(addr, method, path, headers, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aksk_secrets_stay_out_of_logs_metrics_and_bodies() {
    // The harness's own sidecar is unused here; it provides the client and the fake.
    let h = Harness::start("").await;
    h.fake.set_auth(AuthCheck::AkSk {
        access_key: AK.into(),
        secret_key: SK.into(),
    });
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nendpoint = \"{}\"\npassthrough = \"all\"\n\
         [auth]\nmode = \"aksk\"\naccess_key_env = \"TEST_AK\"\nsecret_key_env = \"TEST_SK\"\n\
         client_token_env = \"TEST_CLIENT_TOKEN\"\n",
        h.fake.url()
    );
    let sidecar = Sidecar::start(
        "trace",
        &config,
        &[
            ("TEST_AK", AK),
            ("TEST_SK", SK),
            ("TEST_CLIENT_TOKEN", CLIENT_TOKEN),
        ],
    );
    let path = images_path(PROJECT);
    let mut bodies = String::new();
    for headers in [
        vec![("x-auth-token", CLIENT_TOKEN)],
        vec![("x-auth-token", CLIENT_TOKEN)],
        vec![("x-auth-token", WRONG_GUESS)],
        vec![],
    ] {
        let reply = send(&h, sidecar.proxy, Method::GET, &path, &headers).await;
        bodies.push_str(&format!(
            "{:?}{}",
            reply.headers,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    let passthrough = send(
        &h,
        sidecar.proxy,
        Method::GET,
        &format!("/v1/{PROJECT}/cloud-phone/servers"),
        &[("x-auth-token", CLIENT_TOKEN)],
    )
    .await;
    assert_eq!(passthrough.status, 200);
    assert_eq!(
        h.fake.image_requests(PROJECT),
        1,
        "one signed fill, then hits"
    );
    let metrics = send(&h, sidecar.admin, Method::GET, "/metrics", &[]).await;
    let cache = send(&h, sidecar.admin, Method::GET, "/cache", &[]).await;
    let logs = sidecar.stop();

    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "not logging at trace:\n{logs}"
    );
    assert_no_secrets("logs", &logs);
    assert_no_secrets("responses", &bodies);
    assert_no_secrets("/metrics", &String::from_utf8_lossy(&metrics.body));
    assert_no_secrets("/cache", &String::from_utf8_lossy(&cache.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_tokens_stay_out_of_logs_metrics_and_bodies() {
    let h = Harness::start("").await;
    let mut tokens: HashMap<String, Option<HashSet<String>>> = HashMap::new();
    tokens.insert(T1.into(), None);
    h.fake.set_auth(AuthCheck::Tokens(tokens));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nendpoint = \"{}\"\n",
        h.fake.url()
    );
    let sidecar = Sidecar::start("trace", &config, &[]);
    let path = images_path(PROJECT);
    let mut bodies = String::new();
    for token in [T1, T1, T3, T3] {
        let reply = send(
            &h,
            sidecar.proxy,
            Method::GET,
            &path,
            &[("x-auth-token", token)],
        )
        .await;
        bodies.push_str(&format!(
            "{:?}{}",
            reply.headers,
            String::from_utf8_lossy(&reply.body)
        ));
    }
    let metrics = send(&h, sidecar.admin, Method::GET, "/metrics", &[]).await;
    let cache = send(&h, sidecar.admin, Method::GET, "/cache", &[]).await;
    let logs = sidecar.stop();
    assert_no_secrets("logs", &logs);
    assert_no_secrets("responses", &bodies);
    assert_no_secrets("/metrics", &String::from_utf8_lossy(&metrics.body));
    assert_no_secrets("/cache", &String::from_utf8_lossy(&cache.body));
}

#[test]
fn a_missing_secret_variable_is_a_config_error_naming_it() {
    let path = std::env::temp_dir().join(format!(
        "cph-cache-secrets-missing-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &path,
        "[upstream]\nendpoint = \"http://127.0.0.1:1\"\n[auth]\nmode = \"aksk\"\naccess_key_env = \"CPH_TEST_UNSET_AK_VAR\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_cph-cache"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("CPH_TEST_UNSET_AK_VAR")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CPH_TEST_UNSET_AK_VAR"), "{stderr}");
    assert!(stderr.contains("auth.access_key_env"), "{stderr}");
}
