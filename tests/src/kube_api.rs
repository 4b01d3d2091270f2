//! The Kubernetes API **TEST STAND-IN** (`nimbus-kube-api-stand-in`; not a Kubernetes API server) as a process
//! the end-to-end tests start, and the client the tests drive it with.
//!
//! No cluster can run on the test machines, so the coordinator's production kube-rs code talks to this
//! stateful stand-in instead, through an ordinary kubeconfig (`DIR/kubeconfig`, `server: http://ADDR`, bearer
//! token [`BEARER_TOKEN`]). It serves only the endpoints the coordinator uses (bootstrap-token Secrets in
//! `kube-system`, Nodes: get/list/merge-patch/strategic-merge-patch/delete, Pods: list by node, Eviction) and
//! answers anything else with 404 `stand-in: unsupported request METHOD PATH`.
//!
//! Files in the stand-in's directory `DIR`:
//! - `kubeconfig` — written (atomically, mode 0600) once the HTTP port is bound;
//! - `ready` — the `IP:PORT` it serves on, written last (atomically);
//! - `requests.jsonl` — one line per HTTP request: `{"method","path","query","content_type","body","status",
//!   "unsupported"}` (appended, also across restarts; it holds bootstrap-token secrets: mode 0600);
//! - `control.sock` — the control socket: one JSON request per line, one JSON reply per line
//!   (`{"ok":true,...}` / `{"ok":false,"error":"..."}`); ops `put_node`, `set_label`, `remove_label`,
//!   `set_taints`, `put_pod`, `state`. A Unix socket, so the test reaches it from any network namespace;
//! - `stand-in.log` — its stderr (tracing).
//!
//! [`KubeApiStandIn`] starts the process (optionally inside a [`Netns`]: the TCP port is then reachable only
//! there), waits for `ready`, and stops it on drop.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use serde_json::{Value, json};

use crate::env::{bin_dir, binary_in};
use crate::error::{HarnessError, Result};
use crate::netns::Netns;
use crate::process::{Process, STOP_GRACE};
use crate::wait::{Attempt, poll_until};

/// The stand-in binary's file name.
pub const KUBE_API_BIN: &str = "nimbus-kube-api-stand-in";
/// The bearer token every request must carry (`Authorization: Bearer stand-in-bearer-token`); it is in the
/// kubeconfig the stand-in writes. Not a secret: a fixed test value.
pub const BEARER_TOKEN: &str = "stand-in-bearer-token";
/// `DIR/kubeconfig`: the kubeconfig for the coordinator (and kube-rs in tests).
pub const KUBECONFIG_FILE: &str = "kubeconfig";
/// `DIR/ready`: the served address; written after everything else is set up.
pub const READY_FILE: &str = "ready";
/// `DIR/requests.jsonl`: every HTTP request, one JSON object per line.
pub const REQUESTS_FILE: &str = "requests.jsonl";
/// `DIR/control.sock`: the control socket.
pub const CONTROL_SOCKET: &str = "control.sock";
/// `DIR/stand-in.log`: the process's stdout and stderr.
pub const LOG_FILE: &str = "stand-in.log";
/// How long [`KubeApiStandIn::start`] waits for `DIR/ready`: 10 s.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout of one control request: 5 s.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// The kubeconfig the stand-in writes for `addr`: one cluster `server: http://ADDR`, one user with
/// [`BEARER_TOKEN`], current context set (the same shape as the in-test stand-in of `nimbus-kube`).
pub fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "# TEST STAND-IN kubeconfig written by {KUBE_API_BIN} (not a Kubernetes cluster)\n\
         apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n\
         current-context: stand-in\nusers:\n- name: stand-in\n  user:\n    token: {BEARER_TOKEN}\n"
    )
}

/// A pod for [`KubeApiStandIn::put_pod_with`]: `StandInPod::new("apps", "web-1", "n1").owner_kind("ReplicaSet")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandInPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.nodeName`.
    pub node: String,
    /// Kind of the controlling owner (`ReplicaSet`, `DaemonSet`, ...); `None`: a bare pod.
    pub owner_kind: Option<String>,
    /// A static (mirror) pod: annotated `kubernetes.io/config.mirror`.
    pub mirror: bool,
    /// How many eviction attempts a PodDisruptionBudget refuses (429) before one succeeds.
    pub pdb_blocked: u32,
}

