//! Counting WireGuard handshakes from peer statistics: boringtun reports no handshake events, only each
//! session's handshake age ([`PeerStats::last_handshake_age`]). A peer whose handshake time moved forward
//! completed a new one. Two handshakes of one peer between samples count once (a session rekeys every 2 minutes
//! at most; metrics scrapes are more frequent). Used by both daemons' metrics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::PeerStats;

/// Slack for the jitter of `now - age` between two samples of one handshake.
const SLACK: Duration = Duration::from_secs(2);

/// Handshakes seen so far.
#[derive(Debug, Default)]
pub struct HandshakeCounter {
    /// Peer key → when its current session's handshake happened.
    last: HashMap<[u8; 32], Instant>,
    total: u64,
}

impl HandshakeCounter {
    /// Samples `peers` at `now`; returns the total so far.
    pub fn observe(&mut self, peers: &[PeerStats], now: Instant) -> u64 {
        let sample: Vec<([u8; 32], Option<Duration>)> = peers
            .iter()
            .map(|p| (*p.public_key.as_bytes(), p.last_handshake_age))
            .collect();
        self.observe_ages(&sample, now)
    }

    /// [`HandshakeCounter::observe`] on `(peer key, handshake age)` pairs.
    pub fn observe_ages(&mut self, peers: &[([u8; 32], Option<Duration>)], now: Instant) -> u64 {
        let mut seen = HashMap::with_capacity(peers.len());
        for (key, age) in peers {
            let prev = self.last.get(key).copied();
            match (age.and_then(|a| now.checked_sub(a)), prev) {
                (None, Some(p)) => {
                    seen.insert(*key, p);
                }
                (None, None) => {}
                (Some(at), Some(p)) if at <= p + SLACK => {
                    seen.insert(*key, p);
                }
                (Some(at), _) => {
                    self.total += 1;
                    seen.insert(*key, at);
                }
            }
        }
        // Peers that are gone are forgotten: the map stays as large as the peer set.
        self.last = seen;
        self.total
    }

    /// Handshakes counted so far.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_new_session_counts_once_and_gone_peers_are_forgotten() {
        let mut t = HandshakeCounter::default();
        let now = Instant::now() + Duration::from_secs(1000);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(t.observe_ages(&[(a, Some(Duration::from_secs(5))), (b, None)], now), 1);
        // Ten seconds later: the same session of a (age grew by ten), b completed one.
        let later = now + Duration::from_secs(10);
        let sample = [(a, Some(Duration::from_secs(15))), (b, Some(Duration::from_secs(1)))];
        assert_eq!(t.observe_ages(&sample, later), 2);
        // a rekeyed; b is gone.
        assert_eq!(
            t.observe_ages(&[(a, Some(Duration::from_secs(3)))], later + Duration::from_secs(130)),
            3
        );
        assert_eq!(t.last.len(), 1);
    }
}
