//! The Admin service for `nimbusctl`, served on a local Unix socket (0600).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nimbus_proto::admin_server::Admin;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::{
    CoordinatorMessage, CreateTokenRequest, CreateTokenResponse, GetNodeRequest, Inventory, LatencyMatrix, LatencyPair,
    LatencyRequest, ListNodesRequest, ListNodesResponse, ListTokensRequest, ListTokensResponse, Node, PlanRequest,
    PlanResponse, RevokeNodeRequest, RevokeNodeResponse, RevokeTokenRequest, RevokeTokenResponse, Revoked, TokenInfo,
};
use tonic::{Request, Response, Status};

use crate::context::{Ctx, key_display, key_from_id};
use crate::state::{HardwareRecord, NodeRecord, NodeStatus, TokenRecord};

/// Longest token lifetime `token create` accepts.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long revocation waits for the agent to close its stream after the
/// Revoked message before the peer is removed anyway.
const REVOKE_GRACE: Duration = Duration::from_secs(2);

pub struct AdminService {
    ctx: Arc<Ctx>,
}

impl AdminService {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }

    fn node_view(&self, n: NodeRecord, hw: Option<HardwareRecord>) -> Node {
        let connected = self.ctx.sessions.is_connected(&n.id);
        let state = match (n.status, connected) {
            (NodeStatus::Revoked, _) => "revoked",
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
        }
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
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        let r = req.into_inner();
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
        let (token, rec) = self
            .ctx
            .state(move |s| s.create_token(ttl, r.uses, labels, description, SystemTime::now()))
            .await?;
        tracing::info!(token_id = %rec.id, uses = rec.uses_total, expires_at = rec.expires_at, "join token created");
        Ok(Response::new(CreateTokenResponse {
            token: token.to_string_secret(),
            token_id: rec.id,
            ca_pin: self.ctx.ca_pin.to_string(),
            expires_at_unix: rec.expires_at,
            enroll_endpoints: vec![self.ctx.config.enroll_endpoint()],
        }))
    }

    async fn list_tokens(&self, _req: Request<ListTokensRequest>) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self.ctx.state(|s| s.list_tokens()).await?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens.into_iter().map(token_view).collect(),
        }))
    }

    async fn revoke_token(&self, req: Request<RevokeTokenRequest>) -> Result<Response<RevokeTokenResponse>, Status> {
        let id = req.into_inner().id;
        let rec = self.ctx.state(move |s| s.revoke_token(&id)).await?;
        tracing::info!(token_id = %rec.id, "join token revoked");
        Ok(Response::new(RevokeTokenResponse {
            token: Some(token_view(rec)),
        }))
    }

    async fn list_nodes(&self, _req: Request<ListNodesRequest>) -> Result<Response<ListNodesResponse>, Status> {
        let nodes = self.ctx.state(|s| with_hardware(s, s.list_nodes()?)).await?;
        Ok(Response::new(ListNodesResponse {
            nodes: nodes.into_iter().map(|(n, hw)| self.node_view(n, hw)).collect(),
        }))
    }

    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let name = req.into_inner().name;
        let shown = name.clone();
        let found = self
            .ctx
            .state(move |s| with_hardware(s, s.node_by_name(&name)?.into_iter().collect()))
            .await?;
        match found.into_iter().next() {
            Some((n, hw)) => Ok(Response::new(self.node_view(n, hw))),
            None => Err(Status::not_found(format!(
                "no node named `{shown}`; list nodes with `nimbusctl nodes`"
            ))),
        }
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

    async fn plan_replication(&self, req: Request<PlanRequest>) -> Result<Response<PlanResponse>, Status> {
        let r = req.into_inner();
        let plan = crate::replication::plan(&self.ctx, &r.stores_yaml).await?;
        if r.keep {
            let yaml = r.stores_yaml.clone().into_bytes();
            self.ctx
                .state(move |s| s.put_config_blob(crate::replication::KEPT_STORES, &yaml))
                .await?;
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
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            "revoked by an operator".to_string()
        } else {
            crate::fleet::clip(r.reason, 256)
        };
        let name = r.name;
        let why = reason.clone();
        let node = self
            .ctx
            .state(move |s| s.revoke_node(&name, &why, SystemTime::now()))
            .await?;
        let was_connected = self.ctx.sessions.send(
            &node.id,
            CoordinatorMessage {
                msg: Some(CoordMsg::Revoked(Revoked { reason: reason.clone() })),
            },
        );
        if was_connected {
            // Give the Revoked message time to cross the tunnel; the agent
            // closes its stream when it has it.
            let deadline = tokio::time::Instant::now() + REVOKE_GRACE;
            while self.ctx.sessions.is_connected(&node.id) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.ctx.sessions.kick(&node.id);
        if let Some(k) = key_from_id(&node.public_key) {
            self.ctx.tunnel.remove_peer(&k);
        }
        self.ctx.metrics.node_revocations.inc();
        self.ctx.probes.forget(&node.id);
        tracing::warn!(node = %node.name, node_id = %node.id, %reason, was_connected, "node revoked; WireGuard peer removed");
        Ok(Response::new(RevokeNodeResponse {
            node: Some(self.node_view(node, None)),
            was_connected,
        }))
    }
}
