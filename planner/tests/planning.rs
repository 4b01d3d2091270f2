//! End-to-end planning through the public API: worked example, three zones, semi-sync, Kafka,
//! contradictions, capacity, helm output and drift.

use planner::{
    BudgetSource, DriftEvent, Finding, LatencyMatrix, LinkStats, Mode, Nanos, NodeFacts, Plan, Role, SignedNanos,
    StoreDetail, StoreKind, ZoneSource, drift, parse_stores, physics, plan, to_helm_values, to_helm_yaml,
};

fn us(n: u64) -> Nanos {
    Nanos::from_micros(n)
}

/// Six nodes in three zones: 0.1 ms inside a zone (p99 0.12 ms), zone a – zone b 1 ms (p99 1.2 ms),
/// zone c 5 ms from both (p99 6 ms). Zone = first letter of the node id.
fn three_zones() -> LatencyMatrix {
    three_zones_with(|p, q| match (p, q) {
        (p, q) if p == q => (100, 120),
        ('a', 'b') => (1_000, 1_200),
        _ => (5_000, 6_000),
    })
}

fn three_zones_with(rtt: impl Fn(char, char) -> (u64, u64)) -> LatencyMatrix {
    let nodes = ["a1", "a2", "b1", "b2", "c1", "c2"];
    let mut m = LatencyMatrix::new();
    for (x, a) in nodes.iter().enumerate() {
        for b in &nodes[x + 1..] {
            let (za, zb) = (a.as_bytes()[0] as char, b.as_bytes()[0] as char);
            let (p50, p99) = rtt(za.min(zb), za.max(zb));
            m.insert_symmetric(a, b, LinkStats::from_rtt(us(p50), us(p99)).with_jitter(us(10)));
        }
    }
    m
}

fn facts(pool: &str, capacity: u64) -> Vec<NodeFacts> {
    ["a1", "a2", "b1", "b2", "c1", "c2"]
        .iter()
        .map(|n| NodeFacts::new(n).with_pool(pool).with_capacity(capacity))
        .collect()
}

fn has(plan: &Plan, pred: impl Fn(&Finding) -> bool) -> bool {
    plan.findings.iter().any(pred)
}

/// The deck's worked example through the whole planner: 0.3 ms budget, max_dop 1, members 25 km apart
/// (0.25 ms RTT) → 0.05 ms margin; a member 30 km away (0.3 ms) does not fit.
#[test]
fn worked_example_through_the_planner() {
    let yaml = "galera:\n  - name: ledger\n    members: [x, y, z]\n    commit_budget: 0.3ms\n    max_dop: 1\n";
    let file = parse_stores(yaml).unwrap();
    let rtt25 = physics::fiber_rtt_km(25);
    let rtt30 = physics::fiber_rtt_km(30);
    let mut m = LatencyMatrix::new();
    m.insert_symmetric("x", "y", LinkStats::from_rtt(rtt25, rtt25));
    m.insert_symmetric("x", "z", LinkStats::from_rtt(rtt25, rtt25));
    m.insert_symmetric("y", "z", LinkStats::from_rtt(rtt25, rtt25));
    let p = plan(&file, &[], &m);
    let s = p.store("ledger").unwrap();
    assert_eq!(s.commit, Some(Nanos(250_000)));
    assert_eq!(s.margin, Some(SignedNanos(50_000)));
    assert!(s.fits_budget);
    assert_eq!(s.max_link_distance_m, Some(29_999));
    assert_eq!(s.synchronous(), ["x", "y", "z"]);

    // z moves to 30 km from both: 0.3 ms leaves no margin, so z must be asynchronous.
    m.insert_symmetric("x", "z", LinkStats::from_rtt(rtt30, rtt30));
    m.insert_symmetric("y", "z", LinkStats::from_rtt(rtt30, rtt30));
    let p = plan(&file, &[], &m);
    let s = p.store("ledger").unwrap();
    assert_eq!(s.commit_as_declared, Some(Nanos(300_000)));
    assert_eq!(s.synchronous(), ["x", "y"]);
    assert_eq!(s.asynchronous(), ["z"]);
    assert_eq!(s.member("z").unwrap().latency, Some(Nanos(300_000)));
    assert!(has(&p, |f| matches!(f, Finding::GaleraQuorum { synchronous: 2, .. })));

    // With all three at 30 km nothing fits: no synchronous replication, over budget.
    m.insert_symmetric("x", "y", LinkStats::from_rtt(rtt30, rtt30));
    let p = plan(&file, &[], &m);
    let s = p.store("ledger").unwrap();
    assert!(!s.fits_budget);
    assert_eq!(s.commit, None);
    assert!(has(
        &p,
        |f| matches!(f, Finding::OverBudget { store, .. } if store == "ledger")
    ));
}

