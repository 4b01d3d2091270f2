//! The agent's life: load or create its identity, bring up the tunnel, keep
//! one fleet stream open (reconnecting with backoff and jitter), and stop on
//! shutdown, revocation, or to restart into an upgraded version (`crate::upgrade`).
//!
//! Coordinator replicas: the tunnel has one WireGuard peer per replica the identity knows; the fleet stream goes
//! to one of them at a time. When a stream fails (to connect, or later: [`MISSED_ACKS`] unanswered heartbeats)
//! the next attempt goes to the next replica at once ([`crate::replicas::Failover`]); the backoff delay applies
//! only once every replica failed in a row. A `Replicas` message on the stream replaces the list: peers are
//! added, changed and removed ([`crate::replicas::plan_peers`]; the peer the stream runs on stays until the
//! stream ends), `identity.json` is rewritten when the list changed, and the release allow-list
//! ([`upgrade::ReleaseHosts`]) follows.
//!
//! Every message goes up through one sender per stream; every `ObservedState` on it is stamped there with the
//! running version and the releases this host rolled back (`upgrade.json`), whoever built it, and with the
//! error of a failed upgrade to its generation.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nimbus_proto::agent_message::Msg as AgentMsg;
use nimbus_proto::coordinator_message::Msg as CoordMsg;
use nimbus_proto::fleet_client::FleetClient;
use nimbus_proto::{AgentMessage, DesiredStateRequest, Heartbeat, Hello, NodeStatus};
use rand::Rng as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::enroll::{self, HostFacts};
use crate::error::AgentError;
use crate::identity::{self, Identity, KeyFollow, ReplicaPeer};
use crate::replicas::{self, Failover, Pace};
use crate::{inventory, probes, uevent, upgrade};

/// WireGuard persistent keepalive towards each coordinator replica (keeps NAT state).
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
/// First reconnect delay; doubles up to [`MAX_BACKOFF`], with jitter.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Heartbeats that may go unanswered before the stream counts as dead (each has a heartbeat interval to be
/// answered), so an agent leaves a dead replica within about three intervals of its last answer.
pub const MISSED_ACKS: u32 = 2;
/// Longest pause before trying another replica after one failed, while not every replica has failed in a row
/// (then the backoff applies). The pause is drawn at random below it, so agents that lost the same replica do
/// not all arrive at the next one at the same instant.
pub const SWITCH_DELAY: Duration = Duration::from_millis(250);
/// Before restarting into a new version: how long to wait for the coordinator to take the last report and
/// close the stream.
pub const RESTART_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How [`run`] ended (errors aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future resolved (SIGTERM/SIGINT).
    Shutdown,
    /// An upgrade to `version` was staged and activated: exit with [`Stopped::exit_code`] so the launcher
    /// starts it.
    Restart { version: String },
}

impl Stopped {
    /// 0, or [`crate::error::EXIT_RESTART`] (75) for a restart into the new version.
    pub fn exit_code(&self) -> u8 {
        match self {
            Stopped::Shutdown => 0,
            Stopped::Restart { .. } => crate::error::EXIT_RESTART,
        }
    }
}

/// Hooks the binary uses for systemd notification; tests pass no-ops.
pub trait Events: Send + Sync {
    fn connected(&self, _id: &Identity) {}
    fn disconnected(&self, _why: &str) {}
    /// The agent is about to exit to be restarted into `version` by the launcher. Not `STOPPING=1`: the launcher
    /// relays that to systemd, which would then treat the whole unit as stopping and kill it after
    /// `TimeoutStopSec`, new version included.
    fn restarting(&self, _version: &str) {}
}

pub struct NoEvents;
impl Events for NoEvents {}

fn read_trimmed(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .or_else(|| read_trimmed("/etc/hostname"))
        .unwrap_or_else(|| "unknown".into())
}

/// Get an identity: the persisted one, or a new one from enrollment.
async fn identity(cfg: &Config, key: &tunnel::PublicKey) -> Result<Identity, AgentError> {
    if let Some(id) = identity::load(&cfg.state_dir)? {
        tracing::info!(node = %id.node_name, node_id = %id.node_id, overlay_ip = %id.overlay_ip, "identity loaded; not enrolling again");
        return Ok(id);
    }
    let token = cfg.token.as_deref().ok_or(AgentError::NoToken)?;
    enroll::check_token_shape(token)?;
    let addr = cfg
        .coordinator
        .as_deref()
        .ok_or_else(|| AgentError::Config(vec!["--coordinator HOST:PORT is required to enroll".into()]))?;
    let pin = cfg.ca_pin.as_ref().ok_or_else(|| {
        AgentError::Config(vec![
            "--ca-pin is required to enroll (printed by `nimbusctl token create`)".into(),
        ])
    })?;
    let host = hostname();
    let machine_id = cfg
        .machine_id
        .clone()
        .or_else(|| read_trimmed("/etc/machine-id"))
        .unwrap_or_default();
    let facts = HostFacts {
        node_name: cfg.node_name.clone().unwrap_or_else(|| host.clone()),
        hostname: host,
        machine_id,
        agent_version: crate::version().into(),
        macs: enroll::host_macs(),
    };
    tracing::info!(coordinator = %addr, node = %facts.node_name, macs = ?facts.macs, "enrolling");
    let id = enroll::enroll(addr, pin, token, key, facts).await?;
    identity::save(&cfg.state_dir, &id)?;
    tracing::info!(node = %id.node_name, node_id = %id.node_id, overlay_ip = %id.overlay_ip, "enrolled");
    Ok(id)
}

