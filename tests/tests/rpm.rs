//! The `.rpm` packages (`packaging/build-rpm.sh`: rpmbuild with `packaging/rpm/*.spec`), with Debian's `rpm`: built
//! once from the dev binaries, then
//! - inspected: digests (`rpm -K`), file list with modes, owners and flags (config noreplace, doc), requires,
//!   recommends and provides, and the scriptlets as shipped (complete, POSIX sh, shellcheck-clean, never start
//!   a service);
//! - installed into a throwaway root with `rpm --root --noscripts` while this test runs the shipped scriptlets
//!   itself with `NIMBUS_RPM_ROOT` (the scriptlets' root prefix) and the arguments rpm would pass: install,
//!   upgrade (`$1 = 2`), erase; plus the user creation without systemd-sysusers (useradd) and with neither;
//! - installed, upgraded and erased by rpm itself running the scriptlets in a chroot: the root's `/usr` is an
//!   overlay of the host's (read-only lower layer; mounted in a private mount namespace that ends with each
//!   rpm command), so the chroot has a shell, systemd-sysusers and systemctl while rpm's writes stay in the
//!   temporary upper layer.
//!
//! What is not exercised: an RPM-based distribution (dependency resolution by dnf, SELinux, that distribution's
//! systemd and presets), and systemctl against a running systemd (daemon-reload, stop): systemd is not PID 1
//! here, which is the "not live" branch the scriptlets take in chroots and containers.
//!
//! Needs root, `rpm` (with `rpmbuild`), `python3` (build-rpm.sh reads `cargo metadata`), systemd's
//! `systemd-sysusers` and `systemctl`, `useradd`, `unshare`, overlayfs, and the binaries of
//! `cargo build --workspace --bins`. Without them the tests are skipped, or fail under
//! `NIMBUS_REQUIRE_ROOT_TESTS=1` (CI). The host's users, rpm database and `/var/lib/nimbus-*` are checked to be
//! unchanged.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use e2e::env::workspace_dir;
use e2e::packages::{
    AGENT, Built, COORDINATOR, SERVICE_USER, Snapshot, TIMEOUT, both, build_packages, entry_in, host_snapshot, id_in,
    minimal_etc, missing_tool, mode_of, on_path, prerequisites_met, run, run_ok, text,
};

/// The scriptlets' root prefix (packaging/rpm/functions.sh).
const ROOT_ENV: &str = "NIMBUS_RPM_ROOT";
/// Inside a root: where these tests keep its rpm database (Debian's rpm defaults to ~/.rpmdb).
const DBPATH: &str = "/var/lib/rpm";

/// What every test here needs; `None` when all is present.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (the scriptlets chown files and add users to the root's passwd)".into());
    }
    let tools = [
        "rpm",
        "rpmbuild",
        "python3",
        "systemd-sysusers",
        "systemctl",
        "useradd",
        "groupadd",
        "unshare",
        "mount",
    ];
    if let Some(problem) = missing_tool(
        &tools,
        "Debian: apt-get install rpm python3 systemd passwd util-linux mount",
    ) {
        return Some(problem);
    }
    if !Path::new("/usr/lib/rpm/find-requires").is_file() {
        return Some("/usr/lib/rpm/find-requires is missing (apt-get install rpm)".into());
    }
    None
}

fn prerequisites() -> bool {
    prerequisites_met(missing_prerequisite())
}

/// Runs packaging/build-rpm.sh once for all tests of this binary (they run in parallel threads).
fn rpms() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| build_packages("build-rpm.sh", '-'))
}

/// `rpm` on package files, with a throwaway database (a plain query would create the host's ~/.rpmdb).
fn query(args: &[&str], pkg: &Path) -> String {
    let db = tempfile::tempdir().unwrap();
    let out = run_ok(
        Command::new("rpm").arg("--dbpath").arg(db.path()).args(args).arg(pkg),
        TIMEOUT,
    );
    text(&out.stdout)
}

/// `rpm -qp --qf FORMAT`.
fn qf(pkg: &Path, format: &str) -> String {
    query(&["-qp", "--qf", format], pkg)
}

/// The scriptlet of `tag` (`PREIN`, `POSTIN`, `PREUN`, `POSTUN`) as shipped, if the package has one.
fn scriptlet(pkg: &Path, tag: &str) -> Option<String> {
    let body = qf(pkg, &format!("%{{{tag}}}"));
    (body != "(none)").then_some(body)
}

