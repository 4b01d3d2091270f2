//! The install script: POSIX `sh`, `set -eu`, idempotent. cloud-init's `runcmd` runs it
//! ([`ScriptKind::InstallOnly`]: the configuration and token come from `write_files`); OpenNebula's
//! `START_SCRIPT_BASE64` and the stand-alone `install-agent.sh` carry the configuration and the token in it
//! ([`ScriptKind::Standalone`]).
//!
//! What it does, in order: write the configuration, the token and the release root when pinned (stand-alone
//! only) and the systemd drop-in (and the unit for a bare binary), each only when its content differs;
//! download the package with curl, check its SHA-256 and install it, skipped when that exact package is already
//! installed; `systemctl daemon-reload` and `systemctl enable --now`.
//!
//! Every value is a single-quoted shell word made by [`quote`]; multi-line files are quoted here-documents
//! (`<<'NIMBUS_EOF'`), so nothing in them is expanded.

use crate::agent_files;
use crate::error::BootstrapError;
use crate::spec::{
    AGENT_BINARY_PATH, AGENT_CONFIG_PATH, AGENT_DROPIN_PATH, AGENT_PACKAGE_NAME, AGENT_UNIT_PATH, Artefact,
    BootstrapSpec, Checked, DOWNLOAD_DIR, PACKAGE_MARKER_PATH, PackageKind, RELEASE_ROOT_PATH, TOKEN_FILE_PATH,
};
use crate::validate;

/// The here-document delimiter. No rendered file has a line equal to it (checked).
const HEREDOC_END: &str = "NIMBUS_EOF";

/// Name of the stand-alone script in [`render`]'s artefact.
pub const SCRIPT_FILE: &str = "install-agent.sh";

/// Which files the script writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptKind {
    /// Package, systemd drop-in/unit and service only: the configuration and the token are written by someone
    /// else (cloud-init `write_files`). Holds no secret.
    InstallOnly,
    /// Also writes the agent configuration, the join token file (0600) and the release root (when pinned,
    /// 0644). Holds the join token.
    Standalone,
}

/// `value` as one single-quoted shell word: `'…'`, each `'` written as `'\''`. Refuses newlines, NUL and other
/// control characters (a value spanning lines is never what was meant).
pub fn quote(value: &str) -> Result<String, BootstrapError> {
    validate::single_line("shell value", value)?;
    Ok(format!("'{}'", value.replace('\'', r"'\''")))
}

/// The install script for `spec`.
pub fn install_script(spec: &BootstrapSpec, kind: ScriptKind) -> Result<String, BootstrapError> {
    script(&spec.checked()?, kind)
}

/// The stand-alone `install-agent.sh` ([`ScriptKind::Standalone`]), for hosts without cloud-init: copy it to
/// the host and run it as root.
pub fn render(spec: &BootstrapSpec) -> Result<Artefact, BootstrapError> {
    let c = spec.checked()?;
    let mut a = Artefact {
        notes: c.token_notes(),
        ..Artefact::default()
    };
    a.push(SCRIPT_FILE, script(&c, ScriptKind::Standalone)?, true);
    a.notes.push(format!(
        "run {SCRIPT_FILE} as root on the host (sh {SCRIPT_FILE}); running it again changes nothing"
    ));
    Ok(a)
}

/// `put PATH MODE <<'NIMBUS_EOF'` … `NIMBUS_EOF`.
fn put(out: &mut String, path: &str, mode: &str, content: &str) -> Result<(), BootstrapError> {
    if !content.ends_with('\n') || content.lines().any(|l| l == HEREDOC_END) {
        return Err(BootstrapError::render(
            "the install script",
            format!("the content for {path} cannot be embedded in a here-document"),
        ));
    }
    out.push_str(&format!(
        "put {} {mode} <<'{HEREDOC_END}'\n{content}{HEREDOC_END}\n",
        quote(path)?
    ));
    Ok(())
}

const PRELUDE: &str = r#"set -eu
umask 022
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

log() {
    printf 'nimbus-bootstrap: %s\n' "$*" >&2
}

