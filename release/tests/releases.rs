//! End-to-end: real repository files, the real server on loopback, the real HTTP transport.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed assertion

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use release::client::ClientError;
use release::keys::{self, FileKeySource, OnlineKeys};
use release::repo::{self, Expiries, RepoError};
use release::transport::HttpConfig;
use release::{AgentRelease, ArtefactKind, HttpRangeTransport, KeyRole, Refusal, Releases, RepoServer};
use semver::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

struct Fixture {
    dir: tempfile::TempDir,
    root_key: PathBuf,
    online: OnlineKeys,
    repo: PathBuf,
}

impl Fixture {
    async fn new(expiries: &Expiries) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root_key = dir.path().join("usb-stick/root.pem");
        keys::generate_key(&root_key).unwrap();
        let online = OnlineKeys::generate(&dir.path().join("coordinator/keys")).unwrap();
        let repo = dir.path().join("coordinator/releases");
        let init = repo::init(&root_key, &online, &repo, expiries).await.unwrap();
        assert_eq!(init.root_json, repo.join("metadata/1.root.json"));
        assert_eq!(
            (init.versions.root, init.versions.targets, init.versions.timestamp),
            (1, 1, 1)
        );
        Fixture {
            dir,
            root_key,
            online,
            repo,
        }
    }

    fn pinned(&self) -> Vec<u8> {
        std::fs::read(self.repo.join("metadata/1.root.json")).unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    async fn publish(&self, name: &str, len: usize, version: &str, kind: ArtefactKind) -> repo::Published {
        let file = artefact(&self.path("build"), name, len, version.len() as u8);
        repo::add_target(
            &self.repo,
            &self.online,
            &file,
            &release(version, kind),
            &Expiries::default(),
        )
        .await
        .unwrap()
    }
}

fn release(version: &str, kind: ArtefactKind) -> AgentRelease {
    AgentRelease {
        version: Version::parse(version).unwrap(),
        kind,
        arch: "x86_64".into(),
    }
}

