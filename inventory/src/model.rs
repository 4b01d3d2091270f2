//! The inventory data model: what one host is.
//!
//! Every type is `serde`-serializable (JSON field names are the Rust names, enums are lowercase or kebab-case
//! strings) and implements `PartialEq`, so a caller can compare two collections. Values the collector could not
//! read are `None` (or empty lists), never a guess.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Everything [`crate::collect`] learns about one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Kernel host name (`proc/sys/kernel/hostname`, falling back to `etc/hostname`).
    pub hostname: Option<String>,
    pub cpu: Cpu,
    pub memory: Memory,
    /// Block devices, sorted by kernel name. Skipped: `ram*`, `zram*`, `fd*` and every device of size 0
    /// (unused loop/nbd devices, empty optical drives).
    pub disks: Vec<Disk>,
    /// Network interfaces except `lo`, sorted by name. By default container plumbing is skipped
    /// (see [`crate::CollectOptions::skip_nic_prefixes`]).
    pub nics: Vec<Nic>,
    pub platform: Platform,
    pub os: OsInfo,
}

/// Processor facts from `proc/cpuinfo` and `sys/devices/system/{cpu,node}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    /// `vendor_id` on x86 (`GenuineIntel`, `AuthenticAMD`); on Arm the implementer name (`ARM`, `Ampere`, ...).
    pub vendor: Option<String>,
    /// `model name` on x86. Arm kernels do not report one, so this is `None` there.
    pub model: Option<String>,
    /// Distinct `physical_package_id` values over the online CPUs.
    pub sockets: Option<u32>,
    /// Distinct (package, die, core) triples over the online CPUs.
    pub cores: Option<u32>,
    /// Online logical CPUs (`sys/devices/system/cpu/online`).
    pub threads: Option<u32>,
    /// Online NUMA nodes (`sys/devices/system/node/online`).
    pub numa_nodes: Option<u32>,
    /// The flags that matter for placement, those of [`crate::TRACKED_CPU_FLAGS`] the CPU has, in that order.
    pub flags: Vec<String>,
}

impl Cpu {
    /// Whether the CPU reports `flag` (one of [`crate::TRACKED_CPU_FLAGS`]).
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Memory facts from `proc/meminfo` and `sys/kernel/mm/hugepages`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// `MemTotal`, in bytes.
    pub total_bytes: Option<u64>,
    /// `SwapTotal`, in bytes.
    pub swap_total_bytes: Option<u64>,
    /// `Hugepagesize`: the default huge page size, in bytes.
    pub hugepage_default_size_bytes: Option<u64>,
    /// One entry per huge page size the kernel supports, smallest first.
    pub hugepages: Vec<HugePages>,
}

/// The huge page pool of one page size.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePages {
    pub size_bytes: u64,
    /// `nr_hugepages`: pages reserved in the pool.
    pub total: Option<u64>,
    /// `free_hugepages`. Volatile: ignored by [`Inventory::fingerprint`].
    pub free: Option<u64>,
}

/// How a block device reaches the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Nvme,
    /// libata: SATA, and PATA/IDE emulation too (e.g. a QEMU IDE CD-ROM).
    Sata,
    Sas,
    /// Any other SCSI host (Hyper-V storvsc, VMware PVSCSI, LSI parallel SCSI, ...).
    Scsi,
    /// virtio-blk and virtio-scsi.
    Virtio,
    /// Xen blkfront (`xvd*`).
    Xen,
    Usb,
    Mmc,
    Iscsi,
    Nbd,
    Rbd,
    Loop,
    /// Device-mapper (LVM logical volumes, dm-crypt, multipath).
    Dm,
    /// Linux software RAID.
    Md,
    #[default]
    Unknown,
}

