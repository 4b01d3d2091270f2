//! Who probes whom: full mesh for small fleets, zone-aware rotating samples beyond; and the probe load.
//!
//! # Selection
//! With at most `max_peers` (default 64) other nodes in the fleet, every node probes every other (full mesh).
//! Beyond that, per *round* (the coordinator picks rounds, e.g. `unix time / 10 min`, and recomputes):
//! 1. Every zone's members are put in a pseudo-random order derived from `(seed, round, node id)`; a node's
//!    *rank* is its position in its zone.
//! 2. **Other zones** get up to half the budget (all of it when the node is alone in its zone):
//!    `zones_per_node = min(m, max(1, cross_budget / per_zone))` for `m` other zones. If that is all of them,
//!    the node is a candidate for every other zone; otherwise the node with rank `i` is a candidate for the
//!    `zones_per_node` zones starting at index `i · zones_per_node + round` (mod `m`) in the sorted zone list,
//!    so the members of a zone share the other zones out between them.
//! 3. Of the candidates of zone Z for zone Y, the first `|Y|` in rank order probe Y (so however large Z is, each
//!    member of Y is probed by at most `per_zone` nodes of Z — a one-node zone is not probed by the whole fleet).
//!    The `j`-th of them takes `per_zone` (default 2) members of Y at positions `j · per_zone + t + offset`
//!    (mod `|Y|`), `offset` a hash of the zone pair and round, so Y's members are probed evenly.
//! 4. **Own zone** gets the rest of the budget: all other members of its zone if they fit; otherwise the next
//!    members after it in the zone's order for this round (a ring neighbourhood that changes every round).
//!
//! So per round a node probes at most `max_peers` nodes (exactly, when the fleet is large), and
//! - each node is probed by at most `per_zone` nodes of each other zone plus at most `max_peers` of its own;
//! - every ordered zone pair (Z, Y) is measured when `|Z| · zones_per_node ≥ m`. With at most
//!   `max_peers / (2 · per_zone)` other zones (16 at the defaults, i.e. up to 17 zones) `zones_per_node = m` and
//!   this always holds; with more zones it needs zones of at least `m / zones_per_node` members (e.g. 100 zones
//!   need 7 members each at the defaults). RTT is symmetric, so a pair is measured in at least one direction
//!   when either side satisfies it;
//! - the own zone is always measured: it gets what the other zones leave, at least half the budget when
//!   `per_zone ≤ max_peers / 2`;
//! - samples rotate every round, so over time every pair of nodes is measured.
//!
//! Nodes without a declared or inferred zone form one group of their own ("unzoned").
//!
//! # Load at 5 000 nodes
//! Defaults (64 peers, 2 per other zone, 1 probe/s per peer), 5 000 nodes in 10 zones of 500:
//! a node probes 18 nodes in the 9 other zones and 46 in its own, i.e. **64 probes/s**. Every node is probed
//! as often as it probes (the selection is balanced), so it also answers 64 probes/s: **128 datagrams/s sent
//! and 128 received**. A probe is 76 bytes of UDP payload, 104 bytes with IPv4 and UDP headers (124 with IPv6),
//! so **13 312 B/s (≈ 106 kbit/s) each way** per node, ≈ 256 HMAC-SHA256 computations per second of CPU —
//! independent of fleet size once it exceeds 65 nodes. Each zone pair is measured by 1 000 probes/s in each
//! direction. See [`probe_load`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ConfigError;
use crate::id::NodeId;
use crate::wire::PROBE_LEN;

/// Default largest number of peers per node (and the largest fleet probed as a full mesh, plus one).
pub const DEFAULT_MAX_PEERS: usize = 64;
/// Default number of members probed in each other zone.
pub const DEFAULT_PER_ZONE: usize = 2;
/// IPv4 (20) + UDP (8) header bytes around each probe.
pub const IPV4_UDP_OVERHEAD: usize = 28;
/// IPv6 (40) + UDP (8) header bytes around each probe.
pub const IPV6_UDP_OVERHEAD: usize = 48;

/// Peer selection settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshConfig {
    /// Largest number of peers a node probes. Default [`DEFAULT_MAX_PEERS`].
    pub max_peers: usize,
    /// Members probed per other zone. Default [`DEFAULT_PER_ZONE`].
    pub per_zone: usize,
    /// Seed of the rotation (the coordinator can keep one per fleet).
    pub seed: u64,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            max_peers: DEFAULT_MAX_PEERS,
            per_zone: DEFAULT_PER_ZONE,
            seed: 0,
        }
    }
}

