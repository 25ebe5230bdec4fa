//! The Lock and Election services (etcd's v3lock and v3election), built as etcd builds them:
//! out of ordinary KV requests on keys under the lock's or election's name. Each waiter puts
//! `<name>/<lease in hex>` with its lease; the key with the lowest create revision holds the
//! lock (leads), and every other waits for the key created just before its own to go.
//!
//! Every write goes through the gate as a write of the scope that owns the name, so the scope's
//! policy governs who may lock or campaign, and revisions are those the scope shows clients.
//! The waits watch the owning scope's group directly (reads are not governed) and start over
//! from a fresh read whenever routing changes, so a wait survives a move of the scope. The state
//! lives in etcd only, so waiters on different replicas queue on one another.
//!
//! A move copies a scope's keys in key order, which gives the copies new create revisions: a
//! queue of waiters whose scope moves is reordered by key (see ARCHITECTURE.md).

use std::sync::Arc;

use etcd_client::proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::caller;
use crate::auth::{Auth, Need, Who};
use crate::backend::compare::{RESULT_EQUAL, TARGET_CREATE};
use crate::backend::watch_request;
use crate::gate::{Caller, Gateway};
use crate::index::{KeyRange, RevisionShift};

/// The generated etcd v3lock and v3election messages and service traits.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// `v3lockpb`.
    pub mod lock {
        tonic::include_proto!("v3lockpb");
    }
    /// `v3electionpb`.
    pub mod election {
        tonic::include_proto!("v3electionpb");
    }
}

use proto::election as epb;
use proto::lock as lpb;

/// The TTL of the lease aq grants a Lock or Campaign that names none, as etcd's server does
/// (its session default): the key goes 60 s later unless the caller keeps the lease alive.
const SESSION_TTL: i64 = 60;

/// etcd's sort numbers in a Range.
const SORT_CREATE: i32 = 2;
const ASCEND: i32 = 1;
const DESCEND: i32 = 2;

/// etcd's messages for what a caller of its election service got wrong; clients match them.
const NO_LEADER: &str = "election: no leader";
const NOT_LEADER: &str = "election: not leader";
const SESSION_EXPIRED: &str = "concurrency: session is expired";
const MISSING_LEADER: &str = "\"leader\" field must be provided";

/// The Lock service.
pub struct Lock {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
}

impl Lock {
    /// Lock over `gate`, with etcd users' permissions from `auth`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>) -> Self {
        Lock { gate, auth }
    }
}

/// The Election service.
pub struct Election {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
}

impl Election {
    /// Election over `gate`, with etcd users' permissions from `auth`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>) -> Self {
        Election { gate, auth }
    }
}

/// The user of a request that needs `needs` on every key under `prefix` (a lock's or an
/// election's waiters: etcd's recipe reads and writes there with the caller's token).
async fn user_under<T>(auth: &Auth, request: &Request<T>, prefix: &[u8], needs: &[Need]) -> Result<Who, Status> {
    let who = auth.who(request.metadata()).await?;
    let (key, range_end) = KeyRange::prefix(prefix).to_request();
    for need in needs {
        auth.require(&who, *need, &key, &range_end)?;
    }
    Ok(who)
}

/// The user of a request that changes the one key `key`.
async fn user_writing<T>(auth: &Auth, request: &Request<T>, key: &[u8]) -> Result<Who, Status> {
    let who = auth.who(request.metadata()).await?;
    auth.require(&who, Need::Write, key, b"")?;
    Ok(who)
}

/// `<name>/`, under which each waiter's key goes.
fn waiters_prefix(name: &[u8]) -> Vec<u8> {
    let mut prefix = name.to_vec();
    prefix.push(b'/');
    prefix
}

/// A waiter's own key: the prefix and its lease in lower-case hex, as etcd names it.
fn waiter_key(prefix: &[u8], lease: i64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(format!("{lease:x}").as_bytes());
    key
}

fn create_revision_is(key: &[u8], revision: i64) -> pb::PbCompare {
    pb::PbCompare {
        result: RESULT_EQUAL,
        target: TARGET_CREATE,
        key: key.to_vec(),
        target_union: Some(pb::PbTargetUnion::CreateRevision(revision)),
        ..Default::default()
    }
}

