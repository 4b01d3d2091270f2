//! Kubelet join, agent side: when a desired state carries a `JoinInstruction`, join the environment's cluster
//! with `kubeadm join --config` (nimbus-kube: a JoinConfiguration written 0600 in the state dir with the node's
//! polynimbus.io labels and taints, an already-joined node left alone, a half-joined node reset first) and report
//! the kubelet joined or the failing kubeadm phase. One join at a time; a failure is reported and the
//! coordinator sends a fresh token a little later (a token is never reused for a second attempt).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nimbus_kube::join::{ApiVersion, JoinParams, Taint};
use nimbus_kube::kubeadm::{JoinOutcome, Kubeadm, RetryPolicy};
use nimbus_kube::token::BootstrapToken;
use nimbus_proto::{DesiredState, ObservedState};

/// Longest one kubeadm step may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// The join configuration (holds the token; removed after every attempt).
pub const CONFIG_FILE: &str = "kubeadm-join.yaml";
/// Written (0600) after a join this agent ran or confirmed: the API endpoint joined. It marks the join as
/// ours, so only a join we made is undone when the node leaves its environment, and a kubelet.conf removed by
/// hand is noticed (see `crate::drift`).
pub const JOINED_FILE: &str = "kubelet-joined.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Joined {
    server: String,
}

/// The API endpoint this agent joined the node to, if it did.
pub fn joined_server(state_dir: &Path) -> Option<String> {
    let bytes = std::fs::read(state_dir.join(JOINED_FILE)).ok()?;
    serde_json::from_slice::<Joined>(&bytes).ok().map(|j| j.server)
}

fn record_joined(state_dir: &Path, server: &str) {
    let body = serde_json::to_vec(&Joined {
        server: server.to_string(),
    })
    .unwrap_or_default();
    if let Err(e) = crate::identity::write_private(state_dir, JOINED_FILE, &body) {
        tracing::warn!(error = %e, "cannot record the join; a hand-made undo of it will not be noticed");
    }
}

/// Whether a join is running now.
pub fn running() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

/// Whether `d` takes the node out of every environment while a join of ours is in place (then it is undone
/// with `kubeadm reset`).
pub fn leaving(state_dir: &Path, d: &DesiredState) -> bool {
    d.generation > 0
        && d.placement.as_ref().is_none_or(|p| p.environment.is_empty())
        && joined_server(state_dir).is_some()
}

static RUNNING: AtomicBool = AtomicBool::new(false);

/// What a join needs, taken from a desired state; `None` when it asks for no join.
pub struct Job {
    params: JoinParams,
    version: ApiVersion,
    generation: u64,
    policy_revision: u64,
}

/// Reads the join request out of `d` (hostile input: the token and names are checked here).
pub fn job(node_name: &str, d: &DesiredState) -> Result<Option<Job>, String> {
    let Some(j) = &d.join else { return Ok(None) };
    let placement = d.placement.clone().unwrap_or_default();
    let token = BootstrapToken::parse(&j.token).map_err(|e| e.to_string())?;
    let version = match j.kubeadm_api.as_str() {
        "v1beta3" => ApiVersion::V1beta3,
        "v1beta4" | "" => ApiVersion::V1beta4,
        other => return Err(format!("unknown kubeadm API version {other:?}")),
    };
    Ok(Some(Job {
        params: JoinParams {
            node_name: node_name.to_string(),
            api_endpoint: j.api_endpoint.clone(),
            ca_cert_hashes: j.ca_cert_hashes.clone(),
            token,
            labels: placement.labels.into_iter().collect(),
            taints: placement
                .taints
                .into_iter()
                .map(|t| Taint {
                    key: t.key,
                    value: t.value,
                    effect: t.effect,
                })
                .collect(),
            kubelet_extra_args: Default::default(),
        },
        version,
        generation: d.generation,
        policy_revision: d.policy_revision,
    }))
}

/// Runs `job` in the background (unless a join is already running) and hands the report to `report`.
pub fn spawn<F>(kubeadm: Kubeadm, state_dir: PathBuf, job: Job, report: F)
where
    F: FnOnce(ObservedState) + Send + 'static,
{
    if RUNNING.swap(true, Ordering::SeqCst) {
        tracing::info!("a kubelet join is already running; this request waits for its result");
        return;
    }
    tokio::spawn(async move {
        let observed = run(&kubeadm, &state_dir, job).await;
        RUNNING.store(false, Ordering::SeqCst);
        report(observed);
    });
}

