//! End-to-end: what the coordinator does in the environments' clusters through the Kubernetes API. The API
//! server is the TEST STAND-IN process `nimbus-kube-api-stand-in` (`e2e::kube_api`, in the coordinator's
//! namespace, reached through an ordinary kubeconfig); kubeadm on the agents is the kubeadm TEST STAND-IN
//! (`e2e::kubeadm`). Checked: bootstrap tokens created through the API and deleted after each join; node labels
//! and taints set through the API and kept there (hand-made changes reverted); hand-made changes on a host
//! (desired.json, an undone join) found and reverted by its agent; a disruptive move to another environment's
//! cluster drains each node there first (evictions), one node per wave, each wave done only when the node is
//! joined to its new cluster; decommission drains through the API. Needs root and the binaries.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use e2e::fleet::{FleetOptions, agent_name, str_field};
use e2e::kube_api::KubeApiStandIn;
use e2e::kubeadm::KubeadmStandIn;
use e2e::{Fleet, eventually_patiently, require_root};
use serde_json::Value;

const HASH: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Two environments, one cluster each (both served by the stand-in). `db_in` names the one db nodes belong to.
fn policy(kubeconfig: &str, db_in: &str, web_labels: &str) -> String {
    let (prod, staging) = if db_in == "production" {
        ("{ env: prod }", "{ tier: nobody }")
    } else {
        ("{ env: prod, tier: web }", "{ tier: db }")
    };
    format!(
        "version: 1\nenvironments:\n  - name: production\n    match: {{ labels: {prod} }}\n    kubernetes:\n      \
         api_endpoint: \"10.0.0.10:6443\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: {kubeconfig} }}\n  \
         - name: staging\n    match: {{ labels: {staging} }}\n    kubernetes:\n      api_endpoint: \"10.0.0.20:6443\"\n      \
         ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: {kubeconfig} }}\npools:\n  - name: db\n    match: \
         {{ labels: {{ tier: db }} }}\n    max_unavailable: 1\n  - name: web\n    match: {{ labels: {{ tier: web }} }}\n    \
         labels: {{ {web_labels} }}\ncohorts:\n  - name: hub-enclave\n    pools: [db]\n    taints: [ {{ key: \
         polynimbus.io/enclave, value: \"true\", effect: NoSchedule }} ]\n  - name: edge\n    pools: [web]\n"
    )
}

fn labels(api: &KubeApiStandIn, node: &str) -> BTreeMap<String, String> {
    let n = api.node(node).unwrap().unwrap_or_default();
    serde_json::from_value(n["metadata"]["labels"].clone()).unwrap_or_default()
}

