//! `nimbusctl storage plan NODE`: the node's storage plan (from its placement) and what its agent reported.

use anyhow::Result;
use nimbus_proto::Node;
use serde_json::{Value, json};

/// The plan carried by the node's placement (empty when none).
pub fn plan(n: &Node) -> Result<storage::StoragePlan> {
    let raw = n
        .placement
        .as_ref()
        .map(|p| p.storage_plan.as_slice())
        .unwrap_or_default();
    storage::StoragePlan::from_json(raw).map_err(|e| anyhow::anyhow!("node {}: {e}", n.name))
}

fn layout(v: &storage::Volume) -> String {
    match &v.layout {
        storage::Layout::PerDisk => "per-disk".into(),
        storage::Layout::Lvm {
            vg,
            lv,
            filesystem_on_lv,
        } => {
            if *filesystem_on_lv {
                format!("lvm (VG {vg}, LV {lv})")
            } else {
                format!("lvm (VG {vg}, left to a CSI driver)")
            }
        }
        storage::Layout::Raid0 { name } => format!("raid0 (/dev/md/{name})"),
    }
}

/// The text form.
pub fn text(n: &Node, plan: &storage::StoragePlan) -> String {
    if plan.volumes.is_empty() {
        return format!(
            "node {}: no storage planned (its pool has no storage profile, or no disk matched; `nimbusctl diff` \
             shows warnings)\n",
            n.name
        );
    }
    let mut out = format!("node {}: {} volume(s)\n", n.name, plan.volumes.len());
    for v in &plan.volumes {
        let mount = if v.mount_point.is_empty() {
            "-".to_string()
        } else {
            v.mount_point.clone()
        };
        out += &format!(
            "\n{}: {}, {}, mounted at {mount} (options: nofail{})\n",
            v.name,
            layout(v),
            v.filesystem.as_str(),
            v.mount_options.iter().map(|o| format!(",{o}")).collect::<String>()
        );
        let mut t = crate::table(&["DISK", "SERIAL", "WWN", "SIZE", "MODEL"]);
        for d in &v.disks {
            t.add_row(vec![
                d.by_id.clone(),
                d.serial.clone().unwrap_or_else(|| "-".into()),
                d.wwn.clone().unwrap_or_else(|| "-".into()),
                crate::hardware::size(Some(d.size_bytes)),
                d.model.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out += &format!("{t}\n");
        if !v.wipe.is_empty() {
            out += &format!("  may wipe (explicitly allowed): {}\n", v.wipe.join(", "));
        }
        match n.storage.iter().find(|s| s.name == v.name) {
            Some(s) => out += &format!("  agent reports: {} {}\n", s.state, s.detail),
            None => out += "  agent reports: nothing yet\n",
        }
    }
    out
}

/// The `-o json` form.
pub fn json(n: &Node, plan: &storage::StoragePlan) -> Value {
    json!({
        "node": n.name,
        "plan": plan,
        "status": n.storage.iter().map(|s| json!({"name": s.name, "state": s.state, "detail": s.detail})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_lists_each_volume_its_disks_and_the_agent_report() {
        let plan = storage::StoragePlan {
            volumes: vec![storage::Volume {
                name: "fast".into(),
                layout: storage::Layout::Raid0 {
                    name: "nimbus-fast".into(),
                },
                disks: vec![storage::DiskRef {
                    by_id: "/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1".into(),
                    serial: Some("AWS1".into()),
                    wwn: None,
                    size_bytes: 2_500_000_000_000,
                    model: Some("Amazon EC2 NVMe Instance Storage".into()),
                }],
                filesystem: storage::Filesystem::Xfs,
                mount_point: "/var/lib/nimbus/volumes/fast".into(),
                mount_options: vec!["noatime".into()],
                wipe: vec![],
            }],
        };
        let node = Node {
            name: "db-1".into(),
            placement: Some(nimbus_proto::Placement {
                storage_plan: serde_json::to_vec(&plan).unwrap(),
                ..Default::default()
            }),
            storage: vec![nimbus_proto::StorageVolumeStatus {
                name: "fast".into(),
                state: "refused".into(),
                detail: "disk AWS1 carries an ext4 file system".into(),
            }],
            ..Default::default()
        };
        let back = super::plan(&node).unwrap();
        assert_eq!(back, plan);
        let t = text(&node, &back);
        assert!(t.starts_with("node db-1: 1 volume(s)\n"), "{t}");
        assert!(t.contains("fast: raid0 (/dev/md/nimbus-fast), xfs, mounted at /var/lib/nimbus/volumes/fast (options: nofail,noatime)"), "{t}");
        assert!(
            t.contains("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1") && t.contains("2.3T"),
            "{t}"
        );
        assert!(
            t.contains("agent reports: refused disk AWS1 carries an ext4 file system"),
            "{t}"
        );
        assert_eq!(json(&node, &back)["plan"]["volumes"][0]["layout"]["kind"], "raid0");
        let none = Node {
            name: "web-1".into(),
            ..Default::default()
        };
        assert!(text(&none, &super::plan(&none).unwrap()).contains("no storage planned"));
    }
}
