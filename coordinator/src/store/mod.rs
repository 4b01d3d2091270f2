//! The coordinator's key-value store, shaped like etcd so that an etcd backend can replace sled without
//! touching callers: point reads, prefix scans, and compare-and-swap transactions
//! ([`Txn`]: if every [`Compare`] holds, apply every [`Op`]).
//!
//! # Key layout
//!
//! Keys and values are UTF-8. `crate::state` is the only writer; [`keys`] builds every key.
//!
//! | key                              | value                                            |
//! |----------------------------------|--------------------------------------------------|
//! | `meta/schema`                    | layout version, e.g. `"2"` (see `crate::schema`) |
//! | `nodes/<node id>`                | `NodeRecord` JSON                                |
//! | `node-by-key/<wg pubkey b64url>` | node id, for active nodes only                   |
//! | `node-by-name/<name>`            | node id                                          |
//! | `ip/<a.b.c.d>`                   | node id owning that overlay address              |
//! | `tokens/<token id>`              | `TokenRecord` JSON (secret stored as SHA-256 hex)|
//! | `revoked-keys/<wg pubkey b64url>`| id of the revoked node that used the key         |
//! | `inventory/<node id>`            | `HardwareRecord` JSON: full inventory + history  |
//! | `config/<name>`                  | operator documents kept as given (e.g. stores.yaml) |
//! | `leader`                         | leader token of the current term (etcd only, under a lease; `crate::leader`) |
//!
//! Public keys are canonical base64url without padding (43 characters for 32 bytes). Node ids are
//! `n` + 12 × `[a-z0-9]`; token ids are 10 × `[a-z0-9]`.
//!
//! # Backends
//! * [`SledStore`] (`sled.rs`): embedded, one process per data directory, every transaction flushed to disk
//!   before it is acknowledged.
//! * [`EtcdStore`] (`etcd.rs`): etcd v3 under a key prefix (default `nimbus/`), for several coordinator
//!   replicas; a write is durable once etcd acknowledges it. Sync calls run on the store's own small runtime.
//!
//! [`conformance`] is the behaviour both backends must share; each backend's tests run it.

pub mod etcd;
mod sled;

use std::io;
use std::path::PathBuf;

pub use self::etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use self::sled::SledStore;

/// Errors from a store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created or written.
    #[error(
        "data directory {} is not writable: {source}; check ownership/permissions or choose another --data-dir",
        path.display()
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process holds the data directory.
    #[error(
        "another nimbus-coordinator is using {}; stop it first or choose another --data-dir",
        path.display()
    )]
    Locked { path: PathBuf },
    /// The backend found corrupt data.
    #[error(
        "state store in {} is corrupt: {detail}; restore the data directory from a backup",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },
    /// An I/O error while reading or writing the store.
    #[error("state store I/O error in {}: {source}; check the disk holding --data-dir (space, health)", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Any other backend failure.
    #[error("state store failure: {0}")]
    Backend(String),
}

/// A condition checked atomically at the start of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists with exactly this value: `Equals(key, value)`.
    Equals(Vec<u8>, Vec<u8>),
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists (any value).
    Present(Vec<u8>),
}

/// A write applied by a [`Txn`] whose compares all hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `Put(key, value)`.
    Put(Vec<u8>, Vec<u8>),
    /// Delete the key (no error when absent).
    Delete(Vec<u8>),
}

/// Compare-and-swap transaction. Builder style:
/// `Txn::new().if_absent(k).put(k, v)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a compare.
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }

    /// Adds an op.
    pub fn then(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }

    /// Requires `key` to hold exactly `value`.
    pub fn if_equals(self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.when(Compare::Equals(key.into(), value.into()))
    }

    /// Requires `key` to be absent.
    pub fn if_absent(self, key: impl Into<Vec<u8>>) -> Self {
        self.when(Compare::Absent(key.into()))
    }

    /// Requires `key` to be present.
    pub fn if_present(self, key: impl Into<Vec<u8>>) -> Self {
        self.when(Compare::Present(key.into()))
    }

    /// Writes `value` at `key`.
    pub fn put(self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        self.then(Op::Put(key.into(), value.into()))
    }

    /// Deletes `key`.
    pub fn delete(self, key: impl Into<Vec<u8>>) -> Self {
        self.then(Op::Delete(key.into()))
    }
}

