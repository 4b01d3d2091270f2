//! [`RepoServer`]: serves a release repository read-only over HTTP.
//!
//! - `GET|HEAD <prefix>/metadata/<file>` and `<prefix>/targets/<file>`: the file, streamed from disk in 64 KiB
//!   chunks through a bounded channel (a client never makes the server hold a whole artefact), with
//!   `Content-Length`, `Accept-Ranges: bytes` and, for targets, an immutable cache policy (names are
//!   content-addressed).
//! - `Range: bytes=A-B`, `bytes=A-` and `bytes=-N` (one range): `206` with `Content-Range`. A malformed,
//!   multi-range or unsatisfiable range: `416` with `Content-Range: bytes */LEN`.
//! - Only plain names are served: `[A-Za-z0-9._+-]`, not starting with `.` (so no `..`, no `/`, no percent
//!   escapes), a real `metadata/` or `targets/` directory (not a symlink), and a regular file opened with
//!   `O_NOFOLLOW` (a symlink is refused, not followed). Anything else is `404`; methods other than GET and HEAD
//!   are `405`.
//!
//! The handler is transport-agnostic ([`RepoServer::handle`] takes any `Request<B>` and ignores the body), so
//! the coordinator mounts it on its tunnel-only fleet listener under `/releases`; [`serve`] runs it alone.

use std::convert::Infallible;
use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;

/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;
/// Chunks buffered per response.
const CHANNEL_CHUNKS: usize = 4;
/// Longest a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest servable name.
const MAX_NAME: usize = 255;

/// The response body type.
pub type ServeBody = BoxBody<Bytes, std::io::Error>;

/// A read-only HTTP view of a repository directory (see the module docs).
#[derive(Debug, Clone)]
pub struct RepoServer {
    dir: PathBuf,
    prefix: String,
}

/// Which of the two served directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Metadata,
    Targets,
}

impl Area {
    fn dir(self) -> &'static str {
        match self {
            Area::Metadata => "metadata",
            Area::Targets => "targets",
        }
    }
}

impl RepoServer {
    /// Serves `repo_dir` at the root of the URL space (`/metadata/...`, `/targets/...`).
    pub fn new(repo_dir: impl Into<PathBuf>) -> RepoServer {
        RepoServer {
            dir: repo_dir.into(),
            prefix: String::new(),
        }
    }

    /// Serves under `prefix` instead, e.g. `/releases` → `/releases/metadata/...`.
    pub fn with_prefix(mut self, prefix: &str) -> RepoServer {
        self.prefix = prefix.trim_end_matches('/').to_string();
        self
    }

    /// The repository directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a request path belongs to this server (starts with the prefix), for a caller that routes.
    pub fn matches(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Answers one request. Never fails: errors are HTTP statuses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ServeBody> {
        let head = req.method() == Method::HEAD;
        if req.method() != Method::GET && !head {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let Some((area, name)) = self.route(req.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        let path = self.dir.join(area.dir()).join(name);
        let Some((file, len)) = open_plain(&self.dir.join(area.dir()), &path).await else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        let range = match req.headers().get(header::RANGE) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|v| parse_range(v, len)) {
                Some(r) => Some(r),
                None => {
                    tracing::debug!(file = name, "release server: unsatisfiable or malformed Range");
                    let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "bad range\n");
                    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                        r.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return r;
                }
            },
        };
        let (start, count) = match range {
            Some((a, b)) => (a, b - a + 1),
            None => (0, len),
        };
        tracing::debug!(file = name, start, count, head, "release server: serving");
        let body = if head { empty() } else { stream_file(file, start, count) };
        let mut r = Response::new(body);
        if range.is_some() {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1)) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        let h = r.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        match area {
            Area::Metadata => {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            }
            Area::Targets => {
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                h.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=31536000, immutable"),
                );
            }
        }
        r
    }

    /// `<prefix>/metadata/<name>` or `<prefix>/targets/<name>` with a plain name.
    fn route<'a>(&self, path: &'a str) -> Option<(Area, &'a str)> {
        let rest = path.strip_prefix(self.prefix.as_str())?;
        let (area, name) = if let Some(n) = rest.strip_prefix("/metadata/") {
            (Area::Metadata, n)
        } else if let Some(n) = rest.strip_prefix("/targets/") {
            (Area::Targets, n)
        } else {
            return None;
        };
        valid_name(name).then_some((area, name))
    }
}

