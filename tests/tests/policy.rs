//! End-to-end: a fleet policy applied to four agents. Each node gets the right environment, pool, cohorts and
//! labels, delivered over its own fleet stream and acknowledged; re-applying changes nothing; a change touches
//! only the affected nodes; a disruptive change is refused without `--allow-disruptive` and goes out in waves
//! with it, each node's wave done only when its kubelet is reset (leaving) or joined again (rollback); a
//! coordinator restart changes nobody's desired state; rollback restores a revision.
//! kubeadm and the join-token command are TEST STAND-INs (`e2e::kubeadm`); the environment gives no API access
//! the coordinator can use (a bearer-token command), so nodes leave without a drain (logged).
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use e2e::fleet::{JoinToken, agent_name, str_field};
use e2e::kubeadm::{KubeadmStandIn, install_mint_command};
use e2e::{Fleet, eventually_patiently, require_root};
use serde_json::Value;

const ENV: &str = r#"version: 1
environments:
  - name: production
    match: { labels: { env: prod } }
    kubernetes:
      api_endpoint: "10.0.0.10:6443"
      ca_cert_hash: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
      credentials: { token_command: [/bin/false] }
      join_token_command: [MINT]
"#;

/// Where the join-token stand-in lives (beside the policy file).
fn mint(fleet: &Fleet) -> std::path::PathBuf {
    fleet.work_dir().join("mint-join-token")
}

fn policy(fleet: &Fleet, db_tier: &str, web_labels: &str) -> String {
    let env = ENV.replace("MINT", &mint(fleet).display().to_string());
    format!(
        "{env}pools:\n  - name: db\n    match: {{ labels: {{ tier: {db_tier} }} }}\n    min: 1\n    max_unavailable: 1\n  - name: web\n    match: {{ labels: {{ tier: web }} }}\n    min: 1\n    labels: {{ {web_labels} }}\ncohorts:\n  - name: hub-enclave\n    pools: [db]\n  - name: edge\n    pools: [web]\n"
    )
}

fn token(fleet: &Fleet, tier: &str) -> JoinToken {
    fleet.create_labelled_token("1h", 2, &format!("env=prod,tier={tier}"))
}

/// (env, pool, convergence) per node name.
fn places(fleet: &Fleet) -> BTreeMap<String, (String, String, String)> {
    fleet
        .nodes()
        .iter()
        .map(|n| {
            let p = &n["placement"];
            (
                str_field(n, "name").to_string(),
                (
                    p["environment"].as_str().unwrap_or("").to_string(),
                    p["pool"].as_str().unwrap_or("").to_string(),
                    str_field(n, "convergence").to_string(),
                ),
            )
        })
        .collect()
}

fn wait_places(fleet: &Fleet, want: &[(&str, &str)]) -> BTreeMap<String, (String, String, String)> {
    eventually_patiently(|| {
        let got = places(fleet);
        let ok = want.iter().all(|(name, pool)| {
            got.get(*name).is_some_and(|(env, p, conv)| {
                p == pool && (pool.is_empty() || env == "production") && conv == "converged"
            })
        });
        if ok {
            Ok(got)
        } else {
            Err(format!("want {want:?}, have {got:?}"))
        }
    })
}

