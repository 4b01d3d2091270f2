//! Coordinator configuration: a TOML file, overridden by flags and `NIMBUS_*`
//! environment variables. Everything is validated — and every problem
//! reported together — before anything binds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

/// Default enrollment (TLS, TCP) listen address.
pub const DEFAULT_ENROLL_LISTEN: &str = "0.0.0.0:7443";
/// Default WireGuard (UDP) listen address.
pub const DEFAULT_WG_LISTEN: &str = "0.0.0.0:51820";
/// Default overlay network. The coordinator takes its first host address.
pub const DEFAULT_OVERLAY_CIDR: &str = "100.96.0.0/16";
/// Default Fleet service TCP port (on the overlay address, inside the tunnel only).
pub const DEFAULT_FLEET_PORT: u16 = 7000;
/// Default overlay MTU: 1500 underlay minus 80 bytes of WireGuard/UDP/IPv6 overhead.
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_TUN_NAME: &str = "nimbus0";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/nimbus/admin.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/nimbus-coordinator";
/// Heartbeat interval told to agents. Default 10 s.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often in-memory last-seen times are written to the store. Default 15 s.
pub const DEFAULT_LAST_SEEN_FLUSH: Duration = Duration::from_secs(15);

/// The file form. Every key is optional; see the `DEFAULT_*` constants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub enroll_listen: Option<String>,
    pub wg_listen: Option<String>,
    pub advertise_address: Option<String>,
    pub overlay_cidr: Option<String>,
    pub fleet_port: Option<u16>,
    pub tun_name: Option<String>,
    pub mtu: Option<u16>,
    pub admin_socket: Option<PathBuf>,
    pub heartbeat_interval: Option<String>,
    pub last_seen_flush: Option<String>,
    pub log_format: Option<String>,
    /// Log filter, e.g. `info` or `info,coordinator=debug`. Default `info`; SIGHUP applies a change.
    pub log_level: Option<String>,
    /// Operator-provided TLS certificate chain (PEM) for enrollment; with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The CA certificate that signed `tls_cert` (its SHA-256 is the pin agents check).
    pub tls_ca: Option<PathBuf>,
}