/// Three zones (0.1 ms inside, 1 ms and 5 ms between): zones inferred, the 5 ms zone asynchronous for
/// a Galera store with a 2 ms budget.
#[test]
fn three_zones_galera_tight_budget() {
    let yaml =
        "galera:\n  - name: ledger\n    pool: db\n    replicas: 6\n    txn_time: 0.2ms\n    commit_budget: 2ms\n";
    let file = parse_stores(yaml).unwrap();
    let p = plan(&file, &facts("db", 4_000), &three_zones());

    let zones = p.zones.members();
    assert_eq!(zones.len(), 3);
    assert_eq!(zones["inferred-1"], ["a1", "a2"]);
    assert_eq!(zones["inferred-2"], ["b1", "b2"]);
    assert_eq!(zones["inferred-3"], ["c1", "c2"]);
    assert!(p.zones.nodes.values().all(|z| z.source == ZoneSource::Inferred));

    let s = p.store("ledger").unwrap();
    assert_eq!(s.kind(), StoreKind::Galera);
    let mut sync = s.synchronous();
    sync.sort();
    assert_eq!(sync, ["a1", "a2", "b1", "b2"]);
    let mut asynchronous = s.asynchronous();
    asynchronous.sort();
    assert_eq!(asynchronous, ["c1", "c2"]);
    assert!(
        s.members
            .iter()
            .filter(|m| m.mode == Mode::Asynchronous)
            .all(|m| m.zone.as_deref() == Some("inferred-3"))
    );
    assert_eq!(s.commit_as_declared, Some(us(6_000)));
    assert_eq!(s.commit, Some(us(1_200)));
    assert_eq!(s.margin, Some(SignedNanos(800_000)));
    assert!(s.fits_budget);
    // 1 s / (0.2 ms + 1.2 ms) = 714.28 → 714 tx/s.
    assert_eq!(s.max_serial_rate, Some(714));
    assert_eq!(s.max_link_distance_m, Some(199_999));
    // Metro links: the documented Galera defaults stand.
    let values: Vec<(&str, &str)> = s
        .timeouts
        .iter()
        .map(|t| (t.parameter.as_str(), t.value.as_str()))
        .collect();
    assert_eq!(
        values,
        [
            ("evs.suspect_timeout", "PT5S"),
            ("evs.inactive_timeout", "PT15S"),
            ("gmcast.peer_timeout", "PT3S")
        ]
    );
    assert!(
        !has(&p, |f| matches!(
            f,
            Finding::OverBudget { .. } | Finding::GaleraQuorum { .. }
        )),
        "{:?}",
        p.findings
    );

    // Losing zone a or zone b leaves 2 of 4 synchronous members: no majority.
    for zone in ["inferred-1", "inferred-2"] {
        assert!(has(
            &p,
            |f| matches!(f, Finding::GaleraZoneLoss { zone: z, synchronous: 4, remaining: 2, .. } if z == zone)
        ));
    }

    // With three replicas the planner picks members that fit the budget first, then spreads over zones:
    // a1, b1 (1.2 ms fits), then a2 rather than c1 (6 ms does not fit). Losing zone a then breaks quorum.
    let file = parse_stores(&yaml.replace("replicas: 6", "replicas: 3")).unwrap();
    let p = plan(&file, &facts("db", 4_000), &three_zones());
    let s = p.store("ledger").unwrap();
    let members: Vec<&str> = s.members.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(members, ["a1", "b1", "a2"]);
    assert!(s.asynchronous().is_empty());
    assert!(has(
        &p,
        |f| matches!(f, Finding::GaleraZoneLoss { zone, remaining: 1, .. } if zone == "inferred-1")
    ));

    // A budget every zone fits: one member per zone, all synchronous, any one zone can be lost.
    let file = parse_stores(&yaml.replace("replicas: 6", "replicas: 3").replace("2ms", "7ms")).unwrap();
    let p = plan(&file, &facts("db", 4_000), &three_zones());
    let s = p.store("ledger").unwrap();
    assert_eq!(s.synchronous(), ["a1", "b1", "c1"]);
    assert!(!has(&p, |f| matches!(
        f,
        Finding::GaleraZoneLoss { .. } | Finding::GaleraQuorum { .. }
    )));
}

