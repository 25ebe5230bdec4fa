//! Step 2, verify: a signed request's signatures become the credentials its policy sees, and
//! its nonce is recorded with the write so that a replay, through any replica, fails.

use aq_sdk as m;
use etcd_client::proto as pb;

use super::send::with_reserved;
use super::{Caller, GateError, Gateway, ScopeRuntime};

/// Where a signed write's nonce is recorded in its scope's group, until its not-after passes:
/// `\xffaq/nonce/<not-after, 20 decimal digits>/<nonce hex>`. Keys sort by expiry, so one
/// DeleteRange sweeps every expired nonce ([`Gateway::sweep_nonces`]). A replay carries the
/// same signed not-after, so it finds the same key.
pub(super) fn nonce_key(nonce: &[u8], not_after: u64) -> Vec<u8> {
    let mut key = nonce_expiry_bound(not_after);
    key.push(b'/');
    key.extend_from_slice(hex::encode(nonce).as_bytes());
    key
}

/// Where the nonce keys start.
pub(super) fn nonce_prefix() -> Vec<u8> {
    [crate::index::RESERVED_PREFIX, b"nonce/"].concat()
}

/// The first nonce key of signatures expiring at `not_after`.
pub(super) fn nonce_expiry_bound(not_after: u64) -> Vec<u8> {
    let mut key = nonce_prefix();
    key.extend_from_slice(format!("{not_after:020}").as_bytes());
    key
}

impl Gateway {
    /// Verifies `caller`'s signatures over `context`'s ops and compares, for the scope, and
    /// gives the context the principals they prove. Unsigned requests carry none.
    pub(super) async fn verify(&self, runtime: &ScopeRuntime, context: &mut m::Context, caller: &Caller) -> Result<(), GateError> {
        if let Some(signed) = &caller.signed {
            let now = crate::clock::unix_now();
            context.credentials =
                self.trust.verify(&runtime.scope.id, &context.ops, &context.compares, signed, now).await?;
        }
        Ok(())
    }

    /// Whether the signed request's nonce is already recorded in the scope's group: after a
    /// failed guard, that tells a replay from a policy read that moved.
    pub(super) async fn replayed(&self, runtime: &ScopeRuntime, caller: &Caller) -> Result<(), GateError> {
        if let Some(signed) = &caller.signed {
            let key = nonce_key(&signed.nonce, signed.not_after);
            let seen = runtime.group.range(pb::PbRangeRequest { key, count_only: true, ..Default::default() }).await?;
            if seen.count > 0 {
                return Err(crate::trust::TrustError::Replayed(hex::encode(&signed.nonce)).into());
            }
        }
        Ok(())
    }

    /// Deletes recorded nonces whose signatures have expired, on every group: one DeleteRange
    /// per group, from the first nonce key up to those expiring now.
    pub async fn sweep_nonces(&self) {
        let expired_before = nonce_expiry_bound(crate::clock::unix_now());
        for group in self.groups.load_full().values() {
            let request = pb::PbDeleteRequest { key: nonce_prefix(), range_end: expired_before.clone(), prev_kv: false };
            if let Err(e) = group.delete_range(request).await {
                tracing::warn!(group = group.name(), "cannot sweep expired nonces: {}", e.message());
            }
        }
    }
}

/// `op` with the signed request's nonce recorded beside it, and the guard that it is new to the
/// scope's group; `op` alone when unsigned.
pub(super) fn with_nonce(op: pb::PbTxnOpRequest, caller: &Caller, guards: &mut Vec<pb::PbCompare>) -> pb::PbTxnOpRequest {
    match &caller.signed {
        Some(signed) => {
            let key = nonce_key(&signed.nonce, signed.not_after);
            guards.push(crate::meta::compare_unchanged(key.clone(), 0));
            with_reserved(op, key, Vec::new())
        }
        None => op,
    }
}
