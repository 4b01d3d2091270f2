//! The package mirror: agent packages (and any other file an operator puts in `--packages-dir`, e.g. iPXE
//! seeds rendered by `nimbusctl bootstrap render`) served over plain HTTP on `--packages-listen`, so new hosts
//! in air-gapped sites need no other mirror. Integrity comes from the SHA-256 every bootstrap artefact carries
//! (the host checks it before installing), not from the transport: new hosts do not trust the coordinator's
//! private CA yet.
//!
//! - `GET /packages/` — JSON index: `[{"name", "size", "sha256"}]`, so an operator can copy the digest into
//!   `nimbusctl bootstrap render --package-sha256`.
//! - `GET|HEAD /packages/<name>` — the file, streamed in 64 KiB chunks (never held in memory whole), with
//!   `Content-Length`, `ETag: "<sha256>"` and `X-Checksum-Sha256`.
//!
//! Only regular files directly in the directory are served (no symlinks, no subdirectories, names of
//! `[A-Za-z0-9._+-]` not starting with `.`). Digests are cached per (size, mtime) and recomputed on change.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Bytes per streamed chunk.
const CHUNK: usize = 64 * 1024;
/// Longest a client may take to send its request head.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

type Body = BoxBody<Bytes, std::io::Error>;

/// One served file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The directory and the digest cache.
pub struct Mirror {
    dir: PathBuf,
    cache: Mutex<BTreeMap<String, (u64, SystemTime, String)>>,
}

/// Whether `name` may be served.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

impl Mirror {
    pub fn new(dir: impl Into<PathBuf>) -> Mirror {
        Mirror {
            dir: dir.into(),
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// The file `name` if it may be served: (path, size).
    fn file(&self, name: &str) -> Option<(PathBuf, u64, SystemTime)> {
        if !valid_name(name) {
            return None;
        }
        let path = self.dir.join(name);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_file() {
            return None;
        }
        Some((path, meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
    }

    /// The entry for `name`, hashing it if it is new or changed (blocking).
    pub fn entry(&self, name: &str) -> Option<Entry> {
        let (path, size, mtime) = self.file(name)?;
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((s, m, sha)) = cache.get(name)
                && *s == size
                && *m == mtime
            {
                return Some(Entry {
                    name: name.to_string(),
                    size,
                    sha256: sha.clone(),
                });
            }
        }
        let sha = hash(&path).ok()?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (size, mtime, sha.clone()));
        Some(Entry {
            name: name.to_string(),
            size,
            sha256: sha,
        })
    }

    /// Every servable file, by name (blocking).
    pub fn index(&self) -> Vec<Entry> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().filter_map(|n| self.entry(n)).collect()
    }
}

fn hash(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn not_found() -> Response<Body> {
    full(StatusCode::NOT_FOUND, "text/plain", "not found\n")
}

/// A streamed body reading `path` in chunks.
fn stream(path: PathBuf) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
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

/// Answers one request.
pub async fn handle(mirror: Arc<Mirror>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return Ok(full(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD only\n"));
    }
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/packages/") else {
        return Ok(not_found());
    };
    if rest.is_empty() {
        let m = Arc::clone(&mirror);
        let index = tokio::task::spawn_blocking(move || m.index()).await.unwrap_or_default();
        let body = serde_json::to_vec_pretty(&index).unwrap_or_default();
        return Ok(full(StatusCode::OK, "application/json", body));
    }
    let name = rest.to_string();
    let m = Arc::clone(&mirror);
    let found = tokio::task::spawn_blocking(move || {
        let entry = m.entry(&name)?;
        let (file, _, _) = m.file(&name)?;
        Some((entry, file))
    })
    .await
    .ok()
    .flatten();
    let Some((entry, file)) = found else {
        return Ok(not_found());
    };
    tracing::info!(file = %entry.name, size = entry.size, "package served");
    let body = if head {
        Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
    } else {
        stream(file)
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_LENGTH,
        hyper::header::HeaderValue::from(entry.size),
    );
    if let Ok(v) = format!("\"{}\"", entry.sha256).parse() {
        h.insert(hyper::header::ETAG, v);
    }
    if let Ok(v) = entry.sha256.parse() {
        h.insert("x-checksum-sha256", v);
    }
    if let Ok(v) = "application/octet-stream".parse() {
        h.insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// Serves `mirror` on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.changed() => return Ok(()),
        };
        let mirror = Arc::clone(&mirror);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&mirror), req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(%peer, error = %e, "package connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, hyper::HeaderMap, Vec<u8>) {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "mirror")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, headers, body)
    }

    #[tokio::test]
    async fn packages_are_served_whole_with_their_digest_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        // Bigger than one chunk, not a multiple of it.
        let pkg: Vec<u8> = (0..(3 * CHUNK + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("nimbus-agent_0.1.0_amd64.deb"), &pkg).unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::new(Mirror::new(dir.path())), rx));

        let (status, headers, body) = get(addr, "GET", "/packages/nimbus-agent_0.1.0_amd64.deb").await;
        assert_eq!(status, 200);
        assert_eq!(body, pkg);
        let sha = hex::encode(Sha256::digest(&pkg));
        assert_eq!(headers["x-checksum-sha256"], sha.as_str());
        assert_eq!(headers["content-length"], pkg.len().to_string().as_str());

        let (status, headers, body) = get(addr, "HEAD", "/packages/nimbus-agent_0.1.0_amd64.deb").await;
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(headers["etag"], format!("\"{sha}\"").as_str());

        let (status, _, body) = get(addr, "GET", "/packages/").await;
        assert_eq!(status, 200);
        let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(index.as_array().unwrap().len(), 1, "{index}");
        assert_eq!(index[0]["sha256"], sha.as_str());

        for bad in [
            "/packages/.hidden",
            "/packages/sub",
            "/packages/passwd",
            "/packages/..%2Fetc%2Fpasswd",
            "/packages/../etc/passwd",
            "/etc/passwd",
            "/packages/missing.deb",
        ] {
            assert_eq!(get(addr, "GET", bad).await.0, 404, "{bad}");
        }
        assert_eq!(get(addr, "POST", "/packages/").await.0, 405);

        // A replaced package gets its new digest.
        std::fs::write(dir.path().join("nimbus-agent_0.1.0_amd64.deb"), b"new build").unwrap();
        let (_, headers, _) = get(addr, "HEAD", "/packages/nimbus-agent_0.1.0_amd64.deb").await;
        assert_eq!(
            headers["x-checksum-sha256"],
            hex::encode(Sha256::digest(b"new build")).as_str()
        );
    }
}
