//! What the coordinator does in an environment's cluster, through the Kubernetes API: bootstrap token
//! Secrets, node labels and taints under `polynimbus.io`, cordon, drain, node deletion.
//!
//! [`Cluster`] is the seam; [`KubeCluster`] implements it over kube-rs (kubeconfig, auth, TLS with rustls and
//! ring). Tests reach the same code through a kubeconfig pointing at a stand-in API server.
//!
//! Requests made (all JSON):
//! - `create_bootstrap_token`: `POST /api/v1/namespaces/kube-system/secrets`
//! - `delete_bootstrap_token`: `DELETE /api/v1/namespaces/kube-system/secrets/bootstrap-token-<id>`
//! - `reconcile_node`: `GET /api/v1/nodes/<node>`, then, only if something differs, one
//!   `PATCH /api/v1/nodes/<node>` (JSON merge patch carrying `metadata.resourceVersion`, so a concurrent
//!   change gives 409 and the pair is retried)
//! - `cordon`: `PATCH /api/v1/nodes/<node>` (`spec.unschedulable: true`, strategic merge)
//! - `drain`: `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`, `POST
//!   /api/v1/namespaces/<ns>/pods/<pod>/eviction` per pod (429 = a disruption budget says not now: retried
//!   until the deadline), then the pod list again until the evicted pods are gone
//! - `delete_node`: `DELETE /api/v1/nodes/<node>`

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tokio::process::Command;

use crate::KubeError;
use crate::join::{self, DOMAIN, Taint};
use crate::token::{self, BootstrapToken};

/// Default wait between eviction retries and between checks that evicted pods are gone.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Annotation of static (mirror) pods: not evictable, kubelet-managed.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// How often a node patch is retried after a 409 conflict.
const CONFLICT_RETRIES: u32 = 3;
/// Most stderr kept in a token command error.
const STDERR_LIMIT: usize = 2048;

/// What [`Cluster::reconcile_node`] changed. Empty when the node already matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeReconcile {
    /// Labels added or given a new value.
    pub labels_set: Vec<String>,
    /// `polynimbus.io` labels removed.
    pub labels_removed: Vec<String>,
    /// Taints added (including ones whose value changed).
    pub taints_added: Vec<Taint>,
    /// `polynimbus.io` taints removed (including the old value of a changed one).
    pub taints_removed: Vec<Taint>,
}

impl NodeReconcile {
    /// Whether the node was patched.
    pub fn changed(&self) -> bool {
        !(self.labels_set.is_empty()
            && self.labels_removed.is_empty()
            && self.taints_added.is_empty()
            && self.taints_removed.is_empty())
    }
}

/// What [`Cluster::drain`] did. Pods are named `namespace/name`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Pods evicted (or found already gone).
    pub evicted: Vec<String>,
    /// Pods left alone because a DaemonSet owns them.
    pub skipped_daemonset: Vec<String>,
    /// Static (mirror) pods left alone.
    pub skipped_mirror: Vec<String>,
    /// Evictions refused with 429 (a PodDisruptionBudget) and retried.
    pub retries: u32,
}

/// The coordinator's view of one environment's cluster.
pub trait Cluster: Send + Sync {
    /// Creates the `bootstrap-token-<id>` Secret in `kube-system`, expiring `ttl` from now.
    /// [`KubeError::TokenExists`] when the id is taken.
    fn create_bootstrap_token(
        &self,
        token: &BootstrapToken,
        ttl: Duration,
        description: &str,
    ) -> impl Future<Output = Result<(), KubeError>> + Send;

    /// Deletes the token's Secret; a missing one (404) is fine.
    fn delete_bootstrap_token(&self, id: &str) -> impl Future<Output = Result<(), KubeError>> + Send;

