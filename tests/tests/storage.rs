//! End-to-end: local storage. Two loop devices stand in for a node's disks (with `/dev/disk/by-id/` links, as
//! udev would make them): one empty, one carrying an ext4 file system. A policy with two storage profiles plans
//! one volume on each; the agent prepares the empty disk (GPT, ext4, a .mount unit, mounted by UUID with nofail)
//! and refuses the one with data, which stays byte-for-byte untouched, until the policy's `wipe` names it;
//! decommission removes exactly what the agent created. Needs root, loop devices and e2fsprogs.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use e2e::blockdev::LoopDisk;
use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, eventually_patiently, require_root};
use sha2::{Digest, Sha256};

const HASH: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn policy(tag: &str, mount_root: &Path, wipe: &str) -> String {
    let root = mount_root.display();
    format!(
        "version: 1\nenvironments:\n  - name: production\n    match: {{ labels: {{ env: prod }} }}\n    kubernetes:\n      \
         api_endpoint: \"10.0.0.10:6443\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ token_command: [/bin/false] }}\n\
         pools:\n  - name: db\n    match: {{ labels: {{ tier: db }} }}\n    storage:\n      - name: fast\n        \
         disks: {{ class: [logical], by_id: \"{tag}-empty\" }}\n        filesystem: ext4\n        mount_point: {root}/fast\n        \
         mount_options: [noatime]\n        labels: {{ \"polynimbus.io/storage\": fast }}\n      - name: data\n        \
         disks: {{ class: [logical], by_id: \"{tag}-full\" }}\n        filesystem: ext4\n        mount_point: {root}/data\n        \
         wipe: [{wipe}]\n"
    )
}

