//! Node labels and taints in each environment's cluster, kept by the coordinator through the Kubernetes API.
//!
//! A joining kubelet registers its node with the policy's `polynimbus.io` labels and taints (from the
//! JoinConfiguration); after that only the API can change them. So for every node that is placed, whose
//! kubelet reported joined to its environment, and whose environment gives API access (`credentials:
//! kubeconfig`), the coordinator reconciles the Node object (`nimbus_kube::cluster::Cluster::reconcile_node`:
//! exactly the policy's `polynimbus.io` labels and taints, nothing else touched):
//! - soon after every apply, rollback or join (a kick), and
//! - every `cluster_sync_interval` (default 60 s), which reverts hand-made drift (`kubectl label` on our keys).
//!
//! Each node's last result ("in sync", "corrected: ...", "error: ...") is kept in memory for `nimbusctl node
//! show`, counted in `nimbus_cluster_node_syncs{result}`, and logged when something was corrected or failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_kube::cluster::{Cluster, KubeCluster, NodeReconcile};
use nimbus_kube::join::Taint;
use policy::Credentials;

use crate::context::Ctx;
use crate::metrics::ResultLabel;
use crate::state::{NodeStatus, State, StateError};

/// Longest one node's reconciliation may take.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// One node to keep in its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: String,
    pub name: String,
    pub kubeconfig: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

/// The last result per node id, and a kick to run soon.
#[derive(Default)]
pub struct ClusterSync {
    last: Mutex<HashMap<String, String>>,
    kick: tokio::sync::Notify,
}

impl ClusterSync {
    /// The node's last result ("" when never reconciled).
    pub fn status(&self, id: &str) -> String {
        self.lock().get(id).cloned().unwrap_or_default()
    }

    /// Asks for a reconciliation soon (after an apply, rollback or join).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    fn set(&self, id: &str, status: String) {
        self.lock().insert(id.to_string(), status);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every node whose labels and taints the coordinator keeps: active, placed, joined to its environment, whose
/// environment has a kubeconfig.
pub fn targets(s: &State) -> Result<Vec<Target>, StateError> {
    let Some(live) = s.live_placement()? else {
        return Ok(Vec::new());
    };
    let Some(policy) = s.policy_of(live.revision)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for n in s.list_nodes()? {
        if n.status != NodeStatus::Active {
            continue;
        }
        let Some(a) = s.desired(&n.id)?.assignment else {
            continue;
        };
        let Some(env) = policy.environment(&a.environment) else {
            continue;
        };
        let Credentials::Kubeconfig(path) = &env.kubernetes.credentials else {
            continue;
        };
        if !s
            .observed(&n.id)?
            .is_some_and(|o| o.joined_to(&env.kubernetes.api_endpoint))
        {
            continue;
        }
        out.push(Target {
            id: n.id,
            name: n.name,
            kubeconfig: path.clone(),
            labels: a.labels.clone(),
            taints: a
                .taints
                .iter()
                .map(|t| Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: crate::placement::taint_effect(t),
                })
                .collect(),
        });
    }
    Ok(out)
}

/// What a reconciliation changed, for the operator.
pub fn describe(r: &NodeReconcile) -> String {
    let mut parts = Vec::new();
    if !r.labels_set.is_empty() {
        parts.push(format!("labels set {}", r.labels_set.join(", ")));
    }
    if !r.labels_removed.is_empty() {
        parts.push(format!("labels removed {}", r.labels_removed.join(", ")));
    }
    let taints = |ts: &[Taint]| {
        ts.iter()
            .map(|t| format!("{}={}:{}", t.key, t.value, t.effect))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !r.taints_added.is_empty() {
        parts.push(format!("taints added {}", taints(&r.taints_added)));
    }
    if !r.taints_removed.is_empty() {
        parts.push(format!("taints removed {}", taints(&r.taints_removed)));
    }
    parts.join("; ")
}

/// Reconciles `targets` in `cluster`, recording each result in `sync` and `metrics`. Returns how many nodes
/// were corrected.
pub async fn reconcile_all(
    sync: &ClusterSync,
    metrics: &crate::metrics::Metrics,
    cluster: &impl Cluster,
    targets: &[Target],
) -> usize {
    let mut corrected = 0;
    for t in targets {
        let result = tokio::time::timeout(NODE_TIMEOUT, cluster.reconcile_node(&t.name, &t.labels, &t.taints)).await;
        let (label, status) = match result {
            Ok(Ok(r)) if r.changed() => {
                corrected += 1;
                let what = describe(&r);
                tracing::warn!(node = %t.name, changes = %what, "node labels/taints in the cluster corrected");
                ("corrected", format!("corrected: {what}"))
            }
            Ok(Ok(_)) => ("in_sync", "in sync".to_string()),
            Ok(Err(e)) => {
                tracing::warn!(node = %t.name, error = %e, "node labels/taints not reconciled; retried at the next sync");
                ("error", format!("error: {e}"))
            }
            Err(_) => {
                tracing::warn!(node = %t.name, "node labels/taints not reconciled in time; retried at the next sync");
                (
                    "error",
                    format!("error: no answer from the API server within {NODE_TIMEOUT:?}"),
                )
            }
        };
        metrics
            .cluster_syncs
            .get_or_create(&ResultLabel { result: label })
            .inc();
        sync.set(&t.id, status);
    }
    corrected
}

/// One pass over every target, grouped by kubeconfig. Returns how many nodes were corrected.
pub async fn sync_once(ctx: &Ctx) -> usize {
    let targets = match ctx.state(targets).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e.message(), "cluster sync skipped: state not readable");
            return 0;
        }
    };
    let mut by_cluster: BTreeMap<String, Vec<Target>> = BTreeMap::new();
    for t in targets {
        by_cluster.entry(t.kubeconfig.clone()).or_default().push(t);
    }
    let mut corrected = 0;
    for (kubeconfig, targets) in by_cluster {
        match KubeCluster::from_kubeconfig(&kubeconfig).await {
            Ok(cluster) => corrected += reconcile_all(&ctx.cluster_sync, &ctx.metrics, &cluster, &targets).await,
            Err(e) => {
                tracing::warn!(kubeconfig, error = %e, "cluster sync: cannot reach the cluster");
                for t in &targets {
                    ctx.metrics
                        .cluster_syncs
                        .get_or_create(&ResultLabel { result: "error" })
                        .inc();
                    ctx.cluster_sync.set(&t.id, format!("error: {e}"));
                }
            }
        }
    }
    corrected
}

