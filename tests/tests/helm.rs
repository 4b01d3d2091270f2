//! The coordinator's Helm chart (`deploy/helm/nimbus-coordinator`), rendered by real Helm: Helm v4's Go SDK
//! through `deploy/helm/render.py` (PyPI `helm-python-sdk`, installed by `deploy/helm/install-renderer.sh`).
//! The checks read the parsed manifests, never substrings of the YAML; each replica's coordinator config is
//! taken out of the rendered ConfigMap and put through the coordinator's own parser and validation
//! (`daemon::config::parse_toml` + `coordinator::config::Config::resolve`), with the settings the container's
//! environment gives (e.g. `NIMBUS_REPLICA_ID` from the pod name) applied the way the coordinator's command line
//! reads them, then compared with the pod spec (the paths it names are the mounts, its ports are the
//! container's and the Services').
//!
//! The renderer is `$NIMBUS_HELM_PYTHON`, else `/opt/nimbus-helm/bin/python`. Without it the tests are skipped
//! with a message, or fail when `NIMBUS_REQUIRE_ROOT_TESTS=1` (CI).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use coordinator::config::{Config, Settings, StoreSettings, TlsFiles};
use coordinator::kek::KekSource;
use e2e::env::{REQUIRE_ROOT_ENV, workspace_dir};
use serde::Deserialize;
use serde_json::{Value, json};

/// Where the renderer's python is looked for when `$NIMBUS_HELM_PYTHON` is not set.
const DEFAULT_PYTHON: &str = "/opt/nimbus-helm/bin/python";
const PYTHON_ENV: &str = "NIMBUS_HELM_PYTHON";
const RENDER_TIMEOUT: Duration = Duration::from_secs(60);
const RELEASE: &str = "fleet";
const NAMESPACE: &str = "nimbus";
/// `<release>-<chart>`: the StatefulSet, the ConfigMap and the prefix of pods and per-replica Services.
const FULLNAME: &str = "fleet-nimbus-coordinator";

/// The smallest working values: one replica and its advertise address.
const MINIMAL: &str = "
replicaEndpoints:
  - advertiseAddress: 192.0.2.10
";

/// Three replicas with etcd (client TLS) and the KEK Secret, one address each (one IPv6), a pinned LoadBalancer
/// IP, a per-replica annotation and extra coordinator settings.
const HA: &str = "
replicas: 3
replicaEndpoints:
  - advertiseAddress: 192.0.2.10
    loadBalancerIP: 192.0.2.10
  - advertiseAddress: 192.0.2.11
    annotations:
      metallb.universe.tf/loadBalancerIPs: 192.0.2.11
  - advertiseAddress: '2001:db8::12'
etcd:
  endpoints:
    - https://etcd-0.etcd:2379
    - https://etcd-1.etcd:2379
    - https://etcd-2.etcd:2379
  tlsSecretName: etcd-client
kek:
  existingSecret: fleet-kek
config:
  mtu: 1400
  log_level: info,coordinator=debug
";

/// The config keys the chart writes from its own values (listeners, paths, TLS, etcd, the KEK file; the replica
/// id through `NIMBUS_REPLICA_ID`): not settable through `config`.
const CHART_MANAGED_KEYS: &[&str] = &[
    "data_dir",
    "admin_socket",
    "enroll_listen",
    "wg_listen",
    "metrics_listen",
    "advertise_address",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "etcd_endpoints",
    "etcd_ca",
    "etcd_cert",
    "etcd_key",
    "replica_id",
    "kek_file",
];

/// Coordinator settings the chart deliberately does not offer (documented in the chart README): the package
/// mirror needs a directory of packages (and, for HTTPS, a certificate) the chart has no volume for.
const NOT_IN_CHART: &[&str] = &[
    "packages_dir",
    "packages_listen",
    "packages_tls_cert",
    "packages_tls_key",
    // The remote admin API and the audit file need files (client CA, JWKS, TLS) the chart mounts no volume for yet.
    "admin_listen",
    "admin_tls_cert",
    "admin_tls_key",
    "admin_client_ca",
    "oidc_issuer",
    "oidc_audience",
    "oidc_jwks_file",
    "oidc_roles_claim",
    "oidc_ca",
    "audit_file",
    // The etcd prefix keeps its default (one fleet per etcd from the chart); plaintext etcd is for tests only.
    "etcd_prefix",
    "etcd_plaintext",
    // It runs a secret-manager client (vault, aws, …), which the image does not have; the chart takes the KEK
    // from a Secret (kek.existingSecret → kek_file).
    "kek_command",
    // The agent-release repository stays in each replica's data volume (<data_dir>/releases); a shared
    // ReadWriteMany volume for it is not offered yet.
    "releases_dir",
];

/// The etcd settings the chart renders from `etcd` values.
const ETCD_KEYS: &[&str] = &["etcd_endpoints", "etcd_ca", "etcd_cert", "etcd_key"];
/// The Secret of the KEK in `HA`.
const KEK_SECRET: &str = "fleet-kek";
/// The container's variable that `$(POD_NAME)` in its args refers to (not a coordinator setting).
const POD_NAME_ENV: &str = "POD_NAME";
/// The variable that carries the replica id (checked against the coordinator's own `replica_id` setting).
const REPLICA_ID_ENV: &str = "NIMBUS_REPLICA_ID";

