//! The `nimbus-agent` command line: parses flags, loads config, runs the agent, maps the outcome to a
//! documented exit code (see [`crate::error`]). `main.rs` is only `agent::cli::main()`, so a test build of
//! another version (`crate::set_version`, then [`main`]) runs exactly this code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use daemon::notify;
use daemon::signals::{Signal, Signals};

use crate::config::{Config, Settings};
use crate::identity::Identity;

/// The polynimbus host agent.
///
/// First start: enrolls with a join token and the coordinator's CA pin (both
/// printed by `nimbusctl token create`), then keeps a WireGuard tunnel and a
/// fleet stream to the coordinator. Later starts reuse the identity in
/// --state-dir and need no token.
///
/// Exit codes: 0 stopped, 1 runtime failure, 10 node revoked,
/// 64 bad configuration or malformed token, 69 coordinator unreachable while
/// enrolling, 75 restart into the new version (under `launch`),
/// 77 enrollment refused (token expired/used up/unknown, CA pin mismatch).
#[derive(Parser, Debug)]
// `--version` prints `crate::version()` (set at runtime in `main`), not the compile-time package version.
#[command(name = "nimbus-agent", about, long_about, verbatim_doc_comment)]
struct Args {
    /// TOML configuration file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "NIMBUS_CONFIG")]
    config: Option<PathBuf>,
    /// Print the commands the recorded storage plan (desired.json in --state-dir) would run on this host, change
    /// nothing, and exit (0: printed, 1: it cannot be applied, with the reason).
    #[arg(long)]
    storage_dry_run: bool,
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Install the agent on this host: the binary (/usr/local/bin), its configuration (/etc/nimbus/agent.toml),
    /// the join token (/etc/nimbus/join-token, 0600, only while the host is not enrolled), the release root
    /// (/etc/nimbus/release-root.json, 0644), the state directory, a systemd unit and drop-in; then enable and
    /// start it when systemd runs the host, or print what remains.
    /// Idempotent: a second run changes nothing.
    ///
    /// Example: nimbus-agent bootstrap --coordinator 192.0.2.1:7443 --ca-pin sha256:<hex> --token-file ./token \
    ///            --release-root ./1.root.json
    #[command(verbatim_doc_comment)]
    Bootstrap {
        /// Enrollment endpoint HOST:PORT (from `nimbusctl token create`).
        #[arg(long)]
        coordinator: String,
        /// The coordinator CA's pin, sha256:<hex> (from `nimbusctl token create`).
        #[arg(long)]
        ca_pin: String,
        /// The join token (prefer --token-file: a command line is visible to other users).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the join token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The node name to ask for (default: the hostname).
        #[arg(long)]
        node_name: Option<String>,
        /// The release repository's root metadata (releases/repo/metadata/1.root.json from `nimbusctl release
        /// init`): installed as /etc/nimbus/release-root.json (0644), and the configuration points at it, so the
        /// agent only accepts releases signed under this root. Without it, an installed root is kept.
        #[arg(long, value_name = "FILE")]
        release_root: Option<PathBuf>,
        /// Install into this directory instead of / (image builds, tests); nothing is started then.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Run the agent under the upgrade launcher (the systemd unit's ExecStart): start the version the
    /// `current` link in --state-dir names (else this program) with ARGS, relay its sd_notify messages,
    /// forward SIGTERM/SIGINT/SIGHUP, and roll back a new version that is not ready in time.
    ///
    /// Example: nimbus-agent launch -- --config /etc/nimbus/agent.toml
    #[command(verbatim_doc_comment)]
    Launch(LaunchArgs),
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    /// A new version must send READY=1 within this time, or its start counts as failed.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    deadline: std::time::Duration,
    /// Failed starts of a new version before it is rolled back to the previous one.
    #[arg(long, default_value_t = crate::launcher::DEFAULT_MAX_FAILURES, value_parser = clap::value_parser!(u32).range(1..))]
    max_failures: u32,
    /// Pause between failed starts of a new version.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    retry_delay: std::time::Duration,
    /// State directory holding versions/, the `current` link and upgrade.json.
    #[arg(long, env = "NIMBUS_STATE_DIR", default_value = crate::versions::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The binary started when no staged version is usable. [default: this program]
    #[arg(long)]
    package_binary: Option<PathBuf>,
    /// The agent's arguments.
    #[arg(last = true)]
    args: Vec<std::ffi::OsString>,
}

/// `nimbus-agent launch`. Runs before anything starts a thread (the launcher blocks signals).
fn launch(a: LaunchArgs) -> ExitCode {
    daemon::logging::init(daemon::logging::LogFormat::Text, "info");
    let package = a.package_binary.unwrap_or_else(crate::launcher::package_binary);
    let opts = crate::launcher::LaunchOptions {
        state_dir: a.state_dir,
        deadline: a.deadline,
        max_failures: a.max_failures,
        retry_delay: a.retry_delay,
        ..crate::launcher::LaunchOptions::new(package, a.args)
    };
    crate::launcher::main(&opts)
}

/// `nimbus-agent bootstrap`.
fn bootstrap(cmd: Cmd) -> ExitCode {
    let Cmd::Bootstrap {
        coordinator,
        ca_pin,
        token,
        token_file,
        node_name,
        release_root,
        root,
    } = cmd
    else {
        // main dispatches only Bootstrap here.
        return ExitCode::FAILURE;
    };
    let token = match (token, token_file) {
        (Some(t), _) => Some(t),
        (None, Some(f)) => match std::fs::read_to_string(&f) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                eprintln!("nimbus-agent: bootstrap: cannot read {}: {e}", f.display());
                return ExitCode::from(crate::error::EXIT_USAGE);
            }
        },
        (None, None) => None,
    };
    let release_root = match release_root
        .as_deref()
        .map(crate::install::read_release_root)
        .transpose()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nimbus-agent: bootstrap: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("nimbus-agent: bootstrap: cannot find this program's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spec = crate::install::InstallSpec {
        root: root.clone(),
        binary,
        coordinator,
        ca_pin,
        token,
        node_name,
        release_root,
    };
    let steps = match crate::install::install(&spec) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nimbus-agent: bootstrap: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let changed = steps.iter().filter(|s| s.changed).count();
    for s in &steps {
        println!("{} {}", if s.changed { "written:  " } else { "unchanged:" }, s.what);
    }
    if crate::install::systemd_manages(&root) {
        for argv in crate::install::START_COMMANDS {
            match std::process::Command::new(argv[0]).args(&argv[1..]).status() {
                Ok(st) if st.success() => println!("ran:       {}", argv.join(" ")),
                Ok(st) => {
                    eprintln!("nimbus-agent: bootstrap: `{}` failed ({st})", argv.join(" "));
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("nimbus-agent: bootstrap: cannot run `{}`: {e}", argv.join(" "));
                    return ExitCode::FAILURE;
                }
            }
        }
        println!("the agent is starting; follow it with `journalctl -u nimbus-agent -f`");
    } else {
        println!(
            "systemd does not run {} (or it is not /): to start the agent, run",
            root.display()
        );
        for argv in crate::install::START_COMMANDS {
            println!("  {}", argv.join(" "));
        }
        println!(
            "(or start {} directly with NIMBUS_CONFIG=/etc/nimbus/agent.toml)",
            bootstrap::spec::AGENT_BINARY_PATH
        );
    }
    if changed == 0 {
        println!("nothing changed");
    }
    ExitCode::SUCCESS
}

