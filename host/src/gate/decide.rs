//! Step 3, decide: the scope's active policy on the request, at the current time, into a
//! verdict, the compares that guard the write on what the policy read, and the lineage record to
//! write with it. Every decision is counted and, as configured, logged.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use aq_sdk as m;
use etcd_client::proto as pb;

use super::{GateError, Gateway, ScopeRuntime, Shortfall, decisions, reader};
use crate::backend::compare::{RESULT_EQUAL, TARGET_MOD, TARGET_VERSION};
use crate::engine::EvalRequest;
use crate::index::KeyRange;
use crate::lineage::{ApprovalRecord, OpRecord, Record, RecordKind};

/// The outcome of an allowing evaluation.
pub(crate) struct Evaluated {
    /// Compares guarding the write on what the policy read.
    pub(super) guards: Vec<pb::PbCompare>,
    /// How much lineage the policy asked for.
    pub(super) lineage: m::LineageLevel,
    /// The policy that decided.
    pub(super) policy: crate::engine::PolicyDigest,
}

/// A decision on a write aq does not make ([`Gateway::decide`]).
#[derive(Debug)]
pub struct Decided {
    /// The scope that decided.
    pub scope: String,
    /// Its policy's evaluation: the decision, the version that made it, how it failed if it did.
    pub evaluation: crate::engine::Evaluation,
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
    pub(super) fn of(
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

    pub(super) fn record(&self, scope: &str) -> Record {
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
            layout: None,
        }
    }
}

impl Gateway {
    /// Asks the scope's active policy for advice on `stats` (its load across replicas); counts
    /// and logs the answer. `None` when the policy failed (logged as `failed`).
    pub fn advise(&self, runtime: &ScopeRuntime, stats: &m::ScopeStats, seed: [u8; 32]) -> Option<m::Advice> {
        let binding = runtime.slot.active();
        let answer = self.engine.advise(&binding, stats, seed);
        let (advice, at, failure) = match &answer {
            Ok(m::Advice::Keep) => ("keep", None, None),
            Ok(m::Advice::Split(key)) => ("split", Some(String::from_utf8_lossy(key).into_owned()), None),
            Ok(m::Advice::Merge) => ("merge", None, None),
            Err(failure) => ("failed", None, Some(failure.to_string())),
        };
        self.metrics.advised(&runtime.scope.id, advice);
        if let Some(failure) = &failure {
            tracing::warn!(scope = %runtime.scope.id, policy = ?binding.module.digest(), "advise failed: {failure}");
        }
        self.decisions.record_advice(&decisions::AdviceLine {
            time: decisions::now_rfc3339(),
            scope: &runtime.scope.id,
            policy: binding.module.digest().to_hex(),
            advice,
            at,
            stats,
            failure,
        });
        answer.ok()
    }

    /// What the scope's policy sees of a mutation from etcd user `user` (aq's etcd auth);
    /// `evaluate` stamps the request time.
    pub(super) fn context(
        &self,
        runtime: &ScopeRuntime,
        ops: Vec<m::Op>,
        compares: Vec<m::Compare>,
        user: Option<&str>,
    ) -> m::Context {
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
            transport: m::TransportIdentity { etcd_user: user.map(str::to_string), ..Default::default() },
            request_time: m::Timestamp::default(),
        }
    }

    /// Evaluates `context` with the scope's active policy, at the current time. Returns the
    /// compares that guard the write on what the policy read.
    pub(super) fn evaluate(&self, runtime: &ScopeRuntime, context: &mut m::Context) -> Result<Evaluated, GateError> {
        let scope = &runtime.scope;
        let evaluation = self.judge(runtime, context);
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

    /// Runs the scope's active policy on `context` and counts and logs the decision.
    fn judge(&self, runtime: &ScopeRuntime, context: &mut m::Context) -> crate::engine::Evaluation {
        let scope = &runtime.scope;
        let evaluation = self.run_policy(runtime, context);
        let verdict = evaluation.decision.verdict.kind();
        self.metrics.evaluated(&scope.id, verdict, evaluation.elapsed.as_secs_f64());
        if let Some(failure) = &evaluation.failure {
            self.metrics.policy_failed(&scope.id, failure.kind());
            tracing::warn!(scope = %scope.id, policy = ?evaluation.digest, kind = failure.kind(), "policy failed: {failure}");
        }
        if self.decisions.wants(verdict) {
            self.decisions.record_evaluation(context, &evaluation);
        }
        evaluation
    }

    /// Decides on a write that is not made through aq: an admission review's (see
    /// [`crate::admission`]). Routed to the scope that owns its keys and decided by that scope's
    /// active policy as the same write through the etcd API would be, so counted and logged
    /// alike; nothing is written, and no approval can be gathered for it.
    pub fn decide(
        &self,
        ops: Vec<m::Op>,
        compares: Vec<m::Compare>,
        transport: m::TransportIdentity,
    ) -> Result<Decided, GateError> {
        let routing = self.routing();
        let ranges: Vec<KeyRange> = ops.iter().map(op_range).collect();
        let runtime = routing.route_write(&ranges)?;
        let mut context = self.context(runtime, ops, compares, None);
        context.transport = transport;
        let evaluation = self.judge(runtime, &mut context);
        Ok(Decided { scope: runtime.scope.id.clone(), evaluation })
    }

    /// Runs the scope's active policy on `context`, stamped with the current time.
    pub(super) fn run_policy(&self, runtime: &ScopeRuntime, context: &mut m::Context) -> crate::engine::Evaluation {
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

    /// Evaluates `ops` against a scope's active policy without writing anything: the admin
    /// API's dry run. Every key must belong to the scope. Not counted in metrics or logged.
    pub fn dry_run(&self, scope_id: &str, ops: Vec<m::Op>) -> Result<crate::engine::Evaluation, GateError> {
        let routing = self.routing();
        let runtime = routing.scope(scope_id).ok_or_else(|| GateError::Unowned(format!("(scope {scope_id})")))?;
        let ranges: Vec<KeyRange> = ops.iter().map(op_range).collect();
        let owner = routing.route_write(&ranges)?;
        if owner.scope.id != scope_id {
            return Err(GateError::CrossScope(vec![scope_id.to_string(), owner.scope.id.clone()]));
        }
        let mut context = self.context(runtime, ops, Vec::new(), None);
        Ok(self.run_policy(runtime, &mut context))
    }
}

/// The keys an op writes.
fn op_range(op: &m::Op) -> KeyRange {
    match op {
        m::Op::Put(p) => KeyRange::from_request(&p.key, &[]),
        m::Op::DeleteRange(d) => KeyRange::from_request(&d.key, &d.range_end),
    }
}

/// The seed of a policy's randomness: a digest of the scope, the request time and the ops (keys,
/// values, leases), so the same request at the same time draws the same bytes everywhere. The
/// trust layer's canonical request digest will take its place.
pub(crate) fn request_seed(context: &m::Context, now: std::time::Duration) -> [u8; 32] {
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
