//! `aq serve`: start managed etcd where needed, bind every scope's policy, and serve the etcd
//! API. Also used in-process by the integration tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto as pb;

use crate::backend::managed::EtcdProcess;
use crate::backend::{Group, ownership};
use crate::config::Config;
use crate::engine::{Engine, EngineConfig, Registry};
use crate::front;
use crate::admin::{Admin, Auth};
use crate::tls::{TlsFiles, TlsListener};
use crate::gate::{GateServices, Gateway};
use crate::gate::decisions::{DecisionLog, DecisionSink};
use crate::gate::metrics::GateMetrics;
use crate::meta::MetaStore;
use crate::trust::Trust;
use crate::meta::sync::Syncer;
use crate::index::{KeyRange, ScopeIndex};
use crate::meta::layout::{Adoption, LayoutRecord};

/// How long to wait for a backend group to answer at start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The etcd API address.
    pub listen: SocketAddr,
    /// The admin API address, if served.
    pub admin_listen: Option<SocketAddr>,
    /// Managed etcd data and the policy compile cache live here.
    pub data_dir: PathBuf,
    /// The `etcd` binary for managed groups.
    pub etcd_binary: String,
    /// Where decision lines go.
    pub decision_log: DecisionSink,
    /// Also log allowed requests.
    pub log_allows: bool,
    /// Serve both APIs over TLS with this certificate.
    pub tls: Option<TlsFiles>,
    /// This replica's name: it is the principal `anchor:<name>`. `None` derives one from the
    /// identity key.
    pub name: Option<String>,
    /// The admin API URL peers use to reach this replica; `None` derives it from the bound
    /// admin address.
    pub advertise_admin_url: Option<String>,
    /// How often grown lineage logs are checkpointed.
    pub checkpoint_interval: Duration,
    /// Policy instances each scope keeps ready ([`EngineConfig::warm_per_binding`]).
    pub warm_instances: usize,
    /// How often the advising replica asks every scope's policy for advice.
    pub advise_interval: Duration,
    /// How long a token from the etcd API's `Authenticate` is good for.
    pub auth_token_ttl: Duration,
}

/// A running gateway. Dropping it stops the server and the managed etcd processes.
pub struct Running {
    /// The bound etcd API address.
    pub addr: SocketAddr,
    /// The bound admin API address, if served.
    pub admin_addr: Option<SocketAddr>,
    /// Whether both APIs are served over TLS.
    pub tls: bool,
    /// The gateway core.
    pub gateway: Arc<Gateway>,
    /// This replica's link to the bindings in the meta group.
    pub syncer: Arc<Syncer>,
    /// Moves scopes between groups.
    pub migrator: Arc<crate::adapt::migrate::Migrator>,
    /// The admin API's state (served at `admin_addr`).
    pub admin: Arc<Admin>,
    /// This replica's principal id as an anchor, `anchor:<name>`.
    pub anchor: String,
    /// Managed etcd processes, by group.
    pub managed: Arc<Mutex<BTreeMap<String, Vec<EtcdProcess>>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    /// Stops this replica's advise loop, giving up the advisor role if it holds it.
    _advisor: crate::adapt::advise::AdvisorGuard,
    /// Stops following the stored layout, withdrawing this replica's routed epoch.
    _following: tokio::sync::watch::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    admin_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops serving and waits for the server to end; managed etcd stops when `self` drops.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Requests under way finish; streams a client keeps open (a watch, a keep-alive) would
        // hold a graceful stop forever, so past the grace they end with their connections.
        if tokio::time::timeout(STOP_GRACE, &mut self.server).await.is_err() {
            tracing::info!(grace_s = STOP_GRACE.as_secs(), "streams still open after the grace; closing their connections");
            self.server.abort();
        }
        if let Some(task) = self.admin_task.take() {
            task.abort();
        }
    }

    /// Waits until the server ends (it ends on an error, or after `stop`).
    pub async fn wait(&mut self) -> Result<(), String> {
        match (&mut self.server).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the etcd API server failed: {e}")),
            Err(e) => Err(format!("the etcd API server task failed: {e}")),
        }
    }
}

