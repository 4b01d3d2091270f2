//! Diffs between placements: what changes per node, and which changes are disruptive.
// Helpers outside #[test] functions unwrap too: a panic in a test is a failed assertion.
#![allow(clippy::unwrap_used)]

mod common;

use common::doc;
use policy::{Change, NodeFacts, diff, place};

fn changes(c: &policy::NodeChange) -> Vec<(&str, bool)> {
    c.changes
        .iter()
        .map(|Change { what, disruptive }| (what.as_str(), *disruptive))
        .collect()
}

#[test]
fn changes_and_their_disruption() {
    let before = policy::parse(
        "a.yaml",
        &doc("pools:
  - name: performance
    match: { labels: { class: perf } }
    labels: { polynimbus.io/speed: fast }
  - name: fast-nvme
    match: { labels: { class: nvme } }
cohorts:
  - name: edge
    pools: [performance]
    taints: [ { key: polynimbus.io/edge, value: a, effect: NoSchedule } ]
"),
    )
    .unwrap();
    let after = policy::parse(
        "b.yaml",
        &doc("pools:
  - name: performance
    match: { labels: { class: perf } }
    labels: { polynimbus.io/speed: faster }
  - name: fast-nvme
    match: { labels: { class: [nvme] } }
cohorts:
  - name: edge
    pools: [performance]
    taints: [ { key: polynimbus.io/edge, value: b, effect: NoSchedule } ]
"),
    );
    assert!(after.is_err(), "a list as a label value is refused");
    let after = policy::parse(
        "b.yaml",
        &doc("pools:
  - name: performance
    match: { labels: { class: perf } }
    labels: { polynimbus.io/speed: faster }
  - name: fast-nvme
    match: { labels: { class: nvme } }
cohorts:
  - name: edge
    pools: [performance]
    taints: [ { key: polynimbus.io/edge, value: b, effect: NoSchedule } ]
"),
    )
    .unwrap();

    let nodes_before = vec![
        NodeFacts::new("1", "labels-only")
            .with_label("env", "prod")
            .with_label("class", "perf"),
        NodeFacts::new("2", "moves-pool")
            .with_label("env", "prod")
            .with_label("class", "perf"),
        NodeFacts::new("3", "moves-env")
            .with_label("env", "prod")
            .with_label("class", "nvme"),
        NodeFacts::new("4", "leaves")
            .with_label("env", "prod")
            .with_label("class", "nvme"),
        NodeFacts::new("5", "joins").with_label("env", "nowhere"),
        NodeFacts::new("6", "same")
            .with_label("env", "prod")
            .with_label("class", "nvme"),
        NodeFacts::new("7", "still-out"),
    ];
    let mut nodes_after = nodes_before.clone();
    nodes_after[1] = nodes_after[1].clone().with_label("class", "nvme");
    nodes_after[2] = nodes_after[2].clone().with_label("env", "dev");
    nodes_after[3] = nodes_after[3].clone().with_label("class", "none");
    nodes_after[4] = nodes_after[4]
        .clone()
        .with_label("env", "prod")
        .with_label("class", "nvme");
    nodes_after[6] = nodes_after[6].clone().with_label("class", "x");

    let a = place(&before, &nodes_before);
    let b = place(&after, &nodes_after);
    let d = diff(&a, &b);
    let ids: Vec<&str> = d.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(
        ids,
        ["1", "2", "3", "4", "5"],
        "unchanged and still-unplaced nodes are left out"
    );

    assert_eq!(
        changes(&d[0]),
        [
            ("label polynimbus.io/speed: fast -> faster", false),
            ("taint polynimbus.io/edge:NoSchedule: a -> b", false),
        ]
    );
    assert!(!d[0].is_disruptive());
    assert_eq!(
        changes(&d[1]),
        [
            ("pool: performance -> fast-nvme", true),
            ("cohort edge removed", false),
            ("label polynimbus.io/cohort.edge=true removed", false),
            ("label polynimbus.io/pool: performance -> fast-nvme", false),
            ("label polynimbus.io/speed=fast removed", false),
            ("taint polynimbus.io/edge=a:NoSchedule removed", false),
        ]
    );
    assert!(d[1].is_disruptive());
    assert_eq!(
        changes(&d[2]),
        [
            ("environment: prod -> dev", true),
            ("label polynimbus.io/env: prod -> dev", false)
        ]
    );
    assert_eq!(
        changes(&d[3]),
        [(
            "placed in prod/fast-nvme -> unplaced (matches no pool of environment \"prod\" (fast-nvme: lacks label \
             class=nvme; performance: lacks label class=perf))",
            true
        )]
    );
    assert_eq!(d[3].after, None);
    assert_eq!(
        changes(&d[4]),
        [
            ("unplaced (matches no environment) -> placed in prod/fast-nvme", false),
            ("label polynimbus.io/env=prod added", false),
            ("label polynimbus.io/pool=fast-nvme added", false),
        ]
    );
    assert!(!d[4].is_disruptive());
    assert_eq!(d[4].before, None);

    // A node that disappears is disruptive; one that appears is not.
    let gone = diff(&a, &place(&after, &nodes_after[..5]));
    assert!(
        gone.iter()
            .any(|c| c.node == "6" && changes(c) == [("placed in prod/fast-nvme -> absent", true)])
    );
    assert!(diff(&a, &a).is_empty());
}
