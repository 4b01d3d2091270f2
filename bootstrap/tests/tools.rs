//! The artefacts checked by the tools that consume them: `cloud-init schema` and cloud-init's own user-data
//! processor (Debian's `cloud-init` package), `sh -n` and `shellcheck`, and the install script run for real
//! (twice) in a private mount namespace with fake `curl`/`dpkg`/`rpm`/`systemctl`.
//!
//! A missing tool skips the test with a message, or fails it when NIMBUS_REQUIRE_ROOT_TESTS=1 (CI).
#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed assertion

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use bootstrap::opennebula::ContextMode;
use bootstrap::shell::{self, ScriptKind};
use bootstrap::{BootstrapSpec, PackageKind, azure, cloud_init, ipxe, opennebula, vmware};
use common::{EMPTY_SHA256, RELEASE_ROOT, TOKEN, have_tool, ipxe_spec, spec, spec_with_root};

fn b64d(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap()
}

fn attr(doc: &str, key: &str) -> String {
    doc.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key} = \"")))
        .map(|rest| rest[..rest.find('"').unwrap()].to_string())
        .unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every cloud-config the crate renders, by a descriptive name.
fn all_cloud_configs() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in [PackageKind::Deb, PackageKind::Rpm, PackageKind::Binary] {
        let mut s = spec(kind);
        out.push((
            format!("cloud-init-{}", kind.as_str()),
            cloud_init::cloud_config(&s).unwrap().into_bytes(),
        ));
        s.node_name = None;
        s.state_dir = Some("/srv/nimbus".into());
        out.push((
            format!("cloud-init-{}-unnamed", kind.as_str()),
            cloud_init::cloud_config(&s).unwrap().into_bytes(),
        ));
    }
    // Every platform, without and with a pinned release root.
    for (s, suffix) in [
        (spec(PackageKind::Deb), ""),
        (spec_with_root(PackageKind::Deb), "-release-root"),
    ] {
        let az = azure::render(&s).unwrap();
        out.push((
            format!("azure{suffix}"),
            b64d(std::str::from_utf8(az.file(azure::CUSTOM_DATA_FILE).unwrap()).unwrap()),
        ));
        let g = vmware::guestinfo(&s).unwrap();
        out.push((format!("vmware{suffix}"), b64d(&g["guestinfo.userdata"])));
        let one = opennebula::render(&s, ContextMode::CloudInit).unwrap();
        let ctx = String::from_utf8(one.file(opennebula::CONTEXT_FILE).unwrap().to_vec()).unwrap();
        out.push((format!("opennebula{suffix}"), b64d(&attr(&ctx, "USER_DATA"))));
        let bare = ipxe::render(&s, &ipxe_spec()).unwrap();
        for (name, contents) in &bare.files {
            if name.ends_with("/user-data") || name.ends_with("/vendor-data") {
                out.push((
                    format!("ipxe-{}{suffix}", name.replace(['/', ':'], "-")),
                    contents.clone(),
                ));
            }
        }
    }
    for kind in [PackageKind::Rpm, PackageKind::Binary] {
        out.push((
            format!("cloud-init-{}-release-root", kind.as_str()),
            cloud_init::cloud_config(&spec_with_root(kind)).unwrap().into_bytes(),
        ));
    }
    out
}

#[test]
fn cloud_configs_pass_cloud_init_schema() {
    if !have_tool("cloud-init", "the rendered cloud-configs must pass `cloud-init schema`") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, doc) in all_cloud_configs() {
        let path = dir.path().join(format!("{name}.yaml"));
        fs::write(&path, &doc).unwrap();
        let o = Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&path)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && all.contains("Valid cloud-config"),
            "{name}: {}",
            show(&o)
        );
        assert!(
            !all.to_lowercase().contains("deprecat"),
            "{name} uses deprecated keys: {all}"
        );
    }
}

