//! Start-up, serving and draining of the coordinator.
//!
//! Order matters and is chosen so that a bad input fails before anything is
//! left half-made: data dir → store → CA → enrollment listener → admin
//! socket → tunnel (TUN + UDP) → fleet listener (bound to the TUN device).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nimbus_proto::admin_server::AdminServer;
use nimbus_proto::enrollment_server::EnrollmentServer;
use nimbus_proto::fleet_server::FleetServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

use crate::admin::AdminService;
use crate::config::Config;
use crate::context::{Ctx, key_from_id};
use crate::enroll::{EnrollmentService, peer_for};
use crate::error::{CoordError, listen_hint};
use crate::fleet::FleetService;
use crate::ipam::OverlayPlan;
use crate::state::{NodeStatus, State};
use crate::store::{SledStore, Store};

/// How long draining may take on SIGTERM before open connections are cut.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// A coordinator that has bound everything and is serving.
pub struct Running {
    pub ctx: Arc<Ctx>,
    pub enroll_addr: SocketAddr,
    store: Arc<dyn Store>,
    /// On etcd: this coordinator's hold on its prefix (released at shutdown).
    sole: Option<crate::leader::Leadership>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), CoordError>>>,
}

/// Create `dir` (mode 0700) if missing and check it is writable.
pub fn prepare_data_dir(dir: &Path) -> Result<(), CoordError> {
    let err = |source| CoordError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(err)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn bind_admin_socket(path: &Path) -> Result<UnixListener, CoordError> {
    let err = |reason: String| CoordError::AdminSocket {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| err(format!("cannot create directory {}: {e}", parent.display())))?;
    }
    if path.exists() {
        // A live coordinator answers; a stale socket from a crash does not.
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(err(
                    "another coordinator is serving this socket: stop it or choose another --admin-socket".into(),
                ));
            }
            Err(_) => std::fs::remove_file(path).map_err(|e| err(format!("cannot remove the stale socket: {e}")))?,
        }
    }
    let l = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot chmod 0600: {e}")))?;
    Ok(l)
}

/// A TCP listener that only accepts connections arriving through `device`
/// (SO_BINDTODEVICE). Binding to the overlay address alone is not enough:
/// Linux accepts packets for a local address on any interface.
fn bind_to_device(addr: SocketAddr, device: &str) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.bind_device(Some(device.as_bytes()))?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

/// Serve a tonic router on `incoming` until the shutdown signal.
macro_rules! spawn_server {
    ($router:expr, $incoming:expr, $shutdown:expr, $what:literal) => {{
        let mut rx = $shutdown.clone();
        let router = $router;
        let incoming = $incoming;
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.changed().await;
                })
                .await
                .map_err(|source| CoordError::Serve { what: $what, source })
        })
    }};
}

/// The store the configuration names: sled in `<data_dir>/state`, or etcd (connected and answering).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, CoordError> {
    match &config.store {
        crate::config::StoreSettings::Sled => Ok(Arc::new(SledStore::open(&config.data_dir.join("state"))?)),
        crate::config::StoreSettings::Etcd(e) => Ok(connect_etcd(e).await?),
    }
}

/// How long a coordinator waits to hold an etcd prefix alone at start (a crashed predecessor's lease runs out
/// within the leader TTL, 10 s).
const SOLE_COORDINATOR_WAIT: Duration = Duration::from_secs(15);

/// Until several replicas are supported, a coordinator on etcd holds the prefix alone: it takes the leader key
/// (lease-bound, released when it stops or dies) and refuses to start while another coordinator holds it, so two
/// coordinators never drive one fleet's state by mistake.
async fn hold_prefix_alone(
    store: Arc<crate::store::EtcdStore>,
    config: &Config,
) -> Result<crate::leader::Leadership, CoordError> {
    let id = format!(
        "{}-{}",
        config.advertise_address.to_string().replace([':', '%'], "-"),
        config.enroll_listen.port()
    );
    let leadership = crate::leader::Leadership::etcd(store, crate::leader::LeaderOptions::new(id))
        .map_err(|e| CoordError::Config(vec![format!("etcd leader election: {e}")]))?;
    if leadership.wait_leader(SOLE_COORDINATOR_WAIT).await.is_none() {
        let holder = match leadership.role() {
            crate::leader::Role::Follower { leader: Some(l) } => l,
            _ => "unknown".into(),
        };
        return Err(CoordError::Config(vec![format!(
            "another coordinator ({holder}) holds this etcd prefix; several replicas are not supported yet: stop it, or give this one its own etcd_prefix"
        )]));
    }
    Ok(leadership)
}

