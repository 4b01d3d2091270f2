//! Inventory on the agent: collect with the `inventory` crate (off the async
//! threads), enrich once from the cloud metadata service (bounded by its
//! timeout, never in the way of enrollment or the stream), re-collect on a
//! timer and on kernel uevents, and publish only when the stable fingerprint
//! changes. The fleet session sends whatever is published.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use inventory::{Collected, Inventory, MetadataConfig, PlatformKind, WarnOnce};
use tokio::sync::{Notify, watch};

/// What the watcher needs.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// Filesystem root to read (`/` in production).
    pub root: PathBuf,
    /// Re-collect at least this often.
    pub interval: Duration,
    /// Cloud metadata endpoint and timeout; `None` disables enrichment.
    pub metadata: Option<MetadataConfig>,
}

/// Longest `kubelet --version` and friends may take.
const VERSION_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Latest published inventory (`None` until the first collection).
pub type Latest = watch::Receiver<Option<Arc<Inventory>>>;

/// The `nimbus.v1.Inventory` message for `inv`: the summary fields plus the full document.
pub fn message(inv: &Inventory) -> nimbus_proto::Inventory {
    nimbus_proto::Inventory {
        hostname: inv.hostname.clone().unwrap_or_default(),
        cpus: inv.cpu.threads.unwrap_or(0),
        memory_bytes: inv.memory.total_bytes.unwrap_or(0),
        kernel: inv.os.kernel.clone().unwrap_or_default(),
        os_release: inv.os.pretty_name.clone().unwrap_or_default(),
        // Serializing a plain data model cannot fail; an empty document just means "summary only".
        document: serde_json::to_vec(inv).unwrap_or_default(),
        document_schema: inventory::DOCUMENT_SCHEMA,
    }
}

/// Keep the metadata-derived platform facts of an earlier enrichment on a fresh local collection (the
/// local collection alone cannot know region or zone).
fn carry_enrichment(inv: &mut Inventory, enriched: &inventory::Platform) {
    if inv.platform.kind != enriched.kind {
        return;
    }
    let p = &mut inv.platform;
    p.instance_type = enriched.instance_type.clone().or(p.instance_type.take());
    p.instance_id = enriched.instance_id.clone().or(p.instance_id.take());
    p.region = enriched.region.clone();
    p.zone = enriched.zone.clone();
    p.metadata_source = enriched.metadata_source.clone();
}

async fn collect(root: PathBuf) -> Collected {
    let fallback = root.clone();
    match tokio::task::spawn_blocking(move || inventory::collect(&root)).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, root = %fallback.display(), "inventory collection panicked");
            Collected {
                inventory: Inventory::default(),
                unreadable: Vec::new(),
            }
        }
    }
}

