//! aq's own state in the meta (home) group, under the reserved prefix `\xffaq/meta/`:
//! stored policy components and each scope's binding. Every replica reads and watches these
//! keys; they are the only state replicas share.
//!
//! | key                                   | value                                      |
//! |---------------------------------------|--------------------------------------------|
//! | `\xffaq/meta/policy/<digest>`         | [`PolicyRecord`] (JSON), written last       |
//! | `\xffaq/meta/chunk/<digest>/<n:05>`   | bytes `n·CHUNK..` of the component          |
//! | `\xffaq/meta/binding/<scope>`         | [`BindingRecord`] (JSON)                    |
//! | `\xffaq/meta/principal/<id>`          | [`crate::trust::Principal`] (JSON)          |
//! | `\xffaq/meta/proposal/<id>`           | [`crate::trust::proposal::Proposal`] (JSON) |
//! | `\xffaq/meta/layout`                  | [`layout::LayoutRecord`] (JSON)              |
//! | `\xffaq/meta/auth`                    | [`crate::auth::AuthRecord`] (JSON)          |
//! | `\xffaq/meta/load/<scope>/<replica>`  | [`crate::adapt::stats::Window`] (JSON)      |
//! | `\xffaq/meta/migration/<id>`          | [`crate::adapt::migrate::Migration`] (JSON) |
//! | `\xffaq/meta/migration-active`        | the id of the migration under way           |
//! | `\xffaq/meta/routed/<replica>`        | the layout epoch it routes by, under a lease |
//!
//! A policy counts as stored once its record exists: chunks are written first, so a reader
//! never sees a record without all of its bytes. etcd refuses requests over 1.5 MiB by
//! default, hence the chunks.

pub mod layout;
pub mod sync;


use etcd_client::proto as pb;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::backend::Group;
use crate::clock::unix_now;
use crate::engine::{FailMode, Limits, PolicyDigest};
use crate::backend::compare::{RESULT_EQUAL, RESULT_GREATER, TARGET_MOD, TARGET_VALUE, TARGET_VERSION};
use crate::index::{KeyRange, RESERVED_PREFIX};
use crate::trust::proposal::Proposal;

/// Bytes per stored chunk; well under etcd's default request limit of 1.5 MiB.
pub const CHUNK_BYTES: usize = 1 << 20;

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"meta/");
    for part in parts {
        key.extend_from_slice(part);
    }
    key
}

/// The key of a policy's record.
pub fn policy_key(digest: &str) -> Vec<u8> {
    key(&[b"policy/", digest.as_bytes()])
}

/// The prefix of every policy record.
pub fn policy_prefix() -> Vec<u8> {
    key(&[b"policy/"])
}

fn chunk_prefix(digest: &str) -> Vec<u8> {
    key(&[b"chunk/", digest.as_bytes(), b"/"])
}

fn chunk_key(digest: &str, n: usize) -> Vec<u8> {
    key(&[b"chunk/", digest.as_bytes(), format!("/{n:05}").as_bytes()])
}

/// The key of a principal's record.
pub fn principal_key(id: &str) -> Vec<u8> {
    key(&[b"principal/", id.as_bytes()])
}

/// The prefix of every principal.
pub fn principal_prefix() -> Vec<u8> {
    key(&[b"principal/"])
}

/// The key of a replica's anchor record (where peers reach it).
pub fn anchor_key(id: &str) -> Vec<u8> {
    key(&[b"anchor/", id.as_bytes()])
}

/// The key of a proposal.
pub fn proposal_key(id: &str) -> Vec<u8> {
    key(&[b"proposal/", id.as_bytes()])
}

/// The key of a scope's binding.
pub fn binding_key(scope: &str) -> Vec<u8> {
    key(&[b"binding/", scope.as_bytes()])
}

/// The prefix of every binding.
pub fn binding_prefix() -> Vec<u8> {
    key(&[b"binding/"])
}

/// Where `replica` publishes its latest window of `scope`'s load.
pub fn load_key(scope: &str, replica: &str) -> Vec<u8> {
    key(&[b"load/", scope.as_bytes(), b"/", replica.as_bytes()])
}

