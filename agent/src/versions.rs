//! Where agent versions live on the host, and the crash-safe steps that switch between them.
//!
//! Under the state directory (default `/var/lib/nimbus-agent`):
//!
//! ```text
//! versions/<version>/nimbus-agent   a staged binary (0755); <version> is a validated semver string
//! versions/<version>.partial/       a stage (or a removal) in progress; `cleanup` removes it
//! current -> versions/<version>     what the launcher starts; absent: the package's /usr/bin/nimbus-agent
//! current.new                       a link switch in progress; `cleanup` removes it
//! upgrade.json                      {current, previous, pending, failed}, written atomically
//! upgrade.lock                      serialises writers (the launcher and the agent)
//! ```
//!
//! The package-owned binary is never written: a version is copied in, never installed over it.
//!
//! # Crash safety
//! Every write is a new file or directory made durable (fsync) and then renamed into place, so a crash leaves
//! either the old or the new state of each file. Across files, `upgrade.json` is written first, as the intent,
//! and the `current` link follows it; [`reconcile`] (the launcher calls it before every start) finishes a switch
//! a crash interrupted. Without it, [`resolve_binary`] still picks a sound binary from any intermediate state:
//! the link's version unless `upgrade.json` records it as rolled back, else the recorded current version, else
//! the previous one, else the package binary. The unit tests stop each operation after every step and check.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The default state directory (the unit's `StateDirectory=nimbus-agent`). Env: `NIMBUS_STATE_DIR`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nimbus-agent";
/// Directory of staged versions, inside the state directory.
pub const VERSIONS_DIR: &str = "versions";
/// The binary's file name inside `versions/<version>/`.
pub const BINARY_NAME: &str = "nimbus-agent";
/// The link naming the version the launcher starts.
pub const CURRENT_LINK: &str = "current";
/// The upgrade record.
pub const UPGRADE_FILE: &str = "upgrade.json";
/// Staged versions `cleanup` keeps (the newest by semver), besides the current, previous and pending ones.
pub const KEEP_VERSIONS: usize = 3;
/// Failed versions remembered in `upgrade.json` (the oldest are dropped).
pub const MAX_FAILED_RECORDS: usize = 16;

const CURRENT_NEW: &str = "current.new";
const UPGRADE_TMP: &str = "upgrade.json.tmp";
const UPGRADE_CORRUPT: &str = "upgrade.json.corrupt";
const LOCK_FILE: &str = "upgrade.lock";
const PARTIAL_SUFFIX: &str = ".partial";
const PACKAGE: &str = "package";
/// Longest accepted version string (it becomes a path component).
const MAX_VERSION_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    #[error("invalid agent version {version:?}: {reason}; versions are semver strings such as 1.4.2 or 1.5.0-rc.1")]
    InvalidVersion { version: String, reason: String },
    #[error("{}: {source}; check that the state directory exists, is writable by root and has free space", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid: {detail}; move it aside and the launcher rebuilds it from the `current` link", .path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("version {version} is not staged (no executable {}); stage it before activating", .path.display())]
    NotStaged { version: String, path: PathBuf },
    #[error(
        "version {version} is already staged with another SHA-256 ({staged}; the new binary has {new}) and is in use; \
         publish the new build under a new version"
    )]
    Conflict {
        version: String,
        staged: String,
        new: String,
    },
    #[error(
        "version {pending} is still pending (not yet confirmed healthy); wait until it is confirmed or rolled back \
         before activating {version}"
    )]
    StillPending { pending: String, version: String },
    #[error("no version {0} is pending; nothing to count, confirm or roll back")]
    NotPending(String),
    /// Only the crash-simulating tests produce this: an operation stopped after the given step.
    #[doc(hidden)]
    #[error("stopped after step {0} (simulated crash)")]
    SimulatedCrash(usize),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VersionsError + '_ {
    move |source| VersionsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A validated agent version: a semver string, safe as a path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentVersion(String);

impl AgentVersion {
    /// Accepts canonical semver only (`1.2.3`, `1.2.3-rc.1`, `1.2.3+build.5`): no `v` prefix, no spaces, at
    /// most 64 characters. Semver's character set (alphanumerics, `.`, `-`, `+`) cannot form `/` or `..`.
    pub fn parse(s: &str) -> Result<AgentVersion, VersionsError> {
        let bad = |reason: &str| VersionsError::InvalidVersion {
            version: s.chars().take(MAX_VERSION_LEN + 8).collect(),
            reason: reason.into(),
        };
        if s.len() > MAX_VERSION_LEN {
            return Err(bad("longer than 64 characters"));
        }
        let v = semver::Version::parse(s).map_err(|e| bad(&e.to_string()))?;
        if v.to_string() != s {
            return Err(bad("not in canonical form"));
        }
        Ok(AgentVersion(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn semver(&self) -> Option<semver::Version> {
        semver::Version::parse(&self.0).ok()
    }
}

impl TryFrom<String> for AgentVersion {
    type Error = VersionsError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        AgentVersion::parse(&s)
    }
}

impl From<AgentVersion> for String {
    fn from(v: AgentVersion) -> String {
        v.0
    }
}

impl std::fmt::Display for AgentVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What runs: a staged version, or the package's own binary. Written as the version or `"package"`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Slot {
    #[default]
    Package,
    Version(AgentVersion),
}

impl Slot {
    pub fn version(&self) -> Option<&AgentVersion> {
        match self {
            Slot::Package => None,
            Slot::Version(v) => Some(v),
        }
    }

