//! Packaging (`packaging/`): the systemd units pass `systemd-analyze verify` without a word, the coordinator's
//! sandbox scores "OK" or better in `systemd-analyze security`, the units carry the settings the daemons rely
//! on, and the example configurations are accepted by the real binaries.
//!
//! No root needed. Needs the daemon binaries (`cargo build --workspace --bins`) and, for the `systemd-analyze`
//! tests, systemd ≥ 252 (`--offline=`; Debian package `systemd`): without it those tests are skipped, or fail
//! when `NIMBUS_REQUIRE_ROOT_TESTS=1` (CI).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use e2e::env::{AGENT_BIN, COORDINATOR_BIN, REQUIRE_ROOT_ENV, workspace_dir};

/// The worst `systemd-analyze security` exposure still in the "OK" band. The bands are not in the man page;
/// systemd's `analyze-security.c` has: 0.0 PERFECT, 0.1-0.9 SAFE, 1.0-4.9 OK, 5.0-7.4 MEDIUM, 7.5-8.9 EXPOSED,
/// 9.0-9.9 UNSAFE, 10.0 DANGEROUS.
const OK_BAND_MAX: f64 = 4.9;
/// The systemd release whose scores `packaging/README.md` records (other releases weigh settings differently).
const RECORDED_SYSTEMD: u32 = 252;
/// Offline security analysis appeared in systemd 252.
const MIN_SYSTEMD: u32 = 252;
const TIMEOUT: Duration = Duration::from_secs(60);

fn packaging() -> PathBuf {
    workspace_dir().join("packaging")
}

