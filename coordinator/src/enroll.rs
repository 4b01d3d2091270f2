//! The Enrollment service (TLS, public address): trades a join token for a
//! node identity and adds the node as a WireGuard peer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::{IpNet, Ipv4Net};
use nimbus_proto::enrollment_server::Enrollment;
use nimbus_proto::{EnrollRequest, EnrollResponse, NodeStatus, StatusRequest, StatusResponse};
use tonic::{Request, Response, Status};

use crate::context::{Ctx, key_id};
use crate::metrics::RefusalReason;
use crate::state::{EnrollInput, NodeRecord};

pub struct EnrollmentService {
    ctx: Arc<Ctx>,
}

impl EnrollmentService {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

/// The WireGuard peer entry for an enrolled node: only its own /32 may be a
/// source address inside the tunnel.
pub fn peer_for(node: &NodeRecord, key: tunnel::PublicKey) -> tunnel::PeerConfig {
    tunnel::PeerConfig {
        public_key: key,
        endpoint: None,
        allowed_ips: vec![IpNet::V4(Ipv4Net::from(node.overlay_ip))],
        persistent_keepalive: None,
    }
}

/// Makes `node` (key `key`) a WireGuard peer of the coordinator.
pub(crate) fn add_peer(ctx: &Ctx, node: &NodeRecord, key: tunnel::PublicKey) -> Result<(), Status> {
    ctx.tunnel.add_peer(peer_for(node, key)).map_err(|e| {
        tracing::error!(error = %e, node = %node.name, "cannot add WireGuard peer");
        Status::internal("cannot add the WireGuard peer; see the coordinator log")
    })
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let remote = req.remote_addr();
        let r = req.into_inner();
        let metrics = &self.ctx.metrics;
        let key = tunnel::keys::public_key_from_bytes(&r.wg_public_key).map_err(|_| {
            metrics.enrollment_refused(RefusalReason::InvalidRequest);
            Status::invalid_argument("wg_public_key must be a 32-byte X25519 public key")
        })?;
        // Before the token is looked at: a refused version uses none of its uses.
        if let Err(status) = crate::check_agent_skew(&r.agent_version) {
            metrics.enrollment_refused(RefusalReason::Skew);
            tracing::warn!(remote = ?remote, reason = %status.message(), "enrollment refused: agent version");
            return Err(status);
        }
        let input = EnrollInput {
            public_key_b64url: key_id(&key),
            hostname: r.hostname,
            machine_id: r.machine_id,
            agent_version: r.agent_version,
            requested_name: r.node_name,
            macs: r.macs.into_iter().take(64).collect(),
        };
        let token = r.token;
        let r_token_for_audit = token.clone();
        let hostname = input.hostname.clone();
        // Not `Ctx::state`: the refusal reason needs the typed error. The token never reaches a log line.
        let state = Arc::clone(&self.ctx.state);
        let enrolled = tokio::task::spawn_blocking(move || state.enroll(&token, input, SystemTime::now())).await;
        let from = remote.map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let node = match enrolled {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                let reason = RefusalReason::of(&e);
                metrics.enrollment_refused(reason);
                let status = Status::from(e);
                tracing::warn!(remote = ?remote, reason = reason.as_str(), detail = %status.message(), "enrollment refused");
                // Only a well-formed token names a principal (its id); the secret is never recorded.
                if let Ok(t) = crate::token::JoinToken::parse(&r_token_for_audit) {
                    self.ctx
                        .audit
                        .record_enrollment(
                            &t.id,
                            from,
                            "",
                            audit::Outcome::refused(reason.as_str()),
                            serde_json::json!({"hostname": hostname}),
                        )
                        .await;
                }
                return Err(status);
            }
            Err(e) => {
                metrics.enrollment_refused(RefusalReason::Internal);
                tracing::error!(error = %e, "enrollment task failed");
                return Err(Status::internal("internal error; see the coordinator log"));
            }
        };
        let pending = node.status == crate::state::NodeStatus::Pending;
        if pending {
            tracing::warn!(
                node_id = %node.id, node = %node.name, remote = ?remote,
                "node enrolled, pending: it gets no tunnel until `nimbusctl node accept {}`", node.name
            );
        } else {
            add_peer(&self.ctx, &node, key).inspect_err(|_| metrics.enrollment_refused(RefusalReason::Internal))?;
            tracing::info!(node_id = %node.id, node = %node.name, overlay_ip = %node.overlay_ip, remote = ?remote, "node enrolled");
        }
        metrics.enrollment_accepted();
        self.ctx
            .audit
            .record_enrollment(
                &node.token_id,
                from,
                format!("node/{}", node.name),
                audit::Outcome::Ok,
                serde_json::json!({"node_id": node.id, "overlay_ip": node.overlay_ip.to_string(), "pending": pending, "hostname": node.hostname}),
            )
            .await;
        Ok(Response::new(EnrollResponse {
            node_id: node.id.clone(),
            node_name: node.name.clone(),
            overlay_ip: node.overlay_ip.to_string(),
            overlay_prefix_len: u32::from(self.ctx.config.overlay_cidr.prefix_len()),
            coordinator_wg_public_key: self.ctx.tunnel.public_key().as_bytes().to_vec(),
            coordinator_wg_endpoint: self.ctx.config.wg_endpoint(),
            coordinator_overlay_ip: IpAddr::V4(self.ctx.coordinator_ip).to_string(),
            fleet_port: u32::from(self.ctx.config.fleet_port),
            mtu: u32::from(self.ctx.config.mtu),
            labels: node.labels.clone().into_iter().collect(),
            pending,
            replicas: self.ctx.replicas.as_ref().map_or_else(Vec::new, |m| {
                m.all().iter().map(crate::replicas::ReplicaRecord::message).collect()
            }),
        }))
    }

    /// Unauthenticated by design: it reveals only whether a public key is
    /// admitted, and its answer is protected by the pinned TLS channel.
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let key = tunnel::keys::public_key_from_bytes(&req.into_inner().wg_public_key)
            .map_err(|_| Status::invalid_argument("wg_public_key must be a 32-byte X25519 public key"))?;
        let id = key_id(&key);
        let (revoked, node) = self
            .ctx
            .state(move |s| Ok((s.is_key_revoked(&id)?, s.node_by_key(&id)?)))
            .await?;
        let (status, reason) = if revoked {
            (NodeStatus::Revoked, "this node was revoked by an operator".to_string())
        } else if node
            .as_ref()
            .is_some_and(|n| n.status == crate::state::NodeStatus::Pending)
        {
            (
                NodeStatus::Pending,
                "this node waits for an operator: `nimbusctl node accept NAME`".to_string(),
            )
        } else if node.is_some() {
            (NodeStatus::Active, String::new())
        } else {
            (NodeStatus::Unknown, "this key is not enrolled".to_string())
        };
        Ok(Response::new(StatusResponse {
            status: status as i32,
            reason,
        }))
    }
}
