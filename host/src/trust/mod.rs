//! Principals and signed requests. A request may carry ed25519 signatures over its canonical
//! digest ([`digest`]); aq verifies them before the policy runs and hands the policy the
//! verified principals only, each once however many of its keys signed.
//!
//! On the etcd API the signatures travel in gRPC metadata:
//!
//! | header          | value                                                      |
//! |-----------------|------------------------------------------------------------|
//! | `aq-nonce`      | hex, 8 to 64 bytes the signer never reuses                 |
//! | `aq-not-after`  | Unix seconds; at most [`MAX_VALIDITY`] ahead of aq's clock |
//! | `aq-signature`  | `<public key hex>:<signature hex>`, once per signature     |
//! | `aq-wait`       | optional: seconds to wait for a proposal's outcome         |
//!
//! Nonces are remembered until their not-after passes, so a signed request is accepted once.

pub mod anchor;
mod batch;
pub mod digest;
pub mod proposal;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use aq_sdk as m;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

pub use digest::{Envelope, request_digest};

/// gRPC metadata header of the nonce.
pub const NONCE_HEADER: &str = "aq-nonce";
/// gRPC metadata header of the not-after time.
pub const NOT_AFTER_HEADER: &str = "aq-not-after";
/// gRPC metadata header of one signature (repeated for several).
pub const SIGNATURE_HEADER: &str = "aq-signature";
/// gRPC metadata header asking aq to wait up to this many seconds for a proposal's outcome.
pub const WAIT_HEADER: &str = "aq-wait";
/// The longest a signature may stay valid: nonces are remembered this long at most.
pub const MAX_VALIDITY: Duration = Duration::from_secs(15 * 60);

/// Someone who can sign: an id, public keys and roles. Stored in the meta group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// Stable id, as policies name it (`alice`, `ci:deploy`, `anchor:gw-1`).
    pub id: String,
    /// ed25519 public keys, hex; a signature by any of them is this principal's.
    pub keys: Vec<String>,
    /// Roles policies check.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl Principal {
    /// Checks the id and keys; returns the parsed keys.
    pub fn validate(&self) -> Result<Vec<VerifyingKey>, String> {
        if self.id.is_empty() || self.id.len() > 128 || self.id.chars().any(|c| c.is_control() || c == '/') {
            return Err(format!("principal id {:?} must be 1 to 128 characters without '/' or control characters", self.id));
        }
        if self.keys.is_empty() {
            return Err(format!("principal {} has no keys; give at least one ed25519 public key (hex)", self.id));
        }
        self.keys.iter().map(|key| parse_public_key(key).map_err(|e| format!("principal {}: {e}", self.id))).collect()
    }
}

/// Reads the ed25519 key at `path` (hex), or creates it (mode 0600) when the file is missing.
/// The public key is kept beside it in `<path>.pub`, for operators to pin.
pub fn load_or_create_key(path: &std::path::Path) -> Result<SigningKey, String> {
    let key = read_or_create_key(path)?;
    let public = std::path::PathBuf::from(format!("{}.pub", path.display()));
    if !public.exists() {
        std::fs::write(&public, format!("{}\n", hex::encode(key.verifying_key().as_bytes())))
            .map_err(|e| format!("cannot write {}: {e}", public.display()))?;
    }
    Ok(key)
}

fn read_or_create_key(path: &std::path::Path) -> Result<SigningKey, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("{} is not an ed25519 private key (64 hex digits)", path.display()))?;
            return Ok(SigningKey::from_bytes(&bytes));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("the system random source failed: {e}"))?;
    crate::private_file::create(path, format!("{}\n", hex::encode(secret)).as_bytes())?;
    Ok(SigningKey::from_bytes(&secret))
}

/// Parses a hex ed25519 public key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{:?} is not an ed25519 public key (64 hex digits)", text.trim()))?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("{} is not a valid ed25519 public key: {e}", text.trim()))?;
    if key.is_weak() {
        // A small-order key: signatures by it verify for many messages.
        return Err(format!("{} is a weak ed25519 public key (of small order); generate a key pair with `aq keys gen`", text.trim()));
    }
    Ok(key)
}

/// One signature of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySignature {
    /// The signer's public key.
    pub key: [u8; 32],
    /// The ed25519 signature over the request digest.
    pub signature: [u8; 64],
}

impl KeySignature {
    /// The [`SIGNATURE_HEADER`] value: `<public key hex>:<signature hex>`.
    pub fn header_value(&self) -> String {
        format!("{}:{}", hex::encode(self.key), hex::encode(self.signature))
    }
}

/// What a signed request carries besides the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedRequest {
    /// The signer's nonce.
    pub nonce: Vec<u8>,
    /// Unix seconds after which the signatures are refused.
    pub not_after: u64,
    /// The signatures.
    pub signatures: Vec<KeySignature>,
}

