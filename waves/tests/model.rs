//! Property tests: random fleets, limits and event sequences (including restarts from the persisted
//! form), with the engine's invariants checked after every step.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic there is a failed assertion

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use waves::{Action, Event, Limits, NodeState, Phase, Rollout, Status, Target};

const POOLS: [&str; 3] = ["a", "b", "c"];
const ZONES: [Option<&str>; 3] = [None, Some("z1"), Some("z2")];

fn targets() -> impl Strategy<Value = Vec<Target>> {
    prop::collection::vec((0..POOLS.len(), 0..ZONES.len(), prop::bool::weighted(0.75)), 0..10).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (p, z, d))| target(&format!("n{i}"), POOLS[p], ZONES[z], d))
            .collect()
    })
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop::collection::vec(prop::option::of(1u32..3), POOLS.len()),
        1u32..3,
        0u32..3,
        0u32..3,
        prop::option::of(1u32..4),
        any::<bool>(),
    )
        .prop_map(|(per_pool, default, zone, failures, wave_size, rollback)| Limits {
            max_unavailable_per_pool: POOLS
                .iter()
                .zip(per_pool)
                .filter_map(|(p, n)| n.map(|n| (p.to_string(), n)))
                .collect(),
            default_max_unavailable: default,
            max_unavailable_per_zone: zone,
            max_failures: failures,
            wave_size,
            rollback_on_abort: rollback,
            ..Limits::default()
        })
}

#[derive(Debug, Clone)]
enum Op {
    Started,
    Pause,
    Resume,
    Abort,
    /// Persist, load, and run resume_actions.
    Restart,
    /// A node event: `kind` 0 done, 1 healthy, 2 failed, 3 timed out. `live` picks among the nodes the
    /// event means something for (to make progress); otherwise any node or an unknown one.
    Node {
        kind: u8,
        pick: usize,
        live: bool,
    },
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        2 => Just(Op::Started),
        1 => Just(Op::Pause),
        2 => Just(Op::Resume),
        1 => Just(Op::Abort),
        2 => Just(Op::Restart),
        16 => (0u8..4, any::<usize>()).prop_map(|(kind, pick)| Op::Node { kind, pick, live: true }),
        4 => (0u8..4, any::<usize>()).prop_map(|(kind, pick)| Op::Node { kind, pick, live: false }),
    ];
    prop::collection::vec(op, 0..80)
}

fn node_event(r: &Rollout, kind: u8, pick: usize, live: bool) -> Event {
    let status = r.status();
    let wanted = |s: &NodeState| match kind {
        0 => matches!(s, NodeState::Applying { .. }),
        1 => matches!(s, NodeState::WaitingHealthy { .. }),
        _ => s.in_flight(),
    };
    let live_nodes: Vec<&str> = status
        .nodes
        .iter()
        .filter(|n| wanted(&n.state))
        .map(|n| n.target.node.as_str())
        .collect();
    let node = if live && !live_nodes.is_empty() {
        live_nodes[pick % live_nodes.len()].to_owned()
    } else {
        let all: Vec<&str> = status.nodes.iter().map(|n| n.target.node.as_str()).collect();
        all.get(pick % (all.len() + 1))
            .map_or("ghost".to_owned(), |n| n.to_string())
    };
    match kind {
        0 => done(&node),
        1 => healthy(&node),
        2 => failed(&node),
        _ => timed_out(&node),
    }
}

fn in_flight(status: &Status) -> impl Iterator<Item = &waves::NodeStatus> {
    status
        .nodes
        .iter()
        .filter(|n| n.target.disruptive && n.state.in_flight())
}

