//! The input ([`BootstrapSpec`]) and output ([`Artefact`]) of every renderer, and the host paths the
//! artefacts install to.

use std::fmt;

use crate::error::BootstrapError;
pub use crate::release_root::RELEASE_ROOT_PATH;
use crate::release_root::{self, ReleaseRoot};
use crate::validate::{self, Scheme};

/// Where the agent configuration is written on the host (mode 0644, owner root).
pub const AGENT_CONFIG_PATH: &str = "/etc/nimbus/agent.toml";
/// Where the join token is written on the host (mode 0600, owner root). The agent reads it once, to enroll.
pub const TOKEN_FILE_PATH: &str = "/etc/nimbus/join-token";
/// The agent's state directory when the spec names none (the agent's own default).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nimbus-agent";
/// Where a [`PackageKind::Binary`] agent is installed.
pub const AGENT_BINARY_PATH: &str = "/usr/local/bin/nimbus-agent";
/// The systemd unit written for a [`PackageKind::Binary`] agent (packages bring their own).
pub const AGENT_UNIT_PATH: &str = "/etc/systemd/system/nimbus-agent.service";
/// The systemd drop-in, written for every kind, that points the agent at [`AGENT_CONFIG_PATH`]
/// (`Environment=NIMBUS_CONFIG=…`).
pub const AGENT_DROPIN_PATH: &str = "/etc/systemd/system/nimbus-agent.service.d/10-bootstrap.conf";
/// The install script as cloud-init writes it (runcmd runs it; it can be re-run by hand).
pub const INSTALL_SCRIPT_PATH: &str = "/var/lib/nimbus-bootstrap/install-agent.sh";
/// Records the SHA-256 of the installed .deb/.rpm so a second run skips the download.
pub const PACKAGE_MARKER_PATH: &str = "/var/lib/nimbus-bootstrap/package.sha256";
/// Where the package is downloaded to before it is verified and installed.
pub const DOWNLOAD_DIR: &str = "/var/cache/nimbus-bootstrap";
/// Name of the package and of its systemd unit.
pub const AGENT_PACKAGE_NAME: &str = "nimbus-agent";

/// How the agent is packaged at [`PackageSource::url`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PackageKind {
    /// A .deb, installed with `dpkg -i` (Debian, Ubuntu).
    Deb,
    /// An .rpm, installed with `rpm -U` (RHEL, Fedora, SUSE).
    Rpm,
    /// The bare `nimbus-agent` executable, installed to [`AGENT_BINARY_PATH`] with a systemd unit written next
    /// to it.
    Binary,
}

impl PackageKind {
    /// `deb`, `rpm` or `binary`.
    pub fn as_str(self) -> &'static str {
        match self {
            PackageKind::Deb => "deb",
            PackageKind::Rpm => "rpm",
            PackageKind::Binary => "binary",
        }
    }
}

/// Where the host gets the agent, and the digest it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSource {
    /// `https://` or `http://` URL on the coordinator or a mirror. Plain http is acceptable because the
    /// download is verified against [`sha256`](Self::sha256) before anything is installed; an https server
    /// must have a certificate the host already trusts.
    pub url: String,
    /// SHA-256 of the file at `url`, 64 hex digits.
    pub sha256: String,
    /// What the file is.
    pub kind: PackageKind,
}

/// Everything a renderer needs to make a host install the agent and enroll.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapSpec {
    /// The coordinator's enrollment endpoint, `HOST:PORT`.
    pub coordinator: String,
    /// SHA-256 pin of the coordinator's CA: `sha256:<64 lowercase hex>`.
    pub ca_pin: String,
    /// The join token `nimbus1.<id>.<secret>`: the only secret an artefact may hold. Never logged; `Debug`
    /// redacts it.
    pub token: String,
    /// When the token expires, as text for comments and notes (e.g. `2026-05-01T12:00:00Z (in 1h)`).
    pub token_expiry: String,
    /// Node name the agent asks for; the host name when unset. `[a-z0-9-]{1,63}`.
    pub node_name: Option<String>,
    /// Where the agent comes from.
    pub package: PackageSource,
    /// The agent's state directory; [`DEFAULT_STATE_DIR`] when unset.
    pub state_dir: Option<String>,
    /// The agent release repository's root metadata (the text of `1.root.json` from `nimbusctl release init`):
    /// public, not a secret. When set, every artefact installs it as [`RELEASE_ROOT_PATH`] (0644) and the agent
    /// configuration's `release_root` points at it, so agents accept only releases signed under this root.
    /// Checked by [`ReleaseRoot::parse`]. When unset, agents refuse upgrades until a root is installed.
    pub release_root: Option<String>,
}

