//! The store file: replicated data stores and production demand, parsed from YAML with positions.
//!
//! Parsing uses `serde_norway` with `deny_unknown_fields` everywhere. Syntax errors, unknown fields
//! and wrong types carry the parser's line and column. Cross-field rules (one of `commit_budget` and
//! `target_rate`, `wait_for ≤ replicas`, …) are checked *inside* the mapping's visitor, so their errors
//! carry the position of the store's mapping as well. See the crate docs for the schema.

use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::matrix::NodeId;
use crate::physics::{MIN_ZONE_SHARE_PERCENT, budget_from_rate};
use crate::settings::PlanConfig;
use crate::units::{Nanos, opt_duration_with_unit};

const HINT_SEP: &str = "\nhint: ";

/// Joins a message and a hint so that [`parse_stores`] can split them again.
pub(crate) fn with_hint(message: &str, hint: &str) -> String {
    format!("{message}{HINT_SEP}{hint}")
}

/// A store file that could not be read. `Display` gives the position, the problem and a hint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}; hint: {hint}", position(*line, *column))]
pub struct StoreFileError {
    /// 1-based line of the problem, when the parser knows it.
    pub line: Option<usize>,
    /// 1-based column of the problem, when the parser knows it.
    pub column: Option<usize>,
    /// What is wrong, with the path of the offending key (e.g. `galera[1]: unknown field ...`).
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

impl StoreFileError {
    fn from_yaml(err: &serde_norway::Error) -> StoreFileError {
        let location = err.location();
        let (line, column) = (
            location.as_ref().map(|l| l.line()),
            location.as_ref().map(|l| l.column()),
        );
        let mut text = err.to_string();
        if let (Some(l), Some(c)) = (line, column) {
            let suffix = format!(" at line {l} column {c}");
            if let Some(pos) = text.find(&suffix) {
                text.replace_range(pos..pos + suffix.len(), "");
            }
        }
        let (message, hint) = match text.split_once(HINT_SEP) {
            Some((m, h)) => (m.to_string(), h.trim().to_string()),
            None => {
                let hint = generic_hint(&text).to_string();
                (text, hint)
            }
        };
        StoreFileError {
            line,
            column,
            message,
            hint,
        }
    }
}

fn generic_hint(message: &str) -> &'static str {
    if message.contains("unknown field") {
        "check the spelling; the fields allowed here are listed above and in planner/examples/stores.yaml"
    } else if message.contains("missing field") {
        "add the field; planner/examples/stores.yaml shows every field"
    } else if message.contains("invalid type") || message.contains("invalid value") {
        "durations are strings with a unit (`0.3ms`), counts and rates are plain integers, node lists are \
         sequences, and each store kind holds a list of mappings"
    } else if message.contains("unknown variant") {
        "use one of the values listed"
    } else if message.contains("duplicate field") {
        "a key appears twice in this mapping; keep one"
    } else {
        "fix the YAML at this position (indentation, a missing `:` or an unclosed bracket or quote)"
    }
}

/// Parses a store file. Errors carry line, column and a hint.
pub fn parse_stores(yaml: &str) -> Result<StoreFile, StoreFileError> {
    let blank = yaml.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if blank {
        return Ok(StoreFile::default());
    }
    serde_norway::from_str(yaml).map_err(|e| StoreFileError::from_yaml(&e))
}

/// Deserializes the raw mapping `R` and converts it to `T` inside the map visitor, so that a conversion
/// error gets the mapping's position from `serde_norway`.
struct Checked<R, T>(PhantomData<(R, T)>);

impl<'de, R, T> Visitor<'de> for Checked<R, T>
where
    R: Deserialize<'de>,
    T: TryFrom<R, Error = String>,
{
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let raw = R::deserialize(de::value::MapAccessDeserializer::new(map))?;
        T::try_from(raw).map_err(de::Error::custom)
    }
}

