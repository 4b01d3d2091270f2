//! Behaviour of the renderers: encodings round-trip, limits hold, hostile values are refused, secrets are
//! marked and never leak into messages.
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed assertion

mod common;

use std::collections::BTreeMap;

use base64::Engine;
use bootstrap::azure::{self, CUSTOM_DATA_MAX_BYTES};
use bootstrap::ipxe::{self, BareMetalHost, NoCloudDatasource};
use bootstrap::opennebula::{self, ContextMode};
use bootstrap::shell::{self, ScriptKind};
use bootstrap::{Artefact, BootstrapError, BootstrapSpec, PackageKind, cloud_init, vmware};
use common::{RELEASE_ROOT, TOKEN, ipxe_spec, spec, spec_with_root};

fn b64d(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap()
}

fn text(a: &Artefact, name: &str) -> String {
    String::from_utf8(a.file(name).unwrap_or_else(|| panic!("no {name} in {a:?}")).to_vec()).unwrap()
}

/// `KEY = "VALUE"` → VALUE, from OpenNebula or .vmx text.
fn attr(doc: &str, key: &str) -> String {
    doc.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key} = \"")))
        .map(|rest| rest[..rest.find('"').unwrap()].to_string())
        .unwrap_or_else(|| panic!("no {key} in:\n{doc}"))
}

#[test]
fn azure_custom_data_is_the_cloud_config_in_base64() {
    let s = spec(PackageKind::Deb);
    let a = azure::render(&s).unwrap();
    let decoded = b64d(&text(&a, azure::CUSTOM_DATA_FILE));
    assert_eq!(decoded, cloud_init::cloud_config(&s).unwrap().as_bytes());
    assert_eq!(a.secret_files, vec![azure::CUSTOM_DATA_FILE.to_string()]);
}

