//! The governance pipeline. A mutation is routed to the scope owning its keys, evaluated by the
//! scope's active policy, and sent to the scope's group as the client sent it: a Put stays a
//! Put. The group's etcd enforces that it still holds the keys (see
//! [`crate::backend::ownership`]); aq adds only the compares it needs (policy reads, a signed
//! request's nonce), in a Txn around the client's op so its else-branch answers as etcd's would.
//! Reads are routed, split across scopes and merged, and counted.

pub mod anchors;
mod approvals;
pub use approvals::ApprovalError;
pub(crate) use approvals::{decode_request, model_of};
pub mod decisions;
mod lease;
pub mod metrics;
mod reader;
mod stored;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aq_sdk as m;
use etcd_client::proto as pb;
use tonic::Status;

use crate::backend::Group;
use crate::engine::{Engine, EvalRequest, Registry, ScopeSlot};
use crate::index::{KeyRange, Owner, Scope, ScopeIndex};
use crate::lineage::{ApprovalRecord, OpRecord, Record, RecordKind};
use crate::backend::compare::{RESULT_EQUAL, TARGET_MOD, TARGET_VERSION};
use crate::trust::SignedRequest;

/// How many times a write is retried after a policy read moved.
const MAX_ATTEMPTS: usize = 5;


/// Why the gate refused or could not complete a request.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The policy denied the write.
    #[error("{reason}")]
    Denied {
        /// The policy's reason.
        reason: String,
    },
    /// The policy requires approval weight the request's signatures do not carry.
    #[error("{}", .0.message)]
    NeedsApproval(Box<Shortfall>),
    /// The write became a proposal and waits for approvals.
    #[error("{message}")]
    Proposed {
        /// The proposal's id.
        id: String,
        /// What to do.
        message: String,
    },
    /// A write or transaction touches keys of several scopes.
    #[error("the request touches keys of several scopes ({}); a write or transaction must stay within one scope", .0.join(", "))]
    CrossScope(Vec<String>),
    /// No scope owns the key.
    #[error("no scope owns key {0:?}; configure a scope covering it (a catch-all scope has prefix \"\")")]
    Unowned(String),
    /// The key is in aq's reserved keyspace.
    #[error("key {0:?} is in aq's reserved keyspace and cannot be written through aq")]
    Reserved(String),
    /// A read at one revision across groups with separate revision spaces.
    #[error("{0}")]
    Unsupported(String),
    /// The request's signatures were refused.
    #[error("{0}")]
    Unauthenticated(#[from] crate::trust::TrustError),
    /// What a policy read kept moving.
    #[error("scope {0} changed under the policy's reads on every attempt; retry the request")]
    Contended(String),
    /// The scope's group refused the write: it no longer holds the scope's keys.
    #[error("etcd group {group} no longer holds the keys of scope {scope} (the scope moved): {detail}; retry the request")]
    NotOwner {
        /// The scope.
        scope: String,
        /// The group that refused.
        group: String,
        /// etcd's words.
        detail: String,
    },
    /// etcd answered with an error; passed through unchanged.
    #[error("{0}")]
    Backend(Status),
}

impl From<Status> for GateError {
    fn from(status: Status) -> Self {
        GateError::Backend(status)
    }
}

/// What the gate works with besides the layout: the policy engine and bindings, metrics, the
/// decision log and signature checks.
pub struct GateServices {
    /// The policy engine.
    pub engine: Arc<Engine>,
    /// Each scope's active binding.
    pub registry: Arc<Registry>,
    /// The request path's metrics.
    pub metrics: Arc<metrics::GateMetrics>,
    /// Where decisions are logged.
    pub decisions: decisions::DecisionLog,
    /// Principals and signature checks.
    pub trust: Arc<crate::trust::Trust>,
    /// This replica as an anchor, when it serves peers.
    pub anchor: Option<Arc<anchors::Anchor>>,
}

/// The outcome of an allowing evaluation.
pub(crate) struct Evaluated {
    /// Compares guarding the write on what the policy read.
    guards: Vec<pb::PbCompare>,
    /// How much lineage the policy asked for.
    lineage: m::LineageLevel,
    /// The policy that decided.
    policy: crate::engine::PolicyDigest,
}

/// A lineage record, to be written with its write.
#[derive(Clone)]
pub(crate) struct Draft {
    kind: RecordKind,
    policy: String,
    level: &'static str,
    principals: Vec<String>,
    ops: Vec<OpRecord>,
    pub(crate) proposal: Option<String>,
    pub(crate) approvals: Vec<ApprovalRecord>,
}

impl Draft {
    /// The record of an allowed write at `level` (none: no record), decided by `policy`.
    fn of(
        context: &m::Context,
        level: m::LineageLevel,
        policy: crate::engine::PolicyDigest,
        kind: RecordKind,
    ) -> Option<Draft> {
        let level = match level {
            m::LineageLevel::None => return None,
            m::LineageLevel::Digest => "digest",
            m::LineageLevel::Full => "full",
        };
        let ops = context
            .ops
            .iter()
            .map(|op| match op {
                m::Op::Put(p) => OpRecord::Put {
                    key: hex::encode(&p.key.0),
                    value_blake3: blake3::hash(&p.value).to_hex().to_string(),
                    lease: p.lease,
                },
                m::Op::DeleteRange(d) => OpRecord::Delete { key: hex::encode(&d.key.0), range_end: hex::encode(&d.range_end.0) },
            })
            .collect();
        Some(Draft {
            kind,
            policy: policy.to_hex(),
            level,
            principals: context.credentials.iter().map(|c| c.principal.clone()).collect(),
            ops,
            proposal: None,
            approvals: Vec::new(),
        })
    }

