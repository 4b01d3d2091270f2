//! Placement over the real inventory fixtures and the example policy, plus the edge cases of the rules.
// Helpers outside #[test] functions unwrap too: a panic in a test is a failed assertion.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::{HASH, doc, example_text, fixture, fixture_node};
use inventory::PlatformKind;
use policy::{NodeFacts, NodePlacement, Placement, Taint, TaintEffect, Warning, place, place_with_previous};

fn example() -> policy::Policy {
    policy::parse("policy.yaml", &example_text()).unwrap()
}

fn reason(p: &Placement, id: &str) -> String {
    match &p.nodes[id] {
        NodePlacement::Unplaced { reason } => reason.clone(),
        NodePlacement::Placed(a) => panic!("{id} placed in {}/{}", a.environment, a.pool),
    }
}

fn pool_of<'a>(p: &'a Placement, id: &str) -> &'a str {
    p.assignment(id)
        .map(|a| a.pool.as_str())
        .unwrap_or_else(|| panic!("{id} unplaced: {:?}", p.nodes[id]))
}

#[test]
fn fixtures_land_in_the_right_pools() {
    let policy = example();
    let mut azure = fixture_node("azure-lsv2", "production", "azure-lsv2");
    // The instance type comes from Azure IMDS (inventory::enrich), which the fixture tree cannot hold.
    if let Some(inv) = azure.inventory.as_mut() {
        inv.platform.instance_type = Some("Standard_L8s_v2".into());
    }
    let nodes = vec![
        fixture_node("i3en", "production", "aws-nitro-i3en"),
        fixture_node("i3", "staging", "aws-xen-i3"),
        azure,
        fixture_node("metal", "production", "baremetal"),
        fixture_node("vmware", "production", "vmware").with_label("class", "performance"),
        fixture_node("vmware-plain", "production", "vmware"),
        fixture_node("metal-dev", "dev", "baremetal"),
        fixture_node("one", "test", "opennebula-kvm"),
    ];
    let p = place(&policy, &nodes);
    for id in ["i3en", "i3", "azure-lsv2", "metal"] {
        assert_eq!(pool_of(&p, id), "fast-nvme", "{id}");
    }
    assert_eq!(pool_of(&p, "vmware"), "performance");
    assert_eq!(
        reason(&p, "vmware-plain"),
        "matches no pool of environment \"production\" (burst: platform vmware is not one of aws, azure; \
         fast-nvme: platform vmware is not one of aws, azure, baremetal; performance: lacks label class=performance)"
    );
    // fast-nvme does not exist in dev, and the NVMe disk keeps bare metal out of performance.
    assert_eq!(
        reason(&p, "metal-dev"),
        "matches no pool of environment \"dev\" (burst: platform baremetal is not one of aws, azure; performance: \
         has a local NVMe disk)"
    );
    assert_eq!(
        reason(&p, "one"),
        "matches no pool of environment \"test\" (burst: platform opennebula is not one of aws, azure; \
         performance: 2 CPUs, fewer than 4)"
    );

    let a = p.assignment("i3en").unwrap();
    assert_eq!(a.environment, "production");
    assert_eq!(a.cohorts, ["hub-enclave"]);
    let labels: BTreeMap<&str, &str> = a.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        labels,
        BTreeMap::from([
            ("polynimbus.io/cohort.hub-enclave", "true"),
            ("polynimbus.io/data-class", "restricted"),
            ("polynimbus.io/env", "production"),
            ("polynimbus.io/pool", "fast-nvme"),
            ("polynimbus.io/storage", "local-nvme"),
            // The example's storage profile found the empty instance-store disk.
            ("polynimbus.io/storage-class", "fast-nvme"),
        ])
    );
    assert_eq!(a.storage.len(), 1);
    assert_eq!(
        a.storage[0].disks.len(),
        1,
        "the other instance-store disk holds a mounted xfs"
    );
    assert_eq!(
        a.taints,
        [Taint {
            key: "polynimbus.io/enclave".into(),
            value: "true".into(),
            effect: TaintEffect::NoSchedule
        }]
    );
    let v = p.assignment("vmware").unwrap();
    assert_eq!(v.cohorts, ["edge"]);
    assert_eq!(
        v.taints.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["polynimbus.io/edge:PreferNoSchedule"]
    );

    let shown: Vec<String> = p.warnings.iter().map(ToString::to_string).collect();
    assert!(
        shown.contains(
            &"node \"one\" is unplaced: matches no pool of environment \"test\" (burst: platform \
                               opennebula is not one of aws, azure; performance: 2 CPUs, fewer than 4)"
                .to_string()
        )
    );
    assert!(shown.contains(
        &"pool \"performance\" in environment \"production\" has 1 node, below its minimum of 3".to_string()
    ));
    assert!(
        shown.contains(&"pool \"burst\" in environment \"staging\" has 0 nodes, below its minimum of 2".to_string())
    );
    assert!(
        !shown
            .iter()
            .any(|w| w.contains("fast-nvme\" in environment \"production\"")),
        "{shown:#?}"
    );
}

