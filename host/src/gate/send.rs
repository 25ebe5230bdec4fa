//! Step 4, send: a decided write to its scope's group, as the client sent it when nothing
//! guards it, otherwise as the success branch of a Txn holding only this write and aq's own
//! records for it.

use etcd_client::proto as pb;
use tonic::Status;

use super::decide::Draft;
use super::{GateError, Gateway, ScopeRuntime};

/// The client's op with one of aq's reserved records beside it (a nonce, a proposal's commit
/// marker), as one nested Txn whose last answer is the client's.
pub(super) fn with_reserved(op: pb::PbTxnOpRequest, key: Vec<u8>, value: Vec<u8>) -> pb::PbTxnOpRequest {
    pb::PbTxnOpRequest::RequestTxn(pb::PbTxnRequest {
        compare: Vec::new(),
        success: vec![put(key, value), pb::PbTxnRequestOp { request: Some(op) }],
        failure: Vec::new(),
    })
}

/// The client's answer inside [`with_reserved`]'s Txn.
pub(super) fn client_answer(response: pb::PbTxnOpResponse) -> Result<pb::PbTxnOpResponse, GateError> {
    match response {
        pb::PbTxnOpResponse::ResponseTxn(mut txn) => txn
            .responses
            .pop()
            .and_then(|r| r.response)
            .ok_or_else(|| GateError::Backend(Status::internal("etcd returned an empty txn response"))),
        other => Ok(other),
    }
}

pub(super) fn put(key: Vec<u8>, value: Vec<u8>) -> pb::PbTxnRequestOp {
    pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest { key, value, ..Default::default() })) }
}

impl Gateway {
    /// Sends `op` to the scope's group. Without `guards` or a `draft` it goes as the client
    /// sent it; otherwise as the success branch of a Txn guarded by `guards`, after the
    /// `draft`'s lineage record. The Txn holds this one write: it takes a revision of its own.
    /// `op` and the answer are in the scope's revisions (`revision.rs`), `guards` in the group's.
    /// Answers the client op's answer and the header; `Ok(None)` when a guard failed (a policy
    /// read or a nonce moved) and the caller evaluates again.
    pub(super) async fn send(
        &self,
        runtime: &ScopeRuntime,
        op: pb::PbTxnOpRequest,
        guards: Vec<pb::PbCompare>,
        draft: Option<Draft>,
    ) -> Result<Option<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>)>, GateError> {
        let shift = runtime.scope.revisions;
        if shift.is_identity() {
            return self.send_as_is(runtime, op, guards, draft).await;
        }
        // The op in the scope's revisions, for the group; `guards` come from the group already.
        let mut op = op;
        shift.request_op(&mut op)?;
        let mut sent = self.send_as_is(runtime, op, guards, draft).await?;
        if let Some((answer, header)) = &mut sent {
            shift.response_op(answer);
            shift.header(header);
        }
        Ok(sent)
    }

    /// [`Gateway::send`] in the group's own revisions.
    async fn send_as_is(
        &self,
        runtime: &ScopeRuntime,
        op: pb::PbTxnOpRequest,
        guards: Vec<pb::PbCompare>,
        draft: Option<Draft>,
    ) -> Result<Option<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>)>, GateError> {
        if guards.is_empty() && draft.is_none() {
            let sent = self.send_plain(runtime, op).await.map_err(|e| self.backend_failure(runtime, e))?;
            self.metrics.routed(&runtime.scope.id, "write");
            return Ok(Some(sent));
        }
        let mut success = Vec::with_capacity(2);
        if let Some(draft) = draft {
            let record = draft.record(&runtime.scope.id);
            success.push(put(record.key(), record.encode()));
        }
        success.push(pb::PbTxnRequestOp { request: Some(op) });
        let request = pb::PbTxnRequest { compare: guards, success, failure: Vec::new() };
        let mut response = runtime.group.txn(request).await.map_err(|s| self.backend_failure(runtime, GateError::Backend(s)))?;
        if !response.succeeded {
            self.metrics.guard_retry(&runtime.scope.id);
            return Ok(None);
        }
        self.metrics.routed(&runtime.scope.id, "write");
        let inner = response
            .responses
            .pop()
            .and_then(|r| r.response)
            .ok_or_else(|| GateError::Backend(Status::internal("etcd returned an empty txn response")))?;
        Ok(Some((inner, response.header)))
    }

    /// The client's op alone: its answer, and the header taken out of it.
    pub(super) async fn send_plain(
        &self,
        runtime: &ScopeRuntime,
        op: pb::PbTxnOpRequest,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        let group = &runtime.group;
        let (header, answer) = match op {
            pb::PbTxnOpRequest::RequestPut(put) => {
                let mut r = group.put(put).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponsePut(r))
            }
            pb::PbTxnOpRequest::RequestDeleteRange(delete) => {
                let mut r = group.delete_range(delete).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponseDeleteRange(r))
            }
            pb::PbTxnOpRequest::RequestTxn(txn) => {
                let mut r = group.txn(txn).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponseTxn(r))
            }
            pb::PbTxnOpRequest::RequestRange(range) => {
                let mut r = group.range(range).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponseRange(r))
            }
        };
        Ok((answer, header))
    }

    /// Counts a failed send; a refusal by the group's ownership check becomes
    /// [`GateError::NotOwner`].
    pub(super) fn backend_failure(&self, runtime: &ScopeRuntime, error: GateError) -> GateError {
        match error {
            GateError::Backend(status) => {
                self.metrics.backend_error(runtime.group.name());
                if status.code() == tonic::Code::PermissionDenied && runtime.group.user().is_some() {
                    tracing::warn!(scope = %runtime.scope.id, group = runtime.group.name(), "the group refused a write: it no longer holds the scope");
                    return GateError::NotOwner {
                        scope: runtime.scope.id.clone(),
                        group: runtime.group.name().to_string(),
                        detail: status.message().to_string(),
                    };
                }
                GateError::Backend(status)
            }
            other => other,
        }
    }
}

/// An answer of the wrong kind from etcd.
pub(super) fn unexpected(what: &str, response: &pb::PbTxnOpResponse) -> GateError {
    GateError::Backend(Status::internal(format!("etcd answered a {what} with {response:?}")))
}
