//! `nimbus-agent launch` as systemd runs it, with fake agents: small Python programs started directly (their
//! shebang keeps the launcher's child PID) that talk to the launcher's NOTIFY_SOCKET. The test plays systemd: it
//! binds the launcher's NOTIFY_SOCKET and reads what the launcher relays. Every wait has a timeout; every
//! launcher started is stopped (SIGTERM, then SIGKILL) by its guard, even when a test fails.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use agent::versions::{self, Slot};

const PATIENCE: Duration = Duration::from_secs(20);

/// What a fake agent does after its common set-up (log its start, SIGHUP → STATUS, SIGTERM → exit 7).
enum Behaviour {
    /// READY=1, then run; exit 75 once the EXIT75 file appears (removing it).
    Good,
    /// Exit 1 at once.
    ExitOne,
    /// Never ready.
    Hang,
    /// READY=1 sent by a forked process (another PID), then hang.
    ReadyFromAnotherPid,
    /// Exit with this code before ready.
    Exit(u8),
}

const PRELUDE: &str = r#"
import os, signal, socket, sys, time
def log(what):
    with open(os.environ["LAUNCH_LOG"], "a") as f:
        f.write(f"{NAME} {what}\n")
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.send(msg.encode())
    s.close()
def term(*_):
    log("sigterm")
    notify("STOPPING=1")
    os._exit(7)
signal.signal(signal.SIGHUP, lambda *_: notify(f"STATUS={NAME} got SIGHUP"))
signal.signal(signal.SIGTERM, term)
def interrupt(*_):
    log("sigint")
    os._exit(3)
signal.signal(signal.SIGINT, interrupt)
env = lambda k: os.environ.get(k, "-")
log(f"start {' '.join(sys.argv[1:])} launcher={env('NIMBUS_LAUNCHER')} watchdog={env('WATCHDOG_USEC')}/{env('WATCHDOG_PID')}")
"#;

fn script(name: &str, b: &Behaviour) -> String {
    let body = match b {
        Behaviour::Good => r#"
notify(f"READY=1\nSTATUS={NAME} ready")
end = time.time() + 30
while time.time() < end:
    go = os.environ["EXIT75"]
    if os.path.exists(go):
        os.remove(go)
        log("exit 75")
        sys.exit(75)
    time.sleep(0.05)
"#
        .to_string(),
        Behaviour::ExitOne => "sys.exit(1)\n".into(),
        Behaviour::Hang => "time.sleep(30)\n".into(),
        Behaviour::ReadyFromAnotherPid => r#"
if os.fork() == 0:
    notify(f"READY=1\nSTATUS={NAME} ready from a grandchild")
    os._exit(0)
time.sleep(30)
"#
        .into(),
        Behaviour::Exit(c) => format!("sys.exit({c})\n"),
    };
    format!("#!/usr/bin/python3\nNAME = {name:?}\n{PRELUDE}{body}")
}

struct Host {
    tmp: tempfile::TempDir,
    state: PathBuf,
    package: PathBuf,
}

impl Host {
    fn new(package: Behaviour) -> Host {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let package = write_script(tmp.path(), "package", &package);
        Host { tmp, state, package }
    }

    fn build(&self, version: &str, b: Behaviour) -> PathBuf {
        write_script(self.tmp.path(), version, &b)
    }

    /// Staged and activated (pending), as the agent does before exiting 75.
    fn activate(&self, version: &str, b: Behaviour) {
        versions::stage(&self.state, version, &self.build(version, b)).unwrap();
        versions::activate(&self.state, version).unwrap();
    }