/// The record of migration `id`.
pub fn migration_key(id: &str) -> Vec<u8> {
    key(&[b"migration/", id.as_bytes()])
}

/// The record of group `name`, a managed etcd aq started at run time for a split.
pub fn started_group_key(name: &str) -> Vec<u8> {
    key(&[b"started-group/", name.as_bytes()])
}

/// A managed etcd group aq started at run time: started again with aq, under its data
/// directory, until a merge leaves it without scopes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StartedGroup {
    /// The group's name.
    pub name: String,
    /// The replica that started it, whose data directory holds it.
    pub replica: String,
    /// Unix milliseconds it was started.
    pub started_ms: u64,
}

/// Holds the id of the migration under way, so that one runs at a time across replicas.
pub fn migration_lock_key() -> Vec<u8> {
    key(&[b"migration-active"])
}

/// Where `replica` says which layout epoch it routes by, under a lease it keeps alive: a
/// migration deletes a moved scope's old copy only once every live replica routes by the
/// epoch that moved it, so no replica's watch can still be reading the old copy.
pub fn routed_key(replica: &str) -> Vec<u8> {
    key(&[b"routed/", replica.as_bytes()])
}

/// The key of the scope layout, which every replica routes by.
pub fn layout_key() -> Vec<u8> {
    key(&[b"layout"])
}

/// The key of aq's etcd users and roles ([`crate::auth::AuthRecord`]).
pub fn auth_key() -> Vec<u8> {
    key(&[b"auth"])
}

/// A stored policy component.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyRecord {
    /// blake3 of the component, hex.
    pub digest: String,
    /// Component size in bytes.
    pub size: u64,
    /// The component's exports.
    pub exports: Vec<String>,
    /// How many chunks hold the bytes.
    pub chunks: u32,
    /// When it was stored (Unix seconds).
    pub stored_at: u64,
    /// The trusted publisher key (hex) whose signature was checked, if any.
    #[serde(default)]
    pub publisher: Option<String>,
}

/// Evaluation limits as stored and as the admin API takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// CPU deadline per evaluation, milliseconds.
    pub timeout_ms: u64,
    /// Memory cap per evaluation, MiB.
    pub memory_mib: u64,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec::from(Limits::default())
    }
}

impl From<Limits> for LimitsSpec {
    fn from(limits: Limits) -> Self {
        LimitsSpec { timeout_ms: limits.timeout.as_millis() as u64, memory_mib: (limits.memory_bytes >> 20) as u64 }
    }
}

impl LimitsSpec {
    /// The engine's limits.
    pub fn to_limits(self) -> Limits {
        Limits {
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            memory_bytes: (self.memory_mib as usize) << 20,
            ..Limits::default()
        }
    }
}

/// One binding of a policy to a scope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BindingSpec {
    /// The policy digest (hex).
    pub digest: String,
    /// The configuration passed to `init`.
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// What happens when the policy fails.
    pub fail_mode: FailMode,
    /// Limits of each evaluation.
    pub limits: LimitsSpec,
}

impl BindingSpec {
    /// The configuration as the JSON text `init` receives.
    pub fn config_text(&self) -> String {
        serde_json::to_string(&self.config).expect("JSON values serialise")
    }
}

/// Who last set a binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingSource {
    /// The configuration file at start.
    Config,
    /// The admin API; kept across restarts even if the configuration file says otherwise.
    Api,
}

/// A scope's binding as stored: the active one and the last-known-good.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingRecord {
    /// The binding in force.
    pub active: BindingSpec,
    /// The binding before the latest change; rollback returns to it.
    pub previous: Option<BindingSpec>,
    /// Who set it.
    pub source: BindingSource,
    /// Changes so far (1 for the first binding).
    pub generation: u64,
    /// When it last changed (Unix seconds).
    pub changed_at: u64,
}

impl BindingRecord {
    /// The record after making `spec` active; the current active binding becomes previous.
    pub fn swapped(&self, spec: BindingSpec, source: BindingSource) -> BindingRecord {
        BindingRecord {
            active: spec,
            previous: Some(self.active.clone()),
            source,
            generation: self.generation + 1,
            changed_at: unix_now(),
        }
    }
}

