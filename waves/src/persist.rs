//! The stored form of a [`Rollout`] and the checks run when loading it.
//!
//! A rollout serializes (with any serde format; the coordinator uses JSON) as
//!
//! ```json
//! { "version": 1, "limits": { … }, "phase": "running", "current_wave": 2, "pause_reason": null,
//!   "nodes": [ { "node": "n1", "pool": "web", "zone": "z1", "disruptive": true,
//!                "state": { "state": "waiting_healthy", "wave": 2 }, "wave": 2 }, … ] }
//! ```
//!
//! Loading rejects data that no sequence of events could have produced (so a hand-edited or corrupted
//! record cannot leave a rollout stuck or over its limits) with [`WaveError::Inconsistent`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::WaveError;
use crate::model::{Limits, NodeState, Phase, Target};
use crate::rollout::{Entry, Rollout};

/// The stored format version written by this build.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub(crate) struct Persisted {
    version: u32,
    limits: Limits,
    phase: Phase,
    current_wave: u32,
    pause_reason: Option<String>,
    nodes: Vec<PersistedNode>,
}

#[derive(Serialize, Deserialize)]
struct PersistedNode {
    node: String,
    pool: String,
    zone: Option<String>,
    disruptive: bool,
    state: NodeState,
    wave: Option<u32>,
}

impl From<Rollout> for Persisted {
    fn from(r: Rollout) -> Self {
        Persisted {
            version: FORMAT_VERSION,
            limits: r.limits,
            phase: r.phase,
            current_wave: r.current_wave,
            pause_reason: r.pause_reason,
            nodes: r
                .nodes
                .into_iter()
                .map(|e| PersistedNode {
                    node: e.target.node,
                    pool: e.target.pool,
                    zone: e.target.zone,
                    disruptive: e.target.disruptive,
                    state: e.state,
                    wave: e.wave,
                })
                .collect(),
        }
    }
}

impl TryFrom<Persisted> for Rollout {
    type Error = WaveError;

    fn try_from(p: Persisted) -> Result<Self, Self::Error> {
        if p.version != FORMAT_VERSION {
            return Err(WaveError::UnsupportedVersion {
                found: p.version,
                supported: FORMAT_VERSION,
            });
        }
        let nodes = p
            .nodes
            .into_iter()
            .map(|n| Entry {
                target: Target {
                    node: n.node,
                    pool: n.pool,
                    zone: n.zone,
                    disruptive: n.disruptive,
                },
                state: n.state,
                wave: n.wave,
            })
            .collect();
        let rollout = Rollout::from_parts(p.limits, p.phase, p.current_wave, p.pause_reason, nodes)?;
        check_consistency(&rollout).map_err(|detail| WaveError::Inconsistent { detail })?;
        Ok(rollout)
    }
}

