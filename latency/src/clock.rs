//! Clock readings and timestamping modes.
//!
//! Every state machine in this crate takes time as an argument ([`Timestamp`]); only the driver reads clocks.
//! A reading has two parts, taken back to back:
//! - `mono_ns`: `CLOCK_MONOTONIC` in ns. All intervals (RTT, timeouts, rate limits, windows) are measured on it.
//! - `real_ns`: `CLOCK_REALTIME` in ns since the Unix epoch. Kernel software timestamps (`SO_TIMESTAMPING`)
//!   are on this clock, so a kernel-timestamped RTT is a difference of realtime readings; it is only trusted
//!   when it agrees with the monotonic measurement (see [`crate::prober`]). It also dates windows for reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One reading of the monotonic and the realtime clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// `CLOCK_MONOTONIC`, ns.
    pub mono_ns: u64,
    /// `CLOCK_REALTIME`, ns since the Unix epoch.
    pub real_ns: u64,
}

impl Timestamp {
    /// A reading from the monotonic clock alone, with the realtime part set equal (handy in tests, where the two
    /// clocks may as well be one).
    pub const fn from_mono(mono_ns: u64) -> Self {
        Self {
            mono_ns,
            real_ns: mono_ns,
        }
    }

    /// Reads both clocks now. Falls back to 0 for a clock the kernel refuses to read (never on Linux).
    pub fn now() -> Self {
        use nix::time::{ClockId, clock_gettime};
        let mono_ns = clock_gettime(ClockId::CLOCK_MONOTONIC).map(timespec_ns).unwrap_or(0);
        let real_ns = clock_gettime(ClockId::CLOCK_REALTIME).map(timespec_ns).unwrap_or(0);
        Self { mono_ns, real_ns }
    }

    /// This reading moved forward by `d` on both clocks.
    pub fn advanced_by(self, d: Duration) -> Self {
        let ns = duration_ns(d);
        Self {
            mono_ns: self.mono_ns.saturating_add(ns),
            real_ns: self.real_ns.saturating_add(ns),
        }
    }
}

/// When a datagram was received: the user-space reading taken right after `recvmsg` returned, and the kernel's
/// software receive timestamp (realtime clock) when `SO_TIMESTAMPING` delivered one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RxTime {
    /// Read in user space after the datagram was received.
    pub user: Timestamp,
    /// Kernel software RX timestamp, `CLOCK_REALTIME` ns.
    pub kernel_real_ns: Option<u64>,
}

impl RxTime {
    /// A receive time known only from user space.
    pub const fn user(user: Timestamp) -> Self {
        Self {
            user,
            kernel_real_ns: None,
        }
    }
}

/// Where the timestamps of an RTT sample came from, ordered from least to most precise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampMode {
    /// Send and receive times read in user space around the system calls (monotonic clock).
    UserSpace,
    /// Receive time from the kernel (`SO_TIMESTAMPING` software RX); send time read in user space just before
    /// `sendmsg`.
    KernelRx,
    /// Both send and receive time from the kernel (`SO_TIMESTAMPING` software TX and RX).
    KernelTxRx,
}

impl TimestampMode {
    /// A short, stable name for logs and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserSpace => "user_space",
            Self::KernelRx => "kernel_rx",
            Self::KernelTxRx => "kernel_tx_rx",
        }
    }
}

impl std::fmt::Display for TimestampMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A duration in ns, saturating at `u64::MAX` (585 years).
pub fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A `timespec` in ns; negative or overflowing values (which Linux does not produce for these clocks) become 0.
pub(crate) fn timespec_ns(ts: nix::sys::time::TimeSpec) -> u64 {
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_reads_both_clocks_and_monotonic_advances() {
        let a = Timestamp::now();
        let b = Timestamp::now();
        assert!(a.mono_ns > 0 && a.real_ns > 1_600_000_000_000_000_000);
        assert!(b.mono_ns >= a.mono_ns);
    }

    #[test]
    fn modes_order_by_precision() {
        assert!(TimestampMode::UserSpace < TimestampMode::KernelRx);
        assert!(TimestampMode::KernelRx < TimestampMode::KernelTxRx);
        assert_eq!(
            serde_json::to_string(&TimestampMode::KernelRx).unwrap(),
            "\"kernel_rx\""
        );
    }
}