/// Run until `shutdown` resolves or an upgrade asks for a restart (Ok), or the node is revoked / cannot start
/// (Err).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>, events: &dyn Events) -> Result<Stopped, AgentError> {
    identity::prepare_state_dir(&cfg.state_dir)?;
    let secret = tunnel::keys::load_or_create_secret(&cfg.state_dir.join(identity::KEY_FILE))?;
    let public = tunnel::PublicKey::from(&secret);
    let id = identity(&cfg, &public).await?;
    let overlay = id.overlay_net().ok_or_else(|| AgentError::StateDir {
        path: identity::identity_path(&cfg.state_dir),
        detail: format!(
            "overlay_prefix_len {} is over 32; to enroll this host again remove the state directory and use a new token",
            id.overlay_prefix_len
        ),
    })?;
    let peers = id
        .replica_peers()
        .iter()
        .map(replicas::peer_config)
        .collect::<Result<Vec<_>, _>>()?;

    let tun = tunnel::Tunnel::start(tunnel::TunnelConfig {
        private_key: secret,
        listen: cfg.wg_listen,
        tun_name: cfg.tun_name.clone(),
        address: id.overlay_ip,
        prefix_len: id.overlay_prefix_len,
        mtu: id.mtu,
    })
    .await?;
    for peer in peers {
        tun.add_peer(peer)?;
    }
    tracing::info!(
        tun = %tun.device_name(),
        udp = %tun.local_udp_addr(),
        coordinator = %id.coordinator_wg_endpoint,
        replicas = %replica_names(&id.replica_peers()),
        "tunnel up"
    );

    let metrics = crate::metrics::AgentMetrics::new(cfg.state_dir.clone());
    let metrics_task = match cfg.metrics_listen {
        Some(addr) => crate::metrics::spawn(addr, metrics.clone(), tun.clone()).await,
        None => None,
    };

    let probes = probes::start(cfg.probe_listen, &id.node_id).await?;
    let wake = Arc::new(tokio::sync::Notify::new());
    uevent::spawn(Arc::clone(&wake));
    let latest = inventory::spawn(
        inventory::WatchConfig {
            root: "/".into(),
            interval: cfg.inventory_interval,
            metadata: cfg.metadata.clone(),
        },
        wake,
    );

    let release_hosts = upgrade::ReleaseHosts::new(id.replica_peers().iter().map(|r| r.overlay_ip));
    let executor = upgrade::Executor::new(cfg.state_dir.clone(), cfg.release_root.clone(), release_hosts.clone());
    let (upgrades, mut upgrade_outcomes) = upgrade::spawn(executor);
    let link = UpgradeLink {
        handle: &upgrades,
        outcomes: &mut upgrade_outcomes,
    };

    let mut fleet = Fleet {
        id,
        overlay,
        deferred: Vec::new(),
        release_hosts,
        tun: &tun,
        state_dir: &cfg.state_dir,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let result = tokio::select! {
        r = stay_connected(&cfg, &mut fleet, &public, stop_rx, latest, &probes, events, link, &metrics) => r,
        _ = shutdown => {
            let _ = stop_tx.send(true);
            Ok(Stopped::Shutdown)
        }
    };
    drop(upgrades);
    if let Some(t) = metrics_task {
        t.abort();
    }
    tun.shutdown().await;
    result
}

/// `id@endpoint, ...` for logs.
fn replica_names(list: &[ReplicaPeer]) -> String {
    list.iter()
        .map(|r| format!("{}@{}", r.id, r.wg_endpoint))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The tunnel's peer operations the replica handling uses: [`tunnel::Tunnel`]'s, or in tests a bare
/// [`tunnel::Router`]'s (the same peer table without a TUN device).
trait PeerTable {
    fn add_peer(&self, cfg: tunnel::PeerConfig) -> Result<(), tunnel::TunnelError>;
    fn remove_peer(&self, key: &tunnel::PublicKey) -> bool;
    async fn set_peer_public_key(
        &self,
        old: &tunnel::PublicKey,
        new: tunnel::PublicKey,
    ) -> Result<(), tunnel::TunnelError>;
}

impl PeerTable for tunnel::Tunnel {
    fn add_peer(&self, cfg: tunnel::PeerConfig) -> Result<(), tunnel::TunnelError> {
        tunnel::Tunnel::add_peer(self, cfg)
    }

    fn remove_peer(&self, key: &tunnel::PublicKey) -> bool {
        tunnel::Tunnel::remove_peer(self, key)
    }

    async fn set_peer_public_key(
        &self,
        old: &tunnel::PublicKey,
        new: tunnel::PublicKey,
    ) -> Result<(), tunnel::TunnelError> {
        tunnel::Tunnel::set_peer_public_key(self, old, new).await
    }
}

/// What the fleet sessions share about the coordinator replicas across reconnects: the identity (its replica
/// list and keys change while connected, and are written back to `identity.json`), the peers of unlisted
/// replicas that wait for the stream on them to end, the tunnel, and the release allow-list.
struct Fleet<'a, P: PeerTable = tunnel::Tunnel> {
    id: Identity,
    /// This node's overlay network: replica addresses must lie inside it.
    overlay: Ipv4Net,
    deferred: Vec<ReplicaPeer>,
    release_hosts: upgrade::ReleaseHosts,
    tun: &'a P,
    state_dir: &'a Path,
}

