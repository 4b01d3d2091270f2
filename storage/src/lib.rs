//! # nimbus-storage
//!
//! Local storage on a node. The coordinator plans it (see `coordinator::storage`) as a [`StoragePlan`]; the
//! agent applies it idempotently with [`apply`] and never destroys data it was not told to destroy;
//! [`remove`] takes down (decommissions) exactly what the agent recorded creating.
//!
//! ```no_run
//! use storage::{ApplyOptions, Host, StoragePlan};
//! # fn plan() -> StoragePlan { StoragePlan::default() }
//! let host = Host::system("/var/lib/nimbus/agent");
//! let report = storage::apply(&host, &plan(), &ApplyOptions { dry_run: true, fail_after: None })?;
//! for c in &report.commands {
//!     println!("{c}");
//! }
//! # Ok::<(), storage::StorageError>(())
//! ```
//!
//! Everything is synchronous (call it from `tokio::task::spawn_blocking`); every program runs through a
//! [`Runner`] with a timeout.
//!
//! # Layout
//! * `model` — the plan: volumes, layouts (per disk, LVM, RAID0), file systems, disks by stable identity.
//! * `apply` — [`apply`], [`ApplyOptions`], [`Step`] (failure injection), [`Report`]; the per-layout flows, the
//!   safety check and plan validation ([`validate`]).
//! * `remove` — [`remove`] (decommission), [`RemoveOptions`].
//! * `probe` — facts about a disk named by a by-id path: device, sysfs identity, partitions, mounts, swap,
//!   holders, root disk, signature ([`inventory::probe_signature`]); mountinfo parsing.
//! * `state` — `storage-state.json`, the record of what this agent created (0600, atomic writes).
//! * `unit` — systemd `.mount` unit names (`systemd-escape --path`) and text.
//! * `runner` — [`Runner`], [`SystemRunner`], [`RecordingRunner`].
//! * `host` — [`Host`] (runner, paths, systemd, kernel support, timeouts, UUID source).
//! * `engine` — the execution context shared by apply and remove (dry run, state saves, `blkid`, device nodes).
//! * `error` — [`StorageError`].
//!
//! **Invariants:** a disk is written to only when it carries no signature, carries our recorded work for the
//! same volume, or is named in the volume's `wipe` list — and never when it is mounted, swap, held by dm/md or
//! holds the root file system. A dry run runs no mutating command and writes no file. `remove` touches only
//! devices whose current identifiers match the record.

mod apply;
#[cfg(test)]
mod apply_tests;
mod engine;
mod error;
mod host;
pub mod model;
pub mod probe;
mod remove;
pub mod runner;
pub mod state;
pub mod unit;

pub use apply::{
    ApplyOptions, LINUX_FS_PARTITION_TYPE, Report, Step, VolumeReport, VolumeState, apply, fs_label, validate,
};
pub use error::StorageError;
pub use host::{DEFAULT_MKFS_TIMEOUT, DEFAULT_UNIT_DIR, Host, Ids, KernelSupport};
pub use model::{DiskRef, Filesystem, Layout, MAX_PLAN_BYTES, StoragePlan, Volume};
pub use remove::{RemoveOptions, remove};
pub use runner::{Command, Output, RecordingRunner, Runner, SystemRunner};
pub use state::{STATE_FILE, State};