    /// Sets exactly these `polynimbus.io` labels and taints on the node, removes other `polynimbus.io` ones,
    /// leaves every other label and taint as it is.
    fn reconcile_node(
        &self,
        node: &str,
        labels: &BTreeMap<String, String>,
        taints: &[Taint],
    ) -> impl Future<Output = Result<NodeReconcile, KubeError>> + Send;

    /// Marks the node unschedulable.
    fn cordon(&self, node: &str) -> impl Future<Output = Result<(), KubeError>> + Send;

    /// Evicts the node's pods (not DaemonSet-owned or mirror pods) through the Eviction API, retrying 429s,
    /// and waits until they are gone, all within `deadline`.
    fn drain(&self, node: &str, deadline: Duration) -> impl Future<Output = Result<DrainReport, KubeError>> + Send;

    /// Deletes the Node object; a missing one (404) is fine.
    fn delete_node(&self, node: &str) -> impl Future<Output = Result<(), KubeError>> + Send;
}

/// Generates a token and creates its Secret, trying a second id if the first is taken.
pub async fn issue_token(
    cluster: &impl Cluster,
    ttl: Duration,
    description: &str,
) -> Result<BootstrapToken, KubeError> {
    let mut tries = 0;
    loop {
        let token = BootstrapToken::generate();
        match cluster.create_bootstrap_token(&token, ttl, description).await {
            Ok(()) => return Ok(token),
            Err(KubeError::TokenExists { .. }) if tries == 0 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Cordon, drain (within `deadline`), delete the Node.
pub async fn decommission(cluster: &impl Cluster, node: &str, deadline: Duration) -> Result<DrainReport, KubeError> {
    cluster.cordon(node).await?;
    let report = cluster.drain(node, deadline).await?;
    cluster.delete_node(node).await?;
    Ok(report)
}

/// [`Cluster`] over kube-rs.
#[derive(Clone)]
pub struct KubeCluster {
    client: kube::Client,
    /// Same connection settings but without kube-rs's automatic 429/503 retries: drain handles eviction 429s
    /// itself, against its deadline.
    evict_client: kube::Client,
    retry_interval: Duration,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("retry_interval", &self.retry_interval)
            .finish_non_exhaustive()
    }
}

impl KubeCluster {
    /// A client from a kubeconfig file (its current context), as `kubectl --kubeconfig PATH` would use it.
    pub async fn from_kubeconfig(path: impl AsRef<Path>) -> Result<Self, KubeError> {
        let path = path.as_ref();
        let bad = |reason: String| KubeError::Kubeconfig {
            path: path.to_path_buf(),
            reason,
        };
        // The workspace builds rustls with ring only; make that the process default in case another crate
        // enabled a second provider (rustls then refuses to pick). An already installed default is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| bad(e.to_string()))?;
        let client = kube::Client::try_from(config.clone()).map_err(|e| bad(e.to_string()))?;
        let mut no_retry = config;
        no_retry.default_retry = false;
        let evict_client = kube::Client::try_from(no_retry).map_err(|e| bad(e.to_string()))?;
        tracing::debug!(kubeconfig = %path.display(), "Kubernetes client ready");
        Ok(KubeCluster {
            client,
            evict_client,
            retry_interval: DEFAULT_RETRY_INTERVAL,
        })
    }

    /// Wait between eviction retries and between checks that evicted pods are gone (default 5 s). A 429 whose
    /// status asks for a longer wait (`retryAfterSeconds`) gets that.
    pub fn with_retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), token::NAMESPACE)
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    async fn pods_on(&self, node: &str) -> Result<Vec<Pod>, KubeError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let list = pods
            .list(&lp)
            .await
            .map_err(|e| KubeError::api(format!("list pods on node {node}"), e))?;
        Ok(list.items)
    }
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

fn is_ours(key: &str) -> bool {
    key.split_once('/').is_some_and(|(prefix, _)| {
        prefix == DOMAIN || prefix.strip_suffix(DOMAIN).is_some_and(|rest| rest.ends_with('.'))
    })
}

fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

fn from_k8s_taint(t: &k8s_openapi::api::core::v1::Taint) -> Taint {
    Taint {
        key: t.key.clone(),
        value: t.value.clone().unwrap_or_default(),
        effect: t.effect.clone(),
    }
}

/// The labels/taints plan for one node: what changes, and the merge patch doing it (`None` if nothing).
fn plan_node(
    node: &Node,
    labels: &BTreeMap<String, String>,
    taints: &[Taint],
) -> (NodeReconcile, Option<serde_json::Value>) {
    let mut report = NodeReconcile::default();
    let current_labels = node.metadata.labels.clone().unwrap_or_default();
    let mut label_patch = serde_json::Map::new();
    for (k, v) in labels {
        if current_labels.get(k) != Some(v) {
            report.labels_set.push(k.clone());
            label_patch.insert(k.clone(), json!(v));
        }
    }
    for k in current_labels.keys().filter(|k| is_ours(k) && !labels.contains_key(*k)) {
        report.labels_removed.push(k.clone());
        label_patch.insert(k.clone(), serde_json::Value::Null);
    }

    let current_taints = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let have: BTreeSet<Taint> = current_taints
        .iter()
        .filter(|t| is_ours(&t.key))
        .map(from_k8s_taint)
        .collect();
    let want: BTreeSet<Taint> = taints.iter().cloned().collect();
    report.taints_added = taints.iter().filter(|t| !have.contains(t)).cloned().collect();
    report.taints_removed = have.difference(&want).cloned().collect();
    let taints_changed = !report.taints_added.is_empty() || !report.taints_removed.is_empty();

    if !report.changed() {
        return (report, None);
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("resourceVersion".into(), json!(node.metadata.resource_version));
    if !label_patch.is_empty() {
        metadata.insert("labels".into(), serde_json::Value::Object(label_patch));
    }
    let mut patch = json!({ "metadata": metadata });
    if taints_changed {
        let mut list: Vec<serde_json::Value> = current_taints
            .iter()
            .filter(|t| !is_ours(&t.key))
            .map(|t| serde_json::to_value(t).unwrap_or_else(|_| json!({"key": t.key, "effect": t.effect})))
            .collect();
        list.extend(taints.iter().map(|t| json!(t)));
        patch["spec"] = json!({ "taints": list });
    }
    (report, Some(patch))
}

fn is_daemonset_pod(p: &Pod) -> bool {
    p.metadata
        .owner_references
        .as_ref()
        .is_some_and(|refs| refs.iter().any(|r| r.kind == "DaemonSet" && r.controller == Some(true)))
}

fn is_mirror_pod(p: &Pod) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
}

