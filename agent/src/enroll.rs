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
    let bad = |what: &str| {
        AgentError::Other(format!(
            "the coordinator's enrollment answer has an invalid {what}; is it a compatible version?"
        ))
    };
    let coordinator_key =
        tunnel::keys::public_key_from_bytes(&r.coordinator_wg_public_key).map_err(|_| bad("WireGuard key"))?;
    Ok(Identity {
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
    })
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
