//! Drift: compare a recomputed plan with the previous one and report budget breaches.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::matrix::NodeId;
use crate::plan::{Mode, Plan};
use crate::units::Nanos;

/// A budget breach found when a plan is recomputed. The coordinator logs each event and counts it in a
/// metric labelled with [`DriftEvent::kind`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DriftEvent {
    /// A member that was synchronous in the previous plan no longer fits the budget (or is no longer
    /// measured): keeping it synchronous slows every commit.
    MemberLostSync {
        /// The store.
        store: String,
        /// The member.
        member: NodeId,
        /// Its latency then.
        previous: Option<Nanos>,
        /// Its latency now (`None`: unknown or no longer a member).
        latency: Option<Nanos>,
        /// The store's budget.
        budget: Nanos,
    },
    /// The predicted commit latency of the planned synchronous set is over budget (or unknown).
    CommitOverBudget {
        /// The store.
        store: String,
        /// Predicted commit latency now.
        commit: Option<Nanos>,
        /// The budget.
        budget: Nanos,
        /// `true` when the previous plan met the budget (or did not exist); `false` when the breach persists.
        new: bool,
    },
}

impl DriftEvent {
    /// The store the event is about.
    pub fn store(&self) -> &str {
        match self {
            DriftEvent::MemberLostSync { store, .. } | DriftEvent::CommitOverBudget { store, .. } => store,
        }
    }

    /// A stable snake_case label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DriftEvent::MemberLostSync { .. } => "member_lost_sync",
            DriftEvent::CommitOverBudget { .. } => "commit_over_budget",
        }
    }
}

fn opt(n: Option<Nanos>) -> String {
    n.map_or_else(|| "unknown".to_string(), |n| n.to_string())
}

impl fmt::Display for DriftEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriftEvent::MemberLostSync {
                store,
                member,
                previous,
                latency,
                budget,
            } => write!(
                f,
                "store {store}: {member} was synchronous ({}) and no longer fits the {budget} budget ({}); make it \
                 asynchronous or find out what slowed the link",
                opt(*previous),
                opt(*latency)
            ),
            DriftEvent::CommitOverBudget {
                store,
                commit,
                budget,
                new,
            } => write!(
                f,
                "store {store}: predicted commit {} is over the {budget} budget{}",
                opt(*commit),
                if *new { "" } else { " (still)" }
            ),
        }
    }
}

/// Budget breaches of `current` relative to `previous`: every member synchronous before and not now,
/// and every store whose planned commit does not fit its budget. Stores only in `previous` are ignored.
pub fn drift(previous: &Plan, current: &Plan) -> Vec<DriftEvent> {
    let mut events = Vec::new();
    for store in &current.stores {
        let before = previous.store(&store.name);
        if let Some(before) = before {
            for m in before.members.iter().filter(|m| m.mode == Mode::Synchronous) {
                let now = store.member(&m.node);
                if now.is_none_or(|n| n.mode != Mode::Synchronous) {
                    events.push(DriftEvent::MemberLostSync {
                        store: store.name.clone(),
                        member: m.node.clone(),
                        previous: m.latency,
                        latency: now.and_then(|n| n.latency),
                        budget: store.budget,
                    });
                }
            }
        }
        if !store.fits_budget {
            events.push(DriftEvent::CommitOverBudget {
                store: store.name.clone(),
                commit: store.commit,
                budget: store.budget,
                new: before.is_none_or(|b| b.fits_budget),
            });
        }
    }
    tracing::debug!(events = events.len(), "plan drift compared");
    events
}
