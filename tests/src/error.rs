//! The one error type of the harness.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while building a lab, running processes in it or tearing it down.
///
/// Messages say what failed and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A helper command (`ip`, `nimbusctl`, ...) ran but reported failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line, for the reader.
        command: String,
        /// How it ended.
        status: ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// A helper command could not be started at all.
    #[error("could not run `{command}`: {source} (is it installed and on PATH?)")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A command did not finish in time and was killed.
    #[error("`{command}` did not finish within {after:?} and was killed{detail}")]
    CommandTimeout {
        /// The command line.
        command: String,
        /// The limit that was exceeded.
        after: Duration,
        /// Output collected so far, prefixed with ": " when non-empty.
        detail: String,
    },
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, including the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A daemon binary is not where we look for it.
    #[error(
        "{name} not found in {}: run `cargo build --workspace --bins` first (or point NIMBUS_BIN_DIR at the directory holding it)",
        dir.display()
    )]
    BinaryNotFound {
        /// The binary's file name.
        name: String,
        /// The directory searched.
        dir: PathBuf,
    },
    /// We are not root, or network namespaces cannot be created here.
    #[error("network namespaces are not available: {0} (run as root on a kernel with netns support)")]
    NoNetns(String),
    /// A namespace we want to create is already there.
    #[error(
        "network namespace {0} already exists: a previous lab was not torn down (`./deploy/lab.sh down`, or `ip netns delete {0}`)"
    )]
    NamespaceExists(String),
    /// A name that would not fit the kernel's limits or our conventions.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A host role that is not part of the topology.
    #[error("no host {0:?} in this lab (known hosts: {1})")]
    UnknownHost(String, String),
    /// Output that should have been JSON of a known shape was not.
    #[error("{what}: {reason}")]
    BadOutput {
        /// Which command or file.
        what: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Waiting for a condition took longer than the patience.
    #[error("timed out after {after:?} waiting for {what}: {last}")]
    Timeout {
        /// The condition.
        what: String,
        /// How long we waited.
        after: Duration,
        /// The last reason it was not met yet.
        last: String,
    },
    /// Waiting for a condition failed for good (e.g. the process we waited on exited).
    #[error("gave up waiting for {what}: {reason}")]
    GaveUp {
        /// The condition.
        what: String,
        /// Why waiting longer is pointless.
        reason: String,
    },
    /// The harness was used in a way it does not support (says how to use it instead).
    #[error("{0}")]
    Misuse(String),
    /// The lab state file is unusable.
    #[error("lab state file {}: {reason}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
}

impl HarnessError {
    /// Shorthand for [`HarnessError::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias used throughout the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
