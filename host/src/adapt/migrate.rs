//! Live moves, splits and merges of scopes across etcd groups (DESIGN: "Adaptive scopes").
//! One migration runs at a time across replicas (the meta key `migration-active`), on the
//! replica that started it, as a state machine whose record in meta says how far it got:
//!
//! 1. **copy**: the scope's keys, read from the old group at one revision R in pages, are
//!    written to the new group in Txns of up to 128 keys, several at a time (leases copied by
//!    ID, as the gate does for any group); the copy's keys share revisions, none of which a
//!    client sees, since the scope's floor comes after them;
//! 2. **catch-up**: a watch of the old group from R+1, read as fast as it delivers, applies
//!    the later writes in batches until at most [`HANDOFF_TAIL`] keys were written since the
//!    last event applied, or the keys left stop falling for [`CATCH_UP_STALL`] (writes arrive
//!    as fast as they are applied), or for at most [`CATCH_UP_FOR`];
//! 3. **hand-off**: the old group's ownership role gives the scope's ranges up. From then on
//!    etcd refuses every write of aq's there, also one decided before; a refused write waits in
//!    the gate ([`crate::gate::HANDOFF_WAIT`]) for routing to name the new owner. The last
//!    writes that landed before the refusal are applied by reads, not by the watch: etcd 3.4
//!    can answer a progress request before the events it covers, so the watch cannot prove it
//!    delivered everything. The keys written after the last applied event are read at the
//!    revision right after the refusal (`min_mod_revision`); then the two groups' key counts
//!    must agree, and a difference (deletes the watch had not delivered) is found by comparing
//!    the keys;
//! 4. **cut-over**: the new group's role gets the ranges and one layout write (guarded on the
//!    layout read at the start) names the new group and the scope's revision shift, so the
//!    scope's revisions keep increasing ([`crate::index::RevisionShift`]); every replica follows
//!    through its meta watch;
//! 5. **clean-up**: the copy left on the old group is deleted.
//!
//! A failure before the cut-over rolls back: the old group gets its ranges again, the new one
//! gives them up, and the partial copy is deleted. After the cut-over the move stands and only
//! the clean-up can be left to repeat.
//!
//! A **split** adds a scope over the upper part of its parent's keys, on the parent's group
//! with the parent's revisions (one layout write), and may then move it. A **merge** is the
//! reverse: the scope's keys go to its parent, the innermost scope holding its range. If they
//! are on the parent's group with the parent's revisions already, that too is one layout write.
//! Otherwise they move there as above, with two differences. The merged keys take the parent's
//! revisions, which must stay above every revision the scope's clients were given; before the
//! copy, the parent's group is taken forward (writes of a reserved key) until the parent's
//! revisions run ahead of the scope's with room for the writes it takes until its hand-off, and
//! the cut-over checks that they did. And the cut-over drops the scope from the layout and sets
//! the parent's floor at the cut-over: the parent's history before it answers as compacted, as
//! the merged keys' history on its group is incomplete.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchStream};
use serde::{Deserialize, Serialize};

use crate::backend::Credentials;
use crate::backend::ownership::Owners;
use crate::gate::Gateway;
use crate::index::{KeyRange, RevisionShift, ScopeIndex};
use crate::meta::MetaStore;
use crate::meta::layout::KeyText;

/// Keys copied per read of the old group.
const PAGE: i64 = 500;

/// How long a merge watches the scope's revisions go before it makes room for them.
const RATE_SAMPLE: Duration = Duration::from_millis(500);

/// Revisions a merge leaves between the scope's and its parent's at the least.
const MERGE_ROOM: i64 = 1000;

/// The most revisions a merge takes its parent's group forward by: each is a write.
const MAX_SKIP: i64 = 2_000_000;

/// How long the catch-up before the hand-off follows the watch at most; what it leaves is
/// applied during the hand-off.
const CATCH_UP_FOR: Duration = Duration::from_secs(20);

/// How long the catch-up goes on without the keys left to apply falling by a tenth.
const CATCH_UP_STALL: Duration = Duration::from_secs(1);

/// Keys written since the last applied event that the catch-up leaves to the hand-off.
const HANDOFF_TAIL: i64 = 200;

/// Txns to the new group in flight at once.
const APPLY_AT_ONCE: usize = 8;

/// Operations per Txn to the new group: etcd's default `--max-txn-ops`.
const APPLY_OPS: usize = 128;

/// Key and value bytes per Txn to the new group, below etcd's default 1.5 MiB request limit
/// with room for framing; a larger key-value goes alone.
const APPLY_BYTES: usize = 1024 * 1024;

/// Watch messages the catch-up applies as one batch at most.
const CATCH_UP_BATCH: usize = 1000;

/// How long the clean-up waits for every replica to route by the new layout; a replica that
/// died without withdrawing its routed epoch stops counting within its lease's TTL (10 s).
const ROUTED_WAIT: Duration = Duration::from_secs(30);

/// How often the clean-up looks at which layout the replicas route by.
const ROUTED_POLL: Duration = Duration::from_millis(25);

/// How far a migration got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Copying the keys at one revision.
    Copy,
    /// Applying writes made since.
    CatchUp,
    /// The old group refuses the scope; applying the last writes it took.
    HandOff,
    /// Granting the new group and writing the layout.
    CutOver,
    /// Deleting the copy left on the old group.
    CleanUp,
    /// The scope is on the new group and the old one holds none of it.
    Done,
    /// The move failed before its cut-over and was undone: the scope is where it was.
    RolledBack,
}

impl Phase {
    /// Whether the migration has ended.
    pub fn ended(self) -> bool {
        matches!(self, Phase::Done | Phase::RolledBack)
    }
}

/// A migration's record in meta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    /// Its id.
    pub id: String,
    /// The scope it moves.
    pub scope: String,
    /// The group the scope leaves.
    pub from: String,
    /// The group it moves to.
    pub to: String,
    /// How far it got.
    pub phase: Phase,
    /// The old group's revision the copy read at.
    pub copy_revision: i64,
    /// Keys of the scope at the copy revision.
    pub keys_total: u64,
    /// Keys copied so far.
    pub keys_copied: u64,
    /// Writes applied by the catch-up.
    pub events_applied: u64,
    /// The old group's revision right after it gave the scope up.
    pub handoff_revision: i64,
    /// The scope's revision shift on the new group, once cut over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revisions: Option<RevisionShift>,
    /// Unix milliseconds it started.
    pub started_ms: u64,
    /// Unix milliseconds of its last change.
    pub updated_ms: u64,
    /// Why it rolled back, or what the clean-up could not do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The replica running it.
    #[serde(default)]
    pub replica: String,
    /// For a merge: the scope that takes the moved keys over; the moved scope is gone once it
    /// cuts over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into: Option<String>,
    /// For a merge: the moved scope's ranges, which its recovery needs once the layout no longer
    /// names it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<[KeyText; 2]>,
    /// Milliseconds from the hand-off's start to the layout naming the new group: how long the
    /// scope's writes could wait in aq (plus each replica's reroute).
    #[serde(default)]
    pub handoff_ms: u64,
    /// For a merge: how many revisions the parent's group was taken forward before the copy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: i64,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

