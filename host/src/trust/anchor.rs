//! Anchors: aq replicas as principals. Every replica has an identity key
//! (`<data-dir>/identity.key`) and registers itself as the principal `anchor:<name>`, role
//! `anchor`, with the URL of its admin API. A policy may name anchors as voters; the replica
//! that receives such a write asks the named peers to co-sign it, and each peer evaluates the
//! same request with its own copy of the policy before it signs.
//!
//! A co-signature is an ordinary request signature (see [`super::digest`]) over an envelope the
//! receiving replica chooses: a fresh nonce and a not-after [`COSIGN_VALIDITY`] ahead. The
//! co-sign call itself is authenticated by the caller's identity key: header [`ANCHOR_HEADER`]
//! carries `<public key hex>:<signature hex>` over [`cosign_message`] of the body, and the key
//! must belong to an `anchor:` principal.

use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};

/// The id prefix of anchor principals.
pub const ANCHOR_PREFIX: &str = "anchor:";
/// The role every anchor principal holds.
pub const ANCHOR_ROLE: &str = "anchor";
/// The header authenticating a co-sign call.
pub const ANCHOR_HEADER: &str = "aq-anchor";
/// How long a co-signature stays valid: long enough to commit, short enough to be useless later.
pub const COSIGN_VALIDITY: Duration = Duration::from_secs(30);
/// How long a replica waits for a peer's co-signature.
pub const COSIGN_TIMEOUT: Duration = Duration::from_secs(3);
/// The blake3 key-derivation context of co-sign call bodies.
const COSIGN_DOMAIN: &str = "aq anchor co-sign call v1";

/// A replica's name as an anchor, and the key it signs with.
pub struct Identity {
    id: String,
    key: SigningKey,
}

impl Identity {
    /// The identity `anchor:<name>`; `None` for the name derives one from the key
    /// (`aq-` and the first 8 hex digits of the public key), stable for a data directory.
    pub fn new(name: Option<&str>, key: SigningKey) -> Result<Self, String> {
        let name = match name {
            Some(name) => name.to_string(),
            None => format!("aq-{}", &hex::encode(key.verifying_key().as_bytes())[..8]),
        };
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name.len() > 63 || !name.chars().all(valid) {
            return Err(format!(
                "replica name {name:?} must be 1 to 63 letters, digits, '-', '_' or '.'; it becomes the principal anchor:<name>"
            ));
        }
        Ok(Identity { id: format!("{ANCHOR_PREFIX}{name}"), key })
    }

    /// The principal id, `anchor:<name>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// The principal this replica registers.
    pub fn principal(&self) -> super::Principal {
        super::Principal { id: self.id.clone(), keys: vec![self.public_hex()], roles: vec![ANCHOR_ROLE.to_string()] }
    }

    /// The [`ANCHOR_HEADER`] value authenticating a co-sign call with `body`.
    pub fn call_header(&self, body: &[u8]) -> String {
        format!("{}:{}", self.public_hex(), hex::encode(self.key.sign(&cosign_message(body)).to_bytes()))
    }
}

/// What a replica signs to authenticate a co-sign call: a domain-separated blake3 of its body.
pub fn cosign_message(body: &[u8]) -> [u8; 32] {
    blake3::derive_key(COSIGN_DOMAIN, body)
}

/// Where a peer anchor is reached; stored in the meta group under `anchor/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnchorRecord {
    /// `anchor:<name>`.
    pub id: String,
    /// Its identity's public key, hex.
    pub key: String,
    /// Its admin API, e.g. `http://10.0.0.7:7070`.
    pub url: String,
}

/// The signatures the client sent with a request, as its headers carried them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientSignatures {
    /// The client's nonce, hex.
    pub nonce: String,
    /// The client's not-after, Unix seconds.
    pub not_after: u64,
    /// `<public key hex>:<signature hex>`, one per signature.
    pub signatures: Vec<String>,
}

impl ClientSignatures {
    /// The headers' form of a signed request.
    pub fn of(signed: &super::SignedRequest) -> Self {
        ClientSignatures {
            nonce: hex::encode(&signed.nonce),
            not_after: signed.not_after,
            signatures: signed.signatures.iter().map(super::KeySignature::header_value).collect(),
        }
    }

    /// Parses them back.
    pub fn to_signed(&self) -> Result<super::SignedRequest, super::TrustError> {
        let not_after = self.not_after.to_string();
        super::SignedRequest::from_headers(Some(&self.nonce), Some(&not_after), self.signatures.iter().map(String::as_str))?
            .ok_or_else(|| super::TrustError::Malformed("no client signatures".into()))
    }
}

/// `POST /v1/anchors/cosign`: one replica asks a peer to co-sign a write.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CosignRequest {
    /// The scope the write belongs to.
    pub scope: String,
    /// The client's request op (etcd `RequestOp` protobuf), hex.
    pub request: String,
    /// The nonce of the envelope to sign, hex.
    pub nonce: String,
    /// The not-after of the envelope to sign, Unix seconds.
    pub not_after: u64,
    /// The client's own signatures, which the peer verifies itself.
    pub client: Option<ClientSignatures>,
    /// The etcd user the client authenticated as on the asking replica (aq's etcd auth),
    /// so the peer's policy sees the same transport identity. Taken on the asking anchor's
    /// word, which its call signature vouches for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_user: Option<String>,
}

/// A peer's co-signature.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CosignAnswer {
    /// The signing anchor, `anchor:<name>`.
    pub principal: String,
    /// `<public key hex>:<signature hex>` over the request digest with the asked envelope.
    pub signature: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_anchor_ids_and_bad_names_are_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let named = Identity::new(Some("gw-1"), key.clone()).unwrap();
        assert_eq!(named.id(), "anchor:gw-1");
        let derived = Identity::new(None, key.clone()).unwrap();
        assert_eq!(derived.id(), format!("anchor:aq-{}", &derived.public_hex()[..8]));
        for bad in ["", "a/b", "a b", &"x".repeat(64)] {
            assert!(Identity::new(Some(bad), key.clone()).is_err(), "{bad:?}");
        }
        assert_eq!(named.principal().roles, vec![ANCHOR_ROLE.to_string()]);
    }

    #[test]
    fn call_headers_bind_the_body() {
        use ed25519_dalek::Verifier;
        let identity = Identity::new(Some("gw-1"), SigningKey::from_bytes(&[7; 32])).unwrap();
        let header = identity.call_header(b"{\"scope\":\"secrets\"}");
        let (key, signature) = header.split_once(':').unwrap();
        let key = super::super::parse_public_key(key).unwrap();
        let signature = ed25519_dalek::Signature::from_slice(&hex::decode(signature).unwrap()).unwrap();
        assert!(key.verify(&cosign_message(b"{\"scope\":\"secrets\"}"), &signature).is_ok());
        assert!(key.verify(&cosign_message(b"{\"scope\":\"other\"}"), &signature).is_err());
    }
}
