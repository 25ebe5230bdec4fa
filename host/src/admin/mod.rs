//! The HTTP admin API (axum): policies, scopes and bindings, dry runs, health, metrics and the
//! OpenAPI document. JSON in and out; errors are `{"error": ..., "detail": ...}` with the
//! conventional status. `/v1/` routes need a bearer token with a sufficient role; probes,
//! metrics and the OpenAPI document are open, as is conventional for scrapers and load
//! balancers.

mod admission;
mod anchors;
pub mod auth;
mod lineage;
mod migrations;
pub mod openapi;
mod policies;
mod principals;
mod proposals;
mod scopes;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::json;

use crate::config::AdminConfig;
use crate::gate::Gateway;
use crate::meta::MetaError;
use crate::meta::sync::{SyncError, Syncer};
pub use auth::{Auth, Role};
pub use policies::{SIGNATURE_HEADER, signed_message};

/// How long readiness waits for each group.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything the admin routes work on.
pub struct Admin {
    gateway: Arc<Gateway>,
    syncer: Arc<Syncer>,
    auth: Auth,
    max_policy_bytes: usize,
    require_signed_policies: bool,
    publishers: Vec<ed25519_dalek::VerifyingKey>,
    /// Signs lineage checkpoints with this replica's identity key.
    checkpointer: Arc<crate::lineage::store::Checkpointer>,
    /// Moves scopes between groups, when this replica holds the groups' root credentials.
    migrator: Option<Arc<crate::adapt::migrate::Migrator>>,
    /// kube-apiserver's storage prefix, for admission reviews.
    kube_etcd_prefix: String,
    /// The scope map's last counters, from which it works out rates.
    ui_rates: ui::Rates,
}

impl Admin {
    /// The admin API over a gateway and its syncer.
    pub fn new(
        gateway: Arc<Gateway>,
        syncer: Arc<Syncer>,
        config: &AdminConfig,
        auth: Auth,
        checkpointer: Arc<crate::lineage::store::Checkpointer>,
        migrator: Option<Arc<crate::adapt::migrate::Migrator>>,
    ) -> Result<Self, String> {
        let mut publishers = Vec::new();
        for key in &config.trusted_publishers {
            let bytes: [u8; 32] = hex::decode(key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("trusted publisher key {key:?} is not 64 hex digits (an ed25519 public key)"))?;
            publishers.push(
                ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map_err(|e| format!("trusted publisher key {key}: not a valid ed25519 public key: {e}"))?,
            );
        }
        if !config.kube_etcd_prefix.starts_with('/') {
            return Err(format!(
                "[admin] kube_etcd_prefix {:?} must start with '/', as kube-apiserver's --etcd-prefix does (default /registry)",
                config.kube_etcd_prefix
            ));
        }
        if config.require_signed_policies && publishers.is_empty() {
            return Err("require_signed_policies is set but [admin] trusted_publishers is empty; add the publishers' public keys".into());
        }
        Ok(Admin {
            gateway,
            syncer,
            auth,
            max_policy_bytes: config.max_policy_bytes,
            require_signed_policies: config.require_signed_policies,
            publishers,
            checkpointer,
            migrator,
            kube_etcd_prefix: config.kube_etcd_prefix.clone(),
            ui_rates: ui::Rates::default(),
        })
    }
}

/// The body of every error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// A short kind: `invalid input`, `unauthenticated`, `forbidden`, `not found`, `conflict`, ...
    error: String,
    /// What was wrong and what to do.
    detail: String,
}

/// An error answer: status, a short kind and a detail saying what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    detail: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        ApiError { status, error, detail: detail.into() }
    }

    fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid input", detail)
    }

    fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not found", detail)
    }

    fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(ErrorBody { error: self.error.to_string(), detail: self.detail })).into_response()
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::UnknownPolicy(_) => ApiError::not_found(e.to_string()),
            MetaError::Bound { .. } | MetaError::Conflict(_) | MetaError::LayoutConflict(_) | MetaError::AnchorTaken(_) => {
                ApiError::conflict(e.to_string())
            }
            MetaError::Backend(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "meta group unavailable", e.to_string()),
            MetaError::Corrupt(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "damaged state", e.to_string()),
        }
    }
}

