//! Planning: from the store file, the node facts and the latency matrix to a [`Plan`].
//!
//! # Models (all on the links' p99 RTT)
//!
//! A link's *commit latency* is its measured p99, plus one minimum TCP retransmission timeout (200 ms)
//! when it loses 1 % or more (then at least one round trip in a hundred waits for a retransmit). A
//! member pair without a measurement is planned from the worst measured pair between the two members'
//! zones (the probers sample every zone pair); without that either, the pair is unknown and treated
//! as over budget. A latency *fits* a budget when it is strictly below it (see [`crate::physics::fits`]).
//!
//! * **Galera / Percona XtraDB** (multi-master, certification by every member): a commit waits for the
//!   slowest member, and any member may originate it, so the predicted commit latency is the largest
//!   pairwise latency among the members. The synchronous set is chosen greedily: while some pair does
//!   not fit, the member with the most such pairs (then the slowest worst pair, then the largest id)
//!   is moved out of the cluster, to be fed by asynchronous replication. The heuristic keeps the
//!   well-connected majority; it is not an exact maximum clique. Fewer than two synchronous members
//!   means no synchronous replication at all (every member asynchronous, over budget); fewer than
//!   three, or a zone holding half or more of them, is reported as a quorum risk.
//! * **MySQL semi-sync**: the source waits for `k` acknowledgements, so the commit latency is the
//!   *k-th fastest* replica's latency from the source. Replicas that fit are synchronous candidates;
//!   the others should run with `rpl_semi_sync_replica_enabled=OFF`. Without a declared source the
//!   member with the fastest k-th acknowledgement is chosen.
//! * **Kafka** (`acks=all`): the predicted commit latency is the slowest follower *needed* for
//!   `min.insync.replicas`: for each broker as leader, take the `replication_factor − 1` slowest other
//!   brokers (the worst placement of a partition's replicas), and among those the
//!   `(min.insync.replicas − 1)`-th fastest; the maximum over leaders. Brokers are split into a
//!   synchronous set as for Galera, since any broker may lead and `acks=all` waits for every in-sync
//!   replica; the full-ISR latency (slowest follower) is reported too.
//!
//! From the predicted latency: the margin to the budget, the maximum serial rate
//! `max_dop / (txn_time + commit)`, the longest fibre link the budget allows, and the timeouts of
//! [`crate::timeouts`].
//!
//! Members chosen from a pool (`pool` + a count) are picked one at a time, preferring in order: a
//! node that keeps the store within budget (Galera and Kafka: fits every member chosen so far;
//! semi-sync: fits the source, until `k` replicas do, after which only spread counts); a zone with
//! fewer members chosen so far; a more central zone (smallest sum of worst p99 to the pool's other
//! zones); the smaller node id. So members spread over zones as far as the budget allows, and a zone
//! the budget cannot reach only receives members the budget cannot place elsewhere. A declared
//! semi-sync source is chosen first; otherwise the first pick acts as source while choosing, and the
//! source is then chosen among the members as described above.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::findings::Finding;
use crate::matrix::{LatencyMatrix, LinkStats, Links, NodeFacts, NodeId};
use crate::physics::{carries_share, fits, margin, max_link_distance_m, max_serial_rate};
use crate::settings::PlanConfig;
use crate::spec::{
    BudgetSource, GaleraSpec, KafkaSpec, MemberSelection, Production, SemiSyncSpec, StoreCommon, StoreFile,
};
use crate::timeouts::{self, P99_LOSS_PPM, TimeoutAdvice, delivery_bound, effective_p99};
use crate::units::{Nanos, SignedNanos};
use crate::zones::{ZoneMap, ZoneReport, infer_with, universe};

/// The kind of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// Galera / Percona XtraDB multi-master.
    Galera,
    /// MySQL semi-synchronous replication.
    SemiSync,
    /// Kafka with `acks=all`.
    Kafka,
}

impl StoreKind {
    /// The snake_case name used in the store file and the helm values.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Galera => "galera",
            StoreKind::SemiSync => "semi_sync",
            StoreKind::Kafka => "kafka",
        }
    }
}

/// A member's role in its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A Galera cluster member.
    Member,
    /// The semi-sync source.
    Source,
    /// A semi-sync replica.
    Replica,
    /// A Kafka broker.
    Broker,
}