    fn is(&self, v: &AgentVersion) -> bool {
        self.version() == Some(v)
    }
}

impl TryFrom<String> for Slot {
    type Error = VersionsError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s == PACKAGE {
            Ok(Slot::Package)
        } else {
            AgentVersion::parse(&s).map(Slot::Version)
        }
    }
}

impl From<Slot> for String {
    fn from(s: Slot) -> String {
        match s {
            Slot::Package => PACKAGE.into(),
            Slot::Version(v) => v.0,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Package => f.write_str(PACKAGE),
            Slot::Version(v) => v.fmt(f),
        }
    }
}

/// An activated version not yet confirmed healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub version: AgentVersion,
    /// Starts begun (counted before each start, so a launcher killed mid-start still counts it).
    pub attempts: u32,
    /// Why the last start failed, e.g. "exited 1 before ready".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A version rolled back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub version: AgentVersion,
    pub reason: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// `upgrade.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct UpgradeState {
    /// What the `current` link should name (the link follows this record).
    pub current: Slot,
    /// What ran before the last activation; the rollback target.
    pub previous: Option<Slot>,
    pub pending: Option<Pending>,
    /// Rolled-back versions, oldest first (at most [`MAX_FAILED_RECORDS`]).
    pub failed: Vec<Failed>,
}

impl UpgradeState {
    fn has_failed(&self, v: &AgentVersion) -> bool {
        self.failed.iter().any(|f| &f.version == v)
    }

    fn pending_is(&self, v: &AgentVersion) -> bool {
        self.pending.as_ref().is_some_and(|p| &p.version == v)
    }
}

/// A staged version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub version: AgentVersion,
    pub binary: PathBuf,
    /// Lower-case hex SHA-256 of the staged binary.
    pub sha256: String,
}

/// Counts durable steps; the crash tests stop an operation after a given one.
struct Steps {
    stop_after: Option<usize>,
    done: usize,
}

impl Steps {
    fn all() -> Steps {
        Steps {
            stop_after: None,
            done: 0,
        }
    }

    fn step(&mut self) -> Result<(), VersionsError> {
        self.done += 1;
        if self.stop_after == Some(self.done) {
            return Err(VersionsError::SimulatedCrash(self.done));
        }
        Ok(())
    }
}

/// `versions/<version>/nimbus-agent`.
pub fn binary_path(state_dir: &Path, version: &AgentVersion) -> PathBuf {
    state_dir.join(VERSIONS_DIR).join(version.as_str()).join(BINARY_NAME)
}

/// A regular, executable file (not a link).
fn sound_file(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file() && m.mode() & 0o111 != 0)
}

fn staged(state_dir: &Path, v: &AgentVersion) -> bool {
    sound_file(&binary_path(state_dir, v))
}

fn sync_dir(dir: &Path) -> Result<(), VersionsError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

fn mkdir(p: &Path, mode: u32) -> Result<(), VersionsError> {
    match fs::DirBuilder::new().recursive(true).mode(mode).create(p) {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err(p)(e)),
    }
}

fn remove_file_if_present(p: &Path) -> Result<bool, VersionsError> {
    match fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(p)(e)),
    }
}

fn remove_dir_if_present(p: &Path) -> Result<bool, VersionsError> {
    match fs::remove_dir_all(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(p)(e)),
    }
}

/// The version the `current` link names, if it names a valid version directory (sound or not).
pub fn linked_version(state_dir: &Path) -> Option<AgentVersion> {
    let target = fs::read_link(state_dir.join(CURRENT_LINK)).ok()?;
    let name = target.file_name()?.to_str()?;
    AgentVersion::parse(name).ok()
}

/// The upgrade record: the default (package binary, nothing pending) when there is none.
pub fn load(state_dir: &Path) -> Result<UpgradeState, VersionsError> {
    let p = state_dir.join(UPGRADE_FILE);
    let body = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UpgradeState::default()),
        Err(e) => return Err(io_err(&p)(e)),
    };
    serde_json::from_slice(&body).map_err(|e| VersionsError::Corrupt {
        path: p,
        detail: e.to_string(),
    })
}

/// Writes `upgrade.json`: temp file, fsync, rename, fsync of the directory.
fn save(state_dir: &Path, st: &UpgradeState) -> Result<(), VersionsError> {
    let tmp = state_dir.join(UPGRADE_TMP);
    let dst = state_dir.join(UPGRADE_FILE);
    let mut body = serde_json::to_vec_pretty(st).map_err(|e| VersionsError::Corrupt {
        path: dst.clone(),
        detail: format!("cannot encode: {e}"),
    })?;
    body.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(&body).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    sync_dir(state_dir)
}

