//! `/v1/migrations`, `POST /v1/scopes/{scope}/move`, `…/split` and `…/merge`: live moves of a
//! scope onto another etcd group, started here and followed by their record in meta.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, ApiError, Json, Role};
use crate::adapt::migrate::MigrateError;

/// Where a scope moves.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveRequest {
    /// The group the scope moves to.
    group: String,
}

/// Where a scope splits, and where its new part goes.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SplitRequest {
    /// The first key of the new scope; the parent keeps the keys before it.
    at: String,
    /// The group the new scope moves to; absent: it stays on the parent's group.
    #[serde(default)]
    group: Option<String>,
    /// The new scope's id; absent: `<scope>-<n>`.
    #[serde(default)]
    id: Option<String>,
}

#[utoipa::path(
    post, path = "/v1/scopes/{scope}/split", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    request_body = SplitRequest,
    responses(
        (status = 202, description = "`{scope, migration}`: the new scope, and the migration moving it (null when it stays)", body = serde_json::Value),
        (status = 400, body = super::ErrorBody), (status = 409, description = "Another migration is under way", body = super::ErrorBody)
    ),
    security(("bearer" = ["admin"]))
)]
pub(super) async fn split_scope(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(scope): Path<String>,
    Json(request): Json<SplitRequest>,
) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Admin)?;
    let migrator = migrator(&admin)?;
    let (id, migration) =
        migrator.split(&scope, request.at.as_bytes(), request.group.as_deref(), request.id.as_deref()).await?;
    tracing::info!(%scope, new = %id, at = %request.at, by = %caller.name, "scope split requested");
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "scope": id, "migration": migration }))).into_response())
}

#[utoipa::path(
    post, path = "/v1/scopes/{scope}/merge", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    responses(
        (status = 202, description = "`{into, migration}`: the scope that takes the keys over, and the migration moving them onto its group (null when they were there already)", body = serde_json::Value),
        (status = 400, body = super::ErrorBody), (status = 409, description = "Another migration is under way", body = super::ErrorBody)
    ),
    security(("bearer" = ["admin"]))
)]
pub(super) async fn merge_scope(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(scope): Path<String>) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Admin)?;
    let migrator = migrator(&admin)?;
    let (into, migration) = migrator.merge(&scope).await?;
    tracing::info!(%scope, %into, by = %caller.name, "scope merge requested");
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "into": into, "migration": migration }))).into_response())
}

impl From<MigrateError> for ApiError {
    fn from(e: MigrateError) -> Self {
        match e {
            MigrateError::Invalid(_) => ApiError::bad_request(e.to_string()),
            MigrateError::Busy(_) => ApiError::conflict(e.to_string()),
            MigrateError::Failed(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "migration failed to start", e.to_string()),
        }
    }
}

fn migrator(admin: &Admin) -> Result<&Arc<crate::adapt::migrate::Migrator>, ApiError> {
    admin.migrator.as_ref().ok_or_else(|| {
        ApiError::new(StatusCode::NOT_IMPLEMENTED, "no migrator", "this replica was started without group credentials to move scopes with")
    })
}

#[utoipa::path(
    post, path = "/v1/scopes/{scope}/move", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    request_body = MoveRequest,
    responses(
        (status = 202, description = "The migration started; follow it at /v1/migrations/{id}", body = serde_json::Value),
        (status = 400, body = super::ErrorBody), (status = 409, description = "Another migration is under way", body = super::ErrorBody)
    ),
    security(("bearer" = ["admin"]))
)]
pub(super) async fn move_scope(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(scope): Path<String>,
    Json(request): Json<MoveRequest>,
) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Admin)?;
    let started = migrator(&admin)?.start(&scope, &request.group).await?;
    tracing::info!(id = %started.id, %scope, to = %request.group, by = %caller.name, "scope move requested");
    Ok((StatusCode::ACCEPTED, axum::Json(started)).into_response())
}

#[utoipa::path(
    get, path = "/v1/migrations", tag = "scopes",
    responses((status = 200, description = "`{\"migrations\": [migration...]}`, oldest first", body = serde_json::Value)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let migrations = admin.syncer.store().migrations().await?;
    Ok(axum::Json(json!({ "migrations": migrations })).into_response())
}

#[utoipa::path(
    get, path = "/v1/migrations/{id}", tag = "scopes",
    params(("id" = String, Path, description = "Migration id")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn get(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    match admin.syncer.store().migration(&id).await? {
        Some(migration) => Ok(axum::Json(migration).into_response()),
        None => Err(ApiError::not_found(format!("no migration {id:?}; GET /v1/migrations lists them"))),
    }
}

#[utoipa::path(
    get, path = "/v1/groups", tag = "scopes",
    responses((status = 200, description = "`{\"groups\": [{name, endpoints, scopes, started}]}` by name: each etcd group this replica routes to, the scopes it holds, and whether aq started it at run time for a split", body = serde_json::Value)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn groups(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    Ok(axum::Json(json!({ "groups": group_list(&admin).await? })).into_response())
}

/// The groups as `GET /v1/groups` shows them.
pub(super) async fn group_list(admin: &Admin) -> Result<serde_json::Value, ApiError> {
    let started = admin.syncer.store().started_groups().await?;
    let routing = admin.gateway.routing();
    let groups: Vec<serde_json::Value> = admin
        .gateway
        .groups()
        .iter()
        .map(|(name, group)| {
            let scopes: Vec<&str> =
                routing.index().scopes().iter().filter(|s| &s.group == name).map(|s| s.id.as_str()).collect();
            json!({
                "name": name,
                "endpoints": group.endpoints(),
                "scopes": scopes,
                "started": started.iter().any(|g| &g.name == name),
            })
        })
        .collect();
    Ok(serde_json::Value::Array(groups))
}
