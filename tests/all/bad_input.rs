//! Bad input, generated: malformed, truncated, mistyped and oversized requests to the admin API,
//! hostile names in its paths, mangled components, and absurd or reserved requests on the etcd
//! front. Each is answered with a client error that says what was wrong (never a 5xx, never a
//! crash), and the store is the same afterwards.

use aq_tests::Rng;
use aq_tests::etcd::TestGateway;
use axum::http::{Method, StatusCode};
use serde_json::json;

/// What the admin API shows of its stored state, and every key clients can read: equal before
/// and after bad input means nothing was written.
async fn state(gw: &TestGateway) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    for path in ["/v1/scopes", "/v1/policies", "/v1/principals", "/v1/migrations", "/v1/proposals"] {
        let (status, body) = gw.admin(Method::GET, path, serde_json::Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        seen.push(strip_live(body));
    }
    let mut client = gw.client().await;
    let all = client.get(vec![0u8], Some(etcd_client::GetOptions::new().with_from_key())).await.unwrap();
    let kvs: Vec<serde_json::Value> = all
        .kvs()
        .iter()
        .map(|kv| json!([String::from_utf8_lossy(kv.key()), String::from_utf8_lossy(kv.value()), kv.mod_revision()]))
        .collect();
    seen.push(json!(kvs));
    seen
}

/// aq over two groups with one client key, `/registry/pods/ns/a` = 1: the gateway, a client,
/// and the state to compare with afterwards.
async fn with_one_key() -> (TestGateway, etcd_client::Client, Vec<serde_json::Value>) {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/a", "1", None).await.unwrap();
    let before = state(&gw).await;
    (gw, client, before)
}

/// Drops what changes by itself as time passes (counters and rates) from an admin answer.
fn strip_live(mut value: serde_json::Value) -> serde_json::Value {
    match &mut value {
        serde_json::Value::Object(map) => {
            for live in ["counters", "rates", "stats", "load"] {
                map.remove(live);
            }
            for (_, v) in map.iter_mut() {
                *v = strip_live(v.take());
            }
        }
        serde_json::Value::Array(items) => {
            for v in items.iter_mut() {
                *v = strip_live(v.take());
            }
        }
        _ => {}
    }
    value
}