/// Exclusive lock on `upgrade.lock` for one read-modify-write; released on drop.
struct Lock {
    _file: File,
}

fn lock(state_dir: &Path) -> Result<Lock, VersionsError> {
    mkdir(state_dir, 0o700)?;
    let p = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&p)
        .map_err(io_err(&p))?;
    file.lock().map_err(io_err(&p))?;
    Ok(Lock { _file: file })
}

/// Points `current` at `target` (a version) or removes it (the package binary): `current.new` + rename.
fn switch_link(state_dir: &Path, target: &Slot, steps: &mut Steps) -> Result<(), VersionsError> {
    let link = state_dir.join(CURRENT_LINK);
    match target {
        Slot::Version(v) => {
            let new = state_dir.join(CURRENT_NEW);
            remove_file_if_present(&new)?;
            std::os::unix::fs::symlink(Path::new(VERSIONS_DIR).join(v.as_str()), &new).map_err(io_err(&new))?;
            steps.step()?;
            fs::rename(&new, &link).map_err(io_err(&link))?;
        }
        Slot::Package => {
            remove_file_if_present(&link)?;
        }
    }
    steps.step()?;
    sync_dir(state_dir)?;
    steps.step()
}

/// Copies `src` into `dst` (created 0755) while hashing it; fsyncs the copy. Returns the hex SHA-256.
fn copy_hashed(src: &Path, dst: &Path) -> Result<String, VersionsError> {
    let mut from = File::open(src).map_err(io_err(src))?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(dst)
        .map_err(io_err(dst))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).map_err(io_err(src))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(io_err(dst))?;
    }
    // The umask may have cleared bits at creation.
    to.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(io_err(dst))?;
    to.sync_all().map_err(io_err(dst))?;
    Ok(hex::encode(hash.finalize()))
}

/// The hex SHA-256 of a file.
pub fn sha256_file(p: &Path) -> Result<String, VersionsError> {
    let mut f = File::open(p).map_err(io_err(p))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err(p))?;
        if n == 0 {
            return Ok(hex::encode(hash.finalize()));
        }
        hash.update(&buf[..n]);
    }
}

/// Stages a verified binary as `versions/<version>/nimbus-agent` (0755): copied into `versions/<version>.partial`,
/// fsynced, renamed. Idempotent: a version already staged with the same SHA-256 is left as it is.
pub fn stage(state_dir: &Path, version: &str, verified_binary: &Path) -> Result<Staged, VersionsError> {
    stage_steps(state_dir, version, verified_binary, &mut Steps::all())
}

fn stage_steps(
    state_dir: &Path,
    version: &str,
    verified_binary: &Path,
    steps: &mut Steps,
) -> Result<Staged, VersionsError> {
    let v = AgentVersion::parse(version)?;
    let _lock = lock(state_dir)?;
    let versions = state_dir.join(VERSIONS_DIR);
    let final_dir = versions.join(v.as_str());
    let binary = final_dir.join(BINARY_NAME);
    if final_dir.exists() {
        let new = sha256_file(verified_binary)?;
        let have = if sound_file(&binary) {
            sha256_file(&binary).ok()
        } else {
            None
        };
        if have.as_deref() == Some(new.as_str()) {
            return Ok(Staged {
                version: v,
                binary,
                sha256: new,
            });
        }
        let st = load(state_dir).unwrap_or_default();
        if linked_version(state_dir).as_ref() == Some(&v) || st.current.is(&v) || st.pending_is(&v) {
            return Err(VersionsError::Conflict {
                version: v.0,
                staged: have.unwrap_or_else(|| "(unreadable)".into()),
                new,
            });
        }
        // Not in use and different (or damaged): replace it. Renamed to .partial first, so a crash mid-removal
        // leaves a directory `cleanup` removes, never a half-removed version.
        let aside = versions.join(format!("{v}{PARTIAL_SUFFIX}"));
        remove_dir_if_present(&aside)?;
        fs::rename(&final_dir, &aside).map_err(io_err(&final_dir))?;
        remove_dir_if_present(&aside)?;
    }
    mkdir(&versions, 0o755)?;
    let partial = versions.join(format!("{v}{PARTIAL_SUFFIX}"));
    remove_dir_if_present(&partial)?;
    mkdir(&partial, 0o755)?;
    steps.step()?;
    let sha256 = copy_hashed(verified_binary, &partial.join(BINARY_NAME))?;
    steps.step()?;
    sync_dir(&partial)?;
    fs::rename(&partial, &final_dir).map_err(io_err(&final_dir))?;
    steps.step()?;
    sync_dir(&versions)?;
    steps.step()?;
    Ok(Staged {
        version: v,
        binary,
        sha256,
    })
}

/// Makes a staged version current and pending (attempts 0): `upgrade.json` first, then the `current` link
/// (`current.new` + rename). `previous` records what ran before (a version or "package"). Re-activating the
/// pending version changes nothing; activating a previously failed version clears its failure record.
pub fn activate(state_dir: &Path, version: &str) -> Result<(), VersionsError> {
    activate_steps(state_dir, version, &mut Steps::all())
}

