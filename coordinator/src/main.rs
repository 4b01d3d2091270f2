//! `nimbus-coordinator`: parses flags, loads config, runs the coordinator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coordinator::config::{Config, Settings};
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
    #[command(flatten)]
    settings: Settings,
}

fn load(args: &Args) -> Result<Config, Vec<String>> {
    let file: Settings = daemon::config::load_optional(args.config.as_deref())?;
    Config::resolve(file, args.settings.clone())
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
