//! Every fixture tree: exact platform, instance type, disk classification and identity, NIC facts, OS.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::{FIXTURES, fixture};
use inventory::{
    CollectOptions, Collected, Disk, DiskClass, Inventory, PackageSource, PlatformKind, SignatureKind, Transport,
    collect, collect_with,
};

fn load(name: &str) -> Inventory {
    let Collected { inventory, unreadable } = collect(&fixture(name));
    assert!(
        unreadable.is_empty(),
        "{name}: unexpected unreadable fields: {unreadable:#?}"
    );
    inventory
}

fn names(inv: &Inventory) -> Vec<&str> {
    inv.disks.iter().map(|d| d.name.as_str()).collect()
}

fn disk<'a>(inv: &'a Inventory, name: &str) -> &'a Disk {
    inv.disk(name)
        .unwrap_or_else(|| panic!("no disk {name} in {:?}", names(inv)))
}

fn addrs(inv: &Inventory, nic: &str) -> Vec<String> {
    inv.nic(nic).unwrap().addresses.iter().map(|a| a.to_string()).collect()
}

fn sig(d: Option<&inventory::Signature>) -> (Option<SignatureKind>, Option<&str>) {
    (d.map(|s| s.kind), d.and_then(|s| s.label.as_deref()))
}

const GIB: u64 = 1 << 30;

#[test]
fn every_fixture_collects_without_unreadable_fields_and_round_trips_json() {
    for name in FIXTURES {
        let inv = load(name);
        let json = serde_json::to_string(&inv).unwrap();
        let back: Inventory = serde_json::from_str(&json).unwrap();
        assert_eq!(back, inv, "{name}: JSON round trip");
        assert!(
            inv.cpu.threads.unwrap() >= 1 && inv.memory.total_bytes.unwrap() > 0,
            "{name}"
        );
    }
}

