//! Checks across entries (unique names, references, bounds, provable overlaps, conflicting labels and
//! taints) and the final, sorted [`Policy`].

use std::collections::{BTreeMap, BTreeSet};

use crate::decode::{CohortPos, Decoded, EnvPos, PoolPos};
use crate::diagnostic::{Pos, Sink};
use crate::model::{Cohort, Environment, ItemKind, Origin, Policy, Pool, PoolMatch, TaintEffect};

fn names_list(names: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let v: Vec<String> = names.into_iter().map(|n| n.as_ref().to_string()).collect();
    if v.is_empty() {
        "(none)".to_string()
    } else {
        v.join(", ")
    }
}

/// `"a"`, `"a" and "b"`, `"a", "b" and "c"`.
pub(crate) fn quoted_and(names: &[&str]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match q.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

fn duplicates<'a>(sink: &mut Sink, kind: &str, items: impl Iterator<Item = (&'a str, Pos)>) {
    let mut first: BTreeMap<&str, Pos> = BTreeMap::new();
    for (name, pos) in items {
        match first.get(name) {
            Some(p) => sink.error(
                pos,
                format!("duplicate {kind} name {name:?}"),
                format!(
                    "first defined at line {}, column {}; names must be unique",
                    p.line, p.column
                ),
            ),
            None => {
                first.insert(name, pos);
            }
        }
    }
}

/// Every node matching `b` also matches `a` (so a node matching `b` would be in both pools).
fn subsumes(a: &PoolMatch, b: &PoolMatch) -> bool {
    fn set_ok<T: PartialEq>(a: &[T], b: &[T]) -> bool {
        a.is_empty() || (!b.is_empty() && b.iter().all(|x| a.contains(x)))
    }
    fn min_ok<T: PartialOrd>(a: Option<T>, b: Option<T>) -> bool {
        match (a, b) {
            (None, _) => true,
            (Some(a), Some(b)) => b >= a,
            (Some(_), None) => false,
        }
    }
    let globs_ok = a.instance_type.is_empty()
        || a.instance_type.iter().any(|g| g == "*") && !b.instance_type.is_empty()
        || set_ok(&a.instance_type, &b.instance_type);
    set_ok(&a.platform, &b.platform)
        && globs_ok
        && min_ok(a.min_cpus, b.min_cpus)
        && min_ok(a.min_memory, b.min_memory)
        && (a.local_nvme.is_none() || a.local_nvme == b.local_nvme)
        && set_ok(&a.zone, &b.zone)
        && a.labels.iter().all(|(k, v)| b.labels.get(k) == Some(v))
}

pub(crate) fn build(sink: &mut Sink, d: Decoded) -> Policy {
    let Decoded {
        version,
        environments,
        pools,
        cohorts,
    } = d;

    duplicates(
        sink,
        "environment",
        environments.iter().map(|(e, p)| (e.name.as_str(), p.name)),
    );
    duplicates(sink, "pool", pools.iter().map(|(x, p)| (x.name.as_str(), p.name)));
    duplicates(sink, "cohort", cohorts.iter().map(|(c, p)| (c.name.as_str(), p.name)));

    let env_names: BTreeSet<&str> = environments.iter().map(|(e, _)| e.name.as_str()).collect();
    let pool_names: BTreeSet<&str> = pools.iter().map(|(p, _)| p.name.as_str()).collect();
    let cohort_names: BTreeSet<&str> = cohorts.iter().map(|(c, _)| c.name.as_str()).collect();

    check_environments(sink, &environments);
    check_pools(sink, &pools, &env_names);
    check_cohorts(sink, &cohorts, &pool_names, &cohort_names);
    check_pool_overlaps(sink, &pools, &env_names);
    check_node_keys(sink, &pools, &cohorts);

    // Text without positions (canonical JSON) has every position 0:0: nothing to locate then.
    let mut origin = Origin::default();
    let items = environments
        .iter()
        .map(|(e, p)| (ItemKind::Environment, &e.name, p.at))
        .chain(pools.iter().map(|(x, p)| (ItemKind::Pool, &x.name, p.at)))
        .chain(cohorts.iter().map(|(c, p)| (ItemKind::Cohort, &c.name, p.at)));
    for (kind, name, at) in items.filter(|(_, _, at)| *at != Pos::default()) {
        origin.items.entry((kind, name.clone())).or_insert(at);
    }
    origin.file = sink.file.clone();
    normalize(Policy {
        version,
        environments: environments.into_iter().map(|(e, _)| e).collect(),
        pools: pools.into_iter().map(|(p, _)| p).collect(),
        cohorts: cohorts.into_iter().map(|(c, _)| c).collect(),
        origin,
    })
}