    fn record(&self, scope: &str) -> Record {
        Record {
            v: crate::lineage::RECORD_VERSION,
            scope: scope.to_string(),
            id: crate::lineage::new_record_id(),
            kind: self.kind,
            time_ms: crate::clock::unix_ms(),
            policy: self.policy.clone(),
            level: self.level.to_string(),
            principals: self.principals.clone(),
            ops: self.ops.clone(),
            proposal: self.proposal.clone(),
            approvals: self.approvals.clone(),
            subject: None,
            binding: None,
        }
    }
}

/// Where a signed write's nonce is recorded in its scope's group, until its not-after passes:
/// `\xffaq/nonce/<not-after, 20 decimal digits>/<nonce hex>`. Keys sort by expiry, so one
/// DeleteRange sweeps every expired nonce ([`Gateway::sweep_nonces`]). A replay carries the
/// same signed not-after, so it finds the same key.
fn nonce_key(nonce: &[u8], not_after: u64) -> Vec<u8> {
    let mut key = nonce_expiry_bound(not_after);
    key.push(b'/');
    key.extend_from_slice(hex::encode(nonce).as_bytes());
    key
}

/// Where the nonce keys start.
fn nonce_prefix() -> Vec<u8> {
    [crate::index::RESERVED_PREFIX, b"nonce/"].concat()
}

/// The first nonce key of signatures expiring at `not_after`.
fn nonce_expiry_bound(not_after: u64) -> Vec<u8> {
    let mut key = nonce_prefix();
    key.extend_from_slice(format!("{not_after:020}").as_bytes());
    key
}

/// The client's op with one of aq's reserved records beside it (a nonce, a proposal's commit
/// marker), as one nested Txn whose last answer is the client's.
fn with_reserved(op: pb::PbTxnOpRequest, key: Vec<u8>, value: Vec<u8>) -> pb::PbTxnOpRequest {
    pb::PbTxnOpRequest::RequestTxn(pb::PbTxnRequest {
        compare: Vec::new(),
        success: vec![put(key, value), pb::PbTxnRequestOp { request: Some(op) }],
        failure: Vec::new(),
    })
}

/// The client's answer inside [`with_reserved`]'s Txn.
fn client_answer(response: pb::PbTxnOpResponse) -> Result<pb::PbTxnOpResponse, GateError> {
    match response {
        pb::PbTxnOpResponse::ResponseTxn(mut txn) => txn
            .responses
            .pop()
            .and_then(|r| r.response)
            .ok_or_else(|| GateError::Backend(Status::internal("etcd returned an empty txn response"))),
        other => Ok(other),
    }
}

fn put(key: Vec<u8>, value: Vec<u8>) -> pb::PbTxnRequestOp {
    pb::PbTxnRequestOp { request: Some(pb::PbTxnOpRequest::RequestPut(pb::PbPutRequest { key, value, ..Default::default() })) }
}

/// What a request carries besides its message: signatures, and how long to wait for
/// approvals.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// Signatures from the request's metadata.
    pub signed: Option<SignedRequest>,
    /// Wait this long for a proposal's outcome instead of answering with its id at once.
    pub wait: Option<std::time::Duration>,
}

/// A write whose signatures fall short of its policy's approval rule.
#[derive(Debug)]
pub struct Shortfall {
    /// The rule.
    pub rule: m::ApprovalRule,
    /// The weight the request's signatures carry.
    pub weight: u32,
    /// The policy that asked.
    pub policy: crate::engine::PolicyDigest,
    /// Why, in words.
    pub message: String,
}

/// One scope at run time.
pub struct ScopeRuntime {
    /// Index entry.
    pub scope: Arc<Scope>,
    /// Its group.
    pub group: Group,
    /// Its policy binding.
    pub slot: Arc<ScopeSlot>,
}

/// What routes requests: the scope index and each scope's run-time state, replaced as one
/// ([`Gateway::reroute`]). A request loads it once and finishes on it.
pub struct Routing {
    index: ScopeIndex,
    scopes: HashMap<String, ScopeRuntime>,
}

impl Routing {
    /// Each scope of `index` with its group and policy binding.
    fn build(index: ScopeIndex, groups: &BTreeMap<String, Group>, registry: &Registry) -> Result<Self, String> {
        let mut scopes = HashMap::new();
        for scope in index.scopes() {
            let group = groups
                .get(&scope.group)
                .ok_or_else(|| format!("scope {} names backend group {}, which is not configured", scope.id, scope.group))?
                .clone();
            let slot = registry.slot(&scope.id).ok_or_else(|| format!("scope {} has no policy bound", scope.id))?;
            scopes.insert(scope.id.clone(), ScopeRuntime { scope: scope.clone(), group, slot });
        }
        Ok(Routing { index, scopes })
    }

    /// The scope index.
    pub fn index(&self) -> &ScopeIndex {
        &self.index
    }