    /// A confirmed current version.
    fn install(&self, version: &str, b: Behaviour) {
        self.activate(version, b);
        assert!(versions::confirm(&self.state, version).unwrap());
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.tmp.path().join("launch.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn starts(&self) -> Vec<String> {
        self.log()
            .iter()
            .filter_map(|l| l.split_once(" start ").map(|(name, _)| name.to_string()))
            .collect()
    }

    fn state(&self) -> versions::UpgradeState {
        versions::load(&self.state).unwrap()
    }

    fn launch(&self, flags: &[&str]) -> Launcher {
        self.launch_with(flags, &[("WATCHDOG_PID", "1")])
    }

    fn launch_with(&self, flags: &[&str], env: &[(&str, &str)]) -> Launcher {
        let systemd_path = self.tmp.path().join("systemd-notify");
        let _ = std::fs::remove_file(&systemd_path);
        let systemd = UnixDatagram::bind(&systemd_path).unwrap();
        let runtime = self.tmp.path().join("run");
        std::fs::create_dir_all(&runtime).unwrap();
        let mut defaults = vec!["--retry-delay", "100ms"];
        if !flags.contains(&"--deadline") {
            defaults.extend(["--deadline", "5s"]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_nimbus-agent"))
            .arg("launch")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--package-binary")
            .arg(&self.package)
            .args(defaults)
            .args(flags)
            .args(["--", "--config", "/etc/nimbus/agent.toml"])
            .env("NOTIFY_SOCKET", &systemd_path)
            .env("RUNTIME_DIRECTORY", &runtime)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().copied())
            .env("LAUNCH_LOG", self.tmp.path().join("launch.log"))
            .env("EXIT75", self.tmp.path().join("exit75"))
            .spawn()
            .unwrap();
        Launcher {
            child,
            systemd,
            runtime,
            seen: Vec::new(),
        }
    }

    fn request_exit_75(&self) {
        std::fs::write(self.tmp.path().join("exit75"), "").unwrap();
    }
}

fn write_script(dir: &Path, name: &str, b: &Behaviour) -> PathBuf {
    let p = dir.join(format!("agent-{name}"));
    std::fs::write(&p, script(name, b)).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A running launcher and the fake systemd socket it notifies.
struct Launcher {
    child: Child,
    systemd: UnixDatagram,
    runtime: PathBuf,
    seen: Vec<String>,
}

impl Launcher {
    /// Waits for a relayed notification containing `want`.
    fn expect(&mut self, want: &str) -> String {
        let until = Instant::now() + PATIENCE;
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            self.systemd.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            if let Ok(n) = self.systemd.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.contains(want) {
                    return msg;
                }
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("the launcher ended ({st}) before {want:?}; it relayed {:?}", self.seen);
            }
        }
        panic!("no {want:?} within {PATIENCE:?}; relayed {:?}", self.seen);
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling the launcher this test started, by its PID.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }

    fn wait(&mut self) -> ExitStatus {
        let until = Instant::now() + PATIENCE;
        while Instant::now() < until {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "the launcher did not end within {PATIENCE:?}; it relayed {:?}",
            self.seen
        );
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SIGTERM is forwarded to the fake agent; SIGKILL if that does not end it.
        // SAFETY: signalling the launcher this test started, by its PID.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_good_version_is_confirmed_and_signals_are_forwarded() {
    let h = Host::new(Behaviour::Good);
    h.activate("1.1.0", Behaviour::Good);
    let mut l = h.launch(&[]);
    l.expect("STATUS=starting 1.1.0 (attempt 1 of 3)");
    let ready = l.expect("READY=1");
    assert!(ready.contains("STATUS=1.1.0 ready"), "{ready}");
    // Confirmed before systemd heard READY.
    let st = h.state();
    assert_eq!(st.pending, None);
    assert_eq!(st.current.to_string(), "1.1.0");
    assert_eq!(st.previous, Some(Slot::Package));

    l.signal(libc::SIGHUP);
    l.expect("STATUS=1.1.0 got SIGHUP");
    l.signal(libc::SIGTERM);
    l.expect("STOPPING=1");
    let status = l.wait();
    assert_eq!(status.code(), Some(7), "the launcher ends with the agent's code");
    assert_eq!(
        h.log(),
        [
            "1.1.0 start --config /etc/nimbus/agent.toml launcher=1 watchdog=-/-",
            "1.1.0 sigterm"
        ]
    );
    // The private notify directory is gone.
    assert_eq!(std::fs::read_dir(&l.runtime).unwrap().count(), 0);
}

#[test]
fn a_version_exiting_1_before_ready_is_rolled_back_after_three_starts() {
    let h = Host::new(Behaviour::Good);
    h.install("1.0.0", Behaviour::Good);
    h.activate("1.1.0", Behaviour::ExitOne);
    let mut l = h.launch(&[]);
    l.expect("STATUS=rolled back 1.1.0 (exited 1 before ready); starting 1.0.0");
    l.expect("STATUS=1.0.0 ready");
    assert_eq!(h.starts(), ["1.1.0", "1.1.0", "1.1.0", "1.0.0"]);
    let st = h.state();
    assert_eq!(st.pending, None);
    assert_eq!(st.current.to_string(), "1.0.0");
    assert_eq!(st.failed.len(), 1);
    assert_eq!(st.failed[0].version.as_str(), "1.1.0");
    assert_eq!(st.failed[0].reason, "exited 1 before ready");
    assert_eq!(versions::linked_version(&h.state).unwrap().as_str(), "1.0.0");
}

#[test]
fn a_version_that_hangs_without_ready_is_rolled_back_after_the_deadline() {
    let h = Host::new(Behaviour::Good);
    h.activate("1.1.0", Behaviour::Hang);
    let t0 = Instant::now();
    let mut l = h.launch(&["--deadline", "1s"]);
    l.expect("STATUS=package ready");
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "three 1 s deadlines: {:?}",
        t0.elapsed()
    );
    assert_eq!(h.starts(), ["1.1.0", "1.1.0", "1.1.0", "package"]);
    let st = h.state();
    assert_eq!(st.current, Slot::Package);
    assert_eq!(st.failed[0].reason, "not ready within 1s");
    assert!(std::fs::symlink_metadata(h.state.join("current")).is_err());
}

#[test]
fn ready_from_another_process_does_not_count() {
    let h = Host::new(Behaviour::Good);
    h.activate("1.1.0", Behaviour::ReadyFromAnotherPid);
    let mut l = h.launch(&["--deadline", "1s", "--max-failures", "1"]);
    l.expect("STATUS=package ready");
    assert!(
        !l.seen.iter().any(|m| m.contains("grandchild")),
        "relayed a notification from another PID: {:?}",
        l.seen
    );
    assert_eq!(h.state().failed[0].reason, "not ready within 1s");
}

#[test]
fn exit_75_starts_the_new_current_version() {
    let h = Host::new(Behaviour::Good);
    h.install("1.0.0", Behaviour::Good);
    let mut l = h.launch(&[]);
    l.expect("STATUS=1.0.0 ready");
    // What the agent does for an upgrade: stage, activate, exit 75.
    h.activate("1.1.0", Behaviour::Good);
    h.request_exit_75();
    l.expect("STATUS=1.1.0 ready");
    assert_eq!(h.starts(), ["1.0.0", "1.1.0"]);
    let st = h.state();
    assert_eq!(st.pending, None);
    assert_eq!(st.current.to_string(), "1.1.0");
    assert_eq!(st.previous.unwrap().to_string(), "1.0.0");
    l.signal(libc::SIGTERM);
    assert_eq!(l.wait().code(), Some(7));
}

#[test]
fn failed_starts_counted_before_a_launcher_restart_still_count() {
    let h = Host::new(Behaviour::Good);
    h.activate("1.1.0", Behaviour::ExitOne);
    // Two launchers were killed while starting it.
    versions::begin_attempt(&h.state, "1.1.0").unwrap();
    versions::begin_attempt(&h.state, "1.1.0").unwrap();
    let mut l = h.launch(&[]);
    l.expect("STATUS=package ready");
    assert_eq!(h.starts(), ["1.1.0", "package"]);
    assert_eq!(h.state().failed[0].reason, "exited 1 before ready");
}

#[test]
fn a_confirmed_agent_exiting_ends_the_launcher_with_its_code() {
    // Before ready: no deadline and no rollback for the package binary; the code goes to systemd.
    let h = Host::new(Behaviour::Exit(64));
    let mut l = h.launch(&[]);
    assert_eq!(l.wait().code(), Some(64));
    assert_eq!(h.starts(), ["package"]);
    assert!(!h.state.exists(), "nothing written without a pending version");

    // After ready: killed by a signal → the launcher dies by the same signal.
    let h = Host::new(Behaviour::Good);
    let mut l = h.launch(&[]);
    l.expect("STATUS=package ready");
    assert_eq!(
        std::fs::read_dir(&l.runtime).unwrap().count(),
        1,
        "one private notify directory"
    );
    // The fake agent is the launcher's only child.
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", l.child.id(), l.child.id())).unwrap();
    let agent: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    // SAFETY: killing the fake agent this test started (through the launcher), by its PID.
    assert_eq!(unsafe { libc::kill(agent, libc::SIGKILL) }, 0);
    let status = l.wait();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

#[test]
fn sigint_is_forwarded_and_the_launcher_ends_with_the_agents_code() {
    let h = Host::new(Behaviour::Good);
    let mut l = h.launch(&[]);
    l.expect("STATUS=package ready");
    l.signal(libc::SIGINT);
    assert_eq!(l.wait().code(), Some(3));
    assert_eq!(h.log().last().unwrap(), "package sigint");
}

#[test]
fn the_launcher_feeds_the_watchdog_while_a_new_version_is_not_ready() {
    let h = Host::new(Behaviour::Good);
    h.activate("1.1.0", Behaviour::Hang);
    // As systemd sets it for the launcher (no WATCHDOG_PID: it would name the launcher, which is what it means).
    let mut l = h.launch_with(
        &["--deadline", "1s", "--max-failures", "1"],
        &[("WATCHDOG_USEC", "200000")],
    );
    l.expect("WATCHDOG=1");
    l.expect("STATUS=package ready");
    let log = h.log();
    assert!(
        log[0].ends_with("watchdog=200000/-"),
        "the agent gets WATCHDOG_USEC, never WATCHDOG_PID: {log:?}"
    );
}
