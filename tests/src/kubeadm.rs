//! The kubeadm TEST STAND-IN (`kube/tests/fixtures/kubeadm-stand-in.sh`, not kubeadm) installed for one agent,
//! and a TEST STAND-IN for an operator's join-token command. No cluster can run here: the stand-in leaves the
//! files a real `kubeadm join` leaves (kubelet.conf naming the cluster joined) and records every call.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{HarnessError, Result};

fn executable(path: &Path, body: &str) -> Result<()> {
    std::fs::write(path, body).map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| HarnessError::io(format!("chmod {}", path.display()), e))
}

/// One agent's kubeadm stand-in: its own copy of the script, control file, kubernetes and kubelet dirs.
#[derive(Debug, Clone)]
pub struct KubeadmStandIn {
    dir: PathBuf,
}

impl KubeadmStandIn {
    /// Installs a stand-in in `dir` whose joins write a kubelet.conf for the endpoint in the join configuration.
    pub fn install(dir: &Path) -> Result<KubeadmStandIn> {
        std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let src = crate::env::workspace_dir().join("kube/tests/fixtures/kubeadm-stand-in.sh");
        let body =
            std::fs::read_to_string(&src).map_err(|e| HarnessError::io(format!("reading {}", src.display()), e))?;
        let s = KubeadmStandIn { dir: dir.to_path_buf() };
        executable(&s.binary(), &body)?;
        s.set_control(&[])?;
        Ok(s)
    }

    /// Rewrites the control file: the directories, `server=from-config`, then `extra` lines (e.g.
    /// `fail_at=preflight`).
    pub fn set_control(&self, extra: &[&str]) -> Result<()> {
        let mut text = format!(
            "kubernetes_dir={}\nkubelet_dir={}\nserver=from-config\n",
            self.kubernetes_dir().display(),
            self.kubelet_dir().display()
        );
        for l in extra {
            text.push_str(l);
            text.push('\n');
        }
        let path = self.dir.join("control");
        std::fs::write(&path, text).map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
    }

    pub fn binary(&self) -> PathBuf {
        self.dir.join("kubeadm")
    }

    pub fn kubernetes_dir(&self) -> PathBuf {
        self.dir.join("etc-kubernetes")
    }

    pub fn kubelet_dir(&self) -> PathBuf {
        self.dir.join("var-lib-kubelet")
    }

    /// The agent flags that make it use this stand-in.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--kubeadm".into(),
            self.binary().display().to_string(),
            "--kubernetes-dir".into(),
            self.kubernetes_dir().display().to_string(),
            "--kubelet-dir".into(),
            self.kubelet_dir().display().to_string(),
        ]
    }

    /// Every call, one argv per line.
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many `kubeadm join` calls were made.
    pub fn joins(&self) -> usize {
        self.calls().iter().filter(|l| l.starts_with("join ")).count()
    }

    /// How many `kubeadm reset` calls were made.
    pub fn resets(&self) -> usize {
        self.calls().iter().filter(|l| l.starts_with("reset")).count()
    }

    /// The configuration the `n`th join (from 1) was given, and its file mode (octal text).
    pub fn join_config(&self, n: usize) -> Option<(String, String)> {
        let config = std::fs::read_to_string(self.dir.join(format!("join-{n}.yaml"))).ok()?;
        let mode = std::fs::read_to_string(self.dir.join(format!("join-{n}.mode"))).ok()?;
        Some((config, mode.trim().to_string()))
    }

    /// The server the kubelet.conf names, if the node is joined.
    pub fn joined_server(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.kubernetes_dir().join("kubelet.conf")).ok()?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .map(str::to_string)
    }
}

/// TEST STAND-IN for an operator's `join_token_command`: a script at `path` printing a fresh kubeadm bootstrap
/// token per call and appending it to `minted.log` beside it (read with [`minted`]).
pub fn install_mint_command(path: &Path) -> Result<()> {
    executable(
        path,
        "#!/bin/sh\n# TEST STAND-IN for an operator's join-token command: prints a fresh kubeadm bootstrap token.\n\
         id=$(tr -dc a-z0-9 </dev/urandom | head -c 6)\nsecret=$(tr -dc a-z0-9 </dev/urandom | head -c 16)\n\
         echo \"$id.$secret\" >> \"$(dirname \"$0\")/minted.log\"\necho \"$id.$secret\"\n",
    )
}

/// The tokens the mint command at `path` printed so far.
pub fn minted(path: &Path) -> Vec<String> {
    let log = path.parent().map(|d| d.join("minted.log")).unwrap_or_default();
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}
