//! Processes: short helper commands with a timeout, and long-running daemons with a log file.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::error::{HarnessError, Result};
use crate::state::ProcessRecord;

/// How long [`Process`]'s `Drop` waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Default limit for helper commands run with [`run_checked`]: 30 s.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

const REAP_POLL: Duration = Duration::from_millis(20);

/// Renders a command line for messages, with the value after `--token` redacted.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    redact(&parts)
}

fn redact(parts: &[String]) -> String {
    let mut out = Vec::with_capacity(parts.len());
    let mut hide_next = false;
    for p in parts {
        if hide_next {
            out.push("<redacted>".to_string());
            hide_next = false;
        } else if p == "--token" {
            out.push(p.clone());
            hide_next = true;
        } else if p.starts_with("--token=") {
            out.push("--token=<redacted>".to_string());
        } else {
            out.push(p.clone());
        }
    }
    out.join(" ")
}

/// Runs `cmd` to completion, capturing stdout and stderr, killing it (and its process group) after `timeout`.
///
/// A non-zero exit is *not* an error here; see [`run_checked`].
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let command = describe(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| HarnessError::Spawn {
        command: command.clone(),
        source,
    })?;
    let out_reader = child.stdout.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        })
    });
    let err_reader = child.stderr.take().map(|mut s| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        })
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                if let Ok(pid) = i32::try_from(child.id()) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                }
                let _ = child.kill();
                match child.wait() {
                    Ok(status) => break status,
                    Err(e) => return Err(HarnessError::io(format!("waiting for `{command}`"), e)),
                }
            }
            Ok(None) => std::thread::sleep(REAP_POLL),
            Err(e) => return Err(HarnessError::io(format!("waiting for `{command}`"), e)),
        }
    };
    let stdout = out_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    if timed_out {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
        let text = text.trim();
        let detail = if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        };
        return Err(HarnessError::CommandTimeout {
            command,
            after: timeout,
            detail,
        });
    }
    Ok(Output { status, stdout, stderr })
}

/// Runs `cmd` with [`COMMAND_TIMEOUT`] and fails unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let output = run_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(HarnessError::CommandFailed {
            command: describe(cmd),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Finds `program` on `PATH` unless it already contains a `/`, and canonicalizes it.
pub fn resolve_program(program: &Path) -> Result<PathBuf> {
    let found = if program.components().count() > 1 || program.is_absolute() {
        Some(program.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    let found = found.ok_or_else(|| {
        HarnessError::io(
            format!("looking for {} on PATH", program.display()),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        )
    })?;
    found
        .canonicalize()
        .map_err(|e| HarnessError::io(format!("resolving {}", found.display()), e))
}

/// Whether `pid` exists and is not a zombie (works for processes that are not our children).
pub fn pid_alive(pid: u32) -> bool {
    match proc_stat_fields(pid) {
        Some((state, _)) => state != 'Z' && state != 'X',
        None => false,
    }
}

/// The start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), used to detect PID reuse.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    proc_stat_fields(pid).map(|(_, start)| start)
}

fn proc_stat_fields(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses state (field 3) and starttime (field 22) from a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // rest starts at field 3; field 22 is the 20th item after it (index 19 from field 3).
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// The executable of `pid` (`/proc/PID/exe`), with a trailing " (deleted)" removed (binary rebuilt since start).
pub fn proc_exe(pid: u32) -> Option<PathBuf> {
    let target = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = target.to_string_lossy();
    Some(match text.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => target,
    })
}

/// Sends `signal` to a process that may not be our child. Already-gone processes are not an error.
pub fn signal_pid(pid: u32, signal: Signal) -> Result<()> {
    let raw = i32::try_from(pid).map_err(|_| HarnessError::InvalidName {
        name: pid.to_string(),
        reason: "not a valid PID".into(),
    })?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(HarnessError::io(format!("sending {signal} to PID {pid}"), e.into())),
    }
}