fn activate_steps(state_dir: &Path, version: &str, steps: &mut Steps) -> Result<(), VersionsError> {
    let v = AgentVersion::parse(version)?;
    if !staged(state_dir, &v) {
        return Err(VersionsError::NotStaged {
            path: binary_path(state_dir, &v),
            version: v.0,
        });
    }
    let _lock = lock(state_dir)?;
    let mut st = load(state_dir)?;
    match &st.pending {
        Some(p) if p.version == v => return Ok(()),
        Some(p) => {
            return Err(VersionsError::StillPending {
                pending: p.version.0.clone(),
                version: v.0,
            });
        }
        None => {}
    }
    let (running, _) = resolve_with(state_dir, &st, Path::new(""));
    if running.is(&v) {
        // Already the confirmed current version.
        return Ok(());
    }
    st.previous = Some(running);
    st.current = Slot::Version(v.clone());
    st.failed.retain(|f| f.version != v);
    st.pending = Some(Pending {
        version: v.clone(),
        attempts: 0,
        last_error: None,
    });
    save(state_dir, &st)?;
    steps.step()?;
    switch_link(state_dir, &Slot::Version(v), steps)
}

/// Marks the pending `version` healthy. Returns false (and changes nothing) when it is not the pending one.
pub fn confirm(state_dir: &Path, version: &str) -> Result<bool, VersionsError> {
    let v = AgentVersion::parse(version)?;
    let _lock = lock(state_dir)?;
    let mut st = load(state_dir)?;
    if !st.pending_is(&v) {
        return Ok(false);
    }
    st.pending = None;
    save(state_dir, &st)?;
    Ok(true)
}

/// Counts a start of the pending `version` (before it begins). Returns the attempts so far, this one included.
pub fn begin_attempt(state_dir: &Path, version: &str) -> Result<u32, VersionsError> {
    update_pending(state_dir, version, |p| {
        p.attempts = p.attempts.saturating_add(1);
    })
}

/// Records why a start of the pending `version` failed (kept as the rollback reason).
pub fn note_failure(state_dir: &Path, version: &str, reason: &str) -> Result<u32, VersionsError> {
    update_pending(state_dir, version, |p| p.last_error = Some(reason.to_string()))
}

/// Gives back a start that was stopped on purpose (SIGTERM before ready): it does not count as a failure.
pub fn abandon_attempt(state_dir: &Path, version: &str) -> Result<u32, VersionsError> {
    update_pending(state_dir, version, |p| p.attempts = p.attempts.saturating_sub(1))
}

fn update_pending(state_dir: &Path, version: &str, f: impl FnOnce(&mut Pending)) -> Result<u32, VersionsError> {
    let v = AgentVersion::parse(version)?;
    let _lock = lock(state_dir)?;
    let mut st = load(state_dir)?;
    let p = match st.pending.as_mut() {
        Some(p) if p.version == v => p,
        _ => return Err(VersionsError::NotPending(v.0)),
    };
    f(p);
    let attempts = p.attempts;
    save(state_dir, &st)?;
    Ok(attempts)
}

/// Rolls the pending version back: records it as failed with `reason`, makes `previous` current again (the
/// package binary when there is no sound previous version) and switches the link. Returns what is current now.
pub fn fail_and_roll_back(state_dir: &Path, reason: &str) -> Result<Slot, VersionsError> {
    let _lock = lock(state_dir)?;
    let st = load(state_dir)?;
    roll_back_locked(state_dir, st, reason, &mut Steps::all())
}

fn roll_back_locked(
    state_dir: &Path,
    mut st: UpgradeState,
    reason: &str,
    steps: &mut Steps,
) -> Result<Slot, VersionsError> {
    let Some(p) = st.pending.take() else {
        return Err(VersionsError::NotPending(
            st.current.version().map(|v| v.0.clone()).unwrap_or_default(),
        ));
    };
    let target = match st.previous.take() {
        Some(Slot::Version(prev)) if prev != p.version && staged(state_dir, &prev) => Slot::Version(prev),
        _ => Slot::Package,
    };
    st.failed.push(Failed {
        version: p.version,
        reason: reason.to_string(),
        at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    });
    let excess = st.failed.len().saturating_sub(MAX_FAILED_RECORDS);
    st.failed.drain(..excess);
    st.current = target.clone();
    save(state_dir, &st)?;
    steps.step()?;
    switch_link(state_dir, &target, steps)?;
    Ok(target)
}

/// Picks what to start, without writing anything: the linked version unless `upgrade.json` records it as
/// rolled back, else the recorded current version, else the previous one — each only if its binary is a
/// regular executable file — else `package_binary`.
pub fn resolve(state_dir: &Path, package_binary: &Path) -> (Slot, PathBuf) {
    let st = match load(state_dir) {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the upgrade record; following the `current` link");
            UpgradeState::default()
        }
    };
    resolve_with(state_dir, &st, package_binary)
}

