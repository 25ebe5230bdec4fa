//! The HTTP admin API (axum). Served so far: liveness, readiness and Prometheus metrics,
//! unauthenticated as is conventional for probes and scrapes. Errors are JSON
//! `{"error": ..., "detail": ...}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::gate::Gateway;

/// How long readiness waits for each group.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The admin routes over `gateway`.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(gateway)
}

/// An error answer.
fn error(status: StatusCode, error: &str, detail: String) -> Response {
    (status, axum::Json(json!({ "error": error, "detail": detail }))).into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// Ready when every backend group answers a status request.
async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut groups = serde_json::Map::new();
    let mut down = Vec::new();
    for (name, group) in gateway.groups() {
        let state = match tokio::time::timeout(READY_TIMEOUT, group.status()).await {
            Ok(Ok(_)) => "ok".to_string(),
            Ok(Err(status)) => format!("error: {}", status.message()),
            Err(_) => format!("no answer within {READY_TIMEOUT:?}"),
        };
        if state != "ok" {
            down.push(format!("{name} ({state})"));
        }
        groups.insert(name.clone(), json!(state));
    }
    if down.is_empty() {
        axum::Json(json!({ "ready": true, "groups": groups })).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not ready", format!("etcd groups not answering: {}", down.join(", ")))
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        gateway.metrics().encode(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(StatusCode::NOT_FOUND, "not found", format!("no route {}; see /healthz, /readyz, /metrics", uri.path()))
}
