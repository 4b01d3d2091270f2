//! The agent side: verify the release metadata from a pinned root, list releases, fetch one.
//!
//! Trust starts at the root metadata the agent pinned at install time and follows the repository's root chain
//! (`N+1.root.json`, each signed by the previous root's keys). `tough` implements the TUF client workflow:
//! signatures and thresholds, expiry of every role (freeze attacks), version checks against the metadata kept
//! in the datastore directory (rollback attacks, across restarts), snapshot/targets hashes and lengths
//! (mix-and-match), and length + SHA-256 of the artefact. This module adds:
//!
//! - the newest root seen is reused on the next start (the datastore's `root.json`, when it is newer than the
//!   pinned one), so a server hiding `N+1.root.json` cannot walk a restarted agent back to keys it already
//!   rotated away from. A changed pinned root (re-installed agent, new root of trust) resets the datastore.
//! - [`Releases::fetch`] streams the verified artefact to a temporary file beside the destination, fsyncs it
//!   and renames it into place only when the whole file verified; anything else leaves no file behind.
//! - [`check_upgrade`], the downgrade rule.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use semver::Version;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tough::schema::{Role as _, Root, Signed, Target};
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName, Transport};
use url::Url;

use crate::fsio;
use crate::repo::MetadataVersions;
use crate::{AgentRelease, ArtefactKind};

/// Datastore file recording which pinned root the datastore was built from.
const PINNED_MARK: &str = "pinned-root.sha256";
/// Files `tough` keeps in the datastore.
const TOUGH_FILES: [&str; 4] = ["root.json", "timestamp.json", "snapshot.json", "targets.json"];

/// Why verification refused the repository or an artefact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Some metadata is past its expiry (freeze attack, or a coordinator that stopped re-signing).
    Expired,
    /// A version older than one already seen (rollback attack).
    Rollback,
    /// Missing or invalid signatures: not signed by the keys the trusted root lists.
    BadSignature,
    /// Content does not match the signed hash, length or version (tampering or corruption).
    Integrity,
    /// The system clock is earlier than a time already seen.
    ClockWentBack,
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the pinned root metadata is not valid TUF root JSON ({reason}); reinstall the agent's trust root (root.json from the release repository)"
    )]
    PinnedRoot { reason: String },
    #[error("cannot use the release datastore {path}: {source}; it must be a writable directory private to the agent")]
    Datastore { path: PathBuf, source: std::io::Error },
    #[error(
        "release metadata refused: {source}. Nothing was installed. Stale or tampered metadata, or keys this agent does not trust: check the coordinator's release repository (its timestamp is re-signed daily)"
    )]
    Verify { source: Box<tough::error::Error> },
    #[error("target {name} is not in the signed release metadata")]
    UnknownTarget { name: String },
    #[error("artefact {name} refused or not downloaded: {source}. The partial download was discarded")]
    Fetch {
        name: String,
        source: Box<tough::error::Error>,
    },
    #[error("cannot write the artefact to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl ClientError {
    /// The kind of verification failure, if this error is one (as opposed to I/O or a missing target).
    pub fn refusal(&self) -> Option<Refusal> {
        let source: &(dyn std::error::Error + 'static) = match self {
            ClientError::Verify { source } | ClientError::Fetch { source, .. } => source.as_ref(),
            _ => return None,
        };
        let mut next = Some(source);
        while let Some(e) = next {
            if let Some(t) = e.downcast_ref::<tough::error::Error>()
                && let Some(r) = classify(t)
            {
                return Some(r);
            }
            next = e.source();
        }
        None
    }
}

fn classify(e: &tough::error::Error) -> Option<Refusal> {
    use tough::error::Error as E;
    Some(match e {
        E::ExpiredMetadata { .. } => Refusal::Expired,
        E::OlderMetadata { .. }
        | E::OlderSnapshotInTimestamp { .. }
        | E::SnapshotRoleRollback { .. }
        | E::SnapshotRoleMissing { .. } => Refusal::Rollback,
        E::VerifyMetadata { .. } | E::VerifyTrustedMetadata { .. } | E::VerifyRoleMetadata { .. } => {
            Refusal::BadSignature
        }
        E::HashMismatch { .. } | E::MaxSizeExceeded { .. } | E::VersionMismatch { .. } => Refusal::Integrity,
        E::SystemTimeSteppedBackward { .. } => Refusal::ClockWentBack,
        _ => return None,
    })
}

