//! Wave selection under the limits, failures and the failure threshold, abort and rollback, and
//! construction errors.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic there is a failed assertion

mod common;

use std::collections::BTreeMap;

use common::*;
use waves::{Action, Counts, Event, Limits, NodeState, Phase, Rollout, Target, WaveError};

fn waves_of(targets: Vec<Target>, limits: Limits) -> Vec<(u32, Vec<String>)> {
    let mut r = Rollout::new(targets, limits).unwrap();
    let waves = happy_waves(&mut r);
    assert_eq!(r.phase(), Phase::Completed);
    waves
}

fn w(wave: u32, nodes: &[&str]) -> (u32, Vec<String>) {
    (wave, nodes.iter().map(|n| n.to_string()).collect())
}

#[test]
fn per_pool_limits_and_the_default() {
    let mut targets: Vec<Target> = (1..=5).map(|i| disruptive(&format!("w{i}"), "web", None)).collect();
    targets.extend((1..=3).map(|i| disruptive(&format!("d{i}"), "db", None)));
    let limits = Limits {
        max_unavailable_per_pool: BTreeMap::from([("web".into(), 2)]),
        ..Limits::default()
    };
    assert_eq!(
        waves_of(targets, limits),
        vec![
            w(1, &["d1", "w1", "w2"]),
            w(2, &["d2", "w3", "w4"]),
            w(3, &["d3", "w5"])
        ]
    );
}

#[test]
fn zone_limit_spans_pools_and_skips_nodes_without_a_zone() {
    let targets = vec![
        disruptive("a-z1-1", "a", Some("z1")),
        disruptive("a-z1-2", "a", Some("z1")),
        disruptive("a-z2", "a", Some("z2")),
        disruptive("a-nozone-1", "a", None),
        disruptive("a-nozone-2", "a", None),
        disruptive("b-z1", "b", Some("z1")),
        disruptive("b-z3", "b", Some("z3")),
    ];
    let limits = Limits {
        default_max_unavailable: 10,
        max_unavailable_per_zone: 1,
        ..Limits::default()
    };
    assert_eq!(
        waves_of(targets, limits),
        vec![
            // No zone first, not zone-limited; z1 once across both pools.
            w(1, &["a-nozone-1", "a-nozone-2", "a-z1-1", "a-z2", "b-z3"]),
            w(2, &["a-z1-2"]),
            w(3, &["b-z1"]),
        ]
    );
}

#[test]
fn the_canary_goes_first_alone_and_can_pause_the_rest() {
    let targets: Vec<Target> = (1..=5).map(|i| disruptive(&format!("n{i}"), "p", None)).collect();
    let limits = Limits {
        default_max_unavailable: 2,
        canary: 1,
        ..Limits::default()
    };
    assert_eq!(
        waves_of(targets.clone(), limits.clone()),
        vec![w(1, &["n1"]), w(2, &["n2", "n3"]), w(3, &["n4", "n5"])]
    );

    let mut r = Rollout::new(
        targets,
        Limits {
            pause_after_canary: true,
            ..limits
        },
    )
    .unwrap();
    r.handle(Event::Started);
    r.handle(Event::NodeDone { node: "n1".into() });
    let actions = r.handle(Event::NodeHealthy { node: "n1".into() });
    assert!(
        actions.contains(&Action::Paused {
            reason: waves::CANARY_PAUSE.into()
        }),
        "{actions:?}"
    );
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Apply { .. })),
        "{actions:?}"
    );
    assert_eq!(r.phase(), Phase::Paused);
    let actions = r.handle(Event::Resume);
    assert!(
        actions.contains(&Action::WaveStarted {
            wave: 2,
            nodes: vec!["n2".into(), "n3".into()]
        }),
        "{actions:?}"
    );
    // A failed canary pauses (max_failures 0) and nothing else goes out.
    let mut r = Rollout::new(
        (1..=3).map(|i| disruptive(&format!("n{i}"), "p", None)).collect(),
        Limits {
            canary: 1,
            ..Limits::default()
        },
    )
    .unwrap();
    r.handle(Event::Started);
    let actions = r.handle(Event::NodeFailed {
        node: "n1".into(),
        reason: "exited 1".into(),
    });
    assert_eq!(r.phase(), Phase::Paused, "{actions:?}");
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Apply { .. })),
        "{actions:?}"
    );
}

#[test]
fn wave_size_caps_each_wave() {
    let targets = (1..=5).map(|i| disruptive(&format!("n{i}"), "p", None)).collect();
    let limits = Limits {
        default_max_unavailable: 10,
        wave_size: Some(2),
        ..Limits::default()
    };
    assert_eq!(
        waves_of(targets, limits),
        vec![w(1, &["n1", "n2"]), w(2, &["n3", "n4"]), w(3, &["n5"])]
    );
}

