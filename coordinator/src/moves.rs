//! Nodes of a rollout that leave a cluster (to another environment, or out of every environment) are drained
//! there through the Kubernetes API — cordon, evictions that respect PodDisruptionBudgets, delete the Node
//! object — before they are told their new desired state (on which the agent runs `kubeadm reset` and, for a
//! new environment, joins again).
//!
//! The rollout record lists such nodes in `draining` (persisted), so a restarted coordinator drains them again
//! (every step is idempotent: a Node already gone counts as drained). A drain that fails or outlives its
//! deadline marks the node failed, which pauses the rollout; the node keeps its old place.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_kube::KubeError;
use nimbus_kube::cluster::KubeCluster;

use crate::context::Ctx;

/// Longest one node's drain may take.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the rollout record is checked for nodes to drain.
const POLL: Duration = Duration::from_secs(1);

/// Drains the rollout's `draining` nodes (each once at a time) until shutdown.
pub async fn run(ctx: Arc<Ctx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let draining = match ctx
            .state(|s| Ok(s.rollout()?.map(|r| r.draining).unwrap_or_default()))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e.message(), "rollout not readable; drains wait");
                continue;
            }
        };
        for (id, server) in draining {
            let fresh = running.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone());
            if !fresh {
                continue;
            }
            let (ctx, running) = (Arc::clone(&ctx), Arc::clone(&running));
            tokio::spawn(async move {
                drain_one(&ctx, &id, &server).await;
                running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            });
        }
    }
}

async fn drain_one(ctx: &Ctx, id: &str, server: &str) {
    let (lookup, srv) = (id.to_string(), server.to_string());
    let found = ctx
        .state(move |s| Ok((s.node(&lookup)?.map(|n| n.name), s.cluster_for_endpoint(&srv)?)))
        .await;
    let (name, cluster) = match found {
        Ok((Some(name), cluster)) => (name, cluster),
        Ok((None, _)) => return,
        Err(e) => {
            tracing::warn!(node_id = %id, error = %e.message(), "drain postponed: state not readable");
            return;
        }
    };
    let result = match cluster {
        None => {
            tracing::warn!(node = %name, %server, "no API access to the node's old cluster any more: moving it without a drain");
            Ok(())
        }
        Some((env, kubeconfig)) => drain(&name, &env, &kubeconfig).await,
    };
    let lookup = id.to_string();
    let done = match result {
        Ok(()) => ctx.singleton(move |s| s.finish_drain(&lookup)).await,
        Err(reason) => {
            tracing::error!(node = %name, %server, %reason, "drain failed: the node stays where it is and the rollout pauses");
            ctx.singleton(move |s| s.drain_failed(&lookup, &reason)).await
        }
    };
    match done {
        Ok(pushed) => crate::placement::push(ctx, pushed).await,
        Err(e) => tracing::warn!(node = %name, error = %e.message(), "drain result not stored; retried"),
    }
}

async fn drain(name: &str, env: &str, kubeconfig: &str) -> Result<(), String> {
    let cluster = KubeCluster::from_kubeconfig(kubeconfig)
        .await
        .map_err(|e| format!("cannot reach the cluster of environment {env}: {e}"))?;
    match nimbus_kube::cluster::decommission(&cluster, name, DRAIN_TIMEOUT).await {
        Ok(report) => {
            tracing::info!(
                node = name,
                environment = env,
                evicted = report.evicted.len(),
                daemonset_pods_left = report.skipped_daemonset.len(),
                "node drained and removed from its old cluster"
            );
            Ok(())
        }
        Err(KubeError::NodeNotFound { .. }) => {
            tracing::info!(
                node = name,
                environment = env,
                "node not in its old cluster (any more): nothing to drain"
            );
            Ok(())
        }
        Err(e) => Err(format!("drain from environment {env}: {e}")),
    }
}
