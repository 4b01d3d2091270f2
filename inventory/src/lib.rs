//! Hardware, platform and OS inventory of one host, read from `/proc`, `/sys`, `/etc`, `/run` and `/var` under
//! a root path (production passes `/`; tests pass fixture trees), plus optional cloud-metadata enrichment.
//!
//! ```no_run
//! use std::path::Path;
//! let mut warned = inventory::WarnOnce::new();
//! let collected = inventory::collect(Path::new("/"));
//! warned.log(&collected.unreadable); // each unreadable field is logged once per process
//! let inv = collected.inventory;
//! println!("{} {} {}", inv.platform.kind, inv.platform.instance_type.as_deref().unwrap_or("-"), inv.disk_summary());
//! // Later: resend only if `inv.fingerprint()` differs from the last one sent; `changed_fields` says what.
//! ```
//!
//! [`collect`] does no network I/O and never fails: anything it cannot read is `None` (or an empty list) in
//! the [`Inventory`] and an entry in [`Collected::unreadable`]. It is synchronous and takes a few
//! milliseconds; call it from `tokio::task::spawn_blocking` in async code. [`enrich`] (async, bounded by a
//! timeout) adds instance type, region and zone from the AWS or Azure metadata service;
//! [`probe_versions`] (async) runs component binaries for their versions when no package database knows them.
//!
//! # Layout
//!
//! - `model` — the serde data model: [`Inventory`], [`Cpu`], [`Memory`], [`Disk`], [`Partition`], [`Nic`],
//!   [`Platform`], [`OsInfo`] and their enums (serialized as lowercase / kebab-case strings).
//! - `reader` — bounded reads under the root; the missing-vs-unreadable rule and [`Unreadable`].
//! - `cpu`, `memory` — `proc/cpuinfo`, `sys/devices/system/{cpu,node}`, `proc/meminfo`,
//!   `sys/kernel/mm/hugepages`.
//! - `disk` — `sys/block`: identity, transport, partitions, mounts, root disk, classification
//!   (local instance store / network volume / …); `signature` — magic-number probe of `dev/<name>`;
//!   `mounts` — `proc/self/mountinfo`, `proc/swaps`.
//! - `net` — `sys/class/net`, addresses and default routes from `proc/net` (or `getifaddrs` on `/`).
//! - `platform` — DMI, `sys/hypervisor`, OpenNebula context, CPUID → aws / azure / opennebula / vmware /
//!   baremetal / other-virtual, with evidence.
//! - `os` — os-release, kernel, boot time, kubelet / kubeadm / containerd from dpkg or binaries;
//!   `versions` — [`probe_versions`].
//! - `change` — [`Inventory::stable`], [`Inventory::fingerprint`], [`changed_fields`], [`WarnOnce`].
//! - `summary` — [`disk_summary`] (`2×1.7T nvme-local`) and lookup helpers on [`Inventory`].
//! - `metadata` — [`enrich`]: AWS IMDSv2 and Azure IMDS over hyper's HTTP/1.1 client.
//!
//! Invariants: nothing here panics on file or network content; [`collect`] does no network I/O and starts no
//! process; nothing is read outside the given root (except `getifaddrs` and CPUID, and only when the root is
//! `/`); every file read is size-bounded.

mod change;
mod cpu;
mod disk;
mod memory;
mod metadata;
mod model;
mod mounts;
mod net;
mod os;
mod platform;
mod reader;
mod signature;
mod summary;
mod versions;

use std::path::Path;

pub use change::{VOLATILE_MOUNT_PREFIXES, WarnOnce, changed_fields};
pub use cpu::TRACKED_CPU_FLAGS;
pub use metadata::{
    AZURE_API_VERSION, DEFAULT_METADATA_ENDPOINT, DEFAULT_METADATA_TIMEOUT, MAX_METADATA_RESPONSE, MetadataConfig,
    MetadataError, enrich,
};
pub use model::{
    Cpu, Disk, DiskClass, Dmi, HugePages, Inventory, Memory, Nic, OsInfo, Package, PackageSource, Partition, Platform,
    PlatformKind, Signature, SignatureKind, Transport,
};
pub use os::TRACKED_PACKAGES;
pub use platform::AZURE_CHASSIS_ASSET_TAG;
pub use reader::Unreadable;
pub use summary::{disk_summary, human_size};
pub use versions::probe_versions;

