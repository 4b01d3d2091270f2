//! End-to-end: the remote admin API (gRPC over TLS) lets a call through only with valid credentials that carry
//! the role the method needs. Every method of the Admin service (read from the compiled contract, so a new
//! RPC is covered without touching this test) × every kind of credential: none, viewer/operator/admin as OIDC
//! tokens and as client certificates, an expired token, one for another audience, one from another issuer,
//! one with a bad signature, and a client certificate from an unknown CA. Then nimbusctl reaches the same
//! listener through a context file, with a certificate and with a token command.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use coordinator::auth::{Role, required_role};
use e2e::fleet::FleetOptions;
use e2e::{Fleet, require_root};
use prost::Message as _;
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const ADMIN_PORT: u16 = 7444;
const ISSUER: &str = "https://keycloak.test/realms/ops";
const AUDIENCE: &str = "nimbus";

/// Every method of the Admin service: (name, client-streaming).
fn admin_methods() -> Vec<(String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(nimbus_proto::FILE_DESCRIPTOR_SET).unwrap();
    let svc = set
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .find(|s| s.name() == "Admin")
        .unwrap();
    svc.method
        .iter()
        .map(|m| (m.name().to_string(), m.client_streaming()))
        .collect()
}

struct Pki {
    ca_pem: String,
    ca_issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            ca_issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (cert PEM, key PEM) of a client `cn` with Organization `org`.
    fn client(&self, cn: &str, org: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.distinguished_name.push(rcgen::DnType::OrganizationName, org);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca_issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// An ES256 signing key and its JWKS entry.
struct Signer {
    key: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl Signer {
    fn new(kid: &str) -> Signer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        assert_eq!(raw.len(), 65, "uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Signer {
            key: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]), "kid": kid, "alg": "ES256", "use": "sig"}),
        }
    }

    fn token(&self, kid: &str, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn claims(sub: &str, roles: &[&str], iss: &str, aud: &str, exp: u64) -> serde_json::Value {
    json!({"sub": sub, "iss": iss, "aud": aud, "exp": exp, "nbf": now() - 60, "iat": now() - 60,
           "realm_access": {"roles": roles}, "preferred_username": sub})
}

#[derive(Clone, Debug)]
enum Cred {
    None,
    Token(String),
    Cert(String, String),
}

/// What came back from one call.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The gate let it through (the service's own answer: OK or a complaint about the empty request).
    Passed(tonic::Code),
    Unauthenticated,
    Denied,
    /// No gRPC answer at all (the TLS handshake refused the client).
    Transport(String),
}

