//! Agent configuration: a TOML file, overridden by flags and `NIMBUS_*`
//! environment variables; validated as a whole before anything is touched.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/nimbus-agent";
pub const DEFAULT_TUN_NAME: &str = "nimbus0";
/// WireGuard UDP listen address; port 0 picks a free port (the agent dials out).
pub const DEFAULT_WG_LISTEN: &str = "0.0.0.0:0";
/// How long the tunnel may stay dead before the agent asks the enrollment
/// endpoint whether this node was revoked. Default 60 s.
pub const DEFAULT_REVOCATION_CHECK_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub coordinator: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_pin: Option<String>,
    pub node_name: Option<String>,
    pub machine_id: Option<String>,
    pub tun_name: Option<String>,
    pub wg_listen: Option<String>,
    pub revocation_check_after: Option<String>,
    pub log_format: Option<String>,
    /// Log filter, e.g. `info` or `info,agent=debug`. Default `info`; SIGHUP applies a change.
    pub log_level: Option<String>,
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
        let mut keys = Vec::new();
        macro_rules! cmp {
            ($($f:ident),*) => { $( if self.$f != new.$f { keys.push(stringify!($f)); } )* };
        }
        cmp!(
            state_dir,
            coordinator,
            ca_pin,
            node_name,
            machine_id,
            tun_name,
            wg_listen,
            revocation_check_after,
            log_format
        );
        keys
    }
}

impl Config {
    /// Merge `file` with `o` (which wins) and validate everything.
    pub fn resolve(file: FileConfig, o: FileConfig) -> Result<Config, Vec<String>> {
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
        if tun_name.is_empty()
            || tun_name.len() > 15
            || !tun_name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            errs.push(format!(
                "tun_name `{tun_name}` is not a valid interface name: 1-15 characters of [A-Za-z0-9._-]"
            ));
        }
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
        let revocation_check_after = match o.revocation_check_after.or(file.revocation_check_after) {
            None => DEFAULT_REVOCATION_CHECK_AFTER,
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    errs.push(format!(
                        "revocation_check_after `{s}` is not a positive duration such as 60s"
                    ));
                    DEFAULT_REVOCATION_CHECK_AFTER
                }
            },
        };
        let log_format = o.log_format.or(file.log_format).unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            errs.push(format!("log_format `{log_format}` is not supported: use text or json"));
        }
        let log_level = o.log_level.or(file.log_level).unwrap_or_else(|| "info".into());
        if let Err(e) = daemon::logging::parse_filter(&log_level) {
            errs.push(format!("log_level: {e}"));
        }
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
        let c = Config::resolve(FileConfig::default(), FileConfig::default()).unwrap();
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.revocation_check_after, DEFAULT_REVOCATION_CHECK_AFTER);
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig {
            node_name: Some("from-file".into()),
            tun_name: Some("nt1".into()),
            ..Default::default()
        };
        let o = FileConfig {
            node_name: Some("from-flag".into()),
            ..Default::default()
        };
        let c = Config::resolve(file, o).unwrap();
        assert_eq!(c.node_name.as_deref(), Some("from-flag"));
        assert_eq!(c.tun_name, "nt1");
    }

    #[test]
    fn all_errors_together_and_token_not_in_debug() {
        let o = FileConfig {
            coordinator: Some("no-port".into()),
            ca_pin: Some("md5:xx".into()),
            machine_id: Some("short".into()),
            node_name: Some("bad name".into()),
            wg_listen: Some("x".into()),
            revocation_check_after: Some("never".into()),
            ..Default::default()
        };
        let e = Config::resolve(FileConfig::default(), o).unwrap_err();
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
            FileConfig {
                token: Some("nimbus1.a.secretsecret".into()),
                ..Default::default()
            },
            FileConfig::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("secretsecret"));
    }
}