/// Whether a member replicates synchronously.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Within budget: part of the synchronous set.
    Synchronous,
    /// Over budget (or unknown): replicate to it asynchronously.
    Asynchronous,
}

/// One member's part in the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPlan {
    /// The node.
    pub node: NodeId,
    /// Its zone, if known.
    pub zone: Option<String>,
    /// Its role.
    pub role: Role,
    /// Synchronous or asynchronous.
    pub mode: Mode,
    /// The latency that decided its mode: for Galera and Kafka its worst commit latency to the
    /// synchronous members (other than itself); for a semi-sync replica its latency to the source;
    /// `None` for the source, or when unknown.
    pub latency: Option<Nanos>,
}

/// Kind-specific parts of a store plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoreDetail {
    /// Galera has nothing beyond the common fields.
    Galera,
    /// Semi-sync.
    SemiSync {
        /// The source (declared or chosen); `None` without members.
        source: Option<NodeId>,
        /// Acknowledgements the source waits for.
        wait_for: u32,
    },
    /// Kafka.
    Kafka {
        /// Replicas per partition.
        replication_factor: u32,
        /// `min.insync.replicas`.
        min_insync_replicas: u32,
        /// Slowest follower when every declared broker is in the ISR (what `acks=all` waits for when
        /// nothing has fallen out of the ISR).
        full_isr: Option<Nanos>,
    },
}

/// The plan for one store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorePlan {
    /// The store's name.
    pub name: String,
    /// The commit budget.
    pub budget: Nanos,
    /// Where the budget came from.
    pub budget_source: BudgetSource,
    /// Execution time per transaction.
    pub txn_time: Nanos,
    /// Parallel streams.
    pub max_dop: u32,
    /// Predicted commit latency if every selected member were synchronous (`None` when unknown).
    pub commit_as_declared: Option<Nanos>,
    /// Predicted commit latency of the planned synchronous set (`None` when unknown or when no
    /// synchronous replication is possible).
    pub commit: Option<Nanos>,
    /// `budget − commit`.
    pub margin: Option<SignedNanos>,
    /// Whether the planned synchronous set meets the budget with a positive margin.
    pub fits_budget: bool,
    /// Maximum serial transactions per second with the planned commit latency.
    pub max_serial_rate: Option<u64>,
    /// Longest fibre link (metres) whose round trip fits the budget.
    pub max_link_distance_m: Option<u64>,
    /// The members.
    pub members: Vec<MemberPlan>,
    /// Recommended timeouts.
    pub timeouts: Vec<TimeoutAdvice>,
    /// Kind-specific parts.
    pub detail: StoreDetail,
}

impl StorePlan {
    /// The store's kind.
    pub fn kind(&self) -> StoreKind {
        match self.detail {
            StoreDetail::Galera => StoreKind::Galera,
            StoreDetail::SemiSync { .. } => StoreKind::SemiSync,
            StoreDetail::Kafka { .. } => StoreKind::Kafka,
        }
    }

    /// The member plan of `node`, if it is a member.
    pub fn member(&self, node: &str) -> Option<&MemberPlan> {
        self.members.iter().find(|m| m.node == node)
    }

    /// Nodes planned synchronous, in member order.
    pub fn synchronous(&self) -> Vec<&str> {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Synchronous)
            .map(|m| m.node.as_str())
            .collect()
    }

    /// Nodes planned asynchronous, in member order.
    pub fn asynchronous(&self) -> Vec<&str> {
        self.members
            .iter()
            .filter(|m| m.mode == Mode::Asynchronous)
            .map(|m| m.node.as_str())
            .collect()
    }
}

/// Capacity of one zone against one demand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCapacity {
    /// The zone.
    pub zone: String,
    /// Summed capacity of its counted nodes.
    pub capacity: u64,
    /// `capacity × 100 / demand`, rounded down.
    pub share_percent: u64,
    /// Whether the zone carries the required share.
    pub passes: bool,
}

/// The per-zone capacity check of one demand entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityCheck {
    /// The pool counted (`None`: every node).
    pub pool: Option<String>,
    /// The demand.
    pub demand: u64,
    /// Required share per zone, percent.
    pub min_share_percent: u32,
    /// Each production zone.
    pub zones: Vec<ZoneCapacity>,
    /// Every zone carries its share.
    pub passes: bool,
    /// Losing any single zone still leaves at least the whole demand.
    pub survives_zone_loss: bool,
}

