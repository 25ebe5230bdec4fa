//! A scope's revisions as clients see them (DESIGN: "each scope has its own revision space").
//!
//! A scope that never moved shows its group's revisions unchanged, and nothing here runs for it.
//! A scope that moved has a [`RevisionShift`]: every revision in what goes to its group is taken
//! down by the offset, every revision in what comes back is raised by it, so the scope's
//! revisions keep increasing across the move although its new group counts from its own start.
//! The move rewrote every key of the scope from the base on, and the copy was whole at the
//! floor:
//!
//! - a read or watch *at* a revision below the floor answers as etcd does for a compacted one,
//!   so a client relists (before the floor the new group holds only part of the scope);
//! - a compare or filter *against* a revision below the base is held to the base's backend
//!   revision less one: every key of the scope has a revision at or above the base, so an
//!   equality with an older revision is false, as it would be on etcd once the key was written
//!   again, and an order against it is what it would be there too. Revisions from the base on
//!   are real revisions of the new group and compare as they are.

use etcd_client::proto as pb;

use super::GateError;
use crate::index::RevisionShift;

/// What etcd answers for a revision it no longer has; clients match the message.
pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

impl RevisionShift {
    /// Whether this shift changes nothing (a scope that never moved).
    pub fn is_identity(&self) -> bool {
        self.offset == 0 && self.floor == 0 && self.base == 0
    }

    /// A backend revision as clients see it. 0 (absent, or "now") stays 0.
    pub fn up(&self, revision: i64) -> i64 {
        if revision <= 0 { revision } else { revision + self.offset }
    }

    /// A revision to read or watch at, for the backend; a revision before the floor is
    /// compacted history.
    pub fn at(&self, revision: i64) -> Result<i64, GateError> {
        if revision <= 0 {
            Ok(revision)
        } else if revision < self.floor {
            Err(GateError::Compacted { revision, floor: self.floor })
        } else {
            Ok(revision - self.offset)
        }
    }

    /// A revision compared or filtered against, for the backend: one before the base is held
    /// just below the base's backend revision.
    pub fn bound(&self, revision: i64) -> i64 {
        if revision <= 0 {
            revision
        } else if revision < self.base {
            self.base - 1 - self.offset
        } else {
            revision - self.offset
        }
    }

    /// A header as clients see it.
    pub fn header(&self, header: &mut Option<pb::PbResponseHeader>) {
        if let Some(header) = header {
            header.revision = self.up(header.revision);
        }
    }

    /// A key-value as clients see it.
    pub fn kv(&self, kv: &mut pb::PbKeyValue) {
        kv.create_revision = self.up(kv.create_revision);
        kv.mod_revision = self.up(kv.mod_revision);
    }

    /// A Range request, for the backend.
    pub fn range_request(&self, range: &mut pb::PbRangeRequest) -> Result<(), GateError> {
        range.revision = self.at(range.revision)?;
        for filter in [
            &mut range.min_mod_revision,
            &mut range.max_mod_revision,
            &mut range.min_create_revision,
            &mut range.max_create_revision,
        ] {
            *filter = self.bound(*filter);
        }
        Ok(())
    }

    /// A Range answer as clients see it.
    pub fn range_response(&self, range: &mut pb::PbRangeResponse) {
        self.header(&mut range.header);
        range.kvs.iter_mut().for_each(|kv| self.kv(kv));
    }

    /// A client's op (and every op and compare nested in it), for the backend.
    pub fn request_op(&self, op: &mut pb::PbTxnOpRequest) -> Result<(), GateError> {
        match op {
            pb::PbTxnOpRequest::RequestRange(range) => self.range_request(range),
            pb::PbTxnOpRequest::RequestPut(_) | pb::PbTxnOpRequest::RequestDeleteRange(_) => Ok(()),
            pb::PbTxnOpRequest::RequestTxn(txn) => self.txn_request(txn),
        }
    }