/// What kind of storage a block device is, for placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskClass {
    /// Ephemeral storage local to the cloud host: AWS instance store, Azure NVMe direct disks and the Azure
    /// resource (temporary) disk, GCP local SSD. Fast, and lost when the instance stops.
    LocalInstanceStore,
    /// Storage reached over the network: AWS EBS, Azure managed disks, GCP persistent disks, iSCSI, nbd, rbd.
    NetworkVolume,
    /// A physical disk of this machine (bare metal).
    Local,
    /// A disk emulated by a hypervisor whose backing store this guest cannot see (VMware, KVM/OpenNebula,
    /// non-AWS Xen).
    VirtualDisk,
    /// A device built from other devices or files: loop, device-mapper, md RAID.
    Logical,
    /// Removable media: optical drives, USB sticks.
    Removable,
    #[default]
    Unknown,
}

/// What a device's first bytes say it holds (a partition table, a file system or a volume-manager member).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureKind {
    Gpt,
    /// DOS/MBR partition table.
    Mbr,
    Ext2,
    Ext3,
    Ext4,
    Xfs,
    Btrfs,
    Swap,
    /// LVM2 physical volume.
    Lvm2Member,
    /// md RAID member (superblock v0.90, v1.0, v1.1 or v1.2).
    LinuxRaidMember,
    CryptoLuks,
    Vfat,
    Ntfs,
    Iso9660,
    Squashfs,
}

/// A recognised signature, with the label and UUID where the format has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub kind: SignatureKind,
    pub label: Option<String>,
    /// File system / PV / array UUID in the usual text form (vfat: `XXXX-XXXX`).
    pub uuid: Option<String>,
}

/// One block device from `sys/block`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name, e.g. `nvme0n1`, `sda`, `dm-0`.
    pub name: String,
    /// `major:minor`.
    pub dev: Option<String>,
    /// `size` × 512.
    pub size_bytes: Option<u64>,
    /// `device/vendor` (SCSI/ATA; e.g. `ATA`, `Msft`, `VMware`).
    pub vendor: Option<String>,
    /// `device/model` (trimmed), e.g. `Amazon EC2 NVMe Instance Storage`.
    pub model: Option<String>,
    /// `device/serial` (NVMe, some SCSI), `serial` (virtio-blk) or SCSI VPD page 0x80.
    pub serial: Option<String>,
    /// World-wide identifier as the kernel prints it: `wwid` (NVMe, e.g. `eui.…`/`nvme.…`) or `device/wwid`
    /// (SCSI/ATA, e.g. `naa.…`, `t10.…`).
    pub wwn: Option<String>,
    /// `queue/rotational`.
    pub rotational: Option<bool>,
    pub removable: Option<bool>,
    pub read_only: Option<bool>,
    pub transport: Transport,
    /// Nearest driver on the device path (`nvme`, `ahci`, `virtio_blk`, `hv_storvsc`, `vmw_pvscsi`, `vbd`, ...).
    pub driver: Option<String>,
    pub class: DiskClass,
    /// Why the class was chosen, e.g. `model "Amazon Elastic Block Store"`.
    pub class_evidence: String,
    /// What the whole device holds (partition table, file system, LVM/md member).
    pub signature: Option<Signature>,
    pub partitions: Vec<Partition>,
    /// Where the whole device is mounted (`[SWAP]` for active swap), sorted.
    pub mount_points: Vec<String>,
    /// Whether the root file system lives on this device, one of its partitions, or a dm/md device built on them.
    pub holds_root: bool,
    /// For dm/md: the devices it is built from (`slaves/`).
    pub members: Vec<String>,
    /// Devices built on this one (`holders/`, e.g. `dm-0` on an LVM PV).
    pub holders: Vec<String>,
    /// Device-mapper name (`dm/name`), e.g. `vg0-root`.
    pub dm_name: Option<String>,
    /// Loop devices: the backing file (`loop/backing_file`).
    pub backing_file: Option<String>,
    /// Stable names: the `/dev/disk/by-id/` links (made by udev) that point at this device, sorted; the first
    /// is the one storage plans use (see [`Disk::stable_path`]).
    #[serde(default)]
    pub by_id: Vec<String>,
}

