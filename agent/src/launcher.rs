//! `nimbus-agent launch`: the unit's main process. It starts the agent version [`versions::resolve`] picks as
//! a child, relays the child's readiness to systemd, and rolls a new version back when it does not become
//! ready.
//!
//! * **Notify relay.** The launcher binds its own `NOTIFY_SOCKET` (a Unix datagram socket with `SO_PASSCRED`
//!   in a private 0700 directory under `$RUNTIME_DIRECTORY` or `/run`) and gives it to the child. Datagrams
//!   whose sender is not the child's PID are dropped; of the rest, `READY`, `STATUS`, `WATCHDOG`, `STOPPING`,
//!   `RELOADING` and `MONOTONIC_USEC` lines go on to systemd, so `Type=notify` and `WatchdogSec=` keep working
//!   with `NotifyAccess=main`. The child gets `WATCHDOG_USEC` but not `WATCHDOG_PID` (it names the launcher).
//!   While a child is not ready the launcher pings the watchdog itself: it enforces its own deadline.
//! * **Signals.** SIGTERM, SIGINT and SIGHUP go to the child; after SIGTERM/SIGINT the launcher waits for it and
//!   exits as it did (same code, or the same signal).
//! * **Health.** A *pending* version (activated, not yet confirmed) must send `READY=1` within the deadline
//!   (default 120 s). Not ready in time → SIGKILL, a failed start; exiting before ready → a failed start. Starts
//!   are counted in `upgrade.json` before they begin, so launcher restarts and `kill -9` cannot reset the count.
//!   After `max_failures` (default 3) the version is rolled back and recorded as failed with the last reason
//!   ("exited 1 before ready", "not ready within 120s"), and the previous binary is started. `READY=1` from a
//!   pending version confirms it. A confirmed version or the package binary has no deadline: a first
//!   enrollment may wait hours for `nimbusctl node accept`, and there is nothing to roll back to.
//! * **Exit codes.** After ready, exit 75 ([`crate::error::EXIT_RESTART`]) means "restart into the new
//!   current version": the launcher starts it at once. Any other code ends the launcher with that code, so
//!   `Restart=on-failure` and `RestartPreventExitStatus=` keep their meaning. A non-pending child exiting before
//!   ready also ends the launcher with its code.
//!
//! **Invariant:** the launcher never upgrades itself (it is the package binary), writes nothing while no
//! version is pending, and runs without threads or an async runtime: one `poll` over the notify socket and a
//! signalfd. Must be called before the process starts any thread (it blocks signals in the calling thread).

use std::ffi::OsString;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt};
use nix::unistd::Pid;

use crate::error::EXIT_RESTART;
use crate::versions::{self, AgentVersion, Slot};

/// How long a pending version has to send `READY=1`. Default 120 s. Flag: `--deadline`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// Failed starts of a pending version before it is rolled back. Default 3. Flag: `--max-failures`.
pub const DEFAULT_MAX_FAILURES: u32 = 3;
/// Pause between failed starts of a pending version. Default 5 s (the unit's `RestartSec`). Flag: `--retry-delay`.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Set to `1` in the child's environment: the agent runs under the launcher (exit 75 restarts it).
pub const LAUNCHER_ENV: &str = "NIMBUS_LAUNCHER";
/// Notification keys passed on to systemd; everything else is dropped.
pub const RELAYED_KEYS: [&str; 6] = ["READY", "STATUS", "WATCHDOG", "STOPPING", "RELOADING", "MONOTONIC_USEC"];

/// Largest notification accepted (systemd's own limit is similar); longer ones are truncated and dropped.
const DATAGRAM_MAX: usize = 4096;
/// Most relayed lines in one datagram.
const MAX_PAIRS: usize = RELAYED_KEYS.len();

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Where `versions/`, `current` and `upgrade.json` live. Default /var/lib/nimbus-agent.
    pub state_dir: PathBuf,
    /// Started when no staged version is usable: the package's own binary (normally this program).
    pub package_binary: PathBuf,
    /// Arguments for the agent.
    pub args: Vec<OsString>,
    pub deadline: Duration,
    pub max_failures: u32,
    pub retry_delay: Duration,
    /// The private notify directory is created inside. Default `$RUNTIME_DIRECTORY` or /run.
    pub runtime_dir: PathBuf,
}