/// Flag/environment overrides (filled by the binary's clap parser).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub enroll_listen: Option<String>,
    pub wg_listen: Option<String>,
    pub advertise_address: Option<String>,
    pub overlay_cidr: Option<String>,
    pub fleet_port: Option<u16>,
    pub tun_name: Option<String>,
    pub mtu: Option<u16>,
    pub admin_socket: Option<PathBuf>,
    pub heartbeat_interval: Option<String>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub enroll_listen: SocketAddr,
    pub wg_listen: SocketAddr,
    /// The address agents dial for enrollment and WireGuard.
    pub advertise_address: IpAddr,
    pub overlay_cidr: Ipv4Net,
    pub fleet_port: u16,
    pub tun_name: String,
    pub mtu: u16,
    pub admin_socket: PathBuf,
    pub heartbeat_interval: Duration,
    pub last_seen_flush: Duration,
    pub log_format: String,
    pub log_level: String,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Config {
    /// Merge file and overrides (overrides win) and validate. Returns every
    /// problem found, one line each.
    pub fn resolve(file: FileConfig, o: Overrides) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let data_dir = o.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let enroll_listen = parse_addr(
            "enroll_listen",
            o.enroll_listen
                .or(file.enroll_listen)
                .as_deref()
                .unwrap_or(DEFAULT_ENROLL_LISTEN),
            &mut errs,
        );
        let wg_listen = parse_addr(
            "wg_listen",
            o.wg_listen.or(file.wg_listen).as_deref().unwrap_or(DEFAULT_WG_LISTEN),
            &mut errs,
        );
        let advertise = o.advertise_address.or(file.advertise_address);
        let advertise_address = match advertise {
            Some(s) => match s.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => Some(ip),
                _ => {
                    errs.push(format!(
                        "advertise_address `{s}` is not a usable IP address: give the address agents dial, e.g. 192.0.2.1"
                    ));
                    None
                }
            },
            None => match enroll_listen {
                Some(a) if !a.ip().is_unspecified() => Some(a.ip()),
                Some(_) => {
                    errs.push(
                        "advertise_address is not set and enroll_listen is a wildcard address: set --advertise-address to the IP agents dial"
                            .to_string(),
                    );
                    None
                }
                None => None,
            },
        };
        let cidr_s = o
            .overlay_cidr
            .or(file.overlay_cidr)
            .unwrap_or_else(|| DEFAULT_OVERLAY_CIDR.into());
        let overlay_cidr = match cidr_s.parse::<Ipv4Net>() {
            Ok(n) if n.prefix_len() <= 30 => Some(n.trunc()),
            Ok(_) => {
                errs.push(format!(
                    "overlay_cidr `{cidr_s}` is too small: use a prefix of /30 or wider, e.g. 100.96.0.0/16"
                ));
                None
            }
            Err(_) => {
                errs.push(format!(
                    "overlay_cidr `{cidr_s}` is not an IPv4 CIDR: write it like 100.96.0.0/16"
                ));
                None
            }
        };
        let fleet_port = o.fleet_port.or(file.fleet_port).unwrap_or(DEFAULT_FLEET_PORT);
        if fleet_port == 0 {
            errs.push("fleet_port must not be 0".into());
        }
        let tun_name = o.tun_name.or(file.tun_name).unwrap_or_else(|| DEFAULT_TUN_NAME.into());
        if tun_name.is_empty()
            || tun_name.len() > 15
            || !tun_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            errs.push(format!(
                "tun_name `{tun_name}` is not a valid interface name: 1-15 characters of [A-Za-z0-9._-]"
            ));
        }
        let mtu = o.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU);
        if !(1280..=9000).contains(&mtu) {
            errs.push(format!(
                "mtu {mtu} is out of range: use 1280..=9000 (default {DEFAULT_MTU})"
            ));
        }
        let admin_socket = o
            .admin_socket
            .or(file.admin_socket)
            .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into());
        let heartbeat_interval = parse_duration(
            "heartbeat_interval",
            o.heartbeat_interval.or(file.heartbeat_interval),
            DEFAULT_HEARTBEAT_INTERVAL,
            &mut errs,
        );
        let last_seen_flush = parse_duration(
            "last_seen_flush",
            file.last_seen_flush,
            DEFAULT_LAST_SEEN_FLUSH,
            &mut errs,
        );
        let log_format = o.log_format.or(file.log_format).unwrap_or_else(|| "text".into());
        if log_format != "text" && log_format != "json" {
            errs.push(format!("log_format `{log_format}` is not supported: use text or json"));
        }
        let log_level = o.log_level.or(file.log_level).unwrap_or_else(|| "info".into());
        if let Err(e) = daemon::logging::parse_filter(&log_level) {
            errs.push(format!("log_level: {e}"));
        }
        let tls = match (file.tls_cert, file.tls_key, file.tls_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
            _ => {
                errs.push(
                    "tls_cert, tls_key and tls_ca must be given together (or none, to use the coordinator's own CA)"
                        .into(),
                );
                None
            }
        };
        match (enroll_listen, wg_listen, advertise_address, overlay_cidr) {
            (Some(enroll_listen), Some(wg_listen), Some(advertise_address), Some(overlay_cidr)) if errs.is_empty() => {
                Ok(Config {
                    data_dir,
                    enroll_listen,
                    wg_listen,
                    advertise_address,
                    overlay_cidr,
                    fleet_port,
                    tun_name,
                    mtu,
                    admin_socket,
                    heartbeat_interval,
                    last_seen_flush,
                    log_format,
                    log_level,
                    tls,
                })
            }
            _ => Err(errs),
        }
    }
}

impl daemon::reload::Reloadable for Config {
    fn log_level(&self) -> &str {
        &self.log_level
    }