/// One file of the package: mode string, `user:group`, rpm's file flags (`c` config, `n` noreplace, `d` doc).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileEntry {
    mode: String,
    owner: String,
    flags: String,
    path: String,
}

fn files(pkg: &Path) -> Vec<FileEntry> {
    qf(
        pkg,
        "[%{FILEMODES:perms}\\t%{FILEUSERNAME}:%{FILEGROUPNAME}\\t%{FILEFLAGS:fflags}\\t%{FILENAMES}\\n]",
    )
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        assert_eq!(f.len(), 4, "unexpected query line {l:?}");
        FileEntry {
            mode: f[0].into(),
            owner: f[1].into(),
            flags: f[2].into(),
            path: f[3].into(),
        }
    })
    .collect()
}

fn entry(mode: &str, owner: &str, flags: &str, path: &str) -> FileEntry {
    FileEntry {
        mode: mode.into(),
        owner: owner.into(),
        flags: flags.into(),
        path: path.into(),
    }
}

fn expected_files(pkg: &str) -> Vec<FileEntry> {
    let mut expected = match pkg {
        AGENT => vec![
            entry("-rwxr-xr-x", "root:root", "", "/usr/bin/nimbus-agent"),
            entry("-rw-------", "root:root", "cn", "/etc/nimbus/agent.toml"),
        ],
        _ => vec![
            entry("-rwxr-xr-x", "root:root", "", "/usr/bin/nimbus-coordinator"),
            entry("-rwxr-xr-x", "root:root", "", "/usr/bin/nimbusctl"),
            entry(
                "-rw-r-----",
                "root:nimbus-coordinator",
                "cn",
                "/etc/nimbus/coordinator.toml",
            ),
            entry(
                "-rw-r--r--",
                "root:root",
                "",
                "/usr/lib/sysusers.d/nimbus-coordinator.conf",
            ),
        ],
    };
    expected.extend([
        entry(
            "-rw-r--r--",
            "root:root",
            "",
            &format!("/usr/lib/systemd/system/{pkg}.service"),
        ),
        entry(
            "-rw-r--r--",
            "root:root",
            "",
            &format!("/usr/lib/systemd/system-preset/80-{pkg}.preset"),
        ),
        entry(
            "-rw-r--r--",
            "root:root",
            "d",
            &format!("/usr/share/doc/{pkg}/README.md"),
        ),
    ]);
    expected.sort_by(|a, b| a.path.cmp(&b.path));
    expected
}

/// A command line of a scriptlet that would start a service (the package enables its unit, never starts it).
/// Messages printed for the operator (`2. systemctl start ...`) are not commands.
fn starts_a_service(script: &str) -> Option<&str> {
    script.lines().map(str::trim_start).find(|l| {
        l.starts_with("systemctl ")
            && [" start ", " restart ", " try-restart ", " reload-or-restart ", "--now"]
                .iter()
                .any(|verb| l.contains(verb))
    })
}

/// The source scriptlets: POSIX sh with `set -e`, executable, and each sources the shared functions exactly
/// once with the line build-rpm.sh replaces; they, the functions and build-rpm.sh are shellcheck-clean.
#[test]
fn source_scriptlets_are_posix_and_shellcheck_clean() {
    let dir = workspace_dir().join("packaging/rpm");
    let mut scripts = Vec::new();
    for (pkg, phases) in [
        (AGENT, &["post", "preun", "postun"][..]),
        (COORDINATOR, &["pre", "post", "preun", "postun"][..]),
    ] {
        for phase in phases {
            let path = dir.join(pkg).join(phase);
            let body = std::fs::read_to_string(&path).unwrap();
            assert!(
                body.starts_with("#!/bin/sh\n"),
                "{}: not a POSIX sh script",
                path.display()
            );
            assert!(body.contains("\nset -e\n"), "{}: no set -e", path.display());
            let sourcing = body
                .lines()
                .filter(|l| l.starts_with(". \"${NIMBUS_RPM_FUNCTIONS:?"))
                .count();
            assert_eq!(sourcing, 1, "{}: must source the functions once", path.display());
            assert_eq!(starts_a_service(&body), None, "{}", path.display());
            assert!(mode_of(&path) & 0o111 != 0, "{} is not executable", path.display());
            scripts.push(path);
        }
    }
    scripts.push(dir.join("functions.sh"));
    scripts.push(workspace_dir().join("packaging/build-rpm.sh"));
    if on_path("shellcheck") {
        let out = run(Command::new("shellcheck").arg("-x").args(&scripts), TIMEOUT);
        assert!(out.status.success(), "shellcheck:\n{}", both(&out));
    } else {
        eprintln!("shellcheck is not installed: lint skipped (apt-get install shellcheck)");
    }
}

