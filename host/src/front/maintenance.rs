//! The Maintenance service over every group aq holds. aq is not an etcd member: `Status`
//! answers for the keyspace (sizes summed over the groups, each group's errors named by group),
//! `Alarm` lists and disarms the groups' alarms by their own member IDs, `Defragment` runs on
//! each member of each group in turn, and `Hash`/`HashKV` hash what clients can read (see
//! `gate/hash.rs`), and `Snapshot` streams aq's archive of every group (`crate::snapshot`).
//! `MoveLeader` belongs to a group's own members.

use std::sync::Arc;

use etcd_client::proto as pb;
use tonic::{Request, Response, Status};

use super::REPORTED_ETCD_VERSION;
use crate::auth::Auth;
use crate::backend::Group;
use crate::gate::Gateway;

/// etcd's `AlarmRequest.action` numbers.
const ALARM_GET: i32 = 0;
const ALARM_ACTIVATE: i32 = 1;
const ALARM_DEACTIVATE: i32 = 2;

/// The Maintenance service. With aq's etcd auth on, `Status` is open (health checks),
/// listing alarms needs a user, and everything else the root role.
pub struct Maintenance {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
    addr: std::net::SocketAddr,
    /// Where the managed groups' credentials are, for snapshots.
    data_dir: Option<std::path::PathBuf>,
}

impl Maintenance {
    /// Maintenance over `gate`, with etcd users from `auth`, served at `addr`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>, addr: std::net::SocketAddr) -> Self {
        Maintenance { gate, auth, addr, data_dir: None }
    }

    /// Snapshots carry the credentials of the groups aq manages under `data_dir`.
    pub fn with_data_dir(mut self, data_dir: std::path::PathBuf) -> Self {
        self.data_dir = Some(data_dir);
        self
    }

    async fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let who = self.auth.who(request.metadata()).await?;
        self.auth.require_admin(&who)
    }

    /// Each group with the connection that may maintain it: as its etcd root where aq has
    /// those credentials (managed groups; external ones with `admin_user`), else aq's own user.
    fn maintainers(&self) -> Vec<(String, Group)> {
        self.gate
            .groups()
            .iter()
            .map(|(name, group)| (name.clone(), self.gate.replayer(name).unwrap_or_else(|| group.clone())))
            .collect()
    }

    /// A header as this gateway answers it: the home group's, with aq's own member id.
    fn header(&self, header: Option<pb::PbResponseHeader>) -> Option<pb::PbResponseHeader> {
        header.map(|mut header| {
            header.member_id = member_id(&self.addr);
            header
        })
    }

    /// The group one of whose members has `member`'s id, if any.
    async fn group_of_member(&self, member: u64) -> Result<Option<(String, Group)>, Status> {
        for (name, group) in self.maintainers() {
            let members = group.member_list().await.map_err(|s| in_group(&name, s))?;
            if members.members.iter().any(|m| m.id == member) {
                return Ok(Some((name, group)));
            }
        }
        Ok(None)
    }
}

/// Bytes per Snapshot message.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// A directory removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A group's refusal, saying which group refused.
fn in_group(group: &str, status: Status) -> Status {
    Status::new(status.code(), format!("etcd group {group}: {}", status.message()))
}

/// A stable member id for this gateway, derived from its address.
pub(super) fn member_id(addr: &std::net::SocketAddr) -> u64 {
    let digest = blake3::hash(addr.to_string().as_bytes());
    u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"))
}