# put PATH MODE < CONTENT: installs CONTENT at PATH with MODE. A file that already holds it is left alone, and
# so is its directory: the comparison happens in a private scratch directory.
put() {
    (umask 077 && cat > "$scratch/new")
    if [ -f "$1" ] && [ "$(sha256sum < "$scratch/new")" = "$(sha256sum < "$1")" ]; then
        if [ "$(stat -c %a "$1")" != "${2#0}" ]; then
            chmod "$2" "$1"
        fi
    else
        mkdir -p "$(dirname "$1")"
        rm -f "$1.nimbus-new"
        (umask 077 && cat "$scratch/new" > "$1.nimbus-new")
        chmod "$2" "$1.nimbus-new"
        mv -f "$1.nimbus-new" "$1"
        log "wrote $1"
    fi
    rm -f "$scratch/new"
}

# download FILE: fetches the package to FILE and checks its SHA-256; a mismatch stops the script.
download() {
    mkdir -p "$(dirname "$1")"
    rm -f "$1.part"
    log "downloading $package_url"
    curl --fail --silent --show-error --location --retry 5 --output "$1.part" "$package_url"
    if ! printf '%s  %s\n' "$package_sha256" "$1.part" | sha256sum -c -; then
        rm -f "$1.part"
        log "the download does not have SHA-256 $package_sha256: not installing it; check the package URL and digest"
        exit 1
    fi
    mv -f "$1.part" "$1"
}
"#;

const SYSTEMD: &str = r#"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now --no-block nimbus-agent.service
    log "nimbus-agent is enabled and starting; follow it with: journalctl -u nimbus-agent -f"
else
    log "systemd is not running here: start the agent yourself, e.g. NIMBUS_CONFIG=$config_file nimbus-agent"
fi
"#;

