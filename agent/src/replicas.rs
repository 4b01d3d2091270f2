//! Coordinator replicas as this agent sees them, without I/O (`run` does the tunnel and the streams):
//!
//! * [`validate`] checks a replica list a coordinator sent (the enrollment answer, a `Replicas` message): every
//!   entry is untrusted input until it passes.
//! * [`plan_peers`] turns the current and the new list into the tunnel peer changes ([`PeerPlan`]): one
//!   WireGuard peer per replica; the peer the fleet stream uses is never removed under it.
//! * [`Failover`] chooses the replica the fleet stream goes to: after a failure the next one in the list (round
//!   robin) at once ([`Pace::Prompt`]), a backoff pause only once every replica failed in a row, and the replica
//!   that last worked first after such a pause.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};

use crate::identity::ReplicaPeer;

/// Most replicas a list may have (more is refused as hostile: each is a tunnel peer).
pub const MAX_REPLICAS: usize = 16;
/// Longest replica id accepted (ids appear in logs).
pub const MAX_ID_LEN: usize = 64;

/// Why a replica list was refused. Names the entry (position and id) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    #[error("the replica list is empty; a coordinator always lists at least itself")]
    Empty,
    #[error("the replica list has {0} entries; at most {MAX_REPLICAS} are accepted")]
    TooMany(usize),
    #[error("replica #{index} (id {id:?}): invalid {field}: {detail}")]
    Invalid {
        /// Position in the list, from 0.
        index: usize,
        /// The entry's id as sent (shortened to [`MAX_ID_LEN`] characters).
        id: String,
        /// The protobuf field: id, wg_public_key, wg_endpoint, overlay_ip, fleet_port.
        field: &'static str,
        detail: String,
    },
}

/// Checks every entry of `list` and returns it as [`ReplicaPeer`]s (in the same order): an id that is non-empty,
/// at most [`MAX_ID_LEN`] printable ASCII characters and unique; a 32-byte WireGuard key (not all zeros) no other
/// entry has; a `host:port` endpoint with an IP address and a non-zero port; an IPv4 overlay address inside
/// `overlay` (this node's network), neither its network nor broadcast address nor `own_ip`, and unique; a
/// non-zero Fleet port. An empty list and more than [`MAX_REPLICAS`] entries are refused too.
pub fn validate(
    list: &[nimbus_proto::Replica],
    overlay: Ipv4Net,
    own_ip: Ipv4Addr,
) -> Result<Vec<ReplicaPeer>, ReplicaError> {
    if list.is_empty() {
        return Err(ReplicaError::Empty);
    }
    if list.len() > MAX_REPLICAS {
        return Err(ReplicaError::TooMany(list.len()));
    }
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    let mut ips = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for (index, r) in list.iter().enumerate() {
        let bad = |field: &'static str, detail: String| ReplicaError::Invalid {
            index,
            id: r.id.chars().take(MAX_ID_LEN).collect(),
            field,
            detail,
        };
        if r.id.is_empty() {
            return Err(bad("id", "is empty".into()));
        }
        if r.id.len() > MAX_ID_LEN || !r.id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "id",
                format!("must be 1 to {MAX_ID_LEN} printable ASCII characters without spaces"),
            ));
        }
        if !ids.insert(r.id.as_str()) {
            return Err(bad("id", "is listed twice; replica ids must be unique".into()));
        }
        let key = tunnel::keys::public_key_from_bytes(&r.wg_public_key).map_err(|_| {
            let detail = match r.wg_public_key.len() {
                tunnel::keys::KEY_LEN => "is all zeros, not a usable WireGuard key".to_string(),
                n => format!("is {n} bytes; a WireGuard key has {}", tunnel::keys::KEY_LEN),
            };
            bad("wg_public_key", detail)
        })?;
        if !keys.insert(*key.as_bytes()) {
            return Err(bad("wg_public_key", "is another replica's key too".into()));
        }
        let endpoint: SocketAddr = r
            .wg_endpoint
            .parse()
            .map_err(|_| bad("wg_endpoint", format!("{:?} is not IP:port", r.wg_endpoint)))?;
        if endpoint.port() == 0 || endpoint.ip().is_unspecified() {
            return Err(bad(
                "wg_endpoint",
                format!("{endpoint} has an unspecified address or port 0"),
            ));
        }
        let overlay_ip: Ipv4Addr = r
            .overlay_ip
            .parse()
            .map_err(|_| bad("overlay_ip", format!("{:?} is not an IPv4 address", r.overlay_ip)))?;
        let special =
            overlay.prefix_len() < 31 && (overlay_ip == overlay.network() || overlay_ip == overlay.broadcast());
        if !overlay.contains(&overlay_ip) || special {
            return Err(bad(
                "overlay_ip",
                format!("{overlay_ip} is not a host address of this node's overlay network {overlay}"),
            ));
        }
        if overlay_ip == own_ip {
            return Err(bad("overlay_ip", format!("{overlay_ip} is this node's own address")));
        }
        if !ips.insert(overlay_ip) {
            return Err(bad(
                "overlay_ip",
                format!("{overlay_ip} is another replica's address too"),
            ));
        }
        let fleet_port = u16::try_from(r.fleet_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("fleet_port", format!("{} is not a TCP port (1..=65535)", r.fleet_port)))?;
        out.push(ReplicaPeer {
            id: r.id.clone(),
            public_key: tunnel::keys::public_key_to_base64(&key),
            wg_endpoint: endpoint,
            overlay_ip,
            fleet_port,
        });
    }
    Ok(out)
}