/// Everything that holds after any sequence of events; `Err` says what does not.
pub(crate) fn check_consistency(r: &Rollout) -> Result<(), String> {
    let disruptive_total = r.nodes.iter().filter(|e| e.target.disruptive).count();
    if r.current_wave as usize > disruptive_total {
        return Err(format!(
            "current wave {} is beyond the {disruptive_total} disruptive node(s), each of which opens at most one wave",
            r.current_wave
        ));
    }
    for e in &r.nodes {
        check_node(r, e)?;
    }

    let in_flight = |e: &&Entry| e.state.in_flight();
    let pending = r.nodes.iter().any(|e| e.state == NodeState::Pending);
    let any_in_flight = r.nodes.iter().any(|e| e.state.in_flight());
    let disruptive_in_flight = r.nodes.iter().filter(in_flight).any(|e| e.target.disruptive);
    match r.phase {
        Phase::Pending => {
            if r.current_wave != 0 || r.nodes.iter().any(|e| e.state != NodeState::Pending) {
                return Err("phase pending, but some node was already applied".to_owned());
            }
        }
        Phase::Running | Phase::Paused => {
            if let Some(e) = r
                .nodes
                .iter()
                .find(|e| !e.target.disruptive && e.state == NodeState::Pending)
            {
                return Err(format!(
                    "phase {}, but non-disruptive node {:?} is pending (wave 0 goes out on start)",
                    r.phase, e.target.node
                ));
            }
            if !pending && !any_in_flight {
                return Err(format!("phase {}, but every node is healthy or failed", r.phase));
            }
            if r.phase == Phase::Running
                && !disruptive_in_flight
                && r.nodes
                    .iter()
                    .any(|e| e.target.disruptive && e.state == NodeState::Pending)
            {
                return Err("phase running with disruptive nodes pending, but no wave in flight".to_owned());
            }
        }
        Phase::Completed => {
            if pending || any_in_flight {
                return Err("phase completed, but some node is pending or in flight".to_owned());
            }
        }
        Phase::Aborted => {}
    }
    if (r.phase == Phase::Paused) != r.pause_reason.is_some() {
        return Err(format!(
            "phase {} does not match pause reason {:?}",
            r.phase, r.pause_reason
        ));
    }

    // Limits: disruptive nodes in flight per pool and zone, nodes in the current wave.
    let mut per_pool: BTreeMap<&str, u32> = BTreeMap::new();
    let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
    for e in r.nodes.iter().filter(in_flight).filter(|e| e.target.disruptive) {
        *per_pool.entry(&e.target.pool).or_default() += 1;
        if let Some(zone) = &e.target.zone {
            *per_zone.entry(zone).or_default() += 1;
        }
    }
    for (pool, n) in per_pool {
        if n > r.limits.pool_limit(pool) {
            return Err(format!(
                "{n} node(s) of pool {pool:?} in flight, over its limit {}",
                r.limits.pool_limit(pool)
            ));
        }
    }
    if let Some(limit) = r.limits.zone_limit()
        && let Some((zone, n)) = per_zone.into_iter().find(|(_, n)| *n > limit)
    {
        return Err(format!(
            "{n} node(s) of zone {zone:?} in flight, over the zone limit {limit}"
        ));
    }
    if let Some(size) = r.limits.wave_size {
        let in_wave = r
            .nodes
            .iter()
            .filter(|e| e.target.disruptive && e.wave == Some(r.current_wave))
            .count();
        if r.current_wave > 0 && in_wave > size as usize {
            return Err(format!(
                "wave {} holds {in_wave} node(s), over wave_size {size}",
                r.current_wave
            ));
        }
    }
    Ok(())
}

fn check_node(r: &Rollout, e: &Entry) -> Result<(), String> {
    let node = &e.target.node;
    let state_wave = match e.state {
        NodeState::Applying { wave } | NodeState::WaitingHealthy { wave } => Some(wave),
        _ => None,
    };
    match (&e.state, e.wave) {
        (NodeState::Pending, None) => return Ok(()),
        (NodeState::Pending, Some(w)) => return Err(format!("node {node:?} is pending but has wave {w}")),
        (_, None) => return Err(format!("node {node:?} left pending without a wave")),
        (_, Some(w)) => {
            if state_wave.is_some_and(|s| s != w) {
                return Err(format!("node {node:?} has state {:?} but wave {w}", e.state));
            }
            if !e.target.disruptive && w != 0 {
                return Err(format!("non-disruptive node {node:?} in wave {w}, not 0"));
            }
            if e.target.disruptive && (w == 0 || w > r.current_wave) {
                return Err(format!(
                    "disruptive node {node:?} in wave {w}, outside 1..={}",
                    r.current_wave
                ));
            }
            if e.target.disruptive && e.state.in_flight() && w != r.current_wave {
                return Err(format!(
                    "disruptive node {node:?} still in flight in wave {w}, but wave {} has started",
                    r.current_wave
                ));
            }
            if !e.target.disruptive && matches!(e.state, NodeState::WaitingHealthy { .. }) {
                return Err(format!("non-disruptive node {node:?} is waiting for health"));
            }
        }
    }
    Ok(())
}
