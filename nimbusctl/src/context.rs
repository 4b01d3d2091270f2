//! Where nimbusctl sends its calls: the local admin socket, or a coordinator's remote admin API named by a
//! context in a kubeconfig-like file.
//!
//! ```yaml
//! # ~/.config/nimbus/contexts.yaml (or --contexts FILE / NIMBUS_CONTEXTS)
//! current-context: prod-eu
//! contexts:
//!   - name: prod-eu
//!     endpoint: https://coord.prod-eu.example:7444
//!     ca: /etc/nimbus/prod-eu-ca.pem            # CA of the coordinator's admin certificate
//!     token-command: [kubelogin, get-token, --oidc-issuer-url=https://keycloak.example/realms/ops, --oidc-client-id=nimbus]
//!   - name: lab
//!     endpoint: https://10.0.0.1:7444
//!     ca: lab-ca.pem                            # relative paths: next to this file
//!     client-cert: alice.pem                    # mTLS instead of a token
//!     client-key: alice-key.pem
//!   - name: local
//!     socket: /run/nimbus/admin.sock
//! ```
//!
//! `--context NAME` (or NIMBUS_CONTEXT) picks one; without it, `current-context`; without a file, the local
//! socket (`--socket`). A token command's standard output is the bearer token, either as is or as JSON with
//! `access_token`, `id_token` or `status.token` (Kubernetes exec-credential plugins); it runs for every
//! nimbusctl call, so caching belongs to the command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use hyper_util::rt::TokioIo;
use nimbus_proto::admin_client::AdminClient;
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The admin client every command uses: a channel plus, for OIDC contexts, the bearer token on each call.
pub type Client = AdminClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer …` to every call when a token is set.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct File {
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<Entry>,
}

/// One context of the file.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Entry {
    pub name: String,
    /// Local admin socket.
    pub socket: Option<PathBuf>,
    /// Remote admin API, https://HOST:PORT.
    pub endpoint: Option<String>,
    /// CA (PEM) of the coordinator's admin certificate.
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// argv of a command printing a bearer token.
    pub token_command: Option<Vec<String>>,
}

/// The default contexts file: $XDG_CONFIG_HOME/nimbus/contexts.yaml or ~/.config/nimbus/contexts.yaml.
pub fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("nimbus").join("contexts.yaml"))
}

/// The context to use: `name` from `file` (which must then exist), else the file's current context, else
/// `None` (the local socket).
pub fn select(file: Option<&Path>, name: Option<&str>) -> Result<Option<Entry>> {
    let path = match file {
        Some(p) => p.to_path_buf(),
        None => match default_file() {
            Some(p) => p,
            None if name.is_some() => bail!("--context needs a contexts file: set --contexts or HOME"),
            None => return Ok(None),
        },
    };
    if !path.exists() {
        if let Some(n) = name {
            bail!(
                "context {n:?} asked for, but the contexts file {} does not exist (see `nimbusctl --help`)",
                path.display()
            );
        }
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let f: File =
        serde_norway::from_str(&text).with_context(|| format!("{} is not a contexts file", path.display()))?;
    let wanted = match name.map(str::to_string).or(f.current_context.clone()) {
        Some(w) => w,
        None => return Ok(None),
    };
    let Some(mut e) = f.contexts.into_iter().find(|c| c.name == wanted) else {
        bail!("no context named {wanted:?} in {}", path.display());
    };
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [&mut e.ca, &mut e.client_cert, &mut e.client_key, &mut e.socket]
        .into_iter()
        .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    check(&e, &path)?;
    Ok(Some(e))
}

fn check(e: &Entry, path: &Path) -> Result<()> {
    let at = || format!("context {:?} in {}", e.name, path.display());
    match (&e.socket, &e.endpoint) {
        (Some(_), Some(_)) => bail!("{}: give either socket or endpoint, not both", at()),
        (None, None) => bail!("{}: give socket (local) or endpoint (https://HOST:PORT)", at()),
        (Some(_), None) => {
            if e.ca.is_some() || e.client_cert.is_some() || e.token_command.is_some() {
                bail!(
                    "{}: ca, client-cert and token-command are for an endpoint, not a socket",
                    at()
                );
            }
        }
        (None, Some(ep)) => {
            if !ep.starts_with("https://") {
                bail!(
                    "{}: endpoint {ep:?} must start with https:// (the admin API is TLS only)",
                    at()
                );
            }
            if e.client_cert.is_some() != e.client_key.is_some() {
                bail!("{}: client-cert and client-key go together", at());
            }
            if e.client_cert.is_none() && e.token_command.is_none() {
                bail!(
                    "{}: give client-cert/client-key or token-command (the remote API needs credentials)",
                    at()
                );
            }
            if e.token_command.as_ref().is_some_and(Vec::is_empty) {
                bail!("{}: token-command is empty", at());
            }
        }
    }
    Ok(())
}

/// Connect as `context` says, or to the local `socket`.
pub async fn connect(context: Option<&Entry>, socket: &Path) -> Result<Client> {
    match context {
        Some(e) if e.endpoint.is_some() => connect_remote(e).await,
        Some(e) => connect_socket(e.socket.as_deref().unwrap_or(socket)).await,
        None => connect_socket(socket).await,
    }
}

async fn connect_socket(socket: &Path) -> Result<Client> {
    if !socket.exists() {
        bail!(
            "admin socket {} does not exist: is nimbus-coordinator running? (set --socket or NIMBUS_ADMIN_SOCKET, or use a remote --context)",
            socket.display()
        );
    }
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://admin.local")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot connect to {} (permission denied means: run as root or the coordinator's user)",
                socket.display()
            )
        })?;
    Ok(AdminClient::with_interceptor(channel, Bearer::default()))
}

async fn connect_remote(e: &Entry) -> Result<Client> {
    let endpoint = e.endpoint.clone().unwrap_or_default();
    let read = |p: &Path, what: &str| std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()));
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &e.ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca, "ca")?));
    } else {
        tls = tls.with_native_roots();
    }
    if let (Some(cert), Some(key)) = (&e.client_cert, &e.client_key) {
        warn_if_readable(key);
        tls = tls.identity(Identity::from_pem(read(cert, "client-cert")?, read(key, "client-key")?));
    }
    let token = match &e.token_command {
        Some(argv) => Some(run_token_command(argv).await?),
        None => None,
    };
    let channel = Endpoint::from_shared(endpoint.clone())
        .with_context(|| format!("endpoint {endpoint:?} is not a URL"))?
        .tls_config(tls)
        .context("TLS settings of the context")?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {endpoint} (TLS: is `ca` the CA of its admin certificate?)"))?;
    let bearer = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .context("the token command printed something that is not a token")?,
        ),
        None => None,
    };
    Ok(AdminClient::with_interceptor(channel, Bearer(bearer)))
}

fn warn_if_readable(key: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(key)
        && m.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "warning: client key {} is readable by others; chmod 600 it",
            key.display()
        );
    }
}

/// Runs `argv` (no shell, 60 s at most) and takes the token from its standard output.
async fn run_token_command(argv: &[String]) -> Result<String> {
    let (cmd, args) = argv.split_first().context("token-command is empty")?;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(cmd)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output(),
    )
    .await
    .with_context(|| format!("token-command {cmd:?} did not finish within 60 s"))?
    .with_context(|| format!("cannot run token-command {cmd:?}"))?;
    if !out.status.success() {
        bail!("token-command {cmd:?} failed ({})", out.status);
    }
    token_from_output(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("token-command {cmd:?} printed no token"))
}

/// The token in a token command's output: the text itself, or a JSON object's `access_token`, `id_token` or
/// `status.token`.
pub fn token_from_output(out: &str) -> Option<String> {
    let out = out.trim();
    if out.is_empty() {
        return None;
    }
    if out.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(out).ok()?;
        return ["/access_token", "/id_token", "/status/token"]
            .iter()
            .find_map(|p| v.pointer(p).and_then(|t| t.as_str()))
            .map(str::to_string);
    }
    (!out.contains(char::is_whitespace)).then(|| out.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_raw_or_from_exec_credential_json() {
        assert_eq!(token_from_output("eyJa.b.c\n").as_deref(), Some("eyJa.b.c"));
        assert_eq!(
            token_from_output(r#"{"access_token":"x.y.z","expires_in":300}"#).as_deref(),
            Some("x.y.z")
        );
        assert_eq!(
            token_from_output(r#"{"kind":"ExecCredential","status":{"token":"k.t.s"}}"#).as_deref(),
            Some("k.t.s")
        );
        assert_eq!(token_from_output("  \n"), None);
        assert_eq!(token_from_output("error: not logged in"), None);
    }

    #[test]
    fn contexts_resolve_by_name_or_current_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("contexts.yaml");
        std::fs::write(
            &f,
            "current-context: lab\ncontexts:\n  - name: lab\n    endpoint: https://10.0.0.1:7444\n    ca: ca.pem\n    client-cert: a.pem\n    client-key: a.key\n  - name: local\n    socket: /run/x.sock\n  - name: bad\n    endpoint: http://x:1\n    token-command: [t]\n",
        )
        .unwrap();
        let lab = select(Some(&f), None).unwrap().unwrap();
        assert_eq!(lab.name, "lab");
        assert_eq!(lab.ca.as_deref(), Some(dir.path().join("ca.pem").as_path()));
        assert_eq!(
            select(Some(&f), Some("local")).unwrap().unwrap().socket.as_deref(),
            Some(Path::new("/run/x.sock"))
        );
        let e = select(Some(&f), Some("bad")).unwrap_err().to_string();
        assert!(e.contains("https://"), "{e}");
        let e = select(Some(&f), Some("nope")).unwrap_err().to_string();
        assert!(e.contains("no context named"), "{e}");
        let missing = dir.path().join("none.yaml");
        assert!(select(Some(&missing), None).unwrap().is_none());
        assert!(select(Some(&missing), Some("lab")).is_err());
        std::fs::write(&f, "contexts:\n  - name: x\n    endpont: https://a:1\n").unwrap();
        assert!(select(Some(&f), Some("x")).is_err(), "unknown keys are refused");
    }
}
