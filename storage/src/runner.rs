//! Running external programs: the [`Runner`] trait, the real [`SystemRunner`] and the [`RecordingRunner`] for
//! tests. Every program the engine runs goes through a runner, so a dry run can list them and tests can assert
//! exact sequences.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::StorageError;

/// Default timeout of one command. Override per host with [`crate::Host::command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this much of a command's stdout and of its stderr is kept.
const MAX_OUTPUT: u64 = 4 << 20;

/// One program invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub program: String,
    pub args: Vec<String>,
    /// Fed to the program's stdin (e.g. an `sfdisk` script); stdin is `/dev/null` otherwise.
    pub stdin: Option<String>,
    pub timeout: Duration,
    /// Changes the system (disk contents, kernel state, mounts, systemd). A dry run runs only commands that do
    /// not.
    pub mutating: bool,
}

impl Command {
    /// A read-only command with the default timeout.
    pub fn new(program: &str, args: &[&str]) -> Command {
        Command {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: None,
            timeout: DEFAULT_COMMAND_TIMEOUT,
            mutating: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Command {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Command {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn stdin(mut self, input: impl Into<String>) -> Command {
        self.stdin = Some(input.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Command {
        self.timeout = timeout;
        self
    }

    pub fn mutating(mut self) -> Command {
        self.mutating = true;
        self
    }

    /// `program arg…`, shell-quoted where needed, without stdin.
    pub fn argv_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The argv line; with stdin, followed by a here-document (`<<'EOF'` … `EOF`), as one would type it.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.argv_line())?;
        if let Some(input) = &self.stdin {
            write!(f, " <<'EOF'\n{}", input)?;
            if !input.ends_with('\n') {
                f.write_str("\n")?;
            }
            f.write_str("EOF")?;
        }
        Ok(())
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=,@%+-".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What a finished command returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when killed by a signal.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Exit code 0 and empty output.
    pub fn ok() -> Output {
        Output {
            status: Some(0),
            ..Output::default()
        }
    }

    /// Exit code 0 with `stdout`.
    pub fn stdout(stdout: &str) -> Output {
        Output {
            status: Some(0),
            stdout: stdout.to_string(),
            stderr: String::new(),
        }
    }

    /// Exit code `code` with `stderr`.
    pub fn fail(code: i32, stderr: &str) -> Output {
        Output {
            status: Some(code),
            stdout: String::new(),
            stderr: stderr.to_string(),
        }
    }

    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// `exit code N` / `killed by a signal`.
    pub fn status_text(&self) -> String {
        match self.status {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".to_string(),
        }
    }
}

/// Runs one command to completion (or its timeout). `Err` only when the command could not be started or timed
/// out; a non-zero exit is an `Ok` [`Output`] the caller judges.
pub trait Runner: Send + Sync {
    fn run(&self, cmd: &Command) -> Result<Output, StorageError>;
}

/// The real runner: `std::process`, `LC_ALL=C`, its own process group (killed as a whole on timeout).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, cmd: &Command) -> Result<Output, StorageError> {
        let mut child = std::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .env("LC_ALL", "C")
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| StorageError::Spawn {
                program: cmd.program.clone(),
                package: package_of(&cmd.program),
                source,
            })?;
        let writer = match (child.stdin.take(), cmd.stdin.clone()) {
            (Some(mut pipe), Some(input)) => Some(std::thread::spawn(move || {
                // A program that exits without reading its stdin closes the pipe: not our error.
                let _ = pipe.write_all(input.as_bytes());
            })),
            _ => None,
        };
        let out = child.stdout.take().map(|p| std::thread::spawn(move || read_capped(p)));
        let err = child.stderr.take().map(|p| std::thread::spawn(move || read_capped(p)));

        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= cmd.timeout => {
                    if let Ok(pid) = i32::try_from(child.id()) {
                        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(StorageError::Timeout {
                        command: cmd.argv_line(),
                        timeout: cmd.timeout,
                    });
                }
                Ok(None) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(StorageError::Spawn {
                        program: cmd.program.clone(),
                        package: package_of(&cmd.program),
                        source: e,
                    });
                }
            }
        };
        if let Some(w) = writer {
            let _ = w.join();
        }
        let stdout = out.and_then(|t| t.join().ok()).unwrap_or_default();
        let stderr = err.and_then(|t| t.join().ok()).unwrap_or_default();
        Ok(Output {
            status: status.code(),
            stdout,
            stderr,
        })
    }
}

fn read_capped(pipe: impl Read) -> String {
    let mut buf = Vec::new();
    let mut limited = pipe.take(MAX_OUTPUT);
    let _ = limited.read_to_end(&mut buf);
    // Drain the rest so the program does not block on a full pipe.
    let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
    String::from_utf8_lossy(&buf).into_owned()
}

