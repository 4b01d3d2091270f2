//! Change detection on real collections: hot-added disks and loop devices, a NIC going down, boot time only,
//! huge pages in use, OpenNebula markers.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;

use common::{fixture_copy, write};
use inventory::{DiskClass, PlatformKind, Transport, changed_fields, collect};

fn add_nvme_namespace(root: &Path) {
    // A new EBS volume attached to a Nitro instance shows up as another NVMe controller and namespace.
    let dev = "sys/devices/pci0000:00/0000:00:1d.0/nvme/nvme3/nvme3n1";
    write(root, &format!("{dev}/dev"), "259:6\n");
    write(root, &format!("{dev}/size"), "104857600\n");
    write(root, &format!("{dev}/queue/rotational"), "0\n");
    write(
        root,
        "sys/devices/pci0000:00/0000:00:1d.0/nvme/nvme3/model",
        "Amazon Elastic Block Store              \n",
    );
    write(
        root,
        "sys/devices/pci0000:00/0000:00:1d.0/nvme/nvme3/serial",
        "vol0ffeeddccbbaa9988 \n",
    );
    symlink("../../nvme3", root.join(dev).join("device")).unwrap();
    symlink(
        format!("../{}", dev.trim_start_matches("sys/")),
        root.join("sys/block/nvme3n1"),
    )
    .unwrap();
}

#[test]
fn hot_added_disk_is_a_change() {
    let tree = fixture_copy("aws-nitro-i3en");
    let before = collect(tree.path()).inventory;
    add_nvme_namespace(tree.path());
    let after = collect(tree.path()).inventory;
    assert_ne!(before.fingerprint(), after.fingerprint());
    assert_eq!(changed_fields(&before, &after), ["disks[nvme3n1]"]);
    let new = after.disk("nvme3n1").unwrap();
    assert_eq!((new.class, new.size_bytes), (DiskClass::NetworkVolume, Some(50 << 30)));
    assert_eq!(new.serial.as_deref(), Some("vol0ffeeddccbbaa9988"));
    assert_eq!(
        after.disk_summary(),
        "2×2.3T nvme-local, 1×100G nvme-net, 1×50G nvme-net"
    );
}

#[test]
fn hot_added_loop_device_is_a_change() {
    let tree = fixture_copy("aws-nitro-i3en");
    let before = collect(tree.path()).inventory;
    assert!(
        before.disk("loop1").is_none(),
        "an unused loop device (size 0) is not reported"
    );
    // `losetup /dev/loop1 /var/tmp/disk.img` gives the loop device a size and a backing file.
    write(tree.path(), "sys/devices/virtual/block/loop1/size", "2097152\n");
    write(
        tree.path(),
        "sys/devices/virtual/block/loop1/loop/backing_file",
        "/var/tmp/disk.img\n",
    );
    let after = collect(tree.path()).inventory;
    assert_eq!(changed_fields(&before, &after), ["disks[loop1]"]);
    let lp = after.disk("loop1").unwrap();
    assert_eq!(
        (lp.transport, lp.class, lp.size_bytes),
        (Transport::Loop, DiskClass::Logical, Some(1 << 30))
    );
    assert_eq!(lp.backing_file.as_deref(), Some("/var/tmp/disk.img"));
    // Logical devices stay out of the placement summary.
    assert_eq!(after.disk_summary(), before.disk_summary());
}

#[test]
fn nic_going_down_is_a_change() {
    let tree = fixture_copy("baremetal");
    let before = collect(tree.path()).inventory;
    write(
        tree.path(),
        "sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0/net/eno1/operstate",
        "down\n",
    );
    let after = collect(tree.path()).inventory;
    assert_eq!(changed_fields(&before, &after), ["nics[eno1].operstate"]);
    assert_ne!(before.fingerprint(), after.fingerprint());
}

#[test]
fn boot_time_and_hugepage_use_alone_are_ignored() {
    let tree = fixture_copy("aws-nitro-i3en");
    let before = collect(tree.path()).inventory;
    let stat = std::fs::read_to_string(tree.path().join("proc/stat")).unwrap();
    write(
        tree.path(),
        "proc/stat",
        &stat.replace("btime 1732500000", "btime 1732500001"),
    );
    write(
        tree.path(),
        "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
        "12\n",
    );
    let after = collect(tree.path()).inventory;
    assert_ne!(before, after, "the values differ ...");
    assert_eq!(after.os.boot_time, Some(1_732_500_001));
    assert_eq!(
        before.fingerprint(),
        after.fingerprint(),
        "... but not in a way worth sending"
    );
    assert!(changed_fields(&before, &after).is_empty());
}

#[test]
fn metadata_enrichment_is_a_change() {
    let before = collect(&common::fixture("aws-xen-i3")).inventory;
    let mut after = before.clone();
    after.platform.instance_type = Some("i3.2xlarge".into());
    after.platform.zone = Some("eu-west-1a".into());
    assert_eq!(
        changed_fields(&before, &after),
        ["platform.instance_type", "platform.zone"]
    );
}

#[test]
fn opennebula_needs_a_context_marker() {
    let tree = fixture_copy("opennebula-kvm");
    let root = tree.path();
    // Without one_env the CONTEXT CD-ROM still identifies OpenNebula (the VMID is then unknown).
    std::fs::remove_file(root.join("run/one-context/one_env")).unwrap();
    let inv = collect(root).inventory;
    assert_eq!(
        (inv.platform.kind, inv.platform.instance_id.as_deref()),
        (PlatformKind::Opennebula, None)
    );
    // Without the CD-ROM only the installed one-context package is left: still OpenNebula, on a VM.
    std::fs::remove_file(root.join("dev/sr0")).unwrap();
    let inv = collect(root).inventory;
    assert_eq!(inv.platform.kind, PlatformKind::Opennebula);
    assert!(
        inv.platform.evidence[0].contains("one-context"),
        "{:?}",
        inv.platform.evidence
    );
    // Without any marker it is just a KVM guest.
    std::fs::remove_dir_all(root.join("etc/one-context.d")).unwrap();
    let inv = collect(root).inventory;
    assert_eq!(
        (inv.platform.kind, inv.platform.hypervisor.as_deref()),
        (PlatformKind::OtherVirtual, Some("kvm"))
    );
    assert!(inv.disks.iter().all(|d| d.class != DiskClass::LocalInstanceStore));
}
