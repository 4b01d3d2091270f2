//! End-to-end: signed agent releases. An operator makes the repository offline (`nimbusctl release init`), hands
//! it to the coordinator (`release install`) and publishes an agent build (`release add`, streamed in chunks and
//! checked against its SHA-256). An agent host then loads and verifies the metadata from its pinned root and
//! downloads the artefact through its WireGuard tunnel from the coordinator's overlay address; a host pinned to
//! another root refuses the same repository; and the repository is not reachable outside the tunnel.
//! Needs root and the daemon binaries (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use e2e::fleet::OVERLAY_COORDINATOR;
use e2e::{Fleet, expect_success, require_root};

const RELEASE_PORT: u16 = 7001;

/// Loads the repository from inside `ns` with `root` pinned and fetches `target` into `dest`.
fn fetch_in(
    fleet: &Fleet,
    agent: usize,
    root: Vec<u8>,
    target: Option<String>,
    work: &Path,
) -> Result<Vec<u8>, String> {
    let work = work.to_path_buf();
    fleet
        .agent_ns(agent)
        .block_on(move || async move {
            let base = format!("http://{OVERLAY_COORDINATOR}:{RELEASE_PORT}/");
            let meta = url::Url::parse(&format!("{base}metadata/")).unwrap();
            let targets = url::Url::parse(&format!("{base}targets/")).unwrap();
            let r = release::Releases::load(
                &root,
                release::HttpRangeTransport::new(),
                meta,
                targets,
                &work.join("datastore"),
            )
            .await
            .map_err(|e| e.to_string())?;
            let Some(target) = target else {
                return Ok(Vec::new());
            };
            let dest = work.join("downloaded");
            r.fetch(&target, &dest).await.map_err(|e| e.to_string())?;
            Ok(std::fs::read(&dest).unwrap())
        })
        .unwrap()
}

#[test]
fn releases_are_published_signed_and_fetched_through_the_tunnel_only() {
    if !require_root() {
        return;
    }
    let mut fleet = Fleet::start(1);
    let token = fleet.create_token("1h", 1);
    fleet.start_agent(1, Some(&token), &[]);
    fleet.wait_connected(&["agent-1"]);

    let ops = tempfile::tempdir().unwrap();
    let root_key = ops.path().join("offline").join("root.pem");
    let dir = ops.path().join("rel");
    let (rk, d) = (root_key.display().to_string(), dir.display().to_string());
    let notes = expect_success(&fleet.ctl(&["release", "init", "--root-key", &rk, "--out", &d]));
    assert!(notes.contains("keep it offline"), "{notes}");
    let listed = fleet.ctl_json(&["release", "install", &d]);
    assert_eq!(listed["root_version"], 1, "{listed}");
    // Installing again is refused: it would replace the root agents pinned.
    assert!(!fleet.ctl(&["release", "install", &d]).status.success());

    // An "agent build": bigger than one upload chunk and one download chunk.
    let artefact = ops.path().join("nimbus-agent");
    let bytes: Vec<u8> = (0..(3 << 20) + 4321).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&artefact, &bytes).unwrap();
    let a = artefact.display().to_string();
    let listed = fleet.ctl_json(&["release", "add", &a, "--version", "0.2.0", "--arch", "x86_64"]);
    let releases = listed["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 1, "{listed}");
    assert_eq!(releases[0]["version"], "0.2.0");
    let target = releases[0]["target"].as_str().unwrap().to_string();
    assert_eq!(listed["url"], format!("http://{OVERLAY_COORDINATOR}:{RELEASE_PORT}/"));
    // A bad version is refused with what to do.
    let out = fleet.ctl(&["release", "add", &a, "--version", "two"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("semantic version"),
        "{out:?}"
    );

    // The agent host, pinned to the root from `init`, verifies and downloads through its tunnel.
    let pinned = std::fs::read(dir.join("repo/metadata/1.root.json")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let got = fetch_in(&fleet, 1, pinned, Some(target.clone()), work.path()).unwrap();
    assert!(got == bytes, "downloaded {} bytes, expected {}", got.len(), bytes.len());

    // A host pinned to another root refuses the repository.
    let other = ops.path().join("other");
    expect_success(&fleet.ctl(&[
        "release",
        "init",
        "--root-key",
        &ops.path().join("root2.pem").display().to_string(),
        "--out",
        &other.display().to_string(),
    ]));
    let foreign = std::fs::read(other.join("repo/metadata/1.root.json")).unwrap();
    let work2 = tempfile::tempdir().unwrap();
    let err = fetch_in(&fleet, 1, foreign, Some(target), work2.path()).unwrap_err();
    assert!(!err.is_empty());

    // Outside the tunnel (the agent's underlay, the coordinator's own namespace on its underlay address) the
    // repository port does not answer.
    let underlay = SocketAddr::new(fleet.coordinator_ip().into(), RELEASE_PORT);
    let reached = fleet
        .agent_ns(1)
        .run_in(move || TcpStream::connect_timeout(&underlay, Duration::from_secs(3)).is_ok())
        .unwrap();
    assert!(!reached, "the release repository answered on the underlay address");
}
