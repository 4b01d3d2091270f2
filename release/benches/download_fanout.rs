//! Issue 9's download benchmark (not a test): one 32 MiB agent artefact fetched by 1, 10 and 50 agents at once.
//!
//! A repository is made with `repo::init` + `repo::add_target` in a temporary directory and served by
//! `release::serve::serve` on loopback, in a child process (this binary run again with `--serve-repo DIR`) so the
//! server's memory is measured on its own. Each client is what an agent runs: `Releases::load` (the full TUF
//! metadata chain, into its own fresh datastore) then `Releases::fetch` over `HttpRangeTransport` into a file
//! (streamed, SHA-256 checked, fsynced, renamed), all clients concurrently on this process's tokio runtime.
//!
//! Per run: clients, MiB downloaded, wall time, aggregate MiB/s, p50/p99 client time (nearest rank: with 50
//! clients p99 is the slowest), and the peak RSS growth of the server process and of this (client) process:
//! `VmHWM` is reset through `/proc/PID/clear_refs` before the run and read after it, minus `VmRSS` before.
//! A markdown table comes last.
//!
//! Run: `cargo bench -p nimbus-release --bench download_fanout`. Without `--bench` on its command line (a
//! `cargo test --benches` smoke run) it downloads 1 MiB to 1 and 2 clients only.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use release::keys::{self, OnlineKeys};
use release::repo::{self, Expiries};
use release::{AgentRelease, ArtefactKind, HttpRangeTransport, Releases, RepoServer};
use tokio::io::AsyncReadExt;
use url::Url;

type BoxError = Box<dyn Error + Send + Sync>;

/// First argument that turns this binary into the server child.
const SERVE_ARG: &str = "--serve-repo";
const MIB: u64 = 1 << 20;

// ---- /proc ---------------------------------------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (`pid` may be `self`), in bytes.
fn status_bytes(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux 4.0+).
fn reset_peak(pid: &str) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        eprintln!("cannot reset the peak RSS of {pid} ({e}): its growth is then measured from an older peak");
    }
}

/// Memory of one process around a run.
struct Peak {
    pid: String,
    rss_before: u64,
}

impl Peak {
    fn start(pid: String) -> Peak {
        reset_peak(&pid);
        let rss_before = status_bytes(&pid, "VmRSS:").unwrap_or(0);
        Peak { pid, rss_before }
    }

    /// Peak RSS during the run minus RSS before it.
    fn growth(&self) -> u64 {
        status_bytes(&self.pid, "VmHWM:")
            .unwrap_or(0)
            .saturating_sub(self.rss_before)
    }
}

// ---- the server child ----------------------------------------------------------------------------------------

/// The child: serves `dir` on loopback, prints the address, stops when its stdin closes.
fn serve_child(dir: Option<&String>) -> ExitCode {
    let Some(dir) = dir else {
        eprintln!("{SERVE_ARG} needs the repository directory");
        return ExitCode::FAILURE;
    };
    let served = async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut out = std::io::stdout();
        writeln!(out, "{}", listener.local_addr()?)?;
        out.flush()?;
        let stdin_closed = async {
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
        };
        release::serve::serve(listener, Arc::new(RepoServer::new(dir)), stdin_closed).await
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .and_then(|rt| rt.block_on(served));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("release server child: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The server child; closing its stdin stops it, and it is killed if it does not stop within 5 s.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(repo: &Path) -> Result<ServerProcess, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(SERVE_ARG)
            .arg(repo)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        match line.trim().parse() {
            Ok(addr) => Ok(ServerProcess { child, addr }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("the server child printed {line:?} instead of its address: {e}").into())
            }
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the repository and the clients --------------------------------------------------------------------------

struct Repo {
    dir: PathBuf,
    pinned: Vec<u8>,
    target: String,
    length: u64,
}

/// Keys, `init`, and one artefact of `size` pseudo-random bytes published with `add_target`.
async fn make_repo(work: &Path, size: u64) -> Result<Repo, BoxError> {
    let root_key = work.join("offline/root.pem");
    keys::generate_key(&root_key)?;
    let online = OnlineKeys::generate(&work.join("coordinator/keys"))?;
    let dir = work.join("coordinator/releases");
    let init = repo::init(&root_key, &online, &dir, &Expiries::default()).await?;

    let build = work.join("build");
    std::fs::create_dir_all(&build)?;
    let artefact = build.join("nimbus-agent-1.0.0-x86_64");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&artefact, bytes)?;
    let release = AgentRelease {
        version: semver::Version::new(1, 0, 0),
        kind: ArtefactKind::Binary,
        arch: "x86_64".into(),
    };
    let published = repo::add_target(&dir, &online, &artefact, &release, &Expiries::default()).await?;
    std::fs::remove_file(&artefact)?;
    Ok(Repo {
        pinned: std::fs::read(&init.root_json)?,
        dir,
        target: published.release.target,
        length: published.release.length,
    })
}

/// One agent: load and verify the metadata into a fresh datastore, fetch the artefact, delete it again.
async fn client(repo: Arc<Repo>, addr: SocketAddr, home: PathBuf) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let metadata = Url::parse(&format!("http://{addr}/metadata/"))?;
    let targets = Url::parse(&format!("http://{addr}/targets/"))?;
    std::fs::create_dir_all(&home)?;
    let releases = Releases::load(
        &repo.pinned,
        HttpRangeTransport::new(),
        metadata,
        targets,
        &home.join("ds"),
    )
    .await?;
    let dest = home.join("nimbus-agent");
    let info = releases.fetch(&repo.target, &dest).await?;
    let took = start.elapsed();
    let on_disk = std::fs::metadata(&dest)?.len();
    if info.length != repo.length || on_disk != repo.length {
        return Err(format!("fetched {on_disk} bytes, the release lists {}", repo.length).into());
    }
    std::fs::remove_dir_all(&home)?;
    Ok(took)
}