#[test]
fn aws_nitro_i3en() {
    let inv = load("aws-nitro-i3en");
    assert_eq!(inv.hostname.as_deref(), Some("ip-10-0-1-23"));
    let p = &inv.platform;
    assert_eq!(p.kind, PlatformKind::Aws);
    assert_eq!(p.hypervisor.as_deref(), Some("nitro"));
    assert_eq!(p.instance_type.as_deref(), Some("i3en.2xlarge"));
    assert_eq!(p.instance_id.as_deref(), Some("i-0123456789abcdef0"));
    assert_eq!((p.region.as_deref(), p.zone.as_deref()), (None, None));
    assert!(
        p.evidence.contains(&r#"dmi sys_vendor "Amazon EC2""#.to_string()),
        "{:?}",
        p.evidence
    );
    assert_eq!(serde_json::to_value(p.kind).unwrap(), "aws");

    let cpu = &inv.cpu;
    assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
    assert_eq!(
        cpu.model.as_deref(),
        Some("Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz")
    );
    assert_eq!(
        (cpu.sockets, cpu.cores, cpu.threads, cpu.numa_nodes),
        (Some(1), Some(4), Some(8), Some(1))
    );
    assert_eq!(cpu.flags, ["aes", "avx", "avx2", "avx512f", "hypervisor"]);
    assert_eq!(inv.memory.total_bytes, Some(65_075_640 * 1024));
    let huge: Vec<_> = inv
        .memory
        .hugepages
        .iter()
        .map(|h| (h.size_bytes, h.total, h.free))
        .collect();
    assert_eq!(huge, [(2 << 20, Some(1024), Some(1000)), (GIB, Some(0), Some(0))]);

    // loop1 has size 0 and is skipped.
    assert_eq!(names(&inv), ["loop0", "nvme0n1", "nvme1n1", "nvme2n1"]);
    let root = disk(&inv, "nvme0n1");
    assert_eq!(root.class, DiskClass::NetworkVolume);
    assert_eq!(root.class_evidence, r#"model "Amazon Elastic Block Store""#);
    assert_eq!(root.transport, Transport::Nvme);
    assert_eq!(root.driver.as_deref(), Some("nvme"));
    assert_eq!(root.dev.as_deref(), Some("259:0"));
    assert_eq!(root.size_bytes, Some(100 * GIB));
    assert_eq!(root.model.as_deref(), Some("Amazon Elastic Block Store"));
    assert_eq!(root.serial.as_deref(), Some("vol0a1b2c3d4e5f60718"));
    assert_eq!(
        root.wwn.as_deref(),
        Some(
            "nvme.1d0f-766f6c3061316232633364346535663630373138-416d617a6f6e20456c617374696320426c6f636b2053746f7265-00000001"
        )
    );
    assert_eq!(root.rotational, Some(false));
    assert!(root.holds_root);
    assert_eq!(sig(root.signature.as_ref()), (Some(SignatureKind::Gpt), None));
    let parts: Vec<_> = root.partitions.iter().map(|p| (p.name.as_str(), p.number)).collect();
    assert_eq!(
        parts,
        [
            ("nvme0n1p1", Some(1)),
            ("nvme0n1p14", Some(14)),
            ("nvme0n1p15", Some(15))
        ]
    );
    let p1 = root.partition("nvme0n1p1").unwrap();
    assert_eq!(
        sig(p1.signature.as_ref()),
        (Some(SignatureKind::Ext4), Some("cloudimg-rootfs"))
    );
    assert_eq!(
        p1.signature.as_ref().unwrap().uuid.as_deref(),
        Some("5f3c1a2b-8d4e-4f60-9a1b-2c3d4e5f6a7b")
    );
    assert_eq!(
        (p1.mount_points.as_slice(), p1.holds_root),
        (&["/".to_string()][..], true)
    );
    assert_eq!(
        (p1.start_bytes, p1.size_bytes),
        (Some(227_328 * 512), Some(209_487_839 * 512))
    );
    let p15 = root.partition("nvme0n1p15").unwrap();
    assert_eq!(sig(p15.signature.as_ref()), (Some(SignatureKind::Vfat), Some("UEFI")));
    assert_eq!(p15.mount_points, ["/boot/efi"]);
    assert_eq!(root.partition("nvme0n1p14").unwrap().signature, None);
    assert_eq!(root.root_partition().map(|p| p.name.as_str()), Some("nvme0n1p1"));

    for (name, serial) in [("nvme1n1", "AWS2ED7B0F5C3A1D2E4F"), ("nvme2n1", "AWS61C0E9A7B2D3F4A5B")] {
        let d = disk(&inv, name);
        assert_eq!(d.class, DiskClass::LocalInstanceStore, "{name}");
        assert_eq!(d.model.as_deref(), Some("Amazon EC2 NVMe Instance Storage"));
        assert_eq!(d.serial.as_deref(), Some(serial));
        assert_eq!(d.size_bytes, Some(2_500_000_000_000));
        assert_eq!(d.transport, Transport::Nvme);
        assert!(!d.holds_root);
        // The stable name is the udev link naming the serial, not the eui alias.
        assert_eq!(
            d.stable_path(),
            Some(format!("/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_{serial}").as_str())
        );
    }
    assert_eq!(
        disk(&inv, "nvme1n1").by_id.len(),
        2,
        "partition links are not the disk's"
    );
    assert_eq!(
        disk(&inv, "nvme0n1").by_id,
        ["/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0a1b2c3d4e5f60718"]
    );
    assert!(
        disk(&inv, "loop0").stable_path().is_none(),
        "no udev link: no stable path"
    );
    let data = disk(&inv, "nvme1n1");
    assert_eq!(
        sig(data.signature.as_ref()),
        (Some(SignatureKind::Xfs), Some("mysql-data"))
    );
    assert_eq!(
        data.mount_points,
        [
            "/var/lib/kubelet/pods/7f1e/volumes/kubernetes.io~local-volume/pv-nvme1",
            "/var/lib/mysql"
        ]
    );
    assert_eq!(disk(&inv, "nvme2n1").signature, None);
    assert!(disk(&inv, "nvme2n1").mount_points.is_empty());

    let lp = disk(&inv, "loop0");
    assert_eq!((lp.class, lp.transport), (DiskClass::Logical, Transport::Loop));
    assert_eq!(sig(lp.signature.as_ref()), (Some(SignatureKind::Squashfs), None));
    assert_eq!(
        lp.backing_file.as_deref(),
        Some("/var/lib/snapd/snaps/core20_2105.snap")
    );
    assert_eq!(lp.mount_points, ["/snap/core20/2105"]);
    assert_eq!(lp.read_only, Some(true));

    assert_eq!(
        inv.root_disks().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["nvme0n1"]
    );
    assert_eq!(inv.disk_summary(), "2×2.3T nvme-local, 1×100G nvme-net");

    // The per-pod veth is skipped by default.
    assert_eq!(inv.nics.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["ens5"]);
    let ens5 = inv.nic("ens5").unwrap();
    assert_eq!(ens5.mac.as_deref(), Some("0a:1b:2c:3d:4e:5f"));
    assert_eq!(ens5.driver.as_deref(), Some("ena"));
    assert!(!ens5.is_virtual);
    assert_eq!(
        (ens5.mtu, ens5.speed_mbps, ens5.operstate.as_deref()),
        (Some(9001), None, Some("up"))
    );
    assert_eq!(
        addrs(&inv, "ens5"),
        [
            "10.0.1.23/24",
            "2600:1f18:abcd:1200::1a2b/128",
            "fe80::81b:2cff:fe3d:4e5f/64"
        ]
    );
    assert!(ens5.default_route_v4 && ens5.default_route_v6);
    assert_eq!(ens5.gateway_v4, Some(Ipv4Addr::new(10, 0, 1, 1)));
    assert_eq!(
        ens5.gateway_v6,
        Some("fe80::4a:ffff:fe00:1".parse::<Ipv6Addr>().unwrap())
    );
    assert!(ens5.has_address(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 23))));
    assert_eq!(inv.default_route_nic().map(|n| n.name.as_str()), Some("ens5"));

    let os = &inv.os;
    assert_eq!(
        (os.id.as_deref(), os.version_id.as_deref()),
        (Some("ubuntu"), Some("22.04"))
    );
    assert_eq!(os.pretty_name.as_deref(), Some("Ubuntu 22.04.4 LTS"));
    assert_eq!(os.kernel.as_deref(), Some("6.5.0-1022-aws"));
    assert_eq!(os.arch.as_deref(), Some("x86_64"));
    assert_eq!(os.boot_time, Some(1_732_500_000));
    let pkgs: Vec<_> = os
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_deref(), p.source))
        .collect();
    assert_eq!(
        pkgs,
        [
            ("containerd", Some("1.7.12-0ubuntu2~22.04.1"), PackageSource::Dpkg),
            ("kubeadm", Some("1.30.2-1.1"), PackageSource::Dpkg),
            ("kubelet", Some("1.30.2-1.1"), PackageSource::Dpkg),
        ]
    );
}

