//! Reading a scope's records from its group, and checkpoints and the root log in the meta group.

use ed25519_dalek::SigningKey;
use etcd_client::proto as pb;

use super::log::{Checkpoint, Export, ExportedRecord, ROOT_LOG};
use super::records_prefix;
use crate::backend::Group;
use crate::index::KeyRange;
use crate::meta::MetaStore;

/// Records read per range request.
const PAGE: i64 = 1000;

/// A scope's records, in `seq` order, with the revision that last wrote each. Read in pages,
/// all at the revision of the first page.
pub async fn records(group: &Group, scope: &str) -> Result<Vec<ExportedRecord>, String> {
    let prefix = records_prefix(scope);
    let (mut key, range_end) = KeyRange::prefix(&prefix).to_request();
    let mut records = Vec::new();
    let mut revision = 0;
    loop {
        let response = group
            .range(pb::PbRangeRequest { key, range_end: range_end.clone(), limit: PAGE, revision, ..Default::default() })
            .await
            .map_err(|s| format!("cannot read the lineage of scope {scope} from group {}: {}", group.name(), s.message()))?;
        revision = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
        let Some(last) = response.kvs.last() else { break };
        key = crate::index::successor(&last.key);
        records.extend(response.kvs.into_iter().map(|kv| ExportedRecord {
            seq: std::str::from_utf8(&kv.key[prefix.len()..]).ok().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX),
            revision: kv.mod_revision,
            record: String::from_utf8_lossy(&kv.value).into_owned(),
        }));
        if !response.more {
            break;
        }
    }
    Ok(records)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// Signs a checkpoint of the scope's log when it grew since its last checkpoint, and appends
/// it to the root log. Returns the new checkpoint, if any.
pub async fn checkpoint(group: &Group, meta: &MetaStore, key: &SigningKey, scope: &str) -> Result<Option<Checkpoint>, String> {
    // Count first: most passes find nothing new, and records are only read when there is.
    let (prefix_key, range_end) = KeyRange::prefix(&records_prefix(scope)).to_request();
    let count = group
        .range(pb::PbRangeRequest { key: prefix_key, range_end, count_only: true, ..Default::default() })
        .await
        .map_err(|s| format!("cannot count the lineage of scope {scope} on group {}: {}", group.name(), s.message()))?
        .count;
    let last = meta.checkpoints(scope).await.map_err(|e| e.to_string())?.last().map(|c| c.size).unwrap_or(0);
    if count as u64 <= last {
        return Ok(None);
    }
    let records = records(group, scope).await?;
    let leaves: Vec<Vec<u8>> = records.iter().map(|r| r.record.as_bytes().to_vec()).collect();
    let checkpoint = Checkpoint::sign(key, scope, &leaves, now_ms());
    meta.put_checkpoint(&checkpoint).await.map_err(|e| e.to_string())?;
    Ok(Some(checkpoint))
}

/// An export of a scope's lineage: a fresh checkpoint first, then records, the scope's
/// checkpoints, the root log and a signed checkpoint of the root log.
pub async fn export(group: &Group, meta: &MetaStore, key: &SigningKey, scope: &str) -> Result<Export, String> {
    checkpoint(group, meta, key, scope).await?;
    let records = records(group, scope).await?;
    let checkpoints = meta.checkpoints(scope).await.map_err(|e| e.to_string())?;
    let root_log = meta.root_log().await.map_err(|e| e.to_string())?;
    let leaves: Vec<Vec<u8>> = root_log.iter().map(|c| serde_json::to_vec(c).expect("JSON")).collect();
    let root_checkpoint = Checkpoint::sign(key, ROOT_LOG, &leaves, now_ms());
    Ok(Export { v: 1, scope: scope.to_string(), records, checkpoints, root_log, root_checkpoint })
}