/// Runs [`sync_once`] every `interval`, and about a second after each kick, until shutdown.
pub async fn run(ctx: Arc<Ctx>, interval: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = ctx.cluster_sync.kick.notified() => {
                // Let a burst of joins or an apply's pushes settle first.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ = shutdown.changed() => return,
        }
        sync_once(&ctx).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use nimbus_kube::KubeError;
    use nimbus_kube::cluster::DrainReport;
    use nimbus_kube::token::BootstrapToken;

    use super::*;
    use crate::placement::tests::{enroll, policy, report, req, state};

    /// TEST FAKE of a cluster (the real client is tested against the API stand-in in the kube crate and e2e):
    /// node `broken` fails, `drifted` needs a label put back, the rest are in sync.
    type Call = (String, BTreeMap<String, String>, Vec<Taint>);

    /// What the fake answers for calls the sync never makes (a test fails if one is made and checked).
    fn not_used() -> KubeError {
        KubeError::InvalidParams {
            field: "call".into(),
            reason: "the cluster sync does not make this call".into(),
        }
    }

    #[derive(Default)]
    struct FakeCluster {
        calls: Mutex<Vec<Call>>,
    }

    impl Cluster for FakeCluster {
        async fn create_bootstrap_token(&self, _: &BootstrapToken, _: Duration, _: &str) -> Result<(), KubeError> {
            Err(not_used())
        }
        async fn delete_bootstrap_token(&self, _: &str) -> Result<(), KubeError> {
            Err(not_used())
        }
        async fn reconcile_node(
            &self,
            node: &str,
            labels: &BTreeMap<String, String>,
            taints: &[Taint],
        ) -> Result<NodeReconcile, KubeError> {
            self.calls
                .lock()
                .unwrap()
                .push((node.to_string(), labels.clone(), taints.to_vec()));
            match node {
                "broken" => Err(KubeError::NodeNotFound { node: node.into() }),
                "drifted" => Ok(NodeReconcile {
                    labels_set: vec!["polynimbus.io/pool".into()],
                    ..NodeReconcile::default()
                }),
                _ => Ok(NodeReconcile::default()),
            }
        }
        async fn cordon(&self, _: &str) -> Result<(), KubeError> {
            Err(not_used())
        }
        async fn drain(&self, _: &str, _: Duration) -> Result<DrainReport, KubeError> {
            Err(not_used())
        }
        async fn delete_node(&self, _: &str) -> Result<(), KubeError> {
            Err(not_used())
        }
    }

    fn joined(s: &State, id: &str, server: &str) {
        report(s, id, "joined", server);
    }

    #[test]
    fn only_nodes_joined_to_their_environment_are_kept_with_the_policy_labels() {
        let (_d, s) = state();
        let ids: Vec<String> = (1..=3).map(|n| enroll(&s, n, "db")).collect();
        assert!(targets(&s).unwrap().is_empty(), "no policy yet");
        s.apply_policy(&req(&policy("db", ""))).unwrap();
        joined(&s, &ids[0], "10.0.0.10:6443");
        joined(&s, &ids[1], "10.9.9.9:6443"); // joined to another cluster: not ours to label
        let t = targets(&s).unwrap();
        assert_eq!(t.len(), 1, "{t:?}");
        assert_eq!(t[0].id, ids[0]);
        assert_eq!(t[0].name, "node-1");
        assert_eq!(t[0].kubeconfig, "/etc/nimbus/prod.kubeconfig");
        assert_eq!(t[0].labels["polynimbus.io/pool"], "db");
        assert_eq!(t[0].labels["polynimbus.io/env"], "production");
    }

    #[tokio::test]
    async fn every_result_is_recorded_and_counted() {
        let sync = ClusterSync::default();
        let metrics = crate::metrics::Metrics::default();
        let cluster = FakeCluster::default();
        let target = |id: &str, name: &str| Target {
            id: id.into(),
            name: name.into(),
            kubeconfig: "/k".into(),
            labels: [("polynimbus.io/pool".to_string(), "db".to_string())].into(),
            taints: vec![Taint {
                key: "polynimbus.io/enclave".into(),
                value: "true".into(),
                effect: "NoSchedule".into(),
            }],
        };
        let ts = [target("n1", "fine"), target("n2", "drifted"), target("n3", "broken")];
        assert_eq!(reconcile_all(&sync, &metrics, &cluster, &ts).await, 1);
        assert_eq!(sync.status("n1"), "in sync");
        assert_eq!(sync.status("n2"), "corrected: labels set polynimbus.io/pool");
        assert!(sync.status("n3").starts_with("error: "), "{}", sync.status("n3"));
        assert_eq!(sync.status("n4"), "");
        let calls = cluster.calls.lock().unwrap();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[1].2[0].effect, "NoSchedule");
        let count = |r: &'static str| metrics.cluster_syncs.get_or_create(&ResultLabel { result: r }).get();
        assert_eq!((count("in_sync"), count("corrected"), count("error")), (1, 1, 1));
    }
}
