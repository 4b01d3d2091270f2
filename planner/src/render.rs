//! Output: a human `Display` of the plan and helm values.
//!
//! # Helm values shape
//!
//! [`to_helm_values`] returns a mapping with one top-level key, `replication`, to paste into a chart's
//! values (durations as whole microseconds, rounded up):
//!
//! ```yaml
//! replication:
//!   zones:                      # zone → nodes
//!     zone-a: [db-a1, db-a2]
//!   stores:
//!     ledger:                   # store name
//!       kind: galera            # galera | semi_sync | kafka
//!       fitsBudget: true
//!       budgetMicros: 300
//!       commitMicros: 250       # absent when unknown
//!       synchronous: [db-a1, db-b1, db-a2]
//!       asynchronous: [db-c1]
//!       config:                 # galera
//!         wsrep_provider_options: evs.suspect_timeout=PT5S;evs.inactive_timeout=PT15S;gmcast.peer_timeout=PT3S
//!     accounts:
//!       kind: semi_sync
//!       source: db-a1           # semi_sync only
//!       config:
//!         rpl_semi_sync_source_timeout: 10000
//!         rpl_semi_sync_source_wait_for_replica_count: 1
//!     events:
//!       kind: kafka
//!       config:
//!         replica.lag.time.max.ms: 30000
//!         min.insync.replicas: 2
//!         default.replication.factor: 3
//! ```

use std::fmt;

use serde_norway::{Mapping, Value};

use crate::findings::Severity;
use crate::plan::{Mode, Plan, Role, StoreDetail, StorePlan};
use crate::spec::BudgetSource;
use crate::units::Nanos;
use crate::zones::ZoneSource;

/// Helm output could not be written as YAML.
#[derive(Debug, thiserror::Error)]
#[error("could not write the helm values as YAML: {0}; this is a bug in the planner, please report it")]
pub struct RenderError(#[from] serde_norway::Error);

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
    Value::Sequence(items.into_iter().map(|s| Value::String(s.to_string())).collect())
}

fn store_values(s: &StorePlan) -> Value {
    let mut m = Mapping::new();
    m.insert(key("kind"), key(s.kind().as_str()));
    m.insert(key("fitsBudget"), Value::Bool(s.fits_budget));
    m.insert(key("budgetMicros"), Value::from(s.budget.as_micros_ceil()));
    if let Some(c) = s.commit {
        m.insert(key("commitMicros"), Value::from(c.as_micros_ceil()));
    }
    m.insert(key("synchronous"), strings(s.synchronous()));
    m.insert(key("asynchronous"), strings(s.asynchronous()));
    let mut config = Mapping::new();
    match &s.detail {
        StoreDetail::Galera => {
            let options: Vec<String> = s
                .timeouts
                .iter()
                .map(|t| format!("{}={}", t.parameter, t.value))
                .collect();
            config.insert(key("wsrep_provider_options"), key(&options.join(";")));
        }
        StoreDetail::SemiSync { source, wait_for } => {
            if let Some(src) = source {
                m.insert(key("source"), key(src));
            }
            for t in &s.timeouts {
                config.insert(key(&t.parameter), Value::from(t.recommended.as_millis_ceil()));
            }
            config.insert(
                key("rpl_semi_sync_source_wait_for_replica_count"),
                Value::from(*wait_for),
            );
        }
        StoreDetail::Kafka {
            replication_factor,
            min_insync_replicas,
            ..
        } => {
            for t in &s.timeouts {
                config.insert(key(&t.parameter), Value::from(t.recommended.as_millis_ceil()));
            }
            config.insert(key("min.insync.replicas"), Value::from(*min_insync_replicas));
            config.insert(key("default.replication.factor"), Value::from(*replication_factor));
        }
    }
    m.insert(key("config"), Value::Mapping(config));
    Value::Mapping(m)
}

/// The plan as helm values, in the shape documented in this module.
pub fn to_helm_values(plan: &Plan) -> Value {
    let mut zones = Mapping::new();
    for (zone, nodes) in plan.zones.members() {
        zones.insert(key(&zone), strings(nodes.iter().map(String::as_str)));
    }
    let mut stores = Mapping::new();
    for s in &plan.stores {
        stores.insert(key(&s.name), store_values(s));
    }
    let mut replication = Mapping::new();
    replication.insert(key("zones"), Value::Mapping(zones));
    replication.insert(key("stores"), Value::Mapping(stores));
    let mut root = Mapping::new();
    root.insert(key("replication"), Value::Mapping(replication));
    Value::Mapping(root)
}

/// [`to_helm_values`] written as a YAML document (what `nimbusctl plan replication -o yaml` prints).
pub fn to_helm_yaml(plan: &Plan) -> Result<String, RenderError> {
    Ok(serde_norway::to_string(&to_helm_values(plan))?)
}

fn opt(n: Option<Nanos>) -> String {
    n.map_or_else(|| "unknown".to_string(), |n| n.to_string())
}

