//! End-to-end: two coordinator replicas on one etcd prefix (issue 11, "Replicas" and "Tests with a real etcd").
//!
//! One fleet, one test function, in phases that build on each other (each namespaced test costs CI time):
//!
//! * **a. shared fleet** — agents enroll concurrently, some through replica 1 and some through replica 2, with
//!   ONE token (its CA pin is valid on both); overlay addresses are unique and never a replica's; every replica
//!   shows every node connected; `nimbusctl replicas` lists both, with exactly one leader.
//! * **d. mail** — revoking through replica 1 a node whose stream replica 2 holds stops that agent ("revoked").
//! * **c. paused leader** — the leader is SIGSTOPped past its lease: the other replica takes over (and the
//!   paused one's agents move to it); after SIGCONT there is exactly one leader and the old one logs that it
//!   stepped down.
//! * **b+c. failover** — the replica now holding every stream (the leader since the previous phase; the one
//!   the agents enrolled through second when replica 1 led first) is SIGKILLed: the agents stream to the
//!   survivor within the lease TTL plus two heartbeats (measured, < 30 s), node ids unchanged; the survivor
//!   becomes leader and the replica list shrinks to one after the TTL.
//! * **restart** — the killed replica starts again on its data dir: same overlay address and WireGuard key;
//!   the agents know it again with that key and reach it through the tunnel.
//! * **e. etcd restart** — etcd is killed and started again on its data: both replicas answer admin calls
//!   again, mail between them still works, and past the lease TTL both are still registered and see every
//!   remaining agent connected (their leases were renewed through the restart).
//!
//! Needs root, etcd-server and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use e2e::etcd::Etcd;
use e2e::fleet::{
    OVERLAY_COORDINATOR, agent_name, in_overlay, overlay_ip, replica_role, replica_this as this, replica_view as view,
    settled_replica_pair as settled_pair, str_field,
};
use e2e::scrape::{self, AGENT_METRICS};
use e2e::{Attempt, Fleet, FleetOptions, patience, poll_until, require_root};

/// Agents 1..=2 enroll through replica 1, 3..=5 through replica 2; agent-5 is revoked in the mail phase.
const AGENTS: usize = 5;
const VIA_REPLICA_1: [usize; 2] = [1, 2];
const VIA_REPLICA_2: [usize; 3] = [3, 4, 5];
const REVOKED: usize = 5;
/// The agents alive after the mail phase.
const LIVE: [usize; 4] = [1, 2, 3, 4];
/// Revoked (through the replica not holding its stream) after the etcd restart: the replicas' mail still works.
const REVOKED_AFTER_ETCD: usize = 4;
/// The coordinators' leader and replica lease TTL (their default).
const LEASE_TTL: Duration = Duration::from_secs(10);
/// Heartbeat interval given to the coordinators: agents move after two unanswered heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long the leader stays SIGSTOPped: past its lease.
const PAUSE: Duration = Duration::from_secs(12);
/// The id an agent's log gives the replica it enrolled through, before it learnt the replica list.
const ENROLLING_REPLICA: &str = "coordinator";
/// Poll interval of the timed waits.
const POLL: Duration = Duration::from_millis(250);

fn names(agents: &[usize]) -> Vec<String> {
    agents.iter().map(|i| agent_name(*i)).collect()
}

/// The entry of replica `id` in a replica view.
fn entry<'a>(view: &'a [Value], id: &str) -> Option<&'a Value> {
    view.iter().find(|r| str_field(r, "id") == id)
}

/// Node name → node id, as replica `n` lists them.
fn node_ids(fleet: &Fleet, n: usize) -> BTreeMap<String, String> {
    fleet
        .nodes_on(n)
        .iter()
        .map(|x| (str_field(x, "name").to_string(), str_field(x, "id").to_string()))
        .collect()
}

