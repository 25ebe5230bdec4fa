//! Fixtures: JSON files of requests (or scope statistics) with the outcome a policy should give.
//!
//! The same format serves `cargo test` through [`crate::testing`] and `aq policy test` on a built
//! component, so a policy's fixtures check both its logic and its compiled form.
//!
//! ```json
//! { "cases": [
//!   { "name": "unsigned secret write is denied",
//!     "context": { "ops": [ { "put": { "key": "/registry/secrets/a", "value": "x" } } ] },
//!     "expect": { "verdict": "deny", "reason_contains": "role" } },
//!   { "name": "hot scope splits",
//!     "stats": { "write_rate": 5000.0, "split_candidates": ["/registry/events/m"] },
//!     "expect": { "advice": { "split": "/registry/events/m" } } }
//! ] }
//! ```
//!
//! A case may also give `reads` (key → stored value) and `counts` (prefix → key count): what the
//! host's `read` and `count` answer during that case. Keys not listed read as absent; prefixes
//! not listed count as 0.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Advice, ApprovalRule, Context, Decision, LineageLevel, ScopeStats, StoredValue};

/// A fixture file: a list of cases.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureFile {
    /// The cases, run in order.
    pub cases: Vec<Case>,
}

impl FixtureFile {
    /// Parses a fixture file, naming the problem on failure.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a valid fixture file: {e}"))
    }
}

/// One request (or statistics sample) and what the policy should answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows, printed in results.
    pub name: String,
    /// A mutation request to `evaluate`; exactly one of `context` and `stats` is given.
    #[serde(default)]
    pub context: Option<Context>,
    /// Statistics to `advise` on.
    #[serde(default)]
    pub stats: Option<ScopeStats>,
    /// What the host's `read` returns, by key.
    #[serde(default)]
    pub reads: BTreeMap<String, StoredValue>,
    /// What the host's `count` returns, by prefix.
    #[serde(default)]
    pub counts: BTreeMap<String, u64>,
    /// The expected outcome.
    pub expect: Expectation,
}

/// What to call for a case.
#[derive(Clone, Debug)]
pub enum Call<'a> {
    /// Call `evaluate`.
    Evaluate(&'a Context),
    /// Call `advise`.
    Advise(&'a ScopeStats),
}

impl Case {
    /// `reads` keyed by key bytes, as a host looks them up.
    pub fn reads_by_key(&self) -> BTreeMap<Vec<u8>, StoredValue> {
        self.reads.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect()
    }

    /// `counts` keyed by prefix bytes.
    pub fn counts_by_prefix(&self) -> BTreeMap<Vec<u8>, u64> {
        self.counts.iter().map(|(k, v)| (k.as_bytes().to_vec(), *v)).collect()
    }

    /// What the case asks to call, or why it is ill-formed.
    pub fn call(&self) -> Result<Call<'_>, String> {
        match (&self.context, &self.stats) {
            (Some(ctx), None) => Ok(Call::Evaluate(ctx)),
            (None, Some(stats)) => Ok(Call::Advise(stats)),
            _ => Err(format!("case {:?}: give exactly one of `context` and `stats`", self.name)),
        }
    }
}

/// Verdict names as fixtures write them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// `allow`
    Allow,
    /// `deny`
    Deny,
    /// `require_approval`
    RequireApproval,
}

/// The expected outcome. Every field given must match; fields left out are not checked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expectation {
    /// The verdict.
    pub verdict: Option<VerdictKind>,
    /// A substring of the deny reason.
    pub reason_contains: Option<String>,
    /// The approval rule, exactly.
    pub rule: Option<ApprovalRule>,
    /// The lineage level.
    pub lineage: Option<LineageLevel>,
    /// Annotations that must be present with these values.
    pub annotations: BTreeMap<String, String>,
    /// The advice, for `stats` cases.
    pub advice: Option<Advice>,
}

/// What a policy answered to a case.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// `evaluate`'s decision.
    Decision(Decision),
    /// `advise`'s advice.
    Advice(Advice),
}

impl Expectation {
    fn is_empty(&self) -> bool {
        self.verdict.is_none()
            && self.reason_contains.is_none()
            && self.rule.is_none()
            && self.lineage.is_none()
            && self.annotations.is_empty()
            && self.advice.is_none()
    }

    /// Checks an outcome, describing every mismatch.
    pub fn check(&self, outcome: &Outcome) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.is_empty() {
            problems.push("`expect` names nothing to check; give a verdict or an advice".to_string());
        }
        match outcome {
            Outcome::Decision(decision) => {
                if self.advice.is_some() {
                    problems.push("expected advice, but the case evaluated a request".to_string());
                }
                let (kind, reason, rule) = match &decision.verdict {
                    crate::Verdict::Allow => (VerdictKind::Allow, None, None),
                    crate::Verdict::Deny(r) => (VerdictKind::Deny, Some(r.as_str()), None),
                    crate::Verdict::RequireApproval(rule) => (VerdictKind::RequireApproval, None, Some(rule)),
                };
                if let Some(want) = self.verdict
                    && want != kind
                {
                    problems.push(format!("verdict: expected {want:?}, got {:?}", decision.verdict));
                }
                if let Some(want) = &self.reason_contains {
                    match reason {
                        Some(r) if r.contains(want.as_str()) => {}
                        Some(r) => problems.push(format!("reason: expected it to contain {want:?}, got {r:?}")),
                        None => problems.push(format!("reason: expected a deny containing {want:?}, got {kind:?}")),
                    }
                }
                if let Some(want) = &self.rule
                    && rule != Some(want)
                {
                    problems.push(format!("rule: expected {want:?}, got {rule:?}"));
                }
                if let Some(want) = self.lineage
                    && want != decision.lineage
                {
                    problems.push(format!("lineage: expected {want:?}, got {:?}", decision.lineage));
                }
                for (key, want) in &self.annotations {
                    match decision.annotations.get(key) {
                        Some(got) if got == want => {}
                        got => problems.push(format!("annotation {key:?}: expected {want:?}, got {got:?}")),
                    }
                }
            }
            Outcome::Advice(advice) => {
                if self.verdict.is_some() || self.reason_contains.is_some() || self.rule.is_some() {
                    problems.push("expected a decision, but the case asked for advice".to_string());
                }
                if let Some(want) = &self.advice
                    && want != advice
                {
                    problems.push(format!("advice: expected {want:?}, got {advice:?}"));
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}