impl SignedRequest {
    /// Reads the headers; `None` when the request carries no signature headers at all.
    pub fn from_headers<'a>(
        nonce: Option<&str>,
        not_after: Option<&str>,
        signatures: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Self>, TrustError> {
        let signatures: Vec<&str> = signatures.into_iter().collect();
        if nonce.is_none() && not_after.is_none() && signatures.is_empty() {
            return Ok(None);
        }
        let malformed = |what: String| TrustError::Malformed(what);
        let nonce = nonce.ok_or_else(|| malformed(format!("{NONCE_HEADER} is missing")))?;
        let nonce = hex::decode(nonce.trim())
            .ok()
            .filter(|n| (8..=64).contains(&n.len()))
            .ok_or_else(|| malformed(format!("{NONCE_HEADER} must be 8 to 64 bytes in hex")))?;
        let not_after = not_after
            .ok_or_else(|| malformed(format!("{NOT_AFTER_HEADER} is missing")))?
            .trim()
            .parse::<u64>()
            .map_err(|_| malformed(format!("{NOT_AFTER_HEADER} must be Unix seconds")))?;
        if signatures.is_empty() {
            return Err(malformed(format!("{SIGNATURE_HEADER} is missing")));
        }
        let signatures = signatures
            .into_iter()
            .map(|value| {
                let (key, signature) = value.trim().split_once(':').ok_or_else(|| {
                    malformed(format!("{SIGNATURE_HEADER} must be <public key hex>:<signature hex>"))
                })?;
                let key = hex::decode(key).ok().and_then(|k| k.try_into().ok());
                let signature = hex::decode(signature).ok().and_then(|s| s.try_into().ok());
                match (key, signature) {
                    (Some(key), Some(signature)) => Ok(KeySignature { key, signature }),
                    _ => Err(malformed(format!("{SIGNATURE_HEADER}: a 32-byte key and a 64-byte signature, in hex"))),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(SignedRequest { nonce, not_after, signatures }))
    }

    /// The headers carrying this request's signatures.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![(NONCE_HEADER, hex::encode(&self.nonce)), (NOT_AFTER_HEADER, self.not_after.to_string())];
        for s in &self.signatures {
            headers.push((SIGNATURE_HEADER, s.header_value()));
        }
        headers
    }

    /// Signs `ops` and `compares` for `scope` with every key in `keys`.
    pub fn sign(
        keys: &[SigningKey],
        cluster_id: u64,
        scope: &str,
        ops: &[m::Op],
        compares: &[m::Compare],
        validity: Duration,
    ) -> Result<Self, String> {
        let mut nonce = vec![0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| format!("the system random source failed: {e}"))?;
        let not_after = crate::clock::unix_now() + validity.as_secs();
        let envelope = Envelope { cluster_id, scope: scope.to_string(), nonce, not_after };
        let digest = request_digest(&envelope, ops, compares);
        let signatures = keys
            .iter()
            .map(|key| KeySignature { key: key.verifying_key().to_bytes(), signature: key.sign(&digest).to_bytes() })
            .collect();
        Ok(SignedRequest { nonce: envelope.nonce, not_after, signatures })
    }
}

/// Why signatures were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The signature headers do not parse.
    #[error("malformed signature headers: {0}")]
    Malformed(String),
    /// No principal has the key.
    #[error("no principal has the public key {0}; add it with `aq principals add`")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the signature by {principal} (key {key}) does not match this request; sign exactly what is sent, for scope {scope}")]
    BadSignature {
        /// The principal.
        principal: String,
        /// The key, hex.
        key: String,
        /// The scope the digest was computed for.
        scope: String,
    },
    /// Too late.
    #[error("the signatures expired at {not_after} (Unix seconds; aq's clock reads {now}); sign again")]
    Expired {
        /// The request's not-after.
        not_after: u64,
        /// aq's time.
        now: u64,
    },
    /// Valid for longer than aq remembers nonces.
    #[error("not-after {not_after} is more than {} s ahead of aq's clock ({now}); sign with a shorter validity", MAX_VALIDITY.as_secs())]
    TooLong {
        /// The request's not-after.
        not_after: u64,
        /// aq's time.
        now: u64,
    },
    /// The nonce was used before.
    #[error("replayed: nonce {0} was already used by an accepted request; sign again with a fresh nonce")]
    Replayed(String),
}

/// Nonces seen, kept until their not-after passes.
#[derive(Default)]
struct Nonces {
    seen: HashMap<Vec<u8>, u64>,
    by_expiry: BTreeMap<u64, Vec<Vec<u8>>>,
}