fn op(request: pb::PbTxnOpRequest) -> pb::PbTxnRequestOp {
    pb::PbTxnRequestOp { request: Some(request) }
}

/// The key under `prefix` created first (`ascending`) or last, created no later than `max_create`
/// (0: any).
fn first_or_last(prefix: &[u8], ascending: bool, max_create: i64) -> pb::PbRangeRequest {
    let (key, range_end) = KeyRange::prefix(prefix).to_request();
    pb::PbRangeRequest {
        key,
        range_end,
        limit: 1,
        sort_target: SORT_CREATE,
        sort_order: if ascending { ASCEND } else { DESCEND },
        max_create_revision: max_create,
        ..Default::default()
    }
}

fn range_kvs(response: &pb::PbTxnResponse, at: usize) -> &[pb::PbKeyValue] {
    match response.responses.get(at).and_then(|r| r.response.as_ref()) {
        Some(pb::PbTxnOpResponse::ResponseRange(range)) => &range.kvs,
        _ => &[],
    }
}

/// Deletes a waiter's key if the request waiting for it goes away before its wait ends (the
/// client canceled or timed out), as etcd's server gives up a waiter whose wait failed.
struct Abandon {
    gate: Arc<Gateway>,
    key: Vec<u8>,
    created: i64,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let gate = self.gate.clone();
        let key = std::mem::take(&mut self.key);
        let created = self.created;
        tokio::spawn(async move {
            if let Err(error) = delete_if_created(&gate, &key, created, &Caller::default()).await {
                tracing::warn!(key = %String::from_utf8_lossy(&key), "a canceled lock or campaign left its key: {error}");
            }
        });
    }
}

/// Deletes `key` if it is still the one created at `created`; answers the Txn.
async fn delete_if_created(gate: &Gateway, key: &[u8], created: i64, caller: &Caller) -> Result<pb::PbTxnResponse, Status> {
    let txn = pb::PbTxnRequest {
        compare: vec![create_revision_is(key, created)],
        success: vec![op(pb::PbTxnOpRequest::RequestDeleteRange(pb::PbDeleteRequest {
            key: key.to_vec(),
            ..Default::default()
        }))],
        failure: Vec::new(),
    };
    Ok(gate.txn(txn, caller).await?)
}

/// The lease a waiter's key goes with: the caller's, or a new one for a caller naming none.
async fn lease_for(gate: &Gateway, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    let granted = gate.lease_grant(pb::PbLeaseGrantRequest { ttl: SESSION_TTL, id: 0 }).await?;
    Ok(granted.id)
}

/// Queues the caller under `prefix` with `key`: puts it (with `value` and `lease`) unless it is
/// there already, and reads the key created first. Answers the Txn, the key's create revision and
/// whether it already holds (the first key is its own, or there is none).
async fn enqueue(
    gate: &Gateway,
    prefix: &[u8],
    key: &[u8],
    value: &[u8],
    lease: i64,
    caller: &Caller,
) -> Result<(pb::PbTxnResponse, i64), Status> {
    let put = pb::PbPutRequest { key: key.to_vec(), value: value.to_vec(), lease, ..Default::default() };
    let get = pb::PbRangeRequest { key: key.to_vec(), ..Default::default() };
    let txn = pb::PbTxnRequest {
        compare: vec![create_revision_is(key, 0)],
        success: vec![
            op(pb::PbTxnOpRequest::RequestPut(put)),
            op(pb::PbTxnOpRequest::RequestRange(first_or_last(prefix, true, 0))),
        ],
        failure: vec![
            op(pb::PbTxnOpRequest::RequestRange(get)),
            op(pb::PbTxnOpRequest::RequestRange(first_or_last(prefix, true, 0))),
        ],
    };
    let response = gate.txn(txn, caller).await?;
    let created = if response.succeeded {
        revision_of(&response.header)
    } else {
        range_kvs(&response, 0)
            .first()
            .map(|kv| kv.create_revision)
            .ok_or_else(|| Status::aborted("the waiter's key went while it was read; try again"))?
    };
    Ok((response, created))
}