/// Failures of the meta store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// etcd refused or did not answer.
    #[error("the meta group did not complete the request: {}", .0.message())]
    Backend(Status),
    /// No such policy.
    #[error("no stored policy with digest {0}; push it first (POST /v1/policies)")]
    UnknownPolicy(String),
    /// A policy still bound somewhere.
    #[error("policy {digest} is bound to scope(s) {} (active or last-known-good); bind another policy first", .scopes.join(", "))]
    Bound {
        /// The policy.
        digest: String,
        /// Where it is bound.
        scopes: Vec<String>,
    },
    /// The binding changed while this change was being made.
    #[error("the binding of scope {0} changed concurrently; read it again and retry")]
    Conflict(String),
    /// The layout changed while this change was being made.
    #[error("the scope layout changed concurrently (it is now at epoch {0}); read it again and retry")]
    LayoutConflict(u64),
    /// A replica's anchor name is held by another key.
    #[error("cannot register anchor {0}")]
    AnchorTaken(String),
    /// Stored data that does not parse or does not match its digest.
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

impl From<Status> for MetaError {
    fn from(status: Status) -> Self {
        MetaError::Backend(status)
    }
}

fn compare_version(key: Vec<u8>, version: i64, result: i32) -> pb::PbCompare {
    pb::PbCompare {
        result,
        target: TARGET_VERSION,
        key,
        range_end: Vec::new(),
        target_union: Some(pb::PbTargetUnion::Version(version)),
    }
}

/// `mod_revision(key) == revision`, or the key is absent when `revision` is 0.
pub(crate) fn compare_unchanged(key: Vec<u8>, revision: i64) -> pb::PbCompare {
    if revision == 0 {
        return compare_version(key, 0, RESULT_EQUAL);
    }
    pb::PbCompare {
        result: RESULT_EQUAL,
        target: TARGET_MOD,
        key,
        range_end: Vec::new(),
        target_union: Some(pb::PbTargetUnion::ModRevision(revision)),
    }
}

fn put_op(key: Vec<u8>, value: Vec<u8>) -> pb::PbTxnRequestOp {
    pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest { key, value, ..Default::default() })) }
}

fn parse<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(value)
        .map_err(|e| MetaError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(key).escape_default())))
}

/// Reads and writes aq's records in the meta group.
#[derive(Clone, Debug)]
pub struct MetaStore {
    group: Group,
}

impl MetaStore {
    /// The store on `group` (the home group).
    pub fn new(group: Group) -> Self {
        MetaStore { group }
    }

    /// The group holding the records.
    pub fn group(&self) -> &Group {
        &self.group
    }

    async fn range(&self, range: KeyRange) -> Result<pb::PbRangeResponse, MetaError> {
        let (key, range_end) = range.to_request();
        Ok(self.group.range(pb::PbRangeRequest { key, range_end, ..Default::default() }).await?)
    }

    async fn get(&self, key: Vec<u8>) -> Result<Option<pb::PbKeyValue>, MetaError> {
        let response = self.group.range(pb::PbRangeRequest { key, ..Default::default() }).await?;
        Ok(response.kvs.into_iter().next())
    }