fn checked<'de, D, R, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    R: Deserialize<'de>,
    T: TryFrom<R, Error = String>,
{
    d.deserialize_map(Checked::<R, T>(PhantomData))
}

/// The whole store file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreFile {
    /// Planner thresholds.
    pub settings: PlanConfig,
    /// Production demand for the per-zone capacity check.
    pub production: Option<Production>,
    /// Galera / Percona XtraDB multi-master clusters.
    pub galera: Vec<GaleraSpec>,
    /// MySQL semi-synchronous replication groups.
    pub semi_sync: Vec<SemiSyncSpec>,
    /// Kafka clusters producing with `acks=all`.
    pub kafka: Vec<KafkaSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    settings: PlanConfig,
    #[serde(default)]
    production: Option<Production>,
    #[serde(default)]
    galera: Vec<GaleraSpec>,
    #[serde(default)]
    semi_sync: Vec<SemiSyncSpec>,
    #[serde(default)]
    kafka: Vec<KafkaSpec>,
}

impl TryFrom<RawFile> for StoreFile {
    type Error = String;

    fn try_from(raw: RawFile) -> Result<StoreFile, String> {
        let mut seen = BTreeSet::new();
        let names = raw
            .galera
            .iter()
            .map(|s| &s.common.name)
            .chain(raw.semi_sync.iter().map(|s| &s.common.name))
            .chain(raw.kafka.iter().map(|s| &s.common.name));
        for name in names {
            if !seen.insert(name.clone()) {
                return Err(with_hint(
                    &format!("store name {name:?} is used twice"),
                    "store names key the plan and the helm values; give each store its own name",
                ));
            }
        }
        if raw.settings.zone_threshold > raw.settings.zone_max_rtt {
            return Err(with_hint(
                &format!(
                    "settings.zone_threshold ({}) is above settings.zone_max_rtt ({})",
                    raw.settings.zone_threshold, raw.settings.zone_max_rtt
                ),
                "clustering must join only nodes closer than a zone may span; lower zone_threshold",
            ));
        }
        Ok(StoreFile {
            settings: raw.settings,
            production: raw.production,
            galera: raw.galera,
            semi_sync: raw.semi_sync,
            kafka: raw.kafka,
        })
    }
}

impl<'de> Deserialize<'de> for StoreFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<StoreFile, D::Error> {
        checked::<D, RawFile, StoreFile>(d)
    }
}

/// Declared production demand: every production zone must carry `min_zone_share_percent` of each entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Production {
    /// Share of demand each zone must carry, in percent. Default 66.
    pub min_zone_share_percent: u32,
    /// The zones that count; `None` means every zone with a node.
    pub zones: Option<Vec<String>>,
    /// Demand per pool (or for all nodes).
    pub demand: Vec<Demand>,
}

/// Demand of one workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demand {
    /// Only nodes of this pool count; `None` counts every node.
    #[serde(default)]
    pub pool: Option<String>,
    /// Total demand in the unit of the nodes' capacity (e.g. millicores of allocatable CPU).
    pub capacity: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProduction {
    #[serde(default)]
    min_zone_share_percent: Option<u32>,
    #[serde(default)]
    zones: Option<Vec<String>>,
    demand: Vec<Demand>,
}

impl TryFrom<RawProduction> for Production {
    type Error = String;

