//! Block devices from `sys/block` (layout: Documentation/ABI/stable/sysfs-block and
//! Documentation/ABI/testing/sysfs-class-nvme in the kernel tree), classified for placement.
//!
//! Per device: `dev`, `size` (512-byte sectors), `queue/rotational`, `removable`, `ro`, `device/{vendor,model}`,
//! serial (`device/serial`, `serial`, or SCSI VPD page 0x80 `device/vpd_pg80`), WWN (`wwid`, `device/wwid`),
//! partitions (children with a `partition` file), `holders/`, `slaves/`, `dm/name`, `loop/backing_file`.
//! The transport comes from the device path the `sys/block/<name>` link points at (`…/ata1/…` → sata,
//! `…/end_device-…` → sas, `…/virtio3/…` → virtio, `…/vbd-51712/…` → xen, …) and the driver is the first
//! `driver` link on that path. Mount points come from matching mountinfo `major:minor` against each `dev`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use crate::model::{Disk, DiskClass, Partition, PlatformKind, Transport};
use crate::mounts::Mount;
use crate::reader::Ctx;
use crate::signature;

/// Facts used for classification that are not part of the reported model.
#[derive(Debug, Clone, Default)]
pub(crate) struct DiskExtra {
    /// Hyper-V VMBus `device_id` of the storage controller (e.g. `{f8b3781a-…}`).
    pub vmbus_device_id: Option<String>,
    /// SCSI LUN (last part of the `H:C:T:L` device name).
    pub scsi_lun: Option<u32>,
}

pub(crate) fn collect(ctx: &mut Ctx<'_>, mounts: &[Mount], swaps: &[String]) -> (Vec<Disk>, Vec<DiskExtra>) {
    let mut disks = Vec::new();
    let mut extras = Vec::new();
    for name in ctx.dir_names(Some("disks"), "sys/block") {
        if skip_name(&name) {
            continue;
        }
        if let Some((disk, extra)) = collect_one(ctx, &name) {
            disks.push(disk);
            extras.push(extra);
        }
    }
    attach_mounts(ctx, &mut disks, mounts, swaps);
    attach_by_id(ctx, &mut disks);
    (disks, extras)
}

/// Where udev puts the stable names of block devices.
pub(crate) const BY_ID_DIR: &str = "dev/disk/by-id";

/// Fills each disk's `by_id` from the `dev/disk/by-id` symlinks whose target is the whole disk (partition
/// links, `…-partN`, point at partitions and are skipped by name match).
fn attach_by_id(ctx: &mut Ctx<'_>, disks: &mut [Disk]) {
    for link in ctx.dir_names(None, BY_ID_DIR) {
        let Some(target) = ctx.link_name(format!("{BY_ID_DIR}/{link}")) else {
            continue;
        };
        if let Some(d) = disks.iter_mut().find(|d| d.name == target) {
            d.by_id.push(format!("/{BY_ID_DIR}/{link}"));
        }
    }
    for d in disks.iter_mut() {
        d.by_id.sort();
    }
}