/// The whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Zones per node.
    pub zones: ZoneMap,
    /// Everything noticed, zone findings first.
    pub findings: Vec<Finding>,
    /// One plan per store, in file order (galera, semi_sync, kafka).
    pub stores: Vec<StorePlan>,
    /// One check per production demand.
    pub capacity: Vec<CapacityCheck>,
}

impl Plan {
    /// The plan of the store called `name`.
    pub fn store(&self, name: &str) -> Option<&StorePlan> {
        self.stores.iter().find(|s| s.name == name)
    }
}

/// Plans every store of `file` from the node facts and the measured matrix. Never fails: problems
/// become [`Finding`]s.
pub fn plan(file: &StoreFile, nodes: &[NodeFacts], matrix: &LatencyMatrix) -> Plan {
    let config = &file.settings;
    let universe = universe(nodes, matrix);
    let links = Links::new(&universe, matrix);
    let ZoneReport { zones, mut findings } = infer_with(nodes, &links, config);
    let ctx = Ctx::new(&links, &zones, nodes, config);
    let mut stores = Vec::new();
    for spec in &file.galera {
        stores.push(ctx.galera(spec, &mut findings));
    }
    for spec in &file.semi_sync {
        stores.push(ctx.semi_sync(spec, &mut findings));
    }
    for spec in &file.kafka {
        stores.push(ctx.kafka(spec, &mut findings));
    }
    let capacity = file
        .production
        .as_ref()
        .map(|p| capacity_checks(p, &zones, nodes, &mut findings))
        .unwrap_or_default();
    let mut unique: Vec<Finding> = Vec::with_capacity(findings.len());
    for f in findings {
        if !unique.contains(&f) {
            unique.push(f);
        }
    }
    tracing::debug!(
        stores = stores.len(),
        findings = unique.len(),
        zones = zones.members().len(),
        "replication plan computed"
    );
    Plan {
        zones,
        findings: unique,
        stores,
        capacity,
    }
}

/// What a pool member must fit while members are chosen.
#[derive(Clone, Copy)]
enum Fit {
    /// Every pair of members (Galera, Kafka).
    AllPairs(Nanos),
    /// The first member (the source) to `k` replicas (semi-sync); after that, zone spread only.
    FromFirst { budget: Nanos, k: usize },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Measured,
    Estimated,
}

type Cell = Option<(LinkStats, Via)>;

/// Pairwise links among a store's members.
struct Table {
    cells: Vec<Vec<Cell>>,
}

impl Table {
    fn stats(&self, i: usize, j: usize) -> Option<LinkStats> {
        self.cells[i][j].map(|(s, _)| s)
    }

    fn lat(&self, i: usize, j: usize) -> Option<Nanos> {
        self.stats(i, j).map(|s| effective_p99(&s))
    }
}

struct Ctx<'a> {
    links: &'a Links,
    zones: &'a ZoneMap,
    facts: BTreeMap<&'a str, &'a NodeFacts>,
    zone_worst: HashMap<(String, String), LinkStats>,
    miss_ppm: u32,
}

fn zone_key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

