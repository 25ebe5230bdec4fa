//! The Watch service. One client stream fans out to one backend watch stream per group it
//! needs; a client watch over several scopes becomes one backend watch per scope part, and their
//! events come back under the client's watch id. Reserved keys are never watched: the index
//! leaves them out of every part.

use std::collections::HashMap;
use std::sync::Arc;

use etcd_client::proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Group;
use crate::backend::watch_request as build;
use crate::gate::Gateway;
use crate::index::{KeyRange, RevisionShift};

/// Buffered responses per client stream.
const BUFFER: usize = 256;

/// The Watch service.
pub struct Watch {
    gate: Arc<Gateway>,
}

impl Watch {
    /// Watch over `gate`.
    pub fn new(gate: Arc<Gateway>) -> Self {
        Watch { gate }
    }
}

#[tonic::async_trait]
impl pb::PbWatchService for Watch {
    type WatchStream = ReceiverStream<Result<pb::PbWatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (to_client, responses) = mpsc::channel(BUFFER);
        let (from_backends, backend_responses) = mpsc::channel(BUFFER);
        let session = Session {
            gate: self.gate.clone(),
            to_client,
            from_backends,
            backends: HashMap::new(),
            parts: HashMap::new(),
            watches: HashMap::new(),
            next_id: 0,
        };
        tokio::spawn(session.run(request.into_inner(), backend_responses));
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}

/// One backend watch stream of a session.
struct Backend {
    requests: mpsc::Sender<pb::PbWatchRequest>,
    next_id: i64,
}

/// A client watch and its backend parts.
struct ClientWatch {
    parts: Vec<(String, i64)>,
    awaiting_created: usize,
    canceling: bool,
}

