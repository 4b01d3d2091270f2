//! [`apply`]: make the host match a [`StoragePlan`], idempotently and without destroying data it was not told
//! to destroy.
//!
//! Per volume (and, for `PerDisk`, per disk), each step looks at the current state first and does only what is
//! missing, so a second apply runs no mutating command and an apply after a failure at any step converges:
//!
//! 1. **Safety** — a disk that holds the root file system is refused; so is one that is mounted, active swap,
//!    held by dm/md, or carries any signature (partition table, file system, LVM, md, LUKS), unless the
//!    signature is our own recorded work for this volume (continue), or the volume's `wipe` list names the disk's
//!    serial, WWN or exact `by_id` path (then `wipefs -a` its partitions and the disk first). A refused disk is
//!    not written to at all; for LVM and RAID0 one refused disk refuses the whole volume before anything runs.
//! 2. **Layout** ([`Step::Partitioned`]) — `PerDisk`: a GPT with one partition spanning the disk, named
//!    `nimbus-<volume>` (`sfdisk`, then `partx -u` and, where no udev/devtmpfs made it, the partition node from
//!    sysfs). `Lvm`: `pvcreate` per disk, `vgcreate`, and with `filesystem_on_lv` `lvcreate -l 100%FREE`.
//!    `Raid0`: `mdadm --create` (or `--assemble` of our own members).
//! 3. **File system** ([`Step::FilesystemMade`]) — `mkfs.xfs` / `mkfs.ext4` with label `nimbus-<volume>`
//!    (truncated to 12 / 16 bytes), read back with `blkid`.
//! 4. **Unit** ([`Step::UnitWritten`]) — a `.mount` unit by file-system UUID with `nofail` and
//!    `x-systemd.device-timeout=10s`, written atomically when its content differs.
//! 5. **Mount** ([`Step::Mounted`]) — `mkdir`, then `systemctl enable --now` when systemd runs, else the
//!    `local-fs.target.wants` link and `mount UUID=…`; skipped when already mounted there from that device.
//!
//! GPT disk and partition GUIDs, PV UUIDs, the array UUID and file-system UUIDs are chosen here and recorded in
//! the state file *before* the tool writes them, so a crash right after any tool still leaves work we
//! recognise. A disk found empty although the record names it for this volume (cloud instance store after a
//! stop/start, possibly under a new by-id name) is prepared again and the record updated.

use std::path::{Path, PathBuf};

use inventory::{Signature, SignatureKind};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::engine::{Ctx, lv_path, md_path, path_str};
use crate::error::StorageError;
use crate::host::{Host, lvm_uuid, md_uuid, uuid_hex};
use crate::model::{DiskRef, Filesystem, Layout, StoragePlan, Volume};
use crate::probe::{self, DevNum, DiskFacts, describe_signature, read_mountinfo};
use crate::state::{DiskRecord, FsRecord, State, VolumeRecord};
use crate::unit::{mount_options, mount_unit_name, render_mount_unit};

/// The GPT partition type of every partition we make: "Linux filesystem data".
pub const LINUX_FS_PARTITION_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// A step after which [`ApplyOptions::fail_after`] can inject a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// GPT partition made (`PerDisk`), PVs + VG (+ LV) made (`Lvm`), array created or assembled (`Raid0`).
    Partitioned,
    FilesystemMade,
    UnitWritten,
    Mounted,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Run no mutating command and write nothing; report every command that would run.
    pub dry_run: bool,
    /// Tests: return [`StorageError::Injected`] right after this step (done or found done) on the first disk
    /// or volume that reaches it.
    pub fail_after: Option<Step>,
}

/// What an apply (or remove) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Mutating commands run (dry run: that would run), in order, as one would type them (stdin as a
    /// here-document). Read-only probes (`blkid`, `vgs`, `lvs`, `mdadm --detail`) are not listed.
    pub commands: Vec<String>,
    /// File changes (units, `local-fs.target.wants` links, device nodes), in order: `write PATH`,
    /// `remove PATH`, `link LINK -> TARGET`, `mknod NODE b MAJOR MINOR`.
    pub files: Vec<String>,
    /// One entry per volume; `PerDisk` volumes: one per disk (each has its own file system and mount).
    pub volumes: Vec<VolumeReport>,
}

impl Report {
    /// Entries that were refused or failed.
    pub fn problems(&self) -> Vec<&VolumeReport> {
        self.volumes
            .iter()
            .filter(|v| matches!(v.state, VolumeState::Refused(_) | VolumeState::Failed(_)))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub name: String,
    pub state: VolumeState,
    /// The device the file system is on (partition, `/dev/<vg>/<lv>`, `/dev/md/<name>`); the VG name for an
    /// LVM volume without a file system.
    pub device: Option<String>,
    pub fs_uuid: Option<String>,
    pub mount_point: Option<String>,
    /// The plan's disks (`by_id`) this entry covers.
    pub disks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "snake_case")]
pub enum VolumeState {
    /// Something was made or changed (dry run: would be).
    Created,
    /// Everything was already in place; nothing ran.
    AlreadyReady,
    /// A disk was left untouched (carries data, mounted, in use, root disk); the reason says what to do.
    Refused(String),
    /// A step failed; the reason names the command or conflict.
    Failed(String),
    /// `remove`: the volume was taken down and its record deleted.
    Removed,
}

