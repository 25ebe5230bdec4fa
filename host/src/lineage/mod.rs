//! Lineage: a tamper-evident record of governed mutations.
//!
//! A record is written in the same etcd Txn as the mutation it describes, in the scope's group,
//! under the reserved prefix:
//!
//! | key                                  | value                                         |
//! |--------------------------------------|-----------------------------------------------|
//! | `\xffaq/lineage/<scope>/<seq:020>`   | the record (JSON, [`Record`]), `seq` from 0   |
//! | `\xffaq/lineage-head/<scope>`        | [`Head`]: the next `seq` and the last record's hash |
//!
//! Policy swaps are recorded the same way in the meta group's log [`META_LOG`], in the Txn that
//! changes the binding.
//!
//! Every record names the blake3 hash of its predecessor's bytes, and the Txn that writes it
//! (with its one write) is guarded on the head it read, so a scope's records form one chain in
//! strictly increasing revision order. Records
//! hold blake3 hashes of values, never values. Each scope's records are the leaves of an
//! RFC 6962 Merkle log ([`log`]); signed checkpoints of those logs, and a root log over the
//! checkpoints, make an export verifiable offline.

pub mod log;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::index::RESERVED_PREFIX;

/// What a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A write its policy asked lineage for.
    Mutation,
    /// A write committed by approval of a proposal.
    Approval,
    /// A scope's policy binding changed (in the meta log).
    PolicySwap,
}

/// The log of aq's own changes (policy swaps), kept in the meta group.
pub const META_LOG: &str = "@meta";

/// One operation of a recorded write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpRecord {
    /// A put: the key, the blake3 of the value, the lease.
    Put {
        /// The key (hex).
        key: String,
        /// blake3 of the value (hex).
        value_blake3: String,
        /// The lease id, 0 for none.
        lease: i64,
    },
    /// A delete of `[key, range_end)` (just `key` when `range_end` is empty).
    Delete {
        /// The key (hex).
        key: String,
        /// The range end (hex).
        range_end: String,
    },
}

/// An approval that led to a commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApprovalRecord {
    /// The approver.
    pub principal: String,
    /// Its key (hex); empty when it signed the original request instead.
    pub key: String,
    /// Its signature over the proposal digest (hex); empty likewise.
    pub signature: String,
}

/// A lineage record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    /// Format version (1).
    pub v: u8,
    /// The scope.
    pub scope: String,
    /// Position in the scope's log, from 0.
    pub seq: u64,
    /// blake3 (hex) of the previous record's bytes; empty for the first.
    pub prev: String,
    /// What happened.
    pub kind: RecordKind,
    /// When aq decided (Unix milliseconds).
    pub time_ms: u64,
    /// The digest of the policy that decided.
    pub policy: String,
    /// `digest` or `full`, as the policy asked.
    pub level: String,
    /// The verified principals of the request.
    pub principals: Vec<String>,
    /// The operations.
    pub ops: Vec<OpRecord>,
    /// For an approval: the proposal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<String>,
    /// For an approval: who approved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalRecord>,
    /// For a policy swap: the scope whose binding changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// For a policy swap: the new binding (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
}

impl Record {
    /// The stored bytes: the leaf of the Merkle log and what the next record's `prev` hashes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialise")
    }
}

/// The state of a scope's chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The next record's `seq`.
    pub next: u64,
    /// blake3 (hex) of the last record's bytes; empty before the first.
    pub prev: String,
}

/// blake3 (hex) of a record's bytes.
pub fn record_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The prefix of a scope's records.
pub fn records_prefix(scope: &str) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"lineage/");
    key.extend_from_slice(scope.as_bytes());
    key.push(b'/');
    key
}

/// The key of record `seq` of a scope.
pub fn record_key(scope: &str, seq: u64) -> Vec<u8> {
    let mut key = records_prefix(scope);
    key.extend_from_slice(format!("{seq:020}").as_bytes());
    key
}

/// The key of a scope's chain head.
pub fn head_key(scope: &str) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"lineage-head/");
    key.extend_from_slice(scope.as_bytes());
    key
}