/// How long a stop waits for requests and streams under way before it closes connections.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.abort();
        if let Some(task) = self.admin_task.take() {
            task.abort();
        }
    }
}

/// Loads a policy component named in a scope: `builtin:<name>` or a file.
fn policy_bytes(policy: &str) -> Result<Vec<u8>, String> {
    if let Some(name) = policy.strip_prefix("builtin:") {
        return crate::builtin::find(name)
            .map(|b| b.component.to_vec())
            .ok_or_else(|| format!("no built-in policy {name:?}"));
    }
    std::fs::read(policy).map_err(|e| format!("cannot read policy {policy}: {e}"))
}

/// Starts managed etcd for groups without endpoints, connects every group, binds policies and
/// serves the etcd API.
pub async fn start(config: Config, options: ServeOptions) -> Result<Running, String> {
    std::fs::create_dir_all(&options.data_dir)
        .map_err(|e| format!("cannot create data directory {}: {e}", options.data_dir.display()))?;

    // Groups: external, or managed (with etcd auth on and credentials of aq's own).
    let mut managed = BTreeMap::new();
    let mut groups = BTreeMap::new();
    let mut admins = BTreeMap::new();
    for group in &config.groups {
        let connected = if group.endpoints.is_empty() {
            let dir = options.data_dir.join("etcd").join(&group.name);
            let up = crate::backend::managed::start_secured(&options.etcd_binary, &group.name, &dir, group.spec(), READY_TIMEOUT).await?;
            admins.insert(group.name.clone(), up.admin);
            managed.insert(group.name.clone(), up.processes);
            up.group
        } else {
            let mut connected = Group::connect_lazy(&group.name, &group.endpoints).map_err(|e| e.to_string())?;
            connected.wait_ready(READY_TIMEOUT).await.map_err(|e| e.to_string())?;
            match group.credentials() {
                Some(credentials) => connected = connected.with_login(credentials),
                None => tracing::warn!(
                    group = %group.name,
                    "group has no user in the layout: etcd does not enforce which ranges aq may write there, \
                     and any client of its endpoints can bypass aq; give the group a user and password"
                ),
            }
            if let Some(admin) = group.admin_credentials() {
                admins.insert(group.name.clone(), admin);
            }
            connected
        };
        groups.insert(group.name.clone(), connected);
    }
    let home = config.groups.first().map(|g| g.name.clone()).ok_or("the configuration has no [[groups]]")?;
    let mut owners = BTreeMap::new();
    for (name, admin) in &admins {
        owners.insert(name.clone(), ownership::Owners::connect(name, groups[name].endpoints(), admin).await?);
    }
    // aq's own records live in the home group's reserved keys, which every group's role holds;
    // the layout there says which scope every other range belongs to.
    if let Some(owners) = owners.get_mut(&home) {
        owners.grant(&KeyRange::prefix(crate::index::RESERVED_PREFIX)).await?;
    }
    // Groups this aq started at run time for splits come back with it, from their directories.
    let started = MetaStore::new(groups[&home].clone())
        .started_groups()
        .await
        .map_err(|e| format!("cannot read the groups started at run time: {e}"))?;
    for record in &started {
        if groups.contains_key(&record.name) {
            continue;
        }
        let dir = crate::adapt::groups::group_dir(&options.data_dir, &record.name);
        if !dir.exists() {
            tracing::warn!(group = %record.name, replica = %record.replica, "a group started at run time has no data in {}; it was started by another replica", dir.display());
            continue;
        }
        let up = crate::backend::managed::start_secured(&options.etcd_binary, &record.name, &dir, Default::default(), READY_TIMEOUT).await?;
        owners.insert(record.name.clone(), ownership::Owners::connect(&record.name, up.group.endpoints(), &up.admin).await?);
        admins.insert(record.name.clone(), up.admin);
        managed.insert(record.name.clone(), up.processes);
        groups.insert(record.name.clone(), up.group);
    }
    let store = MetaStore::new(groups[&home].clone());
    let (layout, index) = adopt_layout(&store, &config).await?;
    let routed_epoch = layout.epoch;
    // Each group's etcd lets aq write exactly the ranges the layout gives it.
    for (name, owners) in &mut owners {
        owners.reconcile(&index.group_ranges(name)).await?;
    }

    // Policies: stored in the meta (home) group, bound as the meta group says.
    let engine = Arc::new(
        Engine::new(EngineConfig {
            cache_dir: Some(options.data_dir.join("policy-cache")),
            warm_per_binding: options.warm_instances,
            refill: crate::engine::Refill::Caller,
            ..EngineConfig::default()
        })
            .map_err(|e| e.to_string())?,
    );
    let registry = Arc::new(Registry::new());
    let metrics = Arc::new(GateMetrics::default());
    // Signatures are bound to the meta group's etcd cluster id, which Maintenance.Status reports.
    let cluster_id = groups[&home]
        .status()
        .await
        .map_err(|s| format!("cannot read the cluster id of group {home}: {}", s.message()))?
        .header
        .map(|h| h.cluster_id)
        .unwrap_or_default();
    let trust = Arc::new(Trust::new(cluster_id));
    // aq's own etcd users and roles, shared by replicas through the meta group.
    let etcd_auth = Arc::new(crate::auth::Auth::new(store.clone(), options.auth_token_ttl));
    etcd_auth.reload().await.map_err(|e| format!("cannot read aq's etcd users and roles: {e}"))?;
    let syncer = Arc::new(Syncer::new(store, engine.clone(), registry.clone(), metrics.clone(), trust.clone(), layout, etcd_auth.clone()));
    syncer.reload_principals().await.map_err(|e| format!("cannot read the principals: {e}"))?;
    for scope in index.scopes() {
        match config.scopes.iter().find(|s| s.id == scope.id) {
            Some(configured) => syncer.reconcile(configured, policy_bytes(&configured.policy)?).await?,
            None => syncer.bind_stored(&scope.id).await?,
        }
    }
    let decisions = DecisionLog::open(&options.decision_log, options.log_allows, metrics.decision_lines_dropped())
        .map_err(|e| e.to_string())?;
    let identity = crate::trust::load_or_create_key(&options.data_dir.join("identity.key"))?;
    let anchor = Arc::new(crate::gate::anchors::Anchor::new(
        crate::trust::anchor::Identity::new(options.name.as_deref(), identity.clone())?,
        options.tls.as_ref().map(|tls| tls.cert.as_path()),
    )?);
    let anchor_id = anchor.identity().id().to_string();
    let services = GateServices { engine, registry, metrics, decisions, trust, anchor: Some(anchor.clone()) };
    let gateway = Arc::new(Gateway::new(index, groups, &home, services).await?);
    let mut replayers = BTreeMap::new();
    for (name, admin) in &admins {
        let group = Group::connect_lazy(name, gateway.groups()[name].endpoints()).map_err(|e| e.to_string())?;
        replayers.insert(name.clone(), group.with_login(admin.clone()));
    }
    gateway.set_replayers(replayers);
    syncer.follow().await?;
    let following = follow_layout(&gateway, &syncer, routed_epoch, anchor_id.clone());

    // The admin API's state; a generated admin token unless tokens are configured.
    let auth = if config.admin.auth {
        let generated = if config.admin.tokens.iter().any(|t| t.role == "admin") {
            None
        } else {
            Some(crate::admin::auth::load_or_create_token(&admin_token_path(&options.data_dir))?)
        };
        Auth::new(&config.admin.tokens, generated.as_deref())?
    } else {
        Auth::disabled()
    };
    let checkpointer = Arc::new(crate::lineage::store::Checkpointer::new(identity.clone(), syncer.store().clone()));
    let migrator =
        Arc::new(crate::adapt::migrate::Migrator::new(gateway.clone(), syncer.store().clone(), admins, anchor_id.clone()));
    recover_migrations(&migrator);
    let admin =
        Arc::new(Admin::new(gateway.clone(), syncer.clone(), &config.admin, auth, checkpointer.clone(), Some(migrator.clone()))?);
    // Each advise round reads a fresh window of every replica's load, but a window shorter than
    // a second holds too few requests to find split keys in.
    let load_every = options.advise_interval.clamp(Duration::from_secs(1), HOUSEKEEPING_EVERY);
    checkpoint_lineage(
        gateway.clone(),
        checkpointer,
        options.checkpoint_interval.max(Duration::from_millis(10)),
        load_every,
        anchor_id.clone(),
    );
    let managed = Arc::new(Mutex::new(managed));
    // An aq that manages every group itself may start more for splits (adapt/groups.rs).
    let starter = config.groups.iter().all(|g| g.endpoints.is_empty()).then(|| {
        crate::adapt::groups::Starter::new(
            options.etcd_binary.clone(),
            options.data_dir.clone(),
            managed.clone(),
            gateway.clone(),
            migrator.clone(),
            syncer.store().clone(),
            anchor_id.clone(),
            config.adapt.max_started_groups,
        )
    });
    let actor =
        crate::adapt::advise::Actor { migrator: migrator.clone(), settings: config.adapt.clone(), starter, failed: Default::default() };
    let advisor = crate::adapt::advise::spawn(
        &gateway,
        anchor_id.clone(),
        options.advise_interval.max(Duration::from_millis(10)),
        load_every,
        Some(actor),
    );

    // The etcd API.
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}; is another etcd or aq running there?", options.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    // HTTP/1.1 too: etcd answers /health, /version and /metrics on its client port.
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true).accept_http1(true);
    if let Some(tls) = &options.tls {
        builder = builder.tls_config(tls.tonic_config()?).map_err(|e| format!("TLS setup of the etcd API failed: {e}"))?;
    }
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(pb::PbKvServer::new(front::Kv::new(gateway.clone(), etcd_auth.clone())))
        .add_service(pb::PbWatchServer::new(front::Watch::new(gateway.clone(), etcd_auth.clone())))
        .add_service(pb::PbLeaseServer::new(front::Lease::new(gateway.clone(), etcd_auth.clone())))
        .add_service(pb::PbMaintenanceServer::new(
            front::Maintenance::new(gateway.clone(), etcd_auth.clone(), addr).with_data_dir(options.data_dir.clone()),
        ))
        .add_service(pb::PbClusterServer::new(front::Cluster::new(gateway.clone(), addr)))
        .add_service(front::concurrency::proto::lock::lock_server::LockServer::new(front::Lock::new(
            gateway.clone(),
            etcd_auth.clone(),
        )))
        .add_service(front::concurrency::proto::election::election_server::ElectionServer::new(front::Election::new(
            gateway.clone(),
            etcd_auth.clone(),
        )))
        .add_service(front::auth::proto::etcdserverpb::auth_server::AuthServer::new(front::auth::AuthService::new(
            gateway.clone(),
            etcd_auth.clone(),
            addr,
        )));
    let mut routes = routes.routes();
    let http = front::http::routes(gateway.clone());
    *routes.axum_router_mut() = std::mem::take(routes.axum_router_mut()).merge(http);
    let router = builder.layer(front::http::HandledLayer::new(gateway.metrics().grpc_handled())).add_routes(routes);
    // The builder's tcp_nodelay applies only to listeners tonic binds itself: without it here,
    // an answer written in two segments waits for the client's delayed ACK (about 40 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop.await;
    }));
    let (admin_addr, admin_task) = match options.admin_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| format!("cannot listen on {listen} for the admin API: {e}"))?;
            let admin_addr = listener.local_addr().map_err(|e| e.to_string())?;
            let app = crate::admin::router(admin.clone());
            let task = match &options.tls {
                Some(tls) => {
                    let listener = TlsListener::new(listener, tls.server_config()?).map_err(|e| e.to_string())?;
                    tokio::spawn(async move {
                        if let Err(e) = axum::serve(listener, app).await {
                            tracing::error!("the admin API stopped: {e}");
                        }
                    })
                }
                None => tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!("the admin API stopped: {e}");
                    }
                }),
            };
            (Some(admin_addr), Some(task))
        }
        None => (None, None),
    };
    // Peers reach this replica's anchor through its admin API.
    if let Some(admin_addr) = admin_addr {
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        let url = options.advertise_admin_url.clone().unwrap_or_else(|| {
            let host = if admin_addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { admin_addr.ip().to_string() };
            format!("{scheme}://{}", SocketAddr::new(host.parse().expect("an IP"), admin_addr.port()))
        });
        let identity = anchor.identity();
        let record = crate::trust::anchor::AnchorRecord { id: identity.id().to_string(), key: identity.public_hex(), url };
        syncer.store().register_anchor(&identity.principal(), &record).await.map_err(|e| e.to_string())?;
        syncer.reload_principals().await.map_err(|e| format!("cannot read the principals: {e}"))?;
    }
    supervise(managed.clone(), options.etcd_binary.clone(), gateway.clone());
    Ok(Running {
        addr,
        admin_addr,
        tls: options.tls.is_some(),
        gateway,
        syncer,
        migrator,
        admin,
        anchor: anchor_id,
        managed,
        shutdown: Some(shutdown),
        _advisor: advisor,
        _following: following,
        server,
        admin_task,
    })
}