/// Start the watcher. `wake` re-collects at once (uevents); the task ends when every receiver is gone.
pub fn spawn(cfg: WatchConfig, wake: Arc<Notify>) -> Latest {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut warn = WarnOnce::new();
        let mut enriched: Option<inventory::Platform> = None;
        let mut published: Option<String> = None;
        loop {
            let collected = collect(cfg.root.clone()).await;
            warn.log(&collected.unreadable);
            let mut inv = collected.inventory;
            // Versions of kubelet/kubeadm/containerd installed without a package database (runs `X --version`
            // with a timeout, only on the live root and only for such binaries).
            let unread = inventory::probe_versions(&mut inv, &cfg.root, VERSION_PROBE_TIMEOUT).await;
            warn.log(&unread);
            if let Some(p) = &enriched {
                carry_enrichment(&mut inv, p);
            }
            // Publish the local view first: metadata must never hold it back.
            if publish(&tx, &inv, &mut published).is_err() {
                return;
            }
            let cloud = matches!(inv.platform.kind, PlatformKind::Aws | PlatformKind::Azure);
            if let (None, true, Some(meta)) = (&enriched, cloud, &cfg.metadata) {
                match inventory::enrich(&mut inv, meta).await {
                    Ok(()) => {
                        tracing::info!(
                            source = ?inv.platform.metadata_source, instance_type = ?inv.platform.instance_type,
                            zone = ?inv.platform.zone, "cloud metadata read"
                        );
                        enriched = Some(inv.platform.clone());
                        if publish(&tx, &inv, &mut published).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cloud metadata unavailable; will retry at the next inventory interval")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = wake.notified() => {
                    // Let a burst of uevents (a disk and its partitions) settle.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// Send `inv` to the receivers if its fingerprint differs from the last one published.
fn publish(
    tx: &watch::Sender<Option<Arc<Inventory>>>,
    inv: &Inventory,
    published: &mut Option<String>,
) -> Result<(), ()> {
    let fp = inv.fingerprint();
    if published.as_deref() == Some(fp.as_str()) {
        return Ok(());
    }
    if let Some(old) = tx.borrow().as_deref() {
        tracing::info!(changes = ?inventory::changed_fields(old, inv), "inventory changed");
    }
    *published = Some(fp);
    tx.send(Some(Arc::new(inv.clone()))).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_carries_summary_and_document() {
        let mut inv = Inventory::default();
        inv.cpu.threads = Some(8);
        inv.memory.total_bytes = Some(1 << 30);
        inv.os.kernel = Some("6.1.0".into());
        let m = message(&inv);
        assert_eq!((m.cpus, m.memory_bytes, m.kernel.as_str()), (8, 1 << 30, "6.1.0"));
        assert_eq!(m.document_schema, inventory::DOCUMENT_SCHEMA);
        let back: Inventory = serde_json::from_slice(&m.document).unwrap();
        assert_eq!(back, inv);
    }

    #[test]
    fn enrichment_survives_recollection_on_the_same_platform_only() {
        let mut enriched = inventory::Platform {
            kind: PlatformKind::Aws,
            ..Default::default()
        };
        enriched.zone = Some("eu-west-1a".into());
        enriched.region = Some("eu-west-1".into());
        let mut fresh = Inventory::default();
        fresh.platform.kind = PlatformKind::Aws;
        carry_enrichment(&mut fresh, &enriched);
        assert_eq!(fresh.platform.zone.as_deref(), Some("eu-west-1a"));
        let mut other = Inventory::default();
        other.platform.kind = PlatformKind::Vmware;
        carry_enrichment(&mut other, &enriched);
        assert_eq!(other.platform.zone, None);
    }

    #[tokio::test]
    async fn publishes_at_start_and_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(dir.path().join("proc/meminfo"), "MemTotal: 1024 kB\n").unwrap();
        let wake = Arc::new(Notify::new());
        let cfg = WatchConfig {
            root: dir.path().into(),
            interval: Duration::from_millis(50),
            metadata: None,
        };
        let mut rx = spawn(cfg, Arc::clone(&wake));
        rx.changed().await.unwrap();
        assert_eq!(
            rx.borrow_and_update().as_ref().unwrap().memory.total_bytes,
            Some(1 << 20)
        );
        // Several intervals with nothing new publish nothing.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.changed())
                .await
                .is_err()
        );
        std::fs::write(dir.path().join("proc/meminfo"), "MemTotal: 2048 kB\n").unwrap();
        wake.notify_one();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.borrow().as_ref().unwrap().memory.total_bytes, Some(2 << 20));
    }

    #[tokio::test]
    async fn a_silent_metadata_service_does_not_hold_back_the_inventory() {
        // An AWS host whose metadata service accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", silent.local_addr().unwrap());
        let _hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../inventory/fixtures/aws-nitro-i3en");
        let cfg = WatchConfig {
            root,
            interval: Duration::from_secs(3600),
            metadata: Some(MetadataConfig {
                endpoint,
                timeout: Duration::from_secs(60),
            }),
        };
        let mut rx = spawn(cfg, Arc::new(Notify::new()));
        // Published long before the 60 s metadata timeout could end.
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("published without metadata")
            .unwrap();
        let inv = rx.borrow().clone().unwrap();
        assert_eq!(inv.platform.kind, PlatformKind::Aws);
        assert_eq!(inv.platform.metadata_source, None, "local facts only so far");
    }
}
