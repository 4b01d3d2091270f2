//! Every event in every phase, and every node event in every node state, with the exact outcome.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic there is a failed assertion

mod common;

use common::*;
use waves::{Action, Event, Limits, NodeState, Phase, Rollout};

const ABORTED: &str = "aborted by operator";
const PAUSED: &str = "paused by operator";

fn in_phase(phase: Phase) -> Rollout {
    let mut r = fixture(Limits::default());
    match phase {
        Phase::Pending => {}
        Phase::Running => {
            r.handle(Event::Started);
        }
        Phase::Paused => {
            feed(&mut r, [Event::Started, Event::Pause]);
        }
        Phase::Completed => {
            happy_waves(&mut r);
        }
        Phase::Aborted => {
            feed(&mut r, [Event::Started, Event::Abort]);
        }
    }
    assert_eq!(r.phase(), phase);
    r
}

fn all_events(node: &str) -> Vec<Event> {
    vec![
        Event::Started,
        done(node),
        healthy(node),
        failed(node),
        timed_out(node),
        Event::Pause,
        Event::Resume,
        Event::Abort,
    ]
}

#[test]
fn started_from_pending_sends_wave_zero_and_the_first_disruptive_wave() {
    let mut r = in_phase(Phase::Pending);
    assert_eq!(
        r.handle(Event::Started),
        vec![
            started(0, &["cfg"]),
            apply("cfg", 0),
            started(1, &["a1", "b1"]),
            apply("a1", 1),
            apply("b1", 1),
        ]
    );
    assert_eq!(r.phase(), Phase::Running);
    assert_eq!(state(&r, "a2"), NodeState::Pending);
    assert_eq!(r.status().current_wave, 1);
}

/// (phase, event, expected actions, expected phase afterwards, expected state of a1 afterwards)
#[test]
fn every_event_in_every_phase() {
    let paused_by_failure = |why: &str| Action::Paused {
        reason: format!("1 node(s) failed, more than max_failures = 0; last: a1: {why}"),
    };
    let fail_state = |why: &str| NodeState::Failed { reason: why.into() };
    let aborted = || vec![Action::Aborted { reason: ABORTED.into() }];
    let applying = NodeState::Applying { wave: 1 };
    let waiting = NodeState::WaitingHealthy { wave: 1 };
    let reset = "kubeadm reset exited 1";

    use Phase::*;
    let table: Vec<(Phase, Event, Vec<Action>, Phase, NodeState)> = vec![
        // Pending: only Started and Abort do anything.
        (Pending, done("a1"), vec![], Pending, NodeState::Pending),
        (Pending, healthy("a1"), vec![], Pending, NodeState::Pending),
        (Pending, failed("a1"), vec![], Pending, NodeState::Pending),
        (Pending, timed_out("a1"), vec![], Pending, NodeState::Pending),
        (Pending, Event::Pause, vec![], Pending, NodeState::Pending),
        (Pending, Event::Resume, vec![], Pending, NodeState::Pending),
        (Pending, Event::Abort, aborted(), Aborted, NodeState::Pending),
        // Running, a1 applying in wave 1.
        (Running, Event::Started, vec![], Running, applying.clone()),
        (Running, done("a1"), vec![wait("a1")], Running, waiting.clone()),
        (Running, healthy("a1"), vec![], Running, applying.clone()),
        (
            Running,
            failed("a1"),
            vec![paused_by_failure(reset)],
            Paused,
            fail_state(reset),
        ),
        (
            Running,
            timed_out("a1"),
            vec![paused_by_failure("timed out")],
            Paused,
            fail_state("timed out"),
        ),
        (
            Running,
            Event::Pause,
            vec![Action::Paused { reason: PAUSED.into() }],
            Paused,
            applying.clone(),
        ),
        (Running, Event::Resume, vec![], Running, applying.clone()),
        (Running, Event::Abort, aborted(), Aborted, applying.clone()),
        // Paused, a1 applying in wave 1: nodes in flight go on, no new wave.
        (Paused, Event::Started, vec![], Paused, applying.clone()),
        (Paused, done("a1"), vec![wait("a1")], Paused, waiting.clone()),
        (Paused, healthy("a1"), vec![], Paused, applying.clone()),
        (Paused, failed("a1"), vec![], Paused, fail_state(reset)),
        (Paused, timed_out("a1"), vec![], Paused, fail_state("timed out")),
        (Paused, Event::Pause, vec![], Paused, applying.clone()),
        (Paused, Event::Resume, vec![], Running, applying.clone()),
        (Paused, Event::Abort, aborted(), Aborted, applying.clone()),
    ];
    for (phase, event, actions, after, a1) in table {
        let mut r = in_phase(phase);
        let got = r.handle(event.clone());
        assert_eq!(got, actions, "{phase:?} + {event:?}");
        assert_eq!(r.phase(), after, "{phase:?} + {event:?}");
        assert_eq!(state(&r, "a1"), a1, "{phase:?} + {event:?}");
        // Nothing else moved.
        assert_eq!(state(&r, "a2"), NodeState::Pending, "{phase:?} + {event:?}");
    }
}

