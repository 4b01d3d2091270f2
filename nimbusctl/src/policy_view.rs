//! The fleet policy in the terminal: `policy validate` (local), `diff`, `apply`, `rollback`, `policy history`,
//! `policy show`, and the placement part of `nodes` / `node show`.
//!
//! Everything here is a pure function from data to text or JSON, so the exact output is unit-tested; `main`
//! does the I/O and picks the exit code.

use comfy_table::{Cell, CellAlignment, Table, presets};
use nimbus_proto::{ApplyPolicyResponse, Node, NodeChange, PolicyRevision};
use policy::{Policy, PolicyErrors};
use serde_json::{Value, json};

/// `sysexits.h` EX_DATAERR: the policy file is invalid.
pub const EX_DATAERR: u8 = 65;

/// What the rendered [`ApplyPolicyResponse`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `nimbusctl diff`: a dry run of a file.
    Diff,
    /// `nimbusctl apply`.
    Apply,
    /// `nimbusctl rollback --to N`, dry run or not.
    Rollback { to: u64, dry_run: bool },
}

impl Verb {
    pub fn dry_run(self) -> bool {
        match self {
            Verb::Diff => true,
            Verb::Apply => false,
            Verb::Rollback { dry_run, .. } => dry_run,
        }
    }
}

/// A table without borders whose lines carry no trailing blanks, indented by `indent`.
fn plain_table(header: &[&str], rows: Vec<Vec<Cell>>, indent: &str) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(indent);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn join_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".into() } else { items.join(",") }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `0123456789ab` from `sha256:0123456789abcdef…`.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

// ------------------------------------------------------------------------------------------------ validate

