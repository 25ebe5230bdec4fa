//! A scope's lineage chain on this replica. Every record names its predecessor's hash, so a
//! scope's chain grows one Txn at a time: writes that want records queue here, and one drain
//! task sends them in order, each in a Txn of its own with its record and the new head, guarded
//! on the head it read. One client write per Txn keeps one revision per write, as etcd gives
//! (kube-apiserver's watch cache relies on it); never are two clients' writes batched.
//!
//! When another replica extended the chain first, the write is sent again on the new head, its
//! decision unchanged. The drain task runs apart from the requests, so a client that goes away
//! never abandons its write half-way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use etcd_client::proto as pb;
use tokio::sync::oneshot;
use tonic::Status;

use super::metrics::GateMetrics;
use super::{Draft, GateError, LINEAGE_ATTEMPTS, parse_head, put};
use crate::backend::Group;
use crate::lineage::{Head, head_key, record_hash, record_key};

/// What one write's caller is told: the Txn's answer (its own op's answer last), `None` when
/// a guard moved and the caller evaluates again.
pub(super) type Outcome = Result<Option<pb::PbTxnResponse>, GateError>;

/// One write waiting for its place in the chain.
struct Job {
    op: pb::PbTxnOpRequest,
    guards: Vec<pb::PbCompare>,
    draft: Draft,
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
    pub(super) async fn commit(self: &Arc<Self>, op: pb::PbTxnOpRequest, guards: Vec<pb::PbCompare>, draft: Draft) -> Outcome {
        let (done, outcome) = oneshot::channel();
        let start = {
            let mut queue = self.queue.lock().expect("chain queue");
            queue.pending.push_back(Job { op, guards, draft, done });
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            tokio::spawn(self.clone().drain());
        }
        outcome.await.unwrap_or_else(|_| Err(GateError::Backend(Status::internal("the lineage writer stopped"))))
    }

    /// Sends queued writes, oldest first, until the queue is empty.
    async fn drain(self: Arc<Self>) {
        let mut head = self.queue.lock().expect("chain queue").head.take();
        loop {
            let job = {
                let mut queue = self.queue.lock().expect("chain queue");
                match queue.pending.pop_front() {
                    Some(job) => job,
                    None => {
                        queue.draining = false;
                        queue.head = head;
                        return;
                    }
                }
            };
            let outcome = self.send(&mut head, &job).await;
            let _ = job.done.send(outcome);
        }
    }

    /// Sends one write, again on a moved head.
    async fn send(&self, head: &mut Option<(Head, i64)>, job: &Job) -> Outcome {
        for _ in 0..LINEAGE_ATTEMPTS {
            let (current, read_at) = match head.clone() {
                Some(head) => head,
                None => {
                    let read = self.read_head().await?;
                    *head = Some(read.clone());
                    read
                }
            };
            let (request, new_head) = self.txn(job, &current, read_at);
            let response = self.group.txn(request).await.inspect_err(|_| {
                // What etcd did is unknown: read the head before the next write.
                *head = None;
            })?;
            if response.succeeded {
                let revision = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
                *head = Some((new_head, revision));
                let mut response = response;
                // The record's answer first, the client op's last; the head's is dropped.
                response.responses.truncate(2);
                response.responses.remove(0);
                return Ok(Some(response));
            }
            let seen = match response.responses.first().and_then(|r| r.response.as_ref()) {
                Some(pb::PbTxnOpResponse::ResponseRange(range)) => parse_head(range),
                _ => Ok((Head::default(), 0)),
            };
            match seen {
                Ok(seen) if seen.1 != read_at => {
                    // Another replica extended the chain; the decision still holds: send again
                    // on the new head without evaluating again.
                    *head = Some(seen);
                }
                Ok(_) => {
                    // The head held, so a policy read or the nonce moved: evaluate again.
                    self.metrics.guard_retry(&self.scope);
                    return Ok(None);
                }
                Err(e) => {
                    *head = None;
                    return Err(e);
                }
            }
        }
        Err(GateError::Contended(self.scope.clone()))
    }

    /// The write's Txn: guarded by the head and the write's guards; its record, its op, then
    /// the new head. On failure it reads the head.
    fn txn(&self, job: &Job, head: &Head, read_at: i64) -> (pb::PbTxnRequest, Head) {
        let key = head_key(&self.scope);
        let mut compare = Vec::with_capacity(1 + job.guards.len());
        compare.push(crate::meta::compare_unchanged(key.clone(), read_at));
        compare.extend(job.guards.iter().cloned());
        let record = job.draft.record(&self.scope, head);
        let bytes = record.encode();
        let next = Head { next: head.next + 1, prev: record_hash(&bytes) };
        let success = vec![
            put(record_key(&self.scope, record.seq), bytes),
            pb::PbTxnRequestOp { request: Some(job.op.clone()) },
            put(key.clone(), serde_json::to_vec(&next).expect("JSON")),
        ];
        let failure = vec![pb::PbTxnRequestOp {
            request: Some(pb::PbTxnOpRequest::RequestRange(pb::PbRangeRequest { key, ..Default::default() })),
        }];
        (pb::PbTxnRequest { compare, success, failure }, next)
    }

    async fn read_head(&self) -> Result<(Head, i64), GateError> {
        let range = self.group.range(pb::PbRangeRequest { key: head_key(&self.scope), ..Default::default() }).await?;
        parse_head(&range)
    }
}