#[test]
fn container_plumbing_is_reported_when_asked() {
    let all = collect_with(
        &fixture("aws-nitro-i3en"),
        &CollectOptions {
            skip_nic_prefixes: vec![],
        },
    )
    .inventory;
    let veth = all.nic("veth1a2b3c4").unwrap();
    assert!(veth.is_virtual && veth.driver.is_none() && veth.addresses.is_empty());
    // ... and the stable view (change detection) leaves it out again.
    assert!(all.stable().nic("veth1a2b3c4").is_none());
    assert_eq!(all.fingerprint(), load("aws-nitro-i3en").fingerprint());
}

#[test]
fn aws_xen_i3() {
    let inv = load("aws-xen-i3");
    let p = &inv.platform;
    assert_eq!((p.kind, p.hypervisor.as_deref()), (PlatformKind::Aws, Some("xen")));
    // Xen instances do not carry the instance type in DMI: only the metadata service knows it.
    assert_eq!((p.instance_type.as_deref(), p.instance_id.as_deref()), (None, None));
    assert!(
        p.evidence.contains(&"sys/hypervisor/uuid starts with ec2".to_string()),
        "{:?}",
        p.evidence
    );
    assert_eq!(p.dmi.product_version.as_deref(), Some("4.11.amazon"));
    assert_eq!(inv.cpu.flags, ["aes", "avx", "avx2", "hypervisor"]);
    assert!(!inv.cpu.has_flag("avx512f"));

    assert_eq!(names(&inv), ["nvme0n1", "xvda"]);
    let xvda = disk(&inv, "xvda");
    assert_eq!((xvda.transport, xvda.driver.as_deref()), (Transport::Xen, Some("vbd")));
    assert_eq!(xvda.class, DiskClass::NetworkVolume);
    assert_eq!((xvda.size_bytes, xvda.dev.as_deref()), (Some(8 * GIB), Some("202:0")));
    assert_eq!(
        (xvda.model.as_deref(), xvda.serial.as_deref(), xvda.wwn.as_deref()),
        (None, None, None)
    );
    assert!(xvda.holds_root);
    let p1 = xvda.partition("xvda1").unwrap();
    assert_eq!(
        sig(p1.signature.as_ref()),
        (Some(SignatureKind::Ext4), Some("cloudimg-rootfs"))
    );
    assert_eq!(p1.mount_points, ["/"]);
    let store = disk(&inv, "nvme0n1");
    assert_eq!(store.class, DiskClass::LocalInstanceStore);
    assert_eq!(
        (store.size_bytes, store.serial.as_deref()),
        (Some(1_900_000_000_000), Some("AWS1F2E3D4C5B6A79800"))
    );
    assert_eq!(inv.disk_summary(), "1×1.7T nvme-local, 1×8G xen-net");

    let eth0 = inv.nic("eth0").unwrap();
    assert_eq!((eth0.driver.as_deref(), eth0.mtu), (Some("ena"), Some(9001)));
    assert_eq!(addrs(&inv, "eth0"), ["172.31.5.10/20", "fe80::a1:b2ff:fec3:d4e5/64"]);
    assert!(eth0.default_route_v4 && !eth0.default_route_v6);
    assert_eq!(eth0.gateway_v4, Some(Ipv4Addr::new(172, 31, 0, 1)));

    let kubelet = inv.os.package("kubelet").unwrap();
    assert_eq!(
        (kubelet.source, kubelet.version.as_deref()),
        (PackageSource::Binary, None)
    );
    assert_eq!(kubelet.origin, "usr/local/bin/kubelet");
    assert!(inv.os.package("kubeadm").is_none() && inv.os.package("containerd").is_none());
}

