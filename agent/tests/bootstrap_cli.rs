//! `nimbus-agent bootstrap` as an operator runs it: into a temporary root, twice; the second run changes
//! nothing, and without systemd it prints what remains to do.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn run(root: &std::path::Path, token_file: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nimbus-agent"))
        .args(["bootstrap", "--coordinator", "192.0.2.1:7443", "--ca-pin"])
        .arg(format!("sha256:{}", "ab".repeat(32)))
        .arg("--token-file")
        .arg(token_file)
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bootstrap_into_a_root_twice_changes_nothing_the_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let token = dir.path().join("token");
    std::fs::write(&token, "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv\n").unwrap();

    let (code, stdout, stderr) = run(&root, &token);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout.matches("written:").count(), 6, "{stdout}");
    assert!(
        stdout.contains("systemctl enable --now --no-block nimbus-agent.service"),
        "{stdout}"
    );
    let installed = root.join("usr/local/bin/nimbus-agent");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_nimbus-agent")).unwrap()
    );
    let mode = std::fs::metadata(root.join("etc/nimbus/join-token"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/nimbus-agent.service")).unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("RestartPreventExitStatus=10 64 77"),
        "{unit}"
    );

    let (code, stdout, _) = run(&root, &token);
    assert_eq!(code, 0);
    assert_eq!(stdout.matches("written:").count(), 0, "{stdout}");
    assert!(stdout.contains("nothing changed"), "{stdout}");

    // A malformed token is refused with the usage exit code, before anything is written.
    std::fs::write(&token, "nimbus1.nope\n").unwrap();
    let fresh = dir.path().join("fresh");
    let (code, _, stderr) = run(&fresh, &token);
    assert_eq!(code, 64, "{stderr}");
    assert!(!fresh.exists());
}
