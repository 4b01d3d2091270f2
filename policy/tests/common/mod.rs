//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::Path;

use policy::NodeFacts;

/// 64 hex digits for `ca_cert_hash` values.
pub const HASH: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Lines 1-14: version and two environments (`prod`, `dev`). Cases append from line 15.
pub fn header() -> String {
    format!(
        "version: 1
environments:
  - name: prod
    match: {{ labels: {{ env: prod }} }}
    kubernetes:
      api_endpoint: \"10.0.0.10:6443\"
      ca_cert_hash: \"{HASH}\"
      credentials: {{ kubeconfig: /k/prod }}
  - name: dev
    match: {{ labels: {{ env: dev }} }}
    kubernetes:
      api_endpoint: \"10.0.0.11:6443\"
      ca_cert_hash: \"{HASH}\"
      credentials: {{ kubeconfig: /k/dev }}
"
    )
}

/// The header followed by `rest`.
pub fn doc(rest: &str) -> String {
    format!("{}{rest}", header())
}

/// The inventory of one of `inventory/fixtures/<name>`.
pub fn fixture(name: &str) -> inventory::Inventory {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../inventory/fixtures")
        .join(name);
    assert!(root.is_dir(), "missing fixture tree {}", root.display());
    inventory::collect(&root).inventory
}

/// A node in `env` with the inventory of fixture `name`.
pub fn fixture_node(id: &str, env: &str, name: &str) -> NodeFacts {
    NodeFacts::new(id, id)
        .with_label("env", env)
        .with_inventory(fixture(name))
}

pub fn example_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policy.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
