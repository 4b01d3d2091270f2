//! Rollouts of disruptive policy changes: the wave engine (`waves::Rollout`, pure) driven by what agents
//! report, a deadline per node, and the operator's pause / resume / abort.
//!
//! A node of a wave is *done* when its agent acknowledges the new desired state without error, and *healthy*
//! when, in addition, its kubelet is joined to the environment the node now belongs to (or, for a node that
//! left every environment, is no longer joined). Only healthy nodes free their place in the pool's and
//! zone's budget for the next wave. A node that is not healthy `node_timeout` after its wave started counts
//! as failed ("timed out", with the last join error if any), which pauses the rollout (`max_failures` 0):
//! the operator resumes (the rest go on) or aborts (nodes not moved yet keep their old place; the diff of a
//! re-apply shows them again).
//!
//! The rollout record lives at `rollout/policy` while it runs and moves to `rollout/last` when it completes or
//! is aborted, in the same transaction as the state change, so a restarted coordinator continues (or reports)
//! exactly where it was.

use std::time::SystemTime;

use policy::Policy;

use crate::placement::{DesiredRecord, LIVE, LivePlacement, ObservedRecord, ROLLOUT, RolloutKind, RolloutRecord};
use crate::state::{State, StateError, attempts, encode, invalid};
use crate::store::Txn;

/// The last finished rollout (completed or aborted), for `nimbusctl rollout status`.
pub(crate) const LAST: &[u8] = b"rollout/last";

/// Desired states to push, by node id.
type Pushed = Vec<(String, DesiredRecord)>;

/// An operator's command for the running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

impl std::str::FromStr for Control {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pause" => Ok(Control::Pause),
            "resume" => Ok(Control::Resume),
            "abort" => Ok(Control::Abort),
            other => Err(format!("unknown rollout action {other:?}: use pause, resume or abort")),
        }
    }
}

/// Whether node `desired` is healthy after its change, as `observed` reports it under `policy`.
pub fn healthy(desired: &DesiredRecord, observed: &ObservedRecord, policy: Option<&Policy>) -> bool {
    if observed.generation != desired.generation || !observed.error.is_empty() {
        return false;
    }
    match &desired.assignment {
        None => observed.kubelet != "joined",
        Some(a) => match policy.and_then(|p| p.environment(&a.environment)) {
            Some(env) => observed.joined_to(&env.kubernetes.api_endpoint),
            None => true,
        },
    }
}

/// For an agent upgrade with an abort threshold that has not ended: why it must abort, when more than the
/// threshold's share of the nodes that finished their change failed.
fn failure_share_exceeded(rec: &RolloutRecord) -> Option<String> {
    let RolloutKind::Agent {
        abort_failure_percent, ..
    } = &rec.kind
    else {
        return None;
    };
    if *abort_failure_percent == 0 || matches!(rec.rollout.phase(), waves::Phase::Completed | waves::Phase::Aborted) {
        return None;
    }
    let c = rec.rollout.status().counts;
    let finished = c.healthy + c.failed;
    (c.failed > 0 && c.failed * 100 > finished * *abort_failure_percent as usize).then(|| {
        format!(
            "aborted: {} of {finished} upgraded node(s) failed, more than {abort_failure_percent}%",
            c.failed
        )
    })
}

