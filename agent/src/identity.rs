//! The agent's persisted identity: `identity.json` (0600) beside the
//! WireGuard private key `wg.key` (0600) in the state directory. Written
//! atomically, only after a successful enrollment; its presence means "do not
//! enroll again".
//!
//! `identity.json` also keeps the coordinator replicas this agent knows ([`Identity::replicas`], from
//! enrollment and the fleet stream's `Replicas` messages). An empty list means one coordinator, described by the
//! `coordinator_*` fields; such files (and those written before replicas existed) stay readable by older agent
//! versions, which matters when the launcher rolls an upgrade back.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

pub const IDENTITY_FILE: &str = "identity.json";
pub const KEY_FILE: &str = "wg.key";
/// The id [`Identity::replica_peers`] gives the single coordinator of an identity without a replica list.
pub const SINGLE_REPLICA_ID: &str = "coordinator";

/// One coordinator replica as this agent reaches it: a WireGuard peer of its own and a Fleet service on its
/// overlay address. Checked when it arrives ([`crate::replicas::validate`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaPeer {
    /// Stable replica id (not a secret; in logs).
    pub id: String,
    /// The replica's WireGuard public key, standard base64 (as `coordinator_public_key`).
    pub public_key: String,
    /// The replica's WireGuard UDP endpoint.
    pub wg_endpoint: SocketAddr,
    /// The replica's overlay address (routed to its peer as a /32).
    pub overlay_ip: Ipv4Addr,
    /// TCP port of its Fleet service on `overlay_ip`.
    pub fleet_port: u16,
}

impl ReplicaPeer {
    /// The replica's WireGuard public key.
    pub fn key(&self) -> Result<tunnel::PublicKey, tunnel::TunnelError> {
        tunnel::keys::public_key_from_base64(&self.public_key)
    }

    /// Where its Fleet service listens (through the tunnel).
    pub fn fleet_addr(&self) -> SocketAddr {
        SocketAddr::from((self.overlay_ip, self.fleet_port))
    }
}

/// What a coordinator key announcement ([`Identity::follow_key`]) changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFollow {
    /// A replica has the announced next key already: nothing to do.
    AlreadyFollowed,
    /// No replica has the announced current key: ignored.
    UnknownKey,
    /// The replica `replica` moved from the current to the next key (in this identity; the tunnel peer is the
    /// caller's).
    Switched { replica: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub node_id: String,
    pub node_name: String,
    pub overlay_ip: Ipv4Addr,
    pub overlay_prefix_len: u8,
    /// Coordinator WireGuard public key, standard base64.
    pub coordinator_public_key: String,
    pub coordinator_wg_endpoint: SocketAddr,
    pub coordinator_overlay_ip: Ipv4Addr,
    pub fleet_port: u16,
    pub mtu: u16,
    /// Enrollment endpoint and CA pin, kept to ask about revocation later.
    pub enroll_endpoint: String,
    pub ca_pin: String,
    /// Every coordinator replica, the enrolling one included; empty for a single coordinator (the
    /// `coordinator_*` fields). Use [`Identity::replica_peers`], which covers both. Left out of the file when
    /// empty, so a single coordinator's identity stays readable by agents that predate replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaPeer>,
}

impl Identity {
    /// The single coordinator the `coordinator_*` fields describe, as a replica with id [`SINGLE_REPLICA_ID`].
    fn single_replica(&self) -> ReplicaPeer {
        ReplicaPeer {
            id: SINGLE_REPLICA_ID.to_string(),
            public_key: self.coordinator_public_key.clone(),
            wg_endpoint: self.coordinator_wg_endpoint,
            overlay_ip: self.coordinator_overlay_ip,
            fleet_port: self.fleet_port,
        }
    }

