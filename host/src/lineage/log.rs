//! Merkle logs over lineage records, signed checkpoints, exports and their offline check.
//!
//! Each scope's records, in revision order, are the leaves of an RFC 6962 Merkle tree (SHA-256,
//! as in Certificate Transparency; `ct-merkle`). A checkpoint is a replica's ed25519 signature
//! over (scope, size, the revision of the last record covered, root). Every checkpoint is also
//! appended to the root log, whose own signed checkpoint therefore commits to every scope's
//! checkpoints.

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{InclusionProof, RootHash};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::Record;

/// The scope name of the root log's checkpoints.
pub const ROOT_LOG: &str = "@root";

/// A signed (scope, size, root).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Checkpoint {
    /// The scope, or [`ROOT_LOG`].
    pub scope: String,
    /// Leaves covered.
    pub size: u64,
    /// The revision of the last record covered: the log's records at or before it are exactly
    /// the `size` leaves (0 for the root log and for an empty log).
    #[serde(default)]
    pub revision: i64,
    /// The RFC 6962 tree hash of those leaves (hex).
    pub root: String,
    /// When it was signed (Unix milliseconds).
    pub time_ms: u64,
    /// The signing replica's public key (hex).
    pub signer: String,
    /// ed25519 over [`checkpoint_message`] (hex).
    pub signature: String,
}

/// What a checkpoint signature covers.
pub fn checkpoint_message(scope: &str, size: u64, revision: i64, root: &str, time_ms: u64) -> Vec<u8> {
    let mut message = b"aq lineage checkpoint v2\0".to_vec();
    message.extend_from_slice(&(scope.len() as u32).to_le_bytes());
    message.extend_from_slice(scope.as_bytes());
    message.extend_from_slice(&size.to_le_bytes());
    message.extend_from_slice(&revision.to_le_bytes());
    message.extend_from_slice(root.as_bytes());
    message.extend_from_slice(&time_ms.to_le_bytes());
    message
}

/// The Merkle tree of `leaves`.
pub fn tree(leaves: &[Vec<u8>]) -> MemoryBackedTree<Sha256, Vec<u8>> {
    let mut tree = MemoryBackedTree::new();
    for leaf in leaves {
        tree.push(leaf.clone());
    }
    tree
}

/// The tree hash of `leaves`, hex.
pub fn root_hex(leaves: &[Vec<u8>]) -> String {
    hex::encode(tree(leaves).root().as_bytes())
}

/// A growing log's tree hash without its leaves: the roots of the perfect subtrees its leaves
/// fill, largest first (one per set bit of the size). Appending costs O(log n) hashes and the
/// state O(log n) memory, so a replica checkpoints a log of millions of records by reading
/// only the records added since its last pass. Gives the same root as [`tree`]; the leaves
/// stay in etcd for exports and proofs.
#[derive(Clone, Debug, Default)]
pub struct Frontier {
    size: u64,
    peaks: Vec<[u8; 32]>,
}

impl Frontier {
    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf.
    pub fn push(&mut self, leaf: &[u8]) {
        let mut hash = rfc6962_hash(&[&[0], leaf]);
        // Each trailing one bit of the old size is a peak of the same height as the new
        // subtree: merge them, smallest first.
        let mut filled = self.size;
        while filled & 1 == 1 {
            let left = self.peaks.pop().expect("a peak per set bit of the size");
            hash = rfc6962_hash(&[&[1], &left, &hash]);
            filled >>= 1;
        }
        self.peaks.push(hash);
        self.size += 1;
    }

    /// The RFC 6962 tree hash of the leaves so far, hex.
    pub fn root_hex(&self) -> String {
        let mut peaks = self.peaks.iter().rev();
        let root = match peaks.next() {
            None => rfc6962_hash(&[]),
            Some(last) => peaks.fold(*last, |right, left| rfc6962_hash(&[&[1], left, &right])),
        };
        hex::encode(root)
    }
}