impl StandInPod {
    /// A bare pod (no owner, not a mirror pod, evictable at once).
    pub fn new(namespace: &str, name: &str, node: &str) -> StandInPod {
        StandInPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: node.to_string(),
            owner_kind: None,
            mirror: false,
            pdb_blocked: 0,
        }
    }

    /// Owned (as controller) by a `kind` object.
    pub fn owner_kind(mut self, kind: &str) -> StandInPod {
        self.owner_kind = Some(kind.to_string());
        self
    }

    /// A static (mirror) pod.
    pub fn mirror(mut self) -> StandInPod {
        self.mirror = true;
        self
    }

    /// The next `times` evictions are refused with 429 TooManyRequests.
    pub fn pdb_blocked(mut self, times: u32) -> StandInPod {
        self.pdb_blocked = times;
        self
    }
}

/// A running `nimbus-kube-api-stand-in` (TEST STAND-IN for the Kubernetes API server). Dropping it stops the
/// process (SIGTERM, then SIGKILL after 5 s). The directory is left in place (the caller owns it).
#[derive(Debug)]
pub struct KubeApiStandIn {
    process: Process,
    dir: PathBuf,
    addr: SocketAddr,
}

impl KubeApiStandIn {
    /// Starts the stand-in from [`bin_dir`] in `ns` (the coordinator's namespace; `None`: this namespace) with
    /// its files in `dir` (created if missing), and waits up to [`READY_TIMEOUT`] for `DIR/ready`.
    pub fn start(ns: Option<&Netns>, dir: &Path) -> Result<KubeApiStandIn> {
        let program = binary_in(&bin_dir(), KUBE_API_BIN)?;
        KubeApiStandIn::start_with(&program, ns, dir)
    }

