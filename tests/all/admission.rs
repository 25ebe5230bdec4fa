//! aq as a Kubernetes validating admission webhook: real AdmissionReview documents over HTTPS
//! with a webhook token, decided by the scope the default layout gives each object's key, with
//! the Kubernetes user reaching the policy.

use aq_tests::etcd::TestGateway;
use etcd_client::GetOptions;
use serde_json::{Value, json};

/// The token kube-apiserver presents, and its stored hash.
const WEBHOOK_TOKEN: &str = "aq_webhook_test_token";

/// The default layout plus configmaps of namespace `team`, governed by the `writers` guest:
/// only Kubernetes users in group `ops` may change them; and a webhook token.
fn layout(main: &aq_tests::etcd::TestEtcd, events: &aq_tests::etcd::TestEtcd) -> String {
    format!(
        "{}\n[[scopes]]\nid = \"team\"\nprefix = \"/registry/configmaps/team/\"\ngroup = \"events\"\npolicy = {:?}\n\
         config = {{ groups = [\"ops\"] }}\n\n[[admin.tokens]]\nname = \"kube-apiserver\"\nrole = \"webhook\"\nhash = {:?}\n",
        aq_tests::etcd::layout(main, events),
        aq_tests::guests::WRITERS,
        aq_host::admin::auth::hash_token(WEBHOOK_TOKEN),
    )
}

/// An AdmissionReview as kube-apiserver sends it.
fn review(uid: &str, operation: &str, resource: (&str, &str), namespace: &str, name: &str, user: (&str, &[&str])) -> Value {
    let (group, plural) = resource;
    let object = json!({
        "apiVersion": "v1",
        "metadata": { "name": name, "namespace": namespace, "resourceVersion": "7" },
        "data": { "k": "v" },
    });
    let (new, old) = match operation {
        "CREATE" => (object, Value::Null),
        "DELETE" => (Value::Null, object),
        _ => (object.clone(), object),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": { "group": group, "version": "v1", "kind": "Object" },
            "resource": { "group": group, "version": "v1", "resource": plural },
            "requestKind": { "group": group, "version": "v1", "kind": "Object" },
            "requestResource": { "group": group, "version": "v1", "resource": plural },
            "name": name,
            "namespace": namespace,
            "operation": operation,
            "userInfo": { "username": user.0, "uid": format!("uid-{}", user.0), "groups": user.1 },
            "object": new,
            "oldObject": old,
            "dryRun": false,
            "options": { "apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions" },
        }
    })
}

