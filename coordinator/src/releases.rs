//! Agent releases on the coordinator: the TUF repository (crate `release`) that `nimbusctl release` fills, served
//! read-only to agents inside the tunnel, and kept fresh.
//!
//! Layout under `<data_dir>/releases/`: `repo/metadata/` and `repo/targets/` (the repository, world-readable
//! inside a 0700 data dir), `keys/{targets,snapshot,timestamp}.pem` (the online keys, 0600; the root key never
//! comes here), `uploads/` (artefacts being received, removed once published or refused).
//!
//! - [`Releases::install`]: takes the metadata `nimbusctl release init` signed with the offline root key plus the
//!   online keys, checks names and sizes, writes them, and proves the keys belong to that root by re-signing
//!   the timestamp and loading the result; anything that fails is removed again.
//! - [`Releases::add`]: an uploaded artefact (streamed to `uploads/`, length and SHA-256 checked against the
//!   header) published with [`release::repo::add_target`].
//! - [`Releases::refresh`]: the timestamp (and snapshot/targets past half their life) re-signed; the server
//!   runs it every [`REFRESH_EVERY`], well inside the timestamp's one-day expiry (freeze protection).
//! - Serving: [`release::RepoServer`] on `<overlay address>:<release_port>`, bound to the TUN device, so only
//!   agents inside the tunnel reach it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use release::{AgentRelease, ArtefactKind, Expiries, OnlineKeys};
use sha2::{Digest, Sha256};

/// How often the timestamp is re-signed.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
/// Largest metadata file accepted at install.
pub const MAX_METADATA_BYTES: usize = 1 << 20;
/// Largest artefact accepted.
pub const MAX_ARTEFACT_BYTES: u64 = 1 << 30;

/// Why a release operation failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("no release repository is installed: run `nimbusctl release init` and `nimbusctl release install`")]
    NotInstalled,
    #[error(
        "a release repository is already installed; pass --replace to replace it (agents that pinned its root will refuse the new one)"
    )]
    AlreadyInstalled,
    #[error("invalid release request: {0}")]
    Invalid(String),
    #[error("{what} {}: {source}; check the data directory's ownership and free space", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Repo(#[from] release::repo::RepoError),
}

impl From<ReleaseError> for tonic::Status {
    fn from(e: ReleaseError) -> tonic::Status {
        match &e {
            ReleaseError::NotInstalled => tonic::Status::failed_precondition(e.to_string()),
            ReleaseError::AlreadyInstalled => tonic::Status::already_exists(e.to_string()),
            ReleaseError::Invalid(_) | ReleaseError::Repo(_) => tonic::Status::invalid_argument(e.to_string()),
            ReleaseError::Io { .. } => {
                tracing::error!(error = %e, "release store I/O failed");
                tonic::Status::internal(e.to_string())
            }
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ReleaseError + 'a {
    move |source| ReleaseError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What `nimbusctl release list` shows.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub releases: Vec<release::ReleaseInfo>,
    pub root_version: u64,
    /// Hex SHA-256 of the newest root file.
    pub root_sha256: String,
    /// RFC 3339, from the signed timestamp.
    pub timestamp_expires: String,
}

/// One upload's header, checked.
#[derive(Debug, Clone)]
pub struct Upload {
    pub file_name: String,
    pub release: AgentRelease,
    pub length: u64,
    pub sha256: String,
}

impl Upload {
    /// Checks an upload header from the network.
    pub fn parse(h: &nimbus_proto::ReleaseHeader) -> Result<Upload, ReleaseError> {
        if !release::serve::valid_name(&h.file_name) {
            return Err(ReleaseError::Invalid(format!(
                "file name {:?} is not a plain name of [A-Za-z0-9._+-]; rename the artefact",
                h.file_name.chars().take(80).collect::<String>()
            )));
        }
        let version = semver::Version::parse(&h.version).map_err(|e| {
            ReleaseError::Invalid(format!(
                "version {:?} is not a semantic version ({e}), e.g. 0.2.0",
                h.version
            ))
        })?;
        let kind: ArtefactKind = h
            .kind
            .parse()
            .map_err(|_| ReleaseError::Invalid(format!("kind {:?}: use binary, deb or rpm", h.kind)))?;
        if h.arch.is_empty() || h.arch.len() > 32 || !h.arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ReleaseError::Invalid(format!(
                "arch {:?}: use e.g. x86_64 or aarch64",
                h.arch
            )));
        }
        if h.length == 0 || h.length > MAX_ARTEFACT_BYTES {
            return Err(ReleaseError::Invalid(format!(
                "length {} is outside 1..={MAX_ARTEFACT_BYTES}",
                h.length
            )));
        }
        if h.sha256.len() != 64 || !h.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReleaseError::Invalid("sha256 must be 64 hex digits".into()));
        }
        Ok(Upload {
            file_name: h.file_name.clone(),
            release: AgentRelease {
                version,
                kind,
                arch: h.arch.clone(),
            },
            length: h.length,
            sha256: h.sha256.to_ascii_lowercase(),
        })
    }
}

