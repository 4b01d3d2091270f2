//! [`Rollout`]: the state machine. `handle(event) -> Vec<Action>`, nothing else happens.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::error::WaveError;
use crate::model::{Action, Counts, Event, Limits, NodeState, NodeStatus, Phase, Status, Target};

/// Reason carried by [`Action::Paused`] after [`Event::Pause`].
pub const OPERATOR_PAUSE: &str = "paused by operator";
/// Reason carried by [`Action::Aborted`] after [`Event::Abort`].
pub const OPERATOR_ABORT: &str = "aborted by operator";
/// Failure reason recorded for a node after [`Event::TimedOut`].
pub const TIMED_OUT: &str = "timed out";
/// Reason carried by [`Action::Paused`] when the canary wave settled and `pause_after_canary` is set.
pub const CANARY_PAUSE: &str = "the canary wave settled: check it, then resume";

/// One node inside the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) target: Target,
    pub(crate) state: NodeState,
    /// The wave the node was applied in; `None` while pending.
    pub(crate) wave: Option<u32>,
}

/// A rollout of changes to a set of nodes, in waves. A pure state machine: no I/O, no clock, no
/// randomness; the same events always give the same actions.
///
/// Serialize it after every [`handle`](Rollout::handle) to survive a crash; after loading it again, run
/// [`resume_actions`](Rollout::resume_actions). Loading checks the stored state for consistency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "crate::persist::Persisted", into = "crate::persist::Persisted")]
pub struct Rollout {
    pub(crate) limits: Limits,
    pub(crate) phase: Phase,
    /// The last disruptive wave started; 0 before the first.
    pub(crate) current_wave: u32,
    /// `Some` exactly while paused.
    pub(crate) pause_reason: Option<String>,
    /// Sorted by (pool, zone, node): the order waves pick nodes in.
    pub(crate) nodes: Vec<Entry>,
    /// Node name → position in `nodes`.
    pub(crate) index: BTreeMap<String, usize>,
}

impl Rollout {
    /// A pending rollout of `targets` under `limits`.
    ///
    /// # Errors
    /// [`WaveError::DuplicateNode`] / [`WaveError::EmptyNodeName`] for bad targets;
    /// [`WaveError::ZeroDefaultLimit`], [`WaveError::ZeroPoolLimit`], [`WaveError::ZeroWaveSize`] for limits
    /// under which nothing could move.
    pub fn new(targets: Vec<Target>, limits: Limits) -> Result<Rollout, WaveError> {
        let entries = targets
            .into_iter()
            .map(|target| Entry {
                target,
                state: NodeState::Pending,
                wave: None,
            })
            .collect();
        Rollout::from_parts(limits, Phase::Pending, 0, None, entries)
    }

    /// Builds the rollout, sorting nodes and checking names and limits (not state consistency).
    pub(crate) fn from_parts(
        limits: Limits,
        phase: Phase,
        current_wave: u32,
        pause_reason: Option<String>,
        mut nodes: Vec<Entry>,
    ) -> Result<Rollout, WaveError> {
        check_limits(&limits)?;
        nodes.sort_by(|a, b| order_key(&a.target).cmp(&order_key(&b.target)));
        let mut index = BTreeMap::new();
        for (i, entry) in nodes.iter().enumerate() {
            if entry.target.node.is_empty() {
                return Err(WaveError::EmptyNodeName);
            }
            if index.insert(entry.target.node.clone(), i).is_some() {
                return Err(WaveError::DuplicateNode {
                    node: entry.target.node.clone(),
                });
            }
        }
        Ok(Rollout {
            limits,
            phase,
            current_wave,
            pause_reason,
            nodes,
            index,
        })
    }