impl Cluster for KubeCluster {
    async fn create_bootstrap_token(
        &self,
        token: &BootstrapToken,
        ttl: Duration,
        description: &str,
    ) -> Result<(), KubeError> {
        let manifest = token.secret_manifest(ttl, SystemTime::now(), description);
        let secret: Secret = serde_json::from_value(manifest).map_err(|e| {
            KubeError::invalid(
                "bootstrap token Secret",
                format!("the manifest does not fit the Secret type ({e}); this is a bug in nimbus-kube"),
            )
        })?;
        match self.secrets().create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(token = %token, ttl = %humantime::format_duration(ttl), "bootstrap token created");
                Ok(())
            }
            Err(e) if code(&e) == Some(409) => Err(KubeError::TokenExists {
                id: token.id().to_owned(),
            }),
            Err(e) => Err(KubeError::api(
                format!("create Secret kube-system/{}", token.secret_name()),
                e,
            )),
        }
    }

    async fn delete_bootstrap_token(&self, id: &str) -> Result<(), KubeError> {
        if !token::is_valid_id(id) {
            return Err(KubeError::InvalidToken {
                reason: format!("token id {id:?} is not 6 characters of [a-z0-9]"),
            });
        }
        let name = token::secret_name(id);
        match self.secrets().delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(token_id = id, "bootstrap token deleted");
                Ok(())
            }
            Err(e) if code(&e) == Some(404) => Ok(()),
            Err(e) => Err(KubeError::api(format!("delete Secret kube-system/{name}"), e)),
        }
    }

    async fn reconcile_node(
        &self,
        node: &str,
        labels: &BTreeMap<String, String>,
        taints: &[Taint],
    ) -> Result<NodeReconcile, KubeError> {
        join::validate_labels(labels)?;
        join::validate_taints(taints)?;
        let api = self.nodes();
        let mut round = 0;
        loop {
            round += 1;
            let current = match api.get(node).await {
                Ok(n) => n,
                Err(e) if code(&e) == Some(404) => return Err(KubeError::NodeNotFound { node: node.to_owned() }),
                Err(e) => return Err(KubeError::api(format!("get node {node}"), e)),
            };
            let (report, patch) = plan_node(&current, labels, taints);
            let Some(patch) = patch else {
                tracing::debug!(node, "node labels and taints already as wanted");
                return Ok(report);
            };
            match api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    tracing::info!(node, ?report, "node labels/taints reconciled");
                    return Ok(report);
                }
                Err(e) if code(&e) == Some(409) && round < CONFLICT_RETRIES => {
                    tracing::debug!(node, round, "node changed under us (409); re-reading");
                }
                Err(e) if code(&e) == Some(404) => return Err(KubeError::NodeNotFound { node: node.to_owned() }),
                Err(e) => return Err(KubeError::api(format!("patch node {node}"), e)),
            }
        }
    }

    async fn cordon(&self, node: &str) -> Result<(), KubeError> {
        match self.nodes().cordon(node).await {
            Ok(_) => {
                tracing::info!(node, "node cordoned");
                Ok(())
            }
            Err(e) if code(&e) == Some(404) => Err(KubeError::NodeNotFound { node: node.to_owned() }),
            Err(e) => Err(KubeError::api(format!("cordon node {node}"), e)),
        }
    }

    async fn drain(&self, node: &str, deadline: Duration) -> Result<DrainReport, KubeError> {
        let end = tokio::time::Instant::now() + deadline;
        let mut report = DrainReport::default();
        let mut pending: Vec<(String, String, String)> = Vec::new(); // (namespace, name, uid)
        for p in self.pods_on(node).await? {
            if is_mirror_pod(&p) {
                report.skipped_mirror.push(pod_name(&p));
            } else if is_daemonset_pod(&p) {
                report.skipped_daemonset.push(pod_name(&p));
            } else {
                let m = &p.metadata;
                pending.push((
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                    m.uid.clone().unwrap_or_default(),
                ));
            }
        }
        let timeout = |remaining: Vec<String>| KubeError::DrainTimeout {
            node: node.to_owned(),
            deadline,
            remaining,
        };

        let mut evicted: Vec<(String, String, String)> = Vec::new();
        while !pending.is_empty() {
            let mut refused = Vec::new();
            let mut wait = self.retry_interval;
            for (ns, name, uid) in pending {
                let pods: Api<Pod> = Api::namespaced(self.evict_client.clone(), &ns);
                let eviction = Eviction {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(ns.clone()),
                        ..ObjectMeta::default()
                    },
                    delete_options: None,
                };
                match pods
                    .create_subresource::<_, serde_json::Value>("eviction", &name, &PostParams::default(), &eviction)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(node, pod = %format!("{ns}/{name}"), "pod evicted");
                        evicted.push((ns, name, uid));
                    }
                    Err(e) if code(&e) == Some(404) => evicted.push((ns, name, uid)),
                    Err(kube::Error::Api(status)) if status.code == 429 => {
                        let asked = status.details.as_ref().map(|d| d.retry_after_seconds).unwrap_or(0);
                        wait = wait.max(Duration::from_secs(u64::from(asked)));
                        tracing::info!(node, pod = %format!("{ns}/{name}"), reason = %status.message, "eviction refused (429); will retry");
                        report.retries += 1;
                        refused.push((ns, name, uid));
                    }
                    Err(e) => return Err(KubeError::api(format!("evict pod {ns}/{name}"), e)),
                }
            }
            pending = refused;
            if pending.is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return Err(timeout(pending.iter().map(|(ns, n, _)| format!("{ns}/{n}")).collect()));
            }
            tokio::time::sleep(wait.min(end - now)).await;
        }
        report.evicted = evicted.iter().map(|(ns, n, _)| format!("{ns}/{n}")).collect();

        // Wait until the evicted pods are gone (a pod recreated under the same name has a new uid).
        while !evicted.is_empty() {
            let present: BTreeSet<(String, String, String)> = self
                .pods_on(node)
                .await?
                .iter()
                .map(|p| {
                    let m = &p.metadata;
                    (
                        m.namespace.clone().unwrap_or_default(),
                        m.name.clone().unwrap_or_default(),
                        m.uid.clone().unwrap_or_default(),
                    )
                })
                .collect();
            evicted.retain(|p| present.contains(p));
            if evicted.is_empty() {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= end {
                return Err(timeout(evicted.iter().map(|(ns, n, _)| format!("{ns}/{n}")).collect()));
            }
            tokio::time::sleep(self.retry_interval.min(end - now)).await;
        }
        tracing::info!(
            node,
            evicted = report.evicted.len(),
            retries = report.retries,
            "node drained"
        );
        Ok(report)
    }

    async fn delete_node(&self, node: &str) -> Result<(), KubeError> {
        match self.nodes().delete(node, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(node, "node deleted");
                Ok(())
            }
            Err(e) if code(&e) == Some(404) => Ok(()),
            Err(e) => Err(KubeError::api(format!("delete node {node}"), e)),
        }
    }
}

