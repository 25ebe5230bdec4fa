//! `/v1/proposals`: writes waiting for approvals; approve and reject.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{Admin, ApiError, Json, Role};
use crate::gate::ApprovalError;
use crate::trust::proposal::Proposal;

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        match e {
            ApprovalError::Unknown(_) => ApiError::not_found(e.to_string()),
            ApprovalError::NotPending { .. } => ApiError::conflict(e.to_string()),
            ApprovalError::BadSignature(_) => ApiError::new(StatusCode::FORBIDDEN, "bad signature", e.to_string()),
            ApprovalError::NotVoter { .. } => ApiError::new(StatusCode::FORBIDDEN, "not a voter", e.to_string()),
            ApprovalError::Meta(e) => e.into(),
        }
    }
}

/// List proposals, pending and decided (decided ones are kept for audit).
#[utoipa::path(
    get, path = "/v1/proposals", tag = "proposals",
    responses((status = 200, description = "`{\"proposals\": [...]}`", body = Vec<Proposal>), (status = 401, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let proposals = admin.gateway.proposals().await?;
    Ok(axum::Json(json!({ "proposals": proposals })).into_response())
}

/// One proposal, with the request approvers sign (recompute its digest before signing).
#[utoipa::path(
    get, path = "/v1/proposals/{id}", tag = "proposals",
    params(("id" = String, Path, description = "Proposal id")),
    responses((status = 200, body = Proposal), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn get(State(admin): State<Arc<Admin>>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    Ok(axum::Json(admin.gateway.proposal(&id).await?).into_response())
}

/// A signed approval.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ApproveRequest {
    /// The approver's public key, hex.
    key: String,
    /// ed25519 signature over the proposal's `approval_digest`, hex.
    signature: String,
}

/// Approve: the signature is the approver's authority (the token only needs to read). At the
/// threshold the write commits, or the proposal becomes void if its keys changed meanwhile.
#[utoipa::path(
    post, path = "/v1/proposals/{id}/approve", tag = "proposals",
    params(("id" = String, Path, description = "Proposal id")),
    request_body = ApproveRequest,
    responses(
        (status = 200, description = "The proposal afterwards: still pending, committed or void", body = Proposal),
        (status = 400, body = super::ErrorBody),
        (status = 403, description = "Unknown key, bad signature, or not a voter", body = super::ErrorBody),
        (status = 404, body = super::ErrorBody),
        (status = 409, description = "Not pending any more", body = super::ErrorBody),
    ),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn approve(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<ApproveRequest>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let key: [u8; 32] = hex::decode(&request.key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| ApiError::bad_request("key must be an ed25519 public key, 64 hex digits"))?;
    let signature: [u8; 64] = hex::decode(&request.signature)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| ApiError::bad_request("signature must be an ed25519 signature, 128 hex digits"))?;
    Ok(axum::Json(admin.gateway.approve(&id, key, signature).await?).into_response())
}

/// A rejection.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RejectRequest {
    /// Why, for the audit record.
    #[serde(default)]
    reason: String,
}

/// Reject a pending proposal; it is kept for audit.
#[utoipa::path(
    post, path = "/v1/proposals/{id}/reject", tag = "proposals",
    params(("id" = String, Path, description = "Proposal id")),
    request_body = RejectRequest,
    responses((status = 200, body = Proposal), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub(super) async fn reject(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(request): Json<RejectRequest>,
) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Operator)?;
    Ok(axum::Json(admin.gateway.reject(&id, &request.reason, &caller.name).await?).into_response())
}
