#![allow(clippy::unwrap_used)] // tests may unwrap
//! End-to-end pinned TLS: a tokio-rustls server and a tonic server (`ServerTlsConfig`) with identities
//! from `CertificateAuthority`, dialled with `tls_connect` / `connect_pinned`.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pki::{CertificateAuthority, ConnectFailures, Pin, PkiError, ServerIdentity};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tower::ServiceExt;

const TIMEOUT: Duration = Duration::from_secs(5);

fn new_ca() -> (tempfile::TempDir, CertificateAuthority) {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    (dir, ca)
}

/// A raw tokio-rustls server with `id`: completes handshakes, then echoes one line.
async fn rustls_server(id: &ServerIdentity) -> String {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(id.cert_chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    common::echo_server(acceptor).await
}

#[tokio::test]
async fn handshake_succeeds_with_the_right_pin() {
    let (_dir, ca) = new_ca();
    let id = ca.issue_server_identity(&["127.0.0.1".into()]).unwrap();
    let addr = rustls_server(&id).await;

    let mut tls = pki::tls_connect(&addr, &ca.pin(), TIMEOUT).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn wrong_ca_is_a_pin_mismatch() {
    let (_dir, ca) = new_ca();
    let (_dir2, other) = new_ca();
    let id = ca.issue_server_identity(&[]).unwrap();
    let addr = rustls_server(&id).await;

    let err = pki::tls_connect(&addr, &other.pin(), TIMEOUT).await.unwrap_err();
    let PkiError::PinMismatch {
        addr: seen_addr,
        expected,
        seen,
    } = &err
    else {
        panic!("expected PinMismatch, got {err:?}");
    };
    assert_eq!(seen_addr, &addr);
    assert_eq!(expected, &other.pin());
    let chain = id.cert_chain().unwrap();
    assert_eq!(seen, &vec![Pin::of_der(&chain[0]), ca.pin()]);
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "coordinator at {addr} presented a certificate chain whose CA does not match the pin {}; check the --ca-pin printed by `nimbusctl token create`",
            other.pin()
        )),
        "{msg}"
    );
    assert!(msg.contains(&ca.pin().to_string()), "{msg}");
    assert!(err.is_pin_mismatch() && !err.is_unreachable());
}

#[tokio::test]
async fn pinned_ca_in_chain_does_not_vouch_for_a_foreign_leaf() {
    // An impostor appends the real CA certificate to a chain issued by its own CA.
    let (_dir, real) = new_ca();
    let (_dir2, impostor) = new_ca();
    let mut id = impostor.issue_server_identity(&[]).unwrap();
    id.cert_chain_pem.push_str(&real.cert_pem());
    let addr = rustls_server(&id).await;

    let err = pki::tls_connect(&addr, &real.pin(), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, PkiError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn certificate_without_the_server_name_is_refused() {
    // A leaf signed by the pinned CA, but not for `nimbus-coordinator`.
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["elsewhere.example".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let id = ServerIdentity {
        cert_chain_pem: format!("{}{}", leaf.pem(), ca.cert_pem()),
        key_pem: leaf_key.serialize_pem(),
    };
    let addr = rustls_server(&id).await;
    let err = pki::tls_connect(&addr, &ca.pin(), TIMEOUT).await.unwrap_err();
    assert!(matches!(err, PkiError::Tls { .. }), "{err:?}");
    assert!(
        err.to_string().contains("not valid for name \"nimbus-coordinator\""),
        "{err}"
    );
}

#[tokio::test]
async fn refused_port_is_unreachable_quickly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let pin = Pin::of_der(b"whatever");

    let started = Instant::now();
    let err = pki::tls_connect(&addr, &pin, TIMEOUT).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("cannot reach coordinator at {addr}: ")),
        "{msg}"
    );
    assert!(msg.ends_with("; check the address and that port is open"), "{msg}");

    let started = Instant::now();
    let err = pki::connect_pinned(&addr, &pin, TIMEOUT).await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn blackholed_address_is_unreachable_within_the_timeout() {
    // TEST-NET-1: either no route (immediate error) or no answer (our timeout).
    let started = Instant::now();
    let err = pki::tls_connect("192.0.2.1:7443", &Pin::of_der(b"x"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn silent_peer_times_out() {
    // Accepts TCP (backlog) but never speaks TLS.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let started = Instant::now();
    let err = pki::tls_connect(&addr, &Pin::of_der(b"x"), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::Tls { .. }), "{err:?}");
    assert!(err.to_string().contains("no TLS handshake within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(listener);
}

/// A tiny gRPC-shaped service: answers every call with an empty OK (trailers-only response).
#[derive(Clone)]
struct Ping;

impl NamedService for Ping {
    const NAME: &'static str = "nimbus.test.Ping";
}

impl tower::Service<http::Request<Body>> for Ping {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let status = if req.uri().path() == "/nimbus.test.Ping/Ping" {
            "0"
        } else {
            "12"
        };
        let resp = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", status)
            .body(Body::empty())
            .unwrap();
        std::future::ready(Ok(resp))
    }
}

async fn tonic_server(
    listener: TcpListener,
    id: &ServerIdentity,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .tls_config({
            pki::install_crypto_provider();
            ServerTlsConfig::new().identity(id.tonic_identity())
        })
        .unwrap()
        .add_service(Ping);
    let handle = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (tx, handle)
}

async fn ping(channel: &tonic::transport::Channel) -> Result<http::Response<Body>, tonic::transport::Error> {
    let req = http::Request::builder()
        .method("POST")
        .uri("/nimbus.test.Ping/Ping")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::empty())
        .unwrap();
    channel.clone().oneshot(req).await
}

#[tokio::test]
async fn tonic_server_and_pinned_channel() {
    let (_dir, ca) = new_ca();
    let (_dir2, other) = new_ca();
    let id = ca.issue_server_identity(&["127.0.0.1".into()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, server) = tonic_server(listener, &id).await;

    // Right pin: the RPC goes through over h2 + TLS.
    let failures = ConnectFailures::new();
    let channel = pki::connect_pinned_tracked(&addr, &ca.pin(), TIMEOUT, &failures)
        .await
        .unwrap();
    let resp = ping(&channel).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert!(failures.last().is_none());

    // Wrong pin: a PinMismatch, not a generic transport error.
    let err = pki::connect_pinned(&addr, &other.pin(), TIMEOUT).await.unwrap_err();
    assert!(err.is_pin_mismatch(), "{err:?}");

    // The coordinator is replaced by an impostor on the same port: the channel's reconnection is
    // pinned too, and the failure slot says why.
    stop.send(()).unwrap();
    server.await.unwrap();
    let impostor = other.issue_server_identity(&[]).unwrap();
    let listener = TcpListener::bind(&addr).await.unwrap();
    let (_stop2, _server2) = tonic_server(listener, &impostor).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ping(&channel).await {
            Ok(_) => {}
            Err(err) => {
                if let Some(found) = pki::classify(&err) {
                    assert!(found.is_pin_mismatch(), "{found:?}");
                }
            }
        }
        if failures.last().is_some_and(|e| e.is_pin_mismatch()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no pin mismatch recorded: {:?}",
            failures.last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
