//! The kubeadm `JoinConfiguration` (API `kubeadm.k8s.io/v1beta3` and `v1beta4`) and its file.
//!
//! Labels go to the kubelet's `node-labels` extra argument (the kubelet sets them at registration; the
//! NodeRestriction admission plugin lets it set keys under `polynimbus.io` but refuses `*.kubernetes.io` and
//! `*.k8s.io` ones outside a short allow-list, so this crate refuses every key outside `polynimbus.io`).
//! Taints go to `nodeRegistration.taints`. `v1beta4` turned `kubeletExtraArgs` from a map into a list of
//! `{name, value}`; everything else this crate writes is the same in both.
//!
//! The rendered YAML contains the token: write it with [`write_config`] (mode 0600) and delete it after use.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::KubeError;
use crate::token::BootstrapToken;

/// The domain every label and taint key written by this crate lives under.
pub const DOMAIN: &str = "polynimbus.io";

/// kubeadm configuration API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiVersion {
    /// `kubeadm.k8s.io/v1beta3` (kubeadm 1.22 and later).
    V1beta3,
    /// `kubeadm.k8s.io/v1beta4` (kubeadm 1.31 and later).
    V1beta4,
}

impl ApiVersion {
    /// The `apiVersion` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V1beta3 => "kubeadm.k8s.io/v1beta3",
            ApiVersion::V1beta4 => "kubeadm.k8s.io/v1beta4",
        }
    }

    /// The newest version a kubeadm of this version (`v1.31.2`, `1.30.0`, as `kubeadm version -o short`
    /// prints) reads: `v1beta4` from 1.31 on, `v1beta3` from 1.22 on.
    pub fn for_kubeadm_version(version: &str) -> Result<Self, KubeError> {
        let bad = || {
            KubeError::invalid(
                "kubeadm version",
                format!("{version:?} is not a version like v1.31.2; check `kubeadm version -o short`"),
            )
        };
        let v = version.trim().trim_start_matches('v');
        let mut parts = v.split(['.', '-', '+']);
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        match (major, minor) {
            (1, m) if m >= 31 => Ok(ApiVersion::V1beta4),
            (1, m) if m >= 22 => Ok(ApiVersion::V1beta3),
            (m, _) if m > 1 => Ok(ApiVersion::V1beta4),
            _ => Err(KubeError::invalid(
                "kubeadm version",
                format!("kubeadm {version} is too old: v1.22 or later is needed (JoinConfiguration v1beta3)"),
            )),
        }
    }
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Taint {
    /// Key, under `polynimbus.io`.
    pub key: String,
    /// Value (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

/// What a node needs to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinParams {
    /// The Node name (RFC 1123 subdomain: lower case, digits, `-`, `.`).
    pub node_name: String,
    /// The API server as `host:port` (no scheme), as kubeadm's `apiServerEndpoint` wants.
    pub api_endpoint: String,
    /// Pins of the cluster CA: `sha256:<64 hex>`, at least one.
    pub ca_cert_hashes: Vec<String>,
    /// This node's bootstrap token.
    pub token: BootstrapToken,
    /// Node labels, all under `polynimbus.io`.
    pub labels: BTreeMap<String, String>,
    /// Node taints, all under `polynimbus.io`.
    pub taints: Vec<Taint>,
    /// More kubelet flags, without leading dashes (`node-labels` is set from `labels`: not allowed here).
    pub kubelet_extra_args: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinConfiguration<'a, A: Serialize> {
    api_version: &'static str,
    kind: &'static str,
    node_registration: NodeRegistration<'a, A>,
    discovery: Discovery<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeRegistration<'a, A: Serialize> {
    name: &'a str,
    /// Always written: an empty list means "no taints" to kubeadm.
    taints: &'a [Taint],
    kubelet_extra_args: A,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Discovery<'a> {
    bootstrap_token: BootstrapTokenDiscovery<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapTokenDiscovery<'a> {
    token: String,
    api_server_endpoint: &'a str,
    ca_cert_hashes: &'a [String],
}

#[derive(Serialize)]
struct Arg<'a> {
    name: &'a str,
    value: &'a str,
}

