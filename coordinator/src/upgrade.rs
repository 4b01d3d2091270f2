//! Agent upgrade rollouts: a published release (`crate::releases`) rolled out with the wave engine.
//!
//! [`State::start_upgrade`] picks every active node that does not run the version yet, groups them by pool (the
//! live placement's, `unplaced` without one) and zone (from the inventory), and stores a rollout of kind
//! `agent` in the one rollout slot (`rollout/current`): nothing starts while another rollout runs, and a policy
//! apply waits for an upgrade. The canary wave goes first (`canary` nodes), then batches within the
//! max-unavailable budget per pool or zone. A wave's `Apply` sets the node's desired `agent` release
//! (`crate::rollout`); the node is healthy when it reports running that version, and failed when its launcher
//! rolled the version back or the agent could not install it (`crate::rollout::upgrade_events`), or when it is
//! not healthy within `rollout_node_timeout`. More failures than `max_failures` pause the rollout: the canary
//! failing stops it there. Operators pause, resume and abort it like any rollout.

use std::collections::BTreeMap;

use crate::placement::{AgentTarget, LIVE, LivePlacement, ROLLOUT, RolloutKind, RolloutRecord};
use crate::state::{NodeStatus, State, StateError, attempts, encode, invalid};
use crate::store::Txn;

/// How many nodes of a group may upgrade at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnavailable {
    Count(u32),
    /// Per cent of the group, rounded down, at least one node.
    Percent(u32),
}

impl MaxUnavailable {
    /// "2" or "10%"; "" is one node.
    pub fn parse(s: &str) -> Result<MaxUnavailable, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(MaxUnavailable::Count(1));
        }
        let bad = || format!("max-unavailable {s:?}: give a count (e.g. 2) or a share (e.g. 10%)");
        match s.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(n) if (1..=100).contains(&n) => Ok(MaxUnavailable::Percent(n)),
                _ => Err(bad()),
            },
            None => match s.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(MaxUnavailable::Count(n)),
                _ => Err(bad()),
            },
        }
    }

    /// The cap for a group of `size` nodes.
    pub fn of(self, size: usize) -> u32 {
        match self {
            MaxUnavailable::Count(n) => n,
            MaxUnavailable::Percent(p) => {
                let n = (size as u64 * u64::from(p)) / 100;
                u32::try_from(n).unwrap_or(u32::MAX).max(1)
            }
        }
    }
}

/// An operator's upgrade request, checked.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    pub target: AgentTarget,
    pub canary: u32,
    pub max_unavailable: MaxUnavailable,
    /// Budget per zone instead of per pool.
    pub by_zone: bool,
    pub pause_after_canary: bool,
    pub max_failures: u32,
    /// Abort above this share (per cent) of failed nodes; 0: off.
    pub abort_failure_percent: u32,
    /// Roll every touched node back on abort.
    pub rollback: bool,
    /// Published agent binaries for the arch: version → target name (to roll back to).
    pub published: BTreeMap<String, String>,
}