fn chart_dir() -> PathBuf {
    workspace_dir().join("deploy/helm/nimbus-coordinator")
}

fn render_script() -> PathBuf {
    workspace_dir().join("deploy/helm/render.py")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The renderer's python, or why there is none. Probed once per process.
fn renderer() -> &'static Result<PathBuf, String> {
    static PROBE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let python = std::env::var_os(PYTHON_ENV).map_or_else(|| PathBuf::from(DEFAULT_PYTHON), PathBuf::from);
        if !python.exists() {
            return Err(format!(
                "no Helm renderer at {} (set {PYTHON_ENV}, or run deploy/helm/install-renderer.sh)",
                python.display()
            ));
        }
        let out = e2e::run_with_timeout(
            Command::new(&python).args(["-c", "import helm_python; print(helm_python.helm_sdk_version())"]),
            RENDER_TIMEOUT,
        )
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} cannot import helm_python (run deploy/helm/install-renderer.sh): {}",
                python.display(),
                text(&out.stderr)
            ));
        }
        eprintln!(
            "helm renderer: {} (Helm SDK {})",
            python.display(),
            text(&out.stdout).trim()
        );
        Ok(python)
    })
}

/// The renderer's python when the test can run; else `None` after a skip message, or a panic under
/// `NIMBUS_REQUIRE_ROOT_TESTS=1`.
fn python() -> Option<&'static Path> {
    match renderer() {
        Ok(p) => Some(p),
        Err(why) => {
            let test = std::thread::current().name().unwrap_or("helm").to_string();
            if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v.trim() == "1") {
                panic!("{test}: {why} ({REQUIRE_ROOT_ENV}=1 is set)");
            }
            eprintln!("SKIPPED {test}: {why} (set {REQUIRE_ROOT_ENV}=1 to make this a failure)");
            None
        }
    }
}

/// Renders the chart with `values` (YAML, passed with `-f`) and `extra` arguments. `Ok`: the manifests, parsed;
/// `Err`: the renderer's stderr.
fn try_render(python: &Path, values: &str, extra: &[&str]) -> Result<Vec<Value>, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).unwrap();
    let mut cmd = Command::new(python);
    cmd.arg(render_script())
        .arg(chart_dir())
        .arg("-f")
        .arg(&file)
        .args(["--name", RELEASE, "--namespace", NAMESPACE])
        .args(extra);
    let out = e2e::run_with_timeout(&mut cmd, RENDER_TIMEOUT).unwrap();
    let stderr = text(&out.stderr);
    if !out.status.success() {
        assert_eq!(
            out.status.code(),
            Some(1),
            "render.py fails with 1 on a Helm error: {stderr}"
        );
        return Err(stderr);
    }
    let stream = text(&out.stdout);
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&stream)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    let sources = stream
        .lines()
        .filter(|l| l.starts_with("# Source: nimbus-coordinator/templates/"))
        .count();
    assert_eq!(
        sources,
        docs.len(),
        "one `# Source:` line per manifest, like helm template:\n{stream}"
    );
    assert!(
        docs.iter().all(|d| d["metadata"]["namespace"] == NAMESPACE),
        "every manifest is in the release namespace"
    );
    Ok(docs)
}

fn render(python: &Path, values: &str) -> Vec<Value> {
    try_render(python, values, &[]).unwrap_or_else(|stderr| panic!("rendering failed:\n{stderr}"))
}

/// The one manifest of `kind` named `name`.
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}, found {}", found.len());
    found[0]
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, found {v}"))
}

fn array(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("expected a list, found {v}"))
}

/// The list entry whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    array(list)
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no entry named {name} in {list}"))
}

/// The coordinator container of the StatefulSet.
fn container(sts: &Value) -> &Value {
    let containers = array(&sts["spec"]["template"]["spec"]["containers"]);
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The mount whose `mountPath` contains `path` (the longest such mount), and its volume.
fn mount_of<'a>(sts: &'a Value, path: &Path) -> (&'a Value, &'a Value) {
    let mount = array(&container(sts)["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(str_of(&m["mountPath"])))
        .max_by_key(|m| str_of(&m["mountPath"]).len())
        .unwrap_or_else(|| panic!("{} is on no volume mount", path.display()));
    let name = str_of(&mount["name"]);
    let volume = array(&sts["spec"]["template"]["spec"]["volumes"])
        .iter()
        .chain(
            array(&sts["spec"]["volumeClaimTemplates"])
                .iter()
                .map(|t| &t["metadata"]),
        )
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("mount {name} has no volume"));
    (mount, volume)
}

/// The container port named `name`: (number, protocol).
fn container_port(sts: &Value, name: &str) -> (u64, String) {
    let p = named(&container(sts)["ports"], name);
    (p["containerPort"].as_u64().unwrap(), str_of(&p["protocol"]).to_string())
}

/// The per-replica TOML configs of the ConfigMap, by key.
fn configs(docs: &[Value]) -> BTreeMap<String, String> {
    let cm = find(docs, "ConfigMap", FULLNAME);
    cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v).to_string()))
        .collect()
}

