//! Leases across groups. A lease is granted on the home group; the first time a key in another
//! group uses it, aq creates it there with the same ID (etcd lets the grantor choose the ID) and
//! the TTL it has left. Keep-alive, revoke and time-to-live then cover every copy, so clients see
//! one lease.

use std::collections::HashSet;
use std::sync::Mutex;

use etcd_client::proto as pb;
use tonic::Status;

use super::{GateError, Gateway};
use crate::backend::Group;

/// Which (group, lease) copies this gateway has made or seen.
#[derive(Default)]
pub(super) struct LeaseCopies {
    known: Mutex<HashSet<(String, i64)>>,
}

impl LeaseCopies {
    fn contains(&self, group: &str, lease: i64) -> bool {
        self.known.lock().expect("lease lock").contains(&(group.to_string(), lease))
    }

    fn insert(&self, group: &str, lease: i64) {
        self.known.lock().expect("lease lock").insert((group.to_string(), lease));
    }

    fn forget(&self, lease: i64) {
        self.known.lock().expect("lease lock").retain(|(_, id)| *id != lease);
    }
}

/// etcd's message for a missing lease.
const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

impl Gateway {
    /// Makes sure each lease exists on `group`, copying it from the home group if needed.
    pub(crate) async fn ensure_leases(&self, group: &Group, leases: impl IntoIterator<Item = i64>) -> Result<(), GateError> {
        for lease in leases {
            if lease == 0 || group.name() == self.home.name() || self.leases.contains(group.name(), lease) {
                continue;
            }
            let home = self.home.lease_time_to_live(pb::PbLeaseTimeToLiveRequest { id: lease, keys: false }).await?;
            if home.ttl <= 0 {
                return Err(GateError::Backend(Status::not_found(LEASE_NOT_FOUND)));
            }
            let copy = group.lease_grant(pb::PbLeaseGrantRequest { ttl: home.ttl, id: lease }).await;
            match copy {
                Ok(_) => {}
                // Another gateway (or an earlier attempt) made the copy already.
                Err(status) if status.message().contains("lease already exists") => {}
                Err(status) => return Err(GateError::Backend(status)),
            }
            self.leases.insert(group.name(), lease);
        }
        Ok(())
    }

    /// The groups other than home.
    pub fn other_groups(&self) -> Vec<Group> {
        self.groups.load().values().filter(|g| g.name() != self.home.name()).cloned().collect()
    }

    /// etcd `LeaseGrant`, on the home group.
    pub async fn lease_grant(&self, request: pb::PbLeaseGrantRequest) -> Result<pb::PbLeaseGrantResponse, GateError> {
        let response = self.home.lease_grant(request).await?;
        self.leases.insert(self.home.name(), response.id);
        Ok(response)
    }

    /// etcd `LeaseRevoke`: every copy; keys attached anywhere are deleted.
    pub async fn lease_revoke(&self, request: pb::PbLeaseRevokeRequest) -> Result<pb::PbLeaseRevokeResponse, GateError> {
        let response = self.home.lease_revoke(request).await?;
        for group in self.other_groups() {
            if let Err(status) = group.lease_revoke(request).await
                && !status.message().contains("lease not found")
            {
                tracing::warn!(group = group.name(), lease = request.id, "cannot revoke a lease copy: {}", status.message());
            }
        }
        self.leases.forget(request.id);
        Ok(response)
    }

    /// etcd `LeaseTimeToLive`: the home lease's TTL; with `keys`, the keys of every copy.
    pub async fn lease_time_to_live(
        &self,
        request: pb::PbLeaseTimeToLiveRequest,
    ) -> Result<pb::PbLeaseTimeToLiveResponse, GateError> {
        let mut response = self.home.lease_time_to_live(request).await?;
        if request.keys && response.ttl > 0 {
            for group in self.other_groups() {
                if let Ok(copy) = group.lease_time_to_live(request).await {
                    response.keys.extend(copy.keys);
                }
            }
            response.keys.sort();
        }
        Ok(response)
    }

    /// etcd `LeaseLeases`: the leases of the home group, where every lease is granted.
    pub async fn lease_leases(&self) -> Result<pb::PbLeaseLeasesResponse, GateError> {
        Ok(self.home.lease_leases().await?)
    }
}
