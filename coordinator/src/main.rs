//! `nimbus-coordinator`: parses flags, loads config, runs the coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coordinator::backup::{self, BackupError, StoreSpec};
use coordinator::config::{Config, Settings};
use coordinator::kek;
use daemon::notify;
use daemon::signals::{Signal, Signals};

/// The polynimbus coordinator: enrollment (TLS), the fleet channel (inside
/// WireGuard only) and the admin API (Unix socket).
///
/// Every setting can come from the TOML file given with --config, from a flag,
/// or from the NIMBUS_* environment variable named beside the flag; flags win.
#[derive(Parser, Debug)]
#[command(
    name = "nimbus-coordinator",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// TOML configuration file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "NIMBUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Operator commands; without one, the coordinator runs. Exit codes: 0 ok, 64 usage/config, 65 bad backup
/// data, 1 other.
#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Key-encryption key tools.
    Kek {
        #[command(subcommand)]
        cmd: KekCmd,
    },
    /// Encrypted backup of the configured store and the secret files in data_dir (same --config, flags and
    /// NIMBUS_* environment as the daemon). A sled store needs the coordinator stopped; etcd works online.
    Backup {
        /// Backup file to write (atomically, mode 0600).
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        daemon: DaemonConfig,
    },
    /// Restore a backup into the configured store (must be empty) and data_dir.
    Restore {
        /// Backup file to read.
        #[arg(long)]
        from: PathBuf,
        /// Replace key files that already exist in data_dir.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        daemon: DaemonConfig,
    },
    /// Copy every key of a sled store into an empty etcd, then verify by reading everything back.
    Migrate {
        /// sled:DATA_DIR (or the store directory itself).
        #[arg(long)]
        from: coordinator::backup::StoreSpec,
        /// etcd:ENDPOINT[,ENDPOINT...], e.g. etcd:https://10.0.0.5:2379.
        #[arg(long)]
        to: coordinator::backup::StoreSpec,
        /// CA certificate (PEM) of the etcd servers.
        #[arg(long, env = "NIMBUS_ETCD_CA")]
        etcd_ca: Option<PathBuf>,
        /// Client certificate (PEM) for etcd.
        #[arg(long, env = "NIMBUS_ETCD_CERT")]
        etcd_cert: Option<PathBuf>,
        /// Client key (PEM) for etcd.
        #[arg(long, env = "NIMBUS_ETCD_KEY")]
        etcd_key: Option<PathBuf>,
        /// Key prefix in etcd. [default: nimbus/]
        #[arg(long, env = "NIMBUS_ETCD_PREFIX")]
        etcd_prefix: Option<String>,
        /// Allow http:// endpoints without TLS (tests only).
        #[arg(long)]
        etcd_plaintext: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum KekCmd {
    /// Write a new random KEK (base64, mode 0600) to FILE; never overwrites.
    Generate { file: PathBuf },
}

/// The daemon's configuration, for the commands that act on its store.
#[derive(clap::Args, Debug)]
struct DaemonConfig {
    /// The daemon's TOML configuration file.
    #[arg(long, env = "NIMBUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

impl DaemonConfig {
    fn resolve(&self) -> Result<Config, BackupError> {
        let file: Settings =
            daemon::config::load_optional(self.config.as_deref()).map_err(|e| BackupError::Usage(e.join("; ")))?;
        Config::resolve(file, self.settings.clone()).map_err(|e| BackupError::Usage(e.join("; ")))
    }
}

fn load(args: &Args) -> Result<Config, Vec<String>> {
    let file: Settings = daemon::config::load_optional(args.config.as_deref())?;
    Config::resolve(file, args.settings.clone())
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(cmd) = args.command.take() {
        return run_command(cmd);
    }
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

/// Runs an operator command: one line on stderr on failure, exit code from the error.
fn run_command(cmd: Cmd) -> ExitCode {
    // Warnings (e.g. skipped files) on stderr; RUST_LOG-style filter from NIMBUS_LOG_LEVEL.
    let level = std::env::var("NIMBUS_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    let _logs = daemon::logging::init(daemon::logging::LogFormat::Text, &level);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nimbus-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(command(cmd)) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nimbus-coordinator: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn command(cmd: Cmd) -> Result<String, BackupError> {
    match cmd {
        Cmd::Kek {
            cmd: KekCmd::Generate { file },
        } => {
            let k = kek::Kek::generate_file(&file).map_err(BackupError::Kek)?;
            Ok(format!(
                "wrote KEK {} to {} (mode 0600); keep a copy offline",
                k.id(),
                file.display()
            ))
        }
        Cmd::Backup { to, daemon } => {
            let config = daemon.resolve()?;
            let k = kek::Kek::load(&config.kek).map_err(BackupError::Kek)?;
            let s = backup::backup(&config, &k, &to).await?;
            Ok(format!(
                "backup of {} written to {}: {} entries, {} files ({} bytes), sealed with KEK {}",
                backup::describe_store(&config),
                to.display(),
                s.entries,
                s.files,
                s.file_bytes,
                k.id()
            ))
        }
        Cmd::Restore { from, force, daemon } => {
            let config = daemon.resolve()?;
            let k = kek::Kek::load(&config.kek).map_err(BackupError::Kek)?;
            let opts = backup::RestoreOptions { force, progress: true };
            let s = backup::restore(&config, &k, &from, opts).await?;
            Ok(format!(
                "restored {} into {} and {}: {} entries, {} files ({} bytes)",
                from.display(),
                backup::describe_store(&config),
                config.data_dir.display(),
                s.entries,
                s.files,
                s.file_bytes
            ))
        }
        Cmd::Migrate {
            from,
            to,
            etcd_ca,
            etcd_cert,
            etcd_key,
            etcd_prefix,
            etcd_plaintext,
        } => {
            let StoreSpec::Sled(src) = from else {
                return Err(BackupError::Usage("--from must be sled:PATH".into()));
            };
            let StoreSpec::Etcd(endpoints) = to else {
                return Err(BackupError::Usage("--to must be etcd:ENDPOINT[,ENDPOINT...]".into()));
            };
            // The target goes through the daemon's own validation and `open_store`.
            let settings = Settings {
                etcd_endpoints: Some(endpoints),
                etcd_ca,
                etcd_cert,
                etcd_key,
                etcd_prefix,
                etcd_plaintext: Some(etcd_plaintext),
                advertise_address: Some("127.0.0.1".into()),
                ..Settings::default()
            };
            let config =
                Config::resolve(Settings::default(), settings).map_err(|e| BackupError::Usage(e.join("; ")))?;
            let sled_dir = StoreSpec::sled_store_dir(&src);
            if !sled_dir.exists() {
                return Err(BackupError::Usage(format!(
                    "there is no sled store in {}",
                    sled_dir.display()
                )));
            }
            let source = coordinator::store::SledStore::open(&sled_dir).map_err(BackupError::from_open)?;
            let target = backup::open_configured_store(&config).await?;
            let s = backup::migrate(&source, target.as_ref(), |done, total| {
                eprintln!("copied {done}/{total} entries");
            })?;
            Ok(format!(
                "migrated {} entries from sled:{} to {}; verified by reading them back. Keep data_dir's key files \
                 (pki/, wg.key, audit.key, releases/) for the replicas, and point the coordinator at etcd.",
                s.entries,
                sled_dir.display(),
                backup::describe_store(&config)
            ))
        }
    }
}
