//! What etcd serves over plain HTTP on its client port beside gRPC, served by aq the same way:
//! `/health`, `/version` and `/metrics` (with go-grpc-prometheus's `grpc_server_handled_total`,
//! which dashboards and client test suites read), and the layer that counts every gRPC call by
//! service, method and status code.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::gate::Gateway;

/// Labels of `grpc_server_handled_total`: type, service, method, code.
type HandledLabels = crate::gate::metrics::Labels;

/// The routes etcd answers on its client port over HTTP/1.1.
pub fn routes(gateway: Arc<Gateway>) -> axum::Router {
    axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/version", axum::routing::get(version))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(gateway)
}

/// `{"health":"true","reason":""}` when every etcd group answers, as etcd answers for itself;
/// 503 with the groups that do not otherwise.
async fn health(axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>) -> Response {
    let states = gateway.group_states(std::time::Duration::from_secs(1)).await;
    let down: Vec<String> =
        states.into_iter().filter_map(|(name, state)| state.err().map(|_| format!("group {name} does not answer"))).collect();
    let (status, health) = if down.is_empty() { (StatusCode::OK, "true") } else { (StatusCode::SERVICE_UNAVAILABLE, "false") };
    let body = serde_json::json!({ "health": health, "reason": down.join("; ") });
    (status, axum::Json(body)).into_response()
}

/// etcd's version answer, with the version aq reports in Status.
async fn version() -> Response {
    let cluster = super::REPORTED_ETCD_VERSION.rsplit_once('.').map(|(minor, _)| format!("{minor}.0")).unwrap_or_default();
    axum::Json(serde_json::json!({ "etcdserver": super::REPORTED_ETCD_VERSION, "etcdcluster": cluster })).into_response()
}

async fn metrics(axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        gateway.metrics().encode(),
    )
        .into_response()
}

/// Counts each gRPC call when it ends, in `grpc_server_handled_total`. A method's counters
/// are found by its path once; after that a call costs a map lookup and an increment.
#[derive(Clone)]
pub struct HandledLayer {
    handled: Family<HandledLabels, Counter>,
    methods: Arc<std::sync::RwLock<std::collections::HashMap<String, Arc<MethodCounters>>>>,
}

impl HandledLayer {
    /// Counts into `handled` (the gateway's metrics own it).
    pub fn new(handled: Family<HandledLabels, Counter>) -> Self {
        HandledLayer { handled, methods: Default::default() }
    }

    /// The counters of the gRPC method `path` names (`/etcdserverpb.KV/Range`), or `None` for a
    /// path that names none.
    fn method(&self, path: &str) -> Option<Arc<MethodCounters>> {
        if let Some(found) = self.methods.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(path) {
            return Some(found.clone());
        }
        let (service, method) = method_of(path)?;
        let counters = Arc::new(MethodCounters {
            labels: vec![
                ("grpc_type".into(), call_type(service, method).into()),
                ("grpc_service".into(), service.into()),
                ("grpc_method".into(), method.into()),
            ],
            handled: self.handled.clone(),
            by_code: Default::default(),
        });
        let mut methods = self.methods.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        Some(methods.entry(path.to_string()).or_insert(counters).clone())
    }
}

impl<S> tower::Layer<S> for HandledLayer {
    type Service = Handled<S>;
    fn layer(&self, inner: S) -> Handled<S> {
        Handled { inner, layer: self.clone() }
    }
}

/// The service [`HandledLayer`] makes.
#[derive(Clone)]
pub struct Handled<S> {
    inner: S,
    layer: HandledLayer,
}

/// gRPC's status codes, 0 to 16, as go-grpc-prometheus names them.
const CODE_NAMES: [&str; 17] = [
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
    "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
];
/// The index of `Unknown`, for a status that is not one of them or is missing.
const UNKNOWN: usize = 2;

/// One method's `grpc_server_handled_total` series, each made when its code is first counted.
struct MethodCounters {
    /// `grpc_type`, `grpc_service`, `grpc_method`.
    labels: HandledLabels,
    handled: Family<HandledLabels, Counter>,
    by_code: [std::sync::OnceLock<Counter>; 17],
}

impl MethodCounters {
    fn count(&self, code: usize) {
        let code = if code < CODE_NAMES.len() { code } else { UNKNOWN };
        self.by_code[code]
            .get_or_init(|| {
                let mut labels = self.labels.clone();
                labels.push(("grpc_code".into(), CODE_NAMES[code].into()));
                self.handled.get_or_create(&labels).clone()
            })
            .inc();
    }
}

/// The gRPC method a path names, `/etcdserverpb.KV/Range` → (`etcdserverpb.KV`, `Range`).
fn method_of(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then_some((service, method))
}

/// go-grpc-prometheus's `grpc_type` of etcd's methods.
fn call_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => "server_stream",
        _ => "unary",
    }
}

/// The status code a header map carries in `grpc-status`, if any.
fn status_in(headers: &HeaderMap) -> Option<usize> {
    let code = headers.get("grpc-status")?;
    Some(code.to_str().ok().and_then(|c| c.trim().parse().ok()).unwrap_or(UNKNOWN))
}

impl<S, B> tower::Service<axum::http::Request<B>> for Handled<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let is_grpc = request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
        let method = if is_grpc { self.layer.method(request.uri().path()) } else { None };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let Some(method) = method else { return Ok(response) };
            // A call refused at once answers its status in the headers ("trailers only");
            // otherwise the status comes in the trailers, after the last message.
            if let Some(code) = status_in(response.headers()) {
                method.count(code);
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let body = Counted { inner: body, method: Some(method) };
            Ok(axum::http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

/// A response body that counts its call when its trailers pass (or it ends without any).
struct Counted {
    inner: tonic::body::Body,
    /// Taken when counted.
    method: Option<Arc<MethodCounters>>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().and_then(status_in),
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => Some(UNKNOWN),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(method) = self.method.take()
        {
            method.count(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_service_and_method_and_codes_their_names() {
        assert_eq!(method_of("/etcdserverpb.Auth/Authenticate"), Some(("etcdserverpb.Auth", "Authenticate")));
        assert_eq!(method_of("/metrics"), None);
        assert_eq!(method_of("/a/b/c"), None);
        assert_eq!(call_type("etcdserverpb.Watch", "Watch"), "bidi_stream");
        assert_eq!(call_type("etcdserverpb.KV", "Range"), "unary");
        let status = |code: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-status", code.parse().unwrap());
            status_in(&headers).map(|c| CODE_NAMES[c])
        };
        assert_eq!(status("0"), Some("OK"));
        assert_eq!(status("7"), Some("PermissionDenied"));
        assert_eq!(status_in(&HeaderMap::new()), None);
        // A code outside gRPC's counts as Unknown.
        let layer = HandledLayer::new(Family::default());
        let method = layer.method("/etcdserverpb.KV/Put").unwrap();
        method.count(99);
        method.count(0);
        method.count(0);
        let series = |code: &str| {
            let labels: HandledLabels = vec![
                ("grpc_type".into(), "unary".into()),
                ("grpc_service".into(), "etcdserverpb.KV".into()),
                ("grpc_method".into(), "Put".into()),
                ("grpc_code".into(), code.into()),
            ];
            layer.handled.get_or_create(&labels).get()
        };
        assert_eq!((series("OK"), series("Unknown")), (2, 1));
        assert!(Arc::ptr_eq(&method, &layer.method("/etcdserverpb.KV/Put").unwrap()), "found once, then reused");
        assert!(layer.method("/metrics").is_none());
    }
}
