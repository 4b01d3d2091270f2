//! The physics and rules of thumb of the deployment guidance, in exact integer arithmetic.
//!
//! * Light in G.652 fibre travels about 200 000 km/s, i.e. **5 µs per km each way**, so a link's round
//!   trip costs **10 µs per km** (0.01 ms/km): 25 km → 0.25 ms RTT. (The deck's slide line "0.25ms / 1km"
//!   is the 25 km figure; the worked example next to it uses 0.25 ms for 25 km.)
//! * "Availability zones" are groups of sites **below 2 ms** of latency from each other.
//! * With synchronous replication and no parallelism (`max_dop = 1`) every transaction pays the
//!   replication round trip: a 0.3 ms per-transaction budget on a 25 km link leaves 0.05 ms; on 30 km
//!   nothing is left, which the planner counts as a failure (a zero margin leaves nothing for the
//!   overheads the deck reserves it for).
//! * Every zone must carry **66 %** of production so that losing one zone of three loses nothing.

use crate::units::{Nanos, SignedNanos};

/// One-way propagation delay of fibre per kilometre (5 µs).
pub const FIBER_ONE_WAY_PER_KM: Nanos = Nanos::from_micros(5);
/// Round-trip propagation delay of fibre per kilometre (10 µs = 0.01 ms).
pub const FIBER_RTT_PER_KM: Nanos = Nanos::from_micros(10);
/// Round-trip propagation delay of fibre per metre (10 ns).
pub const FIBER_RTT_PER_M: Nanos = Nanos(10);
/// Sites below this RTT from each other may form one availability zone (2 ms).
pub const ZONE_MAX_RTT: Nanos = Nanos::from_millis(2);
/// Default p50 threshold for inferring zones by clustering measured RTT (0.5 ms).
pub const ZONE_INFERENCE_THRESHOLD: Nanos = Nanos::from_micros(500);
/// Share of production demand each zone must carry (66 %).
pub const MIN_ZONE_SHARE_PERCENT: u32 = 66;

/// Fibre round trip over `metres` of cable.
pub const fn fiber_rtt_m(metres: u64) -> Nanos {
    FIBER_RTT_PER_M.saturating_mul(metres)
}

/// Fibre round trip over `km` kilometres of cable (`fiber_rtt_km(25)` = 0.25 ms).
pub const fn fiber_rtt_km(km: u64) -> Nanos {
    FIBER_RTT_PER_KM.saturating_mul(km)
}

/// What is left of `budget` after `latency` (negative when over budget).
pub fn margin(budget: Nanos, latency: Nanos) -> SignedNanos {
    SignedNanos::difference(budget, latency)
}

/// Whether `latency` fits `budget` with a strictly positive margin. `fits(0.3 ms, 0.25 ms)` is true;
/// `fits(0.3 ms, 0.3 ms)` is false: no margin is left for the overheads.
pub const fn fits(budget: Nanos, latency: Nanos) -> bool {
    latency.0 < budget.0
}

/// The longest fibre link, in whole metres, whose round trip still fits `budget` with a positive margin,
/// assuming the budget is spent on propagation alone (switching and stack overheads make real links
/// shorter). `None` when not even a zero-length link fits (a zero budget). 0.3 ms → 29 999 m.
pub const fn max_link_distance_m(budget: Nanos) -> Option<u64> {
    if budget.0 == 0 {
        None
    } else {
        Some((budget.0 - 1) / FIBER_RTT_PER_M.0)
    }
}

/// The maximum serial transaction rate, per second, rounded down:
/// `max_dop × 1 s / (txn_time + commit_latency)`. `None` when both times are zero (no bound).
pub fn max_serial_rate(txn_time: Nanos, commit: Nanos, max_dop: u32) -> Option<u64> {
    let per_txn = u128::from(txn_time.0) + u128::from(commit.0);
    if per_txn == 0 {
        return None;
    }
    let rate = u128::from(max_dop) * 1_000_000_000 / per_txn;
    Some(u64::try_from(rate).unwrap_or(u64::MAX))
}

