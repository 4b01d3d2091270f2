//! Every validation rule, table-driven, with the exact diagnostics (position and message) it produces.
// Helpers outside #[test] functions unwrap too: a panic in a test is a failed assertion.
#![allow(clippy::unwrap_used)]

mod common;

use common::{HASH, doc};

/// Parse `text` and return each diagnostic as `LINE:COL: MESSAGE`.
fn errors(text: &str) -> Vec<String> {
    match policy::parse("p.yaml", text) {
        Ok(_) => Vec::new(),
        Err(e) => {
            e.0.iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect()
        }
    }
}

/// Every case (name, document, expected `LINE:COL: MESSAGE` list) gives exactly its diagnostics; all failing
/// cases are reported together.
fn check_cases(cases: &[(&str, String, Vec<&str>)]) {
    let mut failures = Vec::new();
    for (name, text, want) in cases {
        let got = errors(text);
        if got != *want {
            failures.push(format!("case {name}:\n  want {want:#?}\n  got  {got:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const POOL: &str = "pools:\n  - name: general\n    match: { labels: { tier: general } }\n";

#[test]
fn table() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("valid", doc(POOL), vec![]),
        (
            "unknown top-level field",
            doc(&format!("{POOL}pool: []\n")),
            vec!["18:1: unknown field `pool` in the policy"],
        ),
        (
            "unknown pool field",
            doc("pools:\n  - name: general\n    match: {}\n    size: 3\n"),
            vec!["18:5: unknown field `size` in pool \"general\""],
        ),
        (
            "unknown match field",
            doc("pools:\n  - name: general\n    match: { cpus: 3 }\n"),
            vec!["17:14: unknown field `cpus` in match of pool \"general\""],
        ),
        (
            "unknown env field",
            format!(
                "version: 1\nenvironments:\n  - name: prod\n    region: eu\n    match: {{}}\n    kubernetes:\n      api_endpoint: \"h:1\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: /k }}\n{POOL}"
            ),
            vec!["4:5: unknown field `region` in environment \"prod\""],
        ),
        (
            "bad names",
            doc("pools:\n  - name: Fast_NVMe\n    match: {}\ncohorts:\n  - name: -edge\n    pools: [Fast_NVMe]\n"),
            vec![
                "16:11: invalid pool name \"Fast_NVMe\"",
                "19:11: invalid cohort name \"-edge\"",
            ],
        ),
        (
            "duplicate names",
            doc("pools:\n  - name: a\n    match: { labels: { x: a } }\n  - name: a\n    match: { labels: { x: b } }\n"),
            vec!["18:11: duplicate pool name \"a\""],
        ),
        (
            "duplicate env",
            format!(
                "version: 1\nenvironments:\n  - name: prod\n    match: {{ labels: {{ env: a }} }}\n    kubernetes: {{ api_endpoint: \"h:1\", ca_cert_hash: \"{HASH}\", credentials: {{ kubeconfig: /k }} }}\n  - name: prod\n    match: {{ labels: {{ env: b }} }}\n    kubernetes: {{ api_endpoint: \"h:1\", ca_cert_hash: \"{HASH}\", credentials: {{ kubeconfig: /k }} }}\n{POOL}"
            ),
            vec!["6:11: duplicate environment name \"prod\""],
        ),
        (
            "unknown environment",
            doc("pools:\n  - name: general\n    environments: [prod, production]\n    match: {}\n"),
            vec!["17:26: pool \"general\" names unknown environment \"production\""],
        ),
        (
            "cohort without pools",
            doc(&format!(
                "{POOL}cohorts:\n  - name: edge\n    pools: []\n  - name: hub\n"
            )),
            vec![
                "20:12: cohort \"edge\" lists no pools",
                "21:5: cohort \"hub\" lists no pools",
            ],
        ),
        (
            "cohort unknown pool",
            doc(&format!("{POOL}cohorts:\n  - name: edge\n    pools: [general, edgy]\n")),
            vec!["20:22: cohort \"edge\" names unknown pool \"edgy\""],
        ),
        (
            "anti_affinity unknown",
            doc(&format!(
                "{POOL}cohorts:\n  - name: edge\n    pools: [general]\n    anti_affinity: [hub, edge]\n"
            )),
            vec![
                "21:21: cohort \"edge\" names unknown cohort \"hub\" in anti_affinity",
                "21:26: cohort \"edge\" lists itself in anti_affinity",
            ],
        ),
        (
            "min > max",
            doc("pools:\n  - name: general\n    match: {}\n    min: 3\n    max: 2\n"),
            vec!["19:10: pool \"general\" has min 3 greater than max 2"],
        ),
        (
            "max 0 and max_unavailable 0",
            doc("pools:\n  - name: general\n    match: {}\n    max: 0\n    max_unavailable: 0\n"),
            vec![
                "18:10: pool \"general\" has max 0",
                "19:22: max_unavailable of pool \"general\" is 0",
            ],
        ),
        (
            "bad size",
            doc(
                "pools:\n  - name: general\n    match: { min_memory: 60G }\n  - name: other\n    match: { min_memory: 64 }\n",
            ),
            vec![
                "17:26: invalid size \"60G\" for min_memory of pool \"general\"",
                "19:26: invalid size \"64\" for min_memory of pool \"other\"",
            ],
        ),
        (
            "bad glob",
            doc("pools:\n  - name: general\n    match: { instance_type: [\"i3[en].*\", \"\"] }\n"),
            vec![
                "17:30: invalid glob \"i3[en].*\" in instance_type of pool \"general\"",
                "17:42: invalid glob \"\" in instance_type of pool \"general\"",
            ],
        ),
        (
            "forbidden label prefixes",
            doc(
                "pools:\n  - name: general\n    match: {}\n    labels:\n      node-role.kubernetes.io/worker: \"\"\n      tier: db\n      example.com/x: y\n      polynimbus.io/pool: x\n      polynimbus.io/ok: \"-bad\"\n",
            ),
            vec![
                "19:7: label key \"node-role.kubernetes.io/worker\" uses a prefix reserved for Kubernetes",
                "20:7: label key \"tier\" has no prefix",
                "21:7: label key \"example.com/x\" is outside the polynimbus.io/ prefix",
                "22:7: label key \"polynimbus.io/pool\" is set by placement itself",
                "23:25: invalid value \"-bad\" for label \"polynimbus.io/ok\"",
            ],
        ),
        (
            "bad taints",
            doc(&format!(
                "{POOL}cohorts:\n  - name: edge\n    pools: [general]\n    taints:\n      - {{ key: polynimbus.io/edge, effect: NoSchedul }}\n      - {{ key: k8s.io/x, effect: NoExecute }}\n      - {{ key: polynimbus.io/y }}\n      - {{ key: polynimbus.io/z, value: a, effect: NoSchedule }}\n      - {{ key: polynimbus.io/z, value: b, effect: NoSchedule }}\n"
            )),
            vec![
                "22:44: invalid taint effect \"NoSchedul\" in cohort \"edge\"",
                "23:16: taint key \"k8s.io/x\" uses a prefix reserved for Kubernetes",
                "24:9: missing field `effect` in taint of cohort \"edge\"",
                "26:9: taint \"polynimbus.io/z:NoSchedule\" appears twice in cohort \"edge\"",
            ],
        ),
        (
            "version 2",
            doc(POOL).replacen("version: 1", "version: 2", 1),
            vec!["1:10: unsupported policy version 2"],
        ),
        (
            "version missing",
            doc(POOL).replacen("version: 1\n", "", 1),
            vec!["1:1: missing field `version` in the policy"],
        ),
        (
            "version not a number",
            doc(POOL).replacen("version: 1", "version: one", 1),
            vec!["1:10: invalid number \"one\" for `version` in the policy"],
        ),
        (
            "empty document",
            String::new(),
            vec![
                "1:1: missing field `version` in the policy",
                "1:1: the policy defines no environments",
                "1:1: the policy defines no pools",
            ],
        ),
        (
            "identical pools",
            doc("pools:\n  - name: a\n    match: { local_nvme: true }\n  - name: b\n    match: { local_nvme: true }\n"),
            vec![
                "19:12: pools \"a\" and \"b\" overlap in environments \"dev\" and \"prod\": their match rules are identical",
            ],
        ),
        (
            "empty match overlaps",
            doc("pools:\n  - name: a\n    match: { local_nvme: true }\n  - name: b\n    match: {}\n"),
            vec![
                "19:12: pools \"a\" and \"b\" overlap in environments \"dev\" and \"prod\": \"b\" has an empty match, which accepts every node",
            ],
        ),
        (
            "subsumed pool",
            doc(
                "pools:\n  - name: big\n    match: { min_cpus: 16, platform: [aws] }\n  - name: any\n    match: { min_cpus: 8 }\n",
            ),
            vec![
                "19:12: pools \"big\" and \"any\" overlap in environments \"dev\" and \"prod\": every node matching \"big\" also matches \"any\"",
            ],
        ),
        (
            "disjoint environments do not overlap",
            doc(
                "pools:\n  - name: a\n    environments: [prod]\n    match: {}\n  - name: b\n    environments: [dev]\n    match: {}\n",
            ),
            vec![],
        ),
        (
            "overlap in two environments",
            doc("pools:\n  - name: a\n    match: {}\n  - name: b\n    match: {}\n"),
            vec![
                "19:12: pools \"a\" and \"b\" overlap in environments \"dev\" and \"prod\": their match rules are identical",
            ],
        ),
        (
            "environments overlap",
            format!(
                "version: 1\nenvironments:\n  - name: a\n    match: {{ labels: {{ env: a }} }}\n    kubernetes: {{ api_endpoint: \"h:1\", ca_cert_hash: \"{HASH}\", credentials: {{ kubeconfig: /k }} }}\n  - name: b\n    match: {{ labels: {{ env: a, zone: x }} }}\n    kubernetes: {{ api_endpoint: \"h:1\", ca_cert_hash: \"{HASH}\", credentials: {{ kubeconfig: /k }} }}\n{POOL}"
            ),
            vec!["7:12: environments \"a\" and \"b\" overlap: every node matching \"b\" also matches \"a\""],
        ),
        (
            "kubernetes values",
            format!(
                "version: 1\nenvironments:\n  - name: prod\n    match: {{}}\n    kubernetes:\n      api_endpoint: \"10.0.0.10\"\n      ca_cert_hash: \"sha256:abc\"\n      kubeadm_api: v1beta2\n      credentials: {{ kubeconfig: k/prod }}\n  - name: dev\n    match: {{ labels: {{ env: dev }} }}\n    kubernetes:\n      api_endpoint: \"h:1\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: /k, token_command: [x] }}\n{POOL}"
            ),
            vec![
                "6:21: invalid api_endpoint \"10.0.0.10\"",
                "7:21: invalid ca_cert_hash \"sha256:abc\"",
                "8:20: unsupported kubeadm_api \"v1beta2\" in environment \"prod\"",
                "9:34: kubeconfig path \"k/prod\" of environment \"prod\" is not absolute",
                "11:12: environments \"prod\" and \"dev\" overlap: every node matching \"dev\" also matches \"prod\"",
                "15:20: credentials of environment \"dev\" name both kubeconfig and token_command",
            ],
        ),
        (
            "missing kubernetes fields",
            format!(
                "version: 1\nenvironments:\n  - name: prod\n    match: {{}}\n    kubernetes:\n      credentials: {{}}\n{POOL}"
            ),
            vec![
                "6:7: missing field `api_endpoint` in kubernetes of environment \"prod\"",
                "6:7: missing field `ca_cert_hash` in kubernetes of environment \"prod\"",
                "6:20: credentials of environment \"prod\" name neither kubeconfig nor token_command",
            ],
        ),
        (
            "token command empty",
            format!(
                "version: 1\nenvironments:\n  - name: prod\n    match: {{}}\n    kubernetes:\n      api_endpoint: \"h:1\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ token_command: [] }}\n{POOL}"
            ),
            vec!["8:37: token_command of environment \"prod\" is empty"],
        ),
        (
            "wrong types",
            doc("pools:\n  - name: general\n    environments: prod\n    match: [a]\n    min: -1\n    labels: [x]\n"),
            vec![
                "17:19: expected a list for `environments` in pool \"general\", found a string",
                "18:12: expected a mapping for `match` in pool \"general\", found a list",
                "19:10: invalid number \"-1\" for `min` in pool \"general\"",
                "20:13: expected a mapping for `labels` in pool \"general\", found a list",
            ],
        ),
        (
            "match value types",
            doc(
                "pools:\n  - name: general\n    match:\n      platform: [gcp, aws, aws]\n      local_nvme: yes\n      zone: []\n      labels: { \"bad key\": x, tier: \"a b\" }\n      min_cpus: 1.5\n",
            ),
            vec![
                "18:18: unknown platform \"gcp\" in match of pool \"general\"",
                "18:28: \"aws\" is listed twice in `platform` of match of pool \"general\"",
                "19:19: expected true or false for `local_nvme` in match of pool \"general\", found \"yes\"",
                "20:13: `zone` in match of pool \"general\" is an empty list",
                "21:17: invalid label key \"bad key\"",
                "21:37: invalid value \"a b\" for label \"tier\"",
                "22:17: invalid number \"1.5\" for `min_cpus` in match of pool \"general\"",
            ],
        ),
        (
            "missing names",
            doc("pools:\n  - match: {}\ncohorts:\n  - pools: [general]\n"),
            vec![
                "16:5: missing field `name` in pool #1",
                "18:5: missing field `name` in cohort #1",
            ],
        ),
        (
            "not a mapping",
            doc("pools:\n  - general\n"),
            vec!["16:5: expected a mapping for pool #1, found a string"],
        ),
        (
            "label conflicts",
            doc(
                "pools:\n  - name: general\n    match: {}\n    labels: { polynimbus.io/tier: a }\ncohorts:\n  - name: c1\n    pools: [general]\n    labels: { polynimbus.io/tier: b }\n    taints: [ { key: polynimbus.io/t, value: x, effect: NoSchedule } ]\n  - name: c2\n    pools: [general]\n    taints: [ { key: polynimbus.io/t, value: y, effect: NoSchedule } ]\n",
            ),
            vec![
                "22:15: label \"polynimbus.io/tier\" is \"b\" in cohort \"c1\" but \"a\" in pool \"general\"",
                "26:15: taint \"polynimbus.io/t:NoSchedule\" is \"y\" in cohort \"c2\" but \"x\" in cohort \"c1\"",
            ],
        ),
        (
            "invalid yaml",
            doc("pools:\n  - name: [general\n"),
            vec!["17:1: invalid YAML: while parsing a flow sequence, expected ',' or ']'"],
        ),
        (
            "duplicate key",
            doc("pools:\n  - name: a\n    name: b\n    match: {}\n"),
            vec!["17:5: duplicate key `name`"],
        ),
        (
            "anchors",
            doc("pools:\n  - name: &n a\n    match: {}\n"),
            vec!["16:14: YAML anchors and aliases are not supported"],
        ),
        (
            "two documents",
            format!("{}---\nversion: 1\n", doc(POOL)),
            vec!["18:1: the file holds more than one YAML document"],
        ),
        (
            "no environments no pools",
            "version: 1\nenvironments: []\n".to_string(),
            vec![
                "1:1: the policy defines no pools",
                "2:15: the policy defines no environments",
            ],
        ),
    ];
    check_cases(&cases);
}

/// The full `FILE:LINE:COL: MESSAGE (hint: HINT)` line of the only diagnostic of `text`.
fn only(text: &str) -> String {
    let e = policy::parse("p.yaml", text).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    e.to_string()
}

#[test]
fn hints_say_what_to_do() {
    assert_eq!(
        only(&doc("pools:\n  - name: general\n    match: {}\n    size: 3\n")),
        "p.yaml:18:5: unknown field `size` in pool \"general\" (hint: allowed fields: name, environments, match, \
         min, max, max_unavailable, labels, storage)"
    );
    assert_eq!(
        only(&doc("pools:\n  - name: general\n    match: { cpus: 3 }\n")),
        "p.yaml:17:14: unknown field `cpus` in match of pool \"general\" (hint: allowed fields: platform, \
         instance_type, min_cpus, min_memory, local_nvme, zone, labels)"
    );
    assert_eq!(
        only(&doc(
            "pools:\n  - name: a\n    match: { labels: { x: a } }\n  - name: a\n    match: { labels: { x: b } }\n"
        )),
        "p.yaml:18:11: duplicate pool name \"a\" (hint: first defined at line 16, column 11; names must be unique)"
    );
    assert_eq!(
        only(&doc(
            "pools:\n  - name: general\n    environments: [prod, production]\n    match: {}\n"
        )),
        "p.yaml:17:26: pool \"general\" names unknown environment \"production\" (hint: defined environments: dev, \
         prod)"
    );
    assert_eq!(
        only(&doc(&format!(
            "{POOL}cohorts:\n  - name: edge\n    pools: [general, edgy]\n"
        ))),
        "p.yaml:20:22: cohort \"edge\" names unknown pool \"edgy\" (hint: defined pools: general)"
    );
    assert_eq!(
        only(&doc(
            "pools:\n  - name: general\n    match: {}\n    labels: { node-role.kubernetes.io/worker: \"\" }\n"
        )),
        "p.yaml:18:15: label key \"node-role.kubernetes.io/worker\" uses a prefix reserved for Kubernetes (hint: \
         the NodeRestriction admission plugin refuses kubelets setting kubernetes.io and k8s.io keys (such as \
         node-role.kubernetes.io/*); use \"polynimbus.io/worker\")"
    );
    assert_eq!(
        only(&doc(
            "pools:\n  - name: general\n    match: {}\n    labels: { tier: db }\n"
        )),
        "p.yaml:18:15: label key \"tier\" has no prefix (hint: keys the policy puts on nodes must use the project \
         prefix: write \"polynimbus.io/tier\")"
    );
    assert_eq!(
        only(&doc(&format!(
            "{POOL}cohorts:\n  - name: edge\n    pools: [general]\n    taints: [{{ key: polynimbus.io/e, effect: NoSchedul }}]\n"
        ))),
        "p.yaml:21:46: invalid taint effect \"NoSchedul\" in cohort \"edge\" (hint: one of NoSchedule, \
         PreferNoSchedule, NoExecute)"
    );
    assert_eq!(
        only(&doc(POOL).replacen("version: 1", "version: 2", 1)),
        "p.yaml:1:10: unsupported policy version 2 (hint: this release understands version 1; write `version: 1`)"
    );
    assert_eq!(
        only(&doc(
            "pools:\n  - name: general\n    match: {}\n    min: 3\n    max: 2\n"
        )),
        "p.yaml:19:10: pool \"general\" has min 3 greater than max 2 (hint: raise max to at least 3 or lower min)"
    );
    assert_eq!(
        only(&doc("pools:\n  - name: general\n    match: { min_memory: 60G }\n")),
        "p.yaml:17:26: invalid size \"60G\" for min_memory of pool \"general\" (hint: write a whole number and a \
         unit: B, KiB, MiB, GiB, TiB, KB, MB, GB or TB (e.g. 64GiB))"
    );
    assert_eq!(
        only(&doc(
            "pools:\n  - name: general\n    match: { instance_type: [\"i3[en].*\"] }\n"
        )),
        "p.yaml:17:30: invalid glob \"i3[en].*\" in instance_type of pool \"general\" (hint: only * (any run of \
         characters) and ? (one character) are special; [ ] { } and \\ are not supported and the pattern must not \
         be empty)"
    );
    assert_eq!(
        only(&doc(&format!("{POOL}cohorts:\n  - name: edge\n    pools: []\n"))),
        "p.yaml:20:12: cohort \"edge\" lists no pools (hint: list at least one pool, e.g. `pools: [performance]`)"
    );
    assert_eq!(
        only(&doc(&format!(
            "{POOL}cohorts:\n  - name: edge\n    pools: [general]\n    anti_affinity: [hub]\n"
        ))),
        "p.yaml:21:21: cohort \"edge\" names unknown cohort \"hub\" in anti_affinity (hint: defined cohorts: edge)"
    );
}

#[test]
fn all_errors_are_reported_at_once_in_file_order() {
    let text = doc(
        "pools:\n  - name: Bad\n    match: { platform: [gcp] }\n    labels: { tier: x }\ncohorts:\n  - name: c\n    pools: [nope]\n    extra: 1\n",
    );
    let e = policy::parse("p.yaml", &text).unwrap_err();
    let lines: Vec<usize> = e.0.iter().map(|d| d.line).collect();
    assert_eq!(lines, [16, 17, 18, 21, 22]);
    assert!(e.0.iter().all(|d| d.file == "p.yaml" && !d.hint.is_empty()));
}

#[test]
fn hostile_input_is_an_error_not_a_panic() {
    let deep = format!("version: {}\n", "[".repeat(10_000));
    for text in [
        "- a\n",
        "a: !!str 1\n",
        "? [a]\n: 1\n",
        "a: *x\n",
        "\t",
        deep.as_str(),
        "version: 1\n---\n---\n",
        "environments: {}\npools: 3\ncohorts: x\nversion: 99999999999\n",
        "\u{feff}version: 1\n",
    ] {
        let e = policy::parse("p.yaml", text).unwrap_err();
        assert!(!e.0.is_empty(), "{text:?}");
    }
    // A byte-order mark does not shift columns.
    let e = policy::parse("p.yaml", "\u{feff}version: 2\n").unwrap_err();
    assert!(
        e.0.iter().any(|d| d.to_string()
            == "p.yaml:1:10: unsupported policy version 2 (hint: this release understands version 1; write `version: 1`)"),
        "{e}"
    );
}

/// A policy whose one environment `prod` has `join_token_command: VALUE` on line 9, column 27.
fn with_join_token_command(value: &str) -> String {
    format!(
        "version: 1\nenvironments:\n  - name: prod\n    match: {{}}\n    kubernetes:\n      api_endpoint: \"h:1\"\n      ca_cert_hash: \"{HASH}\"\n      credentials: {{ kubeconfig: /k }}\n      join_token_command: {value}\n{POOL}"
    )
}

#[test]
fn join_token_command_table() {
    // (case, value, expected argv when valid, expected full diagnostics when not)
    type Case = (&'static str, &'static str, Option<Vec<&'static str>>, Vec<&'static str>);
    let cases: Vec<Case> = vec![
        (
            "accepted",
            "[/usr/local/bin/mint-join-token, --cluster, prod]",
            Some(vec!["/usr/local/bin/mint-join-token", "--cluster", "prod"]),
            vec![],
        ),
        ("accepted, program only", "[/bin/mint]", Some(vec!["/bin/mint"]), vec![]),
        ("null is absent", "null", None, vec![]),
        (
            "empty list",
            "[]",
            None,
            vec![
                "p.yaml:9:27: join_token_command of environment \"prod\" is empty (hint: give the command and its \
                 arguments, e.g. [/usr/local/bin/mint-join-token, --cluster, prod])",
            ],
        ),
        (
            "empty program",
            "[\"\", --cluster]",
            None,
            vec![
                "p.yaml:9:27: join_token_command of environment \"prod\" is empty (hint: give the command and its \
                 arguments, e.g. [/usr/local/bin/mint-join-token, --cluster, prod])",
            ],
        ),
        (
            "relative path",
            "[mint-join-token, --cluster, prod]",
            None,
            vec![
                "p.yaml:9:28: program \"mint-join-token\" of join_token_command of environment \"prod\" is not an \
                 absolute path (hint: write the program's absolute path, e.g. /usr/local/bin/mint-join-token)",
            ],
        ),
        (
            "empty argument",
            "[/bin/mint, \"\", prod]",
            None,
            vec![
                "p.yaml:9:39: argument #1 of join_token_command of environment \"prod\" is empty (hint: remove it or \
                 write the argument (the command runs without a shell))",
            ],
        ),
        (
            "non-string entry",
            "[/bin/mint, [--cluster], { a: b }]",
            None,
            vec![
                "p.yaml:9:39: expected a string for an entry of `join_token_command` in kubernetes of environment \
                 \"prod\", found a list (hint: write a single value)",
                "p.yaml:9:52: expected a string for an entry of `join_token_command` in kubernetes of environment \
                 \"prod\", found a mapping (hint: write a single value)",
            ],
        ),
        (
            "not a list",
            "/usr/local/bin/mint-join-token --cluster prod",
            None,
            vec![
                "p.yaml:9:27: expected a list for `join_token_command` in kubernetes of environment \"prod\", found \
                 a string (hint: write [a, b] or one `- item` per line)",
            ],
        ),
    ];
    for (case, value, argv, want) in cases {
        let text = with_join_token_command(value);
        match policy::parse("p.yaml", &text) {
            Ok(p) => {
                assert!(want.is_empty(), "{case}: parsed, wanted {want:?}");
                let got = p.environment("prod").unwrap().kubernetes.join_token_command.clone();
                let argv = argv.map(|v| v.into_iter().map(String::from).collect::<Vec<_>>());
                assert_eq!(got, argv, "{case}");
            }
            Err(e) => {
                let got: Vec<String> = e.0.iter().map(|d| d.to_string()).collect();
                assert_eq!(got, want, "{case}");
            }
        }
    }
}

#[test]
fn join_token_command_is_a_known_field() {
    assert_eq!(
        only(&with_join_token_command("[/bin/mint]").replace("join_token_command", "join_command")),
        "p.yaml:9:7: unknown field `join_command` in kubernetes of environment \"prod\" (hint: allowed fields: \
         api_endpoint, ca_cert_hash, kubeadm_api, credentials, join_token_command)"
    );
}

#[test]
fn token_command_rules_are_unchanged() {
    // `credentials.token_command` shares the argv checks but keeps its rules: a program found on PATH and
    // empty arguments stay valid.
    let text = with_join_token_command("null").replace(
        "credentials: { kubeconfig: /k }",
        "credentials: { token_command: [aws, eks, get-token, \"\"] }",
    );
    let p = policy::parse("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let k = &p.environment("prod").unwrap().kubernetes;
    assert_eq!(
        k.credentials,
        policy::Credentials::TokenCommand(vec!["aws".into(), "eks".into(), "get-token".into(), String::new()])
    );
    assert_eq!(k.join_token_command, None);
}

#[test]
fn storage_profile_errors() {
    let pool = |storage: &str| {
        doc(&format!(
            "pools:\n  - name: general\n    match: {{}}\n    storage:\n{storage}"
        ))
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "valid, lvm may omit the mount point",
            pool(
                "      - name: fast\n        disks: { class: [local-instance-store], min_size: 100GiB }\n        layout: raid0\n        mount_point: /var/lib/nimbus/volumes/fast\n      - name: topolvm\n        disks: { transport: [nvme] }\n        layout: lvm\n",
            ),
            vec![],
        ),
        (
            "unknown fields, layout, class, filesystem",
            pool(
                "      - name: fast\n        size: 3\n        disks: { class: [ssd], speed: 9 }\n        layout: raid5\n        filesystem: zfs\n        mount_point: /data\n",
            ),
            vec![
                "20:9: unknown field `size` in storage profile \"fast\" of pool \"general\"",
                "21:26: unknown disk class \"ssd\" in disks of storage profile \"fast\" of pool \"general\"",
                "21:32: unknown field `speed` in disks of storage profile \"fast\" of pool \"general\"",
                "22:17: unknown layout \"raid5\" in storage profile \"fast\" of pool \"general\"",
                "23:21: unknown filesystem \"zfs\" in storage profile \"fast\" of pool \"general\"",
            ],
        ),
        (
            "mount points",
            pool(
                "      - name: a\n        disks: {}\n        mount_point: data\n      - name: b\n        disks: {}\n        mount_point: /etc/nimbus\n      - name: c\n        disks: {}\n",
            ),
            vec![
                "21:22: mount point \"data\" of storage profile \"a\" of pool \"general\" is not usable",
                "24:22: mount point \"/etc/nimbus\" of storage profile \"b\" of pool \"general\" is not usable",
                "25:9: missing field `mount_point` in storage profile \"c\" of pool \"general\"",
            ],
        ),
        (
            "duplicates and zero disks",
            pool(
                "      - name: a\n        disks: { max_disks: 0 }\n        mount_point: /v/a\n      - name: a\n        disks: {}\n        mount_point: /v/a\n",
            ),
            vec![
                "20:29: max_disks of disks of storage profile \"a\" of pool \"general\" is 0",
                "22:15: storage profile \"a\" appears twice in pool \"general\"",
                "24:22: mount point /v/a is used twice in pool \"general\"",
            ],
        ),
    ];
    check_cases(&cases);
    let hint = only(&pool(
        "      - name: a\n        disks: {}\n        mount_point: /etc/x\n",
    ));
    assert!(hint.contains("(hint: /etc is a system directory"), "{hint}");
}
