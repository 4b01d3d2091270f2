//! End-to-end: both daemons talk to systemd through `NOTIFY_SOCKET` — READY=1 only once really serving
//! (the agent: tunnel up and fleet stream open), STATUS= updates, STOPPING=1 on SIGTERM, then exit 0.
//! PID 1 here is not systemd, so the test binds the notify socket itself (a Unix datagram socket).
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use e2e::fleet::str_field;
use e2e::{Fleet, patience, require_root};

/// A fake systemd notify socket: collects datagrams.
struct FakeNotifySocket {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl FakeNotifySocket {
    fn bind(fleet: &mut Fleet, name: &str) -> FakeNotifySocket {
        let path = fleet.work_dir().join(name);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        fleet.set_env("NOTIFY_SOCKET", &path.display().to_string());
        FakeNotifySocket { sock, seen: Vec::new() }
    }

    /// Wait (patience) for a datagram containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + patience();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                self.seen.push(msg.clone());
                if msg.contains(needle) {
                    return msg;
                }
            }
        }
        panic!(
            "no {needle:?} on the notify socket within {:?}; seen: {:?}",
            patience(),
            self.seen
        );
    }
}

#[test]
fn the_agent_is_ready_only_when_its_stream_is_open_and_stops_cleanly() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 1);
    let mut notify = FakeNotifySocket::bind(&mut fleet, "agent-notify.sock");
    fleet.start_agent(1, Some(&token), &[]);

    notify.wait_for("READY=1");
    // READY was sent after the coordinator accepted the stream: the node is connected right now.
    let node = fleet.node("agent-1").expect("agent-1 enrolled before READY");
    assert_eq!(str_field(&node, "state"), "connected", "{node}");
    let status = notify.seen.iter().any(|m| m.contains("STATUS=connected as agent-1"));
    assert!(
        status || notify.wait_for("STATUS=").contains("agent-1"),
        "{:?}",
        notify.seen
    );

    fleet.agent(1).terminate().unwrap();
    notify.wait_for("STOPPING=1");
    let code = fleet.agent(1).wait_exit(patience()).and_then(|s| s.code());
    assert_eq!(code, Some(0), "SIGTERM drains and exits 0:\n{}", fleet.agent(1).log());
}

#[test]
fn the_coordinator_is_ready_once_serving_and_stops_cleanly() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::setup(0);
    let mut notify = FakeNotifySocket::bind(&mut fleet, "coordinator-notify.sock");
    fleet.start_coordinator();
    notify.wait_for("READY=1");
    // Serving means the admin API answers.
    let out = fleet.ctl(&["token", "list"]);
    assert!(out.status.success(), "{out:?}");
    notify.wait_for("STATUS=serving");

    fleet.coordinator().terminate().unwrap();
    notify.wait_for("STOPPING=1");
    let code = fleet.coordinator().wait_exit(patience()).and_then(|s| s.code());
    assert_eq!(
        code,
        Some(0),
        "SIGTERM drains and exits 0:\n{}",
        fleet.coordinator().log()
    );
}

#[test]
fn sighup_reloads_the_log_level_and_names_keys_that_need_a_restart() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    if !require_root() {
        return;
    }
    let mut fleet = Fleet::setup(0);
    let config = fleet.work_dir().join("coordinator.toml");
    std::fs::write(&config, "log_level = \"info\"\n").unwrap();
    fleet.set_env("NIMBUS_CONFIG", &config.display().to_string());
    fleet.start_coordinator();
    let pid = Pid::from_raw(fleet.coordinator().pid() as i32);
    let log_has = |fleet: &Fleet, needle: &str| {
        e2e::eventually_patiently(|| {
            let log = fleet.coordinator().log();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(format!("coordinator log lacks {needle:?}:\n{log}"))
            }
        })
    };
    assert!(!fleet.coordinator().log().contains(" DEBUG "), "info level at start");

    std::fs::write(&config, "log_level = \"debug\"\nmtu = 1400\n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    log_has(&fleet, "configuration reloaded; these keys take effect at restart");
    log_has(&fleet, "\"mtu\"");
    assert!(fleet.ctl(&["token", "list"]).status.success());
    log_has(&fleet, " DEBUG ");

    std::fs::write(&config, "mtu = \"big\"\n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    log_has(&fleet, "configuration reload rejected");
    assert!(
        fleet.coordinator().is_running(),
        "a bad reload keeps the coordinator running"
    );
    assert!(fleet.ctl(&["token", "list"]).status.success());
}