/// Why a migration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Nothing to move, or nowhere to move it.
    #[error("{0}")]
    Invalid(String),
    /// Another migration is under way.
    #[error("migration {0} is under way; wait for it to end (GET /v1/migrations/{0})")]
    Busy(String),
    /// The meta group or a group failed.
    #[error("{0}")]
    Failed(String),
}

/// Starts and runs migrations on this replica.
pub struct Migrator {
    gateway: Arc<Gateway>,
    store: MetaStore,
    /// Root credentials of each group whose ownership aq manages.
    admins: std::sync::RwLock<BTreeMap<String, Credentials>>,
    /// This replica's name, recorded in the migrations it runs.
    replica: String,
    /// The id of the migration this replica runs now.
    running: std::sync::Mutex<Option<String>>,
}

/// A migration whose record has not changed for this long, while it holds the lock, was left by
/// a replica that died: another replica finishes or undoes it. Every step records progress
/// well within it (a page copied, a batch of the catch-up applied, the clean-up's wait of 30 s).
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// What one migration works with.
struct Work {
    migration: Migration,
    /// The scope's own ranges (nested scopes left out).
    parts: Vec<KeyRange>,
    before: ScopeIndex,
    after: ScopeIndex,
    layout_revision: i64,
    layout: crate::meta::layout::LayoutRecord,
    from: Owners,
    to: Owners,
    source: Client,
    target: Client,
    /// The new group's revision of the first write of the copy.
    first_write: Option<i64>,
    /// For a merge, the scope taking the keys over.
    into: Option<Arc<crate::index::Scope>>,
    /// Per part, the old group's revision through which its writes are applied.
    applied: Vec<i64>,
}

impl Migrator {
    /// A migrator over `gateway`, with the root credentials of every managed or administered
    /// group, on the replica named `replica`.
    pub fn new(gateway: Arc<Gateway>, store: MetaStore, admins: BTreeMap<String, Credentials>, replica: String) -> Self {
        Migrator { gateway, store, admins: std::sync::RwLock::new(admins), replica, running: std::sync::Mutex::new(None) }
    }

    /// Gives the migrator the root credentials of a group added at run time.
    pub fn add_admin(&self, group: &str, admin: Credentials) {
        self.admins.write().expect("admins lock").insert(group.to_string(), admin);
    }

    /// The root credentials of `group`, if aq has them.
    fn admin(&self, group: &str) -> Option<Credentials> {
        self.admins.read().expect("admins lock").get(group).cloned()
    }

    /// Checks and claims a move of `scope` to group `to`, and runs it in the background.
    /// Returns the migration as recorded at its start.
    pub async fn start(self: &Arc<Self>, scope: &str, to: &str) -> Result<Migration, MigrateError> {
        let work = self.prepare(scope, to, None).await?;
        let started = work.migration.clone();
        let this = self.clone();
        tokio::spawn(async move { this.run(work).await });
        Ok(started)
    }

    /// Runs a move of `scope` to `to` to its end; answers the final record.
    pub async fn run_to_end(&self, scope: &str, to: &str) -> Result<Migration, MigrateError> {
        let work = self.prepare(scope, to, None).await?;
        Ok(self.run(work).await)
    }

    /// Splits `scope` at key `at`: a new scope `id` (default `<scope>-<n>`, the least free
    /// n from 2) takes the parent's own keys from `at` to its end, with the parent's policy,
    /// first on the parent's group (a layout epoch; no key moves), then, when `to` names
    /// another group, moved there live like any scope. Answers the new scope's id and the
    /// move's migration, if one was started.
    pub async fn split(
        self: &Arc<Self>,
        scope_id: &str,
        at: &[u8],
        to: Option<&str>,
        id: Option<&str>,
    ) -> Result<(String, Option<Migration>), MigrateError> {
        let failed = |e: crate::meta::MetaError| MigrateError::Failed(e.to_string());
        let key = String::from_utf8_lossy(at).into_owned();
        let (layout, layout_revision, before, parent) = self.check_split(scope_id, at).await?;
        let id = match id {
            Some(id) if before.get(id).is_some() => {
                return Err(MigrateError::Invalid(format!("there is a scope {id} already; pick another id")));
            }
            Some(id) => id.to_string(),
            None => (2..).map(|n| format!("{scope_id}-{n}")).find(|id| before.get(id).is_none()).expect("a free id"),
        };
        // The new scope is governed as its parent: the same binding, recorded for it first,
        // since a replica binds a new layout's scopes from their stored bindings.
        let (binding, _) = self
            .store
            .binding(scope_id)
            .await
            .map_err(failed)?
            .ok_or_else(|| MigrateError::Failed(format!("scope {scope_id} has no binding in the meta group")))?;
        let stale = self.store.binding(&id).await.map_err(failed)?.map(|(_, revision)| revision).unwrap_or(0);
        let record = crate::meta::BindingRecord {
            active: binding.active.clone(),
            previous: None,
            source: binding.source,
            generation: 1,
            changed_at: crate::clock::unix_now(),
        };
        self.store.write_binding(&id, &record, stale).await.map_err(failed)?;
        let now = crate::clock::unix_now();
        let mut scopes: Vec<_> = before.scopes().iter().map(|s| (**s).clone()).collect();
        scopes.iter_mut().find(|s| s.id == parent.id).expect("indexed").adapted.changed_at = now;
        let child = crate::index::Scope {
            id: id.clone(),
            range: KeyRange { start: at.to_vec(), end: parent.range.end.clone() },
            group: parent.group.clone(),
            labels: parent.labels.clone(),
            revisions: parent.revisions,
            adapted: crate::index::Adapted { split_from: Some(parent.id.clone()), changed_at: now },
        };
        scopes.push(child);
        let after = ScopeIndex::new(scopes).map_err(|e| MigrateError::Invalid(format!("cannot split there: {e}")))?;
        let reason = format!("scope {scope_id} split at {key:?}: {id} takes the keys from there");
        let record = layout.changed(&after, reason);
        self.store.write_layout(&record, layout_revision).await.map_err(|e| MigrateError::Failed(format!("cannot write the new layout: {e}")))?;
        tracing::info!(scope = scope_id, new = %id, at = %key, "scope split");
        let Some(to) = to.filter(|to| *to != parent.group) else { return Ok((id, None)) };
        // The move starts from the layout this replica routes by once it has the new scope.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut reroutes = self.gateway.reroutes();
        while self.gateway.routing().scope(&id).is_none() {
            if tokio::time::timeout_at(deadline, reroutes.changed()).await.is_err() {
                return Err(MigrateError::Failed(format!("scope {id} was split off, but this replica does not route by it yet; move it with aq scopes move {id} --to {to}")));
            }
        }
        let started = self.start(&id, to).await?;
        Ok((id, Some(started)))
    }

