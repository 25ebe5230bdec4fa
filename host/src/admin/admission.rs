//! `POST /v1/admission/validate`: aq as a Kubernetes validating admission webhook. The review
//! becomes the write kube-apiserver would send etcd for it ([`crate::admission`]), and the scope
//! that owns the object's key decides, with its active policy, exactly as it decides that write
//! through the etcd API. Counted and logged like any decision; nothing is written.

use std::sync::Arc;
use std::time::Instant;

use aq_sdk as m;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{Admin, ApiError, Role};
use crate::admission::{self, Verdict};
use crate::gate::GateError;

/// Largest review accepted: an object and its old version, each up to etcd's 1.5 MiB request
/// limit, with room for the review around them.
pub(super) const MAX_REVIEW_BYTES: usize = 8 << 20;

/// Decide an admission review.
#[utoipa::path(
    post, path = "/v1/admission/validate", tag = "admission",
    request_body(content = serde_json::Value, description = "An `admission.k8s.io/v1` AdmissionReview with its `request`"),
    responses(
        (status = 200, description = "The AdmissionReview with `response`: `uid`, `allowed`, and for a denial `status.code` 403 and `status.message` (the policy's reason)", body = serde_json::Value),
        (status = 400, description = "Not an AdmissionReview aq can read; the detail names the field", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody), (status = 413, description = "Over 8 MiB", body = super::ErrorBody),
        (status = 503, description = "The scope's etcd group did not answer a policy's read", body = super::ErrorBody),
    ),
    security(("bearer" = ["webhook"]))
)]
pub(super) async fn validate(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Webhook)?;
    let started = Instant::now();
    let body = axum::body::to_bytes(body, MAX_REVIEW_BYTES).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too large", format!("an AdmissionReview over {MAX_REVIEW_BYTES} bytes"))
    })?;
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body is not JSON ({e}); send an admission.k8s.io/v1 AdmissionReview"))
    })?;
    let review = admission::parse(&value, &admin.kube_etcd_prefix)
        .map_err(|e| ApiError::bad_request(format!("not an AdmissionReview aq can decide: {e}")))?;
    let transport = m::TransportIdentity { kube_user: Some(review.user.clone()), ..Default::default() };
    // Like the write path, a policy read blocks this worker in place while etcd answers.
    let verdict = match admin.gateway.decide(review.ops.clone(), review.compares.clone(), transport) {
        Ok(decided) => admission::verdict(&decided.scope, &decided.evaluation),
        // A key no scope owns cannot be written through aq either.
        Err(e @ (GateError::Unowned(_) | GateError::Reserved(_))) => Verdict { allowed: false, message: Some(e.to_string()), audit: Vec::new() },
        Err(other) => {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "evaluation failed", format!("{other}; kube-apiserver applies the webhook's failurePolicy")));
        }
    };
    admin.gateway.metrics().admission_reviewed(review.operation.name(), verdict.allowed, started.elapsed().as_secs_f64());
    tracing::debug!(uid = %review.uid, operation = review.operation.name(), key = %String::from_utf8_lossy(&review.key), allowed = verdict.allowed, "admission review");
    Ok(axum::Json(admission::answer(&review, &verdict)).into_response())
}
