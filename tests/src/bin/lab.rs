//! `nimbus-lab`: a local multi-host polynimbus lab in network namespaces (run as root; see deploy/lab.sh).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use e2e::lab::{
    DEFAULT_AGENTS, DEFAULT_STATE_FILE, DEFAULT_UP_TIMEOUT, DEFAULT_ZONES, LAB_PREFIX, MAX_ZONES, UpOptions,
};

#[derive(Debug, Parser)]
#[command(
    name = "nimbus-lab",
    version,
    about = "A local polynimbus lab: a coordinator and N agents in network namespaces"
)]
struct Cli {
    /// The lab's state file; its directory holds data, logs and the admin socket.
    #[arg(long, global = true, default_value = DEFAULT_STATE_FILE)]
    state_file: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the topology, start the coordinator and N agents, wait until all are connected and (with zones)
    /// until every pair of agents has measured its latency.
    Up {
        /// Number of agents.
        #[arg(long, default_value_t = DEFAULT_AGENTS as u16, value_parser = clap::value_parser!(u16).range(1..=200))]
        agents: u16,
        /// Zones behind the userspace delay router (a, b, c, ...; agents dealt round-robin; 0.1 ms RTT inside a
        /// zone, 1 ms between a and b, 5 ms otherwise). 0: every host on one bridge, no added delay.
        #[arg(long, default_value_t = DEFAULT_ZONES as u8, value_parser = clap::value_parser!(u8).range(0..=MAX_ZONES as i64))]
        zones: u8,
        /// Directory holding nimbus-coordinator, nimbus-agent and nimbusctl (default: next to nimbus-lab).
        #[arg(long, env = "NIMBUS_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Seconds to wait for all agents to connect.
        #[arg(long, default_value_t = DEFAULT_UP_TIMEOUT.as_secs())]
        timeout_secs: u64,
        /// Namespace name prefix (for the harness's own tests).
        #[arg(long, default_value = LAB_PREFIX, hide = true)]
        prefix: String,
    },
    /// Stop the recorded processes and delete the namespaces (idempotent).
    Down,
    /// Show the lab's processes and `nimbusctl nodes`.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout();
    let result = match cli.command {
        Cmd::Up {
            agents,
            zones,
            bin_dir,
            timeout_secs,
            prefix,
        } => {
            let opts = UpOptions {
                agents: usize::from(agents),
                zones: usize::from(zones),
                state_file: cli.state_file,
                bin_dir,
                timeout: Duration::from_secs(timeout_secs),
                prefix,
            };
            e2e::lab::up(&opts, &mut out).map(|_| true)
        }
        Cmd::Down => e2e::lab::down(&cli.state_file, &mut out).map(|_| true),
        Cmd::Status => e2e::lab::status(&cli.state_file, &mut out),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nimbus-lab: error: {e}");
            ExitCode::from(1)
        }
    }
}
