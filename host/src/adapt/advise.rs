//! The advise loop. Exactly one replica at a time advises: the one holding the meta key
//! `\xffaq/meta/advisor`, created under an etcd lease it keeps alive. When it dies, etcd drops
//! the key with the lease, within the lease's TTL, and the next replica to campaign takes it.
//!
//! Every interval the advising replica reads every replica's latest load window of each scope
//! from the meta group, adds the scope's key count, and asks the scope's policy for advice. The
//! gate counts and logs each answer (`aq_scope_advice_total`, an advice line in the decision
//! log). Then the loop acts on one piece of advice per round, as [`plan`] rules
//! (`[adapt]` in the layout): a split makes a new scope and moves it live to the pool group
//! holding the fewest scopes; a merge folds a scope a split made back into its parent. A scope
//! that a split, merge or move changed less than the cool-down ago is left alone, and so is
//! every scope while a migration runs. The migration itself is [`super::migrate`]'s work.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto as pb;

use super::migrate::{MigrateError, Migrator};
use super::stats::stats_of;
use crate::config::AdaptConfig;
use crate::gate::{Gateway, ScopeRuntime};
use crate::index::{Scope, ScopeIndex};
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

/// What the advise loop carries advice out with.
pub struct Actor {
    /// Runs the splits and merges.
    pub migrator: Arc<Migrator>,
    /// When to act, and where split-off scopes go.
    pub settings: AdaptConfig,
    /// Starts groups for splits when the pool has none, on an aq that manages its groups.
    pub starter: Option<super::groups::Starter>,
    /// Per scope, when acting on its advice last failed (Unix seconds): it is not tried again
    /// within the cool-down, so a refusal (a scope with lineage, say) is not retried, and
    /// logged, every round.
    pub failed: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Runs the advise loop until the returned guard drops (or `gateway` does): campaign, and
/// while holding the key, advise every `interval` and act through `actor`, if given.
/// `replica` names this replica in the key; `windows_every` is how often replicas publish
/// their load.
pub fn spawn(
    gateway: &Arc<Gateway>,
    replica: String,
    interval: Duration,
    windows_every: Duration,
    actor: Option<Actor>,
) -> AdvisorGuard {
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
                let advice = advise_all(&gateway, &store, fresh).await;
                if let Some(actor) = &actor {
                    act(&gateway, &store, actor, advice).await;
                }
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

/// Asks every scope's policy for advice on its load across replicas; answers each scope's
/// advice that is not `keep`.
async fn advise_all(gateway: &Gateway, store: &MetaStore, fresh: Duration) -> Vec<(String, aq_sdk::Advice)> {
    let mut answers = Vec::new();
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
        match gateway.advise(runtime, &stats, seed) {
            Some(aq_sdk::Advice::Keep) | None => {}
            Some(advice) => answers.push((scope.id.clone(), advice)),
        }
    }
    answers
}

/// What the advising replica does with one scope's advice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: the advice does not apply (acting is off, or a merge of a scope no split made).
    Ignore,
    /// Not now, for the reason given.
    Hold(String),
    /// Split at the key and move the new scope to the group.
    Split {
        /// The split key.
        at: Vec<u8>,
        /// The pool group the new scope moves to; `None`: a group started for it.
        to: Option<String>,
    },
    /// Merge the scope into its parent.
    Merge,
}

/// The rules for acting on `advice` for `scope` of `index` at `now` (Unix seconds):
///
/// - with acting off, nothing is done;
/// - a merge applies only to a scope a split made (the configuration's scopes are the
///   operator's), and into its parent;
/// - a scope (or, for a merge, its parent) changed by a split, merge or move less than the
///   cool-down ago is held;
/// - a split takes the pool group holding the fewest scopes (by name on a tie) other than the
///   scope's own; with no such group, a group started for it when `can_start`; else it is held.
pub fn plan(index: &ScopeIndex, scope: &Scope, advice: &aq_sdk::Advice, settings: &AdaptConfig, now: u64, can_start: bool) -> Plan {
    if !settings.act {
        return Plan::Ignore;
    }
    let cooling = |s: &Scope| {
        let age = now.saturating_sub(s.adapted.changed_at);
        (s.adapted.changed_at != 0 && age < settings.cooldown_s).then(|| {
            Plan::Hold(format!(
                "scope {} changed {age} s ago; it is left alone for the cool-down of {} s ([adapt] cooldown_s)",
                s.id, settings.cooldown_s
            ))
        })
    };
    match advice {
        aq_sdk::Advice::Keep => Plan::Ignore,
        aq_sdk::Advice::Merge => {
            if scope.adapted.split_from.is_none() {
                return Plan::Ignore;
            }
            let Some(parent) = index.parent_of(&scope.id) else { return Plan::Ignore };
            cooling(scope).or_else(|| cooling(parent)).unwrap_or(Plan::Merge)
        }
        aq_sdk::Advice::Split(at) => {
            if let Some(held) = cooling(scope) {
                return held;
            }
            let load = |group: &str| index.scopes().iter().filter(|s| s.group == group).count();
            let to = settings.pool.iter().filter(|g| **g != scope.group).min_by_key(|g| (load(g), g.as_str()));
            match to {
                Some(to) => Plan::Split { at: at.0.clone(), to: Some(to.clone()) },
                None if can_start => Plan::Split { at: at.0.clone(), to: None },
                None => Plan::Hold(format!(
                    "no group to move a part of scope {} to: [adapt] pool names none but the scope's own group {}, \
                     and aq starts groups only when it manages every group itself (and below [adapt] max_started_groups); \
                     add groups to the pool",
                    scope.id, scope.group
                )),
            }
        }
    }
}