/// Every node of `names` is `connected` in replica `n`'s `nimbusctl nodes`.
fn all_connected(fleet: &Fleet, n: usize, names: &[String]) -> Result<(), String> {
    let nodes = fleet.try_nodes_on(n).map_err(|e| e.to_string())?;
    let waiting: Vec<String> = names
        .iter()
        .filter_map(|name| match nodes.iter().find(|x| str_field(x, "name") == name) {
            Some(x) if str_field(x, "state") == "connected" => None,
            Some(x) => Some(format!("{name} is {:?}", str_field(x, "state"))),
            None => Some(format!("{name} is not listed")),
        })
        .collect();
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!("through {}: {}", replica_role(n), waiting.join(", ")))
    }
}

/// The replica agent `i`'s fleet stream went to last, from its log (`fleet stream open ... replica=ID`). The
/// first stream after enrollment names the enrolling replica `coordinator` (the agent knows no list yet):
/// that is the replica agent `i` enrolled through (`ids`: replica number → id).
fn stream_replica(fleet: &Fleet, i: usize, ids: &BTreeMap<usize, String>) -> Option<String> {
    let log = fleet.agent(i).log();
    let line = log.lines().rev().find(|l| l.contains("fleet stream open"))?;
    let id = line.split_whitespace().find_map(|w| w.strip_prefix("replica="))?;
    if id == ENROLLING_REPLICA {
        let via = if VIA_REPLICA_1.contains(&i) { 1 } else { 2 };
        return ids.get(&via).cloned();
    }
    Some(id.to_string())
}

/// Every live agent's stream is on replica `n` (id `id`): each agent's last stream opened there, and the
/// replica counts at least that many streams (a revoked agent's stream may still be counted for a while).
fn streams_on(fleet: &Fleet, n: usize, ids: &BTreeMap<usize, String>) -> Result<(), String> {
    let id = &ids[&n];
    let elsewhere: Vec<String> = LIVE
        .iter()
        .filter_map(|i| match stream_replica(fleet, *i, ids) {
            Some(r) if r == *id => None,
            other => Some(format!("{} streams to {other:?}", agent_name(*i))),
        })
        .collect();
    if !elsewhere.is_empty() {
        return Err(format!("not every agent streams to {id}: {}", elsewhere.join(", ")));
    }
    let v = view(fleet, n)?;
    let held = this(&v).and_then(|e| e["agents"].as_u64()).unwrap_or(0);
    if held < LIVE.len() as u64 {
        return Err(format!(
            "{} counts {held} streams, want {}: {v:?}",
            replica_role(n),
            LIVE.len()
        ));
    }
    Ok(())
}

