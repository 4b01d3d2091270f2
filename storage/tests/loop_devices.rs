//! `apply` and `remove` on real block devices: loop devices over sparse files, by-id style symlinks, a temporary
//! unit directory, state directory and mount root. Needs root; without it each test prints why it skipped,
//! unless `NIMBUS_REQUIRE_ROOT_TESTS=1` (CI), which turns the skip into a failure.
//!
//! Tools: util-linux (losetup, partx, wipefs, blkid, mount), fdisk (sfdisk), e2fsprogs (mkfs.ext4), xfsprogs
//! (mkfs.xfs; its tests are skipped with a message when missing). LVM / RAID0 run for real only on kernels with
//! device-mapper / md and with lvm2 / mdadm installed.
//!
//! The tests run one at a time (a lock): they share the kernel's loop devices and `mount UUID=`.

// Test helpers may unwrap too: a panic here is a failed test, not a crashed agent.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::{Arc, Mutex, MutexGuard};

use storage::probe::read_mountinfo;
use storage::unit::mount_unit_name;
use storage::{
    ApplyOptions, DiskRef, Filesystem, Host, KernelSupport, Layout, RecordingRunner, RemoveOptions, Report, Runner,
    State, Step, StorageError, StoragePlan, SystemRunner, Volume, VolumeState, apply, remove,
};

static SERIAL: Mutex<()> = Mutex::new(());

/// Sparse disk size: xfs needs a partition of at least 300 MiB.
const DISK_MIB: u64 = 320;

fn required() -> bool {
    std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() == Ok("1")
}