    /// A scope's run-time state.
    pub fn scope(&self, id: &str) -> Option<&ScopeRuntime> {
        self.scopes.get(id)
    }

    fn runtime(&self, scope: &Scope) -> &ScopeRuntime {
        self.scopes.get(&scope.id).expect("every indexed scope has a runtime")
    }

    /// Resolves one key to its scope: the Put path, a single binary search.
    fn route_key(&self, key: &[u8]) -> Result<&ScopeRuntime, GateError> {
        match self.index.lookup(key) {
            Owner::Scope(scope) => Ok(self.runtime(scope)),
            Owner::Reserved => Err(GateError::Reserved(String::from_utf8_lossy(key).into_owned())),
            Owner::Unowned => Err(GateError::Unowned(String::from_utf8_lossy(key).into_owned())),
        }
    }

    /// Resolves the keys and ranges a mutation touches to exactly one scope.
    fn route_write(&self, ranges: &[KeyRange]) -> Result<&ScopeRuntime, GateError> {
        let mut owner: Option<&Arc<Scope>> = None;
        let mut all: Vec<String> = Vec::new();
        for range in ranges {
            if let Owner::Reserved = self.index.lookup(&range.start) {
                return Err(GateError::Reserved(String::from_utf8_lossy(&range.start).into_owned()));
            }
            let parts = self.index.overlapping(range);
            if parts.is_empty() {
                return Err(GateError::Unowned(String::from_utf8_lossy(&range.start).into_owned()));
            }
            for (scope, _) in parts {
                if !all.contains(&scope.id) {
                    all.push(scope.id.clone());
                }
                owner.get_or_insert(scope);
            }
        }
        if all.len() > 1 {
            all.sort();
            return Err(GateError::CrossScope(all));
        }
        let scope = owner.ok_or_else(|| GateError::Unowned(String::new()))?;
        Ok(self.runtime(scope))
    }
}

/// The gateway core shared by every front-end service.
pub struct Gateway {
    routing: arc_swap::ArcSwap<Routing>,
    groups: BTreeMap<String, Group>,
    /// The group where leases are granted and which answers for aq itself (status).
    home: Group,
    engine: Arc<Engine>,
    registry: Arc<Registry>,
    leases: lease::LeaseCopies,
    metrics: Arc<metrics::GateMetrics>,
    decisions: decisions::DecisionLog,
    trust: Arc<crate::trust::Trust>,
    anchor: Option<Arc<anchors::Anchor>>,
}

impl Gateway {
    /// Assembles a gateway. Every scope of `index` must have a binding in the registry and a
    /// group in `groups`. `home` names the group that grants leases and holds the meta records.
    pub async fn new(
        index: ScopeIndex,
        groups: BTreeMap<String, Group>,
        home: &str,
        services: GateServices,
    ) -> Result<Self, String> {
        let GateServices { engine, registry, metrics, decisions, trust, anchor } = services;
        let routing = Routing::build(index, &groups, &registry)?;
        let home = groups.get(home).ok_or_else(|| format!("the home group {home} is not configured"))?.clone();
        Ok(Gateway {
            routing: arc_swap::ArcSwap::from_pointee(routing),
            groups,
            home,
            engine,
            registry,
            leases: lease::LeaseCopies::default(),
            metrics,
            decisions,
            trust,
            anchor,
        })
    }

    /// The routing requests take now: scope index and scope runtimes.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Routes requests by `index` from now on; requests under way finish on the routing they
    /// started with. Every scope of `index` needs a binding and a configured group. The
    /// ownership of ranges on the groups is not changed here: see [`crate::backend::ownership`].
    pub fn reroute(&self, index: ScopeIndex) -> Result<(), String> {
        let routing = Routing::build(index, &self.groups, &self.registry)?;
        self.routing.store(Arc::new(routing));
        Ok(())
    }

    /// The backend groups.
    pub fn groups(&self) -> &BTreeMap<String, Group> {
        &self.groups
    }

    /// The request path's metrics.
    pub fn metrics(&self) -> &Arc<metrics::GateMetrics> {
        &self.metrics
    }

    /// The group that grants leases and answers status.
    pub fn home(&self) -> &Group {
        &self.home
    }

    /// The policy registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The principals this replica knows, and its signature checks.
    pub fn trust(&self) -> &Arc<crate::trust::Trust> {
        &self.trust
    }

    /// What the scope's policy sees of a mutation; `evaluate` stamps the request time.
    fn context(&self, runtime: &ScopeRuntime, ops: Vec<m::Op>, compares: Vec<m::Compare>) -> m::Context {
        let scope = &runtime.scope;
        m::Context {
            scope: m::ScopeInfo {
                id: scope.id.clone(),
                key_start: m::Bytes(scope.range.start.clone()),
                key_end: m::Bytes(scope.range.end.clone()),
                labels: scope.labels.clone(),
            },
            ops,
            compares,
            credentials: Vec::new(),
            transport: m::TransportIdentity::default(),
            request_time: m::Timestamp::default(),
        }
    }

