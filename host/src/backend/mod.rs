//! Backend groups: the etcd clusters that hold scopes. A [`Group`] forwards etcd's own protobuf
//! messages over one gRPC channel, unchanged, so what the gateway sends is exactly what a client
//! would have sent. backend/ knows nothing of policies.

pub mod managed;
pub mod ownership;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use etcd_client::proto as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// The user and password aq logs into a group's etcd with (etcd auth).
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Credentials {
    /// The etcd user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

/// A login on a group's etcd: one token for the group's connection, taken on first use and
/// taken again when etcd no longer accepts it (it expired, etcd restarted, or the auth store
/// changed since the request was authorised).
#[derive(Debug)]
struct Login {
    credentials: Credentials,
    token: ArcSwapOption<MetadataValue<Ascii>>,
    /// Held while a new token is asked for, so concurrent refusals log in once.
    renewing: tokio::sync::Mutex<()>,
    /// When etcd last accepted the token (ms since the Unix epoch): etcd forgets a simple token
    /// left unused for its TTL (`--auth-token-ttl`, 300 s by default).
    used_ms: std::sync::atomic::AtomicU64,
}

/// A token unused for this long is renewed before a stream opens with it: a stream carries its
/// token only when it opens, and etcd answers a stale one by cancelling its watches.
const STREAM_TOKEN_IDLE: Duration = Duration::from_secs(120);

/// Whether etcd refused a request for its token, before applying it: the token is unknown or
/// expired (`invalid auth token`). Nothing was written; the request can be sent again with a
/// new token.
fn token_refused(status: &Status) -> bool {
    status.code() == Code::Unauthenticated && status.message().contains("invalid auth token")
}

/// Whether the auth store changed between authorising and applying a request (`revision of
/// auth store is old`): nothing was written, and sent again the request's permissions are
/// checked anew. A hand-off changes the auth store a few times in a row (each range granted or
/// revoked), hence [`AUTH_CHANGED_RETRIES`].
fn auth_changed(status: &Status) -> bool {
    status.code() == Code::InvalidArgument && status.message().contains("revision of auth store is old")
}

/// Resends of one request whose group's auth store changed under it.
const AUTH_CHANGED_RETRIES: u32 = 16;

/// Errors connecting to a group.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// An endpoint URL does not parse.
    #[error("backend group {group}: invalid endpoint {endpoint}: {error}")]
    Endpoint {
        /// The group.
        group: String,
        /// The endpoint.
        endpoint: String,
        /// Why.
        error: String,
    },
    /// A group has no endpoints.
    #[error("backend group {0} has no endpoints; give at least one etcd client URL")]
    NoEndpoints(String),
    /// The group did not answer in time.
    #[error("backend group {group} ({endpoints}) did not answer within {waited:?}: {last_error}")]
    NotReady {
        /// The group.
        group: String,
        /// Its endpoints.
        endpoints: String,
        /// How long we waited.
        waited: Duration,
        /// The last error seen.
        last_error: String,
    },
}

/// Builds a request union variant whose message type etcd-client does not export by name:
/// `variant` fixes the type, `fill` sets its fields.
pub fn watch_request<T: Default>(variant: fn(T) -> pb::PbWatchRequestUnion, fill: impl FnOnce(&mut T)) -> pb::PbWatchRequest {
    let mut message = T::default();
    fill(&mut message);
    pb::PbWatchRequest { request_union: Some(variant(message)) }
}

/// Numbers of etcd's `Compare` enums in its protocol.
pub mod compare {
    /// `Compare.target` `VERSION`.
    pub const TARGET_VERSION: i32 = 0;
    /// `Compare.target` `CREATE`.
    pub const TARGET_CREATE: i32 = 1;
    /// `Compare.target` `MOD`.
    pub const TARGET_MOD: i32 = 2;
    /// `Compare.target` `VALUE`.
    pub const TARGET_VALUE: i32 = 3;
    /// `Compare.result` `EQUAL`.
    pub const RESULT_EQUAL: i32 = 0;
    /// `Compare.result` `GREATER`.
    pub const RESULT_GREATER: i32 = 1;
    /// `Compare.result` `LESS`.
    pub const RESULT_LESS: i32 = 2;
}

