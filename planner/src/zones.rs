//! Zones: declared where known, otherwise inferred by clustering measured RTT.
//!
//! # Algorithm
//!
//! 1. The universe is every node in the facts plus every node in the matrix. A node's declared zone
//!    (cloud metadata or operator) is kept as is.
//! 2. Nodes are joined by an edge when their measured **p50** RTT is below the threshold (default
//!    0.5 ms); the connected components of that graph are the clusters (single-linkage clustering).
//!    p50, not p99, is used: zones are about distance, and the tail moves with load.
//! 3. A cluster without declared members becomes a zone named `inferred-N` (N counts clusters in
//!    the order of their smallest node id, skipping names already declared). Undeclared members of a
//!    cluster with declared members adopt the zone of their nearest declared node in the cluster
//!    (smallest direct p50; the alphabetically first declared zone of the cluster when no direct
//!    measurement exists). An undeclared node with no measurement at all stays without a zone.
//! 4. Checks, all on p50: two nodes **declared** in one zone further apart than the zone bound (default
//!    2 ms) are a contradiction; a zone with inferred or adopted members whose members are further apart
//!    than the bound is "too wide"; declared zones closer than the threshold are noted (they may share a
//!    site); pairs inside a zone without a measurement, and zone pairs without any measured pair, are
//!    reported (the probers always measure their own zone and sample every other zone).
//!
//! # Caveats
//!
//! * Single linkage **chains**: A–B 0.4 ms and B–C 0.4 ms put A and C in one zone even when A–C is
//!   0.8 ms. The zone-width check catches chains that exceed the 2 ms bound, not shorter ones.
//! * Unmeasured pairs are missing edges: a zone whose members were never measured against each other
//!   splits into several inferred zones.
//! * The threshold must fall between the in-zone and the cross-zone RTT. Metro sites a few km apart
//!   (0.01 ms/km of fibre) can be closer than the switching noise inside one data centre, and a busy
//!   host's p50 can exceed the threshold; declare zones where the cloud or the operator knows them.
//! * Inferred zone names depend on node ids and can shift when nodes come and go.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::findings::Finding;
use crate::matrix::{LatencyMatrix, Links, NodeFacts, NodeId};
use crate::settings::PlanConfig;
use crate::units::Nanos;

/// Where a node's zone came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneSource {
    /// Declared by cloud metadata or the operator.
    Declared,
    /// Undeclared node placed in the declared zone of the cluster it measured into.
    Adopted,
    /// Cluster without declared members; the zone name is made up.
    Inferred,
}

/// A node's zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneAssignment {
    /// The zone name.
    pub zone: String,
    /// Where it came from.
    pub source: ZoneSource,
}

/// Every node that has a zone, with its zone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneMap {
    /// Node → zone.
    pub nodes: BTreeMap<NodeId, ZoneAssignment>,
}

impl ZoneMap {
    /// The zone of `node`, if known.
    pub fn zone_of(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|a| a.zone.as_str())
    }

    /// Zone → its members (sorted).
    pub fn members(&self) -> BTreeMap<String, Vec<NodeId>> {
        let mut out: BTreeMap<String, Vec<NodeId>> = BTreeMap::new();
        for (node, a) in &self.nodes {
            out.entry(a.zone.clone()).or_default().push(node.clone());
        }
        out
    }
}

/// Zones and what was found while assigning them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneReport {
    /// The assignment.
    pub zones: ZoneMap,
    /// Contradictions and gaps.
    pub findings: Vec<Finding>,
}

/// Assigns zones (declared, adopted or inferred) and checks them. See the module docs for the algorithm.
pub fn infer_zones(nodes: &[NodeFacts], matrix: &LatencyMatrix, config: &PlanConfig) -> ZoneReport {
    let universe = universe(nodes, matrix);
    let links = Links::new(&universe, matrix);
    infer_with(nodes, &links, config)
}

pub(crate) fn universe(nodes: &[NodeFacts], matrix: &LatencyMatrix) -> BTreeSet<NodeId> {
    let mut u = matrix.nodes();
    u.extend(nodes.iter().map(|n| n.id.clone()));
    u
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            // Keep the smallest index as root so components are named by their smallest id.
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.0[hi] = lo;
        }
    }
}