/// Semi-sync: the commit waits for the k-th fastest replica.
#[test]
fn semi_sync_waits_for_kth_fastest() {
    let m = three_zones();
    let run = |k: u32, budget: &str| {
        let yaml = format!(
            "semi_sync:\n  - name: accounts\n    members: [a1, a2, b1, c1]\n    source: a1\n    wait_for: {k}\n    commit_budget: {budget}\n"
        );
        plan(&parse_stores(&yaml).unwrap(), &[], &m)
    };
    let p = run(1, "2ms");
    let s = p.store("accounts").unwrap();
    assert_eq!(s.commit, Some(us(120)));
    assert!(s.fits_budget);
    assert_eq!(s.member("a1").unwrap().role, Role::Source);
    assert_eq!(s.member("c1").unwrap().mode, Mode::Asynchronous);
    assert_eq!(s.member("b1").unwrap().mode, Mode::Synchronous);
    assert_eq!(
        s.detail,
        StoreDetail::SemiSync {
            source: Some("a1".into()),
            wait_for: 1
        }
    );

    let p = run(2, "2ms");
    assert_eq!(
        p.store("accounts").unwrap().commit,
        Some(us(1_200)),
        "second fastest ack comes from zone b"
    );

    let p = run(3, "2ms");
    let s = p.store("accounts").unwrap();
    assert_eq!(
        s.commit,
        Some(us(6_000)),
        "the third ack has to come from the 5 ms zone"
    );
    assert!(!s.fits_budget);
    assert!(has(&p, |f| matches!(
        f,
        Finding::SemiSyncTooFewAcks {
            eligible: 2,
            wait_for: 3,
            ..
        }
    )));
    assert_eq!(s.timeouts[0].parameter, "rpl_semi_sync_source_timeout");
    assert_eq!(s.timeouts[0].value, "10000");

    // Without a declared source the member with the fastest k-th acknowledgement is chosen.
    let yaml = "semi_sync:\n  - name: s\n    members: [c1, b1, a1, a2]\n    wait_for: 2\n    commit_budget: 2ms\n";
    let p = plan(&parse_stores(yaml).unwrap(), &[], &m);
    assert_eq!(
        p.store("s").unwrap().detail,
        StoreDetail::SemiSync {
            source: Some("a1".into()),
            wait_for: 2
        },
        "a1 and a2 tie at 1.2 ms for the second ack; the smaller id wins"
    );

    // A budget from a target rate: 2 000 tx/s, max_dop 1, 0.2 ms txn → 0.3 ms.
    let yaml = "semi_sync:\n  - name: r\n    members: [a1, a2, b1]\n    source: a1\n    txn_time: 0.2ms\n    target_rate: 2000\n";
    let p = plan(&parse_stores(yaml).unwrap(), &[], &m);
    let s = p.store("r").unwrap();
    assert_eq!(s.budget, us(300));
    assert_eq!(s.budget_source, BudgetSource::TargetRate { target_rate: 2_000 });
    assert_eq!(s.margin, Some(SignedNanos(180_000)));
}

