//! Self-test of `nimbus-kube-api-stand-in`, the TEST STAND-IN for the Kubernetes API server (not a Kubernetes
//! API server): the production client `nimbus_kube::cluster::KubeCluster` drives it through the kubeconfig it
//! writes, and its state, control socket and request log say what happened.
//!
//! These run without a network namespace (no root needed), except the last one, which starts the stand-in
//! inside a namespace the way the end-to-end tests do.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use e2e::kube_api::{BEARER_TOKEN, KubeApiStandIn, StandInPod};
use e2e::{Netns, require_root};
use nimbus_kube::KubeError;
use nimbus_kube::cluster::{self, Cluster, DrainReport, KubeCluster, NodeReconcile};
use nimbus_kube::join::Taint;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_nimbus-kube-api-stand-in");

/// The stand-in and its directory (dropped in this order: the process first).
fn start() -> (KubeApiStandIn, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApiStandIn::start_with(Path::new(BIN), None, dir.path()).unwrap();
    (api, dir)
}

async fn client(api: &KubeApiStandIn) -> KubeCluster {
    KubeCluster::from_kubeconfig(api.kubeconfig())
        .await
        .unwrap()
        .with_retry_interval(Duration::from_millis(100))
}

fn taint(key: &str, value: &str, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        value: value.into(),
        effect: effect.into(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Every line of requests.jsonl has the documented shape, and none was unsupported.
fn assert_requests_well_formed(api: &KubeApiStandIn) -> Vec<Value> {
    let requests = api.requests().unwrap();
    for r in &requests {
        let obj = r.as_object().unwrap_or_else(|| panic!("not an object: {r}"));
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "body",
                "content_type",
                "method",
                "path",
                "query",
                "status",
                "unsupported"
            ],
            "{r}"
        );
        assert!(r["method"].as_str().is_some_and(|m| !m.is_empty()), "{r}");
        assert!(r["path"].as_str().unwrap().starts_with('/'), "{r}");
        assert!(r["query"].as_object().unwrap().values().all(Value::is_string), "{r}");
        assert!(r["content_type"].is_string() || r["content_type"].is_null(), "{r}");
        assert!((100..600).contains(&r["status"].as_u64().unwrap()), "{r}");
        assert!(r["unsupported"].is_boolean(), "{r}");
    }
    requests
}

fn lines(requests: &[Value]) -> Vec<String> {
    requests
        .iter()
        .map(|r| {
            let query: Vec<String> = r["query"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                .collect();
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            format!(
                "{} {}{q} {}",
                r["method"].as_str().unwrap(),
                r["path"].as_str().unwrap(),
                r["status"]
            )
        })
        .collect()
}

/// One raw HTTP/1.1 request; returns the status code and the JSON body.
fn raw_http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        head.to_ascii_lowercase().contains("content-type: application/json"),
        "{head}"
    );
    (code, serde_json::from_str(body).unwrap())
}

fn bearer() -> String {
    format!("Bearer {BEARER_TOKEN}")
}

#[tokio::test]
async fn bootstrap_tokens_are_created_and_deleted() {
    let (api, _dir) = start();
    let c = client(&api).await;

    let token = cluster::issue_token(&c, Duration::from_secs(900), "join of edge-1")
        .await
        .unwrap();
    let secret_name = format!("bootstrap-token-{}", token.id());
    assert_eq!(api.state().unwrap()["secrets"], json!([secret_name]));

    // The stored Secret is the kubeadm one, stringData folded into base64 data as the API server does.
    let (code, secret) = raw_http(
        api.addr(),
        "GET",
        &format!("/api/v1/namespaces/kube-system/secrets/{secret_name}"),
        &[("Authorization", &bearer())],
        "",
    );
    assert_eq!(code, 200);
    assert_eq!(secret["type"], "bootstrap.kubernetes.io/token");
    assert!(secret.get("stringData").is_none());
    assert!(secret["data"]["token-secret"].is_string());

    c.delete_bootstrap_token(token.id()).await.unwrap();
    assert_eq!(api.state().unwrap()["secrets"], json!([]));
    // Deleting it again meets a 404, which the client takes as done.
    c.delete_bootstrap_token(token.id()).await.unwrap();

    let requests = assert_requests_well_formed(&api);
    let path = "/api/v1/namespaces/kube-system/secrets";
    assert_eq!(
        lines(&requests),
        vec![
            format!("POST {path} 201"),
            format!("GET {path}/{secret_name} 200"),
            format!("DELETE {path}/{secret_name} 200"),
            format!("DELETE {path}/{secret_name} 404"),
        ]
    );
    assert_eq!(requests[0]["content_type"], "application/json");
    assert_eq!(requests[0]["body"]["stringData"]["token-id"], token.id());
    assert_eq!(api.stop().and_then(|s| s.code()), Some(0), "SIGTERM exits 0");
}