impl From<SyncError> for ApiError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Meta(e) => e.into(),
            SyncError::Load { .. } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "cannot load policy", e.to_string()),
            SyncError::Bind(_) => ApiError::bad_request(e.to_string()),
        }
    }
}

/// A JSON body, with a clear 400 when it does not parse.
pub(crate) struct Json<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(ApiError::bad_request(format!("the JSON body is not valid: {}", rejection.body_text()))),
        }
    }
}

/// The admin routes.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/", get(ui::page))
        .route("/ui", get(ui::page))
        .route("/v1/ui/stream", get(ui::stream))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/v1/admission/validate", post(admission::validate))
        .route("/v1/anchors/cosign", post(anchors::cosign))
        .route("/v1/policies", post(policies::push).get(policies::list))
        .route("/v1/policies/{digest}", get(policies::get).delete(policies::delete))
        .route("/v1/principals", get(principals::list).post(principals::add))
        .route("/v1/principals/{id}", axum::routing::delete(principals::remove))
        .route("/v1/lineage/{scope}/export", get(lineage::export))
        .route("/v1/lineage/{scope}/checkpoint", post(lineage::checkpoint))
        .route("/v1/lineage/{scope}/proof/{index}", get(lineage::proof))
        .route("/v1/proposals", get(proposals::list))
        .route("/v1/proposals/{id}", get(proposals::get))
        .route("/v1/proposals/{id}/approve", post(proposals::approve))
        .route("/v1/proposals/{id}/reject", post(proposals::reject))
        .route("/v1/scopes", get(scopes::list))
        .route("/v1/scopes/{scope}", get(scopes::get))
        .route("/v1/scopes/{scope}/policy", put(scopes::bind))
        .route("/v1/scopes/{scope}/rollback", post(scopes::rollback))
        .route("/v1/scopes/{scope}/evaluate", post(scopes::evaluate))
        .route("/v1/scopes/{scope}/move", post(migrations::move_scope))
        .route("/v1/scopes/{scope}/split", post(migrations::split_scope))
        .route("/v1/scopes/{scope}/merge", post(migrations::merge_scope))
        .route("/v1/groups", get(migrations::groups))
        .route("/v1/migrations", get(migrations::list))
        .route("/v1/migrations/{id}", get(migrations::get))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(admin)
}

/// Liveness: the process serves.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub(crate) async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// Readiness: every backend group answers a status request.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "`{\"ready\": true, \"groups\": {name: \"ok\"}}`"),
    (status = 503, description = "Names the groups that do not answer", body = ErrorBody),
))]
pub(crate) async fn readyz(State(admin): State<Arc<Admin>>) -> Result<Response, ApiError> {
    let mut groups = serde_json::Map::new();
    let mut down = Vec::new();
    for (name, state) in admin.gateway.group_states(READY_TIMEOUT).await {
        let state = state.map(|()| "ok".to_string()).unwrap_or_else(|problem| problem);
        if state != "ok" {
            down.push(format!("{name} ({state})"));
        }
        groups.insert(name, json!(state));
    }
    if down.is_empty() {
        Ok(axum::Json(json!({ "ready": true, "groups": groups })).into_response())
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready",
            format!("etcd groups not answering: {}", down.join(", ")),
        ))
    }
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, content_type = "application/openmetrics-text", body = String)))]
pub(crate) async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        admin.gateway.metrics().encode(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route {}; the routes are listed at /v1/openapi.json", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
        format!("{method} is not served on {}; see /v1/openapi.json", uri.path()),
    )
}

/// A digest from a path or body: 64 hex digits, optionally prefixed `blake3:`.
fn parse_digest(text: &str) -> Result<String, ApiError> {
    let hex = text.strip_prefix("blake3:").unwrap_or(text).to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_request(format!("{text:?} is not a policy digest (64 hex digits, optionally blake3:...)")));
    }
    Ok(hex)
}