impl Disk {
    /// The stable path of this disk: a `/dev/disk/by-id/` link that names its serial or WWN when there is one
    /// (`nvme-<model>_<serial>`, `ata-…`, `scsi-…`, `wwn-…`), else the first link; `None` without links.
    pub fn stable_path(&self) -> Option<&str> {
        let names_identity = |p: &&String| {
            let leaf = p.rsplit('/').next().unwrap_or("");
            self.serial
                .as_deref()
                .is_some_and(|s| !s.is_empty() && leaf.contains(&s.replace(' ', "_")))
                || leaf.starts_with("wwn-")
        };
        self.by_id
            .iter()
            .find(names_identity)
            .or_else(|| self.by_id.first())
            .map(String::as_str)
    }

    /// The partition that holds the root file system, if any.
    pub fn root_partition(&self) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.holds_root)
    }

    /// The partition called `name`.
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }
}

/// A partition: a child of a disk in sysfs that has a `partition` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub name: String,
    /// Partition number (`partition`).
    pub number: Option<u32>,
    pub dev: Option<String>,
    /// Offset from the start of the disk (`start` × 512).
    pub start_bytes: Option<u64>,
    pub size_bytes: Option<u64>,
    pub signature: Option<Signature>,
    pub mount_points: Vec<String>,
    pub holds_root: bool,
    pub holders: Vec<String>,
}

/// One network interface from `sys/class/net`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    /// `address`, lowercase `aa:bb:cc:dd:ee:ff`.
    pub mac: Option<String>,
    /// `device/driver` link name (`ena`, `hv_netvsc`, `vmxnet3`, `virtio_net`, `igb`, ...). `None` when virtual.
    pub driver: Option<String>,
    /// True when the interface has no `device` link (bridge, bond, veth, tun, vlan, ...).
    #[serde(rename = "virtual")]
    pub is_virtual: bool,
    /// `DEVTYPE` from `uevent` (`bridge`, `vlan`, `bond`, `wlan`, `wireguard`, ...), if the kernel names one.
    pub kind: Option<String>,
    /// Link speed in Mbit/s. `None` when down, unknown (-1) or not reported (many virtual NICs).
    pub speed_mbps: Option<u32>,
    pub mtu: Option<u32>,
    /// `operstate`: `up`, `down`, `unknown`, `dormant`, `lowerlayerdown`, ...
    pub operstate: Option<String>,
    /// IPv4 and IPv6 addresses with prefix length, sorted (IPv4 first). IPv6 temporary (privacy) addresses are
    /// left out: they rotate by design.
    pub addresses: Vec<IpNet>,
    /// This interface carries the IPv4 default route (`proc/net/route`).
    pub default_route_v4: bool,
    /// This interface carries the IPv6 default route (`proc/net/ipv6_route`).
    pub default_route_v6: bool,
    /// IPv4 default gateway through this interface (`None` for an on-link default route).
    pub gateway_v4: Option<Ipv4Addr>,
    pub gateway_v6: Option<Ipv6Addr>,
}

impl Nic {
    /// Whether `ip` is one of this interface's addresses.
    pub fn has_address(&self, ip: std::net::IpAddr) -> bool {
        self.addresses.iter().any(|n| n.addr() == ip)
    }

    /// Whether this interface carries a default route (IPv4 or IPv6).
    pub fn carries_default_route(&self) -> bool {
        self.default_route_v4 || self.default_route_v6
    }
}

/// Where the host runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlatformKind {
    Aws,
    Azure,
    Opennebula,
    Vmware,
    #[default]
    Baremetal,
    /// A virtual machine on another hypervisor: see [`Platform::hypervisor`].
    OtherVirtual,
}

impl PlatformKind {
    /// The serialized name (`aws`, `other-virtual`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformKind::Aws => "aws",
            PlatformKind::Azure => "azure",
            PlatformKind::Opennebula => "opennebula",
            PlatformKind::Vmware => "vmware",
            PlatformKind::Baremetal => "baremetal",
            PlatformKind::OtherVirtual => "other-virtual",
        }
    }
}