fn km(metres: u64) -> String {
    let (k, m) = (metres / 1_000, metres % 1_000);
    if m == 0 {
        format!("{k} km")
    } else {
        format!("{k}.{} km", format!("{m:03}").trim_end_matches('0'))
    }
}

impl fmt::Display for StorePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.fits_budget { "fits" } else { "OVER BUDGET" };
        let source = match self.budget_source {
            BudgetSource::Declared => "declared".to_string(),
            BudgetSource::TargetRate { target_rate } => {
                format!("from {target_rate} tx/s at max_dop {}", self.max_dop)
            }
        };
        writeln!(f, "store {} ({}): {verdict}", self.name, self.kind().as_str())?;
        writeln!(
            f,
            "  budget {} ({source}), txn time {}, max_dop {}",
            self.budget, self.txn_time, self.max_dop
        )?;
        match self.margin {
            Some(m) => writeln!(f, "  predicted commit {} (margin {m})", opt(self.commit))?,
            None => writeln!(f, "  predicted commit {}", opt(self.commit))?,
        }
        writeln!(f, "  with every member synchronous: {}", opt(self.commit_as_declared))?;
        match &self.detail {
            StoreDetail::Galera => {}
            StoreDetail::SemiSync { source, wait_for } => writeln!(
                f,
                "  source {}, waits for {wait_for} acknowledgement(s)",
                source.as_deref().unwrap_or("none")
            )?,
            StoreDetail::Kafka {
                replication_factor,
                min_insync_replicas,
                full_isr,
            } => writeln!(
                f,
                "  replication factor {replication_factor}, min.insync.replicas {min_insync_replicas}, full-ISR \
                 latency {}",
                opt(*full_isr)
            )?,
        }
        let rate = match (self.commit, self.max_serial_rate) {
            (None, _) => "unknown".to_string(),
            (Some(_), None) => "unbounded".to_string(),
            (Some(_), Some(r)) => format!("{r} tx/s"),
        };
        let distance = self.max_link_distance_m.map_or_else(|| "none".to_string(), km);
        writeln!(
            f,
            "  max serial rate {rate}; longest fibre link within budget {distance}"
        )?;
        for (label, mode) in [("synchronous", Mode::Synchronous), ("asynchronous", Mode::Asynchronous)] {
            let list: Vec<String> = self
                .members
                .iter()
                .filter(|m| m.mode == mode)
                .map(|m| {
                    let zone = m.zone.as_deref().unwrap_or("?");
                    let role = if m.role == Role::Source { " (source)" } else { "" };
                    match m.latency {
                        Some(l) => format!("{} [{zone}]{role} {l}", m.node),
                        None => format!("{} [{zone}]{role}", m.node),
                    }
                })
                .collect();
            if !list.is_empty() {
                writeln!(f, "  {label}: {}", list.join(", "))?;
            }
        }
        for t in &self.timeouts {
            let note = if t.is_default() {
                "documented default"
            } else {
                "raised above the default"
            };
            writeln!(
                f,
                "  {} = {} ({note}; floor from measurements {})",
                t.parameter, t.value, t.floor
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "zones:")?;
        for (zone, nodes) in self.zones.members() {
            let inferred = nodes.iter().all(|n| {
                self.zones
                    .nodes
                    .get(n)
                    .is_some_and(|a| a.source == ZoneSource::Inferred)
            });
            let list: Vec<String> = nodes
                .iter()
                .map(|n| match self.zones.nodes.get(n).map(|a| a.source) {
                    Some(ZoneSource::Adopted) => format!("{n} (adopted)"),
                    _ => n.clone(),
                })
                .collect();
            writeln!(
                f,
                "  {zone}{}: {}",
                if inferred { " (inferred)" } else { "" },
                list.join(", ")
            )?;
        }
        for s in &self.stores {
            write!(f, "{s}")?;
        }
        for c in &self.capacity {
            let pool = c
                .pool
                .as_deref()
                .map_or_else(|| "all nodes".to_string(), |p| format!("pool {p}"));
            writeln!(
                f,
                "capacity ({pool}, demand {}, each zone ≥ {} %): {}; losing any one zone {}",
                c.demand,
                c.min_share_percent,
                if c.passes { "pass" } else { "FAIL" },
                if c.survives_zone_loss {
                    "leaves enough"
                } else {
                    "does NOT leave enough"
                }
            )?;
            for z in &c.zones {
                writeln!(
                    f,
                    "  {}: {} ({} %) {}",
                    z.zone,
                    z.capacity,
                    z.share_percent,
                    if z.passes { "ok" } else { "short" }
                )?;
            }
        }
        if !self.findings.is_empty() {
            writeln!(f, "findings:")?;
            for finding in &self.findings {
                let sev = match finding.severity() {
                    Severity::Info => "info",
                    Severity::Warning => "warning",
                };
                writeln!(f, "  {sev}: {finding}")?;
            }
        }
        Ok(())
    }
}