/// The Debian package that ships `program`, for "install it" messages.
pub fn package_of(program: &str) -> &'static str {
    match program {
        "sfdisk" => "fdisk",
        "sgdisk" => "gdisk",
        "mkfs.xfs" => "xfsprogs",
        "mkfs.ext4" => "e2fsprogs",
        "pvcreate" | "vgcreate" | "lvcreate" | "vgs" | "lvs" | "pvs" | "lvremove" | "vgremove" | "pvremove" => "lvm2",
        "mdadm" => "mdadm",
        "systemctl" => "systemd",
        "mkdir" => "coreutils",
        "wipefs" | "blkid" | "partx" | "mount" | "umount" | "losetup" => "util-linux",
        _ => "the one that provides it",
    }
}

type Rule = (String, Output);

/// For tests: records every command; answers from scripted rules, or passes the command on to an inner runner
/// (`wrapping`) and records what it returned.
///
/// Rules match on the argv line's prefix ([`Command::argv_line`]): first the one-shot rules ([`Self::once`]),
/// oldest first, each used up by its match; then the standing rules ([`Self::on`]), the most recently added
/// first; without a match the answer is [`Output::ok`].
#[derive(Default)]
pub struct RecordingRunner {
    inner: Option<Arc<dyn Runner>>,
    once: Mutex<Vec<Rule>>,
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<Vec<Command>>,
}

impl RecordingRunner {
    /// Scripted answers only.
    pub fn new() -> RecordingRunner {
        RecordingRunner::default()
    }

    /// Records, then runs the command with `inner`.
    pub fn wrapping(inner: Arc<dyn Runner>) -> RecordingRunner {
        RecordingRunner {
            inner: Some(inner),
            ..RecordingRunner::default()
        }
    }

    /// Answer commands whose argv line starts with `prefix` with `output` (scripted mode).
    pub fn on(&self, prefix: &str, output: Output) -> &RecordingRunner {
        self.rules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((prefix.to_string(), output));
        self
    }

    /// Answer the next command whose argv line starts with `prefix` with `output`, once.
    pub fn once(&self, prefix: &str, output: Output) -> &RecordingRunner {
        self.once
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((prefix.to_string(), output));
        self
    }

    /// Every command so far, in order.
    pub fn calls(&self) -> Vec<Command> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every command so far as argv lines ([`Command::argv_line`]).
    pub fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Command::argv_line).collect()
    }

    /// Forget the commands recorded so far (rules stay).
    pub fn clear(&self) {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Runner for RecordingRunner {
    fn run(&self, cmd: &Command) -> Result<Output, StorageError> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(cmd.clone());
        if let Some(inner) = &self.inner {
            return inner.run(cmd);
        }
        let line = cmd.argv_line();
        {
            let mut once = self.once.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = once.iter().position(|(prefix, _)| line.starts_with(prefix.as_str())) {
                return Ok(once.remove(i).1);
            }
        }
        let rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        Ok(rules
            .iter()
            .rev()
            .find(|(prefix, _)| line.starts_with(prefix.as_str()))
            .map(|(_, out)| out.clone())
            .unwrap_or_else(Output::ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_and_shows_stdin() {
        let c = Command::new("sfdisk", &["/dev/loop0"])
            .arg("a b")
            .stdin("label: gpt\n")
            .mutating();
        assert_eq!(c.argv_line(), "sfdisk /dev/loop0 'a b'");
        assert_eq!(c.to_string(), "sfdisk /dev/loop0 'a b' <<'EOF'\nlabel: gpt\nEOF");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn system_runner_runs_feeds_stdin_and_times_out() {
        let r = SystemRunner;
        let out = r
            .run(&Command::new("sh", &["-c", "cat; echo err >&2; exit 3"]).stdin("hi"))
            .unwrap();
        assert_eq!(out.status, Some(3));
        assert_eq!(out.stdout, "hi");
        assert_eq!(out.stderr, "err\n");

        let started = Instant::now();
        let err = r
            .run(&Command::new("sh", &["-c", "sleep 30 & sleep 30"]).timeout(Duration::from_millis(200)))
            .unwrap_err();
        assert!(matches!(err, StorageError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let err = r.run(&Command::new("mkfs.nonexistent-fs", &[])).unwrap_err();
        assert!(matches!(err, StorageError::Spawn { .. }), "{err}");
    }

    #[test]
    fn recording_runner_scripts_by_prefix_latest_first() {
        let r = RecordingRunner::new();
        r.on("vgs", Output::fail(5, "not found"));
        r.on("vgs --noheadings -o vg_name fast", Output::stdout("  fast\n"));
        assert_eq!(
            r.run(&Command::new("vgs", &["--noheadings", "-o", "vg_name", "fast"]))
                .unwrap()
                .status,
            Some(0)
        );
        assert_eq!(r.run(&Command::new("vgs", &["other"])).unwrap().status, Some(5));
        assert!(r.run(&Command::new("true", &[])).unwrap().success());
        r.once("vgs other", Output::stdout("once"));
        assert_eq!(r.run(&Command::new("vgs", &["other"])).unwrap().stdout, "once");
        assert_eq!(r.run(&Command::new("vgs", &["other"])).unwrap().status, Some(5));
        assert_eq!(
            r.lines(),
            [
                "vgs --noheadings -o vg_name fast",
                "vgs other",
                "true",
                "vgs other",
                "vgs other"
            ]
        );
    }
}