/// Where the generated admin token lives.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-token")
}

/// Reads the stored layout and settles it with the configuration's scopes (see
/// [`crate::meta::layout`]): returns the record this replica routes by and its index.
async fn adopt_layout(store: &MetaStore, config: &Config) -> Result<(Arc<LayoutRecord>, ScopeIndex), String> {
    let scopes = config.scopes.iter().map(|s| s.to_scope()).collect::<Result<Vec<_>, _>>()?;
    let configured = ScopeIndex::new(scopes).map_err(|e| e.to_string())?;
    let home = store.group().name().to_string();
    let read_error = |e: crate::meta::MetaError| format!("cannot read the scope layout from group {home}: {e}");
    // Replicas starting together race to seed; the loser adopts what the winner wrote.
    for _ in 0..5 {
        let stored = store.layout().await.map_err(read_error)?;
        let (record, expected) = match LayoutRecord::adopt(stored.as_ref().map(|(r, _)| r), &configured) {
            Adoption::Keep => {
                let record = stored.expect("kept means stored").0;
                let index = record.index()?;
                return Ok((Arc::new(record), index));
            }
            Adoption::KeepChangedLive => {
                let record = stored.expect("kept means stored").0;
                tracing::warn!(
                    epoch = record.epoch,
                    reason = %record.reason,
                    "the configuration's scopes differ from the layout in the meta group, which changed live since it \
                     was seeded; aq routes by the stored layout and ignores the file's scopes"
                );
                let index = record.index()?;
                return Ok((Arc::new(record), index));
            }
            Adoption::Seed(record) => (record, 0),
            Adoption::Reseed(record) => {
                tracing::info!(epoch = record.epoch, "the configuration's scopes changed; they become the stored layout");
                (record, stored.expect("reseeded means stored").1)
            }
        };
        match store.write_layout(&record, expected).await {
            Ok(_) => return Ok((Arc::new(record), configured)),
            Err(crate::meta::MetaError::LayoutConflict(_)) => continue,
            Err(e) => return Err(format!("cannot record the scope layout in group {home}: {e}")),
        }
    }
    Err("the scope layout kept changing while starting; retry".into())
}