#[test]
fn azure_lsv2() {
    let inv = load("azure-lsv2");
    let p = &inv.platform;
    assert_eq!((p.kind, p.hypervisor.as_deref()), (PlatformKind::Azure, Some("hyperv")));
    assert_eq!(p.instance_type, None);
    assert!(
        p.evidence[0].contains("7783-7084-3265-9085-8269-3286-77"),
        "{:?}",
        p.evidence
    );
    // "None" is a firmware placeholder, not a value.
    assert_eq!(p.dmi.board_asset_tag, None);
    assert_eq!(inv.cpu.model.as_deref(), Some("AMD EPYC 7551 32-Core Processor"));
    assert_eq!(
        (inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads),
        (Some(1), Some(4), Some(8))
    );

    assert_eq!(names(&inv), ["nvme0n1", "sda", "sdb", "sdc"]);
    let nvme = disk(&inv, "nvme0n1");
    assert_eq!(
        (nvme.class, nvme.transport),
        (DiskClass::LocalInstanceStore, Transport::Nvme)
    );
    assert_eq!(nvme.model.as_deref(), Some("Microsoft NVMe Direct Disk"));
    assert_eq!(nvme.size_bytes, Some(3_750_748_848 * 512));
    assert_eq!(nvme.wwn.as_deref(), Some("eui.0025384b71a1b2c3d4e5f60718293a4b"));
    assert_eq!(nvme.signature, None);

    let sda = disk(&inv, "sda");
    assert_eq!(
        (sda.class, sda.transport, sda.driver.as_deref()),
        (DiskClass::NetworkVolume, Transport::Scsi, Some("hv_storvsc"))
    );
    assert_eq!(
        (sda.vendor.as_deref(), sda.model.as_deref()),
        (Some("Msft"), Some("Virtual Disk"))
    );
    assert_eq!(sda.wwn.as_deref(), Some("naa.600224800a1b2c3d4e5f60718293a4b5"));
    assert_eq!((sda.size_bytes, sda.rotational), (Some(30 * GIB), Some(true)));
    assert!(sda.holds_root);
    assert_eq!(sda.partition("sda1").unwrap().mount_points, ["/"]);
    assert_eq!(sda.partition("sda15").unwrap().mount_points, ["/boot/efi"]);

    let sdb = disk(&inv, "sdb");
    assert_eq!(sdb.class, DiskClass::LocalInstanceStore);
    assert!(sdb.class_evidence.contains("resource disk"), "{}", sdb.class_evidence);
    assert_eq!(sdb.size_bytes, Some(80 * GIB));
    let mbr = sdb.signature.as_ref().unwrap();
    assert_eq!((mbr.kind, mbr.uuid.as_deref()), (SignatureKind::Mbr, Some("5eed1234")));
    let sdb1 = sdb.partition("sdb1").unwrap();
    assert_eq!(
        (sig(sdb1.signature.as_ref()), sdb1.mount_points.as_slice()),
        ((Some(SignatureKind::Ext4), None), &["/mnt".to_string()][..])
    );
    assert!(!sdb.holds_root);

    let sdc = disk(&inv, "sdc");
    assert_eq!((sdc.class, sdc.signature.as_ref()), (DiskClass::NetworkVolume, None));
    assert!(sdc.class_evidence.contains("f8b3781b"), "{}", sdc.class_evidence);
    assert_eq!(
        inv.disk_summary(),
        "1×1.7T nvme-local, 1×256G scsi-net, 1×80G scsi-local, 1×30G scsi-net"
    );

    assert_eq!(
        inv.nics.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["enP12345s1", "eth0"]
    );
    let vf = inv.nic("enP12345s1").unwrap();
    let eth0 = inv.nic("eth0").unwrap();
    assert_eq!(vf.mac, eth0.mac);
    assert_eq!(
        (vf.driver.as_deref(), vf.speed_mbps, vf.is_virtual),
        (Some("mlx5_core"), Some(40000), false)
    );
    assert!(vf.addresses.is_empty() && !vf.default_route_v4);
    assert_eq!(
        (eth0.driver.as_deref(), eth0.speed_mbps, eth0.mtu),
        (Some("hv_netvsc"), Some(40000), Some(1500))
    );
    assert_eq!(addrs(&inv, "eth0"), ["10.224.0.4/16", "fe80::222:48ff:fe1a:2b3c/64"]);
    assert_eq!(eth0.gateway_v4, Some(Ipv4Addr::new(10, 224, 0, 1)));

    let c = inv.os.package("containerd").unwrap();
    assert_eq!(
        (c.version.as_deref(), c.origin.as_str()),
        (Some("1.7.15-ubuntu22.04u1"), "moby-containerd")
    );
    assert_eq!(inv.os.package("kubelet").unwrap().source, PackageSource::Binary);
}

