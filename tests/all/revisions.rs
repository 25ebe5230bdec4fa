//! One revision per client write, as etcd gives: concurrent writers through two replicas, plain
//! puts and signed critical writes with lineage, and a watch that sees each write as its own
//! revision (kube-apiserver's watch cache depends on it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aq_host::client::SignedClient;
use aq_tests::etcd::TestGateway;
use axum::http::{Method, StatusCode};
use ed25519_dalek::SigningKey;
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use serde_json::json;

const WRITERS: usize = 16;
const WRITES: usize = 8;

/// Collects `n` events from a watch of `prefix` from revision 1: (key, revision) pairs.
async fn watched(client: &mut etcd_client::Client, prefix: &str, n: usize) -> Vec<(String, i64)> {
    let mut stream =
        client.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(1))).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut events = Vec::new();
    while events.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} events on {prefix} within 30 s", events.len()))
            .unwrap()
            .expect("the watch stays open");
        for event in message.events() {
            let kv = event.kv().unwrap();
            events.push((kv.key_str().unwrap().to_string(), kv.mod_revision()));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_write_has_a_revision_of_its_own() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let alice = SigningKey::from_bytes(&[21; 32]);
    let body = json!({ "id": "alice", "keys": [alice.verifying_key().as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()], "roles": ["secret-writer"] });
    let (status, answer) = gw.admin(Method::POST, "/v1/principals", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    // The replica learns of alice from its watch of the meta group.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replica.running.gateway.trust().principals_by_id().contains_key("alice") {
        assert!(Instant::now() < deadline, "the replica never learned of alice");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Half the writers put plain values into registry, half write signed secrets (critical,
    // with lineage); each writer alternates replicas by its number.
    let endpoints = [gw.endpoint(), replica.running.addr.to_string()];
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let endpoint = endpoints[writer % 2].clone();
        let alice = alice.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            if writer % 4 < 2 {
                let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
                for n in 0..WRITES {
                    let key = format!("/registry/pods/ns/w{writer}-{n}");
                    let answer = client.put(key.as_str(), "v", None).await.expect("a plain put");
                    acked.push((key, answer.header().unwrap().revision()));
                }
            } else {
                let client = SignedClient::connect(&endpoint, vec![alice]).await.unwrap();
                for n in 0..WRITES {
                    let key = format!("/registry/secrets/ns/w{writer}-{n}");
                    let answer = client.put("secrets", key.as_bytes(), b"s").await.expect("a signed put");
                    acked.push((key, answer.header.unwrap().revision));
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.unwrap());
    }
    assert_eq!(acked.len(), WRITERS * WRITES);
    let revisions: BTreeSet<i64> = acked.iter().map(|(_, rev)| *rev).collect();
    assert_eq!(revisions.len(), acked.len(), "two acknowledged writes share a revision");

    // A watch from revision 1 sees each write once, at the revision it was acknowledged with,
    // and no revision holds two of them.
    let mut client = gw.client().await;
    let half = WRITERS * WRITES / 2;
    let mut events = watched(&mut client, "/registry/pods/ns/", half).await;
    events.extend(watched(&mut client, "/registry/secrets/ns/", half).await);
    let mut per_revision: BTreeMap<i64, usize> = BTreeMap::new();
    for (_, rev) in &events {
        *per_revision.entry(*rev).or_default() += 1;
    }
    assert!(per_revision.values().all(|n| *n == 1), "{per_revision:?}");
    events.sort();
    acked.sort();
    assert_eq!(events, acked, "the watch shows exactly the acknowledged writes");

    // The signed writes were recorded, each in its own write's Txn.
    let (status, export) = gw.admin(Method::GET, "/v1/lineage/secrets/export", serde_json::Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{export}");
    let export: aq_host::lineage::log::Export = serde_json::from_value(export).unwrap();
    assert_eq!(export.records.len(), half, "one record per signed write");
    aq_host::lineage::log::verify(&export, &[]).expect("the lineage verifies");
}

/// The next watch message within 20 s.
async fn next_message(stream: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a watch message within 20 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_scope_counts_on_in_every_answer_and_its_older_history_is_compacted() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let mut main = gw.main.client().await;
    let old = client.put("/registry/pods/ns/old", "before", None).await.unwrap().header().unwrap().revision();

    // registry's logical revisions now run 10 000 above main's, from the next write on, as they
    // would after a move from a group that had reached them.
    const OFFSET: i64 = 10_000;
    let floor = old + 1 + OFFSET;
    let shift = aq_host::index::RevisionShift { offset: OFFSET, floor, base: floor, handed: 0 };
    let store = gw.running.syncer.store();
    let (stored, revision) = store.layout().await.unwrap().expect("a stored layout");
    let mut scopes = stored.index().unwrap().scopes().iter().map(|s| (**s).clone()).collect::<Vec<_>>();
    scopes.iter_mut().find(|s| s.id == "registry").unwrap().revisions = shift;
    let shifted = aq_host::index::ScopeIndex::new(scopes).unwrap();
    store.write_layout(&stored.changed(&shifted, "registry counts on from 10 000"), revision).await.unwrap();
    aq_tests::wait_until("the replica follows registry's revision shift", || {
        gw.running.gateway.routing().scope("registry").unwrap().scope.revisions == shift
    })
    .await;

    // A put answers in the scope's revisions; the group holds its own.
    let put = client.put("/registry/pods/ns/a", "1", None).await.unwrap().header().unwrap().revision();
    assert!(put >= floor, "{put} counts on from {floor}");
    let stored = main.get("/registry/pods/ns/a", None).await.unwrap();
    assert_eq!(stored.kvs()[0].mod_revision(), put - OFFSET, "the group keeps its own revisions");
    let read = client.get("/registry/pods/ns/a", None).await.unwrap();
    assert_eq!((read.kvs()[0].mod_revision(), read.kvs()[0].create_revision()), (put, put));
    assert!(read.header().unwrap().revision() >= put);

    // Compares hold in the scope's revisions; one against history before the move fails as it
    // would on etcd once the key was rewritten.
    let cas = |revision: i64, value: &str| {
        Txn::new()
            .when([Compare::mod_revision("/registry/pods/ns/a", CompareOp::Equal, revision)])
            .and_then([TxnOp::put("/registry/pods/ns/a", value, Some(PutOptions::new().with_prev_key()))])
    };
    let swapped = client.txn(cas(put, "2")).await.unwrap();
    assert!(swapped.succeeded());
    let second = swapped.header().unwrap().revision();
    assert!(second > put);
    let Some(TxnOpResponse::Put(answer)) = swapped.op_responses().into_iter().next() else { panic!("a put answer") };
    assert_eq!(answer.prev_key().unwrap().mod_revision(), put, "prev_kv in the scope's revisions");
    assert!(!client.txn(cas(old, "stale")).await.unwrap().succeeded());
    assert!(!client.txn(cas(put - OFFSET, "stale")).await.unwrap().succeeded(), "a group revision is not the scope's");

    // History since the move reads; history before it is compacted.
    let at_put = client.get("/registry/pods/ns/a", Some(GetOptions::new().with_revision(put))).await.unwrap();
    assert_eq!(at_put.kvs()[0].value(), b"1");
    let err = client.get("/registry/pods/ns/old", Some(GetOptions::new().with_revision(old))).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert_eq!(status.message(), "etcdserver: mvcc: required revision has been compacted");

    // A watch from the move replays in the scope's revisions.
    let mut stream = client.watch("/registry/pods/ns/a", Some(WatchOptions::new().with_start_revision(put))).await.unwrap();
    assert!(next_message(&mut stream).await.created());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = next_message(&mut stream).await;
        assert!(message.header().unwrap().revision() >= second);
        seen.extend(message.events().iter().map(|e| e.kv().unwrap().mod_revision()));
    }
    assert_eq!(seen, [put, second]);
    // A watch from before it is told the history is compacted, as kube-style watchers expect.
    let mut stale = client.watch("/registry/pods/", Some(WatchOptions::new().with_prefix().with_start_revision(old))).await.unwrap();
    assert!(next_message(&mut stale).await.created());
    let compacted = next_message(&mut stale).await;
    assert!(compacted.canceled());
    assert_eq!(compacted.compact_revision(), floor);

    // A delete's answer and its prev_kv too; other scopes keep their group's revisions.
    let deleted = client.delete("/registry/pods/ns/a", Some(DeleteOptions::new().with_prev_key())).await.unwrap();
    assert!(deleted.header().unwrap().revision() > second);
    assert_eq!(deleted.prev_kvs()[0].mod_revision(), second);
    let event = client.put("/registry/events/ns/e", "v", None).await.unwrap().header().unwrap().revision();
    let mut events = gw.events.client().await;
    assert_eq!(events.get("/registry/events/ns/e", None).await.unwrap().kvs()[0].mod_revision(), event);
}