impl<'a> Ctx<'a> {
    fn new(links: &'a Links, zones: &'a ZoneMap, nodes: &'a [NodeFacts], config: &PlanConfig) -> Ctx<'a> {
        let mut zone_worst: HashMap<(String, String), LinkStats> = HashMap::new();
        for (a, b, s) in links.measured_pairs() {
            let (Some(za), Some(zb)) = (zones.zone_of(&links.ids[a]), zones.zone_of(&links.ids[b])) else {
                continue;
            };
            zone_worst
                .entry(zone_key(za, zb))
                .and_modify(|w| *w = w.merge(s))
                .or_insert(s);
        }
        Ctx {
            links,
            zones,
            facts: nodes.iter().map(|n| (n.id.as_str(), n)).collect(),
            zone_worst,
            miss_ppm: config.timeout_miss_ppm,
        }
    }

    fn link(&self, a: &str, b: &str) -> Cell {
        if let Some(s) = self.links.get_by_id(a, b) {
            return Some((s, Via::Measured));
        }
        let (za, zb) = (self.zones.zone_of(a)?, self.zones.zone_of(b)?);
        self.zone_worst.get(&zone_key(za, zb)).map(|s| (*s, Via::Estimated))
    }

    fn table(&self, members: &[NodeId]) -> Table {
        let cells = members
            .iter()
            .enumerate()
            .map(|(i, a)| {
                members
                    .iter()
                    .enumerate()
                    .map(|(j, b)| if i == j { None } else { self.link(a, b) })
                    .collect()
            })
            .collect();
        Table { cells }
    }

    /// Records unknown, estimated and lossy links among the given pairs.
    fn note_links(
        &self,
        store: &str,
        members: &[NodeId],
        table: &Table,
        pairs: &[(usize, usize)],
        out: &mut Vec<Finding>,
    ) {
        for &(i, j) in pairs {
            let (a, b) = (members[i].clone(), members[j].clone());
            match table.cells[i][j] {
                None => out.push(Finding::UnknownLink {
                    store: store.to_string(),
                    a,
                    b,
                }),
                Some((s, via)) => {
                    if via == Via::Estimated {
                        out.push(Finding::EstimatedLink {
                            store: store.to_string(),
                            a: a.clone(),
                            b: b.clone(),
                        });
                    }
                    if s.loss_ppm >= P99_LOSS_PPM {
                        out.push(Finding::LossyLink {
                            store: store.to_string(),
                            a,
                            b,
                            loss_ppm: s.loss_ppm,
                        });
                    }
                }
            }
        }
    }

    fn known(&self, node: &str) -> bool {
        self.links.index_of(node).is_some()
    }

    /// The members of a store; see the module docs for how a pool is spread over zones.
    /// The members of a store; see the module docs for how members are chosen from a pool.
    fn select(
        &self,
        store: &str,
        selection: &MemberSelection,
        must: Option<&str>,
        fit: Fit,
        out: &mut Vec<Finding>,
    ) -> Vec<NodeId> {
        let (pool, count) = match selection {
            MemberSelection::Explicit(list) => {
                let mut members = Vec::new();
                for node in list {
                    if self.known(node) {
                        members.push(node.clone());
                    } else {
                        out.push(Finding::UnknownMember {
                            store: store.to_string(),
                            node: node.clone(),
                        });
                    }
                }
                return members;
            }
            MemberSelection::Pool { pool, count } => (pool, count),
        };
        let mut chosen: Vec<NodeId> = Vec::new();
        if let Some(src) = must {
            if self.known(src) {
                chosen.push(src.to_string());
            } else {
                out.push(Finding::UnknownMember {
                    store: store.to_string(),
                    node: src.to_string(),
                });
            }
        }
        let mut remaining: Vec<&str> = self
            .facts
            .values()
            .filter(|f| f.pool.as_deref() == Some(pool.as_str()) && !chosen.contains(&f.id))
            .map(|f| f.id.as_str())
            .collect();
        let available = remaining.len() + chosen.len();
        let wanted = count.map_or(available, |c| usize::try_from(c).unwrap_or(usize::MAX));
        if available < wanted {
            out.push(Finding::NotEnoughMembers {
                store: store.to_string(),
                wanted: u32::try_from(wanted).unwrap_or(u32::MAX),
                available: u32::try_from(available).unwrap_or(u32::MAX),
            });
        }
        // Zone rank: most central first (smallest sum, then largest, of worst p99 to the pool's other zones).
        let pool_zones: BTreeSet<&str> = remaining
            .iter()
            .copied()
            .chain(chosen.iter().map(String::as_str))
            .filter_map(|n| self.zones.zone_of(n))
            .collect();
        let mut ranked: Vec<(Nanos, Nanos, &str)> = pool_zones
            .iter()
            .map(|&z| {
                let to_others: Vec<Nanos> = pool_zones
                    .iter()
                    .filter(|&&o| o != z)
                    .map(|o| self.zone_worst.get(&zone_key(z, o)).map_or(Nanos::MAX, |s| s.p99))
                    .collect();
                let sum = to_others.iter().fold(Nanos::ZERO, |a, b| a.saturating_add(*b));
                (sum, to_others.iter().copied().max().unwrap_or(Nanos::ZERO), z)
            })
            .collect();
        ranked.sort();
        let rank = |node: &str| -> usize {
            self.zones
                .zone_of(node)
                .and_then(|z| ranked.iter().position(|r| r.2 == z))
                .unwrap_or(usize::MAX)
        };
        let link_fits =
            |a: &str, b: &str, budget: Nanos| self.link(a, b).is_some_and(|(s, _)| fits(budget, effective_p99(&s)));
        while chosen.len() < wanted && !remaining.is_empty() {
            let fits_now = |cand: &str| match fit {
                Fit::AllPairs(budget) => chosen.iter().all(|c| link_fits(c, cand, budget)),
                Fit::FromFirst { budget, k } => match chosen.split_first() {
                    None => true,
                    Some((src, replicas)) => {
                        let acking = replicas.iter().filter(|r| link_fits(src, r, budget)).count();
                        acking >= k || link_fits(src, cand, budget)
                    }
                },
            };
            let zone_count = |cand: &str| {
                let z = self.zones.zone_of(cand);
                chosen
                    .iter()
                    .filter(|c| z.is_some() && self.zones.zone_of(c) == z)
                    .count()
            };
            let best = remaining
                .iter()
                .enumerate()
                .min_by_key(|&(_, &cand)| (!fits_now(cand), zone_count(cand), rank(cand), cand))
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            chosen.push(remaining.remove(i).to_string());
        }
        chosen
    }

    fn zone(&self, node: &str) -> Option<String> {
        self.zones.zone_of(node).map(str::to_string)
    }

    /// The largest delivery bound among the given pairs (zero without pairs).
    fn bound(&self, table: &Table, pairs: &[(usize, usize)]) -> Nanos {
        pairs
            .iter()
            .filter_map(|&(i, j)| table.stats(i, j))
            .map(|s| delivery_bound(&s, self.miss_ppm))
            .max()
            .unwrap_or(Nanos::ZERO)
    }

    fn galera(&self, spec: &GaleraSpec, out: &mut Vec<Finding>) -> StorePlan {
        let c = &spec.common;
        let members = self.select(&c.name, &c.members, None, Fit::AllPairs(c.budget), out);
        let table = self.table(&members);
        let n = members.len();
        let mut sync = greedy_sync(&members, &table, c.budget);
        if sync.iter().filter(|&&s| s).count() < 2 {
            // A single node replicates to nobody synchronously: every member is asynchronous.
            sync = vec![false; n];
        }
        let all: Vec<usize> = (0..n).collect();
        let core: Vec<usize> = (0..n).filter(|&i| sync[i]).collect();
        self.note_links(&c.name, &members, &table, &pairs(&all), out);
        let commit_as_declared = diameter(&table, &all);
        let commit = if core.len() >= 2 { diameter(&table, &core) } else { None };
        let fits_budget = core.len() >= 2 && commit.is_some_and(|l| fits(c.budget, l));
        let synchronous = u32::try_from(core.len()).unwrap_or(u32::MAX);
        if core.len() < 3 {
            out.push(Finding::GaleraQuorum {
                store: c.name.clone(),
                synchronous,
            });
        } else {
            let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
            for &i in &core {
                if let Some(z) = self.zone(&members[i]) {
                    *per_zone.entry(z).or_default() += 1;
                }
            }
            for (zone, here) in per_zone {
                let remaining = core.len() - here;
                if remaining * 2 <= core.len() {
                    out.push(Finding::GaleraZoneLoss {
                        store: c.name.clone(),
                        zone,
                        synchronous,
                        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                    });
                }
            }
        }
        let members_plan = self.members_vs_core(&members, &table, &core, &sync, Role::Member);
        let timeouts = timeouts::galera(self.bound(&table, &pairs(&core)));
        finish(
            c,
            Outcome {
                commit_as_declared,
                commit,
                fits_budget,
            },
            members_plan,
            timeouts,
            StoreDetail::Galera,
            out,
        )
    }

    fn semi_sync(&self, spec: &SemiSyncSpec, out: &mut Vec<Finding>) -> StorePlan {
        let c = &spec.common;
        let k = usize::try_from(spec.wait_for).unwrap_or(usize::MAX).max(1);
        let members = self.select(
            &c.name,
            &c.members,
            spec.source.as_deref(),
            Fit::FromFirst { budget: c.budget, k },
            out,
        );
        let table = self.table(&members);
        let n = members.len();
        // The k-th fastest acknowledgement if `s` were the source (unknown links count as infinitely slow).
        let kth = |s: usize| -> Nanos {
            let mut l: Vec<Nanos> = (0..n)
                .filter(|&r| r != s)
                .map(|r| table.lat(s, r).unwrap_or(Nanos::MAX))
                .collect();
            l.sort();
            l.get(k - 1).copied().unwrap_or(Nanos::MAX)
        };
        let source = match spec.source.as_deref().and_then(|s| members.iter().position(|m| m == s)) {
            Some(i) => Some(i),
            None => (0..n).min_by(|&a, &b| kth(a).cmp(&kth(b)).then(members[a].cmp(&members[b]))),
        };
        let Some(src) = source.filter(|_| n >= 2) else {
            out.push(Finding::SemiSyncTooFewAcks {
                store: c.name.clone(),
                eligible: 0,
                wait_for: spec.wait_for,
            });
            let members_plan = members
                .iter()
                .map(|m| MemberPlan {
                    node: m.clone(),
                    zone: self.zone(m),
                    role: Role::Source,
                    mode: Mode::Synchronous,
                    latency: None,
                })
                .collect();
            let detail = StoreDetail::SemiSync {
                source: members.first().cloned(),
                wait_for: spec.wait_for,
            };
            return finish(
                c,
                Outcome {
                    commit_as_declared: None,
                    commit: None,
                    fits_budget: false,
                },
                members_plan,
                vec![timeouts::semi_sync(Nanos::ZERO)],
                detail,
                out,
            );
        };
        let replicas: Vec<usize> = (0..n).filter(|&r| r != src).collect();
        self.note_links(
            &c.name,
            &members,
            &table,
            &replicas.iter().map(|&r| (src, r)).collect::<Vec<_>>(),
            out,
        );
        let mut known: Vec<(Nanos, usize)> = replicas.iter().filter_map(|&r| Some((table.lat(src, r)?, r))).collect();
        known.sort();
        let eligible: Vec<(Nanos, usize)> = known.iter().copied().filter(|&(l, _)| fits(c.budget, l)).collect();
        let commit_as_declared = known.get(k - 1).map(|&(l, _)| l);
        let acking = if eligible.len() >= k {
            eligible.get(k - 1)
        } else {
            known.get(k - 1)
        };
        let commit = acking.map(|&(l, _)| l);
        let fits_budget = eligible.len() >= k && commit.is_some_and(|l| fits(c.budget, l));
        if eligible.len() < k {
            out.push(Finding::SemiSyncTooFewAcks {
                store: c.name.clone(),
                eligible: u32::try_from(eligible.len()).unwrap_or(u32::MAX),
                wait_for: spec.wait_for,
            });
        }
        let bound = acking.map_or(Nanos::ZERO, |&(_, r)| self.bound(&table, &[(src, r)]));
        let members_plan = (0..n)
            .map(|i| {
                let node = members[i].clone();
                let zone = self.zone(&node);
                if i == src {
                    return MemberPlan {
                        node,
                        zone,
                        role: Role::Source,
                        mode: Mode::Synchronous,
                        latency: None,
                    };
                }
                let latency = table.lat(src, i);
                let mode = if eligible.iter().any(|&(_, r)| r == i) {
                    Mode::Synchronous
                } else {
                    Mode::Asynchronous
                };
                MemberPlan {
                    node,
                    zone,
                    role: Role::Replica,
                    mode,
                    latency,
                }
            })
            .collect();
        let detail = StoreDetail::SemiSync {
            source: Some(members[src].clone()),
            wait_for: spec.wait_for,
        };
        finish(
            c,
            Outcome {
                commit_as_declared,
                commit,
                fits_budget,
            },
            members_plan,
            vec![timeouts::semi_sync(bound)],
            detail,
            out,
        )
    }

    fn kafka(&self, spec: &KafkaSpec, out: &mut Vec<Finding>) -> StorePlan {
        let c = &spec.common;
        let (rf, isr) = (spec.replication_factor, spec.min_insync_replicas);
        let members = self.select(&c.name, &c.members, None, Fit::AllPairs(c.budget), out);
        let n = members.len();
        let already_short = out
            .iter()
            .any(|f| matches!(f, Finding::NotEnoughMembers { store, .. } if *store == c.name));
        if n < usize::try_from(rf).unwrap_or(usize::MAX) && !already_short {
            out.push(Finding::NotEnoughMembers {
                store: c.name.clone(),
                wanted: rf,
                available: u32::try_from(n).unwrap_or(u32::MAX),
            });
        }
        let table = self.table(&members);
        let sync = greedy_sync(&members, &table, c.budget);
        let all: Vec<usize> = (0..n).collect();
        let core: Vec<usize> = (0..n).filter(|&i| sync[i]).collect();
        self.note_links(&c.name, &members, &table, &pairs(&all), out);
        let commit_as_declared = kafka_needed(&table, &all, rf, isr);
        let commit = kafka_needed(&table, &core, rf, isr);
        let full_isr = diameter(&table, &all);
        let enough = core.len() >= usize::try_from(isr).unwrap_or(usize::MAX);
        let fits_budget = enough && commit.is_some_and(|l| fits(c.budget, l));
        if core.len() < usize::try_from(rf).unwrap_or(usize::MAX) {
            out.push(Finding::KafkaTooFewSynchronous {
                store: c.name.clone(),
                synchronous: u32::try_from(core.len()).unwrap_or(u32::MAX),
                replication_factor: rf,
            });
        }
        if let Some(f) = full_isr
            && !fits(c.budget, f)
            && commit_as_declared.is_some_and(|l| fits(c.budget, l))
        {
            out.push(Finding::KafkaFullIsrOverBudget {
                store: c.name.clone(),
                full_isr: f,
                budget: c.budget,
            });
        }
        let members_plan = self.members_vs_core(&members, &table, &core, &sync, Role::Broker);
        let timeouts = vec![timeouts::kafka(self.bound(&table, &pairs(&core)))];
        let detail = StoreDetail::Kafka {
            replication_factor: rf,
            min_insync_replicas: isr,
            full_isr,
        };
        finish(
            c,
            Outcome {
                commit_as_declared,
                commit,
                fits_budget,
            },
            members_plan,
            timeouts,
            detail,
            out,
        )
    }

    /// Member plans where each member's latency is its worst latency to the synchronous core.
    fn members_vs_core(
        &self,
        members: &[NodeId],
        table: &Table,
        core: &[usize],
        sync: &[bool],
        role: Role,
    ) -> Vec<MemberPlan> {
        members
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let others: Vec<Option<Nanos>> = core.iter().filter(|&&j| j != i).map(|&j| table.lat(i, j)).collect();
                let latency = if others.is_empty() {
                    None
                } else {
                    others.iter().try_fold(Nanos::ZERO, |acc, l| l.map(|l| acc.max(l)))
                };
                let mode = if sync[i] { Mode::Synchronous } else { Mode::Asynchronous };
                MemberPlan {
                    node: node.clone(),
                    zone: self.zone(node),
                    role,
                    mode,
                    latency,
                }
            })
            .collect()
    }
}

