//! Which requests are the cached route, which pass through, which are refused.
//!
//! The cached route is exactly `GET|HEAD /v1/{project_id}/cloud-phone/phone-images[?query]`.
//! A path of that shape with a bad project id (`..`, `%2F`, 65 characters…) is refused here,
//! before anything else runs, so it can never reach the upstream or the cache. Paths with dot
//! segments are refused on every route: the upstream might normalise them into a different
//! resource than the one we classified.

use http::{Method, Uri};

use crate::cache::key::{NormalizedQuery, ProjectId};
use crate::config::Passthrough;
use crate::error::ProxyError;

const PREFIX: &str = "/v1/";
const SUFFIX: &str = "/cloud-phone/phone-images";

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// ListCloudPhoneImages, answered from the cache.
    Images {
        project: ProjectId,
        query: NormalizedQuery,
    },
    /// The cached route's path, refused (bad project id or method): still a cached-route request
    /// for the metrics.
    ImagesRefused(ProxyError),
    /// Any other CPH call, forwarded unchanged.
    Passthrough,
    /// Any other call, refused by `upstream.passthrough` or as malformed.
    Refused(ProxyError),
}

pub fn classify(method: &Method, uri: &Uri, passthrough: Passthrough) -> Route {
    let path = uri.path();
    if let Some(project) = path
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_suffix(SUFFIX))
    {
        let Some(project) = ProjectId::parse(project) else {
            return Route::ImagesRefused(ProxyError::InvalidProjectId);
        };
        if method != Method::GET && method != Method::HEAD {
            return Route::ImagesRefused(ProxyError::MethodNotAllowed { allow: "GET, HEAD" });
        }
        return Route::Images {
            project,
            query: NormalizedQuery::from_raw(uri.query()),
        };
    }
    if has_dot_segment(path) {
        return Route::Refused(ProxyError::MalformedRequest("path has a dot segment"));
    }
    match passthrough {
        Passthrough::None => Route::Refused(ProxyError::NotServed),
        Passthrough::ReadOnly if method != Method::GET && method != Method::HEAD => {
            Route::Refused(ProxyError::MethodNotAllowed { allow: "GET, HEAD" })
        }
        Passthrough::ReadOnly | Passthrough::All => Route::Passthrough,
    }
}

/// `.` or `..` as a segment, also percent-encoded (`%2e`).
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".").replace("%2E", ".");
        decoded == "." || decoded == ".."
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, uri: &str, passthrough: Passthrough) -> Route {
        classify(&method, &uri.parse().unwrap(), passthrough)
    }

    const PID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn cached_route() {
        let uri = format!("/v1/{PID}/cloud-phone/phone-images?b=2&a=1");
        let Route::Images { project, query } = route(Method::GET, &uri, Passthrough::None) else {
            panic!("not the cached route");
        };
        assert_eq!(project.as_str(), PID);
        assert_eq!(query.as_str(), "a=1&b=2");
        assert!(matches!(
            route(Method::HEAD, &uri, Passthrough::None),
            Route::Images { .. }
        ));
    }

    #[test]
    fn bad_project_ids_are_refused() {
        let long = "a".repeat(65);
        for pid in ["..", "a%2Fb", "", long.as_str(), "a/b", "%2e%2e"] {
            let uri = format!("/v1/{pid}/cloud-phone/phone-images");
            assert_eq!(
                route(Method::GET, &uri, Passthrough::All),
                Route::ImagesRefused(ProxyError::InvalidProjectId),
                "{pid}"
            );
        }
    }

    #[test]
    fn methods_on_cached_route() {
        let uri = format!("/v1/{PID}/cloud-phone/phone-images");
        assert!(matches!(
            route(Method::POST, &uri, Passthrough::All),
            Route::ImagesRefused(ProxyError::MethodNotAllowed { .. })
        ));
    }

    #[test]
    fn passthrough_modes() {
        let uri = format!("/v1/{PID}/cloud-phone/servers");
        assert_eq!(
            route(Method::GET, &uri, Passthrough::None),
            Route::Refused(ProxyError::NotServed)
        );
        assert_eq!(
            route(Method::GET, &uri, Passthrough::ReadOnly),
            Route::Passthrough
        );
        assert!(matches!(
            route(Method::POST, &uri, Passthrough::ReadOnly),
            Route::Refused(ProxyError::MethodNotAllowed { .. })
        ));
        assert_eq!(
            route(Method::POST, &uri, Passthrough::All),
            Route::Passthrough
        );
        assert!(matches!(
            route(Method::GET, "/v1/../admin", Passthrough::All),
            Route::Refused(ProxyError::MalformedRequest(_))
        ));
    }
}