/// POSTs `body` to `path` over HTTPS with `token`; answers the status and the JSON body.
fn post(agent: &ureq::Agent, url: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut request = ureq::http::Request::builder().method("POST").uri(url).header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut response = agent.run(request.body(body).unwrap()).expect("the admin API answers");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reviews_over_https_are_decided_by_the_scope_that_owns_the_objects_key() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.path().join("aq.pem"), dir.path().join("aq-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let gw = TestGateway::start_tls_with(layout, aq_host::tls::TlsFiles { cert: cert.clone(), key }).await;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(aq_host::tls::client_roots(&cert).unwrap())
        .build()
        .into();
    let base = format!("https://127.0.0.1:{}", gw.running.admin_addr.unwrap().port());
    let url = format!("{base}/v1/admission/validate");
    let send = |body: &Value| {
        let (agent, url, body) = (agent.clone(), url.clone(), serde_json::to_vec(body).unwrap());
        async move { tokio::task::spawn_blocking(move || post(&agent, &url, Some(WEBHOOK_TOKEN), body)).await.unwrap() }
    };
    let alice = ("alice", &["dev", "system:authenticated"][..]);
    let olga = ("olga", &["ops", "system:authenticated"][..]);

    // A pod: the registry scope (quota) allows it, and the answer names who decided.
    let (status, answer) = send(&review("u-1", "CREATE", ("", "pods"), "default", "web", alice)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["apiVersion"].as_str(), answer["kind"].as_str()), (Some("admission.k8s.io/v1"), Some("AdmissionReview")));
    assert_eq!(answer["response"]["uid"], "u-1");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(answer["response"]["auditAnnotations"]["scope"], "registry");
    let registry_policy = gw.running.gateway.routing().scope("registry").unwrap().slot.active().module.digest().to_hex();
    assert_eq!(answer["response"]["auditAnnotations"]["policy"], registry_policy.as_str());

    // A secret: the secrets scope (critical) needs a signature no review carries.
    let (status, answer) = send(&review("u-2", "CREATE", ("", "secrets"), "default", "db", alice)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(answer["response"]["status"]["code"], 403);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("need a verified credential with role secret-writer"), "{message}");
    assert_eq!(answer["response"]["auditAnnotations"]["scope"], "secrets");

    // The Kubernetes user reaches the policy: team's configmaps are for group ops alone.
    let (_, answer) = send(&review("u-3", "UPDATE", ("", "configmaps"), "team", "settings", alice)).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(
        answer["response"]["status"]["message"],
        "Kubernetes user alice (groups dev, system:authenticated) may not write here"
    );
    let (_, answer) = send(&review("u-4", "UPDATE", ("", "configmaps"), "team", "settings", olga)).await;
    assert_eq!((answer["response"]["allowed"].as_bool(), answer["response"]["auditAnnotations"]["scope"].as_str()), (Some(true), Some("team")));
    // Another namespace's configmap is the registry scope's, whoever asks.
    let (_, answer) = send(&review("u-5", "DELETE", ("", "configmaps"), "other", "settings", alice)).await;
    assert_eq!((answer["response"]["allowed"].as_bool(), answer["response"]["auditAnnotations"]["scope"].as_str()), (Some(true), Some("registry")));
    // An event lands in the events scope, a lease in leases.
    let (_, answer) = send(&review("u-6", "CREATE", ("events.k8s.io", "events"), "default", "e1", alice)).await;
    assert_eq!(answer["response"]["auditAnnotations"]["scope"], "events", "{answer}");
    let (_, answer) = send(&review("u-7", "UPDATE", ("coordination.k8s.io", "leases"), "kube-node-lease", "n1", alice)).await;
    assert_eq!(answer["response"]["auditAnnotations"]["scope"], "leases", "{answer}");

    // Nothing was written anywhere.
    for group in [&gw.main, &gw.events] {
        let mut client = group.client().await;
        let count = client.get("/registry/", Some(GetOptions::new().with_prefix().with_count_only())).await.unwrap().count();
        assert_eq!(count, 0, "an admission review writes nothing");
    }
    // Counted, and logged with the Kubernetes user as the transport.
    let metrics = gw.running.gateway.metrics();
    assert_eq!((metrics.admission_reviews("CREATE", true), metrics.admission_reviews("CREATE", false)), (2, 1));
    assert_eq!((metrics.admission_reviews("UPDATE", true), metrics.admission_reviews("UPDATE", false)), (2, 1));
    aq_tests::wait_until("the denial reaches the decision log", || {
        gw.decisions().iter().any(|line| line["scope"] == "team" && line["verdict"] == "deny" && line["transport"] == "alice")
    })
    .await;

    // A malformed review gets a 400 naming the field; a non-review body says what to send.
    let mut broken = review("u-8", "CREATE", ("", "pods"), "default", "web", alice);
    broken["request"].as_object_mut().unwrap().remove("uid");
    let (status, answer) = send(&broken).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("request.uid: missing"), "{answer}");
    broken = review("u-9", "CONNECT", ("", "pods"), "default", "web", alice);
    let (status, answer) = send(&broken).await;
    assert_eq!(status, 400);
    assert!(answer["detail"].as_str().unwrap().contains("request.operation: CONNECT writes nothing"), "{answer}");
    let (agent2, url2) = (agent.clone(), url.clone());
    let (status, answer) =
        tokio::task::spawn_blocking(move || post(&agent2, &url2, Some(WEBHOOK_TOKEN), b"{not json".to_vec())).await.unwrap();
    assert_eq!(status, 400);
    assert!(answer["detail"].as_str().unwrap().contains("the body is not JSON"), "{answer}");

    // Without a token nothing is decided; the webhook token can do nothing else.
    let (agent2, url2) = (agent.clone(), url.clone());
    let body = serde_json::to_vec(&review("u-10", "CREATE", ("", "pods"), "default", "web", alice)).unwrap();
    let (status, _) = tokio::task::spawn_blocking(move || post(&agent2, &url2, None, body)).await.unwrap();
    assert_eq!(status, 401);
    let (agent2, scopes) = (agent.clone(), format!("{base}/v1/scopes/registry/evaluate"));
    let body = serde_json::to_vec(&json!({ "ops": [{ "put": { "key": "/registry/pods/a/b" } }] })).unwrap();
    let (status, answer) = tokio::task::spawn_blocking(move || post(&agent2, &scopes, Some(WEBHOOK_TOKEN), body)).await.unwrap();
    assert_eq!(status, 403, "{answer}");
}

/// A Python policy, pushed and bound like any other, decides etcd writes and admission reviews
/// alike: the namespaces example refuses kube-system through both doors with one reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_bound_to_a_scope_decides_etcd_writes_and_admission_reviews_alike() {
    use axum::http::{Method, StatusCode};
    let gw = TestGateway::start().await;
    let (_, python) = aq_tests::guests::NAMESPACES.iter().find(|(language, _)| *language == "python").unwrap();
    let component = aq_tests::guests::bytes(python);
    let (status, pushed) = gw.admin_bytes(Method::POST, "/v1/policies", component).await;
    assert_eq!(status, StatusCode::CREATED, "{pushed}");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(aq_tests::workspace_root().join("examples/namespaces/config.json")).unwrap()).unwrap();
    // Room for whole objects as reviews carry them.
    config["max_value_bytes"] = json!(65536);
    let body = json!({ "digest": pushed["digest"], "config": config });
    let (status, bound) = gw.admin(Method::PUT, "/v1/scopes/registry/policy", body).await;
    assert_eq!(status, StatusCode::OK, "{bound}");

    let mut client = gw.client().await;
    let refused = client.put("/registry/configmaps/kube-system/coredns", "{}", None).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(status) = refused else { panic!("{refused:?}") };
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let reason = "/registry/configmaps/kube-system/coredns: namespace kube-system is frozen";
    assert!(status.message().contains(reason), "{}", status.message());
    client.put("/registry/configmaps/default/coredns", "{}", None).await.expect("another namespace is writable");

    let alice = ("alice", &["dev", "system:authenticated"][..]);
    let denied = review("u-1", "CREATE", ("", "configmaps"), "kube-system", "coredns", alice);
    let (status, answer) = gw.admin_bytes(Method::POST, "/v1/admission/validate", serde_json::to_vec(&denied).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert!(answer["response"]["status"]["message"].as_str().unwrap().contains(reason), "{answer}");
    assert_eq!(answer["response"]["auditAnnotations"]["policy"], pushed["digest"]);
    let allowed = review("u-2", "CREATE", ("", "configmaps"), "team-a", "settings", alice);
    let (_, answer) = gw.admin_bytes(Method::POST, "/v1/admission/validate", serde_json::to_vec(&allowed).unwrap()).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}
