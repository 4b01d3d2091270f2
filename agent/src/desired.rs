//! The node's desired state from the coordinator (pulled when a stream opens, pushed when it changes):
//! recorded in the state dir (`desired.json`, 0600, atomic) and acknowledged with an `ObservedState`.
//! The kubelet join (`crate::join`) acts on the placement it carries; `crate::drift` restores the file when it
//! is removed or edited by hand.

use std::path::Path;

use nimbus_proto::{DesiredState, ObservedState};
use serde::{Deserialize, Serialize};

use crate::identity;

/// The file in the state dir holding the last desired state applied.
pub const DESIRED_FILE: &str = "desired.json";

/// What `desired.json` holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Recorded {
    pub generation: u64,
    pub policy_revision: u64,
    pub environment: String,
    pub pool: String,
    pub cohorts: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// `key=value:Effect`
    pub taints: Vec<String>,
    /// The storage plan (empty when none, or when the coordinator's plan was unreadable).
    #[serde(default)]
    pub storage: storage::StoragePlan,
}

impl Recorded {
    fn from_message(d: &DesiredState) -> Recorded {
        let p = d.placement.clone().unwrap_or_default();
        Recorded {
            generation: d.generation,
            policy_revision: d.policy_revision,
            environment: p.environment,
            pool: p.pool,
            cohorts: p.cohorts,
            labels: p.labels.into_iter().collect(),
            taints: p
                .taints
                .into_iter()
                .map(|t| format!("{}={}:{}", t.key, t.value, t.effect))
                .collect(),
            storage: crate::volumes::plan_of(d).unwrap_or_default(),
        }
    }
}

/// The last recorded desired state, if any (a damaged file counts as none: the coordinator resends).
pub fn load(dir: &Path) -> Option<Recorded> {
    let bytes = std::fs::read(dir.join(DESIRED_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `d` to `desired.json` unless the file already holds it. Returns whether it wrote.
pub fn record(dir: &Path, d: &DesiredState) -> Result<bool, String> {
    let rec = Recorded::from_message(d);
    if load(dir).as_ref() == Some(&rec) {
        return Ok(false);
    }
    let body = serde_json::to_vec_pretty(&rec).map_err(|e| e.to_string())?;
    identity::write_private(dir, DESIRED_FILE, &body).map_err(|e| e.to_string())?;
    Ok(true)
}

/// Applies `d` (generation 0: nothing to do yet) and says what happened, for the coordinator.
pub fn apply(dir: &Path, d: &DesiredState) -> Option<ObservedState> {
    if d.generation == 0 {
        return None;
    }
    let p = d.placement.clone().unwrap_or_default();
    let error = match record(dir, d) {
        Ok(true) => {
            tracing::info!(
                generation = d.generation,
                environment = %p.environment,
                pool = %p.pool,
                cohorts = ?p.cohorts,
                "desired state applied"
            );
            String::new()
        }
        Ok(false) => String::new(),
        Err(e) => {
            tracing::error!(generation = d.generation, error = %e, "desired state not recorded");
            format!("recording the desired state: {e}")
        }
    };
    Some(ObservedState {
        generation: d.generation,
        policy_revision: d.policy_revision,
        error,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn desired(generation: u64, pool: &str) -> DesiredState {
        DesiredState {
            generation,
            labels: Default::default(),
            placement: Some(nimbus_proto::Placement {
                environment: "production".into(),
                pool: pool.into(),
                cohorts: vec!["hub-enclave".into()],
                labels: [("polynimbus.io/pool".to_string(), pool.to_string())]
                    .into_iter()
                    .collect(),
                taints: vec![nimbus_proto::Taint {
                    key: "polynimbus.io/enclave".into(),
                    value: "true".into(),
                    effect: "NoSchedule".into(),
                }],
                storage_plan: Vec::new(),
            }),
            policy_revision: 3,
            join: None,
            agent: None,
        }
    }

    #[test]
    fn a_desired_state_is_recorded_privately_and_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            apply(dir.path(), &DesiredState::default()),
            None,
            "generation 0: nothing yet"
        );
        let ack = apply(dir.path(), &desired(2, "fast-nvme")).unwrap();
        assert_eq!((ack.generation, ack.policy_revision, ack.error.as_str()), (2, 3, ""));
        let rec = load(dir.path()).unwrap();
        assert_eq!(rec.pool, "fast-nvme");
        assert_eq!(rec.taints, ["polynimbus.io/enclave=true:NoSchedule"]);
        let mode = std::fs::metadata(dir.path().join(DESIRED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Applying the same state again is a no-op that still acknowledges.
        assert_eq!(apply(dir.path(), &desired(2, "fast-nvme")).unwrap().error, "");
    }

    #[test]
    fn a_failure_to_record_is_reported_not_hidden() {
        let ack = apply(Path::new("/nonexistent/state"), &desired(1, "burst")).unwrap();
        assert!(ack.error.contains("recording the desired state"), "{ack:?}");
    }
}