/// Parses and validates one rendered config with the coordinator's own code, as `nimbus-coordinator --config`
/// does before it binds anything: every key known and well typed (`parse_toml`), every value valid
/// (`Config::resolve`), with `env` (the settings from the container's environment, [`pod_env_settings`]) over
/// the file as the coordinator applies them.
fn validate(origin: &str, toml_text: &str, env: Settings) -> Config {
    let parse = |text: &str| -> Settings {
        daemon::config::parse_toml(text, origin)
            .unwrap_or_else(|e| panic!("the coordinator refuses {origin}:\n{e}\n--- {origin}:\n{toml_text}"))
    };
    Config::resolve(parse(toml_text), env).unwrap_or_else(|errs| {
        panic!("the coordinator's validation refuses {origin} (with the pod's environment): {errs:?}\n{toml_text}")
    })
}

/// The coordinator settings the container's environment gives pod `<FULLNAME>-<index>`: each variable (other
/// than `POD_NAME`) must be the `env` of one of the coordinator's settings, and is read by the coordinator's own
/// clap definition, as its command line reads it. Values are literal or the pod name (downward API); the
/// test process's own environment is left out.
fn pod_env_settings(docs: &[Value], index: usize) -> Settings {
    use clap::FromArgMatches as _;
    let pod = format!("{FULLNAME}-{index}");
    let cmd = <Settings as clap::Args>::augment_args(clap::Command::new("nimbus-coordinator"));
    let by_env: BTreeMap<String, clap::Arg> = cmd
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_string(), a.clone())))
        .collect();
    let mut argv = vec!["nimbus-coordinator".to_string()];
    let env = &container(find(docs, "StatefulSet", FULLNAME))["env"];
    for var in array(env) {
        let name = str_of(&var["name"]);
        if name == POD_NAME_ENV {
            continue;
        }
        let arg = by_env.get(name).unwrap_or_else(|| {
            panic!("the container sets {name}, which is no coordinator setting's environment variable")
        });
        let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), Value::Null) => v.clone(),
            (Value::Null, Value::String(f)) if f == "metadata.name" => pod.clone(),
            _ => panic!("{name}: a literal value or the pod name expected, found {var}"),
        };
        argv.push(format!("--{}={value}", arg.get_long().unwrap()));
    }
    // Without the `env` sources: only what the pod spec gives counts, not the environment of this test.
    let cmd = cmd.mut_args(|a| a.env(None::<&str>));
    let matches = cmd
        .try_get_matches_from(&argv)
        .unwrap_or_else(|e| panic!("the coordinator refuses the pod's environment {argv:?}: {e}"));
    Settings::from_arg_matches(&matches).unwrap()
}

/// The config of pod `<FULLNAME>-<index>`, validated with its environment: (ConfigMap key, TOML, config).
fn validated_pod(docs: &[Value], index: usize) -> (String, String, Config) {
    let (key, toml_text) = config_of_pod(docs, index);
    let config = validate(&key, &toml_text, pod_env_settings(docs, index));
    (key, toml_text, config)
}

/// The names of the Secrets the pod mounts.
fn secret_volumes(sts: &Value) -> BTreeSet<String> {
    array(&sts["spec"]["template"]["spec"]["volumes"])
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_string))
        .collect()
}

fn toml_table(text: &str) -> toml::Table {
    toml::from_str(text).unwrap()
}

