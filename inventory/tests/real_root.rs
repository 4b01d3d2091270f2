//! Collection on the machine running the tests: only sanity, since the hardware is unknown.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use inventory::{PlatformKind, collect};

#[test]
fn live_root_gives_sane_non_empty_results() {
    let c = collect(Path::new("/"));
    let inv = &c.inventory;
    eprintln!("{}", serde_json::to_string_pretty(inv).unwrap());
    eprintln!("unreadable: {:#?}", c.unreadable);
    assert!(inv.cpu.threads.unwrap_or(0) >= 1, "threads: {:?}", inv.cpu.threads);
    assert!(inv.cpu.cores.unwrap_or(0) >= 1);
    assert!(inv.cpu.sockets.unwrap_or(0) >= 1);
    assert!(inv.memory.total_bytes.unwrap_or(0) > 0);
    assert!(inv.os.kernel.as_deref().is_some_and(|k| !k.is_empty()));
    assert!(inv.os.boot_time.unwrap_or(0) > 1_000_000_000);
    assert!(inv.hostname.is_some());
    // A hypervisor flag in cpuinfo means this is not bare metal.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    if cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
    {
        assert_ne!(
            inv.platform.kind,
            PlatformKind::Baremetal,
            "{:?}",
            inv.platform.evidence
        );
    }
    // The root file system is on a block device here, so some disk holds it.
    let root_is_block = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| {
            l.split(' ').nth(4) == Some("/")
                && l.split(" - ")
                    .nth(1)
                    .is_some_and(|r| r.split(' ').nth(1).is_some_and(|s| s.starts_with("/dev/")))
        });
    if root_is_block {
        assert!(
            !inv.root_disks().is_empty(),
            "no root disk among {:?}",
            inv.disks.iter().map(|d| &d.name).collect::<Vec<_>>()
        );
    }
    // Every interface in sysfs but lo and skipped plumbing is reported, with an MTU.
    assert!(inv.nics.iter().all(|n| n.name != "lo" && n.mtu.is_some()));
}