#[test]
fn vmware() {
    let inv = load("vmware");
    let p = &inv.platform;
    assert_eq!(
        (p.kind, p.hypervisor.as_deref()),
        (PlatformKind::Vmware, Some("vmware"))
    );
    assert!(
        p.evidence.iter().any(|e| e.contains("VMware-42 1a")),
        "{:?}",
        p.evidence
    );
    assert_eq!(p.dmi.product_name.as_deref(), Some("VMware7,1"));
    assert_eq!(
        (p.dmi.chassis_asset_tag.as_deref(), p.dmi.product_version.as_deref()),
        (None, None)
    );
    assert_eq!(
        (inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads),
        (Some(2), Some(4), Some(4))
    );
    assert!(inv.cpu.has_flag("avx512f"));
    assert_eq!(inv.memory.swap_total_bytes, Some(4_194_300 * 1024));

    // The empty CD-ROM drive (size 0) is not reported.
    assert_eq!(names(&inv), ["dm-0", "dm-1", "nvme0n1", "sda"]);
    let sda = disk(&inv, "sda");
    assert_eq!(
        (sda.class, sda.transport, sda.driver.as_deref()),
        (DiskClass::VirtualDisk, Transport::Scsi, Some("vmw_pvscsi"))
    );
    assert_eq!(
        (sda.vendor.as_deref(), sda.model.as_deref()),
        (Some("VMware"), Some("Virtual disk"))
    );
    assert_eq!(sda.serial.as_deref(), Some("6000c2912a3b4c5d6e7f8091a2b3c4d5"));
    assert_eq!(sda.wwn.as_deref(), Some("naa.6000c2912a3b4c5d6e7f8091a2b3c4d5"));
    assert_eq!((sda.size_bytes, sda.rotational), (Some(60 * GIB), Some(true)));
    assert!(sda.holds_root, "root is on an LV whose PV is sda3");
    let sda1 = sda.partition("sda1").unwrap();
    assert_eq!(sig(sda1.signature.as_ref()), (Some(SignatureKind::Vfat), None));
    assert_eq!(sda1.signature.as_ref().unwrap().uuid.as_deref(), Some("7A3B-2C1D"));
    assert_eq!(sda1.mount_points, ["/boot/efi"]);
    let sda2 = sda.partition("sda2").unwrap();
    assert_eq!(
        (sig(sda2.signature.as_ref()), sda2.mount_points.as_slice()),
        ((Some(SignatureKind::Ext4), Some("boot")), &["/boot".to_string()][..])
    );
    let sda3 = sda.partition("sda3").unwrap();
    assert_eq!(
        sda3.signature.as_ref().map(|s| (s.kind, s.uuid.as_deref())),
        Some((
            SignatureKind::Lvm2Member,
            Some("Xk3Tn7-pQ2w-Lm9V-b4Rc-8Hd1-Zf6Y-g5Js0A")
        ))
    );
    assert_eq!(sda3.holders, ["dm-0", "dm-1"]);
    assert!(sda3.holds_root && sda3.mount_points.is_empty());

    let root = disk(&inv, "dm-0");
    assert_eq!((root.class, root.transport), (DiskClass::Logical, Transport::Dm));
    assert_eq!(root.dm_name.as_deref(), Some("ubuntu--vg-ubuntu--lv"));
    assert_eq!(
        (root.members.as_slice(), root.mount_points.as_slice()),
        (&["sda3".to_string()][..], &["/".to_string()][..])
    );
    assert!(root.holds_root);
    let swap = disk(&inv, "dm-1");
    assert_eq!(
        (sig(swap.signature.as_ref()), swap.mount_points.as_slice()),
        ((Some(SignatureKind::Swap), None), &["[SWAP]".to_string()][..])
    );
    assert!(!swap.holds_root);

    let nvme = disk(&inv, "nvme0n1");
    assert_eq!((nvme.class, nvme.transport), (DiskClass::VirtualDisk, Transport::Nvme));
    assert_eq!(nvme.model.as_deref(), Some("VMware Virtual NVMe Disk"));
    assert_eq!(
        (sig(nvme.signature.as_ref()), nvme.mount_points.as_slice()),
        ((Some(SignatureKind::Xfs), Some("data")), &["/data".to_string()][..])
    );
    assert_eq!(
        inv.root_disks().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["dm-0", "sda"]
    );
    assert_eq!(inv.disk_summary(), "1×200G nvme-virt, 1×60G scsi-virt");

    let cni = inv.nic("cni0").unwrap();
    assert!(cni.is_virtual);
    assert_eq!((cni.kind.as_deref(), cni.mtu), (Some("bridge"), Some(1450)));
    assert_eq!(addrs(&inv, "cni0"), ["10.244.0.1/24"]);
    let ens = inv.nic("ens192").unwrap();
    assert_eq!(
        (ens.driver.as_deref(), ens.speed_mbps, ens.mac.as_deref()),
        (Some("vmxnet3"), Some(10000), Some("00:50:56:a1:b2:c3"))
    );
    assert_eq!(
        addrs(&inv, "ens192"),
        ["192.168.10.21/24", "fe80::250:56ff:fea1:b2c3/64"]
    );
    assert_eq!(ens.gateway_v4, Some(Ipv4Addr::new(192, 168, 10, 1)));
    assert_eq!(inv.os.package("containerd").unwrap().origin, "containerd.io");
}

