//! "Send only when it changes": a stable view of an inventory without its volatile values
//! ([`Inventory::stable`], which lists them), a fingerprint of it, a field-level diff, and [`WarnOnce`] for
//! logging unreadable fields once.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::model::Inventory;
use crate::reader::Unreadable;

/// Mount points under these prefixes are ignored for change detection (kubelet and container runtimes).
pub const VOLATILE_MOUNT_PREFIXES: &[&str] = &[
    "/var/lib/kubelet/",
    "/var/lib/containerd/",
    "/run/containerd/",
    "/var/lib/docker/",
    "/var/lib/containers/",
    "/run/containers/",
];

fn volatile_mount(m: &str) -> bool {
    VOLATILE_MOUNT_PREFIXES.iter().any(|p| m.starts_with(p))
}

impl Inventory {
    /// A copy without the volatile values, which [`Inventory::fingerprint`] and [`changed_fields`] ignore:
    /// - `os.boot_time`: `btime` is derived from the clock minus uptime and shifts by a second when NTP steps
    ///   the clock; a reboot shows up elsewhere (kernel, mounts) when anything that matters changed.
    /// - `memory.hugepages[*].free`: changes whenever a workload maps huge pages.
    /// - NICs that are virtual *and* have no address: per-pod veth ends and unconfigured tunnels come and go
    ///   with workloads (most container plumbing is not even collected by default, see
    ///   [`crate::CollectOptions::skip_nic_prefixes`]).
    /// - Mount points below [`VOLATILE_MOUNT_PREFIXES`]: kubelet and container runtimes bind-mount volumes
    ///   there per pod.
    ///
    /// Everything else counts, including a NIC's `operstate` (a link going down is worth sending) and every
    /// disk added or removed (a hot-added loop device shows up as `disks[loop0]`).
    pub fn stable(&self) -> Inventory {
        let mut inv = self.clone();
        inv.os.boot_time = None;
        for h in &mut inv.memory.hugepages {
            h.free = None;
        }
        inv.nics.retain(|n| !(n.is_virtual && n.addresses.is_empty()));
        for d in &mut inv.disks {
            d.mount_points.retain(|m| !volatile_mount(m));
            for p in &mut d.partitions {
                p.mount_points.retain(|m| !volatile_mount(m));
            }
        }
        inv
    }

    /// SHA-256 (lowercase hex) of the JSON of [`Inventory::stable`]: equal fingerprints mean nothing that
    /// matters changed. Stable across processes and hosts for the same data and crate version.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(&self.stable()).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The fields that differ between two inventories, volatile values ignored, as dotted paths in the JSON
/// shape; list elements are addressed by name: `disks[nvme3n1]` (added or removed), `nics[ens5].operstate`,
/// `platform.instance_type`. Sorted, without duplicates. Empty when [`Inventory::fingerprint`]s are equal.
pub fn changed_fields(old: &Inventory, new: &Inventory) -> Vec<String> {
    // Serializing these plain data types cannot fail; `Null` keeps this total anyway.
    let a = serde_json::to_value(old.stable()).unwrap_or(Value::Null);
    let b = serde_json::to_value(new.stable()).unwrap_or(Value::Null);
    let mut out = BTreeSet::new();
    diff("", &a, &b, &mut out);
    out.into_iter().collect()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Key of a list element: its `name`, or `size_bytes` for huge page pools.
fn element_key(v: &Value) -> Option<String> {
    let o = v.as_object()?;
    if let Some(Value::String(n)) = o.get("name") {
        return Some(n.clone());
    }
    o.get("size_bytes").and_then(Value::as_u64).map(|s| s.to_string())
}

fn diff(path: &str, a: &Value, b: &Value, out: &mut BTreeSet<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => diff(&join(path, k), va, vb, out),
                    _ => {
                        out.insert(join(path, k));
                    }
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            let kx: Option<Vec<String>> = x.iter().map(element_key).collect();
            let ky: Option<Vec<String>> = y.iter().map(element_key).collect();
            match (kx, ky) {
                (Some(kx), Some(ky)) if !(x.is_empty() && y.is_empty()) => {
                    let keys: BTreeSet<&String> = kx.iter().chain(ky.iter()).collect();
                    for k in keys {
                        let ea = kx.iter().position(|e| e == k).map(|i| &x[i]);
                        let eb = ky.iter().position(|e| e == k).map(|i| &y[i]);
                        let p = format!("{path}[{k}]");
                        match (ea, eb) {
                            (Some(ea), Some(eb)) => diff(&p, ea, eb, out),
                            _ => {
                                out.insert(p);
                            }
                        }
                    }
                }
                _ => {
                    if a != b {
                        out.insert(path.to_string());
                    }
                }
            }
        }
        _ => {
            if a != b {
                out.insert(path.to_string());
            }
        }
    }
}

