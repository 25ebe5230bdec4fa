//! `/v1/principals`: who can sign requests and approvals.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Admin, ApiError, Json, Role};
use crate::trust::Principal;

/// List principals.
#[utoipa::path(
    get, path = "/v1/principals", tag = "principals",
    responses((status = 200, description = "`{\"principals\": [...]}`", body = Vec<Principal>), (status = 401, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let principals = admin.syncer.store().principals().await?;
    Ok(axum::Json(json!({ "principals": principals })).into_response())
}

/// Add a principal, or replace the one with the same id.
#[utoipa::path(
    post, path = "/v1/principals", tag = "principals",
    request_body = Principal,
    responses(
        (status = 201, description = "Added", body = Principal),
        (status = 200, description = "Replaced", body = Principal),
        (status = 400, description = "Bad id or key", body = super::ErrorBody),
        (status = 403, body = super::ErrorBody),
    ),
    security(("bearer" = ["admin"]))
)]
pub(super) async fn add(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Json(mut principal): Json<Principal>,
) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Admin)?;
    let keys = principal.validate().map_err(ApiError::bad_request)?;
    principal.keys = keys.iter().map(|k| hex::encode(k.as_bytes())).collect();
    let created = admin.syncer.store().put_principal(&principal).await?;
    admin.syncer.reload_principals().await?;
    tracing::info!(principal = %principal.id, roles = ?principal.roles, by = %caller.name, created, "principal stored");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(principal)).into_response())
}

/// Remove a principal; its signatures stop counting at once.
#[utoipa::path(
    delete, path = "/v1/principals/{id}", tag = "principals",
    params(("id" = String, Path, description = "Principal id")),
    responses((status = 200, description = "`{\"deleted\": id}`"), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub(super) async fn remove(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Admin)?;
    if !admin.syncer.store().delete_principal(&id).await? {
        return Err(ApiError::not_found(format!("no principal {id:?}; GET /v1/principals lists them")));
    }
    admin.syncer.reload_principals().await?;
    Ok(axum::Json(json!({ "deleted": id })).into_response())
}
