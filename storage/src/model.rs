//! The per-node storage plan: what the coordinator computes from a pool's storage profile and the node's
//! inventory, and what the agent applies. Serialized (JSON) into the node's desired state.

use serde::{Deserialize, Serialize};

/// Everything one node should have: zero or more volumes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoragePlan {
    pub volumes: Vec<Volume>,
}

/// Largest serialized plan accepted from the wire.
pub const MAX_PLAN_BYTES: usize = 256 * 1024;

impl StoragePlan {
    /// The plan from its JSON form as it travels in a desired state (hostile input: size-limited, parsed);
    /// empty bytes: no plan.
    pub fn from_json(raw: &[u8]) -> Result<StoragePlan, String> {
        if raw.is_empty() {
            return Ok(StoragePlan::default());
        }
        if raw.len() > MAX_PLAN_BYTES {
            return Err(format!(
                "the storage plan is {} bytes; at most {MAX_PLAN_BYTES} are accepted",
                raw.len()
            ));
        }
        serde_json::from_slice(raw).map_err(|e| format!("the storage plan is not readable: {e}"))
    }
}

/// One volume built from `disks` and mounted at `mount_point` (for `PerDisk` with several disks: at
/// `mount_point/0`, `mount_point/1`, … in `disks` order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The storage profile's name (`[a-z0-9-]{1,32}`), e.g. `fast`; also names the LVM VG / md array.
    pub name: String,
    pub layout: Layout,
    /// The disks, by stable identity, sorted by `by_id`.
    pub disks: Vec<DiskRef>,
    pub filesystem: Filesystem,
    /// Absolute, normalized (no `..`, no trailing `/`), under no system directory.
    pub mount_point: String,
    /// Mount options besides `nofail` (always added), e.g. `noatime`.
    pub mount_options: Vec<String>,
    /// Serials or WWNs of disks whose existing data the operator has agreed to destroy. A disk carrying a
    /// signature is refused unless its serial or WWN is listed here.
    pub wipe: Vec<String>,
}

/// How the disks are combined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layout {
    /// One GPT partition and one file system per disk.
    PerDisk,
    /// One LVM volume group over all disks (`vg`), one logical volume using all of it (`lv`), e.g. for a CSI
    /// driver such as TopoLVM (which then uses the VG; the LV and file system are made only when
    /// `filesystem_on_lv` is true).
    Lvm {
        vg: String,
        lv: String,
        filesystem_on_lv: bool,
    },
    /// One md RAID0 array over all disks (`/dev/md/<name>`), one file system on it.
    Raid0 { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filesystem {
    Xfs,
    Ext4,
}

impl Filesystem {
    /// `xfs` / `ext4`, as mount(8) and the mkfs.* programs name them.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Xfs => "xfs",
            Filesystem::Ext4 => "ext4",
        }
    }
}

/// A disk by stable identity: never by kernel name (`nvme1n1` may name another disk after a reboot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRef {
    /// `/dev/disk/by-id/...` path (a symlink to the device).
    pub by_id: String,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub size_bytes: u64,
    /// Model, for messages.
    pub model: Option<String>,
}