/// One artefact of a release, as the signed targets metadata lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReleaseInfo {
    #[serde(flatten)]
    pub release: AgentRelease,
    /// Hex SHA-256 of the artefact.
    pub sha256: String,
    /// Length in bytes.
    pub length: u64,
    /// The TUF target name (the artefact's file name when published).
    pub target: String,
}

impl ReleaseInfo {
    /// Reads the release metadata of a target; `None` if its custom metadata is missing or malformed.
    pub(crate) fn from_target(name: &str, target: &Target) -> Option<ReleaseInfo> {
        let field = |k: &str| target.custom.get(k).and_then(|v| v.as_str());
        let version = Version::parse(field("version")?).ok()?;
        let kind = field("kind")?.parse::<ArtefactKind>().ok()?;
        let arch = field("arch")?.to_string();
        Some(ReleaseInfo {
            release: AgentRelease { version, kind, arch },
            sha256: hex::encode(&*target.hashes.sha256),
            length: target.length,
            target: name.to_string(),
        })
    }
}

/// The releases a loaded repository lists, sorted by version, then kind, then arch.
pub(crate) fn releases_of(repo: &tough::Repository) -> Vec<ReleaseInfo> {
    let mut out: Vec<ReleaseInfo> = repo
        .targets()
        .signed
        .targets
        .iter()
        .filter_map(|(name, t)| {
            let info = ReleaseInfo::from_target(name.raw(), t);
            if info.is_none() {
                tracing::debug!(target = name.raw(), "target without agent release metadata ignored");
            }
            info
        })
        .collect();
    out.sort_by(|a, b| {
        a.release
            .version
            .cmp_precedence(&b.release.version)
            .then_with(|| a.release.version.cmp(&b.release.version))
            .then_with(|| a.release.kind.as_str().cmp(b.release.kind.as_str()))
            .then_with(|| a.release.arch.cmp(&b.release.arch))
    });
    out
}

/// A verified view of the release repository.
pub struct Releases {
    repo: tough::Repository,
}

impl std::fmt::Debug for Releases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releases")
            .field("versions", &self.versions())
            .field("expires", &self.expires())
            .finish()
    }
}

impl Releases {
    /// Loads and verifies the repository: root chain from `trusted_root` (the pinned `root.json` bytes), then
    /// timestamp, snapshot and targets from `metadata_base`, with expiry enforced. `datastore_dir` (created
    /// 0700) keeps the newest metadata seen, so rollbacks and freezes are refused across restarts.
    pub async fn load<T>(
        trusted_root: &[u8],
        transport: T,
        metadata_base: Url,
        targets_base: Url,
        datastore_dir: &Path,
    ) -> Result<Releases, ClientError>
    where
        T: Transport + Send + Sync + 'static,
    {
        let root = trusted_start(trusted_root, datastore_dir)?;
        let repo = RepositoryLoader::new(&root, metadata_base, targets_base)
            .transport(transport)
            .datastore(datastore_dir)
            .expiration_enforcement(ExpirationEnforcement::Safe)
            .load()
            .await
            .map_err(|source| ClientError::Verify {
                source: Box::new(source),
            })?;
        tracing::debug!(versions = ?MetadataVersions::of(&repo), "release metadata verified");
        Ok(Releases { repo })
    }

    /// Every artefact that carries release metadata, sorted by version (semver precedence), kind, arch.
    pub fn releases(&self) -> Vec<ReleaseInfo> {
        releases_of(&self.repo)
    }

    /// The artefact of exactly this release, if published.
    pub fn find(&self, version: &Version, kind: ArtefactKind, arch: &str) -> Option<ReleaseInfo> {
        self.releases()
            .into_iter()
            .find(|r| r.release.version == *version && r.release.kind == kind && r.release.arch == arch)
    }

    /// The highest published version for `kind` and `arch` (pre-releases included).
    pub fn latest(&self, kind: ArtefactKind, arch: &str) -> Option<ReleaseInfo> {
        self.releases()
            .into_iter()
            .rev()
            .find(|r| r.release.kind == kind && r.release.arch == arch)
    }