fn artefact(dir: &Path, name: &str, len: usize, seed: u8) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let data: Vec<u8> = (0..len).map(|i| ((i * 31 + seed as usize) % 251) as u8).collect();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// The repository served under `/releases` on loopback; stops when the sender drops.
async fn start_server(repo: &Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = Arc::new(RepoServer::new(repo).with_prefix("/releases"));
    tokio::spawn(release::serve::serve(listener, server, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

fn urls(addr: SocketAddr) -> (Url, Url) {
    (
        Url::parse(&format!("http://{addr}/releases/metadata/")).unwrap(),
        Url::parse(&format!("http://{addr}/releases/targets/")).unwrap(),
    )
}

fn transport() -> HttpRangeTransport {
    HttpRangeTransport::with_config(HttpConfig {
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
        max_retries: 4,
        retry_backoff: Duration::from_millis(10),
    })
}

async fn load(f: &Fixture, addr: SocketAddr, datastore: &Path) -> Result<Releases, ClientError> {
    let (m, t) = urls(addr);
    Releases::load(&f.pinned(), transport(), m, t, datastore).await
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[tokio::test]
async fn publish_load_and_fetch_over_http() {
    let f = Fixture::new(&Expiries::default()).await;
    let bin = f
        .publish("nimbus-agent-1.0.0-x86_64", 70_000, "1.0.0", ArtefactKind::Binary)
        .await;
    let deb = f
        .publish("nimbus-agent_1.1.0_amd64.deb", 300_000, "1.1.0", ArtefactKind::Deb)
        .await;
    assert_eq!(
        (deb.versions.targets, deb.versions.snapshot, deb.versions.timestamp),
        (3, 3, 3)
    );
    assert!(
        deb.stored_at
            .ends_with(format!("targets/{}.nimbus-agent_1.1.0_amd64.deb", deb.release.sha256))
    );
    assert_eq!(std::fs::metadata(&deb.stored_at).unwrap().len(), 300_000);

    let (addr, _stop) = start_server(&f.repo).await;
    let datastore = f.path("agent/datastore");
    let releases = load(&f, addr, &datastore).await.unwrap();
    let list = releases.releases();
    assert_eq!(list, vec![bin.release.clone(), deb.release.clone()]);
    assert_eq!(list[1].release, release("1.1.0", ArtefactKind::Deb));
    assert_eq!(list[1].length, 300_000);
    assert_eq!(list[1].target, "nimbus-agent_1.1.0_amd64.deb");
    assert_eq!(
        releases.latest(ArtefactKind::Deb, "x86_64").unwrap().target,
        deb.release.target
    );
    assert!(
        releases
            .find(&Version::new(1, 0, 0), ArtefactKind::Binary, "x86_64")
            .is_some()
    );
    assert!(
        releases
            .find(&Version::new(1, 0, 0), ArtefactKind::Binary, "aarch64")
            .is_none()
    );
    assert_eq!(releases.versions().targets, 3);

    let dest_dir = f.path("agent/versions/1.1.0");
    std::fs::create_dir_all(&dest_dir).unwrap();
    let dest = dest_dir.join("agent.deb");
    let got = releases.fetch("nimbus-agent_1.1.0_amd64.deb", &dest).await.unwrap();
    assert_eq!(got, deb.release);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(f.path("build/nimbus-agent_1.1.0_amd64.deb")).unwrap()
    );
    assert!(leftovers(&dest_dir).is_empty(), "{:?}", leftovers(&dest_dir));
    let err = releases
        .fetch("nimbus-agent_9.9.9_amd64.deb", &dest_dir.join("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::UnknownTarget { .. }), "{err}");

    // The same file again is a no-op; other bytes under a published name, or a second file for a published
    // release, are refused.
    let again = f
        .publish("nimbus-agent_1.1.0_amd64.deb", 300_000, "1.1.0", ArtefactKind::Deb)
        .await;
    assert_eq!(again.versions, deb.versions);
    let changed = artefact(&f.path("build2"), "nimbus-agent_1.1.0_amd64.deb", 300_001, 9);
    let err = repo::add_target(
        &f.repo,
        &f.online,
        &changed,
        &release("1.1.0", ArtefactKind::Deb),
        &Expiries::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::ArtefactChanged { .. }), "{err}");
    let other = artefact(&f.path("build2"), "nimbus-agent_1.1.0_amd64-rebuilt.deb", 10, 1);
    let err = repo::add_target(
        &f.repo,
        &f.online,
        &other,
        &release("1.1.0", ArtefactKind::Deb),
        &Expiries::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::DuplicateRelease { .. }), "{err}");
    let bad = artefact(&f.path("build2"), ".hidden", 10, 1);
    let err = repo::add_target(
        &f.repo,
        &f.online,
        &bad,
        &release("1.2.0", ArtefactKind::Deb),
        &Expiries::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::BadArtefactName { .. }), "{err}");

    // The publisher's own listing, and the same repository through file:// URLs.
    let (listed, versions) = repo::list(&f.repo).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(versions.targets, 3);
    let m = Url::from_directory_path(f.repo.join("metadata")).unwrap();
    let t = Url::from_directory_path(f.repo.join("targets")).unwrap();
    let local = Releases::load(&f.pinned(), transport(), m, t, &f.path("agent/ds-file"))
        .await
        .unwrap();
    let dest2 = f.path("agent/bin");
    local.fetch("nimbus-agent-1.0.0-x86_64", &dest2).await.unwrap();
    assert_eq!(std::fs::read(&dest2).unwrap().len(), 70_000);
}

#[tokio::test]
async fn a_tampered_artefact_is_refused_and_leaves_nothing() {
    let f = Fixture::new(&Expiries::default()).await;
    let p = f
        .publish("nimbus-agent_1.0.0_amd64.deb", 200_000, "1.0.0", ArtefactKind::Deb)
        .await;
    let (addr, _stop) = start_server(&f.repo).await;
    let releases = load(&f, addr, &f.path("ds")).await.unwrap();
    let dest_dir = f.path("out");
    std::fs::create_dir_all(&dest_dir).unwrap();
    let dest = dest_dir.join("agent.deb");

    // Same length, one byte changed (the coordinator's disk or the coordinator itself is compromised).
    let mut bytes = std::fs::read(&p.stored_at).unwrap();
    bytes[150_000] ^= 0xff;
    std::fs::write(&p.stored_at, &bytes).unwrap();
    let err = releases.fetch(&p.release.target, &dest).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::Integrity), "{err}");
    assert!(!dest.exists());
    assert!(leftovers(&dest_dir).is_empty(), "{:?}", leftovers(&dest_dir));

    // Longer than signed.
    bytes[150_000] ^= 0xff;
    bytes.extend_from_slice(b"payload");
    std::fs::write(&p.stored_at, &bytes).unwrap();
    let err = releases.fetch(&p.release.target, &dest).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::Integrity), "{err}");
    assert!(!dest.exists());

    // Restored, it verifies.
    bytes.truncate(200_000);
    std::fs::write(&p.stored_at, &bytes).unwrap();
    releases.fetch(&p.release.target, &dest).await.unwrap();
}