fn rfc6962_hash(parts: &[&[u8]]) -> [u8; 32] {
    use sha2::Digest;
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

impl Checkpoint {
    /// Signs a checkpoint of `leaves` for `scope` (the root log: no revisions).
    pub fn sign(key: &SigningKey, scope: &str, leaves: &[Vec<u8>], time_ms: u64) -> Checkpoint {
        Checkpoint::sign_root(key, scope, leaves.len() as u64, 0, root_hex(leaves), time_ms)
    }

    /// Signs a checkpoint of a log of `size` leaves, the last written at `revision`, whose tree
    /// hash is `root` (hex).
    pub fn sign_root(key: &SigningKey, scope: &str, size: u64, revision: i64, root: String, time_ms: u64) -> Checkpoint {
        let signature = key.sign(&checkpoint_message(scope, size, revision, &root, time_ms));
        Checkpoint {
            scope: scope.to_string(),
            size,
            revision,
            root,
            time_ms,
            signer: hex::encode(key.verifying_key().as_bytes()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// Checks the signature (and, when `trusted` is not empty, that the signer is trusted).
    pub fn check_signature(&self, trusted: &[VerifyingKey]) -> Result<(), String> {
        let key = crate::trust::parse_public_key(&self.signer)?;
        if !trusted.is_empty() && !trusted.contains(&key) {
            return Err(format!("checkpoint of {} (size {}) is signed by {}, which is not trusted", self.scope, self.size, self.signer));
        }
        let signature: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| format!("checkpoint of {} (size {}): the signature is not 64 bytes of hex", self.scope, self.size))?;
        key.verify_strict(
            &checkpoint_message(&self.scope, self.size, self.revision, &self.root, self.time_ms),
            &Signature::from_bytes(&signature),
        )
            .map_err(|_| format!("checkpoint of {} (size {}): the signature does not verify", self.scope, self.size))
    }
}

/// A record as exported: where it was and what it held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportedRecord {
    /// Its etcd key's id part.
    pub id: String,
    /// The revision that last wrote it.
    pub revision: i64,
    /// How many times it was written (etcd's `version`): 1 for a record as aq wrote it.
    pub version: i64,
    /// The stored bytes (the record's JSON).
    pub record: String,
}

/// Everything needed to check a scope's lineage offline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Export {
    /// Format version (1).
    pub v: u8,
    /// The scope.
    pub scope: String,
    /// Its records, in revision order.
    pub records: Vec<ExportedRecord>,
    /// Its checkpoints, oldest first.
    pub checkpoints: Vec<Checkpoint>,
    /// The root log: every checkpoint of every scope, in the order appended.
    pub root_log: Vec<Checkpoint>,
    /// A checkpoint of the root log.
    pub root_checkpoint: Checkpoint,
    /// Every key of the scope as it stands, with the revision that last wrote it: a write at a
    /// revision no record holds went around aq, or lost its record.
    #[serde(default)]
    pub writes: Vec<ExportedWrite>,
}

/// A key of the exported scope and the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportedWrite {
    /// The key (hex).
    pub key: String,
    /// Its mod revision.
    pub revision: i64,
}

/// What a clean export holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// Records checked.
    pub records: u64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// The keys that signed them.
    pub signers: Vec<String>,
}

/// Why an export does not verify, naming the record when one is to blame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", .record.map(|s| format!("record {s}: ")).unwrap_or_default())]
pub struct VerifyError {
    /// The record's position in the log (revision order).
    pub record: Option<u64>,
    /// What is wrong.
    pub message: String,
}

fn fail(record: Option<u64>, message: impl Into<String>) -> VerifyError {
    VerifyError { record, message: message.into() }
}

/// Checks an export: each record written once, with its own revision, in revision order;
/// every checkpoint's signature, and that the records at or before its revision are exactly the
/// leaves it signed; and the root log. `trusted`, when not empty, are the only keys checkpoints
/// may be signed by.
pub fn verify(export: &Export, trusted: &[VerifyingKey]) -> Result<Verified, VerifyError> {
    verify_with_progress(export, trusted, &mut |_| {})
}

