//! Reading a scope's records from its group, and checkpoints and the root log in the meta group.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use etcd_client::proto as pb;

use super::log::{Checkpoint, Export, ExportedRecord, Frontier, ROOT_LOG};
use super::records_prefix;
use crate::backend::Group;
use crate::index::KeyRange;
use crate::meta::MetaStore;

/// Records read per range request.
const PAGE: i64 = 1000;

/// etcd's `RangeRequest.sort_target` `MOD` and `sort_order` `ASCEND`.
const SORT_MOD: i32 = 3;
const ASCEND: i32 = 1;

/// A scope's records in revision order, with the revision and version of each: every record
/// written at or before `revision` (0: now) and after `after`, read in pages, all at one
/// revision. Returns them and that revision.
async fn records_between(group: &Group, scope: &str, after: i64, revision: i64) -> Result<(Vec<ExportedRecord>, i64), String> {
    let prefix = records_prefix(scope);
    let (key, range_end) = KeyRange::prefix(&prefix).to_request();
    let mut at = revision;
    let mut after = after;
    let mut records = Vec::new();
    loop {
        let request = pb::PbRangeRequest {
            key: key.clone(),
            range_end: range_end.clone(),
            limit: PAGE,
            revision: at,
            sort_order: ASCEND,
            sort_target: SORT_MOD,
            min_mod_revision: after + 1,
            ..Default::default()
        };
        let response = group.range(request).await.map_err(|s| {
            format!("cannot read the lineage of scope {scope} from group {}: {}", group.name(), s.message())
        })?;
        if at == 0 {
            at = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
        }
        let more = response.more;
        for kv in response.kvs {
            after = kv.mod_revision;
            records.push(ExportedRecord {
                id: String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned(),
                revision: kv.mod_revision,
                version: kv.version,
                record: String::from_utf8_lossy(&kv.value).into_owned(),
            });
        }
        if !more {
            return Ok((records, at));
        }
    }
}

/// A scope's records, in revision order.
pub async fn records(group: &Group, scope: &str) -> Result<Vec<ExportedRecord>, String> {
    records_between(group, scope, 0, 0).await.map(|(records, _)| records)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// Signs this replica's checkpoints of the logs it serves. It keeps, per log, the tree's
/// [`Frontier`], the revision read through and the size it last checkpointed, so a pass gets
/// only the records written since the previous one, in revision order.
pub struct Checkpointer {
    key: SigningKey,
    meta: MetaStore,
    logs: tokio::sync::Mutex<HashMap<String, Progress>>,
}

/// How far this replica has read and checkpointed one log.
#[derive(Default)]
struct Progress {
    frontier: Frontier,
    /// Every record written at or before this revision is in the frontier.
    read_through: i64,
    /// The revision of the frontier's last leaf.
    last: i64,
    checkpointed: u64,
}

impl Checkpointer {
    /// Checkpoints signed with `key` and stored in `meta`.
    pub fn new(key: SigningKey, meta: MetaStore) -> Self {
        Checkpointer { key, meta, logs: tokio::sync::Mutex::default() }
    }

    /// Signs a checkpoint of the log of `scope` (its records on `group`) when it grew since its
    /// last checkpoint, and appends it to the root log. Returns the checkpoint stored, if any
    /// (none when nothing is new, or another replica stored one of the same size first).
    pub async fn checkpoint(&self, group: &Group, scope: &str) -> Result<Option<Checkpoint>, String> {
        let mut logs = self.logs.lock().await;
        // At a log's first pass this replica has checkpointed nothing; if a checkpoint of the
        // same size is stored already, storing this one is refused and nothing changes.
        let progress = logs.entry(scope.to_string()).or_default();
        // Only what was written since the last pass is returned (etcd still walks the whole
        // prefix to filter by revision).
        let (added, read_at) = records_between(group, scope, progress.read_through, 0).await?;
        for record in added {
            if record.version != 1 {
                return Err(format!(
                    "the lineage record {} of scope {scope} was written {} times (last at revision {}); nothing past it is \
                     checkpointed: `aq lineage export {scope}` and `aq lineage verify` name what changed",
                    record.id, record.version, record.revision
                ));
            }
            progress.frontier.push(record.record.as_bytes());
            progress.last = record.revision;
            progress.read_through = record.revision;
        }
        progress.read_through = read_at;
        let size = progress.frontier.size();
        if size <= progress.checkpointed {
            return Ok(None);
        }
        let checkpoint = Checkpoint::sign_root(&self.key, scope, size, progress.last, progress.frontier.root_hex(), now_ms());
        let stored = self.meta.put_checkpoint(&checkpoint).await.map_err(|e| e.to_string())?;
        progress.checkpointed = size;
        Ok(stored.then_some(checkpoint))
    }

    /// An export of a scope's lineage: a fresh checkpoint first (when the log allows one), then
    /// records, the scope's checkpoints, the root log and a signed checkpoint of the root log.
    pub async fn export(&self, group: &Group, scope: &str) -> Result<Export, String> {
        // A log with a gap is exported all the same: its verification names the gap.
        if let Err(e) = self.checkpoint(group, scope).await {
            tracing::warn!(scope, "exporting lineage without a fresh checkpoint: {e}");
        }
        let records = records(group, scope).await?;
        let checkpoints = self.meta.checkpoints(scope).await.map_err(|e| e.to_string())?;
        let root_log = self.meta.root_log().await.map_err(|e| e.to_string())?;
        let leaves: Vec<Vec<u8>> = root_log.iter().map(|c| serde_json::to_vec(c).expect("JSON")).collect();
        let root_checkpoint = Checkpoint::sign(&self.key, ROOT_LOG, &leaves, now_ms());
        Ok(Export { v: 1, scope: scope.to_string(), records, checkpoints, root_log, root_checkpoint })
    }
}
