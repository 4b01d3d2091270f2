//! `nimbusctl rollout start|status|pause|resume|abort`: how a rollout (disruptive policy changes, or an agent
//! upgrade) is shown.

use nimbus_proto::RolloutStatus;
use serde_json::{Value, json};

/// The text form: a summary line, the counts, then one line per node in wave order.
pub fn text(r: &RolloutStatus, now: u64) -> String {
    if r.revision == 0 && r.kind != "agent" {
        return "no rollout has run: disruptive changes (`nimbusctl apply --allow-disruptive`) and agent upgrades \
                (`nimbusctl rollout start --version V`) go out in waves\n"
            .into();
    }
    let what = if r.kind == "agent" {
        format!("agent upgrade to {}", r.version)
    } else {
        format!("policy revision {}", r.revision)
    };
    let mut out = format!(
        "{} rollout of {what}: {}{}\n",
        if r.active { "running" } else { "last" },
        r.phase,
        if r.pause_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.pause_reason)
        }
    );
    out += &format!(
        "wave {}; {} nodes: {} healthy, {} in flight, {} pending, {} failed; a node has {} to turn healthy\n",
        r.current_wave,
        r.total,
        r.healthy,
        r.applying + r.waiting_healthy,
        r.pending,
        r.failed,
        humantime::format_duration(std::time::Duration::from_secs(r.node_timeout_secs)),
    );
    if !r.note.is_empty() {
        out += &format!("{}\n", r.note);
    }
    out += &waves_progress(r);
    let mut t = crate::table(&["NODE", "POOL", "ZONE", "WAVE", "STATE", "STARTED"]);
    for n in &r.nodes {
        t.add_row(vec![
            n.name.clone(),
            n.pool.clone(),
            if n.zone.is_empty() { "-".into() } else { n.zone.clone() },
            if n.wave == 0 { "-".into() } else { n.wave.to_string() },
            n.state.clone(),
            if n.started_unix == 0 {
                "-".into()
            } else {
                crate::ago_at(n.started_unix, now)
            },
        ]);
    }
    out += &format!("{t}\n");
    if r.active && r.phase == "paused" {
        out += "resume with `nimbusctl rollout resume`, or stop with `nimbusctl rollout abort` (nodes not moved yet keep \
                their place)\n";
    }
    out
}

/// One progress bar per wave that has started: `wave 2 [######....] 3/5 healthy, 1 failed`.
fn waves_progress(r: &RolloutStatus) -> String {
    const WIDTH: usize = 20;
    let mut out = String::new();
    let last = r.nodes.iter().map(|n| n.wave).max().unwrap_or(0);
    for wave in 1..=last {
        let nodes: Vec<_> = r.nodes.iter().filter(|n| n.wave == wave).collect();
        if nodes.is_empty() {
            continue;
        }
        let healthy = nodes.iter().filter(|n| n.state == "healthy").count();
        let failed = nodes.iter().filter(|n| n.state.starts_with("failed")).count();
        let filled = (healthy + failed) * WIDTH / nodes.len();
        out += &format!(
            "wave {wave} [{}{}] {healthy}/{} healthy{}\n",
            "#".repeat(filled),
            ".".repeat(WIDTH - filled),
            nodes.len(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
    }
    out
}

/// The `-o json` form.
pub fn json(r: &RolloutStatus) -> Value {
    json!({
        "active": r.active, "kind": r.kind, "version": r.version, "note": r.note, "revision": r.revision,
        "phase": r.phase,
        "current_wave": r.current_wave,
        "pause_reason": r.pause_reason, "node_timeout_secs": r.node_timeout_secs,
        "counts": {"total": r.total, "pending": r.pending, "applying": r.applying,
                   "waiting_healthy": r.waiting_healthy, "healthy": r.healthy, "failed": r.failed},
        "nodes": r.nodes.iter().map(|n| json!({
            "node_id": n.node_id, "name": n.name, "pool": n.pool, "zone": n.zone, "state": n.state,
            "wave": n.wave, "started_unix": n.started_unix,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::RolloutNode;

    #[test]
    fn a_paused_rollout_names_each_node_and_what_to_do() {
        let r = RolloutStatus {
            active: true,
            revision: 4,
            phase: "paused".into(),
            current_wave: 2,
            pause_reason: "1 node(s) failed, more than max_failures 0".into(),
            total: 2,
            healthy: 1,
            failed: 1,
            node_timeout_secs: 900,
            nodes: vec![
                RolloutNode {
                    name: "a1".into(),
                    pool: "db".into(),
                    zone: "z1".into(),
                    state: "healthy".into(),
                    wave: 1,
                    started_unix: 1000,
                    ..Default::default()
                },
                RolloutNode {
                    name: "a2".into(),
                    pool: "db".into(),
                    state: "failed: timed out".into(),
                    wave: 2,
                    started_unix: 1100,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let t = text(&r, 1200);
        assert!(
            t.starts_with("running rollout of policy revision 4: paused (1 node(s) failed"),
            "{t}"
        );
        assert!(
            t.contains("2 nodes: 1 healthy, 0 in flight, 0 pending, 1 failed; a node has 15m to turn healthy"),
            "{t}"
        );
        assert!(t.contains("failed: timed out"), "{t}");
        assert!(t.contains("3m ago") && t.contains("1m ago"), "{t}");
        assert!(t.contains("nimbusctl rollout resume"), "{t}");
        assert_eq!(json(&r)["counts"]["failed"], 1);
        assert!(text(&RolloutStatus::default(), 0).starts_with("no rollout has run"));
    }

    #[test]
    fn an_agent_upgrade_shows_its_version_and_a_bar_per_wave() {
        let node = |name: &str, wave: u32, state: &str| RolloutNode {
            name: name.into(),
            pool: "web".into(),
            state: state.into(),
            wave,
            ..Default::default()
        };
        let r = RolloutStatus {
            active: true,
            kind: "agent".into(),
            version: "0.2.0".into(),
            phase: "running".into(),
            current_wave: 2,
            total: 4,
            nodes: vec![
                node("c", 1, "healthy"),
                node("w1", 2, "healthy"),
                node("w2", 2, "applying"),
                node("w3", 0, "pending"),
            ],
            ..Default::default()
        };
        let t = text(&r, 0);
        assert!(
            t.starts_with("running rollout of agent upgrade to 0.2.0: running"),
            "{t}"
        );
        assert!(t.contains("wave 1 [####################] 1/1 healthy"), "{t}");
        assert!(t.contains("wave 2 [##########..........] 1/2 healthy"), "{t}");
        assert_eq!(json(&r)["kind"], "agent");
    }
}
