//! Enrollment: the only traffic before the tunnel exists. TLS to the
//! coordinator's public address, trusting only a CA matching the pin.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nimbus_proto::enrollment_client::EnrollmentClient;
use nimbus_proto::{EnrollRequest, NodeStatus, StatusRequest};
use tonic::Code;

use crate::error::AgentError;
use crate::identity::Identity;

/// How long to wait for the TCP connection to the enrollment endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one enrollment call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What this host says about itself when enrolling.
pub struct HostFacts {
    pub hostname: String,
    pub machine_id: String,
    pub node_name: String,
    pub agent_version: String,
    /// MAC addresses of the host's interfaces (a bare-metal token may be bound to one of them).
    pub macs: Vec<String>,
}

/// The MAC addresses of this host's network interfaces from `/sys/class/net/*/address` (loopback, all-zero
/// and unreadable ones left out), sorted.
pub fn host_macs() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in rd.flatten() {
        if e.file_name() == "lo" {
            continue;
        }
        if let Ok(a) = std::fs::read_to_string(e.path().join("address")) {
            let a = a.trim().to_ascii_lowercase();
            let is_mac = a.len() == 17
                && a.split(':')
                    .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
            if is_mac && a != "00:00:00:00:00:00" {
                out.push(a);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Shape check only ("nimbus1.<id>.<secret>", no whitespace); the coordinator
/// does the real validation. Lets a typo fail before any network traffic.
pub fn check_token_shape(token: &str) -> Result<(), AgentError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts[0] != "nimbus1" {
        return Err(AgentError::MalformedToken(
            "it must have three dot-separated parts starting with `nimbus1`".into(),
        ));
    }
    if parts[1..]
        .iter()
        .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        return Err(AgentError::MalformedToken(
            "id and secret must be non-empty and alphanumeric".into(),
        ));
    }
    Ok(())
}

async fn channel(addr: &str, pin: &pki::Pin) -> Result<tonic::transport::Channel, AgentError> {
    pki::connect_pinned(addr, pin, CONNECT_TIMEOUT)
        .await
        .map_err(|e| match e {
            pki::PkiError::PinMismatch { .. } => AgentError::PinMismatch {
                addr: addr.into(),
                pin: pin.to_string(),
                detail: e.to_string(),
            },
            pki::PkiError::Unreachable { .. } => AgentError::Unreachable {
                addr: addr.into(),
                detail: e.to_string(),
            },
            other => AgentError::Unreachable {
                addr: addr.into(),
                detail: other.to_string(),
            },
        })
}

fn status_err(addr: &str, s: tonic::Status) -> AgentError {
    match s.code() {
        Code::InvalidArgument if s.message().contains("malformed join token") => {
            AgentError::MalformedToken(s.message().to_string())
        }
        // FailedPrecondition: e.g. this agent's version is outside what the coordinator serves.
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::ResourceExhausted
        | Code::FailedPrecondition => AgentError::Refused(s.message().to_string()),
        Code::Unavailable | Code::DeadlineExceeded => AgentError::Unreachable {
            addr: addr.into(),
            detail: s.message().to_string(),
        },
        _ => AgentError::Other(format!("enrollment failed: {}", s.message())),
    }
}

/// One enrollment-endpoint call, bounded by [`CALL_TIMEOUT`], with its status mapped to an [`AgentError`].
async fn call<T>(
    addr: &str,
    rpc: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(CALL_TIMEOUT, rpc).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(status_err(addr, s)),
        Err(_) => Err(AgentError::Unreachable {
            addr: addr.into(),
            detail: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        }),
    }
}

/// Enroll with `token`, returning the identity to persist.
pub async fn enroll(
    addr: &str,
    pin: &pki::Pin,
    token: &str,
    key: &tunnel::PublicKey,
    facts: HostFacts,
) -> Result<Identity, AgentError> {
    check_token_shape(token)?;
    let ch = channel(addr, pin).await?;
    let mut client = EnrollmentClient::new(ch);
    let req = EnrollRequest {
        token: token.to_string(),
        wg_public_key: key.as_bytes().to_vec(),
        hostname: facts.hostname,
        machine_id: facts.machine_id,
        agent_version: facts.agent_version,
        node_name: facts.node_name,
        macs: facts.macs,
    };
    let r = call(addr, client.enroll(req)).await?;
    if r.pending {
        tracing::warn!(
            node = %r.node_name,
            "enrolled, waiting for an operator to accept this node (`nimbusctl node accept {}`); the tunnel comes up \
             once it is accepted",
            r.node_name
        );
    }
    identity_from_response(r, addr, pin)
}

