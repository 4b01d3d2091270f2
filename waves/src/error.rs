//! [`WaveError`]: why a rollout could not be built or loaded.

/// Why [`Rollout::new`](crate::Rollout::new) refused its input, or a persisted rollout could not be loaded.
///
/// Every message says what was wrong and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaveError {
    /// The same node name appears in two targets.
    #[error(
        "node {node:?} appears more than once in the rollout targets; give each node exactly one target \
         (merge its changes into one, disruptive if any of them is)"
    )]
    DuplicateNode {
        /// The repeated node name.
        node: String,
    },
    /// A target has an empty node name.
    #[error("a rollout target has an empty node name; use the node's name from the inventory")]
    EmptyNodeName,
    /// `default_max_unavailable` is 0.
    #[error("default_max_unavailable is 0, so no disruptive change could ever start; set it to 1 or more")]
    ZeroDefaultLimit,
    /// A pool's `max_unavailable_per_pool` entry is 0.
    #[error(
        "max_unavailable_per_pool[{pool:?}] is 0, so that pool's disruptive changes could never start; \
         set it to 1 or more, or remove the entry to use default_max_unavailable"
    )]
    ZeroPoolLimit {
        /// The pool whose limit is 0.
        pool: String,
    },
    /// `wave_size` is `Some(0)`.
    #[error(
        "wave_size is 0, so no wave could hold a node; set it to 1 or more, or leave it unset to take \
         as many nodes as the limits allow"
    )]
    ZeroWaveSize,
    /// A persisted rollout was written in a format this build does not read.
    #[error(
        "the persisted rollout has format version {found}, but this build reads version {supported}; \
         resume it with the nimbus-waves version that wrote it, or discard it and plan a new rollout"
    )]
    UnsupportedVersion {
        /// The version found in the stored data.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A persisted rollout contradicts itself (edited by hand or corrupted).
    #[error(
        "the persisted rollout is inconsistent: {detail}; it was edited or corrupted, so discard it and \
         plan a new rollout from the nodes' current state"
    )]
    Inconsistent {
        /// What contradicts what.
        detail: String,
    },
}
