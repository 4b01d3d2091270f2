//! Checks of deploy/lab.sh that change nothing on the system: syntax, usage errors, the root check.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn script() -> PathBuf {
    e2e::env::workspace_dir().join("deploy").join("lab.sh")
}

fn run(args: &[&str]) -> Output {
    Command::new("bash").arg(script()).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn script_parses_and_is_strict() {
    let out = Command::new("bash").arg("-n").arg(script()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let body = std::fs::read_to_string(script()).unwrap();
    assert!(body.contains("set -euo pipefail"));
    assert!(
        body.contains("/run/nimbus-lab/state.json"),
        "the pre-check matches DEFAULT_STATE_FILE"
    );
    assert!(body.contains(e2e::lab::DEFAULT_STATE_FILE));
    if Command::new("shellcheck").arg("--version").output().is_ok() {
        let out = Command::new("shellcheck").arg(script()).output().unwrap();
        assert!(out.status.success(), "shellcheck:\n{}", text(&out));
    }
}

#[test]
fn usage_errors_exit_64_before_doing_anything() {
    for args in [
        &["frobnicate"][..],
        &[],
        &["up", "0"],
        &["up", "abc"],
        &["up", "201"],
        &["up", "3", "27"],
        &["up", "3", "x"],
        &["up", "3", "2", "1"],
        &["down", "extra"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(64), "lab.sh {args:?}: {}", text(&out));
        assert!(
            text(&out).contains("usage")
                || text(&out).contains("AGENTS must be")
                || text(&out).contains("ZONES must be"),
            "{}",
            text(&out)
        );
    }
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help).contains("up [AGENTS [ZONES]]"));
}

#[test]
fn non_root_is_refused_with_a_clear_message() {
    let out = if nix::unistd::geteuid().is_root() {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash"])
            .arg(script())
            .arg("status")
            .output()
            .unwrap()
    } else {
        run(&["status"])
    };
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("must run as root"), "{}", text(&out));
}
