//! The fleet policy in the store: numbered revisions (who, when, what — kept for audit), the live placement of
//! every node, and per node the desired state (a generation that grows whenever the node's placement changes)
//! and what the agent last reported applying (observed).
//!
//! # Keys (beside the layout in `crate::store`)
//! | key                     | value                                                        |
//! |-------------------------|--------------------------------------------------------------|
//! | `placement/current`     | [`LivePlacement`] JSON: current revision + every node's place |
//! | `policy/rev/<20 digits>`| [`PolicyRevisionRecord`] JSON: the document as applied        |
//! | `desired/<node id>`     | [`DesiredRecord`] JSON                                        |
//! | `observed/<node id>`    | [`ObservedRecord`] JSON                                       |
//! | `rollout/policy`        | [`RolloutRecord`] JSON: the wave engine's state + staged states |
//! | `rollout/last`          | the last finished [`RolloutRecord`] (see `crate::rollout`)     |
//!
//! # Disruptive changes go out in waves
//! A node leaving its environment or pool is drained and reset, so an apply that does so (with
//! `allow_disruptive`) does not hand those nodes their new state at once. They become targets of a
//! `waves::Rollout` (per-pool `max_unavailable` from the policy, one node per zone at a time, pause on the
//! first failure); their new desired states wait in the rollout record (`staged`) and the live placement keeps
//! their old place until their wave starts. A node's wave is done when its agent reports the new generation
//! applied and its kubelet healthy (`crate::rollout`); then the next wave starts. The rollout is persisted with the placement in one
//! transaction, so a restarted coordinator continues where it was. A new apply replaces a running rollout:
//! nodes not yet moved still hold their old place, so the new diff includes them.
//!
//! Every apply is one transaction guarded by a compare-and-swap on `placement/current`, so two concurrent
//! applies (or an apply racing the placement of a newly enrolled node) never interleave: the loser re-reads
//! and recomputes. Applying the same document again changes nothing and stores no revision.

use std::collections::BTreeMap;
use std::time::SystemTime;

use policy::{Assignment, NodeFacts, NodePlacement, Placement, Policy};
use serde::{Deserialize, Serialize};

use crate::state::{NodeStatus, State, StateError, attempts, encode, invalid};
use crate::store::Txn;

pub(crate) const LIVE: &[u8] = b"placement/current";
const REVISIONS: &str = "policy/rev/";
const DESIRED: &str = "desired/";
const OBSERVED: &str = "observed/";
/// The running rollout (policy change or agent upgrade; one at a time). Schema 1 kept it at `rollout/policy`.
pub(crate) const ROLLOUT: &[u8] = b"rollout/current";
/// Largest policy document accepted.
pub const MAX_POLICY_BYTES: usize = 1 << 20;

fn revision_key(n: u64) -> Vec<u8> {
    format!("{REVISIONS}{n:020}").into_bytes()
}

pub(crate) fn desired_key(id: &str) -> Vec<u8> {
    format!("{DESIRED}{id}").into_bytes()
}

fn observed_key(id: &str) -> Vec<u8> {
    format!("{OBSERVED}{id}").into_bytes()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The current revision and where it (and later enrollments) put every node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct LivePlacement {
    pub revision: u64,
    pub placement: Placement,
}

/// One applied revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PolicyRevisionRecord {
    pub revision: u64,
    pub digest: String,
    pub applied_by: String,
    pub applied_at: u64,
    /// "apply" or "rollback to N".
    pub action: String,
    pub file_name: String,
    /// The document as the operator gave it.
    pub yaml: String,
    /// The validated policy (canonical JSON), so a rollback does not depend on re-parsing old YAML.
    pub canonical: String,
    pub nodes_changed: u32,
    pub disruptive_changes: u32,
}

/// What a node should be. `generation` grows by one whenever `assignment`, `unplaced` or `agent` changes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct DesiredRecord {
    pub generation: u64,
    pub policy_revision: u64,
    pub assignment: Option<Assignment>,
    pub unplaced: Option<String>,
    /// The agent release the node should run (set by an upgrade rollout's wave); `None`: keep what runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentTarget>,
}

/// A published agent release a node is told to run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AgentTarget {
    pub version: String,
    /// TUF target name of the artefact.
    pub target: String,
    pub allow_downgrade: bool,
}

/// A release the node's launcher rolled back from, as the agent reported it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct FailedRelease {
    pub version: String,
    pub reason: String,
    pub at: u64,
}

/// What the agent last reported.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ObservedRecord {
    pub generation: u64,
    pub policy_revision: u64,
    /// Empty when applied.
    pub error: String,
    pub at: u64,
    /// "joined" or "failed" once the agent ran a kubelet join; "" before.
    #[serde(default)]
    pub kubelet: String,
    /// Where the last join failed (redacted by the agent).
    #[serde(default)]
    pub join_error: String,
    /// With `kubelet == "joined"`: the API endpoint joined ("" from agents before this field: taken as the
    /// node's current environment).
    #[serde(default)]
    pub kubelet_server: String,
    /// The last hand-made drift the agent reverted, and when (unix seconds).
    #[serde(default)]
    pub drift: String,
    #[serde(default)]
    pub drift_at: u64,
    /// The storage plan as the agent last reported applying it, per volume.
    #[serde(default)]
    pub storage: Vec<StorageStatus>,
    /// The agent version that sent the report ("" from agents before upgrades).
    #[serde(default)]
    pub agent_version: String,
    /// Releases the node's launcher rolled back from.
    #[serde(default)]
    pub failed_releases: Vec<FailedRelease>,
}