    fn try_from(raw: RawProduction) -> Result<Production, String> {
        let pct = raw.min_zone_share_percent.unwrap_or(MIN_ZONE_SHARE_PERCENT);
        if pct == 0 || pct > 100 {
            return Err(with_hint(
                &format!("min_zone_share_percent is {pct}"),
                "use a percentage from 1 to 100 (66 lets any two of three zones carry all of production)",
            ));
        }
        if raw.demand.is_empty() {
            return Err(with_hint(
                "production.demand is empty",
                "list at least one demand, e.g. `- capacity: 24000`",
            ));
        }
        if let Some(d) = raw.demand.iter().find(|d| d.capacity == 0) {
            return Err(with_hint(
                &format!(
                    "a demand{} has capacity 0",
                    d.pool.as_ref().map(|p| format!(" for pool {p}")).unwrap_or_default()
                ),
                "give the total demand in the unit of the nodes' capacity, or drop the entry",
            ));
        }
        if raw.zones.as_ref().is_some_and(Vec::is_empty) {
            return Err(with_hint(
                "production.zones is empty",
                "omit `zones` to count every zone, or list them",
            ));
        }
        Ok(Production {
            min_zone_share_percent: pct,
            zones: raw.zones,
            demand: raw.demand,
        })
    }
}

impl<'de> Deserialize<'de> for Production {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Production, D::Error> {
        checked::<D, RawProduction, Production>(d)
    }
}

/// Which nodes are members of a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberSelection {
    /// Chosen by the planner from a pool: `count` nodes spread over zones (most central zone first), or
    /// every node of the pool when `count` is `None`.
    Pool {
        /// The pool name (as in the node facts).
        pool: String,
        /// How many nodes.
        count: Option<u32>,
    },
    /// Exactly these nodes.
    Explicit(Vec<NodeId>),
}

/// Where a store's commit budget came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum BudgetSource {
    /// `commit_budget` was declared.
    Declared,
    /// Derived from `target_rate` and `max_dop`: `max_dop × 1 s / target_rate − txn_time`.
    TargetRate {
        /// Transactions per second.
        target_rate: u64,
    },
}

/// What every store kind declares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoreCommon {
    /// Unique name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The members.
    pub members: MemberSelection,
    /// Time a transaction spends executing, before its commit waits for replication. Default 0.
    pub txn_time: Nanos,
    /// The replication round trip a commit may take; a member fits when its latency is strictly below.
    pub budget: Nanos,
    /// Where `budget` came from.
    pub budget_source: BudgetSource,
    /// Transactions in flight in parallel (the deck's `max_dop`). Default 1.
    pub max_dop: u32,
}

/// A Galera / Percona XtraDB multi-master cluster: a commit is certified by every member, so it runs at
/// the speed of the slowest member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GaleraSpec {
    /// Name, members, times and budget. With a pool, `replicas` nodes are chosen.
    pub common: StoreCommon,
}

/// A MySQL semi-synchronous group: the source waits for `wait_for` replica acknowledgements.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SemiSyncSpec {
    /// Name, members (source and replicas), times and budget. With a pool, `replicas + 1` nodes are chosen.
    pub common: StoreCommon,
    /// `rpl_semi_sync_source_wait_for_replica_count` (k). Default 1, as in MySQL.
    pub wait_for: u32,
    /// The source; when absent the planner picks the member with the fastest k-th acknowledgement.
    pub source: Option<NodeId>,
}

/// A Kafka cluster producing with `acks=all`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KafkaSpec {
    /// Name, brokers, times and budget. With a pool, `brokers` nodes are chosen (all when absent).
    pub common: StoreCommon,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// `min.insync.replicas`.
    pub min_insync_replicas: u32,
}

/// The producer acknowledgement mode. Only `all` is planned: with `acks=1` a produce does not wait for
/// replication at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Acks {
    /// `acks=all` (`-1`).
    All,
}

struct CommonFields {
    name: String,
    pool: Option<String>,
    members: Option<Vec<NodeId>>,
    txn_time: Option<Nanos>,
    commit_budget: Option<Nanos>,
    target_rate: Option<u64>,
    max_dop: Option<u32>,
}