/// A plain file name: `[A-Za-z0-9._+-]`, not starting with `.`, at most 255 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// Opens `path` if `dir` is a real directory and `path` a regular file (no symlink at either step).
async fn open_plain(dir: &Path, path: &Path) -> Option<(tokio::fs::File, u64)> {
    let dir_meta = tokio::fs::symlink_metadata(dir).await.ok()?;
    if !dir_meta.file_type().is_dir() {
        return None;
    }
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .await
        .ok()?;
    let meta = file.metadata().await.ok()?;
    meta.file_type().is_file().then_some((file, meta.len()))
}

/// One byte range of a `len`-byte file as (first, last) inclusive; `None` if malformed, multi-range or
/// unsatisfiable.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') || len == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    match (a.trim(), b.trim()) {
        ("", n) if digits(n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            Some((len.saturating_sub(n), len - 1))
        }
        (a, "") if digits(a) => {
            let a: u64 = a.parse().ok()?;
            (a < len).then_some((a, len - 1))
        }
        (a, b) if digits(a) && digits(b) => {
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            (a <= b && a < len).then_some((a, b.min(len - 1)))
        }
        _ => None,
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ServeBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn empty() -> ServeBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Streams `count` bytes of `file` from `start`, one chunk at a time (a few chunks buffered, never the whole
/// file); a file that shrinks meanwhile ends the body with an error. Also the coordinator's package mirror body.
pub fn stream_file(mut file: tokio::fs::File, start: u64, count: u64) -> ServeBody {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        if start > 0
            && let Err(e) = file.seek(SeekFrom::Start(start)).await
        {
            let _ = tx.send(Err(e)).await;
            return;
        }
        let mut left = count;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            match file.read(&mut buf[..want]).await {
                Ok(0) => {
                    // The file shrank under us: end the body short; the client sees a broken transfer.
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "file shrank",
                        )))
                        .await;
                    return;
                }
                Ok(n) => {
                    left -= n as u64;
                    if tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(&buf[..n]))))
                        .await
                        .is_err()
                    {
                        return; // the client went away
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    BodyExt::boxed(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Serves `server` on `listener` (HTTP/1.1) until `shutdown` completes. Connections already open finish on
/// their own.
pub async fn serve(
    listener: TcpListener,
    server: Arc<RepoServer>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => r?,
            () = &mut shutdown => return Ok(()),
        };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "release server connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_parsed_strictly() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-1000", 100), Some((0, 99)));
        assert_eq!(parse_range("bytes=50-1000", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=9-5", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
        assert_eq!(parse_range("bytes=a-b", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-", 0), None);
    }

    #[test]
    fn only_plain_names_are_routed() {
        let s = RepoServer::new("/nonexistent").with_prefix("/releases/");
        assert_eq!(
            s.route("/releases/metadata/1.root.json"),
            Some((Area::Metadata, "1.root.json"))
        );
        assert_eq!(
            s.route("/releases/targets/ab.nimbus-agent_1.0.0+b1_amd64.deb")
                .map(|r| r.0),
            Some(Area::Targets)
        );
        for bad in [
            "/releases/metadata/../targets/x",
            "/releases/metadata/..",
            "/releases/metadata/.hidden",
            "/releases/metadata/a/b",
            "/releases/metadata/%2e%2e",
            "/releases/metadata/",
            "/releases/other/x",
            "/metadata/1.root.json",
        ] {
            assert_eq!(s.route(bad), None, "{bad}");
        }
        assert!(s.matches("/releases/metadata/x"));
        assert!(!s.matches("/releasesx/metadata/x"));
    }
}
