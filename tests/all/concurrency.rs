//! Locks and elections through aq (etcd's v3lock and v3election services): stock `etcdctl lock`
//! and `etcdctl elect` from separate processes on two replicas, and the Rust client's calls.

use aq_tests::etcd::{TestGateway, etcdctl_stream_at};
use aq_tests::wait_until_async;
use etcd_client::{GetOptions, LockOptions, ProclaimOptions, ResignOptions};

/// How many waiter keys are queued under `name`, read through aq.
async fn waiters(client: &mut etcd_client::Client, name: &str) -> Vec<String> {
    let prefix = format!("{name}/");
    let listed = client.get(prefix, Some(GetOptions::new().with_prefix().with_keys_only())).await.expect("a read");
    listed.kvs().iter().map(|kv| kv.key_str().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_lock_through_two_replicas_excludes_and_hands_over_in_order() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    let name = "/locks/nightly-backup";

    let first = etcdctl_stream_at(&gw.endpoint(), &["lock", name]);
    let held = first.lines(1);
    assert!(held[0].starts_with(&format!("{name}/")), "etcdctl lock prints the ownership key: {held:?}");

    // The second waiter queues behind the first, on the other replica, and holds nothing yet.
    let second = etcdctl_stream_at(&replica.running.addr.to_string(), &["lock", name]);
    let mut client = gw.client().await;
    wait_until_async("the second waiter queues", || {
        let mut client = client.clone();
        async move { waiters(&mut client, name).await.len() == 2 }
    })
    .await;
    assert!(second.try_line().is_none(), "the second holder got the lock while the first held it");

    // The first gives the lock up (etcdctl revokes its session on SIGINT): the second holds it.
    first.interrupt();
    let taken = second.lines(1);
    assert!(taken[0].starts_with(&format!("{name}/")) && taken[0] != held[0], "{taken:?} after {held:?}");
    assert_eq!(waiters(&mut client, name).await, vec![taken[0].clone()]);

    // `etcdctl lock <name> <command>` runs the command while holding it, then lets go.
    second.interrupt();
    wait_until_async("the lock is free", || {
        let mut client = client.clone();
        async move { waiters(&mut client, name).await.is_empty() }
    })
    .await;
    let (ok, out, err) = gw.etcdctl(&["lock", name, "echo", "held"]);
    assert!(ok && out.trim() == "held", "{out}{err}");
    assert!(waiters(&mut client, name).await.is_empty(), "a lock held for one command is given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_waiter_that_gives_up_leaves_no_key_and_unlock_is_governed() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let name = "/locks/migrations";
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let held = client.lock(name, Some(LockOptions::new().with_lease(lease))).await.unwrap();
    let key = held.key().to_vec();
    assert_eq!(key, format!("{name}/{lease:x}").into_bytes(), "the ownership key is the name and the lease in hex");

    // A waiter whose client stops waiting (a deadline) leaves the queue.
    let other = client.lease_grant(30, None).await.unwrap().id();
    let mut waiter = client.clone();
    let gave_up = tokio::time::timeout(std::time::Duration::from_millis(500), async move {
        waiter.lock(name, Some(LockOptions::new().with_lease(other))).await
    })
    .await;
    assert!(gave_up.is_err(), "the waiter got a lock that was held: {gave_up:?}");
    wait_until_async("the canceled waiter's key goes", || {
        let mut client = client.clone();
        let key = key.clone();
        async move { waiters(&mut client, name).await == vec![String::from_utf8(key).unwrap()] }
    })
    .await;

    // Locking again with the same lease answers the key held (etcd reuses it).
    let again = client.lock(name, Some(LockOptions::new().with_lease(lease))).await.unwrap();
    assert_eq!(again.key(), key.as_slice());
    client.unlock(key.clone()).await.unwrap();
    assert!(waiters(&mut client, name).await.is_empty());

    // A lock under a reserved key is refused like any write there.
    let refused = client.lock(b"\xffaq/meta/lock".to_vec(), Some(LockOptions::new().with_lease(lease))).await;
    assert!(refused.is_err(), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_elect_hands_leadership_over_when_the_leaders_lease_is_revoked() {
    let gw = TestGateway::start().await;
    let replica = gw.replica().await;
    // kube-style leader election keys live in the leases scope, on the events group.
    let name = "/registry/leases/kube-system/scheduler";

    let observer = etcdctl_stream_at(&replica.running.addr.to_string(), &["elect", "--listen", name]);
    let leader = etcdctl_stream_at(&gw.endpoint(), &["elect", name, "node-a"]);
    let led = leader.lines(2);
    assert!(led[0].starts_with(&format!("{name}/")) && led[1] == "node-a", "{led:?}");
    assert_eq!(observer.lines(2), led, "the observer sees the first leader");

    let candidate = etcdctl_stream_at(&replica.running.addr.to_string(), &["elect", name, "node-b"]);
    let client = gw.client().await;
    wait_until_async("the candidate queues", || {
        let mut client = client.clone();
        async move { waiters(&mut client, name).await.len() == 2 }
    })
    .await;
    assert!(candidate.try_line().is_none(), "two leaders at once");

    // Revoking the leader's lease (its key ends in the lease in hex) hands leadership over.
    let lease = led[0].rsplit('/').next().unwrap();
    let (ok, out, err) = gw.etcdctl(&["lease", "revoke", lease]);
    assert!(ok, "{out}{err}");
    let next = candidate.lines(2);
    assert!(next[0] != led[0] && next[1] == "node-b", "{next:?}");
    assert_eq!(observer.lines(2), next, "the observer sees the new leader");
    drop(leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_election_api_proclaims_observes_and_resigns_as_etcd_does() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let name = "/elections/controller";
    let no_leader = client.leader(name).await.expect_err("no leader yet");
    assert!(no_leader.to_string().contains("election: no leader"), "{no_leader}");

    let lease = client.lease_grant(30, None).await.unwrap().id();
    let mut won = client.campaign(name, "v1", lease).await.unwrap();
    let leader = won.take_leader().expect("a leader key");
    assert_eq!(leader.key(), format!("{name}/{lease:x}").as_bytes());
    let mut observed = client.observe(name).await.unwrap();
    let first = observed.message().await.unwrap().expect("the current leader");
    assert_eq!(first.kv().unwrap().value(), b"v1");

    client.proclaim("v2", Some(ProclaimOptions::new().with_leader(leader.clone()))).await.unwrap();
    let now = client.leader(name).await.unwrap();
    assert_eq!(now.kv().unwrap().value(), b"v2");
    let second = observed.message().await.unwrap().expect("the proclaimed value");
    assert_eq!(second.kv().unwrap().value(), b"v2");

    // A leader key that no longer leads (a wrong create revision) proclaims nothing.
    let stale = etcd_client::LeaderKey::new().with_name(name).with_key(leader.key()).with_rev(leader.rev() - 1).with_lease(lease);
    let refused = client.proclaim("v3", Some(ProclaimOptions::new().with_leader(stale))).await.expect_err("not the leader");
    assert!(refused.to_string().contains("election: not leader"), "{refused}");
    assert_eq!(client.leader(name).await.unwrap().kv().unwrap().value(), b"v2");

    client.resign(Some(ResignOptions::new().with_leader(leader))).await.unwrap();
    let gone = client.leader(name).await.expect_err("resigned");
    assert!(gone.to_string().contains("election: no leader"), "{gone}");
}
