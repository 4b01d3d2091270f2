//! Recommended failure-detection timeouts, derived from measured RTT, jitter and loss.
//!
//! # Derivation
//!
//! All three systems replicate over TCP, so a message that meets packet loss is not dropped but
//! delayed by retransmission timeouts. For the relevant link (the worst link of a synchronous set,
//! or the acknowledging replica's link for semi-sync) the planner computes:
//!
//! * `tail = p99 + 4 × jitter` — the delay a message rarely exceeds; the form of TCP's
//!   `RTO = SRTT + 4 × RTTVAR` (RFC 6298 §2), with p99 in place of the smoothed RTT.
//! * `rto = clamp(tail, 200 ms, 120 s)` — Linux's retransmission timeout floor and ceiling
//!   (`TCP_RTO_MIN` = HZ/5, `TCP_RTO_MAX` = 120 s in `include/net/tcp.h`).
//! * `L` — consecutive losses to ride out: the smallest `L ≥ 0` with `loss^(L+1) ≤ miss`, where `miss`
//!   is `settings.timeout_miss_ppm` (default 10⁻⁶). No loss gives `L = 0`; 1 % loss gives `L = 2`.
//! * `bound = tail + Σ_{i<L} min(rto × 2^i, 120 s)` — delivery time with `L` retransmissions under
//!   exponential backoff (RFC 6298 §5.5).
//!
//! From `bound`, a lower limit ("floor") for each timeout, below which a healthy but lossy or jittery
//! link would be declared failed:
//!
//! | parameter | documented default | floor | recommended |
//! |---|---|---|---|
//! | Galera `evs.suspect_timeout` | PT5S | `evs.keepalive_period` (PT1S) + bound | max(default, floor) |
//! | Galera `evs.inactive_timeout` | PT15S | recommended suspect timeout | max(default, 3 × recommended suspect) |
//! | Galera `gmcast.peer_timeout` | PT3S | 2 × bound (TCP connect + handshake) | max(default, floor) |
//! | MySQL `rpl_semi_sync_source_timeout` | 10000 ms | bound of the k-th acknowledging replica | max(default, floor) |
//! | Kafka `replica.lag.time.max.ms` | 30000 ms | `replica.fetch.wait.max.ms` (500) + bound | max(default, floor) |
//!
//! The planner never recommends less than the documented default: on metro links the floor is far
//! below it, and lowering a failure detector trades false evictions for faster failover, which is an
//! operator's choice (the floor is reported so they can make it). Values are rounded up to whole ms.
//! The inactive timeout keeps the default 3 : 1 ratio to the suspect timeout, which satisfies Galera's
//! documented ordering `keepalive_period ≤ inactive_check_period ≤ suspect_timeout ≤ inactive_timeout`.
//!
//! # Sources
//!
//! * Galera Cluster documentation, "Galera Parameters": defaults `evs.keepalive_period` PT1S,
//!   `evs.suspect_timeout` PT5S, `evs.inactive_timeout` PT15S, `gmcast.peer_timeout` PT3S; and
//!   "Node Failure and Recovery": a node is suspected when no packet arrived for `evs.suspect_timeout`,
//!   the ordering above, and that low values cause false failure detection on unstable networks.
//!   "Configuration Tips — WAN Replication" (galeracluster.com/documentation-webpages/configurationtips.html):
//!   timeouts must exceed the highest measured RTT; raise `evs.keepalive_period`, `evs.install_timeout`
//!   alongside for WAN links.
//! * MySQL 8.4 Reference Manual, 19.4.10.2 "Configuring Semisynchronous Replication"
//!   (dev.mysql.com/doc/refman/8.4/en/replication-semisync-interface.html): `rpl_semi_sync_source_timeout`
//!   (`rpl_semi_sync_master_timeout` before 8.0.26) is in milliseconds, default 10000; the source
//!   reverts to asynchronous replication when it expires. `rpl_semi_sync_source_wait_for_replica_count`
//!   defaults to 1.
//! * Apache Kafka documentation, broker configs (kafka.apache.org/documentation/#brokerconfigs):
//!   `replica.lag.time.max.ms` default 30000 (10000 before 2.5): a follower that has not fetched or
//!   caught up for this long leaves the ISR; `replica.fetch.wait.max.ms` default 500.
//! * RFC 6298, "Computing TCP's Retransmission Timer".

use serde::{Deserialize, Serialize};

use crate::matrix::LinkStats;
use crate::units::Nanos;

