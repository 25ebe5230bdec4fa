//! A scope's lineage chain on this replica, with group commit. Every record names its
//! predecessor's hash, so one replica extends a scope's chain one Txn at a time. Writes that
//! want records queue here; one drain task takes as many queued writes as fit in one etcd Txn
//! and sends them together, each with its record, under one guard on the chain head. While a
//! Txn is in flight the next writes queue up, so the batch grows with the load and the
//! throughput of a scope is no longer one write per round trip.
//!
//! A batch holds only writes whose keys do not overlap (etcd refuses a Txn that puts one key
//! twice, and a write must not see another's effect mid-batch); it stays within etcd's default
//! limits on ops per Txn and request size. If the batch's Txn fails a guard other than the
//! head, some write's policy read or nonce moved: the writes are sent one by one so each gets
//! its own answer.
//!
//! The drain task runs apart from the requests, so a client that goes away never abandons the
//! writes batched with its own.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use etcd_client::proto as pb;
use prost::Message;
use tokio::sync::oneshot;
use tonic::Status;

use super::metrics::GateMetrics;
use super::{Draft, GateError, LINEAGE_ATTEMPTS, parse_head, put};
use crate::backend::Group;
use crate::index::KeyRange;
use crate::lineage::{Head, head_key, record_hash, record_key};

/// The most writes in one Txn: each brings two success ops (its record and its own op).
const MAX_BATCH: usize = 48;
/// etcd's default `--max-txn-ops`, with room for the head and its write.
const MAX_TXN_OPS: usize = 124;
/// Stay well under etcd's default `--max-request-bytes` (1.5 MiB).
const MAX_BATCH_BYTES: usize = 1 << 20;

/// What one write's caller is told: the Txn's answer (its own op's answer last), `None` when
/// a guard moved and the caller evaluates again.
pub(super) type Outcome = Result<Option<pb::PbTxnResponse>, GateError>;

/// One write waiting for its place in the chain.
pub(super) struct Job {
    op: pb::PbTxnOpRequest,
    guards: Vec<pb::PbCompare>,
    draft: Draft,
    /// Every key range the write reads or writes, its guards' keys included.
    footprint: Vec<KeyRange>,
    bytes: usize,
    done: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Job>,
    draining: bool,
    /// The chain head and the head key's mod revision, as last written or read; held by the
    /// drain task while it runs.
    head: Option<(Head, i64)>,
}

/// A scope's chain on this replica.
pub(super) struct Chain {
    scope: String,
    group: Group,
    metrics: Arc<GateMetrics>,
    queue: Mutex<Queue>,
}

impl Chain {
    pub(super) fn new(scope: &str, group: Group, metrics: Arc<GateMetrics>) -> Self {
        Chain { scope: scope.to_string(), group, metrics, queue: Mutex::default() }
    }

    /// Sends `op` guarded by `guards`, with `draft`'s record in the same Txn.
    pub(super) async fn commit(
        self: &Arc<Self>,
        op: pb::PbTxnOpRequest,
        guards: Vec<pb::PbCompare>,
        draft: Draft,
        footprint: Vec<KeyRange>,
    ) -> Outcome {
        let (done, outcome) = oneshot::channel();
        let bytes = op.encoded_len() + guards.iter().map(Message::encoded_len).sum::<usize>() + 512;
        let job = Job { op, guards, draft, footprint, bytes, done };
        let start = {
            let mut queue = self.queue.lock().expect("chain queue");
            queue.pending.push_back(job);
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            tokio::spawn(self.clone().drain());
        }
        outcome.await.unwrap_or_else(|_| Err(GateError::Backend(Status::internal("the lineage writer stopped"))))
    }

    /// Sends batches until the queue is empty.
    async fn drain(self: Arc<Self>) {
        let mut head = self.queue.lock().expect("chain queue").head.take();
        loop {
            let batch = {
                let mut queue = self.queue.lock().expect("chain queue");
                if queue.pending.is_empty() {
                    queue.draining = false;
                    queue.head = head;
                    return;
                }
                take_batch(&mut queue.pending)
            };
            self.send(&mut head, batch).await;
        }
    }

