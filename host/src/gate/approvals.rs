//! The approval flow. A write whose signatures weigh less than its policy's rule asks becomes a
//! proposal in the meta group; approvers sign the proposal's digest; at the threshold the replica
//! that received the deciding approval re-evaluates the write with the approvers as credentials
//! and commits it, guarded on no touched key having changed since the proposal was evaluated.

use std::time::Duration;

use aq_sdk as m;
use ed25519_dalek::{Signature, VerifyingKey};
use etcd_client::proto as pb;
use prost::Message;
use tonic::Status;

use super::{Draft, GateError, Gateway, ScopeRuntime, Shortfall, collect_txn, compare_to_model, put_op};
use crate::lineage::{ApprovalRecord, RecordKind};
use crate::backend::compare::{RESULT_LESS, TARGET_MOD};
use crate::index::KeyRange;
use crate::meta::{MetaError, MetaStore, unix_now};
use crate::trust::proposal::{Approval, Proposal, ProposalState, VoterWeight};

/// How often a waiting request looks at its proposal.
const WAIT_POLL: Duration = Duration::from_millis(25);

/// Why an approval, rejection or read of a proposal failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// No such proposal.
    #[error("no proposal {0}; `aq proposals ls` lists them")]
    Unknown(String),
    /// It is no longer pending.
    #[error("proposal {id} is {state:?}{}; only pending proposals take approvals", .reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    NotPending {
        /// The proposal.
        id: String,
        /// Its state.
        state: ProposalState,
        /// Why.
        reason: Option<String>,
    },
    /// The key belongs to no principal, or the signature does not verify.
    #[error("{0}")]
    BadSignature(String),
    /// The signer may not vote on it.
    #[error("principal {principal} is not a voter of proposal {id}; its voters are {voters}")]
    NotVoter {
        /// The proposal.
        id: String,
        /// Who signed.
        principal: String,
        /// Who may.
        voters: String,
    },
    /// The meta group failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// The ops, compares and touched ranges of a client's request op.
pub(crate) fn model_of(op: &pb::PbTxnOpRequest) -> (Vec<m::Op>, Vec<m::Compare>, Vec<KeyRange>) {
    match op {
        pb::PbTxnOpRequest::RequestPut(put) => {
            (vec![m::Op::Put(put_op(put))], Vec::new(), vec![KeyRange::from_request(&put.key, &[])])
        }
        pb::PbTxnOpRequest::RequestDeleteRange(delete) => (
            vec![m::Op::DeleteRange(m::DeleteRangeOp {
                key: m::Bytes(delete.key.clone()),
                range_end: m::Bytes(delete.range_end.clone()),
            })],
            Vec::new(),
            vec![KeyRange::from_request(&delete.key, &delete.range_end)],
        ),
        pb::PbTxnOpRequest::RequestTxn(txn) => {
            let (mut ranges, mut ops) = (Vec::new(), Vec::new());
            collect_txn(txn, &mut ranges, &mut ops);
            (ops, txn.compare.iter().map(compare_to_model).collect(), ranges)
        }
        pb::PbTxnOpRequest::RequestRange(range) => (Vec::new(), Vec::new(), vec![KeyRange::from_request(&range.key, &range.range_end)]),
    }
}

