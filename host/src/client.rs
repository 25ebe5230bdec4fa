//! A client of aq's etcd API that signs its writes: the Rust side of signed requests.
//!
//! A signature covers the request's content, so it cannot be added by a gRPC interceptor (which
//! sees only metadata), and `etcd-client` offers no per-request metadata; this helper speaks the
//! etcd protocol itself for the writes it signs. Reads need no signature: use any etcd client.
//!
//! ```no_run
//! # async fn demo(key: ed25519_dalek::SigningKey) -> Result<(), String> {
//! let client = aq_host::client::SignedClient::connect("http://127.0.0.1:2379", vec![key]).await?;
//! client.put("secrets", b"/registry/secrets/default/db", b"s3cr3t").await.map_err(|s| s.to_string())?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use aq_sdk as m;
use ed25519_dalek::SigningKey;
use etcd_client::proto as pb;
use tonic::Status;

use crate::backend::Group;
use crate::trust::SignedRequest;

/// How long a signature stays valid by default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(60);

/// Signs and sends writes to aq with one or more keys.
pub struct SignedClient {
    aq: Group,
    cluster_id: u64,
    keys: Vec<SigningKey>,
    validity: Duration,
    wait: Option<Duration>,
}

impl SignedClient {
    /// Connects to aq's etcd API at `endpoint` (`http://host:port`) and learns the cluster id
    /// signatures are bound to (from `Maintenance.Status`).
    pub async fn connect(endpoint: &str, keys: Vec<SigningKey>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("give at least one signing key".into());
        }
        let endpoint = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
        let aq = Group::connect_lazy("aq", std::slice::from_ref(&endpoint)).map_err(|e| e.to_string())?;
        let status = aq.wait_ready(Duration::from_secs(10)).await.map_err(|e| format!("cannot reach aq at {endpoint}: {e}"))?;
        let cluster_id = status.header.map(|h| h.cluster_id).unwrap_or_default();
        Ok(SignedClient { aq, cluster_id, keys, validity: DEFAULT_VALIDITY, wait: None })
    }

    /// Signatures made from now on are valid for `validity`.
    pub fn with_validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    /// When a write needs approvals, wait up to `wait` for the proposal's outcome (the
    /// `aq-wait` header) instead of getting its id at once.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    fn metadata(&self, signed: &SignedRequest) -> Vec<(&'static str, String)> {
        let mut headers = signed.headers();
        if let Some(wait) = self.wait {
            headers.push((crate::trust::WAIT_HEADER, format!("{:.3}", wait.as_secs_f64())));
        }
        headers
    }

    /// The cluster id the signatures are bound to.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Signs `ops` for `scope`.
    pub fn sign(&self, scope: &str, ops: &[m::Op]) -> Result<SignedRequest, Status> {
        SignedRequest::sign(&self.keys, self.cluster_id, scope, ops, &[], self.validity).map_err(Status::internal)
    }

    /// A signed put of `key` in `scope` (the scope that owns the key).
    pub async fn put(&self, scope: &str, key: &[u8], value: &[u8]) -> Result<pb::PbPutResponse, Status> {
        let request = pb::PbPutRequest { key: key.to_vec(), value: value.to_vec(), ..Default::default() };
        let op = m::Op::Put(m::PutOp { key: m::Bytes(key.to_vec()), value: m::Bytes(value.to_vec()), ..Default::default() });
        let signed = self.sign(scope, &[op])?;
        self.aq.put_with(request, &self.metadata(&signed)).await
    }

    /// A signed delete of `key` (or of `[key, range_end)`) in `scope`.
    pub async fn delete(&self, scope: &str, key: &[u8], range_end: &[u8]) -> Result<pb::PbDeleteResponse, Status> {
        let request = pb::PbDeleteRequest { key: key.to_vec(), range_end: range_end.to_vec(), prev_kv: false };
        let op = m::Op::DeleteRange(m::DeleteRangeOp { key: m::Bytes(key.to_vec()), range_end: m::Bytes(range_end.to_vec()) });
        let signed = self.sign(scope, &[op])?;
        self.aq.delete_range_with(request, &self.metadata(&signed)).await
    }

    /// Sends a put with signatures made elsewhere (or tampered with, in tests).
    pub async fn put_presigned(&self, key: &[u8], value: &[u8], signed: &SignedRequest) -> Result<pb::PbPutResponse, Status> {
        let request = pb::PbPutRequest { key: key.to_vec(), value: value.to_vec(), ..Default::default() };
        self.aq.put_with(request, &signed.headers()).await
    }
}
