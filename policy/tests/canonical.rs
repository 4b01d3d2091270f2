//! The example file, the canonical JSON form and the digest.
// Helpers outside #[test] functions unwrap too: a panic in a test is a failed assertion.
#![allow(clippy::unwrap_used)]

mod common;

use common::{HASH, doc, example_text};
use policy::{ItemKind, Policy};

#[test]
fn the_example_file_is_valid_and_covers_the_schema() {
    let p = policy::parse("deploy/examples/policy.yaml", &example_text()).unwrap_or_else(|e| panic!("{e}"));
    let names = |v: Vec<&str>| v.join(",");
    assert_eq!(
        names(p.environments().iter().map(|e| e.name.as_str()).collect()),
        "dev,production,staging,test"
    );
    assert_eq!(
        names(p.pools().iter().map(|x| x.name.as_str()).collect()),
        "burst,fast-nvme,performance"
    );
    assert_eq!(
        names(p.cohorts().iter().map(|c| c.name.as_str()).collect()),
        "edge,hub-enclave,non-critical"
    );
    assert_eq!(p.pool("burst").unwrap().min, 2);
    assert_eq!(p.pool("performance").unwrap().min, 3);
    assert_eq!(p.pool("fast-nvme").unwrap().min, 1);
    assert_eq!(
        p.environment("test").unwrap().kubernetes.kubeadm_api,
        policy::KubeadmApi::V1beta3
    );
    assert_eq!(
        p.environment("dev").unwrap().kubernetes.credentials,
        policy::Credentials::TokenCommand(vec![
            "/usr/local/bin/nimbus-dev-token".into(),
            "--cluster".into(),
            "dev".into()
        ])
    );
    let loc = p.locate(ItemKind::Pool, "fast-nvme").unwrap();
    assert_eq!((loc.file.as_str(), loc.line), ("deploy/examples/policy.yaml", 48));
    assert_eq!(loc.to_string(), "deploy/examples/policy.yaml:48:5");
    assert_eq!(p.locate(ItemKind::Cohort, "nope"), None);
}

