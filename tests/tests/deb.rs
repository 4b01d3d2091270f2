//! The `.deb` packages (`packaging/build-deb.sh`, cargo-deb): built from the dev binaries, inspected with
//! `dpkg-deb`, installed into a throwaway root with `dpkg --root` (maintainer scripts chrootless, so they see
//! `DPKG_ROOT`), removed (state kept) and purged (state, user and configuration gone), without touching the
//! host. `lintian` runs when it is installed (its report is printed).
//!
//! Needs root (the scripts chown to the service user and edit the root's passwd), `dpkg`, and cargo-deb
//! (`cargo install --locked cargo-deb`; packaging/build-deb.sh pins the version) plus the binaries of
//! `cargo build --workspace --bins`. Without root or cargo-deb the test is skipped, or fails when
//! `NIMBUS_REQUIRE_ROOT_TESTS=1` (CI).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use e2e::env::workspace_dir;
use e2e::packages::{
    AGENT, BUILD_TIMEOUT, COORDINATOR, SERVICE_USER, TIMEOUT, both, build_packages, host_snapshot, id_in, minimal_etc,
    missing_tool, mode_of, on_path, prerequisites_met, run, run_ok, succeeds, text,
};

/// `None` when everything this test needs is here; otherwise why not.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (the maintainer scripts chown files and edit the root's passwd)".into());
    }
    let tools = ["dpkg", "dpkg-deb", "dpkg-statoverride", "systemd-sysusers", "userdel"];
    if let Some(problem) = missing_tool(&tools, "Debian: apt-get install dpkg systemd passwd") {
        return Some(problem);
    }
    if !succeeds("cargo", &["deb", "--version"]) {
        return Some(
            "cargo-deb is not installed (cargo install --locked cargo-deb, or run packaging/build-deb.sh)".into(),
        );
    }
    None
}

/// `true` when the test can run; else skips with a reason, or panics under `NIMBUS_REQUIRE_ROOT_TESTS=1`.
fn prerequisites() -> bool {
    prerequisites_met(missing_prerequisite())
}

fn scripts() -> Vec<PathBuf> {
    let mut all = vec![workspace_dir().join("packaging/build-deb.sh")];
    for pkg in [AGENT, COORDINATOR] {
        for script in ["postinst", "prerm", "postrm"] {
            all.push(workspace_dir().join("packaging/deb").join(pkg).join(script));
        }
    }
    all
}

/// The maintainer scripts are POSIX sh with `set -e` and one `#DEBHELPER#` token, honour `DPKG_ROOT` and
/// guard systemctl; they and build-deb.sh are shellcheck-clean (when shellcheck is installed).
#[test]
fn scripts_are_posix_and_shellcheck_clean() {
    for path in &scripts()[1..] {
        let body = std::fs::read_to_string(path).unwrap();
        assert!(
            body.starts_with("#!/bin/sh\n"),
            "{}: not a POSIX sh script",
            path.display()
        );
        assert!(body.contains("\nset -e\n"), "{}: no set -e", path.display());
        assert_eq!(
            body.matches("#DEBHELPER#").count(),
            1,
            "{}: needs exactly one #DEBHELPER# token",
            path.display()
        );
        assert!(
            path.metadata().unwrap().permissions().mode() & 0o111 != 0,
            "{}: not executable",
            path.display()
        );
        for line in body.lines().filter(|l| {
            let l = l.trim_start();
            l.starts_with("systemctl ") || l.starts_with("deb-systemd-invoke ")
        }) {
            assert!(
                body.contains("[ -z \"${DPKG_ROOT:-}\" ] && [ -d /run/systemd/system ]"),
                "{}: `{line}` without the DPKG_ROOT/systemd guard",
                path.display()
            );
        }
        for line in body
            .lines()
            .filter(|l| l.contains("/var/lib/nimbus") && !l.trim_start().starts_with('#'))
        {
            assert!(
                line.contains("$DPKG_ROOT") || line.contains("STATE_DIR=") || line.contains("--home"),
                "{}: path without $DPKG_ROOT: {line}",
                path.display()
            );
        }
    }
    if on_path("shellcheck") {
        let out = run(Command::new("shellcheck").args(scripts()), TIMEOUT);
        assert!(out.status.success(), "shellcheck:\n{}", both(&out));
    } else {
        eprintln!("shellcheck is not installed: lint skipped (apt-get install shellcheck)");
    }
}