/// Linux `TCP_RTO_MIN` (200 ms).
pub const TCP_RTO_MIN: Nanos = Nanos::from_millis(200);
/// Linux `TCP_RTO_MAX` (120 s).
pub const TCP_RTO_MAX: Nanos = Nanos::from_secs(120);
/// Weight of the variation term in `tail = p99 + K × jitter` (RFC 6298's K = 4).
pub const JITTER_WEIGHT: u64 = 4;
/// Cap on consecutive losses considered (a link losing everything would otherwise never converge).
pub const MAX_LOSSES: u32 = 16;
/// Loss at or above which the 99th percentile of a TCP round trip includes a retransmission (1 %).
pub const P99_LOSS_PPM: u32 = 10_000;

/// Galera `evs.keepalive_period` default (PT1S).
pub const GALERA_KEEPALIVE_PERIOD: Nanos = Nanos::from_secs(1);
/// Galera `evs.suspect_timeout` default (PT5S).
pub const GALERA_SUSPECT_TIMEOUT: Nanos = Nanos::from_secs(5);
/// Galera `evs.inactive_timeout` default (PT15S).
pub const GALERA_INACTIVE_TIMEOUT: Nanos = Nanos::from_secs(15);
/// Galera `gmcast.peer_timeout` default (PT3S).
pub const GALERA_PEER_TIMEOUT: Nanos = Nanos::from_secs(3);
/// MySQL `rpl_semi_sync_source_timeout` default (10000 ms).
pub const MYSQL_SEMI_SYNC_TIMEOUT: Nanos = Nanos::from_millis(10_000);
/// Kafka `replica.lag.time.max.ms` default since 2.5 (30000 ms).
pub const KAFKA_REPLICA_LAG_TIME_MAX: Nanos = Nanos::from_millis(30_000);
/// Kafka `replica.fetch.wait.max.ms` default (500 ms).
pub const KAFKA_REPLICA_FETCH_WAIT_MAX: Nanos = Nanos::from_millis(500);

const GALERA_SOURCE: &str = "Galera Cluster docs: Galera Parameters (defaults), Node Failure and Recovery \
                             (suspect/inactive semantics and ordering), Configuration Tips: WAN Replication";
const MYSQL_SOURCE: &str =
    "MySQL 8.4 Reference Manual 19.4.10.2 Configuring Semisynchronous Replication (default 10000 ms)";
const KAFKA_SOURCE: &str =
    "Apache Kafka docs, broker configs: replica.lag.time.max.ms (default 30000), replica.fetch.wait.max.ms (500)";

/// The delay a message on this link rarely exceeds: `p99 + 4 × jitter`.
pub fn tail(link: &LinkStats) -> Nanos {
    link.p99.saturating_add(link.jitter.saturating_mul(JITTER_WEIGHT))
}

/// TCP's retransmission timeout on this link: `tail` clamped to [200 ms, 120 s].
pub fn rto(link: &LinkStats) -> Nanos {
    tail(link).clamp(TCP_RTO_MIN, TCP_RTO_MAX)
}

/// Consecutive losses to ride out: the smallest `L ≥ 0` with `loss^(L+1) ≤ miss` (both in ppm), at most
/// [`MAX_LOSSES`]. Computed in integers, rounding the probability up (never optimistic).
pub fn losses_to_ride_out(loss_ppm: u32, miss_ppm: u32) -> u32 {
    const ONE: u128 = 1_000_000;
    let p = u128::from(loss_ppm.min(1_000_000));
    let mut probability = p; // loss^(n), scaled by 10^6, for n = L + 1
    for losses in 0..MAX_LOSSES {
        if probability <= u128::from(miss_ppm) {
            return losses;
        }
        probability = (probability * p).div_ceil(ONE);
    }
    MAX_LOSSES
}

/// Delivery time over TCP with the losses of [`losses_to_ride_out`]:
/// `tail + Σ_{i<L} min(rto × 2^i, 120 s)`.
pub fn delivery_bound(link: &LinkStats, miss_ppm: u32) -> Nanos {
    let losses = losses_to_ride_out(link.loss_ppm, miss_ppm);
    let rto = rto(link);
    (0..losses).fold(tail(link), |acc, i| {
        acc.saturating_add(rto.saturating_mul(1u64 << i).min(TCP_RTO_MAX))
    })
}

