//! Panics in `evaluate`: a trap whose message the engine should report.
// Guests are components only; natively the crate is empty.
#![cfg(target_arch = "wasm32")]
use aq_sdk::{Context, Decision, Policy};

struct Trap;

impl Policy for Trap {
    type Config = serde_json::Value;
    fn evaluate(_: &serde_json::Value, ctx: &Context) -> Decision {
        panic!("guest gave up on {} ops", ctx.ops.len());
    }
}

aq_sdk::export_policy!(Trap);
