//! The publisher side: create a repository, add agent artefacts, re-sign, rotate keys.
//!
//! Every operation takes an exclusive lock on `<repo>/.lock`, loads and verifies the current metadata with
//! `tough` (expiry not enforced: refreshing expired metadata is the point of some operations), builds the new
//! metadata with `tough::editor::RepositoryEditor`, writes it to a staging directory inside the repository and
//! renames the files into `metadata/`: targets, then snapshot, then `timestamp.json` last. Artefacts are
//! copied to `targets/<sha256>.<name>` (consistent snapshots) before any metadata names them.
//!
//! Versions only go up: each re-signing bumps the version of every role it re-signs, which is what lets clients
//! refuse rollbacks.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use tough::editor::RepositoryEditor;
use tough::editor::signed::SignedRole;
use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{Hashes, KeyHolder, Role, RoleKeys, Root, Target};
use tough::{ExpirationEnforcement, FilesystemTransport, RepositoryLoader, TargetName};
use url::Url;

use crate::client::ReleaseInfo;
use crate::fsio;
use crate::keys::{self, FileKeySource, KeyError, KeyRole, OnlineKeys};
use crate::{AgentRelease, ArtefactKind};

/// The TUF specification version written into metadata (the one `tough` supports).
const SPEC_VERSION: &str = "1.0.0";
/// Mode of published metadata and artefacts: anyone on the host may read them, they are public anyway.
const PUBLIC_FILE: u32 = 0o644;
/// Longest artefact file name accepted (the served name adds 65 characters of digest).
const MAX_NAME: usize = 180;

/// Errors of repository operations.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} already holds a release repository (1.root.json exists); use add/refresh/rotate on it, or choose an empty directory"
    )]
    AlreadyInitialised { path: PathBuf },
    #[error("{path} is not a release repository (no metadata/root.json); create one with `init` first")]
    NotARepository { path: PathBuf },
    #[error("{action}: {source}")]
    Tuf {
        action: &'static str,
        source: Box<tough::error::Error>,
    },
    #[error(
        "the same key ({key_id}) is given for the {first} and {second} roles: each role needs its own key, and the root key must stay offline"
    )]
    SharedKey {
        key_id: String,
        first: KeyRole,
        second: KeyRole,
    },
    #[error(
        "the key {path} (id {key_id}) is not this repository's current {role} key; pass the {role} key listed in metadata/root.json"
    )]
    WrongKey {
        role: KeyRole,
        path: PathBuf,
        key_id: String,
    },
    #[error("the key {path} is already the {role} key: generate a new key file and pass that one to rotate")]
    SameKey { role: KeyRole, path: PathBuf },
    #[error(
        "rotate replaces an online role's key; the root key is replaced with rotate_root (signed by the old and the new root key)"
    )]
    RotateRootWithRotate,
    #[error(
        "artefact name {name:?} is not allowed ({reason}); rename the file to letters, digits and `._+-`, e.g. nimbus-agent_1.2.3_amd64.deb"
    )]
    BadArtefactName { name: String, reason: &'static str },
    #[error(
        "target {name} is already published with SHA-256 {existing}, the new file has {new}: published artefacts are immutable; publish it under a new version and file name"
    )]
    ArtefactChanged {
        name: String,
        existing: String,
        new: String,
    },
    #[error(
        "target {name} is already published with the same bytes but other release metadata (version, kind, arch); a published target never changes"
    )]
    ReleaseMismatch { name: String },
    #[error("release {version} {kind} {arch} is already published as {existing}; a release is published once")]
    DuplicateRelease {
        version: semver::Version,
        kind: ArtefactKind,
        arch: String,
        existing: String,
    },
    #[error("expiry {what} is out of range: {reason}")]
    Expiry { what: &'static str, reason: String },
    #[error("metadata version overflow for {role}")]
    VersionOverflow { role: KeyRole },
    #[error("the new root does not verify ({reason}); nothing was written")]
    RootCheck { reason: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RepoError + 'a {
    move |source| RepoError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn tuf(action: &'static str) -> impl FnOnce(tough::error::Error) -> RepoError {
    move |source| RepoError::Tuf {
        action,
        source: Box::new(source),
    }
}

/// How long newly signed metadata stays valid. A client refuses metadata past its expiry (freeze protection),
/// so the timestamp must be re-signed well within `timestamp` (the coordinator does it daily).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiries {
    /// Default 365 days. Renewing it needs the offline root key.
    pub root: Duration,
    /// Default 90 days.
    pub targets: Duration,
    /// Default 7 days.
    pub snapshot: Duration,
    /// Default 1 day.
    pub timestamp: Duration,
}

const DAY: u64 = 24 * 3600;

impl Default for Expiries {
    fn default() -> Self {
        Expiries {
            root: Duration::from_secs(365 * DAY),
            targets: Duration::from_secs(90 * DAY),
            snapshot: Duration::from_secs(7 * DAY),
            timestamp: Duration::from_secs(DAY),
        }
    }
}

/// The version of each role's current metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MetadataVersions {
    pub root: u64,
    pub targets: u64,
    pub snapshot: u64,
    pub timestamp: u64,
}