/// The container runs `--config /etc/nimbus/config/$(POD_NAME).toml` with POD_NAME from the downward API,
/// and that directory is the ConfigMap: returns the config of pod `<FULLNAME>-<index>`.
fn config_of_pod(docs: &[Value], index: usize) -> (String, String) {
    let sts = find(docs, "StatefulSet", FULLNAME);
    let c = container(sts);
    let args: Vec<&str> = array(&c["args"]).iter().map(str_of).collect();
    assert_eq!(args[0], "--config", "{args:?}");
    let pod_env = named(&c["env"], "POD_NAME");
    assert_eq!(pod_env["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    let pod = format!("{FULLNAME}-{index}");
    let path = PathBuf::from(args[1].replace("$(POD_NAME)", &pod));
    let (mount, volume) = mount_of(sts, &path);
    assert_eq!(
        volume["configMap"]["name"], FULLNAME,
        "the config directory is the ConfigMap"
    );
    assert_eq!(mount["readOnly"], true);
    let key = path
        .strip_prefix(str_of(&mount["mountPath"]))
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let data = configs(docs);
    let toml_text = data
        .get(&key)
        .unwrap_or_else(|| {
            panic!(
                "pod {pod} reads {key}, which the ConfigMap does not have: {:?}",
                data.keys()
            )
        })
        .clone();
    (key, toml_text)
}

/// Asserts what a single pod needs, on the StatefulSet, against the validated `config` of replica 0.
fn check_pod_spec(docs: &[Value], config: &Config) {
    let sts = find(docs, "StatefulSet", FULLNAME);
    let pod = &sts["spec"]["template"]["spec"];
    let c = container(sts);

    // The data dir is a per-replica volume claim, writable.
    let (mount, volume) = mount_of(sts, &config.data_dir);
    assert_eq!(
        mount["mountPath"],
        config.data_dir.to_str().unwrap(),
        "the volume is the data dir itself"
    );
    assert_ne!(mount["readOnly"], true);
    let claim = array(&sts["spec"]["volumeClaimTemplates"])
        .iter()
        .find(|t| t["metadata"]["name"] == volume["name"])
        .unwrap_or_else(|| {
            panic!(
                "the data dir {} is not on a volumeClaimTemplate",
                config.data_dir.display()
            )
        });
    assert!(claim["spec"]["resources"]["requests"]["storage"].is_string(), "{claim}");
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));

    // readOnlyRootFilesystem: everything the coordinator writes is on a writable mount.
    let socket_dir = config.admin_socket.parent().unwrap();
    let (run_mount, run_volume) = mount_of(sts, socket_dir);
    assert_ne!(run_mount["readOnly"], true);
    assert!(
        run_volume["emptyDir"].is_object(),
        "the admin socket's directory is an emptyDir: {run_volume}"
    );

    // Hardening: NET_ADMIN only, no escalation, read-only root, RuntimeDefault seccomp.
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert!(
        pod["securityContext"]["fsGroup"].is_null(),
        "fsGroup would make the TLS key group-readable"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_ne!(pod["hostNetwork"], true);

    // Probes on the metrics listener of the config.
    let metrics = config.metrics_listen.expect("metrics are on: the probes use them");
    assert!(
        metrics.ip().is_unspecified(),
        "the kubelet reaches the probes on the pod IP: {metrics}"
    );
    assert_eq!(
        container_port(sts, "metrics"),
        (u64::from(metrics.port()), "TCP".into())
    );
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "metrics", "{probe}");
    }

    // Requests for the scheduler.
    let requests = &c["resources"]["requests"];
    assert!(
        requests["cpu"].is_string() && requests["memory"].is_string(),
        "{requests}"
    );

    // The listeners are the container's ports.
    assert_eq!(
        container_port(sts, "enroll"),
        (u64::from(config.enroll_listen.port()), "TCP".into())
    );
    assert_eq!(
        container_port(sts, "wireguard"),
        (u64::from(config.wg_listen.port()), "UDP".into())
    );

    // Enrollment TLS: the three files the config names come from the TLS Secret, key 0400.
    if let Some(tls) = &config.tls {
        check_tls_mounts(sts, tls);
    } else {
        assert!(
            !secret_volumes(sts).contains(&format!("{FULLNAME}-tls")),
            "no TLS Secret without tls_cert"
        );
    }

    // The KEK: the file the config names is the Secret's `kek`, read-only, 0400 (the coordinator refuses a KEK
    // file others can read). Without kek_file no KEK Secret is mounted.
    match &config.kek {
        KekSource::File(file) => {
            let (mount, volume) = mount_of(sts, file);
            assert_eq!(mount["readOnly"], true, "{mount}");
            let secret = &volume["secret"];
            assert_eq!(secret["defaultMode"], 0o400, "{volume}");
            let rel = file
                .strip_prefix(str_of(&mount["mountPath"]))
                .unwrap()
                .to_str()
                .unwrap();
            assert_eq!(
                secret["items"],
                json!([{"key": "kek", "path": rel}]),
                "{} is the Secret's key `kek`, and nothing else is mounted",
                file.display()
            );
        }
        other => {
            assert_eq!(*other, KekSource::Env, "the chart offers no kek_command");
            assert!(
                array(&pod["volumes"]).iter().all(|v| v["name"] != "kek"),
                "no KEK volume without kek_file"
            );
        }
    }

    // On etcd the replica id is the pod name (pod_env_settings has put NIMBUS_REPLICA_ID through the
    // coordinator's settings); on sled the variable is absent (the coordinator refuses replica_id there).
    let replica_env = array(&c["env"]).iter().find(|e| e["name"] == REPLICA_ID_ENV);
    match &config.store {
        StoreSettings::Etcd(etcd) => {
            assert_eq!(etcd.replica_id, format!("{FULLNAME}-0"), "the pod name");
            let var = replica_env.unwrap_or_else(|| panic!("{REPLICA_ID_ENV} is set on etcd"));
            assert_eq!(var["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name", "{var}");
        }
        StoreSettings::Sled => assert!(replica_env.is_none(), "no {REPLICA_ID_ENV} on sled"),
    }

    // /dev/net/tun from the node.
    let (tun_mount, tun_volume) = mount_of(sts, Path::new("/dev/net/tun"));
    assert_eq!(tun_mount["mountPath"], "/dev/net/tun");
    assert_eq!(
        tun_volume["hostPath"],
        json!({"path": "/dev/net/tun", "type": "CharDevice"})
    );
}

/// The three TLS files `tls` names come from one TLS Secret, mounted read-only with mode 0400.
fn check_tls_mounts(sts: &Value, tls: &TlsFiles) {
    let mut tls_volumes = BTreeSet::new();
    for (file, key) in [(&tls.cert, "tls.crt"), (&tls.key, "tls.key"), (&tls.ca, "ca.crt")] {
        let (mount, volume) = mount_of(sts, file);
        assert_eq!(mount["readOnly"], true);
        let secret = &volume["secret"];
        assert_eq!(
            secret["defaultMode"], 0o400,
            "the coordinator refuses a key others can read"
        );
        let rel = file
            .strip_prefix(str_of(&mount["mountPath"]))
            .unwrap()
            .to_str()
            .unwrap();
        let item = array(&secret["items"]).iter().find(|i| i["path"] == rel);
        assert_eq!(
            item.map(|i| &i["key"]),
            Some(&json!(key)),
            "{} comes from the Secret's {key}",
            file.display()
        );
        tls_volumes.insert(str_of(&secret["secretName"]).to_string());
    }
    assert_eq!(tls_volumes.len(), 1, "one TLS Secret: {tls_volumes:?}");
}