/// Why the join is undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// The node is decommissioned: also forget the desired state.
    Decommission,
    /// The node left every environment (desired state `generation`, `policy_revision`).
    Leave { generation: u64, policy_revision: u64 },
}

/// Undo the join (`kubeadm reset --force` when any trace of one exists) and report `kubelet: reset` (or
/// `failed` with the reason); on decommission also forget the desired state.
pub fn spawn_reset<F>(kubeadm: Kubeadm, state_dir: PathBuf, why: Reset, report: F)
where
    F: FnOnce(ObservedState) + Send + 'static,
{
    tokio::spawn(async move {
        let (generation, policy_revision) = match why {
            Reset::Decommission => (crate::desired::load(&state_dir).map_or(0, |r| r.generation), 0),
            Reset::Leave {
                generation,
                policy_revision,
            } => (generation, policy_revision),
        };
        let result = match kubeadm.state("") {
            nimbus_kube::kubeadm::JoinState::NotJoined => Ok(false),
            _ => kubeadm.reset(STEP_TIMEOUT).await.map(|()| true),
        };
        if result.is_ok() {
            let _ = std::fs::remove_file(state_dir.join(JOINED_FILE));
        }
        if why == Reset::Decommission {
            let _ = std::fs::remove_file(state_dir.join(crate::desired::DESIRED_FILE));
        }
        let (kubelet, join_error) = match result {
            Ok(ran) => {
                tracing::warn!(kubeadm_reset = ran, ?why, "kubelet join undone");
                ("reset", String::new())
            }
            Err(e) => {
                tracing::error!(error = %e, "decommission: kubeadm reset failed");
                ("failed", format!("kubeadm reset: {e}"))
            }
        };
        report(ObservedState {
            generation,
            policy_revision,
            error: String::new(),
            kubelet: kubelet.into(),
            join_error,
            ..Default::default()
        });
    });
}

async fn run(kubeadm: &Kubeadm, state_dir: &Path, job: Job) -> ObservedState {
    let policy = RetryPolicy {
        attempts: 1,
        step_timeout: STEP_TIMEOUT,
        ..RetryPolicy::default()
    };
    let given = job.params.token.clone();
    let mut handed = false;
    let outcome = kubeadm
        .ensure_joined(&job.params, job.version, &state_dir.join(CONFIG_FILE), &policy, |_| {
            let first = !handed;
            handed = true;
            let token = given.clone();
            async move {
                if first {
                    Ok(token)
                } else {
                    Err(nimbus_kube::KubeError::InvalidToken {
                        reason: "a retry needs a fresh token from the coordinator".into(),
                    })
                }
            }
        })
        .await;
    let (kubelet, join_error) = match outcome {
        Ok(JoinOutcome::AlreadyJoined { server }) => {
            tracing::info!(%server, "kubelet already joined");
            record_joined(state_dir, &job.params.api_endpoint);
            ("joined", String::new())
        }
        Ok(JoinOutcome::Joined { attempts, report }) => {
            tracing::info!(attempts, last_phase = ?report.last_phase, "kubelet joined");
            record_joined(state_dir, &job.params.api_endpoint);
            ("joined", String::new())
        }
        Err(e) => {
            tracing::error!(error = %e, "kubelet join failed; the coordinator sends a fresh token to retry");
            ("failed", e.to_string())
        }
    };
    ObservedState {
        generation: job.generation,
        policy_revision: job.policy_revision,
        error: String::new(),
        kubelet: kubelet.into(),
        join_error,
        kubelet_server: if kubelet == "joined" {
            job.params.api_endpoint.clone()
        } else {
            String::new()
        },
        drift_corrected: Vec::new(),
        storage: Vec::new(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::JoinInstruction;

    fn desired(token: &str, api: &str) -> DesiredState {
        DesiredState {
            generation: 3,
            policy_revision: 2,
            join: Some(JoinInstruction {
                api_endpoint: "10.0.0.10:6443".into(),
                ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
                token: token.into(),
                kubeadm_api: api.into(),
                token_expires_unix: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_join_request_is_checked_before_anything_runs() {
        assert!(job("n", &DesiredState::default()).unwrap().is_none(), "no join asked");
        let j = job("node-1", &desired("abcdef.0123456789abcdef", "v1beta3"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (j.generation, j.policy_revision, j.version),
            (3, 2, ApiVersion::V1beta3)
        );
        let bad = job("n", &desired("not-a-token", "v1beta4")).err().unwrap();
        assert!(!bad.contains("not-a-token"), "the error never repeats the token: {bad}");
        assert!(job("n", &desired("abcdef.0123456789abcdef", "v9")).is_err());
    }
}
