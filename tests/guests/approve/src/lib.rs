//! Requires approval for every write: exercises the gateway's require-approval path.

// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]

use aq_sdk::{ApprovalRule, Context, Decision, LineageLevel, Policy, Voter};

struct Approve;

impl Policy for Approve {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, _: &Context) -> Decision {
        Decision::require_approval(ApprovalRule {
            voters: vec![
                Voter { principal: "alice".into(), weight: 1 },
                Voter { principal: "bob".into(), weight: 1 },
            ],
            threshold: 2,
            expiry_seconds: 600,
        })
        .with_lineage(LineageLevel::Full)
    }
}

aq_sdk::export_policy!(Approve);