/// One volume of an agent's storage report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct StorageStatus {
    pub name: String,
    /// "ready", "created", "refused", "failed", or "removed" (decommission).
    pub state: String,
    pub detail: String,
}

impl ObservedRecord {
    /// Whether the kubelet reported joined to `api_endpoint`.
    pub fn joined_to(&self, api_endpoint: &str) -> bool {
        self.kubelet == "joined" && (self.kubelet_server.is_empty() || self.kubelet_server == api_endpoint)
    }
}

/// A running rollout of disruptive changes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RolloutRecord {
    /// What the rollout changes.
    #[serde(default)]
    pub kind: RolloutKind,
    pub revision: u64,
    pub rollout: waves::Rollout,
    /// New desired states (and places) of target nodes whose wave has not started yet.
    pub staged: BTreeMap<String, (DesiredRecord, NodePlacement)>,
    /// When each node's wave started (unix seconds): its deadline runs from here.
    #[serde(default)]
    pub started: BTreeMap<String, u64>,
    /// Nodes whose wave started but which are drained from their old cluster (API endpoint) first: their new
    /// desired state stays in `staged` until the drain is done (`crate::moves`).
    #[serde(default)]
    pub draining: BTreeMap<String, String>,
    /// Why it ended as it did, beyond the phase (e.g. aborted on the failure share; what was rolled back).
    #[serde(default)]
    pub note: String,
}

/// What a rollout changes on its nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RolloutKind {
    /// A disruptive fleet-policy change (revision `RolloutRecord::revision`).
    #[default]
    Policy,
    /// An agent upgrade: each wave's nodes are told to run `target`.
    Agent {
        target: AgentTarget,
        /// With rollback on abort: each target node's release before the upgrade.
        #[serde(default)]
        previous: BTreeMap<String, AgentTarget>,
        /// Abort when more than this share (per cent) of finished nodes failed; 0: off.
        #[serde(default)]
        abort_failure_percent: u32,
    },
}

impl RolloutKind {
    /// "policy" or "agent".
    pub fn name(&self) -> &'static str {
        match self {
            RolloutKind::Policy => "policy",
            RolloutKind::Agent { .. } => "agent",
        }
    }
}

/// An apply (or rollback) request, already authenticated.
#[derive(Clone, Debug)]
pub struct ApplyRequest {
    pub file_name: String,
    pub yaml: String,
    pub dry_run: bool,
    pub allow_disruptive: bool,
    pub applied_by: String,
    pub action: String,
    pub now: SystemTime,
}

/// What an apply did (or would do).
#[derive(Clone, Debug, Default)]
pub struct ApplyOutcome {
    /// The stored revision; 0 on dry run, refusal or no change.
    pub revision: u64,
    pub previous_revision: u64,
    pub digest: String,
    /// Per node that changes: (node name, change).
    pub changes: Vec<(String, policy::NodeChange)>,
    pub warnings: Vec<String>,
    pub unchanged: bool,
    pub refused_disruptive: bool,
    /// Desired states written: push these to the nodes.
    pub pushed: Vec<(String, DesiredRecord)>,
    /// Nodes whose disruptive change waits for its wave.
    pub staged: usize,
}

impl State {
    /// Placement inputs for every active node: enrollment labels, full inventory, zone from the platform.
    fn node_facts(&self) -> Result<(Vec<NodeFacts>, BTreeMap<String, String>), StateError> {
        let mut facts = Vec::new();
        let mut names = BTreeMap::new();
        for node in self.list_nodes()? {
            if node.status != NodeStatus::Active {
                continue;
            }
            let inventory = self.hardware(&node.id)?.map(|h| h.document);
            let zone = inventory.as_ref().and_then(|i| i.platform.zone.clone());
            names.insert(node.id.clone(), node.name.clone());
            facts.push(NodeFacts {
                id: node.id,
                name: node.name,
                labels: node.labels,
                inventory,
                zone,
            });
        }
        Ok((facts, names))
    }

    /// The live placement, if a policy was ever applied.
    pub fn live_placement(&self) -> Result<Option<LivePlacement>, StateError> {
        Ok(self.read_json::<LivePlacement>(LIVE)?.map(|(l, _)| l))
    }

    /// Revision `n`, or the current one for 0 (`None` when there is none).
    pub fn policy_revision(&self, n: u64) -> Result<Option<PolicyRevisionRecord>, StateError> {
        let n = if n == 0 {
            match self.live_placement()? {
                Some(l) => l.revision,
                None => return Ok(None),
            }
        } else {
            n
        };
        Ok(self
            .read_json::<PolicyRevisionRecord>(&revision_key(n))?
            .map(|(r, _)| r))
    }