impl LaunchOptions {
    /// The defaults, for the package binary and these agent arguments.
    pub fn new(package_binary: PathBuf, args: Vec<OsString>) -> LaunchOptions {
        LaunchOptions {
            state_dir: PathBuf::from(versions::DEFAULT_STATE_DIR),
            package_binary,
            args,
            deadline: DEFAULT_DEADLINE,
            max_failures: DEFAULT_MAX_FAILURES,
            retry_delay: DEFAULT_RETRY_DELAY,
            runtime_dir: default_runtime_dir(),
        }
    }
}

/// How the launcher ends: as its last child did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(u8),
    /// Killed by this signal number.
    Signal(i32),
}

impl Exit {
    fn of(status: ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(u8::try_from(c & 0xff).unwrap_or(1)),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "cannot create the launcher's notify socket {}: {source}; check that {} is writable (or set RUNTIME_DIRECTORY)",
        .path.display(), .path.parent().and_then(Path::parent).unwrap_or(Path::new("/")).display()
    )]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot take over SIGTERM, SIGINT, SIGHUP and SIGCHLD: {0}")]
    Signals(#[source] Errno),
    #[error("cannot start {}: {source}; reinstall the nimbus-agent package", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the agent failed: {0}")]
    Wait(#[source] std::io::Error),
}

/// `$RUNTIME_DIRECTORY` (its first entry) when systemd sets it, else /run.
pub fn default_runtime_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from("/run"))
}

/// This program's path: the package binary. (After the package manager replaced the file, Linux reports
/// "<path> (deleted)": the new file at the same path is meant.)
pub fn package_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/nimbus-agent"));
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(s) => PathBuf::from(s),
        None => exe,
    }
}

/// Ends the process as `exit` says: `Code` as the exit code; `Signal` by raising the same signal (so systemd
/// sees what it would have seen without the launcher), falling back to 128+signal when it does not kill.
pub fn exit_code(exit: Exit) -> ExitCode {
    match exit {
        Exit::Code(c) => ExitCode::from(c),
        Exit::Signal(s) => {
            if let Ok(sig) = Signal::try_from(s) {
                let _ = nix::sys::signal::raise(sig);
                let mut set = SigSet::empty();
                set.add(sig);
                let _ = set.thread_unblock();
            }
            ExitCode::from(128u8.saturating_add(u8::try_from(s).unwrap_or(0)))
        }
    }
}

/// The private directory holding the notify socket; removed on drop.
struct RuntimeDir(PathBuf);

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The launcher's descriptors: the notify socket and a signalfd for the forwarded signals and SIGCHLD.
struct Io {
    sock: UnixDatagram,
    sock_path: PathBuf,
    signals: SignalFd,
    _dir: RuntimeDir,
}

impl Io {
    fn new(runtime_dir: &Path) -> Result<Io, LaunchError> {
        let dir = runtime_dir.join(format!("nimbus-launch.{}", std::process::id()));
        let sock_path = dir.join("notify");
        let sock_err = |source| LaunchError::Socket {
            path: sock_path.clone(),
            source,
        };
        // A leftover of an earlier process with our PID.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|_| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(sock_err)?;
        let dir = RuntimeDir(dir);
        let sock = UnixDatagram::bind(&sock_path).map_err(sock_err)?;
        sock.set_nonblocking(true).map_err(sock_err)?;
        setsockopt(&sock, sockopt::PassCred, &true).map_err(|e| sock_err(e.into()))?;

        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
            mask.add(s);
        }
        // Blocked here, read from the signalfd; unblocked again in the child (see `with_default_signals`).
        mask.thread_block().map_err(LaunchError::Signals)?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(LaunchError::Signals)?;
        Ok(Io {
            sock,
            sock_path,
            signals,
            _dir: dir,
        })
    }

    /// Waits until the socket or the signalfd is readable, or `timeout` passes. Returns (socket, signals).
    fn wait(&self, timeout: Option<Duration>) -> Result<(bool, bool), LaunchError> {
        let timeout = match timeout {
            // Rounded up to whole milliseconds, so a wake-up is never early.
            Some(d) => PollTimeout::try_from(d.as_millis().saturating_add(1)).unwrap_or(PollTimeout::MAX),
            None => PollTimeout::NONE,
        };
        let mut fds = [
            PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(LaunchError::Wait(e.into())),
        }
        let readable = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        Ok((readable(&fds[0]), readable(&fds[1])))
    }

    /// The next pending signal, if any.
    fn next_signal(&self) -> Option<Signal> {
        match self.signals.read_signal() {
            Ok(Some(info)) => i32::try_from(info.ssi_signo)
                .ok()
                .and_then(|s| Signal::try_from(s).ok()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the signalfd failed");
                None
            }
        }
    }

    /// Hands every queued notification from `pid` to `each`; drops the others.
    fn drain(&self, pid: i32, each: &mut dyn FnMut(&str)) {
        let mut buf = [0u8; DATAGRAM_MAX];
        loop {
            let mut cmsg = nix::cmsg_space!(UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let (len, sender, truncated) = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let sender = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid()),
                            _ => None,
                        })
                    });
                    (msg.bytes, sender, msg.flags.contains(MsgFlags::MSG_TRUNC))
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the notify socket failed");
                    return;
                }
            };
            if sender != Some(pid) {
                tracing::debug!(?sender, child = pid, "notification from another process dropped");
                continue;
            }
            if truncated {
                tracing::warn!("over-long notification from the agent dropped");
                continue;
            }
            match std::str::from_utf8(&buf[..len]) {
                Ok(text) => each(text),
                Err(_) => tracing::warn!("notification that is not UTF-8 dropped"),
            }
        }
    }

    /// Sleeps `d` unless SIGTERM/SIGINT comes first (then true).
    fn sleep(&self, d: Duration) -> Result<bool, LaunchError> {
        let until = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(false);
            }
            let (_, sig) = self.wait(Some(until - now))?;
            while sig && let Some(s) = self.next_signal() {
                if matches!(s, Signal::SIGTERM | Signal::SIGINT) {
                    return Ok(true);
                }
            }
        }
    }
}

