//! The Fleet service: one bidirectional stream per agent, served only on the
//! overlay address through the tunnel device.
//!
//! **Invariant:** the node a stream belongs to is derived from the overlay
//! source address of the TCP connection. The tunnel only delivers packets whose
//! source lies in the sending peer's allowed IPs (its own /32), so the address
//! proves the WireGuard key. Ids inside messages are only compared with that.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nimbus_proto::agent_message::Msg as AgentMsg;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::fleet_server::Fleet;
use nimbus_proto::{AgentMessage, CoordinatorMessage, DesiredState, DesiredStateRequest, HeartbeatAck, Welcome};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::context::Ctx;
use crate::state::{InventoryRecord, NodeRecord, NodeStatus};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Queue depth of messages pushed to one agent.
const PUSH_QUEUE: usize = 64;

pub struct FleetService {
    ctx: Arc<Ctx>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl FleetService {
    pub fn new(ctx: Arc<Ctx>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { ctx, shutdown }
    }
}

/// Find the active node behind an overlay source address.
async fn node_for(ctx: &Ctx, remote: Option<SocketAddr>) -> Result<NodeRecord, Status> {
    let ip = match remote.map(|a| a.ip()) {
        Some(IpAddr::V4(ip)) => ip,
        other => {
            tracing::warn!(remote = ?other, "fleet connection without an IPv4 overlay source refused");
            return Err(Status::permission_denied("not an overlay peer"));
        }
    };
    let node = ctx.state(move |s| s.node_by_ip(ip)).await?;
    match node {
        Some(n) if n.status == NodeStatus::Active => Ok(n),
        Some(n) => {
            tracing::warn!(node = %n.name, %ip, "fleet connection from a revoked node refused");
            Err(Status::permission_denied("this node was revoked"))
        }
        None => {
            tracing::warn!(%ip, "fleet connection from an unknown overlay address refused");
            Err(Status::permission_denied("unknown overlay address"))
        }
    }
}

#[tonic::async_trait]
impl Fleet for FleetService {
    type ChannelStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn channel(&self, req: Request<Streaming<AgentMessage>>) -> Result<Response<Self::ChannelStream>, Status> {
        let node = node_for(&self.ctx, req.remote_addr()).await.inspect_err(|_| {
            self.ctx.metrics.fleet_streams_refused.inc();
        })?;
        let mut inbound = req.into_inner();
        // The first message must be Hello, and it must name the node the
        // tunnel says this is.
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(AgentMsg::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message on the fleet stream must be Hello",
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10 s")),
        };
        if hello.node_id != node.id {
            tracing::warn!(
                node = %node.name, node_id = %node.id, claimed = %hello.node_id,
                "fleet stream claims another node's id: refused"
            );
            self.ctx.metrics.fleet_streams_refused.inc();
            return Err(Status::permission_denied(
                "node id does not match the WireGuard peer of this connection",
            ));
        }
        if let Err(status) = crate::check_agent_skew(&hello.agent_version) {
            tracing::warn!(node = %node.name, reason = %status.message(), "fleet stream refused: agent version");
            self.ctx.metrics.fleet_streams_refused.inc();
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(PUSH_QUEUE);
        let welcome = CoordinatorMessage {
            msg: Some(CoordMsg::Welcome(Welcome {
                node_id: node.id.clone(),
                node_name: node.name.clone(),
                heartbeat_interval_secs: u32::try_from(self.ctx.config.heartbeat_interval.as_secs())
                    .unwrap_or(u32::MAX)
                    .max(1),
            })),
        };
        if tx.send(Ok(welcome)).await.is_err() {
            return Err(Status::cancelled("stream closed"));
        }
        // During a WireGuard key rotation every agent that connects learns the next key.
        if let Some(keys) = self.ctx.rotations.wireguard_announcement(&self.ctx.tunnel)
            && tx.send(Ok(keys)).await.is_err()
        {
            return Err(Status::cancelled("stream closed"));
        }
        self.ctx.metrics.fleet_streams_opened.inc();
        if self.ctx.sessions.seen_before(&node.id) {
            self.ctx.metrics.stream_reconnects.inc();
        }
        // With replicas: the agents learn every replica, and the others where this node's stream is.
        if let Some(m) = &self.ctx.replicas
            && tx.send(Ok(m.message())).await.is_err()
        {
            return Err(Status::cancelled("stream closed"));
        }
        let (sid, cancel) = self.ctx.sessions.open(&node.id, tx.clone(), SystemTime::now());
        if let Some(m) = &self.ctx.replicas {
            let (m, id) = (Arc::clone(m), node.id.clone());
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || m.session_opened(&id, sid.number())).await {
                tracing::warn!(node = %node.name, error = %e, "session not recorded in the store; other replicas see the node as lost");
            }
        }
        match u16::try_from(hello.probe_port) {
            Ok(port) => self.ctx.probes.set_port(&node.id, port),
            Err(_) => tracing::warn!(node = %node.name, port = hello.probe_port, "invalid probe port ignored"),
        }
        // A new stream needs its probe configuration even when nothing else changed.
        self.ctx.probes.mark_dirty();
        tracing::info!(node = %node.name, node_id = %node.id, version = %hello.agent_version, "agent connected");
        let ctx = Arc::clone(&self.ctx);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = shutdown.changed() => break,
                    _ = cancel.notified() => break,
                };
                match msg {
                    Ok(Some(m)) => {
                        ctx.sessions.touch(&node.id, SystemTime::now());
                        handle(&ctx, &node, &hello.agent_version, m, &tx).await;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = %node.name, error = %e, "fleet stream error");
                        break;
                    }
                }
            }
            ctx.sessions.close(&node.id, sid);
            if let Some(m) = &ctx.replicas {
                let (m, id) = (Arc::clone(m), node.id.clone());
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || m.session_closed(&id, sid.number())).await {
                    tracing::debug!(node = %node.name, error = %e, "session key not removed; it ends with this replica's lease");
                }
            }
            ctx.probes.mark_dirty();
            tracing::info!(node = %node.name, "agent disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_desired_state(&self, req: Request<DesiredStateRequest>) -> Result<Response<DesiredState>, Status> {
        let node = node_for(&self.ctx, req.remote_addr()).await?;
        let id = node.id.clone();
        let desired = self.ctx.state(move |s| s.desired(&id)).await?;
        let mut state = crate::placement::desired_message(&desired, &node.labels, &crate::releases::url(&self.ctx));
        state.join = crate::join::instruction(&self.ctx, &node.id, &desired).await;
        Ok(Response::new(state))
    }
}

