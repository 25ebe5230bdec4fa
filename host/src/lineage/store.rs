//! Reading a scope's records from its group, and checkpoints and the root log in the meta group.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use etcd_client::proto as pb;

use super::log::{Checkpoint, Export, ExportedRecord, Frontier, ROOT_LOG};
use super::{record_key, records_prefix};
use crate::backend::Group;
use crate::index::KeyRange;
use crate::meta::MetaStore;

/// Records read per range request.
const PAGE: i64 = 1000;

/// A scope's records, in `seq` order, with the revision that last wrote each. Read in pages,
/// all at the revision of the first page.
pub async fn records(group: &Group, scope: &str) -> Result<Vec<ExportedRecord>, String> {
    let mut pages = Pages::new(group, scope, 0);
    let mut records = Vec::new();
    while let Some(page) = pages.next().await? {
        records.extend(page);
    }
    Ok(records)
}

/// A scope's records from one `seq` on, a page at a time, all at the revision of the first.
struct Pages<'a> {
    group: &'a Group,
    scope: &'a str,
    /// Where the scope's record keys start (the `seq` follows) and end.
    prefix: usize,
    range_end: Vec<u8>,
    key: Vec<u8>,
    revision: i64,
    done: bool,
}

impl<'a> Pages<'a> {
    fn new(group: &'a Group, scope: &'a str, seq: u64) -> Self {
        let prefix = records_prefix(scope);
        let (_, range_end) = KeyRange::prefix(&prefix).to_request();
        Pages { group, scope, prefix: prefix.len(), range_end, key: record_key(scope, seq), revision: 0, done: false }
    }

    async fn next(&mut self) -> Result<Option<Vec<ExportedRecord>>, String> {
        if self.done {
            return Ok(None);
        }
        let request = pb::PbRangeRequest {
            key: self.key.clone(),
            range_end: self.range_end.clone(),
            limit: PAGE,
            revision: self.revision,
            ..Default::default()
        };
        let response = self.group.range(request).await.map_err(|s| {
            format!("cannot read the lineage of scope {} from group {}: {}", self.scope, self.group.name(), s.message())
        })?;
        self.revision = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
        self.done = !response.more;
        let Some(last) = response.kvs.last() else {
            self.done = true;
            return Ok(None);
        };
        self.key = crate::index::successor(&last.key);
        let prefix = self.prefix;
        Ok(Some(
            response
                .kvs
                .into_iter()
                .map(|kv| ExportedRecord {
                    seq: std::str::from_utf8(&kv.key[prefix..]).ok().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX),
                    revision: kv.mod_revision,
                    record: String::from_utf8_lossy(&kv.value).into_owned(),
                })
                .collect(),
        ))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// Signs this replica's checkpoints of the logs it serves. It keeps, per log, the tree's
/// [`Frontier`] and the size it last checkpointed, so a pass reads only the records added
/// since the previous one: the whole log is read once per process, at its first pass.
pub struct Checkpointer {
    key: SigningKey,
    meta: MetaStore,
    logs: tokio::sync::Mutex<HashMap<String, Progress>>,
}

/// How far this replica has read and checkpointed one log.
#[derive(Default)]
struct Progress {
    frontier: Frontier,
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
        // Page by page: the first pass over a long log never holds all of it.
        let mut pages = Pages::new(group, scope, progress.frontier.size());
        while let Some(page) = pages.next().await? {
            for record in page {
                if record.seq != progress.frontier.size() {
                    return Err(format!(
                        "the lineage of scope {scope} has no record {} but has {}; nothing past the gap is checkpointed: \
                         `aq lineage export {scope}` and `aq lineage verify` name what changed",
                        progress.frontier.size(),
                        record.seq
                    ));
                }
                progress.frontier.push(record.record.as_bytes());
            }
        }
        let size = progress.frontier.size();
        if size <= progress.checkpointed {
            return Ok(None);
        }
        let checkpoint = Checkpoint::sign_root(&self.key, scope, size, progress.frontier.root_hex(), now_ms());
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