/// Connects to etcd as `e` says and checks it answers.
async fn connect_etcd(e: &crate::config::EtcdSettings) -> Result<Arc<crate::store::EtcdStore>, CoordError> {
    let mut opts = crate::store::EtcdOptions::new(e.endpoints.clone()).with_prefix(e.prefix.clone());
    if let Some((ca, cert, key)) = &e.tls {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p)
                .map_err(|err| CoordError::Config(vec![format!("cannot read {what} {}: {err}", p.display())]))
        };
        opts = opts.with_tls(crate::store::EtcdTls {
            ca_pem: read(ca, "etcd_ca")?,
            client_cert_pem: read(cert, "etcd_cert")?,
            client_key_pem: read(key, "etcd_key")?,
            domain_name: None,
        });
    }
    let endpoints = e.endpoints.join(",");
    let store = tokio::task::spawn_blocking(move || crate::store::EtcdStore::connect(opts))
        .await
        .map_err(|err| CoordError::Config(vec![format!("connecting to etcd: {err}")]))??;
    tracing::info!(%endpoints, prefix = %e.prefix, "state in etcd");
    Ok(Arc::new(store))
}

/// TLS connections accepted on `listener`, handshakes done concurrently (a slow or silent client holds up no
/// one; a failed handshake is logged at debug and dropped).
fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "enrollment accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            // As tonic does on its own listeners: without it, Nagle and delayed ACKs add ~40 ms to each
            // enrollment round trip (found by nimbus-bench's enrollment section).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "enrollment TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "enrollment TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Refused remote admin calls to state-changing methods go to the audit log (reads are only logged).
fn refusals_to_audit(ctx: &Arc<Ctx>) -> crate::auth::layer::OnRefused {
    let auditor = Arc::clone(&ctx.audit);
    Arc::new(move |r: crate::auth::layer::Refusal| {
        if crate::auth::required_role(&r.method).is_some_and(|role| role == crate::auth::Role::Viewer) {
            return;
        }
        let who = r
            .caller
            .map_or_else(|| audit::Principal::system("unauthenticated"), |c| c.principal);
        let rec = audit::Record::new(who, format!("admin.{}", r.method), "")
            .with_from(r.from)
            .with_result(audit::Outcome::refused(r.reason));
        let auditor = Arc::clone(&auditor);
        tokio::spawn(async move { auditor.record(rec).await });
    })
}