/// The binary [`resolve`] picks.
pub fn resolve_binary(state_dir: &Path, package_binary: &Path) -> PathBuf {
    resolve(state_dir, package_binary).1
}

fn resolve_with(state_dir: &Path, st: &UpgradeState, package_binary: &Path) -> (Slot, PathBuf) {
    let linked = linked_version(state_dir).filter(|v| !st.has_failed(v) || st.pending_is(v));
    let candidates = [
        linked,
        st.current.version().cloned(),
        st.previous.as_ref().and_then(|p| p.version().cloned()),
    ];
    for v in candidates.into_iter().flatten() {
        if staged(state_dir, &v) {
            let bin = binary_path(state_dir, &v);
            return (Slot::Version(v), bin);
        }
    }
    (Slot::Package, package_binary.to_path_buf())
}

/// Finishes what a crash interrupted so the `current` link matches `upgrade.json`: an activation is rolled
/// forward, a rollback completed. A record naming a binary that is gone falls back (a pending one is rolled
/// back as failed). An unreadable record is moved to `upgrade.json.corrupt` and rebuilt from the link. Without
/// a record, nothing is written. Returns what is current now.
pub fn reconcile(state_dir: &Path) -> Result<Slot, VersionsError> {
    reconcile_steps(state_dir, &mut Steps::all())
}

fn reconcile_steps(state_dir: &Path, steps: &mut Steps) -> Result<Slot, VersionsError> {
    if !state_dir.join(UPGRADE_FILE).exists() {
        let linked = linked_version(state_dir).filter(|v| staged(state_dir, v));
        return Ok(linked.map(Slot::Version).unwrap_or_default());
    }
    let _lock = lock(state_dir)?;
    let mut st = match load(state_dir) {
        Ok(st) => st,
        Err(e @ VersionsError::Corrupt { .. }) => {
            tracing::error!(error = %e, "upgrade record unreadable: moved aside, rebuilt from the `current` link");
            let aside = state_dir.join(UPGRADE_CORRUPT);
            fs::rename(state_dir.join(UPGRADE_FILE), &aside).map_err(io_err(&aside))?;
            let linked = linked_version(state_dir).filter(|v| staged(state_dir, v));
            let st = UpgradeState {
                current: linked.map(Slot::Version).unwrap_or_default(),
                ..UpgradeState::default()
            };
            save(state_dir, &st)?;
            st
        }
        Err(e) => return Err(e),
    };
    remove_file_if_present(&state_dir.join(CURRENT_NEW))?;
    if let Slot::Version(v) = &st.current
        && !staged(state_dir, v)
    {
        if st.pending_is(v) {
            let reason = format!("its binary {} is missing", binary_path(state_dir, v).display());
            return roll_back_locked(state_dir, st, &reason, steps);
        }
        let fallback = match &st.previous {
            Some(Slot::Version(p)) if staged(state_dir, p) => Slot::Version(p.clone()),
            _ => Slot::Package,
        };
        tracing::warn!(missing = %v, now = %fallback, "the current version's binary is missing");
        st.current = fallback;
        st.previous = None;
        save(state_dir, &st)?;
        steps.step()?;
    }
    let linked = linked_version(state_dir);
    let link_present = fs::symlink_metadata(state_dir.join(CURRENT_LINK)).is_ok();
    let in_place = match &st.current {
        Slot::Version(v) => linked.as_ref() == Some(v),
        Slot::Package => !link_present,
    };
    if !in_place {
        tracing::info!(current = %st.current, linked = ?linked.as_ref().map(|v| v.as_str()), "finishing an interrupted switch");
        switch_link(state_dir, &st.current, steps)?;
    }
    Ok(st.current)
}