#[test]
fn azure_limit_is_checked_on_the_payload_before_base64() {
    let s = spec(PackageKind::Deb);
    // The multipart message grows byte for byte with a 7bit user script: find the script size that makes it
    // exactly 65 535 bytes.
    let script_of = |n: usize| {
        let mut body = String::from("#!/bin/sh\n");
        while body.len() < n {
            let line = format!("# {}\n", "x".repeat((n - body.len()).saturating_sub(3).min(90)));
            body.push_str(&line);
        }
        body.truncate(n);
        if !body.ends_with('\n') {
            body.pop();
            body.push('\n');
        }
        body
    };
    let cc = cloud_init::cloud_config(&s).unwrap();
    let size = |n: usize| {
        let body = script_of(n);
        cloud_init::multipart(cc.as_bytes(), &[("big.sh", "text/x-shellscript", body.as_bytes())])
            .unwrap()
            .len()
    };
    let overhead = size(100) - 100;
    let n = CUSTOM_DATA_MAX_BYTES - overhead;
    assert_eq!(size(n), CUSTOM_DATA_MAX_BYTES);

    let at_limit = script_of(n);
    let a = azure::render_multipart(&s, &[("big.sh", "text/x-shellscript", at_limit.as_bytes())]).unwrap();
    let encoded = text(&a, azure::CUSTOM_DATA_FILE);
    assert_eq!(b64d(&encoded).len(), CUSTOM_DATA_MAX_BYTES);
    assert_eq!(encoded.len(), 87_380);

    let over = script_of(n + 1);
    let e = azure::render_multipart(&s, &[("big.sh", "text/x-shellscript", over.as_bytes())]).unwrap_err();
    assert!(
        matches!(
            e,
            BootstrapError::TooLarge {
                size: 65_536,
                limit: 65_535,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("user scripts"),
        "the message says what to do: {e}"
    );
}

#[test]
fn vmware_keys_round_trip() {
    let s = spec(PackageKind::Binary);
    let a = vmware::render(&s).unwrap();
    let vmx = text(&a, vmware::VMX_FILE);
    let json: BTreeMap<String, String> = serde_json::from_str(&text(&a, vmware::JSON_FILE)).unwrap();
    assert_eq!(json, vmware::guestinfo(&s).unwrap());
    for (k, v) in &json {
        assert_eq!(&attr(&vmx, k), v, "{k}: the .vmx and JSON renderings differ");
    }
    assert_eq!(json["guestinfo.userdata.encoding"], "base64");
    assert_eq!(json["guestinfo.metadata.encoding"], "base64");
    assert_eq!(
        b64d(&json["guestinfo.userdata"]),
        cloud_init::cloud_config(&s).unwrap().as_bytes()
    );
    let md: serde_json::Value = serde_json::from_slice(&b64d(&json["guestinfo.metadata"])).unwrap();
    assert_eq!(md["instance-id"], "iid-nimbus-abcdefghij");
    assert_eq!(md["local-hostname"], "edge-1");
    assert_eq!(md["redact"], serde_json::json!(["userdata"]));

    // Without a node name there is no local-hostname (cloud-init keeps the platform's).
    let mut unnamed = s.clone();
    unnamed.node_name = None;
    let g = vmware::guestinfo(&unnamed).unwrap();
    let md: serde_json::Value = serde_json::from_slice(&b64d(&g["guestinfo.metadata"])).unwrap();
    assert!(md.get("local-hostname").is_none());
}

#[test]
fn opennebula_context_round_trips() {
    let s = spec(PackageKind::Deb);
    let start = text(
        &opennebula::render(&s, ContextMode::StartScript).unwrap(),
        opennebula::CONTEXT_FILE,
    );
    assert!(start.contains("CONTEXT = [\n"), "{start}");
    assert!(start.trim_end().ends_with(" ]"), "{start}");
    assert_eq!(attr(&start, "NETWORK"), "YES");
    assert_eq!(attr(&start, "SET_HOSTNAME"), "edge-1");
    assert_eq!(
        b64d(&attr(&start, "START_SCRIPT_BASE64")),
        shell::install_script(&s, ScriptKind::Standalone).unwrap().as_bytes()
    );
    assert!(!start.contains("USER_DATA"));
    assert!(!start.contains("TOKEN ="), "OneGate's TOKEN is not ours to set");

    let ci = text(
        &opennebula::render(&s, ContextMode::CloudInit).unwrap(),
        opennebula::CONTEXT_FILE,
    );
    assert_eq!(attr(&ci, "USERDATA_ENCODING"), "base64");
    assert_eq!(
        b64d(&attr(&ci, "USER_DATA")),
        cloud_init::cloud_config(&s).unwrap().as_bytes()
    );
    assert!(!ci.contains("START_SCRIPT"));

    let mut unnamed = s.clone();
    unnamed.node_name = None;
    let doc = text(
        &opennebula::render(&unnamed, ContextMode::StartScript).unwrap(),
        opennebula::CONTEXT_FILE,
    );
    assert!(!doc.contains("SET_HOSTNAME"));
}

/// Splits a MIME message the simple way: top headers, boundary, parts (headers, body).
fn parse_multipart(msg: &[u8]) -> Vec<(BTreeMap<String, String>, Vec<u8>)> {
    let msg = std::str::from_utf8(msg).unwrap();
    let (top, rest) = msg.split_once("\n\n").unwrap();
    let ct = top.lines().find_map(|l| l.strip_prefix("Content-Type: ")).unwrap();
    assert!(ct.starts_with("multipart/mixed; boundary=\""), "{ct}");
    assert!(top.contains("MIME-Version: 1.0"));
    let boundary = ct.split('"').nth(1).unwrap();
    let delimiter = format!("--{boundary}");
    assert!(rest.starts_with(&delimiter));
    assert!(rest.ends_with(&format!("\n--{boundary}--\n")), "closing delimiter");
    let inner = &rest[delimiter.len()..rest.len() - format!("\n--{boundary}--\n").len()];
    inner
        .split(&format!("\n{delimiter}"))
        .map(|part| {
            let part = part.strip_prefix('\n').unwrap();
            let (head, body) = part.split_once("\n\n").unwrap();
            let headers: BTreeMap<String, String> = head
                .lines()
                .map(|l| {
                    let (k, v) = l.split_once(": ").unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            let body = match headers["Content-Transfer-Encoding"].as_str() {
                "7bit" => body.as_bytes().to_vec(),
                "base64" => {
                    assert!(body.lines().all(|l| l.len() <= 76));
                    b64d(&body.replace('\n', ""))
                }
                other => panic!("unexpected encoding {other}"),
            };
            (headers, body)
        })
        .collect()
}

#[test]
fn multipart_parses_back() {
    let s = spec(PackageKind::Deb);
    let cc = cloud_init::cloud_config(&s).unwrap();
    let binary: Vec<u8> = (0u8..=255).collect();
    let scripts: [(&str, &str, &[u8]); 3] = [
        (
            "10-tune.sh",
            "text/x-shellscript",
            b"#!/bin/sh\nsysctl -w vm.swappiness=10\n",
        ),
        ("no-newline.sh", "text/x-shellscript", b"#!/bin/sh\ntrue"),
        ("blob.bin", "application/octet-stream", &binary),
    ];
    let a = cloud_init::render_multipart(&s, &scripts).unwrap();
    let parts = parse_multipart(a.file(cloud_init::MULTIPART_FILE).unwrap());
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[0].0["Content-Type"], "text/cloud-config; charset=\"utf-8\"");
    assert_eq!(
        parts[0].0["Content-Disposition"],
        "attachment; filename=\"cloud-config.yaml\""
    );
    assert_eq!(parts[0].1, cc.as_bytes());
    for (i, (name, ct, body)) in scripts.iter().enumerate() {
        let (h, b) = &parts[i + 1];
        assert_eq!(&h["Content-Type"], ct);
        assert_eq!(h["Content-Disposition"], format!("attachment; filename=\"{name}\""));
        assert_eq!(h["MIME-Version"], "1.0");
        assert_eq!(b, body, "{name}");
    }
    assert_eq!(parts[3].0["Content-Transfer-Encoding"], "base64");
    assert_eq!(a.secret_files, vec![cloud_init::MULTIPART_FILE.to_string()]);
}

/// Every renderer with `s`.
fn all_renderings(s: &BootstrapSpec) -> Vec<Result<Artefact, BootstrapError>> {
    let script: [(&str, &str, &[u8]); 1] = [("a.sh", "text/x-shellscript", b"#!/bin/sh\n")];
    vec![
        cloud_init::render(s),
        cloud_init::render_multipart(s, &script),
        azure::render(s),
        opennebula::render(s, ContextMode::StartScript),
        opennebula::render(s, ContextMode::CloudInit),
        vmware::render(s),
        shell::render(s),
        cloud_init::cloud_config(s).map(|_| Artefact::default()),
        shell::install_script(s, ScriptKind::InstallOnly).map(|_| Artefact::default()),
        vmware::guestinfo(s).map(|_| Artefact::default()),
        ipxe::render(s, &ipxe_spec()).map(|_| Artefact::default()),
    ]
}

#[test]
fn hostile_values_are_refused_everywhere() {
    type Mutation = fn(&mut BootstrapSpec, &str);
    let fields: [(&str, Mutation); 8] = [
        ("coordinator", |s, v| s.coordinator = format!("coord{v}:7443")),
        ("ca_pin", |s, v| s.ca_pin = format!("{}{v}", s.ca_pin)),
        ("token", |s, v| s.token = format!("{}{v}", s.token)),
        ("token_expiry", |s, v| s.token_expiry = format!("soon{v}")),
        ("node_name", |s, v| s.node_name = Some(format!("edge{v}"))),
        ("package.url", |s, v| s.package.url = format!("{}{v}", s.package.url)),
        ("package.sha256", |s, v| {
            s.package.sha256 = format!("{}{v}", s.package.sha256)
        }),
        ("state_dir", |s, v| s.state_dir = Some(format!("/var/lib/nimbus{v}"))),
    ];
    let hostile = ["\n", "\r", "\0", "'\n; reboot #", "\u{1b}[2J"];
    // Shell/URL metacharacters: refused where they cannot be part of the value (all but free text).
    let metachars = ["$(reboot)", "`reboot`", "'", "\"", " x", "\\", "${IFS}"];
    for (field, mutate) in fields {
        let values: Vec<&str> = if field == "token_expiry" {
            hostile.to_vec()
        } else {
            hostile.iter().chain(metachars.iter()).copied().collect()
        };
        for v in values {
            let mut s = spec(PackageKind::Deb);
            mutate(&mut s, v);
            for (i, r) in all_renderings(&s).into_iter().enumerate() {
                match r {
                    Err(BootstrapError::Invalid { field: f, problem }) => {
                        // iPXE renders per host: the base spec's token and node name are replaced.
                        if i == 10 && (field == "token" || field == "node_name") {
                            continue;
                        }
                        assert_eq!(f, field, "{v:?} in {field} (renderer {i}): {problem}");
                        assert!(!problem.contains(TOKEN), "the message leaks the token: {problem}");
                    }
                    Err(other) => panic!("{field} = …{v:?}: unexpected {other:?}"),
                    Ok(_) if i == 10 && (field == "token" || field == "node_name") => {}
                    Ok(_) => panic!("{field} = …{v:?} was accepted by renderer {i}"),
                }
            }
        }
    }
    // Free text may hold shell metacharacters: it only ever lands in comments and notes.
    let mut s = spec(PackageKind::Deb);
    s.token_expiry = "$(reboot) `x` 'y' \"z\" \\".into();
    for r in all_renderings(&s) {
        r.unwrap();
    }
}

#[test]
fn credentials_in_urls_are_refused() {
    let mut s = spec(PackageKind::Deb);
    s.package.url = "https://user:secret@mirror.example.net/nimbus-agent.deb".into();
    let e = cloud_init::render(&s).unwrap_err().to_string();
    assert!(e.contains("only secret"), "{e}");
}

#[test]
fn the_token_never_leaks_into_debug_or_errors() {
    let s = spec(PackageKind::Deb);
    let dbg = format!("{s:?}");
    assert!(!dbg.contains(TOKEN) && dbg.contains("<redacted>"), "{dbg}");
    let a = cloud_init::render(&s).unwrap();
    assert!(!format!("{a:?}").contains("0123456789abcdefghijklmnopqrstuv"));
    let host = &ipxe_spec().hosts[0];
    assert!(!format!("{host:?}").contains(&host.token));

    // Errors about everything else do not carry it either.
    let mut bad = s.clone();
    bad.coordinator = "nope".into();
    assert!(!cloud_init::render(&bad).unwrap_err().to_string().contains(TOKEN));
}

/// Whether `content` holds `token`, as is or inside a base64 run.
fn holds(content: &[u8], token: &str) -> bool {
    let t = token.as_bytes();
    if content.windows(t.len()).any(|w| w == t) {
        return true;
    }
    let text = String::from_utf8_lossy(content);
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=".contains(c)))
        .filter(|run| run.len() >= 40)
        .filter_map(|run| base64::engine::general_purpose::STANDARD.decode(run).ok())
        .any(|d| holds(&d, token))
}

#[test]
fn secret_files_are_exactly_the_files_holding_a_token() {
    let mut artefacts = Vec::new();
    for s in [spec(PackageKind::Deb), spec_with_root(PackageKind::Deb)] {
        artefacts.extend(all_renderings(&s).into_iter().map(Result::unwrap));
        artefacts.push(ipxe::render(&s, &ipxe_spec()).unwrap());
    }
    let tokens = [common::TOKEN, common::TOKEN_B, common::TOKEN_C];
    for a in artefacts {
        for (name, content) in &a.files {
            let secret = tokens.iter().any(|t| holds(content, t));
            assert_eq!(
                a.secret_files.contains(name),
                secret,
                "{name}: holds a token = {secret}, but secret_files = {:?}",
                a.secret_files
            );
            if secret {
                assert!(
                    a.notes.iter().any(|n| n.contains("single-use join token")),
                    "{name}: the notes must say a token is inside"
                );
                let body = String::from_utf8_lossy(content);
                let says_so = body.contains("SECRET") || body.lines().all(|l| !l.starts_with('#'));
                assert!(says_so, "{name}: a file with comments must say it holds the token");
            }
        }
    }
}

#[test]
fn agent_config_is_toml_the_agent_reads() {
    let mut s = spec(PackageKind::Deb);
    s.state_dir = Some("/srv/nimbus".into());
    let cc = cloud_init::cloud_config(&s).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&cc).unwrap();
    let files = doc["write_files"].as_sequence().unwrap();
    let by_path = |p: &str| {
        files
            .iter()
            .find(|f| f["path"].as_str() == Some(p))
            .unwrap_or_else(|| panic!("no {p}"))
    };
    let config = by_path("/etc/nimbus/agent.toml");
    assert_eq!(config["permissions"].as_str(), Some("0644"));
    let toml: toml::Table = toml::from_str(config["content"].as_str().unwrap()).unwrap();
    let mut keys: Vec<&str> = toml.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["ca_pin", "coordinator", "node_name", "state_dir", "token_file"]);
    let with_root = cloud_init::cloud_config(&BootstrapSpec {
        release_root: Some(RELEASE_ROOT.into()),
        ..s.clone()
    })
    .unwrap();
    assert_eq!(
        config_release_root(with_root.as_bytes()).as_deref(),
        Some("/etc/nimbus/release-root.json")
    );
    assert_eq!(toml["coordinator"].as_str(), Some("coord.example.net:7443"));
    assert_eq!(toml["token_file"].as_str(), Some("/etc/nimbus/join-token"));
    assert_eq!(toml["state_dir"].as_str(), Some("/srv/nimbus"));
    assert!(!config["content"].as_str().unwrap().contains(TOKEN));

    let token = by_path("/etc/nimbus/join-token");
    assert_eq!(token["permissions"].as_str(), Some("0600"));
    assert_eq!(token["owner"].as_str(), Some("root:root"));
    assert_eq!(token["content"].as_str(), Some(format!("{TOKEN}\n").as_str()));

    let script = by_path("/var/lib/nimbus-bootstrap/install-agent.sh");
    assert_eq!(
        script["content"].as_str().unwrap(),
        shell::install_script(&s, ScriptKind::InstallOnly).unwrap()
    );
    assert!(!script["content"].as_str().unwrap().contains(TOKEN));
    assert_eq!(
        doc["runcmd"],
        serde_norway::from_str::<serde_norway::Value>("[[sh, /var/lib/nimbus-bootstrap/install-agent.sh]]").unwrap()
    );
}

#[test]
fn install_script_per_kind() {
    for (kind, install, gone) in [
        (PackageKind::Deb, "dpkg -i \"$pkg\"", ["rpm -U", "install -m 0755"]),
        (
            PackageKind::Rpm,
            "rpm -U --replacepkgs --oldpackage \"$pkg\"",
            ["dpkg -i", "install -m 0755"],
        ),
        (
            PackageKind::Binary,
            "install -m 0755 \"$pkg\" \"$agent_bin\"",
            ["dpkg -i", "rpm -U"],
        ),
    ] {
        let s = spec(kind);
        let script = shell::install_script(&s, ScriptKind::InstallOnly).unwrap();
        assert!(script.contains(install), "{kind:?}");
        for g in gone {
            assert!(!script.contains(g), "{kind:?} script has {g}");
        }
        for needed in [
            "set -eu",
            "curl --fail --silent --show-error --location --retry 5",
            "sha256sum -c -",
            "systemctl daemon-reload",
            "systemctl enable --now",
            "Environment=NIMBUS_CONFIG=/etc/nimbus/agent.toml",
        ] {
            assert!(script.contains(needed), "{kind:?} script lacks {needed}");
        }
        assert_eq!(
            script.contains("ExecStart=/usr/local/bin/nimbus-agent"),
            kind == PackageKind::Binary
        );
        assert!(!script.contains(TOKEN));
        let standalone = shell::install_script(&s, ScriptKind::Standalone).unwrap();
        assert!(standalone.contains(&format!(
            "put '/etc/nimbus/join-token' 0600 <<'NIMBUS_EOF'\n{TOKEN}\nNIMBUS_EOF\n"
        )));
    }
}

#[test]
fn notes_flag_plain_http() {
    let mut s = spec(PackageKind::Deb);
    assert!(
        !cloud_init::render(&s)
            .unwrap()
            .notes
            .iter()
            .any(|n| n.contains("plain http"))
    );
    s.package.url = "http://coord.example.net:8080/nimbus-agent.deb".into();
    let notes = cloud_init::render(&s).unwrap().notes;
    assert!(
        notes.iter().any(|n| n.contains("plain http") && n.contains("SHA-256")),
        "{notes:?}"
    );
    assert!(notes[0].contains("valid until 2026-05-01T12:00:00Z"), "{notes:?}");

    let mut i = ipxe_spec();
    i.seed_base_url = "http://coord.example.net:8080/seed".into();
    let notes = ipxe::render(&spec(PackageKind::Deb), &i).unwrap().notes;
    assert!(
        notes.iter().any(|n| n.contains("seeds are served over plain http")),
        "{notes:?}"
    );
}

#[test]
fn ipxe_script_structure() {
    let a = ipxe::render(&spec(PackageKind::Deb), &ipxe_spec()).unwrap();
    let script = text(&a, ipxe::SCRIPT_FILE);
    assert!(script.starts_with("#!ipxe\n"));
    let lines: Vec<&str> = script.lines().collect();
    let first_label = lines.iter().position(|l| l.starts_with(':')).unwrap();
    let last_iseq = lines.iter().rposition(|l| l.starts_with("iseq ")).unwrap();
    let exit = lines.iter().position(|l| *l == "exit 1").unwrap();
    // The default branch sits between the comparisons and the first machine: a MAC that matched nothing
    // reaches `exit` before any kernel line.
    assert!(last_iseq < exit && exit < first_label, "{script}");
    assert!(
        lines[last_iseq..exit]
            .iter()
            .all(|l| !l.starts_with("kernel") && !l.starts_with("boot"))
    );
    assert!(
        lines[last_iseq..exit].iter().any(|l| l.starts_with("echo ")),
        "the default branch says why"
    );
    for (mac, label) in [
        ("52:54:00:12:34:56", "nimbus_525400123456"),
        ("52:54:00:ab:cd:ef", "nimbus_525400abcdef"),
    ] {
        assert!(
            lines.contains(&format!("iseq ${{netX/mac}} {mac} && goto {label} ||").as_str()),
            "{script}"
        );
        let at = lines.iter().position(|l| *l == format!(":{label}")).unwrap();
        let branch = &lines[at..];
        let kernel = branch.iter().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(
            kernel.contains(&format!("ds=nocloud-net;s=https://coord.example.net:7443/seed/{mac}/")),
            "{kernel}"
        );
        assert!(kernel.ends_with("ip=dhcp console=ttyS0,115200n8"), "{kernel}");
        assert!(branch.iter().any(|l| l.starts_with("initrd --name initrd https://")));
        assert!(
            branch.iter().take_while(|l| **l != "boot").count() < branch.len(),
            "a boot line follows"
        );

        let meta: serde_norway::Value =
            serde_norway::from_slice(a.file(&format!("seeds/{mac}/meta-data")).unwrap()).unwrap();
        assert_eq!(
            meta["instance-id"].as_str().unwrap(),
            format!("iid-nimbus-{}", mac.replace(':', ""))
        );
        let user = text(&a, &format!("seeds/{mac}/user-data"));
        assert!(user.starts_with("#cloud-config\n"));
        assert!(a.secret_files.contains(&format!("seeds/{mac}/user-data")));
    }
    assert!(!script.contains("nimbus1."), "the script holds no token");
    // Each machine's seed has its own token and node name.
    let one = text(&a, "seeds/52:54:00:12:34:56/user-data");
    assert!(one.contains(common::TOKEN_B) && !one.contains(common::TOKEN_C) && one.contains("rack1-node1"));

    let mut i = ipxe_spec();
    i.datasource = NoCloudDatasource::Nocloud;
    let s2 = text(&ipxe::render(&spec(PackageKind::Deb), &i).unwrap(), ipxe::SCRIPT_FILE);
    assert!(s2.contains(" ds=nocloud;s=https://") && !s2.contains("nocloud-net"));
}

#[test]
fn ipxe_refuses_bad_machines_and_arguments() {
    let base = spec(PackageKind::Deb);
    let host = |mac: &str, name: &str, token: &str| BareMetalHost {
        mac: mac.into(),
        node_name: name.into(),
        token: token.into(),
    };
    let with_hosts = |hosts: Vec<BareMetalHost>| {
        let mut i = ipxe_spec();
        i.hosts = hosts;
        ipxe::render(&base, &i)
    };
    let field_of = |r: Result<Artefact, BootstrapError>| match r {
        Err(BootstrapError::Invalid { field, .. }) => field,
        other => panic!("expected a refusal, got {other:?}"),
    };
    for mac in [
        "52:54:00:12:34",
        "52:54:00:12:34:5g",
        "52:54:00:12:34:56:78",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
        "01:00:5e:00:00:01",
        "52:54:00:12:34:56 && goto x",
        "${net0/mac}",
        "",
    ] {
        assert_eq!(
            field_of(with_hosts(vec![host(mac, "n1", common::TOKEN_B)])),
            "hosts[0].mac",
            "{mac:?}"
        );
    }
    assert_eq!(field_of(with_hosts(vec![])), "hosts");
    assert_eq!(
        field_of(with_hosts(vec![
            host("52:54:00:12:34:56", "n1", common::TOKEN_B),
            host("52-54-00-12-34-56", "n2", common::TOKEN_C),
        ])),
        "hosts[1].mac",
        "the same MAC in another notation is a duplicate"
    );
    assert_eq!(
        field_of(with_hosts(vec![
            host("52:54:00:12:34:56", "n1", common::TOKEN_B),
            host("52:54:00:12:34:57", "n1", common::TOKEN_C),
        ])),
        "hosts[1].node_name"
    );
    assert_eq!(
        field_of(with_hosts(vec![host("52:54:00:12:34:56", "N_1", common::TOKEN_B)])),
        "hosts[0].node_name"
    );
    let e = with_hosts(vec![host("52:54:00:12:34:56", "n1", "nimbus1.short.secretsecret")]).unwrap_err();
    assert!(
        matches!(&e, BootstrapError::Invalid { field, .. } if field == "hosts[0].token"),
        "{e:?}"
    );
    assert!(!e.to_string().contains("secretsecret"));

    for (arg, why) in [
        ("", "empty"),
        ("a b", "space"),
        ("${root}", "expansion"),
        ("#x", "comment"),
        ("&&", "operator"),
        ("||", "operator"),
        (";", "separator"),
        ("ds=nocloud", "ours"),
        ("initrd=other", "ours"),
        ("quiet\n", "newline"),
        ("'q'", "quote"),
    ] {
        let mut i = ipxe_spec();
        i.kernel_args = vec!["ip=dhcp".into(), arg.into()];
        assert_eq!(field_of(ipxe::render(&base, &i)), "kernel_args[1]", "{why}: {arg:?}");
    }
    for (field, set) in [
        (
            "kernel_url",
            (|i: &mut ipxe::IpxeSpec| i.kernel_url = "https://b/${x}".into()) as fn(&mut ipxe::IpxeSpec),
        ),
        ("initrd_url", |i| i.initrd_url = "tftp://b/initrd".into()),
        ("seed_base_url", |i| i.seed_base_url = "https://c/seed?x=1".into()),
        ("seed_base_url", |i| i.seed_base_url = "https://c/seed;x".into()),
    ] {
        let mut i = ipxe_spec();
        set(&mut i);
        assert_eq!(field_of(ipxe::render(&base, &i)), field);
    }
}

#[test]
fn rendering_is_deterministic() {
    let s = spec(PackageKind::Rpm);
    let a: Vec<Artefact> = all_renderings(&s).into_iter().map(Result::unwrap).collect();
    let b: Vec<Artefact> = all_renderings(&s).into_iter().map(Result::unwrap).collect();
    assert!(a == b);
    assert_eq!(
        ipxe::render(&s, &ipxe_spec()).unwrap(),
        ipxe::render(&s, &ipxe_spec()).unwrap()
    );
}

// ---- The pinned release root ------------------------------------------------------------------------------

/// The `write_files` entry for `path` in a cloud-config, if any.
fn write_file(cloud_config: &[u8], path: &str) -> Option<serde_norway::Value> {
    let doc: serde_norway::Value = serde_norway::from_slice(cloud_config).unwrap();
    doc["write_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str() == Some(path))
        .cloned()
}

/// The `release_root` key of the agent configuration in a cloud-config.
fn config_release_root(cloud_config: &[u8]) -> Option<String> {
    let config = write_file(cloud_config, "/etc/nimbus/agent.toml").unwrap();
    let toml: toml::Table = toml::from_str(config["content"].as_str().unwrap()).unwrap();
    toml.get("release_root").map(|v| v.as_str().unwrap().to_string())
}

/// Every cloud-config a spec's artefacts carry (decoded), by a descriptive name.
fn cloud_configs_of(s: &BootstrapSpec) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![(
        "cloud-init".to_string(),
        text(&cloud_init::render(s).unwrap(), cloud_init::USER_DATA_FILE).into_bytes(),
    )];
    out.push((
        "azure".into(),
        b64d(&text(&azure::render(s).unwrap(), azure::CUSTOM_DATA_FILE)),
    ));
    out.push((
        "vmware".into(),
        b64d(&vmware::guestinfo(s).unwrap()["guestinfo.userdata"]),
    ));
    let one = text(
        &opennebula::render(s, ContextMode::CloudInit).unwrap(),
        opennebula::CONTEXT_FILE,
    );
    out.push(("opennebula".into(), b64d(&attr(&one, "USER_DATA"))));
    let bare = ipxe::render(s, &ipxe_spec()).unwrap();
    for (name, contents) in &bare.files {
        if name.ends_with("/user-data") {
            out.push((format!("ipxe {name}"), contents.clone()));
        }
    }
    out
}

/// Every install script a spec's artefacts carry that writes the configuration itself.
fn standalone_scripts_of(s: &BootstrapSpec) -> Vec<(String, String)> {
    let one = text(
        &opennebula::render(s, ContextMode::StartScript).unwrap(),
        opennebula::CONTEXT_FILE,
    );
    vec![
        ("shell".into(), text(&shell::render(s).unwrap(), shell::SCRIPT_FILE)),
        (
            "opennebula start script".into(),
            String::from_utf8(b64d(&attr(&one, "START_SCRIPT_BASE64"))).unwrap(),
        ),
    ]
}

#[test]
fn the_release_root_lands_in_every_artefact() {
    let s = spec_with_root(PackageKind::Deb);
    for (name, cc) in cloud_configs_of(&s) {
        let f = write_file(&cc, "/etc/nimbus/release-root.json").unwrap_or_else(|| panic!("{name}: no release root"));
        assert_eq!(f["content"].as_str(), Some(RELEASE_ROOT), "{name}: byte for byte");
        assert_eq!(f["permissions"].as_str(), Some("0644"), "{name}");
        assert_eq!(f["owner"].as_str(), Some("root:root"), "{name}");
        assert_eq!(
            config_release_root(&cc).as_deref(),
            Some("/etc/nimbus/release-root.json"),
            "{name}: the agent configuration points at it"
        );
    }
    let put = format!("put '/etc/nimbus/release-root.json' 0644 <<'NIMBUS_EOF'\n{RELEASE_ROOT}NIMBUS_EOF\n");
    for (name, script) in standalone_scripts_of(&s) {
        assert!(script.contains(&put), "{name}: {script}");
        assert!(
            script.contains("release_root = \"/etc/nimbus/release-root.json\""),
            "{name}"
        );
    }
    // cloud-init's write_files installs it; the script runcmd runs does not write it again.
    let install_only = shell::install_script(&s, ScriptKind::InstallOnly).unwrap();
    assert!(!install_only.contains("release-root.json"), "{install_only}");

    // Every artefact tells the operator.
    let mut all: Vec<Artefact> = all_renderings(&s).into_iter().take(7).map(Result::unwrap).collect();
    all.push(ipxe::render(&s, &ipxe_spec()).unwrap());
    for a in all {
        assert!(
            a.notes.iter().any(
                |n| n.contains("agents will only accept releases signed under this root") && n.contains("version 1")
            ),
            "{:?}",
            a.notes
        );
    }
}

#[test]
fn without_a_release_root_nothing_is_pinned_and_the_notes_say_so() {
    let s = spec(PackageKind::Deb);
    for (name, cc) in cloud_configs_of(&s) {
        assert!(write_file(&cc, "/etc/nimbus/release-root.json").is_none(), "{name}");
        assert_eq!(config_release_root(&cc), None, "{name}");
    }
    for (name, script) in standalone_scripts_of(&s) {
        assert!(
            !script.contains("release-root") && !script.contains("release_root"),
            "{name}"
        );
    }
    let notes = cloud_init::render(&s).unwrap().notes;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("no agent release root is pinned") && n.contains("--release-root")),
        "{notes:?}"
    );
}