impl<P: PeerTable> Fleet<'_, P> {
    /// A `Replicas` message from the stream on the replica `in_use`: checked (a bad list is logged and ignored),
    /// then the tunnel peers follow it, `identity.json` is rewritten if the list changed, and the release
    /// allow-list follows.
    async fn apply_replicas(&mut self, msg: &nimbus_proto::Replicas, in_use: &str) {
        let next = match replicas::validate(&msg.replicas, self.overlay, self.id.overlay_ip) {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the coordinator sent an invalid replica list; ignored, the tunnel keeps its peers (is the \
                     coordinator a compatible version?)"
                );
                return;
            }
        };
        let plan = replicas::plan_peers(&self.id.replica_peers(), &next, Some(in_use));
        for r in &plan.remove {
            self.remove_peer(r, "coordinator replica no longer listed: its tunnel peer is removed");
        }
        for (old, r) in &plan.rekey {
            let keys = tunnel::keys::public_key_from_base64(old).and_then(|old| Ok((old, r.key()?)));
            let changed = match keys {
                Ok((old, new)) => self.tun.set_peer_public_key(&old, new).await.map(|()| old),
                Err(e) => Err(e),
            };
            match changed {
                Ok(_) => {
                    tracing::info!(replica = %r.id, key = %r.public_key, "coordinator replica has a new WireGuard key")
                }
                Err(e) => {
                    tracing::warn!(replica = %r.id, error = %e, "cannot change the replica's WireGuard key in place; replacing its peer");
                    if let Ok(old) = tunnel::keys::public_key_from_base64(old) {
                        self.tun.remove_peer(&old);
                    }
                }
            }
        }
        for r in &plan.upsert {
            match replicas::peer_config(r).and_then(|c| self.tun.add_peer(c)) {
                Ok(()) => tracing::info!(
                    replica = %r.id, endpoint = %r.wg_endpoint, overlay_ip = %r.overlay_ip,
                    "coordinator replica's tunnel peer configured"
                ),
                Err(e) => {
                    tracing::warn!(replica = %r.id, error = %e, "cannot configure the coordinator replica's tunnel peer")
                }
            }
        }
        for r in plan.deferred {
            if !self.deferred.iter().any(|d| d.public_key == r.public_key) {
                tracing::info!(
                    replica = %r.id,
                    "coordinator replica no longer listed; its tunnel peer stays until the fleet stream on it ends"
                );
                self.deferred.push(r);
            }
        }
        let mut updated = self.id.clone();
        if updated.set_replicas(next) {
            tracing::info!(replicas = %replica_names(&updated.replica_peers()), "coordinator replica set changed");
            if let Err(e) = identity::save(self.state_dir, &updated) {
                tracing::error!(
                    error = %e,
                    "cannot record the new replica set in identity.json; a restarted agent starts from the old one"
                );
            }
        }
        self.id = updated;
        self.release_hosts
            .set(self.id.replica_peers().iter().map(|r| r.overlay_ip));
    }

    /// After a stream ended: the peers of replicas that left the list while it ran go now (unless the list has
    /// brought them back).
    fn settle(&mut self) {
        let listed = self.id.replica_peers();
        for r in std::mem::take(&mut self.deferred) {
            if !listed.iter().any(|l| l.public_key == r.public_key) {
                self.remove_peer(
                    &r,
                    "fleet stream on an unlisted coordinator replica ended: its tunnel peer is removed",
                );
            }
        }
    }

    fn remove_peer(&self, r: &ReplicaPeer, why: &'static str) {
        match r.key() {
            Ok(k) => {
                self.tun.remove_peer(&k);
                tracing::info!(replica = %r.id, "{why}");
            }
            Err(e) => tracing::warn!(replica = %r.id, error = %e, "cannot remove the replica's tunnel peer"),
        }
    }

    /// Switches the replica whose key is `k.current` to `k.next` (`coordinator_public_key` too when it is that
    /// replica): recorded in identity.json first (a crash after it restarts on the new key, which the coordinator
    /// accepts during the overlap), then a handshake on it at once. The fleet stream runs on: the overlay
    /// addresses do not change.
    async fn follow_key_rotation(&mut self, k: &nimbus_proto::CoordinatorKeys) -> Result<(), AgentError> {
        let next = tunnel::keys::public_key_from_base64(&k.next)?;
        let current = tunnel::keys::public_key_from_base64(&k.current)?;
        let mut updated = self.id.clone();
        match updated.follow_key(&current, &next) {
            KeyFollow::AlreadyFollowed => Ok(()),
            KeyFollow::UnknownKey => {
                tracing::warn!(announced_current = %k.current, "key rotation names a current coordinator key no replica of this agent uses; ignored");
                Ok(())
            }
            KeyFollow::Switched { replica } => {
                identity::save(self.state_dir, &updated)?;
                self.id = updated;
                self.tun.set_peer_public_key(&current, next).await?;
                tracing::info!(%replica, next = %k.next, retire_at = k.retire_at_unix, "switched to the coordinator replica's new WireGuard key");
                Ok(())
            }
        }
    }
}

/// The sessions' way to the upgrade task: desired states in, outcomes out.
struct UpgradeLink<'a> {
    handle: &'a upgrade::Handle,
    outcomes: &'a mut mpsc::Receiver<upgrade::Outcome>,
}