/// The per-replica Services: one per replica, selecting exactly that pod, with the WireGuard port over UDP
/// and the enrollment port over TCP, both as the replica's config listens.
fn check_replica_services(docs: &[Value], replicas: usize, config: &Config) {
    let sts = find(docs, "StatefulSet", FULLNAME);
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let match_labels = sts["spec"]["selector"]["matchLabels"].as_object().unwrap();
    for (k, v) in match_labels {
        assert_eq!(&pod_labels[k], v, "the pod template carries the selector label {k}");
    }
    let per_replica: Vec<&Value> = of_kind(docs, "Service")
        .into_iter()
        .filter(|s| !s["spec"]["selector"]["statefulset.kubernetes.io/pod-name"].is_null())
        .collect();
    assert_eq!(per_replica.len(), replicas, "one Service per replica");
    for i in 0..replicas {
        let pod = format!("{FULLNAME}-{i}");
        let svc = find(docs, "Service", &pod);
        let selector = svc["spec"]["selector"].as_object().unwrap();
        assert_eq!(selector["statefulset.kubernetes.io/pod-name"], pod.as_str());
        for (k, v) in match_labels {
            assert_eq!(&selector[k], v, "{pod}: selects the coordinator's pods ({k})");
        }
        assert_eq!(
            selector.len(),
            match_labels.len() + 1,
            "{pod}: nothing else in the selector"
        );
        let ports = &svc["spec"]["ports"];
        let wg = named(ports, "wireguard");
        assert_eq!(wg["protocol"], "UDP");
        assert_eq!(
            wg["port"],
            config.wg_listen.port(),
            "agents dial advertise_address:{}",
            config.wg_listen.port()
        );
        assert_eq!(wg["targetPort"], "wireguard");
        let enroll = named(ports, "enroll");
        assert_eq!(enroll["protocol"], "TCP");
        assert_eq!(enroll["port"], config.enroll_listen.port());
        assert_eq!(svc["spec"]["type"], "LoadBalancer");
        assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    }
    let headless = find(docs, "Service", &format!("{FULLNAME}-headless"));
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(sts["spec"]["serviceName"], str_of(&headless["metadata"]["name"]));
    assert!(
        array(&headless["spec"]["ports"]).iter().all(|p| p["name"] == "metrics"),
        "agents never use the headless Service"
    );
}

#[test]
fn the_default_values_alone_ask_for_an_advertise_address() {
    let Some(py) = python() else { return };
    let err = try_render(py, "{}", &[]).unwrap_err();
    assert!(
        err.contains(&format!("replica {FULLNAME}-0 has no advertise address"))
            && err.contains("set replicaEndpoints[0].advertiseAddress"),
        "{err}"
    );
}

#[test]
fn one_replica_renders_a_hardened_statefulset_whose_config_the_coordinator_accepts() {
    let Some(py) = python() else { return };
    let docs = render(py, MINIMAL);
    let kinds: Vec<&str> = docs.iter().map(|d| str_of(&d["kind"])).collect();
    assert_eq!(
        kinds,
        ["ConfigMap", "Service", "Service", "StatefulSet"],
        "in Helm's install order"
    );

    let sts = find(&docs, "StatefulSet", FULLNAME);
    assert_eq!(sts["spec"]["replicas"], 1);
    let (_, toml_text, config) = validated_pod(&docs, 0);
    assert_eq!(configs(&docs).len(), 1, "one config per replica");
    assert_eq!(config.store, StoreSettings::Sled);
    assert_eq!(config.kek, KekSource::Env, "no kek_file without kek.existingSecret");
    assert_eq!(config.advertise_address.to_string(), "192.0.2.10");
    assert_eq!(config.enroll_endpoint(), "192.0.2.10:7443");
    assert_eq!(config.wg_endpoint(), "192.0.2.10:51820");
    assert_eq!(config.log_format, "json");
    let table = toml_table(&toml_text);
    for k in ETCD_KEYS.iter().chain(&["replica_id", "kek_file"]) {
        assert!(
            !table.contains_key(*k),
            "{k} is rendered only with etcd.endpoints / kek.existingSecret:\n{toml_text}"
        );
    }
    assert!(
        array(&sts["spec"]["template"]["spec"]["volumes"])
            .iter()
            .all(|v| v["name"] != "etcd-tls"),
        "no etcd volume without etcd"
    );
    assert!(
        sts["spec"]["template"]["spec"]["affinity"].is_null(),
        "one replica: no anti-affinity"
    );
    check_pod_spec(&docs, &config);
    check_replica_services(&docs, 1, &config);
    let tls = config.tls.as_ref().unwrap();
    let (_, tls_volume) = mount_of(sts, &tls.cert);
    assert_eq!(
        tls_volume["secret"]["secretName"],
        format!("{FULLNAME}-tls"),
        "the default Secret name"
    );
    assert_eq!(secret_volumes(sts), BTreeSet::from([format!("{FULLNAME}-tls")]));
}

