//! Anchors on the request path. When a write's approval rule names anchors, the receiving
//! replica votes itself (it has just evaluated the write) and asks each other named anchor to
//! co-sign; a peer evaluates the same request with its own policy binding, verifying the
//! client's signatures itself, and signs only when its policy allows the write or requires
//! approval with that peer among the voters. The co-signatures are verified like any request
//! signature and join the request's credentials; the policy then runs again with them.

use std::sync::Arc;

use aq_sdk as m;
use ed25519_dalek::Signer;
use etcd_client::proto as pb;

use super::{Caller, Gateway, ScopeRuntime, model_of};
use crate::clock::unix_now;
use crate::trust::anchor::{
    ANCHOR_HEADER, ANCHOR_PREFIX, COSIGN_TIMEOUT, COSIGN_VALIDITY, ClientSignatures, CosignAnswer, CosignRequest,
    Identity, cosign_message,
};
use crate::trust::{Envelope, SignedRequest, request_digest};

/// This replica as an anchor: its identity, and how it calls its peers.
pub struct Anchor {
    identity: Identity,
    agent: ureq::Agent,
}

impl Anchor {
    /// The anchor `identity`; peers served over TLS are trusted when their certificate chains
    /// to one in `roots` (this replica's own certificate file, normally).
    pub fn new(identity: Identity, roots: Option<&std::path::Path>) -> Result<Self, String> {
        let mut config =
            ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(COSIGN_TIMEOUT));
        if let Some(path) = roots {
            config = config.tls_config(crate::tls::client_roots(path)?);
        }
        Ok(Anchor { identity, agent: config.build().into() })
    }

    /// Its identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

/// Why a replica would not co-sign.
#[derive(Debug, thiserror::Error)]
pub enum CosignError {
    /// The caller is not a registered anchor, or its call signature does not verify.
    #[error("{0}")]
    Forbidden(String),
    /// The body does not parse or the request does not fit the scope.
    #[error("{0}")]
    Invalid(String),
    /// This replica's own evaluation does not support the write.
    #[error("{0}")]
    Refused(String),
}

/// The anchor votes a replica gathered for one write.
#[derive(Default)]
pub(super) struct AnchorVotes {
    /// Verified anchor credentials, this replica's own included.
    pub credentials: Vec<m::Credential>,
    /// Named anchors that did not co-sign, with why.
    pub missing: Vec<String>,
}

/// Whether the people among the voters (not anchors), those who have not signed yet included,
/// could still bring a write that fell short up to its threshold.
pub(super) fn people_can_reach(shortfall: &super::Shortfall, credentials: &[m::Credential]) -> bool {
    let people: Vec<(&str, u32)> = shortfall
        .rule
        .voters
        .iter()
        .filter(|v| !v.principal.starts_with(ANCHOR_PREFIX))
        .map(|v| (v.principal.as_str(), v.weight))
        .collect();
    let unsigned: Vec<&str> =
        people.iter().map(|(p, _)| *p).filter(|p| !credentials.iter().any(|c| c.principal == *p)).collect();
    shortfall.weight + crate::trust::distinct_weight(people.iter().copied(), &unsigned) >= shortfall.rule.threshold
}