/// The agent's stored replica list (identity.json): replica id → (public key, overlay address).
fn agent_replicas(fleet: &Fleet, i: usize) -> Result<BTreeMap<String, (String, String)>, String> {
    let identity = fleet.agent_identity(i).map_err(|e| e.to_string())?;
    Ok(identity["replicas"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|r| {
                    (
                        str_field(r, "id").to_string(),
                        (
                            str_field(r, "public_key").to_string(),
                            str_field(r, "overlay_ip").to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Polls `f` until it is `Ok` or `timeout` passes; panics naming `what` (phase and condition) and the last
/// reason it did not hold.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    poll_until(what, timeout, POLL, || match f() {
        Ok(v) => Attempt::Done(v),
        Err(e) => Attempt::Retry(e),
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn phase(start: Instant, what: &str) {
    eprintln!("[{:>6.1}s] replicas e2e: {what}", start.elapsed().as_secs_f64());
}

#[test]
fn replicas_share_the_fleet_elect_one_leader_and_fail_over() {
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
    let mut etcd = fleet.with_shared_etcd("e2e-replicas/").unwrap();
    fleet.extend_coordinator_args([
        "--heartbeat-interval".to_string(),
        format!("{}s", HEARTBEAT.as_secs()),
        // Short probe windows: the latency phase sees a fleet-wide matrix within seconds.
        "--probe-interval".into(),
        "200ms".into(),
        "--probe-window".into(),
        "2s".into(),
    ]);
    fleet.start_replica(1);
    fleet.start_replica(2);
    phase(start, "etcd and two replicas up");

    // ----- a. one fleet through two replicas -----------------------------------------------------------------
    // One token from replica 1; agents enroll at the same time through both replicas with its CA pin.
    let token = fleet.create_token("1h", AGENTS as u32);
    for i in VIA_REPLICA_1 {
        fleet.start_agent_via(1, i, Some(&token), &[]);
    }
    for i in VIA_REPLICA_2 {
        fleet.start_agent_via(2, i, Some(&token), &[]);
    }
    let all = names(&(1..=AGENTS).collect::<Vec<_>>());
    // "connected" is fleet-wide: each replica sees every node connected, whichever holds its stream.
    let nodes = fleet.wait_connected_on(1, &all);
    fleet.wait_connected_on(2, &all);
    phase(
        start,
        "a: every agent enrolled (one token, both replicas) and is connected on both replicas",
    );

    let (ids, first_leader) = wait_for("a: both replicas listed, one leader", patience(), || {
        settled_pair(&fleet)
    });
    let pair = view(&fleet, 1).unwrap();
    let replica_ips: BTreeMap<usize, Ipv4Addr> = ids
        .iter()
        .map(|(n, id)| {
            let e = entry(&pair, id).unwrap();
            (
                *n,
                str_field(e, "overlay_ip")
                    .parse()
                    .unwrap_or_else(|e| panic!("replica {id} overlay_ip: {e}")),
            )
        })
        .collect();
    assert_eq!(
        replica_ips[&1], OVERLAY_COORDINATOR,
        "the first replica takes the overlay's first host address: {pair:?}"
    );
    assert_ne!(
        replica_ips[&1], replica_ips[&2],
        "the replicas share an overlay address: {pair:?}"
    );
    assert!(
        in_overlay(replica_ips[&2]),
        "replica 2's overlay address is outside the overlay: {pair:?}"
    );
    for n in [1, 2] {
        let e = entry(&pair, &ids[&n]).unwrap();
        assert_eq!(
            str_field(e, "enroll_endpoint"),
            fleet.replica_enroll_endpoint(n).to_string(),
            "replica {n}'s enroll_endpoint in `nimbusctl replicas`: {pair:?}"
        );
    }
    let mut node_ips = BTreeSet::new();
    let mut node_id_set = BTreeSet::new();
    for node in &nodes {
        let ip = overlay_ip(node).unwrap();
        assert!(
            in_overlay(ip),
            "{} got {ip}, outside the overlay",
            str_field(node, "name")
        );
        assert!(
            !replica_ips.values().any(|r| *r == ip),
            "{} got {ip}, a replica's overlay address ({replica_ips:?})",
            str_field(node, "name")
        );
        assert!(
            node_ips.insert(ip),
            "overlay address {ip} given twice under concurrent enrollment: {nodes:?}"
        );
        assert!(
            node_id_set.insert(str_field(node, "id").to_string()),
            "node id given twice: {nodes:?}"
        );
    }
    // Each agent streams to the replica it enrolled through.
    wait_for(
        "a: each agent streaming to the replica it enrolled through",
        patience(),
        || {
            let v = view(&fleet, 1)?;
            let held = |n: usize| entry(&v, &ids[&n]).map(|e| e["agents"].as_u64().unwrap_or(0));
            let want = (Some(VIA_REPLICA_1.len() as u64), Some(VIA_REPLICA_2.len() as u64));
            if (held(1), held(2)) == want {
                Ok(())
            } else {
                Err(format!(
                    "streams held (replica 1, replica 2) = {:?}, want {want:?}: {v:?}",
                    (held(1), held(2))
                ))
            }
        },
    );
    phase(
        start,
        &format!(
            "a: unique overlay addresses, streams where they enrolled, one leader ({})",
            replica_role(first_leader)
        ),
    );

    // ----- a2. one latency mesh across the replicas ----------------------------------------------------------
    // Agents on replica 1 probe agents on replica 2 and back (members and the probe key shared through the
    // store), and either replica shows the whole matrix (windows shared through the store).
    let want = AGENTS * (AGENTS - 1);
    for n in [1, 2] {
        wait_for(
            &format!("a2: every ordered pair measured, as replica {n} shows it"),
            patience(),
            || {
                let v = fleet.try_ctl_json_on(n, &["latency"]).map_err(|e| e.to_string())?;
                let measured: BTreeSet<(String, String)> = v["pairs"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter(|p| p["samples"].as_u64().unwrap_or(0) > 0)
                    .map(|p| (str_field(p, "from").to_string(), str_field(p, "to").to_string()))
                    .collect();
                if measured.len() == want {
                    Ok(())
                } else {
                    Err(format!("{} of {want} pairs measured: {measured:?}", measured.len()))
                }
            },
        );
    }
    phase(start, "a2: one latency matrix across both replicas, on each");

    // ----- a3. a replica rotates its own WireGuard key; CA rotation is refused on etcd --------------------------
    // Every agent — those streaming to replica 2 (told on their stream) and those on replica 1 (told by the
    // replica list) — moves its peer for replica 2 to the new key; after --finish only the new key is answered
    // and every agent is still connected; the store's sealed copy is the new key (checked by the restart phase
    // below, which expects the replica to come back with the wg.key it has then).
    let r = fleet.ctl_json_on(2, &["key", "rotate", "wireguard", "--overlap", "10m"]);
    assert_eq!(r["state"], "overlap", "rotation on replica 2: {r}");
    let new_key = str_field(&r, "new_key").to_string();
    for i in 1..=AGENTS {
        wait_for(
            &format!("a3: agent-{i} uses replica 2's new WireGuard key"),
            patience(),
            || {
                let known = agent_replicas(&fleet, i)?;
                match known.get(&ids[&2]) {
                    Some((key, _)) if *key == new_key => Ok(()),
                    other => Err(format!("replica 2 as agent-{i} knows it: {other:?}")),
                }
            },
        );
    }
    let r = fleet.ctl_json_on(2, &["key", "rotate", "wireguard", "--finish"]);
    assert_eq!(r["state"], "done", "finishing the rotation on replica 2: {r}");
    fleet.wait_connected_on(1, &all);
    fleet.wait_connected_on(2, &all);
    let refused = fleet.ctl_on(1, &["key", "rotate", "ca"]);
    assert!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("not supported yet"),
        "CA rotation on etcd must be refused with a reason: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    phase(
        start,
        "a3: replica 2 rotated its WireGuard key; every agent followed; CA rotation refused",
    );

    // ----- d. mail: revoke through replica 1 a node whose stream replica 2 holds -----------------------------
    let out = fleet.ctl_on(
        1,
        &["node", "revoke", &agent_name(REVOKED), "--reason", "e2e replicas mail"],
    );
    assert!(
        out.status.success(),
        "node revoke through replica 1 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.expect_agent_exit(REVOKED, 10, "revoked");
    wait_for(
        "d: replica 2 listing the node revoked through replica 1",
        patience(),
        || {
            let nodes = fleet.try_nodes_on(2).map_err(|e| e.to_string())?;
            match nodes.iter().find(|x| str_field(x, "name") == agent_name(REVOKED)) {
                Some(x) if str_field(x, "state") == "revoked" => Ok(()),
                other => Err(format!("replica 2 lists {}: {other:?}", agent_name(REVOKED))),
            }
        },
    );
    let live = names(&LIVE);
    fleet.wait_connected_on(1, &live);
    phase(
        start,
        "d: revocation through replica 1 reached the agent streaming to replica 2",
    );

    // ----- c. the leader paused past its lease ---------------------------------------------------------------
    let (ids, paused) = settled_pair(&fleet).unwrap();
    let other = 3 - paused;
    fleet.replica(paused).signal(Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    let takeover = wait_for(
        "c: the other replica to lead while the leader is paused",
        LEASE_TTL + Duration::from_secs(10),
        || {
            let v = view(&fleet, other)?;
            match this(&v) {
                Some(me) if me["leader"] == true => Ok(stopped.elapsed()),
                _ => Err(format!("{} does not lead yet: {v:?}", replica_role(other))),
            }
        },
    );
    phase(
        start,
        &format!(
            "c: {} took over {:.1}s after {} was SIGSTOPped",
            replica_role(other),
            takeover.as_secs_f64(),
            replica_role(paused)
        ),
    );
    // The paused replica's agents move their streams to the live one (two unanswered heartbeats).
    let moved = wait_for(
        "c: the paused replica's agents to stream to the other",
        patience(),
        || {
            streams_on(&fleet, other, &ids)?;
            Ok(stopped.elapsed())
        },
    );
    if let Some(rest) = PAUSE.checked_sub(stopped.elapsed()) {
        std::thread::sleep(rest);
    }
    fleet.replica(paused).signal(Signal::SIGCONT).unwrap();
    phase(
        start,
        &format!(
            "c: streams on {} {:.1}s after the pause; {} resumed after {:.1}s",
            replica_role(other),
            moved.as_secs_f64(),
            replica_role(paused),
            stopped.elapsed().as_secs_f64()
        ),
    );
    // Exactly one leader afterwards — the one that took over — and the old one knows it stepped down.
    let (_, leader) = wait_for("c: one agreed leader after SIGCONT", patience(), || {
        settled_pair(&fleet)
    });
    assert_eq!(leader, other, "after SIGCONT the replica that took over still leads");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let (_, l) = settled_pair(&fleet).unwrap_or_else(|e| panic!("after SIGCONT, not one agreed leader: {e}"));
        assert_eq!(l, other, "leadership flipped back to the resumed replica");
    }
    let log = fleet.replica(paused).log().to_lowercase();
    assert!(
        log.contains("stepped down") || log.contains("following leader"),
        "{}'s log does not say it stepped down or follows: {}",
        replica_role(paused),
        e2e::fleet::tail(&log, 40)
    );
    for n in [1, 2] {
        wait_for("c: every agent connected after SIGCONT", patience(), || {
            all_connected(&fleet, n, &live)
        });
    }
    phase(start, "c: one leader after SIGCONT; the resumed replica stepped down");

    // ----- b + c. SIGKILL the replica holding every stream (the leader) -------------------------------------
    let victim = other;
    let survivor = paused;
    let before_kill = node_ids(&fleet, survivor);
    let victim_id = ids[&victim].clone();
    let victim_ip = replica_ips[&victim];
    let victim_key_file = fleet.replica_data_dir(victim).join("wg.key");
    let victim_key =
        std::fs::read(&victim_key_file).unwrap_or_else(|e| panic!("reading {}: {e}", victim_key_file.display()));
    let victim_public: BTreeMap<usize, String> = LIVE
        .iter()
        .map(|i| {
            let known = agent_replicas(&fleet, *i).unwrap();
            let (key, _) = known
                .get(&victim_id)
                .unwrap_or_else(|| panic!("{} does not know replica {victim_id}: {known:?}", agent_name(*i)));
            (*i, key.clone())
        })
        .collect();
    let switches_before: BTreeMap<usize, f64> = LIVE
        .iter()
        .map(|i| {
            let text = scrape::scrape(fleet.agent_ns(*i), AGENT_METRICS).unwrap();
            (
                *i,
                scrape::sample(&text, "nimbus_agent_replica_switches_total", &[]).unwrap_or(0.0),
            )
        })
        .collect();
    fleet.kill_replica(victim);
    let killed = Instant::now();
    // One loop, three facts, each timed when first seen: the streams are on the survivor (and every node is
    // connected there), the survivor leads, the replica list has shrunk to the survivor.
    let (mut streams, mut lead, mut shrunk) = (None, None, None);
    let mut last = String::new();
    while (streams.is_none() || lead.is_none() || shrunk.is_none()) && killed.elapsed() < Duration::from_secs(40) {
        if let Ok(v) = view(&fleet, survivor) {
            let me = this(&v);
            if streams.is_none()
                && streams_on(&fleet, survivor, &ids).is_ok()
                && all_connected(&fleet, survivor, &live).is_ok()
            {
                streams = Some(killed.elapsed());
            }
            if lead.is_none() && me.is_some_and(|e| e["leader"] == true) {
                lead = Some(killed.elapsed());
            }
            if shrunk.is_none() && v.len() == 1 {
                shrunk = Some(killed.elapsed());
            }
            last = format!("{v:?}");
        }
        std::thread::sleep(POLL);
    }
    let secs = |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
    eprintln!(
        "replicas e2e: after SIGKILL of {}: streams on {} at {}, leader at {}, list of one at {} \
         (lease TTL {:?}, heartbeat {:?})",
        replica_role(victim),
        replica_role(survivor),
        secs(streams),
        secs(lead),
        secs(shrunk),
        LEASE_TTL,
        HEARTBEAT
    );
    let streams = streams.unwrap_or_else(|| {
        panic!(
            "the agents' streams never reached {} (last view {last})",
            replica_role(survivor)
        )
    });
    assert!(
        streams < Duration::from_secs(30),
        "the agents took {streams:?} to stream to the survivor (lease TTL + two heartbeats + margin is < 30 s)"
    );
    let lead = lead.unwrap_or_else(|| panic!("{} never became leader (last view {last})", replica_role(survivor)));
    assert!(
        lead < LEASE_TTL + Duration::from_secs(8),
        "the survivor took {lead:?} to lead (lease TTL {LEASE_TTL:?} + a few s)"
    );
    let shrunk = shrunk.unwrap_or_else(|| panic!("the replica list never shrank to one (last view {last})"));
    assert!(
        shrunk < LEASE_TTL + Duration::from_secs(8),
        "the dead replica stayed listed for {shrunk:?} (lease TTL {LEASE_TTL:?})"
    );
    assert_eq!(
        node_ids(&fleet, survivor),
        before_kill,
        "node ids changed with the failover"
    );
    for i in LIVE {
        assert!(
            fleet.agent(i).is_running(),
            "{} exited during the failover",
            agent_name(i)
        );
        let text = scrape::scrape(fleet.agent_ns(i), AGENT_METRICS).unwrap();
        let now = scrape::sample(&text, "nimbus_agent_replica_switches_total", &[]).unwrap_or(0.0);
        assert!(
            now > switches_before[&i],
            "{}: nimbus_agent_replica_switches_total stayed at {now} over the failover",
            agent_name(i)
        );
    }
    phase(start, "b: failover done");

    // ----- restart the killed replica on its data dir --------------------------------------------------------
    fleet.start_replica(victim);
    let (back_ids, leader) = wait_for("restart: both replicas listed again, one leader", patience(), || {
        settled_pair(&fleet)
    });
    assert_eq!(back_ids[&victim], victim_id, "the restarted replica has another id");
    assert_eq!(
        leader, survivor,
        "the restarted replica took the leadership from a live leader"
    );
    let v = view(&fleet, survivor).unwrap();
    assert_eq!(
        entry(&v, &victim_id).map(|e| str_field(e, "overlay_ip").to_string()),
        Some(victim_ip.to_string()),
        "the restarted replica's overlay address changed: {v:?}"
    );
    let key_after = std::fs::read(&victim_key_file).unwrap();
    assert!(
        key_after == victim_key,
        "the restarted replica's WireGuard key file changed"
    );
    for i in LIVE {
        // The agents learn it again (same public key, same overlay address) and reach it through the tunnel.
        wait_for(
            "restart: the agent knowing the restarted replica with its old key",
            patience(),
            || {
                let known = agent_replicas(&fleet, i)?;
                match known.get(&victim_id) {
                    Some((key, ip)) if *key == victim_public[&i] && *ip == victim_ip.to_string() => Ok(()),
                    other => Err(format!("{} knows replica {victim_id} as {other:?}", agent_name(i))),
                }
            },
        );
        wait_for(
            "restart: ping from the agent to the restarted replica's overlay address",
            patience(),
            || {
                fleet
                    .agent_ns(i)
                    .ping(IpAddr::V4(victim_ip))
                    .map_err(|e| format!("{}: {e}", agent_name(i)))
            },
        );
    }
    for n in [1, 2] {
        wait_for("restart: every agent connected", patience(), || {
            all_connected(&fleet, n, &live)
        });
    }
    phase(
        start,
        "restart: same overlay address and key; agents reach the restarted replica",
    );

    // ----- e. etcd restarts: both replicas recover -----------------------------------------------------------
    // Every stream is on `survivor` now; the restarted `victim` holds none.
    let before_etcd = node_ids(&fleet, 1);
    etcd.kill();
    let etcd_down = Instant::now();
    etcd.start_again(Some(fleet.coordinator_ns())).unwrap();
    for n in [1, 2] {
        wait_for("e: every agent connected after the etcd restart", patience(), || {
            all_connected(&fleet, n, &live)
        });
        assert_eq!(
            node_ids(&fleet, n),
            before_etcd,
            "node ids through {} after the etcd restart",
            replica_role(n)
        );
    }
    wait_for(
        "e: both replicas listed, one leader after the etcd restart",
        patience(),
        || settled_pair(&fleet),
    );
    let t = fleet
        .try_ctl_json_on(victim, &["token", "create", "--ttl", "1h", "--uses", "1"])
        .unwrap_or_else(|e| panic!("a write through {} after the etcd restart: {e}", replica_role(victim)));
    assert!(
        str_field(&t, "token").starts_with("nimbus1."),
        "token create after the etcd restart: {t}"
    );
    phase(
        start,
        &format!(
            "e: admin calls work on both replicas {:.1}s after etcd was killed",
            etcd_down.elapsed().as_secs_f64()
        ),
    );
    // The replicas' own background work on etcd recovers too: mail from one replica reaches the other's agent...
    let out = fleet.ctl_on(
        victim,
        &[
            "node",
            "revoke",
            &agent_name(REVOKED_AFTER_ETCD),
            "--reason",
            "e2e after etcd",
        ],
    );
    assert!(
        out.status.success(),
        "node revoke through {} after the etcd restart failed: {}",
        replica_role(victim),
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.expect_agent_exit(REVOKED_AFTER_ETCD, 10, "revoked");
    // ... and their leases are renewed: past the TTL after the restart, each replica still lists the other, and
    // the sessions (bound to the holder's lease) still show every remaining agent connected on both.
    if let Some(rest) = (LEASE_TTL + Duration::from_secs(3)).checked_sub(etcd_down.elapsed()) {
        std::thread::sleep(rest);
    }
    wait_for(
        "e: past the lease TTL, both replicas still registered (leases renewed)",
        Duration::from_secs(5),
        || settled_pair(&fleet),
    );
    let remaining = names(&LIVE[..LIVE.len() - 1]);
    for n in [1, 2] {
        wait_for(
            "e: past the lease TTL, every session still recorded",
            Duration::from_secs(5),
            || all_connected(&fleet, n, &remaining),
        );
        assert!(
            fleet.replica(n).is_running(),
            "{} exited over the etcd restart",
            replica_role(n)
        );
    }
    phase(
        start,
        "e: past the lease TTL after the etcd restart, both replicas are registered and see every session",
    );
}