#[test]
fn a_node_matching_two_pools_is_unplaced_with_a_warning() {
    let policy = example();
    // An instance-store machine that calls itself a burst type: both fast-nvme and burst accept it.
    let mut inv = fixture("aws-nitro-i3en");
    inv.platform.instance_type = Some("t3.2xlarge".into());
    // A burst instance proper: AWS, t3, small, no NVMe.
    let mut small = fixture("opennebula-kvm");
    small.platform.kind = PlatformKind::Aws;
    small.platform.instance_type = Some("t3.medium".into());
    let nodes = vec![
        NodeFacts::new("n1", "odd")
            .with_label("env", "production")
            .with_inventory(inv),
        NodeFacts::new("n2", "small")
            .with_label("env", "production")
            .with_inventory(small),
    ];
    let p = place(&policy, &nodes);
    assert_eq!(reason(&p, "n1"), "matches pools \"burst\" and \"fast-nvme\"");
    assert_eq!(pool_of(&p, "n2"), "burst");
    assert_eq!(p.assignment("n2").unwrap().cohorts, ["non-critical"]);
    assert!(p.warnings.contains(&Warning::PoolsOverlap {
        node_id: "n1".into(),
        node: "odd".into(),
        pools: vec!["burst".into(), "fast-nvme".into()],
    }));
    let overlap = p
        .warnings
        .iter()
        .find(|w| matches!(w, Warning::PoolsOverlap { .. }))
        .unwrap();
    assert_eq!(
        overlap.to_string(),
        "pools \"burst\" and \"fast-nvme\" overlap on node \"odd\""
    );
}

fn small_policy(extra: &str) -> policy::Policy {
    policy::parse("p.yaml", &doc(extra)).unwrap()
}

#[test]
fn max_leaves_the_extra_nodes_by_name_unplaced() {
    let policy = small_policy("pools:\n  - name: p\n    environments: [prod]\n    match: {}\n    min: 1\n    max: 2\n");
    let nodes: Vec<NodeFacts> = ["c", "a", "b"]
        .iter()
        .map(|n| NodeFacts::new(format!("id-{n}"), *n).with_label("env", "prod"))
        .collect();
    let p = place(&policy, &nodes);
    assert_eq!(p.placed_in("prod", "p"), ["id-a", "id-b"]);
    assert_eq!(reason(&p, "id-c"), "pool \"p\" is full (max 2)");
    let above = Warning::PoolAboveMaximum {
        environment: "prod".into(),
        pool: "p".into(),
        have: 3,
        max: 2,
    };
    assert!(p.warnings.contains(&above));
    assert_eq!(
        above.to_string(),
        "pool \"p\" in environment \"prod\" has 3 matching nodes, above its maximum of 2; 1 left unplaced"
    );
    assert!(p.warnings.contains(&Warning::Unplaced {
        node_id: "id-c".into(),
        node: "c".into(),
        reason: "pool \"p\" is full (max 2)".into(),
    }));

    // With the previous placement, a running node keeps its place before a newcomer that sorts earlier.
    let before = place(&policy, &nodes[..2]); // c and a
    assert_eq!(before.placed_in("prod", "p"), ["id-a", "id-c"]);
    let sticky = place_with_previous(&policy, &nodes, Some(&before));
    assert_eq!(sticky.placed_in("prod", "p"), ["id-a", "id-c"]);
    assert_eq!(reason(&sticky, "id-b"), "pool \"p\" is full (max 2)");
}