/// `dpkg-deb --field PKG FIELD`.
fn field(deb: &Path, name: &str) -> String {
    let out = run_ok(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name), TIMEOUT);
    text(&out.stdout).trim().to_string()
}

/// A control member (`conffiles`, `postinst`, ...) of the package.
fn control(deb: &Path, member: &str) -> String {
    let out = run_ok(Command::new("dpkg-deb").arg("--info").arg(deb).arg(member), TIMEOUT);
    text(&out.stdout)
}

/// `(mode string, owner/group, path)` of each entry of `dpkg-deb --contents`.
fn contents(deb: &Path) -> Vec<(String, String, String)> {
    let out = run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb), TIMEOUT);
    text(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6).then(|| {
                (
                    f[0].to_string(),
                    f[1].to_string(),
                    f[5].trim_start_matches('.').to_string(),
                )
            })
        })
        .collect()
}

fn assert_entry(entries: &[(String, String, String)], path: &str, mode: &str) {
    let found = entries.iter().find(|(_, _, p)| p == path);
    let Some((m, owner, _)) = found else {
        panic!("{path} is not in the package: {entries:#?}")
    };
    assert_eq!((m.as_str(), owner.as_str()), (mode, "0/0"), "{path}");
}

/// The unit's path in the package (cargo-deb chooses `/lib` or `/usr/lib`).
fn unit_in(entries: &[(String, String, String)], unit: &str) -> String {
    entries
        .iter()
        .map(|(_, _, p)| p)
        .find(|p| p.ends_with(&format!("/systemd/system/{unit}")))
        .unwrap_or_else(|| panic!("{unit} is not in the package"))
        .clone()
}

fn inspect_agent(deb: &Path) {
    assert_eq!(field(deb, "Package"), AGENT);
    let depends = field(deb, "Depends");
    assert!(
        depends.contains("libc6") && depends.contains("init-system-helpers"),
        "Depends: {depends}"
    );
    let recommends = field(deb, "Recommends");
    for tool in ["fdisk", "e2fsprogs", "xfsprogs"] {
        assert!(recommends.contains(tool), "Recommends {tool}: {recommends}");
    }
    let entries = contents(deb);
    assert_entry(&entries, "/usr/bin/nimbus-agent", "-rwxr-xr-x");
    assert_entry(&entries, "/etc/nimbus/agent.toml", "-rw-------");
    assert_entry(&entries, &unit_in(&entries, "nimbus-agent.service"), "-rw-r--r--");
    assert_eq!(control(deb, "conffiles").trim(), "/etc/nimbus/agent.toml");
    let postinst = control(deb, "postinst");
    assert!(
        postinst.contains("deb-systemd-helper") && !postinst.contains("#DEBHELPER#"),
        "postinst:\n{postinst}"
    );
    let starts = postinst.lines().map(str::trim_start).filter(|l| {
        l.starts_with("systemctl start")
            || l.starts_with("systemctl --system start")
            || l.starts_with("deb-systemd-invoke")
    });
    assert_eq!(starts.count(), 0, "the agent must not be started:\n{postinst}");
}