/// On sled the KEK is optional (the key of `nimbus-coordinator backup`): with the Secret the config names it, and
/// still no replica id (the coordinator refuses replica_id without etcd).
#[test]
fn one_replica_on_sled_may_have_the_kek_for_backups() {
    let Some(py) = python() else { return };
    let docs = try_render(
        py,
        MINIMAL,
        &["--set-json", &format!("kek.existingSecret=\"{KEK_SECRET}\"")],
    )
    .unwrap();
    let (_, toml_text, config) = validated_pod(&docs, 0);
    assert_eq!(config.store, StoreSettings::Sled);
    assert_eq!(config.kek, KekSource::File("/etc/nimbus/kek/kek".into()), "{toml_text}");
    check_pod_spec(&docs, &config);
    let sts = find(&docs, "StatefulSet", FULLNAME);
    let (_, volume) = mount_of(sts, Path::new("/etc/nimbus/kek/kek"));
    assert_eq!(volume["secret"]["secretName"], KEK_SECRET);
}

#[test]
fn three_replicas_with_etcd_get_one_config_and_one_service_each() {
    let Some(py) = python() else { return };
    let docs = render(py, HA);
    let sts = find(&docs, "StatefulSet", FULLNAME);
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(configs(&docs).len(), 3, "one config per replica");
    let addresses = ["192.0.2.10", "192.0.2.11", "2001:db8::12"];
    let endpoints = [
        "https://etcd-0.etcd:2379",
        "https://etcd-1.etcd:2379",
        "https://etcd-2.etcd:2379",
    ];
    let mut first = None;
    for (i, address) in addresses.iter().enumerate() {
        let (key, toml_text, config) = validated_pod(&docs, i);
        assert_eq!(config.advertise_address.to_string(), *address, "{key}");
        // Each replica's id is its pod name (NIMBUS_REPLICA_ID from the downward API), on the shared prefix.
        let StoreSettings::Etcd(etcd) = &config.store else {
            panic!("{key}: etcd expected, found {:?}", config.store)
        };
        assert_eq!(etcd.replica_id, format!("{FULLNAME}-{i}"), "{key}");
        assert_eq!(etcd.endpoints, endpoints, "{key}");
        assert_eq!(etcd.prefix, "nimbus/", "{key}: every replica on one prefix");
        // Every replica has the same KEK: the file of the one Secret.
        let KekSource::File(kek_file) = &config.kek else {
            panic!("{key}: kek_file expected, found {:?}", config.kek)
        };
        let (_, kek_volume) = mount_of(sts, kek_file);
        assert_eq!(kek_volume["secret"]["secretName"], KEK_SECRET, "{key}");
        assert_eq!(config.mtu, 1400, "config.mtu reaches every replica");
        assert_eq!(config.log_level, "info,coordinator=debug");
        let table = toml_table(&toml_text);
        assert_eq!(table["etcd_endpoints"], toml::Value::from(endpoints.to_vec()), "{key}");
        // The etcd client files are the etcd Secret, mounted read-only with mode 0400.
        for (k, secret_key) in [("etcd_ca", "ca.crt"), ("etcd_cert", "tls.crt"), ("etcd_key", "tls.key")] {
            let path = PathBuf::from(table[k].as_str().unwrap());
            let (mount, volume) = mount_of(sts, &path);
            assert_eq!(mount["readOnly"], true);
            assert_eq!(volume["secret"]["secretName"], "etcd-client", "{k}");
            assert_eq!(volume["secret"]["defaultMode"], 0o400, "{k}");
            assert_eq!(path.file_name().unwrap().to_str(), Some(secret_key), "{k}");
        }
        first.get_or_insert(config);
    }
    let config = first.unwrap();
    check_pod_spec(&docs, &config);
    check_replica_services(&docs, 3, &config);
    assert_eq!(
        secret_volumes(sts),
        BTreeSet::from([format!("{FULLNAME}-tls"), "etcd-client".into(), KEK_SECRET.into()])
    );
    let svc0 = find(&docs, "Service", &format!("{FULLNAME}-0"));
    assert_eq!(svc0["spec"]["loadBalancerIP"], "192.0.2.10");
    let svc1 = find(&docs, "Service", &format!("{FULLNAME}-1"));
    assert_eq!(
        svc1["metadata"]["annotations"]["metallb.universe.tf/loadBalancerIPs"],
        "192.0.2.11"
    );
    assert!(svc1["spec"]["loadBalancerIP"].is_null());
    let anti = &sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    let term = &array(&anti["preferredDuringSchedulingIgnoredDuringExecution"])[0]["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        term["labelSelector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
}

/// Without tls.enabled the replicas share the coordinator's own CA through etcd (sealed with the KEK): any number
/// of replicas renders, with no TLS Secret.
#[test]
fn three_replicas_on_etcd_without_tls_share_the_coordinators_ca() {
    let Some(py) = python() else { return };
    let args = ["--set-json", "tls.enabled=false"];
    let docs = try_render(py, HA, &args).unwrap_or_else(|e| panic!("{e}"));
    let sts = find(&docs, "StatefulSet", FULLNAME);
    assert_eq!(sts["spec"]["replicas"], 3);
    for i in 0..3 {
        let (key, toml_text, config) = validated_pod(&docs, i);
        assert!(config.tls.is_none(), "{key}: no tls_* keys:\n{toml_text}");
        let StoreSettings::Etcd(etcd) = &config.store else {
            panic!("{key}: etcd expected")
        };
        assert_eq!(etcd.replica_id, format!("{FULLNAME}-{i}"));
        assert_eq!(config.kek, KekSource::File("/etc/nimbus/kek/kek".into()), "{key}");
        if i == 0 {
            check_pod_spec(&docs, &config);
        }
    }
    assert_eq!(
        secret_volumes(sts),
        BTreeSet::from(["etcd-client".to_string(), KEK_SECRET.into()]),
        "no TLS Secret"
    );
    try_render(py, HA, &["--lint", args[0], args[1]]).unwrap_or_else(|e| panic!("helm lint --strict:\n{e}"));
}

#[test]
fn values_that_cannot_work_fail_with_a_clear_message() {
    let Some(py) = python() else { return };
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            HA,
            &["--set-json", "etcd={\"endpoints\":[],\"tlsSecretName\":\"\"}"],
            &[
                "replicas is 3 but etcd.endpoints is empty",
                "sled",
                "set etcd.endpoints, or replicas: 1",
            ],
        ),
        (
            HA,
            &[
                "--set-json",
                "replicaEndpoints=[{\"advertiseAddress\":\"192.0.2.10\"},{},{\"advertiseAddress\":\"192.0.2.12\"}]",
            ],
            &[
                "replica fleet-nimbus-coordinator-1 has no advertise address",
                "replicaEndpoints[1].advertiseAddress",
            ],
        ),
        (
            HA,
            &[
                "--set-json",
                "replicaEndpoints=[{\"advertiseAddress\":\"192.0.2.10\"},{\"advertiseAddress\":\"192.0.2.11\"}]",
            ],
            &["replica fleet-nimbus-coordinator-2 has no advertise address"],
        ),
        (
            HA,
            &[
                "--set-json",
                "replicaEndpoints=[{\"advertiseAddress\":\"192.0.2.10\"},{\"advertiseAddress\":\"192.0.2.11\"},{\"advertiseAddress\":\"192.0.2.10\"}]",
            ],
            &["share the advertise address 192.0.2.10"],
        ),
        (
            HA,
            &["--set-json", "replicas=2"],
            &["replicaEndpoints has 3 entries but replicas is 2"],
        ),
        // etcd without the KEK: the coordinator would refuse to start.
        (
            HA,
            &["--set-json", "kek.existingSecret=\"\""],
            &[
                "etcd.endpoints is set but kek.existingSecret is empty",
                "refuses to start without one",
                "nimbus-coordinator kek generate kek.b64",
                "kubectl -n nimbus create secret generic fleet-nimbus-coordinator-kek --from-file=kek=kek.b64",
                "set kek.existingSecret: fleet-nimbus-coordinator-kek",
            ],
        ),
        (
            MINIMAL,
            &["--set-json", "etcd.endpoints=[\"https://etcd:2379\"]"],
            &["etcd.endpoints is set but kek.existingSecret is empty"],
        ),
        (
            MINIMAL,
            &["--set-json", "etcd.tlsSecretName=\"etcd-client\""],
            &["etcd.tlsSecretName is set but etcd.endpoints is empty"],
        ),
        // Types and unknown keys: values.schema.json.
        (
            MINIMAL,
            &["--set-json", "replicas=\"three\""],
            &["/replicas", "want integer"],
        ),
        (MINIMAL, &["--set-json", "replicas=0"], &["/replicas", "minimum"]),
        (
            MINIMAL,
            &["--set-json", "replica=2"],
            &["additional properties 'replica' not allowed"],
        ),
        (
            MINIMAL,
            &["--set-json", "config.data_dir=\"/tmp\""],
            &["/config", "'data_dir' not allowed"],
        ),
        (MINIMAL, &["--set-json", "config.mtu=100"], &["/config/mtu", "minimum"]),
        (
            MINIMAL,
            &["--set-json", "etcd.endpoints=[\"etcd:2379\"]"],
            &["/etcd/endpoints/0", "does not match pattern"],
        ),
        (MINIMAL, &["--set-json", "service.type=\"Ingress\""], &["/service/type"]),
        (
            MINIMAL,
            &["--set-json", "tls.enabled=\"yes\""],
            &["/tls/enabled", "want boolean"],
        ),
        (
            MINIMAL,
            &["--set-json", "kek.existingSecret=\"Fleet_KEK\""],
            &["/kek/existingSecret", "does not match pattern"],
        ),
        (
            MINIMAL,
            &["--set-json", "kek.secretName=\"fleet-kek\""],
            &["/kek", "'secretName' not allowed"],
        ),
        (
            MINIMAL,
            &[
                "--set-json",
                "replicaEndpoints=[{\"advertiseAddress\":\"coordinator.example\"}]",
            ],
            &["/replicaEndpoints/0/advertiseAddress", "does not match pattern"],
        ),
    ];
    for (values, args, expected) in cases {
        let err = match try_render(py, values, args) {
            Ok(_) => panic!("{args:?} rendered; it must fail"),
            Err(e) => e,
        };
        assert!(err.starts_with("render.py: "), "{args:?}: {err}");
        for e in *expected {
            assert!(err.contains(e), "{args:?}: expected `{e}` in:\n{err}");
        }
    }
}