#[test]
fn cloud_init_reads_the_multipart_message() {
    if !have_tool(
        "cloud-init",
        "cloud-init's own user-data processor must accept the multipart message",
    ) {
        return;
    }
    let s = spec(PackageKind::Deb);
    let scripts: [(&str, &str, &[u8]); 2] = [
        (
            "10-tune.sh",
            "text/x-shellscript",
            b"#!/bin/sh\nsysctl -w vm.swappiness=10\n",
        ),
        (
            "motd.sh",
            "text/x-shellscript",
            "#!/bin/sh\necho 'Grüße' > /etc/motd\n".as_bytes(),
        ),
    ];
    let a = cloud_init::render_multipart(&s, &scripts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let msg = dir.path().join("user-data.mime");
    fs::write(&msg, a.file(cloud_init::MULTIPART_FILE).unwrap()).unwrap();
    // cloud-init's Python: the same code that reads user-data on first boot.
    let py = r#"
import hashlib, sys, tempfile
from cloudinit import user_data
from cloudinit.helpers import Paths
d = tempfile.mkdtemp()
m = user_data.UserDataProcessor(Paths({"cloud_dir": d, "run_dir": d})).process(open(sys.argv[1], "rb").read())
for p in m.walk():
    if not p.is_multipart():
        print(p.get_content_type(), p.get_filename(), hashlib.sha256(p.get_payload(decode=True)).hexdigest())
"#;
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(py)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    let sha = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    let cc = cloud_init::cloud_config(&s).unwrap();
    let mut want = vec![format!("text/cloud-config cloud-config.yaml {}", sha(cc.as_bytes()))];
    for (n, t, b) in scripts {
        want.push(format!("{t} {n} {}", sha(b)));
    }
    let got: Vec<String> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(got, want);
}

/// Every script variant: (name, text).
fn all_scripts() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for kind in [PackageKind::Deb, PackageKind::Rpm, PackageKind::Binary] {
        for (mode, mname) in [
            (ScriptKind::InstallOnly, "install-only"),
            (ScriptKind::Standalone, "standalone"),
        ] {
            for (mut s, rname) in [(spec(kind), ""), (spec_with_root(kind), "-release-root")] {
                // Values that need quoting.
                s.package.url = "https://mirror.example.net/a&b;c(d)/nimbus-agent?x=1#frag".into();
                out.push((
                    format!("{}-{mname}{rname}.sh", kind.as_str()),
                    shell::install_script(&s, mode).unwrap(),
                ));
            }
        }
    }
    out
}

#[test]
fn scripts_pass_sh_n() {
    let dir = tempfile::tempdir().unwrap();
    for (name, script) in all_scripts() {
        let path = dir.path().join(&name);
        fs::write(&path, script).unwrap();
        let o = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        assert!(o.status.success(), "{name}: {}", show(&o));
    }
}

#[test]
fn scripts_pass_shellcheck() {
    if !have_tool("shellcheck", "the install scripts must pass `shellcheck -s sh`") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, script) in all_scripts() {
        let path = dir.path().join(&name);
        fs::write(&path, script).unwrap();
        let o = Command::new("shellcheck")
            .args(["-s", "sh"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{name}: {}", show(&o));
    }
}

// ---- The script run for real -----------------------------------------------------------------------------

/// A private root: copies of /etc, and empty /var/lib, /var/cache, /usr/local/bin and /run (with
/// /run/systemd/system, so the script believes systemd is running), bind-mounted over the real ones in a new
/// mount namespace for the duration of one run; fake tools first in PATH, logging their calls.
struct Sandbox {
    dir: tempfile::TempDir,
}

const FAKE_CURL: &str = r#"#!/bin/sh
echo "curl $*" >> "$NIMBUS_FAKE/calls"
while [ $# -gt 0 ]; do
    case "$1" in
        --output) out=$2; shift 2 ;;
        *) shift ;;
    esac
done
cp "$NIMBUS_FAKE/package" "$out"
"#;

const FAKE_DPKG: &str = r#"#!/bin/sh
echo "dpkg $*" >> "$NIMBUS_FAKE/calls"
case "$1" in
    -i) touch "$NIMBUS_FAKE/installed" ;;
    -s) [ -f "$NIMBUS_FAKE/installed" ] && echo 'Status: install ok installed' ;;
esac
"#;

const FAKE_RPM: &str = r#"#!/bin/sh
echo "rpm $*" >> "$NIMBUS_FAKE/calls"
case "$1" in
    -U) touch "$NIMBUS_FAKE/installed" ;;
    -q) [ -f "$NIMBUS_FAKE/installed" ] ;;
esac
"#;

const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
echo "systemctl $*" >> "$NIMBUS_FAKE/calls"
"#;

