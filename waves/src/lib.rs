//! The wave engine: rolls a change out to a set of nodes in waves, never disturbing more nodes of one
//! pool, or of one zone, than the limits allow.
//!
//! A pure state machine ("sans-IO"): [`Rollout::handle`] takes an [`Event`] and returns the [`Action`]s
//! to take. It opens no socket, starts no timer (the coordinator sends [`Event::TimedOut`]), reads no
//! clock and draws no random number, so the same events always give the same actions. The engine does
//! not know what the change is: the coordinator maps [`Action::Apply`] to drain + `kubeadm reset`, a pool
//! move, an agent upgrade, …
//!
//! * Non-disruptive targets all go out at once on [`Event::Started`], in wave 0, and need only
//!   [`Event::NodeDone`].
//! * Disruptive targets go out in waves 1, 2, …, one wave at a time. A wave takes pending nodes in the
//!   stable order (pool, zone, node name), skipping a node whose pool or zone is at its limit, until
//!   [`Limits::wave_size`] is reached. A node is *in flight* from `Apply` until healthy (or failed);
//!   after [`Event::NodeDone`] it waits for [`Event::NodeHealthy`]. When every node of the wave is healthy
//!   or failed, [`Action::WaveFinished`] is emitted and the next wave starts in the same call.
//! * A failed (or timed-out) node stays failed and its wave goes on without it. Once more nodes have
//!   failed than [`Limits::max_failures`], the rollout pauses: nodes in flight continue, no new wave
//!   starts until [`Event::Resume`]. After a resume each further failure pauses it again.
//! * When no node is pending or in flight the rollout completes, even while paused (nothing would be
//!   left to resume). [`Event::Abort`] ends it: no further `Apply`, and with
//!   [`Limits::rollback_on_abort`] a [`Action::Rollback`] for each node applied but not healthy.
//! * Events that mean nothing where they arrive — unknown node, wrong node state, wrong phase, a repeat —
//!   return no actions and change nothing (logged at `debug`). Handling the same event twice in a row is
//!   the same as handling it once.
//!
//! ```
//! use waves::{Action, Event, Limits, Phase, Rollout, Target};
//!
//! let node = |name: &str, pool: &str| Target {
//!     node: name.into(), pool: pool.into(), zone: None, disruptive: true,
//! };
//! let mut rollout = Rollout::new(vec![node("a1", "a"), node("a2", "a")], Limits::default()).unwrap();
//! let actions = rollout.handle(Event::Started);
//! assert_eq!(actions, vec![
//!     Action::WaveStarted { wave: 1, nodes: vec!["a1".into()] },
//!     Action::Apply { node: "a1".into(), wave: 1 },
//! ]);
//! assert_eq!(rollout.handle(Event::NodeDone { node: "a1".into() }),
//!            vec![Action::WaitHealthy { node: "a1".into() }]);
//! let actions = rollout.handle(Event::NodeHealthy { node: "a1".into() });
//! assert_eq!(actions[0], Action::WaveFinished { wave: 1 });
//! assert_eq!(actions[2], Action::Apply { node: "a2".into(), wave: 2 });
//!
//! // Persist after every step; after a crash, load and re-issue what was in flight.
//! let stored = serde_json::to_string(&rollout).unwrap();
//! let restored: Rollout = serde_json::from_str(&stored).unwrap();
//! assert_eq!(restored.resume_actions(), vec![Action::Apply { node: "a2".into(), wave: 2 }]);
//! assert_eq!(restored.phase(), Phase::Running);
//! ```
//!
//! # State diagram
//!
//! The rollout's [`Phase`]:
//!
//! ```text
//!               Started                     nothing pending or in flight
//!   Pending ──────────────▶ Running ───────────────────────────────────────▶ Completed
//!      │                     │   ▲                                              ▲
//!      │      Pause, or a    │   │ Resume                                       │
//!      │      failure past   ▼   │                                              │
//!      │      max_failures  Paused ──────── nothing pending or in flight ───────┘
//!      │                     │
//!      │ Abort               │ Abort        (Abort from Running too)
//!      └──────────────────▶ Aborted         (Completed and Aborted are final)
//! ```
//!
//! One node's [`NodeState`]:
//!
//! ```text
//!              Apply{wave}                NodeDone                  NodeHealthy
//!    Pending ─────────────▶ Applying ─────────────▶ WaitingHealthy ─────────────▶ Healthy
//!                              │  └────── NodeDone (non-disruptive, wave 0) ───────▲
//!                              │                          │
//!                              └── NodeFailed / TimedOut ─┴──▶ Failed{reason}
//! ```
//!
//! # Layout
//!
//! * [`model`] — the vocabulary: [`Target`], [`Limits`], [`Event`], [`Action`], [`Phase`], [`NodeState`],
//!   [`Status`] with [`NodeStatus`] and [`Counts`].
//! * [`rollout`] — [`Rollout`]: construction and validation, `handle` (one private method per event), wave
//!   selection, `status`, `resume_actions`.
//! * [`persist`] — the stored (serde) form of a [`Rollout`], its format version, and the consistency
//!   checks run when loading one.
//! * [`error`] — [`WaveError`].
//!
//! **Invariant:** no I/O, no clock, no randomness, no `async`: everything is a function of the events.
//! **Invariant:** disruptive nodes in flight never exceed a pool's limit, the zone limit or `wave_size`,
//! and at most one disruptive wave is in flight at a time.

pub mod error;
pub mod model;
pub mod persist;
pub mod rollout;

pub use error::WaveError;
pub use model::{Action, Counts, Event, Limits, NodeState, NodeStatus, Phase, Status, Target};
pub use rollout::{CANARY_PAUSE, Rollout};
