//! `nimbus-delay-router`: holds packets read from a TUN device for a per-zone-pair delay, drops a configured
//! fraction per host, and writes them back. Runs inside the router namespace of an `e2e::delay::DelayLab`;
//! see that module for the topology and the configuration format.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use e2e::delay::{EXIT_CONFIG, ROUTER_TUN, RouterConfig, RouterOptions, run_router};

#[derive(Debug, Parser)]
#[command(
    name = "nimbus-delay-router",
    version,
    about = "Userspace delay router: per-zone-pair one-way delay and per-host loss on a TUN device",
    after_help = "Signals: SIGTERM/SIGINT stop, SIGHUP re-reads the config, SIGUSR1 prints counters."
)]
struct Cli {
    /// TUN device to attach to (inside the router namespace).
    #[arg(long, default_value = ROUTER_TUN)]
    tun: String,
    /// JSON configuration: zones with host addresses, delays per zone pair (µs), loss per host.
    #[arg(long)]
    config: PathBuf,
    /// Only validate the configuration and exit (0 when valid, 64 when not).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if cli.check {
        return match RouterConfig::load(&cli.config) {
            Ok(_) => {
                println!("{}: valid", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nimbus-delay-router: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let opts = RouterOptions {
        tun: cli.tun,
        config: cli.config,
    };
    match run_router(&opts) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nimbus-delay-router: {e}");
            if e.is_config_error() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