/// Reconnect forever, moving between the coordinator replicas; return only on revocation, or to restart into
/// an upgraded version.
#[allow(clippy::too_many_arguments)]
async fn stay_connected(
    cfg: &Config,
    fleet: &mut Fleet<'_>,
    key: &tunnel::PublicKey,
    stop: watch::Receiver<bool>,
    latest: inventory::Latest,
    probes: &probes::ProbeHandle,
    events: &dyn Events,
    mut upgrades: UpgradeLink<'_>,
    metrics: &crate::metrics::AgentMetrics,
) -> Result<Stopped, AgentError> {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut failover = Failover::new(fleet.id.primary_replica().as_deref());
    let mut last_ok = Instant::now();
    let mut last_check = Instant::now();
    loop {
        let Some(target) = failover.target(&fleet.id.replica_peers()).cloned() else {
            // `replica_peers` is never empty.
            return Err(AgentError::Other(
                "no coordinator replica known; re-enroll this host".into(),
            ));
        };
        let ended = session(
            &target,
            fleet,
            cfg,
            stop.clone(),
            latest.clone(),
            probes,
            events,
            &mut upgrades,
            metrics,
        )
        .await;
        fleet.settle();
        let pace = match ended {
            Ok(Ended::Stopped) => {
                last_ok = Instant::now();
                backoff.reset();
                failover.established(&target.id);
                Pace::Backoff
            }
            Ok(Ended::Restart(version)) => return Ok(Stopped::Restart { version }),
            Err(SessionError::Revoked(reason)) => return Err(AgentError::Revoked(reason)),
            Err(SessionError::Failed { established, why }) => {
                if established {
                    last_ok = Instant::now();
                    backoff.reset();
                    failover.established(&target.id);
                }
                events.disconnected(&why);
                let list = fleet.id.replica_peers();
                let pace = failover.failed_peer(&list, &target);
                let wait = match pace {
                    Pace::Prompt => format!("< {SWITCH_DELAY:?}"),
                    Pace::Backoff => format!("~{:?}", backoff.base()),
                };
                tracing::warn!(replica = %target.id, reason = %why, %wait, "fleet stream down; reconnecting");
                if let Some(next) = failover.target(&list)
                    && next.id != target.id
                {
                    tracing::info!(
                        from = %target.id,
                        to = %next.id,
                        to_fleet = %next.fleet_addr(),
                        "moving the fleet stream to another coordinator replica"
                    );
                    metrics.replica_switch();
                }
                pace
            }
        };
        if *stop.borrow() {
            return Ok(Stopped::Shutdown);
        }
        // The tunnel has stayed dead for a while: maybe we were revoked while offline.
        if last_ok.elapsed() >= cfg.revocation_check_after
            && last_check.elapsed() >= cfg.revocation_check_after.min(Duration::from_secs(60))
        {
            last_check = Instant::now();
            check_revoked(&fleet.id, key).await?;
        }
        let delay = match pace {
            Pace::Prompt => SWITCH_DELAY.mul_f64(rand::thread_rng().gen_range(0.0..1.0)),
            Pace::Backoff => backoff.next_delay(&mut rand::thread_rng()),
        };
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                Some(outcome) = upgrades.outcomes.recv() => match outcome {
                    upgrade::Outcome::Restart { version, .. } => {
                        metrics.upgrade_restart();
                        // No stream to report on: the new version reports on its first one.
                        tracing::info!(%version, "restarting into the new version (no fleet stream to report on)");
                        events.restarting(&version);
                        return Ok(Stopped::Restart { version });
                    }
                    other => tracing::debug!(
                        outcome = ?other,
                        "upgrade report not sent: no fleet stream (the next stream's desired state brings it again)"
                    ),
                },
            }
        }
    }
}

async fn check_revoked(id: &Identity, key: &tunnel::PublicKey) -> Result<(), AgentError> {
    let pin = match pki::Pin::parse(&id.ca_pin) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "stored CA pin unreadable; cannot ask about revocation");
            return Ok(());
        }
    };
    match enroll::status(&id.enroll_endpoint, &pin, key).await {
        Ok((NodeStatus::Revoked, reason)) => Err(AgentError::Revoked(reason)),
        Ok((NodeStatus::Pending, _)) => {
            tracing::warn!(
                "this node still waits for an operator: `nimbusctl node accept {}`",
                id.node_name
            );
            Ok(())
        }
        Ok((NodeStatus::Unknown, _)) => {
            tracing::error!(
                "the coordinator does not know this node's key (its state was lost or the node was deleted); \
                 to enroll again remove the state directory and start with a new token"
            );
            Ok(())
        }
        Ok(_) => {
            tracing::info!("the coordinator still admits this node; the tunnel is down for another reason");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask the enrollment endpoint about revocation");
            Ok(())
        }
    }
}

/// How a session ended without an error.
enum Ended {
    /// Shutdown was requested.
    Stopped,
    /// An upgrade to this version is installed; the last report went up.
    Restart(String),
}

enum SessionError {
    Revoked(String),
    Failed { established: bool, why: String },
}

/// The sender's stamp on every `ObservedState`: the running version, the releases this host rolled back, and
/// the error of a failed upgrade to that generation (unless the report has an error of its own).
fn stamp(state_dir: &Path, upgrade_error: &upgrade::LastError, mut m: AgentMessage) -> AgentMessage {
    if let Some(AgentMsg::Observed(o)) = &mut m.msg {
        o.agent_version = crate::version().to_string();
        o.failed_releases = upgrade::failed_releases(state_dir);
        upgrade_error.apply(o);
    }
    m
}

/// The report of the last desired state applied (from `desired.json`), sent first on every stream so the
/// coordinator learns the running version and failed releases (e.g. after the launcher rolled one back).
fn last_applied(state_dir: &Path) -> Option<nimbus_proto::ObservedState> {
    let rec = crate::desired::load(state_dir)?;
    (rec.generation > 0).then(|| nimbus_proto::ObservedState {
        generation: rec.generation,
        policy_revision: rec.policy_revision,
        ..Default::default()
    })
}

fn failed(established: bool, why: impl std::fmt::Display) -> SessionError {
    SessionError::Failed {
        established,
        why: why.to_string(),
    }
}