impl Nonces {
    /// Records `nonce`; false when it is already recorded.
    fn insert(&mut self, nonce: &[u8], not_after: u64, now: u64) -> bool {
        let expired: Vec<u64> = self.by_expiry.range(..now).map(|(t, _)| *t).collect();
        for t in expired {
            for old in self.by_expiry.remove(&t).unwrap_or_default() {
                self.seen.remove(&old);
            }
        }
        if self.seen.contains_key(nonce) {
            return false;
        }
        self.seen.insert(nonce.to_vec(), not_after);
        self.by_expiry.entry(not_after).or_default().push(nonce.to_vec());
        true
    }
}

/// The verified identities of a request, each principal once.
pub type Credentials = Vec<m::Credential>;

/// Each known public key's principal and decompressed key.
type KeyIndex = HashMap<[u8; 32], (Arc<Principal>, VerifyingKey)>;

/// Principals by key, and the nonces seen: one per gateway replica.
pub struct Trust {
    cluster_id: u64,
    /// Each known key, decompressed once, with its principal.
    keys: ArcSwap<KeyIndex>,
    nonces: Mutex<Nonces>,
    batcher: Arc<batch::Batcher>,
}

impl Trust {
    /// Trust for the cluster `cluster_id` (the meta group's etcd cluster id), with no principals.
    pub fn new(cluster_id: u64) -> Self {
        Trust { cluster_id, keys: ArcSwap::from_pointee(HashMap::new()), nonces: Mutex::default(), batcher: Arc::default() }
    }

    /// The cluster id signatures are bound to.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Replaces the known principals.
    pub fn set_principals(&self, principals: &[Principal]) {
        let mut keys = HashMap::new();
        for principal in principals {
            let principal = Arc::new(principal.clone());
            for key in principal.validate().unwrap_or_default() {
                keys.insert(key.to_bytes(), (principal.clone(), key));
            }
        }
        self.keys.store(Arc::new(keys));
    }

    /// The principal owning a public key.
    pub fn principal_of(&self, key: &[u8; 32]) -> Option<Arc<Principal>> {
        self.keys.load().get(key).map(|(principal, _)| principal.clone())
    }

    /// Every known principal, by id.
    pub fn principals_by_id(&self) -> HashMap<String, Arc<Principal>> {
        self.keys.load().values().map(|(p, _)| (p.id.clone(), p.clone())).collect()
    }

    /// Verifies every signature of a request for `scope` at Unix second `now` and uses up its
    /// nonce; returns the distinct principals that signed, in order of first signature. The
    /// signatures are verified in a batch with those of concurrent requests.
    pub async fn verify(
        &self,
        scope: &str,
        ops: &[m::Op],
        compares: &[m::Compare],
        signed: &SignedRequest,
        now: u64,
    ) -> Result<Credentials, TrustError> {
        let resolved = self.resolve(scope, ops, compares, signed, now)?;
        if !self.batcher.verify(resolved.signed).await {
            // Name the signature that does not verify.
            self.check(scope, ops, compares, signed, now)?;
        }
        // Only a request whose signatures all verify uses up its nonce.
        if !self.nonces.lock().expect("nonce lock").insert(&signed.nonce, signed.not_after, now) {
            return Err(TrustError::Replayed(hex::encode(&signed.nonce)));
        }
        Ok(resolved.credentials)
    }

    /// [`Trust::verify`] without using up the nonce, one signature at a time: for a request
    /// another replica received (an anchor co-signing it) or signatures this replica asked for.
    pub fn check(
        &self,
        scope: &str,
        ops: &[m::Op],
        compares: &[m::Compare],
        signed: &SignedRequest,
        now: u64,
    ) -> Result<Credentials, TrustError> {
        let Resolved { credentials, signed: signatures, signers } = self.resolve(scope, ops, compares, signed, now)?;
        for ((key, signature), principal) in signatures.signatures.iter().zip(signers) {
            key.verify_strict(&signatures.digest, signature).map_err(|_| TrustError::BadSignature {
                principal: principal.id.clone(),
                key: hex::encode(key.as_bytes()),
                scope: scope.to_string(),
            })?;
        }
        Ok(credentials)
    }

    /// Checks a request's validity period and finds the principal of every signature.
    fn resolve(
        &self,
        scope: &str,
        ops: &[m::Op],
        compares: &[m::Compare],
        signed: &SignedRequest,
        now: u64,
    ) -> Result<Resolved, TrustError> {
        if signed.not_after < now {
            return Err(TrustError::Expired { not_after: signed.not_after, now });
        }
        if signed.not_after > now + MAX_VALIDITY.as_secs() {
            return Err(TrustError::TooLong { not_after: signed.not_after, now });
        }
        let envelope =
            Envelope { cluster_id: self.cluster_id, scope: scope.to_string(), nonce: signed.nonce.clone(), not_after: signed.not_after };
        let digest = request_digest(&envelope, ops, compares);
        let keys = self.keys.load();
        let mut credentials: Credentials = Vec::new();
        let mut signatures = Vec::with_capacity(signed.signatures.len());
        let mut signers = Vec::with_capacity(signed.signatures.len());
        for s in &signed.signatures {
            let (principal, key) = keys.get(&s.key).ok_or_else(|| TrustError::UnknownKey(hex::encode(s.key)))?;
            signatures.push((*key, Signature::from_bytes(&s.signature)));
            signers.push(principal.clone());
            if !credentials.iter().any(|c| c.principal == principal.id) {
                credentials.push(m::Credential { principal: principal.id.clone(), roles: principal.roles.clone() });
            }
        }
        Ok(Resolved { credentials, signed: batch::Signed { digest, signatures }, signers })
    }
}