    /// The current policy, if one was applied.
    pub fn current_policy(&self) -> Result<Option<Policy>, StateError> {
        let Some(rev) = self.policy_revision(0)? else {
            return Ok(None);
        };
        Policy::from_canonical_json(&rev.canonical)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                key: format!("{REVISIONS}{:020}", rev.revision),
                reason: e.to_string(),
            })
    }

    /// Every revision, newest first.
    pub fn policy_revisions(&self) -> Result<Vec<PolicyRevisionRecord>, StateError> {
        let mut out = Vec::new();
        for kv in self.store().scan_prefix(REVISIONS.as_bytes())? {
            let rec: PolicyRevisionRecord = crate::state::decode(&kv.0, &kv.1)?;
            out.push(rec);
        }
        out.reverse();
        Ok(out)
    }

    /// Node `id`'s desired state (default: generation 0, nothing placed).
    pub fn desired(&self, id: &str) -> Result<DesiredRecord, StateError> {
        Ok(self
            .read_json::<DesiredRecord>(&desired_key(id))?
            .map(|(d, _)| d)
            .unwrap_or_default())
    }

    /// What node `id`'s agent last reported applying.
    pub fn observed(&self, id: &str) -> Result<Option<ObservedRecord>, StateError> {
        Ok(self.read_json::<ObservedRecord>(&observed_key(id))?.map(|(o, _)| o))
    }

    /// After a decommission: drops the node's desired and observed state and stores an audit record
    /// (`decommissioned/<node id>`: name, overlay IP, who, when, the steps taken).
    pub fn record_decommission(
        &self,
        node: &crate::state::NodeRecord,
        by: &str,
        steps: &[String],
    ) -> Result<(), StateError> {
        let key = format!("decommissioned/{}", node.id).into_bytes();
        let record = serde_json::json!({
            "node_id": node.id, "name": node.name, "overlay_ip": node.overlay_ip.to_string(),
            "by": by, "at": unix(SystemTime::now()), "steps": steps,
        });
        let txn = Txn::new()
            .delete(desired_key(&node.id))
            .delete(observed_key(&node.id))
            .put(key.clone(), encode(&key, &record)?);
        self.store().txn(txn)?;
        Ok(())
    }

    /// Records what node `id`'s agent reports (a generation the coordinator never handed out is refused) and
    /// advances a running rollout. Returns desired states to push (nodes whose wave starts now).
    pub fn observe(&self, id: &str, observed: ObservedRecord) -> Result<Vec<(String, DesiredRecord)>, StateError> {
        let desired = self.desired(id)?;
        if observed.generation > desired.generation {
            return Err(invalid(format!(
                "node {id} reports generation {} but was only given {}",
                observed.generation, desired.generation
            )));
        }
        // A report that does not speak about the kubelet keeps what the last one said.
        let mut observed = observed;
        if let Some(old) = self.observed(id)? {
            if observed.kubelet.is_empty() {
                observed.kubelet = old.kubelet;
                observed.join_error = old.join_error;
                observed.kubelet_server = old.kubelet_server;
            }
            if observed.drift.is_empty() {
                observed.drift = old.drift;
                observed.drift_at = old.drift_at;
            }
            if observed.storage.is_empty() {
                observed.storage = old.storage;
            }
        }
        let key = observed_key(id);
        let value = encode(&key, &observed)?;
        self.store().txn(Txn::new().put(key, value))?;
        self.advance_rollout(id, &observed)
    }

    /// Desired-state writes that make every node of `placement` match it (only nodes whose place changed get
    /// a new generation).
    fn desired_updates(
        &self,
        placement: &Placement,
        revision: u64,
        txn: Txn,
    ) -> Result<(Txn, Vec<(String, DesiredRecord)>), StateError> {
        let mut txn = txn;
        let mut pushed = Vec::new();
        for (id, np) in &placement.nodes {
            let old = self.desired(id)?;
            let (assignment, unplaced) = match np {
                NodePlacement::Placed(a) => (Some(a.clone()), None),
                NodePlacement::Unplaced { reason } => (None, Some(reason.clone())),
            };
            if old.generation > 0 && old.assignment == assignment && old.unplaced == unplaced {
                continue;
            }
            let new = DesiredRecord {
                generation: old.generation + 1,
                policy_revision: revision,
                assignment,
                unplaced,
                agent: old.agent.clone(),
            };
            let key = desired_key(id);
            txn = txn.put(key.clone(), encode(&key, &new)?);
            pushed.push((id.clone(), new));
        }
        Ok((txn, pushed))
    }

    /// Validates `req.yaml`, computes the placement and the per-node diff against the live placement, and —
    /// unless it is a dry run, nothing changes, or disruptive changes are not allowed — stores a new revision,
    /// the new live placement and the desired states of the nodes that change, in one transaction.
    pub fn apply_policy(&self, req: &ApplyRequest) -> Result<ApplyOutcome, StateError> {
        if req.yaml.len() > MAX_POLICY_BYTES {
            return Err(invalid(format!(
                "the policy is {} bytes; at most {MAX_POLICY_BYTES} are accepted",
                req.yaml.len()
            )));
        }
        let policy = policy::parse(&req.file_name, &req.yaml).map_err(|e| invalid(format!("policy rejected:\n{e}")))?;
        self.apply_parsed(&policy, req)
    }

    /// Re-applies revision `to` as a new revision.
    pub fn rollback_policy(&self, to: u64, req: &ApplyRequest) -> Result<ApplyOutcome, StateError> {
        let Some(old) = self
            .read_json::<PolicyRevisionRecord>(&revision_key(to))?
            .map(|(r, _)| r)
        else {
            return Err(StateError::NotFound {
                what: "policy revision",
                name: to.to_string(),
            });
        };
        let policy = Policy::from_canonical_json(&old.canonical).map_err(|e| StateError::Corrupt {
            key: format!("{REVISIONS}{to:020}"),
            reason: e.to_string(),
        })?;
        let req = ApplyRequest {
            file_name: old.file_name.clone(),
            yaml: old.yaml.clone(),
            action: format!("rollback to {to}"),
            ..req.clone()
        };
        self.apply_parsed(&policy, &req)
    }

    fn apply_parsed(&self, policy: &Policy, req: &ApplyRequest) -> Result<ApplyOutcome, StateError> {
        let digest = policy.digest();
        for _ in attempts() {
            // One rollout at a time: a policy apply replaces a running policy rollout, but waits for an upgrade.
            let running = self.read_json::<RolloutRecord>(ROLLOUT)?;
            if let Some((r, _)) = &running
                && !req.dry_run
                && matches!(r.kind, RolloutKind::Agent { .. })
            {
                return Err(invalid(format!(
                    "an agent upgrade rollout is {}: apply the policy when it has finished, or `nimbusctl rollout \
                     abort` it first",
                    r.rollout.phase()
                )));
            }
            let live = self.read_json::<LivePlacement>(LIVE)?;
            let (current, raw) = match &live {
                Some((l, raw)) => (l.clone(), Some(raw.clone())),
                None => (LivePlacement::default(), None),
            };
            let current_digest = match self.policy_revision(current.revision)? {
                Some(r) if current.revision > 0 => r.digest,
                _ => String::new(),
            };
            let (facts, names) = self.node_facts()?;
            let placement = policy::place_with_previous(policy, &facts, live.as_ref().map(|(l, _)| &l.placement));
            let diff = policy::diff(&current.placement, &placement);
            let mut out = ApplyOutcome {
                previous_revision: current.revision,
                digest: digest.clone(),
                warnings: placement.warnings.iter().map(ToString::to_string).collect(),
                changes: diff
                    .iter()
                    .map(|c| (names.get(&c.node).cloned().unwrap_or_else(|| c.node.clone()), c.clone()))
                    .collect(),
                ..ApplyOutcome::default()
            };
            out.changes.sort_by(|a, b| a.0.cmp(&b.0));
            if current_digest == digest && diff.is_empty() {
                out.unchanged = true;
                return Ok(out);
            }
            let disruptive = diff.iter().filter(|c| c.is_disruptive()).count();
            if disruptive > 0 && !req.allow_disruptive {
                out.refused_disruptive = true;
                return Ok(out);
            }
            if req.dry_run {
                return Ok(out);
            }
            let revision = self.policy_revisions()?.first().map_or(0, |r| r.revision) + 1;
            let record = PolicyRevisionRecord {
                revision,
                digest: digest.clone(),
                applied_by: req.applied_by.clone(),
                applied_at: unix(req.now),
                action: req.action.clone(),
                file_name: req.file_name.clone(),
                yaml: req.yaml.clone(),
                canonical: policy.to_canonical_json(),
                nodes_changed: u32::try_from(diff.len()).unwrap_or(u32::MAX),
                disruptive_changes: u32::try_from(disruptive).unwrap_or(u32::MAX),
            };
            // Disruptive nodes keep their old place until their wave; the rest take the new one now.
            let disruptive_ids: Vec<&str> = diff
                .iter()
                .filter(|c| c.is_disruptive())
                .map(|c| c.node.as_str())
                .collect();
            let mut live_now = placement.clone();
            let mut targets = Vec::new();
            let mut later = BTreeMap::new();
            for id in &disruptive_ids {
                let Some(new_np) = placement.nodes.get(*id) else {
                    continue;
                };
                match current.placement.nodes.get(*id) {
                    Some(old) => live_now.nodes.insert((*id).to_string(), old.clone()),
                    None => live_now.nodes.remove(*id),
                };
                let pool = current
                    .placement
                    .nodes
                    .get(*id)
                    .and_then(|np| np.assignment().map(|a| a.pool.clone()))
                    .or_else(|| new_np.assignment().map(|a| a.pool.clone()))
                    .unwrap_or_default();
                let zone = facts.iter().find(|f| f.id == *id).and_then(|f| f.zone.clone());
                targets.push(waves::Target {
                    node: (*id).to_string(),
                    pool,
                    zone,
                    disruptive: true,
                });
                later.insert((*id).to_string(), new_np.clone());
            }
            let new_live = LivePlacement {
                revision,
                placement: live_now.clone(),
            };
            let rev_key = revision_key(revision);
            let mut txn = match raw {
                Some(raw) => Txn::new().if_equals(LIVE, raw),
                None => Txn::new().if_absent(LIVE),
            };
            txn = txn
                .if_absent(rev_key.clone())
                .put(rev_key.clone(), encode(&rev_key, &record)?);
            txn = match &running {
                Some((_, raw)) => txn.if_equals(ROLLOUT, raw.clone()),
                None => txn.if_absent(ROLLOUT),
            };
            let (mut txn, mut pushed) = self.desired_updates(&live_now, revision, txn)?;
            let mut staged_count = 0;
            let mut final_live = new_live;
            if targets.is_empty() {
                txn = txn.delete(ROLLOUT);
            } else {
                staged_count = targets.len();
                let mut staged = BTreeMap::new();
                for (id, np) in later {
                    let old = self.desired(&id)?;
                    let (assignment, unplaced) = match &np {
                        NodePlacement::Placed(a) => (Some(a.clone()), None),
                        NodePlacement::Unplaced { reason } => (None, Some(reason.clone())),
                    };
                    let d = DesiredRecord {
                        generation: old.generation + 1,
                        policy_revision: revision,
                        assignment,
                        unplaced,
                        agent: old.agent.clone(),
                    };
                    staged.insert(id, (d, np));
                }
                let limits = waves::Limits {
                    max_unavailable_per_pool: policy
                        .pools()
                        .iter()
                        .map(|p| (p.name.clone(), p.max_unavailable.max(1)))
                        .collect(),
                    default_max_unavailable: 1,
                    max_unavailable_per_zone: 1,
                    max_failures: 0,
                    wave_size: None,
                    rollback_on_abort: false,
                    ..waves::Limits::default()
                };
                let rollout =
                    waves::Rollout::new(targets, limits).map_err(|e| invalid(format!("cannot plan the waves: {e}")))?;
                let mut rec = RolloutRecord {
                    kind: RolloutKind::Policy,
                    revision,
                    rollout,
                    staged,
                    started: BTreeMap::new(),
                    draining: BTreeMap::new(),
                    note: String::new(),
                };
                let actions = rec.rollout.handle(waves::Event::Started);
                let (t, p) = self.run_actions(&mut rec, &mut final_live, actions, txn)?;
                txn = t;
                pushed.extend(p);
                txn = txn.put(ROLLOUT, encode(ROLLOUT, &rec)?);
            }
            txn = txn.put(LIVE, encode(LIVE, &final_live)?);
            if self.store().txn(txn)? {
                out.revision = revision;
                out.pushed = pushed;
                out.staged = staged_count;
                return Ok(out);
            }
        }
        Err(StateError::Conflict)
    }

    /// Places nodes the live placement does not know yet (new enrollments, first inventories) under the current
    /// policy, and follows inventory changes of placed nodes within their place (storage volumes). Nodes already
    /// placed keep their environment and pool: moving them is a disruptive change only an apply makes.
    /// Returns the desired states to push.
    pub fn reconcile_placement(&self) -> Result<Vec<(String, DesiredRecord)>, StateError> {
        for _ in attempts() {
            let Some((live, raw)) = self.read_json::<LivePlacement>(LIVE)? else {
                return Ok(Vec::new());
            };
            let Some(rev) = self.policy_revision(live.revision)? else {
                return Ok(Vec::new());
            };
            let policy = Policy::from_canonical_json(&rev.canonical).map_err(|e| StateError::Corrupt {
                key: format!("{REVISIONS}{:020}", live.revision),
                reason: e.to_string(),
            })?;
            let (facts, _) = self.node_facts()?;
            let fresh = policy::place_with_previous(&policy, &facts, Some(&live.placement));
            let mut merged = fresh.clone();
            for (id, np) in &mut merged.nodes {
                if let Some(NodePlacement::Placed(old)) = live.placement.nodes.get(id)
                    && np.assignment() != Some(old)
                {
                    // Same environment and pool: only what the inventory decides changed (storage volumes, e.g.
                    // instance-store disks with new serials after a stop/start, and their labels); not disruptive.
                    let same_place = np
                        .assignment()
                        .is_some_and(|a| a.environment == old.environment && a.pool == old.pool);
                    if !same_place {
                        *np = NodePlacement::Placed(old.clone());
                    }
                }
            }
            if merged == live.placement {
                return Ok(Vec::new());
            }
            let new_live = LivePlacement {
                revision: live.revision,
                placement: merged.clone(),
            };
            let txn = Txn::new().if_equals(LIVE, raw).put(LIVE, encode(LIVE, &new_live)?);
            let (txn, pushed) = self.desired_updates(&merged, live.revision, txn)?;
            if self.store().txn(txn)? {
                return Ok(pushed);
            }
        }
        Err(StateError::Conflict)
    }
}