/// Bind everything and start serving. Returns once the coordinator is ready.
pub async fn start(config: Config) -> Result<Running, CoordError> {
    pki::install_crypto_provider();
    prepare_data_dir(&config.data_dir)?;
    let (store, sole): (Arc<dyn Store>, Option<crate::leader::Leadership>) = match &config.store {
        crate::config::StoreSettings::Etcd(e) => {
            let etcd = connect_etcd(e).await?;
            let sole = hold_prefix_alone(Arc::clone(&etcd), &config).await?;
            (etcd, Some(sole))
        }
        crate::config::StoreSettings::Sled => (open_store(&config).await?, None),
    };
    let overlay = OverlayPlan::new(config.overlay_cidr).map_err(|e| CoordError::Config(vec![e.to_string()]))?;
    let coordinator_ip = overlay.coordinator_ip;
    let state = Arc::new(State::open(Arc::clone(&store), overlay)?);
    let metrics = crate::metrics::Metrics::default();
    let audit = crate::auditlog::Auditor::open(&config.audit, &config.data_dir, Arc::clone(&store))
        .map_err(|e| CoordError::Config(vec![format!("audit log: {e}")]))?
        .with_metrics(metrics.clone());

    let sans = vec![config.advertise_address.to_string()];
    let mut own_ca = None;
    let (identity, ca_pin) = match &config.tls {
        None => {
            let ca = pki::CertificateAuthority::load_or_create(&config.data_dir.join("pki"))?;
            let issued = (ca.issue_server_identity(&sans)?, ca.pin());
            own_ca = Some(ca);
            issued
        }
        Some(files) => {
            let ca_pem = std::fs::read_to_string(&files.ca).map_err(|source| CoordError::DataDir {
                path: files.ca.clone(),
                source,
            })?;
            (
                pki::ServerIdentity::from_files(&files.cert, &files.key)?.with_ca(&ca_pem)?,
                pki::Pin::of_pem(&ca_pem)?,
            )
        }
    };

    let enroll_listener = TcpListener::bind(config.enroll_listen)
        .await
        .map_err(|source| CoordError::Listen {
            what: "enrollment (TLS)",
            addr: config.enroll_listen.to_string(),
            hint: listen_hint(&source),
            source,
        })?;
    let enroll_addr = enroll_listener.local_addr().unwrap_or(config.enroll_listen);
    let metrics_listener = match config.metrics_listen {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| CoordError::Listen {
            what: "metrics (HTTP)",
            addr: addr.to_string(),
            hint: listen_hint(&source),
            source,
        })?),
    };
    if let Some((dir, _)) = &config.packages
        && !dir.is_dir()
    {
        return Err(CoordError::Config(vec![format!(
            "packages_dir {} is not a directory; create it and put the agent packages there",
            dir.display()
        )]));
    }
    // The mirror's certificate is checked now, so a bad one stops the start with a clear message.
    let packages_tls = match &config.packages_tls {
        None => None,
        Some((cert, key)) => Some(pki::ServerIdentity::from_files(cert, key)?.rustls_server_config()?),
    };
    let packages_listener = match &config.packages {
        None => None,
        Some((dir, addr)) => Some((
            dir.clone(),
            TcpListener::bind(addr).await.map_err(|source| CoordError::Listen {
                what: "package mirror",
                addr: addr.to_string(),
                hint: listen_hint(&source),
                source,
            })?,
        )),
    };
    let admin_listener = bind_admin_socket(&config.admin_socket)?;

    let wg_key = tunnel::keys::load_or_create_secret(&config.data_dir.join("wg.key"))?;
    let tunnel = tunnel::Tunnel::start(tunnel::TunnelConfig {
        private_key: wg_key,
        listen: config.wg_listen,
        tun_name: config.tun_name.clone(),
        address: coordinator_ip,
        prefix_len: config.overlay_cidr.prefix_len(),
        mtu: config.mtu,
    })
    .await;
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&config.admin_socket);
            return Err(e.into());
        }
    };

    let fleet_addr = SocketAddr::new(IpAddr::V4(coordinator_ip), config.fleet_port);
    let fleet_listener = match bind_to_device(fleet_addr, tunnel.device_name()) {
        Ok(l) => l,
        Err(source) => {
            let _ = std::fs::remove_file(&config.admin_socket);
            tunnel.shutdown().await;
            return Err(CoordError::Listen {
                what: "fleet (overlay)",
                addr: fleet_addr.to_string(),
                hint: listen_hint(&source),
                source,
            });
        }
    };

    // The agent-release repository: on the overlay address, bound to the TUN device like the fleet listener.
    let release_addr = SocketAddr::new(IpAddr::V4(coordinator_ip), config.release_port);
    let release_listener = match bind_to_device(release_addr, tunnel.device_name()) {
        Ok(l) => l,
        Err(source) => {
            let _ = std::fs::remove_file(&config.admin_socket);
            tunnel.shutdown().await;
            return Err(CoordError::Listen {
                what: "agent releases (overlay)",
                addr: release_addr.to_string(),
                hint: listen_hint(&source),
                source,
            });
        }
    };

    let config_probe = (config.probe_interval, config.probe_window, config.probe_key_rotation);
    let rotations = crate::rotation::Rotations::new(
        &config.data_dir,
        pki::SwappableServerCert::new(&identity)?,
        own_ca,
        ca_pin,
        sans,
        config.tls.clone(),
    );
    let ctx = Arc::new(Ctx {
        config,
        state,
        sessions: crate::sessions::Sessions::new(),
        tunnel,
        coordinator_ip,
        rotations,
        metrics,
        probes: crate::probes::Probes::new(crate::probes::ProbeTiming {
            interval: config_probe.0,
            window: config_probe.1,
            key_rotation: config_probe.2,
        }),
        join_tokens: crate::join::Issued::default(),
        cluster_sync: crate::clustersync::ClusterSync::default(),
        audit: Arc::new(audit),
    });

    // A WireGuard key rotation interrupted by a restart goes on where it was.
    ctx.rotations.resume_wireguard(&ctx.tunnel)?;
    // Every active node is a WireGuard peer again after a restart.
    let nodes = ctx
        .state(|s| s.list_nodes())
        .await
        .map_err(|e| CoordError::Config(vec![e.message().to_string()]))?;
    let mut peers = 0usize;
    for n in nodes.iter().filter(|n| n.status == NodeStatus::Active) {
        match key_from_id(&n.public_key) {
            Some(k) => {
                ctx.tunnel.add_peer(peer_for(n, k))?;
                peers += 1;
            }
            None => tracing::error!(node = %n.name, "stored public key is invalid; node skipped"),
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let enroll_srv = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .layer(crate::metrics::RpcMetricsLayer::new(ctx.metrics.clone()))
        .add_service(EnrollmentServer::new(EnrollmentService::new(Arc::clone(&ctx))));
    // TLS is terminated here rather than by tonic so the certificate can be swapped in place (rotation).
    let enroll_tls = ctx.rotations.enroll_cert.server_config(&[b"h2"])?;
    tasks.push(spawn_server!(
        enroll_srv,
        tls_incoming(enroll_listener, enroll_tls, shutdown_rx.clone()),
        shutdown_rx,
        "enrollment"
    ));

    let fleet_srv = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(crate::metrics::RpcMetricsLayer::new(ctx.metrics.clone()))
        .add_service(FleetServer::new(FleetService::new(
            Arc::clone(&ctx),
            shutdown_rx.clone(),
        )));
    tasks.push(spawn_server!(
        fleet_srv,
        tonic::transport::server::TcpIncoming::from(fleet_listener).with_nodelay(Some(true)),
        shutdown_rx,
        "fleet"
    ));

    let admin_srv = tonic::transport::Server::builder()
        .layer(crate::metrics::RpcMetricsLayer::new(ctx.metrics.clone()))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&ctx))));
    tasks.push(spawn_server!(
        admin_srv,
        UnixListenerStream::new(admin_listener),
        shutdown_rx,
        "admin"
    ));

    if let Some(remote) = &ctx.config.admin_remote {
        let tls = crate::auth::layer::tls_config(remote, &identity)?;
        let gate = crate::auth::layer::Gate::new(remote, Some(refusals_to_audit(&ctx)))
            .map_err(|e| CoordError::Config(vec![format!("remote admin API: {e}")]))?;
        let listener = TcpListener::bind(remote.listen)
            .await
            .map_err(|source| CoordError::Listen {
                what: "admin (remote, TLS)",
                addr: remote.listen.to_string(),
                hint: listen_hint(&source),
                source,
            })?;
        tracing::info!(
            addr = %remote.listen,
            client_certs = remote.client_ca.is_some(),
            oidc_issuer = remote.oidc.as_ref().map(|o| o.issuer.as_str()).unwrap_or("-"),
            "remote admin API serving (TLS; every call authenticated and checked against its role)"
        );
        let remote_srv = tonic::transport::Server::builder()
            .tls_config(tls)
            .map_err(|source| CoordError::Serve {
                what: "admin (remote)",
                source,
            })?
            .timeout(Duration::from_secs(300))
            .layer(crate::metrics::RpcMetricsLayer::new(ctx.metrics.clone()))
            .layer(crate::auth::layer::GateLayer::new(gate))
            .add_service(AdminServer::new(AdminService::new(Arc::clone(&ctx))));
        tasks.push(spawn_server!(
            remote_srv,
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown_rx,
            "admin (remote)"
        ));
    }

    if let Some((dir, l)) = packages_listener {
        let rx = shutdown_rx.clone();
        let scheme = if packages_tls.is_some() { "https" } else { "http" };
        tracing::info!(dir = %dir.display(), addr = ?l.local_addr().ok(), scheme, "package mirror serving");
        let mirror = Arc::new(crate::packages::Mirror::new(dir));
        tasks.push(tokio::spawn(async move {
            crate::packages::serve(l, mirror, packages_tls, rx)
                .await
                .map_err(|source| CoordError::Listen {
                    what: "package mirror",
                    addr: "accept".into(),
                    hint: listen_hint(&source),
                    source,
                })
        }));
    }
    if let Some(l) = metrics_listener {
        let (ctx, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            crate::metrics::serve(l, ctx, rx)
                .await
                .map_err(|source| CoordError::Listen {
                    what: "metrics (HTTP)",
                    addr: "accept".into(),
                    hint: listen_hint(&source),
                    source,
                })
        }));
    }
    {
        let (ctx, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        crate::probes::load_snapshot(&ctx).await;
        tasks.push(tokio::spawn(async move {
            crate::probes::run(ctx, rx).await;
            Ok(())
        }));
    }
    {
        let (c, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        let every = ctx.config.probe_window;
        tasks.push(tokio::spawn(async move {
            crate::replication::watch_drift(c, every, rx).await;
            Ok(())
        }));
    }
    {
        let (c, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        let every = ctx.config.cluster_sync_interval;
        tasks.push(tokio::spawn(async move {
            crate::clustersync::run(c, every, rx).await;
            Ok(())
        }));
        let (c, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            crate::rollout::run_deadlines(c, rx).await;
            Ok(())
        }));
        let (c, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            crate::moves::run(c, rx).await;
            Ok(())
        }));
    }
    {
        let releases = crate::releases::Releases::new(&ctx.config.data_dir);
        let server = Arc::new(release::RepoServer::new(releases.repo_dir()));
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            release::serve::serve(release_listener, server, stop)
                .await
                .map_err(|source| CoordError::Listen {
                    what: "agent releases (overlay)",
                    addr: "accept".into(),
                    hint: listen_hint(&source),
                    source,
                })
        }));
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            // At start (the coordinator may have been down past the timestamp's expiry), then periodically.
            loop {
                if let Err(e) = releases.refresh().await {
                    tracing::error!(error = %e, "cannot re-sign the release timestamp; agents refuse expired metadata");
                }
                tokio::select! {
                    _ = tokio::time::sleep(crate::releases::REFRESH_EVERY) => {}
                    _ = rx.changed() => return Ok(()),
                }
            }
        }));
    }
    {
        let (auditor, every, rx) = (
            Arc::clone(&ctx.audit),
            ctx.config.audit.checkpoint_interval,
            shutdown_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            crate::auditlog::checkpoint_task(auditor, every, rx).await;
            Ok(())
        }));
    }
    {
        let (ctx, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            crate::rotation::watch(ctx, rx).await;
            Ok(())
        }));
    }
    tasks.push(tokio::spawn(flush_last_seen(Arc::clone(&ctx), shutdown_rx)));

    tracing::info!(
        enroll = %enroll_addr, wg = %ctx.tunnel.local_udp_addr(), fleet = %fleet_addr,
        admin = %ctx.config.admin_socket.display(), peers, ca_pin = %ctx.rotations.pin(),
        "coordinator serving"
    );
    Ok(Running {
        ctx,
        enroll_addr,
        store,
        sole,
        shutdown_tx,
        tasks,
    })
}

