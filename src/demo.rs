//! `cph-cache demo`: the sidecar in front of the embedded simulated CPH endpoint, with nothing
//! to configure, no credentials and no network. It prints what to `curl`.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus::Registry;

use crate::auth::Secrets;
use crate::config::{Config, ConfigError, Endpoint, Scheme};
use crate::fake_cph::{AuthCheck, FakeCph};
use crate::upstream::sign;
use crate::{App, Listeners, StartError};

/// The config `demo` runs with (listen addresses may be overridden on the command line).
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// Throw-away keys: the sidecar signs with them (aksk mode) and the simulated endpoint checks
/// the signatures, so callers need no credential at all.
pub const DEMO_ACCESS_KEY: &str = "DEMOACCESSKEY0000000";
pub const DEMO_SECRET_KEY: &str = "demo-secret-key-not-a-real-one-000000000";

/// A project id as CPH issues them (32 lower-case hex characters).
pub const DEMO_PROJECT: &str = "0123456789abcdef0123456789abcdef";

/// What a real CPH round trip costs from a cloud VM: misses should feel like it.
const SIMULATED_LATENCY: Duration = Duration::from_millis(120);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("starting the simulated CPH endpoint: {0}")]
    Fake(#[from] std::io::Error),
    #[error(
        "--listen {0}: demo acts with its own keys and no client token, so it listens on loopback only"
    )]
    NotLoopback(SocketAddr),
}

/// Runs until `shutdown` completes.
pub async fn run(
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    let fake = FakeCph::bind().await?;
    fake.set_latency(SIMULATED_LATENCY);
    fake.set_auth(AuthCheck::AkSk {
        access_key: DEMO_ACCESS_KEY.to_owned(),
        secret_key: DEMO_SECRET_KEY.to_owned(),
    });

    let mut config = Config::from_toml_str(DEMO_CONFIG)?;
    config.upstream.endpoint = Endpoint {
        scheme: Scheme::Http,
        authority: fake
            .addr()
            .to_string()
            .parse()
            .map_err(|_| std::io::Error::other("simulated endpoint address"))?,
        base_path: String::new(),
    };
    if let Some(listen) = listen {
        if !listen.ip().is_loopback() {
            return Err(DemoError::NotLoopback(listen));
        }
        config.server.listen = listen;
    }
    if let Some(admin_listen) = admin_listen {
        config.server.admin_listen = admin_listen;
    }
    crate::telemetry::init(&config.log);
    let listeners = Listeners::bind(&config).await?;
    let proxy = listeners.proxy.local_addr()?;
    let admin = listeners.admin.local_addr()?;
    let secrets = Secrets {
        signing: Some(sign::Credentials::new(
            DEMO_ACCESS_KEY,
            DEMO_SECRET_KEY,
            None,
        )),
        client_token: None,
    };
    let app = App::new(config, secrets, Registry::new())?;
    println!("{}", instructions(proxy, admin, &fake.url()));
    app.serve(listeners, shutdown).await;
    fake.shutdown();
    Ok(())
}

fn instructions(proxy: SocketAddr, admin: SocketAddr, upstream: &str) -> String {
    format!(
        "cph-cache demo: caching {upstream} (simulated CPH, ~{latency} ms per call) on http://{proxy}
It signs every upstream request with throw-away AK/SK keys (aksk mode), so callers send no credential.

The image list (run it twice: the first is a miss, the second a hit):
  curl -si http://{proxy}/v1/{DEMO_PROJECT}/cloud-phone/phone-images

Only private images (another cache key):
  curl -si 'http://{proxy}/v1/{DEMO_PROJECT}/cloud-phone/phone-images?image_type=private'

Hit rate and latency, and what is cached:
  curl -s http://{admin}/metrics | grep '^cph_cache_'
  curl -s http://{admin}/cache

Drop the project's entries:
  curl -si -X DELETE http://{admin}/cache/{DEMO_PROJECT}

Ctrl-C stops.",
        latency = SIMULATED_LATENCY.as_millis()
    )
}