/// Validates the fields every kind shares. `count` is the kind's count field (`replicas`/`brokers`) and
/// `extra_members` how many members a selection holds beyond it (1 for a semi-sync source).
fn common(f: CommonFields, count_field: &str, count: Option<u32>, extra_members: u32) -> Result<StoreCommon, String> {
    let name = f.name.trim().to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(with_hint(
            &format!("store name {:?} is not usable", f.name),
            "use letters, digits, `-`, `_` and `.` only; the name keys the helm values",
        ));
    }
    let members = match (f.pool, f.members) {
        (Some(_), Some(_)) => {
            return Err(with_hint(
                &format!("store {name} sets both `pool` and `members`"),
                "keep `pool` to let the planner choose members, or `members` to name them",
            ));
        }
        (None, None) => {
            return Err(with_hint(
                &format!("store {name} sets neither `pool` nor `members`"),
                "add `pool: <pool name>` (and a count) or `members: [node, ...]`",
            ));
        }
        (Some(pool), None) => MemberSelection::Pool {
            pool,
            count: count.map(|c| c + extra_members),
        },
        (None, Some(list)) => {
            let unique: BTreeSet<&NodeId> = list.iter().collect();
            if list.is_empty() || unique.len() != list.len() {
                return Err(with_hint(
                    &format!("store {name}: `members` is empty or names a node twice"),
                    "list each member once",
                ));
            }
            if let Some(c) = count {
                let wanted = c + extra_members;
                if usize::try_from(wanted).ok() != Some(list.len()) {
                    return Err(with_hint(
                        &format!(
                            "store {name}: `{count_field}: {c}` does not match the {} listed members",
                            list.len()
                        ),
                        &format!("drop `{count_field}` (it follows from `members`) or make them agree"),
                    ));
                }
            }
            MemberSelection::Explicit(list)
        }
    };
    if count == Some(0) {
        return Err(with_hint(
            &format!("store {name}: `{count_field}` is 0"),
            "a replicated store needs members",
        ));
    }
    let max_dop = f.max_dop.unwrap_or(1);
    if max_dop == 0 {
        return Err(with_hint(
            &format!("store {name}: max_dop is 0"),
            "max_dop counts parallel streams; use 1 or more",
        ));
    }
    let txn_time = f.txn_time.unwrap_or(Nanos::ZERO);
    let (budget, budget_source) = match (f.commit_budget, f.target_rate) {
        (Some(_), Some(_)) => {
            return Err(with_hint(
                &format!("store {name} sets both `commit_budget` and `target_rate`"),
                "keep one: the budget follows from the rate as max_dop / target_rate − txn_time",
            ));
        }
        (None, None) => {
            return Err(with_hint(
                &format!("store {name} sets neither `commit_budget` nor `target_rate`"),
                "add `commit_budget: 0.3ms`, or `target_rate: <tx/s>` with `max_dop` and `txn_time`",
            ));
        }
        (Some(b), None) => {
            if b == Nanos::ZERO {
                return Err(with_hint(
                    &format!("store {name}: commit_budget is 0"),
                    "no replication fits a zero budget",
                ));
            }
            (b, BudgetSource::Declared)
        }
        (None, Some(rate)) => match budget_from_rate(rate, max_dop, txn_time) {
            Some(b) => (b, BudgetSource::TargetRate { target_rate: rate }),
            None => {
                return Err(with_hint(
                    &format!(
                        "store {name}: at {rate} tx/s with max_dop {max_dop}, txn_time {txn_time} leaves no time to commit"
                    ),
                    "raise max_dop, lower target_rate or shorten txn_time",
                ));
            }
        },
    };
    Ok(StoreCommon {
        name,
        members,
        txn_time,
        budget,
        budget_source,
        max_dop,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGalera {
    name: String,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    members: Option<Vec<NodeId>>,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration_with_unit")]
    txn_time: Option<Nanos>,
    #[serde(default, deserialize_with = "opt_duration_with_unit")]
    commit_budget: Option<Nanos>,
    #[serde(default)]
    target_rate: Option<u64>,
    #[serde(default)]
    max_dop: Option<u32>,
}

impl TryFrom<RawGalera> for GaleraSpec {
    type Error = String;

    fn try_from(r: RawGalera) -> Result<GaleraSpec, String> {
        if r.pool.is_some() && r.replicas.is_none() {
            return Err(with_hint(
                &format!(
                    "galera store {} takes members from a pool but sets no `replicas`",
                    r.name
                ),
                "add `replicas: 3` (Galera needs at least three members for quorum)",
            ));
        }
        let f = CommonFields {
            name: r.name,
            pool: r.pool,
            members: r.members,
            txn_time: r.txn_time,
            commit_budget: r.commit_budget,
            target_rate: r.target_rate,
            max_dop: r.max_dop,
        };
        Ok(GaleraSpec {
            common: common(f, "replicas", r.replicas, 0)?,
        })
    }
}

impl<'de> Deserialize<'de> for GaleraSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GaleraSpec, D::Error> {
        checked::<D, RawGalera, GaleraSpec>(d)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSemiSync {
    name: String,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    members: Option<Vec<NodeId>>,
    #[serde(default)]
    replicas: Option<u32>,
    #[serde(default)]
    wait_for: Option<u32>,
    #[serde(default)]
    source: Option<NodeId>,
    #[serde(default, deserialize_with = "opt_duration_with_unit")]
    txn_time: Option<Nanos>,
    #[serde(default, deserialize_with = "opt_duration_with_unit")]
    commit_budget: Option<Nanos>,
    #[serde(default)]
    target_rate: Option<u64>,
    #[serde(default)]
    max_dop: Option<u32>,
}

impl TryFrom<RawSemiSync> for SemiSyncSpec {
    type Error = String;

    fn try_from(r: RawSemiSync) -> Result<SemiSyncSpec, String> {
        let name = r.name.clone();
        if r.pool.is_some() && r.replicas.is_none() {
            return Err(with_hint(
                &format!("semi_sync store {name} takes members from a pool but sets no `replicas`"),
                "add `replicas: <n>` (replicas besides the source)",
            ));
        }
        let replicas = match (&r.members, r.replicas) {
            (_, Some(n)) => n,
            (Some(list), None) => u32::try_from(list.len().saturating_sub(1)).unwrap_or(u32::MAX),
            (None, None) => 0,
        };
        let wait_for = r.wait_for.unwrap_or(1);
        if wait_for == 0 || (replicas > 0 && wait_for > replicas) {
            return Err(with_hint(
                &format!("semi_sync store {name}: wait_for is {wait_for} with {replicas} replica(s)"),
                "wait_for (rpl_semi_sync_source_wait_for_replica_count) must be between 1 and the replica count",
            ));
        }
        if let (Some(src), Some(list)) = (&r.source, &r.members)
            && !list.contains(src)
        {
            return Err(with_hint(
                &format!("semi_sync store {name}: source {src} is not among `members`"),
                "list the source in `members` too",
            ));
        }
        if r.members.as_ref().is_some_and(|l| l.len() < 2) {
            return Err(with_hint(
                &format!("semi_sync store {name} lists fewer than two members"),
                "list the source and at least one replica",
            ));
        }
        let f = CommonFields {
            name: r.name,
            pool: r.pool,
            members: r.members,
            txn_time: r.txn_time,
            commit_budget: r.commit_budget,
            target_rate: r.target_rate,
            max_dop: r.max_dop,
        };
        Ok(SemiSyncSpec {
            common: common(f, "replicas", r.replicas, 1)?,
            wait_for,
            source: r.source,
        })
    }
}

impl<'de> Deserialize<'de> for SemiSyncSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SemiSyncSpec, D::Error> {
        checked::<D, RawSemiSync, SemiSyncSpec>(d)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    name: String,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    members: Option<Vec<NodeId>>,
    #[serde(default)]
    brokers: Option<u32>,
    replication_factor: u32,
    min_insync_replicas: u32,
    #[serde(default)]
    acks: Option<Acks>,
    #[serde(default, deserialize_with = "opt_duration_with_unit")]
    txn_time: Option<Nanos>,
    #[serde(default, deserialize_with = "opt_duration_with_unit")]
    commit_budget: Option<Nanos>,
    #[serde(default)]
    target_rate: Option<u64>,
    #[serde(default)]
    max_dop: Option<u32>,
}

impl TryFrom<RawKafka> for KafkaSpec {
    type Error = String;

    fn try_from(r: RawKafka) -> Result<KafkaSpec, String> {
        let name = r.name.clone();
        let (rf, isr) = (r.replication_factor, r.min_insync_replicas);
        if rf == 0 || isr == 0 || isr > rf {
            return Err(with_hint(
                &format!("kafka store {name}: min_insync_replicas {isr} with replication_factor {rf}"),
                "use 1 ≤ min_insync_replicas ≤ replication_factor (commonly 2 of 3)",
            ));
        }
        let brokers = r
            .brokers
            .or_else(|| r.members.as_ref().and_then(|l| u32::try_from(l.len()).ok()));
        if let Some(b) = brokers
            && rf > b
        {
            return Err(with_hint(
                &format!("kafka store {name}: replication_factor {rf} exceeds the {b} broker(s)"),
                "each replica of a partition needs its own broker; add brokers or lower replication_factor",
            ));
        }
        let _acks_all = r.acks.unwrap_or(Acks::All);
        let f = CommonFields {
            name: r.name,
            pool: r.pool,
            members: r.members,
            txn_time: r.txn_time,
            commit_budget: r.commit_budget,
            target_rate: r.target_rate,
            max_dop: r.max_dop,
        };
        Ok(KafkaSpec {
            common: common(f, "brokers", r.brokers, 0)?,
            replication_factor: rf,
            min_insync_replicas: isr,
        })
    }
}

impl<'de> Deserialize<'de> for KafkaSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<KafkaSpec, D::Error> {
        checked::<D, RawKafka, KafkaSpec>(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/stores.yaml");

    #[test]
    fn example_file_parses() {
        let file = parse_stores(EXAMPLE).unwrap();
        assert_eq!(file.galera.len(), 1);
        assert_eq!(file.semi_sync.len(), 1);
        assert_eq!(file.kafka.len(), 1);
        let ledger = &file.galera[0].common;
        assert_eq!(ledger.budget, Nanos::from_micros(300));
        assert_eq!(ledger.budget_source, BudgetSource::Declared);
        let accounts = &file.semi_sync[0];
        // 2 000 tx/s with max_dop 1: 0.5 ms window − 0.2 ms txn = 0.3 ms.
        assert_eq!(accounts.common.budget, Nanos::from_micros(300));
        assert_eq!(
            accounts.common.budget_source,
            BudgetSource::TargetRate { target_rate: 2_000 }
        );
        assert_eq!(file.production.as_ref().unwrap().min_zone_share_percent, 66);
    }

    #[test]
    fn blank_file_is_empty() {
        assert_eq!(parse_stores("# nothing yet\n\n").unwrap(), StoreFile::default());
    }

    #[test]
    fn unknown_field_has_line_and_column() {
        let yaml =
            "galera:\n  - name: ledger\n    pool: db\n    replicas: 3\n    commit_budget: 0.3ms\n    replcas: 3\n";
        let err = parse_stores(yaml).unwrap_err();
        assert_eq!((err.line, err.column), (Some(6), Some(5)), "{err}");
        assert!(err.message.contains("unknown field `replcas`"), "{err}");
        assert!(err.hint.contains("spelling"), "{err}");
        assert!(
            err.to_string()
                .starts_with("line 6, column 5: galera[0]: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_has_line_and_column() {
        let yaml = "kafka:\n  - name: events\n    pool: kafka\n    replication_factor: three\n    min_insync_replicas: 2\n    commit_budget: 2ms\n";
        let err = parse_stores(yaml).unwrap_err();
        assert_eq!((err.line, err.column), (Some(4), Some(25)), "{err}");
        assert!(err.message.contains("invalid type"), "{err}");
        assert!(err.hint.contains("plain integers"), "{err}");
    }

    #[test]
    fn duration_without_unit_points_at_the_scalar() {
        let yaml = "galera:\n  - name: ledger\n    pool: db\n    replicas: 3\n    commit_budget: \"300\"\n";
        let err = parse_stores(yaml).unwrap_err();
        assert_eq!((err.line, err.column), (Some(5), Some(20)), "{err}");
        assert!(err.message.contains("has no unit"), "{err}");
        assert!(err.hint.contains("durations are strings with a unit"), "{err}");
        // A bare number is refused the same way (not guessed as nanoseconds or milliseconds).
        let err = parse_stores(&yaml.replace("\"300\"", "300")).unwrap_err();
        assert_eq!((err.line, err.column), (Some(5), Some(20)), "{err}");
        assert!(err.message.contains("has no unit"), "{err}");
        // A sequence is a type error at the same place.
        let err = parse_stores(&yaml.replace("\"300\"", "[1]")).unwrap_err();
        assert_eq!((err.line, err.column), (Some(5), Some(20)), "{err}");
        assert!(err.message.contains("expected a duration with a unit"), "{err}");
    }

    #[test]
    fn cross_field_rules_point_at_the_store() {
        let yaml = "galera:\n  - name: ok\n    members: [a, b, c]\n    commit_budget: 1ms\n  - name: both\n    members: [a, b, c]\n    commit_budget: 1ms\n    target_rate: 100\n";
        let err = parse_stores(yaml).unwrap_err();
        assert_eq!((err.line, err.column), (Some(5), Some(5)), "{err}");
        assert!(err.message.contains("both `commit_budget` and `target_rate`"), "{err}");
        assert!(err.hint.contains("keep one"), "{err}");

        let yaml = "semi_sync:\n  - name: s\n    pool: db\n    replicas: 2\n    wait_for: 3\n    commit_budget: 1ms\n";
        let err = parse_stores(yaml).unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.message.contains("wait_for is 3 with 2 replica(s)"), "{err}");

        let yaml = "kafka:\n  - name: k\n    pool: kafka\n    brokers: 2\n    replication_factor: 3\n    min_insync_replicas: 2\n    commit_budget: 1ms\n";
        let err = parse_stores(yaml).unwrap_err();
        assert!(err.message.contains("exceeds the 2 broker(s)"), "{err}");

        let yaml = "galera:\n  - name: g\n    members: [a]\n    commit_budget: 1ms\n  - name: g\n    members: [b]\n    commit_budget: 1ms\n";
        let err = parse_stores(yaml).unwrap_err();
        assert!(err.message.contains("used twice"), "{err}");

        let yaml = "galera:\n  - name: g\n    members: [a, b]\n    txn_time: 1ms\n    target_rate: 1000\n";
        let err = parse_stores(yaml).unwrap_err();
        assert!(err.message.contains("leaves no time to commit"), "{err}");
    }

    #[test]
    fn syntax_and_variant_errors() {
        let err = parse_stores("galera: [\n").unwrap_err();
        assert!(err.line.is_some() && err.column.is_some(), "{err}");
        assert!(err.hint.contains("fix the YAML"), "{err}");
        let yaml = "kafka:\n  - name: k\n    members: [a, b, c]\n    replication_factor: 3\n    min_insync_replicas: 2\n    acks: 1\n    commit_budget: 1ms\n";
        let err = parse_stores(yaml).unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        let err = parse_stores("settings:\n  zone_threshold: 3ms\n").unwrap_err();
        assert!(err.message.contains("zone_threshold"), "{err}");
        let err = parse_stores("stores: []\n").unwrap_err();
        assert_eq!((err.line, err.column), (Some(1), Some(1)), "{err}");
    }
}