/// Clears the signal mask in the child between fork and exec: std's spawn keeps the launcher's (which blocks
/// SIGTERM, SIGINT, SIGHUP and SIGCHLD), and an agent started with them blocked could not be stopped.
fn with_default_signals(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the forked child before exec and only calls pthread_sigmask, which is
    // async-signal-safe; it allocates nothing (SigSet is a plain sigset_t on the stack).
    unsafe {
        cmd.pre_exec(|| {
            let none = SigSet::empty();
            nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&none), None)
                .map_err(std::io::Error::from)
        })
    }
}

/// Passes the relayed lines of one notification to systemd; true when it holds `READY=1`.
fn relay(text: &str) -> bool {
    let mut pairs = [("", ""); MAX_PAIRS];
    let mut n = 0;
    let mut ready = false;
    for line in text.split('\n') {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !RELAYED_KEYS.contains(&key) || n == MAX_PAIRS {
            continue;
        }
        ready |= key == "READY" && value == "1";
        pairs[n] = (key, value);
        n += 1;
    }
    if n > 0 {
        notify(&pairs[..n]);
    }
    ready
}

fn notify(pairs: &[(&str, &str)]) {
    if let Err(e) = systemd::daemon::notify(pairs.iter()) {
        tracing::warn!(error = %e, "sd_notify failed; is NOTIFY_SOCKET valid?");
    }
}

/// How one child ended.
enum Outcome {
    /// It exited (or was killed) by itself; `ready`: it had sent READY=1.
    Exited { status: ExitStatus, ready: bool },
    /// A pending version missed the deadline and was killed.
    NotReady,
    /// SIGTERM/SIGINT was forwarded and it has exited.
    Stopped { status: ExitStatus, ready: bool },
}

fn signal_child(child: &Child, sig: Signal) {
    let Ok(pid) = i32::try_from(child.id()) else { return };
    if let Err(e) = kill(Pid::from_raw(pid), sig) {
        tracing::debug!(error = %e, signal = sig.as_str(), "signalling the agent failed (it is exiting)");
    }
}

