//! The Lease service. The gate keeps one lease per ID across groups; keep-alive streams are
//! forwarded to every group, and the client hears the home group's answers.

use std::sync::Arc;

use etcd_client::proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Auth, Need};
use crate::gate::Gateway;

/// Buffered keep-alive messages per stream.
const KEEP_ALIVE_BUFFER: usize = 64;

/// The Lease service. With aq's etcd auth on, every call needs a user, and a revoke needs
/// WRITE on each key the lease holds (the keys it deletes), as in etcd.
pub struct Lease {
    gate: Arc<Gateway>,
    auth: Arc<Auth>,
}

impl Lease {
    /// Lease over `gate`, with etcd users' permissions from `auth`.
    pub fn new(gate: Arc<Gateway>, auth: Arc<Auth>) -> Self {
        Lease { gate, auth }
    }

    async fn user<T>(&self, request: &Request<T>) -> Result<crate::auth::Who, Status> {
        let who = self.auth.who(request.metadata()).await?;
        self.auth.require_user(&who)?;
        Ok(who)
    }
}

#[tonic::async_trait]
impl pb::PbLeaseService for Lease {
    async fn lease_grant(
        &self,
        request: Request<pb::PbLeaseGrantRequest>,
    ) -> Result<Response<pb::PbLeaseGrantResponse>, Status> {
        self.user(&request).await?;
        Ok(Response::new(self.gate.lease_grant(request.into_inner()).await?))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::PbLeaseRevokeRequest>,
    ) -> Result<Response<pb::PbLeaseRevokeResponse>, Status> {
        let who = self.user(&request).await?;
        if who.user().is_some() {
            let attached = pb::PbLeaseTimeToLiveRequest { id: request.get_ref().id, keys: true };
            if let Ok(held) = self.gate.lease_time_to_live(attached).await {
                for key in &held.keys {
                    self.auth.require(&who, Need::Write, key, b"")?;
                }
            }
        }
        Ok(Response::new(self.gate.lease_revoke(request.into_inner()).await?))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<pb::PbLeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        self.user(&request).await?;
        let mut inbound = request.into_inner();
        let (to_client, from_aq) = mpsc::channel(KEEP_ALIVE_BUFFER);

        // etcd sends a stream's response headers with its first answer, so each backend stream
        // is opened in its own task while the client's requests already flow into its channel.
        let (to_home, home_requests) = mpsc::channel(KEEP_ALIVE_BUFFER);
        let home = self.gate.home().clone();
        tokio::spawn(async move {
            let mut answers = match home.lease_keep_alive(ReceiverStream::new(home_requests)).await {
                Ok(answers) => answers,
                Err(status) => {
                    let _ = to_client.send(Err(status)).await;
                    return;
                }
            };
            loop {
                match answers.message().await {
                    Ok(Some(response)) => {
                        if to_client.send(Ok(response)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = to_client.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        // Every other group holds copies of leases its keys use; a group added at run time
        // (started for a split) gets its keep-alive stream with the next request after it.
        let gate = self.gate.clone();
        tokio::spawn(async move {
            let mut copies = Copies::default();
            loop {
                match inbound.message().await {
                    Ok(Some(request)) => {
                        copies.follow(&gate);
                        for other in copies.streams.values() {
                            // A slow copy must not hold up the client's lease.
                            let _ = other.try_send(request);
                        }
                        if to_home.send(request).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(from_aq)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::PbLeaseTimeToLiveResponse>, Status> {
        self.user(&request).await?;
        Ok(Response::new(self.gate.lease_time_to_live(request.into_inner()).await?))
    }

    async fn lease_leases(
        &self,
        request: Request<pb::PbLeaseLeasesRequest>,
    ) -> Result<Response<pb::PbLeaseLeasesResponse>, Status> {
        self.user(&request).await?;
        Ok(Response::new(self.gate.lease_leases().await?))
    }
}

/// One client keep-alive stream's streams to the groups other than home, by group.
#[derive(Default)]
struct Copies {
    /// The gateway's groups they were opened for.
    groups: Option<Arc<std::collections::BTreeMap<String, crate::backend::Group>>>,
    streams: std::collections::BTreeMap<String, mpsc::Sender<pb::PbLeaseKeepAliveRequest>>,
}

impl Copies {
    /// Opens a stream to each group added since the last call, and drops those of groups gone.
    fn follow(&mut self, gate: &Gateway) {
        let groups = gate.groups();
        if self.groups.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &groups)) {
            return;
        }
        self.streams.retain(|name, _| groups.contains_key(name));
        for (name, group) in groups.iter().filter(|(name, _)| *name != gate.home().name()) {
            if self.streams.contains_key(name) {
                continue;
            }
            let (tx, rx) = mpsc::channel(KEEP_ALIVE_BUFFER);
            let group = group.clone();
            // A copy's TTL is not the client's business; its answers are only drained.
            tokio::spawn(async move {
                if let Ok(mut answers) = group.lease_keep_alive(ReceiverStream::new(rx)).await {
                    while let Ok(Some(_)) = answers.message().await {}
                }
            });
            self.streams.insert(name.clone(), tx);
        }
        self.groups = Some(groups);
    }
}
