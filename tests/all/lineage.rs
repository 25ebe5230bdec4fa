//! Lineage against real etcd: records written with governed writes, exports that verify, and
//! tampering done directly in etcd that verification catches and names.

use aq_host::lineage::log::{Export, check_proof, verify};
use aq_tests::etcd::TestGateway;
use aq_tests::guests;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

/// aq with the example policy (digest lineage) on `registry`, and three writes there.
async fn governed_writes() -> TestGateway {
    let gw = TestGateway::start().await;
    let (status, body) = gw.admin_bytes(Method::POST, "/v1/policies", guests::bytes(guests::EXAMPLE_DENY_PREFIX)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let digest = blake3::hash(&guests::bytes(guests::EXAMPLE_DENY_PREFIX)).to_hex().to_string();
    let (status, body) =
        gw.admin(Method::PUT, "/v1/scopes/registry/policy", json!({ "digest": digest, "config": { "read_only": ["/registry/ro/"] } })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut client = gw.client().await;
    for (key, value) in [("/registry/pods/a", "one"), ("/registry/pods/b", "two"), ("/registry/pods/a", "three")] {
        client.put(key, value, None).await.unwrap();
    }
    client.delete("/registry/pods/b", None).await.unwrap();
    client.put("/elsewhere", "open scopes keep no lineage", None).await.unwrap();
    gw
}

async fn export(gw: &TestGateway, scope: &str) -> Export {
    let (status, body) = gw.admin(Method::GET, &format!("/v1/lineage/{scope}/export"), Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

/// The etcd key of an exported record.
fn key_of(scope: &str, record: &aq_host::lineage::log::ExportedRecord) -> Vec<u8> {
    aq_host::lineage::record_key(scope, &record.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn governed_writes_leave_records_that_verify_and_open_scopes_leave_none() {
    let gw = governed_writes().await;
    let exported = export(&gw, "registry").await;
    assert_eq!(exported.records.len(), 4, "three puts and a delete");
    let records: Vec<Value> = exported.records.iter().map(|r| serde_json::from_str(&r.record).unwrap()).collect();
    assert_eq!(records[0]["ops"][0]["op"], "put");
    assert_eq!(records[0]["ops"][0]["key"], hex("/registry/pods/a"));
    assert_eq!(records[0]["ops"][0]["value_blake3"], blake3::hash(b"one").to_hex().as_str());
    assert_eq!(records[3]["ops"][0]["op"], "delete");
    // In revision order, each with a revision of its own, written once, under its own id.
    assert!(exported.records.windows(2).all(|w| w[0].revision < w[1].revision), "{:?}", exported.records);
    assert!(exported.records.iter().all(|r| r.version == 1));
    assert!(records.iter().zip(&exported.records).all(|(parsed, r)| parsed["id"] == r.id.as_str()));
    assert!(!exported.records.iter().any(|r| r.record.contains("one\"") || r.record.contains("three")), "values never appear");
    // The scope's keys as they stand, each last written by a recorded write.
    let writes: Vec<(String, i64)> = exported.writes.iter().map(|w| (w.key.clone(), w.revision)).collect();
    assert_eq!(writes, vec![(hex("/registry/pods/a"), exported.records[2].revision)], "b was deleted; /elsewhere is another scope's");
    let verified = verify(&exported, &[]).expect("a clean export verifies");
    assert_eq!(verified.records, 4);
    assert!(verified.checkpoints >= 1);

    // Pinned to this replica's identity key it verifies; pinned to another it does not.
    let identity = std::fs::read_to_string(gw.data_dir().join("identity.key")).unwrap();
    let identity = ed25519_dalek::SigningKey::from_bytes(&hex_bytes(identity.trim()).try_into().unwrap());
    verify(&exported, &[identity.verifying_key()]).expect("signed by this replica");
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    assert!(verify(&exported, &[stranger]).unwrap_err().message.contains("not trusted"));

    // The open catch-all scope keeps none.
    assert!(export(&gw, "catch-all").await.records.is_empty());

    // Inclusion proofs check against the log's root.
    let (status, proof) = gw.admin(Method::GET, "/v1/lineage/registry/proof/2", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{proof}");
    let leaf = proof["record"].as_str().unwrap().as_bytes();
    check_proof(leaf, 2, 4, proof["root"].as_str().unwrap(), proof["proof"].as_str().unwrap()).expect("the proof verifies");
    assert_eq!(proof["root"], exported.checkpoints.last().unwrap().root, "the root the export's last checkpoint signed");
    assert!(check_proof(b"another record", 2, 4, proof["root"].as_str().unwrap(), proof["proof"].as_str().unwrap()).is_err());
    let (status, _) = gw.admin(Method::GET, "/v1/lineage/registry/proof/4", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edits_deletions_and_rewrites_in_etcd_are_caught_and_named() {
    let gw = governed_writes().await;
    // A checkpoint covers the four records before anyone touches them.
    let clean = export(&gw, "registry").await;
    verify(&clean, &[]).unwrap();
    let mut direct = gw.main.client().await;

    // An edited record: written a second time, which aq never does.
    let original = clean.records[1].record.clone();
    let edited = original.replace(blake3::hash(b"two").to_hex().as_str(), blake3::hash(b"forged").to_hex().as_str());
    assert_ne!(edited, original);
    direct.put(key_of("registry", &clean.records[1]), edited, None).await.unwrap();
    let error = verify(&export(&gw, "registry").await, &[]).unwrap_err();
    assert!(error.message.contains(&clean.records[1].id) && error.message.contains("altered"), "{error}");
    // Restored to its old bytes, it is still a record written again.
    direct.put(key_of("registry", &clean.records[1]), original.clone(), None).await.unwrap();
    let error = verify(&export(&gw, "registry").await, &[]).unwrap_err();
    assert!(error.message.contains("written 3 times"), "{error}");

    // A deleted record: the checkpoint signed more records up to its revision than remain.
    let gw = governed_writes().await;
    let clean = export(&gw, "registry").await;
    verify(&clean, &[]).unwrap();
    let mut direct = gw.main.client().await;
    direct.delete(key_of("registry", &clean.records[2]), None).await.unwrap();
    let error = verify(&export(&gw, "registry").await, &[]).unwrap_err();
    assert!(error.message.contains("missing") && error.message.contains("3 remain"), "{error}");

    // Deleted and written again (once, as new): it moved past the checkpoint.
    direct.put(key_of("registry", &clean.records[2]), clean.records[2].record.clone(), None).await.unwrap();
    let moved = export(&gw, "registry").await;
    assert_eq!(moved.records.last().unwrap().id, clean.records[2].id, "now the latest record");
    let error = verify(&moved, &[]).unwrap_err();
    assert!(error.message.contains("missing"), "{error}");

    // A write around aq (etcd's root needs no role): its revision has no record.
    let gw = governed_writes().await;
    verify(&export(&gw, "registry").await, &[]).unwrap();
    let mut direct = gw.main.client().await;
    direct.put("/registry/pods/c", "around aq", None).await.unwrap();
    let error = verify(&export(&gw, "registry").await, &[]).unwrap_err();
    assert!(error.message.contains("unrecorded write") && error.message.contains("/registry/pods/c"), "{error}");
    // A nested scope's keys are its own log's business, not registry's.
    direct.put("/registry/events/ns/e", "around aq too", None).await.unwrap();
    let events = export(&gw, "events").await;
    assert!(events.records.is_empty() && verify(&events, &[]).is_ok(), "a scope without lineage has nothing to judge");
    assert!(!export(&gw, "registry").await.writes.iter().any(|w| w.key == hex("/registry/events/ns/e")));

    // An export edited after the fact: the signed root betrays it.
    let mut tampered = clean.clone();
    let forged = tampered.records[3].record.replace("\"level\":\"digest\"", "\"level\":\"full\"");
    assert_ne!(forged, tampered.records[3].record);
    tampered.records[3].record = forged;
    let error = verify(&tampered, &[]).unwrap_err();
    assert!(error.message.contains("altered"), "{error}");
    assert_eq!(error.record, Some(0), "the first checkpoint covers records 0 to 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_swaps_are_recorded_in_the_meta_log_in_the_same_txn() {
    let gw = governed_writes().await;
    let (status, body) = gw.admin(Method::POST, "/v1/scopes/registry/rollback", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let exported = export(&gw, "@meta").await;
    verify(&exported, &[]).expect("the meta log verifies");
    let all: Vec<Value> = exported.records.iter().map(|r| serde_json::from_str(&r.record).unwrap()).collect();
    // The layout seeded at first start, one swap per configured scope, then the bind and the
    // rollback.
    assert_eq!(all[0]["kind"], "layout_change", "{all:?}");
    let records: Vec<Value> = all[1..].to_vec();
    let layout_scopes = gw.running.gateway.routing().index().scopes().len();
    assert_eq!(records.len(), layout_scopes + 2, "{records:?}");
    let deny = blake3::hash(&guests::bytes(guests::EXAMPLE_DENY_PREFIX)).to_hex().to_string();
    let quota = blake3::hash(aq_host::builtin::find("quota").unwrap().component).to_hex().to_string();
    let swaps: Vec<(&str, &str)> = records[layout_scopes..]
        .iter()
        .map(|r| (r["subject"].as_str().unwrap(), r["policy"].as_str().unwrap()))
        .collect();
    assert_eq!(swaps, [("registry", deny.as_str()), ("registry", quota.as_str())]);
    assert!(records.iter().all(|r| r["kind"] == "policy_swap"));
    // A refused bind (the policy rejects the configuration) records nothing.
    let (status, _) = gw.admin(Method::PUT, "/v1/scopes/registry/policy", json!({ "digest": deny, "config": { "read_only": [""] } })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(export(&gw, "@meta").await.records.len(), layout_scopes + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_and_merges_are_recorded_in_the_meta_log_with_the_layout_they_make() {
    let gw = TestGateway::start().await;
    let (id, started) = gw.running.migrator.split("registry", b"/registry/services/", None, None).await.unwrap();
    assert!(started.is_none(), "split on its own group: a layout change alone");
    aq_tests::wait_until("the new scope is routed", || gw.running.gateway.routing().scope(&id).is_some()).await;
    assert_eq!(gw.running.migrator.merge(&id).await.unwrap(), ("registry".to_string(), None));
    aq_tests::wait_until("the merged scope is gone", || gw.running.gateway.routing().scope(&id).is_none()).await;

    let exported = export(&gw, "@meta").await;
    verify(&exported, &[]).expect("the meta log verifies");
    let changes: Vec<Value> = exported
        .records
        .iter()
        .map(|r| serde_json::from_str::<Value>(&r.record).unwrap())
        .filter(|r| r["kind"] == "layout_change")
        .map(|r| r["layout"].clone())
        .collect();
    assert_eq!(changes.len(), 3, "seeded, split, merged: {changes:?}");
    let epochs: Vec<u64> = changes.iter().map(|c| c["epoch"].as_u64().unwrap()).collect();
    assert!(epochs.windows(2).all(|w| w[1] == w[0] + 1), "one epoch each: {epochs:?}");
    let reason = |i: usize| changes[i]["reason"].as_str().unwrap().to_string();
    assert!(reason(1).contains(&format!("scope registry split at \"/registry/services/\": {id} takes the keys")), "{}", reason(1));
    assert!(reason(2).contains(&format!("scope {id} merged into registry")), "{}", reason(2));
    let scopes = |i: usize| changes[i]["scopes"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert!(scopes(1).contains(&format!("{id}@main")), "{:?}", scopes(1));
    assert!(!scopes(2).iter().any(|s| s.starts_with(&format!("{id}@"))), "{:?}", scopes(2));

    // A record edited in etcd is named by verify, as for any other record.
    let edited = exported.records.iter().find(|r| r.record.contains("\"layout_change\"")).unwrap();
    let key = key_of("@meta", edited);
    let tampered = edited.record.replace("registry", "r3gistry");
    gw.main.client().await.put(key, tampered, None).await.unwrap();
    let error = verify(&export(&gw, "@meta").await, &[]).unwrap_err();
    assert!(error.message.contains(&edited.id), "{}", error.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_through_two_replicas_form_one_log() {
    let gw = governed_writes().await;
    let replica = gw.replica().await;
    let deny = blake3::hash(&guests::bytes(guests::EXAMPLE_DENY_PREFIX)).to_hex().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while replica.running.gateway.registry().active("registry").unwrap().module.digest().to_hex() != deny {
        assert!(std::time::Instant::now() < deadline, "the replica never applied the binding");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // 12 writers on each replica; every third writer shares its keys with another.
    let endpoints = [gw.endpoint(), replica.running.addr.to_string()];
    let mut writers = Vec::new();
    for writer in 0..24 {
        let endpoint = endpoints[writer % 2].clone();
        writers.push(tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let mut written = Vec::new();
            for n in 0..15 {
                let key = format!("/registry/pods/w{}-{n}", if writer % 3 == 0 { 0 } else { writer });
                let value = format!("{writer}-{n}");
                client.put(key.as_str(), value.as_str(), None).await.expect("a governed put");
                written.push((hex(&key), blake3::hash(value.as_bytes()).to_hex().to_string()));
            }
            written
        }));
    }
    let mut written = Vec::new();
    for writer in writers {
        written.extend(writer.await.unwrap());
    }
    let exported = export(&gw, "registry").await;
    let verified = verify(&exported, &[]).expect("the log written concurrently verifies");
    assert_eq!(verified.records as usize, 4 + written.len(), "one record per write, none lost or doubled");
    let mut recorded: Vec<(String, String)> = exported.records[4..]
        .iter()
        .map(|r| {
            let record: Value = serde_json::from_str(&r.record).unwrap();
            let op = &record["ops"][0];
            (op["key"].as_str().unwrap().to_string(), op["value_blake3"].as_str().unwrap().to_string())
        })
        .collect();
    recorded.sort();
    written.sort();
    assert_eq!(recorded, written, "each record is its own write's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_cover_what_was_written_and_stop_at_a_rewritten_record() {
    let gw = governed_writes().await;
    let first = export(&gw, "registry").await;
    let signed = first.checkpoints.last().unwrap();
    assert_eq!((signed.size, signed.revision), (4, first.records[3].revision));
    let mut client = gw.client().await;
    client.put("/registry/pods/d", "five", None).await.unwrap();
    client.put("/registry/pods/e", "six", None).await.unwrap();
    let mut direct = gw.main.client().await;
    let prefix = aq_host::lineage::records_prefix("registry");
    let all = direct
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix().with_sort(etcd_client::SortTarget::Mod, etcd_client::SortOrder::Ascend)))
        .await
        .unwrap();
    let leaves: Vec<Vec<u8>> = all.kvs().iter().map(|kv| kv.value().to_vec()).collect();
    assert_eq!(leaves.len(), 6);

    // An old record deleted: the next checkpoint reads only what was written since the last
    // one, so it signs the log as written, and verification names the deletion.
    direct.delete(key_of("registry", &first.records[1]), None).await.unwrap();
    let second = export(&gw, "registry").await;
    let signed = second.checkpoints.last().unwrap();
    assert_eq!((signed.size, signed.root.as_str()), (6, aq_host::lineage::log::root_hex(&leaves).as_str()));
    let error = verify(&second, &[]).unwrap_err();
    assert!(error.message.contains("missing"), "{error}");

    // A record written again before it was checkpointed: nothing from it on is signed.
    client.put("/registry/pods/f", "seven", None).await.unwrap();
    client.put("/registry/pods/g", "eight", None).await.unwrap();
    let newest = direct
        .get(aq_host::lineage::records_prefix("registry"), Some(etcd_client::GetOptions::new().with_prefix().with_sort(etcd_client::SortTarget::Mod, etcd_client::SortOrder::Descend).with_limit(1)))
        .await
        .unwrap();
    let kv = &newest.kvs()[0];
    direct.put(kv.key().to_vec(), kv.value().to_vec(), None).await.unwrap();
    let (status, body) = gw.admin(Method::POST, "/v1/lineage/registry/checkpoint", Value::Null).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("was written 2 times"), "{body}");
    let third = export(&gw, "registry").await;
    assert!(third.checkpoints.last().unwrap().size <= 7, "no checkpoint past the rewritten record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_longer_than_a_page_are_checkpointed_and_exported_whole() {
    let gw = governed_writes().await;
    // More records than one range page (1,000) holds.
    let mut writers = Vec::new();
    for writer in 0..10 {
        let mut client = gw.client().await;
        writers.push(tokio::spawn(async move {
            for n in 0..110 {
                client.put(format!("/registry/pods/p{writer}-{n}"), "v", None).await.expect("a governed put");
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let exported = export(&gw, "registry").await;
    assert_eq!(exported.records.len(), 1104);
    assert_eq!(exported.checkpoints.last().unwrap().size, 1104, "the checkpoint covers every page");
    assert_eq!(verify(&exported, &[]).expect("a long log verifies").records, 1104);
}

/// Waits, up to 20 s, until a checkpoint of `scope` covering `size` records is stored.
async fn checkpointed(gw: &TestGateway, scope: &str, size: u64) -> aq_host::lineage::log::Checkpoint {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let stored = gw.running.syncer.store().checkpoints(scope).await.unwrap();
        if let Some(found) = stored.into_iter().find(|c| c.size == size) {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint of {size} records of {scope} within 20 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_checkpoint_grown_logs_by_themselves_from_their_watch() {
    let gw = governed_writes().await;
    // The background pass (every second here) signs the four records without being asked...
    let first = checkpointed(&gw, "registry", 4).await;
    // ...and later writes from what its watch of the log delivers.
    let mut client = gw.client().await;
    for key in ["/registry/pods/w1", "/registry/pods/w2", "/registry/pods/w3"] {
        client.put(key, "v", None).await.unwrap();
    }
    let later = checkpointed(&gw, "registry", 7).await;
    assert!(later.revision > first.revision);
    let exported = export(&gw, "registry").await;
    assert_eq!(exported.records[6].revision, later.revision, "it covers through the last record");
    verify(&exported, &[]).expect("the background checkpoints verify with the export");
}
