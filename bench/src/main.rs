//! `nimbus-bench`: the performance harness. Runs the sections asked for (all by default) and prints one markdown
//! table per section plus the machine it ran on. Every figure is a ratio against a reference measured in the
//! same run or a count on this machine (shared, noisy machines make absolute times meaningless).
//!
//! Needs root (network namespaces) for most sections. Not part of the test suite; CI only builds it.
//!
//! # Layout
//! - [`report`]: the machine description and the markdown table type every section returns.
//! - [`neigh`]: room in the kernel's neighbour (ARP) table, which all of a lab's namespaces share.
//! - one module per section (see [`Section`]).

mod agent_footprint;
mod coordinator_scale;
mod cpu;
mod enrollment;
mod neigh;
mod report;
mod sim;
mod tunnel_compare;
mod wg_peers;

use std::process::ExitCode;

use clap::{Parser, ValueEnum};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Coordinator with thousands of simulated agents on real gRPC streams (1 000, 5 000, 10 000).
    CoordinatorScale,
    /// WireGuard peers on one UDP socket at the coordinator: handshakes/s, keepalive CPU, memory per peer.
    WgPeers,
    /// Enrollment with real TLS and key handling: agents per second, time for 1 000.
    Enrollment,
    /// RSS and CPU of an idle connected agent, and during a probe round with 64 peers.
    AgentFootprint,
    /// TCP throughput and ping RTT: plain veth, wireguard-go, boringtun-cli and the embedded tunnel.
    Tunnel,
}

/// Performance harness for polynimbus: prints markdown tables (see README "Performance").
///
/// Examples:
///   sudo nimbus-bench                        # everything (under 10 minutes)
///   sudo nimbus-bench --only tunnel --quick  # one section, short runs
#[derive(Parser, Debug)]
#[command(name = "nimbus-bench", version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// Run only these sections (repeatable). [default: all]
    #[arg(long, value_enum)]
    only: Vec<Section>,
    /// Shorter runs and smaller sizes (a smoke run; the figures are rougher).
    #[arg(long)]
    quick: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let sections: Vec<Section> = if args.only.is_empty() {
        Section::value_variants().to_vec()
    } else {
        args.only.clone()
    };
    println!("{}", report::machine());
    let started = std::time::Instant::now();
    let mut timings = Vec::new();
    let mut failed = false;
    for s in sections {
        let section_start = std::time::Instant::now();
        let result: anyhow::Result<Vec<report::Table>> = match s {
            Section::CoordinatorScale => coordinator_scale::run(args.quick),
            Section::Enrollment => enrollment::run(args.quick),
            Section::WgPeers => wg_peers::run(args.quick),
            Section::AgentFootprint => agent_footprint::run(args.quick),
            Section::Tunnel => tunnel_compare::run(args.quick),
        };
        match result {
            Ok(tables) => {
                for t in tables {
                    println!("{t}");
                }
            }
            Err(e) => {
                failed = true;
                eprintln!("nimbus-bench: {s:?}: {e:#}");
            }
        }
        timings.push(format!("{s:?} {:.0} s", section_start.elapsed().as_secs_f64()));
    }
    println!(
        "Total wall time of the sections: {:.0} s ({}).",
        started.elapsed().as_secs_f64(),
        timings.join(", ")
    );
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
