//! The Watch service. One client stream fans out to one backend watch stream per group it
//! needs; a client watch over several scopes becomes one backend watch per scope part, and their
//! events come back under the client's watch id. Reserved keys are never watched: the index
//! leaves them out of every part.
//!
//! A watch outlives a move of its scope to another group (`adapt/migrate.rs`). When routing
//! changes, each part whose scope now lives elsewhere is re-homed: the old group is watched
//! again, over the scope's whole part, from the last revision the client was given, and its
//! events reach the client up to the hand-off revision; meanwhile a part on the new group,
//! from the cut-over on, holds its events. The migration writes a marker into every part of
//! the old copy before deleting it, so the replay always sees an event past the hand-off and
//! knows it is done; then the new part's events follow. The client sees every event of the
//! scope once, in revision order, and none of the old copy's deletion.
//!
//! A watch also outlives the etcd member its stream is on. When a backend stream breaks (the
//! member died, or its connection did, or etcd forgot the token the stream was opened with),
//! the stream is opened again, on another member of the group where there is one, and every
//! part it carried is created again from the revision after the last one its client was given,
//! as etcd's own client resumes its watches. The client sees nothing but a pause. A group that
//! cannot be watched again for [`RESUME_FOR`] ends the client watches it carried, canceled with
//! the reason.

use std::collections::HashMap;
use std::sync::Arc;

use etcd_client::proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Need, Who};
use crate::backend::Group;
use crate::backend::watch_request as build;
use crate::gate::Gateway;
use crate::index::{KeyRange, RevisionShift};

/// Buffered responses per client stream.
const BUFFER: usize = 256;

/// How long a re-homed part may take to replay the old copy of its scope; past it, the client
/// watch is canceled as compacted at the scope's new floor, and kube-style clients relist.
const DRAIN_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a broken backend stream is opened again before its client watches are canceled;
/// about an etcd election and a member restarted.
const RESUME_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// The pause before the `n`th attempt to open a broken stream again: none for the first (the
/// next member is likely up), then doubling from 50 ms up to a second.
fn resume_pause(n: u32) -> std::time::Duration {
    if n <= 1 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_millis(50u64 << (n - 2).min(5)).min(std::time::Duration::from_secs(1))
}

/// What a backend stream's task reports, under the stream's name.
type Report = (String, Result<pb::PbWatchResponse, Broken>);

/// A backend stream that ended.
struct Broken {
    status: Status,
    /// The member, its connection or the stream's token failed, not the watch: the stream may
    /// be opened again.
    resumable: bool,
}

/// Appended to a group's name for the stream that replays what it handed off.
const REPLAY: &str = " (replay)";

/// etcd's watch filter values, which equal the event types they drop.
const FILTERS: std::ops::RangeInclusive<i32> = 0..=1;

/// The Watch service.
pub struct Watch {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
}

impl Watch {
    /// Watch over `gate`, with etcd users' permissions from `auth`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>) -> Self {
        Watch { gate, auth }
    }
}

#[tonic::async_trait]
impl pb::PbWatchService for Watch {
    type WatchStream = ReceiverStream<Result<pb::PbWatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        let (to_client, responses) = mpsc::channel(BUFFER);
        let (from_backends, backend_responses) = mpsc::channel(BUFFER);
        let session = Session {
            gate: self.gate.clone(),
            auth: self.auth.clone(),
            who,
            to_client,
            from_backends,
            backends: HashMap::new(),
            resuming: HashMap::new(),
            parts: HashMap::new(),
            watches: HashMap::new(),
            next_id: 0,
            progress: None,
        };
        tokio::spawn(session.run(request.into_inner(), backend_responses));
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}

/// One backend watch stream of a session.
struct Backend {
    requests: mpsc::Sender<pb::PbWatchRequest>,
    next_id: i64,
    /// The group it watches, for opening it again.
    group: Group,
}

/// A client watch and its backend parts.
struct ClientWatch {
    parts: Vec<(String, i64)>,
    awaiting_created: usize,
    canceling: bool,
    /// The client's create request, which re-homed parts are opened from.
    request: pb::PbWatchRequest,
}