/// Runs one child to its end. `pending`: the version is on probation (deadline, confirmation on READY).
fn supervise(
    io: &Io,
    child: &mut Child,
    pending: Option<&AgentVersion>,
    opts: &LaunchOptions,
    watchdog: Option<Duration>,
) -> Result<Outcome, LaunchError> {
    let pid = i32::try_from(child.id()).unwrap_or(-1);
    let started = Instant::now();
    let mut ready = false;
    let mut stopping = false;
    let mut next_ping = Instant::now();
    let on_message = |text: &str, ready: &mut bool| {
        let is_ready = text.split('\n').any(|l| l == "READY=1");
        if is_ready
            && !*ready
            && let Some(v) = pending
        {
            // Confirmed before systemd hears READY: whoever sees the unit ready sees the version confirmed.
            match versions::confirm(&opts.state_dir, v.as_str()) {
                Ok(_) => tracing::info!(version = %v, "new version ready: confirmed"),
                Err(e) => tracing::error!(version = %v, error = %e, "new version ready but not confirmed"),
            }
            if let Err(e) = versions::cleanup(&opts.state_dir) {
                tracing::warn!(error = %e, "removing old versions failed");
            }
        }
        *ready |= relay(text);
    };
    loop {
        if let Some(status) = child.try_wait().map_err(LaunchError::Wait)? {
            // Notifications sent just before the exit are still queued.
            io.drain(pid, &mut |t| on_message(t, &mut ready));
            return Ok(if stopping {
                Outcome::Stopped { status, ready }
            } else {
                Outcome::Exited { status, ready }
            });
        }
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        if !ready && !stopping && pending.is_some() {
            let deadline = started + opts.deadline;
            if now >= deadline {
                signal_child(child, Signal::SIGKILL);
                child.wait().map_err(LaunchError::Wait)?;
                return Ok(Outcome::NotReady);
            }
            wake = Some(deadline);
        }
        if !ready && let Some(period) = watchdog {
            if now >= next_ping {
                notify(&[("WATCHDOG", "1")]);
                next_ping = now + (period / 2).max(Duration::from_millis(10));
            }
            wake = Some(wake.map_or(next_ping, |w| w.min(next_ping)));
        }
        let (sock, sig) = io.wait(wake.map(|w| w.saturating_duration_since(now)))?;
        if sock {
            io.drain(pid, &mut |t| on_message(t, &mut ready));
        }
        while sig && let Some(s) = io.next_signal() {
            match s {
                Signal::SIGTERM | Signal::SIGINT => {
                    tracing::info!(signal = s.as_str(), "stopping the agent");
                    stopping = true;
                    signal_child(child, s);
                }
                Signal::SIGHUP => signal_child(child, s),
                // SIGCHLD: the exit is picked up at the top of the loop.
                _ => {}
            }
        }
    }
}

fn describe_deadline(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn failure_reason(status: ExitStatus) -> String {
    match Exit::of(status) {
        Exit::Code(c) => format!("exited {c} before ready"),
        Exit::Signal(s) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by {} before ready", sig.as_str()),
            Err(_) => format!("killed by signal {s} before ready"),
        },
    }
}

/// What to start next: the slot, its binary and, when it is on probation, its version and past attempts.
fn next_start(opts: &LaunchOptions, package_only: bool) -> (Slot, PathBuf, Option<(AgentVersion, u32)>) {
    if package_only {
        return (Slot::Package, opts.package_binary.clone(), None);
    }
    if let Err(e) = versions::reconcile(&opts.state_dir) {
        tracing::warn!(error = %e, "cannot finish an interrupted version switch");
    }
    let (slot, binary) = versions::resolve(&opts.state_dir, &opts.package_binary);
    let pending = versions::load(&opts.state_dir)
        .ok()
        .and_then(|st| st.pending)
        .filter(|p| slot.version() == Some(&p.version))
        .map(|p| (p.version, p.attempts));
    (slot, binary, pending)
}