/// Starts the kubelet join a desired state asks for; its result goes up this stream (if it is still open; a
/// reconnecting agent pulls its desired state again and finds the node joined).
fn start_join(
    cfg: &Config,
    id: &Identity,
    d: &nimbus_proto::DesiredState,
    tx: &tokio::sync::mpsc::Sender<nimbus_proto::AgentMessage>,
) {
    let report = |tx: tokio::sync::mpsc::Sender<AgentMessage>| {
        move |observed| {
            let _ = tx.try_send(AgentMessage {
                msg: Some(AgentMsg::Observed(observed)),
            });
        }
    };
    if crate::join::leaving(&cfg.state_dir, d) {
        tracing::warn!(
            generation = d.generation,
            "the node left every environment: undoing its kubelet join"
        );
        let why = crate::join::Reset::Leave {
            generation: d.generation,
            policy_revision: d.policy_revision,
        };
        crate::join::spawn_reset(cfg.kubeadm.clone(), cfg.state_dir.clone(), why, report(tx.clone()));
        return;
    }
    match crate::join::job(&id.node_name, d) {
        Ok(None) => {}
        Ok(Some(job)) => {
            crate::join::spawn(cfg.kubeadm.clone(), cfg.state_dir.clone(), job, report(tx.clone()));
        }
        Err(e) => {
            tracing::error!(error = %e, "join request refused");
            let _ = tx.try_send(AgentMessage {
                msg: Some(AgentMsg::Observed(nimbus_proto::ObservedState {
                    generation: d.generation,
                    policy_revision: d.policy_revision,
                    error: String::new(),
                    kubelet: "failed".into(),
                    join_error: e,
                    ..Default::default()
                })),
            });
        }
    }
}

/// Applies the storage plan a desired state carries (in the background); the result goes up this stream.
/// `drift`: a periodic re-apply, reported only when it had to prepare something again.
fn start_storage(
    cfg: &Config,
    d: &nimbus_proto::DesiredState,
    drift: bool,
    tx: &tokio::sync::mpsc::Sender<nimbus_proto::AgentMessage>,
) {
    let tx = tx.clone();
    crate::volumes::spawn_apply(cfg, d, drift, move |observed| {
        let _ = tx.try_send(AgentMessage {
            msg: Some(AgentMsg::Observed(observed)),
        });
    });
}

/// Decommission: `kubeadm reset`, then remove the storage this agent created; one report with both.
fn start_decommission(cfg: &Config, tx: &tokio::sync::mpsc::Sender<nimbus_proto::AgentMessage>) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let why = crate::join::Reset::Decommission;
    crate::join::spawn_reset(cfg.kubeadm.clone(), cfg.state_dir.clone(), why, move |observed| {
        let _ = done_tx.send(observed);
    });
    let (cfg, tx) = (cfg.clone(), tx.clone());
    tokio::spawn(async move {
        let Ok(mut observed) = done_rx.await else { return };
        if observed.kubelet == "reset" {
            match tokio::task::spawn_blocking(move || crate::volumes::remove_blocking(&cfg)).await {
                Ok(Ok(removed)) => observed.storage = removed,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "decommission: the storage this agent created was not removed");
                    observed.kubelet = "failed".into();
                    observed.join_error = format!("removing the storage this agent created: {e}");
                }
                Err(e) => tracing::error!(error = %e, "decommission: storage removal task failed"),
            }
        }
        let _ = tx.try_send(AgentMessage {
            msg: Some(AgentMsg::Observed(observed)),
        });
    });
}