/// `policy validate` on a valid file: the digest and what the policy defines.
pub fn validate_summary(file: &str, p: &Policy) -> String {
    let mut out = format!("{file}: valid, digest {}\n", p.digest());
    let envs: Vec<&str> = p.environments().iter().map(|e| e.name.as_str()).collect();
    out += &format!("environments ({}): {}\n", envs.len(), envs.join(", "));
    out += &format!("pools ({}):\n", p.pools().len());
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    let rows = p
        .pools()
        .iter()
        .map(|pool| {
            vec![
                Cell::new(&pool.name),
                Cell::new(pool.environments.as_ref().map_or("all".into(), |e| e.join(","))),
                right(pool.min.to_string()),
                right(pool.max.map_or("-".into(), |m| m.to_string())),
                right(pool.max_unavailable.to_string()),
                Cell::new(
                    p.cohorts_on(&pool.name)
                        .map(|c| c.name.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ]
        })
        .collect();
    out += &plain_table(
        &["NAME", "ENVIRONMENTS", "MIN", "MAX", "MAX-UNAVAILABLE", "COHORTS"],
        rows,
        " ",
    );
    if p.cohorts().is_empty() {
        out += "cohorts: none\n";
        return out;
    }
    out += &format!("cohorts ({}):\n", p.cohorts().len());
    let rows = p
        .cohorts()
        .iter()
        .map(|c| {
            vec![
                Cell::new(&c.name),
                Cell::new(c.pools.join(",")),
                Cell::new(join_or_dash(
                    &c.taints.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                )),
                Cell::new(join_or_dash(&c.anti_affinity)),
            ]
        })
        .collect();
    out += &plain_table(&["NAME", "POOLS", "TAINTS", "ANTI-AFFINITY"], rows, " ");
    out
}

/// `policy validate` on an invalid file: every diagnostic, one per line (`FILE:LINE:COL: MESSAGE (hint: HINT)`).
pub fn validate_errors(e: &PolicyErrors) -> String {
    e.0.iter().map(|d| format!("{d}\n")).collect()
}

/// `-o json policy validate`: `{"valid", "errors": [{file,line,column,message,hint}], "digest"}`, plus the
/// names defined when valid.
pub fn validate_json(result: &Result<Policy, PolicyErrors>) -> Value {
    match result {
        Ok(p) => json!({
            "valid": true,
            "errors": [],
            "digest": p.digest(),
            "environments": p.environments().iter().map(|e| &e.name).collect::<Vec<_>>(),
            "pools": p.pools().iter().map(|pool| json!({
                "name": pool.name, "environments": pool.environments, "min": pool.min, "max": pool.max,
                "max_unavailable": pool.max_unavailable,
            })).collect::<Vec<_>>(),
            "cohorts": p.cohorts().iter().map(|c| json!({"name": c.name, "pools": c.pools})).collect::<Vec<_>>(),
        }),
        Err(e) => json!({
            "valid": false,
            "errors": e.0.iter().map(|d| json!({
                "file": d.file, "line": d.line, "column": d.column, "message": d.message, "hint": d.hint,
            })).collect::<Vec<_>>(),
            "digest": null,
        }),
    }
}

// ------------------------------------------------------------------------------------ diff / apply / rollback

/// `environment/pool`, or `unplaced`.
fn placed(environment: &str, pool: &str) -> String {
    if pool.is_empty() {
        "unplaced".into()
    } else {
        format!("{}/{pool}", dash(environment))
    }
}

/// One node's change: `NODE: BEFORE → AFTER`, `DISRUPTIVE` when it is, then one line per change, `!` on the
/// disruptive ones.
pub fn node_change(c: &NodeChange) -> String {
    let before = placed(&c.before_environment, &c.before_pool);
    let after = placed(&c.after_environment, &c.after_pool);
    let mut out = if before == after {
        format!("{}: {after}", c.node)
    } else {
        format!("{}: {before} → {after}", c.node)
    };
    if c.disruptive {
        out += "  DISRUPTIVE";
    }
    out.push('\n');
    for ch in &c.changes {
        out += &format!("  {} {}\n", if ch.disruptive { "!" } else { " " }, ch.what);
    }
    out
}

fn warnings(r: &ApplyPolicyResponse) -> String {
    r.warnings.iter().map(|w| format!("warning: {w}\n")).collect()
}

fn against(previous: u64) -> String {
    if previous == 0 {
        "no policy (first apply)".into()
    } else {
        format!("revision {previous}")
    }
}

/// The text of a diff, apply or rollback answer (stdout). The caller exits 1 when [`refused`] says so.
pub fn response(r: &ApplyPolicyResponse, verb: Verb) -> String {
    let disruptive = r.changes.iter().filter(|c| c.disruptive).count();
    let changes: String = r.changes.iter().map(node_change).collect();
    let mut out = String::new();
    if verb.dry_run() {
        out += &match verb {
            Verb::Rollback { to, .. } => format!(
                "dry run: rollback to revision {to} against {} (policy {})\n",
                against(r.previous_revision),
                short_digest(&r.digest)
            ),
            _ => format!(
                "dry run against {} (policy {})\n",
                against(r.previous_revision),
                short_digest(&r.digest)
            ),
        };
        if r.unchanged {
            out += &format!("no changes: {} is already this policy\n", against(r.previous_revision));
        } else if r.changes.is_empty() {
            out += "no node changes (the document differs: applying stores a new revision)\n";
        } else {
            out += &changes;
            let n = plural(r.changes.len(), "node would change", "nodes would change");
            out += &if disruptive == 0 {
                format!("{n}, none disruptive\n")
            } else if r.refused_disruptive {
                format!(
                    "{n}, {disruptive} disruptive: apply would refuse them without --allow-disruptive \
                     (drains and moves these nodes in waves)\n"
                )
            } else {
                format!("{n}, {disruptive} disruptive (drained and moved in waves)\n")
            };
        }
        out += &warnings(r);
        return out;
    }
    if r.unchanged {
        out += &format!("unchanged: revision {} is already this policy\n", r.previous_revision);
        out += &warnings(r);
        return out;
    }
    if r.refused_disruptive {
        out += &format!(
            "refused: {} ({} in all)\n",
            plural(disruptive, "disruptive node change", "disruptive node changes"),
            plural(r.changes.len(), "node changes", "nodes change"),
        );
        out += &r
            .changes
            .iter()
            .filter(|c| c.disruptive)
            .map(node_change)
            .collect::<String>();
        out += &warnings(r);
        out += "nothing applied: re-run with --allow-disruptive to drain and move these nodes in waves\n";
        return out;
    }
    let previous = if r.previous_revision == 0 {
        "none".to_string()
    } else {
        r.previous_revision.to_string()
    };
    if let Verb::Rollback { to, .. } = verb {
        out += &format!("rolled back to revision {to}: ");
    }
    out += &format!(
        "applied revision {} (previous {previous}), {}\n",
        r.revision,
        plural(r.changes.len(), "node changes", "nodes change")
    );
    out += &changes;
    if r.staged_in_waves > 0 {
        out += &format!(
            "{} in waves: drained and moved one wave at a time, each after the previous one reported \
             (follow with `nimbusctl nodes --wide`, column CONVERGED)\n",
            plural(r.staged_in_waves as usize, "node goes", "nodes go")
        );
    } else if disruptive > 0 {
        out += &format!(
            "{}: drained and moved\n",
            plural(disruptive, "disruptive node change", "disruptive node changes")
        );
    }
    out += &warnings(r);
    out
}

/// Whether the answer means "nothing applied because of disruptive changes" (exit 1).
pub fn refused(r: &ApplyPolicyResponse, verb: Verb) -> bool {
    r.refused_disruptive && !verb.dry_run() && !r.unchanged
}

/// `-o json` of a diff, apply or rollback answer (proto field names).
pub fn response_json(r: &ApplyPolicyResponse, verb: Verb) -> Value {
    json!({
        "dry_run": verb.dry_run(),
        "revision": r.revision,
        "previous_revision": r.previous_revision,
        "unchanged": r.unchanged,
        "refused_disruptive": r.refused_disruptive,
        "digest": r.digest,
        "staged_in_waves": r.staged_in_waves,
        "changes": r.changes.iter().map(|c| json!({
            "node": c.node,
            "before_environment": c.before_environment, "before_pool": c.before_pool,
            "after_environment": c.after_environment, "after_pool": c.after_pool,
            "disruptive": c.disruptive,
            "changes": c.changes.iter().map(|ch| json!({"what": ch.what, "disruptive": ch.disruptive})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "warnings": r.warnings,
    })
}

// ------------------------------------------------------------------------------------------- history / show

/// `policy history`: one row per revision, newest first as the coordinator sends them.
pub fn history(revisions: &[PolicyRevision], now: u64) -> String {
    if revisions.is_empty() {
        return "no policy applied yet: check a file with `nimbusctl policy validate -f policy.yaml`, then \
                `nimbusctl apply -f policy.yaml`\n"
            .into();
    }
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    let rows = revisions
        .iter()
        .map(|r| {
            vec![
                right(r.revision.to_string()),
                Cell::new(format!(
                    "{} ({})",
                    crate::ago_at(r.applied_at_unix, now),
                    crate::when(r.applied_at_unix)
                )),
                Cell::new(dash(&r.applied_by)),
                Cell::new(dash(&r.action)),
                Cell::new(dash(&r.file_name)),
                right(r.nodes_changed.to_string()),
                right(r.disruptive_changes.to_string()),
                Cell::new(short_digest(&r.digest)),
            ]
        })
        .collect();
    plain_table(
        &[
            "REV",
            "APPLIED",
            "BY",
            "ACTION",
            "FILE",
            "NODES-CHANGED",
            "DISRUPTIVE",
            "DIGEST",
        ],
        rows,
        "",
    )
}

/// `-o json` of one revision (`policy history` prints an array of these, without `yaml`).
pub fn revision_json(r: &PolicyRevision) -> Value {
    json!({
        "revision": r.revision, "digest": r.digest, "applied_by": r.applied_by,
        "applied_at_unix": r.applied_at_unix, "action": r.action, "file_name": r.file_name,
        "nodes_changed": r.nodes_changed, "disruptive_changes": r.disruptive_changes, "yaml": r.yaml,
    })
}

// ---------------------------------------------------------------------------------------------- nodes

/// The node's environment and pool (`-` when unplaced or without a policy) and its cohorts (`-` when none).
pub fn node_columns(n: &Node) -> [String; 3] {
    let p = n.placement.clone().unwrap_or_default();
    [dash(&p.environment), dash(&p.pool), join_or_dash(&p.cohorts)]
}

/// The `CONVERGED` column of `nodes --wide`: `yes`, `pending`, or `-` without a policy.
pub fn converged(n: &Node) -> String {
    match n.convergence.as_str() {
        "converged" => "yes".into(),
        other => dash(other),
    }
}

/// The "Placement" section of `node show`.
pub fn placement_section(n: &Node) -> String {
    let p = n.placement.clone().unwrap_or_default();
    let mut out = String::from("placement:\n");
    if p.pool.is_empty() && p.environment.is_empty() && n.unplaced_reason.is_empty() && n.convergence.is_empty() {
        out += "  no fleet policy applied (see `nimbusctl apply --help`)\n";
        return out;
    }
    let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let taints: Vec<String> = p
        .taints
        .iter()
        .map(|t| {
            if t.value.is_empty() {
                format!("{}:{}", t.key, t.effect)
            } else {
                format!("{}={}:{}", t.key, t.value, t.effect)
            }
        })
        .collect();
    for (k, v) in [
        ("environment", dash(&p.environment)),
        ("pool", dash(&p.pool)),
        ("cohorts", join_or_dash(&p.cohorts)),
        ("labels", join_or_dash(&labels)),
        ("taints", join_or_dash(&taints)),
        ("convergence", dash(&n.convergence)),
        ("unplaced-reason", dash(&n.unplaced_reason)),
        ("kubelet", dash(&n.kubelet)),
        ("cluster-sync", dash(&n.cluster_sync)),
        (
            "host-drift",
            if n.drift.is_empty() {
                "-".into()
            } else {
                format!("{} ({})", n.drift, crate::ago(n.drift_unix))
            },
        ),
    ] {
        out += &format!("  {k:<16} {v}\n");
    }
    out
}

/// The placement fields added to a node's `-o json` object.
pub fn placement_json(n: &Node) -> (Value, Value, Value) {
    let placement = n.placement.as_ref().map_or(Value::Null, |p| {
        json!({
            "environment": p.environment, "pool": p.pool, "cohorts": p.cohorts, "labels": p.labels,
            "taints": p.taints.iter().map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect})).collect::<Vec<_>>(),
        })
    });
    (placement, json!(n.unplaced_reason), json!(n.convergence))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_proto::{Change, Placement, Taint};

    const EXAMPLE: &str = include_str!("../../deploy/examples/policy.yaml");

    fn change(node: &str, before: (&str, &str), after: (&str, &str), changes: &[(&str, bool)]) -> NodeChange {
        let changes: Vec<Change> = changes
            .iter()
            .map(|(w, d)| Change {
                what: (*w).into(),
                disruptive: *d,
            })
            .collect();
        NodeChange {
            node: node.into(),
            before_environment: before.0.into(),
            before_pool: before.1.into(),
            after_environment: after.0.into(),
            after_pool: after.1.into(),
            disruptive: changes.iter().any(|c| c.disruptive),
            changes,
        }
    }

    fn sample() -> ApplyPolicyResponse {
        ApplyPolicyResponse {
            revision: 0,
            previous_revision: 3,
            changes: vec![
                change(
                    "db-1",
                    ("production", "performance"),
                    ("production", "fast-nvme"),
                    &[
                        ("pool: performance -> fast-nvme", true),
                        ("label polynimbus.io/storage: - -> local-nvme", false),
                    ],
                ),
                change(
                    "mon-1",
                    ("", ""),
                    ("staging", "burst"),
                    &[("placed in staging/burst", false)],
                ),
            ],
            warnings: vec!["pool \"performance\" has 0 of at least 3 nodes in production".into()],
            unchanged: false,
            refused_disruptive: false,
            digest: "sha256:0123456789abcdef0123".into(),
            staged_in_waves: 0,
        }
    }

    #[test]
    fn diff_marks_disruptive_changes() {
        assert_eq!(
            response(&sample(), Verb::Diff),
            "dry run against revision 3 (policy 0123456789ab)\n\
             db-1: production/performance → production/fast-nvme  DISRUPTIVE\n\
             \x20 ! pool: performance -> fast-nvme\n\
             \x20   label polynimbus.io/storage: - -> local-nvme\n\
             mon-1: unplaced → staging/burst\n\
             \x20   placed in staging/burst\n\
             2 nodes would change, 1 disruptive (drained and moved in waves)\n\
             warning: pool \"performance\" has 0 of at least 3 nodes in production\n"
        );
        let refused_dry = ApplyPolicyResponse {
            refused_disruptive: true,
            ..sample()
        };
        let out = response(&refused_dry, Verb::Diff);
        assert!(
            out.contains(
                "2 nodes would change, 1 disruptive: apply would refuse them without --allow-disruptive \
                 (drains and moves these nodes in waves)\n"
            ),
            "{out}"
        );
        assert!(!refused(&refused_dry, Verb::Diff), "a dry run is never a failure");
    }

    #[test]
    fn diff_unchanged_and_label_only() {
        let unchanged = ApplyPolicyResponse {
            changes: vec![],
            warnings: vec![],
            unchanged: true,
            ..sample()
        };
        assert_eq!(
            response(&unchanged, Verb::Diff),
            "dry run against revision 3 (policy 0123456789ab)\nno changes: revision 3 is already this policy\n"
        );
        let first = ApplyPolicyResponse {
            previous_revision: 0,
            changes: vec![change(
                "n1",
                ("dev", "burst"),
                ("dev", "burst"),
                &[("cohort non-critical added", false)],
            )],
            warnings: vec![],
            ..sample()
        };
        assert_eq!(
            response(&first, Verb::Diff),
            "dry run against no policy (first apply) (policy 0123456789ab)\n\
             n1: dev/burst\n\
             \x20   cohort non-critical added\n\
             1 node would change, none disruptive\n"
        );
        let rollback = response(&unchanged, Verb::Rollback { to: 1, dry_run: true });
        assert!(
            rollback.starts_with("dry run: rollback to revision 1 against revision 3 (policy 0123456789ab)\n"),
            "{rollback}"
        );
    }

    #[test]
    fn apply_reports_the_revision_or_the_refusal() {
        let applied = ApplyPolicyResponse {
            revision: 4,
            staged_in_waves: 1,
            ..sample()
        };
        assert_eq!(
            response(&applied, Verb::Apply),
            "applied revision 4 (previous 3), 2 nodes change\n\
             db-1: production/performance → production/fast-nvme  DISRUPTIVE\n\
             \x20 ! pool: performance -> fast-nvme\n\
             \x20   label polynimbus.io/storage: - -> local-nvme\n\
             mon-1: unplaced → staging/burst\n\
             \x20   placed in staging/burst\n\
             1 node goes in waves: drained and moved one wave at a time, each after the previous one reported \
             (follow with `nimbusctl nodes --wide`, column CONVERGED)\n\
             warning: pool \"performance\" has 0 of at least 3 nodes in production\n"
        );
        assert!(!refused(&applied, Verb::Apply));
        let at_once = response(
            &ApplyPolicyResponse {
                staged_in_waves: 0,
                ..applied.clone()
            },
            Verb::Apply,
        );
        assert!(
            at_once.contains("\n1 disruptive node change: drained and moved\n"),
            "{at_once}"
        );
        assert_eq!(response_json(&applied, Verb::Apply)["staged_in_waves"], 1);

        let refusal = ApplyPolicyResponse {
            refused_disruptive: true,
            warnings: vec![],
            ..sample()
        };
        assert_eq!(
            response(&refusal, Verb::Apply),
            "refused: 1 disruptive node change (2 nodes change in all)\n\
             db-1: production/performance → production/fast-nvme  DISRUPTIVE\n\
             \x20 ! pool: performance -> fast-nvme\n\
             \x20   label polynimbus.io/storage: - -> local-nvme\n\
             nothing applied: re-run with --allow-disruptive to drain and move these nodes in waves\n"
        );
        assert!(refused(&refusal, Verb::Apply));
        assert!(refused(&refusal, Verb::Rollback { to: 2, dry_run: false }));

        let unchanged = ApplyPolicyResponse {
            changes: vec![],
            warnings: vec![],
            unchanged: true,
            ..sample()
        };
        assert_eq!(
            response(&unchanged, Verb::Apply),
            "unchanged: revision 3 is already this policy\n"
        );

        let first = ApplyPolicyResponse {
            revision: 1,
            previous_revision: 0,
            changes: vec![sample().changes[1].clone()],
            warnings: vec![],
            ..sample()
        };
        assert_eq!(
            response(&first, Verb::Rollback { to: 7, dry_run: false }),
            "rolled back to revision 7: applied revision 1 (previous none), 1 node changes\n\
             mon-1: unplaced → staging/burst\n\
             \x20   placed in staging/burst\n"
        );
    }

    #[test]
    fn response_json_uses_proto_names() {
        let v = response_json(&sample(), Verb::Diff);
        assert_eq!(v["dry_run"], true);
        assert_eq!(v["previous_revision"], 3);
        assert_eq!(v["changes"][0]["after_pool"], "fast-nvme");
        assert_eq!(v["changes"][0]["changes"][0]["disruptive"], true);
        assert_eq!(v["changes"][1]["disruptive"], false);
        assert_eq!(v["warnings"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn history_table() {
        let now = 1_700_000_000;
        let revs = vec![
            PolicyRevision {
                revision: 12,
                digest: "sha256:abcdef0123456789abcdef".into(),
                applied_by: "uid:0".into(),
                applied_at_unix: now - 7200,
                action: "rollback to 10".into(),
                file_name: String::new(),
                yaml: String::new(),
                nodes_changed: 2,
                disruptive_changes: 1,
            },
            PolicyRevision {
                revision: 9,
                digest: "sha256:0011223344556677".into(),
                applied_by: "uid:1000".into(),
                applied_at_unix: now - 3 * 86400,
                action: "apply".into(),
                file_name: "policy.yaml".into(),
                yaml: String::new(),
                nodes_changed: 14,
                disruptive_changes: 0,
            },
        ];
        assert_eq!(
            history(&revs, now),
            " REV  APPLIED                        BY        ACTION          FILE         NODES-CHANGED  DISRUPTIVE  DIGEST\n\
             \x20 12  2h ago (2023-11-14T20:13:20Z)  uid:0     rollback to 10  -                        2           1  abcdef012345\n\
             \x20  9  3d ago (2023-11-11T22:13:20Z)  uid:1000  apply           policy.yaml             14           0  001122334455\n"
        );
        assert!(history(&[], now).starts_with("no policy applied yet"));
        assert_eq!(revision_json(&revs[1])["file_name"], "policy.yaml");
    }

    #[test]
    fn validate_summarises_the_example() {
        let p = policy::parse("policy.yaml", EXAMPLE).unwrap();
        let out = validate_summary("policy.yaml", &p);
        let expected = format!(
            "policy.yaml: valid, digest {}\n\
             environments (4): dev, production, staging, test\n\
             pools (3):\n\
             \x20 NAME         ENVIRONMENTS        MIN  MAX  MAX-UNAVAILABLE  COHORTS\n\
             \x20 burst        all                   2    -                2  non-critical\n\
             \x20 fast-nvme    production,staging    1   10                1  hub-enclave\n\
             \x20 performance  all                   3    -                1  edge\n\
             cohorts (3):\n\
             \x20 NAME          POOLS        TAINTS                                 ANTI-AFFINITY\n\
             \x20 edge          performance  polynimbus.io/edge:PreferNoSchedule    -\n\
             \x20 hub-enclave   fast-nvme    polynimbus.io/enclave=true:NoSchedule  edge\n\
             \x20 non-critical  burst        -                                      -\n",
            p.digest()
        );
        assert_eq!(out, expected);
        let v = validate_json(&Ok(p.clone()));
        assert_eq!(v["valid"], true);
        assert_eq!(v["digest"], p.digest());
        assert_eq!(v["errors"], json!([]));
        assert_eq!(v["pools"][1]["max"], 10);
    }

    #[test]
    fn validate_lists_every_error() {
        let text = EXAMPLE
            .replace("min_cpus: 8 ", "min_cpus: eight ")
            .replace("max_unavailable: 2", "max_unavailble: 2");
        let errors = policy::parse("p.yaml", &text).unwrap_err();
        assert!(errors.0.len() >= 2, "{errors}");
        let out = validate_errors(&errors);
        assert_eq!(out, format!("{errors}\n"));
        assert_eq!(out.lines().count(), errors.0.len());
        for (line, d) in out.lines().zip(&errors.0) {
            assert!(line.starts_with(&format!("p.yaml:{}:{}: ", d.line, d.column)), "{line}");
        }
        let v = validate_json(&Err(errors.clone()));
        assert_eq!(v["valid"], false);
        assert_eq!(v["digest"], Value::Null);
        assert_eq!(v["errors"][0]["file"], "p.yaml");
        assert_eq!(v["errors"][0]["line"], errors.0[0].line);
        assert_eq!(v["errors"][0]["hint"], errors.0[0].hint.as_str());
    }

    #[test]
    fn node_placement_columns_and_section() {
        let n = Node {
            name: "db-1".into(),
            placement: Some(Placement {
                environment: "production".into(),
                pool: "fast-nvme".into(),
                cohorts: vec!["hub-enclave".into()],
                labels: [("polynimbus.io/pool".to_string(), "fast-nvme".to_string())].into(),
                taints: vec![
                    Taint {
                        key: "polynimbus.io/enclave".into(),
                        value: "true".into(),
                        effect: "NoSchedule".into(),
                    },
                    Taint {
                        key: "polynimbus.io/edge".into(),
                        value: String::new(),
                        effect: "PreferNoSchedule".into(),
                    },
                ],
                storage_plan: Vec::new(),
            }),
            convergence: "converged".into(),
            kubelet: "joined".into(),
            cluster_sync: "in sync".into(),
            ..Default::default()
        };
        assert_eq!(node_columns(&n), ["production", "fast-nvme", "hub-enclave"]);
        assert_eq!(converged(&n), "yes");
        assert_eq!(
            placement_section(&n),
            "placement:\n\
             \x20 environment      production\n\
             \x20 pool             fast-nvme\n\
             \x20 cohorts          hub-enclave\n\
             \x20 labels           polynimbus.io/pool=fast-nvme\n\
             \x20 taints           polynimbus.io/enclave=true:NoSchedule,polynimbus.io/edge:PreferNoSchedule\n\
             \x20 convergence      converged\n\
             \x20 unplaced-reason  -\n\
             \x20 kubelet          joined\n\
             \x20 cluster-sync     in sync\n\
             \x20 host-drift       -\n"
        );
        let unplaced = Node {
            name: "x".into(),
            unplaced_reason: "matches no environment".into(),
            convergence: "pending".into(),
            ..Default::default()
        };
        assert_eq!(node_columns(&unplaced), ["-", "-", "-"]);
        assert_eq!(converged(&unplaced), "pending");
        assert!(placement_section(&unplaced).contains("  unplaced-reason  matches no environment\n"));
        assert_eq!(
            placement_section(&Node::default()),
            "placement:\n  no fleet policy applied (see `nimbusctl apply --help`)\n"
        );
        assert_eq!(converged(&Node::default()), "-");
        let (p, reason, conv) = placement_json(&n);
        assert_eq!(p["taints"][1]["effect"], "PreferNoSchedule");
        assert_eq!(reason, "");
        assert_eq!(conv, "converged");
    }
}