/// Decodes a proposal's stored request.
pub(crate) fn decode_request(proposal: &Proposal) -> Result<pb::PbTxnOpRequest, String> {
    let bytes = hex::decode(&proposal.request).map_err(|e| format!("proposal {}: request is not hex: {e}", proposal.id))?;
    pb::PbTxnRequestOp::decode(bytes.as_slice())
        .ok()
        .and_then(|op| op.request)
        .ok_or_else(|| format!("proposal {}: the stored request does not decode", proposal.id))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Gateway {
    fn meta(&self) -> MetaStore {
        MetaStore::new(self.home.clone())
    }

    /// Stores a write that needs more approval weight as a proposal; answers with its id, or
    /// waits for its outcome when the caller asked to.
    pub(super) async fn propose(
        &self,
        runtime: &ScopeRuntime,
        context: &m::Context,
        op: &pb::PbTxnOpRequest,
        shortfall: Shortfall,
        wait: Option<Duration>,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        let scope = &runtime.scope.id;
        // The revision the request was evaluated at: a read of the scope's group now.
        let revision = runtime
            .group
            .range(pb::PbRangeRequest { key: runtime.fence.key().to_vec(), count_only: true, ..Default::default() })
            .await?
            .header
            .map(|h| h.revision)
            .unwrap_or_default();
        let mut id_bytes = [0u8; 8];
        getrandom::fill(&mut id_bytes).map_err(|e| GateError::Backend(Status::internal(e.to_string())))?;
        let id = hex::encode(id_bytes);
        let now = unix_now();
        let expires_at = now + shortfall.rule.expiry_seconds.max(1);
        let digest =
            Proposal::approval_digest(self.trust.cluster_id(), scope, &id, expires_at, &context.ops, &context.compares);
        // The request's own verified signers count as its first approvals.
        let approvals = context
            .credentials
            .iter()
            .map(|c| Approval { principal: c.principal.clone(), key: String::new(), signature: String::new(), at: now })
            .collect();
        let keys = context
            .ops
            .iter()
            .map(|op| match op {
                m::Op::Put(p) => text(&p.key),
                m::Op::DeleteRange(d) if d.range_end.is_empty() => text(&d.key),
                m::Op::DeleteRange(d) => format!("[{}, {})", text(&d.key), text(&d.range_end)),
            })
            .collect();
        let proposal = Proposal {
            id: id.clone(),
            scope: scope.clone(),
            state: ProposalState::Pending,
            reason: None,
            approval_digest: hex::encode(digest),
            cluster_id: self.trust.cluster_id(),
            created_at: now,
            expires_at,
            policy: shortfall.policy.to_hex(),
            voters: shortfall.rule.voters.iter().map(|v| VoterWeight { principal: v.principal.clone(), weight: v.weight }).collect(),
            threshold: shortfall.rule.threshold,
            approvals,
            keys,
            request: hex::encode(pb::PbTxnRequestOp { request: Some(op.clone()) }.encode_to_vec()),
            evaluated_at_revision: revision,
            committed_revision: None,
            response: None,
        };
        self.meta().write_proposal(&proposal, 0).await.map_err(|e| GateError::Backend(Status::unavailable(e.to_string())))?;
        tracing::info!(%scope, proposal = %id, weight = shortfall.weight, threshold = shortfall.rule.threshold, "write proposed");
        let message = format!(
            "{}; the write is proposal {id}, pending until {}: approve with `aq approve {id} --key <file>`",
            shortfall.message,
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(expires_at)),
        );
        match wait {
            Some(wait) if !wait.is_zero() => self.wait_for(&id, wait, message).await,
            _ => Err(GateError::Proposed { id, message }),
        }
    }

    /// Waits for a proposal's outcome: the commit's answer, or why it did not commit.
    async fn wait_for(
        &self,
        id: &str,
        wait: Duration,
        message: String,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let proposal = self.proposal(id).await.map_err(|e| GateError::Backend(Status::unavailable(e.to_string())))?;
            match proposal.state {
                // Claimed by the approving replica, write in progress.
                ProposalState::Committed if proposal.response.is_none() => {}
                ProposalState::Committed => {
                    let response = proposal
                        .response
                        .as_deref()
                        .and_then(|r| hex::decode(r).ok())
                        .and_then(|b| pb::PbResponseOp::decode(b.as_slice()).ok())
                        .and_then(|r| r.response)
                        .ok_or_else(|| GateError::Backend(Status::internal(format!("proposal {id} committed without an answer"))))?;
                    let header = pb::PbResponseHeader {
                        cluster_id: self.trust.cluster_id(),
                        revision: proposal.committed_revision.unwrap_or_default(),
                        ..Default::default()
                    };
                    return Ok((response, Some(header)));
                }
                ProposalState::Pending => {}
                state => {
                    let reason = proposal.reason.unwrap_or_default();
                    return Err(GateError::Proposed {
                        id: id.to_string(),
                        message: format!("proposal {id} is {state:?}: {reason}").to_lowercase(),
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GateError::Proposed { id: id.to_string(), message: format!("{message} (still pending after {wait:?})") });
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// A proposal, marked expired first when its time has passed.
    pub async fn proposal(&self, id: &str) -> Result<Proposal, ApprovalError> {
        let (proposal, revision) = self.meta().proposal(id).await?.ok_or_else(|| ApprovalError::Unknown(id.to_string()))?;
        Ok(self.expire(proposal, revision).await)
    }

    /// Every proposal, expired ones marked so.
    pub async fn proposals(&self) -> Result<Vec<Proposal>, ApprovalError> {
        let mut out = Vec::new();
        for (proposal, revision) in self.meta().proposals().await? {
            out.push(self.expire(proposal, revision).await);
        }
        Ok(out)
    }

    async fn expire(&self, mut proposal: Proposal, revision: i64) -> Proposal {
        if proposal.state == ProposalState::Pending && unix_now() > proposal.expires_at {
            proposal.state = ProposalState::Expired;
            proposal.reason = Some(format!("not approved by {} (Unix seconds)", proposal.expires_at));
            // Best effort: whoever reads it first records it; it is kept for audit.
            let _ = self.meta().write_proposal(&proposal, revision).await;
        }
        proposal
    }

    /// Refuses a pending proposal; it is kept for audit.
    pub async fn reject(&self, id: &str, reason: &str, by: &str) -> Result<Proposal, ApprovalError> {
        let (proposal, revision) = self.meta().proposal(id).await?.ok_or_else(|| ApprovalError::Unknown(id.to_string()))?;
        let mut proposal = self.expire(proposal, revision).await;
        if proposal.state != ProposalState::Pending {
            return Err(ApprovalError::NotPending { id: id.to_string(), state: proposal.state, reason: proposal.reason });
        }
        proposal.state = ProposalState::Rejected;
        proposal.reason = Some(format!("rejected by {by}: {reason}"));
        self.meta().write_proposal(&proposal, revision).await?;
        Ok(proposal)
    }

    /// Adds a signed approval; at the threshold, commits the write. Returns the proposal as it
    /// stands afterwards.
    pub async fn approve(&self, id: &str, key: [u8; 32], signature: [u8; 64]) -> Result<Proposal, ApprovalError> {
        for _ in 0..5 {
            let (proposal, revision) = self.meta().proposal(id).await?.ok_or_else(|| ApprovalError::Unknown(id.to_string()))?;
            let mut proposal = self.expire(proposal, revision).await;
            if proposal.state != ProposalState::Pending {
                return Err(ApprovalError::NotPending { id: id.to_string(), state: proposal.state, reason: proposal.reason });
            }
            let principal = self
                .trust
                .principal_of(&key)
                .ok_or_else(|| ApprovalError::BadSignature(format!("no principal has the public key {}", hex::encode(key))))?;
            let digest = hex::decode(&proposal.approval_digest).unwrap_or_default();
            let verifying = VerifyingKey::from_bytes(&key).map_err(|e| ApprovalError::BadSignature(e.to_string()))?;
            verifying.verify_strict(&digest, &Signature::from_bytes(&signature)).map_err(|_| {
                ApprovalError::BadSignature(format!(
                    "the approval by {} does not verify against proposal {id}'s digest {}",
                    principal.id, proposal.approval_digest
                ))
            })?;
            if !proposal.voters.iter().any(|v| v.principal == principal.id) {
                let voters: Vec<&str> = proposal.voters.iter().map(|v| v.principal.as_str()).collect();
                return Err(ApprovalError::NotVoter { id: id.to_string(), principal: principal.id.clone(), voters: voters.join(", ") });
            }
            if !proposal.approvals.iter().any(|a| a.principal == principal.id) {
                proposal.approvals.push(Approval {
                    principal: principal.id.clone(),
                    key: hex::encode(key),
                    signature: hex::encode(signature),
                    at: unix_now(),
                });
            }
            let reached = proposal.weight() >= proposal.threshold;
            if reached {
                // Claim the commit: only the replica whose write lands commits.
                proposal.state = ProposalState::Committed;
            }
            let revision = match self.meta().write_proposal(&proposal, revision).await {
                Ok(revision) => revision,
                Err(MetaError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            if !reached {
                return Ok(proposal);
            }
            return self.commit(proposal, revision).await;
        }
        Err(MetaError::Conflict(format!("(proposal {id})")).into())
    }

    /// Writes an approved proposal: re-evaluated with its approvers as credentials, guarded on
    /// the fence and on no touched key having changed since it was evaluated.
    async fn commit(&self, mut proposal: Proposal, revision: i64) -> Result<Proposal, ApprovalError> {
        let outcome = self.commit_write(&proposal).await;
        match outcome {
            Ok((response, committed)) => {
                proposal.committed_revision = Some(committed);
                proposal.response = Some(hex::encode(pb::PbResponseOp { response: Some(response) }.encode_to_vec()));
                tracing::info!(proposal = %proposal.id, scope = %proposal.scope, revision = committed, "proposal committed");
            }
            Err(reason) => {
                proposal.state = ProposalState::Void;
                proposal.reason = Some(reason);
                tracing::info!(proposal = %proposal.id, scope = %proposal.scope, reason = ?proposal.reason, "proposal void");
            }
        }
        self.meta().write_proposal(&proposal, revision).await?;
        Ok(proposal)
    }

    async fn commit_write(&self, proposal: &Proposal) -> Result<(pb::PbTxnOpResponse, i64), String> {
        let runtime = self.scopes.get(&proposal.scope).ok_or_else(|| format!("scope {} no longer exists", proposal.scope))?;
        let op = decode_request(proposal)?;
        let (ops, compares, ranges) = model_of(&op);
        let mut context = self.context(runtime, ops, compares);
        let principals = self.trust.principals_by_id();
        context.credentials = proposal
            .approvals
            .iter()
            .filter_map(|a| principals.get(&a.principal))
            .map(|p| m::Credential { principal: p.id.clone(), roles: p.roles.clone() })
            .collect();
        for _ in 0..super::MAX_ATTEMPTS {
            let evaluated = match self.evaluate(runtime, &mut context) {
                Ok(evaluated) => evaluated,
                Err(GateError::NeedsApproval(shortfall)) => {
                    return Err(format!("the policy now asks for more: {}", shortfall.message));
                }
                Err(e) => return Err(format!("the policy no longer allows it: {e}")),
            };
            // Every approved commit is recorded, whatever lineage the policy asks of plain writes.
            let level = evaluated.lineage.max(m::LineageLevel::Digest);
            let mut draft =
                Draft::of(&context, level, evaluated.policy, RecordKind::Approval).expect("digest lineage makes a record");
            draft.proposal = Some(proposal.id.clone());
            draft.approvals = proposal
                .approvals
                .iter()
                .map(|a| ApprovalRecord { principal: a.principal.clone(), key: a.key.clone(), signature: a.signature.clone() })
                .collect();
            let mut guards = evaluated.guards;
            for range in &ranges {
                let (key, range_end) = range.to_request();
                guards.push(pb::PbCompare {
                    result: RESULT_LESS,
                    target: TARGET_MOD,
                    key,
                    range_end,
                    target_union: Some(pb::PbTargetUnion::ModRevision(proposal.evaluated_at_revision + 1)),
                });
            }
            let fence = runtime.fence.expected();
            match self.fenced(runtime, op.clone(), guards, Some(&draft)).await.map_err(|e| e.to_string())? {
                Some(mut response) => {
                    let inner = response.responses.pop().and_then(|r| r.response).ok_or("etcd returned an empty txn response")?;
                    return Ok((inner, response.header.map(|h| h.revision).unwrap_or_default()));
                }
                // The fence moved: try again against the new owner.
                None if runtime.fence.expected() != fence => continue,
                None => {
                    return Err(format!(
                        "the keys it writes changed after revision {} when it was evaluated; nothing was written",
                        proposal.evaluated_at_revision
                    ));
                }
            }
        }
        Err(format!("scope {} kept changing owner", proposal.scope))
    }
}