#[tokio::test]
async fn metadata_signed_with_another_key_is_refused() {
    let f = Fixture::new(&Expiries::default()).await;
    f.publish("nimbus-agent_1.0.0_amd64.deb", 1000, "1.0.0", ArtefactKind::Deb)
        .await;
    let rogue = Fixture::new(&Expiries::default()).await;
    rogue
        .publish("nimbus-agent_6.6.6_amd64.deb", 1000, "6.6.6", ArtefactKind::Deb)
        .await;
    let (addr, _stop) = start_server(&f.repo).await;

    // A timestamp signed by a key the pinned root does not list.
    let good = std::fs::read(f.repo.join("metadata/timestamp.json")).unwrap();
    std::fs::copy(
        rogue.repo.join("metadata/timestamp.json"),
        f.repo.join("metadata/timestamp.json"),
    )
    .unwrap();
    let err = load(&f, addr, &f.path("ds")).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::BadSignature), "{err}");
    assert!(err.to_string().contains("Nothing was installed"), "{err}");
    std::fs::write(f.repo.join("metadata/timestamp.json"), good).unwrap();

    // A whole rogue repository behind the same URLs: its root is not signed by the pinned root key.
    let (raddr, _rstop) = start_server(&rogue.repo).await;
    let err = load(&f, raddr, &f.path("ds2")).await.unwrap_err();
    assert!(err.refusal().is_some(), "{err}");

    // The publisher refuses to sign with a key root.json does not list.
    let wrong = OnlineKeys {
        timestamp: rogue.online.timestamp.clone(),
        ..f.online.clone()
    };
    let err = repo::refresh_timestamp(&f.repo, &wrong, &Expiries::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::Tuf { .. }), "{err}");
    load(&f, addr, &f.path("ds3")).await.unwrap();
}

