//! The Maintenance service through aq with scopes on two groups: alarms, defragment, status,
//! hash-kv and move-leader, with stock etcdctl and checked against each group's own etcd.

use aq_tests::etcd::TestGateway;
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, PutOptions};

/// A group's own status, asked of its etcd directly.
async fn status_of(etcd: &aq_tests::etcd::TestEtcd) -> etcd_client::StatusResponse {
    etcd.client().await.status().await.expect("the group's status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alarm_on_one_group_stops_only_its_scopes_and_etcdctl_disarms_it_through_aq() {
    let gw = TestGateway::start().await;
    let (ok, out, err) = gw.etcdctl(&["alarm", "list"]);
    assert!(ok && out.trim().is_empty(), "no alarm yet: {out}{err}");
    // Disarming an alarm no member has is a no-op, as in etcd.
    let mut client = gw.client().await;
    let disarmed = client.alarm(AlarmAction::Deactivate, AlarmType::None, Some(AlarmOptions::new())).await.expect("a no-op");
    assert!(disarmed.alarms().is_empty());

    // The events group runs out of space (its etcd raises NOSPACE for its member).
    let member = status_of(&gw.events).await.header().expect("a header").member_id();
    let mut options = AlarmOptions::new();
    options.with_member(member);
    gw.events.client().await.alarm(AlarmAction::Activate, AlarmType::Nospace, Some(options)).await.expect("an alarm");

    let (ok, out, err) = gw.etcdctl(&["alarm", "list"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), format!("memberID:{member} alarm:NOSPACE"), "the group's alarm, by its own member id");
    let (ok, out, _) = gw.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(ok && out.contains("group events: ") && out.contains("NOSPACE"), "status names the group with the alarm: {out}");

    let mut client = gw.client().await;
    let refused = client.put("/registry/events/ns/e1", "x", None).await.expect_err("the events group is out of space");
    assert!(refused.to_string().contains("database space exceeded"), "{refused}");
    client.put("/registry/pods/ns/p1", "x", None).await.expect("scopes on the main group still take writes");

    let (ok, out, err) = gw.etcdctl(&["alarm", "disarm"]);
    assert!(ok && out.contains("alarm:NOSPACE"), "{out}{err}");
    assert!(gw.etcdctl(&["alarm", "list"]).1.trim().is_empty());
    client.put("/registry/events/ns/e1", "x", None).await.expect("writes go through once disarmed");

    // Raising an alarm for a member no group has is refused with what to do.
    let mut options = AlarmOptions::new();
    options.with_member(12345);
    let unknown = client.alarm(AlarmAction::Activate, AlarmType::Nospace, Some(options)).await.expect_err("no such member");
    assert!(unknown.to_string().contains("no etcd group of aq has a member with id 3039"), "{unknown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_defrag_through_aq_defragments_every_group_and_status_sums_them() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    // Room to reclaim on both groups: written, deleted and compacted away.
    let lease = client.lease_grant(600, None).await.unwrap().id();
    let value = "v".repeat(8 * 1024);
    for i in 0..300 {
        client.put(format!("/registry/pods/ns/p{i:03}"), value.clone(), None).await.unwrap();
        client.put(format!("/registry/events/ns/e{i:03}"), value.clone(), Some(PutOptions::new().with_lease(lease))).await.unwrap();
    }
    client.delete("/registry/pods/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let deleted = client.delete("/registry/events/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.unwrap();
    let revision = deleted.header().unwrap().revision();
    client.compact(revision, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();

    let before = [status_of(&gw.main).await.db_size(), status_of(&gw.events).await.db_size()];
    let (ok, out, _) = gw.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(ok && out.contains(&format!("\"dbSize\":{}", before[0] + before[1])), "status sums the groups' sizes {before:?}: {out}");

    let (ok, out, err) = gw.etcdctl(&["defrag"]);
    assert!(ok && out.contains("Finished defragmenting etcd member"), "{out}{err}");
    let after = [status_of(&gw.main).await.db_size(), status_of(&gw.events).await.db_size()];
    assert!(after[0] < before[0] && after[1] < before[1], "each group shrank: {before:?} -> {after:?}");

    let (ok, _, err) = gw.etcdctl(&["move-leader", "1"]);
    assert!(!ok && err.contains("aq is not a Raft member"), "{err}");
    // Downgrade (etcd 3.5's call) is the groups' business too.
    let client = gw.client().await;
    let err = client
        .maintenance_client()
        .downgrade(etcd_client::DowngradeOptions::Validate("3.4.0".into()))
        .await
        .unwrap_err();
    let etcd_client::Error::GRpcStatus(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("downgrade each group's etcd"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hash_kv_covers_what_clients_read_and_agrees_across_replicas() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/a", "1", None).await.unwrap();
    client.put("/registry/events/ns/e", "1", None).await.unwrap();

    let hash_at = |endpoint: String| async move {
        let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
        client.hash_kv(0).await.unwrap().hash()
    };
    let first = hash_at(gw.endpoint()).await;
    assert_eq!(first, hash_at(replica.running.addr.to_string()).await, "two replicas hash one keyspace alike");

    // aq's own records (reserved keys) change without clients seeing it: the hash stays.
    gw.running.gateway.home().put(etcd_client::proto::PbPutRequest {
        key: b"\xffaq/meta/test-note".to_vec(),
        value: b"x".to_vec(),
        ..Default::default()
    })
    .await
    .expect("aq's own write");
    assert_eq!(hash_at(gw.endpoint()).await, first);

    // A client write on either group changes it, on both replicas.
    client.put("/registry/events/ns/e", "2", None).await.unwrap();
    let second = hash_at(gw.endpoint()).await;
    assert_ne!(second, first);
    assert_eq!(second, hash_at(replica.running.addr.to_string()).await);
    let (ok, out, err) = gw.etcdctl(&["endpoint", "hashkv"]);
    assert!(ok && out.contains(&format!(", {second}")), "{out}{err}");

    // The compaction reported is the one clients made (etcd's -1 before any).
    assert_eq!(client.hash_kv(0).await.unwrap().compact_version(), -1);
    let revision = client.put("/registry/pods/ns/a", "2", None).await.unwrap().header().unwrap().revision();
    client.compact(revision, None).await.unwrap();
    assert_eq!(client.hash_kv(0).await.unwrap().compact_version(), revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_snapshot_save_through_aq_writes_an_archive_of_both_groups_that_verifies() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/p", "on main", None).await.unwrap();
    client.put("/registry/events/ns/e", "on events", None).await.unwrap();
    let main_rev = status_of(&gw.main).await.header().unwrap().revision();
    let events_rev = status_of(&gw.events).await.header().unwrap().revision();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aq.snap");
    let (ok, out, err) = gw.etcdctl(&["snapshot", "save", path.to_str().unwrap()]);
    assert!(ok && out.contains("Snapshot saved at"), "{out}{err}");
    let manifest = aq_host::snapshot::verify(&path).expect("the archive verifies");
    let groups: Vec<(&str, i64, i64)> = manifest.groups.iter().map(|g| (g.name.as_str(), g.revision_from, g.revision_to)).collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_eq!(groups[0], ("events", events_rev, events_rev), "the quiet events group at the revision it had");
    // aq's own records (on main, the home group) may have moved main's revision since.
    assert_eq!(groups[1].0, "main");
    assert!(groups[1].1 >= main_rev && groups[1].2 >= groups[1].1, "{groups:?}");
    assert_eq!(manifest.home, "main");
    let layout = manifest.layout.as_ref().expect("the stored layout");
    assert!(layout.scopes.iter().any(|s| s.id == "events" && s.group == "events"));

    // Each group's file is that group's etcd snapshot: the key written through aq is in it.
    let archive = std::fs::read(&path).unwrap();
    let has = |needle: &[u8]| archive.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"/registry/events/ns/e") && has(b"/registry/pods/ns/p"));

    // A flipped byte in a group's snapshot is named by verify.
    let mut damaged = archive.clone();
    let at = damaged.windows(9).position(|w| w == b"on events").expect("the value is in the archive");
    damaged[at] ^= 0x20;
    std::fs::write(&path, &damaged).unwrap();
    let err = aq_host::snapshot::verify(&path).unwrap_err();
    assert!(err.contains("the archive is damaged"), "{err}");
}

/// The meta lineage log of a running aq, exported through its admin API.
async fn meta_log(running: &aq_host::serve::Running, data: &std::path::Path) -> aq_host::lineage::log::Export {
    use tower::ServiceExt;
    let token = std::fs::read_to_string(aq_host::serve::admin_token_path(data)).expect("the admin token");
    let request = axum::http::Request::builder()
        .uri("/v1/lineage/@meta/export")
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = aq_host::admin::router(running.admin.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), axum::http::StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    serde_json::from_slice(&bytes).expect("an export")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_restores_into_a_new_data_directory_with_every_key_and_revision() {
    let layout = aq_host::config::DEFAULT_LAYOUT;
    let (running, old) = aq_tests::etcd::serve_managed(layout).await;
    let log_before = meta_log(&running, old.path()).await;
    assert!(!log_before.records.is_empty(), "the bindings' records");
    let mut client = etcd_client::Client::connect([running.addr.to_string()], None).await.unwrap();
    let mut written = Vec::new();
    for key in ["/registry/pods/ns/a", "/registry/events/ns/e", "/other"] {
        let put = client.put(key, format!("value of {key}"), None).await.unwrap();
        written.push((key, put.header().unwrap().revision()));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backup.aqsnap");
    let mut stream = client.snapshot().await.unwrap();
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        bytes.extend_from_slice(message.blob());
    }
    std::fs::write(&path, &bytes).unwrap();
    let manifest = aq_host::snapshot::verify(&path).expect("the archive verifies");
    assert!(manifest.groups.iter().all(|g| g.credentials.is_some()), "managed groups carry their credentials");
    running.stop().await;

    let restored_dir = tempfile::tempdir().unwrap();
    let restored = aq_host::snapshot::restore(&path, restored_dir.path(), "etcdctl").expect("restores");
    assert_eq!(restored.managed, ["events", "main"]);
    let err = aq_host::snapshot::restore(&path, restored_dir.path(), "etcdctl").unwrap_err();
    assert!(err.contains("already holds etcd data"), "{err}");

    let config = aq_host::config::Config::parse(layout, "test layout").unwrap();
    let options = aq_tests::etcd::serve_options(restored_dir.path(), None);
    let again = aq_host::serve::start(config, options).await.expect("aq starts on the restored data");
    let mut client = etcd_client::Client::connect([again.addr.to_string()], None).await.unwrap();
    for (key, revision) in written {
        let got = client.get(key, None).await.unwrap();
        let kv = &got.kvs()[0];
        assert_eq!(kv.value_str().unwrap(), format!("value of {key}"));
        assert_eq!(kv.mod_revision(), revision, "{key} keeps its revision");
    }
    client.put("/registry/pods/ns/b", "after", None).await.expect("writes go on after the restore");
    // The lineage came back with the home group and still verifies, record for record.
    let log_after = meta_log(&again, restored_dir.path()).await;
    aq_host::lineage::log::verify(&log_after, &[]).expect("the restored meta log verifies");
    let ids = |log: &aq_host::lineage::log::Export| log.records.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&log_after)[..log_before.records.len()], ids(&log_before)[..]);
    again.stop().await;
}

/// What etcd answers over plain HTTP on its client port, aq answers on its etcd port: /health,
/// /version, and /metrics with every gRPC call counted by method and status code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_port_answers_health_version_and_metrics_over_http_as_etcd_does() {
    let mut gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/a", "v", None).await.unwrap();
    client.put("/registry/secrets/ns/s", "v", None).await.expect_err("an unsigned secret write is denied");
    let base = format!("http://{}", gw.endpoint());
    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            tokio::task::spawn_blocking(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let mut response = agent.get(&url).call().expect("the etcd port answers HTTP");
                (response.status().as_u16(), response.body_mut().read_to_string().unwrap())
            })
            .await
            .unwrap()
        }
    };
    let (status, health) = get("/health").await;
    assert_eq!((status, health.as_str()), (200, r#"{"health":"true","reason":""}"#));
    let (status, version) = get("/version").await;
    assert_eq!(status, 200);
    let version: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert_eq!(version["etcdserver"], aq_host::front::REPORTED_ETCD_VERSION);
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"grpc_server_handled_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put",grpc_code="OK"} 1"#,
        r#"grpc_server_handled_total{grpc_type="unary",grpc_service="etcdserverpb.KV",grpc_method="Put",grpc_code="PermissionDenied"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(metrics.contains("aq_policy_evaluations_total"), "aq's own metrics too");
    assert_eq!(metrics.matches("# EOF").count(), 1, "one exposition");

    // With a group down, /health says which.
    gw.events.stop();
    let (status, health) = get("/health").await;
    assert_eq!(status, 503);
    assert!(health.contains(r#""health":"false""#) && health.contains("group events does not answer"), "{health}");
}
