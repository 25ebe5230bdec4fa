//! `/v1/scopes`: the scope tree with bindings and counters, hot swap, rollback and dry runs.

use std::sync::Arc;

use aq_sdk as m;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, ApiError, Json, Role, parse_digest};
use crate::engine::FailMode;
use crate::gate::GateError;
use crate::index::{KeyRange, Scope};
use crate::clock::unix_now;
use crate::meta::{BindingRecord, BindingSource, BindingSpec, LimitsSpec, MetaError};

/// How often a change is retried when another one lands first.
const CHANGE_ATTEMPTS: usize = 5;

fn known_scope(admin: &Admin, scope: &str) -> Result<Arc<Scope>, ApiError> {
    let routing = admin.gateway.routing();
    routing.index().get(scope).cloned().ok_or_else(|| {
        let known: Vec<&str> = routing.index().scopes().iter().map(|s| s.id.as_str()).collect();
        ApiError::not_found(format!("no scope {scope:?}; the scopes are {}", known.join(", ")))
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn spec_json(spec: &BindingSpec) -> Value {
    json!({ "digest": spec.digest, "config": spec.config, "fail_mode": spec.fail_mode, "limits": spec.limits })
}

/// One scope as the API shows it: range, group, the binding this replica enforces, the stored
/// binding record, and live counters of this replica.
fn scope_json(admin: &Admin, scope: &Scope, stored: Option<&(BindingRecord, i64)>) -> Value {
    let binding = admin.gateway.registry().active(&scope.id);
    let metrics = admin.gateway.metrics();
    let active = binding.as_ref().map(|b| {
        json!({
            "digest": b.module.digest().to_hex(),
            "config": serde_json::from_str::<Value>(&b.config).unwrap_or(Value::Null),
            "fail_mode": b.fail_mode,
            "limits": LimitsSpec::from(b.limits),
        })
    });
    let stored = stored.map(|(record, revision)| {
        json!({
            "previous": record.previous.as_ref().map(spec_json),
            "source": record.source,
            "generation": record.generation,
            "changed_at": record.changed_at,
            "revision": revision,
        })
    });
    json!({
        "id": scope.id,
        "range": { "start": text(&scope.range.start), "end": text(&scope.range.end) },
        "group": scope.group,
        "labels": scope.labels,
        // Which scope a split made it from, and when a split, merge or move last changed it.
        "split_from": scope.adapted.split_from,
        "adapted_at": (scope.adapted.changed_at != 0).then_some(scope.adapted.changed_at),
        "binding": active,
        "stored": stored,
        "counters": {
            "allowed": metrics.evaluations(&scope.id, "allow"),
            "denied": metrics.evaluations(&scope.id, "deny"),
            "approval_required": metrics.evaluations(&scope.id, "require_approval"),
            "writes": metrics.routed_count(&scope.id, "write"),
            "reads": metrics.routed_count(&scope.id, "read"),
            "guard_retries": metrics.guard_retries(&scope.id),
            "swaps": metrics.swaps(&scope.id),
        },
    })
}

/// Whether `outer` holds all of `inner`.
fn contains(outer: &KeyRange, inner: &KeyRange) -> bool {
    outer.start <= inner.start && (outer.end.is_empty() || (!inner.end.is_empty() && inner.end <= outer.end))
}

/// The innermost other scope holding `scope`.
fn parent<'a>(scopes: &'a [Arc<Scope>], scope: &Scope) -> Option<&'a Arc<Scope>> {
    scopes
        .iter()
        .filter(|s| s.id != scope.id && contains(&s.range, &scope.range))
        .min_by(|a, b| if contains(&a.range, &b.range) { std::cmp::Ordering::Greater } else { std::cmp::Ordering::Less })
}

async fn stored_bindings(admin: &Admin) -> Result<std::collections::HashMap<String, (BindingRecord, i64)>, ApiError> {
    let (bindings, _) = admin.syncer.store().bindings().await?;
    Ok(bindings.into_iter().map(|(scope, record, revision)| (scope, (record, revision))).collect())
}

/// The scope tree: range, group, the binding this replica enforces, the stored binding
/// record and live counters; nested scopes appear under `children` of the scope they narrow.
#[utoipa::path(
    get, path = "/v1/scopes", tag = "scopes",
    responses((status = 200, description = "`{\"scopes\": [scope...]}`", body = serde_json::Value), (status = 401, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    Ok(axum::Json(json!({ "scopes": tree(&admin).await? })).into_response())
}

/// The scope tree as `GET /v1/scopes` shows it.
pub(super) async fn tree(admin: &Admin) -> Result<Value, ApiError> {
    let stored = stored_bindings(admin).await?;
    let routing = admin.gateway.routing();
    let scopes = routing.index().scopes();
    fn subtree(admin: &Admin, scopes: &[Arc<Scope>], stored: &std::collections::HashMap<String, (BindingRecord, i64)>, of: Option<&str>) -> Vec<Value> {
        scopes
            .iter()
            .filter(|s| parent(scopes, s).map(|p| p.id.as_str()) == of)
            .map(|s| {
                let mut node = scope_json(admin, s, stored.get(&s.id));
                node["children"] = Value::Array(subtree(admin, scopes, stored, Some(&s.id)));
                node
            })
            .collect()
    }
    Ok(Value::Array(subtree(admin, scopes, &stored, None)))
}

/// One scope, with its parent.
#[utoipa::path(
    get, path = "/v1/scopes/{scope}", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn get(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(scope): Path<String>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    let scope = known_scope(&admin, &scope)?;
    let stored = admin.syncer.store().binding(&scope.id).await?;
    let mut node = scope_json(&admin, &scope, stored.as_ref());
    let routing = admin.gateway.routing();
    let scopes = routing.index().scopes();
    node["parent"] = json!(parent(scopes, &scope).map(|p| p.id.clone()));
    Ok(axum::Json(node).into_response())
}

/// Changes a scope's stored binding with `make`, checked by the policy's `init` first, then
/// applies it here; other replicas follow through their watch.
async fn change(
    admin: &Admin,
    scope: &str,
    make: impl Fn(&BindingRecord) -> Result<BindingRecord, ApiError>,
) -> Result<(BindingRecord, i64), ApiError> {
    for _ in 0..CHANGE_ATTEMPTS {
        let (current, expected) = admin
            .syncer
            .store()
            .binding(scope)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("scope {scope} has no stored binding yet")))?;
        let next = make(&current)?;
        let binding = admin.syncer.prepare(scope, &next.active).await?;
        match admin.syncer.store().write_binding(scope, &next, expected).await {
            Ok(revision) => {
                admin.syncer.apply_prepared(scope, &next, binding, revision);
                return Ok((next, revision));
            }
            Err(MetaError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(MetaError::Conflict(scope.to_string()).into())
}

/// The answer to a bind or rollback.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(super) struct Changed {
    /// The scope.
    scope: String,
    /// The binding now in force.
    active: BindingSpec,
    /// The last-known-good binding.
    previous: Option<BindingSpec>,
    /// Changes of the scope's binding so far.
    generation: u64,
    /// The meta group revision of the change; replicas report it as applied.
    revision: i64,
}

fn changed(scope: &str, record: BindingRecord, revision: i64) -> Response {
    axum::Json(Changed {
        scope: scope.to_string(),
        active: record.active,
        previous: record.previous,
        generation: record.generation,
        revision,
    })
    .into_response()
}

/// The body of `PUT /v1/scopes/{scope}/policy`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BindRequest {
    /// The stored policy's digest.
    digest: String,
    /// The configuration for `init`; default `{}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    config: Option<Value>,
    /// Default: the scope's current fail mode.
    #[serde(default)]
    fail_mode: Option<FailMode>,
    /// Default: the scope's current limits.
    #[serde(default)]
    limits: Option<LimitsSpec>,
}

/// Hot swap: check the configuration with the policy's `init`, record the binding in the
/// meta group (every replica follows), keep the previous binding as last-known-good.
#[utoipa::path(
    put, path = "/v1/scopes/{scope}/policy", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    request_body = BindRequest,
    responses(
        (status = 200, body = Changed),
        (status = 400, description = "Bad body, or the policy refused the configuration", body = super::ErrorBody),
        (status = 404, description = "Unknown scope or policy", body = super::ErrorBody),
        (status = 409, description = "Concurrent changes kept winning", body = super::ErrorBody),
    ),
    security(("bearer" = ["operator"]))
)]
pub(super) async fn bind(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(scope): Path<String>,
    Json(request): Json<BindRequest>,
) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Operator)?;
    let scope = known_scope(&admin, &scope)?.id.clone();
    let digest = parse_digest(&request.digest)?;
    if let Some(limits) = request.limits
        && (limits.timeout_ms == 0 || limits.memory_mib == 0)
    {
        return Err(ApiError::bad_request("limits.timeout_ms and limits.memory_mib must be above 0"));
    }
    let (record, revision) = change(&admin, &scope, |current| {
        let spec = BindingSpec {
            digest: digest.clone(),
            config: request.config.clone().unwrap_or_else(|| json!({})),
            fail_mode: request.fail_mode.unwrap_or(current.active.fail_mode),
            limits: request.limits.unwrap_or(current.active.limits),
        };
        Ok(current.swapped(spec, BindingSource::Api))
    })
    .await?;
    tracing::info!(%scope, policy = %digest, by = %caller.name, generation = record.generation, "policy bound");
    Ok(changed(&scope, record, revision))
}