#[test]
fn order_is_pool_zone_node_whatever_the_input_order() {
    let targets = vec![
        disruptive("n3", "b", Some("z1")),
        disruptive("n1", "b", Some("z1")),
        disruptive("n9", "a", Some("z2")),
        disruptive("n2", "a", Some("z1")),
    ];
    let mut reversed = targets.clone();
    reversed.reverse();
    let limits = Limits {
        default_max_unavailable: 10,
        wave_size: Some(1),
        ..Limits::default()
    };
    let expected = vec![w(1, &["n2"]), w(2, &["n9"]), w(3, &["n1"]), w(4, &["n3"])];
    assert_eq!(waves_of(targets, limits.clone()), expected);
    assert_eq!(waves_of(reversed, limits), expected);
}

#[test]
fn tolerated_failure_lets_the_wave_go_on() {
    let mut r = fixture(Limits {
        max_failures: 1,
        ..Limits::default()
    });
    feed(&mut r, [Event::Started, done("cfg")]);
    assert_eq!(r.handle(failed("a1")), vec![]);
    assert_eq!(r.phase(), Phase::Running);
    assert_eq!(
        feed(&mut r, [done("b1"), healthy("b1")]),
        vec![
            wait("b1"),
            Action::WaveFinished { wave: 1 },
            started(2, &["a2"]),
            apply("a2", 2)
        ]
    );
    assert_eq!(
        feed(&mut r, [done("a2"), healthy("a2")]),
        vec![wait("a2"), Action::WaveFinished { wave: 2 }, Action::Completed]
    );
    let status = r.status();
    assert_eq!(status.phase, Phase::Completed);
    assert_eq!(
        status.counts,
        Counts {
            total: 4,
            pending: 0,
            applying: 0,
            waiting_healthy: 0,
            healthy: 3,
            failed: 1
        }
    );
}

#[test]
fn failures_over_the_threshold_pause_and_each_later_failure_pauses_again() {
    let targets = (1..=6).map(|i| disruptive(&format!("n{i}"), "p", None)).collect();
    let limits = Limits {
        default_max_unavailable: 2,
        max_failures: 1,
        ..Limits::default()
    };
    let mut r = Rollout::new(targets, limits).unwrap();
    r.handle(Event::Started);
    assert_eq!(r.handle(timed_out("n1")), vec![], "one failure is tolerated");
    assert_eq!(
        r.handle(failed("n2")),
        vec![
            Action::WaveFinished { wave: 1 },
            Action::Paused {
                reason: "2 node(s) failed, more than max_failures = 1; last: n2: kubeadm reset exited 1".into()
            },
        ]
    );
    assert_eq!(r.phase(), Phase::Paused);
    assert_eq!(
        r.handle(Event::Resume),
        vec![started(2, &["n3", "n4"]), apply("n3", 2), apply("n4", 2)]
    );
    let actions = r.handle(timed_out("n3"));
    assert_eq!(
        actions,
        vec![Action::Paused {
            reason: "3 node(s) failed, more than max_failures = 1; last: n3: timed out".into()
        }]
    );
    // n4 finishes while paused; no wave 3.
    assert_eq!(
        feed(&mut r, [done("n4"), healthy("n4")]),
        vec![wait("n4"), Action::WaveFinished { wave: 2 }]
    );
    assert_eq!(r.status().counts.pending, 2);
    assert_eq!(
        r.handle(Event::Resume),
        vec![started(3, &["n5", "n6"]), apply("n5", 3), apply("n6", 3)]
    );
}

#[test]
fn failure_of_the_last_node_completes_instead_of_pausing() {
    let mut r = Rollout::new(vec![disruptive("n1", "p", None)], Limits::default()).unwrap();
    r.handle(Event::Started);
    assert_eq!(
        r.handle(failed("n1")),
        vec![Action::WaveFinished { wave: 1 }, Action::Completed]
    );
    assert_eq!(r.phase(), Phase::Completed);
    assert_eq!(r.status().counts.failed, 1);
}

#[test]
fn a_wave_zero_failure_counts_and_holds_back_the_next_disruptive_wave() {
    let mut r = fixture(Limits::default());
    r.handle(Event::Started);
    let actions = r.handle(failed("cfg"));
    assert_eq!(
        actions,
        vec![
            Action::WaveFinished { wave: 0 },
            Action::Paused {
                reason: "1 node(s) failed, more than max_failures = 0; last: cfg: kubeadm reset exited 1".into()
            },
        ]
    );
    let actions = feed(&mut r, [done("a1"), healthy("a1"), done("b1"), healthy("b1")]);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Apply { .. })),
        "{actions:?}"
    );
    assert_eq!(state(&r, "a2"), NodeState::Pending);
}