/// A taint's effect as Kubernetes spells it (`NoSchedule`, `PreferNoSchedule`, `NoExecute`).
pub fn taint_effect(t: &policy::Taint) -> String {
    format!("{:?}", t.effect)
}

/// The wire form of an assignment.
pub fn placement_message(a: &Assignment) -> nimbus_proto::Placement {
    nimbus_proto::Placement {
        environment: a.environment.clone(),
        pool: a.pool.clone(),
        cohorts: a.cohorts.clone(),
        labels: a.labels.clone().into_iter().collect(),
        taints: a
            .taints
            .iter()
            .map(|t| nimbus_proto::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: taint_effect(t),
            })
            .collect(),
        storage_plan: if a.storage.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&storage::StoragePlan {
                volumes: a.storage.clone(),
            })
            .unwrap_or_default()
        },
    }
}

/// The wire form of a desired state, with the node's enrollment labels; `release_url` is where the agent
/// fetches releases (`crate::releases::url`).
pub fn desired_message(
    d: &DesiredRecord,
    labels: &BTreeMap<String, String>,
    release_url: &str,
) -> nimbus_proto::DesiredState {
    nimbus_proto::DesiredState {
        generation: d.generation,
        labels: labels.clone().into_iter().collect(),
        placement: d.assignment.as_ref().map(placement_message),
        policy_revision: d.policy_revision,
        join: None,
        agent: d.agent.as_ref().map(|a| nimbus_proto::AgentRelease {
            version: a.version.clone(),
            target: a.target.clone(),
            metadata_url: crate::releases::metadata_url(release_url),
            targets_url: crate::releases::targets_url(release_url),
            allow_downgrade: a.allow_downgrade,
        }),
    }
}

