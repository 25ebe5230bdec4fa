//! Conversions between the SDK's plain model (what the gate and fixtures speak) and the
//! generated component types (what crosses into a policy).

use aq_sdk as m;

use super::generated::wit as t;

pub(super) fn context(ctx: &m::Context) -> t::Context {
    t::Context {
        scope: t::ScopeInfo {
            id: ctx.scope.id.clone(),
            key_start: ctx.scope.key_start.0.clone(),
            key_end: ctx.scope.key_end.0.clone(),
            labels: ctx.scope.labels.iter().map(|(k, v)| t::Label { key: k.clone(), value: v.clone() }).collect(),
        },
        ops: ctx.ops.iter().map(op).collect(),
        compares: ctx.compares.iter().map(compare).collect(),
        credentials: ctx
            .credentials
            .iter()
            .map(|c| t::Credential { principal: c.principal.clone(), roles: c.roles.clone() })
            .collect(),
        transport: t::TransportIdentity {
            tls_name: ctx.transport.tls_name.clone(),
            etcd_user: ctx.transport.etcd_user.clone(),
        },
        request_time: t::Timestamp { seconds: ctx.request_time.seconds, nanoseconds: ctx.request_time.nanoseconds },
    }
}

pub(super) fn kube_user(user: &m::KubeUser) -> t::KubeUserInfo {
    t::KubeUserInfo { username: user.username.clone(), uid: user.uid.clone(), groups: user.groups.clone() }
}

fn op(op: &m::Op) -> t::Op {
    match op {
        m::Op::Put(p) => t::Op::Put(t::PutOp {
            key: p.key.0.clone(),
            value: p.value.0.clone(),
            lease: p.lease,
            ignore_value: p.ignore_value,
            ignore_lease: p.ignore_lease,
        }),
        m::Op::DeleteRange(d) => t::Op::DeleteRange(t::DeleteRangeOp { key: d.key.0.clone(), range_end: d.range_end.0.clone() }),
    }
}

fn compare(c: &m::Compare) -> t::Compare {
    t::Compare {
        key: c.key.0.clone(),
        range_end: c.range_end.0.clone(),
        result: match c.result {
            m::CompareResult::Equal => t::CompareResult::Equal,
            m::CompareResult::Greater => t::CompareResult::Greater,
            m::CompareResult::Less => t::CompareResult::Less,
            m::CompareResult::NotEqual => t::CompareResult::NotEqual,
        },
        target: match &c.target {
            m::CompareTarget::Version(v) => t::CompareTarget::Version(*v),
            m::CompareTarget::CreateRevision(v) => t::CompareTarget::CreateRevision(*v),
            m::CompareTarget::ModRevision(v) => t::CompareTarget::ModRevision(*v),
            m::CompareTarget::Value(v) => t::CompareTarget::Value(v.0.clone()),
            m::CompareTarget::Lease(v) => t::CompareTarget::Lease(*v),
        },
    }
}

pub(super) fn stats(s: &m::ScopeStats) -> t::ScopeStats {
    t::ScopeStats {
        keys: s.keys,
        bytes: s.bytes,
        write_rate: s.write_rate,
        read_rate: s.read_rate,
        key_entropy: s.key_entropy,
        conflict_rate: s.conflict_rate,
        split_candidates: s.split_candidates.iter().map(|k| k.0.clone()).collect(),
    }
}

/// Bytes of text and keys a decision carries, for the result-size limit.
pub(super) fn decision_size(d: &t::Decision) -> usize {
    let verdict = match &d.verdict {
        t::Verdict::Allow => 0,
        t::Verdict::Deny(reason) => reason.len(),
        t::Verdict::RequireApproval(rule) => rule.voters.iter().map(|v| v.principal.len() + 4).sum(),
    };
    verdict + d.annotations.iter().map(|a| a.key.len() + a.value.len()).sum::<usize>()
}

pub(super) fn decision(d: t::Decision) -> m::Decision {
    m::Decision {
        verdict: match d.verdict {
            t::Verdict::Allow => m::Verdict::Allow,
            t::Verdict::Deny(reason) => m::Verdict::Deny(reason),
            t::Verdict::RequireApproval(rule) => m::Verdict::RequireApproval(m::ApprovalRule {
                voters: rule.voters.into_iter().map(|v| m::Voter { principal: v.principal, weight: v.weight }).collect(),
                threshold: rule.threshold,
                expiry_seconds: rule.expiry_seconds,
            }),
        },
        lineage: match d.lineage {
            t::LineageLevel::None => m::LineageLevel::None,
            t::LineageLevel::Digest => m::LineageLevel::Digest,
            t::LineageLevel::Full => m::LineageLevel::Full,
        },
        annotations: d.annotations.into_iter().map(|a| (a.key, a.value)).collect(),
    }
}

pub(super) fn advice(a: t::Advice) -> m::Advice {
    match a {
        t::Advice::Keep => m::Advice::Keep,
        t::Advice::Split(key) => m::Advice::Split(m::Bytes(key)),
        t::Advice::Merge => m::Advice::Merge,
    }
}

pub(super) fn config_error(e: t::ConfigError) -> m::ConfigError {
    match e {
        t::ConfigError::Malformed(msg) => m::ConfigError::Malformed(msg),
        t::ConfigError::Invalid(msg) => m::ConfigError::Invalid(msg),
    }
}