fn taint_keys(api: &KubeApiStandIn, node: &str) -> Vec<String> {
    let n = api.node(node).unwrap().unwrap_or_default();
    n["spec"]["taints"]
        .as_array()
        .map(|ts| ts.iter().map(|t| t["key"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}

fn count(requests: &[Value], method: &str, path_prefix: &str) -> usize {
    requests
        .iter()
        .filter(|r| r["method"] == method && r["path"].as_str().is_some_and(|p| p.starts_with(path_prefix)))
        .count()
}

fn node_json(fleet: &Fleet, name: &str) -> Value {
    fleet.ctl_json(&["node", "show", name])
}

#[test]
fn the_cluster_follows_the_policy_and_hand_made_drift_is_reverted() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::new(FleetOptions {
        coordinator_args: vec!["--cluster-sync-interval".into(), "2s".into()],
        ..FleetOptions::test(3)
    })
    .unwrap();
    let api = KubeApiStandIn::start(Some(fleet.coordinator_ns()), &fleet.work_dir().join("kube-api")).unwrap();
    let kubeconfig = api.kubeconfig().display().to_string();
    let db = fleet.create_labelled_token("1h", 2, "env=prod,tier=db");
    let web = fleet.create_labelled_token("1h", 1, "env=prod,tier=web");
    let mut kubeadm = Vec::new();
    for i in 1..=3 {
        let k = KubeadmStandIn::install(&fleet.work_dir().join(format!("kubeadm-{i}"))).unwrap();
        let mut args = k.agent_args();
        args.extend(["--drift-check-interval".to_string(), "2s".to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fleet.start_agent(i, Some(if i <= 2 { &db } else { &web }), &args);
        kubeadm.push(k);
    }
    let names: Vec<String> = (1..=3).map(agent_name).collect();
    fleet.wait_connected(&names);
    let file = fleet.work_dir().join("policy.yaml");
    let apply = |text: &str, extra: &[&str]| {
        std::fs::write(&file, text).unwrap();
        let mut args = vec!["apply", "-f", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = fleet.ctl(&args);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // 1. Every node joins once, with a token created through the API and deleted after its join.
    apply(&policy(&kubeconfig, "production", ""), &[]);
    eventually_patiently(|| {
        let states: Vec<String> = fleet
            .nodes()
            .iter()
            .map(|n| str_field(n, "kubelet").to_string())
            .collect();
        if states.len() == 3 && states.iter().all(|s| s == "joined") {
            Ok(())
        } else {
            Err(format!("kubelet states {states:?}"))
        }
    });
    assert!(kubeadm.iter().all(|k| k.joins() == 1));
    assert!(
        kubeadm
            .iter()
            .all(|k| k.joined_server().as_deref() == Some("https://10.0.0.10:6443"))
    );
    eventually_patiently(|| {
        let secrets = api.state().unwrap()["secrets"].clone();
        if secrets.as_array().is_some_and(Vec::is_empty) {
            Ok(())
        } else {
            Err(format!("secrets left: {secrets}"))
        }
    });
    let requests = api.requests().unwrap();
    assert_eq!(count(&requests, "POST", "/api/v1/namespaces/kube-system/secrets"), 3);
    assert_eq!(
        count(
            &requests,
            "DELETE",
            "/api/v1/namespaces/kube-system/secrets/bootstrap-token-"
        ),
        3
    );

    // 2. The kubelets register their Nodes (simulated: without our labels); the coordinator sets them.
    for name in &names {
        api.put_node(name, &BTreeMap::new(), &[]).unwrap();
    }
    eventually_patiently(|| {
        let pools: Vec<String> = names
            .iter()
            .map(|n| labels(&api, n).get("polynimbus.io/pool").cloned().unwrap_or_default())
            .collect();
        if pools == ["db", "db", "web"] {
            Ok(())
        } else {
            Err(format!("pool labels {pools:?}"))
        }
    });
    assert_eq!(labels(&api, "agent-1")["polynimbus.io/env"], "production");
    assert_eq!(taint_keys(&api, "agent-1"), ["polynimbus.io/enclave"]);
    assert!(taint_keys(&api, "agent-3").is_empty());
    eventually_patiently(|| match node_json(&fleet, "agent-1")["cluster_sync"].as_str() {
        Some("in sync") => Ok(()),
        other => Err(format!("cluster_sync {other:?}")),
    });

    // 3. A label change is made through the API, without a new join.
    apply(
        &policy(&kubeconfig, "production", "\"polynimbus.io/ingress\": \"true\""),
        &[],
    );
    eventually_patiently(|| match labels(&api, "agent-3").get("polynimbus.io/ingress") {
        Some(v) if v == "true" => Ok(()),
        other => Err(format!("ingress label {other:?}")),
    });
    assert!(kubeadm.iter().all(|k| k.joins() == 1), "no re-join for a label");

    // 4. Hand-made changes to our labels in the cluster are reverted; other labels are left alone.
    api.remove_label("agent-3", "polynimbus.io/ingress").unwrap();
    api.set_label("agent-1", "polynimbus.io/pool", "web").unwrap();
    api.set_label("agent-1", "team", "payments").unwrap();
    eventually_patiently(|| {
        let (a1, a3) = (labels(&api, "agent-1"), labels(&api, "agent-3"));
        if a1.get("polynimbus.io/pool").map(String::as_str) == Some("db")
            && a3.get("polynimbus.io/ingress").map(String::as_str) == Some("true")
        {
            Ok(a1)
        } else {
            Err(format!("agent-1 {a1:?}, agent-3 {a3:?}"))
        }
    });
    assert_eq!(labels(&api, "agent-1")["team"], "payments");

    // 5. Hand-made changes on a host: desired.json removed and the join undone. The agent restores the file and
    //    asks for a fresh join.
    std::fs::remove_file(fleet.agent_state_dir(1).join("desired.json")).unwrap();
    std::fs::remove_file(kubeadm[0].kubernetes_dir().join("kubelet.conf")).unwrap();
    eventually_patiently(|| {
        if fleet.agent_state_dir(1).join("desired.json").exists() && kubeadm[0].joins() == 2 {
            Ok(())
        } else {
            Err(format!("joins {}", kubeadm[0].joins()))
        }
    });
    let n1 = eventually_patiently(|| {
        let n = node_json(&fleet, "agent-1");
        if n["kubelet"] == "joined" {
            Ok(n)
        } else {
            Err(format!("{}", n["kubelet"]))
        }
    });
    let drift = n1["drift"].as_str().unwrap().to_string();
    assert!(drift.contains("by hand"), "{drift}");

    // 6. The db nodes move to staging's cluster (disruptive): each is drained from production first (its
    //    ReplicaSet pod evicted, the DaemonSet pod left, the Node deleted), then reset and joined to staging;
    //    one node per wave.
    api.put_pod("default", "web-1", "agent-1", Some("ReplicaSet")).unwrap();
    api.put_pod("kube-system", "proxy-1", "agent-1", Some("DaemonSet"))
        .unwrap();
    apply(
        &policy(&kubeconfig, "staging", "\"polynimbus.io/ingress\": \"true\""),
        &["--allow-disruptive"],
    );
    let (status, waves) = fleet.wait_rollout("completed");
    assert_eq!(status["counts"]["healthy"], 2, "{status}");
    assert_eq!(waves, [1, 2], "{status}");
    for k in &kubeadm[..2] {
        assert_eq!(
            k.joined_server().as_deref(),
            Some("https://10.0.0.20:6443"),
            "{:?}",
            k.calls()
        );
    }
    assert_eq!(kubeadm[2].joined_server().as_deref(), Some("https://10.0.0.10:6443"));
    let state = api.state().unwrap();
    assert!(
        state["nodes"].get("agent-1").is_none() && state["nodes"].get("agent-2").is_none(),
        "{state}"
    );
    let pods: Vec<String> = state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        pods,
        ["proxy-1"],
        "the ReplicaSet pod was evicted, the DaemonSet pod left"
    );
    let requests = api.requests().unwrap();
    assert_eq!(
        count(&requests, "POST", "/api/v1/namespaces/default/pods/web-1/eviction"),
        1
    );
    for node in ["agent-1", "agent-2"] {
        let p = format!("/api/v1/nodes/{node}");
        assert!(
            requests
                .iter()
                .any(|r| r["method"] == "DELETE" && r["path"] == p.as_str()),
            "{node} deleted"
        );
    }

    // 7. Decommission drains through the API too.
    api.put_pod("default", "api-1", "agent-3", Some("ReplicaSet")).unwrap();
    let out = fleet.ctl(&["node", "decommission", "agent-3"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("drained: 1 pods evicted"), "{text}");
    assert!(api.node("agent-3").unwrap().is_none());
    assert!(kubeadm[2].calls().contains(&"reset --force".to_string()));
    fleet.expect_agent_exit(3, 10, "revoked");

    assert!(
        api.unsupported_requests().unwrap().is_empty(),
        "only the API the coordinator is meant to use"
    );
}
