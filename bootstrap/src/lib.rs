//! # nimbus-bootstrap
//!
//! Renders the artefacts that put a polynimbus agent on a new host: given a [`BootstrapSpec`] (coordinator
//! endpoint, CA pin, join token, package URL and digest, optional node name and release root), each platform
//! module returns an [`Artefact`]: named files plus notes for the operator.
//!
//! **Invariant:** pure. No network I/O, no clock, no randomness, no file system: the same input gives the same
//! bytes (golden-tested). The CLI (`nimbusctl bootstrap render`) mints the token and writes the files; the
//! coordinator serves packages, seeds and iPXE scripts.
//!
//! **Invariant:** the join token is the only secret an artefact holds. Every artefact says so in a comment
//! where its format has comments, [`Artefact::notes`] says so, [`Artefact::secret_files`] names the files to
//! write with mode 0600, and on the host the token lands in `/etc/nimbus/join-token` (0600). `Debug` of the
//! inputs and outputs never prints the token; error messages never contain it. The release root is public
//! metadata, not a secret: it never makes a file secret by itself.
//!
//! Every value is validated before use (typed [`BootstrapError`]s saying what to give instead) and is then
//! either serialised by a real serialiser (YAML, JSON, TOML), quoted by a tested function (shell, OpenNebula)
//! or, where a format has no reliable escaping (iPXE, `.vmx`), restricted to characters that need none.
//!
//! # Layout
//!
//! - [`spec`]: [`BootstrapSpec`], [`PackageSource`], [`Artefact`], the host paths the artefacts install to.
//! - [`error`]: the one error type, [`BootstrapError`].
//! - [`release_root`]: the agent release repository's root metadata ([`ReleaseRoot`]), checked and installed
//!   as `/etc/nimbus/release-root.json` so agents verify upgrades against it from the first boot.
//! - [`shell`]: the idempotent POSIX install script and [`shell::quote`]; stand-alone `install-agent.sh`.
//! - [`cloud_init`]: `#cloud-config` user-data (AWS and every cloud-init image) and MIME multipart.
//! - [`azure`]: custom data, base64, within Azure's 65 535-byte limit.
//! - [`opennebula`]: the VM template `CONTEXT` section (start script or cloud-init user data).
//! - [`vmware`]: guestinfo keys for cloud-init's VMware datasource, as `.vmx` lines and JSON.
//! - [`ipxe`]: the per-MAC iPXE script and the NoCloud seeds; [`normalize_mac`].
//! - `validate` (private): the syntax checks; `agent_files` (private): agent configuration TOML, systemd
//!   unit and drop-in.

pub mod agent_files;
pub mod azure;
pub mod cloud_init;
pub mod error;
pub mod ipxe;
pub mod opennebula;
pub mod release_root;
pub mod shell;
pub mod spec;
mod validate;
pub mod vmware;

pub use error::BootstrapError;
pub use release_root::ReleaseRoot;
pub use spec::{Artefact, BootstrapSpec, PackageKind, PackageSource};
pub use validate::normalize_mac;
