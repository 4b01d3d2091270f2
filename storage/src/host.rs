//! [`Host`]: everything the engine touches on this machine, injectable for tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::runner::{DEFAULT_COMMAND_TIMEOUT, Runner, SystemRunner};

/// Default directory for mount units.
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";

/// Default timeout for `mkfs.*` (large disks; ext4 discards the whole device first).
pub const DEFAULT_MKFS_TIMEOUT: Duration = Duration::from_secs(900);

/// The machine the plan is applied to.
pub struct Host {
    /// Runs every program (see [`crate::runner`]).
    pub runner: Arc<dyn Runner>,
    /// Where `.mount` units are written. Default [`DEFAULT_UNIT_DIR`].
    pub unit_dir: PathBuf,
    /// The agent's state directory: `storage-state.json` (our record of what we created) lives here.
    pub state_dir: PathBuf,
    /// Whether systemd is PID 1 (`/run/systemd/system` exists): mount through `systemctl enable --now`, else
    /// with `mount(8)` directly.
    pub systemd: bool,
    /// Default `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// Active swap areas. Default `/proc/swaps`.
    pub swaps: PathBuf,
    /// sysfs. Default `/sys`.
    pub sys_dir: PathBuf,
    /// Tests: a directory whose entries count as device nodes (regular files allowed) besides `/dev`.
    pub dev_dir: Option<PathBuf>,
    /// Whether the kernel has device-mapper (LVM) and md (RAID0).
    pub kernel: KernelSupport,
    /// Timeout of every command but `mkfs`. Default 60 s.
    pub command_timeout: Duration,
    /// Timeout of `mkfs.*`. Default 15 min.
    pub mkfs_timeout: Duration,
    /// Where new GPT / partition / file-system / PV / array UUIDs come from.
    pub ids: Ids,
}

impl Host {
    /// This machine with the real runner: `/etc/systemd/system`, `/proc`, `/sys`, systemd and kernel support
    /// detected, state in `state_dir`.
    pub fn system(state_dir: impl Into<PathBuf>) -> Host {
        Host::new(Arc::new(SystemRunner), state_dir)
    }

    /// As [`Host::system`] with another runner.
    pub fn new(runner: Arc<dyn Runner>, state_dir: impl Into<PathBuf>) -> Host {
        Host {
            runner,
            unit_dir: PathBuf::from(DEFAULT_UNIT_DIR),
            state_dir: state_dir.into(),
            systemd: Path::new("/run/systemd/system").is_dir(),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            swaps: PathBuf::from("/proc/swaps"),
            sys_dir: PathBuf::from("/sys"),
            dev_dir: None,
            kernel: KernelSupport::detect(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            mkfs_timeout: DEFAULT_MKFS_TIMEOUT,
            ids: Ids::random(),
        }
    }
}

/// Kernel features the LVM and RAID0 layouts need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSupport {
    /// `/sys/module/dm_mod` exists or `/proc/misc` lists `device-mapper`.
    pub device_mapper: bool,
    /// `/proc/mdstat` exists.
    pub md: bool,
}

impl KernelSupport {
    /// This machine's kernel.
    pub fn detect() -> KernelSupport {
        KernelSupport::detect_at(Path::new("/sys"), Path::new("/proc"))
    }

    /// The kernel described by `sys` and `proc` trees.
    pub fn detect_at(sys: &Path, proc_dir: &Path) -> KernelSupport {
        let misc = std::fs::read_to_string(proc_dir.join("misc")).unwrap_or_default();
        KernelSupport {
            device_mapper: sys.join("module/dm_mod").exists()
                || misc
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some("device-mapper")),
            md: proc_dir.join("mdstat").exists(),
        }
    }
}

/// Source of new UUIDs (version 4 layout).
#[derive(Debug)]
pub struct Ids {
    counter: Option<AtomicU64>,
}

impl Ids {
    /// Random UUIDs (production).
    pub fn random() -> Ids {
        Ids { counter: None }
    }

    /// `00000000-0000-4000-8000-000000000001`, `…002`, … (tests that assert exact commands).
    pub fn sequential() -> Ids {
        Ids {
            counter: Some(AtomicU64::new(0)),
        }
    }

    /// A new UUID, lowercase `8-4-4-4-12`.
    pub fn uuid(&self) -> String {
        let mut b: [u8; 16] = match &self.counter {
            None => rand::random(),
            Some(c) => {
                let n = c.fetch_add(1, Ordering::Relaxed) + 1;
                let mut b = [0u8; 16];
                b[8..].copy_from_slice(&n.to_be_bytes());
                b
            }
        };
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// The 32 hex digits of a UUID in any of the usual spellings (dashes, colons, case), for comparisons.
pub(crate) fn uuid_hex(u: &str) -> String {
    u.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// `xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx`, as `mdadm --uuid` prints and takes it.
pub(crate) fn md_uuid(u: &str) -> String {
    let h = uuid_hex(u);
    (0..4)
        .filter_map(|i| h.get(i * 8..i * 8 + 8))
        .collect::<Vec<_>>()
        .join(":")
}

/// `xxxxxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxxxx`, the LVM PV UUID form (`pvcreate --uuid`).
pub(crate) fn lvm_uuid(u: &str) -> String {
    let h = uuid_hex(u);
    let mut out = Vec::new();
    let mut at = 0;
    for g in [6usize, 4, 4, 4, 4, 4, 6] {
        out.push(h.get(at..at + g).unwrap_or_default());
        at += g;
    }
    out.join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_and_their_forms() {
        let ids = Ids::sequential();
        assert_eq!(ids.uuid(), "00000000-0000-4000-8000-000000000001");
        assert_eq!(ids.uuid(), "00000000-0000-4000-8000-000000000002");
        let r = Ids::random().uuid();
        assert_eq!(r.len(), 36);
        assert_ne!(r, Ids::random().uuid());
        assert_eq!(
            md_uuid("0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"),
            "0a1b2c3d:4e5f4a6b:8c7d8e9f:a0b1c2d3"
        );
        assert_eq!(
            lvm_uuid("0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"),
            "0a1b2c-3d4e-5f4a-6b8c-7d8e-9fa0-b1c2d3"
        );
        assert_eq!(uuid_hex("0A1B2C-3D4E"), "0a1b2c3d4e");
    }

    #[test]
    fn kernel_support_from_trees() {
        let d = tempfile::tempdir().unwrap();
        let (sys, proc_dir) = (d.path().join("sys"), d.path().join("proc"));
        std::fs::create_dir_all(&sys).unwrap();
        std::fs::create_dir_all(&proc_dir).unwrap();
        std::fs::write(proc_dir.join("misc"), "237 loop-control\n").unwrap();
        assert_eq!(
            KernelSupport::detect_at(&sys, &proc_dir),
            KernelSupport {
                device_mapper: false,
                md: false
            }
        );
        std::fs::write(proc_dir.join("misc"), "237 loop-control\n236 device-mapper\n").unwrap();
        std::fs::write(proc_dir.join("mdstat"), "Personalities :\n").unwrap();
        assert_eq!(
            KernelSupport::detect_at(&sys, &proc_dir),
            KernelSupport {
                device_mapper: true,
                md: true
            }
        );
    }
}