    /// Evaluates `context` with the scope's active policy, at the current time. Returns the
    /// compares that guard the write on what the policy read.
    fn evaluate(&self, runtime: &ScopeRuntime, context: &mut m::Context) -> Result<Evaluated, GateError> {
        let scope = &runtime.scope;
        let evaluation = self.run_policy(runtime, context);
        let verdict = evaluation.decision.verdict.kind();
        self.metrics.evaluated(&scope.id, verdict, evaluation.elapsed.as_secs_f64());
        if let Some(failure) = &evaluation.failure {
            self.metrics.policy_failed(&scope.id, failure.kind());
            tracing::warn!(scope = %scope.id, policy = ?evaluation.digest, kind = failure.kind(), "policy failed: {failure}");
        }
        if self.decisions.wants(verdict) {
            self.log_decision(context, &evaluation);
        }
        match evaluation.decision.verdict {
            m::Verdict::Allow => {}
            m::Verdict::Deny(reason) => return Err(GateError::Denied { reason }),
            m::Verdict::RequireApproval(rule) => {
                let weight = crate::trust::approval_weight(&rule, &context.credentials);
                if weight < rule.threshold {
                    let voters: Vec<String> =
                        rule.voters.iter().map(|v| format!("{} (weight {})", v.principal, v.weight)).collect();
                    let signers: Vec<&str> = context.credentials.iter().map(|c| c.principal.as_str()).collect();
                    let carried = if signers.is_empty() {
                        "the request carries no signature".to_string()
                    } else {
                        format!("its signatures ({}) weigh {weight}", signers.join(", "))
                    };
                    let message = format!(
                        "writes to scope {} need approvals of weight {} from {}; {carried}",
                        scope.id,
                        rule.threshold,
                        voters.join(", ")
                    );
                    return Err(GateError::NeedsApproval(Box::new(Shortfall {
                        rule,
                        weight,
                        policy: evaluation.digest,
                        message,
                    })));
                }
            }
        }
        let guards = evaluation
            .observed_reads
            .into_iter()
            .map(|read| pb::PbCompare {
                result: RESULT_EQUAL,
                // An absent key has version 0; a present one is pinned by its mod revision.
                target: if read.mod_revision.is_some() { TARGET_MOD } else { TARGET_VERSION },
                key: read.key.0,
                range_end: Vec::new(),
                target_union: Some(match read.mod_revision {
                    Some(rev) => pb::PbTargetUnion::ModRevision(rev),
                    None => pb::PbTargetUnion::Version(0),
                }),
            })
            .collect();
        Ok(Evaluated { guards, lineage: evaluation.decision.lineage, policy: evaluation.digest })
    }

