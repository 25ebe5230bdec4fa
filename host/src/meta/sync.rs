//! Keeps this replica's policy registry and scope layout in step with the meta group.
//!
//! At start each configured scope is reconciled: a binding set through the admin API wins over
//! the configuration file; otherwise the file's policy is stored and bound. Then a watch on the
//! meta group applies every binding change, whichever replica made it, compiles newly pushed
//! policies ahead of their first bind (so a swap only costs an `init` call), and adopts every
//! newer epoch of the scope layout, which `serve` routes by.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    BindingRecord, BindingSource, BindingSpec, MetaError, MetaStore, PolicyRecord, auth_key, binding_prefix, layout_key,
    policy_prefix, principal_prefix,
};
use super::layout::LayoutRecord;
use crate::trust::Trust;
use crate::backend::watch_request;
use crate::config::ScopeConfig;
use crate::engine::{Binding, BindError, Engine, LoadError, PolicyDigest, PolicyModule, Registry};
use crate::gate::metrics::GateMetrics;
use crate::index::KeyRange;

/// First and longest wait before following the meta group again after an error.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Why a binding could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The meta store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The stored bytes are not a valid policy for this engine.
    #[error("policy {digest} cannot be loaded: {error}")]
    Load {
        /// The policy.
        digest: String,
        /// Why.
        error: LoadError,
    },
    /// `init` refused the configuration, or the limits are too large.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// The replica's view of the meta group's bindings.
pub struct Syncer {
    store: MetaStore,
    engine: Arc<Engine>,
    registry: Arc<Registry>,
    metrics: Arc<GateMetrics>,
    /// The scopes of the layout this replica routes by; bindings of others are ignored.
    scopes: Mutex<std::collections::HashSet<String>>,
    /// The layout this replica routes by: the newest epoch seen in the meta group.
    layout: tokio::sync::watch::Sender<Arc<LayoutRecord>>,
    /// Compiled policies by digest (hex).
    modules: Mutex<HashMap<String, Arc<PolicyModule>>>,
    /// Per scope, the meta revision of the binding in force here.
    applied: Mutex<HashMap<String, i64>>,
    /// The meta revision of the latest binding applied here, for waiters.
    latest: tokio::sync::watch::Sender<i64>,
    /// Principals and signature checks, refreshed from the meta group.
    trust: Arc<Trust>,
    /// aq's etcd users and roles, refreshed from the meta group.
    auth: Arc<crate::auth::Auth>,
}

impl Syncer {
    /// A syncer over `store` binding the scopes of `layout` into `registry`.
    pub fn new(
        store: MetaStore,
        engine: Arc<Engine>,
        registry: Arc<Registry>,
        metrics: Arc<GateMetrics>,
        trust: Arc<Trust>,
        layout: Arc<LayoutRecord>,
        auth: Arc<crate::auth::Auth>,
    ) -> Self {
        let scopes = layout.scopes.iter().map(|s| s.id.clone()).collect();
        Syncer {
            store,
            engine,
            registry,
            metrics,
            scopes: Mutex::new(scopes),
            layout: tokio::sync::watch::Sender::new(layout),
            modules: Mutex::default(),
            applied: Mutex::default(),
            latest: tokio::sync::watch::Sender::new(0),
            trust,
            auth,
        }
    }