/// The commit budget implied by a target rate: each of `max_dop` parallel streams must finish a
/// transaction every `max_dop / target_rate` seconds, of which `txn_time` is spent executing, so
/// `budget = max_dop × 1 s / target_rate − txn_time` (the window is rounded down to a nanosecond).
/// `None` when the rate is zero or the transaction time alone fills the window.
pub fn budget_from_rate(target_rate_per_s: u64, max_dop: u32, txn_time: Nanos) -> Option<Nanos> {
    if target_rate_per_s == 0 {
        return None;
    }
    let window = u128::from(max_dop) * 1_000_000_000 / u128::from(target_rate_per_s);
    let window = Nanos(u64::try_from(window).unwrap_or(u64::MAX));
    if window <= txn_time {
        None
    } else {
        Some(window.saturating_sub(txn_time))
    }
}

/// Whether `capacity` is at least `percent` % of `demand`, exactly (`capacity × 100 ≥ demand × percent`).
pub const fn carries_share(capacity: u64, demand: u64, percent: u32) -> bool {
    (capacity as u128) * 100 >= (demand as u128) * (percent as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deck's worked example, exactly: 0.3 ms budget, max_dop = 1, 25 km → 0.25 ms RTT → 0.05 ms
    /// margin; 30 km → 0.3 ms → no margin → fails.
    #[test]
    fn worked_example_exact() {
        let budget = Nanos::parse("0.3ms").unwrap();
        assert_eq!(budget, Nanos(300_000));
        assert_eq!(FIBER_ONE_WAY_PER_KM, Nanos(5_000));

        let rtt_25 = fiber_rtt_km(25);
        assert_eq!(rtt_25, Nanos::parse("0.25ms").unwrap());
        assert_eq!(margin(budget, rtt_25), SignedNanos(50_000));
        assert_eq!(margin(budget, rtt_25).to_string(), "0.05 ms");
        assert!(fits(budget, rtt_25));

        let rtt_30 = fiber_rtt_km(30);
        assert_eq!(rtt_30, Nanos(300_000));
        assert_eq!(margin(budget, rtt_30), SignedNanos(0));
        assert!(!fits(budget, rtt_30));

        assert_eq!(max_link_distance_m(budget), Some(29_999));
        assert!(fits(budget, fiber_rtt_m(29_999)));
        assert!(!fits(budget, fiber_rtt_m(30_000)));
        assert_eq!(max_link_distance_m(Nanos::ZERO), None);
    }

    /// The same budget reached from a target rate: 2 000 tx/s with max_dop = 1 gives a 0.5 ms window,
    /// minus 0.2 ms of transaction time = 0.3 ms of commit budget.
    #[test]
    fn budget_follows_from_rate_and_dop() {
        let txn = Nanos::from_micros(200);
        assert_eq!(budget_from_rate(2_000, 1, txn), Some(Nanos(300_000)));
        assert_eq!(budget_from_rate(2_000, 4, txn), Some(Nanos(1_800_000)));
        assert_eq!(
            budget_from_rate(5_000, 1, txn),
            None,
            "the window is exactly the transaction time"
        );
        assert_eq!(budget_from_rate(0, 1, txn), None);
    }

    #[test]
    fn serial_rate() {
        // 1 / (0.2 ms + 0.25 ms) = 2 222.2 → 2 222 tx/s; four streams → 8 888.
        assert_eq!(
            max_serial_rate(Nanos::from_micros(200), Nanos::from_micros(250), 1),
            Some(2_222)
        );
        assert_eq!(
            max_serial_rate(Nanos::from_micros(200), Nanos::from_micros(250), 4),
            Some(8_888)
        );
        assert_eq!(max_serial_rate(Nanos::ZERO, Nanos::ZERO, 1), None);
    }

    #[test]
    fn zone_share_is_exact() {
        assert!(carries_share(66, 100, 66));
        assert!(!carries_share(65, 100, 66));
        assert!(carries_share(6_600, 10_000, 66));
        assert!(!carries_share(6_599, 10_000, 66));
    }
}
