//! Local storage, agent side: the plan in the desired state (JSON, hostile input: size-limited and parsed) is
//! applied with `nimbus-storage` on a blocking thread, one run at a time, and the result per volume goes up the
//! stream (`ObservedState.storage`; a refused or failed volume also sets `error`, so the node shows as failed
//! with the reason). The same plan is applied again at every drift check: a no-op when everything is in place,
//! and instance store that came back empty is prepared again (reported as drift). Decommission removes only
//! what this agent created (`nimbus-storage`'s record).

use std::sync::atomic::{AtomicBool, Ordering};

use nimbus_proto::{DesiredState, ObservedState, StorageVolumeStatus};

use crate::config::Config;

static RUNNING: AtomicBool = AtomicBool::new(false);

/// The storage plan `d` carries (empty when none). An oversized or unreadable plan is an error for the
/// coordinator.
pub fn plan_of(d: &DesiredState) -> Result<storage::StoragePlan, String> {
    storage::StoragePlan::from_json(
        d.placement
            .as_ref()
            .map(|p| p.storage_plan.as_slice())
            .unwrap_or_default(),
    )
}

/// The engine's view of this host.
pub fn host(cfg: &Config) -> storage::Host {
    let mut h = storage::Host::system(cfg.state_dir.clone());
    h.unit_dir = cfg.storage_unit_dir.clone();
    h
}

fn status(name: &str, state: &str, detail: String) -> StorageVolumeStatus {
    StorageVolumeStatus {
        name: name.to_string(),
        state: state.to_string(),
        detail,
    }
}

/// Applies `plan` (blocking) and says per volume what happened; `Err` when the run as a whole failed.
pub fn apply_blocking(cfg: &Config, plan: &storage::StoragePlan) -> Result<Vec<StorageVolumeStatus>, String> {
    let report = storage::apply(&host(cfg), plan, &storage::ApplyOptions::default()).map_err(|e| e.to_string())?;
    Ok(statuses(&report))
}

/// `/dev/… (UUID …) on /mount/point`, for the operator.
fn summary(v: &storage::VolumeReport) -> String {
    let mut s = v.device.clone().unwrap_or_else(|| v.disks.join(", "));
    if let Some(u) = &v.fs_uuid {
        s.push_str(&format!(" (UUID {u})"));
    }
    if let Some(m) = &v.mount_point {
        s.push_str(&format!(" on {m}"));
    }
    s
}

fn statuses(report: &storage::Report) -> Vec<StorageVolumeStatus> {
    report
        .volumes
        .iter()
        .map(|v| match &v.state {
            storage::VolumeState::Created => status(&v.name, "created", summary(v)),
            storage::VolumeState::AlreadyReady => status(&v.name, "ready", summary(v)),
            storage::VolumeState::Refused(why) => status(&v.name, "refused", why.clone()),
            storage::VolumeState::Failed(why) => status(&v.name, "failed", why.clone()),
            storage::VolumeState::Removed => status(&v.name, "removed", summary(v)),
        })
        .collect()
}

/// What applying `plan` would do on this host, without doing it: the commands (and file changes, as
/// `# write PATH` lines) in order, then one `# volume NAME refused|failed: REASON` line per volume that would not
/// be prepared.
pub fn dry_run(cfg: &Config, plan: &storage::StoragePlan) -> Result<Vec<String>, String> {
    let opts = storage::ApplyOptions {
        dry_run: true,
        ..storage::ApplyOptions::default()
    };
    let report = storage::apply(&host(cfg), plan, &opts).map_err(|e| e.to_string())?;
    let mut lines = report.commands.clone();
    lines.extend(report.files.iter().map(|f| format!("# {f}")));
    for v in report.problems() {
        let (state, why) = match &v.state {
            storage::VolumeState::Refused(why) => ("refused", why),
            storage::VolumeState::Failed(why) => ("failed", why),
            _ => continue,
        };
        lines.push(format!("# volume {} {state}: {why}", v.name));
    }
    Ok(lines)
}

/// Removes every volume this agent created (decommission); per volume what was removed.
pub fn remove_blocking(cfg: &Config) -> Result<Vec<StorageVolumeStatus>, String> {
    let report = storage::remove(&host(cfg), &storage::RemoveOptions::default()).map_err(|e| e.to_string())?;
    Ok(statuses(&report))
}