/// The predicted commit latencies of a store.
struct Outcome {
    commit_as_declared: Option<Nanos>,
    commit: Option<Nanos>,
    fits_budget: bool,
}

fn finish(
    c: &StoreCommon,
    o: Outcome,
    members: Vec<MemberPlan>,
    timeouts: Vec<TimeoutAdvice>,
    detail: StoreDetail,
    out: &mut Vec<Finding>,
) -> StorePlan {
    let Outcome {
        commit_as_declared,
        commit,
        fits_budget,
    } = o;
    if !fits_budget {
        out.push(Finding::OverBudget {
            store: c.name.clone(),
            commit,
            budget: c.budget,
        });
    }
    StorePlan {
        name: c.name.clone(),
        budget: c.budget,
        budget_source: c.budget_source,
        txn_time: c.txn_time,
        max_dop: c.max_dop,
        commit_as_declared,
        commit,
        margin: commit.map(|l| margin(c.budget, l)),
        fits_budget,
        max_serial_rate: commit.and_then(|l| max_serial_rate(c.txn_time, l, c.max_dop)),
        max_link_distance_m: max_link_distance_m(c.budget),
        members,
        timeouts,
        detail,
    }
}

fn pairs(set: &[usize]) -> Vec<(usize, usize)> {
    set.iter()
        .enumerate()
        .flat_map(|(x, &i)| set[x + 1..].iter().map(move |&j| (i, j)))
        .collect()
}