fn revision_of(header: &Option<pb::PbResponseHeader>) -> i64 {
    header.as_ref().map(|h| h.revision).unwrap_or_default()
}

/// Waits until no key under `prefix` created at or before `max_create` is left: every earlier
/// waiter has gone. Answers the header of the read that found none.
async fn wait_deletes(gate: &Gateway, prefix: &[u8], max_create: i64) -> Result<Option<pb::PbResponseHeader>, Status> {
    loop {
        let latest = gate.range(first_or_last(prefix, false, max_create)).await?;
        let Some(kv) = latest.kvs.first() else { return Ok(latest.header) };
        let mut watch = KeyWatch::open(gate, KeyRange::from_request(&kv.key, &[]), revision_of(&latest.header)).await?;
        'events: while let Some(response) = watch.next().await? {
            if response.events.iter().any(|e| e.r#type == DELETE) {
                break 'events;
            }
        }
    }
}

/// etcd's event type numbers.
const PUT: i32 = 0;
const DELETE: i32 = 1;

/// A watch of one scope's keys from a revision on, read straight from the scope's group, with
/// revisions as clients see them. It ends (`None`) when routing changes: the caller reads again.
struct KeyWatch {
    stream: Streaming<pb::PbWatchResponse>,
    shift: RevisionShift,
    reroutes: tokio::sync::watch::Receiver<u64>,
    /// Kept open: the watch lasts while its request stream does.
    _requests: mpsc::Sender<pb::PbWatchRequest>,
}

impl KeyWatch {
    /// Watches `range` from revision `from` (as the scope shows it) on.
    async fn open(gate: &Gateway, range: KeyRange, from: i64) -> Result<Self, Status> {
        let reroutes = gate.reroutes();
        let routing = gate.routing();
        let parts = routing.parts(&range);
        let [(runtime, part)] = parts.as_slice() else {
            return Err(Status::failed_precondition(format!(
                "{} spans {} scopes; a lock or election name must lie within one scope",
                String::from_utf8_lossy(&range.start),
                parts.len()
            )));
        };
        let shift = runtime.scope.revisions;
        let start = shift.at(from)?;
        let (key, range_end) = part.to_request();
        let (requests, receiver) = mpsc::channel(1);
        requests
            .send(watch_request(pb::PbWatchRequestUnion::CreateRequest, |create| {
                create.key = key;
                create.range_end = range_end;
                create.start_revision = start;
            }))
            .await
            .map_err(|_| Status::internal("the watch request stream closed"))?;
        let stream = runtime.group.watch(ReceiverStream::new(receiver)).await?;
        Ok(KeyWatch { stream, shift, reroutes, _requests: requests })
    }

    /// The next response with events, or `None` once routing changed.
    async fn next(&mut self) -> Result<Option<pb::PbWatchResponse>, Status> {
        loop {
            tokio::select! {
                message = self.stream.message() => {
                    let mut response = message?.ok_or_else(|| Status::unavailable("the group ended the watch"))?;
                    if response.canceled {
                        return Err(Status::unavailable(format!("the group canceled the watch: {}", response.cancel_reason)));
                    }
                    if response.events.is_empty() {
                        continue;
                    }
                    self.shift.watch_response(&mut response);
                    return Ok(Some(response));
                }
                changed = self.reroutes.changed() => {
                    return match changed {
                        Ok(()) => Ok(None),
                        Err(_) => Err(Status::unavailable("aq is shutting down")),
                    };
                }
            }
        }
    }
}