impl MeshConfig {
    /// Checks that the budget and the per-zone sample are at least 1.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_peers == 0 {
            return Err(ConfigError::Invalid {
                field: "max_peers",
                reason: "0 would probe no one; give at least 1".into(),
            });
        }
        if self.per_zone == 0 {
            return Err(ConfigError::Invalid {
                field: "per_zone",
                reason: "0 would leave other zones unmeasured; give at least 1".into(),
            });
        }
        Ok(())
    }
}

/// A fleet member as peer selection sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Declared (cloud metadata) or inferred zone; `None` if unknown.
    pub zone: Option<String>,
}

impl Member {
    /// A member from id and zone.
    pub fn new(id: impl Into<NodeId>, zone: Option<&str>) -> Self {
        Self {
            id: id.into(),
            zone: zone.map(str::to_owned),
        }
    }
}

/// The peers one node probes in one round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Nodes to probe.
    pub peers: Vec<NodeId>,
    /// Whether the fleet is small enough for a full mesh.
    pub full_mesh: bool,
    /// How many of `peers` are in the node's own zone.
    pub own_zone: usize,
    /// How many are in other zones.
    pub other_zones: usize,
    /// How many other zones are probed (of how many there are).
    pub zones_probed: usize,
    /// Number of other zones.
    pub zones_total: usize,
}

/// The fleet arranged for one round; [`Mesh::select`] then answers per node in O(peers).
#[derive(Clone, Debug)]
pub struct Mesh {
    config: MeshConfig,
    /// Zones in sorted key order, members in this round's order.
    zones: Vec<Vec<NodeId>>,
    /// Node → (zone index, rank, cross-zone assignments `(target zone, index among that zone's probers)`).
    place: HashMap<NodeId, Placement>,
    total: usize,
    round: u64,
}

#[derive(Clone, Debug)]
struct Placement {
    zone: usize,
    rank: usize,
    cross: Vec<(usize, usize)>,
}

impl Mesh {
    /// Arranges `fleet` for `round`. Duplicate ids count once (first zone wins).
    pub fn new(fleet: &[Member], config: &MeshConfig, round: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut seen = HashMap::new();
        let mut by_zone: BTreeMap<Option<String>, Vec<(u64, NodeId)>> = BTreeMap::new();
        for m in fleet {
            if seen.insert(m.id.clone(), ()).is_some() {
                continue;
            }
            let h = mix(config.seed ^ mix(round) ^ id_hash(&m.id));
            by_zone.entry(m.zone.clone()).or_default().push((h, m.id.clone()));
        }
        let zones: Vec<Vec<NodeId>> = by_zone
            .into_values()
            .map(|mut v| {
                v.sort();
                v.into_iter().map(|(_, id)| id).collect()
            })
            .collect();
        let m = zones.len().saturating_sub(1);
        let mut place = HashMap::new();
        for (zi, members) in zones.iter().enumerate() {
            let others: Vec<usize> = (0..zones.len()).filter(|&y| y != zi).collect();
            let zpn = zones_per_node(m, members.len() - 1, config);
            // How many probers of each target zone this zone has handed out so far.
            let mut probers = vec![0usize; zones.len()];
            for (rank, id) in members.iter().enumerate() {
                let start = if zpn == m {
                    0
                } else {
                    rank.wrapping_mul(zpn).wrapping_add(round as usize)
                };
                let mut cross = Vec::with_capacity(zpn);
                for t in 0..zpn {
                    let Some(&y) = others.get((start + t) % m.max(1)) else {
                        continue;
                    };
                    // At most |Y| probers per ordered zone pair, so that each member of Y is probed by at most
                    // `per_zone` nodes of this zone however large it is.
                    if probers[y] < zones[y].len() {
                        cross.push((y, probers[y]));
                        probers[y] += 1;
                    }
                }
                place.insert(id.clone(), Placement { zone: zi, rank, cross });
            }
        }
        Ok(Self {
            config: config.clone(),
            zones,
            place,
            total: seen.len(),
            round,
        })
    }