/// Removes the mount points' parent directory (created by the agent on the real root) when the test ends, even
/// when it panics; the mounts themselves die with the agent's mount namespace.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn storage_of(fleet: &Fleet) -> Vec<(String, String, String)> {
    let n = fleet.ctl_json(&["node", "show", "agent-1"]);
    n["storage"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .map(|v| {
                    (
                        str_field(v, "name").to_string(),
                        str_field(v, "state").to_string(),
                        str_field(v, "detail").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn state_of(fleet: &Fleet, volume: &str) -> Option<(String, String)> {
    storage_of(fleet)
        .into_iter()
        .find(|(n, _, _)| n == volume)
        .map(|(_, s, d)| (s, d))
}

#[test]
fn the_agent_prepares_empty_disks_refuses_disks_with_data_and_decommission_removes_its_own() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let work = fleet.work_dir().to_path_buf();
    let tag = format!("nimbus-e2e-{}", std::process::id());
    let empty = LoopDisk::create(&work, "empty", 64, &format!("{tag}-empty")).unwrap();
    let full = LoopDisk::create(&work, "full", 64, &format!("{tag}-full")).unwrap();
    full.format_ext4().unwrap();
    let before = sha(full.file());
    let mount_root = Path::new("/var/lib").join(&tag);
    let _cleanup = RemoveDir(mount_root.clone());
    let units = work.join("units");
    std::fs::create_dir_all(&units).unwrap();

    let token = fleet.create_labelled_token("1h", 1, "env=prod,tier=db");
    let unit_dir = units.display().to_string();
    fleet.start_agent(
        1,
        Some(&token),
        &["--storage-unit-dir", &unit_dir, "--drift-check-interval", "2s"],
    );
    fleet.wait_connected(&[agent_name(1)]);
    // The agent's inventory sees both disks under their stable names.
    eventually_patiently(|| {
        let n = fleet.ctl_json(&["node", "show", "agent-1"]);
        let doc = n["hardware"]["disks"].to_string();
        if doc.contains(&format!("{tag}-empty")) && doc.contains(&format!("{tag}-full")) {
            Ok(())
        } else {
            Err("by-id links not in the inventory yet".to_string())
        }
    });

    let file = work.join("policy.yaml");
    std::fs::write(&file, policy(&tag, &mount_root, "")).unwrap();
    let out = fleet.ctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The plan names both disks by their by-id path.
    let plan = fleet.ctl_json(&["storage", "plan", "agent-1"]);
    let disks: Vec<String> = plan["plan"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| str_field(&v["disks"][0], "by_id").to_string())
        .collect();
    assert_eq!(
        disks,
        [
            format!("/dev/disk/by-id/{tag}-empty"),
            format!("/dev/disk/by-id/{tag}-full")
        ]
    );

    // The empty disk is prepared; the one with data is refused, naming what it found, and left untouched.
    let (state, _) = eventually_patiently(|| match state_of(&fleet, "fast") {
        Some((s, d)) if s == "created" || s == "ready" => Ok((s, d)),
        other => Err(format!("fast: {other:?}")),
    });
    assert!(state == "created" || state == "ready");
    let (state, detail) = eventually_patiently(|| match state_of(&fleet, "data") {
        Some(x) if x.0 == "refused" => Ok(x),
        other => Err(format!("data: {other:?}")),
    });
    assert_eq!(state, "refused");
    assert!(detail.contains("ext4"), "{detail}");
    let node = fleet.ctl_json(&["node", "show", "agent-1"]);
    assert!(
        str_field(&node, "convergence").contains("storage data refused"),
        "{}",
        node["convergence"]
    );
    assert_eq!(sha(full.file()), before, "a disk with data is never written");

    // The operator's dry run on the node (in the agent's mount namespace): nothing to do for `fast`, and why
    // `data` would not be prepared.
    let pid = fleet.agent(1).pid();
    let state_dir = fleet.agent_state_dir(1).display().to_string();
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-m", "--"])
        .arg(&fleet.bins().agent)
        .args([
            "--storage-dry-run",
            "--state-dir",
            &state_dir,
            "--storage-unit-dir",
            &unit_dir,
        ])
        .output()
        .unwrap();
    let dry = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{dry}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !dry.contains("sfdisk") && !dry.contains("mkfs"),
        "fast is in place: {dry}"
    );
    assert!(dry.contains("# volume data refused:") && dry.contains("ext4"), "{dry}");
    assert_eq!(sha(full.file()), before, "a dry run changes nothing");

    // Mounted in the agent's mount namespace, by UUID, from a .mount unit with nofail.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let fast = mount_root.join("fast").display().to_string();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.contains(&format!(" {fast} ")) && l.contains(" ext4 ")),
        "{fast} not mounted:\n{mountinfo}"
    );
    let unit_files: Vec<String> = std::fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".mount"))
        .collect();
    assert_eq!(unit_files.len(), 1, "{unit_files:?}");
    let unit = std::fs::read_to_string(units.join(&unit_files[0])).unwrap();
    assert!(
        unit.contains("What=/dev/disk/by-uuid/") && unit.contains("nofail"),
        "{unit}"
    );
    assert_eq!(
        fleet.node("agent-1").unwrap()["placement"]["labels"]["polynimbus.io/storage"],
        "fast"
    );

    // The operator names the disk in `wipe`: now it is prepared too.
    std::fs::write(&file, policy(&tag, &mount_root, &format!("/dev/disk/by-id/{tag}-full"))).unwrap();
    let out = fleet.ctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually_patiently(|| match state_of(&fleet, "data") {
        Some((s, _)) if s == "created" || s == "ready" => Ok(()),
        other => Err(format!("data: {other:?}")),
    });
    assert_ne!(sha(full.file()), before, "wiped and prepared as allowed");
    assert_eq!(
        str_field(&fleet.ctl_json(&["node", "show", "agent-1"]), "convergence"),
        "converged"
    );

    // Decommission removes exactly what the agent created.
    let out = fleet.ctl(&["node", "decommission", "agent-1", "--no-drain"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("storage this project created removed"), "{text}");
    let left: Vec<_> = std::fs::read_dir(&units)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".mount"))
        .collect();
    assert!(left.is_empty(), "units removed: {left:?}");
    let wants = units.join("local-fs.target.wants");
    assert!(
        std::fs::read_dir(&wants).map_or(true, |mut d| d.next().is_none()),
        "wants links removed"
    );
    for d in [&empty, &full] {
        let sig = inventory::probe_signature(d.device(), None).unwrap();
        assert_eq!(sig, None, "{} wiped", d.device().display());
    }
    fleet.expect_agent_exit(1, 10, "revoked");
}