pub(crate) fn infer_with(nodes: &[NodeFacts], links: &Links, config: &PlanConfig) -> ZoneReport {
    let n = links.ids.len();
    let mut declared: Vec<Option<String>> = vec![None; n];
    for f in nodes {
        if let (Some(i), Some(z)) = (links.index_of(&f.id), f.zone.as_deref()) {
            let z = z.trim();
            if !z.is_empty() {
                declared[i] = Some(z.to_string());
            }
        }
    }
    let mut has_link = vec![false; n];
    let mut uf = UnionFind((0..n).collect());
    for (a, b, s) in links.measured_pairs() {
        has_link[a] = true;
        has_link[b] = true;
        if s.p50 < config.zone_threshold {
            uf.union(a, b);
        }
    }
    let mut components: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        let root = uf.find(i);
        components.entry(root).or_default().push(i);
    }

    let declared_names: BTreeSet<&str> = declared.iter().flatten().map(String::as_str).collect();
    let mut assigned: Vec<Option<ZoneAssignment>> = vec![None; n];
    let mut findings = Vec::new();
    let mut next_inferred = 1usize;
    let mut close: BTreeMap<(String, String), (Nanos, NodeId, NodeId)> = BTreeMap::new();

    for members in components.values() {
        let zones_here: BTreeSet<&str> = members.iter().filter_map(|&i| declared[i].as_deref()).collect();
        if zones_here.is_empty() {
            if members.len() == 1 && !has_link[members[0]] {
                findings.push(Finding::UnmeasuredNode {
                    node: links.ids[members[0]].clone(),
                });
                continue;
            }
            let name = loop {
                let candidate = format!("inferred-{next_inferred}");
                next_inferred += 1;
                if !declared_names.contains(candidate.as_str()) {
                    break candidate;
                }
            };
            for &i in members {
                assigned[i] = Some(ZoneAssignment {
                    zone: name.clone(),
                    source: ZoneSource::Inferred,
                });
            }
            continue;
        }
        let fallback = zones_here.iter().next().map(|z| z.to_string()).unwrap_or_default();
        for &i in members {
            if let Some(z) = &declared[i] {
                assigned[i] = Some(ZoneAssignment {
                    zone: z.clone(),
                    source: ZoneSource::Declared,
                });
                continue;
            }
            let nearest = members
                .iter()
                .filter_map(|&j| Some((links.get(i, j)?.p50, declared[j].as_deref()?)))
                .min()
                .map(|(_, z)| z.to_string());
            assigned[i] = Some(ZoneAssignment {
                zone: nearest.unwrap_or_else(|| fallback.clone()),
                source: ZoneSource::Adopted,
            });
        }
        if zones_here.len() > 1 {
            for (x, &i) in members.iter().enumerate() {
                for &j in &members[x + 1..] {
                    let (Some(zi), Some(zj)) = (&declared[i], &declared[j]) else {
                        continue;
                    };
                    let Some(s) = links.get(i, j) else { continue };
                    if zi == zj || s.p50 >= config.zone_threshold {
                        continue;
                    }
                    let (key, a, b) = if zi < zj {
                        ((zi.clone(), zj.clone()), links.ids[i].clone(), links.ids[j].clone())
                    } else {
                        ((zj.clone(), zi.clone()), links.ids[j].clone(), links.ids[i].clone())
                    };
                    let entry = close.entry(key).or_insert((s.p50, a.clone(), b.clone()));
                    if s.p50 < entry.0 {
                        *entry = (s.p50, a, b);
                    }
                }
            }
        }
    }
    for ((zone_a, zone_b), (p50, a, b)) in close {
        findings.push(Finding::DeclaredZonesClose {
            zone_a,
            zone_b,
            a,
            b,
            p50,
            threshold: config.zone_threshold,
        });
    }

    check_zones(links, &declared, &assigned, config, &mut findings);

    let zones = ZoneMap {
        nodes: assigned
            .into_iter()
            .enumerate()
            .filter_map(|(i, a)| Some((links.ids[i].clone(), a?)))
            .collect(),
    };
    ZoneReport { zones, findings }
}

#[derive(Default)]
struct Worst {
    count: u64,
    worst: Option<(Nanos, usize, usize)>,
}

impl Worst {
    fn add(&mut self, p50: Nanos, a: usize, b: usize) {
        self.count += 1;
        if self.worst.is_none_or(|(w, _, _)| p50 > w) {
            self.worst = Some((p50, a, b));
        }
    }
}