/// Runs the agent under supervision until it stops for good; returns how the launcher should end.
pub fn launch(opts: &LaunchOptions) -> Result<Exit, LaunchError> {
    let io = Io::new(&opts.runtime_dir)?;
    let watchdog = daemon::notify::watchdog_period();
    // Set when the version machinery cannot be trusted for this run (unwritable record, unstartable binary).
    let mut package_only = false;
    loop {
        let (slot, binary, pending) = next_start(opts, package_only);
        if let Some((v, attempts)) = &pending {
            if *attempts >= opts.max_failures {
                let reason = versions::load(&opts.state_dir)
                    .ok()
                    .and_then(|st| st.pending)
                    .and_then(|p| p.last_error)
                    .unwrap_or_else(|| format!("not ready after {attempts} starts"));
                match versions::fail_and_roll_back(&opts.state_dir, &reason) {
                    Ok(now) => {
                        tracing::error!(version = %v, %reason, now = %now, "new version failed: rolled back");
                        daemon::notify::status(&format!("rolled back {v} ({reason}); starting {now}"));
                    }
                    Err(e) => {
                        tracing::error!(version = %v, error = %e, "cannot roll back; starting the package binary");
                        package_only = true;
                    }
                }
                continue;
            }
            match versions::begin_attempt(&opts.state_dir, v.as_str()) {
                Ok(n) => {
                    tracing::info!(version = %v, attempt = n, of = opts.max_failures, "starting a new version");
                    daemon::notify::status(&format!("starting {v} (attempt {n} of {})", opts.max_failures));
                }
                Err(e) => {
                    tracing::error!(version = %v, error = %e, "cannot count the start; starting the package binary");
                    package_only = true;
                    continue;
                }
            }
        } else {
            tracing::info!(version = %slot, binary = %binary.display(), "starting the agent");
        }
        let spawned = with_default_signals(&mut Command::new(&binary))
            .args(&opts.args)
            .env("NOTIFY_SOCKET", &io.sock_path)
            .env_remove("WATCHDOG_PID")
            .env(LAUNCHER_ENV, "1")
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some((v, _)) = &pending {
                    let reason = format!("cannot start: {e}");
                    tracing::error!(version = %v, %reason, "new version failed to start");
                    let _ = versions::note_failure(&opts.state_dir, v.as_str(), &reason);
                    if io.sleep(opts.retry_delay)? {
                        return Ok(Exit::Code(0));
                    }
                    continue;
                }
                if slot != Slot::Package {
                    tracing::error!(binary = %binary.display(), error = %e, "cannot start; starting the package binary");
                    package_only = true;
                    continue;
                }
                return Err(LaunchError::Spawn { binary, source: e });
            }
        };
        let outcome = supervise(&io, &mut child, pending.as_ref().map(|(v, _)| v), opts, watchdog)?;
        let failed = match outcome {
            Outcome::Stopped { status, ready } => {
                if !ready && let Some((v, _)) = &pending {
                    let _ = versions::abandon_attempt(&opts.state_dir, v.as_str());
                }
                return Ok(Exit::of(status));
            }
            Outcome::Exited { status, ready: true } if status.code() == Some(i32::from(EXIT_RESTART)) => {
                tracing::info!("the agent asked to restart into the current version");
                package_only = false;
                continue;
            }
            Outcome::Exited { status, ready: true } => return Ok(Exit::of(status)),
            Outcome::Exited { status, ready: false } if pending.is_none() => {
                tracing::warn!(reason = %failure_reason(status), "the agent stopped before it was ready");
                return Ok(Exit::of(status));
            }
            Outcome::Exited { status, ready: false } => failure_reason(status),
            Outcome::NotReady => format!("not ready within {}", describe_deadline(opts.deadline)),
        };
        let Some((v, _)) = &pending else {
            return Ok(Exit::Code(1));
        };
        tracing::warn!(version = %v, reason = %failed, "new version failed to start");
        let attempts = versions::note_failure(&opts.state_dir, v.as_str(), &failed).unwrap_or(u32::MAX);
        if attempts < opts.max_failures && io.sleep(opts.retry_delay)? {
            return Ok(Exit::Code(0));
        }
    }
}

/// `nimbus-agent launch`: [`launch`] with logging to stderr; when the launcher cannot set itself up, it
/// replaces itself with the binary [`versions::resolve_binary`] picks (same PID, so systemd still hears it).
pub fn main(opts: &LaunchOptions) -> ExitCode {
    match launch(opts) {
        Ok(exit) => exit_code(exit),
        Err(e @ (LaunchError::Socket { .. } | LaunchError::Signals(_))) => {
            use std::os::unix::process::CommandExt;
            let binary = versions::resolve_binary(&opts.state_dir, &opts.package_binary);
            tracing::error!(error = %e, binary = %binary.display(), "launcher unavailable; running the agent directly");
            let err = with_default_signals(&mut Command::new(&binary)).args(&opts.args).exec();
            eprintln!("nimbus-agent: launch: cannot run {}: {err}", binary.display());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nimbus-agent: launch: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_documented() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(failure_reason(ExitStatus::from_raw(1 << 8)), "exited 1 before ready");
        assert_eq!(
            failure_reason(ExitStatus::from_raw(9)),
            "killed by SIGKILL before ready"
        );
        assert_eq!(describe_deadline(Duration::from_secs(120)), "120s");
        assert_eq!(describe_deadline(Duration::from_millis(1500)), "1s 500ms");
        assert_eq!(Exit::of(ExitStatus::from_raw(75 << 8)), Exit::Code(75));
        assert_eq!(Exit::of(ExitStatus::from_raw(15)), Exit::Signal(15));
    }
}
