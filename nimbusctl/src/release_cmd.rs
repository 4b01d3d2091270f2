//! `nimbusctl release`: the offline half of agent releases (`init`: the root key and the first signed metadata,
//! made on the operator's machine) and the admin calls that hand the repository to the coordinator, publish
//! artefacts and list them.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nimbus_proto::{AddReleaseChunk, InstallReleaseRepositoryRequest, ReleaseHeader, ReleaseList};
use sha2::{Digest, Sha256};

/// Bytes per uploaded chunk (well under gRPC's 4 MiB message limit).
const CHUNK: usize = 1 << 20;

/// `release init`: creates the root key at `root_key` (kept if it exists), online keys in `out/keys/` and the
/// first signed metadata in `out/repo/`.
pub async fn init(root_key: &Path, out: &Path) -> Result<String> {
    let mut notes = Vec::new();
    if root_key.exists() {
        notes.push(format!("root key: {} (existing, reused)", root_key.display()));
    } else {
        if let Some(dir) = root_key.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        release::keys::generate_key(root_key).with_context(|| format!("cannot create {}", root_key.display()))?;
        notes.push(format!(
            "root key: {} (new; keep it offline, e.g. on removable media)",
            root_key.display()
        ));
    }
    let keys = out.join("keys");
    let online =
        release::OnlineKeys::generate(&keys).with_context(|| format!("cannot create keys in {}", keys.display()))?;
    let repo = out.join("repo");
    release::repo::init(root_key, &online, &repo, &release::Expiries::default())
        .await
        .with_context(|| format!("cannot create the repository in {}", repo.display()))?;
    let pin = repo.join("metadata").join("1.root.json");
    notes.push(format!(
        "online keys: {} (hand them to the coordinator, then delete them here)",
        keys.display()
    ));
    notes.push(format!(
        "agents pin: {} (install it on hosts as /etc/nimbus/release-root.json)",
        pin.display()
    ));
    notes.push(format!("next: nimbusctl release install {}", out.display()));
    Ok(notes.join("\n"))
}

/// Reads what `install` sends from a directory made by `init`.
fn read_install(dir: &Path, replace: bool) -> Result<InstallReleaseRepositoryRequest> {
    let meta = dir.join("repo").join("metadata");
    let mut metadata = HashMap::new();
    for e in std::fs::read_dir(&meta)
        .with_context(|| format!("cannot read {}: is it a `release init` directory?", meta.display()))?
    {
        let e = e?;
        if e.file_type()?.is_file() {
            let name = e.file_name().to_string_lossy().into_owned();
            metadata.insert(name, std::fs::read(e.path())?);
        }
    }
    let key = |role: &str| -> Result<Vec<u8>> {
        let p = dir.join("keys").join(format!("{role}.pem"));
        std::fs::read(&p).with_context(|| format!("cannot read {} (already installed and deleted?)", p.display()))
    };
    Ok(InstallReleaseRepositoryRequest {
        metadata,
        targets_key: key("targets")?,
        snapshot_key: key("snapshot")?,
        timestamp_key: key("timestamp")?,
        replace,
    })
}

pub async fn install(c: &mut crate::context::Client, dir: &Path, replace: bool) -> Result<ReleaseList> {
    let req = read_install(dir, replace)?;
    Ok(c.install_release_repository(req)
        .await
        .context("install refused")?
        .into_inner())
}

/// Streams `file` as a release; its SHA-256 is computed first and checked by the coordinator.
pub async fn add(
    c: &mut crate::context::Client,
    file: &Path,
    version: &str,
    kind: &str,
    arch: &str,
) -> Result<ReleaseList> {
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{} has no usable file name", file.display()))?;
    let (length, sha256) = digest(file)?;
    if length == 0 {
        bail!("{} is empty", file.display());
    }
    let header = ReleaseHeader {
        file_name,
        version: version.into(),
        kind: kind.into(),
        arch: arch.into(),
        length,
        sha256,
    };
    let path: PathBuf = file.to_path_buf();
    let (tx, rx) = tokio::sync::mpsc::channel::<AddReleaseChunk>(4);
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        use nimbus_proto::add_release_chunk::Part;
        if tx
            .blocking_send(AddReleaseChunk {
                part: Some(Part::Header(header)),
            })
            .is_err()
        {
            return Ok(());
        }
        let mut f = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            if tx
                .blocking_send(AddReleaseChunk {
                    part: Some(Part::Data(buf[..n].to_vec())),
                })
                .is_err()
            {
                return Ok(());
            }
        }
    });
    let r = c.add_release(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    reader.await??;
    Ok(r.context("release refused")?.into_inner())
}

fn digest(file: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((n_total, hex::encode(h.finalize())));
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
}

pub fn list_json(l: &ReleaseList) -> serde_json::Value {
    serde_json::json!({
        "url": l.url,
        "root_version": l.root_version,
        "root_sha256": l.root_sha256,
        "timestamp_expires": l.timestamp_expires,
        "releases": l.releases.iter().map(|r| serde_json::json!({
            "version": r.version, "kind": r.kind, "arch": r.arch, "sha256": r.sha256,
            "length": r.length, "target": r.target,
        })).collect::<Vec<_>>(),
    })
}

pub fn list_text(l: &ReleaseList) -> String {
    if l.root_version == 0 {
        return "no release repository installed: nimbusctl release init, then nimbusctl release install\n".into();
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["VERSION", "KIND", "ARCH", "SIZE", "SHA256", "TARGET"]);
    for r in &l.releases {
        t.add_row([
            r.version.clone(),
            r.kind.clone(),
            r.arch.clone(),
            r.length.to_string(),
            r.sha256.chars().take(16).collect::<String>(),
            r.target.clone(),
        ]);
    }
    format!(
        "{t}\nroot v{} sha256:{}  timestamp expires {}  served at {} (tunnel only)\n",
        l.root_version, l.root_sha256, l.timestamp_expires, l.url
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn init_makes_what_install_sends() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("usb").join("root.pem");
        let out = dir.path().join("rel");
        let notes = init(&root, &out).await.unwrap();
        assert!(notes.contains("keep it offline"), "{notes}");
        let req = read_install(&out, false).unwrap();
        assert!(req.metadata.contains_key("1.root.json"), "{:?}", req.metadata.keys());
        assert!(req.timestamp_key.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        assert!(
            !req.metadata.keys().any(|k| k.contains("pem")),
            "no key in the metadata"
        );
        // A second init into another directory reuses the root key.
        let notes = init(&root, &dir.path().join("rel2")).await.unwrap();
        assert!(notes.contains("existing, reused"), "{notes}");
        assert!(init(&root, &out).await.is_err(), "never over an existing repository");
    }
}