impl MetadataVersions {
    pub(crate) fn of(repo: &tough::Repository) -> MetadataVersions {
        MetadataVersions {
            root: repo.root().signed.version.get(),
            targets: repo.targets().signed.version.get(),
            snapshot: repo.snapshot().signed.version.get(),
            timestamp: repo.timestamp().signed.version.get(),
        }
    }
}

/// What [`init`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initialised {
    /// `metadata/1.root.json`: the file agents pin at install time.
    pub root_json: PathBuf,
    pub versions: MetadataVersions,
}

/// What [`add_target`] published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub release: ReleaseInfo,
    /// Where the artefact is stored: `targets/<sha256>.<name>`.
    pub stored_at: PathBuf,
    pub versions: MetadataVersions,
}

/// What [`refresh_timestamp`] re-signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// Always contains `Timestamp`; `Snapshot` and `Targets` too when they were past half their lifetime.
    pub renewed: Vec<KeyRole>,
    pub versions: MetadataVersions,
    /// When root.json expires: renewing it needs the offline root key (`rotate_root` with the same key, or a
    /// rotation), so warn an operator well before.
    pub root_expires: jiff::Timestamp,
}

/// What [`rotate`] / [`rotate_root`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub role: KeyRole,
    pub old_key_ids: Vec<String>,
    pub new_key_id: String,
    /// The new `metadata/N.root.json`.
    pub root_json: PathBuf,
    pub versions: MetadataVersions,
}