/// One `(key, value)` pair of a scan.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A transactional key-value store.
pub trait Store: Send + Sync + 'static {
    /// The value at `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError>;
    /// Atomically: if every compare holds, apply every op and return `Ok(true)`; otherwise apply nothing,
    /// `Ok(false)`. A successful transaction is durable when this returns.
    fn txn(&self, txn: Txn) -> Result<bool, StoreError>;
    /// Durably persist everything committed so far.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Checks the [`Store`] contract on `store` and panics on the first violation (a test helper, public so that
/// integration tests can run it on every backend). Uses only keys under `conformance/`, which must be empty.
#[doc(hidden)]
#[allow(clippy::unwrap_used)]
pub fn conformance(store: &dyn Store) {
    let s = store;
    let snapshot = || s.scan_prefix(b"conformance/").unwrap();
    assert!(snapshot().is_empty(), "conformance/ must start empty");

    // get / put / delete / scan.
    assert_eq!(s.get(b"conformance/a/1").unwrap(), None);
    assert!(
        s.txn(
            Txn::new()
                .put("conformance/a/1", "x")
                .put("conformance/a/2", "y")
                .put("conformance/b/1", "z")
        )
        .unwrap()
    );
    assert_eq!(s.get(b"conformance/a/1").unwrap().as_deref(), Some(&b"x"[..]));
    assert_eq!(
        s.scan_prefix(b"conformance/a/").unwrap(),
        vec![
            (b"conformance/a/1".to_vec(), b"x".to_vec()),
            (b"conformance/a/2".to_vec(), b"y".to_vec())
        ]
    );
    assert!(
        s.txn(Txn::new().delete("conformance/a/1").delete("conformance/missing"))
            .unwrap()
    );
    assert_eq!(s.get(b"conformance/a/1").unwrap(), None);
    assert_eq!(s.scan_prefix(b"conformance/a/").unwrap().len(), 1);
    assert_eq!(snapshot().len(), 2);
    // Empty values are values.
    assert!(s.txn(Txn::new().put("conformance/empty", "")).unwrap());
    assert_eq!(s.get(b"conformance/empty").unwrap().as_deref(), Some(&b""[..]));
    assert!(
        s.txn(
            Txn::new()
                .if_equals("conformance/empty", "")
                .delete("conformance/empty")
        )
        .unwrap()
    );
    // Several ops on one key apply in order: the last wins.
    assert!(
        s.txn(
            Txn::new()
                .put("conformance/dup", "1")
                .delete("conformance/dup")
                .put("conformance/dup", "2")
        )
        .unwrap()
    );
    assert_eq!(s.get(b"conformance/dup").unwrap().as_deref(), Some(&b"2"[..]));
    assert!(
        s.txn(Txn::new().put("conformance/dup", "3").delete("conformance/dup"))
            .unwrap()
    );
    assert_eq!(s.get(b"conformance/dup").unwrap(), None);
    // Scan order is byte order.
    assert!(
        s.txn(
            Txn::new()
                .put("conformance/o/b", "2")
                .put("conformance/o/a", "1")
                .put("conformance/o/B", "0")
                .put("conformance/o/\u{e9}", "3")
        )
        .unwrap()
    );
    let keys: Vec<Vec<u8>> = s
        .scan_prefix(b"conformance/o/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), 4);

    // Compare semantics: a failing compare applies nothing.
    assert!(s.txn(Txn::new().put("conformance/k", "v1")).unwrap());
    let before = snapshot();
    let failing = [
        Compare::Equals(b"conformance/k".to_vec(), b"v2".to_vec()),
        Compare::Equals(b"conformance/nope".to_vec(), b"v1".to_vec()),
        Compare::Absent(b"conformance/k".to_vec()),
        Compare::Present(b"conformance/nope".to_vec()),
    ];
    for c in failing {
        let t = Txn::new()
            .if_present("conformance/k")
            .when(c.clone())
            .put("conformance/k", "changed")
            .put("conformance/new", "1")
            .delete("conformance/k");
        assert!(!s.txn(t).unwrap(), "{c:?} should fail");
        assert_eq!(snapshot(), before, "{c:?} changed the store");
    }
    let t = Txn::new()
        .if_equals("conformance/k", "v1")
        .if_absent("conformance/nope")
        .if_present("conformance/k")
        .put("conformance/k", "v2")
        .put("conformance/n", "1");
    assert!(s.txn(t).unwrap());
    assert_eq!(s.get(b"conformance/k").unwrap().as_deref(), Some(&b"v2"[..]));
    assert_eq!(s.get(b"conformance/n").unwrap().as_deref(), Some(&b"1"[..]));
    assert!(
        !s.txn(Txn::new().if_equals("conformance/k", "v1").put("conformance/k", "v3"))
            .unwrap()
    );
    assert_eq!(s.get(b"conformance/k").unwrap().as_deref(), Some(&b"v2"[..]));
    assert!(s.txn(Txn::new().delete("conformance/n")).unwrap());
    assert_eq!(s.get(b"conformance/n").unwrap(), None);

    // Concurrent compare-and-swap increments are never lost.
    assert!(s.txn(Txn::new().put("conformance/ctr", "0")).unwrap());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..25 {
                    loop {
                        let cur = s.get(b"conformance/ctr").unwrap().unwrap();
                        let n: u32 = std::str::from_utf8(&cur).unwrap().parse().unwrap();
                        let t = Txn::new()
                            .if_equals("conformance/ctr", cur)
                            .put("conformance/ctr", (n + 1).to_string());
                        if s.txn(t).unwrap() {
                            break;
                        }
                    }
                }
            });
        }
    });
    assert_eq!(s.get(b"conformance/ctr").unwrap().as_deref(), Some(&b"100"[..]));
    s.flush().unwrap();
}

