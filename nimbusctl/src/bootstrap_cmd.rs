//! `nimbusctl bootstrap render`: mint a join token for the new host (labels from the environment's and pool's
//! match rules in the current policy, so the host lands there), render the platform's artefact with
//! nimbus-bootstrap, and write it to a directory (files holding the token 0600). With `--release-root`, the
//! artefact also pins the agent release root (`releases/repo/metadata/1.root.json`) on the host, so its agent
//! only accepts releases signed under that root. The file is checked before a token is minted.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nimbus_proto::{CreateTokenRequest, GetPolicyRequest};

/// What the operator asked for (from the CLI flags).
#[derive(Debug, Clone)]
pub struct RenderArgs {
    pub platform: Platform,
    pub env: String,
    pub pool: Option<String>,
    pub node_name: Option<String>,
    pub ttl: Duration,
    pub package_url: String,
    pub package_sha256: String,
    pub package_kind: bootstrap::PackageKind,
    pub out: PathBuf,
    /// iPXE: `MAC=NAME` per host.
    pub hosts: Vec<(String, String)>,
    pub kernel_url: Option<String>,
    pub initrd_url: Option<String>,
    pub seed_url: Option<String>,
    pub opennebula_cloud_init: bool,
    /// The release repository's root metadata file to pin on the host (`--release-root`).
    pub release_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Platform {
    Aws,
    Azure,
    Opennebula,
    Vmware,
    Ipxe,
}

/// The enrollment labels that put a node into `env` (and `pool`) under `policy`.
pub fn labels_for(policy: &policy::Policy, env: &str, pool: Option<&str>) -> Result<BTreeMap<String, String>> {
    let Some(e) = policy.environment(env) else {
        let names: Vec<&str> = policy.environments().iter().map(|e| e.name.as_str()).collect();
        bail!(
            "no environment {env:?} in the current policy; it has: {}",
            names.join(", ")
        );
    };
    let mut labels = e.selector.labels.clone();
    if let Some(pool) = pool {
        let Some(p) = policy.pool(pool).filter(|p| p.allows(env)) else {
            bail!("no pool {pool:?} in environment {env:?} of the current policy (see `nimbusctl policy show`)");
        };
        if p.selector.labels.is_empty() {
            bail!(
                "pool {pool:?} selects nodes by hardware, not by enrollment labels: leave out --pool (the coordinator \
                 places the node from its inventory)"
            );
        }
        labels.extend(p.selector.labels.clone());
    }
    Ok(labels)
}

async fn mint(
    c: &mut crate::context::Client,
    args: &RenderArgs,
    labels: &BTreeMap<String, String>,
    bind_mac: Option<&str>,
    what: &str,
) -> Result<(String, String, String, String)> {
    let r = c
        .create_token(CreateTokenRequest {
            ttl_secs: args.ttl.as_secs().max(1),
            uses: 1,
            labels: labels.clone().into_iter().collect(),
            description: format!("bootstrap {what}"),
            bind_mac: bind_mac.unwrap_or_default().to_string(),
            require_acceptance: false,
            auto_accept: false,
        })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let endpoint = r
        .enroll_endpoints
        .first()
        .cloned()
        .context("the coordinator named no enrollment endpoint")?;
    let expiry = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.expires_at_unix));
    Ok((r.token, r.ca_pin, endpoint, format!("single use, until {expiry}")))
}