/// Write in-memory last-seen times to the store in batches.
async fn flush_last_seen(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) -> Result<(), CoordError> {
    let mut tick = tokio::time::interval(ctx.config.last_seen_flush);
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.changed() => true,
        };
        let batch = ctx.sessions.take_dirty();
        if !batch.is_empty() {
            let b = batch.clone();
            if let Err(e) = ctx.state(move |s| s.persist_last_seen(&b)).await {
                tracing::warn!(error = %e.message(), "last-seen batch not written; will retry");
                ctx.sessions.restore_dirty(&batch);
            }
        }
        if stop {
            return Ok(());
        }
    }
}

impl Running {
    /// Stop accepting, close streams, flush state, remove the TUN and socket.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        // Connections to agents whose tunnel is gone never close cleanly:
        // give the servers one shared deadline, then stop waiting.
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        for mut t in self.tasks {
            match tokio::time::timeout_at(deadline, &mut t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "task ended with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "task panicked"),
                Err(_) => {
                    tracing::warn!("task did not stop within the drain deadline; aborted");
                    t.abort();
                }
            }
        }
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "final store flush failed");
        }
        if let Some(sole) = self.sole {
            // The next coordinator on this prefix need not wait for the lease to run out.
            sole.resign().await;
        }
        let _ = std::fs::remove_file(&self.ctx.config.admin_socket);
        self.ctx.tunnel.clone().shutdown().await;
    }
}

/// Serve until `shutdown` resolves, then drain.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), CoordError> {
    let running = start(config).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}
