//! JoinConfiguration rendering (golden files checked against the kubeadm v1beta3/v1beta4 API types) and the
//! config file's mode.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use nimbus_kube::KubeError;
use nimbus_kube::join::{self, ApiVersion, JoinParams, Taint};
use nimbus_kube::token::BootstrapToken;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn params() -> JoinParams {
    JoinParams {
        node_name: "edge-fra-1".into(),
        api_endpoint: "10.20.0.1:6443".into(),
        ca_cert_hashes: vec![format!("sha256:{}", "0123456789abcdef".repeat(4))],
        token: BootstrapToken::parse("abcdef.0123456789abcdef").unwrap(),
        labels: BTreeMap::from([
            ("polynimbus.io/pool".into(), "edge".into()),
            ("polynimbus.io/cohort.canary".into(), "true".into()),
        ]),
        taints: vec![
            Taint {
                key: "polynimbus.io/dedicated".into(),
                value: "edge".into(),
                effect: "NoSchedule".into(),
            },
            Taint {
                key: "polynimbus.io/draining".into(),
                value: "".into(),
                effect: "NoExecute".into(),
            },
        ],
        kubelet_extra_args: BTreeMap::from([
            ("node-ip".into(), "10.20.0.7".into()),
            ("max-pods".into(), "110".into()),
        ]),
    }
}

fn golden(version: ApiVersion, file: &str) {
    let got = join::render(&params(), version).unwrap();
    let path = fixture(file);
    if std::env::var_os("NIMBUS_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert_eq!(got, want, "rendered {version:?} differs from {}", path.display());
}

#[test]
fn v1beta3_golden() {
    golden(ApiVersion::V1beta3, "join-v1beta3.yaml");
}

#[test]
fn v1beta4_golden() {
    golden(ApiVersion::V1beta4, "join-v1beta4.yaml");
}

#[test]
fn no_labels_no_taints_gives_empty_taints_and_no_node_labels() {
    let mut p = params();
    p.labels.clear();
    p.taints.clear();
    p.kubelet_extra_args.clear();
    let v3 = join::render(&p, ApiVersion::V1beta3).unwrap();
    assert!(v3.contains("  taints: []\n"), "{v3}");
    assert!(v3.contains("  kubeletExtraArgs: {}\n"), "{v3}");
    assert!(!v3.contains("node-labels"));
    let v4 = join::render(&p, ApiVersion::V1beta4).unwrap();
    assert!(v4.contains("  kubeletExtraArgs: []\n"), "{v4}");
}

#[test]
fn forbidden_labels_and_taints_are_refused() {
    for key in [
        "node-role.kubernetes.io/worker",
        "kubernetes.io/hostname",
        "example.k8s.io/a",
        "team/x",
        "pool",
    ] {
        let mut p = params();
        p.labels.insert(key.into(), "x".into());
        let err = join::render(&p, ApiVersion::V1beta4).unwrap_err();
        match &err {
            KubeError::ForbiddenKey { what, key: k, .. } => {
                assert_eq!(*what, "label");
                assert_eq!(k, key);
            }
            other => panic!("{key}: expected ForbiddenKey, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(key) && msg.contains("polynimbus.io"), "{msg}");

        let mut p = params();
        p.taints.push(Taint {
            key: key.into(),
            value: "".into(),
            effect: "NoSchedule".into(),
        });
        assert!(matches!(
            join::render(&p, ApiVersion::V1beta3).unwrap_err(),
            KubeError::ForbiddenKey { what: "taint", .. }
        ));
    }
}

#[test]
fn other_invalid_params_are_refused() {
    type Mutation = Box<dyn Fn(&mut JoinParams)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("node name", Box::new(|p| p.node_name = "Edge_1".into())),
        (
            "API endpoint",
            Box::new(|p| p.api_endpoint = "https://10.20.0.1:6443".into()),
        ),
        ("CA cert hashes", Box::new(|p| p.ca_cert_hashes.clear())),
        ("CA cert hash", Box::new(|p| p.ca_cert_hashes = vec!["md5:abc".into()])),
        (
            "label value",
            Box::new(|p| {
                p.labels.insert("polynimbus.io/x".into(), "a,b=c".into());
            }),
        ),
        ("taint effect", Box::new(|p| p.taints[0].effect = "Sometimes".into())),
        (
            "taint",
            Box::new(|p| {
                let t = p.taints[0].clone();
                p.taints.push(t);
            }),
        ),
        (
            "node-labels",
            Box::new(|p| {
                p.kubelet_extra_args.insert("node-labels".into(), "a=b".into());
            }),
        ),
        (
            "kubelet extra argument",
            Box::new(|p| {
                p.kubelet_extra_args.insert("--max-pods".into(), "1".into());
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut p = params();
        mutate(&mut p);
        match join::render(&p, ApiVersion::V1beta4) {
            Err(KubeError::InvalidParams { field: f, .. }) => assert!(f.contains(field), "{f} vs {field}"),
            other => panic!("{field}: expected InvalidParams, got {other:?}"),
        }
    }
}

#[test]
fn write_config_is_0600_and_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/join.yaml");
    join::write_config(&path, "first\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\n");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // Overwriting an existing, looser file replaces it (rename), leaving 0600 and no temporary files behind.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    join::write_config(&path, "second\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["join.yaml"]);
}

#[test]
fn write_config_reports_the_path_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let err = join::write_config(&blocker.join("join.yaml"), "x").unwrap_err();
    assert!(matches!(err, KubeError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&blocker.display().to_string()), "{err}");
}
