//! The agent's persisted identity: `identity.json` (0600) beside the
//! WireGuard private key `wg.key` (0600) in the state directory. Written
//! atomically, only after a successful enrollment; its presence means "do not
//! enroll again".

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::AgentError;

pub const IDENTITY_FILE: &str = "identity.json";
pub const KEY_FILE: &str = "wg.key";

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
        }
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