/// Renders the `JoinConfiguration` YAML after validating every parameter. Labels and taints outside
/// `polynimbus.io` (including any `kubernetes.io`/`k8s.io` key) are refused with [`KubeError::ForbiddenKey`].
pub fn render(params: &JoinParams, version: ApiVersion) -> Result<String, KubeError> {
    validate_node_name(&params.node_name)?;
    validate_endpoint(&params.api_endpoint)?;
    validate_ca_hashes(&params.ca_cert_hashes)?;
    validate_labels(&params.labels)?;
    validate_taints(&params.taints)?;

    let mut args: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, value) in &params.kubelet_extra_args {
        validate_kubelet_arg(name, value)?;
        args.insert(name, value);
    }
    let node_labels = params
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    if !node_labels.is_empty() {
        args.insert("node-labels", &node_labels);
    }

    let discovery = Discovery {
        bootstrap_token: BootstrapTokenDiscovery {
            token: params.token.expose(),
            api_server_endpoint: &params.api_endpoint,
            ca_cert_hashes: &params.ca_cert_hashes,
        },
    };
    let yaml = match version {
        ApiVersion::V1beta3 => serde_norway::to_string(&JoinConfiguration {
            api_version: version.as_str(),
            kind: "JoinConfiguration",
            node_registration: NodeRegistration {
                name: &params.node_name,
                taints: &params.taints,
                kubelet_extra_args: args,
            },
            discovery,
        }),
        ApiVersion::V1beta4 => serde_norway::to_string(&JoinConfiguration {
            api_version: version.as_str(),
            kind: "JoinConfiguration",
            node_registration: NodeRegistration {
                name: &params.node_name,
                taints: &params.taints,
                kubelet_extra_args: args.iter().map(|(name, value)| Arg { name, value }).collect::<Vec<_>>(),
            },
            discovery,
        }),
    };
    yaml.map_err(|source| KubeError::Yaml {
        action: "rendering the JoinConfiguration".into(),
        source,
    })
}

/// Writes `yaml` to `path` mode 0600, atomically (a temporary file in the same directory, fsync, rename).
/// Creates the parent directory (mode 0700) when missing.
pub fn write_config(path: &Path, yaml: &str) -> Result<(), KubeError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| KubeError::Io {
                action: "creating directory",
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let io = |action: &'static str| {
        let p = path.to_path_buf();
        move |source| KubeError::Io {
            action,
            path: p,
            source,
        }
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".nimbus-join-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(io("creating a temporary file beside"))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io("setting mode 0600 on"))?;
    tmp.write_all(yaml.as_bytes()).map_err(io("writing"))?;
    tmp.as_file().sync_all().map_err(io("syncing"))?;
    tmp.persist(path).map_err(|e| KubeError::Io {
        action: "renaming into",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    // Make the rename durable; failure here only weakens crash safety.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Checks a label or taint key: `<prefix>/<name>` with prefix `polynimbus.io` or a subdomain of it.
pub fn validate_key(what: &'static str, key: &str) -> Result<(), KubeError> {
    let forbid = |reason: &str| {
        Err(KubeError::ForbiddenKey {
            what,
            key: key.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let Some((prefix, name)) = key.split_once('/') else {
        return forbid("it has no prefix");
    };
    let lower = prefix.to_ascii_lowercase();
    if lower == "kubernetes.io" || lower.ends_with(".kubernetes.io") || lower == "k8s.io" || lower.ends_with(".k8s.io")
    {
        return forbid("kubernetes.io and k8s.io keys are reserved (NodeRestriction refuses most of them)");
    }
    if prefix != DOMAIN && !prefix.strip_suffix(DOMAIN).is_some_and(|rest| rest.ends_with('.')) {
        return forbid("its prefix is not polynimbus.io or a subdomain of it");
    }
    if !is_dns_subdomain(prefix) {
        return forbid("its prefix is not a lower-case DNS subdomain");
    }
    if !is_qualified_name(name) {
        return forbid(
            "the part after '/' must be 1-63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric",
        );
    }
    Ok(())
}

/// Checks a label or taint value: empty, or 1-63 characters of `[A-Za-z0-9-_.]` starting and ending
/// alphanumeric.
pub fn validate_value(what: &str, key: &str, value: &str) -> Result<(), KubeError> {
    if value.is_empty() || is_qualified_name(value) {
        Ok(())
    } else {
        Err(KubeError::invalid(
            format!("{what} value of {key}"),
            format!("{value:?} must be empty or 1-63 characters of [A-Za-z0-9-_.], starting and ending alphanumeric"),
        ))
    }
}

/// Checks labels: keys under `polynimbus.io`, values well-formed.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), KubeError> {
    for (k, v) in labels {
        validate_key("label", k)?;
        validate_value("label", k, v)?;
    }
    Ok(())
}

/// Checks taints: keys under `polynimbus.io`, values well-formed, a known effect, no key+effect twice.
pub fn validate_taints(taints: &[Taint]) -> Result<(), KubeError> {
    let mut seen = std::collections::BTreeSet::new();
    for t in taints {
        validate_key("taint", &t.key)?;
        validate_value("taint", &t.key, &t.value)?;
        if !matches!(t.effect.as_str(), "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(KubeError::invalid(
                format!("taint effect of {}", t.key),
                format!("{:?} is not one of NoSchedule, PreferNoSchedule, NoExecute", t.effect),
            ));
        }
        if !seen.insert((t.key.as_str(), t.effect.as_str())) {
            return Err(KubeError::invalid(
                format!("taint {}", t.key),
                format!(
                    "key {} with effect {} is given twice; a node holds one taint per key and effect",
                    t.key, t.effect
                ),
            ));
        }
    }
    Ok(())
}

fn validate_node_name(name: &str) -> Result<(), KubeError> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(KubeError::invalid(
            "node name",
            format!(
                "{name:?} must be a DNS subdomain: at most 253 characters of [a-z0-9-.], alphanumeric at both ends"
            ),
        ))
    }
}

fn validate_endpoint(endpoint: &str) -> Result<(), KubeError> {
    let bad = |why: &str| {
        Err(KubeError::invalid(
            "API endpoint",
            format!("{endpoint:?} {why}; give host:port without a scheme, e.g. 10.0.0.1:6443 or [fd00::1]:6443"),
        ))
    };
    if endpoint.contains("://") {
        return bad("has a scheme");
    }
    if endpoint.chars().any(|c| c.is_whitespace() || c == '/') {
        return bad("contains whitespace or '/'");
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return bad("has no port");
    };
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        return bad("has no host, or an IPv6 address without brackets");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("has no valid port"),
    }
}

