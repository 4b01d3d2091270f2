//! Optional enrichment from the cloud's instance metadata service (IMDS): instance type, region, zone and
//! instance id.
//!
//! - AWS, IMDSv2 only: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds`, then
//!   `GET /latest/meta-data/{instance-type,placement/region,placement/availability-zone,instance-id}` with
//!   `X-aws-ec2-metadata-token`.
//! - Azure: `GET /metadata/instance?api-version=2021-02-01` with `Metadata: true`; `compute.vmSize`,
//!   `compute.location`, `compute.zone`, `compute.vmId`.
//!
//! Only the cloud that [`Platform::kind`](crate::Platform) names is asked; on other platforms [`enrich`]
//! returns at once without any network traffic. The whole operation — connects, requests, bodies — is bounded
//! by [`MetadataConfig::timeout`]. Each response body is capped at [`MAX_METADATA_RESPONSE`] bytes, and every
//! value is checked (length, characters) before it is stored: the bytes are treated as hostile. Proxy
//! environment variables are ignored (the metadata service is link-local and must never be reached through a
//! proxy). HTTP is hyper 1's connection-level HTTP/1.1 client (`hyper::client::conn::http1`) over a tokio
//! `TcpStream`, one connection per request; no pooling is needed for four requests.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::model::{Inventory, PlatformKind};

/// Default metadata endpoint (AWS and Azure both serve it on this link-local address).
pub const DEFAULT_METADATA_ENDPOINT: &str = "http://169.254.169.254";
/// Default bound on the whole enrichment.
pub const DEFAULT_METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest response body accepted.
pub const MAX_METADATA_RESPONSE: usize = 64 * 1024;
/// Lifetime requested for the IMDSv2 session token, in seconds (only needs to outlive one enrichment).
const AWS_TOKEN_TTL_SECONDS: &str = "60";
/// Azure IMDS API version used.
pub const AZURE_API_VERSION: &str = "2021-02-01";

/// Where and how long to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataConfig {
    /// `http://HOST[:PORT]`. Default [`DEFAULT_METADATA_ENDPOINT`]; tests point it at a local server.
    pub endpoint: String,
    /// Bound on the whole operation. Default [`DEFAULT_METADATA_TIMEOUT`] (2 s).
    pub timeout: Duration,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            endpoint: DEFAULT_METADATA_ENDPOINT.to_string(),
            timeout: DEFAULT_METADATA_TIMEOUT,
        }
    }
}

/// Why enrichment failed. The inventory is left unchanged on any error.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(
        "metadata endpoint {endpoint:?} is not usable: {reason}; configure it as http://HOST[:PORT] (default {DEFAULT_METADATA_ENDPOINT})"
    )]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error(
        "metadata service did not answer within {timeout:?}; it may be disabled or firewalled (instance type, region and zone stay unknown)"
    )]
    Timeout { timeout: Duration },
    #[error(
        "cannot connect to the metadata service at {endpoint}: {source}; check that this host is a cloud instance and the endpoint is right"
    )]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the metadata service at {endpoint} failed: {source}")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error("metadata service answered {status} to {method} {path}: {hint}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        hint: &'static str,
    },
    #[error(
        "metadata response to {path} is larger than {limit} bytes and was refused; the endpoint may not be a metadata service"
    )]
    TooLarge { path: String, limit: usize },
    #[error(
        "metadata response to {path} is malformed ({reason}) and was ignored; the endpoint may not be a metadata service"
    )]
    Malformed { path: String, reason: String },
}

/// What a metadata service told us, validated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Found {
    instance_type: Option<String>,
    region: Option<String>,
    zone: Option<String>,
    instance_id: Option<String>,
}

