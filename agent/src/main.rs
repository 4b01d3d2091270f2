//! `nimbus-agent`: parses flags, loads config, runs the agent, maps the
//! outcome to a documented exit code (see `agent::error`).

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::{Config, FileConfig};
use agent::identity::Identity;
use clap::Parser;
use daemon::notify;
use daemon::signals::{Signal, Signals};

/// The polynimbus host agent.
///
/// First start: enrolls with a join token and the coordinator's CA pin (both
/// printed by `nimbusctl token create`), then keeps a WireGuard tunnel and a
/// fleet stream to the coordinator. Later starts reuse the identity in
/// --state-dir and need no token.
///
/// Exit codes: 0 stopped, 1 runtime failure, 10 node revoked,
/// 64 bad configuration or malformed token, 69 coordinator unreachable while
/// enrolling, 77 enrollment refused (token expired/used up/unknown, CA pin mismatch).
#[derive(Parser, Debug)]
#[command(name = "nimbus-agent", version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// TOML configuration file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "NIMBUS_CONFIG")]
    config: Option<PathBuf>,
    /// State directory: identity.json and wg.key (0600). [default: /var/lib/nimbus-agent]
    #[arg(long, env = "NIMBUS_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Coordinator enrollment endpoint HOST:PORT, e.g. 192.0.2.1:7443.
    #[arg(long, env = "NIMBUS_COORDINATOR")]
    coordinator: Option<String>,
    /// Join token from `nimbusctl token create` (prefer --token-file or the env var: flags show in `ps`).
    #[arg(long, env = "NIMBUS_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the join token.
    #[arg(long, env = "NIMBUS_JOIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// SHA-256 pin of the coordinator's CA: sha256:<64 hex>.
    #[arg(long, env = "NIMBUS_CA_PIN")]
    ca_pin: Option<String>,
    /// Node name to request. [default: the hostname]
    #[arg(long, env = "NIMBUS_NODE_NAME")]
    node_name: Option<String>,
    /// Machine id to report. [default: /etc/machine-id]
    #[arg(long, env = "NIMBUS_MACHINE_ID")]
    machine_id: Option<String>,
    /// TUN device name. [default: nimbus0]
    #[arg(long, env = "NIMBUS_TUN_NAME")]
    tun_name: Option<String>,
    /// WireGuard UDP listen address. [default: 0.0.0.0:0]
    #[arg(long, env = "NIMBUS_WG_LISTEN")]
    wg_listen: Option<String>,
    /// How long the tunnel may stay dead before asking whether this node was revoked. [default: 60s]
    #[arg(long, env = "NIMBUS_REVOCATION_CHECK_AFTER")]
    revocation_check_after: Option<String>,
    /// Log format: text or json. [default: text]
    #[arg(long, env = "NIMBUS_LOG_FORMAT")]
    log_format: Option<String>,
    /// Log filter, e.g. info or info,agent=debug; SIGHUP applies a changed value. [default: info]
    #[arg(long, env = "NIMBUS_LOG_LEVEL")]
    log_level: Option<String>,
}

impl Args {
    fn overrides(&self) -> FileConfig {
        FileConfig {
            state_dir: self.state_dir.clone(),
            coordinator: self.coordinator.clone(),
            token: self.token.clone(),
            token_file: self.token_file.clone(),
            ca_pin: self.ca_pin.clone(),
            node_name: self.node_name.clone(),
            machine_id: self.machine_id.clone(),
            tun_name: self.tun_name.clone(),
            wg_listen: self.wg_listen.clone(),
            revocation_check_after: self.revocation_check_after.clone(),
            log_format: self.log_format.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

fn load(args: &Args) -> Result<Config, Vec<String>> {
    let file: FileConfig = match &args.config {
        Some(p) => daemon::config::load_toml(p).map_err(|e| e.errors)?,
        None => FileConfig::default(),
    };
    Config::resolve(file, args.overrides())
}

struct Notify;
impl agent::run::Events for Notify {
    fn connected(&self, id: &Identity) {
        notify::ready();
        notify::status(&format!("connected as {} ({})", id.node_name, id.overlay_ip));
    }
    fn disconnected(&self, why: &str) {
        notify::status(&format!("reconnecting: {why}"));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("nimbus-agent: config: {e}");
            }
            return ExitCode::from(agent::error::EXIT_USAGE);
        }
    };
    let logs = daemon::logging::init(
        cfg.log_format.parse().unwrap_or(daemon::logging::LogFormat::Text),
        &cfg.log_level,
    );
    let running = cfg.clone();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nimbus-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        let mut signals =
            Signals::new().map_err(|e| agent::AgentError::Other(format!("cannot install signal handlers: {e}")))?;
        let _watchdog = notify::spawn_watchdog();
        let shutdown = async move {
            loop {
                match signals.recv().await {
                    Signal::Terminate => break,
                    // No RELOADING=1/READY=1 pair here: READY means "stream open", which a reload does not change.
                    Signal::Reload => {
                        daemon::reload::apply(load(&args), &running, &logs);
                    }
                }
            }
            notify::stopping();
            tracing::info!("stopping");
        };
        agent::run::run(cfg, shutdown, &Notify).await
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr (journald keeps it); not repeated through the logger.
            eprintln!("nimbus-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