async fn handle(
    ctx: &Arc<Ctx>,
    node: &NodeRecord,
    version: &str,
    m: AgentMessage,
    tx: &mpsc::Sender<Result<CoordinatorMessage, Status>>,
) {
    match m.msg {
        Some(AgentMsg::Heartbeat(hb)) => {
            ctx.metrics.heartbeats.inc();
            let ack = CoordinatorMessage {
                msg: Some(CoordMsg::HeartbeatAck(HeartbeatAck { seq: hb.seq })),
            };
            let _ = tx.try_send(Ok(ack));
        }
        Some(AgentMsg::Inventory(inv)) => {
            let rec = InventoryRecord {
                hostname: clip(inv.hostname, 253),
                cpus: inv.cpus,
                memory_bytes: inv.memory_bytes,
                kernel: clip(inv.kernel, 256),
                os_release: clip(inv.os_release, 256),
            };
            let id = node.id.clone();
            let version = clip(version.to_string(), 64);
            if let Err(e) = ctx.state(move |s| s.set_inventory(&id, rec, &version)).await {
                tracing::warn!(node = %node.name, error = %e.message(), "inventory not stored");
            } else {
                tracing::debug!(node = %node.name, "inventory stored");
            }
            if inv.document.is_empty() {
                return;
            }
            let doc = match parse_document(&inv.document, inv.document_schema) {
                Ok(d) => d,
                Err(why) => {
                    tracing::warn!(node = %node.name, %why, "inventory document refused");
                    return;
                }
            };
            let id = node.id.clone();
            match ctx.state(move |s| s.set_hardware(&id, doc, SystemTime::now())).await {
                Ok(changes) if changes.is_empty() => tracing::debug!(node = %node.name, "inventory unchanged"),
                Ok(changes) => {
                    ctx.metrics.inventory_changes.inc();
                    tracing::info!(node = %node.name, ?changes, "inventory changed");
                    crate::placement::reconcile(ctx).await;
                }
                Err(e) => tracing::warn!(node = %node.name, error = %e.message(), "inventory document not stored"),
            }
        }
        Some(AgentMsg::Latency(report)) => {
            let n = report.windows.len().min(MAX_WINDOWS_PER_REPORT);
            for w in report.windows.iter().take(n) {
                ctx.metrics.probe_window(w);
            }
            let kept = ctx
                .probes
                .record(&node.id, report.windows.into_iter().take(n).collect());
            tracing::debug!(node = %node.name, windows = n, kept, "latency windows");
        }
        Some(AgentMsg::Observed(o)) => {
            let id = node.id.clone();
            let mut rec = crate::placement::ObservedRecord {
                generation: o.generation,
                policy_revision: o.policy_revision,
                error: clip(o.error, 1024),
                at: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                kubelet: match o.kubelet.as_str() {
                    k @ ("joined" | "failed" | "reset" | "drifted") => k.to_string(),
                    _ => String::new(),
                },
                join_error: clip(o.join_error, 2048),
                kubelet_server: if o.kubelet == "joined" {
                    clip(o.kubelet_server, 256)
                } else {
                    String::new()
                },
                drift: clip(
                    o.drift_corrected
                        .iter()
                        .take(16)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; "),
                    2048,
                ),
                drift_at: 0,
                storage: o
                    .storage
                    .into_iter()
                    .take(32)
                    .map(|v| crate::placement::StorageStatus {
                        name: clip(v.name, 64),
                        state: match v.state.as_str() {
                            s @ ("ready" | "created" | "refused" | "failed" | "removed") => s.to_string(),
                            _ => "failed".to_string(),
                        },
                        detail: clip(v.detail, 1024),
                    })
                    .collect(),
                agent_version: clip(o.agent_version, 64),
                failed_releases: o
                    .failed_releases
                    .into_iter()
                    .take(16)
                    .map(|f| crate::placement::FailedRelease {
                        version: clip(f.version, 64),
                        reason: clip(f.reason, 512),
                        at: f.at_unix,
                    })
                    .collect(),
            };
            for v in rec
                .storage
                .iter()
                .filter(|v| v.state == "refused" || v.state == "failed")
            {
                tracing::warn!(node = %node.name, volume = %v.name, state = %v.state, detail = %v.detail, "storage not prepared on the node");
            }
            if !rec.drift.is_empty() {
                rec.drift_at = rec.at;
                ctx.metrics.host_drift_corrected.inc_by(o.drift_corrected.len() as u64);
                tracing::warn!(node = %node.name, drift = %rec.drift, "hand-made changes on the node found and reverted by its agent");
            }
            let (generation, failed) = (rec.generation, !rec.error.is_empty());
            let kubelet = rec.kubelet.clone();
            if kubelet == "failed" {
                tracing::warn!(node = %node.name, error = %rec.join_error, "kubelet join failed on the node");
            } else if kubelet == "drifted" {
                tracing::warn!(node = %node.name, why = %rec.join_error, "kubelet join undone on the node by hand; sending a fresh join");
            } else if kubelet == "joined" {
                tracing::info!(node = %node.name, server = %rec.kubelet_server, "kubelet joined");
                ctx.cluster_sync.kick();
            }
            match ctx.state(move |s| s.observe(&id, rec)).await {
                Ok(pushed) => {
                    if failed {
                        tracing::warn!(node = %node.name, generation, "agent failed to apply its desired state");
                    } else {
                        tracing::info!(node = %node.name, generation, "desired state applied");
                    }
                    crate::placement::push(ctx, pushed).await;
                    crate::join::reported(ctx, &node.id, &kubelet).await;
                }
                Err(e) => tracing::warn!(node = %node.name, error = %e.message(), "observed state refused"),
            }
        }
        Some(AgentMsg::Hello(_)) => tracing::debug!(node = %node.name, "repeated Hello ignored"),
        None => tracing::debug!(node = %node.name, "empty agent message ignored"),
    }
}

