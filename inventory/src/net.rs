//! Network interfaces: `sys/class/net/<name>/{address,mtu,operstate,speed,uevent,device,device/driver}`
//! (Documentation/ABI/testing/sysfs-class-net), addresses and default routes from `proc/net`.
//!
//! IPv6 addresses come from `proc/net/if_inet6` (address, ifindex, prefix length, scope, flags, name).
//!
//! IPv4 addresses: procfs has no per-interface address file, so on a fixture tree (and as fallback) they are
//! derived from `proc/net/fib_trie` — every `/32 host LOCAL` leaf is an address of this host — correlated with
//! the directly connected routes of `proc/net/route` (the longest connected prefix containing the address names
//! the interface and the prefix length). That misses addresses without a connected route (point-to-point
//! peers, `noprefixroute`), so when the root is `/` the collector asks the kernel directly with `getifaddrs(3)`
//! (nix) instead, and falls back to `fib_trie` only if that fails.
//!
//! Default routes: `proc/net/route` (destination and mask 0, `RTF_UP`, not `RTF_REJECT`) and
//! `proc/net/ipv6_route` (destination `::/0`, same flags, not on `lo`). The route files print `__be32` values
//! as native-endian hex, so they are decoded with native byte order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::model::Nic;
use crate::reader::Ctx;

const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;
const RTF_REJECT: u32 = 0x200;
/// `IFA_F_TEMPORARY`: an RFC 4941 privacy address, rotated by design.
const IFA_F_TEMPORARY: u32 = 0x01;

pub(crate) fn collect(ctx: &mut Ctx<'_>, skip_prefixes: &[String]) -> Vec<Nic> {
    let routes = read_routes_v4(ctx);
    let defaults_v6 = read_defaults_v6(ctx);
    let mut v4 = if ctx.is_live() { live_ipv4() } else { None };
    if v4.is_none() {
        v4 = Some(fib_ipv4(ctx, &routes));
    }
    let v4 = v4.unwrap_or_default();
    let v6 = read_if_inet6(ctx);

    let mut nics = Vec::new();
    for name in ctx.dir_names(Some("nics"), "sys/class/net") {
        if name == "lo" || skip_prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        let base = format!("sys/class/net/{name}");
        let field = |f: &str| format!("nics[{name}].{f}");
        let mut nic = Nic {
            mac: ctx
                .attr(&field("mac"), format!("{base}/address"))
                .map(|m| m.to_ascii_lowercase()),
            is_virtual: !ctx.exists(format!("{base}/device")),
            driver: ctx.link_name(format!("{base}/device/driver")),
            kind: ctx
                .attr(&field("kind"), format!("{base}/uevent"))
                .and_then(|u| u.lines().find_map(|l| l.strip_prefix("DEVTYPE=").map(str::to_string))),
            speed_mbps: ctx
                .attr_quiet(format!("{base}/speed"))
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|s| *s > 0)
                .and_then(|s| u32::try_from(s).ok()),
            mtu: ctx.parse(&field("mtu"), format!("{base}/mtu")),
            operstate: ctx.attr(&field("operstate"), format!("{base}/operstate")),
            ..Nic::default()
        };
        let mut addrs: Vec<IpNet> = Vec::new();
        addrs.extend(v4.get(&name).into_iter().flatten().map(|n| IpNet::V4(*n)));
        addrs.extend(v6.get(&name).into_iter().flatten().map(|n| IpNet::V6(*n)));
        addrs.sort_by(|a, b| (a.addr().is_ipv6(), a).cmp(&(b.addr().is_ipv6(), b)));
        addrs.dedup();
        nic.addresses = addrs;
        if let Some(r) = routes.iter().find(|r| r.is_default() && r.iface == name) {
            nic.default_route_v4 = true;
            nic.gateway_v4 = (r.flags & RTF_GATEWAY != 0 && !r.gateway.is_unspecified()).then_some(r.gateway);
        }
        if let Some(gw) = defaults_v6.get(&name) {
            nic.default_route_v6 = true;
            nic.gateway_v6 = *gw;
        }
        nic.name = name;
        nics.push(nic);
    }
    nics
}