struct Row {
    clients: usize,
    total_bytes: u64,
    wall: Duration,
    p50: Duration,
    p99: Duration,
    server_growth: u64,
    client_growth: u64,
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[Duration], p: f64) -> Duration {
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or_default()
}

async fn run(repo: &Arc<Repo>, server: &ServerProcess, work: &Path, clients: usize) -> Result<Row, BoxError> {
    let server_mem = Peak::start(server.pid());
    let client_mem = Peak::start("self".into());
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let home = work.join(format!("agents-{clients}/agent-{i:02}"));
            tokio::spawn(client(Arc::clone(repo), server.addr, home))
        })
        .collect();
    let mut times = Vec::with_capacity(clients);
    for task in tasks {
        times.push(task.await??);
    }
    let wall = start.elapsed();
    times.sort();
    Ok(Row {
        clients,
        total_bytes: repo.length * clients as u64,
        wall,
        p50: percentile(&times, 0.50),
        p99: percentile(&times, 0.99),
        server_growth: server_mem.growth(),
        client_growth: client_mem.growth(),
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn table(rows: &[Row], artefact: u64, server_rss: u64) {
    println!();
    println!(
        "Release download fan-out: one {:.0} MiB artefact, loopback, server in its own process (RSS {:.1} MiB idle).",
        mib(artefact),
        mib(server_rss)
    );
    println!();
    println!(
        "| clients | total MiB | wall | aggregate MiB/s | p50 client | p99 client | server peak RSS growth | client process peak RSS growth |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.2} s | {:.0} | {:.2} s | {:.2} s | {:.1} MiB | {:.1} MiB |",
            r.clients,
            mib(r.total_bytes),
            r.wall.as_secs_f64(),
            mib(r.total_bytes) / r.wall.as_secs_f64(),
            r.p50.as_secs_f64(),
            r.p99.as_secs_f64(),
            mib(r.server_growth),
            mib(r.client_growth),
        );
    }
    println!();
    println!(
        "client time = Releases::load (cold datastore) + fetch (streamed, SHA-256 verified, fsynced, renamed); \
         p99 is nearest-rank (the slowest client at 50); RSS growth = VmHWM during the run (reset via \
         /proc/PID/clear_refs) minus VmRSS before it. All clients share this process, so the client column \
         covers all of them; the server column is the server alone."
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(SERVE_ARG) {
        return serve_child(args.get(2));
    }
    let bench = args.iter().any(|a| a == "--bench");
    let (size, fanouts): (u64, &[usize]) = if bench {
        (32 * MIB, &[1, 10, 50])
    } else {
        (MIB, &[1, 2])
    };
    match bench_main(size, fanouts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("download_fanout failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench_main(size: u64, fanouts: &[usize]) -> Result<(), BoxError> {
    let work = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let repo = Arc::new(rt.block_on(make_repo(work.path(), size))?);
    let server = ServerProcess::start(&repo.dir)?;
    let server_rss = status_bytes(&server.pid(), "VmRSS:").unwrap_or(0);
    let mut rows = Vec::new();
    for &clients in fanouts {
        let row = rt.block_on(run(&repo, &server, work.path(), clients))?;
        eprintln!(
            "{clients} client(s): {:.0} MiB in {:.2} s",
            mib(row.total_bytes),
            row.wall.as_secs_f64()
        );
        rows.push(row);
    }
    drop(server);
    table(&rows, repo.length, server_rss);
    if fanouts.len() < 3 {
        println!("(smoke run without `--bench`: 1 MiB, 1 and 2 clients, not a measurement)");
    }
    Ok(())
}