/// Creates a repository in `repo_dir`: `metadata/1.root.json` (and `root.json`) signed by `root_key`, listing one
/// key per role with threshold 1, plus empty targets, snapshot and timestamp signed by the online keys, so
/// clients can load it at once. `root_key` should be on offline media; only its signature is written.
pub async fn init(
    root_key: &Path,
    online: &OnlineKeys,
    repo_dir: &Path,
    expiries: &Expiries,
) -> Result<Initialised, RepoError> {
    let meta = repo_dir.join("metadata");
    let first = meta.join("1.root.json");
    if std::fs::symlink_metadata(&first).is_ok() {
        return Err(RepoError::AlreadyInitialised {
            path: repo_dir.to_path_buf(),
        });
    }
    fsio::create_dirs(&meta, 0o755).map_err(io("cannot create", &meta))?;
    let targets_dir = repo_dir.join("targets");
    fsio::create_dirs(&targets_dir, 0o755).map_err(io("cannot create", &targets_dir))?;
    let _lock = lock(repo_dir).await?;

    let mut ids: Vec<(KeyRole, String, tough::schema::key::Key)> = Vec::new();
    for role in KeyRole::ALL {
        let path = match role {
            KeyRole::Root => root_key,
            _ => online.path(role).unwrap_or(root_key),
        };
        let (id, key) = keys::tuf_key(path)?;
        if let Some((other, ..)) = ids.iter().find(|(_, other_id, _)| *other_id == id) {
            return Err(RepoError::SharedKey {
                key_id: id,
                first: *other,
                second: role,
            });
        }
        ids.push((role, id, key));
    }
    let mut root = Root {
        spec_version: SPEC_VERSION.to_string(),
        consistent_snapshot: true,
        version: NonZeroU64::MIN,
        expires: expires_in("root", expiries.root)?,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for (role, id, key) in ids {
        let id = decode_id(&id)?;
        root.keys.insert(id.clone(), key);
        root.roles.insert(
            role.role_type(),
            RoleKeys {
                keyids: vec![id],
                threshold: NonZeroU64::MIN,
                _extra: HashMap::new(),
            },
        );
    }
    let signed = sign_root(root, None, &[FileKeySource::boxed(root_key)]).await?;
    write_root(&meta, &signed)?;

    // Empty targets, snapshot and timestamp, version 1.
    let mut editor = RepositoryEditor::new(meta.join("root.json"))
        .await
        .map_err(tuf("cannot read the new root"))?;
    editor
        .targets_version(NonZeroU64::MIN)
        .map_err(tuf("cannot set the targets version"))?;
    editor
        .targets_expires(expires_in("targets", expiries.targets)?)
        .map_err(tuf("cannot set the targets expiry"))?;
    editor
        .snapshot_version(NonZeroU64::MIN)
        .snapshot_expires(expires_in("snapshot", expiries.snapshot)?)
        .timestamp_version(NonZeroU64::MIN)
        .timestamp_expires(expires_in("timestamp", expiries.timestamp)?);
    let signed_repo = editor
        .sign(&online.sources())
        .await
        .map_err(tuf("cannot sign the initial metadata"))?;
    install_metadata(repo_dir, &signed_repo, 1, 1).await?;
    let repo = load(repo_dir).await?;
    tracing::info!(repo = %repo_dir.display(), "release repository created");
    Ok(Initialised {
        root_json: first,
        versions: MetadataVersions::of(&repo),
    })
}

/// Adds `artefact` as a target named by its file name, with `release` as signed custom metadata, stores it
/// content-addressed under `targets/`, and re-signs targets, snapshot and timestamp with bumped versions.
///
/// Publishing the identical file again is a no-op (returns the existing entry); the same name with other
/// bytes, or another file for an already published (version, kind, arch), is refused.
pub async fn add_target(
    repo_dir: &Path,
    online: &OnlineKeys,
    artefact: &Path,
    release: &AgentRelease,
    expiries: &Expiries,
) -> Result<Published, RepoError> {
    let name = artefact_name(artefact)?;
    let _lock = lock(repo_dir).await?;
    let repo = load(repo_dir).await?;
    let (length, sha256) = {
        let artefact = artefact.to_path_buf();
        tokio::task::spawn_blocking(move || hash_file(&artefact))
            .await
            .map_err(|e| RepoError::Io {
                what: "hashing task failed for",
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })??
    };
    let mut target = Target {
        length,
        hashes: Hashes {
            sha256: Decoded::from(sha256),
            _extra: HashMap::new(),
        },
        custom: HashMap::new(),
        _extra: HashMap::new(),
    };
    target
        .custom
        .insert("version".into(), serde_json::Value::String(release.version.to_string()));
    target
        .custom
        .insert("kind".into(), serde_json::Value::String(release.kind.as_str().into()));
    target
        .custom
        .insert("arch".into(), serde_json::Value::String(release.arch.clone()));
    let sha = hex::encode(&*target.hashes.sha256);
    let target_name = TargetName::new(name.clone()).map_err(tuf("bad target name"))?;
    let stored_at = repo_dir.join("targets").join(format!("{sha}.{name}"));

    if let Some(existing) = repo.targets().signed.targets.get(&target_name) {
        let existing_sha = hex::encode(&*existing.hashes.sha256);
        if existing_sha != sha {
            return Err(RepoError::ArtefactChanged {
                name,
                existing: existing_sha,
                new: sha,
            });
        }
        let info = ReleaseInfo::from_target(&name, existing)
            .filter(|info| info.release == *release)
            .ok_or_else(|| RepoError::ReleaseMismatch { name: name.clone() })?;
        return Ok(Published {
            release: info,
            stored_at,
            versions: MetadataVersions::of(&repo),
        });
    }
    for (other, t) in &repo.targets().signed.targets {
        if let Some(info) = ReleaseInfo::from_target(other.raw(), t)
            && info.release == *release
        {
            return Err(RepoError::DuplicateRelease {
                version: release.version.clone(),
                kind: release.kind,
                arch: release.arch.clone(),
                existing: other.raw().to_string(),
            });
        }
    }

    store_artefact(artefact, &stored_at, &target)?;
    let versions = republish(repo_dir, &repo, online, expiries, Some((target_name, target.clone()))).await?;
    let release_info = ReleaseInfo::from_target(&name, &target).ok_or_else(|| RepoError::BadArtefactName {
        name: name.clone(),
        reason: "its release metadata does not round-trip",
    })?;
    tracing::info!(target = %name, sha256 = %sha, version = %release.version, kind = %release.kind,
        arch = %release.arch, targets_version = versions.targets, "release published");
    Ok(Published {
        release: release_info,
        stored_at,
        versions,
    })
}

/// Re-signs `timestamp.json` (version + 1, expiry `expiries.timestamp` from now) so clients keep accepting the
/// repository: run it daily. Snapshot and targets are re-signed too (all three versions bumped) when either
/// is past half of its lifetime (`expiries.snapshot` / `expiries.targets`), so they never expire either.
/// Only the online keys are needed; root expiry is reported, not renewed.
pub async fn refresh_timestamp(
    repo_dir: &Path,
    online: &OnlineKeys,
    expiries: &Expiries,
) -> Result<Refreshed, RepoError> {
    let _lock = lock(repo_dir).await?;
    let repo = load(repo_dir).await?;
    let now = jiff::Timestamp::now();
    let half_gone = |expires: jiff::Timestamp, lifetime: Duration| {
        let left = expires.as_second().saturating_sub(now.as_second());
        left < i64::try_from(lifetime.as_secs() / 2).unwrap_or(i64::MAX)
    };
    let full = half_gone(repo.targets().signed.expires, expiries.targets)
        || half_gone(repo.snapshot().signed.expires, expiries.snapshot);
    let root_expires = repo.root().signed.expires;
    if half_gone(root_expires, expiries.root) {
        tracing::warn!(%root_expires, "release root metadata expires soon: renew it with the offline root key");
    }
    if full {
        let versions = republish(repo_dir, &repo, online, expiries, None).await?;
        tracing::info!(?versions, "release metadata re-signed (targets, snapshot, timestamp)");
        return Ok(Refreshed {
            renewed: vec![KeyRole::Targets, KeyRole::Snapshot, KeyRole::Timestamp],
            versions,
            root_expires,
        });
    }
    let mut timestamp = repo.timestamp().signed.clone();
    timestamp.version = bump(timestamp.version, KeyRole::Timestamp)?;
    timestamp.expires = expires_in("timestamp", expiries.timestamp)?;
    let holder = KeyHolder::Root(repo.root().signed.clone());
    let rng = SystemRandom::new();
    let signed = SignedRole::new(timestamp, &holder, &[FileKeySource::boxed(&online.timestamp)], &rng)
        .await
        .map_err(tuf(
            "cannot sign the timestamp (is the timestamp key the one listed in root.json?)",
        ))?;
    let path = repo_dir.join("metadata").join("timestamp.json");
    fsio::write_atomic(&path, signed.buffer(), PUBLIC_FILE).map_err(io("cannot write", &path))?;
    let mut versions = MetadataVersions::of(&repo);
    versions.timestamp = signed.signed().signed.version.get();
    tracing::debug!(timestamp_version = versions.timestamp, "release timestamp re-signed");
    Ok(Refreshed {
        renewed: vec![KeyRole::Timestamp],
        versions,
        root_expires,
    })
}

/// Replaces the key of an online `role` (targets, snapshot or timestamp) with the key now at
/// `online.path(role)`: writes root version N+1 (expiry `expiries.root` from now) signed by `root_key`, then
/// re-signs targets, snapshot and timestamp with the online keys. Clients follow the root chain
/// (`N+1.root.json`) and stop trusting the old key. Generate the new key first (`keys::generate_key`).
pub async fn rotate(
    repo_dir: &Path,
    role: KeyRole,
    root_key: &Path,
    online: &OnlineKeys,
    expiries: &Expiries,
) -> Result<Rotated, RepoError> {
    let new_key_path = online.path(role).ok_or(RepoError::RotateRootWithRotate)?;
    let _lock = lock(repo_dir).await?;
    let repo = load(repo_dir).await?;
    let old_root = repo.root().signed.clone();
    check_is_role_key(&old_root, KeyRole::Root, root_key)?;
    let (new_id, new_key) = keys::tuf_key(new_key_path)?;
    let mut root = old_root.clone();
    let old_ids = replace_role_key(&mut root, role, &new_id, new_key, new_key_path)?;
    root.version = bump(root.version, KeyRole::Root)?;
    root.expires = expires_in("root", expiries.root)?;
    let signed = sign_root(root, Some(&old_root), &[FileKeySource::boxed(root_key)]).await?;
    let meta = repo_dir.join("metadata");
    let root_json = write_root(&meta, &signed)?;
    let versions = republish(repo_dir, &repo, online, expiries, None).await?;
    tracing::info!(%role, new_key_id = %new_id, root_version = versions.root, "release signing key rotated");
    Ok(Rotated {
        role,
        old_key_ids: old_ids,
        new_key_id: new_id,
        root_json,
        versions,
    })
}

/// Replaces the root key: root version N+1 lists `new_root_key` and is signed by both the old and the new root
/// key, as TUF requires for a client to accept it from version N. Also renews root's expiry; passing the same
/// file twice is refused (re-sign with [`renew_root`] instead).
pub async fn rotate_root(
    repo_dir: &Path,
    old_root_key: &Path,
    new_root_key: &Path,
    online: &OnlineKeys,
    expiries: &Expiries,
) -> Result<Rotated, RepoError> {
    let _lock = lock(repo_dir).await?;
    let repo = load(repo_dir).await?;
    let old_root = repo.root().signed.clone();
    check_is_role_key(&old_root, KeyRole::Root, old_root_key)?;
    let (new_id, new_key) = keys::tuf_key(new_root_key)?;
    let mut root = old_root.clone();
    let old_ids = replace_role_key(&mut root, KeyRole::Root, &new_id, new_key, new_root_key)?;
    root.version = bump(root.version, KeyRole::Root)?;
    root.expires = expires_in("root", expiries.root)?;
    let signed = sign_root(
        root,
        Some(&old_root),
        &[FileKeySource::boxed(new_root_key), FileKeySource::boxed(old_root_key)],
    )
    .await?;
    let root_json = write_root(&repo_dir.join("metadata"), &signed)?;
    let versions = republish(repo_dir, &repo, online, expiries, None).await?;
    tracing::info!(new_key_id = %new_id, root_version = versions.root, "release root key rotated");
    Ok(Rotated {
        role: KeyRole::Root,
        old_key_ids: old_ids,
        new_key_id: new_id,
        root_json,
        versions,
    })
}

/// Re-signs root with the same keys, version N+1 and a fresh expiry (`expiries.root`), e.g. yearly.
pub async fn renew_root(
    repo_dir: &Path,
    root_key: &Path,
    online: &OnlineKeys,
    expiries: &Expiries,
) -> Result<MetadataVersions, RepoError> {
    let _lock = lock(repo_dir).await?;
    let repo = load(repo_dir).await?;
    let old_root = repo.root().signed.clone();
    check_is_role_key(&old_root, KeyRole::Root, root_key)?;
    let mut root = old_root.clone();
    root.version = bump(root.version, KeyRole::Root)?;
    root.expires = expires_in("root", expiries.root)?;
    let signed = sign_root(root, Some(&old_root), &[FileKeySource::boxed(root_key)]).await?;
    write_root(&repo_dir.join("metadata"), &signed)?;
    republish(repo_dir, &repo, online, expiries, None).await
}

/// The releases a repository lists and its metadata versions (verified, expiry not enforced).
pub async fn list(repo_dir: &Path) -> Result<(Vec<ReleaseInfo>, MetadataVersions), RepoError> {
    let repo = load(repo_dir).await?;
    Ok((crate::client::releases_of(&repo), MetadataVersions::of(&repo)))
}

// ---------------------------------------------------------------------------------------------------------

/// Loads and verifies the repository at `repo_dir` from its newest root, without enforcing expiry.
async fn load(repo_dir: &Path) -> Result<tough::Repository, RepoError> {
    let meta = repo_dir.join("metadata");
    let root_path = meta.join("root.json");
    let root = match std::fs::read(&root_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RepoError::NotARepository {
                path: repo_dir.to_path_buf(),
            });
        }
        Err(e) => return Err(io("cannot read", &root_path)(e)),
    };
    let meta_url = dir_url(&meta)?;
    let targets_url = dir_url(&repo_dir.join("targets"))?;
    RepositoryLoader::new(&root, meta_url, targets_url)
        .transport(FilesystemTransport)
        .expiration_enforcement(ExpirationEnforcement::Unsafe)
        .load()
        .await
        .map_err(tuf("the repository's current metadata does not verify"))
}

