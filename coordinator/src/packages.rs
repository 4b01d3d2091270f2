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
//! - `GET|HEAD /seeds/<mac>/<file>` — a bare-metal host's NoCloud seed, from `<dir>/seeds/<mac>/`, as
//!   `nimbusctl bootstrap render --platform ipxe` lays it out (copy its `seeds/` into the directory): `<mac>` in
//!   lowercase colon form, `<file>` one of `meta-data`, `user-data`, `vendor-data`, `network-config`. Seeds are
//!   never listed in the index (a user-data holds a MAC-bound join token); each one served is logged with the
//!   client's address.
//!
//! Only regular files are served: no symlinks anywhere on the path, no other subdirectories, top-level names of
//! `[A-Za-z0-9._+-]` not starting with `.`. Digests are cached per (size, mtime) and recomputed on change.
//!
//! With `packages_tls_cert`/`packages_tls_key` the mirror speaks HTTPS (TLS 1.2 and 1.3; iPXE speaks 1.2 only
//! and needs ECDHE, i.e. an iPXE from 2022 or later built with `DOWNLOAD_PROTO_HTTPS`, trusting the certificate's
//! CA through its `TRUST=` build option or a publicly trusted certificate). That keeps the seeds' tokens off the
//! wire and lets iPXE check what it boots.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use sha2::{Digest, Sha256};
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

/// The subdirectory (and URL prefix) of bare-metal NoCloud seeds.
const SEEDS: &str = "seeds";
/// The files of one NoCloud seed.
const SEED_FILES: [&str; 4] = ["meta-data", "user-data", "vendor-data", "network-config"];

