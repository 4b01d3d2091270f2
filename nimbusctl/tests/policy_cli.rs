//! The policy commands end to end: the real `nimbusctl` binary against a fake Admin server on a Unix socket.
//! Checks what goes to stdout and stderr, the requests sent, and the exit codes (0, 1 refused, 65 invalid).
#![allow(clippy::unwrap_used)] // test helpers (outside #[test] fns) may unwrap: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use nimbus_proto::admin_server::{Admin, AdminServer};
use nimbus_proto::*;
use tonic::{Request, Response, Status};

const EXAMPLE: &str = include_str!("../../deploy/examples/policy.yaml");

#[derive(Default, Clone)]
struct Fake {
    applied: Arc<Mutex<Vec<ApplyPolicyRequest>>>,
    rollbacks: Arc<Mutex<Vec<RollbackPolicyRequest>>>,
    controls: Arc<Mutex<Vec<ControlRolloutRequest>>>,
    tokens: Arc<Mutex<Vec<CreateTokenRequest>>>,
    /// `get_policy` answers the example policy instead of a stub document.
    example_policy: bool,
}

const TOKEN: &str = "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv";

fn paused_rollout() -> RolloutStatus {
    RolloutStatus {
        active: true,
        revision: 5,
        phase: "paused".into(),
        current_wave: 1,
        pause_reason: "1 node(s) failed, more than max_failures = 0; last: n1: timed out".into(),
        total: 2,
        pending: 1,
        failed: 1,
        node_timeout_secs: 900,
        nodes: vec![
            RolloutNode {
                node_id: "n1".into(),
                name: "db-1".into(),
                pool: "performance".into(),
                zone: "a".into(),
                state: "failed: timed out".into(),
                wave: 1,
                started_unix: 1_700_000_000,
            },
            RolloutNode {
                node_id: "n2".into(),
                name: "db-2".into(),
                pool: "performance".into(),
                zone: "b".into(),
                state: "pending".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn move_db1() -> NodeChange {
    NodeChange {
        node: "db-1".into(),
        before_pool: "performance".into(),
        after_pool: "fast-nvme".into(),
        before_environment: "production".into(),
        after_environment: "production".into(),
        changes: vec![Change {
            what: "pool: performance -> fast-nvme".into(),
            disruptive: true,
        }],
        disruptive: true,
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Admin for Fake {
    async fn create_token(&self, req: Request<CreateTokenRequest>) -> R<CreateTokenResponse> {
        self.tokens.lock().unwrap().push(req.into_inner());
        Ok(Response::new(CreateTokenResponse {
            token: TOKEN.into(),
            token_id: "abcdefghij".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            expires_at_unix: 1_700_000_000,
            enroll_endpoints: vec!["192.0.2.1:7443".into()],
        }))
    }
    async fn list_tokens(&self, _: Request<ListTokensRequest>) -> R<ListTokensResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke_token(&self, _: Request<RevokeTokenRequest>) -> R<RevokeTokenResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn decommission_nodes(&self, _: Request<DecommissionRequest>) -> R<DecommissionResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn accept_node(&self, _: Request<AcceptNodeRequest>) -> R<Node> {
        Err(Status::unimplemented("fake"))
    }
    async fn install_release_repository(
        &self,
        _: Request<nimbus_proto::InstallReleaseRepositoryRequest>,
    ) -> R<nimbus_proto::ReleaseList> {
        Err(Status::unimplemented("fake"))
    }
    async fn add_release(
        &self,
        _: Request<tonic::Streaming<nimbus_proto::AddReleaseChunk>>,
    ) -> R<nimbus_proto::ReleaseList> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_releases(&self, _: Request<nimbus_proto::ListReleasesRequest>) -> R<nimbus_proto::ReleaseList> {
        Err(Status::unimplemented("fake"))
    }
    async fn start_upgrade(&self, _: Request<nimbus_proto::StartUpgradeRequest>) -> R<RolloutStatus> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_audit(&self, _: Request<nimbus_proto::ListAuditRequest>) -> R<nimbus_proto::ListAuditResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn rotate_key(&self, _: Request<nimbus_proto::RotateKeyRequest>) -> R<nimbus_proto::RotateKeyResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn who_am_i(&self, _: Request<nimbus_proto::WhoAmIRequest>) -> R<nimbus_proto::WhoAmIResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_replicas(
        &self,
        _: Request<nimbus_proto::ListReplicasRequest>,
    ) -> R<nimbus_proto::ListReplicasResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_rollout(&self, _: Request<GetRolloutRequest>) -> R<RolloutStatus> {
        Ok(Response::new(paused_rollout()))
    }
    async fn control_rollout(&self, req: Request<ControlRolloutRequest>) -> R<RolloutStatus> {
        let r = req.into_inner();
        self.controls.lock().unwrap().push(r.clone());
        match r.action.as_str() {
            "resume" => Ok(Response::new(RolloutStatus {
                phase: "running".into(),
                pause_reason: String::new(),
                ..paused_rollout()
            })),
            _ => Err(Status::failed_precondition("no rollout is running")),
        }
    }
    async fn list_nodes(&self, _: Request<ListNodesRequest>) -> R<ListNodesResponse> {
        Ok(Response::new(ListNodesResponse {
            nodes: vec![
                Node {
                    name: "db-1".into(),
                    id: "n1".into(),
                    state: "connected".into(),
                    placement: Some(Placement {
                        environment: "production".into(),
                        pool: "fast-nvme".into(),
                        cohorts: vec!["hub-enclave".into()],
                        ..Default::default()
                    }),
                    convergence: "pending".into(),
                    ..Default::default()
                },
                Node {
                    name: "stray".into(),
                    id: "n2".into(),
                    state: "lost".into(),
                    unplaced_reason: "matches no environment".into(),
                    ..Default::default()
                },
            ],
            policy_warnings: vec!["node \"stray\" is unplaced: matches no environment".into()],
            policy_revision: 4,
        }))
    }
    async fn get_node(&self, _: Request<GetNodeRequest>) -> R<Node> {
        Err(Status::unimplemented("fake"))
    }
    async fn revoke_node(&self, _: Request<RevokeNodeRequest>) -> R<RevokeNodeResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn latency(&self, _: Request<LatencyRequest>) -> R<LatencyMatrix> {
        Err(Status::unimplemented("fake"))
    }
    async fn plan_replication(&self, _: Request<PlanRequest>) -> R<PlanResponse> {
        Err(Status::unimplemented("fake"))
    }
    async fn apply_policy(&self, req: Request<ApplyPolicyRequest>) -> R<ApplyPolicyResponse> {
        let req = req.into_inner();
        self.applied.lock().unwrap().push(req.clone());
        if req.yaml.contains("bogus:") {
            return Err(Status::invalid_argument(format!(
                "{f}:1:1: unknown field `bogus` (hint: remove it)\n{f}:2:3: second problem (hint: fix it)",
                f = req.file_name
            )));
        }
        let changes = vec![move_db1()];
        Ok(Response::new(if req.dry_run {
            ApplyPolicyResponse {
                previous_revision: 4,
                changes,
                refused_disruptive: !req.allow_disruptive,
                digest: "sha256:feedfacecafe0000".into(),
                ..Default::default()
            }
        } else if !req.allow_disruptive {
            ApplyPolicyResponse {
                previous_revision: 4,
                changes,
                refused_disruptive: true,
                digest: "sha256:feedfacecafe0000".into(),
                ..Default::default()
            }
        } else {
            ApplyPolicyResponse {
                revision: 5,
                previous_revision: 4,
                changes,
                warnings: vec!["pool \"burst\" has 0 of at least 2 nodes in dev".into()],
                staged_in_waves: 1,
                digest: "sha256:feedfacecafe0000".into(),
                ..Default::default()
            }
        }))
    }
    async fn rollback_policy(&self, req: Request<RollbackPolicyRequest>) -> R<ApplyPolicyResponse> {
        let req = req.into_inner();
        self.rollbacks.lock().unwrap().push(req);
        if req.to_revision == 99 {
            return Err(Status::not_found(
                "no policy revision 99 (see `nimbusctl policy history`)",
            ));
        }
        Ok(Response::new(ApplyPolicyResponse {
            previous_revision: 5,
            unchanged: true,
            ..Default::default()
        }))
    }
    async fn list_policy_revisions(&self, _: Request<ListPolicyRevisionsRequest>) -> R<ListPolicyRevisionsResponse> {
        Ok(Response::new(ListPolicyRevisionsResponse {
            revisions: vec![PolicyRevision {
                revision: 4,
                digest: "sha256:feedfacecafe0000".into(),
                applied_by: "uid:0".into(),
                applied_at_unix: 1_700_000_000,
                action: "apply".into(),
                file_name: "policy.yaml".into(),
                nodes_changed: 3,
                ..Default::default()
            }],
        }))
    }
    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> R<PolicyRevision> {
        if self.example_policy {
            return Ok(Response::new(PolicyRevision {
                revision: 1,
                yaml: EXAMPLE.into(),
                ..Default::default()
            }));
        }
        match req.into_inner().revision {
            0 | 4 => Ok(Response::new(PolicyRevision {
                revision: 4,
                yaml: "version: 1\nenvironments: []".into(),
                ..Default::default()
            })),
            n => Err(Status::not_found(format!("no policy revision {n}"))),
        }
    }
}

/// The fake server on its own runtime thread; lives as long as the returned tempdir.
fn serve(fake: Fake) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = socket.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            ready_tx.send(()).unwrap();
            tonic::transport::Server::builder()
                .add_service(AdminServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    ready_rx.recv().unwrap();
    (dir, socket)
}

fn ctl(socket: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbusctl"));
    cmd.arg("--socket").arg(socket).args(args);
    cmd.env_remove("NIMBUS_ADMIN_SOCKET");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn out(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn validate_is_local_and_exits_65_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("no-coordinator.sock");
    let good = write(dir.path(), "good.yaml", EXAMPLE);
    let (code, stdout, stderr) = out(&ctl(&nowhere, &["policy", "validate", "-f", &good], None));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with(&format!("{good}: valid, digest sha256:")),
        "{stdout}"
    );
    assert!(
        stdout.contains("environments (4): dev, production, staging, test\n"),
        "{stdout}"
    );

    let bad_text = EXAMPLE
        .replace("min: 3", "min: three")
        .replace("version: 1", "version: 1\nbogus: 1");
    let bad = write(dir.path(), "bad.yaml", &bad_text);
    let (code, stdout, stderr) = out(&ctl(&nowhere, &["policy", "validate", "-f", &bad], None));
    assert_eq!(code, 65, "{stdout}{stderr}");
    assert_eq!(stdout, "");
    let expected = policy::parse(&bad, &bad_text).unwrap_err();
    assert!(expected.0.len() >= 2);
    assert_eq!(stderr, format!("{expected}\n"));

    let (code, stdout, _) = out(&ctl(
        &nowhere,
        &["-o", "json", "policy", "validate", "-f", "-"],
        Some(&bad_text),
    ));
    assert_eq!(code, 65);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["file"], "<stdin>");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(expected.0.len()));

    let (code, _, stderr) = out(&ctl(
        &nowhere,
        &["policy", "validate", "-f", "/nonexistent/p.yaml"],
        None,
    ));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("reading the policy file /nonexistent/p.yaml"),
        "{stderr}"
    );
}

#[test]
fn diff_apply_and_rollback_exit_codes() {
    let fake = Fake::default();
    let (dir, socket) = serve(fake.clone());
    let file = write(dir.path(), "policy.yaml", EXAMPLE);

    let (code, stdout, stderr) = out(&ctl(&socket, &["diff", "-f", &file], None));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(
            "db-1: production/performance → production/fast-nvme  DISRUPTIVE\n  ! pool: performance -> fast-nvme\n"
        ),
        "{stdout}"
    );
    {
        let sent = fake.applied.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].dry_run && !sent[0].allow_disruptive);
        assert_eq!(sent[0].file_name, file);
        assert_eq!(sent[0].yaml, EXAMPLE);
    }

    let (code, stdout, _) = out(&ctl(&socket, &["apply", "-f", &file], None));
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.ends_with("nothing applied: re-run with --allow-disruptive to drain and move these nodes in waves\n"),
        "{stdout}"
    );

    let (code, stdout, stderr) = out(&ctl(
        &socket,
        &["apply", "-f", "-", "--allow-disruptive"],
        Some(EXAMPLE),
    ));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("applied revision 5 (previous 4), 1 node changes\n"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("warning: pool \"burst\" has 0 of at least 2 nodes in dev\n"),
        "{stdout}"
    );
    {
        let sent = fake.applied.lock().unwrap();
        let last = sent.last().unwrap();
        assert!(!last.dry_run && last.allow_disruptive);
        assert_eq!(last.file_name, "<stdin>");
    }

    let (code, stdout, _) = out(&ctl(&socket, &["-o", "json", "apply", "-f", &file], None));
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["refused_disruptive"], true);

    let bad = write(dir.path(), "bad.yaml", "bogus: 1\n");
    let (code, stdout, stderr) = out(&ctl(&socket, &["diff", "-f", &bad], None));
    assert_eq!(code, 65);
    assert_eq!(stdout, "");
    assert_eq!(
        stderr,
        format!("{bad}:1:1: unknown field `bogus` (hint: remove it)\n{bad}:2:3: second problem (hint: fix it)\n")
    );

    let (code, _, stderr) = out(&ctl(&socket, &["apply", "-f", "/nonexistent/p.yaml"], None));
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("nimbusctl: reading the policy file /nonexistent/p.yaml"),
        "{stderr}"
    );

    let (code, stdout, _) = out(&ctl(&socket, &["rollback", "--to", "3", "--dry-run"], None));
    assert_eq!(code, 0);
    assert_eq!(
        stdout,
        "dry run: rollback to revision 3 against revision 5 (policy )\nno changes: revision 5 is already this policy\n"
    );
    let (code, _, stderr) = out(&ctl(&socket, &["rollback", "--to", "99"], None));
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "nimbusctl: no policy revision 99 (see `nimbusctl policy history`)\n"
    );
    let rb = fake.rollbacks.lock().unwrap();
    assert_eq!(rb.len(), 2);
    assert!(rb[0].dry_run && rb[0].to_revision == 3 && !rb[0].allow_disruptive);
}