#[test]
fn opennebula_kvm() {
    let inv = load("opennebula-kvm");
    let p = &inv.platform;
    assert_eq!(
        (p.kind, p.hypervisor.as_deref()),
        (PlatformKind::Opennebula, Some("kvm"))
    );
    assert_eq!(p.instance_id.as_deref(), Some("42"));
    assert_eq!(p.instance_type, None);
    for e in [
        "OpenNebula context file run/one-context/one_env",
        "ISO 9660 volume labelled CONTEXT on sr0",
    ] {
        assert!(p.evidence.contains(&e.to_string()), "{e} not in {:?}", p.evidence);
    }
    assert_eq!(serde_json::to_value(p.kind).unwrap(), "opennebula");

    assert_eq!(names(&inv), ["sr0", "vda", "vdb"]);
    let sr0 = disk(&inv, "sr0");
    assert_eq!(
        (sr0.class, sr0.transport, sr0.driver.as_deref()),
        (DiskClass::Removable, Transport::Sata, Some("ata_piix"))
    );
    assert_eq!(
        (sr0.vendor.as_deref(), sr0.model.as_deref(), sr0.removable),
        (Some("QEMU"), Some("QEMU DVD-ROM"), Some(true))
    );
    assert_eq!(
        sig(sr0.signature.as_ref()),
        (Some(SignatureKind::Iso9660), Some("CONTEXT"))
    );

    let vda = disk(&inv, "vda");
    assert_eq!(
        (vda.class, vda.transport, vda.driver.as_deref()),
        (DiskClass::VirtualDisk, Transport::Virtio, Some("virtio_blk"))
    );
    // The virtio device's numeric vendor id is not a vendor name.
    assert_eq!(vda.vendor, None);
    assert_eq!((vda.size_bytes, vda.dev.as_deref()), (Some(20 * GIB), Some("254:0")));
    assert!(vda.holds_root);
    assert_eq!(vda.partition("vda1").unwrap().mount_points, ["/"]);
    assert_eq!(vda.partition("vda15").unwrap().mount_points, ["/boot/efi"]);
    let vdb = disk(&inv, "vdb");
    assert_eq!(
        (sig(vdb.signature.as_ref()), vdb.mount_points.as_slice()),
        ((Some(SignatureKind::Swap), Some("swap")), &["[SWAP]".to_string()][..])
    );
    assert_eq!(inv.disk_summary(), "1×20G virtio-virt, 1×1G virtio-virt");

    let eth0 = inv.nic("eth0").unwrap();
    assert_eq!(
        (eth0.driver.as_deref(), eth0.mac.as_deref()),
        (Some("virtio_net"), Some("02:00:c0:a8:7a:2a"))
    );
    assert_eq!(
        (eth0.speed_mbps, eth0.mtu),
        (None, Some(1500)),
        "speed -1 means unknown"
    );
    assert_eq!(addrs(&inv, "eth0"), ["192.168.122.42/24", "fe80::c0ff:fea8:7a2a/64"]);
    assert_eq!(eth0.gateway_v4, Some(Ipv4Addr::new(192, 168, 122, 1)));
    assert_eq!(
        (inv.os.id.as_deref(), inv.os.version_id.as_deref()),
        (Some("debian"), Some("12"))
    );
}