/// Apply `plan` to `host`. `Err` only for problems that stop everything (invalid plan, a layout the kernel
/// cannot do, unreadable/unwritable state file, an injected failure); per-volume refusals and failures are in
/// the [`Report`] and the other volumes are still applied.
pub fn apply(host: &Host, plan: &StoragePlan, opts: &ApplyOptions) -> Result<Report, StorageError> {
    validate(plan)?;
    check_kernel(host, plan)?;
    let state = State::load(&host.state_dir)?;
    let mut cx = Ctx::new(host, opts.dry_run, opts.fail_after, state);
    for v in &plan.volumes {
        match &v.layout {
            Layout::PerDisk => {
                let n = v.disks.len();
                for (i, d) in v.disks.iter().enumerate() {
                    let mount_point = if n == 1 {
                        v.mount_point.clone()
                    } else {
                        format!("{}/{i}", v.mount_point)
                    };
                    let mut rep = report_for(v, std::slice::from_ref(d), Some(mount_point.clone()));
                    cx.changed = false;
                    let r = per_disk(&mut cx, v, i, d, &mount_point, &mut rep);
                    finish(&mut cx, rep, r)?;
                }
            }
            Layout::Lvm {
                vg,
                lv,
                filesystem_on_lv,
            } => {
                let mp = filesystem_on_lv.then(|| v.mount_point.clone());
                let mut rep = report_for(v, &v.disks, mp);
                cx.changed = false;
                let r = lvm(&mut cx, v, vg, lv, *filesystem_on_lv, &mut rep);
                finish(&mut cx, rep, r)?;
            }
            Layout::Raid0 { name } => {
                let mut rep = report_for(v, &v.disks, Some(v.mount_point.clone()));
                cx.changed = false;
                let r = raid0(&mut cx, v, name, &mut rep);
                finish(&mut cx, rep, r)?;
            }
        }
    }
    Ok(Report {
        commands: cx.commands,
        files: cx.files,
        volumes: cx.volumes,
    })
}

fn report_for(v: &Volume, disks: &[DiskRef], mount_point: Option<String>) -> VolumeReport {
    VolumeReport {
        name: v.name.clone(),
        state: VolumeState::AlreadyReady,
        device: None,
        fs_uuid: None,
        mount_point,
        disks: disks.iter().map(|d| d.by_id.clone()).collect(),
    }
}

fn finish(cx: &mut Ctx, mut rep: VolumeReport, r: Result<(), StorageError>) -> Result<(), StorageError> {
    match r {
        Ok(()) => {
            rep.state = if cx.changed {
                VolumeState::Created
            } else {
                VolumeState::AlreadyReady
            };
            info!(volume = %rep.name, state = ?rep.state, device = ?rep.device, "volume applied");
        }
        Err(e) if e.is_global() => return Err(e),
        Err(e) if e.is_refusal() => {
            warn!(volume = %rep.name, "{e}");
            rep.state = VolumeState::Refused(e.to_string());
        }
        Err(e) => {
            warn!(volume = %rep.name, "{e}");
            rep.state = VolumeState::Failed(e.to_string());
        }
    }
    cx.volumes.push(rep);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Plan checks

/// Mount points never used for volumes (exactly), and trees never mounted into.
const SYSTEM_DIRS: &[&str] = &[
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/log", "/var/tmp",
];
const SYSTEM_TREES: &[&str] = &[
    "/lib32/", "/libx32/", "/bin/", "/boot/", "/dev/", "/etc/", "/lib/", "/lib64/", "/proc/", "/run/", "/sbin/",
    "/sys/", "/usr/",
];

/// Reject plans that could not be applied safely (names that would inject into commands or unit files, mount
/// points on system directories, a disk in two volumes, ...). Nothing is touched before this passes.
pub fn validate(plan: &StoragePlan) -> Result<(), StorageError> {
    let bad = |m: String| Err(StorageError::InvalidPlan(m));
    let mut names = std::collections::BTreeSet::new();
    let mut mounts = std::collections::BTreeSet::new();
    let mut disks = std::collections::BTreeSet::new();
    for v in &plan.volumes {
        if v.name.is_empty()
            || v.name.len() > 32
            || !v
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad(format!("volume name {:?} is not 1-32 of [a-z0-9-]", v.name));
        }
        if !names.insert(v.name.as_str()) {
            return bad(format!("volume {} appears twice", v.name));
        }
        if v.disks.is_empty() {
            return bad(format!("volume {} has no disks", v.name));
        }
        for d in &v.disks {
            if !d.by_id.starts_with('/') || d.by_id.chars().any(|c| c.is_control()) {
                return bad(format!(
                    "volume {}: disk path {:?} is not an absolute path",
                    v.name, d.by_id
                ));
            }
            if !disks.insert(d.by_id.as_str()) {
                return bad(format!("disk {} is in more than one volume (or twice in one)", d.by_id));
            }
        }
        let needs_mount = !matches!(
            v.layout,
            Layout::Lvm {
                filesystem_on_lv: false,
                ..
            }
        );
        if needs_mount || !v.mount_point.is_empty() {
            check_mount_point(&v.name, &v.mount_point)?;
            if !mounts.insert(v.mount_point.as_str()) {
                return bad(format!("mount point {} is used by two volumes", v.mount_point));
            }
        }
        for o in &v.mount_options {
            if o.is_empty()
                || o.contains(',')
                || o.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '\\' || c == '%')
            {
                return bad(format!(
                    "volume {}: mount option {o:?} must be one non-empty option without commas, spaces, '%' or \
                     backslashes",
                    v.name
                ));
            }
        }
        let dm_name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && !s.starts_with('-')
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b))
                && s != "."
                && s != ".."
        };
        match &v.layout {
            Layout::PerDisk => {}
            Layout::Lvm { vg, lv, .. } => {
                if !dm_name_ok(vg) || !dm_name_ok(lv) {
                    return bad(format!(
                        "volume {}: VG {vg:?} / LV {lv:?} must be 1-64 of [A-Za-z0-9+_.-], not starting with '-'",
                        v.name
                    ));
                }
            }
            Layout::Raid0 { name } => {
                if !dm_name_ok(name) {
                    return bad(format!(
                        "volume {}: array name {name:?} must be 1-64 of [A-Za-z0-9+_.-], not starting with '-'",
                        v.name
                    ));
                }
            }
        }
    }
    Ok(())
}