impl fmt::Debug for BootstrapSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapSpec")
            .field("coordinator", &self.coordinator)
            .field("ca_pin", &self.ca_pin)
            .field("token", &"<redacted>")
            .field("token_expiry", &self.token_expiry)
            .field("node_name", &self.node_name)
            .field("package", &self.package)
            .field("state_dir", &self.state_dir)
            .field(
                "release_root",
                &self.release_root.as_ref().map(|r| format!("<{} bytes>", r.len())),
            )
            .finish()
    }
}

/// A spec whose every value passed validation, with the derived facts the renderers need.
#[derive(Clone)]
pub(crate) struct Checked<'a> {
    pub spec: &'a BootstrapSpec,
    /// The public id of the join token.
    pub token_id: &'a str,
    /// The package digest, lowercase.
    pub sha256: String,
    pub package_scheme: Scheme,
    pub state_dir: &'a str,
    pub release_root: Option<ReleaseRoot>,
}

impl BootstrapSpec {
    /// Checks every value: endpoint `HOST:PORT`, pin and token syntax, URL scheme and characters, digest,
    /// node name, state directory, the release root ([`ReleaseRoot::parse`]), and no newline, NUL or other
    /// control character anywhere else.
    pub fn validate(&self) -> Result<(), BootstrapError> {
        self.checked().map(|_| ())
    }

    pub(crate) fn checked(&self) -> Result<Checked<'_>, BootstrapError> {
        validate::endpoint("coordinator", &self.coordinator)?;
        validate::ca_pin("ca_pin", &self.ca_pin)?;
        let token_id = validate::token("token", &self.token)?;
        validate::text("token_expiry", &self.token_expiry)?;
        if let Some(n) = &self.node_name {
            validate::node_name("node_name", n)?;
        }
        let package_scheme = validate::url("package.url", &self.package.url)?;
        let sha256 = validate::sha256("package.sha256", &self.package.sha256)?;
        let state_dir = self.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR);
        validate::abs_path("state_dir", state_dir)?;
        let release_root = self.release_root.as_deref().map(ReleaseRoot::parse).transpose()?;
        Ok(Checked {
            spec: self,
            token_id,
            sha256,
            package_scheme,
            state_dir,
            release_root,
        })
    }
}

impl Checked<'_> {
    /// The notes every artefact holding this spec's token carries (and what they say about the release root).
    pub(crate) fn token_notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "contains a single-use join token (id {}) valid until {}: it is the only secret in these files; \
             keep them private until the host has enrolled",
            self.token_id, self.spec.token_expiry
        )];
        if self.package_scheme == Scheme::Http {
            notes.push(format!(
                "the agent package is fetched over plain http ({}); its SHA-256 is checked before it is installed",
                self.spec.package.url
            ));
        }
        notes.push(match &self.release_root {
            Some(r) => r.note(),
            None => release_root::missing_note(),
        });
        notes
    }

    /// The one-line comment that says an artefact holds the token.
    pub(crate) fn secret_comment(&self) -> String {
        format!(
            "SECRET: holds a single-use join token (id {}) valid until {}. Keep it private until the host has \
             enrolled; it is useless afterwards.",
            self.token_id, self.spec.token_expiry
        )
    }
}

/// The rendered files and what to tell the operator.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Artefact {
    /// `(name, contents)` in a fixed order. Names are relative paths (`user-data.yaml`,
    /// `seeds/52:54:00:12:34:56/user-data`).
    pub files: Vec<(String, Vec<u8>)>,
    /// Lines for the operator, e.g. "contains a single-use join token … valid until …".
    pub notes: Vec<String>,
    /// Names (from `files`) of the files holding a join token: write them mode 0600.
    pub secret_files: Vec<String>,
}

impl Artefact {
    /// The contents of the file called `name`.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, c)| c.as_slice())
    }

    pub(crate) fn push(&mut self, name: impl Into<String>, contents: impl Into<Vec<u8>>, secret: bool) {
        let name = name.into();
        if secret {
            self.secret_files.push(name.clone());
        }
        self.files.push((name, contents.into()));
    }
}

impl fmt::Debug for Artefact {
    /// File names and sizes only: the contents hold the join token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Artefact")
            .field(
                "files",
                &self
                    .files
                    .iter()
                    .map(|(n, c)| format!("{n} ({} bytes)", c.len()))
                    .collect::<Vec<_>>(),
            )
            .field("notes", &self.notes)
            .field("secret_files", &self.secret_files)
            .finish()
    }
}
