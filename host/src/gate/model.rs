//! The translation of etcd's messages into what a policy sees (`aq_sdk`'s model), in one place:
//! the ops and compares of a request, and the key ranges it touches.

use aq_sdk as m;
use etcd_client::proto as pb;

use crate::index::KeyRange;

/// The ops, compares and touched ranges of a client's request op.
pub(crate) fn model_of(op: &pb::PbTxnOpRequest) -> (Vec<m::Op>, Vec<m::Compare>, Vec<KeyRange>) {
    let ranges = footprint(op);
    match op {
        pb::PbTxnOpRequest::RequestPut(put) => (vec![m::Op::Put(put_op(put))], Vec::new(), ranges),
        pb::PbTxnOpRequest::RequestDeleteRange(delete) => (vec![delete_op(delete)], Vec::new(), ranges),
        pb::PbTxnOpRequest::RequestTxn(txn) => {
            let mut ops = Vec::new();
            collect_txn(txn, &mut Vec::new(), Some(&mut ops));
            (ops, txn.compare.iter().map(compare_to_model).collect(), ranges)
        }
        pb::PbTxnOpRequest::RequestRange(_) => (Vec::new(), Vec::new(), ranges),
    }
}

/// The leases the puts among `ops` attach.
pub(super) fn leases_of(ops: &[m::Op]) -> impl Iterator<Item = i64> + '_ {
    ops.iter().filter_map(|op| match op {
        m::Op::Put(p) => Some(p.lease),
        m::Op::DeleteRange(_) => None,
    })
}

/// A put as the policy sees it.
pub(super) fn put_op(request: &pb::PbPutRequest) -> m::PutOp {
    m::PutOp {
        key: m::Bytes(request.key.clone()),
        value: m::Bytes(request.value.clone()),
        lease: request.lease,
        ignore_value: request.ignore_value,
        ignore_lease: request.ignore_lease,
    }
}

/// A delete as the policy sees it.
pub(super) fn delete_op(request: &pb::PbDeleteRequest) -> m::Op {
    m::Op::DeleteRange(m::DeleteRangeOp { key: m::Bytes(request.key.clone()), range_end: m::Bytes(request.range_end.clone()) })
}

/// Collects the key ranges a transaction touches (compares and every op, nested included) and,
/// when asked, its mutations in order: success branch, then failure branch.
pub(super) fn collect_txn(request: &pb::PbTxnRequest, ranges: &mut Vec<KeyRange>, mut ops: Option<&mut Vec<m::Op>>) {
    for compare in &request.compare {
        ranges.push(KeyRange::from_request(&compare.key, &compare.range_end));
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(pb::PbTxnOpRequest::RequestRange(r)) => ranges.push(KeyRange::from_request(&r.key, &r.range_end)),
            Some(pb::PbTxnOpRequest::RequestPut(p)) => {
                ranges.push(KeyRange::from_request(&p.key, b""));
                if let Some(ops) = ops.as_deref_mut() {
                    ops.push(m::Op::Put(put_op(p)));
                }
            }
            Some(pb::PbTxnOpRequest::RequestDeleteRange(d)) => {
                ranges.push(KeyRange::from_request(&d.key, &d.range_end));
                if let Some(ops) = ops.as_deref_mut() {
                    ops.push(delete_op(d));
                }
            }
            Some(pb::PbTxnOpRequest::RequestTxn(t)) => collect_txn(t, ranges, ops.as_deref_mut()),
            None => {}
        }
    }
}

/// The key ranges a request op touches: its keys, and for a transaction its compares and reads.
pub(super) fn footprint(op: &pb::PbTxnOpRequest) -> Vec<KeyRange> {
    match op {
        pb::PbTxnOpRequest::RequestPut(p) => vec![KeyRange::from_request(&p.key, b"")],
        pb::PbTxnOpRequest::RequestDeleteRange(d) => vec![KeyRange::from_request(&d.key, &d.range_end)],
        pb::PbTxnOpRequest::RequestRange(r) => vec![KeyRange::from_request(&r.key, &r.range_end)],
        pb::PbTxnOpRequest::RequestTxn(t) => {
            let mut ranges = Vec::new();
            collect_txn(t, &mut ranges, None);
            ranges
        }
    }
}

/// A Txn's compare as the policy sees it.
pub(super) fn compare_to_model(compare: &pb::PbCompare) -> m::Compare {
    let target = match &compare.target_union {
        Some(pb::PbTargetUnion::Version(v)) => m::CompareTarget::Version(*v),
        Some(pb::PbTargetUnion::CreateRevision(v)) => m::CompareTarget::CreateRevision(*v),
        Some(pb::PbTargetUnion::ModRevision(v)) => m::CompareTarget::ModRevision(*v),
        Some(pb::PbTargetUnion::Value(v)) => m::CompareTarget::Value(m::Bytes(v.clone())),
        Some(pb::PbTargetUnion::Lease(v)) => m::CompareTarget::Lease(*v),
        None => m::CompareTarget::Version(0),
    };
    m::Compare {
        key: m::Bytes(compare.key.clone()),
        range_end: m::Bytes(compare.range_end.clone()),
        result: match compare.result {
            1 => m::CompareResult::Greater,
            2 => m::CompareResult::Less,
            3 => m::CompareResult::NotEqual,
            _ => m::CompareResult::Equal,
        },
        target,
    }
}
