//! The etcd reads: a Range routed to the scopes it covers, split and merged in the requested
//! order; Compact on every group.

use std::collections::BTreeMap;

use etcd_client::proto as pb;
use tonic::Status;

use super::{GateError, Gateway, ScopeRuntime};
use crate::index::KeyRange;

impl Gateway {
    /// etcd `Range`: routed, split across scopes and merged in the requested order. A read a
    /// group refuses because it handed the keys off (a move's hand-off, before routing names
    /// the new group) is read again once routing changes, within [`super::HANDOFF_WAIT`].
    pub async fn range(&self, request: pb::PbRangeRequest) -> Result<pb::PbRangeResponse, GateError> {
        let mut reroutes = self.reroutes();
        let deadline = tokio::time::Instant::now() + super::HANDOFF_WAIT;
        loop {
            match self.range_once(request.clone()).await {
                Err(GateError::Backend(status)) if status.code() == tonic::Code::PermissionDenied => {
                    match tokio::time::timeout_at(deadline, reroutes.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => return Err(GateError::Backend(status)),
                    }
                }
                other => return other,
            }
        }
    }

    async fn range_once(&self, request: pb::PbRangeRequest) -> Result<pb::PbRangeResponse, GateError> {
        let range = KeyRange::from_request(&request.key, &request.range_end);
        let routing = self.routing();
        let parts = routing.parts(&range);
        match parts.as_slice() {
            [] => Ok(pb::PbRangeResponse { header: self.any_header().await?, ..Default::default() }),
            [(runtime, part)] => {
                self.metrics.routed(&runtime.scope.id, "read");
                runtime.stats.read(part);
                let mut request = request;
                if *part != range {
                    (request.key, request.range_end) = part.to_request();
                }
                let shift = runtime.scope.revisions;
                if shift.is_identity() {
                    return Ok(runtime.group.range(request).await?);
                }
                shift.range_request(&mut request)?;
                let mut response = runtime.group.range(request).await?;
                shift.range_response(&mut response);
                Ok(response)
            }
            parts => self.range_merged(request, parts).await,
        }
    }

    pub(super) async fn range_merged(
        &self,
        request: pb::PbRangeRequest,
        parts: &[(&ScopeRuntime, KeyRange)],
    ) -> Result<pb::PbRangeResponse, GateError> {
        let groups: std::collections::BTreeSet<&str> = parts.iter().map(|(r, _)| r.group.name()).collect();
        if request.revision > 0 && groups.len() > 1 {
            return Err(GateError::Unsupported(format!(
                "a range at revision {} spans scopes on {} etcd groups, whose revisions are unrelated; \
                 range within one scope, or without a revision",
                request.revision,
                groups.len()
            )));
        }
        let mut merged = pb::PbRangeResponse::default();
        // Parts on one group are read at the revision of the first answer: one snapshot.
        let mut revisions: BTreeMap<&str, i64> = BTreeMap::new();
        for (runtime, part) in parts {
            self.metrics.routed(&runtime.scope.id, "read");
            runtime.stats.read(part);
            let mut sub = request.clone();
            (sub.key, sub.range_end) = part.to_request();
            let shift = runtime.scope.revisions;
            shift.range_request(&mut sub)?;
            if sub.revision == 0
                && let Some(rev) = revisions.get(runtime.group.name())
            {
                sub.revision = *rev;
            }
            let mut response = runtime.group.range(sub).await?;
            if let Some(header) = &response.header {
                revisions.entry(runtime.group.name()).or_insert(header.revision);
            }
            shift.range_response(&mut response);
            merged.header = merged.header.or(response.header);
            merged.count += response.count;
            merged.more |= response.more;
            merged.kvs.extend(response.kvs);
        }
        sort_kvs(&mut merged.kvs, request.sort_target, request.sort_order);
        if request.limit > 0 && merged.kvs.len() as i64 > request.limit {
            merged.kvs.truncate(request.limit as usize);
            merged.more = true;
        }
        Ok(merged)
    }

    /// etcd `Compact`: each group is compacted up to `revision` (or its current revision, when
    /// lower), since every group keeps its own revisions. A group holding moved scopes is
    /// compacted at the lowest of their backend revisions for `revision`, so no scope loses
    /// history it still shows.
    /// A revision past every group's current one is refused as etcd refuses a future revision,
    /// before any group is compacted.
    pub async fn compact(&self, request: pb::PbCompactionRequest) -> Result<pb::PbCompactionResponse, GateError> {
        let routing = self.routing();
        let groups = self.groups.load_full();
        let mut plan = Vec::with_capacity(groups.len());
        for group in groups.values() {
            let current = group.status().await?.header.map(|h| h.revision).unwrap_or(0);
            let held = routing
                .index()
                .scopes()
                .iter()
                .filter(|scope| scope.group == group.name())
                .map(|scope| scope.revisions.bound(request.revision))
                .min()
                .unwrap_or(request.revision);
            plan.push((group, held, current));
        }
        if plan.iter().all(|(_, held, current)| held > current) {
            return Err(GateError::Backend(Status::out_of_range("etcdserver: mvcc: required revision is a future revision")));
        }
        let mut first_error = None;
        let mut last = None;
        let mut compacted_any = false;
        for (group, held, current) in plan {
            let revision = held.min(current);
            match group.compact(pb::PbCompactionRequest { revision, physical: request.physical }).await {
                Ok(response) => {
                    compacted_any = true;
                    last = Some(response);
                }
                Err(status) => {
                    first_error.get_or_insert(status);
                }
            }
        }
        match (compacted_any, last, first_error) {
            (true, Some(response), _) => Ok(response),
            (_, _, Some(status)) => Err(GateError::Backend(status)),
            _ => Err(GateError::Backend(Status::internal("no backend group to compact"))),
        }
    }

    /// A header from the home group, for answers that touch no scope.
    pub(super) async fn any_header(&self) -> Result<Option<pb::PbResponseHeader>, GateError> {
        Ok(self.home.status().await?.header)
    }
}

/// Sorts merged key-values as etcd would (`sort_target`: key, version, create, mod, value;
/// `sort_order`: none, ascend, descend). Without an order, etcd returns keys ascending.
fn sort_kvs(kvs: &mut [pb::PbKeyValue], target: i32, order: i32) {
    kvs.sort_by(|a, b| {
        let by = match target {
            1 => a.version.cmp(&b.version),
            2 => a.create_revision.cmp(&b.create_revision),
            3 => a.mod_revision.cmp(&b.mod_revision),
            4 => a.value.cmp(&b.value),
            _ => a.key.cmp(&b.key),
        };
        let by = by.then_with(|| a.key.cmp(&b.key));
        if order == 2 { by.reverse() } else { by }
    });
}
