//! `nimbus-coordinator`: parses flags, loads config, runs the coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coordinator::config::{Config, FileConfig, Overrides};
use daemon::notify;
use daemon::signals::{Signal, Signals};

/// The polynimbus coordinator: enrollment (TLS), the fleet channel (inside
/// WireGuard only) and the admin API (Unix socket).
///
/// Every setting can come from the TOML file given with --config, from a flag,
/// or from the NIMBUS_* environment variable named beside the flag; flags win.
#[derive(Parser, Debug)]
#[command(name = "nimbus-coordinator", version, about, long_about)]
struct Args {
    /// TOML configuration file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "NIMBUS_CONFIG")]
    config: Option<PathBuf>,
    /// State directory: sled store, CA, WireGuard key. [default: /var/lib/nimbus-coordinator]
    #[arg(long, env = "NIMBUS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Enrollment listener, TCP with TLS. [default: 0.0.0.0:7443]
    #[arg(long, env = "NIMBUS_ENROLL_LISTEN")]
    enroll_listen: Option<String>,
    /// WireGuard listener, UDP. [default: 0.0.0.0:51820]
    #[arg(long, env = "NIMBUS_WG_LISTEN")]
    wg_listen: Option<String>,
    /// IP address agents dial for enrollment and WireGuard (required when listening on 0.0.0.0).
    #[arg(long, env = "NIMBUS_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// Overlay network; the coordinator takes its first host address. [default: 100.96.0.0/16]
    #[arg(long, env = "NIMBUS_OVERLAY_CIDR")]
    overlay_cidr: Option<String>,
    /// Fleet service TCP port on the overlay address (tunnel only). [default: 7000]
    #[arg(long, env = "NIMBUS_FLEET_PORT")]
    fleet_port: Option<u16>,
    /// TUN device name. [default: nimbus0]
    #[arg(long, env = "NIMBUS_TUN_NAME")]
    tun_name: Option<String>,
    /// Overlay MTU. [default: 1420]
    #[arg(long, env = "NIMBUS_MTU")]
    mtu: Option<u16>,
    /// Admin API Unix socket (mode 0600). [default: /run/nimbus/admin.sock]
    #[arg(long, env = "NIMBUS_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// Heartbeat interval told to agents, e.g. 10s. [default: 10s]
    #[arg(long, env = "NIMBUS_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Log format: text or json. [default: text]
    #[arg(long, env = "NIMBUS_LOG_FORMAT")]
    log_format: Option<String>,
    /// Log filter, e.g. info or info,coordinator=debug; SIGHUP applies a changed value. [default: info]
    #[arg(long, env = "NIMBUS_LOG_LEVEL")]
    log_level: Option<String>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            enroll_listen: self.enroll_listen.clone(),
            wg_listen: self.wg_listen.clone(),
            advertise_address: self.advertise_address.clone(),
            overlay_cidr: self.overlay_cidr.clone(),
            fleet_port: self.fleet_port,
            tun_name: self.tun_name.clone(),
            mtu: self.mtu,
            admin_socket: self.admin_socket.clone(),
            heartbeat_interval: self.heartbeat_interval.clone(),
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

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load(&args) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("nimbus-coordinator: config: {e}");
            }
            return ExitCode::from(daemon::config::EXIT_USAGE as u8);
        }
    };
    let format = config.log_format.parse().unwrap_or(daemon::logging::LogFormat::Text);
    let logs = daemon::logging::init(format, &config.log_level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nimbus-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(args, config, logs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr (journald keeps it); not repeated through the logger.
            eprintln!("nimbus-coordinator: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn serve(args: Args, config: Config, logs: daemon::logging::LogControl) -> Result<(), coordinator::CoordError> {
    let mut signals = Signals::new()
        .map_err(|e| coordinator::CoordError::Config(vec![format!("cannot install signal handlers: {e}")]))?;
    let running = coordinator::start(config.clone()).await?;
    notify::ready();
    notify::status(&format!(
        "serving; {} agents connected",
        running.ctx.sessions.connected_count()
    ));
    let _watchdog = notify::spawn_watchdog();
    let mut status_tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            sig = signals.recv() => match sig {
                Signal::Terminate => break,
                Signal::Reload => {
                    notify::reloading();
                    daemon::reload::apply(load(&args), &config, &logs);
                    notify::ready();
                }
            },
            _ = status_tick.tick() => notify::status(&format!("serving; {} agents connected", running.ctx.sessions.connected_count())),
        }
    }
    notify::stopping();
    tracing::info!("SIGTERM: draining");
    running.shutdown().await;
    Ok(())
}
