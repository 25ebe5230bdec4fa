//! Proposals: writes whose policy asks for more approval weight than their signatures carry.
//! A proposal holds the client's request, the approval rule, the approvals so far and the
//! revision the request was evaluated at; approvers sign [`Proposal::approval_digest`], which is
//! the request's canonical digest with the proposal id as nonce and its expiry as not-after.

use aq_sdk as m;
use serde::{Deserialize, Serialize};

use super::digest::{Envelope, request_digest};

/// Where a proposal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProposalState {
    /// Waiting for approvals.
    Pending,
    /// Approved; a replica claimed the commit and is writing it. A claim older than
    /// [`CLAIM_TIMEOUT`] is finished by any replica (the write can land only once).
    Committing,
    /// Approved and written.
    Committed,
    /// Not approved in time.
    Expired,
    /// Refused by an operator.
    Rejected,
    /// Approved, but the keys changed since it was evaluated; nothing was written.
    Void,
}

/// One approval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Approval {
    /// The approving principal.
    pub principal: String,
    /// The key that signed, hex.
    pub key: String,
    /// The signature over the approval digest, hex.
    pub signature: String,
    /// When (Unix seconds).
    pub at: u64,
}

/// A voter of the rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VoterWeight {
    /// Principal id.
    pub principal: String,
    /// Its weight.
    pub weight: u32,
}

/// A write waiting for approvals, as stored in the meta group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Proposal {
    /// 16 hex digits.
    pub id: String,
    /// The scope of the write.
    pub scope: String,
    /// Where it stands.
    pub state: ProposalState,
    /// Why it is void, rejected or expired.
    #[serde(default)]
    pub reason: Option<String>,
    /// What approvers sign, hex (recompute it from `request` before signing).
    pub approval_digest: String,
    /// The meta group's cluster id the digest is bound to.
    pub cluster_id: u64,
    /// Created (Unix seconds).
    pub created_at: u64,
    /// Approvals after this Unix second are refused and the proposal expires.
    pub expires_at: u64,
    /// The digest of the policy that asked for approval.
    pub policy: String,
    /// Who must approve, and how much each counts.
    pub voters: Vec<VoterWeight>,
    /// Weight needed.
    pub threshold: u32,
    /// Approvals so far (the request's own verified signers first).
    pub approvals: Vec<Approval>,
    /// The keys the write touches, for people.
    pub keys: Vec<String>,
    /// The client's request: an etcd `RequestOp` in protobuf, hex.
    pub request: String,
    /// The scope's group revision the request was evaluated at; the commit is guarded on no
    /// touched key having changed after it.
    pub evaluated_at_revision: i64,
    /// The revision of the commit.
    #[serde(default)]
    pub committed_revision: Option<i64>,
    /// The commit's etcd `ResponseOp` in protobuf, hex, for a client waiting on it; absent when
    /// a replica other than the claimer finished the commit.
    #[serde(default)]
    pub response: Option<String>,
    /// When the commit was claimed (Unix seconds).
    #[serde(default)]
    pub claimed_at: Option<u64>,
}

/// How long a claimed commit may stay unfinished before another replica finishes it.
pub const CLAIM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Proposal {
    /// The digest approvers sign for a proposal of `ops` and `compares`.
    pub fn approval_digest(cluster_id: u64, scope: &str, id: &str, expires_at: u64, ops: &[m::Op], compares: &[m::Compare]) -> [u8; 32] {
        let envelope = Envelope { cluster_id, scope: scope.to_string(), nonce: id.as_bytes().to_vec(), not_after: expires_at };
        request_digest(&envelope, ops, compares)
    }

    /// The summed weight of the distinct approving voters.
    pub fn weight(&self) -> u32 {
        let approvers: Vec<&str> = self.approvals.iter().map(|a| a.principal.as_str()).collect();
        super::distinct_weight(self.voters.iter().map(|v| (v.principal.as_str(), v.weight)), &approvers)
    }
}