/// Kafka: the slowest follower needed for min.insync.replicas, worst placement over leaders.
#[test]
fn kafka_min_insync() {
    let m = three_zones();
    let yaml = "kafka:\n  - name: events\n    members: [a1, b1, c1]\n    replication_factor: 3\n    min_insync_replicas: 2\n    commit_budget: 2ms\n";
    let p = plan(&parse_stores(yaml).unwrap(), &[], &m);
    let s = p.store("events").unwrap();
    assert_eq!(
        s.commit_as_declared,
        Some(us(6_000)),
        "partitions led by c1 wait 6 ms for their nearest follower"
    );
    assert_eq!(s.asynchronous(), ["c1"]);
    assert_eq!(s.commit, Some(us(1_200)));
    assert!(s.fits_budget);
    assert!(has(&p, |f| matches!(
        f,
        Finding::KafkaTooFewSynchronous {
            synchronous: 2,
            replication_factor: 3,
            ..
        }
    )));
    assert!(matches!(s.detail, StoreDetail::Kafka { full_isr: Some(f), .. } if f == us(6_000)));
    assert_eq!(s.timeouts[0].parameter, "replica.lag.time.max.ms");

    let p = plan(
        &parse_stores(&yaml.replace("min_insync_replicas: 2", "min_insync_replicas: 3")).unwrap(),
        &[],
        &m,
    );
    let s = p.store("events").unwrap();
    assert!(!s.fits_budget, "three in-sync replicas need the 5 ms zone");

    // Four brokers in two zones, replication factor 4: with min.insync 2 the nearest follower (same
    // zone, 0.12 ms) is enough; with 3 the commit waits for the other zone (1.2 ms). acks=all with the
    // full ISR waits 1.2 ms either way, over a 1 ms budget.
    let four = "kafka:\n  - name: k\n    members: [a1, a2, b1, b2]\n    replication_factor: 4\n    min_insync_replicas: MIN\n    commit_budget: 1ms\n";
    let p = plan(&parse_stores(&four.replace("MIN", "2")).unwrap(), &[], &m);
    let s = p.store("k").unwrap();
    assert_eq!(s.commit_as_declared, Some(us(120)));
    assert!(has(
        &p,
        |f| matches!(f, Finding::KafkaFullIsrOverBudget { full_isr, .. } if *full_isr == us(1_200))
    ));
    let p = plan(&parse_stores(&four.replace("MIN", "3")).unwrap(), &[], &m);
    assert_eq!(p.store("k").unwrap().commit_as_declared, Some(us(1_200)));
}

/// Contradictions between declared zones and measurements appear in the plan's findings.
#[test]
fn contradictions_are_flagged() {
    let mut nodes = facts("db", 1_000);
    nodes[0].zone = Some("zone-a".into()); // a1
    nodes[4].zone = Some("zone-a".into()); // c1, 5 ms away
    let p = plan(&parse_stores("").unwrap(), &nodes, &three_zones());
    assert!(has(
        &p,
        |f| matches!(f, Finding::DeclaredZoneContradiction { zone, a, b, p50, .. }
        if zone == "zone-a" && a == "a1" && b == "c1" && *p50 == us(5_000))
    ));
    assert!(has(
        &p,
        |f| matches!(f, Finding::ZoneTooWide { zone, .. } if zone == "zone-a")
    ));

    // An unmeasured member pair inside a zone is planned from the zone pair, and the gap is reported.
    let mut m = three_zones();
    m.insert_symmetric(
        "a1",
        "b2",
        LinkStats {
            samples: 0,
            ..LinkStats::from_rtt(us(1), us(1))
        },
    );
    let yaml = "galera:\n  - name: g\n    members: [a1, b2, a2]\n    commit_budget: 2ms\n";
    let p = plan(&parse_stores(yaml).unwrap(), &[], &m);
    assert!(has(
        &p,
        |f| matches!(f, Finding::EstimatedLink { a, b, .. } if a == "a1" && b == "b2")
    ));
    assert_eq!(p.store("g").unwrap().commit, Some(us(1_200)));
}