    /// A Txn, for the backend.
    pub fn txn_request(&self, txn: &mut pb::PbTxnRequest) -> Result<(), GateError> {
        for compare in &mut txn.compare {
            match &mut compare.target_union {
                Some(pb::PbTargetUnion::CreateRevision(v)) | Some(pb::PbTargetUnion::ModRevision(v)) => *v = self.bound(*v),
                _ => {}
            }
        }
        for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
            if let Some(op) = &mut op.request {
                self.request_op(op)?;
            }
        }
        Ok(())
    }

    /// An op's answer (and every answer nested in it) as clients see it.
    pub fn response_op(&self, op: &mut pb::PbTxnOpResponse) {
        match op {
            pb::PbTxnOpResponse::ResponseRange(range) => self.range_response(range),
            pb::PbTxnOpResponse::ResponsePut(put) => {
                self.header(&mut put.header);
                if let Some(kv) = &mut put.prev_kv {
                    self.kv(kv);
                }
            }
            pb::PbTxnOpResponse::ResponseDeleteRange(delete) => {
                self.header(&mut delete.header);
                delete.prev_kvs.iter_mut().for_each(|kv| self.kv(kv));
            }
            pb::PbTxnOpResponse::ResponseTxn(txn) => self.txn_response(txn),
        }
    }

    /// A Txn answer as clients see it.
    pub fn txn_response(&self, txn: &mut pb::PbTxnResponse) {
        self.header(&mut txn.header);
        for response in &mut txn.responses {
            if let Some(op) = &mut response.response {
                self.response_op(op);
            }
        }
    }

    /// A watch answer as clients see it.
    pub fn watch_response(&self, watch: &mut pb::PbWatchResponse) {
        self.header(&mut watch.header);
        watch.compact_revision = self.up(watch.compact_revision);
        for event in &mut watch.events {
            if let Some(kv) = &mut event.kv {
                self.kv(kv);
            }
            if let Some(kv) = &mut event.prev_kv {
                self.kv(kv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scope that showed revisions up to 1000 on its old group and whose first revision on
    /// the new group is backend revision 2.
    const MOVED: RevisionShift = RevisionShift { offset: 999, floor: 1001, base: 1001, handed: 0 };

    #[test]
    fn a_moved_scope_counts_on_from_its_last_revision() {
        assert!(RevisionShift::default().is_identity());
        assert_eq!(MOVED.up(2), 1001);
        assert_eq!(MOVED.up(0), 0, "absent stays absent");
        assert_eq!(MOVED.at(1001).unwrap(), 2);
        assert_eq!(MOVED.at(0).unwrap(), 0, "now stays now");
        match MOVED.at(1000) {
            Err(GateError::Compacted { revision: 1000, floor: 1001 }) => {}
            other => panic!("a revision before the move is compacted, got {other:?}"),
        }
    }

    #[test]
    fn compares_against_history_before_the_move_hold_as_they_would_on_etcd() {
        // Every key of the scope now has a backend mod revision of 2 or more.
        let held = MOVED.bound(500);
        assert_eq!(held, 1);
        assert!(held < 2, "an equality with an old revision never holds");
        assert_eq!(MOVED.bound(1005), 6);
        assert_eq!(MOVED.bound(0), 0, "a compare with 0 (absent) is kept");
        // Between base and floor the copy was under way: a key copied then compares by its
        // revision, a read there would see part of the scope.
        let copying = RevisionShift { offset: 999, floor: 1005, base: 1001, handed: 0 };
        assert_eq!(copying.bound(1002), 3);
        assert!(copying.at(1002).is_err() && copying.at(1005).unwrap() == 6);
        let mut txn = pb::PbTxnRequest {
            compare: vec![pb::PbCompare { target_union: Some(pb::PbTargetUnion::ModRevision(1003)), ..Default::default() }],
            success: vec![pb::PbTxnRequestOp {
                request: Some(pb::PbTxnOpRequest::RequestRange(pb::PbRangeRequest { revision: 999, ..Default::default() })),
            }],
            failure: Vec::new(),
        };
        assert!(matches!(MOVED.txn_request(&mut txn), Err(GateError::Compacted { .. })), "a nested read at old history");
        assert_eq!(txn.compare[0].target_union, Some(pb::PbTargetUnion::ModRevision(4)));
    }
}
