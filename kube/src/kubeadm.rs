//! Running `kubeadm` on the agent: the join state of this host, `kubeadm join --config FILE`,
//! `kubeadm reset --force`, and [`Kubeadm::ensure_joined`] which ties them together idempotently.
//!
//! kubeadm's output is streamed into the log line by line (target `nimbus_kube::kubeadm`), the token
//! redacted. kubeadm prefixes its steps with the phase name (`[preflight]`, `[kubelet-start]`, ...) and names
//! the failing one in `error execution phase <name>: ...`: [`JoinReport::last_phase`] and
//! [`KubeError::JoinFailed`]'s `phase` come from those.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::KubeError;
use crate::join::{self, ApiVersion, JoinParams};
use crate::token::{self, BootstrapToken};

/// Lines of kubeadm output kept for reports and errors.
pub const TAIL_LINES: usize = 30;

/// Default kubeadm binary: looked up on `PATH`.
pub const DEFAULT_BINARY: &str = "kubeadm";
/// Default kubeadm directory (kubeadm's constant).
pub const DEFAULT_KUBERNETES_DIR: &str = "/etc/kubernetes";
/// Default kubelet state directory (where `kubeadm join` writes `config.yaml` and `kubeadm-flags.env`).
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// Default marker of a failed join (written by [`Kubeadm::join`], removed by a successful join or reset).
pub const DEFAULT_FAILURE_MARKER: &str = "/var/lib/polynimbus/kubeadm-join-failed";

/// How to run kubeadm, and where it leaves its traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubeadm {
    /// The kubeadm executable. Default `kubeadm` (from `PATH`).
    pub binary: PathBuf,
    /// kubeadm's directory. Default `/etc/kubernetes`.
    pub kubernetes_dir: PathBuf,
    /// The kubelet's state directory. Default `/var/lib/kubelet`.
    pub kubelet_dir: PathBuf,
    /// Marker file recording that the last join failed. Default `/var/lib/polynimbus/kubeadm-join-failed`.
    pub failure_marker: PathBuf,
}

impl Default for Kubeadm {
    fn default() -> Self {
        Kubeadm {
            binary: DEFAULT_BINARY.into(),
            kubernetes_dir: DEFAULT_KUBERNETES_DIR.into(),
            kubelet_dir: DEFAULT_KUBELET_DIR.into(),
            failure_marker: DEFAULT_FAILURE_MARKER.into(),
        }
    }
}

/// Whether this host is part of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinState {
    /// `kubelet.conf` exists and points at the expected API server.
    Joined {
        /// The server URL in `kubelet.conf`.
        server: String,
    },
    /// No trace of a join.
    NotJoined,
    /// Traces of a join that did not finish (or of another cluster): reset before joining.
    HalfJoined {
        /// What was found.
        evidence: String,
    },
}

/// A successful `kubeadm join`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinReport {
    /// The last phase kubeadm printed (`kubelet-start`, ...).
    pub last_phase: Option<String>,
    /// The last lines of output, token redacted.
    pub output_tail: Vec<String>,
}

/// The result of [`Kubeadm::ensure_joined`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The host was joined already; nothing was run.
    AlreadyJoined {
        /// The server in `kubelet.conf`.
        server: String,
    },
    /// kubeadm joined the host.
    Joined {
        /// Which attempt succeeded (1 = first).
        attempts: u32,
        /// kubeadm's report.
        report: JoinReport,
    },
}

/// Retries of [`Kubeadm::ensure_joined`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Join attempts in all (at least 1). Default 5.
    pub attempts: u32,
    /// Wait after the first failure; doubled after each. Default 10 s.
    pub initial_backoff: Duration,
    /// Longest wait. Default 5 min.
    pub max_backoff: Duration,
    /// Limit for one `kubeadm join` or `kubeadm reset` run. Default 10 min (kubeadm's own discovery and TLS
    /// bootstrap timeouts are 5 and 4 min).
    pub step_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            step_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Deserialize)]
struct KubeconfigClusters {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
}

#[derive(Deserialize)]
struct NamedCluster {
    cluster: ClusterEntry,
}

#[derive(Deserialize)]
struct ClusterEntry {
    #[serde(default)]
    server: String,
}

struct RunOutput {
    exit: Option<i32>,
    last_phase: Option<String>,
    tail: Vec<String>,
}