/// A host with 30 % loss: a commit's p99 includes a TCP retransmission, so it cannot be synchronous.
#[test]
fn lossy_host_is_asynchronous() {
    let mut m = three_zones();
    for other in ["a1", "b1", "b2", "c1", "c2"] {
        let s = m.link("a2", other).unwrap();
        m.insert_symmetric("a2", other, s.with_loss_ppm(300_000));
    }
    let yaml = "galera:\n  - name: g\n    members: [a1, a2, b1, b2]\n    commit_budget: 2ms\n";
    let p = plan(&parse_stores(yaml).unwrap(), &[], &m);
    let s = p.store("g").unwrap();
    assert_eq!(s.asynchronous(), ["a2"]);
    assert_eq!(
        s.member("a2").unwrap().latency,
        Some(us(1_200).saturating_add(Nanos::from_millis(200))),
        "worst link to the synchronous core: a2–b1 p99 1.2 ms + one retransmission timeout"
    );
    assert!(has(&p, |f| matches!(f, Finding::LossyLink { loss_ppm: 300_000, .. })));
}

/// Every zone must carry 66 % of production demand.
#[test]
fn capacity_check_pass_and_fail() {
    let yaml = "production:\n  demand:\n    - pool: db\n      capacity: 16000\n";
    let file = parse_stores(yaml).unwrap();
    // 2 × 6 000 = 12 000 per zone ≥ 66 % of 16 000 (10 560).
    let p = plan(&file, &facts("db", 6_000), &three_zones());
    let c = &p.capacity[0];
    assert!(c.passes && c.survives_zone_loss, "{c:?}");
    assert_eq!(c.zones.len(), 3);
    assert!(c.zones.iter().all(|z| z.capacity == 12_000 && z.share_percent == 75));

    // Zone c's nodes shrink to 4 000 each: 8 000 = 50 % < 66 %; losing zone a still leaves 20 000.
    let mut nodes = facts("db", 6_000);
    nodes[4].capacity = Some(4_000);
    nodes[5].capacity = Some(4_000);
    let p = plan(&file, &nodes, &three_zones());
    let c = &p.capacity[0];
    assert!(!c.passes);
    assert!(c.survives_zone_loss);
    let short: Vec<&str> = c.zones.iter().filter(|z| !z.passes).map(|z| z.zone.as_str()).collect();
    assert_eq!(short, ["inferred-3"]);

    // Exactly 66 %: 2 × 5 280 = 10 560 passes; one less fails. Unknown capacity counts as zero.
    let p = plan(&file, &facts("db", 5_280), &three_zones());
    assert!(p.capacity[0].passes);
    let mut nodes = facts("db", 5_280);
    nodes[0].capacity = None;
    let p = plan(&file, &nodes, &three_zones());
    assert!(!p.capacity[0].passes);
    assert!(
        !p.capacity[0].survives_zone_loss,
        "without a1, losing zone b leaves 5 280 + 10 560 = 15 840 < 16 000"
    );
    assert!(has(
        &p,
        |f| matches!(f, Finding::UnknownCapacity { node } if node == "a1")
    ));
}