/// The identity an enrollment answer gives (`addr` and `pin`: the enrollment endpoint, kept for the revocation
/// check). Everything in the answer is checked: a field out of range or a bad replica entry
/// ([`crate::replicas::validate`], [`AgentError::Replicas`] naming the field) fails the enrollment. A single
/// coordinator's answer (no replicas, or just itself) leaves [`Identity::replicas`] empty.
pub fn identity_from_response(
    r: nimbus_proto::EnrollResponse,
    addr: &str,
    pin: &pki::Pin,
) -> Result<Identity, AgentError> {
    let bad = |what: &str| {
        AgentError::Other(format!(
            "the coordinator's enrollment answer has an invalid {what}; is it a compatible version?"
        ))
    };
    let coordinator_key =
        tunnel::keys::public_key_from_bytes(&r.coordinator_wg_public_key).map_err(|_| bad("WireGuard key"))?;
    let mut id = Identity {
        node_id: r.node_id,
        node_name: r.node_name,
        overlay_ip: r.overlay_ip.parse::<Ipv4Addr>().map_err(|_| bad("overlay IP"))?,
        overlay_prefix_len: u8::try_from(r.overlay_prefix_len)
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| bad("prefix length"))?,
        coordinator_public_key: tunnel::keys::public_key_to_base64(&coordinator_key),
        coordinator_wg_endpoint: r
            .coordinator_wg_endpoint
            .parse::<SocketAddr>()
            .map_err(|_| bad("WireGuard endpoint"))?,
        coordinator_overlay_ip: r
            .coordinator_overlay_ip
            .parse::<Ipv4Addr>()
            .map_err(|_| bad("coordinator overlay IP"))?,
        fleet_port: u16::try_from(r.fleet_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("fleet port"))?,
        mtu: u16::try_from(r.mtu)
            .ok()
            .filter(|m| (1280..=9000).contains(m))
            .ok_or_else(|| bad("MTU"))?,
        enroll_endpoint: addr.to_string(),
        ca_pin: pin.to_string(),
        replicas: Vec::new(),
    };
    if !r.replicas.is_empty() {
        let overlay = id.overlay_net().ok_or_else(|| bad("prefix length"))?;
        let list = crate::replicas::validate(&r.replicas, overlay, id.overlay_ip)?;
        id.set_replicas(list);
    }
    Ok(id)
}

