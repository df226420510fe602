//! Shared test harness: the simulated CPH endpoint and the sidecar, both on 127.0.0.1:0, and a
//! plain HTTP/1.1 client. Nothing here sleeps: both listeners are bound before anything is
//! sent, so they are ready by construction.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod binary;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cph_cache::fake_cph::FakeCph;
use cph_cache::{App, Config, Listeners, Secrets};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const PROJECT: &str = "0123456789abcdef0123456789abcdef";
pub const OTHER_PROJECT: &str = "fedcba9876543210fedcba9876543210";
pub const TOKEN: &str = "token-one";

pub fn images_path(project: &str) -> String {
    format!("/v1/{project}/cloud-phone/phone-images")
}

/// A response read in full.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn cache_status(&self) -> &str {
        self.header("cache-status").unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The CPH error code of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error_code"].as_str().unwrap().to_owned()
    }
}

pub struct Harness {
    pub fake: FakeCph,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub client: Client<HttpConnector, Full<Bytes>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Parses `toml` with `ENDPOINT` replaced by `endpoint`; adds an `[upstream]` table with just
/// the endpoint when `toml` has none.
pub fn config_for(endpoint: &str, toml: &str) -> Config {
    let text = if toml.contains("[upstream]") {
        toml.replace("ENDPOINT", endpoint)
    } else {
        format!("[upstream]\nendpoint = \"{endpoint}\"\n{toml}")
    };
    Config::from_toml_str(&text).unwrap_or_else(|e| panic!("test config rejected: {e}\n{text}"))
}

impl Harness {
    /// A fresh simulated CPH and a sidecar in front of it, configured by `toml` (see [`config_for`]).
    pub async fn start(toml: &str) -> Harness {
        let fake = FakeCph::bind().await.unwrap();
        let config = config_for(&fake.url(), toml);
        Self::start_with(fake, config).await
    }

    pub async fn start_with(fake: FakeCph, config: Config) -> Harness {
        Self::start_with_secrets(fake, config, Secrets::default()).await
    }

    pub async fn start_with_secrets(fake: FakeCph, config: Config, secrets: Secrets) -> Harness {
        let listeners = Listeners {
            proxy: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let proxy = listeners.proxy.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let app = App::new(config, secrets, Registry::new()).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listeners, async {
            let _ = rx.await;
        }));
        Harness {
            fake,
            proxy,
            admin,
            client: client(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the sidecar gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .expect("request timed out")
            .expect("request failed");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// GET through the proxy listener.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(self.proxy, Method::GET, path, headers, "").await
    }

    /// GET of the image list of `project` with the default test token.
    pub async fn images(&self, project: &str) -> Reply {
        self.get(&images_path(project), &[("x-auth-token", TOKEN)])
            .await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        self.send(self.admin, Method::GET, path, &[], "").await
    }

    pub async fn admin_delete(&self, path: &str) -> Reply {
        self.send(self.admin, Method::DELETE, path, &[], "").await
    }

    pub async fn metrics(&self) -> String {
        let reply = self.admin_get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK);
        String::from_utf8(reply.body.to_vec()).unwrap()
    }

    /// The value of one sample, e.g. `metric(r#"cph_cache_requests_total{cache="hit"}"#)`;
    /// panics when the series is missing.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in\n{text}"))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.fake.shutdown();
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}
