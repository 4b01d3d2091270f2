//! Agent configuration: a TOML file, overridden by flags and `NIMBUS_*`
//! environment variables; validated as a whole before anything is touched.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use daemon::config::check;
use serde::Deserialize;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/nimbus-agent";
pub const DEFAULT_TUN_NAME: &str = "nimbus0";
/// WireGuard UDP listen address; port 0 picks a free port (the agent dials out).
pub const DEFAULT_WG_LISTEN: &str = "0.0.0.0:0";
/// Latency probe socket (UDP, underlay).
pub const DEFAULT_PROBE_LISTEN: &str = "0.0.0.0:7444";

/// How often the inventory is re-collected (kernel uevents also trigger it). Default 60 s.
pub const DEFAULT_INVENTORY_INTERVAL: Duration = Duration::from_secs(60);
/// Where the .mount units of prepared volumes go.
pub const DEFAULT_STORAGE_UNIT_DIR: &str = "/etc/systemd/system";
/// How often the agent looks for hand-made changes to what it manages. Default 60 s.
pub const DEFAULT_DRIFT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// The pinned root of trust of the coordinator's release repository (its `1.root.json`, installed with the
/// agent). Without it the agent refuses upgrades. Env: `NIMBUS_RELEASE_ROOT`.
pub const DEFAULT_RELEASE_ROOT: &str = "/etc/nimbus/release-root.json";

/// How long the tunnel may stay dead before the agent asks the enrollment
/// endpoint whether this node was revoked. Default 60 s.
pub const DEFAULT_REVOCATION_CHECK_AFTER: Duration = Duration::from_secs(60);

