//! Allows every write with full lineage and always advises a split at `{"at": "<key>"}`: a
//! scope the advise loop is told to split and cannot (its lineage stays with its group).

// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]

use aq_sdk::{Advice, Bytes, Context, Decision, LineageLevel, Policy, ScopeStats};

struct SplitLineage;

impl Policy for SplitLineage {
    type Config = serde_json::Value;

    fn evaluate(_: &serde_json::Value, _: &Context) -> Decision {
        Decision::allow().with_lineage(LineageLevel::Full)
    }

    fn advise(config: &serde_json::Value, _: &ScopeStats) -> Advice {
        Advice::Split(Bytes(config["at"].as_str().unwrap_or_default().as_bytes().to_vec()))
    }
}

aq_sdk::export_policy!(SplitLineage);