#[tonic::async_trait]
impl lpb::lock_server::Lock for Lock {
    async fn lock(&self, request: Request<lpb::LockRequest>) -> Result<Response<lpb::LockResponse>, Status> {
        let prefix = waiters_prefix(&request.get_ref().name);
        let who = user_under(&self.auth, &request, &prefix, &[Need::Read, Need::Write]).await?;
        let caller = caller(request.metadata(), &who)?;
        let request = request.into_inner();
        let lease = lease_for(&self.gate, request.lease).await?;
        let key = waiter_key(&prefix, lease);
        let (response, created) = enqueue(&self.gate, &prefix, &key, b"", lease, &caller).await?;
        let first = range_kvs(&response, 1).first().map(|kv| kv.create_revision);
        if first.is_none_or(|first| first == created) {
            return Ok(Response::new(lpb::LockResponse { header: response.header, key }));
        }
        let mut abandon = Abandon { gate: self.gate.clone(), key: key.clone(), created, armed: true };
        let header = wait_deletes(&self.gate, &prefix, created - 1).await?;
        abandon.armed = false;
        // The caller's lease may have expired while it waited, taking its key.
        let own = self.gate.range(pb::PbRangeRequest { key: key.clone(), ..Default::default() }).await?;
        if own.kvs.is_empty() {
            return Err(Status::unknown(SESSION_EXPIRED));
        }
        Ok(Response::new(lpb::LockResponse { header, key }))
    }

    async fn unlock(&self, request: Request<lpb::UnlockRequest>) -> Result<Response<lpb::UnlockResponse>, Status> {
        let who = user_writing(&self.auth, &request, &request.get_ref().key).await?;
        let caller = caller(request.metadata(), &who)?;
        let key = request.into_inner().key;
        let deleted = self.gate.delete_range(pb::PbDeleteRequest { key, ..Default::default() }, &caller).await?;
        Ok(Response::new(lpb::UnlockResponse { header: deleted.header }))
    }
}

