//! `GET /v1/openapi.json`.

use axum::response::{IntoResponse, Response};

pub(super) async fn document() -> Response {
    axum::Json(serde_json::json!({})).into_response()
}