#[test]
fn canonical_json_round_trips() {
    let p = policy::parse("policy.yaml", &example_text()).unwrap();
    let json = p.to_canonical_json();
    let back = Policy::from_canonical_json(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    assert_eq!(back, p);
    assert_eq!(back.to_canonical_json(), json);
    assert_eq!(back.digest(), p.digest());
    assert_eq!(
        back.locate(ItemKind::Pool, "fast-nvme"),
        None,
        "canonical JSON has no positions"
    );
    // Serde goes through the same validation.
    let via_serde: Policy = serde_json::from_str(&json).unwrap();
    assert_eq!(via_serde, p);
    assert_eq!(
        serde_json::to_value(&p).unwrap(),
        serde_json::from_str::<serde_json::Value>(&json).unwrap()
    );
}

#[test]
fn canonical_json_is_exact_and_sorted() {
    let p = policy::parse(
        "p.yaml",
        &doc("pools:\n  - name: p\n    match: { zone: [b, a], min_memory: 61440MiB, platform: [azure, aws] }\n"),
    )
    .unwrap();
    let env = |name: &str| {
        format!(
            r#"{{"kubernetes":{{"api_endpoint":"10.0.0.1{}:6443","ca_cert_hash":"{HASH}","credentials":{{"kubeconfig":"/k/{name}"}},"kubeadm_api":"v1beta4"}},"match":{{"labels":{{"env":"{name}"}}}},"name":"{name}"}}"#,
            if name == "dev" { 1 } else { 0 }
        )
    };
    let want = format!(
        r#"{{"cohorts":[],"environments":[{},{}],"pools":[{{"match":{{"min_memory":"60GiB","platform":["aws","azure"],"zone":["a","b"]}},"max_unavailable":1,"min":0,"name":"p"}}],"version":1}}"#,
        env("dev"),
        env("prod")
    );
    assert_eq!(p.to_canonical_json(), want);
    assert_eq!(p.digest().len(), "sha256:".len() + 64);
}

#[test]
fn the_digest_ignores_order_and_spelling_but_not_meaning() {
    let a = policy::parse(
        "a.yaml",
        &doc("pools:\n  - name: x\n    match: { local_nvme: true, min_memory: 60GiB }\n  - name: y\n    match: { local_nvme: false }\n"),
    )
    .unwrap();
    // Same meaning: pools in another order, defaults written out, another unit, quoted scalars.
    let b = policy::parse(
        "b.yaml",
        &doc(
            "pools:\n  - name: y\n    match: { local_nvme: false }\n    min: 0\n    max_unavailable: 1\n  - name: \"x\"\n    match: { min_memory: \"61440 MiB\", local_nvme: true }\n",
        )
        .replace("credentials: { kubeconfig: /k/dev }", "kubeadm_api: v1beta4\n      credentials: { kubeconfig: /k/dev }"),
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.digest(), b.digest());
    let c = policy::parse(
        "c.yaml",
        &doc("pools:\n  - name: x\n    match: { local_nvme: true, min_memory: 60GiB }\n  - name: y\n    match: { local_nvme: false }\n    min: 1\n"),
    )
    .unwrap();
    assert_ne!(a.digest(), c.digest());
}

#[test]
fn canonical_json_is_validated_like_a_file() {
    let p = policy::parse("p.yaml", &doc("pools:\n  - name: p\n    match: {}\n")).unwrap();
    let json = p
        .to_canonical_json()
        .replace(r#""name":"p""#, r#""name":"P","extra":1"#);
    let e = Policy::from_canonical_json(&json).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<canonical>:0:0: invalid pool name \"P\" (hint: names are 1-32 characters of a-z, 0-9 and '-', starting \
         and ending with a letter or digit)\n<canonical>:0:0: unknown field `extra` in pool \"P\" (hint: allowed \
         fields: name, environments, match, min, max, max_unavailable, labels, storage)"
    );
    let e = Policy::from_canonical_json("{").unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(e.0[0].message.starts_with("invalid JSON: "), "{e}");
    assert!(serde_json::from_str::<Policy>(&json).is_err());
}

#[test]
fn the_digest_of_the_example_is_pinned() {
    // Pinned before `join_token_command` was added: optional fields that are absent must not change the
    // canonical JSON (and so the digest) of existing policies.
    let p = policy::parse("policy.yaml", &example_text()).unwrap();
    assert_eq!(
        p.digest(),
        "sha256:ddb1a71a82a66f028cd906bfdab23052491bb208c20957da6714127483d03ceb"
    );
}

#[test]
fn join_token_command_is_canonical_only_when_given() {
    let without = policy::parse("p.yaml", &doc("pools:\n  - name: p\n    match: {}\n")).unwrap();
    assert!(!without.to_canonical_json().contains("join_token_command"));
    let with = policy::parse(
        "p.yaml",
        &doc("pools:\n  - name: p\n    match: {}\n").replace(
            "credentials: { kubeconfig: /k/dev }",
            "credentials: { kubeconfig: /k/dev }\n      join_token_command: [/usr/local/bin/mint-join-token, --cluster, dev]",
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let json = with.to_canonical_json();
    assert!(
        json.contains(r#""join_token_command":["/usr/local/bin/mint-join-token","--cluster","dev"]"#),
        "{json}"
    );
    assert_ne!(with.digest(), without.digest());
    let back = Policy::from_canonical_json(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    assert_eq!(back, with);
    assert_eq!(back.to_canonical_json(), json);
    // Canonical JSON is validated like a file: a relative program is refused there too.
    let bad = json.replace("/usr/local/bin/mint-join-token", "mint-join-token");
    let e = Policy::from_canonical_json(&bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "<canonical>:0:0: program \"mint-join-token\" of join_token_command of environment \"dev\" is not an \
         absolute path (hint: write the program's absolute path, e.g. /usr/local/bin/mint-join-token)"
    );
}
