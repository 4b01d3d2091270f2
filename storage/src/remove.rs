//! [`remove`]: decommission — take down every volume in the state record, and only what the record says this
//! agent created: unmount, disable and delete the unit, wipe the file system and the layout (GPT / LV, VG, PVs
//! / md array), then delete the record. A disk that no longer carries our identifiers is left alone.

use std::path::{Path, PathBuf};

use inventory::SignatureKind;
use tracing::{info, warn};

use crate::apply::{Report, VolumeReport, VolumeState};
use crate::engine::{Ctx, lv_path, md_path, path_str};
use crate::error::StorageError;
use crate::host::{Host, uuid_hex};
use crate::model::Layout;
use crate::probe::{self, DevNum, DiskFacts, read_mountinfo};
use crate::state::{FsRecord, State, VolumeRecord};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveOptions {
    /// Run no mutating command and write nothing; report every command that would run.
    pub dry_run: bool,
}

/// Take down every volume recorded in the state file. Volumes that fail keep their record (apply `remove`
/// again after fixing the cause); a second `remove` after a full one does nothing.
pub fn remove(host: &Host, opts: &RemoveOptions) -> Result<Report, StorageError> {
    let state = State::load(&host.state_dir)?;
    let mut cx = Ctx::new(host, opts.dry_run, None, state.clone());
    for (name, rec) in &state.volumes {
        cx.changed = false;
        let mut rep = VolumeReport {
            name: name.clone(),
            state: VolumeState::Removed,
            device: None,
            fs_uuid: rec.fs.as_ref().map(|f| f.fs_uuid.clone()),
            mount_point: Some(rec.mount_point.clone()).filter(|m| !m.is_empty()),
            disks: rec.disks.iter().map(|d| d.by_id.clone()).collect(),
        };
        match remove_volume(&mut cx, name, rec, &mut rep) {
            Ok(()) => {
                cx.state.volumes.remove(name);
                cx.save()?;
                info!(volume = %name, "volume removed");
            }
            Err(e) if e.is_global() => return Err(e),
            Err(e) => {
                warn!(volume = %name, "{e}");
                rep.state = VolumeState::Failed(e.to_string());
            }
        }
        cx.volumes.push(rep);
    }
    Ok(Report {
        commands: cx.commands,
        files: cx.files,
        volumes: cx.volumes,
    })
}

fn same(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            let (a, b) = (uuid_hex(a), uuid_hex(b));
            !a.is_empty() && a == b
        }
        _ => false,
    }
}

fn sig_uuid(f: &DiskFacts, kind: SignatureKind) -> Option<&str> {
    f.signature
        .as_ref()
        .filter(|s| s.kind == kind)
        .and_then(|s| s.uuid.as_deref())
}

/// The disk behind `by_id` now, if it still resolves; `None` (logged) when it is gone.
fn locate(cx: &Ctx, volume: &str, by_id: &str) -> Option<DiskFacts> {
    match probe::disk(cx.host, by_id) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(volume = %volume, disk = %by_id, "disk not found, nothing to wipe on it: {e}");
            None
        }
    }
}

