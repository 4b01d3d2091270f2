//! Hand-made changes to what the agent manages on its host, found and reverted on a timer
//! (`--drift-check-interval`, default 60 s), and reported to the coordinator (`ObservedState.drift_corrected`,
//! shown by `nimbusctl node show` and counted in `nimbus_host_drift_corrected_total`):
//!
//! - `desired.json` removed or edited: written again from the desired state the coordinator last sent.
//! - The kubelet join this agent made undone (kubelet.conf removed, or pointing at another cluster): reported
//!   as kubelet `drifted`, so the coordinator hands a fresh bootstrap token and the node joins again (a
//!   half-joined node is reset first, as for any join).
//!
//! Nothing is checked while a join runs, or before the coordinator sent a desired state.

use std::path::Path;

use nimbus_kube::kubeadm::{JoinState, Kubeadm};
use nimbus_proto::{DesiredState, ObservedState};

/// What one check found and did; `None` when everything was as it should be.
pub fn check(state_dir: &Path, kubeadm: &Kubeadm, last: &DesiredState) -> Option<ObservedState> {
    if last.generation == 0 || crate::join::running() {
        return None;
    }
    let mut corrected = Vec::new();
    let mut rejoin = None;
    match crate::desired::record(state_dir, last) {
        Ok(true) => corrected.push(format!(
            "{} was missing or edited by hand: restored generation {}",
            crate::desired::DESIRED_FILE,
            last.generation
        )),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, "desired state drifted and cannot be restored"),
    }
    let placed = last.placement.as_ref().is_some_and(|p| !p.environment.is_empty());
    if placed && let Some(server) = crate::join::joined_server(state_dir) {
        match kubeadm.state(&server) {
            JoinState::Joined { .. } => {}
            JoinState::NotJoined => rejoin = Some(format!("the kubelet join to {server} was undone by hand")),
            JoinState::HalfJoined { evidence } => {
                rejoin = Some(format!("the kubelet join to {server} was changed by hand: {evidence}"));
            }
        }
    }
    if let Some(why) = &rejoin {
        corrected.push(format!("{why}: asked the coordinator for a fresh join"));
    }
    if corrected.is_empty() {
        return None;
    }
    for c in &corrected {
        tracing::warn!(drift = %c, "hand-made change found and reverted");
    }
    Some(ObservedState {
        generation: last.generation,
        policy_revision: last.policy_revision,
        error: String::new(),
        kubelet: if rejoin.is_some() {
            "drifted".into()
        } else {
            String::new()
        },
        join_error: rejoin.unwrap_or_default(),
        kubelet_server: String::new(),
        drift_corrected: corrected,
        storage: Vec::new(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired() -> DesiredState {
        DesiredState {
            generation: 4,
            policy_revision: 2,
            placement: Some(nimbus_proto::Placement {
                environment: "production".into(),
                pool: "db".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn kubeadm(dir: &Path) -> Kubeadm {
        Kubeadm {
            binary: "/nonexistent/kubeadm".into(),
            kubernetes_dir: dir.join("etc-kubernetes"),
            kubelet_dir: dir.join("var-lib-kubelet"),
            failure_marker: dir.join("marker"),
        }
    }

    fn kubelet_conf(dir: &Path, server: &str) {
        std::fs::create_dir_all(dir.join("etc-kubernetes")).unwrap();
        std::fs::write(
            dir.join("etc-kubernetes/kubelet.conf"),
            format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{server}\n"),
        )
        .unwrap();
    }

    #[test]
    fn a_removed_or_edited_desired_file_is_restored_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let k = kubeadm(dir.path());
        let d = desired();
        crate::desired::apply(dir.path(), &d).unwrap();
        assert!(check(dir.path(), &k, &d).is_none(), "nothing drifted");
        assert!(
            check(dir.path(), &k, &DesiredState::default()).is_none(),
            "no desired state yet"
        );

        std::fs::remove_file(dir.path().join(crate::desired::DESIRED_FILE)).unwrap();
        let o = check(dir.path(), &k, &d).unwrap();
        assert_eq!((o.generation, o.kubelet.as_str()), (4, ""));
        assert_eq!(o.drift_corrected.len(), 1, "{:?}", o.drift_corrected);
        assert!(o.drift_corrected[0].contains("restored generation 4"));
        assert_eq!(crate::desired::load(dir.path()).unwrap().pool, "db");

        std::fs::write(dir.path().join(crate::desired::DESIRED_FILE), b"{\"generation\": 9}").unwrap();
        assert!(check(dir.path(), &k, &d).is_some());
        assert_eq!(crate::desired::load(dir.path()).unwrap().generation, 4);
        assert!(check(dir.path(), &k, &d).is_none(), "restored: quiet again");
    }

    #[test]
    fn an_undone_join_of_ours_asks_for_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let k = kubeadm(dir.path());
        let d = desired();
        crate::desired::apply(dir.path(), &d).unwrap();
        kubelet_conf(dir.path(), "10.0.0.10:6443");
        assert!(check(dir.path(), &k, &d).is_none(), "not our join: left alone");

        std::fs::write(
            dir.path().join(crate::join::JOINED_FILE),
            br#"{"server":"10.0.0.10:6443"}"#,
        )
        .unwrap();
        assert!(check(dir.path(), &k, &d).is_none(), "our join, intact");

        std::fs::remove_file(dir.path().join("etc-kubernetes/kubelet.conf")).unwrap();
        let o = check(dir.path(), &k, &d).unwrap();
        assert_eq!(o.kubelet, "drifted");
        assert!(o.join_error.contains("undone by hand"), "{}", o.join_error);

        kubelet_conf(dir.path(), "10.9.9.9:6443");
        let o = check(dir.path(), &k, &d).unwrap();
        assert!(o.join_error.contains("changed by hand"), "{}", o.join_error);

        let unplaced = DesiredState {
            placement: None,
            ..desired()
        };
        crate::desired::apply(dir.path(), &unplaced).unwrap();
        assert!(
            check(dir.path(), &k, &unplaced).is_none(),
            "an unplaced node is not re-joined"
        );
    }
}
