//! Same-scope reads for policies (`read`, `count`), answered by the scope's etcd group.
//!
//! Policies run synchronously on the request's task; a read blocks that worker thread in place
//! (`block_in_place`) while it waits for etcd, so other tasks move to other workers.

use aq_sdk::{Bytes, ReadError, StoredValue};
use etcd_client::proto as pb;

use crate::backend::Group;
use crate::engine::ScopeReader;
use crate::index::prefix_end;

pub(super) struct EtcdReader {
    group: Group,
    runtime: tokio::runtime::Handle,
}

impl EtcdReader {
    pub(super) fn new(group: Group) -> Self {
        EtcdReader { group, runtime: tokio::runtime::Handle::current() }
    }

    fn range(&self, request: pb::PbRangeRequest) -> Result<pb::PbRangeResponse, ReadError> {
        let group = &self.group;
        tokio::task::block_in_place(|| self.runtime.block_on(group.range(request)))
            .map_err(|status| ReadError::Failed(status.message().to_string()))
    }
}

impl ScopeReader for EtcdReader {
    fn read(&self, key: &[u8]) -> Result<Option<StoredValue>, ReadError> {
        let response = self.range(pb::PbRangeRequest { key: key.to_vec(), ..Default::default() })?;
        Ok(response.kvs.into_iter().next().map(|kv| StoredValue {
            value: Bytes(kv.value),
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }))
    }

    fn count(&self, prefix: &[u8]) -> Result<u64, ReadError> {
        let mut range_end = prefix_end(prefix);
        if range_end.is_empty() {
            range_end = vec![0];
        }
        let response = self.range(pb::PbRangeRequest {
            key: prefix.to_vec(),
            range_end,
            count_only: true,
            ..Default::default()
        })?;
        Ok(u64::try_from(response.count).unwrap_or(0))
    }
}