impl Sandbox {
    fn new(package: &[u8]) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let o = Command::new("cp")
            .arg("-a")
            .arg("/etc")
            .arg(p.join("etc"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", show(&o));
        for d in ["var-lib", "var-cache", "usr-local-bin", "run/systemd/system", "bin"] {
            fs::create_dir_all(p.join(d)).unwrap();
        }
        for (name, body) in [
            ("curl", FAKE_CURL),
            ("dpkg", FAKE_DPKG),
            ("rpm", FAKE_RPM),
            ("systemctl", FAKE_SYSTEMCTL),
        ] {
            let path = p.join("bin").join(name);
            fs::write(&path, body).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::write(p.join("package"), package).unwrap();
        fs::write(p.join("calls"), "").unwrap();
        Sandbox { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn calls(&self) -> Vec<String> {
        fs::read_to_string(self.path("calls"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs `script` as root in the sandbox; returns its output and the calls it made.
    fn run(&self, script: &str) -> (Output, Vec<String>) {
        let before = self.calls().len();
        let file = self.path("install-agent.sh");
        fs::write(&file, script).unwrap();
        let p = self.dir.path();
        let o = Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(
                r#"set -e
mount --bind "$NIMBUS_FAKE/etc" /etc
mount --bind "$NIMBUS_FAKE/var-lib" /var/lib
mount --bind "$NIMBUS_FAKE/var-cache" /var/cache
mount --bind "$NIMBUS_FAKE/usr-local-bin" /usr/local/bin
mount --bind "$NIMBUS_FAKE/run" /run
exec sh "$1""#,
            )
            .arg("sh")
            .arg(&file)
            .env("NIMBUS_FAKE", p)
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", p.join("bin").display()),
            )
            .output()
            .unwrap();
        let calls = self.calls()[before..].to_vec();
        (o, calls)
    }

    /// Path → (mode, mtime ns, contents) of everything the script may touch.
    fn snapshot(&self) -> BTreeMap<String, (u32, i128, Vec<u8>)> {
        let mut out = BTreeMap::new();
        for root in [
            "etc/nimbus",
            "etc/systemd/system/nimbus-agent.service.d",
            "etc/systemd/system/nimbus-agent.service",
            "var-lib",
            "var-cache",
            "usr-local-bin",
        ] {
            walk(&self.path(root), self.dir.path(), &mut out);
        }
        out
    }
}

fn walk(p: &Path, base: &Path, out: &mut BTreeMap<String, (u32, i128, Vec<u8>)>) {
    let Ok(m) = fs::symlink_metadata(p) else { return };
    let rel = p.strip_prefix(base).unwrap().display().to_string();
    let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
    if m.is_dir() {
        out.insert(rel, (m.mode(), mtime, Vec::new()));
        for e in fs::read_dir(p).unwrap() {
            walk(&e.unwrap().path(), base, out);
        }
    } else {
        out.insert(rel, (m.mode(), mtime, fs::read(p).unwrap()));
    }
}

/// Whether the real-run tests can run: root, `unshare`, `mount`.
fn can_run_for_real() -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        if std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("the install script test needs root (mount namespaces) but NIMBUS_REQUIRE_ROOT_TESTS=1");
        }
        eprintln!("skipped: running the install script needs root (mount namespaces)");
        return false;
    }
    have_tool("unshare", "the install script runs in a private mount namespace")
}

fn mode_of(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

fn run_twice(kind: PackageKind) {
    run_twice_with(spec(kind));
}

fn run_twice_with(s: BootstrapSpec) {
    let kind = s.package.kind;
    let script = shell::install_script(&s, ScriptKind::Standalone).unwrap();
    let sb = Sandbox::new(b"");
    let (o, calls) = sb.run(&script);
    assert!(o.status.success(), "{kind:?} first run: {}", show(&o));

    // What the first run did.
    let token = sb.path("etc/nimbus/join-token");
    assert_eq!(fs::read_to_string(&token).unwrap(), format!("{TOKEN}\n"));
    assert_eq!(mode_of(&token), 0o600);
    assert_eq!(mode_of(&sb.path("etc/nimbus/agent.toml")), 0o644);
    let config = fs::read_to_string(sb.path("etc/nimbus/agent.toml")).unwrap();
    assert!(config.contains("token_file = \"/etc/nimbus/join-token\""), "{config}");
    let root = sb.path("etc/nimbus/release-root.json");
    match &s.release_root {
        Some(text) => {
            assert_eq!(&fs::read_to_string(&root).unwrap(), text, "installed byte for byte");
            assert_eq!(mode_of(&root), 0o644);
            assert_eq!(fs::metadata(&root).unwrap().uid(), 0, "owned by root");
            assert!(
                config.contains("release_root = \"/etc/nimbus/release-root.json\""),
                "{config}"
            );
        }
        None => {
            assert!(!root.exists());
            assert!(!config.contains("release_root"), "{config}");
        }
    }
    let dropin = sb.path("etc/systemd/system/nimbus-agent.service.d/10-bootstrap.conf");
    assert!(
        fs::read_to_string(&dropin)
            .unwrap()
            .contains("NIMBUS_CONFIG=/etc/nimbus/agent.toml")
    );
    assert_eq!(mode_of(&dropin), 0o644);
    let curl: Vec<&String> = calls.iter().filter(|c| c.starts_with("curl ")).collect();
    assert_eq!(curl.len(), 1, "{calls:?}");
    assert!(
        curl[0].contains("--fail --silent --show-error --location --retry 5"),
        "{}",
        curl[0]
    );
    assert!(curl[0].ends_with(&s.package.url), "{}", curl[0]);
    match kind {
        PackageKind::Deb => {
            assert!(
                calls.contains(&"dpkg -i /var/cache/nimbus-bootstrap/nimbus-agent.deb".to_string()),
                "{calls:?}"
            );
            assert_eq!(
                fs::read_to_string(sb.path("var-lib/nimbus-bootstrap/package.sha256")).unwrap(),
                format!("{EMPTY_SHA256}\n")
            );
        }
        PackageKind::Rpm => {
            assert!(
                calls.contains(
                    &"rpm -U --replacepkgs --oldpackage /var/cache/nimbus-bootstrap/nimbus-agent.rpm".to_string()
                ),
                "{calls:?}"
            );
        }
        PackageKind::Binary => {
            assert_eq!(mode_of(&sb.path("usr-local-bin/nimbus-agent")), 0o755);
            let unit = fs::read_to_string(sb.path("etc/systemd/system/nimbus-agent.service")).unwrap();
            assert!(unit.contains("ExecStart=/usr/local/bin/nimbus-agent"), "{unit}");
        }
    }
    assert!(calls.contains(&"systemctl daemon-reload".to_string()), "{calls:?}");
    assert!(
        calls.contains(&"systemctl enable --now --no-block nimbus-agent.service".to_string()),
        "{calls:?}"
    );
    assert!(!sb.path("var-cache/nimbus-bootstrap/nimbus-agent.deb.part").exists());

    // The second run changes nothing: no download, no install, no file rewritten (same mtimes).
    let before = sb.snapshot();
    let (o, calls) = sb.run(&script);
    assert!(o.status.success(), "{kind:?} second run: {}", show(&o));
    assert!(
        calls
            .iter()
            .all(|c| !c.starts_with("curl") && !c.starts_with("dpkg -i") && !c.starts_with("rpm -U")),
        "{kind:?}: the second run downloaded or installed again: {calls:?}"
    );
    assert_eq!(sb.snapshot(), before, "{kind:?}: the second run changed files");

    // A loosened token file is put back to 0600 without being rewritten.
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let (o, _) = sb.run(&script);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(mode_of(&token), 0o600);

    // A release root edited by hand is put back.
    if let Some(text) = &s.release_root {
        fs::write(&root, "{}").unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o600)).unwrap();
        let (o, _) = sb.run(&script);
        assert!(o.status.success(), "{}", show(&o));
        assert_eq!(&fs::read_to_string(&root).unwrap(), text);
        assert_eq!(mode_of(&root), 0o644);
    }
}

#[test]
fn install_script_is_idempotent_deb() {
    if can_run_for_real() {
        run_twice(PackageKind::Deb);
    }
}

#[test]
fn install_script_is_idempotent_rpm() {
    if can_run_for_real() {
        run_twice(PackageKind::Rpm);
    }
}

#[test]
fn install_script_is_idempotent_binary() {
    if can_run_for_real() {
        run_twice(PackageKind::Binary);
    }
}

#[test]
fn install_script_with_a_release_root_is_idempotent() {
    if can_run_for_real() {
        assert!(RELEASE_ROOT.ends_with('\n'), "the fixture is installed as it is");
        run_twice_with(spec_with_root(PackageKind::Deb));
        run_twice_with(spec_with_root(PackageKind::Binary));
    }
}

#[test]
fn install_script_refuses_a_package_with_the_wrong_digest() {
    if !can_run_for_real() {
        return;
    }
    let script = shell::install_script(&spec(PackageKind::Deb), ScriptKind::Standalone).unwrap();
    let sb = Sandbox::new(b"not the package that was pinned");
    let (o, calls) = sb.run(&script);
    assert!(
        !o.status.success(),
        "a tampered package must stop the script: {}",
        show(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not have SHA-256"),
        "{}",
        show(&o)
    );
    assert!(
        calls
            .iter()
            .all(|c| !c.starts_with("dpkg -i") && !c.starts_with("systemctl")),
        "{calls:?}"
    );
    assert!(!sb.path("var-cache/nimbus-bootstrap/nimbus-agent.deb.part").exists());
    assert!(!sb.path("var-cache/nimbus-bootstrap/nimbus-agent.deb").exists());
    assert!(!sb.path("var-lib/nimbus-bootstrap/package.sha256").exists());
}
