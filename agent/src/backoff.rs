//! Reconnect delays: exponential, capped, with jitter so that a fleet of
//! agents that lost the coordinator at the same moment does not return at the
//! same moment.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": each delay is uniformly drawn from
/// `[d/2, d)` where `d` doubles from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// Back to the shortest delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The delay before the next attempt, then double the base.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.current.mul_f64(rng.gen_range(0.5..1.0));
        self.current = (self.current * 2).min(self.max);
        d
    }

    /// The current base delay (before jitter), for logs.
    pub fn base(&self) -> Duration {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn doubles_caps_jitters_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        let mut bases = Vec::new();
        for _ in 0..10 {
            let base = b.base();
            let d = b.next_delay(&mut rng);
            assert!(d >= base / 2 && d < base, "{d:?} not in [{:?}, {base:?})", base / 2);
            bases.push(base.as_millis());
        }
        assert_eq!(
            bases,
            vec![500, 1000, 2000, 4000, 8000, 15000, 15000, 15000, 15000, 15000]
        );
        b.reset();
        assert_eq!(b.base(), Duration::from_millis(500));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let delays: std::collections::BTreeSet<u128> = (0..50)
            .map(|_| {
                Backoff::new(Duration::from_secs(8), Duration::from_secs(8))
                    .next_delay(&mut rng)
                    .as_millis()
            })
            .collect();
        assert!(delays.len() > 40, "50 agents should not retry in lockstep: {delays:?}");
    }
}
