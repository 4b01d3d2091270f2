//! What changes per node between two placements, and which changes are disruptive (the node must be drained
//! and re-joined, or loses its workloads).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::Taint;
use crate::place::{Assignment, NodePlacement, Placement};

/// How one node's placement changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeChange {
    /// Node id.
    pub node: String,
    pub before: Option<Assignment>,
    pub after: Option<Assignment>,
    /// What changes, disruptive ones first in this order: environment, pool, placement; then cohorts, labels,
    /// taints.
    pub changes: Vec<Change>,
}

impl NodeChange {
    /// Whether any change needs a drain (environment or pool change, or the node leaving placement).
    pub fn is_disruptive(&self) -> bool {
        self.changes.iter().any(|c| c.disruptive)
    }
}

/// One change, e.g. `pool: performance -> fast-nvme` (disruptive) or `label polynimbus.io/x: a -> b`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub what: String,
    /// Environment and pool changes (drain, `kubeadm reset`, re-join elsewhere) and placed → unplaced (drain)
    /// are disruptive; cohort, label and taint changes are applied in place.
    pub disruptive: bool,
}

fn change(what: String, disruptive: bool) -> Change {
    Change { what, disruptive }
}

fn describe(p: Option<&NodePlacement>) -> String {
    match p {
        Some(NodePlacement::Unplaced { reason }) => format!("unplaced ({reason})"),
        Some(NodePlacement::Placed(a)) => format!("{}/{}", a.environment, a.pool),
        None => "absent".to_string(),
    }
}

/// The nodes whose placement differs between `before` and `after` (a node absent from one side counts as
/// unplaced there), sorted by node id. A node unplaced on both sides is not listed, even if the reason
/// changed.
pub fn diff(before: &Placement, after: &Placement) -> Vec<NodeChange> {
    let ids: BTreeSet<&String> = before.nodes.keys().chain(after.nodes.keys()).collect();
    let mut out = Vec::new();
    for id in ids {
        let (pb, pa) = (before.nodes.get(id), after.nodes.get(id));
        let (b, a) = (
            pb.and_then(NodePlacement::assignment),
            pa.and_then(NodePlacement::assignment),
        );
        let changes = match (b, a) {
            (None, None) => continue,
            (Some(_), None) => vec![change(format!("placed in {} -> {}", describe(pb), describe(pa)), true)],
            (None, Some(a)) => {
                let mut c = vec![change(
                    format!("{} -> placed in {}/{}", describe(pb), a.environment, a.pool),
                    false,
                )];
                c.extend(assignment_changes(None, a));
                c
            }
            (Some(b), Some(a)) => assignment_changes(Some(b), a),
        };
        if changes.is_empty() {
            continue;
        }
        out.push(NodeChange {
            node: id.clone(),
            before: b.cloned(),
            after: a.cloned(),
            changes,
        });
    }
    out
}

/// Changes from `b` (or nothing) to `a`.
fn assignment_changes(b: Option<&Assignment>, a: &Assignment) -> Vec<Change> {
    let mut out = Vec::new();
    if let Some(b) = b {
        if b.environment != a.environment {
            out.push(change(
                format!("environment: {} -> {}", b.environment, a.environment),
                true,
            ));
        }
        if b.pool != a.pool {
            out.push(change(format!("pool: {} -> {}", b.pool, a.pool), true));
        }
    }
    let empty_c = Vec::new();
    let bc: BTreeSet<&String> = b.map_or(&empty_c, |b| &b.cohorts).iter().collect();
    let ac: BTreeSet<&String> = a.cohorts.iter().collect();
    for c in ac.difference(&bc) {
        out.push(change(format!("cohort {c} added"), false));
    }
    for c in bc.difference(&ac) {
        out.push(change(format!("cohort {c} removed"), false));
    }
    let empty_l = BTreeMap::new();
    let bl = b.map_or(&empty_l, |b| &b.labels);
    let keys: BTreeSet<&String> = bl.keys().chain(a.labels.keys()).collect();
    for k in keys {
        match (bl.get(k), a.labels.get(k)) {
            (Some(x), Some(y)) if x != y => out.push(change(format!("label {k}: {x} -> {y}"), false)),
            (None, Some(y)) => out.push(change(format!("label {k}={y} added"), false)),
            (Some(x), None) => out.push(change(format!("label {k}={x} removed"), false)),
            _ => {}
        }
    }
    let empty_t = Vec::new();
    let bt: BTreeMap<(&str, _), &Taint> = b
        .map_or(&empty_t, |b| &b.taints)
        .iter()
        .map(|t| ((t.key.as_str(), t.effect), t))
        .collect();
    let at: BTreeMap<(&str, _), &Taint> = a.taints.iter().map(|t| ((t.key.as_str(), t.effect), t)).collect();
    let keys: BTreeSet<_> = bt.keys().chain(at.keys()).copied().collect();
    for k in keys {
        match (bt.get(&k), at.get(&k)) {
            (Some(x), Some(y)) if x.value != y.value => out.push(change(
                format!(
                    "taint {}:{}: {} -> {}",
                    k.0,
                    k.1,
                    quoted_value(&x.value),
                    quoted_value(&y.value)
                ),
                false,
            )),
            (None, Some(y)) => out.push(change(format!("taint {y} added"), false)),
            (Some(x), None) => out.push(change(format!("taint {x} removed"), false)),
            _ => {}
        }
    }
    let empty_s = Vec::new();
    let bs = b.map_or(&empty_s, |b| &b.storage);
    let names: BTreeSet<&String> = bs.iter().chain(a.storage.iter()).map(|v| &v.name).collect();
    for n in names {
        let (x, y) = (
            bs.iter().find(|v| &v.name == n),
            a.storage.iter().find(|v| &v.name == n),
        );
        let disks = |v: &storage::Volume| v.disks.iter().map(|d| d.by_id.as_str()).collect::<Vec<_>>().join(", ");
        match (x, y) {
            (None, Some(y)) => out.push(change(format!("storage {n} added: {}", disks(y)), false)),
            (Some(_), None) => out.push(change(format!("storage {n} removed"), false)),
            (Some(x), Some(y)) if x != y => {
                out.push(change(format!("storage {n}: {} -> {}", disks(x), disks(y)), false));
            }
            _ => {}
        }
    }
    out
}

fn quoted_value(v: &str) -> &str {
    if v.is_empty() { "(empty)" } else { v }
}
