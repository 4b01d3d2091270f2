//! [`HttpRangeTransport`]: how the agent downloads release metadata and artefacts.
//!
//! Plain HTTP/1.1 over hyper: it runs inside the WireGuard tunnel, and TUF verifies every byte (signatures for
//! metadata, length + SHA-256 for artefacts), so the transport needs neither TLS nor trust. Bodies are
//! streamed through a small bounded channel (never held whole). When a connection fails or stalls mid-body,
//! the transport reconnects and asks for the rest with `Range: bytes=N-`; a `206` must start at `N`, a `200`
//! (server ignoring ranges) is accepted by skipping the first `N` bytes. Connect and every read have a
//! timeout; reconnects are bounded per download ([`HttpConfig::max_retries`]), with exponential backoff.
//! `file://` URLs go to `tough`'s `FilesystemTransport`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tough::{FilesystemTransport, Transport, TransportError, TransportErrorKind, TransportStream};
use url::{Host, Url};

/// Frames buffered between the connection task and the consumer.
const CHANNEL_FRAMES: usize = 8;
/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Timeouts and retry budget of [`HttpRangeTransport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// TCP connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Longest wait for the response head, and between two body reads. Default 30 s.
    pub read_timeout: Duration,
    /// Reconnects allowed per download, in total (before the first byte and mid-body). Default 8.
    pub max_retries: u32,
    /// First backoff before a reconnect; doubles each time, at most 5 s. Default 200 ms.
    pub retry_backoff: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_retries: 8,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

/// A `tough` transport over plain HTTP/1.1 with resumable downloads (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpRangeTransport {
    config: HttpConfig,
}

impl HttpRangeTransport {
    /// With [`HttpConfig::default`].
    pub fn new() -> HttpRangeTransport {
        HttpRangeTransport::default()
    }

    pub fn with_config(config: HttpConfig) -> HttpRangeTransport {
        HttpRangeTransport { config }
    }

    pub fn config(&self) -> &HttpConfig {
        &self.config
    }
}

#[tough::async_trait]
impl Transport for HttpRangeTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "file" => FilesystemTransport.fetch(url).await,
            "http" => fetch_http(self.config, url).await,
            _ => Err(TransportError::new_with_cause(
                TransportErrorKind::UnsupportedUrlScheme,
                url,
                "HttpRangeTransport speaks plain http:// (inside the tunnel) and file:// only",
            )),
        }
    }
}

/// Where to connect and what to ask for.
#[derive(Debug, Clone)]
struct Target {
    url: Url,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: Url) -> Result<Target, TransportError> {
        let Some(host) = url.host_str() else {
            return Err(other(&url, "URL has no host"));
        };
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let mut path = url.path().to_string();
        if let Some(q) = url.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Target { url, authority, path })
    }

    async fn connect(&self, timeout: Duration) -> std::io::Result<tokio::net::TcpStream> {
        let port = self.url.port_or_known_default().unwrap_or(80);
        let connect = async {
            match self.url.host() {
                Some(Host::Ipv4(a)) => tokio::net::TcpStream::connect((a, port)).await,
                Some(Host::Ipv6(a)) => tokio::net::TcpStream::connect((a, port)).await,
                Some(Host::Domain(d)) => tokio::net::TcpStream::connect((d, port)).await,
                None => Err(std::io::Error::other("URL has no host")),
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

fn other(url: &Url, msg: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> TransportError {
    TransportError::new_with_cause(TransportErrorKind::Other, url.as_str(), msg)
}

/// One attempt's failure: retryable (network) or final (HTTP status, protocol).
enum Failure {
    Retry(String),
    Final(TransportError),
}

/// An open response positioned for the wanted offset.
struct Opened {
    body: Incoming,
    /// Bytes of the body to drop before the wanted offset (a `200` answering a `Range` request).
    skip: u64,
    /// Total length of the resource, when the server said.
    total: Option<u64>,
}

/// Connects and requests `target` from byte `offset`.
async fn open(config: HttpConfig, target: &Target, offset: u64) -> Result<Opened, Failure> {
    let url = &target.url;
    let stream = target
        .connect(config.connect_timeout)
        .await
        .map_err(|e| Failure::Retry(format!("connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = tokio::time::timeout(
        config.read_timeout,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| Failure::Retry("HTTP handshake timed out".into()))?
    .map_err(|e| Failure::Retry(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "release download connection ended");
        }
    });
    let mut req = Request::get(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("nimbus-release/", env!("CARGO_PKG_VERSION")),
        );
    if offset > 0 {
        req = req.header(header::RANGE, format!("bytes={offset}-"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::Final(other(url, e)))?;
    let resp: Response<Incoming> = tokio::time::timeout(config.read_timeout, sender.send_request(req))
        .await
        .map_err(|_| Failure::Retry("no response head within the read timeout".into()))?
        .map_err(|e| Failure::Retry(format!("request: {e}")))?;
    let status = resp.status();
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match status {
        StatusCode::OK => Ok(Opened {
            body: resp.into_body(),
            skip: offset,
            total: length,
        }),
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            let range = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            match range {
                Some((start, total)) if start == offset => Ok(Opened {
                    body: resp.into_body(),
                    skip: 0,
                    total,
                }),
                _ => Err(Failure::Final(other(
                    url,
                    format!("206 answer to bytes={offset}- has a Content-Range that does not start at {offset}"),
                ))),
            }
        }
        StatusCode::NOT_FOUND | StatusCode::GONE => Err(Failure::Final(TransportError::new(
            TransportErrorKind::FileNotFound,
            url.as_str(),
        ))),
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT => {
            Err(Failure::Retry(format!("HTTP {s}")))
        }
        s => Err(Failure::Final(other(url, format!("HTTP {s}")))),
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" { None } else { Some(total.parse().ok()?) };
    Some((start.parse().ok()?, total))
}

/// Retries `open` within the remaining budget.
async fn open_with_retries(
    config: HttpConfig,
    target: &Target,
    offset: u64,
    retries: &mut u32,
    backoff: &mut Duration,
) -> Result<Opened, TransportError> {
    loop {
        match open(config, target, offset).await {
            Ok(o) => return Ok(o),
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Retry(why)) => {
                if *retries >= config.max_retries {
                    return Err(other(
                        &target.url,
                        format!("{why}; gave up after {} reconnects", *retries),
                    ));
                }
                *retries += 1;
                tracing::debug!(url = %target.url, offset, attempt = *retries, reason = %why, "release download: retrying");
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn fetch_http(config: HttpConfig, url: Url) -> Result<TransportStream, TransportError> {
    let target = Target::parse(url)?;
    let mut retries = 0u32;
    let mut backoff = config.retry_backoff;
    // The first response is awaited here so "not found" reaches tough as a fetch error (it probes for the next
    // root version that way).
    let first = open_with_retries(config, &target, 0, &mut retries, &mut backoff).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, TransportError>>(CHANNEL_FRAMES);
    tokio::spawn(async move {
        let mut opened = first;
        let mut offset = 0u64;
        let mut total = opened.total;
        loop {
            let frame = tokio::time::timeout(config.read_timeout, opened.body.frame()).await;
            let why = match frame {
                Ok(Some(Ok(frame))) => {
                    let Ok(mut data) = frame.into_data() else { continue };
                    if opened.skip > 0 {
                        let drop = usize::try_from(opened.skip).unwrap_or(usize::MAX).min(data.len());
                        let _ = data.split_to(drop);
                        opened.skip -= drop as u64;
                    }
                    if data.is_empty() {
                        continue;
                    }
                    offset += data.len() as u64;
                    if tx.send(Ok(data)).await.is_err() {
                        return; // the consumer went away
                    }
                    continue;
                }
                Ok(None) => {
                    if total.is_none_or(|t| offset >= t) {
                        return; // complete
                    }
                    format!("body ended at byte {offset} of {}", total.unwrap_or(0))
                }
                Ok(Some(Err(e))) => format!("body read: {e}"),
                Err(_) => "no data within the read timeout".to_string(),
            };
            if total.is_some_and(|t| offset >= t) {
                return;
            }
            if retries >= config.max_retries {
                let _ = tx
                    .send(Err(other(
                        &target.url,
                        format!("{why}; gave up after {retries} reconnects"),
                    )))
                    .await;
                return;
            }
            tracing::warn!(url = %target.url, offset, reason = %why, "release download interrupted: resuming with Range");
            match open_with_retries(config, &target, offset, &mut retries, &mut backoff).await {
                Ok(o) => {
                    if total.is_none() {
                        total = o.total;
                    }
                    opened = o;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(parse_content_range("bytes 100-199/1000"), Some((100, Some(1000))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
