//! Taking nodes out of the fleet (`nimbusctl node decommission`), one at a time: drain the node through its
//! environment's Kubernetes API (cordon, evictions, delete the Node object), have the agent run
//! `kubeadm reset`, revoke its keys, then free its overlay IP and name and leave an audit record. A step that
//! fails stops there (nothing later is done) and says what to do.

use std::time::{Duration, SystemTime};

use nimbus_kube::cluster::KubeCluster;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::{CoordinatorMessage, Decommission, DecommissionResult};
use policy::Credentials;

use crate::context::Ctx;
use crate::state::NodeStatus;

/// How long the agent has to confirm `kubeadm reset`.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(120);

/// Decommissions node `name`; `by` is the caller (for the audit record).
pub async fn one(ctx: &Ctx, name: &str, no_drain: bool, drain_timeout: Duration, by: &str) -> DecommissionResult {
    let mut steps = Vec::new();
    let outcome = run(ctx, name, no_drain, drain_timeout, by, &mut steps).await;
    match outcome {
        Ok(()) => DecommissionResult {
            node: name.to_string(),
            done: true,
            steps,
            error: String::new(),
        },
        Err(error) => {
            tracing::error!(node = %name, %error, ?steps, "decommission stopped");
            DecommissionResult {
                node: name.to_string(),
                done: false,
                steps,
                error,
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(
    ctx: &Ctx,
    name: &str,
    no_drain: bool,
    drain_timeout: Duration,
    by: &str,
    steps: &mut Vec<String>,
) -> Result<(), String> {
    let lookup = name.to_string();
    let node = ctx
        .state(move |s| s.node_by_name(&lookup))
        .await
        .map_err(|e| e.message().to_string())?
        .ok_or_else(|| format!("no node named `{name}`; list nodes with `nimbusctl nodes`"))?;
    let id = node.id.clone();
    let lookup = id.clone();
    let (desired, observed, policy) = ctx
        .state(move |s| Ok((s.desired(&lookup)?, s.observed(&lookup)?, s.current_policy()?)))
        .await
        .map_err(|e| e.message().to_string())?;
    let joined = observed.as_ref().is_some_and(|o| o.kubelet == "joined");

    // 1. Drain through the cluster's API.
    if !joined {
        steps.push("not joined to a cluster: nothing to drain".into());
    } else if no_drain {
        steps.push("drain skipped (--no-drain): the node's pods stop with it".into());
    } else {
        let env = desired
            .assignment
            .as_ref()
            .map(|a| a.environment.clone())
            .unwrap_or_default();
        let k = policy
            .as_ref()
            .and_then(|p| p.environment(&env))
            .map(|e| e.kubernetes.clone())
            .ok_or_else(|| format!("node {name} has no environment under the current policy; use --no-drain"))?;
        let Credentials::Kubeconfig(path) = &k.credentials else {
            return Err(format!(
                "cannot drain: environment {env} gives API access only through a bearer-token command, which \
                 this coordinator cannot use yet; give it a kubeconfig or use --no-drain"
            ));
        };
        let cluster = KubeCluster::from_kubeconfig(path).await.map_err(|e| {
            format!("cannot reach the cluster of {env} to drain: {e}; fix its kubeconfig or use --no-drain")
        })?;
        let report = nimbus_kube::cluster::decommission(&cluster, &node.name, drain_timeout)
            .await
            .map_err(|e| format!("drain of {name} failed: {e}"))?;
        steps.push(format!(
            "drained: {} pods evicted ({} DaemonSet and {} mirror pods left), Node object deleted",
            report.evicted.len(),
            report.skipped_daemonset.len(),
            report.skipped_mirror.len()
        ));
    }

    // 2. kubeadm reset on the node itself.
    if node.status == NodeStatus::Active {
        let asked_at = unix_now();
        let sent = crate::replicas::deliver(
            ctx,
            &id,
            CoordinatorMessage {
                msg: Some(CoordMsg::Decommission(Decommission {
                    reason: format!("decommissioned by {by}"),
                })),
            },
        );
        if sent {
            let deadline = tokio::time::Instant::now() + RESET_TIMEOUT;
            let storage_removed: Vec<String>;
            loop {
                let lookup = id.clone();
                let o = ctx.state(move |s| s.observed(&lookup)).await.ok().flatten();
                match o {
                    Some(o) if o.at >= asked_at && o.kubelet == "reset" => {
                        let removed: Vec<String> = o
                            .storage
                            .iter()
                            .filter(|v| v.state == "removed")
                            .map(|v| format!("{} ({})", v.name, v.detail))
                            .collect();
                        storage_removed = removed;
                        break;
                    }
                    Some(o) if o.at >= asked_at && o.kubelet == "failed" => {
                        return Err(format!("kubeadm reset on {name} failed: {}", o.join_error));
                    }
                    _ => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "{name} did not confirm kubeadm reset within {}s; check its agent log, then retry",
                        RESET_TIMEOUT.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            steps.push("kubeadm reset on the node, desired state forgotten".into());
            if !storage_removed.is_empty() {
                steps.push(format!(
                    "storage this project created removed: {}",
                    storage_removed.join("; ")
                ));
            }
        } else if joined {
            return Err(format!(
                "{name} is offline, so kubeadm reset cannot run on it; bring it back, or revoke it with \
                 `nimbusctl node revoke {name}` and reset the host by hand"
            ));
        } else {
            steps.push("node offline and never joined: nothing to reset".into());
        }

        // 3. Revoke its keys.
        crate::admin::revoke(ctx, name.to_string(), format!("decommissioned by {by}"))
            .await
            .map_err(|e| e.message().to_string())?;
        steps.push("keys revoked, WireGuard peer removed".into());
    } else {
        steps.push("already revoked".into());
    }

    // 4. Free its overlay IP and name; keep an audit record.
    let (n, record_steps, who) = (name.to_string(), steps.clone(), by.to_string());
    let freed = ctx
        .state(move |s| {
            let node = s.delete_node(&n)?;
            s.record_decommission(&node, &who, &record_steps)?;
            Ok(node)
        })
        .await
        .map_err(|e| e.message().to_string())?;
    steps.push(format!("overlay IP {} and name {} freed", freed.overlay_ip, freed.name));
    crate::placement::reconcile(ctx).await;
    tracing::warn!(node = %freed.name, node_id = %freed.id, %by, ?steps, "node decommissioned");
    Ok(())
}