/// Asserts an answer is a client error with aq's error body: a kind and a detail.
fn assert_clear_refusal(case: &str, status: StatusCode, body: &serde_json::Value) {
    assert!(status.is_client_error(), "{case}: {status} {body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(!body["error"].as_str().unwrap_or_default().is_empty() && detail.len() > 10, "{case}: {status} gave no clear error: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_malformed_mistyped_and_oversized_bodies_clearly_and_changes_nothing() {
    let gw = TestGateway::start().await;
    let before = state(&gw).await;
    // A well-formed body per route, to truncate, mangle and mistype. Those that would change
    // something name what does not exist (a policy, a group), so no variant can succeed.
    let digest = "0".repeat(64);
    let routes: Vec<(Method, String, serde_json::Value)> = vec![
        (Method::PUT, "/v1/scopes/registry/policy".into(), json!({"digest": digest, "config": {"tenant_segment": 2}, "fail_mode": "closed"})),
        (Method::POST, "/v1/scopes/registry/evaluate".into(), json!({"request": {"op": "put", "key": "/registry/pods/a/b", "value": "v"}})),
        (Method::POST, "/v1/principals".into(), json!({"id": "p", "public_key": "00", "roles": ["r"], "weight": 1})),
        (Method::POST, "/v1/scopes/registry/move".into(), json!({"to": "nowhere"})),
        (Method::POST, "/v1/scopes/registry/split".into(), json!({"at": "/registry/pods/m", "to": "nowhere"})),
        (Method::POST, "/v1/admission/validate".into(), json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u"}})),
        (Method::POST, "/v1/proposals/none/approve".into(), json!({"principal": "p", "signature": "00"})),
    ];
    let mut rng = Rng(0x005e_ed0f_bad1_u64);
    let mut cases = 0;
    for (method, path, good) in &routes {
        let text = serde_json::to_vec(good).unwrap();
        let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
        // Truncated anywhere.
        for cut in [1, text.len() / 3, text.len() / 2, text.len() - 1] {
            bodies.push((format!("truncated at {cut}"), text[..cut].to_vec()));
        }
        // Random bytes, and the body with random bytes written over part of it.
        for n in [1, 7, 64, 512] {
            bodies.push((format!("{n} random bytes"), rng.bytes(n)));
            let mut mangled = text.clone();
            let at = (rng.next_u64() as usize) % mangled.len();
            let specials = b"{}[]\":,\\\x00\xff";
            mangled[at] = specials[(rng.next_u64() % specials.len() as u64) as usize];
            bodies.push((format!("byte {at} replaced"), mangled));
        }
        // Every field of the wrong type, and bodies of the wrong shape.
        for (field, _) in good.as_object().unwrap() {
            for wrong in [json!(5), json!("x"), json!([1, 2]), json!({"a": {}}), json!(null), json!(-1e300)] {
                let mut body = good.clone();
                body[field] = wrong.clone();
                bodies.push((format!("{field} = {wrong}"), serde_json::to_vec(&body).unwrap()));
            }
        }
        for shape in [json!([]), json!("body"), json!(17), json!(null), json!({})] {
            bodies.push((format!("body {shape}"), serde_json::to_vec(&shape).unwrap()));
        }
        // Deep nesting, and more than the admin API reads.
        bodies.push(("nested 10000 deep".into(), format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes()));
        let mut huge = b"{\"x\":\"".to_vec();
        huge.resize(3 << 20, b'a');
        huge.extend_from_slice(b"\"}");
        bodies.push(("3 MiB".into(), huge));
        for (what, body) in bodies {
            let (status, answer) = gw.admin_bytes(method.clone(), path, body).await;
            // A well-typed body may still be a valid request (an evaluation of a mistyped
            // value, say): then it is answered, and must not have changed the store either.
            if status.is_success() {
                continue;
            }
            assert_clear_refusal(&format!("{method} {path} with {what}"), status, &answer);
            cases += 1;
        }
    }
    assert!(cases > 200, "only {cases} refusals");
    assert_eq!(state(&gw).await, before, "bad input changed the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_in_admin_paths_are_refused_and_reach_nothing() {
    let gw = TestGateway::start().await;
    let before = state(&gw).await;
    let long = "s".repeat(10_000);
    let names = ["..", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "a%00b", "%FF%FE", "%2Fregistry", "registry%20", "%5C..%5C", long.as_str()];
    for name in names {
        for (method, path, body) in [
            (Method::GET, format!("/v1/scopes/{name}"), serde_json::Value::Null),
            (Method::PUT, format!("/v1/scopes/{name}/policy"), json!({"digest": "00"})),
            (Method::POST, format!("/v1/scopes/{name}/rollback"), json!({})),
            (Method::GET, format!("/v1/policies/{name}"), serde_json::Value::Null),
            (Method::DELETE, format!("/v1/policies/{name}"), serde_json::Value::Null),
            (Method::GET, format!("/v1/lineage/{name}/export"), serde_json::Value::Null),
            (Method::DELETE, format!("/v1/principals/{name}"), serde_json::Value::Null),
            (Method::GET, format!("/v1/migrations/{name}"), serde_json::Value::Null),
        ] {
            let (status, answer) = gw.admin(method.clone(), &path, body).await;
            let shown = &path[..path.len().min(80)];
            assert!(status.is_client_error(), "{method} {shown}: {status} {answer}");
        }
    }
    assert_eq!(state(&gw).await, before, "hostile names changed the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mangled_components_are_refused_with_a_reason_and_nothing_is_stored() {
    let gw = TestGateway::start().await;
    let component = aq_host::builtin::find("open").expect("the open policy is built in").component.to_vec();
    let (_, listed) = gw.admin(Method::GET, "/v1/policies", serde_json::Value::Null).await;
    let stored_before = listed.to_string();
    let mut rng = Rng(0xc0_ffee);
    let mut uploads: Vec<(String, Vec<u8>)> = vec![("nothing".into(), Vec::new()), ("the wasm magic alone".into(), b"\0asm".to_vec())];
    for n in [1, 100, 4096] {
        uploads.push((format!("{n} random bytes"), rng.bytes(n)));
    }
    for cut in [8, 9, 64, component.len() / 4, component.len() / 2, component.len() - 1] {
        uploads.push((format!("truncated at {cut}"), component[..cut].to_vec()));
    }
    // The header mangled: version, layer and the first section's id and size.
    for at in [4, 6, 8, 9] {
        let mut mangled = component.clone();
        mangled[at] ^= 0x5a;
        uploads.push((format!("byte {at} flipped"), mangled));
    }
    for (what, bytes) in uploads {
        let (status, answer) = gw.admin_bytes(Method::POST, "/v1/policies", bytes).await;
        assert_clear_refusal(&format!("a component with {what}"), status, &answer);
    }
    let (_, listed) = gw.admin(Method::GET, "/v1/policies", serde_json::Value::Null).await;
    assert_eq!(listed.to_string(), stored_before, "a refused component was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_and_reserved_requests_on_the_etcd_front_are_refused_and_never_reach_aqs_own_keys() {
    let (gw, mut client, before) = with_one_key().await;
    let current = client.get("/registry/pods/ns/a", None).await.unwrap().header().unwrap().revision();

    // Absurd limits and revisions: etcd's own answers.
    for limit in [-1, i64::MAX] {
        let read = client.get("/registry/", Some(etcd_client::GetOptions::new().with_prefix().with_limit(limit))).await;
        assert_eq!(read.expect("a limit out of range reads everything, as etcd does").kvs().len(), 1, "limit {limit}");
    }
    for revision in [current + 1_000_000, i64::MAX] {
        let refused = client.get("/registry/pods/ns/a", Some(etcd_client::GetOptions::new().with_revision(revision))).await.unwrap_err();
        assert!(refused.to_string().contains("future revision"), "revision {revision}: {refused}");
    }
    let refused = client.get("/registry/pods/ns/a", Some(etcd_client::GetOptions::new().with_revision(-5))).await;
    assert!(refused.is_err() || refused.unwrap().kvs().len() == 1, "a negative revision reads the latest or is refused");
    let refused = client.compact(i64::MAX, None).await.unwrap_err();
    assert!(refused.to_string().contains("future revision"), "{refused}");

    // aq's own keys, in every form a client can name them: never written, read or deleted.
    let reserved = aq_host::index::RESERVED_PREFIX;
    let inside: Vec<Vec<u8>> = vec![reserved.to_vec(), [reserved, b"meta/layout".as_slice()].concat(), [reserved, b"\0".as_slice()].concat()];
    for key in &inside {
        let shown = String::from_utf8_lossy(key).into_owned();
        let refused = client.put(key.clone(), "x", None).await.expect_err("a put to aq's keys is refused");
        assert!(refused.to_string().contains("reserved"), "{shown:?}: {refused}");
    }
    // Prefixes that cover them: reads and deletes see none of them.
    let covering: Vec<Vec<u8>> = [inside.clone(), vec![vec![0xff], b"\xffa".to_vec()]].concat();
    for key in &covering {
        let shown = String::from_utf8_lossy(key).into_owned();
        let read = client.get(key.clone(), Some(etcd_client::GetOptions::new().with_prefix())).await;
        assert!(read.is_err() || read.unwrap().kvs().is_empty(), "a read of {shown:?} shows none of aq's keys");
        let deleted = client.delete(key.clone(), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
        assert!(deleted.is_err() || deleted.unwrap().deleted() == 0, "a delete of {shown:?} deletes none of aq's keys");
    }
    // The whole keyspace: aq's keys are not in it.
    let everything = client.get(vec![0u8], Some(etcd_client::GetOptions::new().with_from_key())).await.unwrap();
    assert!(everything.kvs().iter().all(|kv| !kv.key().starts_with(reserved)), "a read of everything shows aq's keys");
    assert_eq!(state(&gw).await, before, "bad requests changed the store");
}

/// A gRPC codec that sends and receives bytes as they are: a client that frames gRPC but
/// writes whatever protobuf it likes.
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(buf);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_grpc_messages_are_refused_and_aq_serves_on() {
    let (gw, mut client, before) = with_one_key().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", gw.endpoint())).unwrap().connect().await.unwrap();
    // Protobuf no decoder accepts: a length past the end, a varint of eleven bytes, wire types
    // 6 and 7, field number 0, a group never closed, a length of 4 GiB.
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("a length past the end", vec![0x0a, 0x64, b'a']),
        ("an eleven-byte varint", [vec![0x08], vec![0xff; 10], vec![0x01]].concat()),
        ("wire type 7", vec![0x0f, 0x01]),
        ("wire type 6", vec![0x0e, 0x01]),
        ("field number 0", vec![0x00, 0x00]),
        ("an unclosed group", vec![0x0b, 0x08, 0x01]),
        ("a 4 GiB length", vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
    ];
    let paths = [
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/DeleteRange",
        "/etcdserverpb.KV/Txn",
        "/etcdserverpb.KV/Compact",
        "/etcdserverpb.Lease/LeaseGrant",
        "/etcdserverpb.Lease/LeaseRevoke",
        "/etcdserverpb.Auth/Authenticate",
        "/v3lockpb.Lock/Lock",
    ];
    for path in paths {
        for (what, bytes) in &malformed {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let path_and_query = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            let refused = grpc.unary(tonic::Request::new(bytes.clone()), path_and_query, Raw).await.expect_err(what);
            // grpc-go (etcd) answers Internal for a request it cannot unmarshal; so does aq.
            assert!(
                matches!(refused.code(), tonic::Code::Internal | tonic::Code::InvalidArgument) && refused.message().contains("decode"),
                "{path} with {what}: {refused:?}"
            );
        }
    }
    // More than etcd takes in one request (1.5 MiB) and more than a gRPC message may be here.
    for size in [2 << 20, 5 << 20] {
        let refused = client.put("/oversized", vec![b'x'; size], None).await.expect_err("an oversized put");
        let etcd_client::Error::GRpcStatus(status) = refused else { panic!("{refused}") };
        assert!(
            matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::OutOfRange),
            "{size} bytes: {status:?}"
        );
        assert!(!status.message().is_empty());
    }
    assert_eq!(client.get("/registry/pods/ns/a", None).await.unwrap().kvs()[0].value(), b"1", "aq serves on");
    assert_eq!(state(&gw).await, before, "bad messages changed the store");
}
