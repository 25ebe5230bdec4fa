//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of the admin API, generated from the
//! handlers' annotations and the request and answer types.

use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use super::{admission, anchors, lineage, migrations, policies, principals, proposals, scopes, ui};

/// Adds the bearer token scheme the `/v1/` routes require.
struct BearerTokens;

impl utoipa::Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "An aq admin token. Roles are ordered webhook < reader < operator < admin; each operation names the least role it needs. \
             The default run writes an admin token to <data-dir>/admin-token."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "aq admin API", description = "Load, bind and hot-swap policies per scope; dry runs; scopes; health and metrics."),
    paths(
        super::healthz,
        super::readyz,
        super::metrics,
        admission::validate,
        anchors::cosign,
        lineage::export,
        lineage::checkpoint,
        lineage::proof,
        policies::push,
        policies::list,
        policies::get,
        policies::delete,
        principals::list,
        principals::add,
        principals::remove,
        proposals::list,
        proposals::get,
        proposals::approve,
        proposals::reject,
        scopes::list,
        scopes::get,
        scopes::bind,
        scopes::rollback,
        scopes::evaluate,
        migrations::move_scope,
        migrations::split_scope,
        migrations::merge_scope,
        migrations::list,
        migrations::groups,
        migrations::get,
        ui::stream,
    ),
    modifiers(&BearerTokens),
    tags(
        (name = "admission", description = "aq as a Kubernetes validating admission webhook"),
        (name = "anchors", description = "Replicas co-signing writes whose policy names them as voters"),
        (name = "lineage", description = "Tamper-evident records of governed writes: exports, checkpoints, inclusion proofs"),
        (name = "policies", description = "Stored policy components, content-addressed by blake3"),
        (name = "principals", description = "Who can sign requests and approvals: ids, ed25519 keys, roles"),
        (name = "proposals", description = "Writes waiting for approvals"),
        (name = "scopes", description = "The scope tree, bindings, hot swap, rollback and dry runs"),
        (name = "health", description = "Probes and metrics; no token needed"),
    )
)]
struct AdminApi;

/// The document as JSON.
pub fn json() -> String {
    AdminApi::openapi().to_pretty_json().expect("the OpenAPI document serialises")
}

pub(super) async fn document() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], json()).into_response()
}