#[tokio::test]
async fn expired_metadata_is_refused_until_the_timestamp_is_refreshed() {
    // Expiry times have whole seconds: 3 s leave at least 2 s for the first load, even on a loaded machine.
    let short = Expiries {
        timestamp: Duration::from_secs(3),
        ..Expiries::default()
    };
    let f = Fixture::new(&short).await;
    let file = artefact(&f.path("build"), "nimbus-agent_1.0.0_amd64.deb", 5000, 1);
    let p = repo::add_target(&f.repo, &f.online, &file, &release("1.0.0", ArtefactKind::Deb), &short)
        .await
        .unwrap();
    let (addr, _stop) = start_server(&f.repo).await;
    let early = load(&f, addr, &f.path("ds-early")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4100)).await;

    // A client that loaded before expiry cannot fetch after it; a new load is refused too (freeze attack:
    // a server replaying the last metadata forever).
    let err = early.fetch(&p.release.target, &f.path("a")).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::Expired), "{err}");
    let err = load(&f, addr, &f.path("ds")).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::Expired), "{err}");

    let refreshed = repo::refresh_timestamp(&f.repo, &f.online, &Expiries::default())
        .await
        .unwrap();
    assert_eq!(refreshed.renewed, vec![KeyRole::Timestamp]);
    assert_eq!(refreshed.versions.timestamp, p.versions.timestamp + 1);
    assert_eq!(refreshed.versions.snapshot, p.versions.snapshot);
    let releases = load(&f, addr, &f.path("ds")).await.unwrap();
    releases.fetch(&p.release.target, &f.path("a")).await.unwrap();

    // Snapshot and targets past half their life are renewed with the timestamp.
    let renew_all = Expiries {
        snapshot: Duration::from_secs(400 * 24 * 3600),
        ..Expiries::default()
    };
    let refreshed = repo::refresh_timestamp(&f.repo, &f.online, &renew_all).await.unwrap();
    assert_eq!(
        refreshed.renewed,
        vec![KeyRole::Targets, KeyRole::Snapshot, KeyRole::Timestamp]
    );
    assert_eq!(refreshed.versions.snapshot, p.versions.snapshot + 1);
    load(&f, addr, &f.path("ds")).await.unwrap();
}

/// Signs `role` content with `key` as listed in `root`, the way a holder of that key (or of an old one) could.
async fn forge<T: tough::schema::Role + serde::Serialize>(role: T, root: &tough::schema::Root, key: &Path) -> Vec<u8> {
    let keys: Vec<Box<dyn tough::key_source::KeySource>> = vec![Box::new(FileKeySource {
        path: key.to_path_buf(),
    })];
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signed =
        tough::editor::signed::SignedRole::new(role, &tough::schema::KeyHolder::Root(root.clone()), &keys, &rng)
            .await
            .unwrap();
    signed.buffer().clone()
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> tough::schema::Signed<T> {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn rollbacks_are_refused_across_restarts() {
    let f = Fixture::new(&Expiries::default()).await;
    f.publish("nimbus-agent_1.0.0_amd64.deb", 1000, "1.0.0", ArtefactKind::Deb)
        .await;
    let old_timestamp = std::fs::read(f.repo.join("metadata/timestamp.json")).unwrap();
    let (addr, _stop) = start_server(&f.repo).await;
    let ds = f.path("ds");
    assert_eq!(load(&f, addr, &ds).await.unwrap().versions().timestamp, 2);
    f.publish("nimbus-agent_1.1.0_amd64.deb", 1000, "1.1.0", ArtefactKind::Deb)
        .await;
    let seen = load(&f, addr, &ds).await.unwrap();
    assert_eq!(seen.versions().timestamp, 3);
    drop(seen);

    // The server replays the older (validly signed, unexpired) timestamp: a restarted client refuses it.
    let current = std::fs::read(f.repo.join("metadata/timestamp.json")).unwrap();
    std::fs::write(f.repo.join("metadata/timestamp.json"), &old_timestamp).unwrap();
    let err = load(&f, addr, &ds).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::Rollback), "{err}");

    // A newer timestamp (signed with the real timestamp key) that points at the older snapshot: refused too.
    let root: tough::schema::Signed<tough::schema::Root> = read_json(&f.repo.join("metadata/root.json"));
    let mut ts: tough::schema::Signed<tough::schema::Timestamp> = serde_json::from_slice(&old_timestamp).unwrap();
    ts.signed.version = std::num::NonZeroU64::new(10).unwrap();
    let forged = forge(ts.signed, &root.signed, &f.online.timestamp).await;
    std::fs::write(f.repo.join("metadata/timestamp.json"), forged).unwrap();
    let err = load(&f, addr, &ds).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::Rollback), "{err}");

    std::fs::write(f.repo.join("metadata/timestamp.json"), current).unwrap();
    assert_eq!(load(&f, addr, &ds).await.unwrap().releases().len(), 2);
}

