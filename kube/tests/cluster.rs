//! `KubeCluster` against the TEST STAND-IN API server in `support` (not Kubernetes), reached through a
//! kubeconfig: each call makes exactly the expected requests, with the expected bodies.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use nimbus_kube::KubeError;
use nimbus_kube::cluster::{self, Cluster, CommandTokenSource, DrainReport, KubeCluster, NodeReconcile};
use nimbus_kube::join::Taint;
use nimbus_kube::token::BootstrapToken;
use serde_json::{Value, json};
use support::{ApiStandIn, status_reply, step};

const SECRETS: &str = "/api/v1/namespaces/kube-system/secrets";

async fn cluster(api: &ApiStandIn) -> KubeCluster {
    KubeCluster::from_kubeconfig(api.kubeconfig())
        .await
        .unwrap()
        .with_retry_interval(Duration::from_millis(50))
}

fn taint(key: &str, value: &str, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        value: value.into(),
        effect: effect.into(),
    }
}

fn node_json(rv: &str, labels: Value, taints: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": "n1", "resourceVersion": rv, "labels": labels },
        "spec": { "taints": taints },
    })
}

fn pod(ns: &str, name: &str, uid: &str, extra_meta: Value) -> Value {
    let mut meta = json!({ "name": name, "namespace": ns, "uid": uid });
    if let (Some(m), Some(extra)) = (meta.as_object_mut(), extra_meta.as_object()) {
        m.extend(extra.clone());
    }
    json!({ "metadata": meta, "spec": { "nodeName": "n1", "containers": [{ "name": "c", "image": "i" }] } })
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": { "resourceVersion": "9" }, "items": items })
}

#[tokio::test]
async fn create_bootstrap_token_posts_the_kubeadm_secret() {
    let token = BootstrapToken::parse("abcdef.0123456789abcdef").unwrap();
    let api = ApiStandIn::start(vec![step(&format!("POST {SECRETS}"), 201, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bootstrap-token-abcdef", "namespace": "kube-system"}}))]).await;
    let c = cluster(&api).await;

    let before = SystemTime::now();
    c.create_bootstrap_token(&token, Duration::from_secs(900), "join of edge-fra-1")
        .await
        .unwrap();
    api.assert_done();

    let seen = api.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].content_type.as_deref(), Some("application/json"));
    let body = seen[0].body.clone().unwrap();
    assert_eq!(body["type"], "bootstrap.kubernetes.io/token");
    assert_eq!(body["metadata"]["name"], "bootstrap-token-abcdef");
    assert_eq!(body["metadata"]["namespace"], "kube-system");
    let data = &body["stringData"];
    assert_eq!(data["token-id"], "abcdef");
    assert_eq!(data["token-secret"], "0123456789abcdef");
    assert_eq!(data["description"], "join of edge-fra-1");
    assert_eq!(data["usage-bootstrap-authentication"], "true");
    assert_eq!(data["usage-bootstrap-signing"], "true");
    assert_eq!(
        data["auth-extra-groups"],
        "system:bootstrappers:kubeadm:default-node-token"
    );
    let expiry = humantime::parse_rfc3339(data["expiration"].as_str().unwrap()).unwrap();
    let lo = before + Duration::from_secs(899);
    let hi = SystemTime::now() + Duration::from_secs(901);
    assert!(expiry >= lo && expiry <= hi, "expiration {:?}", data["expiration"]);
}

#[tokio::test]
async fn create_bootstrap_token_conflict_is_token_exists() {
    let api = ApiStandIn::start(vec![step(
        &format!("POST {SECRETS}"),
        409,
        status_reply(
            409,
            "AlreadyExists",
            "secrets \"bootstrap-token-abcdef\" already exists",
        ),
    )])
    .await;
    let c = cluster(&api).await;
    let token = BootstrapToken::parse("abcdef.0123456789abcdef").unwrap();
    let err = c
        .create_bootstrap_token(&token, Duration::from_secs(60), "x")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, KubeError::TokenExists { id } if id == "abcdef"),
        "{err:?}"
    );
    api.assert_done();
}

#[tokio::test]
async fn issue_token_retries_a_taken_id_once() {
    let api = ApiStandIn::start(vec![
        step(
            &format!("POST {SECRETS}"),
            409,
            status_reply(409, "AlreadyExists", "exists"),
        ),
        step(
            &format!("POST {SECRETS}"),
            201,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {}}),
        ),
    ])
    .await;
    let c = cluster(&api).await;
    let token = cluster::issue_token(&c, Duration::from_secs(900), "join")
        .await
        .unwrap();
    api.assert_done();
    let seen = api.seen();
    assert_eq!(seen[1].body.as_ref().unwrap()["stringData"]["token-id"], token.id());
    assert_ne!(
        seen[0].body.as_ref().unwrap()["stringData"]["token-id"],
        seen[1].body.as_ref().unwrap()["stringData"]["token-id"]
    );
}