fn dir_url(dir: &Path) -> Result<Url, RepoError> {
    let abs = std::fs::canonicalize(dir).map_err(io("cannot resolve", dir))?;
    Url::from_directory_path(&abs).map_err(|()| RepoError::Io {
        what: "cannot turn into a file URL",
        path: abs.clone(),
        source: std::io::Error::other("not an absolute path"),
    })
}

/// Holds `<repo>/.lock` exclusively until dropped.
async fn lock(repo_dir: &Path) -> Result<std::fs::File, RepoError> {
    let path = repo_dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("cannot open the lock file", &path))?;
    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
        .await
        .map_err(|e| RepoError::Io {
            what: "lock task failed",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?
        .map_err(io("cannot lock", &repo_dir.join(".lock")))
}

/// Re-signs targets (plus `new_target`), snapshot and timestamp from the current `repo` and the newest root on
/// disk, with every version bumped, and installs them.
async fn republish(
    repo_dir: &Path,
    repo: &tough::Repository,
    online: &OnlineKeys,
    expiries: &Expiries,
    new_target: Option<(TargetName, Target)>,
) -> Result<MetadataVersions, RepoError> {
    let root_path = repo_dir.join("metadata").join("root.json");
    let mut editor = RepositoryEditor::new(&root_path)
        .await
        .map_err(tuf("cannot read root.json"))?;
    editor
        .targets(repo.targets().clone())
        .map_err(tuf("cannot edit targets"))?;
    if let Some((name, target)) = new_target {
        editor.add_target(name, target).map_err(tuf("cannot add the target"))?;
    }
    let targets_version = bump(repo.targets().signed.version, KeyRole::Targets)?;
    let snapshot_version = bump(repo.snapshot().signed.version, KeyRole::Snapshot)?;
    editor
        .targets_version(targets_version)
        .map_err(tuf("cannot set the targets version"))?;
    editor
        .targets_expires(expires_in("targets", expiries.targets)?)
        .map_err(tuf("cannot set the targets expiry"))?;
    editor
        .snapshot_version(snapshot_version)
        .snapshot_expires(expires_in("snapshot", expiries.snapshot)?)
        .timestamp_version(bump(repo.timestamp().signed.version, KeyRole::Timestamp)?)
        .timestamp_expires(expires_in("timestamp", expiries.timestamp)?);
    let signed = editor.sign(&online.sources()).await.map_err(tuf(
        "cannot sign targets/snapshot/timestamp (are the online keys the ones listed in root.json?)",
    ))?;
    install_metadata(repo_dir, &signed, targets_version.get(), snapshot_version.get()).await?;
    let repo = load(repo_dir).await?;
    Ok(MetadataVersions::of(&repo))
}

/// Writes a signed repository to a staging directory and renames targets, snapshot, then timestamp into
/// `metadata/` (root is written separately by [`write_root`]).
async fn install_metadata(
    repo_dir: &Path,
    signed: &tough::editor::signed::SignedRepository,
    targets_version: u64,
    snapshot_version: u64,
) -> Result<(), RepoError> {
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(repo_dir)
        .map_err(io("cannot create a staging directory in", repo_dir))?;
    signed
        .write(staging.path())
        .await
        .map_err(tuf("cannot write the signed metadata"))?;
    let meta = repo_dir.join("metadata");
    for name in [
        format!("{targets_version}.targets.json"),
        format!("{snapshot_version}.snapshot.json"),
        "timestamp.json".to_string(),
    ] {
        let from = staging.path().join(&name);
        let to = meta.join(&name);
        let file = std::fs::File::open(&from).map_err(io("cannot open staged", &from))?;
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(PUBLIC_FILE))
            .map_err(io("cannot chmod", &from))?;
        file.sync_all().map_err(io("cannot sync", &from))?;
        std::fs::rename(&from, &to).map_err(io("cannot install", &to))?;
    }
    fsio::sync_dir(&meta).map_err(io("cannot sync", &meta))
}

