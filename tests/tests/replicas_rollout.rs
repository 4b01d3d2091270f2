//! End-to-end: the leader replica is SIGKILLed in the middle of an agent-upgrade rollout (issue 11, "Tests with
//! a real etcd": "kill the leader during a rollout → a new leader continues it, no node lost, no double
//! upgrade").
//!
//! One fleet, one test function, in phases:
//!
//! * **setup** — etcd, two coordinator replicas on one prefix with a shared KEK, a 2 s heartbeat and ONE
//!   `--releases-dir` (a directory of the work dir: the replicas share the release repository as they would
//!   on a ReadWriteMany volume). The repository is installed and the agents (under the upgrade launcher, with
//!   the release root pinned, as in `upgrade.rs`) enroll, half through each replica.
//! * **rollout** — the next agent build is published through replica 1 and rolled out canary first, then one
//!   node per wave (`--canary 1 --max-unavailable 1`).
//! * **kill** — after the canary is healthy, while the rollout runs, the replica that is the leader
//!   (`nimbusctl -o json replicas`, field `leader`) is SIGKILLed at the hardest moment: while an agent of a
//!   later wave downloads the new version from it (a wave's desired state carries the release URL of the
//!   replica that started the wave). Should no wave before the last fetch from the leader, it dies while the
//!   last node downloads.
//! * **failover** — the survivor becomes the only, leading replica.
//! * **completion** — the rollout completes on the survivor: every node healthy (none failed), every node runs
//!   the new version and is connected on the survivor (no node lost).
//! * **no double upgrade** — each agent installed and restarted into the new version exactly once (its log:
//!   one "restarting into the new agent version", one launcher "new version ready: confirmed"), and the two
//!   replicas' logs together started each node's upgrade exactly once ("wave: upgrading the node's agent").
//!
//! Needs root, etcd-server and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use e2e::etcd::Etcd;
use e2e::fleet::{
    agent_name, replica_leaders as leaders, replica_role, replica_this, replica_view as view,
    settled_replica_pair as settled_pair, str_field,
};
use e2e::{Attempt, Fleet, FleetOptions, expect_success, poll_until, require_root};

const AGENTS: usize = 4;
/// Agents 1 and 2 enroll through replica 1, 3 and 4 through replica 2.
const VIA_REPLICA_1: [usize; 2] = [1, 2];
const VIA_REPLICA_2: [usize; 2] = [3, 4];
/// Heartbeat interval given to the coordinators: agents move after two unanswered heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// The coordinators' leader and replica lease TTL (their default).
const LEASE_TTL: Duration = Duration::from_secs(10);
/// A node not healthy this long after its wave started fails the rollout (it pauses): a lost push shows up as
/// a failure with a reason instead of a hang. An upgrade takes seconds here.
const NODE_TIMEOUT: &str = "60s";
/// The launcher's options, as in `upgrade.rs`: one start within 15 s for a new version.
const LAUNCH: &[&str] = &["--deadline", "15s", "--max-failures", "1", "--retry-delay", "200ms"];
/// Setup waits (enrollment, connections, leadership).
const SETUP_PATIENCE: Duration = Duration::from_secs(40);
/// From the kill to the rollout's completion: the lease TTL for the takeover plus the remaining waves.
const FINISH_PATIENCE: Duration = Duration::from_secs(60);
/// Poll interval of the timed waits; the rollout is watched faster, to kill within the second wave.
const POLL: Duration = Duration::from_millis(250);
const WATCH_POLL: Duration = Duration::from_millis(100);
/// From the rollout's start to the kill: the canary and up to two more waves.
const KILL_PATIENCE: Duration = Duration::from_secs(45);

/// The agent's log line when it installed a new version and asks its launcher to restart into it.
const RESTARTING: &str = "restarting into the new agent version";
/// The launcher's log line when the new version signalled ready and was kept.
const CONFIRMED: &str = "new version ready: confirmed";
/// The agent's log line when an install starts (with the release URL).
const LOADING: &str = "upgrade: loading the release metadata";
/// The agent's log line when the download is complete and verified.
const VERIFIED: &str = "upgrade: new agent verified";
/// A coordinator's log line when a wave sets a node's desired agent release.
const UPGRADING: &str = "wave: upgrading the node's agent";

fn phase(start: Instant, what: &str) {
    eprintln!("[{:>6.1}s] replicas rollout e2e: {what}", start.elapsed().as_secs_f64());
}