    /// Runs the scope's active policy on `context`, stamped with the current time.
    fn run_policy(&self, runtime: &ScopeRuntime, context: &mut m::Context) -> crate::engine::Evaluation {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        context.request_time = m::Timestamp { seconds: now.as_secs(), nanoseconds: now.subsec_nanos() };
        let seed = request_seed(context, now);
        let binding = runtime.slot.active();
        let reader = reader::EtcdReader::new(runtime.group.clone());
        let evaluation = self.engine.evaluate(&binding, EvalRequest { context, seed, reader: Some(Arc::new(reader)) });
        // Ready instances for the next requests are made in a task of their own, which runs on
        // this worker thread once this request awaits etcd.
        if self.engine.needs_replenish(&binding)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let engine = self.engine.clone();
            runtime.spawn(async move { engine.replenish(&binding) });
        }
        evaluation
    }

    /// Queues the decision log line of an evaluation.
    fn log_decision(&self, context: &m::Context, evaluation: &crate::engine::Evaluation) {
        let reason = match &evaluation.decision.verdict {
            m::Verdict::Allow => None,
            m::Verdict::Deny(reason) => Some(reason.clone()),
            m::Verdict::RequireApproval(rule) => Some(format!(
                "approvals of weight {} needed from {}",
                rule.threshold,
                rule.voters.iter().map(|v| format!("{} ({})", v.principal, v.weight)).collect::<Vec<_>>().join(", ")
            )),
        };
        let key = match context.ops.first() {
            Some(m::Op::Put(p)) => &p.key.0,
            Some(m::Op::DeleteRange(d)) => &d.key.0,
            None => &Vec::new(),
        };
        let transport = context.transport.tls_name.as_deref().or(context.transport.etcd_user.as_deref());
        self.decisions.record(&decisions::DecisionLine {
            time: decisions::now_rfc3339(),
            scope: &context.scope.id,
            policy: evaluation.digest.to_hex(),
            verdict: evaluation.decision.verdict.kind(),
            reason: reason.as_deref(),
            principals: context.credentials.iter().map(|c| c.principal.as_str()).collect(),
            transport,
            key: String::from_utf8_lossy(key).into_owned(),
            ops: context.ops.len(),
            failure: evaluation.failure.as_ref().map(|f| f.kind()),
            annotations: &evaluation.decision.annotations,
        });
    }

    /// Evaluates `ops` against a scope's active policy without writing anything: the admin
    /// API's dry run. Every key must belong to the scope. Not counted in metrics or logged.
    pub fn dry_run(&self, scope_id: &str, ops: Vec<m::Op>) -> Result<crate::engine::Evaluation, GateError> {
        let routing = self.routing();
        let runtime = routing.scope(scope_id).ok_or_else(|| GateError::Unowned(format!("(scope {scope_id})")))?;
        let ranges: Vec<KeyRange> = ops
            .iter()
            .map(|op| match op {
                m::Op::Put(p) => KeyRange::from_request(&p.key, &[]),
                m::Op::DeleteRange(d) => KeyRange::from_request(&d.key, &d.range_end),
            })
            .collect();
        let owner = routing.route_write(&ranges)?;
        if owner.scope.id != scope_id {
            return Err(GateError::CrossScope(vec![scope_id.to_string(), owner.scope.id.clone()]));
        }
        let mut context = self.context(runtime, ops, Vec::new());
        Ok(self.run_policy(runtime, &mut context))
    }

    /// Sends `op` to the scope's group. Without `guards` or a `draft` it goes as the client
    /// sent it; otherwise as the success branch of a Txn guarded by `guards`, after the
    /// `draft`'s lineage record. The Txn holds this one write: it takes a revision of its own.
    /// Answers the client op's answer and the header; `Ok(None)` when a guard failed (a policy
    /// read or a nonce moved) and the caller evaluates again.
    async fn send(
        &self,
        runtime: &ScopeRuntime,
        op: pb::PbTxnOpRequest,
        guards: Vec<pb::PbCompare>,
        draft: Option<Draft>,
    ) -> Result<Option<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>)>, GateError> {
        if guards.is_empty() && draft.is_none() {
            let sent = self.send_plain(runtime, op).await.map_err(|e| self.backend_failure(runtime, e))?;
            self.metrics.routed(&runtime.scope.id, "write");
            return Ok(Some(sent));
        }
        let mut success = Vec::with_capacity(2);
        if let Some(draft) = draft {
            let record = draft.record(&runtime.scope.id);
            success.push(put(record.key(), record.encode()));
        }
        success.push(pb::PbTxnRequestOp { request: Some(op) });
        let request = pb::PbTxnRequest { compare: guards, success, failure: Vec::new() };
        let mut response = runtime.group.txn(request).await.map_err(|s| self.backend_failure(runtime, GateError::Backend(s)))?;
        if !response.succeeded {
            self.metrics.guard_retry(&runtime.scope.id);
            return Ok(None);
        }
        self.metrics.routed(&runtime.scope.id, "write");
        let inner = response
            .responses
            .pop()
            .and_then(|r| r.response)
            .ok_or_else(|| GateError::Backend(Status::internal("etcd returned an empty txn response")))?;
        Ok(Some((inner, response.header)))
    }

    /// The client's op alone: its answer, and the header taken out of it.
    async fn send_plain(
        &self,
        runtime: &ScopeRuntime,
        op: pb::PbTxnOpRequest,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        let group = &runtime.group;
        let (header, answer) = match op {
            pb::PbTxnOpRequest::RequestPut(put) => {
                let mut r = group.put(put).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponsePut(r))
            }
            pb::PbTxnOpRequest::RequestDeleteRange(delete) => {
                let mut r = group.delete_range(delete).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponseDeleteRange(r))
            }
            pb::PbTxnOpRequest::RequestTxn(txn) => {
                let mut r = group.txn(txn).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponseTxn(r))
            }
            pb::PbTxnOpRequest::RequestRange(range) => {
                let mut r = group.range(range).await?;
                (r.header.take(), pb::PbTxnOpResponse::ResponseRange(r))
            }
        };
        Ok((answer, header))
    }

    /// Counts a failed send; a refusal by the group's ownership check becomes
    /// [`GateError::NotOwner`].
    fn backend_failure(&self, runtime: &ScopeRuntime, error: GateError) -> GateError {
        match error {
            GateError::Backend(status) => {
                self.metrics.backend_error(runtime.group.name());
                if status.code() == tonic::Code::PermissionDenied && runtime.group.user().is_some() {
                    tracing::warn!(scope = %runtime.scope.id, group = runtime.group.name(), "the group refused a write: it no longer holds the scope");
                    return GateError::NotOwner {
                        scope: runtime.scope.id.clone(),
                        group: runtime.group.name().to_string(),
                        detail: status.message().to_string(),
                    };
                }
                GateError::Backend(status)
            }
            other => other,
        }
    }

    /// Runs one governed mutation: evaluate, send, and evaluate again when a policy read
    /// moved. Returns the response of the client's op and the outer header.
    async fn govern(
        &self,
        runtime: &ScopeRuntime,
        ops: Vec<m::Op>,
        compares: Vec<m::Compare>,
        op: pb::PbTxnOpRequest,
        caller: &Caller,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        match self.govern_on(runtime, ops, compares, &op, caller).await {
            Err(GateError::NotOwner { scope, group, detail }) => {
                // The group gave the keys away. If routing already names their new owner, the
                // write is decided there afresh and sent to it; otherwise the refusal stands.
                let routing = self.routing();
                let moved = match routing.route_write(&footprint(&op)) {
                    Ok(moved) if moved.group.name() != group || moved.scope.id != scope => moved,
                    _ => return Err(GateError::NotOwner { scope, group, detail }),
                };
                tracing::info!(scope = %scope, from = %group, to = moved.group.name(), "the scope moved; sending the write to its new owner");
                let (ops, compares, _) = model_of(&op);
                self.ensure_leases(&moved.group, leases_of(&ops)).await?;
                self.govern_on(moved, ops, compares, &op, caller).await
            }
            other => other,
        }
    }

    async fn govern_on(
        &self,
        runtime: &ScopeRuntime,
        ops: Vec<m::Op>,
        compares: Vec<m::Compare>,
        op: &pb::PbTxnOpRequest,
        caller: &Caller,
    ) -> Result<(pb::PbTxnOpResponse, Option<pb::PbResponseHeader>), GateError> {
        let mut context = self.context(runtime, ops, compares);
        if let Some(signed) = &caller.signed {
            let now = crate::clock::unix_now();
            context.credentials =
                self.trust.verify(&runtime.scope.id, &context.ops, &context.compares, signed, now).await?;
        }
        // Anchors that did not co-sign, once they were asked.
        let mut unanchored: Option<Vec<String>> = None;
        for _ in 0..MAX_ATTEMPTS {
            let evaluated = match self.evaluate(runtime, &mut context) {
                Ok(evaluated) => evaluated,
                Err(GateError::NeedsApproval(mut shortfall)) => {
                    let wanted = self.unsigned_anchors(&shortfall.rule, &context);
                    if unanchored.is_none() && !wanted.is_empty() {
                        let votes = self.gather_anchors(runtime, &context, op, caller, &wanted).await;
                        context.credentials.extend(votes.credentials);
                        unanchored = Some(votes.missing);
                        continue;
                    }
                    if let Some(missing) = unanchored.as_ref().filter(|m| !m.is_empty()) {
                        shortfall.message = format!("{}; no co-signature from {}", shortfall.message, missing.join("; "));
                        if !anchors::people_can_reach(&shortfall, &context.credentials) {
                            return Err(GateError::NeedsApproval(shortfall));
                        }
                    }
                    return self.propose(runtime, &context, op, *shortfall, caller.wait).await;
                }
                Err(e) => return Err(e),
            };
            let draft = Draft::of(&context, evaluated.lineage, evaluated.policy, RecordKind::Mutation);
            let mut guards = evaluated.guards;
            let mut op = op.clone();
            if let Some(signed) = &caller.signed {
                // The nonce is recorded with the write, guarded on being new to the scope's
                // group: a replay through another replica fails the guard.
                let key = nonce_key(&signed.nonce, signed.not_after);
                guards.push(crate::meta::compare_unchanged(key.clone(), 0));
                op = with_reserved(op, key, Vec::new());
            }
            if let Some((mut inner, header)) = self.send(runtime, op, guards, draft).await? {
                if caller.signed.is_some() {
                    inner = client_answer(inner)?;
                }
                return Ok((inner, header));
            }
            if let Some(signed) = &caller.signed {
                let seen = runtime.group.range(pb::PbRangeRequest { key: nonce_key(&signed.nonce, signed.not_after), count_only: true, ..Default::default() }).await?;
                if seen.count > 0 {
                    return Err(crate::trust::TrustError::Replayed(hex::encode(&signed.nonce)).into());
                }
            }
        }
        Err(GateError::Contended(runtime.scope.id.clone()))
    }

    /// Deletes recorded nonces whose signatures have expired, on every group: one DeleteRange
    /// per group, from the first nonce key up to those expiring now.
    pub async fn sweep_nonces(&self) {
        let expired_before = nonce_expiry_bound(crate::clock::unix_now());
        for group in self.groups.values() {
            let request = pb::PbDeleteRequest { key: nonce_prefix(), range_end: expired_before.clone(), prev_kv: false };
            if let Err(e) = group.delete_range(request).await {
                tracing::warn!(group = group.name(), "cannot sweep expired nonces: {}", e.message());
            }
        }
    }

    /// etcd `Put`, governed.
    pub async fn put(&self, request: pb::PbPutRequest, caller: &Caller) -> Result<pb::PbPutResponse, GateError> {
        let routing = self.routing();
        let runtime = routing.route_key(&request.key)?;
        self.ensure_leases(&runtime.group, [request.lease]).await?;
        let ops = vec![m::Op::Put(put_op(&request))];
        let (response, header) =
            self.govern(runtime, ops, Vec::new(), pb::PbTxnOpRequest::RequestPut(request), caller).await?;
        match response {
            pb::PbTxnOpResponse::ResponsePut(mut put) => {
                put.header = header;
                Ok(put)
            }
            other => Err(unexpected("put", &other)),
        }
    }

    /// etcd `DeleteRange`, governed. A range over several scopes is deleted scope by scope,
    /// after every scope's policy allowed its part; it is not atomic across scopes.
    pub async fn delete_range(
        &self,
        request: pb::PbDeleteRequest,
        caller: &Caller,
    ) -> Result<pb::PbDeleteResponse, GateError> {
        let range = KeyRange::from_request(&request.key, &request.range_end);
        let routing = self.routing();
        if let Owner::Reserved = routing.index.lookup(&request.key) {
            return Err(GateError::Reserved(String::from_utf8_lossy(&request.key).into_owned()));
        }
        let parts = routing.index.overlapping(&range);
        if parts.is_empty() {
            return Ok(pb::PbDeleteResponse { header: self.any_header().await?, deleted: 0, prev_kvs: Vec::new() });
        }
        if parts.len() == 1 && parts[0].1 == range {
            let runtime = routing.runtime(parts[0].0);
            return self.delete_part(runtime, request, caller).await;
        }
        if caller.signed.is_some() {
            let scopes = parts.iter().map(|(scope, _)| scope.id.clone()).collect();
            return Err(GateError::CrossScope(scopes));
        }
        // Evaluate every part first, so a deny anywhere deletes nothing.
        let mut planned = Vec::new();
        for (scope, part) in &parts {
            let runtime = routing.runtime(scope);
            let (key, range_end) = part.to_request();
            let op = m::Op::DeleteRange(m::DeleteRangeOp { key: m::Bytes(key.clone()), range_end: m::Bytes(range_end.clone()) });
            // Proposals cover one scope: a delete over several that needs approval is refused.
            self.evaluate(runtime, &mut self.context(runtime, vec![op], Vec::new()))?;
            planned.push((runtime, pb::PbDeleteRequest { key, range_end, prev_kv: request.prev_kv }));
        }
        let mut merged = pb::PbDeleteResponse::default();
        for (runtime, part) in planned {
            let response = self.delete_part(runtime, part, &Caller::default()).await?;
            merged.header = merged.header.or(response.header);
            merged.deleted += response.deleted;
            merged.prev_kvs.extend(response.prev_kvs);
        }
        Ok(merged)
    }

    async fn delete_part(
        &self,
        runtime: &ScopeRuntime,
        request: pb::PbDeleteRequest,
        caller: &Caller,
    ) -> Result<pb::PbDeleteResponse, GateError> {
        let ops = vec![m::Op::DeleteRange(m::DeleteRangeOp {
            key: m::Bytes(request.key.clone()),
            range_end: m::Bytes(request.range_end.clone()),
        })];
        let (response, header) =
            self.govern(runtime, ops, Vec::new(), pb::PbTxnOpRequest::RequestDeleteRange(request), caller).await?;
        match response {
            pb::PbTxnOpResponse::ResponseDeleteRange(mut delete) => {
                delete.header = header;
                Ok(delete)
            }
            other => Err(unexpected("delete", &other)),
        }
    }

    /// etcd `Txn`, governed: the whole transaction must stay in one scope. A transaction of
    /// reads only is forwarded without evaluation.
    pub async fn txn(&self, request: pb::PbTxnRequest, caller: &Caller) -> Result<pb::PbTxnResponse, GateError> {
        let mut ranges = Vec::new();
        let mut ops = Vec::new();
        collect_txn(&request, &mut ranges, Some(&mut ops));
        if ranges.is_empty() {
            return Ok(pb::PbTxnResponse { header: self.any_header().await?, succeeded: true, responses: Vec::new() });
        }
        let routing = self.routing();
        let runtime = routing.route_write(&ranges)?;
        if ops.is_empty() {
            self.metrics.routed(&runtime.scope.id, "read");
            return Ok(runtime.group.txn(request).await?);
        }
        self.ensure_leases(&runtime.group, leases_of(&ops)).await?;
        let compares = request.compare.iter().map(compare_to_model).collect();
        let (response, header) =
            self.govern(runtime, ops, compares, pb::PbTxnOpRequest::RequestTxn(request), caller).await?;
        match response {
            pb::PbTxnOpResponse::ResponseTxn(mut txn) => {
                txn.header = header;
                Ok(txn)
            }
            other => Err(unexpected("txn", &other)),
        }
    }

    /// etcd `Range`: routed, split across scopes and merged in the requested order.
    pub async fn range(&self, request: pb::PbRangeRequest) -> Result<pb::PbRangeResponse, GateError> {
        let range = KeyRange::from_request(&request.key, &request.range_end);
        let routing = self.routing();
        let parts = routing.index.overlapping(&range);
        match parts.as_slice() {
            [] => Ok(pb::PbRangeResponse { header: self.any_header().await?, ..Default::default() }),
            [(scope, part)] => {
                let runtime = routing.runtime(scope);
                self.metrics.routed(&scope.id, "read");
                let mut request = request;
                if *part != range {
                    (request.key, request.range_end) = part.to_request();
                }
                Ok(runtime.group.range(request).await?)
            }
            parts => self.range_merged(&routing, request, parts).await,
        }
    }

    async fn range_merged(
        &self,
        routing: &Routing,
        request: pb::PbRangeRequest,
        parts: &[(&Arc<Scope>, KeyRange)],
    ) -> Result<pb::PbRangeResponse, GateError> {
        let groups: std::collections::BTreeSet<&str> = parts.iter().map(|(s, _)| s.group.as_str()).collect();
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
        for (scope, part) in parts {
            let runtime = routing.runtime(scope);
            self.metrics.routed(&scope.id, "read");
            let mut sub = request.clone();
            (sub.key, sub.range_end) = part.to_request();
            if sub.revision == 0
                && let Some(rev) = revisions.get(scope.group.as_str())
            {
                sub.revision = *rev;
            }
            let response = runtime.group.range(sub).await?;
            if let Some(header) = &response.header {
                revisions.entry(scope.group.as_str()).or_insert(header.revision);
            }
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
    /// lower), since every group keeps its own revisions.
    pub async fn compact(&self, request: pb::PbCompactionRequest) -> Result<pb::PbCompactionResponse, GateError> {
        let mut first_error = None;
        let mut last = None;
        let mut compacted_any = false;
        for group in self.groups.values() {
            let current = group.status().await?.header.map(|h| h.revision).unwrap_or(0);
            let revision = request.revision.min(current);
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
    async fn any_header(&self) -> Result<Option<pb::PbResponseHeader>, GateError> {
        Ok(self.home.status().await?.header)
    }
}

/// The seed of a policy's randomness: a digest of the scope, the request time and the ops (keys,
/// values, leases), so the same request at the same time draws the same bytes everywhere. The
/// trust layer's canonical request digest will take its place.
fn request_seed(context: &m::Context, now: std::time::Duration) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("aq request seed 2026-11");
    hasher.update(context.scope.id.as_bytes()).update(&now.as_nanos().to_le_bytes());
    for op in &context.ops {
        match op {
            m::Op::Put(p) => hasher.update(b"put").update(&p.key).update(&p.value).update(&p.lease.to_le_bytes()),
            m::Op::DeleteRange(d) => hasher.update(b"del").update(&d.key).update(&d.range_end),
        };
    }
    *hasher.finalize().as_bytes()
}

/// The leases the puts among `ops` attach.
fn leases_of(ops: &[m::Op]) -> impl Iterator<Item = i64> + '_ {
    ops.iter().filter_map(|op| match op {
        m::Op::Put(p) => Some(p.lease),
        m::Op::DeleteRange(_) => None,
    })
}

fn put_op(request: &pb::PbPutRequest) -> m::PutOp {
    m::PutOp {
        key: m::Bytes(request.key.clone()),
        value: m::Bytes(request.value.clone()),
        lease: request.lease,
        ignore_value: request.ignore_value,
        ignore_lease: request.ignore_lease,
    }
}

/// Collects the key ranges a transaction touches (compares and every op, nested included) and,
/// when asked, its mutations in order: success branch, then failure branch.
fn collect_txn(request: &pb::PbTxnRequest, ranges: &mut Vec<KeyRange>, mut ops: Option<&mut Vec<m::Op>>) {
    for compare in &request.compare {
        ranges.push(KeyRange::from_request(&compare.key, &compare.range_end));
    }
    for op in request.success.iter().chain(&request.failure) {
        match &op.request {
            Some(pb::PbTxnOpRequest::RequestRange(r)) => ranges.push(KeyRange::from_request(&r.key, &r.range_end)),
            Some(pb::PbTxnOpRequest::RequestPut(p)) => {
                ranges.push(KeyRange::from_request(&p.key, b""));
                if let Some(ops) = ops.as_deref_mut() {
                    ops.push(m::Op::Put(put_op(p)));
                }
            }
            Some(pb::PbTxnOpRequest::RequestDeleteRange(d)) => {
                ranges.push(KeyRange::from_request(&d.key, &d.range_end));
                if let Some(ops) = ops.as_deref_mut() {
                    ops.push(m::Op::DeleteRange(m::DeleteRangeOp {
                        key: m::Bytes(d.key.clone()),
                        range_end: m::Bytes(d.range_end.clone()),
                    }));
                }
            }
            Some(pb::PbTxnOpRequest::RequestTxn(t)) => collect_txn(t, ranges, ops.as_deref_mut()),
            None => {}
        }
    }
}

/// The key ranges a request op touches: its keys, and for a transaction its compares and reads.
fn footprint(op: &pb::PbTxnOpRequest) -> Vec<KeyRange> {
    match op {
        pb::PbTxnOpRequest::RequestPut(p) => vec![KeyRange::from_request(&p.key, b"")],
        pb::PbTxnOpRequest::RequestDeleteRange(d) => vec![KeyRange::from_request(&d.key, &d.range_end)],
        pb::PbTxnOpRequest::RequestRange(r) => vec![KeyRange::from_request(&r.key, &r.range_end)],
        pb::PbTxnOpRequest::RequestTxn(t) => {
            let mut ranges = Vec::new();
            collect_txn(t, &mut ranges, None);
            ranges
        }
    }
}

fn compare_to_model(compare: &pb::PbCompare) -> m::Compare {
    let target = match &compare.target_union {
        Some(pb::PbTargetUnion::Version(v)) => m::CompareTarget::Version(*v),
        Some(pb::PbTargetUnion::CreateRevision(v)) => m::CompareTarget::CreateRevision(*v),
        Some(pb::PbTargetUnion::ModRevision(v)) => m::CompareTarget::ModRevision(*v),
        Some(pb::PbTargetUnion::Value(v)) => m::CompareTarget::Value(m::Bytes(v.clone())),
        Some(pb::PbTargetUnion::Lease(v)) => m::CompareTarget::Lease(*v),
        None => m::CompareTarget::Version(0),
    };
    m::Compare {
        key: m::Bytes(compare.key.clone()),
        range_end: m::Bytes(compare.range_end.clone()),
        result: match compare.result {
            1 => m::CompareResult::Greater,
            2 => m::CompareResult::Less,
            3 => m::CompareResult::NotEqual,
            _ => m::CompareResult::Equal,
        },
        target,
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

fn unexpected(what: &str, response: &pb::PbTxnOpResponse) -> GateError {
    GateError::Backend(Status::internal(format!("etcd answered a {what} with {response:?}")))
}
