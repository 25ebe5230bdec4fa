//! The etcd-compatible gateway against real etcd processes: stock etcdctl, the Rust client
//! doing what kube-apiserver does, policy denials, scope boundaries, reserved keys and fencing.

use aq_tests::etcd::TestGateway;
use etcd_client::{Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_put_get_del_with_prev_kv_and_listing_options() {
    let gw = TestGateway::start().await;
    for (key, value) in [("/registry/pods/ns/b", "2"), ("/registry/pods/ns/a", "1"), ("/registry/pods/ns/c", "3")] {
        let (ok, out, err) = gw.etcdctl(&["put", key, value]);
        assert!(ok && out.trim() == "OK", "{out}{err}");
    }
    let (ok, out, _) = gw.etcdctl(&["put", "/registry/pods/ns/a", "1b", "--prev-kv"]);
    assert!(ok);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["OK", "/registry/pods/ns/a", "1"]);

    let (_, out, _) = gw.etcdctl(&["get", "/registry/pods/", "--prefix"]);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["/registry/pods/ns/a", "1b", "/registry/pods/ns/b", "2", "/registry/pods/ns/c", "3"]);
    let (_, out, _) = gw.etcdctl(&["get", "/registry/pods/", "--prefix", "--keys-only", "--limit=2"]);
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["/registry/pods/ns/a", "/registry/pods/ns/b"]);
    let (_, out, _) = gw.etcdctl(&["get", "/registry/pods/", "--prefix", "--sort-by=VALUE", "--order=DESCEND", "--print-value-only"]);
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["3", "2", "1b"]);
    let (_, out, _) = gw.etcdctl(&["get", "/registry/pods/", "--prefix", "--keys-only", "--limit=1", "-w", "json"]);
    assert!(out.contains("\"count\":3") && out.contains("\"more\":true"), "{out}");

    let (ok, out, _) = gw.etcdctl(&["del", "/registry/pods/ns/b", "--prev-kv"]);
    assert!(ok);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "/registry/pods/ns/b", "2"]);
    let (_, out, _) = gw.etcdctl(&["del", "/registry/pods/", "--prefix"]);
    assert_eq!(out.trim(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_txn_takes_both_branches() {
    let gw = TestGateway::start().await;
    gw.etcdctl(&["put", "/registry/configmaps/ns/flag", "on"]);
    let txn = |expected: &str| {
        format!(
            "value(\"/registry/configmaps/ns/flag\") = \"{expected}\"\n\nput /registry/configmaps/ns/result then\n\nput /registry/configmaps/ns/result else\n\n"
        )
    };
    let (ok, out, err) = gw.etcdctl_with_input(&["txn"], Some(&txn("on")));
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), ["SUCCESS", "", "OK"]);
    assert_eq!(gw.etcdctl(&["get", "/registry/configmaps/ns/result", "--print-value-only"]).1.trim(), "then");
    let (_, out, _) = gw.etcdctl_with_input(&["txn"], Some(&txn("off")));
    assert_eq!(out.lines().collect::<Vec<_>>(), ["FAILURE", "", "OK"]);
    assert_eq!(gw.etcdctl(&["get", "/registry/configmaps/ns/result", "--print-value-only"]).1.trim(), "else");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_endpoint_status_and_member_list_describe_aq() {
    let gw = TestGateway::start().await;
    let (ok, out, err) = gw.etcdctl(&["endpoint", "status", "-w", "fields"]);
    assert!(ok, "{err}");
    assert!(out.contains("\"Version\" : \"3.5.13\""), "{out}");
    let (ok, out, _) = gw.etcdctl(&["member", "list"]);
    assert!(ok);
    assert!(out.contains(&format!("http://{}", gw.endpoint())) && out.contains(", aq,"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_denied_write_reaches_the_client_with_the_policy_reason_and_is_not_stored() {
    let gw = TestGateway::start().await;
    let (ok, _, err) = gw.etcdctl(&["put", "/registry/secrets/ns/db", "s3cr3t"]);
    assert!(!ok);
    assert!(err.contains("PermissionDenied") && err.contains("need a verified credential with role secret-writer"), "{err}");
    let mut direct = gw.main.client().await;
    assert!(direct.get("/registry/secrets/ns/db", None).await.unwrap().kvs().is_empty(), "nothing was written");
    // The quota scope names its limit: values over 1.5 MiB are refused before etcd sees them.
    let mut client = gw.client().await;
    let err = client.put("/registry/configmaps/ns/huge", vec![b'x'; 1_600_000], None).await.unwrap_err();
    assert!(err.to_string().contains("over max_value_bytes = 1572864"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_txn_across_scopes_is_refused_and_names_them() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let txn = Txn::new().and_then([
        TxnOp::put("/registry/pods/ns/a", "1", None),
        TxnOp::put("/registry/events/ns/e", "1", None),
    ]);
    let err = client.txn(txn).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("several scopes (events, registry)"), "{message}");
    assert!(client.get("/registry/pods/ns/a", None).await.unwrap().kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_across_scopes_and_groups_merges_in_key_order() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    // registry (main), events (events group), leases (events group), catch-all (main).
    for key in ["/registry/pods/ns/p", "/registry/events/ns/e", "/registry/leases/ns/l", "/registry/apps/x", "/zzz"] {
        client.put(key, "v", None).await.unwrap();
    }
    let all = client.get("/registry/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let keys: Vec<&str> = all.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/registry/apps/x", "/registry/events/ns/e", "/registry/leases/ns/l", "/registry/pods/ns/p"]);
    assert_eq!(all.count(), 4);
    let page = client.get("/registry/", Some(GetOptions::new().with_prefix().with_limit(2))).await.unwrap();
    let keys: Vec<&str> = page.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/registry/apps/x", "/registry/events/ns/e"]);
    assert!(page.more());
    assert_eq!(page.count(), 4);
    // Descending by key across groups.
    let desc = client
        .get("\0", Some(GetOptions::new().with_from_key().with_sort(SortTarget::Key, SortOrder::Descend).with_keys_only()))
        .await
        .unwrap();
    let keys: Vec<&str> = desc.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/zzz", "/registry/pods/ns/p", "/registry/leases/ns/l", "/registry/events/ns/e", "/registry/apps/x"]);
    // The events landed on the events group, not on main.
    let mut events = gw.events.client().await;
    assert_eq!(events.get("/registry/events/ns/e", None).await.unwrap().count(), 1);
    let mut main = gw.main.client().await;
    assert_eq!(main.get("/registry/events/ns/e", None).await.unwrap().count(), 0);
}

/// A key in aq's reserved keyspace, written straight to etcd.
fn reserved_key(name: &str) -> Vec<u8> {
    [aq_host::index::RESERVED_PREFIX, b"test/", name.as_bytes()].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserved_keys_are_invisible_and_untouchable() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/a", "1", None).await.unwrap();
    // A reserved key exists in the group...
    let mut main = gw.main.client().await;
    main.put(reserved_key("kept"), "aq's", None).await.unwrap();
    // ...but not through aq: not by key, not in a full scan, not writable or deletable.
    assert_eq!(client.get(reserved_key("kept"), None).await.unwrap().count(), 0);
    let everything = client.get("\0", Some(GetOptions::new().with_from_key())).await.unwrap();
    assert!(everything.kvs().iter().all(|kv| !kv.key().starts_with(aq_host::index::RESERVED_PREFIX)), "{everything:?}");
    assert_eq!(everything.count(), 1);
    let err = client.put(reserved_key("kept"), "x", None).await.unwrap_err();
    assert!(err.to_string().contains("reserved keyspace"), "{err}");
    let err = client.delete(reserved_key("kept"), None).await.unwrap_err();
    assert!(err.to_string().contains("reserved keyspace"), "{err}");
    let kept = main.get(reserved_key("kept"), None).await.unwrap();
    assert_eq!((kept.kvs()[0].value(), kept.kvs()[0].version()), (&b"aq's"[..], 1), "the key is intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_that_gave_a_scope_away_refuses_its_writes() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let first = client.put("/registry/pods/ns/a", "1", None).await.unwrap().header().unwrap().revision();
    let second = client.put("/registry/pods/ns/a", "2", None).await.unwrap().header().unwrap().revision();
    // Each write takes one revision of its own.
    assert_eq!(second, first + 1);

    // The registry scope moves off main: main's role loses its ranges (the hand-off's revoke).
    let changes = gw.revoke_from_main("registry").await;
    assert!(!changes.revoked.is_empty(), "{changes:?}");

    // This replica still routes registry to main, and main refuses: nothing lands.
    let err = client.put("/registry/pods/ns/a", "stale", None).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no longer holds the keys of scope registry"), "{}", status.message());
    let mut main = gw.main.client().await;
    let kept = main.get("/registry/pods/ns/a", None).await.unwrap();
    assert_eq!((kept.kvs()[0].value(), kept.kvs()[0].mod_revision()), (&b"2"[..], second), "the stale write never landed");
    // The scopes main still holds are written as before, past the auth change.
    client.put("/elsewhere", "x", None).await.unwrap();
    assert_eq!(main.get("/elsewhere", None).await.unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn managed_etcd_runs_with_auth_and_aqs_credentials_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let layout = aq_tests::ONE_GROUP_LAYOUT;
    let (running, data) = aq_tests::etcd::serve_managed(layout).await;
    let mut client = etcd_client::Client::connect([running.addr.to_string()], None).await.unwrap();
    client.put("/through-aq", "1", None).await.unwrap();
    let url = running.managed.lock().unwrap()["main"][0].client_url().to_string();
    let mut anonymous = etcd_client::Client::connect([url], None).await.unwrap();
    let err = anonymous.put("/bypass", "x", None).await.unwrap_err();
    assert!(err.to_string().contains("user name is empty"), "{err}");
    assert_eq!(client.get("/bypass", None).await.unwrap().count(), 0, "nothing written around aq");
    assert_eq!(client.get("/through-aq", None).await.unwrap().count(), 1);
    let secrets = aq_host::backend::ownership::ManagedSecrets::path(&data.path().join("etcd").join("main"));
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", secrets.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_process_without_aqs_credentials_cannot_write_to_a_group() {
    let gw = TestGateway::start().await;
    let mut anonymous = gw.main.anonymous_client().await;
    let err = anonymous.put("/registry/pods/ns/bypass", "x", None).await.unwrap_err();
    assert!(err.to_string().contains("user name is empty"), "{err}");
    let mut main = gw.main.client().await;
    assert_eq!(main.get("/registry/pods/ns/bypass", None).await.unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kube_apiserver_storage_patterns_work_through_aq() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let key = "/registry/configmaps/default/cm";
    // Create: Txn(mod_revision == 0) then put, else get.
    let create = |value: &'static str| {
        Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)])
    };
    let created = client.txn(create("v1")).await.unwrap();
    assert!(created.succeeded());
    let rev = created.header().unwrap().revision();
    // A second create fails and returns the current object, as etcd does.
    let again = client.txn(create("v1-again")).await.unwrap();
    assert!(!again.succeeded());
    match &again.op_responses()[0] {
        TxnOpResponse::Get(get) => assert_eq!(get.kvs()[0].value(), b"v1"),
        other => panic!("{other:?}"),
    }
    // Update guarded on the revision read.
    let update = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
        .and_then([TxnOp::put(key, "v2", None)])
        .or_else([TxnOp::get(key, None)]);
    assert!(client.txn(update.clone()).await.unwrap().succeeded());
    assert!(!client.txn(update).await.unwrap().succeeded(), "a stale mod_revision compare fails, as in etcd");

    // Paged list pinned to the first page's revision.
    for i in 0..5 {
        client.put(format!("/registry/configmaps/default/page-{i}"), "v", None).await.unwrap();
    }
    let first = client.get("/registry/configmaps/default/page-", Some(GetOptions::new().with_prefix().with_limit(2))).await.unwrap();
    let pinned = first.header().unwrap().revision();
    client.put("/registry/configmaps/default/page-9", "late", None).await.unwrap();
    let last_key = first.kvs().last().unwrap().key().to_vec();
    let mut next_start = last_key.clone();
    next_start.push(0);
    let rest = client
        .get(next_start, Some(GetOptions::new().with_range("/registry/configmaps/default/page.").with_revision(pinned)))
        .await
        .unwrap();
    let keys: Vec<&str> = rest.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/registry/configmaps/default/page-2", "/registry/configmaps/default/page-3", "/registry/configmaps/default/page-4"]);
    // count_only.
    let count = client.get("/registry/configmaps/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap();
    assert_eq!(count.count(), 7);
    assert!(count.kvs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_then_reading_below_it_gives_err_compacted() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let first = client.put("/registry/pods/ns/a", "1", None).await.unwrap().header().unwrap().revision();
    let second = client.put("/registry/pods/ns/a", "2", None).await.unwrap().header().unwrap().revision();
    // The compactor's pattern: a Txn on its key's version, then Compact.
    let compact_key = "/registry/compact_rev_key";
    let txn = Txn::new()
        .when([Compare::version(compact_key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(compact_key, second.to_string(), None)])
        .or_else([TxnOp::get(compact_key, None)]);
    assert!(client.txn(txn).await.unwrap().succeeded());
    client.compact(second, None).await.unwrap();
    let err = client.get("/registry/pods/ns/a", Some(GetOptions::new().with_revision(first))).await.unwrap_err();
    assert!(err.to_string().contains("required revision has been compacted"), "{err}");
    let (ok, _, stderr) = gw.etcdctl(&["get", "/registry/pods/ns/a", &format!("--rev={first}")]);
    assert!(!ok && stderr.contains("compacted"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_used_in_two_groups_behaves_as_one() {
    let gw = TestGateway::start().await;
    let (ok, out, err) = gw.etcdctl(&["lease", "grant", "60"]);
    assert!(ok, "{err}");
    // "lease 694d7c5a0c1b2f04 granted with TTL(60s)"
    let id = out.split_whitespace().nth(1).expect("lease id").to_string();
    let numeric = i64::from_str_radix(&id, 16).unwrap();
    let lease_flag = format!("--lease={id}");
    assert!(gw.etcdctl(&["put", "/registry/events/ns/e1", "v", &lease_flag]).0, "a key on the events group");
    assert!(gw.etcdctl(&["put", "/registry/pods/ns/p1", "v", &lease_flag]).0, "a key on the main group");

    let (_, out, _) = gw.etcdctl(&["lease", "timetolive", &id, "--keys"]);
    assert!(out.contains("/registry/events/ns/e1") && out.contains("/registry/pods/ns/p1"), "{out}");
    let (_, out, _) = gw.etcdctl(&["lease", "list"]);
    assert!(out.contains(&id), "{out}");
    let (ok, out, err) = gw.etcdctl(&["lease", "keep-alive", "--once", &id]);
    assert!(ok && out.contains("keepalived with TTL(60)"), "{out}{err}");
    // The copy on the events group has the same ID.
    let mut events = gw.events.client().await;
    assert!(events.lease_time_to_live(numeric, None).await.unwrap().ttl() > 0);

    let (ok, out, _) = gw.etcdctl(&["lease", "revoke", &id]);
    assert!(ok && out.contains("revoked"), "{out}");
    let mut main = gw.main.client().await;
    assert_eq!(main.get("/registry/pods/ns/p1", None).await.unwrap().count(), 0);
    assert_eq!(events.get("/registry/events/ns/e1", None).await.unwrap().count(), 0);
    let (ok, _, err) = gw.etcdctl(&["put", "/registry/pods/ns/p2", "v", &lease_flag]);
    assert!(!ok && err.contains("lease not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_layout_is_recorded_in_the_meta_group() {
    let gw = TestGateway::start().await;
    let mut main = gw.main.client().await;
    let stored = main.get(aq_host::meta::layout_key(), None).await.unwrap();
    let layout: serde_json::Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert_eq!(layout["epoch"], 1);
    assert_eq!(layout["changed_live"], false);
    let scopes = layout["scopes"].as_array().unwrap();
    let secrets = scopes.iter().find(|s| s["id"] == "secrets").expect("secrets recorded");
    assert_eq!(secrets["start"], "/registry/secrets/");
    assert_eq!(secrets["end"], "/registry/secrets0");
    assert_eq!(secrets["group"], "main");
    let events = scopes.iter().find(|s| s["id"] == "events").expect("events recorded");
    assert_eq!(events["group"], "events");
    // A second replica with the same file adopts the record as it is.
    let replica = gw.replica().await;
    let again = main.get(aq_host::meta::layout_key(), None).await.unwrap();
    assert_eq!(again.kvs()[0].mod_revision(), stored.kvs()[0].mod_revision());
    assert_eq!(replica.running.gateway.routing().index().scopes().len(), scopes.len());
    // Through aq the record is as invisible as every reserved key.
    let mut client = gw.client().await;
    assert_eq!(client.get(aq_host::meta::layout_key(), None).await.unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn managed_etcd_is_restarted_after_a_crash() {
    let data = tempfile::tempdir().unwrap();
    let layout = aq_tests::ONE_GROUP_LAYOUT;
    let config = aq_host::config::Config::parse(layout, "test").unwrap();
    let options = aq_host::serve::ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: None,
        data_dir: data.path().to_path_buf(),
        etcd_binary: "etcd".into(),
        decision_log: aq_host::gate::decisions::DecisionSink::Off,
        log_allows: false,
        tls: None,
        name: None,
        advertise_admin_url: None,
        checkpoint_interval: std::time::Duration::from_secs(1),
        warm_instances: aq_host::engine::EngineConfig::default().warm_per_binding,
        advise_interval: std::time::Duration::from_secs(10),
        auth_token_ttl: aq_host::auth::DEFAULT_TOKEN_TTL,
    };
    let running = aq_host::serve::start(config, options).await.expect("aq starts with managed etcd");
    let mut client = etcd_client::Client::connect([running.addr.to_string()], None).await.unwrap();
    client.put("/before", "1", None).await.unwrap();
    let old_pid = {
        let mut managed = running.managed.lock().unwrap();
        let etcd = &mut managed.get_mut("main").expect("a managed group")[0];
        assert!(etcd.data_dir().starts_with(data.path()));
        let pid = etcd.pid().unwrap();
        std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        pid
    };
    // Wait (up to 30 s) until the supervisor has started a new process and writes work again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let restarted = running.managed.lock().unwrap().get_mut("main").unwrap()[0].pid().is_some_and(|p| p != old_pid);
        if restarted && client.put("/after", "2", None).await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "managed etcd was not restarted");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The data survived: same data directory.
    assert_eq!(client.get("/before", None).await.unwrap().kvs()[0].value(), b"1");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_across_scopes_of_one_group_is_one_write_at_one_revision() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    // catch-all and registry, both on main.
    for key in ["/r1", "/r2", "/registry/apps/a"] {
        client.put(key, "v", None).await.unwrap();
    }
    let mut main = gw.main.client().await;
    let before = main.get("/r1", None).await.unwrap().header().unwrap().revision();
    let mut watch = client.watch("/r", Some(etcd_client::WatchOptions::new().with_range("/registry/apps0"))).await.unwrap();
    // The client library returns before the watch exists; it exists once created is answered.
    let created = tokio::time::timeout(std::time::Duration::from_secs(20), watch.message()).await.unwrap().unwrap().unwrap();
    assert!(created.created(), "{created:?}");
    let deleted = client
        .delete("/r", Some(etcd_client::DeleteOptions::new().with_range("/registry/apps0").with_prev_key()))
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 3);
    let keys: Vec<&str> = deleted.prev_kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/r1", "/r2", "/registry/apps/a"]);
    let after = main.get("/r1", None).await.unwrap().header().unwrap().revision();
    assert_eq!(after, before + 1, "one etcd revision for the whole delete");
    let revision = deleted.header().unwrap().revision();
    // A watcher over both scopes sees the three deletes at that revision (one answer per
    // scope: the watch front keeps a backend watch per scope).
    let mut events = Vec::new();
    while events.len() < 3 {
        let answer = tokio::time::timeout(std::time::Duration::from_secs(20), watch.message())
            .await
            .expect("the deletes arrive")
            .unwrap()
            .expect("the watch is open");
        events.extend(answer.events().iter().map(|e| (e.kv().unwrap().key_str().unwrap().to_string(), e.kv().unwrap().mod_revision())));
    }
    events.sort();
    let expected: Vec<(String, i64)> = keys.iter().map(|k| (k.to_string(), revision)).collect();
    assert_eq!(events, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_across_scopes_deletes_every_part_or_nothing_when_one_is_denied() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    for key in ["/registry/apps/a", "/registry/events/ns/e", "/registry/pods/ns/p"] {
        client.put(key, "v", None).await.unwrap();
    }
    // Parts on registry (main), events (events group) and registry again; all allow deletes.
    let deleted = client
        .delete("/registry/apps/", Some(etcd_client::DeleteOptions::new().with_range("/registry/pods0").with_prev_key()))
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 3);
    let keys: Vec<&str> = deleted.prev_kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
    assert_eq!(keys, ["/registry/apps/a", "/registry/events/ns/e", "/registry/pods/ns/p"]);

    // The secrets scope denies unsigned deletes, so a range covering it deletes nothing at all.
    client.put("/registry/pods/ns/q", "v", None).await.unwrap();
    let err = client
        .delete("/registry/", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("secret-writer"), "{err}");
    assert_eq!(client.get("/registry/pods/ns/q", None).await.unwrap().count(), 1, "nothing was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_needing_approval_is_refused_with_what_it_needs() {
    // Bind a policy that requires two approvals to the pods prefix, by component path.
    let gw = TestGateway::start_with(|main, events| {
        format!(
            "{}\n[[scopes]]\nid = \"pods\"\nprefix = \"/registry/pods/\"\ngroup = \"main\"\npolicy = {:?}\n",
            aq_tests::etcd::layout(main, events),
            aq_tests::guests::APPROVE
        )
    })
    .await;
    let mut client = gw.client().await;
    let err = client.put("/registry/pods/ns/p", "x", None).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("writes to scope pods need approvals of weight 2 from alice (weight 1), bob (weight 1)"),
        "{}",
        status.message()
    );
    let mut main = gw.main.client().await;
    assert_eq!(main.get("/registry/pods/ns/p", None).await.unwrap().count(), 0, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scope_moved_in_the_stored_layout_is_followed_by_every_replica() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let mut client = gw.client().await;
    let mut other = etcd_client::Client::connect([replica.running.addr.to_string()], None).await.unwrap();
    client.put("/registry/pods/ns/a", "on main", None).await.unwrap();

    // The hand-off: main gives registry's keys up, events takes them.
    let store = gw.running.syncer.store();
    let (stored, revision) = store.layout().await.unwrap().expect("a stored layout");
    let mut moved = stored.index().unwrap().scopes().iter().map(|s| (**s).clone()).collect::<Vec<_>>();
    moved.iter_mut().find(|s| s.id == "registry").unwrap().group = "events".into();
    let moved = aq_host::index::ScopeIndex::new(moved).unwrap();
    gw.revoke_from_main("registry").await;
    let admin = gw.events.admin_credentials();
    let mut events_owners = aq_host::backend::ownership::Owners::connect("events", &[gw.events.url().to_string()], &admin).await.unwrap();
    assert!(!events_owners.reconcile(&moved.group_ranges("events")).await.unwrap().granted.is_empty());

    // Until the replicas follow, main refuses the write they send it, and nothing lands.
    let err = other.put("/registry/pods/ns/early", "stale", None).await.unwrap_err();
    assert!(err.to_string().contains("no longer holds the keys of scope registry"), "{err}");

    // One write of the layout record, and both replicas route there.
    let next = stored.changed(&moved, "scope registry moved to group events");
    store.write_layout(&next, revision).await.unwrap();
    // A writer that saw an older epoch loses: the record changes only from the epoch it read.
    let stale = store.write_layout(&stored.changed(&moved, "again"), revision).await.unwrap_err();
    assert!(stale.to_string().contains("epoch 2"), "{stale}");
    for running in [&gw.running, &replica.running] {
        aq_tests::wait_until("the replica routes registry to events", || {
            running.gateway.routing().scope("registry").unwrap().group.name() == "events"
        })
        .await;
    }

    client.put("/registry/pods/ns/b", "on events", None).await.unwrap();
    other.put("/registry/pods/ns/c", "followed", None).await.unwrap();
    let mut events = gw.events.client().await;
    let mut main = gw.main.client().await;
    assert_eq!(events.get("/registry/pods/ns/b", None).await.unwrap().count(), 1, "written to the new owner");
    assert_eq!(events.get("/registry/pods/ns/c", None).await.unwrap().kvs()[0].value(), b"followed");
    for key in ["/registry/pods/ns/b", "/registry/pods/ns/c", "/registry/pods/ns/early"] {
        assert_eq!(main.get(key, None).await.unwrap().count(), 0, "{key} is not on main");
    }

    // The record outlives the file: a replica started later with the same file routes by it.
    let late = gw.replica().await;
    assert_eq!(late.running.gateway.routing().scope("registry").unwrap().group.name(), "events");
    let (kept, _) = store.layout().await.unwrap().unwrap();
    assert_eq!((kept.epoch, kept.changed_live), (2, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_scope_counts_its_own_load_across_reroutes_and_replicas_publish_it() {
    let gw = TestGateway::start().await;
    let gateway = &gw.running.gateway;
    let mut client = gw.client().await;
    let registry = gateway.stats().get("registry").expect("routed scopes have counters");
    let before = registry.publish();
    for i in 0..30 {
        client.put(format!("/registry/pods/ns/p{i}"), "v", None).await.unwrap();
    }
    // A reroute keeps the scope's counters: the next routing holds the same ones.
    let index = aq_host::index::ScopeIndex::new(gateway.routing().index().scopes().iter().map(|s| (**s).clone()).collect()).unwrap();
    gateway.reroute(index).unwrap();
    for i in 0..10 {
        client.put(format!("/registry/services/ns/s{i}"), "v", None).await.unwrap();
    }
    client.delete("/registry/services/ns/s0", None).await.unwrap();
    let listed = client.get("/registry/pods/", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(listed.count(), 30);
    client.put("/registry/events/ns/e1", "v", None).await.unwrap();

    let after = registry.publish();
    assert_eq!(after.writes - before.writes, 41);
    assert_eq!(after.reads - before.reads, 1);
    let segment = |s: &str| after.segments.get(&s.bytes().map(|b| format!("{b:02x}")).collect::<String>()).copied();
    assert_eq!((segment("pods/"), segment("services/")), (Some(30), Some(11)));
    // 30 and 11 writes over two children: a little under one bit.
    assert!((0.8..0.9).contains(&after.key_entropy()), "{}", after.key_entropy());
    // Another scope's write is its own.
    assert_eq!(gateway.stats().get("events").unwrap().publish().writes, 1);

    // Each replica publishes its windows to the meta group; their rates add up.
    let replica = gw.replica().await;
    let mut other = etcd_client::Client::connect([replica.running.addr.to_string()], None).await.unwrap();
    aq_host::serve::publish_load(gateway, &gw.running.anchor).await;
    aq_host::serve::publish_load(&replica.running.gateway, &replica.running.anchor).await;
    for i in 0..5 {
        client.put(format!("/registry/pods/ns/q{i}"), "v", None).await.unwrap();
        other.put(format!("/registry/pods/ns/r{i}"), "v", None).await.unwrap();
    }
    aq_host::serve::publish_load(gateway, &gw.running.anchor).await;
    aq_host::serve::publish_load(&replica.running.gateway, &replica.running.anchor).await;
    let windows = gw.running.syncer.store().loads("registry", 0).await.unwrap();
    let mut by_replica: Vec<(String, u64)> = windows.iter().map(|w| (w.replica.clone(), w.counts.writes)).collect();
    by_replica.sort();
    let mut expected = vec![(gw.running.anchor.clone(), 5), (replica.running.anchor.clone(), 5)];
    expected.sort();
    assert_eq!(by_replica, expected);
    let routing = gateway.routing();
    let range = &routing.scope("registry").unwrap().scope.range;
    let summed = aq_host::adapt::stats::stats_of(&windows, range, 0, 0);
    let each: f64 = windows.iter().map(|w| 5.0 / w.seconds).sum();
    assert!((summed.write_rate - each).abs() < 1e-6, "{} against {each}", summed.write_rate);
    // A window older than asked for is left out.
    let newest = windows.iter().map(|w| w.at_ms).max().unwrap();
    assert!(gw.running.syncer.store().loads("registry", newest + 1).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_refused_by_a_group_that_gave_its_scope_away_is_sent_to_the_new_owner() {
    let mut gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/warm", "v", None).await.unwrap();
    let gateway = gw.running.gateway.clone();
    let mut moved = gateway.routing().index().scopes().iter().map(|s| (**s).clone()).collect::<Vec<_>>();
    moved.iter_mut().find(|s| s.id == "registry").unwrap().group = "events".into();
    let moved = aq_host::index::ScopeIndex::new(moved).unwrap();

    // main gives registry up, then holds the next write's answer: the write is decided and
    // sent on the routing that still names main.
    gw.revoke_from_main("registry").await;
    gw.main.pause();
    let allowed = gateway.metrics().evaluations("registry", "allow");
    let write = tokio::spawn(async move { client.put("/registry/pods/ns/moving", "v", None).await });
    aq_tests::wait_until("the write was decided", || gateway.metrics().evaluations("registry", "allow") > allowed).await;

    // Meanwhile the hand-off completes: events holds registry, and routing names it.
    let admin = gw.events.admin_credentials();
    let mut events_owners = aq_host::backend::ownership::Owners::connect("events", &[gw.events.url().to_string()], &admin).await.unwrap();
    events_owners.reconcile(&moved.group_ranges("events")).await.unwrap();
    gw.running.gateway.reroute(moved).unwrap();
    gw.main.resume();

    // main refuses the write it held; the gate decides it again for events and sends it there.
    write.await.unwrap().expect("the write succeeds on the new owner");
    let mut events = gw.events.client().await;
    let mut main = gw.main.client().await;
    assert_eq!(events.get("/registry/pods/ns/moving", None).await.unwrap().count(), 1);
    assert_eq!(main.get("/registry/pods/ns/moving", None).await.unwrap().count(), 0);
    assert!(gw.running.gateway.metrics().evaluations("registry", "allow") >= allowed + 2, "decided again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_at_a_time_advises_and_the_role_moves_when_it_dies() {
    let gw = TestGateway::start().await;
    let fast = |options: &mut aq_host::serve::ServeOptions| options.advise_interval = std::time::Duration::from_millis(200);
    let mut replicas = vec![gw.replica_with(fast).await, gw.replica_with(fast).await];
    let mut main = gw.main.client().await;
    let key = aq_host::adapt::advise::advisor_key();
    let holder = || async {
        let found = gw.main.client().await.get(key.clone(), None).await.unwrap();
        found.kvs().first().map(|kv| String::from_utf8(kv.value().to_vec()).unwrap())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let first = loop {
        if let Some(holder) = holder().await {
            break holder;
        }
        assert!(std::time::Instant::now() < deadline, "no replica took the advisor role");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let at = replicas.iter().position(|r| r.running.anchor == first).expect("a fast replica advises");
    let (advising, other) = (&replicas[at], &replicas[1 - at]);
    // The advising replica asks every scope's policy; the other asks none.
    let advised = |r: &aq_tests::etcd::Replica| r.running.gateway.metrics().advice("registry", "keep");
    aq_tests::wait_until("the advisor advised several times", || advised(advising) >= 3).await;
    assert_eq!(advised(other), 0, "only one replica advises");
    assert!(advising.running.gateway.metrics().advice("secrets", "keep") >= 1, "critical keeps");
    let log = std::fs::read_to_string(advising.data_dir().join("decisions.log")).unwrap();
    let line: serde_json::Value = serde_json::from_str(log.lines().find(|l| l.contains("\"advice\"")).expect("an advice line")).unwrap();
    assert_eq!(line["advice"], "keep");
    assert!(line["stats"]["write_rate"].is_number(), "{line}");

    // The advisor stops: it revokes its lease, which takes the key with it, and the other
    // replica takes over. (One that dies without a word loses the key when the TTL runs out.)
    let survivor = other.running.anchor.clone();
    drop(replicas.remove(at));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while holder().await.as_deref() != Some(survivor.as_str()) {
        assert!(std::time::Instant::now() < deadline, "the role did not move to {survivor}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let before = advised(&replicas[0]);
    aq_tests::wait_until("the new advisor advises", || advised(&replicas[0]) > before).await;
    assert!(main.get(key.clone(), None).await.unwrap().kvs()[0].lease() != 0, "held under a lease");
}
