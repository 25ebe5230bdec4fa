//! Hot swap under load, across two aq replicas sharing one meta group.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use aq_tests::etcd::TestGateway;
use aq_tests::guests;
use serde_json::{Value, json};

const SWAPS: usize = 100;
const CLIENTS_PER_REPLICA: usize = 3;

/// What a client saw for one put.
#[derive(Debug, PartialEq)]
enum Outcome {
    Allowed,
    Denied,
}

/// Writes alternately a key the deny policy refuses and one every policy allows, until told
/// to stop; any failure other than a policy's deny fails the test.
async fn writer(endpoint: String, name: String, stop: Arc<AtomicBool>) -> Vec<(String, Outcome)> {
    let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
    let mut seen = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let area = if n % 2 == 0 { "ro" } else { "rw" };
        let key = format!("/registry/{area}/{name}/{n}");
        n += 1;
        match client.put(key.as_str(), "v", None).await {
            Ok(_) => seen.push((key, Outcome::Allowed)),
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::PermissionDenied && area == "ro" =>
            {
                assert!(status.message().contains("read-only prefix"), "{}", status.message());
                seen.push((key, Outcome::Denied));
            }
            Err(e) => panic!("{key}: only the deny policy may refuse a request, and only under /registry/ro/: {e}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn swaps_under_load_reach_every_replica_and_every_request_gets_one_version() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;

    let example = guests::bytes(guests::EXAMPLE_DENY_PREFIX);
    let (status, body) = gw.admin_bytes(Method::POST, "/v1/policies", example.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let deny = blake3::hash(&example).to_hex().to_string();
    let open = blake3::hash(aq_host::builtin::find("open").unwrap().component).to_hex().to_string();
    // The layout's own binding decides until the first swap.
    let quota = blake3::hash(aq_host::builtin::find("quota").unwrap().component).to_hex().to_string();
    let bodies = [
        serde_json::to_vec(&json!({ "digest": deny, "config": { "read_only": ["/registry/ro/"] } })).unwrap(),
        serde_json::to_vec(&json!({ "digest": open })).unwrap(),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (endpoint, side) in [(gw.endpoint(), "a"), (replica.running.addr.to_string(), "b")] {
        for i in 0..CLIENTS_PER_REPLICA {
            writers.push(tokio::spawn(writer(endpoint.clone(), format!("{side}{i}"), stop.clone())));
        }
    }

    let mut changes = replica.running.syncer.applied_changes();
    let mut propagation = Vec::with_capacity(SWAPS);
    for swap in 0..SWAPS {
        // From the operator's request until the other replica enforces the new binding.
        let sent = Instant::now();
        let (status, body) = gw.admin_bytes(Method::PUT, "/v1/scopes/registry/policy", bodies[swap % 2].clone()).await;
        assert_eq!(status, StatusCode::OK, "swap {swap}: {body}");
        let revision = body["revision"].as_i64().unwrap();
        tokio::time::timeout(Duration::from_secs(10), changes.wait_for(|applied| *applied >= revision))
            .await
            .unwrap_or_else(|_| panic!("the replica did not apply swap {swap} (revision {revision})"))
            .unwrap();
        propagation.push(sent.elapsed());
        let expected = if swap % 2 == 0 { &deny } else { &open };
        assert_eq!(&replica.running.gateway.registry().active("registry").unwrap().module.digest().to_hex(), expected);
        // Let some writes land on each binding.
        let floor = gw.running.gateway.metrics().routed_count("registry", "write") + 2;
        let deadline = Instant::now() + Duration::from_secs(30);
        while gw.running.gateway.metrics().routed_count("registry", "write") < floor {
            assert!(Instant::now() < deadline, "writes stopped landing after swap {swap}");
            assert!(!writers.iter().any(|w| w.is_finished()), "a writer ended early (it failed; see its panic)");
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for writer in writers {
        outcomes.extend(writer.await.unwrap());
    }

    // Every request was decided by exactly one policy version, and the decision log says which.
    let total = outcomes.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    let lines = loop {
        let mut lines = gw.decisions();
        lines.extend(
            std::fs::read_to_string(replica.data_dir().join("decisions.log"))
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
        lines.retain(|l| l["scope"] == "registry");
        if lines.len() >= total || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(lines.len(), total, "one decision line per request");
    let by_key: std::collections::HashMap<&str, &Value> = lines.iter().map(|l| (l["key"].as_str().unwrap(), l)).collect();
    assert_eq!(by_key.len(), total, "no request was decided twice");
    let (mut denied_by_deny, mut allowed_by_open) = (0, 0);
    for (key, outcome) in &outcomes {
        let line = by_key.get(key.as_str()).unwrap_or_else(|| panic!("no decision for {key}"));
        let verdict = line["verdict"].as_str().unwrap();
        let policy = line["policy"].as_str().unwrap();
        assert!(policy == deny || policy == open || policy == quota, "{line}");
        match outcome {
            Outcome::Denied => {
                assert_eq!((verdict, policy), ("deny", deny.as_str()), "{key}");
                denied_by_deny += 1;
            }
            Outcome::Allowed => {
                assert_eq!(verdict, "allow", "{key}");
                if key.starts_with("/registry/ro/") {
                    assert_ne!(policy, deny, "{key}: the deny policy never allows /registry/ro/");
                    allowed_by_open += usize::from(policy == open);
                }
            }
        }
    }
    assert!(denied_by_deny > 0 && allowed_by_open > 0, "both versions decided requests");
    for running in [&gw.running, &replica.running] {
        assert_eq!(running.gateway.metrics().guard_retries("registry"), 0);
    }
    assert_eq!(replica.running.gateway.metrics().swaps("registry"), SWAPS as u64);

    propagation.sort();
    let at = |p: f64| propagation[((propagation.len() - 1) as f64 * p).round() as usize];
    println!(
        "swap propagation to the second replica over {SWAPS} swaps under load ({total} writes): \
         p50 {:?}, p90 {:?}, max {:?}",
        at(0.5),
        at(0.9),
        at(1.0)
    );
}