/// Signs `root` with `keys` and checks it verifies against itself and, when given, against `previous`.
async fn sign_root(
    root: Root,
    previous: Option<&Root>,
    keys: &[Box<dyn KeySource>],
) -> Result<SignedRole<Root>, RepoError> {
    let rng = SystemRandom::new();
    let mut signed = SignedRole::new(root.clone(), &KeyHolder::Root(root.clone()), keys, &rng)
        .await
        .map_err(tuf("cannot sign root.json"))?;
    if let Some(previous) = previous {
        // The signature(s) the previous root's root role requires, over the new content.
        let old = SignedRole::new(root.clone(), &KeyHolder::Root(previous.clone()), keys, &rng)
            .await
            .map_err(tuf("cannot sign root.json with the previous root key"))?;
        signed = signed
            .add_old_signatures(old.signed().signatures.clone())
            .map_err(tuf("cannot combine root signatures"))?;
        previous
            .verify_role(signed.signed())
            .map_err(|e| RepoError::RootCheck {
                reason: format!("not signed by the previous root's key: {e}"),
            })?;
    }
    root.verify_role(signed.signed()).map_err(|e| RepoError::RootCheck {
        reason: format!("not signed by its own root key: {e}"),
    })?;
    Ok(signed)
}

/// Writes `N.root.json` then `root.json` (the newest, read by the publisher).
fn write_root(meta: &Path, signed: &SignedRole<Root>) -> Result<PathBuf, RepoError> {
    let versioned = meta.join(signed.signed().signed.filename(true));
    fsio::write_atomic(&versioned, signed.buffer(), PUBLIC_FILE).map_err(io("cannot write", &versioned))?;
    let latest = meta.join("root.json");
    fsio::write_atomic(&latest, signed.buffer(), PUBLIC_FILE).map_err(io("cannot write", &latest))?;
    Ok(versioned)
}

