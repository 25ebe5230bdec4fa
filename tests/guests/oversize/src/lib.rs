//! Returns a 4 MiB deny reason: over any sane result size limit.
// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
use aq_sdk::{Context, Decision, Policy};

struct Oversize;

impl Policy for Oversize {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, _: &Context) -> Decision {
        Decision::deny("no".repeat(2 << 20))
    }
}

aq_sdk::export_policy!(Oversize);