fn check_mount_point(volume: &str, mp: &str) -> Result<(), StorageError> {
    let bad = |why: &str| {
        Err(StorageError::InvalidPlan(format!(
            "volume {volume}: mount point {mp:?} {why}"
        )))
    };
    if !mp.starts_with('/') || mp.len() > 1024 {
        return bad("must be an absolute path");
    }
    if mp.len() > 1 && mp.ends_with('/') {
        return bad("must not end with '/'");
    }
    if mp.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("must be normalized (no '//', '.' or '..')");
    }
    // '%' would be a specifier in the unit file.
    if mp
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\' || c == '%')
    {
        return bad("must not contain whitespace, control characters, '%' or backslashes");
    }
    if SYSTEM_DIRS.contains(&mp) || SYSTEM_TREES.iter().any(|t| mp.starts_with(t)) {
        return bad("is a system directory");
    }
    Ok(())
}

fn check_kernel(host: &Host, plan: &StoragePlan) -> Result<(), StorageError> {
    for v in &plan.volumes {
        match v.layout {
            Layout::Lvm { .. } if !host.kernel.device_mapper => {
                return Err(StorageError::KernelLacks {
                    volume: v.name.clone(),
                    layout: "LVM",
                    feature: "device-mapper",
                    module: "dm_mod",
                    evidence: "no /sys/module/dm_mod, no device-mapper in /proc/misc",
                });
            }
            Layout::Raid0 { .. } if !host.kernel.md => {
                return Err(StorageError::KernelLacks {
                    volume: v.name.clone(),
                    layout: "RAID0",
                    feature: "md (software RAID)",
                    module: "raid0",
                    evidence: "no /proc/mdstat",
                });
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Safety

/// What to do with a disk that passed the safety check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    /// No signature: prepare it.
    Fresh,
    /// Our recorded work for this volume: continue it.
    Ours,
    /// Carries data the plan's `wipe` list allows destroying: wipe, then prepare.
    Wipe,
}

fn check_disk(cx: &Ctx, v: &Volume, f: &DiskFacts, ours: bool) -> Result<Disposition, StorageError> {
    let refuse = |found: String, advice: &str| {
        Err(StorageError::Refused {
            by_id: f.by_id.clone(),
            device: path_str(&f.node),
            identity: f.identity(),
            found,
            advice: advice.to_string(),
        })
    };
    if f.holds_root {
        return refuse(
            "it holds the root file system".into(),
            "it can never be used for a volume; make the storage profile's disk selector exclude the root disk",
        );
    }
    if ours {
        return Ok(Disposition::Ours);
    }
    const UNTOUCHABLE: &str = "it was not touched (a wipe list does not override this); stop using it (unmount, \
                               swapoff, remove its fstab entry / LVM / md use) if its data is no longer needed, \
                               or take it out of the storage profile's disk selection";
    if !f.mounts.is_empty() {
        let at: Vec<String> = f.mounts.iter().map(|(n, m)| format!("{n} at {m}")).collect();
        return refuse(format!("it is mounted ({})", at.join(", ")), UNTOUCHABLE);
    }
    if !f.swap.is_empty() {
        return refuse(format!("it is active swap ({})", f.swap.join(", ")), UNTOUCHABLE);
    }
    if !f.holders.is_empty() {
        return refuse(
            format!("it is in use by {} (device-mapper / md)", f.holders.join(", ")),
            UNTOUCHABLE,
        );
    }
    if let Some(e) = &f.read_error {
        return refuse(
            format!("its content cannot be checked ({e})"),
            "a disk that cannot be read is never used; check the device's permissions and health",
        );
    }
    let mut found: Option<String> = f.signature.as_ref().map(|s| {
        let owner = owner_hint(&cx.state, s);
        format!("it carries {}{owner}", describe_signature(s))
    });
    if found.is_none() && !f.partitions.is_empty() {
        // No table on the disk, yet the kernel still lists partitions (its view is stale, e.g. the start of the
        // disk was zeroed). Empty ones do not matter (the new table replaces them); any content, or a partition
        // we cannot read, counts as data.
        let parts: Vec<String> = f
            .partitions
            .iter()
            .filter_map(|p| {
                let readable = DevNum::of_node(&p.node) == Some(p.dev);
                let sig = if readable {
                    match inventory::probe_signature(&p.node, Some(p.size_bytes)) {
                        Ok(None) => return None,
                        Ok(Some(s)) => format!(" with {}", describe_signature(&s)),
                        Err(e) => format!(" (unreadable: {e})"),
                    }
                } else {
                    " (no device node to inspect it)".to_string()
                };
                Some(format!("{}{sig}", p.name))
            })
            .collect();
        if !parts.is_empty() {
            found = Some(format!("the kernel lists partitions on it ({})", parts.join(", ")));
        }
    }
    let Some(found) = found else {
        return Ok(Disposition::Fresh);
    };
    if wipe_allowed(v, f) {
        warn!(disk = %f.by_id, device = %f.node.display(), identity = %f.identity(), "{found}; the plan's wipe list names this disk: wiping it");
        return Ok(Disposition::Wipe);
    }
    refuse(
        found,
        "if its data may be destroyed, add its serial, WWN or by-id path to the volume's `wipe` list (the pool's \
         storage profile); otherwise take it out of the storage profile's disk selection",
    )
}

/// The plan's `wipe` list names the disk's serial or WWN (as the kernel reports them) or its exact `by_id` path
/// (for disks without either, e.g. loop devices in tests).
fn wipe_allowed(v: &Volume, f: &DiskFacts) -> bool {
    v.wipe.iter().map(|w| w.trim()).any(|w| {
        !w.is_empty()
            && (w == f.by_id
                || f.serial.as_deref().is_some_and(|s| s.trim() == w)
                || f.wwn.as_deref().is_some_and(|x| x.trim().eq_ignore_ascii_case(w)))
    })
}

/// `; this agent made it for volume X (…)` when the signature is our work for some volume.
fn owner_hint(state: &State, sig: &Signature) -> String {
    let Some(u) = sig.uuid.as_deref().map(uuid_hex) else {
        return String::new();
    };
    let same = |x: &Option<String>| x.as_deref().is_some_and(|x| uuid_hex(x) == u);
    for (name, rec) in &state.volumes {
        let hit = rec.disks.iter().any(|d| {
            same(&d.disk_guid) || same(&d.pv_uuid) || d.fs.as_ref().is_some_and(|f| same(&Some(f.fs_uuid.clone())))
        }) || same(&rec.array_uuid)
            || rec.fs.as_ref().is_some_and(|f| same(&Some(f.fs_uuid.clone())));
        if hit {
            return format!(
                "; this agent made it for volume {name} ({:?} layout, or another disk position) — remove that \
                 volume (decommission) before reusing the disk",
                rec.layout
            );
        }
    }
    String::new()
}

/// `wipefs -a` every partition, then the disk.
fn wipe_disk(cx: &mut Ctx, f: &DiskFacts) -> Result<(), StorageError> {
    for p in &f.partitions {
        cx.ensure_node(p)?;
        let cmd = cx.cmd("wipefs", &["-a"]).arg(path_str(&p.node));
        cx.mutate(cmd)?;
    }
    let cmd = cx.cmd("wipefs", &["-a"]).arg(path_str(&f.node));
    cx.mutate(cmd)?;
    Ok(())
}

fn same_uuid(a: &str, b: &str) -> bool {
    let (a, b) = (uuid_hex(a), uuid_hex(b));
    !a.is_empty() && a == b
}

fn sig_uuid(f: &DiskFacts, kind: SignatureKind) -> Option<&str> {
    f.signature
        .as_ref()
        .filter(|s| s.kind == kind)
        .and_then(|s| s.uuid.as_deref())
}

fn volume_record<'s>(state: &'s mut State, v: &Volume) -> &'s mut VolumeRecord {
    let rec = state.volumes.entry(v.name.clone()).or_insert_with(|| VolumeRecord {
        layout: v.layout.clone(),
        filesystem: v.filesystem,
        mount_point: v.mount_point.clone(),
        disks: Vec::new(),
        array_uuid: None,
        fs: None,
    });
    rec.layout = v.layout.clone();
    rec.filesystem = v.filesystem;
    rec.mount_point = v.mount_point.clone();
    rec
}

fn new_disk_record(slot: usize, f: &DiskFacts) -> DiskRecord {
    DiskRecord {
        slot,
        by_id: f.by_id.clone(),
        serial: f.serial.clone(),
        wwn: f.wwn.clone(),
        device: path_str(&f.node),
        disk_guid: None,
        partuuid: None,
        pv_uuid: None,
        fs: None,
    }
}

// ---------------------------------------------------------------------------------------------------------
// PerDisk

fn per_disk(
    cx: &mut Ctx,
    v: &Volume,
    i: usize,
    d: &DiskRef,
    mount_point: &str,
    rep: &mut VolumeReport,
) -> Result<(), StorageError> {
    let facts = probe::disk(cx.host, &d.by_id)?;
    let rec: Option<DiskRecord> = cx
        .state
        .volumes
        .get(&v.name)
        .filter(|r| r.layout == Layout::PerDisk)
        .and_then(|r| r.disks.iter().find(|d| d.slot == i))
        .cloned();
    let ours = match (
        sig_uuid(&facts, SignatureKind::Gpt),
        rec.as_ref().and_then(|r| r.disk_guid.as_deref()),
    ) {
        (Some(g), Some(rg)) => same_uuid(g, rg),
        _ => false,
    };
    let disposition = check_disk(cx, v, &facts, ours)?;
    let label = part_label(&v.name);
    let mut partitioned_now = false;
    if disposition != Disposition::Ours {
        if disposition == Disposition::Wipe {
            wipe_disk(cx, &facts)?;
        }
        if let Some(old) = rec.as_ref().filter(|_| disposition == Disposition::Fresh) {
            if old.by_id != facts.by_id {
                info!(volume = %v.name, disk = %facts.by_id, replaces = %old.by_id,
                      "a new, empty disk took this volume position (instance store after a stop/start?): preparing it");
            } else {
                info!(volume = %v.name, disk = %facts.by_id,
                      "the disk we prepared is empty again (instance store after a stop/start?): preparing it again");
            }
        }
        let disk_guid = cx.host.ids.uuid();
        let partuuid = cx.host.ids.uuid();
        let mut record = new_disk_record(i, &facts);
        record.disk_guid = Some(disk_guid.clone());
        record.partuuid = Some(partuuid.clone());
        let vr = volume_record(&mut cx.state, v);
        vr.disks.retain(|d| d.slot != i);
        vr.disks.push(record);
        vr.disks.sort_by_key(|d| d.slot);
        cx.save()?;
        let script = format!(
            "label: gpt\nlabel-id: {disk_guid}\ntype={LINUX_FS_PARTITION_TYPE}, uuid={partuuid}, name=\"{label}\"\n"
        );
        let cmd = cx
            .cmd(
                "sfdisk",
                &["--quiet", "--wipe", "always", "--wipe-partitions", "always"],
            )
            .arg(path_str(&facts.node))
            .stdin(script);
        cx.mutate(cmd)?;
        partitioned_now = true;
    }
    let (part_node, part_dev) = ensure_partition(cx, v, &facts, partitioned_now, &label)?;
    rep.device = Some(path_str(&part_node));
    cx.reached(Step::Partitioned)?;

    let fs_uuid = ensure_fs(cx, v, &part_node, partitioned_now, FsSlot::Disk(i), mount_point)?;
    rep.fs_uuid = Some(fs_uuid.clone());
    cx.reached(Step::FilesystemMade)?;

    let (unit, unit_changed) = ensure_unit(cx, v, &fs_uuid, mount_point, FsSlot::Disk(i))?;
    cx.reached(Step::UnitWritten)?;

    ensure_mounted(cx, v, &fs_uuid, mount_point, &part_node, part_dev, &unit, unit_changed)?;
    cx.reached(Step::Mounted)
}

/// `nimbus-<volume>`: the GPT partition name.
fn part_label(volume: &str) -> String {
    format!("nimbus-{volume}")
}

/// `nimbus-<volume>` cut to the file system's label limit (xfs 12, ext4 16 bytes).
pub fn fs_label(fs: Filesystem, volume: &str) -> String {
    let max = match fs {
        Filesystem::Xfs => 12,
        Filesystem::Ext4 => 16,
    };
    let mut l = part_label(volume);
    l.truncate(max);
    l
}

/// Partition 1 known to the kernel (`partx -u` when not), named as we name it, with a correct device node.
fn ensure_partition(
    cx: &mut Ctx,
    v: &Volume,
    f: &DiskFacts,
    partitioned_now: bool,
    label: &str,
) -> Result<(PathBuf, Option<DevNum>), StorageError> {
    let predicted = f.partition_node(1);
    if cx.dry_run && partitioned_now {
        let cmd = cx.cmd("partx", &["-u"]).arg(path_str(&f.node));
        cx.mutate(cmd)?;
        return Ok((predicted, None));
    }
    let sys = cx.host.sys_dir.join("class/block").join(&f.name);
    let mut part = probe::partitions_of(&sys, &f.node).into_iter().find(|p| p.number == 1);
    if part.is_none() || partitioned_now {
        // The kernel may not have re-read the new table (loop devices here ignore BLKRRPART): add it.
        let cmd = cx.cmd("partx", &["-u"]).arg(path_str(&f.node));
        cx.mutate(cmd)?;
        if cx.dry_run {
            return Ok((predicted, None));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            part = probe::partitions_of(&sys, &f.node).into_iter().find(|p| p.number == 1);
            if part.is_some() || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let Some(part) = part else {
        return Err(StorageError::Conflict {
            volume: v.name.clone(),
            detail: format!(
                "the kernel shows no partition 1 on {} after `partx -u`",
                f.node.display()
            ),
            advice: "check `sfdisk --dump` of the disk and dmesg; remove the volume (decommission) to start over"
                .into(),
        });
    };
    if let Some(name) = &part.part_name
        && name != label
    {
        return Err(StorageError::Conflict {
            volume: v.name.clone(),
            detail: format!("partition {} is named {name:?}, not {label:?}", part.name),
            advice: "the disk's table is not the one this agent wrote; inspect it by hand".into(),
        });
    }
    cx.ensure_node(&part)?;
    Ok((part.node.clone(), Some(part.dev)))
}

// ---------------------------------------------------------------------------------------------------------
// File system, unit, mount (all layouts)

/// Where a volume's file-system record lives.
#[derive(Debug, Clone, Copy)]
enum FsSlot {
    /// `PerDisk`: on disk position `i`.
    Disk(usize),
    /// LVM / RAID0: on the volume.
    Volume,
}

fn fs_record<'s>(state: &'s mut State, v: &Volume, slot: FsSlot) -> Option<&'s mut Option<FsRecord>> {
    let rec = state.volumes.get_mut(&v.name)?;
    match slot {
        FsSlot::Disk(i) => rec.disks.iter_mut().find(|d| d.slot == i).map(|d| &mut d.fs),
        FsSlot::Volume => Some(&mut rec.fs),
    }
}

/// Make the file system unless the recorded one is there; return its UUID.
fn ensure_fs(
    cx: &mut Ctx,
    v: &Volume,
    dev: &Path,
    dev_new: bool,
    slot: FsSlot,
    mount_point: &str,
) -> Result<String, StorageError> {
    let recorded: Option<FsRecord> = fs_record(&mut cx.state, v, slot).and_then(|r| r.clone());
    let existing = if dev_new && cx.dry_run { None } else { cx.blkid(dev)? };
    if let Some(b) = existing {
        let ours = recorded
            .as_ref()
            .is_some_and(|r| b.uuid.as_deref().is_some_and(|u| same_uuid(u, &r.fs_uuid)));
        let Some(r) = recorded.filter(|_| ours) else {
            return Err(StorageError::Conflict {
                volume: v.name.clone(),
                detail: format!(
                    "{} carries {}, which this agent did not make",
                    dev.display(),
                    b.describe()
                ),
                advice: "nothing was changed; inspect the device, and remove the volume (decommission) or wipe it \
                         by hand if its data is not needed"
                    .into(),
            });
        };
        if b.fstype.as_deref() != Some(v.filesystem.as_str()) {
            return Err(StorageError::Conflict {
                volume: v.name.clone(),
                detail: format!(
                    "{} carries the {} file system this agent made, but the plan now asks for {}",
                    dev.display(),
                    b.fstype.as_deref().unwrap_or("?"),
                    v.filesystem.as_str()
                ),
                advice: "its data was kept; remove the volume (decommission) to change the file system".into(),
            });
        }
        return Ok(r.fs_uuid);
    }
    if let Some(r) = &recorded
        && !dev_new
    {
        info!(volume = %v.name, device = %dev.display(), old_uuid = %r.fs_uuid,
              "the recorded file system is not on the device (the last mkfs did not finish?): making it");
    }
    let uuid = cx.host.ids.uuid();
    let label = fs_label(v.filesystem, &v.name);
    if let Some(slot_rec) = fs_record(&mut cx.state, v, slot) {
        *slot_rec = Some(FsRecord {
            device: path_str(dev),
            fs_uuid: uuid.clone(),
            label: label.clone(),
            mount_point: mount_point.to_string(),
            unit: None,
        });
    }
    cx.save()?;
    let cmd = match v.filesystem {
        Filesystem::Xfs => cx
            .cmd("mkfs.xfs", &["-q", "-L", &label, "-m"])
            .arg(format!("uuid={uuid}")),
        Filesystem::Ext4 => cx.cmd("mkfs.ext4", &["-q", "-L", &label, "-U", &uuid]),
    }
    .arg(path_str(dev))
    .timeout(cx.host.mkfs_timeout);
    cx.mutate(cmd)?;
    if !cx.dry_run {
        let back = cx.blkid(dev)?;
        let got = back.as_ref().and_then(|b| b.uuid.clone());
        if !got.as_deref().is_some_and(|g| same_uuid(g, &uuid)) {
            return Err(StorageError::Conflict {
                volume: v.name.clone(),
                detail: format!(
                    "after mkfs, {} reports UUID {} instead of {uuid}",
                    dev.display(),
                    got.as_deref().unwrap_or("none")
                ),
                advice: "check the mkfs version and the device; apply again".into(),
            });
        }
    }
    Ok(uuid)
}

/// Write the `.mount` unit when its content differs; take down a unit we wrote for an earlier mount point.
fn ensure_unit(
    cx: &mut Ctx,
    v: &Volume,
    fs_uuid: &str,
    mount_point: &str,
    slot: FsSlot,
) -> Result<(String, bool), StorageError> {
    let name = mount_unit_name(mount_point);
    let content = render_mount_unit(&v.name, fs_uuid, mount_point, v.filesystem, &v.mount_options);
    let path = cx.host.unit_dir.join(&name);
    let changed = std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str());
    if changed {
        cx.write_file(&path, &content, 0o644)?;
    }
    let recorded = fs_record(&mut cx.state, v, slot).and_then(|r| r.clone());
    if let Some(r) = recorded {
        if let Some(old) = r.unit.as_deref().filter(|u| *u != name) {
            let old_mp = r.mount_point.clone();
            info!(volume = %v.name, old_unit = %old, "the mount point changed: taking down the old unit");
            let mounts = read_mountinfo(&cx.host.mountinfo)?;
            if mounts.iter().any(|m| m.mount_point == old_mp && m.source == r.device) {
                let cmd = cx.cmd("umount", &[]).arg(old_mp.clone());
                cx.mutate(cmd)?;
            }
            let wants = cx.host.unit_dir.join("local-fs.target.wants").join(old);
            cx.remove_file(&wants)?;
            let old_path = cx.host.unit_dir.join(old);
            cx.remove_file(&old_path)?;
        }
        if r.unit.as_deref() != Some(name.as_str()) || r.mount_point != mount_point {
            if let Some(Some(rec)) = fs_record(&mut cx.state, v, slot) {
                rec.unit = Some(name.clone());
                rec.mount_point = mount_point.to_string();
            }
            cx.save()?;
        }
    }
    Ok((name, changed))
}

