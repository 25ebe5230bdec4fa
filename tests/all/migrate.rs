//! Live moves of a scope onto another etcd group, against real etcd, with writers on two
//! replicas running through the move.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aq_host::adapt::migrate::Phase;
use aq_tests::etcd::TestGateway;
use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};

/// Keys written and the revision each was acknowledged at.
type Acked = Vec<(Vec<u8>, i64)>;

/// A writer per endpoint, putting `/registry/configmaps/w<n>/<i>` until `stop` (at least once);
/// each answers the keys it wrote, with the revision each was acknowledged at. Every write
/// must succeed.
fn writers(endpoints: [String; 2], stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Acked>> {
    writers_of(|n, i| format!("/registry/configmaps/w{n}/{i:05}"), endpoints, stop)
}

/// [`writers`] putting the keys `key(n, i)` names.
fn writers_of(
    key: fn(usize, usize) -> String,
    endpoints: [String; 2],
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Acked>> {
    let mut writers = Vec::new();
    for (n, endpoint) in endpoints.into_iter().enumerate() {
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let mut acked = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) && i > 0 {
                    break;
                }
                let key = key(n, i);
                let answer = client.put(key.as_str(), "x", None).await.unwrap_or_else(|e| panic!("{key}: {e}"));
                acked.push((key.into_bytes(), answer.header().unwrap().revision()));
            }
            acked
        }));
    }
    writers
}

