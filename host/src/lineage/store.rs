//! Reading a scope's records from its group, and checkpoints and the root log in the meta group.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use etcd_client::proto as pb;
use tokio::sync::mpsc;

use super::log::{Checkpoint, Export, ExportedRecord, ExportedWrite, Frontier, ROOT_LOG};
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
            records.push(exported(&kv, prefix.len()));
        }
        if !more {
            return Ok((records, at));
        }
    }
}

fn exported(kv: &pb::PbKeyValue, prefix: usize) -> ExportedRecord {
    ExportedRecord {
        id: String::from_utf8_lossy(&kv.key[prefix..]).into_owned(),
        revision: kv.mod_revision,
        version: kv.version,
        record: String::from_utf8_lossy(&kv.value).into_owned(),
    }
}

/// Records a watch of one log delivered, waiting for the next pass; `None` once the watch
/// ended. Dropping it stops the watch.
struct Feed {
    records: mpsc::UnboundedReceiver<Option<ExportedRecord>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches the records of `scope` written from revision `from` on.
fn follow(group: &Group, scope: &str, from: i64) -> Feed {
    let (to_pass, records) = mpsc::unbounded_channel();
    let (group, prefix) = (group.clone(), records_prefix(scope));
    let task = tokio::spawn(async move {
        let (requests, inbound) = mpsc::channel(1);
        let (key, range_end) = KeyRange::prefix(&prefix).to_request();
        let create = crate::backend::watch_request(pb::PbWatchRequestUnion::CreateRequest, |c| {
            c.key = key;
            c.range_end = range_end;
            c.start_revision = from;
        });
        let _ = requests.send(create).await;
        if let Ok(mut stream) = group.watch(tokio_stream::wrappers::ReceiverStream::new(inbound)).await {
            while let Ok(Some(response)) = stream.message().await {
                if response.canceled || response.compact_revision > 0 {
                    break;
                }
                // Puts only: a deleted record stays in the log as it was written.
                for kv in response.events.into_iter().filter(|e| e.r#type == 0).filter_map(|e| e.kv) {
                    if to_pass.send(Some(exported(&kv, prefix.len()))).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_pass.send(None);
    });
    Feed { records, task }
}

/// A scope's records, in revision order.
pub async fn records(group: &Group, scope: &str) -> Result<Vec<ExportedRecord>, String> {
    records_between(group, scope, 0, 0).await.map(|(records, _)| records)
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
    /// The records written since `read_through`, as a watch delivers them.
    feed: Option<Feed>,
}

impl Progress {
    /// Appends records written after `read_through`, in revision order; refuses a record
    /// written more than once (aq writes each once), leaving it for the next pass to find again.
    fn append(&mut self, scope: &str, records: impl IntoIterator<Item = ExportedRecord>) -> Result<(), String> {
        for record in records {
            if record.revision <= self.read_through {
                continue;
            }
            if record.version != 1 {
                self.feed = None;
                return Err(format!(
                    "the lineage record {} of scope {scope} was written {} times (last at revision {}); nothing past it is \
                     checkpointed: `aq lineage export {scope}` and `aq lineage verify` name what changed",
                    record.id, record.version, record.revision
                ));
            }
            self.frontier.push(record.record.as_bytes());
            self.last = record.revision;
            self.read_through = record.revision;
        }
        Ok(())
    }
}

impl Checkpointer {
    /// Checkpoints signed with `key` and stored in `meta`.
    pub fn new(key: SigningKey, meta: MetaStore) -> Self {
        Checkpointer { key, meta, logs: tokio::sync::Mutex::default() }
    }

    /// Signs a checkpoint of the log of `scope` (its records on `group`) when it grew since its
    /// last checkpoint, and appends it to the root log: the background pass. It takes what the
    /// log's watch delivered since the previous pass (the first pass, and one after the watch
    /// ended, reads the records written since the last one instead). Returns the checkpoint
    /// stored, if any (none when nothing is new, or another replica stored one of the same
    /// size first).
    pub async fn checkpoint(&self, group: &Group, scope: &str) -> Result<Option<Checkpoint>, String> {
        self.pass(group, scope, false).await
    }

    /// [`Checkpointer::checkpoint`], covering every record written before the call: it reads
    /// them from etcd (which walks the log's keys to filter them by revision).
    pub async fn checkpoint_now(&self, group: &Group, scope: &str) -> Result<Option<Checkpoint>, String> {
        self.pass(group, scope, true).await
    }

    async fn pass(&self, group: &Group, scope: &str, exact: bool) -> Result<Option<Checkpoint>, String> {
        let mut logs = self.logs.lock().await;
        // At a log's first pass this replica has checkpointed nothing; if a checkpoint of the
        // same size is stored already, storing this one is refused and nothing changes.
        let progress = logs.entry(scope.to_string()).or_default();
        let mut delivered = Vec::new();
        let mut ended = progress.feed.is_none();
        if let Some(feed) = &mut progress.feed {
            loop {
                match feed.records.try_recv() {
                    Ok(Some(record)) => delivered.push(record),
                    Ok(None) | Err(mpsc::error::TryRecvError::Disconnected) => {
                        ended = true;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                }
            }
        }
        if exact || ended {
            let (added, read_at) = records_between(group, scope, progress.read_through, 0).await?;
            progress.append(scope, added)?;
            progress.read_through = progress.read_through.max(read_at);
            if ended {
                progress.feed = Some(follow(group, scope, progress.read_through + 1));
            }
        }
        // What the watch delivered beyond what was read is next in revision order.
        progress.append(scope, delivered)?;
        let size = progress.frontier.size();
        if size <= progress.checkpointed {
            return Ok(None);
        }
        let checkpoint = Checkpoint::sign_root(&self.key, scope, size, progress.last, progress.frontier.root_hex(), crate::clock::unix_ms());
        let stored = self.meta.put_checkpoint(&checkpoint).await.map_err(|e| e.to_string())?;
        progress.checkpointed = size;
        Ok(stored.then_some(checkpoint))
    }

    /// An export of a scope's lineage: a fresh checkpoint first (when the log allows one), then
    /// records, the scope's checkpoints, the root log and a signed checkpoint of the root log.
    /// `ranges` are the keys the scope owns (none for the meta log), whose last writes the
    /// export lists.
    pub async fn export(&self, group: &Group, scope: &str, ranges: &[KeyRange]) -> Result<Export, String> {
        // A log with a gap is exported all the same: its verification names the gap.
        if let Err(e) = self.checkpoint_now(group, scope).await {
            tracing::warn!(scope, "exporting lineage without a fresh checkpoint: {e}");
        }
        let records = records(group, scope).await?;
        let checkpoints = self.meta.checkpoints(scope).await.map_err(|e| e.to_string())?;
        let root_log = self.meta.root_log().await.map_err(|e| e.to_string())?;
        let leaves: Vec<Vec<u8>> = root_log.iter().map(|c| serde_json::to_vec(c).expect("JSON")).collect();
        let root_checkpoint = Checkpoint::sign(&self.key, ROOT_LOG, &leaves, crate::clock::unix_ms());
        let mut writes = Vec::new();
        for range in ranges {
            writes.extend(last_writes(group, range).await?);
        }
        Ok(Export { v: 1, scope: scope.to_string(), records, checkpoints, root_log, root_checkpoint, writes })
    }
}

/// Every key in `range` on `group` and the revision that last wrote it, page by page.
async fn last_writes(group: &Group, range: &KeyRange) -> Result<Vec<ExportedWrite>, String> {
    let mut writes = Vec::new();
    let (mut key, range_end) = range.to_request();
    if key.is_empty() {
        // etcd refuses an empty key; "\0" is the least key a client can write.
        key = vec![0];
    }
    loop {
        let request = pb::PbRangeRequest { key: key.clone(), range_end: range_end.clone(), limit: PAGE, keys_only: true, ..Default::default() };
        let response = group.range(request).await.map_err(|s| format!("cannot read the scope's keys: {}", s.message()))?;
        let Some(last) = response.kvs.last() else { break };
        key = [last.key.as_slice(), &[0]].concat();
        writes.extend(response.kvs.iter().map(|kv| ExportedWrite { key: hex::encode(&kv.key), revision: kv.mod_revision }));
        if !response.more {
            break;
        }
    }
    Ok(writes)
}
