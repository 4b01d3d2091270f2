//! Replication planning from measured latency: turns the latest windows into a
//! `planner::LatencyMatrix`, the nodes into `planner::NodeFacts` (name, declared
//! zone from cloud metadata, `pool` label from the join token, CPU threads as
//! capacity), and plans the operator's stores file. A kept stores file is
//! re-planned every probe window; drift out of budget is logged as a warning
//! event and counted (`nimbus_replication_drift_events_total{kind}`).
//!
//! Nodes are named by their node **names** in plans, so a stores file can list
//! members the way operators see them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use nimbus_proto::LatencyWindow;
use planner::{LatencyMatrix, LinkStats, Nanos, NodeFacts};
use tokio::sync::watch;

use crate::context::Ctx;
use crate::state::{HardwareRecord, NodeRecord, NodeStatus};

/// Where a kept stores file lives in the store.
pub const KEPT_STORES: &str = "replication-stores";

/// The matrix from the newest window of each pair (ids mapped to names; unmeasured windows left out).
pub fn matrix(latest: &[(String, String, LatencyWindow)], name_of: &HashMap<String, String>) -> LatencyMatrix {
    let mut m = LatencyMatrix::new();
    for (a, b, w) in latest {
        let (Some(a), Some(b)) = (name_of.get(a), name_of.get(b)) else {
            continue;
        };
        if w.sent == 0 {
            continue;
        }
        let loss = f64::from(w.lost) / f64::from(w.sent);
        let stats = LinkStats {
            p50: Nanos(w.p50_ns),
            p99: Nanos(w.p99_ns),
            jitter: Nanos(w.jitter_ns),
            loss_ppm: LinkStats::loss_ppm_from_ratio(loss),
            samples: u64::from(w.samples),
        };
        m.insert(a, b, stats);
    }
    m
}

/// Planner facts of the active nodes.
pub fn facts(nodes: &[(NodeRecord, Option<HardwareRecord>)]) -> Vec<NodeFacts> {
    nodes
        .iter()
        .filter(|(n, _)| n.status == NodeStatus::Active)
        .map(|(n, hw)| {
            let mut f = NodeFacts::new(&n.name);
            if let Some(z) = hw.as_ref().and_then(|h| h.document.platform.zone.as_deref()) {
                f = f.with_zone(z);
            }
            if let Some(p) = n.labels.get("pool") {
                f = f.with_pool(p);
            }
            if let Some(c) = hw.as_ref().and_then(|h| h.document.cpu.threads) {
                f = f.with_capacity(u64::from(c));
            }
            f.labels = n.labels.clone();
            f
        })
        .collect()
}

/// Everything the planner needs, read now.
pub async fn inputs(ctx: &Ctx) -> Result<(Vec<NodeFacts>, LatencyMatrix), tonic::Status> {
    let nodes = ctx
        .state(|s| {
            s.list_nodes()?
                .into_iter()
                .map(|n| {
                    let hw = s.hardware(&n.id)?;
                    Ok((n, hw))
                })
                .collect::<Result<Vec<_>, crate::state::StateError>>()
        })
        .await?;
    let name_of: HashMap<String, String> = nodes.iter().map(|(n, _)| (n.id.clone(), n.name.clone())).collect();
    Ok((facts(&nodes), matrix(&ctx.probes.latest(), &name_of)))
}

/// Parse and plan `yaml`; errors carry line and column.
pub async fn plan(ctx: &Ctx, yaml: &str) -> Result<planner::Plan, tonic::Status> {
    let file = planner::parse_stores(yaml).map_err(|e| {
        let at = match (e.line, e.column) {
            (Some(l), Some(c)) => format!("line {l}, column {c}: "),
            _ => String::new(),
        };
        tonic::Status::invalid_argument(format!("stores file: {at}{}; {}", e.message, e.hint))
    })?;
    let (facts, matrix) = inputs(ctx).await?;
    Ok(planner::plan(&file, &facts, &matrix))
}

/// Re-plan a kept stores file every `every`; log and count drift out of budget.
pub async fn watch_drift(ctx: Arc<Ctx>, every: std::time::Duration, mut shutdown: watch::Receiver<bool>) {
    let previous: Mutex<Option<planner::Plan>> = Mutex::new(None);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let kept = match ctx.state(|s| s.config_blob(KEPT_STORES)).await {
            Ok(Some(y)) => y,
            _ => continue,
        };
        let Ok(yaml) = String::from_utf8(kept) else { continue };
        let current = match plan(&ctx, &yaml).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e.message(), "kept stores file no longer plans");
                continue;
            }
        };
        let mut prev = previous.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = prev.as_ref() {
            for event in planner::drift(old, &current) {
                ctx.metrics.replication_drift(event.kind());
                tracing::warn!(store = event.store(), kind = event.kind(), "replication drift: {event}");
            }
        }
        *prev = Some(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_become_links_by_name_with_loss() {
        let w = LatencyWindow {
            sent: 10,
            samples: 7,
            lost: 3,
            p50_ns: 250_000,
            p99_ns: 300_000,
            ..Default::default()
        };
        let latest = vec![
            ("n1".to_string(), "n2".to_string(), w.clone()),
            ("n1".to_string(), "gone".to_string(), w),
            ("n2".to_string(), "n1".to_string(), LatencyWindow::default()),
        ];
        let names: HashMap<String, String> = [
            ("n1".to_string(), "db-1".to_string()),
            ("n2".to_string(), "db-2".to_string()),
        ]
        .into();
        let m = matrix(&latest, &names);
        assert_eq!(m.len(), 1, "unknown nodes and empty windows are left out");
        let link = m.link("db-1", "db-2").unwrap();
        assert_eq!(
            (link.p50, link.p99, link.loss_ppm, link.samples),
            (Nanos(250_000), Nanos(300_000), 300_000, 7)
        );
    }
}