fn load(args: &Args) -> Result<Config, Vec<String>> {
    let file: Settings = daemon::config::load_optional(args.config.as_deref())?;
    Config::resolve(file, args.settings.clone())
}

struct Notify;
impl crate::run::Events for Notify {
    fn connected(&self, id: &Identity) {
        notify::ready();
        notify::status(&format!("connected as {} ({})", id.node_name, id.overlay_ip));
    }
    fn disconnected(&self, why: &str) {
        notify::status(&format!("reconnecting: {why}"));
    }
    fn restarting(&self, version: &str) {
        notify::status(&format!("restarting into {version}"));
    }
}

/// `--storage-dry-run`.
fn storage_dry_run(cfg: &Config) -> ExitCode {
    let plan = crate::desired::load(&cfg.state_dir)
        .map(|r| r.storage)
        .unwrap_or_default();
    if plan.volumes.is_empty() {
        println!("no storage plan recorded in {}", cfg.state_dir.display());
        return ExitCode::SUCCESS;
    }
    match crate::volumes::dry_run(cfg, &plan) {
        Ok(commands) if commands.is_empty() => {
            println!("the storage plan is in place: nothing to run");
            ExitCode::SUCCESS
        }
        Ok(commands) => {
            for c in commands {
                println!("{c}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nimbus-agent: storage: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Largest allocation glibc serves from its heaps; larger ones are mmapped and unmapped when freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Fixes glibc's mmap threshold at its default (128 KiB). Left dynamic, glibc raises it to the largest
/// block freed so far: after the first inventory pass has read and freed the dpkg database (0.8 MB on a
/// Debian host), the same read every inventory interval comes from a heap and its pages stay resident —
/// +0.8 MB RSS (6 % of an idle agent) for the agent's life. Setting the threshold turns the adjustment off.
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread exists.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
        eprintln!("nimbus-agent: note: could not fix the malloc mmap threshold; RSS may be higher");
    }
}

/// The whole program: `nimbus-agent [FLAGS] [bootstrap|launch ...]`.
pub fn main() -> ExitCode {
    fixed_mmap_threshold();
    let matches = Args::command().version(crate::version()).get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match args.cmd {
        Some(Cmd::Launch(a)) => return launch(a),
        Some(cmd) => return bootstrap(cmd),
        None => {}
    }
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(errs) => {
            for e in errs {
                eprintln!("nimbus-agent: config: {e}");
            }
            return ExitCode::from(crate::error::EXIT_USAGE);
        }
    };
    if args.storage_dry_run {
        return storage_dry_run(&cfg);
    }
    let logs = daemon::logging::init(
        cfg.log_format.parse().unwrap_or(daemon::logging::LogFormat::Text),
        &cfg.log_level,
    );
    // tough (release verification) brings aws-lc-rs besides ring: name the rustls provider once for the process.
    pki::install_crypto_provider();
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
            Signals::new().map_err(|e| crate::AgentError::Other(format!("cannot install signal handlers: {e}")))?;
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
        crate::run::run(cfg, shutdown, &Notify).await
    });
    match res {
        Ok(crate::run::Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(stopped @ crate::run::Stopped::Restart { .. }) => ExitCode::from(stopped.exit_code()),
        Err(e) => {
            // One line on stderr (journald keeps it); not repeated through the logger.
            eprintln!("nimbus-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