    /// Whether scope `scope_id` can split at `at` now: the key is the scope's own and not its
    /// first, no migration runs, and the scope keeps no lineage. Answers the stored layout,
    /// its revision and index, and the scope.
    pub async fn check_split(
        &self,
        scope_id: &str,
        at: &[u8],
    ) -> Result<(crate::meta::layout::LayoutRecord, i64, ScopeIndex, Arc<crate::index::Scope>), MigrateError> {
        let failed = |e: crate::meta::MetaError| MigrateError::Failed(e.to_string());
        let key = String::from_utf8_lossy(at).into_owned();
        let (layout, layout_revision, before, parent) = self.stored(scope_id).await?;
        if at == parent.range.start.as_slice() || !parent.range.contains(at) {
            return Err(MigrateError::Invalid(format!(
                "{key:?} does not split scope {scope_id}: it must sort after the scope's first key and before its end"
            )));
        }
        match before.lookup(at) {
            crate::index::Owner::Scope(owner) if owner.id == parent.id => {}
            crate::index::Owner::Scope(owner) => {
                return Err(MigrateError::Invalid(format!(
                    "{key:?} belongs to scope {}, nested in {scope_id}; split that scope, or pick a key of {scope_id}'s own",
                    owner.id
                )));
            }
            _ => return Err(MigrateError::Invalid(format!("{key:?} is reserved to aq; pick another key"))),
        }
        // A split changes the layout a running move's cut-over is guarded by; one at a time.
        if let Some(active) = self.store.active_migration().await.map_err(failed)? {
            return Err(MigrateError::Busy(active));
        }
        self.refuse_lineage(&parent).await?;
        Ok((layout, layout_revision, before, parent))
    }

    /// Merges `scope` back into its parent, the innermost scope holding its range, which owns
    /// its keys from then on under the parent's policy and revisions. A scope on its parent's
    /// group with the parent's revisions (split off and never moved) merges by one layout
    /// write; one on another group moves onto the parent's group live first, and the parent's
    /// revisions are taken past the scope's so that neither goes backwards (module
    /// documentation). Answers the parent's id and the migration, if one was started.
    pub async fn merge(self: &Arc<Self>, scope_id: &str) -> Result<(String, Option<Migration>), MigrateError> {
        let failed = |e: crate::meta::MetaError| MigrateError::Failed(e.to_string());
        let (layout, layout_revision, before, scope) = self.stored(scope_id).await?;
        let parent = before
            .parent_of(scope_id)
            .ok_or_else(|| MigrateError::Invalid(format!("no scope holds scope {scope_id}'s range, so there is nothing to merge it into")))?
            .clone();
        if let Some(active) = self.store.active_migration().await.map_err(failed)? {
            return Err(MigrateError::Busy(active));
        }
        self.refuse_lineage(&scope).await?;
        if scope.group != parent.group {
            let work = self.prepare(scope_id, &parent.group.clone(), Some(parent.clone())).await?;
            let started = work.migration.clone();
            let this = self.clone();
            tokio::spawn(async move { this.run(work).await });
            return Ok((parent.id.clone(), Some(started)));
        }
        if scope.revisions != parent.revisions {
            return Err(MigrateError::Invalid(format!(
                "scope {scope_id} is on its parent {}'s group {} but counts revisions of its own (it moved there); \
                 move it to another group and merge it from there",
                parent.id, parent.group
            )));
        }
        let mut scopes: Vec<_> = before.scopes().iter().filter(|s| s.id != scope.id).map(|s| (**s).clone()).collect();
        scopes.iter_mut().find(|s| s.id == parent.id).expect("indexed").adapted.changed_at = crate::clock::unix_now();
        let after = ScopeIndex::new(scopes).map_err(|e| MigrateError::Failed(e.to_string()))?;
        let reason = format!("scope {scope_id} merged into {}", parent.id);
        let record = layout.changed(&after, reason);
        self.store.write_layout(&record, layout_revision).await.map_err(|e| MigrateError::Failed(format!("cannot write the new layout: {e}")))?;
        tracing::info!(scope = scope_id, into = %parent.id, "scope merged on its group");
        Ok((parent.id.clone(), None))
    }

    /// The stored layout, its revision, its index and scope `scope_id` in it.
    async fn stored(
        &self,
        scope_id: &str,
    ) -> Result<(crate::meta::layout::LayoutRecord, i64, ScopeIndex, Arc<crate::index::Scope>), MigrateError> {
        let (layout, revision) = self
            .store
            .layout()
            .await
            .map_err(|e| MigrateError::Failed(e.to_string()))?
            .ok_or_else(|| MigrateError::Failed("no stored scope layout".into()))?;
        let index = layout.index().map_err(MigrateError::Failed)?;
        let scope = index
            .get(scope_id)
            .ok_or_else(|| MigrateError::Invalid(format!("there is no scope {scope_id}; aq scopes ls lists them")))?
            .clone();
        Ok((layout, revision, index, scope))
    }

    /// Refuses a scope whose writes keep lineage: its records and checkpoints are in its
    /// group's revisions, and moving or cutting them is not done yet.
    async fn refuse_lineage(&self, scope: &crate::index::Scope) -> Result<(), MigrateError> {
        let records = crate::lineage::records_prefix(&scope.id);
        let (key, range_end) = KeyRange::prefix(&records).to_request();
        let groups = self.gateway.groups();
        let group = groups
            .get(&scope.group)
            .ok_or_else(|| MigrateError::Failed(format!("this replica has no connection to group {}", scope.group)))?;
        let kept = group
            .range(etcd_client::proto::PbRangeRequest { key, range_end, count_only: true, ..Default::default() })
            .await
            .map_err(|e| MigrateError::Failed(format!("cannot read group {}: {}", scope.group, e.message())))?;
        if kept.count > 0 {
            return Err(MigrateError::Invalid(format!(
                "scope {} keeps lineage ({} records on group {}); moving, splitting or merging a scope with lineage \
                 is not supported yet",
                scope.id, kept.count, scope.group
            )));
        }
        Ok(())
    }