/// Ask the enrollment endpoint whether this key is still admitted.
pub async fn status(addr: &str, pin: &pki::Pin, key: &tunnel::PublicKey) -> Result<(NodeStatus, String), AgentError> {
    let ch = channel(addr, pin).await?;
    let mut client = EnrollmentClient::new(ch);
    let r = call(
        addr,
        client.status(StatusRequest {
            wg_public_key: key.as_bytes().to_vec(),
        }),
    )
    .await?;
    Ok((
        NodeStatus::try_from(r.status).unwrap_or(NodeStatus::Unspecified),
        r.reason,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape() {
        assert!(check_token_shape("nimbus1.abc123.def456").is_ok());
        for bad in [
            "",
            "nimbus1.zz",
            "nimbus2.a.b",
            "nimbus1..b",
            "nimbus1.a.b c",
            "nimbus1.a.b.c",
        ] {
            let e = check_token_shape(bad).unwrap_err();
            assert!(e.to_string().contains("malformed join token"), "{bad}: {e}");
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
        }
    }

    fn pin() -> pki::Pin {
        pki::Pin::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn replica(id: &str, n: u8) -> nimbus_proto::Replica {
        nimbus_proto::Replica {
            id: id.into(),
            wg_public_key: vec![n; 32],
            wg_endpoint: format!("192.0.2.{n}:51820"),
            overlay_ip: format!("100.96.0.{n}"),
            fleet_port: 7000,
        }
    }

    /// A coordinator's answer: it is `c1` (key [1; 32]) and lists `replicas`.
    fn answer(replicas: Vec<nimbus_proto::Replica>) -> nimbus_proto::EnrollResponse {
        nimbus_proto::EnrollResponse {
            node_id: "n1".into(),
            node_name: "agent-1".into(),
            overlay_ip: "100.96.0.50".into(),
            overlay_prefix_len: 16,
            coordinator_wg_public_key: vec![1; 32],
            coordinator_wg_endpoint: "192.0.2.1:51820".into(),
            coordinator_overlay_ip: "100.96.0.1".into(),
            fleet_port: 7000,
            mtu: 1420,
            replicas,
            ..Default::default()
        }
    }

    fn refused(replicas: Vec<nimbus_proto::Replica>) -> String {
        let e = identity_from_response(answer(replicas), "192.0.2.1:7443", &pin()).unwrap_err();
        assert!(matches!(e, AgentError::Replicas(_)), "{e}");
        assert_eq!(e.exit_code(), 1);
        e.to_string()
    }

    #[test]
    fn a_single_coordinator_answer_stores_no_list() {
        for replicas in [vec![], vec![replica("c1", 1)]] {
            let id = identity_from_response(answer(replicas), "192.0.2.1:7443", &pin()).unwrap();
            assert!(id.replicas.is_empty());
            assert_eq!(id.replica_peers().len(), 1);
            assert_eq!(id.replica_peers()[0].overlay_ip, Ipv4Addr::new(100, 96, 0, 1));
            assert_eq!(id.enroll_endpoint, "192.0.2.1:7443");
            assert_eq!(id.ca_pin, pin().to_string());
        }
    }

    #[test]
    fn the_replica_list_of_the_answer_is_kept() {
        let id = identity_from_response(
            answer(vec![replica("c1", 1), replica("c2", 2), replica("c3", 3)]),
            "192.0.2.1:7443",
            &pin(),
        )
        .unwrap();
        let ids: Vec<_> = id.replica_peers().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["c1", "c2", "c3"]);
        assert_eq!(id.replicas[2].wg_endpoint, "192.0.2.3:51820".parse().unwrap());
        assert_eq!(
            id.replicas[2].public_key,
            tunnel::keys::public_key_to_base64(&[3u8; 32].into())
        );
        assert_eq!(id.primary_replica().as_deref(), Some("c1"));
    }

    #[test]
    fn a_bad_replica_fails_enrollment_naming_the_field() {
        let mut short_key = replica("c2", 2);
        short_key.wg_public_key.pop();
        let e = refused(vec![replica("c1", 1), short_key]);
        assert!(
            e.contains("replica #1 (id \"c2\"): invalid wg_public_key: is 31 bytes"),
            "{e}"
        );

        let mut endpoint = replica("c2", 2);
        endpoint.wg_endpoint = "nowhere".into();
        assert!(refused(vec![replica("c1", 1), endpoint]).contains("invalid wg_endpoint"));

        let mut outside = replica("c2", 2);
        outside.overlay_ip = "100.97.0.2".into();
        let e = refused(vec![replica("c1", 1), outside]);
        assert!(e.contains("invalid overlay_ip") && e.contains("100.96.0.0/16"), "{e}");

        let e = refused(vec![replica("c1", 1), replica("c1", 2)]);
        assert!(e.contains("invalid id") && e.contains("listed twice"), "{e}");

        let e = refused((1..=17).map(|n| replica(&format!("c{n}"), n)).collect());
        assert!(e.contains("17 entries"), "{e}");
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let r = status_err("x", tonic::Status::unauthenticated("join token expired"));
        assert_eq!(r.exit_code(), crate::error::EXIT_REFUSED);
        let m = status_err("x", tonic::Status::invalid_argument("malformed join token: bad"));
        assert_eq!(m.exit_code(), crate::error::EXIT_USAGE);
        let u = status_err("x", tonic::Status::unavailable("down"));
        assert_eq!(u.exit_code(), crate::error::EXIT_UNAVAILABLE);
    }
}
