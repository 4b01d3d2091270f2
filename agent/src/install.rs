//! `nimbus-agent bootstrap`: install the agent on a bare host, idempotently — the binary, its configuration,
//! the join token (0600, only while the host has no identity yet), the pinned release root (0644, the root of
//! trust upgrades are verified against), the state directory, the systemd unit and a drop-in pointing it at the
//! configuration — then enable and start it when systemd is PID 1, or say exactly what remains to do. The
//! files are the ones the bootstrap artefacts write (nimbus-bootstrap), so a host prepared by cloud-init and one
//! prepared by hand are the same. Every step compares before writing: a second run changes
//! nothing. `root` lets tests (and image builders) install into a directory.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bootstrap::release_root::{RELEASE_ROOT_MAX_BYTES, RELEASE_ROOT_PATH, ReleaseRoot};

use crate::error::AgentError;

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    /// The file system to install into (`/` on a host).
    pub root: PathBuf,
    /// The agent binary to install (normally the running one).
    pub binary: PathBuf,
    pub coordinator: String,
    pub ca_pin: String,
    /// Needed only until the host has enrolled.
    pub token: Option<String>,
    pub node_name: Option<String>,
    /// The release repository's root metadata (the text of `1.root.json`), installed as
    /// `/etc/nimbus/release-root.json`. `None` keeps an installed one as it is.
    pub release_root: Option<String>,
}

/// One step and whether it changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub what: String,
    pub changed: bool,
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> AgentError {
    AgentError::Other(format!("{what} {}: {e}", path.display()))
}