fn remove_volume(cx: &mut Ctx, name: &str, rec: &VolumeRecord, rep: &mut VolumeReport) -> Result<(), StorageError> {
    match &rec.layout {
        Layout::PerDisk => {
            for d in &rec.disks {
                let facts = locate(cx, name, &d.by_id)
                    .filter(|f| same(sig_uuid(f, SignatureKind::Gpt), d.disk_guid.as_deref()));
                let part = facts.as_ref().and_then(|f| f.partition(1).cloned());
                if let Some(fs) = &d.fs {
                    let dev = part.as_ref().map(|p| (p.node.clone(), Some(p.dev)));
                    take_down(cx, name, fs, dev.as_ref())?;
                }
                let Some(f) = facts else {
                    warn!(volume = %name, disk = %d.by_id, "the disk no longer carries our partition table: left untouched");
                    continue;
                };
                if let Some(p) = &part {
                    cx.ensure_node(p)?;
                    wipe_if_ours(cx, name, &p.node, d.fs.as_ref())?;
                    rep.device.get_or_insert_with(|| path_str(&p.node));
                }
                if !f.partitions.is_empty() {
                    // Some devices (loop here) ignore the re-read wipefs asks for: drop the kernel's partitions
                    // while the table that names them is still there.
                    let cmd = cx.cmd("partx", &["-d"]).arg(path_str(&f.node));
                    cx.mutate(cmd)?;
                }
                let cmd = cx.cmd("wipefs", &["-a"]).arg(path_str(&f.node));
                cx.mutate(cmd)?;
            }
        }
        Layout::Lvm {
            vg,
            lv,
            filesystem_on_lv,
        } => {
            let dev = lv_path(vg, lv);
            if let Some(fs) = &rec.fs {
                take_down(cx, name, fs, Some(&(dev.clone(), DevNum::of_node(&dev))))?;
                if Path::new(&dev).exists() || cx.dry_run {
                    wipe_if_ours(cx, name, &dev, Some(fs))?;
                }
                rep.device = Some(path_str(&dev));
            }
            if *filesystem_on_lv {
                let cmd = cx
                    .cmd("lvs", &["--noheadings", "-o", "lv_name"])
                    .arg(format!("{vg}/{lv}"));
                if cx.probe(cmd)?.success() {
                    let cmd = cx.cmd("lvremove", &["-y"]).arg(format!("{vg}/{lv}"));
                    cx.mutate(cmd)?;
                }
            }
            let cmd = cx.cmd("vgs", &["--noheadings", "-o", "vg_name", vg]);
            if cx.probe(cmd)?.success() {
                let cmd = cx.cmd("vgremove", &["-y", vg]);
                cx.mutate(cmd)?;
            }
            for d in &rec.disks {
                if let Some(f) = locate(cx, name, &d.by_id)
                    && same(sig_uuid(&f, SignatureKind::Lvm2Member), d.pv_uuid.as_deref())
                {
                    let cmd = cx.cmd("pvremove", &["-y"]).arg(path_str(&f.node));
                    cx.mutate(cmd)?;
                }
            }
        }
        Layout::Raid0 { name: array } => {
            let dev = md_path(array);
            if let Some(fs) = &rec.fs {
                take_down(cx, name, fs, Some(&(dev.clone(), DevNum::of_node(&dev))))?;
            }
            let cmd = cx.cmd("mdadm", &["--detail"]).arg(path_str(&dev));
            let detail = cx.probe(cmd)?;
            let running_uuid = detail
                .stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix("UUID :").map(|u| u.trim().to_string()));
            if detail.success() {
                if !same(running_uuid.as_deref(), rec.array_uuid.as_deref()) {
                    return Err(StorageError::Conflict {
                        volume: name.to_string(),
                        detail: format!("{} is running but is not the array this agent built", dev.display()),
                        advice: "nothing was changed; stop it by hand if it is a leftover".into(),
                    });
                }
                if rec.fs.is_some() {
                    wipe_if_ours(cx, name, &dev, rec.fs.as_ref())?;
                }
                let cmd = cx.cmd("mdadm", &["--stop"]).arg(path_str(&dev));
                cx.mutate(cmd)?;
                rep.device = Some(path_str(&dev));
            }
            for d in &rec.disks {
                if let Some(f) = locate(cx, name, &d.by_id)
                    && same(sig_uuid(&f, SignatureKind::LinuxRaidMember), rec.array_uuid.as_deref())
                {
                    let cmd = cx.cmd("mdadm", &["--zero-superblock"]).arg(path_str(&f.node));
                    cx.mutate(cmd)?;
                }
            }
        }
    }
    Ok(())
}

/// Unmount the file system (when our device is what is mounted there), disable and delete its unit.
fn take_down(
    cx: &mut Ctx,
    volume: &str,
    fs: &FsRecord,
    dev: Option<&(PathBuf, Option<DevNum>)>,
) -> Result<(), StorageError> {
    let mounts = read_mountinfo(&cx.host.mountinfo)?;
    if let Some(m) = mounts.iter().rev().find(|m| m.mount_point == fs.mount_point) {
        let ours = dev.is_some_and(|(node, num)| num.is_some_and(|n| n == m.dev) || m.source == path_str(node));
        if ours {
            let cmd = cx.cmd("umount", &[]).arg(fs.mount_point.clone());
            cx.mutate(cmd)?;
        } else {
            warn!(volume = %volume, mount_point = %fs.mount_point, source = %m.source,
                  "something this agent did not mount is mounted there: left alone");
        }
    }
    if let Some(unit) = &fs.unit {
        let path = cx.host.unit_dir.join(unit);
        let wants = cx.host.unit_dir.join("local-fs.target.wants").join(unit);
        let present = std::fs::symlink_metadata(&path).is_ok() || std::fs::symlink_metadata(&wants).is_ok();
        if cx.host.systemd && present {
            let cmd = cx.cmd("systemctl", &["disable"]).arg(unit.clone());
            cx.mutate(cmd)?;
        }
        cx.remove_file(&wants)?;
        cx.remove_file(&path)?;
        if cx.host.systemd && present {
            let cmd = cx.cmd("systemctl", &["daemon-reload"]);
            cx.mutate(cmd)?;
        }
    }
    Ok(())
}

/// `wipefs -a dev` when it carries our recorded file system (or nothing); refuse when it carries something else.
fn wipe_if_ours(cx: &mut Ctx, volume: &str, dev: &Path, fs: Option<&FsRecord>) -> Result<(), StorageError> {
    let found = if cx.dry_run && !dev.exists() {
        None
    } else {
        cx.blkid(dev)?
    };
    let Some(b) = found else {
        return Ok(());
    };
    if !same(b.uuid.as_deref(), fs.map(|f| f.fs_uuid.as_str())) {
        return Err(StorageError::Conflict {
            volume: volume.to_string(),
            detail: format!(
                "{} carries {}, which this agent did not make",
                dev.display(),
                b.describe()
            ),
            advice: "it was left untouched and the volume's record kept; wipe it by hand if its data is not needed"
                .into(),
        });
    }
    let cmd = cx.cmd("wipefs", &["-a"]).arg(path_str(dev));
    cx.mutate(cmd)?;
    Ok(())
}
