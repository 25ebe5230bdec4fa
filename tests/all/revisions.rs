//! One revision per client write, as etcd gives: concurrent writers through two replicas, plain
//! puts and signed critical writes with lineage, and a watch that sees each write as its own
//! revision (kube-apiserver's watch cache depends on it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aq_host::client::SignedClient;
use aq_tests::etcd::TestGateway;
use axum::http::{Method, StatusCode};
use ed25519_dalek::SigningKey;
use etcd_client::WatchOptions;
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
