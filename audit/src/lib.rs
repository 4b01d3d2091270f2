//! Tamper-evident audit log for the coordinator: who changed what, from where, when, with what result.
//!
//! Every state-changing call is appended as an [`Entry`] hash-chained to the previous one (SHA-256 over
//! a documented canonical JSON encoding, see [`model`]). Periodically the coordinator signs a
//! [`Checkpoint`] ("entry N has hash H", Ed25519) and ships it, with every entry, to outside [`Sink`]s
//! (a JSON-lines file, syslog). [`verify()`] then detects an edited entry (hash mismatch), a removed or
//! reordered one (seq gap, broken link), a forged checkpoint, and — using checkpoints read back from the
//! sink — a truncated tail or a history rewritten with recomputed hashes.
//!
//! The library does no coordinator-specific I/O: the coordinator implements [`AuditStore`] on its KV
//! store (compare-and-swap on the head) and drives the checkpoint timer ([`AuditLog::maybe_checkpoint`]).
//!
//! **Never put secrets in [`Record::detail`]** (or any other field): it is stored and shipped as given.
//!
//! # Layout
//!
//! - [`model`]: [`Entry`], [`Record`], [`Principal`], [`Outcome`], [`Checkpoint`], the canonical encoding
//!   and [`entry_hash`] (documented so an outside tool can recompute it).
//! - [`key`]: [`AuditKey`] (PKCS#8 Ed25519 file, 0600), [`key_id`], signature verification.
//! - [`store`]: the [`AuditStore`] trait, suggested KV keys, [`read_all`], [`MemoryStore`].
//! - [`log`]: [`AuditLog`] (append with CAS retry, sinks, checkpoint policy).
//! - [`sink`]: the [`Sink`] trait, [`JsonLinesFile`], reading a sink back ([`read_sink_checkpoints`]).
//! - [`syslog_sink`]: [`Syslog`] (RFC 5424/3164 over `/dev/log`, facility authpriv or local0).
//! - [`verify`](mod@verify): [`verify()`], [`verify_store`], [`Report`], [`Problem`].
//! - [`error`]: [`AuditError`], [`StoreError`].
//!
//! Invariants: entries are only ever appended (seq = head + 1, under the store's compare-and-swap);
//! sink failures never fail an append; the private key never reaches logs or `Debug` output; no floats
//! in hashed data.

pub mod error;
pub mod key;
pub mod log;
pub mod model;
pub mod sink;
pub mod store;
pub mod syslog_sink;
pub mod verify;

pub use error::{AuditError, Result, StoreError};
pub use key::{AuditKey, TrustedKey, decode_public_key, key_id, verify_checkpoint_signature};
pub use log::{AuditLog, CheckpointPolicy, now_unix_ms};
pub use model::{
    Checkpoint, Entry, GENESIS_PREV, MAX_DETAIL_BYTES, Outcome, Principal, PrincipalKind, Record, canonical_json,
    entry_canonical_body, entry_hash,
};
pub use sink::{JsonLinesFile, SINK_FILE_MODE, Sink, SinkLine, read_sink, read_sink_checkpoints};
pub use store::{AuditStore, HEAD_KEY, MemoryStore, checkpoint_key, entry_key, read_all};
pub use syslog_sink::{Syslog, SyslogConfig, SyslogFacility, SyslogFormat};
pub use verify::{Problem, Report, verify, verify_store};