async fn channel(addr: &str, ca_pem: &str, cred: &Cred) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Cred::Cert(c, k) = cred {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn call(ch: &Channel, cred: &Cred, method: &str, streaming: bool) -> Answer {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    if let Err(e) = grpc.ready().await {
        return Answer::Transport(e.to_string());
    }
    let path = http::uri::PathAndQuery::from_str(&format!("/nimbus.v1.Admin/{method}")).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let add_token = |md: &mut tonic::metadata::MetadataMap| {
        if let Cred::Token(t) = cred {
            md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
    };
    let result = if streaming {
        let mut req = tonic::Request::new(tokio_stream::empty::<()>());
        add_token(req.metadata_mut());
        grpc.client_streaming(req, path, codec).await.map(|_| ())
    } else {
        let mut req = tonic::Request::new(());
        add_token(req.metadata_mut());
        grpc.unary(req, path, codec).await.map(|_| ())
    };
    match result {
        Ok(()) => Answer::Passed(tonic::Code::Ok),
        Err(s) => match s.code() {
            tonic::Code::Unauthenticated => Answer::Unauthenticated,
            tonic::Code::PermissionDenied => Answer::Denied,
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled if s.metadata().is_empty() => {
                Answer::Transport(s.message().to_string())
            }
            c => Answer::Passed(c),
        },
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p
}

#[test]
fn every_admin_rpc_checks_credentials_and_role() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let admins = Pki::new("nimbus admin clients");
    let strangers = Pki::new("someone else");
    let signer = Signer::new("k1");
    let forger = Signer::new("k1");
    write(dir, "clients-ca.pem", &admins.ca_pem);
    write(dir, "jwks.json", &json!({"keys": [signer.jwk]}).to_string());

    let opts = FleetOptions {
        coordinator_args: [
            format!("--admin-listen=0.0.0.0:{ADMIN_PORT}"),
            format!("--admin-client-ca={}", dir.join("clients-ca.pem").display()),
            format!("--oidc-issuer={ISSUER}"),
            format!("--oidc-audience={AUDIENCE}"),
            format!("--oidc-jwks-file={}", dir.join("jwks.json").display()),
        ]
        .into(),
        ..FleetOptions::test(0)
    };
    let fleet = Fleet::new(opts).unwrap();
    let server_ca = std::fs::read_to_string(fleet.coordinator_data_dir().join("pki").join("ca.crt")).unwrap();
    let addr = format!("{}:{ADMIN_PORT}", fleet.coordinator_ip());

    let exp = now() + 600;
    let token = |roles: &[&str]| Cred::Token(signer.token("k1", claims("alice", roles, ISSUER, AUDIENCE, exp)));
    let cert = |org: &str| {
        let (c, k) = admins.client(&format!("{org}-bob"), org);
        Cred::Cert(c, k)
    };
    let (sc, sk) = strangers.client("mallory", "admin");
    // (name, credential, granted role or None when every call must be refused, refusal expected)
    let cases: Vec<(&str, Cred, Option<Role>, Answer)> = vec![
        ("no credentials", Cred::None, None, Answer::Unauthenticated),
        ("viewer token", token(&["viewer"]), Some(Role::Viewer), Answer::Denied),
        (
            "operator token",
            token(&["operator", "offline_access"]),
            Some(Role::Operator),
            Answer::Denied,
        ),
        ("admin token", token(&["admin"]), Some(Role::Admin), Answer::Denied),
        ("viewer cert", cert("viewer"), Some(Role::Viewer), Answer::Denied),
        ("operator cert", cert("operator"), Some(Role::Operator), Answer::Denied),
        ("admin cert", cert("admin"), Some(Role::Admin), Answer::Denied),
        (
            "token without a nimbus role",
            token(&["offline_access"]),
            None,
            Answer::Denied,
        ),
        (
            "expired token",
            Cred::Token(signer.token("k1", claims("alice", &["admin"], ISSUER, AUDIENCE, now() - 3600))),
            None,
            Answer::Unauthenticated,
        ),
        (
            "token not valid yet (nbf in an hour)",
            Cred::Token(signer.token("k1", {
                let mut c = claims("alice", &["admin"], ISSUER, AUDIENCE, exp + 7200);
                c["nbf"] = json!(now() + 3600);
                c
            })),
            None,
            Answer::Unauthenticated,
        ),
        (
            "token for another audience",
            Cred::Token(signer.token("k1", claims("alice", &["admin"], ISSUER, "grafana", exp))),
            None,
            Answer::Unauthenticated,
        ),
        (
            "token from another issuer",
            Cred::Token(signer.token(
                "k1",
                claims("alice", &["admin"], "https://evil.test/realms/ops", AUDIENCE, exp),
            )),
            None,
            Answer::Unauthenticated,
        ),
        (
            "token with a bad signature",
            Cred::Token(forger.token("k1", claims("alice", &["admin"], ISSUER, AUDIENCE, exp))),
            None,
            Answer::Unauthenticated,
        ),
        (
            "HS256 token signed with a public value",
            Cred::Token({
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
                h.kid = Some("k1".into());
                let secret = signer.jwk["x"].as_str().unwrap().to_string();
                jsonwebtoken::encode(
                    &h,
                    &claims("alice", &["admin"], ISSUER, AUDIENCE, exp),
                    &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
                )
                .unwrap()
            }),
            None,
            Answer::Unauthenticated,
        ),
    ];
    let methods = admin_methods();
    assert!(methods.len() >= 23, "{methods:?}");
    for (m, _) in &methods {
        assert!(
            required_role(m).is_some(),
            "Admin/{m} has no role in auth::required_role"
        );
    }

    let (server_ca2, addr2, methods2) = (server_ca.clone(), addr.clone(), methods.clone());
    let failures = fleet
        .coordinator_ns()
        .block_on(move || async move {
            let mut failures = Vec::new();
            for (name, cred, granted, refusal) in cases {
                let ch = channel(&addr2, &server_ca2, &cred)
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                for (m, streaming) in &methods2 {
                    let got = call(&ch, &cred, m, *streaming).await;
                    let need = required_role(m).unwrap();
                    let ok = match granted {
                        Some(g) if g >= need => matches!(got, Answer::Passed(_)),
                        _ => got == refusal,
                    };
                    if !ok {
                        failures.push(format!("{name} → {m} (needs {need}): got {got:?}"));
                    }
                }
            }
            // A client certificate from another CA never gets an answer.
            let cred = Cred::Cert(sc, sk);
            for (m, streaming) in &methods2 {
                let got = match channel(&addr2, &server_ca2, &cred).await {
                    Err(e) => Answer::Transport(e),
                    Ok(ch) => call(&ch, &cred, m, *streaming).await,
                };
                if !matches!(got, Answer::Transport(_) | Answer::Unauthenticated) {
                    failures.push(format!("unknown client cert → {m}: got {got:?}"));
                }
            }
            failures
        })
        .unwrap();
    assert!(
        failures.is_empty(),
        "{} wrong answers:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // nimbusctl through a context file: a certificate context and a token-command context.
    let (oc, ok) = admins.client("carol", "operator");
    write(dir, "carol.pem", &oc);
    write(dir, "carol-key.pem", &ok);
    write(dir, "server-ca.pem", &server_ca);
    let viewer_token = signer.token("k1", claims("dave", &["viewer"], ISSUER, AUDIENCE, exp));
    write(dir, "dave.token", &viewer_token);
    let contexts = write(
        dir,
        "contexts.yaml",
        &format!(
            "current-context: carol\ncontexts:\n  - name: carol\n    endpoint: https://{addr}\n    ca: server-ca.pem\n    client-cert: carol.pem\n    client-key: carol-key.pem\n  - name: dave\n    endpoint: https://{addr}\n    ca: server-ca.pem\n    token-command: [cat, {}]\n",
            dir.join("dave.token").display()
        ),
    );
    let ctl = |args: &[&str]| {
        let out = fleet
            .coordinator_ns()
            .exec(&fleet.bins().ctl)
            .arg("--contexts")
            .arg(&contexts)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = ctl(&["-o", "json", "whoami"]);
    assert!(ok, "{err}");
    let me: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(me["kind"], "cert", "{me}");
    assert!(me["subject"].as_str().unwrap().contains("CN=carol"), "{me}");
    assert_eq!(me["roles"], json!(["operator"]), "{me}");
    let (ok, out, err) = ctl(&["--context", "dave", "-o", "json", "whoami"]);
    assert!(ok, "{err}");
    let me: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (me["kind"].as_str(), me["subject"].as_str()),
        (Some("oidc"), Some("dave")),
        "{me}"
    );
    // The viewer may read, not create tokens; the refusal names the role to ask for.
    let (ok, _, err) = ctl(&["--context", "dave", "nodes"]);
    assert!(ok, "{err}");
    let (ok, _, err) = ctl(&["--context", "dave", "token", "create", "--ttl", "1h"]);
    assert!(!ok);
    assert!(err.contains("needs the operator role"), "{err}");
    // The token never reaches the coordinator's log.
    let log = fleet.coordinator().log();
    assert!(!log.contains(&viewer_token), "the bearer token was logged");
    assert!(log.contains("admin call refused"), "refusals are logged");
}