fn inspect_coordinator(deb: &Path) {
    assert_eq!(field(deb, "Package"), COORDINATOR);
    let depends = field(deb, "Depends");
    assert!(depends.contains("systemd-sysusers | adduser"), "Depends: {depends}");
    let entries = contents(deb);
    assert_entry(&entries, "/usr/bin/nimbus-coordinator", "-rwxr-xr-x");
    assert_entry(&entries, "/usr/bin/nimbusctl", "-rwxr-xr-x");
    assert_entry(&entries, "/usr/lib/sysusers.d/nimbus-coordinator.conf", "-rw-r--r--");
    assert_entry(&entries, "/etc/nimbus/coordinator.toml", "-rw-r-----");
    assert_entry(&entries, &unit_in(&entries, "nimbus-coordinator.service"), "-rw-r--r--");
    assert_eq!(control(deb, "conffiles").trim(), "/etc/nimbus/coordinator.toml");
    let postinst = control(deb, "postinst");
    assert!(
        postinst.contains("deb-systemd-helper") && !postinst.contains("#DEBHELPER#"),
        "postinst:\n{postinst}"
    );
}

/// What the host must still look like afterwards (files the scripts could have touched by mistake).
fn host_files() -> e2e::packages::Snapshot {
    host_snapshot(&[
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/var/lib/dpkg/status",
        "/var/lib/dpkg/statoverride",
        "/var/lib/nimbus-agent",
        "/var/lib/nimbus-coordinator",
        "/etc/nimbus",
        "/etc/systemd/system/multi-user.target.wants/nimbus-agent.service",
        "/etc/systemd/system/multi-user.target.wants/nimbus-coordinator.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/nimbus-agent.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/nimbus-coordinator.service.dsh-also",
    ])
}

/// An empty dpkg database under `root`, plus a minimal passwd/group for the scripts to extend.
fn make_root(root: &Path) {
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/log",
        "etc",
        "usr/bin",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    minimal_etc(root);
}

fn dpkg(root: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends", "--force-unsafe-io"])
        .args(args);
    let out = run_ok(&mut cmd, TIMEOUT);
    eprintln!("dpkg {args:?}:\n{}", both(&out));
    out
}

fn status(root: &Path, pkg: &str) -> String {
    let out = run(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}", root.join("var/lib/dpkg").display()))
            .args(["--show", "--showformat=${Status}", pkg]),
        TIMEOUT,
    );
    text(&out.stdout).trim().to_string()
}

fn lintian(debs: &[PathBuf]) {
    if !on_path("lintian") {
        eprintln!("lintian is not installed: skipped (apt-get install lintian)");
        return;
    }
    for deb in debs {
        let out = e2e::run_with_timeout(
            Command::new("lintian").args(["--tag-display-limit", "0"]).arg(deb),
            BUILD_TIMEOUT,
        )
        .unwrap();
        eprintln!("lintian {}:\n{}", deb.display(), both(&out));
    }
}

