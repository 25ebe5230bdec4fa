//! Glue between the generated component bindings and [`crate::Policy`]. Used by
//! [`crate::export_policy!`]; not part of the SDK's API.

use std::sync::OnceLock;

use crate::model as m;
use crate::Policy;

/// The generated bindings of the `aq:governance/governance` world.
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "aq:governance/governance",
        pub_export_macro: true,
        export_macro_name: "__export_governance",
        default_bindings_module: "aq_sdk::__private::wit",
    });
}

use wit::aq::governance::types as t;

pub use wit::exports::aq::governance::policy::Guest;
pub use t::{Advice as WitAdvice, ConfigError as WitConfigError, Context as WitContext};
pub use t::{Decision as WitDecision, ScopeStats as WitScopeStats};

/// The exported `init`: parse, validate, keep for this instance.
pub fn init<P: Policy>(slot: &OnceLock<P::Config>, config: String) -> Result<(), WitConfigError> {
    match crate::parse_config::<P>(&config) {
        Ok(parsed) => {
            // A second `init` in the same instance keeps the first configuration; the host
            // never does this.
            let _ = slot.set(parsed);
            Ok(())
        }
        Err(m::ConfigError::Malformed(msg)) => Err(WitConfigError::Malformed(msg)),
        Err(m::ConfigError::Invalid(msg)) => Err(WitConfigError::Invalid(msg)),
    }
}

/// The exported `evaluate`.
pub fn evaluate<P: Policy>(slot: &OnceLock<P::Config>, ctx: WitContext) -> WitDecision {
    let decision = match slot.get() {
        Some(config) => P::evaluate(config, &context_from_wit(ctx)),
        None => m::Decision::deny("policy was evaluated before `init`; this is a host bug, report it"),
    };
    decision_to_wit(decision)
}

/// The exported `advise`.
pub fn advise<P: Policy>(slot: &OnceLock<P::Config>, stats: WitScopeStats) -> WitAdvice {
    let advice = match slot.get() {
        Some(config) => P::advise(config, &stats_from_wit(stats)),
        None => m::Advice::Keep,
    };
    match advice {
        m::Advice::Keep => WitAdvice::Keep,
        m::Advice::Split(key) => WitAdvice::Split(key.0),
        m::Advice::Merge => WitAdvice::Merge,
    }
}

fn context_from_wit(ctx: WitContext) -> m::Context {
    m::Context {
        scope: m::ScopeInfo {
            id: ctx.scope.id,
            key_start: m::Bytes(ctx.scope.key_start),
            key_end: m::Bytes(ctx.scope.key_end),
            labels: ctx.scope.labels.into_iter().map(|l| (l.key, l.value)).collect(),
        },
        ops: ctx
            .ops
            .into_iter()
            .map(|op| match op {
                t::Op::Put(p) => m::Op::Put(m::PutOp {
                    key: m::Bytes(p.key),
                    value: m::Bytes(p.value),
                    lease: p.lease,
                    ignore_value: p.ignore_value,
                    ignore_lease: p.ignore_lease,
                }),
                t::Op::DeleteRange(d) => {
                    m::Op::DeleteRange(m::DeleteRangeOp { key: m::Bytes(d.key), range_end: m::Bytes(d.range_end) })
                }
            })
            .collect(),
        compares: ctx
            .compares
            .into_iter()
            .map(|c| m::Compare {
                key: m::Bytes(c.key),
                range_end: m::Bytes(c.range_end),
                result: match c.result {
                    t::CompareResult::Equal => m::CompareResult::Equal,
                    t::CompareResult::Greater => m::CompareResult::Greater,
                    t::CompareResult::Less => m::CompareResult::Less,
                    t::CompareResult::NotEqual => m::CompareResult::NotEqual,
                },
                target: match c.target {
                    t::CompareTarget::Version(v) => m::CompareTarget::Version(v),
                    t::CompareTarget::CreateRevision(v) => m::CompareTarget::CreateRevision(v),
                    t::CompareTarget::ModRevision(v) => m::CompareTarget::ModRevision(v),
                    t::CompareTarget::Value(v) => m::CompareTarget::Value(m::Bytes(v)),
                    t::CompareTarget::Lease(v) => m::CompareTarget::Lease(v),
                },
            })
            .collect(),
        credentials: ctx
            .credentials
            .into_iter()
            .map(|c| m::Credential { principal: c.principal, roles: c.roles })
            .collect(),
        transport: m::TransportIdentity {
            tls_name: ctx.transport.tls_name,
            etcd_user: ctx.transport.etcd_user,
            kube_user: wit::aq::governance::host::kube_user()
                .map(|u| m::KubeUser { username: u.username, uid: u.uid, groups: u.groups }),
        },
        request_time: m::Timestamp { seconds: ctx.request_time.seconds, nanoseconds: ctx.request_time.nanoseconds },
    }
}

fn decision_to_wit(d: m::Decision) -> WitDecision {
    WitDecision {
        verdict: match d.verdict {
            m::Verdict::Allow => t::Verdict::Allow,
            m::Verdict::Deny(reason) => t::Verdict::Deny(reason),
            m::Verdict::RequireApproval(rule) => t::Verdict::RequireApproval(t::ApprovalRule {
                voters: rule.voters.into_iter().map(|v| t::Voter { principal: v.principal, weight: v.weight }).collect(),
                threshold: rule.threshold,
                expiry_seconds: rule.expiry_seconds,
            }),
        },
        lineage: match d.lineage {
            m::LineageLevel::None => t::LineageLevel::None,
            m::LineageLevel::Digest => t::LineageLevel::Digest,
            m::LineageLevel::Full => t::LineageLevel::Full,
        },
        annotations: d.annotations.into_iter().map(|(key, value)| t::Annotation { key, value }).collect(),
    }
}

fn stats_from_wit(s: WitScopeStats) -> m::ScopeStats {
    m::ScopeStats {
        keys: s.keys,
        bytes: s.bytes,
        write_rate: s.write_rate,
        read_rate: s.read_rate,
        key_entropy: s.key_entropy,
        conflict_rate: s.conflict_rate,
        split_candidates: s.split_candidates.into_iter().map(m::Bytes).collect(),
    }
}
