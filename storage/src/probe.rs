//! Facts about a disk named by a plan: where its by-id path leads, what sysfs says about it, whether it or a
//! partition is mounted, used as swap, held by dm/md, or holds the root file system, and what signature it
//! carries. All of it is hostile input: nothing here panics on odd file contents.

use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use inventory::{Signature, SignatureKind};

use crate::error::StorageError;
use crate::host::Host;

/// A device number, `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DevNum {
    type Err = ();
    fn from_str(s: &str) -> Result<DevNum, ()> {
        let (a, b) = s.trim().split_once(':').ok_or(())?;
        Ok(DevNum {
            major: a.parse().map_err(|_| ())?,
            minor: b.parse().map_err(|_| ())?,
        })
    }
}

impl DevNum {
    /// The device number of a block-device node (`st_rdev`); `None` for anything else.
    pub fn of_node(path: &Path) -> Option<DevNum> {
        let meta = fs::metadata(path).ok()?;
        if !meta.file_type().is_block_device() {
            return None;
        }
        let rdev = meta.rdev();
        Some(DevNum {
            major: nix::sys::stat::major(rdev) as u32,
            minor: nix::sys::stat::minor(rdev) as u32,
        })
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub dev: DevNum,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// Parse mountinfo text (`\040`-style escapes decoded); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: l.get(2)?.parse().ok()?,
                mount_point: inventory::unescape_mount_field(l.get(4)?),
                fstype: inventory::unescape_mount_field(r.first()?),
                source: inventory::unescape_mount_field(r.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Read and parse a mountinfo file.
pub fn read_mountinfo(path: &Path) -> Result<Vec<MountEntry>, StorageError> {
    let text = fs::read_to_string(path).map_err(|e| StorageError::io("reading", path, e))?;
    Ok(parse_mountinfo(&text))
}

/// A partition of a disk, from sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFacts {
    /// Kernel name, e.g. `loop0p1`, `nvme1n1p1`.
    pub name: String,
    pub number: u32,
    pub dev: DevNum,
    /// Where its device node is (or should be): beside the disk's node.
    pub node: PathBuf,
    /// GPT partition name (`PARTNAME` in `uevent`).
    pub part_name: Option<String>,
    pub size_bytes: u64,
}

/// Everything the engine needs to know about one disk before touching it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    /// The plan's path.
    pub by_id: String,
    /// The device node it resolves to, e.g. `/dev/nvme1n1`.
    pub node: PathBuf,
    /// Kernel name.
    pub name: String,
    pub dev: DevNum,
    pub size_bytes: u64,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub model: Option<String>,
    /// What the whole disk carries at its start (or, for md, its end).
    pub signature: Option<Signature>,
    /// Why the signature could not be read (then `signature` is `None` and the disk must not be used).
    pub read_error: Option<String>,
    /// Partitions the kernel knows, by number.
    pub partitions: Vec<PartitionFacts>,
    /// Mounts of the disk or a partition: `(kernel name, mount point)`.
    pub mounts: Vec<(String, String)>,
    /// The disk or partitions that are active swap.
    pub swap: Vec<String>,
    /// Devices built on the disk or a partition (`holders/`, e.g. `dm-0`, `md127`).
    pub holders: Vec<String>,
    /// The root file system lives on it, a partition of it, or a dm/md device built on them.
    pub holds_root: bool,
}

impl DiskFacts {
    /// `serial S, WWN W` (whichever exist), or `no serial or WWN`.
    pub fn identity(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.serial {
            parts.push(format!("serial {s}"));
        }
        if let Some(w) = &self.wwn {
            parts.push(format!("WWN {w}"));
        }
        if parts.is_empty() {
            "no serial or WWN".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// The partition with number `n`.
    pub fn partition(&self, n: u32) -> Option<&PartitionFacts> {
        self.partitions.iter().find(|p| p.number == n)
    }

    /// The node of partition `n` as the kernel will name it: `nvme0n1` → `nvme0n1p1`, `sdb` → `sdb1`.
    pub fn partition_node(&self, n: u32) -> PathBuf {
        let sep = if self.name.ends_with(|c: char| c.is_ascii_digit()) {
            "p"
        } else {
            ""
        };
        self.node.with_file_name(format!("{}{sep}{n}", self.name))
    }
}

/// Describe a signature for messages: `an ext4 file system (label "data", UUID …)`.
pub fn describe_signature(sig: &Signature) -> String {
    let what = match sig.kind {
        SignatureKind::Gpt => "a GPT partition table",
        SignatureKind::Mbr => "an MBR (DOS) partition table",
        SignatureKind::Ext2 => "an ext2 file system",
        SignatureKind::Ext3 => "an ext3 file system",
        SignatureKind::Ext4 => "an ext4 file system",
        SignatureKind::Xfs => "an xfs file system",
        SignatureKind::Btrfs => "a btrfs file system",
        SignatureKind::Swap => "a swap area",
        SignatureKind::Lvm2Member => "an LVM2 physical volume",
        SignatureKind::LinuxRaidMember => "an md RAID member superblock",
        SignatureKind::CryptoLuks => "a LUKS encrypted volume",
        SignatureKind::Vfat => "a vfat file system",
        SignatureKind::Ntfs => "an NTFS file system",
        SignatureKind::Iso9660 => "an ISO 9660 file system",
        SignatureKind::Squashfs => "a squashfs image",
    };
    let mut extra = Vec::new();
    if let Some(l) = &sig.label {
        extra.push(format!("label {l:?}"));
    }
    if let Some(u) = &sig.uuid {
        extra.push(format!("UUID {u}"));
    }
    if extra.is_empty() {
        what.to_string()
    } else {
        format!("{what} ({})", extra.join(", "))
    }
}

/// Resolve `by_id` and gather its facts.
pub fn disk(host: &Host, by_id: &str) -> Result<DiskFacts, StorageError> {
    let missing = |reason: String| StorageError::DiskNotFound {
        by_id: by_id.to_string(),
        reason,
    };
    let node = fs::canonicalize(by_id).map_err(|e| missing(format!("cannot resolve the path: {e}")))?;
    let name = node
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| valid_kernel_name(n))
        .ok_or_else(|| missing(format!("it resolves to {}, which is not a device name", node.display())))?
        .to_string();
    let parent = node.parent().unwrap_or(Path::new("/"));
    let in_test_dir = host
        .dev_dir
        .as_ref()
        .and_then(|d| fs::canonicalize(d).ok())
        .is_some_and(|d| d == parent);
    if parent != Path::new("/dev") && !in_test_dir {
        return Err(missing(format!(
            "it resolves to {}, which is not a device directly under /dev",
            node.display()
        )));
    }
    let meta = fs::metadata(&node).map_err(|e| missing(format!("{}: {e}", node.display())))?;
    if !(meta.file_type().is_block_device() || (in_test_dir && meta.is_file())) {
        return Err(missing(format!("{} is not a block device", node.display())));
    }

    let sys = host.sys_dir.join("class/block").join(&name);
    if !sys.is_dir() {
        return Err(missing(format!("the kernel does not list {name} in {}", sys.display())));
    }
    if sys.join("partition").exists() {
        return Err(missing(format!(
            "{name} is a partition; storage plans name whole disks"
        )));
    }
    let dev: DevNum = read_attr(&sys.join("dev"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| missing(format!("{}/dev is missing or malformed", sys.display())))?;
    if let Some(real) = DevNum::of_node(&node)
        && real != dev
    {
        return Err(missing(format!(
            "{} is device {real} but the kernel's {name} is {dev}: a stale device node",
            node.display()
        )));
    }
    let size_bytes = read_attr(&sys.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| s.saturating_mul(512))
        .unwrap_or(0);
    let serial = read_attr(&sys.join("device/serial")).or_else(|| read_attr(&sys.join("serial")));
    let wwn = read_attr(&sys.join("wwid")).or_else(|| read_attr(&sys.join("device/wwid")));
    let model = read_attr(&sys.join("device/model"));

    let partitions = partitions_of(&sys, &node);
    let (signature, read_error) = match inventory::probe_signature(&node, Some(size_bytes).filter(|s| *s > 0)) {
        Ok(s) => (s, None),
        Err(e) => (None, Some(format!("cannot read {}: {e}", node.display()))),
    };

    let mut names: Vec<(String, DevNum)> = vec![(name.clone(), dev)];
    names.extend(partitions.iter().map(|p| (p.name.clone(), p.dev)));

    let mountinfo = read_mountinfo(&host.mountinfo)?;
    let mounts = mountinfo
        .iter()
        .filter_map(|m| {
            names
                .iter()
                .find(|(_, d)| *d == m.dev)
                .map(|(n, _)| (n.clone(), m.mount_point.clone()))
        })
        .collect();
    let swaps = fs::read_to_string(&host.swaps).unwrap_or_default();
    let swap = swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|f| {
            let leaf = Path::new(f).file_name()?.to_str()?.to_string();
            names.iter().any(|(n, _)| *n == leaf).then_some(leaf)
        })
        .collect();
    let mut holders = dir_names(&sys.join("holders"));
    for p in &partitions {
        holders.extend(dir_names(&sys.join(&p.name).join("holders")));
    }
    let root_devices = root_devices(&host.sys_dir, &mountinfo);
    let holds_root = names.iter().any(|(n, _)| root_devices.contains(n));

    Ok(DiskFacts {
        by_id: by_id.to_string(),
        node,
        name,
        dev,
        size_bytes,
        serial,
        wwn,
        model,
        signature,
        read_error,
        partitions,
        mounts,
        swap,
        holders,
        holds_root,
    })
}

/// Partitions of the disk whose sysfs directory is `sys` (children with a `partition` file), by number.
pub fn partitions_of(sys: &Path, disk_node: &Path) -> Vec<PartitionFacts> {
    let mut out: Vec<PartitionFacts> = dir_names(sys)
        .into_iter()
        .filter_map(|child| {
            let dir = sys.join(&child);
            let number = read_attr(&dir.join("partition"))?.parse().ok()?;
            let dev = read_attr(&dir.join("dev"))?.parse().ok()?;
            let uevent = fs::read_to_string(dir.join("uevent")).unwrap_or_default();
            let part_name = uevent
                .lines()
                .find_map(|l| l.strip_prefix("PARTNAME="))
                .map(str::to_string);
            let size_bytes = read_attr(&dir.join("size"))
                .and_then(|s| s.parse::<u64>().ok())
                .map(|s| s.saturating_mul(512))
                .unwrap_or(0);
            valid_kernel_name(&child).then(|| PartitionFacts {
                node: disk_node.with_file_name(&child),
                name: child,
                number,
                dev,
                part_name,
                size_bytes,
            })
        })
        .collect();
    out.sort_by_key(|p| p.number);
    out
}

/// Kernel names of the devices the root file system is built from: the root mount's device, its parent disk
/// when it is a partition, and (recursively) the `slaves/` of dm/md devices, with their parents.
pub fn root_devices(sys_dir: &Path, mountinfo: &[MountEntry]) -> Vec<String> {
    let Some(root) = mountinfo.iter().rev().find(|m| m.mount_point == "/") else {
        return Vec::new();
    };
    let Some(first) = name_of_dev(sys_dir, root.dev) else {
        return Vec::new();
    };
    let mut set = vec![first];
    let mut i = 0;
    while i < set.len() && set.len() < 256 {
        let n = set[i].clone();
        let dir = sys_dir.join("class/block").join(&n);
        let mut more = dir_names(&dir.join("slaves"));
        if dir.join("partition").exists()
            && let Some(parent) = fs::canonicalize(&dir).ok().and_then(|p| {
                p.parent()
                    .and_then(|q| q.file_name())
                    .and_then(|f| f.to_str())
                    .map(str::to_string)
            })
        {
            more.push(parent);
        }
        for m in more {
            if !set.contains(&m) {
                set.push(m);
            }
        }
        i += 1;
    }
    set
}

/// The kernel name of block device `dev` (by its `/sys/dev/block/M:m` link, else by scanning
/// `/sys/class/block/*/dev`).
pub fn name_of_dev(sys_dir: &Path, dev: DevNum) -> Option<String> {
    if let Ok(target) = fs::read_link(sys_dir.join("dev/block").join(dev.to_string()))
        && let Some(n) = target.file_name().and_then(|f| f.to_str())
    {
        return Some(n.to_string());
    }
    let class = sys_dir.join("class/block");
    dir_names(&class).into_iter().find(|n| {
        read_attr(&class.join(n).join("dev"))
            .and_then(|s| s.parse::<DevNum>().ok())
            .is_some_and(|d| d == dev)
    })
}

/// A sysfs attribute, trimmed; `None` when absent, unreadable, empty or oversized.
pub(crate) fn read_attr(path: &Path) -> Option<String> {
    let meta = fs::metadata(path).ok()?;
    if meta.len() > 64 * 1024 {
        return None;
    }
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Kernel block-device names: letters, digits and `-_.:`, not starting with `.`.
fn valid_kernel_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn mountinfo_parsing_decodes_escapes_and_skips_junk() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    garbage line\n\
                    99 27 259:3 / /mnt/my\\040disk rw shared:1 - xfs /dev/loop0p1 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mount_point, "/mnt/my disk");
        assert_eq!(m[1].dev, DevNum { major: 259, minor: 3 });
        assert_eq!((m[1].fstype.as_str(), m[1].source.as_str()), ("xfs", "/dev/loop0p1"));
    }