    /// Sends one batch, re-sending on a moved head and splitting it when a write's own guard
    /// failed; answers every write.
    async fn send(&self, head: &mut Option<(Head, i64)>, batch: Vec<Job>) {
        let mut batches = VecDeque::from([batch]);
        while let Some(mut jobs) = batches.pop_front() {
            let mut attempts = 0;
            loop {
                attempts += 1;
                if attempts > LINEAGE_ATTEMPTS {
                    answer_all(jobs, || Err(GateError::Contended(self.scope.clone())));
                    break;
                }
                let (current, read_at) = match head.clone() {
                    Some(head) => head,
                    None => match self.read_head().await {
                        Ok(read) => {
                            *head = Some(read.clone());
                            read
                        }
                        Err(e) => {
                            let status = backend_status(e);
                            answer_all(jobs, || Err(GateError::Backend(status.clone())));
                            break;
                        }
                    },
                };
                let (request, new_head) = self.txn(&jobs, &current, read_at);
                let response = match self.group.txn(request).await {
                    Ok(response) => response,
                    Err(status) => {
                        self.metrics.backend_error(self.group.name());
                        answer_all(jobs, || Err(GateError::Backend(status.clone())));
                        break;
                    }
                };
                if response.succeeded {
                    let revision = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
                    *head = Some((new_head, revision));
                    self.answer_success(jobs, response);
                    break;
                }
                let seen = match response.responses.first().and_then(|r| r.response.as_ref()) {
                    Some(pb::PbTxnOpResponse::ResponseRange(range)) => parse_head(range),
                    _ => Ok((Head::default(), 0)),
                };
                match seen {
                    Ok(seen) if seen.1 != read_at => {
                        // Another replica extended the chain; the decisions still hold: send
                        // again on the new head without evaluating again.
                        *head = Some(seen);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        *head = None;
                        let status = backend_status(e);
                        answer_all(jobs, || Err(GateError::Backend(status.clone())));
                        break;
                    }
                }
                // A write's own guard failed: one by one, each finds out about itself.
                if jobs.len() > 1 {
                    for job in jobs.drain(..).rev() {
                        batches.push_front(vec![job]);
                    }
                    break;
                }
                // A policy read moved: the caller evaluates again.
                self.metrics.guard_retry(&self.scope);
                answer_all(jobs, || Ok(None));
                break;
            }
        }
    }

    /// The batch's Txn: guarded by the head and every write's guards; each write's record then
    /// its op, then the new head. On failure it reads the head.
    fn txn(&self, jobs: &[Job], head: &Head, read_at: i64) -> (pb::PbTxnRequest, Head) {
        let key = head_key(&self.scope);
        let mut compare = Vec::with_capacity(1 + jobs.iter().map(|j| j.guards.len()).sum::<usize>());
        compare.push(crate::meta::compare_unchanged(key.clone(), read_at));
        let mut success = Vec::with_capacity(jobs.len() * 2 + 1);
        let mut next = head.clone();
        for job in jobs {
            compare.extend(job.guards.iter().cloned());
            let record = job.draft.record(&self.scope, &next);
            let bytes = record.encode();
            next = Head { next: next.next + 1, prev: record_hash(&bytes) };
            success.push(put(record_key(&self.scope, record.seq), bytes));
            success.push(pb::PbTxnRequestOp { request: Some(job.op.clone()) });
        }
        success.push(put(key.clone(), serde_json::to_vec(&next).expect("JSON")));
        let failure = vec![pb::PbTxnRequestOp {
            request: Some(pb::PbTxnOpRequest::RequestRange(pb::PbRangeRequest { key, ..Default::default() })),
        }];
        (pb::PbTxnRequest { compare, success, failure }, next)
    }

    /// Hands each write its own op's answer, under the batch's header.
    fn answer_success(&self, jobs: Vec<Job>, response: pb::PbTxnResponse) {
        let mut answers = response.responses.into_iter().skip(1).step_by(2);
        for job in jobs {
            self.metrics.routed(&self.scope, "write");
            let own = answers.next().map(|answer| vec![answer]).unwrap_or_default();
            let _ = job.done.send(Ok(Some(pb::PbTxnResponse { header: response.header, succeeded: true, responses: own })));
        }
    }

