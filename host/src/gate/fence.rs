//! Scope fences: every write aq sends is guarded by `version(fence key) == expected`. A hand-off
//! of the scope bumps the fence, so a gateway with a stale view fails its guard instead of
//! writing to a group that no longer owns the scope.

use std::sync::atomic::{AtomicI64, Ordering};

use etcd_client::proto as pb;

use crate::index::RESERVED_PREFIX;

pub(crate) use crate::backend::compare::{RESULT_EQUAL, TARGET_MOD, TARGET_VERSION};

/// The fence key of a scope, in the reserved keyspace of the scope's group.
pub fn fence_key(scope: &str) -> Vec<u8> {
    let mut key = RESERVED_PREFIX.to_vec();
    key.extend_from_slice(b"fence/");
    key.extend_from_slice(scope.as_bytes());
    key
}

/// What this gateway believes a scope's fence version is.
#[derive(Debug)]
pub struct Fence {
    key: Vec<u8>,
    expected: AtomicI64,
}

impl Fence {
    /// A fence expecting `version`.
    pub fn new(scope: &str, version: i64) -> Self {
        Fence { key: fence_key(scope), expected: AtomicI64::new(version) }
    }

    /// The fence key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The version writes are guarded on.
    pub fn expected(&self) -> i64 {
        self.expected.load(Ordering::Acquire)
    }

    /// Adopts the version read from the group after a failed guard.
    pub fn refresh(&self, version: i64) {
        self.expected.store(version, Ordering::Release);
    }

    /// The guard compare.
    pub fn compare(&self) -> pb::PbCompare {
        self.compare_at(self.expected())
    }

    /// The guard compare of a write decided while the fence was at `version`.
    pub fn compare_at(&self, version: i64) -> pb::PbCompare {
        pb::PbCompare {
            result: RESULT_EQUAL,
            target: TARGET_VERSION,
            key: self.key.clone(),
            range_end: Vec::new(),
            target_union: Some(pb::PbTargetUnion::Version(version)),
        }
    }

    /// The op run when the guard fails: read the fence, to learn its current version.
    pub fn read_op(&self) -> pb::PbTxnRequestOp {
        pb::PbTxnRequestOp {
            request: Some(pb::PbTxnOpRequest::RequestRange(pb::PbRangeRequest {
                key: self.key.clone(),
                ..Default::default()
            })),
        }
    }
}