#[tokio::test]
async fn clients_follow_key_rotations_and_refuse_the_old_keys() {
    let f = Fixture::new(&Expiries::default()).await;
    f.publish("nimbus-agent_1.0.0_amd64.deb", 1000, "1.0.0", ArtefactKind::Deb)
        .await;
    let (addr, _stop) = start_server(&f.repo).await;
    let ds = f.path("ds");
    assert_eq!(load(&f, addr, &ds).await.unwrap().versions().root, 1);
    let root_v1: tough::schema::Signed<tough::schema::Root> = read_json(&f.repo.join("metadata/1.root.json"));

    // Rotate the timestamp key (the old one is presumed compromised).
    let old_ts_key = f.online.timestamp.clone();
    let new_ts_key = f.path("coordinator/keys/timestamp-2.pem");
    keys::generate_key(&new_ts_key).unwrap();
    let online2 = OnlineKeys {
        timestamp: new_ts_key.clone(),
        ..f.online.clone()
    };
    let err = repo::rotate(
        &f.repo,
        KeyRole::Timestamp,
        &f.online.targets,
        &online2,
        &Expiries::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            RepoError::WrongKey {
                role: KeyRole::Root,
                ..
            }
        ),
        "{err}"
    );
    let err = repo::rotate(
        &f.repo,
        KeyRole::Timestamp,
        &f.root_key,
        &f.online,
        &Expiries::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepoError::SameKey { .. }), "{err}");
    let rotated = repo::rotate(&f.repo, KeyRole::Timestamp, &f.root_key, &online2, &Expiries::default())
        .await
        .unwrap();
    assert_eq!(rotated.versions.root, 2);
    assert_eq!(rotated.old_key_ids, vec![keys::key_id(&old_ts_key).unwrap()]);
    assert_eq!(rotated.new_key_id, keys::key_id(&new_ts_key).unwrap());

    let r = load(&f, addr, &ds).await.unwrap();
    assert_eq!(r.versions().root, 2);
    drop(r);
    // A fresh agent pinned at v1 follows the chain too.
    assert_eq!(load(&f, addr, &f.path("ds-fresh")).await.unwrap().versions().root, 2);

    // The attacker with the old timestamp key signs a newer timestamp and hides 2.root.json: the restarted
    // agent starts from the root it saw last (v2) and refuses the old key.
    let current_ts: tough::schema::Signed<tough::schema::Timestamp> =
        read_json(&f.repo.join("metadata/timestamp.json"));
    let good_ts = std::fs::read(f.repo.join("metadata/timestamp.json")).unwrap();
    let mut ts = current_ts.signed.clone();
    ts.version = ts.version.checked_add(5).unwrap();
    let forged = forge(ts, &root_v1.signed, &old_ts_key).await;
    std::fs::write(f.repo.join("metadata/timestamp.json"), &forged).unwrap();
    let hidden = f.path("2.root.json");
    std::fs::rename(f.repo.join("metadata/2.root.json"), &hidden).unwrap();
    let err = load(&f, addr, &ds).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::BadSignature), "{err}");
    std::fs::rename(&hidden, f.repo.join("metadata/2.root.json")).unwrap();
    let err = load(&f, addr, &ds).await.unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::BadSignature), "{err}");
    std::fs::write(f.repo.join("metadata/timestamp.json"), &good_ts).unwrap();

    // Rotate the root key itself: root v3 is signed by the old and the new root key.
    let new_root_key = f.path("usb-stick-2/root.pem");
    keys::generate_key(&new_root_key).unwrap();
    let rotated = repo::rotate_root(&f.repo, &f.root_key, &new_root_key, &online2, &Expiries::default())
        .await
        .unwrap();
    assert_eq!(rotated.versions.root, 3);
    let v3: tough::schema::Signed<tough::schema::Root> = read_json(&f.repo.join("metadata/3.root.json"));
    assert_eq!(v3.signatures.len(), 2);
    assert_eq!(load(&f, addr, &ds).await.unwrap().versions().root, 3);
    assert_eq!(load(&f, addr, &f.path("ds-fresh-2")).await.unwrap().versions().root, 3);
    // The old root key can no longer sign anything.
    let err = repo::renew_root(&f.repo, &f.root_key, &online2, &Expiries::default())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::WrongKey { .. }), "{err}");
    let versions = repo::renew_root(&f.repo, &new_root_key, &online2, &Expiries::default())
        .await
        .unwrap();
    assert_eq!(versions.root, 4);
    // Publishing keeps working with the rotated online key.
    let file = artefact(&f.path("build"), "nimbus-agent_1.1.0_amd64.deb", 1000, 3);
    repo::add_target(
        &f.repo,
        &online2,
        &file,
        &release("1.1.0", ArtefactKind::Deb),
        &Expiries::default(),
    )
    .await
    .unwrap();
    assert_eq!(load(&f, addr, &ds).await.unwrap().releases().len(), 2);
}