/// Digests, metadata, files, relations and the shipped scriptlets of both packages.
#[test]
fn packages_have_the_files_relations_and_scriptlets() {
    if !prerequisites() {
        return;
    }
    let rpms = rpms();
    let scratch = tempfile::tempdir().unwrap();
    for (pkg, path) in rpms.each() {
        let digests = query(&["-K", "--nosignature"], path);
        assert!(digests.trim_end().ends_with("digests OK"), "{pkg}: rpm -K: {digests}");
        assert_eq!(
            qf(path, "%{NAME} %{VERSION}"),
            format!("{pkg} {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(files(path), expected_files(pkg), "{pkg}: files");

        let requires = query(&["-qp", "--requires"], path);
        for needed in ["/bin/sh", "libc.so.6()(64bit)", "libsystemd.so.0()(64bit)"] {
            assert!(
                requires.lines().any(|l| l == needed),
                "{pkg} requires {needed}:\n{requires}"
            );
        }
        // find-requires lists what the binaries link directly, not libsystemd's own libraries.
        assert!(
            !requires.contains("libgcrypt"),
            "{pkg}: indirect library requirement:\n{requires}"
        );

        let scripts = query(&["-qp", "--scripts"], path);
        let mut tags = vec!["POSTIN", "PREUN", "POSTUN"];
        if pkg == COORDINATOR {
            tags.insert(0, "PREIN");
        } else {
            assert_eq!(scriptlet(path, "PREIN"), None, "the agent needs no %pre");
        }
        for label in ["postinstall", "preuninstall", "postuninstall"] {
            assert!(
                scripts.contains(&format!("{label} scriptlet")),
                "{pkg}: no {label}:\n{scripts}"
            );
        }
        for tag in tags {
            let body = scriptlet(path, tag).unwrap_or_else(|| panic!("{pkg} has no {tag} scriptlet"));
            assert!(
                body.starts_with("#!/bin/sh\n") && body.contains("\nset -e\n"),
                "{pkg} {tag}"
            );
            assert!(
                !body.contains("\n. \"${NIMBUS_RPM_FUNCTIONS") && body.contains("\nsystemd_live() {"),
                "{pkg} {tag}: the functions are not inlined:\n{body}"
            );
            assert_eq!(starts_a_service(&body), None, "{pkg} {tag}");
            let file = scratch.path().join(format!("{pkg}.{tag}"));
            std::fs::write(&file, &body).unwrap();
            run_ok(Command::new("sh").arg("-n").arg(&file), TIMEOUT);
            if on_path("shellcheck") {
                let out = run(Command::new("shellcheck").arg(&file), TIMEOUT);
                assert!(out.status.success(), "shellcheck {pkg} {tag}:\n{}", both(&out));
            }
        }
    }

    let agent_weak = query(&["-qp", "--recommends"], &rpms.agent);
    for tool in ["util-linux", "e2fsprogs", "xfsprogs", "mdadm", "lvm2"] {
        assert!(
            agent_weak.lines().any(|l| l == tool),
            "agent recommends {tool}:\n{agent_weak}"
        );
    }
    let coord_requires = query(&["-qp", "--requires"], &rpms.coordinator);
    assert!(
        coord_requires
            .lines()
            .any(|l| l == "(/usr/bin/systemd-sysusers or /usr/sbin/useradd)"),
        "the coordinator needs a way to create its user:\n{coord_requires}"
    );
    // From the sysusers.d file (rpm >= 4.19 resolves the file's group through these).
    let provides = query(&["-qp", "--provides"], &rpms.coordinator);
    for virtual_ in ["user(nimbus-coordinator)", "group(nimbus-coordinator)"] {
        assert!(provides.contains(virtual_), "provides {virtual_}:\n{provides}");
    }

    // rpmlint, when installed: printed, not judged (packaging/README.md lists what it reports and why). Its
    // own HOME: rpmlint opens ~/.rpmdb (Debian's default database) and would create the host's.
    if on_path("rpmlint") {
        let mut rpmlint = Command::new("rpmlint");
        rpmlint
            .env("HOME", scratch.path())
            .arg(&rpms.agent)
            .arg(&rpms.coordinator);
        let out = run(&mut rpmlint, TIMEOUT);
        eprintln!("rpmlint:\n{}", both(&out));
    } else {
        eprintln!("rpmlint is not installed: skipped (apt-get install rpmlint)");
    }
}

/// Host files that the scriptlets or rpm could change by mistake.
fn host_files() -> Snapshot {
    let home_db = std::env::var("HOME").map(|h| format!("{h}/.rpmdb")).unwrap_or_default();
    host_snapshot(&[
        "/etc/passwd",
        "/etc/group",
        "/etc/shadow",
        "/etc/gshadow",
        "/var/lib/rpm",
        &home_db,
        "/var/lib/nimbus-agent",
        "/var/lib/nimbus-coordinator",
        "/etc/nimbus",
        "/etc/systemd/system/multi-user.target.wants/nimbus-agent.service",
        "/etc/systemd/system/multi-user.target.wants/nimbus-coordinator.service",
    ])
}

/// Runs a shipped scriptlet as rpm would (`sh -c BODY NAME ARG`), against `root` through `NIMBUS_RPM_ROOT`.
fn run_scriptlet(root: &Path, pkg: &Path, tag: &str, arg: &str, path_env: Option<&Path>) -> Option<Output> {
    let body = scriptlet(pkg, tag)?;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(body).arg(tag).arg(arg).env(ROOT_ENV, root);
    if let Some(dir) = path_env {
        cmd.env("PATH", dir);
    }
    Some(run(&mut cmd, TIMEOUT))
}

fn run_scriptlet_ok(root: &Path, pkg: &Path, tag: &str, arg: &str) -> String {
    match run_scriptlet(root, pkg, tag, arg, None) {
        Some(out) => {
            assert!(
                out.status.success(),
                "{tag} {arg} failed ({}):\n{}",
                out.status,
                both(&out)
            );
            both(&out)
        }
        None => String::new(),
    }
}

/// `rpm --root ROOT --dbpath /var/lib/rpm ARGS...` from the host (no chroot for the scriptlets).
fn rpm_in(root: &Path, args: &[&str]) -> Output {
    run_ok(
        Command::new("rpm")
            .arg("--root")
            .arg(root)
            .args(["--dbpath", DBPATH])
            .args(args),
        TIMEOUT,
    )
}

fn wants(root: &Path, pkg: &str) -> PathBuf {
    root.join(format!("etc/systemd/system/multi-user.target.wants/{pkg}.service"))
}

/// Asserts `path`'s permission bits, uid and gid (the message shows the mode in octal).
fn assert_owned(path: &Path, mode: u32, uid: u32, gid: u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let found = (mode_of(path), meta.uid(), meta.gid());
    assert!(
        found == (mode, uid, gid),
        "{}: mode {:o} {}:{}, expected {mode:o} {uid}:{gid}",
        path.display(),
        found.0,
        found.1,
        found.2
    );
}

/// The passwd and group lines systemd-sysusers makes from packaging/sysusers.d/nimbus-coordinator.conf in an
/// empty root: what %pre must create too.
fn sysusers_reference() -> (String, String) {
    let root = tempfile::tempdir().unwrap();
    minimal_etc(root.path());
    run_ok(
        Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg(workspace_dir().join("packaging/sysusers.d/nimbus-coordinator.conf")),
        TIMEOUT,
    );
    (
        entry_in(root.path(), "passwd", SERVICE_USER).unwrap(),
        entry_in(root.path(), "group", SERVICE_USER).unwrap(),
    )
}

/// What install leaves in `root` (its `/usr` in `usr`), however the scriptlets ran: files and modes, the
/// user, the state directories, the enable links (the unit is enabled, not started).
fn assert_installed(root: &Path, usr: &Path) {
    for bin in ["nimbus-agent", "nimbus-coordinator", "nimbusctl"] {
        assert_eq!(mode_of(&usr.join("bin").join(bin)), 0o755, "/usr/bin/{bin}");
    }
    let uid = id_in(root, "passwd", SERVICE_USER).expect("%pre created the service user");
    let gid = id_in(root, "group", SERVICE_USER).expect("%pre created the service group");
    assert!(uid > 0 && uid < 1000, "a system uid: {uid}");
    assert_owned(&root.join("etc/nimbus/agent.toml"), 0o600, 0, 0);
    // root:nimbus-coordinator: rpm resolved the group that %pre created.
    assert_owned(&root.join("etc/nimbus/coordinator.toml"), 0o640, 0, gid);
    assert_owned(&root.join("var/lib/nimbus-agent"), 0o700, 0, 0);
    assert_owned(&root.join("var/lib/nimbus-coordinator"), 0o700, uid, gid);
    for pkg in [AGENT, COORDINATOR] {
        let link =
            std::fs::read_link(wants(root, pkg)).unwrap_or_else(|e| panic!("{pkg} is not enabled in the root: {e}"));
        assert!(
            link.ends_with(format!("systemd/system/{pkg}.service")),
            "{pkg}: {}",
            link.display()
        );
    }
}

/// What erase leaves in `root` (its `/usr` in `usr`): state, user and a changed configuration (`.rpmsave`)
/// stay; the rest goes, the directories the packages do not own included.
fn assert_erased(root: &Path, usr: &Path, uid: u32, kept_config: &str, removed_config: &str) {
    for bin in ["nimbus-agent", "nimbus-coordinator", "nimbusctl"] {
        assert!(!usr.join("bin").join(bin).exists(), "/usr/bin/{bin} is still there");
    }
    for pkg in [AGENT, COORDINATOR] {
        assert!(wants(root, pkg).symlink_metadata().is_err(), "{pkg} is still enabled");
        assert!(
            !usr.join(format!("share/doc/{pkg}")).exists(),
            "/usr/share/doc/{pkg} stays"
        );
        assert!(
            !usr.join(format!("lib/systemd/system/{pkg}.service")).exists(),
            "{pkg}'s unit stays"
        );
    }
    assert!(
        root.join("var/lib/nimbus-agent/marker").is_file(),
        "erase keeps the agent's state"
    );
    assert!(
        root.join("var/lib/nimbus-coordinator/marker").is_file(),
        "erase keeps the coordinator's state"
    );
    let gid = id_in(root, "group", SERVICE_USER).expect("erase keeps the group");
    assert_owned(&root.join("var/lib/nimbus-coordinator"), 0o700, uid, gid);
    assert_eq!(id_in(root, "passwd", SERVICE_USER), Some(uid), "erase keeps the user");
    let saved = root.join(format!("etc/nimbus/{kept_config}.rpmsave"));
    assert!(
        std::fs::read_to_string(&saved).is_ok_and(|s| s.contains("# edited by the test")),
        "a changed configuration is kept as {}",
        saved.display()
    );
    assert!(
        !root.join(format!("etc/nimbus/{removed_config}")).exists(),
        "an unchanged configuration goes with the package"
    );
}

fn mark_state_and_edit(root: &Path, config: &str) {
    std::fs::write(root.join("var/lib/nimbus-agent/marker"), "state").unwrap();
    std::fs::write(root.join("var/lib/nimbus-coordinator/marker"), "state").unwrap();
    let path = root.join(format!("etc/nimbus/{config}"));
    let mut body = std::fs::read_to_string(&path).unwrap();
    body.push_str("# edited by the test\n");
    std::fs::write(&path, body).unwrap();
}

/// rpm installs with --noscripts; the test runs the shipped scriptlets with `NIMBUS_RPM_ROOT`, in rpm's order
/// and with its arguments: first install, an upgrade in place, erase.
#[test]
fn scriptlets_install_upgrade_and_erase_under_a_root_prefix() {
    if !prerequisites() {
        return;
    }
    let rpms = rpms();
    let host_before = host_files();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    minimal_etc(root);
    let (agent, coord) = (rpms.agent.to_str().unwrap(), rpms.coordinator.to_str().unwrap());

    // Install: %pre, files, %post.
    for (_, pkg) in rpms.each() {
        run_scriptlet_ok(root, pkg, "PREIN", "1");
    }
    rpm_in(root, &["-i", "--nodeps", "--noscripts", agent, coord]);
    let mut said = String::new();
    for (_, pkg) in rpms.each() {
        said.push_str(&run_scriptlet_ok(root, pkg, "POSTIN", "1"));
    }
    assert_installed(root, &root.join("usr"));
    for pkg in [AGENT, COORDINATOR] {
        assert!(
            said.contains(&format!("{pkg} is installed and enabled, but not started")),
            "{said}"
        );
    }
    let (passwd, group) = sysusers_reference();
    assert_eq!(
        entry_in(root, "passwd", SERVICE_USER).unwrap(),
        passwd,
        "the user as sysusers.d says"
    );
    assert_eq!(entry_in(root, "group", SERVICE_USER).unwrap(), group);
    let verify = rpm_in(root, &["-V", "--nodeps", AGENT, COORDINATOR]);
    assert_eq!(both(&verify).trim(), "", "rpm -V: every file as packaged");

    // Upgrade in place ($1 = 2): nothing changes, nothing is said, the state stays.
    mark_state_and_edit(root, "coordinator.toml");
    let passwd_before = std::fs::read(root.join("etc/passwd")).unwrap();
    for (_, pkg) in rpms.each() {
        run_scriptlet_ok(root, pkg, "PREIN", "2");
    }
    let mut said = String::new();
    for (_, pkg) in rpms.each() {
        said.push_str(&run_scriptlet_ok(root, pkg, "POSTIN", "2"));
        run_scriptlet_ok(root, pkg, "PREUN", "1");
        run_scriptlet_ok(root, pkg, "POSTUN", "1");
    }
    assert!(
        !said.contains("installed and enabled"),
        "an upgrade says nothing: {said}"
    );
    assert_eq!(std::fs::read(root.join("etc/passwd")).unwrap(), passwd_before);
    assert_installed(root, &root.join("usr"));

    // Erase: %preun 0, files, %postun 0.
    let uid = id_in(root, "passwd", SERVICE_USER).unwrap();
    for (_, pkg) in rpms.each() {
        run_scriptlet_ok(root, pkg, "PREUN", "0");
    }
    rpm_in(root, &["-e", "--nodeps", "--noscripts", AGENT, COORDINATOR]);
    for (_, pkg) in rpms.each() {
        run_scriptlet_ok(root, pkg, "POSTUN", "0");
    }
    assert_erased(root, &root.join("usr"), uid, "coordinator.toml", "agent.toml");

    assert_eq!(host_files(), host_before, "the host's files changed");
}

/// %pre without systemd-sysusers falls back to groupadd/useradd; with neither it fails and says what to install.
#[test]
fn pre_creates_the_user_with_useradd_or_says_what_is_missing() {
    if !prerequisites() {
        return;
    }
    let coordinator = &rpms().coordinator;
    let host_before = host_files();
    let bin = tempfile::tempdir().unwrap();
    for tool in ["useradd", "groupadd"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
            .unwrap();
        std::os::unix::fs::symlink(found, bin.path().join(tool)).unwrap();
    }

    let tmp = tempfile::tempdir().unwrap();
    minimal_etc(tmp.path());
    let out = run_scriptlet(tmp.path(), coordinator, "PREIN", "1", Some(bin.path())).unwrap();
    assert!(out.status.success(), "%pre with useradd:\n{}", both(&out));
    let fields: Vec<String> = entry_in(tmp.path(), "passwd", SERVICE_USER)
        .expect("useradd created the user")
        .split(':')
        .map(str::to_string)
        .collect();
    let (reference, _) = sysusers_reference();
    let reference: Vec<&str> = reference.split(':').collect();
    // Same description, home and shell as the sysusers.d line; a system uid of its own group.
    assert_eq!(
        (&fields[4][..], &fields[5][..], &fields[6][..]),
        (reference[4], reference[5], reference[6])
    );
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "system uid {uid}");
    assert_eq!(id_in(tmp.path(), "group", SERVICE_USER), fields[3].parse().ok());

    let empty = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    minimal_etc(tmp.path());
    let out = run_scriptlet(tmp.path(), coordinator, "PREIN", "1", Some(empty.path())).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "%pre without any tool must fail:\n{}",
        both(&out)
    );
    assert!(
        text(&out.stderr).contains("install systemd (systemd-sysusers) or shadow-utils (useradd)"),
        "{}",
        both(&out)
    );
    assert_eq!(entry_in(tmp.path(), "passwd", SERVICE_USER), None);
    assert_eq!(host_files(), host_before, "the host's files changed");
}