impl Gateway {
    /// The anchors `rule` names that have not signed yet; empty when this replica is no anchor.
    pub(super) fn unsigned_anchors<'a>(&self, rule: &'a m::ApprovalRule, context: &m::Context) -> Vec<&'a str> {
        if self.anchor.is_none() {
            return Vec::new();
        }
        rule.voters
            .iter()
            .map(|v| v.principal.as_str())
            .filter(|p| p.starts_with(ANCHOR_PREFIX) && !context.credentials.iter().any(|c| c.principal == *p))
            .collect()
    }

    /// Votes for a write whose rule names the anchors `wanted`: this replica's own vote when
    /// it is one of them, and the co-signatures of the others that answer in time.
    pub(super) async fn gather_anchors(
        &self,
        runtime: &ScopeRuntime,
        context: &m::Context,
        op: &pb::PbTxnOpRequest,
        caller: &Caller,
        wanted: &[&str],
    ) -> AnchorVotes {
        let Some(anchor) = &self.anchor else { return AnchorVotes::default() };
        let mut votes = AnchorVotes::default();
        let own = anchor.identity.id();
        if wanted.contains(&own) {
            let roles = self.trust.principals_by_id().get(own).map(|p| p.roles.clone()).unwrap_or_default();
            votes.credentials.push(m::Credential { principal: own.to_string(), roles });
        }
        let peers: Vec<String> = wanted.iter().filter(|p| **p != own).map(|p| p.to_string()).collect();
        if peers.is_empty() {
            return votes;
        }
        let mut nonce = vec![0u8; 16];
        if let Err(e) = getrandom::fill(&mut nonce) {
            votes.missing.extend(peers.iter().map(|p| format!("{p} (no nonce: {e})")));
            return votes;
        }
        let not_after = unix_now() + COSIGN_VALIDITY.as_secs();
        let body = CosignRequest {
            scope: runtime.scope.id.clone(),
            request: super::stored::encode_op(op),
            nonce: hex::encode(&nonce),
            not_after,
            client: caller.signed.as_ref().map(ClientSignatures::of),
            etcd_user: caller.user.clone(),
        };
        let body = Arc::new(serde_json::to_vec(&body).expect("JSON"));
        let header = anchor.identity.call_header(&body);
        let meta = self.meta();
        // Every peer is asked at once; the slowest bounds the wait.
        let asks: Vec<_> = peers
            .iter()
            .map(|peer| {
                let (peer, meta, body, header, agent) =
                    (peer.clone(), meta.clone(), body.clone(), header.clone(), anchor.agent.clone());
                tokio::spawn(async move {
                    let record = match meta.anchor(&peer).await {
                        Ok(Some(record)) => record,
                        Ok(None) => return Err(format!("{peer} (never registered: no replica of that name has run)")),
                        Err(e) => return Err(format!("{peer} ({e})")),
                    };
                    let url = format!("{}/v1/anchors/cosign", record.url.trim_end_matches('/'));
                    tokio::task::spawn_blocking(move || call_peer(&agent, &url, &body, &header))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|answer| answer)
                        .map_err(|e| format!("{peer} at {}: {e}", record.url))
                })
            })
            .collect();
        let mut answers = Vec::with_capacity(asks.len());
        for ask in asks {
            answers.push(ask.await.map_err(|e| e.to_string()).and_then(|answer| answer));
        }
        for (peer, answer) in peers.iter().zip(answers) {
            match answer.and_then(|answer| self.check_cosignature(runtime, context, &nonce, not_after, peer, &answer)) {
                Ok(credential) => votes.credentials.push(credential),
                Err(why) => {
                    tracing::warn!(scope = %runtime.scope.id, anchor = %peer, "no co-signature: {why}");
                    votes.missing.push(why);
                }
            }
        }
        votes
    }

    /// Verifies a peer's co-signature over the envelope this replica asked it to sign.
    fn check_cosignature(
        &self,
        runtime: &ScopeRuntime,
        context: &m::Context,
        nonce: &[u8],
        not_after: u64,
        peer: &str,
        answer: &CosignAnswer,
    ) -> Result<m::Credential, String> {
        let signatures = [answer.signature.as_str()];
        let signed = SignedRequest::from_headers(Some(&hex::encode(nonce)), Some(&not_after.to_string()), signatures)
            .map_err(|e| format!("{peer} answered with {e}"))?
            .ok_or_else(|| format!("{peer} answered without a signature"))?;
        let credentials = self
            .trust
            .check(&runtime.scope.id, &context.ops, &context.compares, &signed, unix_now())
            .map_err(|e| format!("{peer}'s co-signature was refused: {e}"))?;
        match credentials.into_iter().next() {
            Some(credential) if credential.principal == peer => Ok(credential),
            Some(credential) => Err(format!("{peer} answered with the key of {}", credential.principal)),
            None => Err(format!("{peer} answered without a signature")),
        }
    }

    /// A peer's side: evaluates the write another anchor received and co-signs it when this
    /// replica's policy allows it or requires approval with this anchor as a voter.
    pub async fn cosign(&self, body: &[u8], header: Option<&str>) -> Result<CosignAnswer, CosignError> {
        let anchor = self.anchor.as_ref().ok_or_else(|| CosignError::Refused("this replica is not an anchor".into()))?;
        let caller = self.anchor_caller(body, header)?;
        let request: CosignRequest =
            serde_json::from_slice(body).map_err(|e| CosignError::Invalid(format!("the co-sign request does not parse: {e}")))?;
        let routing = self.routing();
        let runtime = routing.scope(&request.scope).ok_or_else(|| CosignError::Invalid(format!("no scope {}", request.scope)))?;
        let op = super::stored::decode_op(&request.request)
            .ok_or_else(|| CosignError::Invalid("request is not a hex etcd RequestOp".into()))?;
        let (ops, compares, ranges) = model_of(&op);
        let owner = routing.route_write(&ranges).map_err(|e| CosignError::Invalid(e.to_string()))?;
        if owner.scope.id != request.scope {
            return Err(CosignError::Invalid(format!("the request belongs to scope {}, not {}", owner.scope.id, request.scope)));
        }
        let now = unix_now();
        let nonce = hex::decode(&request.nonce)
            .ok()
            .filter(|n| (8..=64).contains(&n.len()))
            .ok_or_else(|| CosignError::Invalid("nonce must be 8 to 64 bytes in hex".into()))?;
        if request.not_after < now || request.not_after > now + COSIGN_VALIDITY.as_secs() + 5 {
            return Err(CosignError::Invalid(format!(
                "not_after {} must lie within {} s of this replica's clock ({now})",
                request.not_after,
                COSIGN_VALIDITY.as_secs()
            )));
        }
        let mut context = self.context(runtime, ops, compares, request.etcd_user.as_deref());
        if let Some(client) = &request.client {
            let signed = client.to_signed().map_err(|e| CosignError::Invalid(e.to_string()))?;
            context.credentials = self
                .trust
                .check(&runtime.scope.id, &context.ops, &context.compares, &signed, now)
                .map_err(|e| CosignError::Refused(format!("the client's signatures do not verify here: {e}")))?;
        }
        let evaluation = self.run_policy(runtime, &mut context);
        let own = anchor.identity.id();
        match &evaluation.decision.verdict {
            m::Verdict::Allow => {}
            m::Verdict::RequireApproval(rule) if rule.voters.iter().any(|v| v.principal == own) => {}
            m::Verdict::RequireApproval(_) => {
                return Err(CosignError::Refused(format!(
                    "the policy of scope {} here ({}) does not name {own} as a voter",
                    runtime.scope.id, evaluation.digest
                )));
            }
            m::Verdict::Deny(reason) => {
                return Err(CosignError::Refused(format!(
                    "the policy of scope {} here ({}) denies the write: {reason}",
                    runtime.scope.id, evaluation.digest
                )));
            }
        }
        let envelope = Envelope { cluster_id: self.trust.cluster_id(), scope: runtime.scope.id.clone(), nonce, not_after: request.not_after };
        let digest = request_digest(&envelope, &context.ops, &context.compares);
        let signature = hex::encode(anchor.identity.key().sign(&digest).to_bytes());
        tracing::info!(scope = %runtime.scope.id, %caller, policy = %evaluation.digest, "co-signed a write as {own}");
        Ok(CosignAnswer { principal: own.to_string(), signature: format!("{}:{signature}", anchor.identity.public_hex()) })
    }

    /// The anchor that signed a co-sign call.
    fn anchor_caller(&self, body: &[u8], header: Option<&str>) -> Result<String, CosignError> {
        let header = header.ok_or_else(|| CosignError::Forbidden(format!("the {ANCHOR_HEADER} header is missing; only anchors may ask")))?;
        let malformed = || CosignError::Forbidden(format!("{ANCHOR_HEADER} must be <public key hex>:<signature hex>"));
        let (key, signature) = header.trim().split_once(':').ok_or_else(malformed)?;
        let key: [u8; 32] = hex::decode(key).ok().and_then(|k| k.try_into().ok()).ok_or_else(malformed)?;
        let signature: [u8; 64] = hex::decode(signature).ok().and_then(|s| s.try_into().ok()).ok_or_else(malformed)?;
        let principal = self
            .trust
            .principal_of(&key)
            .filter(|p| p.id.starts_with(ANCHOR_PREFIX))
            .ok_or_else(|| CosignError::Forbidden(format!("key {} is not an anchor's", hex::encode(key))))?;
        let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| malformed())?;
        verifying
            .verify_strict(&cosign_message(body), &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| CosignError::Forbidden(format!("the call signature of {} does not match the body", principal.id)))?;
        Ok(principal.id.clone())
    }
}

/// One co-sign call (blocking; run off the async runtime).
fn call_peer(agent: &ureq::Agent, url: &str, body: &[u8], header: &str) -> Result<CosignAnswer, String> {
    let request = ureq::http::Request::builder()
        .method("POST")
        .uri(url)
        .header("content-type", "application/json")
        .header(ANCHOR_HEADER, header)
        .body(body.to_vec())
        .map_err(|e| format!("bad URL: {e}"))?;
    let mut response = agent.run(request).map_err(|e| format!("unreachable: {e}"))?;
    let status = response.status();
    let text = response.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|e| e.to_string())?;
    if !status.is_success() {
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(format!("refused ({status}): {detail}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("answered with something other than a co-signature: {e}"))
}
