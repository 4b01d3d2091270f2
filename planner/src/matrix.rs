//! Inputs: the measured latency matrix and the facts known about each node.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::units::Nanos;

/// A node's identifier as the coordinator knows it.
pub type NodeId = String;

/// Round-trip statistics of one measured pair over one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkStats {
    /// Median round trip.
    pub p50: Nanos,
    /// 99th percentile round trip.
    pub p99: Nanos,
    /// Round-trip variation (the prober's jitter estimate, treated like TCP's RTTVAR).
    pub jitter: Nanos,
    /// Probes lost, in parts per million (10 000 = 1 %).
    pub loss_ppm: u32,
    /// Probes answered in the window; 0 means unmeasured.
    pub samples: u64,
}

impl LinkStats {
    /// Stats with the given median and tail, no jitter, no loss, 100 samples (handy for tests and fixtures).
    pub const fn from_rtt(p50: Nanos, p99: Nanos) -> LinkStats {
        LinkStats {
            p50,
            p99,
            jitter: Nanos::ZERO,
            loss_ppm: 0,
            samples: 100,
        }
    }

    /// Sets the jitter.
    pub const fn with_jitter(mut self, jitter: Nanos) -> LinkStats {
        self.jitter = jitter;
        self
    }

    /// Sets the loss in parts per million.
    pub const fn with_loss_ppm(mut self, loss_ppm: u32) -> LinkStats {
        self.loss_ppm = loss_ppm;
        self
    }

    /// Converts a loss ratio (`lost / sent`, 0.0–1.0, as the latency crate reports it) to parts per
    /// million, rounded to nearest and clamped; a NaN counts as total loss (nothing is known).
    pub fn loss_ppm_from_ratio(ratio: f64) -> u32 {
        if ratio.is_nan() {
            return 1_000_000;
        }
        // Clamped to [0, 1e6] first, so the cast cannot truncate.
        (ratio.clamp(0.0, 1.0) * 1_000_000.0).round() as u32
    }

    /// Whether the window has any answered probe.
    pub const fn is_measured(&self) -> bool {
        self.samples > 0
    }

    /// Combines the two directions of a pair conservatively: the worse of each statistic, samples summed.
    pub fn merge(self, other: LinkStats) -> LinkStats {
        LinkStats {
            p50: self.p50.max(other.p50),
            p99: self.p99.max(other.p99),
            jitter: self.jitter.max(other.jitter),
            loss_ppm: self.loss_ppm.max(other.loss_ppm),
            samples: self.samples.saturating_add(other.samples),
        }
    }
}

/// One row of the matrix as serialized: the prober `from` measured the round trip to `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// The probing node.
    pub from: NodeId,
    /// The answering node.
    pub to: NodeId,
    /// Median round trip.
    pub p50: Nanos,
    /// 99th percentile round trip.
    pub p99: Nanos,
    /// Round-trip variation.
    pub jitter: Nanos,
    /// Loss in parts per million.
    pub loss_ppm: u32,
    /// Probes answered.
    pub samples: u64,
}

/// Measured round trips per ordered pair (`from` probed `to`). Queries are symmetric: a pair measured in
/// both directions is merged with [`LinkStats::merge`]; one direction is enough. Serialized as a list of
/// [`Measurement`]s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<Measurement>", into = "Vec<Measurement>")]
pub struct LatencyMatrix {
    directed: BTreeMap<(NodeId, NodeId), LinkStats>,
}

impl LatencyMatrix {
    /// An empty matrix.
    pub fn new() -> LatencyMatrix {
        LatencyMatrix::default()
    }

    /// Records what `from` measured to `to` (replacing an earlier window). Self-pairs are ignored.
    pub fn insert(&mut self, from: &str, to: &str, stats: LinkStats) {
        if from != to {
            self.directed.insert((from.to_string(), to.to_string()), stats);
        }
    }

    /// Records the same stats in both directions.
    pub fn insert_symmetric(&mut self, a: &str, b: &str, stats: LinkStats) {
        self.insert(a, b, stats);
        self.insert(b, a, stats);
    }

    /// The pair's stats, both directions merged; `None` when neither direction has a sample.
    pub fn link(&self, a: &str, b: &str) -> Option<LinkStats> {
        let forward = self
            .directed
            .get(&(a.to_string(), b.to_string()))
            .filter(|s| s.is_measured());
        let backward = self
            .directed
            .get(&(b.to_string(), a.to_string()))
            .filter(|s| s.is_measured());
        match (forward, backward) {
            (Some(f), Some(b)) => Some(f.merge(*b)),
            (Some(one), None) | (None, Some(one)) => Some(*one),
            (None, None) => None,
        }
    }

    /// Every node that appears in the matrix.
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        self.directed.keys().flat_map(|(a, b)| [a.clone(), b.clone()]).collect()
    }

    /// Number of directed entries.
    pub fn len(&self) -> usize {
        self.directed.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.directed.is_empty()
    }

    /// The directed entries in order.
    pub fn measurements(&self) -> impl Iterator<Item = (&str, &str, &LinkStats)> {
        self.directed.iter().map(|((a, b), s)| (a.as_str(), b.as_str(), s))
    }
}

impl From<Vec<Measurement>> for LatencyMatrix {
    fn from(rows: Vec<Measurement>) -> LatencyMatrix {
        let mut m = LatencyMatrix::new();
        for r in rows {
            let stats = LinkStats {
                p50: r.p50,
                p99: r.p99,
                jitter: r.jitter,
                loss_ppm: r.loss_ppm,
                samples: r.samples,
            };
            m.insert(&r.from, &r.to, stats);
        }
        m
    }
}

