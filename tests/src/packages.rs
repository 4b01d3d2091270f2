//! What the package tests (`tests/deb.rs`, `tests/rpm.rs`) share: commands that must succeed within a
//! timeout, prerequisites that skip the test or fail it under `NIMBUS_REQUIRE_ROOT_TESTS=1`, a minimal `/etc`
//! for a throwaway root, and a snapshot of the host's files that package scripts could change by mistake.
//!
//! These are assertion helpers: they panic with the command and its output when something is not as expected.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::env::REQUIRE_ROOT_ENV;

/// The agent's package.
pub const AGENT: &str = "nimbus-agent";
/// The coordinator's package (with nimbusctl).
pub const COORDINATOR: &str = "nimbus-coordinator";
/// The coordinator's system user and group (packaging/sysusers.d/nimbus-coordinator.conf).
pub const SERVICE_USER: &str = "nimbus-coordinator";
/// Limit for a packaging/build-*.sh run (it may compile the binaries).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// Limit for one package tool command (dpkg, rpm, a maintainer script).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Lossy UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// stdout followed by stderr.
pub fn both(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// Runs `cmd` within `timeout`, without the caller's `NIMBUS_*` variables (a package script or tool must not
/// see the test's configuration), and returns its output whatever the exit status.
///
/// # Panics
/// When it cannot be started or does not finish in time.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NIMBUS_") {
            cmd.env_remove(key);
        }
    }
    crate::run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run`], and asserts that the command succeeded.
///
/// # Panics
/// As [`run`], and when the command exits non-zero (the message has its output).
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let out = run(cmd, timeout);
    assert!(out.status.success(), "{what} failed ({}):\n{}", out.status, both(&out));
    out
}

/// The agent's and the coordinator's package files, as a packaging/build-*.sh script printed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The nimbus-agent package.
    pub agent: PathBuf,
    /// The nimbus-coordinator package.
    pub coordinator: PathBuf,
}

impl Built {
    /// `(package name, file)` of both.
    pub fn each(&self) -> [(&'static str, &Path); 2] {
        [(AGENT, &self.agent), (COORDINATOR, &self.coordinator)]
    }
}

/// Runs `packaging/<script>` (build-deb.sh, build-rpm.sh) within [`BUILD_TIMEOUT`] and picks the two packages
/// from the paths it printed (one a line, relative to the workspace): the file named `<package><sep><version>...`.
///
/// # Panics
/// When the script fails, or did not print both packages.
pub fn build_packages(script: &str, sep: char) -> Built {
    let out = run_ok(
        &mut Command::new(crate::env::workspace_dir().join("packaging").join(script)),
        BUILD_TIMEOUT,
    );
    let printed: Vec<PathBuf> = text(&out.stdout)
        .lines()
        .map(|l| crate::env::workspace_dir().join(l))
        .collect();
    let find = |pkg: &str| -> PathBuf {
        printed
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str()?.strip_prefix(&format!("{pkg}{sep}")))
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .unwrap_or_else(|| panic!("{script} printed no {pkg} package:\n{}", both(&out)))
            .clone()
    };
    Built {
        agent: find(AGENT),
        coordinator: find(COORDINATOR),
    }
}

/// Whether `tool` is on `PATH`.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            dir.join(tool)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether `program args...` runs and exits 0 within [`TIMEOUT`] (e.g. `cargo deb --version`).
pub fn succeeds(program: &str, args: &[&str]) -> bool {
    crate::run_with_timeout(Command::new(program).args(args), TIMEOUT).is_ok_and(|o| o.status.success())
}

/// The first of `tools` that is not on `PATH`, as "TOOL is not on PATH (HINT)".
pub fn missing_tool(tools: &[&str], hint: &str) -> Option<String> {
    tools
        .iter()
        .find(|tool| !on_path(tool))
        .map(|tool| format!("{tool} is not on PATH ({hint})"))
}

/// `true` when `problem` is `None`. Otherwise prints `SKIPPED <test>: <problem>` and returns `false` (the
/// caller returns early), or panics when `NIMBUS_REQUIRE_ROOT_TESTS=1` (CI).
///
/// # Panics
/// As said, under `NIMBUS_REQUIRE_ROOT_TESTS=1`.
pub fn prerequisites_met(problem: Option<String>) -> bool {
    let test = std::thread::current().name().unwrap_or("this test").to_string();
    let Some(problem) = problem else {
        return true;
    };
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v.trim() == "1") {
        panic!("{test}: {problem} ({REQUIRE_ROOT_ENV}=1 is set)");
    }
    eprintln!("SKIPPED {test}: {problem} (set {REQUIRE_ROOT_ENV}=1 to make this a failure)");
    false
}

/// `root/etc` with just root in `passwd`, `group`, `shadow` and `gshadow` (the last two mode 0640), for package
/// scripts to add their users to.
///
/// # Panics
/// When a file cannot be written.
pub fn minimal_etc(root: &Path) {
    let etc = root.join("etc");
    let write = |name: &str, body: &str, mode: u32| {
        let path = etc.join(name);
        std::fs::write(&path, body).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    };
    std::fs::create_dir_all(&etc).unwrap_or_else(|e| panic!("creating {}: {e}", etc.display()));
    write("passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644);
    write("group", "root:x:0:\n", 0o644);
    write("shadow", "root:*:19000:0:99999:7:::\n", 0o640);
    write("gshadow", "root:*::\n", 0o640);
}

/// The whole `name:...` line of `name` in `root/etc/<file>` (`passwd`, `group`), if any.
///
/// # Panics
/// When the file cannot be read.
pub fn entry_in(root: &Path, file: &str, name: &str) -> Option<String> {
    let path = root.join("etc").join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .map(str::to_string)
}

/// uid (`passwd`) or gid (`group`) of `name` in the root.
///
/// # Panics
/// As [`entry_in`].
pub fn id_in(root: &Path, file: &str, name: &str) -> Option<u32> {
    entry_in(root, file, name).and_then(|l| l.split(':').nth(2)?.parse().ok())
}

/// Permission bits (with setuid/setgid/sticky) of `path`.
///
/// # Panics
/// When `path` does not exist.
pub fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// One host path and what it held: a file's bytes, `<exists>` for anything else, `None` when absent.
pub type Snapshot = Vec<(PathBuf, Option<Vec<u8>>)>;

/// The state of `paths` now, to compare after a test that must not change them.
pub fn host_snapshot(paths: &[&str]) -> Snapshot {
    let mut paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let state = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => std::fs::read(&p).ok(),
                Ok(_) => Some(b"<exists>".to_vec()),
                Err(_) => None,
            };
            (p, state)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_etc_resolves_root_only() {
        let dir = tempfile::tempdir().unwrap();
        minimal_etc(dir.path());
        assert_eq!(id_in(dir.path(), "passwd", "root"), Some(0));
        assert_eq!(id_in(dir.path(), "group", "root"), Some(0));
        assert_eq!(id_in(dir.path(), "passwd", "nobody"), None);
        assert_eq!(mode_of(&dir.path().join("etc/shadow")), 0o640);
    }

    #[test]
    fn missing_tool_names_the_first_absent_one() {
        assert_eq!(missing_tool(&["sh"], "hint"), None);
        let problem = missing_tool(&["sh", "no-such-tool-here"], "apt-get install x").unwrap();
        assert_eq!(problem, "no-such-tool-here is not on PATH (apt-get install x)");
    }

    #[test]
    fn snapshot_tells_files_from_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let missing = dir.path().join("missing");
        let snap = host_snapshot(&[
            file.to_str().unwrap(),
            dir.path().to_str().unwrap(),
            missing.to_str().unwrap(),
        ]);
        let state: Vec<_> = snap.into_iter().map(|(_, s)| s).collect();
        assert_eq!(state, vec![Some(b"<exists>".to_vec()), Some(b"x".to_vec()), None]);
    }
}
