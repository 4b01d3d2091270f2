//! Overlay address planning: pure functions, no I/O.
//!
//! The overlay network is one IPv4 CIDR. The coordinator takes the first host address; nodes get the other
//! host addresses (never the network or broadcast address), lowest free first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Longest prefix that still leaves one node address (a /30 has two hosts: coordinator + one node).
pub const MAX_PREFIX_LEN: u8 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error(
        "overlay network CIDR {cidr} is too small: use a prefix of /{MAX_PREFIX_LEN} or shorter \
         (for example 10.77.0.0/16) in overlay_cidr"
    )]
    TooSmall { cidr: Ipv4Net },
    #[error(
        "overlay network CIDR {cidr} is exhausted ({in_use} addresses in use): widen overlay_cidr or \
         revoke and delete unused nodes"
    )]
    Exhausted { cidr: Ipv4Net, in_use: u64 },
}

/// The overlay network and the coordinator's place in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayPlan {
    /// The network (host bits cleared).
    pub cidr: Ipv4Net,
    /// First host address of `cidr`.
    pub coordinator_ip: Ipv4Addr,
}

impl OverlayPlan {
    /// Plans `cidr` (host bits are cleared: `10.77.3.4/16` means `10.77.0.0/16`). The prefix must be /30 or
    /// shorter.
    pub fn new(cidr: Ipv4Net) -> Result<Self, IpamError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > MAX_PREFIX_LEN {
            return Err(IpamError::TooSmall { cidr });
        }
        let coordinator_ip = Ipv4Addr::from(u32::from(cidr.network()) + 1);
        Ok(OverlayPlan { cidr, coordinator_ip })
    }

    /// Addresses that may be given to nodes, lowest first: every host address except the coordinator's.
    pub fn candidates(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.coordinator_ip) + 1;
        let last = u32::from(self.cidr.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }

    /// Number of node addresses (`2^(32-prefix) - 3`).
    pub fn capacity(&self) -> u64 {
        (1u64 << (32 - u32::from(self.cidr.prefix_len()))) - 3
    }

    /// True when `ip` is a node address of this plan.
    pub fn is_candidate(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(&ip) && ip != self.cidr.network() && ip != self.cidr.broadcast() && ip != self.coordinator_ip
    }

    /// The lowest candidate not in `in_use`. Addresses in `in_use` outside the plan are ignored.
    pub fn first_free(&self, in_use: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        if let Some(ip) = self.candidates().find(|ip| !in_use.contains(ip)) {
            return Ok(ip);
        }
        let in_use = in_use.iter().filter(|ip| self.is_candidate(**ip)).count() as u64;
        Err(IpamError::Exhausted {
            cidr: self.cidr,
            in_use,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn slash29_candidates_and_capacity() {
        let plan = OverlayPlan::new("10.9.0.0/29".parse().unwrap()).unwrap();
        assert_eq!(plan.coordinator_ip, ip("10.9.0.1"));
        let c: Vec<_> = plan.candidates().collect();
        assert_eq!(c, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"].map(ip));
        assert_eq!(plan.capacity(), 5);
        assert_eq!(plan.capacity(), c.len() as u64);
        assert!(!plan.is_candidate(ip("10.9.0.0")));
        assert!(!plan.is_candidate(ip("10.9.0.1")));
        assert!(!plan.is_candidate(ip("10.9.0.7")));
        assert!(!plan.is_candidate(ip("10.9.0.8")));
        assert!(plan.is_candidate(ip("10.9.0.6")));
    }

    #[test]
    fn host_bits_are_cleared() {
        let plan = OverlayPlan::new("10.77.3.4/16".parse().unwrap()).unwrap();
        assert_eq!(plan.cidr.to_string(), "10.77.0.0/16");
        assert_eq!(plan.coordinator_ip, ip("10.77.0.1"));
        assert_eq!(plan.capacity(), 65_533);
        assert_eq!(plan.candidates().next(), Some(ip("10.77.0.2")));
        assert_eq!(plan.candidates().last(), Some(ip("10.77.255.254")));
    }

    #[test]
    fn prefix_limits() {
        let p30 = OverlayPlan::new("192.0.2.0/30".parse().unwrap()).unwrap();
        assert_eq!(p30.candidates().collect::<Vec<_>>(), [ip("192.0.2.2")]);
        assert_eq!(p30.capacity(), 1);
        for bad in ["192.0.2.0/31", "192.0.2.0/32"] {
            let err = OverlayPlan::new(bad.parse().unwrap()).unwrap_err();
            assert!(matches!(err, IpamError::TooSmall { .. }));
            assert!(err.to_string().contains("/30 or shorter"), "{err}");
        }
        let p0 = OverlayPlan::new("0.0.0.0/0".parse().unwrap()).unwrap();
        assert_eq!(p0.capacity(), (1u64 << 32) - 3);
    }

    #[test]
    fn first_free_and_exhaustion() {
        let plan = OverlayPlan::new("10.9.0.0/29".parse().unwrap()).unwrap();
        let mut used = BTreeSet::new();
        // Addresses outside the plan do not matter.
        used.insert(ip("172.16.0.9"));
        for expect in ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"] {
            let got = plan.first_free(&used).unwrap();
            assert_eq!(got, ip(expect));
            used.insert(got);
        }
        let err = plan.first_free(&used).unwrap_err();
        assert_eq!(
            err,
            IpamError::Exhausted {
                cidr: plan.cidr,
                in_use: 5
            }
        );
        assert_eq!(
            err.to_string(),
            "overlay network CIDR 10.9.0.0/29 is exhausted (5 addresses in use): widen overlay_cidr or \
             revoke and delete unused nodes"
        );
        // A hole is reused, lowest first.
        used.remove(&ip("10.9.0.4"));
        assert_eq!(plan.first_free(&used).unwrap(), ip("10.9.0.4"));
    }
}
