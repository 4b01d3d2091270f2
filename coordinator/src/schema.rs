//! The store's layout version (`meta/schema`) and the forward migrations between layouts.
//!
//! A coordinator opens a store of its own layout as it is, writes [`CURRENT`] into an empty one, migrates an
//! older one forward one step at a time (each step one compare-and-swap transaction conditioned on the schema
//! value it starts from and on every record it rewrites, so two coordinators starting at once cannot both
//! migrate, and a crash leaves either the old or the new layout, never a mix), and refuses a newer one: a store
//! written by a newer coordinator may hold records this one would misread or lose.
//!
//! | schema | change |
//! |--------|--------|
//! | 1      | first layout |
//! | 2      | the running rollout moves from `rollout/policy` to `rollout/current`, and rollout records (also `rollout/last`) carry a `kind` (policy changes now; agent upgrades share the one-rollout-at-a-time slot) |

use serde_json::Value;

use crate::state::{MAX_TXN_ATTEMPTS, StateError};
use crate::store::{Store, Txn, keys};

/// The layout this coordinator writes.
pub const CURRENT: u32 = 2;

/// Where schema 1 kept the running rollout.
const V1_ROLLOUT: &[u8] = b"rollout/policy";
/// Where schema 2 keeps it (`crate::placement::ROLLOUT`).
const V2_ROLLOUT: &[u8] = b"rollout/current";
const LAST_ROLLOUT: &[u8] = b"rollout/last";

/// The schema value of `n`, as stored.
fn value(n: u32) -> Vec<u8> {
    n.to_string().into_bytes()
}

fn parse(raw: &[u8]) -> Result<u32, StateError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| StateError::Corrupt {
            key: "meta/schema".into(),
            reason: format!("{:?} is not a schema number", String::from_utf8_lossy(raw)),
        })
}

/// Brings the store to [`CURRENT`]: writes it into an empty store, migrates an older layout forward, refuses a
/// newer one. Returns the schema the store had (`None` when it was empty).
pub fn ensure_current(store: &dyn Store) -> Result<Option<u32>, StateError> {
    let mut first = None;
    for _ in 0..MAX_TXN_ATTEMPTS * (CURRENT as usize + 1) {
        let Some(raw) = store.get(keys::SCHEMA)? else {
            let txn = Txn::new().if_absent(keys::SCHEMA).put(keys::SCHEMA, value(CURRENT));
            if store.txn(txn)? {
                return Ok(first);
            }
            continue;
        };
        let found = parse(&raw)?;
        first.get_or_insert(found);
        if found == CURRENT {
            return Ok(first);
        }
        if found > CURRENT {
            return Err(StateError::UnsupportedSchema {
                found: found.to_string(),
                supported: CURRENT,
            });
        }
        let txn = step(store, found)?
            .if_equals(keys::SCHEMA, raw)
            .put(keys::SCHEMA, value(found + 1));
        if store.txn(txn)? {
            tracing::info!(from = found, to = found + 1, "state store migrated to the next layout");
        }
    }
    Err(StateError::Conflict)
}

/// The transaction (without its schema guard) that turns layout `from` into `from + 1`.
fn step(store: &dyn Store, from: u32) -> Result<Txn, StateError> {
    match from {
        1 => v1_to_v2(store),
        other => Err(StateError::Corrupt {
            key: "meta/schema".into(),
            reason: format!("no migration from schema {other}"),
        }),
    }
}

/// A rollout record with `"kind"` set to the policy kind when it has none.
fn with_policy_kind(key: &[u8], raw: &[u8]) -> Result<Vec<u8>, StateError> {
    let mut v: Value = crate::state::decode(key, raw)?;
    let Some(obj) = v.as_object_mut() else {
        return Err(StateError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "not a JSON object".into(),
        });
    };
    obj.entry("kind")
        .or_insert_with(|| serde_json::json!({"type": "policy"}));
    crate::state::encode(key, &v)
}

