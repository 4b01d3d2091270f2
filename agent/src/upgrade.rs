//! Carrying out the agent release a desired state names (`DesiredState.agent`).
//!
//! [`decide`] is the pure rule: nothing to do (no release named, or it is the running version), a report
//! (this host rolled that version back before, the agent was not started by `nimbus-agent launch`, a
//! downgrade the rollout did not allow, a version string that is not semver), or an upgrade.
//!
//! [`Executor::execute`] carries an upgrade out: the pinned release root (`release_root`, the repository's
//! `1.root.json` installed with the agent) is read; the URLs the desired state gives must be `http://` on the
//! overlay address of a coordinator replica this agent currently knows ([`ReleaseHosts`], updated with the
//! replica list; defence in depth: TUF verifies every byte anyway); the metadata is loaded and
//! verified (`release::Releases`, datastore `<state_dir>/releases`); the named target must be signed as the
//! desired version, kind `binary`, this host's architecture; it is fetched to `<state_dir>/downloads/<target>`,
//! staged and activated (`crate::versions`), and the download removed. The result is an ObservedState for the
//! desired generation and a request to exit with [`crate::error::EXIT_RESTART`], after which the launcher
//! starts the new `current`. Any failure is an ObservedState whose error reads `upgrade to V: <what, what to
//! do>`; the agent keeps running. Loading and fetching share one deadline ([`UPGRADE_TIMEOUT`]).
//!
//! [`spawn`] runs the executor in a background task, one upgrade at a time: desired states offered while one
//! runs are looked at when it ends (only the newest). It starts only once this agent has signalled ready, so
//! the launcher never sees exit 75 from an agent that was not yet healthy.
//!
//! **Invariant:** nothing here trusts the coordinator: the artefact is verified against the pinned root before
//! a byte of it reaches `versions/`; without a pinned root, or outside the launcher, nothing is downloaded.

use std::collections::HashSet;
use std::fmt::Display;
use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_proto::{DesiredState, FailedRelease, ObservedState};
use release::transport::HttpConfig;
use release::{ArtefactKind, HttpRangeTransport, Releases, UpgradeStep};
use semver::Version;
use tokio::sync::{mpsc, watch};
use url::{Host, Url};

use crate::versions::{self, Failed};

/// Longest an upgrade's network part (metadata load and artefact fetch together) may take. Default 10 min.
/// Each request also has the transport's own connect and read timeouts.
pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(600);
/// The TUF datastore (newest metadata seen: rollback and freeze protection across restarts), in the state dir.
pub const RELEASES_DIR: &str = "releases";
/// Where artefacts are downloaded before staging, in the state dir (emptied before each download).
pub const DOWNLOADS_DIR: &str = "downloads";
/// The artefact kind an agent installs itself from.
pub const KIND: ArtefactKind = ArtefactKind::Binary;

/// What to do about a desired agent release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: no release named, or it is the running version.
    Skip,
    /// Do not upgrade; report this error (`upgrade to V: ...`) for the desired generation.
    Report(String),
    /// Download, verify, stage and activate.
    Upgrade(Plan),
}

/// An upgrade [`decide`] allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The running version.
    pub current: Version,
    /// The version to install.
    pub version: Version,
    /// [`UpgradeStep::Upgrade`] or (allowed) [`UpgradeStep::Downgrade`].
    pub step: UpgradeStep,
}

fn report(version: &str, what: impl Display) -> Decision {
    Decision::Report(format!("upgrade to {version}: {what}"))
}

/// The failure record of `version` in `failed`, if this host rolled it back before.
pub fn failed_record<'a>(failed: &'a [Failed], version: &Version) -> Option<&'a Failed> {
    failed
        .iter()
        .find(|f| Version::parse(f.version.as_str()).is_ok_and(|v| v == *version))
}

/// The rule: `desired` (the desired state's release, if any) against the `running` version, the versions this
/// host rolled back (`failed`, from `upgrade.json`) and whether the launcher started this agent.
pub fn decide(
    desired: Option<&nimbus_proto::AgentRelease>,
    running: &str,
    failed: &[Failed],
    under_launcher: bool,
) -> Decision {
    let Some(desired) = desired else {
        return Decision::Skip;
    };
    let raw = desired.version.as_str();
    let Ok(version) = Version::parse(raw) else {
        return report(
            raw,
            format_args!("{raw:?} is not a semantic version; the rollout must name a published version such as 1.4.2"),
        );
    };
    let Ok(current) = Version::parse(running) else {
        return report(
            raw,
            format_args!("this agent's own version {running:?} is not a semantic version; reinstall the agent package"),
        );
    };
    if version == current {
        return Decision::Skip;
    }
    if let Some(f) = failed_record(failed, &version) {
        return report(
            raw,
            format_args!(
                "this host already rolled back {version} at {} ({}) and does not retry it; publish a fixed build \
                 under a new version and roll that out",
                f.at, f.reason
            ),
        );
    }
    if !under_launcher {
        return report(
            raw,
            "this agent was not started by `nimbus-agent launch`, so it cannot switch versions; update the unit's ExecStart",
        );
    }
    match release::check_upgrade(&current, &version, desired.allow_downgrade) {
        Ok(UpgradeStep::AlreadyCurrent) => Decision::Skip,
        Ok(step) => Decision::Upgrade(Plan { current, version, step }),
        Err(refused) => report(raw, refused),
    }
}

