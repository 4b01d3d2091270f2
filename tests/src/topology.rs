//! The underlay: one "switch" namespace holding a bridge, and hosts plugged into it with a veth each.
//!
//! ```text
//!   [switch ns: br0]──p1──eth0[host ns "coord" 192.0.2.1/24]
//!                  └──p2──eth0[host ns "agent-1" 192.0.2.11/24] ...
//! ```
//! Veths are created *inside* the switch namespace with the peer placed straight into the host namespace
//! (`ip -n SW link add pN type veth peer name eth0 netns HOST`), so nothing is ever created in the root
//! namespace and deleting the namespaces removes every link.

use std::net::Ipv4Addr;

use crate::error::{HarnessError, Result};
use crate::netns::{Netns, check_ifname, reap_stale_test_namespaces, unique_prefix};

/// Name of the bridge inside the switch namespace.
pub const BRIDGE: &str = "br0";

/// Underlay network of the tests (TEST-NET-1, RFC 5737).
pub const TEST_SUBNET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);

/// Underlay network of the lab binary (TEST-NET-2, RFC 5737).
pub const LAB_SUBNET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);

/// The address `.host` in the /24 starting at `subnet`.
pub fn host_addr(subnet: Ipv4Addr, host: u8) -> Ipv4Addr {
    let o = subnet.octets();
    Ipv4Addr::new(o[0], o[1], o[2], host)
}

/// One host: a namespace whose `eth0` is plugged into the bridge.
#[derive(Debug)]
pub struct Host {
    role: String,
    ns: Netns,
    ip: Ipv4Addr,
    prefix_len: u8,
    port: String,
}

impl Host {
    /// The role given at creation (`coord`, `agent-1`, ...).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The host's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// Its underlay address on `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The prefix length of the underlay.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The bridge port (veth peer) name inside the switch namespace.
    pub fn port(&self) -> &str {
        &self.port
    }
}

/// Builds a [`Lab`].
#[derive(Debug, Clone)]
pub struct LabBuilder {
    prefix: Option<String>,
    prefix_len: u8,
    hosts: Vec<(String, Ipv4Addr)>,
}

impl Default for LabBuilder {
    fn default() -> Self {
        LabBuilder {
            prefix: None,
            prefix_len: 24,
            hosts: Vec::new(),
        }
    }
}

impl LabBuilder {
    /// Namespace name prefix (default: unique per process and call, `nbe2e-PID-N`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Prefix length of the underlay addresses (default 24).
    pub fn prefix_len(mut self, len: u8) -> Self {
        self.prefix_len = len;
        self
    }

    /// Adds a host called `role` with underlay address `ip`.
    pub fn host(mut self, role: impl Into<String>, ip: Ipv4Addr) -> Self {
        self.hosts.push((role.into(), ip));
        self
    }

    /// The namespace names this builder will create, switch last (deletion order). For state journaling.
    pub fn planned_namespaces(&self) -> Vec<String> {
        let prefix = self.prefix.clone().unwrap_or_else(|| "<unique>".into());
        let mut names: Vec<String> = self.hosts.iter().map(|(role, _)| format!("{prefix}-{role}")).collect();
        names.push(format!("{prefix}-sw"));
        names
    }

    /// Creates the switch, the bridge and every host. On error everything created so far is removed.
    pub fn build(self) -> Result<Lab> {
        let prefix = match self.prefix {
            Some(p) => p,
            None => {
                reap_stale_test_namespaces();
                unique_prefix()
            }
        };
        let switch = Netns::create(&format!("{prefix}-sw"))?;
        switch.ip(["link", "add", BRIDGE, "type", "bridge"])?;
        switch.ip(["link", "set", BRIDGE, "up"])?;
        let mut lab = Lab {
            prefix,
            prefix_len: self.prefix_len,
            switch: Some(switch),
            hosts: Vec::new(),
            next_port: 1,
        };
        for (role, ip) in self.hosts {
            lab.add_host(&role, ip)?;
        }
        Ok(lab)
    }
}

/// A running topology. Dropping it deletes every namespace (hosts first, then the switch), even while
/// unwinding from a panic; deletion is idempotent and tolerates objects that are already gone.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    prefix_len: u8,
    switch: Option<Netns>,
    hosts: Vec<Host>,
    next_port: usize,
}

