//! `enrich` against FakeImds, a fake instance metadata service on 127.0.0.1:0 that enforces the real
//! services' rules (IMDSv2 token, Azure `Metadata: true`) and records every request.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use inventory::{Inventory, MAX_METADATA_RESPONSE, MetadataConfig, MetadataError, collect, enrich};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "AQAEAFakeTokenForTests_9x8y7z==";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// IMDSv2: PUT for a token, GETs must carry it (401 otherwise).
    Aws,
    /// Like Aws, but the instance type is not a plausible value.
    AwsHostile,
    /// Azure IMDS: GETs must carry `Metadata: true` (400 otherwise).
    Azure,
    /// Accepts the request and never answers.
    Silent,
    /// Answers 200 with a 1 MiB body and a Content-Length.
    Oversized,
    /// Answers 200 with an endless chunked body (no Content-Length).
    OversizedChunked,
}

#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    token: Option<String>,
    ttl: Option<String>,
    metadata: Option<String>,
}

struct FakeImds {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeImds {
    async fn start(mode: Mode) -> FakeImds {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(mode, log.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeImds { addr, seen, task }
    }

    fn config(&self, timeout: Duration) -> MetadataConfig {
        MetadataConfig {
            endpoint: format!("http://{}", self.addr),
            timeout,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// A raw HTTP/1.1 request, to check the fake's own rules; returns the status line.
    async fn raw(&self, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

/// A body that never ends: 64 KiB chunks forever.
struct Endless;

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))))
    }
}

async fn handle(
    mode: Mode,
    log: Arc<Mutex<Vec<Seen>>>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    log.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        path: path.clone(),
        token: h("x-aws-ec2-metadata-token"),
        ttl: h("x-aws-ec2-metadata-token-ttl-seconds"),
        metadata: h("metadata"),
    });
    let resp = match mode {
        Mode::Silent => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            reply(StatusCode::OK, "late")
        }
        Mode::Oversized => reply(StatusCode::OK, vec![b'x'; 1 << 20]),
        Mode::OversizedChunked => Response::new(Endless.boxed()),
        Mode::Aws | Mode::AwsHostile => {
            let method = req.method().as_str();
            if method == "PUT" && path == "/latest/api/token" {
                match h("x-aws-ec2-metadata-token-ttl-seconds").and_then(|t| t.parse::<u32>().ok()) {
                    Some(1..=21600) => reply(StatusCode::OK, TOKEN),
                    _ => reply(StatusCode::BAD_REQUEST, "missing or invalid ttl"),
                }
            } else if method != "GET" {
                reply(StatusCode::METHOD_NOT_ALLOWED, "")
            } else if h("x-aws-ec2-metadata-token").as_deref() != Some(TOKEN) {
                reply(StatusCode::UNAUTHORIZED, "")
            } else {
                match path.as_str() {
                    "/latest/meta-data/instance-type" if mode == Mode::AwsHostile => {
                        reply(StatusCode::OK, "<script>alert(1)</script>")
                    }
                    "/latest/meta-data/instance-type" => reply(StatusCode::OK, "i3.2xlarge"),
                    "/latest/meta-data/placement/region" => reply(StatusCode::OK, "eu-west-1"),
                    "/latest/meta-data/placement/availability-zone" => reply(StatusCode::OK, "eu-west-1a"),
                    "/latest/meta-data/instance-id" => reply(StatusCode::OK, "i-0fedcba9876543210"),
                    _ => reply(StatusCode::NOT_FOUND, ""),
                }
            }
        }
        Mode::Azure => {
            if h("metadata").as_deref() != Some("true") {
                reply(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"Bad request. Required metadata header not specified"}"#,
                )
            } else if path == "/metadata/instance?api-version=2021-02-01" {
                reply(
                    StatusCode::OK,
                    r#"{"compute":{"azEnvironment":"AzurePublicCloud","location":"westeurope","name":"aks-nvme-vmss_0",
                       "osType":"Linux","vmId":"6b1f8a2c-3d4e-4f50-8a9b-0c1d2e3f4a5b","vmSize":"Standard_L8s_v2",
                       "zone":"2","tagsList":[]},"network":{"interface":[]}}"#,
                )
            } else {
                reply(StatusCode::NOT_FOUND, "")
            }
        }
    };
    Ok(resp)
}

fn inventory_of(fixture: &str) -> Inventory {
    collect(&common::fixture(fixture)).inventory
}