/// Ask the platform's metadata service for instance type, region, zone and instance id, and store them in
/// `inv.platform` (metadata values replace DMI-derived ones; `metadata_source` records which service answered).
/// Returns `Ok(())` without network traffic when the platform is neither AWS nor Azure.
pub async fn enrich(inv: &mut Inventory, cfg: &MetadataConfig) -> Result<(), MetadataError> {
    let kind = inv.platform.kind;
    if !matches!(kind, PlatformKind::Aws | PlatformKind::Azure) {
        return Ok(());
    }
    let ep = Endpoint::parse(&cfg.endpoint)?;
    let work = async {
        match kind {
            PlatformKind::Aws => aws(&ep).await,
            _ => azure(&ep).await,
        }
    };
    let found = tokio::time::timeout(cfg.timeout, work)
        .await
        .map_err(|_| MetadataError::Timeout { timeout: cfg.timeout })??;
    let p = &mut inv.platform;
    p.instance_type = found.instance_type.or(p.instance_type.take());
    p.region = found.region.or(p.region.take());
    p.zone = found.zone.or(p.zone.take());
    p.instance_id = found.instance_id.or(p.instance_id.take());
    p.metadata_source = Some(
        if kind == PlatformKind::Aws {
            "aws-imdsv2"
        } else {
            "azure-imds"
        }
        .to_string(),
    );
    Ok(())
}

async fn aws(ep: &Endpoint) -> Result<Found, MetadataError> {
    let token_path = "/latest/api/token";
    let (status, body) = ep
        .request(
            Method::PUT,
            token_path,
            &[("X-aws-ec2-metadata-token-ttl-seconds", AWS_TOKEN_TTL_SECONDS)],
        )
        .await?;
    if !status.is_success() {
        return Err(status_error(
            "PUT",
            token_path,
            status,
            "IMDSv2 token refused; IMDS may be disabled, or the hop limit too low for containers (HttpPutResponseHopLimit)",
        ));
    }
    let token = std::str::from_utf8(&body).map(str::trim).unwrap_or("");
    if token.is_empty() || token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(MetadataError::Malformed {
            path: token_path.into(),
            reason: "token is empty, too long or not printable ASCII".into(),
        });
    }
    let token = token.to_string();
    let get = |path: &'static str| {
        let token = token.clone();
        async move {
            let (status, body) = ep
                .request(Method::GET, path, &[("X-aws-ec2-metadata-token", &token)])
                .await?;
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(status_error(
                    "GET",
                    path,
                    status,
                    "IMDSv2 request refused; the session token may have been rejected",
                ));
            }
            let text = std::str::from_utf8(&body).map_err(|_| MetadataError::Malformed {
                path: path.into(),
                reason: "not UTF-8".into(),
            })?;
            checked(path, text).map(Some)
        }
    };
    Ok(Found {
        instance_type: get("/latest/meta-data/instance-type").await?,
        region: get("/latest/meta-data/placement/region").await?,
        zone: get("/latest/meta-data/placement/availability-zone").await?,
        instance_id: get("/latest/meta-data/instance-id").await?,
    })
}

#[derive(Deserialize, Default)]
struct AzureInstance {
    #[serde(default)]
    compute: AzureCompute,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct AzureCompute {
    vm_size: Option<String>,
    location: Option<String>,
    zone: Option<String>,
    vm_id: Option<String>,
}

async fn azure(ep: &Endpoint) -> Result<Found, MetadataError> {
    let path = format!("/metadata/instance?api-version={AZURE_API_VERSION}");
    let (status, body) = ep.request(Method::GET, &path, &[("Metadata", "true")]).await?;
    if !status.is_success() {
        return Err(status_error(
            "GET",
            &path,
            status,
            "Azure IMDS refused the request (it requires the Metadata: true header and no proxy)",
        ));
    }
    let doc: AzureInstance = serde_json::from_slice(&body).map_err(|e| MetadataError::Malformed {
        path: path.clone(),
        reason: format!("not the expected JSON: {e}"),
    })?;
    let c = doc.compute;
    let opt = |v: Option<String>| -> Result<Option<String>, MetadataError> {
        match v.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => checked(&path, s).map(Some),
        }
    };
    Ok(Found {
        instance_type: opt(c.vm_size)?,
        region: opt(c.location)?,
        zone: opt(c.zone)?,
        instance_id: opt(c.vm_id)?,
    })
}