/// Builds a [`Process`]: `ProcessBuilder::new(name, program, log_path).netns(&ns).args(..).spawn()`.
#[derive(Debug, Clone)]
pub struct ProcessBuilder {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    env_removes: Vec<OsString>,
    netns: Option<String>,
    log_path: PathBuf,
    detached: bool,
}

impl ProcessBuilder {
    /// A process called `name` (for messages) running `program`, stdout+stderr appended to `log_path`.
    pub fn new(name: impl Into<String>, program: impl AsRef<Path>, log_path: impl AsRef<Path>) -> Self {
        ProcessBuilder {
            name: name.into(),
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            envs: Vec::new(),
            env_removes: Vec::new(),
            netns: None,
            log_path: log_path.as_ref().to_path_buf(),
            detached: false,
        }
    }

    /// Runs the program inside network namespace `ns` (via `ip netns exec`, which execs: the PID is the program's).
    pub fn netns(mut self, ns: &crate::netns::Netns) -> Self {
        self.netns = Some(ns.name().to_string());
        self
    }

    /// Like [`ProcessBuilder::netns`], by namespace name.
    pub fn netns_name(mut self, name: impl Into<String>) -> Self {
        self.netns = Some(name.into());
        self
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets an environment variable for the process.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Removes an inherited environment variable.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env_removes.push(key.as_ref().to_os_string());
        self
    }

