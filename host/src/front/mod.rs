//! The etcd v3 gRPC front: KV, Watch, Lease, Lock, Election, Maintenance, Cluster and Auth
//! services over the gate. Translation only: every decision is the gate's, apart from etcd's
//! own user permissions (`auth.rs`), which each service checks before it passes a request on.

pub mod auth;
pub mod concurrency;
pub mod http;
mod lease;
mod maintenance;
mod watch;

use std::sync::Arc;

use etcd_client::proto as pb;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Need, Who};
use crate::gate::{Caller, GateError, Gateway};
use crate::trust::SignedRequest;

/// The etcd version aq reports in `Maintenance.Status`: new enough that kube-apiserver uses
/// watch progress requests (3.5.13 or later).
pub const REPORTED_ETCD_VERSION: &str = "3.5.13";

impl From<GateError> for Status {
    fn from(error: GateError) -> Self {
        match error {
            GateError::Backend(status) => status,
            GateError::Denied { reason } => Status::permission_denied(reason),
            GateError::Reserved(_) => Status::permission_denied(error.to_string()),
            GateError::NeedsApproval(_)
            | GateError::Proposed { .. }
            | GateError::CrossScope(_)
            | GateError::Unowned(_) => {
                Status::failed_precondition(error.to_string())
            }
            GateError::Unsupported(_) => Status::invalid_argument(error.to_string()),
            GateError::Contended(_) | GateError::NotOwner { .. } => Status::unavailable(error.to_string()),
            GateError::Unauthenticated(_) => Status::unauthenticated(error.to_string()),
            GateError::Compacted { .. } => Status::out_of_range(error.to_string()),
        }
    }
}

pub use concurrency::{Election, Lock};
pub use lease::Lease;
pub use maintenance::Maintenance;
use maintenance::member_id;
pub use watch::Watch;

/// The KV service.
pub struct Kv {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
}

impl Kv {
    /// KV over `gate`, with etcd users' permissions from `auth`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>) -> Self {
        Kv { gate, auth }
    }
}

#[tonic::async_trait]
impl pb::PbKvService for Kv {
    async fn range(&self, request: Request<pb::PbRangeRequest>) -> Result<Response<pb::PbRangeResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        let range = request.into_inner();
        self.auth.require(&who, Need::Read, &range.key, &range.range_end)?;
        Ok(Response::new(self.gate.range(range).await?))
    }

    async fn put(&self, request: Request<pb::PbPutRequest>) -> Result<Response<pb::PbPutResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        auth::check_put(&self.auth, &who, request.get_ref())?;
        let caller = caller(request.metadata(), &who)?;
        Ok(Response::new(self.gate.put(request.into_inner(), &caller).await?))
    }

    async fn delete_range(
        &self,
        request: Request<pb::PbDeleteRequest>,
    ) -> Result<Response<pb::PbDeleteResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        auth::check_delete(&self.auth, &who, request.get_ref())?;
        let caller = caller(request.metadata(), &who)?;
        Ok(Response::new(self.gate.delete_range(request.into_inner(), &caller).await?))
    }

    async fn txn(&self, request: Request<pb::PbTxnRequest>) -> Result<Response<pb::PbTxnResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        auth::check_txn(&self.auth, &who, request.get_ref())?;
        let caller = caller(request.metadata(), &who)?;
        Ok(Response::new(self.gate.txn(request.into_inner(), &caller).await?))
    }

    async fn compact(
        &self,
        request: Request<pb::PbCompactionRequest>,
    ) -> Result<Response<pb::PbCompactionResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        self.auth.require_user(&who)?;
        Ok(Response::new(self.gate.compact(request.into_inner()).await?))
    }

    type RangeStreamStream = tokio_stream::Empty<Result<pb::PbRangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _: Request<pb::PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(unimplemented("RangeStream"))
    }
}

/// What a request carries in its metadata: signatures (see [`crate::trust`] for the headers)
/// and how long it waits for approvals; and the etcd user `who` it comes from.
fn caller(metadata: &tonic::metadata::MetadataMap, who: &Who) -> Result<Caller, Status> {
    use crate::trust::{NONCE_HEADER, NOT_AFTER_HEADER, SIGNATURE_HEADER, WAIT_HEADER};
    let text = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok());
    let signatures = metadata.get_all(SIGNATURE_HEADER).iter().filter_map(|v| v.to_str().ok());
    let signed = SignedRequest::from_headers(text(NONCE_HEADER), text(NOT_AFTER_HEADER), signatures)
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    let wait = match text(WAIT_HEADER) {
        Some(seconds) => Some(
            seconds
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
                .map(std::time::Duration::from_secs_f64)
                .ok_or_else(|| Status::invalid_argument(format!("{WAIT_HEADER} must be seconds between 0 and 3600")))?,
        ),
        None => None,
    };
    Ok(Caller { signed, wait, user: who.user().map(str::to_string) })
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not available through aq; run it against the etcd groups directly"))
}

/// The Cluster service: aq presents itself as a one-member cluster at its own address.
pub struct Cluster {
    gate: Arc<Gateway>,
    addr: std::net::SocketAddr,
}

impl Cluster {
    /// Cluster over `gate`, served at `addr`.
    pub fn new(gate: Arc<Gateway>, addr: std::net::SocketAddr) -> Self {
        Cluster { gate, addr }
    }
}

#[tonic::async_trait]
impl pb::PbClusterService for Cluster {
    async fn member_add(&self, _: Request<pb::PbMemberAddRequest>) -> Result<Response<pb::PbMemberAddResponse>, Status> {
        Err(unimplemented("MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<pb::PbMemberRemoveRequest>,
    ) -> Result<Response<pb::PbMemberRemoveResponse>, Status> {
        Err(unimplemented("MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<pb::PbMemberUpdateRequest>,
    ) -> Result<Response<pb::PbMemberUpdateResponse>, Status> {
        Err(unimplemented("MemberUpdate"))
    }

    async fn member_list(
        &self,
        _: Request<pb::PbMemberListRequest>,
    ) -> Result<Response<pb::PbMemberListResponse>, Status> {
        let mut header = self.gate.home().status().await?.header;
        let id = member_id(&self.addr);
        if let Some(header) = header.as_mut() {
            header.member_id = id;
        }
        let url = format!("http://{}", self.addr);
        Ok(Response::new(pb::PbMemberListResponse {
            header,
            members: vec![pb::PbMember {
                id,
                name: "aq".to_string(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![url],
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<pb::PbMemberPromoteRequest>,
    ) -> Result<Response<pb::PbMemberPromoteResponse>, Status> {
        Err(unimplemented("MemberPromote"))
    }
}
