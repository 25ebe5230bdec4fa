//! `/v1/lineage`: exports of a scope's lineage, checkpoints and inclusion proofs.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Admin, ApiError, Role};
use crate::lineage::log::{self, Export};
use crate::index::KeyRange;
use crate::lineage::store;

fn group(admin: &Admin, scope: &str) -> Result<crate::backend::Group, ApiError> {
    if scope == crate::lineage::META_LOG {
        return Ok(admin.gateway.home().clone());
    }
    admin
        .gateway
        .routing()
        .scope(scope)
        .map(|runtime| runtime.group.clone())
        .ok_or_else(|| ApiError::not_found(format!("no scope {scope:?}; GET /v1/scopes lists them")))
}

fn unavailable(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lineage unavailable", message)
}

/// Export a scope's lineage for `aq lineage verify`: its records, checkpoints (a fresh one is
/// signed first), the root log and a signed checkpoint of the root log.
#[utoipa::path(
    get, path = "/v1/lineage/{scope}/export", tag = "lineage",
    params(("scope" = String, Path, description = "Scope id, or @meta for policy swaps")),
    responses((status = 200, body = Export), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn export(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(scope): Path<String>) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let group = group(&admin, &scope)?;
    // The keys the scope owns itself: nested scopes keep their own logs.
    let routing = admin.gateway.routing();
    let ranges: Vec<KeyRange> = match routing.index().get(&scope) {
        Some(owned) => routing.index().overlapping(&owned.range).into_iter().filter(|(s, _)| s.id == scope).map(|(_, part)| part).collect(),
        None => Vec::new(),
    };
    let export = admin.checkpointer.export(&group, &scope, &ranges).await.map_err(unavailable)?;
    Ok(axum::Json(export).into_response())
}

/// Sign a checkpoint of a scope's log now (replicas also do so every few seconds).
#[utoipa::path(
    post, path = "/v1/lineage/{scope}/checkpoint", tag = "lineage",
    params(("scope" = String, Path, description = "Scope id")),
    responses((status = 200, description = "`{\"checkpoint\": ... | null}` (null: nothing new to sign)"), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub(super) async fn checkpoint(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(scope): Path<String>) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Operator)?;
    let group = group(&admin, &scope)?;
    let checkpoint = admin.checkpointer.checkpoint_now(&group, &scope).await.map_err(unavailable)?;
    Ok(axum::Json(json!({ "checkpoint": checkpoint })).into_response())
}

/// An RFC 6962 inclusion proof of record `index` in the scope's current log.
#[utoipa::path(
    get, path = "/v1/lineage/{scope}/proof/{index}", tag = "lineage",
    params(("scope" = String, Path, description = "Scope id"), ("index" = u64, Path, description = "The record's seq")),
    responses(
        (status = 200, description = "`{scope, index, size, root, record, proof}`: hashes in hex, SHA-256 as in RFC 6962"),
        (status = 404, description = "Unknown scope, or no such record", body = super::ErrorBody),
    ),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn proof(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path((scope, index)): Path<(String, u64)>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let group = group(&admin, &scope)?;
    let records = store::records(&group, &scope).await.map_err(unavailable)?;
    let leaves: Vec<Vec<u8>> = records.iter().map(|r| r.record.as_bytes().to_vec()).collect();
    let (root, proof) = log::prove(&leaves, index as usize).ok_or_else(|| {
        ApiError::not_found(format!("scope {scope} has {} lineage records; there is no record {index}", leaves.len()))
    })?;
    Ok(axum::Json(json!({
        "scope": scope,
        "index": index,
        "size": leaves.len(),
        "root": root,
        "record": records[index as usize].record,
        "proof": proof,
    }))
    .into_response())
}
