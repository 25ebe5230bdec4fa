//! Signed requests against a gateway on real etcd: principals through the admin API, signatures
//! in gRPC metadata, verification before the policy, approval weights by distinct principals.

use std::time::Duration;

use aq_host::client::SignedClient;
use aq_host::trust::{Envelope, KeySignature, SignedRequest, request_digest};
use aq_sdk as m;
use aq_tests::etcd::TestGateway;
use axum::http::{Method, StatusCode};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};

fn public(key: &SigningKey) -> String {
    key.verifying_key().as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

struct Keys {
    alice: SigningKey,
    alice_laptop: SigningKey,
    bob: SigningKey,
    carol: SigningKey,
    mallory: SigningKey,
}

/// alice (two keys) and bob may write secrets; carol has no role; mallory is unknown.
async fn principals(gw: &TestGateway) -> Keys {
    let keys = Keys {
        alice: SigningKey::from_bytes(&[1; 32]),
        alice_laptop: SigningKey::from_bytes(&[2; 32]),
        bob: SigningKey::from_bytes(&[3; 32]),
        carol: SigningKey::from_bytes(&[4; 32]),
        mallory: SigningKey::from_bytes(&[5; 32]),
    };
    for (id, ks, roles) in [
        ("alice", vec![&keys.alice, &keys.alice_laptop], vec!["secret-writer"]),
        ("bob", vec![&keys.bob], vec!["secret-writer"]),
        ("carol", vec![&keys.carol], vec![]),
    ] {
        let body = json!({ "id": id, "keys": ks.iter().map(|k| public(k)).collect::<Vec<_>>(), "roles": roles });
        let (status, answer) = gw.admin(Method::POST, "/v1/principals", body).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    keys
}

async fn client(gw: &TestGateway, keys: &[&SigningKey]) -> SignedClient {
    SignedClient::connect(&gw.endpoint(), keys.iter().map(|k| (*k).clone()).collect()).await.unwrap()
}

fn status_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Status {
    result.expect_err("refused")
}

const SECRET: &[u8] = b"/registry/secrets/default/db";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_need_a_signature_by_a_principal_with_the_role() {
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;

    let (ok, _, err) = gw.etcdctl(&["put", "/registry/secrets/default/db", "s3cr3t"]);
    assert!(!ok);
    assert!(err.contains("need a verified credential with role secret-writer (the request is unsigned)"), "{err}");

    let alice = client(&gw, &[&keys.alice]).await;
    alice.put("secrets", SECRET, b"s3cr3t").await.expect("alice holds the role");
    let mut direct = gw.main.client().await;
    let stored = direct.get(SECRET, None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"s3cr3t");

    let carol = client(&gw, &[&keys.carol]).await;
    let refused = status_of(carol.put("secrets", SECRET, b"mine").await);
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("signers carol lack it"), "{}", refused.message());

    // The decision log names the verified principal.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = gw.decisions();
        if let Some(line) = lines.iter().find(|l| l["scope"] == "secrets" && l["verdict"] == "allow") {
            assert_eq!(line["principals"], json!(["alice"]));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no allow line in {lines:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Signs `value` for `key` in `scope` by `key_pair`, valid until `not_after`.
fn signed_at(cluster_id: u64, scope: &str, key: &[u8], value: &[u8], by: &SigningKey, nonce: u8, not_after: u64) -> SignedRequest {
    let op = m::Op::Put(m::PutOp { key: m::Bytes(key.to_vec()), value: m::Bytes(value.to_vec()), ..Default::default() });
    let envelope = Envelope { cluster_id, scope: scope.into(), nonce: vec![nonce; 16], not_after };
    let digest = request_digest(&envelope, &[op], &[]);
    SignedRequest {
        nonce: envelope.nonce,
        not_after,
        signatures: vec![KeySignature { key: by.verifying_key().to_bytes(), signature: by.sign(&digest).to_bytes() }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_signatures_are_unauthenticated_and_say_why() {
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;
    let alice = client(&gw, &[&keys.alice]).await;
    let cluster = alice.cluster_id();
    let now = aq_host::clock::unix_now();
    let expect = |result: Result<_, tonic::Status>, says: &str| {
        let status = status_of(result);
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{says}: {}", status.message());
        assert!(status.message().contains(says), "expected {says:?} in {:?}", status.message());
    };

    // A key no principal has.
    let stranger = signed_at(cluster, "secrets", SECRET, b"v", &keys.mallory, 1, now + 60);
    expect(alice.put_presigned(SECRET, b"v", &stranger).await, "no principal has the public key");
    // alice's public key with mallory's signature: forged.
    let mut forged = signed_at(cluster, "secrets", SECRET, b"v", &keys.mallory, 2, now + 60);
    forged.signatures[0].key = keys.alice.verifying_key().to_bytes();
    expect(alice.put_presigned(SECRET, b"v", &forged).await, "signature by alice");
    // A real signature over other content: another value, another scope, another cluster.
    let other_value = signed_at(cluster, "secrets", SECRET, b"other", &keys.alice, 3, now + 60);
    expect(alice.put_presigned(SECRET, b"v", &other_value).await, "does not match this request");
    let other_scope = signed_at(cluster, "registry", SECRET, b"v", &keys.alice, 4, now + 60);
    expect(alice.put_presigned(SECRET, b"v", &other_scope).await, "for scope secrets");
    let other_cluster = signed_at(cluster + 1, "secrets", SECRET, b"v", &keys.alice, 5, now + 60);
    expect(alice.put_presigned(SECRET, b"v", &other_cluster).await, "does not match");
    // Expired, and valid for too long.
    let expired = signed_at(cluster, "secrets", SECRET, b"v", &keys.alice, 6, now - 5);
    expect(alice.put_presigned(SECRET, b"v", &expired).await, "expired");
    let too_long = signed_at(cluster, "secrets", SECRET, b"v", &keys.alice, 7, now + 24 * 3600);
    expect(alice.put_presigned(SECRET, b"v", &too_long).await, "shorter validity");
    // Nothing of the above was written.
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get(SECRET, None).await.unwrap().count(), 0);

    // A good signature is accepted once; the same request again is a replay.
    let good = signed_at(cluster, "secrets", SECRET, b"v", &keys.alice, 8, now + 60);
    alice.put_presigned(SECRET, b"v", &good).await.expect("accepted");
    expect(alice.put_presigned(SECRET, b"v", &good).await, "replayed");
    // A refused forgery does not use up the nonce of a later honest request.
    let mut burnt = signed_at(cluster, "secrets", SECRET, b"w", &keys.mallory, 9, now + 60);
    burnt.signatures[0].key = keys.alice.verifying_key().to_bytes();
    expect(alice.put_presigned(SECRET, b"w", &burnt).await, "does not match");
    let honest = signed_at(cluster, "secrets", SECRET, b"w", &keys.alice, 9, now + 60);
    alice.put_presigned(SECRET, b"w", &honest).await.expect("the nonce was not burnt by the forgery");

    // Malformed headers are named.
    let mut malformed = good.clone();
    malformed.signatures.clear();
    expect(alice.put_presigned(SECRET, b"v", &malformed).await, "aq-signature is missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn approval_weight_counts_each_principal_once() {
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;
    // secrets under critical with a two-approver rule.
    let critical = blake3::hash(aq_host::builtin::find("critical").unwrap().component).to_hex().to_string();
    let config = json!({
        "role": "secret-writer",
        "approval": { "voters": [{ "principal": "alice", "weight": 1 }, { "principal": "bob", "weight": 1 }], "threshold": 2, "expiry_seconds": 60 }
    });
    let (status, body) = gw.admin(Method::PUT, "/v1/scopes/secrets/policy", json!({ "digest": critical, "config": config })).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Two keys of alice: weight 1, just below the threshold.
    let alice_twice = client(&gw, &[&keys.alice, &keys.alice_laptop]).await;
    let refused = status_of(alice_twice.put("secrets", SECRET, b"v").await);
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("need approvals of weight 2") && refused.message().contains("(alice) weigh 1"), "{}", refused.message());
    // alice and bob: exactly the threshold; the write commits.
    let both = client(&gw, &[&keys.alice, &keys.bob]).await;
    both.put("secrets", SECRET, b"v").await.expect("weight 2 of 2");
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].value(), b"v");
    // carol's signature adds nothing: she is not a voter (and lacks the role).
    let with_carol = client(&gw, &[&keys.alice, &keys.carol]).await;
    assert_eq!(status_of(with_carol.put("secrets", SECRET, b"x").await).code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn principals_are_managed_through_the_admin_api_on_every_replica() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let keys = principals(&gw).await;
    let (status, body) = gw.admin(Method::GET, "/v1/principals", json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = body["principals"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    // Each replica registered itself as an anchor.
    let (anchors, people): (Vec<&str>, Vec<&str>) = ids.into_iter().partition(|id| id.starts_with("anchor:"));
    assert_eq!(people, ["alice", "bob", "carol"]);
    let mut expected = vec![gw.running.anchor.as_str(), replica.running.anchor.as_str()];
    expected.sort();
    assert_eq!(anchors, expected);
    let (status, body) = gw.admin(Method::POST, "/v1/principals", json!({ "id": "dave", "keys": ["abcd"] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = gw.admin(Method::POST, "/v1/principals", json!({ "id": "a/b", "keys": [public(&keys.carol)] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The second replica learns the principals from the meta group.
    let on_replica = SignedClient::connect(&replica.running.addr.to_string(), vec![keys.bob.clone()]).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while on_replica.put("secrets", SECRET, b"from the replica").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the replica never accepted bob's signature");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Removing bob makes his key unknown, on the replica too.
    let (status, _) = gw.admin(Method::DELETE, "/v1/principals/bob", json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    let bob = client(&gw, &[&keys.bob]).await;
    let refused = status_of(bob.put("secrets", SECRET, b"v").await);
    assert!(refused.message().contains("no principal has the public key"), "{}", refused.message());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match on_replica.put("secrets", SECRET, b"again").await {
            Err(status) if status.code() == tonic::Code::Unauthenticated => break,
            _ => assert!(std::time::Instant::now() < deadline, "the replica still accepts bob"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _) = gw.admin(Method::DELETE, "/v1/principals/bob", json!(null)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Binds `critical` to secrets with a rule: alice and bob, weight 1 each, threshold 2.
async fn two_approvers(gw: &TestGateway, expiry_seconds: u64) {
    let critical = blake3::hash(aq_host::builtin::find("critical").unwrap().component).to_hex().to_string();
    let config = json!({
        "role": "secret-writer",
        "approval": {
            "voters": [{ "principal": "alice", "weight": 1 }, { "principal": "bob", "weight": 1 }],
            "threshold": 2,
            "expiry_seconds": expiry_seconds
        }
    });
    let (status, body) = gw.admin(Method::PUT, "/v1/scopes/secrets/policy", json!({ "digest": critical, "config": config })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The proposal id in a refusal's message.
fn proposal_id(status: &tonic::Status) -> String {
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{}", status.message());
    let at = status.message().find("proposal ").unwrap_or_else(|| panic!("no proposal in {}", status.message()));
    status.message()[at + 9..at + 25].to_string()
}

/// Signs a proposal's digest, after checking it is the digest of the write we expect.
fn approval(proposal: &Value, by: &SigningKey, value: &[u8]) -> Value {
    let op = m::Op::Put(m::PutOp { key: m::Bytes(SECRET.to_vec()), value: m::Bytes(value.to_vec()), ..Default::default() });
    let digest = aq_host::trust::proposal::Proposal::approval_digest(
        proposal["cluster_id"].as_u64().unwrap(),
        "secrets",
        proposal["id"].as_str().unwrap(),
        proposal["expires_at"].as_u64().unwrap(),
        &[op],
        &[],
    );
    assert_eq!(proposal["approval_digest"], hex(&digest), "the digest covers exactly the proposed write");
    json!({ "key": public(by), "signature": hex(&by.sign(&digest).to_bytes()) })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proposal_commits_at_the_threshold_and_only_voters_count() {
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;
    two_approvers(&gw, 300).await;
    let alice = client(&gw, &[&keys.alice]).await;
    let id = proposal_id(&status_of(alice.put("secrets", SECRET, b"approved").await));
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get(SECRET, None).await.unwrap().count(), 0, "nothing written before approval");

    let path = format!("/v1/proposals/{id}");
    let (status, proposal) = gw.admin(Method::GET, &path, json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proposal["state"], "pending");
    assert_eq!(proposal["approvals"][0]["principal"], "alice", "the signer is the first approval");
    assert_eq!(proposal["keys"], json!(["/registry/secrets/default/db"]));
    let (_, listed) = gw.admin(Method::GET, "/v1/proposals", json!(null)).await;
    assert_eq!(listed["proposals"][0]["id"], id.as_str());

    let approve = format!("{path}/approve");
    // carol is not a voter; mallory is nobody; a signature over something else is refused.
    let (status, body) = gw.admin(Method::POST, &approve, approval(&proposal, &keys.carol, b"approved")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("not a voter"), "{body}");
    let (status, _) = gw.admin(Method::POST, &approve, approval(&proposal, &keys.mallory, b"approved")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut wrong = approval(&proposal, &keys.bob, b"approved");
    wrong["signature"] = json!(hex(&keys.bob.sign(b"something else").to_bytes()));
    let (status, body) = gw.admin(Method::POST, &approve, wrong).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // alice approving again (with her other key) adds nothing.
    let (status, body) = gw.admin(Method::POST, &approve, approval(&proposal, &keys.alice_laptop, b"approved")).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("pending")), "{body}");
    assert_eq!(direct.get(SECRET, None).await.unwrap().count(), 0);

    // bob brings it to the threshold: committed.
    let (status, body) = gw.admin(Method::POST, &approve, approval(&proposal, &keys.bob, b"approved")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "committed", "{body}");
    let stored = direct.get(SECRET, None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"approved");
    assert_eq!(Some(stored.kvs()[0].mod_revision()), body["committed_revision"].as_i64());
    let (status, _) = gw.admin(Method::POST, &approve, approval(&proposal, &keys.bob, b"approved")).await;
    assert_eq!(status, StatusCode::CONFLICT, "a committed proposal takes no approvals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_client_gets_the_commit_and_a_moved_key_voids_a_proposal() {
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;
    two_approvers(&gw, 300).await;

    // The client waits (aq-wait) while bob approves.
    let waiting = client(&gw, &[&keys.alice]).await.with_wait(Duration::from_secs(20));
    let put = tokio::spawn(async move { waiting.put("secrets", SECRET, b"waited").await });
    let proposal = loop {
        let (_, listed) = gw.admin(Method::GET, "/v1/proposals", json!(null)).await;
        if let Some(p) = listed["proposals"].as_array().unwrap().iter().find(|p| p["state"] == "pending") {
            break p.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let path = format!("/v1/proposals/{}/approve", proposal["id"].as_str().unwrap());
    let (status, body) = gw.admin(Method::POST, &path, approval(&proposal, &keys.bob, b"waited")).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("committed")), "{body}");
    let answer = put.await.unwrap().expect("the waiting put gets the commit");
    assert_eq!(answer.header.unwrap().revision, body["committed_revision"].as_i64().unwrap());

    // A proposal whose key changes before it is approved is void, and writes nothing.
    let alice = client(&gw, &[&keys.alice]).await;
    let id = proposal_id(&status_of(alice.put("secrets", SECRET, b"stale").await));
    let both = client(&gw, &[&keys.alice, &keys.bob]).await;
    both.put("secrets", SECRET, b"newer").await.expect("two signatures commit at once");
    let (_, proposal) = gw.admin(Method::GET, &format!("/v1/proposals/{id}"), json!(null)).await;
    let (status, body) =
        gw.admin(Method::POST, &format!("/v1/proposals/{id}/approve"), approval(&proposal, &keys.bob, b"stale")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "void", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("changed after revision"), "{body}");
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].value(), b"newer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_and_rejected_proposals_take_no_approvals_and_are_kept() {
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;
    two_approvers(&gw, 1).await;
    let alice = client(&gw, &[&keys.alice]).await;
    let expiring = proposal_id(&status_of(alice.put("secrets", SECRET, b"late").await));
    two_approvers(&gw, 300).await;
    let rejected = proposal_id(&status_of(alice.put("secrets", SECRET, b"refused").await));

    let (status, body) = gw.admin(Method::POST, &format!("/v1/proposals/{rejected}/reject"), json!({ "reason": "not today" })).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("rejected")), "{body}");
    let (_, proposal) = gw.admin(Method::GET, &format!("/v1/proposals/{rejected}"), json!(null)).await;
    let (status, body) =
        gw.admin(Method::POST, &format!("/v1/proposals/{rejected}/approve"), approval(&proposal, &keys.bob, b"refused")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("not today"), "{body}");

    // The one-second proposal expires; approving it then is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let proposal = loop {
        let (_, proposal) = gw.admin(Method::GET, &format!("/v1/proposals/{expiring}"), json!(null)).await;
        if proposal["state"] == "expired" {
            break proposal;
        }
        assert!(std::time::Instant::now() < deadline, "never expired: {proposal}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, _) =
        gw.admin(Method::POST, &format!("/v1/proposals/{expiring}/approve"), approval(&proposal, &keys.bob, b"late")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, listed) = gw.admin(Method::GET, "/v1/proposals", json!(null)).await;
    let states: Vec<&str> = listed["proposals"].as_array().unwrap().iter().map(|p| p["state"].as_str().unwrap()).collect();
    assert!(states.contains(&"expired") && states.contains(&"rejected"), "kept for audit: {states:?}");
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get(SECRET, None).await.unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_through_another_replica_is_refused_and_expired_nonces_are_swept() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let keys = principals(&gw).await;
    let on_a = client(&gw, &[&keys.alice]).await;
    let on_b = SignedClient::connect(&replica.running.addr.to_string(), vec![keys.alice.clone()]).await.unwrap();
    // The replica knows alice once it has followed the meta group.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while on_b.put("secrets", SECRET, b"warm-up").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the replica never accepted alice");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let now = aq_host::clock::unix_now();
    let signed = signed_at(on_a.cluster_id(), "secrets", SECRET, b"once", &keys.alice, 42, now + 60);
    on_a.put_presigned(SECRET, b"once", &signed).await.expect("first use");
    let replayed = status_of(on_b.put_presigned(SECRET, b"once", &signed).await);
    assert_eq!(replayed.code(), tonic::Code::Unauthenticated, "{}", replayed.message());
    assert!(replayed.message().contains("replayed"), "{}", replayed.message());
    // The nonce's record stays in etcd until its signature expires; the write was not repeated.
    let mut direct = gw.main.client().await;
    let live = nonce_record(now + 60, &[42; 16]);
    assert_eq!(direct.get(live.clone(), None).await.unwrap().count(), 1);
    let mod_revision = direct.get(SECRET, None).await.unwrap().kvs()[0].mod_revision();
    let again = status_of(on_a.put_presigned(SECRET, b"once", &signed).await);
    assert!(again.message().contains("replayed"));
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].mod_revision(), mod_revision);

    // A sweep deletes the records of expired signatures and keeps the rest.
    let expired = nonce_record(now - 1, &[7; 16]);
    direct.put(expired.clone(), "", None).await.unwrap();
    gw.running.gateway.sweep_nonces().await;
    assert_eq!(direct.get(expired, None).await.unwrap().count(), 0, "an expired nonce is swept");
    assert_eq!(direct.get(live, None).await.unwrap().count(), 1, "a live nonce is kept");
}

/// The reserved key recording a signed write's nonce: ordered by the signature's expiry.
fn nonce_record(not_after: u64, nonce: &[u8]) -> Vec<u8> {
    let mut key = b"\xffaq/nonce/".to_vec();
    key.extend_from_slice(format!("{not_after:020}/{}", hex(nonce)).as_bytes());
    key
}

/// Waits until `gateway` knows principal `id` and enforces a secrets binding whose config
/// mentions `needle`.
async fn until_following(gateway: &aq_host::gate::Gateway, id: &str, needle: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let knows = gateway.trust().principals_by_id().contains_key(id);
        let bound = gateway.registry().active("secrets").is_some_and(|b| b.config.contains(needle));
        if knows && bound {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the replica never followed the meta group");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The newest lineage record of scope `secrets`, straight from etcd.
async fn last_secret_record(gw: &TestGateway) -> Value {
    let mut direct = gw.main.client().await;
    let prefix = b"\xffaq/lineage/secrets/".to_vec();
    let options = etcd_client::GetOptions::new().with_prefix().with_sort(etcd_client::SortTarget::Mod, etcd_client::SortOrder::Descend).with_limit(1);
    let found = direct.get(prefix, Some(options)).await.unwrap();
    serde_json::from_slice(found.kvs()[0].value()).expect("a lineage record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_needing_two_anchors_commits_with_two_replicas_and_is_refused_with_one() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let (a, b) = (gw.running.anchor.clone(), replica.running.anchor.clone());
    assert!(a.starts_with("anchor:aq-") && b.starts_with("anchor:aq-") && a != b, "{a} {b}");
    let (_, listed) = gw.admin(Method::GET, "/v1/principals", json!(null)).await;
    for anchor in [&a, &b] {
        let found = listed["principals"].as_array().unwrap().iter().find(|p| p["id"] == anchor.as_str());
        assert_eq!(found.map(|p| &p["roles"]), Some(&json!(["anchor"])), "{anchor} registered: {listed}");
    }
    let keys = principals(&gw).await;
    let critical = blake3::hash(aq_host::builtin::find("critical").unwrap().component).to_hex().to_string();
    let config = json!({
        "role": "secret-writer",
        "approval": { "voters": [{ "principal": a, "weight": 1 }, { "principal": b, "weight": 1 }], "threshold": 2 }
    });
    let (status, body) = gw.admin(Method::PUT, "/v1/scopes/secrets/policy", json!({ "digest": critical, "config": config })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    until_following(&replica.running.gateway, "alice", &b).await;

    // Through either replica, alice's signed write gathers both anchors and commits at once.
    let mut direct = gw.main.client().await;
    let on_a = client(&gw, &[&keys.alice]).await;
    on_a.put("secrets", SECRET, b"anchored-a").await.expect("both anchors co-sign");
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].value(), b"anchored-a");
    let record = last_secret_record(&gw).await;
    assert_eq!(record["principals"], json!(["alice", a, b]), "{record}");
    let on_b = SignedClient::connect(&replica.running.addr.to_string(), vec![keys.alice.clone()]).await.unwrap();
    on_b.put("secrets", SECRET, b"anchored-b").await.expect("both anchors co-sign through the replica");
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].value(), b"anchored-b");
    assert_eq!(last_secret_record(&gw).await["principals"], json!(["alice", b, a]));

    // A peer co-signs only for anchors, and only requests its own policy supports.
    let (status, body) = gw.admin(Method::POST, "/v1/anchors/cosign", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no anchor header: {body}");
    // An unsigned write: the peer evaluates it itself and its policy denies it.
    let op = etcd_client::proto::PbTxnRequestOp {
        request: Some(etcd_client::proto::PbTxnOpRequest::RequestPut(etcd_client::proto::PbPutRequest {
            key: SECRET.to_vec(),
            value: b"sneaky".to_vec(),
            ..Default::default()
        })),
    };
    let call = json!({
        "scope": "secrets",
        "request": hex(&prost::Message::encode_to_vec(&op)),
        "nonce": hex(&[9; 16]),
        "not_after": aq_host::clock::unix_now() + 20,
        "client": null
    });
    let body = serde_json::to_vec(&call).unwrap();
    let b_key = aq_host::trust::load_or_create_key(&replica.data_dir().join("identity.key")).unwrap();
    let b_identity = aq_host::trust::anchor::Identity::new(Some(b.trim_start_matches("anchor:")), b_key).unwrap();
    let alice_identity = aq_host::trust::anchor::Identity::new(Some("alice"), keys.alice.clone()).unwrap();
    for (header, needle) in
        [(alice_identity.call_header(&body), "not an anchor"), (b_identity.call_header(b"other"), "does not match"), (b_identity.call_header(&body), "denies")]
    {
        let request = axum::http::Request::post("/v1/anchors/cosign").header("aq-anchor", header).body(axum::body::Body::from(body.clone())).unwrap();
        let response = tower::ServiceExt::oneshot(aq_host::admin::router(gw.running.admin.clone()), request).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let text = String::from_utf8(axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
        assert!(text.contains(needle), "{needle}: {text}");
    }

    // With the replica gone, anchor b cannot co-sign: the write is refused, not proposed.
    replica.running.stop().await;
    let refused = status_of(on_a.put("secrets", SECRET, b"one-anchor").await);
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{}", refused.message());
    assert!(refused.message().contains(&format!("no co-signature from {b}")), "{}", refused.message());
    assert!(!refused.message().contains("is proposal"), "{}", refused.message());
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].value(), b"anchored-b", "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_commit_is_finished_once_by_any_replica() {
    use aq_host::trust::proposal::{Approval, ProposalState};
    let gw = TestGateway::start().await;
    let keys = principals(&gw).await;
    two_approvers(&gw, 300).await;
    let store = gw.running.syncer.store().clone();
    let mut direct = gw.main.client().await;
    let alice = client(&gw, &[&keys.alice]).await;
    let id = proposal_id(&status_of(alice.put("secrets", SECRET, b"interrupted").await));

    // As if a replica claimed the commit at bob's approval and stopped before writing.
    let claim = |age: u64| {
        let store = store.clone();
        let id = id.clone();
        let bob = keys.bob.clone();
        async move {
            let (mut proposal, revision) = store.proposal(&id).await.unwrap().unwrap();
            let shown = serde_json::to_value(&proposal).unwrap();
            if !proposal.approvals.iter().any(|a| a.principal == "bob") {
                let signed = approval(&shown, &bob, b"interrupted");
                let (key, signature) = (signed["key"].as_str().unwrap(), signed["signature"].as_str().unwrap());
                let at = aq_host::clock::unix_now();
                proposal.approvals.push(Approval { principal: "bob".into(), key: key.into(), signature: signature.into(), at });
            }
            proposal.state = ProposalState::Committing;
            proposal.committed_revision = None;
            proposal.response = None;
            proposal.claimed_at = Some(aq_host::clock::unix_now() - age);
            store.write_proposal(&proposal, revision).await.unwrap();
        }
    };
    let path = format!("/v1/proposals/{id}");
    let state = || gw.admin(Method::GET, &path, json!(null));

    // A fresh claim is left to its claimer.
    claim(0).await;
    gw.running.gateway.recover_proposals().await;
    assert_eq!(state().await.1["state"], "committing");
    assert_eq!(direct.get(SECRET, None).await.unwrap().count(), 0, "nothing written yet");

    // A stale one is finished: written once, with its lineage record, and recorded.
    claim(120).await;
    gw.running.gateway.recover_proposals().await;
    let finished = state().await.1;
    assert_eq!(finished["state"], "committed", "{finished}");
    let stored = direct.get(SECRET, None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"interrupted");
    let revision = stored.kvs()[0].mod_revision();
    assert_eq!(finished["committed_revision"].as_i64(), Some(revision));
    assert_eq!(last_secret_record(&gw).await["proposal"], id.as_str());

    // As if the claimer wrote and stopped before recording it: the marker tells, and the
    // write is not repeated.
    claim(120).await;
    gw.running.gateway.recover_proposals().await;
    let again = state().await.1;
    assert_eq!((&again["state"], again["committed_revision"].as_i64()), (&json!("committed"), Some(revision)), "{again}");
    assert_eq!(direct.get(SECRET, None).await.unwrap().kvs()[0].mod_revision(), revision, "written once");
}
