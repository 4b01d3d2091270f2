//! Key rotation: the coordinator's WireGuard key, the enrollment TLS certificate, and the CA.
//!
//! * **WireGuard** (`start_wireguard` / `finish_wireguard`): a new key is created (`wg.key.next`, 0600) and the
//!   tunnel answers handshakes on both keys; every connected agent is told over its stream
//!   (`CoordinatorKeys`), and agents connecting during the overlap are told in their Hello answer. An agent
//!   switches its coordinator peer to the new key and handshakes at once: its stream keeps running (same overlay
//!   addresses). At the retire time (or `finish`) the old key is dropped and `wg.key.next` replaces `wg.key`
//!   (one rename). A restart during the overlap resumes it from the two files.
//! * **Enrollment certificate** (`rotate_enrollment_cert`): a new leaf from the same CA (or the operator's files
//!   read again) swapped into the enrollment listener without a restart; the pin agents check is unchanged.
//! * **CA** (`start_ca` / `finish_ca`): `pki::CertificateAuthority::rotate` makes a new CA cross-signed by the
//!   old one; the enrollment listener presents a chain both pins verify, new tokens carry the new pin; finishing
//!   retires the old CA and tokens pinned to it stop working.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::{CoordinatorKeys, CoordinatorMessage, RotateKeyResponse};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::context::Ctx;

/// The next WireGuard key during a rotation.
pub const NEXT_WG_KEY: &str = "wg.key.next";
/// When the old key is retired (JSON `{"retire_at": unix}`), beside `wg.key.next`.
pub const WG_ROTATION_FILE: &str = "wg-rotation.json";
/// Default overlap of a WireGuard key rotation.
pub const DEFAULT_WG_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// Default overlap of a CA rotation (tokens pinned to the old CA keep working meanwhile).
pub const DEFAULT_CA_OVERLAP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
struct WgRotationFile {
    retire_at: u64,
}

/// Rotation state shared by the admin service, the fleet service and the watcher task.
pub struct Rotations {
    data_dir: PathBuf,
    wg: Mutex<Option<WgRotationFile>>,
    /// The certificate the enrollment listener presents (swapped in place).
    pub enroll_cert: Arc<pki::SwappableServerCert>,
    /// The coordinator's own CA (`None` with operator-provided TLS files).
    ca: Mutex<Option<pki::CertificateAuthority>>,
    ca_retire_at: Mutex<Option<u64>>,
    /// The pin new join tokens carry.
    pin: Mutex<pki::Pin>,
    sans: Vec<String>,
    tls_files: Option<crate::config::TlsFiles>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn internal(what: &str) -> impl Fn(&dyn std::fmt::Display) -> Status + '_ {
    move |e| {
        tracing::error!(error = %e, "{what}");
        Status::internal(format!("{what}: {e}; see the coordinator log"))
    }
}

impl Rotations {
    /// State at start: resumes a WireGuard rotation left by a restart (call [`Rotations::resume_wireguard`]
    /// once the tunnel runs).
    pub fn new(
        data_dir: &Path,
        enroll_cert: Arc<pki::SwappableServerCert>,
        ca: Option<pki::CertificateAuthority>,
        pin: pki::Pin,
        sans: Vec<String>,
        tls_files: Option<crate::config::TlsFiles>,
    ) -> Rotations {
        Rotations {
            data_dir: data_dir.to_path_buf(),
            wg: Mutex::new(None),
            enroll_cert,
            ca: Mutex::new(ca),
            ca_retire_at: Mutex::new(None),
            pin: Mutex::new(pin),
            sans,
            tls_files,
        }
    }