/// Acts on the first advice [`plan`] says to carry out; one migration runs at a time, so one
/// per round.
async fn act(gateway: &Gateway, store: &MetaStore, actor: &Actor, advice: Vec<(String, aq_sdk::Advice)>) {
    let routing = gateway.routing();
    let index = routing.index();
    if let Some(starter) = &actor.starter {
        starter.reap(index).await;
    }
    if advice.is_empty() {
        return;
    }
    let busy = match store.active_migration().await {
        Ok(busy) => busy,
        Err(e) => {
            tracing::warn!("cannot read whether a migration runs: {e}");
            return;
        }
    };
    let now = crate::clock::unix_now();
    let can_start = match &actor.starter {
        Some(starter) if actor.settings.start_groups => starter.can_start().await.unwrap_or_else(|e| {
            tracing::warn!("cannot read the groups started at run time: {e}");
            false
        }),
        _ => false,
    };
    for (scope_id, advice) in advice {
        let Some(scope) = index.get(&scope_id) else { continue };
        let action = if matches!(advice, aq_sdk::Advice::Merge) { "merge" } else { "split" };
        let failed_at = actor.failed.lock().expect("failed lock").get(&scope_id).copied();
        if failed_at.is_some_and(|at| now.saturating_sub(at) < actor.settings.cooldown_s) {
            gateway.metrics().adapted(&scope_id, action, "held");
            continue;
        }
        let planned = match (plan(index, scope, &advice, &actor.settings, now, can_start), &busy) {
            (Plan::Ignore, _) => continue,
            (Plan::Hold(_) | Plan::Split { .. } | Plan::Merge, Some(id)) => {
                Plan::Hold(format!("migration {id} is under way; one runs at a time"))
            }
            (planned, None) => planned,
        };
        let outcome = match planned {
            Plan::Ignore => continue,
            Plan::Hold(why) => {
                tracing::info!(scope = %scope_id, action, "advice held: {why}");
                gateway.metrics().adapted(&scope_id, action, "held");
                continue;
            }
            Plan::Split { at, to } => {
                let to = match (to, &actor.starter) {
                    (Some(to), _) => Ok(to),
                    // A group is started only for a split that can happen.
                    (None, Some(starter)) => match actor.migrator.check_split(&scope_id, &at).await {
                        Ok(_) => starter.start().await.map_err(MigrateError::Failed),
                        Err(e) => Err(e),
                    },
                    (None, None) => Err(MigrateError::Failed("no group to start".into())),
                };
                match to {
                    Ok(to) => actor.migrator.split(&scope_id, &at, Some(&to), None).await.map(|(id, migration)| {
                        let key = String::from_utf8_lossy(&at).into_owned();
                        let moving = migration.map(|m| m.id).unwrap_or_default();
                        format!("split at {key:?}: scope {id} takes the keys from there and moves to group {to} (migration {moving})")
                    }),
                    Err(e) => Err(e),
                }
            }
            Plan::Merge => actor.migrator.merge(&scope_id).await.map(|(into, migration)| match migration {
                Some(m) => format!("merging into {into} (migration {})", m.id),
                None => format!("merged into {into}"),
            }),
        };
        match outcome {
            Ok(what) => {
                tracing::info!(scope = %scope_id, action, "acting on advice: {what}");
                gateway.metrics().adapted(&scope_id, action, "started");
                actor.failed.lock().expect("failed lock").remove(&scope_id);
                return;
            }
            Err(MigrateError::Busy(id)) => {
                tracing::info!(scope = %scope_id, action, "advice held: migration {id} is under way");
                gateway.metrics().adapted(&scope_id, action, "held");
                return;
            }
            // A refusal (a scope with lineage, say) leaves the way to the other scopes' advice.
            Err(e) => {
                tracing::warn!(
                    scope = %scope_id,
                    action,
                    "cannot act on advice: {e}; not tried again for {} s ([adapt] cooldown_s)",
                    actor.settings.cooldown_s
                );
                gateway.metrics().adapted(&scope_id, action, "failed");
                actor.failed.lock().expect("failed lock").insert(scope_id.clone(), now);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Adapted, KeyRange};

    fn scope(id: &str, prefix: &str, group: &str, split_from: Option<&str>, changed_at: u64) -> Scope {
        Scope {
            id: id.into(),
            range: KeyRange::prefix(prefix.as_bytes()),
            group: group.into(),
            labels: Default::default(),
            revisions: Default::default(),
            adapted: Adapted { split_from: split_from.map(String::from), changed_at },
        }
    }

    fn settings(pool: &[&str]) -> AdaptConfig {
        AdaptConfig { pool: pool.iter().map(|g| g.to_string()).collect(), cooldown_s: 60, ..AdaptConfig::default() }
    }

    fn index(scopes: Vec<Scope>) -> ScopeIndex {
        ScopeIndex::new(scopes).unwrap()
    }

    fn split() -> aq_sdk::Advice {
        aq_sdk::Advice::Split(aq_sdk::Bytes(b"/e/m".to_vec()))
    }

    #[test]
    fn a_split_takes_the_pool_group_holding_the_fewest_scopes_other_than_its_own() {
        let layout = index(vec![
            scope("all", "", "main", None, 0),
            scope("e", "/e/", "events", None, 0),
            scope("x", "/x/", "spare-a", None, 0),
        ]);
        let e = layout.get("e").unwrap();
        let planned = plan(&layout, e, &split(), &settings(&["events", "spare-a", "spare-b"]), 1000, false);
        assert_eq!(planned, Plan::Split { at: b"/e/m".to_vec(), to: Some("spare-b".into()) });
        // Ties go by name; the scope's own group is never chosen.
        let planned = plan(&layout, e, &split(), &settings(&["events", "main", "spare-a"]), 1000, false);
        assert_eq!(planned, Plan::Split { at: b"/e/m".to_vec(), to: Some("main".into()) });
        let Plan::Hold(why) = plan(&layout, e, &split(), &settings(&["events"]), 1000, false) else { panic!("held") };
        assert!(why.contains("[adapt] pool"), "{why}");
        // Without a pool group, a group is started where aq may start one.
        assert_eq!(plan(&layout, e, &split(), &settings(&["events"]), 1000, true), Plan::Split { at: b"/e/m".to_vec(), to: None });
        assert!(matches!(plan(&layout, e, &split(), &settings(&["spare-a"]), 1000, true), Plan::Split { to: Some(_), .. }));
    }

    #[test]
    fn only_a_scope_a_split_made_merges_and_into_its_parent() {
        let layout = index(vec![
            scope("all", "", "main", None, 0),
            scope("e", "/e/", "events", None, 0),
            scope("e-2", "/e/m", "spare", Some("e"), 0),
        ]);
        let merge = aq_sdk::Advice::Merge;
        assert_eq!(plan(&layout, layout.get("e-2").unwrap(), &merge, &settings(&[]), 1000, false), Plan::Merge);
        assert_eq!(plan(&layout, layout.get("e").unwrap(), &merge, &settings(&[]), 1000, false), Plan::Ignore);
        let keep = aq_sdk::Advice::Keep;
        assert_eq!(plan(&layout, layout.get("e-2").unwrap(), &keep, &settings(&[]), 1000, false), Plan::Ignore);
    }

    #[test]
    fn a_scope_or_its_parent_changed_within_the_cool_down_is_left_alone() {
        let layout = index(vec![
            scope("all", "", "main", None, 0),
            scope("e", "/e/", "events", None, 950),
            scope("e-2", "/e/m", "spare", Some("e"), 900),
        ]);
        let merge = aq_sdk::Advice::Merge;
        // e-2 cooled down at 960, but its parent changed at 950: held until 1010.
        let Plan::Hold(why) = plan(&layout, layout.get("e-2").unwrap(), &merge, &settings(&[]), 1000, false) else { panic!("held") };
        assert!(why.contains("scope e changed 50 s ago") && why.contains("cool-down of 60 s"), "{why}");
        assert_eq!(plan(&layout, layout.get("e-2").unwrap(), &merge, &settings(&[]), 1010, false), Plan::Merge);
        let Plan::Hold(why) = plan(&layout, layout.get("e").unwrap(), &split(), &settings(&["spare-b"]), 1009, false) else { panic!("held") };
        assert!(why.contains("scope e changed 59 s ago"), "{why}");
        assert!(matches!(plan(&layout, layout.get("e").unwrap(), &split(), &settings(&["spare-b"]), 1010, false), Plan::Split { .. }));
        // Acting off: nothing at all.
        let off = AdaptConfig { act: false, ..settings(&["spare-b"]) };
        assert_eq!(plan(&layout, layout.get("e").unwrap(), &split(), &off, 5000, true), Plan::Ignore);
    }
}