impl Election {
    /// Sets the leader's value if `leader` still leads (its key has the create revision it had).
    async fn proclaim_as(&self, leader: &epb::LeaderKey, value: &[u8], caller: &Caller) -> Result<pb::PbTxnResponse, Status> {
        let put = pb::PbPutRequest { key: leader.key.clone(), value: value.to_vec(), ignore_lease: true, ..Default::default() };
        let txn = pb::PbTxnRequest {
            compare: vec![create_revision_is(&leader.key, leader.rev)],
            success: vec![op(pb::PbTxnOpRequest::RequestPut(put))],
            failure: Vec::new(),
        };
        let response = self.gate.txn(txn, caller).await?;
        if !response.succeeded {
            return Err(Status::unknown(NOT_LEADER));
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl epb::election_server::Election for Election {
    async fn campaign(&self, request: Request<epb::CampaignRequest>) -> Result<Response<epb::CampaignResponse>, Status> {
        let prefix = waiters_prefix(&request.get_ref().name);
        let who = user_under(&self.auth, &request, &prefix, &[Need::Read, Need::Write]).await?;
        let caller = caller(request.metadata(), &who)?;
        let request = request.into_inner();
        let lease = lease_for(&self.gate, request.lease).await?;
        let key = waiter_key(&prefix, lease);
        let (response, created) = enqueue(&self.gate, &prefix, &key, &request.value, lease, &caller).await?;
        let leader = epb::LeaderKey { name: request.name.clone(), key: key.clone(), rev: created, lease };
        let mut abandon = Abandon { gate: self.gate.clone(), key, created, armed: true };
        // A campaign resumed with a new value proclaims it first, as etcd's does.
        if !response.succeeded && range_kvs(&response, 0).first().is_some_and(|kv| kv.value != request.value) {
            self.proclaim_as(&leader, &request.value, &caller).await?;
        }
        wait_deletes(&self.gate, &prefix, created - 1).await?;
        abandon.armed = false;
        Ok(Response::new(epb::CampaignResponse { header: response.header, leader: Some(leader) }))
    }

    async fn proclaim(&self, request: Request<epb::ProclaimRequest>) -> Result<Response<epb::ProclaimResponse>, Status> {
        let key = request.get_ref().leader.as_ref().map(|l| l.key.clone()).ok_or_else(|| Status::unknown(MISSING_LEADER))?;
        let who = user_writing(&self.auth, &request, &key).await?;
        let caller = caller(request.metadata(), &who)?;
        let request = request.into_inner();
        let leader = request.leader.ok_or_else(|| Status::unknown(MISSING_LEADER))?;
        let response = self.proclaim_as(&leader, &request.value, &caller).await?;
        Ok(Response::new(epb::ProclaimResponse { header: response.header }))
    }

    async fn leader(&self, request: Request<epb::LeaderRequest>) -> Result<Response<epb::LeaderResponse>, Status> {
        let prefix = waiters_prefix(&request.get_ref().name);
        user_under(&self.auth, &request, &prefix, &[Need::Read]).await?;
        let mut first = self.gate.range(first_or_last(&prefix, true, 0)).await?;
        let kv = first.kvs.pop().ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(Response::new(epb::LeaderResponse { header: first.header, kv: Some(kv) }))
    }

    type ObserveStream = ReceiverStream<Result<epb::LeaderResponse, Status>>;

    async fn observe(&self, request: Request<epb::LeaderRequest>) -> Result<Response<Self::ObserveStream>, Status> {
        let prefix = waiters_prefix(&request.get_ref().name);
        user_under(&self.auth, &request, &prefix, &[Need::Read]).await?;
        let (sender, receiver) = mpsc::channel(16);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            // A client that goes away ends the observation at once, not at the next event.
            tokio::select! {
                _ = sender.closed() => {}
                observed = observe(&gate, &prefix, &sender) => {
                    if let Err(status) = observed {
                        let _ = sender.send(Err(status)).await;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn resign(&self, request: Request<epb::ResignRequest>) -> Result<Response<epb::ResignResponse>, Status> {
        let key = request.get_ref().leader.as_ref().map(|l| l.key.clone()).ok_or_else(|| Status::unknown(MISSING_LEADER))?;
        let who = user_writing(&self.auth, &request, &key).await?;
        let caller = caller(request.metadata(), &who)?;
        let leader = request.into_inner().leader.ok_or_else(|| Status::unknown(MISSING_LEADER))?;
        let response = delete_if_created(&self.gate, &leader.key, leader.rev, &caller).await?;
        Ok(Response::new(epb::ResignResponse { header: response.header }))
    }
}

/// Sends each leader of the election under `prefix` in turn, and each value it proclaims, until
/// the receiver goes. Each value is sent once, also when routing changes under the watch.
async fn observe(
    gate: &Gateway,
    prefix: &[u8],
    sender: &mpsc::Sender<Result<epb::LeaderResponse, Status>>,
) -> Result<(), Status> {
    // The last value sent: a key and the revision it was written at.
    let mut sent: Option<(Vec<u8>, i64)> = None;
    let mut send = async |header: Option<pb::PbResponseHeader>, kv: pb::PbKeyValue| {
        let this = (kv.key.clone(), kv.mod_revision);
        if sent.as_ref() == Some(&this) {
            return true;
        }
        sent = Some(this);
        sender.send(Ok(epb::LeaderResponse { header, kv: Some(kv) })).await.is_ok()
    };
    loop {
        let mut first = gate.range(first_or_last(prefix, true, 0)).await?;
        let (header, leader) = match first.kvs.pop() {
            Some(kv) => (first.header, kv),
            None => {
                // No leader yet: the first key put under the prefix leads.
                let mut watch = KeyWatch::open(gate, KeyRange::prefix(prefix), revision_of(&first.header)).await?;
                let mut found = None;
                while found.is_none() {
                    let Some(response) = watch.next().await? else { break };
                    found = response.events.into_iter().find(|e| e.r#type == PUT).and_then(|e| e.kv).map(|kv| {
                        let mut header = response.header;
                        if let Some(header) = header.as_mut() {
                            header.revision = kv.mod_revision;
                        }
                        (header, kv)
                    });
                }
                match found {
                    Some(found) => found,
                    None => continue,
                }
            }
        };
        let from = revision_of(&header) + 1;
        let key = leader.key.clone();
        if !send(header, leader).await {
            return Ok(());
        }
        // The leader's values, until its key goes.
        let mut watch = KeyWatch::open(gate, KeyRange::from_request(&key, &[]), from).await?;
        'leading: while let Some(response) = watch.next().await? {
            for event in response.events {
                if event.r#type == DELETE {
                    break 'leading;
                }
                if let Some(kv) = event.kv
                    && !send(response.header, kv).await
                {
                    return Ok(());
                }
            }
        }
    }
}