#[test]
fn the_release_root_is_public_not_secret() {
    let s = spec_with_root(PackageKind::Deb);
    let dbg = format!("{s:?}");
    assert!(
        !dbg.contains("ed25519") && dbg.contains("bytes"),
        "Debug prints its size only: {dbg}"
    );
    // The root alone does not make a file secret: the iPXE script and meta-data stay public.
    let a = ipxe::render(&s, &ipxe_spec()).unwrap();
    assert!(!a.secret_files.contains(&ipxe::SCRIPT_FILE.to_string()));
    assert!(!text(&a, ipxe::SCRIPT_FILE).contains("release"));
}

#[test]
fn bad_release_roots_are_refused_by_every_renderer() {
    let timestamp = RELEASE_ROOT.replacen("\"_type\": \"root\"", "\"_type\": \"timestamp\"", 1);
    assert_ne!(timestamp, RELEASE_ROOT);
    let unsigned = r#"{"signed": {"_type": "root"}, "signatures": []}"#;
    let huge = RELEASE_ROOT.replacen(
        "\"_type\"",
        &format!("\"pad\": \"{}\", \"_type\"", "a".repeat(66_000)),
        1,
    );
    for (bad, why) in [
        ("", "empty"),
        ("not json", "not valid JSON"),
        ("{\"signed\": {\"_type\": \"root\"}", "not valid JSON"),
        ("[]", "no `signed` object"),
        (timestamp.as_str(), "TUF `timestamp` metadata"),
        (unsigned, "no signatures"),
        (&RELEASE_ROOT.replace('\n', "\r\n"), "CRLF"),
        (huge.as_str(), "over the limit of 65536 bytes"),
    ] {
        let mut s = spec(PackageKind::Deb);
        s.release_root = Some(bad.to_string());
        let mut results = all_renderings(&s);
        results.push(ipxe::render(&s, &ipxe_spec()));
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Err(BootstrapError::Invalid { field, problem }) => {
                    assert_eq!(field, "release_root", "renderer {i}");
                    assert!(problem.contains(why), "renderer {i}: {problem}");
                    assert!(problem.contains("1.root.json"), "says what to give: {problem}");
                    assert!(!problem.contains(TOKEN));
                }
                other => panic!("{why}: renderer {i} gave {other:?}"),
            }
        }
    }
}