/// Removes what crashes and upgrades leave behind: `*.partial` directories, `current.new`, the temp record, and
/// staged versions beyond the newest [`KEEP_VERSIONS`] (the current, previous and pending ones are always
/// kept, as is whatever the link names). Returns the versions removed.
pub fn cleanup(state_dir: &Path) -> Result<Vec<AgentVersion>, VersionsError> {
    let _lock = lock(state_dir)?;
    let st = load(state_dir)?;
    remove_file_if_present(&state_dir.join(CURRENT_NEW))?;
    remove_file_if_present(&state_dir.join(UPGRADE_TMP))?;
    let versions = state_dir.join(VERSIONS_DIR);
    let entries = match fs::read_dir(&versions) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&versions)(e)),
    };
    let mut staged_versions = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(&versions))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(PARTIAL_SUFFIX) {
            remove_dir_if_present(&entry.path())?;
        } else if let Ok(v) = AgentVersion::parse(name) {
            staged_versions.push(v);
        }
    }
    staged_versions.sort_by_key(|v| std::cmp::Reverse(v.semver()));
    let linked = linked_version(state_dir);
    let mut protected: Vec<&AgentVersion> = Vec::new();
    protected.extend(st.current.version());
    protected.extend(st.previous.as_ref().and_then(Slot::version));
    protected.extend(st.pending.as_ref().map(|p| &p.version));
    protected.extend(linked.as_ref());
    let mut removed = Vec::new();
    for (i, v) in staged_versions.iter().enumerate() {
        if i < KEEP_VERSIONS || protected.contains(&v) {
            continue;
        }
        // Renamed to .partial first: a crash mid-removal leaves only a leftover for the next cleanup.
        let dir = versions.join(v.as_str());
        let aside = versions.join(format!("{v}{PARTIAL_SUFFIX}"));
        fs::rename(&dir, &aside).map_err(io_err(&dir))?;
        remove_dir_if_present(&aside)?;
        removed.push(v.clone());
    }
    if !removed.is_empty() {
        sync_dir(&versions)?;
    }
    Ok(removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    /// A fake agent binary that prints its version.
    fn fake_binary(dir: &Path, version: &str) -> PathBuf {
        let p = dir.join(format!("build-{version}"));
        fs::write(&p, format!("#!/bin/sh\necho {version}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    struct Host {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        builds: PathBuf,
        package: PathBuf,
    }

    fn host() -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let builds = tmp.path().join("builds");
        fs::create_dir_all(&builds).unwrap();
        let package = fake_binary(&builds, "package");
        Host {
            state,
            builds,
            package,
            _tmp: tmp,
        }
    }

    impl Host {
        fn build(&self, v: &str) -> PathBuf {
            fake_binary(&self.builds, v)
        }

        /// What the resolved binary prints: the version a launcher would start now.
        fn runs(&self) -> String {
            let bin = resolve_binary(&self.state, &self.package);
            // ETXTBSY: another test thread forked while a script was open for writing; it clears at its exec.
            let out = (0..50)
                .find_map(|_| match std::process::Command::new(&bin).output() {
                    Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        None
                    }
                    r => Some(r.unwrap()),
                })
                .unwrap();
            assert!(out.status.success(), "{} does not run", bin.display());
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        }

        fn install(&self, v: &str) {
            stage(&self.state, v, &self.build(v)).unwrap();
            activate(&self.state, v).unwrap();
            confirm(&self.state, v).unwrap();
        }
    }

    #[test]
    fn versions_are_validated_before_they_become_paths() {
        for bad in [
            "",
            "1",
            "1.2",
            "v1.2.3",
            "../1.2.3",
            "1.2.3/..",
            "1.2.3 ",
            "1.2.3\0",
            "01.2.3",
            &"9".repeat(70),
        ] {
            assert!(AgentVersion::parse(bad).is_err(), "{bad:?} accepted");
            assert!(matches!(
                activate(Path::new("/nonexistent"), bad),
                Err(VersionsError::InvalidVersion { .. })
            ));
        }
        for good in ["1.2.3", "1.5.0-rc.1", "2.0.0+build.7"] {
            assert_eq!(AgentVersion::parse(good).unwrap().as_str(), good);
        }
        let bad: Result<UpgradeState, _> = serde_json::from_str(r#"{"current":"../../etc"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn a_fresh_host_runs_the_package_binary_and_writes_nothing() {
        let h = host();
        assert_eq!(h.runs(), "package");
        assert_eq!(reconcile(&h.state).unwrap(), Slot::Package);
        assert!(!h.state.exists());
    }

    #[test]
    fn stage_activate_confirm_and_the_record() {
        let h = host();
        let s = stage(&h.state, "1.1.0", &h.build("1.1.0")).unwrap();
        assert_eq!(s.sha256, sha256_file(&h.build("1.1.0")).unwrap());
        let mode = fs::metadata(&s.binary).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // Staging again is a no-op.
        assert_eq!(stage(&h.state, "1.1.0", &h.build("1.1.0")).unwrap(), s);
        assert_eq!(h.runs(), "package", "staging alone switches nothing");

        activate(&h.state, "1.1.0").unwrap();
        let st = load(&h.state).unwrap();
        assert_eq!(st.current, Slot::Version(AgentVersion::parse("1.1.0").unwrap()));
        assert_eq!(st.previous, Some(Slot::Package));
        assert_eq!(st.pending.as_ref().unwrap().attempts, 0);
        assert_eq!(
            fs::read_link(h.state.join(CURRENT_LINK)).unwrap(),
            Path::new("versions/1.1.0")
        );
        assert_eq!(h.runs(), "1.1.0");
        let raw: serde_json::Value = serde_json::from_slice(&fs::read(h.state.join(UPGRADE_FILE)).unwrap()).unwrap();
        assert_eq!(raw["previous"], "package");
        assert_eq!(raw["pending"]["version"], "1.1.0");

        assert!(!confirm(&h.state, "9.9.9").unwrap());
        assert!(confirm(&h.state, "1.1.0").unwrap());
        assert_eq!(load(&h.state).unwrap().pending, None);

        // A second version remembers the first as previous.
        stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
        activate(&h.state, "1.2.0").unwrap();
        let st = load(&h.state).unwrap();
        assert_eq!(st.previous, Some(Slot::Version(AgentVersion::parse("1.1.0").unwrap())));
        // Another activation waits for this one.
        stage(&h.state, "1.3.0", &h.build("1.3.0")).unwrap();
        assert!(matches!(
            activate(&h.state, "1.3.0"),
            Err(VersionsError::StillPending { .. })
        ));
        assert!(matches!(
            activate(&h.state, "4.0.0"),
            Err(VersionsError::NotStaged { .. })
        ));
    }

    #[test]
    fn restaging_an_active_version_with_other_bytes_is_refused() {
        let h = host();
        h.install("1.1.0");
        let other = h.builds.join("other");
        fs::write(&other, "#!/bin/sh\necho other\n").unwrap();
        assert!(matches!(
            stage(&h.state, "1.1.0", &other),
            Err(VersionsError::Conflict { .. })
        ));
        // A version not in use is replaced.
        stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
        let s = stage(&h.state, "1.2.0", &other).unwrap();
        assert_eq!(s.sha256, sha256_file(&other).unwrap());
    }

    #[test]
    fn attempts_are_counted_and_roll_back_records_the_failure() {
        let h = host();
        h.install("1.1.0");
        stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
        activate(&h.state, "1.2.0").unwrap();
        assert_eq!(begin_attempt(&h.state, "1.2.0").unwrap(), 1);
        assert_eq!(begin_attempt(&h.state, "1.2.0").unwrap(), 2);
        assert_eq!(abandon_attempt(&h.state, "1.2.0").unwrap(), 1);
        note_failure(&h.state, "1.2.0", "exited 1 before ready").unwrap();
        assert!(matches!(
            begin_attempt(&h.state, "1.1.0"),
            Err(VersionsError::NotPending(_))
        ));

        let now = fail_and_roll_back(&h.state, "exited 1 before ready").unwrap();
        assert_eq!(now, Slot::Version(AgentVersion::parse("1.1.0").unwrap()));
        assert_eq!(h.runs(), "1.1.0");
        let st = load(&h.state).unwrap();
        assert_eq!(st.pending, None);
        assert_eq!(st.failed.len(), 1);
        assert_eq!(st.failed[0].version.as_str(), "1.2.0");
        assert_eq!(st.failed[0].reason, "exited 1 before ready");
        assert!(st.failed[0].at.ends_with('Z'));
        assert!(matches!(
            fail_and_roll_back(&h.state, "x"),
            Err(VersionsError::NotPending(_))
        ));

        // Activating it again clears the record.
        activate(&h.state, "1.2.0").unwrap();
        assert!(load(&h.state).unwrap().failed.is_empty());
    }

    #[test]
    fn rolling_back_the_first_version_returns_to_the_package_binary() {
        let h = host();
        stage(&h.state, "1.1.0", &h.build("1.1.0")).unwrap();
        activate(&h.state, "1.1.0").unwrap();
        assert_eq!(
            fail_and_roll_back(&h.state, "not ready within 120s").unwrap(),
            Slot::Package
        );
        assert!(fs::symlink_metadata(h.state.join(CURRENT_LINK)).is_err());
        assert_eq!(h.runs(), "package");
    }

    /// Runs `op` stopped after step 1, 2, ... until it completes; after each stop checks that the resolved binary
    /// runs and prints one of `acceptable`, then that `reconcile` leads to `settled`.
    fn crash_after_each_step(
        setup: impl Fn(&Host),
        op: impl Fn(&Host, &mut Steps) -> Result<(), VersionsError>,
        acceptable: &[&str],
        settled: &str,
    ) {
        for stop in 1.. {
            let h = host();
            setup(&h);
            let mut steps = Steps {
                stop_after: Some(stop),
                done: 0,
            };
            match op(&h, &mut steps) {
                Ok(()) => {
                    assert_eq!(h.runs(), settled, "completed");
                    assert!(stop > 1, "the operation has no steps");
                    return;
                }
                Err(VersionsError::SimulatedCrash(n)) => assert_eq!(n, stop),
                Err(e) => panic!("step {stop}: {e}"),
            }
            let runs = h.runs();
            assert!(
                acceptable.contains(&runs.as_str()),
                "stopped after step {stop}: runs {runs}"
            );
            reconcile(&h.state).unwrap();
            assert!(
                acceptable.contains(&h.runs().as_str()),
                "after step {stop} + reconcile: runs {}",
                h.runs()
            );
            cleanup(&h.state).unwrap();
            assert!(acceptable.contains(&h.runs().as_str()), "after cleanup");
        }
    }

    #[test]
    fn kill_during_stage_leaves_the_old_version_running() {
        crash_after_each_step(
            |h| h.install("1.1.0"),
            |h, steps| stage_steps(&h.state, "1.2.0", &h.build("1.2.0"), steps).map(|_| ()),
            &["1.1.0"],
            "1.1.0",
        );
        // And a stage after a crash completes (the leftover .partial is replaced).
        let h = host();
        let mut steps = Steps {
            stop_after: Some(2),
            done: 0,
        };
        assert!(stage_steps(&h.state, "1.2.0", &h.build("1.2.0"), &mut steps).is_err());
        assert!(h.state.join("versions/1.2.0.partial").exists());
        stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
        cleanup(&h.state).unwrap();
        assert!(!h.state.join("versions/1.2.0.partial").exists());
        assert!(h.state.join("versions/1.2.0/nimbus-agent").exists());
    }

    #[test]
    fn kill_during_activate_runs_old_or_new_and_reconcile_rolls_forward() {
        let setup = |h: &Host| {
            h.install("1.1.0");
            stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
        };
        crash_after_each_step(
            setup,
            |h, steps| activate_steps(&h.state, "1.2.0", steps),
            &["1.1.0", "1.2.0"],
            "1.2.0",
        );
        // Interrupted after the record was written: reconcile finishes the switch, still pending.
        let h = host();
        setup(&h);
        let mut steps = Steps {
            stop_after: Some(1),
            done: 0,
        };
        assert!(activate_steps(&h.state, "1.2.0", &mut steps).is_err());
        assert_eq!(h.runs(), "1.1.0");
        reconcile(&h.state).unwrap();
        assert_eq!(h.runs(), "1.2.0");
        assert_eq!(load(&h.state).unwrap().pending.unwrap().version.as_str(), "1.2.0");
    }

    #[test]
    fn kill_during_roll_back_never_runs_the_failed_version() {
        for first in [true, false] {
            let setup = move |h: &Host| {
                if !first {
                    h.install("1.1.0");
                }
                stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
                activate(&h.state, "1.2.0").unwrap();
            };
            let good = if first { "package" } else { "1.1.0" };
            crash_after_each_step(
                setup,
                |h, steps| {
                    let st = load(&h.state).unwrap();
                    roll_back_locked(&h.state, st, "exited 1 before ready", steps).map(|_| ())
                },
                &[good],
                good,
            );
        }
    }

    #[test]
    fn kill_during_reconcile_is_safe_too() {
        // An activation interrupted after its record, then a reconcile interrupted after each of its steps.
        crash_after_each_step(
            |h| {
                h.install("1.1.0");
                stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
                let mut steps = Steps {
                    stop_after: Some(1),
                    done: 0,
                };
                assert!(activate_steps(&h.state, "1.2.0", &mut steps).is_err());
            },
            |h, steps| reconcile_steps(&h.state, steps).map(|_| ()),
            &["1.1.0", "1.2.0"],
            "1.2.0",
        );
    }

    #[test]
    fn damaged_states_fall_back_to_something_that_runs() {
        let h = host();
        h.install("1.1.0");
        stage(&h.state, "1.2.0", &h.build("1.2.0")).unwrap();
        activate(&h.state, "1.2.0").unwrap();
        // The pending binary vanished: resolve falls back, reconcile rolls it back as failed.
        fs::remove_file(binary_path(&h.state, &AgentVersion::parse("1.2.0").unwrap())).unwrap();
        assert_eq!(h.runs(), "1.1.0");
        reconcile(&h.state).unwrap();
        let st = load(&h.state).unwrap();
        assert_eq!(st.failed[0].version.as_str(), "1.2.0");
        assert!(st.failed[0].reason.contains("missing"), "{}", st.failed[0].reason);
        assert_eq!(linked_version(&h.state).unwrap().as_str(), "1.1.0");

        // A binary that is not executable, or a dangling link, is skipped.
        let bin = binary_path(&h.state, &AgentVersion::parse("1.1.0").unwrap());
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(h.runs(), "package");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();

        // A corrupt record: resolve follows the link; reconcile moves it aside and rebuilds it.
        fs::write(h.state.join(UPGRADE_FILE), "{not json").unwrap();
        assert_eq!(h.runs(), "1.1.0");
        assert!(matches!(load(&h.state), Err(VersionsError::Corrupt { .. })));
        reconcile(&h.state).unwrap();
        assert!(h.state.join(UPGRADE_CORRUPT).exists());
        assert_eq!(load(&h.state).unwrap().current.to_string(), "1.1.0");
        assert_eq!(h.runs(), "1.1.0");
    }

    #[test]
    fn cleanup_keeps_the_newest_three_and_those_in_use() {
        let h = host();
        for v in ["1.0.0", "1.1.0", "1.2.0", "1.10.0", "2.0.0-rc.1", "2.0.0"] {
            stage(&h.state, v, &h.build(v)).unwrap();
        }
        // 1.0.0 in use (current), 1.1.0 previous.
        h.install("1.1.0");
        h.install("1.0.0");
        fs::create_dir_all(h.state.join("versions/3.0.0.partial")).unwrap();
        std::os::unix::fs::symlink("versions/2.0.0", h.state.join(CURRENT_NEW)).unwrap();
        let mut removed: Vec<String> = cleanup(&h.state).unwrap().into_iter().map(String::from).collect();
        removed.sort();
        assert_eq!(removed, ["1.2.0"]);
        let mut left: Vec<String> = fs::read_dir(h.state.join(VERSIONS_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["1.0.0", "1.1.0", "1.10.0", "2.0.0", "2.0.0-rc.1"]);
        assert!(fs::symlink_metadata(h.state.join(CURRENT_NEW)).is_err());
        assert_eq!(h.runs(), "1.0.0");
    }
}
