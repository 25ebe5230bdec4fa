//! `HashKV` over the keyspace aq serves. etcd's own hash covers one member's whole store (aq's
//! reserved records, other scopes' copies in mid-move, and revisions no client sees), so aq
//! hashes what its clients can read instead: every scope in key order, each read in pages at
//! one revision, each key-value with the revisions the scope shows. Two replicas on one layout
//! give one hash for one state, whatever group holds each scope.

use etcd_client::proto as pb;

use super::{GateError, Gateway};
use crate::index::KeyRange;

/// Keys read per page.
const PAGE: i64 = 1000;

/// What [`Gateway::hash_kv`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyspaceHash {
    /// The first four bytes of the BLAKE3 digest, little-endian: etcd's hash field is 32 bits.
    pub hash: u32,
    /// The highest revision hashed, over every scope.
    pub revision: i64,
    /// How many key-values it covers.
    pub keys: u64,
}

impl Gateway {
    /// Hashes every key clients can read at `revision` (0: each scope as it stands now).
    pub async fn hash_kv(&self, revision: i64) -> Result<KeyspaceHash, GateError> {
        let routing = self.routing();
        let mut hasher = blake3::Hasher::new();
        let mut highest = 0;
        let mut keys = 0u64;
        let everything = KeyRange { start: vec![0], end: Vec::new() };
        let field = |hasher: &mut blake3::Hasher, bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        for (runtime, part) in routing.parts(&everything) {
            field(&mut hasher, runtime.scope.id.as_bytes());
            let (mut key, range_end) = part.to_request();
            let mut at = revision;
            loop {
                let request = pb::PbRangeRequest {
                    key: key.clone(),
                    range_end: range_end.clone(),
                    limit: PAGE,
                    revision: at,
                    ..Default::default()
                };
                let page = self.range(request).await?;
                if at == 0 {
                    at = page.header.as_ref().map(|h| h.revision).unwrap_or_default();
                }
                for kv in &page.kvs {
                    field(&mut hasher, &kv.key);
                    field(&mut hasher, &kv.value);
                    for number in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
                        hasher.update(&number.to_le_bytes());
                    }
                    keys += 1;
                }
                match (page.more, page.kvs.last()) {
                    (true, Some(last)) => {
                        key = last.key.clone();
                        key.push(0);
                    }
                    _ => break,
                }
            }
            highest = highest.max(at);
        }
        let digest = hasher.finalize();
        let hash = u32::from_le_bytes(digest.as_bytes()[..4].try_into().expect("4 bytes"));
        Ok(KeyspaceHash { hash, revision: highest, keys })
    }
}