    /// The CA pin new join tokens carry.
    pub fn pin(&self) -> pki::Pin {
        *self.pin.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wg_state(&self) -> Option<WgRotationFile> {
        *self.wg.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A rotation interrupted by a restart: the tunnel answers on the next key again until its retire time.
    pub fn resume_wireguard(&self, tunnel: &tunnel::Tunnel) -> Result<(), crate::CoordError> {
        let next = self.data_dir.join(NEXT_WG_KEY);
        if !next.exists() {
            return Ok(());
        }
        let state: WgRotationFile = std::fs::read(self.data_dir.join(WG_ROTATION_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(WgRotationFile {
                retire_at: unix(SystemTime::now() + DEFAULT_WG_OVERLAP),
            });
        let secret = tunnel::keys::load_or_create_secret(&next)?;
        let public = tunnel.start_key_rotation(secret)?;
        tracing::warn!(
            next = %tunnel::keys::public_key_to_base64(&public),
            retire_at = state.retire_at,
            "WireGuard key rotation resumed after a restart"
        );
        *self.wg.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        Ok(())
    }

    /// The announcement for agents while a WireGuard rotation runs.
    pub fn wireguard_announcement(&self, tunnel: &tunnel::Tunnel) -> Option<CoordinatorMessage> {
        let state = self.wg_state()?;
        let old = tunnel.previous_public_key()?;
        Some(CoordinatorMessage {
            msg: Some(CoordMsg::CoordinatorKeys(CoordinatorKeys {
                current: tunnel::keys::public_key_to_base64(&old),
                next: tunnel::keys::public_key_to_base64(&tunnel.public_key()),
                retire_at_unix: state.retire_at,
            })),
        })
    }
}

/// Starts a WireGuard key rotation and tells every connected agent.
pub async fn start_wireguard(ctx: &Ctx, overlap: Duration) -> Result<RotateKeyResponse, Status> {
    let rot = &ctx.rotations;
    if rot.wg_state().is_some() {
        return Err(Status::failed_precondition(
            "a WireGuard key rotation is already running; finish it first (`nimbusctl key rotate wireguard --finish`)",
        ));
    }
    let next_path = rot.data_dir.join(NEXT_WG_KEY);
    // A stale next key (a start that failed half-way) is replaced, never reused.
    let _ = std::fs::remove_file(&next_path);
    let secret =
        tunnel::keys::load_or_create_secret(&next_path).map_err(|e| internal("creating the next WireGuard key")(&e))?;
    let state = WgRotationFile {
        retire_at: unix(SystemTime::now() + overlap),
    };
    let json = serde_json::to_vec(&state).map_err(|e| internal("recording the rotation")(&e))?;
    write_atomic(&rot.data_dir.join(WG_ROTATION_FILE), &json).map_err(|e| internal("recording the rotation")(&e))?;
    let old = ctx.tunnel.public_key();
    let new = ctx
        .tunnel
        .start_key_rotation(secret)
        .map_err(|e| internal("starting the WireGuard key rotation")(&e))?;
    *rot.wg.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    sealed_for_replicas(ctx);
    let notified = announce_all(ctx).await;
    tracing::info!(
        old = %tunnel::keys::public_key_to_base64(&old),
        new = %tunnel::keys::public_key_to_base64(&new),
        retire_at = state.retire_at,
        agents_notified = notified,
        "WireGuard key rotation started: both keys accepted until the old one is retired"
    );
    Ok(RotateKeyResponse {
        kind: "wireguard".into(),
        state: "overlap".into(),
        new_key: tunnel::keys::public_key_to_base64(&new),
        old_key: tunnel::keys::public_key_to_base64(&old),
        retire_at_unix: state.retire_at,
        agents_notified: u32::try_from(notified).unwrap_or(u32::MAX),
    })
}

/// With replicas: this replica's key files sealed into the store again and its registry entry updated
/// (`crate::replicas::rotated_wireguard`). A failure is logged: the local rotation stands, and a restart with an
/// empty data dir would bring back the sealed (older) key.
fn sealed_for_replicas(ctx: &Ctx) {
    if let Err(e) = crate::replicas::rotated_wireguard(ctx) {
        tracing::error!(
            error = %e,
            "the rotated WireGuard key is not sealed into the store (etcd unreachable?); keep this replica's data dir, \
             or rotate again once etcd answers"
        );
    }
}

/// Tells every connected agent of the running WireGuard rotation. Returns how many were told.
pub async fn announce_all(ctx: &Ctx) -> usize {
    let Some(msg) = ctx.rotations.wireguard_announcement(&ctx.tunnel) else {
        return 0;
    };
    let nodes = ctx.state(|s| s.list_nodes()).await.unwrap_or_default();
    nodes.iter().filter(|n| ctx.sessions.send(&n.id, msg.clone())).count()
}

/// Retires the old WireGuard key: only the new one is answered from now on, and it becomes `wg.key`.
pub fn finish_wireguard(ctx: &Ctx) -> Result<RotateKeyResponse, Status> {
    let rot = &ctx.rotations;
    let mut guard = rot.wg.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        return Err(Status::failed_precondition("no WireGuard key rotation is running"));
    }
    let old = ctx.tunnel.previous_public_key();
    let stranded = ctx
        .tunnel
        .finish_key_rotation()
        .map_err(|e| internal("finishing the WireGuard key rotation")(&e))?;
    std::fs::rename(rot.data_dir.join(NEXT_WG_KEY), rot.data_dir.join("wg.key"))
        .map_err(|e| internal("installing the new WireGuard key")(&e))?;
    let _ = std::fs::remove_file(rot.data_dir.join(WG_ROTATION_FILE));
    *guard = None;
    drop(guard);
    sealed_for_replicas(ctx);
    let new = ctx.tunnel.public_key();
    if stranded > 0 {
        tracing::warn!(
            stranded,
            "WireGuard key rotation finished with peers still on the old key; they reconnect once they learn the new one"
        );
    } else {
        tracing::info!(new = %tunnel::keys::public_key_to_base64(&new), "WireGuard key rotation finished; old key retired");
    }
    Ok(RotateKeyResponse {
        kind: "wireguard".into(),
        state: "done".into(),
        new_key: tunnel::keys::public_key_to_base64(&new),
        old_key: old.map(|k| tunnel::keys::public_key_to_base64(&k)).unwrap_or_default(),
        retire_at_unix: 0,
        agents_notified: 0,
    })
}

/// A new enrollment certificate under the same CA (or the operator's files read again), swapped in place.
pub fn rotate_enrollment_cert(ctx: &Ctx) -> Result<RotateKeyResponse, Status> {
    let rot = &ctx.rotations;
    let old = rot.enroll_cert.leaf_pin().map(|p| p.to_string()).unwrap_or_default();
    let identity = issue(rot)?;
    rot.enroll_cert
        .replace(&identity)
        .map_err(|e| internal("installing the new enrollment certificate")(&e))?;
    let new = rot.enroll_cert.leaf_pin().map(|p| p.to_string()).unwrap_or_default();
    tracing::info!(%old, %new, "enrollment certificate rotated (same CA pin)");
    Ok(RotateKeyResponse {
        kind: "enrollment-cert".into(),
        state: "done".into(),
        new_key: new,
        old_key: old,
        retire_at_unix: 0,
        agents_notified: 0,
    })
}

fn issue(rot: &Rotations) -> Result<pki::ServerIdentity, Status> {
    if let Some(files) = &rot.tls_files {
        let ca_pem = std::fs::read_to_string(&files.ca)
            .map_err(|e| Status::failed_precondition(format!("reading tls_ca {}: {e}", files.ca.display())))?;
        return pki::ServerIdentity::from_files(&files.cert, &files.key)
            .and_then(|i| i.with_ca(&ca_pem))
            .map_err(|e| Status::failed_precondition(format!("the operator's TLS files: {e}")));
    }
    let ca = rot.ca.lock().unwrap_or_else(|p| p.into_inner());
    let ca = ca
        .as_ref()
        .ok_or_else(|| Status::failed_precondition("this coordinator has no CA of its own"))?;
    ca.issue_server_identity(&rot.sans)
        .map_err(|e| internal("issuing the enrollment certificate")(&e))
}

/// Starts a CA rotation: new CA cross-signed by the old one, enrollment certificate re-issued, new tokens carry
/// the new pin; both pins are accepted until `finish_ca`.
pub fn start_ca(ctx: &Ctx, overlap: Duration) -> Result<RotateKeyResponse, Status> {
    let rot = &ctx.rotations;
    let (old, new) = {
        let mut guard = rot.ca.lock().unwrap_or_else(|p| p.into_inner());
        let ca = guard.as_mut().ok_or_else(|| {
            Status::failed_precondition(
                "the enrollment TLS comes from the operator's files (tls_cert/tls_ca): rotate that CA outside and restart",
            )
        })?;
        if ca.rotation_in_progress() {
            return Err(Status::failed_precondition(
                "a CA rotation is already running; finish it first (`nimbusctl key rotate ca --finish`)",
            ));
        }
        let old = ca.pin();
        let new = ca.rotate().map_err(|e| internal("rotating the CA")(&e))?;
        (old, new)
    };
    let identity = issue(rot)?;
    rot.enroll_cert
        .replace(&identity)
        .map_err(|e| internal("installing the new enrollment certificate")(&e))?;
    *rot.pin.lock().unwrap_or_else(|p| p.into_inner()) = new;
    let retire_at = unix(SystemTime::now() + overlap);
    *rot.ca_retire_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(retire_at);
    tracing::info!(%old, %new, retire_at, "CA rotation started: both pins accepted, new tokens carry the new one");
    Ok(RotateKeyResponse {
        kind: "ca".into(),
        state: "overlap".into(),
        new_key: new.to_string(),
        old_key: old.to_string(),
        retire_at_unix: retire_at,
        agents_notified: 0,
    })
}

/// Retires the old CA: the enrollment listener presents only the new chain; tokens pinned to the old CA fail.
pub fn finish_ca(ctx: &Ctx) -> Result<RotateKeyResponse, Status> {
    let rot = &ctx.rotations;
    let old = {
        let mut guard = rot.ca.lock().unwrap_or_else(|p| p.into_inner());
        let ca = guard
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("this coordinator has no CA of its own"))?;
        if !ca.rotation_in_progress() {
            return Err(Status::failed_precondition("no CA rotation is running"));
        }
        let old = ca.previous_pin();
        ca.finish_rotation()
            .map_err(|e| internal("finishing the CA rotation")(&e))?;
        old
    };
    let identity = issue(rot)?;
    rot.enroll_cert
        .replace(&identity)
        .map_err(|e| internal("installing the new enrollment certificate")(&e))?;
    *rot.ca_retire_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let new = rot.pin();
    tracing::info!(%new, "CA rotation finished; the old CA is retired");
    Ok(RotateKeyResponse {
        kind: "ca".into(),
        state: "done".into(),
        new_key: new.to_string(),
        old_key: old.map(|p| p.to_string()).unwrap_or_default(),
        retire_at_unix: 0,
        agents_notified: 0,
    })
}

/// Finishes rotations whose overlap has ended (every few seconds until shutdown).
pub async fn watch(ctx: Arc<Ctx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return,
        }
        let now = unix(SystemTime::now());
        if ctx.rotations.wg_state().is_some_and(|s| s.retire_at <= now)
            && let Err(e) = finish_wireguard(&ctx)
        {
            tracing::error!(error = %e.message(), "finishing the WireGuard key rotation at its retire time");
        }
        let ca_due = ctx
            .rotations
            .ca_retire_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t <= now);
        if ca_due && let Err(e) = finish_ca(&ctx) {
            tracing::error!(error = %e.message(), "finishing the CA rotation at its retire time");
        }
    }
}

