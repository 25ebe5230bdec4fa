//! The admin API's probes and metrics, over a gateway on real etcd groups.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use aq_tests::etcd::TestGateway;
use tower::ServiceExt;

async fn get(gw: &TestGateway, path: &str) -> (StatusCode, String) {
    let router = aq_host::admin::router(gw.running.gateway.clone());
    let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_unknown_routes() {
    let mut gw = TestGateway::start().await;
    assert_eq!(get(&gw, "/healthz").await, (StatusCode::OK, r#"{"status":"ok"}"#.to_string()));
    let (status, body) = get(&gw, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(r#""events":"ok""#) && body.contains(r#""main":"ok""#), "{body}");
    let (status, body) = get(&gw, "/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains(r#""error":"not found""#) && body.contains("/nope"), "{body}");

    // A group that stops answering makes the gateway unready, and says which.
    gw.events.stop();
    let (status, body) = get(&gw, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("etcd groups not answering: events"), "{body}");
    assert!(!body.contains("main ("), "main still answers: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_evaluations_verdicts_and_routed_ops() {
    let gw = TestGateway::start().await;
    let mut client = gw.client().await;
    client.put("/registry/pods/ns/a", "v", None).await.unwrap();
    client.put("/registry/pods/ns/b", "v", None).await.unwrap();
    client.put("/registry/secrets/ns/s", "v", None).await.unwrap_err();
    client.get("/registry/pods/ns/a", None).await.unwrap();
    let (status, text) = get(&gw, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        r#"aq_policy_evaluations_total{scope="registry",verdict="allow"} 2"#,
        r#"aq_policy_evaluations_total{scope="secrets",verdict="deny"} 1"#,
        r#"aq_routed_ops_total{scope="registry",kind="write"} 2"#,
        r#"aq_routed_ops_total{scope="registry",kind="read"} 1"#,
        r#"aq_policy_evaluation_seconds_count{scope="registry"} 2"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
    assert!(!text.contains(r#"aq_routed_ops_total{scope="secrets",kind="write"}"#), "the denied write never reached etcd");
}