/// The settings, as they come from the TOML file (`--config`) *and* from flags / `NIMBUS_*` environment
/// variables: one struct, so file keys and flags cannot drift apart. Flags win over the file.
#[derive(Clone, Default, Deserialize, clap::Args)]
#[serde(default)]
pub struct Settings {
    /// State directory: identity.json and wg.key (0600). [default: /var/lib/nimbus-agent]
    #[arg(long, env = "NIMBUS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Coordinator enrollment endpoint HOST:PORT, e.g. 192.0.2.1:7443.
    #[arg(long, env = "NIMBUS_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Join token from `nimbusctl token create` (prefer --token-file or the env var: flags show in `ps`).
    #[arg(long, env = "NIMBUS_JOIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "NIMBUS_JOIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// SHA-256 pin of the coordinator's CA: sha256:<64 hex>.
    #[arg(long, env = "NIMBUS_CA_PIN")]
    pub ca_pin: Option<String>,
    /// Node name to request. [default: the hostname]
    #[arg(long, env = "NIMBUS_NODE_NAME")]
    pub node_name: Option<String>,
    /// Machine id to report. [default: /etc/machine-id]
    #[arg(long, env = "NIMBUS_MACHINE_ID")]
    pub machine_id: Option<String>,
    /// TUN device name. [default: nimbus0]
    #[arg(long, env = "NIMBUS_TUN_NAME")]
    pub tun_name: Option<String>,
    /// WireGuard UDP listen address. [default: 0.0.0.0:0]
    #[arg(long, env = "NIMBUS_WG_LISTEN")]
    pub wg_listen: Option<String>,
    /// How long the tunnel may stay dead before asking whether this node was revoked. [default: 60s]
    #[arg(long, env = "NIMBUS_REVOCATION_CHECK_AFTER")]
    pub revocation_check_after: Option<String>,
    /// Latency probe responder and prober, UDP on the underlay, or `off`. [default: 0.0.0.0:7444]
    #[arg(long, env = "NIMBUS_PROBE_LISTEN")]
    pub probe_listen: Option<String>,
    /// How often the inventory is re-collected; kernel uevents also trigger it. [default: 60s]
    #[arg(long, env = "NIMBUS_INVENTORY_INTERVAL")]
    pub inventory_interval: Option<String>,
    /// Cloud metadata service for instance type, region and zone (AWS/Azure only), or `off`.
    /// [default: http://169.254.169.254]
    #[arg(long, env = "NIMBUS_METADATA_ENDPOINT")]
    pub metadata_endpoint: Option<String>,
    /// Longest the metadata lookup may take. [default: 2s]
    #[arg(long, env = "NIMBUS_METADATA_TIMEOUT")]
    pub metadata_timeout: Option<String>,
    /// The kubeadm executable run to join the node to its environment's cluster. [default: kubeadm]
    #[arg(long, env = "NIMBUS_KUBEADM")]
    pub kubeadm: Option<PathBuf>,
    /// Where kubeadm keeps kubelet.conf and the PKI (read to tell whether the node is joined).
    /// [default: /etc/kubernetes]
    #[arg(long, env = "NIMBUS_KUBERNETES_DIR")]
    pub kubernetes_dir: Option<PathBuf>,
    /// The kubelet's state directory (evidence of a half-finished join). [default: /var/lib/kubelet]
    #[arg(long, env = "NIMBUS_KUBELET_DIR")]
    pub kubelet_dir: Option<PathBuf>,
    /// Where the agent writes the systemd .mount units of the volumes it prepares. [default: /etc/systemd/system]
    #[arg(long, env = "NIMBUS_STORAGE_UNIT_DIR")]
    pub storage_unit_dir: Option<PathBuf>,
    /// How often the agent checks what it manages on the host (desired.json, the kubelet join) for hand-made
    /// changes and reverts them. [default: 60s]
    #[arg(long, env = "NIMBUS_DRIFT_CHECK_INTERVAL")]
    pub drift_check_interval: Option<String>,
    /// The release repository's pinned root metadata (root.json printed by `nimbusctl release init`); upgrades
    /// are verified against it and refused without it. [default: /etc/nimbus/release-root.json]
    #[arg(long, env = "NIMBUS_RELEASE_ROOT")]
    pub release_root: Option<PathBuf>,
    /// Prometheus metrics and health endpoint (HTTP: GET /metrics, /healthz, /readyz), or `off`.
    /// [default: 127.0.0.1:9465]
    #[arg(long, env = "NIMBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Log format: text or json. [default: text]
    #[arg(long, env = "NIMBUS_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or info,agent=debug; SIGHUP applies a changed value. [default: info]
    #[arg(long, env = "NIMBUS_LOG_LEVEL")]
    pub log_level: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("state_dir", &self.state_dir)
            .field("coordinator", &self.coordinator)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish_non_exhaustive()
    }
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Enrollment endpoint host:port (needed only to enroll or to ask about revocation).
    pub coordinator: Option<String>,
    /// Join token (secret; never logged).
    pub token: Option<String>,
    pub ca_pin: Option<pki::Pin>,
    pub node_name: Option<String>,
    pub machine_id: Option<String>,
    pub tun_name: String,
    pub wg_listen: SocketAddr,
    pub revocation_check_after: Duration,
    pub inventory_interval: Duration,
    /// `None` when latency probing is off.
    pub probe_listen: Option<SocketAddr>,
    /// `None` when the metrics endpoint is off.
    pub metrics_listen: Option<SocketAddr>,
    /// `None` when metadata lookups are off.
    pub metadata: Option<inventory::MetadataConfig>,
    /// kubeadm and the directories it writes (the failure marker lives in the state dir).
    pub kubeadm: nimbus_kube::kubeadm::Kubeadm,
    pub drift_check_interval: Duration,
    pub storage_unit_dir: PathBuf,
    /// Pinned root of the release repository (read at each upgrade; may be absent: upgrades are then refused).
    pub release_root: PathBuf,
    pub log_format: String,
    pub log_level: String,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("state_dir", &self.state_dir)
            .field("coordinator", &self.coordinator)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_pin", &self.ca_pin.as_ref().map(|p| p.to_string()))
            .field("node_name", &self.node_name)
            .field("tun_name", &self.tun_name)
            .finish_non_exhaustive()
    }
}

impl daemon::reload::Reloadable for Config {
    fn log_level(&self) -> &str {
        &self.log_level
    }

    /// Everything but `log_level` takes effect at restart (the token matters only for a first enrollment).
    fn restart_needed_for(&self, new: &Config) -> Vec<&'static str> {
        daemon::changed_fields!(self, new;
            state_dir, coordinator, ca_pin, node_name, machine_id, tun_name, wg_listen, revocation_check_after,
            inventory_interval, probe_listen, metrics_listen, metadata, kubeadm, drift_check_interval, storage_unit_dir, release_root,
            log_format)
    }
}