#[test]
fn the_chart_passes_strict_lint() {
    let Some(py) = python() else { return };
    for values in [MINIMAL, HA] {
        try_render(py, values, &["--lint"]).unwrap_or_else(|e| panic!("helm lint --strict:\n{e}"));
    }
    // A schema error is a lint error too: lint runs before rendering and fails the run.
    let err = try_render(py, MINIMAL, &["--lint", "--set-json", "replicas=\"3\""]).unwrap_err();
    assert!(err.contains("lint: [ERROR]") && err.contains("lint failed"), "{err}");
}

/// Every coordinator setting is either written by the chart, offered in `config` (typed in the schema), or
/// listed as not offered; and each `config` key's schema example passes the coordinator's validation.
#[test]
fn config_keys_match_the_coordinators_settings() {
    let settings: BTreeSet<String> = <Settings as clap::Args>::augment_args(clap::Command::new("probe"))
        .get_arguments()
        .map(|a| a.get_id().as_str().to_string())
        .collect();
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart_dir().join("values.schema.json")).unwrap()).unwrap();
    let offered = schema["properties"]["config"]["properties"].as_object().unwrap();
    for key in &settings {
        assert!(
            CHART_MANAGED_KEYS.contains(&key.as_str())
                || NOT_IN_CHART.contains(&key.as_str())
                || offered.contains_key(key),
            "coordinator setting `{key}` is unknown to the chart: add it to config in values.schema.json (typed, with an example) and the chart README, or render it from a value"
        );
    }
    for key in offered
        .keys()
        .map(String::as_str)
        .chain(CHART_MANAGED_KEYS.iter().copied())
    {
        assert!(
            settings.contains(key),
            "the chart renders `{key}`, which the coordinator does not know"
        );
    }

    let Some(py) = python() else { return };
    let examples: serde_json::Map<String, Value> = offered
        .iter()
        .map(|(k, v)| (k.clone(), array(&v["examples"])[0].clone()))
        .collect();
    let set = format!("config={}", Value::Object(examples.clone()));
    let docs = try_render(py, MINIMAL, &["--set-json", &set]).unwrap_or_else(|e| panic!("{set}: {e}"));
    let (_, toml_text, _) = validated_pod(&docs, 0);
    let table = toml_table(&toml_text);
    for (k, example) in &examples {
        let rendered = serde_json::to_value(&table[k.as_str()]).unwrap();
        assert_eq!(&rendered, example, "config.{k} is written as given");
    }
}