    /// A stored policy's record.
    pub async fn policy(&self, digest: &str) -> Result<Option<PolicyRecord>, MetaError> {
        match self.get(policy_key(digest)).await? {
            Some(kv) => Ok(Some(parse(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Every stored policy, by digest.
    pub async fn policies(&self) -> Result<Vec<PolicyRecord>, MetaError> {
        let response = self.range(KeyRange::prefix(&policy_prefix())).await?;
        response.kvs.iter().map(|kv| parse(&kv.key, &kv.value)).collect()
    }

    /// Stores a validated component under its digest. Returns false when it was already stored
    /// (the stored record is kept). On failure nothing stays behind.
    pub async fn store_policy(&self, bytes: &[u8], record: &PolicyRecord) -> Result<bool, MetaError> {
        if self.policy(&record.digest).await?.is_some() {
            return Ok(false);
        }
        let written = async {
            for (n, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
                self.group
                    .put(pb::PbPutRequest { key: chunk_key(&record.digest, n), value: chunk.to_vec(), ..Default::default() })
                    .await?;
            }
            // The record last, and only if no concurrent upload of the same digest beat us.
            let value = serde_json::to_vec(record).expect("JSON");
            let response = self
                .group
                .txn(pb::PbTxnRequest {
                    compare: vec![compare_version(policy_key(&record.digest), 0, RESULT_EQUAL)],
                    success: vec![put_op(policy_key(&record.digest), value)],
                    failure: Vec::new(),
                })
                .await?;
            Ok::<bool, MetaError>(response.succeeded)
        }
        .await;
        match written {
            Ok(created) => Ok(created),
            Err(e) => {
                // Leave no orphan chunks; a concurrent upload of the same bytes rewrites them.
                let (key, range_end) = KeyRange::prefix(&chunk_prefix(&record.digest)).to_request();
                let _ = self.group.delete_range(pb::PbDeleteRequest { key, range_end, prev_kv: false }).await;
                Err(e)
            }
        }
    }

    /// A stored component's bytes, checked against its digest.
    pub async fn policy_bytes(&self, digest: &str) -> Result<Vec<u8>, MetaError> {
        let record = self.policy(digest).await?.ok_or_else(|| MetaError::UnknownPolicy(digest.to_string()))?;
        let response = self.range(KeyRange::prefix(&chunk_prefix(digest))).await?;
        if response.kvs.len() != record.chunks as usize {
            return Err(MetaError::Corrupt(format!(
                "policy {digest} has {} of its {} chunks",
                response.kvs.len(),
                record.chunks
            )));
        }
        let mut bytes = Vec::with_capacity(record.size as usize);
        for kv in response.kvs {
            bytes.extend_from_slice(&kv.value);
        }
        let actual = PolicyDigest::of(&bytes).to_hex();
        if actual != digest {
            return Err(MetaError::Corrupt(format!("policy {digest}: the stored bytes hash to {actual}")));
        }
        Ok(bytes)
    }

    /// Deletes a stored policy that no scope has bound (as active or last-known-good).
    pub async fn delete_policy(&self, digest: &str) -> Result<PolicyRecord, MetaError> {
        let record = self.policy(digest).await?.ok_or_else(|| MetaError::UnknownPolicy(digest.to_string()))?;
        let (bindings, _) = self.bindings().await?;
        let bound: Vec<String> = bindings
            .iter()
            .filter(|(_, b, _)| b.active.digest == digest || b.previous.as_ref().is_some_and(|p| p.digest == digest))
            .map(|(scope, _, _)| scope.clone())
            .collect();
        if !bound.is_empty() {
            return Err(MetaError::Bound { digest: digest.to_string(), scopes: bound });
        }
        // Guarded by every binding as read, so a bind racing with the delete loses one of them.
        let mut compare: Vec<pb::PbCompare> =
            bindings.iter().map(|(scope, _, rev)| compare_unchanged(binding_key(scope), *rev)).collect();
        compare.push(compare_version(policy_key(digest), 0, RESULT_GREATER));
        let (key, range_end) = KeyRange::prefix(&chunk_prefix(digest)).to_request();
        let delete = |key, range_end| pb::PbTxnRequestOp {
            request: Some(pb::PbTxnOpRequest::RequestDeleteRange(pb::PbDeleteRequest { key, range_end, prev_kv: false })),
        };
        let response = self
            .group
            .txn(pb::PbTxnRequest {
                compare,
                success: vec![delete(policy_key(digest), Vec::new()), delete(key, range_end)],
                failure: Vec::new(),
            })
            .await?;
        if !response.succeeded {
            return Err(MetaError::Conflict(format!("(any, while deleting policy {digest})")));
        }
        Ok(record)
    }

    /// Every principal.
    pub async fn principals(&self) -> Result<Vec<crate::trust::Principal>, MetaError> {
        let response = self.range(KeyRange::prefix(&principal_prefix())).await?;
        response.kvs.iter().map(|kv| parse(&kv.key, &kv.value)).collect()
    }

    /// Adds or replaces a principal; true when it is new.
    pub async fn put_principal(&self, principal: &crate::trust::Principal) -> Result<bool, MetaError> {
        let value = serde_json::to_vec(principal).expect("JSON");
        let response = self
            .group
            .put(pb::PbPutRequest { key: principal_key(&principal.id), value, prev_kv: true, ..Default::default() })
            .await?;
        Ok(response.prev_kv.is_none())
    }

    /// Removes a principal; false when there was none.
    pub async fn delete_principal(&self, id: &str) -> Result<bool, MetaError> {
        let response =
            self.group.delete_range(pb::PbDeleteRequest { key: principal_key(id), range_end: Vec::new(), prev_kv: false }).await?;
        Ok(response.deleted > 0)
    }

    /// Registers a replica as an anchor: its principal (created when missing) and where peers
    /// reach it. Refused when the principal exists with other keys: two replicas must not
    /// share a name.
    pub async fn register_anchor(
        &self,
        principal: &crate::trust::Principal,
        record: &crate::trust::anchor::AnchorRecord,
    ) -> Result<(), MetaError> {
        let key = principal_key(&principal.id);
        let existing = self.get(key.clone()).await?;
        if let Some(kv) = &existing {
            let stored: crate::trust::Principal = parse(&kv.key, &kv.value)?;
            if stored.keys != principal.keys {
                return Err(MetaError::AnchorTaken(format!(
                    "{}: the principal is registered with key(s) {}, not this replica's {}; give this replica another --name, \
                     or remove the principal with `aq principals rm {}`",
                    principal.id,
                    stored.keys.join(", "),
                    principal.keys.join(", "),
                    principal.id
                )));
            }
        }
        // Create-only unless the same principal is there: a racing replica of the same name
        // cannot overwrite it.
        let revision = existing.map(|kv| kv.mod_revision).unwrap_or(0);
        let response = self
            .group
            .txn(pb::PbTxnRequest {
                compare: vec![compare_unchanged(key.clone(), revision)],
                success: vec![
                    put_op(key, serde_json::to_vec(principal).expect("JSON")),
                    put_op(anchor_key(&record.id), serde_json::to_vec(record).expect("JSON")),
                ],
                failure: Vec::new(),
            })
            .await?;
        if !response.succeeded {
            return Err(MetaError::AnchorTaken(format!("{}: registered concurrently by another replica; retry", principal.id)));
        }
        Ok(())
    }

    /// Where anchor `id` is reached, if it registered.
    pub async fn anchor(&self, id: &str) -> Result<Option<crate::trust::anchor::AnchorRecord>, MetaError> {
        match self.get(anchor_key(id)).await? {
            Some(kv) => Ok(Some(parse(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// A scope's lineage checkpoints, smallest first.
    pub async fn checkpoints(&self, scope: &str) -> Result<Vec<crate::lineage::log::Checkpoint>, MetaError> {
        let prefix = key(&[b"checkpoint/", scope.as_bytes(), b"/"]);
        let response = self.range(KeyRange::prefix(&prefix)).await?;
        response.kvs.iter().map(|kv| parse(&kv.key, &kv.value)).collect()
    }

    /// The root log: every checkpoint of every scope, in the order appended.
    pub async fn root_log(&self) -> Result<Vec<crate::lineage::log::Checkpoint>, MetaError> {
        let response = self.range(KeyRange::prefix(&key(&[b"rootlog/"]))).await?;
        response.kvs.iter().map(|kv| parse(&kv.key, &kv.value)).collect()
    }

    /// Stores a checkpoint and appends it to the root log, in one Txn; a checkpoint of the same
    /// scope and size already stored (by another replica) wins.
    pub async fn put_checkpoint(&self, checkpoint: &crate::lineage::log::Checkpoint) -> Result<bool, MetaError> {
        let value = serde_json::to_vec(checkpoint).expect("JSON");
        let at = key(&[b"checkpoint/", checkpoint.scope.as_bytes(), format!("/{:020}", checkpoint.size).as_bytes()]);
        let entry = key(&[
            b"rootlog/",
            format!("{:020}-{}-{:020}", checkpoint.time_ms, checkpoint.scope, checkpoint.size).as_bytes(),
        ]);
        let response = self
            .group
            .txn(pb::PbTxnRequest {
                compare: vec![compare_version(at.clone(), 0, RESULT_EQUAL)],
                success: vec![put_op(at, value.clone()), put_op(entry, value)],
                failure: Vec::new(),
            })
            .await?;
        Ok(response.succeeded)
    }

    /// A proposal and its mod revision.
    pub async fn proposal(&self, id: &str) -> Result<Option<(Proposal, i64)>, MetaError> {
        match self.get(proposal_key(id)).await? {
            Some(kv) => Ok(Some((parse(&kv.key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every proposal with its mod revision, oldest id first.
    pub async fn proposals(&self) -> Result<Vec<(Proposal, i64)>, MetaError> {
        let response = self.range(KeyRange::prefix(&key(&[b"proposal/"]))).await?;
        response.kvs.iter().map(|kv| Ok((parse(&kv.key, &kv.value)?, kv.mod_revision))).collect()
    }

    /// Writes a proposal if it is still at `expected` (0: new); returns the write's revision.
    pub async fn write_proposal(&self, proposal: &Proposal, expected: i64) -> Result<i64, MetaError> {
        let value = serde_json::to_vec(proposal).expect("JSON");
        let response = self
            .group
            .txn(pb::PbTxnRequest {
                compare: vec![compare_unchanged(proposal_key(&proposal.id), expected)],
                success: vec![put_op(proposal_key(&proposal.id), value)],
                failure: Vec::new(),
            })
            .await?;
        if !response.succeeded {
            return Err(MetaError::Conflict(format!("(proposal {})", proposal.id)));
        }
        Ok(response.header.map(|h| h.revision).unwrap_or_default())
    }

    /// A scope's binding and its mod revision.
    pub async fn binding(&self, scope: &str) -> Result<Option<(BindingRecord, i64)>, MetaError> {
        match self.get(binding_key(scope)).await? {
            Some(kv) => Ok(Some((parse(&kv.key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Every binding (scope, record, mod revision) and the revision they were read at.
    pub async fn bindings(&self) -> Result<(Vec<(String, BindingRecord, i64)>, i64), MetaError> {
        let prefix = binding_prefix();
        let response = self.range(KeyRange::prefix(&prefix)).await?;
        let revision = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
        let mut out = Vec::with_capacity(response.kvs.len());
        for kv in &response.kvs {
            let scope = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
            out.push((scope, parse(&kv.key, &kv.value)?, kv.mod_revision));
        }
        Ok((out, revision))
    }

    /// Writes a scope's binding if it is still at `expected` (its mod revision; 0: absent) and
    /// its policy is stored. Returns the revision of the write.
    pub async fn write_binding(&self, scope: &str, record: &BindingRecord, expected: i64) -> Result<i64, MetaError> {
        use crate::lineage::{Record, RecordKind};
        let digest = &record.active.digest;
        let value = serde_json::to_vec(record).expect("JSON");
        // The swap's lineage record goes into the meta log in the same Txn.
        let lineage = Record {
            policy: digest.clone(),
            subject: Some(scope.to_string()),
            binding: Some(serde_json::to_string(&record.active).expect("JSON")),
            ..Record::in_meta_log(RecordKind::PolicySwap)
        };
        let response = self
            .group
            .txn(pb::PbTxnRequest {
                compare: vec![
                    compare_unchanged(binding_key(scope), expected),
                    compare_version(policy_key(digest), 0, RESULT_GREATER),
                ],
                success: vec![put_op(binding_key(scope), value), put_op(lineage.key(), lineage.encode())],
                failure: Vec::new(),
            })
            .await?;
        if response.succeeded {
            return Ok(response.header.map(|h| h.revision).unwrap_or_default());
        }
        if self.policy(digest).await?.is_none() {
            return Err(MetaError::UnknownPolicy(digest.clone()));
        }
        Err(MetaError::Conflict(scope.to_string()))
    }

    /// The stored layout and its mod revision.
    pub async fn layout(&self) -> Result<Option<(layout::LayoutRecord, i64)>, MetaError> {
        match self.get(layout_key()).await? {
            Some(kv) => Ok(Some((parse(&kv.key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Puts `value` at `key` if the key is still at `expected` (its mod revision; 0: absent),
    /// and with it the operations `also`, in one Txn. Returns the revision of the write, or
    /// `None` when the key moved.
    async fn put_unchanged(&self, key: Vec<u8>, value: Vec<u8>, expected: i64, also: Vec<pb::PbTxnRequestOp>) -> Result<Option<i64>, MetaError> {
        let mut success = vec![put_op(key.clone(), value)];
        success.extend(also);
        let response = self
            .group
            .txn(pb::PbTxnRequest { compare: vec![compare_unchanged(key, expected)], success, failure: Vec::new() })
            .await?;
        Ok(response.succeeded.then(|| response.header.map(|h| h.revision).unwrap_or_default()))
    }

    /// Writes the layout if it is still at `expected` (its mod revision; 0: absent), with its
    /// lineage record in the meta log in the same Txn, so every split, merge and move is in the
    /// log the root checkpoint covers. Returns the revision of the write;
    /// [`MetaError::LayoutConflict`] names the epoch that won.
    pub async fn write_layout(&self, record: &layout::LayoutRecord, expected: i64) -> Result<i64, MetaError> {
        use crate::lineage::{LayoutChange, Record, RecordKind};
        let value = serde_json::to_vec_pretty(record).expect("JSON");
        let change = LayoutChange {
            epoch: record.epoch,
            reason: record.reason.clone(),
            scopes: record.scopes.iter().map(|s| format!("{}@{}", s.id, s.group)).collect(),
        };
        let lineage = Record { layout: Some(change), ..Record::in_meta_log(RecordKind::LayoutChange) };
        let also = vec![put_op(lineage.key(), lineage.encode())];
        if let Some(revision) = self.put_unchanged(layout_key(), value, expected, also).await? {
            return Ok(revision);
        }
        let epoch = self.layout().await?.map(|(stored, _)| stored.epoch).unwrap_or_default();
        Err(MetaError::LayoutConflict(epoch))
    }

    /// aq's users and roles and the record's mod revision.
    pub async fn auth(&self) -> Result<Option<(crate::auth::AuthRecord, i64)>, MetaError> {
        match self.get(auth_key()).await? {
            Some(kv) => Ok(Some((parse(&kv.key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Writes the users and roles if the record is still at `expected` (its mod revision; 0:
    /// absent). Returns the revision of the write; [`MetaError::Conflict`] when it moved.
    pub async fn write_auth(&self, record: &crate::auth::AuthRecord, expected: i64) -> Result<i64, MetaError> {
        let value = serde_json::to_vec(record).expect("JSON");
        self.put_unchanged(auth_key(), value, expected, Vec::new()).await?.ok_or_else(|| MetaError::Conflict("the users and roles".into()))
    }

    /// Takes the migration lock for `id`; false when another migration holds it.
    pub async fn claim_migration(&self, id: &str) -> Result<bool, MetaError> {
        let response = self
            .group
            .txn(pb::PbTxnRequest {
                compare: vec![compare_version(migration_lock_key(), 0, RESULT_EQUAL)],
                success: vec![put_op(migration_lock_key(), id.as_bytes().to_vec())],
                failure: Vec::new(),
            })
            .await?;
        Ok(response.succeeded)
    }

    /// The id of the migration holding the lock, if any.
    pub async fn active_migration(&self) -> Result<Option<String>, MetaError> {
        Ok(self.get(migration_lock_key()).await?.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Gives the migration lock up, if `id` holds it.
    pub async fn release_migration(&self, id: &str) -> Result<(), MetaError> {
        self.group
            .txn(pb::PbTxnRequest {
                compare: vec![pb::PbCompare {
                    result: RESULT_EQUAL,
                    target: TARGET_VALUE,
                    key: migration_lock_key(),
                    range_end: Vec::new(),
                    target_union: Some(pb::PbTargetUnion::Value(id.as_bytes().to_vec())),
                }],
                success: vec![pb::PbTxnRequestOp {
                    request: Some(pb::PbTxnOpRequest::RequestDeleteRange(pb::PbDeleteRequest {
                        key: migration_lock_key(),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            })
            .await?;
        Ok(())
    }

    /// Writes a migration's record as it stands.
    pub async fn put_migration(&self, migration: &crate::adapt::migrate::Migration) -> Result<(), MetaError> {
        let value = serde_json::to_vec(migration).expect("JSON");
        self.group.put(pb::PbPutRequest { key: migration_key(&migration.id), value, ..Default::default() }).await?;
        Ok(())
    }

    /// Records a group started at run time.
    pub async fn put_started_group(&self, group: &StartedGroup) -> Result<(), MetaError> {
        let value = serde_json::to_vec(group).expect("JSON");
        self.group.put(pb::PbPutRequest { key: started_group_key(&group.name), value, ..Default::default() }).await?;
        Ok(())
    }

    /// Every group started at run time, by name.
    pub async fn started_groups(&self) -> Result<Vec<StartedGroup>, MetaError> {
        let response = self.range(KeyRange::prefix(&started_group_key(""))).await?;
        response.kvs.iter().map(|kv| parse(&kv.key, &kv.value)).collect()
    }

    /// Forgets a group started at run time, once it is stopped.
    pub async fn delete_started_group(&self, name: &str) -> Result<(), MetaError> {
        self.group.delete_range(pb::PbDeleteRequest { key: started_group_key(name), ..Default::default() }).await?;
        Ok(())
    }

    /// One migration's record.
    pub async fn migration(&self, id: &str) -> Result<Option<crate::adapt::migrate::Migration>, MetaError> {
        match self.get(migration_key(id)).await? {
            Some(kv) => Ok(Some(parse(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Every migration's record, oldest first.
    pub async fn migrations(&self) -> Result<Vec<crate::adapt::migrate::Migration>, MetaError> {
        let response = self.range(KeyRange::prefix(&migration_key(""))).await?;
        let mut all: Vec<crate::adapt::migrate::Migration> =
            response.kvs.iter().map(|kv| parse(&kv.key, &kv.value)).collect::<Result<_, _>>()?;
        all.sort_by(|a, b| a.started_ms.cmp(&b.started_ms).then_with(|| a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Publishes `replica`'s latest window of `scope`'s load, replacing its previous one.
    pub async fn put_load(&self, scope: &str, window: &crate::adapt::stats::Window) -> Result<(), MetaError> {
        let value = serde_json::to_vec(window).expect("JSON");
        self.group.put(pb::PbPutRequest { key: load_key(scope, &window.replica), value, ..Default::default() }).await?;
        Ok(())
    }

    /// Every replica's latest window of `scope`'s load that ended at or after `since_ms`
    /// (Unix milliseconds): older ones are of replicas gone quiet or gone.
    pub async fn loads(&self, scope: &str, since_ms: u64) -> Result<Vec<crate::adapt::stats::Window>, MetaError> {
        let response = self.range(KeyRange::prefix(&load_key(scope, ""))).await?;
        let mut windows = Vec::with_capacity(response.kvs.len());
        for kv in &response.kvs {
            let window: crate::adapt::stats::Window = parse(&kv.key, &kv.value)?;
            if window.at_ms >= since_ms {
                windows.push(window);
            }
        }
        Ok(windows)
    }

    /// Says that `replica` routes by layout `epoch`, under `lease`.
    pub async fn put_routed(&self, replica: &str, epoch: u64, lease: i64) -> Result<(), MetaError> {
        let value = epoch.to_string().into_bytes();
        self.group.put(pb::PbPutRequest { key: routed_key(replica), value, lease, ..Default::default() }).await?;
        Ok(())
    }

    /// The layout epoch each live replica routes by.
    pub async fn routed(&self) -> Result<Vec<(String, u64)>, MetaError> {
        let prefix = routed_key("");
        let response = self.range(KeyRange::prefix(&prefix)).await?;
        Ok(response
            .kvs
            .iter()
            .map(|kv| {
                let replica = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                (replica, String::from_utf8_lossy(&kv.value).parse().unwrap_or(0))
            })
            .collect())
    }
}
