//! End-to-end: agents in namespaces report their full inventory (platform, CPU, disks, their own NICs), the
//! coordinator keeps it with a history of changes, and a loop device attached on the host shows up in
//! `nimbusctl node show` at the next inventory round.
//! Needs root, losetup and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, eventually, require_root};
use serde_json::Value;

/// Inventory interval the agents run with here.
const INTERVAL: &str = "2s";

fn hardware(fleet: &Fleet, name: &str) -> Result<Value, String> {
    let nodes = fleet.try_nodes().map_err(|e| e.to_string())?;
    let node = nodes
        .into_iter()
        .find(|n| n["name"] == name)
        .ok_or(format!("{name} not listed"))?;
    node.get("hardware")
        .filter(|h| !h.is_null())
        .cloned()
        .ok_or(format!("{name}: no hardware yet"))
}

fn disk<'a>(hw: &'a Value, name: &str) -> Option<&'a Value> {
    hw["disks"].as_array()?.iter().find(|d| d["name"] == name)
}

/// A loop device over a sparse file, detached on drop (also when the test fails).
struct LoopDevice {
    dev: String,
}

impl LoopDevice {
    fn attach(file: &Path, size: u64) -> LoopDevice {
        std::fs::File::create(file).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        }
    }

    fn name(&self) -> &str {
        self.dev.trim_start_matches("/dev/")
    }

    fn detach(&mut self) {
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
            self.dev.clear();
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        self.detach();
    }
}

#[test]
fn agents_report_hardware_and_a_hot_added_loop_device_appears() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2);
    let token = fleet.create_token("1h", 2);
    let args = ["--inventory-interval", INTERVAL, "--metadata-endpoint", "off"];
    for i in 1..=2 {
        fleet.start_agent(i, Some(&token), &args);
    }
    fleet.wait_connected(&["agent-1", "agent-2"]);

    // What this host is, read here the same way: the namespaced agents must agree on the shared hardware
    // and each report its own network namespace's NICs.
    let local = inventory::collect(Path::new("/")).inventory;
    for i in 1..=2 {
        let name = agent_name(i);
        let hw = e2e::eventually_patiently(|| hardware(&fleet, &name));
        assert_eq!(hw["platform"]["kind"], local.platform.kind.as_str(), "{name}");
        assert_eq!(
            hw["cpu"]["threads"].as_u64(),
            local.cpu.threads.map(u64::from),
            "{name}"
        );
        assert_eq!(hw["memory"]["total_bytes"].as_u64(), local.memory.total_bytes, "{name}");
        for d in local.disks.iter().filter(|d| d.holds_root) {
            let reported = disk(&hw, &d.name).unwrap_or_else(|| panic!("{name} lacks root disk {}: {hw}", d.name));
            assert_eq!(reported["holds_root"], true);
            assert_eq!(reported["size_bytes"].as_u64(), d.size_bytes);
        }
        let eth0 = hw["nics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "eth0")
            .expect("eth0 reported");
        let addr = format!("{}/24", fleet.agent_ip(i));
        assert!(
            eth0["addresses"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == &Value::String(addr.clone())),
            "{name}'s eth0 carries its own underlay address {addr}: {eth0}"
        );
        let node = fleet.node(&name).unwrap();
        assert_eq!(str_field(&node, "platform"), local.platform.kind.as_str());
        assert!(!str_field(&node, "disk_summary").is_empty(), "{node}");
        assert_eq!(node["inventory_history"][0]["changes"][0], "first inventory", "{node}");
    }
    let wide = String::from_utf8_lossy(&fleet.ctl(&["-o", "text", "nodes", "--wide"]).stdout).to_string();
    assert!(
        wide.contains("PLATFORM") && wide.contains(local.platform.kind.as_str()),
        "{wide}"
    );

    // Hot-add a disk on the host: it appears at the next inventory round (uevent or timer).
    let mut lo = LoopDevice::attach(&fleet.work_dir().join("hot-added.img"), 64 << 20);
    let lo_name = lo.name().to_string();
    let round = Duration::from_secs(10); // one 2 s interval, plus the stream and slack for a busy CI machine
    let hw = eventually(round, Duration::from_millis(200), || {
        let hw = hardware(&fleet, "agent-1")?;
        if disk(&hw, &lo_name).is_some() {
            Ok(hw)
        } else {
            Err(format!("{lo_name} not reported yet"))
        }
    });
    let d = disk(&hw, &lo_name).unwrap();
    assert_eq!(d["transport"], "loop", "{d}");
    assert_eq!(d["size_bytes"].as_u64(), Some(64 << 20), "{d}");
    assert!(
        d["backing_file"].as_str().unwrap_or("").ends_with("hot-added.img"),
        "{d}"
    );
    let shown = String::from_utf8_lossy(&fleet.ctl(&["-o", "text", "node", "show", "agent-1"]).stdout).to_string();
    assert!(shown.contains(&lo_name), "node show lists {lo_name}:\n{shown}");
    let node = fleet.node("agent-1").unwrap();
    let latest = node["inventory_history"][0]["changes"].to_string();
    assert!(latest.contains(&lo_name), "the change is recorded: {node}");

    // And it goes away when detached.
    lo.detach();
    eventually(round, Duration::from_millis(200), || {
        let hw = hardware(&fleet, "agent-1")?;
        if disk(&hw, &lo_name).is_none() {
            Ok(())
        } else {
            Err(format!("{lo_name} still reported"))
        }
    });
}