impl From<LatencyMatrix> for Vec<Measurement> {
    fn from(m: LatencyMatrix) -> Vec<Measurement> {
        m.directed
            .into_iter()
            .map(|((from, to), s)| Measurement {
                from,
                to,
                p50: s.p50,
                p99: s.p99,
                jitter: s.jitter,
                loss_ppm: s.loss_ppm,
                samples: s.samples,
            })
            .collect()
    }
}

/// What the inventory and cloud metadata say about a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFacts {
    /// The node's identifier (as in the matrix).
    pub id: NodeId,
    /// Availability zone from cloud metadata or the operator, when known.
    #[serde(default)]
    pub zone: Option<String>,
    /// The pool the node belongs to (e.g. `db`, `kafka`, `app`).
    #[serde(default)]
    pub pool: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Capacity in the unit the production demand is declared in (e.g. allocatable CPU in millicores),
    /// when the inventory knows it.
    #[serde(default)]
    pub capacity: Option<u64>,
}

impl NodeFacts {
    /// A node with only an id.
    pub fn new(id: &str) -> NodeFacts {
        NodeFacts {
            id: id.to_string(),
            ..NodeFacts::default()
        }
    }

    /// Sets the declared zone.
    pub fn with_zone(mut self, zone: &str) -> NodeFacts {
        self.zone = Some(zone.to_string());
        self
    }

    /// Sets the pool.
    pub fn with_pool(mut self, pool: &str) -> NodeFacts {
        self.pool = Some(pool.to_string());
        self
    }

    /// Sets the capacity.
    pub fn with_capacity(mut self, capacity: u64) -> NodeFacts {
        self.capacity = Some(capacity);
        self
    }
}

/// A symmetric, index-based view of the matrix over a fixed set of nodes, for the O(n²) passes.
pub(crate) struct Links {
    pub(crate) ids: Vec<NodeId>,
    index: HashMap<NodeId, usize>,
    links: HashMap<(usize, usize), LinkStats>,
}

impl Links {
    pub(crate) fn new(universe: &BTreeSet<NodeId>, matrix: &LatencyMatrix) -> Links {
        let ids: Vec<NodeId> = universe.iter().cloned().collect();
        let index: HashMap<NodeId, usize> = ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
        let mut links: HashMap<(usize, usize), LinkStats> = HashMap::new();
        for (from, to, stats) in matrix.measurements() {
            if !stats.is_measured() {
                continue;
            }
            let (Some(&a), Some(&b)) = (index.get(from), index.get(to)) else {
                continue;
            };
            let key = (a.min(b), a.max(b));
            links.entry(key).and_modify(|s| *s = s.merge(*stats)).or_insert(*stats);
        }
        Links { ids, index, links }
    }

    pub(crate) fn index_of(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub(crate) fn get(&self, a: usize, b: usize) -> Option<LinkStats> {
        self.links.get(&(a.min(b), a.max(b))).copied()
    }

    pub(crate) fn get_by_id(&self, a: &str, b: &str) -> Option<LinkStats> {
        self.get(self.index_of(a)?, self.index_of(b)?)
    }

    pub(crate) fn measured_pairs(&self) -> impl Iterator<Item = (usize, usize, LinkStats)> + '_ {
        self.links.iter().map(|(&(a, b), s)| (a, b, *s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_merge_conservatively() {
        let mut m = LatencyMatrix::new();
        m.insert("a", "b", LinkStats::from_rtt(Nanos(100), Nanos(200)).with_loss_ppm(5));
        assert_eq!(m.link("b", "a").unwrap().p99, Nanos(200));
        m.insert(
            "b",
            "a",
            LinkStats::from_rtt(Nanos(150), Nanos(180)).with_jitter(Nanos(9)),
        );
        let l = m.link("a", "b").unwrap();
        assert_eq!(
            (l.p50, l.p99, l.jitter, l.loss_ppm, l.samples),
            (Nanos(150), Nanos(200), Nanos(9), 5, 200)
        );
        m.insert(
            "a",
            "c",
            LinkStats {
                samples: 0,
                ..LinkStats::from_rtt(Nanos(1), Nanos(1))
            },
        );
        assert_eq!(m.link("a", "c"), None, "a window without samples is unmeasured");
        m.insert("a", "a", LinkStats::from_rtt(Nanos(1), Nanos(1)));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn loss_ratio_to_ppm() {
        assert_eq!(LinkStats::loss_ppm_from_ratio(0.3), 300_000);
        assert_eq!(LinkStats::loss_ppm_from_ratio(0.0000004), 0);
        assert_eq!(LinkStats::loss_ppm_from_ratio(1.5), 1_000_000);
        assert_eq!(LinkStats::loss_ppm_from_ratio(-0.1), 0);
        assert_eq!(LinkStats::loss_ppm_from_ratio(f64::NAN), 1_000_000);
    }

    #[test]
    fn matrix_serializes_as_rows() {
        let mut m = LatencyMatrix::new();
        m.insert("a", "b", LinkStats::from_rtt(Nanos(100), Nanos(200)));
        let yaml = serde_norway::to_string(&m).unwrap();
        assert!(yaml.contains("from: a"), "{yaml}");
        let back: LatencyMatrix = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(back, m);
    }
}