pub(crate) fn script(c: &Checked<'_>, kind: ScriptKind) -> Result<String, BootstrapError> {
    let pkg = &c.spec.package;
    let mut s = String::new();
    s.push_str("#!/bin/sh\n");
    s.push_str("# polynimbus: installs the nimbus-agent and enrolls this host. Rendered by nimbus-bootstrap.\n");
    s.push_str("# Idempotent: once the agent is installed and enabled, running it again changes nothing.\n");
    if kind == ScriptKind::Standalone {
        s.push_str(&format!("# {}\n", c.secret_comment()));
    }
    s.push_str(PRELUDE);
    s.push('\n');
    s.push_str(&format!("package_url={}\n", quote(&pkg.url)?));
    s.push_str(&format!("package_sha256={}\n", quote(&c.sha256)?));
    s.push_str(&format!("config_file={}\n", quote(AGENT_CONFIG_PATH)?));
    s.push('\n');

    if kind == ScriptKind::Standalone {
        s.push_str("# The agent configuration, and the join token it enrolls with (0600).\n");
        put(&mut s, AGENT_CONFIG_PATH, "0644", &agent_files::agent_config(c)?)?;
        put(&mut s, TOKEN_FILE_PATH, "0600", &agent_files::token_file(c))?;
        if let Some(root) = &c.release_root {
            s.push_str("# The release root the agent verifies upgrades against (public metadata).\n");
            put(&mut s, RELEASE_ROOT_PATH, "0644", root.contents())?;
        }
    }
    s.push_str("# Point the service at the configuration, whichever unit the package ships.\n");
    put(&mut s, AGENT_DROPIN_PATH, "0644", &agent_files::dropin())?;
    s.push('\n');

    s.push_str("# The agent itself: skipped when this exact package is already installed.\n");
    match pkg.kind {
        PackageKind::Deb | PackageKind::Rpm => {
            let (ext, is_installed, install) = if pkg.kind == PackageKind::Deb {
                (
                    "deb",
                    format!("dpkg -s {AGENT_PACKAGE_NAME} 2>/dev/null | grep -qx 'Status: install ok installed'"),
                    "dpkg -i \"$pkg\"".to_string(),
                )
            } else {
                (
                    "rpm",
                    format!("rpm -q {AGENT_PACKAGE_NAME} >/dev/null 2>&1"),
                    "rpm -U --replacepkgs --oldpackage \"$pkg\"".to_string(),
                )
            };
            s.push_str(&format!("marker={}\n", quote(PACKAGE_MARKER_PATH)?));
            s.push_str(&format!(
                "pkg={}\n",
                quote(&format!("{DOWNLOAD_DIR}/{AGENT_PACKAGE_NAME}.{ext}"))?
            ));
            s.push_str(&format!(
                "if [ -f \"$marker\" ] && [ \"$(cat \"$marker\")\" = \"$package_sha256\" ] && {is_installed}; then\n"
            ));
            s.push_str("    log \"the nimbus-agent package $package_sha256 is already installed\"\n");
            s.push_str("else\n");
            s.push_str("    download \"$pkg\"\n");
            s.push_str(&format!("    {install}\n"));
            s.push_str("    mkdir -p \"$(dirname \"$marker\")\"\n");
            s.push_str("    printf '%s\\n' \"$package_sha256\" > \"$marker\"\n");
            s.push_str("fi\n");
        }
        PackageKind::Binary => {
            s.push_str(&format!("agent_bin={}\n", quote(AGENT_BINARY_PATH)?));
            s.push_str(&format!(
                "pkg={}\n",
                quote(&format!("{DOWNLOAD_DIR}/{AGENT_PACKAGE_NAME}"))?
            ));
            s.push_str(
                "if [ -f \"$agent_bin\" ] && printf '%s  %s\\n' \"$package_sha256\" \"$agent_bin\" | sha256sum -c --status -; then\n",
            );
            s.push_str("    log \"$agent_bin already has SHA-256 $package_sha256\"\n");
            s.push_str("else\n");
            s.push_str("    download \"$pkg\"\n");
            s.push_str("    install -m 0755 \"$pkg\" \"$agent_bin\"\n");
            s.push_str("    log \"installed $agent_bin\"\n");
            s.push_str("fi\n");
            put(&mut s, AGENT_UNIT_PATH, "0644", &agent_files::binary_unit())?;
        }
    }
    s.push_str(SYSTEMD);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// What `sh` makes of a quoted word.
    fn sh_echo(word: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s' {word}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{word}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn quote_survives_hostile_values() {
        for v in [
            "",
            "plain",
            "it's",
            "'",
            "''",
            "'\\''",
            "$(touch /tmp/nimbus-bootstrap-pwned)",
            "`touch /tmp/nimbus-bootstrap-pwned`",
            "${HOME}",
            "$HOME",
            "a;b && c || d | e > f < g",
            "\"double\" \\back\\slash\\",
            "* ? [a-z] ~ # !",
            "tab\there",
            "ünïcødé",
        ] {
            if v.contains('\t') {
                // Tab is a control character: refused like a newline.
                assert!(quote(v).is_err());
                continue;
            }
            let q = quote(v).unwrap();
            assert!(q.starts_with('\'') && q.ends_with('\''), "{q}");
            assert_eq!(sh_echo(&q), v, "quoted as {q}");
        }
        assert!(!std::path::Path::new("/tmp/nimbus-bootstrap-pwned").exists());
        assert_eq!(quote("it's").unwrap(), r"'it'\''s'");
    }

    #[test]
    fn quote_refuses_newlines_and_nul() {
        for v in ["a\nb", "a\rb", "a\0b", "\n", "x\u{1b}[31m"] {
            let e = quote(v).unwrap_err().to_string();
            assert!(e.contains("control character"), "{e}");
        }
    }

    #[test]
    fn heredoc_content_is_checked() {
        let mut s = String::new();
        assert!(put(&mut s, "/x", "0644", "no newline").is_err());
        assert!(put(&mut s, "/x", "0644", "a\nNIMBUS_EOF\nb\n").is_err());
        put(&mut s, "/x", "0644", "a\n").unwrap();
        assert_eq!(s, "put '/x' 0644 <<'NIMBUS_EOF'\na\nNIMBUS_EOF\n");
    }
}