/// One etcd cluster.
#[derive(Clone, Debug)]
pub struct Group {
    name: String,
    endpoints: Vec<String>,
    members: Arc<Members>,
    login: Option<Arc<Login>>,
}

/// A group's members, each on a connection of its own. Requests go to one member at a time (the
/// current one); a member that cannot be reached is passed over for [`MEMBER_DOWN`] from its
/// first error, and the next one becomes current. etcd forwards what needs its leader, so any
/// live member serves every request.
#[derive(Debug)]
struct Members {
    list: Vec<Member>,
    current: std::sync::atomic::AtomicUsize,
}

#[derive(Debug)]
struct Member {
    channel: Channel,
    /// Until when (ms since the Unix epoch) this member is passed over.
    down_until_ms: std::sync::atomic::AtomicU64,
}

/// How long a member that could not be reached is passed over before it is tried again (while
/// another member answers; with every member down, each is tried in turn).
const MEMBER_DOWN: Duration = Duration::from_secs(2);

impl Members {
    /// The member to send to: the current one unless it is down, else the next that is not
    /// (with every member down, the current one).
    fn pick(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.list.len();
        if n == 1 {
            return 0;
        }
        let current = self.current.load(Relaxed) % n;
        let now = crate::clock::unix_ms();
        (0..n).map(|step| (current + step) % n).find(|&i| self.list[i].down_until_ms.load(Relaxed) <= now).unwrap_or(current)
    }

    /// Member `index` could not be reached: pass it over, and move on from it if it is current.
    fn lost(&self, index: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.list.len();
        if n == 1 {
            return;
        }
        self.list[index].down_until_ms.store(crate::clock::unix_ms() + MEMBER_DOWN.as_millis() as u64, Relaxed);
        let _ = self.current.compare_exchange(index, (index + 1) % n, Relaxed, Relaxed);
    }
}

/// How a failed call went, as far as reaching the member goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    /// The member answered (with an error of etcd's own, or the call succeeded).
    Answered,
    /// No connection could be made: the request was never sent.
    NotSent,
    /// The connection broke with the request on it: etcd may or may not have applied it.
    Broken,
}

/// Whether `status` is an answer of etcd's, or a member that could not be reached. tonic gives
/// transport failures as `Unavailable` (or `Unknown`) with the transport's error as the source;
/// etcd's own `Unavailable` answers (`etcdserver: leader changed`, …) have none.
fn reach(status: &Status) -> Reach {
    // hyper cancels a request it had not begun to write when the connection under it closes
    // (a member going away); etcd answers `Cancelled` only to a client that gave up itself.
    if status.code() == Code::Cancelled && status.message() == HYPER_CANCELED {
        return Reach::NotSent;
    }
    if !matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal) {
        return Reach::Answered;
    }
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    let transport = source.is_some();
    while let Some(error) = source {
        text.push_str(": ");
        text.push_str(&error.to_string());
        source = error.source();
    }
    let text = text.to_ascii_lowercase();
    if text.contains("connect") && (text.contains("refused") || text.contains("error trying to connect") || text.contains("tcp connect")) {
        return Reach::NotSent;
    }
    if transport
        || ["transport error", "broken pipe", "connection reset", "connection closed", "error reading a body"].iter().any(|t| text.contains(t))
    {
        return Reach::Broken;
    }
    Reach::Answered
}

/// How tonic words hyper's cancel of a request that was never written.
const HYPER_CANCELED: &str = "operation was canceled";

/// A member's transport failure as the client sees it: `Unavailable`, naming the group and the
/// member, and saying whether the request could have been applied, so a client knows whether
/// it may simply send it again.
fn unreachable(group: &str, endpoint: &str, how: Reach, status: Status) -> Status {
    let outcome = match how {
        Reach::NotSent => NOT_SENT,
        _ => "the connection broke with the request on it, so it may or may not have been applied",
    };
    Status::unavailable(format!("etcd group {group} unreachable at {endpoint} ({outcome}): {}", status.message()))
}

/// What an `Unavailable` answer says when aq could not reach any member: nothing was written,
/// and the request may be sent again as it is.
pub const NOT_SENT: &str = "not sent, nothing was written";

