//! The advise loop. Exactly one replica at a time advises: the one holding the meta key
//! `\xffaq/meta/advisor`, created under an etcd lease it keeps alive. When it dies, etcd drops
//! the key with the lease, within the lease's TTL, and the next replica to campaign takes it.
//!
//! Every interval the advising replica reads every replica's latest load window of each scope
//! from the meta group, adds the scope's key count, and asks the scope's policy for advice. The
//! gate counts and logs each answer (`aq_scope_advice_total`, an advice line in the decision
//! log). Acting on a split or a merge is the migration's work, not this loop's.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto as pb;

use super::stats::stats_of;
use crate::gate::{Gateway, ScopeRuntime};
use crate::meta::MetaStore;

/// The key the advising replica holds, in the meta group.
pub fn advisor_key() -> Vec<u8> {
    [crate::index::RESERVED_PREFIX, b"meta/advisor"].concat()
}

/// Load windows older than this many advise intervals are of replicas gone quiet.
const FRESH_INTERVALS: u32 = 3;

/// Stops the advise loop when dropped; a replica that held the role gives it up at once (its
/// lease is revoked) instead of leaving the others to wait out the TTL.
pub struct AdvisorGuard {
    _stop: tokio::sync::watch::Sender<()>,
}

/// Runs the advise loop until the returned guard drops (or `gateway` does): campaign, and
/// while holding the key, advise every `interval`. `replica` names this replica in the key;
/// `windows_every` is how often replicas publish their load.
pub fn spawn(gateway: &Arc<Gateway>, replica: String, interval: Duration, windows_every: Duration) -> AdvisorGuard {
    let (stop, mut stopped) = tokio::sync::watch::channel(());
    let weak = Arc::downgrade(gateway);
    let home = gateway.home().clone();
    tokio::spawn(async move {
        let mut lease: Option<i64> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stopped.changed() => break,
            }
            let Some(gateway) = weak.upgrade() else { break };
            let store = MetaStore::new(gateway.home().clone());
            lease = match hold(&store, &replica, lease, interval).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!("cannot campaign for the advisor role: {e}");
                    None
                }
            };
            if lease.is_some() {
                let fresh = (windows_every * FRESH_INTERVALS).max(interval * FRESH_INTERVALS);
                advise_all(&gateway, &store, fresh).await;
            }
        }
        if let Some(id) = lease {
            let _ = home.lease_revoke(pb::PbLeaseRevokeRequest { id }).await;
            tracing::info!(replica, "this replica no longer advises the scopes");
        }
    });
    AdvisorGuard { _stop: stop }
}

/// Keeps the advisor role: renews `lease` if this replica holds it, otherwise campaigns with a
/// new lease. Returns the lease while this replica advises, `None` while another does.
async fn hold(store: &MetaStore, replica: &str, lease: Option<i64>, interval: Duration) -> Result<Option<i64>, String> {
    let group = store.group();
    if let Some(id) = lease {
        let requests = tokio_stream::once(pb::PbLeaseKeepAliveRequest { id });
        let mut answers = group.lease_keep_alive(requests).await.map_err(|s| s.message().to_string())?;
        match answers.message().await {
            Ok(Some(answer)) if answer.ttl > 0 => {
                // The key is still this replica's, under this lease (an operator may have
                // deleted it to move the role).
                let held = group.range(pb::PbRangeRequest { key: advisor_key(), ..Default::default() }).await.map_err(|s| s.message().to_string())?;
                if held.kvs.first().is_some_and(|kv| kv.lease == id && kv.value == replica.as_bytes()) {
                    return Ok(Some(id));
                }
                let _ = group.lease_revoke(pb::PbLeaseRevokeRequest { id }).await;
            }
            // The lease expired (this replica stalled past its TTL): the key went with it.
            Ok(_) => tracing::warn!(replica, "the advisor lease expired; campaigning again"),
            Err(status) => return Err(status.message().to_string()),
        }
    }
    // A dead advisor's role moves within its lease's TTL; etcd raises short TTLs to its minimum.
    let ttl = (interval.as_secs() * 3).max(5) as i64;
    let granted = group
        .lease_grant(pb::PbLeaseGrantRequest { ttl, id: 0 })
        .await
        .map_err(|s| s.message().to_string())?;
    let claim = pb::PbTxnRequest {
        compare: vec![crate::meta::compare_unchanged(advisor_key(), 0)],
        success: vec![pb::PbTxnRequestOp {
            request: Some(pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest {
                key: advisor_key(),
                value: replica.as_bytes().to_vec(),
                lease: granted.id,
                ..Default::default()
            })),
        }],
        failure: Vec::new(),
    };
    let won = group.txn(claim).await.map_err(|s| s.message().to_string())?.succeeded;
    if won {
        tracing::info!(replica, "this replica advises the scopes now");
        return Ok(Some(granted.id));
    }
    let _ = group.lease_revoke(pb::PbLeaseRevokeRequest { id: granted.id }).await;
    Ok(None)
}

/// Asks every scope's policy for advice on its load across replicas.
async fn advise_all(gateway: &Gateway, store: &MetaStore, fresh: Duration) {
    let routing = gateway.routing();
    let since_ms = crate::clock::unix_ms().saturating_sub(fresh.as_millis() as u64);
    for scope in routing.index().scopes() {
        let Some(runtime) = routing.scope(&scope.id) else { continue };
        let windows = match store.loads(&scope.id, since_ms).await {
            Ok(windows) => windows,
            Err(e) => {
                tracing::warn!(scope = %scope.id, "cannot read the scope's load: {e}");
                continue;
            }
        };
        let keys = match keys_of(gateway, runtime).await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(scope = %scope.id, "cannot count the scope's keys: {e}");
                continue;
            }
        };
        // Bytes are not counted yet: etcd has no cheap size of a range.
        let stats = stats_of(&windows, &scope.range, keys, 0);
        let seed = *blake3::Hasher::new_derive_key("aq advise seed 2026-12")
            .update(scope.id.as_bytes())
            .update(&crate::clock::unix_ms().to_le_bytes())
            .finalize()
            .as_bytes();
        gateway.advise(runtime, &stats, seed);
    }
}

/// The keys the scope holds itself (nested scopes' keys are theirs).
async fn keys_of(gateway: &Gateway, runtime: &ScopeRuntime) -> Result<u64, String> {
    let routing = gateway.routing();
    let mut keys = 0;
    for (owner, part) in routing.parts(&runtime.scope.range) {
        if owner.scope.id != runtime.scope.id {
            continue;
        }
        let (mut key, range_end) = part.to_request();
        if key.is_empty() {
            key = vec![0];
        }
        let request = pb::PbRangeRequest { key, range_end, count_only: true, ..Default::default() };
        keys += runtime.group.range(request).await.map_err(|s| s.message().to_string())?.count as u64;
    }
    Ok(keys)
}