/// A TCP proxy in front of the server that cuts the first response for a target after `cut` bytes, and records
/// every request head it forwards.
async fn flaky_proxy(upstream: SocketAddr, cut: usize) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        let mut cut_done = false;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if client.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let head_text = String::from_utf8_lossy(&head).to_string();
            let is_target = head_text.starts_with("GET /releases/targets/");
            seen.lock().unwrap().push(head_text);
            let limit = if is_target && !cut_done {
                cut_done = true;
                Some(cut)
            } else {
                None
            };
            tokio::spawn(async move {
                let mut server = TcpStream::connect(upstream).await.unwrap();
                server.write_all(&head).await.unwrap();
                let mut buf = vec![0u8; 16 * 1024];
                let mut sent = 0usize;
                loop {
                    let n = match server.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let n = match limit {
                        Some(l) if sent + n >= l => {
                            let _ = client.write_all(&buf[..l - sent]).await;
                            break; // drop both connections mid-body
                        }
                        _ => n,
                    };
                    if client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn a_broken_download_resumes_with_range_and_verifies() {
    let f = Fixture::new(&Expiries::default()).await;
    let p = f
        .publish("nimbus-agent_2.0.0_amd64.deb", 1_000_000, "2.0.0", ArtefactKind::Deb)
        .await;
    let (upstream, _stop) = start_server(&f.repo).await;
    let (proxy, heads) = flaky_proxy(upstream, 300_000).await;
    let releases = load(&f, proxy, &f.path("ds")).await.unwrap();
    let dest = f.path("agent.deb");
    releases.fetch(&p.release.target, &dest).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&p.stored_at).unwrap());

    let heads = heads.lock().unwrap().clone();
    let target_requests: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("GET /releases/targets/"))
        .collect();
    assert_eq!(target_requests.len(), 2, "{heads:#?}");
    assert!(
        !target_requests[0].to_ascii_lowercase().contains("range:"),
        "{}",
        target_requests[0]
    );
    let resumed = target_requests[1].to_ascii_lowercase();
    let offset: u64 = resumed
        .split("range: bytes=")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Range on the second request: {resumed}"));
    assert!(offset > 0 && offset < 1_000_000, "{offset}");
}