impl State {
    /// Starts an agent upgrade rollout (see the module docs). Returns the desired states of the first wave to
    /// push and the stored record.
    pub fn start_upgrade(
        &self,
        req: &UpgradeRequest,
        by: &str,
    ) -> Result<(Vec<(String, crate::placement::DesiredRecord)>, RolloutRecord), StateError> {
        for _ in attempts() {
            if let Some(running) = self.rollout()? {
                return Err(invalid(format!(
                    "a {} rollout is {}: wait for it to finish, or `nimbusctl rollout abort` it first",
                    running.kind.name(),
                    running.rollout.phase()
                )));
            }
            let live = self.read_json::<LivePlacement>(LIVE)?;
            let pools: BTreeMap<String, String> = live
                .as_ref()
                .map(|(l, _)| {
                    l.placement
                        .nodes
                        .iter()
                        .filter_map(|(id, np)| np.assignment().map(|a| (id.clone(), a.pool.clone())))
                        .collect()
                })
                .unwrap_or_default();
            let mut targets = Vec::new();
            let mut previous = BTreeMap::new();
            let mut unpublished = std::collections::BTreeSet::new();
            for node in self.list_nodes()? {
                if node.status != NodeStatus::Active || node.agent_version == req.target.version {
                    continue;
                }
                if req.rollback {
                    match req.published.get(&node.agent_version) {
                        Some(target) => {
                            previous.insert(
                                node.id.clone(),
                                AgentTarget {
                                    version: node.agent_version.clone(),
                                    target: target.clone(),
                                    allow_downgrade: true,
                                },
                            );
                        }
                        None => {
                            unpublished.insert(node.agent_version.clone());
                        }
                    }
                }
                let zone = self.hardware(&node.id)?.and_then(|h| h.document.platform.zone.clone());
                targets.push(waves::Target {
                    pool: pools.get(&node.id).cloned().unwrap_or_else(|| "unplaced".into()),
                    node: node.id,
                    zone,
                    disruptive: true,
                });
            }
            if !unpublished.is_empty() {
                return Err(invalid(format!(
                    "--rollback needs every node's current version published to roll back to; not published: {}. \
                     Publish them with `nimbusctl release add FILE --version V`, or start without --rollback",
                    unpublished.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
            if targets.is_empty() {
                return Err(invalid(format!(
                    "every active node already runs agent {}: nothing to upgrade",
                    req.target.version
                )));
            }
            let mut group_sizes: BTreeMap<String, usize> = BTreeMap::new();
            for t in &targets {
                let key = if req.by_zone {
                    t.zone.clone().unwrap_or_default()
                } else {
                    t.pool.clone()
                };
                *group_sizes.entry(key).or_default() += 1;
            }
            let limits = if req.by_zone {
                let largest = group_sizes.values().copied().max().unwrap_or(1);
                waves::Limits {
                    // Pools are not the budget here: only zones are.
                    default_max_unavailable: u32::try_from(targets.len()).unwrap_or(u32::MAX),
                    max_unavailable_per_zone: req.max_unavailable.of(largest),
                    max_failures: req.max_failures,
                    canary: req.canary,
                    pause_after_canary: req.pause_after_canary,
                    ..waves::Limits::default()
                }
            } else {
                waves::Limits {
                    max_unavailable_per_pool: group_sizes
                        .iter()
                        .map(|(pool, n)| (pool.clone(), req.max_unavailable.of(*n)))
                        .collect(),
                    default_max_unavailable: 1,
                    max_failures: req.max_failures,
                    canary: req.canary,
                    pause_after_canary: req.pause_after_canary,
                    ..waves::Limits::default()
                }
            };
            let rollout =
                waves::Rollout::new(targets, limits).map_err(|e| invalid(format!("cannot plan the waves: {e}")))?;
            let mut rec = RolloutRecord {
                kind: RolloutKind::Agent {
                    target: req.target.clone(),
                    previous,
                    abort_failure_percent: req.abort_failure_percent,
                },
                revision: 0,
                rollout,
                staged: BTreeMap::new(),
                started: BTreeMap::new(),
                draining: BTreeMap::new(),
                note: String::new(),
            };
            let actions = rec.rollout.handle(waves::Event::Started);
            let mut live_value = live.as_ref().map(|(l, _)| l.clone()).unwrap_or_default();
            let txn = Txn::new().if_absent(ROLLOUT);
            let (txn, pushed) = self.run_actions(&mut rec, &mut live_value, actions, txn)?;
            let txn = txn.put(ROLLOUT, encode(ROLLOUT, &rec)?);
            if self.store().txn(txn)? {
                tracing::info!(
                    version = %req.target.version, by, nodes = rec.rollout.status().counts.total,
                    "agent upgrade rollout started"
                );
                return Ok((pushed, rec));
            }
        }
        Err(StateError::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{enroll, state};
    use crate::placement::{FailedRelease, ObservedRecord};

    fn req(canary: u32) -> UpgradeRequest {
        UpgradeRequest {
            target: AgentTarget {
                version: "0.1.1".into(),
                target: "nimbus-agent-next".into(),
                allow_downgrade: false,
            },
            canary,
            max_unavailable: MaxUnavailable::Count(2),
            by_zone: false,
            pause_after_canary: false,
            max_failures: 0,
            abort_failure_percent: 0,
            rollback: false,
            published: BTreeMap::new(),
        }
    }

    fn running(s: &State, id: &str, version: &str) -> Vec<(String, crate::placement::DesiredRecord)> {
        let o = ObservedRecord {
            generation: s.desired(id).unwrap().generation,
            agent_version: version.into(),
            ..Default::default()
        };
        s.observe(id, o).unwrap()
    }

    #[test]
    fn max_unavailable_parses_counts_and_shares() {
        assert_eq!(MaxUnavailable::parse("").unwrap(), MaxUnavailable::Count(1));
        assert_eq!(MaxUnavailable::parse("3").unwrap(), MaxUnavailable::Count(3));
        assert_eq!(MaxUnavailable::parse("10%").unwrap().of(25), 2);
        assert_eq!(MaxUnavailable::parse("10%").unwrap().of(3), 1, "at least one");
        for bad in ["0", "0%", "101%", "x", "-1"] {
            assert!(MaxUnavailable::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn canary_first_then_waves_gated_on_the_new_version_and_a_failed_canary_stops_it() {
        let (_d, s) = state();
        let ids: Vec<String> = (1..=5).map(|i| enroll(&s, i, "web")).collect();
        let (pushed, rec) = s.start_upgrade(&req(1), "test").unwrap();
        assert_eq!(pushed.len(), 1, "the canary alone");
        let canary = pushed[0].0.clone();
        assert_eq!(pushed[0].1.agent.as_ref().map(|a| a.version.as_str()), Some("0.1.1"));
        assert_eq!(rec.kind.name(), "agent");
        // Another rollout cannot start meanwhile.
        assert!(
            s.start_upgrade(&req(1), "test")
                .unwrap_err()
                .to_string()
                .contains("abort")
        );
        // A report from the old version changes nothing; the new version makes it healthy → next wave (2).
        assert!(running(&s, &canary, "0.1.0").is_empty());
        let next = running(&s, &canary, "0.1.1");
        assert_eq!(next.len(), 2, "{next:?}");
        for (id, _) in &next {
            running(&s, id, "0.1.1");
        }
        let rest: Vec<String> = ids
            .iter()
            .filter(|i| **i != canary && !next.iter().any(|(n, _)| n == *i))
            .cloned()
            .collect();
        for id in &rest {
            running(&s, id, "0.1.1");
        }
        assert!(s.rollout().unwrap().is_none(), "completed");
        assert_eq!(
            s.last_rollout().unwrap().unwrap().rollout.phase(),
            waves::Phase::Completed
        );

        // Everyone runs 0.1.1 now (as far as the records say after their inventory): a canary that fails.
        let (_d, s) = state();
        for i in 1..=3 {
            enroll(&s, i, "web");
        }
        let (pushed, _) = s.start_upgrade(&req(1), "test").unwrap();
        let canary = pushed[0].0.clone();
        let o = ObservedRecord {
            generation: s.desired(&canary).unwrap().generation,
            agent_version: "0.1.0".into(),
            failed_releases: vec![FailedRelease {
                version: "0.1.1".into(),
                reason: "exited 1 before ready".into(),
                at: 1,
            }],
            ..Default::default()
        };
        assert!(s.observe(&canary, o).unwrap().is_empty(), "nothing else goes out");
        let rec = s.rollout().unwrap().unwrap();
        assert_eq!(rec.rollout.phase(), waves::Phase::Paused);
        assert_eq!(rec.rollout.status().counts.failed, 1);
    }

    #[test]
    fn a_failure_share_above_the_threshold_aborts_and_rolls_every_touched_node_back() {
        let (_d, s) = state();
        for i in 1..=4 {
            enroll(&s, i, "web");
        }
        let mut r = req(0);
        r.max_unavailable = MaxUnavailable::Count(4);
        r.max_failures = 10;
        r.abort_failure_percent = 25;
        r.rollback = true;
        // Rollback needs the current version published.
        let e = s.start_upgrade(&r, "test").unwrap_err().to_string();
        assert!(e.contains("not published: 0.1.0"), "{e}");
        r.published = [("0.1.0".to_string(), "nimbus-agent-0.1.0".to_string())].into();
        let (pushed, _) = s.start_upgrade(&r, "test").unwrap();
        assert_eq!(pushed.len(), 4, "one wave of four");
        let ids: Vec<String> = pushed.iter().map(|(id, _)| id.clone()).collect();
        // One healthy (0/1 failed), then one failure: 1 of 2 = 50% > 25% → abort and roll back both touched.
        running(&s, &ids[0], "0.1.1");
        assert!(s.rollout().unwrap().is_some());
        let o = ObservedRecord {
            generation: s.desired(&ids[1]).unwrap().generation,
            error: "upgrade to 0.1.1: signature check failed".into(),
            agent_version: "0.1.0".into(),
            ..Default::default()
        };
        let back = s.observe(&ids[1], o).unwrap();
        assert!(s.rollout().unwrap().is_none(), "aborted");
        let last = s.last_rollout().unwrap().unwrap();
        assert_eq!(last.rollout.phase(), waves::Phase::Aborted);
        assert!(
            last.note.contains("1 of 2 upgraded node(s) failed, more than 25%"),
            "{}",
            last.note
        );
        assert!(last.note.contains("4 node(s) rolled back"), "{}", last.note);
        assert_eq!(back.len(), 4, "every node of the started wave goes back: {back:?}");
        for (id, d) in back {
            let a = d.agent.unwrap();
            assert_eq!((a.version.as_str(), a.allow_downgrade), ("0.1.0", true), "{id}");
        }
    }
}