fn unit_path(daemon: &str) -> PathBuf {
    packaging().join("systemd").join(format!("{daemon}.service"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs `cmd` with a timeout and without any `NIMBUS_*` variable of ours leaking into it (the daemons read
/// their settings from those).
fn run(cmd: &mut Command) -> Output {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NIMBUS_") {
            cmd.env_remove(key);
        }
    }
    e2e::run_with_timeout(cmd, TIMEOUT).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `systemd-analyze` when it is on PATH and new enough; otherwise `None` after printing why (or a panic when
/// `NIMBUS_REQUIRE_ROOT_TESTS=1`: CI must not skip these silently).
fn systemd_analyze() -> Option<(PathBuf, u32)> {
    let test = std::thread::current().name().unwrap_or("this test").to_string();
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("systemd-analyze"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.is_file());
    let problem = match &found {
        None => "systemd-analyze is not on PATH (Debian/Ubuntu: apt-get install systemd)".to_string(),
        Some(bin) => match systemd_version(bin) {
            Some(v) if v >= MIN_SYSTEMD => return Some((bin.clone(), v)),
            Some(v) => format!("systemd-analyze is from systemd {v}; --offline= needs {MIN_SYSTEMD} or newer"),
            None => format!("cannot tell the version of {}", bin.display()),
        },
    };
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v.trim() == "1") {
        panic!("{test}: {problem} ({REQUIRE_ROOT_ENV}=1 is set)");
    }
    eprintln!("SKIPPED {test}: {problem} (set {REQUIRE_ROOT_ENV}=1 to make this a failure)");
    None
}

/// `systemd 252 (252.39-1~deb12u2)` → 252.
fn systemd_version(bin: &Path) -> Option<u32> {
    let out = run(Command::new(bin).arg("--version"));
    text(&out.stdout).split_whitespace().nth(1)?.parse().ok()
}

/// Copies both units into `dir` with `ExecStart=` pointing at the built binaries. `systemd-analyze verify`
/// complains ("Command /usr/bin/nimbus-agent is not executable") when the binary a unit names is missing,
/// and on a build machine nothing is installed in /usr/bin; the built binaries are the real thing, so the
/// check stays meaningful. Nothing else in the units changes.
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    [("nimbus-agent", AGENT_BIN), ("nimbus-coordinator", COORDINATOR_BIN)]
        .into_iter()
        .map(|(unit, bin)| {
            let original = read(&unit_path(unit));
            let from = format!("ExecStart=/usr/bin/{bin} ");
            assert!(original.contains(&from), "{unit}.service has no `{from}` line");
            let to = format!("ExecStart={} ", e2e::binary(bin).display());
            let path = dir.join(format!("{unit}.service"));
            std::fs::write(&path, original.replace(&from, &to)).unwrap();
            path
        })
        .collect()
}

#[test]
fn the_units_pass_systemd_analyze_verify_without_a_word() {
    let Some((analyze, _)) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify(dir.path());
    let out = run(Command::new(&analyze)
        .arg("verify")
        .args(&units)
        .current_dir(dir.path()));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    // Lines about the host's own units (verify also loads dependencies such as network-online.target) are
    // not ours to fix: shown, tolerated. Anything naming our units or files fails.
    let ours: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| !l.trim().is_empty())
        .inspect(|l| eprintln!("systemd-analyze verify: {l}"))
        .filter(|l| l.contains("nimbus") || l.contains(&dir.path().display().to_string()))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {units:?}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

/// `→ Overall exposure level for nimbus-agent.service: 6.8 MEDIUM 😐` → (6.8, "MEDIUM").
fn exposure(analyze: &Path, unit: &Path) -> (f64, String) {
    let out = run(Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "systemd-analyze security --offline=yes {}: {:?}\n{stdout}\n{}",
        unit.display(),
        out.status,
        text(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no \"Overall exposure level\" line in:\n{stdout}"));
    let mut words = line
        .rsplit_once(": ")
        .map(|(_, r)| r)
        .unwrap_or_default()
        .split_whitespace();
    let score = words.next().and_then(|s| s.parse().ok());
    let band = words.next().map(str::to_string);
    match (score, band) {
        (Some(score), Some(band)) => (score, band),
        _ => panic!("cannot parse the exposure in {line:?}"),
    }
}

#[test]
fn the_coordinator_scores_ok_or_better_and_the_readme_records_both_scores() {
    let Some((analyze, version)) = systemd_analyze() else {
        return;
    };
    let readme = read(&packaging().join("README.md"));
    for unit in ["nimbus-coordinator", "nimbus-agent"] {
        let (score, band) = exposure(&analyze, &unit_path(unit));
        println!("{unit}.service: exposure {score:.1} {band} (systemd {version})");
        if unit == "nimbus-coordinator" {
            assert!(
                score <= OK_BAND_MAX && ["PERFECT", "SAFE", "OK"].contains(&band.as_str()),
                "{unit}.service exposure {score} {band} is above OK (<= {OK_BAND_MAX}): see what \
                 `systemd-analyze security --offline=yes packaging/systemd/{unit}.service` marks with ✗"
            );
        }
        let row = format!("| `{unit}.service` | **{score:.1}** | {band} |");
        if version == RECORDED_SYSTEMD {
            assert!(
                readme.contains(&row),
                "packaging/README.md must record the current score of {unit}.service: {row}"
            );
        } else if !readme.contains(&row) {
            eprintln!(
                "note: systemd {version} scores {unit}.service {score:.1}; the README records systemd {RECORDED_SYSTEMD}'s"
            );
        }
    }
}

/// `Key=value` assignments of a unit file (comments and section headers dropped; repeated keys kept in order).
fn assignments(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn values(unit: &[(String, String)], key: &str) -> Vec<String> {
    unit.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
}

fn single(unit: &[(String, String)], key: &str) -> String {
    match values(unit, key).as_slice() {
        [v] => v.clone(),
        other => panic!("expected exactly one {key}=, found {other:?}"),
    }
}

fn words(unit: &[(String, String)], key: &str) -> BTreeSet<String> {
    values(unit, key)
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

#[test]
fn the_units_carry_what_the_daemons_rely_on() {
    let agent = assignments(&read(&unit_path("nimbus-agent")));
    let coord = assignments(&read(&unit_path("nimbus-coordinator")));
    for (name, unit) in [("agent", &agent), ("coordinator", &coord)] {
        assert_eq!(single(unit, "Type"), "notify", "{name}");
        assert_eq!(single(unit, "NotifyAccess"), "main", "{name}");
        assert_eq!(single(unit, "Restart"), "on-failure", "{name}");
        assert_eq!(single(unit, "ExecReload"), "/bin/kill -HUP $MAINPID", "{name}");
        assert!(!single(unit, "WatchdogSec").is_empty(), "{name}");
        assert!(
            single(unit, "ExecStart").ends_with(&format!(" --config /etc/nimbus/{name}.toml")),
            "{name}"
        );
    }
    // READY=1 comes only once enrolled and connected; a bare-metal enrollment may wait for an operator.
    assert_eq!(single(&agent, "TimeoutStartSec"), "infinity");
    let agent_codes = words(&agent, "RestartPreventExitStatus");
    for code in ["10", "64", "77"] {
        assert!(
            agent_codes.contains(code),
            "agent RestartPreventExitStatus lacks {code}: {agent_codes:?}"
        );
    }
    assert!(words(&coord, "RestartPreventExitStatus").contains("64"));
    // The codes are the ones the agent documents.
    let help = text(&run(Command::new(e2e::binary(AGENT_BIN)).arg("--help")).stdout);
    for documented in ["10 node revoked", "64 bad configuration", "77 enrollment refused"] {
        assert!(
            help.contains(documented),
            "nimbus-agent --help no longer says {documented:?}:\n{help}"
        );
    }
    assert_eq!(single(&coord, "CapabilityBoundingSet"), "CAP_NET_ADMIN");
    assert_eq!(single(&coord, "AmbientCapabilities"), "CAP_NET_ADMIN");
    assert_eq!(single(&coord, "DeviceAllow"), "/dev/net/tun rw");
    assert_eq!(single(&coord, "ProtectSystem"), "strict");
    let user = single(&coord, "User");
    let sysusers = read(&packaging().join("sysusers.d/nimbus-coordinator.conf"));
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", user.as_str()])),
        "sysusers.d/nimbus-coordinator.conf does not create {user}:\n{sysusers}"
    );
}

/// The example keys of a configuration file: lines `#key = value`.
fn example_keys(config: &str) -> BTreeSet<String> {
    config
        .lines()
        .filter_map(|l| l.strip_prefix('#')?.split_once(" = "))
        .map(|(k, _)| k.to_string())
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect()
}

/// The same file with every `#key = value` example switched on.
/// Examples that are an alternative to another one (they exclude each other): listed like every key, left off
/// when every example is turned on.
const ALTERNATIVES: &[&str] = &["kek_command"];

fn all_examples_on(config: &str) -> String {
    config
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if !example_keys(l).is_empty()
                    && !example_keys(l).iter().any(|k| ALTERNATIVES.contains(&k.as_str())) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The settings keys of a daemon: its long flags (`--help`), minus the ones that are not settings.
fn setting_keys(bin: &str) -> BTreeSet<String> {
    let help = text(&run(Command::new(e2e::binary(bin)).arg("--help")).stdout);
    help.lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split(|c: char| !(c.is_ascii_lowercase() || c == '-')).next())
        .filter(|f| !["config", "storage-dry-run", "help", "version"].contains(f))
        .map(|f| f.replace('-', "_"))
        .collect()
}

#[test]
fn the_example_agent_config_lists_every_key_and_is_accepted() {
    let path = packaging().join("config/agent.toml");
    let shipped = read(&path);
    assert_eq!(
        example_keys(&shipped),
        setting_keys(AGENT_BIN),
        "packaging/config/agent.toml vs nimbus-agent --help"
    );
    let dir = tempfile::tempdir().unwrap();
    let all_on = dir.path().join("agent-all.toml");
    std::fs::write(&all_on, all_examples_on(&shipped)).unwrap();
    // The configuration is validated before anything else; the storage dry run then finds no plan in the empty
    // state directory and exits 0 without touching the host.
    for config in [&path, &all_on] {
        let out = run(Command::new(e2e::binary(AGENT_BIN))
            .arg("--config")
            .arg(config)
            .arg("--storage-dry-run")
            .arg("--state-dir")
            .arg(dir.path()));
        assert!(
            out.status.success() && text(&out.stdout).contains("no storage plan recorded"),
            "{}: {:?}\nstdout:\n{}\nstderr:\n{}",
            config.display(),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

/// The coordinator has no check-only mode, and a valid configuration would make it start serving. So each
/// run adds one deliberately bad flag (`--mtu 1`, which wins over the file): a file error (syntax, unknown key,
/// wrong type) is reported alone, before flags are merged; with a good file, validation reports exactly the
/// flag's error, exits 64 and binds nothing.
fn coordinator_config_errors(config: &Path, extra: &[&str]) -> Vec<String> {
    let out = run(Command::new(e2e::binary(COORDINATOR_BIN))
        .arg("--config")
        .arg(config)
        .args(extra)
        .args(["--mtu", "1"]));
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}: {:?}\n{stderr}",
        config.display(),
        out.status
    );
    stderr.lines().map(str::to_string).collect()
}

#[test]
fn the_example_coordinator_config_lists_every_key_and_is_accepted() {
    let path = packaging().join("config/coordinator.toml");
    let shipped = read(&path);
    assert_eq!(
        example_keys(&shipped),
        setting_keys(COORDINATOR_BIN),
        "packaging/config/coordinator.toml vs nimbus-coordinator --help"
    );
    let only_the_flag = |errs: Vec<String>, what: &str| {
        assert!(
            errs.len() == 1 && errs[0].contains("mtu 1 is out of range"),
            "{what}: expected only the --mtu 1 error, got {errs:#?}"
        );
    };
    // As shipped everything is commented out, and advertise_address is required with the default wildcard
    // listener: an operator sets it.
    only_the_flag(
        coordinator_config_errors(&path, &["--advertise-address", "192.0.2.1"]),
        "shipped file",
    );
    let dir = tempfile::tempdir().unwrap();
    let all_on = dir.path().join("coordinator-all.toml");
    std::fs::write(&all_on, all_examples_on(&shipped)).unwrap();
    // Every example on (etcd with TLS files included) is valid: only the flag's error.
    only_the_flag(coordinator_config_errors(&all_on, &[]), "every example on");
    // The file really is read: an unknown key in it is reported.
    std::fs::write(&all_on, format!("{}\nno_such_key = 1\n", all_examples_on(&shipped))).unwrap();
    let errs = coordinator_config_errors(&all_on, &[]);
    assert!(errs.iter().any(|e| e.contains("no_such_key")), "{errs:#?}");
}
