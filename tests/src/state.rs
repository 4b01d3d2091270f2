//! Persistence for the lab: a JSON state file listing what `up` created, and a teardown that removes
//! exactly that (killing only recorded PIDs whose `/proc/PID/exe` and start time still match).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::error::{HarnessError, Result};
use crate::netns::{Netns, delete_netns, pids_in};
use crate::process::{pid_alive, proc_exe, proc_start_time, signal_pid};

/// Version of the state file format.
pub const STATE_FORMAT: u32 = 1;

/// How long teardown waits after SIGTERM before SIGKILL.
pub const TEARDOWN_GRACE: Duration = Duration::from_secs(5);

/// A process recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Name for messages (`coordinator`, `agent-1`).
    pub name: String,
    /// Its PID.
    pub pid: u32,
    /// The canonical path of the program it runs; `/proc/PID/exe` must match before we kill it.
    pub exe: PathBuf,
    /// The launcher that execs into `exe` (`ip`), accepted as exe only together with a matching start time.
    #[serde(default)]
    pub launcher: Option<PathBuf>,
    /// Start time in clock ticks since boot, guards against PID reuse.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// The namespace it runs in.
    #[serde(default)]
    pub netns: Option<String>,
    /// Its log file.
    pub log: PathBuf,
}

/// Everything `nimbus-lab up` created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    /// [`STATE_FORMAT`].
    pub format: u32,
    /// When the lab was brought up.
    pub created_at_unix: u64,
    /// The lab's working directory (data, logs, admin socket).
    pub work_dir: PathBuf,
    /// The coordinator's admin socket.
    pub admin_socket: PathBuf,
    /// The nimbusctl binary to use with it.
    pub nimbusctl: PathBuf,
    /// Namespaces in deletion order (hosts first, switch last).
    pub namespaces: Vec<String>,
    /// Processes, stopped in reverse order (agents before the coordinator).
    pub processes: Vec<ProcessRecord>,
    /// Data and state directories, removed on teardown.
    pub data_dirs: Vec<PathBuf>,
    /// Directory of the log files (kept on teardown).
    pub log_dir: PathBuf,
}