impl std::fmt::Display for PlatformKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Platform detection result, with the evidence that decided it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub kind: PlatformKind,
    /// `nitro`, `xen`, `kvm`, `hyperv`, `vmware`, `qemu`, `virtualbox`, `bhyve`, `parallels`, ... `None` on bare
    /// metal (including AWS `*.metal`) or when no marker names it.
    pub hypervisor: Option<String>,
    /// Cloud instance type: from DMI `product_name` on AWS Nitro (e.g. `i3en.2xlarge`), else from the metadata
    /// service ([`crate::enrich`]).
    pub instance_type: Option<String>,
    /// AWS instance id (DMI `board_asset_tag` on Nitro, or IMDS), Azure `vmId` (IMDS), OpenNebula `VMID`.
    pub instance_id: Option<String>,
    /// Cloud region / location (metadata service only).
    pub region: Option<String>,
    /// Availability zone (metadata service only).
    pub zone: Option<String>,
    /// Human-readable reasons, strongest first, e.g. `dmi sys_vendor "Amazon EC2"`.
    pub evidence: Vec<String>,
    /// Set by [`crate::enrich`] on success: `aws-imdsv2` or `azure-imds`.
    pub metadata_source: Option<String>,
    pub dmi: Dmi,
}

/// The DMI (SMBIOS) strings from `sys/class/dmi/id`. `product_serial` and `product_uuid` are readable by root
/// only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dmi {
    pub sys_vendor: Option<String>,
    pub product_name: Option<String>,
    pub product_version: Option<String>,
    pub product_serial: Option<String>,
    pub product_uuid: Option<String>,
    pub board_vendor: Option<String>,
    pub board_name: Option<String>,
    pub board_asset_tag: Option<String>,
    pub bios_vendor: Option<String>,
    pub bios_version: Option<String>,
    pub chassis_vendor: Option<String>,
    pub chassis_asset_tag: Option<String>,
}

/// Operating system facts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsInfo {
    /// `ID` from `etc/os-release` (falling back to `usr/lib/os-release`), e.g. `ubuntu`.
    pub id: Option<String>,
    /// `VERSION_ID`, e.g. `22.04`.
    pub version_id: Option<String>,
    /// `PRETTY_NAME`, e.g. `Ubuntu 22.04.4 LTS`.
    pub pretty_name: Option<String>,
    /// `proc/sys/kernel/osrelease`.
    pub kernel: Option<String>,
    /// `proc/sys/kernel/arch` where the kernel has it; otherwise this build's architecture when root is `/`.
    pub arch: Option<String>,
    /// `btime` from `proc/stat`, seconds since the Unix epoch. Volatile: ignored by [`Inventory::fingerprint`].
    pub boot_time: Option<u64>,
    /// Installed packages of [`crate::TRACKED_PACKAGES`], sorted by name; absent means not installed.
    pub packages: Vec<Package>,
}

impl OsInfo {
    /// The tracked package `name` (`kubelet`, `kubeadm`, `containerd`), if installed.
    pub fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.name == name)
    }
}

/// Where a package fact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageSource {
    /// `var/lib/dpkg/status`.
    Dpkg,
    /// An executable in `usr/bin`, `usr/local/bin` or `opt/bin` (version only via [`crate::probe_versions`]).
    Binary,
}

/// An installed Kubernetes node component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Canonical name: `kubelet`, `kubeadm` or `containerd` (the `containerd.io` package of Docker's
    /// repository and AKS's `moby-containerd` are reported as `containerd`).
    pub name: String,
    /// Package version (`1.30.2-1.1`) or the version the binary printed (`v1.30.2`).
    pub version: Option<String>,
    pub source: PackageSource,
    /// The package name as installed, or the binary's path relative to root.
    pub origin: String,
}
