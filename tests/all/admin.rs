//! The admin API's router, in process (`oneshot`), over a gateway on real etcd groups: every
//! route and each error status.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use aq_tests::etcd::{TestGateway, layout};
use aq_tests::guests;
use serde_json::{Value, json};
use tower::ServiceExt;

/// One request to aq's admin router; answers the status and the JSON (or text) body.
async fn call(
    gw: &TestGateway,
    method: Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let router = aq_host::admin::router(gw.running.admin.clone());
    let mut request = Request::builder().method(method).uri(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router.oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn get(gw: &TestGateway, path: &str) -> (StatusCode, Value) {
    call(gw, Method::GET, path, Some(&gw.admin_token()), &[], Vec::new()).await
}

async fn send_json(gw: &TestGateway, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
    let body = serde_json::to_vec(&body).unwrap();
    call(gw, method, path, Some(&gw.admin_token()), &[("content-type", "application/json")], body).await
}

async fn push(gw: &TestGateway, bytes: Vec<u8>) -> (StatusCode, Value) {
    call(gw, Method::POST, "/v1/policies", Some(&gw.admin_token()), &[("content-type", "application/wasm")], bytes).await
}

fn detail(body: &Value) -> &str {
    body["detail"].as_str().unwrap_or_else(|| panic!("an error body: {body}"))
}

fn digest_of(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The default layout's test variant plus an `[admin]` section.
async fn gateway_with_admin(admin: &str) -> TestGateway {
    let admin = admin.to_string();
    TestGateway::start_with(move |main, events| format!("{}\n[admin]\n{admin}\n", layout(main, events))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_unknown_routes() {
    let mut gw = TestGateway::start().await;
    // Probes need no token.
    let (status, body) = call(&gw, Method::GET, "/healthz", None, &[], Vec::new()).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));
    let (status, body) = call(&gw, Method::GET, "/readyz", None, &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["groups"], json!({ "events": "ok", "main": "ok" }));
    let (status, body) = get(&gw, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not found");
    assert!(detail(&body).contains("/nope"), "{body}");
    let (status, body) = get(&gw, "/v1/scopes/registry/rollback").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");

    // A group that stops answering makes the gateway unready, and says which.
    gw.events.stop();
    let (status, body) = get(&gw, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(detail(&body).contains("etcd groups not answering: events"), "{body}");
    assert!(!detail(&body).contains("main ("), "main still answers: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_evaluations_verdicts_and_routed_ops() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/a", "v", None).await.unwrap();
    client.put("/registry/pods/ns/b", "v", None).await.unwrap();
    client.put("/registry/secrets/ns/s", "v", None).await.unwrap_err();
    client.get("/registry/pods/ns/a", None).await.unwrap();
    let (status, text) = call(&gw, Method::GET, "/metrics", None, &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().expect("metrics are text").to_string();
    for line in [
        r#"aq_policy_evaluations_total{scope="registry",verdict="allow"} 2"#,
        r#"aq_policy_evaluations_total{scope="secrets",verdict="deny"} 1"#,
        r#"aq_routed_ops_total{scope="registry",kind="write"} 2"#,
        r#"aq_routed_ops_total{scope="registry",kind="read"} 1"#,
        r#"aq_policy_evaluation_seconds_count{scope="registry"} 2"#,
        "aq_decision_lines_dropped_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains(r#"aq_routed_ops_total{scope="secrets",kind="write"}"#), "the refused write never reached etcd");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_required_and_roles_are_enforced() {
    let reader = "reader-token-0123456789";
    let operator = "operator-token-0123456789";
    let gw = gateway_with_admin(&format!(
        "[[admin.tokens]]\nname = \"dashboards\"\nrole = \"reader\"\nhash = \"{}\"\n\
         [[admin.tokens]]\nname = \"ci\"\nrole = \"operator\"\nhash = \"{}\"\n",
        aq_host::admin::auth::hash_token(reader),
        aq_host::admin::auth::hash_token(operator),
    ))
    .await;
    // No admin token configured: one is generated, mode 0600.
    let path = aq_host::serve::admin_token_path(gw.data_dir());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let admin = gw.admin_token();

    let (status, body) = call(&gw, Method::GET, "/v1/scopes", None, &[], Vec::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(detail(&body).contains("Authorization: Bearer"), "{body}");
    let (status, _) = call(&gw, Method::GET, "/v1/scopes", Some("not-a-token"), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&gw, Method::GET, "/v1/scopes", Some(reader), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK);

    let example = guests::bytes(guests::EXAMPLE_DENY_PREFIX);
    let (status, body) = call(&gw, Method::POST, "/v1/policies", Some(reader), &[], example.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(detail(&body).contains("role reader") && detail(&body).contains("operator"), "{body}");
    let (status, body) = call(&gw, Method::POST, "/v1/policies", Some(operator), &[], example.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let digest = digest_of(&example);
    let path = format!("/v1/policies/{digest}");
    let (status, _) = call(&gw, Method::DELETE, &path, Some(operator), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(&gw, Method::DELETE, &path, Some(&admin), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_are_pushed_listed_read_and_deleted() {
    let gw = TestGateway::start().await;
    let example = guests::bytes(guests::EXAMPLE_DENY_PREFIX);
    let digest = digest_of(&example);

    let (status, body) = push(&gw, example.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["digest"], digest);
    assert_eq!(body["size"], example.len());
    assert!(body["exports"].as_array().unwrap().iter().any(|e| e == "aq:governance/policy@0.1.1"), "{body}");
    // Pushing the same bytes again stores nothing new.
    let (status, body) = push(&gw, example.clone()).await;
    assert_eq!((status, &body["created"]), (StatusCode::OK, &json!(false)), "{body}");

    // The list holds the pushed policy and every configured built-in, with where each is bound.
    let (status, body) = get(&gw, "/v1/policies").await;
    assert_eq!(status, StatusCode::OK);
    let listed = body["policies"].as_array().unwrap();
    let open = digest_of(aq_host::builtin::find("open").unwrap().component);
    let find = |d: &str| listed.iter().find(|p| p["digest"] == d).cloned().unwrap_or_else(|| panic!("{d} in {body}"));
    assert_eq!(find(&digest)["bound_to"], json!([]));
    assert_eq!(find(&open)["bound_to"], json!(["catch-all"]));
    assert_eq!(listed.len(), 5, "open, quota, critical, ephemeral and the example: {body}");

    let (status, body) = get(&gw, &format!("/v1/policies/blake3:{digest}")).await;
    assert_eq!((status, &body["size"]), (StatusCode::OK, &json!(example.len())));
    let (status, body) = get(&gw, &format!("/v1/policies/{}", "0".repeat(64))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = get(&gw, "/v1/policies/xyz").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // Garbage, a core module and an empty body are refused, and nothing is stored.
    for (bytes, says) in [
        (b"not a component at all".to_vec(), "wasm magic"),
        (b"\0asm\x01\0\0\0".to_vec(), "core"),
        (Vec::new(), "empty"),
    ] {
        let (status, body) = push(&gw, bytes).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(detail(&body).contains(says), "{says}: {body}");
    }
    let direct = gw.main.client().await;
    let mut kv = direct.kv_client();
    let stored = kv
        .get(b"\xffaq/meta/chunk/".to_vec(), Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    let chunks_of: std::collections::BTreeSet<String> = stored
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key()[b"\xffaq/meta/chunk/".len()..][..64]).into_owned())
        .collect();
    assert_eq!(chunks_of.len(), 5, "chunks of exactly the five stored policies: {chunks_of:?}");

    // A bound policy cannot be deleted; an unbound one can, chunks and all.
    let (status, body) = call(&gw, Method::DELETE, &format!("/v1/policies/{open}"), Some(&gw.admin_token()), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(detail(&body).contains("catch-all"), "{body}");
    let mut chunks = b"\xffaq/meta/chunk/".to_vec();
    chunks.extend_from_slice(format!("{digest}/").as_bytes());
    let stored = kv.get(chunks.clone(), Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert!(stored.count() > 0, "the example's chunks are stored");
    let path = format!("/v1/policies/{digest}");
    let (status, body) = call(&gw, Method::DELETE, &path, Some(&gw.admin_token()), &[], Vec::new()).await;
    assert_eq!((status, &body["deleted"]), (StatusCode::OK, &json!(digest)));
    assert_eq!(get(&gw, &path).await.0, StatusCode::NOT_FOUND);
    let left = kv.get(chunks, Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    assert_eq!(left.count(), 0, "deleted with the record");
    let (status, _) = call(&gw, Method::DELETE, &path, Some(&gw.admin_token()), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_policies_are_refused_with_413() {
    let gw = gateway_with_admin("max_policy_bytes = 4096").await;
    let example = guests::bytes(guests::EXAMPLE_DENY_PREFIX);
    assert!(example.len() > 4096);
    let (status, body) = push(&gw, example.clone()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(detail(&body).contains("4096") && detail(&body).contains("max_policy_bytes"), "{body}");
    let (status, _) = get(&gw, &format!("/v1/policies/{}", digest_of(&example))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_policies_are_required_when_configured() {
    use ed25519_dalek::{Signer, SigningKey};
    let publisher = SigningKey::from_bytes(&[7u8; 32]);
    let stranger = SigningKey::from_bytes(&[9u8; 32]);
    let gw = gateway_with_admin(&format!(
        "require_signed_policies = true\ntrusted_publishers = [\"{}\"]\n",
        hex_of(publisher.verifying_key().as_bytes())
    ))
    .await;
    let example = guests::bytes(guests::EXAMPLE_DENY_PREFIX);
    let digest = aq_host::engine::PolicyDigest::of(&example);
    let message = aq_host::admin::signed_message(&digest);
    let token = gw.admin_token();
    let with_signature = |key: &SigningKey| hex_of(&key.sign(&message).to_bytes());

    let (status, body) = call(&gw, Method::POST, "/v1/policies", Some(&token), &[], example.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(detail(&body).contains("requires signed policies"), "{body}");
    let forged = with_signature(&stranger);
    let (status, body) =
        call(&gw, Method::POST, "/v1/policies", Some(&token), &[("aq-signature", forged.as_str())], example.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(detail(&body).contains("does not verify"), "{body}");
    // A valid signature over other bytes does not carry over.
    let other = aq_host::admin::signed_message(&aq_host::engine::PolicyDigest::of(b"other"));
    let misplaced = hex_of(&publisher.sign(&other).to_bytes());
    let (status, _) =
        call(&gw, Method::POST, "/v1/policies", Some(&token), &[("aq-signature", misplaced.as_str())], example.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(&gw, Method::GET, &format!("/v1/policies/{}", digest.to_hex()), Some(&token), &[], Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "refused pushes store nothing: {body}");

    let signed = with_signature(&publisher);
    let (status, body) =
        call(&gw, Method::POST, "/v1/policies", Some(&token), &[("aq-signature", signed.as_str())], example.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, body) = call(&gw, Method::GET, &format!("/v1/policies/{}", digest.to_hex()), Some(&token), &[], Vec::new()).await;
    assert_eq!(body["publisher"], hex_of(publisher.verifying_key().as_bytes()));
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bound_policy_governs_writes_and_rollback_restores_the_previous_one() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    let example = guests::bytes(guests::EXAMPLE_DENY_PREFIX);
    let digest = digest_of(&example);
    assert_eq!(push(&gw, example).await.0, StatusCode::CREATED);
    let quota = digest_of(aq_host::builtin::find("quota").unwrap().component);
    client.put("/registry/apiregistration.k8s.io/v1", "before", None).await.expect("quota allows it");

    let config = json!({ "read_only": ["/registry/apiregistration.k8s.io/"] });
    let (status, body) =
        send_json(&gw, Method::PUT, "/v1/scopes/registry/policy", json!({ "digest": digest, "config": config })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"]["digest"], digest);
    assert_eq!(body["previous"]["digest"], quota);
    assert_eq!(body["active"]["fail_mode"], "closed", "kept from the previous binding");

    let denied = client.put("/registry/apiregistration.k8s.io/v1", "after", None).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(status) = denied else { panic!("{denied:?}") };
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(status.message().contains("read-only prefix"), "{}", status.message());
    client.put("/registry/pods/ns/a", "v", None).await.expect("other keys are writable");
    // The deny is in the decision log with the policy that decided.
    let line = wait_for_decision(&gw, |l| l["verdict"] == "deny" && l["key"] == "/registry/apiregistration.k8s.io/v1").await;
    assert_eq!(line["policy"], digest);
    assert_eq!(line["scope"], "registry");
    assert!(line["reason"].as_str().unwrap().contains("read-only prefix"), "{line}");

    // A configuration the policy refuses is a 400, and the binding stays.
    let (status, body) =
        send_json(&gw, Method::PUT, "/v1/scopes/registry/policy", json!({ "digest": digest, "config": { "read_only": [""] } })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(detail(&body).contains("every key read-only"), "{body}");
    let (status, body) = send_json(&gw, Method::PUT, "/v1/scopes/registry/policy", json!({ "digest": "0".repeat(64) })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = send_json(&gw, Method::PUT, "/v1/scopes/nope/policy", json!({ "digest": digest })).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(detail(&body).contains("registry"), "lists the known scopes: {body}");
    let (status, body) = send_json(&gw, Method::PUT, "/v1/scopes/registry/policy", json!({ "digst": digest })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(client.put("/registry/apiregistration.k8s.io/v1", "still", None).await.is_err(), "still the example policy");

    // Rollback returns to quota; a second rollback undoes the first.
    let (status, body) = send_json(&gw, Method::POST, "/v1/scopes/registry/rollback", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"]["digest"], quota);
    client.put("/registry/apiregistration.k8s.io/v1", "rolled back", None).await.expect("quota again");
    let (_, body) = get(&gw, "/v1/scopes/registry").await;
    assert_eq!(body["binding"]["digest"], quota);
    assert_eq!(body["stored"]["previous"]["digest"], digest);
    assert_eq!(body["counters"]["swaps"], 2);
    let (status, _) = send_json(&gw, Method::POST, "/v1/scopes/registry/rollback", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(client.put("/registry/apiregistration.k8s.io/v1", "x", None).await.is_err());

    // A scope never swapped has nothing to roll back to.
    let (status, body) = send_json(&gw, Method::POST, "/v1/scopes/events/rollback", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

/// Waits until the decision log has a line matching `wanted`.
async fn wait_for_decision(gw: &TestGateway, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(line) = gw.decisions().into_iter().find(|l| wanted(l)) {
            return line;
        }
        assert!(std::time::Instant::now() < deadline, "no such decision line in {:?}", gw.decisions());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scopes_are_listed_as_a_tree_with_bindings_and_counters() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/a", "v", None).await.unwrap();
    let (status, body) = get(&gw, "/v1/scopes").await;
    assert_eq!(status, StatusCode::OK);
    let roots = body["scopes"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{body}");
    assert_eq!(roots[0]["id"], "catch-all");
    let registry = &roots[0]["children"][0];
    assert_eq!(registry["id"], "registry");
    assert_eq!(registry["group"], "main");
    assert_eq!(registry["range"], json!({ "start": "/registry/", "end": "/registry0" }));
    assert_eq!(registry["counters"]["allowed"], 1);
    assert_eq!(registry["counters"]["writes"], 1);
    assert_eq!(registry["binding"]["digest"], digest_of(aq_host::builtin::find("quota").unwrap().component));
    assert_eq!(registry["stored"]["source"], "config");
    let children: Vec<&str> = registry["children"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(children, ["events", "leases", "secrets"]);

    let (status, body) = get(&gw, "/v1/scopes/secrets").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["parent"], "registry");
    assert_eq!(body["labels"], json!({ "tier": "critical" }));
    assert_eq!(body["binding"]["config"], json!({ "role": "secret-writer" }));
    let (status, _) = get(&gw, "/v1/scopes/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dry_runs_decide_without_writing() {
    let gw = TestGateway::start().await;
    let evaluate = |scope: &str, body: Value| {
        let path = format!("/v1/scopes/{scope}/evaluate");
        let gw = &gw;
        async move { send_json(gw, Method::POST, &path, body).await }
    };
    let (status, body) = evaluate("registry", json!({ "ops": [{ "put": { "key": "/registry/pods/ns/a", "value": "v" } }] })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["verdict"], "allow");
    assert_eq!(body["written"], false);
    assert!(body["elapsed_us"].as_f64().unwrap() > 0.0);

    let (status, body) = evaluate("secrets", json!({ "ops": [{ "put": { "key": "/registry/secrets/ns/s", "value": "v" } }] })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["verdict"], "deny", "{body}");
    assert!(body["reason"].as_str().unwrap().contains("the request is unsigned"), "{body}");

    let (status, body) = evaluate("registry", json!({ "ops": [{ "delete": { "key": "/registry/pods/", "range_end": "/registry/pods0" } }] })).await;
    assert_eq!((status, &body["verdict"]), (StatusCode::OK, &json!("allow")), "{body}");

    // Nothing was written, and nothing was counted or logged.
    let mut direct = gw.main.client().await;
    assert_eq!(direct.get("/registry/pods/ns/a", None).await.unwrap().count(), 0);
    assert_eq!(gw.running.gateway.metrics().evaluations("registry", "allow"), 0);

    let (status, body) = evaluate("registry", json!({ "ops": [{ "put": { "key": "/other", "value": "v" } }] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(detail(&body).contains("scope registry only"), "{body}");
    let (status, _) = evaluate("registry", json!({ "ops": [] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = evaluate("registry", json!({ "ops": [{ "patch": {} }] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = evaluate("nope", json!({ "ops": [{ "put": { "key": "/x" } }] })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openapi_document_lists_every_route_with_its_role() {
    let gw = TestGateway::start().await;
    let (status, doc) = call(&gw, Method::GET, "/v1/openapi.json", None, &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for (path, method, role) in [
        ("/v1/policies", "post", Some("operator")),
        ("/v1/policies", "get", Some("reader")),
        ("/v1/policies/{digest}", "get", Some("reader")),
        ("/v1/policies/{digest}", "delete", Some("admin")),
        ("/v1/principals", "get", Some("reader")),
        ("/v1/principals", "post", Some("admin")),
        ("/v1/principals/{id}", "delete", Some("admin")),
        ("/v1/proposals", "get", Some("reader")),
        ("/v1/proposals/{id}", "get", Some("reader")),
        ("/v1/proposals/{id}/approve", "post", Some("reader")),
        ("/v1/proposals/{id}/reject", "post", Some("operator")),
        ("/v1/scopes", "get", Some("reader")),
        ("/v1/scopes/{scope}", "get", Some("reader")),
        ("/v1/scopes/{scope}/policy", "put", Some("operator")),
        ("/v1/scopes/{scope}/rollback", "post", Some("operator")),
        ("/v1/scopes/{scope}/evaluate", "post", Some("operator")),
        ("/healthz", "get", None),
        ("/readyz", "get", None),
        ("/metrics", "get", None),
    ] {
        let operation = &paths.get(path).unwrap_or_else(|| panic!("{path} missing"))[method];
        assert!(operation.is_object(), "{method} {path} missing");
        assert_eq!(operation["security"][0]["bearer"][0].as_str(), role, "{method} {path}");
    }
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let bind = &doc["components"]["schemas"]["BindRequest"];
    assert_eq!(bind["required"], json!(["digest"]), "{bind}");
}
