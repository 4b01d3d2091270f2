//! End-to-end: agent upgrades in waves. Five agents run under the upgrade launcher (`nimbus-agent launch`, as
//! their systemd unit runs them) with the release root pinned. A new agent build (`nimbus-agent-next`: the same
//! code reporting the next patch version) is published and rolled out canary first; then a release that exits 1
//! at start and one that hangs without signalling ready are each rolled back by the canary's launcher on its
//! own, and the rollout stops there with every other node untouched; a release signed under another root is
//! refused by the agent; and an agent killed with SIGKILL in the middle of an install comes back working.
//! Needs root and the binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::fleet::{agent_name, str_field};
use e2e::{Fleet, eventually, expect_success, require_root};
use serde_json::Value;

/// One start within 15 s for a new version: bad releases are rolled back within seconds, and a good one has
/// room on a loaded CI machine.
const LAUNCH: &[&str] = &["--deadline", "15s", "--max-failures", "1", "--retry-delay", "200ms"];
/// Upgrades download and restart agents: longer than the harness's default patience on a busy machine.
const UPGRADE_PATIENCE: Duration = Duration::from_secs(150);

/// `nimbusctl rollout status` once the rollout's phase is `phase`, and each node's wave.
fn wait_phase(fleet: &Fleet, phase: &str) -> (Value, Vec<u64>) {
    let st = eventually(UPGRADE_PATIENCE, Duration::from_millis(250), || {
        let st = fleet.ctl_json(&["rollout", "status"]);
        if st["phase"] == phase {
            Ok(st)
        } else {
            Err(format!("{st}"))
        }
    });
    let waves = st["nodes"]
        .as_array()
        .map(|ns| ns.iter().filter_map(|n| n["wave"].as_u64()).collect())
        .unwrap_or_default();
    (st, waves)
}
const AGENTS: usize = 5;

/// The version each node's agent reported last, by name.
fn versions(fleet: &Fleet) -> Vec<(String, String)> {
    fleet
        .nodes()
        .iter()
        .map(|n| {
            (
                str_field(n, "name").to_string(),
                str_field(n, "agent_version").to_string(),
            )
        })
        .collect()
}

fn wait_versions(fleet: &Fleet, want: &str) {
    eventually(UPGRADE_PATIENCE, Duration::from_millis(250), || {
        let v = versions(fleet);
        if v.len() == AGENTS && v.iter().all(|(_, x)| x == want) {
            Ok(())
        } else {
            Err(format!("{v:?}"))
        }
    });
}

/// A fake release: a script the launcher executes as the agent.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn start(fleet: &Fleet, version: &str) -> Value {
    fleet.ctl_json(&[
        "rollout",
        "start",
        "--version",
        version,
        "--canary",
        "1",
        "--max-unavailable",
        "2",
    ])
}

/// Waits until the running rollout pauses on its failed canary; returns the status.
fn wait_canary_failed(fleet: &Fleet, needle: &str) -> Value {
    let (st, _) = wait_phase(fleet, "paused");
    let nodes = st["nodes"].as_array().unwrap();
    let failed: Vec<&Value> = nodes
        .iter()
        .filter(|n| n["state"].as_str().unwrap_or("").starts_with("failed"))
        .collect();
    assert_eq!(failed.len(), 1, "only the canary failed: {st}");
    assert_eq!(failed[0]["wave"], 1, "{st}");
    assert!(failed[0]["state"].as_str().unwrap().contains(needle), "{st}");
    let pending = nodes.iter().filter(|n| n["state"] == "pending").count();
    assert_eq!(pending, AGENTS - 1, "the rest never started: {st}");
    st
}

