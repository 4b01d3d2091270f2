//! A pool's storage profiles against one node's inventory: which disks each profile takes, as the per-node
//! volumes of its assignment. Evaluated at every apply (and when a placed node's inventory changes), so
//! instance-store disks that come back with new serials after a stop/start are found again by the selector.

use inventory::{Disk, DiskClass, Inventory};

use crate::model::{DiskSelector, StorageLayout, StorageProfile};
use crate::syntax::glob_match;

/// Classes a selector without `class` accepts.
const DEFAULT_CLASSES: [DiskClass; 4] = [
    DiskClass::LocalInstanceStore,
    DiskClass::Local,
    DiskClass::NetworkVolume,
    DiskClass::VirtualDisk,
];

/// The volumes of `profiles` on a node with inventory `inv`, and the names of profiles that found no disk.
/// A disk goes to the first profile (in policy order) that takes it.
pub fn volumes(profiles: &[StorageProfile], inv: Option<&Inventory>) -> (Vec<storage::Volume>, Vec<String>) {
    let mut taken: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    let mut empty = Vec::new();
    for p in profiles {
        let mut disks: Vec<(&Disk, &str)> = inv
            .map(|i| i.disks.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|d| !taken.contains(&d.name.as_str()))
            .filter(|d| eligible(d, p))
            .filter_map(|d| d.stable_path().map(|path| (d, path)))
            .filter(|(_, path)| {
                let leaf = path.rsplit('/').next().unwrap_or_default();
                p.disks.by_id.as_deref().is_none_or(|g| glob_match(g, leaf))
            })
            .collect();
        disks.sort_by(|a, b| a.1.cmp(b.1));
        if let Some(max) = p.disks.max_disks {
            disks.truncate(max as usize);
        }
        if disks.is_empty() {
            empty.push(p.name.clone());
            continue;
        }
        taken.extend(disks.iter().map(|(d, _)| d.name.as_str()));
        out.push(storage::Volume {
            name: p.name.clone(),
            layout: match p.layout {
                StorageLayout::PerDisk => storage::Layout::PerDisk,
                StorageLayout::Lvm => storage::Layout::Lvm {
                    vg: format!("nimbus-{}", p.name),
                    lv: "data".into(),
                    filesystem_on_lv: !p.mount_point.is_empty(),
                },
                StorageLayout::Raid0 => storage::Layout::Raid0 {
                    name: format!("nimbus-{}", p.name),
                },
            },
            disks: disks
                .iter()
                .map(|(d, path)| storage::DiskRef {
                    by_id: (*path).to_string(),
                    serial: d.serial.clone(),
                    wwn: d.wwn.clone(),
                    size_bytes: d.size_bytes.unwrap_or(0),
                    model: d.model.clone(),
                })
                .collect(),
            filesystem: p.filesystem,
            mount_point: p.mount_point.clone(),
            mount_options: p.mount_options.clone(),
            wipe: p.wipe.clone(),
        });
    }
    (out, empty)
}

/// Whether profile `p` may take disk `d`: never the root disk, a read-only or removable one, or one mounted
/// anywhere but under the profile's own mount point (a disk this profile already prepared stays eligible).
fn eligible(d: &Disk, p: &StorageProfile) -> bool {
    if d.holds_root || d.read_only == Some(true) || d.removable == Some(true) {
        return false;
    }
    let ours = |m: &String| {
        !p.mount_point.is_empty() && (*m == p.mount_point || m.starts_with(&format!("{}/", p.mount_point)))
    };
    let mounts = d
        .mount_points
        .iter()
        .chain(d.partitions.iter().flat_map(|x| x.mount_points.iter()));
    if mounts.into_iter().any(|m| !ours(m)) {
        return false;
    }
    selector_accepts(&p.disks, d)
}

fn selector_accepts(s: &DiskSelector, d: &Disk) -> bool {
    let class_ok = if s.class.is_empty() {
        DEFAULT_CLASSES.contains(&d.class)
    } else {
        s.class.contains(&d.class)
    };
    class_ok
        && (s.transport.is_empty() || s.transport.contains(&d.transport))
        && s.min_size
            .is_none_or(|min| d.size_bytes.is_some_and(|size| size >= min))
        && s.model
            .as_deref()
            .is_none_or(|g| d.model.as_deref().is_some_and(|m| glob_match(g, m)))
}