/// The largest pairwise latency in `set`; zero for fewer than two members; `None` if a pair is unknown.
fn diameter(table: &Table, set: &[usize]) -> Option<Nanos> {
    pairs(set)
        .into_iter()
        .try_fold(Nanos::ZERO, |acc, (i, j)| table.lat(i, j).map(|l| acc.max(l)))
}

/// Greedy synchronous set: drop the member with the most over-budget (or unknown) pairs until none is left.
fn greedy_sync(members: &[NodeId], table: &Table, budget: Nanos) -> Vec<bool> {
    let n = members.len();
    let mut active = vec![true; n];
    loop {
        let mut worst: Option<(usize, Nanos, &str, usize)> = None;
        for i in (0..n).filter(|&i| active[i]) {
            let conflicts: Vec<Nanos> = (0..n)
                .filter(|&j| j != i && active[j])
                .filter_map(|j| match table.lat(i, j) {
                    Some(l) if fits(budget, l) => None,
                    other => Some(other.unwrap_or(Nanos::MAX)),
                })
                .collect();
            if conflicts.is_empty() {
                continue;
            }
            let key = (
                conflicts.len(),
                conflicts.iter().copied().max().unwrap_or(Nanos::MAX),
                members[i].as_str(),
                i,
            );
            if worst.is_none_or(|w| (key.0, key.1, key.2) > (w.0, w.1, w.2)) {
                worst = Some(key);
            }
        }
        match worst {
            Some((_, _, _, i)) => active[i] = false,
            None => return active,
        }
    }
}

