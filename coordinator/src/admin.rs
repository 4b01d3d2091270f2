//! The Admin service for `nimbusctl`, served on a local Unix socket (0600).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use audit::{Outcome, Record};
use nimbus_proto::admin_server::Admin;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::{
    AcceptNodeRequest, ControlRolloutRequest, DecommissionRequest, DecommissionResponse, GetRolloutRequest,
    RolloutNode, RolloutStatus,
};
use nimbus_proto::{
    ApplyPolicyRequest, ApplyPolicyResponse, Change, GetPolicyRequest, ListPolicyRevisionsRequest,
    ListPolicyRevisionsResponse, NodeChange, PolicyRevision, RollbackPolicyRequest,
};
use nimbus_proto::{
    CoordinatorMessage, CreateTokenRequest, CreateTokenResponse, GetNodeRequest, Inventory, LatencyMatrix, LatencyPair,
    LatencyRequest, ListNodesRequest, ListNodesResponse, ListTokensRequest, ListTokensResponse, Node, PlanRequest,
    PlanResponse, RevokeNodeRequest, RevokeNodeResponse, RevokeTokenRequest, RevokeTokenResponse, Revoked, TokenInfo,
};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use crate::auditlog::outcome_of;
use crate::auth::Caller;
use crate::context::{Ctx, key_display, key_from_id};
use crate::state::{HardwareRecord, NodeRecord, NodeStatus, TokenRecord};

/// Longest token lifetime `token create` accepts.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long revocation waits for the agent to close its stream after the
/// Revoked message before the peer is removed anyway.
pub(crate) const REVOKE_GRACE: Duration = Duration::from_secs(2);

pub struct AdminService {
    ctx: Arc<Ctx>,
}