    /// The versions of the metadata now trusted.
    pub fn versions(&self) -> MetadataVersions {
        MetadataVersions::of(&self.repo)
    }

    /// When the earliest of the trusted metadata expires; a fetch after that is refused.
    pub fn expires(&self) -> jiff::Timestamp {
        [
            self.repo.root().signed.expires(),
            self.repo.timestamp().signed.expires(),
            self.repo.snapshot().signed.expires(),
            self.repo.targets().signed.expires(),
        ]
        .into_iter()
        .min()
        .unwrap_or(jiff::Timestamp::MIN)
    }

    /// Downloads target `name` to `dest`: streamed (never whole in memory) into a temporary file in `dest`'s
    /// directory, checked by `tough` against the signed length and SHA-256, fsynced, then renamed onto `dest`
    /// and the directory fsynced. On any failure the temporary file is removed and `dest` is untouched. The
    /// file is created with mode 0600; the installer sets the mode it needs.
    pub async fn fetch(&self, name: &str, dest: &Path) -> Result<ReleaseInfo, ClientError> {
        let target_name = TargetName::new(name).map_err(|_| ClientError::UnknownTarget { name: name.into() })?;
        let target = self
            .repo
            .targets()
            .signed
            .targets
            .get(&target_name)
            .ok_or_else(|| ClientError::UnknownTarget { name: name.into() })?;
        let info = ReleaseInfo::from_target(name, target).unwrap_or_else(|| ReleaseInfo {
            release: AgentRelease {
                version: Version::new(0, 0, 0),
                kind: ArtefactKind::Binary,
                arch: String::new(),
            },
            sha256: hex::encode(&*target.hashes.sha256),
            length: target.length,
            target: name.to_string(),
        });
        let mut stream = self
            .repo
            .read_target(&target_name)
            .await
            .map_err(|source| ClientError::Fetch {
                name: name.into(),
                source: Box::new(source),
            })?
            .ok_or_else(|| ClientError::UnknownTarget { name: name.into() })?;

        let dir = fsio::parent_of(dest);
        let write_err = |source| ClientError::Write {
            path: dest.to_path_buf(),
            source,
        };
        let tmp = tempfile::Builder::new()
            .prefix(".nimbus-release-")
            .tempfile_in(dir)
            .map_err(write_err)?;
        let (file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        while let Some(chunk) = stream.next().await {
            // `tmp_path` removes the partial file when dropped on any early return.
            let chunk = chunk.map_err(|source| ClientError::Fetch {
                name: name.into(),
                source: Box::new(source),
            })?;
            file.write_all(&chunk).await.map_err(write_err)?;
        }
        file.flush().await.map_err(write_err)?;
        file.sync_all().await.map_err(write_err)?;
        drop(file);
        tmp_path.persist(dest).map_err(|e| write_err(e.error))?;
        fsio::sync_dir(dir).map_err(write_err)?;
        tracing::info!(target = name, dest = %dest.display(), sha256 = %info.sha256, "release artefact verified and saved");
        Ok(info)
    }
}

/// The root to start from: the pinned one, or the datastore's newer one if the datastore was built from this
/// same pinned root. Creates the datastore and resets it when the pinned root changed.
fn trusted_start(pinned: &[u8], datastore: &Path) -> Result<Vec<u8>, ClientError> {
    let pinned_root: Signed<Root> =
        serde_json::from_slice(pinned).map_err(|e| ClientError::PinnedRoot { reason: e.to_string() })?;
    let ds_err = |source| ClientError::Datastore {
        path: datastore.to_path_buf(),
        source,
    };
    fsio::create_dirs(datastore, 0o700).map_err(ds_err)?;
    let digest = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pinned));
    let mark = datastore.join(PINNED_MARK);
    let marked = std::fs::read_to_string(&mark).ok();
    if marked.as_deref().map(str::trim) != Some(digest.as_str()) {
        if marked.is_some() {
            tracing::warn!(datastore = %datastore.display(), "pinned release root changed: forgetting the metadata seen before");
        }
        for f in TOUGH_FILES {
            match std::fs::remove_file(datastore.join(f)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ds_err(e)),
                _ => {}
            }
        }
        fsio::write_atomic(&mark, format!("{digest}\n").as_bytes(), 0o600).map_err(ds_err)?;
        return Ok(pinned.to_vec());
    }
    let seen = match std::fs::read(datastore.join("root.json")) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(pinned.to_vec()),
        Err(e) => return Err(ds_err(e)),
    };
    match serde_json::from_slice::<Signed<Root>>(&seen) {
        Ok(r) if r.signed.version > pinned_root.signed.version => {
            tracing::debug!(
                version = r.signed.version.get(),
                "starting from the newest release root seen"
            );
            Ok(seen)
        }
        Ok(_) => Ok(pinned.to_vec()),
        Err(e) => {
            tracing::warn!(error = %e, "the datastore's root.json is unreadable: starting from the pinned root");
            Ok(pinned.to_vec())
        }
    }
}