#[test]
fn tun_from_a_device_plugin_and_other_service_types() {
    let Some(py) = python() else { return };
    let docs = try_render(
        py,
        MINIMAL,
        &[
            "--set-json",
            "tun.resourceName=\"squat.ai/tun\"",
            "--set-json",
            "service.type=\"NodePort\"",
        ],
    )
    .unwrap();
    let sts = find(&docs, "StatefulSet", FULLNAME);
    let c = container(sts);
    assert_eq!(c["resources"]["limits"]["squat.ai/tun"], "1");
    assert_eq!(c["resources"]["limits"]["memory"], "512Mi", "the other limits stay");
    assert!(
        array(&sts["spec"]["template"]["spec"]["volumes"])
            .iter()
            .all(|v| v["hostPath"].is_null()),
        "no hostPath with a device plugin"
    );
    // NodePort: agents dial the listen port, so the node port is that port.
    let svc = find(&docs, "Service", &format!("{FULLNAME}-0"));
    for p in array(&svc["spec"]["ports"]) {
        assert_eq!(p["nodePort"], p["port"], "{p}");
    }

    let docs = try_render(
        py,
        MINIMAL,
        &[
            "--set-json",
            "service.type=\"ClusterIP\"",
            "--set-json",
            "listenAddress=\"::\"",
        ],
    )
    .unwrap();
    let svc = find(&docs, "Service", &format!("{FULLNAME}-0"));
    assert!(
        svc["spec"]["externalTrafficPolicy"].is_null(),
        "ClusterIP takes no externalTrafficPolicy"
    );
    let (_, _, config) = validated_pod(&docs, 0);
    assert_eq!(config.enroll_listen.to_string(), "[::]:7443");
    assert_eq!(config.metrics_listen.map(|a| a.to_string()), Some("[::]:9464".into()));
}

/// The installer is shellcheck-clean (deploy/helm/*.sh is not covered by the other script tests).
#[test]
fn install_renderer_is_shellcheck_clean() {
    let script = workspace_dir().join("deploy/helm/install-renderer.sh");
    if Command::new("shellcheck").arg("--version").output().is_err() {
        if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v.trim() == "1") {
            panic!("shellcheck is not installed ({REQUIRE_ROOT_ENV}=1 is set): apt-get install shellcheck");
        }
        eprintln!("SKIPPED: shellcheck is not installed (apt-get install shellcheck)");
        return;
    }
    let out = e2e::run_with_timeout(Command::new("shellcheck").arg(&script), RENDER_TIMEOUT).unwrap();
    assert!(
        out.status.success(),
        "shellcheck {}:\n{}",
        script.display(),
        text(&out.stdout)
    );
}
