//! Errors of the audit library. Every message says what was wrong and what to do about it.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = AuditError> = std::result::Result<T, E>;

/// An error from an [`AuditStore`](crate::AuditStore) implementation (the coordinator's KV store,
/// or [`MemoryStore`](crate::MemoryStore)). Wraps whatever the backend reported.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// A store error with a message only.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            source: None,
        }
    }

    /// A store error caused by a backend error.
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store: {0}; check that the coordinator's store is reachable and retry")]
    Store(#[from] StoreError),

    #[error("reading audit key {path}: {source}; check the path and that the coordinator may read it")]
    KeyRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("writing audit key {path}: {source}; check that the directory exists and is writable by the coordinator")]
    KeyWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "audit key {path} has mode {mode:04o}, readable by group or others; run `chmod 600 {path}` \
         (and consider rotating the key, it may have leaked)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    #[error(
        "audit key {path} is owned by uid {owner}, not by this process (uid {euid}); chown it to the coordinator's user"
    )]
    KeyOwner { path: PathBuf, owner: u32, euid: u32 },

    #[error(
        "audit key {path} is not a usable Ed25519 PKCS#8 key ({reason}); restore it from backup, or move it away \
         to let the coordinator create a new one (keep the old public key to verify old checkpoints)"
    )]
    KeyInvalid { path: PathBuf, reason: String },

    #[error("generating an Ed25519 audit key failed; the system random source may be unavailable")]
    KeyGenerate,

    #[error("public key {input:?} is not a 32-byte Ed25519 key in base64 or hex; copy it again from the coordinator")]
    PublicKeyInvalid { input: String },

    #[error("audit record is invalid: {reason}")]
    InvalidRecord { reason: String },

    #[error(
        "audit detail contains a floating-point number at {at}; floats have no canonical encoding: \
         record the value as a string or an integer (e.g. milliseconds)"
    )]
    DetailHasFloat { at: String },

    #[error(
        "audit detail is {size} bytes, more than the {max}-byte limit; keep detail small (ids and counts, not payloads)"
    )]
    DetailTooLarge { size: usize, max: usize },

    #[error(
        "audit append lost the compare-and-swap race {attempts} times in a row; the store is under heavy \
         contention or another writer keeps failing: retry, and check the other coordinators"
    )]
    Contention { attempts: u32 },

    #[error("store refused entry seq {seq}: {reason}")]
    StoreRejected { seq: u64, reason: String },

    #[error("audit sink {path}: {source}; check that the directory exists and the coordinator may write there")]
    SinkOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("syslog socket {path}: {reason}; is a syslog daemon (rsyslog, syslog-ng, journald) listening there?")]
    Syslog { path: PathBuf, reason: String },

    #[error("reading audit sink file {path}: {source}; check the path")]
    SinkRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} line {line}: {reason}; the file is not an audit JSON-lines sink, or the line was damaged")]
    SinkParse { path: PathBuf, line: usize, reason: String },

    #[error("encoding an audit record as JSON failed: {0}")]
    Encode(#[from] serde_json::Error),
}
