//! Per-peer, per-window RTT statistics.
//!
//! Definitions (all over the RTT samples of one peer whose probes were *sent* in the window):
//! - **min / max / mean**: as usual; mean is rounded to the nearest ns.
//! - **p50 / p90 / p99**: nearest-rank percentiles: sort the `n` samples ascending; the p-th percentile is the
//!   sample at 1-based rank `ceil(p/100 · n)`. It is always an observed value (no interpolation); with fewer
//!   than 100 samples p99 is the maximum.
//! - **jitter**: mean absolute difference between consecutive RTT samples, in send (sequence) order:
//!   `Σ|R(i) − R(i−1)| / (n − 1)`; 0 with fewer than two samples. This is RFC 3550 §6.4.1's `|D(i−1, i)|`
//!   (difference of transit times of consecutive packets) applied to round-trip times, which need no shared
//!   clock, and averaged plainly over the window instead of RFC 3550's running 1/16 filter, so that a window's
//!   value depends only on that window. It is the mean of RFC 5481's IPDV magnitude for consecutive packets.
//! - **loss ratio**: `lost / (samples + lost)`, where a probe is lost when no valid response arrived within the
//!   prober's timeout (a response arriving later still counts as lost, and is also counted as *late*).
//! - **mode**: the least precise [`TimestampMode`] among the window's samples (so a window is never reported as
//!   more precise than its worst sample).

use serde::{Deserialize, Serialize};

use crate::clock::TimestampMode;
use crate::id::NodeId;

/// RTT distribution of one window, in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RttSummary {
    /// Smallest sample.
    pub min_ns: u64,
    /// Median (nearest rank).
    pub p50_ns: u64,
    /// 90th percentile (nearest rank).
    pub p90_ns: u64,
    /// 99th percentile (nearest rank).
    pub p99_ns: u64,
    /// Largest sample.
    pub max_ns: u64,
    /// Arithmetic mean, rounded.
    pub mean_ns: u64,
    /// Mean absolute difference of consecutive samples (RFC 3550 §6.4.1-style, see module docs).
    pub jitter_ns: u64,
}

/// What one node measured to one peer in one window. This is what agents report to the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    /// The peer measured.
    pub peer: NodeId,
    /// Window start, Unix time in ms (from the prober's realtime clock; used to order reports, not to measure).
    pub start_unix_ms: u64,
    /// Window length in ms.
    pub duration_ms: u64,
    /// Probes sent in the window (`samples + lost`).
    pub sent: u32,
    /// RTT samples (valid responses in time).
    pub samples: u32,
    /// Probes without a valid response within the timeout.
    pub lost: u32,
    /// Of the lost probes, those whose response did arrive, but after the timeout.
    pub late: u32,
    /// `lost / sent`, 0 when nothing was sent.
    pub loss_ratio: f64,
    /// RTT distribution; `None` when there were no samples.
    pub rtt: Option<RttSummary>,
    /// Least precise timestamping mode among the samples; `None` when there were no samples.
    pub mode: Option<TimestampMode>,
}

/// One RTT measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttSample {
    /// Sequence number of the probe.
    pub seq: u64,
    /// Round-trip time, ns, responder hold time subtracted.
    pub rtt_ns: u64,
    /// How the timestamps were taken.
    pub mode: TimestampMode,
}

/// The nearest-rank `p`-th percentile (`0 < p ≤ 100`) of ascending `sorted` samples; `None` if empty.
pub fn percentile_nearest_rank(sorted: &[u64], p: u32) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    let rank = (u64::from(p.clamp(1, 100)) * n).div_ceil(100).max(1);
    let idx = usize::try_from(rank - 1).unwrap_or(0).min(sorted.len() - 1);
    sorted.get(idx).copied()
}

/// Summarizes RTTs given in send order; `None` if there are none.
pub fn summarize(rtts_in_send_order: &[u64]) -> Option<RttSummary> {
    let n = rtts_in_send_order.len();
    if n == 0 {
        return None;
    }
    let mut sorted = rtts_in_send_order.to_vec();
    sorted.sort_unstable();
    let sum: u128 = sorted.iter().map(|&x| u128::from(x)).sum();
    let n128 = n as u128;
    let mean = (sum + n128 / 2) / n128;
    let jitter = if n < 2 {
        0
    } else {
        let d: u128 = rtts_in_send_order
            .windows(2)
            .map(|w| u128::from(w[0].abs_diff(w[1])))
            .sum();
        let m = n128 - 1;
        (d + m / 2) / m
    };
    let pct = |p| percentile_nearest_rank(&sorted, p).unwrap_or(0);
    Some(RttSummary {
        min_ns: sorted[0],
        p50_ns: pct(50),
        p90_ns: pct(90),
        p99_ns: pct(99),
        max_ns: sorted[n - 1],
        mean_ns: u64::try_from(mean).unwrap_or(u64::MAX),
        jitter_ns: u64::try_from(jitter).unwrap_or(u64::MAX),
    })
}

/// Collects one peer's outcomes for one window.
#[derive(Clone, Debug, Default)]
pub(crate) struct WindowAcc {
    samples: Vec<RttSample>,
    lost: u32,
    late: u32,
}