fn skip_name(name: &str) -> bool {
    ["ram", "zram", "fd"].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn collect_one(ctx: &mut Ctx<'_>, name: &str) -> Option<(Disk, DiskExtra)> {
    let base = format!("sys/block/{name}");
    let field = |f: &str| format!("disks[{name}].{f}");
    let sectors: Option<u64> = ctx.parse(&field("size_bytes"), format!("{base}/size"));
    if sectors == Some(0) {
        return None;
    }
    let devpath = device_path(ctx, name);
    let mut d = Disk {
        name: name.to_string(),
        dev: ctx.attr(&field("dev"), format!("{base}/dev")),
        size_bytes: sectors.and_then(|s| s.checked_mul(512)),
        // virtio devices have a numeric PCI vendor id (`0x1af4`) there, not a SCSI vendor string.
        vendor: ctx
            .attr(&field("vendor"), format!("{base}/device/vendor"))
            .filter(|v| !v.starts_with("0x")),
        model: ctx.attr(&field("model"), format!("{base}/device/model")),
        rotational: ctx.flag(&field("rotational"), format!("{base}/queue/rotational")),
        removable: ctx.flag(&field("removable"), format!("{base}/removable")),
        read_only: ctx.flag(&field("read_only"), format!("{base}/ro")),
        transport: transport(name, &devpath),
        driver: nearest_driver(ctx, &devpath),
        holders: ctx.dir_names(None, format!("{base}/holders")),
        members: ctx.dir_names(None, format!("{base}/slaves")),
        dm_name: ctx.attr(&field("dm_name"), format!("{base}/dm/name")),
        backing_file: ctx.attr(&field("backing_file"), format!("{base}/loop/backing_file")),
        ..Disk::default()
    };
    d.serial = ctx
        .attr(&field("serial"), format!("{base}/device/serial"))
        .or_else(|| ctx.attr(&field("serial"), format!("{base}/serial")))
        .or_else(|| vpd_serial(ctx, &format!("{base}/device/vpd_pg80")));
    d.wwn = ctx
        .attr(&field("wwn"), format!("{base}/wwid"))
        .or_else(|| ctx.attr(&field("wwn"), format!("{base}/device/wwid")));
    d.signature = probe(ctx, name, d.size_bytes, &field("signature"));

    for child in ctx.dir_names(Some(&field("partitions")), &base) {
        if !child.starts_with(name) || child == name {
            continue;
        }
        let pbase = format!("{base}/{child}");
        if !ctx.exists(format!("{pbase}/partition")) {
            continue;
        }
        let pfield = |f: &str| format!("disks[{name}].partitions[{child}].{f}");
        let size: Option<u64> = ctx.parse(&pfield("size_bytes"), format!("{pbase}/size"));
        let size_bytes = size.and_then(|s| s.checked_mul(512));
        d.partitions.push(Partition {
            number: ctx.parse(&pfield("number"), format!("{pbase}/partition")),
            dev: ctx.attr(&pfield("dev"), format!("{pbase}/dev")),
            start_bytes: ctx
                .parse::<u64>(&pfield("start_bytes"), format!("{pbase}/start"))
                .and_then(|s| s.checked_mul(512)),
            size_bytes,
            signature: probe(ctx, &child, size_bytes, &pfield("signature")),
            holders: ctx.dir_names(None, format!("{pbase}/holders")),
            name: child,
            ..Partition::default()
        });
    }
    d.partitions
        .sort_by(|a, b| a.number.cmp(&b.number).then_with(|| a.name.cmp(&b.name)));

    let extra = DiskExtra {
        vmbus_device_id: vmbus_device_id(ctx, &devpath),
        scsi_lun: ctx.link_name(format!("{base}/device")).and_then(|hctl| scsi_lun(&hctl)),
    };
    Some((d, extra))
}

/// The physical sysfs path of `sys/block/<name>` (relative to root), from its symlink, lexically normalised.
fn device_path(ctx: &Ctx<'_>, name: &str) -> PathBuf {
    let link = PathBuf::from(format!("sys/block/{name}"));
    match std::fs::read_link(ctx.path(&link)) {
        Ok(target) if target.is_relative() => normalize(&Path::new("sys/block").join(target)),
        Ok(target) => normalize(target.strip_prefix("/").unwrap_or(&target)),
        Err(_) => link,
    }
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn transport(name: &str, devpath: &Path) -> Transport {
    let comps: Vec<String> = devpath
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let any = |pred: &dyn Fn(&str) -> bool| comps.iter().any(|c| pred(c));
    let numbered = |c: &str, prefix: &str| {
        c.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
    };
    if name.starts_with("loop") {
        Transport::Loop
    } else if name.starts_with("dm-") {
        Transport::Dm
    } else if numbered(name, "md") || name.starts_with("md_") {
        Transport::Md
    } else if name.starts_with("nbd") {
        Transport::Nbd
    } else if name.starts_with("rbd") {
        Transport::Rbd
    } else if name.starts_with("nvme") || any(&|c| c == "nvme" || c.starts_with("nvme-subsys")) {
        Transport::Nvme
    } else if any(&|c| numbered(c, "session")) {
        Transport::Iscsi
    } else if any(&|c| numbered(c, "ata")) {
        Transport::Sata
    } else if any(&|c| c.starts_with("end_device-") || c.starts_with("expander-")) {
        Transport::Sas
    } else if any(&|c| numbered(c, "usb")) {
        Transport::Usb
    } else if any(&|c| numbered(c, "virtio")) {
        Transport::Virtio
    } else if name.starts_with("xvd") || any(&|c| c.starts_with("vbd-")) {
        Transport::Xen
    } else if name.starts_with("mmcblk") || any(&|c| numbered(c, "mmc")) {
        Transport::Mmc
    } else if any(&|c| numbered(c, "host")) {
        Transport::Scsi
    } else {
        Transport::Unknown
    }
}

/// Ancestors of a device path below `sys/devices`, nearest first.
fn ancestors(devpath: &Path) -> impl Iterator<Item = &Path> {
    devpath
        .ancestors()
        .skip(1)
        .take_while(|p| p.starts_with("sys/devices") && *p != Path::new("sys/devices"))
}

fn nearest_driver(ctx: &Ctx<'_>, devpath: &Path) -> Option<String> {
    ancestors(devpath).find_map(|p| ctx.link_name(p.join("driver")))
}

/// Hyper-V: the storage controller is a VMBus device whose directory is named by its instance GUID and has
/// `device_id` and `class_id` files.
fn vmbus_device_id(ctx: &mut Ctx<'_>, devpath: &Path) -> Option<String> {
    ancestors(devpath)
        .filter(|p| p.file_name().is_some_and(|n| looks_like_guid(&n.to_string_lossy())))
        .find_map(|p| {
            let id = ctx.attr_quiet(p.join("device_id"))?;
            ctx.exists(p.join("class_id")).then_some(id)
        })
}

fn looks_like_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

fn scsi_lun(hctl: &str) -> Option<u32> {
    let parts: Vec<&str> = hctl.split(':').collect();
    if parts.len() != 4
        || !parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    parts[3].parse().ok()
}

/// SCSI VPD page 0x80 (Unit Serial Number): 4-byte header (page code at 1, length at 2..4), then ASCII.
fn vpd_serial(ctx: &mut Ctx<'_>, rel: &str) -> Option<String> {
    let path = ctx.path(rel);
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() < 4 || bytes[1] != 0x80 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    let body = bytes.get(4..4 + len.min(bytes.len() - 4))?;
    let s: String = body
        .iter()
        .filter(|c| c.is_ascii_graphic() || **c == b' ')
        .map(|&c| c as char)
        .collect();
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn probe(ctx: &mut Ctx<'_>, name: &str, size: Option<u64>, field: &str) -> Option<crate::model::Signature> {
    let path = ctx.path(format!("dev/{name}"));
    match signature::probe(&path, size) {
        Ok(sig) => sig,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            ctx.warn(field, path, e.to_string());
            None
        }
    }
}

/// Fill `mount_points` and `holds_root` from the mount table and swap list.
fn attach_mounts(ctx: &mut Ctx<'_>, disks: &mut [Disk], mounts: &[Mount], swaps: &[String]) {
    // Index every disk and partition by dev number and by name: (disk index, partition index).
    let mut by_dev: HashMap<String, (usize, Option<usize>)> = HashMap::new();
    let mut by_name: HashMap<String, (usize, Option<usize>)> = HashMap::new();
    for (i, d) in disks.iter().enumerate() {
        if let Some(dev) = &d.dev {
            by_dev.insert(dev.clone(), (i, None));
        }
        by_name.insert(d.name.clone(), (i, None));
        for (j, p) in d.partitions.iter().enumerate() {
            if let Some(dev) = &p.dev {
                by_dev.insert(dev.clone(), (i, Some(j)));
            }
            by_name.insert(p.name.clone(), (i, Some(j)));
        }
    }
    let resolve_source = |source: &str, disks: &[Disk]| -> Option<(usize, Option<usize>)> {
        let rest = source.strip_prefix("/dev/")?;
        if let Some(dm) = rest.strip_prefix("mapper/") {
            return disks
                .iter()
                .position(|d| d.dm_name.as_deref() == Some(dm))
                .map(|i| (i, None));
        }
        if let Some(uuid) = rest.strip_prefix("disk/by-uuid/") {
            return find_sig(disks, |s| s.uuid.as_deref() == Some(uuid));
        }
        if let Some(label) = rest.strip_prefix("disk/by-label/") {
            return find_sig(disks, |s| s.label.as_deref() == Some(label));
        }
        by_name.get(rest).copied()
    };
    let locate = |m: &Mount, disks: &[Disk]| by_dev.get(&m.dev).copied().or_else(|| resolve_source(&m.source, disks));

    for m in mounts {
        if let Some(loc) = locate(m, disks) {
            push_mount(disks, loc, &m.mount_point);
        }
    }
    for s in swaps {
        if let Some(loc) = resolve_source(s, disks) {
            push_mount(disks, loc, "[SWAP]");
        }
    }
    for d in disks.iter_mut() {
        d.mount_points.sort();
        d.mount_points.dedup();
        for p in &mut d.partitions {
            p.mount_points.sort();
            p.mount_points.dedup();
        }
    }

    let Some(root) = crate::mounts::root_mount(mounts) else {
        return;
    };
    let Some(loc) = locate(root, disks) else {
        if root.source.starts_with("/dev/") {
            let path = ctx.path("proc/self/mountinfo");
            ctx.warn(
                "disks.holds_root",
                path,
                format!("root device {} ({}) is not in sys/block", root.source, root.dev),
            );
        }
        return;
    };
    mark_root(disks, loc, &by_name, 0);
}

fn find_sig(disks: &[Disk], pred: impl Fn(&crate::model::Signature) -> bool) -> Option<(usize, Option<usize>)> {
    for (i, d) in disks.iter().enumerate() {
        if d.signature.as_ref().is_some_and(&pred) {
            return Some((i, None));
        }
        for (j, p) in d.partitions.iter().enumerate() {
            if p.signature.as_ref().is_some_and(&pred) {
                return Some((i, Some(j)));
            }
        }
    }
    None
}

fn push_mount(disks: &mut [Disk], (i, j): (usize, Option<usize>), mount_point: &str) {
    match j {
        Some(j) => disks[i].partitions[j].mount_points.push(mount_point.to_string()),
        None => disks[i].mount_points.push(mount_point.to_string()),
    }
}

/// Mark the device holding `/`, its disk, and (through dm/md `slaves`) the devices it is built on.
fn mark_root(
    disks: &mut [Disk],
    (i, j): (usize, Option<usize>),
    by_name: &HashMap<String, (usize, Option<usize>)>,
    depth: u32,
) {
    if depth > 8 {
        return;
    }
    disks[i].holds_root = true;
    if let Some(j) = j {
        disks[i].partitions[j].holds_root = true;
        return;
    }
    let members = disks[i].members.clone();
    for m in members {
        if let Some(loc) = by_name.get(&m).copied() {
            mark_root(disks, loc, by_name, depth + 1);
        }
    }
}

/// Decide each disk's class once the platform is known.
pub(crate) fn classify(disks: &mut [Disk], extras: &[DiskExtra], platform: PlatformKind) {
    for (d, x) in disks.iter_mut().zip(extras) {
        let (class, why) = class_of(d, x, platform);
        d.class = class;
        d.class_evidence = why;
    }
}

/// AWS Azure and GCP publish the NVMe/SCSI model strings of their disks:
/// - AWS: "Amazon Elastic Block Store" (EBS), "Amazon EC2 NVMe Instance Storage" (instance store).
/// - Azure: "Microsoft NVMe Direct Disk" / "… v2" (local NVMe, L-series), "MSFT NVMe Accelerator v1.0" (remote
///   managed disks on NVMe VM sizes); SCSI "Msft Virtual Disk" is a managed disk except the resource disk,
///   told apart by VMBus `device_id` `{00000000-0001-…}` (Gen1) or LUN 1 on `{f8b3781a-…}` (Gen2), as the
///   Azure udev rules (azure-vm-utils `80-azure-disk.rules`) do.
/// - GCP: "nvme_card-pd" / "PersistentDisk" (persistent disk), "nvme_cardN" / "EphemeralDisk" (local SSD).
fn class_of(d: &Disk, x: &DiskExtra, platform: PlatformKind) -> (DiskClass, String) {
    let model = d.model.as_deref().unwrap_or("");
    let vendor = d.vendor.as_deref().unwrap_or("");
    let quoted = || format!("model {model:?}");
    match d.transport {
        Transport::Loop | Transport::Dm | Transport::Md => {
            return (DiskClass::Logical, format!("{} device", serde_plain(d.transport)));
        }
        Transport::Nbd | Transport::Rbd | Transport::Iscsi => {
            return (
                DiskClass::NetworkVolume,
                format!("{} transport", serde_plain(d.transport)),
            );
        }
        _ => {}
    }
    if model == "Amazon EC2 NVMe Instance Storage" {
        return (DiskClass::LocalInstanceStore, quoted());
    }
    if model == "Amazon Elastic Block Store" {
        return (DiskClass::NetworkVolume, quoted());
    }
    if model.starts_with("Microsoft NVMe Direct Disk") {
        return (DiskClass::LocalInstanceStore, quoted());
    }
    if model.starts_with("MSFT NVMe Accelerator") {
        return (DiskClass::NetworkVolume, quoted());
    }
    if model == "nvme_card-pd" || model == "PersistentDisk" {
        return (DiskClass::NetworkVolume, quoted());
    }
    if model == "EphemeralDisk"
        || model
            .strip_prefix("nvme_card")
            .is_some_and(|r| r.bytes().all(|b| b.is_ascii_digit()))
    {
        return (DiskClass::LocalInstanceStore, quoted());
    }
    if d.removable == Some(true) || d.name.starts_with("sr") {
        return (DiskClass::Removable, "removable media".to_string());
    }
    if platform == PlatformKind::Azure && vendor == "Msft" && model == "Virtual Disk" {
        let id = x.vmbus_device_id.as_deref().unwrap_or("");
        let gen1_resource = id.starts_with("{00000000-0001-");
        let gen2_resource = id.eq_ignore_ascii_case("{f8b3781a-1e82-4818-a1c3-63d806ec15bb}") && x.scsi_lun == Some(1);
        if gen1_resource || gen2_resource {
            return (
                DiskClass::LocalInstanceStore,
                format!(
                    "Azure resource disk (VMBus device_id {id}, LUN {})",
                    x.scsi_lun.unwrap_or(0)
                ),
            );
        }
        return (
            DiskClass::NetworkVolume,
            format!("Azure managed disk (Msft Virtual Disk, VMBus device_id {id})"),
        );
    }
    if platform == PlatformKind::Aws && d.transport == Transport::Xen {
        return (
            DiskClass::NetworkVolume,
            "xen-blkfront on AWS: EBS (IMDS block-device-mapping tells legacy instance store apart)".to_string(),
        );
    }
    match platform {
        PlatformKind::Baremetal => (DiskClass::Local, "physical disk on bare metal".to_string()),
        _ => (
            DiskClass::VirtualDisk,
            format!("hypervisor disk on {}", platform.as_str()),
        ),
    }
}

fn serde_plain(t: Transport) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_from_device_paths() {
        let t = |name: &str, p: &str| transport(name, Path::new(p));
        assert_eq!(
            t(
                "sda",
                "sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"
            ),
            Transport::Sata
        );
        assert_eq!(
            t(
                "sdb",
                "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/host0/port-0:0/end_device-0:0/target0:0:0/0:0:0:0/block/sdb"
            ),
            Transport::Sas
        );
        assert_eq!(
            t("vda", "sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda"),
            Transport::Virtio
        );
        assert_eq!(
            t(
                "sda",
                "sys/devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:0/0:0:0:0/block/sda"
            ),
            Transport::Virtio
        );
        assert_eq!(t("xvda", "sys/devices/vbd-51712/block/xvda"), Transport::Xen);
        assert_eq!(
            t("nvme0n1", "sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1"),
            Transport::Nvme
        );
        assert_eq!(
            t(
                "sdc",
                "sys/devices/platform/host3/session1/target3:0:0/3:0:0:0/block/sdc"
            ),
            Transport::Iscsi
        );
        assert_eq!(
            t(
                "sda",
                "sys/devices/pci0000:00/0000:00:15.0/0000:03:00.0/host2/target2:0:0/2:0:0:0/block/sda"
            ),
            Transport::Scsi
        );
        assert_eq!(
            t(
                "sdd",
                "sys/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdd"
            ),
            Transport::Usb
        );
        assert_eq!(t("loop0", "sys/devices/virtual/block/loop0"), Transport::Loop);
        assert_eq!(t("md0", "sys/devices/virtual/block/md0"), Transport::Md);
        assert_eq!(t("dm-1", "sys/devices/virtual/block/dm-1"), Transport::Dm);
        assert_eq!(
            t("mmcblk0", "sys/devices/platform/mmc0/mmc0:0001/block/mmcblk0"),
            Transport::Mmc
        );
        assert_eq!(t("weird", "sys/devices/virtual/block/weird"), Transport::Unknown);
    }

    #[test]
    fn names_that_are_skipped() {
        assert!(skip_name("ram0") && skip_name("zram12") && skip_name("fd0"));
        assert!(!skip_name("framework") && !skip_name("ramdisk-x") && !skip_name("sda"));
    }

    #[test]
    fn lun_and_guid_parsing() {
        assert_eq!(scsi_lun("0:0:0:1"), Some(1));
        assert_eq!(scsi_lun("host0"), None);
        assert!(looks_like_guid("f8b3781a-1e82-4818-a1c3-63d806ec15bb"));
        assert!(!looks_like_guid("VMBUS:00"));
    }

    #[test]
    fn normalize_resolves_parent_components() {
        assert_eq!(
            normalize(Path::new("sys/block/../devices/virtual/block/loop0")),
            PathBuf::from("sys/devices/virtual/block/loop0")
        );
    }
}