/// Remembers which unreadable fields were already logged, so a daemon collecting on a timer warns once per
/// field and file, not on every pass. Holds at most 4096 entries; past that, new ones are logged at debug level.
#[derive(Debug, Default)]
pub struct WarnOnce {
    seen: HashSet<(String, PathBuf)>,
}

const WARN_ONCE_CAPACITY: usize = 4096;

impl WarnOnce {
    pub fn new() -> Self {
        WarnOnce::default()
    }

    /// True the first time this field/path pair is offered.
    pub fn first_time(&mut self, u: &Unreadable) -> bool {
        let key = (u.field.clone(), u.path.clone());
        if self.seen.contains(&key) || self.seen.len() >= WARN_ONCE_CAPACITY {
            return false;
        }
        self.seen.insert(key)
    }

    /// Log (`tracing::warn!`) the entries not logged before; returns how many were logged.
    pub fn log(&mut self, unreadable: &[Unreadable]) -> usize {
        let mut n = 0;
        for u in unreadable {
            if self.first_time(u) {
                tracing::warn!(field = %u.field, path = %u.path.display(), reason = %u.reason, "inventory: {u}");
                n += 1;
            } else if self.seen.len() >= WARN_ONCE_CAPACITY {
                tracing::debug!(field = %u.field, "inventory: {u}");
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Disk, HugePages, Nic};

    fn inv() -> Inventory {
        let mut i = Inventory::default();
        i.disks.push(Disk {
            name: "sda".into(),
            size_bytes: Some(1),
            ..Disk::default()
        });
        i.nics.push(Nic {
            name: "eth0".into(),
            operstate: Some("up".into()),
            ..Nic::default()
        });
        i.memory.hugepages.push(HugePages {
            size_bytes: 2 << 20,
            total: Some(4),
            free: Some(4),
        });
        i.os.boot_time = Some(100);
        i
    }

    #[test]
    fn volatile_values_do_not_change_the_fingerprint() {
        let a = inv();
        let mut b = inv();
        b.os.boot_time = Some(101);
        b.memory.hugepages[0].free = Some(1);
        b.nics.push(Nic {
            name: "veth1".into(),
            is_virtual: true,
            ..Nic::default()
        });
        b.disks[0].mount_points.push("/var/lib/kubelet/pods/x/volumes/y".into());
        assert_ne!(a, b);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(changed_fields(&a, &b).is_empty());
    }

    #[test]
    fn changes_are_named_by_element() {
        let a = inv();
        let mut b = inv();
        b.nics[0].operstate = Some("down".into());
        b.disks.push(Disk {
            name: "loop0".into(),
            ..Disk::default()
        });
        b.memory.hugepages[0].total = Some(8);
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            changed_fields(&a, &b),
            vec![
                "disks[loop0]".to_string(),
                format!("memory.hugepages[{}].total", 2 << 20),
                "nics[eth0].operstate".to_string()
            ]
        );
    }

    #[test]
    fn warn_once_logs_each_pair_once() {
        let u = Unreadable {
            field: "memory.total_bytes".into(),
            path: "/proc/meminfo".into(),
            reason: "x".into(),
        };
        let mut w = WarnOnce::new();
        assert_eq!(w.log(&[u.clone(), u.clone()]), 1);
        assert_eq!(w.log(std::slice::from_ref(&u)), 0);
        let other = Unreadable {
            field: "cpu".into(),
            ..u
        };
        assert!(w.first_time(&other));
    }
}
