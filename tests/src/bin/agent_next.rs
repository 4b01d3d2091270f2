//! TEST BUILD, not a release: `nimbus-agent` reporting the next patch version of the workspace (0.1.0 → 0.1.1).
//!
//! The same code as `nimbus-agent` (`agent::cli::main`), with `agent::set_version` called first, so the upgrade
//! end-to-end tests have a "new agent build" to publish, roll out, stage and restart into, without a second
//! source tree. Derived from `CARGO_PKG_VERSION`, so it stays newer than the agent when the workspace version
//! moves.

use std::process::ExitCode;

/// `major.minor.(patch+1)` of a plain `major.minor.patch` version; `None` for anything else.
fn next_patch(v: &str) -> Option<String> {
    let mut parts = v.split('.');
    let (major, minor, patch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (major, minor, patch): (u64, u64, u64) = (major.parse().ok()?, minor.parse().ok()?, patch.parse().ok()?);
    Some(format!("{major}.{minor}.{}", patch.checked_add(1)?))
}

fn main() -> ExitCode {
    let Some(next) = next_patch(env!("CARGO_PKG_VERSION")) else {
        eprintln!(
            "nimbus-agent-next: the workspace version {} is not plain MAJOR.MINOR.PATCH; adjust this test build",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::FAILURE;
    };
    // Once per process: the leaked string lives as long as the process anyway.
    agent::set_version(Box::leak(next.into_boxed_str()));
    agent::cli::main()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_patch_is_newer() {
        assert_eq!(next_patch("0.1.0").as_deref(), Some("0.1.1"));
        assert_eq!(next_patch("1.9.41").as_deref(), Some("1.9.42"));
        assert_eq!(next_patch("1.2.3-rc.1"), None);
        assert_eq!(next_patch("1.2"), None);
    }
}
