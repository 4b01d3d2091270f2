//! Self-tests of the fleet fixture and the lab, against stand-in daemons (`nimbus-e2e-fake`, symlinked as
//! nimbus-coordinator / nimbus-agent / nimbusctl). These need root but not the real daemons.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::fleet::{FleetOptions, agent_name, str_field};
use e2e::lab::UpOptions;
use e2e::process::pid_alive;
use e2e::{Fleet, HarnessError, LabState, Netns, require_root};

const FAKE: &str = env!("CARGO_BIN_EXE_nimbus-e2e-fake");
const LAB: &str = env!("CARGO_BIN_EXE_nimbus-lab");

/// A temp dir with the fake linked under the three daemon names.
fn fake_bins(agent_fails: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["nimbus-coordinator", "nimbus-agent", "nimbusctl"] {
        std::os::unix::fs::symlink(FAKE, dir.path().join(name)).unwrap();
    }
    // The real delay router: zones are the harness's own, nothing to fake.
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_nimbus-delay-router"),
        dir.path().join("nimbus-delay-router"),
    )
    .unwrap();
    if agent_fails {
        std::fs::write(dir.path().join("agent-fails"), b"").unwrap();
    }
    dir
}

fn fake_fleet(bins: &Path, agents: usize) -> Fleet {
    Fleet::new(FleetOptions {
        bin_dir: Some(bins.to_path_buf()),
        ..FleetOptions::test(agents)
    })
    .unwrap()
}

#[test]
fn fleet_runs_the_coordinator_and_agents_in_their_own_namespaces() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let mut fleet = fake_fleet(bins.path(), 2);
    assert!(
        fleet
            .coordinator()
            .log()
            .contains(&format!("in netns {}", fleet.coordinator_ns().name()))
    );
    let token = fleet.create_token("1h", 2);
    assert_eq!(token.id, "tok-1");
    assert!(token.ca_pin.starts_with("sha256:"));
    assert_eq!(token.json["uses"], "2");
    for i in 1..=2 {
        fleet.start_agent(i, Some(&token), &[]);
    }
    let nodes = fleet.wait_connected(&["agent-1", "agent-2"]);
    for (i, node) in nodes.iter().enumerate() {
        let i = i + 1;
        assert_eq!(str_field(node, "name"), agent_name(i));
        assert_eq!(
            str_field(node, "netns"),
            fleet.agent_ns(i).name(),
            "agent-{i} runs in its namespace"
        );
        assert_eq!(str_field(node, "coordinator"), "192.0.2.1:7443");
        assert_eq!(str_field(node, "machine_id"), fleet.agent_machine_id(i));
        assert_eq!(str_field(node, "tun_name"), "nimbus0");
        assert_eq!(node["has_token"], true);
        assert_eq!(node["has_pin"], true);
    }
    assert_ne!(fleet.agent_machine_id(1), fleet.agent_machine_id(2));
    assert_eq!(fleet.agent_machine_id(1).len(), 32);
    // Tokens never reach logs or messages in clear.
    assert!(fleet.agent(1).command_line().contains("--token <redacted>"));
    assert!(!fleet.dump_logs().contains("fake-secret"));
    // The agents reach the coordinator over the underlay.
    fleet.agent_ns(1).ping(fleet.coordinator_ip().into()).unwrap();
    assert_eq!(fleet.node("agent-2").unwrap()["state"], "connected");
    assert!(fleet.node("agent-9").is_none());
    let text = fleet.ctl(&["nodes"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("agent-1   connected"));
}

#[test]
fn restarting_an_agent_without_a_token_keeps_both_logs() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let (mut fleet, _token) = {
        let mut fleet = fake_fleet(bins.path(), 1);
        let token = fleet.create_token("1h", 1);
        fleet.start_agent(1, Some(&token), &[]);
        fleet.wait_connected(&["agent-1"]);
        (fleet, token)
    };
    let first = fleet.agent(1).pid();
    fleet.agent(1).terminate().unwrap();
    assert_eq!(
        fleet.agent(1).wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    fleet.wait_node_state("agent-1", "lost");
    fleet.start_agent(1, None, &["--revocation-check-after", "3s"]);
    assert_ne!(fleet.agent(1).pid(), first);
    let node = fleet.wait_connected(&["agent-1"]).remove(0);
    assert_eq!(node["has_token"], false);
    assert_eq!(node["has_pin"], false);
    assert_eq!(node["extra"], "3s");
    let logs = fleet.dump_logs();
    assert!(logs.contains("agent-1.log") && logs.contains("agent-1.2.log"), "{logs}");
    assert!(fleet.log_dir().join("agent-1.2.log").is_file());
}