/// Builders for every key of the layout in the module doc.
pub mod keys {
    use std::net::Ipv4Addr;

    /// The layout version: `crate::schema::CURRENT`, as decimal text.
    pub const SCHEMA: &[u8] = b"meta/schema";
    pub const NODES: &str = "nodes/";
    pub const NODE_BY_KEY: &str = "node-by-key/";
    pub const NODE_BY_NAME: &str = "node-by-name/";
    pub const IP: &str = "ip/";
    pub const TOKENS: &str = "tokens/";
    pub const REVOKED_KEYS: &str = "revoked-keys/";
    pub const INVENTORY: &str = "inventory/";
    pub const CONFIG: &str = "config/";

    pub fn node(id: &str) -> Vec<u8> {
        format!("{NODES}{id}").into_bytes()
    }
    pub fn node_by_key(key_b64url: &str) -> Vec<u8> {
        format!("{NODE_BY_KEY}{key_b64url}").into_bytes()
    }
    pub fn node_by_name(name: &str) -> Vec<u8> {
        format!("{NODE_BY_NAME}{name}").into_bytes()
    }
    pub fn ip(ip: Ipv4Addr) -> Vec<u8> {
        format!("{IP}{ip}").into_bytes()
    }
    pub fn token(id: &str) -> Vec<u8> {
        format!("{TOKENS}{id}").into_bytes()
    }
    pub fn revoked_key(key_b64url: &str) -> Vec<u8> {
        format!("{REVOKED_KEYS}{key_b64url}").into_bytes()
    }
    pub fn config(name: &str) -> Vec<u8> {
        format!("{CONFIG}{name}").into_bytes()
    }
    pub fn inventory(id: &str) -> Vec<u8> {
        format!("{INVENTORY}{id}").into_bytes()
    }
}
