#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use support::*;

#[tokio::test]
async fn miss_then_hit() {
    let h = Harness::start("").await;
    let first = h.images(PROJECT).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.cache_status(), "cph-cache; fwd=miss; stored");
    let second = h.images(PROJECT).await;
    assert_eq!(second.cache_status(), "cph-cache; hit");
    assert_eq!(first.body, second.body);
    assert_eq!(h.fake.image_requests(PROJECT), 1);
}
