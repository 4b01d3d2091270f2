//! Helpers shared by the integration tests.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic there is a failed assertion
#![allow(dead_code)]

use waves::{Action, Event, Limits, NodeState, Rollout, Target};

pub fn target(node: &str, pool: &str, zone: Option<&str>, disruptive: bool) -> Target {
    Target {
        node: node.into(),
        pool: pool.into(),
        zone: zone.map(Into::into),
        disruptive,
    }
}

pub fn disruptive(node: &str, pool: &str, zone: Option<&str>) -> Target {
    target(node, pool, zone, true)
}

pub fn done(node: &str) -> Event {
    Event::NodeDone { node: node.into() }
}

pub fn healthy(node: &str) -> Event {
    Event::NodeHealthy { node: node.into() }
}

pub fn failed(node: &str) -> Event {
    Event::NodeFailed {
        node: node.into(),
        reason: "kubeadm reset exited 1".into(),
    }
}

pub fn timed_out(node: &str) -> Event {
    Event::TimedOut { node: node.into() }
}

pub fn apply(node: &str, wave: u32) -> Action {
    Action::Apply {
        node: node.into(),
        wave,
    }
}

pub fn wait(node: &str) -> Action {
    Action::WaitHealthy { node: node.into() }
}

pub fn started(wave: u32, nodes: &[&str]) -> Action {
    Action::WaveStarted {
        wave,
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
    }
}

pub fn state(r: &Rollout, node: &str) -> NodeState {
    r.node_state(node).cloned().expect("node is part of the rollout")
}

/// Feeds every event, returning all actions in order.
pub fn feed(r: &mut Rollout, events: impl IntoIterator<Item = Event>) -> Vec<Action> {
    events.into_iter().flat_map(|e| r.handle(e)).collect()
}

/// The standard fixture: one non-disruptive node and three disruptive ones over two pools.
///
/// With the default limits (1 per pool) wave 1 is [a1, b1] and wave 2 is [a2].
pub fn fixture(limits: Limits) -> Rollout {
    Rollout::new(
        vec![
            disruptive("a2", "a", Some("z2")),
            target("cfg", "p", None, false),
            disruptive("b1", "b", Some("z1")),
            disruptive("a1", "a", Some("z1")),
        ],
        limits,
    )
    .unwrap()
}

/// The waves a rollout goes through when every applied node succeeds: the node lists of each
/// `WaveStarted`, in order, after driving it to completion.
pub fn happy_waves(r: &mut Rollout) -> Vec<(u32, Vec<String>)> {
    let mut waves = Vec::new();
    let mut queue = r.handle(Event::Started);
    while let Some(action) = queue.first().cloned() {
        queue.remove(0);
        match action {
            Action::WaveStarted { wave, nodes } => waves.push((wave, nodes)),
            Action::Apply { node, .. } => queue.extend(r.handle(done(&node))),
            Action::WaitHealthy { node } => queue.extend(r.handle(healthy(&node))),
            _ => {}
        }
    }
    waves
}
