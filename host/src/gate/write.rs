//! The etcd writes (Put, DeleteRange, Txn), each through route → verify → decide → send, with
//! the retries between: a guard that failed (a policy read moved) decides again; a group that
//! gave the scope away sends to the new owner when routing names one.

use aq_sdk as m;
use etcd_client::proto as pb;

use super::decide::Draft;
use super::model::{collect_txn, compare_to_model, delete_op, footprint, leases_of, model_of, put_op};
use super::send::{client_answer, unexpected};
use super::verify::with_nonce;
use super::{Caller, GateError, Gateway, ScopeRuntime, anchors};
use crate::index::{KeyRange, Owner};
use crate::lineage::RecordKind;

/// How many times a write is retried after a policy read moved.
const MAX_ATTEMPTS: usize = 5;

impl Gateway {
    /// Runs one governed mutation: evaluate, send, and evaluate again when a policy read
    /// moved. Returns the response of the client's op and the outer header.
    pub(super) async fn govern(
        &self,
        runtime: &ScopeRuntime,
        ops: Vec<m::Op>,
        compares: Vec<m::Compare>,
        op: pb::PbTxnOpRequest,
        caller: &Caller,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        match self.govern_on(runtime, ops, compares, &op, caller).await {
            Err(GateError::NotOwner { scope, group, detail }) => {
                // The group gave the keys away. Once routing names their new owner (at once,
                // or within the hand-off wait while a move cuts over), the write is decided
                // there afresh and sent to it; otherwise the refusal stands.
                let footprint = footprint(&op);
                let mut reroutes = self.reroutes();
                let deadline = tokio::time::Instant::now() + super::HANDOFF_WAIT;
                let routing = loop {
                    let routing = self.routing();
                    let names_new_owner = matches!(routing.route_write(&footprint),
                        Ok(moved) if moved.group.name() != group || moved.scope.id != scope);
                    if names_new_owner {
                        break routing;
                    }
                    match tokio::time::timeout_at(deadline, reroutes.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => return Err(GateError::NotOwner { scope, group, detail }),
                    }
                };
                let moved = routing.route_write(&footprint)?;
                tracing::info!(scope = %scope, from = %group, to = moved.group.name(), "the scope moved; sending the write to its new owner");
                let (ops, compares, _) = model_of(&op);
                self.ensure_leases(&moved.group, leases_of(&ops)).await?;
                self.govern_on(moved, ops, compares, &op, caller).await
            }
            other => other,
        }
    }

    pub(super) async fn govern_on(
        &self,
        runtime: &ScopeRuntime,
        ops: Vec<m::Op>,
        compares: Vec<m::Compare>,
        op: &pb::PbTxnOpRequest,
        caller: &Caller,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        let mut context = self.context(runtime, ops, compares, caller.user.as_deref());
        self.verify(runtime, &mut context, caller).await?;
        // Anchors that did not co-sign, once they were asked.
        let mut unanchored: Option<Vec<String>> = None;
        for _ in 0..MAX_ATTEMPTS {
            let evaluated = match self.evaluate(runtime, &mut context) {
                Ok(evaluated) => evaluated,
                Err(GateError::NeedsApproval(mut shortfall)) => {
                    let wanted = self.unsigned_anchors(&shortfall.rule, &context);
                    if unanchored.is_none() && !wanted.is_empty() {
                        let votes = self.gather_anchors(runtime, &context, op, caller, &wanted).await;
                        context.credentials.extend(votes.credentials);
                        unanchored = Some(votes.missing);
                        continue;
                    }
                    if let Some(missing) = unanchored.as_ref().filter(|m| !m.is_empty()) {
                        shortfall.message = format!("{}; no co-signature from {}", shortfall.message, missing.join("; "));
                        if !anchors::people_can_reach(&shortfall, &context.credentials) {
                            return Err(GateError::NeedsApproval(shortfall));
                        }
                    }
                    return self.propose(runtime, &context, op, *shortfall, caller.wait).await;
                }
                Err(e) => return Err(e),
            };
            let draft = Draft::of(&context, evaluated.lineage, evaluated.policy, RecordKind::Mutation);
            let mut guards = evaluated.guards;
            let guarded = !guards.is_empty();
            let sent = self.send(runtime, with_nonce(op.clone(), caller, &mut guards), guards, draft).await?;
            if guarded {
                runtime.stats.guarded(sent.is_none());
            }
            if let Some((mut inner, header)) = sent {
                count_write(runtime, op);
                if caller.signed.is_some() {
                    inner = client_answer(inner)?;
                }
                return Ok((inner, header));
            }
            self.replayed(runtime, caller).await?;
        }
        Err(GateError::Contended(runtime.scope.id.clone()))
    }