    /// A fake sysfs: `vda` (root on `vda1` through `dm-0`) and `vdb`.
    fn fake_sys(root: &Path) {
        let block = root.join("devices/block");
        for (disk, dev, parts) in [("vda", "254:0", vec![("vda1", "254:1")]), ("vdb", "254:16", vec![])] {
            fs::create_dir_all(block.join(disk).join("holders")).unwrap();
            fs::write(block.join(disk).join("dev"), format!("{dev}\n")).unwrap();
            fs::write(block.join(disk).join("size"), "2048\n").unwrap();
            for (p, pdev) in parts {
                let d = block.join(disk).join(p);
                fs::create_dir_all(d.join("holders")).unwrap();
                fs::write(d.join("dev"), pdev).unwrap();
                fs::write(d.join("partition"), "1").unwrap();
                fs::write(d.join("uevent"), "MAJOR=254\nPARTN=1\nPARTNAME=root\n").unwrap();
            }
        }
        let dm = block.join("dm-0");
        fs::create_dir_all(dm.join("slaves")).unwrap();
        fs::create_dir_all(dm.join("slaves/vda1")).unwrap();
        fs::write(dm.join("dev"), "253:0").unwrap();
        fs::create_dir_all(root.join("class/block")).unwrap();
        for (n, target) in [
            ("vda", "../../devices/block/vda"),
            ("vda1", "../../devices/block/vda/vda1"),
            ("vdb", "../../devices/block/vdb"),
            ("dm-0", "../../devices/block/dm-0"),
        ] {
            symlink(target, root.join("class/block").join(n)).unwrap();
        }
    }

