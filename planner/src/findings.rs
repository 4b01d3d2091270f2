//! Typed findings: contradictions in the zone picture, gaps in the measurements and risks in a plan.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::matrix::NodeId;
use crate::units::Nanos;

/// How much a finding matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing; nothing is wrong.
    Info,
    /// The plan or the zone picture may be wrong, or a guarantee does not hold.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
        })
    }
}

/// Something the planner noticed. Each variant's `Display` says what is wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// Two nodes declared in the same zone are further apart (p50) than a zone may be.
    DeclaredZoneContradiction {
        /// The declared zone.
        zone: String,
        /// One node of the worst pair.
        a: NodeId,
        /// The other node of the worst pair.
        b: NodeId,
        /// Their median RTT.
        p50: Nanos,
        /// The bound (default 2 ms).
        bound: Nanos,
        /// How many declared pairs of the zone exceed the bound.
        pairs_over: u64,
    },
    /// A zone containing inferred or adopted members has members further apart (p50) than a zone may
    /// be: single-linkage clustering chained sites together, or an adopted node is far from its zone.
    ZoneTooWide {
        /// The zone.
        zone: String,
        /// One node of the worst pair.
        a: NodeId,
        /// The other node of the worst pair.
        b: NodeId,
        /// Their median RTT.
        p50: Nanos,
        /// The bound (default 2 ms).
        bound: Nanos,
        /// How many pairs exceed the bound.
        pairs_over: u64,
    },
    /// Two declared zones have nodes closer than the clustering threshold: they may share a site, and
    /// losing one may lose both.
    DeclaredZonesClose {
        /// One zone.
        zone_a: String,
        /// The other zone.
        zone_b: String,
        /// A node of `zone_a`.
        a: NodeId,
        /// A node of `zone_b`.
        b: NodeId,
        /// Their median RTT.
        p50: Nanos,
        /// The clustering threshold.
        threshold: Nanos,
    },
    /// Pairs inside one zone that have no measurement.
    UnmeasuredInZone {
        /// The zone.
        zone: String,
        /// Number of unmeasured pairs.
        pairs: u64,
        /// Up to five of them.
        examples: Vec<(NodeId, NodeId)>,
    },
    /// Two zones with no measured pair between them.
    UnmeasuredZonePair {
        /// One zone.
        zone_a: String,
        /// The other zone.
        zone_b: String,
    },
    /// A node without a declared zone and without any measurement: its zone is unknown.
    UnmeasuredNode {
        /// The node.
        node: NodeId,
    },
    /// A node counted by a capacity check whose capacity the inventory does not know (counted as 0).
    UnknownCapacity {
        /// The node.
        node: NodeId,
    },
    /// A store asks for more members than its pool has.
    NotEnoughMembers {
        /// The store.
        store: String,
        /// Members wanted.
        wanted: u32,
        /// Members available.
        available: u32,
    },
    /// A store names a node that is neither in the node facts nor in the matrix.
    UnknownMember {
        /// The store.
        store: String,
        /// The node.
        node: NodeId,
    },
    /// A member pair with neither a measurement nor a zone-pair estimate; the pair is treated as over budget.
    UnknownLink {
        /// The store.
        store: String,
        /// One member.
        a: NodeId,
        /// The other member.
        b: NodeId,
    },
    /// A member pair planned from the worst measured pair between their zones, not from its own measurement.
    EstimatedLink {
        /// The store.
        store: String,
        /// One member.
        a: NodeId,
        /// The other member.
        b: NodeId,
    },
    /// A member link losing 1 % or more: at the 99th percentile a commit waits for a TCP retransmission
    /// (at least 200 ms), which the plan adds to the link's p99.
    LossyLink {
        /// The store.
        store: String,
        /// One member.
        a: NodeId,
        /// The other member.
        b: NodeId,
        /// Loss in parts per million.
        loss_ppm: u32,
    },
    /// The planned synchronous set still misses the commit budget.
    OverBudget {
        /// The store.
        store: String,
        /// Predicted commit latency (`None` when unknown).
        commit: Option<Nanos>,
        /// The budget.
        budget: Nanos,
    },
    /// A Galera cluster with fewer than three synchronous members cannot keep quorum through a failure.
    GaleraQuorum {
        /// The store.
        store: String,
        /// Synchronous members.
        synchronous: u32,
    },
    /// Losing one zone leaves at most half of the synchronous Galera members: the rest lose quorum
    /// (the 66 % rule fails for the database itself).
    GaleraZoneLoss {
        /// The store.
        store: String,
        /// The zone whose loss breaks quorum.
        zone: String,
        /// Synchronous members.
        synchronous: u32,
        /// Members left after losing the zone.
        remaining: u32,
    },
    /// Fewer semi-sync replicas fit the budget than the source waits for.
    SemiSyncTooFewAcks {
        /// The store.
        store: String,
        /// Replicas within budget.
        eligible: u32,
        /// `rpl_semi_sync_source_wait_for_replica_count`.
        wait_for: u32,
    },
    /// Fewer Kafka brokers are synchronous than a partition has replicas: some replicas will sit on
    /// asynchronous brokers, stay in the ISR (their lag is far below `replica.lag.time.max.ms`) and make
    /// `acks=all` wait for them.
    KafkaTooFewSynchronous {
        /// The store.
        store: String,
        /// Synchronous brokers.
        synchronous: u32,
        /// The replication factor.
        replication_factor: u32,
    },
    /// `acks=all` waits for every in-sync replica; with all declared brokers in the ISR a produce waits
    /// longer than the budget even though `min.insync.replicas` followers would fit.
    KafkaFullIsrOverBudget {
        /// The store.
        store: String,
        /// Slowest follower in a full ISR.
        full_isr: Nanos,
        /// The budget.
        budget: Nanos,
    },
}