/// Why an upgrade did not happen (the part after `upgrade to V: `).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The same release is now offered from another coordinator replica (the stream moved): not an error to
    /// report, the install starts again from there.
    #[error("superseded: the release is offered by another coordinator replica now")]
    Superseded,
    #[error(
        "no release root pinned at {}: install the repository's 1.root.json there (nimbusctl release init printed it); {source}",
        .path.display()
    )]
    NoRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the desired state's {what} {url:?} {reason}; release URLs must be http:// on the coordinator's overlay address \
         {}: check the coordinator's release settings", ip_list(.allowed)
    )]
    BadUrl {
        what: &'static str,
        url: String,
        reason: String,
        /// The addresses allowed ([`ReleaseHosts`]).
        allowed: Vec<Ipv4Addr>,
    },
    #[error(
        "the desired state names target {0:?}, which is not a plain file name; roll out a published target (`nimbusctl release list`)"
    )]
    BadTarget(String),
    #[error(
        "{step} did not finish within {}; check the tunnel to the coordinator and its release repository, the next desired state tries again",
        humantime::format_duration(*.after)
    )]
    Timeout { step: &'static str, after: Duration },
    #[error("{0}")]
    Release(#[from] release::client::ClientError),
    #[error(
        "target {target} is not in the signed release metadata; publish it with `nimbusctl release add` or roll out a published version (`nimbusctl release list`)"
    )]
    NotPublished { target: String },
    #[error(
        "target {target} is signed as version {signed_version}, kind {signed_kind}, arch {signed_arch}, but this host needs version \
         {version}, kind binary, arch {arch}; publish that build and roll it out"
    )]
    WrongArtefact {
        target: String,
        signed_version: String,
        signed_kind: ArtefactKind,
        signed_arch: String,
        version: String,
        arch: String,
    },
    #[error(
        "version {version} is already what the launcher starts on this host, yet the running agent reports {running}: the \
         published binary is not a build of {version}; publish a real {version} build under a new version"
    )]
    Misbuilt { version: String, running: String },
    #[error("{}: {source}; check the state directory (writable by root, free space)", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Versions(#[from] versions::VersionsError),
    #[error("the install step stopped unexpectedly ({0}); the next desired state tries again")]
    Task(String),
}

/// `a, b, c` (or `(none)`), for [`UpgradeError::BadUrl`].
fn ip_list(ips: &[Ipv4Addr]) -> String {
    if ips.is_empty() {
        return "(none known)".into();
    }
    ips.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(" or ")
}

/// The part of a desired state an upgrade acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub generation: u64,
    pub policy_revision: u64,
    pub release: nimbus_proto::AgentRelease,
}

impl Request {
    /// `None` when the desired state names no release.
    pub fn of(d: &DesiredState) -> Option<Request> {
        d.agent.as_ref().map(|release| Request {
            generation: d.generation,
            policy_revision: d.policy_revision,
            release: release.clone(),
        })
    }
}

/// What an execution ended with.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Nothing to do, nothing to report.
    Nothing,
    /// Send this report (it carries the error); keep running.
    Report(ObservedState),
    /// Installed and activated: send this report, shut down gracefully and exit with
    /// [`crate::error::EXIT_RESTART`] so the launcher starts `version`.
    Restart { version: String, observed: ObservedState },
}

/// Carries out upgrades for one agent (see the module docs). Fields are public so tests can point it at a
/// loopback repository and pretend another running version.
#[derive(Debug)]
pub struct Executor {
    pub state_dir: PathBuf,
    /// The pinned root metadata file.
    pub release_root: PathBuf,
    /// The coordinator replicas' overlay addresses: the only hosts release URLs may name.
    pub release_hosts: ReleaseHosts,
    /// Whether `nimbus-agent launch` started this agent (env `NIMBUS_LAUNCHER=1`).
    pub under_launcher: bool,
    /// The running version ([`crate::version()`]).
    pub running: String,
    /// This host's architecture as releases name it ([`std::env::consts::ARCH`]: x86_64, aarch64).
    pub arch: String,
    /// Deadline of the network part ([`UPGRADE_TIMEOUT`]).
    pub timeout: Duration,
    /// The transport's timeouts and retries.
    pub transport: HttpConfig,
    /// Failed versions already logged (they are reported every time, logged once).
    told: HashSet<Version>,
}

impl Executor {
    /// For this process: running [`crate::version()`], launcher flag from the environment, default timeouts.
    pub fn new(state_dir: PathBuf, release_root: PathBuf, release_hosts: ReleaseHosts) -> Executor {
        Executor {
            state_dir,
            release_root,
            release_hosts,
            under_launcher: std::env::var(crate::launcher::LAUNCHER_ENV).is_ok_and(|v| v == "1"),
            running: crate::version().to_string(),
            arch: std::env::consts::ARCH.to_string(),
            timeout: UPGRADE_TIMEOUT,
            transport: HttpConfig::default(),
            told: HashSet::new(),
        }
    }

    fn observed(&self, req: &Request, error: String) -> ObservedState {
        ObservedState {
            generation: req.generation,
            policy_revision: req.policy_revision,
            error,
            ..Default::default()
        }
    }

