//! Shared server context: everything the three gRPC services and the
//! background tasks reach through one `Arc<Ctx>`.

use std::net::Ipv4Addr;
use std::sync::Arc;

use base64::Engine as _;

use crate::config::Config;
use crate::sessions::Sessions;
use crate::state::{State, StateError};

pub struct Ctx {
    pub config: Config,
    pub state: Arc<State>,
    pub sessions: Sessions,
    pub tunnel: tunnel::Tunnel,
    pub coordinator_ip: Ipv4Addr,
    /// Key rotation state; also the enrollment certificate and the CA pin new tokens carry.
    pub rotations: crate::rotation::Rotations,
    pub metrics: crate::metrics::Metrics,
    pub probes: crate::probes::Probes,
    /// Bootstrap tokens created through the Kubernetes API, to delete after each join.
    pub join_tokens: crate::join::Issued,
    /// Last label/taint reconciliation per node in its cluster, and the kick to run one soon.
    pub cluster_sync: crate::clustersync::ClusterSync,
    /// The audit log: every state-changing call appends an entry (`crate::auditlog`).
    pub audit: Arc<crate::auditlog::Auditor>,
    /// Leader election among replicas (always the leader for a single coordinator on sled).
    pub leadership: Arc<crate::leader::Leadership>,
    /// The state seen through [`crate::leader::FencedStore`]: singleton work writes through it, so a replica
    /// that lost leadership (paused, partitioned) can never apply a write of it.
    pub singleton: Arc<State>,
    /// Membership among replicas on etcd; `None` for a single coordinator (sled).
    pub replicas: Option<Arc<crate::replicas::Membership>>,
    /// The key-encryption key (on etcd: secrets in the store are sealed with it).
    pub kek: Option<Arc<crate::kek::Kek>>,
}

impl Ctx {
    /// Run a blocking state operation off the async threads.
    pub async fn state<T, F>(&self, f: F) -> Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&State) -> Result<T, StateError> + Send + 'static,
    {
        blocking(Arc::clone(&self.state), f).await
    }

    /// Like [`Ctx::state`], through the fenced store: for singleton work (run only on the leader).
    pub async fn singleton<T, F>(&self, f: F) -> Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&State) -> Result<T, StateError> + Send + 'static,
    {
        blocking(Arc::clone(&self.singleton), f).await
    }
}

async fn blocking<T, F>(state: Arc<State>, f: F) -> Result<T, tonic::Status>
where
    T: Send + 'static,
    F: FnOnce(&State) -> Result<T, StateError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&state)).await {
        Ok(r) => r.map_err(tonic::Status::from),
        Err(e) => {
            tracing::error!(error = %e, "state task failed");
            Err(tonic::Status::internal("internal error; see the coordinator log"))
        }
    }
}

/// The store's key encoding of a WireGuard public key (URL-safe base64, no padding).
pub fn key_id(key: &tunnel::PublicKey) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

/// The conventional (wg(8)) display form of a key stored as [`key_id`].
pub fn key_display(key_id: &str) -> String {
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key_id) {
        Ok(b) => base64::engine::general_purpose::STANDARD.encode(b),
        Err(_) => key_id.to_string(),
    }
}

/// Decode a stored key id back into a public key.
pub fn key_from_id(key_id: &str) -> Option<tunnel::PublicKey> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(key_id).ok()?;
    tunnel::keys::public_key_from_bytes(&b).ok()
}
