//! Exact command sequences of `apply` / `remove` against a fake host: device "nodes" are regular files in a
//! temporary directory, sysfs and mountinfo are fake, and a [`RecordingRunner`] answers the commands. The LVM
//! and RAID0 layouts can only be checked this way on kernels without device-mapper / md.

use std::fs;
use std::os::unix::fs::{FileExt, symlink};
use std::path::PathBuf;
use std::sync::Arc;

use crate::runner::Output;
use crate::{
    ApplyOptions, DiskRef, Filesystem, Host, Ids, KernelSupport, Layout, RecordingRunner, RemoveOptions, State,
    StorageError, StoragePlan, Volume, VolumeState, apply, remove, validate,
};

const MP: &str = "/var/lib/nimbus-test-never-created/volumes/fast";
const UNIT: &str = "var-lib-nimbus\\x2dtest\\x2dnever\\x2dcreated-volumes-fast.mount";

struct Fake {
    dir: tempfile::TempDir,
    runner: Arc<RecordingRunner>,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        for d in ["dev", "by-id", "sys/class/block", "units", "state"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let f = Fake {
            dir,
            runner: Arc::new(RecordingRunner::new()),
        };
        f.set_mounts("");
        fs::write(f.path("swaps"), "Filename Type Size Used Priority\n").unwrap();
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A whole disk `name` (`8:minor`, 1 GiB per sysfs) with a by-id link; returns the link.
    fn disk(&self, name: &str, minor: u32) -> String {
        let node = self.path(&format!("dev/{name}"));
        let f = fs::File::create(&node).unwrap();
        f.set_len(1 << 20).unwrap();
        let sys = self.path(&format!("sys/class/block/{name}"));
        fs::create_dir_all(sys.join("holders")).unwrap();
        fs::write(sys.join("dev"), format!("8:{minor}\n")).unwrap();
        fs::write(sys.join("size"), "2097152\n").unwrap();
        let link = self.path(&format!("by-id/test-{name}"));
        symlink(&node, &link).unwrap();
        link.to_string_lossy().into_owned()
    }

    fn node(&self, name: &str) -> String {
        self.path(&format!("dev/{name}")).to_string_lossy().into_owned()
    }

    fn write_at(&self, name: &str, offset: u64, bytes: &[u8]) {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(self.path(&format!("dev/{name}")))
            .unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    /// The root line plus `extra` mountinfo lines.
    fn set_mounts(&self, extra: &str) {
        fs::write(
            self.path("mountinfo"),
            format!("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n{extra}"),
        )
        .unwrap();
    }

    fn host(&self) -> Host {
        let mut h = Host::new(self.runner.clone(), self.path("state"));
        h.unit_dir = self.path("units");
        h.systemd = false;
        h.mountinfo = self.path("mountinfo");
        h.swaps = self.path("swaps");
        h.sys_dir = self.path("sys");
        h.dev_dir = Some(self.path("dev"));
        h.kernel = KernelSupport {
            device_mapper: true,
            md: true,
        };
        h.ids = Ids::sequential();
        h
    }

    fn lines(&self) -> Vec<String> {
        self.runner.lines()
    }
}

fn disk_ref(by_id: &str) -> DiskRef {
    DiskRef {
        by_id: by_id.to_string(),
        serial: None,
        wwn: None,
        size_bytes: 1 << 30,
        model: None,
    }
}

fn volume(layout: Layout, fs: Filesystem, disks: &[&str]) -> Volume {
    Volume {
        name: "fast".into(),
        layout,
        disks: disks.iter().map(|d| disk_ref(d)).collect(),
        filesystem: fs,
        mount_point: MP.into(),
        mount_options: vec!["noatime".into()],
        wipe: vec![],
    }
}

fn plan(v: Volume) -> StoragePlan {
    StoragePlan { volumes: vec![v] }
}

fn lvm_layout(filesystem_on_lv: bool) -> Layout {
    Layout::Lvm {
        vg: "nimbus-fast".into(),
        lv: "data".into(),
        filesystem_on_lv,
    }
}

const U1: &str = "00000000-0000-4000-8000-000000000001";
const U2: &str = "00000000-0000-4000-8000-000000000002";
const U3: &str = "00000000-0000-4000-8000-000000000003";

fn blkid_fs(fs: &str, uuid: &str) -> Output {
    Output::stdout(&format!("UUID={uuid}\nTYPE={fs}\nUSAGE=filesystem\n"))
}

/// An LVM2 label in sector 1 with PV id `uuid` (dashes removed, as LVM stores it).
fn lvm_label(uuid: &str) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    b[512..520].copy_from_slice(b"LABELONE");
    b[512 + 20..512 + 24].copy_from_slice(&32u32.to_le_bytes());
    b[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
    let id: String = uuid.chars().filter(|c| *c != '-').collect();
    b[512 + 32..512 + 64].copy_from_slice(id.as_bytes());
    b
}

/// An md v1.2 superblock (at 4096) with array UUID `uuid`.
fn md_superblock(uuid: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    let hex: String = uuid.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    for i in 0..16 {
        b[16 + i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    b
}

#[test]
fn lvm_fresh_exact_sequence_then_reapply_only_probes() {
    let f = Fake::new();
    let (a, b) = (f.disk("sdb", 16), f.disk("sdc", 32));
    let (na, nb) = (f.node("sdb"), f.node("sdc"));
    let host = f.host();
    let p = plan(volume(lvm_layout(true), Filesystem::Xfs, &[&a, &b]));
    f.runner
        .on("vgs", Output::fail(5, "  Volume group \"nimbus-fast\" not found"));
    f.runner.on("blkid", Output::fail(2, ""));
    f.runner
        .once("blkid -p -o export /dev/nimbus-fast/data", Output::fail(2, ""));
    f.runner
        .once("blkid -p -o export /dev/nimbus-fast/data", blkid_fs("xfs", U3));

    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    let pv1 = "000000-0000-0040-0080-0000-0000-000001";
    let pv2 = "000000-0000-0040-0080-0000-0000-000002";
    assert_eq!(
        f.lines(),
        [
            "vgs --noheadings -o vg_name nimbus-fast".to_string(),
            format!("pvcreate --uuid {pv1} --norestorefile {na}"),
            format!("pvcreate --uuid {pv2} --norestorefile {nb}"),
            format!("vgcreate nimbus-fast {na} {nb}"),
            "lvcreate --yes -l 100%FREE -n data nimbus-fast".to_string(),
            "blkid -p -o export /dev/nimbus-fast/data".to_string(),
            format!("mkfs.xfs -q -L nimbus-fast -m uuid={U3} /dev/nimbus-fast/data"),
            "blkid -p -o export /dev/nimbus-fast/data".to_string(),
            format!("mkdir -p -m 0755 {MP}"),
            format!("mount -t xfs -o nofail,noatime UUID={U3} {MP}"),
        ]
    );
    assert_eq!(r.commands.len(), 7, "probes are not in the report: {:#?}", r.commands);
    assert_eq!(r.volumes.len(), 1);
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    assert_eq!(r.volumes[0].device.as_deref(), Some("/dev/nimbus-fast/data"));
    assert_eq!(r.volumes[0].fs_uuid.as_deref(), Some(U3));
    let unit_path = f.path("units").join(UNIT);
    assert!(
        fs::read_to_string(&unit_path)
            .unwrap()
            .contains(&format!("What=/dev/disk/by-uuid/{U3}\n"))
    );
    assert_eq!(
        fs::read_link(f.path("units/local-fs.target.wants").join(UNIT)).unwrap(),
        unit_path
    );
    let state = State::load(&f.path("state")).unwrap();
    let rec = &state.volumes["fast"];
    assert_eq!(rec.disks[0].pv_uuid.as_deref(), Some(pv1));
    assert_eq!(rec.fs.as_ref().unwrap().fs_uuid, U3);
    assert_eq!(rec.fs.as_ref().unwrap().unit.as_deref(), Some(UNIT));

    // What the commands did, as the next apply sees it: PV labels, the VG and LV, the file system, the mount.
    f.write_at("sdb", 0, &lvm_label(pv1));
    f.write_at("sdc", 0, &lvm_label(pv2));
    f.set_mounts(&format!("90 27 253:0 / {MP} rw - xfs /dev/nimbus-fast/data rw\n"));
    f.runner.clear();
    f.runner.on(
        "vgs --noheadings -o vg_name nimbus-fast",
        Output::stdout("  nimbus-fast\n"),
    );
    f.runner.on(
        "lvs --noheadings -o lv_name nimbus-fast/data",
        Output::stdout("  data\n"),
    );
    f.runner
        .on("blkid -p -o export /dev/nimbus-fast/data", blkid_fs("xfs", U3));
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    assert_eq!(
        f.lines(),
        [
            "vgs --noheadings -o vg_name nimbus-fast",
            "lvs --noheadings -o lv_name nimbus-fast/data",
            "blkid -p -o export /dev/nimbus-fast/data",
        ]
    );
    assert!(r.commands.is_empty() && r.files.is_empty(), "{r:#?}");
    assert_eq!(r.volumes[0].state, VolumeState::AlreadyReady);

    // Decommission: unmount, unit gone, LV, VG, PVs removed; only those.
    f.runner.clear();
    let r = remove(&host, &RemoveOptions::default()).unwrap();
    assert_eq!(
        r.commands,
        [
            format!("umount {MP}"),
            "lvremove -y nimbus-fast/data".to_string(),
            "vgremove -y nimbus-fast".to_string(),
            format!("pvremove -y {na}"),
            format!("pvremove -y {nb}"),
        ]
    );
    assert_eq!(r.volumes[0].state, VolumeState::Removed);
    assert!(!unit_path.exists());
    assert!(State::load(&f.path("state")).unwrap().volumes.is_empty());
}

#[test]
fn lvm_without_filesystem_and_with_systemd() {
    let f = Fake::new();
    let a = f.disk("sdb", 16);
    let na = f.node("sdb");
    let host = f.host();
    f.runner.on("vgs", Output::fail(5, "not found"));
    let mut v = volume(lvm_layout(false), Filesystem::Xfs, &[&a]);
    v.mount_point = String::new();
    let r = apply(&host, &plan(v), &ApplyOptions::default()).unwrap();
    assert_eq!(
        f.lines(),
        [
            "vgs --noheadings -o vg_name nimbus-fast".to_string(),
            format!("pvcreate --uuid 000000-0000-0040-0080-0000-0000-000001 --norestorefile {na}"),
            format!("vgcreate nimbus-fast {na}"),
        ]
    );
    assert_eq!(r.volumes[0].device.as_deref(), Some("nimbus-fast"));
    assert_eq!(r.volumes[0].mount_point, None);

    // With systemd: daemon-reload after the unit is written, then enable --now.
    let f = Fake::new();
    let a = f.disk("sdb", 16);
    let mut host = f.host();
    host.systemd = true;
    f.runner.on("vgs", Output::fail(5, "not found"));
    f.runner.on("blkid", Output::fail(2, ""));
    f.runner.once("blkid", Output::fail(2, ""));
    f.runner.once("blkid", blkid_fs("ext4", U2));
    let r = apply(
        &host,
        &plan(volume(lvm_layout(true), Filesystem::Ext4, &[&a])),
        &ApplyOptions::default(),
    )
    .unwrap();
    let tail: Vec<String> = f.lines().into_iter().skip(5).collect();
    assert_eq!(
        tail,
        [
            format!("mkfs.ext4 -q -L nimbus-fast -U {U2} /dev/nimbus-fast/data"),
            "blkid -p -o export /dev/nimbus-fast/data".to_string(),
            "systemctl daemon-reload".to_string(),
            format!("mkdir -p -m 0755 {MP}"),
            format!("systemctl enable --now '{UNIT}'"),
        ]
    );
    assert_eq!(r.files, [format!("write {}", f.path("units").join(UNIT).display())]);
}

#[test]
fn raid0_fresh_exact_sequence_then_reapply_only_probes() {
    let f = Fake::new();
    let (a, b) = (f.disk("nvme1n1", 16), f.disk("nvme2n1", 32));
    let (na, nb) = (f.node("nvme1n1"), f.node("nvme2n1"));
    let host = f.host();
    let p = plan(volume(
        Layout::Raid0 { name: "fast".into() },
        Filesystem::Ext4,
        &[&a, &b],
    ));
    f.runner.on(
        "mdadm --detail",
        Output::fail(1, "mdadm: cannot open /dev/md/fast: No such file or directory"),
    );
    f.runner.once("blkid", Output::fail(2, ""));
    f.runner.once("blkid", blkid_fs("ext4", U2));
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    assert_eq!(
        f.lines(),
        [
            "mdadm --detail /dev/md/fast".to_string(),
            format!(
                "mdadm --create /dev/md/fast --level=0 --raid-devices=2 {na} {nb} --run --metadata=1.2 \
                 --uuid=00000000:00004000:80000000:00000001"
            ),
            "blkid -p -o export /dev/md/fast".to_string(),
            format!("mkfs.ext4 -q -L nimbus-fast -U {U2} /dev/md/fast"),
            "blkid -p -o export /dev/md/fast".to_string(),
            format!("mkdir -p -m 0755 {MP}"),
            format!("mount -t ext4 -o nofail,noatime UUID={U2} {MP}"),
        ]
    );
    assert_eq!(r.volumes[0].state, VolumeState::Created);
    assert_eq!(
        State::load(&f.path("state")).unwrap().volumes["fast"]
            .array_uuid
            .as_deref(),
        Some(U1)
    );

    // The next apply: members carry our array UUID, the array runs, the file system is ours and mounted.
    f.write_at("nvme1n1", 4096, &md_superblock(U1));
    f.write_at("nvme2n1", 4096, &md_superblock(U1));
    f.set_mounts(&format!("90 27 9:127 / {MP} rw - ext4 /dev/md/fast rw\n"));
    f.runner.clear();
    f.runner.on(
        "mdadm --detail /dev/md/fast",
        Output::stdout(
            "/dev/md/fast:\n           Version : 1.2\n              UUID : 00000000:00004000:80000000:00000001\n",
        ),
    );
    f.runner.on("blkid -p -o export /dev/md/fast", blkid_fs("ext4", U2));
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    assert_eq!(
        f.lines(),
        ["mdadm --detail /dev/md/fast", "blkid -p -o export /dev/md/fast"]
    );
    assert!(r.commands.is_empty() && r.files.is_empty(), "{r:#?}");
    assert_eq!(r.volumes[0].state, VolumeState::AlreadyReady);

    // After a reboot the array is not assembled: assemble our members, nothing else.
    f.runner
        .on("mdadm --detail /dev/md/fast", Output::fail(1, "no such device"));
    f.runner.clear();
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    assert_eq!(
        r.commands,
        [format!(
            "mdadm --assemble /dev/md/fast --uuid=00000000:00004000:80000000:00000001 {na} {nb}"
        )]
    );

    // Decommission.
    f.runner.on(
        "mdadm --detail /dev/md/fast",
        Output::stdout("              UUID : 00000000:00004000:80000000:00000001\n"),
    );
    let r = remove(&host, &RemoveOptions::default()).unwrap();
    assert_eq!(
        r.commands,
        [
            format!("umount {MP}"),
            "wipefs -a /dev/md/fast".to_string(),
            "mdadm --stop /dev/md/fast".to_string(),
            format!("mdadm --zero-superblock {na}"),
            format!("mdadm --zero-superblock {nb}"),
        ]
    );
}

#[test]
fn raid0_with_a_foreign_running_array_is_a_conflict() {
    let f = Fake::new();
    let (a, b) = (f.disk("sdb", 16), f.disk("sdc", 32));
    f.runner.on(
        "mdadm --detail",
        Output::stdout("  UUID : 11111111:22222222:33333333:44444444\n"),
    );
    let r = apply(
        &f.host(),
        &plan(volume(
            Layout::Raid0 { name: "fast".into() },
            Filesystem::Xfs,
            &[&a, &b],
        )),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert!(
        matches!(&r.volumes[0].state, VolumeState::Failed(m) if m.contains("is running")),
        "{r:#?}"
    );
    assert!(r.commands.is_empty());
}

#[test]
fn refusals_name_the_signature_and_run_nothing() {
    let f = Fake::new();
    let (a, b) = (f.disk("sdb", 16), f.disk("sdc", 32));
    // An ext4 superblock on sdb.
    let mut sb = vec![0u8; 256];
    sb[56..58].copy_from_slice(&0xEF53u16.to_le_bytes());
    sb[0x60..0x64].copy_from_slice(&0x2c2u32.to_le_bytes());
    sb[104..120].copy_from_slice(&[0x11; 16]);
    sb[120..124].copy_from_slice(b"old\0");
    f.write_at("sdb", 1024, &sb);
    let host = f.host();
    let p = plan(volume(lvm_layout(true), Filesystem::Xfs, &[&a, &b]));
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    let VolumeState::Refused(msg) = &r.volumes[0].state else {
        panic!("{r:#?}")
    };
    assert!(msg.contains("an ext4 file system (label \"old\""), "{msg}");
    assert!(
        msg.contains(&a) && msg.contains("no serial or WWN") && msg.contains("`wipe`"),
        "{msg}"
    );
    assert!(f.lines().is_empty(), "a refused volume runs nothing: {:?}", f.lines());
    assert!(!State::path(&f.path("state")).exists());

    // Listed in `wipe` by its by-id path: wiped first, then prepared.
    let mut v = volume(lvm_layout(false), Filesystem::Xfs, &[&a, &b]);
    v.wipe = vec![a.clone()];
    f.runner.on("vgs", Output::fail(5, "not found"));
    let r = apply(&host, &plan(v.clone()), &ApplyOptions::default()).unwrap();
    assert_eq!(r.commands[0], format!("wipefs -a {}", f.node("sdb")));
    assert!(r.commands[1].starts_with("pvcreate"), "{:?}", r.commands);

    // Mounted (or the root disk): never wiped, even when listed.
    let f = Fake::new();
    let a = f.disk("sdb", 16);
    f.write_at("sdb", 1024, &sb);
    f.set_mounts("80 27 8:16 / /srv/old rw - ext4 /dev/sdb rw\n");
    let mut v = volume(Layout::PerDisk, Filesystem::Xfs, &[&a]);
    v.wipe = vec![a.clone()];
    let r = apply(&f.host(), &plan(v.clone()), &ApplyOptions::default()).unwrap();
    assert!(
        matches!(&r.volumes[0].state, VolumeState::Refused(m) if m.contains("it is mounted (sdb at /srv/old)")),
        "{r:#?}"
    );
    f.set_mounts("");
    fs::write(f.path("mountinfo"), "27 1 8:16 / / rw - ext4 /dev/sdb rw\n").unwrap();
    let r = apply(&f.host(), &plan(v), &ApplyOptions::default()).unwrap();
    assert!(
        matches!(&r.volumes[0].state, VolumeState::Refused(m) if m.contains("root file system")),
        "{r:#?}"
    );
    assert!(f.lines().is_empty());
}

#[test]
fn per_disk_dry_run_lists_everything_and_writes_nothing() {
    let f = Fake::new();
    let (a, b) = (f.disk("nvme1n1", 16), f.disk("sdc", 32));
    let host = f.host();
    let p = plan(volume(Layout::PerDisk, Filesystem::Xfs, &[&a, &b]));
    let r = apply(
        &host,
        &p,
        &ApplyOptions {
            dry_run: true,
            fail_after: None,
        },
    )
    .unwrap();
    assert!(f.lines().is_empty(), "nothing runs for empty disks: {:?}", f.lines());
    let n1 = f.node("nvme1n1");
    let sfdisk = |node: &str, g: &str, p: &str| {
        format!(
            "sfdisk --quiet --wipe always --wipe-partitions always {node} <<'EOF'\nlabel: gpt\nlabel-id: {g}\n\
             type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid={p}, name=\"nimbus-fast\"\nEOF"
        )
    };
    assert_eq!(
        r.commands[..5],
        [
            sfdisk(&n1, U1, U2),
            format!("partx -u {n1}"),
            format!("mkfs.xfs -q -L nimbus-fast -m uuid={U3} {n1}p1"),
            format!("mkdir -p -m 0755 {MP}/0"),
            format!("mount -t xfs -o nofail,noatime UUID={U3} {MP}/0"),
        ]
    );
    assert_eq!(
        r.commands[7],
        format!(
            "mkfs.xfs -q -L nimbus-fast -m uuid=00000000-0000-4000-8000-000000000006 {}1",
            f.node("sdc")
        )
    );
    assert_eq!(r.volumes.len(), 2);
    assert_eq!(r.volumes[1].mount_point.as_deref(), Some(&*format!("{MP}/1")));
    assert!(r.volumes.iter().all(|v| v.state == VolumeState::Created));
    assert_eq!(r.files.len(), 4, "{:?}", r.files);
    assert_eq!(fs::read_dir(f.path("units")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(f.path("state")).unwrap().count(), 0);
}

#[test]
fn kernel_without_device_mapper_or_md_is_an_error_before_anything_runs() {
    let f = Fake::new();
    let a = f.disk("sdb", 16);
    let mut host = f.host();
    host.kernel = KernelSupport {
        device_mapper: false,
        md: false,
    };
    let err = apply(
        &host,
        &plan(volume(lvm_layout(true), Filesystem::Xfs, &[&a])),
        &ApplyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, StorageError::KernelLacks { .. }));
    assert!(err.to_string().contains("device-mapper"), "{err}");
    let err = apply(
        &host,
        &plan(volume(Layout::Raid0 { name: "fast".into() }, Filesystem::Xfs, &[&a])),
        &ApplyOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("md (software RAID)"), "{err}");
    assert!(f.lines().is_empty());
}

#[test]
fn validation_rejects_unsafe_plans() {
    let ok = volume(Layout::PerDisk, Filesystem::Xfs, &["/dev/disk/by-id/a"]);
    validate(&plan(ok.clone())).unwrap();
    let cases: Vec<(Volume, &str)> = vec![
        (
            Volume {
                name: "Fast".into(),
                ..ok.clone()
            },
            "volume name",
        ),
        (
            Volume {
                mount_point: "/etc/x".into(),
                ..ok.clone()
            },
            "system directory",
        ),
        (
            Volume {
                mount_point: "/var".into(),
                ..ok.clone()
            },
            "system directory",
        ),
        (
            Volume {
                mount_point: "/data/../etc".into(),
                ..ok.clone()
            },
            "normalized",
        ),
        (
            Volume {
                mount_point: "/data/".into(),
                ..ok.clone()
            },
            "end with",
        ),
        (
            Volume {
                mount_point: "data".into(),
                ..ok.clone()
            },
            "absolute",
        ),
        (
            Volume {
                mount_point: "/data\n[Service]".into(),
                ..ok.clone()
            },
            "whitespace",
        ),
        (
            Volume {
                mount_options: vec!["ro,exec".into()],
                ..ok.clone()
            },
            "mount option",
        ),
        (
            Volume {
                mount_options: vec!["x\nWhat=/dev/sda".into()],
                ..ok.clone()
            },
            "mount option",
        ),
        (
            Volume {
                disks: vec![],
                ..ok.clone()
            },
            "no disks",
        ),
        (
            Volume {
                layout: Layout::Lvm {
                    vg: "-bad".into(),
                    lv: "data".into(),
                    filesystem_on_lv: true,
                },
                ..ok.clone()
            },
            "VG",
        ),
        (
            Volume {
                layout: Layout::Raid0 { name: "a b".into() },
                ..ok.clone()
            },
            "array name",
        ),
    ];
    for (v, want) in cases {
        let err = validate(&plan(v.clone())).unwrap_err().to_string();
        assert!(err.contains(want), "{v:?}: {err}");
    }
    let twice = StoragePlan {
        volumes: vec![
            ok.clone(),
            Volume {
                name: "other".into(),
                mount_point: "/data2".into(),
                ..ok.clone()
            },
        ],
    };
    assert!(
        validate(&twice)
            .unwrap_err()
            .to_string()
            .contains("more than one volume")
    );
}

#[test]
fn report_serializes_with_tagged_states() {
    let r = crate::Report {
        commands: vec!["wipefs -a /dev/sdb".into()],
        files: vec![],
        volumes: vec![crate::VolumeReport {
            name: "fast".into(),
            state: VolumeState::Refused("it carries data".into()),
            device: None,
            fs_uuid: None,
            mount_point: Some(MP.into()),
            disks: vec!["/dev/disk/by-id/x".into()],
        }],
    };
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["volumes"][0]["state"],
        serde_json::json!({"state": "refused", "reason": "it carries data"})
    );
    assert_eq!(
        serde_json::to_value(VolumeState::AlreadyReady).unwrap(),
        serde_json::json!({"state": "already_ready"})
    );
    assert_eq!(serde_json::from_value::<crate::Report>(json).unwrap(), r);
}

#[test]
fn empty_plan_and_missing_disk() {
    let f = Fake::new();
    let host = f.host();
    let r = apply(&host, &StoragePlan::default(), &ApplyOptions::default()).unwrap();
    assert!(r.volumes.is_empty() && r.commands.is_empty());
    let missing = f.path("by-id/gone");
    let p = plan(volume(Layout::PerDisk, Filesystem::Ext4, &[missing.to_str().unwrap()]));
    let r = apply(&host, &p, &ApplyOptions::default()).unwrap();
    assert!(
        matches!(&r.volumes[0].state, VolumeState::Failed(m) if m.contains("cannot resolve")),
        "{r:#?}"
    );
}