    async fn prepare(&self, scope_id: &str, to: &str, into: Option<Arc<crate::index::Scope>>) -> Result<Work, MigrateError> {
        let failed = |e: crate::meta::MetaError| MigrateError::Failed(e.to_string());
        let (layout, layout_revision, before, scope) = self.stored(scope_id).await?;
        let from = scope.group.clone();
        if from == to {
            return Err(MigrateError::Invalid(format!("scope {scope_id} is on group {to} already")));
        }
        let groups = self.gateway.groups();
        if !groups.contains_key(to) {
            let known: Vec<&str> = groups.keys().map(String::as_str).collect();
            return Err(MigrateError::Invalid(format!("there is no group {to}; the groups are {}", known.join(", "))));
        }
        let admin = |group: &str| {
            self.admin(group).ok_or_else(|| {
                MigrateError::Invalid(format!(
                    "aq holds no root credentials for group {group}, so it cannot move ownership there; give the \
                     group an admin user and password in the layout"
                ))
            })
        };
        let (from_admin, to_admin) = (&admin(&from)?, &admin(to)?);
        let connect = |group: &str, admin: &Credentials| {
            let endpoints = groups[group].endpoints().to_vec();
            let (group, admin) = (group.to_string(), admin.clone());
            async move { Owners::connect(&group, &endpoints, &admin).await.map_err(MigrateError::Failed) }
        };
        let from_owners = connect(&from, from_admin).await?;
        let to_owners = connect(to, to_admin).await?;
        let (source, target) = (from_owners.client(), to_owners.client());

        self.refuse_lineage(&scope).await?;

        let parts: Vec<KeyRange> =
            before.overlapping(&scope.range).into_iter().filter(|(s, _)| s.id == scope.id).map(|(_, part)| part).collect();
        let mut scopes: Vec<_> = before.scopes().iter().map(|s| (**s).clone()).collect();
        let into = match into {
            // The parent as this layout has it; a merge's scope is gone from the layout after it.
            Some(parent) => {
                let parent = before
                    .get(&parent.id)
                    .filter(|p| p.group == to)
                    .ok_or_else(|| MigrateError::Failed(format!("scope {} changed while the merge started; try again", parent.id)))?
                    .clone();
                scopes.retain(|s| s.id != scope.id);
                Some(parent)
            }
            None => {
                scopes.iter_mut().find(|s| s.id == scope.id).expect("the scope is indexed").group = to.to_string();
                None
            }
        };
        let after = ScopeIndex::new(scopes).map_err(|e| MigrateError::Failed(e.to_string()))?;

        let now = crate::clock::unix_ms();
        let migration = Migration {
            id: format!("m-{now}-{}", &crate::lineage::new_record_id()[..8]),
            scope: scope.id.clone(),
            from: from.clone(),
            to: to.to_string(),
            phase: Phase::Copy,
            copy_revision: 0,
            keys_total: 0,
            keys_copied: 0,
            events_applied: 0,
            handoff_revision: 0,
            revisions: None,
            started_ms: now,
            updated_ms: now,
            error: None,
            replica: self.replica.clone(),
            into: into.as_ref().map(|p| p.id.clone()),
            parts: match into {
                Some(_) => parts.iter().map(|p| [KeyText::of(&p.start), KeyText::of(&p.end)]).collect(),
                None => Vec::new(),
            },
            skipped: 0,
            handoff_ms: 0,
        };
        if !self.store.claim_migration(&migration.id).await.map_err(failed)? {
            let active = self.store.active_migration().await.map_err(failed)?.unwrap_or_default();
            return Err(MigrateError::Busy(active));
        }
        if let Err(e) = self.store.put_migration(&migration).await {
            let _ = self.store.release_migration(&migration.id).await;
            return Err(failed(e));
        }
        tracing::info!(id = %migration.id, scope = %scope.id, from = %from, to, "migration started");
        Ok(Work {
            migration,
            parts,
            before,
            after,
            layout_revision,
            layout,
            from: from_owners,
            to: to_owners,
            source,
            target,
            first_write: None,
            into,
            applied: Vec::new(),
        })
    }

    /// Runs the steps; on a failure before the cut-over, rolls back.
    async fn run(&self, mut work: Work) -> Migration {
        *self.running.lock().expect("migrator lock") = Some(work.migration.id.clone());
        let _running = Running(&self.running);
        match self.move_scope(&mut work).await {
            Ok(()) => {}
            // Until the layout names the new group, nothing has moved for clients.
            Err(e) if work.migration.revisions.is_none() => {
                tracing::error!(id = %work.migration.id, "migration failed, rolling back: {e}");
                let undone = self.roll_back(&mut work).await;
                work.migration.error = Some(match undone {
                    Ok(()) => e,
                    Err(more) => format!("{e}; the roll-back did not finish: {more}"),
                });
                work.migration.phase = Phase::RolledBack;
            }
            Err(e) => {
                tracing::error!(id = %work.migration.id, "migration cut over, clean-up failed: {e}");
                work.migration.error = Some(format!("the scope moved, but the old copy stays on group {}: {e}", work.migration.from));
                work.migration.phase = Phase::Done;
            }
        }
        self.record(&mut work.migration).await;
        let _ = self.store.release_migration(&work.migration.id).await;
        tracing::info!(id = %work.migration.id, phase = ?work.migration.phase, "migration ended");
        work.migration
    }

    async fn record(&self, migration: &mut Migration) {
        migration.updated_ms = crate::clock::unix_ms();
        if let Err(e) = self.store.put_migration(migration).await {
            tracing::warn!(id = %migration.id, "cannot record the migration's progress: {e}");
        }
    }