#[tokio::test]
async fn aws_imdsv2_token_flow() {
    let imds = FakeImds::start(Mode::Aws).await;
    // The fake is strict: a GET without the session token is refused.
    let status = imds
        .raw("GET /latest/meta-data/instance-type HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(status.contains("401"), "{status}");

    let mut inv = inventory_of("aws-xen-i3");
    assert_eq!(inv.platform.instance_type, None);
    enrich(&mut inv, &imds.config(Duration::from_secs(5))).await.unwrap();
    let p = &inv.platform;
    assert_eq!(p.instance_type.as_deref(), Some("i3.2xlarge"));
    assert_eq!(
        (p.region.as_deref(), p.zone.as_deref()),
        (Some("eu-west-1"), Some("eu-west-1a"))
    );
    assert_eq!(p.instance_id.as_deref(), Some("i-0fedcba9876543210"));
    assert_eq!(p.metadata_source.as_deref(), Some("aws-imdsv2"));

    let seen = imds.seen();
    let client: Vec<_> = seen.iter().skip(1).collect(); // the first is the raw probe above
    assert_eq!(
        (client[0].method.as_str(), client[0].path.as_str()),
        ("PUT", "/latest/api/token")
    );
    assert!(client[0].ttl.as_deref().is_some_and(|t| t.parse::<u32>().is_ok()));
    let gets: Vec<_> = client[1..]
        .iter()
        .map(|s| (s.method.as_str(), s.path.as_str(), s.token.as_deref()))
        .collect();
    assert_eq!(
        gets,
        [
            ("GET", "/latest/meta-data/instance-type", Some(TOKEN)),
            ("GET", "/latest/meta-data/placement/region", Some(TOKEN)),
            ("GET", "/latest/meta-data/placement/availability-zone", Some(TOKEN)),
            ("GET", "/latest/meta-data/instance-id", Some(TOKEN)),
        ]
    );
}

#[tokio::test]
async fn azure_requires_the_metadata_header() {
    let imds = FakeImds::start(Mode::Azure).await;
    let status = imds
        .raw("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(status.contains("400"), "{status}");

    let mut inv = inventory_of("azure-lsv2");
    enrich(&mut inv, &imds.config(Duration::from_secs(5))).await.unwrap();
    let p = &inv.platform;
    assert_eq!(p.instance_type.as_deref(), Some("Standard_L8s_v2"));
    assert_eq!(
        (p.region.as_deref(), p.zone.as_deref()),
        (Some("westeurope"), Some("2"))
    );
    assert_eq!(p.instance_id.as_deref(), Some("6b1f8a2c-3d4e-4f50-8a9b-0c1d2e3f4a5b"));
    assert_eq!(p.metadata_source.as_deref(), Some("azure-imds"));
    let last = imds.seen().pop().unwrap();
    assert_eq!((last.method.as_str(), last.metadata.as_deref()), ("GET", Some("true")));
    // Only Azure's service was asked: no AWS token request.
    assert!(imds.seen().iter().all(|s| s.path.starts_with("/metadata/")));
}

#[tokio::test]
async fn slow_service_returns_within_the_timeout() {
    let imds = FakeImds::start(Mode::Silent).await;
    let mut inv = inventory_of("aws-nitro-i3en");
    let before = inv.clone();
    let started = Instant::now();
    let err = enrich(&mut inv, &imds.config(Duration::from_millis(300)))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, MetadataError::Timeout { .. }), "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(inv, before, "a failed enrichment leaves the inventory alone");
    assert!(err.to_string().contains("did not answer within"), "{err}");
}

#[tokio::test]
async fn oversized_responses_are_refused() {
    for mode in [Mode::Oversized, Mode::OversizedChunked] {
        let imds = FakeImds::start(mode).await;
        let mut inv = inventory_of("azure-lsv2");
        let err = enrich(&mut inv, &imds.config(Duration::from_secs(5)))
            .await
            .unwrap_err();
        match err {
            MetadataError::TooLarge { limit, .. } => assert_eq!(limit, MAX_METADATA_RESPONSE),
            other => panic!("{mode:?}: {other}"),
        }
        assert_eq!(inv.platform.instance_type, None);
    }
}

#[tokio::test]
async fn hostile_values_are_refused() {
    let imds = FakeImds::start(Mode::AwsHostile).await;
    let mut inv = inventory_of("aws-nitro-i3en");
    let err = enrich(&mut inv, &imds.config(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(matches!(err, MetadataError::Malformed { .. }), "{err}");
    assert_eq!(
        inv.platform.instance_type.as_deref(),
        Some("i3en.2xlarge"),
        "DMI value kept"
    );
    assert_eq!(inv.platform.region, None);
}

#[tokio::test]
async fn other_platforms_are_not_asked() {
    let imds = FakeImds::start(Mode::Aws).await;
    for fixture in ["baremetal", "vmware", "opennebula-kvm"] {
        let mut inv = inventory_of(fixture);
        let before = inv.clone();
        enrich(&mut inv, &imds.config(Duration::from_secs(5))).await.unwrap();
        assert_eq!(inv, before, "{fixture}");
    }
    assert!(imds.seen().is_empty(), "{:?}", imds.seen());
}

#[tokio::test]
async fn refused_connection_and_bad_endpoint_are_errors() {
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut inv = inventory_of("aws-nitro-i3en");
    let cfg = MetadataConfig {
        endpoint: format!("http://127.0.0.1:{port}"),
        timeout: Duration::from_secs(5),
    };
    let err = enrich(&mut inv, &cfg).await.unwrap_err();
    assert!(matches!(err, MetadataError::Connect { .. }), "{err}");

    let cfg = MetadataConfig {
        endpoint: "https://169.254.169.254".into(),
        ..MetadataConfig::default()
    };
    let err = enrich(&mut inv, &cfg).await.unwrap_err();
    assert!(matches!(err, MetadataError::InvalidEndpoint { .. }), "{err}");
    assert_eq!(MetadataConfig::default().endpoint, "http://169.254.169.254");
    assert_eq!(MetadataConfig::default().timeout, Duration::from_secs(2));
}