#[tokio::test]
async fn delete_bootstrap_token_deletes_the_secret_and_404_is_ok() {
    let api = ApiStandIn::start(vec![
        step(
            &format!("DELETE {SECRETS}/bootstrap-token-abcdef"),
            200,
            status_reply(200, "", ""),
        ),
        step(
            &format!("DELETE {SECRETS}/bootstrap-token-ghijkl"),
            404,
            status_reply(404, "NotFound", "not found"),
        ),
    ])
    .await;
    let c = cluster(&api).await;
    c.delete_bootstrap_token("abcdef").await.unwrap();
    c.delete_bootstrap_token("ghijkl").await.unwrap();
    // A malformed id is refused before any request.
    assert!(matches!(
        c.delete_bootstrap_token("../x").await,
        Err(KubeError::InvalidToken { .. })
    ));
    api.assert_done();
    assert_eq!(api.seen().len(), 2);
}

#[tokio::test]
async fn reconcile_node_patches_only_polynimbus_keys() {
    let current = node_json(
        "7",
        json!({"kubernetes.io/hostname": "n1", "team": "a", "polynimbus.io/pool": "old", "polynimbus.io/gone": "x"}),
        json!([
            {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
            {"key": "polynimbus.io/dedicated", "value": "old", "effect": "NoSchedule"},
        ]),
    );
    let api = ApiStandIn::start(vec![
        step("GET /api/v1/nodes/n1", 200, current.clone()),
        step("PATCH /api/v1/nodes/n1", 200, current),
    ])
    .await;
    let c = cluster(&api).await;
    let labels = BTreeMap::from([("polynimbus.io/pool".to_owned(), "edge".to_owned())]);
    let taints = vec![taint("polynimbus.io/dedicated", "edge", "NoSchedule")];

    let report = c.reconcile_node("n1", &labels, &taints).await.unwrap();

    api.assert_done();
    assert_eq!(
        report,
        NodeReconcile {
            labels_set: vec!["polynimbus.io/pool".into()],
            labels_removed: vec!["polynimbus.io/gone".into()],
            taints_added: vec![taint("polynimbus.io/dedicated", "edge", "NoSchedule")],
            taints_removed: vec![taint("polynimbus.io/dedicated", "old", "NoSchedule")],
        }
    );
    let patch = &api.seen()[1];
    assert_eq!(patch.content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(
        patch.body.clone().unwrap(),
        json!({
            "metadata": {
                "resourceVersion": "7",
                "labels": {"polynimbus.io/pool": "edge", "polynimbus.io/gone": null},
            },
            "spec": {"taints": [
                {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                {"key": "polynimbus.io/dedicated", "value": "edge", "effect": "NoSchedule"},
            ]},
        })
    );
}

#[tokio::test]
async fn reconcile_node_without_drift_only_reads() {
    let current = node_json("7", json!({"polynimbus.io/pool": "edge", "team": "a"}), json!([]));
    let api = ApiStandIn::start(vec![step("GET /api/v1/nodes/n1", 200, current)]).await;
    let c = cluster(&api).await;
    let labels = BTreeMap::from([("polynimbus.io/pool".to_owned(), "edge".to_owned())]);
    let report = c.reconcile_node("n1", &labels, &[]).await.unwrap();
    assert!(!report.changed());
    api.assert_done();
}

#[tokio::test]
async fn reconcile_node_rereads_after_a_conflict() {
    let api = ApiStandIn::start(vec![
        step("GET /api/v1/nodes/n1", 200, node_json("7", json!({}), json!([]))),
        step(
            "PATCH /api/v1/nodes/n1",
            409,
            status_reply(409, "Conflict", "the object has been modified"),
        ),
        step(
            "GET /api/v1/nodes/n1",
            200,
            node_json("8", json!({"other": "x"}), json!([])),
        ),
        step("PATCH /api/v1/nodes/n1", 200, node_json("9", json!({}), json!([]))),
    ])
    .await;
    let c = cluster(&api).await;
    let labels = BTreeMap::from([("polynimbus.io/pool".to_owned(), "edge".to_owned())]);
    c.reconcile_node("n1", &labels, &[]).await.unwrap();
    api.assert_done();
    let seen = api.seen();
    assert_eq!(seen[1].body.as_ref().unwrap()["metadata"]["resourceVersion"], "7");
    assert_eq!(
        seen[3].body.clone().unwrap(),
        json!({"metadata": {"resourceVersion": "8", "labels": {"polynimbus.io/pool": "edge"}}})
    );
}

#[tokio::test]
async fn reconcile_node_refuses_foreign_keys_and_reports_missing_nodes() {
    let api = ApiStandIn::start(vec![step(
        "GET /api/v1/nodes/n1",
        404,
        status_reply(404, "NotFound", "nodes \"n1\" not found"),
    )])
    .await;
    let c = cluster(&api).await;
    let bad = BTreeMap::from([("node-role.kubernetes.io/worker".to_owned(), "".to_owned())]);
    assert!(matches!(
        c.reconcile_node("n1", &bad, &[]).await,
        Err(KubeError::ForbiddenKey { .. })
    ));
    let err = c.reconcile_node("n1", &BTreeMap::new(), &[]).await.unwrap_err();
    assert!(
        matches!(&err, KubeError::NodeNotFound { node } if node == "n1"),
        "{err:?}"
    );
    api.assert_done();
}

#[tokio::test]
async fn cordon_sets_unschedulable() {
    let api = ApiStandIn::start(vec![step(
        "PATCH /api/v1/nodes/n1",
        200,
        node_json("8", json!({}), json!([])),
    )])
    .await;
    let c = cluster(&api).await;
    c.cordon("n1").await.unwrap();
    api.assert_done();
    let seen = &api.seen()[0];
    assert_eq!(
        seen.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(seen.body.clone().unwrap(), json!({"spec": {"unschedulable": true}}));
}

fn drain_pods() -> Vec<Value> {
    vec![
        pod(
            "apps",
            "web-1",
            "u1",
            json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs", "controller": true}]}),
        ),
        pod("apps", "db-0", "u2", json!({})),
        pod(
            "kube-system",
            "proxy-x",
            "u3",
            json!({"ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "proxy", "uid": "ds", "controller": true}]}),
        ),
        pod(
            "kube-system",
            "etcd-n1",
            "u4",
            json!({"annotations": {"kubernetes.io/config.mirror": "abc"}}),
        ),
    ]
}

const PODS_ON_N1: &str = "GET /api/v1/pods?fieldSelector=spec.nodeName=n1";

fn pdb_429() -> Value {
    let mut v = status_reply(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );
    v["details"] = json!({"causes": [{"reason": "DisruptionBudget", "message": "The disruption budget db needs 1 healthy pods and has 1 currently"}]});
    v
}

#[tokio::test]
async fn drain_evicts_skips_daemonset_and_mirror_pods_and_retries_429() {
    let ok = status_reply(201, "", "");
    let api = ApiStandIn::start(vec![
        step(PODS_ON_N1, 200, pod_list(drain_pods())),
        step("POST /api/v1/namespaces/apps/pods/web-1/eviction", 201, ok.clone()),
        step("POST /api/v1/namespaces/apps/pods/db-0/eviction", 429, pdb_429()),
        step("POST /api/v1/namespaces/apps/pods/db-0/eviction", 201, ok),
        // web-1 is still terminating; db-0 was replaced by a new pod of the same name (new uid): gone.
        step(
            PODS_ON_N1,
            200,
            pod_list(vec![drain_pods()[0].clone(), pod("apps", "db-0", "u9", json!({}))]),
        ),
        step(
            PODS_ON_N1,
            200,
            pod_list(vec![drain_pods()[2].clone(), drain_pods()[3].clone()]),
        ),
    ])
    .await;
    let c = cluster(&api).await;

    let report = c.drain("n1", Duration::from_secs(30)).await.unwrap();

    api.assert_done();
    assert_eq!(
        report,
        DrainReport {
            evicted: vec!["apps/web-1".into(), "apps/db-0".into()],
            skipped_daemonset: vec!["kube-system/proxy-x".into()],
            skipped_mirror: vec!["kube-system/etcd-n1".into()],
            retries: 1,
        }
    );
    let eviction = api.seen()[1].body.clone().unwrap();
    assert_eq!(
        eviction,
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web-1", "namespace": "apps"}})
    );
}

#[tokio::test]
async fn drain_gives_up_at_the_deadline_honouring_retry_after() {
    let mut refused = pdb_429();
    refused["details"]["retryAfterSeconds"] = json!(5);
    let api = ApiStandIn::start(vec![
        step(PODS_ON_N1, 200, pod_list(vec![drain_pods()[1].clone()])),
        step("POST /api/v1/namespaces/apps/pods/db-0/eviction", 429, refused.clone()),
        step("POST /api/v1/namespaces/apps/pods/db-0/eviction", 429, refused),
    ])
    .await;
    let c = cluster(&api).await;
    let started = std::time::Instant::now();
    let err = c.drain("n1", Duration::from_millis(400)).await.unwrap_err();
    let took = started.elapsed();
    api.assert_done();
    // One retry, at the deadline (the 5 s the server asked for were cut to the deadline).
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    match &err {
        KubeError::DrainTimeout { node, remaining, .. } => {
            assert_eq!(node, "n1");
            assert_eq!(remaining, &vec!["apps/db-0".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("PodDisruptionBudget"));
}

#[tokio::test]
async fn delete_node_and_404_is_ok() {
    let api = ApiStandIn::start(vec![
        step("DELETE /api/v1/nodes/n1", 200, status_reply(200, "", "")),
        step(
            "DELETE /api/v1/nodes/n2",
            404,
            status_reply(404, "NotFound", "nodes \"n2\" not found"),
        ),
    ])
    .await;
    let c = cluster(&api).await;
    c.delete_node("n1").await.unwrap();
    c.delete_node("n2").await.unwrap();
    api.assert_done();
}

#[tokio::test]
async fn decommission_cordons_drains_and_deletes() {
    let api = ApiStandIn::start(vec![
        step("PATCH /api/v1/nodes/n1", 200, node_json("8", json!({}), json!([]))),
        step(PODS_ON_N1, 200, pod_list(vec![drain_pods()[2].clone()])),
        step("DELETE /api/v1/nodes/n1", 200, status_reply(200, "", "")),
    ])
    .await;
    let c = cluster(&api).await;
    let report = cluster::decommission(&c, "n1", Duration::from_secs(10)).await.unwrap();
    assert_eq!(report.skipped_daemonset, vec!["kube-system/proxy-x"]);
    assert!(report.evicted.is_empty());
    api.assert_done();
}

#[tokio::test]
async fn api_errors_name_the_action() {
    let api = ApiStandIn::start(vec![step(
        "DELETE /api/v1/nodes/n1",
        403,
        status_reply(403, "Forbidden", "nodes \"n1\" is forbidden"),
    )])
    .await;
    let c = cluster(&api).await;
    let err = c.delete_node("n1").await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("delete node n1") && msg.contains("forbidden") && msg.contains("RBAC"),
        "{msg}"
    );
    api.assert_done();
}

#[tokio::test]
async fn a_missing_kubeconfig_is_reported_with_its_path() {
    let err = KubeCluster::from_kubeconfig("/nonexistent/kubeconfig")
        .await
        .unwrap_err();
    assert!(matches!(err, KubeError::Kubeconfig { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/kubeconfig"));
}

fn sh(script: &str, timeout: Duration) -> CommandTokenSource {
    CommandTokenSource {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        timeout,
    }
}

#[tokio::test]
async fn command_token_source_parses_stdout() {
    let t = sh("echo '  abcdef.0123456789abcdef '", Duration::from_secs(10))
        .fetch()
        .await
        .unwrap();
    assert_eq!(t.expose(), "abcdef.0123456789abcdef");
}

#[tokio::test]
async fn command_token_source_errors_name_the_command_and_stderr_but_never_the_token() {
    let err = sh(
        "echo abcdef.0123456789abcdef; echo 'no RBAC for you' >&2; exit 3",
        Duration::from_secs(10),
    )
    .fetch()
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("sh -c") && msg.contains("exit status: 3") && msg.contains("no RBAC for you"),
        "{msg}"
    );
    assert!(!msg.contains("0123456789abcdef"), "{msg}");

    // Stdout ("42-printed-2") is not echoed; it does not appear in argv either.
    let err = sh(
        "echo 'token is abcdef.0123456789abcdef' >&2; echo \"$((40+2))-printed-$((1+1))\"",
        Duration::from_secs(10),
    )
    .fetch()
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not one bootstrap token") && msg.contains("abcdef.<redacted>"),
        "{msg}"
    );
    assert!(
        !msg.contains("0123456789abcdef") && !msg.contains("42-printed-2"),
        "{msg}"
    );

    let err = sh("exec sleep 5", Duration::from_millis(200))
        .fetch()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did not finish within 200ms"), "{err}");

    let err = CommandTokenSource {
        argv: vec![],
        timeout: Duration::from_secs(1),
    }
    .fetch()
    .await
    .unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
}