/// An upload in progress: bytes go to a file in `uploads/`, hashed as they arrive.
pub struct Receiving {
    upload: Upload,
    dir: PathBuf,
    path: PathBuf,
    file: std::fs::File,
    hasher: Sha256,
    received: u64,
}

impl Receiving {
    /// Appends a chunk (blocking).
    pub fn write(&mut self, data: &[u8]) -> Result<(), ReleaseError> {
        self.received += data.len() as u64;
        if self.received > self.upload.length {
            return Err(ReleaseError::Invalid(format!(
                "more bytes than the announced length {}",
                self.upload.length
            )));
        }
        self.hasher.update(data);
        self.file.write_all(data).map_err(io("cannot write", &self.path))
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The coordinator's release store.
pub struct Releases {
    root: PathBuf,
    expiries: Expiries,
}

const ONLINE_ROLES: [&str; 3] = ["targets", "snapshot", "timestamp"];

/// Whether `name` is a metadata file a repository may hold.
fn metadata_name(name: &str) -> bool {
    let fixed = ["root.json", "timestamp.json"];
    if fixed.contains(&name) {
        return true;
    }
    let Some((n, rest)) = name.split_once('.') else {
        return false;
    };
    !n.is_empty()
        && n.len() <= 20
        && n.bytes().all(|b| b.is_ascii_digit())
        && ["root.json", "targets.json", "snapshot.json"].contains(&rest)
}

impl Releases {
    /// The repository in `<data_dir>/releases`.
    pub fn new(data_dir: &Path) -> Releases {
        Releases::at(&data_dir.join("releases"))
    }

    /// The repository rooted at `root` (`releases_dir`).
    pub fn at(root: &Path) -> Releases {
        Releases {
            root: root.to_path_buf(),
            expiries: Expiries::default(),
        }
    }

    /// The online keys' directory (sealed into the store for every replica on etcd).
    pub fn keys_path(&self) -> PathBuf {
        self.keys_dir()
    }

    pub fn repo_dir(&self) -> PathBuf {
        self.root.join("repo")
    }

    fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    fn online(&self) -> OnlineKeys {
        OnlineKeys::in_dir(&self.keys_dir())
    }

    /// Whether a repository is installed.
    pub fn installed(&self) -> bool {
        self.repo_dir().join("metadata").join("1.root.json").is_file()
    }

    /// Installs a repository (see the module docs).
    pub async fn install(
        &self,
        metadata: HashMap<String, Vec<u8>>,
        keys: [Vec<u8>; 3],
        replace: bool,
    ) -> Result<Summary, ReleaseError> {
        if self.installed() && !replace {
            return Err(ReleaseError::AlreadyInstalled);
        }
        if !metadata.contains_key("1.root.json") {
            return Err(ReleaseError::Invalid(
                "the metadata has no 1.root.json; send the metadata/ directory `nimbusctl release init` wrote".into(),
            ));
        }
        for (name, bytes) in &metadata {
            if !metadata_name(name) {
                return Err(ReleaseError::Invalid(format!(
                    "{:?} is not a TUF metadata file name",
                    name.chars().take(80).collect::<String>()
                )));
            }
            if bytes.len() > MAX_METADATA_BYTES {
                return Err(ReleaseError::Invalid(format!(
                    "{name} is larger than {MAX_METADATA_BYTES} bytes"
                )));
            }
        }
        for (role, key) in ONLINE_ROLES.iter().zip(&keys) {
            if key.is_empty() || key.len() > 16 * 1024 || !key.starts_with(b"-----BEGIN PRIVATE KEY-----") {
                return Err(ReleaseError::Invalid(format!(
                    "the {role} key is not a PKCS#8 PEM private key"
                )));
            }
        }
        // Build the new repository beside the old one, then swap: a failure leaves the old one as it was.
        let staging = self.root.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        let staged_repo = staging.join("repo");
        let staged_keys = staging.join("keys");
        let result = async {
            for dir in [
                &staged_repo.join("metadata"),
                &staged_repo.join("targets"),
                &staged_keys,
            ] {
                std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
            }
            set_mode(&staging, 0o700)?;
            set_mode(&staged_keys, 0o700)?;
            for (name, bytes) in &metadata {
                let path = staged_repo.join("metadata").join(name);
                std::fs::write(&path, bytes).map_err(io("cannot write", &path))?;
            }
            for (role, key) in ONLINE_ROLES.iter().zip(&keys) {
                let path = staged_keys.join(format!("{role}.pem"));
                write_secret(&path, key)?;
            }
            let online = OnlineKeys::in_dir(&staged_keys);
            // Signs with the online keys and verifies from the root: proves they belong together.
            release::repo::refresh_timestamp(&staged_repo, &online, &self.expiries).await?;
            release::repo::list(&staged_repo).await?;
            Ok::<(), ReleaseError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        std::fs::create_dir_all(&self.root).map_err(io("cannot create", &self.root))?;
        set_mode(&self.root, 0o700)?;
        for (from, to) in [(staged_repo, self.repo_dir()), (staged_keys, self.keys_dir())] {
            let old = to.with_extension("old");
            let _ = std::fs::remove_dir_all(&old);
            if to.exists() {
                std::fs::rename(&to, &old).map_err(io("cannot move aside", &to))?;
            }
            std::fs::rename(&from, &to).map_err(io("cannot install", &to))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        let _ = std::fs::remove_dir_all(&staging);
        tracing::info!(repo = %self.repo_dir().display(), "release repository installed");
        self.summary().await
    }

    /// Starts receiving an upload.
    pub fn receive(&self, upload: Upload) -> Result<Receiving, ReleaseError> {
        if !self.installed() {
            return Err(ReleaseError::NotInstalled);
        }
        let dir = self
            .root
            .join("uploads")
            .join(format!("{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let path = dir.join(&upload.file_name);
        let file = std::fs::File::create(&path).map_err(io("cannot create", &path))?;
        Ok(Receiving {
            upload,
            dir,
            path,
            file,
            hasher: Sha256::new(),
            received: 0,
        })
    }

    /// Publishes a complete upload.
    pub async fn add(&self, mut r: Receiving) -> Result<Summary, ReleaseError> {
        if r.received != r.upload.length {
            return Err(ReleaseError::Invalid(format!(
                "received {} bytes, the header announced {}: the upload was cut short; send it again",
                r.received, r.upload.length
            )));
        }
        let sha = hex::encode(std::mem::take(&mut r.hasher).finalize());
        if sha != r.upload.sha256 {
            return Err(ReleaseError::Invalid(format!(
                "the uploaded bytes have SHA-256 {sha}, the header says {}: nothing published",
                r.upload.sha256
            )));
        }
        r.file.sync_all().map_err(io("cannot sync", &r.path))?;
        let published = release::repo::add_target(
            &self.repo_dir(),
            &self.online(),
            &r.path,
            &r.upload.release,
            &self.expiries,
        )
        .await?;
        tracing::info!(
            version = %published.release.release.version, target = %published.release.target,
            sha256 = %published.release.sha256, "agent release published"
        );
        self.summary().await
    }

    /// Re-signs the timestamp (and what is past half its life).
    pub async fn refresh(&self) -> Result<(), ReleaseError> {
        if !self.installed() {
            return Ok(());
        }
        let r = release::repo::refresh_timestamp(&self.repo_dir(), &self.online(), &self.expiries).await?;
        tracing::info!(renewed = ?r.renewed, root_expires = %r.root_expires, "release metadata re-signed");
        Ok(())
    }

    /// What is published.
    pub async fn summary(&self) -> Result<Summary, ReleaseError> {
        if !self.installed() {
            return Ok(Summary::default());
        }
        let (releases, versions) = release::repo::list(&self.repo_dir()).await?;
        let meta = self.repo_dir().join("metadata");
        let root = std::fs::read(meta.join(format!("{}.root.json", versions.root))).unwrap_or_default();
        let timestamp_expires = std::fs::read(meta.join("timestamp.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["signed"]["expires"].as_str().map(str::to_string))
            .unwrap_or_default();
        Ok(Summary {
            releases,
            root_version: versions.root,
            root_sha256: hex::encode(Sha256::digest(&root)),
            timestamp_expires,
        })
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ReleaseError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("cannot chmod", path))
}

/// Writes a secret file created 0600 (never world-readable, not even briefly).
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot create", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("cannot write", path))
}

// ---- admin RPCs (thin: `crate::admin` delegates here) ----

/// Where agents fetch the repository: the coordinator's overlay address, inside the tunnel.
pub fn url(ctx: &crate::context::Ctx) -> String {
    format!("http://{}:{}/", ctx.coordinator_ip, ctx.config.release_port)
}

/// The metadata URL under a repository base URL ([`url`]).
pub fn metadata_url(base: &str) -> String {
    format!("{base}metadata/")
}

/// The targets URL under a repository base URL ([`url`]).
pub fn targets_url(base: &str) -> String {
    format!("{base}targets/")
}

fn list_message(ctx: &crate::context::Ctx, s: Summary) -> nimbus_proto::ReleaseList {
    nimbus_proto::ReleaseList {
        releases: s
            .releases
            .into_iter()
            .map(|r| nimbus_proto::ReleaseEntry {
                version: r.release.version.to_string(),
                kind: r.release.kind.to_string(),
                arch: r.release.arch,
                sha256: r.sha256,
                length: r.length,
                target: r.target,
            })
            .collect(),
        root_version: s.root_version,
        root_sha256: s.root_sha256,
        timestamp_expires: s.timestamp_expires,
        url: url(ctx),
    }
}

/// `InstallReleaseRepository`.
pub async fn install_rpc(
    ctx: &crate::context::Ctx,
    by: &str,
    r: nimbus_proto::InstallReleaseRepositoryRequest,
) -> Result<nimbus_proto::ReleaseList, tonic::Status> {
    let releases = Releases::at(&ctx.config.releases_dir);
    let summary = releases
        .install(
            r.metadata.into_iter().collect(),
            [r.targets_key, r.snapshot_key, r.timestamp_key],
            r.replace,
        )
        .await?;
    tracing::info!(
        by,
        root_version = summary.root_version,
        "release repository installed by an operator"
    );
    crate::replicas::seal_release_keys(ctx, &releases.keys_path()).await;
    Ok(list_message(ctx, summary))
}

/// `AddRelease`: a header, then data chunks.
pub async fn add_rpc(
    ctx: &crate::context::Ctx,
    by: &str,
    mut stream: tonic::Streaming<nimbus_proto::AddReleaseChunk>,
) -> Result<nimbus_proto::ReleaseList, tonic::Status> {
    use nimbus_proto::add_release_chunk::Part;
    let releases = std::sync::Arc::new(Releases::at(&ctx.config.releases_dir));
    let header = match stream.message().await? {
        Some(nimbus_proto::AddReleaseChunk {
            part: Some(Part::Header(h)),
        }) => h,
        _ => {
            return Err(tonic::Status::invalid_argument(
                "the first AddRelease message must be the header",
            ));
        }
    };
    let upload = Upload::parse(&header)?;
    let r2 = std::sync::Arc::clone(&releases);
    let mut rx = tokio::task::spawn_blocking(move || r2.receive(upload))
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))??;
    while let Some(chunk) = stream.message().await? {
        let Some(Part::Data(data)) = chunk.part else {
            return Err(tonic::Status::invalid_argument(
                "only data chunks may follow the header",
            ));
        };
        rx = tokio::task::spawn_blocking(move || rx.write(&data).map(|()| rx))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))??;
    }
    let summary = releases.add(rx).await?;
    tracing::info!(by, version = %header.version, file = %header.file_name, "agent release added by an operator");
    Ok(list_message(ctx, summary))
}

/// Checks a `StartUpgrade` request against what is published: the release must exist as a binary for the arch.
pub async fn upgrade_request(
    ctx: &crate::context::Ctx,
    r: nimbus_proto::StartUpgradeRequest,
) -> Result<crate::upgrade::UpgradeRequest, tonic::Status> {
    let version = semver::Version::parse(&r.version).map_err(|e| {
        tonic::Status::invalid_argument(format!("version {:?} is not a semantic version ({e})", r.version))
    })?;
    let arch = if r.arch.is_empty() {
        std::env::consts::ARCH.to_string()
    } else {
        r.arch.clone()
    };
    let by_zone = match r.by.as_str() {
        "" | "pool" => false,
        "zone" => true,
        other => {
            return Err(tonic::Status::invalid_argument(format!(
                "by {other:?}: use pool or zone"
            )));
        }
    };
    let max_unavailable =
        crate::upgrade::MaxUnavailable::parse(&r.max_unavailable).map_err(tonic::Status::invalid_argument)?;
    let summary = Releases::at(&ctx.config.releases_dir).summary().await?;
    if summary.root_version == 0 {
        return Err(ReleaseError::NotInstalled.into());
    }
    let Some(found) = summary
        .releases
        .iter()
        .find(|i| i.release.version == version && i.release.kind == ArtefactKind::Binary && i.release.arch == arch)
    else {
        return Err(tonic::Status::failed_precondition(format!(
            "no agent binary {version} for {arch} is published: `nimbusctl release add FILE --version {version} --arch {arch}` first"
        )));
    };
    if r.abort_failure_percent > 100 {
        return Err(tonic::Status::invalid_argument(
            "abort_failure_percent is a share: 0..=100",
        ));
    }
    let published = summary
        .releases
        .iter()
        .filter(|i| i.release.kind == ArtefactKind::Binary && i.release.arch == arch)
        .map(|i| (i.release.version.to_string(), i.target.clone()))
        .collect();
    Ok(crate::upgrade::UpgradeRequest {
        target: crate::placement::AgentTarget {
            version: version.to_string(),
            target: found.target.clone(),
            allow_downgrade: r.allow_downgrade,
        },
        canary: r.canary,
        max_unavailable,
        by_zone,
        pause_after_canary: r.pause_after_canary,
        max_failures: r.max_failures,
        abort_failure_percent: r.abort_failure_percent,
        rollback: r.rollback,
        published,
    })
}

/// `ListReleases`.
pub async fn list_rpc(ctx: &crate::context::Ctx) -> Result<nimbus_proto::ReleaseList, tonic::Status> {
    let summary = Releases::at(&ctx.config.releases_dir).summary().await?;
    Ok(list_message(ctx, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names() {
        for ok in [
            "1.root.json",
            "12.root.json",
            "root.json",
            "timestamp.json",
            "3.targets.json",
            "4.snapshot.json",
        ] {
            assert!(metadata_name(ok), "{ok}");
        }
        for bad in [
            "../root.json",
            "x.root.json",
            "1.root.json.bak",
            "timestamp.json/",
            "",
            ".root.json",
            "1.keys.json",
        ] {
            assert!(!metadata_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn install_add_list_and_refusals() {
        let ops = tempfile::tempdir().unwrap();
        let root_key = ops.path().join("root.pem");
        release::keys::generate_key(&root_key).unwrap();
        let online = OnlineKeys::generate(&ops.path().join("keys")).unwrap();
        let repo = ops.path().join("repo");
        release::repo::init(&root_key, &online, &repo, &Expiries::default())
            .await
            .unwrap();
        let metadata: HashMap<String, Vec<u8>> = std::fs::read_dir(repo.join("metadata"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        let keys = [
            std::fs::read(&online.targets).unwrap(),
            std::fs::read(&online.snapshot).unwrap(),
            std::fs::read(&online.timestamp).unwrap(),
        ];

        let data = tempfile::tempdir().unwrap();
        let r = Releases::new(data.path());
        assert!(matches!(
            r.receive(upload("a", 3, &[1, 2, 3])),
            Err(ReleaseError::NotInstalled)
        ));

        // Keys that do not belong to the root are refused and nothing is installed.
        let other = OnlineKeys::generate(&ops.path().join("other")).unwrap();
        let wrong = [
            std::fs::read(&other.targets).unwrap(),
            std::fs::read(&other.snapshot).unwrap(),
            std::fs::read(&other.timestamp).unwrap(),
        ];
        assert!(r.install(metadata.clone(), wrong, false).await.is_err());
        assert!(!r.installed());

        let s = r.install(metadata.clone(), keys.clone(), false).await.unwrap();
        assert_eq!((s.root_version, s.releases.len()), (1, 0));
        assert!(matches!(
            r.install(metadata.clone(), keys.clone(), false).await,
            Err(ReleaseError::AlreadyInstalled)
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("releases/keys/timestamp.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let bytes = b"#!/bin/sh\necho new agent\n";
        let mut rx = r.receive(upload("nimbus-agent", bytes.len() as u64, bytes)).unwrap();
        rx.write(bytes).unwrap();
        let s = r.add(rx).await.unwrap();
        assert_eq!(s.releases.len(), 1);
        assert_eq!(s.releases[0].release.version.to_string(), "0.2.0");
        assert!(!s.timestamp_expires.is_empty());

        // Wrong digest and short upload: refused, nothing published, upload dir cleaned.
        let mut rx = r.receive(upload("other", 3, b"abd")).unwrap();
        rx.write(b"abc").unwrap();
        assert!(r.add(rx).await.unwrap_err().to_string().contains("nothing published"));
        let mut rx = r.receive(upload("other", 3, b"abc")).unwrap();
        rx.write(b"ab").unwrap();
        assert!(r.add(rx).await.unwrap_err().to_string().contains("cut short"));
        assert_eq!(
            std::fs::read_dir(data.path().join("releases/uploads")).unwrap().count(),
            0
        );
        assert_eq!(r.summary().await.unwrap().releases.len(), 1);
        r.refresh().await.unwrap();
    }

    fn upload(name: &str, length: u64, bytes: &[u8]) -> Upload {
        Upload::parse(&nimbus_proto::ReleaseHeader {
            file_name: name.into(),
            version: "0.2.0".into(),
            kind: "binary".into(),
            arch: "x86_64".into(),
            length,
            sha256: hex::encode(Sha256::digest(bytes)),
        })
        .unwrap()
    }
}