/// The tunnel peer of a replica: its overlay /32, its endpoint, persistent keepalive
/// ([`crate::run::PERSISTENT_KEEPALIVE_SECS`]).
pub fn peer_config(r: &ReplicaPeer) -> Result<tunnel::PeerConfig, tunnel::TunnelError> {
    Ok(tunnel::PeerConfig {
        public_key: r.key()?,
        endpoint: Some(r.wg_endpoint),
        allowed_ips: vec![IpNet::V4(Ipv4Net::from(r.overlay_ip))],
        persistent_keepalive: Some(crate::run::PERSISTENT_KEEPALIVE_SECS),
    })
}

/// The tunnel peer changes that take the peers of one replica list to the next; apply them in field order
/// (removals, key changes, then additions and updates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerPlan {
    /// Replicas no longer listed whose peer goes now.
    pub remove: Vec<ReplicaPeer>,
    /// Replicas listed under the same id with another key: (old key in base64, the replica as listed now).
    /// The peer changes its key in place (`Tunnel::set_peer_public_key`); the endpoint and address follow in
    /// `upsert`.
    pub rekey: Vec<(String, ReplicaPeer)>,
    /// Replicas that are new, or whose key, endpoint, overlay address or port changed: `Tunnel::add_peer`
    /// (which updates a peer with the same key).
    pub upsert: Vec<ReplicaPeer>,
    /// No longer listed, but the fleet stream runs on it: its peer goes when the stream ends (unless a later list
    /// brings it back).
    pub deferred: Vec<ReplicaPeer>,
}

impl PeerPlan {
    /// Nothing to change in the tunnel.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.rekey.is_empty() && self.upsert.is_empty() && self.deferred.is_empty()
    }
}

/// What changes when the replica list goes from `current` to `next` (both validated), with the fleet stream on
/// the replica `in_use` (its id). Replicas are matched by id. A replica that left the list keeps its peer when a
/// listed replica has its key (the peer is the same; `upsert` updates it), and while it is `in_use`.
pub fn plan_peers(current: &[ReplicaPeer], next: &[ReplicaPeer], in_use: Option<&str>) -> PeerPlan {
    let mut plan = PeerPlan::default();
    for n in next {
        match current.iter().find(|c| c.id == n.id) {
            Some(c) if c == n => {}
            Some(c) => {
                if c.public_key != n.public_key {
                    plan.rekey.push((c.public_key.clone(), n.clone()));
                }
                plan.upsert.push(n.clone());
            }
            None => plan.upsert.push(n.clone()),
        }
    }
    for c in current {
        if next.iter().any(|n| n.id == c.id || n.public_key == c.public_key) {
            continue;
        }
        if in_use == Some(c.id.as_str()) {
            plan.deferred.push(c.clone());
        } else {
            plan.remove.push(c.clone());
        }
    }
    plan
}