impl AdminService {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }

    /// Runs an apply or rollback, logs and pushes what it stored, and answers.
    async fn finish_apply<F>(&self, f: F) -> Result<Response<ApplyPolicyResponse>, Status>
    where
        F: FnOnce(&crate::state::State) -> Result<crate::placement::ApplyOutcome, crate::state::StateError>
            + Send
            + 'static,
    {
        let mut outcome = self.ctx.state(f).await?;
        if outcome.revision > 0 {
            tracing::info!(
                revision = outcome.revision,
                previous = outcome.previous_revision,
                digest = %outcome.digest,
                nodes_changed = outcome.changes.len(),
                "fleet policy applied"
            );
            let pushed = std::mem::take(&mut outcome.pushed);
            crate::placement::push(&self.ctx, pushed).await;
            self.ctx.cluster_sync.kick();
        }
        Ok(Response::new(apply_response(outcome)))
    }

    /// Appends the audit entry of one state-changing call, after the call: who and from where (`caller`),
    /// `action` (e.g. `token.create`), `target` (e.g. `token/ab12`), the outcome and `detail` (never secrets).
    async fn audit(&self, who: &Caller, action: &str, target: impl Into<String>, outcome: Outcome, detail: Value) {
        let rec = Record::new(who.principal.clone(), action, target)
            .with_from(who.from.clone())
            .with_result(outcome)
            .with_detail(detail);
        self.ctx.audit.record(rec).await;
    }

    /// `CreateToken` after the caller was read.
    async fn create_token_now(&self, r: CreateTokenRequest) -> Result<Response<CreateTokenResponse>, Status> {
        let ttl = Duration::from_secs(r.ttl_secs);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument("ttl must be between 1s and 30 days"));
        }
        if r.uses == 0 || r.uses > 10_000 {
            return Err(Status::invalid_argument("uses must be between 1 and 10000"));
        }
        for (k, v) in &r.labels {
            check_label(k, v)?;
        }
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        let description = crate::fleet::clip(r.description, 256);
        let bound = !r.bind_mac.is_empty();
        let binding = crate::state::TokenBinding {
            mac: bound.then_some(r.bind_mac),
            // A MAC is easy to fake: bound tokens wait for an operator unless told otherwise.
            require_acceptance: r.require_acceptance || (bound && !r.auto_accept),
        };
        let (token, rec) = self
            .ctx
            .state(move |s| s.create_bound_token(ttl, r.uses, labels, description, binding, SystemTime::now()))
            .await?;
        tracing::info!(
            token_id = %rec.id, uses = rec.uses_total, expires_at = rec.expires_at, bind_mac = ?rec.bind_mac,
            require_acceptance = rec.require_acceptance, "join token created"
        );
        Ok(Response::new(CreateTokenResponse {
            token: token.to_string_secret(),
            token_id: rec.id,
            ca_pin: self.ctx.rotations.pin().to_string(),
            expires_at_unix: rec.expires_at,
            enroll_endpoints: vec![self.ctx.config.enroll_endpoint()],
        }))
    }

    /// `AcceptNode` after the caller was read.
    async fn accept_node_now(&self, by: String, name: String) -> Result<Response<Node>, Status> {
        let lookup = name.clone();
        let node = self.ctx.state(move |s| s.accept_node(&lookup, &by)).await?;
        let key = key_from_id(&node.public_key)
            .ok_or_else(|| Status::internal("the node's stored public key is invalid; see the coordinator log"))?;
        crate::enroll::add_peer(&self.ctx, &node, key)?;
        crate::placement::reconcile(&self.ctx).await;
        self.named_view(name).await.map(Response::new)
    }

    /// The audit entry of an apply or rollback (none for a dry run): the stored revision and digest, or
    /// `refused` when disruptive changes were refused (nothing stored).
    async fn audit_apply(
        &self,
        who: &Caller,
        action: &str,
        dry_run: bool,
        mut detail: Value,
        result: &Result<Response<ApplyPolicyResponse>, Status>,
    ) {
        if dry_run {
            return;
        }
        let mut outcome = outcome_of(result);
        if let Ok(r) = result {
            let r = r.get_ref();
            detail["revision"] = json!(r.revision);
            detail["previous_revision"] = json!(r.previous_revision);
            detail["digest"] = json!(r.digest);
            detail["nodes_changed"] = json!(r.changes.len());
            detail["unchanged"] = json!(r.unchanged);
            if r.refused_disruptive {
                outcome = Outcome::refused("disruptive changes need --allow-disruptive; nothing was stored");
            }
        }
        let target = match result {
            Ok(r) if r.get_ref().revision > 0 => format!("policy/{}", r.get_ref().revision),
            _ => "policy".to_string(),
        };
        self.audit(who, action, target, outcome, detail).await;
    }

    fn node_view(&self, n: NodeRecord, hw: Option<HardwareRecord>) -> Node {
        let connected = crate::replicas::connected(&self.ctx, &n.id);
        let state = match (n.status, connected) {
            (NodeStatus::Revoked, _) => "revoked",
            (NodeStatus::Pending, _) => "pending",
            (_, true) => "connected",
            _ => "lost",
        };
        let last_seen = self
            .ctx
            .sessions
            .last_seen(&n.id)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .or(n.last_seen)
            .unwrap_or(0);
        let stats = key_from_id(&n.public_key).and_then(|k| self.ctx.tunnel.peer_stats(&k));
        Node {
            id: n.id,
            name: n.name,
            overlay_ip: n.overlay_ip.to_string(),
            state: state.into(),
            last_seen_unix: last_seen,
            agent_version: n.agent_version,
            hostname: n.hostname,
            machine_id: n.machine_id,
            wg_public_key: key_display(&n.public_key),
            enrolled_at_unix: n.enrolled_at,
            labels: n.labels.into_iter().collect(),
            inventory: n.inventory.map(|i| Inventory {
                hostname: i.hostname,
                cpus: i.cpus,
                memory_bytes: i.memory_bytes,
                kernel: i.kernel,
                os_release: i.os_release,
                document: Vec::new(),
                document_schema: 0,
            }),
            platform: hw
                .as_ref()
                .map(|h| h.document.platform.kind.to_string())
                .unwrap_or_default(),
            instance_type: hw
                .as_ref()
                .and_then(|h| h.document.platform.instance_type.clone())
                .unwrap_or_default(),
            region: hw
                .as_ref()
                .and_then(|h| h.document.platform.region.clone())
                .unwrap_or_default(),
            zone: hw
                .as_ref()
                .and_then(|h| h.document.platform.zone.clone())
                .unwrap_or_default(),
            disk_summary: hw.as_ref().map(|h| h.document.disk_summary()).unwrap_or_default(),
            inventory_document: hw
                .as_ref()
                .and_then(|h| serde_json::to_vec(&h.document).ok())
                .unwrap_or_default(),
            inventory_updated_unix: hw.as_ref().map(|h| h.updated_at).unwrap_or(0),
            inventory_history: hw
                .map(|h| {
                    h.history
                        .into_iter()
                        .map(|c| nimbus_proto::InventoryChange {
                            at_unix: c.at,
                            changes: c.changes,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            underlay_endpoint: stats
                .as_ref()
                .and_then(|s| s.endpoint)
                .map(|e| e.to_string())
                .unwrap_or_default(),
            rx_bytes: stats.as_ref().map(|s| s.rx_bytes).unwrap_or(0),
            tx_bytes: stats.as_ref().map(|s| s.tx_bytes).unwrap_or(0),
            handshake_age_secs: stats
                .and_then(|s| s.last_handshake_age)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            placement: None,
            unplaced_reason: String::new(),
            convergence: String::new(),
            kubelet: String::new(),
            cluster_sync: String::new(),
            drift: String::new(),
            drift_unix: 0,
            storage: Vec::new(),
        }
    }

    /// Node `name` as `GetNode` shows it.
    async fn named_view(&self, name: String) -> Result<Node, Status> {
        let shown = name.clone();
        let found = self
            .ctx
            .state(move |s| nodes_with_place(s, s.node_by_name(&name)?.into_iter().collect()))
            .await?;
        match found.0.into_iter().next() {
            Some((n, hw, info)) => Ok(self.full_view(n, hw, &info)),
            None => Err(Status::not_found(format!(
                "no node named `{shown}`; list nodes with `nimbusctl nodes`"
            ))),
        }
    }

    /// The node view with its place, cluster sync and drift.
    fn full_view(&self, n: NodeRecord, hw: Option<HardwareRecord>, info: &PlaceInfo) -> Node {
        let mut v = self.node_view(n, hw);
        set_place(&mut v, info);
        v.cluster_sync = self.ctx.cluster_sync.status(&v.id);
        v
    }
}

/// Revokes node `name`: stored as revoked, told so over its stream (given a moment to close it), disconnected,
/// its WireGuard peer removed and its latency series forgotten. Returns the node and whether it was connected.
pub(crate) async fn revoke(ctx: &Ctx, name: String, reason: String) -> Result<(NodeRecord, bool), Status> {
    let why = reason.clone();
    let node = ctx
        .state(move |s| s.revoke_node(&name, &why, SystemTime::now()))
        .await?;
    let was_connected = crate::replicas::deliver(
        ctx,
        &node.id,
        CoordinatorMessage {
            msg: Some(CoordMsg::Revoked(Revoked { reason: reason.clone() })),
        },
    );
    if was_connected {
        // Give the Revoked message time to cross the tunnel; the agent closes its stream when it has it.
        let deadline = tokio::time::Instant::now() + REVOKE_GRACE;
        while crate::replicas::connected(ctx, &node.id) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ctx.sessions.kick(&node.id);
    if let Some(k) = key_from_id(&node.public_key) {
        ctx.tunnel.remove_peer(&k);
    }
    ctx.metrics.node_revocations.inc();
    ctx.probes.forget(&node.id);
    crate::probeshare::forget(ctx, &node.id);
    tracing::warn!(node = %node.name, node_id = %node.id, %reason, was_connected, "node revoked; WireGuard peer removed");
    Ok((node, was_connected))
}

/// At most 256 characters of an operator's reason.
fn clip_reason(reason: &str) -> String {
    reason.chars().take(256).collect()
}

/// The wire form of a rollout record (`None`: no rollout ever).
fn rollout_view(
    s: &crate::state::State,
    rec: Option<&crate::placement::RolloutRecord>,
    active: bool,
    timeout: Duration,
) -> Result<RolloutStatus, crate::state::StateError> {
    let Some(rec) = rec else {
        return Ok(RolloutStatus {
            node_timeout_secs: timeout.as_secs(),
            ..RolloutStatus::default()
        });
    };
    let st = rec.rollout.status();
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    let mut nodes = Vec::new();
    for ns in st.nodes {
        let name = s
            .node(&ns.target.node)?
            .map_or_else(|| ns.target.node.clone(), |r| r.name);
        nodes.push(RolloutNode {
            node_id: ns.target.node.clone(),
            name,
            pool: ns.target.pool.clone(),
            zone: ns.target.zone.clone().unwrap_or_default(),
            state: match &ns.state {
                waves::NodeState::Pending => "pending".into(),
                waves::NodeState::Applying { .. } => "applying".into(),
                waves::NodeState::WaitingHealthy { .. } => "waiting-healthy".into(),
                waves::NodeState::Healthy => "healthy".into(),
                waves::NodeState::Failed { reason } => format!("failed: {reason}"),
            },
            wave: ns.wave.unwrap_or(0),
            started_unix: rec.started.get(&ns.target.node).copied().unwrap_or(0),
        });
    }
    Ok(RolloutStatus {
        active,
        revision: rec.revision,
        phase: st.phase.to_string(),
        current_wave: st.current_wave,
        pause_reason: st.pause_reason.unwrap_or_default(),
        nodes,
        total: n(st.counts.total),
        pending: n(st.counts.pending),
        applying: n(st.counts.applying),
        waiting_healthy: n(st.counts.waiting_healthy),
        healthy: n(st.counts.healthy),
        failed: n(st.counts.failed),
        node_timeout_secs: timeout.as_secs(),
        kind: rec.kind.name().into(),
        version: match &rec.kind {
            crate::placement::RolloutKind::Agent { target, .. } => target.version.clone(),
            crate::placement::RolloutKind::Policy => String::new(),
        },
        note: rec.note.clone(),
    })
}

/// A node's place under the current policy, read with the node.
struct PlaceInfo {
    desired: crate::placement::DesiredRecord,
    observed: Option<crate::placement::ObservedRecord>,
    unplaced: Option<String>,
}

fn place_info(
    s: &crate::state::State,
    id: &str,
    live: Option<&crate::placement::LivePlacement>,
) -> Result<PlaceInfo, crate::state::StateError> {
    let unplaced = live.and_then(|l| match l.placement.nodes.get(id) {
        Some(policy::NodePlacement::Unplaced { reason }) => Some(reason.clone()),
        _ => None,
    });
    Ok(PlaceInfo {
        desired: s.desired(id)?,
        observed: s.observed(id)?,
        unplaced,
    })
}

fn set_place(node: &mut Node, info: &PlaceInfo) {
    node.placement = info
        .desired
        .assignment
        .as_ref()
        .map(crate::placement::placement_message);
    node.unplaced_reason = info.unplaced.clone().unwrap_or_default();
    node.convergence = crate::placement::convergence(&info.desired, info.observed.as_ref());
    node.kubelet = match (&info.desired.assignment, &info.observed) {
        (None, _) => String::new(),
        (Some(_), Some(o)) if o.kubelet == "joined" => "joined".into(),
        (Some(_), Some(o)) if o.kubelet == "failed" => format!("failed: {}", o.join_error),
        (Some(_), Some(o)) if o.kubelet == "drifted" => format!("drifted: {}", o.join_error),
        (Some(_), _) => "joining".into(),
    };
    if let Some(o) = &info.observed {
        node.drift = o.drift.clone();
        node.drift_unix = o.drift_at;
        node.storage = o
            .storage
            .iter()
            .map(|v| nimbus_proto::StorageVolumeStatus {
                name: v.name.clone(),
                state: v.state.clone(),
                detail: v.detail.clone(),
            })
            .collect();
    }
}

/// Nodes with hardware and place, the live placement's warnings and revision.
type NodesWithPlace = (Vec<(NodeRecord, Option<HardwareRecord>, PlaceInfo)>, Vec<String>, u64);

fn nodes_with_place(
    s: &crate::state::State,
    nodes: Vec<NodeRecord>,
) -> Result<NodesWithPlace, crate::state::StateError> {
    let live = s.live_placement()?;
    let mut out = Vec::new();
    for (n, hw) in with_hardware(s, nodes)? {
        let info = place_info(s, &n.id, live.as_ref())?;
        out.push((n, hw, info));
    }
    let warnings = live
        .as_ref()
        .map(|l| l.placement.warnings.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    Ok((out, warnings, live.map_or(0, |l| l.revision)))
}

fn apply_response(o: crate::placement::ApplyOutcome) -> ApplyPolicyResponse {
    ApplyPolicyResponse {
        revision: o.revision,
        previous_revision: o.previous_revision,
        changes: o
            .changes
            .into_iter()
            .map(|(name, c)| NodeChange {
                disruptive: c.is_disruptive(),
                before_pool: c.before.as_ref().map(|a| a.pool.clone()).unwrap_or_default(),
                after_pool: c.after.as_ref().map(|a| a.pool.clone()).unwrap_or_default(),
                before_environment: c.before.as_ref().map(|a| a.environment.clone()).unwrap_or_default(),
                after_environment: c.after.as_ref().map(|a| a.environment.clone()).unwrap_or_default(),
                changes: c
                    .changes
                    .into_iter()
                    .map(|ch| Change {
                        what: ch.what,
                        disruptive: ch.disruptive,
                    })
                    .collect(),
                node: name,
            })
            .collect(),
        warnings: o.warnings,
        unchanged: o.unchanged,
        refused_disruptive: o.refused_disruptive,
        digest: o.digest,
        staged_in_waves: u32::try_from(o.staged).unwrap_or(u32::MAX),
    }
}

fn revision_view(r: crate::placement::PolicyRevisionRecord, with_yaml: bool) -> PolicyRevision {
    PolicyRevision {
        revision: r.revision,
        digest: r.digest,
        applied_by: r.applied_by,
        applied_at_unix: r.applied_at,
        action: r.action,
        file_name: r.file_name,
        yaml: if with_yaml { r.yaml } else { String::new() },
        nodes_changed: r.nodes_changed,
        disruptive_changes: r.disruptive_changes,
    }
}

/// Pair each node with its stored full inventory.
fn with_hardware(
    s: &crate::state::State,
    nodes: Vec<NodeRecord>,
) -> Result<Vec<(NodeRecord, Option<HardwareRecord>)>, crate::state::StateError> {
    nodes
        .into_iter()
        .map(|n| {
            let hw = s.hardware(&n.id)?;
            Ok((n, hw))
        })
        .collect()
}

fn token_view(t: TokenRecord) -> TokenInfo {
    TokenInfo {
        id: t.id,
        created_at_unix: t.created_at,
        expires_at_unix: t.expires_at,
        uses_total: t.uses_total,
        uses_left: t.uses_left,
        revoked: t.revoked,
        labels: t.labels.into_iter().collect(),
        description: t.description,
        bind_mac: t.bind_mac.unwrap_or_default(),
        require_acceptance: t.require_acceptance,
    }
}

fn check_label(k: &str, v: &str) -> Result<(), Status> {
    let ok_key = !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    let ok_val = v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok_key && ok_val {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "label `{k}={v}` is invalid: keys and values are at most 63 characters of [A-Za-z0-9-_.] (keys may also use /)"
        )))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn install_release_repository(
        &self,
        req: Request<nimbus_proto::InstallReleaseRepositoryRequest>,
    ) -> Result<Response<nimbus_proto::ReleaseList>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        let mut detail = json!({
            "metadata": r.metadata.keys().collect::<std::collections::BTreeSet<_>>(),
            "replace": r.replace,
        });
        let result = crate::releases::install_rpc(&self.ctx, &who.display(), r).await;
        if let Ok(list) = &result {
            detail["root_version"] = json!(list.root_version);
            detail["root_sha256"] = json!(list.root_sha256);
        }
        let outcome = outcome_of(&result);
        self.audit(&who, "release.install-repository", "releases", outcome, detail)
            .await;
        result.map(Response::new)
    }

    async fn add_release(
        &self,
        req: Request<tonic::Streaming<nimbus_proto::AddReleaseChunk>>,
    ) -> Result<Response<nimbus_proto::ReleaseList>, Status> {
        let who = crate::auth::caller(&req);
        // The header is read inside add_rpc: what was added is the difference between the lists.
        let before = crate::releases::list_rpc(&self.ctx)
            .await
            .map(|l| l.releases)
            .unwrap_or_default();
        let result = crate::releases::add_rpc(&self.ctx, &who.display(), req.into_inner()).await;
        let added: Vec<_> = result
            .as_ref()
            .map(|l| l.releases.iter().filter(|r| !before.contains(r)).collect())
            .unwrap_or_default();
        let target = added
            .first()
            .map_or_else(|| "releases".into(), |r| format!("release/{}", r.version));
        let detail = json!(
            added
                .iter()
                .map(|r| json!({
                    "version": r.version, "kind": r.kind, "arch": r.arch, "sha256": r.sha256, "length": r.length,
                    "target": r.target,
                }))
                .collect::<Vec<_>>()
        );
        self.audit(&who, "release.add", target, outcome_of(&result), detail)
            .await;
        result.map(Response::new)
    }

    async fn list_releases(
        &self,
        _req: Request<nimbus_proto::ListReleasesRequest>,
    ) -> Result<Response<nimbus_proto::ReleaseList>, Status> {
        crate::releases::list_rpc(&self.ctx).await.map(Response::new)
    }

    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        // Never the token secret: it exists only in the response.
        let detail = json!({
            "ttl_secs": r.ttl_secs, "uses": r.uses, "labels": r.labels, "bind_mac": r.bind_mac,
            "require_acceptance": r.require_acceptance, "auto_accept": r.auto_accept,
        });
        let result = self.create_token_now(r).await;
        let target = result
            .as_ref()
            .map_or_else(|_| "token".into(), |t| format!("token/{}", t.get_ref().token_id));
        self.audit(&who, "token.create", target, outcome_of(&result), detail)
            .await;
        result
    }

    async fn accept_node(&self, req: Request<AcceptNodeRequest>) -> Result<Response<Node>, Status> {
        let who = crate::auth::caller(&req);
        let name = req.into_inner().name;
        let result = self.accept_node_now(who.display(), name.clone()).await;
        self.audit(
            &who,
            "node.accept",
            format!("node/{name}"),
            outcome_of(&result),
            Value::Null,
        )
        .await;
        result
    }

    async fn list_tokens(&self, _req: Request<ListTokensRequest>) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self.ctx.state(|s| s.list_tokens()).await?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.into_iter().map(token_view).collect(),
        }))
    }

    async fn revoke_token(&self, req: Request<RevokeTokenRequest>) -> Result<Response<RevokeTokenResponse>, Status> {
        let who = crate::auth::caller(&req);
        let id = req.into_inner().id;
        let target = format!("token/{id}");
        let result = self.ctx.state(move |s| s.revoke_token(&id)).await;
        self.audit(&who, "token.revoke", target, outcome_of(&result), Value::Null)
            .await;
        let rec = result?;
        tracing::info!(token_id = %rec.id, "join token revoked");
        Ok(Response::new(RevokeTokenResponse {
            token: Some(token_view(rec)),
        }))
    }

    async fn list_nodes(&self, _req: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let (nodes, policy_warnings, policy_revision) =
            self.ctx.state(|s| nodes_with_place(s, s.list_nodes()?)).await?;
        Ok(Response::new(ListNodesResponse {
            nodes: nodes
                .into_iter()
                .map(|(n, hw, info)| self.full_view(n, hw, &info))
                .collect(),
            policy_warnings,
            policy_revision,
        }))
    }

    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        self.named_view(req.into_inner().name).await.map(Response::new)
    }

    async fn latency(&self, _req: Request<LatencyRequest>) -> Result<Response<LatencyMatrix>, Status> {
        let latest = self.ctx.probes.latest();
        let nodes = self.ctx.state(|s| with_hardware(s, s.list_nodes()?)).await?;
        let name_of: std::collections::HashMap<String, String> =
            nodes.iter().map(|(n, _)| (n.id.clone(), n.name.clone())).collect();
        let pairs = latest
            .iter()
            .filter_map(|(a, b, w)| {
                Some(LatencyPair {
                    from_node: name_of.get(a)?.clone(),
                    to_node: name_of.get(b)?.clone(),
                    window: Some(w.clone()),
                })
            })
            .collect();
        let facts = crate::replication::facts(&nodes);
        let matrix = crate::replication::matrix(&latest, &name_of);
        let report = planner::infer_zones(&facts, &matrix, &planner::PlanConfig::default());
        let mut zones = std::collections::HashMap::new();
        let mut zone_sources = std::collections::HashMap::new();
        for (name, a) in &report.zones.nodes {
            zones.insert(name.clone(), a.zone.clone());
            let source = match a.source {
                planner::ZoneSource::Declared => "declared",
                planner::ZoneSource::Adopted => "adopted",
                planner::ZoneSource::Inferred => "inferred",
            };
            zone_sources.insert(name.clone(), source.to_string());
        }
        let findings = report.findings.iter().map(|f| f.to_string()).collect();
        Ok(Response::new(LatencyMatrix {
            pairs,
            zones,
            zone_sources,
            findings,
        }))
    }

    async fn apply_policy(&self, req: Request<ApplyPolicyRequest>) -> Result<Response<ApplyPolicyResponse>, Status> {
        let who = crate::auth::caller(&req);
        let applied_by = who.display();
        let r = req.into_inner();
        let (dry_run, detail) = (
            r.dry_run,
            json!({"file_name": r.file_name, "allow_disruptive": r.allow_disruptive}),
        );
        let apply = crate::placement::ApplyRequest {
            file_name: if r.file_name.is_empty() {
                "policy.yaml".into()
            } else {
                r.file_name
            },
            yaml: r.yaml,
            dry_run: r.dry_run,
            allow_disruptive: r.allow_disruptive,
            applied_by,
            action: "apply".into(),
            now: SystemTime::now(),
        };
        let result = self.finish_apply(move |s| s.apply_policy(&apply)).await;
        self.audit_apply(&who, "policy.apply", dry_run, detail, &result).await;
        result
    }

    async fn rollback_policy(
        &self,
        req: Request<RollbackPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        let who = crate::auth::caller(&req);
        let applied_by = who.display();
        let r = req.into_inner();
        let (dry_run, detail) = (
            r.dry_run,
            json!({"to_revision": r.to_revision, "allow_disruptive": r.allow_disruptive}),
        );
        if r.to_revision == 0 {
            let result = Err(Status::invalid_argument(
                "give the revision to roll back to (`nimbusctl policy history` lists them)",
            ));
            self.audit_apply(&who, "policy.rollback", dry_run, detail, &result)
                .await;
            return result;
        }
        let apply = crate::placement::ApplyRequest {
            file_name: String::new(),
            yaml: String::new(),
            dry_run: r.dry_run,
            allow_disruptive: r.allow_disruptive,
            applied_by,
            action: String::new(),
            now: SystemTime::now(),
        };
        let to = r.to_revision;
        let result = self.finish_apply(move |s| s.rollback_policy(to, &apply)).await;
        self.audit_apply(&who, "policy.rollback", dry_run, detail, &result)
            .await;
        result
    }

    async fn list_policy_revisions(
        &self,
        _req: Request<ListPolicyRevisionsRequest>,
    ) -> Result<Response<ListPolicyRevisionsResponse>, Status> {
        let revs = self.ctx.state(|s| s.policy_revisions()).await?;
        Ok(Response::new(ListPolicyRevisionsResponse {
            revisions: revs.into_iter().map(|r| revision_view(r, false)).collect(),
        }))
    }

    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> Result<Response<PolicyRevision>, Status> {
        let n = req.into_inner().revision;
        match self.ctx.state(move |s| s.policy_revision(n)).await? {
            Some(r) => Ok(Response::new(revision_view(r, true))),
            None if n == 0 => Err(Status::not_found(
                "no policy applied yet; apply one with `nimbusctl apply -f policy.yaml`",
            )),
            None => Err(Status::not_found(format!(
                "no policy revision {n}; `nimbusctl policy history` lists them"
            ))),
        }
    }

    async fn decommission_nodes(
        &self,
        req: Request<DecommissionRequest>,
    ) -> Result<Response<DecommissionResponse>, Status> {
        let who = crate::auth::caller(&req);
        let by = who.display();
        let r = req.into_inner();
        if r.names.is_empty() {
            let result = Err(Status::invalid_argument(
                "name at least one node (`nimbusctl nodes` lists them)",
            ));
            self.audit(&who, "node.decommission", "nodes", outcome_of(&result), Value::Null)
                .await;
            return result;
        }
        let timeout = Duration::from_secs(u64::from(r.drain_timeout_secs.max(1)));
        let mut results = Vec::new();
        for name in r.names {
            let result = crate::decommission::one(&self.ctx, &name, r.no_drain, timeout, &by).await;
            // One entry per node: each is a separate, possibly partial, change.
            let outcome = if result.done {
                Outcome::Ok
            } else {
                Outcome::failed(result.error.clone())
            };
            let detail = json!({"no_drain": r.no_drain, "steps": result.steps});
            self.audit(&who, "node.decommission", format!("node/{name}"), outcome, detail)
                .await;
            let failed = !result.done;
            results.push(result);
            if failed {
                break; // one at a time: a failure stops the rest
            }
        }
        Ok(Response::new(DecommissionResponse { results }))
    }

    async fn get_rollout(&self, _req: Request<GetRolloutRequest>) -> Result<Response<RolloutStatus>, Status> {
        let timeout = self.ctx.config.rollout_node_timeout;
        let view = self
            .ctx
            .state(move |s| {
                let (rec, active) = match s.rollout()? {
                    Some(r) => (Some(r), true),
                    None => (s.last_rollout()?, false),
                };
                rollout_view(s, rec.as_ref(), active, timeout)
            })
            .await?;
        Ok(Response::new(view))
    }

    async fn start_upgrade(
        &self,
        req: Request<nimbus_proto::StartUpgradeRequest>,
    ) -> Result<Response<RolloutStatus>, Status> {
        let who = crate::auth::caller(&req);
        let by = who.display();
        let r = req.into_inner();
        let target = format!("release/{}", r.version);
        let detail = json!({
            "version": r.version, "canary": r.canary, "max_unavailable": r.max_unavailable, "by": r.by,
            "pause_after_canary": r.pause_after_canary, "allow_downgrade": r.allow_downgrade, "arch": r.arch,
        });
        let result = async {
            let request = crate::releases::upgrade_request(&self.ctx, r).await?;
            let timeout = self.ctx.config.rollout_node_timeout;
            let (pushed, view) = self
                .ctx
                .state(move |s| {
                    let (pushed, rec) = s.start_upgrade(&request, &by)?;
                    Ok((pushed, rollout_view(s, Some(&rec), true, timeout)?))
                })
                .await?;
            crate::placement::push(&self.ctx, pushed).await;
            Ok(Response::new(view))
        }
        .await;
        self.audit(&who, "rollout.start", target, outcome_of(&result), detail)
            .await;
        result
    }

    async fn list_audit(
        &self,
        req: Request<nimbus_proto::ListAuditRequest>,
    ) -> Result<Response<nimbus_proto::ListAuditResponse>, Status> {
        let r = req.into_inner();
        let log = std::sync::Arc::clone(self.ctx.audit.log());
        match tokio::task::spawn_blocking(move || crate::auditlog::list(&log, r.since_unix_ms, r.after_seq, r.limit))
            .await
        {
            Ok(Ok(list)) => Ok(Response::new(list)),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "listing the audit log failed");
                Err(Status::internal(format!("reading the audit log: {e}")))
            }
            Err(e) => {
                tracing::error!(error = %e, "audit list task failed");
                Err(Status::internal("internal error; see the coordinator log"))
            }
        }
    }

    async fn rotate_key(
        &self,
        req: Request<nimbus_proto::RotateKeyRequest>,
    ) -> Result<Response<nimbus_proto::RotateKeyResponse>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        let target = format!("key/{}", r.kind);
        let phase = if r.phase.is_empty() {
            "start".to_string()
        } else {
            r.phase.clone()
        };
        let result = crate::rotation::rotate(&self.ctx, r).await;
        let detail = match &result {
            // Public identities only (public keys, certificate and CA pins).
            Ok(x) => {
                serde_json::json!({"phase": phase, "state": x.state, "new": x.new_key, "old": x.old_key, "retire_at_unix": x.retire_at_unix})
            }
            Err(_) => serde_json::json!({"phase": phase}),
        };
        self.audit(&who, "key.rotate", target, crate::auditlog::outcome_of(&result), detail)
            .await;
        result.map(Response::new)
    }

    async fn list_replicas(
        &self,
        _req: Request<nimbus_proto::ListReplicasRequest>,
    ) -> Result<Response<nimbus_proto::ListReplicasResponse>, Status> {
        Ok(Response::new(crate::replicas::list(&self.ctx)))
    }

    async fn who_am_i(
        &self,
        req: Request<nimbus_proto::WhoAmIRequest>,
    ) -> Result<Response<nimbus_proto::WhoAmIResponse>, Status> {
        let c = crate::auth::caller(&req);
        Ok(Response::new(nimbus_proto::WhoAmIResponse {
            kind: c.principal.kind.as_str().into(),
            subject: c.principal.subject,
            roles: c.roles.iter().map(|r| r.as_str().to_string()).collect(),
            from: c.from,
        }))
    }

    async fn control_rollout(&self, req: Request<ControlRolloutRequest>) -> Result<Response<RolloutStatus>, Status> {
        let who = crate::auth::caller(&req);
        let by = who.display();
        let r = req.into_inner();
        let reason = clip_reason(&r.reason);
        let (action, detail) = (format!("rollout.{}", r.action), json!({ "reason": reason }));
        let result = async {
            let control: crate::rollout::Control = r.action.parse().map_err(Status::invalid_argument)?;
            let timeout = self.ctx.config.rollout_node_timeout;
            let (pushed, view) = self
                .ctx
                .state(move |s| {
                    let (pushed, rec) = s.control_rollout(control, &by, &reason)?;
                    let active = s.rollout()?.is_some();
                    Ok((pushed, rollout_view(s, Some(&rec), active, timeout)?))
                })
                .await?;
            crate::placement::push(&self.ctx, pushed).await;
            Ok(Response::new(view))
        }
        .await;
        let target = result
            .as_ref()
            .map_or_else(|_| "rollout".into(), |v| format!("rollout/{}", v.get_ref().revision));
        self.audit(&who, &action, target, outcome_of(&result), detail).await;
        result
    }

    async fn plan_replication(&self, req: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        let plan = crate::replication::plan(&self.ctx, &r.stores_yaml).await?;
        if r.keep {
            let yaml = r.stores_yaml.clone().into_bytes();
            let detail = json!({ "stores": plan.stores.len(), "bytes": yaml.len() });
            let result = self
                .ctx
                .state(move |s| s.put_config_blob(crate::replication::KEPT_STORES, &yaml))
                .await;
            self.audit(&who, "replication.keep", "config/stores", outcome_of(&result), detail)
                .await;
            result?;
            tracing::info!(
                stores = plan.stores.len(),
                "stores file kept; re-planned every probe window"
            );
        }
        let helm_yaml =
            planner::to_helm_yaml(&plan).map_err(|e| Status::internal(format!("rendering helm values: {e}")))?;
        let json = serde_json::to_string_pretty(&plan).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(PlanResponse {
            text: plan.to_string(),
            helm_yaml,
            json,
        }))
    }

    async fn revoke_node(&self, req: Request<RevokeNodeRequest>) -> Result<Response<RevokeNodeResponse>, Status> {
        let who = crate::auth::caller(&req);
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            "revoked by an operator".to_string()
        } else {
            crate::fleet::clip(r.reason, 256)
        };
        let (target, mut detail) = (format!("node/{}", r.name), json!({ "reason": reason }));
        let result = revoke(&self.ctx, r.name, reason).await;
        if let Ok((node, was_connected)) = &result {
            detail["node_id"] = json!(node.id);
            detail["was_connected"] = json!(was_connected);
        }
        self.audit(&who, "node.revoke", target, outcome_of(&result), detail)
            .await;
        let (node, was_connected) = result?;
        Ok(Response::new(RevokeNodeResponse {
            node: Some(self.node_view(node, None)),
            was_connected,
        }))
    }
}