fn have(tool: &str) -> bool {
    Proc::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Root and the basic tools, or a printed skip (a failure under `NIMBUS_REQUIRE_ROOT_TESTS=1`).
fn gate(test: &str) -> Option<MutexGuard<'static, ()>> {
    let skip = |why: String| {
        if required() {
            panic!("{test}: {why}, and NIMBUS_REQUIRE_ROOT_TESTS=1 forbids skipping");
        }
        eprintln!("skipped {test}: {why}");
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root for loop devices".into());
    }
    for tool in [
        "losetup",
        "sfdisk",
        "partx",
        "wipefs",
        "blkid",
        "mkfs.ext4",
        "mount",
        "umount",
        "sha256sum",
    ] {
        if !have(tool) {
            return skip(format!(
                "{tool} is not installed (apt-get install util-linux fdisk e2fsprogs)"
            ));
        }
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The file systems to test: ext4 always, xfs when mkfs.xfs exists (else a printed skip).
fn filesystems(test: &str) -> Vec<Filesystem> {
    if have("mkfs.xfs") {
        vec![Filesystem::Ext4, Filesystem::Xfs]
    } else {
        eprintln!("{test}: xfs part skipped: mkfs.xfs is not installed (apt-get install xfsprogs)");
        vec![Filesystem::Ext4]
    }
}

/// Run a setup command (with a timeout); panic with its output on failure.
fn sh(args: &[&str]) -> String {
    let out = Proc::new("timeout").arg("60").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Temporary disks and directories; on drop (also after a panic) unmounts everything under the mount root and
/// detaches every loop device it attached.
struct Lab {
    dir: tempfile::TempDir,
    loops: Vec<String>,
    /// by-id name → (loop device, backing file)
    disks: Vec<(String, String, PathBuf)>,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        for d in ["by-id", "units", "state", "mnt", "img"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Lab {
            dir,
            loops: Vec::new(),
            disks: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn by_id(&self, name: &str) -> String {
        self.path(&format!("by-id/{name}")).to_string_lossy().into_owned()
    }

    fn mount_point(&self, name: &str) -> String {
        self.path(&format!("mnt/{name}")).to_string_lossy().into_owned()
    }

    /// A new empty disk under the by-id name `name` (replacing the link if it exists); returns the by-id path.
    fn disk(&mut self, name: &str) -> String {
        let n = self.disks.len();
        let img = self.path(&format!("img/{name}-{n}.img"));
        fs::File::create(&img).unwrap().set_len(DISK_MIB << 20).unwrap();
        let dev = sh(&["losetup", "--find", "--show", "--partscan", img.to_str().unwrap()]);
        self.loops.push(dev.clone());
        let link = self.by_id(name);
        let _ = fs::remove_file(&link);
        symlink(&dev, &link).unwrap();
        self.disks.retain(|(n, _, _)| n != name);
        self.disks.push((name.to_string(), dev.clone(), img));
        link
    }

    fn dev(&self, name: &str) -> String {
        self.disks.iter().find(|(n, _, _)| n == name).unwrap().1.clone()
    }

    /// sha256 of the whole backing file.
    fn sha(&self, name: &str) -> String {
        let img = &self.disks.iter().find(|(n, _, _)| n == name).unwrap().2;
        sh(&["sha256sum", img.to_str().unwrap()])
    }

    fn host(&self, runner: Arc<dyn Runner>) -> Host {
        let mut h = Host::new(runner, self.path("state"));
        h.unit_dir = self.path("units");
        h.systemd = false;
        h
    }

    /// A host whose runner records every command (and runs it).
    fn recording_host(&self) -> (Host, Arc<RecordingRunner>) {
        let rec = Arc::new(RecordingRunner::wrapping(Arc::new(SystemRunner)));
        (self.host(rec.clone()), rec)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let root = self.path("mnt").to_string_lossy().into_owned();
        let mut points: Vec<String> = read_mountinfo(Path::new("/proc/self/mountinfo"))
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|m| m.starts_with(&format!("{root}/")))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let ok = Proc::new("timeout")
                .args(["30", "umount", &p])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Proc::new("timeout").args(["30", "umount", "-l", &p]).status();
            }
        }
        for dev in self.loops.iter().rev() {
            let _ = Proc::new("timeout").args(["30", "losetup", "-d", dev]).status();
            // Partition nodes mknod'ed where devtmpfs/udev did not make them (devtmpfs removes its own).
            let leaf = dev.trim_start_matches("/dev/");
            if let Ok(rd) = fs::read_dir("/dev") {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with(&format!("{leaf}p")) && !Path::new("/sys/class/block").join(&n).exists() {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
    }
}

fn disk_ref(by_id: &str) -> DiskRef {
    DiskRef {
        by_id: by_id.to_string(),
        serial: None,
        wwn: None,
        size_bytes: DISK_MIB << 20,
        model: None,
    }
}

fn per_disk(name: &str, fs: Filesystem, disk: &str, mount_point: &str) -> Volume {
    Volume {
        name: name.to_string(),
        layout: Layout::PerDisk,
        disks: vec![disk_ref(disk)],
        filesystem: fs,
        mount_point: mount_point.to_string(),
        mount_options: vec!["noatime".into()],
        wipe: vec![],
    }
}

fn plan(volumes: Vec<Volume>) -> StoragePlan {
    StoragePlan { volumes }
}

fn mounted(mount_point: &str) -> Option<(String, String)> {
    read_mountinfo(Path::new("/proc/self/mountinfo"))
        .unwrap()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == mount_point)
        .map(|m| (m.fstype, m.source))
}

/// `blkid -p -o export` of a device as key/value pairs (empty when nothing is found).
fn blkid(dev: &str) -> Vec<(String, String)> {
    let out = Proc::new("timeout")
        .args(["30", "blkid", "-p", "-o", "export", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn partition_of(dev: &str) -> String {
    format!("{dev}p1")
}

/// Commands that may run when nothing needs doing.
fn assert_only_probes(rec: &RecordingRunner) {
    for c in rec.calls() {
        assert!(!c.mutating, "a mutating command ran: {c}");
        assert!(
            ["blkid", "vgs", "lvs", "mdadm"].contains(&c.program.as_str()),
            "unexpected command {c}"
        );
        if c.program == "mdadm" {
            assert_eq!(c.args.first().map(String::as_str), Some("--detail"), "{c}");
        }
    }
}

fn the_state(lab: &Lab) -> State {
    State::load(&lab.path("state")).unwrap()
}

fn fs_uuid_in_state(lab: &Lab, volume: &str) -> Option<String> {
    the_state(lab)
        .volumes
        .get(volume)
        .and_then(|v| v.disks.first())
        .and_then(|d| d.fs.as_ref())
        .map(|f| f.fs_uuid.clone())
}

fn ok_report(r: Result<Report, StorageError>) -> Report {
    let r = r.unwrap();
    assert!(r.problems().is_empty(), "{r:#?}");
    r
}

#[test]
fn empty_disk_is_prepared_and_mounted_and_a_second_apply_changes_nothing() {
    let Some(_serial) = gate("empty_disk_is_prepared_and_mounted") else {
        return;
    };
    for fs_kind in filesystems("empty_disk_is_prepared_and_mounted") {
        let mut lab = Lab::new();
        let disk = lab.disk("nvme-Instance_Storage_0");
        let mp = lab.mount_point("fastdata");
        let p = plan(vec![per_disk("fastdata", fs_kind, &disk, &mp)]);
        let (host, rec) = lab.recording_host();

        let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
        let v = &r.volumes[0];
        assert_eq!(v.state, VolumeState::Created);
        let dev = lab.dev("nvme-Instance_Storage_0");
        assert_eq!(v.device.as_deref(), Some(partition_of(&dev).as_str()));
        let uuid = v.fs_uuid.clone().unwrap();
        let programs: Vec<String> = r
            .commands
            .iter()
            .map(|c| c.split(' ').next().unwrap().to_string())
            .collect();
        assert_eq!(
            programs,
            [
                "sfdisk",
                "partx",
                &format!("mkfs.{}", fs_kind.as_str()),
                "mkdir",
                "mount"
            ],
            "{r:#?}"
        );

        // Mounted, from the partition, with the file system asked for.
        let (fstype, source) = mounted(&mp).expect("mounted");
        assert_eq!(fstype, fs_kind.as_str());
        assert_eq!(source, partition_of(&dev));
        // GPT partition named nimbus-<volume>, label cut to the file system's limit, the reported UUID.
        let info = blkid(&partition_of(&dev));
        assert_eq!(get(&info, "PART_ENTRY_NAME"), Some("nimbus-fastdata"));
        assert_eq!(get(&info, "UUID"), Some(uuid.as_str()));
        let label = match fs_kind {
            Filesystem::Xfs => "nimbus-fastd",
            Filesystem::Ext4 => "nimbus-fastdata",
        };
        assert_eq!(get(&info, "LABEL"), Some(label));

        // The unit, exactly, and its wants link.
        let unit = mount_unit_name(&mp);
        let text = fs::read_to_string(lab.path("units").join(&unit)).unwrap();
        assert_eq!(
            text,
            format!(
                "# Written by the polynimbus agent for storage volume fastdata; changes here are overwritten.\n\
                 [Unit]\n\
                 Description=polynimbus storage volume fastdata\n\n\
                 [Mount]\n\
                 What=/dev/disk/by-uuid/{uuid}\n\
                 Where={mp}\n\
                 Type={}\n\
                 Options=nofail,x-systemd.device-timeout=10s,noatime\n\n\
                 [Install]\n\
                 WantedBy=local-fs.target\n",
                fs_kind.as_str()
            )
        );
        assert!(
            fs::read_link(lab.path("units/local-fs.target.wants").join(&unit)).is_ok(),
            "wants link"
        );
        // The state file: 0600, and what we made.
        let state_path = State::path(&lab.path("state"));
        assert_eq!(fs::metadata(&state_path).unwrap().permissions().mode() & 0o777, 0o600);
        let st = the_state(&lab);
        let d = &st.volumes["fastdata"].disks[0];
        assert_eq!(d.by_id, disk);
        assert_eq!(d.fs.as_ref().unwrap().unit.as_deref(), Some(unit.as_str()));
        assert_eq!(get(&info, "PART_ENTRY_UUID").map(str::to_lowercase), d.partuuid.clone());

        // Second apply: nothing but read-only probes.
        rec.clear();
        let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
        assert_eq!(r.volumes[0].state, VolumeState::AlreadyReady);
        assert_eq!(r.volumes[0].fs_uuid.as_deref(), Some(uuid.as_str()));
        assert!(r.commands.is_empty() && r.files.is_empty(), "{r:#?}");
        assert_only_probes(&rec);
        assert!(!rec.calls().is_empty(), "the file system is checked");
    }
}

#[test]
fn disks_with_data_are_refused_and_left_byte_for_byte_untouched() {
    let Some(_serial) = gate("disks_with_data_are_refused") else {
        return;
    };
    let mut lab = Lab::new();
    let with_fs = lab.disk("ata-OLD_EXT4");
    let with_table = lab.disk("ata-OLD_GPT");
    sh(&["mkfs.ext4", "-q", "-L", "precious", &lab.dev("ata-OLD_EXT4")]);
    let out = Proc::new("sh")
        .args([
            "-c",
            &format!(
                "printf 'label: gpt\\n,10M\\n' | timeout 60 sfdisk --quiet {}",
                lab.dev("ata-OLD_GPT")
            ),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = (lab.sha("ata-OLD_EXT4"), lab.sha("ata-OLD_GPT"));

    let p = plan(vec![
        per_disk("a", Filesystem::Ext4, &with_fs, &lab.mount_point("a")),
        per_disk("b", Filesystem::Ext4, &with_table, &lab.mount_point("b")),
    ]);
    let (host, rec) = lab.recording_host();
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    let VolumeState::Refused(msg) = &r.volumes[0].state else {
        panic!("{r:#?}")
    };
    assert!(msg.contains("an ext4 file system (label \"precious\""), "{msg}");
    assert!(
        msg.contains(&with_fs) && msg.contains("no serial or WWN") && msg.contains("`wipe`"),
        "{msg}"
    );
    let VolumeState::Refused(msg) = &r.volumes[1].state else {
        panic!("{r:#?}")
    };
    assert!(msg.contains("a GPT partition table"), "{msg}");
    assert!(r.commands.is_empty() && r.files.is_empty(), "{r:#?}");
    assert!(rec.calls().is_empty(), "nothing ran: {:?}", rec.lines());
    assert_eq!((lab.sha("ata-OLD_EXT4"), lab.sha("ata-OLD_GPT")), before);
    assert!(!State::path(&lab.path("state")).exists());
    assert_eq!(fs::read_dir(lab.path("units")).unwrap().count(), 0);
}

#[test]
fn a_disk_in_the_wipe_list_is_wiped_once_and_then_kept() {
    let Some(_serial) = gate("a_disk_in_the_wipe_list_is_wiped") else {
        return;
    };
    let mut lab = Lab::new();
    let disk = lab.disk("ata-REUSED");
    let dev = lab.dev("ata-REUSED");
    sh(&["mkfs.ext4", "-q", "-L", "old", &dev]);
    let old_uuid = get(&blkid(&dev), "UUID").unwrap().to_string();
    let mut v = per_disk("reused", Filesystem::Ext4, &disk, &lab.mount_point("reused"));
    v.wipe = vec![disk.clone()];
    let p = plan(vec![v]);
    let (host, rec) = lab.recording_host();
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.commands[0], format!("wipefs -a {dev}"));
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    assert_ne!(r.volumes[0].fs_uuid.as_deref(), Some(old_uuid.as_str()));
    assert!(mounted(&lab.mount_point("reused")).is_some());

    // The wipe list stays in the plan; our own work is never wiped again.
    rec.clear();
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.volumes[0].state, VolumeState::AlreadyReady);
    assert_only_probes(&rec);
}

#[test]
fn a_failure_after_each_step_converges_on_the_next_apply() {
    let Some(_serial) = gate("a_failure_after_each_step_converges") else {
        return;
    };
    for step in [
        Step::Partitioned,
        Step::FilesystemMade,
        Step::UnitWritten,
        Step::Mounted,
    ] {
        let mut lab = Lab::new();
        let disk = lab.disk("nvme-Instance_Storage_1");
        let mp = lab.mount_point("fast");
        let p = plan(vec![per_disk("fast", Filesystem::Ext4, &disk, &mp)]);
        let (host, rec) = lab.recording_host();
        let fail = ApplyOptions {
            dry_run: false,
            fail_after: Some(step),
        };
        let err = apply(&host, &p, &fail).unwrap_err();
        assert!(matches!(err, StorageError::Injected(s) if s == step), "{step:?}: {err}");
        let uuid_at_failure = fs_uuid_in_state(&lab, "fast");
        assert_eq!(uuid_at_failure.is_some(), step != Step::Partitioned, "{step:?}");

        let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
        let expected = if step == Step::Mounted {
            VolumeState::AlreadyReady
        } else {
            VolumeState::Created
        };
        assert_eq!(r.volumes[0].state, expected, "{step:?}: {r:#?}");
        assert!(
            !r.commands
                .iter()
                .any(|c| c.starts_with("sfdisk") || c.starts_with("wipefs")),
            "{step:?}: our own work is not redone: {:?}",
            r.commands
        );
        let mkfs = r.commands.iter().any(|c| c.starts_with("mkfs"));
        assert_eq!(
            mkfs,
            step == Step::Partitioned,
            "{step:?}: mkfs only if it had not run: {:?}",
            r.commands
        );
        let uuid = r.volumes[0].fs_uuid.clone().unwrap();
        if let Some(u) = uuid_at_failure {
            assert_eq!(u, uuid, "{step:?}: no re-format");
        }
        assert_eq!(
            get(&blkid(&partition_of(&lab.dev("nvme-Instance_Storage_1"))), "UUID"),
            Some(uuid.as_str())
        );
        assert!(mounted(&mp).is_some(), "{step:?}");
        assert!(lab.path("units").join(mount_unit_name(&mp)).exists());

        rec.clear();
        let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
        assert_eq!(r.volumes[0].state, VolumeState::AlreadyReady, "{step:?}");
        assert_only_probes(&rec);
    }
}

#[test]
fn instance_store_that_comes_back_empty_is_prepared_again() {
    let Some(_serial) = gate("instance_store_that_comes_back_empty") else {
        return;
    };
    let mut lab = Lab::new();
    let disk = lab.disk("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1");
    let mp = lab.mount_point("scratch");
    let host = lab.host(Arc::new(SystemRunner));
    let p = plan(vec![per_disk("scratch", Filesystem::Ext4, &disk, &mp)]);
    let first = ok_report(apply(&host, &p, &ApplyOptions::default())).volumes[0]
        .fs_uuid
        .clone()
        .unwrap();
    let unit_path = lab.path("units").join(mount_unit_name(&mp));

    // 1. Same device, contents gone (zeroed through the device, as a fresh instance store reads).
    sh(&["umount", &mp]);
    let dev = lab.dev("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1");
    sh(&[
        "dd",
        "if=/dev/zero",
        &format!("of={dev}"),
        "bs=1M",
        "count=8",
        "oflag=direct",
        "status=none",
    ]);
    // The kernel still lists the old partition; drop its cached blocks so reads see the zeros.
    sh(&["blockdev", "--flushbufs", &partition_of(&dev)]);
    sh(&["blockdev", "--flushbufs", &dev]);
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    let second = r.volumes[0].fs_uuid.clone().unwrap();
    assert_ne!(second, first);
    assert!(
        fs::read_to_string(&unit_path)
            .unwrap()
            .contains(&format!("What=/dev/disk/by-uuid/{second}\n"))
    );
    assert_eq!(fs_uuid_in_state(&lab, "scratch").as_deref(), Some(second.as_str()));
    assert!(mounted(&mp).is_some());

    // 2. After a stop/start: another, empty device with a new serial, hence a new by-id name.
    sh(&["umount", &mp]);
    let new_disk = lab.disk("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS2");
    let p = plan(vec![per_disk("scratch", Filesystem::Ext4, &new_disk, &mp)]);
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    let third = r.volumes[0].fs_uuid.clone().unwrap();
    assert_ne!(third, second);
    let st = the_state(&lab);
    assert_eq!(st.volumes["scratch"].disks.len(), 1);
    assert_eq!(st.volumes["scratch"].disks[0].by_id, new_disk);
    assert!(
        fs::read_to_string(&unit_path)
            .unwrap()
            .contains(&format!("What=/dev/disk/by-uuid/{third}\n"))
    );
    let (_, source) = mounted(&mp).unwrap();
    assert_eq!(
        source,
        partition_of(&lab.dev("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS2"))
    );
}

#[test]
fn dry_run_on_an_empty_disk_lists_the_commands_and_changes_nothing() {
    let Some(_serial) = gate("dry_run_on_an_empty_disk") else {
        return;
    };
    let mut lab = Lab::new();
    let disk = lab.disk("nvme-dry");
    let mp = lab.mount_point("dry");
    let before = lab.sha("nvme-dry");
    let (host, rec) = lab.recording_host();
    let p = plan(vec![per_disk("dry", Filesystem::Ext4, &disk, &mp)]);
    let r = ok_report(apply(
        &host,
        &p,
        &ApplyOptions {
            dry_run: true,
            fail_after: None,
        },
    ));
    let dev = lab.dev("nvme-dry");
    assert!(
        r.commands[0].starts_with(&format!(
            "sfdisk --quiet --wipe always --wipe-partitions always {dev} <<'EOF'\nlabel: gpt\n"
        )),
        "{r:#?}"
    );
    assert!(r.commands[0].contains("name=\"nimbus-dry\"\nEOF"), "{}", r.commands[0]);
    assert_eq!(r.commands[1], format!("partx -u {dev}"));
    assert!(
        r.commands[2].starts_with("mkfs.ext4 -q -L nimbus-dry -U "),
        "{}",
        r.commands[2]
    );
    assert!(r.commands[2].ends_with(&format!(" {dev}p1")));
    assert_eq!(r.commands[3], format!("mkdir -p -m 0755 {mp}"));
    assert!(
        r.commands[4].starts_with("mount -t ext4 -o nofail,noatime UUID="),
        "{}",
        r.commands[4]
    );
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    for line in &r.commands {
        println!("{line}");
    }
    assert!(rec.calls().iter().all(|c| !c.mutating), "{:?}", rec.lines());
    assert_eq!(lab.sha("nvme-dry"), before);
    assert!(!State::path(&lab.path("state")).exists());
    assert_eq!(fs::read_dir(lab.path("units")).unwrap().count(), 0);
    assert!(!Path::new(&mp).exists());
    assert!(mounted(&mp).is_none());
}

#[test]
fn remove_takes_down_only_what_this_agent_made() {
    let Some(_serial) = gate("remove_takes_down_only_what_this_agent_made") else {
        return;
    };
    let mut lab = Lab::new();
    let ours = lab.disk("nvme-ours");
    let _foreign = lab.disk("ata-FOREIGN");
    sh(&["mkfs.ext4", "-q", "-L", "foreign", &lab.dev("ata-FOREIGN")]);
    let foreign_sha = lab.sha("ata-FOREIGN");
    let mp = lab.mount_point("gone");
    let host = lab.host(Arc::new(SystemRunner));
    let p = plan(vec![per_disk("gone", Filesystem::Ext4, &ours, &mp)]);
    ok_report(apply(&host, &p, &ApplyOptions::default()));
    let unit_path = lab.path("units").join(mount_unit_name(&mp));
    assert!(unit_path.exists());

    let dry = remove(&host, &RemoveOptions { dry_run: true }).unwrap();
    assert!(!dry.commands.is_empty());
    assert!(
        mounted(&mp).is_some() && unit_path.exists(),
        "a dry run changes nothing"
    );

    let dev = lab.dev("nvme-ours");
    let r = remove(&host, &RemoveOptions::default()).unwrap();
    assert_eq!(r.volumes.len(), 1);
    assert_eq!(r.volumes[0].state, VolumeState::Removed, "{r:#?}");
    assert_eq!(
        r.commands,
        [
            format!("umount {mp}"),
            format!("wipefs -a {dev}p1"),
            format!("partx -d {dev}"),
            format!("wipefs -a {dev}"),
        ]
    );
    assert_eq!(r.commands, dry.commands, "the dry run listed exactly these");
    assert!(mounted(&mp).is_none());
    assert!(!unit_path.exists());
    assert!(
        !lab.path("units/local-fs.target.wants")
            .join(mount_unit_name(&mp))
            .exists()
    );
    assert!(blkid(&dev).is_empty(), "our disk is blank: {:?}", blkid(&dev));
    assert!(the_state(&lab).volumes.is_empty());
    assert_eq!(lab.sha("ata-FOREIGN"), foreign_sha);

    // Nothing left to remove.
    let r = remove(&host, &RemoveOptions::default()).unwrap();
    assert!(r.volumes.is_empty() && r.commands.is_empty() && r.files.is_empty());

    // The disk is usable again.
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.volumes[0].state, VolumeState::Created);
}

#[test]
fn the_root_disk_is_refused() {
    let Some(_serial) = gate("the_root_disk_is_refused") else {
        return;
    };
    let mi = read_mountinfo(Path::new("/proc/self/mountinfo")).unwrap();
    let Some(root) = mi.iter().rev().find(|m| m.mount_point == "/") else {
        return;
    };
    let Some(name) = storage::probe::name_of_dev(Path::new("/sys"), root.dev) else {
        eprintln!(
            "skipped the_root_disk_is_refused: / is not on a block device here ({})",
            root.source
        );
        return;
    };
    // The whole disk the root file system is on (its parent when it is a partition).
    let sys = fs::canonicalize(Path::new("/sys/class/block").join(&name)).unwrap();
    let disk = if sys.join("partition").exists() {
        sys.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    } else {
        name
    };
    if !sys
        .join("slaves")
        .read_dir()
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        eprintln!("skipped the_root_disk_is_refused: / is on dm/md ({disk}); the fake-sysfs unit test covers it");
        return;
    }
    let lab = Lab::new();
    let link = lab.by_id("root-disk");
    symlink(format!("/dev/{disk}"), &link).unwrap();
    let (host, rec) = lab.recording_host();
    let mut v = per_disk("root", Filesystem::Ext4, &link, &lab.mount_point("root"));
    v.wipe = vec![link.clone()];
    // A dry run, so that even a bug here could not write to the root disk.
    let r = apply(
        &host,
        &plan(vec![v]),
        &ApplyOptions {
            dry_run: true,
            fail_after: None,
        },
    )
    .unwrap();
    assert!(
        matches!(&r.volumes[0].state, VolumeState::Refused(m) if m.contains("root file system")),
        "{r:#?}"
    );
    assert!(r.commands.is_empty() && rec.calls().is_empty());
}

#[test]
fn lvm_and_raid0_on_real_devices_where_the_kernel_can() {
    let Some(_serial) = gate("lvm_and_raid0_on_real_devices") else {
        return;
    };
    let k = KernelSupport::detect();
    if !k.device_mapper {
        println!("skipped: kernel has no device-mapper (LVM layout)");
        eprintln!("skipped: kernel has no device-mapper (LVM layout)");
    } else if !have("pvcreate") {
        eprintln!("skipped: kernel has device-mapper but lvm2 is not installed (apt-get install lvm2)");
    } else {
        let mut lab = Lab::new();
        let (a, b) = (lab.disk("lvm-a"), lab.disk("lvm-b"));
        let mp = lab.mount_point("lvm");
        let vg = format!("nimbus-test-{}", std::process::id());
        let p = plan(vec![Volume {
            name: "lvm".into(),
            layout: Layout::Lvm {
                vg: vg.clone(),
                lv: "data".into(),
                filesystem_on_lv: true,
            },
            disks: vec![disk_ref(&a), disk_ref(&b)],
            filesystem: Filesystem::Ext4,
            mount_point: mp.clone(),
            mount_options: vec![],
            wipe: vec![],
        }]);
        let (host, rec) = lab.recording_host();
        created_idempotent_removed(&host, &rec, &p, &mp, || {
            let _ = Proc::new("timeout").args(["30", "umount", &mp]).status();
            let _ = Proc::new("timeout").args(["60", "vgremove", "-y", &vg]).status();
        });
    }
    if !k.md {
        println!("skipped: kernel has no md (RAID0 layout)");
        eprintln!("skipped: kernel has no md (RAID0 layout)");
    } else if !have("mdadm") {
        eprintln!("skipped: kernel has md but mdadm is not installed (apt-get install mdadm)");
    } else {
        let mut lab = Lab::new();
        let (a, b) = (lab.disk("md-a"), lab.disk("md-b"));
        let mp = lab.mount_point("md");
        let name = format!("nimbus-test-{}", std::process::id());
        let p = plan(vec![Volume {
            name: "md".into(),
            layout: Layout::Raid0 { name: name.clone() },
            disks: vec![disk_ref(&a), disk_ref(&b)],
            filesystem: Filesystem::Ext4,
            mount_point: mp.clone(),
            mount_options: vec![],
            wipe: vec![],
        }]);
        let (host, rec) = lab.recording_host();
        created_idempotent_removed(&host, &rec, &p, &mp, || {
            let _ = Proc::new("timeout").args(["30", "umount", &mp]).status();
            let _ = Proc::new("timeout")
                .args(["60", "mdadm", "--stop", &format!("/dev/md/{name}")])
                .status();
        });
    }
}

/// Applies `p`: created and mounted at `mp`; applied again: nothing but probes run; removed. `cleanup` undoes
/// what the layout leaves in the kernel (also when an assertion fails first).
fn created_idempotent_removed(host: &Host, rec: &RecordingRunner, p: &StoragePlan, mp: &str, cleanup: impl Fn()) {
    let r = match apply(host, p, &ApplyOptions::default()) {
        Ok(r) if r.problems().is_empty() => r,
        other => {
            cleanup();
            panic!("{other:#?}");
        }
    };
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    assert!(mounted(mp).is_some());
    rec.clear();
    let again = apply(host, p, &ApplyOptions::default()).unwrap();
    assert_eq!(again.volumes[0].state, VolumeState::AlreadyReady, "{again:#?}");
    assert_only_probes(rec);
    let removed = remove(host, &RemoveOptions::default()).unwrap();
    assert_eq!(removed.volumes[0].state, VolumeState::Removed, "{removed:#?}");
    cleanup();
}

#[test]
fn missing_or_stale_partition_nodes_are_made_from_sysfs() {
    let Some(_serial) = gate("missing_or_stale_partition_nodes") else {
        return;
    };
    let mut lab = Lab::new();
    let disk = lab.disk("nvme-nodes");
    let mp = lab.mount_point("nodes");
    let host = lab.host(Arc::new(SystemRunner));
    let p = plan(vec![per_disk("nodes", Filesystem::Ext4, &disk, &mp)]);
    let uuid = ok_report(apply(&host, &p, &ApplyOptions::default())).volumes[0]
        .fs_uuid
        .clone()
        .unwrap();
    let part = partition_of(&lab.dev("nvme-nodes"));
    let leaf = part.trim_start_matches("/dev/");
    let want = fs::read_to_string(format!("/sys/class/block/{leaf}/dev"))
        .unwrap()
        .trim()
        .to_string();
    let (major, minor) = want.split_once(':').unwrap();
    let rdev = || {
        use std::os::unix::fs::MetadataExt;
        let r = fs::metadata(&part).unwrap().rdev();
        format!("{}:{}", nix::sys::stat::major(r), nix::sys::stat::minor(r))
    };

    // No node (as where neither udev nor devtmpfs makes one): made with mknod from sysfs.
    fs::remove_file(&part).unwrap();
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.files, [format!("mknod {part} b {major} {minor}")], "{r:#?}");
    assert!(r.commands.is_empty(), "{r:#?}");
    assert_eq!(rdev(), want);
    assert_eq!(r.volumes[0].fs_uuid.as_deref(), Some(uuid.as_str()));

    // A stale node naming another device: replaced before anything reads through it.
    fs::remove_file(&part).unwrap();
    sh(&["mknod", "-m", "0600", &part, "b", "7", "250"]);
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(
        r.files,
        [format!("mknod {part} b {major} {minor} (replacing a stale node)")],
        "{r:#?}"
    );
    assert_eq!(rdev(), want);
    let r = ok_report(apply(&host, &p, &ApplyOptions::default()));
    assert_eq!(r.volumes[0].state, VolumeState::AlreadyReady);
}