fn validate_ca_hashes(hashes: &[String]) -> Result<(), KubeError> {
    if hashes.is_empty() {
        return Err(KubeError::invalid(
            "CA cert hashes",
            "none given; joining without pinning the cluster CA is unsafe — give sha256:<hex of the CA's SPKI>",
        ));
    }
    for h in hashes {
        let ok = h
            .strip_prefix("sha256:")
            .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(KubeError::invalid(
                "CA cert hash",
                format!("{h:?} is not sha256:<64 hex digits> (see `kubeadm token create --print-join-command`)"),
            ));
        }
    }
    Ok(())
}

fn validate_kubelet_arg(name: &str, value: &str) -> Result<(), KubeError> {
    if name == "node-labels" {
        return Err(KubeError::invalid(
            "kubelet extra argument node-labels",
            "set node labels through JoinParams::labels (validated, polynimbus.io only), not as a raw flag",
        ));
    }
    if name.is_empty()
        || name.starts_with('-')
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(KubeError::invalid(
            format!("kubelet extra argument {name:?}"),
            "give the flag name without leading dashes, in [a-z0-9-] (e.g. max-pods)",
        ));
    }
    if value.contains(['\n', '\r']) {
        return Err(KubeError::invalid(
            format!("kubelet extra argument {name}"),
            "the value contains a line break",
        ));
    }
    Ok(())
}

use policy::k8s_syntax::{is_dns_subdomain, is_label_name as is_qualified_name};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_under_polynimbus_only() {
        for ok in [
            "polynimbus.io/pool",
            "polynimbus.io/cohort.blue",
            "zone.polynimbus.io/x",
            "polynimbus.io/a_b-c",
        ] {
            validate_key("label", ok).unwrap();
        }
        for bad in [
            "pool",
            "node-role.kubernetes.io/worker",
            "kubernetes.io/hostname",
            "node.kubernetes.io/exclude",
            "k8s.io/x",
            "example.k8s.io/x",
            "notpolynimbus.io/x",
            "polynimbus.io.evil.com/x",
            "polynimbus.io/",
            "polynimbus.io/-x",
            "POLYNIMBUS.IO/x",
            "polynimbus.io/a/b",
        ] {
            let err = validate_key("label", bad).unwrap_err();
            assert!(matches!(err, KubeError::ForbiddenKey { .. }), "{bad} accepted: {err}");
        }
    }

    #[test]
    fn kubeadm_versions() {
        assert_eq!(ApiVersion::for_kubeadm_version("v1.31.0").unwrap(), ApiVersion::V1beta4);
        assert_eq!(
            ApiVersion::for_kubeadm_version("v1.34.1\n").unwrap(),
            ApiVersion::V1beta4
        );
        assert_eq!(ApiVersion::for_kubeadm_version("v1.30.9").unwrap(), ApiVersion::V1beta3);
        assert_eq!(
            ApiVersion::for_kubeadm_version("1.22.0-rc.1").unwrap(),
            ApiVersion::V1beta3
        );
        assert!(ApiVersion::for_kubeadm_version("v1.21.3").is_err());
        assert!(ApiVersion::for_kubeadm_version("banana").is_err());
    }

    #[test]
    fn endpoints() {
        for ok in ["10.0.0.1:6443", "api.example.org:443", "[fd00::1]:6443"] {
            validate_endpoint(ok).unwrap();
        }
        for bad in [
            "https://10.0.0.1:6443",
            "10.0.0.1",
            "fd00::1:6443",
            ":6443",
            "h:0",
            "h:x",
            "h :1",
            "h:1/",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad} accepted");
        }
    }
}
