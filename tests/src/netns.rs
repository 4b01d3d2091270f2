//! Network namespaces: create, run commands inside, delete (idempotently) on drop.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{HarnessError, Result};
use crate::process::{pid_alive, run_checked};

/// Where `ip netns` keeps its bind mounts.
pub const NETNS_DIR: &str = "/run/netns";

/// Prefix of every namespace the test harness names itself (`nbe2e-PID-N`). The lab uses its own prefix.
pub const TEST_PREFIX: &str = "nbe2e";

/// Longest network interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this process and call: `nbe2e-<pid>-<n>`.
pub fn unique_prefix() -> String {
    format!(
        "{TEST_PREFIX}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Checks that `name` can be a network interface name (1..=15 bytes, no '/', whitespace or ':').
pub fn check_ifname(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(HarnessError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > MAX_IFNAME {
        return bad("interface names must be 1 to 15 bytes long");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) || name == "." || name == ".." {
        return bad("interface names may not contain '/', ':' or whitespace");
    }
    Ok(())
}

fn check_nsname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(HarnessError::InvalidName {
            name: name.to_string(),
            reason: "namespace names are 1-200 of [A-Za-z0-9._-], not starting with '.'".into(),
        })
    }
}

/// A named network namespace (`ip netns add`). Dropping it deletes it unless [`Netns::persist`] was called.
#[derive(Debug)]
pub struct Netns {
    name: String,
    delete_on_drop: bool,
}

impl Netns {
    /// Creates namespace `name`; fails with [`HarnessError::NamespaceExists`] if it is already there.
    pub fn create(name: &str) -> Result<Netns> {
        check_nsname(name)?;
        if Netns::exists(name) {
            return Err(HarnessError::NamespaceExists(name.to_string()));
        }
        run_checked(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_string(),
            delete_on_drop: true,
        };
        // A fresh namespace has lo down; almost everything wants it up.
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Adopts an existing namespace without taking ownership (it is not deleted on drop).
    pub fn existing(name: &str) -> Result<Netns> {
        check_nsname(name)?;
        Ok(Netns {
            name: name.to_string(),
            delete_on_drop: false,
        })
    }

    /// Whether a namespace called `name` exists.
    pub fn exists(name: &str) -> bool {
        Path::new(NETNS_DIR).join(name).exists()
    }

    /// Names of all namespaces (`ip netns list`, first column).
    pub fn list() -> Result<Vec<String>> {
        let out = run_checked(Command::new("ip").args(["netns", "list"]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A [`Command`] running `program` inside the namespace (`ip netns exec NAME program`).
    pub fn exec(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip -n NAME <args>` and fails unless it succeeds; returns stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = run_checked(Command::new("ip").args(["-n", &self.name]).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// PIDs of processes in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }

    /// Binds a TCP listener at `addr` inside the namespace (the socket stays in the namespace).
    ///
    /// Uses a short-lived thread that `setns`es, so the calling thread's namespace is untouched.
    pub fn bind_tcp(&self, addr: SocketAddr) -> Result<TcpListener> {
        let name = self.name.clone();
        self.run_in(move || TcpListener::bind(addr))?
            .map_err(|e| HarnessError::io(format!("binding {addr} in namespace {name}"), e))
    }

    /// Run `f` on a short-lived thread that has entered this namespace, so the
    /// sockets it creates live here (e.g. a gRPC client that must use an
    /// agent's tunnel).
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let file = std::fs::File::open(&path)
            .map_err(|e| HarnessError::io(format!("opening namespace {}", path.display()), e))?;
        let name = self.name.clone();
        let joined = std::thread::spawn(move || -> Result<T> {
            // SAFETY: setns on a valid, open namespace fd affects only this (short-lived) thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(HarnessError::io(
                    format!("entering namespace {name}"),
                    std::io::Error::last_os_error(),
                ));
            }
            Ok(f())
        })
        .join();
        joined.unwrap_or_else(|_| {
            Err(HarnessError::io(
                "running in namespace",
                std::io::Error::other("thread in namespace panicked"),
            ))
        })
    }

    /// Runs the future `f` makes on a fresh current-thread tokio runtime inside the namespace (a client that must
    /// reach an address only the namespace routes, e.g. through an agent's tunnel).
    pub fn block_on<T, Fut, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = T>,
        F: FnOnce() -> Fut + Send + 'static,
    {
        self.run_in(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(f()))
        })?
        .map_err(|e| HarnessError::io("starting a tokio runtime in the namespace", e))
    }

    /// `ping -c1 -W2 IP` from inside the namespace; the error is ping's output.
    pub fn ping(&self, ip: std::net::IpAddr) -> std::result::Result<(), String> {
        let out = crate::process::run_with_timeout(
            self.exec("ping").args(["-c1", "-W2", &ip.to_string()]),
            std::time::Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ping {ip} from {} failed ({}): {}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Opens a TCP connection to `addr` from inside the namespace (`timeout 3 bash -c 'echo > /dev/tcp/..'`).
    /// `Ok(())` if the connection was established; the error says how it failed (refused, timed out, ...).
    pub fn tcp_connect(&self, addr: SocketAddr) -> std::result::Result<(), String> {
        let script = format!("echo > /dev/tcp/{}/{}", addr.ip(), addr.port());
        let out = crate::process::run_with_timeout(
            self.exec("timeout").args(["3", "bash", "-c", &script]),
            std::time::Duration::from_secs(10),
        )
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            let why = match out.status.code() {
                Some(124) => "timed out after 3s".to_string(),
                _ => String::from_utf8_lossy(&out.stderr).trim().to_string(),
            };
            Err(format!("TCP connect to {addr} from {} failed: {why}", self.name))
        }
    }

    /// Keeps the namespace after this value is dropped (for the lab) and returns its name.
    pub fn persist(mut self) -> String {
        self.delete_on_drop = false;
        std::mem::take(&mut self.name)
    }

    /// Deletes the namespace now. Idempotent: a namespace that is already gone is fine.
    pub fn delete(&mut self) -> Result<()> {
        let result = delete_netns(&self.name);
        self.delete_on_drop = false;
        result
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.delete_on_drop
            && let Err(e) = delete_netns(&self.name)
        {
            eprintln!("nimbus-e2e: warning: {e}");
        }
    }
}

/// Deletes namespace `name`; a missing namespace is not an error.
pub fn delete_netns(name: &str) -> Result<()> {
    if !Netns::exists(name) {
        return Ok(());
    }
    match run_checked(Command::new("ip").args(["netns", "delete", name])) {
        Ok(_) => Ok(()),
        Err(_) if !Netns::exists(name) => Ok(()),
        Err(e) => Err(e),
    }
}

/// PIDs of processes whose network namespace is `name`.
pub fn pids_in(name: &str) -> Vec<u32> {
    run_checked(Command::new("ip").args(["netns", "pids", name]))
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes namespaces left by test runs that died without cleaning up: `nbe2e-PID-N-*` whose PID is gone and
/// which hold no processes. Returns the names deleted. Lab namespaces (another prefix) are never touched.
pub fn reap_stale_test_namespaces() -> Vec<String> {
    let Ok(names) = Netns::list() else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for name in names {
        let Some(owner) = stale_owner_pid(&name) else {
            continue;
        };
        if owner == std::process::id() || pid_alive(owner) || !pids_in(&name).is_empty() {
            continue;
        }
        if delete_netns(&name).is_ok() {
            reaped.push(name);
        }
    }
    reaped
}

/// The PID embedded in a test namespace name (`nbe2e-<pid>-...`).
fn stale_owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEST_PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

/// Delete every namespace in order, trying them all even when one fails; the first error is returned.
pub fn delete_all<'a>(namespaces: impl IntoIterator<Item = &'a mut Netns>) -> Result<()> {
    let mut first_err = None;
    for ns in namespaces {
        if let Err(e) = ns.delete() {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_prefixes_differ_and_carry_the_pid() {
        let a = unique_prefix();
        let b = unique_prefix();
        assert_ne!(a, b);
        assert_eq!(stale_owner_pid(&format!("{a}-coord")), Some(std::process::id()));
        assert_eq!(stale_owner_pid("nlab-coord"), None);
        assert_eq!(stale_owner_pid("nbe2e-x-1"), None);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("eth0").is_ok());
        assert!(check_ifname("p123456789abcde").is_ok());
        assert!(check_ifname("p123456789abcdef").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
    }

    #[test]
    fn namespace_names_are_checked() {
        assert!(check_nsname("nbe2e-1-2-agent-3").is_ok());
        assert!(check_nsname("../etc").is_err());
        assert!(check_nsname("a b").is_err());
        assert!(check_nsname("").is_err());
    }
}