/// Return to the last-known-good binding; a second rollback undoes the first.
#[utoipa::path(
    post, path = "/v1/scopes/{scope}/rollback", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    responses((status = 200, body = Changed), (status = 404, body = super::ErrorBody), (status = 409, description = "Nothing to roll back to", body = super::ErrorBody)),
    security(("bearer" = ["operator"]))
)]
pub(super) async fn rollback(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(scope): Path<String>,
) -> Result<Response, ApiError> {
    let caller = admin.auth.check(&headers, Role::Operator)?;
    let scope = known_scope(&admin, &scope)?.id.clone();
    let (record, revision) = change(&admin, &scope, |current| {
        let previous = current.previous.clone().ok_or_else(|| {
            ApiError::conflict(format!("scope {scope} has no previous binding to roll back to"))
        })?;
        Ok(BindingRecord {
            active: previous,
            previous: Some(current.active.clone()),
            source: BindingSource::Api,
            generation: current.generation + 1,
            changed_at: unix_now(),
        })
    })
    .await?;
    tracing::info!(%scope, policy = %record.active.digest, by = %caller.name, "policy rolled back");
    Ok(changed(&scope, record, revision))
}

/// One mutation of a dry run.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum OpRequest {
    /// A put.
    Put {
        key: String,
        #[serde(default)]
        value: String,
        #[serde(default)]
        lease: i64,
    },
    /// A delete of a key, or of `[key, range_end)`.
    Delete {
        key: String,
        #[serde(default)]
        range_end: String,
    },
}

