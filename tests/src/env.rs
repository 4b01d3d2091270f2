//! The environment: root check (skip or fail), where the daemon binaries are.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::error::{HarnessError, Result};
use crate::netns::{TEST_PREFIX, delete_netns};
use crate::process::run_checked;

/// Set to `1` to turn "needs root" skips into failures (CI).
pub const REQUIRE_ROOT_ENV: &str = "NIMBUS_REQUIRE_ROOT_TESTS";

/// Directory holding `nimbus-coordinator`, `nimbus-agent` and `nimbusctl`. Overrides the default.
pub const BIN_DIR_ENV: &str = "NIMBUS_BIN_DIR";

/// The coordinator binary's file name.
pub const COORDINATOR_BIN: &str = "nimbus-coordinator";
/// The agent binary's file name.
pub const AGENT_BIN: &str = "nimbus-agent";
/// The CLI's file name.
pub const CTL_BIN: &str = "nimbusctl";

/// Whether we are root and `ip netns add` works; the error says why not. Probed once per process.
pub fn netns_available() -> Result<()> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(probe).clone().map_err(HarnessError::NoNetns)
}

fn probe() -> std::result::Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    let name = format!("{TEST_PREFIX}-{}-probe", std::process::id());
    run_checked(Command::new("ip").args(["netns", "add", &name])).map_err(|e| e.to_string())?;
    delete_netns(&name).map_err(|e| e.to_string())
}

/// `true` when privileged tests can run. Otherwise: panics if `NIMBUS_REQUIRE_ROOT_TESTS=1`, else prints
/// `SKIPPED <test>: needs root (...)` and returns `false` (the caller returns early).
pub fn require_root() -> bool {
    let test = std::thread::current().name().unwrap_or("this test").to_string();
    match netns_available() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v.trim() == "1") {
                panic!("{test} needs root and {REQUIRE_ROOT_ENV}=1 is set: {e}");
            }
            eprintln!("SKIPPED {test}: needs root (set {REQUIRE_ROOT_ENV}=1 to make this a failure): {e}");
            false
        }
    }
}

/// The workspace root (parent of this crate's manifest directory).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where the daemon binaries are: `$NIMBUS_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`, else
/// `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(t) if Path::new(&t).is_absolute() => PathBuf::from(t),
        Some(t) => workspace_dir().join(t),
        None => workspace_dir().join("target"),
    };
    target.join("debug")
}

/// `dir/name` if it is a file, else [`HarnessError::BinaryNotFound`].
pub fn binary_in(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::BinaryNotFound {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        })
    }
}

/// The path of binary `name` in [`bin_dir`].
///
/// # Panics
/// With "NAME not found in DIR: run `cargo build --workspace --bins` first" when it is missing.
pub fn binary(name: &str) -> PathBuf {
    binary_in(&bin_dir(), name).unwrap_or_else(|e| panic!("{e}"))
}

/// The three daemon binaries, resolved in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    /// `nimbus-coordinator`.
    pub coordinator: PathBuf,
    /// `nimbus-agent`.
    pub agent: PathBuf,
    /// `nimbusctl`.
    pub ctl: PathBuf,
}

impl Binaries {
    /// Resolves all three in `dir`; the error names the first one missing.
    pub fn in_dir(dir: &Path) -> Result<Binaries> {
        Ok(Binaries {
            coordinator: binary_in(dir, COORDINATOR_BIN)?,
            agent: binary_in(dir, AGENT_BIN)?,
            ctl: binary_in(dir, CTL_BIN)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = binary_in(dir.path(), AGENT_BIN).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("nimbus-agent not found in {}", dir.path().display())),
            "{err}"
        );
        assert!(err.contains("run `cargo build --workspace --bins` first"), "{err}");
    }

    #[test]
    fn binaries_resolve_when_present() {
        let dir = tempfile::tempdir().unwrap();
        for name in [COORDINATOR_BIN, AGENT_BIN] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let err = Binaries::in_dir(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("nimbusctl not found"), "{err}");
        std::fs::write(dir.path().join(CTL_BIN), b"").unwrap();
        let bins = Binaries::in_dir(dir.path()).unwrap();
        assert_eq!(bins.agent, dir.path().join(AGENT_BIN));
    }

    #[test]
    fn workspace_dir_holds_the_workspace_manifest() {
        assert!(workspace_dir().join("Cargo.toml").is_file());
        assert!(workspace_dir().join("tests").join("Cargo.toml").is_file());
    }
}
