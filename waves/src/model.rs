//! The engine's vocabulary: what goes in ([`Target`], [`Limits`], [`Event`]), what comes out
//! ([`Action`]) and what can be asked ([`Phase`], [`NodeState`], [`Status`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One node to change.
///
/// The engine does not know what the change is: the coordinator maps [`Action::Apply`] to "drain and
/// `kubeadm reset`", "move the pool's workloads", "upgrade the agent", ….
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// The node's name (unique within a rollout).
    pub node: String,
    /// The pool the node belongs to; `max_unavailable_per_pool` is looked up by this name.
    pub pool: String,
    /// The node's zone, if known. Nodes without a zone are not counted against the zone limit.
    pub zone: Option<String>,
    /// `true` if the change takes the node out of service (it then goes out in a limited wave and
    /// must report healthy); `false` if it is applied at once, in wave 0.
    pub disruptive: bool,
}

/// How much of the fleet a rollout may disturb at once.
///
/// Missing fields take their [`Default`] when deserialized, so a config file can name only what it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Per-pool cap on disruptive nodes in flight (applied but not yet healthy). Each entry must be >= 1.
    pub max_unavailable_per_pool: BTreeMap<String, u32>,
    /// Cap for pools not named in `max_unavailable_per_pool`. Must be >= 1. Default 1.
    pub default_max_unavailable: u32,
    /// Cap on disruptive nodes in flight per zone, across pools; 0 means no zone limit. Default 0.
    pub max_unavailable_per_zone: u32,
    /// How many failed nodes are tolerated: the rollout pauses when failures exceed this. Default 0
    /// (the first failure pauses).
    pub max_failures: u32,
    /// Cap on nodes per disruptive wave; `None` takes as many as the limits allow. Default `None`.
    pub wave_size: Option<u32>,
    /// On [`Event::Abort`], emit [`Action::Rollback`] for every node that was applied but is not
    /// healthy (applying, waiting for health, or failed). Default `false`.
    pub rollback_on_abort: bool,
    /// Size of the first disruptive wave (the canary); 0 means no canary (the first wave is as large as the
    /// other limits allow). Default 0.
    pub canary: u32,
    /// Pause once the canary wave has settled, so an operator checks it before the rest go out
    /// ([`Event::Resume`] continues). Only meaningful with `canary > 0`. Default `false`.
    pub pause_after_canary: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unavailable_per_pool: BTreeMap::new(),
            default_max_unavailable: 1,
            max_unavailable_per_zone: 0,
            max_failures: 0,
            wave_size: None,
            rollback_on_abort: false,
            canary: 0,
            pause_after_canary: false,
        }
    }
}

impl Limits {
    /// The cap on in-flight disruptive nodes of `pool`: its own entry, else `default_max_unavailable`.
    pub fn pool_limit(&self, pool: &str) -> u32 {
        self.max_unavailable_per_pool
            .get(pool)
            .copied()
            .unwrap_or(self.default_max_unavailable)
    }

    /// The cap on in-flight disruptive nodes of one zone, or `None` when zones are not limited.
    pub fn zone_limit(&self) -> Option<u32> {
        (self.max_unavailable_per_zone > 0).then_some(self.max_unavailable_per_zone)
    }
}

/// What happened: fed to [`Rollout::handle`](crate::Rollout::handle).
///
/// Node events name the node; an event for an unknown node, or for a node in a state where it means
/// nothing, is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Start the rollout (only from [`Phase::Pending`]).
    Started,
    /// The change was applied to the node (a disruptive node then waits for health).
    NodeDone {
        /// The node.
        node: String,
    },
    /// The node reports healthy after its change. Only counts after [`Event::NodeDone`]: a health report
    /// from before the change was applied says nothing about the change.
    NodeHealthy {
        /// The node.
        node: String,
    },
    /// Applying the change, or the node's health after it, failed.
    NodeFailed {
        /// The node.
        node: String,
        /// Why, for the operator.
        reason: String,
    },
    /// The coordinator's timer for the node ran out (the engine reads no clock).
    TimedOut {
        /// The node.
        node: String,
    },
    /// Operator: start no new wave until [`Event::Resume`].
    Pause,
    /// Operator: continue after a pause (manual, or because failures exceeded the limit).
    Resume,
    /// Operator: stop for good; no node is applied afterwards.
    Abort,
}