    /// Everything but `log_level` takes effect at restart.
    fn restart_needed_for(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        macro_rules! cmp {
            ($($f:ident),*) => { $( if self.$f != new.$f { keys.push(stringify!($f)); } )* };
        }
        cmp!(
            data_dir,
            enroll_listen,
            wg_listen,
            advertise_address,
            overlay_cidr,
            fleet_port,
            tun_name,
            mtu,
            admin_socket,
            heartbeat_interval,
            last_seen_flush,
            log_format,
            tls
        );
        keys
    }
}

impl Config {
    /// host:port agents use for enrollment.
    pub fn enroll_endpoint(&self) -> String {
        SocketAddr::new(self.advertise_address, self.enroll_listen.port()).to_string()
    }

    /// host:port agents use for WireGuard.
    pub fn wg_endpoint(&self) -> String {
        SocketAddr::new(self.advertise_address, self.wg_listen.port()).to_string()
    }
}

fn parse_addr(key: &str, s: &str, errs: &mut Vec<String>) -> Option<SocketAddr> {
    match s.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(format!(
                "{key} `{s}` is not an address: write IP:PORT, e.g. 0.0.0.0:7443"
            ));
            None
        }
    }
}

fn parse_duration(key: &str, v: Option<String>, default: Duration, errs: &mut Vec<String>) -> Duration {
    match v {
        None => default,
        Some(s) => match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                errs.push(format!("{key} `{s}` is not a positive duration: write e.g. 10s or 1m"));
                default
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daemon::reload::Reloadable as _;

    #[test]
    fn defaults_need_an_advertise_address() {
        let e = Config::resolve(FileConfig::default(), Overrides::default()).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("advertise_address"));
    }

    #[test]
    fn overrides_win_and_defaults_fill() {
        let file = FileConfig {
            mtu: Some(1400),
            fleet_port: Some(7100),
            ..Default::default()
        };
        let o = Overrides {
            advertise_address: Some("192.0.2.1".into()),
            fleet_port: Some(7200),
            ..Default::default()
        };
        let c = Config::resolve(file, o).unwrap();
        assert_eq!(c.fleet_port, 7200);
        assert_eq!(c.mtu, 1400);
        assert_eq!(c.overlay_cidr.to_string(), "100.96.0.0/16");
        assert_eq!(c.enroll_endpoint(), "192.0.2.1:7443");
        assert_eq!(c.wg_endpoint(), "192.0.2.1:51820");
    }

    #[test]
    fn reload_tells_which_keys_need_a_restart() {
        let base = Overrides {
            advertise_address: Some("192.0.2.1".into()),
            ..Default::default()
        };
        let a = Config::resolve(FileConfig::default(), base.clone()).unwrap();
        let b = Config::resolve(
            FileConfig {
                log_level: Some("debug".into()),
                mtu: Some(1400),
                ..Default::default()
            },
            base,
        )
        .unwrap();
        assert_eq!(a.restart_needed_for(&b), vec!["mtu"], "log_level applies live");
        assert!(a.restart_needed_for(&a).is_empty());
    }

    #[test]
    fn every_bad_value_is_reported() {
        let file = FileConfig {
            overlay_cidr: Some("100.96.0.0/31".into()),
            mtu: Some(100),
            tun_name: Some("much-too-long-name0".into()),
            heartbeat_interval: Some("soon".into()),
            enroll_listen: Some("nowhere".into()),
            log_format: Some("xml".into()),
            log_level: Some("info,[".into()),
            ..Default::default()
        };
        let o = Overrides {
            advertise_address: Some("0.0.0.0".into()),
            ..Default::default()
        };
        let e = Config::resolve(file, o).unwrap_err();
        for key in [
            "overlay_cidr",
            "mtu",
            "tun_name",
            "heartbeat_interval",
            "enroll_listen",
            "log_format",
            "advertise_address",
            "log_level",
        ] {
            assert!(e.iter().any(|l| l.contains(key)), "missing {key} in {e:?}");
        }
    }
}