    /// Decides about `req` and carries an upgrade out. Never panics, never exits: the caller acts on the outcome.
    pub async fn execute(&mut self, req: &Request) -> Outcome {
        self.execute_until(req, std::future::pending()).await
    }

    /// [`Executor::execute`], given up while the release is still being fetched when `superseded` resolves (the
    /// same release offered from another coordinator replica: the caller starts again there). Once the new
    /// version is being staged it runs to its end.
    pub async fn execute_until(&mut self, req: &Request, superseded: impl Future<Output = ()>) -> Outcome {
        let failed = match versions::load(&self.state_dir) {
            Ok(st) => st.failed,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade record unreadable; deciding as if no version had failed");
                Vec::new()
            }
        };
        let decision = decide(Some(&req.release), &self.running, &failed, self.under_launcher);
        match decision {
            Decision::Skip => Outcome::Nothing,
            Decision::Report(error) => {
                let known_failure = Version::parse(&req.release.version)
                    .ok()
                    .filter(|v| failed_record(&failed, v).is_some());
                match known_failure {
                    Some(v) => {
                        if self.told.insert(v) {
                            tracing::warn!(generation = req.generation, "{error}");
                        }
                    }
                    None => tracing::warn!(generation = req.generation, "{error}"),
                }
                Outcome::Report(self.observed(req, error))
            }
            Decision::Upgrade(plan) => match self.install(req, &plan, superseded).await {
                Ok(()) => {
                    tracing::info!(version = %plan.version, from = %plan.current, "restarting into the new agent version");
                    Outcome::Restart {
                        version: plan.version.to_string(),
                        observed: self.observed(req, String::new()),
                    }
                }
                Err(UpgradeError::Superseded) => {
                    tracing::info!(
                        version = %plan.version,
                        "upgrade: the release is now offered by another coordinator replica; fetching it there"
                    );
                    Outcome::Nothing
                }
                Err(e) => {
                    let error = format!("upgrade to {}: {e}", plan.version);
                    tracing::error!(generation = req.generation, "{error}");
                    Outcome::Report(self.observed(req, error))
                }
            },
        }
    }

    async fn install(
        &self,
        req: &Request,
        plan: &Plan,
        superseded: impl Future<Output = ()>,
    ) -> Result<(), UpgradeError> {
        tokio::pin!(superseded);
        let version = plan.version.to_string();
        // The launcher would start `version` already, yet this process is not it: exiting 75 would loop.
        if versions::resolve(&self.state_dir, Path::new(""))
            .0
            .version()
            .is_some_and(|v| v.as_str() == version)
        {
            return Err(UpgradeError::Misbuilt {
                version,
                running: self.running.clone(),
            });
        }
        let root = std::fs::read(&self.release_root).map_err(|source| UpgradeError::NoRoot {
            path: self.release_root.clone(),
            source,
        })?;
        let hosts = self.release_hosts.get();
        let metadata_url = check_url("metadata_url", &req.release.metadata_url, &hosts)?;
        let targets_url = check_url("targets_url", &req.release.targets_url, &hosts)?;
        let target = req.release.target.as_str();
        if !release::serve::valid_name(target) {
            return Err(UpgradeError::BadTarget(target.to_string()));
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = |step| UpgradeError::Timeout {
            step,
            after: self.timeout,
        };
        tracing::info!(%version, step = ?plan.step, url = %metadata_url, "upgrade: loading the release metadata");
        let releases_dir = self.state_dir.join(RELEASES_DIR);
        let load = tokio::time::timeout_at(
            deadline,
            Releases::load(
                &root,
                HttpRangeTransport::with_config(self.transport),
                metadata_url,
                targets_url,
                &releases_dir,
            ),
        );
        let releases = tokio::select! {
            r = load => r.map_err(|_| timed_out("loading the release metadata"))??,
            () = &mut superseded => return Err(UpgradeError::Superseded),
        };
        let info = releases
            .releases()
            .into_iter()
            .find(|r| r.target == target)
            .ok_or_else(|| UpgradeError::NotPublished {
                target: target.to_string(),
            })?;
        if info.release.version != plan.version || info.release.kind != KIND || info.release.arch != self.arch {
            return Err(UpgradeError::WrongArtefact {
                target: target.to_string(),
                signed_version: info.release.version.to_string(),
                signed_kind: info.release.kind,
                signed_arch: info.release.arch,
                version,
                arch: self.arch.clone(),
            });
        }
        let downloads = self.state_dir.join(DOWNLOADS_DIR);
        empty_downloads(&downloads)?;
        let dest = downloads.join(target);
        tracing::info!(%version, target, bytes = info.length, "upgrade: fetching the new agent");
        let fetch = tokio::time::timeout_at(deadline, releases.fetch(target, &dest));
        let fetched = tokio::select! {
            r = fetch => r.map_err(|_| timed_out("downloading the new agent"))??,
            () = &mut superseded => {
                let _ = std::fs::remove_file(&dest);
                return Err(UpgradeError::Superseded);
            }
        };
        tracing::info!(%version, sha256 = %fetched.sha256, bytes = fetched.length, "upgrade: new agent verified");

        let (state_dir, v, file) = (self.state_dir.clone(), version.clone(), dest.clone());
        let installed = tokio::task::spawn_blocking(move || -> Result<(), UpgradeError> {
            let staged = versions::stage(&state_dir, &v, &file)?;
            tracing::info!(version = %v, binary = %staged.binary.display(), sha256 = %staged.sha256, "upgrade: staged");
            versions::activate(&state_dir, &v)?;
            tracing::info!(version = %v, "upgrade: activated (current, pending until it is ready)");
            Ok(())
        })
        .await;
        if let Err(e) = std::fs::remove_file(&dest)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dest.display(), error = %e, "upgrade: cannot remove the download");
        }
        installed.map_err(|e| UpgradeError::Task(e.to_string()))?
    }
}