/// [`verify`], telling `progress` how many records have been read so far.
pub fn verify_with_progress(
    export: &Export,
    trusted: &[VerifyingKey],
    progress: &mut dyn FnMut(u64),
) -> Result<Verified, VerifyError> {
    let mut leaves: Vec<Vec<u8>> = Vec::with_capacity(export.records.len());
    for (i, exported) in export.records.iter().enumerate() {
        let i = i as u64;
        if i.is_multiple_of(256) {
            progress(i);
        }
        let record: Record = serde_json::from_str(&exported.record)
            .map_err(|e| fail(Some(i), format!("{}: does not parse as a lineage record: {e}", exported.id)))?;
        if record.id != exported.id || record.scope != export.scope {
            return Err(fail(
                Some(i),
                format!("{}: altered: it claims to be record {} of scope {}", exported.id, record.id, record.scope),
            ));
        }
        if exported.version != 1 {
            return Err(fail(
                Some(i),
                format!(
                    "{}: altered: written {} times (last at revision {}); aq writes a record once, with its write",
                    exported.id, exported.version, exported.revision
                ),
            ));
        }
        if let Some(before) = i.checked_sub(1).map(|b| &export.records[b as usize])
            && exported.revision <= before.revision
        {
            return Err(fail(
                Some(i),
                format!("{}: out of order: revision {} is not after record {}'s {}", exported.id, exported.revision, i - 1, before.revision),
            ));
        }
        leaves.push(exported.record.as_bytes().to_vec());
    }
    // The records as far as the last checkpoint that matched: a mismatch lies after it.
    let mut matched = 0u64;
    let mut signers: Vec<String> = Vec::new();
    for checkpoint in &export.checkpoints {
        checkpoint.check_signature(trusted).map_err(|e| fail(None, e))?;
        if checkpoint.scope != export.scope {
            return Err(fail(None, format!("a checkpoint of scope {} is in the export of {}", checkpoint.scope, export.scope)));
        }
        let size = checkpoint.size as usize;
        let covered = export.records.partition_point(|r| r.revision <= checkpoint.revision);
        let window = if checkpoint.size > matched {
            format!("records {matched} to {} (through revision {})", checkpoint.size - 1, checkpoint.revision)
        } else {
            format!("the first {size} records (through revision {})", checkpoint.revision)
        };
        if covered < size {
            return Err(fail(
                Some(matched.min(covered as u64)),
                format!("missing: a checkpoint signed {size} records through revision {}, but {covered} remain; the gap is among {window}", checkpoint.revision),
            ));
        }
        if covered > size || root_hex(&leaves[..size]) != checkpoint.root {
            return Err(fail(
                Some(matched),
                format!("altered: {window} do not match the checkpoint of size {size} (root {})", checkpoint.root),
            ));
        }
        matched = matched.max(checkpoint.size);
        if !export.root_log.contains(checkpoint) {
            return Err(fail(None, format!("the checkpoint of size {size} is not in the root log")));
        }
        if !signers.contains(&checkpoint.signer) {
            signers.push(checkpoint.signer.clone());
        }
    }
    check_writes(export)?;
    let root = &export.root_checkpoint;
    root.check_signature(trusted).map_err(|e| fail(None, e))?;
    let root_leaves: Vec<Vec<u8>> =
        export.root_log.iter().take(root.size as usize).map(|c| serde_json::to_vec(c).expect("JSON")).collect();
    if root.scope != ROOT_LOG || root_leaves.len() as u64 != root.size || root_hex(&root_leaves) != root.root {
        return Err(fail(None, "the root log does not match its checkpoint"));
    }
    progress(leaves.len() as u64);
    Ok(Verified { records: leaves.len() as u64, checkpoints: export.checkpoints.len(), signers })
}

/// Every key last written since the log's first record must have been written with a record:
/// aq writes a write's record in its Txn, so they share a revision. Keys last written before the
/// first record predate the log and are not judged; nor is a log without records, whose policy
/// keeps none.
fn check_writes(export: &Export) -> Result<(), VerifyError> {
    let Some(first) = export.records.first().map(|r| r.revision) else { return Ok(()) };
    for write in &export.writes {
        if write.revision >= first && export.records.binary_search_by_key(&write.revision, |r| r.revision).is_err() {
            let key = hex::decode(&write.key).map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_else(|_| write.key.clone());
            return Err(fail(
                None,
                format!(
                    "unrecorded write: key {key:?} was last written at revision {}, which no lineage record holds; \
                     it was written around aq, or its record was deleted",
                    write.revision
                ),
            ));
        }
    }
    Ok(())
}

/// An inclusion proof of record `index` in a log of `leaves`, checked before it is returned.
pub fn prove(leaves: &[Vec<u8>], index: usize) -> Option<(String, String)> {
    if index >= leaves.len() {
        return None;
    }
    let tree = tree(leaves);
    let proof = tree.prove_inclusion(index);
    let root: RootHash<Sha256> = tree.root();
    root.verify_inclusion(&leaves[index], index as u64, &proof).ok()?;
    Some((hex::encode(root.as_bytes()), hex::encode(proof.as_bytes())))
}

/// Checks an inclusion proof (hex) of `leaf` at `index` in a log of `size` with root `root`.
pub fn check_proof(leaf: &[u8], index: u64, size: u64, root: &str, proof: &str) -> Result<(), String> {
    let root_bytes = hex::decode(root).map_err(|e| format!("root: {e}"))?;
    let digest = ct_merkle::digest::Output::<Sha256>::try_from(root_bytes.as_slice()).map_err(|_| "root: not 32 bytes".to_string())?;
    let root = RootHash::<Sha256>::new(digest, size);
    let proof = InclusionProof::<Sha256>::try_from_bytes(hex::decode(proof).map_err(|e| format!("proof: {e}"))?)
        .map_err(|e| format!("proof: {e:?}"))?;
    root.verify_inclusion(&leaf.to_vec(), index, &proof).map_err(|e| format!("the proof does not verify: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontier_has_the_root_of_the_whole_tree_at_every_size() {
        let leaves: Vec<Vec<u8>> = (0..70u32).map(|i| format!("record {i}").into_bytes()).collect();
        let mut frontier = Frontier::default();
        assert_eq!(frontier.root_hex(), root_hex(&[]), "the empty log");
        for (n, leaf) in leaves.iter().enumerate() {
            frontier.push(leaf);
            assert_eq!(frontier.size(), n as u64 + 1);
            assert_eq!(frontier.root_hex(), root_hex(&leaves[..=n]), "size {}", n + 1);
        }
    }
}