/// Invariants that hold in every state.
fn check_state(r: &Rollout) -> Result<(), TestCaseError> {
    let status = r.status();
    let limits = r.limits();
    let c = status.counts;
    prop_assert_eq!(c.total, status.nodes.len());
    prop_assert_eq!(
        c.pending + c.applying + c.waiting_healthy + c.healthy + c.failed,
        c.total
    );

    // Never more in flight than the limits.
    let mut per_pool: BTreeMap<&str, u32> = BTreeMap::new();
    let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
    let mut waves = BTreeSet::new();
    for n in in_flight(&status) {
        *per_pool.entry(&n.target.pool).or_default() += 1;
        if let Some(z) = &n.target.zone {
            *per_zone.entry(z).or_default() += 1;
        }
        waves.insert(n.wave);
    }
    for (pool, count) in &per_pool {
        prop_assert!(
            *count <= limits.pool_limit(pool),
            "pool {} has {} in flight",
            pool,
            count
        );
    }
    if let Some(limit) = limits.zone_limit() {
        for (zone, count) in &per_zone {
            prop_assert!(*count <= limit, "zone {} has {} in flight", zone, count);
        }
    }
    prop_assert!(waves.len() <= 1, "more than one disruptive wave in flight: {:?}", waves);
    if let (Some(size), true) = (limits.wave_size, status.current_wave > 0) {
        let in_wave = status
            .nodes
            .iter()
            .filter(|n| n.wave == Some(status.current_wave))
            .count();
        prop_assert!(in_wave <= size as usize);
    }

    // Completed iff every node is healthy or failed (once started and not aborted).
    let nothing_left = c.pending == 0 && c.applying == 0 && c.waiting_healthy == 0;
    match status.phase {
        Phase::Running | Phase::Paused => prop_assert!(!nothing_left, "{:?} with nothing left", status.phase),
        Phase::Completed => prop_assert!(nothing_left),
        Phase::Pending => prop_assert_eq!(c.pending, c.total),
        Phase::Aborted => {}
    }
    // Running with disruptive nodes pending always has a wave going: the rollout cannot stall.
    if status.phase == Phase::Running
        && status
            .nodes
            .iter()
            .any(|n| n.target.disruptive && n.state == NodeState::Pending)
    {
        prop_assert!(in_flight(&status).next().is_some(), "running but stalled");
    }
    prop_assert_eq!(status.pause_reason.is_some(), status.phase == Phase::Paused);
    Ok(())
}