/// Mount unless already mounted at `mount_point` from `dev`.
#[allow(clippy::too_many_arguments)]
fn ensure_mounted(
    cx: &mut Ctx,
    v: &Volume,
    fs_uuid: &str,
    mount_point: &str,
    dev_node: &Path,
    dev: Option<DevNum>,
    unit: &str,
    unit_changed: bool,
) -> Result<(), StorageError> {
    let mounts = read_mountinfo(&cx.host.mountinfo)?;
    let node = path_str(dev_node);
    let is_ours = |m: &probe::MountEntry| dev.is_some_and(|d| d == m.dev) || m.source == node;
    let top_here = mounts.iter().rev().find(|m| m.mount_point == mount_point);
    let mounted = top_here.is_some_and(is_ours);
    if !mounted {
        if let Some(other) = top_here {
            return Err(StorageError::Conflict {
                volume: v.name.clone(),
                detail: format!("{mount_point} already has {} ({}) mounted", other.source, other.fstype),
                advice: "unmount it (and remove its fstab entry or unit) so the volume can be mounted there".into(),
            });
        }
        if let Some(elsewhere) = mounts.iter().find(|m| is_ours(m)) {
            return Err(StorageError::Conflict {
                volume: v.name.clone(),
                detail: format!("{} is already mounted at {}", dev_node.display(), elsewhere.mount_point),
                advice: format!("unmount it there; the plan mounts it at {mount_point}"),
            });
        }
    }
    let unit_path = cx.host.unit_dir.join(unit);
    let wants = cx.host.unit_dir.join("local-fs.target.wants").join(unit);
    let enabled = std::fs::read_link(&wants).is_ok_and(|t| t == unit_path);
    let mkdir = |cx: &mut Ctx| -> Result<(), StorageError> {
        if !Path::new(mount_point).is_dir() {
            let cmd = cx.cmd("mkdir", &["-p", "-m", "0755"]).arg(mount_point);
            cx.mutate(cmd)?;
        }
        Ok(())
    };
    if cx.host.systemd {
        if unit_changed {
            let cmd = cx.cmd("systemctl", &["daemon-reload"]);
            cx.mutate(cmd)?;
        }
        if !mounted {
            mkdir(cx)?;
            let cmd = cx.cmd("systemctl", &["enable", "--now"]).arg(unit);
            cx.mutate(cmd)?;
        } else if !enabled {
            let cmd = cx.cmd("systemctl", &["enable"]).arg(unit);
            cx.mutate(cmd)?;
        }
    } else {
        if !enabled {
            cx.symlink(&unit_path, &wants)?;
        }
        if !mounted {
            mkdir(cx)?;
            let cmd = cx
                .cmd("mount", &["-t", v.filesystem.as_str(), "-o"])
                .arg(mount_options(&v.mount_options))
                .arg(format!("UUID={fs_uuid}"))
                .arg(mount_point);
            cx.mutate(cmd)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// LVM

fn lvm(
    cx: &mut Ctx,
    v: &Volume,
    vg: &str,
    lv: &str,
    filesystem_on_lv: bool,
    rep: &mut VolumeReport,
) -> Result<(), StorageError> {
    let facts = v
        .disks
        .iter()
        .map(|d| probe::disk(cx.host, &d.by_id))
        .collect::<Result<Vec<_>, _>>()?;
    let recorded: Vec<DiskRecord> = cx
        .state
        .volumes
        .get(&v.name)
        .filter(|r| matches!(r.layout, Layout::Lvm { .. }))
        .map(|r| r.disks.clone())
        .unwrap_or_default();
    let mut dispositions = Vec::with_capacity(facts.len());
    for f in &facts {
        let ours = sig_uuid(f, SignatureKind::Lvm2Member).is_some_and(|u| {
            recorded
                .iter()
                .any(|r| r.pv_uuid.as_deref().is_some_and(|p| same_uuid(p, u)))
        });
        dispositions.push(check_disk(cx, v, f, ours)?);
    }
    let fresh: Vec<usize> = (0..facts.len())
        .filter(|i| dispositions[*i] != Disposition::Ours)
        .collect();
    let vg_exists = {
        let cmd = cx.cmd("vgs", &["--noheadings", "-o", "vg_name", vg]);
        let out = cx.probe(cmd)?;
        out.success() && out.stdout.trim() == vg
    };
    if vg_exists && !fresh.is_empty() {
        let new: Vec<&str> = fresh.iter().map(|i| facts[*i].by_id.as_str()).collect();
        return Err(StorageError::Conflict {
            volume: v.name.clone(),
            detail: format!("volume group {vg} exists, but disks {} are new to it", new.join(", ")),
            advice: format!(
                "nothing was changed; if instance store was replaced, remove the volume (decommission) or repair \
                 the VG by hand (`vgreduce --removemissing {vg}`, `vgextend`)"
            ),
        });
    }
    if !fresh.is_empty() {
        for (f, d) in facts.iter().zip(&dispositions) {
            if *d == Disposition::Wipe {
                wipe_disk(cx, f)?;
            }
        }
        let mut pv_uuids = Vec::new();
        let mut disks = Vec::with_capacity(facts.len());
        for (i, f) in facts.iter().enumerate() {
            let kept = (dispositions[i] == Disposition::Ours)
                .then(|| {
                    let sig = sig_uuid(f, SignatureKind::Lvm2Member)?;
                    recorded
                        .iter()
                        .find(|r| r.pv_uuid.as_deref().is_some_and(|p| same_uuid(p, sig)))
                        .cloned()
                })
                .flatten();
            let mut r = kept.unwrap_or_else(|| {
                let mut r = new_disk_record(i, f);
                let u = lvm_uuid(&cx.host.ids.uuid());
                pv_uuids.push((i, u.clone()));
                r.pv_uuid = Some(u);
                r
            });
            r.slot = i;
            disks.push(r);
        }
        let vr = volume_record(&mut cx.state, v);
        vr.disks = disks;
        vr.fs = None;
        cx.save()?;
        for (i, u) in pv_uuids {
            let cmd = cx
                .cmd("pvcreate", &["--uuid", &u, "--norestorefile"])
                .arg(path_str(&facts[i].node));
            cx.mutate(cmd)?;
        }
    }
    let vg_new = !vg_exists;
    if vg_new {
        let cmd = cx.cmd("vgcreate", &[vg]).args(facts.iter().map(|f| path_str(&f.node)));
        cx.mutate(cmd)?;
    }
    if !filesystem_on_lv {
        rep.device = Some(vg.to_string());
        return cx.reached(Step::Partitioned);
    }
    let lv_exists = !vg_new && {
        let cmd = cx
            .cmd("lvs", &["--noheadings", "-o", "lv_name"])
            .arg(format!("{vg}/{lv}"));
        let out = cx.probe(cmd)?;
        out.success() && out.stdout.trim() == lv
    };
    if !lv_exists {
        let cmd = cx.cmd("lvcreate", &["--yes", "-l", "100%FREE", "-n", lv, vg]);
        cx.mutate(cmd)?;
    }
    cx.reached(Step::Partitioned)?;
    let dev = lv_path(vg, lv);
    rep.device = Some(path_str(&dev));
    finish_fs(cx, v, &dev, !lv_exists, rep)
}

/// File system, unit and mount on an LV or array.
fn finish_fs(cx: &mut Ctx, v: &Volume, dev: &Path, dev_new: bool, rep: &mut VolumeReport) -> Result<(), StorageError> {
    let fs_uuid = ensure_fs(cx, v, dev, dev_new, FsSlot::Volume, &v.mount_point)?;
    rep.fs_uuid = Some(fs_uuid.clone());
    cx.reached(Step::FilesystemMade)?;
    let (unit, unit_changed) = ensure_unit(cx, v, &fs_uuid, &v.mount_point, FsSlot::Volume)?;
    cx.reached(Step::UnitWritten)?;
    let devnum = DevNum::of_node(dev);
    ensure_mounted(cx, v, &fs_uuid, &v.mount_point, dev, devnum, &unit, unit_changed)?;
    cx.reached(Step::Mounted)
}

// ---------------------------------------------------------------------------------------------------------
// RAID0

fn raid0(cx: &mut Ctx, v: &Volume, name: &str, rep: &mut VolumeReport) -> Result<(), StorageError> {
    let facts = v
        .disks
        .iter()
        .map(|d| probe::disk(cx.host, &d.by_id))
        .collect::<Result<Vec<_>, _>>()?;
    let array_uuid: Option<String> = cx
        .state
        .volumes
        .get(&v.name)
        .filter(|r| matches!(r.layout, Layout::Raid0 { .. }))
        .and_then(|r| r.array_uuid.clone());
    let mut dispositions = Vec::with_capacity(facts.len());
    for f in &facts {
        let ours = sig_uuid(f, SignatureKind::LinuxRaidMember)
            .zip(array_uuid.as_deref())
            .is_some_and(|(a, b)| same_uuid(a, b));
        dispositions.push(check_disk(cx, v, f, ours)?);
    }
    let md = md_path(name);
    let all_ours = dispositions.iter().all(|d| *d == Disposition::Ours);
    let none_ours = dispositions.iter().all(|d| *d != Disposition::Ours);
    let detail = {
        let cmd = cx.cmd("mdadm", &["--detail"]).arg(path_str(&md));
        cx.probe(cmd)?
    };
    let mut created = false;
    if detail.success() {
        let running_uuid = detail
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("UUID :").map(str::trim).map(str::to_string));
        let matches = all_ours
            && running_uuid
                .as_deref()
                .zip(array_uuid.as_deref())
                .is_some_and(|(a, b)| same_uuid(a, b));
        if !matches {
            return Err(StorageError::Conflict {
                volume: v.name.clone(),
                detail: format!(
                    "{} is running, but is not the array this agent built from these disks",
                    md.display()
                ),
                advice:
                    "nothing was changed; stop it (`mdadm --stop`) if it is a leftover, or rename the volume's array"
                        .into(),
            });
        }
    } else if all_ours {
        let u = md_uuid(array_uuid.as_deref().unwrap_or_default());
        let cmd = cx
            .cmd("mdadm", &["--assemble"])
            .arg(path_str(&md))
            .arg(format!("--uuid={u}"))
            .args(facts.iter().map(|f| path_str(&f.node)));
        cx.mutate(cmd)?;
    } else if none_ours {
        for (f, d) in facts.iter().zip(&dispositions) {
            if *d == Disposition::Wipe {
                wipe_disk(cx, f)?;
            }
        }
        let u = cx.host.ids.uuid();
        {
            let vr = volume_record(&mut cx.state, v);
            vr.array_uuid = Some(u.clone());
            vr.disks = facts.iter().enumerate().map(|(i, f)| new_disk_record(i, f)).collect();
            vr.fs = None;
        }
        cx.save()?;
        let cmd = cx
            .cmd("mdadm", &["--create"])
            .arg(path_str(&md))
            .arg("--level=0")
            .arg(format!("--raid-devices={}", facts.len()))
            .args(facts.iter().map(|f| path_str(&f.node)))
            .args(["--run", "--metadata=1.2"])
            .arg(format!("--uuid={}", md_uuid(&u)));
        cx.mutate(cmd)?;
        created = true;
    } else {
        let new: Vec<&str> = facts
            .iter()
            .zip(&dispositions)
            .filter(|(_, d)| **d != Disposition::Ours)
            .map(|(f, _)| f.by_id.as_str())
            .collect();
        return Err(StorageError::Conflict {
            volume: v.name.clone(),
            detail: format!("disks {} are new, the others carry this volume's array", new.join(", ")),
            advice: "a RAID0 array cannot be repaired; remove the volume (decommission) and apply again".into(),
        });
    }
    cx.reached(Step::Partitioned)?;
    rep.device = Some(path_str(&md));
    finish_fs(cx, v, &md, created, rep)
}