struct Session {
    gate: Arc<Gateway>,
    to_client: mpsc::Sender<Result<pb::PbWatchResponse, Status>>,
    from_backends: mpsc::Sender<(String, Result<pb::PbWatchResponse, Status>)>,
    backends: HashMap<String, Backend>,
    /// (group, backend watch id) → client watch id, and the revision shift of the part's scope.
    parts: HashMap<(String, i64), (i64, RevisionShift)>,
    watches: HashMap<i64, ClientWatch>,
    next_id: i64,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::PbWatchRequest>,
        mut backend_responses: mpsc::Receiver<(String, Result<pb::PbWatchResponse, Status>)>,
    ) {
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(request)) => {
                        if !self.on_client(request).await {
                            return;
                        }
                    }
                    // The client went away: dropping the session closes every backend stream.
                    Ok(None) | Err(_) => return,
                },
                Some((group, response)) = backend_responses.recv() => {
                    if !self.on_backend(group, response).await {
                        return;
                    }
                }
            }
        }
    }

    async fn send(&self, response: pb::PbWatchResponse) -> bool {
        self.to_client.send(Ok(response)).await.is_ok()
    }

    /// The backend stream of `group`, opened on first use.
    fn backend(&mut self, group: &Group) -> &mut Backend {
        let name = group.name().to_string();
        let from_backends = self.from_backends.clone();
        self.backends.entry(name.clone()).or_insert_with(|| {
            let (requests, rx) = mpsc::channel(BUFFER);
            let group = group.clone();
            // etcd sends response headers with the first answer, so the stream is opened in a
            // task while requests already queue in its channel.
            tokio::spawn(async move {
                let mut answers = match group.watch(ReceiverStream::new(rx)).await {
                    Ok(answers) => answers,
                    Err(status) => {
                        let _ = from_backends.send((name, Err(status))).await;
                        return;
                    }
                };
                loop {
                    let answer = answers.message().await;
                    let done = !matches!(answer, Ok(Some(_)));
                    let item = match answer {
                        Ok(Some(response)) => Ok(response),
                        Ok(None) => Err(Status::unavailable(format!("etcd group {name} closed the watch stream"))),
                        Err(status) => Err(status),
                    };
                    if from_backends.send((name.clone(), item)).await.is_err() || done {
                        return;
                    }
                }
            });
            Backend { requests, next_id: 0 }
        })
    }

    /// Handles one client request; false ends the session.
    async fn on_client(&mut self, request: pb::PbWatchRequest) -> bool {
        match request.request_union {
            Some(pb::PbWatchRequestUnion::CreateRequest(ref create)) => {
                let fields = (create.key.clone(), create.range_end.clone(), create.start_revision, create.watch_id);
                self.create(&request, fields).await
            }
            Some(pb::PbWatchRequestUnion::CancelRequest(cancel)) => {
                let id = cancel.watch_id;
                let Some(watch) = self.watches.get_mut(&id) else {
                    return true;
                };
                watch.canceling = true;
                let parts = watch.parts.clone();
                if parts.is_empty() {
                    self.watches.remove(&id);
                    let header = self.home_header().await;
                    return self.send(pb::PbWatchResponse { header, watch_id: id, canceled: true, ..Default::default() }).await;
                }
                for (group, backend_id) in parts {
                    let mut part_cancel = cancel;
                    part_cancel.watch_id = backend_id;
                    if let Some(backend) = self.backends.get(&group) {
                        let _ = backend
                            .requests
                            .send(pb::PbWatchRequest {
                                request_union: Some(pb::PbWatchRequestUnion::CancelRequest(part_cancel)),
                            })
                            .await;
                    }
                }
                true
            }
            Some(pb::PbWatchRequestUnion::ProgressRequest(progress)) => {
                for backend in self.backends.values() {
                    let _ = backend
                        .requests
                        .send(pb::PbWatchRequest {
                            request_union: Some(pb::PbWatchRequestUnion::ProgressRequest(progress)),
                        })
                        .await;
                }
                true
            }
            None => true,
        }
    }

    /// Creates a client watch: `request` is the client's create request, `(key, range_end,
    /// start_revision, watch_id)` its fields.
    async fn create(&mut self, request: &pb::PbWatchRequest, fields: (Vec<u8>, Vec<u8>, i64, i64)) -> bool {
        let (key, range_end, start_revision, watch_id) = fields;
        let id = if watch_id != 0 { watch_id } else { self.next_free_id() };
        if self.watches.contains_key(&id) {
            return self.refuse(id, "etcdserver: duplicate watch ID".into()).await;
        }
        let range = KeyRange::from_request(&key, &range_end);
        let parts: Vec<(Group, KeyRange, RevisionShift)> = self
            .gate
            .routing()
            .parts(&range)
            .into_iter()
            .map(|(runtime, part)| (runtime.group.clone(), part, runtime.scope.revisions))
            .collect();
        let groups: std::collections::BTreeSet<&str> = parts.iter().map(|(g, _, _)| g.name()).collect();
        if start_revision > 0 && groups.len() > 1 {
            let reason = format!(
                "a watch from revision {start_revision} spans scopes on {} etcd groups, whose revisions are \
                 unrelated; watch within one scope, or without a start revision",
                groups.len()
            );
            return self.refuse(id, reason).await;
        }
        if parts.is_empty() {
            // Keys nobody can write through aq: the watch exists and never fires.
            self.watches.insert(id, ClientWatch { parts: Vec::new(), awaiting_created: 0, canceling: false });
            let header = self.home_header().await;
            return self.send(pb::PbWatchResponse { header, watch_id: id, created: true, ..Default::default() }).await;
        }
        // A start revision before a moved scope's floor is history its group does not have:
        // answered as etcd answers a watch from a compacted revision.
        if let Some(floor) = parts.iter().find_map(|(_, _, shift)| shift.at(start_revision).err().map(|_| shift.floor)) {
            let header = self.home_header().await;
            let created = pb::PbWatchResponse { header, watch_id: id, created: true, ..Default::default() };
            let compacted =
                pb::PbWatchResponse { header, watch_id: id, canceled: true, compact_revision: floor, ..Default::default() };
            return self.send(created).await && self.send(compacted).await;
        }
        let mut recorded = Vec::new();
        for (group, part, shift) in parts {
            let backend = self.backend(&group);
            let backend_id = backend.next_id;
            backend.next_id += 1;
            let (key, range_end) = part.to_request();
            let mut part_request = request.clone();
            if let Some(pb::PbWatchRequestUnion::CreateRequest(create)) = &mut part_request.request_union {
                create.key = key;
                create.range_end = range_end;
                create.watch_id = backend_id;
                create.start_revision = shift.bound(create.start_revision);
            }
            let _ = backend.requests.send(part_request).await;
            self.parts.insert((group.name().to_string(), backend_id), (id, shift));
            recorded.push((group.name().to_string(), backend_id));
        }
        let awaiting_created = recorded.len();
        self.watches.insert(id, ClientWatch { parts: recorded, awaiting_created, canceling: false });
        true
    }

    /// A header for answers aq makes itself.
    async fn home_header(&self) -> Option<pb::PbResponseHeader> {
        self.gate.home().status().await.ok().and_then(|s| s.header)
    }

    /// Answers a create request as etcd refuses one: created and canceled at once, with a reason.
    async fn refuse(&self, id: i64, reason: String) -> bool {
        let header = self.home_header().await;
        let response =
            pb::PbWatchResponse { header, watch_id: id, created: true, canceled: true, cancel_reason: reason, ..Default::default() };
        self.send(response).await
    }

    fn next_free_id(&mut self) -> i64 {
        while self.watches.contains_key(&self.next_id) {
            self.next_id += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Routes one backend answer to the client; false ends the session.
    async fn on_backend(&mut self, group: String, response: Result<pb::PbWatchResponse, Status>) -> bool {
        let mut response = match response {
            Ok(response) => response,
            Err(status) => {
                // Every watch with a part on this group is over; tell the client which.
                let affected: Vec<i64> = self
                    .watches
                    .iter()
                    .filter(|(_, w)| w.parts.iter().any(|(g, _)| *g == group))
                    .map(|(id, _)| *id)
                    .collect();
                self.backends.remove(&group);
                for id in affected {
                    self.forget(id);
                    let canceled = pb::PbWatchResponse {
                        watch_id: id,
                        canceled: true,
                        cancel_reason: format!("etcd group {group} failed: {}", status.message()),
                        ..Default::default()
                    };
                    if !self.send(canceled).await {
                        return false;
                    }
                }
                return true;
            }
        };
        // A progress answer to RequestProgress carries no watch id (-1): pass it on, at the
        // least revision any watch on the group shows, so no watch is told more than it has.
        if response.watch_id < 0 {
            let shift = self
                .parts
                .iter()
                .filter(|((g, _), _)| *g == group)
                .map(|(_, (_, shift))| *shift)
                .min_by_key(|shift| shift.offset)
                .unwrap_or_default();
            shift.watch_response(&mut response);
            return self.send(response).await;
        }
        let Some(&(id, shift)) = self.parts.get(&(group.clone(), response.watch_id)) else {
            return true;
        };
        response.watch_id = id;
        shift.watch_response(&mut response);
        let Some(watch) = self.watches.get_mut(&id) else {
            return true;
        };
        if response.canceled {
            let first = !watch.parts.is_empty();
            self.forget(id);
            return if first { self.send(response).await } else { true };
        }
        if response.created {
            watch.awaiting_created = watch.awaiting_created.saturating_sub(1);
            // One created answer per client watch, once every part exists.
            return if watch.awaiting_created == 0 { self.send(response).await } else { true };
        }
        if watch.canceling {
            return true;
        }
        self.send(response).await
    }

    /// Drops a client watch and cancels what is left of its parts.
    fn forget(&mut self, id: i64) {
        let Some(watch) = self.watches.remove(&id) else { return };
        for (group, backend_id) in watch.parts {
            self.parts.remove(&(group.clone(), backend_id));
            if let Some(backend) = self.backends.get(&group) {
                let cancel = build(pb::PbWatchRequestUnion::CancelRequest, |c| c.watch_id = backend_id);
                let _ = backend.requests.try_send(cancel);
            }
        }
    }
}