#[test]
fn coordinator_kill9_and_restart_with_the_same_data_dir() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let mut fleet = fake_fleet(bins.path(), 0);
    fleet.coordinator().kill9().unwrap();
    let status = fleet.coordinator().wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(e2e::Process::describe_status(Some(status)), "killed by signal 9");
    fleet.start_coordinator();
    assert!(fleet.coordinator().is_running());
    assert!(fleet.coordinator_data_dir().is_dir());
    assert!(fleet.log_dir().join("coordinator.2.log").is_file());
    assert!(fleet.nodes().is_empty());
}

#[test]
fn waiting_fails_fast_with_the_log_when_an_agent_exits() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let mut fleet = fake_fleet(bins.path(), 1);
    let bad = fleet.create_token("1h", 1).with_token("nimbus1.zz");
    fleet.start_agent(1, Some(&bad), &[]);
    let start = Instant::now();
    let err = fleet
        .try_wait_connected(&["agent-1".to_string()], Duration::from_secs(60), &mut |_| {})
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(matches!(err, HarnessError::GaveUp { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("exit code 64") && msg.contains("malformed join token"),
        "{msg}"
    );
    assert_eq!(fleet.agent(1).wait_exit(Duration::ZERO).unwrap().code(), Some(64));
    assert!(!fleet.agent_state_dir(1).join("identity.json").exists());
}

#[test]
fn dropping_the_fleet_stops_processes_and_removes_namespaces() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let (namespaces, pids, work) = {
        let mut fleet = fake_fleet(bins.path(), 2);
        let token = fleet.create_token("1h", 2);
        fleet.start_agent(1, Some(&token), &[]);
        fleet.start_agent(2, Some(&token), &[]);
        fleet.wait_connected(&["agent-1", "agent-2"]);
        let pids = vec![fleet.coordinator().pid(), fleet.agent(1).pid(), fleet.agent(2).pid()];
        (fleet.lab().namespaces(), pids, fleet.work_dir().to_path_buf())
    };
    for pid in pids {
        assert!(!pid_alive(pid), "PID {pid} survived");
    }
    for ns in namespaces {
        assert!(!Netns::exists(&ns), "{ns} survived");
    }
    assert!(!work.exists(), "temp work dir removed");
}

#[test]
fn startup_failures_are_reported_with_their_stderr() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let fleet = Fleet::new(FleetOptions {
        bin_dir: Some(bins.path().to_path_buf()),
        start_coordinator: false,
        ..FleetOptions::test(0)
    })
    .unwrap();
    let file = fleet.work_dir().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let args = fleet.coordinator_args(&file.join("data"));
    let out = e2e::run_with_timeout(&mut fleet.coordinator_command(&args), Duration::from_secs(10)).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l.contains("not-a-dir")), "{stderr}");
}

#[test]
fn missing_binaries_are_named() {
    let empty = tempfile::tempdir().unwrap();
    let err = Fleet::new(FleetOptions {
        bin_dir: Some(empty.path().to_path_buf()),
        ..FleetOptions::test(1)
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nimbus-coordinator not found in") && err.contains("cargo build --workspace --bins"),
        "{err}"
    );
}

fn up_options(bins: &Path, state_file: PathBuf, tag: &str) -> UpOptions {
    UpOptions {
        agents: 2,
        zones: 0,
        state_file,
        bin_dir: Some(bins.to_path_buf()),
        timeout: Duration::from_secs(30),
        prefix: format!("nbe2e-{}-{tag}", std::process::id()),
    }
}

#[test]
fn lab_up_status_down_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let work = tempfile::tempdir().unwrap();
    let state_file = work.path().join("lab/state.json");
    let opts = up_options(bins.path(), state_file.clone(), "lab");
    let mut out = Vec::new();
    let state = e2e::lab::up(&opts, &mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.contains("coordinator and 2 agents are up"), "{text}");
    assert!(text.contains("agent-2   connected"), "{text}");
    assert!(text.contains("--socket") && text.contains("lab.sh down"), "{text}");
    // Detached: everything is still there after `up` returned and the Fleet value is gone.
    assert_eq!(LabState::load(&state_file).unwrap().as_ref(), Some(&state));
    assert_eq!(state.processes.len(), 3);
    assert!(state.processes.iter().all(|p| pid_alive(p.pid)));
    assert_eq!(state.namespaces.len(), 4);
    assert!(state.namespaces.iter().all(|n| Netns::exists(n)));

    let mut out = Vec::new();
    assert!(e2e::lab::status(&state_file, &mut out).unwrap());
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        text.contains("agent-1") && text.contains("running") && !text.contains("NOT RUNNING"),
        "{text}"
    );

    let err = e2e::lab::up(&opts, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("already up") && err.contains("down"), "{err}");

    let report = e2e::lab::down(&state_file, &mut Vec::new()).unwrap();
    assert_eq!(report.stopped.len(), 3, "{report:?}");
    assert!(report.warnings.is_empty(), "{report:?}");
    assert!(state.processes.iter().all(|p| !pid_alive(p.pid)));
    assert!(state.namespaces.iter().all(|n| !Netns::exists(n)));
    assert!(!state_file.exists());
    assert!(state.log_dir.join("coordinator.log").is_file(), "logs are kept");
    assert!(!state.work_dir.join("coordinator").exists(), "data removed");
    assert!(e2e::lab::down(&state_file, &mut Vec::new()).unwrap().nothing_to_do);
}