/// The wave engine's events for an agent report during an upgrade to `target`: healthy once the node runs the
/// new version (it reports only after its tunnel and stream are up), failed when its launcher rolled the version
/// back or the agent could not install it.
pub(crate) fn upgrade_events(
    id: &str,
    target: &crate::placement::AgentTarget,
    rec: &RolloutRecord,
    observed: &ObservedRecord,
) -> Vec<waves::Event> {
    let node = id.to_string();
    if !rec.rollout.node_state(id).is_some_and(waves::NodeState::in_flight) {
        return Vec::new();
    }
    if let Some(f) = observed.failed_releases.iter().find(|f| f.version == target.version) {
        return vec![waves::Event::NodeFailed {
            node,
            reason: format!("rolled back on the host: {}", f.reason),
        }];
    }
    if observed.agent_version == target.version {
        return vec![
            waves::Event::NodeDone { node: node.clone() },
            waves::Event::NodeHealthy { node },
        ];
    }
    if !observed.error.is_empty() && observed.error.contains(&target.version) {
        return vec![waves::Event::NodeFailed {
            node,
            reason: observed.error.clone(),
        }];
    }
    Vec::new()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl State {
    /// The policy stored as revision `n`, parsed.
    pub(crate) fn policy_of(&self, n: u64) -> Result<Option<Policy>, StateError> {
        let Some(rev) = self.policy_revision(n)? else {
            return Ok(None);
        };
        Policy::from_canonical_json(&rev.canonical)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                key: format!("policy/rev/{n:020}"),
                reason: e.to_string(),
            })
    }

    /// Carries out the wave engine's actions: `Apply` moves a staged node's desired state and place into the
    /// transaction and starts its clock; the rest are logged.
    pub(crate) fn run_actions(
        &self,
        rec: &mut RolloutRecord,
        live: &mut LivePlacement,
        actions: Vec<waves::Action>,
        mut txn: Txn,
    ) -> Result<(Txn, Vec<(String, DesiredRecord)>), StateError> {
        let mut pushed = Vec::new();
        for action in actions {
            match action {
                waves::Action::Apply { node, wave } if matches!(rec.kind, RolloutKind::Agent { .. }) => {
                    let RolloutKind::Agent { target, .. } = &rec.kind else {
                        continue;
                    };
                    rec.started.insert(node.clone(), now_unix());
                    let mut desired = self.desired(&node)?;
                    if desired.agent.as_ref() != Some(target) {
                        desired.agent = Some(target.clone());
                        desired.generation += 1;
                    }
                    tracing::info!(node_id = %node, wave, version = %target.version, "wave: upgrading the node's agent");
                    let key = crate::placement::desired_key(&node);
                    txn = txn.put(key.clone(), encode(&key, &desired)?);
                    pushed.push((node, desired));
                }
                waves::Action::Apply { node, wave } => {
                    if rec.draining.contains_key(&node) {
                        continue;
                    }
                    let Some((desired, _)) = rec.staged.get(&node) else {
                        continue;
                    };
                    rec.started.insert(node.clone(), now_unix());
                    if let Some(server) = self.drain_needed(&node, desired, rec.revision)? {
                        tracing::info!(node_id = %node, wave, %server, "wave: draining the node from its cluster before moving it");
                        rec.draining.insert(node, server);
                        continue;
                    }
                    let Some((desired, np)) = rec.staged.remove(&node) else {
                        continue;
                    };
                    tracing::info!(node_id = %node, wave, generation = desired.generation, "wave: moving node");
                    live.placement.nodes.insert(node.clone(), np);
                    let key = crate::placement::desired_key(&node);
                    txn = txn.put(key.clone(), encode(&key, &desired)?);
                    pushed.push((node, desired));
                }
                waves::Action::WaveStarted { wave, nodes } => tracing::info!(wave, ?nodes, "wave started"),
                waves::Action::WaveFinished { wave } => tracing::info!(wave, "wave finished"),
                waves::Action::Paused { reason } => tracing::warn!(%reason, "rollout paused"),
                waves::Action::Completed => tracing::info!(revision = rec.revision, "rollout completed"),
                waves::Action::Aborted { reason } => {
                    tracing::warn!(%reason, "rollout aborted");
                    if let RolloutKind::Agent { previous, .. } = &rec.kind
                        && !previous.is_empty()
                    {
                        let mut rolled = 0;
                        for ns in rec.rollout.status().nodes {
                            let node = ns.target.node;
                            let (Some(_), Some(back)) = (ns.wave, previous.get(&node)) else {
                                continue;
                            };
                            let mut desired = self.desired(&node)?;
                            if desired.agent.as_ref() == Some(back) {
                                continue;
                            }
                            desired.agent = Some(back.clone());
                            desired.generation += 1;
                            tracing::warn!(node_id = %node, version = %back.version, "rollout aborted: rolling the node's agent back");
                            let key = crate::placement::desired_key(&node);
                            txn = txn.put(key.clone(), encode(&key, &desired)?);
                            pushed.push((node, desired));
                            rolled += 1;
                        }
                        let sep = if rec.note.is_empty() { "" } else { "; " };
                        rec.note = format!(
                            "{}{sep}{rolled} node(s) rolled back to their previous version",
                            rec.note
                        );
                    }
                }
                waves::Action::WaitHealthy { .. } | waves::Action::Rollback { .. } => {}
            }
        }
        Ok((txn, pushed))
    }

    /// Where node `id` must be drained from before it takes `desired` (of revision `revision`): the API endpoint
    /// its kubelet is joined to, when that differs from the new environment's and some stored policy gives API
    /// access to it. `None` when no drain is needed or none is possible (then `kubeadm reset` on the node stops
    /// its pods without evictions; logged).
    fn drain_needed(&self, id: &str, desired: &DesiredRecord, revision: u64) -> Result<Option<String>, StateError> {
        let Some(o) = self.observed(id)? else {
            return Ok(None);
        };
        if o.kubelet != "joined" {
            return Ok(None);
        }
        let old_server = if o.kubelet_server.is_empty() {
            // Reported by an agent from before kubelet_server: the node's current environment.
            let old = self.desired(id)?;
            let env = old.assignment.map(|a| a.environment).unwrap_or_default();
            self.policy_of(old.policy_revision)?
                .and_then(|p| p.environment(&env).map(|e| e.kubernetes.api_endpoint.clone()))
                .unwrap_or_default()
        } else {
            o.kubelet_server.clone()
        };
        if old_server.is_empty() {
            return Ok(None);
        }
        let new_server = match &desired.assignment {
            Some(a) => self
                .policy_of(revision)?
                .and_then(|p| p.environment(&a.environment).map(|e| e.kubernetes.api_endpoint.clone())),
            None => None,
        };
        if new_server.as_deref() == Some(old_server.as_str()) {
            return Ok(None);
        }
        if self.cluster_for_endpoint(&old_server)?.is_none() {
            tracing::warn!(node_id = %id, server = %old_server, "no kubeconfig for the node's old cluster in any policy revision: it is not drained before kubeadm reset");
            return Ok(None);
        }
        Ok(Some(old_server))
    }

    /// The environment name and kubeconfig of the cluster at `api_endpoint`, from the newest policy revision
    /// that names it with API access.
    pub fn cluster_for_endpoint(&self, api_endpoint: &str) -> Result<Option<(String, String)>, StateError> {
        for rev in self.policy_revisions()? {
            let Some(p) = self.policy_of(rev.revision)? else {
                continue;
            };
            for e in p.environments() {
                if e.kubernetes.api_endpoint == api_endpoint
                    && let policy::Credentials::Kubeconfig(path) = &e.kubernetes.credentials
                {
                    return Ok(Some((e.name.clone(), path.clone())));
                }
            }
        }
        Ok(None)
    }

    /// Node `id` was drained from its old cluster: it takes its staged desired state now. Returns what to push.
    pub fn finish_drain(&self, id: &str) -> Result<Vec<(String, DesiredRecord)>, StateError> {
        for _ in attempts() {
            let Some((mut rec, raw)) = self.read_json::<RolloutRecord>(ROLLOUT)? else {
                return Ok(Vec::new());
            };
            let Some((mut live, live_raw)) = self.read_json::<LivePlacement>(LIVE)? else {
                return Ok(Vec::new());
            };
            if rec.draining.remove(id).is_none() {
                return Ok(Vec::new());
            }
            let Some((desired, np)) = rec.staged.remove(id) else {
                return Ok(Vec::new());
            };
            tracing::info!(node_id = %id, generation = desired.generation, "drained; moving node");
            live.placement.nodes.insert(id.to_string(), np);
            let key = crate::placement::desired_key(id);
            let txn = Txn::new()
                .if_equals(ROLLOUT, raw)
                .if_equals(LIVE, live_raw)
                .put(key.clone(), encode(&key, &desired)?)
                .put(LIVE, encode(LIVE, &live)?)
                .put(ROLLOUT, encode(ROLLOUT, &rec)?);
            if self.store().txn(txn)? {
                return Ok(vec![(id.to_string(), desired)]);
            }
        }
        Err(StateError::Conflict)
    }

    /// Node `id`'s drain failed: it stays where it is and counts as failed (which pauses the rollout).
    pub fn drain_failed(&self, id: &str, reason: &str) -> Result<Vec<(String, DesiredRecord)>, StateError> {
        let (pushed, _) = self.drive_rollout(|_, rec| {
            if !rec.draining.contains_key(id) {
                return Ok(Vec::new());
            }
            Ok(vec![waves::Event::NodeFailed {
                node: id.to_string(),
                reason: reason.to_string(),
            }])
        })?;
        Ok(pushed)
    }

    /// The running rollout, if any.
    pub fn rollout(&self) -> Result<Option<RolloutRecord>, StateError> {
        Ok(self.read_json::<RolloutRecord>(ROLLOUT)?.map(|(r, _)| r))
    }

    /// The last finished (completed or aborted) rollout, if any.
    pub fn last_rollout(&self) -> Result<Option<RolloutRecord>, StateError> {
        Ok(self.read_json::<RolloutRecord>(LAST)?.map(|(r, _)| r))
    }

    /// Feeds events (built from the rollout record) into the running rollout and stores the result in one
    /// transaction guarded by the record and the live placement; retried on conflicts. `events` returns no
    /// events to leave everything as it is. Returns the desired states to push and the record afterwards.
    fn drive_rollout<F>(&self, mut events: F) -> Result<(Pushed, Option<RolloutRecord>), StateError>
    where
        F: FnMut(&State, &RolloutRecord) -> Result<Vec<waves::Event>, StateError>,
    {
        for _ in attempts() {
            let Some((mut rec, raw)) = self.read_json::<RolloutRecord>(ROLLOUT)? else {
                return Ok((Vec::new(), None));
            };
            // An agent upgrade does not move nodes: it needs no live placement (none exists before the first
            // policy) and leaves it alone.
            let (mut live, live_raw) = match self.read_json::<LivePlacement>(LIVE)? {
                Some((l, raw)) => (l, Some(raw)),
                None if matches!(rec.kind, RolloutKind::Agent { .. }) => (LivePlacement::default(), None),
                None => return Ok((Vec::new(), None)),
            };
            let evs = events(self, &rec)?;
            let mut actions = Vec::new();
            for e in evs {
                actions.extend(rec.rollout.handle(e));
            }
            if let Some(why) = failure_share_exceeded(&rec) {
                tracing::warn!(%why, "rollout aborted on its failure share");
                rec.note = why;
                actions.extend(rec.rollout.handle(waves::Event::Abort));
            }
            if actions.is_empty() {
                return Ok((Vec::new(), Some(rec)));
            }
            let mut txn = Txn::new().if_equals(ROLLOUT, raw);
            if let Some(live_raw) = &live_raw {
                txn = txn.if_equals(LIVE, live_raw.clone());
            }
            let (mut txn, pushed) = self.run_actions(&mut rec, &mut live, actions, txn)?;
            // A node that failed (or timed out) while draining, or any node after an abort, is not moved.
            let stopped = matches!(rec.rollout.phase(), waves::Phase::Aborted);
            let keep: Vec<String> = rec
                .draining
                .keys()
                .filter(|n| !stopped && rec.rollout.node_state(n).is_some_and(waves::NodeState::in_flight))
                .cloned()
                .collect();
            rec.draining.retain(|n, _| keep.contains(n));
            if live_raw.is_some() {
                txn = txn.put(LIVE, encode(LIVE, &live)?);
            }
            txn = if matches!(rec.rollout.phase(), waves::Phase::Completed | waves::Phase::Aborted) {
                txn.delete(ROLLOUT).put(LAST, encode(LAST, &rec)?)
            } else {
                txn.put(ROLLOUT, encode(ROLLOUT, &rec)?)
            };
            if self.store().txn(txn)? {
                return Ok((pushed, Some(rec)));
            }
        }
        Err(StateError::Conflict)
    }

    /// Feeds an agent's report into the running rollout: the node's new state applied (done), healthy, or
    /// failed. Returns the desired states of nodes whose wave starts now.
    pub(crate) fn advance_rollout(
        &self,
        id: &str,
        observed: &ObservedRecord,
    ) -> Result<Vec<(String, DesiredRecord)>, StateError> {
        let (pushed, _) = self.drive_rollout(|s, rec| {
            if let RolloutKind::Agent { target, .. } = &rec.kind {
                return Ok(upgrade_events(id, target, rec, observed));
            }
            let desired = s.desired(id)?;
            if rec.rollout.node_state(id).is_none()
                || rec.staged.contains_key(id)
                || desired.generation != observed.generation
                || desired.policy_revision != rec.revision
            {
                return Ok(Vec::new());
            }
            let node = id.to_string();
            if !observed.error.is_empty() {
                return Ok(vec![waves::Event::NodeFailed {
                    node,
                    reason: observed.error.clone(),
                }]);
            }
            let mut evs = vec![waves::Event::NodeDone { node: node.clone() }];
            if healthy(&desired, observed, s.policy_of(rec.revision)?.as_ref()) {
                evs.push(waves::Event::NodeHealthy { node });
            }
            Ok(evs)
        })?;
        Ok(pushed)
    }

    /// Times out nodes of the running rollout that are applied but not healthy `timeout_secs` after their wave
    /// started (at `now`, unix seconds). Returns desired states to push (none unless a limit allows more) and
    /// how many nodes timed out.
    pub fn expire_rollout(
        &self,
        now: u64,
        timeout_secs: u64,
    ) -> Result<(Vec<(String, DesiredRecord)>, usize), StateError> {
        let mut timed_out = 0;
        let (pushed, _) = self.drive_rollout(|s, rec| {
            let mut evs = Vec::new();
            for (node, started) in &rec.started {
                let in_flight = matches!(
                    rec.rollout.node_state(node),
                    Some(waves::NodeState::Applying { .. } | waves::NodeState::WaitingHealthy { .. })
                );
                if in_flight && started.saturating_add(timeout_secs) <= now {
                    let last = s.observed(node)?.map(|o| o.join_error).unwrap_or_default();
                    tracing::warn!(node_id = %node, timeout_secs, last_join_error = %last, "rollout: node not healthy in time");
                    evs.push(waves::Event::TimedOut { node: node.clone() });
                }
            }
            timed_out = evs.len();
            Ok(evs)
        })?;
        Ok((pushed, timed_out))
    }

    /// The operator pauses, resumes or aborts the running rollout. Errors when none runs (or, for resume, when
    /// it is not paused). Returns the desired states to push (resume starts the next wave) and the record.
    pub fn control_rollout(
        &self,
        control: Control,
        by: &str,
        reason: &str,
    ) -> Result<(Vec<(String, DesiredRecord)>, RolloutRecord), StateError> {
        let Some(current) = self.rollout()? else {
            return Err(invalid(
                "no rollout is running; `nimbusctl rollout status` shows the last one".to_string(),
            ));
        };
        if control == Control::Resume && current.rollout.phase() != waves::Phase::Paused {
            return Err(invalid(format!(
                "the rollout of revision {} is {}, not paused; nothing to resume",
                current.revision,
                current.rollout.phase()
            )));
        }
        tracing::warn!(?control, by, reason, revision = current.revision, "rollout control");
        let (pushed, rec) = self.drive_rollout(|_, _| {
            Ok(vec![match control {
                Control::Pause => waves::Event::Pause,
                Control::Resume => waves::Event::Resume,
                Control::Abort => waves::Event::Abort,
            }])
        })?;
        let rec = match rec {
            Some(r) => r,
            None => self.last_rollout()?.unwrap_or(current),
        };
        Ok((pushed, rec))
    }
}