fn check_is_role_key(root: &Root, role: KeyRole, path: &Path) -> Result<(), RepoError> {
    let (id, _) = keys::tuf_key(path)?;
    let listed = root
        .roles
        .get(&role.role_type())
        .is_some_and(|r| r.keyids.iter().any(|k| hex::encode(&**k) == id));
    if listed {
        Ok(())
    } else {
        Err(RepoError::WrongKey {
            role,
            path: path.to_path_buf(),
            key_id: id,
        })
    }
}

/// Makes `new_id` the only key of `role`; drops keys no role uses any more. Returns the replaced key ids.
fn replace_role_key(
    root: &mut Root,
    role: KeyRole,
    new_id: &str,
    new_key: tough::schema::key::Key,
    new_path: &Path,
) -> Result<Vec<String>, RepoError> {
    let id = decode_id(new_id)?;
    for (other_type, keys) in &root.roles {
        if keys.keyids.contains(&id) {
            let other = KeyRole::ALL
                .into_iter()
                .find(|r| r.role_type() == *other_type)
                .unwrap_or(KeyRole::Root);
            if other == role {
                return Err(RepoError::SameKey {
                    role,
                    path: new_path.to_path_buf(),
                });
            }
            return Err(RepoError::SharedKey {
                key_id: new_id.to_string(),
                first: other,
                second: role,
            });
        }
    }
    let entry = root.roles.entry(role.role_type()).or_insert_with(|| RoleKeys {
        keyids: Vec::new(),
        threshold: NonZeroU64::MIN,
        _extra: HashMap::new(),
    });
    let old: Vec<String> = entry.keyids.iter().map(|k| hex::encode(&**k)).collect();
    entry.keyids = vec![id.clone()];
    entry.threshold = NonZeroU64::MIN;
    root.keys.insert(id, new_key);
    let used: Vec<Decoded<Hex>> = root.roles.values().flat_map(|r| r.keyids.iter().cloned()).collect();
    root.keys.retain(|k, _| used.contains(k));
    Ok(old)
}

