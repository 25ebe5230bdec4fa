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
    let mut down = Vec::new();
    for (name, group) in gateway.groups().iter() {
        if !matches!(tokio::time::timeout(std::time::Duration::from_secs(1), group.status()).await, Ok(Ok(_))) {
            down.push(format!("group {name} does not answer"));
        }
    }
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

/// Counts each gRPC call when it ends, in `grpc_server_handled_total`.
#[derive(Clone)]
pub struct HandledLayer {
    handled: Family<HandledLabels, Counter>,
}

impl HandledLayer {
    /// Counts into `handled` (the gateway's metrics own it).
    pub fn new(handled: Family<HandledLabels, Counter>) -> Self {
        HandledLayer { handled }
    }
}

impl<S> tower::Layer<S> for HandledLayer {
    type Service = Handled<S>;
    fn layer(&self, inner: S) -> Handled<S> {
        Handled { inner, handled: self.handled.clone() }
    }
}

/// The service [`HandledLayer`] makes.
#[derive(Clone)]
pub struct Handled<S> {
    inner: S,
    handled: Family<HandledLabels, Counter>,
}

/// The gRPC method a path names, `/etcdserverpb.KV/Range` → (`etcdserverpb.KV`, `Range`).
fn method_of(path: &str) -> Option<(String, String)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/')).then(|| (service.to_string(), method.to_string()))
}

/// go-grpc-prometheus's `grpc_type` of etcd's methods.
fn call_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") | ("v3electionpb.Election", "Observe") => "server_stream",
        _ => "unary",
    }
}

/// The name go-grpc-prometheus gives a gRPC status code.
fn code_name(code: &str) -> &'static str {
    match code.trim().parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "Canceled",
        Ok(tonic::Code::InvalidArgument) => "InvalidArgument",
        Ok(tonic::Code::DeadlineExceeded) => "DeadlineExceeded",
        Ok(tonic::Code::NotFound) => "NotFound",
        Ok(tonic::Code::AlreadyExists) => "AlreadyExists",
        Ok(tonic::Code::PermissionDenied) => "PermissionDenied",
        Ok(tonic::Code::ResourceExhausted) => "ResourceExhausted",
        Ok(tonic::Code::FailedPrecondition) => "FailedPrecondition",
        Ok(tonic::Code::Aborted) => "Aborted",
        Ok(tonic::Code::OutOfRange) => "OutOfRange",
        Ok(tonic::Code::Unimplemented) => "Unimplemented",
        Ok(tonic::Code::Internal) => "Internal",
        Ok(tonic::Code::Unavailable) => "Unavailable",
        Ok(tonic::Code::DataLoss) => "DataLoss",
        Ok(tonic::Code::Unauthenticated) => "Unauthenticated",
        _ => "Unknown",
    }
}

/// The status a header map carries, if it has `grpc-status`.
fn status_in(headers: &HeaderMap) -> Option<&'static str> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).map(code_name)
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
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/grpc"));
        let method = if is_grpc { method_of(request.uri().path()) } else { None };
        let handled = self.handled.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let Some((service, method)) = method else { return Ok(response) };
            let labels: HandledLabels = vec![
                ("grpc_type".into(), call_type(&service, &method).into()),
                ("grpc_service".into(), service),
                ("grpc_method".into(), method),
            ];
            // A call refused at once answers its status in the headers ("trailers only");
            // otherwise the status comes in the trailers, after the last message.
            if let Some(code) = status_in(response.headers()) {
                count(&handled, labels, code);
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let body = Counted { inner: body, handled, labels: Some(labels) };
            Ok(axum::http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

fn count(handled: &Family<HandledLabels, Counter>, mut labels: HandledLabels, code: &str) {
    labels.push(("grpc_code".into(), code.into()));
    handled.get_or_create(&labels).inc();
}

/// A response body that counts its call when its trailers pass (or it ends without any).
struct Counted {
    inner: tonic::body::Body,
    handled: Family<HandledLabels, Counter>,
    /// Taken when counted.
    labels: Option<HandledLabels>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in)
                    && let Some(labels) = self.labels.take()
                {
                    count(&self.handled, labels, code);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(labels) = self.labels.take() {
                    count(&self.handled, labels, "Unknown");
                }
            }
            Poll::Pending => {}
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
        assert_eq!(method_of("/etcdserverpb.Auth/Authenticate"), Some(("etcdserverpb.Auth".into(), "Authenticate".into())));
        assert_eq!(method_of("/metrics"), None);
        assert_eq!(method_of("/a/b/c"), None);
        assert_eq!(call_type("etcdserverpb.Watch", "Watch"), "bidi_stream");
        assert_eq!(call_type("etcdserverpb.KV", "Range"), "unary");
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("7"), "PermissionDenied");
        assert_eq!(code_name("99"), "Unknown");
    }
}