/// Writes `body` to `path` with `mode` unless it already holds exactly that (content and mode).
fn ensure_file(path: &Path, body: &[u8], mode: u32) -> Result<bool, AgentError> {
    let same = std::fs::read(path).is_ok_and(|b| b == body)
        && std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if same {
        return Ok(false);
    }
    let dir = path
        .parent()
        .ok_or_else(|| AgentError::Other(format!("{} has no parent directory", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.nimbus-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("writing", &tmp, e))?;
    std::io::Write::write_all(&mut f, body).map_err(|e| io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| io("writing", &tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(|e| io("chmod", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into", path, e))?;
    Ok(true)
}

/// Reads the file given to `--release-root` (e.g. `releases/repo/metadata/1.root.json`) and checks it is a
/// release root ([`ReleaseRoot::parse`]: JSON, a signed TUF `root`, at most 64 KiB). Reads no more than the
/// limit allows, so a wrong path such as a device cannot hang it.
pub fn read_release_root(path: &Path) -> Result<String, AgentError> {
    let bad = |m: String| AgentError::Config(vec![format!("--release-root {}: {m}", path.display())]);
    let f = std::fs::File::open(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut bytes = Vec::new();
    f.take(RELEASE_ROOT_MAX_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("cannot read it: {e}")))?;
    if bytes.len() > RELEASE_ROOT_MAX_BYTES {
        return Err(bad(format!(
            "is over {RELEASE_ROOT_MAX_BYTES} bytes, too large for a release root; give the repository's root \
             metadata, e.g. releases/repo/metadata/1.root.json"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|_| {
        bad("is not UTF-8 text; give the repository's root metadata, e.g. releases/repo/metadata/1.root.json".into())
    })?;
    parse_root(&text).map_err(bad)?;
    Ok(text)
}

/// [`ReleaseRoot::parse`], its refusal as the problem text alone.
fn parse_root(text: &str) -> Result<ReleaseRoot, String> {
    ReleaseRoot::parse(text).map_err(|e| match e {
        bootstrap::BootstrapError::Invalid { problem, .. } => problem,
        other => other.to_string(),
    })
}

/// Checks the values before anything is written (hostile input: they come from a command line or a script).
pub fn check(spec: &InstallSpec) -> Result<(), AgentError> {
    let bad = |m: String| AgentError::Config(vec![m]);
    if spec.coordinator.parse::<std::net::SocketAddr>().is_err()
        && !spec
            .coordinator
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
    {
        return Err(bad(format!("--coordinator {:?} is not HOST:PORT", spec.coordinator)));
    }
    pki::Pin::parse(&spec.ca_pin).map_err(|e| bad(format!("--ca-pin: {e}")))?;
    if let Some(t) = &spec.token {
        crate::enroll::check_token_shape(t)?;
    }
    if let Some(n) = &spec.node_name
        && (n.is_empty()
            || n.len() > 63
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return Err(bad(format!("--node-name {n:?}: use 1-63 of a-z, 0-9 and -")));
    }
    if let Some(r) = &spec.release_root {
        parse_root(r).map_err(|problem| bad(format!("--release-root: {problem}")))?;
    }
    for v in [&spec.coordinator, &spec.ca_pin] {
        if v.chars().any(char::is_control) {
            return Err(bad("control characters in an argument".into()));
        }
    }
    Ok(())
}

/// Installs; returns every step with whether it changed something.
pub fn install(spec: &InstallSpec) -> Result<Vec<Step>, AgentError> {
    check(spec)?;
    let root = &spec.root;
    let state_dir = under(root, bootstrap::spec::DEFAULT_STATE_DIR);
    let token_path = under(root, bootstrap::spec::TOKEN_FILE_PATH);
    let enrolled = state_dir.join(crate::identity::IDENTITY_FILE).exists();
    if spec.token.is_none() && !enrolled && !token_path.exists() {
        return Err(AgentError::NoToken);
    }
    let mut steps = Vec::new();
    let mut step = |what: String, changed: bool| steps.push(Step { what, changed });

    let binary = std::fs::read(&spec.binary).map_err(|e| io("reading", &spec.binary, e))?;
    let target = under(root, bootstrap::spec::AGENT_BINARY_PATH);
    step(
        format!("binary {}", target.display()),
        ensure_file(&target, &binary, 0o755)?,
    );

    let created = !state_dir.is_dir();
    std::fs::create_dir_all(&state_dir).map_err(|e| io("creating", &state_dir, e))?;
    let fix_mode = std::fs::metadata(&state_dir).is_ok_and(|m| m.permissions().mode() & 0o777 != 0o700);
    if fix_mode {
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod", &state_dir, e))?;
    }
    step(
        format!("state directory {} (0700)", state_dir.display()),
        created || fix_mode,
    );

    // The release root before the configuration that points at it. Without --release-root, one installed
    // earlier stays pinned (a re-run without the flag changes nothing).
    let root_path = under(root, RELEASE_ROOT_PATH);
    let pinned = match &spec.release_root {
        Some(text) => {
            let r =
                parse_root(text).map_err(|problem| AgentError::Config(vec![format!("--release-root: {problem}")]))?;
            step(
                format!("release root {} (0644)", root_path.display()),
                ensure_file(&root_path, r.contents().as_bytes(), 0o644)?,
            );
            true
        }
        None if root_path.is_file() => {
            step(format!("release root {}: kept as it is", root_path.display()), false);
            true
        }
        None => {
            step(
                format!(
                    "release root: none given, so this agent refuses upgrades until one is installed as {} \
                     (--release-root releases/repo/metadata/1.root.json)",
                    root_path.display()
                ),
                false,
            );
            false
        }
    };

    let config = bootstrap::agent_files::agent_config_for(
        &spec.coordinator,
        &spec.ca_pin,
        bootstrap::spec::DEFAULT_STATE_DIR,
        spec.node_name.as_deref(),
        pinned.then_some(RELEASE_ROOT_PATH),
    )
    .map_err(|e| AgentError::Other(e.to_string()))?;
    let config_path = under(root, bootstrap::spec::AGENT_CONFIG_PATH);
    step(
        format!("configuration {}", config_path.display()),
        ensure_file(&config_path, config.as_bytes(), 0o644)?,
    );

    match (&spec.token, enrolled) {
        (_, true) => step("join token: not needed, the host is already enrolled".into(), false),
        (Some(t), false) => step(
            format!("join token {} (0600)", token_path.display()),
            ensure_file(&token_path, format!("{t}\n").as_bytes(), 0o600)?,
        ),
        (None, false) => step("join token: kept as it is".into(), false),
    }

    let unit = under(root, bootstrap::spec::AGENT_UNIT_PATH);
    step(
        format!("systemd unit {}", unit.display()),
        ensure_file(&unit, bootstrap::agent_files::binary_unit().as_bytes(), 0o644)?,
    );
    let dropin = under(root, bootstrap::spec::AGENT_DROPIN_PATH);
    step(
        format!("systemd drop-in {}", dropin.display()),
        ensure_file(&dropin, bootstrap::agent_files::dropin().as_bytes(), 0o644)?,
    );
    Ok(steps)
}

/// Whether systemd runs this host (and `root` is the host itself).
pub fn systemd_manages(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

/// The commands that enable and start the agent.
pub const START_COMMANDS: [&[&str]; 2] = [
    &["systemctl", "daemon-reload"],
    &["systemctl", "enable", "--now", "--no-block", "nimbus-agent.service"],
];

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(root: &Path, binary: &Path) -> InstallSpec {
        InstallSpec {
            root: root.to_path_buf(),
            binary: binary.to_path_buf(),
            coordinator: "192.0.2.1:7443".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            token: Some("nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv".into()),
            node_name: Some("db-7".into()),
            release_root: Some(ROOT.into()),
        }
    }

    /// A real release root, as `nimbusctl release init` writes it (the bootstrap crate's test fixture).
    const ROOT: &str = include_str!("../../bootstrap/tests/fixtures/release-root.json");

    #[test]
    fn installs_everything_once_and_a_second_run_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let bin = dir.path().join("nimbus-agent");
        std::fs::write(&bin, b"\x7fELF fake agent").unwrap();
        let first = install(&spec(&root, &bin)).unwrap();
        assert!(first.iter().all(|s| s.changed), "{first:?}");
        let mode = |p: &str| std::fs::metadata(under(&root, p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(bootstrap::spec::TOKEN_FILE_PATH), 0o600);
        assert_eq!(mode(bootstrap::spec::AGENT_BINARY_PATH), 0o755);
        assert_eq!(mode(bootstrap::spec::DEFAULT_STATE_DIR), 0o700);
        let config = std::fs::read_to_string(under(&root, bootstrap::spec::AGENT_CONFIG_PATH)).unwrap();
        assert!(
            config.contains("coordinator = \"192.0.2.1:7443\"") && config.contains("db-7"),
            "{config}"
        );
        assert!(
            !config.contains("0123456789abcdef"),
            "the configuration holds no secret"
        );

        assert_eq!(mode(RELEASE_ROOT_PATH), 0o644);
        assert_eq!(
            std::fs::read_to_string(under(&root, RELEASE_ROOT_PATH)).unwrap(),
            ROOT,
            "installed byte for byte"
        );
        assert!(
            config.contains("release_root = \"/etc/nimbus/release-root.json\""),
            "{config}"
        );

        let second = install(&spec(&root, &bin)).unwrap();
        assert!(second.iter().all(|s| !s.changed), "{second:?}");
        // Without --release-root the installed root stays pinned: still nothing changes.
        let without = install(&InstallSpec {
            release_root: None,
            ..spec(&root, &bin)
        })
        .unwrap();
        assert!(without.iter().all(|s| !s.changed), "{without:?}");

        // Enrolled hosts need no token; hand-made changes are put back.
        std::fs::write(
            under(&root, bootstrap::spec::DEFAULT_STATE_DIR).join(crate::identity::IDENTITY_FILE),
            b"{}",
        )
        .unwrap();
        std::fs::write(under(&root, bootstrap::spec::AGENT_CONFIG_PATH), b"edited").unwrap();
        let third = install(&InstallSpec {
            token: None,
            ..spec(&root, &bin)
        })
        .unwrap();
        let changed: Vec<&str> = third.iter().filter(|s| s.changed).map(|s| s.what.as_str()).collect();
        assert_eq!(changed.len(), 1, "{third:?}");
        assert!(changed[0].starts_with("configuration"));
    }

    #[test]
    fn bad_values_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let bin = dir.path().join("bin");
        std::fs::write(&bin, b"x").unwrap();
        for bad in [
            InstallSpec {
                coordinator: "nowhere".into(),
                ..spec(&root, &bin)
            },
            InstallSpec {
                ca_pin: "md5:00".into(),
                ..spec(&root, &bin)
            },
            InstallSpec {
                token: Some("nimbus1.x".into()),
                ..spec(&root, &bin)
            },
            InstallSpec {
                node_name: Some("DB 7".into()),
                ..spec(&root, &bin)
            },
            InstallSpec {
                token: None,
                ..spec(&root, &bin)
            },
            InstallSpec {
                release_root: Some("{}".into()),
                ..spec(&root, &bin)
            },
            InstallSpec {
                release_root: Some(ROOT.replacen("\"_type\": \"root\"", "\"_type\": \"targets\"", 1)),
                ..spec(&root, &bin)
            },
        ] {
            assert!(install(&bad).is_err(), "{bad:?}");
        }
        assert!(!root.join("etc").exists(), "nothing written");
    }

    #[test]
    fn the_release_root_is_where_the_agent_looks_and_the_configuration_points_at_it() {
        assert_eq!(RELEASE_ROOT_PATH, crate::config::DEFAULT_RELEASE_ROOT);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let bin = dir.path().join("nimbus-agent");
        std::fs::write(&bin, b"agent").unwrap();
        install(&spec(&root, &bin)).unwrap();
        // The agent's own configuration loader reads the file bootstrap wrote.
        let settings: crate::config::Settings =
            daemon::config::load_optional(Some(&under(&root, bootstrap::spec::AGENT_CONFIG_PATH))).unwrap();
        assert_eq!(settings.release_root, Some(PathBuf::from(RELEASE_ROOT_PATH)));
    }

    #[test]
    fn without_a_release_root_none_is_pinned_and_the_step_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let bin = dir.path().join("nimbus-agent");
        std::fs::write(&bin, b"agent").unwrap();
        let steps = install(&InstallSpec {
            release_root: None,
            ..spec(&root, &bin)
        })
        .unwrap();
        assert!(!under(&root, RELEASE_ROOT_PATH).exists());
        let config = std::fs::read_to_string(under(&root, bootstrap::spec::AGENT_CONFIG_PATH)).unwrap();
        assert!(!config.contains("release_root"), "{config}");
        assert!(
            steps
                .iter()
                .any(|s| s.what.contains("refuses upgrades") && s.what.contains("--release-root")),
            "{steps:?}"
        );
        // Given later, it is installed and the configuration is rewritten to point at it.
        let later = install(&spec(&root, &bin)).unwrap();
        let changed: Vec<&str> = later.iter().filter(|s| s.changed).map(|s| s.what.as_str()).collect();
        assert_eq!(changed.len(), 2, "{later:?}");
        assert!(changed[0].starts_with("release root") && changed[1].starts_with("configuration"));
    }

    #[test]
    fn release_root_files_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("1.root.json");
        std::fs::write(&good, ROOT).unwrap();
        assert_eq!(read_release_root(&good).unwrap(), ROOT);

        let refused = |name: &str, body: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            let e = read_release_root(&p).unwrap_err();
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE, "{e}");
            let m = e.to_string();
            assert!(m.contains(&p.display().to_string()), "names the file: {m}");
            m
        };
        assert!(
            refused(
                "timestamp.json",
                br#"{"signed": {"_type": "timestamp"}, "signatures": [{}]}"#
            )
            .contains("not `root`")
        );
        assert!(refused("garbage.json", b"PK\x03\x04\xff\xfe").contains("UTF-8"));
        assert!(refused("notes.txt", b"root of trust").contains("not valid JSON"));
        assert!(refused("big.json", &vec![b' '; RELEASE_ROOT_MAX_BYTES + 10]).contains("too large"));
        let e = read_release_root(&dir.path().join("absent.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
    }
}