fn v1_to_v2(store: &dyn Store) -> Result<Txn, StateError> {
    let mut txn = Txn::new();
    match store.get(V1_ROLLOUT)? {
        Some(raw) => {
            let new = with_policy_kind(V1_ROLLOUT, &raw)?;
            txn = txn.if_equals(V1_ROLLOUT, raw).delete(V1_ROLLOUT).put(V2_ROLLOUT, new);
        }
        None => txn = txn.if_absent(V1_ROLLOUT),
    }
    if let Some(raw) = store.get(LAST_ROLLOUT)? {
        let new = with_policy_kind(LAST_ROLLOUT, &raw)?;
        txn = txn.if_equals(LAST_ROLLOUT, raw).put(LAST_ROLLOUT, new);
    }
    Ok(txn)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::SledStore;

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("state")).unwrap());
        (dir, s)
    }

    #[test]
    fn an_empty_store_gets_the_current_schema() {
        let (_d, s) = store();
        assert_eq!(ensure_current(s.as_ref()).unwrap(), None);
        assert_eq!(s.get(keys::SCHEMA).unwrap(), Some(value(CURRENT)));
        assert_eq!(ensure_current(s.as_ref()).unwrap(), Some(CURRENT), "idempotent");
    }

    #[test]
    fn a_schema_1_store_with_a_running_rollout_is_migrated_and_nothing_else_changes() {
        let (_d, s) = store();
        // Written the way a schema-1 coordinator wrote it.
        let running = br#"{"revision":3,"rollout":{"x":1},"staged":{}}"#.to_vec();
        let last = br#"{"revision":2,"rollout":{"x":0},"staged":{}}"#.to_vec();
        let node = br#"{"id":"nabc"}"#.to_vec();
        let t = Txn::new()
            .put(keys::SCHEMA, b"1".to_vec())
            .put(V1_ROLLOUT, running)
            .put(LAST_ROLLOUT, last)
            .put(keys::node("nabc"), node.clone());
        assert!(s.txn(t).unwrap());

        assert_eq!(ensure_current(s.as_ref()).unwrap(), Some(1));
        assert_eq!(s.get(keys::SCHEMA).unwrap(), Some(b"2".to_vec()));
        assert_eq!(s.get(V1_ROLLOUT).unwrap(), None);
        let cur: Value = serde_json::from_slice(&s.get(V2_ROLLOUT).unwrap().unwrap()).unwrap();
        assert_eq!(cur["revision"], 3);
        assert_eq!(cur["kind"]["type"], "policy");
        let last: Value = serde_json::from_slice(&s.get(LAST_ROLLOUT).unwrap().unwrap()).unwrap();
        assert_eq!(
            (last["revision"].as_u64(), last["kind"]["type"].as_str()),
            (Some(2), Some("policy"))
        );
        assert_eq!(
            s.get(&keys::node("nabc")).unwrap(),
            Some(node),
            "other records untouched"
        );
    }

    #[test]
    fn a_schema_1_store_without_rollouts_is_migrated() {
        let (_d, s) = store();
        assert!(s.txn(Txn::new().put(keys::SCHEMA, b"1".to_vec())).unwrap());
        assert_eq!(ensure_current(s.as_ref()).unwrap(), Some(1));
        assert_eq!(s.get(keys::SCHEMA).unwrap(), Some(value(CURRENT)));
        assert_eq!(s.get(V2_ROLLOUT).unwrap(), None);
    }

    #[test]
    fn a_newer_or_garbled_schema_is_refused_untouched() {
        let (_d, s) = store();
        assert!(s.txn(Txn::new().put(keys::SCHEMA, b"3".to_vec())).unwrap());
        let e = ensure_current(s.as_ref()).unwrap_err();
        assert!(
            e.to_string().contains("schema 3") && e.to_string().contains("newer"),
            "{e}"
        );
        assert_eq!(s.get(keys::SCHEMA).unwrap(), Some(b"3".to_vec()));
        assert!(s.txn(Txn::new().put(keys::SCHEMA, b"one".to_vec())).unwrap());
        assert!(matches!(ensure_current(s.as_ref()), Err(StateError::Corrupt { .. })));
    }
}