/// Sort entries by name and every set by value, so equal meanings compare equal.
pub(crate) fn normalize(mut p: Policy) -> Policy {
    p.environments.sort_by(|a, b| a.name.cmp(&b.name));
    p.pools.sort_by(|a, b| a.name.cmp(&b.name));
    p.cohorts.sort_by(|a, b| a.name.cmp(&b.name));
    for pool in &mut p.pools {
        if let Some(envs) = &mut pool.environments {
            envs.sort();
            envs.dedup();
        }
        let m = &mut pool.selector;
        m.platform.sort_by_key(|k| k.as_str());
        m.platform.dedup();
        m.instance_type.sort();
        m.instance_type.dedup();
        m.zone.sort();
        m.zone.dedup();
    }
    for c in &mut p.cohorts {
        c.pools.sort();
        c.pools.dedup();
        c.anti_affinity.sort();
        c.anti_affinity.dedup();
        c.taints.sort();
        c.taints.dedup();
    }
    p
}

fn check_environments(sink: &mut Sink, envs: &[(Environment, EnvPos)]) {
    for (i, (a, apos)) in envs.iter().enumerate() {
        for (b, bpos) in &envs[i + 1..] {
            if a.name == b.name || !apos.selector_ok || !bpos.selector_ok {
                continue;
            }
            let (la, lb) = (&a.selector.labels, &b.selector.labels);
            let a_in_b = la.iter().all(|(k, v)| lb.get(k) == Some(v));
            let b_in_a = lb.iter().all(|(k, v)| la.get(k) == Some(v));
            let message = match (a_in_b, b_in_a) {
                (true, true) => format!("environments {:?} and {:?} have identical match rules", a.name, b.name),
                (true, false) => format!(
                    "environments {:?} and {:?} overlap: every node matching {:?} also matches {:?}",
                    a.name, b.name, b.name, a.name
                ),
                (false, true) => format!(
                    "environments {:?} and {:?} overlap: every node matching {:?} also matches {:?}",
                    a.name, b.name, a.name, b.name
                ),
                (false, false) => continue,
            };
            sink.error(
                bpos.selector,
                message,
                "a node belongs to one environment; give each a label the others do not accept, e.g. env: <name>",
            );
        }
    }
}

fn check_pools(sink: &mut Sink, pools: &[(Pool, PoolPos)], envs: &BTreeSet<&str>) {
    for (p, pos) in pools {
        for (e, epos) in p.environments.iter().flatten().zip(&pos.environments) {
            if !envs.contains(e.as_str()) {
                sink.error(
                    *epos,
                    format!("pool {:?} names unknown environment {e:?}", p.name),
                    format!("defined environments: {}", names_list(envs)),
                );
            }
        }
        match p.max {
            Some(0) => sink.error(
                pos.max,
                format!("pool {:?} has max 0", p.name),
                "max must be at least 1; to drop the pool from an environment, narrow its `environments`",
            ),
            Some(max) if p.min > max => sink.error(
                pos.max,
                format!("pool {:?} has min {} greater than max {max}", p.name, p.min),
                format!("raise max to at least {} or lower min", p.min),
            ),
            _ => {}
        }
    }
}

fn check_cohorts(sink: &mut Sink, cohorts: &[(Cohort, CohortPos)], pools: &BTreeSet<&str>, all: &BTreeSet<&str>) {
    for (c, pos) in cohorts {
        for (p, ppos) in c.pools.iter().zip(&pos.pools) {
            if !pools.contains(p.as_str()) {
                sink.error(
                    *ppos,
                    format!("cohort {:?} names unknown pool {p:?}", c.name),
                    format!("defined pools: {}", names_list(pools)),
                );
            }
        }
        for (o, opos) in c.anti_affinity.iter().zip(&pos.anti_affinity) {
            if *o == c.name {
                sink.error(
                    *opos,
                    format!("cohort {:?} lists itself in anti_affinity", c.name),
                    "remove it: anti_affinity names other cohorts",
                );
            } else if !all.contains(o.as_str()) {
                sink.error(
                    *opos,
                    format!("cohort {:?} names unknown cohort {o:?} in anti_affinity", c.name),
                    format!("defined cohorts: {}", names_list(all)),
                );
            }
        }
        let mut seen: BTreeMap<(&str, TaintEffect), ()> = BTreeMap::new();
        for (t, tpos) in c.taints.iter().zip(&pos.taints) {
            if seen.insert((t.key.as_str(), t.effect), ()).is_some() {
                sink.error(
                    *tpos,
                    format!("taint \"{}:{}\" appears twice in cohort {:?}", t.key, t.effect, c.name),
                    "Kubernetes keeps one taint per key and effect; remove one",
                );
            }
        }
    }
}