    async fn read_head(&self) -> Result<(Head, i64), GateError> {
        let range = self.group.range(pb::PbRangeRequest { key: head_key(&self.scope), ..Default::default() }).await?;
        parse_head(&range)
    }
}

fn backend_status(e: GateError) -> Status {
    match e {
        GateError::Backend(status) => status,
        other => Status::internal(other.to_string()),
    }
}

fn answer_all(jobs: Vec<Job>, outcome: impl Fn() -> Outcome) {
    for job in jobs {
        let _ = job.done.send(outcome());
    }
}

/// Takes the queue's oldest write and every later one that fits beside it; the rest wait for
/// the next batch, in order.
fn take_batch(pending: &mut VecDeque<Job>) -> Vec<Job> {
    let mut batch: Vec<Job> = Vec::new();
    let (mut ops, mut compares, mut bytes) = (1, 1, 0);
    let mut skipped = VecDeque::new();
    while let Some(job) = pending.pop_front() {
        let fits = batch.is_empty()
            || (batch.len() < MAX_BATCH
                && ops + 2 <= MAX_TXN_OPS
                && compares + job.guards.len() <= MAX_TXN_OPS
                && bytes + job.bytes <= MAX_BATCH_BYTES
                && !batch.iter().any(|other| overlaps(&other.footprint, &job.footprint))
                // A write that waits keeps every later write that overlaps it behind it.
                && !skipped.iter().any(|other: &Job| overlaps(&other.footprint, &job.footprint)));
        if fits {
            ops += 2;
            compares += job.guards.len();
            bytes += job.bytes;
            batch.push(job);
        } else {
            skipped.push_back(job);
        }
    }
    *pending = skipped;
    batch
}

fn overlaps(a: &[KeyRange], b: &[KeyRange]) -> bool {
    a.iter().any(|x| b.iter().any(|y| x.intersect(y).is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(keys: &[&str], guards: usize) -> (Job, oneshot::Receiver<Outcome>) {
        let (done, rx) = oneshot::channel();
        let draft = Draft::for_tests();
        let footprint = keys.iter().map(|k| KeyRange::from_request(k.as_bytes(), b"")).collect();
        let guard = pb::PbCompare::default();
        let op = pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest::default());
        (Job { op, guards: vec![guard; guards], draft, footprint, bytes: 600, done }, rx)
    }

    #[test]
    fn batches_skip_overlapping_writes_and_keep_their_order() {
        let mut pending = VecDeque::new();
        for keys in [&["a"][..], &["b"], &["a", "c"], &["c"], &["d"]] {
            pending.push_back(job(keys, 1).0);
        }
        let batch = take_batch(&mut pending);
        let firsts: Vec<&[u8]> = batch.iter().map(|j| j.footprint[0].start.as_slice()).collect();
        // "a c" overlaps "a"; "c" must not overtake "a c"; "d" fits.
        assert_eq!(firsts, [b"a".as_slice(), b"b", b"d"]);
        let left: Vec<usize> = pending.iter().map(|j| j.footprint.len()).collect();
        assert_eq!(left, [2, 1]);
        let next = take_batch(&mut pending);
        assert_eq!(next.len(), 1, "the next batch starts with the write that waited");
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn batches_stay_within_etcd_limits() {
        let mut pending: VecDeque<Job> = (0..200).map(|i| job(&[&format!("k{i}")], 0).0).collect();
        assert_eq!(take_batch(&mut pending).len(), MAX_BATCH);
        let mut pending: VecDeque<Job> = (0..200).map(|i| job(&[&format!("k{i}")], 10).0).collect();
        let batch = take_batch(&mut pending);
        // The head's compare takes one more.
        assert!(batch.iter().map(|j| j.guards.len()).sum::<usize>() < MAX_TXN_OPS, "{}", batch.len());
        assert_eq!(batch.len(), 12);
    }
}