#[test]
fn abort_stops_new_applies_and_rolls_back_what_is_applied_but_not_healthy() {
    for rollback in [false, true] {
        let mut r = Rollout::new(
            vec![
                target("cfg", "p", None, false),
                target("cfg2", "p", None, false),
                disruptive("a1", "a", None),
                disruptive("b1", "b", None),
                disruptive("c1", "c", None),
                disruptive("c2", "c", None),
            ],
            Limits {
                max_failures: 5,
                rollback_on_abort: rollback,
                ..Limits::default()
            },
        )
        .unwrap();
        // cfg healthy, cfg2 failed, a1 waiting for health, b1 applying, c1 healthy, c2 pending.
        feed(
            &mut r,
            [
                Event::Started,
                done("cfg"),
                failed("cfg2"),
                done("a1"),
                done("c1"),
                healthy("c1"),
            ],
        );
        let actions = r.handle(Event::Abort);
        let mut expected = vec![Action::Aborted {
            reason: "aborted by operator".into(),
        }];
        if rollback {
            expected.extend(["a1", "b1", "cfg2"].map(|n| Action::Rollback { node: n.into() }));
        }
        assert_eq!(actions, expected);
        assert_eq!(r.phase(), Phase::Aborted);
        // Nothing more happens: no Apply for c2, node events ignored.
        assert_eq!(
            feed(&mut r, [healthy("a1"), done("b1"), Event::Resume, Event::Started]),
            vec![]
        );
        assert_eq!(state(&r, "c2"), NodeState::Pending);
    }
}

#[test]
fn abort_before_start_rolls_back_nothing() {
    let mut r = fixture(Limits {
        rollback_on_abort: true,
        ..Limits::default()
    });
    assert_eq!(
        r.handle(Event::Abort),
        vec![Action::Aborted {
            reason: "aborted by operator".into()
        }]
    );
    assert_eq!(r.handle(Event::Started), vec![]);
    assert_eq!(r.phase(), Phase::Aborted);
}

#[test]
fn status_reports_every_node_with_its_wave() {
    let mut r = fixture(Limits::default());
    feed(&mut r, [Event::Started, done("a1"), done("cfg")]);
    let status = r.status();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.current_wave, 1);
    let rows: Vec<(&str, NodeState, Option<u32>)> = status
        .nodes
        .iter()
        .map(|n| (n.target.node.as_str(), n.state.clone(), n.wave))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("a1", NodeState::WaitingHealthy { wave: 1 }, Some(1)),
            ("a2", NodeState::Pending, None),
            ("b1", NodeState::Applying { wave: 1 }, Some(1)),
            ("cfg", NodeState::Healthy, Some(0)),
        ]
    );
    assert_eq!(
        status.counts,
        Counts {
            total: 4,
            pending: 1,
            applying: 1,
            waiting_healthy: 1,
            healthy: 1,
            failed: 0
        }
    );
    assert_eq!(r.node_state("nope"), None);
}

#[test]
fn new_rejects_what_could_never_roll_out() {
    let one = || vec![disruptive("n1", "p", None)];
    let cases: Vec<(Vec<Target>, Limits, WaveError, &str)> = vec![
        (
            vec![disruptive("n1", "p", None), target("n1", "q", None, false)],
            Limits::default(),
            WaveError::DuplicateNode { node: "n1".into() },
            "exactly one target",
        ),
        (
            vec![disruptive("", "p", None)],
            Limits::default(),
            WaveError::EmptyNodeName,
            "inventory",
        ),
        (
            one(),
            Limits {
                default_max_unavailable: 0,
                ..Limits::default()
            },
            WaveError::ZeroDefaultLimit,
            "set it to 1 or more",
        ),
        (
            one(),
            Limits {
                max_unavailable_per_pool: BTreeMap::from([("db".into(), 0)]),
                ..Limits::default()
            },
            WaveError::ZeroPoolLimit { pool: "db".into() },
            "remove the entry",
        ),
        (
            one(),
            Limits {
                wave_size: Some(0),
                ..Limits::default()
            },
            WaveError::ZeroWaveSize,
            "leave it unset",
        ),
    ];
    for (targets, limits, error, hint) in cases {
        let got = Rollout::new(targets, limits).unwrap_err();
        assert_eq!(got, error);
        assert!(got.to_string().contains(hint), "{got}");
    }
    // A zone limit of 0 means "no zone limit", and no failures tolerated is allowed.
    Rollout::new(
        one(),
        Limits {
            max_unavailable_per_zone: 0,
            max_failures: 0,
            ..Limits::default()
        },
    )
    .unwrap();
}

#[test]
fn limits_defaults_and_lookups() {
    let limits = Limits::default();
    assert_eq!(limits.default_max_unavailable, 1);
    assert_eq!(limits.zone_limit(), None);
    assert!(!limits.rollback_on_abort);
    let limits = Limits {
        max_unavailable_per_pool: BTreeMap::from([("web".into(), 3)]),
        default_max_unavailable: 2,
        max_unavailable_per_zone: 4,
        ..Limits::default()
    };
    assert_eq!(limits.pool_limit("web"), 3);
    assert_eq!(limits.pool_limit("db"), 2);
    assert_eq!(limits.zone_limit(), Some(4));
    // A config file names only what it changes.
    let parsed: Limits = serde_json::from_str(r#"{"max_failures": 2, "wave_size": 5}"#).unwrap();
    assert_eq!(
        parsed,
        Limits {
            max_failures: 2,
            wave_size: Some(5),
            ..Limits::default()
        }
    );
}