#[tokio::test]
async fn a_server_that_keeps_failing_exhausts_the_retries() {
    // Nothing listens there: every connect is refused, the bounded retries run out quickly.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let f = Fixture::new(&Expiries::default()).await;
    let started = std::time::Instant::now();
    let err = load(&f, addr, &f.path("ds")).await.unwrap_err();
    assert!(err.to_string().contains("gave up after 4 reconnects"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// One raw HTTP/1.1 exchange (so paths reach the server exactly as written): (status, head, body).
async fn raw(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, head, out[split..].to_vec())
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n")
}

#[tokio::test]
async fn the_server_serves_plain_files_and_ranges_only() {
    let f = Fixture::new(&Expiries::default()).await;
    let p = f
        .publish("nimbus-agent_1.0.0_amd64.deb", 100_000, "1.0.0", ArtefactKind::Deb)
        .await;
    let bytes = std::fs::read(&p.stored_at).unwrap();
    let name = p.stored_at.file_name().unwrap().to_str().unwrap().to_string();
    let targets = f.repo.join("targets");
    std::os::unix::fs::symlink(f.repo.join("metadata/root.json"), targets.join("link.json")).unwrap();
    std::os::unix::fs::symlink("/etc", targets.join("etc")).unwrap();
    nix_mkfifo(&targets.join("fifo"));
    let (addr, _stop) = start_server(&f.repo).await;
    let path = format!("/releases/targets/{name}");

    let (status, head, body) = raw(addr, &get(&path, "")).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, bytes);
    assert!(head.contains("accept-ranges: bytes"), "{head}");
    assert!(head.contains("content-length: 100000"), "{head}");

    let (status, head, body) = raw(addr, &get(&path, "Range: bytes=10-19\r\n")).await;
    assert_eq!(status, 206, "{head}");
    assert!(head.contains("content-range: bytes 10-19/100000"), "{head}");
    assert_eq!(body, &bytes[10..20]);
    let (status, _, body) = raw(addr, &get(&path, "Range: bytes=99990-\r\n")).await;
    assert_eq!((status, body.as_slice()), (206, &bytes[99_990..]));
    let (status, _, body) = raw(addr, &get(&path, "Range: bytes=-5\r\n")).await;
    assert_eq!((status, body.as_slice()), (206, &bytes[99_995..]));
    for bad in ["bytes=100000-", "bytes=20-10", "bytes=0-1,4-5", "bytes=x-", "lines=1-2"] {
        let (status, head, _) = raw(addr, &get(&path, &format!("Range: {bad}\r\n"))).await;
        assert_eq!(status, 416, "{bad}: {head}");
        assert!(head.contains("content-range: bytes */100000"), "{bad}: {head}");
    }

    let (status, head, body) = raw(
        addr,
        &format!("HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!((status, body.len()), (200, 0), "{head}");
    assert!(head.contains("content-length: 100000"), "{head}");
    let (status, head, _) = raw(
        addr,
        &format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 405, "{head}");
    assert!(head.contains("allow: get, head"), "{head}");

    let (status, head, _) = raw(addr, &get("/releases/metadata/timestamp.json", "")).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"), "{head}");
    for bad in [
        "/releases/metadata/../targets/".to_string() + &name,
        "/releases/targets/../metadata/root.json".into(),
        "/releases/targets/%2e%2e%2fmetadata%2froot.json".into(),
        "/releases/targets/..".into(),
        "/releases/targets/link.json".into(),
        "/releases/targets/etc".into(),
        "/releases/targets/fifo".into(),
        "/releases/targets/.lock".into(),
        "/releases/metadata/".into(),
        "/releases/".into(),
        "/metadata/root.json".into(),
        "/releases/targets/missing".into(),
    ] {
        let (status, head, _) = raw(addr, &get(&bad, "")).await;
        assert_eq!(status, 404, "{bad}: {head}");
    }

    // A directory that is itself a symlink is not served either.
    let linked = f.path("linked-repo");
    std::fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink(f.repo.join("metadata"), linked.join("metadata")).unwrap();
    let (addr2, _stop2) = start_server(&linked).await;
    let (status, _, _) = raw(addr2, &get("/releases/metadata/timestamp.json", "")).await;
    assert_eq!(status, 404);
}

fn nix_mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}
