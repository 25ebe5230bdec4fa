//! aq's own etcd users and roles through the Auth service, with stock etcdctl and the Rust
//! client: who may do what once `auth enable` is on, across replicas, and the user reaching
//! the policy as its transport identity.

use aq_tests::etcd::TestGateway;
use aq_tests::wait_until_async;
use etcd_client::{ConnectOptions, EventType, GetOptions, Permission, PutOptions, WatchOptions};

/// The default layout plus `/team/`, governed by the `writers` guest: only alice and root
/// may write there.
fn team_layout(main: &aq_tests::etcd::TestEtcd, events: &aq_tests::etcd::TestEtcd) -> String {
    format!(
        "{}\n[[scopes]]\nid = \"team\"\nprefix = \"/team/\"\ngroup = \"events\"\npolicy = {:?}\nconfig = {{ writers = [\"alice\", \"root\"] }}\n",
        aq_tests::etcd::layout(main, events),
        aq_tests::guests::WRITERS
    )
}

/// Runs etcdctl and fails the test unless it succeeds; returns what it printed.
fn ok(gw: &TestGateway, args: &[&str]) -> String {
    let (success, out, err) = gw.etcdctl(args);
    assert!(success, "etcdctl {args:?} failed: {out}{err}");
    out
}

/// Runs etcdctl and fails the test unless it fails; returns its error output.
fn refused(gw: &TestGateway, args: &[&str]) -> String {
    let (success, out, err) = gw.etcdctl(args);
    assert!(!success, "etcdctl {args:?} succeeded: {out}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_users_and_roles_limit_a_user_to_its_prefix_and_the_policy_sees_the_user() {
    let gw = TestGateway::start_with(team_layout).await;
    // Without auth, no user reaches the policy.
    let err = refused(&gw, &["put", "/team/x", "v"]);
    assert!(err.contains("etcd user (none) may not write here"), "{err}");

    for args in [
        &["user", "add", "root:rootpw"][..],
        &["role", "add", "root"],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "alice:apw"],
        &["user", "add", "bob:bpw"],
        &["role", "add", "team"],
        &["role", "grant-permission", "--prefix=true", "team", "readwrite", "/team/"],
        &["role", "grant-permission", "team", "read", "/shared"],
        &["user", "grant-role", "alice", "team"],
        &["user", "grant-role", "bob", "team"],
    ] {
        ok(&gw, args);
    }
    assert!(ok(&gw, &["auth", "enable"]).contains("Authentication Enabled"));
    let alice = "--user=alice:apw";

    // No user, a wrong password, and a user outside its prefix are refused as etcd refuses them.
    assert!(refused(&gw, &["get", "/team/x"]).contains("etcdserver: user name is empty"));
    assert!(refused(&gw, &["--user=alice:nope", "get", "/team/x"]).contains("authentication failed, invalid user ID or password"));
    assert_eq!(ok(&gw, &[alice, "put", "/team/a", "1"]).trim(), "OK");
    assert!(refused(&gw, &[alice, "put", "/other/a", "1"]).contains("etcdserver: permission denied"));
    assert!(refused(&gw, &[alice, "put", "/shared", "1"]).contains("etcdserver: permission denied"), "read only");
    assert!(refused(&gw, &[alice, "get", "/", "--prefix"]).contains("etcdserver: permission denied"), "wider than the grant");
    assert_eq!(ok(&gw, &[alice, "get", "/team/", "--prefix", "--print-value-only"]).trim(), "1");
    // bob may write the prefix as far as etcd's permissions go; the scope's policy, which sees
    // the user, refuses him.
    let err = refused(&gw, &["--user=bob:bpw", "put", "/team/b", "1"]);
    assert!(err.contains("etcd user bob may not write here"), "{err}");
    aq_tests::wait_until("the decision log names the etcd user", || {
        gw.decisions().iter().any(|d| d["scope"] == "team" && d["transport"] == "bob" && d["verdict"] == "deny")
    })
    .await;

    // Management is root's, except a user reading itself and its roles.
    assert!(refused(&gw, &[alice, "user", "list"]).contains("permission denied"));
    assert!(ok(&gw, &[alice, "user", "get", "alice"]).contains("Roles: team"));
    assert!(ok(&gw, &[alice, "role", "get", "team"]).contains("[/team/, /team0) (prefix /team/)"));
    assert!(refused(&gw, &[alice, "role", "get", "root"]).contains("permission denied"));
    let root = "--user=root:rootpw";
    let users = ok(&gw, &[root, "user", "list"]);
    assert_eq!(users.split_whitespace().collect::<Vec<_>>(), ["alice", "bob", "root"]);
    assert!(refused(&gw, &[root, "user", "delete", "root"]).contains("invalid auth management"));

    // A second replica shares the users; a revocation through the first reaches it.
    let replica = gw.replica().await;
    let other = format!("--endpoints={}", replica.running.addr);
    assert_eq!(ok(&gw, &[&other, alice, "put", "/team/c", "1"]).trim(), "OK");
    // A client that logged in before the revocation keeps its token: the replica learns of the
    // change from its meta watch, not from a new login.
    let options = ConnectOptions::new().with_user("alice", "apw");
    let mut logged_in = etcd_client::Client::connect([replica.running.addr.to_string()], Some(options)).await.unwrap();
    logged_in.put("/team/c2", "1", None).await.unwrap();
    ok(&gw, &[root, "role", "revoke-permission", "team", "/team/", "--prefix=true"]);
    assert!(refused(&gw, &[alice, "put", "/team/d", "1"]).contains("permission denied"), "at once on the replica that changed it");
    wait_until_async("the replica refuses alice's token after the revocation", || {
        let mut client = logged_in.clone();
        async move {
            match client.put("/team/d", "1", None).await {
                Ok(_) => false,
                Err(e) => e.to_string().contains("etcdserver: permission denied") || panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(ok(&gw, &[&other, root, "get", "/team/d", "--print-value-only"]).trim(), "", "nothing written");

    // A changed password voids the old one; auth disable opens everything again.
    let (changed, out, err) = gw.etcdctl_with_input(&[root, "user", "passwd", "alice", "--interactive=false"], Some("apw2\n"));
    assert!(changed, "{out}{err}");
    assert!(refused(&gw, &[alice, "get", "/shared"]).contains("authentication failed"));
    assert_eq!(ok(&gw, &["--user=alice:apw2", "get", "/shared"]).trim(), "", "the new password works");
    ok(&gw, &[root, "auth", "disable"]);
    assert_eq!(ok(&gw, &["get", "/team/a", "--print-value-only"]).trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_client_is_held_to_its_roles_in_watches_txns_and_leases_and_renews_its_token() {
    let gw = TestGateway::start_tuned(aq_tests::etcd::layout, |options| {
        options.auth_token_ttl = std::time::Duration::from_secs(2);
    })
    .await;
    let mut admin = gw.client().await;
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.user_add("carol", "cpw", None).await.unwrap();
    admin.role_add("pods").await.unwrap();
    admin.role_grant_permission("pods", Permission::read_write("/registry/pods/").with_prefix()).await.unwrap();
    admin.user_grant_role("carol", "pods").await.unwrap();
    admin.auth_enable().await.unwrap();

    let carol_options = ConnectOptions::new().with_user("carol", "cpw").with_auto_token_refresh(true);
    let mut carol = etcd_client::Client::connect([gw.endpoint()], Some(carol_options)).await.unwrap();
    let root_options = ConnectOptions::new().with_user("root", "rootpw");
    let mut root = etcd_client::Client::connect([gw.endpoint()], Some(root_options)).await.unwrap();
    root.put("/registry/configmaps/ns/c", "x", None).await.unwrap();

    // A watch outside the grant is created and canceled at once, with etcd's reason.
    let mut stream = carol.watch("/registry/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    let answer = stream.message().await.unwrap().expect("an answer");
    assert!(answer.canceled(), "{answer:?}");
    assert!(answer.cancel_reason().contains("etcdserver: permission denied"), "{}", answer.cancel_reason());
    let mut pods = carol.watch("/registry/pods/", Some(WatchOptions::new().with_prefix())).await.unwrap();
    assert!(pods.message().await.unwrap().expect("an answer").created(), "the watch exists before the put");
    carol.put("/registry/pods/ns/p", "1", None).await.unwrap();
    let event = loop {
        let answer = pods.message().await.unwrap().expect("an answer");
        assert!(!answer.canceled(), "{answer:?}");
        if let Some(event) = answer.events().first() {
            break event.clone();
        }
    };
    assert_eq!((event.event_type(), event.kv().unwrap().key()), (EventType::Put, &b"/registry/pods/ns/p"[..]));

    // A txn is checked whole: a compare on a key outside the grant refuses it.
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::version("/registry/configmaps/ns/c", etcd_client::CompareOp::Greater, 0)])
        .and_then([etcd_client::TxnOp::put("/registry/pods/ns/q", "2", None)]);
    let err = carol.txn(txn).await.unwrap_err();
    assert!(err.to_string().contains("etcdserver: permission denied"), "{err}");
    assert_eq!(root.get("/registry/pods/ns/q", None).await.unwrap().count(), 0, "nothing was written");

    // Revoking a lease deletes its keys, so it needs WRITE on each of them.
    let lease = root.lease_grant(60, None).await.unwrap().id();
    root.put("/registry/configmaps/ns/leased", "x", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    let err = carol.lease_revoke(lease).await.unwrap_err();
    assert!(err.to_string().contains("etcdserver: permission denied"), "{err}");
    assert_eq!(root.get("/registry/configmaps/ns/leased", None).await.unwrap().count(), 1);

    // Tokens expire (2 s here); the client logs in again on etcd's `invalid auth token`.
    let expired = std::time::Instant::now() + std::time::Duration::from_secs(3);
    wait_until_async("carol's first token expires", || async { std::time::Instant::now() > expired }).await;
    carol.put("/registry/pods/ns/r", "3", None).await.unwrap();
    let listed = carol.get("/registry/pods/", Some(GetOptions::new().with_prefix().with_keys_only())).await.unwrap();
    assert_eq!(listed.count(), 2);
    let mut anonymous = etcd_client::Client::connect([gw.endpoint()], None).await.unwrap();
    let err = anonymous.get("/registry/pods/ns/r", None).await.unwrap_err();
    assert!(err.to_string().contains("etcdserver: user name is empty"), "{err}");
    let status = anonymous.status().await.expect("status needs no user, as in etcd");
    assert!(status.db_size() > 0);
}