#[test]
fn started_in_any_later_phase_and_everything_after_the_end_is_ignored() {
    for phase in [Phase::Completed, Phase::Aborted] {
        for node in ["a1", "a2", "cfg"] {
            for event in all_events(node) {
                let mut r = in_phase(phase);
                let before = r.clone();
                assert_eq!(r.handle(event.clone()), vec![], "{phase:?} + {event:?}");
                assert_eq!(r, before, "{phase:?} + {event:?} changed the rollout");
            }
        }
    }
}

#[test]
fn node_events_for_unknown_nodes_are_ignored_in_every_phase() {
    for phase in [
        Phase::Pending,
        Phase::Running,
        Phase::Paused,
        Phase::Completed,
        Phase::Aborted,
    ] {
        for event in [
            done("ghost"),
            healthy("ghost"),
            failed("ghost"),
            timed_out("ghost"),
            done(""),
        ] {
            let mut r = in_phase(phase);
            let before = r.clone();
            assert_eq!(r.handle(event.clone()), vec![], "{phase:?} + {event:?}");
            assert_eq!(r, before);
        }
    }
}

/// Every node event for a disruptive node in every node state (running, failures tolerated).
#[test]
fn every_node_event_in_every_node_state() {
    let tolerant = Limits {
        max_failures: 10,
        ..Limits::default()
    };
    let reset = NodeState::Failed {
        reason: "kubeadm reset exited 1".into(),
    };
    let timeout = NodeState::Failed {
        reason: "timed out".into(),
    };
    let setups: Vec<(&str, Vec<Event>, NodeState)> = vec![
        ("pending", vec![], NodeState::Pending),
        ("applying", vec![], NodeState::Applying { wave: 1 }),
        ("waiting", vec![done("a1")], NodeState::WaitingHealthy { wave: 1 }),
        ("healthy", vec![done("a1"), healthy("a1")], NodeState::Healthy),
        ("failed", vec![failed("a1")], reset.clone()),
    ];
    for (name, setup, expected_before) in setups {
        let makers: [fn(&str) -> Event; 4] = [done, healthy, failed, timed_out];
        for make in makers {
            let mut r = fixture(tolerant.clone());
            r.handle(Event::Started);
            feed(&mut r, setup.clone());
            // The "pending" case uses a2, still waiting for wave 2.
            let node = if name == "pending" { "a2" } else { "a1" };
            let event = make(node);
            assert_eq!(state(&r, node), expected_before, "setup {name}");
            let before = r.clone();
            let actions = r.handle(event.clone());
            let after = state(&r, node);
            match (name, &event) {
                ("applying", Event::NodeDone { .. }) => {
                    assert_eq!(actions, vec![wait("a1")]);
                    assert_eq!(after, NodeState::WaitingHealthy { wave: 1 });
                }
                ("applying" | "waiting", Event::NodeFailed { .. }) => {
                    assert_eq!(actions, vec![], "{name} + {event:?}");
                    assert_eq!(after, reset);
                }
                ("applying" | "waiting", Event::TimedOut { .. }) => {
                    assert_eq!(actions, vec![], "{name} + {event:?}");
                    assert_eq!(after, timeout);
                }
                ("waiting", Event::NodeHealthy { .. }) => {
                    assert_eq!(actions, vec![], "b1 still in flight, so wave 1 goes on");
                    assert_eq!(after, NodeState::Healthy);
                }
                _ => {
                    assert_eq!(actions, vec![], "{name} + {event:?} must be ignored");
                    assert_eq!(r, before, "{name} + {event:?} must change nothing");
                }
            }
        }
    }
}