/// Invariants that relate one step's before, event, actions and after.
fn check_step(before: &Rollout, event: &Event, actions: &[Action], after: &Rollout) -> Result<(), TestCaseError> {
    // Deterministic.
    prop_assert_eq!(&before.clone().handle(event.clone()), &actions.to_vec());
    // Handling the same event again changes nothing.
    let mut again = after.clone();
    prop_assert_eq!(again.handle(event.clone()), vec![]);
    prop_assert_eq!(&again, after);
    // An event changes the rollout exactly when it means something where it arrives; otherwise it is
    // ignored without a trace.
    let live = matches!(before.phase(), Phase::Running | Phase::Paused);
    let node = |n: &str| before.node_state(n).cloned();
    let meaningful = match event {
        Event::Started => before.phase() == Phase::Pending,
        Event::Pause => before.phase() == Phase::Running,
        Event::Resume => before.phase() == Phase::Paused,
        Event::Abort => !matches!(before.phase(), Phase::Completed | Phase::Aborted),
        Event::NodeDone { node: n } => live && matches!(node(n), Some(NodeState::Applying { .. })),
        Event::NodeHealthy { node: n } => live && matches!(node(n), Some(NodeState::WaitingHealthy { .. })),
        Event::NodeFailed { node: n, .. } | Event::TimedOut { node: n } => {
            live && node(n).is_some_and(|s| s.in_flight())
        }
    };
    if meaningful {
        prop_assert_ne!(before, after, "{:?} changed nothing", event);
    } else {
        prop_assert!(actions.is_empty(), "{:?} should be ignored, gave {:?}", event, actions);
        prop_assert_eq!(before, after);
    }
    // Terminal phases stay put.
    if matches!(before.phase(), Phase::Completed | Phase::Aborted) {
        prop_assert!(actions.is_empty());
        prop_assert_eq!(before, after);
    }
    // No new Apply while paused (except by Resume), or in the step that aborts.
    let applies: Vec<&Action> = actions.iter().filter(|a| matches!(a, Action::Apply { .. })).collect();
    if before.phase() == Phase::Paused && *event != Event::Resume || after.phase() == Phase::Aborted {
        prop_assert!(applies.is_empty(), "{:?}", applies);
    }
    // Actions agree with the new state.
    for a in actions {
        match a {
            Action::Apply { node, wave } => {
                prop_assert_eq!(before.node_state(node), Some(&NodeState::Pending));
                prop_assert_eq!(after.node_state(node), Some(&NodeState::Applying { wave: *wave }));
            }
            Action::WaitHealthy { node } => {
                let waiting = matches!(after.node_state(node), Some(NodeState::WaitingHealthy { .. }));
                prop_assert!(waiting, "{} not waiting after WaitHealthy", node);
            }
            Action::Completed => prop_assert_eq!(after.phase(), Phase::Completed),
            Action::Paused { .. } => prop_assert_eq!(after.phase(), Phase::Paused),
            Action::Aborted { .. } => prop_assert_eq!(after.phase(), Phase::Aborted),
            Action::Rollback { node } => {
                prop_assert!(after.limits().rollback_on_abort);
                let s = after.node_state(node).cloned();
                let unhealthy = matches!(s, Some(NodeState::Failed { .. })) || s.is_some_and(|s| s.in_flight());
                prop_assert!(unhealthy, "rollback of {} which is not applied-but-unhealthy", node);
            }
            Action::WaveFinished { wave } => {
                prop_assert!(
                    after
                        .status()
                        .nodes
                        .iter()
                        .all(|n| n.wave != Some(*wave) || n.state.settled())
                );
            }
            Action::WaveStarted { wave, nodes } => {
                prop_assert!(!nodes.is_empty());
                for n in nodes {
                    prop_assert_eq!(after.node_state(n), Some(&NodeState::Applying { wave: *wave }));
                }
            }
        }
    }
    if after.phase() == Phase::Completed && before.phase() != Phase::Completed {
        prop_assert_eq!(actions.last(), Some(&Action::Completed));
    }
    // A failure past the threshold pauses a running rollout that has anything left to do.
    let failures = after.status().counts.failed;
    if before.phase() == Phase::Running
        && failures > before.status().counts.failed
        && failures > after.limits().max_failures as usize
        && after.phase() != Phase::Completed
    {
        prop_assert_eq!(after.phase(), Phase::Paused);
    }
    // A pause by failures happens only past the threshold.
    if before.phase() == Phase::Running && after.phase() == Phase::Paused && !matches!(event, Event::Pause) {
        prop_assert!(after.status().counts.failed > after.limits().max_failures as usize);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_step(targets in targets(), limits in limits(), ops in ops()) {
        let mut r = Rollout::new(targets, limits).unwrap();
        let mut applied: BTreeMap<String, usize> = BTreeMap::new();
        check_state(&r)?;
        for op in ops {
            let event = match op {
                Op::Started => Event::Started,
                Op::Pause => Event::Pause,
                Op::Resume => Event::Resume,
                Op::Abort => Event::Abort,
                Op::Node { kind, pick, live } => node_event(&r, kind, pick, live),
                Op::Restart => {
                    let text = serde_json::to_string(&r).unwrap();
                    let restored: Rollout = serde_json::from_str(&text)
                        .map_err(|e| TestCaseError::fail(format!("reload failed: {e}\n{text}")))?;
                    prop_assert_eq!(&restored, &r);
                    // resume_actions re-issues exactly what is in flight.
                    let resume = restored.resume_actions();
                    let status = restored.status();
                    let expected: Vec<Action> = match status.phase {
                        Phase::Running | Phase::Paused => status.nodes.iter().filter_map(|n| match n.state {
                            NodeState::Applying { wave } => Some(apply(&n.target.node, wave)),
                            NodeState::WaitingHealthy { .. } => Some(wait(&n.target.node)),
                            _ => None,
                        }).collect(),
                        Phase::Aborted if restored.limits().rollback_on_abort => status.nodes.iter()
                            .filter(|n| n.state.in_flight() || matches!(n.state, NodeState::Failed { .. }))
                            .map(|n| Action::Rollback { node: n.target.node.clone() })
                            .collect(),
                        _ => vec![],
                    };
                    prop_assert_eq!(resume, expected);
                    r = restored;
                    continue;
                }
            };
            let before = r.clone();
            let actions = r.handle(event.clone());
            for a in &actions {
                if let Action::Apply { node, .. } = a {
                    let count = applied.entry(node.clone()).or_default();
                    *count += 1;
                    prop_assert_eq!(*count, 1, "{} applied twice", node);
                }
            }
            check_step(&before, &event, &actions, &r)?;
            check_state(&r)?;
        }
    }

    /// A coordinator that answers every action (some nodes fail) and resumes every pause always
    /// completes, and applies every node exactly once.
    #[test]
    fn a_responsive_coordinator_always_completes(
        targets in targets(),
        limits in limits(),
        fails in prop::collection::vec(prop::bool::weighted(0.2), 64),
    ) {
        let n = targets.len();
        let mut r = Rollout::new(targets, limits).unwrap();
        let mut queue = std::collections::VecDeque::from(r.handle(Event::Started));
        let mut applied = BTreeSet::new();
        let mut fails = fails.into_iter().cycle();
        let mut steps = 0;
        while let Some(action) = queue.pop_front() {
            steps += 1;
            prop_assert!(steps < 100 * (n + 1), "no progress");
            let next = match action {
                Action::Apply { node, .. } => {
                    prop_assert!(applied.insert(node.clone()), "{} applied twice", node);
                    if fails.next() == Some(true) { failed(&node) } else { done(&node) }
                }
                Action::WaitHealthy { node } => {
                    if fails.next() == Some(true) { timed_out(&node) } else { healthy(&node) }
                }
                Action::Paused { .. } => Event::Resume,
                _ => continue,
            };
            queue.extend(r.handle(next));
            check_state(&r)?;
        }
        prop_assert_eq!(r.phase(), Phase::Completed);
        prop_assert_eq!(applied.len(), n);
        let c = r.status().counts;
        prop_assert_eq!(c.healthy + c.failed, n);
    }
}