fn decode_id(id: &str) -> Result<Decoded<Hex>, RepoError> {
    hex::decode(id).map(Decoded::from).map_err(|e| RepoError::RootCheck {
        reason: format!("bad key id {id}: {e}"),
    })
}

fn bump(v: NonZeroU64, role: KeyRole) -> Result<NonZeroU64, RepoError> {
    v.checked_add(1).ok_or(RepoError::VersionOverflow { role })
}

/// Now plus `d`, in whole seconds.
fn expires_in(what: &'static str, d: Duration) -> Result<jiff::Timestamp, RepoError> {
    let secs = i64::try_from(d.as_secs()).map_err(|e| RepoError::Expiry {
        what,
        reason: e.to_string(),
    })?;
    let now = jiff::Timestamp::now().as_second();
    let at = now.checked_add(secs).ok_or(RepoError::Expiry {
        what,
        reason: "overflow".into(),
    })?;
    jiff::Timestamp::from_second(at).map_err(|e| RepoError::Expiry {
        what,
        reason: e.to_string(),
    })
}

/// The artefact's file name, checked to be a plain servable name.
fn artefact_name(artefact: &Path) -> Result<String, RepoError> {
    let name = artefact
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| RepoError::BadArtefactName {
            name: artefact.display().to_string(),
            reason: "no UTF-8 file name",
        })?
        .to_string();
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME {
        Some("longer than 180 bytes")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)) {
        Some("characters outside [A-Za-z0-9._+-]")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RepoError::BadArtefactName { name, reason }),
        None => Ok(name),
    }
}