#[test]
fn azure_custom_data_fits_a_realistic_release_root() {
    let s = spec_with_root(PackageKind::Deb);
    let a = azure::render(&s).unwrap();
    let payload = b64d(&text(&a, azure::CUSTOM_DATA_FILE));
    // The root is about 2 KiB (one root key, three online keys); the whole cloud-config stays far below the
    // limit, with room for user scripts.
    assert!(RELEASE_ROOT.len() > 2_000, "the fixture is a real root");
    assert!(payload.len() < 16 * 1024, "{} bytes", payload.len());
    assert!(payload.len() + 40_000 < CUSTOM_DATA_MAX_BYTES);
    // Even a root with many more keys fits: 20 keys instead of 4.
    let key = "\"0000000000000000000000000000000000000000000000000000000000000000\": {\"keytype\": \"ed25519\", \
               \"keyval\": {\"public\": \"0000000000000000000000000000000000000000000000000000000000000000\"}, \
               \"scheme\": \"ed25519\"}";
    let mut many = s.clone();
    let keys: Vec<String> = (0..16).map(|i| key.replacen("00", &format!("{i:02}"), 1)).collect();
    many.release_root = Some(RELEASE_ROOT.replacen("\"keys\": {", &format!("\"keys\": {{{},", keys.join(",")), 1));
    assert!(many.release_root.as_ref().unwrap().len() > RELEASE_ROOT.len() + 16 * 150);
    azure::render(&many).unwrap();

    // A (valid) root too large for Azure is refused there, naming what to shrink; other platforms take it.
    let mut big = s.clone();
    big.release_root = Some(RELEASE_ROOT.replacen(
        "\"_type\"",
        &format!("\"pad\": \"{}\", \"_type\"", "a".repeat(63_000)),
        1,
    ));
    cloud_init::render(&big).unwrap();
    let e = azure::render(&big).unwrap_err();
    assert!(matches!(e, BootstrapError::TooLarge { limit: 65_535, .. }), "{e:?}");
    assert!(e.to_string().contains("release root"), "{e}");
}