    /// etcd `Put`, governed.
    pub async fn put(&self, request: pb::PbPutRequest, caller: &Caller) -> Result<pb::PbPutResponse, GateError> {
        let routing = self.routing();
        let runtime = routing.route_key(&request.key)?;
        self.ensure_leases(&runtime.group, [request.lease]).await?;
        let ops = vec![m::Op::Put(put_op(&request))];
        let (response, header) =
            self.govern(runtime, ops, Vec::new(), pb::PbTxnOpRequest::RequestPut(request), caller).await?;
        match response {
            pb::PbTxnOpResponse::ResponsePut(mut put) => {
                put.header = header;
                Ok(put)
            }
            other => Err(unexpected("put", &other)),
        }
    }

    /// etcd `DeleteRange`, governed. A range over several scopes is deleted scope by scope,
    /// after every scope's policy allowed its part; it is not atomic across scopes.
    pub async fn delete_range(
        &self,
        request: pb::PbDeleteRequest,
        caller: &Caller,
    ) -> Result<pb::PbDeleteResponse, GateError> {
        let range = KeyRange::from_request(&request.key, &request.range_end);
        let routing = self.routing();
        if let Owner::Reserved = routing.index().lookup(&request.key) {
            return Err(GateError::Reserved(String::from_utf8_lossy(&request.key).into_owned()));
        }
        let parts = routing.index().overlapping(&range);
        if parts.is_empty() {
            return Ok(pb::PbDeleteResponse { header: self.any_header().await?, deleted: 0, prev_kvs: Vec::new() });
        }
        if parts.len() == 1 && parts[0].1 == range {
            let runtime = routing.runtime(parts[0].0);
            return self.delete_part(runtime, request, caller).await;
        }
        if caller.signed.is_some() {
            let scopes = parts.iter().map(|(scope, _)| scope.id.clone()).collect();
            return Err(GateError::CrossScope(scopes));
        }
        let parts: Vec<(&ScopeRuntime, pb::PbDeleteRequest)> = parts
            .iter()
            .map(|(scope, part)| {
                let (key, range_end) = part.to_request();
                (routing.runtime(scope), pb::PbDeleteRequest { key, range_end, prev_kv: request.prev_kv })
            })
            .collect();
        let groups: std::collections::BTreeSet<&str> = parts.iter().map(|(runtime, _)| runtime.group.name()).collect();
        if groups.len() == 1 {
            match self.delete_together(&parts, caller).await {
                // A hand-off under way: part by part below, each following its scope's move.
                Err(GateError::NotOwner { scope, group, .. }) => {
                    tracing::info!(%scope, %group, "a multi-scope delete meets a hand-off; deleting part by part");
                }
                other => return other,
            }
        }
        // Parts on several groups: evaluate every part first, so a deny anywhere deletes
        // nothing, then delete each part on its group (not atomic across groups).
        for (runtime, part) in &parts {
            // Proposals cover one scope: a delete over several that needs approval is refused.
            self.evaluate(runtime, &mut self.context(runtime, vec![delete_op(part)], Vec::new(), caller.user.as_deref()))?;
        }
        let mut merged = pb::PbDeleteResponse::default();
        let part_caller = Caller { user: caller.user.clone(), ..Caller::default() };
        for (runtime, part) in parts {
            let response = self.delete_part(runtime, part, &part_caller).await?;
            merged.header = merged.header.or(response.header);
            merged.deleted += response.deleted;
            merged.prev_kvs.extend(response.prev_kvs);
        }
        Ok(merged)
    }