impl Finding {
    /// How much this finding matters.
    pub fn severity(&self) -> Severity {
        match self {
            Finding::DeclaredZonesClose { .. } | Finding::EstimatedLink { .. } => Severity::Info,
            _ => Severity::Warning,
        }
    }

    /// A stable snake_case name of the variant (for metrics labels).
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::DeclaredZoneContradiction { .. } => "declared_zone_contradiction",
            Finding::ZoneTooWide { .. } => "zone_too_wide",
            Finding::DeclaredZonesClose { .. } => "declared_zones_close",
            Finding::UnmeasuredInZone { .. } => "unmeasured_in_zone",
            Finding::UnmeasuredZonePair { .. } => "unmeasured_zone_pair",
            Finding::UnmeasuredNode { .. } => "unmeasured_node",
            Finding::UnknownCapacity { .. } => "unknown_capacity",
            Finding::NotEnoughMembers { .. } => "not_enough_members",
            Finding::UnknownMember { .. } => "unknown_member",
            Finding::UnknownLink { .. } => "unknown_link",
            Finding::EstimatedLink { .. } => "estimated_link",
            Finding::LossyLink { .. } => "lossy_link",
            Finding::OverBudget { .. } => "over_budget",
            Finding::GaleraQuorum { .. } => "galera_quorum",
            Finding::GaleraZoneLoss { .. } => "galera_zone_loss",
            Finding::SemiSyncTooFewAcks { .. } => "semi_sync_too_few_acks",
            Finding::KafkaTooFewSynchronous { .. } => "kafka_too_few_synchronous",
            Finding::KafkaFullIsrOverBudget { .. } => "kafka_full_isr_over_budget",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::DeclaredZoneContradiction {
                zone,
                a,
                b,
                p50,
                bound,
                pairs_over,
            } => write!(
                f,
                "{a} and {b} are both declared in zone {zone} but {p50} apart (p50), over the {bound} a zone \
                 may span ({pairs_over} pair(s) over); check the zone metadata of these nodes"
            ),
            Finding::ZoneTooWide {
                zone,
                a,
                b,
                p50,
                bound,
                pairs_over,
            } => write!(
                f,
                "zone {zone} has members {a} and {b} {p50} apart (p50), over {bound} ({pairs_over} pair(s) over); \
                 clustering chained distant sites: declare the zones or lower the clustering threshold"
            ),
            Finding::DeclaredZonesClose {
                zone_a,
                zone_b,
                a,
                b,
                p50,
                threshold,
            } => write!(
                f,
                "declared zones {zone_a} and {zone_b} are close: {a}–{b} is {p50} (p50), under {threshold}; \
                 they may share a site, so losing one may lose both"
            ),
            Finding::UnmeasuredInZone { zone, pairs, examples } => {
                let ex: Vec<String> = examples.iter().map(|(a, b)| format!("{a}–{b}")).collect();
                write!(
                    f,
                    "{pairs} pair(s) inside zone {zone} are unmeasured (e.g. {}); check that the probers of \
                     these nodes run and can reach each other",
                    ex.join(", ")
                )
            }
            Finding::UnmeasuredZonePair { zone_a, zone_b } => write!(
                f,
                "no pair between zones {zone_a} and {zone_b} is measured; plans across them are unknown until \
                 the probers sample that zone pair"
            ),
            Finding::UnmeasuredNode { node } => write!(
                f,
                "{node} has no declared zone and no measurement, so its zone is unknown; declare it or wait \
                 for its prober to report"
            ),
            Finding::UnknownCapacity { node } => {
                write!(
                    f,
                    "capacity of {node} is unknown and counted as 0; refresh its inventory"
                )
            }
            Finding::NotEnoughMembers {
                store,
                wanted,
                available,
            } => write!(
                f,
                "store {store} wants {wanted} member(s) but only {available} are available; add nodes to the \
                 pool or lower the count"
            ),
            Finding::UnknownMember { store, node } => write!(
                f,
                "store {store} names {node}, which is neither in the inventory nor in the latency matrix; fix \
                 the name in the store file"
            ),
            Finding::UnknownLink { store, a, b } => write!(
                f,
                "store {store}: {a}–{b} is neither measured nor estimable from its zones, so it is treated as \
                 over budget; make sure the probers measure this pair"
            ),
            Finding::EstimatedLink { store, a, b } => write!(
                f,
                "store {store}: {a}–{b} is unmeasured and planned from the worst measured pair between their zones"
            ),
            Finding::LossyLink { store, a, b, loss_ppm } => write!(
                f,
                "store {store}: {a}–{b} loses {}.{:02} % of probes; at the 99th percentile a commit waits for \
                 a TCP retransmission (≥ 200 ms); fix the link before running synchronous replication over it",
                loss_ppm / 10_000,
                (loss_ppm % 10_000) / 100
            ),
            Finding::OverBudget { store, commit, budget } => match commit {
                Some(c) => write!(
                    f,
                    "store {store}: predicted commit {c} does not fit the {budget} budget; move members closer, \
                     raise max_dop or relax the budget"
                ),
                None => write!(
                    f,
                    "store {store}: no synchronous set meets the {budget} budget (member latencies are over it or \
                     unknown); move members closer, raise max_dop or relax the budget"
                ),
            },
            Finding::GaleraQuorum { store, synchronous } => write!(
                f,
                "store {store}: only {synchronous} synchronous Galera member(s); Galera needs at least three to \
                 keep quorum through a failure (add a member or a garbd arbitrator within budget)"
            ),
            Finding::GaleraZoneLoss {
                store,
                zone,
                synchronous,
                remaining,
            } => write!(
                f,
                "store {store}: losing zone {zone} leaves {remaining} of {synchronous} synchronous Galera members, \
                 no majority, so the cluster stops; spread members over more zones within budget or add a garbd \
                 arbitrator in another zone"
            ),
            Finding::SemiSyncTooFewAcks {
                store,
                eligible,
                wait_for,
            } => write!(
                f,
                "store {store}: only {eligible} replica(s) fit the budget but the source waits for {wait_for}; \
                 every commit will exceed the budget (or time out to asynchronous)"
            ),
            Finding::KafkaTooFewSynchronous {
                store,
                synchronous,
                replication_factor,
            } => write!(
                f,
                "store {store}: only {synchronous} broker(s) fit the budget but partitions have \
                 {replication_factor} replicas; replicas on the far brokers stay in the ISR and acks=all waits \
                 for them (move those brokers to a mirrored cluster or lower the replication factor)"
            ),
            Finding::KafkaFullIsrOverBudget {
                store,
                full_isr,
                budget,
            } => write!(
                f,
                "store {store}: with every declared broker in the ISR, acks=all waits {full_isr}, over the \
                 {budget} budget"
            ),
        }
    }
}