    /// `true`: start it in a new session (`setsid`) so it outlives us (for the lab, see [`Process::detach`]).
    /// `false` (default): it gets SIGKILL when the spawning thread dies (`PR_SET_PDEATHSIG`), so a test
    /// process that is killed outright leaves no daemons behind. Spawn from the thread that owns the
    /// [`Process`] (a test's own thread).
    pub fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// Starts the process.
    pub fn spawn(self) -> Result<Process> {
        let program = resolve_program(&self.program)?;
        // Run the path as given (argv[0] keeps a symlink's name); record the canonical one.
        let run_as = if self.program.components().count() > 1 {
            self.program.clone()
        } else {
            program.clone()
        };
        let (mut cmd, launcher) = match &self.netns {
            Some(ns) => {
                let ip = resolve_program(Path::new("ip"))?;
                let mut cmd = Command::new(&ip);
                cmd.args(["netns", "exec", ns]).arg(&run_as);
                (cmd, Some(ip))
            }
            None => (Command::new(&run_as), None),
        };
        cmd.args(&self.args);
        for k in &self.env_removes {
            cmd.env_remove(k);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(parent) = self.log_path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| HarnessError::io(format!("creating log directory {}", parent.display()), e))?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(format!("opening log file {}", self.log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io(format!("duplicating {}", self.log_path.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let detached = self.detached;
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls
        // (setsid, prctl, getppid, kill); it allocates nothing and touches no locks.
        unsafe {
            cmd.pre_exec(move || {
                if detached {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may already be gone between fork and prctl.
                    if libc::getppid() == 1 {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
                Ok(())
            });
        }
        let command_line = describe(&cmd);
        let child = cmd.spawn().map_err(|source| HarnessError::Spawn {
            command: command_line.clone(),
            source,
        })?;
        let pid = child.id();
        Ok(Process {
            name: self.name,
            pid,
            program,
            launcher,
            netns: self.netns,
            log_path: self.log_path,
            command_line,
            detached,
            start_time: proc_start_time(pid),
            inner: Mutex::new(Inner {
                child: Some(child),
                status: None,
            }),
        })
    }
}

#[derive(Debug)]
struct Inner {
    child: Option<Child>,
    status: Option<ExitStatus>,
}

/// A long-running process we started, with its log file. `Drop` stops it (SIGTERM, up to 5 s, SIGKILL).
///
/// Only the PID this value started is ever signalled, and only while it has not been reaped.
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    program: PathBuf,
    launcher: Option<PathBuf>,
    netns: Option<String>,
    log_path: PathBuf,
    command_line: String,
    detached: bool,
    start_time: Option<u64>,
    inner: Mutex<Inner>,
}

impl Process {
    /// Shorthand for [`ProcessBuilder::new`].
    pub fn builder(name: impl Into<String>, program: impl AsRef<Path>, log_path: impl AsRef<Path>) -> ProcessBuilder {
        ProcessBuilder::new(name, program, log_path)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name given at spawn (e.g. `agent-2`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID (the program's own: `ip netns exec` execs).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The canonical path of the program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The network namespace it runs in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// The command line, with any `--token` value redacted.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (lossy UTF-8; empty if the file is gone).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status, if it has exited (reaps it).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut inner = self.inner();
        if inner.status.is_none()
            && let Some(child) = inner.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            inner.status = Some(status);
        }
        inner.status
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none() && self.inner().child.is_some()
    }

    /// Sends `signal`, unless it has already exited (so a reused PID is never hit).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.try_status().is_some() || self.inner().child.is_none() {
            return Ok(());
        }
        signal_pid(self.pid, signal)
    }

    /// SIGTERM.
    pub fn terminate(&self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// SIGKILL.
    pub fn kill9(&self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if self.inner().child.is_none() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(REAP_POLL);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and wait. Returns how it ended.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        let _ = self.terminate();
        if let Some(status) = self.wait_exit(grace) {
            return Some(status);
        }
        let _ = self.kill9();
        self.wait_exit(Duration::from_secs(5))
    }

    /// What a state file needs to find (and safely kill) this process later.
    pub fn record(&self) -> ProcessRecord {
        ProcessRecord {
            name: self.name.clone(),
            pid: self.pid,
            exe: self.program.clone(),
            launcher: self.launcher.clone(),
            start_time: self.start_time,
            netns: self.netns.clone(),
            log: self.log_path.clone(),
        }
    }

    /// Lets the process outlive this value (and this program). Only for processes spawned
    /// `.detached(true)`; others would die with their spawning thread.
    pub fn detach(self) -> Result<ProcessRecord> {
        if !self.detached {
            return Err(HarnessError::Misuse(format!(
                "{}: only processes spawned with .detached(true) can be detached",
                self.name
            )));
        }
        let record = self.record();
        // Dropping the Child handle neither kills nor reaps; init adopts it when we exit.
        self.inner().child = None;
        Ok(record)
    }

    /// A one-line description of how it ended, for assertion messages.
    pub fn describe_status(status: Option<ExitStatus>) -> String {
        match status {
            None => "still running".into(),
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit code {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                (None, None) => format!("{s}"),
            },
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.inner().child.is_some() {
            self.stop(STOP_GRACE);
        }
    }
}

/// The stdout of a command that must have succeeded; panics with both streams otherwise (for tests).
pub fn expect_success(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let line = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 \
                    18446744073709551615";
        assert_eq!(parse_stat(line), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(proc_start_time(me).is_some());
        assert!(proc_exe(me).is_some());
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn describe_redacts_tokens() {
        let mut cmd = Command::new("nimbus-agent");
        cmd.args(["--token", "nimbus1.secret", "--node-name", "a", "--token=nimbus1.other"]);
        let text = describe(&cmd);
        assert_eq!(text, "nimbus-agent --token <redacted> --node-name a --token=<redacted>");
    }

    #[test]
    fn run_with_timeout_captures_output_and_status() {
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 4"]),
            COMMAND_TIMEOUT,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(4));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    }

    #[test]
    fn run_with_timeout_kills_the_whole_group() {
        let start = Instant::now();
        let err = run_with_timeout(
            Command::new("sh").args(["-c", "echo started; sleep 30 & sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "readers must not wait for the background sleep"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("did not finish within") && msg.contains("started"),
            "{msg}"
        );
    }

    #[test]
    fn run_checked_reports_stderr() {
        let err = run_checked(Command::new("sh").args(["-c", "echo boom >&2; exit 2"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("boom") && msg.contains("exit status: 2"), "{msg}");
    }

    #[test]
    fn resolve_program_finds_sleep_on_path() {
        let p = resolve_program(Path::new("sleep")).unwrap();
        assert!(p.is_absolute() && p.ends_with("sleep"), "{}", p.display());
        assert!(resolve_program(Path::new("definitely-not-a-program-nimbus")).is_err());
    }
}
