//! The approval flow. A write whose signatures weigh less than its policy's rule asks becomes a
//! proposal in the meta group; approvers sign the proposal's digest; at the threshold the replica
//! that received the deciding approval re-evaluates the write with the approvers as credentials
//! and commits it, guarded on no touched key having changed since the proposal was evaluated.

use std::time::Duration;

use aq_sdk as m;
use ed25519_dalek::{Signature, VerifyingKey};
use etcd_client::proto as pb;
use tonic::Status;

use super::decide::Draft;
use super::model::model_of;
use super::send::{client_answer, with_reserved};
use super::{GateError, Gateway, ScopeRuntime, Shortfall};
use crate::lineage::{ApprovalRecord, RecordKind};
use crate::backend::compare::{RESULT_LESS, TARGET_MOD};
use crate::clock::unix_now;
use crate::meta::{MetaError, MetaStore};
use crate::trust::proposal::{Approval, CLAIM_TIMEOUT, Proposal, ProposalState, VoterWeight};

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

/// Why an approved proposal did not commit.
enum CommitError {
    /// It never will: the policy or the keys moved on. Nothing was written.
    Void(String),
    /// Unknown whether it landed (etcd did not answer); recovery finishes it.
    Unfinished(String),
}

/// Where a proposal's commit leaves its marker, in the scope's group, in the write's own Txn.
fn commit_marker_key(id: &str) -> Vec<u8> {
    let mut key = crate::index::RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"commit/");
    key.extend_from_slice(id.as_bytes());
    key
}