#[test]
fn history_show_and_nodes() {
    let (_dir, socket) = serve(Fake::default());
    let (code, stdout, _) = out(&ctl(&socket, &["policy", "history"], None));
    assert_eq!(code, 0);
    assert!(stdout.starts_with(" REV  APPLIED"), "{stdout}");
    assert!(
        stdout.contains("(2023-11-14T22:13:20Z)  uid:0  apply   policy.yaml"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("feedfacecafe"), "{stdout}");

    let (code, stdout, _) = out(&ctl(&socket, &["policy", "show"], None));
    assert_eq!(code, 0);
    assert_eq!(stdout, "version: 1\nenvironments: []\n");
    let (code, stdout, _) = out(&ctl(
        &socket,
        &["-o", "yaml", "policy", "show", "--revision", "4"],
        None,
    ));
    assert_eq!((code, stdout.as_str()), (0, "version: 1\nenvironments: []\n"));
    let (code, _, stderr) = out(&ctl(&socket, &["policy", "show", "--revision", "7"], None));
    assert_eq!((code, stderr.as_str()), (1, "nimbusctl: no policy revision 7\n"));

    let (code, stdout, stderr) = out(&ctl(&socket, &["nodes", "--wide"], None));
    assert_eq!(code, 0);
    let header: Vec<&str> = stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ID",
            "OVERLAY-IP",
            "STATE",
            "ENV",
            "POOL",
            "COHORTS",
            "LAST-SEEN",
            "VERSION",
            "CPUS",
            "MEMORY",
            "PLATFORM",
            "INSTANCE-TYPE",
            "ZONE",
            "DISKS",
            "CONVERGED"
        ]
    );
    assert!(
        stdout.contains("connected  production  fast-nvme  hub-enclave"),
        "{stdout}"
    );
    assert_eq!(stderr, "warning: node \"stray\" is unplaced: matches no environment\n");

    let (code, stdout, stderr) = out(&ctl(&socket, &["-o", "json", "nodes"], None));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let nodes = v.as_array().expect("nodes json stays an array");
    assert_eq!(nodes[0]["placement"]["pool"], "fast-nvme");
    assert_eq!(nodes[1]["placement"], serde_json::Value::Null);
    assert_eq!(nodes[1]["unplaced_reason"], "matches no environment");
    assert_eq!(nodes[0]["name"], "db-1");
    assert!(stderr.starts_with("warning: "), "{stderr}");
}

