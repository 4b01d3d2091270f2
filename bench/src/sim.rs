//! Shared pieces of the coordinator sections (CoordinatorScale, Enrollment): a real coordinator started
//! in-process inside a fresh network namespace, process CPU/RSS from `/proc`, percentiles.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

/// A coordinator started with `coordinator::start` in a temporary data dir. Everything binds inside the
/// network namespace of the thread that called [`Coord::start`] (sections run their whole body in a
/// namespace through `e2e::netns::Netns::run_in`, so every thread they create lives there too).
pub struct Coord {
    pub running: coordinator::Running,
    pub dir: tempfile::TempDir,
}

impl Coord {
    /// Starts a coordinator: enrollment on 127.0.0.1 (ephemeral port), WireGuard on 127.0.0.1, TUN `nimbus0`.
    pub async fn start() -> anyhow::Result<Coord> {
        let dir = tempfile::Builder::new()
            .prefix("nimbus-bench-coord-")
            .tempdir()
            .context("creating a temporary coordinator data dir")?;
        let data = dir.path().join("data");
        let settings = coordinator::config::Settings {
            data_dir: Some(data.clone()),
            enroll_listen: Some("127.0.0.1:0".into()),
            wg_listen: Some("127.0.0.1:0".into()),
            advertise_address: Some("127.0.0.1".into()),
            admin_socket: Some(dir.path().join("admin.sock")),
            tun_name: Some("nimbus0".into()),
            ..Default::default()
        };
        let config = coordinator::Config::resolve(coordinator::config::Settings::default(), settings)
            .map_err(|e| anyhow::anyhow!("coordinator configuration refused: {}", e.join("; ")))?;
        let running = coordinator::start(config)
            .await
            .context("starting the coordinator in-process (needs root: TUN device in a namespace)")?;
        Ok(Coord { running, dir })
    }

    /// The enrollment (TLS) address.
    pub fn enroll_addr(&self) -> SocketAddr {
        self.running.enroll_addr
    }

    /// The sled store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("state")
    }

    /// Drains and stops the coordinator (store flushed, TUN removed).
    pub async fn stop(self) -> tempfile::TempDir {
        self.running.shutdown().await;
        self.dir
    }
}

/// Runs `f` on a thread inside a fresh network namespace (deleted afterwards, also on error).
pub fn in_namespace<T: Send + 'static>(
    tag: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let name = format!("nb-{tag}-{}", std::process::id());
    let mut ns = e2e::netns::Netns::create(&name).with_context(|| format!("creating namespace {name} (needs root)"))?;
    let out = ns.run_in(f);
    let deleted = ns.delete();
    let out = out.with_context(|| format!("running in namespace {name}"))??;
    deleted.with_context(|| format!("deleting namespace {name}"))?;
    Ok(out)
}

/// Raises the soft open-files limit to the hard limit (10 000 streams need 10 000 sockets).
pub fn raise_nofile() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(NOFILE)");
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(NOFILE)");
        }
    }
    Ok(lim.rlim_cur)
}

/// CPU time (user + system) this process has used so far, all threads, including exited ones.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    let t = ticks(11) + ticks(12);
    Duration::from_micros(t * 1_000_000 / hz)
}

/// Resident set size of this process in bytes (`VmRSS`).
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Total size of the files under `dir` (apparent size).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The `p`-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// A multi-thread tokio runtime with `workers` workers named `name`.
pub fn runtime(name: &str, workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()
        .context("building a tokio runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
    }

    #[test]
    fn proc_figures_are_read() {
        assert!(process_rss() > 0);
        // Burn 100 ms of CPU (the clock ticks at 100 Hz).
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(x > 0);
        assert!(process_cpu() > Duration::ZERO);
    }
}