/// One backend watch of a session.
struct Part {
    /// The client watch it serves.
    client: i64,
    /// The revision shift of its scope.
    shift: RevisionShift,
    /// Its scope, and the keys of the scope it watches.
    scope: String,
    range: KeyRange,
    /// The last backend revision the client has been given all events of; `None` until the
    /// backend said where the watch starts.
    seen: Option<i64>,
    /// Its created answer is the session's own business, not the client's: from the start
    /// (a part aq opened itself), or once its first created answer was passed on (a part
    /// created again on a new stream is created once for the client).
    quiet: bool,
    state: PartState,
}

enum PartState {
    /// Events go to the client as they come.
    Live,
    /// Replays the old copy of a moved scope up to `handed`, the old group's last revision
    /// of it, then hands over to the part `next` on the new group.
    Draining { handed: i64, next: (String, i64), filters: Vec<i32>, floor: i64, until: tokio::time::Instant },
    /// A part on a moved scope's new group, whose answers wait for the old copy's replay.
    Held(Vec<pb::PbWatchResponse>),
}

struct Session {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
    /// The etcd user of the stream: each watch it creates needs READ on its keys.
    who: Who,
    to_client: mpsc::Sender<Result<pb::PbWatchResponse, Status>>,
    from_backends: mpsc::Sender<Report>,
    backends: HashMap<String, Backend>,
    /// Broken streams being opened again: until when, and how many attempts so far.
    resuming: HashMap<String, (tokio::time::Instant, u32)>,
    /// (group, backend watch id) → the part.
    parts: HashMap<(String, i64), Part>,
    watches: HashMap<i64, ClientWatch>,
    next_id: i64,
    /// A RequestProgress over backends on several groups: the groups yet to answer, and the
    /// answers so far.
    progress: Option<(std::collections::BTreeSet<String>, HashMap<String, pb::PbWatchResponse>)>,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::PbWatchRequest>,
        mut backend_responses: mpsc::Receiver<Report>,
    ) {
        let mut reroutes = self.gate.reroutes();
        loop {
            let drain_until = self.drain_deadline();
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
                    // Routing that changed is followed before any answer is passed on, so an
                    // answer from a group that handed a scope off is read as the old copy's.
                    if reroutes.has_changed().unwrap_or(false) {
                        reroutes.borrow_and_update();
                        if !self.rehome().await {
                            return;
                        }
                    }
                    if !self.on_backend(group, response).await {
                        return;
                    }
                }
                Ok(()) = reroutes.changed() => {
                    if !self.rehome().await {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(drain_until.unwrap_or_else(far_future)), if drain_until.is_some() => {
                    if !self.drain_overdue().await {
                        return;
                    }
                }
            }
        }
    }

    async fn send(&self, response: pb::PbWatchResponse) -> bool {
        self.to_client.send(Ok(response)).await.is_ok()
    }

    /// The backend stream named `name`, to `group`, opened on first use (after `pause`, when
    /// it is opened again). A group's stream is named after it; a replay's after the group with
    /// [`REPLAY`] appended.
    fn backend(&mut self, name: &str, group: &Group, pause: std::time::Duration) -> &mut Backend {
        let name = name.to_string();
        let from_backends = self.from_backends.clone();
        self.backends.entry(name.clone()).or_insert_with(|| {
            let (requests, rx) = mpsc::channel(BUFFER);
            let backend = Backend { requests, next_id: 0, group: group.clone() };
            let group = group.clone();
            // etcd sends response headers with the first answer, so the stream is opened in a
            // task while requests already queue in its channel.
            tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                let (mut answers, opened) = match group.watch_on(ReceiverStream::new(rx)).await {
                    Ok(opened) => opened,
                    Err(status) => {
                        // Not opened: no member could be reached (aq's own Unavailable), or
                        // etcd refused the stream.
                        let resumable = status.code() == tonic::Code::Unavailable;
                        let _ = from_backends.send((name, Err(Broken { status, resumable }))).await;
                        return;
                    }
                };
                loop {
                    let item = match answers.message().await {
                        // etcd refuses a stream's token watch by watch: every watch on the
                        // stream needs a new one, so the stream is opened again after a login.
                        Ok(Some(response)) if response.canceled && crate::backend::watch_token_refused(&response.cancel_reason) => {
                            match group.stream_token_refused(&opened).await {
                                Ok(()) => Err(Broken { status: Status::unauthenticated(response.cancel_reason), resumable: true }),
                                Err(status) => Err(Broken { status, resumable: false }),
                            }
                        }
                        Ok(Some(response)) => Ok(response),
                        Ok(None) => {
                            let resumable = group.stream_broke(&opened, None);
                            let status = Status::unavailable(format!("etcd group {name} closed the watch stream"));
                            Err(Broken { status, resumable })
                        }
                        Err(status) => {
                            let resumable = group.stream_broke(&opened, Some(&status));
                            Err(Broken { status, resumable })
                        }
                    };
                    let done = item.is_err();
                    if from_backends.send((name.clone(), item)).await.is_err() || done {
                        return;
                    }
                }
            });
            backend
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
                if self.backends.len() > 1 {
                    if self.progress.is_some() {
                        return true; // the answers under way cover this request too
                    }
                    self.progress = Some((self.backends.keys().cloned().collect(), HashMap::new()));
                }
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
        if let Err(refused) = self.auth.require(&self.who, Need::Read, &key, &range_end) {
            // etcd cancels it with the error's text as grpc-go prints it.
            return self.refuse(id, format!("rpc error: code = {:?} desc = {}", refused.code(), refused.message())).await;
        }
        let range = KeyRange::from_request(&key, &range_end);
        let parts: Vec<(Group, KeyRange, RevisionShift, String)> = self
            .gate
            .routing()
            .parts(&range)
            .into_iter()
            .map(|(runtime, part)| (runtime.group.clone(), part, runtime.scope.revisions, runtime.scope.id.clone()))
            .collect();
        let groups: std::collections::BTreeSet<&str> = parts.iter().map(|(g, _, _, _)| g.name()).collect();
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
            let watch = ClientWatch { parts: Vec::new(), awaiting_created: 0, canceling: false, request: request.clone() };
            self.watches.insert(id, watch);
            let header = self.home_header().await;
            return self.send(pb::PbWatchResponse { header, watch_id: id, created: true, ..Default::default() }).await;
        }
        // A start revision before a moved scope's floor is history its group does not have:
        // answered as etcd answers a watch from a compacted revision.
        if let Some(floor) = parts.iter().find_map(|(_, _, shift, _)| shift.at(start_revision).err().map(|_| shift.floor)) {
            let header = self.home_header().await;
            let created = pb::PbWatchResponse { header, watch_id: id, created: true, ..Default::default() };
            let compacted =
                pb::PbWatchResponse { header, watch_id: id, canceled: true, compact_revision: floor, ..Default::default() };
            return self.send(created).await && self.send(compacted).await;
        }
        let mut recorded = Vec::new();
        for (group, part, shift, scope) in parts {
            let start = shift.bound(start_revision);
            let backend_id = self.open(group.name(), &group, request, &part, start, false).await;
            let seen = (start > 0).then_some(start - 1);
            let state = PartState::Live;
            let part = Part { client: id, shift, scope, range: part, seen, quiet: false, state };
            self.parts.insert((group.name().to_string(), backend_id), part);
            recorded.push((group.name().to_string(), backend_id));
        }
        let awaiting_created = recorded.len();
        let watch = ClientWatch { parts: recorded, awaiting_created, canceling: false, request: request.clone() };
        self.watches.insert(id, watch);
        true
    }

    /// Opens a backend watch on `group` for the client's create `request`, over `range` from
    /// backend revision `start`; `all_events` drops the client's filters (the session applies
    /// them). Returns its backend watch id.
    async fn open(&mut self, name: &str, group: &Group, request: &pb::PbWatchRequest, range: &KeyRange, start: i64, all_events: bool) -> i64 {
        let pause = self.resuming.get(name).map(|(_, attempts)| resume_pause(*attempts)).unwrap_or_default();
        let backend = self.backend(name, group, pause);
        let backend_id = backend.next_id;
        backend.next_id += 1;
        let (key, range_end) = range.to_request();
        let mut part_request = request.clone();
        if let Some(pb::PbWatchRequestUnion::CreateRequest(create)) = &mut part_request.request_union {
            create.key = key;
            create.range_end = range_end;
            create.watch_id = backend_id;
            create.start_revision = start;
            if all_events {
                create.filters.clear();
            }
        }
        let _ = backend.requests.send(part_request).await;
        backend_id
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
    async fn on_backend(&mut self, group: String, response: Result<pb::PbWatchResponse, Broken>) -> bool {
        let mut response = match response {
            Ok(response) => {
                if !self.resuming.is_empty() {
                    self.resuming.remove(&group);
                }
                response
            }
            Err(Broken { status, resumable }) => {
                let backend = self.backends.remove(&group);
                if self.progress.is_some() && !self.progress_answered(&group, None).await {
                    return false;
                }
                // A replay is not opened again: its watches end, and kube-style clients relist.
                if let Some(backend) = backend
                    && resumable
                    && !group.ends_with(REPLAY)
                {
                    return self.resume(group, backend.group, status).await;
                }
                return self.fail_stream(&group, format!("etcd group {group} failed: {}", status.message())).await;
            }
        };
        // A progress answer to RequestProgress carries no watch id (-1): pass it on, at the
        // least revision any watch on the group shows, so no watch is told more than it has.
        // While a moved scope's old copy replays, the new group's progress would run ahead of
        // events not yet given: such answers are dropped (the client may ask again).
        if response.watch_id < 0 {
            if self.progress.is_some() {
                return self.progress_answered(&group, Some(response)).await;
            }
            if self.parts.values().any(|part| !matches!(part.state, PartState::Live)) {
                return true;
            }
            let shift = self
                .parts
                .iter()
                .filter(|((g, _), _)| *g == group)
                .map(|(_, part)| part.shift)
                .min_by_key(|shift| shift.offset)
                .unwrap_or_default();
            shift.watch_response(&mut response);
            return self.send(response).await;
        }
        let key = (group, response.watch_id);
        let Some(part) = self.parts.get_mut(&key) else {
            return true;
        };
        match &mut part.state {
            PartState::Live => self.deliver(key, response).await,
            PartState::Held(_) if response.canceled => self.deliver(key, response).await,
            PartState::Held(waiting) => {
                if !response.created {
                    waiting.push(response);
                }
                true
            }
            PartState::Draining { .. } => self.replay(key, response).await,
        }
    }

    /// Ends every client watch with a part on the broken stream `name`, telling the client
    /// `reason`; false ends the session.
    async fn fail_stream(&mut self, name: &str, reason: String) -> bool {
        let affected: Vec<i64> =
            self.watches.iter().filter(|(_, w)| w.parts.iter().any(|(g, _)| g == name)).map(|(id, _)| *id).collect();
        for id in affected {
            self.forget(id);
            let canceled = pb::PbWatchResponse { watch_id: id, canceled: true, cancel_reason: reason.clone(), ..Default::default() };
            if !self.send(canceled).await {
                return false;
            }
        }
        true
    }

    /// Opens the broken stream `name` to `group` again and creates each of its parts on it
    /// anew, from the revision after the last one its client was given; past [`RESUME_FOR`] of
    /// trying, its watches end instead. False ends the session.
    async fn resume(&mut self, name: String, group: Group, status: Status) -> bool {
        let keys: Vec<(String, i64)> = self.parts.keys().filter(|(g, _)| *g == name).cloned().collect();
        if keys.is_empty() {
            self.resuming.remove(&name);
            return true;
        }
        let now = tokio::time::Instant::now();
        let (until, attempts) = self.resuming.entry(name.clone()).or_insert((now + RESUME_FOR, 0));
        if now >= *until {
            self.resuming.remove(&name);
            tracing::warn!(group = %name, error = %status.message(), "a watch stream could not be opened again; its watches end");
            let reason = format!("etcd group {name} could not be watched for {} s: {}", RESUME_FOR.as_secs(), status.message());
            return self.fail_stream(&name, reason).await;
        }
        *attempts += 1;
        if *attempts == 1 {
            tracing::info!(group = %name, error = %status.message(), "a watch stream broke; its watches resume on a new one");
        }
        for key in keys {
            let Some(mut part) = self.parts.remove(&key) else { continue };
            let id = part.client;
            let Some(watch) = self.watches.get(&id) else { continue };
            if watch.canceling {
                // The client asked it gone; its cancel answer would have come on the stream.
                self.forget(id);
                if !self.send(pb::PbWatchResponse { watch_id: id, canceled: true, ..Default::default() }).await {
                    return false;
                }
                continue;
            }
            let request = watch.request.clone();
            // What a held part kept comes again from its start.
            if let PartState::Held(waiting) = &mut part.state {
                waiting.clear();
            }
            let start = part.seen.map_or(0, |seen| seen + 1);
            let renewed = (name.clone(), self.open(&name, &group, &request, &part.range, start, false).await);
            self.parts.insert(renewed.clone(), part);
            if let Some(watch) = self.watches.get_mut(&id) {
                for p in watch.parts.iter_mut().filter(|p| **p == key) {
                    *p = renewed.clone();
                }
            }
            for other in self.parts.values_mut() {
                if let PartState::Draining { next, .. } = &mut other.state
                    && *next == key
                {
                    *next = renewed.clone();
                }
            }
        }
        true
    }

    /// Notes a group's answer to a RequestProgress over several groups (`None`: the group's
    /// stream failed). Once every group answered, each client watch whose parts are all on one
    /// group hears that group's progress as its own (watch id, its scope's revisions): groups
    /// keep unrelated revisions, so no one stream-wide revision would be true. A watch over
    /// scopes on several groups has no one revision and hears none. False ends the session.
    async fn progress_answered(&mut self, group: &str, answer: Option<pb::PbWatchResponse>) -> bool {
        let Some((waiting, answers)) = self.progress.as_mut() else { return true };
        waiting.remove(group);
        if let Some(answer) = answer {
            answers.insert(group.to_string(), answer);
        }
        if !waiting.is_empty() {
            return true;
        }
        let (_, answers) = self.progress.take().expect("a progress request under way");
        // While a moved scope's old copy replays, progress would run ahead of events not yet
        // given: dropped, as for one group (the client may ask again).
        if self.parts.values().any(|part| !matches!(part.state, PartState::Live)) {
            return true;
        }
        let mut notices = Vec::new();
        for (id, watch) in &self.watches {
            if watch.canceling {
                continue;
            }
            let groups: std::collections::BTreeSet<&str> = watch.parts.iter().map(|(g, _)| g.as_str()).collect();
            let [only] = groups.into_iter().collect::<Vec<_>>()[..] else { continue };
            let Some(answer) = answers.get(only) else { continue };
            let shift = watch
                .parts
                .iter()
                .filter_map(|key| self.parts.get(key))
                .map(|part| part.shift)
                .min_by_key(|shift| shift.offset)
                .unwrap_or_default();
            let mut notice = pb::PbWatchResponse { header: answer.header, watch_id: *id, ..Default::default() };
            shift.watch_response(&mut notice);
            notices.push(notice);
        }
        notices.sort_by_key(|n| n.watch_id);
        for notice in notices {
            if !self.send(notice).await {
                return false;
            }
        }
        true
    }

    /// Passes a live part's answer on to its client watch; false ends the session.
    async fn deliver(&mut self, key: (String, i64), mut response: pb::PbWatchResponse) -> bool {
        let Some(part) = self.parts.get_mut(&key) else { return true };
        let id = part.client;
        let header = response.header.as_ref().map(|h| h.revision).unwrap_or_default();
        let quiet = part.quiet;
        if response.created {
            part.quiet = true;
            part.seen = part.seen.or(Some(header));
        } else if !response.canceled {
            let last = response.events.iter().filter_map(|e| e.kv.as_ref()).map(|kv| kv.mod_revision).max();
            // A progress notification of this watch: every event up to the header was sent.
            let upto = last.unwrap_or(header);
            part.seen = Some(part.seen.unwrap_or_default().max(upto));
        }
        response.watch_id = id;
        part.shift.watch_response(&mut response);
        let Some(watch) = self.watches.get_mut(&id) else {
            return true;
        };
        if response.canceled {
            let first = !watch.parts.is_empty();
            self.forget(id);
            return if first { self.send(response).await } else { true };
        }
        if response.created {
            if quiet {
                return true;
            }
            watch.awaiting_created = watch.awaiting_created.saturating_sub(1);
            // One created answer per client watch, once every part exists.
            return if watch.awaiting_created == 0 { self.send(response).await } else { true };
        }
        if watch.canceling {
            return true;
        }
        self.send(response).await
    }

    /// Passes on a replay of a moved scope's old copy: the events of the part's keys up to the
    /// hand-off; the first event past it ends the replay, and the new group's part takes over.
    async fn replay(&mut self, key: (String, i64), response: pb::PbWatchResponse) -> bool {
        let Some(part) = self.parts.get(&key) else { return true };
        let PartState::Draining { handed, next, filters, floor, .. } = &part.state else { return true };
        let (handed, next, floor, id) = (*handed, next.clone(), *floor, part.client);
        if response.created {
            return true;
        }
        if response.canceled {
            if self.watches.get(&id).is_some_and(|w| w.canceling) {
                self.forget(id);
                return self.send(pb::PbWatchResponse { watch_id: id, canceled: true, ..Default::default() }).await;
            }
            // The old group no longer has the history (compacted): the client relists.
            return self.compacted(id, floor).await;
        }
        let mut done = false;
        let mut events = Vec::new();
        for event in response.events {
            let Some(kv) = &event.kv else { continue };
            if kv.mod_revision > handed {
                done = true;
                break;
            }
            if part.range.contains(&kv.key) && !filters.contains(&event.r#type) {
                events.push(event);
            }
        }
        if !events.is_empty() {
            let mut header = response.header;
            if let Some(header) = &mut header {
                header.revision = header.revision.min(handed);
            }
            let mut given = pb::PbWatchResponse { header, watch_id: id, events, ..Default::default() };
            part.shift.watch_response(&mut given);
            let canceling = self.watches.get(&id).is_none_or(|w| w.canceling);
            if !canceling && !self.send(given).await {
                return false;
            }
        }
        if !done {
            return true;
        }
        // The old copy is replayed: the new group's part goes live with what it held.
        self.drop_part(&key);
        let Some(successor) = self.parts.get_mut(&next) else { return true };
        let PartState::Held(waiting) = std::mem::replace(&mut successor.state, PartState::Live) else { return true };
        for response in waiting {
            if !self.deliver(next.clone(), response).await {
                return false;
            }
        }
        true
    }

    /// Follows a change of routing: every live part whose keys now belong to other scopes
    /// (a split) or whose scope moved to another group is re-homed (see the module's
    /// documentation); false ends the session.
    async fn rehome(&mut self) -> bool {
        let routing = self.gate.routing();
        let live: Vec<(String, i64)> =
            self.parts.iter().filter(|(_, part)| matches!(part.state, PartState::Live)).map(|(key, _)| key.clone()).collect();
        for key in live {
            let Some(part) = self.parts.get_mut(&key) else { continue };
            let (id, old) = (part.client, part.shift);
            let now: Vec<(&crate::gate::ScopeRuntime, KeyRange)> = routing.parts(&part.range);
            if let [(runtime, range)] = now.as_slice()
                && runtime.scope.id == part.scope
                && runtime.group.name() == key.0
                && *range == part.range
            {
                part.shift = runtime.scope.revisions;
                continue;
            }
            let Some(seen) = part.seen else {
                // The watch had not started on the old group: where it stood is unknown.
                let floor = now.iter().map(|(r, _)| r.scope.revisions.floor).max().unwrap_or(old.floor);
                if !self.compacted(id, floor).await {
                    return false;
                }
                continue;
            };
            let Some(watch) = self.watches.get(&id) else { continue };
            let request = watch.request.clone();
            self.drop_part(&key);
            for (runtime, range) in now {
                let scope_id = runtime.scope.id.clone();
                let new = runtime.scope.revisions;
                if runtime.group.name() == key.0 {
                    // Split off on the same group: the same stream of revisions goes on.
                    let next_id = self.open(&key.0, &runtime.group, &request, &range, seen + 1, false).await;
                    let next = (key.0.clone(), next_id);
                    let state = PartState::Live;
                    let successor = Part { client: id, shift: new, scope: scope_id, range, seen: Some(seen), quiet: true, state };
                    self.parts.insert(next.clone(), successor);
                    self.watches.get_mut(&id).expect("checked").parts.push(next);
                    continue;
                }
                if !self.follow_move(id, &key.0, old, seen, &request, runtime, range, &routing).await {
                    return false;
                }
            }
        }
        true
    }

    /// Re-homes the part of client watch `id` over `range`, which was on group `from` with
    /// shift `old` and given up to backend revision `seen`, after its scope (`runtime`) moved.
    #[allow(clippy::too_many_arguments)]
    async fn follow_move(
        &mut self,
        id: i64,
        from: &str,
        old: RevisionShift,
        seen: i64,
        request: &pb::PbWatchRequest,
        runtime: &crate::gate::ScopeRuntime,
        range: KeyRange,
        routing: &crate::gate::Routing,
    ) -> bool {
        let new = runtime.scope.revisions;
        let scope_id = runtime.scope.id.clone();
        let filters: Vec<i32> = match &request.request_union {
            Some(pb::PbWatchRequestUnion::CreateRequest(create)) => {
                create.filters.iter().copied().filter(|f| FILTERS.contains(f)).collect()
            }
            _ => Vec::new(),
        };
        // The old group's last revision of the scope (recorded by a merge, implied by a move's
        // base), and the new group's first.
        let handed = if new.handed > 0 { new.handed } else { new.base - 1 - old.offset };
        let cut = new.floor - new.offset;
        let group = runtime.group.clone();
        let next_id = self.open(group.name(), &group, request, &range, cut + 1, false).await;
        let next = (group.name().to_string(), next_id);
        let state = if seen >= handed { PartState::Live } else { PartState::Held(Vec::new()) };
        let successor = Part { client: id, shift: new, scope: scope_id.clone(), range: range.clone(), seen: Some(cut), quiet: true, state };
        self.parts.insert(next.clone(), successor);
        let Some(watch) = self.watches.get_mut(&id) else { return true };
        watch.parts.push(next.clone());
        tracing::info!(watch = id, scope = %scope_id, from, to = group.name(), "a watch follows its scope to a new group");
        if seen >= handed {
            return true;
        }
        // Replays over the scope's whole part on the old group, where the migration's marker
        // is certain to show up.
        let whole = routing
            .parts(&runtime.scope.range)
            .into_iter()
            .filter(|(r, p)| r.scope.id == scope_id && p.contains(&range.start))
            .map(|(_, p)| p)
            .next()
            .unwrap_or_else(|| range.clone());
        let Some(old_group) = self.gate.replayer(from) else { return true };
        let name = format!("{from}{REPLAY}");
        let drain_id = self.open(&name, &old_group, request, &whole, seen + 1, true).await;
        let until = tokio::time::Instant::now() + DRAIN_FOR;
        let state = PartState::Draining { handed, next, filters, floor: new.floor, until };
        let drain = Part { client: id, shift: old, scope: scope_id, range, seen: Some(seen), quiet: true, state };
        let drain_key = (name, drain_id);
        self.parts.insert(drain_key.clone(), drain);
        if let Some(watch) = self.watches.get_mut(&id) {
            watch.parts.push(drain_key);
        }
        true
    }

    /// When the first replay still under way is overdue.
    fn drain_deadline(&self) -> Option<tokio::time::Instant> {
        self.parts
            .values()
            .filter_map(|part| match part.state {
                PartState::Draining { until, .. } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Gives up on replays past their time: their client watches end as compacted.
    async fn drain_overdue(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let overdue: Vec<(i64, i64)> = self
            .parts
            .values()
            .filter_map(|part| match part.state {
                PartState::Draining { until, floor, .. } if until <= now => Some((part.client, floor)),
                _ => None,
            })
            .collect();
        for (id, floor) in overdue {
            tracing::warn!(watch = id, "the old copy of a moved scope did not finish replaying; the watch ends as compacted");
            if !self.compacted(id, floor).await {
                return false;
            }
        }
        true
    }

    /// Ends client watch `id` as etcd ends a watch whose history was compacted at `floor`.
    async fn compacted(&mut self, id: i64, floor: i64) -> bool {
        if !self.watches.contains_key(&id) {
            return true;
        }
        self.forget(id);
        let header = self.home_header().await;
        self.send(pb::PbWatchResponse { header, watch_id: id, canceled: true, compact_revision: floor, ..Default::default() }).await
    }

    /// Cancels one backend part and forgets it.
    fn drop_part(&mut self, key: &(String, i64)) {
        let Some(part) = self.parts.remove(key) else { return };
        if let Some(watch) = self.watches.get_mut(&part.client) {
            watch.parts.retain(|p| p != key);
        }
        if let Some(backend) = self.backends.get(&key.0) {
            let cancel = build(pb::PbWatchRequestUnion::CancelRequest, |c| c.watch_id = key.1);
            let _ = backend.requests.try_send(cancel);
        }
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

/// An instant no deadline reaches.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}