/// A root whose `/usr` is an overlay of the host's, for rpm to chroot into and run the scriptlets itself.
struct OverlayRoot {
    _dir: tempfile::TempDir,
    root: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl OverlayRoot {
    /// The root, or why this host cannot provide one.
    fn new() -> Result<OverlayRoot, String> {
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
        {
            return Err("the kernel has no overlayfs (modprobe overlay)".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let (root, upper, work) = (
            dir.path().join("root"),
            dir.path().join("upper"),
            dir.path().join("work"),
        );
        for d in [root.join("usr"), root.join("dev"), upper.clone(), work.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        // /bin, /sbin, /lib, /lib64 as the host has them (merged /usr: links into usr/).
        for top in ["bin", "sbin", "lib", "lib64"] {
            match std::fs::read_link(Path::new("/").join(top)) {
                Ok(target) => std::os::unix::fs::symlink(target, root.join(top)).unwrap(),
                Err(_) if !Path::new("/").join(top).exists() => {}
                Err(_) => return Err(format!("/{top} is not a link into /usr (the host has no merged /usr)")),
            }
        }
        let null = root.join("dev/null");
        nix::sys::stat::mknod(
            &null,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .map_err(|e| format!("mknod {}: {e}", null.display()))?;
        minimal_etc(&root);
        let me = OverlayRoot {
            _dir: dir,
            root,
            upper,
            work,
        };
        let probe = e2e::run_with_timeout(&mut me.command(&["true"]), TIMEOUT).map_err(|e| e.to_string())?;
        if !probe.status.success() {
            return Err(format!(
                "cannot mount an overlay in a mount namespace: {}",
                both(&probe)
            ));
        }
        Ok(me)
    }

    /// `args` run with the overlay mounted on `root/usr`, in a private mount namespace that ends with it.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "mount -t overlay overlay -o \"lowerdir=/usr,upperdir=$1,workdir=$2\" \"$3/usr\" && shift 3 && exec \"$@\"",
            )
            .arg("sh")
            .arg(&self.upper)
            .arg(&self.work)
            .arg(&self.root)
            .args(args);
        cmd
    }

    /// rpm with this root, run by rpm with the scriptlets chrooted into it; returns what it printed.
    fn rpm(&self, args: &[&str]) -> String {
        let root = self.root.to_str().unwrap();
        let mut all = vec!["rpm", "--root", root, "--dbpath", DBPATH];
        all.extend_from_slice(args);
        let out = run_ok(&mut self.command(&all), TIMEOUT);
        let said = both(&out);
        assert!(
            !said.contains("scriptlet failed") && !said.contains("warning: %"),
            "rpm {args:?}: a scriptlet failed:\n{said}"
        );
        said
    }
}

/// rpm itself runs the shipped scriptlets in a chroot (its /usr an overlay of the host's): install, upgrade in
/// place, erase, as on an RPM system where systemd is not PID 1 (an image build or a container).
#[test]
fn rpm_runs_the_scriptlets_in_a_chroot() {
    if !prerequisites() {
        return;
    }
    let overlay = OverlayRoot::new();
    if !prerequisites_met(overlay.as_ref().err().cloned()) {
        return;
    }
    let overlay = overlay.unwrap();
    let rpms = rpms();
    let host_before = host_files();
    let (agent, coord) = (rpms.agent.to_str().unwrap(), rpms.coordinator.to_str().unwrap());
    let (root, usr) = (overlay.root.clone(), overlay.upper.clone());

    let said = overlay.rpm(&["-i", "--nodeps", agent, coord]);
    for pkg in [AGENT, COORDINATOR] {
        assert!(
            said.contains(&format!("{pkg} is installed and enabled, but not started")),
            "{said}"
        );
    }
    // rpm's files under /usr are in the overlay's upper layer.
    assert_installed(&root, &usr);
    let verify = overlay.rpm(&["-V", "--nodeps", AGENT, COORDINATOR]);
    assert!(
        verify.lines().all(|l| l.starts_with("rpm: ")),
        "rpm -V: every file as packaged:\n{verify}"
    );

    // Upgrade in place: rpm runs %pre 2, %post 2, then the old package's %preun 1 and %postun 1.
    mark_state_and_edit(&root, "agent.toml");
    let said = overlay.rpm(&["-U", "--replacepkgs", "--nodeps", agent, coord]);
    assert!(
        !said.contains("installed and enabled"),
        "an upgrade says nothing:\n{said}"
    );
    assert_installed(&root, &usr);

    let uid = id_in(&root, "passwd", SERVICE_USER).unwrap();
    overlay.rpm(&["-e", "--nodeps", AGENT, COORDINATOR]);
    assert_erased(&root, &usr, uid, "agent.toml", "coordinator.toml");
    assert_eq!(host_files(), host_before, "the host's files changed");
}