    /// Like [`KubeApiStandIn::start`] with an explicit binary (e.g. `env!("CARGO_BIN_EXE_nimbus-kube-api-stand-in")`).
    pub fn start_with(program: &Path, ns: Option<&Netns>, dir: &Path) -> Result<KubeApiStandIn> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| HarnessError::io(format!("resolving {}", dir.display()), e))?;
        // A previous run's files must not be taken for this one's.
        for stale in [READY_FILE, CONTROL_SOCKET] {
            let path = dir.join(stale);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(HarnessError::io(format!("removing stale {}", path.display()), e)),
            }
        }
        let mut builder = Process::builder("kube-api-stand-in", program, dir.join(LOG_FILE))
            .arg("--dir")
            .arg(&dir);
        if let Some(ns) = ns {
            builder = builder.netns(ns);
        }
        let process = builder.spawn()?;
        let ready = dir.join(READY_FILE);
        let addr = poll_until(
            &format!("{KUBE_API_BIN} to write {}", ready.display()),
            READY_TIMEOUT,
            Duration::from_millis(20),
            || {
                if let Some(status) = process.try_status() {
                    return Attempt::Fail(format!(
                        "it exited ({}); its log {}:\n{}",
                        Process::describe_status(Some(status)),
                        process.log_path().display(),
                        process.log()
                    ));
                }
                match std::fs::read_to_string(&ready) {
                    Ok(text) => match text.trim().parse::<SocketAddr>() {
                        Ok(addr) => Attempt::Done(addr),
                        Err(e) => Attempt::Fail(format!("{} holds {text:?}, not an address: {e}", ready.display())),
                    },
                    Err(e) => Attempt::Retry(format!("{}: {e}", ready.display())),
                }
            },
        )?;
        tracing::debug!(%addr, dir = %dir.display(), "kube API stand-in ready");
        Ok(KubeApiStandIn { process, dir, addr })
    }

    /// `DIR/kubeconfig`, for the coordinator's configuration (or `KubeCluster::from_kubeconfig`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join(KUBECONFIG_FILE)
    }

    /// The address it serves HTTP on (inside its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process (log, PID, signals).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// SIGTERM, wait up to 5 s (then SIGKILL); how it ended (exit 0 expected).
    pub fn stop(&self) -> Option<ExitStatus> {
        self.process.stop(STOP_GRACE)
    }

    /// Creates or replaces Node `name` as a kubelet registers it (`status.conditions` Ready=True, the labels
    /// `kubernetes.io/hostname`, `kubernetes.io/os`, `kubernetes.io/arch` unless given) with these labels and
    /// taints (`{"key", "value"?, "effect"}`).
    pub fn put_node(&self, name: &str, labels: &BTreeMap<String, String>, taints: &[Value]) -> Result<()> {
        self.control(json!({"op": "put_node", "name": name, "labels": labels, "taints": taints}))
            .map(drop)
    }

    /// Sets a label on an existing node (a hand-made change, as with `kubectl label`).
    pub fn set_label(&self, node: &str, key: &str, value: &str) -> Result<()> {
        self.control(json!({"op": "set_label", "name": node, "key": key, "value": value}))
            .map(drop)
    }

    /// Removes a label from an existing node (absent: no change).
    pub fn remove_label(&self, node: &str, key: &str) -> Result<()> {
        self.control(json!({"op": "remove_label", "name": node, "key": key}))
            .map(drop)
    }

    /// Replaces all taints of an existing node.
    pub fn set_taints(&self, node: &str, taints: &[Value]) -> Result<()> {
        self.control(json!({"op": "set_taints", "name": node, "taints": taints}))
            .map(drop)
    }

    /// Creates or replaces a running pod on `node` (a new uid each time), owned by a `owner_kind` controller
    /// if given.
    pub fn put_pod(&self, namespace: &str, name: &str, node: &str, owner_kind: Option<&str>) -> Result<()> {
        let mut pod = StandInPod::new(namespace, name, node);
        pod.owner_kind = owner_kind.map(str::to_string);
        self.put_pod_with(&pod)
    }

    /// [`KubeApiStandIn::put_pod`] with every option (mirror pod, PodDisruptionBudget refusals).
    pub fn put_pod_with(&self, pod: &StandInPod) -> Result<()> {
        self.control(json!({
            "op": "put_pod",
            "namespace": pod.namespace,
            "name": pod.name,
            "node": pod.node,
            "owner_kind": pod.owner_kind,
            "mirror": pod.mirror,
            "pdb_blocked": pod.pdb_blocked,
        }))
        .map(drop)
    }

    /// Everything stored: `{"ok": true, "nodes": {name: Node}, "pods": [Pod], "secrets": [name]}`.
    pub fn state(&self) -> Result<Value> {
        self.control(json!({"op": "state"}))
    }

    /// Node `name` as the API would return it, or `None`.
    pub fn node(&self, name: &str) -> Result<Option<Value>> {
        let state = self.state()?;
        Ok(state.get("nodes").and_then(|n| n.get(name)).cloned())
    }

    /// `DIR/requests.jsonl`, parsed (one value per HTTP request, in the order they were answered).
    pub fn requests(&self) -> Result<Vec<Value>> {
        let path = self.dir.join(REQUESTS_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| HarnessError::io(format!("reading {}", path.display()), e))?;
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line).map_err(|e| HarnessError::BadOutput {
                    what: format!("{} line {}", path.display(), i + 1),
                    reason: format!("not JSON ({e}); was the file written by something else?"),
                })
            })
            .collect()
    }

    /// The recorded requests the stand-in did not support (should be none for the coordinator).
    pub fn unsupported_requests(&self) -> Result<Vec<Value>> {
        Ok(self
            .requests()?
            .into_iter()
            .filter(|r| r.get("unsupported").and_then(Value::as_bool) == Some(true))
            .collect())
    }

    /// Sends one control request and returns the reply if it says `"ok": true`.
    pub fn control(&self, request: Value) -> Result<Value> {
        let op = request.get("op").and_then(Value::as_str).unwrap_or("?").to_string();
        let path = self.dir.join(CONTROL_SOCKET);
        let what = format!("{KUBE_API_BIN} control op {op} over {}", path.display());
        let io = |e: std::io::Error| HarnessError::io(what.clone(), e);
        let stream = UnixStream::connect(&path).map_err(io)?;
        stream.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
        let mut line = serde_json::to_string(&request).map_err(|e| HarnessError::BadOutput {
            what: what.clone(),
            reason: format!("request not serializable: {e}"),
        })?;
        line.push('\n');
        (&stream).write_all(line.as_bytes()).map_err(io)?;
        let mut reply = String::new();
        BufReader::new(&stream).read_line(&mut reply).map_err(io)?;
        let reply: Value = serde_json::from_str(reply.trim()).map_err(|e| HarnessError::BadOutput {
            what: what.clone(),
            reason: format!(
                "reply {reply:?} is not JSON: {e} (see {})",
                self.process.log_path().display()
            ),
        })?;
        if reply.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(reply)
        } else {
            let error = reply.get("error").and_then(Value::as_str).unwrap_or("no error given");
            Err(HarnessError::BadOutput {
                what,
                reason: format!("refused: {error}"),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_points_at_the_address_with_the_bearer_token() {
        let text = kubeconfig_yaml("127.0.0.1:4321".parse().unwrap());
        assert!(text.contains("server: http://127.0.0.1:4321\n"), "{text}");
        assert!(text.contains("token: stand-in-bearer-token\n"), "{text}");
        assert!(text.contains("current-context: stand-in\n"), "{text}");
    }

    #[test]
    fn pod_builder_sets_every_option() {
        let pod = StandInPod::new("apps", "db-0", "n1")
            .owner_kind("StatefulSet")
            .mirror()
            .pdb_blocked(2);
        assert_eq!(pod.owner_kind.as_deref(), Some("StatefulSet"));
        assert!(pod.mirror);
        assert_eq!(pod.pdb_blocked, 2);
    }
}