/// "converged", "pending" or "failed: ..." for a node with a desired state; "" without one.
pub fn convergence(d: &DesiredRecord, o: Option<&ObservedRecord>) -> String {
    if d.generation == 0 {
        return String::new();
    }
    match o {
        Some(o) if o.generation == d.generation && o.error.is_empty() => "converged".into(),
        Some(o) if o.generation == d.generation => format!("failed: {}", o.error),
        _ => "pending".into(),
    }
}

/// Sends each pushed desired state down its node's stream (nodes without a stream pull it when they connect).
pub async fn push(ctx: &crate::context::Ctx, pushed: Vec<(String, DesiredRecord)>) {
    for (id, desired) in pushed {
        let lookup = id.clone();
        let labels = match ctx.state(move |s| s.node(&lookup)).await {
            Ok(Some(n)) => n.labels,
            _ => continue,
        };
        let mut state = desired_message(&desired, &labels, &crate::releases::url(ctx));
        state.join = crate::join::instruction(ctx, &id, &desired).await;
        let msg = nimbus_proto::CoordinatorMessage {
            msg: Some(nimbus_proto::coordinator_message::Msg::DesiredState(state)),
        };
        let sent = crate::replicas::deliver(ctx, &id, msg);
        tracing::info!(node_id = %id, generation = desired.generation, sent, "desired state changed");
    }
}