    /// The peers of `me` in this round; empty if `me` is not in the fleet.
    pub fn select(&self, me: &NodeId) -> Selection {
        let m = self.zones.len().saturating_sub(1);
        let Some(pl) = self.place.get(me) else {
            return Selection {
                peers: vec![],
                full_mesh: false,
                own_zone: 0,
                other_zones: 0,
                zones_probed: 0,
                zones_total: m,
            };
        };
        let own = &self.zones[pl.zone];
        if self.total - 1 <= self.config.max_peers {
            let mut peers: Vec<NodeId> = Vec::with_capacity(self.total - 1);
            for z in &self.zones {
                peers.extend(z.iter().filter(|id| *id != me).cloned());
            }
            let own_n = own.len() - 1;
            let other = peers.len() - own_n;
            return Selection {
                peers,
                full_mesh: true,
                own_zone: own_n,
                other_zones: other,
                zones_probed: m,
                zones_total: m,
            };
        }
        let q = self.config.per_zone;
        let mut peers = Vec::with_capacity(self.config.max_peers);
        for &(y, j) in &pl.cross {
            let members = &self.zones[y];
            let pair = ((pl.zone as u64) << 32) | y as u64;
            let offset = (mix(self.config.seed ^ mix(self.round) ^ mix(pair)) % members.len() as u64) as usize;
            for k in 0..q.min(members.len()) {
                peers.push(members[(j.wrapping_mul(q) + k + offset) % members.len()].clone());
            }
        }
        let other_n = peers.len();
        let own_take = (own.len() - 1).min(self.config.max_peers.saturating_sub(other_n));
        for k in 1..=own_take {
            peers.push(own[(pl.rank + k) % own.len()].clone());
        }
        Selection {
            peers,
            full_mesh: false,
            own_zone: own_take,
            other_zones: other_n,
            zones_probed: pl.cross.len(),
            zones_total: m,
        }
    }
}

/// Convenience: [`Mesh::new`] then [`Mesh::select`] (build the `Mesh` once when selecting for many nodes).
pub fn select_peers(me: &NodeId, fleet: &[Member], config: &MeshConfig, round: u64) -> Result<Selection, ConfigError> {
    Ok(Mesh::new(fleet, config, round)?.select(me))
}

/// How many other zones a node probes, given `m` other zones and `own_others` other members in its own zone.
fn zones_per_node(m: usize, own_others: usize, config: &MeshConfig) -> usize {
    if m == 0 {
        return 0;
    }
    let cross_budget = if own_others > 0 {
        config.max_peers / 2
    } else {
        config.max_peers
    };
    m.min((cross_budget / config.per_zone).max(1))
}

/// Probe traffic of one node, averaged over the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeLoad {
    /// Peers probed.
    pub peers: usize,
    /// Probes sent per second.
    pub probes_per_s: f64,
    /// Datagrams sent per second (probes plus answers to others' probes); the same number is received.
    pub datagrams_per_s: f64,
    /// Bytes per second sent (and received), IPv4: payload plus IP and UDP headers.
    pub bytes_per_s_ipv4: f64,
    /// Bytes per second sent (and received), IPv6.
    pub bytes_per_s_ipv6: f64,
}

/// The probe load per node for a fleet of `fleet_size` nodes in `zones` equal zones, probing each peer every
/// `interval`. Every node is probed as often as it probes (the selection is balanced; with equal zones exactly),
/// so it also answers `probes_per_s` probes.
pub fn probe_load(fleet_size: usize, zones: usize, config: &MeshConfig, interval: Duration) -> ProbeLoad {
    let zones = zones.max(1);
    let peers = if fleet_size <= config.max_peers + 1 {
        fleet_size.saturating_sub(1)
    } else {
        let zone_size = fleet_size / zones;
        let m = zones - 1;
        let own_others = zone_size.saturating_sub(1);
        let zpn = zones_per_node(m, own_others, config);
        let cross = zpn * config.per_zone.max(1).min(zone_size.max(1));
        cross + own_others.min(config.max_peers.saturating_sub(cross))
    };
    let per_s = if interval.is_zero() {
        0.0
    } else {
        peers as f64 / interval.as_secs_f64()
    };
    let datagrams = 2.0 * per_s;
    ProbeLoad {
        peers,
        probes_per_s: per_s,
        datagrams_per_s: datagrams,
        bytes_per_s_ipv4: datagrams * (PROBE_LEN + IPV4_UDP_OVERHEAD) as f64,
        bytes_per_s_ipv6: datagrams * (PROBE_LEN + IPV6_UDP_OVERHEAD) as f64,
    }
}