/// What an apply result means for the coordinator: the per-volume statuses, and an error naming the first
/// refused or failed volume.
pub fn observed(d: &DesiredState, result: Result<Vec<StorageVolumeStatus>, String>) -> ObservedState {
    let (storage, error) = match result {
        Ok(st) => {
            let bad = st
                .iter()
                .find(|s| s.state == "refused" || s.state == "failed")
                .map(|s| format!("storage {} {}: {}", s.name, s.state, s.detail))
                .unwrap_or_default();
            (st, bad)
        }
        Err(e) => (Vec::new(), format!("storage: {e}")),
    };
    ObservedState {
        generation: d.generation,
        policy_revision: d.policy_revision,
        error,
        storage,
        ..Default::default()
    }
}

/// Applies the plan `d` carries in the background (unless a run is going on; the next desired state or drift
/// check applies it again) and hands the result to `report`. `drift`: only report when something was created
/// (instance store prepared again), as drift.
pub fn spawn_apply<F>(cfg: &Config, d: &DesiredState, drift: bool, report: F)
where
    F: FnOnce(ObservedState) + Send + 'static,
{
    let plan = match plan_of(d) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "storage plan refused");
            report(observed(d, Err(e)));
            return;
        }
    };
    if plan.volumes.is_empty() || d.generation == 0 {
        return;
    }
    if RUNNING.swap(true, Ordering::SeqCst) {
        tracing::info!("a storage run is going on; this plan is applied at the next check");
        return;
    }
    let (cfg, d) = (cfg.clone(), d.clone());
    tokio::task::spawn_blocking(move || {
        let result = apply_blocking(&cfg, &plan);
        RUNNING.store(false, Ordering::SeqCst);
        let mut o = observed(&d, result);
        if drift {
            let created: Vec<String> = o
                .storage
                .iter()
                .filter(|s| s.state == "created")
                .map(|s| {
                    format!(
                        "storage {} was missing (instance store found empty?): prepared again",
                        s.name
                    )
                })
                .collect();
            if created.is_empty() && o.error.is_empty() {
                return;
            }
            o.drift_corrected = created;
        }
        report(o);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(plan: &[u8]) -> DesiredState {
        DesiredState {
            generation: 2,
            policy_revision: 1,
            placement: Some(nimbus_proto::Placement {
                environment: "production".into(),
                storage_plan: plan.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn plans_are_parsed_as_hostile_input() {
        assert!(plan_of(&DesiredState::default()).unwrap().volumes.is_empty());
        assert!(plan_of(&desired(b"")).unwrap().volumes.is_empty());
        let e = plan_of(&desired(b"{\"volumes\": 3}")).unwrap_err();
        assert!(e.contains("not readable"), "{e}");
        let huge = vec![b' '; storage::MAX_PLAN_BYTES + 1];
        assert!(plan_of(&desired(&huge)).unwrap_err().contains("at most"));
        let ok = br#"{"volumes":[{"name":"fast","layout":{"kind":"per_disk"},"disks":[],"filesystem":"xfs","mount_point":"/v/fast","mount_options":[],"wipe":[]}]}"#;
        assert_eq!(plan_of(&desired(ok)).unwrap().volumes[0].name, "fast");
    }

    #[test]
    fn a_refused_volume_fails_the_desired_state_with_its_reason() {
        let d = desired(b"");
        let o = observed(
            &d,
            Ok(vec![
                status("fast", "ready", "/dev/md/nimbus-fast on /v/fast".into()),
                status("slow", "refused", "disk SER1 carries an ext4 file system".into()),
            ]),
        );
        assert_eq!((o.generation, o.policy_revision), (2, 1));
        assert_eq!(o.error, "storage slow refused: disk SER1 carries an ext4 file system");
        assert_eq!(o.storage.len(), 2);
        assert_eq!(observed(&d, Err("boom".into())).error, "storage: boom");
        assert!(
            observed(&d, Ok(vec![status("fast", "created", String::new())]))
                .error
                .is_empty()
        );
    }
}
