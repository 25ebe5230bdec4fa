//! The canonical digest of a signed request: what a principal's signature covers.
//!
//! blake3 in key-derivation mode with the context string [`DOMAIN`] (domain separation: a
//! signature over this digest cannot be mistaken for any other aq or non-aq signature), over
//! this encoding, integers little-endian, byte strings as a u32 length then the bytes:
//!
//! ```text
//! u64 cluster id                 (the meta group's etcd cluster id; Maintenance.Status reports it)
//! bytes scope id
//! u32 op count, then per op in request order (a Txn: success branch, then failure branch):
//!     u8 1 (put): bytes key, [32] blake3(value), i64 lease, u8 ignore_value, u8 ignore_lease
//!     u8 2 (delete range): bytes key, bytes range_end
//! u32 compare count, then per compare: bytes key, bytes range_end, u8 result, then
//!     u8 0 version | 1 create revision | 2 mod revision | 4 lease: i64
//!     u8 3 value: [32] blake3(value)
//! bytes nonce
//! u64 not-after (Unix seconds)
//! ```
//!
//! Values appear only as their blake3 hashes, so a signer can sign without holding the value
//! in the same place, and the digest of a large value costs one hash.

use aq_sdk as m;

/// The blake3 key-derivation context of request digests.
pub const DOMAIN: &str = "aq signed request v1";

/// What a signature is bound to besides the request itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The meta group's cluster id.
    pub cluster_id: u64,
    /// The scope owning the request's keys.
    pub scope: String,
    /// A value the signer never reuses (16 random bytes are plenty).
    pub nonce: Vec<u8>,
    /// After this Unix second the signature is no longer accepted.
    pub not_after: u64,
}

struct Encoder(blake3::Hasher);

impl Encoder {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u32).to_le_bytes());
        self.0.update(bytes);
    }
    fn u8(&mut self, v: u8) {
        self.0.update(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.0.update(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.update(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.update(&v.to_le_bytes());
    }
    fn hash(&mut self, bytes: &[u8]) {
        self.0.update(blake3::hash(bytes).as_bytes());
    }
}

/// The digest a signature over `ops` and `compares` in `envelope` signs.
pub fn request_digest(envelope: &Envelope, ops: &[m::Op], compares: &[m::Compare]) -> [u8; 32] {
    let mut e = Encoder(blake3::Hasher::new_derive_key(DOMAIN));
    e.u64(envelope.cluster_id);
    e.bytes(envelope.scope.as_bytes());
    e.u32(ops.len() as u32);
    for op in ops {
        match op {
            m::Op::Put(put) => {
                e.u8(1);
                e.bytes(&put.key);
                e.hash(&put.value);
                e.i64(put.lease);
                e.u8(put.ignore_value.into());
                e.u8(put.ignore_lease.into());
            }
            m::Op::DeleteRange(delete) => {
                e.u8(2);
                e.bytes(&delete.key);
                e.bytes(&delete.range_end);
            }
        }
    }
    e.u32(compares.len() as u32);
    for compare in compares {
        e.bytes(&compare.key);
        e.bytes(&compare.range_end);
        e.u8(match compare.result {
            m::CompareResult::Equal => 0,
            m::CompareResult::Greater => 1,
            m::CompareResult::Less => 2,
            m::CompareResult::NotEqual => 3,
        });
        match &compare.target {
            m::CompareTarget::Version(v) => {
                e.u8(0);
                e.i64(*v);
            }
            m::CompareTarget::CreateRevision(v) => {
                e.u8(1);
                e.i64(*v);
            }
            m::CompareTarget::ModRevision(v) => {
                e.u8(2);
                e.i64(*v);
            }
            m::CompareTarget::Value(value) => {
                e.u8(3);
                e.hash(value);
            }
            m::CompareTarget::Lease(v) => {
                e.u8(4);
                e.i64(*v);
            }
        }
    }
    e.bytes(&envelope.nonce);
    e.u64(envelope.not_after);
    *e.0.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> m::Op {
        m::Op::Put(m::PutOp { key: key.into(), value: value.into(), ..Default::default() })
    }

    fn envelope() -> Envelope {
        Envelope { cluster_id: 7, scope: "secrets".into(), nonce: vec![1; 16], not_after: 1_800_000_000 }
    }

    #[test]
    fn every_part_of_the_request_changes_the_digest() {
        let base = request_digest(&envelope(), &[put("/a", "v")], &[]);
        assert_eq!(base, request_digest(&envelope(), &[put("/a", "v")], &[]), "deterministic");
        let mut other = envelope();
        other.cluster_id = 8;
        assert_ne!(base, request_digest(&other, &[put("/a", "v")], &[]));
        let mut other = envelope();
        other.scope = "registry".into();
        assert_ne!(base, request_digest(&other, &[put("/a", "v")], &[]));
        let mut other = envelope();
        other.nonce[0] = 2;
        assert_ne!(base, request_digest(&other, &[put("/a", "v")], &[]));
        let mut other = envelope();
        other.not_after += 1;
        assert_ne!(base, request_digest(&other, &[put("/a", "v")], &[]));
        assert_ne!(base, request_digest(&envelope(), &[put("/a", "w")], &[]));
        assert_ne!(base, request_digest(&envelope(), &[put("/b", "v")], &[]));
        let compare = m::Compare {
            key: "/a".into(),
            range_end: m::Bytes::default(),
            result: m::CompareResult::Equal,
            target: m::CompareTarget::Version(0),
        };
        assert_ne!(base, request_digest(&envelope(), &[put("/a", "v")], &[compare]));
        // Length prefixes keep field boundaries: moving a byte from key to range end changes it.
        let delete = |key: &str, end: &str| m::Op::DeleteRange(m::DeleteRangeOp { key: key.into(), range_end: end.into() });
        assert_ne!(
            request_digest(&envelope(), &[delete("/ab", "c")], &[]),
            request_digest(&envelope(), &[delete("/a", "bc")], &[])
        );
    }
}