    /// Whether `scope` is in the layout this replica routes by.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.lock().expect("scopes lock").contains(scope)
    }

    /// Follows the layout this replica routes by; the current value is the newest epoch seen.
    pub fn layout_changes(&self) -> tokio::sync::watch::Receiver<Arc<LayoutRecord>> {
        self.layout.subscribe()
    }

    /// Adopts `record` if it is newer than the layout in force: its scopes' stored bindings are
    /// applied first, so that routing by it finds every scope bound.
    async fn adopt_layout(&self, record: LayoutRecord) {
        if record.epoch <= self.layout.borrow().epoch {
            return;
        }
        let added: Vec<String> = {
            let mut scopes = self.scopes.lock().expect("scopes lock");
            *scopes = record.scopes.iter().map(|s| s.id.clone()).collect();
            scopes.iter().filter(|id| self.registry.active(id).is_none()).cloned().collect()
        };
        for scope in added {
            if let Err(e) = self.bind_stored(&scope).await {
                tracing::error!(%scope, epoch = record.epoch, "a scope of the new layout cannot be bound: {e}");
            }
        }
        self.layout.send_if_modified(|current| {
            let newer = record.epoch > current.epoch;
            if newer {
                *current = Arc::new(record);
            }
            newer
        });
    }

    /// Binds `scope` as its stored binding says: a scope of the stored layout that the
    /// configuration file does not name (one made by a split, or by another replica's file).
    pub async fn bind_stored(&self, scope: &str) -> Result<(), String> {
        match self.store.binding(scope).await.map_err(|e| format!("scope {scope}: {e}"))? {
            Some((record, revision)) => self.apply(scope, &record, revision).await.map(drop).map_err(|e| format!("scope {scope}: {e}")),
            None => Err(format!(
                "scope {scope} is in the stored layout but has no binding in the meta group; add it to the \
                 configuration with its policy, or bind one (PUT /v1/scopes/{scope}/policy)"
            )),
        }
    }

    /// The meta store.
    pub fn store(&self) -> &MetaStore {
        &self.store
    }

    /// Validates and compiles component bytes off the async workers, and keeps the module.
    pub async fn load(&self, bytes: Vec<u8>) -> Result<Arc<PolicyModule>, LoadError> {
        let digest = PolicyDigest::of(&bytes).to_hex();
        if let Some(module) = self.modules.lock().expect("modules lock").get(&digest) {
            return Ok(module.clone());
        }
        let engine = self.engine.clone();
        let module = tokio::task::spawn_blocking(move || engine.load(&bytes))
            .await
            .map_err(|e| LoadError::Invalid(format!("the compiler task failed: {e}")))??;
        self.modules.lock().expect("modules lock").insert(digest, module.clone());
        Ok(module)
    }

    /// The compiled module of a stored policy: from memory, else fetched and compiled.
    pub async fn module(&self, digest: &str) -> Result<Arc<PolicyModule>, SyncError> {
        if let Some(module) = self.modules.lock().expect("modules lock").get(digest) {
            return Ok(module.clone());
        }
        let bytes = self.store.policy_bytes(digest).await?;
        self.load(bytes).await.map_err(|error| SyncError::Load { digest: digest.to_string(), error })
    }

    /// Forgets a compiled module (after its policy is deleted).
    pub fn forget(&self, digest: &str) {
        self.modules.lock().expect("modules lock").remove(digest);
    }

    /// Builds a binding for `scope`, calling the policy's `init` on the configuration.
    pub async fn prepare(&self, scope: &str, spec: &BindingSpec) -> Result<Arc<Binding>, SyncError> {
        let module = self.module(&spec.digest).await?;
        Ok(self.engine.bind(scope, module, &spec.config_text(), spec.limits.to_limits(), spec.fail_mode)?)
    }

    /// Makes `record` (read at meta revision `revision`) this replica's binding of `scope`,
    /// unless a newer one is already in force. Returns whether the active binding changed.
    pub async fn apply(&self, scope: &str, record: &BindingRecord, revision: i64) -> Result<bool, SyncError> {
        if !self.has_scope(scope) {
            return Ok(false);
        }
        if self.applied.lock().expect("applied lock").get(scope).is_some_and(|&r| r >= revision) {
            return Ok(false);
        }
        let binding = self.prepare(scope, &record.active).await?;
        Ok(self.apply_prepared(scope, record, binding, revision))
    }

    /// [`Syncer::apply`] with the binding already prepared from `record.active`.
    pub fn apply_prepared(&self, scope: &str, record: &BindingRecord, binding: Arc<Binding>, revision: i64) -> bool {
        let mut applied = self.applied.lock().expect("applied lock");
        if applied.get(scope).is_some_and(|&r| r >= revision) {
            return false;
        }
        applied.insert(scope.to_string(), revision);
        if self.registry.bind(scope, binding).is_some() {
            self.metrics.swapped(scope);
        }
        drop(applied);
        self.latest.send_if_modified(|latest| {
            let newer = revision > *latest;
            *latest = (*latest).max(revision);
            newer
        });
        tracing::info!(scope, policy = %record.active.digest, generation = record.generation, revision, "binding applied");
        true
    }

    /// Follows the meta revision of the latest binding applied on this replica.
    pub fn applied_changes(&self) -> tokio::sync::watch::Receiver<i64> {
        self.latest.subscribe()
    }

    /// Stores the policy of a configured scope and settles the scope's binding: a binding set
    /// through the admin API is kept; otherwise the configuration's is recorded. Binds the
    /// result locally.
    pub async fn reconcile(&self, scope: &ScopeConfig, bytes: Vec<u8>) -> Result<(), String> {
        let context = |e: &dyn std::fmt::Display| format!("scope {}: {e}", scope.id);
        let module = self.load(bytes.clone()).await.map_err(|e| context(&e))?;
        let digest = module.digest().to_hex();
        let record = PolicyRecord {
            digest: digest.clone(),
            size: bytes.len() as u64,
            exports: module.exports().to_vec(),
            chunks: bytes.len().div_ceil(super::CHUNK_BYTES) as u32,
            stored_at: super::unix_now(),
            publisher: None,
        };
        self.store.store_policy(&bytes, &record).await.map_err(|e| context(&e))?;
        let config: serde_json::Value =
            serde_json::from_str(&scope.policy_config_json()).expect("configuration tables are JSON");
        let desired = BindingSpec {
            digest,
            config,
            fail_mode: scope.fail_mode,
            limits: scope.limits().into(),
        };
        for _ in 0..5 {
            let current = self.store.binding(&scope.id).await.map_err(|e| context(&e))?;
            let (record, expected) = match current {
                Some((record, revision)) if record.source == BindingSource::Api || record.active == desired => {
                    if record.source == BindingSource::Api && record.active != desired {
                        tracing::warn!(
                            scope = %scope.id,
                            policy = %record.active.digest,
                            "the scope keeps the binding set through the admin API; the configuration file's policy is not applied"
                        );
                    }
                    self.apply(&scope.id, &record, revision).await.map_err(|e| context(&e))?;
                    return Ok(());
                }
                Some((record, revision)) => (record.swapped(desired.clone(), BindingSource::Config), revision),
                None => (
                    BindingRecord {
                        active: desired.clone(),
                        previous: None,
                        source: BindingSource::Config,
                        generation: 1,
                        changed_at: super::unix_now(),
                    },
                    0,
                ),
            };
            match self.store.write_binding(&scope.id, &record, expected).await {
                Ok(revision) => {
                    self.apply(&scope.id, &record, revision).await.map_err(|e| context(&e))?;
                    return Ok(());
                }
                // Another replica settled it first: read again.
                Err(MetaError::Conflict(_)) => continue,
                Err(e) => return Err(context(&e)),
            }
        }
        Err(context(&"the binding kept changing while starting; retry"))
    }

    /// Reads every principal from the meta group into [`Trust`].
    pub async fn reload_principals(&self) -> Result<(), MetaError> {
        let principals = self.store.principals().await?;
        self.trust.set_principals(&principals);
        Ok(())
    }

    /// Applies every stored binding newer than what is in force and reloads the principals;
    /// returns the revision read at.
    async fn catch_up(&self) -> Result<i64, SyncError> {
        self.reload_principals().await?;
        self.auth.reload().await?;
        if let Some((layout, _)) = self.store.layout().await? {
            self.adopt_layout(layout).await;
        }
        let (bindings, revision) = self.store.bindings().await?;
        for (scope, record, mod_revision) in bindings {
            if self.has_scope(&scope)
                && let Err(e) = self.apply(&scope, &record, mod_revision).await
            {
                tracing::error!(%scope, "cannot apply the stored binding: {e}");
            }
        }
        Ok(revision)
    }

    /// Follows the meta group from now on, in a task that lives as long as the syncer.
    pub async fn follow(self: &Arc<Self>) -> Result<(), String> {
        let revision = self.catch_up().await.map_err(|e| format!("cannot read the bindings: {e}"))?;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut from = revision + 1;
            let mut delay = RETRY_MIN;
            loop {
                let Some(syncer) = weak.upgrade() else { return };
                match syncer.watch_once(from).await {
                    Ok(next) => {
                        from = next;
                        delay = RETRY_MIN;
                    }
                    Err(e) => {
                        // A compacted revision or a lost stream: re-read everything.
                        match syncer.catch_up().await {
                            Ok(revision) => {
                                tracing::info!("meta watch interrupted ({e}); caught up at revision {revision}");
                                from = revision + 1;
                                delay = RETRY_MIN;
                            }
                            Err(read) => {
                                tracing::warn!("meta watch interrupted ({e}) and the bindings cannot be read ({read}); retrying in {delay:?}");
                                delay = (delay * 2).min(RETRY_MAX);
                            }
                        }
                    }
                }
                drop(syncer);
                tokio::time::sleep(delay).await;
            }
        });
        Ok(())
    }

    /// One watch stream from `from`; returns the revision to resume at when it ends.
    async fn watch_once(self: &Arc<Self>, from: i64) -> Result<i64, String> {
        let ranges: Vec<(Vec<u8>, Vec<u8>)> = [binding_prefix(), policy_prefix(), principal_prefix()]
            .map(|prefix| KeyRange::prefix(&prefix).to_request())
            .into_iter()
            .chain([(layout_key(), Vec::new()), (auth_key(), Vec::new())])
            .collect();
        // Room for every create: they are queued before the stream is opened.
        let (requests, rx) = mpsc::channel(ranges.len());
        for (key, range_end) in ranges {
            let create = watch_request(pb::PbWatchRequestUnion::CreateRequest, |c| {
                c.key = key;
                c.range_end = range_end;
                c.start_revision = from;
            });
            requests
                .send(create)
                .await
                .expect("the channel is open");
        }
        let mut stream = self.store.group().watch(ReceiverStream::new(rx)).await.map_err(|s| s.message().to_string())?;
        let mut next = from;
        let binding_prefix = binding_prefix();
        let policy_prefix = policy_prefix();
        let principal_prefix = principal_prefix();
        let layout_key = layout_key();
        let auth_key = auth_key();
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(next),
                Err(status) => return Err(status.message().to_string()),
            };
            if response.compact_revision > 0 {
                return Err(format!("revision {from} was compacted"));
            }
            if response.canceled {
                return Err(format!("the watch was cancelled: {}", response.cancel_reason));
            }
            let (mut principals_changed, mut auth_changed) = (false, false);
            for event in response.events {
                let Some(kv) = event.kv else { continue };
                next = next.max(kv.mod_revision + 1);
                if kv.key.starts_with(&principal_prefix) {
                    principals_changed = true;
                    continue;
                }
                if kv.key == auth_key {
                    auth_changed = true;
                    continue;
                }
                if event.r#type != 0 {
                    continue; // deletes: a deleted policy is unbound everywhere already
                }
                if kv.key == layout_key {
                    match serde_json::from_slice::<LayoutRecord>(&kv.value) {
                        Ok(record) => self.adopt_layout(record).await,
                        Err(e) => tracing::error!("the stored scope layout does not parse; keeping the current one: {e}"),
                    }
                } else if let Some(scope) = kv.key.strip_prefix(binding_prefix.as_slice()) {
                    let scope = String::from_utf8_lossy(scope).into_owned();
                    if !self.has_scope(&scope) {
                        continue;
                    }
                    let outcome = match serde_json::from_slice::<BindingRecord>(&kv.value) {
                        Ok(record) => self.apply(&scope, &record, kv.mod_revision).await.map(drop).map_err(|e| e.to_string()),
                        Err(e) => Err(format!("the stored binding does not parse: {e}")),
                    };
                    if let Err(e) = outcome {
                        tracing::error!(%scope, "cannot apply a binding change; keeping the current binding: {e}");
                    }
                } else if let Some(digest) = kv.key.strip_prefix(policy_prefix.as_slice()) {
                    // Compile ahead of the first bind, off this loop.
                    let digest = String::from_utf8_lossy(digest).into_owned();
                    let syncer = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = syncer.module(&digest).await {
                            tracing::warn!(%digest, "cannot precompile a pushed policy: {e}");
                        }
                    });
                }
            }
            if principals_changed {
                self.reload_principals().await.map_err(|e| e.to_string())?;
            }
            if auth_changed {
                self.auth.reload().await.map_err(|e| e.to_string())?;
            }
        }
    }
}
