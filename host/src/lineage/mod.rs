//! Lineage: a tamper-evident record of governed mutations.
//!
//! A record is written in the same etcd Txn as the mutation it describes, and in no other
//! write's, in the scope's group under the reserved prefix:
//!
//! | key                                  | value                                         |
//! |--------------------------------------|-----------------------------------------------|
//! | `\xffaq/lineage/<scope>/<id>`        | the record (JSON, [`Record`]); `id` is random  |
//!
//! Policy swaps are recorded the same way in the meta group's log [`META_LOG`], in the Txn that
//! changes the binding.
//!
//! A record takes the revision of its write, which no other write shares, so a scope's log is
//! its records in revision order, and no write waits for another's: nothing serialises a
//! scope's writes. Records are written once (etcd `version` 1) and hold blake3 hashes of values,
//! never values. Each scope's records, in revision order, are the leaves of an RFC 6962 Merkle
//! log ([`log`]); signed checkpoints of those logs (size, root, and the revision of the last
//! record covered), and a root log over the checkpoints, make an export verifiable offline.

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
    /// The layout of scopes changed: seeded from the configuration, or a scope split, merged
    /// or moved (in the meta log).
    LayoutChange,
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
    /// Format version (2).
    pub v: u8,
    /// The scope.
    pub scope: String,
    /// The record's own id (32 hex digits, random): the last part of its key.
    pub id: String,
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
    /// For a layout change: the epoch it made and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<LayoutChange>,
}

/// What a layout change record says: the epoch written, why, and the scopes after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LayoutChange {
    /// The layout's epoch after the change.
    pub epoch: u64,
    /// Why it changed, as the layout record says (which scope split where, merged into which,
    /// moved by which migration, or the configuration it was seeded from).
    pub reason: String,
    /// Each scope after the change, as `id@group`, in key order.
    pub scopes: Vec<String>,
}

/// The record format written now.
pub const RECORD_VERSION: u8 = 2;

impl Record {
    /// A record of `kind` for the meta log [`META_LOG`], stamped now, saying nothing yet: aq's
    /// own changes (policy swaps, layout changes) fill in what they are about.
    pub fn in_meta_log(kind: RecordKind) -> Record {
        Record {
            v: RECORD_VERSION,
            scope: META_LOG.to_string(),
            id: new_record_id(),
            kind,
            time_ms: crate::clock::unix_ms(),
            policy: String::new(),
            level: "full".into(),
            principals: Vec::new(),
            ops: Vec::new(),
            proposal: None,
            approvals: Vec::new(),
            subject: None,
            binding: None,
            layout: None,
        }
    }

    /// The stored bytes: the leaf of the Merkle log.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records serialise")
    }

    /// Where the record is stored.
    pub fn key(&self) -> Vec<u8> {
        record_key(&self.scope, &self.id)
    }
}

/// A fresh record id, 32 hex digits: 16 random bytes mixed with the process, the time and a
/// counter, so that ids stay unique even if the system random source failed.
pub fn new_record_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut random = [0u8; 16];
    let _ = getrandom::fill(&mut random);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut hasher = blake3::Hasher::new_derive_key("aq lineage record id 2026-12");
    hasher
        .update(&random)
        .update(&std::process::id().to_le_bytes())
        .update(&now.as_nanos().to_le_bytes())
        .update(&COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
    hex::encode(&hasher.finalize().as_bytes()[..16])
}

/// The prefix of a scope's records.
pub fn records_prefix(scope: &str) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"lineage/");
    key.extend_from_slice(scope.as_bytes());
    key.push(b'/');
    key
}

/// The key of record `id` of a scope.
pub fn record_key(scope: &str, id: &str) -> Vec<u8> {
    let mut key = records_prefix(scope);
    key.extend_from_slice(id.as_bytes());
    key
}
