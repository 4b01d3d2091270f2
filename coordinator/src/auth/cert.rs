//! Admin client certificates (mTLS). The TLS handshake has already checked the chain against the configured
//! client CA; here the verified leaf names the caller: its subject (as RFC 4514 text) is the principal, and its
//! Organization values that name a role (`O=viewer`, `O=operator`, `O=admin`) are the roles — the same habit as
//! Kubernetes client certificates, where O carries groups.

use std::collections::BTreeSet;

use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Principal, Role};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("the client certificate cannot be parsed: {0}")]
    Parse(String),
}

/// The principal and roles of a verified client certificate (DER).
pub fn identify(der: &[u8]) -> Result<(Principal, BTreeSet<Role>), CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let roles = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .filter_map(Role::parse)
        .collect();
    Ok((Principal::cert(subject.to_string()), roles))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_names_the_caller_and_organizations_grant_roles() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "alice");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "operator");
        let cert = params.self_signed(&key).unwrap();
        let (p, roles) = identify(cert.der()).unwrap();
        assert_eq!(p.kind, super::super::PrincipalKind::Cert);
        assert!(p.subject.contains("CN=alice"), "{}", p.subject);
        assert_eq!(roles, [Role::Operator].into_iter().collect());
        assert!(identify(b"not a certificate").is_err());
    }
}
