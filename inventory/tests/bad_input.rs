//! Missing, unreadable and malformed files: the field is unknown and reported once, collection goes on.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

mod common;

use common::{fixture_copy, write};
use inventory::{PlatformKind, WarnOnce, collect};

#[test]
fn missing_meminfo_is_unknown_and_reported() {
    let tree = fixture_copy("baremetal");
    std::fs::remove_file(tree.path().join("proc/meminfo")).unwrap();
    let c = collect(tree.path());
    assert_eq!(c.inventory.memory.total_bytes, None);
    let u: Vec<_> = c
        .unreadable
        .iter()
        .filter(|u| u.field == "memory.total_bytes")
        .collect();
    assert_eq!(u.len(), 1, "{:#?}", c.unreadable);
    assert!(u[0].path.ends_with("proc/meminfo"));
    // Everything else is still there.
    assert_eq!(c.inventory.platform.kind, PlatformKind::Baremetal);
    assert_eq!(c.inventory.disks.len(), 5);
}

#[test]
fn unreadable_and_garbage_attributes_are_unknown_and_reported() {
    let tree = fixture_copy("baremetal");
    let root = tree.path();
    // A serial that cannot be read (a directory where a file should be: EISDIR).
    let serial = root.join("sys/devices/virtual/nvme-subsystem/nvme-subsys0/serial");
    std::fs::remove_file(&serial).unwrap();
    std::fs::create_dir(&serial).unwrap();
    // A size that is not a number.
    write(
        root,
        "sys/devices/pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdb/size",
        "lots\n",
    );
    // An MTU that is not a number.
    write(
        root,
        "sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.1/net/eno2/mtu",
        "-\n",
    );
    let c = collect(root);
    let inv = &c.inventory;
    assert_eq!(inv.disk("nvme0n1").unwrap().serial, None);
    assert_eq!(inv.disk("sdb").unwrap().size_bytes, None);
    assert_eq!(inv.nic("eno2").unwrap().mtu, None);
    let mut fields: Vec<&str> = c.unreadable.iter().map(|u| u.field.as_str()).collect();
    fields.sort();
    assert_eq!(
        fields,
        ["disks[nvme0n1].serial", "disks[sdb].size_bytes", "nics[eno2].mtu"],
        "{:#?}",
        c.unreadable
    );
    let msg = c
        .unreadable
        .iter()
        .find(|u| u.field == "disks[sdb].size_bytes")
        .unwrap()
        .to_string();
    assert!(msg.contains("unknown") && msg.contains("\"lots\""), "{msg}");

    // A daemon collecting on a timer logs each of them once.
    let mut once = WarnOnce::new();
    assert_eq!(once.log(&c.unreadable), 3);
    assert_eq!(once.log(&collect(root).unreadable), 0);
}

#[test]
fn empty_root_yields_unknowns_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let c = collect(dir.path());
    let inv = &c.inventory;
    assert_eq!(
        (inv.cpu.threads, inv.memory.total_bytes, inv.os.kernel.as_deref()),
        (None, None, None)
    );
    assert!(inv.disks.is_empty() && inv.nics.is_empty());
    assert_eq!(inv.platform.kind, PlatformKind::Baremetal);
    assert_eq!(inv.platform.evidence, ["no DMI and no hypervisor marker"]);
    let fields: Vec<&str> = c.unreadable.iter().map(|u| u.field.as_str()).collect();
    for f in [
        "cpu",
        "cpu.threads",
        "memory.total_bytes",
        "disks.mount_points",
        "os.kernel",
        "os.boot_time",
        "os.id",
    ] {
        assert!(fields.contains(&f), "{f} not in {fields:?}");
    }
}

#[test]
fn a_fifo_in_dev_is_not_opened() {
    let tree = fixture_copy("vmware");
    let dev = tree.path().join("dev/nvme0n1");
    std::fs::remove_file(&dev).unwrap();
    nix::unistd::mkfifo(&dev, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).unwrap();
    // Opening a FIFO for reading would block forever; the collector must return.
    let c = collect(tree.path());
    assert_eq!(c.inventory.disk("nvme0n1").unwrap().signature, None);
    assert!(
        c.unreadable.iter().any(|u| u.field == "disks[nvme0n1].signature"),
        "{:#?}",
        c.unreadable
    );
}