#[derive(Debug, Clone)]
struct Route4 {
    iface: String,
    dest: Ipv4Addr,
    gateway: Ipv4Addr,
    flags: u32,
    mask: Ipv4Addr,
}

impl Route4 {
    fn is_default(&self) -> bool {
        self.dest.is_unspecified()
            && self.mask.is_unspecified()
            && self.flags & RTF_UP != 0
            && self.flags & RTF_REJECT == 0
    }
}

fn hex_v4(s: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(s, 16).ok()?;
    Some(Ipv4Addr::from(v.to_ne_bytes()))
}

fn read_routes_v4(ctx: &mut Ctx<'_>) -> Vec<Route4> {
    let Some(text) = ctx.file("nics.default_route_v4", "proc/net/route") else {
        return Vec::new();
    };
    parse_routes_v4(&text)
}

fn parse_routes_v4(text: &str) -> Vec<Route4> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(Route4 {
                iface: f[0].to_string(),
                dest: hex_v4(f[1])?,
                gateway: hex_v4(f[2])?,
                flags: u32::from_str_radix(f[3], 16).ok()?,
                mask: hex_v4(f[7])?,
            })
        })
        .collect()
}

fn prefix_len(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.count_ones() == ones).then(|| u8::try_from(ones).ok()).flatten()
}

/// Local IPv4 addresses from `fib_trie`, assigned to interfaces through connected routes.
fn fib_ipv4(ctx: &mut Ctx<'_>, routes: &[Route4]) -> BTreeMap<String, Vec<Ipv4Net>> {
    let Some(text) = ctx.file("nics.addresses", "proc/net/fib_trie") else {
        return BTreeMap::new();
    };
    let locals = parse_fib_trie_locals(&text);
    let mut out: BTreeMap<String, Vec<Ipv4Net>> = BTreeMap::new();
    for ip in locals {
        if ip.is_loopback() {
            continue;
        }
        let best = routes
            .iter()
            .filter(|r| r.flags & RTF_UP != 0 && r.flags & RTF_GATEWAY == 0 && !r.is_default())
            .filter_map(|r| Some((r, prefix_len(r.mask)?)))
            .filter(|(r, len)| Ipv4Net::new(r.dest, *len).is_ok_and(|n| n.contains(&ip)))
            .max_by_key(|(_, len)| *len);
        if let Some((r, len)) = best
            && let Ok(net) = Ipv4Net::new(ip, len)
        {
            out.entry(r.iface.clone()).or_default().push(net);
        }
    }
    out
}

/// Addresses listed as `|-- a.b.c.d` followed by `/32 host LOCAL`.
fn parse_fib_trie_locals(text: &str) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut leaf: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("|-- ") {
            leaf = rest.trim().parse().ok();
        } else if t.starts_with("+-- ") {
            leaf = None;
        } else if t.starts_with('/') {
            let f: Vec<&str> = t.split_whitespace().collect();
            if f.len() >= 3
                && f[0] == "/32"
                && f[1] == "host"
                && f[2] == "LOCAL"
                && let Some(ip) = leaf
            {
                out.insert(ip);
            }
        }
    }
    out
}

/// IPv4 addresses straight from the kernel (root is `/` only).
fn live_ipv4() -> Option<BTreeMap<String, Vec<Ipv4Net>>> {
    let addrs = nix::ifaddrs::getifaddrs().ok()?;
    let mut out: BTreeMap<String, Vec<Ipv4Net>> = BTreeMap::new();
    for ifa in addrs {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = addr.ip();
        let len = ifa
            .netmask
            .as_ref()
            .and_then(|m| m.as_sockaddr_in())
            .and_then(|m| prefix_len(m.ip()))
            .unwrap_or(32);
        if let Ok(net) = Ipv4Net::new(ip, len) {
            out.entry(ifa.interface_name).or_default().push(net);
        }
    }
    Some(out)
}