/// The p99 a commit sees on this link: the measured p99, plus one minimum TCP retransmission timeout
/// when the link loses 1 % or more (then at least one in a hundred round trips waits for a retransmit).
pub fn effective_p99(link: &LinkStats) -> Nanos {
    if link.loss_ppm >= P99_LOSS_PPM {
        link.p99.saturating_add(TCP_RTO_MIN)
    } else {
        link.p99
    }
}

/// How a timeout's value is written in its system's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutFormat {
    /// ISO 8601 duration (`PT5S`), as Galera expects.
    Iso8601,
    /// Whole milliseconds.
    Millis,
}

/// One recommended timeout, with how it was derived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutAdvice {
    /// The parameter name (e.g. `evs.suspect_timeout`).
    pub parameter: String,
    /// An older name of the same parameter, if any.
    pub alias: Option<String>,
    /// The recommended value.
    pub recommended: Nanos,
    /// The recommended value as written in the configuration (`PT5S`, `10000`).
    pub value: String,
    /// How `value` is written.
    pub format: TimeoutFormat,
    /// The documented default.
    pub default: Nanos,
    /// The lowest value the measurements allow.
    pub floor: Nanos,
    /// The delivery bound the floor was derived from.
    pub bound: Nanos,
    /// The formula, in words.
    pub formula: String,
    /// Where the default and the semantics are documented.
    pub source: String,
}

impl TimeoutAdvice {
    /// Whether the recommendation is simply the documented default.
    pub fn is_default(&self) -> bool {
        self.recommended == self.default
    }
}

/// The fixed facts of one parameter.
struct Param {
    parameter: &'static str,
    alias: Option<&'static str>,
    format: TimeoutFormat,
    default: Nanos,
    formula: &'static str,
    source: &'static str,
}

const SUSPECT: Param = Param {
    parameter: "evs.suspect_timeout",
    alias: None,
    format: TimeoutFormat::Iso8601,
    default: GALERA_SUSPECT_TIMEOUT,
    formula: "max(PT5S, evs.keepalive_period (PT1S) + bound); bound = tail + retransmissions for the losses to \
              ride out, tail = p99 + 4 × jitter of the worst synchronous link",
    source: GALERA_SOURCE,
};

const INACTIVE: Param = Param {
    parameter: "evs.inactive_timeout",
    alias: None,
    format: TimeoutFormat::Iso8601,
    default: GALERA_INACTIVE_TIMEOUT,
    formula: "max(PT15S, 3 × evs.suspect_timeout): keeps the default 3:1 ratio and the documented ordering \
              suspect_timeout ≤ inactive_timeout",
    source: GALERA_SOURCE,
};

const PEER: Param = Param {
    parameter: "gmcast.peer_timeout",
    alias: None,
    format: TimeoutFormat::Iso8601,
    default: GALERA_PEER_TIMEOUT,
    formula: "max(PT3S, 2 × bound): a TCP connect and the gmcast handshake are two round trips",
    source: GALERA_SOURCE,
};

const SEMI_SYNC: Param = Param {
    parameter: "rpl_semi_sync_source_timeout",
    alias: Some("rpl_semi_sync_master_timeout"),
    format: TimeoutFormat::Millis,
    default: MYSQL_SEMI_SYNC_TIMEOUT,
    formula: "max(10000 ms, bound of the k-th fastest replica); the floor is the shortest timeout that does not \
              revert to asynchronous replication on a healthy link; lower towards it only to shorten commit stalls",
    source: MYSQL_SOURCE,
};

const KAFKA_LAG: Param = Param {
    parameter: "replica.lag.time.max.ms",
    alias: None,
    format: TimeoutFormat::Millis,
    default: KAFKA_REPLICA_LAG_TIME_MAX,
    formula: "max(30000 ms, replica.fetch.wait.max.ms (500) + bound of the worst synchronous link): a caught-up \
              follower's fetch waits at the leader up to 500 ms, then the answer crosses the link",
    source: KAFKA_SOURCE,
};

/// `recommended = max(default, floor)`, rounded up to whole milliseconds.
fn advice(p: &Param, floor: Nanos, bound: Nanos) -> TimeoutAdvice {
    let recommended = p.default.max(floor).ceil_to_millis();
    let value = match p.format {
        TimeoutFormat::Iso8601 => recommended.to_iso8601(),
        TimeoutFormat::Millis => recommended.as_millis_ceil().to_string(),
    };
    TimeoutAdvice {
        parameter: p.parameter.to_string(),
        alias: p.alias.map(str::to_string),
        recommended,
        value,
        format: p.format,
        default: p.default,
        floor: floor.ceil_to_millis(),
        bound,
        formula: p.formula.to_string(),
        source: p.source.to_string(),
    }
}