/// Polls `f` until it is `Ok` or `timeout` passes; panics naming `what` and the last reason it did not hold.
fn wait_for<T>(what: &str, timeout: Duration, poll: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    poll_until(what, timeout, poll, || match f() {
        Ok(v) => Attempt::Done(v),
        Err(e) => Attempt::Retry(e),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The id of the replica that answered (`this`).
fn this_id(view: &[Value]) -> Option<String> {
    replica_this(view).map(|r| str_field(r, "id").to_string())
}

/// Each node's name → (agent version, state) as replica `n` lists them.
fn versions_on(fleet: &Fleet, n: usize) -> Result<BTreeMap<String, (String, String)>, String> {
    let nodes = fleet.try_nodes_on(n).map_err(|e| e.to_string())?;
    Ok(nodes
        .iter()
        .map(|x| {
            (
                str_field(x, "name").to_string(),
                (
                    str_field(x, "agent_version").to_string(),
                    str_field(x, "state").to_string(),
                ),
            )
        })
        .collect())
}

/// Every agent listed by replica `n`, connected and running `version`.
fn all_on_version(fleet: &Fleet, n: usize, version: &str) -> Result<(), String> {
    let v = versions_on(fleet, n)?;
    let ok = v.len() == AGENTS
        && (1..=AGENTS).all(|i| {
            v.get(&agent_name(i))
                .is_some_and(|(ver, state)| ver == version && state == "connected")
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "through {} (want {AGENTS} nodes connected on {version}): {v:?}",
            replica_role(n)
        ))
    }
}

/// `nimbusctl -o json rollout status` through replica `n`.
fn status(fleet: &Fleet, n: usize) -> Result<Value, String> {
    fleet
        .try_ctl_json_on(n, &["rollout", "status"])
        .map_err(|e| format!("rollout status through {}: {e}", replica_role(n)))
}

fn node_states(st: &Value) -> Vec<(String, String, u64)> {
    st["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| {
                    (
                        str_field(n, "name").to_string(),
                        str_field(n, "state").to_string(),
                        n["wave"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Lines of `log` containing `needle` and `field=value` (a tracing field of the text format).
fn count_lines(log: &str, needle: &str, field: &str) -> usize {
    log.lines().filter(|l| l.contains(needle) && l.contains(field)).count()
}

/// The release URL agent log `log` is downloading `version` from: it started loading the metadata or fetching
/// the artefact and has not verified the download (nor restarted into the version) yet.
fn downloading(log: &str, version: &str) -> Option<String> {
    let field = format!("version={version}");
    let mut url = None;
    for line in log.lines().filter(|l| l.contains(&field)) {
        if line.contains(LOADING) {
            url = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("url="))
                .map(str::to_string);
        } else if line.contains(VERIFIED) || line.contains(RESTARTING) {
            url = None;
        }
    }
    url
}

#[test]
fn killing_the_leader_mid_rollout_the_survivor_finishes_it_without_double_upgrades() {
    if !require_root() || !Etcd::available() {
        return;
    }
    let start = Instant::now();
    let mut fleet = Fleet::new(FleetOptions {
        start_coordinator: false,
        ..FleetOptions::test(AGENTS)
    })
    .unwrap();
    // etcd on replica 1's host, on loopback and its underlay address: replica 2 (another namespace) reaches it.
    let _etcd = fleet.with_shared_etcd("e2e-replicas-rollout/").unwrap();
    // One release repository for both replicas (in production a ReadWriteMany volume).
    let releases_dir = fleet.work_dir().join("releases");
    std::fs::create_dir_all(&releases_dir).unwrap();
    fleet.extend_coordinator_args([
        "--heartbeat-interval".to_string(),
        format!("{}s", HEARTBEAT.as_secs()),
        "--releases-dir".into(),
        releases_dir.display().to_string(),
        "--rollout-node-timeout".into(),
        NODE_TIMEOUT.into(),
    ]);
    fleet.start_replica(1);
    fleet.start_replica(2);
    phase(start, "setup: etcd and two replicas up (shared releases dir)");

    // The release repository, installed through replica 1 into the shared directory (its online keys are
    // sealed in the store for every replica).
    let ops = tempfile::tempdir().unwrap();
    let repo = ops.path().join("rel");
    expect_success(&fleet.ctl_on(
        1,
        &[
            "release",
            "init",
            "--root-key",
            &ops.path().join("root.pem").display().to_string(),
            "--out",
            &repo.display().to_string(),
        ],
    ));
    expect_success(&fleet.ctl_on(1, &["release", "install", &repo.display().to_string()]));
    let pin = repo.join("repo/metadata/1.root.json").display().to_string();

    // Agents under the launcher, half enrolling through each replica, with one token.
    let token = fleet.create_token("1h", AGENTS as u32);
    for i in VIA_REPLICA_1 {
        fleet.start_agent_launched_via(1, i, Some(&token), LAUNCH, &["--release-root", &pin]);
    }
    for i in VIA_REPLICA_2 {
        fleet.start_agent_launched_via(2, i, Some(&token), LAUNCH, &["--release-root", &pin]);
    }
    let old = env!("CARGO_PKG_VERSION");
    for n in [1, 2] {
        wait_for(
            "setup: every agent connected on its old version",
            SETUP_PATIENCE,
            POLL,
            || all_on_version(&fleet, n, old),
        );
    }
    let (ids, leader) = wait_for("setup: both replicas listed, one leader", SETUP_PATIENCE, POLL, || {
        settled_pair(&fleet)
    });
    let survivor = if leader == 1 { 2 } else { 1 };
    phase(
        start,
        &format!(
            "setup: {AGENTS} agents connected on {old} (2 enrolled through each replica); leader {} ({})",
            replica_role(leader),
            ids[&leader]
        ),
    );

    // ----- rollout: canary, then one node per wave ---------------------------------------------------------
    let next = e2e::binary("nimbus-agent-next");
    let new_version = {
        let v: Vec<u64> = old.split('.').map(|x| x.parse().unwrap()).collect();
        format!("{}.{}.{}", v[0], v[1], v[2] + 1)
    };
    expect_success(&fleet.ctl_on(
        1,
        &["release", "add", &next.display().to_string(), "--version", &new_version],
    ));
    let st = fleet.ctl_json_on(
        1,
        &[
            "rollout",
            "start",
            "--version",
            &new_version,
            "--canary",
            "1",
            "--max-unavailable",
            "1",
        ],
    );
    assert_eq!(st["kind"], "agent", "{st}");
    let rollout_started = Instant::now();
    let canary = node_states(&st)
        .into_iter()
        .find(|(_, _, w)| *w == 1)
        .map(|(name, _, _)| name)
        .unwrap_or_else(|| panic!("no canary (wave 1) in the started rollout: {st}"));
    phase(
        start,
        &format!("rollout: {new_version} published and started through replica 1; canary {canary}"),
    );

    // ----- kill: after the canary, while an agent downloads the new version from the leader ------------------
    // A wave's desired state names the release URL of the replica that started the wave (the one holding the
    // previous node's stream). The hard case is an agent fetching from the leader when it dies: wait for it (the
    // download takes seconds here). If no wave after the canary fetches from the leader before the last one,
    // the leader is killed while the last node downloads (still before the end).
    let leader_ip = {
        let v = view(&fleet, leader).unwrap();
        let e = v.iter().find(|r| str_field(r, "id") == ids[&leader]).unwrap();
        str_field(e, "overlay_ip").to_string()
    };
    let leader_url = format!("http://{leader_ip}:");
    let at_kill = poll_until(
        "rollout: after the canary, an agent downloading the new version",
        KILL_PATIENCE,
        WATCH_POLL,
        || {
            let st = match status(&fleet, leader) {
                Ok(st) => st,
                Err(e) => return Attempt::Retry(e),
            };
            let states = node_states(&st);
            if st["phase"] != "running" || states.iter().any(|(_, s, _)| s.starts_with("failed")) {
                return Attempt::Fail(format!("the rollout is not running cleanly before the kill: {st}"));
            }
            if !states.iter().any(|(n, s, _)| *n == canary && s == "healthy") {
                return Attempt::Retry(format!("the canary is not healthy yet: {st}"));
            }
            let pending = states.iter().filter(|(_, s, _)| s == "pending").count();
            for (name, state, wave) in &states {
                if state != "applying" && state != "waiting_healthy" {
                    continue;
                }
                let Some(i) = (1..=AGENTS).find(|i| agent_name(*i) == *name) else {
                    continue;
                };
                if let Some(url) = downloading(&fleet.agent(i).log(), &new_version)
                    && (url.starts_with(&leader_url) || pending == 0)
                {
                    return Attempt::Done((st.clone(), name.clone(), *wave, url));
                }
            }
            Attempt::Retry(format!("no agent is downloading from the leader ({leader_url}): {st}"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (at_kill, downloader, downloader_wave, download_url) = at_kill;
    let healthy_at_kill = at_kill["counts"]["healthy"].as_u64().unwrap_or(0);
    let in_flight: Vec<String> = node_states(&at_kill)
        .into_iter()
        .filter(|(_, s, _)| s == "applying" || s == "waiting_healthy")
        .map(|(n, s, w)| format!("{n} ({s}, wave {w})"))
        .collect();
    fleet.kill_replica(leader);
    let killed = Instant::now();
    phase(
        start,
        &format!(
            "kill: {} (the leader, {leader_ip}) SIGKILLed {:.1}s into the rollout while {downloader} (wave \
             {downloader_wave}) downloads from {download_url} ({}); {healthy_at_kill}/{AGENTS} healthy, in flight: {in_flight:?}",
            replica_role(leader),
            rollout_started.elapsed().as_secs_f64(),
            if download_url.starts_with(&leader_url) {
                "the dying leader"
            } else {
                "the survivor: no wave after the canary fetched from the leader"
            }
        ),
    );

    // ----- failover: the survivor leads alone ----------------------------------------------------------------
    wait_for(
        "failover: the survivor the only replica listed, and the leader",
        LEASE_TTL + Duration::from_secs(10),
        POLL,
        || {
            let v = view(&fleet, survivor)?;
            let me = this_id(&v).unwrap_or_default();
            if me == ids[&survivor] && v.len() == 1 && leaders(&v) == vec![me.clone()] {
                Ok(())
            } else {
                Err(format!("{v:?}"))
            }
        },
    );
    phase(
        start,
        &format!(
            "failover: {} is the leader, alone, {:.1}s after the kill",
            replica_role(survivor),
            killed.elapsed().as_secs_f64()
        ),
    );

    // ----- completion on the survivor ------------------------------------------------------------------------
    let done = wait_for(
        "completion: the rollout completed on the survivor",
        FINISH_PATIENCE,
        POLL,
        || {
            let st = status(&fleet, survivor)?;
            if st["phase"] == "completed" {
                Ok(st)
            } else if st["phase"] == "paused" || st["phase"] == "aborted" {
                // Not a transient: report at once with the reason.
                panic!("the rollout stopped on the survivor instead of completing: {st}")
            } else {
                Err(format!("{st}"))
            }
        },
    );
    let completed_after = killed.elapsed();
    assert_eq!(done["version"], new_version.as_str(), "{done}");
    assert_eq!(done["counts"]["healthy"], AGENTS as u64, "every node healthy: {done}");
    assert_eq!(done["counts"]["failed"], 0, "no node failed: {done}");
    let states = node_states(&done);
    assert_eq!(states.len(), AGENTS, "every node in the rollout: {done}");
    assert!(
        states.iter().all(|(_, s, w)| s == "healthy" && *w >= 1),
        "each node healthy, in a wave: {done}"
    );
    let waves: Vec<u64> = states.iter().map(|(_, _, w)| *w).collect();
    assert_eq!(
        waves.iter().filter(|w| **w == 1).count(),
        1,
        "the canary wave is one node: {done}"
    );
    for w in 2..=waves.iter().copied().max().unwrap_or(1) {
        assert!(
            waves.iter().filter(|x| **x == w).count() <= 1,
            "max-unavailable 1: {done}"
        );
    }
    phase(
        start,
        &format!(
            "completion: rollout completed on {} {:.1}s after the kill ({:.1}s in all)",
            replica_role(survivor),
            completed_after.as_secs_f64(),
            rollout_started.elapsed().as_secs_f64()
        ),
    );
    wait_for(
        "completion: every node connected on the survivor, on the new version",
        Duration::from_secs(20),
        POLL,
        || all_on_version(&fleet, survivor, &new_version),
    );
    phase(
        start,
        &format!("completion: all {AGENTS} nodes connected on the survivor, running {new_version}"),
    );

    // ----- no double upgrade -------------------------------------------------------------------------------
    let version_field = format!("version={new_version}");
    let mut problems = Vec::new();
    for i in 1..=AGENTS {
        let log = fleet.agent(i).log();
        let restarts = count_lines(&log, RESTARTING, &version_field);
        let confirmed = count_lines(&log, CONFIRMED, &version_field);
        if restarts != 1 || confirmed != 1 {
            problems.push(format!(
                "{}: {restarts} × {RESTARTING:?}, {confirmed} × {CONFIRMED:?} for {new_version}",
                agent_name(i)
            ));
        }
    }
    // Across both replicas (the killed one's log stays), each node's upgrade was started exactly once.
    let node_ids: BTreeMap<String, String> = fleet
        .nodes_on(survivor)
        .iter()
        .map(|x| (str_field(x, "name").to_string(), str_field(x, "id").to_string()))
        .collect();
    let coordinator_logs = [fleet.replica(1).log(), fleet.replica(2).log()];
    let mut starts_by_replica = BTreeMap::new();
    for (name, id) in &node_ids {
        let field = format!("node_id={id}");
        let per: Vec<usize> = coordinator_logs
            .iter()
            .map(|log| count_lines(log, UPGRADING, &field))
            .collect();
        if per.iter().sum::<usize>() != 1 {
            problems.push(format!(
                "{name} ({id}): upgrade started {per:?} times by (replica 1, replica 2)"
            ));
        }
        starts_by_replica.insert(name.clone(), per);
    }
    assert!(
        problems.is_empty(),
        "double (or missing) upgrades:\n{}",
        problems.join("\n")
    );
    phase(
        start,
        &format!(
            "no double upgrade: each agent restarted into {new_version} once; upgrade starts per node (replica 1, replica 2): {starts_by_replica:?}"
        ),
    );
}
