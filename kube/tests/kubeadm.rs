//! `Kubeadm` against the TEST STAND-IN `tests/fixtures/kubeadm-stand-in.sh` (not kubeadm): a shell script
//! that records its argv and the config it was given, leaves kubeadm-like traces in temporary directories,
//! and can be told to fail in a phase. The code path is the production one: `Kubeadm::binary` points at it.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_kube::KubeError;
use nimbus_kube::join::{self, ApiVersion, JoinParams};
use nimbus_kube::kubeadm::{JoinOutcome, JoinState, Kubeadm, RetryPolicy};
use nimbus_kube::token::BootstrapToken;

const TOKEN: &str = "abcdef.0123456789abcdef";
const SECRET: &str = "0123456789abcdef";
const SERVER: &str = "https://10.20.0.1:6443";
const ENDPOINT: &str = "10.20.0.1:6443";

/// A temporary host: the stand-in copied with its control file, and kubeadm's directories.
struct Host {
    dir: tempfile::TempDir,
    kubeadm: Kubeadm,
}

impl Host {
    fn new(control: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let script = bin.join("kubeadm");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubeadm-stand-in.sh"),
            &script,
        )
        .unwrap();
        let kubeadm = Kubeadm {
            binary: script,
            kubernetes_dir: dir.path().join("etc-kubernetes"),
            kubelet_dir: dir.path().join("var-lib-kubelet"),
            failure_marker: dir.path().join("state/kubeadm-join-failed"),
        };
        let host = Host { dir, kubeadm };
        host.control(control);
        host
    }

    fn control(&self, extra: &str) {
        let body = format!(
            "kubernetes_dir={}\nkubelet_dir={}\nserver={SERVER}\n{extra}",
            self.kubeadm.kubernetes_dir.display(),
            self.kubeadm.kubelet_dir.display()
        );
        std::fs::write(self.bin("control"), body).unwrap();
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.dir.path().join("bin").join(name)
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.bin("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("state/join.yaml")
    }

    fn write(&self, rel: &str, body: &str) {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
}

fn params(token: &str) -> JoinParams {
    JoinParams {
        node_name: "edge-fra-1".into(),
        api_endpoint: ENDPOINT.into(),
        ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
        token: BootstrapToken::parse(token).unwrap(),
        labels: BTreeMap::from([("polynimbus.io/pool".into(), "edge".into())]),
        taints: vec![],
        kubelet_extra_args: BTreeMap::new(),
    }
}

/// Captures this thread's log output (the tests run on a current-thread runtime).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn start() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

async fn write_and_join(host: &Host, token: &str) -> Result<nimbus_kube::kubeadm::JoinReport, KubeError> {
    let p = params(token);
    let yaml = join::render(&p, ApiVersion::V1beta4).unwrap();
    join::write_config(&host.config_path(), &yaml).unwrap();
    host.kubeadm
        .join(&host.config_path(), &p.token, Duration::from_secs(20))
        .await
}

#[tokio::test]
async fn join_succeeds_streams_redacted_output_and_leaves_a_joined_host() {
    let host = Host::new("");
    assert_eq!(host.kubeadm.state(ENDPOINT), JoinState::NotJoined);
    let (logs, _guard) = Logs::start();

    let report = write_and_join(&host, TOKEN).await.unwrap();

    assert_eq!(report.last_phase.as_deref(), Some("kubelet-start"));
    assert_eq!(
        report.output_tail.last().map(String::as_str),
        Some("* Certificate signing request was sent to apiserver and a response was received.")
    );
    assert!(
        report
            .output_tail
            .iter()
            .any(|l| l == "[preflight] Discovering cluster-info with token abcdef.<redacted>")
    );
    assert!(report.output_tail.iter().all(|l| !l.contains(SECRET)));

    // kubeadm was called exactly once, with our config file, which was 0600 and what we rendered.
    assert_eq!(
        host.calls(),
        vec![format!("join --config {}", host.config_path().display())]
    );
    assert_eq!(std::fs::read_to_string(host.bin("join-1.mode")).unwrap().trim(), "600");
    assert_eq!(
        std::fs::read_to_string(host.bin("join-1.yaml")).unwrap(),
        join::render(&params(TOKEN), ApiVersion::V1beta4).unwrap()
    );

    // Its output went to the log, redacted.
    let text = logs.text();
    assert!(
        text.contains("[preflight] Discovering cluster-info with token abcdef.<redacted>"),
        "{text}"
    );
    assert!(text.contains("This node has joined the cluster:"), "{text}");
    assert!(!text.contains(SECRET), "secret in the log: {text}");

    assert_eq!(
        host.kubeadm.state(ENDPOINT),
        JoinState::Joined { server: SERVER.into() }
    );
    assert_eq!(host.kubeadm.state(SERVER), JoinState::Joined { server: SERVER.into() });
    assert!(!host.kubeadm.failure_marker.exists());
}

#[tokio::test]
async fn join_failing_in_a_phase_reports_it_redacted_and_leaves_a_half_joined_host() {
    let host = Host::new("fail_at=kubelet-start\n");
    let (logs, _guard) = Logs::start();

    let err = write_and_join(&host, TOKEN).await.unwrap_err();

    let KubeError::JoinFailed { phase, exit, tail } = &err else {
        panic!("expected JoinFailed, got {err:?}")
    };
    assert_eq!(phase.as_deref(), Some("kubelet-start"));
    assert_eq!(*exit, Some(1));
    assert!(
        tail.iter()
            .any(|l| l == "error execution phase kubelet-start: stand-in told to fail here (token abcdef.<redacted>)"),
        "{tail:?}"
    );
    assert!(tail.iter().all(|l| !l.contains(SECRET)), "{tail:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("in phase [kubelet-start]") && msg.contains("exit code 1"),
        "{msg}"
    );
    assert!(!msg.contains(SECRET) && !format!("{err:?}").contains(SECRET));
    assert!(!logs.text().contains(SECRET));

    assert!(host.kubeadm.failure_marker.exists());
    match host.kubeadm.state(ENDPOINT) {
        JoinState::HalfJoined { evidence } => {
            assert!(evidence.contains("pki/ca.crt"), "{evidence}");
            assert!(evidence.contains("the last join failed"), "{evidence}");
        }
        other => panic!("expected HalfJoined, got {other:?}"),
    }
}

#[tokio::test]
async fn join_failing_in_preflight_is_half_joined_through_the_marker_only() {
    let host = Host::new("fail_at=preflight\n");
    let err = write_and_join(&host, TOKEN).await.unwrap_err();
    assert!(
        matches!(&err, KubeError::JoinFailed { phase: Some(p), exit: Some(1), .. } if p == "preflight"),
        "{err:?}"
    );
    let marker = host.kubeadm.failure_marker.display().to_string();
    assert_eq!(
        host.kubeadm.state(ENDPOINT),
        JoinState::HalfJoined {
            evidence: format!("no kubelet.conf, but the last join failed ({marker})")
        }
    );
}

#[tokio::test]
async fn join_that_hangs_is_killed_at_the_timeout() {
    let host = Host::new("hang=1\n");
    let p = params(TOKEN);
    join::write_config(&host.config_path(), &join::render(&p, ApiVersion::V1beta3).unwrap()).unwrap();
    let started = std::time::Instant::now();
    let err = host
        .kubeadm
        .join(&host.config_path(), &p.token, Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(&err, KubeError::JoinFailed { phase: Some(p), exit: None, .. } if p == "preflight"),
        "{err:?}"
    );
    assert!(err.to_string().contains("killed"), "{err}");
}

#[test]
fn state_from_the_kubernetes_dir() {
    let host = Host::new("");
    let k = &host.kubeadm;
    assert_eq!(k.state(ENDPOINT), JoinState::NotJoined);

    host.write("var-lib-kubelet/config.yaml", "kind: KubeletConfiguration\n");
    match k.state(ENDPOINT) {
        JoinState::HalfJoined { evidence } => assert!(evidence.ends_with("var-lib-kubelet/config.yaml"), "{evidence}"),
        other => panic!("{other:?}"),
    }

    let kubelet_conf =
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://10.20.0.1:6443\n";
    host.write("etc-kubernetes/kubelet.conf", kubelet_conf);
    assert_eq!(k.state(ENDPOINT), JoinState::Joined { server: SERVER.into() });
    assert_eq!(
        k.state("https://10.20.0.1:6443/"),
        JoinState::Joined { server: SERVER.into() }
    );

    // Joined to another cluster: not ours, reset needed.
    match k.state("10.99.0.1:6443") {
        JoinState::HalfJoined { evidence } => {
            assert!(
                evidence.contains("points at https://10.20.0.1:6443 instead of 10.99.0.1:6443"),
                "{evidence}"
            )
        }
        other => panic!("{other:?}"),
    }

    host.write("etc-kubernetes/kubelet.conf", "clusters: [[[\n");
    match k.state(ENDPOINT) {
        JoinState::HalfJoined { evidence } => assert!(evidence.contains("cannot be read"), "{evidence}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reset_runs_kubeadm_reset_force_and_clears_the_traces() {
    let host = Host::new("fail_at=kubelet-check\n");
    write_and_join(&host, TOKEN).await.unwrap_err();
    assert!(matches!(host.kubeadm.state(ENDPOINT), JoinState::HalfJoined { .. }));

    host.kubeadm.reset(Duration::from_secs(20)).await.unwrap();

    assert_eq!(host.calls()[1], "reset --force");
    assert_eq!(host.kubeadm.state(ENDPOINT), JoinState::NotJoined);
    assert!(!host.kubeadm.failure_marker.exists());
}

#[tokio::test]
async fn reset_failure_is_reported() {
    let host = Host::new("reset_fail=1\n");
    let err = host.kubeadm.reset(Duration::from_secs(20)).await.unwrap_err();
    match err {
        KubeError::ResetFailed { exit, tail } => {
            assert_eq!(exit, Some(1));
            assert_eq!(tail.last().map(String::as_str), Some("stand-in: reset told to fail"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn ensure_joined_does_nothing_on_a_joined_host() {
    let host = Host::new("");
    host.write(
        "etc-kubernetes/kubelet.conf",
        "clusters:\n- name: c\n  cluster:\n    server: https://10.20.0.1:6443\n",
    );
    let out = host
        .kubeadm
        .ensure_joined(
            &params(TOKEN),
            ApiVersion::V1beta4,
            &host.config_path(),
            &RetryPolicy::default(),
            |_| async { panic!("no token needed") },
        )
        .await
        .unwrap();
    assert_eq!(out, JoinOutcome::AlreadyJoined { server: SERVER.into() });
    assert_eq!(host.calls(), Vec::<String>::new());
    assert!(!host.config_path().exists());
}

#[tokio::test]
async fn ensure_joined_resets_a_half_joined_host_and_retries_with_a_fresh_token() {
    // Half-joined from an earlier run, and the first join attempt fails in kubelet-start.
    let host = Host::new("fail_at=kubelet-start\nfail_times=1\n");
    host.write("etc-kubernetes/pki/ca.crt", "old CA\n");
    let fresh = "ghijkl.fedcba9876543210";
    let asked = Arc::new(Mutex::new(Vec::new()));
    let policy = RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        step_timeout: Duration::from_secs(20),
    };
    let asked2 = asked.clone();
    let out = host
        .kubeadm
        .ensure_joined(
            &params(TOKEN),
            ApiVersion::V1beta3,
            &host.config_path(),
            &policy,
            move |attempt| {
                asked2.lock().unwrap().push(attempt);
                async move { Ok(BootstrapToken::parse(fresh).unwrap()) }
            },
        )
        .await
        .unwrap();

    match out {
        JoinOutcome::Joined { attempts, report } => {
            assert_eq!(attempts, 2);
            assert_eq!(report.last_phase.as_deref(), Some("kubelet-start"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(*asked.lock().unwrap(), vec![2]);
    let config = host.config_path().display().to_string();
    assert_eq!(
        host.calls(),
        vec![
            "reset --force".to_owned(),
            format!("join --config {config}"),
            "reset --force".to_owned(),
            format!("join --config {config}"),
        ]
    );
    let first = std::fs::read_to_string(host.bin("join-1.yaml")).unwrap();
    let second = std::fs::read_to_string(host.bin("join-2.yaml")).unwrap();
    assert!(first.contains(&format!("token: {TOKEN}\n")), "{first}");
    assert!(second.contains(&format!("token: {fresh}\n")), "{second}");
    assert!(second.starts_with("apiVersion: kubeadm.k8s.io/v1beta3\n"));
    // The config (it holds the token) is gone after the join.
    assert!(!host.config_path().exists());
    assert_eq!(
        host.kubeadm.state(ENDPOINT),
        JoinState::Joined { server: SERVER.into() }
    );
}

#[tokio::test]
async fn ensure_joined_gives_up_after_the_attempts() {
    let host = Host::new("fail_at=preflight\n");
    let policy = RetryPolicy {
        attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
        step_timeout: Duration::from_secs(20),
    };
    let err = host
        .kubeadm
        .ensure_joined(
            &params(TOKEN),
            ApiVersion::V1beta4,
            &host.config_path(),
            &policy,
            |_| async { Ok(BootstrapToken::generate()) },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, KubeError::JoinFailed { phase: Some(p), .. } if p == "preflight"),
        "{err:?}"
    );
    let calls = host.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[1], "reset --force");
    assert!(!host.config_path().exists());
}

#[tokio::test]
async fn ensure_joined_refuses_bad_params_before_running_anything() {
    let host = Host::new("");
    let mut p = params(TOKEN);
    p.labels.insert("node-role.kubernetes.io/worker".into(), "".into());
    let err = host
        .kubeadm
        .ensure_joined(
            &p,
            ApiVersion::V1beta4,
            &host.config_path(),
            &RetryPolicy::default(),
            |_| async { Ok(BootstrapToken::generate()) },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, KubeError::ForbiddenKey { .. }), "{err:?}");
    assert!(host.calls().is_empty());
}

#[tokio::test]
async fn version_picks_the_config_api() {
    let host = Host::new("version=v1.30.4\n");
    let v = host.kubeadm.version(Duration::from_secs(10)).await.unwrap();
    assert_eq!(v, "v1.30.4");
    assert_eq!(ApiVersion::for_kubeadm_version(&v).unwrap(), ApiVersion::V1beta3);
    assert_eq!(host.calls(), vec!["version -o short"]);
}

#[tokio::test]
async fn missing_binary_is_a_spawn_error() {
    let k = Kubeadm::new("/nonexistent/kubeadm");
    let err = k.reset(Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(err, KubeError::Spawn { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/kubeadm"));
}