/// What the coordinator should do: returned by [`Rollout::handle`](crate::Rollout::handle).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Apply the change to the node. Must be idempotent: after a restart,
    /// [`Rollout::resume_actions`](crate::Rollout::resume_actions) issues it again.
    Apply {
        /// The node.
        node: String,
        /// The wave it belongs to (0 = the non-disruptive wave).
        wave: u32,
    },
    /// Watch the node's health and report [`Event::NodeHealthy`] (or fail / time out).
    WaitHealthy {
        /// The node.
        node: String,
    },
    /// A wave started with these nodes (in the engine's stable order); the `Apply`s follow.
    WaveStarted {
        /// The wave number (0 = the non-disruptive wave, 1.. the disruptive ones).
        wave: u32,
        /// Its nodes.
        nodes: Vec<String>,
    },
    /// Every node of the wave is healthy or failed.
    WaveFinished {
        /// The wave number.
        wave: u32,
    },
    /// The rollout paused: nodes in flight continue, no new wave starts until [`Event::Resume`].
    Paused {
        /// Why, for the operator.
        reason: String,
    },
    /// Every node is healthy or failed, and none is left pending.
    Completed,
    /// The rollout was aborted; no node will be applied any more.
    Aborted {
        /// Why, for the operator.
        reason: String,
    },
    /// Undo the change on the node (emitted on [`Event::Abort`] when
    /// [`Limits::rollback_on_abort`] is set). Must be idempotent.
    Rollback {
        /// The node.
        node: String,
    },
}

/// Where a rollout is in its life. See the state diagram in the [crate docs](crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Built, not started.
    Pending,
    /// Waves are going out.
    Running,
    /// No new wave starts; nodes already in flight continue.
    Paused,
    /// Every node is healthy or failed (terminal).
    Completed,
    /// Stopped by the operator (terminal).
    Aborted,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::Aborted => "aborted",
        })
    }
}

/// Where one node is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NodeState {
    /// Not applied yet.
    Pending,
    /// [`Action::Apply`] issued, waiting for [`Event::NodeDone`].
    Applying {
        /// The node's wave.
        wave: u32,
    },
    /// Applied, [`Action::WaitHealthy`] issued, waiting for [`Event::NodeHealthy`] (disruptive nodes only).
    WaitingHealthy {
        /// The node's wave.
        wave: u32,
    },
    /// Done (and, if disruptive, healthy).
    Healthy,
    /// Failed or timed out; it stays failed.
    Failed {
        /// Why.
        reason: String,
    },
}

impl NodeState {
    /// Applied and not yet healthy or failed: counts against the limits (if the node is disruptive).
    pub fn in_flight(&self) -> bool {
        matches!(self, NodeState::Applying { .. } | NodeState::WaitingHealthy { .. })
    }

    /// Healthy or failed: nothing more will happen to the node.
    pub fn settled(&self) -> bool {
        matches!(self, NodeState::Healthy | NodeState::Failed { .. })
    }
}

/// One node in a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's target, as given to [`Rollout::new`](crate::Rollout::new).
    pub target: Target,
    /// Where the node is.
    pub state: NodeState,
    /// The wave the node was applied in; `None` while pending.
    pub wave: Option<u32>,
}

/// How many nodes are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// All nodes.
    pub total: usize,
    /// [`NodeState::Pending`].
    pub pending: usize,
    /// [`NodeState::Applying`].
    pub applying: usize,
    /// [`NodeState::WaitingHealthy`].
    pub waiting_healthy: usize,
    /// [`NodeState::Healthy`].
    pub healthy: usize,
    /// [`NodeState::Failed`].
    pub failed: usize,
}

/// A snapshot of a rollout, for `nimbusctl` and the coordinator's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The rollout's phase.
    pub phase: Phase,
    /// The last disruptive wave started (1..); 0 while none has.
    pub current_wave: u32,
    /// Why the rollout is paused, while it is.
    pub pause_reason: Option<String>,
    /// Every node, in the engine's stable order (pool, zone, node).
    pub nodes: Vec<NodeStatus>,
    /// Nodes per state.
    pub counts: Counts,
}
