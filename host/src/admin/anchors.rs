//! `/v1/anchors/cosign`: a peer replica asks this one to co-sign a write its policy requires
//! anchors for. No bearer token: the caller proves it is a registered anchor by signing the
//! body with its identity key (header `aq-anchor`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{Admin, ApiError};
use crate::gate::anchors::CosignError;
use crate::trust::anchor::{ANCHOR_HEADER, CosignAnswer, CosignRequest};

/// The largest co-sign call: an etcd request (1.5 MiB by default) in hex, with room to spare.
const MAX_COSIGN_BYTES: usize = 8 << 20;

impl From<CosignError> for ApiError {
    fn from(e: CosignError) -> Self {
        match e {
            CosignError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            CosignError::Invalid(_) => ApiError::bad_request(e.to_string()),
            CosignError::Refused(_) => ApiError::new(StatusCode::FORBIDDEN, "refused", e.to_string()),
        }
    }
}

/// Co-sign a write: this replica evaluates it with its own policy binding (verifying the
/// client's signatures itself) and signs the request digest with the asked envelope when its
/// policy allows the write or names this anchor as a voter.
#[utoipa::path(
    post, path = "/v1/anchors/cosign", tag = "anchors",
    request_body = CosignRequest,
    params(("aq-anchor" = String, Header, description = "`<public key hex>:<signature hex>`: the calling anchor's signature over the body")),
    responses(
        (status = 200, description = "The co-signature", body = CosignAnswer),
        (status = 400, description = "The body does not parse or does not fit the scope", body = super::ErrorBody),
        (status = 403, description = "Not an anchor's call, or this replica's policy does not support the write", body = super::ErrorBody),
        (status = 413, body = super::ErrorBody),
    )
)]
pub(super) async fn cosign(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = axum::body::to_bytes(body, MAX_COSIGN_BYTES).await.map_err(|_| {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too large", format!("a co-sign call is at most {MAX_COSIGN_BYTES} bytes"))
    })?;
    let header = headers.get(ANCHOR_HEADER).and_then(|v| v.to_str().ok());
    let answer = admin.gateway.cosign(&body, header).await?;
    Ok(axum::Json(answer).into_response())
}