#[tokio::test]
async fn reconcile_node_sets_our_keys_once_and_reverts_drift() {
    let (api, _dir) = start();
    let c = client(&api).await;
    api.put_node(
        "n1",
        &labels(&[("team", "a")]),
        &[json!({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"})],
    )
    .unwrap();
    let want_labels = labels(&[("polynimbus.io/pool", "edge"), ("polynimbus.io/zone", "fra")]);
    let want_taints = vec![taint("polynimbus.io/dedicated", "edge", "NoSchedule")];

    let report = c.reconcile_node("n1", &want_labels, &want_taints).await.unwrap();
    assert_eq!(
        report,
        NodeReconcile {
            labels_set: vec!["polynimbus.io/pool".into(), "polynimbus.io/zone".into()],
            labels_removed: vec![],
            taints_added: want_taints.clone(),
            taints_removed: vec![],
        }
    );
    let node = api.node("n1").unwrap().unwrap();
    assert_eq!(node["metadata"]["labels"]["polynimbus.io/pool"], "edge");
    assert_eq!(node["metadata"]["labels"]["polynimbus.io/zone"], "fra");
    assert_eq!(node["metadata"]["labels"]["team"], "a", "foreign labels stay");
    assert_eq!(
        node["spec"]["taints"],
        json!([
            {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
            {"key": "polynimbus.io/dedicated", "value": "edge", "effect": "NoSchedule"},
        ])
    );
    let rv = node["metadata"]["resourceVersion"].clone();

    // A second call finds nothing to do and only reads.
    let before = api.requests().unwrap().len();
    let again = c.reconcile_node("n1", &want_labels, &want_taints).await.unwrap();
    assert_eq!(again, NodeReconcile::default());
    assert!(!again.changed());
    assert_eq!(
        lines(&api.requests().unwrap()[before..]),
        vec!["GET /api/v1/nodes/n1 200"]
    );
    assert_eq!(api.node("n1").unwrap().unwrap()["metadata"]["resourceVersion"], rv);

    // Hand-made drift under polynimbus.io is reverted; other hand-made changes are left alone.
    api.set_label("n1", "polynimbus.io/pool", "hacked").unwrap();
    api.set_label("n1", "polynimbus.io/extra", "x").unwrap();
    api.set_label("n1", "owner", "ops").unwrap();
    api.remove_label("n1", "polynimbus.io/zone").unwrap();
    api.set_taints(
        "n1",
        &[
            json!({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}),
            json!({"key": "polynimbus.io/dedicated", "value": "other", "effect": "NoSchedule"}),
        ],
    )
    .unwrap();
    let drifted_rv = api.node("n1").unwrap().unwrap()["metadata"]["resourceVersion"].clone();
    assert_ne!(drifted_rv, rv, "every hand-made change bumps the resourceVersion");

    let reverted = c.reconcile_node("n1", &want_labels, &want_taints).await.unwrap();
    assert_eq!(
        reverted,
        NodeReconcile {
            labels_set: vec!["polynimbus.io/pool".into(), "polynimbus.io/zone".into()],
            labels_removed: vec!["polynimbus.io/extra".into()],
            taints_added: want_taints.clone(),
            taints_removed: vec![taint("polynimbus.io/dedicated", "other", "NoSchedule")],
        }
    );
    let node = api.node("n1").unwrap().unwrap();
    let node_labels = node["metadata"]["labels"].as_object().unwrap();
    assert_eq!(node_labels["polynimbus.io/pool"], "edge");
    assert_eq!(node_labels["polynimbus.io/zone"], "fra");
    assert!(!node_labels.contains_key("polynimbus.io/extra"));
    assert_eq!(node_labels["owner"], "ops");
    assert_eq!(node["spec"]["taints"][1]["value"], "edge");

    // The patch carried the resourceVersion it was planned from.
    let requests = assert_requests_well_formed(&api);
    let patch = requests.iter().rev().find(|r| r["method"] == "PATCH").unwrap();
    assert_eq!(patch["content_type"], "application/merge-patch+json");
    assert_eq!(patch["body"]["metadata"]["resourceVersion"], drifted_rv);
    assert_eq!(patch["status"], 200);

    // A node the stand-in does not know.
    let err = c.reconcile_node("n9", &want_labels, &[]).await.unwrap_err();
    assert!(
        matches!(&err, KubeError::NodeNotFound { node } if node == "n9"),
        "{err:?}"
    );
}

#[tokio::test]
async fn decommission_cordons_evicts_and_deletes_the_node() {
    let (api, _dir) = start();
    let c = client(&api).await;
    api.put_node("n1", &BTreeMap::new(), &[]).unwrap();
    api.put_node("n2", &BTreeMap::new(), &[]).unwrap();
    api.put_pod("apps", "web-1", "n1", Some("ReplicaSet")).unwrap();
    api.put_pod_with(
        &StandInPod::new("apps", "db-0", "n1")
            .owner_kind("ReplicaSet")
            .pdb_blocked(1),
    )
    .unwrap();
    api.put_pod("kube-system", "proxy-n1", "n1", Some("DaemonSet")).unwrap();
    api.put_pod_with(&StandInPod::new("kube-system", "etcd-n1", "n1").mirror())
        .unwrap();
    api.put_pod("apps", "web-2", "n2", Some("ReplicaSet")).unwrap();

    let report = cluster::decommission(&c, "n1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        report,
        DrainReport {
            // db-0 is listed first but its PodDisruptionBudget refuses the first eviction.
            evicted: vec!["apps/web-1".into(), "apps/db-0".into()],
            skipped_daemonset: vec!["kube-system/proxy-n1".into()],
            skipped_mirror: vec!["kube-system/etcd-n1".into()],
            retries: 1,
        }
    );

    let state = api.state().unwrap();
    assert!(state["nodes"].get("n1").is_none(), "n1 deleted");
    assert!(state["nodes"].get("n2").is_some());
    let mut pods: Vec<String> = state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    pods.sort();
    assert_eq!(pods, ["apps/web-2", "kube-system/etcd-n1", "kube-system/proxy-n1"]);

    let requests = assert_requests_well_formed(&api);
    let pods_on_n1 = "GET /api/v1/pods?fieldSelector=spec.nodeName=n1 200";
    assert_eq!(
        lines(&requests),
        vec![
            "PATCH /api/v1/nodes/n1 200",
            pods_on_n1,
            "POST /api/v1/namespaces/apps/pods/db-0/eviction 429",
            "POST /api/v1/namespaces/apps/pods/web-1/eviction 201",
            "POST /api/v1/namespaces/apps/pods/db-0/eviction 201",
            pods_on_n1,
            "DELETE /api/v1/nodes/n1 200",
        ]
    );
    assert_eq!(requests[0]["content_type"], "application/strategic-merge-patch+json");
    assert_eq!(requests[0]["body"], json!({"spec": {"unschedulable": true}}));
    assert_eq!(requests[3]["body"]["kind"], "Eviction");
}

#[tokio::test]
async fn unauthenticated_unsupported_and_conflicting_requests() {
    let (api, _dir) = start();
    api.put_node("n1", &BTreeMap::new(), &[]).unwrap();
    let addr = api.addr();
    let auth = bearer();
    let merge = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/merge-patch+json"),
    ];

    let (code, body) = raw_http(addr, "GET", "/api/v1/nodes/n1", &[], "");
    assert_eq!(
        (code, body["kind"].as_str(), body["reason"].as_str()),
        (401, Some("Status"), Some("Unauthorized"))
    );
    let (code, _) = raw_http(
        addr,
        "GET",
        "/api/v1/nodes/n1",
        &[("Authorization", "Bearer wrong")],
        "",
    );
    assert_eq!(code, 401);

    let (code, body) = raw_http(
        addr,
        "GET",
        "/apis/apps/v1/deployments",
        &[("Authorization", &auth)],
        "",
    );
    assert_eq!(code, 404);
    assert_eq!(body["reason"], "NotFound");
    assert_eq!(
        body["message"],
        "stand-in: unsupported request GET /apis/apps/v1/deployments"
    );

    // A merge patch from a stale resourceVersion conflicts; from the current one it applies and bumps it.
    let rv = api.node("n1").unwrap().unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, body) = raw_http(
        addr,
        "PATCH",
        "/api/v1/nodes/n1",
        &merge,
        r#"{"metadata":{"resourceVersion":"0","labels":{"a":"b"}}}"#,
    );
    assert_eq!((code, body["reason"].as_str()), (409, Some("Conflict")));
    let (code, body) = raw_http(
        addr,
        "PATCH",
        "/api/v1/nodes/n1",
        &merge,
        &format!(r#"{{"metadata":{{"resourceVersion":"{rv}","labels":{{"a":"b"}}}}}}"#),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["metadata"]["labels"]["a"], "b");
    let new_rv: u64 = body["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(new_rv > rv.parse::<u64>().unwrap());

    // Apply patches are not used by the coordinator: 415.
    let (code, body) = raw_http(
        addr,
        "PATCH",
        "/api/v1/nodes/n1",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/apply-patch+yaml"),
        ],
        "metadata: {}\n",
    );
    assert_eq!((code, body["reason"].as_str()), (415, Some("UnsupportedMediaType")));

    // An unknown node is 404 (supported, just absent), eviction of an unknown pod too.
    let (code, body) = raw_http(addr, "DELETE", "/api/v1/nodes/n9", &[("Authorization", &auth)], "");
    assert_eq!((code, body["message"].as_str()), (404, Some("nodes \"n9\" not found")));

    let requests = assert_requests_well_formed(&api);
    assert_eq!(
        lines(&requests),
        vec![
            "GET /api/v1/nodes/n1 401",
            "GET /api/v1/nodes/n1 401",
            "GET /apis/apps/v1/deployments 404",
            "PATCH /api/v1/nodes/n1 409",
            "PATCH /api/v1/nodes/n1 200",
            "PATCH /api/v1/nodes/n1 415",
            "DELETE /api/v1/nodes/n9 404",
        ]
    );
    let unsupported = api.unsupported_requests().unwrap();
    assert_eq!(unsupported.len(), 1);
    assert_eq!(unsupported[0]["path"], "/apis/apps/v1/deployments");
    assert_eq!(
        requests[5]["body"], "metadata: {}\n",
        "a non-JSON body is recorded as text"
    );
    assert_eq!(requests[0]["body"], Value::Null);

    // Control errors come back as errors.
    let err = api.set_label("n9", "k", "v").unwrap_err().to_string();
    assert!(err.contains("no node \"n9\""), "{err}");
}

#[tokio::test]
async fn several_stand_ins_run_side_by_side() {
    let (a, _da) = start();
    let (b, _db) = start();
    assert_ne!(a.addr(), b.addr());
    a.put_node("only-in-a", &BTreeMap::new(), &[]).unwrap();
    let ca = client(&a).await;
    let cb = client(&b).await;
    ca.reconcile_node("only-in-a", &BTreeMap::new(), &[]).await.unwrap();
    assert!(matches!(
        cb.reconcile_node("only-in-a", &BTreeMap::new(), &[]).await,
        Err(KubeError::NodeNotFound { .. })
    ));
    assert!(b.node("only-in-a").unwrap().is_none());
}

/// The way the end-to-end tests use it: the stand-in in the coordinator's namespace, the client in there too,
/// the control socket from outside.
#[test]
fn a_stand_in_inside_a_namespace_serves_clients_there() {
    if !require_root() {
        return;
    }
    let ns = Netns::create(&format!("{}-kapi", e2e::netns::unique_prefix())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = KubeApiStandIn::start_with(Path::new(BIN), Some(&ns), dir.path()).unwrap();
    assert_eq!(api.process().netns(), Some(ns.name()));
    api.put_node("n1", &BTreeMap::new(), &[]).unwrap();
    // Its loopback port is not ours.
    assert!(TcpStream::connect_timeout(&api.addr(), Duration::from_secs(1)).is_err());

    let kubeconfig = api.kubeconfig();
    let report = ns
        .block_on(move || async move {
            let c = KubeCluster::from_kubeconfig(kubeconfig).await.unwrap();
            let l = labels(&[("polynimbus.io/pool", "edge")]);
            c.reconcile_node("n1", &l, &[]).await
        })
        .unwrap()
        .unwrap();
    assert_eq!(report.labels_set, vec!["polynimbus.io/pool".to_string()]);
    assert_eq!(
        api.node("n1").unwrap().unwrap()["metadata"]["labels"]["polynimbus.io/pool"],
        "edge"
    );
    assert_eq!(api.stop().and_then(|s| s.code()), Some(0));
    drop(api);
    drop(ns);
}