fn check_zones(
    links: &Links,
    declared: &[Option<String>],
    assigned: &[Option<ZoneAssignment>],
    config: &PlanConfig,
    findings: &mut Vec<Finding>,
) {
    let mut by_zone: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, a) in assigned.iter().enumerate() {
        if let Some(a) = a {
            by_zone.entry(a.zone.as_str()).or_default().push(i);
        }
    }
    for (zone, members) in &by_zone {
        let mut contradiction = Worst::default();
        let mut wide = Worst::default();
        let mut unmeasured = 0u64;
        let mut examples = Vec::new();
        for (x, &i) in members.iter().enumerate() {
            for &j in &members[x + 1..] {
                match links.get(i, j) {
                    None => {
                        unmeasured += 1;
                        if examples.len() < 5 {
                            examples.push((links.ids[i].clone(), links.ids[j].clone()));
                        }
                    }
                    Some(s) if s.p50 > config.zone_max_rtt => {
                        if declared[i].is_some() && declared[j].is_some() {
                            contradiction.add(s.p50, i, j);
                        } else {
                            wide.add(s.p50, i, j);
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        if let Some((p50, a, b)) = contradiction.worst {
            findings.push(Finding::DeclaredZoneContradiction {
                zone: zone.to_string(),
                a: links.ids[a].clone(),
                b: links.ids[b].clone(),
                p50,
                bound: config.zone_max_rtt,
                pairs_over: contradiction.count,
            });
        }
        if let Some((p50, a, b)) = wide.worst {
            findings.push(Finding::ZoneTooWide {
                zone: zone.to_string(),
                a: links.ids[a].clone(),
                b: links.ids[b].clone(),
                p50,
                bound: config.zone_max_rtt,
                pairs_over: wide.count,
            });
        }
        if unmeasured > 0 {
            findings.push(Finding::UnmeasuredInZone {
                zone: zone.to_string(),
                pairs: unmeasured,
                examples,
            });
        }
    }

    let mut measured_zone_pairs: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (a, b, _) in links.measured_pairs() {
        if let (Some(za), Some(zb)) = (&assigned[a], &assigned[b]) {
            let (x, y) = (za.zone.as_str(), zb.zone.as_str());
            measured_zone_pairs.insert((x.min(y), x.max(y)));
        }
    }
    let zones: Vec<&str> = by_zone.keys().copied().collect();
    for (x, a) in zones.iter().enumerate() {
        for b in &zones[x + 1..] {
            if !measured_zone_pairs.contains(&(*a, *b)) {
                findings.push(Finding::UnmeasuredZonePair {
                    zone_a: a.to_string(),
                    zone_b: b.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::LinkStats;

    fn rtt(ms_p50_us: u64) -> LinkStats {
        LinkStats::from_rtt(
            Nanos::from_micros(ms_p50_us),
            Nanos::from_micros(ms_p50_us + ms_p50_us / 5),
        )
    }

    /// Three zones of two nodes: 0.1 ms inside, a–b 1 ms, a–c and b–c 5 ms.
    pub(crate) fn three_zone_matrix() -> LatencyMatrix {
        let zone_of = |n: &str| n.chars().next().unwrap_or('?');
        let nodes = ["a1", "a2", "b1", "b2", "c1", "c2"];
        let mut m = LatencyMatrix::new();
        for (x, a) in nodes.iter().enumerate() {
            for b in &nodes[x + 1..] {
                let us = match (zone_of(a), zone_of(b)) {
                    (p, q) if p == q => 100,
                    ('a', 'b') => 1_000,
                    _ => 5_000,
                };
                m.insert_symmetric(a, b, rtt(us));
            }
        }
        m
    }

    #[test]
    fn infers_three_zones_from_rtt() {
        let m = three_zone_matrix();
        let report = infer_zones(&[], &m, &PlanConfig::default());
        let members = report.zones.members();
        assert_eq!(members.len(), 3, "{members:?}");
        assert_eq!(members["inferred-1"], vec!["a1", "a2"]);
        assert_eq!(members["inferred-2"], vec!["b1", "b2"]);
        assert_eq!(members["inferred-3"], vec!["c1", "c2"]);
        assert!(report.zones.nodes.values().all(|a| a.source == ZoneSource::Inferred));
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }

    #[test]
    fn undeclared_nodes_adopt_declared_zones() {
        let m = three_zone_matrix();
        let facts = vec![
            NodeFacts::new("a1").with_zone("east"),
            NodeFacts::new("c2").with_zone("far"),
        ];
        let report = infer_zones(&facts, &m, &PlanConfig::default());
        let z = &report.zones;
        assert_eq!(z.nodes["a1"].source, ZoneSource::Declared);
        assert_eq!(
            z.nodes["a2"],
            ZoneAssignment {
                zone: "east".into(),
                source: ZoneSource::Adopted
            }
        );
        assert_eq!(z.zone_of("c1"), Some("far"));
        assert_eq!(z.zone_of("b1"), Some("inferred-1"));
    }

    #[test]
    fn flags_declared_contradiction_and_wide_zone() {
        let mut m = three_zone_matrix();
        // Declared together but 5 ms apart.
        let facts = vec![
            NodeFacts::new("a1").with_zone("z1"),
            NodeFacts::new("c1").with_zone("z1"),
        ];
        let report = infer_zones(&facts, &m, &PlanConfig::default());
        let contradiction = report
            .findings
            .iter()
            .find(|f| matches!(f, Finding::DeclaredZoneContradiction { .. }));
        match contradiction {
            Some(Finding::DeclaredZoneContradiction {
                zone,
                a,
                b,
                p50,
                pairs_over,
                ..
            }) => {
                assert_eq!((zone.as_str(), a.as_str(), b.as_str()), ("z1", "a1", "c1"));
                assert_eq!(*p50, Nanos::from_millis(5));
                assert_eq!(*pairs_over, 1);
            }
            other => panic!("no contradiction: {other:?} in {:?}", report.findings),
        }
        // c2 adopted z1 through c1 and is 5 ms from a1: the zone is too wide.
        assert!(
            report
                .findings
                .iter()
                .any(|f| matches!(f, Finding::ZoneTooWide { zone, .. } if zone == "z1"))
        );

        // Chaining: x–y 0.4 ms, y–w 0.4 ms, x–w 3 ms (an odd, asymmetric path) makes one inferred zone.
        m = LatencyMatrix::new();
        m.insert_symmetric("x", "y", rtt(400));
        m.insert_symmetric("y", "w", rtt(400));
        m.insert_symmetric("x", "w", rtt(3_000));
        let report = infer_zones(&[], &m, &PlanConfig::default());
        assert!(
            report
                .findings
                .iter()
                .any(|f| matches!(f, Finding::ZoneTooWide { a, b, .. } if a == "w" && b == "x")),
            "{:?}",
            report.findings
        );
    }

    #[test]
    fn flags_unmeasured_pairs_and_nodes() {
        let mut m = LatencyMatrix::new();
        m.insert_symmetric("a1", "a2", rtt(100));
        m.insert_symmetric("a2", "a3", rtt(100));
        let facts = vec![
            NodeFacts::new("a1").with_zone("east"),
            NodeFacts::new("a3").with_zone("east"),
            NodeFacts::new("b1").with_zone("west"),
            NodeFacts::new("lonely"),
        ];
        let report = infer_zones(&facts, &m, &PlanConfig::default());
        let f = &report.findings;
        assert!(f.contains(&Finding::UnmeasuredNode { node: "lonely".into() }), "{f:?}");
        assert!(f.contains(&Finding::UnmeasuredInZone {
            zone: "east".into(),
            pairs: 1,
            examples: vec![("a1".into(), "a3".into())]
        }));
        assert!(f.contains(&Finding::UnmeasuredZonePair {
            zone_a: "east".into(),
            zone_b: "west".into()
        }));
        assert_eq!(report.zones.zone_of("lonely"), None);
    }

    #[test]
    fn notes_declared_zones_that_share_a_site() {
        let mut m = LatencyMatrix::new();
        m.insert_symmetric("a", "b", rtt(50));
        let facts = vec![NodeFacts::new("a").with_zone("z1"), NodeFacts::new("b").with_zone("z2")];
        let report = infer_zones(&facts, &m, &PlanConfig::default());
        assert!(
            matches!(report.findings.as_slice(), [Finding::DeclaredZonesClose { zone_a, zone_b, .. }]
            if zone_a == "z1" && zone_b == "z2")
        );
    }
}
