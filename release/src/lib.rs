//! Signed agent releases: a TUF repository (The Update Framework, through awslabs' `tough`) that the coordinator
//! publishes and serves, and the verifying client the agent uses to download an upgrade over the tunnel.
//!
//! Why TUF and not a home-made signature: TUF gives signed targets with expiry (freeze protection: a stale
//! repository stops verifying), version checks kept across restarts (rollback protection), consistent snapshots
//! (no mix-and-match of metadata), thresholds and key rotation through a chain of root versions. An artefact
//! that does not verify is refused even when the coordinator serving it is compromised, as long as the offline
//! root key is not.
//!
//! # Layout
//! - [`keys`]: Ed25519 signing keys for the four roles as PKCS#8 PEM files (0600, created never overwritten),
//!   loaded through a `tough` key source that refuses loose permissions.
//! - [`repo`]: the publisher side. [`repo::init`] writes root v1 signed by the offline root key;
//!   [`repo::add_target`] adds an [`AgentRelease`] artefact (content-addressed under `targets/`) and re-signs
//!   targets, snapshot and timestamp; [`repo::refresh_timestamp`] is the daily re-signing job (and renews
//!   snapshot/targets past half their lifetime); [`repo::rotate`] / [`repo::rotate_root`] replace keys with a
//!   new root version, [`repo::renew_root`] re-signs root; [`repo::list`] shows what is published.
//! - [`client`]: the agent side. [`client::Releases`] loads and verifies the metadata from a pinned root
//!   (persisting what it saw in a datastore directory), lists releases and fetches one atomically;
//!   [`client::check_upgrade`] is the downgrade rule. The newest root seen is reused across restarts, so a
//!   server hiding `N+1.root.json` cannot send a restarted agent back to rotated-away keys.
//! - [`transport`]: [`transport::HttpRangeTransport`], a `tough` transport over plain HTTP/1.1 (hyper) that
//!   streams bodies and resumes a broken download with `Range`.
//! - [`serve`]: [`serve::RepoServer`], a read-only hyper handler for `GET|HEAD /metadata/<file>` and
//!   `/targets/<file>` with single byte ranges, streaming files from disk in chunks.
//!
//! A repository directory holds `metadata/` (`N.root.json`, `root.json` = the newest root, `N.targets.json`,
//! `N.snapshot.json`, `timestamp.json`) and `targets/` (`<sha256>.<name>`). Metadata files are replaced by
//! rename, timestamp last, so a reader never sees a half-written file or a timestamp naming a missing snapshot.
//!
//! Invariants: nothing here logs key material; no artefact byte reaches its destination path before `tough`
//! verified its length and SHA-256; the server never follows a symlink and never holds a whole file in memory.

pub mod client;
pub mod keys;
pub mod repo;
pub mod serve;
pub mod transport;

mod fsio;

use serde::{Deserialize, Serialize};

pub use client::{Refusal, ReleaseInfo, Releases, UpgradeStep, check_upgrade};
pub use keys::{KeyRole, OnlineKeys};
pub use repo::Expiries;
pub use serve::RepoServer;
pub use transport::HttpRangeTransport;

/// What an artefact is: recorded in the target's signed custom metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtefactKind {
    /// A bare `nimbus-agent` executable.
    Binary,
    /// A Debian package.
    Deb,
    /// An RPM package.
    Rpm,
}

impl ArtefactKind {
    /// The name used in metadata and on command lines: `binary`, `deb`, `rpm`.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtefactKind::Binary => "binary",
            ArtefactKind::Deb => "deb",
            ArtefactKind::Rpm => "rpm",
        }
    }
}

impl std::fmt::Display for ArtefactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ArtefactKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "binary" => Ok(ArtefactKind::Binary),
            "deb" => Ok(ArtefactKind::Deb),
            "rpm" => Ok(ArtefactKind::Rpm),
            other => Err(format!("unknown artefact kind {other:?}: use binary, deb or rpm")),
        }
    }
}

/// The release an artefact belongs to, signed into `targets.json` as the target's custom metadata
/// (`{"version": "1.2.3", "kind": "deb", "arch": "x86_64"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRelease {
    /// The agent's semantic version.
    pub version: semver::Version,
    /// Binary or package format.
    pub kind: ArtefactKind,
    /// The CPU architecture, as `uname -m` prints it (`x86_64`, `aarch64`).
    pub arch: String,
}