/// The body of `POST /v1/scopes/{scope}/evaluate`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EvaluateRequest {
    ops: Vec<OpRequest>,
}

/// Dry run: the active policy's decision on a mutation, its reason and time taken; nothing
/// is written, counted or logged.
#[utoipa::path(
    post, path = "/v1/scopes/{scope}/evaluate", tag = "scopes",
    params(("scope" = String, Path, description = "Scope id")),
    request_body = EvaluateRequest,
    responses(
        (status = 200, description = "`{scope, policy, verdict, reason, rule, lineage, annotations, failure, elapsed_us, written}`", body = serde_json::Value),
        (status = 400, description = "Bad body, or keys outside the scope", body = super::ErrorBody),
        (status = 404, body = super::ErrorBody),
    ),
    security(("bearer" = ["operator"]))
)]
pub(super) async fn evaluate(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(scope): Path<String>,
    Json(request): Json<EvaluateRequest>,
) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Operator)?;
    let scope = known_scope(&admin, &scope)?.id.clone();
    if request.ops.is_empty() {
        return Err(ApiError::bad_request("ops is empty; give at least one {\"put\": {...}} or {\"delete\": {...}}"));
    }
    let ops = request
        .ops
        .into_iter()
        .map(|op| match op {
            OpRequest::Put { key, value, lease } => m::Op::Put(m::PutOp {
                key: m::Bytes(key.into_bytes()),
                value: m::Bytes(value.into_bytes()),
                lease,
                ignore_value: false,
                ignore_lease: false,
            }),
            OpRequest::Delete { key, range_end } => {
                m::Op::DeleteRange(m::DeleteRangeOp { key: m::Bytes(key.into_bytes()), range_end: m::Bytes(range_end.into_bytes()) })
            }
        })
        .collect();
    // Like the write path, a policy read blocks this worker in place while etcd answers.
    let evaluation = admin
        .gateway
        .dry_run(&scope, ops)
        .map_err(|e| match e {
            GateError::CrossScope(_) | GateError::Unowned(_) | GateError::Reserved(_) => {
                ApiError::bad_request(format!("{e}; a dry run takes keys of scope {scope} only"))
            }
            other => ApiError::new(axum::http::StatusCode::BAD_GATEWAY, "evaluation failed", other.to_string()),
        })?;
    let (reason, rule) = match &evaluation.decision.verdict {
        m::Verdict::Allow => (None, None),
        m::Verdict::Deny(reason) => (Some(reason.clone()), None),
        m::Verdict::RequireApproval(rule) => (
            None,
            Some(json!({
                "voters": rule.voters.iter().map(|v| json!({ "principal": v.principal, "weight": v.weight })).collect::<Vec<_>>(),
                "threshold": rule.threshold,
                "expiry_seconds": rule.expiry_seconds,
            })),
        ),
    };
    Ok(axum::Json(json!({
        "scope": scope,
        "policy": evaluation.digest.to_hex(),
        "verdict": evaluation.decision.verdict.kind(),
        "reason": reason,
        "rule": rule,
        "lineage": evaluation.decision.lineage,
        "annotations": evaluation.decision.annotations,
        "failure": evaluation.failure.as_ref().map(|f| json!({ "kind": f.kind(), "detail": f.to_string() })),
        "elapsed_us": evaluation.elapsed.as_secs_f64() * 1e6,
        "written": false,
    }))
    .into_response())
}