    /// The coordinator replicas to keep a tunnel peer for: the stored list, or the one coordinator of the
    /// `coordinator_*` fields (id [`SINGLE_REPLICA_ID`]) when the list is empty. Never empty.
    pub fn replica_peers(&self) -> Vec<ReplicaPeer> {
        if self.replicas.is_empty() {
            vec![self.single_replica()]
        } else {
            self.replicas.clone()
        }
    }

    /// The id of the replica the `coordinator_*` fields name (the one this agent enrolled with, by its key),
    /// if it is listed: where the first fleet stream goes.
    pub fn primary_replica(&self) -> Option<String> {
        self.replica_peers()
            .into_iter()
            .find(|r| r.public_key == self.coordinator_public_key)
            .map(|r| r.id)
    }

    /// This node's overlay network (`overlay_ip/overlay_prefix_len`, truncated); `None` if the prefix length is
    /// over 32.
    pub fn overlay_net(&self) -> Option<Ipv4Net> {
        Ipv4Net::new(self.overlay_ip, self.overlay_prefix_len)
            .ok()
            .map(|n| n.trunc())
    }

    /// Replaces the replica list (already validated) and says whether the stored list changed, i.e. whether
    /// `identity.json` must be written. A list of one replica that is exactly the `coordinator_*` coordinator
    /// (key, endpoints, port) is stored as the empty list: a single coordinator's identity keeps its old form.
    pub fn set_replicas(&mut self, list: Vec<ReplicaPeer>) -> bool {
        let single = self.single_replica();
        let same_as_single = |r: &ReplicaPeer| {
            r.public_key == single.public_key
                && r.wg_endpoint == single.wg_endpoint
                && r.overlay_ip == single.overlay_ip
                && r.fleet_port == single.fleet_port
        };
        let stored = match list.as_slice() {
            [only] if same_as_single(only) => Vec::new(),
            _ => list,
        };
        if stored == self.replicas {
            return false;
        }
        self.replicas = stored;
        true
    }