    async fn move_scope(&self, work: &mut Work) -> Result<(), String> {
        let from = work.migration.from.clone();
        // Keys left on the new group by an earlier attempt are not the scope's.
        for part in &work.parts {
            delete(&mut work.target, part).await.map_err(|e| format!("cannot clear the scope's range on group {}: {e}", work.migration.to))?;
        }

        // 1. Copy at one revision.
        let revision = current_revision(&mut work.source).await.map_err(|e| format!("cannot read group {from}: {e}"))?;
        work.migration.copy_revision = revision;
        for part in &work.parts {
            let counted = count(&mut work.source, part, revision).await;
            work.migration.keys_total += counted.map_err(|e| format!("cannot count the scope's keys on group {from}: {e}"))? as u64;
        }
        self.record(&mut work.migration).await;
        if work.into.is_some() {
            self.make_room(work).await?;
        }
        for part in work.parts.clone() {
            let mut pages = Pages::of(&part);
            let read = |e| format!("cannot read the scope's keys on group {from} at revision {revision}: {e}");
            while let Some(page) = pages.next(&mut work.source, GetOptions::new().with_revision(revision)).await.map_err(read)? {
                let batch = page.kvs().iter().map(|kv| (kv.key().to_vec(), Some((kv.value().to_vec(), kv.lease())))).collect();
                self.apply(work, batch).await?;
                work.migration.keys_copied += page.kvs().len() as u64;
                self.record(&mut work.migration).await;
            }
        }

        // 2. Catch up with what was written since.
        work.migration.phase = Phase::CatchUp;
        self.record(&mut work.migration).await;
        let mut watches = Vec::new();
        for part in &work.parts {
            let (key, range_end) = part.to_request();
            let options = WatchOptions::new().with_range(range_end).with_start_revision(revision + 1);
            let stream = work.source.watch(key, Some(options)).await.map_err(|e| format!("cannot watch group {from}: {e}"))?;
            watches.push(Follow::start(stream));
        }
        work.applied = vec![revision; work.parts.len()];
        let now = current_revision(&mut work.source).await.map_err(|e| format!("cannot read group {from}: {e}"))?;
        let until = tokio::time::Instant::now() + CATCH_UP_FOR;
        for (part, stream) in watches.iter_mut().enumerate() {
            self.catch_up(work, part, stream, now, until).await?;
        }
        drop(watches);

        // 3. Hand-off: the old group refuses the scope from here on.
        work.migration.phase = Phase::HandOff;
        self.record(&mut work.migration).await;
        let handing = tokio::time::Instant::now();
        let tail_before = work.migration.events_applied;
        work.from.reconcile(&work.after.group_ranges(&from)).await?;
        let revoked = handing.elapsed();
        let handed = current_revision(&mut work.source).await.map_err(|e| format!("cannot read group {from}: {e}"))?;
        work.migration.handoff_revision = handed;
        for part in 0..work.parts.len() {
            self.finish_part(work, part, handed).await?;
        }
        let finished = handing.elapsed();
        let tail = work.migration.events_applied - tail_before;

        // 4. Cut over.
        work.migration.phase = Phase::CutOver;
        self.record(&mut work.migration).await;
        let old = work.before.get(&work.migration.scope).expect("indexed").revisions;
        let last_seen = old.up(handed);
        let cut = current_revision(&mut work.target).await.map_err(|e| format!("cannot read group {}: {e}", work.migration.to))?;
        let mut scopes: Vec<_> = work.after.scopes().iter().map(|s| (**s).clone()).collect();
        let (shift, reason) = match &work.into {
            Some(parent) => {
                // The parent's revisions as they were, read from the cut-over on: before it,
                // the scope's keys were not all on the group yet.
                let p = parent.revisions;
                let first = p.up(work.first_write.unwrap_or(cut + 1));
                if first <= last_seen {
                    return Err(format!(
                        "scope {} took more writes during the merge than the {} revisions its parent {}'s were taken \
                         forward by; merge it again when it is quieter",
                        work.migration.scope, work.migration.skipped, parent.id
                    ));
                }
                let shift = RevisionShift { floor: p.floor.max(p.up(cut)), handed, ..p };
                let taker = scopes.iter_mut().find(|s| s.id == parent.id).expect("indexed");
                taker.revisions = shift;
                taker.adapted.changed_at = crate::clock::unix_now();
                let reason =
                    format!("migration {}: scope {} merged into {} on group {}", work.migration.id, work.migration.scope, parent.id, work.migration.to);
                (shift, reason)
            }
            None => {
                let shift = match work.first_write {
                    Some(first) => {
                        let offset = last_seen + 1 - first;
                        RevisionShift { offset, base: last_seen + 1, floor: cut + offset, handed: 0 }
                    }
                    None => RevisionShift { offset: last_seen - cut, base: last_seen + 1, floor: last_seen + 1, handed: 0 },
                };
                let moved = scopes.iter_mut().find(|s| s.id == work.migration.scope).expect("indexed");
                moved.revisions = shift;
                moved.adapted.changed_at = crate::clock::unix_now();
                let reason =
                    format!("migration {}: scope {} moved from group {from} to {}", work.migration.id, work.migration.scope, work.migration.to);
                (shift, reason)
            }
        };
        work.after = ScopeIndex::new(scopes).map_err(|e| e.to_string())?;
        work.to.reconcile(&work.after.group_ranges(&work.migration.to)).await?;
        let layout = work.layout.changed(&work.after, reason);
        self.store.write_layout(&layout, work.layout_revision).await.map_err(|e| format!("cannot write the new layout: {e}"))?;
        work.migration.revisions = Some(shift);
        work.migration.handoff_ms = handing.elapsed().as_millis() as u64;
        tracing::info!(
            id = %work.migration.id, scope = %work.migration.scope, to = %work.migration.to, ?shift,
            revoke_ms = revoked.as_millis() as u64, tail, tail_ms = (finished - revoked).as_millis() as u64,
            handoff_ms = work.migration.handoff_ms, "migration cut over"
        );

        // 5. Clean up the old copy, once no replica's watch can still be reading it.
        work.migration.phase = Phase::CleanUp;
        self.record(&mut work.migration).await;
        self.clean_up(&mut work.source, &work.parts, &from, layout.epoch).await?;
        work.migration.phase = Phase::Done;
        Ok(())
    }

