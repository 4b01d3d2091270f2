//! Who calls the admin API and what they may do.
//!
//! Every admin call carries a [`Caller`]: the principal (the Unix-socket caller's uid from `SO_PEERCRED`, a
//! client certificate's subject, or an OIDC token's subject), where the call came from, and the [`Role`]s
//! granted. The remote listener's layer ([`layer`]) authenticates and authorizes before the service runs and
//! puts the `Caller` into the request; the local socket grants `admin` to whoever the kernel let through its
//! 0600 permissions. [`required_role`] is the one table of RPC → role; nothing else decides access.
//!
//! # Layout
//! * this module — [`Role`], [`Caller`], [`required_role`] (the table), [`caller`] (read it in a service).
//! * `layer`  — the tower layer on the remote admin listener: credentials → `Caller` → allow or refuse.
//! * `oidc`   — bearer tokens (JWT) checked against the issuer's JWKS: signature, issuer, audience, expiry,
//!   not-before, roles from a configured claim.
//! * `cert`   — the subject and roles of a verified client certificate.

pub mod cert;
pub mod layer;
pub mod oidc;

use std::collections::BTreeSet;
use std::fmt;

pub use audit::{Principal, PrincipalKind};

/// Access levels, each including the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Read fleet state.
    Viewer,
    /// Tokens, policy apply, rollouts, releases.
    Operator,
    /// Revocations, keys, and the coordinator's own settings.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `s` (exactly `viewer`, `operator` or `admin`).
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of one admin request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// "unix" or the peer's socket address.
    pub from: String,
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// A caller on the local socket: `uid:N` as the kernel reports it, with every role.
    pub fn local(uid: Option<u32>) -> Caller {
        Caller {
            principal: uid.map_or_else(|| Principal::system("unix-socket"), Principal::uid),
            from: "unix".into(),
            roles: Role::ALL.into_iter().collect(),
        }
    }

    /// Whether any granted role includes `need`.
    pub fn may(&self, need: Role) -> bool {
        self.roles.iter().any(|r| *r >= need)
    }

    /// `kind:subject`, as audit entries and logs show the principal.
    pub fn display(&self) -> String {
        format!("{}:{}", self.principal.kind.as_str(), self.principal.subject)
    }
}

/// The role an admin RPC needs, by its method name (the last segment of the gRPC path). `None`: an unknown
/// method, refused. This is the only table of access rules; `docs/admin-api.md` lists it for operators and a
/// test keeps the two equal.
pub fn required_role(method: &str) -> Option<Role> {
    use Role::*;
    Some(match method {
        "ListTokens"
        | "ListNodes"
        | "GetNode"
        | "Latency"
        | "PlanReplication"
        | "ListPolicyRevisions"
        | "GetPolicy"
        | "GetRollout"
        | "ListReleases"
        | "ListAudit"
        | "WhoAmI"
        | "ListReplicas" => Viewer,
        "CreateToken" | "RevokeToken" | "AcceptNode" | "ApplyPolicy" | "RollbackPolicy" | "ControlRollout"
        | "AddRelease" | "StartUpgrade" => Operator,
        "RevokeNode" | "DecommissionNodes" | "InstallReleaseRepository" | "RotateKey" => Admin,
        _ => return None,
    })
}

/// The caller of `req`: the one the remote layer authenticated, else the local socket's peer (SO_PEERCRED).
pub fn caller<T>(req: &tonic::Request<T>) -> Caller {
    if let Some(c) = req.extensions().get::<Caller>() {
        return c.clone();
    }
    let uid = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    Caller::local(uid)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The process-wide rustls provider (ring), for tests that make TLS configurations.
    pub(crate) fn provider() {
        pki::install_crypto_provider();
    }

    /// docs/admin-api.md's table, as (method, role) pairs.
    fn documented() -> Vec<(String, String)> {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/admin-api.md")).unwrap();
        let start = doc.find("<!-- rpc-roles:start -->").unwrap();
        let end = doc.find("<!-- rpc-roles:end -->").unwrap();
        doc[start..end]
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
                match cells.as_slice() {
                    [m, r] if *m != "RPC" && !m.starts_with('-') => Some((m.to_string(), r.to_string())),
                    _ => None,
                }
            })
            .collect()
    }

    #[test]
    fn every_admin_rpc_has_one_documented_role() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(nimbus_proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "Admin")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
            .collect();
        let doc = documented();
        assert_eq!(doc.len(), methods.len(), "docs/admin-api.md lists {doc:?}");
        for m in &methods {
            let role = required_role(m).unwrap_or_else(|| panic!("{m} has no role"));
            let row = doc
                .iter()
                .find(|(d, _)| d == m)
                .unwrap_or_else(|| panic!("{m} not in docs/admin-api.md"));
            assert_eq!(row.1, role.as_str(), "{m}: docs say {}, code says {role}", row.1);
        }
        assert_eq!(required_role("NoSuchMethod"), None);
    }

    #[test]
    fn roles_include_the_ones_below() {
        let op = Caller {
            principal: Principal::oidc("a"),
            from: "x".into(),
            roles: [Role::Operator].into_iter().collect(),
        };
        assert!(op.may(Role::Viewer) && op.may(Role::Operator) && !op.may(Role::Admin));
        assert!(Caller::local(Some(0)).may(Role::Admin));
        assert_eq!(Caller::local(Some(1000)).display(), "uid:1000");
    }
}