/// Pools that share an environment and of which one accepts every node the other accepts.
fn check_pool_overlaps(sink: &mut Sink, pools: &[(Pool, PoolPos)], envs: &BTreeSet<&str>) {
    for (i, (a, apos)) in pools.iter().enumerate() {
        for (b, bpos) in &pools[i + 1..] {
            if a.name == b.name || !apos.selector_ok || !bpos.selector_ok {
                continue;
            }
            let shared: Vec<&str> = envs.iter().copied().filter(|e| a.allows(e) && b.allows(e)).collect();
            if shared.is_empty() {
                continue;
            }
            let (sa, sb) = (&a.selector, &b.selector);
            let why = if sa == sb {
                "their match rules are identical".to_string()
            } else if sa.is_empty() {
                format!("{:?} has an empty match, which accepts every node", a.name)
            } else if sb.is_empty() {
                format!("{:?} has an empty match, which accepts every node", b.name)
            } else if subsumes(sa, sb) {
                format!("every node matching {:?} also matches {:?}", b.name, a.name)
            } else if subsumes(sb, sa) {
                format!("every node matching {:?} also matches {:?}", a.name, b.name)
            } else {
                continue;
            };
            let where_ = if shared.len() == 1 {
                "environment"
            } else {
                "environments"
            };
            sink.error(
                bpos.selector,
                format!(
                    "pools {:?} and {:?} overlap in {where_} {}: {why}",
                    a.name,
                    b.name,
                    quoted_and(&shared)
                ),
                "a node belongs to one pool; add a rule that tells them apart (e.g. local_nvme: false, labels or \
                 instance_type) or give them different environments",
            );
        }
    }
}

/// Labels and taints that end up on the same node (a pool's and those of the cohorts placed on it) must agree.
fn check_node_keys(sink: &mut Sink, pools: &[(Pool, PoolPos)], cohorts: &[(Cohort, CohortPos)]) {
    for (p, _) in pools {
        // label key -> (value, source description)
        let mut labels: BTreeMap<&str, (&str, String)> = BTreeMap::new();
        for (k, v) in &p.labels {
            labels.insert(k, (v, format!("pool {:?}", p.name)));
        }
        let mut taints: BTreeMap<(&str, TaintEffect), (&str, String)> = BTreeMap::new();
        for (c, cpos) in cohorts.iter().filter(|(c, _)| c.pools.contains(&p.name)) {
            let source = format!("cohort {:?}", c.name);
            for (k, v) in &c.labels {
                match labels.get(k.as_str()) {
                    Some((other, from)) if *other != v => sink.error(
                        cpos.labels.get(k).copied().unwrap_or(cpos.at),
                        format!("label {k:?} is {v:?} in {source} but {other:?} in {from}"),
                        format!(
                            "nodes of pool {:?} would get both; use one value or different keys",
                            p.name
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        labels.insert(k, (v, source.clone()));
                    }
                }
            }
            for (t, tpos) in c.taints.iter().zip(&cpos.taints) {
                match taints.get(&(t.key.as_str(), t.effect)) {
                    Some((other, from)) if *from != source && *other != t.value => sink.error(
                        *tpos,
                        format!(
                            "taint \"{}:{}\" is {:?} in {source} but {other:?} in {from}",
                            t.key, t.effect, t.value
                        ),
                        format!(
                            "both cohorts run on pool {:?}, whose nodes can hold one taint per key and effect; use \
                             one value or different keys",
                            p.name
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        taints.insert((t.key.as_str(), t.effect), (&t.value, source.clone()));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inventory::PlatformKind;

    #[test]
    fn subsumption() {
        let empty = PoolMatch::default();
        let nvme = PoolMatch {
            local_nvme: Some(true),
            min_cpus: Some(8),
            ..PoolMatch::default()
        };
        assert!(subsumes(&empty, &nvme));
        assert!(!subsumes(&nvme, &empty));
        let more = PoolMatch {
            min_cpus: Some(16),
            ..nvme.clone()
        };
        assert!(subsumes(&nvme, &more));
        assert!(!subsumes(&more, &nvme));
        let aws = PoolMatch {
            platform: vec![PlatformKind::Aws],
            ..PoolMatch::default()
        };
        let clouds = PoolMatch {
            platform: vec![PlatformKind::Aws, PlatformKind::Azure],
            ..PoolMatch::default()
        };
        assert!(subsumes(&clouds, &aws));
        assert!(!subsumes(&aws, &clouds));
        let not_nvme = PoolMatch {
            local_nvme: Some(false),
            ..PoolMatch::default()
        };
        assert!(!subsumes(&not_nvme, &nvme) && !subsumes(&nvme, &not_nvme));
        let star = PoolMatch {
            instance_type: vec!["*".into()],
            ..PoolMatch::default()
        };
        let i3 = PoolMatch {
            instance_type: vec!["i3.*".into()],
            ..PoolMatch::default()
        };
        assert!(subsumes(&star, &i3));
        assert!(!subsumes(&i3, &star));
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted_and(&["a"]), "\"a\"");
        assert_eq!(quoted_and(&["a", "b"]), "\"a\" and \"b\"");
        assert_eq!(quoted_and(&["a", "b", "c"]), "\"a\", \"b\" and \"c\"");
    }
}