/// Places newly known nodes under the current policy and pushes their desired state (after an enrollment
/// or an inventory change). Errors are logged: the next change retries.
pub async fn reconcile(ctx: &crate::context::Ctx) {
    match ctx.state(|s| s.reconcile_placement()).await {
        Ok(pushed) if pushed.is_empty() => {}
        Ok(pushed) => push(ctx, pushed).await,
        Err(e) => tracing::warn!(error = %e.message(), "placement not reconciled; the next change retries"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine as _;

    use super::*;
    use crate::ipam::OverlayPlan;
    use crate::state::EnrollInput;
    use crate::store::SledStore;

    pub(crate) const ENV: &str = r#"version: 1
environments:
  - name: production
    match: { labels: { env: prod } }
    kubernetes:
      api_endpoint: "10.0.0.10:6443"
      ca_cert_hash: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
      credentials: { kubeconfig: /etc/nimbus/prod.kubeconfig }
"#;

    pub(crate) fn policy(db_tier: &str, web_labels: &str) -> String {
        format!(
            "{ENV}pools:\n  - name: db\n    match: {{ labels: {{ tier: {db_tier} }} }}\n    min: 1\n  - name: web\n    match: {{ labels: {{ tier: web }} }}\n    min: 1\n    labels: {{ {web_labels} }}\ncohorts:\n  - name: hub-enclave\n    pools: [db]\n  - name: edge\n    pools: [web]\n"
        )
    }

    pub(crate) fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let s = State::open(
            Arc::new(store),
            OverlayPlan::new("10.9.0.0/24".parse().unwrap()).unwrap(),
        )
        .unwrap();
        (dir, s)
    }

    pub(crate) fn enroll(s: &State, n: u8, tier: &str) -> String {
        let labels = [("env", "prod"), ("tier", tier)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (token, _) = s
            .create_token(Duration::from_secs(600), 1, labels, String::new(), SystemTime::now())
            .unwrap();
        let node = s
            .enroll(
                &token.to_string_secret(),
                EnrollInput {
                    public_key_b64url: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([n; 32]),
                    hostname: format!("host-{n}"),
                    machine_id: format!("{n:032x}"),
                    agent_version: "0.1.0".into(),
                    requested_name: format!("node-{n}"),
                    macs: Vec::new(),
                },
                SystemTime::now(),
            )
            .unwrap();
        node.id
    }

    pub(crate) fn req(yaml: &str) -> ApplyRequest {
        ApplyRequest {
            file_name: "policy.yaml".into(),
            yaml: yaml.into(),
            dry_run: false,
            allow_disruptive: false,
            applied_by: "uid:0".into(),
            action: "apply".into(),
            now: SystemTime::now(),
        }
    }

    #[test]
    fn apply_places_every_node_once_and_reapplying_changes_nothing() {
        let (_d, s) = state();
        let db = enroll(&s, 1, "db");
        let web = enroll(&s, 2, "web");
        let out = s.apply_policy(&req(&policy("db", ""))).unwrap();
        assert_eq!((out.revision, out.previous_revision, out.unchanged), (1, 0, false));
        assert_eq!(out.pushed.len(), 2);
        let d = s.desired(&db).unwrap();
        assert_eq!(d.generation, 1);
        let a = d.assignment.unwrap();
        assert_eq!((a.environment.as_str(), a.pool.as_str()), ("production", "db"));
        assert_eq!(a.cohorts, ["hub-enclave"]);
        assert_eq!(a.labels["polynimbus.io/pool"], "db");
        assert_eq!(s.desired(&web).unwrap().assignment.unwrap().pool, "web");

        let again = s.apply_policy(&req(&policy("db", ""))).unwrap();
        assert!(again.unchanged, "{again:?}");
        assert_eq!(again.revision, 0);
        assert_eq!(s.policy_revisions().unwrap().len(), 1, "no second revision");
        assert_eq!(s.desired(&db).unwrap().generation, 1);
        let rev = s.policy_revision(0).unwrap().unwrap();
        assert_eq!(
            (rev.revision, rev.applied_by.as_str(), rev.action.as_str()),
            (1, "uid:0", "apply")
        );
    }

    #[test]
    fn only_affected_nodes_change_and_disruptive_changes_need_consent() {
        let (_d, s) = state();
        let db = enroll(&s, 1, "db");
        let web = enroll(&s, 2, "web");
        s.apply_policy(&req(&policy("db", ""))).unwrap();

        // A label on the web pool: not disruptive, only the web node gets a new generation.
        let out = s
            .apply_policy(&req(&policy("db", "\"polynimbus.io/ingress\": \"true\"")))
            .unwrap();
        assert_eq!(out.revision, 2);
        assert_eq!(out.changes.len(), 1, "{:?}", out.changes);
        assert_eq!(out.changes[0].0, "node-2");
        assert!(!out.changes[0].1.is_disruptive());
        assert_eq!(s.desired(&web).unwrap().generation, 2);
        assert_eq!(s.desired(&db).unwrap().generation, 1, "the db node is untouched");

        // The db pool no longer matches node-1: it would leave its pool (drain). Refused without consent.
        let moving = policy("olap", "\"polynimbus.io/ingress\": \"true\"");
        let refused = s.apply_policy(&req(&moving)).unwrap();
        assert!(refused.refused_disruptive && refused.revision == 0, "{refused:?}");
        assert_eq!(s.live_placement().unwrap().unwrap().revision, 2, "nothing stored");
        let dry = s
            .apply_policy(&ApplyRequest {
                dry_run: true,
                allow_disruptive: true,
                ..req(&moving)
            })
            .unwrap();
        assert_eq!((dry.revision, dry.changes.len()), (0, 1));
        let done = s
            .apply_policy(&ApplyRequest {
                allow_disruptive: true,
                ..req(&moving)
            })
            .unwrap();
        assert_eq!(done.revision, 3);
        let d = s.desired(&db).unwrap();
        assert_eq!((d.generation, d.assignment.is_none()), (2, true));
        assert!(d.unplaced.unwrap().contains("pool"), "the reason names the pools");

        // Roll back to revision 1 (disruptive again: node-1 returns to db; web loses its label).
        let back = s
            .rollback_policy(
                1,
                &ApplyRequest {
                    allow_disruptive: true,
                    ..req("")
                },
            )
            .unwrap();
        assert_eq!(back.revision, 4);
        assert_eq!(s.desired(&db).unwrap().assignment.unwrap().pool, "db");
        let revs = s.policy_revisions().unwrap();
        assert_eq!(revs[0].action, "rollback to 1");
        assert_eq!(revs[0].digest, revs[3].digest);
        assert!(s.rollback_policy(9, &req("")).is_err());
    }

    #[test]
    fn nodes_enrolled_later_are_placed_and_observations_are_checked() {
        let (_d, s) = state();
        enroll(&s, 1, "db");
        assert!(
            s.reconcile_placement().unwrap().is_empty(),
            "no policy yet: nothing to place"
        );
        s.apply_policy(&req(&policy("db", ""))).unwrap();
        let late = enroll(&s, 3, "web");
        let pushed = s.reconcile_placement().unwrap();
        assert_eq!(pushed.len(), 1);
        assert_eq!(pushed[0].0, late);
        assert_eq!(s.desired(&late).unwrap().assignment.unwrap().pool, "web");
        assert!(s.reconcile_placement().unwrap().is_empty(), "idempotent");

        let ok = ObservedRecord {
            generation: 1,
            policy_revision: 1,
            error: String::new(),
            at: 1,
            ..Default::default()
        };
        s.observe(&late, ok.clone()).unwrap();
        assert_eq!(
            convergence(&s.desired(&late).unwrap(), s.observed(&late).unwrap().as_ref()),
            "converged"
        );
        let bogus = ObservedRecord { generation: 7, ..ok };
        assert!(s.observe(&late, bogus).is_err(), "a generation never handed out");
    }

    #[test]
    fn storage_follows_the_inventory_without_moving_the_node() {
        let (_d, s) = state();
        let id = enroll(&s, 1, "db");
        let disk = |serial: &str| inventory::Disk {
            name: "nvme1n1".into(),
            size_bytes: Some(2_000_000_000_000),
            serial: Some(serial.into()),
            model: Some("Amazon EC2 NVMe Instance Storage".into()),
            transport: inventory::Transport::Nvme,
            class: inventory::DiskClass::LocalInstanceStore,
            by_id: vec![format!(
                "/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_{serial}"
            )],
            ..Default::default()
        };
        let inv = |serial: &str| inventory::Inventory {
            disks: vec![disk(serial)],
            ..Default::default()
        };
        s.set_hardware(&id, inv("AWS1"), SystemTime::now()).unwrap();
        let with_storage = policy("db", "").replace(
            "    min: 1\n  - name: web",
            "    min: 1\n    storage:\n      - name: fast\n        disks: { class: [local-instance-store] }\n        \
             mount_point: /var/lib/nimbus/volumes/fast\n  - name: web",
        );
        s.apply_policy(&req(&with_storage)).unwrap();
        let d1 = s.desired(&id).unwrap();
        let a1 = d1.assignment.clone().unwrap();
        assert_eq!(a1.storage[0].disks[0].serial.as_deref(), Some("AWS1"));
        let msg = placement_message(&a1);
        let plan: storage::StoragePlan = serde_json::from_slice(&msg.storage_plan).unwrap();
        assert_eq!(plan.volumes[0].mount_point, "/var/lib/nimbus/volumes/fast");

        // After a stop/start the instance store is a new disk: the plan follows, the node stays in its pool.
        s.set_hardware(&id, inv("AWS2"), SystemTime::now()).unwrap();
        let pushed = s.reconcile_placement().unwrap();
        assert_eq!(pushed.len(), 1);
        let d2 = s.desired(&id).unwrap();
        assert_eq!(d2.generation, d1.generation + 1);
        let a2 = d2.assignment.unwrap();
        assert_eq!((a2.environment.as_str(), a2.pool.as_str()), ("production", "db"));
        assert_eq!(a2.storage[0].disks[0].serial.as_deref(), Some("AWS2"));
        assert!(s.reconcile_placement().unwrap().is_empty(), "idempotent");
        assert!(s.rollout().unwrap().is_none(), "not a disruptive change");
    }

    /// The agent of `id` reports its current desired state applied, with this kubelet state and endpoint.
    pub(crate) fn report(s: &State, id: &str, kubelet: &str, server: &str) -> Vec<(String, DesiredRecord)> {
        let d = s.desired(id).unwrap();
        s.observe(
            id,
            ObservedRecord {
                generation: d.generation,
                policy_revision: d.policy_revision,
                at: 1,
                kubelet: kubelet.into(),
                kubelet_server: server.into(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// Applied, kubelet joined to ENV's endpoint (a placed node is healthy only once joined).
    pub(crate) fn applied(s: &State, id: &str) -> Vec<(String, DesiredRecord)> {
        report(s, id, "joined", "10.0.0.10:6443")
    }

    #[test]
    fn disruptive_changes_go_one_node_per_pool_at_a_time_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = SledStore::open(dir.path()).unwrap();
            State::open(
                Arc::new(store),
                OverlayPlan::new("10.9.0.0/24".parse().unwrap()).unwrap(),
            )
            .unwrap()
        };
        let s = open();
        let ids: Vec<String> = (1..=3).map(|n| enroll(&s, n, "db")).collect();
        s.apply_policy(&req(&policy("db", ""))).unwrap();
        for id in &ids {
            applied(&s, id);
        }
        let gen1: Vec<u64> = ids.iter().map(|id| s.desired(id).unwrap().generation).collect();
        assert_eq!(gen1, [1, 1, 1]);

        // Every db node loses its place (drain + reset): with max_unavailable 1, one at a time, each drained
        // from its cluster before it is told.
        let out = s
            .apply_policy(&ApplyRequest {
                allow_disruptive: true,
                ..req(&policy("olap", ""))
            })
            .unwrap();
        assert_eq!(
            (out.staged, out.pushed.len()),
            (3, 0),
            "the first wave's node is drained first"
        );
        let draining = |s: &State| -> String { s.rollout().unwrap().unwrap().draining.keys().next().unwrap().clone() };
        let first = draining(&s);
        let moved = |s: &State| ids.iter().filter(|id| s.desired(id).unwrap().generation == 2).count();
        assert_eq!(moved(&s), 0);
        assert_eq!(s.finish_drain(&first).unwrap().len(), 1);
        assert_eq!(moved(&s), 1);
        let live = s.live_placement().unwrap().unwrap();
        let still_db = ids
            .iter()
            .filter(|id| live.placement.nodes[*id].assignment().is_some_and(|a| a.pool == "db"))
            .count();
        assert_eq!(still_db, 2, "nodes waiting for their wave keep their old place");

        // The node acknowledges but its kubelet is still joined: not healthy. Once it reports the reset, the next
        // wave starts (with a drain). An unrelated report changes nothing.
        assert!(applied(&s, &ids.iter().find(|i| **i != first).unwrap().clone()).is_empty());
        assert!(applied(&s, &first).is_empty());
        assert!(reset(&s, &first).is_empty());
        let second = draining(&s);
        assert_ne!(second, first);
        assert_eq!(s.finish_drain(&second).unwrap().len(), 1);
        assert_eq!(moved(&s), 2);

        // The coordinator restarts mid-rollout: the next report continues it, nothing is told twice.
        drop(s);
        let s = open();
        assert!(reset(&s, &second).is_empty());
        let third = draining(&s);
        drop(s);
        let s = open();
        assert_eq!(draining(&s), third, "a drain in progress survives a restart");
        assert_eq!(s.finish_drain(&third).unwrap().len(), 1);
        assert_eq!(moved(&s), 3);
        assert!(reset(&s, &third).is_empty());
        assert!(s.rollout().unwrap().is_none(), "completed rollouts are removed");
        assert_eq!(s.last_rollout().unwrap().unwrap().rollout.status().counts.healthy, 3);
        assert!(
            ids.iter().all(|id| s.desired(id).unwrap().generation == 2),
            "no node told twice"
        );
    }

    fn reset(s: &State, id: &str) -> Vec<(String, DesiredRecord)> {
        report(s, id, "reset", "")
    }

    #[test]
    fn a_bad_policy_is_refused_with_positions() {
        let (_d, s) = state();
        let err = s
            .apply_policy(&req("version: 1\ncolour: blue\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.yaml:2:1"), "{err}");
        assert!(s.live_placement().unwrap().is_none());
    }
}