/// The agent's recorded desired state.
fn recorded(fleet: &Fleet, i: usize) -> Value {
    let path = fleet.agent_state_dir(i).join("desired.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn apply(fleet: &Fleet, file: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["apply", "-f", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    fleet.ctl(&args)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_policy_places_nodes_converges_them_and_changes_only_what_it_must() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(4);
    install_mint_command(&mint(&fleet)).unwrap();
    let (db, web) = (token(&fleet, "db"), token(&fleet, "web"));
    let mut kubeadm = Vec::new();
    for i in 1..=4 {
        let k = KubeadmStandIn::install(&fleet.work_dir().join(format!("kubeadm-{i}"))).unwrap();
        let args = k.agent_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fleet.start_agent(i, Some(if i <= 2 { &db } else { &web }), &args);
        kubeadm.push(k);
    }
    fleet.wait_connected(&(1..=4).map(agent_name).collect::<Vec<_>>());
    let file = fleet.work_dir().join("policy.yaml");

    // A bad file is refused with its position and nothing is stored.
    std::fs::write(&file, "version: 1\ncolour: blue\n").unwrap();
    let bad = apply(&fleet, &file, &[]);
    assert_eq!(bad.status.code(), Some(65), "{}", text(&bad));
    assert!(text(&bad).contains("policy.yaml:2:1"), "{}", text(&bad));

    // Apply: every node placed by its enrollment labels, told over its stream, acknowledged.
    std::fs::write(&file, policy(&fleet, "db", "")).unwrap();
    let out = apply(&fleet, &file, &[]);
    assert!(
        out.status.success() && text(&out).contains("applied revision 1"),
        "{}",
        text(&out)
    );
    wait_places(
        &fleet,
        &[
            ("agent-1", "db"),
            ("agent-2", "db"),
            ("agent-3", "web"),
            ("agent-4", "web"),
        ],
    );
    eventually_patiently(|| {
        let joined = kubeadm.iter().filter(|k| k.joins() == 1).count();
        if joined == 4 {
            Ok(())
        } else {
            Err(format!("{joined} of 4 nodes joined"))
        }
    });
    let r1 = recorded(&fleet, 1);
    assert_eq!(r1["pool"], "db", "{r1}");
    assert_eq!(r1["cohorts"], serde_json::json!(["hub-enclave"]), "{r1}");
    assert_eq!(r1["labels"]["polynimbus.io/pool"], "db", "{r1}");
    assert_eq!(r1["generation"], 1);

    // The same file again: nothing changes, no revision is stored.
    let again = apply(&fleet, &file, &[]);
    assert!(
        again.status.success() && text(&again).contains("unchanged"),
        "{}",
        text(&again)
    );
    assert_eq!(fleet.ctl_json(&["policy", "history"]).as_array().unwrap().len(), 1);

    // A label on the web pool: only agent-3 and agent-4 change.
    std::fs::write(&file, policy(&fleet, "db", "\"polynimbus.io/ingress\": \"true\"")).unwrap();
    let diff = fleet.ctl_json(&["diff", "-f", file.to_str().unwrap()]);
    let changed: Vec<&str> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    assert_eq!(changed, ["agent-3", "agent-4"], "{diff}");
    assert!(fleet.ctl(&["apply", "-f", file.to_str().unwrap()]).status.success());
    eventually_patiently(|| match recorded(&fleet, 3)["generation"].as_u64() {
        Some(2) => Ok(()),
        g => Err(format!("agent-3 at generation {g:?}")),
    });
    assert_eq!(recorded(&fleet, 3)["labels"]["polynimbus.io/ingress"], "true");
    assert_eq!(recorded(&fleet, 1)["generation"], 1, "agent-1 untouched");

    // Moving the db nodes out of their pool is disruptive: refused without consent, nothing changes.
    std::fs::write(&file, policy(&fleet, "olap", "\"polynimbus.io/ingress\": \"true\"")).unwrap();
    let refused = apply(&fleet, &file, &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("--allow-disruptive"), "{}", text(&refused));
    assert_eq!(places(&fleet)["agent-1"].1, "db");
    // With consent they go in waves (max_unavailable 1) and both end unplaced, acknowledged.
    let json = fleet.ctl_json(&["apply", "-f", file.to_str().unwrap(), "--allow-disruptive"]);
    assert_eq!(json["staged_in_waves"], 2, "{json}");
    wait_places(&fleet, &[("agent-1", ""), ("agent-2", ""), ("agent-3", "web")]);
    let reason = fleet.node("agent-1").unwrap()["unplaced_reason"].clone();
    assert!(reason.as_str().unwrap().contains("pool"), "{reason}");
    // Each left its cluster (kubeadm reset) before the wave counted it healthy; the rollout is complete.
    let (status, waves) = fleet.wait_rollout("completed");
    assert_eq!(status["counts"]["healthy"], 2, "{status}");
    assert_eq!(waves, [1, 2], "one db node at a time: {status}");
    assert!(
        kubeadm[..2]
            .iter()
            .all(|k| k.resets() == 1 && k.joined_server().is_none())
    );
    assert_eq!(kubeadm[2].resets(), 0);

    // A coordinator restart hands nobody a new generation.
    let before: Vec<Value> = (1..=4).map(|i| recorded(&fleet, i)["generation"].clone()).collect();
    fleet.coordinator().terminate().unwrap();
    assert!(fleet.coordinator().wait_exit(e2e::patience()).is_some());
    fleet.start_coordinator();
    fleet.wait_connected(&(1..=4).map(agent_name).collect::<Vec<_>>());
    wait_places(&fleet, &[("agent-1", ""), ("agent-3", "web")]);
    let after: Vec<Value> = (1..=4).map(|i| recorded(&fleet, i)["generation"].clone()).collect();
    assert_eq!(before, after);

    // Rollback to revision 1 (disruptive again): the db nodes return, the web label goes. The coordinator is
    // restarted in the middle of that rollout: it finishes it, and nobody joins twice.
    let back = fleet.ctl(&["rollback", "--to", "1", "--allow-disruptive"]);
    assert!(back.status.success(), "{}", text(&back));
    fleet.coordinator().terminate().unwrap();
    assert!(fleet.coordinator().wait_exit(e2e::patience()).is_some());
    fleet.start_coordinator();
    wait_places(
        &fleet,
        &[
            ("agent-1", "db"),
            ("agent-2", "db"),
            ("agent-3", "web"),
            ("agent-4", "web"),
        ],
    );
    // Healthy again means joined again: one more join each, and only one.
    fleet.wait_rollout("completed");
    std::thread::sleep(std::time::Duration::from_secs(2));
    eventually_patiently(|| {
        let joins: Vec<usize> = kubeadm.iter().map(KubeadmStandIn::joins).collect();
        if joins == [2, 2, 1, 1] {
            Ok(())
        } else {
            Err(format!("joins {joins:?}"))
        }
    });
    let history = fleet.ctl_json(&["policy", "history"]);
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[0]["action"], "rollback to 1");
    assert_eq!(history[0]["digest"], history[3]["digest"]);
    assert_eq!(
        history[0]["applied_by"], "uid:0",
        "who comes from the socket's peer credentials"
    );
}