#[test]
fn agents_upgrade_in_waves_and_bad_releases_stop_at_the_canary() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(AGENTS);
    let ops = tempfile::tempdir().unwrap();
    let dir = ops.path().join("rel");
    expect_success(&fleet.ctl(&[
        "release",
        "init",
        "--root-key",
        &ops.path().join("root.pem").display().to_string(),
        "--out",
        &dir.display().to_string(),
    ]));
    expect_success(&fleet.ctl(&["release", "install", &dir.display().to_string()]));
    let pin = dir.join("repo/metadata/1.root.json").display().to_string();

    let token = fleet.create_token("1h", AGENTS as u32);
    for i in 1..=AGENTS {
        fleet.start_agent_launched(i, Some(&token), LAUNCH, &["--release-root", &pin]);
    }
    let names: Vec<String> = (1..=AGENTS).map(agent_name).collect();
    fleet.wait_connected(&names);
    let old = env!("CARGO_PKG_VERSION");
    wait_versions(&fleet, old);

    // 1. A new build (the same code reporting the patch after ours), canary first, then at most two at a time.
    let next = e2e::binary("nimbus-agent-next");
    let new_version = {
        let v: Vec<u64> = old.split('.').map(|x| x.parse().unwrap()).collect();
        format!("{}.{}.{}", v[0], v[1], v[2] + 1)
    };
    expect_success(&fleet.ctl(&["release", "add", &next.display().to_string(), "--version", &new_version]));
    let st = start(&fleet, &new_version);
    assert_eq!(st["kind"], "agent", "{st}");
    // SIGKILL the canary's agent while it installs (fetching, staging or switching: wherever it is), as a
    // crash or an OOM kill would. Its launcher dies with it; systemd would start the unit again, as we do here.
    // The host comes back with a working agent, which finishes the upgrade.
    let canary = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["wave"] == 1)
        .map(|n| n["name"].as_str().unwrap().to_string())
        .unwrap();
    let i = (1..=AGENTS).find(|i| agent_name(*i) == canary).unwrap();
    let launcher = fleet.agent(i).pid();
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).unwrap_or_default();
    assert!(!children.trim().is_empty(), "the launcher of {canary} runs no agent");
    for child in children.split_whitespace() {
        let pid = nix::unistd::Pid::from_raw(child.parse().unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    fleet.agent(i).wait_exit(Duration::from_secs(10));
    fleet.start_agent_launched(i, Some(&token), LAUNCH, &["--release-root", &pin]);
    let (st, waves) = wait_phase(&fleet, "completed");
    assert_eq!(st["counts"]["healthy"], AGENTS as u64, "{st}");
    assert_eq!(
        waves.iter().filter(|w| **w == 1).count(),
        1,
        "the canary wave is one node: {st}"
    );
    for w in 2..=waves.iter().copied().max().unwrap() {
        assert!(
            waves.iter().filter(|x| **x == w).count() <= 2,
            "max-unavailable 2: {st}"
        );
    }
    wait_versions(&fleet, &new_version);

    // 2. A release that exits 1 at start: the canary's launcher rolls back by itself; the rollout stops there.
    let bad = script(ops.path(), "nimbus-agent-exits", "echo broken release >&2; exit 1");
    expect_success(&fleet.ctl(&["release", "add", &bad.display().to_string(), "--version", "0.9.1"]));
    start(&fleet, "0.9.1");
    wait_canary_failed(&fleet, "rolled back");
    wait_versions(&fleet, &new_version);
    expect_success(&fleet.ctl(&["rollout", "abort"]));

    // 3. A release that hangs without ever signalling ready: rolled back after the launcher's deadline.
    let hang = script(ops.path(), "nimbus-agent-hangs", "exec sleep 600");
    expect_success(&fleet.ctl(&["release", "add", &hang.display().to_string(), "--version", "0.9.2"]));
    start(&fleet, "0.9.2");
    wait_canary_failed(&fleet, "not ready");
    wait_versions(&fleet, &new_version);
    expect_success(&fleet.ctl(&["rollout", "abort"]));

    // 4. No canary, everyone at once, abort above a 10% failure share and roll back: the first failure aborts
    // the rollout and every touched node is told its previous version (which it runs again already, its
    // launcher having rolled back on its own).
    expect_success(&fleet.ctl(&[
        "rollout",
        "start",
        "--version",
        "0.9.1",
        "--canary",
        "0",
        "--max-unavailable",
        "5",
        "--max-failures",
        "5",
        "--abort-failure-percent",
        "10",
        "--rollback",
    ]));
    let (st, _) = wait_phase(&fleet, "aborted");
    let note = st["note"].as_str().unwrap_or("");
    assert!(
        note.contains("more than 10%") && note.contains("rolled back to their previous version"),
        "{st}"
    );
    wait_versions(&fleet, &new_version);

    // 5. A repository under another root (e.g. a compromised or mistaken coordinator): refused by the agent.
    let other = ops.path().join("other");
    expect_success(&fleet.ctl(&[
        "release",
        "init",
        "--root-key",
        &ops.path().join("root2.pem").display().to_string(),
        "--out",
        &other.display().to_string(),
    ]));
    expect_success(&fleet.ctl(&["release", "install", "--replace", &other.display().to_string()]));
    expect_success(&fleet.ctl(&["release", "add", &next.display().to_string(), "--version", "0.9.3"]));
    start(&fleet, "0.9.3");
    wait_canary_failed(&fleet, "upgrade to 0.9.3");
    wait_versions(&fleet, &new_version);
    expect_success(&fleet.ctl(&["rollout", "abort"]));
    // Watching an ended rollout shows it once and returns.
    let watched = expect_success(&fleet.ctl(&["-o", "json", "rollout", "status", "--watch", "--interval", "200ms"]));
    let frames: Vec<Value> = watched.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(frames.len(), 1, "{watched}");
    assert_eq!(
        (frames[0]["phase"].as_str(), frames[0]["active"].as_bool()),
        (Some("aborted"), Some(false))
    );
}