    /// Before a merge's copy: takes the parent's group's revisions forward until the parent's
    /// run ahead of the merged scope's by room for the writes the scope may take until its
    /// hand-off, so that every copied key, and every later write, has a revision above any the
    /// scope's clients were given. etcd has no way to skip revisions but writing, so the group
    /// takes that many writes of a reserved key.
    async fn make_room(&self, work: &mut Work) -> Result<(), String> {
        let parent = work.into.clone().expect("a merge");
        let (from, to) = (work.migration.from.clone(), work.migration.to.clone());
        let scope = work.before.get(&work.migration.scope).expect("indexed").revisions;
        let read = |group: &str, e: etcd_client::Error| format!("cannot read group {group}: {e}");
        // How fast the scope's revisions go now.
        let (started, first) = (tokio::time::Instant::now(), current_revision(&mut work.source).await.map_err(|e| read(&from, e))?);
        tokio::time::sleep(RATE_SAMPLE).await;
        let last = current_revision(&mut work.source).await.map_err(|e| read(&from, e))?;
        let rate = (last - first) as f64 / started.elapsed().as_secs_f64();
        // The copy, the catch-up and the hand-off, generously.
        let expected = CATCH_UP_FOR.as_secs_f64() * 2.0 + work.migration.keys_total as f64 / 500.0;
        let room = MERGE_ROOM + (rate * expected * 2.0) as i64;
        let ahead = parent.revisions.up(current_revision(&mut work.target).await.map_err(|e| read(&to, e))?);
        let skip = scope.up(last) + room - ahead;
        if skip <= 0 {
            return Ok(());
        }
        if skip > MAX_SKIP {
            return Err(format!(
                "merging scope {} would take group {to}'s revisions {skip} forward (the scope's run {} ahead of its \
                 parent {}'s), more than {MAX_SKIP}; merge it when it is quieter or leave it on its own group",
                work.migration.scope,
                scope.up(last) - ahead,
                parent.id
            ));
        }
        tracing::info!(id = %work.migration.id, skip, group = %to, "taking the parent's revisions forward for a merge");
        skip_revisions(&work.target, skip).await.map_err(|e| format!("cannot take group {to}'s revisions forward: {e}"))?;
        work.migration.skipped = skip;
        self.record(&mut work.migration).await;
        Ok(())
    }

    /// Deletes the old copy of a moved scope's `parts` on group `from`, once every replica
    /// routes by layout `epoch`.
    async fn clean_up(&self, source: &mut Client, parts: &[KeyRange], from: &str, epoch: u64) -> Result<(), String> {
        self.await_routed(epoch).await?;
        for part in parts {
            // A marker first: every watch still draining the old copy sees an event of a
            // revision past the hand-off in each part, even one with no key left, and knows it
            // has seen all the scope's writes there (`front/watch.rs`).
            let marker = if part.start.is_empty() { vec![0] } else { part.start.clone() };
            source.put(marker, Vec::new(), None).await.map_err(|e| format!("cannot mark the end of the old copy on group {from}: {e}"))?;
            delete(source, part).await.map_err(|e| format!("cannot delete the old copy on group {from}: {e}"))?;
        }
        Ok(())
    }

    /// Finishes or undoes a migration that holds the lock but that no live replica runs: one
    /// this replica ran before it restarted, or one whose record went stale
    /// ([`STALE_AFTER`]). The stored layout tells which: if it names the new group the move
    /// cut over and only the clean-up is left; otherwise nothing moved for clients, and the
    /// roles go back as the layout has them and the partial copy is deleted. Answers the
    /// migration's final record when there was one to recover.
    pub async fn recover(&self) -> Result<Option<Migration>, String> {
        let meta = |e: crate::meta::MetaError| format!("cannot read the migrations in meta: {e}");
        let Some(id) = self.store.active_migration().await.map_err(meta)? else { return Ok(None) };
        if self.running.lock().expect("migrator lock").as_deref() == Some(id.as_str()) {
            return Ok(None);
        }
        let Some(mut migration) = self.store.migration(&id).await.map_err(meta)? else {
            // Claimed by a replica that died before recording it: nothing was done.
            self.store.release_migration(&id).await.map_err(meta)?;
            return Ok(None);
        };
        let idle = Duration::from_millis(crate::clock::unix_ms().saturating_sub(migration.updated_ms));
        if migration.replica != self.replica && idle < STALE_AFTER {
            return Ok(None);
        }
        tracing::warn!(id, phase = ?migration.phase, replica = %migration.replica, "recovering an interrupted migration");
        let (layout, _) = self.store.layout().await.map_err(meta)?.ok_or("no stored scope layout")?;
        let index = layout.index()?;
        let scope = index.get(&migration.scope).cloned();
        let parts: Vec<KeyRange> = match &scope {
            Some(scope) => {
                index.overlapping(&scope.range).into_iter().filter(|(s, _)| s.id == scope.id).map(|(_, part)| part).collect()
            }
            // A merge that cut over: the layout names the scope no more.
            None if migration.into.is_some() => migration
                .parts
                .iter()
                .map(|[start, end]| Ok(KeyRange { start: start.bytes()?, end: end.bytes()? }))
                .collect::<Result<_, String>>()?,
            None => return Err(format!("the layout has no scope {}", migration.scope)),
        };
        let interrupted = format!("interrupted in phase {:?} on replica {}", migration.phase, migration.replica);
        if scope.as_ref().is_none_or(|scope| scope.group == migration.to) {
            let from = self.owners(&migration.from).await?;
            migration.phase = Phase::CleanUp;
            self.record(&mut migration).await;
            let mut source = from.client();
            match self.clean_up(&mut source, &parts, &migration.from, layout.epoch).await {
                Ok(()) => migration.error = None,
                Err(e) => migration.error = Some(format!("{interrupted}; the scope moved, but the old copy stays on group {}: {e}", migration.from)),
            }
            migration.phase = Phase::Done;
        } else {
            let mut from = self.owners(&migration.from).await?;
            let mut to = self.owners(&migration.to).await?;
            from.reconcile(&index.group_ranges(&migration.from)).await?;
            to.reconcile(&index.group_ranges(&migration.to)).await?;
            let mut target = to.client();
            for part in &parts {
                delete(&mut target, part).await.map_err(|e| format!("cannot delete the partial copy on group {}: {e}", migration.to))?;
            }
            migration.error = Some(format!("{interrupted}; rolled back"));
            migration.phase = Phase::RolledBack;
        }
        self.record(&mut migration).await;
        self.store.release_migration(&id).await.map_err(meta)?;
        tracing::info!(id, phase = ?migration.phase, "interrupted migration recovered");
        Ok(Some(migration))
    }

    /// An administrator's connection to `group`'s roles.
    async fn owners(&self, group: &str) -> Result<Owners, String> {
        let admin = self.admin(group).ok_or_else(|| format!("aq holds no root credentials for group {group}"))?;
        let endpoints = self.gateway.groups().get(group).ok_or_else(|| format!("there is no group {group}"))?.endpoints().to_vec();
        Owners::connect(group, &endpoints, &admin).await
    }

