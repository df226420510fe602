#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `cph-cache` binary as an operator runs it (SPEC §2): `--version`, `check` (exit 0, or 2
//! naming the key and line), `serve` until SIGTERM (exit 0) and `demo`. Listeners are on
//! 127.0.0.1:0; readiness is read from the process's own output, never waited for by sleeping.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_cph-cache");
/// Generous: a debug build under a loaded CI runner can take a while to start.
const PATIENCE: Duration = Duration::from_secs(20);
/// An endpoint that is never contacted by these tests (port 1 refuses connections).
const NOWHERE: &str = "http://127.0.0.1:1";

/// A config file under the temp dir, unique per process and call, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "cph-cache-cli-test-{}-{n}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The binary with an environment that cannot steer it: no `CPH_CACHE_CONFIG`, no `RUST_LOG`.
fn command() -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("CPH_CACHE_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run(args: &[&str]) -> Output {
    let output = command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    tokio::time::timeout(PATIENCE, output)
        .await
        .unwrap_or_else(|_| panic!("cph-cache {args:?} did not exit"))
        .unwrap()
}

async fn check(path: &Path) -> Output {
    run(&["check", "--config", path.to_str().unwrap()]).await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("child still running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Reads lines until one contains `needle`; returns every line read, that one last.
async fn read_until<R: AsyncBufRead + Unpin>(lines: &mut Lines<R>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains(needle);
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    match found {
        Ok(true) => seen,
        Ok(false) => panic!(
            "output ended before a line with {needle:?}:\n{}",
            seen.join("\n")
        ),
        Err(_) => panic!("no line with {needle:?} in time:\n{}", seen.join("\n")),
    }
}

/// Reads the rest of a stream in the background so the child never blocks on a full pipe.
fn drain<R: AsyncRead + Unpin + Send + 'static>(mut reader: R) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut rest = String::new();
        let _ = reader.read_to_string(&mut rest).await;
        rest
    })
}

async fn exit_code(child: &mut Child) -> Option<i32> {
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("process did not exit after SIGTERM")
        .unwrap()
        .code()
}