/// Accept a metadata value only if it is short and made of `[A-Za-z0-9._-]`.
fn checked(path: &str, v: &str) -> Result<String, MetadataError> {
    let v = v.trim();
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        let shown: String = v.chars().take(32).filter(|c| !c.is_control()).collect();
        return Err(MetadataError::Malformed {
            path: path.into(),
            reason: format!("unexpected value {shown:?}"),
        });
    }
    Ok(v.to_string())
}

fn status_error(method: &'static str, path: &str, status: StatusCode, hint: &'static str) -> MetadataError {
    MetadataError::Status {
        method,
        path: path.to_string(),
        status: status.as_u16(),
        hint,
    }
}

/// A parsed `http://host[:port]` endpoint.
#[derive(Debug, Clone)]
struct Endpoint {
    /// As configured, for messages.
    display: String,
    /// For `Host:` (`host[:port]`, IPv6 in brackets).
    authority: String,
    /// For connecting (IPv6 without brackets).
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(s: &str) -> Result<Endpoint, MetadataError> {
        let bad = |reason: &str| MetadataError::InvalidEndpoint {
            endpoint: s.to_string(),
            reason: reason.to_string(),
        };
        let uri: hyper::Uri = s.parse().map_err(|_| bad("not a URI"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad(
                "only http:// is supported (the metadata service does not speak TLS)",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("must not have a path or query"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not contain credentials"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Endpoint {
            display: s.to_string(),
            authority: authority.as_str().to_string(),
            host,
            port: authority.port_u16().unwrap_or(80),
        })
    }

    /// One request on a fresh connection; the body is capped at [`MAX_METADATA_RESPONSE`].
    async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), MetadataError> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| MetadataError::Connect {
                endpoint: self.display.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let http = |source| MetadataError::Http {
            endpoint: self.display.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let driver = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| MetadataError::InvalidEndpoint {
                endpoint: self.display.clone(),
                reason: format!("cannot build request: {e}"),
            })?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let too_large = || MetadataError::TooLarge {
            path: path.to_string(),
            limit: MAX_METADATA_RESPONSE,
        };
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_METADATA_RESPONSE as u64) {
            return Err(too_large());
        }
        let body = Limited::new(resp.into_body(), MAX_METADATA_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large()
                } else {
                    match e.downcast::<hyper::Error>() {
                        Ok(source) => http(*source),
                        Err(other) => MetadataError::Malformed {
                            path: path.to_string(),
                            reason: other.to_string(),
                        },
                    }
                }
            })?;
        drop(driver);
        Ok((status, body.to_bytes()))
    }
}

/// Aborts the connection task when the request finishes or its future is dropped (timeout).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let ep = Endpoint::parse("http://169.254.169.254").unwrap();
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.authority.as_str()),
            ("169.254.169.254", 80, "169.254.169.254")
        );
        let ep = Endpoint::parse("http://[fd00:ec2::254]:8080/").unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("fd00:ec2::254", 8080));
        for bad in [
            "https://169.254.169.254",
            "http://x/latest",
            "169.254.169.254",
            "http://u:p@h",
            "http://h/?q=1",
        ] {
            assert!(
                matches!(Endpoint::parse(bad), Err(MetadataError::InvalidEndpoint { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn values_are_checked() {
        assert_eq!(checked("/p", " i3en.2xlarge\n").unwrap(), "i3en.2xlarge");
        assert!(checked("/p", "<script>").is_err());
        assert!(checked("/p", &"a".repeat(65)).is_err());
        assert!(checked("/p", "").is_err());
    }
}
