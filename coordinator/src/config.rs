//! Coordinator configuration: a TOML file, overridden by flags and `NIMBUS_*`
//! environment variables. Everything is validated — and every problem
//! reported together — before anything binds.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use daemon::config::check;
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
/// Default port of the agent-release repository on the overlay address (tunnel only).
pub const DEFAULT_RELEASE_PORT: u16 = 7001;
/// Default overlay MTU: 1500 underlay minus 80 bytes of WireGuard/UDP/IPv6 overhead.
pub const DEFAULT_MTU: u16 = 1420;
pub const DEFAULT_TUN_NAME: &str = "nimbus0";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/nimbus/admin.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/nimbus-coordinator";
/// Default Prometheus metrics listener (loopback: put a scraper or a proxy beside it).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Latency probe interval per peer. Default 1 s.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Latency statistics window. Default 30 s.
pub const DEFAULT_PROBE_WINDOW: Duration = Duration::from_secs(30);
/// How often the fleet's latency probe key is replaced. Default 24 h.
pub const DEFAULT_PROBE_KEY_ROTATION: Duration = Duration::from_secs(24 * 3600);
/// How often node labels and taints are reconciled in each environment's cluster. Default 60 s.
pub const DEFAULT_CLUSTER_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// How long a rollout node may take from its wave's start to healthy. Default 15 min.
pub const DEFAULT_ROLLOUT_NODE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Heartbeat interval told to agents. Default 10 s.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// How often in-memory last-seen times are written to the store. Default 15 s.
pub const DEFAULT_LAST_SEEN_FLUSH: Duration = Duration::from_secs(15);