    /// Waits until every live replica routes by layout `epoch` (or later), within
    /// [`ROUTED_WAIT`].
    async fn await_routed(&self, epoch: u64) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + ROUTED_WAIT;
        loop {
            let routed = self.store.routed().await.map_err(|e| format!("cannot read which layout the replicas route by: {e}"))?;
            let behind: Vec<String> =
                routed.iter().filter(|(_, at)| *at < epoch).map(|(replica, at)| format!("{replica} (epoch {at})")).collect();
            if behind.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "replicas still route by an older layout than epoch {epoch} after {ROUTED_WAIT:?}: {}",
                    behind.join(", ")
                ));
            }
            tokio::time::sleep(ROUTED_POLL).await;
        }
    }

    /// Writes `batch` to the new group, many keys per Txn and several Txns at a time: a put
    /// (value, lease) or a delete per key, each key once. Leases are copied there by ID first; one that expired meanwhile
    /// leaves its key without it, and the key's deletion on the old group follows through the
    /// catch-up.
    async fn apply(&self, work: &mut Work, batch: Vec<(Vec<u8>, Change)>) -> Result<(), String> {
        let to = &self.gateway.groups()[&work.migration.to];
        let mut leases: Vec<i64> = batch.iter().filter_map(|(_, put)| put.as_ref().map(|(_, lease)| *lease)).filter(|l| *l != 0).collect();
        leases.sort_unstable();
        leases.dedup();
        let mut live = std::collections::BTreeSet::new();
        for lease in leases {
            if self.gateway.ensure_leases(to, [lease]).await.is_ok() {
                live.insert(lease);
            }
        }
        // Txns of up to etcd's 128 operations and well under its 1.5 MiB request limit: the
        // copy's keys share revisions, which no client sees (the scope's floor comes after).
        let mut txns: Vec<Vec<etcd_client::TxnOp>> = Vec::new();
        let mut bytes = usize::MAX;
        for (key, put) in batch {
            let size = key.len() + put.as_ref().map_or(0, |(value, _)| value.len());
            if txns.last().is_none_or(|t| t.len() >= APPLY_OPS) || bytes + size > APPLY_BYTES {
                txns.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            let op = match put {
                Some((value, lease)) if live.contains(&lease) => etcd_client::TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease))),
                Some((value, _)) => etcd_client::TxnOp::put(key, value, None),
                None => etcd_client::TxnOp::delete(key, None),
            };
            txns.last_mut().expect("pushed").push(op);
        }
        let group = work.migration.to.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let mut pending = txns.into_iter();
        let mut first: Option<i64> = None;
        loop {
            while tasks.len() < APPLY_AT_ONCE {
                let Some(ops) = pending.next() else { break };
                let mut client = work.target.clone();
                tasks.spawn(async move { client.txn(etcd_client::Txn::new().and_then(ops)).await.map(|a| a.header().map(|h| h.revision())) });
            }
            let Some(done) = tasks.join_next().await else { break };
            match done.expect("a copy task does not panic") {
                Ok(Some(revision)) => first = Some(first.map_or(revision, |f| f.min(revision))),
                Ok(None) => {}
                Err(e) => return Err(format!("cannot write the scope's keys to group {group}: {e}")),
            }
        }
        // The first write of the copy is a put of its first page; deletes come later.
        if work.first_write.is_none() {
            work.first_write = first;
        }
        Ok(())
    }

    /// Applies part `part`'s watch events until no more than [`HANDOFF_TAIL`] of its keys were
    /// written since the last event applied, or `until`.
    async fn catch_up(&self, work: &mut Work, part: usize, follow: &mut Follow, revision: i64, until: tokio::time::Instant) -> Result<(), String> {
        let from = work.migration.from.clone();
        let progress = |e: etcd_client::Error| format!("cannot ask group {from} for progress: {e}");
        follow.sender.request_progress().await.map_err(progress)?;
        // The fewest keys left seen, and when that last fell by a tenth.
        let (mut fewest, mut fell) = (i64::MAX, tokio::time::Instant::now());
        loop {
            let Ok(first) = tokio::time::timeout_at(until, follow.events.recv()).await else { return Ok(()) };
            let first = first.ok_or_else(|| format!("the watch of group {from} ended"))?;
            // Everything the watch delivered meanwhile goes in one batch, the last event of
            // each key applied.
            let mut messages = vec![first];
            while messages.len() < CATCH_UP_BATCH
                && let Ok(next) = follow.events.try_recv()
            {
                messages.push(next);
            }
            let mut batch: BTreeMap<Vec<u8>, Change> = BTreeMap::new();
            let mut quiet = false;
            for message in messages {
                let message = message.map_err(|e| format!("the watch of group {from} failed: {e}"))?;
                if message.canceled() {
                    return Err(format!("group {from} canceled the watch: {}", message.cancel_reason()));
                }
                quiet |= !message.created() && message.events().is_empty();
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    let put = match event.event_type() {
                        EventType::Put => Some((kv.value().to_vec(), kv.lease())),
                        EventType::Delete => None,
                    };
                    batch.insert(kv.key().to_vec(), put);
                    work.applied[part] = work.applied[part].max(kv.mod_revision());
                    work.migration.events_applied += 1;
                }
            }
            if !batch.is_empty() {
                self.apply(work, batch.into_iter().collect()).await?;
                self.record(&mut work.migration).await;
            }
            if work.applied[part] >= revision || quiet {
                // etcd 3.4 may answer a progress request before the events it covers, so what
                // is left is read: a short tail is the hand-off's to apply. (A count would not
                // do: etcd counts a range before its revision filters.)
                let since = work.applied[part] + 1;
                let (key, range_end) = work.parts[part].to_request();
                let options =
                    GetOptions::new().with_range(range_end).with_min_mod_revision(since).with_keys_only().with_limit(HANDOFF_TAIL + 1);
                let page = work.source.get(key, Some(options)).await.map_err(|e| format!("cannot read group {from}: {e}"))?;
                let left = page.kvs().len() as i64 + if page.more() { 1 } else { 0 };
                if left <= HANDOFF_TAIL {
                    return Ok(());
                }
                // Writes arriving as fast as they are applied: following longer gains nothing.
                if left < fewest - fewest / 10 {
                    (fewest, fell) = (left, tokio::time::Instant::now());
                } else if fell.elapsed() >= CATCH_UP_STALL {
                    tracing::info!(id = %work.migration.id, left, "the catch-up no longer gains on the writes; handing off");
                    return Ok(());
                }
                if quiet {
                    follow.sender.request_progress().await.map_err(progress)?;
                }
            }
        }
    }

    /// Brings part `part` on the new group to the old group's state at `revision`, after which
    /// the old group took no write of the scope: the keys written since the last applied event,
    /// then, when the key counts differ, the deletes.
    async fn finish_part(&self, work: &mut Work, part: usize, revision: i64) -> Result<(), String> {
        let from = work.migration.from.clone();
        let read = |e: etcd_client::Error| format!("cannot read the scope's keys on group {from} at revision {revision}: {e}");
        let range = work.parts[part].clone();
        let since = work.applied[part] + 1;
        let mut pages = Pages::of(&range);
        while let Some(page) =
            pages.next(&mut work.source, GetOptions::new().with_revision(revision).with_min_mod_revision(since)).await.map_err(read)?
        {
            let batch = page.kvs().iter().map(|kv| (kv.key().to_vec(), Some((kv.value().to_vec(), kv.lease())))).collect();
            self.apply(work, batch).await?;
            work.migration.events_applied += page.kvs().len() as u64;
        }
        work.applied[part] = revision;
        let old = count(&mut work.source, &range, revision).await.map_err(read)?;
        let copy = |e| format!("cannot read the copy on group {}: {e}", work.migration.to);
        let new = count(&mut work.target, &range, 0).await.map_err(copy)?;
        if old == new {
            return Ok(());
        }
        // Deletes the watch had not delivered: the keys the new group holds and the old one
        // did not at `revision`.
        let mut kept = std::collections::BTreeSet::new();
        let mut pages = Pages::of(&range);
        while let Some(page) = pages.next(&mut work.source, GetOptions::new().with_revision(revision).with_keys_only()).await.map_err(read)? {
            kept.extend(page.kvs().iter().map(|kv| kv.key().to_vec()));
        }
        let mut stale = Vec::new();
        let mut pages = Pages::of(&range);
        while let Some(page) = pages.next(&mut work.target, GetOptions::new().with_keys_only()).await.map_err(copy)? {
            stale.extend(page.kvs().iter().filter(|kv| !kept.contains(kv.key())).map(|kv| kv.key().to_vec()));
        }
        work.migration.events_applied += stale.len() as u64;
        self.apply(work, stale.into_iter().map(|key| (key, None)).collect()).await?;
        Ok(())
    }

    /// Puts ownership back as it was and deletes the partial copy.
    async fn roll_back(&self, work: &mut Work) -> Result<(), String> {
        work.from.reconcile(&work.before.group_ranges(&work.migration.from)).await?;
        work.to.reconcile(&work.before.group_ranges(&work.migration.to)).await?;
        for part in &work.parts {
            delete(&mut work.target, part).await.map_err(|e| format!("cannot delete the partial copy: {e}"))?;
        }
        Ok(())
    }
}

