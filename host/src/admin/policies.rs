//! `/v1/policies`: push, list, read and delete stored policy components.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ed25519_dalek::{Signature, Verifier};
use serde::Serialize;
use serde_json::json;

use super::{Admin, ApiError, Role, parse_digest};
use crate::engine::PolicyDigest;
use crate::clock::unix_now;
use crate::meta::{CHUNK_BYTES, PolicyRecord};

/// The request header carrying a publisher's ed25519 signature (hex) over
/// [`signed_message`] of the pushed component.
pub const SIGNATURE_HEADER: &str = "aq-signature";

/// What a publisher signs for a component: a domain-separated statement of its digest.
pub fn signed_message(digest: &PolicyDigest) -> Vec<u8> {
    let mut message = b"aq policy component v1\0".to_vec();
    message.extend_from_slice(&digest.0);
    message
}

/// A stored policy as listed.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Listed {
    #[serde(flatten)]
    record: PolicyRecord,
    /// Scopes binding it, as active or last-known-good.
    bound_to: Vec<String>,
}

/// The publisher whose signature in `headers` covers `digest`, if any.
fn check_signature(admin: &Admin, headers: &HeaderMap, digest: &PolicyDigest) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(SIGNATURE_HEADER) else {
        if admin.require_signed_policies {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unsigned policy",
                format!(
                    "this aq requires signed policies: send header {SIGNATURE_HEADER}: <hex ed25519 signature> \
                     by a trusted publisher (aq policy push --sign-key <file>)"
                ),
            ));
        }
        return Ok(None);
    };
    let bytes: [u8; 64] = value
        .to_str()
        .ok()
        .and_then(|v| hex::decode(v.trim()).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ApiError::bad_request(format!("header {SIGNATURE_HEADER} is not a 128-hex-digit ed25519 signature")))?;
    let signature = Signature::from_bytes(&bytes);
    let message = signed_message(digest);
    match admin.publishers.iter().find(|key| key.verify(&message, &signature).is_ok()) {
        Some(key) => Ok(Some(hex::encode(key.as_bytes()))),
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "untrusted signature",
            format!("the signature does not verify against any trusted publisher key for policy {}", digest.to_hex()),
        )),
    }
}

/// The answer to a push.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct Pushed {
    /// blake3 of the component, hex.
    digest: String,
    /// Size in bytes.
    size: u64,
    /// The component's exports.
    exports: Vec<String>,
    /// False when the same bytes were already stored.
    created: bool,
}

/// Store a policy component: validated against the `aq:governance` world, stored
/// content-addressed in the meta group.
#[utoipa::path(
    post, path = "/v1/policies", tag = "policies",
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The component's bytes"),
    params(("aq-signature" = Option<String>, Header, description = "hex ed25519 signature by a trusted publisher over the component's digest; required with require_signed_policies")),
    responses(
        (status = 201, description = "Stored", body = Pushed),
        (status = 200, description = "Already stored", body = Pushed),
        (status = 400, description = "Not a component of the world", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody), (status = 403, description = "Role too low, or signature missing or untrusted", body = super::ErrorBody),
        (status = 413, description = "Over max_policy_bytes", body = super::ErrorBody),
    ),
    security(("bearer" = ["operator"]))
)]
pub(super) async fn push(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Operator)?;
    let limit = admin.max_policy_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
            format!("the component exceeds the limit of {limit} bytes ([admin] max_policy_bytes)"),
        )
    })?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request("the body is empty; send the component's bytes (Content-Type: application/wasm)"));
    }
    let digest = PolicyDigest::of(&bytes);
    let publisher = check_signature(&admin, &headers, &digest)?;
    let module = admin
        .syncer
        .load(bytes.to_vec())
        .await
        .map_err(|e| ApiError::bad_request(format!("not a policy component aq can run: {e}")))?;
    let record = PolicyRecord {
        digest: digest.to_hex(),
        size: bytes.len() as u64,
        exports: module.exports().to_vec(),
        chunks: bytes.len().div_ceil(CHUNK_BYTES) as u32,
        stored_at: unix_now(),
        publisher,
    };
    let created = admin.syncer.store().store_policy(&bytes, &record).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    tracing::info!(policy = %record.digest, size = record.size, created, "policy pushed");
    let answer = Pushed { digest: record.digest, size: record.size, exports: record.exports, created };
    Ok((status, axum::Json(answer)).into_response())
}

async fn bound_scopes(admin: &Admin) -> Result<Vec<(String, String, Option<String>)>, ApiError> {
    let (bindings, _) = admin.syncer.store().bindings().await?;
    Ok(bindings
        .into_iter()
        .map(|(scope, record, _)| (scope, record.active.digest, record.previous.map(|p| p.digest)))
        .collect())
}

fn bound_to(bound: &[(String, String, Option<String>)], digest: &str) -> Vec<String> {
    bound
        .iter()
        .filter(|(_, active, previous)| active == digest || previous.as_deref() == Some(digest))
        .map(|(scope, _, _)| scope.clone())
        .collect()
}

/// List stored policies and the scopes binding each.
#[utoipa::path(
    get, path = "/v1/policies", tag = "policies",
    responses((status = 200, description = "`{\"policies\": [...]}`", body = Vec<Listed>), (status = 401, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let bound = bound_scopes(&admin).await?;
    let policies: Vec<Listed> = admin
        .syncer
        .store()
        .policies()
        .await?
        .into_iter()
        .map(|record| Listed { bound_to: bound_to(&bound, &record.digest), record })
        .collect();
    Ok(axum::Json(json!({ "policies": policies })).into_response())
}

/// One stored policy.
#[utoipa::path(
    get, path = "/v1/policies/{digest}", tag = "policies",
    params(("digest" = String, Path, description = "64 hex digits, optionally prefixed blake3:")),
    responses((status = 200, body = Listed), (status = 400, body = super::ErrorBody), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn get(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let digest = parse_digest(&digest)?;
    let record = admin.syncer.store().policy(&digest).await?.ok_or_else(|| {
        ApiError::not_found(format!("no stored policy with digest {digest}; GET /v1/policies lists them"))
    })?;
    let bound = bound_scopes(&admin).await?;
    Ok(axum::Json(Listed { bound_to: bound_to(&bound, &digest), record }).into_response())
}

/// Delete a stored policy; refused while a scope binds it (active or last-known-good).
#[utoipa::path(
    delete, path = "/v1/policies/{digest}", tag = "policies",
    params(("digest" = String, Path, description = "64 hex digits, optionally prefixed blake3:")),
    responses((status = 200, description = "`{\"deleted\": digest}`"), (status = 404, body = super::ErrorBody), (status = 409, description = "Still bound", body = super::ErrorBody)),
    security(("bearer" = ["admin"]))
)]
pub(super) async fn delete(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Admin)?;
    let digest = parse_digest(&digest)?;
    let record = admin.syncer.store().delete_policy(&digest).await?;
    admin.syncer.forget(&digest);
    Ok(axum::Json(json!({ "deleted": record.digest })).into_response())
}