/// How long this replica's routed epoch outlives it in meta: a migration waits at most this
/// long for a replica that died without withdrawing it.
const ROUTED_TTL_SECS: i64 = 10;

/// Follows the stored layout: reroutes the gateway whenever a newer epoch is adopted, and keeps
/// `\xffaq/meta/routed/<replica>` saying which epoch this replica routes by, under a lease
/// renewed every third of its TTL. A migration deletes a moved scope's old copy only once every
/// replica routes by the epoch that moved it. Stops, revoking the lease, when the returned
/// sender drops.
fn follow_layout(gateway: &Arc<Gateway>, syncer: &Syncer, mut routed: u64, replica: String) -> tokio::sync::watch::Sender<()> {
    let (stop, mut stopped) = tokio::sync::watch::channel(());
    let mut changes = syncer.layout_changes();
    let store = syncer.store().clone();
    let weak = Arc::downgrade(gateway);
    tokio::spawn(async move {
        let group = store.group().clone();
        let mut lease: Option<i64> = None;
        let mut announced = 0;
        let mut renew = tokio::time::interval(Duration::from_secs(ROUTED_TTL_SECS as u64 / 3));
        loop {
            // The syncer may have adopted a newer layout before this task subscribed.
            let record = changes.borrow_and_update().clone();
            if record.epoch > routed {
                let Some(gateway) = weak.upgrade() else { break };
                match record.index().and_then(|index| gateway.reroute(index)) {
                    Ok(()) => {
                        routed = record.epoch;
                        tracing::info!(epoch = record.epoch, reason = %record.reason, "routing by a new scope layout");
                    }
                    Err(e) => tracing::error!(
                        epoch = record.epoch,
                        "cannot route by the stored scope layout; keeping the current routing: {e}"
                    ),
                }
            }
            if lease.is_none() {
                match group.lease_grant(pb::PbLeaseGrantRequest { ttl: ROUTED_TTL_SECS, id: 0 }).await {
                    Ok(granted) => (lease, announced) = (Some(granted.id), 0),
                    Err(status) => tracing::warn!("cannot lease this replica's routed epoch: {}", status.message()),
                }
            }
            if let Some(id) = lease
                && announced != routed
            {
                match store.put_routed(&replica, routed, id).await {
                    Ok(()) => announced = routed,
                    Err(e) => tracing::warn!("cannot publish this replica's routed epoch: {e}"),
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = renew.tick() => if let Some(id) = lease {
                    let requests = tokio_stream::once(pb::PbLeaseKeepAliveRequest { id });
                    let alive = match group.lease_keep_alive(requests).await {
                        Ok(mut answers) => matches!(answers.message().await, Ok(Some(answer)) if answer.ttl > 0),
                        Err(_) => false,
                    };
                    if !alive {
                        tracing::warn!(replica, "this replica's routed epoch lease lapsed; publishing it again");
                        lease = None;
                    }
                },
                _ = stopped.changed() => break,
            }
        }
        if let Some(id) = lease {
            let _ = group.lease_revoke(pb::PbLeaseRevokeRequest { id }).await;
        }
    });
    stop
}

/// Finishes or undoes an interrupted migration: at once (this replica may have been running
/// it when it stopped), then every [`HOUSEKEEPING_EVERY`] (another replica may die running one).
fn recover_migrations(migrator: &Arc<crate::adapt::migrate::Migrator>) {
    let weak = Arc::downgrade(migrator);
    tokio::spawn(async move {
        loop {
            let Some(migrator) = weak.upgrade() else { return };
            if let Err(e) = migrator.recover().await {
                tracing::warn!("cannot recover an interrupted migration: {e}");
            }
            drop(migrator);
            tokio::time::sleep(HOUSEKEEPING_EVERY).await;
        }
    });
}

/// How often each replica sweeps expired nonces and finishes abandoned proposal commits.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// Signs lineage checkpoints in the background every `interval`, so that records written now
/// are covered by a signature before anyone could alter them; and, every
/// [`HOUSEKEEPING_EVERY`], drops recorded nonces once they expire, finishes proposal commits
/// another replica claimed and did not finish; and, every `load_every`, publishes this
/// replica's (`replica`) load windows.
fn checkpoint_lineage(
    gateway: Arc<Gateway>,
    checkpointer: Arc<crate::lineage::store::Checkpointer>,
    interval: Duration,
    load_every: Duration,
    replica: String,
) {
    let weak = Arc::downgrade(&gateway);
    drop(gateway);
    tokio::spawn(async move {
        let mut housekept = std::time::Instant::now();
        let (mut published, mut checkpointed) = (std::time::Instant::now(), std::time::Instant::now());
        loop {
            tokio::time::sleep(interval.min(load_every)).await;
            let Some(gateway) = weak.upgrade() else { return };
            if checkpointed.elapsed() >= interval {
                checkpointed = std::time::Instant::now();
                let routing = gateway.routing();
                let logs = routing
                    .index()
                    .scopes()
                    .iter()
                    .filter_map(|scope| routing.scope(&scope.id).map(|runtime| (scope.id.as_str(), &runtime.group)))
                    .chain(std::iter::once((crate::lineage::META_LOG, gateway.home())));
                for (log, group) in logs {
                    if let Err(e) = checkpointer.checkpoint(group, log).await {
                        tracing::warn!(log, "cannot checkpoint lineage: {e}");
                    }
                }
            }
            if housekept.elapsed() >= HOUSEKEEPING_EVERY {
                housekept = std::time::Instant::now();
                gateway.sweep_nonces().await;
                gateway.recover_proposals().await;
            }
            if published.elapsed() >= load_every {
                published = std::time::Instant::now();
                publish_load(&gateway, &replica).await;
            }
        }
    });
}

/// Publishes this replica's window of every scope's load to the meta group, where the advising
/// replica sums them.
pub async fn publish_load(gateway: &Gateway, replica: &str) {
    let store = MetaStore::new(gateway.home().clone());
    for (scope, window) in gateway.stats().windows(replica) {
        if let Err(e) = store.put_load(&scope, &window).await {
            tracing::warn!(%scope, "cannot publish the scope's load: {e}");
        }
    }
}

/// Restarts managed etcd processes that exit, on their data directories. A restarted etcd has
/// forgotten the tokens it issued, so its group logs in again.
fn supervise(managed: Arc<Mutex<BTreeMap<String, Vec<EtcdProcess>>>>, binary: String, gateway: Arc<Gateway>) {
    let gateway = Arc::downgrade(&gateway);
    let weak = Arc::downgrade(&managed);
    drop(managed);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (Some(managed), Some(gateway)) = (weak.upgrade(), gateway.upgrade()) else { return };
            let groups = gateway.groups();
            let mut managed = managed.lock().expect("managed etcd lock");
            for (name, process) in managed.iter_mut().flat_map(|(name, members)| members.iter_mut().map(move |p| (name, p))) {
                if let Some(status) = process.exited() {
                    tracing::error!(group = %name, %status, "managed etcd exited; restarting it\n{}", process.log_tail(5));
                    match EtcdProcess::respawn(&binary, process) {
                        Ok(fresh) => {
                            *process = fresh;
                            if let Some(group) = groups.get(name) {
                                group.forget_token();
                            }
                        }
                        Err(e) => tracing::error!(group = %name, "cannot restart managed etcd: {e}"),
                    }
                }
            }
        }
    });
}