/// How soon to try the next replica after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Another replica has not failed yet in this round: try it at once (after a short jitter).
    Prompt,
    /// Every replica failed in a row: wait the backoff delay.
    Backoff,
}

/// Which replica the fleet stream goes to. Replicas are named by id, so a changed list keeps the choice when the
/// replica is still listed (and falls back to the first listed one when not).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failover {
    /// The replica to try next.
    next: Option<String>,
    /// The replica the newest stream that got established ran on.
    worked: Option<String>,
    /// Failures since the last established stream or backoff pause.
    failed_in_row: usize,
}

impl Failover {
    /// Starts at `preferred` (the replica this agent enrolled with), or at the first listed one.
    pub fn new(preferred: Option<&str>) -> Failover {
        Failover {
            next: preferred.map(str::to_string),
            worked: None,
            failed_in_row: 0,
        }
    }

    /// The replica to connect to; `None` only for an empty list.
    pub fn target<'a>(&self, replicas: &'a [ReplicaPeer]) -> Option<&'a ReplicaPeer> {
        self.next
            .as_deref()
            .and_then(|id| replicas.iter().find(|r| r.id == id))
            .or_else(|| replicas.first())
    }

    /// A stream on `id` got established (Welcome received): it is the one to prefer, and the failure count
    /// starts over.
    pub fn established(&mut self, id: &str) {
        self.worked = Some(id.to_string());
        self.next = Some(id.to_string());
        self.failed_in_row = 0;
    }

    /// [`Failover::failed`] for the replica `peer` the stream ran on. When `replicas` lists it under another id
    /// (the stream started on the single-coordinator placeholder, `coordinator`, before the agent learnt the
    /// replicas' ids), it is found by its key, so the next attempt really goes to another replica.
    pub fn failed_peer(&mut self, replicas: &[ReplicaPeer], peer: &ReplicaPeer) -> Pace {
        let id = replicas
            .iter()
            .find(|r| r.id == peer.id)
            .or_else(|| replicas.iter().find(|r| r.public_key == peer.public_key))
            .map_or_else(|| peer.id.clone(), |r| r.id.clone());
        self.failed(replicas, &id)
    }

    /// The stream on `id` failed (to connect, or later): the next attempt goes to the replica after it in
    /// `replicas` ([`Pace::Prompt`]) unless every replica failed in a row; then [`Pace::Backoff`], and the next
    /// round starts with the replica that last worked (if still listed).
    pub fn failed(&mut self, replicas: &[ReplicaPeer], id: &str) -> Pace {
        self.failed_in_row += 1;
        let successor = match replicas.iter().position(|r| r.id == id) {
            Some(i) => replicas.get((i + 1) % replicas.len()),
            None => replicas.first(),
        }
        .map(|r| r.id.clone());
        if self.failed_in_row >= replicas.len().max(1) {
            self.failed_in_row = 0;
            let worked = self.worked.clone().filter(|w| replicas.iter().any(|r| &r.id == w));
            self.next = worked.or(successor);
            Pace::Backoff
        } else {
            self.next = successor;
            Pace::Prompt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Vec<u8> {
        vec![n; 32]
    }

    fn replica(id: &str, n: u8) -> nimbus_proto::Replica {
        nimbus_proto::Replica {
            id: id.into(),
            wg_public_key: key(n),
            wg_endpoint: format!("192.0.2.{n}:51820"),
            overlay_ip: format!("100.96.0.{n}"),
            fleet_port: 7000,
        }
    }

    fn net() -> Ipv4Net {
        "100.96.0.0/16".parse().unwrap()
    }

    const OWN: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 50);

    fn peer(id: &str, n: u8) -> ReplicaPeer {
        validate(&[replica(id, n)], net(), OWN).unwrap().remove(0)
    }

    /// A change that breaks one field of a replica entry.
    type Breaker = Box<dyn Fn(&mut nimbus_proto::Replica)>;

    fn field_of(e: ReplicaError) -> (usize, &'static str, String) {
        let text = e.to_string();
        match e {
            ReplicaError::Invalid { index, field, .. } => (index, field, text),
            other => panic!("expected an invalid entry, got {other:?}"),
        }
    }

    #[test]
    fn a_good_list_is_kept_in_order_with_base64_keys() {
        let list = validate(&[replica("c1", 1), replica("c2", 2)], net(), OWN).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, "c1");
        assert_eq!(list[1].id, "c2");
        assert_eq!(list[1].overlay_ip, Ipv4Addr::new(100, 96, 0, 2));
        assert_eq!(list[1].wg_endpoint, "192.0.2.2:51820".parse().unwrap());
        assert_eq!(list[1].fleet_port, 7000);
        assert_eq!(list[0].key().unwrap().as_bytes(), &[1u8; 32]);
        assert_eq!(list[0].public_key, "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=");
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(Breaker, &str, &str)> = vec![
            (Box::new(|r| r.wg_public_key = vec![1; 31]), "wg_public_key", "31 bytes"),
            (
                Box::new(|r| r.wg_public_key = vec![0; 32]),
                "wg_public_key",
                "all zeros",
            ),
            (
                Box::new(|r| r.wg_endpoint = "coord.example:51820".into()),
                "wg_endpoint",
                "not IP:port",
            ),
            (
                Box::new(|r| r.wg_endpoint = "192.0.2.9:0".into()),
                "wg_endpoint",
                "port 0",
            ),
            (
                Box::new(|r| r.wg_endpoint = "0.0.0.0:51820".into()),
                "wg_endpoint",
                "unspecified",
            ),
            (
                Box::new(|r| r.overlay_ip = "10.0.0.1".into()),
                "overlay_ip",
                "100.96.0.0/16",
            ),
            (
                Box::new(|r| r.overlay_ip = "100.96.0.0".into()),
                "overlay_ip",
                "not a host address",
            ),
            (
                Box::new(|r| r.overlay_ip = "100.96.255.255".into()),
                "overlay_ip",
                "not a host address",
            ),
            (
                Box::new(|r| r.overlay_ip = "fd00::1".into()),
                "overlay_ip",
                "not an IPv4",
            ),
            (
                Box::new(|r| r.overlay_ip = OWN.to_string()),
                "overlay_ip",
                "own address",
            ),
            (Box::new(|r| r.fleet_port = 0), "fleet_port", "not a TCP port"),
            (Box::new(|r| r.fleet_port = 70_000), "fleet_port", "not a TCP port"),
            (Box::new(|r| r.id = String::new()), "id", "empty"),
            (Box::new(|r| r.id = "two words".into()), "id", "printable"),
            (Box::new(|r| r.id = "x".repeat(65)), "id", "printable"),
        ];
        for (break_it, want_field, want_text) in cases {
            let mut second = replica("c2", 2);
            break_it(&mut second);
            let (index, field, text) = field_of(validate(&[replica("c1", 1), second], net(), OWN).unwrap_err());
            assert_eq!((index, field), (1, want_field), "{text}");
            assert!(text.contains(want_text) && text.contains("replica #1"), "{text}");
        }
    }

    #[test]
    fn duplicates_are_refused() {
        let (index, field, text) = field_of(validate(&[replica("c1", 1), replica("c1", 2)], net(), OWN).unwrap_err());
        assert_eq!((index, field), (1, "id"));
        assert!(text.contains("listed twice"), "{text}");
        let mut same_key = replica("c2", 2);
        same_key.wg_public_key = key(1);
        let (_, field, _) = field_of(validate(&[replica("c1", 1), same_key], net(), OWN).unwrap_err());
        assert_eq!(field, "wg_public_key");
        let mut same_ip = replica("c2", 2);
        same_ip.overlay_ip = "100.96.0.1".into();
        let (_, field, _) = field_of(validate(&[replica("c1", 1), same_ip], net(), OWN).unwrap_err());
        assert_eq!(field, "overlay_ip");
    }

    #[test]
    fn empty_and_oversized_lists_are_refused() {
        assert_eq!(validate(&[], net(), OWN).unwrap_err(), ReplicaError::Empty);
        let sixteen: Vec<_> = (1..=16).map(|n| replica(&format!("c{n}"), n)).collect();
        assert_eq!(validate(&sixteen, net(), OWN).unwrap().len(), 16);
        let seventeen: Vec<_> = (1..=17).map(|n| replica(&format!("c{n}"), n)).collect();
        let e = validate(&seventeen, net(), OWN).unwrap_err();
        assert_eq!(e, ReplicaError::TooMany(17));
        assert!(e.to_string().contains("at most 16"), "{e}");
    }

    #[test]
    fn peer_config_routes_the_replicas_overlay_address() {
        let c = peer_config(&peer("c1", 1)).unwrap();
        assert_eq!(c.allowed_ips, vec!["100.96.0.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(c.endpoint, Some("192.0.2.1:51820".parse().unwrap()));
        assert_eq!(c.persistent_keepalive, Some(25));
        assert_eq!(c.public_key.as_bytes(), &[1u8; 32]);
    }

    #[test]
    fn plan_adds_new_and_removes_unlisted_replicas() {
        let (a, b, c) = (peer("a", 1), peer("b", 2), peer("c", 3));
        let plan = plan_peers(&[a.clone(), b.clone()], &[a.clone(), c.clone()], Some("a"));
        assert_eq!(
            plan,
            PeerPlan {
                remove: vec![b.clone()],
                upsert: vec![c.clone()],
                ..Default::default()
            }
        );
        assert!(plan_peers(&[a.clone(), b.clone()], &[a.clone(), b.clone()], Some("a")).is_empty());
    }

    #[test]
    fn plan_keeps_the_replica_in_use_until_the_stream_ends() {
        let (a, b) = (peer("a", 1), peer("b", 2));
        let plan = plan_peers(&[a.clone(), b.clone()], std::slice::from_ref(&b), Some("a"));
        assert_eq!(
            plan,
            PeerPlan {
                deferred: vec![a.clone()],
                ..Default::default()
            }
        );
        // Without a stream it goes at once.
        let plan = plan_peers(&[a.clone(), b.clone()], std::slice::from_ref(&b), None);
        assert_eq!(plan.remove, vec![a]);
        assert!(plan.deferred.is_empty());
    }

    #[test]
    fn plan_changes_a_key_and_updates_a_moved_endpoint() {
        let (a, b) = (peer("a", 1), peer("b", 2));
        let mut a_rekeyed = peer("a", 9);
        a_rekeyed.overlay_ip = a.overlay_ip;
        a_rekeyed.wg_endpoint = a.wg_endpoint;
        let mut b_moved = b.clone();
        b_moved.wg_endpoint = "198.51.100.2:51820".parse().unwrap();
        let plan = plan_peers(
            &[a.clone(), b.clone()],
            &[a_rekeyed.clone(), b_moved.clone()],
            Some("a"),
        );
        assert_eq!(
            plan,
            PeerPlan {
                rekey: vec![(a.public_key.clone(), a_rekeyed.clone())],
                upsert: vec![a_rekeyed, b_moved],
                ..Default::default()
            }
        );
    }

    #[test]
    fn plan_keeps_a_peer_whose_key_is_listed_under_a_new_id() {
        // An identity without a list knows its coordinator as "coordinator"; the first Replicas message names it.
        let mut implied = peer("a", 1);
        implied.id = crate::identity::SINGLE_REPLICA_ID.into();
        let (a, b) = (peer("a", 1), peer("b", 2));
        let plan = plan_peers(
            std::slice::from_ref(&implied),
            &[a.clone(), b.clone()],
            Some("coordinator"),
        );
        assert_eq!(
            plan,
            PeerPlan {
                upsert: vec![a, b],
                ..Default::default()
            }
        );
    }

    #[test]
    fn failover_moves_round_robin_and_backs_off_after_a_full_round() {
        let list = [peer("a", 1), peer("b", 2), peer("c", 3)];
        let mut f = Failover::new(Some("b"));
        assert_eq!(f.target(&list).unwrap().id, "b");
        // b fails to connect: c at once, then a at once, then b again only after a backoff pause.
        assert_eq!(f.failed(&list, "b"), Pace::Prompt);
        assert_eq!(f.target(&list).unwrap().id, "c");
        assert_eq!(f.failed(&list, "c"), Pace::Prompt);
        assert_eq!(f.target(&list).unwrap().id, "a");
        assert_eq!(f.failed(&list, "a"), Pace::Backoff);
        assert_eq!(f.target(&list).unwrap().id, "b");
        assert_eq!(f.failed(&list, "b"), Pace::Prompt);
    }

    #[test]
    fn failover_leaves_a_dead_replica_at_once_and_prefers_the_one_that_worked() {
        let list = [peer("a", 1), peer("b", 2), peer("c", 3)];
        let mut f = Failover::new(Some("a"));
        f.established("a");
        // The stream on a dies: b next, without a pause.
        assert_eq!(f.failed(&list, "a"), Pace::Prompt);
        assert_eq!(f.target(&list).unwrap().id, "b");
        f.established("b");
        assert_eq!(f.target(&list).unwrap().id, "b");
        // Everything fails: after the pause the round starts with b, the replica that last worked.
        assert_eq!(f.failed(&list, "b"), Pace::Prompt);
        assert_eq!(f.failed(&list, "c"), Pace::Prompt);
        assert_eq!(f.failed(&list, "a"), Pace::Backoff);
        assert_eq!(f.target(&list).unwrap().id, "b");
    }

    #[test]
    fn failover_with_one_replica_always_backs_off() {
        let list = [peer("a", 1)];
        let mut f = Failover::new(None);
        assert_eq!(f.target(&list).unwrap().id, "a");
        f.established("a");
        assert_eq!(f.failed(&list, "a"), Pace::Backoff);
        assert_eq!(f.failed(&list, "a"), Pace::Backoff);
        assert_eq!(f.target(&list).unwrap().id, "a");
        assert!(f.target(&[]).is_none());
    }

    #[test]
    fn failover_survives_a_changed_list() {
        // A stream that ran on the placeholder id of a single coordinator: found again by its key.
        let list = [peer("a", 1), peer("b", 2), peer("c", 3)];
        let placeholder = ReplicaPeer {
            id: crate::identity::SINGLE_REPLICA_ID.into(),
            ..list[1].clone()
        };
        let mut f = Failover::new(None);
        assert_eq!(f.failed_peer(&list, &placeholder), Pace::Prompt);
        assert_eq!(
            f.target(&list).unwrap().id,
            list[2].id,
            "moves past the dead replica, not back to it"
        );

        let mut f = Failover::new(Some("gone"));
        let list = [peer("a", 1), peer("b", 2)];
        // The preferred replica is not listed: the first one.
        assert_eq!(f.target(&list).unwrap().id, "a");
        // The failed replica left the list meanwhile: start over at the first one.
        assert_eq!(f.failed(&list, "gone"), Pace::Prompt);
        assert_eq!(f.target(&list).unwrap().id, "a");
    }
}
