//! The main job, end to end with the real binaries: `nimbus-lab up` builds three zones behind the delay
//! router, the agents enroll, measure each other, and the coordinator infers the three zones; `down` leaves
//! nothing behind. (The harness's own lab tests, with stand-in daemons, are in harness_fleet.rs.)
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use e2e::lab::UpOptions;
use e2e::netns::Netns;
use e2e::process::pid_alive;
use e2e::{binary, require_root};
use serde_json::Value;

#[test]
fn the_lab_comes_up_in_zones_and_the_coordinator_infers_them() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let state_file = work.path().join("lab/state.json");
    let opts = UpOptions {
        agents: 3,
        zones: 3,
        state_file: state_file.clone(),
        bin_dir: None,
        timeout: Duration::from_secs(60),
        prefix: format!("nbe2e-{}-labz", std::process::id()),
    };
    let mut out = Vec::new();
    let up = e2e::lab::up(&opts, &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let state = up.unwrap_or_else(|e| panic!("lab up: {e}\n{text}"));
    // Whatever happens next, take the lab down again.
    struct Down(std::path::PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = e2e::lab::down(&self.0, &mut Vec::new());
        }
    }
    let guard = Down(state_file.clone());

    assert!(text.contains("in 3 zones (a, b, c) behind the delay router"), "{text}");
    assert!(text.contains("coordinator and 3 agents are up"), "{text}");
    assert!(
        !text.contains("warning: only"),
        "every pair was measured before `up` returned:\n{text}"
    );
    assert!(text.contains("latency --svg"), "{text}");
    assert_eq!(
        state.namespaces.len(),
        5,
        "coordinator, 3 agents, router: {:?}",
        state.namespaces
    );
    assert!(state.processes.iter().any(|p| p.name == "delay-router"));

    let json = Command::new(binary("nimbusctl"))
        .arg("--socket")
        .arg(&state.admin_socket)
        .args(["-o", "json", "latency"])
        .output()
        .unwrap();
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let m: Value = serde_json::from_slice(&json.stdout).unwrap();
    let zones: BTreeSet<String> = ["agent-1", "agent-2", "agent-3"]
        .iter()
        .map(|a| m["zones"][*a].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(zones.len(), 3, "one agent per zone, 1 ms and 5 ms apart: {m}");
    assert!(!zones.contains(""), "{m}");

    drop(guard);
    assert!(state.processes.iter().all(|p| !pid_alive(p.pid)));
    assert!(state.namespaces.iter().all(|n| !Netns::exists(n)));
    assert!(!state_file.exists());
}