/// Most windows taken from one latency report (64 peers per window, a few windows of backlog).
pub const MAX_WINDOWS_PER_REPORT: usize = 1024;

/// Largest inventory document accepted from an agent (a host with hundreds of disks stays well below).
pub const MAX_INVENTORY_DOCUMENT: usize = 1 << 20;

/// Parse an agent's inventory document as hostile input: bounded size, known schema, typed.
pub fn parse_document(bytes: &[u8], schema: u32) -> Result<inventory::Inventory, String> {
    if bytes.len() > MAX_INVENTORY_DOCUMENT {
        return Err(format!(
            "{} bytes is over the {MAX_INVENTORY_DOCUMENT}-byte limit",
            bytes.len()
        ));
    }
    if schema != inventory::DOCUMENT_SCHEMA {
        return Err(format!(
            "schema {schema} is not {} (upgrade the coordinator before the agents)",
            inventory::DOCUMENT_SCHEMA
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("not an inventory document: {e}"))
}

/// Bound a string from the network to `max` bytes (on a char boundary),
/// dropping control characters.
pub fn clip(s: String, max: usize) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn inventory_documents_are_checked() {
        let doc = inventory::Inventory::default();
        let bytes = serde_json::to_vec(&doc).unwrap();
        assert_eq!(super::parse_document(&bytes, inventory::DOCUMENT_SCHEMA).unwrap(), doc);
        assert!(super::parse_document(&bytes, 99).unwrap_err().contains("schema 99"));
        assert!(super::parse_document(b"{\"cpu\": 7}", inventory::DOCUMENT_SCHEMA).is_err());
        let huge = vec![b' '; super::MAX_INVENTORY_DOCUMENT + 1];
        assert!(
            super::parse_document(&huge, inventory::DOCUMENT_SCHEMA)
                .unwrap_err()
                .contains("limit")
        );
    }

    #[test]
    fn clip_bounds_and_strips_control() {
        assert_eq!(clip("ab\ncd".into(), 10), "abcd");
        assert_eq!(clip("ééé".into(), 3), "é");
    }
}
