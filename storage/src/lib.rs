//! # nimbus-storage
//!
//! Local storage on a node. The coordinator plans it (see `coordinator::storage`) as a [`StoragePlan`]; the
//! agent applies it idempotently and never destroys data it was not told to destroy.
//!
//! # Layout
//! * `model` — the plan: volumes, layouts (per disk, LVM, RAID0), file systems, disks by stable identity.

pub mod model;

pub use model::{DiskRef, Filesystem, Layout, StoragePlan, Volume};
