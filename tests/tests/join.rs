//! End-to-end: kubelet join. A policy whose environment mints bootstrap tokens with an operator command puts
//! two agents in pools; each node is handed its own token over its own stream and runs `kubeadm join --config`
//! exactly once with its name and polynimbus.io labels; a coordinator restart joins nobody again.
//! kubeadm is the TEST STAND-IN kube/tests/fixtures/kubeadm-stand-in.sh (no cluster can run here); the token
//! command is a stand-in script printing random tokens. Needs root and the binaries.
#![allow(clippy::unwrap_used)]

use e2e::fleet::{JoinToken, agent_name, str_field};
use e2e::kubeadm::{KubeadmStandIn, install_mint_command, minted};
use e2e::{Fleet, eventually_patiently, require_root};

const API: &str = "10.0.0.10:6443";

fn token(fleet: &Fleet, tier: &str) -> JoinToken {
    fleet.create_labelled_token("1h", 1, &format!("env=prod,tier={tier}"))
}

#[test]
fn each_node_joins_once_with_its_own_token_and_labels() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(2);
    let work = fleet.work_dir().to_path_buf();
    let mint = work.join("mint-join-token");
    install_mint_command(&mint).unwrap();
    let (db, web) = (token(&fleet, "db"), token(&fleet, "web"));
    let mut dirs = Vec::new();
    for i in 1..=2 {
        let kubeadm = KubeadmStandIn::install(&work.join(format!("kubeadm-{i}"))).unwrap();
        let args = kubeadm.agent_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fleet.start_agent(i, Some(if i == 1 { &db } else { &web }), &args);
        dirs.push(kubeadm);
    }
    fleet.wait_connected(&[agent_name(1), agent_name(2)]);

    let policy = format!(
        "version: 1\nenvironments:\n  - name: production\n    match: {{ labels: {{ env: prod }} }}\n    kubernetes:\n      api_endpoint: \"{API}\"\n      ca_cert_hash: \"sha256:{}\"\n      credentials: {{ kubeconfig: /etc/nimbus/prod.kubeconfig }}\n      join_token_command: [{}]\npools:\n  - name: db\n    match: {{ labels: {{ tier: db }} }}\n  - name: web\n    match: {{ labels: {{ tier: web }} }}\ncohorts:\n  - name: hub-enclave\n    pools: [db]\n    taints: [ {{ key: polynimbus.io/enclave, value: \"true\", effect: NoSchedule }} ]\n  - name: edge\n    pools: [web]\n",
        "ab".repeat(32),
        mint.display()
    );
    let file = work.join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    let out = fleet.ctl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    eventually_patiently(|| {
        let nodes = fleet.nodes();
        let states: Vec<String> = nodes.iter().map(|n| str_field(n, "kubelet").to_string()).collect();
        if states.len() == 2 && states.iter().all(|s| s == "joined") {
            Ok(())
        } else {
            Err(format!("kubelet states {states:?}"))
        }
    });
    let minted = minted(&mint);
    let mut used = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        assert_eq!(dir.joins(), 1, "agent-{} joined exactly once", i + 1);
        assert_eq!(dir.joined_server().as_deref(), Some("https://10.0.0.10:6443"));
        let (config, mode) = dir.join_config(1).unwrap();
        assert!(config.contains(&format!("name: agent-{}", i + 1)), "{config}");
        let pool = if i == 0 { "db" } else { "web" };
        assert!(config.contains(&format!("polynimbus.io/pool={pool}")), "{config}");
        if i == 0 {
            assert!(
                config.contains("key: polynimbus.io/enclave"),
                "the cohort's taint: {config}"
            );
        }
        assert_eq!(mode, "600");
        let tok = minted
            .iter()
            .find(|t| config.contains(t.as_str()))
            .unwrap_or_else(|| panic!("agent-{} joined with a token the command never minted", i + 1));
        used.push(tok.clone());
        let secret = tok.split('.').nth(1).unwrap();
        assert!(
            !fleet.agent(i + 1).log().contains(secret),
            "the token's secret never reaches the log"
        );
        assert!(!fleet.coordinator().log().contains(secret), "nor the coordinator's log");
        assert!(
            !fleet.agent_state_dir(i + 1).join("kubeadm-join.yaml").exists(),
            "the join configuration (it holds the token) is removed after the join"
        );
    }
    assert_ne!(used[0], used[1], "every node gets its own token");

    // A restart of the coordinator joins nobody again and mints no new token.
    let minted_before = minted.len();
    fleet.coordinator().terminate().unwrap();
    assert!(fleet.coordinator().wait_exit(e2e::patience()).is_some());
    fleet.start_coordinator();
    fleet.wait_connected(&[agent_name(1), agent_name(2)]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(dirs.iter().all(|d| d.joins() == 1));
    assert_eq!(
        e2e::kubeadm::minted(&mint).len(),
        minted_before,
        "no token for a joined node"
    );
    assert!(fleet.nodes().iter().all(|n| str_field(n, "kubelet") == "joined"));

    // Decommission agent-2. The drain needs the cluster's API, which is not reachable here: refused with what to
    // do, and nothing is touched.
    let before = fleet.node("agent-2").unwrap();
    let refused = fleet.ctl(&["node", "decommission", "agent-2"]);
    let text = String::from_utf8_lossy(&refused.stdout).to_string();
    assert_eq!(refused.status.code(), Some(1), "{text}");
    assert!(
        text.contains("NOT decommissioned") && text.contains("--no-drain"),
        "{text}"
    );
    assert_eq!(str_field(&fleet.node("agent-2").unwrap(), "state"), "connected");
    assert_eq!(dirs[1].resets(), 0);
    // Without the drain: kubeadm reset on the node, keys revoked, IP and name freed.
    let done = fleet.ctl(&["node", "decommission", "agent-2", "--no-drain"]);
    let text = String::from_utf8_lossy(&done.stdout).to_string();
    assert!(done.status.success(), "{text}{}", String::from_utf8_lossy(&done.stderr));
    for step in ["drain skipped", "kubeadm reset on the node", "keys revoked", "freed"] {
        assert!(text.contains(step), "{step:?} missing: {text}");
    }
    assert!(dirs[1].calls().contains(&"reset --force".to_string()));
    fleet.expect_agent_exit(2, 10, "revoked");
    let names: Vec<String> = fleet.nodes().iter().map(|n| str_field(n, "name").to_string()).collect();
    assert_eq!(names, ["agent-1"], "the node record is gone");
    // The freed name and overlay IP go to the next enrollment.
    std::fs::remove_dir_all(fleet.agent_state_dir(2)).unwrap();
    let again = token(&fleet, "web");
    fleet.start_agent(2, Some(&again), &[]);
    let back = fleet.wait_connected(&[agent_name(2)]).remove(0);
    assert_eq!(
        str_field(&back, "overlay_ip"),
        str_field(&before, "overlay_ip"),
        "{back}"
    );
    assert_ne!(str_field(&back, "id"), str_field(&before, "id"));
}