/// Kafka's "slowest follower needed for min.insync.replicas", worst over leaders in `set`.
fn kafka_needed(table: &Table, set: &[usize], rf: u32, isr: u32) -> Option<Nanos> {
    if set.is_empty() {
        return None;
    }
    let needed = usize::try_from(isr.saturating_sub(1)).unwrap_or(usize::MAX);
    if needed == 0 {
        return Some(Nanos::ZERO);
    }
    let followers = usize::try_from(rf.saturating_sub(1)).unwrap_or(usize::MAX);
    let mut worst = Nanos::ZERO;
    for &leader in set {
        let mut lats: Vec<Nanos> = Vec::new();
        for &o in set.iter().filter(|&&o| o != leader) {
            lats.push(table.lat(leader, o)?);
        }
        // The worst placement: the rf − 1 slowest brokers hold the followers.
        lats.sort_by(|a, b| b.cmp(a));
        lats.truncate(followers);
        lats.sort();
        worst = worst.max(*lats.get(needed - 1)?);
    }
    Some(worst)
}

fn capacity_checks(p: &Production, zones: &ZoneMap, nodes: &[NodeFacts], out: &mut Vec<Finding>) -> Vec<CapacityCheck> {
    let members = zones.members();
    let production_zones: Vec<String> = p.zones.clone().unwrap_or_else(|| members.keys().cloned().collect());
    let facts: BTreeMap<&str, &NodeFacts> = nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    p.demand
        .iter()
        .map(|d| {
            let zone_caps: Vec<(String, u64)> = production_zones
                .iter()
                .map(|z| {
                    let mut cap = 0u64;
                    for node in members.get(z).map(Vec::as_slice).unwrap_or_default() {
                        let f = facts.get(node.as_str());
                        if let Some(pool) = &d.pool
                            && f.and_then(|f| f.pool.as_ref()) != Some(pool)
                        {
                            continue;
                        }
                        match f.and_then(|f| f.capacity) {
                            Some(c) => cap = cap.saturating_add(c),
                            None => out.push(Finding::UnknownCapacity { node: node.clone() }),
                        }
                    }
                    (z.clone(), cap)
                })
                .collect();
            let total: u64 = zone_caps.iter().map(|(_, c)| *c).fold(0, u64::saturating_add);
            let zones: Vec<ZoneCapacity> = zone_caps
                .iter()
                .map(|(z, cap)| ZoneCapacity {
                    zone: z.clone(),
                    capacity: *cap,
                    share_percent: u64::try_from(u128::from(*cap) * 100 / u128::from(d.capacity.max(1)))
                        .unwrap_or(u64::MAX),
                    passes: carries_share(*cap, d.capacity, p.min_zone_share_percent),
                })
                .collect();
            CapacityCheck {
                pool: d.pool.clone(),
                demand: d.capacity,
                min_share_percent: p.min_zone_share_percent,
                passes: !zones.is_empty() && zones.iter().all(|z| z.passes),
                survives_zone_loss: !zones.is_empty() && zone_caps.iter().all(|(_, c)| total - c >= d.capacity),
                zones,
            }
        })
        .collect()
}