fn read_if_inet6(ctx: &mut Ctx<'_>) -> BTreeMap<String, Vec<Ipv6Net>> {
    let Some(text) = ctx.file("nics.addresses", "proc/net/if_inet6") else {
        return BTreeMap::new();
    };
    parse_if_inet6(&text)
}

fn hex_v6(s: &str) -> Option<Ipv6Addr> {
    if s.len() != 32 {
        return None;
    }
    Some(Ipv6Addr::from(u128::from_str_radix(s, 16).ok()?))
}

fn parse_if_inet6(text: &str) -> BTreeMap<String, Vec<Ipv6Net>> {
    let mut out: BTreeMap<String, Vec<Ipv6Net>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let (Some(ip), Ok(plen), Ok(flags)) = (
            hex_v6(f[0]),
            u8::from_str_radix(f[2], 16),
            u32::from_str_radix(f[4], 16),
        ) else {
            continue;
        };
        if flags & IFA_F_TEMPORARY != 0 {
            continue;
        }
        if let Ok(net) = Ipv6Net::new(ip, plen) {
            out.entry(f[5].to_string()).or_default().push(net);
        }
    }
    out
}

/// Interfaces carrying an IPv6 default route → gateway (if any).
fn read_defaults_v6(ctx: &mut Ctx<'_>) -> BTreeMap<String, Option<Ipv6Addr>> {
    let Some(text) = ctx.file("nics.default_route_v6", "proc/net/ipv6_route") else {
        return BTreeMap::new();
    };
    parse_defaults_v6(&text)
}

fn parse_defaults_v6(text: &str) -> BTreeMap<String, Option<Ipv6Addr>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some(dest), Ok(plen), Some(nexthop), Ok(flags)) = (
            hex_v6(f[0]),
            u8::from_str_radix(f[1], 16),
            hex_v6(f[4]),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        let iface = f[9];
        if !dest.is_unspecified() || plen != 0 || flags & RTF_UP == 0 || flags & RTF_REJECT != 0 || iface == "lo" {
            continue;
        }
        let gw = (flags & RTF_GATEWAY != 0 && !nexthop.is_unspecified()).then_some(nexthop);
        out.entry(iface.to_string()).or_insert(gw);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 127.0.0.0/8 2 0 2\n        +-- 127.0.0.0/31 1 0 0\n           |-- 127.0.0.0\n              /8 host LOCAL\n           |-- 127.0.0.1\n              /32 host LOCAL\n     +-- 192.0.2.0/24 2 0 2\n        +-- 192.0.2.0/30 2 0 2\n           |-- 192.0.2.0\n              /24 link UNICAST\n           |-- 192.0.2.2\n              /32 host LOCAL\n        |-- 192.0.2.255\n           /32 link BROADCAST\n";
    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn fib_trie_locals_and_route_correlation() {
        let locals = parse_fib_trie_locals(FIB);
        assert_eq!(
            locals.into_iter().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
        let routes = parse_routes_v4(ROUTE);
        assert_eq!(routes.len(), 2);
        assert!(routes[0].is_default());
        assert_eq!(routes[0].gateway, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(prefix_len(routes[1].mask), Some(24));
    }

    #[test]
    fn ipv6_default_skips_reject_and_lo() {
        let text = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n\
                    00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n";
        let d = parse_defaults_v6(text);
        assert_eq!(d.len(), 1);
        assert_eq!(d["eth0"], Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn if_inet6_skips_temporary_addresses() {
        let text = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
                    20010db8000000000000000000000042 04 40 00 01     eth0\n\
                    20010db8000000000000000000000001 04 40 00 80     eth0\n";
        let m = parse_if_inet6(text);
        let got: Vec<String> = m["eth0"].iter().map(|n| n.to_string()).collect();
        assert_eq!(got, vec!["fe80::fc:ff:fe00:1/64", "2001:db8::1/64"]);
    }
}