impl Config {
    /// Merge `file` with `o` (which wins) and validate everything.
    pub fn resolve(file: Settings, o: Settings) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let state_dir = o
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let coordinator = o.coordinator.or(file.coordinator);
        if let Some(c) = &coordinator
            && c.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none()
        {
            errs.push(format!("coordinator `{c}` must be HOST:PORT, e.g. 192.0.2.1:7443"));
        }
        let token = match (o.token.or(file.token), o.token_file.or(file.token_file)) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(p)) => match std::fs::read_to_string(&p) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    errs.push(format!("token_file {}: {e}", p.display()));
                    None
                }
            },
            (None, None) => None,
        };
        let ca_pin = match o.ca_pin.or(file.ca_pin) {
            None => None,
            Some(s) => match pki::Pin::parse(&s) {
                Ok(p) => Some(p),
                Err(e) => {
                    errs.push(format!("ca_pin: {e}"));
                    None
                }
            },
        };
        let node_name = o.node_name.or(file.node_name);
        if let Some(n) = &node_name
            && (n.is_empty() || n.len() > 63 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            errs.push(format!("node_name `{n}` must be 1-63 characters of [A-Za-z0-9-]"));
        }
        let machine_id = o.machine_id.or(file.machine_id);
        if let Some(m) = &machine_id
            && (m.len() != 32 || !m.chars().all(|c| c.is_ascii_hexdigit()))
        {
            errs.push(format!(
                "machine_id `{m}` must be 32 hexadecimal characters, like /etc/machine-id"
            ));
        }
        let tun_name = o.tun_name.or(file.tun_name).unwrap_or_else(|| DEFAULT_TUN_NAME.into());
        check::ifname("tun_name", &tun_name, &mut errs);
        let wg_s = o
            .wg_listen
            .or(file.wg_listen)
            .unwrap_or_else(|| DEFAULT_WG_LISTEN.into());
        let wg_listen = match wg_s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(format!("wg_listen `{wg_s}` is not IP:PORT"));
                None
            }
        };
        let revocation_check_after = check::duration(
            "revocation_check_after",
            o.revocation_check_after.or(file.revocation_check_after).as_deref(),
            DEFAULT_REVOCATION_CHECK_AFTER,
            &mut errs,
        );
        let inventory_interval = check::duration(
            "inventory_interval",
            o.inventory_interval.or(file.inventory_interval).as_deref(),
            DEFAULT_INVENTORY_INTERVAL,
            &mut errs,
        );
        let metadata_timeout = check::duration(
            "metadata_timeout",
            o.metadata_timeout.or(file.metadata_timeout).as_deref(),
            inventory::DEFAULT_METADATA_TIMEOUT,
            &mut errs,
        );
        let endpoint = o
            .metadata_endpoint
            .or(file.metadata_endpoint)
            .unwrap_or_else(|| inventory::DEFAULT_METADATA_ENDPOINT.into());
        let metadata = if endpoint == "off" {
            None
        } else {
            if !endpoint.starts_with("http://") {
                errs.push(format!(
                    "metadata_endpoint `{endpoint}` must be an http:// URL or `off`"
                ));
            }
            Some(inventory::MetadataConfig {
                endpoint,
                timeout: metadata_timeout,
            })
        };
        let probe_s = o
            .probe_listen
            .or(file.probe_listen)
            .unwrap_or_else(|| DEFAULT_PROBE_LISTEN.into());
        let probe_listen = if probe_s == "off" {
            None
        } else {
            match probe_s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errs.push(format!("probe_listen `{probe_s}` is not IP:PORT or `off`"));
                    None
                }
            }
        };
        let metrics_s = o
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or_else(|| crate::metrics::DEFAULT_METRICS_LISTEN.into());
        let metrics_listen = if metrics_s == "off" {
            None
        } else {
            match metrics_s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    errs.push(format!(
                        "metrics_listen `{metrics_s}` is not IP:PORT or `off` (e.g. 127.0.0.1:9465)"
                    ));
                    None
                }
            }
        };
        let defaults = nimbus_kube::kubeadm::Kubeadm::default();
        let kubeadm = nimbus_kube::kubeadm::Kubeadm {
            binary: o.kubeadm.or(file.kubeadm).unwrap_or(defaults.binary),
            kubernetes_dir: o
                .kubernetes_dir
                .or(file.kubernetes_dir)
                .unwrap_or(defaults.kubernetes_dir),
            kubelet_dir: o.kubelet_dir.or(file.kubelet_dir).unwrap_or(defaults.kubelet_dir),
            failure_marker: state_dir.join("kubeadm-join-failed"),
        };
        let drift_check_interval = check::duration(
            "drift_check_interval",
            o.drift_check_interval.or(file.drift_check_interval).as_deref(),
            DEFAULT_DRIFT_CHECK_INTERVAL,
            &mut errs,
        );
        if drift_check_interval < Duration::from_secs(1) {
            errs.push(format!(
                "drift_check_interval {drift_check_interval:?} is too short: use at least 1s (a minute in production)"
            ));
        }
        let storage_unit_dir = o
            .storage_unit_dir
            .or(file.storage_unit_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STORAGE_UNIT_DIR));
        if !storage_unit_dir.is_absolute() {
            errs.push(format!(
                "storage_unit_dir `{}` must be an absolute path",
                storage_unit_dir.display()
            ));
        }
        let release_root = o
            .release_root
            .or(file.release_root)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RELEASE_ROOT));
        if !release_root.is_absolute() {
            errs.push(format!(
                "release_root `{}` must be an absolute path",
                release_root.display()
            ));
        }
        let log_format = o.log_format.or(file.log_format).unwrap_or_else(|| "text".into());
        check::log_format(&log_format, &mut errs);
        let log_level = o.log_level.or(file.log_level).unwrap_or_else(|| "info".into());
        check::log_level(&log_level, &mut errs);
        match wg_listen {
            Some(wg_listen) if errs.is_empty() => Ok(Config {
                state_dir,
                coordinator,
                token,
                ca_pin,
                node_name,
                machine_id,
                tun_name,
                wg_listen,
                revocation_check_after,
                inventory_interval,
                probe_listen,
                metrics_listen,
                metadata,
                kubeadm,
                drift_check_interval,
                storage_unit_dir,
                release_root,
                log_format,
                log_level,
            }),
            _ => Err(errs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::resolve(Settings::default(), Settings::default()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.revocation_check_after, DEFAULT_REVOCATION_CHECK_AFTER);
        assert_eq!(c.release_root, PathBuf::from(DEFAULT_RELEASE_ROOT));
    }

    #[test]
    fn metrics_listen_defaults_to_loopback_and_can_be_off() {
        let c = Config::resolve(Settings::default(), Settings::default()).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9465".parse().unwrap()));
        let off = Settings {
            metrics_listen: Some("off".into()),
            ..Default::default()
        };
        assert_eq!(Config::resolve(Settings::default(), off).unwrap().metrics_listen, None);
        let bad = Settings {
            metrics_listen: Some("9465".into()),
            ..Default::default()
        };
        let e = Config::resolve(bad, Settings::default()).unwrap_err();
        assert!(e.iter().any(|m| m.contains("metrics_listen `9465`")), "{e:?}");
    }

    #[test]
    fn release_root_must_be_absolute() {
        let o = Settings {
            release_root: Some("root.json".into()),
            ..Default::default()
        };
        let e = Config::resolve(Settings::default(), o).unwrap_err();
        assert!(e.iter().any(|l| l.contains("release_root")), "{e:?}");
        let o = Settings {
            release_root: Some("/srv/root.json".into()),
            ..Default::default()
        };
        let c = Config::resolve(Settings::default(), o).unwrap();
        assert_eq!(c.release_root, PathBuf::from("/srv/root.json"));
    }

    #[test]
    fn flags_override_file() {
        let file = Settings {
            node_name: Some("from-file".into()),
            tun_name: Some("nt1".into()),
            ..Default::default()
        };
        let o = Settings {
            node_name: Some("from-flag".into()),
            ..Default::default()
        };
        let c = Config::resolve(file, o).unwrap();
        assert_eq!(c.node_name.as_deref(), Some("from-flag"));
        assert_eq!(c.tun_name, "nt1");
    }

    #[test]
    fn all_errors_together_and_token_not_in_debug() {
        let o = Settings {
            coordinator: Some("no-port".into()),
            ca_pin: Some("md5:xx".into()),
            machine_id: Some("short".into()),
            node_name: Some("bad name".into()),
            wg_listen: Some("x".into()),
            revocation_check_after: Some("never".into()),
            ..Default::default()
        };
        let e = Config::resolve(Settings::default(), o).unwrap_err();
        for k in [
            "coordinator",
            "ca_pin",
            "machine_id",
            "node_name",
            "wg_listen",
            "revocation_check_after",
        ] {
            assert!(e.iter().any(|l| l.contains(k)), "{k} missing from {e:?}");
        }
        let c = Config::resolve(
            Settings {
                token: Some("nimbus1.a.secretsecret".into()),
                ..Default::default()
            },
            Settings::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("secretsecret"));
    }
}