impl LabState {
    /// Reads a state file; `Ok(None)` if there is none.
    pub fn load(path: &Path) -> Result<Option<LabState>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(HarnessError::io(format!("reading lab state {}", path.display()), e));
            }
        };
        let state: LabState = serde_json::from_str(&text).map_err(|e| HarnessError::State {
            path: path.to_path_buf(),
            reason: format!(
                "not a lab state file ({e}); inspect it, remove leftovers by hand (`ip netns list`) and delete it"
            ),
        })?;
        if state.format != STATE_FORMAT {
            return Err(HarnessError::State {
                path: path.to_path_buf(),
                reason: format!("format {} is not the supported {STATE_FORMAT}", state.format),
            });
        }
        Ok(Some(state))
    }

    /// Writes the state atomically (temp file + rename), creating the parent directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        let parent = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| HarnessError::io(format!("creating {}", parent.display()), e))?;
        let text = serde_json::to_string_pretty(self).map_err(|e| HarnessError::BadOutput {
            what: "lab state".into(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(|e| HarnessError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| HarnessError::io(format!("renaming {} to {}", tmp.display(), path.display()), e))
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What [`teardown_from_state`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TeardownReport {
    /// There was no state file: nothing to do.
    pub nothing_to_do: bool,
    /// Recorded processes that were running and were stopped (names).
    pub stopped: Vec<String>,
    /// Recorded processes that had already exited.
    pub already_gone: Vec<String>,
    /// Namespaces deleted (those already gone are not listed).
    pub namespaces_deleted: Vec<String>,
    /// Things left alone, and why.
    pub warnings: Vec<String>,
}

/// Whether `record` still describes the live process `record.pid` (not a reused PID).
fn still_ours(record: &ProcessRecord) -> std::result::Result<(), String> {
    if let (Some(want), Some(have)) = (record.start_time, proc_start_time(record.pid))
        && want != have
    {
        return Err(format!(
            "PID {} was reused by another process (start time differs)",
            record.pid
        ));
    }
    let exe = proc_exe(record.pid).ok_or_else(|| format!("cannot read /proc/{}/exe", record.pid))?;
    let same = |p: &Path| p == exe || p.canonicalize().is_ok_and(|c| c == exe);
    if same(&record.exe) {
        return Ok(());
    }
    if record.start_time.is_some() && record.launcher.as_deref().is_some_and(same) {
        return Ok(());
    }
    Err(format!(
        "PID {} now runs {}, not {}",
        record.pid,
        exe.display(),
        record.exe.display()
    ))
}

/// Stops the recorded processes (SIGTERM, up to [`TEARDOWN_GRACE`], SIGKILL), in reverse order.
pub fn stop_recorded(records: &[ProcessRecord], report: &mut TeardownReport) {
    let mut signalled = Vec::new();
    for record in records.iter().rev() {
        if !pid_alive(record.pid) {
            report.already_gone.push(record.name.clone());
            continue;
        }
        match still_ours(record) {
            Ok(()) => match signal_pid(record.pid, Signal::SIGTERM) {
                Ok(()) => signalled.push(record),
                Err(e) => report.warnings.push(format!("{}: {e}", record.name)),
            },
            Err(why) => report.warnings.push(format!("{} left alone: {why}", record.name)),
        }
    }
    let deadline = Instant::now() + TEARDOWN_GRACE;
    while Instant::now() < deadline && signalled.iter().any(|r| pid_alive(r.pid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for record in &signalled {
        if pid_alive(record.pid)
            && still_ours(record).is_ok()
            && let Err(e) = signal_pid(record.pid, Signal::SIGKILL)
        {
            report.warnings.push(format!("{}: {e}", record.name));
        }
        report.stopped.push(record.name.clone());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && signalled.iter().any(|r| pid_alive(r.pid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for record in signalled.iter().filter(|r| pid_alive(r.pid)) {
        report.warnings.push(format!(
            "{} (PID {}) is still running after SIGKILL",
            record.name, record.pid
        ));
    }
}

/// Refuses to delete paths that could not have been created by the lab (relative, `/`, top-level dirs).
fn safe_to_remove(path: &Path) -> bool {
    path.is_absolute() && path.components().count() >= 3
}

/// Removes everything a state file lists: processes (verified), namespaces, data dirs, admin socket, and the
/// state file itself. Idempotent: a missing state file means nothing to do; missing objects are fine.
pub fn teardown_from_state(path: &Path) -> Result<TeardownReport> {
    let Some(state) = LabState::load(path)? else {
        return Ok(TeardownReport {
            nothing_to_do: true,
            ..TeardownReport::default()
        });
    };
    let mut report = TeardownReport::default();
    stop_recorded(&state.processes, &mut report);
    for name in &state.namespaces {
        if !Netns::exists(name) {
            continue;
        }
        let strangers = pids_in(name);
        if !strangers.is_empty() {
            report.warnings.push(format!(
                "namespace {name} still holds processes not started by the lab ({strangers:?}); deleting the namespace name anyway"
            ));
        }
        match delete_netns(name) {
            Ok(()) => report.namespaces_deleted.push(name.clone()),
            Err(e) => report.warnings.push(e.to_string()),
        }
    }
    for dir in &state.data_dirs {
        if !safe_to_remove(dir) {
            report
                .warnings
                .push(format!("not removing suspicious data dir {}", dir.display()));
            continue;
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.warnings.push(format!("removing {}: {e}", dir.display())),
        }
    }
    match std::fs::remove_file(&state.admin_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report
            .warnings
            .push(format!("removing {}: {e}", state.admin_socket.display())),
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(HarnessError::io(format!("removing lab state {}", path.display()), e));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> LabState {
        LabState {
            format: STATE_FORMAT,
            created_at_unix: 1,
            work_dir: dir.to_path_buf(),
            admin_socket: dir.join("admin.sock"),
            nimbusctl: PathBuf::from("/x/nimbusctl"),
            namespaces: vec![],
            processes: vec![ProcessRecord {
                name: "agent-1".into(),
                pid: 1,
                exe: PathBuf::from("/x/nimbus-agent"),
                launcher: None,
                start_time: Some(5),
                netns: Some("nlab-agent-1".into()),
                log: dir.join("logs/agent-1.log"),
            }],
            data_dirs: vec![dir.join("coordinator")],
            log_dir: dir.join("logs"),
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert_eq!(LabState::load(&path).unwrap(), None);
        let state = sample(dir.path());
        state.save(&path).unwrap();
        assert_eq!(LabState::load(&path).unwrap(), Some(state));
    }

    #[test]
    fn garbage_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let err = LabState::load(&path).unwrap_err().to_string();
        assert!(err.contains("not a lab state file"), "{err}");
    }

    #[test]
    fn teardown_without_state_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let report = teardown_from_state(&dir.path().join("none.json")).unwrap();
        assert!(report.nothing_to_do);
    }

    #[test]
    fn teardown_never_kills_a_process_that_is_not_the_recorded_binary() {
        // Our own PID runs the test binary, not /x/nimbus-agent: must be left alone, with a warning.
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample(dir.path());
        state.processes[0].pid = std::process::id();
        state.processes[0].start_time = proc_start_time(std::process::id());
        std::fs::create_dir_all(dir.path().join("coordinator")).unwrap();
        let path = dir.path().join("state.json");
        state.save(&path).unwrap();
        let report = teardown_from_state(&path).unwrap();
        assert!(report.stopped.is_empty());
        assert!(
            report.warnings.iter().any(|w| w.contains("agent-1 left alone")),
            "{report:?}"
        );
        assert!(!path.exists(), "state file removed");
        assert!(!dir.path().join("coordinator").exists(), "data dir removed");
    }

    #[test]
    fn only_deep_absolute_paths_are_removed() {
        assert!(safe_to_remove(Path::new("/run/nimbus-lab/coordinator")));
        assert!(!safe_to_remove(Path::new("/run")));
        assert!(!safe_to_remove(Path::new("/")));
        assert!(!safe_to_remove(Path::new("relative/dir/x")));
    }
}