    /// A delete over several scopes of one group as one Txn: every part's policy decides,
    /// then the parts go together with each part's lineage record, guarded by every policy's
    /// reads, so the delete is atomic and takes one revision, as in etcd. A moved policy read
    /// decides every part again. Each part's answer is in its scope's revisions; the header in
    /// the first part's.
    async fn delete_together(
        &self,
        parts: &[(&ScopeRuntime, pb::PbDeleteRequest)],
        caller: &Caller,
    ) -> Result<pb::PbDeleteResponse, GateError> {
        let (first, _) = parts[0];
        for _ in 0..MAX_ATTEMPTS {
            let mut guards = Vec::new();
            let mut success = Vec::new();
            for (runtime, part) in parts {
                let mut context = self.context(runtime, vec![delete_op(part)], Vec::new(), caller.user.as_deref());
                let evaluated = self.evaluate(runtime, &mut context)?;
                guards.extend(evaluated.guards);
                if let Some(draft) = Draft::of(&context, evaluated.lineage, evaluated.policy, RecordKind::Mutation) {
                    let record = draft.record(&runtime.scope.id);
                    success.push(super::send::put(record.key(), record.encode()));
                }
            }
            let records = success.len();
            success.extend(parts.iter().map(|(_, part)| pb::PbTxnRequestOp {
                request: Some(pb::PbTxnOpRequest::RequestDeleteRange(part.clone())),
            }));
            let guarded = !guards.is_empty();
            let txn = pb::PbTxnRequest { compare: guards, success, failure: Vec::new() };
            let mut response =
                first.group.txn(txn).await.map_err(|s| self.backend_failure(first, GateError::Backend(s)))?;
            if !response.succeeded {
                for (runtime, _) in parts {
                    runtime.stats.guarded(true);
                    self.metrics.guard_retry(&runtime.scope.id);
                }
                continue;
            }
            let mut merged = pb::PbDeleteResponse::default();
            for ((runtime, part), answer) in parts.iter().zip(response.responses.drain(records..)) {
                let Some(mut answer) = answer.response else {
                    return Err(GateError::Backend(tonic::Status::internal("etcd returned an empty txn response")));
                };
                runtime.scope.revisions.response_op(&mut answer);
                let pb::PbTxnOpResponse::ResponseDeleteRange(deleted) = answer else {
                    return Err(unexpected("delete", &answer));
                };
                merged.deleted += deleted.deleted;
                merged.prev_kvs.extend(deleted.prev_kvs);
                if guarded {
                    runtime.stats.guarded(false);
                }
                self.metrics.routed(&runtime.scope.id, "write");
                count_write(runtime, &pb::PbTxnOpRequest::RequestDeleteRange(part.clone()));
            }
            merged.header = response.header;
            first.scope.revisions.header(&mut merged.header);
            return Ok(merged);
        }
        Err(GateError::Contended(first.scope.id.clone()))
    }

    pub(super) async fn delete_part(
        &self,
        runtime: &ScopeRuntime,
        request: pb::PbDeleteRequest,
        caller: &Caller,
    ) -> Result<pb::PbDeleteResponse, GateError> {
        let ops = vec![delete_op(&request)];
        let (response, header) =
            self.govern(runtime, ops, Vec::new(), pb::PbTxnOpRequest::RequestDeleteRange(request), caller).await?;
        match response {
            pb::PbTxnOpResponse::ResponseDeleteRange(mut delete) => {
                delete.header = header;
                Ok(delete)
            }
            other => Err(unexpected("delete", &other)),
        }
    }

    /// etcd `Txn`, governed: the whole transaction must stay in one scope. A transaction of
    /// reads only is forwarded without evaluation.
    pub async fn txn(&self, request: pb::PbTxnRequest, caller: &Caller) -> Result<pb::PbTxnResponse, GateError> {
        let mut ranges = Vec::new();
        let mut ops = Vec::new();
        collect_txn(&request, &mut ranges, Some(&mut ops));
        if ranges.is_empty() {
            return Ok(pb::PbTxnResponse { header: self.any_header().await?, succeeded: true, responses: Vec::new() });
        }
        let routing = self.routing();
        let runtime = routing.route_write(&ranges)?;
        if ops.is_empty() {
            self.metrics.routed(&runtime.scope.id, "read");
            runtime.stats.read(&ranges[0]);
            let shift = runtime.scope.revisions;
            if shift.is_identity() {
                return Ok(runtime.group.txn(request).await?);
            }
            let mut request = request;
            shift.txn_request(&mut request)?;
            let mut response = runtime.group.txn(request).await?;
            shift.txn_response(&mut response);
            return Ok(response);
        }
        self.ensure_leases(&runtime.group, leases_of(&ops)).await?;
        let compares = request.compare.iter().map(compare_to_model).collect();
        let (response, header) =
            self.govern(runtime, ops, compares, pb::PbTxnOpRequest::RequestTxn(request), caller).await?;
        match response {
            pb::PbTxnOpResponse::ResponseTxn(mut txn) => {
                txn.header = header;
                Ok(txn)
            }
            other => Err(unexpected("txn", &other)),
        }
    }
}

/// Counts a write in its scope's load: a Put by its key, anything else by the first range it
/// touches.
fn count_write(runtime: &ScopeRuntime, op: &pb::PbTxnOpRequest) {
    match op {
        pb::PbTxnOpRequest::RequestPut(put) => runtime.stats.wrote_key(&put.key),
        other => {
            if let Some(range) = footprint(other).first() {
                runtime.stats.wrote(range);
            }
        }
    }
}