/// Whether a request on `path` may be sent again after its connection broke: it reads, or
/// writes nothing a second sending would change.
fn idempotent(path: &str) -> bool {
    matches!(
        path,
        path::RANGE
            | path::STATUS
            | path::MEMBER_LIST
            | path::HASH_KV
            | path::LEASE_TIME_TO_LIVE
            | path::LEASE_LEASES
            | path::AUTHENTICATE
    )
}

/// The gRPC paths of the etcd methods the gateway forwards.
mod path {
    pub const RANGE: &str = "/etcdserverpb.KV/Range";
    pub const PUT: &str = "/etcdserverpb.KV/Put";
    pub const DELETE_RANGE: &str = "/etcdserverpb.KV/DeleteRange";
    pub const TXN: &str = "/etcdserverpb.KV/Txn";
    pub const COMPACT: &str = "/etcdserverpb.KV/Compact";
    pub const STATUS: &str = "/etcdserverpb.Maintenance/Status";
    pub const ALARM: &str = "/etcdserverpb.Maintenance/Alarm";
    pub const DEFRAGMENT: &str = "/etcdserverpb.Maintenance/Defragment";
    pub const SNAPSHOT: &str = "/etcdserverpb.Maintenance/Snapshot";
    pub const HASH_KV: &str = "/etcdserverpb.Maintenance/HashKV";
    pub const MEMBER_LIST: &str = "/etcdserverpb.Cluster/MemberList";
    pub const LEASE_GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
    pub const LEASE_REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
    pub const LEASE_TIME_TO_LIVE: &str = "/etcdserverpb.Lease/LeaseTimeToLive";
    pub const LEASE_LEASES: &str = "/etcdserverpb.Lease/LeaseLeases";
    pub const LEASE_KEEP_ALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
    pub const WATCH: &str = "/etcdserverpb.Watch/Watch";
    pub const AUTHENTICATE: &str = "/etcdserverpb.Auth/Authenticate";
}