/// Whether `mac` names a seed directory: six lowercase hex pairs joined by `:`, as iPXE prints a MAC.
fn valid_seed_mac(mac: &str) -> bool {
    let pairs: Vec<&str> = mac.split(':').collect();
    pairs.len() == 6
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Whether `name` may be served from the top level.
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

    /// The file `name` (a top-level name, or `seeds/<mac>/<file>`) if it may be served: (path, size, mtime).
    fn file(&self, name: &str) -> Option<(PathBuf, u64, SystemTime)> {
        let parts: Vec<&str> = name.split('/').collect();
        let allowed = match parts.as_slice() {
            [file] => valid_name(file),
            [SEEDS, mac, file] => valid_seed_mac(mac) && SEED_FILES.contains(file),
            _ => false,
        };
        if !allowed {
            return None;
        }
        // No symlink anywhere on the way: each directory must be a real one.
        let mut path = self.dir.clone();
        for dir in &parts[..parts.len() - 1] {
            path.push(dir);
            if !std::fs::symlink_metadata(&path).ok()?.file_type().is_dir() {
                return None;
            }
        }
        path.push(parts[parts.len() - 1]);
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

/// Answers one request.
pub async fn handle(
    mirror: Arc<Mirror>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return Ok(full(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD only\n"));
    }
    let path = req.uri().path().to_string();
    let (rest, seed) = if let Some(rest) = path.strip_prefix("/packages/") {
        if rest.contains('/') {
            return Ok(not_found());
        }
        (rest.to_string(), false)
    } else if let Some(rest) = path.strip_prefix("/seeds/") {
        (format!("{SEEDS}/{rest}"), true)
    } else {
        return Ok(not_found());
    };
    if rest.is_empty() {
        let m = Arc::clone(&mirror);
        let index = tokio::task::spawn_blocking(move || m.index()).await.unwrap_or_default();
        let body = serde_json::to_vec_pretty(&index).unwrap_or_default();
        return Ok(full(StatusCode::OK, "application/json", body));
    }
    let name = rest;
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
    if seed {
        tracing::info!(seed = %entry.name, %peer, "bare-metal seed served");
    } else {
        tracing::info!(file = %entry.name, size = entry.size, %peer, "package served");
    }
    let body = if head {
        Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
    } else {
        match tokio::fs::File::open(&file).await {
            Ok(f) => release::serve::stream_file(f, 0, entry.size),
            Err(e) => {
                tracing::warn!(file = %entry.name, error = %e, "package vanished before it was served");
                return Ok(not_found());
            }
        }
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

/// Serves `mirror` on `listener` until shutdown: HTTPS when `tls` is given, plain HTTP otherwise.
pub async fn serve(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => r?,
            _ = shutdown.changed() => return Ok(()),
        };
        let mirror = Arc::clone(&mirror);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(Arc::clone(&mirror), peer, req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let served = match acceptor {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => builder.serve_connection(TokioIo::new(tls), svc).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "package mirror TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "package mirror TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = served {
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
        request(stream, method, path).await
    }

    async fn request<S>(stream: S, method: &str, path: &str) -> (u16, hyper::HeaderMap, Vec<u8>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
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
        tokio::spawn(serve(listener, Arc::new(Mirror::new(dir.path())), None, rx));

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

    #[tokio::test]
    async fn seeds_are_served_per_mac_only_and_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mac = "52:54:00:12:34:56";
        let seed = dir.path().join("seeds").join(mac);
        std::fs::create_dir_all(&seed).unwrap();
        std::fs::write(seed.join("user-data"), b"#cloud-config\n").unwrap();
        std::fs::write(seed.join("meta-data"), b"instance-id: iid-nimbus-525400123456\n").unwrap();
        std::fs::write(seed.join("other"), b"x").unwrap();
        // A seed directory that is a symlink is not followed.
        std::os::unix::fs::symlink("/etc", dir.path().join("seeds").join("52:54:00:00:00:01")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::new(Mirror::new(dir.path())), None, rx));

        let (status, _, body) = get(addr, "GET", &format!("/seeds/{mac}/user-data")).await;
        assert_eq!((status, body.as_slice()), (200, b"#cloud-config\n".as_slice()));
        assert_eq!(get(addr, "GET", &format!("/seeds/{mac}/meta-data")).await.0, 200);
        let (_, _, index) = get(addr, "GET", "/packages/").await;
        assert_eq!(index, b"[]", "seeds hold tokens: never listed");
        for bad in [
            format!("/seeds/{mac}/other"),
            format!("/seeds/{mac}/vendor-data"),
            "/seeds/52:54:00:00:00:01/passwd".into(),
            "/seeds/52:54:00:00:00:01/user-data".into(),
            "/seeds/52:54:00:12:34:5G/user-data".into(),
            "/seeds/52-54-00-12-34-56/user-data".into(),
            "/seeds/52:54:00:12:34:56:78/user-data".into(),
            format!("/seeds/{mac}/../../seeds/{mac}/user-data"),
            format!("/packages/seeds/{mac}/user-data"),
            "/seeds/".into(),
            format!("/seeds/{mac}/"),
        ] {
            assert_eq!(get(addr, "GET", &bad).await.0, 404, "{bad}");
        }
    }

    #[tokio::test]
    async fn with_a_certificate_the_mirror_speaks_tls_1_2_and_1_3_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("boot.ipxe"), b"#!ipxe\n").unwrap();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = pki::CertificateAuthority::load_or_create(ca_dir.path()).unwrap();
        let identity = ca.issue_server_identity(&["127.0.0.1".into()]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, rx) = watch::channel(false);
        let tls = identity.rustls_server_config().unwrap();
        tokio::spawn(serve(listener, Arc::new(Mirror::new(dir.path())), Some(tls), rx));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        // iPXE speaks TLS 1.2 only; current clients 1.3.
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let client =
                rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_protocol_versions(&[version])
                    .unwrap()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
            let (status, _, body) = request(tls, "GET", "/packages/boot.ipxe").await;
            assert_eq!((status, body.as_slice()), (200, b"#!ipxe\n".as_slice()));
        }
        // Plain HTTP on the TLS port gets nothing.
        let plain = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::builder()
                .uri("/packages/boot.ipxe")
                .body(Full::new(Bytes::new()))
                .unwrap();
            send.send_request(req).await.is_err()
        })
        .await
        .unwrap();
        assert!(plain, "a plain HTTP request on the HTTPS mirror must fail");
    }
}