/// One fleet stream to the replica `replica`, from connect to its end.
#[allow(clippy::too_many_arguments)]
async fn session(
    replica: &ReplicaPeer,
    fleet: &mut Fleet<'_>,
    cfg: &Config,
    mut stop: watch::Receiver<bool>,
    mut latest: inventory::Latest,
    probes: &probes::ProbeHandle,
    events: &dyn Events,
    upgrades: &mut UpgradeLink<'_>,
    metrics: &crate::metrics::AgentMetrics,
) -> Result<Ended, SessionError> {
    let windows = probes.windows();
    let mut windows = windows.lock().await;
    let target = replica.fleet_addr();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| failed(false, e))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|e| {
        failed(
            false,
            format!(
                "cannot connect to replica {} at {target} through the tunnel: {e}",
                replica.id
            ),
        )
    })?;
    let mut client = FleetClient::new(channel);

    let (tx, rx) = mpsc::channel::<AgentMessage>(16);
    let send = |m: AgentMsg| AgentMessage { msg: Some(m) };
    let _ = tx.try_send(send(AgentMsg::Hello(Hello {
        node_id: fleet.id.node_id.clone(),
        agent_version: crate::version().into(),
        probe_port: u32::from(probes.port),
    })));
    if let Some(observed) = last_applied(&cfg.state_dir) {
        let _ = tx.try_send(send(AgentMsg::Observed(observed)));
    }
    // The current inventory goes first on every stream (the coordinator may have lost it); later ones
    // only when they change.
    if let Some(inv) = latest.borrow_and_update().clone() {
        let _ = tx.try_send(send(AgentMsg::Inventory(inventory::message(&inv))));
    }
    let state_dir = cfg.state_dir.clone();
    let upgrade_error = upgrades.handle.last_error();
    let outbound = ReceiverStream::new(rx).map(move |m| stamp(&state_dir, &upgrade_error, m));
    let mut inbound = client
        .channel(outbound)
        .await
        .map_err(|s| failed(false, s.message()))?
        .into_inner();

    let interval = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
        Ok(Ok(Some(m))) => match m.msg {
            Some(CoordMsg::Welcome(w)) => Duration::from_secs(u64::from(w.heartbeat_interval_secs.max(1))),
            Some(CoordMsg::Revoked(r)) => return Err(SessionError::Revoked(r.reason)),
            _ => return Err(failed(false, "the coordinator did not start with Welcome")),
        },
        Ok(Ok(None)) => return Err(failed(false, "the coordinator closed the stream")),
        Ok(Err(s)) => return Err(failed(false, s.message())),
        Err(_) => return Err(failed(false, "no Welcome within 10 s")),
    };
    tracing::info!(node = %fleet.id.node_name, replica = %replica.id, fleet = %target, "fleet stream open");
    let _open = metrics.stream_opened();
    // `connected` (READY=1) waits for the first heartbeat answer: the coordinator handles the stream's messages
    // in order, so by then it has taken Hello and the first inventory report. The launcher counts READY as healthy.
    let mut announced = false;
    // The last desired state, without its join instruction: what the drift check restores.
    let mut last_desired = nimbus_proto::DesiredState::default();
    match client.get_desired_state(DesiredStateRequest {}).await {
        Ok(d) => {
            tracing::info!(generation = d.get_ref().generation, "desired state pulled");
            if let Some(observed) = crate::desired::apply(&cfg.state_dir, d.get_ref()) {
                let _ = tx.try_send(send(AgentMsg::Observed(observed)));
            }
            start_join(cfg, &fleet.id, d.get_ref(), &tx);
            start_storage(cfg, d.get_ref(), false, &tx);
            upgrades.handle.offer(d.get_ref());
            last_desired = nimbus_proto::DesiredState {
                join: None,
                ..d.into_inner()
            };
        }
        Err(s) => tracing::warn!(error = %s.message(), "cannot pull desired state"),
    }
    let mut drift_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cfg.drift_check_interval,
        cfg.drift_check_interval,
    );

    let mut tick = tokio::time::interval(interval);
    let mut seq = 0u64;
    let mut last_ack = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if last_ack.elapsed() > interval * MISSED_ACKS {
                    return Err(failed(true, format!("no heartbeat answer for {:?}", last_ack.elapsed())));
                }
                seq += 1;
                metrics.heartbeat_sent(seq);
                if tx.send(send(AgentMsg::Heartbeat(Heartbeat { seq }))).await.is_err() {
                    return Err(failed(true, "stream closed"));
                }
            }
            changed = latest.changed() => {
                if changed.is_err() {
                    return Err(failed(true, "the inventory watcher stopped"));
                }
                let inv = latest.borrow_and_update().clone();
                if let Some(inv) = inv
                    && tx.send(send(AgentMsg::Inventory(inventory::message(&inv)))).await.is_err()
                {
                    return Err(failed(true, "stream closed"));
                }
            }
            _ = drift_tick.tick() => {
                if let Some(observed) = crate::drift::check(&cfg.state_dir, &cfg.kubeadm, &last_desired)
                    && tx.send(send(AgentMsg::Observed(observed))).await.is_err()
                {
                    return Err(failed(true, "stream closed"));
                }
                start_storage(cfg, &last_desired, true, &tx);
            }
            Some(w) = windows.recv() => {
                metrics.probe_window(&w);
                let mut batch = vec![probes::window_message(&w)];
                while let Ok(w) = windows.try_recv() {
                    metrics.probe_window(&w);
                    batch.push(probes::window_message(&w));
                }
                let report = nimbus_proto::LatencyReport { windows: batch };
                if tx.send(send(AgentMsg::Latency(report))).await.is_err() {
                    return Err(failed(true, "stream closed"));
                }
            }
            m = inbound.message() => match m {
                Ok(Some(m)) => match m.msg {
                    Some(CoordMsg::HeartbeatAck(ack)) => {
                        metrics.heartbeat_acked(ack.seq);
                        last_ack = Instant::now();
                        if !announced {
                            announced = true;
                            events.connected(&fleet.id);
                            upgrades.handle.ready();
                        }
                    }
                    Some(CoordMsg::Revoked(r)) => {
                        tracing::error!(reason = %r.reason, "the coordinator revoked this node");
                        return Err(SessionError::Revoked(r.reason));
                    }
                    Some(CoordMsg::DesiredState(d)) => {
                        tracing::info!(generation = d.generation, "desired state pushed");
                        if let Some(observed) = crate::desired::apply(&cfg.state_dir, &d)
                            && tx.send(send(AgentMsg::Observed(observed))).await.is_err()
                        {
                            return Err(failed(true, "stream closed"));
                        }
                        start_join(cfg, &fleet.id, &d, &tx);
                        start_storage(cfg, &d, false, &tx);
                        upgrades.handle.offer(&d);
                        last_desired = nimbus_proto::DesiredState { join: None, ..d };
                    }
                    Some(CoordMsg::Decommission(d)) => {
                        tracing::warn!(reason = %d.reason, "the coordinator is decommissioning this node");
                        start_decommission(cfg, &tx);
                        last_desired = nimbus_proto::DesiredState::default();
                    }
                    Some(CoordMsg::ProbeConfig(c)) => {
                        tracing::debug!(generation = c.generation, targets = c.targets.len(), "probe configuration");
                        probes.configure(c);
                    }
                    Some(CoordMsg::CoordinatorKeys(k)) => {
                        // Announced over this stream by a replica (they share the store, so any may announce
                        // another's rotation); it applies to the replica whose key is `current`. Until it is
                        // followed, the old key keeps working for the overlap; a failure is retried at the next
                        // announcement (every reconnect).
                        if let Err(e) = fleet.follow_key_rotation(&k).await {
                            tracing::error!(error = %e, next = %k.next, "cannot switch to the coordinator's new WireGuard key");
                        }
                    }
                    Some(CoordMsg::Replicas(r)) => {
                        tracing::debug!(replicas = r.replicas.len(), "replica list");
                        fleet.apply_replicas(&r, &replica.id).await;
                    }
                    Some(CoordMsg::Welcome(_)) | None => {}
                },
                Ok(None) => return Err(failed(true, "the coordinator closed the stream")),
                Err(s) => return Err(failed(true, s.message())),
            },
            Some(outcome) = upgrades.outcomes.recv() => match outcome {
                upgrade::Outcome::Report(observed) => {
                    if tx.send(send(AgentMsg::Observed(observed))).await.is_err() {
                        return Err(failed(true, "stream closed"));
                    }
                }
                upgrade::Outcome::Restart { version, observed } => {
                    metrics.upgrade_restart();
                    // As on SIGTERM, but without STOPPING=1 (see `Events::restarting`): the last report, the stream
                    // closed, then exit 75.
                    events.restarting(&version);
                    let _ = tx.send(send(AgentMsg::Observed(observed))).await;
                    drop(tx);
                    // The coordinator ends its side once it has read ours to the end (background jobs holding a
                    // sender keep ours open: then the grace period ends it).
                    let drained = tokio::time::timeout(RESTART_CLOSE_GRACE, async {
                        while let Ok(Some(_)) = inbound.message().await {}
                    })
                    .await;
                    tracing::info!(%version, closed = drained.is_ok(), "fleet stream closed; restarting into the new version");
                    return Ok(Ended::Restart(version));
                }
                upgrade::Outcome::Nothing => {}
            },
            _ = stop.changed() => return Ok(Ended::Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::Mutex;

    use ipnet::IpNet;

    /// The tunnel's peer table without a TUN device: the same `Router` the tunnel drives.
    struct RouterPeers(Mutex<tunnel::Router>);

    impl PeerTable for RouterPeers {
        fn add_peer(&self, cfg: tunnel::PeerConfig) -> Result<(), tunnel::TunnelError> {
            self.0.lock().unwrap().add_peer(cfg)
        }

        fn remove_peer(&self, key: &tunnel::PublicKey) -> bool {
            self.0.lock().unwrap().remove_peer(key)
        }

        async fn set_peer_public_key(
            &self,
            old: &tunnel::PublicKey,
            new: tunnel::PublicKey,
        ) -> Result<(), tunnel::TunnelError> {
            self.0.lock().unwrap().set_peer_public_key(old, new, &mut Vec::new())
        }
    }

    impl RouterPeers {
        /// key byte (all 32 bytes are the same in these tests) → (endpoint, allowed IPs).
        fn peers(&self) -> BTreeMap<u8, (Option<SocketAddr>, Vec<IpNet>)> {
            self.0
                .lock()
                .unwrap()
                .stats()
                .into_iter()
                .map(|p| (p.public_key.as_bytes()[0], (p.endpoint, p.allowed_ips)))
                .collect()
        }
    }

    fn replica(id: &str, key: u8, n: u8) -> nimbus_proto::Replica {
        nimbus_proto::Replica {
            id: id.into(),
            wg_public_key: vec![key; 32],
            wg_endpoint: format!("192.0.2.{n}:51820"),
            overlay_ip: format!("100.96.0.{n}"),
            fleet_port: 7000,
        }
    }

    fn msg(list: Vec<nimbus_proto::Replica>) -> nimbus_proto::Replicas {
        nimbus_proto::Replicas { replicas: list }
    }

    fn peer(n: u8) -> (Option<SocketAddr>, Vec<IpNet>) {
        (
            Some(format!("192.0.2.{n}:51820").parse().unwrap()),
            vec![format!("100.96.0.{n}/32").parse().unwrap()],
        )
    }

    /// An identity enrolled with replica `a` (key 1) of a, b (key 2), c (key 3); the router has their peers.
    fn setup(dir: &Path) -> (Identity, RouterPeers) {
        let mut id = Identity {
            node_id: "n1".into(),
            node_name: "agent-1".into(),
            overlay_ip: Ipv4Addr::new(100, 96, 0, 50),
            overlay_prefix_len: 16,
            coordinator_public_key: tunnel::keys::public_key_to_base64(&[1u8; 32].into()),
            coordinator_wg_endpoint: "192.0.2.1:51820".parse().unwrap(),
            coordinator_overlay_ip: Ipv4Addr::new(100, 96, 0, 1),
            fleet_port: 7000,
            mtu: 1420,
            enroll_endpoint: "192.0.2.1:7443".into(),
            ca_pin: "sha256:00".into(),
            replicas: Vec::new(),
        };
        let list = vec![replica("a", 1, 1), replica("b", 2, 2), replica("c", 3, 3)];
        let overlay = id.overlay_net().unwrap();
        id.set_replicas(replicas::validate(&list, overlay, id.overlay_ip).unwrap());
        identity::save(dir, &id).unwrap();
        let router = RouterPeers(Mutex::new(tunnel::Router::new(tunnel::keys::generate_secret())));
        for r in id.replica_peers() {
            router.add_peer(replicas::peer_config(&r).unwrap()).unwrap();
        }
        (id, router)
    }

    fn fleet<'a>(id: Identity, router: &'a RouterPeers, dir: &'a Path) -> Fleet<'a, RouterPeers> {
        Fleet {
            overlay: id.overlay_net().unwrap(),
            release_hosts: upgrade::ReleaseHosts::new(id.replica_peers().iter().map(|r| r.overlay_ip)),
            id,
            deferred: Vec::new(),
            tun: router,
            state_dir: dir,
        }
    }

    fn ips(last: &[u8]) -> Vec<Ipv4Addr> {
        last.iter().map(|n| Ipv4Addr::new(100, 96, 0, *n)).collect()
    }

    #[tokio::test]
    async fn a_replicas_message_reshapes_the_peers_and_keeps_the_one_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (id, router) = setup(dir.path());
        let mut fleet = fleet(id, &router, dir.path());
        assert_eq!(router.peers().into_keys().collect::<Vec<_>>(), [1, 2, 3]);

        // The stream is on b. New list: a with a new key (11) and a moved endpoint, b gone, c as before, d new.
        let mut a = replica("a", 11, 1);
        a.wg_endpoint = "198.51.100.1:51820".into();
        fleet
            .apply_replicas(&msg(vec![a, replica("c", 3, 3), replica("d", 4, 4)]), "b")
            .await;
        let peers = router.peers();
        assert_eq!(peers.keys().copied().collect::<Vec<_>>(), [2, 3, 4, 11], "{peers:?}");
        assert_eq!(
            peers[&11],
            (
                Some("198.51.100.1:51820".parse().unwrap()),
                vec!["100.96.0.1/32".parse().unwrap()]
            )
        );
        assert_eq!(peers[&2], peer(2), "the peer the stream is on stays");
        assert_eq!(peers[&3], peer(3));
        assert_eq!(peers[&4], peer(4));
        // identity.json and the release allow-list follow; b waits for its stream to end.
        let saved = identity::load(dir.path()).unwrap().unwrap();
        assert_eq!(saved, fleet.id);
        let ids: Vec<_> = saved.replica_peers().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["a", "c", "d"]);
        assert_eq!(
            saved.coordinator_public_key,
            tunnel::keys::public_key_to_base64(&[1u8; 32].into()),
            "coordinator_* fields only change by key rotation"
        );
        assert_eq!(fleet.release_hosts.get(), ips(&[1, 3, 4]));
        assert_eq!(fleet.deferred.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b"]);

        // The stream on b ended: its peer goes.
        fleet.settle();
        assert_eq!(router.peers().into_keys().collect::<Vec<_>>(), [3, 4, 11]);
        assert!(fleet.deferred.is_empty());
    }

    #[tokio::test]
    async fn an_unlisted_replica_that_comes_back_keeps_its_peer() {
        let dir = tempfile::tempdir().unwrap();
        let (id, router) = setup(dir.path());
        let mut fleet = fleet(id, &router, dir.path());
        fleet
            .apply_replicas(&msg(vec![replica("a", 1, 1), replica("c", 3, 3)]), "b")
            .await;
        fleet
            .apply_replicas(
                &msg(vec![replica("a", 1, 1), replica("b", 2, 2), replica("c", 3, 3)]),
                "b",
            )
            .await;
        fleet.settle();
        assert_eq!(router.peers().into_keys().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(router.peers()[&2], peer(2));
    }

    #[tokio::test]
    async fn a_bad_or_unchanged_list_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (id, router) = setup(dir.path());
        let before = id.clone();
        let mut fleet = fleet(id, &router, dir.path());
        // identity.json is written only when the list changed: gone, it stays gone.
        std::fs::remove_file(identity::identity_path(dir.path())).unwrap();
        let mut bad = replica("d", 4, 4);
        bad.overlay_ip = "10.0.0.4".into();
        for m in [
            msg(vec![replica("a", 1, 1), bad]),
            msg(vec![]),
            msg(vec![replica("a", 1, 1), replica("b", 2, 2), replica("c", 3, 3)]),
        ] {
            fleet.apply_replicas(&m, "a").await;
            assert_eq!(router.peers().into_keys().collect::<Vec<_>>(), [1, 2, 3]);
            assert_eq!(fleet.id, before);
            assert_eq!(fleet.release_hosts.get(), ips(&[1, 2, 3]));
            assert!(!identity::identity_path(dir.path()).exists());
        }
    }

    #[tokio::test]
    async fn key_rotation_moves_the_announced_replicas_peer() {
        let dir = tempfile::tempdir().unwrap();
        let (id, router) = setup(dir.path());
        let mut fleet = fleet(id, &router, dir.path());
        let b64 = |n: u8| tunnel::keys::public_key_to_base64(&[n; 32].into());
        let keys = nimbus_proto::CoordinatorKeys {
            current: b64(2),
            next: b64(12),
            retire_at_unix: 0,
        };
        fleet.follow_key_rotation(&keys).await.unwrap();
        assert_eq!(router.peers().into_keys().collect::<Vec<_>>(), [1, 3, 12]);
        assert_eq!(router.peers()[&12], peer(2));
        let saved = identity::load(dir.path()).unwrap().unwrap();
        assert_eq!(saved.replicas[1].public_key, b64(12));
        assert_eq!(saved.coordinator_public_key, b64(1));
        // Announced again on the next stream: nothing to do. An unknown key: ignored.
        fleet.follow_key_rotation(&keys).await.unwrap();
        let unknown = nimbus_proto::CoordinatorKeys {
            current: b64(9),
            next: b64(19),
            retire_at_unix: 0,
        };
        fleet.follow_key_rotation(&unknown).await.unwrap();
        assert_eq!(router.peers().into_keys().collect::<Vec<_>>(), [1, 3, 12]);
        assert_eq!(identity::load(dir.path()).unwrap().unwrap(), saved);
    }
}