/// Reads the `--release-root` file (e.g. `releases/repo/metadata/1.root.json`) and checks it is a release
/// root agents can pin (JSON, a signed TUF `root`, at most 64 KiB). Reads no more than that.
pub fn read_release_root(path: &Path) -> Result<String> {
    let limit = bootstrap::release_root::RELEASE_ROOT_MAX_BYTES;
    let f = std::fs::File::open(path).with_context(|| format!("--release-root: reading {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("--release-root: reading {}", path.display()))?;
    if bytes.len() > limit {
        bail!(
            "--release-root {}: over {limit} bytes, too large for a release root; give the repository's root \
             metadata, e.g. releases/repo/metadata/1.root.json",
            path.display()
        );
    }
    let Ok(text) = String::from_utf8(bytes) else {
        bail!(
            "--release-root {}: not UTF-8 text; give the repository's root metadata, e.g. \
             releases/repo/metadata/1.root.json",
            path.display()
        );
    };
    match bootstrap::ReleaseRoot::parse(&text) {
        Ok(_) => Ok(text),
        Err(bootstrap::BootstrapError::Invalid { problem, .. }) => {
            bail!("--release-root {}: {problem}", path.display())
        }
        Err(e) => bail!("--release-root {}: {e}", path.display()),
    }
}

/// The artefact of one (non-iPXE) platform for `spec`.
pub fn render_platform(
    platform: Platform,
    spec: &bootstrap::BootstrapSpec,
    opennebula_cloud_init: bool,
) -> Result<bootstrap::Artefact> {
    Ok(match platform {
        Platform::Aws => bootstrap::cloud_init::render(spec)?,
        Platform::Azure => bootstrap::azure::render(spec)?,
        Platform::Vmware => bootstrap::vmware::render(spec)?,
        Platform::Opennebula => {
            let mode = if opennebula_cloud_init {
                bootstrap::opennebula::ContextMode::CloudInit
            } else {
                bootstrap::opennebula::ContextMode::StartScript
            };
            bootstrap::opennebula::render(spec, mode)?
        }
        Platform::Ipxe => bail!("iPXE renders one seed per --host: use bootstrap::ipxe::render"),
    })
}

/// Mints the token(s), renders, writes. Returns the artefact (for printing).
pub async fn render(c: &mut crate::context::Client, args: &RenderArgs) -> Result<bootstrap::Artefact> {
    // Checked before anything is minted: a wrong file must not cost a token.
    let release_root = args.release_root.as_deref().map(read_release_root).transpose()?;
    let current = c
        .get_policy(GetPolicyRequest { revision: 0 })
        .await
        .map_err(crate::status_err)?
        .into_inner();
    let policy = policy::parse(&format!("policy revision {}", current.revision), &current.yaml)
        .map_err(|e| anyhow::anyhow!("the current policy cannot be read: {e}"))?;
    let labels = labels_for(&policy, &args.env, args.pool.as_deref())?;
    let package = bootstrap::PackageSource {
        url: args.package_url.clone(),
        sha256: args.package_sha256.clone(),
        kind: args.package_kind,
    };
    let what = format!("{:?} {}", args.platform, args.node_name.as_deref().unwrap_or("")).to_lowercase();
    let artefact = if args.platform == Platform::Ipxe {
        if args.hosts.is_empty() {
            bail!("iPXE needs at least one --host MAC=NAME (the machines allowed to boot into enrollment)");
        }
        let (Some(kernel_url), Some(initrd_url), Some(seed_url)) = (&args.kernel_url, &args.initrd_url, &args.seed_url)
        else {
            bail!("iPXE needs --kernel-url, --initrd-url and --seed-url");
        };
        let mut hosts = Vec::new();
        let mut base = None;
        for (mac, name) in &args.hosts {
            let mac = bootstrap::normalize_mac(mac)?;
            // Bare metal: one token per host, bound to its MAC; the enrollment waits for `node accept`.
            let (token, pin, endpoint, expiry) = mint(c, args, &labels, Some(&mac), &format!("ipxe {name}")).await?;
            base.get_or_insert(bootstrap::BootstrapSpec {
                coordinator: endpoint,
                ca_pin: pin,
                token: token.clone(),
                token_expiry: expiry,
                node_name: None,
                package: package.clone(),
                state_dir: None,
                release_root: release_root.clone(),
            });
            hosts.push(bootstrap::ipxe::BareMetalHost {
                mac,
                node_name: name.clone(),
                token,
            });
        }
        let base = base.context("no host")?;
        let spec = bootstrap::ipxe::IpxeSpec {
            kernel_url: kernel_url.clone(),
            initrd_url: initrd_url.clone(),
            kernel_args: Vec::new(),
            seed_base_url: seed_url.clone(),
            datasource: Default::default(),
            hosts,
        };
        bootstrap::ipxe::render(&base, &spec)?
    } else {
        let (token, ca_pin, coordinator, token_expiry) = mint(c, args, &labels, None, &what).await?;
        let spec = bootstrap::BootstrapSpec {
            coordinator,
            ca_pin,
            token,
            token_expiry,
            node_name: args.node_name.clone(),
            package,
            state_dir: None,
            release_root,
        };
        render_platform(args.platform, &spec, args.opennebula_cloud_init)?
    };
    write(&args.out, &artefact)?;
    Ok(artefact)
}

/// Writes every file under `out` (created 0700); files holding a token 0600, the rest 0644. Refuses names
/// that would escape `out`.
pub fn write(out: &Path, a: &bootstrap::Artefact) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", out.display()))?;
    for (name, body) in &a.files {
        if name.starts_with('/') || name.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("the artefact names an unsafe file {name:?}; refusing to write it");
        }
        let path = out.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mode = if a.secret_files.contains(name) { 0o600 } else { 0o644 };
        let _ = std::fs::remove_file(&path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, body).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_the_environment_and_pool_rules() {
        let text = include_str!("../../deploy/examples/policy.yaml");
        let p = policy::parse("policy.yaml", text).unwrap();
        let prod = labels_for(&p, "production", None).unwrap();
        assert!(!prod.is_empty());
        let e = p.environment("production").unwrap();
        assert!(e.selector.matches(&prod), "the labels put the node into production");
        let with_pool = labels_for(&p, "production", Some("performance")).unwrap();
        assert_eq!(with_pool.get("class").map(String::as_str), Some("performance"));
        assert!(
            labels_for(&p, "moon", None)
                .unwrap_err()
                .to_string()
                .contains("production")
        );
        let hw = labels_for(&p, "production", Some("fast-nvme")).unwrap_err().to_string();
        assert!(hw.contains("by hardware"), "{hw}");
    }

    /// A real release root (the bootstrap crate's fixture: `nimbusctl release init` output).
    const ROOT: &str = include_str!("../../bootstrap/tests/fixtures/release-root.json");

    #[test]
    fn release_root_files_are_checked_and_pinned_by_every_platform() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.root.json");
        std::fs::write(&path, ROOT).unwrap();
        let root = read_release_root(&path).unwrap();
        assert_eq!(root, ROOT);
        let spec = bootstrap::BootstrapSpec {
            coordinator: "192.0.2.1:7443".into(),
            ca_pin: format!("sha256:{}", "ab".repeat(32)),
            token: "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv".into(),
            token_expiry: "single use, until 2026-05-01T12:00:00Z".into(),
            node_name: Some("db-7".into()),
            package: bootstrap::PackageSource {
                url: "https://mirror.example/a.deb".into(),
                sha256: "cd".repeat(32),
                kind: bootstrap::PackageKind::Deb,
            },
            state_dir: None,
            release_root: Some(root),
        };
        for (platform, cloud_init) in [
            (Platform::Aws, false),
            (Platform::Azure, false),
            (Platform::Vmware, false),
            (Platform::Opennebula, false),
            (Platform::Opennebula, true),
        ] {
            let a = render_platform(platform, &spec, cloud_init).unwrap();
            assert!(
                a.notes
                    .iter()
                    .any(|n| n.contains("agents will only accept releases signed under this root")),
                "{platform:?}: {:?}",
                a.notes
            );
        }
        let user_data = render_platform(Platform::Aws, &spec, false).unwrap();
        let text = String::from_utf8(user_data.files[0].1.clone()).unwrap();
        assert!(text.contains("path: /etc/nimbus/release-root.json"), "{text}");
        assert!(
            text.contains("release_root = \"/etc/nimbus/release-root.json\""),
            "{text}"
        );

        // Bad files are refused with the path and what to give instead.
        for (name, body, why) in [
            (
                "timestamp.json",
                r#"{"signed": {"_type": "timestamp"}, "signatures": [{}]}"#.to_string(),
                "not `root`",
            ),
            ("empty.json", String::new(), "empty"),
            ("key.pem", "-----BEGIN PRIVATE KEY-----\n".to_string(), "not valid JSON"),
            ("big.json", " ".repeat(70_000), "too large"),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            let e = format!("{:#}", read_release_root(&p).unwrap_err());
            assert!(e.contains(why) && e.contains(name), "{name}: {e}");
            assert!(e.contains("1.root.json"), "says what to give: {e}");
        }
        let e = format!("{:#}", read_release_root(&dir.path().join("absent.json")).unwrap_err());
        assert!(e.contains("absent.json"), "{e}");
    }

    #[test]
    fn files_holding_the_token_are_private_and_names_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let a = bootstrap::Artefact {
            files: vec![
                ("user-data.yaml".into(), b"token".to_vec()),
                ("seeds/x/meta-data".into(), b"m".to_vec()),
            ],
            notes: vec![],
            secret_files: vec!["user-data.yaml".into()],
        };
        write(dir.path(), &a).unwrap();
        let mode = |p: &str| std::fs::metadata(dir.path().join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode("user-data.yaml"), mode("seeds/x/meta-data")), (0o600, 0o644));
        write(dir.path(), &a).unwrap();
        let bad = bootstrap::Artefact {
            files: vec![("../x".into(), vec![])],
            ..a
        };
        assert!(write(dir.path(), &bad).is_err());
    }
}
