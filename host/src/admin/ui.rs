//! The scope map: one page (`GET /`, `GET /ui`), built into the binary with no asset from
//! elsewhere, and the stream it draws from (`GET /v1/ui/stream`, server-sent events).
//!
//! The page itself holds no data and needs no token; the stream needs a reader token, which the
//! page asks for (or takes from `#token=` in its address) and sends as a bearer token. Every
//! second the stream sends one `state` event: the scope tree with bindings, counters and rates,
//! the groups, migrations, proposals and the latest denies, and the time, from which the page works out rates.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Admin, ApiError, Role};

const PAGE: &str = include_str!("ui.html");

/// How often the stream sends the state.
const EVERY: Duration = Duration::from_secs(1);

/// The page.
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing from elsewhere, no framing by other sites.
            (header::CONTENT_SECURITY_POLICY, "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
        ],
        PAGE,
    )
        .into_response()
}

/// The counters a scope's rates come from: writes, reads, guard retries, denies.
type Counters = [u64; 4];

/// The last sample of every scope's counters, and the rates worked out at it, kept by the
/// admin API so that any listener's first event already carries rates.
#[derive(Default)]
pub(super) struct Rates {
    last: std::sync::Mutex<Sample>,
}

#[derive(Default)]
struct Sample {
    at_ms: u64,
    counters: std::collections::HashMap<String, Counters>,
    rates: std::collections::HashMap<String, serde_json::Value>,
}

/// Rates over less time than this are not worked out again: the last ones are shown.
const SHORTEST_MS: u64 = 500;

impl Rates {
    /// Adds `rates` ({writes, reads, denies} per second, and conflicts: the share of writes
    /// whose guard moved) to each scope of `tree` and its children, against the last sample.
    fn annotate(&self, now_ms: u64, tree: &mut serde_json::Value) {
        fn walk(tree: &mut serde_json::Value, visit: &mut dyn FnMut(&mut serde_json::Value)) {
            for scope in tree.as_array_mut().into_iter().flatten() {
                visit(scope);
                walk(&mut scope["children"], visit);
            }
        }
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let renew = now_ms >= last.at_ms + SHORTEST_MS;
        let mut next = Sample { at_ms: now_ms, ..Sample::default() };
        walk(tree, &mut |scope| {
            let id = scope["id"].as_str().unwrap_or_default().to_string();
            let c = &scope["counters"];
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            let current: Counters = [n("writes"), n("reads"), n("guard_retries"), n("denied")];
            let rates = match (renew, last.counters.get(&id)) {
                (true, Some(before)) => {
                    let seconds = (now_ms - last.at_ms) as f64 / 1000.0;
                    let per = |i: usize| current[i].saturating_sub(before[i]) as f64 / seconds;
                    let writes = per(0);
                    let conflicts = if writes > 0.0 { (per(2) / writes).min(1.0) } else { 0.0 };
                    json!({ "writes": writes, "reads": per(1), "denies": per(3), "conflicts": conflicts })
                }
                (false, _) => last.rates.get(&id).cloned().unwrap_or(serde_json::Value::Null),
                (true, None) => serde_json::Value::Null,
            };
            let rates = if rates.is_null() { json!({ "writes": 0.0, "reads": 0.0, "denies": 0.0, "conflicts": 0.0 }) } else { rates };
            scope["rates"] = rates.clone();
            next.counters.insert(id.clone(), current);
            next.rates.insert(id, rates);
        });
        if renew {
            *last = next;
        }
    }
}

/// What the page shows, now.
async fn state(admin: &Admin) -> Result<serde_json::Value, ApiError> {
    let proposals = admin.gateway.proposals().await?;
    let now = crate::clock::unix_ms();
    let mut scopes = super::scopes::tree(admin).await?;
    admin.ui_rates.annotate(now, &mut scopes);
    Ok(json!({
        "time_ms": now,
        "scopes": scopes,
        "groups": super::migrations::group_list(admin).await?,
        "migrations": admin.syncer.store().migrations().await?,
        "proposals": proposals,
        "denies": admin.gateway.recent_decisions(),
    }))
}

/// The stream's next event: the state, or what kept it from being read.
async fn event(admin: &Admin) -> Event {
    match state(admin).await {
        Ok(state) => Event::default().event("state").data(state.to_string()),
        Err(error) => Event::default().event("error").data(error.detail),
    }
}

/// `GET /v1/ui/stream`: a `state` event every second while the client listens; an `error`
/// event (and the stream goes on) when the state cannot be read.
#[utoipa::path(
    get, path = "/v1/ui/stream", tag = "health",
    responses((status = 200, content_type = "text/event-stream", description = "`state` events: {time_ms, scopes, groups, migrations, proposals}", body = String), (status = 401, body = super::ErrorBody)),
    security(("bearer" = ["reader"]))
)]
pub(super) async fn stream(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Result<Response, ApiError> {
    admin.auth.check(&headers, Role::Reader)?;
    // A task per listener makes the events; it ends when the listener goes (its send fails).
    // The first state is read before the answer starts, so a page has its data as soon as it
    // has the answer's headers.
    let first = event(&admin).await;
    let (send, receive) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(1);
    tokio::spawn(async move {
        let mut next = first;
        loop {
            if send.send(Ok(next)).await.is_err() {
                return;
            }
            tokio::time::sleep(EVERY).await;
            next = event(&admin).await;
        }
    });
    let events = tokio_stream::wrappers::ReceiverStream::new(receive);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}