    /// Follows a coordinator key announcement: the replica whose key is `current` gets `next`, and so does
    /// `coordinator_public_key` when it names that replica (the primary). Keys are compared as keys, not text.
    pub fn follow_key(&mut self, current: &tunnel::PublicKey, next: &tunnel::PublicKey) -> KeyFollow {
        let is =
            |text: &str, key: &tunnel::PublicKey| tunnel::keys::public_key_from_base64(text).is_ok_and(|k| k == *key);
        let peers = self.replica_peers();
        if peers.iter().any(|r| is(&r.public_key, next)) {
            return KeyFollow::AlreadyFollowed;
        }
        let Some(replica) = peers.iter().find(|r| is(&r.public_key, current)) else {
            return KeyFollow::UnknownKey;
        };
        let next_text = tunnel::keys::public_key_to_base64(next);
        if let Some(r) = self.replicas.iter_mut().find(|r| r.id == replica.id) {
            r.public_key = next_text.clone();
        }
        if is(&self.coordinator_public_key, current) {
            self.coordinator_public_key = next_text;
        }
        KeyFollow::Switched {
            replica: replica.id.clone(),
        }
    }
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> AgentError {
    AgentError::StateDir {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Create the state directory (0700) and prove it is writable.
pub fn prepare_state_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| state_err(dir, e))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(|e| state_err(dir, format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn identity_path(dir: &Path) -> PathBuf {
    dir.join(IDENTITY_FILE)
}

/// Load the identity, `None` if the host is not enrolled.
pub fn load(dir: &Path) -> Result<Option<Identity>, AgentError> {
    let p = identity_path(dir);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_err(&p, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        state_err(
            &p,
            format!(
                "unreadable identity ({e}); to enroll this host again remove the state directory and use a new token"
            ),
        )
    })
}

/// Write the identity atomically (temp file 0600, fsync, rename).
pub fn save(dir: &Path, id: &Identity) -> Result<(), AgentError> {
    let p = identity_path(dir);
    let body = serde_json::to_vec_pretty(id).map_err(|e| state_err(&p, e))?;
    write_private(dir, IDENTITY_FILE, &body)
}

/// Writes `dir/name` atomically: a temp file created 0600, fsync, rename, fsync of the directory.
pub fn write_private(dir: &Path, name: &str, body: &[u8]) -> Result<(), AgentError> {
    let p = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| state_err(&tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| state_err(&tmp, e))?;
    f.write_all(body)
        .and_then(|_| f.sync_all())
        .map_err(|e| state_err(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| state_err(&p, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Identity {
        Identity {
            node_id: "nabc".into(),
            node_name: "agent-1".into(),
            overlay_ip: Ipv4Addr::new(100, 96, 0, 2),
            overlay_prefix_len: 16,
            coordinator_public_key: "AAAA".into(),
            coordinator_wg_endpoint: "192.0.2.1:51820".parse().unwrap(),
            coordinator_overlay_ip: Ipv4Addr::new(100, 96, 0, 1),
            fleet_port: 7000,
            mtu: 1420,
            enroll_endpoint: "192.0.2.1:7443".into(),
            ca_pin: "sha256:00".into(),
            replicas: Vec::new(),
        }
    }

    fn b64(n: u8) -> String {
        tunnel::keys::public_key_to_base64(&tunnel::PublicKey::from([n; 32]))
    }

    fn key(n: u8) -> tunnel::PublicKey {
        tunnel::PublicKey::from([n; 32])
    }

    fn replica(id: &str, n: u8) -> ReplicaPeer {
        ReplicaPeer {
            id: id.into(),
            public_key: b64(n),
            wg_endpoint: format!("192.0.2.{n}:51820").parse().unwrap(),
            overlay_ip: Ipv4Addr::new(100, 96, 0, n),
            fleet_port: 7000,
        }
    }

    /// The identity of a single coordinator whose key is `[1; 32]`: what enrollment with one coordinator stores.
    fn single() -> Identity {
        Identity {
            coordinator_public_key: b64(1),
            coordinator_wg_endpoint: "192.0.2.1:51820".parse().unwrap(),
            coordinator_overlay_ip: Ipv4Addr::new(100, 96, 0, 1),
            ..sample()
        }
    }

    /// identity.json as agents wrote it before replicas existed.
    const OLD_IDENTITY: &str = r#"{
  "node_id": "nabc",
  "node_name": "agent-1",
  "overlay_ip": "100.96.0.2",
  "overlay_prefix_len": 16,
  "coordinator_public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
  "coordinator_wg_endpoint": "192.0.2.1:51820",
  "coordinator_overlay_ip": "100.96.0.1",
  "fleet_port": 7000,
  "mtu": 1420,
  "enroll_endpoint": "192.0.2.1:7443",
  "ca_pin": "sha256:00"
}"#;

    #[test]
    fn an_old_identity_loads_as_one_replica() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(identity_path(d.path()), OLD_IDENTITY).unwrap();
        let id = load(d.path()).unwrap().unwrap();
        assert_eq!(id, single());
        assert!(id.replicas.is_empty());
        assert_eq!(
            id.replica_peers(),
            vec![ReplicaPeer {
                id: SINGLE_REPLICA_ID.into(),
                ..replica("x", 1)
            }]
        );
        assert_eq!(id.primary_replica().as_deref(), Some(SINGLE_REPLICA_ID));
        assert_eq!(id.overlay_net(), Some("100.96.0.0/16".parse().unwrap()));
        // Saved again without replicas, the file has no `replicas` key: older agents (a rollback) still read it.
        save(d.path(), &id).unwrap();
        let text = std::fs::read_to_string(identity_path(d.path())).unwrap();
        assert!(!text.contains("replicas"), "{text}");
    }

    #[test]
    fn unknown_fields_are_still_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = OLD_IDENTITY.replace("\"mtu\": 1420,", "\"mtu\": 1420, \"surprise\": 1,");
        std::fs::write(identity_path(d.path()), text).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e.to_string().contains("surprise"), "{e}");
    }

    #[test]
    fn a_replica_list_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let mut id = single();
        assert!(id.set_replicas(vec![replica("c2", 2), replica("c1", 1)]));
        save(d.path(), &id).unwrap();
        let loaded = load(d.path()).unwrap().unwrap();
        assert_eq!(loaded, id);
        assert_eq!(
            loaded.replica_peers().iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["c2", "c1"]
        );
        // The primary is the replica with the enrolling coordinator's key, wherever it is listed.
        assert_eq!(loaded.primary_replica().as_deref(), Some("c1"));
    }

    #[test]
    fn set_replicas_reports_changes_and_keeps_a_lone_coordinator_in_the_old_form() {
        let mut id = single();
        // The coordinator lists just itself: nothing to store, nothing changed.
        assert!(!id.set_replicas(vec![replica("c1", 1)]));
        assert!(id.replicas.is_empty());
        // A second replica.
        assert!(id.set_replicas(vec![replica("c1", 1), replica("c2", 2)]));
        assert!(!id.set_replicas(vec![replica("c1", 1), replica("c2", 2)]));
        // Down to the coordinator alone again: back to the old form.
        assert!(id.set_replicas(vec![replica("c1", 1)]));
        assert!(id.replicas.is_empty());
        // A lone replica that is not the coordinator_* one (its endpoint moved) is stored.
        let mut moved = replica("c1", 1);
        moved.wg_endpoint = "198.51.100.1:51820".parse().unwrap();
        assert!(id.set_replicas(vec![moved.clone()]));
        assert_eq!(id.replica_peers(), vec![moved]);
    }

    #[test]
    fn key_rotation_follows_the_replica_with_the_current_key() {
        let mut id = single();
        id.set_replicas(vec![replica("c1", 1), replica("c2", 2)]);
        // A non-primary replica rotates: only its entry changes.
        assert_eq!(
            id.follow_key(&key(2), &key(12)),
            KeyFollow::Switched { replica: "c2".into() }
        );
        assert_eq!(id.replicas[1].public_key, b64(12));
        assert_eq!(id.coordinator_public_key, b64(1));
        // The primary rotates: its entry and coordinator_public_key.
        assert_eq!(
            id.follow_key(&key(1), &key(11)),
            KeyFollow::Switched { replica: "c1".into() }
        );
        assert_eq!(id.replicas[0].public_key, b64(11));
        assert_eq!(id.coordinator_public_key, b64(11));
        assert_eq!(id.primary_replica().as_deref(), Some("c1"));
        // Announced again (every reconnect): already followed.
        assert_eq!(id.follow_key(&key(1), &key(11)), KeyFollow::AlreadyFollowed);
        // A key no replica has.
        assert_eq!(id.follow_key(&key(7), &key(8)), KeyFollow::UnknownKey);
    }

    #[test]
    fn key_rotation_of_a_single_coordinator() {
        let mut id = single();
        assert_eq!(
            id.follow_key(&key(1), &key(11)),
            KeyFollow::Switched {
                replica: SINGLE_REPLICA_ID.into()
            }
        );
        assert_eq!(id.coordinator_public_key, b64(11));
        assert!(id.replicas.is_empty());
        assert_eq!(id.replica_peers()[0].public_key, b64(11));
    }

    #[test]
    fn round_trip_with_0600() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).unwrap().is_none());
        save(d.path(), &sample()).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(sample()));
        let mode = std::fs::metadata(identity_path(d.path())).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn corrupt_identity_is_an_error_not_a_reenroll() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(identity_path(d.path()), "{not json").unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e.to_string().contains("unreadable identity"), "{e}");
    }

    #[test]
    fn unwritable_state_dir_is_reported() {
        let e = prepare_state_dir(Path::new("/etc/hostname/state")).unwrap_err();
        assert!(matches!(e, AgentError::StateDir { .. }), "{e}");
    }
}