/// Decodes a proposal's stored request.
pub(crate) fn decode_request(proposal: &Proposal) -> Result<pb::PbTxnOpRequest, String> {
    super::stored::decode_op(&proposal.request)
        .ok_or_else(|| format!("proposal {}: the stored request is not a hex etcd RequestOp", proposal.id))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Gateway {
    pub(super) fn meta(&self) -> MetaStore {
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
            .range(pb::PbRangeRequest { key: crate::lineage::records_prefix(scope), count_only: true, ..Default::default() })
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
            request: super::stored::encode_op(op),
            evaluated_at_revision: revision,
            committed_revision: None,
            response: None,
            claimed_at: None,
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
                ProposalState::Committing => {}
                ProposalState::Committed if proposal.response.is_none() => {
                    return Err(GateError::Proposed {
                        id: id.to_string(),
                        message: format!(
                            "proposal {id} was committed at revision {}, finished by another replica after the first \
                             was interrupted, so etcd's answer was not kept; read the keys for the result",
                            proposal.committed_revision.unwrap_or_default()
                        ),
                    });
                }
                ProposalState::Committed => {
                    let response = proposal
                        .response
                        .as_deref()
                        .and_then(super::stored::decode_answer)
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
                // Claim the commit; the write itself can land only once (see `commit_write`).
                proposal.state = ProposalState::Committing;
                proposal.claimed_at = Some(unix_now());
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
    /// no touched key having changed since it was evaluated. When the write's
    /// fate is unknown (etcd did not answer) the proposal stays `committing` for
    /// [`Gateway::recover_proposals`].
    async fn commit(&self, mut proposal: Proposal, revision: i64) -> Result<Proposal, ApprovalError> {
        match self.commit_write(&proposal).await {
            Ok((response, committed)) => {
                proposal.state = ProposalState::Committed;
                proposal.committed_revision = Some(committed);
                proposal.response = response.map(super::stored::encode_answer);
                tracing::info!(proposal = %proposal.id, scope = %proposal.scope, revision = committed, "proposal committed");
            }
            Err(CommitError::Void(reason)) => {
                proposal.state = ProposalState::Void;
                proposal.reason = Some(reason);
                tracing::info!(proposal = %proposal.id, scope = %proposal.scope, reason = ?proposal.reason, "proposal void");
            }
            Err(CommitError::Unfinished(reason)) => {
                tracing::warn!(proposal = %proposal.id, scope = %proposal.scope, "commit unfinished, left for recovery: {reason}");
                proposal.reason = Some(format!("the commit was interrupted ({reason}); a replica finishes it"));
                return Ok(proposal);
            }
        }
        self.meta().write_proposal(&proposal, revision).await?;
        Ok(proposal)
    }

    /// Finishes commits whose claim is older than [`CLAIM_TIMEOUT`]: the claiming replica
    /// stopped or lost etcd between claim and write. Safe against a claimer that is only slow:
    /// the write is guarded on the proposal's commit marker, so it lands once, and a replica
    /// that finds the marker reports the commit it records.
    pub async fn recover_proposals(&self) {
        let Ok(proposals) = self.meta().proposals().await else { return };
        let now = unix_now();
        for (mut proposal, revision) in proposals {
            let stale = proposal.claimed_at.unwrap_or(0) + CLAIM_TIMEOUT.as_secs() <= now;
            if proposal.state != ProposalState::Committing || !stale {
                continue;
            }
            proposal.claimed_at = Some(now);
            let Ok(revision) = self.meta().write_proposal(&proposal, revision).await else { continue };
            tracing::info!(proposal = %proposal.id, scope = %proposal.scope, "finishing an interrupted commit");
            if let Err(e) = self.commit(proposal, revision).await {
                tracing::warn!("cannot finish an interrupted commit: {e}");
            }
        }
    }

    /// The write of an approved proposal, with its commit marker in the same Txn: the answer
    /// (none when another replica's write landed first) and the revision.
    async fn commit_write(&self, proposal: &Proposal) -> Result<(Option<pb::PbTxnOpResponse>, i64), CommitError> {
        let routing = self.routing();
        let runtime = routing
            .scope(&proposal.scope)
            .ok_or_else(|| CommitError::Void(format!("scope {} no longer exists", proposal.scope)))?;
        let op = decode_request(proposal).map_err(CommitError::Void)?;
        let marker = commit_marker_key(&proposal.id);
        if let Some(done) = self.commit_marker(runtime, &marker).await? {
            return Ok((None, done));
        }
        let (ops, compares, ranges) = model_of(&op);
        let mut context = self.context(runtime, ops, compares, None);
        let principals = self.trust.principals_by_id();
        context.credentials = proposal
            .approvals
            .iter()
            .filter_map(|a| principals.get(&a.principal))
            .map(|p| m::Credential { principal: p.id.clone(), roles: p.roles.clone() })
            .collect();
        let evaluated = match self.evaluate(runtime, &mut context) {
            Ok(evaluated) => evaluated,
            Err(GateError::NeedsApproval(shortfall)) => {
                return Err(CommitError::Void(format!("the policy now asks for more: {}", shortfall.message)));
            }
            Err(e) => return Err(CommitError::Void(format!("the policy no longer allows it: {e}"))),
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
        // The marker makes the write land once, whoever sends it.
        guards.push(crate::meta::compare_unchanged(marker.clone(), 0));
        let marked = with_reserved(op.clone(), marker.clone(), proposal.id.clone().into_bytes());
        let sent = self.send(runtime, marked, guards, Some(draft)).await.map_err(|e| CommitError::Unfinished(e.to_string()))?;
        match sent {
            Some((inner, header)) => {
                let inner = client_answer(inner).map_err(|e| CommitError::Unfinished(e.to_string()))?;
                Ok((Some(inner), header.map(|h| h.revision).unwrap_or_default()))
            }
            None => match self.commit_marker(runtime, &marker).await? {
                Some(done) => Ok((None, done)),
                None => Err(CommitError::Void(format!(
                    "the keys it writes changed after revision {} when it was evaluated; nothing was written",
                    proposal.evaluated_at_revision
                ))),
            },
        }
    }

    /// The revision of a proposal's landed commit, if it landed.
    async fn commit_marker(&self, runtime: &ScopeRuntime, marker: &[u8]) -> Result<Option<i64>, CommitError> {
        let found = runtime
            .group
            .range(pb::PbRangeRequest { key: marker.to_vec(), ..Default::default() })
            .await
            .map_err(|s| CommitError::Unfinished(format!("cannot read the commit marker: {}", s.message())))?;
        Ok(found.kvs.first().map(|kv| kv.mod_revision))
    }
}