    #[test]
    fn root_through_dm_on_a_partition() {
        let d = tempfile::tempdir().unwrap();
        fake_sys(d.path());
        let mi = parse_mountinfo("1 0 253:0 / / rw - xfs /dev/mapper/vg-root rw\n");
        let set = root_devices(d.path(), &mi);
        assert_eq!(set, ["dm-0", "vda1", "vda"]);
        assert!(!set.contains(&"vdb".to_string()));
        assert!(root_devices(d.path(), &parse_mountinfo("1 0 0:33 / / rw - overlay overlay rw\n")).is_empty());
    }

    fn host_for(d: &Path) -> Host {
        let mut h = Host::new(std::sync::Arc::new(crate::RecordingRunner::new()), d.join("state"));
        h.sys_dir = d.join("sys");
        h.dev_dir = Some(d.join("dev"));
        h.mountinfo = d.join("mountinfo");
        h.swaps = d.join("swaps");
        h
    }

    #[test]
    fn disk_facts_from_a_fake_tree() {
        let d = tempfile::tempdir().unwrap();
        fake_sys(&d.path().join("sys"));
        fs::create_dir_all(d.path().join("dev")).unwrap();
        fs::create_dir_all(d.path().join("by-id")).unwrap();
        for n in ["vda", "vda1", "vdb"] {
            fs::write(d.path().join("dev").join(n), vec![0u8; 4096]).unwrap();
        }
        symlink(d.path().join("dev/vda"), d.path().join("by-id/root-disk")).unwrap();
        symlink(d.path().join("dev/vdb"), d.path().join("by-id/data-disk")).unwrap();
        symlink(d.path().join("dev/vda1"), d.path().join("by-id/root-part")).unwrap();
        fs::write(
            d.path().join("mountinfo"),
            "1 0 253:0 / / rw - xfs /dev/mapper/vg-root rw\n",
        )
        .unwrap();
        fs::write(
            d.path().join("swaps"),
            "Filename Type Size Used Priority\n/dev/vdb partition 1 0 -2\n",
        )
        .unwrap();
        let h = host_for(d.path());

        let root = disk(&h, d.path().join("by-id/root-disk").to_str().unwrap()).unwrap();
        assert!(root.holds_root);
        assert_eq!(root.partitions.len(), 1);
        assert_eq!(root.partitions[0].part_name.as_deref(), Some("root"));
        assert_eq!(root.size_bytes, 2048 * 512);
        assert_eq!(root.identity(), "no serial or WWN");

        let data = disk(&h, d.path().join("by-id/data-disk").to_str().unwrap()).unwrap();
        assert!(!data.holds_root);
        assert_eq!(data.swap, ["vdb"]);
        assert_eq!(data.signature, None);
        assert_eq!(data.partition_node(1), d.path().join("dev/vdb1"));

        let err = disk(&h, d.path().join("by-id/root-part").to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("is a partition"), "{err}");
        let err = disk(&h, "/etc/hostname").unwrap_err();
        assert!(err.to_string().contains("not a device directly under /dev"), "{err}");
        let err = disk(&h, "/nonexistent/by-id/x").unwrap_err();
        assert!(matches!(err, StorageError::DiskNotFound { .. }));
    }

    #[test]
    fn partition_node_names() {
        let mut f = DiskFacts {
            by_id: String::new(),
            node: PathBuf::from("/dev/nvme0n1"),
            name: "nvme0n1".into(),
            dev: DevNum { major: 259, minor: 0 },
            size_bytes: 0,
            serial: Some("S1".into()),
            wwn: Some("eui.1".into()),
            model: None,
            signature: None,
            read_error: None,
            partitions: vec![],
            mounts: vec![],
            swap: vec![],
            holders: vec![],
            holds_root: false,
        };
        assert_eq!(f.partition_node(1), PathBuf::from("/dev/nvme0n1p1"));
        assert_eq!(f.identity(), "serial S1, WWN eui.1");
        f.node = PathBuf::from("/dev/sdb");
        f.name = "sdb".into();
        assert_eq!(f.partition_node(1), PathBuf::from("/dev/sdb1"));
    }
}