impl Kubeadm {
    /// Defaults with this kubeadm binary.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Kubeadm {
            binary: binary.into(),
            ..Kubeadm::default()
        }
    }

    /// This host's join state with respect to `api_endpoint` (`host:port`, or a URL):
    /// - `Joined` when `kubelet.conf` exists and a cluster in it has that server;
    /// - `HalfJoined` when `kubelet.conf` names another server or cannot be read, or, without `kubelet.conf`,
    ///   when `pki/ca.crt`, `bootstrap-kubelet.conf`, the kubelet's `config.yaml`/`kubeadm-flags.env`, or the
    ///   failure marker exist;
    /// - `NotJoined` otherwise.
    pub fn state(&self, api_endpoint: &str) -> JoinState {
        let kubelet_conf = self.kubernetes_dir.join("kubelet.conf");
        if kubelet_conf.exists() {
            let servers = match std::fs::read_to_string(&kubelet_conf)
                .map_err(|e| e.to_string())
                .and_then(|s| serde_norway::from_str::<KubeconfigClusters>(&s).map_err(|e| e.to_string()))
            {
                Ok(k) => k.clusters.into_iter().map(|c| c.cluster.server).collect::<Vec<_>>(),
                Err(e) => {
                    return JoinState::HalfJoined {
                        evidence: format!("{} exists but cannot be read: {e}", kubelet_conf.display()),
                    };
                }
            };
            let want = normalize_server(api_endpoint);
            if let Some(server) = servers.iter().find(|s| normalize_server(s) == want) {
                if self.failure_marker.exists() {
                    // kubelet.conf of the right cluster and a failed join: the last join got far. Trust
                    // kubelet.conf (kubeadm writes it at the end of kubelet-start) but say so.
                    tracing::info!(marker = %self.failure_marker.display(), "kubelet.conf present despite a failure marker");
                }
                return JoinState::Joined { server: server.clone() };
            }
            return JoinState::HalfJoined {
                evidence: format!(
                    "{} points at {} instead of {api_endpoint}",
                    kubelet_conf.display(),
                    if servers.is_empty() {
                        "no server".to_owned()
                    } else {
                        servers.join(", ")
                    }
                ),
            };
        }
        let traces = [
            self.kubernetes_dir.join("pki/ca.crt"),
            self.kubernetes_dir.join("bootstrap-kubelet.conf"),
            self.kubelet_dir.join("config.yaml"),
            self.kubelet_dir.join("kubeadm-flags.env"),
        ];
        let mut found: Vec<String> = traces
            .iter()
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect();
        if self.failure_marker.exists() {
            found.push(format!("the last join failed ({})", self.failure_marker.display()));
        }
        if found.is_empty() {
            JoinState::NotJoined
        } else {
            JoinState::HalfJoined {
                evidence: format!("no kubelet.conf, but {}", found.join(", ")),
            }
        }
    }

    /// Runs `kubeadm join --config <config>`, streaming its output into the log (token redacted). On failure
    /// (non-zero exit, or killed after `timeout`) writes the failure marker and returns
    /// [`KubeError::JoinFailed`] with the failing phase and the redacted tail; on success removes the marker.
    pub async fn join(
        &self,
        config: &Path,
        token: &BootstrapToken,
        timeout: Duration,
    ) -> Result<JoinReport, KubeError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("join").arg("--config").arg(config);
        tracing::info!(binary = %self.binary.display(), config = %config.display(), token = %token, "running kubeadm join");
        let out = self.run(cmd, "join", Some(token), timeout).await?;
        if out.exit == Some(0) {
            self.clear_failure_marker();
            tracing::info!(last_phase = ?out.last_phase, "kubeadm join succeeded");
            Ok(JoinReport {
                last_phase: out.last_phase,
                output_tail: out.tail,
            })
        } else {
            self.write_failure_marker(out.last_phase.as_deref(), out.exit);
            tracing::warn!(phase = ?out.last_phase, exit = ?out.exit, "kubeadm join failed");
            Err(KubeError::JoinFailed {
                phase: out.last_phase,
                exit: out.exit,
                tail: out.tail,
            })
        }
    }

    /// Runs `kubeadm reset --force`; on success removes the failure marker.
    pub async fn reset(&self, timeout: Duration) -> Result<(), KubeError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("reset").arg("--force");
        tracing::info!(binary = %self.binary.display(), "running kubeadm reset --force");
        let out = self.run(cmd, "reset", None, timeout).await?;
        if out.exit == Some(0) {
            self.clear_failure_marker();
            Ok(())
        } else {
            Err(KubeError::ResetFailed {
                exit: out.exit,
                tail: out.tail,
            })
        }
    }

    /// `kubeadm version -o short` (e.g. `v1.31.2`); feed it to [`ApiVersion::for_kubeadm_version`].
    pub async fn version(&self, timeout: Duration) -> Result<String, KubeError> {
        let command = format!("{} version -o short", self.binary.display());
        let mut cmd = Command::new(&self.binary);
        cmd.args(["version", "-o", "short"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(timeout, cmd.output()).await {
            Err(_) => {
                return Err(KubeError::Command {
                    command,
                    reason: format!("no answer within {timeout:?}"),
                });
            }
            Ok(Err(source)) => {
                return Err(KubeError::Spawn {
                    program: self.binary.clone(),
                    source,
                });
            }
            Ok(Ok(o)) => o,
        };
        if !out.status.success() {
            return Err(KubeError::Command {
                command,
                reason: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Joins this host unless it is joined already, idempotently:
    /// 1. [`state`](Self::state) is `Joined` → [`JoinOutcome::AlreadyJoined`], nothing run;
    /// 2. `HalfJoined` → `kubeadm reset --force` first;
    /// 3. render the configuration for `version`, [`join::write_config`] it to `config_path` (0600), run
    ///    `kubeadm join`, and delete the file (it holds the token) whatever happened;
    /// 4. on [`KubeError::JoinFailed`], wait (backoff doubling from `policy.initial_backoff` up to
    ///    `policy.max_backoff`), get a fresh token from `fresh_token(attempt)` (attempt = 2, 3, ...), and go
    ///    back to 2, up to `policy.attempts` attempts. The first attempt uses `params.token`.
    ///
    /// Other errors (invalid parameters, kubeadm missing, reset failing, `fresh_token` failing) end at once.
    pub async fn ensure_joined<F, Fut>(
        &self,
        params: &JoinParams,
        version: ApiVersion,
        config_path: &Path,
        policy: &RetryPolicy,
        mut fresh_token: F,
    ) -> Result<JoinOutcome, KubeError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<BootstrapToken, KubeError>>,
    {
        // Refuse bad parameters before touching the host.
        join::render(params, version)?;
        let attempts = policy.attempts.max(1);
        let mut backoff = policy.initial_backoff;
        let mut token = params.token.clone();
        let mut attempt = 1;
        loop {
            match self.state(&params.api_endpoint) {
                JoinState::Joined { server } => {
                    if attempt == 1 {
                        tracing::info!(%server, "node already joined; not running kubeadm join");
                    } else {
                        // A failed attempt got as far as kubelet.conf for the right cluster: kubeadm did join.
                        tracing::info!(%server, "kubelet.conf present after a failed join attempt; treating as joined");
                    }
                    return Ok(JoinOutcome::AlreadyJoined { server });
                }
                JoinState::HalfJoined { evidence } => {
                    tracing::warn!(%evidence, "half-joined node; running kubeadm reset --force before joining");
                    self.reset(policy.step_timeout).await?;
                }
                JoinState::NotJoined => {}
            }
            let p = JoinParams {
                token: token.clone(),
                ..params.clone()
            };
            let yaml = join::render(&p, version)?;
            join::write_config(config_path, &yaml)?;
            let result = self.join(config_path, &token, policy.step_timeout).await;
            if let Err(e) = std::fs::remove_file(config_path) {
                tracing::warn!(path = %config_path.display(), error = %e, "could not delete the join configuration (it holds the token)");
            }
            match result {
                Ok(report) => {
                    return Ok(JoinOutcome::Joined {
                        attempts: attempt,
                        report,
                    });
                }
                Err(e @ KubeError::JoinFailed { .. }) if attempt < attempts => {
                    tracing::warn!(attempt, of = attempts, error = %e, backoff = ?backoff, "join attempt failed; retrying with a fresh token");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(policy.max_backoff);
                    attempt += 1;
                    token = fresh_token(attempt).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn run(
        &self,
        mut cmd: Command,
        what: &'static str,
        token: Option<&BootstrapToken>,
        timeout: Duration,
    ) -> Result<RunOutput, KubeError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| KubeError::Spawn {
            program: self.binary.clone(),
            source,
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(KubeError::Spawn {
                program: self.binary.clone(),
                source: std::io::Error::other("stdout/stderr pipes missing"),
            });
        };
        let mut out_lines = BufReader::new(stdout).lines();
        let mut err_lines = BufReader::new(stderr).lines();
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        let mut last_phase: Option<String> = None;
        let mut failed_phase: Option<String> = None;

        let stream = async {
            let (mut out_open, mut err_open) = (true, true);
            while out_open || err_open {
                let (line, stream) = tokio::select! {
                    l = out_lines.next_line(), if out_open => match l {
                        Ok(Some(l)) => (l, "stdout"),
                        _ => { out_open = false; continue; }
                    },
                    l = err_lines.next_line(), if err_open => match l {
                        Ok(Some(l)) => (l, "stderr"),
                        _ => { err_open = false; continue; }
                    },
                };
                let line = match token {
                    Some(t) => t.redact(&line),
                    None => token::scrub(&line),
                };
                if let Some(p) = failing_phase(&line) {
                    failed_phase = Some(p.to_owned());
                } else if let Some(p) = phase_prefix(&line) {
                    last_phase = Some(p.to_owned());
                }
                tracing::info!(target: "nimbus_kube::kubeadm", command = what, stream, "{line}");
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            child.wait().await
        };
        let finished = tokio::time::timeout(timeout, stream).await;
        let exit = match finished {
            Ok(Ok(status)) => status.code(),
            Ok(Err(e)) => {
                tracing::warn!(command = what, error = %e, "waiting for kubeadm failed");
                None
            }
            Err(_) => {
                tracing::warn!(command = what, ?timeout, "kubeadm did not finish in time; killing it");
                if let Err(e) = child.kill().await {
                    tracing::warn!(command = what, error = %e, "killing kubeadm failed");
                }
                None
            }
        };
        Ok(RunOutput {
            exit,
            last_phase: failed_phase.or(last_phase),
            tail: tail.into(),
        })
    }

    fn write_failure_marker(&self, phase: Option<&str>, exit: Option<i32>) {
        let body = format!(
            "phase={}\nexit={}\n",
            phase.unwrap_or(""),
            exit.map(|c| c.to_string()).unwrap_or_default()
        );
        let res = match self.failure_marker.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir),
            _ => Ok(()),
        }
        .and_then(|()| std::fs::write(&self.failure_marker, body));
        if let Err(e) = res {
            tracing::warn!(marker = %self.failure_marker.display(), error = %e, "could not record the failed join");
        }
    }

    fn clear_failure_marker(&self) {
        match std::fs::remove_file(&self.failure_marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(marker = %self.failure_marker.display(), error = %e, "could not remove the failure marker")
            }
        }
    }
}

/// `https://h:p/` → `h:p`, for comparing a kubeconfig server with an endpoint.
fn normalize_server(s: &str) -> String {
    let s = s.trim();
    let s = s.strip_prefix("https://").unwrap_or(s);
    s.trim_end_matches('/').to_ascii_lowercase()
}

/// `[kubelet-start] Writing ...` → `kubelet-start`. Only lower-case names: `[WARNING ...]` is not a phase.
pub fn phase_prefix(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (name, _) = rest.split_once(']')?;
    let mut bytes = name.bytes();
    let first = bytes.next()?;
    (first.is_ascii_lowercase()
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'/'))
    .then_some(name)
}

/// `error execution phase kubelet-start: ...` → `kubelet-start` (kubeadm's own word on what failed).
pub fn failing_phase(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once("error execution phase ")?;
    let (name, _) = rest.split_once(':')?;
    (!name.is_empty() && !name.contains(' ')).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases() {
        assert_eq!(phase_prefix("[preflight] Running pre-flight checks"), Some("preflight"));
        assert_eq!(
            phase_prefix("[kubelet-start] Starting the kubelet"),
            Some("kubelet-start")
        );
        assert_eq!(phase_prefix("\t[WARNING SystemVerification]: x"), None);
        assert_eq!(phase_prefix("This node has joined the cluster:"), None);
        assert_eq!(phase_prefix("[]"), None);
        assert_eq!(
            failing_phase("error execution phase kubelet-start: error uploading crisocket: timed out"),
            Some("kubelet-start")
        );
        assert_eq!(
            failing_phase("error execution phase control-plane-prepare/download-certs: boom"),
            Some("control-plane-prepare/download-certs")
        );
        assert_eq!(failing_phase("[preflight] fine"), None);
    }

    #[test]
    fn servers_compare_without_scheme() {
        assert_eq!(normalize_server("https://10.0.0.1:6443/"), "10.0.0.1:6443");
        assert_eq!(normalize_server("10.0.0.1:6443"), "10.0.0.1:6443");
    }
}
