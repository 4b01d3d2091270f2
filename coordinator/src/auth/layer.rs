//! The remote admin listener's gate: a tower layer that turns the request's credentials into a [`Caller`],
//! checks [`required_role`] for the called method, and only then lets the request reach the service.
//!
//! Credentials, in order: an `authorization: Bearer <JWT>` header (checked by [`oidc::Verifier`]; a bad token
//! is refused, never silently replaced by the certificate), else the client certificate the TLS handshake
//! verified against `admin_client_ca`. Nothing else counts: no header or field the client fills in names the
//! caller. Refusals are UNAUTHENTICATED (no or bad credentials) or PERMISSION_DENIED (valid, but the role is
//! missing), logged with the principal and method, never with the token.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{Caller, Role, cert, oidc, required_role};
use crate::config::RemoteAdmin;

/// A refused remote call, for the audit log and metrics.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// The principal when credentials were valid (`None`: unauthenticated).
    pub caller: Option<Caller>,
    pub from: String,
    pub method: String,
    pub reason: String,
}

/// Called for every refused remote call.
pub type OnRefused = Arc<dyn Fn(Refusal) + Send + Sync>;

/// Authenticates and authorizes remote admin calls.
pub struct Gate {
    oidc: Option<oidc::Verifier>,
    certs: bool,
    on_refused: Option<OnRefused>,
}

impl Gate {
    pub fn new(remote: &RemoteAdmin, on_refused: Option<OnRefused>) -> Result<Gate, oidc::OidcError> {
        Ok(Gate {
            oidc: remote.oidc.clone().map(oidc::Verifier::new).transpose()?,
            certs: remote.client_ca.is_some(),
            on_refused,
        })
    }

    /// The caller of a request with `path`, `headers` and connection `extensions`, allowed to call it.
    pub async fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        let method = path.rsplit('/').next().unwrap_or_default().to_string();
        let tls = extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
        let from = tls
            .and_then(|t| t.get_ref().remote_addr())
            .or_else(|| extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr))
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let refuse = |caller: Option<Caller>, status: Status| {
            tracing::warn!(
                caller = caller.as_ref().map(Caller::display).unwrap_or_else(|| "unauthenticated".into()),
                %from, %method, reason = %status.message(), "admin call refused"
            );
            if let Some(f) = &self.on_refused {
                f(Refusal {
                    caller,
                    from: from.clone(),
                    method: method.clone(),
                    reason: status.message().to_string(),
                });
            }
            status
        };
        let (principal, roles) = match self.credentials(headers, tls).await {
            Ok(found) => found,
            Err(status) => return Err(refuse(None, status)),
        };
        let caller = Caller {
            principal,
            from: from.clone(),
            roles,
        };
        let Some(need) = required_role(&method) else {
            return Err(refuse(
                Some(caller),
                Status::permission_denied(format!("{path} is not an admin method this coordinator knows")),
            ));
        };
        if !caller.may(need) {
            let has: Vec<&str> = caller.roles.iter().map(|r| r.as_str()).collect();
            let msg = format!(
                "{} may not call {method}: it needs the {need} role (or higher); granted: [{}]. Ask an admin to grant {need} (OIDC role claim or certificate O={need})",
                caller.display(),
                has.join(", ")
            );
            return Err(refuse(Some(caller), Status::permission_denied(msg)));
        }
        Ok(caller)
    }

    async fn credentials(
        &self,
        headers: &http::HeaderMap,
        tls: Option<&TlsConnectInfo<TcpConnectInfo>>,
    ) -> Result<(super::Principal, BTreeSet<Role>), Status> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let Some(verifier) = &self.oidc else {
                return Err(Status::unauthenticated(
                    "bearer tokens are not accepted here: this coordinator has no oidc_issuer; use a client certificate",
                ));
            };
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))?;
            return verifier
                .verify(token.trim())
                .await
                .map_err(|e| Status::unauthenticated(e.to_string()));
        }
        if self.certs
            && let Some(certs) = tls.and_then(TlsConnectInfo::peer_certs)
            && let Some(leaf) = certs.first()
        {
            return cert::identify(leaf.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()));
        }
        Err(Status::unauthenticated(
            "no credentials: present a client certificate signed by the admin client CA or an OIDC bearer token (see `nimbusctl --help` on contexts)",
        ))
    }
}

/// The tower layer that puts a [`Gate`] in front of a service.
#[derive(Clone)]
pub struct GateLayer {
    gate: Arc<Gate>,
}

impl GateLayer {
    pub fn new(gate: Gate) -> Self {
        Self { gate: Arc::new(gate) }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            inner,
            gate: Arc::clone(&self.gate),
        }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; the fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let gate = Arc::clone(&self.gate);
        Box::pin(async move {
            match gate.check(req.uri().path(), req.headers(), req.extensions()).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// The TLS settings of the remote listener: the server identity, and the client CA when certificates are
/// accepted (required unless OIDC tokens are accepted too).
pub fn tls_config(
    remote: &RemoteAdmin,
    default_identity: &pki::ServerIdentity,
) -> Result<tonic::transport::ServerTlsConfig, crate::CoordError> {
    let identity = match &remote.tls {
        Some((cert, key)) => pki::ServerIdentity::from_files(cert, key)?.tonic_identity(),
        None => default_identity.tonic_identity(),
    };
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &remote.client_ca {
        let pem = std::fs::read(ca).map_err(|e| {
            crate::CoordError::Config(vec![format!("cannot read admin_client_ca {}: {e}", ca.display())])
        })?;
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(pem))
            .client_auth_optional(remote.oidc.is_some());
    }
    Ok(tls)
}