/// A request's signatures with their principals, before any is verified.
struct Resolved {
    /// The distinct principals, in order of first signature.
    credentials: Credentials,
    /// The signatures and the digest they must cover.
    signed: batch::Signed,
    /// The principal of each signature.
    signers: Vec<Arc<Principal>>,
}

/// The summed weight of the distinct `signers` among `voters` (principal, weight): each
/// principal counts once, at its largest weight.
pub fn distinct_weight<'a>(voters: impl IntoIterator<Item = (&'a str, u32)>, signers: &[&str]) -> u32 {
    let mut best: HashMap<&str, u32> = HashMap::new();
    for (principal, weight) in voters {
        if signers.contains(&principal) {
            let entry = best.entry(principal).or_default();
            *entry = (*entry).max(weight);
        }
    }
    best.values().sum()
}

/// The summed weight of `rule`'s voters among `credentials`, each principal counted once.
pub fn approval_weight(rule: &m::ApprovalRule, credentials: &[m::Credential]) -> u32 {
    let signers: Vec<&str> = credentials.iter().map(|c| c.principal.as_str()).collect();
    distinct_weight(rule.voters.iter().map(|v| (v.principal.as_str(), v.weight)), &signers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn principal(id: &str, keys: &[&SigningKey], roles: &[&str]) -> Principal {
        Principal {
            id: id.into(),
            keys: keys.iter().map(|k| hex::encode(k.verifying_key().as_bytes())).collect(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn ops() -> Vec<m::Op> {
        vec![m::Op::Put(m::PutOp { key: "/registry/secrets/ns/s".into(), value: "v".into(), ..Default::default() })]
    }

    #[test]
    fn weak_keys_are_refused() {
        // The identity point: of small order, it "verifies" signatures it never made.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let error = parse_public_key(&hex::encode(identity)).unwrap_err();
        assert!(error.contains("weak"), "{error}");
        assert!(parse_public_key(&hex::encode(key(1).verifying_key().as_bytes())).is_ok());
    }

    #[test]
    fn headers_round_trip() {
        let signed = SignedRequest::sign(&[key(1), key(2)], 9, "secrets", &ops(), &[], Duration::from_secs(60)).unwrap();
        let headers = signed.headers();
        let get = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str());
        let parsed = SignedRequest::from_headers(
            get(NONCE_HEADER),
            get(NOT_AFTER_HEADER),
            headers.iter().filter(|(n, _)| *n == SIGNATURE_HEADER).map(|(_, v)| v.as_str()),
        )
        .unwrap();
        assert_eq!(parsed, Some(signed));
        assert_eq!(SignedRequest::from_headers(None, None, []).unwrap(), None);
        assert!(matches!(SignedRequest::from_headers(Some("00"), Some("1"), ["x"]), Err(TrustError::Malformed(_))));
    }

    #[tokio::test]
    async fn one_principal_counts_once_and_weights_sum_distinct_voters() {
        let (a1, a2, b) = (key(1), key(2), key(3));
        let trust = Trust::new(9);
        trust.set_principals(&[principal("alice", &[&a1, &a2], &["secret-writer"]), principal("bob", &[&b], &[])]);
        let now = crate::clock::unix_now();
        let signed = SignedRequest::sign(&[a1.clone(), a2.clone()], 9, "secrets", &ops(), &[], Duration::from_secs(60)).unwrap();
        let credentials = trust.verify("secrets", &ops(), &[], &signed, now).await.unwrap();
        assert_eq!(credentials.len(), 1, "two keys of alice are one principal");
        let rule = m::ApprovalRule {
            voters: vec![m::Voter { principal: "alice".into(), weight: 1 }, m::Voter { principal: "bob".into(), weight: 1 }],
            threshold: 2,
            expiry_seconds: 60,
        };
        assert_eq!(approval_weight(&rule, &credentials), 1, "just below the threshold");
        let signed = SignedRequest::sign(&[a1, b], 9, "secrets", &ops(), &[], Duration::from_secs(60)).unwrap();
        let credentials = trust.verify("secrets", &ops(), &[], &signed, now).await.unwrap();
        assert_eq!(approval_weight(&rule, &credentials), 2, "exactly at the threshold");
    }
}