#[test]
fn rollout_status_and_control() {
    let fake = Fake::default();
    let (_dir, socket) = serve(fake.clone());
    let (code, stdout, stderr) = out(&ctl(&socket, &["rollout", "status"], None));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("running rollout of policy revision 5: paused (1 node(s) failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 nodes: 0 healthy, 0 in flight, 1 pending, 1 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("db-1") && stdout.contains("failed: timed out"),
        "{stdout}"
    );
    assert!(stdout.contains("nimbusctl rollout resume"), "{stdout}");

    let (code, stdout, _) = out(&ctl(&socket, &["-o", "json", "rollout", "status"], None));
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["nodes"][1]["name"], "db-2");
    assert_eq!(v["counts"]["pending"], 1);

    let (code, stdout, stderr) = out(&ctl(&socket, &["rollout", "resume"], None));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("running rollout of policy revision 5: running\n"),
        "{stdout}"
    );
    let (code, _, stderr) = out(&ctl(&socket, &["rollout", "abort", "--reason", "bad release"], None));
    assert_eq!(code, 1);
    assert!(stderr.contains("no rollout is running"), "{stderr}");
    let sent = fake.controls.lock().unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        (sent[1].action.as_str(), sent[1].reason.as_str()),
        ("abort", "bad release")
    );
}