/// Galera `evs.suspect_timeout`, `evs.inactive_timeout` and `gmcast.peer_timeout` from the delivery
/// bound of the worst link among the synchronous members.
pub fn galera(bound: Nanos) -> Vec<TimeoutAdvice> {
    let suspect = advice(&SUSPECT, GALERA_KEEPALIVE_PERIOD.saturating_add(bound), bound);
    // The inactive timeout's floor is the suspect timeout (documented ordering); the recommendation
    // keeps the default 3:1 ratio.
    let mut inactive = advice(&INACTIVE, suspect.recommended.saturating_mul(3), bound);
    inactive.floor = suspect.recommended;
    let peer = advice(&PEER, bound.saturating_mul(2), bound);
    vec![suspect, inactive, peer]
}

/// MySQL `rpl_semi_sync_source_timeout` from the delivery bound of the k-th acknowledging replica.
pub fn semi_sync(bound: Nanos) -> TimeoutAdvice {
    advice(&SEMI_SYNC, bound, bound)
}

/// Kafka `replica.lag.time.max.ms` from the delivery bound of the worst link among synchronous brokers.
pub fn kafka(bound: Nanos) -> TimeoutAdvice {
    advice(&KAFKA_LAG, KAFKA_REPLICA_FETCH_WAIT_MAX.saturating_add(bound), bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_follow_the_miss_probability() {
        assert_eq!(losses_to_ride_out(0, 1), 0);
        assert_eq!(
            losses_to_ride_out(1, 1),
            0,
            "one in a million is already within one in a million"
        );
        assert_eq!(losses_to_ride_out(10_000, 1), 2, "1 %: 0.01³ = 10⁻⁶");
        assert_eq!(losses_to_ride_out(300_000, 1), 11, "30 %: 0.3¹² ≈ 5·10⁻⁷");
        assert_eq!(losses_to_ride_out(1_000_000, 1), MAX_LOSSES);
        assert_eq!(losses_to_ride_out(10_000, 0), MAX_LOSSES);
    }

    #[test]
    fn metro_links_keep_the_documented_defaults() {
        let link = LinkStats::from_rtt(Nanos::from_micros(100), Nanos::from_micros(250)).with_jitter(Nanos(20_000));
        let bound = delivery_bound(&link, 1);
        assert_eq!(bound, Nanos::from_micros(330), "no loss: bound = p99 + 4 × jitter");
        let g = galera(bound);
        assert_eq!(
            g.iter().map(|a| a.value.as_str()).collect::<Vec<_>>(),
            ["PT5S", "PT15S", "PT3S"]
        );
        assert!(g.iter().all(TimeoutAdvice::is_default));
        assert_eq!(g[0].floor, Nanos::from_millis(1_001));
        assert_eq!(semi_sync(bound).value, "10000");
        assert_eq!(kafka(bound).value, "30000");
    }

    #[test]
    fn lossy_slow_links_raise_timeouts() {
        // 80 ms p99, 5 ms jitter, 1 % loss: tail 100 ms, rto 200 ms, L = 2 → bound 100 + 200 + 400 = 700 ms.
        let link = LinkStats::from_rtt(Nanos::from_millis(60), Nanos::from_millis(80))
            .with_jitter(Nanos::from_millis(5))
            .with_loss_ppm(10_000);
        assert_eq!(delivery_bound(&link, 1), Nanos::from_millis(700));
        // 30 % loss: L = 11; backoff 0.2 s … 102.4 s, then capped at 120 s: 324.6 s + tail.
        let bad = link.with_loss_ppm(300_000);
        let bound = delivery_bound(&bad, 1);
        assert_eq!(bound, Nanos::from_millis(324_700));
        let g = galera(bound);
        assert_eq!(g[0].value, "PT325.7S");
        assert_eq!(g[1].value, "PT977.1S");
        assert_eq!(g[2].value, "PT649.4S");
        assert_eq!(semi_sync(bound).value, "324700");
        assert_eq!(kafka(bound).value, "325200");
    }

    #[test]
    fn effective_p99_adds_a_retransmission_at_one_percent_loss() {
        let link = LinkStats::from_rtt(Nanos::from_micros(100), Nanos::from_micros(200));
        assert_eq!(effective_p99(&link.with_loss_ppm(9_999)), Nanos::from_micros(200));
        assert_eq!(effective_p99(&link.with_loss_ppm(10_000)), Nanos::from_micros(200_200));
    }
}