/// The settings, as they come from the TOML file (`--config`) *and* from flags / `NIMBUS_*` environment
/// variables: one struct, so the file keys and the flags cannot drift apart. Every key is optional; the
/// `DEFAULT_*` constants give the defaults. Flags win over the file.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(default)]
pub struct Settings {
    /// State directory: sled store, CA, WireGuard key. [default: /var/lib/nimbus-coordinator]
    #[arg(long, env = "NIMBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The agent-release repository and its online keys. With several replicas, a directory every replica
    /// mounts (a ReadWriteMany volume, NFS): agents fetch releases from the replica they stream to.
    /// [default: <data_dir>/releases]
    #[arg(long, env = "NIMBUS_RELEASES_DIR")]
    pub releases_dir: Option<PathBuf>,
    /// Enrollment listener, TCP with TLS. [default: 0.0.0.0:7443]
    #[arg(long, env = "NIMBUS_ENROLL_LISTEN")]
    pub enroll_listen: Option<String>,
    /// WireGuard listener, UDP. [default: 0.0.0.0:51820]
    #[arg(long, env = "NIMBUS_WG_LISTEN")]
    pub wg_listen: Option<String>,
    /// IP address agents dial for enrollment and WireGuard (required when listening on 0.0.0.0).
    #[arg(long, env = "NIMBUS_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Overlay network; the coordinator takes its first host address. [default: 100.96.0.0/16]
    #[arg(long, env = "NIMBUS_OVERLAY_CIDR")]
    pub overlay_cidr: Option<String>,
    /// Fleet service TCP port on the overlay address (tunnel only). [default: 7000]
    #[arg(long, env = "NIMBUS_FLEET_PORT")]
    pub fleet_port: Option<u16>,
    /// Port of the agent-release repository (TUF metadata and artefacts) on the overlay address, tunnel only.
    /// [default: 7001]
    #[arg(long, env = "NIMBUS_RELEASE_PORT")]
    pub release_port: Option<u16>,
    /// TUN device name. [default: nimbus0]
    #[arg(long, env = "NIMBUS_TUN_NAME")]
    pub tun_name: Option<String>,
    /// Overlay MTU. [default: 1420]
    #[arg(long, env = "NIMBUS_MTU")]
    pub mtu: Option<u16>,
    /// Admin API Unix socket (mode 0600). [default: /run/nimbus/admin.sock]
    #[arg(long, env = "NIMBUS_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Heartbeat interval told to agents, e.g. 10s. [default: 10s]
    #[arg(long, env = "NIMBUS_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// How often last-seen times are written to the store. [default: 15s]
    #[arg(long, env = "NIMBUS_LAST_SEEN_FLUSH")]
    pub last_seen_flush: Option<String>,
    /// Interval between latency probes to each peer, told to agents. [default: 1s]
    #[arg(long, env = "NIMBUS_PROBE_INTERVAL")]
    pub probe_interval: Option<String>,
    /// Latency statistics window, told to agents. [default: 30s]
    #[arg(long, env = "NIMBUS_PROBE_WINDOW")]
    pub probe_window: Option<String>,
    /// How often the latency probe MAC key is replaced (agents accept the new key at once and sign with it
    /// two seconds later; the old one stays accepted for a minute). [default: 24h]
    #[arg(long, env = "NIMBUS_PROBE_KEY_ROTATION")]
    pub probe_key_rotation: Option<String>,
    /// How often node labels and taints are reconciled through each environment's Kubernetes API (hand-made
    /// changes to polynimbus.io labels are reverted). [default: 60s]
    #[arg(long, env = "NIMBUS_CLUSTER_SYNC_INTERVAL")]
    pub cluster_sync_interval: Option<String>,
    /// How long a node in a rollout wave may take to report healthy (change applied, kubelet joined)
    /// before it counts as failed and the rollout pauses. [default: 15m]
    #[arg(long, env = "NIMBUS_ROLLOUT_NODE_TIMEOUT")]
    pub rollout_node_timeout: Option<String>,
    /// Directory of agent packages (and other files for new hosts, e.g. iPXE seeds) served by the package
    /// mirror. Serving is off unless both this and --packages-listen are set.
    #[arg(long, env = "NIMBUS_PACKAGES_DIR")]
    pub packages_dir: Option<PathBuf>,
    /// Package mirror listen address, e.g. 0.0.0.0:8080 (plain HTTP unless --packages-tls-cert is set: hosts
    /// check each package's SHA-256 either way).
    #[arg(long, env = "NIMBUS_PACKAGES_LISTEN")]
    pub packages_listen: Option<String>,
    /// Certificate chain (PEM) that turns the package mirror into HTTPS, e.g. for iPXE and bare-metal seeds
    /// (iPXE must trust its CA). Goes with --packages-tls-key.
    #[arg(long, env = "NIMBUS_PACKAGES_TLS_CERT")]
    pub packages_tls_cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600) of --packages-tls-cert.
    #[arg(long, env = "NIMBUS_PACKAGES_TLS_KEY")]
    pub packages_tls_key: Option<PathBuf>,
    /// etcd endpoints (https://host:2379, comma-separated): keep the state in etcd instead of the sled store in
    /// data_dir. Needs etcd_ca, etcd_cert and etcd_key (client-certificate TLS).
    #[arg(long, env = "NIMBUS_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// CA certificate (PEM) that signed the etcd servers' certificates.
    #[arg(long, env = "NIMBUS_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "NIMBUS_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM, mode 0600) for etcd.
    #[arg(long, env = "NIMBUS_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// Key prefix of this coordinator's state in etcd (several fleets can share one etcd). [default: nimbus/]
    #[arg(long, env = "NIMBUS_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Allow http:// etcd endpoints without TLS. For tests on loopback only: never in production.
    #[arg(long, env = "NIMBUS_ETCD_PLAINTEXT")]
    pub etcd_plaintext: Option<bool>,
    /// This replica's id among the coordinators sharing one etcd prefix (letters, digits, `-`, `_`, `.`; at
    /// most 63). Keep it stable: it names the replica's WireGuard key and overlay address in the store.
    /// [default: <advertise_address>-<enroll port>]
    #[arg(long, env = "NIMBUS_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// File holding the base64 key-encryption key (mode 0600; `nimbus-coordinator kek generate FILE`). On etcd
    /// the CA and the replicas' WireGuard keys are kept in the store sealed with it; backups are sealed with
    /// it. Without kek_file or kek_command the key comes from the NIMBUS_KEK environment variable.
    #[arg(long, env = "NIMBUS_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Command printing the base64 KEK, run without a shell, e.g. "vault kv get -field=kek secret/nimbus".
    #[arg(long, env = "NIMBUS_KEK_COMMAND")]
    pub kek_command: Option<String>,
    /// Prometheus metrics (HTTP GET /metrics) listen address, or `off`. [default: 127.0.0.1:9464]
    #[arg(long, env = "NIMBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Log format: text or json. [default: text]
    #[arg(long, env = "NIMBUS_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or info,coordinator=debug; SIGHUP applies a changed value. [default: info]
    #[arg(long, env = "NIMBUS_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Operator-provided TLS certificate chain (PEM) for enrollment, instead of the coordinator's own CA.
    #[arg(long, env = "NIMBUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600) of --tls-cert.
    #[arg(long, env = "NIMBUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate that signed --tls-cert; its SHA-256 is the pin agents check.
    #[arg(long, env = "NIMBUS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Audit log also written as JSON lines (entries and signed checkpoints) to this file (0600, appended),
    /// e.g. for fluentd. The store keeps the log either way.
    #[arg(long, env = "NIMBUS_AUDIT_FILE")]
    pub audit_file: Option<PathBuf>,
    /// Audit log also sent to the local syslog (/dev/log, facility authpriv).
    #[arg(long, env = "NIMBUS_AUDIT_SYSLOG")]
    pub audit_syslog: Option<bool>,
    /// A signed audit checkpoint at least this often while entries arrive. [default: 5m]
    #[arg(long, env = "NIMBUS_AUDIT_CHECKPOINT_INTERVAL")]
    pub audit_checkpoint_interval: Option<String>,
    /// A signed audit checkpoint at least every N entries. [default: 100]
    #[arg(long, env = "NIMBUS_AUDIT_CHECKPOINT_ENTRIES")]
    pub audit_checkpoint_entries: Option<u64>,
    /// Remote admin API listener (gRPC over TLS), e.g. 0.0.0.0:7444; off unless set. Needs --admin-client-ca
    /// and/or --oidc-issuer: every remote call is authenticated.
    #[arg(long, env = "NIMBUS_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Certificate chain (PEM) of the remote admin listener. [default: issued by the coordinator's CA]
    #[arg(long, env = "NIMBUS_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// Private key (PEM, mode 0600) of --admin-tls-cert.
    #[arg(long, env = "NIMBUS_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates may call the remote admin API (mTLS). Roles come from the
    /// certificate's Organization (O=viewer, O=operator, O=admin).
    #[arg(long, env = "NIMBUS_ADMIN_CLIENT_CA")]
    pub admin_client_ca: Option<PathBuf>,
    /// OIDC issuer URL (e.g. https://keycloak.example/realms/ops) whose bearer tokens the remote admin API
    /// accepts. Its JWKS is fetched from the issuer's discovery document and cached.
    #[arg(long, env = "NIMBUS_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// Audience the tokens must carry (the client id in Keycloak).
    #[arg(long, env = "NIMBUS_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// JWKS file to use instead of fetching it from the issuer (air-gapped sites).
    #[arg(long, env = "NIMBUS_OIDC_JWKS_FILE")]
    pub oidc_jwks_file: Option<PathBuf>,
    /// Claim holding the caller's roles, a dotted path to a list of strings. [default: realm_access.roles]
    #[arg(long, env = "NIMBUS_OIDC_ROLES_CLAIM")]
    pub oidc_roles_claim: Option<String>,
    /// CA (PEM) that signed the issuer's HTTPS certificate, when not a public one.
    #[arg(long, env = "NIMBUS_OIDC_CA")]
    pub oidc_ca: Option<PathBuf>,
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreSettings {
    /// The embedded sled store in `<data_dir>/state` (one coordinator).
    Sled,
    /// etcd v3.
    Etcd(EtcdSettings),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// CA, client certificate and key; `None` only with `etcd_plaintext` (tests).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    pub prefix: String,
    /// This replica's id (`replica_id`).
    pub replica_id: String,
}