#[tonic::async_trait]
impl pb::PbMaintenanceService for Maintenance {
    async fn alarm(&self, request: Request<pb::PbAlarmRequest>) -> Result<Response<pb::PbAlarmResponse>, Status> {
        let who = self.auth.who(request.metadata()).await?;
        if request.get_ref().action == ALARM_GET {
            self.auth.require_user(&who)?;
        } else {
            self.auth.require_admin(&who)?;
        }
        let request = request.into_inner();
        let mut answer = pb::PbAlarmResponse::default();
        match request.action {
            ALARM_GET => {
                for (name, group) in self.maintainers() {
                    let listed = group.alarm(request).await.map_err(|s| in_group(&name, s))?;
                    answer.header = answer.header.or(listed.header);
                    // etcd lists every alarm for type NONE, else those of the type asked.
                    answer.alarms.extend(listed.alarms.into_iter().filter(|a| request.alarm == 0 || a.alarm == request.alarm));
                }
            }
            ALARM_ACTIVATE | ALARM_DEACTIVATE => match self.group_of_member(request.member_id).await? {
                Some((name, group)) => {
                    let changed = group.alarm(request).await.map_err(|s| in_group(&name, s))?;
                    answer.header = changed.header;
                    answer.alarms = changed.alarms;
                }
                // Disarming what no member has is a no-op in etcd, not an error.
                None if request.action == ALARM_DEACTIVATE => answer.header = self.gate.home().status().await?.header,
                None => {
                    return Err(Status::invalid_argument(format!(
                        "no etcd group of aq has a member with id {:x}; `etcdctl alarm list` through aq names the \
                         members that have alarms, and `aq groups ls` lists each group's endpoints",
                        request.member_id
                    )));
                }
            },
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown alarm action {other}; use GET (0), ACTIVATE (1) or DEACTIVATE (2)"
                )));
            }
        }
        answer.header = self.header(answer.header);
        Ok(Response::new(answer))
    }

    async fn status(&self, _: Request<pb::PbStatusRequest>) -> Result<Response<pb::PbStatusResponse>, Status> {
        let home = self.gate.home().name().to_string();
        let mut status = self.gate.home().status().await.map_err(|s| in_group(&home, s))?;
        status.errors = status.errors.iter().map(|e| format!("group {home}: {e}")).collect();
        for (name, group) in self.gate.groups().iter() {
            if *name == home {
                continue;
            }
            match group.status().await {
                Ok(other) => {
                    status.db_size += other.db_size;
                    status.db_size_in_use += other.db_size_in_use;
                    status.errors.extend(other.errors.iter().map(|e| format!("group {name}: {e}")));
                }
                Err(refused) => status.errors.push(format!("group {name}: unreachable: {}", refused.message())),
            }
        }
        let id = member_id(&self.addr);
        status.version = REPORTED_ETCD_VERSION.to_string();
        status.leader = id;
        status.header = self.header(status.header);
        Ok(Response::new(status))
    }

    async fn defragment(
        &self,
        request: Request<pb::PbDefragmentRequest>,
    ) -> Result<Response<pb::PbDefragmentResponse>, Status> {
        self.admin(&request).await?;
        // One member at a time: a member being defragmented answers nothing until it is done.
        let mut header = None;
        for (name, group) in self.maintainers() {
            for endpoint in group.endpoints() {
                let member = group.member(endpoint).map_err(|e| Status::internal(e.to_string()))?;
                let done = member
                    .defragment()
                    .await
                    .map_err(|s| in_group(&name, Status::new(s.code(), format!("defragmenting {endpoint}: {}", s.message()))))?;
                header = header.or(done.header);
            }
        }
        Ok(Response::new(pb::PbDefragmentResponse { header: self.header(header) }))
    }

    async fn hash(&self, request: Request<pb::PbHashRequest>) -> Result<Response<pb::PbHashResponse>, Status> {
        self.admin(&request).await?;
        let hashed = self.gate.hash_kv(0).await?;
        let header = self.header(self.gate.home().status().await?.header);
        Ok(Response::new(pb::PbHashResponse { header, hash: hashed.hash }))
    }

    async fn hash_kv(&self, request: Request<pb::PbHashKvRequest>) -> Result<Response<pb::PbHashKvResponse>, Status> {
        self.admin(&request).await?;
        let revision = request.into_inner().revision;
        if revision < 0 {
            return Err(Status::invalid_argument(format!("revision {revision} is negative; give 0 for the latest")));
        }
        let hashed = self.gate.hash_kv(revision).await?;
        let mut header = self.header(self.gate.home().status().await?.header);
        if let Some(header) = header.as_mut() {
            header.revision = hashed.revision;
        }
        // The compaction clients see is the home group's (aq compacts every group together);
        // etcd's -1 when it never compacted.
        let home = self.gate.replayer(self.gate.home().name()).unwrap_or_else(|| self.gate.home().clone());
        let compact_revision = home.hash_kv(0).await.map(|h| h.compact_revision).unwrap_or(-1);
        Ok(Response::new(pb::PbHashKvResponse { header, hash: hashed.hash, compact_revision, hash_revision: hashed.revision }))
    }

    type SnapshotStream = tokio_stream::wrappers::ReceiverStream<Result<pb::PbSnapshotResponse, Status>>;

    /// aq's snapshot archive (`crate::snapshot`), not one etcd database: every group's
    /// snapshot and the layout, assembled in a temporary directory first and then streamed.
    async fn snapshot(&self, request: Request<pb::PbSnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        self.admin(&request).await?;
        let mut suffix = [0u8; 8];
        getrandom::fill(&mut suffix).map_err(|e| Status::internal(format!("no randomness: {e}")))?;
        let dir = TempDir(std::env::temp_dir().join(format!("aq-snapshot-{}", hex::encode(suffix))));
        std::fs::create_dir_all(&dir.0).map_err(|e| Status::internal(format!("cannot make {}: {e}", dir.0.display())))?;
        let manifest = crate::snapshot::take(&self.gate, &dir.0, self.data_dir.as_deref())
            .await
            .map_err(Status::failed_precondition)?;
        let archive = dir.0.join("archive.tar");
        let file = std::fs::File::create(&archive).map_err(|e| Status::internal(format!("cannot write {}: {e}", archive.display())))?;
        crate::snapshot::write_archive(&manifest, &dir.0, std::io::BufWriter::new(file))
            .map_err(|e| Status::internal(format!("cannot write {}: {e}", archive.display())))?;
        let header = self.header(self.gate.home().status().await?.header);
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let _dir = dir;
            let sent = (|| {
                use std::io::Read;
                let mut file = std::fs::File::open(&archive)?;
                let mut remaining = file.metadata()?.len();
                while remaining > 0 {
                    let mut blob = vec![0u8; SNAPSHOT_CHUNK.min(remaining as usize)];
                    file.read_exact(&mut blob)?;
                    remaining -= blob.len() as u64;
                    let message = pb::PbSnapshotResponse { header, remaining_bytes: remaining, blob, ..Default::default() };
                    if sender.blocking_send(Ok(message)).is_err() {
                        break; // the client went away
                    }
                }
                Ok::<(), std::io::Error>(())
            })();
            if let Err(e) = sent {
                let _ = sender.blocking_send(Err(Status::internal(format!("reading the snapshot archive failed: {e}"))));
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(receiver)))
    }

    async fn move_leader(
        &self,
        _: Request<pb::PbMoveLeaderRequest>,
    ) -> Result<Response<pb::PbMoveLeaderResponse>, Status> {
        Err(Status::failed_precondition(
            "aq is not a Raft member, so it has no leadership to move; move an etcd group's leader with \
             `etcdctl move-leader` against that group's endpoints (`aq groups ls` lists them)",
        ))
    }

    async fn downgrade(&self, request: Request<pb::PbDowngradeRequest>) -> Result<Response<pb::PbDowngradeResponse>, Status> {
        self.admin(&request).await?;
        Err(Status::failed_precondition(
            "aq is not an etcd member and runs no etcd version of its own; downgrade each group's etcd \
             against that group's endpoints (`aq groups ls` lists them), one group at a time",
        ))
    }
}