    /// Feeds one event; returns what to do, in order. Events that mean nothing in the current phase or
    /// the node's current state (including repeats) and events for unknown nodes return no actions and
    /// change nothing.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Started => self.on_started(&mut out),
            Event::NodeDone { node } => self.on_done(&node, &mut out),
            Event::NodeHealthy { node } => self.on_healthy(&node, &mut out),
            Event::NodeFailed { node, reason } => self.on_failed(&node, reason, &mut out),
            Event::TimedOut { node } => self.on_failed(&node, TIMED_OUT.to_owned(), &mut out),
            Event::Pause => self.on_pause(&mut out),
            Event::Resume => self.on_resume(&mut out),
            Event::Abort => self.on_abort(&mut out),
        }
        out
    }

    /// The rollout's phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The limits the rollout was built with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Where `node` is, or `None` if it is not part of this rollout.
    pub fn node_state(&self, node: &str) -> Option<&NodeState> {
        self.index.get(node).and_then(|&i| self.nodes.get(i)).map(|e| &e.state)
    }

    /// A snapshot: every node's state and wave, counts, the current wave and pause reason.
    pub fn status(&self) -> Status {
        let mut counts = Counts {
            total: self.nodes.len(),
            ..Counts::default()
        };
        for e in &self.nodes {
            match e.state {
                NodeState::Pending => counts.pending += 1,
                NodeState::Applying { .. } => counts.applying += 1,
                NodeState::WaitingHealthy { .. } => counts.waiting_healthy += 1,
                NodeState::Healthy => counts.healthy += 1,
                NodeState::Failed { .. } => counts.failed += 1,
            }
        }
        Status {
            phase: self.phase,
            current_wave: self.current_wave,
            pause_reason: self.pause_reason.clone(),
            nodes: self
                .nodes
                .iter()
                .map(|e| NodeStatus {
                    target: e.target.clone(),
                    state: e.state.clone(),
                    wave: e.wave,
                })
                .collect(),
            counts,
        }
    }

    /// What was in flight, to issue again after loading a persisted rollout (the actions of the last
    /// `handle` may have been lost with the crash):
    ///
    /// * running or paused: [`Action::Apply`] for each node still applying, [`Action::WaitHealthy`] for
    ///   each node waiting for health;
    /// * aborted with [`Limits::rollback_on_abort`]: [`Action::Rollback`] for each node applied but not
    ///   healthy, as on [`Event::Abort`];
    /// * otherwise nothing (a pending rollout waits for [`Event::Started`]).
    ///
    /// Hence `Apply` and `Rollback` must be idempotent in the coordinator.
    pub fn resume_actions(&self) -> Vec<Action> {
        match self.phase {
            Phase::Running | Phase::Paused => self
                .nodes
                .iter()
                .filter_map(|e| match e.state {
                    NodeState::Applying { wave } => Some(Action::Apply {
                        node: e.target.node.clone(),
                        wave,
                    }),
                    NodeState::WaitingHealthy { .. } => Some(Action::WaitHealthy {
                        node: e.target.node.clone(),
                    }),
                    _ => None,
                })
                .collect(),
            Phase::Aborted => self.rollbacks(),
            Phase::Pending | Phase::Completed => Vec::new(),
        }
    }

    // ---- events -------------------------------------------------------------------------------

    fn on_started(&mut self, out: &mut Vec<Action>) {
        if self.phase != Phase::Pending {
            debug!(phase = %self.phase, "ignoring Started: the rollout has already started");
            return;
        }
        self.phase = Phase::Running;
        let wave0: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].target.disruptive)
            .collect();
        if !wave0.is_empty() {
            self.launch(0, &wave0, out);
        }
        self.advance(out);
    }

    fn on_done(&mut self, node: &str, out: &mut Vec<Action>) {
        let Some(i) = self.live_node(node, "NodeDone") else {
            return;
        };
        let entry = &mut self.nodes[i];
        let NodeState::Applying { wave } = entry.state else {
            debug!(node, state = ?entry.state, "ignoring NodeDone: the node is not applying");
            return;
        };
        if entry.target.disruptive {
            entry.state = NodeState::WaitingHealthy { wave };
            out.push(Action::WaitHealthy { node: node.to_owned() });
        } else {
            self.settle(i, NodeState::Healthy, out);
            self.advance(out);
        }
    }

    fn on_healthy(&mut self, node: &str, out: &mut Vec<Action>) {
        let Some(i) = self.live_node(node, "NodeHealthy") else {
            return;
        };
        if !matches!(self.nodes[i].state, NodeState::WaitingHealthy { .. }) {
            debug!(node, state = ?self.nodes[i].state, "ignoring NodeHealthy: the node is not waiting for health");
            return;
        }
        self.settle(i, NodeState::Healthy, out);
        self.advance(out);
    }

    fn on_failed(&mut self, node: &str, reason: String, out: &mut Vec<Action>) {
        let Some(i) = self.live_node(node, "NodeFailed/TimedOut") else {
            return;
        };
        if !self.nodes[i].state.in_flight() {
            debug!(node, state = ?self.nodes[i].state, "ignoring failure: the node is not in flight");
            return;
        }
        self.settle(i, NodeState::Failed { reason: reason.clone() }, out);
        let failures = self
            .nodes
            .iter()
            .filter(|e| matches!(e.state, NodeState::Failed { .. }))
            .count();
        let too_many = failures > self.limits.max_failures as usize;
        // With nothing left to do there is nothing to pause: `advance` completes the rollout instead.
        if too_many && self.phase == Phase::Running && !self.all_settled() {
            let reason = format!(
                "{failures} node(s) failed, more than max_failures = {}; last: {node}: {reason}",
                self.limits.max_failures
            );
            self.pause(reason, out);
        }
        self.advance(out);
    }

    fn on_pause(&mut self, out: &mut Vec<Action>) {
        if self.phase != Phase::Running {
            debug!(phase = %self.phase, "ignoring Pause: the rollout is not running");
            return;
        }
        self.pause(OPERATOR_PAUSE.to_owned(), out);
    }

    fn on_resume(&mut self, out: &mut Vec<Action>) {
        if self.phase != Phase::Paused {
            debug!(phase = %self.phase, "ignoring Resume: the rollout is not paused");
            return;
        }
        self.phase = Phase::Running;
        self.pause_reason = None;
        self.advance(out);
    }

    fn on_abort(&mut self, out: &mut Vec<Action>) {
        if matches!(self.phase, Phase::Completed | Phase::Aborted) {
            debug!(phase = %self.phase, "ignoring Abort: the rollout has ended");
            return;
        }
        self.phase = Phase::Aborted;
        self.pause_reason = None;
        out.push(Action::Aborted {
            reason: OPERATOR_ABORT.to_owned(),
        });
        out.extend(self.rollbacks());
    }

    // ---- helpers ------------------------------------------------------------------------------

    /// The node's position, if it exists and the rollout is running or paused (node events mean
    /// nothing before the start or after the end).
    fn live_node(&self, node: &str, event: &str) -> Option<usize> {
        let Some(&i) = self.index.get(node) else {
            debug!(
                node,
                event, "ignoring event for a node that is not part of this rollout"
            );
            return None;
        };
        if !matches!(self.phase, Phase::Running | Phase::Paused) {
            debug!(node, event, phase = %self.phase, "ignoring node event: the rollout is not running");
            return None;
        }
        Some(i)
    }

    fn pause(&mut self, reason: String, out: &mut Vec<Action>) {
        self.phase = Phase::Paused;
        self.pause_reason = Some(reason.clone());
        out.push(Action::Paused { reason });
    }

    /// Moves node `i` to a settled state; emits `WaveFinished` if that settled its wave.
    fn settle(&mut self, i: usize, state: NodeState, out: &mut Vec<Action>) {
        let entry = &mut self.nodes[i];
        entry.state = state;
        if let Some(wave) = entry.wave
            && !self.nodes.iter().any(|e| e.wave == Some(wave) && e.state.in_flight())
        {
            out.push(Action::WaveFinished { wave });
            let canary = wave == 1 && self.limits.canary > 0 && self.limits.pause_after_canary;
            if canary && self.phase == Phase::Running && !self.all_settled() {
                self.pause(CANARY_PAUSE.to_owned(), out);
            }
        }
    }

    /// After any change: complete the rollout if nothing is left, else start the next disruptive wave
    /// if running and no disruptive node is in flight.
    fn advance(&mut self, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Running | Phase::Paused) {
            return;
        }
        if self.all_settled() {
            self.phase = Phase::Completed;
            self.pause_reason = None;
            out.push(Action::Completed);
            return;
        }
        if self.phase == Phase::Running && !self.disruptive_in_flight() {
            let picked = self.pick_wave();
            if !picked.is_empty() {
                self.current_wave = self.current_wave.saturating_add(1);
                self.launch(self.current_wave, &picked, out);
            }
        }
    }

    /// Pending disruptive nodes in stable order, as many as the limits allow next to what is in flight.
    fn pick_wave(&self) -> Vec<usize> {
        let mut per_pool: BTreeMap<&str, u32> = BTreeMap::new();
        let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
        for e in self.nodes.iter().filter(|e| e.target.disruptive && e.state.in_flight()) {
            *per_pool.entry(e.target.pool.as_str()).or_default() += 1;
            if let Some(zone) = &e.target.zone {
                *per_zone.entry(zone.as_str()).or_default() += 1;
            }
        }
        let mut cap = self.limits.wave_size.map_or(usize::MAX, |n| n as usize);
        if self.current_wave == 0 && self.limits.canary > 0 {
            cap = cap.min(self.limits.canary as usize);
        }
        let mut picked = Vec::new();
        for (i, e) in self.nodes.iter().enumerate() {
            if picked.len() >= cap {
                break;
            }
            if !e.target.disruptive || e.state != NodeState::Pending {
                continue;
            }
            let pool = per_pool.entry(e.target.pool.as_str()).or_default();
            if *pool >= self.limits.pool_limit(&e.target.pool) {
                continue;
            }
            if let (Some(limit), Some(zone)) = (self.limits.zone_limit(), &e.target.zone) {
                let zone = per_zone.entry(zone.as_str()).or_default();
                if *zone >= limit {
                    continue;
                }
                *zone += 1;
            }
            *pool += 1;
            picked.push(i);
        }
        picked
    }

    /// Emits `WaveStarted` and one `Apply` per node; marks the nodes applying.
    fn launch(&mut self, wave: u32, picked: &[usize], out: &mut Vec<Action>) {
        let names = picked
            .iter()
            .map(|&i| self.nodes[i].target.node.clone())
            .collect::<Vec<_>>();
        out.push(Action::WaveStarted {
            wave,
            nodes: names.clone(),
        });
        for (&i, node) in picked.iter().zip(names) {
            self.nodes[i].state = NodeState::Applying { wave };
            self.nodes[i].wave = Some(wave);
            out.push(Action::Apply { node, wave });
        }
    }

    fn disruptive_in_flight(&self) -> bool {
        self.nodes.iter().any(|e| e.target.disruptive && e.state.in_flight())
    }

    pub(crate) fn all_settled(&self) -> bool {
        self.nodes.iter().all(|e| e.state.settled())
    }

    /// `Rollback` for every node applied but not healthy, if the limits ask for it.
    fn rollbacks(&self) -> Vec<Action> {
        if !self.limits.rollback_on_abort {
            return Vec::new();
        }
        self.nodes
            .iter()
            .filter(|e| e.state.in_flight() || matches!(e.state, NodeState::Failed { .. }))
            .map(|e| Action::Rollback {
                node: e.target.node.clone(),
            })
            .collect()
    }
}

/// The order waves pick nodes in: pool, zone (no zone first), node name.
fn order_key(t: &Target) -> (&str, Option<&str>, &str) {
    (&t.pool, t.zone.as_deref(), &t.node)
}

pub(crate) fn check_limits(limits: &Limits) -> Result<(), WaveError> {
    if limits.default_max_unavailable == 0 {
        return Err(WaveError::ZeroDefaultLimit);
    }
    if let Some((pool, _)) = limits.max_unavailable_per_pool.iter().find(|(_, n)| **n == 0) {
        return Err(WaveError::ZeroPoolLimit { pool: pool.clone() });
    }
    if limits.wave_size == Some(0) {
        return Err(WaveError::ZeroWaveSize);
    }
    Ok(())
}