#[test]
fn debs_build_install_remove_and_purge_in_a_throwaway_root() {
    if !prerequisites() {
        return;
    }
    let started = Instant::now();

    // 1. Build (from target/debug; the binaries come from `cargo build --workspace --bins`).
    let built = build_packages("build-deb.sh", '_');
    let (agent, coordinator) = (built.agent, built.coordinator);
    eprintln!(
        "built {} and {} in {:?}",
        agent.display(),
        coordinator.display(),
        started.elapsed()
    );

    // 2. Inspect.
    inspect_agent(&agent);
    inspect_coordinator(&coordinator);

    // 3. Install into a throwaway root.
    let host_before = host_files();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    make_root(root);
    dpkg(
        root,
        &["--install", agent.to_str().unwrap(), coordinator.to_str().unwrap()],
    );
    for pkg in [AGENT, COORDINATOR] {
        assert_eq!(status(root, pkg), "install ok installed", "{pkg}");
    }
    for bin in [
        "usr/bin/nimbus-agent",
        "usr/bin/nimbus-coordinator",
        "usr/bin/nimbusctl",
    ] {
        assert_eq!(mode_of(&root.join(bin)), 0o755, "{bin}");
    }
    assert!(root.join("usr/lib/sysusers.d/nimbus-coordinator.conf").is_file());
    let uid = id_in(root, "passwd", SERVICE_USER).expect("the postinst created the service user in the root");
    let gid = id_in(root, "group", SERVICE_USER).expect("the postinst created the service group in the root");
    assert_ne!(uid, 0);
    let agent_conf = root.join("etc/nimbus/agent.toml");
    assert_eq!((mode_of(&agent_conf), agent_conf.metadata().unwrap().uid()), (0o600, 0));
    let coord_conf = root.join("etc/nimbus/coordinator.toml");
    let meta = coord_conf.metadata().unwrap();
    assert_eq!(
        (mode_of(&coord_conf), meta.uid(), meta.gid()),
        (0o640, 0, gid),
        "coordinator.toml: 0640 root:{SERVICE_USER}"
    );
    let agent_state = root.join("var/lib/nimbus-agent");
    let coord_state = root.join("var/lib/nimbus-coordinator");
    assert_eq!(
        (mode_of(&agent_state), agent_state.metadata().unwrap().uid()),
        (0o700, 0)
    );
    let meta = coord_state.metadata().unwrap();
    assert_eq!((mode_of(&coord_state), meta.uid(), meta.gid()), (0o700, uid, gid));
    for pkg in [AGENT, COORDINATOR] {
        let wants = root.join(format!("etc/systemd/system/multi-user.target.wants/{pkg}.service"));
        assert!(
            wants.symlink_metadata().is_ok(),
            "{pkg} is enabled in the root ({})",
            wants.display()
        );
    }
    // Something the service writes survives a remove.
    std::fs::write(coord_state.join("marker"), "state").unwrap();
    std::fs::write(agent_state.join("marker"), "state").unwrap();

    // 4. Remove keeps state, configuration and user; purge deletes them.
    dpkg(root, &["--remove", AGENT, COORDINATOR]);
    for pkg in [AGENT, COORDINATOR] {
        assert_eq!(status(root, pkg), "deinstall ok config-files", "{pkg}");
    }
    assert!(!root.join("usr/bin/nimbus-agent").exists() && !root.join("usr/bin/nimbusctl").exists());
    assert!(
        coord_state.join("marker").is_file() && agent_state.join("marker").is_file(),
        "remove keeps state"
    );
    assert!(
        agent_conf.is_file() && coord_conf.is_file(),
        "remove keeps the conffiles"
    );
    assert_eq!(id_in(root, "passwd", SERVICE_USER), Some(uid), "remove keeps the user");

    dpkg(root, &["--purge", AGENT, COORDINATOR]);
    for pkg in [AGENT, COORDINATOR] {
        assert_eq!(status(root, pkg), "", "{pkg} is gone from the database after purge");
        let wants = root.join(format!("etc/systemd/system/multi-user.target.wants/{pkg}.service"));
        assert!(wants.symlink_metadata().is_err(), "{pkg} is no longer enabled");
    }
    assert!(
        !agent_state.exists() && !coord_state.exists(),
        "purge deletes the state"
    );
    assert!(!root.join("etc/nimbus").exists(), "purge deletes the configuration");
    assert_eq!(id_in(root, "passwd", SERVICE_USER), None, "purge deletes the user");
    assert_eq!(id_in(root, "group", SERVICE_USER), None, "purge deletes the group");
    let overrides = std::fs::read_to_string(root.join("var/lib/dpkg/statoverride")).unwrap_or_default();
    assert!(
        !overrides.contains("coordinator.toml"),
        "purge drops the stat override: {overrides}"
    );

    // Nothing outside the root changed.
    assert_eq!(host_files(), host_before, "the host's files changed");

    // 5. lintian, when installed: printed, not judged.
    lintian(&[agent, coordinator]);
    eprintln!("deb test took {:?}", started.elapsed());
}