#[test]
fn bootstrap_render_mints_a_token_with_the_environment_labels_and_writes_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let fake = Fake {
        example_policy: true,
        ..Fake::default()
    };
    let (dir, socket) = serve(fake.clone());
    let out_dir = dir.path().join("db-7");
    let out_s = out_dir.display().to_string();
    let sha = "cd".repeat(32);
    let (code, stdout, stderr) = out(&ctl(
        &socket,
        &[
            "bootstrap",
            "render",
            "--platform",
            "aws",
            "--env",
            "production",
            "--node-name",
            "db-7",
            "--package-url",
            "http://192.0.2.1:8080/nimbus-agent.deb",
            "--package-sha256",
            &sha,
            "--out",
            &out_s,
        ],
        None,
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("user-data.yaml  (holds the join token, 0600)"),
        "{stdout}"
    );
    let user_data = std::fs::read_to_string(out_dir.join("user-data.yaml")).unwrap();
    assert!(user_data.starts_with("#cloud-config"), "{user_data}");
    assert!(user_data.contains(TOKEN) && user_data.contains(&sha));
    let mode = std::fs::metadata(out_dir.join("user-data.yaml"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let sent = fake.tokens.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].uses, 1, "single use");
    let policy = policy::parse("p.yaml", EXAMPLE).unwrap();
    let labels: std::collections::BTreeMap<String, String> = sent[0].labels.clone().into_iter().collect();
    assert!(
        policy.environment("production").unwrap().selector.matches(&labels),
        "{labels:?}"
    );

    // iPXE: one token per host, bound to its MAC.
    let (code, stdout, stderr) = out(&ctl(
        &socket,
        &[
            "bootstrap",
            "render",
            "--platform",
            "ipxe",
            "--env",
            "production",
            "--host",
            "52:54:00:AB:CD:EF=metal-1",
            "--kernel-url",
            "https://boot.example/vmlinuz",
            "--initrd-url",
            "https://boot.example/initrd",
            "--seed-url",
            "https://boot.example/seeds",
            "--package-url",
            "https://mirror.example/a.deb",
            "--package-sha256",
            &sha,
            "--out",
            &dir.path().join("metal").display().to_string(),
        ],
        None,
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    let sent = fake.tokens.lock().unwrap().clone();
    assert_eq!(sent.last().unwrap().bind_mac, "52:54:00:ab:cd:ef");
    assert!(dir.path().join("metal/boot.ipxe").exists());

    // An unknown environment is refused with the ones that exist.
    let (code, _, stderr) = out(&ctl(
        &socket,
        &[
            "bootstrap",
            "render",
            "--platform",
            "aws",
            "--env",
            "moon",
            "--package-url",
            "http://x/a.deb",
            "--package-sha256",
            &sha,
            "--out",
            &out_s,
        ],
        None,
    ));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("no environment \"moon\"") && stderr.contains("production"),
        "{stderr}"
    );
}