impl Group {
    /// A group reachable at `endpoints` (etcd client URLs). Connects lazily; see
    /// [`Group::wait_ready`].
    pub fn connect_lazy(name: &str, endpoints: &[String]) -> Result<Self, BackendError> {
        if endpoints.is_empty() {
            return Err(BackendError::NoEndpoints(name.to_string()));
        }
        let mut parsed = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let e = Endpoint::from_shared(endpoint.clone())
                .map_err(|error| BackendError::Endpoint {
                    group: name.to_string(),
                    endpoint: endpoint.clone(),
                    error: error.to_string(),
                })?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .http2_keep_alive_interval(Duration::from_secs(10));
            parsed.push(e);
        }
        let list = parsed
            .into_iter()
            .map(|endpoint| Member { channel: endpoint.connect_lazy(), down_until_ms: std::sync::atomic::AtomicU64::new(0) })
            .collect();
        let members = Arc::new(Members { list, current: std::sync::atomic::AtomicUsize::new(0) });
        Ok(Group { name: name.to_string(), endpoints: endpoints.to_vec(), members, login: None })
    }

    /// The same group, logging in as `credentials` (etcd auth) before its first request.
    pub fn with_login(mut self, credentials: Credentials) -> Self {
        self.login = Some(Arc::new(Login {
            credentials,
            token: ArcSwapOption::empty(),
            renewing: tokio::sync::Mutex::new(()),
            used_ms: std::sync::atomic::AtomicU64::new(0),
        }));
        self
    }

    /// Drops the token, so the next request logs in again: for an etcd known to have restarted,
    /// which has forgotten its tokens.
    pub fn forget_token(&self) {
        if let Some(login) = &self.login {
            login.token.store(None);
        }
    }

    /// The etcd user this group's requests are sent as, if it logs in.
    pub fn user(&self) -> Option<&str> {
        self.login.as_ref().map(|l| l.credentials.user.as_str())
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Waits until the group answers a status request, up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<pb::PbStatusResponse, BackendError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(1), self.status()).await;
            let last_error = match attempt {
                Ok(Ok(status)) => return Ok(status),
                Ok(Err(status)) => status.message().to_string(),
                Err(_) => "status request timed out".to_string(),
            };
            if started.elapsed() >= timeout {
                return Err(BackendError::NotReady {
                    group: self.name.clone(),
                    endpoints: self.endpoints.join(","),
                    waited: started.elapsed(),
                    last_error,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// A gRPC client on member `index`'s connection, ready to send.
    async fn grpc_to(&self, index: usize) -> Result<tonic::client::Grpc<Channel>, Status> {
        // etcd's own client accepts answers up to 2 GiB (MaxCallRecvMsgSize); a large range
        // through aq must not fail where it would succeed against etcd.
        let channel = self.members.list[index].channel.clone();
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(i32::MAX as usize);
        grpc.ready().await.map_err(|e| Status::unavailable(format!("etcd group {} unreachable: {e}", self.name)))?;
        Ok(grpc)
    }

    /// Sends one unary call to the current member; when that member cannot be reached, passes
    /// it over and sends to the next, as long as the request was not sent or may be sent
    /// again (`path` is [`idempotent`]). A group of one member sends once.
    async fn call<C>(
        &self,
        path: &'static str,
        request: impl Fn() -> tonic::Request<C::Encode>,
    ) -> Result<tonic::Response<C::Decode>, Status>
    where
        C: tonic::codec::Codec + Default + Send + 'static,
        C::Encode: Send + Sync + 'static,
        C::Decode: Send + Sync + 'static,
    {
        let mut tries = 0;
        loop {
            let index = self.members.pick();
            let uri = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            let sent = self.grpc_to(index).await?.unary(request(), uri, C::default()).await;
            let Err(status) = sent else { return sent };
            let how = reach(&status);
            if how == Reach::Answered {
                return Err(status);
            }
            self.members.lost(index);
            tries += 1;
            let again = how == Reach::NotSent || idempotent(path);
            if !again || tries >= self.members.list.len() {
                return Err(unreachable(&self.name, &self.endpoints[index], how, status));
            }
            tracing::warn!(group = %self.name, endpoint = %self.endpoints[index], "etcd member unreachable; sending to the next: {}", status.message());
        }
    }

    async fn unary<Q, R>(&self, path: &'static str, request: Q) -> Result<R, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.unary_with(path, request, &[]).await
    }

    /// A unary call with extra request metadata (ASCII headers). When the group logs in, the
    /// call carries its token; a call etcd refused for its token is sent once more with a new
    /// one (the message is shared, not copied, between the two).
    async fn unary_with<Q, R>(&self, path: &'static str, request: Q, metadata: &[(&'static str, String)]) -> Result<R, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut extra = Vec::with_capacity(metadata.len());
        for (name, value) in metadata {
            let value: MetadataValue<Ascii> =
                value.parse().map_err(|_| Status::invalid_argument(format!("metadata {name} is not ASCII")))?;
            extra.push((*name, value));
        }
        let message = Arc::new(request);
        let (mut retried, mut resent) = (false, 0);
        loop {
            let token = self.token().await?;
            let request = || {
                let mut request = tonic::Request::new(message.clone());
                for (name, value) in &extra {
                    request.metadata_mut().append(*name, value.clone());
                }
                if let Some(token) = &token {
                    request.metadata_mut().insert(wire::TOKEN, (**token).clone());
                }
                request
            };
            let sent = self.call::<wire::SharedCodec<Q, R>>(path, request).await;
            match sent {
                Err(status) if !retried && token.is_some() && token_refused(&status) => {
                    retried = true;
                    self.renew(token).await?;
                }
                Err(status) if resent < AUTH_CHANGED_RETRIES && token.is_some() && auth_changed(&status) => resent += 1,
                other => {
                    if let (Some(login), Ok(_)) = (&self.login, &other) {
                        login.used_ms.store(crate::clock::unix_ms(), std::sync::atomic::Ordering::Relaxed);
                    }
                    return other.map(tonic::Response::into_inner);
                }
            }
        }
    }

    /// The token to send, logging in first when there is none yet. `None` without a login.
    async fn token(&self) -> Result<Option<Arc<MetadataValue<Ascii>>>, Status> {
        let Some(login) = &self.login else { return Ok(None) };
        if let Some(token) = login.token.load_full() {
            return Ok(Some(token));
        }
        self.renew(None).await.map(Some)
    }

    /// Logs in again, unless another request already replaced the token `refused` since.
    async fn renew(&self, refused: Option<Arc<MetadataValue<Ascii>>>) -> Result<Arc<MetadataValue<Ascii>>, Status> {
        let login = self.login.as_ref().expect("renew is called on groups that log in");
        let _held = login.renewing.lock().await;
        let current = login.token.load_full();
        if let Some(current) = current
            && refused.as_ref().is_none_or(|r| !Arc::ptr_eq(r, &current))
        {
            return Ok(current);
        }
        let request = pb::PbAuthenticateRequest {
            name: login.credentials.user.clone(),
            password: login.credentials.password.clone(),
        };
        let answer = self
            .call::<tonic_prost::ProstCodec<pb::PbAuthenticateRequest, pb::PbAuthenticateResponse>>(path::AUTHENTICATE, || {
                tonic::Request::new(request.clone())
            })
            .await
            .map_err(|status| {
            Status::new(
                status.code(),
                format!(
                    "etcd group {} refused aq's login as {}: {}; check the group's user and password",
                    self.name,
                    login.credentials.user,
                    status.message()
                ),
            )
        })?;
        let token: MetadataValue<Ascii> = answer
            .into_inner()
            .token
            .parse()
            .map_err(|_| Status::internal(format!("etcd group {} issued a token that is not ASCII", self.name)))?;
        let token = Arc::new(token);
        login.token.store(Some(token.clone()));
        Ok(token)
    }

    /// etcd `Put` with extra request metadata (signatures, for a client of aq).
    pub async fn put_with(&self, request: pb::PbPutRequest, metadata: &[(&'static str, String)]) -> Result<pb::PbPutResponse, Status> {
        self.unary_with(path::PUT, request, metadata).await
    }

    /// etcd `DeleteRange` with extra request metadata.
    pub async fn delete_range_with(
        &self,
        request: pb::PbDeleteRequest,
        metadata: &[(&'static str, String)],
    ) -> Result<pb::PbDeleteResponse, Status> {
        self.unary_with(path::DELETE_RANGE, request, metadata).await
    }

    /// Opens a stream. etcd authorises a stream's requests with the token its opening carried,
    /// so a token left unused long enough to have expired is renewed first.
    async fn streaming<Q, R>(
        &self,
        path: &'static str,
        requests: impl tokio_stream::Stream<Item = Q> + Send + 'static,
    ) -> Result<Streaming<R>, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.streaming_on(path, requests).await.map(|(answers, _)| answers)
    }

    /// [`Group::streaming`], also saying which member the stream is on and with which token.
    async fn streaming_on<Q, R>(
        &self,
        path: &'static str,
        requests: impl tokio_stream::Stream<Item = Q> + Send + 'static,
    ) -> Result<(Streaming<R>, Opened), Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let codec = tonic_prost::ProstCodec::<Q, R>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let mut request = tonic::Request::new(requests);
        if let Some(login) = &self.login {
            let idle = crate::clock::unix_ms().saturating_sub(login.used_ms.load(std::sync::atomic::Ordering::Relaxed));
            if idle > STREAM_TOKEN_IDLE.as_millis() as u64 {
                let current = login.token.load_full();
                self.renew(current).await?;
                login.used_ms.store(crate::clock::unix_ms(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        let token = self.token().await?;
        if let Some(token) = &token {
            request.metadata_mut().insert(wire::TOKEN, (**token).clone());
        }
        // A stream's requests are sent as they come, so it goes to one member; when that member
        // cannot be reached, the caller's next stream goes to another.
        let index = self.members.pick();
        let status = match self.grpc_to(index).await?.streaming(request, path, codec).await {
            Ok(answers) => return Ok((answers.into_inner(), Opened { member: index, token })),
            Err(status) => status,
        };
        match reach(&status) {
            Reach::Answered => Err(status),
            how => {
                self.members.lost(index);
                Err(unreachable(&self.name, &self.endpoints[index], how, status))
            }
        }
    }

    /// etcd `Range`.
    pub async fn range(&self, request: pb::PbRangeRequest) -> Result<pb::PbRangeResponse, Status> {
        self.unary(path::RANGE, request).await
    }

    /// etcd `Put`.
    pub async fn put(&self, request: pb::PbPutRequest) -> Result<pb::PbPutResponse, Status> {
        self.unary(path::PUT, request).await
    }

    /// etcd `DeleteRange`.
    pub async fn delete_range(&self, request: pb::PbDeleteRequest) -> Result<pb::PbDeleteResponse, Status> {
        self.unary(path::DELETE_RANGE, request).await
    }

    /// etcd `Txn`.
    pub async fn txn(&self, request: pb::PbTxnRequest) -> Result<pb::PbTxnResponse, Status> {
        self.unary(path::TXN, request).await
    }

    /// etcd `Compact`.
    pub async fn compact(&self, request: pb::PbCompactionRequest) -> Result<pb::PbCompactionResponse, Status> {
        self.unary(path::COMPACT, request).await
    }

    /// etcd `Maintenance.Status` of the endpoint the channel picks.
    pub async fn status(&self) -> Result<pb::PbStatusResponse, Status> {
        self.unary(path::STATUS, pb::PbStatusRequest {}).await
    }

    /// etcd `Maintenance.Alarm`.
    pub async fn alarm(&self, request: pb::PbAlarmRequest) -> Result<pb::PbAlarmResponse, Status> {
        self.unary(path::ALARM, request).await
    }

    /// etcd `Maintenance.Defragment` of the member the channel picks: one member's, through
    /// [`Group::member`].
    pub async fn defragment(&self) -> Result<pb::PbDefragmentResponse, Status> {
        self.unary(path::DEFRAGMENT, pb::PbDefragmentRequest {}).await
    }

    /// The same group reached at `endpoint` alone, logging in as this one does: for requests
    /// etcd answers per member.
    pub fn member(&self, endpoint: &str) -> Result<Group, BackendError> {
        let single = Group::connect_lazy(&self.name, &[endpoint.to_string()])?;
        Ok(match &self.login {
            Some(login) => single.with_login(login.credentials.clone()),
            None => single,
        })
    }

    /// etcd `Cluster.MemberList`.
    pub async fn member_list(&self) -> Result<pb::PbMemberListResponse, Status> {
        self.unary(path::MEMBER_LIST, pb::PbMemberListRequest { linearizable: false }).await
    }

    /// etcd `LeaseGrant`.
    pub async fn lease_grant(&self, request: pb::PbLeaseGrantRequest) -> Result<pb::PbLeaseGrantResponse, Status> {
        self.unary(path::LEASE_GRANT, request).await
    }

    /// etcd `LeaseRevoke`.
    pub async fn lease_revoke(&self, request: pb::PbLeaseRevokeRequest) -> Result<pb::PbLeaseRevokeResponse, Status> {
        self.unary(path::LEASE_REVOKE, request).await
    }

    /// etcd `LeaseTimeToLive`.
    pub async fn lease_time_to_live(
        &self,
        request: pb::PbLeaseTimeToLiveRequest,
    ) -> Result<pb::PbLeaseTimeToLiveResponse, Status> {
        self.unary(path::LEASE_TIME_TO_LIVE, request).await
    }

    /// etcd `LeaseLeases`.
    pub async fn lease_leases(&self) -> Result<pb::PbLeaseLeasesResponse, Status> {
        self.unary(path::LEASE_LEASES, pb::PbLeaseLeasesRequest {}).await
    }

    /// etcd `LeaseKeepAlive`, a bidirectional stream.
    pub async fn lease_keep_alive(
        &self,
        requests: impl tokio_stream::Stream<Item = pb::PbLeaseKeepAliveRequest> + Send + 'static,
    ) -> Result<Streaming<pb::PbLeaseKeepAliveResponse>, Status> {
        self.streaming(path::LEASE_KEEP_ALIVE, requests).await
    }

    /// etcd `Maintenance.HashKV` of the member the channel picks, at `revision` (0: latest).
    pub async fn hash_kv(&self, revision: i64) -> Result<pb::PbHashKvResponse, Status> {
        self.unary(path::HASH_KV, pb::PbHashKvRequest { revision }).await
    }

    /// etcd `Maintenance.Snapshot` of the member the channel picks: its whole store, streamed,
    /// with the SHA-256 of the rest as its last 32 bytes.
    pub async fn snapshot(&self) -> Result<Streaming<pb::PbSnapshotResponse>, Status> {
        self.streaming(path::SNAPSHOT, tokio_stream::once(pb::PbSnapshotRequest {})).await
    }

    /// etcd `Watch`, a bidirectional stream.
    pub async fn watch(
        &self,
        requests: impl tokio_stream::Stream<Item = pb::PbWatchRequest> + Send + 'static,
    ) -> Result<Streaming<pb::PbWatchResponse>, Status> {
        self.streaming(path::WATCH, requests).await
    }

    /// [`Group::watch`], also saying where the stream was opened, for [`Group::stream_broke`]
    /// and [`Group::stream_token_refused`].
    pub async fn watch_on(
        &self,
        requests: impl tokio_stream::Stream<Item = pb::PbWatchRequest> + Send + 'static,
    ) -> Result<(Streaming<pb::PbWatchResponse>, Opened), Status> {
        self.streaming_on(path::WATCH, requests).await
    }

    /// A stream `opened` ended with `failure` (`None`: it ended without an error, which etcd
    /// never does while it serves). True when the member is to blame rather than an answer of
    /// etcd's: the member is passed over, and a stream opened again goes to another one.
    pub fn stream_broke(&self, opened: &Opened, failure: Option<&Status>) -> bool {
        let lost = failure.is_none_or(|status| reach(status) != Reach::Answered);
        if lost {
            self.members.lost(opened.member);
        }
        lost
    }

    /// etcd refused the token a stream was `opened` with (`invalid auth token`: a member that
    /// restarted forgot it, or it expired): logs in again, unless another request already did,
    /// so that the stream opened again carries a token etcd knows.
    pub async fn stream_token_refused(&self, opened: &Opened) -> Result<(), Status> {
        if self.login.is_none() {
            return Ok(());
        }
        self.renew(opened.token.clone()).await.map(drop)
    }
}

/// Whether a watch's cancel reason is etcd refusing the token of the stream it was created on.
pub fn watch_token_refused(reason: &str) -> bool {
    reason.contains("invalid auth token")
}

/// Where a stream was opened: the member, and the token it carried.
#[derive(Clone, Debug)]
pub struct Opened {
    member: usize,
    token: Option<Arc<MetadataValue<Ascii>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of three members on loopback ports where nothing listens.
    async fn three() -> Group {
        let ports: Vec<u16> = (0..3).map(|_| managed::free_port().unwrap()).collect();
        let urls: Vec<String> = ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
        Group::connect_lazy("g", &urls).unwrap()
    }

    #[tokio::test]
    async fn a_member_lost_is_passed_over_and_the_next_one_becomes_current() {
        let group = three().await;
        let members = &group.members;
        assert_eq!(members.pick(), 0);
        members.lost(0);
        assert_eq!(members.pick(), 1, "the next member is current");
        members.lost(1);
        assert_eq!(members.pick(), 2);
        // Every member down: the current one is tried rather than none.
        members.lost(2);
        assert_eq!(members.pick(), 0);
        // A member lost that is not current leaves the current one alone.
        let fresh = three().await;
        fresh.members.lost(2);
        assert_eq!(fresh.members.pick(), 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_reported_as_not_sent_after_every_member_was_tried() {
        let group = three().await;
        let refused = group.put(pb::PbPutRequest { key: b"k".to_vec(), value: b"v".to_vec(), ..Default::default() }).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("etcd group g unreachable") && refused.message().contains(NOT_SENT), "{}", refused.message());
        // Each member was tried once and is now passed over.
        let now = crate::clock::unix_ms();
        let down = group.members.list.iter().filter(|m| m.down_until_ms.load(std::sync::atomic::Ordering::Relaxed) > now).count();
        assert_eq!(down, 3);
    }

    #[test]
    fn etcds_own_unavailable_answers_are_answers_not_lost_members() {
        assert_eq!(reach(&Status::unavailable("etcdserver: leader changed")), Reach::Answered);
        assert_eq!(reach(&Status::invalid_argument("etcdserver: key is not provided")), Reach::Answered);
        let refused = Status::from_error(Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "tcp connect error: Connection refused")));
        assert_eq!(reach(&refused), Reach::NotSent, "{refused:?}");
        let reset = Status::from_error(Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer")));
        assert_eq!(reach(&reset), Reach::Broken, "{reset:?}");
        // A request queued on a connection that closed before it was written.
        assert_eq!(reach(&Status::cancelled("operation was canceled")), Reach::NotSent);
        assert_eq!(reach(&Status::cancelled("context canceled")), Reach::Answered);
    }
}