#[test]
fn helm_values_and_display() {
    let file = parse_stores(include_str!("../examples/stores.yaml")).unwrap();
    let mut nodes = facts("db", 6_000);
    nodes.extend(
        ["k1", "k2", "k3"]
            .iter()
            .map(|n| NodeFacts::new(n).with_pool("kafka").with_capacity(6_000)),
    );
    let mut m = three_zones();
    for (k, peer) in [("k1", "a1"), ("k2", "b1"), ("k3", "c1")] {
        m.insert_symmetric(k, peer, LinkStats::from_rtt(us(50), us(60)));
    }
    m.insert_symmetric("k1", "k2", LinkStats::from_rtt(us(1_000), us(1_200)));
    m.insert_symmetric("k1", "k3", LinkStats::from_rtt(us(5_000), us(6_000)));
    m.insert_symmetric("k2", "k3", LinkStats::from_rtt(us(5_000), us(6_000)));
    let p = plan(&file, &nodes, &m);

    let values = to_helm_values(&p);
    let ledger = &values["replication"]["stores"]["ledger"];
    assert_eq!(ledger["kind"], "galera");
    assert_eq!(
        ledger["config"]["wsrep_provider_options"],
        "evs.suspect_timeout=PT5S;evs.inactive_timeout=PT15S;gmcast.peer_timeout=PT3S"
    );
    assert_eq!(
        values["replication"]["stores"]["accounts"]["config"]["rpl_semi_sync_source_timeout"],
        10_000
    );
    assert_eq!(
        values["replication"]["stores"]["events"]["config"]["min.insync.replicas"],
        2
    );
    assert_eq!(values["replication"]["stores"]["events"]["asynchronous"][0], "k3");
    assert_eq!(values["replication"]["zones"]["inferred-1"][0], "a1");

    let yaml = to_helm_yaml(&p).unwrap();
    assert!(yaml.starts_with("replication:\n"), "{yaml}");
    let reparsed: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(reparsed, values);

    let text = p.to_string();
    assert!(text.contains("store ledger (galera)"), "{text}");
    assert!(
        text.contains("evs.suspect_timeout = PT5S (documented default"),
        "{text}"
    );
    assert!(
        text.contains("capacity (pool db, demand 16000, each zone ≥ 66 %)"),
        "{text}"
    );

    // The plan survives a round trip through YAML (the coordinator keeps the previous plan for drift).
    let stored = serde_norway::to_string(&p).unwrap();
    let back: Plan = serde_norway::from_str(&stored).unwrap();
    assert_eq!(back, p);
}

#[test]
fn drift_reports_budget_breaches() {
    let yaml = "galera:\n  - name: ledger\n    members: [a1, a2, b1, b2]\n    commit_budget: 2ms\n";
    let file = parse_stores(yaml).unwrap();
    let before = plan(&file, &[], &three_zones());
    assert_eq!(before.store("ledger").unwrap().synchronous().len(), 4);
    assert!(drift(&before, &before).is_empty());

    // Zone b drifts to 3 ms from zone a: b1 and b2 no longer fit.
    let slower = three_zones_with(|p, q| match (p, q) {
        (p, q) if p == q => (100, 120),
        ('a', 'b') => (2_500, 3_000),
        _ => (5_000, 6_000),
    });
    let after = plan(&file, &[], &slower);
    let events = drift(&before, &after);
    let lost: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            DriftEvent::MemberLostSync {
                member,
                latency,
                budget,
                ..
            } => {
                assert_eq!(*budget, Nanos::from_millis(2));
                assert_eq!(*latency, Some(us(3_000)));
                Some(member.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(lost, ["b1", "b2"]);
    assert!(
        events
            .iter()
            .all(|e| e.store() == "ledger" && e.kind() == "member_lost_sync")
    );

    // Everything drifts beyond the budget: the commit is over budget, first as a new breach, then a persisting one.
    let far = three_zones_with(|_, _| (2_500, 3_000));
    let broken = plan(&file, &[], &far);
    let events = drift(&after, &broken);
    assert!(events.contains(&DriftEvent::CommitOverBudget {
        store: "ledger".into(),
        commit: None,
        budget: Nanos::from_millis(2),
        new: true
    }));
    assert!(events.iter().any(|e| e.kind() == "member_lost_sync"));
    let again = drift(&broken, &broken);
    assert_eq!(again.len(), 1);
    assert!(matches!(&again[0], DriftEvent::CommitOverBudget { new: false, .. }));
    assert!(
        again[0].to_string().contains("over the 2 ms budget (still)"),
        "{}",
        again[0]
    );
}