#[test]
fn baremetal() {
    let inv = load("baremetal");
    let p = &inv.platform;
    assert_eq!(
        (p.kind, p.hypervisor.as_deref(), p.instance_type.as_deref()),
        (PlatformKind::Baremetal, None, None)
    );
    assert_eq!(p.evidence, [r#"dmi sys_vendor "Dell Inc."; no hypervisor marker"#]);
    assert_eq!(
        (p.dmi.product_name.as_deref(), p.dmi.product_serial.as_deref()),
        (Some("PowerEdge R430"), Some("7XJ3K42"))
    );
    let cpu = &inv.cpu;
    assert_eq!(
        (cpu.sockets, cpu.cores, cpu.threads, cpu.numa_nodes),
        (Some(2), Some(12), Some(12), Some(2))
    );
    assert_eq!(cpu.flags, ["aes", "avx", "avx2", "vmx"]);
    let gig = inv.memory.hugepages.iter().find(|h| h.size_bytes == GIB).unwrap();
    assert_eq!((gig.total, gig.free), (Some(16), Some(16)));

    // zram0 and the unused loop1 are skipped.
    assert_eq!(names(&inv), ["dm-0", "md0", "nvme0n1", "sda", "sdb"]);
    let sda = disk(&inv, "sda");
    assert_eq!(
        (sda.class, sda.transport, sda.driver.as_deref()),
        (DiskClass::Local, Transport::Sata, Some("ahci"))
    );
    assert_eq!(
        (sda.vendor.as_deref(), sda.model.as_deref()),
        (Some("ATA"), Some("INTEL SSDSC2KB480G8"))
    );
    assert_eq!(
        (sda.serial.as_deref(), sda.wwn.as_deref()),
        (Some("PHYF8123004H480BGN"), Some("naa.55cd2e4150a1b2c3"))
    );
    assert_eq!((sda.size_bytes, sda.rotational), (Some(937_703_088 * 512), Some(false)));
    assert!(sda.holds_root);
    assert_eq!(
        sda.partitions.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["sda1", "sda2", "sda3"]
    );
    assert_eq!(sda.partition("sda3").unwrap().holders, ["dm-0"]);

    let sdb = disk(&inv, "sdb");
    assert_eq!(
        (sdb.class, sdb.rotational, sdb.holds_root),
        (DiskClass::Local, Some(true), false)
    );
    let md = sdb.signature.as_ref().unwrap();
    assert_eq!(
        (md.kind, md.label.as_deref()),
        (SignatureKind::LinuxRaidMember, Some("db-node-07:0"))
    );
    assert_eq!(md.uuid.as_deref(), Some("9c8d7e6f-5a4b-4c3d-8e2f-1a0b9c8d7e6f"));
    assert_eq!(sdb.holders, ["md0"]);

    let md0 = disk(&inv, "md0");
    assert_eq!(
        (md0.class, md0.transport, md0.members.as_slice()),
        (DiskClass::Logical, Transport::Md, &["sdb".to_string()][..])
    );
    assert_eq!(
        (sig(md0.signature.as_ref()), md0.mount_points.as_slice()),
        (
            (Some(SignatureKind::Ext4), Some("backup")),
            &["/srv/backup".to_string()][..]
        )
    );
    let root = disk(&inv, "dm-0");
    assert_eq!(
        (root.dm_name.as_deref(), sig(root.signature.as_ref())),
        (Some("vg0-root"), (Some(SignatureKind::Xfs), Some("root")))
    );
    assert_eq!(root.mount_points, ["/"]);

    let nvme = disk(&inv, "nvme0n1");
    assert_eq!((nvme.class, nvme.transport), (DiskClass::Local, Transport::Nvme));
    // Native NVMe multipath: the namespace hangs off a virtual subsystem, so no driver link on its path.
    assert_eq!(nvme.driver, None);
    assert_eq!(
        (nvme.model.as_deref(), nvme.serial.as_deref()),
        (Some("INTEL SSDPE2KX020T8"), Some("PHLJ912300AB2P0BGN"))
    );
    assert_eq!(nvme.wwn.as_deref(), Some("eui.01000000000000005cd2e42a81a15a50"));
    assert_eq!(nvme.mount_points, ["/var/lib/postgresql"]);
    assert_eq!(
        inv.root_disks().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["dm-0", "sda"]
    );
    assert_eq!(
        inv.disk_summary(),
        "1×3.6T sata-local, 1×1.8T nvme-local, 1×447G sata-local"
    );

    assert_eq!(
        inv.nics.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["docker0", "eno1", "eno2"]
    );
    let eno1 = inv.nic("eno1").unwrap();
    assert_eq!(
        (eno1.driver.as_deref(), eno1.speed_mbps, eno1.operstate.as_deref()),
        (Some("igb"), Some(1000), Some("up"))
    );
    // The temporary (privacy) IPv6 address is left out.
    assert_eq!(
        addrs(&inv, "eno1"),
        ["10.20.30.7/24", "2001:db8:30::7/64", "fe80::1a66:daff:feaa:bb01/64"]
    );
    assert_eq!(eno1.gateway_v4, Some(Ipv4Addr::new(10, 20, 30, 1)));
    assert_eq!(eno1.gateway_v6, Some("fe80::1".parse::<Ipv6Addr>().unwrap()));
    let eno2 = inv.nic("eno2").unwrap();
    assert_eq!(
        (eno2.operstate.as_deref(), eno2.speed_mbps, eno2.is_virtual),
        (Some("down"), None, false)
    );
    assert!(eno2.addresses.is_empty() && !eno2.carries_default_route());
    let docker = inv.nic("docker0").unwrap();
    assert_eq!(
        (docker.is_virtual, docker.kind.as_deref(), docker.driver.as_deref()),
        (true, Some("bridge"), None)
    );
    assert_eq!(addrs(&inv, "docker0"), ["172.17.0.1/16"]);
}

#[test]
fn enums_serialize_as_documented_strings() {
    let v = |x: serde_json::Value| x.as_str().unwrap().to_string();
    assert_eq!(
        v(serde_json::to_value(PlatformKind::OtherVirtual).unwrap()),
        "other-virtual"
    );
    assert_eq!(
        v(serde_json::to_value(DiskClass::LocalInstanceStore).unwrap()),
        "local-instance-store"
    );
    assert_eq!(
        v(serde_json::to_value(DiskClass::NetworkVolume).unwrap()),
        "network-volume"
    );
    assert_eq!(v(serde_json::to_value(Transport::Nvme).unwrap()), "nvme");
    assert_eq!(
        v(serde_json::to_value(SignatureKind::LinuxRaidMember).unwrap()),
        "linux-raid-member"
    );
    assert_eq!(PlatformKind::OtherVirtual.to_string(), "other-virtual");
}