/// What installing `candidate` over `current` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeStep {
    /// `candidate` is newer: install it.
    Upgrade,
    /// `candidate` is exactly the running version: nothing to do (not an error, so a repeated rollout step is
    /// idempotent).
    AlreadyCurrent,
    /// `candidate` is older (or differs only in build metadata) and the caller allowed it: install it.
    Downgrade,
}

/// Installing `candidate` over `current` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refusing to install agent {candidate} over {current}: {reason}; a rollout must say --allow-downgrade to go back"
)]
pub struct DowngradeRefused {
    pub current: Version,
    pub candidate: Version,
    pub reason: &'static str,
}

/// The downgrade rule, by semver precedence: newer → [`UpgradeStep::Upgrade`]; identical →
/// [`UpgradeStep::AlreadyCurrent`] (a no-op, never an error); older → refused unless `allow_downgrade`, then
/// [`UpgradeStep::Downgrade`]. Versions of equal precedence that differ only in build metadata
/// (`1.2.0+a` vs `1.2.0+b`) are different builds with no order: treated like a downgrade.
pub fn check_upgrade(
    current: &Version,
    candidate: &Version,
    allow_downgrade: bool,
) -> Result<UpgradeStep, DowngradeRefused> {
    let refuse = |reason| DowngradeRefused {
        current: current.clone(),
        candidate: candidate.clone(),
        reason,
    };
    match candidate.cmp_precedence(current) {
        Ordering::Greater => Ok(UpgradeStep::Upgrade),
        Ordering::Equal if candidate == current => Ok(UpgradeStep::AlreadyCurrent),
        Ordering::Equal if allow_downgrade => Ok(UpgradeStep::Downgrade),
        Ordering::Equal => Err(refuse("same version, other build metadata")),
        Ordering::Less if allow_downgrade => Ok(UpgradeStep::Downgrade),
        Ordering::Less => Err(refuse("it is older")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn downgrades_are_refused_unless_allowed_and_reinstalls_are_no_ops() {
        assert_eq!(check_upgrade(&v("1.2.0"), &v("1.3.0"), false), Ok(UpgradeStep::Upgrade));
        assert_eq!(
            check_upgrade(&v("1.3.0-rc.1"), &v("1.3.0"), false),
            Ok(UpgradeStep::Upgrade)
        );
        assert_eq!(
            check_upgrade(&v("1.3.0"), &v("1.3.0"), false),
            Ok(UpgradeStep::AlreadyCurrent)
        );
        assert_eq!(
            check_upgrade(&v("1.3.0"), &v("1.3.0"), true),
            Ok(UpgradeStep::AlreadyCurrent)
        );
        let err = check_upgrade(&v("1.3.0"), &v("1.2.9"), false).unwrap_err();
        assert_eq!(err.reason, "it is older");
        assert!(err.to_string().contains("--allow-downgrade"), "{err}");
        assert_eq!(
            check_upgrade(&v("1.3.0"), &v("1.2.9"), true),
            Ok(UpgradeStep::Downgrade)
        );
        // A pre-release is older than its release.
        assert!(check_upgrade(&v("1.3.0"), &v("1.3.0-rc.2"), false).is_err());
        // Build metadata has no precedence.
        assert!(check_upgrade(&v("1.3.0+a"), &v("1.3.0+b"), false).is_err());
        assert_eq!(
            check_upgrade(&v("1.3.0+a"), &v("1.3.0+b"), true),
            Ok(UpgradeStep::Downgrade)
        );
    }
}
