//! One-line disk summary for tables (`nimbusctl nodes --wide`), e.g. `1×100G nvme-net, 2×2.3T nvme-local`.

use crate::model::{Disk, DiskClass, Inventory, Transport};

impl Inventory {
    /// See [`disk_summary`].
    pub fn disk_summary(&self) -> String {
        disk_summary(&self.disks)
    }

    /// The disks that hold the root file system.
    pub fn root_disks(&self) -> Vec<&Disk> {
        self.disks.iter().filter(|d| d.holds_root).collect()
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// The interface called `name`.
    pub fn nic(&self, name: &str) -> Option<&crate::model::Nic> {
        self.nics.iter().find(|n| n.name == name)
    }

    /// The interface carrying the IPv4 default route, else the IPv6 one.
    pub fn default_route_nic(&self) -> Option<&crate::model::Nic> {
        self.nics
            .iter()
            .find(|n| n.default_route_v4)
            .or_else(|| self.nics.iter().find(|n| n.default_route_v6))
    }
}

/// `COUNT×SIZE TRANSPORT-CLASS` groups joined by `, `, largest size first; empty string when there are no
/// disks to show. Left out: logical devices (loop, dm, md), removable media and disks of unknown size.
/// Class words: `local` (instance store and bare-metal disks), `net` (network volumes), `virt` (hypervisor
/// disks), `unknown`. Sizes are binary (`G` = GiB), one decimal below 10 (`1.7T`), whole above (`100G`).
pub fn disk_summary(disks: &[Disk]) -> String {
    // (size label, transport, class word) → (count, size in bytes for ordering)
    let mut groups: Vec<((String, String, &'static str), usize, u64)> = Vec::new();
    for d in disks {
        let Some(size) = d.size_bytes.filter(|s| *s > 0) else {
            continue;
        };
        let class = match d.class {
            DiskClass::Logical | DiskClass::Removable => continue,
            DiskClass::LocalInstanceStore | DiskClass::Local => "local",
            DiskClass::NetworkVolume => "net",
            DiskClass::VirtualDisk => "virt",
            DiskClass::Unknown => "unknown",
        };
        let transport = match serde_json::to_value(d.transport) {
            Ok(serde_json::Value::String(s)) if d.transport != Transport::Unknown => s,
            _ => "disk".to_string(),
        };
        let key = (human_size(size), transport, class);
        match groups.iter_mut().find(|(k, _, _)| *k == key) {
            Some(g) => g.1 += 1,
            None => groups.push((key, 1, size)),
        }
    }
    groups.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    groups
        .iter()
        .map(|((size, t, c), n, _)| format!("{n}×{size} {t}-{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Binary size with one decimal below 10 (`1.7T`, `8G`, `477G`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    let s = if v < 10.0 && unit > 0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    };
    let s = s.strip_suffix(".0").unwrap_or(&s).to_string();
    format!("{s}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(name: &str, size: u64, t: Transport, c: DiskClass) -> Disk {
        Disk {
            name: name.into(),
            size_bytes: Some(size),
            transport: t,
            class: c,
            ..Disk::default()
        }
    }

    #[test]
    fn sizes_read_like_lsblk() {
        assert_eq!(human_size(1_900_000_000_000), "1.7T");
        assert_eq!(human_size(8 << 30), "8G");
        assert_eq!(human_size(100 << 30), "100G");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1536), "1.5K");
    }

    #[test]
    fn groups_and_skips() {
        let disks = vec![
            disk("nvme0n1", 100 << 30, Transport::Nvme, DiskClass::NetworkVolume),
            disk(
                "nvme1n1",
                1_900_000_000_000,
                Transport::Nvme,
                DiskClass::LocalInstanceStore,
            ),
            disk(
                "nvme2n1",
                1_900_000_000_000,
                Transport::Nvme,
                DiskClass::LocalInstanceStore,
            ),
            disk("loop0", 1 << 30, Transport::Loop, DiskClass::Logical),
            disk("sr0", 1 << 20, Transport::Sata, DiskClass::Removable),
        ];
        assert_eq!(disk_summary(&disks), "2×1.7T nvme-local, 1×100G nvme-net");
        assert_eq!(disk_summary(&[]), "");
    }
}
