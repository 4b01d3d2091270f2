//! A real etcd (Debian's etcd-server, `/usr/bin/etcd`) for the end-to-end tests and benchmarks: one member
//! listening on loopback — of a lab namespace (the coordinator's, fixed ports) or of this one (free ports) —,
//! plain HTTP, data in the test's work dir. [`Etcd::start_reachable`] also listens on the host's underlay
//! address, so coordinator replicas in other namespaces of the lab reach it at [`Etcd::endpoint`]. Started and
//! killed by PID through [`Process`]; [`Etcd::restart`] keeps the data dir (a restarted etcd has the same state).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::Netns;
use crate::process::Process;
use crate::wait::{Attempt, poll_until};
use crate::{HarnessError, Result};

/// Where Debian installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";
/// Client and peer ports inside a lab namespace.
pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// A single-member etcd in a namespace.
#[derive(Debug)]
pub struct Etcd {
    /// The lab namespace, or `None`: this process's.
    ns: Option<String>,
    /// Also listen on this address of the namespace (its underlay IP), see [`Etcd::start_reachable`].
    listen_ip: Option<Ipv4Addr>,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    process: Option<Process>,
    starts: usize,
}

impl Etcd {
    /// Whether etcd is installed; when it is not and `NIMBUS_REQUIRE_ROOT_TESTS=1`, panics saying what to install.
    pub fn available() -> bool {
        if Path::new(ETCD).exists() {
            return true;
        }
        assert!(
            std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() != Ok("1"),
            "{ETCD} is missing but NIMBUS_REQUIRE_ROOT_TESTS=1: install etcd-server (apt-get install etcd-server)"
        );
        eprintln!("NOTE: skipping: {ETCD} not found (install etcd-server to run this test)");
        false
    }

    /// Starts etcd in `ns` with its data and log under `dir`, and waits until it answers `/health`.
    pub fn start(ns: &Netns, dir: &Path) -> Result<Etcd> {
        Etcd::start_in(ns, None, dir)
    }

    /// [`Etcd::start`], listening on the namespace's loopback **and** on `ip` (the host's underlay address,
    /// which must already be configured in `ns`): processes in other namespaces of the lab reach it at
    /// [`Etcd::endpoint`] (`http://IP:2379`), those in `ns` also at [`Etcd::local_endpoint`].
    pub fn start_reachable(ns: &Netns, ip: Ipv4Addr, dir: &Path) -> Result<Etcd> {
        Etcd::start_in(ns, Some(ip), dir)
    }

    fn start_in(ns: &Netns, listen_ip: Option<Ipv4Addr>, dir: &Path) -> Result<Etcd> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let mut etcd = Etcd {
            ns: Some(ns.name().to_string()),
            listen_ip,
            client_port: CLIENT_PORT,
            peer_port: PEER_PORT,
            dir: dir.to_path_buf(),
            process: None,
            starts: 0,
        };
        etcd.spawn(Some(ns))?;
        Ok(etcd)
    }

    /// Starts etcd on this namespace's loopback on free ports (benchmarks and tests without a lab).
    pub fn start_local(dir: &Path) -> Result<Etcd> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let port = || -> Result<u16> {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| HarnessError::io("finding a free port", e))
        };
        let mut etcd = Etcd {
            ns: None,
            listen_ip: None,
            client_port: port()?,
            peer_port: port()?,
            dir: dir.to_path_buf(),
            process: None,
            starts: 0,
        };
        etcd.spawn(None)?;
        Ok(etcd)
    }

    /// The client URL: `http://IP:PORT` for [`Etcd::start_reachable`] (reachable from the whole lab), else
    /// the loopback one (inside the namespace for [`Etcd::start`]).
    pub fn endpoint(&self) -> String {
        match self.listen_ip {
            Some(ip) => format!("http://{ip}:{}", self.client_port),
            None => self.local_endpoint(),
        }
    }

    /// The loopback client URL (inside etcd's namespace).
    pub fn local_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Whether etcd runs now (false after [`Etcd::kill`]).
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(Process::is_running)
    }

    /// The current run's log file (`etcd-N.log` under the dir given at start), for failure messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("etcd-{}.log", self.starts))
    }

    fn spawn(&mut self, ns: Option<&Netns>) -> Result<()> {
        let local = self.local_endpoint();
        let (listen, advertise) = match self.listen_ip {
            Some(_) => (format!("{local},{}", self.endpoint()), self.endpoint()),
            None => (local.clone(), local),
        };
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        self.starts += 1;
        let log = self.dir.join(format!("etcd-{}.log", self.starts));
        let data = self.dir.join("data");
        let mut builder = Process::builder("etcd", ETCD, &log);
        if let Some(ns) = &self.ns {
            builder = builder.netns_name(ns.clone());
        }
        let process = builder
            .args(["--name", "default", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &listen, "--advertise-client-urls", &advertise])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .spawn()?;
        self.process = Some(process);
        let addr = format!("127.0.0.1:{}", self.client_port);
        poll_until(
            "etcd to answer /health",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                if let Some(p) = &self.process
                    && let Some(status) = p.try_status()
                {
                    return Attempt::Fail(format!(
                        "etcd exited ({}); its log:\n{}",
                        Process::describe_status(Some(status)),
                        p.log()
                    ));
                }
                let health = match ns {
                    Some(ns) => crate::scrape::http_get(ns, &addr, "/health"),
                    None => crate::scrape::http_get_here(&addr, "/health"),
                };
                match health {
                    Ok(r) if r.contains("\"health\":\"true\"") => Attempt::Done(()),
                    Ok(r) => Attempt::Retry(r),
                    Err(e) => Attempt::Retry(e),
                }
            },
        )
    }

    /// Kills etcd (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.kill9();
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// Kills and starts etcd again on the same data dir (`ns`: the one it was started in, if any).
    pub fn restart(&mut self, ns: Option<&Netns>) -> Result<()> {
        self.kill();
        self.spawn(ns)
    }

    /// Starts etcd again on the same data dir after [`Etcd::kill`] (`ns`: the one it was started in, if any);
    /// misuse while it still runs.
    pub fn start_again(&mut self, ns: Option<&Netns>) -> Result<()> {
        if self.is_running() {
            return Err(HarnessError::Misuse(
                "etcd still runs: kill it first (or use Etcd::restart)".into(),
            ));
        }
        self.spawn(ns)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