/// Waits for `writers` (stopped already) and answers every key they wrote; each writer's
/// revisions must keep increasing, through whatever happened to the scope meanwhile.
async fn acked_by(writers: Vec<tokio::task::JoinHandle<Acked>>) -> Acked {
    let mut acked = Vec::new();
    for writer in writers {
        let written = writer.await.unwrap();
        assert!(written.windows(2).all(|w| w[0].1 < w[1].1), "{written:?}");
        acked.extend(written);
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scope_moves_live_to_another_group_and_loses_no_acknowledged_write() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let mut client = gw.client().await;
    for i in 0..120 {
        client.put(format!("/registry/pods/ns/p{i:03}"), format!("v{i}"), None).await.unwrap();
    }
    client.delete("/registry/pods/ns/p000", None).await.unwrap();
    let lease = client.lease_grant(600, None).await.unwrap().id();
    client.put("/registry/pods/ns/leased", "l", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let before = client.get("/registry/pods/ns/p001", None).await.unwrap().header().unwrap().revision();

    // Writers on both replicas keep going through the move; every write must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = writers([gw.endpoint(), replica.running.addr.to_string()], &stop);

    // So do readers: none of their reads fails, and none sees fewer keys than before.
    let mut readers = Vec::new();
    for endpoint in [gw.endpoint(), replica.running.addr.to_string()] {
        let stop = stop.clone();
        readers.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) || reads == 0 {
                let options = GetOptions::new().with_prefix().with_count_only();
                let pods = client.get("/registry/pods/", Some(options)).await.unwrap_or_else(|e| panic!("read {reads}: {e}"));
                assert_eq!(pods.count(), 120, "read {reads}");
                reads += 1;
            }
            reads
        }));
    }

    let migration = gw.running.migrator.run_to_end("registry", "events").await.unwrap();
    assert_eq!((migration.phase, migration.error.as_deref()), (Phase::Done, None), "{migration:?}");
    assert!(migration.keys_copied >= 120, "{migration:?}");
    for running in [&gw.running, &replica.running] {
        aq_tests::wait_until("every replica routes registry to events", || {
            running.gateway.routing().scope("registry").unwrap().group.name() == "events"
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.await.unwrap() > 0);
    }
    let acked = acked_by(writers).await;

    // Every acknowledged write is on the new group, none is left on the old one.
    let mut events = gw.events.client().await;
    let mut main = gw.main.client().await;
    let moved = events.get("/registry/configmaps/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let keys: std::collections::BTreeSet<&[u8]> = moved.kvs().iter().map(|kv| kv.key()).collect();
    for (key, _) in &acked {
        assert!(keys.contains(key.as_slice()), "{} was acknowledged and is missing", String::from_utf8_lossy(key));
    }
    assert_eq!(moved.count() as usize, acked.len());
    assert_eq!(main.get("/registry/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count(), 0);

    // Through aq the scope reads as before, its lease kept, its revisions past the old ones.
    let pods = client.get("/registry/pods/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(pods.count(), 120, "119 of the first keys and the leased one");
    assert!(pods.kvs().iter().all(|kv| kv.key() != b"/registry/pods/ns/p000"));
    let leased = events.get("/registry/pods/ns/leased", None).await.unwrap();
    assert_eq!(leased.kvs()[0].lease(), lease);
    let after = client.put("/registry/pods/ns/p001", "again", None).await.unwrap().header().unwrap().revision();
    assert!(after > acked.iter().map(|(_, r)| *r).max().unwrap() && after > before);
    let err = client.get("/registry/pods/ns/p001", Some(GetOptions::new().with_revision(before))).await.unwrap_err();
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");

    // The record stays in meta, and the next move may start.
    let stored = gw.running.syncer.store().migrations().await.unwrap();
    assert_eq!(stored.last().map(|m| (m.id.as_str(), m.phase)), Some((migration.id.as_str(), Phase::Done)));
    assert_eq!(gw.running.syncer.store().active_migration().await.unwrap(), None);
}

/// `stream` once aq has answered that its watch is created: the client library returns before
/// that, and a write made earlier may come before the watch exists and go unseen.
async fn created(mut stream: etcd_client::WatchStream) -> etcd_client::WatchStream {
    let message = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
        .await
        .expect("the watch is created in time")
        .unwrap()
        .expect("the watch is open");
    assert!(message.created(), "{message:?}");
    stream
}

/// Every event (type, key, revision) `stream` delivers until it has shown each key of
/// `last`. A watch over scopes on
/// several groups hears each group's events in order but the groups' relative to each other in
/// any order, so a watch that ends on several groups needs a last key in each.
async fn watch_until(mut stream: etcd_client::WatchStream, last: &[&'static [u8]]) -> Vec<(EventType, Vec<u8>, i64)> {
    let mut seen = Vec::new();
    let mut waiting: Vec<&[u8]> = last.to_vec();
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(60), stream.message())
            .await
            .expect("the watch keeps delivering")
            .expect("the watch stream stays up")
            .expect("the watch stream stays open");
        assert!(!message.canceled(), "the watch was canceled: {message:?}");
        for event in message.events() {
            let kv = event.kv().unwrap();
            seen.push((event.event_type(), kv.key().to_vec(), kv.mod_revision()));
            waiting.retain(|key| *key != kv.key());
            if waiting.is_empty() {
                return seen;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_open_across_a_move_sees_every_event_once_in_order_and_none_of_the_clean_up() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let mut client = gw.client().await;
    for i in 0..50 {
        client.put(format!("/registry/pods/ns/p{i:03}"), "v", None).await.unwrap();
    }
    // A prefix watch through each replica, and one on a single key (narrower than the part
    // of the scope the replay watches).
    let mut watches = Vec::new();
    for endpoint in [gw.endpoint(), replica.running.addr.to_string()] {
        let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
        let stream = created(client.watch("/registry/configmaps/", Some(WatchOptions::new().with_prefix())).await.unwrap()).await;
        watches.push(tokio::spawn(watch_until(stream, &[b"/registry/configmaps/zz-end"])));
    }
    let single = created(client.watch("/registry/pods/ns/p001", None).await.unwrap()).await;
    let single = tokio::spawn(watch_until(single, &[b"/registry/pods/ns/p001"]));
    let stop = Arc::new(AtomicBool::new(false));
    let writers = writers([gw.endpoint(), replica.running.addr.to_string()], &stop);

    let migration = gw.running.migrator.run_to_end("registry", "events").await.unwrap();
    assert_eq!((migration.phase, migration.error.as_deref()), (Phase::Done, None), "{migration:?}");
    stop.store(true, Ordering::Relaxed);
    let mut acked = acked_by(writers).await;
    let end = client.put("/registry/configmaps/zz-end", "", None).await.unwrap().header().unwrap().revision();
    acked.push((b"/registry/configmaps/zz-end".to_vec(), end));
    acked.sort_by_key(|(_, revision)| *revision);
    let p001 = client.put("/registry/pods/ns/p001", "after", None).await.unwrap().header().unwrap().revision();

    // Each watch saw each acknowledged write once, at the revision its writer was told, in
    // revision order, and none of the old copy's deletion.
    for watch in watches {
        let seen = watch.await.unwrap();
        assert!(seen.iter().all(|(kind, _, _)| *kind == EventType::Put), "only puts were made: {seen:?}");
        let seen: Vec<(Vec<u8>, i64)> = seen.into_iter().map(|(_, key, revision)| (key, revision)).collect();
        assert_eq!(seen.len(), acked.len(), "one event per acknowledged write");
        assert_eq!(seen, acked);
    }
    let single = single.await.unwrap();
    assert_eq!(single, vec![(EventType::Put, b"/registry/pods/ns/p001".to_vec(), p001)]);
}

/// A migration left holding the lock by a replica that went away `idle_ms` ago, in `phase`.
async fn interrupted(gw: &TestGateway, phase: Phase, idle_ms: u64) -> aq_host::adapt::migrate::Migration {
    let store = gw.running.syncer.store();
    let at = aq_host::clock::unix_ms() - idle_ms;
    let migration = aq_host::adapt::migrate::Migration {
        id: format!("m-{at}-test"),
        scope: "registry".into(),
        from: "main".into(),
        to: "events".into(),
        phase,
        copy_revision: 1,
        keys_total: 10,
        keys_copied: 5,
        events_applied: 0,
        handoff_revision: 0,
        revisions: None,
        started_ms: at,
        updated_ms: at,
        error: None,
        replica: "anchor:gone".into(),
        into: None,
        parts: Vec::new(),
        skipped: 0,
        handoff_ms: 0,
    };
    assert!(store.claim_migration(&migration.id).await.unwrap());
    store.put_migration(&migration).await.unwrap();
    migration
}

/// The record of migration `id` once recovered, by this call or by the replica's own
/// background pass, whichever comes first.
async fn recovery(gw: &TestGateway, id: &str) -> aq_host::adapt::migrate::Migration {
    if let Some(migration) = gw.running.migrator.recover().await.unwrap() {
        assert_eq!(migration.id, id);
        return migration;
    }
    let store = gw.running.syncer.store();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let record = store.migration(id).await.unwrap().filter(|m| m.phase.ended());
        if let Some(record) = record
            && store.active_migration().await.unwrap().is_none()
        {
            return record;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for the background pass to recover {id}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_migration_interrupted_before_its_cut_over_is_rolled_back_and_one_after_it_is_cleaned_up() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    for i in 0..10 {
        client.put(format!("/registry/pods/p{i}"), "v", None).await.unwrap();
    }
    let (mut main, mut events) = (gw.main.client().await, gw.events.client().await);
    let count = |client: &mut etcd_client::Client| {
        let mut client = client.clone();
        async move { client.get("/registry/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count() }
    };

    // Interrupted in the catch-up: a partial copy on the new group, the scope still on the old.
    events.put("/registry/pods/p0", "v", None).await.unwrap();
    let left = interrupted(&gw, Phase::CatchUp, 5_000).await;
    assert_eq!(gw.running.migrator.recover().await.unwrap(), None, "a migration recorded 5 s ago may still be running");
    gw.running.syncer.store().release_migration(&left.id).await.unwrap();
    let left = interrupted(&gw, Phase::CatchUp, 120_000).await;
    let recovered = recovery(&gw, &left.id).await;
    assert_eq!(recovered.phase, Phase::RolledBack);
    assert!(recovered.error.as_deref().unwrap().contains("interrupted in phase CatchUp on replica anchor:gone"), "{recovered:?}");
    assert_eq!(gw.running.syncer.store().migration(&left.id).await.unwrap().unwrap().phase, Phase::RolledBack);
    assert_eq!(gw.running.syncer.store().active_migration().await.unwrap(), None);
    assert_eq!((count(&mut main).await, count(&mut events).await), (10, 0), "the partial copy is gone, the scope intact");
    client.put("/registry/pods/p10", "v", None).await.unwrap();

    // Interrupted in the clean-up: the layout names the new group, the old copy is still there.
    let moved = gw.running.migrator.run_to_end("registry", "events").await.unwrap();
    assert_eq!(moved.phase, Phase::Done);
    main.put("/registry/pods/p3", "stale", None).await.unwrap();
    let left = interrupted(&gw, Phase::CleanUp, 120_000).await;
    let recovered = recovery(&gw, &left.id).await;
    assert_eq!((recovered.phase, recovered.error.as_deref()), (Phase::Done, None), "{recovered:?}");
    assert_eq!((count(&mut main).await, count(&mut events).await), (0, 11));
    assert_eq!(client.get("/registry/pods/p3", None).await.unwrap().kvs()[0].value(), b"v");
    assert_eq!(gw.running.migrator.recover().await.unwrap(), None, "nothing left to recover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scope_splits_and_its_new_part_moves_live_while_watches_and_writers_run() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let mut client = gw.client().await;
    for i in 0..20 {
        client.put(format!("/registry/pods/p{i:02}"), "v", None).await.unwrap();
    }
    let mut watches = Vec::new();
    for endpoint in [gw.endpoint(), replica.running.addr.to_string()] {
        let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
        let stream = created(client.watch("/registry/configmaps/", Some(WatchOptions::new().with_prefix())).await.unwrap()).await;
        watches.push(tokio::spawn(watch_until(stream, &[b"/registry/configmaps/w0/zz-end", b"/registry/configmaps/zz-end"])));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = writers([gw.endpoint(), replica.running.addr.to_string()], &stop);

    // The writers' second prefix and everything after it split off, onto the events group.
    let (id, started) =
        gw.running.migrator.split("registry", b"/registry/configmaps/w1/", Some("events"), None).await.unwrap();
    assert_eq!(id, "registry-2");
    let started = started.expect("the new scope moves");
    let store = gw.running.syncer.store();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let migration = loop {
        if let Some(m) = store.migration(&started.id).await.unwrap().filter(|m| m.phase.ended()) {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "the move of the new scope ends");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!((migration.phase, migration.error.as_deref(), migration.scope.as_str()), (Phase::Done, None, "registry-2"));
    for running in [&gw.running, &replica.running] {
        aq_tests::wait_until("every replica routes the new scope to events", || {
            running.gateway.routing().scope("registry-2").is_some_and(|s| s.group.name() == "events")
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = acked_by(writers).await;
    // One last key in each scope: they are on two groups now.
    for end in ["/registry/configmaps/w0/zz-end", "/registry/configmaps/zz-end"] {
        let revision = client.put(end, "", None).await.unwrap().header().unwrap().revision();
        acked.push((end.as_bytes().to_vec(), revision));
    }
    acked.sort_by_key(|(_, revision)| *revision);

    // Each scope's events arrive once each, in its revision order, at the acknowledged
    // revisions; the two scopes' revisions are unrelated, so each is checked on its own.
    let of = |prefix: &[u8], events: &[(Vec<u8>, i64)]| -> Vec<(Vec<u8>, i64)> {
        events.iter().filter(|(key, _)| key.starts_with(prefix)).cloned().collect()
    };
    for watch in watches {
        let seen = watch.await.unwrap();
        assert!(seen.iter().all(|(kind, _, _)| *kind == EventType::Put), "only puts were made");
        let seen: Vec<(Vec<u8>, i64)> = seen.into_iter().map(|(_, key, revision)| (key, revision)).collect();
        assert_eq!(seen.len(), acked.len(), "one event per acknowledged write");
        for prefix in [&b"/registry/configmaps/w0/"[..], b"/registry/configmaps/w1/"] {
            assert_eq!(of(prefix, &seen), of(prefix, &acked), "{}", String::from_utf8_lossy(prefix));
        }
    }

    // The parent kept its keys before the split on its group; the new scope's are on events.
    let (mut main, mut events) = (gw.main.client().await, gw.events.client().await);
    let keys = |client: &mut etcd_client::Client, prefix: &'static str| {
        let mut client = client.clone();
        async move { client.get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count() as usize }
    };
    let w0 = of(b"/registry/configmaps/w0/", &acked).len();
    let w1 = of(b"/registry/configmaps/w1/", &acked).len();
    assert_eq!(keys(&mut main, "/registry/").await, w0);
    assert_eq!(keys(&mut events, "/registry/configmaps/").await, w1 + 1);
    assert_eq!(keys(&mut events, "/registry/pods/").await, 20);
    let routing = gw.running.gateway.routing();
    assert_eq!(routing.scope("registry").unwrap().group.name(), "main");
    let (parent, child) = (routing.scope("registry").unwrap(), routing.scope("registry-2").unwrap());
    assert_eq!(child.slot.active().module.digest(), parent.slot.active().module.digest(), "governed as its parent");

    // A key of the parent's own cannot split it again inside a nested scope's keys.
    let err = gw.running.migrator.split("registry", b"/registry/pods/p01", None, None).await.unwrap_err();
    assert!(err.to_string().contains("belongs to scope registry-2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_that_keeps_lineage_is_neither_moved_nor_split_and_nothing_changes() {
    use axum::http::{Method, StatusCode};
    let gw = TestGateway::start().await;
    let alice = ed25519_dalek::SigningKey::from_bytes(&[33; 32]);
    let key: String = alice.verifying_key().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let body = serde_json::json!({ "id": "alice", "keys": [key], "roles": ["secret-writer"] });
    let (status, answer) = gw.admin(Method::POST, "/v1/principals", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    aq_tests::wait_until("the gateway knows alice", || gw.running.gateway.trust().principals_by_id().contains_key("alice")).await;
    let signed = aq_host::client::SignedClient::connect(&gw.endpoint(), vec![alice]).await.unwrap();
    signed.put("secrets", b"/registry/secrets/ns/a", b"s").await.expect("a signed put keeps lineage");

    let layout_before = gw.running.syncer.store().layout().await.unwrap().unwrap().1;
    let (status, answer) =
        gw.admin(Method::POST, "/v1/scopes/secrets/split", serde_json::json!({ "at": "/registry/secrets/ns/m" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer.to_string().contains("keeps lineage"), "{answer}");
    let (status, answer) = gw.admin(Method::POST, "/v1/scopes/secrets/move", serde_json::json!({ "group": "events" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer.to_string().contains("keeps lineage"), "{answer}");
    // Neither wrote a layout, a binding or a migration.
    assert_eq!(gw.running.syncer.store().layout().await.unwrap().unwrap().1, layout_before);
    assert!(gw.running.syncer.store().binding("secrets-2").await.unwrap().is_none());
    assert!(gw.running.syncer.store().active_migration().await.unwrap().is_none());
    assert_eq!(gw.running.gateway.routing().scope("secrets").unwrap().group.name(), "main");
}

/// Waits for migration `id` to end and answers its record.
async fn ended(gw: &TestGateway, id: &str) -> aq_host::adapt::migrate::Migration {
    let store = gw.running.syncer.store();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(m) = store.migration(id).await.unwrap().filter(|m| m.phase.ended()) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "migration {id} ends");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_off_scope_merges_back_live_and_its_revisions_never_go_backwards() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let mut client = gw.client().await;
    for i in 0..20 {
        client.put(format!("/registry/pods/p{i:02}"), "v", None).await.unwrap();
    }
    let (id, started) = gw.running.migrator.split("registry", b"/registry/configmaps/w1/", Some("events"), None).await.unwrap();
    let moved = ended(&gw, &started.expect("the new scope moves").id).await;
    assert_eq!((moved.phase, moved.error.as_deref()), (Phase::Done, None));
    // On its own group the new scope's revisions run ahead of its parent's.
    for i in 0..300 {
        client.put(format!("/registry/pods/x{i:03}"), "v", None).await.unwrap();
    }
    let held = client.get("/registry/pods/p00", None).await.unwrap().kvs()[0].mod_revision();
    let ahead = client.put("/registry/pods/p01", "w", None).await.unwrap().header().unwrap().revision();
    let parent = client.put("/registry/configmaps/w0/first", "", None).await.unwrap().header().unwrap().revision();
    assert!(ahead > parent + 200, "the new scope at {ahead}, its parent at {parent}");
    // A leased key of the scope keeps its lease through the merge.
    let lease = client.lease_grant(600, None).await.unwrap().id();
    client.put("/registry/pods/leased", "l", Some(PutOptions::new().with_lease(lease))).await.unwrap();

    let mut watches = Vec::new();
    for endpoint in [gw.endpoint(), replica.running.addr.to_string()] {
        let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
        let stream = created(client.watch("/registry/configmaps/", Some(WatchOptions::new().with_prefix())).await.unwrap()).await;
        watches.push(tokio::spawn(watch_until(stream, &[b"/registry/configmaps/zz-end"])));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = writers([gw.endpoint(), replica.running.addr.to_string()], &stop);

    let (into, started) = gw.running.migrator.merge(&id).await.unwrap();
    assert_eq!(into, "registry");
    let merged = ended(&gw, &started.expect("the keys move back to main").id).await;
    assert_eq!((merged.phase, merged.error.as_deref(), merged.into.as_deref()), (Phase::Done, None, Some("registry")));
    assert!(merged.skipped > 300, "the parent's revisions were taken past the scope's: {merged:?}");
    for running in [&gw.running, &replica.running] {
        aq_tests::wait_until("every replica routes without the merged scope", || running.gateway.routing().scope(&id).is_none()).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked = acked_by(writers).await;
    let end = client.put("/registry/configmaps/zz-end", "", None).await.unwrap().header().unwrap().revision();
    acked.push((b"/registry/configmaps/zz-end".to_vec(), end));
    acked.sort_by_key(|(_, revision)| *revision);
    let of = |prefix: &[u8], events: &[(Vec<u8>, i64)]| -> Vec<(Vec<u8>, i64)> {
        events.iter().filter(|(key, _)| key.starts_with(prefix)).cloned().collect()
    };
    for watch in watches {
        let seen: Vec<(Vec<u8>, i64)> = watch.await.unwrap().into_iter().map(|(_, key, revision)| (key, revision)).collect();
        assert_eq!(seen.len(), acked.len(), "one event per acknowledged write");
        for prefix in [&b"/registry/configmaps/w0/"[..], b"/registry/configmaps/w1/"] {
            assert_eq!(of(prefix, &seen), of(prefix, &acked), "{}", String::from_utf8_lossy(prefix));
        }
    }

    // Every key is back on main and none is left on events.
    let (mut main, mut events) = (gw.main.client().await, gw.events.client().await);
    let count = |client: &mut etcd_client::Client, prefix: &'static str| {
        let mut client = client.clone();
        async move { client.get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count() }
    };
    assert_eq!(count(&mut main, "/registry/pods/").await, 321);
    assert_eq!(count(&mut events, "/registry/pods/").await, 0);
    assert_eq!(count(&mut events, "/registry/configmaps/").await, 0);
    assert_eq!(main.get("/registry/pods/leased", None).await.unwrap().kvs()[0].lease(), lease, "the merged key keeps its lease");
    client.lease_revoke(lease).await.unwrap();
    assert_eq!(client.get("/registry/pods/leased", None).await.unwrap().count(), 0, "revoking the lease deletes the merged key");

    // A revision a client held from before the merge no longer matches (the key has a new
    // one, above it), and history from before it answers as compacted.
    let now = client.get("/registry/pods/p00", None).await.unwrap().kvs()[0].mod_revision();
    assert!(now > ahead, "{now} after {ahead}");
    let stale = etcd_client::Txn::new()
        .when([etcd_client::Compare::mod_revision("/registry/pods/p00", etcd_client::CompareOp::Equal, held)])
        .and_then([etcd_client::TxnOp::put("/registry/pods/p00", "lost", None)]);
    assert!(!client.txn(stale).await.unwrap().succeeded());
    let err = client.get("/registry/pods/p00", Some(GetOptions::new().with_revision(ahead))).await.unwrap_err();
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");

    // Split off and never moved, a scope merges back by a layout change alone.
    let (again, started) = gw.running.migrator.split("registry", b"/registry/services/", None, None).await.unwrap();
    assert!(started.is_none());
    aq_tests::wait_until("the replica routes the new scope", || gw.running.gateway.routing().scope(&again).is_some()).await;
    client.put("/registry/services/s", "1", None).await.unwrap();
    assert_eq!(gw.running.migrator.merge(&again).await.unwrap(), ("registry".to_string(), None));
    aq_tests::wait_until("the replica routes without it", || gw.running.gateway.routing().scope(&again).is_none()).await;
    assert_eq!(client.get("/registry/services/s", None).await.unwrap().kvs()[0].value(), b"1");

    // The outermost scope has nothing to merge into.
    let err = gw.running.migrator.merge("catch-all").await.unwrap_err();
    assert!(err.to_string().contains("nothing to merge it into"), "{err}");
}

fn replica_decisions(replica: &aq_tests::etcd::Replica) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(replica.data_dir().join("decisions.log")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The scope a split on advice made from `parent`, as `gw` routes now.
fn split_off(gw: &TestGateway, parent: &str) -> Option<Arc<aq_host::index::Scope>> {
    split_off_of(&gw.running, parent)
}

/// The scope a split on advice made from `parent`, as `running` routes now.
fn split_off_of(running: &aq_host::serve::Running, parent: &str) -> Option<Arc<aq_host::index::Scope>> {
    let routing = running.gateway.routing();
    routing.index().scopes().iter().find(|s| s.adapted.split_from.as_deref() == Some(parent)).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_scope_splits_onto_a_pool_group_on_advice_and_merges_back_once_it_cools() {
    let spare = aq_tests::etcd::TestEtcd::start("spare").await;
    let layout = |main: &aq_tests::etcd::TestEtcd, events: &aq_tests::etcd::TestEtcd| {
        format!(
            "{}{}{}\n[adapt]\ncooldown_s = 3\npool = [\"spare\"]\n\n\
             [[scopes]]\nid = \"catch-all\"\nprefix = \"\"\ngroup = \"main\"\npolicy = \"builtin:open\"\n\n\
             [[scopes]]\nid = \"events\"\nprefix = \"/registry/events/\"\ngroup = \"events\"\npolicy = \"builtin:ephemeral\"\n\
             config = {{ split_write_rate = 20, merge_write_rate = 5 }}\n",
            main.group("main"),
            events.group("events"),
            spare.group("spare")
        )
    };
    let fast = |options: &mut aq_host::serve::ServeOptions| options.advise_interval = std::time::Duration::from_millis(200);
    let gw = TestGateway::start_tuned(layout, fast).await;
    let replica = gw.replica_with(fast).await;

    // Writers on both replicas make the scope hot; every write must succeed through the split.
    let stop = Arc::new(AtomicBool::new(false));
    // Each writer spreads its events over 16 namespaces, as a cluster's components do.
    let event = |n, i| format!("/registry/events/ns{:02}/w{n}-{i:05}", (i * 7) % 16);
    let writers = writers_of(event, [gw.endpoint(), replica.running.addr.to_string()], &stop);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let child = loop {
        if let Some(child) = split_off(&gw, "events") {
            break child;
        }
        if tokio::time::Instant::now() > deadline {
            let advice: Vec<_> = gw.decisions().into_iter().chain(replica_decisions(&replica)).filter(|d| d.get("advice").is_some()).collect();
            panic!("the hot scope was not split; advice: {:?}", &advice[advice.len().saturating_sub(6)..]);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    // Cold from now on: the parent stays as it is, the new part goes back after its cool-down.
    stop.store(true, Ordering::Relaxed);
    let acked = acked_by(writers).await;
    let at = child.range.start.clone();
    assert!(acked.iter().any(|(k, _)| *k >= at) && acked.iter().any(|(k, _)| *k < at), "the split key divides the writes");
    let started = |action: &str, scope: &str| {
        [&gw.running, &replica.running].iter().map(|r| r.gateway.metrics().adaptations(scope, action, "started")).sum::<u64>()
    };
    aq_tests::wait_until("the advising replica counts the split it started", || started("split", "events") == 1).await;

    // The new part moved live to the pool group: its keys are there and nowhere else.
    let store = gw.running.syncer.store();
    let moved = loop {
        let migrations = store.migrations().await.unwrap();
        if let Some(m) = migrations.iter().find(|m| m.scope == child.id && m.phase.ended()) {
            break m.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "the split-off part's move ends: {migrations:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!((moved.to.as_str(), moved.phase, moved.error.as_deref()), ("spare", Phase::Done, None), "{moved:?}");
    let mut spare_client = spare.client().await;
    let on_spare = spare_client.get("/registry/events/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let expected: std::collections::BTreeSet<&[u8]> = acked.iter().map(|(k, _)| k.as_slice()).filter(|k| *k >= at.as_slice()).collect();
    let found: std::collections::BTreeSet<&[u8]> = on_spare.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(found, expected, "the moved part is on spare, whole");
    let mut events = gw.events.client().await;
    let kept = events.get("/registry/events/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(kept.count() as usize, acked.len() - expected.len(), "the parent's group keeps only the parent's keys");

    // Once cool, the part merges back into its parent, on the parent's group.
    let merged = loop {
        let migrations = store.migrations().await.unwrap();
        if let Some(m) = migrations.iter().find(|m| m.scope == child.id && m.into.is_some() && m.phase.ended()) {
            break m.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "the cooled part merges back: {migrations:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!((merged.to.as_str(), merged.into.as_deref(), merged.phase), ("events", Some("events"), Phase::Done), "{merged:?}");
    assert!(merged.started_ms >= moved.updated_ms + 2_000, "the merge waited out the cool-down: {moved:?} {merged:?}");
    for running in [&gw.running, &replica.running] {
        aq_tests::wait_until("every replica routes without the merged part", || running.gateway.routing().scope(&child.id).is_none()).await;
    }
    assert_eq!(split_off(&gw, "events"), None, "a cold parent is not split again");
    assert_eq!((started("split", "events"), started("merge", &child.id)), (1, 1));

    // Every acknowledged write reads back through aq, and the keys are all on the parent's group.
    let mut client = gw.client().await;
    let read = client.get("/registry/events/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let keys: std::collections::BTreeSet<&[u8]> = read.kvs().iter().map(|kv| kv.key()).collect();
    for (key, _) in &acked {
        assert!(keys.contains(key.as_slice()), "{} was acknowledged and is missing", String::from_utf8_lossy(key));
    }
    assert_eq!(read.count() as usize, acked.len());
    let home = events.get("/registry/events/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(home.count() as usize, acked.len());
    let left = spare_client.get("/registry/events/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(left.count(), 0, "the pool group keeps nothing of a merged part");
    let after = client.put(at.clone(), "again", None).await.unwrap().header().unwrap().revision();
    assert!(after > acked.iter().map(|(_, r)| *r).max().unwrap(), "the part's revisions never go backwards");
}

/// GET `path` from `running`'s admin router with the admin token in `data`.
async fn admin_get(running: &aq_host::serve::Running, data: &std::path::Path, path: &str) -> serde_json::Value {
    use tower::ServiceExt;
    let token = std::fs::read_to_string(aq_host::serve::admin_token_path(data)).unwrap();
    let request = axum::http::Request::builder()
        .uri(path)
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(axum::body::Body::empty())
        .unwrap();
    let answer = aq_host::admin::router(running.admin.clone()).oneshot(request).await.unwrap();
    assert_eq!(answer.status(), 200, "{path}");
    let body = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// Waits (up to 60 s) for a migration record `matching`, ended.
async fn ended_where(
    store: &aq_host::meta::MetaStore,
    what: &str,
    matching: impl Fn(&aq_host::adapt::migrate::Migration) -> bool,
) -> aq_host::adapt::migrate::Migration {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let migrations = store.migrations().await.unwrap();
        if let Some(m) = migrations.iter().find(|m| matching(m) && m.phase.ended()) {
            return m.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {migrations:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_on_advice_starts_a_managed_group_that_restarts_with_aq_and_goes_once_merged_away() {
    // aq manages its one group and has no pool: a split on advice starts a group of its own.
    let layout = "[[groups]]\nname = \"main\"\n\n[adapt]\ncooldown_s = 10\n\n\
                  [[scopes]]\nid = \"catch-all\"\nprefix = \"\"\ngroup = \"main\"\npolicy = \"builtin:open\"\n\n\
                  [[scopes]]\nid = \"events\"\nprefix = \"/registry/events/\"\ngroup = \"main\"\npolicy = \"builtin:ephemeral\"\n\
                  config = { split_write_rate = 20, merge_write_rate = 5 }\n";
    let data = tempfile::tempdir().unwrap();
    let start = || async {
        let config = aq_host::config::Config::parse(layout, "test layout").unwrap();
        let mut options = aq_tests::etcd::serve_options(data.path(), None);
        options.advise_interval = std::time::Duration::from_millis(200);
        aq_host::serve::start(config, options).await.expect("aq starts")
    };
    let running = start().await;
    // A leased key of the part, kept alive through one stream opened before the group exists.
    let mut client = etcd_client::Client::connect([running.addr.to_string()], None).await.unwrap();
    let lease = client.lease_grant(2, None).await.unwrap().id();
    client.put("/registry/events/zz-leased", "l", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let (mut keeper, mut kept) = client.lease_keep_alive(lease).await.unwrap();
    let keeping = Arc::new(AtomicBool::new(true));
    let keep = {
        let keeping = keeping.clone();
        tokio::spawn(async move {
            while keeping.load(Ordering::Relaxed) {
                keeper.keep_alive().await.unwrap();
                assert!(kept.message().await.unwrap().unwrap().ttl() > 0, "the lease is kept alive");
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let event = |n, i| format!("/registry/events/ns{:02}/w{n}-{i:05}", (i * 7) % 16);
    let writers = writers_of(event, [running.addr.to_string(), running.addr.to_string()], &stop);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let child = loop {
        if let Some(child) = split_off_of(&running, "events") {
            break child;
        }
        assert!(tokio::time::Instant::now() < deadline, "the hot scope was not split");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let acked = acked_by(writers).await;
    let store = running.syncer.store().clone();
    let moved = ended_where(&store, "the new part's move ends", |m| m.scope == child.id && m.into.is_none()).await;
    assert_eq!((moved.to.as_str(), moved.phase, moved.error.as_deref()), ("auto-1", Phase::Done, None), "{moved:?}");
    let dir = data.path().join("etcd").join("auto-1");
    assert!(dir.join("credentials.json").exists() && running.managed.lock().unwrap().contains_key("auto-1"));
    let started = store.started_groups().await.unwrap();
    assert_eq!(started.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["auto-1"]);
    assert_eq!(running.gateway.metrics().groups_started(), 1);
    // Kept alive through the stream opened before auto-1 existed, the lease's copy there
    // outlives twice its TTL (2 s) after the move: what this waits for is time itself.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    keeping.store(false, Ordering::Relaxed);
    keep.await.unwrap();
    let leased = client.get("/registry/events/zz-leased", None).await.unwrap();
    assert_eq!(leased.kvs().first().map(|kv| kv.lease()), Some(lease), "the leased key outlived its TTL on auto-1");
    assert_eq!(running.gateway.routing().scope(&child.id).map(|r| r.group.name().to_string()).as_deref(), Some("auto-1"));
    let listed = admin_get(&running, data.path(), "/v1/groups").await;
    let auto = listed["groups"].as_array().unwrap().iter().find(|g| g["name"] == "auto-1").unwrap_or_else(|| panic!("{listed}"));
    assert_eq!((auto["started"].as_bool(), auto["scopes"].clone()), (Some(true), serde_json::json!([child.id])), "{listed}");
    let part = admin_get(&running, data.path(), &format!("/v1/scopes/{}", child.id)).await;
    assert_eq!((part["split_from"].as_str(), part["group"].as_str()), (Some("events"), Some("auto-1")), "{part}");
    assert!(part["adapted_at"].as_u64().is_some_and(|at| (at + 1) * 1000 > moved.started_ms), "the cut-over set it: {part}");

    // The started group comes back with aq, and the part is still routed there.
    drop(running);
    let running = start().await;
    assert_eq!(running.gateway.routing().scope(&child.id).map(|r| r.group.name().to_string()).as_deref(), Some("auto-1"));
    let mut client = etcd_client::Client::connect([running.addr.to_string()], None).await.unwrap();
    let read = client.get("/registry/events/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    // The leased key went with its lease when the old aq's keep-alive stream ended, or is still there.
    let leased = client.get("/registry/events/zz-leased", Some(GetOptions::new().with_count_only())).await.unwrap().count() as usize;
    assert_eq!(read.count() as usize - leased, acked.len(), "every acknowledged write reads back after the restart");

    // Cold, the part merges back after its cool-down, and the group it leaves empty goes.
    let store = running.syncer.store().clone();
    let merged = ended_where(&store, "the cooled part merges back", |m| m.scope == child.id && m.into.is_some()).await;
    assert_eq!((merged.from.as_str(), merged.to.as_str(), merged.phase), ("auto-1", "main", Phase::Done), "{merged:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while running.gateway.groups().contains_key("auto-1") || dir.exists() {
        assert!(std::time::Instant::now() < deadline, "the emptied group was not stopped and removed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!running.managed.lock().unwrap().contains_key("auto-1"));
    // Its record goes last, once its data is gone.
    while !store.started_groups().await.unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the emptied group's record was not removed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let read = client.get("/registry/events/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    let keys: std::collections::BTreeSet<&[u8]> = read.kvs().iter().map(|kv| kv.key()).collect();
    for (key, _) in &acked {
        assert!(keys.contains(key.as_slice()), "{} was acknowledged and is missing", String::from_utf8_lossy(key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advice_that_cannot_be_carried_out_starts_no_group_and_waits_out_the_cool_down() {
    // The guest keeps lineage and advises a split every round: the split is refused.
    let layout = format!(
        "[[groups]]\nname = \"main\"\n\n[adapt]\ncooldown_s = 3600\n\n\
         [[scopes]]\nid = \"catch-all\"\nprefix = \"\"\ngroup = \"main\"\npolicy = \"builtin:open\"\n\n\
         [[scopes]]\nid = \"audited\"\nprefix = \"/audit/\"\ngroup = \"main\"\npolicy = {:?}\nconfig = {{ at = \"/audit/m\" }}\n",
        aq_tests::guests::SPLIT_LINEAGE
    );
    let data = tempfile::tempdir().unwrap();
    let config = aq_host::config::Config::parse(&layout, "test layout").unwrap();
    let mut options = aq_tests::etcd::serve_options(data.path(), None);
    options.advise_interval = std::time::Duration::from_millis(100);
    let running = aq_host::serve::start(config, options).await.expect("aq starts");
    let mut client = etcd_client::Client::connect([running.addr.to_string()], None).await.unwrap();
    client.put("/audit/a", "recorded", None).await.unwrap();

    let metrics = running.gateway.metrics().clone();
    aq_tests::wait_until("the refused split is counted", || metrics.adaptations("audited", "split", "failed") == 1).await;
    let advised = metrics.advice("audited", "split");
    aq_tests::wait_until("five more rounds advise the split", || metrics.advice("audited", "split") >= advised + 5).await;
    assert_eq!(metrics.adaptations("audited", "split", "failed"), 1, "tried once within the cool-down");
    assert!(metrics.adaptations("audited", "split", "held") >= 4);
    assert_eq!(metrics.adaptations("audited", "split", "started"), 0);
    assert_eq!(metrics.groups_started(), 0, "no group was started for it");
    assert_eq!(running.syncer.store().started_groups().await.unwrap(), Vec::new());
    assert!(!data.path().join("etcd").join("auto-1").exists());
    assert!(running.gateway.routing().index().get("audited-2").is_none());
    assert_eq!(client.get("/audit/a", None).await.unwrap().kvs()[0].value(), b"recorded");
}