#[test]
fn a_failed_lab_up_cleans_up_after_itself() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(true);
    let work = tempfile::tempdir().unwrap();
    let state_file = work.path().join("state.json");
    let opts = up_options(bins.path(), state_file.clone(), "labfail");
    let mut out = Vec::new();
    let err = e2e::lab::up(&opts, &mut out).unwrap_err().to_string();
    assert!(err.contains("exit code 77"), "{err}");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.contains("token expired"), "log tails are shown: {text}");
    assert!(!state_file.exists());
    let leftovers: Vec<String> = Netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&opts.prefix))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn lab_refuses_to_adopt_existing_namespaces() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let work = tempfile::tempdir().unwrap();
    let state_file = work.path().join("state.json");
    let opts = up_options(bins.path(), state_file.clone(), "labtaken");
    let mut squatter = Netns::create(&format!("{}-sw", opts.prefix)).unwrap();
    let err = e2e::lab::up(&opts, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert!(Netns::exists(squatter.name()), "someone else's namespace is left alone");
    assert!(!state_file.exists());
    squatter.delete().unwrap();
}

#[test]
fn lab_binary_up_and_down_from_the_command_line() {
    if !require_root() {
        return;
    }
    let bins = fake_bins(false);
    let work = tempfile::tempdir().unwrap();
    let state_file = work.path().join("state.json");
    let prefix = format!("nbe2e-{}-labcli", std::process::id());
    let state_arg = state_file.to_str().unwrap();
    let up = e2e::run_with_timeout(
        Command::new(LAB)
            .args([
                "up",
                "--agents",
                "1",
                "--zones",
                "2",
                "--state-file",
                state_arg,
                "--prefix",
                &prefix,
            ])
            .arg("--bin-dir")
            .arg(bins.path()),
        Duration::from_secs(60),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(up.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&up.stderr));
    assert!(
        stdout.contains("waiting for agents") || stdout.contains("agents are up"),
        "{stdout}"
    );
    assert!(stdout.contains("in 2 zones (a, b) behind the delay router"), "{stdout}");
    // The lab binary has exited; its daemons and the delay router have not.
    let state = LabState::load(&state_file).unwrap().unwrap();
    assert!(state.processes.iter().all(|p| pid_alive(p.pid)));
    let names: Vec<&str> = state.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["coordinator", "agent-1", "delay-router"]);
    assert_eq!(
        state.namespaces,
        [
            format!("{prefix}-coord"),
            format!("{prefix}-agent-1"),
            format!("{prefix}-rt")
        ]
    );

    let status = Command::new(LAB)
        .args(["status", "--state-file", state_arg])
        .output()
        .unwrap();
    assert!(status.status.success());
    let down = Command::new(LAB)
        .args(["down", "--state-file", state_arg])
        .output()
        .unwrap();
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(String::from_utf8_lossy(&down.stdout).contains("deleted namespaces"));
    assert!(state.processes.iter().all(|p| !pid_alive(p.pid)));
    assert!(state.namespaces.iter().all(|n| !Netns::exists(n)));
    let again = Command::new(LAB)
        .args(["down", "--state-file", state_arg])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));
    let status = Command::new(LAB)
        .args(["status", "--state-file", state_arg])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
}

#[test]
fn lab_binary_rejects_bad_usage() {
    let out = Command::new(LAB).args(["up", "--agents", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let out = Command::new(LAB).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
