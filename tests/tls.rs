//! HTTPS to the upstream: a local TLS server whose certificate is issued by a test CA (rcgen),
//! trusted through `upstream.ca_file` only.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use cph_cache::fake_cph::{FakeCph, image_list_body};
use support::*;

struct TlsUpstream {
    addr: std::net::SocketAddr,
    ca_pem: String,
    requests: Arc<AtomicUsize>,
}

/// A test CA, a leaf for 127.0.0.1 signed by it, and an HTTPS server answering the image list.
async fn tls_upstream() -> TlsUpstream {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |request: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let project = request
                        .uri()
                        .path()
                        .split('/')
                        .nth(2)
                        .unwrap_or("")
                        .to_owned();
                    let request_id = "0123456789abcdef0123456789abcdef";
                    let body = image_list_body(&project, 0, request_id);
                    let response = Response::builder()
                        .header("content-type", "application/json")
                        .header("x-request-id", request_id)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsUpstream {
        addr,
        ca_pem: ca.pem(),
        requests,
    }
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("cph-cache-tls-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file() {
    let upstream = tls_upstream().await;
    let ca_file = temp_file("ca.pem", &upstream.ca_pem);
    let toml = format!(
        "[upstream]\nendpoint = \"https://{}\"\nca_file = \"{}\"\n",
        upstream.addr,
        ca_file.display()
    );
    let fake = FakeCph::bind().await.unwrap(); // unused upstream; the harness wants one
    let h = Harness::start_with(fake, config_for("unused", &toml)).await;

    let first = h.images(PROJECT).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.cache_status(), "cph-cache; fwd=miss; stored");
    assert_eq!(
        first.body,
        image_list_body(PROJECT, 0, "0123456789abcdef0123456789abcdef")
    );
    let second = h.images(PROJECT).await;
    assert_eq!(second.cache_status(), "cph-cache; hit");
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_ca_is_a_502() {
    let upstream = tls_upstream().await;
    let toml = format!("[upstream]\nendpoint = \"https://{}\"\n", upstream.addr);
    let fake = FakeCph::bind().await.unwrap();
    let h = Harness::start_with(fake, config_for("unused", &toml)).await;

    let reply = h.images(PROJECT).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_code(), "CPHCACHE.0502");
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 0);
}
