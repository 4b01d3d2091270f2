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

/// Loads the key-encryption key the configuration names (a command may take a while: off the async threads).
async fn load_kek(config: &Config) -> Result<crate::kek::Kek, CoordError> {
    let source = config.kek.clone();
    tokio::task::spawn_blocking(move || crate::kek::Kek::load(&source))
        .await
        .map_err(|e| CoordError::Config(vec![format!("loading the KEK: {e}")]))?
        .map_err(|e| {
            CoordError::Config(vec![format!(
                "on etcd the coordinator keeps its CA and WireGuard key sealed in the store and needs the \
                 key-encryption key: {e} (set kek_file, kek_command or NIMBUS_KEK; create one with \
                 `nimbus-coordinator kek generate FILE`, the same for every replica)"
            )])
        })
}

/// Runs a blocking secret-sharing step; its error stops the start.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, crate::replicas::ReplicaError> + Send + 'static,
) -> Result<T, CoordError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CoordError::Config(vec![format!("{what}: {e}")]))?
        .map_err(|e| CoordError::Config(vec![format!("{what}: {e}")]))
}

/// Runs `task` only while this replica leads: started when it becomes the leader, told to stop (its shutdown
/// receiver changes) when it steps down, started again on its next term. A single coordinator always leads.
fn spawn_singleton<F, Fut>(
    ctx: &Arc<Ctx>,
    name: &'static str,
    mut shutdown: watch::Receiver<bool>,
    task: F,
) -> tokio::task::JoinHandle<Result<(), CoordError>>
where
    F: Fn(Arc<Ctx>, watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let mut roles = ctx.leadership.subscribe();
        loop {
            while !roles.borrow_and_update().is_leader() {
                tokio::select! {
                    r = roles.changed() => if r.is_err() { return Ok(()) },
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            tracing::debug!(task = name, "this replica leads: singleton work started");
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut run = tokio::spawn(task(Arc::clone(&ctx), stop_rx));
            let for_shutdown = loop {
                tokio::select! {
                    _ = &mut run => return Ok(()),
                    r = roles.changed() => if r.is_err() || !roles.borrow_and_update().is_leader() { break false },
                    _ = shutdown.changed() => break true,
                }
            };
            let _ = stop_tx.send(true);
            if tokio::time::timeout(DRAIN_DEADLINE, &mut run).await.is_err() {
                run.abort();
            }
            if for_shutdown {
                return Ok(());
            }
            tracing::warn!(task = name, "this replica no longer leads: singleton work stopped");
        }
    })
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
    let (store, etcd): (Arc<dyn Store>, Option<Arc<crate::store::EtcdStore>>) = match &config.store {
        crate::config::StoreSettings::Etcd(e) => {
            let etcd = connect_etcd(e).await?;
            (Arc::clone(&etcd) as Arc<dyn Store>, Some(etcd))
        }
        crate::config::StoreSettings::Sled => (open_store(&config).await?, None),
    };
    let replica_id = match &config.store {
        crate::config::StoreSettings::Etcd(e) => e.replica_id.clone(),
        crate::config::StoreSettings::Sled => "coordinator".to_string(),
    };
    let kek = match &etcd {
        Some(_) => Some(Arc::new(load_kek(&config).await?)),
        None => None,
    };
    let overlay = OverlayPlan::new(config.overlay_cidr).map_err(|e| CoordError::Config(vec![e.to_string()]))?;
    let state = Arc::new(State::open(Arc::clone(&store), overlay)?);
    // On etcd every replica has its own overlay address (the first one the overlay's first host address).
    let coordinator_ip = match &etcd {
        Some(_) => {
            let (s, id) = (Arc::clone(&state), replica_id.clone());
            blocking("overlay address of this replica", move || {
                crate::replicas::overlay_ip(&s, &id)
            })
            .await?
        }
        None => overlay.coordinator_ip,
    };
    if let Some(kek) = &kek {
        // The CA (unless the operator gives the certificates) and this replica's WireGuard key, shared through
        // the store sealed with the KEK.
        if config.tls.is_none() {
            let (st, k, dir) = (Arc::clone(&store), Arc::clone(kek), config.data_dir.join("pki"));
            blocking("shared CA", move || {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .map_err(|e| crate::replicas::ReplicaError::Secret(format!("{}: {e}", dir.display())))?;
                let create = |d: &Path| {
                    pki::CertificateAuthority::load_or_create(d)
                        .map(|_| ())
                        .map_err(|e| crate::replicas::ReplicaError::Secret(e.to_string()))
                };
                crate::replicas::share_files(
                    st.as_ref(),
                    &k,
                    crate::replicas::SECRET_CA,
                    &dir,
                    &crate::replicas::regular_files,
                    &create,
                )
            })
            .await?;
        }
        let (st, k, dir, id) = (
            Arc::clone(&store),
            Arc::clone(kek),
            config.data_dir.clone(),
            replica_id.clone(),
        );
        blocking("this replica's WireGuard key", move || {
            let create = |d: &Path| {
                tunnel::keys::load_or_create_secret(&d.join("wg.key"))
                    .map(|_| ())
                    .map_err(|e| crate::replicas::ReplicaError::Secret(e.to_string()))
            };
            crate::replicas::share_files(
                st.as_ref(),
                &k,
                &crate::replicas::secret_wg_key(&id),
                &dir,
                &crate::replicas::wireguard_files,
                &create,
            )
        })
        .await?;
    }
    if let Some(kek) = &kek {
        let (st, k, dir) = (Arc::clone(&store), Arc::clone(kek), config.releases_dir.join("keys"));
        blocking("release online keys", move || {
            crate::replicas::share_release_keys(st.as_ref(), &k, &dir)
        })
        .await?;
    }
    let leadership = Arc::new(match &etcd {
        Some(e) => {
            crate::leader::Leadership::etcd(Arc::clone(e), crate::leader::LeaderOptions::new(replica_id.clone()))
                .map_err(|e| CoordError::Config(vec![format!("etcd leader election: {e}")]))?
        }
        None => crate::leader::Leadership::single(replica_id.clone()),
    });
    let singleton = Arc::new(State::new(
        Arc::new(crate::leader::FencedStore::new(
            Arc::clone(&store),
            Arc::clone(&leadership),
        )),
        overlay,
    ));
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

    let membership = match &etcd {
        Some(e) => {
            let record = crate::replicas::ReplicaRecord {
                id: replica_id.clone(),
                wg_public_key: tunnel::keys::public_key_to_base64(&tunnel.public_key()),
                wg_endpoint: config.wg_endpoint(),
                overlay_ip: coordinator_ip,
                fleet_port: config.fleet_port,
                enroll_endpoint: config.enroll_endpoint(),
                lease: 0,
            };
            let e = Arc::clone(e);
            let registered = blocking("replica registry", move || {
                crate::replicas::Membership::register(e, record)
            })
            .await;
            match registered {
                Ok(m) => Some(m),
                Err(err) => {
                    let _ = std::fs::remove_file(&config.admin_socket);
                    tunnel.shutdown().await;
                    return Err(err);
                }
            }
        }
        None => None,
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
        leadership,
        singleton,
        replicas: membership,
        kek,
    });

    // A WireGuard key rotation interrupted by a restart goes on where it was (the registry then names the next
    // key, which agents use during the overlap).
    ctx.rotations.resume_wireguard(&ctx.tunnel)?;
    if let Some(m) = &ctx.replicas {
        let (m, key) = (
            Arc::clone(m),
            tunnel::keys::public_key_to_base64(&ctx.tunnel.public_key()),
        );
        blocking("replica registry", move || m.set_public_key(&key)).await?;
    }
    // Every active node is a WireGuard peer again after a restart.
    let nodes = ctx
        .state(|s| s.list_nodes())
        .await
        .map_err(|e| CoordError::Config(vec![e.message().to_string()]))?;
    let mut peers = 0usize;
    let mut known_peers = std::collections::HashSet::new();
    for n in nodes.iter().filter(|n| n.status == NodeStatus::Active) {
        match key_from_id(&n.public_key) {
            Some(k) => {
                ctx.tunnel.add_peer(peer_for(n, k))?;
                known_peers.insert(n.public_key.clone());
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
    if let Some(m) = &ctx.replicas {
        let (c, m, rx) = (Arc::clone(&ctx), Arc::clone(m), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            crate::replicas::run(c, m, known_peers, rx).await;
            Ok(())
        }));
    }
    // Singleton work: only on the leader (always, for a single coordinator).
    let every = ctx.config.probe_window;
    tasks.push(spawn_singleton(
        &ctx,
        "replication drift",
        shutdown_rx.clone(),
        move |c, rx| crate::replication::watch_drift(c, every, rx),
    ));
    let every = ctx.config.cluster_sync_interval;
    tasks.push(spawn_singleton(
        &ctx,
        "cluster sync",
        shutdown_rx.clone(),
        move |c, rx| crate::clustersync::run(c, every, rx),
    ));
    tasks.push(spawn_singleton(
        &ctx,
        "rollout deadlines",
        shutdown_rx.clone(),
        crate::rollout::run_deadlines,
    ));
    tasks.push(spawn_singleton(&ctx, "drains", shutdown_rx.clone(), |c, rx| {
        crate::moves::run(c, rx)
    }));
    {
        let releases = crate::releases::Releases::at(&ctx.config.releases_dir);
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
    }
    // The timestamp is re-signed by the leader only (with replicas the repository is one shared directory).
    tasks.push(spawn_singleton(
        &ctx,
        "release timestamp",
        shutdown_rx.clone(),
        |c, mut rx| async move {
            let releases = crate::releases::Releases::at(&c.config.releases_dir);
            // At start (the coordinator may have been down past the timestamp's expiry), then periodically.
            loop {
                if let Err(e) = releases.refresh().await {
                    tracing::error!(error = %e, "cannot re-sign the release timestamp; agents refuse expired metadata");
                }
                tokio::select! {
                    _ = tokio::time::sleep(crate::releases::REFRESH_EVERY) => {}
                    _ = rx.changed() => return,
                }
            }
        },
    ));
    let every = ctx.config.audit.checkpoint_interval;
    tasks.push(spawn_singleton(
        &ctx,
        "audit checkpoints",
        shutdown_rx.clone(),
        move |c, rx| crate::auditlog::checkpoint_task(Arc::clone(&c.audit), every, rx),
    ));
    {
        // Every replica rotates its own WireGuard key, so each one watches its own rotation's retire time.
        let (c, rx) = (Arc::clone(&ctx), shutdown_rx.clone());
        tasks.push(tokio::spawn(async move {
            crate::rotation::watch(c, rx).await;
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
        // Another replica takes over the singleton work at once instead of after the lease TTL.
        self.ctx.leadership.resign().await;
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