fn id_hash(id: &NodeId) -> u64 {
    let w = id.wire_id().0;
    u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
}

/// SplitMix64's finalizer: a fast, well-distributed 64-bit mix (not cryptographic; selection is not a secret).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use super::*;

    fn fleet(sizes: &[usize]) -> Vec<Member> {
        let mut v = Vec::new();
        for (z, &n) in sizes.iter().enumerate() {
            for i in 0..n {
                v.push(Member::new(format!("n{z}-{i}"), Some(&format!("zone-{z}"))));
            }
        }
        v
    }

    /// Checks budget, no self, no duplicates; returns (ordered zone pairs covered, in-degree per node).
    fn check_all(
        fleet: &[Member],
        cfg: &MeshConfig,
        round: u64,
    ) -> (HashSet<(String, String)>, HashMap<NodeId, usize>) {
        let mesh = Mesh::new(fleet, cfg, round).unwrap();
        let zone: HashMap<&NodeId, &str> = fleet.iter().map(|m| (&m.id, m.zone.as_deref().unwrap_or(""))).collect();
        let mut pairs = HashSet::new();
        let mut indeg: HashMap<NodeId, usize> = HashMap::new();
        for m in fleet {
            let s = mesh.select(&m.id);
            assert!(s.peers.len() <= cfg.max_peers, "{} probes {}", m.id, s.peers.len());
            assert_eq!(s.peers.len(), s.own_zone + s.other_zones);
            let set: HashSet<&NodeId> = s.peers.iter().collect();
            assert_eq!(set.len(), s.peers.len(), "duplicates for {}", m.id);
            assert!(!set.contains(&m.id), "{} probes itself", m.id);
            for p in &s.peers {
                pairs.insert((zone[&m.id].to_owned(), zone[p].to_owned()));
                *indeg.entry(p.clone()).or_default() += 1;
            }
        }
        (pairs, indeg)
    }

    #[test]
    fn small_fleet_is_a_full_mesh() {
        let f = fleet(&[30, 35]);
        let s = select_peers(&NodeId::new("n0-0"), &f, &MeshConfig::default(), 0).unwrap();
        assert!(s.full_mesh);
        assert_eq!(s.peers.len(), 64);
        assert_eq!((s.own_zone, s.other_zones), (29, 35));
        let f = fleet(&[30, 36]);
        assert!(
            !select_peers(&NodeId::new("n0-0"), &f, &MeshConfig::default(), 0)
                .unwrap()
                .full_mesh
        );
    }

    #[test]
    fn five_thousand_nodes_in_ten_zones_bounded_and_every_zone_pair_measured() {
        let f = fleet(&[500; 10]);
        let cfg = MeshConfig::default();
        let (pairs, indeg) = check_all(&f, &cfg, 3);
        // Every ordered zone pair, including each zone with itself.
        assert_eq!(pairs.len(), 100);
        // Exactly 64 peers each (18 cross-zone + 46 own), and the load is balanced: in-degree 64 for everyone.
        let s = select_peers(&NodeId::new("n4-17"), &f, &cfg, 3).unwrap();
        assert_eq!(
            (s.peers.len(), s.other_zones, s.own_zone, s.zones_probed, s.zones_total),
            (64, 18, 46, 9, 9)
        );
        assert_eq!(indeg.len(), 5000);
        assert!(
            indeg.values().all(|&d| d == 64),
            "{:?}",
            indeg.values().collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn uneven_zones_stay_within_budget_and_covered() {
        let f = fleet(&[3000, 1000, 500, 300, 100, 50, 30, 15, 4, 1]);
        let (pairs, indeg) = check_all(&f, &MeshConfig::default(), 0);
        assert_eq!(pairs.len(), 100 - 1, "all ordered pairs but (single-node zone, itself)");
        // However small a zone, each of its members is probed by at most `per_zone` nodes of every other zone:
        // the single node of zone 9 by one node per other zone.
        assert_eq!(indeg[&NodeId::new("n9-0")], 9);
        let max = indeg.values().copied().max().unwrap();
        assert!(max <= 64 + 9 * 2, "{max}");
        assert_eq!(indeg.len(), 5000);
        // Nodes of the big zone that are not needed in small zones spend the budget on their own zone.
        let s = select_peers(&NodeId::new("n0-2999"), &f, &MeshConfig::default(), 0).unwrap();
        assert_eq!(s.peers.len(), 64);
    }

    #[test]
    fn many_zones_are_shared_out_and_still_all_measured() {
        // 100 zones of 50: 99 other zones do not fit into 32 cross-zone slots, so each node takes 16 zones.
        let f = fleet(&[50; 100]);
        let cfg = MeshConfig::default();
        let (pairs, indeg) = check_all(&f, &cfg, 11);
        assert_eq!(pairs.len(), 100 * 100);
        let s = select_peers(&NodeId::new("n0-0"), &f, &cfg, 11).unwrap();
        assert_eq!(
            (s.zones_probed, s.zones_total, s.other_zones, s.own_zone),
            (16, 99, 32, 32)
        );
        let max = indeg.values().copied().max().unwrap();
        assert!(max <= 2 * cfg.max_peers, "{max}");
    }

    #[test]
    fn rotation_is_deterministic_per_round_and_changes_between_rounds() {
        let f = fleet(&[500; 10]);
        let cfg = MeshConfig {
            seed: 42,
            ..MeshConfig::default()
        };
        let me = NodeId::new("n2-9");
        let a = select_peers(&me, &f, &cfg, 5).unwrap();
        assert_eq!(a, select_peers(&me, &f, &cfg, 5).unwrap());
        let b = select_peers(&me, &f, &cfg, 6).unwrap();
        assert_ne!(a.peers, b.peers);
        let other_seed = select_peers(
            &me,
            &f,
            &MeshConfig {
                seed: 43,
                ..cfg.clone()
            },
            5,
        )
        .unwrap();
        assert_ne!(a.peers, other_seed.peers);
        // Over 50 rounds a node meets most of its zone, not the same 46.
        let mut met = HashSet::new();
        for r in 0..50 {
            met.extend(select_peers(&me, &f, &cfg, r).unwrap().peers);
        }
        assert!(met.len() > 1000, "{}", met.len());
    }

    #[test]
    fn unzoned_nodes_and_unknown_self() {
        let mut f: Vec<Member> = (0..100).map(|i| Member::new(format!("u{i}"), None)).collect();
        f.extend(fleet(&[10]));
        let (pairs, _) = check_all(&f, &MeshConfig::default(), 0);
        assert!(pairs.contains(&(String::new(), "zone-0".into())));
        assert!(pairs.contains(&("zone-0".into(), String::new())));
        let s = select_peers(&NodeId::new("stranger"), &f, &MeshConfig::default(), 0).unwrap();
        assert!(s.peers.is_empty());
        assert!(
            select_peers(
                &NodeId::new("u1"),
                &f,
                &MeshConfig {
                    max_peers: 0,
                    ..MeshConfig::default()
                },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn load_at_five_thousand_nodes() {
        let l = probe_load(5000, 10, &MeshConfig::default(), Duration::from_secs(1));
        assert_eq!(l.peers, 64);
        assert_eq!(l.probes_per_s, 64.0);
        assert_eq!(l.datagrams_per_s, 128.0);
        assert_eq!(l.bytes_per_s_ipv4, 13_312.0);
        assert_eq!(l.bytes_per_s_ipv6, 15_872.0);
        // Small fleets: full mesh.
        assert_eq!(
            probe_load(10, 1, &MeshConfig::default(), Duration::from_secs(1)).peers,
            9
        );
        assert_eq!(
            probe_load(65, 3, &MeshConfig::default(), Duration::from_secs(1)).peers,
            64
        );
        // Bounded regardless of fleet size.
        for n in [66, 500, 5000, 50_000] {
            assert!(probe_load(n, 10, &MeshConfig::default(), Duration::from_secs(1)).peers <= 64);
        }
        // Half-second interval doubles the rate.
        assert_eq!(
            probe_load(5000, 10, &MeshConfig::default(), Duration::from_millis(500)).probes_per_s,
            128.0
        );
        // The formula agrees with an actual selection.
        let f = fleet(&[500; 10]);
        let s = select_peers(&NodeId::new("n0-0"), &f, &MeshConfig::default(), 0).unwrap();
        assert_eq!(s.peers.len(), l.peers);
    }
}
