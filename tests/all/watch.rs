//! Watches through aq against real etcd groups.

use aq_tests::etcd::TestGateway;
use etcd_client::{EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};

/// The first message of a new watch: its creation. Returns the watch id.
async fn created(stream: &mut WatchStream) -> i64 {
    let message = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
        .await
        .expect("created within 20 s")
        .expect("the stream is healthy")
        .expect("the stream is open");
    assert!(message.created(), "{message:?}");
    message.watch_id()
}

/// The next message that carries events, skipping progress notifications.
async fn next_events(stream: &mut WatchStream) -> WatchResponse {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
            .await
            .expect("a watch event within 20 s")
            .expect("the stream is healthy")
            .expect("the stream is open");
        if !message.events().is_empty() || message.canceled() {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_watch_from_a_revision_with_prev_kv() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let first = client.put("/registry/pods/ns/w", "1", None).await.unwrap().header().unwrap().revision();
    client.put("/registry/pods/ns/w", "2", None).await.unwrap();
    // From the first revision the history replays; with --prev-kv etcdctl prints the previous
    // key-value before the new one.
    let watch = gw.etcdctl_stream(&["watch", "/registry/pods/ns/w", &format!("--rev={first}"), "--prev-kv"]);
    assert_eq!(watch.lines(3), ["PUT", "/registry/pods/ns/w", "1"]);
    assert_eq!(watch.lines(5), ["PUT", "/registry/pods/ns/w", "1", "/registry/pods/ns/w", "2"]);
    client.delete("/registry/pods/ns/w", None).await.unwrap();
    // etcdctl prints the previous key-value first, then the deleted key.
    assert_eq!(watch.lines(4), ["DELETE", "/registry/pods/ns/w", "2", "/registry/pods/ns/w"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kube_style_watch_from_rev_plus_one_with_progress() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/configmaps/ns/a", "1", None).await.unwrap();
    let list = client.get("/registry/configmaps/", Some(GetOptions::new().with_prefix())).await.unwrap();
    let rev = list.header().unwrap().revision();
    let options = WatchOptions::new().with_prefix().with_start_revision(rev + 1).with_prev_key().with_progress_notify();
    let mut stream = client.watch("/registry/configmaps/", Some(options)).await.unwrap();
    let id = created(&mut stream).await;
    client.put("/registry/configmaps/ns/a", "2", None).await.unwrap();
    let message = next_events(&mut stream).await;
    let event = &message.events()[0];
    assert_eq!(event.event_type(), EventType::Put);
    assert_eq!(event.kv().unwrap().value(), b"2");
    assert_eq!(event.prev_kv().unwrap().value(), b"1");
    assert_eq!(message.watch_id(), id);
    // RequestProgress answers with the current revision and no events.
    stream.request_progress().await.unwrap();
    let progress = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(progress.events().is_empty());
    assert!(progress.header().unwrap().revision() > rev);
    stream.cancel(id).await.unwrap();
    let canceled = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
    assert!(canceled.canceled() && canceled.watch_id() == id, "{canceled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_progress_over_two_groups_tells_each_watch_its_own_groups_revision() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    // Take main's revisions well ahead of events', so a mix-up shows.
    for i in 0..10 {
        client.put(format!("/registry/pods/ns/p{i}"), "v", None).await.unwrap();
    }
    client.put("/registry/events/ns/e", "v", None).await.unwrap();
    let pods_rev = client.get("/registry/pods/", Some(GetOptions::new().with_prefix())).await.unwrap().header().unwrap().revision();
    let events_rev = client.get("/registry/events/", Some(GetOptions::new().with_prefix())).await.unwrap().header().unwrap().revision();
    assert!(pods_rev > events_rev + 5, "main {pods_rev}, events {events_rev}");

    // Three watches on one stream: pods (main), events (events) and one over both.
    let mut stream = client.watch("/registry/pods/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let pods = created(&mut stream).await;
    stream.watch("/registry/events/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let events = created(&mut stream).await;
    stream.watch("/registry/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let both = created(&mut stream).await;

    stream.request_progress().await.unwrap();
    let mut heard = std::collections::BTreeMap::new();
    while heard.len() < 2 {
        let message = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message()).await.unwrap().unwrap().unwrap();
        assert!(message.events().is_empty() && !message.created() && !message.canceled(), "{message:?}");
        assert_ne!(message.watch_id(), -1, "no stream-wide revision exists over two groups");
        assert!(heard.insert(message.watch_id(), message.header().unwrap().revision()).is_none(), "one notice per watch");
    }
    assert_eq!(heard.keys().copied().collect::<Vec<_>>(), [pods, events]);
    assert_eq!(heard[&events], events_rev);
    // aq's own records in the meta group (on main) may move main's revision meanwhile.
    assert!(heard[&pods] >= pods_rev, "{heard:?}");
    assert!(!heard.contains_key(&both), "a watch over two groups has no one revision");
    // The stream goes on: the next event after the notices is the next write.
    client.put("/registry/pods/ns/later", "v", None).await.unwrap();
    let next = next_events(&mut stream).await;
    assert!([pods, both].contains(&next.watch_id()), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_watch_spans_scopes_on_two_groups_and_never_sees_reserved_keys() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let mut stream = client.watch("/registry/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let id = created(&mut stream).await;
    client.put("/registry/pods/ns/p", "on-main", None).await.unwrap();
    client.put("/registry/events/ns/e", "on-events", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = next_events(&mut stream).await;
        assert_eq!(message.watch_id(), id, "every part answers under the client's watch id");
        seen.extend(message.events().iter().map(|e| e.kv().unwrap().key_str().unwrap().to_string()));
    }
    seen.sort();
    assert_eq!(seen, ["/registry/events/ns/e", "/registry/pods/ns/p"]);

    // A watch on everything does not see aq's own keys change.
    let mut everything = client.watch("\0", Some(WatchOptions::new().with_from_key())).await.unwrap();
    created(&mut everything).await;
    let mut main = gw.main.client().await;
    main.put([aq_host::index::RESERVED_PREFIX, b"test/watched"].concat(), "1", None).await.unwrap();
    client.put("/after", "x", None).await.unwrap();
    let message = next_events(&mut everything).await;
    let keys: Vec<&str> = message.events().iter().map(|e| e.kv().unwrap().key_str().unwrap()).collect();
    assert_eq!(keys, ["/after"], "the reserved key's change was not delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_below_compaction_is_canceled_with_the_compact_revision() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let first = client.put("/registry/pods/ns/c", "1", None).await.unwrap().header().unwrap().revision();
    let second = client.put("/registry/pods/ns/c", "2", None).await.unwrap().header().unwrap().revision();
    client.compact(second, None).await.unwrap();
    let mut stream =
        client.watch("/registry/pods/ns/c", Some(WatchOptions::new().with_start_revision(first))).await.unwrap();
    let message = next_events(&mut stream).await;
    assert!(message.canceled());
    assert_eq!(message.compact_revision(), second);
}