/// Describes what a running gateway serves, for `aq serve`'s banner.
pub fn describe(running: &Running, data_dir: &Path) -> String {
    let scheme = if running.tls { "https" } else { "http" };
    let mut out = format!("aq: etcd API listening on {scheme}://{}\n", running.addr);
    out.push_str(&format!("aq: this replica is {}\n", running.anchor));
    if let Some(admin) = running.admin_addr {
        out.push_str(&format!("aq: admin API listening on {scheme}://{admin} (/healthz, /readyz, /metrics, /v1/openapi.json)\n"));
        out.push_str(&format!("aq: scope map at {scheme}://{admin}/ (asks for the admin token)\n"));
        let token = admin_token_path(data_dir);
        if token.exists() {
            out.push_str(&format!("aq: admin token (role admin) in {}; the aq CLI reads it from there\n", token.display()));
        }
    }
    for (name, group) in running.gateway.groups().iter() {
        let managed = running.managed.lock().expect("managed etcd lock").contains_key(name);
        let how = if managed { format!("managed, data in {}", data_dir.join("etcd").join(name).display()) } else { "external".to_string() };
        out.push_str(&format!("aq: group {name}: etcd at {} ({how})\n", group.endpoints().join(",")));
    }
    let routing = running.gateway.routing();
    for scope in routing.index().scopes() {
        let binding = running.gateway.registry().active(&scope.id).expect("bound");
        let fail_mode = match binding.fail_mode {
            crate::engine::FailMode::Closed => "fail-closed",
            crate::engine::FailMode::Open => "fail-open",
        };
        out.push_str(&format!(
            "aq: scope {:<10} {:?} on {} — policy {:?}, {fail_mode}\n",
            scope.id, scope.range, scope.group, binding.module.digest()
        ));
    }
    out
}