#[test]
fn environment_rules() {
    let text = format!(
        "version: 1
environments:
  - name: a
    match: {{ labels: {{ env: a }} }}
    kubernetes: {{ api_endpoint: \"h:1\", ca_cert_hash: \"{HASH}\", credentials: {{ kubeconfig: /k }} }}
  - name: b
    match: {{ labels: {{ site: x }} }}
    kubernetes: {{ api_endpoint: \"h:1\", ca_cert_hash: \"{HASH}\", credentials: {{ kubeconfig: /k }} }}
pools:
  - name: p
    environments: [a]
    match: {{ min_cpus: 2 }}
"
    );
    let policy = policy::parse("p.yaml", &text).unwrap();
    let nodes = vec![
        NodeFacts::new("1", "none"),
        NodeFacts::new("2", "both")
            .with_label("env", "a")
            .with_label("site", "x"),
        NodeFacts::new("3", "no-inventory").with_label("env", "a"),
        NodeFacts::new("4", "b-node").with_label("site", "x"),
    ];
    let p = place(&policy, &nodes);
    assert_eq!(reason(&p, "1"), "matches no environment");
    assert_eq!(reason(&p, "2"), "matches environments \"a\" and \"b\"");
    assert_eq!(
        reason(&p, "3"),
        "matches no pool of environment \"a\" (p: no inventory yet)"
    );
    assert_eq!(reason(&p, "4"), "environment \"b\" has no pools");
    let overlap = Warning::EnvironmentsOverlap {
        node_id: "2".into(),
        node: "both".into(),
        environments: vec!["a".into(), "b".into()],
    };
    assert!(p.warnings.contains(&overlap));
    assert_eq!(
        overlap.to_string(),
        "environments \"a\" and \"b\" overlap on node \"both\""
    );
    assert_eq!(
        p.warnings
            .iter()
            .filter(|w| matches!(w, Warning::Unplaced { .. }))
            .count(),
        4
    );
}

#[test]
fn hardware_rules() {
    let policy = small_policy(
        "pools:
  - name: big
    match: { instance_type: [\"i3en.*\"], min_memory: 64GiB }
  - name: zoned
    match: { zone: [eu-west-1a], local_nvme: false }
",
    );
    let i3en = fixture("aws-nitro-i3en");
    let vm = fixture("vmware");
    let nodes = vec![
        NodeFacts::new("1", "i3en")
            .with_label("env", "prod")
            .with_inventory(i3en.clone()),
        NodeFacts::new("2", "vm-a")
            .with_label("env", "prod")
            .with_inventory(vm.clone())
            .with_zone("eu-west-1a"),
        NodeFacts::new("3", "vm-b").with_label("env", "prod").with_inventory(vm),
    ];
    let p = place(&policy, &nodes);
    assert_eq!(
        reason(&p, "1"),
        "matches no pool of environment \"prod\" (big: memory 62.1GiB, less than 64GiB; zoned: has a local NVMe disk)"
    );
    assert_eq!(pool_of(&p, "2"), "zoned");
    assert_eq!(
        reason(&p, "3"),
        "matches no pool of environment \"prod\" (big: instance type unknown; zoned: zone unknown)"
    );

    // The zone from cloud metadata counts when none is declared; a declared one wins.
    let mut inv = fixture("vmware");
    inv.platform.zone = Some("eu-west-1a".into());
    let n = NodeFacts::new("x", "x").with_inventory(inv);
    assert_eq!(n.effective_zone(), Some("eu-west-1a"));
    assert_eq!(n.clone().with_zone("b").effective_zone(), Some("b"));
    let zoned = &policy.pool("zoned").unwrap().selector;
    assert!(zoned.matches(&n));
    assert_eq!(
        zoned.mismatch(&n.with_zone("eu-west-1b")).as_deref(),
        Some("zone eu-west-1b is not one of eu-west-1a")
    );
    let big = &policy.pool("big").unwrap().selector;
    let mut t = i3en;
    t.platform.instance_type = Some("m5.large".into());
    assert_eq!(
        big.mismatch(&NodeFacts::new("y", "y").with_inventory(t)).as_deref(),
        Some("instance type m5.large matches none of i3en.*")
    );
}

#[test]
fn anti_affinity_on_a_shared_pool_is_a_warning() {
    let policy = small_policy(
        "pools:
  - name: p
    match: {}
cohorts:
  - name: hub
    pools: [p]
    anti_affinity: [edge]
  - name: edge
    pools: [p]
",
    );
    let p = place(&policy, &[NodeFacts::new("1", "n").with_label("env", "prod")]);
    let w = Warning::AntiAffinityShared {
        environment: "prod".into(),
        pool: "p".into(),
        cohort: "edge".into(),
        other: "hub".into(),
    };
    assert!(p.warnings.contains(&w), "{:#?}", p.warnings);
    assert_eq!(
        w.to_string(),
        "cohorts \"edge\" and \"hub\" prefer not to share nodes but both run on pool \"p\" in environment \"prod\""
    );
    // No nodes in dev: nothing shared there.
    assert!(
        !p.warnings
            .iter()
            .any(|w| matches!(w, Warning::AntiAffinityShared { environment, .. } if environment == "dev"))
    );
    assert_eq!(p.assignment("1").unwrap().cohorts, ["edge", "hub"]);
}

#[test]
fn placement_is_deterministic() {
    let policy = example();
    let mut nodes = vec![
        fixture_node("i3en", "production", "aws-nitro-i3en"),
        fixture_node("vm", "production", "vmware").with_label("class", "performance"),
        fixture_node("metal", "staging", "baremetal"),
        fixture_node("one", "test", "opennebula-kvm"),
    ];
    let first = place(&policy, &nodes);
    nodes.reverse();
    assert_eq!(place(&policy, &nodes), first);
    let json = serde_json::to_string(&first).unwrap();
    let back: Placement = serde_json::from_str(&json).unwrap();
    assert_eq!(back, first);
    assert!(
        json.contains("\"state\":\"placed\"") && json.contains("\"kind\":\"pool_below_minimum\""),
        "{json}"
    );
}

#[test]
fn duplicate_node_ids_are_reported() {
    let policy = small_policy("pools:\n  - name: p\n    match: {}\n");
    let nodes = vec![
        NodeFacts::new("same", "b").with_label("env", "prod"),
        NodeFacts::new("same", "a").with_label("env", "nowhere"),
    ];
    let p = place(&policy, &nodes);
    assert_eq!(p.nodes.len(), 1);
    assert_eq!(pool_of(&p, "same"), "p");
    assert!(
        p.warnings
            .contains(&Warning::DuplicateNodeId { node_id: "same".into() })
    );
    assert!(
        !p.warnings.iter().any(|w| matches!(w, Warning::Unplaced { .. })),
        "{:#?}",
        p.warnings
    );
}

#[test]
fn storage_profiles_pick_disks_by_selector_and_name_them_by_stable_path() {
    let policy = small_policy(
        "pools:\n  - name: fast\n    environments: [prod]\n    match: {}\n    storage:\n      - name: fast\n        \
         disks: { class: [local-instance-store], model: \"Amazon EC2 NVMe*\", min_size: 1TB }\n        layout: raid0\n        \
         mount_point: /var/lib/nimbus/volumes/fast\n        mount_options: [noatime]\n        \
         labels: { \"polynimbus.io/storage\": fast-nvme }\n      - name: scratch\n        disks: { class: [local] }\n        \
         mount_point: /var/lib/nimbus/volumes/scratch\n",
    );
    let node = fixture_node("i3en", "prod", "aws-nitro-i3en");
    let p = place(&policy, std::slice::from_ref(&node));
    let NodePlacement::Placed(a) = &p.nodes["i3en"] else {
        panic!("unplaced: {:?}", p.nodes["i3en"]);
    };
    assert_eq!(a.storage.len(), 1, "{:?}", a.storage);
    let v = &a.storage[0];
    assert_eq!(
        v.layout,
        storage::Layout::Raid0 {
            name: "nimbus-fast".into()
        }
    );
    let paths: Vec<&str> = v.disks.iter().map(|d| d.by_id.as_str()).collect();
    // nvme1n1 holds a mounted xfs (/var/lib/mysql): not ours, so not taken. The root EBS disk never is.
    assert_eq!(
        paths,
        ["/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_AWS61C0E9A7B2D3F4A5B"]
    );
    assert_eq!(v.disks[0].serial.as_deref(), Some("AWS61C0E9A7B2D3F4A5B"));
    assert_eq!(v.mount_options, ["noatime"]);
    assert_eq!(a.labels["polynimbus.io/storage"], "fast-nvme");
    let missing = Warning::StorageWithoutDisks {
        node_id: "i3en".into(),
        node: node.name.clone(),
        pool: "fast".into(),
        profile: "scratch".into(),
    };
    assert!(p.warnings.contains(&missing), "{:?}", p.warnings);

    // The instance store comes back empty with new serials: found again by the selector, under its new name.
    let mut inv = node.inventory.clone().unwrap();
    for d in inv.disks.iter_mut().filter(|d| d.name == "nvme2n1") {
        d.serial = Some("AWSNEW0000000000001".into());
        d.by_id = vec!["/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_AWSNEW0000000000001".into()];
    }
    let moved = NodeFacts {
        inventory: Some(inv),
        ..node.clone()
    };
    let again = place(&policy, &[moved]);
    let a2 = again.nodes["i3en"].assignment().unwrap();
    assert_eq!(a2.storage[0].disks[0].serial.as_deref(), Some("AWSNEW0000000000001"));
    let changes = policy::diff(&p, &again);
    assert_eq!(changes.len(), 1);
    assert!(
        !changes[0].is_disruptive(),
        "a new disk under the same profile is not disruptive"
    );
    assert!(
        changes[0].changes[0].what.starts_with("storage fast: "),
        "{:?}",
        changes[0].changes
    );

    // A glob over the by-id name narrows the choice.
    let by_id = |glob: &str| {
        let policy = small_policy(&format!(
            "pools:\n  - name: fast\n    environments: [prod]\n    match: {{}}\n    storage:\n      - name: fast\n        \
             disks: {{ by_id: \"{glob}\" }}\n        mount_point: /v/fast\n"
        ));
        let p = place(&policy, std::slice::from_ref(&node));
        p.nodes["i3en"]
            .assignment()
            .unwrap()
            .storage
            .iter()
            .map(|v| v.disks.len())
            .sum::<usize>()
    };
    assert_eq!(by_id("nvme-Amazon_EC2_NVMe_Instance_Storage_*"), 1);
    assert_eq!(by_id("wwn-*"), 0);

    // Without an inventory nothing is planned, and nothing is labelled.
    let bare = NodeFacts::new("bare", "bare").with_label("env", "prod");
    let p = place(&policy, &[bare]);
    let a = p.nodes["bare"].assignment().unwrap();
    assert!(a.storage.is_empty() && !a.labels.contains_key("polynimbus.io/storage"));
}