/// Copies the artefact to `stored_at` (temp file + rename) unless it is already there, then checks the stored
/// copy has the digest that goes into the metadata (the source could change while being read twice).
fn store_artefact(artefact: &Path, stored_at: &Path, target: &Target) -> Result<(), RepoError> {
    let dir = fsio::parent_of(stored_at);
    if std::fs::symlink_metadata(stored_at).is_err() {
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(dir)
            .map_err(io("cannot create a temporary file in", dir))?;
        let mut src = std::fs::File::open(artefact).map_err(io("cannot open", artefact))?;
        std::io::copy(&mut src, tmp.as_file_mut()).map_err(io("cannot copy", artefact))?;
        tmp.as_file()
            .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(PUBLIC_FILE))
            .map_err(io("cannot chmod", stored_at))?;
        tmp.as_file().sync_all().map_err(io("cannot sync", stored_at))?;
        tmp.persist(stored_at).map_err(|e| RepoError::Io {
            what: "cannot store",
            path: stored_at.to_path_buf(),
            source: e.error,
        })?;
        fsio::sync_dir(dir).map_err(io("cannot sync", dir))?;
    }
    let (len, sha) = hash_file(stored_at)?;
    if len != target.length || sha != *target.hashes.sha256 {
        return Err(RepoError::ArtefactChanged {
            name: stored_at.display().to_string(),
            existing: hex::encode(&*target.hashes.sha256),
            new: hex::encode(sha),
        });
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, Vec<u8>), RepoError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io("cannot open", path))?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("cannot read", path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, ctx.finish().as_ref().to_vec()))
}