/// Where the key-encryption key comes from: `kek_file`, `kek_command`, or else `NIMBUS_KEK`.
fn kek_source(file: Option<PathBuf>, command: Option<String>, errs: &mut Vec<String>) -> crate::kek::KekSource {
    match (file, command) {
        (Some(_), Some(_)) => {
            errs.push("kek_file and kek_command exclude each other: give one".into());
            crate::kek::KekSource::Env
        }
        (Some(f), None) => crate::kek::KekSource::File(f),
        (None, Some(c)) => match shlex::split(&c).filter(|v| !v.is_empty()) {
            Some(argv) => crate::kek::KekSource::Command(argv),
            None => {
                errs.push(format!(
                    "kek_command {c:?} is not a valid command line (check its quotes)"
                ));
                crate::kek::KekSource::Env
            }
        },
        (None, None) => crate::kek::KekSource::Env,
    }
}

/// Whether `id` is a valid replica id.
pub fn valid_replica_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "nimbus/";

/// The store from the (merged) etcd keys of `k`.
fn store_settings(k: Settings, default_replica_id: Option<String>, errs: &mut Vec<String>) -> StoreSettings {
    let endpoints = k.etcd_endpoints.unwrap_or_default();
    let (ca, cert, key, prefix) = (k.etcd_ca, k.etcd_cert, k.etcd_key, k.etcd_prefix);
    let plaintext = k.etcd_plaintext.unwrap_or(false);
    if endpoints.is_empty() {
        if ca.is_some() || cert.is_some() || key.is_some() || prefix.is_some() || k.replica_id.is_some() {
            errs.push(
                "etcd_ca, etcd_cert, etcd_key, etcd_prefix and replica_id need etcd_endpoints (or remove them for the sled store)"
                    .into(),
            );
        }
        return StoreSettings::Sled;
    }
    let prefix = prefix.unwrap_or_else(|| DEFAULT_ETCD_PREFIX.into());
    if prefix.is_empty() || !prefix.ends_with('/') {
        errs.push(format!("etcd_prefix {prefix:?} must end with `/`, e.g. \"nimbus/\""));
    }
    for e in &endpoints {
        match e.split_once("://").map(|(s, _)| s) {
            Some("https") => {}
            Some("http") if plaintext => {}
            Some("http") => errs.push(format!(
                "etcd endpoint {e:?} is plain http: use https:// with etcd_ca/etcd_cert/etcd_key (etcd_plaintext = true is for tests only)"
            )),
            _ => errs.push(format!("etcd endpoint {e:?} must look like https://HOST:2379")),
        }
    }
    let tls = match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
        (None, None, None) if plaintext => None,
        _ => {
            errs.push("etcd_ca, etcd_cert and etcd_key must be given together: the coordinator talks to etcd over TLS with a client certificate".into());
            None
        }
    };
    let replica_id = k.replica_id.or(default_replica_id).unwrap_or_default();
    if !valid_replica_id(&replica_id) {
        errs.push(format!(
            "replica_id {replica_id:?} must be 1 to 63 letters, digits, `-`, `_` or `.`, e.g. \"coordinator-0\""
        ));
    }
    StoreSettings::Etcd(EtcdSettings {
        endpoints,
        tls,
        prefix,
        replica_id,
    })
}

