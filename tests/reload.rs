//! SIGHUP reloads the config file: new cache windows apply to entries already stored, a bad
//! file is logged and the running config kept, and keys that need a restart say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Duration;

use http::Method;
use support::binary::Sidecar;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_windows_and_keeps_the_old_config_on_error() {
    // The harness provides the simulated CPH and a client; its own sidecar is not used.
    let h = Harness::start("").await;
    let config = |endpoint: &str, ttl: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nendpoint = \"{endpoint}\"\n\
             [cache]\nttl = \"{ttl}\"\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\nrefresh_ahead = 0.0\n"
        )
    };
    let sidecar = Sidecar::start("info", &config(&h.fake.url(), "60s"), &[]);
    let images = || async {
        h.send(
            sidecar.proxy,
            Method::GET,
            &images_path(PROJECT),
            &[("x-auth-token", TOKEN)],
            "",
        )
        .await
    };
    assert_eq!(images().await.cache_status(), "cph-cache; fwd=miss; stored");
    assert_eq!(images().await.cache_status(), "cph-cache; hit");

    // A bad file: logged, and the running config stays.
    std::fs::write(&sidecar.config_path, "[server]\nlisen = 1\n").unwrap();
    sidecar.signal("HUP");
    let rejected = sidecar.wait_for_log("reload rejected");
    assert!(rejected.contains("server.lisen"), "{rejected}");
    assert_eq!(images().await.cache_status(), "cph-cache; hit");

    // A shorter ttl applies to the entry stored under the old one.
    std::fs::write(&sidecar.config_path, config(&h.fake.url(), "100ms")).unwrap();
    sidecar.signal("HUP");
    sidecar.wait_for_log("config reloaded");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(images().await.cache_status(), "cph-cache; fwd=miss; stored");
    assert_eq!(h.fake.image_requests(PROJECT), 2);

    // A new endpoint needs a restart: logged, and the old one kept.
    std::fs::write(&sidecar.config_path, config("http://127.0.0.1:1", "100ms")).unwrap();
    sidecar.signal("HUP");
    let warning = sidecar.wait_for_log("needs a restart");
    assert!(warning.contains("upstream"), "{warning}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(images().await.status, 200, "still the old endpoint");
    assert_eq!(h.fake.image_requests(PROJECT), 3);
    sidecar.stop();
}