/// A token from an operator-configured command: `argv[0]` run with `argv[1..]` (no shell), which prints
/// the token on stdout (surrounding whitespace ignored). The command is expected to have created the token in
/// the cluster itself (e.g. `kubeadm token create --ttl 15m` on a control-plane host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTokenSource {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Limit for one run; the command is killed after it.
    pub timeout: Duration,
}

impl CommandTokenSource {
    /// Runs the command and parses its stdout as a token. Errors name the command and carry its stderr
    /// (truncated; token-shaped text blanked in both), never stdout.
    pub async fn fetch(&self) -> Result<BootstrapToken, KubeError> {
        // Scrubbed: an operator may pass a chosen token as an argument (`kubeadm token create <token>`).
        let command = token::scrub(&self.argv.join(" "));
        let fail = |reason: String, stderr: &[u8]| KubeError::TokenCommand {
            command: command.clone(),
            reason,
            stderr: clean_stderr(stderr),
        };
        let Some((program, args)) = self.argv.split_first() else {
            return Err(fail("is empty: configure the program and its arguments".into(), b""));
        };
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
        let out = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Err(_) => {
                return Err(fail(
                    format!("did not finish within {}", humantime::format_duration(self.timeout)),
                    b"",
                ));
            }
            Ok(Err(e)) => return Err(fail(format!("could not be started: {e}"), b"")),
            Ok(Ok(out)) => out,
        };
        if !out.status.success() {
            return Err(fail(format!("failed ({})", out.status), &out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        match BootstrapToken::parse(stdout.trim()) {
            Ok(t) => {
                tracing::info!(command = %command, token = %t, "bootstrap token obtained from command");
                Ok(t)
            }
            Err(e) => Err(fail(
                format!(
                    "printed {} bytes on stdout that are not one bootstrap token ({e})",
                    out.stdout.len()
                ),
                &out.stderr,
            )),
        }
    }
}

fn clean_stderr(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let cut: String = if text.len() > STDERR_LIMIT {
        let mut end = STDERR_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text.to_owned()
    };
    token::scrub(&cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: serde_json::Value, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": { "name": "n1", "resourceVersion": "42", "labels": labels },
            "spec": { "taints": taints },
        }))
        .unwrap()
    }

    #[test]
    fn plan_keeps_foreign_keys_and_replaces_ours() {
        let n = node(
            json!({"kubernetes.io/hostname": "n1", "polynimbus.io/pool": "old", "polynimbus.io/stale": "x"}),
            json!([
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
                {"key": "polynimbus.io/old", "effect": "NoSchedule"},
                {"key": "polynimbus.io/keep", "value": "v", "effect": "NoSchedule"},
            ]),
        );
        let labels = BTreeMap::from([
            ("polynimbus.io/pool".to_owned(), "new".to_owned()),
            ("polynimbus.io/cohort.a".to_owned(), "".to_owned()),
        ]);
        let taints = vec![
            Taint {
                key: "polynimbus.io/keep".into(),
                value: "v".into(),
                effect: "NoSchedule".into(),
            },
            Taint {
                key: "polynimbus.io/drain".into(),
                value: "".into(),
                effect: "NoExecute".into(),
            },
        ];
        let (report, patch) = plan_node(&n, &labels, &taints);
        assert_eq!(report.labels_set, vec!["polynimbus.io/cohort.a", "polynimbus.io/pool"]);
        assert_eq!(report.labels_removed, vec!["polynimbus.io/stale"]);
        assert_eq!(report.taints_added, vec![taints[1].clone()]);
        assert_eq!(
            report.taints_removed,
            vec![Taint {
                key: "polynimbus.io/old".into(),
                value: "".into(),
                effect: "NoSchedule".into()
            }]
        );
        assert_eq!(
            patch.unwrap(),
            json!({
                "metadata": {
                    "resourceVersion": "42",
                    "labels": {"polynimbus.io/cohort.a": "", "polynimbus.io/pool": "new", "polynimbus.io/stale": null},
                },
                "spec": {"taints": [
                    {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
                    {"key": "polynimbus.io/keep", "value": "v", "effect": "NoSchedule"},
                    {"key": "polynimbus.io/drain", "effect": "NoExecute"},
                ]},
            })
        );
    }

    #[test]
    fn plan_is_empty_when_node_matches() {
        let n = node(
            json!({"polynimbus.io/pool": "p", "other": "x"}),
            json!([{"key": "polynimbus.io/t", "value": "1", "effect": "NoSchedule"}, {"key": "x", "effect": "NoSchedule"}]),
        );
        let labels = BTreeMap::from([("polynimbus.io/pool".to_owned(), "p".to_owned())]);
        let taints = vec![Taint {
            key: "polynimbus.io/t".into(),
            value: "1".into(),
            effect: "NoSchedule".into(),
        }];
        let (report, patch) = plan_node(&n, &labels, &taints);
        assert!(!report.changed());
        assert_eq!(patch, None);
    }

    #[test]
    fn ours_means_polynimbus_prefix() {
        assert!(is_ours("polynimbus.io/pool"));
        assert!(is_ours("x.polynimbus.io/pool"));
        assert!(!is_ours("notpolynimbus.io/pool"));
        assert!(!is_ours("polynimbus.io"));
        assert!(!is_ours("node-role.kubernetes.io/worker"));
    }

    #[test]
    fn stderr_is_cut_and_scrubbed() {
        assert_eq!(
            clean_stderr(b"  oops abcdef.0123456789abcdef \n"),
            "oops abcdef.<redacted>"
        );
        let long = "é".repeat(STDERR_LIMIT);
        let cut = clean_stderr(long.as_bytes());
        assert!(cut.len() <= STDERR_LIMIT + "…".len());
        assert!(cut.ends_with('…'));
    }
}