/// Default interval between signed audit checkpoints.
pub const DEFAULT_AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(300);
/// Default number of audit entries between signed checkpoints.
pub const DEFAULT_AUDIT_CHECKPOINT_ENTRIES: u64 = 100;
/// Default claim holding roles in OIDC tokens (Keycloak's realm roles).
pub const DEFAULT_OIDC_ROLES_CLAIM: &str = "realm_access.roles";

/// Where the audit log goes besides the store, and how often it is checkpointed.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    pub file: Option<PathBuf>,
    pub syslog: bool,
    pub checkpoint_interval: Duration,
    pub checkpoint_entries: u64,
}

/// The remote admin listener.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteAdmin {
    pub listen: SocketAddr,
    /// Certificate chain and key; `None`: issued by the coordinator's CA.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub client_ca: Option<PathBuf>,
    pub oidc: Option<OidcSettings>,
}

/// Bearer tokens accepted on the remote admin listener.
#[derive(Debug, Clone, PartialEq)]
pub struct OidcSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: Option<PathBuf>,
    pub roles_claim: String,
    pub ca: Option<PathBuf>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The release repository's root (`releases_dir`).
    pub releases_dir: PathBuf,
    pub enroll_listen: SocketAddr,
    pub wg_listen: SocketAddr,
    /// The address agents dial for enrollment and WireGuard.
    pub advertise_address: IpAddr,
    pub overlay_cidr: Ipv4Net,
    pub fleet_port: u16,
    pub release_port: u16,
    pub tun_name: String,
    pub mtu: u16,
    pub admin_socket: PathBuf,
    pub heartbeat_interval: Duration,
    pub last_seen_flush: Duration,
    /// `None` when metrics are off.
    pub metrics_listen: Option<SocketAddr>,
    pub probe_interval: Duration,
    pub probe_window: Duration,
    pub probe_key_rotation: Duration,
    pub cluster_sync_interval: Duration,
    pub rollout_node_timeout: Duration,
    /// The package mirror: directory and listen address (both or neither).
    pub packages: Option<(PathBuf, SocketAddr)>,
    /// Certificate chain and key that make the package mirror HTTPS.
    pub packages_tls: Option<(PathBuf, PathBuf)>,
    pub log_format: String,
    pub log_level: String,
    pub tls: Option<TlsFiles>,
    pub audit: AuditSettings,
    /// Where the state lives.
    pub store: StoreSettings,
    /// `None`: the admin API is on the local socket only.
    pub admin_remote: Option<RemoteAdmin>,
    /// Where the key-encryption key comes from (needed on etcd, and by backup/restore).
    pub kek: crate::kek::KekSource,
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
    pub fn resolve(file: Settings, o: Settings) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let data_dir: PathBuf = o.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let releases_dir = o
            .releases_dir
            .or(file.releases_dir)
            .unwrap_or_else(|| data_dir.join("releases"));
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
        let release_port = o.release_port.or(file.release_port).unwrap_or(DEFAULT_RELEASE_PORT);
        if release_port == 0 || release_port == fleet_port {
            errs.push(format!(
                "release_port {release_port} must be a port of its own (not 0, not fleet_port {fleet_port}); default {DEFAULT_RELEASE_PORT}"
            ));
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
        let heartbeat_interval = check::duration(
            "heartbeat_interval",
            o.heartbeat_interval.or(file.heartbeat_interval).as_deref(),
            DEFAULT_HEARTBEAT_INTERVAL,
            &mut errs,
        );
        let last_seen_flush = check::duration(
            "last_seen_flush",
            o.last_seen_flush.or(file.last_seen_flush).as_deref(),
            DEFAULT_LAST_SEEN_FLUSH,
            &mut errs,
        );
        let probe_interval = check::duration(
            "probe_interval",
            o.probe_interval.or(file.probe_interval).as_deref(),
            DEFAULT_PROBE_INTERVAL,
            &mut errs,
        );
        let probe_window = check::duration(
            "probe_window",
            o.probe_window.or(file.probe_window).as_deref(),
            DEFAULT_PROBE_WINDOW,
            &mut errs,
        );
        let probe_key_rotation = check::duration(
            "probe_key_rotation",
            o.probe_key_rotation.or(file.probe_key_rotation).as_deref(),
            DEFAULT_PROBE_KEY_ROTATION,
            &mut errs,
        );
        let cluster_sync_interval = check::duration(
            "cluster_sync_interval",
            o.cluster_sync_interval.or(file.cluster_sync_interval).as_deref(),
            DEFAULT_CLUSTER_SYNC_INTERVAL,
            &mut errs,
        );
        let rollout_node_timeout = check::duration(
            "rollout_node_timeout",
            o.rollout_node_timeout.or(file.rollout_node_timeout).as_deref(),
            DEFAULT_ROLLOUT_NODE_TIMEOUT,
            &mut errs,
        );
        let packages = match (
            o.packages_dir.or(file.packages_dir),
            o.packages_listen.or(file.packages_listen),
        ) {
            (None, None) => None,
            (Some(dir), Some(listen)) => parse_addr("packages_listen", &listen, &mut errs).map(|a| (dir, a)),
            _ => {
                errs.push("packages_dir and packages_listen go together (or neither, to serve no packages)".into());
                None
            }
        };
        let packages_tls = match (
            o.packages_tls_cert.or(file.packages_tls_cert),
            o.packages_tls_key.or(file.packages_tls_key),
        ) {
            (None, None) => None,
            (Some(_), Some(_)) if packages.is_none() => {
                errs.push("packages_tls_cert/packages_tls_key are set but the package mirror is off: set packages_dir and packages_listen too".into());
                None
            }
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => {
                errs.push("packages_tls_cert and packages_tls_key go together (or neither, for plain HTTP)".into());
                None
            }
        };
        let store = store_settings(
            Settings {
                etcd_endpoints: o.etcd_endpoints.or(file.etcd_endpoints),
                etcd_ca: o.etcd_ca.or(file.etcd_ca),
                etcd_cert: o.etcd_cert.or(file.etcd_cert),
                etcd_key: o.etcd_key.or(file.etcd_key),
                etcd_prefix: o.etcd_prefix.or(file.etcd_prefix),
                etcd_plaintext: o.etcd_plaintext.or(file.etcd_plaintext),
                replica_id: o.replica_id.or(file.replica_id),
                ..Settings::default()
            },
            // Stable across restarts of the same host and port, unique per replica.
            advertise_address.map(|a| {
                format!(
                    "{}-{}",
                    a.to_string().replace([':', '%'], "-"),
                    enroll_listen.map_or(0, |l| l.port())
                )
            }),
            &mut errs,
        );
        let kek = kek_source(
            o.kek_file.or(file.kek_file),
            o.kek_command.or(file.kek_command),
            &mut errs,
        );
        if cluster_sync_interval < Duration::from_secs(1) {
            errs.push(format!(
                "cluster_sync_interval {cluster_sync_interval:?} is too short: use at least 1s (a minute in production)"
            ));
        }
        if rollout_node_timeout < Duration::from_secs(1) {
            errs.push(format!(
                "rollout_node_timeout {rollout_node_timeout:?} is too short: a node needs time to drain and join; use at least 1s (minutes in production)"
            ));
        }
        if probe_key_rotation < Duration::from_secs(3) {
            errs.push(format!(
                "probe_key_rotation {probe_key_rotation:?} is too short: agents switch keys in two steps 2 s apart; use at least 3s (hours in production)"
            ));
        }
        if probe_window < probe_interval * 2 {
            errs.push(format!(
                "probe_window {probe_window:?} must be at least twice probe_interval {probe_interval:?}"
            ));
        }
        let metrics_s = o
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
        let metrics_listen = if metrics_s == "off" {
            None
        } else {
            parse_addr("metrics_listen", &metrics_s, &mut errs)
        };
        let log_format = o.log_format.or(file.log_format).unwrap_or_else(|| "text".into());
        check::log_format(&log_format, &mut errs);
        let log_level = o.log_level.or(file.log_level).unwrap_or_else(|| "info".into());
        check::log_level(&log_level, &mut errs);
        let tls = match (
            o.tls_cert.or(file.tls_cert),
            o.tls_key.or(file.tls_key),
            o.tls_ca.or(file.tls_ca),
        ) {
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
        let audit = AuditSettings {
            file: o.audit_file.or(file.audit_file),
            syslog: o.audit_syslog.or(file.audit_syslog).unwrap_or(false),
            checkpoint_interval: check::duration(
                "audit_checkpoint_interval",
                o.audit_checkpoint_interval
                    .or(file.audit_checkpoint_interval)
                    .as_deref(),
                DEFAULT_AUDIT_CHECKPOINT_INTERVAL,
                &mut errs,
            ),
            checkpoint_entries: o
                .audit_checkpoint_entries
                .or(file.audit_checkpoint_entries)
                .unwrap_or(DEFAULT_AUDIT_CHECKPOINT_ENTRIES),
        };
        if audit.checkpoint_entries == 0 {
            errs.push("audit_checkpoint_entries must be at least 1".into());
        }
        let oidc = match (
            o.oidc_issuer.or(file.oidc_issuer),
            o.oidc_audience.or(file.oidc_audience),
        ) {
            (None, None) => None,
            (Some(issuer), Some(audience)) => {
                if !(issuer.starts_with("https://") || issuer.starts_with("http://")) {
                    errs.push(format!(
                        "oidc_issuer {issuer:?} must be an http(s) URL, e.g. https://keycloak.example/realms/ops"
                    ));
                }
                if audience.is_empty() {
                    errs.push("oidc_audience must not be empty (the client id tokens are issued for)".into());
                }
                Some(OidcSettings {
                    issuer,
                    audience,
                    jwks_file: o.oidc_jwks_file.or(file.oidc_jwks_file),
                    roles_claim: o
                        .oidc_roles_claim
                        .or(file.oidc_roles_claim)
                        .unwrap_or_else(|| DEFAULT_OIDC_ROLES_CLAIM.into()),
                    ca: o.oidc_ca.or(file.oidc_ca),
                })
            }
            _ => {
                errs.push("oidc_issuer and oidc_audience go together".into());
                None
            }
        };
        let admin_tls = match (
            o.admin_tls_cert.or(file.admin_tls_cert),
            o.admin_tls_key.or(file.admin_tls_key),
        ) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c, k)),
            _ => {
                errs.push("admin_tls_cert and admin_tls_key go together".into());
                None
            }
        };
        let admin_client_ca = o.admin_client_ca.or(file.admin_client_ca);
        let admin_remote = match o.admin_listen.or(file.admin_listen) {
            None => {
                if admin_client_ca.is_some() || oidc.is_some() || admin_tls.is_some() {
                    errs.push(
                        "admin_client_ca, oidc_* and admin_tls_* configure the remote admin listener: set admin_listen too".into(),
                    );
                }
                None
            }
            Some(l) => {
                if admin_client_ca.is_none() && oidc.is_none() {
                    errs.push(format!(
                        "admin_listen {l:?} needs a way to authenticate callers: set admin_client_ca (mTLS) and/or oidc_issuer with oidc_audience"
                    ));
                }
                parse_addr("admin_listen", &l, &mut errs).map(|listen| RemoteAdmin {
                    listen,
                    tls: admin_tls,
                    client_ca: admin_client_ca,
                    oidc,
                })
            }
        };
        match (enroll_listen, wg_listen, advertise_address, overlay_cidr) {
            (Some(enroll_listen), Some(wg_listen), Some(advertise_address), Some(overlay_cidr)) if errs.is_empty() => {
                Ok(Config {
                    data_dir,
                    releases_dir,
                    enroll_listen,
                    wg_listen,
                    advertise_address,
                    overlay_cidr,
                    fleet_port,
                    release_port,
                    tun_name,
                    mtu,
                    admin_socket,
                    heartbeat_interval,
                    last_seen_flush,
                    metrics_listen,
                    probe_interval,
                    probe_window,
                    probe_key_rotation,
                    cluster_sync_interval,
                    rollout_node_timeout,
                    packages,
                    packages_tls,
                    log_format,
                    log_level,
                    tls,
                    audit,
                    store,
                    admin_remote,
                    kek,
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
        daemon::changed_fields!(self, new;
            data_dir, releases_dir, enroll_listen, wg_listen, advertise_address, overlay_cidr, fleet_port, release_port, tun_name, mtu,
            admin_socket, heartbeat_interval, last_seen_flush, metrics_listen, probe_interval, probe_window, probe_key_rotation, cluster_sync_interval, rollout_node_timeout, packages, packages_tls, log_format, tls, audit, store, admin_remote, kek)
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

#[cfg(test)]
mod tests {
    use super::*;
    use daemon::reload::Reloadable as _;

    #[test]
    fn defaults_need_an_advertise_address() {
        let e = Config::resolve(Settings::default(), Settings::default()).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("advertise_address"));
    }

    #[test]
    fn etcd_needs_tls_with_a_client_certificate_unless_plaintext_for_tests() {
        let base = || Settings {
            advertise_address: Some("192.0.2.1".into()),
            etcd_endpoints: Some(vec!["https://etcd-0:2379".into()]),
            ..Default::default()
        };
        let e = Config::resolve(Settings::default(), base()).unwrap_err();
        assert!(e.iter().any(|m| m.contains("must be given together")), "{e:?}");
        let full = Settings {
            etcd_ca: Some("/ca".into()),
            etcd_cert: Some("/c".into()),
            etcd_key: Some("/k".into()),
            ..base()
        };
        let c = Config::resolve(Settings::default(), full.clone()).unwrap();
        assert_eq!(
            c.store,
            StoreSettings::Etcd(EtcdSettings {
                endpoints: vec!["https://etcd-0:2379".into()],
                tls: Some(("/ca".into(), "/c".into(), "/k".into())),
                prefix: DEFAULT_ETCD_PREFIX.into(),
                // Derived from the advertised address and the enrollment port: stable and unique per replica.
                replica_id: "192.0.2.1-7443".into(),
            })
        );
        let bad_id = Settings {
            replica_id: Some("a/b".into()),
            ..full.clone()
        };
        let e = Config::resolve(Settings::default(), bad_id).unwrap_err();
        assert!(e.iter().any(|m| m.contains("replica_id")), "{e:?}");
        let both_keks = Settings {
            kek_file: Some("/k".into()),
            kek_command: Some("vault kv get".into()),
            ..full.clone()
        };
        let e = Config::resolve(Settings::default(), both_keks).unwrap_err();
        assert!(e.iter().any(|m| m.contains("exclude each other")), "{e:?}");
        let cmd = Settings {
            kek_command: Some("vault kv get -field=kek 'secret/nimbus x'".into()),
            ..full
        };
        let c = Config::resolve(Settings::default(), cmd).unwrap();
        assert_eq!(
            c.kek,
            crate::kek::KekSource::Command(vec![
                "vault".into(),
                "kv".into(),
                "get".into(),
                "-field=kek".into(),
                "secret/nimbus x".into()
            ])
        );
        let plain = Settings {
            etcd_endpoints: Some(vec!["http://127.0.0.1:2379".into()]),
            ..base()
        };
        let e = Config::resolve(Settings::default(), plain.clone()).unwrap_err();
        assert!(e.iter().any(|m| m.contains("plain http")), "{e:?}");
        let c = Config::resolve(
            Settings::default(),
            Settings {
                etcd_plaintext: Some(true),
                etcd_prefix: Some("lab/".into()),
                ..plain
            },
        )
        .unwrap();
        assert!(matches!(c.store, StoreSettings::Etcd(ref e) if e.tls.is_none() && e.prefix == "lab/"));
        let e = Config::resolve(
            Settings::default(),
            Settings {
                etcd_ca: Some("/ca".into()),
                advertise_address: Some("192.0.2.1".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e[0].contains("need etcd_endpoints"), "{e:?}");
        assert_eq!(
            Config::resolve(
                Settings::default(),
                Settings {
                    advertise_address: Some("192.0.2.1".into()),
                    ..Default::default()
                }
            )
            .unwrap()
            .store,
            StoreSettings::Sled
        );
    }

    #[test]
    fn mirror_tls_needs_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(
            &path,
            "advertise_address = \"192.0.2.1\"\npackages_tls_cert = \"/etc/nimbus/mirror.crt\"\n",
        )
        .unwrap();
        let file: Settings = daemon::config::load_toml(&path).unwrap();
        let e = Config::resolve(file, Settings::default()).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e.iter()
                .any(|m| m.contains("packages_tls_cert and packages_tls_key go together")),
            "{e:?}"
        );

        let o = Settings {
            advertise_address: Some("192.0.2.1".into()),
            packages_tls_cert: Some("/c".into()),
            packages_tls_key: Some("/k".into()),
            ..Default::default()
        };
        let e = Config::resolve(Settings::default(), o.clone()).unwrap_err();
        assert!(e[0].contains("the package mirror is off"), "{e:?}");
        let c = Config::resolve(
            Settings {
                packages_dir: Some("/srv/p".into()),
                packages_listen: Some("0.0.0.0:8443".into()),
                ..Default::default()
            },
            o,
        )
        .unwrap();
        assert_eq!(c.packages_tls, Some(("/c".into(), "/k".into())));
    }

    #[test]
    fn overrides_win_and_defaults_fill() {
        let file = Settings {
            mtu: Some(1400),
            fleet_port: Some(7100),
            ..Default::default()
        };
        let o = Settings {
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
        let base = Settings {
            advertise_address: Some("192.0.2.1".into()),
            ..Default::default()
        };
        let a = Config::resolve(Settings::default(), base.clone()).unwrap();
        let b = Config::resolve(
            Settings {
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
        let file = Settings {
            overlay_cidr: Some("100.96.0.0/31".into()),
            mtu: Some(100),
            tun_name: Some("much-too-long-name0".into()),
            heartbeat_interval: Some("soon".into()),
            enroll_listen: Some("nowhere".into()),
            log_format: Some("xml".into()),
            log_level: Some("info,[".into()),
            probe_key_rotation: Some("1s".into()),
            ..Default::default()
        };
        let o = Settings {
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
            "probe_key_rotation",
        ] {
            assert!(e.iter().any(|l| l.contains(key)), "missing {key} in {e:?}");
        }
    }
}