#[test]
fn non_disruptive_nodes_need_only_node_done() {
    let mut r = fixture(Limits::default());
    r.handle(Event::Started);
    assert_eq!(r.handle(healthy("cfg")), vec![], "health before done means nothing");
    assert_eq!(state(&r, "cfg"), NodeState::Applying { wave: 0 });
    assert_eq!(r.handle(done("cfg")), vec![Action::WaveFinished { wave: 0 }]);
    assert_eq!(state(&r, "cfg"), NodeState::Healthy);
    assert_eq!(r.handle(done("cfg")), vec![], "a repeat changes nothing");
}

#[test]
fn duplicate_events_change_nothing() {
    let mut r = fixture(Limits::default());
    r.handle(Event::Started);
    r.handle(done("a1"));
    let first = r.handle(healthy("a1"));
    assert_eq!(first, vec![]);
    let snapshot = r.clone();
    assert_eq!(r.handle(healthy("a1")), vec![]);
    assert_eq!(r, snapshot);
    assert_eq!(r.handle(Event::Started), vec![]);
    assert_eq!(r, snapshot);
}

#[test]
fn paused_rollout_finishes_its_wave_and_resume_starts_the_next() {
    let mut r = fixture(Limits::default());
    feed(
        &mut r,
        [
            Event::Started,
            done("cfg"),
            Event::Pause,
            done("a1"),
            healthy("a1"),
            done("b1"),
        ],
    );
    assert_eq!(
        r.handle(healthy("b1")),
        vec![Action::WaveFinished { wave: 1 }],
        "no wave 2 while paused"
    );
    assert_eq!(r.phase(), Phase::Paused);
    assert_eq!(r.status().pause_reason.as_deref(), Some(PAUSED));
    assert_eq!(r.handle(Event::Resume), vec![started(2, &["a2"]), apply("a2", 2)]);
    assert_eq!(r.phase(), Phase::Running);
    assert_eq!(r.status().pause_reason, None);
    assert_eq!(
        feed(&mut r, [done("a2"), healthy("a2")]),
        vec![wait("a2"), Action::WaveFinished { wave: 2 }, Action::Completed]
    );
    assert_eq!(r.phase(), Phase::Completed);
}

#[test]
fn a_paused_rollout_with_nothing_left_completes() {
    let mut r = Rollout::new(vec![disruptive("a1", "a", None)], Limits::default()).unwrap();
    feed(&mut r, [Event::Started, Event::Pause, done("a1")]);
    assert_eq!(
        r.handle(healthy("a1")),
        vec![Action::WaveFinished { wave: 1 }, Action::Completed]
    );
    assert_eq!(r.phase(), Phase::Completed);
    assert_eq!(r.status().pause_reason, None);
}

#[test]
fn resume_while_the_wave_is_in_flight_starts_nothing_new() {
    let mut r = fixture(Limits::default());
    feed(&mut r, [Event::Started, Event::Pause]);
    assert_eq!(r.handle(Event::Resume), vec![]);
    assert_eq!(r.phase(), Phase::Running);
    assert_eq!(
        feed(&mut r, [done("a1"), healthy("a1"), done("b1"), healthy("b1")]),
        vec![
            wait("a1"),
            wait("b1"),
            Action::WaveFinished { wave: 1 },
            started(2, &["a2"]),
            apply("a2", 2)
        ]
    );
}

#[test]
fn empty_rollout_completes_on_start() {
    let mut r = Rollout::new(vec![], Limits::default()).unwrap();
    assert_eq!(r.handle(Event::Started), vec![Action::Completed]);
    assert_eq!(r.phase(), Phase::Completed);
}

#[test]
fn only_non_disruptive_targets() {
    let mut r = Rollout::new(
        vec![target("x", "p", None, false), target("y", "q", Some("z"), false)],
        Limits::default(),
    )
    .unwrap();
    assert_eq!(
        r.handle(Event::Started),
        vec![started(0, &["x", "y"]), apply("x", 0), apply("y", 0)]
    );
    assert_eq!(r.handle(done("y")), vec![]);
    assert_eq!(
        r.handle(done("x")),
        vec![Action::WaveFinished { wave: 0 }, Action::Completed]
    );
}