/// What a key becomes on the new group: a put of a value with a lease (0: none), or a delete.
type Change = Option<(Vec<u8>, i64)>;

/// A watch of the old group read as fast as it delivers: the catch-up applies what it holds
/// in batches, and a stream left unread would have its small frames buffered until the HTTP/2
/// client gives the whole connection up.
struct Follow {
    sender: etcd_client::WatchRequestSender,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<etcd_client::WatchResponse, etcd_client::Error>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Follow {
    fn start(stream: WatchStream) -> Self {
        let (sender, mut responses) = stream.split();
        let (queue, events) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let message = match responses.message().await {
                    Ok(Some(message)) => Ok(message),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                let failed = message.is_err();
                if queue.send(message).is_err() || failed {
                    break;
                }
            }
        });
        Follow { sender, events, reader }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Clears the migrator's running migration when its run ends, however it ends.
struct Running<'a>(&'a std::sync::Mutex<Option<String>>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        *self.0.lock().expect("migrator lock") = None;
    }
}

/// Reads a range page by page, in key order.
struct Pages {
    key: Vec<u8>,
    range_end: Vec<u8>,
    done: bool,
}

impl Pages {
    fn of(range: &KeyRange) -> Self {
        let (key, range_end) = range.to_request();
        Pages { key, range_end, done: false }
    }

    /// The next page read with `options` (its range and limit set here); `None` after the last.
    async fn next(&mut self, client: &mut Client, options: GetOptions) -> Result<Option<etcd_client::GetResponse>, etcd_client::Error> {
        if self.done {
            return Ok(None);
        }
        let page = client.get(self.key.clone(), Some(options.with_range(self.range_end.clone()).with_limit(PAGE))).await?;
        match page.kvs().last() {
            Some(last) if page.more() => self.key = [last.key(), &[0]].concat(),
            _ => self.done = true,
        }
        Ok(Some(page))
    }
}

/// How many keys `range` holds at `revision` (0: now).
async fn count(client: &mut Client, range: &KeyRange, revision: i64) -> Result<i64, etcd_client::Error> {
    let (key, range_end) = range.to_request();
    let mut options = GetOptions::new().with_range(range_end).with_count_only();
    if revision > 0 {
        options = options.with_revision(revision);
    }
    Ok(client.get(key, Some(options)).await?.count())
}

/// Takes `client`'s group `count` revisions forward, one write of a reserved key each, many at
/// a time.
async fn skip_revisions(client: &Client, count: i64) -> Result<(), etcd_client::Error> {
    const STREAMS: i64 = 32;
    let key = [crate::index::RESERVED_PREFIX, b"revision-skip"].concat();
    let mut tasks = tokio::task::JoinSet::new();
    for stream in 0..STREAMS {
        let share = count / STREAMS + i64::from(stream < count % STREAMS);
        let (mut client, key) = (client.clone(), key.clone());
        tasks.spawn(async move {
            for _ in 0..share {
                client.put(key.clone(), Vec::new(), None).await?;
            }
            Ok::<_, etcd_client::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a revision-skip task does not panic")?;
    }
    client.clone().delete(key, None).await?;
    Ok(())
}

/// A group's current revision.
async fn current_revision(client: &mut Client) -> Result<i64, etcd_client::Error> {
    Ok(client.status().await?.header().map(|h| h.revision()).unwrap_or_default())
}

/// Deletes every key of `range`.
async fn delete(client: &mut Client, range: &KeyRange) -> Result<(), etcd_client::Error> {
    let (key, range_end) = range.to_request();
    client.delete(key, Some(DeleteOptions::new().with_range(range_end))).await?;
    Ok(())
}