/// A release URL from the desired state: http:// on one of the `allowed` overlay addresses (the coordinator
/// replicas'), no credentials. Made a directory URL (trailing `/`) so metadata file names join onto it.
fn check_url(what: &'static str, raw: &str, allowed: &[Ipv4Addr]) -> Result<Url, UpgradeError> {
    let bad = |reason: &str| UpgradeError::BadUrl {
        what,
        url: raw.to_string(),
        reason: reason.to_string(),
        allowed: allowed.to_vec(),
    };
    let mut url = Url::parse(raw).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if url.scheme() != "http" {
        return Err(bad("is not http://"));
    }
    if !matches!(url.host(), Some(Host::Ipv4(ip)) if allowed.contains(&ip)) {
        return Err(bad("is not on a coordinator's overlay address"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("carries credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("carries a query or fragment"));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Creates `dir` (0700) and removes what an interrupted upgrade left in it.
fn empty_downloads(dir: &Path) -> Result<(), UpgradeError> {
    let io = |source| UpgradeError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|source| UpgradeError::Io { path, source })?;
    }
    Ok(())
}

/// The versions this host rolled back, from `upgrade.json`, as the coordinator is told them (every report
/// carries them). Empty when the record is missing or unreadable.
pub fn failed_releases(state_dir: &Path) -> Vec<FailedRelease> {
    let st = match versions::load(state_dir) {
        Ok(st) => st,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade record unreadable; reporting no failed releases");
            return Vec::new();
        }
    };
    st.failed
        .into_iter()
        .map(|f| FailedRelease {
            at_unix: humantime::parse_rfc3339_weak(&f.at)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
            version: f.version.to_string(),
            reason: f.reason,
        })
        .collect()
}

/// The overlay addresses release URLs may name: those of the coordinator replicas this agent currently knows.
/// Clones share the list; the fleet stream replaces it when the replica set changes. A strict allow-list: an
/// empty one allows nothing.
#[derive(Debug, Clone, Default)]
pub struct ReleaseHosts(Arc<Mutex<Vec<Ipv4Addr>>>);

impl ReleaseHosts {
    /// An allow-list of `ips`.
    pub fn new(ips: impl IntoIterator<Item = Ipv4Addr>) -> ReleaseHosts {
        let hosts = ReleaseHosts::default();
        hosts.set(ips);
        hosts
    }

    /// Replaces the list (for every clone).
    pub fn set(&self, ips: impl IntoIterator<Item = Ipv4Addr>) {
        let mut list: Vec<Ipv4Addr> = ips.into_iter().collect();
        list.sort();
        list.dedup();
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = list;
    }

    /// The current list, sorted.
    pub fn get(&self) -> Vec<Ipv4Addr> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The error of the last upgrade attempt and its generation, shared with the sender: every report for that
/// generation with no error of its own carries it, so a later report about something else (storage, the join)
/// does not make a failed upgrade look applied.
#[derive(Debug, Clone, Default)]
pub struct LastError(Arc<Mutex<Option<(u64, String)>>>);

impl LastError {
    fn set(&self, v: Option<(u64, String)>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = v;
    }

    /// Fills `o.error` with the upgrade error of `o.generation`, if there is one and `o` has no error.
    pub fn apply(&self, o: &mut ObservedState) {
        if !o.error.is_empty() {
            return;
        }
        if let Some((generation, error)) = &*self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
            && *generation == o.generation
        {
            o.error = error.clone();
        }
    }
}

/// The background upgrade task's inbox; dropping it stops the task.
#[derive(Debug)]
pub struct Handle {
    desired: watch::Sender<Option<Request>>,
    ready: watch::Sender<bool>,
    last_error: LastError,
    task: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Hands over a desired state (pulled or pushed). The task looks at the newest one when it is free.
    pub fn offer(&self, d: &DesiredState) {
        self.desired.send_replace(Request::of(d));
    }

    /// This agent signalled ready: upgrades may start (exit 75 before ready would count as a failed start).
    pub fn ready(&self) {
        self.ready.send_replace(true);
    }

    /// The last upgrade error, for the sender to stamp on reports (see [`LastError`]).
    pub fn last_error(&self) -> LastError {
        self.last_error.clone()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `executor` in a task, one request at a time. Outcomes other than [`Outcome::Nothing`] come out of the
/// receiver; after [`Outcome::Restart`] the task ends.
pub fn spawn(executor: Executor) -> (Handle, mpsc::Receiver<Outcome>) {
    let (desired_tx, desired_rx) = watch::channel(None);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (out_tx, out_rx) = mpsc::channel(4);
    let last_error = LastError::default();
    let task = tokio::spawn(work(executor, desired_rx, ready_rx, out_tx, last_error.clone()));
    (
        Handle {
            desired: desired_tx,
            ready: ready_tx,
            last_error,
            task,
        },
        out_rx,
    )
}

async fn work(
    mut executor: Executor,
    mut desired: watch::Receiver<Option<Request>>,
    mut ready: watch::Receiver<bool>,
    out: mpsc::Sender<Outcome>,
    last_error: LastError,
) {
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    while desired.changed().await.is_ok() {
        let Some(req) = desired.borrow_and_update().clone() else {
            last_error.set(None);
            continue;
        };
        // The same release offered from another replica (the stream moved after the one serving the download
        // died) gives up this attempt while it is still fetching; the loop then takes the new offer.
        let mut watcher = desired.clone();
        let current = req.release.clone();
        let superseded = async move {
            loop {
                if watcher.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let moved = watcher.borrow_and_update().as_ref().is_some_and(|n| {
                    n.release.version == current.version
                        && (n.release.metadata_url != current.metadata_url
                            || n.release.targets_url != current.targets_url)
                });
                if moved {
                    return;
                }
            }
        };
        match executor.execute_until(&req, superseded).await {
            Outcome::Nothing => last_error.set(None),
            restart @ Outcome::Restart { .. } => {
                last_error.set(None);
                let _ = out.send(restart).await;
                return;
            }
            Outcome::Report(observed) => {
                last_error.set(Some((observed.generation, observed.error.clone())));
                if out.send(Outcome::Report(observed)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use release::keys::{self, OnlineKeys};
    use release::repo::{self, Expiries};

    fn want(version: &str, allow_downgrade: bool) -> nimbus_proto::AgentRelease {
        nimbus_proto::AgentRelease {
            version: version.into(),
            target: format!("nimbus-agent-{version}-x86_64"),
            metadata_url: "http://100.64.0.1:7001/metadata/".into(),
            targets_url: "http://100.64.0.1:7001/targets/".into(),
            allow_downgrade,
        }
    }

    fn failed(version: &str) -> Failed {
        Failed {
            version: versions::AgentVersion::parse(version).unwrap(),
            reason: "exited 1 before ready".into(),
            at: "2026-01-02T03:04:05Z".into(),
        }
    }

    fn error_of(d: Decision) -> String {
        match d {
            Decision::Report(e) => e,
            other => panic!("expected a report, got {other:?}"),
        }
    }

    #[test]
    fn nothing_to_do_without_a_release_or_when_it_runs_already() {
        assert_eq!(decide(None, "0.1.0", &[], true), Decision::Skip);
        assert_eq!(decide(Some(&want("0.1.0", false)), "0.1.0", &[], true), Decision::Skip);
        // Even outside the launcher and with a stale failure record: nothing to switch.
        assert_eq!(
            decide(Some(&want("0.1.0", false)), "0.1.0", &[failed("0.1.0")], false),
            Decision::Skip
        );
    }

    #[test]
    fn newer_versions_are_installed_under_the_launcher() {
        let d = decide(Some(&want("0.2.0", false)), "0.1.0", &[failed("0.1.5")], true);
        assert_eq!(
            d,
            Decision::Upgrade(Plan {
                current: Version::new(0, 1, 0),
                version: Version::new(0, 2, 0),
                step: UpgradeStep::Upgrade,
            })
        );
    }

    #[test]
    fn a_version_this_host_rolled_back_is_reported_not_retried() {
        let e = error_of(decide(Some(&want("0.2.0", false)), "0.1.0", &[failed("0.2.0")], true));
        assert!(e.starts_with("upgrade to 0.2.0: "), "{e}");
        assert!(
            e.contains("rolled back 0.2.0") && e.contains("exited 1 before ready"),
            "{e}"
        );
        assert!(e.contains("new version"), "says what to do: {e}");
    }

    #[test]
    fn outside_the_launcher_the_unit_must_change() {
        let e = error_of(decide(Some(&want("0.2.0", false)), "0.1.0", &[], false));
        assert_eq!(
            e,
            "upgrade to 0.2.0: this agent was not started by `nimbus-agent launch`, so it cannot switch versions; \
             update the unit's ExecStart"
        );
    }

    #[test]
    fn downgrades_need_the_rollouts_permission() {
        let e = error_of(decide(Some(&want("0.1.0", false)), "0.2.0", &[], true));
        assert!(
            e.starts_with("upgrade to 0.1.0: refusing") && e.contains("--allow-downgrade"),
            "{e}"
        );
        match decide(Some(&want("0.1.0", true)), "0.2.0", &[], true) {
            Decision::Upgrade(p) => assert_eq!(p.step, UpgradeStep::Downgrade),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn versions_that_are_not_semver_are_reported() {
        let e = error_of(decide(Some(&want("latest", false)), "0.1.0", &[], true));
        assert!(
            e.starts_with("upgrade to latest: \"latest\" is not a semantic version"),
            "{e}"
        );
        let e = error_of(decide(Some(&want("0.2.0", false)), "dev", &[], true));
        assert!(e.contains("own version \"dev\""), "{e}");
    }

    #[test]
    fn release_urls_must_be_http_on_the_coordinator() {
        let ip = [Ipv4Addr::new(100, 64, 0, 1)];
        assert_eq!(
            check_url("metadata_url", "http://100.64.0.1:7001/metadata", &ip)
                .unwrap()
                .as_str(),
            "http://100.64.0.1:7001/metadata/"
        );
        for (url, why) in [
            ("https://100.64.0.1:7001/metadata/", "is not http://"),
            ("http://192.0.2.9:7001/metadata/", "overlay address"),
            ("http://evil.example/metadata/", "overlay address"),
            ("http://u:p@100.64.0.1:7001/metadata/", "credentials"),
            ("http://100.64.0.1:7001/metadata/?x=1", "query"),
            ("not a url", "is not a URL"),
        ] {
            let e = check_url("metadata_url", url, &ip).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("100.64.0.1"), "{url}: {e}");
        }
    }

    #[test]
    fn release_urls_may_name_any_current_replica_and_nothing_else() {
        let hosts = ReleaseHosts::new([Ipv4Addr::new(100, 64, 0, 2), Ipv4Addr::new(100, 64, 0, 1)]);
        let shared = hosts.clone();
        for url in ["http://100.64.0.1:7001/metadata/", "http://100.64.0.2:7001/metadata/"] {
            assert!(check_url("metadata_url", url, &shared.get()).is_ok(), "{url}");
        }
        let e = check_url("metadata_url", "http://100.64.0.3:7001/metadata/", &shared.get())
            .unwrap_err()
            .to_string();
        assert!(e.contains("100.64.0.1 or 100.64.0.2"), "{e}");
        // The replica set changed: a replica that left is no longer allowed, its successor is (in every clone).
        hosts.set([Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 3)]);
        assert!(check_url("metadata_url", "http://100.64.0.3:7001/metadata/", &shared.get()).is_ok());
        assert!(check_url("metadata_url", "http://100.64.0.2:7001/metadata/", &shared.get()).is_err());
        // An empty list allows nothing.
        let e = check_url("metadata_url", "http://100.64.0.1:7001/metadata/", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(none known)"), "{e}");
    }

    #[test]
    fn failed_releases_come_from_the_upgrade_record() {
        let dir = tempfile::tempdir().unwrap();
        assert!(failed_releases(dir.path()).is_empty());
        let st = versions::UpgradeState {
            failed: vec![failed("0.2.0")],
            ..Default::default()
        };
        std::fs::write(
            dir.path().join(versions::UPGRADE_FILE),
            serde_json::to_vec(&st).unwrap(),
        )
        .unwrap();
        assert_eq!(
            failed_releases(dir.path()),
            vec![FailedRelease {
                version: "0.2.0".into(),
                reason: "exited 1 before ready".into(),
                at_unix: 1_767_323_045,
            }]
        );
    }

    // ---- the executor against a real repository served on loopback ----

    const ARCH: &str = "x86_64";

    /// A release repository with `versions` published as fake binaries, served on 127.0.0.1.
    struct Repo {
        dir: tempfile::TempDir,
        addr: SocketAddr,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    impl Repo {
        async fn new(versions: &[&str]) -> Repo {
            let dir = tempfile::tempdir().unwrap();
            let root_key = dir.path().join("offline/root.pem");
            keys::generate_key(&root_key).unwrap();
            let online = OnlineKeys::generate(&dir.path().join("keys")).unwrap();
            let repo = dir.path().join("repo");
            repo::init(&root_key, &online, &repo, &Expiries::default())
                .await
                .unwrap();
            for v in versions {
                let file = dir.path().join(format!("build/nimbus-agent-{v}-{ARCH}"));
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, format!("#!/bin/sh\necho fake agent {v}\n")).unwrap();
                let rel = release::AgentRelease {
                    version: Version::parse(v).unwrap(),
                    kind: ArtefactKind::Binary,
                    arch: ARCH.into(),
                };
                repo::add_target(&repo, &online, &file, &rel, &Expiries::default())
                    .await
                    .unwrap();
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = Arc::new(release::RepoServer::new(&repo));
            tokio::spawn(release::serve::serve(listener, server, async move {
                let _ = stopped.await;
            }));
            Repo { dir, addr, _stop: stop }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("repo/metadata/1.root.json")
        }

        fn request(&self, generation: u64, version: &str, allow_downgrade: bool) -> Request {
            Request {
                generation,
                policy_revision: 7,
                release: nimbus_proto::AgentRelease {
                    version: version.into(),
                    target: format!("nimbus-agent-{version}-{ARCH}"),
                    metadata_url: format!("http://{}/metadata/", self.addr),
                    targets_url: format!("http://{}/targets/", self.addr),
                    allow_downgrade,
                },
            }
        }

        /// An executor for a fresh state dir, running `running` under the launcher.
        fn executor(&self, state: &Path, running: &str) -> Executor {
            let mut ex = Executor::new(
                state.to_path_buf(),
                self.root(),
                ReleaseHosts::new([Ipv4Addr::LOCALHOST]),
            );
            ex.running = running.into();
            ex.under_launcher = true;
            ex.arch = ARCH.into();
            ex.timeout = Duration::from_secs(60);
            ex.transport = HttpConfig {
                connect_timeout: Duration::from_secs(5),
                read_timeout: Duration::from_secs(5),
                max_retries: 2,
                retry_backoff: Duration::from_millis(10),
            };
            ex
        }
    }

    fn report_error(o: Outcome) -> String {
        match o {
            Outcome::Report(obs) => {
                assert_eq!(obs.policy_revision, 7);
                obs.error
            }
            other => panic!("expected a report, got {other:?}"),
        }
    }

    fn nothing_staged(state: &Path) {
        assert!(!state.join(versions::VERSIONS_DIR).exists(), "nothing may be staged");
        assert!(versions::linked_version(state).is_none(), "current must not move");
    }

    #[tokio::test]
    async fn a_fetch_from_a_dead_replica_gives_way_to_the_same_release_offered_elsewhere() {
        let repo = Repo::new(&["0.2.0"]).await;
        // A "replica" that accepts connections and never answers (it died with the sockets half open).
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.1.0");
        let mut stuck = repo.request(4, "0.2.0", false);
        stuck.release.metadata_url = format!("http://{dead_addr}/metadata/");
        stuck.release.targets_url = format!("http://{dead_addr}/targets/");
        let started = std::time::Instant::now();
        let out = ex
            .execute_until(&stuck, tokio::time::sleep(Duration::from_millis(300)))
            .await;
        assert!(matches!(out, Outcome::Nothing), "given up without a report: {out:?}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "at once, not after the transport's retries"
        );
        nothing_staged(state.path());
        // The same release from the live replica then installs.
        let out = ex.execute(&repo.request(4, "0.2.0", false)).await;
        assert!(matches!(out, Outcome::Restart { .. }), "{out:?}");
        drop(dead);
    }

    #[tokio::test]
    async fn an_upgrade_is_verified_staged_activated_and_asks_for_a_restart() {
        let repo = Repo::new(&["0.1.1", "0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.1.0");
        let out = ex.execute(&repo.request(4, "0.2.0", false)).await;
        let Outcome::Restart { version, observed } = out else {
            panic!("expected a restart, got {out:?}");
        };
        assert_eq!(version, "0.2.0");
        assert_eq!(
            (observed.generation, observed.policy_revision, observed.error.as_str()),
            (4, 7, "")
        );
        assert_eq!(
            crate::run::Stopped::Restart { version }.exit_code(),
            crate::error::EXIT_RESTART,
            "the agent exits 75"
        );
        // Staged byte for byte, current switched, pending until the launcher sees READY.
        let v = versions::AgentVersion::parse("0.2.0").unwrap();
        let bin = versions::binary_path(state.path(), &v);
        assert_eq!(
            std::fs::read_to_string(&bin).unwrap(),
            "#!/bin/sh\necho fake agent 0.2.0\n"
        );
        assert_eq!(versions::linked_version(state.path()), Some(v.clone()));
        let st = versions::load(state.path()).unwrap();
        assert_eq!(st.current, versions::Slot::Version(v.clone()));
        assert_eq!(st.previous, Some(versions::Slot::Package));
        assert_eq!(st.pending.map(|p| p.version), Some(v));
        // The download is gone; the verified metadata is kept for rollback protection.
        let downloads: Vec<_> = std::fs::read_dir(state.path().join(DOWNLOADS_DIR)).unwrap().collect();
        assert!(downloads.is_empty(), "{downloads:?}");
        assert!(state.path().join(RELEASES_DIR).join("timestamp.json").exists());
    }

    #[tokio::test]
    async fn without_the_right_pinned_root_nothing_is_installed() {
        let repo = Repo::new(&["0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();

        // None pinned.
        let mut ex = repo.executor(state.path(), "0.1.0");
        ex.release_root = state.path().join("absent-root.json");
        let e = report_error(ex.execute(&repo.request(4, "0.2.0", false)).await);
        assert!(
            e.starts_with(&format!(
                "upgrade to 0.2.0: no release root pinned at {}: install the repository's 1.root.json there",
                ex.release_root.display()
            )),
            "{e}"
        );
        nothing_staged(state.path());

        // Another repository's root: its keys did not sign this metadata.
        let other = Repo::new(&[]).await;
        let mut ex = repo.executor(state.path(), "0.1.0");
        ex.release_root = other.root();
        let e = report_error(ex.execute(&repo.request(4, "0.2.0", false)).await);
        assert!(e.starts_with("upgrade to 0.2.0: release metadata refused"), "{e}");
        nothing_staged(state.path());
    }

    #[tokio::test]
    async fn a_downgrade_is_refused_unless_allowed() {
        let repo = Repo::new(&["0.1.1", "0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.2.0");
        let e = report_error(ex.execute(&repo.request(5, "0.1.1", false)).await);
        assert!(e.contains("refusing to install agent 0.1.1 over 0.2.0"), "{e}");
        nothing_staged(state.path());
        let out = ex.execute(&repo.request(6, "0.1.1", true)).await;
        assert!(
            matches!(&out, Outcome::Restart { version, .. } if version == "0.1.1"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_version_rolled_back_here_is_not_fetched_again() {
        let repo = Repo::new(&["0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.1.0");
        assert!(matches!(
            ex.execute(&repo.request(4, "0.2.0", false)).await,
            Outcome::Restart { .. }
        ));
        // The launcher gives up on it (the new binary never became ready) and goes back to the package binary.
        versions::fail_and_roll_back(state.path(), "not ready within 120s").unwrap();
        std::fs::remove_dir_all(state.path().join(RELEASES_DIR)).unwrap();
        let e = report_error(ex.execute(&repo.request(5, "0.2.0", false)).await);
        assert!(
            e.contains("rolled back 0.2.0") && e.contains("not ready within 120s"),
            "{e}"
        );
        assert!(
            !state.path().join(RELEASES_DIR).exists(),
            "nothing was loaded from the repository"
        );
        assert_eq!(failed_releases(state.path())[0].version, "0.2.0");
        assert!(versions::linked_version(state.path()).is_none());
    }

    #[tokio::test]
    async fn the_signed_release_must_match_what_the_desired_state_says() {
        let repo = Repo::new(&["0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.1.0");
        // The desired state claims 0.3.0 but names the 0.2.0 artefact.
        let mut req = repo.request(4, "0.3.0", false);
        req.release.target = format!("nimbus-agent-0.2.0-{ARCH}");
        let e = report_error(ex.execute(&req).await);
        assert!(
            e.contains("is signed as version 0.2.0") && e.contains("needs version 0.3.0"),
            "{e}"
        );
        // Another architecture.
        ex.arch = "aarch64".into();
        let e = report_error(ex.execute(&repo.request(4, "0.2.0", false)).await);
        assert!(e.contains("arch x86_64") && e.contains("arch aarch64"), "{e}");
        // Not published at all.
        ex.arch = ARCH.into();
        let e = report_error(ex.execute(&repo.request(4, "0.4.0", false)).await);
        assert!(e.contains("is not in the signed release metadata"), "{e}");
        // URLs off the coordinator's address are not even tried.
        ex.release_hosts.set([Ipv4Addr::new(100, 64, 0, 1)]);
        let e = report_error(ex.execute(&repo.request(4, "0.2.0", false)).await);
        assert!(e.contains("overlay address 100.64.0.1"), "{e}");
        nothing_staged(state.path());
    }

    #[tokio::test]
    async fn a_binary_that_is_not_the_version_it_claims_does_not_loop() {
        let repo = Repo::new(&["0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.1.0");
        assert!(matches!(
            ex.execute(&repo.request(4, "0.2.0", false)).await,
            Outcome::Restart { .. }
        ));
        versions::confirm(state.path(), "0.2.0").unwrap();
        // The launcher now starts 0.2.0's binary, but it reports 0.1.0.
        let e = report_error(ex.execute(&repo.request(4, "0.2.0", false)).await);
        assert!(e.contains("not a build of 0.2.0"), "{e}");
    }

    #[tokio::test]
    async fn a_failed_upgrade_stays_on_the_reports_of_its_generation() {
        let repo = Repo::new(&["0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let mut ex = repo.executor(state.path(), "0.1.0");
        ex.under_launcher = false;
        let (handle, mut outcomes) = spawn(ex);
        let last = handle.last_error();
        let desired = DesiredState {
            generation: 4,
            agent: Some(repo.request(4, "0.2.0", false).release),
            ..Default::default()
        };
        handle.ready();
        handle.offer(&desired);
        let out = tokio::time::timeout(Duration::from_secs(30), outcomes.recv())
            .await
            .unwrap()
            .unwrap();
        let Outcome::Report(reported) = out else {
            panic!("{out:?}")
        };
        assert!(reported.error.contains("nimbus-agent launch"), "{reported:?}");
        // A storage report of generation 4 carries it; one of another generation or with its own error does not.
        let mut storage = ObservedState {
            generation: 4,
            ..Default::default()
        };
        last.apply(&mut storage);
        assert_eq!(storage.error, reported.error);
        let mut other = ObservedState {
            generation: 5,
            ..Default::default()
        };
        last.apply(&mut other);
        assert_eq!(other.error, "");
        let mut own = ObservedState {
            generation: 4,
            error: "storage: mkfs failed".into(),
            ..Default::default()
        };
        last.apply(&mut own);
        assert_eq!(own.error, "storage: mkfs failed");
        // The next desired state names no release: the error is gone.
        handle.offer(&DesiredState {
            generation: 5,
            ..Default::default()
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let mut o = ObservedState {
                    generation: 4,
                    ..Default::default()
                };
                last.apply(&mut o);
                if o.error.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        nothing_staged(state.path());
    }

    #[tokio::test]
    async fn the_task_starts_after_ready_and_takes_the_newest_desired_state() {
        let repo = Repo::new(&["0.2.0"]).await;
        let state = tempfile::tempdir().unwrap();
        let ex = repo.executor(state.path(), "0.1.0");
        let (handle, mut outcomes) = spawn(ex);
        let desired = |generation, version: &str| DesiredState {
            generation,
            agent: Some(repo.request(generation, version, false).release),
            ..Default::default()
        };
        handle.offer(&desired(3, "0.9.9"));
        handle.offer(&desired(4, "0.2.0"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(outcomes.try_recv().is_err(), "nothing before ready");
        nothing_staged(state.path());
        handle.ready();
        let out = tokio::time::timeout(Duration::from_secs(30), outcomes.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&out, Outcome::Restart { version, observed } if version == "0.2.0" && observed.generation == 4),
            "{out:?}"
        );
        assert!(outcomes.recv().await.is_none(), "the task ends after a restart");
    }
}