impl WindowAcc {
    pub(crate) fn sample(&mut self, s: RttSample) {
        self.samples.push(s);
    }

    pub(crate) fn lost(&mut self) {
        self.lost = self.lost.saturating_add(1);
    }

    pub(crate) fn late(&mut self) {
        self.late = self.late.saturating_add(1);
    }

    pub(crate) fn finish(mut self, peer: NodeId, start_unix_ms: u64, duration_ms: u64) -> WindowStats {
        self.samples.sort_unstable_by_key(|s| s.seq);
        let rtts: Vec<u64> = self.samples.iter().map(|s| s.rtt_ns).collect();
        let samples = u32::try_from(rtts.len()).unwrap_or(u32::MAX);
        let sent = samples.saturating_add(self.lost);
        WindowStats {
            peer,
            start_unix_ms,
            duration_ms,
            sent,
            samples,
            lost: self.lost,
            late: self.late,
            loss_ratio: if sent == 0 {
                0.0
            } else {
                f64::from(self.lost) / f64::from(sent)
            },
            rtt: summarize(&rtts),
            mode: self.samples.iter().map(|s| s.mode).min(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile_nearest_rank(&v, 50), Some(5));
        assert_eq!(percentile_nearest_rank(&v, 90), Some(9));
        assert_eq!(percentile_nearest_rank(&v, 99), Some(10));
        assert_eq!(percentile_nearest_rank(&v, 100), Some(10));
        assert_eq!(percentile_nearest_rank(&v, 1), Some(1));
        assert_eq!(percentile_nearest_rank(&[], 50), None);
        assert_eq!(percentile_nearest_rank(&[42], 99), Some(42));
        let h: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile_nearest_rank(&h, 50), Some(50));
        assert_eq!(percentile_nearest_rank(&h, 99), Some(99));
        let k: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile_nearest_rank(&k, 99), Some(990));
        // Rank = ceil(0.5 * 4) = 2.
        assert_eq!(percentile_nearest_rank(&[10, 20, 30, 40], 50), Some(20));
        assert_eq!(percentile_nearest_rank(&[10, 20, 30], 50), Some(20));
    }

    #[test]
    fn summary_of_known_samples() {
        // In send order.
        let rtts = [300, 100, 200, 400, 1000];
        let s = summarize(&rtts).unwrap();
        assert_eq!(s.min_ns, 100);
        assert_eq!(s.max_ns, 1000);
        assert_eq!(s.p50_ns, 300); // sorted 100 200 300 400 1000, rank ceil(2.5) = 3
        assert_eq!(s.p90_ns, 1000); // rank ceil(4.5) = 5
        assert_eq!(s.p99_ns, 1000);
        assert_eq!(s.mean_ns, 400); // 2000 / 5
        // |100-300| + |200-100| + |400-200| + |1000-400| = 200 + 100 + 200 + 600 = 1100; / 4 = 275
        assert_eq!(s.jitter_ns, 275);
        assert_eq!(summarize(&[]), None);
        let one = summarize(&[7]).unwrap();
        assert_eq!((one.min_ns, one.p99_ns, one.mean_ns, one.jitter_ns), (7, 7, 7, 0));
        // Mean rounds to nearest.
        assert_eq!(summarize(&[1, 2]).unwrap().mean_ns, 2);
        assert_eq!(summarize(&[1, 1, 2]).unwrap().mean_ns, 1);
    }

    #[test]
    fn window_uses_send_order_loss_and_weakest_mode() {
        let mut acc = WindowAcc::default();
        // Arrive out of order; jitter must follow sequence order: 100, 300, 100 → (200 + 200) / 2.
        acc.sample(RttSample {
            seq: 3,
            rtt_ns: 100,
            mode: TimestampMode::KernelTxRx,
        });
        acc.sample(RttSample {
            seq: 1,
            rtt_ns: 100,
            mode: TimestampMode::KernelTxRx,
        });
        acc.sample(RttSample {
            seq: 2,
            rtt_ns: 300,
            mode: TimestampMode::KernelRx,
        });
        acc.lost();
        acc.lost();
        acc.late();
        let w = acc.finish(NodeId::new("p"), 1_700_000_000_000, 30_000);
        assert_eq!((w.sent, w.samples, w.lost, w.late), (5, 3, 2, 1));
        assert!((w.loss_ratio - 0.4).abs() < 1e-12);
        assert_eq!(w.rtt.unwrap().jitter_ns, 200);
        assert_eq!(w.mode, Some(TimestampMode::KernelRx));
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(json["peer"], "p");
        assert_eq!(json["mode"], "kernel_rx");
        assert_eq!(json["rtt"]["p50_ns"], 100);
        let back: WindowStats = serde_json::from_value(json).unwrap();
        assert_eq!(back, w);
        let empty = WindowAcc::default().finish(NodeId::new("p"), 0, 30_000);
        assert_eq!(
            (empty.sent, empty.loss_ratio, empty.rtt, empty.mode),
            (0, 0.0, None, None)
        );
    }
}
