//! The fixed inputs of the golden and tool tests, and the gate for tests that need system tools.
#![allow(dead_code, clippy::unwrap_used)]

use bootstrap::ipxe::{BareMetalHost, IpxeSpec, NoCloudDatasource};
use bootstrap::{BootstrapSpec, PackageKind, PackageSource};

pub const TOKEN: &str = "nimbus1.abcdefghij.0123456789abcdefghijklmnopqrstuv";
pub const TOKEN_B: &str = "nimbus1.klmnopqrst.zyxwvutsrqponmlkjihgfedcba987654";
pub const TOKEN_C: &str = "nimbus1.uvwxyz0123.aaaabbbbccccddddeeeeffffgggghhhh";
/// A real release root, as `nimbusctl release init` wrote it (releases/repo/metadata/1.root.json: one root key and
/// the three online keys, Ed25519). Public metadata.
pub const RELEASE_ROOT: &str = include_str!("../fixtures/release-root.json");
/// The SHA-256 of the empty file: the tool tests serve an empty "package".
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

pub fn spec(kind: PackageKind) -> BootstrapSpec {
    let file = match kind {
        PackageKind::Deb => "nimbus-agent_0.1.0_amd64.deb",
        PackageKind::Rpm => "nimbus-agent-0.1.0-1.x86_64.rpm",
        PackageKind::Binary => "nimbus-agent-x86_64-linux",
    };
    BootstrapSpec {
        coordinator: "coord.example.net:7443".into(),
        ca_pin: format!("sha256:{}", "0123456789abcdef".repeat(4)),
        token: TOKEN.into(),
        token_expiry: "2026-05-01T12:00:00Z (1h after minting)".into(),
        node_name: Some("edge-1".into()),
        package: PackageSource {
            url: format!("https://coord.example.net:7443/packages/{file}"),
            sha256: EMPTY_SHA256.into(),
            kind,
        },
        state_dir: None,
        release_root: None,
    }
}

/// [`spec`] with [`RELEASE_ROOT`] pinned.
pub fn spec_with_root(kind: PackageKind) -> BootstrapSpec {
    BootstrapSpec {
        release_root: Some(RELEASE_ROOT.into()),
        ..spec(kind)
    }
}

pub fn ipxe_spec() -> IpxeSpec {
    IpxeSpec {
        kernel_url: "https://boot.example.net/debian-12/vmlinuz".into(),
        initrd_url: "https://boot.example.net/debian-12/initrd.img".into(),
        kernel_args: vec!["ip=dhcp".into(), "console=ttyS0,115200n8".into()],
        seed_base_url: "https://coord.example.net:7443/seed/".into(),
        datasource: NoCloudDatasource::NocloudNet,
        hosts: vec![
            BareMetalHost {
                mac: "52:54:00:12:34:56".into(),
                node_name: "rack1-node1".into(),
                token: TOKEN_B.into(),
            },
            BareMetalHost {
                mac: "52-54-00-AB-CD-EF".into(),
                node_name: "rack1-node2".into(),
                token: TOKEN_C.into(),
            },
        ],
    }
}

/// Whether a test that needs `tool` may run. Without it: fails when NIMBUS_REQUIRE_ROOT_TESTS=1 (CI), else
/// prints why it is skipped.
pub fn have_tool(tool: &str, why: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("NIMBUS_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("`{tool}` is not installed but NIMBUS_REQUIRE_ROOT_TESTS=1: {why}");
        }
        eprintln!("skipped: `{tool}` is not installed ({why}); set NIMBUS_REQUIRE_ROOT_TESTS=1 to make this a failure");
    }
    found
}
