//! Secret hygiene: tokens, AK, SK and the client token never appear in logs (at
//! `RUST_LOG=trace`), metrics, error bodies or `GET /cache`. Runs the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cph_cache::fake_cph::AuthCheck;
use http::Method;
use support::*;

const AK: &str = "AKSECRETVALUE0000001";
const SK: &str = "SKSECRETVALUEdo-not-log-me-0000000000002";
const CLIENT_TOKEN: &str = "client-token-secret-0000003";
const WRONG_GUESS: &str = "client-token-guess-0000004";
const T1: &str = "iam-token-secret-valid-0000005";
const T3: &str = "iam-token-secret-invalid-0000006";

/// The binary with `RUST_LOG=trace`, its stderr collected on a thread; returns once it logs
/// that it is serving (with the bound addresses).
struct Sidecar {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Sidecar {
    fn start(config: &str, env: &[(&str, &str)]) -> Sidecar {
        let path = std::env::temp_dir().join(format!(
            "cph-cache-secrets-{}-{}.toml",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cph-cache"));
        command
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let serving = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("sidecar did not report serving");
            if line.contains("serving") {
                break line;
            }
        };
        let field = |name: &str| -> SocketAddr {
            let start = serving.find(&format!(" {name}=")).unwrap() + name.len() + 2;
            serving[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Sidecar {
            child,
            proxy: field("listen"),
            admin: field("admin_listen"),
            stderr: rx,
        }
    }

    /// SIGTERM, wait for exit 0, and return everything it logged.
    fn stop(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "exit status {exit:?}");
        let mut logs = String::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            logs.push_str(&line);
            logs.push('\n');
        }
        logs
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

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
    let sidecar = Sidecar::start(&config, &[]);
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