/// Times out rollout nodes (see [`State::expire_rollout`]) every few seconds until shutdown, pushing what a
/// freed place lets start.
pub async fn run_deadlines(ctx: std::sync::Arc<crate::context::Ctx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let timeout = ctx.config.rollout_node_timeout;
    let every = (timeout / 4).clamp(std::time::Duration::from_millis(500), std::time::Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let secs = timeout.as_secs().max(1);
        match ctx.singleton(move |s| s.expire_rollout(now_unix(), secs)).await {
            Ok((pushed, timed_out)) => {
                ctx.metrics.rollout_timeouts.inc_by(timed_out as u64);
                crate::placement::push(&ctx, pushed).await;
            }
            Err(e) => tracing::warn!(error = %e.message(), "rollout deadlines not checked; retried shortly"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::ApplyRequest;
    use crate::placement::tests::{enroll, report, req, state};

    const HASH: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Two environments (two clusters); nodes labelled `env: prod` belong to the one named by `prod_goes_to`.
    fn two_envs(prod_goes_to: &str) -> String {
        let m = |env: &str| if env == prod_goes_to { "prod" } else { "nobody" };
        format!(
            "version: 1\nenvironments:\n  - name: production\n    match: {{ labels: {{ env: {} }} }}\n    kubernetes:\n      \
             api_endpoint: \"10.0.0.10:6443\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: \
             /etc/nimbus/prod.kubeconfig }}\n  - name: staging\n    match: {{ labels: {{ env: {} }} }}\n    kubernetes:\n      \
             api_endpoint: \"10.0.0.20:6443\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: \
             /etc/nimbus/stage.kubeconfig }}\npools:\n  - name: db\n    match: {{ labels: {{ tier: db }} }}\n    \
             max_unavailable: 1\ncohorts:\n  - name: hub-enclave\n    pools: [db]\n",
            m("production"),
            m("staging"),
        )
    }

    fn env_of(s: &State, id: &str) -> String {
        s.desired(id).unwrap().assignment.unwrap().environment
    }

    fn node_state(s: &State, id: &str) -> waves::NodeState {
        s.rollout().unwrap().unwrap().rollout.node_state(id).unwrap().clone()
    }

    fn disruptive(yaml: &str) -> ApplyRequest {
        ApplyRequest {
            allow_disruptive: true,
            ..req(yaml)
        }
    }

    #[test]
    fn a_node_leaving_its_cluster_is_drained_first_and_healthy_only_once_joined_to_the_new_one() {
        let (_d, s) = state();
        let ids = [enroll(&s, 1, "db"), enroll(&s, 2, "db")];
        s.apply_policy(&req(&two_envs("production"))).unwrap();
        for id in &ids {
            report(&s, id, "joined", "10.0.0.10:6443");
        }

        let out = s.apply_policy(&disruptive(&two_envs("staging"))).unwrap();
        assert_eq!(
            (out.staged, out.pushed.len()),
            (2, 0),
            "the first node is drained before it is told"
        );
        let rec = s.rollout().unwrap().unwrap();
        assert_eq!(rec.draining.len(), 1);
        let (first, server) = rec.draining.iter().next().map(|(a, b)| (a.clone(), b.clone())).unwrap();
        let second = ids.iter().find(|i| **i != first).unwrap().clone();
        assert_eq!(server, "10.0.0.10:6443");
        assert!(
            rec.started.contains_key(&first),
            "its deadline runs from the wave's start"
        );
        assert_eq!(
            s.cluster_for_endpoint(&server).unwrap(),
            Some(("production".into(), "/etc/nimbus/prod.kubeconfig".into()))
        );
        assert_eq!(env_of(&s, &first), "production", "not told before the drain");

        let pushed = s.finish_drain(&first).unwrap();
        assert_eq!(pushed.len(), 1);
        assert_eq!(env_of(&s, &first), "staging");
        assert!(
            s.finish_drain(&first).unwrap().is_empty(),
            "a second drain report changes nothing"
        );

        // Acknowledged, but the kubelet is still joined to the old cluster: not healthy yet.
        assert!(report(&s, &first, "", "").is_empty());
        assert!(matches!(
            node_state(&s, &first),
            waves::NodeState::WaitingHealthy { .. }
        ));
        assert!(
            s.rollout().unwrap().unwrap().draining.is_empty(),
            "the second waits for the first"
        );

        // Joined to the new cluster: healthy; the second node's drain starts.
        assert!(report(&s, &first, "joined", "10.0.0.20:6443").is_empty());
        assert_eq!(node_state(&s, &first), waves::NodeState::Healthy);
        let rec = s.rollout().unwrap().unwrap();
        assert_eq!(rec.draining.keys().collect::<Vec<_>>(), vec![&second]);

        // Its drain fails: it keeps its place; with nothing left the rollout ends, the failure on record.
        assert!(
            s.drain_failed(&second, "eviction refused by a disruption budget")
                .unwrap()
                .is_empty()
        );
        assert_eq!(env_of(&s, &second), "production");
        assert!(s.rollout().unwrap().is_none());
        let last = s.last_rollout().unwrap().unwrap();
        assert_eq!(last.rollout.phase(), waves::Phase::Completed);
        assert!(
            matches!(last.rollout.node_state(&second), Some(waves::NodeState::Failed { reason }) if reason.contains("disruption budget"))
        );
        assert!(last.draining.is_empty());
    }

    #[test]
    fn timeouts_pause_and_the_operator_resumes_pauses_and_aborts() {
        let (_d, s) = state();
        let ids: Vec<String> = (1..=3).map(|n| enroll(&s, n, "db")).collect();
        s.apply_policy(&req(&two_envs("production"))).unwrap();
        for id in &ids {
            report(&s, id, "", ""); // never joined: nothing to drain
        }
        assert!(
            s.control_rollout(Control::Pause, "uid:0", "").is_err(),
            "no rollout runs"
        );

        let out = s.apply_policy(&disruptive(&two_envs("staging"))).unwrap();
        assert_eq!((out.staged, out.pushed.len()), (3, 1));
        let first = out.pushed[0].0.clone();
        assert!(report(&s, &first, "", "").is_empty(), "acknowledged, never joined");

        // Not healthy in time: failed, which pauses the rollout.
        let started = s.rollout().unwrap().unwrap().started[&first];
        assert_eq!(s.expire_rollout(started + 899, 900).unwrap().1, 0, "not yet");
        let (pushed, timed_out) = s.expire_rollout(started + 900, 900).unwrap();
        assert_eq!((pushed.len(), timed_out), (0, 1));
        let rec = s.rollout().unwrap().unwrap();
        assert_eq!(rec.rollout.phase(), waves::Phase::Paused);
        assert!(rec.rollout.status().pause_reason.unwrap().contains("timed out"));
        assert_eq!(
            s.expire_rollout(started + 5000, 900).unwrap().1,
            0,
            "a failed node times out once"
        );

        // Resume: the next node goes.
        let (pushed, rec) = s.control_rollout(Control::Resume, "uid:0", "checked the node").unwrap();
        assert_eq!((pushed.len(), rec.rollout.phase()), (1, waves::Phase::Running));
        let second = pushed[0].0.clone();
        assert!(s.control_rollout(Control::Resume, "uid:0", "").is_err(), "not paused");

        // Paused by the operator: a healthy report starts no new wave.
        let (_, rec) = s.control_rollout(Control::Pause, "uid:0", "change freeze").unwrap();
        assert_eq!(rec.rollout.phase(), waves::Phase::Paused);
        assert!(report(&s, &second, "joined", "10.0.0.20:6443").is_empty());
        assert_eq!(node_state(&s, &second), waves::NodeState::Healthy);

        // Aborted: the last node keeps its old place; the record moves to "last".
        let third = ids.iter().find(|i| **i != first && **i != second).unwrap();
        let (pushed, rec) = s.control_rollout(Control::Abort, "uid:0", "").unwrap();
        assert!(pushed.is_empty());
        assert_eq!(rec.rollout.phase(), waves::Phase::Aborted);
        assert_eq!(env_of(&s, third), "production");
        assert!(s.rollout().unwrap().is_none());
        assert_eq!(
            s.last_rollout().unwrap().unwrap().rollout.phase(),
            waves::Phase::Aborted
        );
        assert!(s.control_rollout(Control::Abort, "uid:0", "").is_err());
        assert_eq!("abort".parse::<Control>(), Ok(Control::Abort));
        assert!(
            "stop"
                .parse::<Control>()
                .unwrap_err()
                .contains("pause, resume or abort")
        );
    }

    #[test]
    fn health_needs_the_new_generation_no_error_and_the_right_cluster() {
        let policy = Policy::from_canonical_json(
            &policy::parse("p.yaml", &two_envs("staging"))
                .unwrap()
                .to_canonical_json(),
        )
        .unwrap();
        let placed = DesiredRecord {
            generation: 3,
            assignment: Some(policy::Assignment {
                environment: "staging".into(),
                pool: "db".into(),
                cohorts: Vec::new(),
                labels: Default::default(),
                taints: Vec::new(),
                storage: Vec::new(),
            }),
            ..Default::default()
        };
        let ok = ObservedRecord {
            generation: 3,
            kubelet: "joined".into(),
            kubelet_server: "10.0.0.20:6443".into(),
            ..Default::default()
        };
        assert!(healthy(&placed, &ok, Some(&policy)));
        assert!(!healthy(
            &placed,
            &ObservedRecord {
                generation: 2,
                ..ok.clone()
            },
            Some(&policy)
        ));
        assert!(!healthy(
            &placed,
            &ObservedRecord {
                error: "disk full".into(),
                ..ok.clone()
            },
            Some(&policy)
        ));
        let elsewhere = ObservedRecord {
            kubelet_server: "10.0.0.10:6443".into(),
            ..ok.clone()
        };
        assert!(!healthy(&placed, &elsewhere, Some(&policy)));
        let unplaced = DesiredRecord {
            assignment: None,
            ..placed.clone()
        };
        assert!(!healthy(&unplaced, &ok, Some(&policy)), "still joined after leaving");
        let reset = ObservedRecord {
            kubelet: "reset".into(),
            ..ok
        };
        assert!(healthy(&unplaced, &reset, Some(&policy)));
    }
}