/// A field of `/proc/*/mountinfo` or `/proc/swaps` with the kernel's octal escapes undone (`\040` → space).
pub use mounts::unescape as unescape_mount_field;

/// What a block device (or an image file) holds at its start (and, for md members, near its end): partition
/// table, file system, LVM or md member, LUKS — see the `signature` module's table. `Ok(None)`: readable, nothing
/// recognised. Used by the agent's storage setup to refuse disks that carry data.
pub fn probe_signature(path: &std::path::Path, size_bytes: Option<u64>) -> std::io::Result<Option<Signature>> {
    signature::probe(path, size_bytes)
}

/// Interface-name prefixes skipped by default: per-pod container plumbing that comes and goes with workloads
/// (veth pairs; Calico `cali*`, Cilium `lxc*`, Azure CNI `azv*`, GKE `gke*`) and `kube-ipvs0`, whose addresses
/// are every Service IP of the cluster.
/// Version of the serialized [`Inventory`] document carried in `nimbus.v1.Inventory.document`. Bump it when a
/// change to the model would make an older reader misread a newer document (adding optional fields does not).
pub const DOCUMENT_SCHEMA: u32 = 1;

pub const DEFAULT_SKIP_NIC_PREFIXES: &[&str] = &["veth", "cali", "lxc", "azv", "gke", "kube-ipvs"];

/// Collection options. `CollectOptions::default()` is what [`collect`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectOptions {
    /// Interfaces whose name starts with one of these are not reported. Default [`DEFAULT_SKIP_NIC_PREFIXES`];
    /// empty to report every interface but `lo`.
    pub skip_nic_prefixes: Vec<String>,
}

impl Default for CollectOptions {
    fn default() -> Self {
        CollectOptions {
            skip_nic_prefixes: DEFAULT_SKIP_NIC_PREFIXES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The result of [`collect`]: the inventory and the fields that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    pub inventory: Inventory,
    /// Fields left unknown because their file was unreadable or malformed (absent optional files are not
    /// listed). Log them once with [`WarnOnce`].
    pub unreadable: Vec<Unreadable>,
}

/// Collect the inventory of the system under `root` with default options. No network access; never fails.
pub fn collect(root: &Path) -> Collected {
    collect_with(root, &CollectOptions::default())
}

/// Collect the inventory of the system under `root`.
pub fn collect_with(root: &Path, opts: &CollectOptions) -> Collected {
    let mut ctx = reader::Ctx::new(root);
    let hostname = os::hostname(&mut ctx);
    let cpuinfo = cpu::read_cpuinfo(&mut ctx);
    let cpu = cpu::collect(&mut ctx, cpuinfo.as_ref());
    let memory = memory::collect(&mut ctx);
    let mounts = mounts::read_mountinfo(&mut ctx);
    let swaps = mounts::read_swaps(&mut ctx);
    let (mut disks, extras) = disk::collect(&mut ctx, &mounts, &swaps);
    let dmi = platform::read_dmi(&mut ctx);
    let signals = platform::gather(&mut ctx, dmi, cpuinfo.as_ref(), &disks);
    let platform = platform::decide(signals);
    disk::classify(&mut disks, &extras, platform.kind);
    let nics = net::collect(&mut ctx, &opts.skip_nic_prefixes);
    let os = os::collect(&mut ctx);
    Collected {
        inventory: Inventory {
            hostname,
            cpu,
            memory,
            disks,
            nics,
            platform,
            os,
        },
        unreadable: ctx.unreadable,
    }
}