/// The RotateKey RPC: `kind` × `phase`.
pub async fn rotate(ctx: &Ctx, req: nimbus_proto::RotateKeyRequest) -> Result<RotateKeyResponse, Status> {
    if ctx.replicas.is_some() && req.kind == "ca" {
        // Every replica would have to reload the new CA and re-issue its enrollment certificate at once.
        return Err(Status::failed_precondition(
            "CA rotation is not supported yet with the state on etcd (replicas share one CA sealed in the store); \
             nothing was changed. WireGuard keys and enrollment certificates rotate per replica: run the command \
             against each replica",
        ));
    }
    let overlap = |default: Duration| {
        if req.overlap_secs == 0 {
            default
        } else {
            Duration::from_secs(req.overlap_secs)
        }
    };
    match (req.kind.as_str(), req.phase.as_str()) {
        ("wireguard", "" | "start") => start_wireguard(ctx, overlap(DEFAULT_WG_OVERLAP)).await,
        ("wireguard", "finish") => finish_wireguard(ctx),
        ("enrollment-cert", "" | "start") => rotate_enrollment_cert(ctx),
        ("ca", "" | "start") => start_ca(ctx, overlap(DEFAULT_CA_OVERLAP)),
        ("ca", "finish") => finish_ca(ctx),
        (k, p) => Err(Status::invalid_argument(format!(
            "cannot rotate kind {k:?} with phase {p:?}: kinds are wireguard, enrollment-cert and ca; phases start (default) and finish (wireguard, ca)"
        ))),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}
