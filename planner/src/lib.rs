//! Zone inference and replication timing plans from a measured latency matrix.
//!
//! Pure functions over data: the crate does no I/O besides parsing a YAML string. The coordinator
//! feeds it the measured matrix (per node pair: p50, p99, jitter, loss, samples) and the node facts
//! (declared zone, pool, labels, capacity); `nimbusctl plan replication -f stores.yaml` prints the
//! resulting [`Plan`] (its `Display`, or [`to_helm_yaml`] with `-o yaml`).
//!
//! ```
//! use planner::{LatencyMatrix, LinkStats, Nanos, NodeFacts, parse_stores, plan};
//!
//! let file = parse_stores("galera:\n  - name: ledger\n    members: [a, b, c]\n    commit_budget: 0.3ms\n").unwrap();
//! let mut matrix = LatencyMatrix::new();
//! let metro = LinkStats::from_rtt(Nanos::from_micros(200), Nanos::from_micros(250)); // 25 km of fibre
//! matrix.insert_symmetric("a", "b", metro);
//! matrix.insert_symmetric("a", "c", metro);
//! matrix.insert_symmetric("b", "c", metro);
//! let nodes = vec![NodeFacts::new("a"), NodeFacts::new("b"), NodeFacts::new("c")];
//! let p = plan(&file, &nodes, &matrix);
//! let ledger = p.store("ledger").unwrap();
//! assert!(ledger.fits_budget);
//! assert_eq!(ledger.margin.unwrap().to_string(), "0.05 ms");
//! ```
//!
//! # Layout
//!
//! * [`units`] — [`Nanos`] / [`SignedNanos`]: exact integer time, duration parsing (`0.3ms`) and display.
//! * [`physics`] — the deck's rules: fibre 5 µs/km each way, zones below 2 ms, strict-margin fit, longest
//!   link a budget allows, serial rate, budget from target rate and `max_dop`, the 66 % zone share.
//! * [`matrix`] — inputs: [`LatencyMatrix`] (directed measurements, symmetric queries), [`LinkStats`],
//!   [`NodeFacts`].
//! * [`zones`] — [`infer_zones`]: declared zones, single-linkage clustering for the rest, contradiction
//!   and coverage checks (algorithm and caveats in the module docs).
//! * [`spec`] — the store file: [`parse_stores`] into [`StoreFile`], errors with line, column and hint.
//! * [`settings`] — [`PlanConfig`], the thresholds of the `settings:` section.
//! * [`timeouts`] — recommended Galera / MySQL / Kafka timeouts: formulas and cited defaults.
//! * [`plan`](mod@plan) — [`plan()`](fn@plan): per-store commit latency, synchronous/asynchronous
//!   members, margin, rate, distance, timeouts; the per-zone capacity check.
//! * [`drift`](mod@drift) — [`drift()`](fn@drift): budget breaches between two plans as typed events.
//! * [`findings`] — [`Finding`] and [`Severity`]: everything noticed on the way.
//! * [`render`] — `Display` of a plan, [`to_helm_values`] / [`to_helm_yaml`].
//!
//! Invariant: no module performs I/O, reads the clock or spawns; every function is deterministic.
//!
//! # Store file schema
//!
//! Top-level keys (all optional, unknown keys are errors):
//!
//! | key | contents |
//! |---|---|
//! | `settings` | `zone_threshold` (duration, default `0.5ms`), `zone_max_rtt` (default `2ms`), `timeout_miss_ppm` (default 1) |
//! | `production` | `min_zone_share_percent` (default 66), `zones` (list; default every zone), `demand`: list of `{pool?, capacity}` |
//! | `galera` | list of Galera / Percona XtraDB clusters |
//! | `semi_sync` | list of MySQL semi-sync groups |
//! | `kafka` | list of Kafka clusters (`acks=all`) |
//!
//! Fields of every store:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `name` | string | unique; letters, digits, `-`, `_`, `.` |
//! | `pool` *or* `members` | string / list of node ids | choose members from a pool, or name them |
//! | `txn_time` | duration | execution time per transaction (default `0ns`) |
//! | `commit_budget` *or* `target_rate` | duration / integer tx/s | the budget, or the rate it follows from: `max_dop × 1 s / target_rate − txn_time` |
//! | `max_dop` | integer ≥ 1 | parallel transaction streams (default 1) |
//!
//! Kind-specific fields:
//!
//! | kind | field | meaning |
//! |---|---|---|
//! | `galera` | `replicas` | cluster members to choose from the pool (required with `pool`) |
//! | `semi_sync` | `replicas` | replicas besides the source (required with `pool`) |
//! | `semi_sync` | `wait_for` | acknowledgements the source waits for, 1 ≤ k ≤ replicas (default 1) |
//! | `semi_sync` | `source` | the source node (default: fastest k-th acknowledgement) |
//! | `kafka` | `brokers` | brokers to choose from the pool (default: all) |
//! | `kafka` | `replication_factor`, `min_insync_replicas` | required; 1 ≤ min ≤ factor ≤ brokers |
//! | `kafka` | `acks` | only `all` |
//!
//! Example (`planner/examples/stores.yaml`):
//!
//! ```yaml
#![doc = include_str!("../examples/stores.yaml")]
//! ```

pub mod drift;
pub mod findings;
pub mod matrix;
pub mod physics;
pub mod plan;
pub mod render;
pub mod settings;
pub mod spec;
pub mod timeouts;
pub mod units;
pub mod zones;

pub use drift::{DriftEvent, drift};
pub use findings::{Finding, Severity};
pub use matrix::{LatencyMatrix, LinkStats, Measurement, NodeFacts, NodeId};
pub use plan::{CapacityCheck, MemberPlan, Mode, Plan, Role, StoreDetail, StoreKind, StorePlan, ZoneCapacity, plan};
pub use render::{RenderError, to_helm_values, to_helm_yaml};
pub use settings::PlanConfig;
pub use spec::{
    Acks, BudgetSource, Demand, GaleraSpec, KafkaSpec, MemberSelection, Production, SemiSyncSpec, StoreCommon,
    StoreFile, StoreFileError, parse_stores,
};
pub use timeouts::{TimeoutAdvice, TimeoutFormat};
pub use units::{DurationParseError, Nanos, SignedNanos};
pub use zones::{ZoneAssignment, ZoneMap, ZoneReport, ZoneSource, infer_zones};