impl Lab {
    /// Starts a [`LabBuilder`].
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    /// The namespace prefix of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The switch namespace (holds [`BRIDGE`]).
    ///
    /// # Panics
    /// After [`Lab::teardown`].
    pub fn switch(&self) -> &Netns {
        match &self.switch {
            Some(ns) => ns,
            None => panic!("lab {} was already torn down", self.prefix),
        }
    }

    /// Plugs a new host into the bridge: namespace `PREFIX-ROLE`, `eth0` with `ip`, lo and eth0 up.
    pub fn add_host(&mut self, role: &str, ip: Ipv4Addr) -> Result<&Host> {
        if self.hosts.iter().any(|h| h.role == role) {
            return Err(HarnessError::InvalidName {
                name: role.into(),
                reason: "host role already used".into(),
            });
        }
        let switch = self.switch.as_ref().ok_or_else(|| HarnessError::InvalidName {
            name: role.into(),
            reason: "the lab was already torn down".into(),
        })?;
        let port = format!("p{}", self.next_port);
        check_ifname(&port)?;
        let ns = Netns::create(&format!("{}-{role}", self.prefix))?;
        switch.ip([
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.next_port += 1;
        switch.ip(["link", "set", &port, "master", BRIDGE])?;
        switch.ip(["link", "set", &port, "up"])?;
        ns.ip(["addr", "add", &format!("{ip}/{}", self.prefix_len), "dev", "eth0"])?;
        ns.ip(["link", "set", "eth0", "up"])?;
        self.hosts.push(Host {
            role: role.to_string(),
            ns,
            ip,
            prefix_len: self.prefix_len,
            port,
        });
        let added = self.hosts.len() - 1;
        Ok(&self.hosts[added])
    }

    /// The host called `role`.
    pub fn try_host(&self, role: &str) -> Result<&Host> {
        self.hosts.iter().find(|h| h.role == role).ok_or_else(|| {
            let known: Vec<&str> = self.hosts.iter().map(|h| h.role.as_str()).collect();
            HarnessError::UnknownHost(role.to_string(), known.join(", "))
        })
    }

    /// The host called `role`.
    ///
    /// # Panics
    /// If there is no such host.
    pub fn host(&self, role: &str) -> &Host {
        self.try_host(role).unwrap_or_else(|e| panic!("{e}"))
    }

    /// All hosts, in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Every namespace name, in deletion order (hosts, then the switch).
    pub fn namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.hosts.iter().map(|h| h.ns.name().to_string()).collect();
        if let Some(sw) = &self.switch {
            names.push(sw.name().to_string());
        }
        names
    }

    /// Deletes everything now. Idempotent; reports the first error but tries every namespace.
    pub fn teardown(&mut self) -> Result<()> {
        let mut hosts: Vec<Host> = self.hosts.drain(..).rev().collect();
        let mut switch = self.switch.take();
        crate::netns::delete_all(hosts.iter_mut().map(|h| &mut h.ns).chain(switch.as_mut()))
    }

    /// Keeps every namespace after this value is dropped; returns their names in deletion order.
    pub fn persist(mut self) -> Vec<String> {
        let names = self.namespaces();
        for host in self.hosts.drain(..) {
            host.ns.persist();
        }
        if let Some(sw) = self.switch.take() {
            sw.persist();
        }
        names
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("nimbus-e2e: warning: lab {} teardown: {e}", self.prefix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_stay_in_the_subnet() {
        assert_eq!(host_addr(TEST_SUBNET, 1), Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(host_addr(LAB_SUBNET, 11), Ipv4Addr::new(198, 51, 100, 11));
    }

    #[test]
    fn planned_namespaces_list_switch_last() {
        let b = Lab::builder()
            .prefix("nlab")
            .host("coord", host_addr(LAB_SUBNET, 1))
            .host("agent-1", host_addr(LAB_SUBNET, 11));
        assert_eq!(b.planned_namespaces(), vec!["nlab-coord", "nlab-agent-1", "nlab-sw"]);
    }
}