// ---------------------------------------------------------------------------------------------
// 10. --version
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn version() {
    let output = run(&["--version"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("cph-cache {}", env!("CARGO_PKG_VERSION"))
    );
}

// ---------------------------------------------------------------------------------------------
// 11. check accepts valid configs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn check_accepts_a_minimal_config() {
    let config = TempConfig::new(&format!("[upstream]\nendpoint = \"{NOWHERE}\"\n"));
    let output = check(config.path()).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[tokio::test]
async fn check_accepts_the_shipped_configs() {
    for file in ["config/cph-cache.toml", "config/demo.toml"] {
        let output = check(&repo_file(file)).await;
        assert_eq!(output.status.code(), Some(0), "{file}: {}", stderr(&output));
    }
}

// ---------------------------------------------------------------------------------------------
// 12. check rejects bad configs with exit 2, naming the key (and line)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn check_rejections_name_the_key_and_line() {
    let endpoint = format!("[upstream]\nendpoint = \"{NOWHERE}\"\n");
    // (config, key the message must name, line it must give if any)
    let cases: Vec<(String, &str, Option<usize>)> = vec![
        (
            format!("[server]\nlisen = \"x\"\n{endpoint}"),
            "server.lisen",
            Some(2),
        ),
        (
            format!("[cache]\nttl = \"5 parsecs\"\n{endpoint}"),
            "cache.ttl",
            Some(2),
        ),
        (
            format!("[cache]\nttl = \"5s\"\nmax_size = \"64 MiBs\"\n{endpoint}"),
            "cache.max_size",
            Some(3),
        ),
        (
            format!("[server]\nlisten = \"nowhere\"\n{endpoint}"),
            "server.listen",
            Some(2),
        ),
        (
            format!("[server]\nlisten = \"127.0.0.1:99999\"\n{endpoint}"),
            "server.listen",
            Some(2),
        ),
        (
            "[cache]\nttl = \"5s\"\n".to_owned(),
            "upstream.endpoint",
            None,
        ),
        (
            format!("[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"aksk\"\n{endpoint}"),
            "auth.client_token_env",
            None,
        ),
    ];
    for (text, key, line) in cases {
        let config = TempConfig::new(&text);
        let output = check(config.path()).await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{text}\nstderr: {err}");
        assert!(
            err.contains(key),
            "{text}\nstderr does not name {key}: {err}"
        );
        if let Some(line) = line {
            assert!(
                err.contains(&format!("line {line}")),
                "{text}\nstderr does not give line {line}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn check_of_a_missing_file_names_the_path() {
    let path = std::env::temp_dir().join(format!(
        "cph-cache-cli-test-{}-missing.toml",
        std::process::id()
    ));
    let output = check(&path).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(path.to_str().unwrap()),
        "stderr does not name {}: {err}",
        path.display()
    );
}

// ---------------------------------------------------------------------------------------------
// 13. serve
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn serve_with_a_bad_config_exits_2() {
    let config = TempConfig::new("[server]\nlisen = \"x\"\n");
    let output = run(&["serve", "--config", config.path().to_str().unwrap()]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("server.lisen"), "{err}");
}

#[tokio::test]
async fn serve_runs_until_sigterm_then_exits_0() {
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nendpoint = \"{NOWHERE}\"\n[log]\nlevel = \"info\"\n"
    ));
    let mut child = command()
        .args(["serve", "--config", config.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    read_until(&mut lines, "serving").await;
    let rest = drain(lines.into_inner());

    sigterm(&child);
    let code = exit_code(&mut child).await;
    let rest = rest.await.unwrap();
    assert_eq!(
        code,
        Some(0),
        "serve did not exit cleanly; stderr after start:\n{rest}"
    );
}

#[tokio::test]
async fn serve_answers_on_the_addresses_it_logs() {
    // JSON logs, so the bound addresses are read from fields rather than scraped from text.
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nendpoint = \"{NOWHERE}\"\n[log]\nlevel = \"info\"\nformat = \"json\"\n"
    ));
    let mut child = command()
        .args(["serve", "--config", config.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = read_until(&mut lines, "serving").await.pop().unwrap();
    let rest = drain(lines.into_inner());
    let record: serde_json::Value = serde_json::from_str(&serving)
        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {serving}"));
    let addr = |field: &str| -> std::net::SocketAddr {
        let value = record["fields"][field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {serving}"));
        let addr: std::net::SocketAddr = value.parse().unwrap();
        assert_ne!(
            addr.port(),
            0,
            "logged the configured port 0, not the bound one: {serving}"
        );
        addr
    };
    let (proxy, admin) = (addr("listen"), addr("admin_listen"));

    let healthz = get(&format!("http://{admin}/healthz"), &[]).await;
    assert_eq!(healthz.status, StatusCode::OK);
    let readyz = get(&format!("http://{admin}/readyz"), &[]).await;
    assert_eq!(readyz.status, StatusCode::OK);
    // The proxy listener answers too: a bad project id is refused without any upstream.
    let refused = get(
        &format!("http://{proxy}/v1/bad.id/cloud-phone/phone-images"),
        &[("x-auth-token", "t")],
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.error_code(), "CPHCACHE.0400");

    sigterm(&child);
    let code = exit_code(&mut child).await;
    let rest = rest.await.unwrap();
    assert_eq!(
        code,
        Some(0),
        "serve did not exit cleanly; stderr after start:\n{rest}"
    );
}

// ---------------------------------------------------------------------------------------------
// 14. demo
// ---------------------------------------------------------------------------------------------

/// The proxy URL of the printed image-list `curl`, the token it sends if it sends one, and the
/// URL of the printed metrics `curl`.
fn parse_demo(output: &[String]) -> (String, Option<String>, String) {
    let images = output
        .iter()
        .find(|l| l.contains("curl") && l.contains("/cloud-phone/phone-images"))
        .unwrap_or_else(|| panic!("no image-list curl printed:\n{}", output.join("\n")));
    let token = images
        .split("X-Auth-Token: ")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .map(str::to_owned);
    let url_in = |line: &str| -> String {
        let start = line.find("http://").expect("a URL in the line");
        line[start..]
            .split(|c: char| c.is_whitespace() || c == '\'')
            .next()
            .unwrap()
            .to_owned()
    };
    let images_url = url_in(images);
    let metrics = output
        .iter()
        .find(|l| l.contains("curl") && l.contains("/metrics"))
        .unwrap_or_else(|| panic!("no metrics curl printed:\n{}", output.join("\n")));
    (images_url, token, url_in(metrics))
}

async fn get(url: &str, headers: &[(&str, &str)]) -> support::Reply {
    let client = support::client();
    let mut request = http::Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(PATIENCE, client.request(request))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = response.into_parts();
    use http_body_util::BodyExt;
    support::Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn demo_prints_working_curl_commands_and_exits_0_on_sigterm() {
    let mut child = command()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = drain(child.stderr.take().unwrap());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let printed = read_until(&mut lines, "Ctrl-C").await;
    let stdout_rest = drain(lines.into_inner());
    // The printed image-list curl is what a first-time user runs: it must work as printed,
    // with whatever credential it shows (an X-Auth-Token in passthrough mode, none in aksk mode).
    let (images_url, token, metrics_url) = parse_demo(&printed);
    for url in [&images_url, &metrics_url] {
        let authority: std::net::SocketAddr = url["http://".len()..]
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("printed URL {url} has no IP:port ({e})"));
        assert_ne!(
            authority.port(),
            0,
            "demo printed the configured port 0, not the bound one: {url}"
        );
    }

    let headers: Vec<(&str, &str)> = token
        .as_deref()
        .map(|token| ("x-auth-token", token))
        .into_iter()
        .collect();
    let first = get(&images_url, &headers).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert!(first.json()["phone_images"].is_array());
    assert_eq!(first.cache_status(), "cph-cache; fwd=miss; stored");
    let second = get(&images_url, &headers).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.cache_status(), "cph-cache; hit");
    assert_eq!(first.body, second.body);

    let metrics = get(&metrics_url, &[]).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert_eq!(
        support::metric_value(&metrics, r#"cph_cache_requests_total{cache="hit"}"#),
        Some(1.0),
        "{metrics}"
    );

    sigterm(&child);
    let code = exit_code(&mut child).await;
    let stderr = stderr.await.unwrap();
    let _ = stdout_rest.await;
    assert_eq!(
        code,
        Some(0),
        "demo did not exit cleanly; stderr:\n{stderr}"
    );
}
