//! `storage-state.json`: the record of what THIS agent created, per volume — disk identities, the GPT disk and
//! partition GUIDs, PV UUIDs, the md array UUID, file-system UUIDs and unit names. It is how the next apply
//! recognises its own work (and continues it) and what decommission may remove; anything not recorded here is
//! never destroyed.
//!
//! Identifiers are chosen before the tool that writes them runs and recorded first ("intent"), so a crash
//! between the tool and the record still leaves a disk we recognise as ours.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::model::{Filesystem, Layout};

/// File name of the record in the state directory.
pub const STATE_FILE: &str = "storage-state.json";

/// Current format version.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// By volume name.
    pub volumes: BTreeMap<String, VolumeRecord>,
}

impl Default for State {
    fn default() -> State {
        State {
            version: STATE_VERSION,
            volumes: BTreeMap::new(),
        }
    }
}

/// What we made for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub layout: Layout,
    pub filesystem: Filesystem,
    pub mount_point: String,
    /// In plan order (for `PerDisk`: slot `i` is mounted at `mount_point/i` when there are several).
    pub disks: Vec<DiskRecord>,
    /// RAID0: the array UUID we gave `mdadm --create`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array_uuid: Option<String>,
    /// LVM / RAID0: the file system on the LV or array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsRecord>,
}

/// One disk we prepared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Its position in the volume's `disks` (PerDisk: decides the mount point `mount_point/<slot>`).
    #[serde(default)]
    pub slot: usize,
    pub by_id: String,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub wwn: Option<String>,
    /// The kernel device when it was prepared (informational: kernel names change across boots).
    pub device: String,
    /// PerDisk: the GPT disk GUID we wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_guid: Option<String>,
    /// PerDisk: the partition's unique GUID (PARTUUID) we wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// LVM: the PV UUID we gave `pvcreate --uuid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pv_uuid: Option<String>,
    /// PerDisk: the file system on partition 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsRecord>,
}

/// A file system we made, and its mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsRecord {
    /// The device it was made on (partition, `/dev/<vg>/<lv>`, `/dev/md/<name>`).
    pub device: String,
    pub fs_uuid: String,
    pub label: String,
    pub mount_point: String,
    /// The `.mount` unit, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

impl State {
    /// Path of the record in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Read the record in `dir`; a missing file is an empty record.
    pub fn load(dir: &Path) -> Result<State, StorageError> {
        let path = State::path(dir);
        let bad = |reason: String| StorageError::State {
            path: path.clone(),
            reason,
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(bad(format!("cannot read it: {e}"))),
        };
        let state: State = serde_json::from_slice(&bytes).map_err(|e| bad(format!("it is not valid: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(bad(format!(
                "format version {} is not the {STATE_VERSION} this agent writes (written by another version?)",
                state.version
            )));
        }
        Ok(state)
    }

    /// Write the record to `dir` atomically, mode 0600 (the directory is created 0700 when missing).
    pub fn save(&self, dir: &Path) -> Result<(), StorageError> {
        let path = State::path(dir);
        let json = serde_json::to_vec_pretty(self).map_err(|e| StorageError::State {
            path: path.clone(),
            reason: format!("cannot encode it: {e}"),
        })?;
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| StorageError::State {
                path: path.clone(),
                reason: format!("cannot create its directory: {e}"),
            })?;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        write_atomic(&path, &json, 0o600).map_err(|e| StorageError::State {
            path: path.clone(),
            reason: format!("cannot write it: {e}"),
        })
    }
}

/// Write `bytes` to `path` through a temporary file in the same directory (created with `mode`), fsync, rename
/// and fsync the directory: readers see the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_mode_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("agent");
        assert_eq!(State::load(&dir).unwrap(), State::default());
        let mut s = State::default();
        s.volumes.insert(
            "fast".into(),
            VolumeRecord {
                layout: Layout::PerDisk,
                filesystem: Filesystem::Xfs,
                mount_point: "/data".into(),
                disks: vec![DiskRecord {
                    slot: 0,
                    by_id: "/dev/disk/by-id/x".into(),
                    serial: Some("S".into()),
                    wwn: None,
                    device: "/dev/sdb".into(),
                    disk_guid: Some("g".into()),
                    partuuid: Some("p".into()),
                    pv_uuid: None,
                    fs: None,
                }],
                array_uuid: None,
                fs: None,
            },
        );
        s.save(&dir).unwrap();
        assert_eq!(State::load(&dir).unwrap(), s);
        let mode = fs::metadata(State::path(&dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left behind");

        fs::write(State::path(&dir), b"{\"version\":1,").unwrap();
        let err = State::load(&dir).unwrap_err();
        assert!(err.to_string().contains("not valid"), "{err}");
        fs::write(State::path(&dir), b"{\"version\":9,\"volumes\":{}}").unwrap();
        assert!(State::load(&dir).unwrap_err().to_string().contains("format version 9"));
    }
}
